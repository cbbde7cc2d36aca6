/* strata: block-commit, with QEMU 7.2's arguments, checks and texts.
 *
 * The checks run in QEMU's order (qmp_block_commit): the argument types
 * and on-error; the device, which must be a root node (DeviceNotFound when
 * no node has the name: libvirt probes for the command with it; a node a
 * job holds is no root, as in QEMU); top or top-node (the device itself by
 * default); base or base-node (the bottom of the chain by default); the layers
 * from top to base free of jobs; top not base; then the active case (top is
 * the device's active layer) or the intermediate one, whose overlay must
 * be free too.  The job gets its nodes as struct commit_params
 * (src/jobs/commit.h) and knows no JSON.
 *
 * Active commit (top is the device's active layer) has no overlay: the
 * job copies down, goes READY, keeps base in sync with guest writes and
 * pivots the device's users onto base at job-complete (src/jobs/commit.c).
 *
 * Locks: the graph lock around the lookups and walks, the job lock inside
 * it for the busy checks and the start.
 */
#include <string.h>

#include "block/chain.h"
#include "block/graph.h"
#include "control/qmp.h"
#include "jobs/commit.h"
#include "jobs/job.h"

/* One node: is it (or, FROM_ON, any layer from it to TO inclusive) free of
 * other jobs?  QEMU's op blockers answer "Node 'x' is busy: ...". */
static bool
free_of_jobs_job_locked (strata_node *from, strata_node *to,
                         struct qmp_error *err)
{
  return qmp_check_not_busy_job_locked (from, to ? chain_next (to) : NULL,
                                        err);
}

/* TOP from top or top-node: the device by default.  Borrowed. */
static bool
find_top (json_t *args, strata_node *dev, strata_node **topp,
          struct qmp_error *err)
{
  const char *top = qmp_str_arg (args, "top");
  const char *top_node = qmp_str_arg (args, "top-node");
  strata_node *n;

  *topp = dev;
  if (top && top_node) {
    qmp_error_set (err, "GenericError",
                   "'top-node' and 'top' are mutually exclusive");
    return false;
  }
  if (top_node) {
    if (!(n = qmp_lookup_node ("", top_node, err)))
      return false;
    node_unref (n); /* the graph lock keeps it */
    if (n != dev && !chain_contains (dev, n)) {
      qmp_error_set (err, "GenericError",
                     "'%s' is not in this backing file chain", top_node);
      return false;
    }
    *topp = n;
  }
  else if (top && strcmp (dev->filename, top) != 0) {
    *topp = chain_find_file (dev, top, CHAIN_MATCH_PATH | CHAIN_MATCH_RELATIVE,
                             NULL);
  }
  if (!*topp) {
    qmp_error_set (err, "GenericError", "Top image file %s not found", top);
    return false;
  }
  return true;
}

/* BASE from base or base-node: the bottom of TOP's chain by default (TOP
 * itself when nothing is below it, refused later).  Borrowed. */
static bool
find_base (json_t *args, strata_node *top, strata_node **basep,
           struct qmp_error *err)
{
  const char *base = qmp_str_arg (args, "base");
  const char *base_node = qmp_str_arg (args, "base-node");
  strata_node *n;

  if (base && base_node) {
    qmp_error_set (err, "GenericError",
                   "'base-node' and 'base' are mutually exclusive");
    return false;
  }
  if (base_node) {
    if (!(n = qmp_lookup_node ("", base_node, err)))
      return false;
    node_unref (n);
    if (n != top && !chain_contains (top, n)) {
      qmp_error_set (err, "GenericError",
                     "'%s' is not in this backing file chain", base_node);
      return false;
    }
    *basep = n;
    return true;
  }
  if (base) {
    *basep = chain_find_file (top, base,
                              CHAIN_MATCH_PATH | CHAIN_MATCH_RELATIVE, NULL);
    if (!*basep) {
      qmp_error_set (err, "GenericError",
                     "Can't find '%s' in the backing chain", base);
      return false;
    }
    return true;
  }
  *basep = node_skip_filters (top);
  for (strata_node *l = chain_backing (top); l; l = chain_backing (l))
    *basep = l;
  return true;
}

static bool
start_job_locked (json_t *args, strata_node *dev, strata_node *top,
                  strata_node *base, strata_node *overlay,
                  enum job_on_error on_error, struct qmp_error *err)
{
  json_t *speed = json_object_get (args, "speed");
  json_t *af = json_object_get (args, "auto-finalize");
  json_t *ad = json_object_get (args, "auto-dismiss");
  const char *id = qmp_str_arg (args, "job-id");
  struct commit_params p = {
    /* No job-id: QEMU takes the device's BlockBackend name, which a node
     * made by blockdev-add does not have, and so refuses the empty ID. */
    .job_id = id ? id : "",
    .device = dev,
    .top = top,
    .base = base,
    .overlay = overlay,
    .active = overlay == NULL,
    .backing_file = qmp_str_arg (args, "backing-file"),
    .speed = speed ? json_integer_value (speed) : 0,
    .on_error = on_error,
    .auto_finalize = af ? json_is_true (af) : true,
    .auto_dismiss = ad ? json_is_true (ad) : true,
    .filter_node_name = qmp_str_arg (args, "filter-node-name"),
  };
  strata_error *e = NULL;

  if (!commit_start_job_locked (&p, &e)) {
    qmp_error_from (err, e);
    return false;
  }
  return true;
}

static json_t *
cmd_block_commit (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "job-id", "string", false },
    { "device", "string", true },
    { "base-node", "string", false },
    { "base", "string", false },
    { "top-node", "string", false },
    { "top", "string", false },
    { "backing-file", "string", false },
    { "speed", "int", false },
    { "on-error", "string", false },
    { "filter-node-name", "string", false },
    { "auto-finalize", "bool", false },
    { "auto-dismiss", "bool", false },
    { NULL },
  };
  strata_node *dev = NULL, *top, *base, *overlay;
  enum job_on_error on_error;
  bool ok = false;

  if (!qmp_args_check (args, spec, err)
      || !qmp_parse_on_error (args, &on_error, err))
    return NULL;
  graph_lock ();
  job_lock ();
  if (!(dev
        = qmp_root_node_job_locked (qmp_str_arg (args, "device"), true, err)))
    ;
  else if (!find_top (args, dev, &top, err)
           || !find_base (args, top, &base, err)
           || !free_of_jobs_job_locked (top, base, err))
    ;
  else if (node_skip_filters (top) == node_skip_filters (base))
    qmp_error_set (err, "GenericError", "cannot commit an image into itself");
  else if (node_skip_filters (top) == node_skip_filters (dev)) {
    if (qmp_str_arg (args, "backing-file"))
      qmp_error_set (err, "GenericError",
                     "'backing-file' specified, but 'top' is the active "
                     "layer");
    else
      ok = start_job_locked (args, dev, node_skip_filters (top),
                             node_skip_filters (base), NULL, on_error, err);
  }
  else if (!(overlay = chain_above (dev, node_skip_filters (top))))
    qmp_error_set (err, "GenericError",
                   "Could not find overlay image for %s:", top->filename);
  else if (free_of_jobs_job_locked (overlay, overlay, err))
    ok = start_job_locked (args, dev, node_skip_filters (top),
                           node_skip_filters (base), overlay, on_error, err);
  job_unlock ();
  if (dev)
    node_unref (dev);
  graph_unlock ();
  if (ok && qmp_str_arg (args, "job-id"))
    job_settle (qmp_str_arg (args, "job-id"));
  return ok ? json_object () : NULL;
}

const struct qmp_command qmp_commit_commands[] = {
  { "block-commit", cmd_block_commit },
  { NULL, NULL },
};
