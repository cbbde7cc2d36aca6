/* strata: qcow2 compressed clusters (qcow2.txt "Compressed Clusters
 * Descriptor", header byte 104 compression_type).
 *
 * A compressed cluster is a stream that decompresses to exactly one
 * cluster: raw deflate (no zlib header, 4 KiB window or larger) for
 * compression_type 0, a zstd frame for type 1.  The stored length is
 * rounded up to 512-byte sectors, so input may carry trailing bytes that
 * belong to nothing (or to the next compressed cluster); decompression
 * stops when the cluster is full.  The input is untrusted: a stream that
 * ends early or fails to decode is EIO, never a short cluster.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include "drivers/qcow2/qcow2.h"
#include "util/checked.h"
#include "util/cleanup.h"
#include "util/workqueue.h"

static int
inflate_raw (const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen)
{
  z_stream z = { 0 };
  int r;

  if (inflateInit2 (&z, -15) != Z_OK)
    return -ENOMEM;
  z.next_in = (Bytef *)in;
  z.avail_in = inlen;
  z.next_out = out;
  z.avail_out = outlen;
  r = inflate (&z, Z_FINISH);
  inflateEnd (&z);
  /* Z_BUF_ERROR with a full output: the padding was not consumed. */
  if ((r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK) && z.avail_out == 0)
    return 0;
  return -EIO;
}

static int
unzstd (const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen)
{
  ZSTD_DStream *d = ZSTD_createDStream ();
  ZSTD_inBuffer ib = { in, inlen, 0 };
  ZSTD_outBuffer ob = { out, outlen, 0 };
  int r = -EIO;

  if (!d)
    return -ENOMEM;
  while (ob.pos < ob.size && ib.pos < ib.size) {
    size_t ret = ZSTD_decompressStream (d, &ob, &ib);
    if (ZSTD_isError (ret))
      break;
    if (ret == 0) /* end of frame */
      break;
  }
  if (ob.pos == ob.size)
    r = 0;
  ZSTD_freeDStream (d);
  return r;
}

int
qcow2_decompress (strata_node *node, uint64_t coffset, uint64_t csize,
                  uint8_t *out)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE uint8_t *in = NULL;
  uint64_t avail;
  int64_t flen = node_length (node->file);
  int r;

  /* A cluster never needs more than its size plus a sector of overhead;
   * bound the input so a hostile descriptor cannot demand gigabytes. */
  if (csize > 2 * s->cluster_size + 512)
    return io_error (EIO,
                     "%s: compressed cluster at 0x%" PRIx64 " length %" PRIu64
                     " is too large",
                     node->filename, coffset, csize);
  if (flen < 0)
    return (int)flen;
  avail = coffset < (uint64_t)flen ? (uint64_t)flen - coffset : 0;
  csize = MIN (csize, avail);
  if (csize == 0 || !(in = malloc (csize)))
    return csize ? -ENOMEM
                 : io_error (EIO,
                             "%s: compressed cluster at 0x%" PRIx64
                             " is past the end of the file",
                             node->filename, coffset);
  if ((r = node_pread (node->file, coffset, in, csize, 0)) < 0)
    return r;
  r = s->compression == QCOW2_COMP_ZSTD
          ? unzstd (in, csize, out, s->cluster_size)
          : inflate_raw (in, csize, out, s->cluster_size);
  if (r == -EIO)
    return io_error (EIO,
                     "%s: compressed cluster at 0x%" PRIx64 " (%" PRIu64
                     " bytes, %s) does not decompress to a cluster",
                     node->filename, coffset, csize,
                     s->compression == QCOW2_COMP_ZSTD ? "zstd" : "zlib");
  return r;
}

/* ---- compressed writes (qemu-img convert -c, qemu-io write -c) ----
 *
 * Each guest cluster is compressed on its own (raw deflate or a zstd
 * frame); when that does not save space it is written normally.  A request
 * is taken a window of clusters at a time (at most COMPRESS_WINDOW bytes,
 * so memory stays bounded whatever its length):
 *
 *   compress  the window's clusters on every CPU (the caller's thread and
 *             the node's compressor threads taking clusters from a queue
 *             of windows), no lock held while compressing;
 *   store     in guest order, under a serialising tracker entry: for each
 *             cluster its L2 table (first, as QEMU allocates them), then
 *             its bytes, packed back to back into host clusters
 *             (qcow2.txt: "Some of these sectors may reside in the next
 *             contiguous host cluster"), one write per contiguous run.
 *
 * Packing: the bytes continue where the last compressed cluster ended.
 * The host cluster holding them gets one reference per compressed cluster
 * that touches it, so a cluster that runs on into the next host cluster
 * references both, as qemu-img check counts them.  Running on needs the
 * next host cluster free; otherwise (or when the partly used one's
 * refcount is at its maximum) a new host cluster starts and the tail of
 * the old one stays unused.
 *
 * Threads: the node's compressor threads (compress_pool, a work queue of
 * util/workqueue.c) start at its first compressed write and stop at
 * close; a window queues one item per thread, and each item, like the
 * caller, takes clusters until none is left.  Locks: node->lock guards
 * placement; the pool lock (a leaf, taken under node->lock only while the
 * pool starts) guards the kept caller buffers and compressors and the
 * count of a window's items that have ended.
 *
 * Order: the refcounts and L2 entries stay dirty in the cache like an
 * allocating write's (io.c, cache.c: refcounts, flush, L2 tables), so a
 * crash leaks at worst; only when a cluster replaces an allocated one are
 * they written back and flushed before the old mapping is dropped.
 */

#define COMPRESS_WINDOW (2u << 20)
#define COMPRESS_WINDOW_MAX 256 /* clusters */
#define COMPRESS_IOV_MAX 64     /* buffers per write, as file.c takes */
#define COMPRESS_THREADS_MAX 16
#define COMPRESS_SLOW_NS 1000000 /* about a 64 KiB cluster's deflate */

/* A reusable compressor for one thread; NEXT links the pool's idle ones. */
struct compressor {
  const struct qcow2_state *s;
  z_stream z;
  bool z_ready;
  ZSTD_CCtx *zc;
  struct compressor *next;
};

static void
compressor_end (struct compressor *c)
{
  if (c->z_ready)
    deflateEnd (&c->z);
  ZSTD_freeCCtx (c->zc);
}

/* Compress the cluster in IN; returns the compressed length, or 0 when it
 * does not fit in LIMIT bytes, or a negative errno. */
static ssize_t
compress_cluster (struct compressor *c, const uint8_t *in, uint8_t *out,
                  size_t limit)
{
  const struct qcow2_state *s = c->s;
  int r;

  if (s->compression == QCOW2_COMP_ZSTD) {
    size_t n;
    if (!c->zc && !(c->zc = ZSTD_createCCtx ()))
      return -ENOMEM;
    n = ZSTD_compressCCtx (c->zc, out, limit, in, s->cluster_size, 3);
    return ZSTD_isError (n) ? 0 : (ssize_t)n;
  }
  /* Raw deflate with a 4 KiB window, which every reader accepts. */
  if (!c->z_ready) {
    if (deflateInit2 (&c->z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
                      Z_DEFAULT_STRATEGY)
        != Z_OK)
      return -ENOMEM;
    c->z_ready = true;
  }
  else if (deflateReset (&c->z) != Z_OK)
    return -EIO;
  c->z.next_in = (Bytef *)in;
  c->z.avail_in = s->cluster_size;
  c->z.next_out = out;
  c->z.avail_out = limit;
  r = deflate (&c->z, Z_FINISH);
  return r == Z_STREAM_END ? (ssize_t)(limit - c->z.avail_out) : 0;
}

struct window;

/* One of a window's work items: a pool thread that runs it takes the
 * window's clusters until none is left. */
struct window_item {
  struct workqueue_item item; /* first: the item is the window_item */
  struct window *w;
};

/* One window: N clusters, IN[i] the guest bytes of cluster i (padded to a
 * whole cluster), OUT + i * cluster_size its compressed bytes, CLEN[i]
 * their length (0: store it uncompressed; < 0: an errno).  NEXT counts
 * the clusters handed out (atomic: the caller and the items take them
 * without a lock); ITEMS_DONE, of NITEMS queued, is under the pool lock,
 * and the window may go only when all have ended. */
struct window {
  const struct qcow2_state *s;
  unsigned n;
  const uint8_t **in;
  uint8_t *out;
  ssize_t *clen;
  unsigned next;
  struct compress_pool *pool;
  unsigned nitems, items_done;
  struct window_item items[COMPRESS_THREADS_MAX];
};

/* The node's compressor threads: a work queue (util/workqueue.c) started
 * at its first compressed write and freed at close.  The pool lock (a
 * leaf) guards the kept caller buffers, the idle compressors and each
 * window's ITEMS_DONE; DONE_COND wakes a window's owner when its last
 * item ends. */
struct compress_pool {
  struct workqueue *wq;
  unsigned nthreads;
  pthread_mutex_t lock;
  pthread_cond_t done_cond;
  struct slot *slots; /* callers' buffers, kept for the next request */
  struct compressor *idle;
};

/* What one caller needs for a request: its compressor and a window's
 * buffers (GATHER only when its buffers split a cluster), kept in the
 * pool between requests so neither is allocated and faulted in again. */
struct slot {
  struct slot *next;
  struct compressor c;
  uint8_t *out, *gather;
  const uint8_t *in[COMPRESS_WINDOW_MAX];
  ssize_t clen[COMPRESS_WINDOW_MAX];
};

static void
slot_free (struct slot *sl)
{
  if (!sl)
    return;
  compressor_end (&sl->c);
  free (sl->out);
  free (sl->gather);
  free (sl);
}

/* Compress W's clusters with C until none is left to take. */
static void
compress_claimed (struct compressor *c, struct window *w)
{
  unsigned i;

  while ((i = __atomic_fetch_add (&w->next, 1, __ATOMIC_RELAXED)) < w->n)
    w->clen[i] = compress_cluster (c, w->in[i],
                                   w->out + (size_t)i * w->s->cluster_size,
                                   w->s->cluster_size - 1);
}

/* A window's item, on a pool thread: an idle compressor (or a new one)
 * takes clusters; without one the others take them all. */
static void
window_item_run (struct workqueue_item *item)
{
  struct window *w = ((struct window_item *)item)->w;
  struct compress_pool *p = w->pool;
  struct compressor *c;

  pthread_mutex_lock (&p->lock);
  if ((c = p->idle))
    p->idle = c->next;
  pthread_mutex_unlock (&p->lock);
  if (c || (c = calloc (1, sizeof *c))) {
    c->s = w->s;
    compress_claimed (c, w);
  }
  pthread_mutex_lock (&p->lock);
  if (c) {
    c->next = p->idle;
    p->idle = c;
  }
  /* The last touch of W: its owner may free it once this is seen. */
  if (++w->items_done == w->nitems)
    pthread_cond_broadcast (&p->done_cond);
  pthread_mutex_unlock (&p->lock);
}

/* The node's pool, started on first use; NULL when no thread could start
 * (the caller then compresses alone). */
static struct compress_pool *
pool_get (strata_node *node)
{
  struct qcow2_state *s = node->opaque;
  struct compress_pool *p;
  long ncpu;

  pthread_mutex_lock (&node->lock);
  if ((p = s->compress_pool) || s->compress_pool_failed)
    goto out;
  ncpu = sysconf (_SC_NPROCESSORS_ONLN);
  if (ncpu < 2 || !(p = calloc (1, sizeof *p))) {
    s->compress_pool_failed = true;
    goto out;
  }
  pthread_mutex_init (&p->lock, NULL);
  pthread_cond_init (&p->done_cond, NULL);
  /* The caller compresses too: one thread fewer than the CPUs.  Every
   * item is woken for explicitly, so the slow-item rule hardly matters. */
  p->nthreads = MIN ((unsigned long)ncpu - 1, COMPRESS_THREADS_MAX);
  if (!(p->wq = workqueue_new (p->nthreads, COMPRESS_SLOW_NS))) {
    qcow2_compress_stop (p);
    p = NULL;
    s->compress_pool_failed = true;
  }
  s->compress_pool = p;
out:
  pthread_mutex_unlock (&node->lock);
  return p;
}

void
qcow2_compress_stop (struct compress_pool *p)
{
  if (!p)
    return;
  workqueue_free (p->wq);
  while (p->slots) {
    struct slot *next = p->slots->next;
    slot_free (p->slots);
    p->slots = next;
  }
  while (p->idle) {
    struct compressor *next = p->idle->next;
    compressor_end (p->idle);
    free (p->idle);
    p->idle = next;
  }
  pthread_cond_destroy (&p->done_cond);
  pthread_mutex_destroy (&p->lock);
  free (p);
}

/* Compress window W with the pool's threads (P may be NULL) and this one,
 * which takes clusters too and so never waits for a thread to wake, only
 * for the items queued for W to end (those that find nothing left end at
 * once). */
static void
compress_window (struct compress_pool *p, struct window *w,
                 struct compressor *c)
{
  w->next = w->items_done = 0;
  w->pool = p;
  w->nitems = p ? MIN (p->nthreads, w->n - 1) : 0;
  for (unsigned k = 0; k < w->nitems; k++) {
    w->items[k].w = w;
    w->items[k].item.run = window_item_run;
    w->items[k].item.next = &w->items[k + 1].item; /* the last: submit's */
  }
  if (w->nitems)
    workqueue_submit (p->wq, &w->items[0].item, &w->items[w->nitems - 1].item,
                      w->nitems, w->nitems);
  compress_claimed (c, w);
  if (!w->nitems)
    return;
  pthread_mutex_lock (&p->lock);
  while (w->items_done < w->nitems)
    pthread_cond_wait (&p->done_cond, &p->lock);
  pthread_mutex_unlock (&p->lock);
}

/* Where LEN (< cluster_size) compressed bytes go: after the last ones
 * when they fit there or the next host cluster is free, else at the start
 * of a new host cluster.  Takes the references the bytes need. */
static int64_t
reserve_compressed_locked (strata_node *node, uint64_t len)
{
  struct qcow2_state *s = node->opaque;
  uint64_t cs = s->cluster_size, off = s->compressed_next;
  uint64_t used = off & (cs - 1), rc;
  int64_t host;
  int r;

  if (off && used) {
    uint64_t cl = off - used;
    if ((r = qcow2_refcount_get_locked (node, cl >> s->cluster_bits, &rc)) < 0)
      return r;
    if (rc && rc < qcow2_rc_max (s)) {
      r = used + len <= cs
              ? 1
              : qcow2_alloc_data_cluster_at_locked (node, cl + cs);
      if (r < 0)
        return r;
      if (r == 1) {
        if ((r = qcow2_refcount_inc_deferred_locked (node, cl)) < 0)
          return r;
        s->compressed_next = off + len;
        return (int64_t)off;
      }
    }
  }
  if ((host = qcow2_alloc_data_cluster_locked (node)) < 0)
    return host;
  s->compressed_next = (uint64_t)host + len;
  return host;
}

/* Where each cluster of a run of compressed ones goes, and the entry it
 * replaces (0: none). */
struct run {
  uint64_t host[COMPRESS_WINDOW_MAX];
  uint64_t old[COMPRESS_WINDOW_MAX];
};

/* Give each of the N clusters from FIRST of W (guest GUEST on) its L2
 * table and its host bytes. */
static int
place_run_locked (strata_node *node, const struct window *w, unsigned first,
                  unsigned n, uint64_t guest, struct run *run, bool *any_old)
{
  struct qcow2_state *s = node->opaque;
  int r;

  for (unsigned k = 0; k < n; k++) {
    uint64_t g = guest + k * s->cluster_size, len = w->clen[first + k];
    uint64_t entry, bitmap, l2_offset;
    int64_t a;
    if ((a = qcow2_ensure_l2_table_locked (node, g)) < 0
        || (a = reserve_compressed_locked (node, len)) < 0)
      return (int)a;
    run->host[k] = (uint64_t)a;
    if ((r
         = qcow2_overlap_check_locked (node, run->host[k], len, 0, "data", g))
            < 0
        || (r
            = qcow2_get_l2_entry_locked (node, g, &entry, &bitmap, &l2_offset))
               < 0)
      return r;
    run->old[k]
        = entry & (QCOW2_OFLAG_COMPRESSED | QCOW2_OFFSET_MASK) ? entry : 0;
    *any_old |= run->old[k] != 0;
  }
  return 0;
}

/* Write the run's bytes, one write per stretch that is contiguous on the
 * host. */
static int
write_run (strata_node *node, const struct window *w, unsigned first,
           unsigned n, const struct run *run)
{
  struct qcow2_state *s = node->opaque;
  struct iovec iov[COMPRESS_IOV_MAX];

  for (unsigned k = 0; k < n;) {
    uint64_t start = run->host[k], len = 0;
    unsigned m = 0;
    int r;
    do {
      iov[m].iov_base = w->out + (size_t)(first + k) * s->cluster_size;
      iov[m].iov_len = w->clen[first + k];
      len += iov[m++].iov_len;
      k++;
    } while (k < n && run->host[k] == start + len && m < COMPRESS_IOV_MAX);
    if ((r = node_pwritev (node->file, start, len, iov, (int)m, 0)) < 0)
      return r;
  }
  return 0;
}

/* Store clusters FIRST..FIRST+N-1 of W, all compressed, at guest GUEST. */
static int
store_run (strata_node *node, const struct window *w, unsigned first,
           unsigned n, uint64_t guest)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE struct run *run = malloc (sizeof *run);
  struct tracked_req req;
  bool any_old = false;
  int r;

  if (!run)
    return -ENOMEM;
  tracker_begin (&s->clusters, &req, guest, n * s->cluster_size, true);
  pthread_mutex_lock (&node->lock);
  r = place_run_locked (node, w, first, n, guest, run, &any_old);
  pthread_mutex_unlock (&node->lock);
  if (r == 0)
    r = write_run (node, w, first, n, run);
  if (r == 0) {
    pthread_mutex_lock (&node->lock);
    for (unsigned k = 0; k < n && r == 0; k++)
      r = qcow2_set_l2_entry_deferred_locked (
          node, guest + k * s->cluster_size,
          qcow2_compressed_entry (s, run->host[k], w->clen[first + k]), 0);
    if (r == 0 && any_old && (r = qcow2_writeback_locked (node)) == 0)
      r = node_flush (node->file);
    for (unsigned k = 0; k < n && r == 0; k++)
      if (run->old[k])
        r = qcow2_free_entry_locked (node, run->old[k]);
    pthread_mutex_unlock (&node->lock);
  }
  tracker_end (&s->clusters, &req);
  return r;
}

/* Store window W (guest offset GUEST, LEN bytes) in guest order. */
static int
store_window (strata_node *node, const struct window *w, uint64_t guest,
              uint64_t len)
{
  struct qcow2_state *s = node->opaque;
  uint64_t cs = s->cluster_size;
  int r = 0;

  for (unsigned i = 0; i < w->n && r == 0;) {
    unsigned j = i;
    if (w->clen[i] < 0)
      return (int)w->clen[i];
    if (w->clen[i] == 0) {
      /* Incompressible: an ordinary cluster (the image's partial last
       * cluster only as far as the image goes). */
      struct iovec v = { .iov_base = (void *)w->in[i],
                         .iov_len = MIN (cs, len - i * cs) };
      r = qcow2_pwritev (node, guest + i * cs, v.iov_len, &v, 1, 0);
      i++;
      continue;
    }
    while (j < w->n && w->clen[j] > 0)
      j++;
    r = store_run (node, w, i, j - i, guest + i * cs);
    i = j;
  }
  return r;
}

/* Point IN[k] at each of the N clusters of the caller's buffers from byte
 * SKIP: in place when a cluster lies in one buffer, else gathered into
 * GATHER (padded with zeros past LEN). */
static int
window_inputs (const struct qcow2_state *s, const struct iovec *iov,
               int iovcnt, uint64_t skip, uint64_t len, unsigned n,
               const uint8_t **in, uint8_t **gatherp, unsigned per)
{
  uint64_t cs = s->cluster_size;
  int i = 0;

  while (i < iovcnt && skip >= iov[i].iov_len)
    skip -= iov[i++].iov_len;
  for (unsigned k = 0; k < n; k++) {
    uint64_t want = MIN (cs, len - k * cs), got = 0;
    uint8_t *g;
    if (want == cs && i < iovcnt && iov[i].iov_len - skip >= cs) {
      in[k] = (const uint8_t *)iov[i].iov_base + skip;
      skip += cs;
    }
    else {
      if (!*gatherp && !(*gatherp = malloc ((size_t)per * cs)))
        return -ENOMEM;
      g = *gatherp + (size_t)k * cs;
      while (got < want) {
        size_t take = MIN (iov[i].iov_len - skip, want - got);
        memcpy (g + got, (const uint8_t *)iov[i].iov_base + skip, take);
        got += take;
        skip += take;
        if (skip == iov[i].iov_len && i + 1 < iovcnt) {
          i++;
          skip = 0;
        }
      }
      memset (g + want, 0, cs - want);
      in[k] = g;
    }
    if (i + 1 < iovcnt && skip == iov[i].iov_len) {
      i++;
      skip = 0;
    }
  }
  return 0;
}

/* A caller's slot for windows of PER clusters: a kept one, or new. */
static struct slot *
slot_get (struct compress_pool *p, const struct qcow2_state *s, unsigned per)
{
  struct slot *sl = NULL;

  if (p) {
    pthread_mutex_lock (&p->lock);
    if ((sl = p->slots))
      p->slots = sl->next;
    pthread_mutex_unlock (&p->lock);
  }
  if (!sl && (sl = calloc (1, sizeof *sl))
      && !(sl->out = malloc ((size_t)per * s->cluster_size))) {
    free (sl);
    sl = NULL;
  }
  if (sl)
    sl->c.s = s;
  return sl;
}

static void
slot_put (struct compress_pool *p, struct slot *sl)
{
  if (!p) {
    slot_free (sl);
    return;
  }
  pthread_mutex_lock (&p->lock);
  sl->next = p->slots;
  p->slots = sl;
  pthread_mutex_unlock (&p->lock);
}

int
qcow2_pwritev_compressed (strata_node *node, uint64_t offset, uint64_t len,
                          const struct iovec *iov, int iovcnt, unsigned flags)
{
  struct qcow2_state *s = node->opaque;
  uint64_t cs = s->cluster_size, done = 0;
  struct compress_pool *pool = pool_get (node);
  unsigned per, nthreads = pool ? pool->nthreads + 1 : 1;
  struct slot *sl;
  int r;

  if ((r = qcow2_writes_refused (node)) < 0)
    return r;
  if (offset & (cs - 1) || (len & (cs - 1) && offset + len != s->size))
    return io_error (EINVAL,
                     "%s: a compressed write must cover whole "
                     "clusters of %" PRIu64 " bytes (offset %" PRIu64
                     " length %" PRIu64 ")",
                     node->filename, cs, offset, len);
  /* Enough clusters in a window to keep every thread busy; the same for
   * every request, so that slots fit any of them. */
  per = (unsigned)MAX (COMPRESS_WINDOW / cs, 1);
  per = MAX (per, MIN (nthreads, 4));
  per = MIN (per, COMPRESS_WINDOW_MAX);
  if (!(sl = slot_get (pool, s, per)))
    return -ENOMEM;
  while (done < len && r == 0) {
    uint64_t n = MIN (len - done, (uint64_t)per * cs);
    struct window w = { .s = s,
                        .n = (unsigned)((n + cs - 1) / cs),
                        .in = sl->in,
                        .out = sl->out,
                        .clen = sl->clen };

    r = window_inputs (s, iov, iovcnt, done, n, w.n, sl->in, &sl->gather, per);
    if (r == 0) {
      compress_window (pool, &w, &sl->c);
      r = store_window (node, &w, offset + done, n);
    }
    done += n;
  }
  slot_put (pool, sl);
  if (r == 0 && (flags & STRATA_REQ_FUA))
    r = node_flush (node);
  return r;
}
