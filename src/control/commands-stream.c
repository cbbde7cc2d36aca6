/* strata: the stream commands, block-stream and x-block-pull-range, with
 * QEMU 7.2's arguments, checks and texts.
 *
 * The QMP arguments are parsed and checked here, once, in QEMU's order:
 * the argument types, on-error, the base/base-node/bottom conflicts, the
 * device, the base in its chain, the nodes free of other jobs, a
 * backing-file that has a base to name.  The job then gets them as a
 * struct stream_params (src/jobs/stream.h) and knows no JSON.
 *
 * x-block-pull-range is no job: it copies one range up into the device
 * (node_copy_up, the primitive the stream job uses) before it replies.
 *
 * Locks: the graph lock around everything that looks up nodes or walks
 * chains, the job lock inside it for the busy check and the start.
 */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "block/chain.h"
#include "block/graph.h"
#include "control/qmp.h"
#include "jobs/job.h"
#include "jobs/stream.h"
#include "util/cleanup.h"

#define PULL_RANGE_MAX (16 * 1024 * 1024)

/* ---- argument checks ---- */

/* block-stream's base, base-node and bottom exclude each other; QEMU
 * checks this first, before it even looks the device up. */
static bool
check_conflicts (json_t *args, struct qmp_error *err)
{
  /* The pairs that exclude each other, in QEMU's order of checking. */
  static const char *const conflicts[][2] = {
    { "base", "base-node" },
    { "base", "bottom" },
    { "bottom", "base-node" },
  };

  for (size_t i = 0; i < sizeof conflicts / sizeof *conflicts; i++)
    if (qmp_str_arg (args, conflicts[i][0]) && qmp_str_arg (args, conflicts[i][1])) {
      qmp_error_set (err, "GenericError",
                     "'%s' and '%s' cannot be specified at the same time",
                     conflicts[i][0], conflicts[i][1]);
      return false;
    }
  return true;
}

/* BASE for block-stream's base, base-node and bottom arguments; NULL with
 * *BASEP NULL means the whole chain. */
static bool
find_base (json_t *args, strata_node *top, strata_node **basep,
           struct qmp_error *err)
{
  const char *device = qmp_str_arg (args, "device");
  const char *base = qmp_str_arg (args, "base");
  const char *base_node = qmp_str_arg (args, "base-node");
  const char *bottom = qmp_str_arg (args, "bottom");
  strata_node *n;

  *basep = NULL;
  if (base) {
    /* By its file name, or the name as the layer above would record it
     * (relative to that layer's directory), as QEMU matches it. */
    if (!(*basep = chain_find_file (
              top, base, CHAIN_MATCH_PATH | CHAIN_MATCH_RELATIVE, NULL))) {
      qmp_error_set (err, "GenericError",
                     "Can't find '%s' in the backing chain", base);
      return false;
    }
    node_ref (*basep);
  }
  if (base_node) {
    if (!(n = qmp_lookup_node ("", base_node, err)))
      return false;
    if (!chain_contains (top, n)) {
      qmp_error_set (err, "GenericError",
                     "Node '%s' is not a backing image of '%s'", base_node,
                     device);
      node_unref (n);
      return false;
    }
    *basep = n;
  }
  if (bottom) {
    if (!(n = qmp_lookup_node ("", bottom, err)))
      return false;
    if (n->drv->is_filter) {
      qmp_error_set (err, "GenericError",
                     "Node '%s' is a filter, use a non-filter node as "
                     "'bottom'",
                     bottom);
      node_unref (n);
      return false;
    }
    if (n != top && !chain_contains (top, n)) {
      qmp_error_set (err, "GenericError",
                     "Node '%s' is not in a chain starting from '%s'", bottom,
                     device);
      node_unref (n);
      return false;
    }
    if ((*basep = n->backing))
      node_ref (*basep);
    node_unref (n);
  }
  return true;
}

/* The arguments as the job takes them. */
static void
stream_params_from (json_t *args, strata_node *dev, strata_node *base,
                    enum job_on_error on_error, struct stream_params *p)
{
  json_t *speed = json_object_get (args, "speed");
  json_t *af = json_object_get (args, "auto-finalize");
  json_t *ad = json_object_get (args, "auto-dismiss");
  json_t *floor = json_object_get (args, "x-guest-floor-speed");
  const char *id = qmp_str_arg (args, "job-id");

  *p = (struct stream_params){
    /* No job-id: QEMU takes the device's BlockBackend name, which a node
     * made by blockdev-add does not have, and so refuses the empty ID. */
    .job_id = id ? id : "",
    .device = dev,
    .base = base,
    .backing_file = qmp_str_arg (args, "backing-file"),
    .filter_node_name = qmp_str_arg (args, "filter-node-name"),
    .speed = speed ? json_integer_value (speed) : 0,
    .on_error = on_error,
    .auto_finalize = af ? json_is_true (af) : true,
    .auto_dismiss = ad ? json_is_true (ad) : true,
    .yield_to_guest
    = json_is_true (json_object_get (args, "x-yield-to-guest")),
    .floor_speed = floor ? json_integer_value (floor) : 0,
  };
}

/* Start the job, job lock held. */
static bool
start_job_locked (json_t *args, strata_node *dev, strata_node *base,
                  enum job_on_error on_error, struct qmp_error *err)
{
  struct stream_params p;
  strata_error *e = NULL;

  stream_params_from (args, dev, base, on_error, &p);
  if (!stream_start_job_locked (&p, &e)) {
    qmp_error_from (err, e);
    return false;
  }
  return true;
}

/* ---- block-stream ---- */

static json_t *
cmd_block_stream (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "job-id", "string", false },
    { "device", "string", true },
    { "base", "string", false },
    { "base-node", "string", false },
    { "backing-file", "string", false },
    { "bottom", "string", false },
    { "speed", "int", false },
    { "on-error", "string", false },
    { "filter-node-name", "string", false },
    { "auto-finalize", "bool", false },
    { "auto-dismiss", "bool", false },
    { "x-yield-to-guest", "bool", false },
    { "x-guest-floor-speed", "int", false },
    { NULL },
  };
  const char *device;
  strata_node *top = NULL, *base = NULL;
  enum job_on_error on_error;
  json_t *floor;
  bool ok = false;

  if (!qmp_args_check (args, spec, err)
      || !qmp_parse_on_error (args, &on_error, err)
      || !check_conflicts (args, err))
    return NULL;
  floor = json_object_get (args, "x-guest-floor-speed");
  if (floor && json_integer_value (floor) < 0) {
    qmp_error_set (err, "GenericError",
                   "Parameter 'x-guest-floor-speed' expects a non-negative "
                   "value");
    return NULL;
  }
  device = qmp_str_arg (args, "device");
  graph_lock ();
  if (!(top = qmp_lookup_node (device, device, err))
      || !find_base (args, top, &base, err))
    goto out;
  job_lock ();
  if (!qmp_check_not_busy_job_locked (top, base, err))
    ;
  /* QEMU asks whether base or base-node was given: with bottom, too,
   * there is no base to name. */
  else if (!qmp_str_arg (args, "base") && !qmp_str_arg (args, "base-node")
           && qmp_str_arg (args, "backing-file"))
    qmp_error_set (err, "GenericError",
                   "backing file specified, but streaming the entire chain");
  else
    ok = start_job_locked (args, top, base, on_error, err);
  job_unlock ();
out:
  if (top)
    node_unref (top);
  if (base)
    node_unref (base);
  graph_unlock ();
  if (ok && qmp_str_arg (args, "job-id"))
    job_settle (qmp_str_arg (args, "job-id"));
  return ok ? json_object () : NULL;
}

/* ---- x-block-pull-range ---- */

static json_t *
cmd_pull_range (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "device", "string", true },
    { "offset", "int", true },
    { "length", "int", true },
    { "base-node", "string", false },
    { NULL },
  };
  const char *device;
  strata_node *top = NULL, *base = NULL;
  json_int_t offset, length;
  int64_t size;
  uint64_t copied = 0;
  json_t *ret = NULL;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  device = qmp_str_arg (args, "device");
  offset = json_integer_value (json_object_get (args, "offset"));
  length = json_integer_value (json_object_get (args, "length"));
  graph_lock ();
  if (!(top = qmp_lookup_node (device, device, err))
      || !find_base (args, top, &base, err))
    goto out;
  if ((size = node_length (top)) < 0) {
    qmp_error_set (err, "GenericError", "%s: cannot get the image length",
                   top->filename);
    goto out;
  }
  if (length > PULL_RANGE_MAX) {
    qmp_error_set (err, "GenericError",
                   "Parameter 'length' must be at most %d (use "
                   "block-stream for more)",
                   PULL_RANGE_MAX);
    goto out;
  }
  if (offset < 0 || length < 0 || offset > size || length > size - offset) {
    qmp_error_set (err, "GenericError",
                   "Range offset %lld length %lld is outside the image "
                   "(%lld bytes)",
                   (long long)offset, (long long)length, (long long)size);
    goto out;
  }
  if (length > 0 && top->backing && top->backing != base
      && node_copy_up (top, base, offset, length, &copied) < 0) {
    qmp_error_set (err, "GenericError", "%s: copy-up failed: %s",
                   top->node_name, strata_last_error_message ());
    goto out;
  }
  ret = json_pack ("{s:I}", "copied", (json_int_t)copied);
out:
  if (top)
    node_unref (top);
  if (base)
    node_unref (base);
  graph_unlock ();
  return ret;
}

const struct qmp_command qmp_stream_commands[] = {
  { "block-stream", cmd_block_stream },
  { "x-block-pull-range", cmd_pull_range },
  { NULL, NULL },
};
