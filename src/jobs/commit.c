/* strata: the commit job, block-commit of an intermediate layer (its
 * arguments are checked in src/control/commands-commit.c and arrive as
 * struct commit_params).
 *
 * It copies into BASE everything that TOP and the layers between them
 * define, then makes BASE the backing file of OVERLAY, the layer above
 * TOP:
 *
 *   base <- mid <- top <- overlay     commit top, base=base
 *                                     base (now holding mid's and top's
 *                                     data) <- overlay
 *
 * The job walks the image in chunks of QEMU's 512 KiB: where a layer from
 * TOP down to the one above BASE allocates the range (block status, no
 * lseek), it reads TOP's view and writes it into BASE; elsewhere it skips.
 * Progress is QEMU's: len is TOP's length, offset moves over skipped and
 * copied chunks alike; the rate limit counts the bytes written.  BASE
 * grows first if it is shorter than TOP, as QEMU's does.
 *
 * Crash safety: until prepare, OVERLAY still reads through TOP, whose
 * layers hold every byte the job copied, so a crash leaves the chain
 * reading as before (BASE partly updated underneath, invisible through
 * the chain).  BASE is flushed before prepare rewrites OVERLAY's header, so
 * the header never names a BASE whose copy is not on disk.  The same
 * commit run again copies the same data again and ends the same.  The
 * emptied layers are left on disk and in the graph, as QEMU leaves them.
 *
 * Errors: a failed read of TOP's view is a read error, a failed write to
 * BASE a write error, for on-error; with stop (after resume) and ignore
 * the chunk is tried again, as QEMU's commit does.
 *
 * Each job holds QEMU's filter node for its life (drivers/jobfilter.c):
 * commit_top over TOP, or mirror_top over the device for an active commit
 * or a mirror; listed and named as QEMU's, but beside the data path, so
 * nothing here reads or writes through it.
 *
 * Active commit and mirror keep several copies in flight (see "active
 * commit" below):
 *
 *   job thread:  take run k, k+1, ... (dirty bits cleared); wait; retire
 *   copier A:    [read k  ][write k  ][read k+4 ][write k+4 ]
 *   copier B:    [read k+1 ][write k+1 ]...
 *   ... four copiers, one more copy queued for the first that ends
 *
 * Locks: the commit's LOCK (leaf) guards the copies' results and done
 * flags; no I/O runs under it.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "block/chain.h"
#include "block/dirty.h"
#include "block/graph.h"
#include "jobs/commit.h"
#include "jobs/job.h"
#include "util/checked.h"
#include "util/cleanup.h"
#include "util/clock.h"
#include "util/workqueue.h"

#define COMMIT_CHUNK (512 * 1024)      /* QEMU's COMMIT_BUFFER_SIZE */
#define ACTIVE_GRANULARITY (64 * 1024) /* QEMU's for a 64 KiB-cluster base */
#define ACTIVE_RUN (1024 * 1024)       /* bytes copied per step, at most */
#define ACTIVE_IDLE_NS 100000000ull    /* ready and clean: look every 0.1 s */
#define ACTIVE_BUF_SIZE (16u << 20)    /* QEMU's default buf-size */
#define ACTIVE_COPIERS 4               /* copier threads */

struct commit;

/* One copy of a dirty run in flight: the job thread fills it in and hands
 * it to a copier; the copier sets R, IS_READ and DONE (under the commit's
 * LOCK); the job thread retires it. */
struct copy_op {
  struct workqueue_item item; /* first: the work queue hands it back */
  struct commit *c;
  uint8_t *buf; /* the commit's RUN bytes, the slot's own */
  uint64_t off, len, start;
  unsigned flags; /* for the read of TOP */
  bool busy;      /* taken (the job thread's) */
  bool done, is_read;
  int r;
};

struct commit {
  strata_node *top, *base, *overlay; /* references; OVERLAY NULL if active */
  char *backing_file;                /* the backing-file argument, or NULL */
  bool restore_ro;                   /* BASE was read-only: made so again */
  strata_node *old_backing;    /* OVERLAY's old backing, kept until clean */
  strata_node *target_backing; /* drive-mirror: BASE's backing at a pivot
                                  (a reference), or NULL */
  strata_node *filter;         /* the job's mirror_top or commit_top node (a
                                  reference; also one of the job's nodes) */

  /* Active commit and mirror: TOP is the source, BASE the target. */
  bool active;
  bool mirror;            /* blockdev-mirror: type "mirror", sizes must
                             match, no growing */
  bool scan;              /* mark what is allocated before copying */
  strata_node *scan_base; /* ... in the layers above this (NULL: all) */
  enum job_on_error on_target_error;
  /* copy-mode=write-blocking: guest writes go to the target too, before
   * they return (active_sync), and mark nothing; RANGES orders them
   * against the job's own copies of the same bytes. */
  bool write_blocking;
  struct tracker ranges;
  atomic_uint_fast64_t synced; /* bytes the guest's writes took along */
  atomic_int sync_error;       /* the last failed one's, for on-error */
  struct dirty_bitmap *dirty;  /* TOP's writes since they were copied */
  uint64_t piece;              /* DIRTY's granularity (piece_size) */
  atomic_bool should_complete; /* job-complete came */
  bool pivot;                  /* the run ended for a pivot */
  struct tracked_req gate;     /* TOP drained and held, from the final
                                  copy until the pivot (or abort) */
  bool gated;

  /* The copies in flight (the job thread's, but for what the copiers set
   * under LOCK, see struct copy_op). */
  uint64_t buf_size;   /* buf-size; 0: QEMU's default */
  uint64_t run;        /* bytes per copy, at most */
  struct copy_op *ops; /* NOPS slots */
  unsigned nops;
  unsigned inflight; /* slots busy */
  uint64_t inflight_bytes;
  unsigned ndone;           /* busy slots done, not yet retired (LOCK) */
  struct workqueue *wq;     /* the copiers; NULL: copies run here */
  pthread_mutex_t lock;     /* leaf: a copy's result, NDONE */
  pthread_cond_t done_cond; /* a copy is done (the job thread waits) */
};

static const char *
error_text (const strata_error *e)
{
  return e ? strata_error_message (e) : "unknown error";
}

/* BASE at least LEN bytes long. */
static int
grow_base (struct job *job, struct commit *c, uint64_t len)
{
  int64_t blen = node_length (c->base);
  strata_error *e = NULL;

  if (blen < 0)
    return blen;
  if ((uint64_t)blen >= len)
    return 0;
  if (!node_truncate (c->base, len, 0, &e)) {
    job_set_error (job, "%s", error_text (e));
    strata_error_free (e);
    return -EIO;
  }
  return 0;
}

/* ---- active commit ----
 *
 * TOP is the device's active layer and the guest writes to it while the
 * job runs.  A dirty bitmap on TOP (src/block/dirty.c) starts with every
 * piece that a layer from TOP down to the one above BASE allocates; the job
 * copies dirty runs (TOP's view into BASE, clearing the bits first, so a
 * guest write that lands meanwhile marks its piece again) until none is
 * left, then goes READY and goes on copying what the guest writes.
 * job-complete, or a cancel without force once READY (soft: no pivot),
 * ends it: TOP is drained and held (a whole-node serialising request on
 * its tracker, so new guest requests wait), the last dirty runs are copied
 * and BASE flushed; prepare then makes TOP forward every request to BASE
 * (node_forward_to) for a pivot, so the device's users (exports, filters)
 * go on with BASE, and lets the requests go.  A forced cancel or an error
 * lets them go onto TOP.  Progress is QEMU's mirror's: offset is what was
 * copied, len that plus what is still dirty or in flight.
 *
 * Copies in flight: without a speed limit the job thread takes dirty runs
 * (clearing their bits) into the copy slots and hands them to
 * ACTIVE_COPIERS threads; buf-size bounds the bytes in flight, as QEMU's.
 * Each copy holds its range in the per-job range tracker (RANGES) from
 * before its read until after its write, so two copies of one run (the
 * guest wrote it again after the first was taken) write BASE in the order
 * they read TOP, and a write-blocking guest write to BASE is ordered
 * against them; whichever writes BASE last read TOP last.  A failed copy
 * marks its run dirty again.  Before a pause or cancel takes effect, and
 * before READY, final_copy's flush or an error's report, the copies in
 * flight end. */

/* One copy of a dirty run, on a copier thread (or on the job thread when
 * one copy at a time is allowed): under the per-job range tracker, TOP's
 * view into BASE; a failure marks the run dirty again.  The job thread
 * cleared the run when it took it, so a guest write landing meanwhile
 * marks it again and it is copied once more. */
static void
copy_op_run (struct copy_op *op)
{
  struct commit *c = op->c;
  struct tracked_req rq;
  int r;

  op->start = clock_now_ns ();
  tracker_begin (&c->ranges, &rq, op->off, op->len, true);
  op->is_read = true;
  r = node_pread (c->top, op->off, op->buf, op->len, op->flags);
  if (r >= 0) {
    op->is_read = false;
    r = node_pwrite (c->base, op->off, op->buf, op->len, 0);
  }
  tracker_end (&c->ranges, &rq);
  if (r < 0)
    dirty_set (c->dirty, op->off, op->len); /* still to copy */
  pthread_mutex_lock (&c->lock);
  op->r = r;
  op->done = true;
  c->ndone++;
  pthread_mutex_unlock (&c->lock);
  pthread_cond_signal (&c->done_cond);
}

static void
copy_op_item_run (struct workqueue_item *item)
{
  copy_op_run ((struct copy_op *)item);
}

/* How many copies may be in flight: one under a speed limit (its pacing
 * looks at each copy as it ends), else as many as the slots. */
static unsigned
copy_depth (struct job *job, struct commit *c)
{
  uint64_t speed;

  job_lock ();
  speed = job->rl.speed;
  job_unlock ();
  return speed || !c->wq ? 1 : c->nops;
}

/* Take the next dirty run at or after *CURSOR into a free slot (clearing
 * it) and start its copy; false when nothing is dirty or no slot free. */
static bool
start_copy (struct job *job, struct commit *c, uint64_t *cursor,
            unsigned flags)
{
  unsigned depth = copy_depth (job, c);
  struct copy_op *op = NULL;
  uint64_t off, len;

  if (c->inflight >= depth)
    return false;
  for (unsigned i = 0; i < c->nops && !op; i++)
    if (!c->ops[i].busy)
      op = &c->ops[i];
  if (!op || !dirty_next (c->dirty, *cursor, c->run, &off, &len))
    return false;
  dirty_clear (c->dirty, off, len);
  *op = (struct copy_op){ .c = c,
                          .buf = op->buf,
                          .off = off,
                          .len = len,
                          .flags = flags,
                          .busy = true };
  op->item.run = copy_op_item_run;
  c->inflight++;
  c->inflight_bytes += len;
  *cursor = off + len;
  if (depth > 1)
    workqueue_submit (c->wq, &op->item, &op->item, 1, 1);
  else
    copy_op_run (op);
  return true;
}

/* Retire the copies that are done (waiting for one first when WAIT and
 * some are in flight): the bytes copied count, and the first failure is
 * returned (its run is dirty again) with *IS_READ saying which side. */
static int
retire_copies (struct job *job, struct commit *c, bool wait, uint64_t *copied,
               bool *is_read)
{
  int r = 0;

  pthread_mutex_lock (&c->lock);
  while (wait && c->inflight && !c->ndone)
    pthread_cond_wait (&c->done_cond, &c->lock);
  for (unsigned i = 0; i < c->nops && c->ndone; i++) {
    struct copy_op *op = &c->ops[i];

    if (!op->busy || !op->done)
      continue;
    op->busy = false;
    c->ndone--;
    c->inflight--;
    c->inflight_bytes -= op->len;
    if (op->r < 0) {
      if (r == 0) {
        r = op->r;
        *is_read = op->is_read;
      }
      continue;
    }
    *copied += op->len;
    pthread_mutex_unlock (&c->lock);
    job_account (job, op->len, op->start);
    pthread_mutex_lock (&c->lock);
  }
  pthread_mutex_unlock (&c->lock);
  return r;
}

/* Wait for every copy in flight (their failures leave their runs dirty). */
static void
drain_copies (struct job *job, struct commit *c, uint64_t *copied)
{
  bool is_read;

  while (c->inflight)
    retire_copies (job, c, true, copied, &is_read);
}

/* Mark every piece a layer from TOP down to the one above SCAN_BASE
 * allocates (active commit: BASE; mirror: the whole chain, or TOP alone
 * for sync=top; nothing for sync=none). */
static int
mark_allocated (struct commit *c, uint64_t len)
{
  for (uint64_t offset = 0, n; c->scan && offset < len; offset += n) {
    bool alloc;
    int r;

    n = MIN (COMMIT_CHUNK * 16ull, len - offset);
    if ((r = chain_allocated_above (c->top, c->scan_base, offset, &n, &alloc))
        < 0)
      return r;
    if (alloc)
      dirty_set (c->dirty, offset, n);
  }
  return 0;
}

/* The end: TOP drained and held, the rest copied, BASE flushed.  The gate
 * stays until prepare or abort. */
static int
final_copy (struct job *job, struct commit *c, uint64_t *copied)
{
  uint64_t cursor = 0;
  bool is_read;
  int r = 0;

  tracker_begin (&c->top->tracker, &c->gate, 0, UINT64_MAX / 2, true);
  c->gated = true;
  while (c->inflight || dirty_count (c->dirty) > 0) {
    while (start_copy (job, c, &cursor, NODE_REQ_SERIALISED))
      ;
    if ((r = retire_copies (job, c, true, copied, &is_read)) < 0)
      return r;
  }
  job_set_progress (job, *copied, *copied);
  return node_flush (c->base);
}

/* Write-blocking: a guest write to TOP that just landed goes to BASE too
 * (the guest waits).  The pieces it covers whole are clean afterwards;
 * one it covers in part keeps its state (clean: BASE had the rest; dirty:
 * the job copies it whole).  A failure marks the range for the job to copy
 * and reports to it.  (A piece covered in part is marked for a target that
 * cannot read the rest through a backing node; see below.) */
static void
active_sync (void *opaque, enum node_write_kind kind, uint64_t offset,
             uint64_t len, const struct iovec *iov, int iovcnt)
{
  struct commit *c = opaque;
  uint64_t g = c->piece;
  uint64_t a = (offset + g - 1) / g * g, b = (offset + len) / g * g;
  struct tracked_req rq;
  int r;

  tracker_begin (&c->ranges, &rq, offset, len, true);
  if (b > a)
    dirty_clear (c->dirty, a, b - a);
  switch (kind) {
  case NODE_WRITE_DATA:
    r = node_pwritev (c->base, offset, len, iov, iovcnt, 0);
    break;
  case NODE_WRITE_ZEROES:
    r = node_pwrite_zeroes (c->base, offset, len, 0);
    break;
  default: r = node_pdiscard (c->base, offset, len, 0); break;
  }
  if (r < 0) {
    dirty_set (c->dirty, offset, len);
    atomic_store (&c->sync_error, r);
  }
  else {
    atomic_fetch_add (&c->synced, len);
    /* sync=top or none into a target without a backing node (drive-
     * mirror's, until the pivot): a clean piece may be one the layers
     * below hold, which the target's copy-on-write cannot read, so the
     * rest of a piece the write covers in part would read as zeros.  The
     * job copies such a piece whole from the source's view. */
    if (c->mirror && (!c->scan || c->scan_base) && !c->base->backing) {
      if (offset % g)
        dirty_set (c->dirty, offset, 1);
      if ((offset + len) % g)
        dirty_set (c->dirty, offset + len - 1, 1);
    }
  }
  tracker_end (&c->ranges, &rq);
}

static void
release_gate (struct commit *c)
{
  if (c->gated)
    tracker_end (&c->top->tracker, &c->gate);
  c->gated = false;
}

/* The copy slots: BUF_SIZE (QEMU's buf-size, rounded up to whole pieces
 * as QEMU rounds it; 0: its default) bounds the bytes in flight, in runs
 * of at most ACTIVE_RUN, in at most ACTIVE_COPIERS + 1 copies (one more
 * than the copiers, so one that ends finds the next queued). */
static bool
copies_init (struct commit *c)
{
  uint64_t g = c->piece;
  uint64_t buf = c->buf_size ? (c->buf_size + g - 1) / g * g : ACTIVE_BUF_SIZE;

  c->run = MAX (MIN (ACTIVE_RUN, buf), g);
  c->nops = MAX (MIN (buf / c->run, ACTIVE_COPIERS + 1), 1);
  if (!(c->ops = calloc (c->nops, sizeof *c->ops)))
    return false;
  for (unsigned i = 0; i < c->nops; i++)
    if (!(c->ops[i].buf = malloc (c->run)))
      return false;
  /* Without copier threads the copies go one at a time, here. */
  c->wq = c->nops > 1 ? workqueue_new (ACTIVE_COPIERS, 0) : NULL;
  return true;
}

/* Copy dirty runs until none is left (then READY) and on while the guest
 * writes, until job-complete or a soft cancel ends it with final_copy.
 * Copies go on in flight while the job thread takes the next runs;
 * before a pause or a cancel takes effect, those in flight end, so a
 * paused job moves no data. */
static int
active_loop (struct job *job, struct commit *c, uint64_t *copied)
{
  uint64_t cursor = 0;
  bool is_read;
  int r;

  for (;;) {
    uint64_t left = dirty_count (c->dirty) + c->inflight_bytes;
    uint64_t done = *copied + atomic_load (&c->synced);
    int serr = atomic_exchange (&c->sync_error, 0);

    if (serr < 0
        && job_io_error_policy (job, serr, false, c->on_target_error)
               == JOB_ON_ERROR_REPORT)
      return serr;
    job_set_progress (job, done, done + left);
    if (c->inflight && job_stop_wanted (job))
      r = retire_copies (job, c, true, copied, &is_read);
    else {
      if (!job_yield (job) && !job_is_soft_cancelled (job))
        return -ECANCELED;
      if (left == 0) {
        bool soft = job_is_soft_cancelled (job);

        job_set_ready (job);
        if (atomic_load (&c->should_complete) || soft) {
          c->pivot = !soft;
          return final_copy (job, c, copied);
        }
        if (!job_sleep_ns (job, ACTIVE_IDLE_NS)
            && !job_is_soft_cancelled (job))
          return -ECANCELED;
        continue;
      }
      while (start_copy (job, c, &cursor, 0))
        ;
      r = retire_copies (job, c, true, copied, &is_read);
    }
    if (r < 0
        && job_io_error_policy (job, r, is_read,
                                is_read ? job->on_error : c->on_target_error)
               == JOB_ON_ERROR_REPORT)
      return r;
  }
}

/* The piece the job tracks and copies: 64 KiB, or the target's cluster
 * when that is larger and the target cannot read what it lacks through a
 * backing node (sync=top or none, drive-mirror's target until the pivot):
 * a copy or guest write of part of an empty cluster would leave the rest
 * of the cluster reading zeros where the layers below hold data, so whole
 * clusters are copied, as QEMU rounds its copies to the target's
 * cluster. */
static uint64_t
piece_size (struct commit *c)
{
  struct strata_info info = { .size = sizeof info };
  strata_error *err = NULL;

  if (!c->mirror || (c->scan && !c->scan_base) || c->base->backing
      || !c->base->drv->get_info)
    return ACTIVE_GRANULARITY;
  if (!c->base->drv->get_info (c->base, &info, &err)) {
    strata_error_free (err);
    return ACTIVE_GRANULARITY;
  }
  /* qcow2 checked the cluster size at open: a power of two, 512 B to
   * 2 MiB. */
  return MAX ((uint64_t)info.cluster_size, (uint64_t)ACTIVE_GRANULARITY);
}

static int
active_run (struct job *job, struct commit *c, uint64_t len)
{
  uint64_t copied = 0;
  int r;

  c->piece = piece_size (c);
  if (!copies_init (c))
    return -ENOMEM;
  if (!(c->dirty = dirty_new (len, c->piece)))
    return -ENOMEM;
  if (c->write_blocking)
    dirty_set_sync (c->dirty, active_sync, c);
  if (!node_dirty_attach (c->top, c->dirty))
    return -ENOMEM;
  if ((r = mark_allocated (c, len)) < 0)
    return r;
  r = active_loop (job, c, &copied);
  drain_copies (job, c, &copied);
  if (c->wq)
    workqueue_free (c->wq);
  c->wq = NULL;
  return r;
}

/* job-complete: READY (the framework checked), so the run ends for a
 * pivot at its next look. */
static bool
commit_complete (struct job *job, strata_error **errp)
{
  struct commit *c = job->opaque;

  (void)errp;
  atomic_store (&c->should_complete, true);
  job_wake_job_locked (job);
  return true;
}

/* Pivot or not, then let TOP's requests go (graph lock held). */
static void
active_end_graph_locked (struct commit *c, bool pivot)
{
  if (c->dirty)
    node_dirty_detach (c->top, c->dirty);
  if (pivot && c->target_backing && !c->base->backing) {
    strata_error *e = NULL;

    node_ref (c->target_backing);
    if (!node_attach_child (c->base, "backing", c->target_backing, &e)) {
      node_unref (c->target_backing);
      strata_error_free (e);
    }
  }
  if (pivot) {
    /* TOP stays the target's backing after a sync=none drive-mirror, so
     * its reads cannot forward to it; the writes its users sent while the
     * gate held them must still land in the target, not under it. */
    if (c->target_backing != c->top)
      node_forward_to (c->top, c->base);
    else
      node_forward_writes_to (c->top, c->base);
    graph_replace_users (c->top, c->base);
  }
  release_gate (c);
}

static int
commit_run (struct job *job)
{
  struct commit *c = job->opaque;
  CLEANUP_FREE uint8_t *buf = NULL;
  int64_t len;
  uint64_t offset = 0;
  int r;

  if ((len = node_length (c->top)) < 0)
    return len;
  if (c->mirror) {
    if (node_length (c->base) != len) {
      job_set_error (job, "Source and target image have different sizes");
      return -EINVAL;
    }
  }
  else if ((r = grow_base (job, c, len)) < 0)
    return r;
  if (c->active)
    return active_run (job, c, len);
  job_set_progress (job, 0, len);
  if (!(buf = malloc (COMMIT_CHUNK)))
    return -ENOMEM;
  while (offset < (uint64_t)len) {
    uint64_t n = MIN (COMMIT_CHUNK, (uint64_t)len - offset), start;
    bool copy, is_read = true;

    if (!job_yield (job))
      return -ECANCELED;
    r = chain_allocated_above (c->top, c->base, offset, &n, &copy);
    if (r == 0 && copy) {
      start = clock_now_ns ();
      r = node_pread (c->top, offset, buf, n, 0);
      if (r >= 0) {
        is_read = false;
        r = node_pwrite (c->base, offset, buf, n, 0);
      }
      if (r >= 0)
        job_account (job, n, start);
    }
    if (r < 0) {
      if (job_io_error (job, r, is_read) == JOB_ON_ERROR_REPORT)
        return r;
      continue; /* stop (resumed) or ignore: this chunk again */
    }
    offset += n;
    job_set_progress (job, offset, len);
  }
  return node_flush (c->base);
}

/* BASE read-only again if the job made it writable; graph lock held (or
 * the control thread's own, for a job that never started). */
static void
restore_read_only_graph_locked (struct commit *c)
{
  if (c->restore_ro)
    strata_reopen (c->base, false, 0, NULL);
  c->restore_ro = false;
}

/* Drop the job's filter node, first in prepare or abort as QEMU drops it
 * (or in clean, for a job that never ran). */
static void
drop_filter_graph_locked (struct job *job, struct commit *c)
{
  if (!c->filter)
    return;
  job_drop_node (job, c->filter);
  node_unref (c->filter);
  c->filter = NULL;
}

/* Rewrite OVERLAY's header, then move the graph edge: its backing becomes
 * BASE.  The old backing keeps a reference until clean, after the requests
 * that may still read through it have drained. */
static int
commit_prepare (struct job *job)
{
  struct commit *c = job->opaque;
  strata_error *e = NULL;
  const char *name = c->backing_file ? c->backing_file : c->base->filename;
  int r = 0;

  graph_lock ();
  drop_filter_graph_locked (job, c);
  if (c->active) {
    /* BASE stays writable, as QEMU leaves it: after a pivot it is the
     * device's active layer. */
    c->restore_ro = false;
    active_end_graph_locked (c, c->pivot);
    goto out;
  }
  if (!node_change_backing_file (c->overlay, name, c->base->drv->name, &e)) {
    job_set_error (job, "%s", error_text (e));
    strata_error_free (e);
    r = -EIO;
    goto out;
  }
  tracker_wait_idle (&c->overlay->tracker, 0, 0);
  c->old_backing = c->overlay->backing;
  if (c->old_backing)
    node_ref (c->old_backing);
  node_detach_child (c->overlay, "backing");
  node_ref (c->base);
  if (!node_attach_child (c->overlay, "backing", c->base, &e)) {
    node_unref (c->base);
    job_set_error (job, "%s", error_text (e));
    strata_error_free (e);
    r = -EIO;
  }
out:
  restore_read_only_graph_locked (c);
  graph_unlock ();
  return r;
}

static void
commit_abort (struct job *job)
{
  struct commit *c = job->opaque;

  graph_lock ();
  drop_filter_graph_locked (job, c);
  if (c->active)
    active_end_graph_locked (c, false);
  restore_read_only_graph_locked (c);
  graph_unlock ();
}

static void
commit_clean (struct job *job)
{
  struct commit *c = job->opaque;

  if (!c)
    return;
  /* Prepare or abort did it, under the graph lock, unless the job never
   * started: then the control thread holds it. */
  restore_read_only_graph_locked (c);
  drop_filter_graph_locked (job, c);
  if (c->old_backing) {
    tracker_wait_idle (&c->overlay->tracker, 0, 0);
    node_unref (c->old_backing);
  }
  if (c->dirty) {
    node_dirty_detach (c->top, c->dirty); /* if the job never ran */
    dirty_free (c->dirty);
  }
  release_gate (c);
  tracker_destroy (&c->ranges);
  for (unsigned i = 0; c->ops && i < c->nops; i++)
    free (c->ops[i].buf);
  free (c->ops);
  pthread_mutex_destroy (&c->lock);
  pthread_cond_destroy (&c->done_cond);
  node_unref (c->top);
  node_unref (c->base);
  if (c->overlay)
    node_unref (c->overlay);
  if (c->target_backing)
    node_unref (c->target_backing);
  free (c->backing_file);
  free (c);
  job->opaque = NULL;
}

static const struct job_driver commit_driver = {
  .type = "commit",
  .run = commit_run,
  .prepare = commit_prepare,
  .abort = commit_abort,
  .clean = commit_clean,
  .complete = commit_complete,
  .soft_cancel = true,
};

static const struct job_driver mirror_driver = {
  .type = "mirror",
  .run = commit_run,
  .prepare = commit_prepare,
  .abort = commit_abort,
  .clean = commit_clean,
  .complete = commit_complete,
  .soft_cancel = true,
};

static struct commit *
commit_new (const struct commit_params *p)
{
  struct commit *c = calloc (1, sizeof *c);

  if (!c)
    return NULL;
  if (p->backing_file && !(c->backing_file = strdup (p->backing_file))) {
    free (c);
    return NULL;
  }
  node_ref (c->top = p->top);
  node_ref (c->base = p->base);
  if ((c->overlay = p->overlay))
    node_ref (c->overlay);
  c->active = p->active;
  c->scan = true;
  c->scan_base = p->base;
  tracker_init (&c->ranges);
  pthread_mutex_init (&c->lock, NULL);
  pthread_cond_init (&c->done_cond, NULL);
  c->on_target_error = p->on_error;
  return c;
}

/* The filter node QEMU puts over OVER for the job's life (DRIVER
 * mirror_top, read-write, or commit_top, read-only), named NAME or
 * automatically: a new reference, or NULL with QEMU's error (a name
 * taken or malformed). */
static strata_node *
open_job_filter (const char *driver, strata_node *over, const char *name,
                 strata_error **errp)
{
  strata_opts *opts = opts_new ();
  unsigned flags = strcmp (driver, "mirror_top") == 0 ? STRATA_OPEN_RDWR : 0;
  strata_node *f = NULL;

  if (opts && opts_set (opts, "driver", driver)
      && opts_set (opts, "file", over->node_name)
      && (!name || opts_set (opts, "node-name", name)))
    f = node_open (opts, flags, errp);
  else
    error_set (errp, ENOMEM, "out of memory");
  opts_free (opts);
  return f;
}

/* FILTER becomes the job's: C keeps the reference, the job holds it. */
static bool
hold_filter (struct job *job, struct commit *c, strata_node *filter)
{
  c->filter = filter;
  if (!job_add_node (job, filter))
    return false;
  job->filter = filter;
  return true;
}

/* In QEMU's order: an active commit's filter; the job (its ID, then its
 * speed), BASE made writable, an intermediate commit's filter; the nodes
 * it holds: the device, TOP down to BASE. */
bool
commit_start_job_locked (const struct commit_params *p, strata_error **errp)
{
  struct job *job;
  struct commit *c;
  strata_node *filter = NULL;
  bool made_rw, ok = true;

  if (p->active
      && !(filter = open_job_filter ("mirror_top", p->device,
                                     p->filter_node_name, errp)))
    return false;
  job = job_create_job_locked (p->job_id, &commit_driver, p->speed,
                               p->auto_finalize, p->auto_dismiss, p->on_error,
                               errp);
  if (!job) {
    if (filter)
      node_unref (filter);
    return false;
  }
  if (!job_make_writable (p->base, &made_rw, errp)) {
    if (filter)
      node_unref (filter);
    job_discard_job_locked (job);
    return false;
  }
  if (!(c = commit_new (p))) {
    error_set (errp, ENOMEM, "out of memory");
    if (filter)
      node_unref (filter);
    if (made_rw)
      strata_reopen (p->base, false, 0, NULL);
    job_discard_job_locked (job);
    return false;
  }
  /* From here the job's clean restores BASE and drops the filter. */
  c->restore_ro = made_rw;
  job->opaque = c;
  if (!p->active
      && !(filter = open_job_filter ("commit_top", p->top, p->filter_node_name,
                                     errp))) {
    job_discard_job_locked (job);
    return false;
  }
  if (!hold_filter (job, c, filter)) {
    error_set (errp, ENOMEM, "out of memory");
    job_discard_job_locked (job);
    return false;
  }
  if (!p->active) {
    int64_t len = node_length (p->top);
    job->len = len > 0 ? len : 0;
  }
  ok = job_add_node (job, p->device)
       && (p->top == p->device || job_add_backend (job, p->top));
  for (strata_node *n = chain_next (p->top); ok && n && n != p->base;
       n = chain_next (n))
    ok = job_add_node (job, n);
  if (ok)
    ok = job_add_backend (job, p->base);
  if (!ok) {
    error_set (errp, ENOMEM, "out of memory");
    job_discard_job_locked (job);
    return false;
  }
  return job_start_job_locked (job, errp);
}

/* ---- blockdev-mirror: the active engine with any target ---- */

bool
mirror_start_job_locked (const struct mirror_params *p, strata_error **errp)
{
  struct commit_params cp = { .top = p->source, .base = p->target };
  struct job *job;
  struct commit *c;
  strata_node *filter;

  if (!(filter = open_job_filter ("mirror_top", p->device, p->filter_node_name,
                                  errp)))
    return false;
  job = job_create_job_locked (p->job_id, &mirror_driver, p->speed,
                               p->auto_finalize, p->auto_dismiss,
                               p->on_source_error, errp);
  if (!job) {
    node_unref (filter);
    return false;
  }
  if (!(c = commit_new (&cp))) {
    error_set (errp, ENOMEM, "out of memory");
    node_unref (filter);
    job_discard_job_locked (job);
    return false;
  }
  c->active = c->mirror = true;
  c->scan = p->sync != MIRROR_SYNC_NONE;
  c->scan_base = p->sync == MIRROR_SYNC_TOP ? chain_backing (p->source) : NULL;
  c->on_target_error = p->on_target_error;
  c->write_blocking = p->write_blocking;
  if ((c->target_backing = p->target_backing))
    node_ref (c->target_backing);
  c->buf_size = p->buf_size;
  job->opaque = c;
  if (!hold_filter (job, c, filter) || !job_add_node (job, p->device)
      || (p->source != p->device && !job_add_node (job, p->source))
      || !job_add_backend (job, p->target)) {
    error_set (errp, ENOMEM, "out of memory");
    job_discard_job_locked (job);
    return false;
  }
  return job_start_job_locked (job, errp);
}
