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
 * Idle-aware streaming (x-yield-to-guest): before each chunk the job
 * looks at TOP's request tracker: requests in flight, or begun since its
 * own last chunk ended, are the guest's.  None (and, after a busy spell,
 * none for 50 ms): the chunk goes at the set speed.  Some: it goes at
 * x-guest-floor-speed at most (0: it waits, looking again every 10 ms),
 * so the guest keeps the disk while it is busy.
 */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "block/chain.h"
#include "block/graph.h"
#include "jobs/job.h"
#include "jobs/stream.h"
#include "util/cleanup.h"
#include "util/clock.h"

#define STREAM_CHUNK (512 * 1024) /* QEMU's STREAM_CHUNK */
#define STREAM_MIN_CHUNK (64 * 1024)
#define IDLE_POLL_NS 10000000ull  /* 10 ms */
#define IDLE_GRACE_NS 50000000ull /* 50 ms */

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

/* One chunk at OFFSET: *N gets the bytes it covers (set before any copy,
 * so an error leaves it meaningful).  Returns 0 or a negative errno from
 * the copy. */
static int
stream_chunk (struct job *job, struct stream *s, uint64_t offset, uint64_t len,
              uint64_t *n)
{
  struct bstat bs;
  uint64_t copied = 0, start;
  bool copy;
  int r;

  *n = len;
  /* Only "allocated here?" matters: no lseek on the file below. */
  r = node_block_status_flags (s->top, offset, len, &bs, STRATA_BS_SHALLOW);
  if (r < 0)
    return r;
  *n = bs.pnum < len ? bs.pnum : len;
  if (bs.flags & BS_ALLOCATED)
    return 0;
  if ((r = chain_allocated_above (chain_backing (s->top), s->base, offset, n,
                                  &copy))
          < 0
      || !copy)
    return r;
  start = clock_now_ns ();
  r = node_copy_up (s->top, s->base, offset, *n, &copied);
  job_account (job, copied, start);
  if (s->yield_to_guest) {
    ratelimit_account (&s->floor_rl, copied, start);
    s->last_seq = tracker_seq (&s->top->tracker);
  }
  return r;
}

static int
stream_run (struct job *job)
{
  struct stream *s = job->opaque;
  int64_t len = 0;
  uint64_t offset = 0, n;
  int r, error = 0;

  /* Nothing between TOP and BASE: nothing to copy (QEMU reports len 0). */
  if (!s->top->backing || s->top->backing == s->base)
    return 0;
  if ((len = node_length (s->top)) < 0)
    return len;
  job_set_progress (job, 0, len);
  while (offset < (uint64_t)len) {
    uint64_t c = chunk_size (job, s);

    if (!job_yield (job) || (s->yield_to_guest && !yield_to_guest (job, s)))
      return -ECANCELED;
    if (c > (uint64_t)len - offset)
      c = len - offset;
    r = stream_chunk (job, s, offset, c, &n);
    if (r < 0) {
      /* QEMU reports every stream error as a read, ENOSPC too. */
      switch (job_io_error (job, r, true)) {
      case JOB_ON_ERROR_STOP: continue; /* paused; retried when resumed */
      case JOB_ON_ERROR_IGNORE: error = r; break;
      default: return r;
      }
    }
    offset += n;
    job_set_progress (job, offset, len);
  }
  if (error)
    return error;
  return node_flush (s->top);
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
