/* strata-img convert: copy one or more images into a new one (qemu-img
 * convert).
 *
 *   convert [-f FMT] [-O FMT] [-B BACKING [-F BFMT]] [-c] [-o OPTS] [-n]
 *           [--target-is-zero] [-p] [-q] [-S SPARSE] [-m N] [-W] [-U]
 *           [-t CACHE] [-T SRC_CACHE] [-C] SRC [SRC...] DST
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

#define CONVERT_BUF (2u << 20) /* bytes per chunk, as qemu-img */
#define SECTOR 512u

enum chunk_status { ST_DATA, ST_ZERO, ST_BACKING };

struct source {
  const char *name;
  strata_node *node;
  uint64_t base; /* offset of its first byte in the copy */
  uint64_t size; /* rounded up to whole sectors, as qemu-img */
  uint64_t real; /* the image's own length */
  /* qemu-img's chunking, which zero detection depends on: QEMU's qcow2
   * answers block status up to the end of one L2 table's span at most
   * (spans[k] for layer k of the chain, 0 for other formats), and
   * qemu-img trims each answer to the top image's cluster size (align). */
  uint64_t *spans;
  int nlayers;
  uint64_t align;
};

struct chunk {
  uint64_t off, len, seq;
  enum chunk_status status;
};

struct convert {
  /* Set up before the threads start. */
  struct source *src;
  int nsrc;
  uint64_t total;
  strata_node *dst;
  bool compressed, backing_mode, zero_init, out_of_order, progress;
  bool salvage;        /* --salvage: unreadable sectors become zeros */
  uint64_t min_sparse; /* bytes; 0 = no zero detection */
  uint64_t align;      /* sectors: zero runs are cut at these */
  uint64_t cluster;    /* target cluster size (compressed chunks) */
  uint64_t bufsize;
  unsigned wflags; /* STRATA_REQ_FUA for writethrough caches */

  pthread_mutex_t lock;
  /* Waiters for their turn to write: chunk SEQ waits on turn[SEQ % nturn].
   * Each thread holds one chunk, so the waiting chunks are fewer than
   * nturn apart and never share a condition. */
  pthread_cond_t turn[16];
  unsigned nturn;
  /* The cursor and the cached block status, under lock. */
  uint64_t next, seq;
  uint64_t status_end;
  enum chunk_status status;
  /* In-order writes: the sequence number whose turn it is. */
  uint64_t written_seq;
  uint64_t done; /* bytes finished, for -p */
  /* -r: one thread takes the chunks then, so nothing else touches it. */
  struct ratelimit rl;
  struct progress prog;
  /* The first failure. */
  int err;
  char *err_msg;
};

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

/* The run of sectors at the start of BUF (N sectors, the first at SECTOR
 * NUM) that are all zero or all data.  A run that stops short of N ends on
 * an ALIGN boundary of the target: data grows to the next boundary, zeros
 * shrink to the previous one, and zeros that would vanish that way count
 * as data.  Returns whether the run is data; *LEN gets its length. */
static bool
first_run (const uint8_t *buf, uint64_t n, uint64_t num, uint64_t align,
           uint64_t *len)
{
  bool zero = is_zero (buf, SECTOR);
  uint64_t i = 1, tail;

  while (i < n && is_zero (buf + i * SECTOR, SECTOR) == zero)
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

  if (posix_memalign ((void **)&buf, 4096, c->bufsize) != 0) {
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
static int
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

/* ---- the command ---- */

struct convert_args {
  const char *fmt, *ofmt, *backing, *bfmt, *cache, *src_cache;
  const char *snapshot; /* -l */
  char *options;
  char *opt_backing, *opt_bfmt; /* -o backing_file/backing_fmt: as -B/-F */
  bool compressed, skip_create, quiet, progress, force_share, target_is_zero;
  bool salvage, bitmaps;
  bool out_of_order;
  uint64_t min_sparse, rate;
  int threads;
};

/* "DST: error while converting FMT: MSG" as qemu-img words a failed
 * creation, without the file name strata's message starts with. */
static void
fail_create (const char *dst, const char *ofmt, strata_error *err)
{
  const char *m = strata_error_message (err);
  size_t n = strlen (dst);

  if (strncmp (m, dst, n) == 0 && strncmp (m + n, ": ", 2) == 0)
    m += n + 2;
  /* qemu-img finds these before it creates anything, and says only so. */
  if (!strncmp (m, "Unknown file format '", 21)
      || !strncmp (m, "Invalid parameter '", 19)) {
    fail_msg (m);
    strata_error_free (err);
    return;
  }
  fprintf (stderr, "%s: %s: error while converting %s: %s\n", progname, dst,
           ofmt, m);
  strata_error_free (err);
}

/* The value OPTIONS give KEY, malloc'd, or NULL. */
static char *
option_value (const char *options, const char *key)
{
  CLEANUP_OPTS strata_opts *o = opts_new ();
  const char *v;

  if (!o || !options || !opts_parse (o, options, NULL))
    return NULL;
  v = opts_get (o, key);
  return v ? strdup (v) : NULL;
}

/* Whether OPTIONS set KEY to something other than "off". */
static bool
option_set (const char *options, const char *key)
{
  CLEANUP_FREE char *v = option_value (options, key);

  return v && strcmp (v, "off") != 0;
}

static bool
same_file (const char *a, const char *b)
{
  struct stat sa, sb;

  return stat (a, &sa) == 0 && stat (b, &sb) == 0 && sa.st_dev == sb.st_dev
         && sa.st_ino == sb.st_ino;
}

/* The -B backing file must open, relative to the new image's directory
 * (checked before anything is created). */
static bool
check_backing (const char *dst, const struct convert_args *a)
{
  CLEANUP_FREE char *path = NULL;
  const char *slash = strrchr (dst, '/');
  strata_error *err = NULL;
  strata_node *b;

  if (a->backing[0] != '/' && slash && !strstr (a->backing, "://")) {
    if (asprintf (&path, "%.*s%s", (int)(slash - dst + 1), dst, a->backing)
        < 0)
      return false;
  }
  b = strata_open (path ? path : a->backing, a->bfmt, NULL,
                   STRATA_OPEN_FORCE_SHARE, &err);
  if (!b) {
    fprintf (stderr,
             "%s: Could not open '%s': Could not open backing file: "
             "%s\n",
             progname, dst, strata_error_message (err));
    strata_error_free (err);
    return false;
  }
  strata_close (b);
  return true;
}

/* Validate the options that need no file, in qemu-img's order. */
static bool
check_args (const struct convert_args *a)
{
  bool raw = strcmp (a->ofmt, "raw") == 0;

  if (a->target_is_zero && !a->skip_create) {
    fail_msg ("--target-is-zero requires use of -n flag");
    return false;
  }
  if (a->skip_create && a->options) {
    fail_msg ("-o has no effect when skipping image creation");
    return false;
  }
  if (!a->skip_create && raw && a->backing) {
    fprintf (stderr,
             "%s: Backing file not supported for file format "
             "'raw'\n",
             progname);
    return false;
  }
  if (!a->skip_create && raw && a->bfmt) {
    fprintf (stderr,
             "%s: Backing file format not supported for file format "
             "'raw'\n",
             progname);
    return false;
  }
  if (a->compressed && strcmp (a->ofmt, "qcow2") != 0) {
    fail_msg ("Compression not supported for this file format");
    return false;
  }
  if (a->compressed && option_set (a->options, "preallocation")) {
    fail_msg ("Compression and preallocation not supported at the same "
              "time");
    return false;
  }
  if (!a->skip_create && a->backing && !a->bfmt) {
    fail_msg ("Use of backing file requires explicit backing format");
    return false;
  }
  return true;
}

/* Create DST for TOTAL bytes; nothing is left behind on failure. */
static bool
create_target (const char *dst, uint64_t total, const struct convert_args *a)
{
  CLEANUP_FREE char *all = NULL;
  strata_error *err = NULL;

  /* The size and backing come last: they replace any given with -o, as
   * qemu-img ignores -o size. */
  if (asprintf (&all, "%s%ssize=%" PRIu64 "%s%s%s%s",
                a->options ? a->options : "", a->options ? "," : "", total,
                a->backing ? ",backing_file=" : "",
                a->backing ? a->backing : "", a->bfmt ? ",backing_fmt=" : "",
                a->bfmt ? a->bfmt : "")
      < 0)
    return false;
  if (!strata_create (dst, a->ofmt, all, STRATA_CREATE_DRY_RUN, &err)) {
    fail_create (dst, a->ofmt, err);
    return false;
  }
  if (a->backing && !check_backing (dst, a))
    return false;
  if (!strata_create (dst, a->ofmt, all, 0, &err)) {
    fail_create (dst, a->ofmt, err);
    return false;
  }
  return true;
}

static int
parse_convert_args (int argc, char **argv, struct convert_args *a)
{
  enum { OPT_TARGET_IS_ZERO = 256, OPT_UNSUPPORTED, OPT_SALVAGE, OPT_BITMAPS };
  static const struct option lopts[] = {
    { "help", no_argument, NULL, 'h' },
    { "force-share", no_argument, NULL, 'U' },
    { "target-is-zero", no_argument, NULL, OPT_TARGET_IS_ZERO },
    { "object", required_argument, NULL, OPT_UNSUPPORTED },
    IMG_IMAGE_OPTS_OPTION,
    { "target-image-opts", no_argument, NULL, OPT_UNSUPPORTED },
    { "salvage", no_argument, NULL, OPT_SALVAGE },
    { "bitmaps", no_argument, NULL, OPT_BITMAPS },
    { NULL, 0, NULL, 0 },
  };
  int c, idx;

  while ((c = getopt_long (argc, argv, ":hf:O:B:F:co:l:S:pt:T:qnm:WUr:C",
                           lopts, &idx))
         != -1) {
    switch (c) {
    case 'f': a->fmt = optarg; break;
    case 'O': a->ofmt = optarg; break;
    case 'B': a->backing = optarg; break;
    case 'F': a->bfmt = optarg; break;
    case 'c': a->compressed = true; break;
    case 'n': a->skip_create = true; break;
    case 'p': a->progress = true; break;
    case 'q': a->quiet = true; break;
    case 'W': a->out_of_order = true; break;
    case 'U': a->force_share = true; break;
    case 'C': break; /* copy offloading: the result is the same */
    case 't': a->cache = optarg; break;
    case 'T': a->src_cache = optarg; break;
    case OPT_TARGET_IS_ZERO: a->target_is_zero = true; break;
    case OPT_SALVAGE: a->salvage = true; break;
    case OPT_BITMAPS: a->bitmaps = true; break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'o': {
      char *n;
      if (asprintf (&n, "%s%s%s", a->options ? a->options : "",
                    a->options ? "," : "", optarg)
          < 0)
        return 1;
      free (a->options);
      a->options = n;
      break;
    }
    case 'S': {
      uint64_t v;
      if (optarg[0] == '-' || !parse_size (optarg, &v)) {
        fail_msg ("Invalid buffer size for sparse output specified. You may "
                  "use k, M, G, T, P or E suffixes for");
        fail_msg ("kilobytes, megabytes, gigabytes, terabytes, petabytes and "
                  "exabytes.");
        return 1;
      }
      if (v % SECTOR || v > (16u << 20)) {
        fail_msg ("Invalid buffer size for sparse output specified. Valid "
                  "sizes are multiples of 512 up to 16777216. Select 0 to "
                  "disable sparse detection (fully allocates output).");
        return 1;
      }
      a->min_sparse = v;
      break;
    }
    case 'm': {
      char *end;
      long v = strtol (optarg, &end, 10);
      if (*optarg == '\0' || *end || v < 1 || v > 16) {
        fail_msg ("Invalid number of coroutines. Allowed number of "
                  "coroutines is between 1 and 16");
        return 1;
      }
      a->threads = v;
      break;
    }
    case 'l': a->snapshot = optarg; break;
    case 'r':
      if (!img_parse_rate (optarg, &a->rate))
        return 1;
      break;
    case OPT_UNSUPPORTED:
      fprintf (stderr, "%s: --%s is not supported\n", progname,
               lopts[idx].name);
      return 1;
    case 'h':
      printf ("usage: %s convert [-f FMT] [-O FMT] [-B BACKING [-F BFMT]] "
              "[-c] [-o OPTS] [-n] [--target-is-zero] [-p] [-q] [-S SIZE] "
              "[-m N] [-W] [-U] [-t CACHE] [-T CACHE] [-C] SRC [SRC...] "
              "DST\n",
              progname);
      return -1;
    default: return img_option_error (c, argv);
    }
  }
  if (a->quiet)
    a->progress = false;
  /* qemu-img takes -o backing_file=... as -B (and backing_fmt as -F). */
  if (!a->backing
      && (a->opt_backing = option_value (a->options, "backing_file"))) {
    a->backing = a->opt_backing;
    if (!a->bfmt)
      a->bfmt = a->opt_bfmt = option_value (a->options, "backing_fmt");
  }
  /* As qemu-img: the target, if named, is the last argument. */
  if (img_has_help_option (a->options))
    return img_print_create_help (a->ofmt,
                                  argc - optind >= 2 ? argv[argc - 1] : NULL)
               ? 1
               : -1;
  if (argc - optind < 2) {
    fail_msg ("Must specify image file name");
    return 1;
  }
  return 0;
}

/* Record each layer's L2 span and the top's alignment (see struct
 * source). */
static bool
source_layers (struct source *s)
{
  int n = 0;

  for (strata_node *l = s->node; l; l = strata_backing (l))
    n++;
  if (!(s->spans = calloc (n, sizeof *s->spans)))
    return false;
  s->nlayers = n;
  s->align = SECTOR;
  n = 0;
  for (strata_node *l = s->node; l; l = strata_backing (l), n++) {
    struct strata_info info = { .size = sizeof info };
    struct strata_qcow2_info q = { .size = sizeof q };
    strata_error *err = NULL;
    uint64_t cs;

    if (!strata_get_info (l, &info, 0, &err)) {
      strata_error_free (err);
      continue;
    }
    cs = info.cluster_size;
    if (cs && strcmp (info.format, "qcow2") == 0
        && strata_get_qcow2_info (l, &q, 0, NULL))
      s->spans[n] = cs * (cs / (q.extended_l2 ? 16 : 8));
    if (n == 0 && cs > s->align)
      s->align = cs;
  }
  return true;
}

/* Open the sources (SRC...) and add up their sizes. */
static bool
open_sources (struct convert *c, char **names, int n,
              const struct convert_args *a)
{
  char extra[256];
  bool wt;

  if (!cache_mode_options (a->src_cache, a->fmt, extra, sizeof extra, &wt)) {
    fprintf (stderr, "%s: Invalid source cache option: %s\n", progname,
             a->src_cache);
    return false;
  }
  c->src = calloc (n, sizeof *c->src);
  if (!c->src)
    return false;
  for (int i = 0; i < n; i++) {
    int64_t len;

    c->src[i].name = names[i];
    c->src[i].node
        = a->snapshot
              ? img_open_snapshot (names[i], a->fmt, a->force_share,
                                   a->snapshot)
              : open_image (names[i], a->fmt, a->force_share, false, extra);
    if (!c->src[i].node)
      return false;
    c->nsrc = i + 1;
    len = strata_length (c->src[i].node);
    if (len < 0) {
      fprintf (stderr, "%s: Could not get size of %s: %s\n", progname,
               names[i], strerror ((int)-len));
      return false;
    }
    c->src[i].base = c->total;
    c->src[i].real = len;
    c->src[i].size = ROUND_UP ((uint64_t)len, SECTOR);
    c->total += c->src[i].size;
    if (!source_layers (&c->src[i])) {
      fail_msg ("out of memory");
      return false;
    }
  }
  return true;
}

/* Open (and first create, without -n) the target. */
static bool
open_target (struct convert *c, const char *dst, const struct convert_args *a)
{
  struct strata_info info = { .size = sizeof info };
  strata_error *err = NULL;
  char extra[256];
  bool wt;
  int64_t len;

  if (!img_cache_options (a->cache, a->ofmt, extra, sizeof extra, &wt))
    return false;
  c->wflags = wt ? STRATA_REQ_FUA : 0;
  for (int i = 0; i < c->nsrc; i++)
    if (same_file (c->src[i].name, dst)) {
      fprintf (stderr,
               "%s: %s: error while converting %s: Failed to get "
               "\"write\" lock\nIs another process using the image [%s]?\n",
               progname, dst, a->ofmt, dst);
      return false;
    }
  if (!a->skip_create && !create_target (dst, c->total, a))
    return false;
  c->dst = open_image (dst, a->ofmt, false, true, extra);
  if (!c->dst)
    return false;
  len = strata_length (c->dst);
  if (a->skip_create && len >= 0 && (uint64_t)len < c->total) {
    fail_msg ("output file is smaller than input file");
    return false;
  }
  if (!strata_get_info (c->dst, &info, 0, &err)) {
    fail_err (err);
    return false;
  }
  c->cluster = info.cluster_size ? info.cluster_size : 65536;
  /* A new image reads as zeros unless a backing file shows through. */
  c->zero_init = a->skip_create ? a->target_is_zero : !info.has_backing;
  return true;
}

/* qcow2 v3: the format that holds persistent bitmaps. */
static bool
holds_bitmaps (strata_node *n, const char **fmt)
{
  struct strata_info info = { .size = sizeof info };
  struct strata_qcow2_info q = { .size = sizeof q };

  if (!strata_get_info (n, &info, 0, NULL))
    return false;
  *fmt = info.format;
  return info.format_specific && !strcmp (info.format_specific, "qcow2")
         && strata_get_qcow2_info (n, &q, 0, NULL)
         && strcmp (q.compat, "0.10") != 0;
}

/* --bitmaps, as qemu-img checks it before creating the target.  strata
 * copies no bitmaps: a source that has some is refused. */
static bool
bitmaps_source (struct convert *c)
{
  struct strata_bitmap_info **l;
  strata_error *err = NULL;
  const char *fmt;
  size_t n;

  if (!holds_bitmaps (c->src[0].node, &fmt)) {
    fail_msg ("Source lacks bitmap support");
    return false;
  }
  if (!strata_bitmap_list (c->src[0].node, &l, &n, 0, &err)) {
    fail_err (err);
    return false;
  }
  strata_bitmap_list_free (l);
  if (n > 0) {
    fail_msg ("--bitmaps: copying persistent bitmaps is not supported");
    return false;
  }
  return true;
}

/* ... and after: the target must hold them too. */
static bool
bitmaps_target (struct convert *c)
{
  const char *fmt = "?";

  if (holds_bitmaps (c->dst, &fmt))
    return true;
  fprintf (stderr, "%s: Format driver '%s' does not support bitmaps\n",
           progname, fmt);
  return false;
}

int
cmd_convert (int argc, char **argv)
{
  struct convert_args a = { .ofmt = "raw",
                            .cache = "unsafe",
                            .src_cache = "writeback",
                            .min_sparse = 4096,
                            .threads = 8 };
  struct convert c = { 0 };
  const char *dst;
  int r = parse_convert_args (argc, argv, &a);

  if (r != 0) {
    free (a.options);
    free (a.opt_backing);
    free (a.opt_bfmt);
    return r < 0 ? 0 : r;
  }
  dst = argv[argc - 1];
  r = 1;
  if (a.snapshot && argc - 1 - optind > 1) {
    fail_msg ("No support for concatenating multiple snapshot");
    goto out;
  }
  if (a.bitmaps && argc - 1 - optind > 1) {
    fail_msg ("Copying bitmaps only possible with single source");
    goto out;
  }
  if (!check_args (&a)
      || !open_sources (&c, argv + optind, argc - 1 - optind, &a)
      || (a.bitmaps && !bitmaps_source (&c))
      || (img_image_opts = false) /* sources only: the target is a name */
      || !open_target (&c, dst, &a) || (a.bitmaps && !bitmaps_target (&c)))
    goto out;
  c.compressed = a.compressed;
  c.backing_mode = a.backing != NULL;
  c.out_of_order = a.out_of_order;
  c.progress = a.progress;
  c.min_sparse = a.min_sparse;
  c.salvage = a.salvage;
  ratelimit_init (&c.rl, a.rate, clock_now_ns ());
  c.align = MAX (a.min_sparse, SECTOR) / SECTOR;
  while (c.align & (c.align - 1))
    c.align &= c.align - 1; /* the power of two at or below */
  c.bufsize = c.compressed ? MAX (CONVERT_BUF, c.cluster) : CONVERT_BUF;
  r = convert_run (&c, a.rate ? 1 : a.threads);
out:
  if (c.dst)
    strata_close (c.dst);
  for (int i = 0; i < c.nsrc; i++) {
    strata_close (c.src[i].node);
    free (c.src[i].spans);
  }
  free (c.src);
  free (a.options);
  free (a.opt_backing);
  free (a.opt_bfmt);
  return r;
}
