/* strata: running NBD requests on the export's node (proto.md "Request
 * types", "Metadata querying" and "base:allocation metadata context"),
 * on the work queue's threads, and handing them to the work queue.
 *
 * Choices:
 * - A structured READ larger than NBD_SPARSE_MIN sends what the format
 *   knows to be zero as OFFSET_HOLE chunks (one chunk per run of data or
 *   zeros, at most NBD_MAX_EXTENTS, the rest one data chunk); a smaller
 *   or DF read is one data chunk, zeros included.
 * - BLOCK_STATUS answers base:allocation and qemu:allocation-depth from
 *   strata_block_status() (STRATA_BS_SHALLOW: a format's data clusters
 *   are not checked for holes in the file under them, as QEMU does not).
 * - FAST_ZERO: we cannot know whether the driver zeroes fast, so a
 *   FAST_ZERO request succeeds only when the range already reads as zero
 *   (nothing to do); otherwise ENOTSUP and the client falls back.
 * - detect-zeroes turns an all-zero WRITE into WRITE_ZEROES.
 *
 * Hand-over: waking a worker costs more than a short request, so while
 * a connection's reads, or its writes, are short (their average run time
 * at most NBD_INLINE_NS: page-cache I/O, a write in place) its reader
 * runs them itself, holding their replies back to send them together
 * (reply_queue's DEFER): no thread is woken and one sendmsg carries many
 * replies.  Allocating writes (a 64 KiB cluster read from the backing
 * file and written whole, 30-100 us) are not short: run by the reader
 * they would all run on one thread, which on a busy machine gets one
 * thread's share of the CPUs, and on an idle one only one of them.  Other
 * requests, and every request once they have turned slow (disk, a remote
 * backing file), go to the work queue: the reader batches them
 * (request_submit) and hands each batch over with one lock
 * (request_submit_batch); see there for how many workers a batch wakes.
 * A connection starts with its average at twice NBD_SLOW_REQUEST_NS, so
 * its requests go to workers until they have proved short.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "nbd/internal.h"
#include "nbd/protocol.h"
#include "util/bytes.h"

/* Extents of [OFFSET, OFFSET+LEN) into EXT[], at most MAX; returns how
 * many, or a negative errno.  They may cover less than LEN. */
static int
get_extents (strata_node *node, uint64_t offset, uint64_t len,
             struct strata_extent *ext, int max, unsigned flags)
{
  int n = 0;
  while (len > 0 && n < max) {
    int r;

    ext[n].size = sizeof ext[n];
    r = strata_block_status (node, offset, len, &ext[n], flags);
    if (r < 0)
      return r;
    if (ext[n].length == 0 || ext[n].length > len)
      return -EIO;
    offset += ext[n].length;
    len -= ext[n].length;
    n++;
  }
  return n;
}

static struct reply *
do_read (struct conn *c, struct nbd_request *req)
{
  strata_node *node = c->exp->node;
  struct strata_extent *ext;
  struct reply *r;
  uint64_t off = req->offset;
  unsigned char *p;
  int n, err;

  if (!c->structured) {
    r = reply_simple (req->cookie, 0, req->len);
    if (!r)
      return NULL;
    err = strata_pread (node, r->data + 16, req->len, req->offset, 0);
    if (err < 0) {
      free (r);
      return reply_simple (req->cookie, -err, 0);
    }
    return r;
  }

  /* Structured: a hole chunk per zero extent, a data chunk per run of
   * other extents, the last one flagged DONE.  Past NBD_MAX_EXTENTS the
   * rest is one data chunk.  A small read is one data chunk: looking for
   * holes would cost more than sending its zeros.  So is a DF read. */
  struct strata_extent one = { .size = sizeof one };

  if (req->len <= NBD_SPARSE_MIN || (req->flags & NBD_CMD_FLAG_DF)) {
    ext = &one; /* filled in below: the whole read is data */
    n = 0;
  }
  else if (!(ext = malloc (sizeof *ext * (NBD_MAX_EXTENTS + 1))))
    return NULL;
  else {
    /* What a format knows to be zero becomes a hole chunk; its data
     * clusters are not checked for holes in the file (lseek per cluster
     * costs more than it saves), as QEMU does not. */
    n = get_extents (node, req->offset, req->len, ext, NBD_MAX_EXTENTS,
                     STRATA_BS_SHALLOW);
    if (n < 0) {
      if (ext != &one)
        free (ext);
      return reply_error (c, req, -n);
    }
  }
  {
    uint64_t covered = 0;
    int m = 0;
    for (int i = 0; i < n; i++) {
      covered += ext[i].length;
      /* Merge runs of the same kind: one pread for data at any depth. */
      if (m > 0
          && !(ext[m - 1].flags & STRATA_BS_ZERO)
                 == !(ext[i].flags & STRATA_BS_ZERO))
        ext[m - 1].length += ext[i].length;
      else
        ext[m++] = ext[i];
    }
    n = m;
    if (covered < req->len) {
      if (n > 0 && !(ext[n - 1].flags & STRATA_BS_ZERO))
        ext[n - 1].length += req->len - covered;
      else
        ext[n++] = (struct strata_extent){ .length = req->len - covered };
    }
  }
  r = reply_new ((size_t)req->len + (size_t)n * 32);
  if (!r) {
    if (ext != &one)
      free (ext);
    return NULL;
  }
  p = r->data;
  for (int i = 0; i < n; i++) {
    uint64_t l = ext[i].length;
    uint16_t done = i == n - 1 ? NBD_REPLY_FLAG_DONE : 0;
    if (ext[i].flags & STRATA_BS_ZERO) {
      reply_chunk_header (p, done, NBD_REPLY_TYPE_OFFSET_HOLE, req->cookie,
                          12);
      be64_store (p + 20, off);
      be32_store (p + 28, (uint32_t)l);
      p += 32;
    }
    else {
      reply_chunk_header (p, done, NBD_REPLY_TYPE_OFFSET_DATA, req->cookie,
                          (uint32_t)(8 + l));
      be64_store (p + 20, off);
      err = strata_pread (node, p + 28, l, off, 0);
      if (err < 0) {
        free (r);
        if (ext != &one)
          free (ext);
        return reply_error (c, req, -err);
      }
      p += 28 + l;
    }
    off += l;
  }
  if (ext != &one)
    free (ext);
  r->len = (size_t)(p - r->data);
  return r;
}

static uint32_t
depth_value (const struct strata_extent *e)
{
  return (e->flags & STRATA_BS_ALLOCATED) ? (uint32_t)e->depth + 1 : 0;
}

static uint32_t
base_value (const struct strata_extent *e)
{
  return ((e->flags & STRATA_BS_DATA) ? 0 : NBD_STATE_HOLE)
         | ((e->flags & STRATA_BS_ZERO) ? NBD_STATE_ZERO : 0);
}

/* One BLOCK_STATUS chunk for context ID, merging neighbours with equal
 * values; appended at P.  Returns the bytes written. */
static size_t
status_chunk (unsigned char *p, uint64_t cookie, uint32_t id,
              const struct strata_extent *ext, int n, bool done,
              uint32_t (*value) (const struct strata_extent *))
{
  unsigned char *d = p + 24;
  int nd = 0;
  for (int i = 0; i < n; i++) {
    uint32_t v = value (&ext[i]);
    if (nd > 0 && be32_load (d - 4) == v) {
      be32_store (d - 8, be32_load (d - 8) + (uint32_t)ext[i].length);
      continue;
    }
    be32_store (d, (uint32_t)ext[i].length);
    be32_store (d + 4, v);
    d += 8;
    nd++;
  }
  reply_chunk_header (p, done ? NBD_REPLY_FLAG_DONE : 0,
                      NBD_REPLY_TYPE_BLOCK_STATUS, cookie,
                      (uint32_t)(4 + 8 * nd));
  be32_store (p + 20, id);
  return (size_t)(d - p);
}

static struct reply *
do_block_status (struct conn *c, struct nbd_request *req)
{
  struct strata_extent *ext;
  struct reply *r;
  int max = (req->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : NBD_MAX_EXTENTS;
  int n;
  size_t len = 0;

  ext = malloc (sizeof *ext * NBD_MAX_EXTENTS);
  if (!ext)
    return NULL;
  n = get_extents (c->exp->node, req->offset, req->len, ext, max,
                   STRATA_BS_SHALLOW);
  if (n <= 0) {
    free (ext);
    return reply_error (c, req, n < 0 ? -n : EIO);
  }
  r = reply_new (2 * (24 + (size_t)n * 8));
  if (r) {
    if (c->ctx_base)
      len += status_chunk (r->data, req->cookie, CTX_BASE_ALLOCATION, ext, n,
                           !c->ctx_depth, base_value);
    if (c->ctx_depth)
      len += status_chunk (r->data + len, req->cookie, CTX_ALLOCATION_DEPTH,
                           ext, n, true, depth_value);
    r->len = len;
  }
  free (ext);
  return r;
}

static bool
buffer_is_zero (const unsigned char *p, size_t len)
{
  /* First bytes, then the rest against itself shifted by 16. */
  static const unsigned char zero[16];
  if (len < 16)
    return len == 0 || (p[0] == 0 && memcmp (p, p + 1, len - 1) == 0);
  return memcmp (p, zero, 16) == 0 && memcmp (p, p + 16, len - 16) == 0;
}

/* FAST_ZERO: fast only when there is nothing to do. */
static int
fast_zero (strata_node *node, uint64_t offset, uint64_t len)
{
  while (len > 0) {
    struct strata_extent e = { .size = sizeof e };
    int r = strata_block_status (node, offset, len, &e, 0);
    if (r < 0)
      return r;
    if (!(e.flags & STRATA_BS_ZERO) || e.length == 0 || e.length > len)
      return -ENOTSUP;
    offset += e.length;
    len -= e.length;
  }
  return 0;
}

static struct reply *
request_run (struct conn *c, struct nbd_request *req)
{
  struct nbd_export *e = c->exp;
  unsigned fua = ((req->flags & NBD_CMD_FLAG_FUA) || e->flags.writethrough)
                     ? STRATA_REQ_FUA
                     : 0;
  int r = 0;

  switch (req->type) {
  case NBD_CMD_READ: return do_read (c, req);
  case NBD_CMD_BLOCK_STATUS: return do_block_status (c, req);
  case NBD_CMD_WRITE:
    if (e->flags.detect_zeroes != ZEROES_OFF
        && buffer_is_zero (req->payload, req->len))
      r = strata_pwrite_zeroes (e->node, req->offset, req->len,
                                fua
                                    | (e->flags.detect_zeroes == ZEROES_UNMAP
                                           ? STRATA_REQ_MAY_UNMAP
                                           : 0));
    else
      r = strata_pwrite (e->node, req->payload, req->len, req->offset, fua);
    break;
  case NBD_CMD_FLUSH: r = strata_flush (e->node, 0); break;
  case NBD_CMD_TRIM:
    if (e->flags.discard)
      r = strata_pdiscard (e->node, req->offset, req->len, 0);
    if (r == 0 && fua)
      r = strata_flush (e->node, 0);
    break;
  case NBD_CMD_WRITE_ZEROES:
    if (req->flags & NBD_CMD_FLAG_FAST_ZERO)
      r = fast_zero (e->node, req->offset, req->len);
    else
      r = strata_pwrite_zeroes (
          e->node, req->offset, req->len,
          fua
              | ((e->flags.discard && !(req->flags & NBD_CMD_FLAG_NO_HOLE))
                     ? STRATA_REQ_MAY_UNMAP
                     : 0));
    break;
  case NBD_CMD_CACHE:
    r = strata_prefetch (e->node, req->offset, req->len, 0);
    break;
  default: r = -EINVAL;
  }
  return reply_simple (req->cookie, r < 0 ? -r : 0, 0);
}

/* The average run time of C's requests of TYPE (see struct conn). */
static uint64_t *
conn_avg (struct conn *c, uint16_t type)
{
  return &c->avg_ns[type == NBD_CMD_WRITE];
}

/* Run REQ, queue its reply (with the budget it took), free it, and add
 * its run time to the connection's average for its type.  DEFER: see
 * reply_queue. */
static void
request_finish (struct nbd_request *req, bool defer)
{
  struct conn *c = req->conn;
  uint64_t *avgp = conn_avg (c, req->type);
  uint64_t t0 = clock_now_ns (), avg, took;
  struct reply *r = request_run (c, req);

  took = clock_now_ns () - t0;
  /* Several threads may add a sample at once; one may be lost. */
  avg = __atomic_load_n (avgp, __ATOMIC_RELAXED);
  __atomic_store_n (avgp, avg - avg / 8 + took / 8, __ATOMIC_RELAXED);
  reply_queue (c, r, req->cost, defer);
  free (req->payload);
  free (req);
}

/* The work queue runs this on a worker. */
static void
request_run_item (struct workqueue_item *item)
{
  request_finish ((struct nbd_request *)item, false);
}

/* Hand the connection's parsed requests to the work queue: one lock for
 * the lot.  The queue is shared: a request waits at most for the running
 * requests ahead of it; one that blocks for long wakes workers for the
 * requests queued behind it and turns later batches parallel (the work
 * queue's average). */
void
request_submit_batch (struct conn *c)
{
  struct workqueue *pool = c->srv->pool;
  uint64_t avg = workqueue_avg_ns (pool);
  unsigned wake;

  reply_send_deferred (c);
  if (!c->batch)
    return;
  /* Waking a worker costs more than a short request: while requests are
   * short (page-cache I/O), one worker runs a batch's worth of about
   * NBD_SLOW_REQUEST_NS, and the reader and that worker keep two cores
   * busy with no hand-over per request.  A batch of middling requests
   * (allocating writes: a cluster read from the backing file and written
   * back, ~100 us) gets as many workers as it holds such slices, so the
   * cores share it instead of one worker running it all in turn.  A
   * request that may block (flush, big transfer) gets a worker of its
   * own, and once requests take long (disk, remote backing file) every
   * request does. */
  if (avg > NBD_SLOW_REQUEST_NS)
    wake = c->nbatch;
  else {
    wake = 1 + c->nheavy + (unsigned)(c->nbatch * avg / NBD_SLOW_REQUEST_NS);
    if (wake > c->nbatch)
      wake = c->nbatch;
  }
  workqueue_submit (pool, c->batch, c->batch_tail, c->nbatch, wake);
  c->batch = c->batch_tail = NULL;
  c->nbatch = c->nheavy = 0;
}

/* The reader is about to wait for its client with one request parsed and
 * none behind it: the client keeps few requests in flight, so nothing
 * overlaps with it and a worker would only add its wake-up (two futex
 * calls and, on a busy machine, a wait for a core) to its latency.  While
 * the connection's requests are not slow (allocating writes: ~100 us)
 * and none may block (flush, big transfer, remote node), the reader runs
 * it itself. */
void
request_run_lone (struct conn *c)
{
  struct nbd_request *req = (struct nbd_request *)c->batch;

  if (c->nbatch != 1 || c->nheavy || !c->local
      || (req->type != NBD_CMD_READ && req->type != NBD_CMD_WRITE)
      || __atomic_load_n (conn_avg (c, req->type), __ATOMIC_RELAXED)
             > NBD_SLOW_REQUEST_NS)
    return;
  c->batch = c->batch_tail = NULL;
  c->nbatch = 0;
  request_finish (req, true);
}

/* Whether the reader runs REQ itself: a short read or write of an export
 * with no remote node under it, while this connection's requests of its
 * type have been short (page-cache I/O), and no batch waits for workers
 * (it would wait behind it). */
static bool
request_inline (struct conn *c, const struct nbd_request *req)
{
  return c->local && (req->type == NBD_CMD_READ || req->type == NBD_CMD_WRITE)
         && req->len < NBD_HEAVY_LEN && !c->batch
         && __atomic_load_n (conn_avg (c, req->type), __ATOMIC_RELAXED)
                <= NBD_INLINE_NS;
}

void
request_submit (struct conn *c, struct nbd_request *req)
{
  if (request_inline (c, req)) {
    request_finish (req, true);
    return;
  }
  req->item.next = NULL;
  req->item.run = request_run_item;
  if (c->batch_tail)
    c->batch_tail->next = &req->item;
  else
    c->batch = &req->item;
  c->batch_tail = &req->item;
  if (req->type == NBD_CMD_FLUSH || req->len >= NBD_HEAVY_LEN)
    c->nheavy++;
  if (++c->nbatch == NBD_BATCH)
    request_submit_batch (c);
}
