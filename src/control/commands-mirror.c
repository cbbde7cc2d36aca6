/* strata: blockdev-mirror and drive-mirror, with QEMU 7.2's arguments,
 * checks and texts.
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
 * drive-mirror (qmp_drive_mirror) first finds the device, then makes the
 * target file (mode=absolute-paths: in the device's format unless told,
 * the device's size, backed by the device's backing layer for sync=top or
 * by the device for sync=none) or takes the one there (mode=existing),
 * opens it without its backing, and goes on as blockdev-mirror from the
 * granularity check (mirror_common_job_locked).  The backing edge comes
 * at the pivot, as QEMU sets it then.  Unlike QEMU, a refusal after the
 * file was made removes it (if it did not exist before).
 *
 * Not built yet and refused in one line: replaces naming a node other
 * than the device.  granularity and buf-size are checked as QEMU checks them;
 * the job copies in 64 KiB pieces and 1 MiB runs whatever they say.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block/chain.h"
#include "block/graph.h"
#include "control/qmp.h"
#include "jobs/commit.h"
#include "jobs/job.h"
#include "util/cleanup.h"

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

/* The arguments blockdev-mirror and drive-mirror share, parsed. */
struct mirror_args {
  int sync, src_err, tgt_err, copy_mode;
};

static bool
mirror_args_parse (json_t *args, struct mirror_args *m, struct qmp_error *err)
{
  return enum_arg (args, "sync", sync_names, N (sync_names), 0, &m->sync, err)
         && enum_arg (args, "on-source-error", on_error_names,
                      N (on_error_names), 0, &m->src_err, err)
         && enum_arg (args, "on-target-error", on_error_names,
                      N (on_error_names), 0, &m->tgt_err, err)
         && enum_arg (args, "copy-mode", copy_mode_names, N (copy_mode_names),
                      0, &m->copy_mode, err);
}

/* QEMU's blockdev_mirror_common and mirror_start, from the granularity
 * on: the checks in its order, then the job over DEV and TARGET (the
 * caller keeps its references).  TARGET_BACKING (drive-mirror's
 * absolute-paths mode, else NULL) becomes the target's backing at a
 * pivot.  Graph lock and job lock held. */
static bool
mirror_common_job_locked (json_t *args, const struct mirror_args *m,
                          strata_node *dev, strata_node *target,
                          strata_node *target_backing, struct qmp_error *err)
{
  json_t *gran_j = json_object_get (args, "granularity");
  json_t *buf_j = json_object_get (args, "buf-size");
  json_t *speed = json_object_get (args, "speed");
  json_t *af = json_object_get (args, "auto-finalize");
  json_t *ad = json_object_get (args, "auto-dismiss");
  const char *replaces = qmp_str_arg (args, "replaces");
  json_int_t gran = gran_j ? json_integer_value (gran_j) : 0;
  int sync = m->sync;
  strata_node *rep;
  bool same;

  if (gran != 0 && (gran < 512 || gran > 64 * 1024 * 1024)) {
    qmp_error_set (err, "GenericError",
                   "Parameter 'granularity' expects a value in range "
                   "[512B, 64MB]");
    return false;
  }
  if (gran & (gran - 1)) {
    qmp_error_set (err, "GenericError",
                   "Parameter 'granularity' expects a power of 2");
    return false;
  }
  if (!qmp_check_not_busy_job_locked (target, chain_next (target), err)
      || !qmp_check_not_backing (target, err))
    return false;
  if (sync == SYNC_TOP && !chain_backing (dev))
    sync = SYNC_FULL;
  if (replaces) {
    if (!(rep = graph_lookup (replaces))) {
      qmp_error_set (err, "GenericError",
                     "Failed to find node with node-name='%s'", replaces);
      return false;
    }
    same = node_skip_filters (rep) == node_skip_filters (dev);
    node_unref (rep);
    if (!same) {
      qmp_error_set (err, "GenericError",
                     "replaces='%s' other than the device is not supported",
                     replaces);
      return false;
    }
  }
  if (sync == SYNC_INCREMENTAL || sync == SYNC_BITMAP) {
    qmp_error_set (err, "GenericError", "Sync mode '%s' not supported",
                   sync_names[sync]);
    return false;
  }
  if (buf_j && json_integer_value (buf_j) < 0) {
    qmp_error_set (err, "GenericError", "Invalid parameter 'buf-size'");
    return false;
  }
  if (node_skip_filters (dev) == node_skip_filters (target)) {
    qmp_error_set (err, "GenericError", "Can't mirror node into itself");
    return false;
  }
  const char *id = qmp_str_arg (args, "job-id");
  struct mirror_params p = {
    .job_id = id ? id : "",
    .device = dev,
    .source = node_skip_filters (dev),
    .target = node_skip_filters (target),
    .target_backing = target_backing,
    .sync = sync == SYNC_TOP    ? MIRROR_SYNC_TOP
            : sync == SYNC_NONE ? MIRROR_SYNC_NONE
                                : MIRROR_SYNC_FULL,
    .speed = speed ? json_integer_value (speed) : 0,
    .on_source_error = on_error_of (m->src_err),
    .on_target_error = on_error_of (m->tgt_err),
    .write_blocking = m->copy_mode == 1,
    .buf_size = buf_j ? (uint64_t)json_integer_value (buf_j) : 0,
    .auto_finalize = af ? json_is_true (af) : true,
    .auto_dismiss = ad ? json_is_true (ad) : true,
    .filter_node_name = qmp_str_arg (args, "filter-node-name"),
  };
  strata_error *e = NULL;

  if (!mirror_start_job_locked (&p, &e)) {
    qmp_error_from (err, e);
    return false;
  }
  return true;
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
  strata_node *dev = NULL, *target = NULL;
  struct mirror_args m;
  bool ok = false;

  if (!qmp_args_check (args, spec, err) || !mirror_args_parse (args, &m, err))
    return NULL;
  graph_lock ();
  job_lock ();
  if ((dev
       = qmp_root_node_job_locked (qmp_str_arg (args, "device"), false, err))
      && (target = qmp_lookup_node (qmp_str_arg (args, "target"),
                                    qmp_str_arg (args, "target"), err)))
    ok = mirror_common_job_locked (args, &m, dev, target, NULL, err);
  job_unlock ();
  if (target)
    node_unref (target);
  if (dev)
    node_unref (dev);
  graph_unlock ();
  if (ok && qmp_str_arg (args, "job-id"))
    job_settle (qmp_str_arg (args, "job-id"));
  return ok ? json_object () : NULL;
}

/* ---- drive-mirror ---- */

static const char *const mode_names[] = { "existing", "absolute-paths" };
enum { MODE_EXISTING, MODE_ABSOLUTE };

/* QEMU's text for a lock another user holds (creating or opening): strata's
 * names the holder, QEMU's reply stops at the lock ('Failed to get "write"
 * lock'). */
static void
error_from_create (struct qmp_error *err, strata_error *e)
{
  const char *msg = e ? strata_error_message (e) : "unknown error";
  const char *cut = strstr (msg, " lock: ");

  if (strncmp (msg, "Failed to get ", 14) == 0 && cut)
    qmp_error_set (err, "GenericError", "%.*s", (int)(cut + 5 - msg), msg);
  else
    qmp_error_set (err, "GenericError", "%s", msg);
  strata_error_free (e);
}

/* Create drive-mirror's target FILENAME in FORMAT, SIZE bytes, with
 * BACKING's file as its backing file (NULL: none), as bdrv_img_create
 * does.  *CREATED says the file did not exist before (so a refusal may
 * remove it).  Graph lock held. */
static bool
create_target (const char *filename, const char *format, strata_node *backing,
               int64_t size, bool *created, struct qmp_error *err)
{
  const struct strata_driver *drv = driver_find (format);
  CLEANUP_FREE char *opts = NULL;
  strata_error *e = NULL;
  struct stat st;
  FILE *f;
  size_t len;

  if (!drv) {
    qmp_error_set (err, "GenericError", "Unknown file format '%s'", format);
    return false;
  }
  if (!(f = open_memstream (&opts, &len))) {
    qmp_error_set (err, "GenericError", "out of memory");
    return false;
  }
  fprintf (f, "size=%" PRId64, size);
  if (backing) {
    bool takes_backing = false;

    for (const char *const *o = drv->create_options; o && *o; o++)
      takes_backing |= strcmp (*o, "backing_file") == 0;
    if (!takes_backing) {
      fclose (f);
      qmp_error_set (err, "GenericError",
                     "Backing file not supported for file format '%s'",
                     format);
      return false;
    }
    /* opts_parse's escape: a comma in a value is doubled. */
    fputs (",backing_file=", f);
    for (const char *c = backing->filename; *c; c++)
      fputs (*c == ',' ? ",," : (char[]){ *c, 0 }, f);
    fprintf (f, ",backing_fmt=%s", backing->drv->name);
  }
  if (fclose (f) != 0) {
    qmp_error_set (err, "GenericError", "out of memory");
    return false;
  }
  *created = stat (filename, &st) != 0;
  if (!strata_create (filename, format, opts, 0, &e)) {
    error_from_create (err, e);
    return false;
  }
  return true;
}

/* Open drive-mirror's target as QEMU does: its format (probed when none
 * was given), node-name if given, read-write, no backing (the job copies
 * what the guest sees; the backing comes at the pivot).  A new reference,
 * or NULL.  Graph lock held. */
static strata_node *
open_target (const char *filename, const char *format, const char *node_name,
             struct qmp_error *err)
{
  strata_opts *opts = opts_new ();
  strata_error *e = NULL;
  strata_node *t = NULL;

  if (opts && (!format || opts_set (opts, "driver", format))
      && (!node_name || opts_set (opts, "node-name", node_name))
      && opts_set (opts, "file.driver", "file")
      && opts_set (opts, "file.filename", filename)
      && (format && strcmp (format, "raw") == 0
              ? true
              : opts_set (opts, "backing", "")))
    t = node_open (opts, STRATA_OPEN_RDWR, &e);
  else
    error_set (&e, ENOMEM, "out of memory");
  if (!t)
    error_from_create (err, e);
  opts_free (opts);
  return t;
}

/* mode=existing: the layer of DEV's chain (or DEV) that TARGET's header
 * names as its backing file, which becomes its backing at the pivot, as
 * QEMU opens the recorded one then.  *FOUND false: TARGET names a file
 * outside the chain, which strata does not open. */
static strata_node *
existing_backing (strata_node *dev, strata_node *target, bool *found)
{
  const char *name = chain_recorded_name (target);
  CLEANUP_FREE char *full = NULL;
  strata_node *src = node_skip_filters (dev), *l;

  *found = true;
  if (!name)
    return NULL;
  if (!(full = chain_resolve_name (target->filename, name)))
    return *found = false, NULL;
  if (src->filename && strcmp (src->filename, full) == 0)
    return src;
  l = chain_find_file (src, full, CHAIN_MATCH_PATH, NULL);
  *found = l != NULL;
  return l;
}

static json_t *
cmd_drive_mirror (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "job-id", "string", false },
    { "device", "string", true },
    { "target", "string", true },
    { "format", "string", false },
    { "node-name", "string", false },
    { "replaces", "string", false },
    { "sync", "string", true },
    { "mode", "string", false },
    { "speed", "int", false },
    { "granularity", "int", false },
    { "buf-size", "int", false },
    { "on-source-error", "string", false },
    { "on-target-error", "string", false },
    { "unmap", "bool", false },
    { "copy-mode", "string", false },
    { "auto-finalize", "bool", false },
    { "auto-dismiss", "bool", false },
    { NULL },
  };
  const char *target = qmp_str_arg (args, "target");
  const char *format = qmp_str_arg (args, "format");
  const char *node_name = qmp_str_arg (args, "node-name");
  strata_node *dev = NULL, *tnode = NULL, *backing, *pivot_backing = NULL;
  struct mirror_args m;
  int mode;
  int64_t size;
  bool created = false, ok = false, found;

  if (!qmp_args_check (args, spec, err)
      || !enum_arg (args, "sync", sync_names, N (sync_names), 0, &m.sync, err)
      || !enum_arg (args, "mode", mode_names, N (mode_names), MODE_ABSOLUTE,
                    &mode, err)
      || !mirror_args_parse (args, &m, err))
    return NULL;
  graph_lock ();
  job_lock ();
  dev = qmp_root_node_job_locked (qmp_str_arg (args, "device"), false, err);
  job_unlock ();
  if (!dev)
    goto out;
  if (!format && mode != MODE_EXISTING)
    format = node_skip_filters (dev)->drv->name;
  backing = chain_backing (node_skip_filters (dev));
  if (!backing && m.sync == SYNC_TOP)
    m.sync = SYNC_FULL;
  if (m.sync == SYNC_NONE)
    backing = node_skip_filters (dev);
  if ((size = node_length (dev)) < 0) {
    qmp_error_set (err, "GenericError", "bdrv_getlength failed: %s",
                   strerror (-size));
    goto out;
  }
  if (qmp_str_arg (args, "replaces") && !node_name) {
    qmp_error_set (err, "GenericError",
                   "a node-name must be provided when replacing a named node "
                   "of the graph");
    goto out;
  }
  if (m.sync == SYNC_FULL || !backing)
    backing = NULL;
  if (mode != MODE_EXISTING
      && !create_target (target, format, backing, size, &created, err))
    goto out;
  if (!(tnode = open_target (target, format, node_name, err)))
    goto out;
  pivot_backing = mode == MODE_EXISTING ? existing_backing (dev, tnode, &found)
                                        : backing;
  if (mode == MODE_EXISTING && !found) {
    qmp_error_set (err, "GenericError",
                   "'%s' has a backing file outside the chain of '%s', "
                   "which strata does not open",
                   target, dev->node_name);
    goto out;
  }
  job_lock ();
  ok = mirror_common_job_locked (args, &m, dev, tnode, pivot_backing, err);
  job_unlock ();
out:
  /* The job holds the target; a refusal closes it and removes the file
   * this command made (QEMU leaves it). */
  if (tnode)
    node_unref (tnode);
  if (!ok && created)
    unlink (target);
  if (dev)
    node_unref (dev);
  graph_unlock ();
  if (ok && qmp_str_arg (args, "job-id"))
    job_settle (qmp_str_arg (args, "job-id"));
  return ok ? json_object () : NULL;
}

const struct qmp_command qmp_mirror_commands[] = {
  { "blockdev-mirror", cmd_blockdev_mirror },
  { "drive-mirror", cmd_drive_mirror },
  { NULL, NULL },
};
