/* strata: the block-job framework; the model is described in job.h.
 *
 * The tables below are QEMU's job state machine as its QAPI schema
 * documents it (qapi/job.json): which status may follow which, and in
 * which states each verb is accepted (tests/unit/test-job-tables.c checks
 * every pair).
 *
 * Locks, in the order they are taken:
 *
 *   graph lock    (block/graph.h) taken by callers that start a job and by
 *                 a driver's prepare/abort, never under the job lock.
 *   job lock      jobs_mutex: the job list, every job field job.h marks
 *                 "guarded", live_threads.  job->cond and threads_cond
 *                 are waited on under it; both use CLOCK_MONOTONIC, the
 *                 clock of clock_now_ns(), so a timed wait is not
 *                 stretched or cut short when the wall clock is set.
 *                 Never held across I/O or a driver callback other than
 *                 complete.  The event handler runs under it, and may take
 *                 only leaf locks (stratad's event queue).
 *   registry lock (block/graph.c) taken under the job lock when a job
 *                 registers itself as a node's user.
 *
 * Errors ignored in a row (on-error=ignore, a target whose server died):
 * the first JOB_RETRY_FREE are retried at once, as QEMU does; after
 * that job_yield waits before the next try, from JOB_RETRY_FIRST_NS
 * doubling to JOB_RETRY_MAX_NS, so a dead target costs a retry and a
 * BLOCK_JOB_ERROR a second, not a spinning thread and an event flood
 * (qemu-storage-daemon 7.2 stops answering QMP in that state).  Any data
 * moved (job_account) ends the streak; a verb still wakes the job, and
 * cancel and pause act at once.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "block/graph.h"
#include "jobs/job.h"
#include "util/checked.h"
#include "util/cleanup.h"
#include "util/clock.h"

static pthread_mutex_t jobs_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t threads_cond; /* see threads_cond_init */
static pthread_once_t threads_cond_once = PTHREAD_ONCE_INIT;
static struct job *jobs; /* newest first, as QEMU lists them */
static int live_threads;

static const char *const status_names[JOB_STATUS_MAX] = {
  "created", "running", "paused",   "ready",     "standby",
  "waiting", "pending", "aborting", "concluded", "null",
};

static const char *const verb_names[JOB_VERB_MAX] = {
  "cancel", "pause", "resume", "set-speed", "complete", "finalize", "dismiss",
};

/* transition[from][to]; columns in enum order: C R P Y S W D X E N. */
static const bool transition[JOB_STATUS_MAX][JOB_STATUS_MAX] = {
  [JOB_CREATED] = { 0, 1, 0, 0, 0, 0, 0, 1, 0, 1 },
  [JOB_RUNNING] = { 0, 0, 1, 1, 0, 1, 0, 1, 0, 0 },
  [JOB_PAUSED] = { 0, 1, 0, 0, 0, 0, 0, 0, 0, 0 },
  [JOB_READY] = { 0, 0, 0, 0, 1, 1, 0, 1, 0, 0 },
  [JOB_STANDBY] = { 0, 0, 0, 1, 0, 0, 0, 0, 0, 0 },
  [JOB_WAITING] = { 0, 0, 0, 0, 0, 0, 1, 1, 0, 0 },
  [JOB_PENDING] = { 0, 0, 0, 0, 0, 0, 0, 1, 1, 0 },
  [JOB_ABORTING] = { 0, 0, 0, 0, 0, 0, 0, 1, 1, 0 },
  [JOB_CONCLUDED] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 1 },
  [JOB_NULL] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 },
};

/* verb_allowed[verb][status]. */
static const bool verb_allowed[JOB_VERB_MAX][JOB_STATUS_MAX] = {
  [JOB_VERB_CANCEL] = { 0, 1, 1, 1, 1, 1, 1, 0, 0, 0 },
  [JOB_VERB_PAUSE] = { 0, 1, 1, 1, 1, 1, 0, 0, 0, 0 },
  [JOB_VERB_RESUME] = { 0, 1, 1, 1, 1, 1, 0, 0, 0, 0 },
  [JOB_VERB_SET_SPEED] = { 0, 1, 1, 1, 1, 1, 0, 0, 0, 0 },
  [JOB_VERB_COMPLETE] = { 0, 0, 0, 1, 0, 0, 0, 0, 0, 0 },
  [JOB_VERB_FINALIZE] = { 0, 0, 0, 0, 0, 0, 1, 0, 0, 0 },
  [JOB_VERB_DISMISS] = { 0, 0, 0, 0, 0, 0, 0, 0, 1, 0 },
};

/* A condition variable whose timed waits use CLOCK_MONOTONIC. */
static void
cond_init_monotonic (pthread_cond_t *cond)
{
  pthread_condattr_t attr;

  pthread_condattr_init (&attr);
  pthread_condattr_setclock (&attr, CLOCK_MONOTONIC);
  pthread_cond_init (cond, &attr);
  pthread_condattr_destroy (&attr);
}

static void
threads_cond_init (void)
{
  cond_init_monotonic (&threads_cond);
}

const char *
job_status_name (enum job_status s)
{
  return s < JOB_STATUS_MAX ? status_names[s] : "invalid";
}

const char *
job_verb_name (enum job_verb v)
{
  return v < JOB_VERB_MAX ? verb_names[v] : "invalid";
}

bool
job_transition_allowed (enum job_status from, enum job_status to)
{
  return from < JOB_STATUS_MAX && to < JOB_STATUS_MAX && transition[from][to];
}

bool
job_verb_allowed (enum job_verb verb, enum job_status s)
{
  return verb < JOB_VERB_MAX && s < JOB_STATUS_MAX && verb_allowed[verb][s];
}

/* threads_cond is made on first use: here, or in job_settle() and
 * job_shutdown(), the other ways in that wait on it.  A job's own calls
 * (LOCK_GUARD) come after its creation under job_lock(). */
void
job_lock (void)
{
  pthread_once (&threads_cond_once, threads_cond_init);
  pthread_mutex_lock (&jobs_mutex);
}

void
job_unlock (void)
{
  pthread_mutex_unlock (&jobs_mutex);
}

/* ---- state ---- */

static job_event_fn event_handler;

void
job_set_event_handler (job_event_fn fn)
{
  LOCK_GUARD (&jobs_mutex);
  event_handler = fn;
}

/* Announce EV (its kind and the members it carries, the rest zero). */
static void
emit_job_locked (struct job_event ev)
{
  if (event_handler)
    event_handler (&ev);
}

static void
status_event_job_locked (const char *id, enum job_status s)
{
  emit_job_locked ((struct job_event){
      .kind = JOB_EVENT_STATUS_CHANGE, .id = id, .status = s });
}

static void
set_status_job_locked (struct job *job, enum job_status s)
{
  if (!transition[job->status][s])
    fprintf (stderr, "stratad: job '%s': unexpected transition %s -> %s\n",
             job->id, status_names[job->status], status_names[s]);
  job->status = s;
  status_event_job_locked (job->id, s);
}

static bool
apply_verb_job_locked (struct job *job, enum job_verb verb,
                       strata_error **errp)
{
  if (verb_allowed[verb][job->status])
    return true;
  error_set (errp, EINVAL,
             "Job '%s' in state '%s' cannot accept command verb '%s'", job->id,
             status_names[job->status], verb_names[verb]);
  return false;
}

static void
wake_job_locked (struct job *job)
{
  job->kick = true;
  pthread_cond_broadcast (&job->cond);
}

void
job_wake_job_locked (struct job *job)
{
  wake_job_locked (job);
}

/* ---- settling ----
 *
 * QEMU's verbs enter the job's coroutine, which runs until its next
 * yield before the reply goes out: a cancel of a sleeping or paused job
 * has sent BLOCK_JOB_CANCELLED by then, a job-finalize BLOCK_JOB_COMPLETED,
 * a block-stream with nothing to copy every event up to null.  Here the
 * verb waits for the thread to reach its next such point (ACK). */

#define SETTLE_MAX_NS 2000000000ull /* never wait longer for a slow thread */
#define JOB_RETRY_FREE 3
#define JOB_RETRY_FIRST_NS 10000000ull /* 10 ms */
#define JOB_RETRY_MAX_NS 1000000000ull /* 1 s */

/* The thread's side: it reached a yield point. */
static void
ack_job_locked (struct job *job)
{
  job->ack = job->gen;
  pthread_cond_broadcast (&threads_cond);
}

static void
settle_job_locked (struct job *job)
{
  CLEANUP_FREE char *id = strdup (job->id);
  unsigned gen = job->gen;
  struct timespec ts = clock_timespec (clock_now_ns () + SETTLE_MAX_NS);

  if (!id)
    return;
  /* Only the control thread creates jobs, so a job found by this id is
   * the same job until it is freed. */
  while ((job = job_find_job_locked (id)) && job->ack < gen)
    if (pthread_cond_timedwait (&threads_cond, &jobs_mutex, &ts) != 0)
      break;
}

/* Ask the thread to act now and wait until it did. */
static void
kick_and_settle_job_locked (struct job *job)
{
  job->gen++;
  wake_job_locked (job);
  settle_job_locked (job);
}

void
job_settle (const char *id)
{
  struct job *job;

  pthread_once (&threads_cond_once, threads_cond_init);
  LOCK_GUARD (&jobs_mutex);
  if ((job = job_find_job_locked (id)))
    settle_job_locked (job);
}

/* Paused -> running, at once when the verb that ends the pause runs (so
 * a query right after block-job-resume says "running", as QEMU's does),
 * or when the job thread wakes. */
static void
unpause_job_locked (struct job *job)
{
  if ((job->status != JOB_PAUSED && job->status != JOB_STANDBY)
      || (job->pause_count > 0 && !job->cancelled))
    return;
  job->busy = true;
  set_status_job_locked (job, job->ready ? JOB_READY : JOB_RUNNING);
}

/* The paused state: standby for a job that is ready, as in QEMU. */
static enum job_status
paused_status (const struct job *job)
{
  return job->ready ? JOB_STANDBY : JOB_PAUSED;
}

/* Undo a user pause (block-job-pause, or on-error=stop): the caller
 * wakes the job. */
static void
end_user_pause_job_locked (struct job *job)
{
  job->user_paused = false;
  job->pause_count--;
  job->iostatus = "ok";
}

bool
job_id_wellformed (const char *id)
{
  if (!((*id >= 'a' && *id <= 'z') || (*id >= 'A' && *id <= 'Z')))
    return false;
  for (const char *p = id + 1; *p; p++)
    if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')
          || (*p >= '0' && *p <= '9') || *p == '-' || *p == '.' || *p == '_'))
      return false;
  return true;
}

struct job *
job_find_job_locked (const char *id)
{
  for (struct job *j = jobs; j; j = j->next)
    if (strcmp (j->id, id) == 0)
      return j;
  return NULL;
}

struct job *
job_holding_job_locked (strata_node *node)
{
  for (struct job *j = jobs; j; j = j->next)
    for (int i = 0; i < j->nnodes; i++)
      if (j->nodes[i] == node)
        return j;
  return NULL;
}

void
job_foreach_job_locked (void (*fn) (struct job *job, void *opaque),
                        void *opaque)
{
  for (struct job *j = jobs; j; j = j->next)
    fn (j, opaque);
}

/* ---- life ---- */

static void
unlink_job_locked (struct job *job)
{
  for (struct job **p = &jobs; *p; p = &(*p)->next)
    if (*p == job) {
      *p = job->next;
      return;
    }
}

/* Drop the nodes (references and graph users); no lock held. */
static void
release_nodes (struct job *job)
{
  job_lock ();
  job->nbackends = 0;
  job_unlock ();
  for (int i = job->nnodes - 1; i >= 0; i--) {
    graph_remove_user (job->nodes[i], job->user);
    node_unref (job->nodes[i]);
  }
  job->nnodes = 0;
}

static void
job_free (struct job *job)
{
  pthread_cond_destroy (&job->cond);
  free (job->id);
  free (job->user);
  free (job->error);
  free (job);
}

/* The end of a concluded job (or one never started): null, out of the
 * list, freed. */
static void
remove_job_locked (struct job *job)
{
  set_status_job_locked (job, JOB_NULL);
  unlink_job_locked (job);
  job_free (job);
}

struct job *
job_create_job_locked (const char *id, const struct job_driver *drv,
                       int64_t speed, bool auto_finalize, bool auto_dismiss,
                       enum job_on_error on_error, strata_error **errp)
{
  struct job *job;

  if (!job_id_wellformed (id)) {
    error_set (errp, EINVAL, "Invalid job ID '%s'", id);
    return NULL;
  }
  if (job_find_job_locked (id)) {
    error_set (errp, EINVAL, "Job ID '%s' already in use", id);
    return NULL;
  }
  if (!(job = calloc (1, sizeof *job)) || !(job->id = strdup (id))
      || asprintf (&job->user, "block device is in use by block job: %s",
                   drv->type)
             < 0) {
    if (job)
      free (job->id);
    free (job);
    error_set (errp, ENOMEM, "out of memory");
    return NULL;
  }
  cond_init_monotonic (&job->cond);
  job->drv = drv;
  job->auto_finalize = auto_finalize;
  job->auto_dismiss = auto_dismiss;
  job->on_error = on_error;
  job->iostatus = "ok";
  job->status = JOB_CREATED;
  job->gen = 1; /* job_settle after the start waits for the first ack */
  ratelimit_init (&job->rl, 0, clock_now_ns ());
  /* Listed before the speed check, as QEMU does: a bad speed shows as
   * created -> null.  At the head: query-jobs lists the newest first. */
  job->next = jobs;
  jobs = job;
  status_event_job_locked (id, JOB_CREATED);
  if (speed < 0) {
    error_set (errp, EINVAL, "Parameter 'speed' expects a non-negative value");
    job_discard_job_locked (job);
    return NULL;
  }
  job->rl.speed = speed;
  return job;
}

bool
job_add_node (struct job *job, strata_node *node)
{
  if (job->nnodes == JOB_MAX_NODES || !graph_add_user (node, job->user))
    return false;
  node_ref (node);
  job->nodes[job->nnodes++] = node;
  return true;
}

void
job_drop_node (struct job *job, strata_node *node)
{
  bool held = false;

  job_lock ();
  for (int i = 0; i < job->nnodes && !held; i++)
    if (job->nodes[i] == node) {
      memmove (&job->nodes[i], &job->nodes[i + 1],
               (job->nnodes - i - 1) * sizeof *job->nodes);
      job->nnodes--;
      held = true;
    }
  if (job->filter == node)
    job->filter = NULL;
  job_unlock ();
  if (held) {
    graph_remove_user (node, job->user);
    node_unref (node);
  }
}

bool
job_is_filter (strata_node *node, bool *implicit)
{
  LOCK_GUARD (&jobs_mutex);
  for (struct job *j = jobs; j; j = j->next)
    if (j->filter && j->filter == node) {
      *implicit = node->node_name[0] == '#';
      return true;
    }
  return false;
}

bool
job_add_backend (struct job *job, strata_node *node)
{
  if (job->nbackends == JOB_MAX_BACKENDS || !job_add_node (job, node))
    return false;
  job->backends[job->nbackends++] = node;
  return true;
}

bool
job_is_backend (strata_node *node)
{
  LOCK_GUARD (&jobs_mutex);
  for (struct job *j = jobs; j; j = j->next)
    for (int i = 0; i < j->nbackends; i++)
      if (j->backends[i] == node)
        return true;
  return false;
}

void
job_discard_job_locked (struct job *job)
{
  set_status_job_locked (job, JOB_NULL);
  unlink_job_locked (job);
  job_unlock ();
  release_nodes (job);
  if (job->drv->clean)
    job->drv->clean (job);
  job_lock ();
  job_free (job);
}

/* ---- ending ---- */

/* BLOCK_JOB_COMPLETED (with the error when WITH_ERROR) or
 * BLOCK_JOB_CANCELLED. */
static void
completion_event_job_locked (struct job *job, enum job_event_kind kind,
                             bool with_error)
{
  emit_job_locked ((struct job_event){
      .kind = kind,
      .id = job->id,
      .type = job->drv->type,
      .len = job->len,
      .offset = job->offset,
      .speed = job->rl.speed,
      .error = with_error ? job->error : NULL,
  });
}

static void
fail_job_locked (struct job *job, int ret)
{
  job->ret = ret;
  if (!job->error)
    job->error = strdup (strerror (-ret));
}

/* Success: waiting, pending, (wait for job-finalize), prepare.  Returns
 * false when the job must abort instead. */
static bool
finish_job_locked (struct job *job)
{
  int r;

  set_status_job_locked (job, JOB_WAITING);
  set_status_job_locked (job, JOB_PENDING);
  if (!job->auto_finalize) {
    emit_job_locked ((struct job_event){
        .kind = JOB_EVENT_PENDING, .id = job->id, .type = job->drv->type });
    while (!job->finalize_requested && !job->force_cancel) {
      ack_job_locked (job);
      pthread_cond_wait (&job->cond, &jobs_mutex);
    }
    if (job->force_cancel) {
      fail_job_locked (job, -ECANCELED);
      return false;
    }
  }
  if (!job->drv->prepare)
    return true;
  job_unlock ();
  r = job->drv->prepare (job);
  job_lock ();
  if (r < 0) {
    fail_job_locked (job, r);
    return false;
  }
  return true;
}

static void
conclude (struct job *job, int ret)
{
  bool ok;

  job_lock ();
  /* A soft cancel of a ready job ends it as a success (QEMU's mirror). */
  if (ret == 0 && job->cancelled && job->force_cancel)
    ret = -ECANCELED;
  if (ret < 0)
    fail_job_locked (job, ret);
  job->busy = false;
  ok = ret == 0 && finish_job_locked (job);
  if (!ok)
    set_status_job_locked (job, JOB_ABORTING);
  job_unlock ();

  if (!ok && job->drv->abort)
    job->drv->abort (job);
  if (job->drv->clean)
    job->drv->clean (job);
  /* Before the completion event, so that a client reacting to it finds
   * the nodes free. */
  release_nodes (job);

  job_lock ();
  if (!ok && job->cancelled)
    completion_event_job_locked (job, JOB_EVENT_CANCELLED, false);
  else
    completion_event_job_locked (job, JOB_EVENT_COMPLETED, !ok);
  set_status_job_locked (job, JOB_CONCLUDED);
  ack_job_locked (job);
  if (job->auto_dismiss)
    remove_job_locked (job);
  live_threads--;
  pthread_cond_broadcast (&threads_cond);
  job_unlock ();
}

static void *
job_thread (void *arg)
{
  struct job *job = arg;

  conclude (job, job->drv->run (job));
  return NULL;
}

bool
job_start_job_locked (struct job *job, strata_error **errp)
{
  pthread_t t;
  pthread_attr_t attr;
  int r;

  set_status_job_locked (job, JOB_RUNNING);
  job->busy = true;
  pthread_attr_init (&attr);
  pthread_attr_setdetachstate (&attr, PTHREAD_CREATE_DETACHED);
  r = pthread_create (&t, &attr, job_thread, job);
  pthread_attr_destroy (&attr);
  if (r != 0) {
    error_set (errp, EINVAL, "cannot start job thread: %s", strerror (r));
    job->status = JOB_CREATED;
    job_discard_job_locked (job);
    return false;
  }
  live_threads++;
  return true;
}

/* ---- the job thread's side ---- */

static void
wait_until_job_locked (struct job *job, uint64_t deadline_ns)
{
  /* job->cond waits on CLOCK_MONOTONIC, clock_now_ns()'s clock. */
  struct timespec ts = clock_timespec (deadline_ns);

  while (!job->kick
         && pthread_cond_timedwait (&job->cond, &jobs_mutex, &ts) == 0)
    ;
}

bool
job_yield (struct job *job)
{
  LOCK_GUARD (&jobs_mutex);
  for (;;) {
    uint64_t now, d;

    if (job->cancelled)
      return false;
    if (job->pause_count > 0) {
      /* Paused by the verb already when we slept; paused again when a
       * resume and a new pause both came while we waited. */
      if (job->status != paused_status (job))
        set_status_job_locked (job, paused_status (job));
      job->busy = false;
      ack_job_locked (job);
      pthread_cond_wait (&job->cond, &jobs_mutex);
      if (job->pause_count > 0 && !job->cancelled)
        continue;
      unpause_job_locked (job);
      job->busy = true;
      /* The rate-limit delay still owed is slept off, as QEMU's job does
       * after a pause; ratelimit_account() bounds the burst a long pause
       * could give. */
      continue;
    }
    now = clock_now_ns ();
    ack_job_locked (job);
    d = ratelimit_delay (&job->rl, now);
    if (job->retry_after_ns > now)
      d = MAX (d, job->retry_after_ns - now);
    if (d == 0)
      return true;
    job->kick = false;
    job->busy = false;
    wait_until_job_locked (job, now + d);
    job->busy = true;
  }
}

bool
job_sleep_ns (struct job *job, uint64_t ns)
{
  uint64_t deadline = clock_now_ns () + ns;

  {
    LOCK_GUARD (&jobs_mutex);
    if (job->cancelled)
      return false;
    job->kick = false;
    job->busy = false;
    ack_job_locked (job);
    wait_until_job_locked (job, deadline);
    job->busy = true;
  }
  return job_yield (job);
}

void
job_account (struct job *job, uint64_t bytes, uint64_t start)
{
  LOCK_GUARD (&jobs_mutex);
  ratelimit_account (&job->rl, bytes, start);
  job->ignored_streak = 0;
  job->retry_after_ns = 0;
}

void
job_set_progress (struct job *job, uint64_t offset, uint64_t len)
{
  LOCK_GUARD (&jobs_mutex);
  job->offset = offset;
  job->len = len;
}

bool
job_is_cancelled (struct job *job)
{
  LOCK_GUARD (&jobs_mutex);
  return job->cancelled;
}

bool
job_stop_wanted (struct job *job)
{
  LOCK_GUARD (&jobs_mutex);
  return job->pause_count > 0 || job->cancelled;
}

void
job_set_error (struct job *job, const char *fmt, ...)
{
  va_list ap;
  char *msg;

  va_start (ap, fmt);
  if (vasprintf (&msg, fmt, ap) < 0)
    msg = NULL;
  va_end (ap);
  LOCK_GUARD (&jobs_mutex);
  free (job->error);
  job->error = msg;
}

enum job_on_error
job_io_error (struct job *job, int err, bool is_read)
{
  return job_io_error_policy (job, err, is_read, job->on_error);
}

enum job_on_error
job_io_error_policy (struct job *job, int err, bool is_read,
                     enum job_on_error policy)
{
  enum job_on_error action;
  LOCK_GUARD (&jobs_mutex);

  switch (policy) {
  case JOB_ON_ERROR_ENOSPC:
    action = err == -ENOSPC ? JOB_ON_ERROR_STOP : JOB_ON_ERROR_REPORT;
    break;
  default: action = policy;
  }
  emit_job_locked ((struct job_event){ .kind = JOB_EVENT_ERROR,
                                       .id = job->id,
                                       .type = job->drv->type,
                                       .is_read = is_read,
                                       .action = action });
  if (action == JOB_ON_ERROR_IGNORE
      && ++job->ignored_streak > JOB_RETRY_FREE) {
    unsigned n = MIN (job->ignored_streak - JOB_RETRY_FREE - 1, 16u);

    job->retry_after_ns
        = clock_now_ns () + MIN (JOB_RETRY_FIRST_NS << n, JOB_RETRY_MAX_NS);
  }
  /* Several copies in flight may fail at once: each sends its event, and
   * the first pauses the job, so one resume goes on (as QEMU: a stop
   * pauses only a job not already paused by the user). */
  if (action == JOB_ON_ERROR_STOP) {
    job->iostatus = err == -ENOSPC ? "nospace" : "failed";
    if (!job->user_paused) {
      job->user_paused = true;
      job->pause_count++;
    }
  }
  return action;
}

/* ---- verbs ---- */

bool
job_user_pause_job_locked (struct job *job, strata_error **errp)
{
  if (!apply_verb_job_locked (job, JOB_VERB_PAUSE, errp))
    return false;
  if (job->user_paused) {
    error_set (errp, EINVAL, "Job is already paused");
    return false;
  }
  job->user_paused = true;
  job->pause_count++;
  /* A job asleep between chunks pauses at once, before the reply, as
   * QEMU's coroutine does when the verb enters it. */
  if ((job->status == JOB_RUNNING || job->status == JOB_READY) && !job->busy)
    set_status_job_locked (job, paused_status (job));
  wake_job_locked (job);
  return true;
}

bool
job_user_resume_job_locked (struct job *job, strata_error **errp)
{
  if (!job->user_paused) {
    error_set (errp, EINVAL, "Can't resume a job that was not paused");
    return false;
  }
  if (!apply_verb_job_locked (job, JOB_VERB_RESUME, errp))
    return false;
  end_user_pause_job_locked (job);
  unpause_job_locked (job);
  wake_job_locked (job);
  return true;
}

bool
job_cancel_job_locked (struct job *job, bool force, strata_error **errp)
{
  bool busy = job->busy;

  if (!apply_verb_job_locked (job, JOB_VERB_CANCEL, errp))
    return false;
  if (job->user_paused)
    end_user_pause_job_locked (job);
  /* Only a ready job of a driver that says so is cancelled softly. */
  if (!force
      && !(job->drv->soft_cancel
           && (job->status == JOB_READY || job->status == JOB_STANDBY)))
    force = true;
  job->cancelled = true;
  job->force_cancel |= force;
  unpause_job_locked (job);
  /* A job in I/O goes on until its chunk ends, after the reply, as in
   * QEMU; one that waits ends now. */
  if (busy)
    wake_job_locked (job);
  else
    kick_and_settle_job_locked (job);
  return true;
}

bool
job_complete_job_locked (struct job *job, strata_error **errp)
{
  if (!apply_verb_job_locked (job, JOB_VERB_COMPLETE, errp))
    return false;
  if (job->cancelled || !job->drv->complete) {
    error_set (errp, EINVAL, "The active block job '%s' cannot be completed",
               job->id);
    return false;
  }
  return job->drv->complete (job, errp);
}

bool
job_finalize_job_locked (struct job *job, strata_error **errp)
{
  if (!apply_verb_job_locked (job, JOB_VERB_FINALIZE, errp))
    return false;
  job->finalize_requested = true;
  kick_and_settle_job_locked (job);
  return true;
}

bool
job_dismiss_job_locked (struct job *job, strata_error **errp)
{
  if (!apply_verb_job_locked (job, JOB_VERB_DISMISS, errp))
    return false;
  remove_job_locked (job);
  return true;
}

bool
job_set_speed_job_locked (struct job *job, int64_t speed, strata_error **errp)
{
  if (!apply_verb_job_locked (job, JOB_VERB_SET_SPEED, errp))
    return false;
  if (speed < 0) {
    error_set (errp, EINVAL, "Parameter 'speed' expects a non-negative value");
    return false;
  }
  ratelimit_set_speed (&job->rl, speed, clock_now_ns ());
  wake_job_locked (job);
  return true;
}

/* ---- queries ---- */

void
job_get_info_job_locked (struct job *job, struct job_info *info)
{
  *info = (struct job_info){
    .id = job->id,
    .type = job->drv->type,
    .status = job->status,
    .len = job->len,
    .offset = job->offset,
    .speed = job->rl.speed,
    .busy = job->busy,
    .paused = job->pause_count > 0,
    .auto_finalize = job->auto_finalize,
    .auto_dismiss = job->auto_dismiss,
    .iostatus = job->iostatus,
    .error = job->ret < 0 ? job->error : NULL,
  };
}

/* ---- shutdown ---- */

void
job_shutdown (void)
{
  pthread_once (&threads_cond_once, threads_cond_init);
  LOCK_GUARD (&jobs_mutex);
  for (struct job *j = jobs; j; j = j->next)
    if (j->status != JOB_CONCLUDED) {
      j->cancelled = j->force_cancel = true;
      if (j->user_paused)
        end_user_pause_job_locked (j);
      wake_job_locked (j);
    }
  while (live_threads > 0)
    pthread_cond_wait (&threads_cond, &jobs_mutex);
  while (jobs) {
    struct job *j = jobs;
    jobs = j->next;
    job_free (j);
  }
}

bool
job_make_writable (strata_node *node, bool *done, strata_error **errp)
{
  strata_error *e = NULL;

  *done = false;
  if (!node->read_only)
    return true;
  if (!strata_reopen (node, true, 0, &e)) {
    error_set (errp, EINVAL, "%s",
               e ? strata_error_message (e) : "unknown error");
    strata_error_free (e);
    return false;
  }
  *done = true;
  return true;
}

void
job_set_ready (struct job *job)
{
  LOCK_GUARD (&jobs_mutex);
  if (job->ready)
    return;
  job->ready = true;
  /* Ready means caught up: the job waits for work from here (QEMU's
   * mirror reports busy false while it does). */
  job->busy = false;
  if (job->status == JOB_RUNNING)
    set_status_job_locked (job, JOB_READY);
  emit_job_locked ((struct job_event){ .kind = JOB_EVENT_READY,
                                       .id = job->id,
                                       .type = job->drv->type,
                                       .len = job->len,
                                       .offset = job->offset,
                                       .speed = job->rl.speed });
}

bool
job_is_soft_cancelled (struct job *job)
{
  LOCK_GUARD (&jobs_mutex);
  return job->cancelled && !job->force_cancel;
}
