/* strata: block jobs (src/jobs/job.c), QEMU's job model.
 *
 * States and the transitions QEMU allows between them (qapi/job.json):
 *
 *   created -> running -> waiting -> pending -> concluded -> null
 *                 |  ^                  |            ^
 *                 v  |                  v            |
 *                paused              aborting -------+
 *
 *   (ready and standby belong to jobs that can complete, such as mirror;
 *   any live state may go to aborting.)
 *
 * Each job runs its driver's run() in a thread of its own.  The control
 * thread (QMP commands) and the job threads share the job list under one
 * mutex, the job lock; every state change and every event is made under it,
 * so events leave in the order the states changed.  A job thread never
 * holds the job lock across I/O.  Functions whose name ends in _job_locked
 * expect the caller to hold it.
 *
 * This module knows nothing of QMP: jobs take typed parameters (a driver's
 * own struct, such as struct stream_params), fail with strata_error,
 * report through struct job_info, and announce events through the one
 * handler the control layer registers (job_set_event_handler).  Every
 * error here is what QMP calls a GenericError.
 *
 * Yield points: the driver calls job_yield() between chunks.  There the
 * job pauses while its pause count is above zero (pause nests: a user
 * pause and internal pauses add up; each resume undoes one), notices
 * cancellation, and sleeps for its rate limit.  Every verb that changes
 * what the job should do (pause, resume, cancel, set-speed) wakes it, so a
 * rate-limit sleep never delays them.
 *
 * Ending (on the job thread, as QEMU's main loop does it): success goes
 * waiting -> pending, then (at once with auto-finalize, else after
 * job-finalize) prepare() and commit(), BLOCK_JOB_COMPLETED, concluded;
 * failure or cancellation goes aborting, abort(), BLOCK_JOB_COMPLETED with
 * the error or BLOCK_JOB_CANCELLED, concluded.  With auto-dismiss the job
 * then goes to null and is freed; otherwise it stays concluded until
 * job-dismiss.
 */
#ifndef STRATA_JOBS_JOB_H
#define STRATA_JOBS_JOB_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "block/node.h"
#include "util/error.h"
#include "util/ratelimit.h"

enum job_status {
  JOB_CREATED,
  JOB_RUNNING,
  JOB_PAUSED,
  JOB_READY,
  JOB_STANDBY,
  JOB_WAITING,
  JOB_PENDING,
  JOB_ABORTING,
  JOB_CONCLUDED,
  JOB_NULL,
  JOB_STATUS_MAX
};

enum job_verb {
  JOB_VERB_CANCEL,
  JOB_VERB_PAUSE,
  JOB_VERB_RESUME,
  JOB_VERB_SET_SPEED,
  JOB_VERB_COMPLETE,
  JOB_VERB_FINALIZE,
  JOB_VERB_DISMISS,
  JOB_VERB_MAX
};

/* BlockdevOnError. */
enum job_on_error {
  JOB_ON_ERROR_REPORT,
  JOB_ON_ERROR_IGNORE,
  JOB_ON_ERROR_ENOSPC,
  JOB_ON_ERROR_STOP
};

/* QAPI's names: "created", ...; "cancel", ..., "set-speed", ... */
const char *job_status_name (enum job_status s);
const char *job_verb_name (enum job_verb v);
/* QEMU's tables: may a job in FROM go to TO?  Does a job in S accept
 * VERB? */
bool job_transition_allowed (enum job_status from, enum job_status to);
bool job_verb_allowed (enum job_verb verb, enum job_status s);

struct job;

struct job_driver {
  const char *type; /* "stream" */
  /* The work, on the job thread: 0, or a negative errno with the job's
   * error message set (job_set_error) or taken from strerror. */
  int (*run) (struct job *job);
  /* After success, before the job concludes: graph changes.  May fail,
   * then the job aborts with that error. */
  int (*prepare) (struct job *job);
  void (*abort) (struct job *job);
  /* Always, last: drop what the job holds. */
  void (*clean) (struct job *job);
  /* job-complete, job lock held; NULL for jobs that cannot complete. */
  bool (*complete) (struct job *job, strata_error **errp);
  /* A cancel without force of a ready job is soft (QEMU's mirror): the job
   * sees job_is_soft_cancelled(), ends its work without its final graph
   * change and completes (BLOCK_JOB_COMPLETED).  Otherwise every cancel
   * is forced. */
  bool soft_cancel;
};

/* Nodes a job holds, each registered as a graph user with QEMU's reason
 * ("block device is in use by block job: stream"), which blockdev-del and
 * a conflicting block-stream show after "Node 'x' is busy: ". */
#define JOB_MAX_NODES 32
#define JOB_MAX_BACKENDS 2

struct job {
  char *id;
  const struct job_driver *drv;
  void *opaque; /* the driver's state; the driver frees */

  /* Guarded by the job lock. */
  enum job_status status;
  int pause_count;
  bool user_paused;
  bool cancelled, force_cancel;
  bool ready; /* reached READY (job_set_ready); paused, it is standby */
  bool finalize_requested;
  bool busy; /* not sleeping or paused */
  bool kick; /* wake from a rate-limit sleep */
  bool auto_finalize, auto_dismiss;
  /* Settling (job_settle): GEN counts what the control thread asked the
   * thread to act on; the thread sets ACK to GEN where it next waits,
   * takes a chunk or concludes. */
  unsigned gen, ack;
  uint64_t len, offset; /* progress: total and current */
  struct ratelimit rl;
  enum job_on_error on_error;
  /* Errors ignored in a row, and the time before which job_yield lets
   * the job retry no more (JOB_RETRY_* in job.c); job_account resets. */
  unsigned ignored_streak;
  uint64_t retry_after_ns;
  const char *iostatus; /* "ok", "failed", "nospace" */
  int ret;              /* 0 or the negative errno it ended with */
  char *error;          /* the error message when it failed */

  strata_node *nodes[JOB_MAX_NODES];
  int nnodes;
  strata_node *filter; /* one of NODES: the filter over the device, or NULL */
  /* Of NODES, those QEMU's job reaches through a BlockBackend of its own
   * (commit's top and base): blockdev-del says "in use" for them. */
  strata_node *backends[JOB_MAX_BACKENDS];
  int nbackends;
  char *user; /* the graph-user phrase */

  pthread_cond_t cond; /* the job thread waits on this (CLOCK_MONOTONIC) */
  struct job *next;
};

/* ---- events ---- */

/* What happened, for the control layer to announce (QMP's events in
 * brackets, with the members each carries). */
enum job_event_kind {
  JOB_EVENT_STATUS_CHANGE, /* JOB_STATUS_CHANGE: id, status */
  JOB_EVENT_PENDING,       /* BLOCK_JOB_PENDING: type, id */
  JOB_EVENT_ERROR,         /* BLOCK_JOB_ERROR: id, is_read, action */
  JOB_EVENT_COMPLETED,     /* BLOCK_JOB_COMPLETED: type, id, len, offset,
                              speed, error (NULL on success) */
  JOB_EVENT_CANCELLED,     /* BLOCK_JOB_CANCELLED: type, id, len, offset,
                              speed */
  JOB_EVENT_READY,         /* BLOCK_JOB_READY: type, id, len, offset, speed */
};

struct job_event {
  enum job_event_kind kind;
  const char *id, *type;
  enum job_status status;
  bool is_read;
  enum job_on_error action; /* REPORT, IGNORE or STOP */
  uint64_t len, offset, speed;
  const char *error;
};

/* The handler is called with the job lock held, in the order the events
 * happen, from the control thread or a job thread; it must not take the
 * job lock.  The strings live only for the call.  Without a handler,
 * events are dropped. */
typedef void (*job_event_fn) (const struct job_event *ev);
void job_set_event_handler (job_event_fn fn);

/* ---- the job list ---- */

/* The lock over every job. */
void job_lock (void);
void job_unlock (void);

/* Create a job (state created, JOB_STATUS_CHANGE sent), job lock held.
 * Returns NULL with *ERRP set on a bad or used id or a negative speed. */
struct job *job_create_job_locked (const char *id,
                                   const struct job_driver *drv, int64_t speed,
                                   bool auto_finalize, bool auto_dismiss,
                                   enum job_on_error on_error,
                                   strata_error **errp);
/* Hold NODE for the job's life (a reference and a graph user). */
bool job_add_node (struct job *job, strata_node *node);
/* Let go of NODE before the job ends (the stream's filter, dropped
 * before the graph changes); nothing if the job does not hold it. */
void job_drop_node (struct job *job, strata_node *node);
/* Hold NODE as job_add_node does, as one the job reaches through a
 * BlockBackend of its own in QEMU (job lock held). */
bool job_add_backend (struct job *job, strata_node *node);
/* Does a job hold NODE that way?  Takes the job lock. */
bool job_is_backend (strata_node *node);
/* Is NODE the filter a job put over its device?  *IMPLICIT: it was named
 * automatically (QEMU then names it by its child's file). */
bool job_is_filter (strata_node *node, bool *implicit);
/* Make NODE writable for the job's life, as QEMU does for the node a job
 * writes; *DONE says whether it was read-only (then the job makes it so
 * again when it ends: strata_reopen (node, false, 0, NULL)). */
bool job_make_writable (strata_node *node, bool *done, strata_error **errp);
/* Start the thread (created -> running), job lock held.  On failure the
 * job goes to null and is freed, with *ERRP set. */
bool job_start_job_locked (struct job *job, strata_error **errp);
/* Free a job that was created but never started (created -> null), job
 * lock held. */
void job_discard_job_locked (struct job *job);

/* Wait (a bounded while, no lock held) until the thread of job ID has
 * started work or finished: QEMU runs a new job up to its first yield
 * before block-stream replies, so a job with nothing to copy has sent
 * all its events by then. */
void job_settle (const char *id);

/* Lookups, job lock held: the live job with that id, or NULL. */
struct job *job_find_job_locked (const char *id);
/* The job (not yet concluded) that holds NODE, or NULL. */
struct job *job_holding_job_locked (strata_node *node);

/* ---- for drivers, on the job thread ---- */

/* Between chunks: pause while asked, sleep off the rate limit.  Returns
 * false when the job was cancelled and should stop. */
bool job_yield (struct job *job);
/* Sleep NS nanoseconds, or less when woken by a verb; pauses while
 * asked.  False when the job was cancelled. */
bool job_sleep_ns (struct job *job, uint64_t ns);
/* BYTES of data were moved, dispatched at START (clock_now_ns()). */
void job_account (struct job *job, uint64_t bytes, uint64_t start);
void job_set_progress (struct job *job, uint64_t offset, uint64_t len);
bool job_is_cancelled (struct job *job);
/* Does the job want to stop at its next pause point (pause or cancel)?
 * A driver with copies in flight finishes them first, so a paused job
 * moves no data and its offset stays put. */
bool job_stop_wanted (struct job *job);
/* Cancelled without force after READY (see soft_cancel). */
bool job_is_soft_cancelled (struct job *job);
/* Wake the job thread from a sleep (a driver's complete callback). */
void job_wake_job_locked (struct job *job);
/* Everything is copied: running -> ready, then BLOCK_JOB_READY (once). */
void job_set_ready (struct job *job);
/* An I/O error: applies on-error, sends BLOCK_JOB_ERROR, and for stop
 * pauses the job (io-status failed) until resumed.  Returns the action:
 * JOB_ON_ERROR_REPORT (fail), _IGNORE (go on), _STOP (retry the chunk).
 * After a few errors ignored in a row with nothing moved between them
 * (a dead target retried), job_yield backs off, up to a second a try. */
enum job_on_error job_io_error (struct job *job, int err, bool is_read);
/* The same under POLICY instead of the job's on-error (mirror's
 * on-target-error for its writes). */
enum job_on_error job_io_error_policy (struct job *job, int err, bool is_read,
                                       enum job_on_error policy);
/* Set the message the job fails with (printf-style). */
void job_set_error (struct job *job, const char *fmt, ...)
    __attribute__ ((format (printf, 2, 3)));

/* ---- verbs, control thread, job lock held; errors as QEMU's ---- */
bool job_user_pause_job_locked (struct job *job, strata_error **errp);
bool job_user_resume_job_locked (struct job *job, strata_error **errp);
bool job_cancel_job_locked (struct job *job, bool force, strata_error **errp);
bool job_complete_job_locked (struct job *job, strata_error **errp);
bool job_finalize_job_locked (struct job *job, strata_error **errp);
bool job_dismiss_job_locked (struct job *job, strata_error **errp);
bool job_set_speed_job_locked (struct job *job, int64_t speed,
                               strata_error **errp);

/* ---- queries ---- */

/* What query-jobs and query-block-jobs report.  The strings are the
 * job's: valid while the job lock is held. */
struct job_info {
  const char *id, *type;
  enum job_status status;
  uint64_t len, offset, speed;
  bool busy, paused, auto_finalize, auto_dismiss;
  const char *iostatus;
  const char *error; /* the error it failed with, else NULL */
};
void job_get_info_job_locked (struct job *job, struct job_info *info);
/* Call FN for every job, newest first (QEMU's order), job lock held. */
void job_foreach_job_locked (void (*fn) (struct job *job, void *opaque),
                             void *opaque);

/* Shutdown: cancel every job, wait for their threads, free them all. */
void job_shutdown (void);

/* QEMU's id rule (a letter, then letters, digits, '-', '.', '_'). */
bool job_id_wellformed (const char *id);

#endif
