/* strata: the job commands: block-stream and x-block-pull-range
 * (stream.c), the block-job-* and job-* verbs, query-block-jobs and
 * query-jobs, with QEMU 7.2's arguments, error classes and texts.
 *
 * block-job-* name the job as "device" (or "id" for finalize and dismiss)
 * and fail with DeviceNotActive "Block job 'x' not found"; job-* fail with
 * GenericError "Job not found", as QEMU's do.
 */
#include <stdbool.h>

#include "control/job.h"
#include "control/qmp.h"

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
find_locked (json_t *args, const char *key, bool block, struct qmp_error *err)
{
  const char *id = json_string_value (json_object_get (args, key));
  struct job *job = job_find_locked (id);

  if (!job) {
    if (block)
      qmp_error_set (err, "DeviceNotActive", "Block job '%s' not found", id);
    else
      qmp_error_set (err, "GenericError", "Job not found");
  }
  return job;
}

typedef bool (*verb_fn) (struct job *job, struct qmp_error *err);

static json_t *
verb (json_t *args, struct qmp_error *err, const struct qmp_arg *spec,
      const char *key, bool block, verb_fn fn)
{
  struct job *job;
  bool ok = false;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  job_lock ();
  if ((job = find_locked (args, key, block, err)))
    ok = fn (job, err);
  job_unlock ();
  return ok ? json_object () : NULL;
}

static bool
cancel_verb (struct job *job, struct qmp_error *err)
{
  return job_cancel_locked (job, false, err);
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

BLOCK_VERB (cmd_block_job_pause, device_spec, "device", job_user_pause_locked)
BLOCK_VERB (cmd_block_job_resume, device_spec, "device",
            job_user_resume_locked)
BLOCK_VERB (cmd_block_job_complete, device_spec, "device", job_complete_locked)
BLOCK_VERB (cmd_block_job_finalize, id_spec, "id", job_finalize_locked)
BLOCK_VERB (cmd_block_job_dismiss, id_spec, "id", job_dismiss_locked)
JOB_VERB (cmd_job_pause, job_user_pause_locked)
JOB_VERB (cmd_job_resume, job_user_resume_locked)
JOB_VERB (cmd_job_cancel, cancel_verb)
JOB_VERB (cmd_job_complete, job_complete_locked)
JOB_VERB (cmd_job_finalize, job_finalize_locked)
JOB_VERB (cmd_job_dismiss, job_dismiss_locked)

static json_t *
cmd_block_job_cancel (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "device", "string", true },
    { "force", "bool", false },
    { NULL },
  };
  struct job *job;
  bool ok = false, force;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  force = json_is_true (json_object_get (args, "force"));
  job_lock ();
  if (!(job = find_locked (args, "device", true, err)))
    goto out;
  if (job->user_paused && !force) {
    qmp_error_set (err, "GenericError",
                   "The block job for device '%s' is currently paused",
                   job->id);
    goto out;
  }
  ok = job_cancel_locked (job, force, err);
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
  struct job *job;
  bool ok = false;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  job_lock ();
  if ((job = find_locked (args, "device", true, err)))
    ok = job_set_speed_locked (
        job, json_integer_value (json_object_get (args, "speed")), err);
  job_unlock ();
  return ok ? json_object () : NULL;
}

static void
append_block_info (struct job *job, void *list)
{
  json_array_append_new (list, job_block_info_locked (job));
}

static void
append_info (struct job *job, void *list)
{
  json_array_append_new (list, job_info_locked (job));
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
  job_foreach_locked (fn, list);
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
  { "block-stream", stream_cmd_block_stream },
  { "x-block-pull-range", stream_cmd_pull_range },
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

void
qmp_job_shutdown (void)
{
  job_shutdown ();
}
