/* strata-img convert: the copy engine (img-convert.c sets it up).
 *
 * The sources are concatenated into one address space and copied in
 * chunks of at most 2 MiB.  Each chunk has one status, from the source's
 * block status:
 *
 *   DATA     read it, then write runs of data and turn runs of zeros of at
 *            least SPARSE bytes (-S, default 4 KiB) into zeros
 *   ZERO     nothing to read: zeros
 *   BACKING  with -B only: not allocated in the top image of the source, so
 *            left unallocated for the new backing file to show through
 *            (qemu-img copies only the top layer with -B; it does not
 *            compare with the new backing file)
 *
 * Zeros cost nothing on a target that reads as zeros from the start (a new
 * image without a backing file, or -n --target-is-zero); otherwise they are
 * written as write-zeroes requests that may unmap.  -S 0 writes every
 * non-BACKING byte as data.  -c writes whole clusters compressed and skips
 * clusters that are all zeros.
 *
 * -m N threads (default 8) take chunks in order from a shared cursor and
 * read in parallel; each thread owns one buffer, so memory stays below
 * N * 2 MiB whatever the image size.  Without -W a thread waits for the
 * chunks before its own to be written, so the target is written in order.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <strata/strata.h>

#include "checked.h"
#include "clock.h"
#include "cleanup.h"
#include "opts.h"
#include "img.h"
#include "progress.h"
#include "ratelimit.h"
#include "convert.h"

/* ---- zero detection ---- */

static bool
is_zero (const uint8_t *p, size_t len)
{
  static const uint8_t zeros[64];

  /* Compare a short head with zeros, then the buffer with itself shifted:
   * both run at memcmp's speed. */
  if (len <= sizeof zeros)
    return memcmp (p, zeros, len) == 0;
  return memcmp (p, zeros, sizeof zeros) == 0
         && memcmp (p, p + sizeof zeros, len - sizeof zeros) == 0;
}

/* One sector: data nearly always shows in its first word, so look there
 * before calling is_zero. */
static inline bool
sector_is_zero (const uint8_t *p)
{
  uint64_t w;

  memcpy (&w, p, sizeof w);
  return !w && is_zero (p, SECTOR);
}

/* The run of sectors at the start of BUF (N sectors, the first at SECTOR
 * NUM) that are all zero or all data.  A run that stops short of N ends on
 * an ALIGN boundary of the target: data grows to the next boundary, zeros
 * shrink to the previous one, and zeros that would vanish that way count
 * as data.  Returns whether the run is data; *LEN gets its length. */
static bool
first_run (const uint8_t *buf, uint64_t n, uint64_t num, uint64_t align,
           uint64_t *len)
{
  bool zero = sector_is_zero (buf);
  uint64_t i = 1, tail;

  while (i < n && sector_is_zero (buf + i * SECTOR) == zero)
    i++;
  tail = (num + i) % align;
  if (i < n && tail) {
    if (zero && i <= tail)
      zero = false;
    if (zero)
      i -= tail;
    else
      i = MIN (i + align - tail, n);
  }
  *len = i;
  return !zero;
}

/* The next run to write: a data run swallows runs of zeros shorter than
 * MIN sectors that have data after them; a zero run is returned as it is.
 * Returns whether the run is data. */
static bool
next_run (const uint8_t *buf, uint64_t n, uint64_t num, uint64_t align,
          uint64_t min, uint64_t *len)
{
  uint64_t used, checked, l;

  if (!first_run (buf, n, num, align, &l)) {
    *len = l;
    return false;
  }
  used = checked = l;
  min = MIN (min, n);
  while (checked < n) {
    bool data = first_run (buf + checked * SECTOR, n - checked, num + checked,
                           align, &l);
    checked += l;
    if (data)
      used = checked;
    else if (l >= min)
      break;
  }
  *len = used;
  return true;
}

/* ---- errors and progress ---- */

/* After a failure: every waiter must see it.  LOCKED. */
static void
wake_all_convert_locked (struct convert *c)
{
  for (unsigned i = 0; i < c->nturn; i++)
    pthread_cond_broadcast (&c->turn[i]);
}

/* Record the first failure (the message from this thread's last error). */
static void
convert_fail (struct convert *c, int r, const char *what, uint64_t off)
{
  const char *detail = strata_last_error_message ();
  char *m = NULL;

  if (asprintf (&m, "error while %s at byte %" PRIu64 ": %s%s%s%s", what, off,
                strerror (-r), detail ? " (" : "", detail ? detail : "",
                detail ? ")" : "")
      < 0)
    m = NULL;
  pthread_mutex_lock (&c->lock);
  if (!c->err) {
    c->err = r;
    c->err_msg = m;
    m = NULL;
  }
  wake_all_convert_locked (c);
  pthread_mutex_unlock (&c->lock);
  free (m);
}

/* -p (img.h); LOCKED. */
static void
progress_show_convert_locked (struct convert *c)
{
  progress_update (&c->prog, c->done, c->prog.total);
}

/* ---- the chunk cursor ---- */

static struct source *
source_at (struct convert *c, uint64_t off)
{
  int i = 0;

  while (i + 1 < c->nsrc && off >= c->src[i].base + c->src[i].size)
    i++;
  return &c->src[i];
}

/* E's length as qemu-img's chunking would cut it at LOCAL in S: at the
 * L2 span boundaries of every qcow2 layer consulted (the top one alone
 * with -B), then down to the top's cluster alignment when longer. */
static uint64_t
qemu_extent (const struct convert *c, const struct source *s, uint64_t local,
             const struct strata_extent *e)
{
  int last = c->backing_mode ? 0 : MIN (e->depth, s->nlayers - 1);
  uint64_t len = e->length, tail;

  for (int k = 0; k <= last; k++)
    if (s->spans[k])
      len = MIN (len, ROUND_UP (local + 1, s->spans[k]) - local);
  tail = (local + len) % s->align;
  if (len > tail)
    len -= tail;
  return len;
}

/* Block status of the copy at C->next, cached in status/status_end;
 * LOCKED.  Returns 0 or a negative errno. */
static int
refresh_status_convert_locked (struct convert *c)
{
  struct source *s = source_at (c, c->next);
  uint64_t local = c->next - s->base;
  struct strata_extent e = { .size = sizeof e };
  int r;

  if (local >= s->real) {
    /* The padding to a whole sector past an odd-sized image. */
    c->status_end = s->base + s->size;
    c->status = ST_ZERO;
    return 0;
  }
  r = strata_block_status (s->node, local, s->real - local, &e, 0);
  if (r < 0)
    return r;
  c->status_end = c->next + qemu_extent (c, s, local, &e);
  if (c->backing_mode && e.depth > 0)
    c->status = ST_BACKING; /* below the top layer */
  else if (e.flags & STRATA_BS_ZERO)
    c->status = ST_ZERO;
  else if ((e.flags & STRATA_BS_DATA) || !c->backing_mode)
    c->status = ST_DATA;
  else
    c->status = ST_BACKING;
  return 0;
}

/* Hand out the next chunk; LOCKED.  False at the end or after a failure. */
static bool
next_chunk_convert_locked (struct convert *c, struct chunk *ch)
{
  uint64_t end;

  if (c->err || c->next >= c->total)
    return false;
  if (c->status_end <= c->next) {
    int r = refresh_status_convert_locked (c);
    if (r < 0) {
      const char *d = strata_last_error_message ();
      if (asprintf (&c->err_msg,
                    "error while reading block status at "
                    "byte %" PRIu64 ": %s",
                    c->next, d ? d : strerror (-r))
          < 0)
        c->err_msg = NULL;
      c->err = r;
      wake_all_convert_locked (c);
      return false;
    }
  }
  ch->status = c->status;
  end = c->next + MIN (c->status_end - c->next, c->bufsize);
  if (c->compressed && end < c->total) {
    /* Whole clusters only: a shorter run makes its cluster data. */
    if (ROUND_DOWN (end, c->cluster) > c->next)
      end = ROUND_DOWN (end, c->cluster);
    else {
      end = MIN (ROUND_UP (c->next + 1, c->cluster), c->total);
      ch->status = ST_DATA;
    }
  }
  ch->off = c->next;
  ch->len = end - c->next;
  ch->seq = c->seq++;
  c->next = end;
  return true;
}

/* ---- reading and writing ---- */

/* --salvage: LEN bytes at LOCAL of NODE into BUF again, one sector at a
 * time, each sector that cannot be read warned about (at its offset OFF
 * in the output, as qemu-img) and left as zeros. */
static int
salvage_read (strata_node *node, uint8_t *buf, uint64_t len, uint64_t local,
              uint64_t off)
{
  for (uint64_t i = 0; i < len; i += SECTOR) {
    uint64_t n = MIN (SECTOR, len - i);
    int r = strata_pread (node, buf + i, n, local + i, 0);

    if (r < 0) {
      fprintf (stderr,
               "%s: warning: error while reading offset %" PRIu64 ": %s\n",
               progname, off + i, strerror (-r));
      memset (buf + i, 0, n);
    }
  }
  return 0;
}

/* Read [OFF, OFF+LEN) of the concatenated sources. */
static int
read_sources (struct convert *c, uint8_t *buf, uint64_t off, uint64_t len)
{
  while (len) {
    struct source *s = source_at (c, off);
    uint64_t local = off - s->base, n = MIN (len, s->size - local);
    uint64_t have = local < s->real ? MIN (n, s->real - local) : 0;
    int r = have ? strata_pread (s->node, buf, have, local, 0) : 0;

    memset (buf + have, 0, n - have);
    if (r < 0 && c->salvage)
      r = salvage_read (s->node, buf, have, local, off);
    if (r < 0) {
      convert_fail (c, r, "reading", off);
      return r;
    }
    buf += n;
    off += n;
    len -= n;
  }
  return 0;
}

static int
write_data (struct convert *c, const uint8_t *buf, uint64_t off, uint64_t len,
            unsigned flags)
{
  int r = strata_pwrite (c->dst, buf, len, off, flags | c->wflags);

  if (r < 0)
    convert_fail (c, r, "writing", off);
  return r;
}

static int
write_zeroes (struct convert *c, uint64_t off, uint64_t len)
{
  int r;

  if (c->zero_init || !len)
    return 0;
  r = strata_pwrite_zeroes (c->dst, off, len,
                            STRATA_REQ_MAY_UNMAP | c->wflags);
  if (r < 0)
    convert_fail (c, r, "writing", off);
  return r;
}

/* Compressed: each cluster that is not all zeros, in batches of adjacent
 * clusters. */
static int
write_compressed (struct convert *c, const uint8_t *buf, struct chunk *ch)
{
  uint64_t pos = 0;

  while (pos < ch->len) {
    uint64_t n = MIN (c->cluster, ch->len - pos), start = pos;
    int r;

    if (is_zero (buf + pos, n)) {
      for (; pos < ch->len
             && is_zero (buf + pos, MIN (c->cluster, ch->len - pos));
           pos += MIN (c->cluster, ch->len - pos))
        ;
      r = write_zeroes (c, ch->off + start, pos - start);
    }
    else {
      for (; pos < ch->len
             && !is_zero (buf + pos, MIN (c->cluster, ch->len - pos));
           pos += MIN (c->cluster, ch->len - pos))
        ;
      r = write_data (c, buf + start, ch->off + start, pos - start,
                      STRATA_REQ_COMPRESSED);
    }
    if (r < 0)
      return r;
  }
  return 0;
}

/* Data with zero detection: runs of data are written, runs of zeros
 * become zeros.  BUF is padded with zeros to whole sectors. */
static int
write_sparse (struct convert *c, const uint8_t *buf, struct chunk *ch)
{
  uint64_t n = (ch->len + SECTOR - 1) / SECTOR, pos = 0;
  uint64_t min = c->min_sparse / SECTOR;

  while (pos < n) {
    uint64_t l, off = pos * SECTOR, len;
    bool data = next_run (buf + off, n - pos, ch->off / SECTOR + pos, c->align,
                          min, &l);
    int r;

    len = MIN (l * SECTOR, ch->len - off);
    r = data ? write_data (c, buf + off, ch->off + off, len, 0)
             : write_zeroes (c, ch->off + off, len);
    if (r < 0)
      return r;
    pos += l;
  }
  return 0;
}

static int
write_chunk (struct convert *c, const uint8_t *buf, struct chunk *ch)
{
  if (ch->status == ST_BACKING)
    return 0;
  if (c->compressed)
    return ch->status == ST_ZERO ? write_zeroes (c, ch->off, ch->len)
                                 : write_compressed (c, buf, ch);
  if (!c->min_sparse)
    return write_data (c, buf, ch->off, ch->len, 0);
  if (ch->status == ST_ZERO)
    return write_zeroes (c, ch->off, ch->len);
  return write_sparse (c, buf, ch);
}

/* Without -W: wait until every earlier chunk is written.  False when the
 * copy failed meanwhile. */
static bool
wait_turn (struct convert *c, uint64_t seq)
{
  bool ok;

  pthread_mutex_lock (&c->lock);
  while (!c->err && c->written_seq != seq)
    pthread_cond_wait (&c->turn[seq % c->nturn], &c->lock);
  ok = !c->err;
  pthread_mutex_unlock (&c->lock);
  return ok;
}

static void
chunk_done (struct convert *c, const struct chunk *ch)
{
  pthread_mutex_lock (&c->lock);
  c->done += ch->len;
  if (!c->out_of_order) {
    c->written_seq++;
    pthread_cond_signal (&c->turn[c->written_seq % c->nturn]);
  }
  progress_show_convert_locked (c);
  pthread_mutex_unlock (&c->lock);
}

static void *
convert_worker (void *arg)
{
  struct convert *c = arg;
  uint8_t *buf = NULL;

  /* Aligned so that the kernel may back it with a transparent huge page
   * when THP is "always" (fewer TLB misses in the zero scan).  No
   * MADV_HUGEPAGE: with defrag "madvise" (Debian's default) it makes the
   * first faults compact memory directly, which stalled a 4 GiB convert
   * on a host full of page cache from 4 s to 13 s. */
  if (posix_memalign ((void **)&buf, CONVERT_BUF, c->bufsize) != 0) {
    pthread_mutex_lock (&c->lock);
    if (!c->err) {
      c->err = -ENOMEM;
      c->err_msg = strdup ("out of memory");
    }
    wake_all_convert_locked (c);
    pthread_mutex_unlock (&c->lock);
    return NULL;
  }
  for (;;) {
    struct chunk ch;
    bool ok;
    uint64_t padded;

    img_ratelimit_wait (&c->rl);
    pthread_mutex_lock (&c->lock);
    ok = next_chunk_convert_locked (c, &ch);
    pthread_mutex_unlock (&c->lock);
    if (!ok)
      break;
    if (c->rl.speed && ch.status == ST_DATA) /* as qemu-img: data only */
      ratelimit_account (&c->rl, ch.len, clock_now_ns ());
    /* Zero chunks written as data (-S 0, or a compressed cluster) read as
     * zeros without asking the source. */
    padded = ROUND_UP (ch.len, SECTOR);
    if (ch.status == ST_DATA) {
      if (read_sources (c, buf, ch.off, ch.len) < 0)
        break;
      memset (buf + ch.len, 0, padded - ch.len);
    }
    else if (ch.status == ST_ZERO && !c->min_sparse)
      memset (buf, 0, padded);
    if (!c->out_of_order && !wait_turn (c, ch.seq))
      break;
    if (write_chunk (c, buf, &ch) < 0)
      break;
    chunk_done (c, &ch);
  }
  free (buf);
  return NULL;
}

/* Run the copy with N threads.  Returns 0 or 1 (the message printed). */
int
convert_run (struct convert *c, int n)
{
  pthread_t tids[16];
  int started = 0, r;

  pthread_mutex_init (&c->lock, NULL);
  c->nturn = n;
  for (int i = 0; i < n; i++)
    pthread_cond_init (&c->turn[i], NULL);
  progress_start (&c->prog, PROGRESS_IMG, NULL, c->progress, c->total);
  for (; started < n; started++)
    if (pthread_create (&tids[started], NULL, convert_worker, c) != 0)
      break;
  if (started == 0)
    convert_worker (c);
  for (int i = 0; i < started; i++)
    pthread_join (tids[i], NULL);
  if (!c->err && c->next < c->total) {
    c->err = -EIO;
    c->err_msg = strdup ("the copy stopped early");
  }
  r = c->err ? 1 : 0;
  if (!c->err && strata_flush (c->dst, 0) < 0) {
    fail_msg ("error while flushing the target");
    r = 1;
  }
  progress_end (&c->prog, !c->err && r == 0);
  if (c->err)
    fail_msg (c->err_msg ? c->err_msg : strerror (-c->err));
  free (c->err_msg);
  for (int i = 0; i < n; i++)
    pthread_cond_destroy (&c->turn[i]);
  pthread_mutex_destroy (&c->lock);
  return r;
}
