/* strata: the block-graph QMP commands (blockdev-add, blockdev-del,
 * blockdev-reopen, blockdev-snapshot-sync, blockdev-snapshot), with QEMU 7.2's
 * argument names, reply shapes and error texts.
 *
 * A blockdev definition (QAPI BlockdevOptions) is checked against the
 * schema and flattened into the core's dotted options by
 * blockdev-schema.c; the core does the rest: references to existing
 * nodes, the node-name rule, duplicates.  query-named-block-nodes lives
 * in commands-query.c (listed in the table below, in QEMU's order).
 *
 * Every command here edits or walks the graph under the block layer's
 * graph-edit lock (graph_lock(), block/graph.h), the same lock a job's
 * prepare and abort take; the job lock is taken under it.
 *
 * The monitor owns the nodes blockdev-add and the snapshot commands
 * created, one reference each, in creation order; only those can be
 * deleted, and shutdown closes them newest first so that overlays go
 * before the nodes they use.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block/graph.h"
#include "block/node.h"
#include "control/blockdev-schema.h"
#include "control/commands-block.h"
#include "control/qmp.h"
#include "jobs/job.h"
#include "util/cleanup.h"

static strata_node **owned;
static size_t nowned, capowned;

static bool
owned_add (strata_node *node)
{
  if (nowned == capowned) {
    size_t cap = capowned ? capowned * 2 : 8;
    strata_node **v = realloc (owned, cap * sizeof *v);
    if (!v)
      return false;
    owned = v;
    capowned = cap;
  }
  owned[nowned++] = node;
  return true;
}

static ssize_t
owned_index (strata_node *node)
{
  for (size_t i = 0; i < nowned; i++)
    if (owned[i] == node)
      return i;
  return -1;
}

static void
owned_remove (size_t i)
{
  memmove (&owned[i], &owned[i + 1], (nowned - i - 1) * sizeof *owned);
  nowned--;
}

/* ---- helpers ---- */

static strata_node *
find_node (const char *device, const char *name, struct qmp_error *err)
{
  strata_node *node = name ? graph_lookup (name) : NULL;

  /* strata has no devices (BlockBackends), only nodes, like
   * qemu-storage-daemon. */
  if (!node)
    qmp_error_set (err, "GenericError",
                   "Cannot find device='%s' nor node-name='%s'",
                   device ? device : "", name ? name : "");
  return node;
}

/* A node a block job holds takes no snapshot: QEMU's op blocker. */
static bool
check_no_job (strata_node *node, struct qmp_error *err)
{
  struct job *j;

  job_lock ();
  if ((j = job_holding_job_locked (node)))
    qmp_error_set (err, "GenericError", "Node '%s' is busy: %s",
                   node->node_name, j->user);
  job_unlock ();
  return !j;
}

/* The node whose backing CHILD is, or NULL. */
static strata_node *
backing_parent (strata_node *child)
{
  struct graph_edge e[8];
  int n = graph_parents (child, e, 8);

  for (int i = 0; i < n && i < 8; i++)
    if (strcmp (e[i].child_name, "backing") == 0)
      return e[i].parent;
  return NULL;
}

/* ---- blockdev-add ---- */

static json_t *
cmd_blockdev_add (json_t *args, struct qmp_error *err)
{
  strata_opts *opts = opts_new ();
  strata_error *e = NULL;
  strata_node *node = NULL;

  if (!opts) {
    qmp_error_set (err, "GenericError", "out of memory");
    return NULL;
  }
  if (!blockdev_options_visit (args ? args : json_object (), "", opts, err))
    goto out;
  if (!json_object_get (args, "node-name")) {
    qmp_error_set (err, "GenericError",
                   "'node-name' must be specified for the root node");
    goto out;
  }
  graph_lock ();
  node = node_open (opts, STRATA_OPEN_RDWR, &e);
  if (!node)
    qmp_error_from (err, e);
  else if (!owned_add (node)) {
    node_unref (node);
    node = NULL;
    qmp_error_set (err, "GenericError", "out of memory");
  }
  graph_unlock ();
out:
  opts_free (opts);
  return node ? json_object () : NULL;
}

/* ---- blockdev-del ---- */

static json_t *
cmd_blockdev_del (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "node-name", "string", true },
    { NULL },
  };
  const char *name;
  strata_node *node;
  struct graph_edge e[1];
  ssize_t i;
  json_t *ret = NULL;
  CLEANUP_FREE char *who = NULL;
  strata_node *overlay;
  bool implicit, filter;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  name = json_string_value (json_object_get (args, "node-name"));
  graph_lock ();
  if (!(node = graph_lookup (name))) {
    qmp_error_set (err, "GenericError",
                   "Failed to find node with node-name='%s'", name);
    goto out;
  }
  /* QEMU's order: a BlockBackend (an export's, the job's on its filter,
   * commit's on its top and base) first, "in use"; then the newest op blocker,
   * which is a job's when one holds the node (it came after the backing edge);
   * then ownership. */
  who = graph_first_user (node);
  filter = job_is_filter (node, &implicit);
  if ((who && strncmp (who, "export ", 7) == 0)
      || (filter && strcmp (node->drv->name, "copy-on-read") == 0)
      || job_is_backend (node)) {
    qmp_error_set (err, "GenericError", "Node %s is in use", name);
    goto out;
  }
  /* QEMU's commit_top is the overlay's backing for the job's life, and
   * that op blocker is its newest; strata's stands beside the chain
   * (drivers/jobfilter.c), so the overlay is the one above its child. */
  if (filter && strcmp (node->drv->name, "commit_top") == 0
      && (overlay = backing_parent (node->file))) {
    qmp_error_set (err, "GenericError",
                   "Node '%s' is busy: node is used as backing hd of '%s'",
                   name, overlay->node_name);
    goto out;
  }
  if (!check_no_job (node, err) || !qmp_check_not_backing (node, err))
    goto out;
  if ((i = owned_index (node)) < 0) {
    qmp_error_set (err, "GenericError", "Node %s is not owned by the monitor",
                   name);
    goto out;
  }
  if (who) {
    qmp_error_set (err, "GenericError", "Node '%s' is busy: %s", name, who);
    goto out;
  }
  /* Ours and the monitor's references; any other is a user. */
  if (graph_parents (node, e, 1) > 0 || atomic_load (&node->refcnt) > 2) {
    qmp_error_set (err, "GenericError", "Block device %s is in use", name);
    goto out;
  }
  owned_remove (i);
  node_flush (node);
  node_unref (node); /* the monitor's */
  ret = json_object ();
out:
  node_unref (node);
  graph_unlock ();
  return ret;
}

/* ---- blockdev-reopen ---- */

/* Refuse any option of the new definition OPTS that differs from what
 * NODE has now; the only change strata makes is read-only. */
static bool
reopen_check (strata_node *node, strata_opts *opts, bool *rw,
              struct qmp_error *err)
{
  bool b, direct, no_flush;

  node_cache_mode (node, &direct, &no_flush);
  *rw = true; /* omitted options take their defaults, as in QEMU */
  for (size_t i = 0; i < opts->n; i++) {
    const char *k = opts->v[i].key, *v = opts->v[i].value;
    bool same;

    if (strcmp (k, "driver") == 0)
      same = strcmp (v, node->drv->name) == 0;
    else if (strcmp (k, "node-name") == 0)
      same = true;
    else if (strcmp (k, "read-only") == 0) {
      parse_bool (v, &b);
      *rw = !b;
      same = true;
    }
    else if (strcmp (k, "force-share") == 0)
      same = parse_bool (v, &b)
             && b == !!(node->open_flags & STRATA_OPEN_FORCE_SHARE);
    else if (strcmp (k, "filename") == 0)
      same = !node->file && strcmp (v, node->filename) == 0;
    else if (strcmp (k, "cache.direct") == 0)
      same = parse_bool (v, &b) && b == direct;
    else if (strcmp (k, "cache.no-flush") == 0)
      same = parse_bool (v, &b) && b == no_flush;
    else if (strcmp (k, "file") == 0)
      same = node->file && strcmp (v, node->file->node_name) == 0;
    else if (strcmp (k, "backing") == 0)
      same = node->backing ? strcmp (v, node->backing->node_name) == 0 : !*v;
    else
      same = false;
    if (!same) {
      if (strncmp (k, "file.", 5) == 0 || strncmp (k, "backing.", 8) == 0)
        k = k[0] == 'f' ? "file" : "backing";
      qmp_error_set (err, "GenericError", "Cannot change the option '%s'", k);
      return false;
    }
  }
  return true;
}

static json_t *
cmd_blockdev_reopen (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "options", "any", true },
    { NULL },
  };
  json_t *list, *item;
  size_t n, idx, done = 0;
  strata_node **nodes = NULL;
  bool *rw = NULL, ok = false;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  list = json_object_get (args, "options");
  if (!json_is_array (list)) {
    qmp_error_set (err, "GenericError",
                   "Invalid parameter type for 'options', expected: array");
    return NULL;
  }
  n = json_array_size (list);
  nodes = calloc (n + 1, sizeof *nodes);
  rw = calloc (n + 1, sizeof *rw);
  graph_lock ();
  if (!nodes || !rw) {
    qmp_error_set (err, "GenericError", "out of memory");
    goto out;
  }
  json_array_foreach (list, idx, item) {
    char path[32];
    strata_opts *opts = opts_new ();
    const char *name;
    bool good;

    snprintf (path, sizeof path, "options[%zu].", idx);
    if (!json_is_object (item)) {
      qmp_error_set (err, "GenericError",
                     "Invalid parameter type for "
                     "'options[%zu]', expected: object",
                     idx);
      opts_free (opts);
      goto out;
    }
    good = opts && blockdev_options_visit (item, path, opts, err);
    name = json_string_value (json_object_get (item, "node-name"));
    if (good && !name) {
      qmp_error_set (err, "GenericError", "node-name not specified");
      good = false;
    }
    if (good && !(nodes[idx] = graph_lookup (name))) {
      qmp_error_set (err, "GenericError",
                     "Failed to find node with node-name='%s'", name);
      good = false;
    }
    good = good && reopen_check (nodes[idx], opts, &rw[idx], err);
    opts_free (opts);
    if (!good)
      goto out;
  }
  /* Apply; on failure put back what was already changed. */
  for (done = 0; done < n; done++) {
    strata_error *e = NULL;
    if (!strata_reopen (nodes[done], rw[done], 0, &e)) {
      qmp_error_from (err, e);
      while (done-- > 0)
        strata_reopen (nodes[done], !rw[done], 0, NULL);
      goto out;
    }
  }
  ok = true;
out:
  for (size_t i = 0; nodes && i < n; i++)
    node_unref (nodes[i]);
  graph_unlock ();
  free (nodes);
  free (rw);
  return ok ? json_object () : NULL;
}

/* ---- snapshots ---- */

/* Make OVERLAY (just opened with OLD as its backing) the top: drain and
 * flush OLD, make it read-only, and let the monitor own OVERLAY. */
static bool
take_place (strata_node *old, strata_node *overlay, struct qmp_error *err)
{
  strata_error *e = NULL;

  tracker_wait_idle (&old->tracker, 0, 0);
  if (!strata_reopen (old, false, 0, &e)) {
    qmp_error_from (err, e);
    return false;
  }
  if (owned_index (overlay) < 0 && !owned_add (overlay)) {
    strata_reopen (old, true, 0, NULL);
    qmp_error_set (err, "GenericError", "out of memory");
    return false;
  }
  return true;
}

/* S with every ',' doubled, for an option list; caller frees. */
static char *
escape_commas (const char *s)
{
  char *out = malloc (2 * strlen (s) + 1), *p = out;

  if (!out)
    return NULL;
  for (; *s; s++) {
    *p++ = *s;
    if (*s == ',')
      *p++ = ',';
  }
  *p = '\0';
  return out;
}

static json_t *
cmd_blockdev_snapshot_sync (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "device", "string", false },
    { "node-name", "string", false },
    { "snapshot-file", "string", true },
    { "snapshot-node-name", "string", false },
    { "format", "string", false },
    { "mode", "string", false },
    { NULL },
  };
  const char *device, *name, *file, *snap, *format, *mode;
  strata_node *node = NULL, *overlay = NULL, *taken;
  strata_opts *opts = NULL;
  strata_error *e = NULL;
  bool created = false, ok = false;
  char *fn = NULL, *o = NULL;
  int64_t size;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  device = json_string_value (json_object_get (args, "device"));
  name = json_string_value (json_object_get (args, "node-name"));
  file = json_string_value (json_object_get (args, "snapshot-file"));
  snap = json_string_value (json_object_get (args, "snapshot-node-name"));
  format = json_string_value (json_object_get (args, "format"));
  mode = json_string_value (json_object_get (args, "mode"));
  format = format ? format : "qcow2";
  if (mode && strcmp (mode, "existing") != 0
      && strcmp (mode, "absolute-paths") != 0) {
    qmp_error_set (err, "GenericError",
                   "Parameter 'mode' does not accept value '%s'", mode);
    return NULL;
  }
  graph_lock ();
  if (!(node = find_node (device, name, err))
      || !qmp_check_not_backing (node, err) || !check_no_job (node, err))
    goto out;
  if (snap && (taken = graph_lookup (snap))) {
    node_unref (taken);
    qmp_error_set (err, "GenericError",
                   "New overlay node-name already in "
                   "use");
    goto out;
  }
  if (strcmp (format, "qcow2") != 0) {
    qmp_error_set (err, "GenericError",
                   "strata cannot make a '%s' overlay: "
                   "only qcow2 images have a backing file",
                   format);
    goto out;
  }
  if (!mode || strcmp (mode, "absolute-paths") == 0) {
    if ((size = node_length (node)) < 0) {
      qmp_error_set (err, "GenericError", "%s: cannot get the image length",
                     node->filename);
      goto out;
    }
    /* The overlay records the image's own path, not the json:{...} name
     * a node with a non-default backing displays; a comma in the path is
     * escaped as ",," for the option list. */
    if (!(fn = escape_commas (node->filename))
        || asprintf (&o, "size=%" PRId64 ",backing_file=%s,backing_fmt=%s",
                     size, fn, node->drv->name)
               < 0) {
      o = NULL;
      qmp_error_set (err, "GenericError", "out of memory");
      goto out;
    }
    if (!strata_create (file, "qcow2", o, 0, &e)) {
      qmp_error_from (err, e);
      goto out;
    }
    created = true;
  }
  if (!(opts = opts_new ()) || !opts_set (opts, "driver", format)
      || !opts_set (opts, "file.driver", "file")
      || !opts_set (opts, "file.filename", file)
      || !opts_set (opts, "backing", node->node_name)
      || (snap && !opts_set (opts, "node-name", snap))) {
    qmp_error_set (err, "GenericError", "out of memory");
    goto out;
  }
  tracker_wait_idle (&node->tracker, 0, 0);
  node_flush (node);
  if (!(overlay = node_open (opts, STRATA_OPEN_RDWR, &e))) {
    qmp_error_from (err, e);
    goto out;
  }
  if (!take_place (node, overlay, err))
    goto out;
  overlay = NULL;
  ok = true;
out:
  if (overlay)
    node_unref (overlay);
  if (!ok && created)
    unlink (file);
  opts_free (opts);
  node_unref (node);
  graph_unlock ();
  free (fn);
  free (o);
  return ok ? json_object () : NULL;
}

static json_t *
cmd_blockdev_snapshot (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "node", "string", true },
    { "overlay", "string", true },
    { NULL },
  };
  const char *name, *oname;
  strata_node *node = NULL, *overlay = NULL;
  struct graph_edge e[1];
  strata_error *se = NULL;
  bool ok = false;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  name = json_string_value (json_object_get (args, "node"));
  oname = json_string_value (json_object_get (args, "overlay"));
  graph_lock ();
  if (!(node = find_node (name, name, err))
      || !(overlay = find_node (oname, oname, err))
      || !qmp_check_not_backing (node, err) || !check_no_job (node, err))
    goto out;
  if (overlay == node || graph_parents (overlay, e, 1) > 0) {
    qmp_error_set (err, "GenericError", "The overlay is already in use");
    goto out;
  }
  if (overlay->backing) {
    qmp_error_set (err, "GenericError",
                   "The overlay already has a backing image");
    goto out;
  }
  /* A format that records a backing file in its header (qcow2). */
  if (!overlay->drv->change_backing_file) {
    qmp_error_set (err, "GenericError",
                   "The overlay does not support backing images");
    goto out;
  }
  tracker_wait_idle (&node->tracker, 0, 0);
  tracker_wait_idle (&overlay->tracker, 0, 0);
  node_flush (node);
  node_ref (node);
  if (!node_attach_child (overlay, "backing", node, &se)) {
    node_unref (node);
    qmp_error_from (err, se);
    goto out;
  }
  overlay->backing_explicit = true;
  if (!take_place (node, overlay, err)) {
    node_detach_child (overlay, "backing");
    goto out;
  }
  ok = true;
out:
  node_unref (overlay);
  node_unref (node);
  graph_unlock ();
  return ok ? json_object () : NULL;
}

const struct qmp_command qmp_block_commands[] = {
  { "blockdev-add", cmd_blockdev_add },
  { "blockdev-del", cmd_blockdev_del },
  { "query-named-block-nodes", cmd_query_named_block_nodes },
  { "query-block", cmd_query_block },
  { "blockdev-reopen", cmd_blockdev_reopen },
  { "x-blockdev-reopen", cmd_blockdev_reopen },
  { "blockdev-snapshot-sync", cmd_blockdev_snapshot_sync },
  { "blockdev-snapshot", cmd_blockdev_snapshot },
  { NULL, NULL },
};

void
qmp_block_shutdown (void)
{
  graph_lock ();
  /* Newest first: an overlay goes before the nodes it uses, so each
   * flush reaches a backing node that is still open. */
  while (nowned > 0) {
    strata_node *node = owned[--nowned];
    node_flush (node);
    node_unref (node);
  }
  free (owned);
  owned = NULL;
  capowned = 0;
  graph_unlock ();
}
