/* strata: the stream job (block-stream's work; its arguments are checked
 * in src/control/commands-stream.c and arrive as struct stream_params).
 *
 * block-stream copies into TOP everything TOP reads from the layers
 * between it and BASE, then makes BASE (or nothing) TOP's backing file:
 *
 *   base <- mid <- top        stream top, base=base      base <- top
 *
 * The job walks TOP in chunks: where TOP allocates (block status), it
 * skips; elsewhere node_copy_up() copies what some layer above BASE holds
 * (serialised against guest writes, so a newer guest write is never
 * overwritten).  Progress is QEMU's: len is the image length and offset
 * moves over skipped and copied chunks alike; the rate limit counts only
 * the bytes written.  After the last chunk TOP is flushed, and only then
 * (prepare) is the header's backing name rewritten and the graph edge
 * moved, so a crash at any point leaves either the old chain (with part
 * of it copied up, reading the same) or the new one.  A new stream after
 * a crash finds the copied chunks allocated and skips them.
 *
 * Without a speed limit (and without x-yield-to-guest) two chunks are
 * copied at once, by two copier threads (a work queue the job starts):
 *
 *   job thread:  decide chunk k, k+1, ... (block status); retire in order
 *   copier A:    [read k  ][write k  ][read k+2 ]......[write k+2]
 *   copier B:    [read k+1]...turn...[write k+1 ][read k+3]...
 *
 * Each copy holds its own serialising request; a copier waits for its
 * turn (the chunks before it have written all of theirs) before its
 * first write, so the reads of one chunk overlap the writes of the one
 * before while TOP's clusters are allocated in the walk's order, as one
 * thread (and QEMU's job) allocates them.  Progress moves only past the
 * chunks done in order; after a failed chunk those behind it write
 * nothing and are looked at again, so an error, a pause or a cancel
 * leaves TOP and the offset as the one-chunk-at-a-time walk leaves them.
 * A chunk that starts inside a cluster of TOP, which the one before it
 * shares, waits until nothing is in flight.
 *
 * Idle-aware streaming (x-yield-to-guest): before each chunk the job
 * looks at TOP's request tracker: requests in flight, or begun since its
 * own last chunk ended, are the guest's.  None (and, after a busy spell,
 * none for 50 ms): the chunk goes at the set speed.  Some: it goes at
 * x-guest-floor-speed at most (0: it waits, looking again every 10 ms),
 * so the guest keeps the disk while it is busy.
 */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "block/chain.h"
#include "block/graph.h"
#include "jobs/job.h"
#include "jobs/stream.h"
#include "util/cleanup.h"
#include "util/clock.h"
#include "util/workqueue.h"

#define STREAM_CHUNK (512 * 1024) /* QEMU's STREAM_CHUNK */
#define STREAM_MIN_CHUNK (64 * 1024)
#define IDLE_POLL_NS 10000000ull  /* 10 ms */
#define IDLE_GRACE_NS 50000000ull /* 50 ms */
#define STREAM_COPIERS 2          /* copier threads */
/* Chunks handed to the copiers at once, without a speed limit: one more
 * than the copiers, so one that ends finds the next queued rather than
 * sleeping until the job thread wakes and hands it one. */
#define STREAM_DEPTH 3
#define STREAM_RING 8 /* chunks taken and not yet retired, copied or not */

struct stream;

/* A chunk taken by the walk: copied (COPYING, until DONE) or not. */
struct stream_copy {
  struct workqueue_item item; /* first: the work queue hands it back */
  struct stream *s;
  uint64_t offset, n;
  bool copying;
  uint64_t ticket; /* its turn to write into TOP, in the walk's order */
  /* Set by the copier, then DONE, under the stream lock. */
  bool done;
  int r;
  uint64_t copied, start;
};

struct stream {
  strata_node *top, *base; /* references; BASE may be NULL */
  char *backing_file;      /* backing-file argument, or NULL */
  bool yield_to_guest;
  uint64_t floor_speed;
  struct ratelimit floor_rl;
  uint64_t last_seq;        /* TOP's request count after our chunk */
  bool guest_active;        /* busy at the last look */
  strata_node *old_backing; /* kept until clean, see prepare */
  bool restore_ro;          /* TOP was read-only: made so again at the end */
  strata_node *filter;      /* the copy-on-read filter over TOP, or NULL */
  /* The walk's chunks in flight (the job thread's alone, but for the
   * fields of struct stream_copy the copiers set under LOCK). */
  struct workqueue *wq; /* the copiers; NULL: copies run on the job thread */
  struct stream_copy ring[STREAM_RING];
  unsigned head, count, copying;
  uint64_t unit;            /* node_copy_up_unit (TOP) */
  uint64_t tickets;         /* the next chunk's ticket */
  uint64_t turn;            /* the ticket whose chunk may write (LOCK) */
  uint64_t fail_from;       /* a chunk failed: those from this ticket on
                               write nothing until drained (LOCK) */
  pthread_mutex_t lock;     /* stream lock (leaf): TURN, a chunk's result */
  pthread_cond_t turn_cond; /* TURN moved (the copiers wait on it) */
  pthread_cond_t done_cond; /* a chunk is done (the job thread waits) */
};

/* E's message, for an error path that may have got none. */
static const char *
error_text (const strata_error *e)
{
  return e ? strata_error_message (e) : "unknown error";
}

/* ---- the job ---- */

/* Bytes per chunk: QEMU's 512 KiB.  Idle-aware streaming takes smaller
 * ones under a low speed limit, so that one chunk is at most 1/20 s of the
 * rate (whole 64 KiB units) and a guest that wakes up waits less. */
static uint64_t
chunk_size (struct job *job, struct stream *s)
{
  uint64_t speed, c = STREAM_CHUNK;

  if (!s->yield_to_guest)
    return c;
  job_lock ();
  speed = job->rl.speed;
  job_unlock ();
  if (speed > 0 && speed / 20 < c)
    c = speed / 20 / STREAM_MIN_CHUNK * STREAM_MIN_CHUNK;
  return c < STREAM_MIN_CHUNK ? STREAM_MIN_CHUNK : c;
}

/* Has the guest used TOP since LAST_SEQ, or is it using it now? */
static bool
guest_busy (struct stream *s)
{
  return tracker_count (&s->top->tracker) > 0
         || tracker_seq (&s->top->tracker) != s->last_seq;
}

/* Idle-aware pacing: false when cancelled.  A guest that was busy counts
 * as idle again only after IDLE_GRACE_NS without a new request, so one
 * that is between two requests when we look does not let a full-speed
 * chunk through. */
static bool
yield_to_guest (struct job *job, struct stream *s)
{
  for (;;) {
    uint64_t now, d;
    bool busy = guest_busy (s);

    if (!busy && s->guest_active) {
      s->last_seq = tracker_seq (&s->top->tracker);
      if (!job_sleep_ns (job, IDLE_GRACE_NS))
        return false;
      busy = guest_busy (s);
    }
    s->guest_active = busy;
    now = clock_now_ns ();
    if (!busy) {
      ratelimit_init (&s->floor_rl, s->floor_speed, now);
      return true;
    }
    s->last_seq = tracker_seq (&s->top->tracker);
    d = s->floor_speed ? ratelimit_delay (&s->floor_rl, now) : IDLE_POLL_NS;
    if (d == 0)
      return true;
    if (!job_sleep_ns (job, d))
      return false;
  }
}

/* What to do at OFFSET: *N gets the bytes the answer covers (at most
 * LEN) and *COPY whether a layer above BASE holds them while TOP does
 * not.  Returns 0 or a negative errno from block status. */
static int
stream_decide (struct stream *s, uint64_t offset, uint64_t len, uint64_t *n,
               bool *copy)
{
  struct bstat bs;
  int r;

  *n = len;
  *copy = false;
  /* Only "allocated here?" matters: no lseek on the file below. */
  r = node_block_status_flags (s->top, offset, len, &bs, STRATA_BS_SHALLOW);
  if (r < 0)
    return r;
  *n = bs.pnum < len ? bs.pnum : len;
  if (bs.flags & BS_ALLOCATED)
    return 0;
  return chain_allocated_above (chain_backing (s->top), s->base, offset, n,
                                copy);
}

/* Wait until chunk C may write into TOP: the chunks before it have
 * written all of theirs.  The reads of one chunk overlap the writes of
 * the one before, and TOP's clusters are allocated in the walk's order,
 * as one chunk at a time allocates them (and as QEMU's job does). */
static void
wait_turn_stream_locked (struct stream_copy *c)
{
  while (c->s->turn != c->ticket)
    pthread_cond_wait (&c->s->turn_cond, &c->s->lock);
}

/* Chunks from TICKET on are not to write (a chunk before them failed). */
static void
fail_from_stream_locked (struct stream *s, uint64_t ticket)
{
  if (ticket < s->fail_from)
    s->fail_from = ticket;
}

/* Before a chunk's first write: its turn, unless a chunk before it
 * failed (then it writes nothing: the job stops or goes on where that
 * one failed, as QEMU's does, and looks at this one again). */
static int
wait_turn (void *opaque)
{
  struct stream_copy *c = opaque;
  bool failed;

  pthread_mutex_lock (&c->s->lock);
  wait_turn_stream_locked (c);
  failed = c->ticket >= c->s->fail_from;
  pthread_mutex_unlock (&c->s->lock);
  return failed ? -ECANCELED : 0;
}

/* Copy chunk C up (on a copier thread, or on the job thread when the
 * job runs one chunk at a time), then pass the turn and mark it done. */
static void
copy_run (struct stream_copy *c)
{
  struct stream *s = c->s;
  uint64_t copied = 0;
  int r;

  c->start = clock_now_ns ();
  r = node_copy_up_ordered (s->top, s->base, c->offset, c->n, &copied,
                            wait_turn, c);
  pthread_mutex_lock (&s->lock);
  wait_turn_stream_locked (c);
  s->turn++;
  if (r < 0)
    fail_from_stream_locked (s, c->ticket + 1);
  c->r = r;
  c->copied = copied;
  c->done = true;
  pthread_mutex_unlock (&s->lock);
  /* Woken after the unlock, so that a waiter does not wake only to wait
   * for the lock.  C may be reused from here; S lives until the job
   * thread has joined the copiers (workqueue_free). */
  pthread_cond_broadcast (&s->turn_cond);
  pthread_cond_signal (&s->done_cond);
}

static void
copy_item_run (struct workqueue_item *item)
{
  copy_run ((struct stream_copy *)item);
}

/* How many chunks may be copied at once: one under a speed limit or
 * with x-yield-to-guest (their pacing looks at each chunk as it ends),
 * else STREAM_DEPTH. */
static unsigned
stream_depth (struct job *job, struct stream *s)
{
  uint64_t speed;

  if (s->yield_to_guest)
    return 1;
  job_lock ();
  speed = job->rl.speed;
  job_unlock ();
  return speed ? 1 : STREAM_DEPTH;
}

static bool
oldest_is_done (struct stream *s)
{
  bool done;

  pthread_mutex_lock (&s->lock);
  done = s->ring[s->head % STREAM_RING].done;
  pthread_mutex_unlock (&s->lock);
  return done;
}

/* The oldest chunk, waited for. */
static struct stream_copy *
oldest_done (struct stream *s)
{
  struct stream_copy *c = &s->ring[s->head % STREAM_RING];

  pthread_mutex_lock (&s->lock);
  while (!c->done)
    pthread_cond_wait (&s->done_cond, &s->lock);
  pthread_mutex_unlock (&s->lock);
  return c;
}

/* Wait for every chunk in flight and forget them: after an error the
 * job goes on from the failed chunk, and those after it (which wrote
 * nothing) are looked at again. */
static void
drain (struct stream *s)
{
  while (s->count) {
    struct stream_copy *c = oldest_done (s);
    if (c->copying)
      s->copying--;
    s->head++;
    s->count--;
  }
  pthread_mutex_lock (&s->lock);
  s->fail_from = UINT64_MAX;
  pthread_mutex_unlock (&s->lock);
}

/* Take a new chunk for [OFFSET, OFFSET+N); COPY: to be copied (queued to
 * the copiers, or run here when DEPTH is 1), else done already. */
static void
push_chunk (struct stream *s, uint64_t offset, uint64_t n, bool copy, int r,
            unsigned depth)
{
  struct stream_copy *c = &s->ring[(s->head + s->count) % STREAM_RING];

  *c = (struct stream_copy){
    .s = s, .offset = offset, .n = n, .r = r, .copying = copy, .done = !copy
  };
  c->item.run = copy_item_run;
  s->count++;
  if (r < 0) {
    pthread_mutex_lock (&s->lock);
    fail_from_stream_locked (s, s->tickets);
    pthread_mutex_unlock (&s->lock);
  }
  if (!copy)
    return;
  c->ticket = s->tickets++;
  s->copying++;
  if (depth > 1 && s->wq)
    workqueue_submit (s->wq, &c->item, &c->item, 1, 1);
  else
    copy_run (c);
}

/* Retire the oldest chunk, waiting for it: progress moves past it, or its
 * error goes through on-error.  Returns 1 to go on, 0 when the job is to
 * go on from *NEXT (set here: an error stopped or ignored), or a negative
 * errno to end with. */
static int
retire (struct job *job, struct stream *s, uint64_t len, uint64_t *next,
        int *error)
{
  struct stream_copy *c = oldest_done (s);
  struct stream_copy done = *c;

  if (done.copying) {
    job_account (job, done.copied, done.start);
    if (s->yield_to_guest) {
      ratelimit_account (&s->floor_rl, done.copied, done.start);
      s->last_seq = tracker_seq (&s->top->tracker);
    }
    s->copying--;
  }
  s->head++;
  s->count--;
  if (done.r == 0) {
    job_set_progress (job, done.offset + done.n, len);
    return 1;
  }
  drain (s);
  /* QEMU reports every stream error as a read, ENOSPC too. */
  switch (job_io_error (job, done.r, true)) {
  case JOB_ON_ERROR_STOP: /* paused; retried when resumed */
    *next = done.offset;
    return 0;
  case JOB_ON_ERROR_IGNORE:
    *error = done.r;
    *next = done.offset + done.n;
    job_set_progress (job, *next, len);
    return 0;
  default: return done.r;
  }
}

/* The walk, in chunks taken in order; without a speed limit up to
 * STREAM_DEPTH of them are handed to the copier threads at once (one
 * reading while another writes), each under its own serialising request.
 * Progress is the end of the chunks done in order, so it never passes a
 * chunk still in flight or failed. */
static int
stream_walk (struct job *job, struct stream *s, uint64_t len)
{
  uint64_t next = 0;
  int r, error = 0;

  while (next < len || s->count) {
    unsigned depth = stream_depth (job, s);
    /* A chunk that starts inside a unit of TOP shares it with the one
     * before: it waits for those in flight (see node_copy_up_unit). */
    bool hold = s->count && (next % s->unit || job_stop_wanted (job)), copy;
    uint64_t c, n;

    /* Retire what is done, and wait for the oldest when no new chunk may
     * start: the copiers are busy, the ring is full, all chunks are
     * taken, or the job is to pause or end. */
    while (s->count
           && (oldest_is_done (s) || next >= len || hold || s->copying >= depth
               || s->count == STREAM_RING)) {
      if ((r = retire (job, s, len, &next, &error)) < 0)
        return r;
      if (r == 0)
        break;
    }
    if (next >= len)
      continue;
    c = chunk_size (job, s);
    if (!job_yield (job) || (s->yield_to_guest && !yield_to_guest (job, s)))
      return -ECANCELED;
    if (c > len - next)
      c = len - next;
    r = stream_decide (s, next, c, &n, &copy);
    push_chunk (s, next, n, copy && r == 0, r, depth);
    next += n;
  }
  return error;
}

static int
stream_run (struct job *job)
{
  struct stream *s = job->opaque;
  int64_t len = 0;
  int r;

  /* Nothing between TOP and BASE: nothing to copy (QEMU reports len 0). */
  if (!s->top->backing || s->top->backing == s->base)
    return 0;
  if ((len = node_length (s->top)) < 0)
    return len;
  job_set_progress (job, 0, len);
  s->unit = node_copy_up_unit (s->top);
  /* Without copier threads the chunks are copied one at a time, here. */
  s->wq = workqueue_new (STREAM_COPIERS, 0);
  r = stream_walk (job, s, len);
  drain (s);
  workqueue_free (s->wq);
  s->wq = NULL;
  return r < 0 ? r : node_flush (s->top);
}

/* Make TOP read-only again if the job made it writable; graph lock held
 * (or the control thread's own, for a job that never started). */
static void
restore_read_only_graph_locked (struct stream *s)
{
  if (s->restore_ro)
    strata_reopen (s->top, false, 0, NULL);
  s->restore_ro = false;
}

/* Drop the filter over TOP (QEMU does it first in prepare, or in
 * abort); graph lock held, or the control thread's own for a job that
 * never started. */
static void
drop_filter_graph_locked (struct job *job, struct stream *s)
{
  if (!s->filter)
    return;
  job_drop_node (job, s->filter);
  node_unref (s->filter);
  s->filter = NULL;
}

/* Rewrite the header, then move the graph edge: TOP's backing becomes
 * BASE.  The old backing node keeps a reference until clean, after the
 * requests that may still read through it have drained. */
static int
stream_prepare (struct job *job)
{
  struct stream *s = job->opaque;
  strata_error *e = NULL;
  const char *name = s->backing_file;
  int r = 0;

  if (!name && s->base)
    name = s->base->filename;
  graph_lock ();
  drop_filter_graph_locked (job, s);
  if (!s->top->backing)
    goto out;
  if (!node_change_backing_file (s->top, name,
                                 s->base ? s->base->drv->name : NULL, &e)) {
    job_set_error (job, "%s", error_text (e));
    strata_error_free (e);
    r = -EIO;
    goto out;
  }
  tracker_wait_idle (&s->top->tracker, 0, 0);
  s->old_backing = s->top->backing;
  node_ref (s->old_backing);
  node_detach_child (s->top, "backing");
  if (s->base) {
    node_ref (s->base);
    if (!node_attach_child (s->top, "backing", s->base, &e)) {
      node_unref (s->base);
      job_set_error (job, "%s", error_text (e));
      strata_error_free (e);
      r = -EIO;
    }
  }
out:
  restore_read_only_graph_locked (s);
  graph_unlock ();
  return r;
}

static void
stream_abort (struct job *job)
{
  graph_lock ();
  drop_filter_graph_locked (job, job->opaque);
  restore_read_only_graph_locked (job->opaque);
  graph_unlock ();
}

static void
stream_clean (struct job *job)
{
  struct stream *s = job->opaque;

  if (!s)
    return;
  drop_filter_graph_locked (job, s);
  restore_read_only_graph_locked (s);
  if (s->old_backing) {
    tracker_wait_idle (&s->top->tracker, 0, 0);
    node_unref (s->old_backing);
  }
  if (s->base)
    node_unref (s->base);
  node_unref (s->top);
  free (s->backing_file);
  pthread_cond_destroy (&s->turn_cond);
  pthread_cond_destroy (&s->done_cond);
  pthread_mutex_destroy (&s->lock);
  free (s);
  job->opaque = NULL;
}

static const struct job_driver stream_driver = {
  .type = "stream",
  .run = stream_run,
  .prepare = stream_prepare,
  .abort = stream_abort,
  .clean = stream_clean,
};

/* ---- starting ---- */

/* The job's state, with its own references to TOP and BASE. */
static struct stream *
stream_new (const struct stream_params *p, strata_node *top, strata_node *base)
{
  struct stream *s = calloc (1, sizeof *s);

  if (!s)
    return NULL;
  if (p->backing_file && !(s->backing_file = strdup (p->backing_file))) {
    free (s);
    return NULL;
  }
  node_ref (top);
  s->top = top;
  if (base)
    node_ref (base);
  s->base = base;
  s->yield_to_guest = p->yield_to_guest;
  s->floor_speed = p->floor_speed;
  ratelimit_init (&s->floor_rl, s->floor_speed, clock_now_ns ());
  s->fail_from = UINT64_MAX;
  pthread_mutex_init (&s->lock, NULL);
  pthread_cond_init (&s->turn_cond, NULL);
  pthread_cond_init (&s->done_cond, NULL);
  return s;
}

/* The copy-on-read filter QEMU puts over the device for the job's life,
 * DEV, named filter_node_name or automatically: the job holds it, so
 * query-named-block-nodes shows it and blockdev-del, a second job and a
 * new node of that name find it taken.  Its bottom is the node just above
 * BASE.  (The job copies through node_copy_up, not through it.)  Returns
 * a new node, or NULL with *ERRP set. */
static strata_node *
open_filter (const struct stream_params *p, strata_node *dev, strata_node *top,
             strata_node *base, strata_error **errp)
{
  const char *name = p->filter_node_name;
  strata_opts *opts = opts_new ();
  strata_node *bottom = top, *f = NULL;
  strata_error *e = NULL;

  while (bottom->backing && bottom->backing != base)
    bottom = bottom->backing;
  if (opts && opts_set (opts, "driver", "copy-on-read")
      && opts_set (opts, "file", dev->node_name)
      && (bottom == top || opts_set (opts, "bottom", bottom->node_name))
      && (!name || opts_set (opts, "node-name", name)))
    f = node_open (opts, top->read_only ? 0 : STRATA_OPEN_RDWR, &e);
  else
    error_set (&e, ENOMEM, "out of memory");
  if (!f) {
    error_set (errp, EINVAL, "Could not create node: %s", error_text (e));
    strata_error_free (e);
  }
  opts_free (opts);
  return f;
}

/* In QEMU's order: the device made writable, the filter, the job (its
 * ID, then its speed), the nodes it holds. */
bool
stream_start_job_locked (const struct stream_params *p, strata_error **errp)
{
  strata_node *dev = p->device, *base = p->base;
  strata_node *top = node_skip_filters (dev);
  strata_node *filter = NULL;
  struct job *job;
  struct stream *s;
  bool made_rw, ok;

  if (!job_make_writable (top, &made_rw, errp)
      || !(filter = open_filter (p, dev, top, base, errp)))
    goto fail;
  job = job_create_job_locked (p->job_id, &stream_driver, p->speed,
                               p->auto_finalize, p->auto_dismiss, p->on_error,
                               errp);
  if (!job)
    goto fail;
  if (!(s = stream_new (p, top, base))) {
    error_set (errp, ENOMEM, "out of memory");
    job_discard_job_locked (job);
    goto fail;
  }
  /* From here the job's clean drops the filter and restores TOP. */
  s->filter = filter;
  s->restore_ro = made_rw;
  job->opaque = s;
  /* The length is known before the first query, as QEMU's is. */
  if (s->top->backing && s->top->backing != s->base) {
    int64_t len = node_length (s->top);
    job->len = len > 0 ? len : 0;
  }
  ok = job_add_node (job, filter);
  job->filter = filter;
  for (strata_node *n = dev; ok && n && n != s->base; n = chain_next (n))
    ok = job_add_node (job, n);
  if (!ok) {
    error_set (errp, ENOMEM, "out of memory");
    job_discard_job_locked (job);
    return false;
  }
  return job_start_job_locked (job, errp);
fail:
  if (filter)
    node_unref (filter);
  if (made_rw)
    strata_reopen (top, false, 0, NULL);
  return false;
}
