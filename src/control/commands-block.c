/* strata: the block-graph QMP commands (blockdev-add, blockdev-del,
 * query-named-block-nodes, blockdev-reopen, blockdev-snapshot-sync,
 * blockdev-snapshot), with QEMU 7.2's argument names, reply shapes and
 * error texts.
 *
 * A blockdev definition (QAPI BlockdevOptions) is checked here against
 * the schema of the drivers strata has, in QEMU's order (members in
 * schema order, nested definitions where they appear, unknown members at
 * the end of each object), and then flattened into the core's dotted
 * options ("file.filename=...", "backing=" for null).  The core does the
 * rest: references to existing nodes, the node-name rule, duplicates.
 *
 * The monitor owns the nodes blockdev-add and the snapshot commands
 * created, one reference each, in creation order; only those can be
 * deleted, and shutdown closes them newest first so that overlays go
 * before the nodes they use.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block/graph.h"
#include "block/node.h"
#include "control/job.h"
#include "control/qmp.h"
#include "util/cleanup.h"

static pthread_mutex_t block_lock = PTHREAD_MUTEX_INITIALIZER;

/* For graph edits from job threads (control/job.h). */
void
qmp_block_lock (void)
{
  pthread_mutex_lock (&block_lock);
}

void
qmp_block_unlock (void)
{
  pthread_mutex_unlock (&block_lock);
}

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

static void
set_error_from (struct qmp_error *err, strata_error *e)
{
  qmp_error_set (err, "GenericError", "%s",
                 e ? strata_error_message (e) : "unknown error");
  strata_error_free (e);
}

/* ---- BlockdevOptions ---- */

enum kind { K_STR, K_BOOL, K_INT, K_ENUM, K_OBJ, K_REF, K_REF_OR_NULL,
            K_LIST /* of objects with MEMBERS */ };

struct member {
  const char *name;
  enum kind kind;
  bool required;
  const char *const *values;        /* K_ENUM */
  const struct member *members;     /* K_OBJ, K_LIST */
  bool pass;                        /* hand to the core */
};

static const char *const discard_values[] = { "ignore", "unmap", NULL };
static const char *const dz_values[] = { "off", "on", "unmap", NULL };
static const char *const locking_values[] = { "off", "on", "auto", NULL };
static const char *const aio_values[] = { "threads", "native", "io_uring",
                                          NULL };
static const char *const driver_values[] = { "blkdebug", "copy-on-read",
                                             "file", "nbd", "qcow2", "raw",
                                             NULL };

static const struct member cache_members[] = {
  { "direct", K_BOOL, false, NULL, NULL, true },
  { "no-flush", K_BOOL, false, NULL, NULL, true },
  { NULL },
};

/* BlockdevOptionsBase, then each driver's variant members. */
static const struct member base_members[] = {
  { "driver", K_ENUM, true, driver_values, NULL, true },
  { "node-name", K_STR, false, NULL, NULL, true },
  { "discard", K_ENUM, false, discard_values, NULL, false },
  { "cache", K_OBJ, false, NULL, cache_members, true },
  { "read-only", K_BOOL, false, NULL, NULL, true },
  { "auto-read-only", K_BOOL, false, NULL, NULL, false },
  { "force-share", K_BOOL, false, NULL, NULL, true },
  { "detect-zeroes", K_ENUM, false, dz_values, NULL, false },
  { NULL },
};
static const struct member file_members[] = {
  { "filename", K_STR, true, NULL, NULL, true },
  { "locking", K_ENUM, false, locking_values, NULL, true },
  { "aio", K_ENUM, false, aio_values, NULL, true },
  { NULL },
};
static const struct member raw_members[] = {
  { "file", K_REF, true, NULL, NULL, true },
  { "offset", K_INT, false, NULL, NULL, true },
  { "size", K_INT, false, NULL, NULL, true },
  { NULL },
};
static const struct member qcow2_members[] = {
  { "file", K_REF, true, NULL, NULL, true },
  { "backing", K_REF_OR_NULL, false, NULL, NULL, true },
  { "l2-cache-size", K_INT, false, NULL, NULL, true },
  { NULL },
};

/* SocketAddress; which members a type needs is checked by
 * check_nbd_server (QEMU's union). */
static const char *const socket_types[] = { "inet", "unix", "vsock", "fd",
                                            NULL };
static const struct member socket_members[] = {
  { "type", K_ENUM, true, socket_types, NULL, true },
  { "path", K_STR, false, NULL, NULL, true },
  { "host", K_STR, false, NULL, NULL, true },
  { "port", K_STR, false, NULL, NULL, true },
  { NULL },
};
/* BlockdevOptionsNbd without TLS, dirty bitmaps and open-timeout. */
static const struct member nbd_members[] = {
  { "server", K_OBJ, true, NULL, socket_members, true },
  { "export", K_STR, false, NULL, NULL, true },
  { "reconnect-delay", K_INT, false, NULL, NULL, true },
  { NULL },
};

static const struct member cor_members[] = {
  { "file", K_REF, true, NULL, NULL, true },
  { "bottom", K_STR, false, NULL, NULL, true },
  { NULL },
};
static const struct member inject_error_members[] = {
  { "event", K_STR, true, NULL, NULL, true },
  { "state", K_INT, false, NULL, NULL, true },
  { "iotype", K_STR, false, NULL, NULL, true },
  { "errno", K_INT, false, NULL, NULL, true },
  { "sector", K_INT, false, NULL, NULL, true },
  { "once", K_BOOL, false, NULL, NULL, true },
  { "immediately", K_BOOL, false, NULL, NULL, true },
  { NULL },
};
/* The subset of QEMU's BlockdevOptionsBlkdebug in drivers/blkdebug.c. */
static const struct member blkdebug_members[] = {
  { "image", K_REF, true, NULL, NULL, true },
  { "config", K_STR, false, NULL, NULL, true },
  { "inject-error", K_LIST, false, NULL, inject_error_members, true },
  { NULL },
};

static const struct member *
variant_members (const char *driver)
{
  if (strcmp (driver, "file") == 0)
    return file_members;
  if (strcmp (driver, "copy-on-read") == 0)
    return cor_members;
  if (strcmp (driver, "blkdebug") == 0)
    return blkdebug_members;
  if (strcmp (driver, "raw") == 0)
    return raw_members;
  if (strcmp (driver, "nbd") == 0)
    return nbd_members;
  return qcow2_members;
}

/* The members SocketAddress's type needs, in QEMU's words. */
static bool
check_nbd_server (json_t *obj, const char *path, struct qmp_error *err)
{
  json_t *server = json_object_get (obj, "server");
  const char *type = json_string_value (json_object_get (server, "type"));
  const char *need[2] = { NULL, NULL };

  if (strcmp (type, "unix") == 0)
    need[0] = "path";
  else if (strcmp (type, "inet") == 0)
    need[0] = "host", need[1] = "port";
  else {
    qmp_error_set (err, "GenericError", "strata does not implement "
                   "server.type '%s' (only 'unix' and 'inet')", type);
    return false;
  }
  for (int i = 0; i < 2 && need[i]; i++)
    if (!json_object_get (server, need[i])) {
      qmp_error_set (err, "GenericError", "Parameter '%sserver.%s' is "
                     "missing", path, need[i]);
      return false;
    }
  json_int_t delay = json_integer_value (json_object_get (obj,
                                                         "reconnect-delay"));
  if (delay < 0 || delay > UINT32_MAX) {
    qmp_error_set (err, "GenericError",
                   "Parameter '%sreconnect-delay' expects uint32_t", path);
    return false;
  }
  return true;
}

static bool visit_blockdev (json_t *obj, const char *path, strata_opts *out,
                            const char *prefix, struct qmp_error *err);
static bool visit_list (json_t *list, const struct member *spec,
                        const char *path, strata_opts *out,
                        const char *prefix, struct qmp_error *err);

static bool
put (strata_opts *out, const char *prefix, const char *name,
     const char *value, struct qmp_error *err)
{
  char *key;
  bool ok;

  if (asprintf (&key, "%s%s", prefix, name) < 0) {
    qmp_error_set (err, "GenericError", "out of memory");
    return false;
  }
  ok = opts_set (out, key, value);
  free (key);
  if (!ok)
    qmp_error_set (err, "GenericError", "out of memory");
  return ok;
}

static const char *
kind_name (enum kind k)
{
  switch (k) {
  case K_BOOL: return "boolean";
  case K_INT: return "integer";
  case K_OBJ: return "object";
  case K_REF: return "BlockdevRef";
  case K_REF_OR_NULL: return "BlockdevRefOrNull";
  case K_LIST: return "array";
  default: return "string";
  }
}

/* Check OBJ's members against SPEC and flatten the ones the core takes
 * into OUT under PREFIX.  PATH prefixes names in messages. */
static bool
visit_members (json_t *obj, const struct member *spec, const char *path,
               strata_opts *out, const char *prefix, struct qmp_error *err)
{
  char buf[64];

  for (const struct member *m = spec; m->name; m++) {
    json_t *v = json_object_get (obj, m->name);
    CLEANUP_FREE char *p = NULL, *px = NULL;
    bool ok;

    if (asprintf (&p, "%s%s", path, m->name) < 0
        || asprintf (&px, "%s%s.", prefix, m->name) < 0) {
      qmp_error_set (err, "GenericError", "out of memory");
      return false;
    }
    if (!v) {
      if (m->required) {
        qmp_error_set (err, "GenericError", "Parameter '%s' is missing", p);
        return false;
      }
      continue;
    }
    switch (m->kind) {
    case K_STR: case K_ENUM: ok = json_is_string (v); break;
    case K_BOOL: ok = json_is_boolean (v); break;
    case K_INT: ok = json_is_integer (v); break;
    case K_OBJ: ok = json_is_object (v); break;
    case K_REF: ok = json_is_string (v) || json_is_object (v); break;
    case K_LIST: ok = json_is_array (v); break;
    default: ok = json_is_string (v) || json_is_object (v) || json_is_null (v);
    }
    if (!ok) {
      qmp_error_set (err, "GenericError",
                     "Invalid parameter type for '%s', expected: %s", p,
                     kind_name (m->kind));
      return false;
    }
    if (m->kind == K_ENUM) {
      const char *const *e = m->values;
      while (*e && strcmp (*e, json_string_value (v)) != 0)
        e++;
      if (!*e) {
        /* QEMU's visitor names an enum member without its path. */
        qmp_error_set (err, "GenericError",
                       "Parameter '%s' does not accept value '%s'", m->name,
                       json_string_value (v));
        return false;
      }
    }
    if (strcmp (m->name, "detect-zeroes") == 0
        && strcmp (json_string_value (v), "off") != 0) {
      qmp_error_set (err, "GenericError", "strata does not implement "
                     "detect-zeroes=%s", json_string_value (v));
      return false;
    }
    if (m->kind == K_LIST) {
      if (!visit_list (v, m->members, p, out, px, err))
        return false;
      continue;
    }
    if (json_is_object (v)) {
      CLEANUP_FREE char *np = NULL;
      if (asprintf (&np, "%s.", p) < 0)
        np = NULL;
      if (!np || (m->kind == K_OBJ
                      ? !visit_members (v, m->members, np, out, px, err)
                      : !visit_blockdev (v, np, out, px, err)))
        return false;
      continue;
    }
    if (!m->pass)
      continue;
    if (json_is_null (v))
      ok = put (out, prefix, m->name, "", err);
    else if (json_is_boolean (v))
      ok = put (out, prefix, m->name, json_is_true (v) ? "on" : "off", err);
    else if (json_is_integer (v)) {
      snprintf (buf, sizeof buf, "%" JSON_INTEGER_FORMAT,
                json_integer_value (v));
      ok = put (out, prefix, m->name, buf, err);
    }
    else
      ok = put (out, prefix, m->name, json_string_value (v), err);
    if (!ok)
      return false;
  }
  return true;
}

/* Unknown members, after the known ones as QEMU's visitor reports them. */
static bool
check_unknown (json_t *obj, const struct member *a, const struct member *b,
               const char *path, struct qmp_error *err)
{
  const char *key;
  json_t *v;

  json_object_foreach (obj, key, v) {
    const struct member *m = NULL;
    for (const struct member *s = a; !m && s->name; s++)
      if (strcmp (s->name, key) == 0)
        m = s;
    for (const struct member *s = b; !m && b && s->name; s++)
      if (strcmp (s->name, key) == 0)
        m = s;
    if (!m) {
      qmp_error_set (err, "GenericError", "Parameter '%s%s' is unexpected",
                     path, key);
      return false;
    }
    if (m->kind == K_OBJ) {
      CLEANUP_FREE char *np = NULL;
      if (asprintf (&np, "%s%s.", path, key) < 0
          || !check_unknown (v, m->members, NULL, np, err))
        return false;
    }
  }
  return true;
}

/* A list of objects: element I is checked as PATH[I] and flattened
 * under PREFIX.I. (QEMU's dotted list syntax). */
static bool
visit_list (json_t *list, const struct member *spec, const char *path,
            strata_opts *out, const char *prefix, struct qmp_error *err)
{
  size_t i;
  json_t *e;

  json_array_foreach (list, i, e) {
    CLEANUP_FREE char *p = NULL, *np = NULL, *px = NULL;

    if (asprintf (&p, "%s[%zu]", path, i) < 0
        || asprintf (&np, "%s.", p) < 0
        || asprintf (&px, "%s%zu.", prefix, i) < 0) {
      qmp_error_set (err, "GenericError", "out of memory");
      return false;
    }
    if (!json_is_object (e)) {
      qmp_error_set (err, "GenericError",
                     "Invalid parameter type for '%s', expected: object", p);
      return false;
    }
    if (!visit_members (e, spec, np, out, px, err)
        || !check_unknown (e, spec, NULL, np, err))
      return false;
  }
  return true;
}

static bool
visit_blockdev (json_t *obj, const char *path, strata_opts *out,
                const char *prefix, struct qmp_error *err)
{
  const char *driver;
  const struct member *variant;

  if (!visit_members (obj, base_members, path, out, prefix, err))
    return false;
  driver = json_string_value (json_object_get (obj, "driver"));
  variant = variant_members (driver);
  return visit_members (obj, variant, path, out, prefix, err)
         && check_unknown (obj, base_members, variant, path, err)
         && (strcmp (driver, "nbd") != 0 || check_nbd_server (obj, path, err));
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

/* The parent using NODE as its backing, if any. */
static strata_node *
backing_parent (strata_node *node)
{
  struct graph_edge e[8];
  int n = graph_parents (node, e, 8);

  for (int i = 0; i < n && i < 8; i++)
    if (strcmp (e[i].child_name, "backing") == 0)
      return e[i].parent;
  return NULL;
}

static bool
check_not_backing (strata_node *node, struct qmp_error *err)
{
  strata_node *p = backing_parent (node);

  if (p)
    qmp_error_set (err, "GenericError", "Node '%s' is busy: node is used as "
                   "backing hd of '%s'", node->node_name, p->node_name);
  return !p;
}

/* A node a block job holds takes no snapshot: QEMU's op blocker. */
static bool
check_no_job (strata_node *node, struct qmp_error *err)
{
  struct job *j;

  job_lock ();
  if ((j = job_holding_locked (node)))
    qmp_error_set (err, "GenericError", "Node '%s' is busy: %s",
                   node->node_name, j->user);
  job_unlock ();
  return !j;
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
  if (!visit_blockdev (args ? args : json_object (), "", opts, "", err))
    goto out;
  if (!json_object_get (args, "node-name")) {
    qmp_error_set (err, "GenericError",
                   "'node-name' must be specified for the root node");
    goto out;
  }
  pthread_mutex_lock (&block_lock);
  node = node_open (opts, STRATA_OPEN_RDWR, &e);
  if (!node)
    set_error_from (err, e);
  else if (!owned_add (node)) {
    node_unref (node);
    node = NULL;
    qmp_error_set (err, "GenericError", "out of memory");
  }
  pthread_mutex_unlock (&block_lock);
out:
  opts_free (opts);
  return node ? json_object () : NULL;
}

/* ---- blockdev-del ---- */

static json_t *
cmd_blockdev_del (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "node-name", "string", true }, { NULL },
  };
  const char *name;
  strata_node *node;
  struct graph_edge e[1];
  ssize_t i;
  json_t *ret = NULL;
  CLEANUP_FREE char *who = NULL;
  bool implicit;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  name = json_string_value (json_object_get (args, "node-name"));
  pthread_mutex_lock (&block_lock);
  if (!(node = graph_lookup (name))) {
    qmp_error_set (err, "GenericError",
                   "Failed to find node with node-name='%s'", name);
    goto out;
  }
  /* QEMU's order: a BlockBackend (an export's, or the job's on its
   * filter) first, "in use"; then the newest op blocker, which is a
   * job's when one holds the node (it came after the backing edge); then
   * ownership. */
  who = graph_first_user (node);
  if ((who && strncmp (who, "export ", 7) == 0)
      || job_is_filter (node, &implicit)) {
    qmp_error_set (err, "GenericError", "Node %s is in use", name);
    goto out;
  }
  if (!check_no_job (node, err) || !check_not_backing (node, err))
    goto out;
  if ((i = owned_index (node)) < 0) {
    qmp_error_set (err, "GenericError",
                   "Node %s is not owned by the monitor", name);
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
  node_unref (node);  /* the monitor's */
  ret = json_object ();
out:
  node_unref (node);
  pthread_mutex_unlock (&block_lock);
  return ret;
}

/* ---- query-named-block-nodes ---- */

static json_t *full_options (strata_node *node);
static char *display_filename (strata_node *node);

/* Did the options or a graph change pick a backing other than the one the
 * image header names?  Then QEMU describes the node with json:{...}. */
static bool
backing_overridden (strata_node *node)
{
  struct strata_info info;
  CLEANUP_FREE char *bfn = NULL;

  if (!node->backing_explicit || !strata_get_info (node, &info, 0, NULL))
    return false;
  if (!node->backing)
    return info.backing_filename != NULL;
  bfn = display_filename (node->backing);
  return !info.backing_filename || !bfn
         || strcmp (info.backing_filename, bfn) != 0;
}

static json_t *
full_options (strata_node *node)
{
  json_t *o = json_pack ("{s:s}", "driver", node->drv->name);

  if (!node->file) {
    json_object_set_new (o, "filename", json_string (node->filename));
    return o;
  }
  json_object_set_new (o, "file", full_options (node->file));
  if (backing_overridden (node))
    json_object_set_new (o, "backing", node->backing
                                           ? full_options (node->backing)
                                           : json_null ());
  return o;
}

/* The name QEMU shows: the file's name, or json:{...} when the node's
 * options cannot be told by a file name.  Caller frees. */
static char *
display_filename (strata_node *node)
{
  json_t *o;
  char *s, *out = NULL;
  bool implicit = false;

  /* A filter (copy-on-read, blkdebug) is never told by a file name,
   * except the one a job put over its device without a name. */
  if (node->file && job_is_filter (node, &implicit) && implicit)
    return display_filename (node->file);
  if (!node->file || (!node->drv->is_filter && !backing_overridden (node)))
    return strdup (node->filename ? node->filename : "");
  o = full_options (node);
  s = json_dumps (o, JSON_SORT_KEYS);
  json_decref (o);
  if (s && asprintf (&out, "json:%s", s) < 0)
    out = NULL;
  free (s);
  return out;
}

/* NAME as a backing name of NODE resolves: relative to NODE's directory
 * (caller frees).  Also block-stream's, to find a base by name. */
char *
qmp_full_backing_filename (strata_node *node, const char *name)
{
  const char *slash = strrchr (node->filename, '/');
  char *out;

  if (name[0] == '/' || !slash)
    return strdup (name);
  if (asprintf (&out, "%.*s%s", (int) (slash - node->filename + 1),
                node->filename, name) < 0)
    return NULL;
  return out;
}

/* The node QEMU describes as "backing-image" and counts in the depth: a
 * filter's child, or a format's backing node. */
static strata_node *
filtered_or_backing (strata_node *node)
{
  return node->drv->is_filter ? node->file : node->backing;
}

static json_t *
image_info (strata_node *node, bool nested, struct qmp_error *err)
{
  struct strata_info info;
  strata_error *e = NULL;
  json_t *o;
  char *fn;

  if (!strata_get_info (node, &info, 0, &e)) {
    set_error_from (err, e);
    return NULL;
  }
  /* QEMU's protocol drivers report their length in whole sectors. */
  if (!node->file)
    info.virtual_size = (info.virtual_size + 511) & ~(uint64_t) 511;
  fn = display_filename (node);
  o = json_pack ("{s:I, s:s?, s:s}", "virtual-size",
                 (json_int_t) info.virtual_size, "filename", fn, "format",
                 node->drv->name);
  free (fn);
  if (!info.dirty_unknown)      /* raw over NBD: none, as QEMU */
    json_object_set_new (o, "dirty-flag", json_boolean (info.dirty));
  if (info.cluster_size)
    json_object_set_new (o, "cluster-size", json_integer (info.cluster_size));
  if (info.actual_size)
    json_object_set_new (o, "actual-size", json_integer (info.actual_size));
  if (info.format_specific && strcmp (info.format_specific, "qcow2") == 0)
    json_object_set_new (o, "format-specific", json_pack (
        "{s:s, s:{s:s, s:s, s:b, s:i, s:b, s:b}}", "type", "qcow2", "data",
        "compat", info.qcow2.compat, "compression-type",
        info.qcow2.compression_type, "lazy-refcounts",
        info.qcow2.lazy_refcounts, "refcount-bits", info.qcow2.refcount_bits,
        "corrupt", info.qcow2.corrupt, "extended-l2",
        info.qcow2.extended_l2));
  if (info.backing_filename) {
    char *full = qmp_full_backing_filename (node, info.backing_filename);
    json_object_set_new (o, "backing-filename",
                         json_string (info.backing_filename));
    if (full)
      json_object_set_new (o, "full-backing-filename", json_string (full));
    free (full);
  }
  if (info.backing_format)
    json_object_set_new (o, "backing-filename-format",
                         json_string (info.backing_format));
  if (nested && filtered_or_backing (node)) {
    json_t *b = image_info (filtered_or_backing (node), true, err);
    if (!b) {
      json_decref (o);
      return NULL;
    }
    json_object_set_new (o, "backing-image", b);
  }
  return o;
}

static json_t *
block_device_info (strata_node *node, bool flat, struct qmp_error *err)
{
  json_t *image = image_info (node, !flat, err), *o;
  strata_node *bottom = node;
  int depth = 0;
  char *fn;

  if (!image)
    return NULL;
  while (bottom->file)
    bottom = bottom->file;
  /* QEMU counts the chain it described in "image": none when flat. */
  for (strata_node *b = filtered_or_backing (node); !flat && b;
       b = filtered_or_backing (b))
    depth++;
  fn = display_filename (node);
  o = json_pack ("{s:s, s:s, s:s?, s:b, s:b, s:s, s:i, s:o, s:i, s:i, s:i,"
                 " s:i, s:i, s:i, s:i, s:{s:b, s:b, s:b}}",
                 "node-name", node->node_name, "drv", node->drv->name,
                 "file", fn, "ro", node->read_only, "encrypted", 0,
                 "detect_zeroes", "off", "backing_file_depth", depth,
                 "image", image, "bps", 0, "bps_rd", 0, "bps_wr", 0, "iops",
                 0, "iops_rd", 0, "iops_wr", 0, "write_threshold", 0,
                 "cache", "writeback", 1, "direct", bottom->cache_direct,
                 "no-flush", bottom->cache_no_flush);
  free (fn);
  if (node->backing) {
    fn = display_filename (node->backing);
    json_object_set_new (o, "backing_file", json_string (fn));
    free (fn);
  }
  return o;
}

static json_t *
cmd_query_named_block_nodes (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "flat", "bool", false }, { NULL },
  };
  strata_node **nodes;
  size_t n;
  bool flat;
  json_t *list;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  flat = json_is_true (json_object_get (args, "flat"));
  pthread_mutex_lock (&block_lock);
  n = graph_list (&nodes);
  list = json_array ();
  /* Newest first, as QEMU lists them. */
  for (size_t i = n; i-- > 0;) {
    json_t *o = block_device_info (nodes[i], flat, err);
    if (!o) {
      json_decref (list);
      list = NULL;
      break;
    }
    json_array_append_new (list, o);
  }
  graph_list_free (nodes, n);
  pthread_mutex_unlock (&block_lock);
  return list;
}

/* ---- blockdev-reopen ---- */

/* Refuse any option of the new definition OPTS that differs from what
 * NODE has now; the only change strata makes is read-only. */
static bool
reopen_check (strata_node *node, strata_opts *opts, bool *rw,
              struct qmp_error *err)
{
  strata_node *bottom = node;
  bool b;

  while (bottom->file)
    bottom = bottom->file;
  *rw = true;  /* omitted options take their defaults, as in QEMU */
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
      same = parse_bool (v, &b) && b == bottom->cache_direct;
    else if (strcmp (k, "cache.no-flush") == 0)
      same = parse_bool (v, &b) && b == bottom->cache_no_flush;
    else if (strcmp (k, "file") == 0)
      same = node->file && strcmp (v, node->file->node_name) == 0;
    else if (strcmp (k, "backing") == 0)
      same = node->backing ? strcmp (v, node->backing->node_name) == 0
                           : !*v;
    else
      same = false;
    if (!same) {
      if (strncmp (k, "file.", 5) == 0 || strncmp (k, "backing.", 8) == 0)
        k = k[0] == 'f' ? "file" : "backing";
      qmp_error_set (err, "GenericError", "Cannot change the option '%s'",
                     k);
      return false;
    }
  }
  return true;
}

static json_t *
cmd_blockdev_reopen (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "options", "any", true }, { NULL },
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
  pthread_mutex_lock (&block_lock);
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
      qmp_error_set (err, "GenericError", "Invalid parameter type for "
                     "'options[%zu]', expected: object", idx);
      opts_free (opts);
      goto out;
    }
    good = opts && visit_blockdev (item, path, opts, "", err);
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
      set_error_from (err, e);
      while (done-- > 0)
        strata_reopen (nodes[done], !rw[done], 0, NULL);
      goto out;
    }
  }
  ok = true;
out:
  for (size_t i = 0; nodes && i < n; i++)
    node_unref (nodes[i]);
  pthread_mutex_unlock (&block_lock);
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
    set_error_from (err, e);
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
    { "device", "string", false }, { "node-name", "string", false },
    { "snapshot-file", "string", true },
    { "snapshot-node-name", "string", false },
    { "format", "string", false }, { "mode", "string", false }, { NULL },
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
  pthread_mutex_lock (&block_lock);
  if (!(node = find_node (device, name, err)) || !check_not_backing (node, err)
      || !check_no_job (node, err))
    goto out;
  if (snap && (taken = graph_lookup (snap))) {
    node_unref (taken);
    qmp_error_set (err, "GenericError", "New overlay node-name already in "
                   "use");
    goto out;
  }
  if (strcmp (format, "qcow2") != 0) {
    qmp_error_set (err, "GenericError", "strata cannot make a '%s' overlay: "
                   "only qcow2 images have a backing file", format);
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
                     size, fn, node->drv->name) < 0) {
      o = NULL;
      qmp_error_set (err, "GenericError", "out of memory");
      goto out;
    }
    if (!strata_create (file, "qcow2", o, 0, &e)) {
      set_error_from (err, e);
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
    set_error_from (err, e);
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
  pthread_mutex_unlock (&block_lock);
  free (fn);
  free (o);
  return ok ? json_object () : NULL;
}

static json_t *
cmd_blockdev_snapshot (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "node", "string", true }, { "overlay", "string", true }, { NULL },
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
  pthread_mutex_lock (&block_lock);
  if (!(node = find_node (name, name, err))
      || !(overlay = find_node (oname, oname, err))
      || !check_not_backing (node, err) || !check_no_job (node, err))
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
  if (overlay->drv != &qcow2_driver) {
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
    set_error_from (err, se);
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
  pthread_mutex_unlock (&block_lock);
  return ok ? json_object () : NULL;
}

const struct qmp_command qmp_block_commands[] = {
  { "blockdev-add", cmd_blockdev_add },
  { "blockdev-del", cmd_blockdev_del },
  { "query-named-block-nodes", cmd_query_named_block_nodes },
  { "blockdev-reopen", cmd_blockdev_reopen },
  { "x-blockdev-reopen", cmd_blockdev_reopen },
  { "blockdev-snapshot-sync", cmd_blockdev_snapshot_sync },
  { "blockdev-snapshot", cmd_blockdev_snapshot },
  { NULL, NULL },
};

void
qmp_block_shutdown (void)
{
  pthread_mutex_lock (&block_lock);
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
  pthread_mutex_unlock (&block_lock);
}
