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
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "block/chain.h"
#include "block/graph.h"
#include "jobs/commit.h"
#include "jobs/job.h"
#include "util/checked.h"
#include "util/cleanup.h"
#include "util/clock.h"

#define COMMIT_CHUNK (512 * 1024) /* QEMU's COMMIT_BUFFER_SIZE */

struct commit {
  strata_node *top, *base, *overlay; /* references */
  char *backing_file;                /* the backing-file argument, or NULL */
  bool restore_ro;                   /* BASE was read-only: made so again */
  strata_node *old_backing; /* OVERLAY's old backing, kept until clean */
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
  job_set_progress (job, 0, len);
  if ((r = grow_base (job, c, len)) < 0)
    return r;
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
  graph_lock ();
  restore_read_only_graph_locked (job->opaque);
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
  if (c->old_backing) {
    tracker_wait_idle (&c->overlay->tracker, 0, 0);
    node_unref (c->old_backing);
  }
  node_unref (c->top);
  node_unref (c->base);
  node_unref (c->overlay);
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
  node_ref (c->overlay = p->overlay);
  return c;
}

/* In QEMU's order: the job (its ID, then its speed), BASE made writable,
 * the nodes it holds: the device, TOP down to BASE. */
bool
commit_start_job_locked (const struct commit_params *p, strata_error **errp)
{
  struct job *job;
  struct commit *c;
  bool made_rw, ok = true;

  job = job_create_job_locked (p->job_id, &commit_driver, p->speed,
                               p->auto_finalize, p->auto_dismiss, p->on_error,
                               errp);
  if (!job)
    return false;
  if (!job_make_writable (p->base, &made_rw, errp)) {
    job_discard_job_locked (job);
    return false;
  }
  if (!(c = commit_new (p))) {
    error_set (errp, ENOMEM, "out of memory");
    if (made_rw)
      strata_reopen (p->base, false, 0, NULL);
    job_discard_job_locked (job);
    return false;
  }
  /* From here the job's clean restores BASE. */
  c->restore_ro = made_rw;
  job->opaque = c;
  {
    int64_t len = node_length (p->top);
    job->len = len > 0 ? len : 0;
  }
  ok = job_add_node (job, p->device) && job_add_backend (job, p->top);
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
