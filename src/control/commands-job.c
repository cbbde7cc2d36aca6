/* strata: the job commands: the block-job-* and job-* verbs,
 * query-block-jobs and query-jobs, with QEMU 7.2's arguments, error
 * classes and texts; and the jobs' events as QMP events.  The jobs
 * themselves (src/jobs/) know no JSON: they fail with strata_error (all
 * GenericError in QMP's terms), describe themselves in struct job_info
 * and announce events through the handler registered here.
 *
 * block-job-* name the job as "device" (or "id" for finalize and dismiss)
 * and fail with DeviceNotActive "Block job 'x' not found"; job-* fail with
 * GenericError "Job not found", as QEMU's do.
 */
#include <stdbool.h>

#include "control/qmp.h"
#include "jobs/job.h"

static const struct qmp_arg device_spec[] = {
  { "device", "string", true },
  { NULL },
};
static const struct qmp_arg id_spec[] = {
  { "id", "string", true },
  { NULL },
};

/* The job named by KEY in ARGS, job lock held; NULL with ERR set. */
static struct job *
find_job_locked (json_t *args, const char *key, bool block,
                 struct qmp_error *err)
{
  const char *id = json_string_value (json_object_get (args, key));
  struct job *job = job_find_job_locked (id);

  if (!job) {
    if (block)
      qmp_error_set (err, "DeviceNotActive", "Block job '%s' not found", id);
    else
      qmp_error_set (err, "GenericError", "Job not found");
  }
  return job;
}

typedef bool (*verb_fn) (struct job *job, strata_error **errp);

static json_t *
verb (json_t *args, struct qmp_error *err, const struct qmp_arg *spec,
      const char *key, bool block, verb_fn fn)
{
  struct job *job;
  strata_error *e = NULL;
  bool ok = false;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  job_lock ();
  if ((job = find_job_locked (args, key, block, err)) && !(ok = fn (job, &e)))
    qmp_error_from (err, e);
  job_unlock ();
  return ok ? json_object () : NULL;
}

static bool
cancel_verb (struct job *job, strata_error **errp)
{
  return job_cancel_job_locked (job, false, errp);
}

#define BLOCK_VERB(name, spec, key, fn)                                       \
  static json_t *name (json_t *args, struct qmp_error *err)                   \
  {                                                                           \
    return verb (args, err, spec, key, true, fn);                             \
  }
#define JOB_VERB(name, fn)                                                    \
  static json_t *name (json_t *args, struct qmp_error *err)                   \
  {                                                                           \
    return verb (args, err, id_spec, "id", false, fn);                        \
  }

BLOCK_VERB (cmd_block_job_pause, device_spec, "device",
            job_user_pause_job_locked)
BLOCK_VERB (cmd_block_job_resume, device_spec, "device",
            job_user_resume_job_locked)
BLOCK_VERB (cmd_block_job_complete, device_spec, "device",
            job_complete_job_locked)
BLOCK_VERB (cmd_block_job_finalize, id_spec, "id", job_finalize_job_locked)
BLOCK_VERB (cmd_block_job_dismiss, id_spec, "id", job_dismiss_job_locked)
JOB_VERB (cmd_job_pause, job_user_pause_job_locked)
JOB_VERB (cmd_job_resume, job_user_resume_job_locked)
JOB_VERB (cmd_job_cancel, cancel_verb)
JOB_VERB (cmd_job_complete, job_complete_job_locked)
JOB_VERB (cmd_job_finalize, job_finalize_job_locked)
JOB_VERB (cmd_job_dismiss, job_dismiss_job_locked)

static json_t *
cmd_block_job_cancel (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "device", "string", true },
    { "force", "bool", false },
    { NULL },
  };
  struct job *job;
  strata_error *e = NULL;
  bool ok = false, force;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  force = json_is_true (json_object_get (args, "force"));
  job_lock ();
  if (!(job = find_job_locked (args, "device", true, err)))
    goto out;
  if (job->user_paused && !force) {
    qmp_error_set (err, "GenericError",
                   "The block job for device '%s' is currently paused",
                   job->id);
    goto out;
  }
  if (!(ok = job_cancel_job_locked (job, force, &e)))
    qmp_error_from (err, e);
out:
  job_unlock ();
  return ok ? json_object () : NULL;
}

static json_t *
cmd_block_job_set_speed (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "device", "string", true },
    { "speed", "int", true },
    { NULL },
  };
  json_int_t speed;
  struct job *job;
  strata_error *e = NULL;
  bool ok = false;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  speed = json_integer_value (json_object_get (args, "speed"));
  job_lock ();
  if ((job = find_job_locked (args, "device", true, err))
      && !(ok = job_set_speed_job_locked (job, speed, &e)))
    qmp_error_from (err, e);
  job_unlock ();
  return ok ? json_object () : NULL;
}

/* BlockJobInfo, in QAPI's member order. */
static void
append_block_info (struct job *job, void *list)
{
  struct job_info i;
  json_t *o = json_object ();

  job_get_info_job_locked (job, &i);
  json_object_set_new (o, "type", json_string (i.type));
  json_object_set_new (o, "device", json_string (i.id));
  json_object_set_new (o, "len", json_integer (i.len));
  json_object_set_new (o, "offset", json_integer (i.offset));
  json_object_set_new (o, "busy", json_boolean (i.busy));
  json_object_set_new (o, "paused", json_boolean (i.paused));
  json_object_set_new (o, "speed", json_integer (i.speed));
  json_object_set_new (o, "io-status", json_string (i.iostatus));
  json_object_set_new (o, "ready", json_boolean (i.status == JOB_READY
                                                 || i.status == JOB_STANDBY));
  json_object_set_new (o, "status", json_string (job_status_name (i.status)));
  json_object_set_new (o, "auto-finalize", json_boolean (i.auto_finalize));
  json_object_set_new (o, "auto-dismiss", json_boolean (i.auto_dismiss));
  if (i.error)
    json_object_set_new (o, "error", json_string (i.error));
  json_array_append_new (list, o);
}

/* JobInfo, in QAPI's member order. */
static void
append_info (struct job *job, void *list)
{
  struct job_info i;
  json_t *o = json_object ();

  job_get_info_job_locked (job, &i);
  json_object_set_new (o, "id", json_string (i.id));
  json_object_set_new (o, "type", json_string (i.type));
  json_object_set_new (o, "status", json_string (job_status_name (i.status)));
  json_object_set_new (o, "current-progress", json_integer (i.offset));
  json_object_set_new (o, "total-progress", json_integer (i.len));
  if (i.error)
    json_object_set_new (o, "error", json_string (i.error));
  json_array_append_new (list, o);
}

static json_t *
query (json_t *args, struct qmp_error *err,
       void (*fn) (struct job *job, void *list))
{
  static const struct qmp_arg spec[] = { { NULL } };
  json_t *list;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  list = json_array ();
  job_lock ();
  job_foreach_job_locked (fn, list);
  job_unlock ();
  return list;
}

static json_t *
cmd_query_block_jobs (json_t *args, struct qmp_error *err)
{
  return query (args, err, append_block_info);
}

static json_t *
cmd_query_jobs (json_t *args, struct qmp_error *err)
{
  return query (args, err, append_info);
}

const struct qmp_command qmp_job_commands[] = {
  { "block-job-set-speed", cmd_block_job_set_speed },
  { "block-job-pause", cmd_block_job_pause },
  { "block-job-resume", cmd_block_job_resume },
  { "block-job-cancel", cmd_block_job_cancel },
  { "block-job-complete", cmd_block_job_complete },
  { "block-job-finalize", cmd_block_job_finalize },
  { "block-job-dismiss", cmd_block_job_dismiss },
  { "job-pause", cmd_job_pause },
  { "job-resume", cmd_job_resume },
  { "job-cancel", cmd_job_cancel },
  { "job-complete", cmd_job_complete },
  { "job-finalize", cmd_job_finalize },
  { "job-dismiss", cmd_job_dismiss },
  { "query-block-jobs", cmd_query_block_jobs },
  { "query-jobs", cmd_query_jobs },
  { NULL, NULL },
};

/* ---- events ---- */

/* BLOCK_JOB_COMPLETED's, BLOCK_JOB_CANCELLED's and BLOCK_JOB_READY's
 * members. */
static json_t *
completion_data (const struct job_event *ev)
{
  json_t *d
      = json_pack ("{s:s, s:s, s:I, s:I, s:I}", "type", ev->type, "device",
                   ev->id, "len", (json_int_t)ev->len, "offset",
                   (json_int_t)ev->offset, "speed", (json_int_t)ev->speed);

  if (d && ev->error)
    json_object_set_new (d, "error", json_string (ev->error));
  return d;
}

static void
job_event (const struct job_event *ev)
{
  static const char *const action_names[] = {
    [JOB_ON_ERROR_REPORT] = "report",
    [JOB_ON_ERROR_IGNORE] = "ignore",
    [JOB_ON_ERROR_ENOSPC] = "enospc",
    [JOB_ON_ERROR_STOP] = "stop",
  };

  switch (ev->kind) {
  case JOB_EVENT_STATUS_CHANGE:
    qmp_event_emit ("JOB_STATUS_CHANGE",
                    json_pack ("{s:s, s:s}", "id", ev->id, "status",
                               job_status_name (ev->status)));
    break;
  case JOB_EVENT_PENDING:
    qmp_event_emit ("BLOCK_JOB_PENDING",
                    json_pack ("{s:s, s:s}", "type", ev->type, "id", ev->id));
    break;
  case JOB_EVENT_ERROR:
    qmp_event_emit ("BLOCK_JOB_ERROR",
                    json_pack ("{s:s, s:s, s:s}", "device", ev->id,
                               "operation", ev->is_read ? "read" : "write",
                               "action", action_names[ev->action]));
    break;
  case JOB_EVENT_COMPLETED:
    qmp_event_emit ("BLOCK_JOB_COMPLETED", completion_data (ev));
    break;
  case JOB_EVENT_CANCELLED:
    qmp_event_emit ("BLOCK_JOB_CANCELLED", completion_data (ev));
    break;
  case JOB_EVENT_READY:
    qmp_event_emit ("BLOCK_JOB_READY", completion_data (ev));
    break;
  }
}

void
qmp_job_events_init (void)
{
  job_set_event_handler (job_event);
}

void
qmp_job_shutdown (void)
{
  job_shutdown ();
}
