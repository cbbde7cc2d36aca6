/* strata: block jobs (job.c), QEMU's job model.
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
 * holds the job lock across I/O.
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
#ifndef STRATA_JOB_H
#define STRATA_JOB_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "block/node.h"
#include "control/qmp.h"
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
  /* job-complete; NULL for jobs that cannot complete. */
  bool (*complete) (struct job *job, struct qmp_error *err);
};

/* Nodes a job holds, each registered as a graph user with QEMU's reason
 * ("block device is in use by block job: stream"), which blockdev-del and
 * a conflicting block-stream show after "Node 'x' is busy: ". */
#define JOB_MAX_NODES 32

struct job {
  char *id;
  const struct job_driver *drv;
  void *opaque; /* the driver's state; the driver frees */

  /* Guarded by the job lock. */
  enum job_status status;
  int pause_count;
  bool user_paused;
  bool cancelled, force_cancel;
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
  const char *iostatus; /* "ok", "failed", "nospace" */
  int ret;              /* 0 or the negative errno it ended with */
  char *error;          /* the error message when it failed */

  strata_node *nodes[JOB_MAX_NODES];
  int nnodes;
  strata_node *filter; /* one of NODES: the filter over the device, or NULL */
  char *user;          /* the graph-user phrase */

  pthread_cond_t cond; /* the job thread waits on this */
  struct job *next;
};

/* The lock over every job. */
void job_lock (void);
void job_unlock (void);

/* Create a job (state created, JOB_STATUS_CHANGE sent); the caller
 * checked the id.  Returns NULL with ERR set on a bad or used id. */
struct job *job_create (const char *id, const struct job_driver *drv,
                        int64_t speed, bool auto_finalize, bool auto_dismiss,
                        enum job_on_error on_error, struct qmp_error *err);
/* Hold NODE for the job's life (a reference and a graph user). */
bool job_add_node (struct job *job, strata_node *node);
/* Let go of NODE before the job ends (the stream's filter, dropped
 * before the graph changes); nothing if the job does not hold it. */
void job_drop_node (struct job *job, strata_node *node);
/* Is NODE the filter a job put over its device?  *IMPLICIT: it was named
 * automatically (QEMU then names it by its child's file). */
bool job_is_filter (strata_node *node, bool *implicit);
/* Start the thread (created -> running).  On failure the job goes to null
 * and is freed, with ERR set. */
bool job_start (struct job *job, struct qmp_error *err);
/* Free a job that was created but never started (created -> null). */
void job_discard (struct job *job);

/* Wait (a bounded while, no lock held) until the thread of job ID has
 * started work or finished: QEMU runs a new job up to its first yield
 * before block-stream replies, so a job with nothing to copy has sent
 * all its events by then. */
void job_settle (const char *id);

/* Lookups, job lock held: the live job with that id, or NULL. */
struct job *job_find_locked (const char *id);
/* The job (not yet concluded) that holds NODE, or NULL. */
struct job *job_holding_locked (strata_node *node);

/* ---- for drivers, on the job thread ---- */

/* Between chunks: pause while asked, sleep off the rate limit.  Returns
 * false when the job was cancelled and should stop. */
bool job_yield (struct job *job);
/* BYTES of data were moved, dispatched at START (ratelimit_now_ns()). */
/* Sleep NS nanoseconds, or less when woken by a verb; pauses while
 * asked.  False when the job was cancelled. */
bool job_sleep_ns (struct job *job, uint64_t ns);
void job_account (struct job *job, uint64_t bytes, uint64_t start);
void job_set_progress (struct job *job, uint64_t offset, uint64_t len);
bool job_is_cancelled (struct job *job);
/* An I/O error: applies on-error, sends BLOCK_JOB_ERROR, and for stop
 * pauses the job (io-status failed) until resumed.  Returns the action:
 * JOB_ON_ERROR_REPORT (fail), _IGNORE (go on), _STOP (retry the chunk). */
enum job_on_error job_io_error (struct job *job, int err, bool is_read);
/* Set the message the job fails with (printf-style). */
void job_set_error (struct job *job, const char *fmt, ...)
    __attribute__ ((format (printf, 2, 3)));

/* ---- verbs, control thread, job lock held; errors as QEMU's ---- */
bool job_user_pause_locked (struct job *job, struct qmp_error *err);
bool job_user_resume_locked (struct job *job, struct qmp_error *err);
bool job_cancel_locked (struct job *job, bool force, struct qmp_error *err);
bool job_complete_locked (struct job *job, struct qmp_error *err);
bool job_finalize_locked (struct job *job, struct qmp_error *err);
bool job_dismiss_locked (struct job *job, struct qmp_error *err);
bool job_set_speed_locked (struct job *job, int64_t speed,
                           struct qmp_error *err);

/* Replies: BlockJobInfo and JobInfo, in QAPI's member order. */
json_t *job_block_info_locked (struct job *job);
json_t *job_info_locked (struct job *job);
/* Call FN for every job, newest first (QEMU's order), job lock held. */
void job_foreach_locked (void (*fn) (struct job *job, void *opaque),
                         void *opaque);

/* Shutdown: cancel every job, wait for their threads, free them all. */
void job_shutdown (void);

/* QEMU's id rule (a letter, then letters, digits, '-', '.', '_'). */
bool job_id_wellformed (const char *id);

/* Commands implemented in stream.c. */
json_t *stream_cmd_block_stream (json_t *args, struct qmp_error *err);
json_t *stream_cmd_pull_range (json_t *args, struct qmp_error *err);

#endif
