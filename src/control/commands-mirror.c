/* strata: blockdev-mirror, with QEMU 7.2's arguments, checks and texts.
 *
 * The checks run in QEMU's order (qmp_blockdev_mirror and
 * blockdev_mirror_common, then mirror_start and mirror_start_job): the
 * argument types and enums; the device, a root node; the target; the
 * granularity's range, then that it is a power of two; the target free of
 * jobs and not a backing file; replaces; sync incremental or bitmap;
 * buf-size; the device not the target; then the job (its ID, its speed).
 * sync=top over a device without a backing file is sync=full, as in QEMU.
 * The job is the active commit's engine (src/jobs/commit.c,
 * mirror_start_job_locked) and knows no JSON.
 *
 * Not built yet and refused in one line: replaces naming a node other
 * than the device.  granularity and buf-size are checked as QEMU checks them;
 * the job copies in 64 KiB pieces and 1 MiB runs whatever they say.
 */
#include <string.h>

#include "block/chain.h"
#include "block/graph.h"
#include "control/qmp.h"
#include "jobs/commit.h"
#include "jobs/job.h"

/* ENUM's value in ARGS as an index of NAMES, else QAPI's error. */
static bool
enum_arg (json_t *args, const char *key, const char *const *names, size_t n,
          int def, int *out, struct qmp_error *err)
{
  const char *v = qmp_str_arg (args, key);

  *out = def;
  if (!v)
    return true;
  for (size_t i = 0; i < n; i++)
    if (strcmp (v, names[i]) == 0) {
      *out = i;
      return true;
    }
  qmp_error_set (err, "GenericError",
                 "Parameter '%s' does not accept value '%s'", key, v);
  return false;
}

static const char *const sync_names[]
    = { "top", "full", "none", "incremental", "bitmap" };
enum { SYNC_TOP, SYNC_FULL, SYNC_NONE, SYNC_INCREMENTAL, SYNC_BITMAP };
static const char *const on_error_names[]
    = { "report", "ignore", "enospc", "stop", "auto" };
static const char *const copy_mode_names[]
    = { "background", "write-blocking" };

#define N(a) (sizeof (a) / sizeof *(a))

/* QAPI's BlockdevOnError as the job's ("auto" is report here, as for a
 * block job in QEMU). */
static enum job_on_error
on_error_of (int i)
{
  static const enum job_on_error map[]
      = { JOB_ON_ERROR_REPORT, JOB_ON_ERROR_IGNORE, JOB_ON_ERROR_ENOSPC,
          JOB_ON_ERROR_STOP, JOB_ON_ERROR_REPORT };
  return map[i];
}

static json_t *
cmd_blockdev_mirror (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "job-id", "string", false },
    { "device", "string", true },
    { "target", "string", true },
    { "replaces", "string", false },
    { "sync", "string", true },
    { "speed", "int", false },
    { "granularity", "int", false },
    { "buf-size", "int", false },
    { "on-source-error", "string", false },
    { "on-target-error", "string", false },
    { "filter-node-name", "string", false },
    { "copy-mode", "string", false },
    { "auto-finalize", "bool", false },
    { "auto-dismiss", "bool", false },
    { NULL },
  };
  strata_node *dev = NULL, *target = NULL, *rep = NULL;
  int sync, src_err, tgt_err, copy_mode;
  json_t *gran_j = json_object_get (args, "granularity");
  json_t *buf_j = json_object_get (args, "buf-size");
  json_t *speed = json_object_get (args, "speed");
  json_t *af = json_object_get (args, "auto-finalize");
  json_t *ad = json_object_get (args, "auto-dismiss");
  const char *replaces = qmp_str_arg (args, "replaces");
  json_int_t gran = gran_j ? json_integer_value (gran_j) : 0;
  bool ok = false;

  if (!qmp_args_check (args, spec, err)
      || !enum_arg (args, "sync", sync_names, N (sync_names), 0, &sync, err)
      || !enum_arg (args, "on-source-error", on_error_names,
                    N (on_error_names), 0, &src_err, err)
      || !enum_arg (args, "on-target-error", on_error_names,
                    N (on_error_names), 0, &tgt_err, err)
      || !enum_arg (args, "copy-mode", copy_mode_names, N (copy_mode_names), 0,
                    &copy_mode, err))
    return NULL;
  graph_lock ();
  job_lock ();
  if (!(dev
        = qmp_root_node_job_locked (qmp_str_arg (args, "device"), false, err))
      || !(target = qmp_lookup_node (qmp_str_arg (args, "target"),
                                     qmp_str_arg (args, "target"), err)))
    goto out;
  if (gran != 0 && (gran < 512 || gran > 64 * 1024 * 1024)) {
    qmp_error_set (err, "GenericError",
                   "Parameter 'granularity' expects a value in range "
                   "[512B, 64MB]");
    goto out;
  }
  if (gran & (gran - 1)) {
    qmp_error_set (err, "GenericError",
                   "Parameter 'granularity' expects a power of 2");
    goto out;
  }
  if (!qmp_check_not_busy_job_locked (target, chain_next (target), err)
      || !qmp_check_not_backing (target, err))
    goto out;
  if (sync == SYNC_TOP && !chain_backing (dev))
    sync = SYNC_FULL;
  if (replaces) {
    if (!(rep = graph_lookup (replaces))) {
      qmp_error_set (err, "GenericError",
                     "Failed to find node with node-name='%s'", replaces);
      goto out;
    }
    if (node_skip_filters (rep) != node_skip_filters (dev)) {
      qmp_error_set (err, "GenericError",
                     "replaces='%s' other than the device is not supported",
                     replaces);
      goto out;
    }
  }
  if (sync == SYNC_INCREMENTAL || sync == SYNC_BITMAP) {
    qmp_error_set (err, "GenericError", "Sync mode '%s' not supported",
                   sync_names[sync]);
    goto out;
  }
  if (buf_j && json_integer_value (buf_j) < 0) {
    qmp_error_set (err, "GenericError", "Invalid parameter 'buf-size'");
    goto out;
  }
  if (node_skip_filters (dev) == node_skip_filters (target)) {
    qmp_error_set (err, "GenericError", "Can't mirror node into itself");
    goto out;
  }
  {
    const char *id = qmp_str_arg (args, "job-id");
    struct mirror_params p = {
      .job_id = id ? id : "",
      .device = dev,
      .source = node_skip_filters (dev),
      .target = node_skip_filters (target),
      .sync = sync == SYNC_TOP    ? MIRROR_SYNC_TOP
              : sync == SYNC_NONE ? MIRROR_SYNC_NONE
                                  : MIRROR_SYNC_FULL,
      .speed = speed ? json_integer_value (speed) : 0,
      .on_source_error = on_error_of (src_err),
      .on_target_error = on_error_of (tgt_err),
      .write_blocking = copy_mode == 1,
      .auto_finalize = af ? json_is_true (af) : true,
      .auto_dismiss = ad ? json_is_true (ad) : true,
    };
    strata_error *e = NULL;

    if (!(ok = mirror_start_job_locked (&p, &e)))
      qmp_error_from (err, e);
  }
out:
  job_unlock ();
  if (rep)
    node_unref (rep);
  if (target)
    node_unref (target);
  if (dev)
    node_unref (dev);
  graph_unlock ();
  if (ok && qmp_str_arg (args, "job-id"))
    job_settle (qmp_str_arg (args, "job-id"));
  return ok ? json_object () : NULL;
}

const struct qmp_command qmp_mirror_commands[] = {
  { "blockdev-mirror", cmd_blockdev_mirror },
  { NULL, NULL },
};
