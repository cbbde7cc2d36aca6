/* strata: copy-up (node_copy_up in node.h), shared by the copy-on-read
 * filter, block-stream and strata-img stream.
 *
 * The range is widened to whole clusters of TOP and cut into chunks of at
 * least 1 MiB (whole clusters), each handled in two passes:
 *
 *   1. a look without serialisation: is there any part TOP lacks that a
 *      layer above BASE holds?  Chunks TOP already allocates (most of them
 *      in a re-run, and every guest-written one) cost only block status;
 *   2. under a serialising request of TOP's tracker over the chunk, which
 *      waits for the writes to TOP already in flight there and holds back
 *      new ones, look again and copy what is still missing.  A guest write
 *      that lands first is seen as allocated and never overwritten; one
 *      that comes later waits and overwrites the copy.
 *
 * What a part of the chain holds, walking from TOP's backing down to BASE
 * (excluded):
 *
 *   first layer allocating it, data   -> read through TOP's backing, write
 *   first layer allocating it, zeros  -> write zeroes (a zero cluster)
 *   past the end of a shorter layer   -> zeros when BASE is set (a longer
 *                                        BASE would show through after the
 *                                        chain is cut), else nothing
 *   no layer above BASE allocates it  -> nothing
 *
 * Data read from the chain that turns out to be zeros is written as zeroes
 * too, cluster by cluster, so zero regions never become data clusters.
 * A caller that copies several ranges at once on several threads (the
 * stream job) may hold each copy back just before its first write
 * (node_copy_up_ordered), so that TOP's clusters are allocated in the
 * order one thread copying the ranges in turn would allocate them.
 * The writes carry NODE_REQ_SERIALISED: they run inside our serialising
 * request, which a tracked write would wait for forever.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "block/node.h"
#include "util/checked.h"
#include "util/cleanup.h"

#define COPY_UP_CHUNK (UINT64_C (1) << 20)

enum source { SRC_NONE, SRC_ZERO, SRC_DATA };

struct copy_up {
  strata_node *top, *base;
  uint64_t cluster; /* TOP's cluster size (64 KiB when it has none) */
  uint64_t chunk;   /* bytes per chunk, a multiple of cluster */
  uint8_t *buf;     /* chunk bytes, allocated when first needed */
  uint64_t copied;
  int (*before_write) (void *opaque); /* once, before the first write */
  void *opaque;
};

/* What the layers between TOP and BASE hold at [offset, offset+len): sets
 * *PNUM (> 0, at most LEN) and *SRC. */
static int
chain_source (struct copy_up *c, uint64_t offset, uint64_t len, uint64_t *pnum,
              enum source *src)
{
  for (strata_node *l = node_skip_filters (c->top->backing); l && l != c->base;
       l = node_skip_filters (l->backing)) {
    int64_t size = node_length (l);
    struct bstat bs;
    int r;

    if (size < 0)
      return io_error (-size,
                       "%s: cannot get the length of the backing "
                       "file",
                       l->filename);
    if (offset >= (uint64_t)size) {
      *pnum = len;
      *src = c->base ? SRC_ZERO : SRC_NONE;
      return 0;
    }
    len = MIN (len, (uint64_t)size - offset);
    if ((r = node_block_status_flags (l, offset, len, &bs,
                                      STRATA_BS_SHALLOW)) < 0)
      return r;
    len = bs.pnum;
    if (bs.flags & BS_ALLOCATED) {
      *pnum = len;
      *src = (bs.flags & BS_ZERO) ? SRC_ZERO : SRC_DATA;
      return 0;
    }
  }
  *pnum = len;
  *src = SRC_NONE;
  return 0;
}

static bool
is_zero (const uint8_t *p, size_t len)
{
  return len == 0 || (p[0] == 0 && memcmp (p, p + 1, len - 1) == 0);
}

static int
write_piece (struct copy_up *c, uint64_t offset, uint64_t len,
             const uint8_t *data)
{
  int (*before) (void *) = c->before_write;
  int r;

  c->before_write = NULL;
  if (before && (r = before (c->opaque)) < 0)
    return r;
  r = data ? node_pwrite (c->top, offset, data, len, NODE_REQ_SERIALISED)
           : node_pwrite_zeroes (c->top, offset, len, NODE_REQ_SERIALISED);
  if (r == 0)
    c->copied += len;
  return r;
}

/* Read [offset, offset+len) through TOP's backing (zeros past its end). */
static int
read_chain (struct copy_up *c, uint64_t offset, uint64_t len)
{
  strata_node *b = c->top->backing;
  int64_t size = node_length (b);
  uint64_t part = 0;

  if (size < 0)
    return io_error (-size, "%s: cannot get the length of the backing file",
                     b->filename);
  if (offset < (uint64_t)size)
    part = MIN (len, (uint64_t)size - offset);
  memset (c->buf + part, 0, len - part);
  return part ? node_pread (b, offset, c->buf, part, 0) : 0;
}

/* Copy the region [offset, offset+len) (at most a chunk) of the chain into
 * TOP: zeroes when the chain said so, else its bytes, with the pieces
 * (split at TOP's cluster boundaries) that read as zeros written as
 * zeroes. */
static int
copy_region (struct copy_up *c, uint64_t offset, uint64_t len, bool zero)
{
  uint64_t done = 0, run = 0;
  bool run_zero = false;
  int r;

  if (zero)
    return write_piece (c, offset, len, NULL);
  if (!c->buf && !(c->buf = malloc (c->chunk)))
    return -ENOMEM;
  if ((r = read_chain (c, offset, len)) < 0)
    return r;
  while (done + run < len) {
    uint64_t pos = offset + done + run;
    uint64_t n = MIN (len - done - run, c->cluster - pos % c->cluster);
    bool z = is_zero (c->buf + done + run, n);

    if (run && z != run_zero) {
      if ((r = write_piece (c, offset + done, run,
                            run_zero ? NULL : c->buf + done))
          < 0)
        return r;
      done += run;
      run = 0;
    }
    run_zero = z;
    run += n;
  }
  return write_piece (c, offset + done, run, run_zero ? NULL : c->buf + done);
}

/* Walk the chunk [offset, offset+len): parts TOP does not allocate and the
 * chain above BASE holds are copied, or with DRY only looked for.  Returns
 * 1 when DRY found something to copy, else 0, or a negative errno. */
static int
copy_chunk (struct copy_up *c, uint64_t offset, uint64_t len, bool dry)
{
  uint64_t end = offset + len, pos = offset;
  uint64_t region = 0, rstart = 0;
  bool rzero = true;
  int r;

  while (pos < end) {
    struct bstat bs;
    uint64_t n;
    enum source src = SRC_NONE;

    if ((r = node_block_status_flags (c->top, pos, end - pos, &bs,
                                      STRATA_BS_SHALLOW)) < 0)
      return r;
    n = bs.pnum;
    if (!(bs.flags & BS_ALLOCATED)
        && (r = chain_source (c, pos, n, &n, &src)) < 0)
      return r;
    if (src != SRC_NONE && dry)
      return 1;
    /* A region ends where the next part to copy does not follow it. */
    if (src != SRC_NONE && region && rstart + region != pos) {
      if ((r = copy_region (c, rstart, region, rzero)) < 0)
        return r;
      region = 0;
    }
    if (src != SRC_NONE) {
      if (!region)
        rstart = pos, rzero = true;
      region += n;
      rzero = rzero && src == SRC_ZERO;
    }
    pos += n;
  }
  if (region && (r = copy_region (c, rstart, region, rzero)) < 0)
    return r;
  return 0;
}

uint64_t
node_copy_up_unit (strata_node *top)
{
  struct strata_info info = { 0 };

  if (top->drv->get_info && top->drv->get_info (top, &info, NULL)
      && info.cluster_size)
    return info.cluster_size;
  return 65536; /* a format without clusters: QEMU's default size */
}

int
node_copy_up (strata_node *top, strata_node *base, uint64_t offset,
              uint64_t len, uint64_t *copied)
{
  return node_copy_up_ordered (top, base, offset, len, copied, NULL, NULL);
}

int
node_copy_up_ordered (strata_node *top, strata_node *base, uint64_t offset,
                      uint64_t len, uint64_t *copied,
                      int (*before_write) (void *opaque), void *opaque)
{
  struct copy_up c = { .top = node_skip_filters (top),
                       .base = node_skip_filters (base),
                       .before_write = before_write,
                       .opaque = opaque };
  uint64_t start, end;
  int64_t size;
  int r = 0;

  if (copied)
    *copied = 0;
  if (offset > INT64_MAX || len > INT64_MAX - offset)
    return io_error (EINVAL,
                     "%s: copy-up at offset %" PRIu64 " length %" PRIu64
                     " overflows",
                     top->filename, offset, len);
  if (!c.top->backing || len == 0)
    return 0;
  if ((size = node_length (c.top)) < 0)
    return io_error (-size, "%s: cannot get the image length",
                     c.top->filename);
  c.cluster = node_copy_up_unit (c.top);
  c.chunk = ROUND_UP (MAX (COPY_UP_CHUNK, c.cluster), c.cluster);
  start = ROUND_DOWN (offset, c.cluster);
  end = MIN (ROUND_UP (offset + len, c.cluster), (uint64_t)size);

  for (uint64_t pos = start; pos < end && r == 0;) {
    uint64_t n = MIN (c.chunk, end - pos);
    struct tracked_req req;

    r = copy_chunk (&c, pos, n, true);
    if (r > 0) {
      tracker_begin (&c.top->tracker, &req, pos, n, true);
      r = copy_chunk (&c, pos, n, false);
      tracker_end (&c.top->tracker, &req);
    }
    pos += n;
  }
  free (c.buf);
  if (copied)
    *copied = c.copied;
  return r;
}
