/* strata-img commit: copy an image's changes into a backing file, as
 * qemu-img commit (7.2) does.
 *
 *   top.qcow2 --> mid.qcow2 --> base.qcow2
 *
 * Without -b the base is TOP's immediate backing file.  Every range some
 * layer above BASE defines (allocated data, zero clusters, or the zeros
 * past the end of a shorter intermediate layer) is read through TOP and
 * written into BASE: data as data, zeros as zero writes, in chunks of at
 * most CHUNK bytes.  BASE grows first when TOP is larger.  Then BASE is
 * flushed and, unless -d or -b was given (-b implies -d, as in qemu-img,
 * because the layers between would no longer match), TOP is emptied so
 * that it reads through to BASE.  TOP's header is never changed.
 *
 * Crash safety: until BASE is flushed TOP is untouched and still shows
 * the guest's data; BASE only receives data TOP shows anyway, so a re-run
 * copies the same bytes again and finishes.  Emptying TOP starts only
 * after BASE holds everything durably, so a crash while emptying leaves
 * TOP reading the same bytes (part from itself, part from BASE), and a
 * re-run finishes the job.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "img.h"
#include "progress.h"
#include "checked.h"
#include "clock.h"
#include "cleanup.h"
#include "opts.h"
#include "ratelimit.h"

#define CHUNK (1u << 20)

struct commit {
  const char *file, *fmt, *cache, *base_name;
  bool quiet, progress, drop;
  uint64_t rate; /* bytes per second, 0 = unlimited */
};

/* 0 when parsed, else the exit code. */
static int
parse_args (int argc, char **argv, struct commit *c)
{
  static const struct option lopts[] = {
    { "help", no_argument, NULL, 'h' },
    IMG_IMAGE_OPTS_OPTION,
    { NULL, 0, NULL, 0 },
  };
  bool keep = false;
  int o;

  while ((o = getopt_long (argc, argv, ":f:ht:b:dpqr:", lopts, NULL)) != -1) {
    switch (o) {
    case 'f': c->fmt = optarg; break;
    case 't': c->cache = optarg; break;
    case 'b': c->base_name = optarg; break;
    case 'd': keep = true; break;
    case 'p': c->progress = true; break;
    case 'q': c->quiet = true; break;
    case 'r':
      if (!img_parse_rate (optarg, &c->rate))
        return 1;
      break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'h':
      printf ("usage: %s commit [-q] [-f fmt] [-t cache] [-b base] "
              "[-r rate_limit] [-d] [-p] filename\n",
              progname);
      exit (0);
    default: return img_option_error (o, argv);
    }
  }
  if (c->quiet)
    c->progress = false;
  if (optind != argc - 1) {
    return img_usage_error ("Expecting one image file name");
  }
  c->file = argv[optind];
  /* -b implies -d: the layers between TOP and BASE no longer match it. */
  c->drop = !keep && !c->base_name;
  return 0;
}

/* The base node and its depth below TOP (1 = immediate backing), or NULL
 * after printing qemu-img's message.  As qemu-img, -b names the layer as
 * the header above it records it, or as a path from that header's
 * directory. */
static strata_node *
find_base (strata_node *top, const struct commit *c, int *depth)
{
  strata_error *err = NULL;
  strata_node *b;

  if (!strata_backing (top)) {
    fail_msg ("Image does not have a backing file");
    return NULL;
  }
  if (!c->base_name) {
    *depth = 1;
    return strata_backing (top);
  }
  b = strata_chain_find (top, c->base_name,
                         STRATA_CHAIN_RECORDED | STRATA_CHAIN_RELATIVE, depth,
                         &err);
  if (!b) {
    strata_error_free (err);
    fprintf (stderr, "%s: Did not find '%s' in the backing chain of '%s'\n",
             progname, c->base_name, c->file);
  }
  return b;
}

/* Copy one extent (at most CHUNK bytes) of TOP's view into BASE. */
static int
copy_extent (strata_node *top, strata_node *base, uint64_t off, uint64_t n,
             bool zero, uint8_t *buf)
{
  int r;

  if (zero)
    return strata_pwrite_zeroes (base, off, n, 0);
  if ((r = strata_pread (top, buf, n, off, 0)) < 0)
    return r;
  return strata_pwrite (base, buf, n, off, 0);
}

/* The run of bytes from OFF (before END) that is all to copy or all to
 * skip, and all zeros or all data: *N bytes, *COPY, *ZERO. */
static int
next_run (strata_node *top, int base_depth, uint64_t off, uint64_t end,
          uint64_t *n, bool *copy, bool *zero)
{
  struct strata_extent ext = { .size = sizeof ext };
  int r;

  for (*n = 0; off + *n < end; *n += ext.length) {
    bool c, z;
    if ((r = strata_block_status (top, off + *n, end - off - *n, &ext, 0)) < 0)
      return r;
    /* Zeros no layer allocates stand for the layer below the one they
     * are reported at (its backing file ends before them): copied when
     * that layer is above BASE, so BASE's own data is hidden. */
    c = ext.depth + !(ext.flags & STRATA_BS_ALLOCATED) < base_depth;
    z = c && (ext.flags & STRATA_BS_ZERO);
    if (*n && (c != *copy || z != *zero))
      break;
    *copy = c;
    *zero = z;
  }
  return 0;
}

/* Write into BASE every range of TOP that a layer above BASE defines, in
 * runs within aligned windows of CHUNK bytes (at least a cluster of BASE,
 * so that zeros reach it as whole zero clusters, not partial writes). */
static int
copy_down (strata_node *top, strata_node *base, int base_depth, uint64_t len,
           uint64_t chunk, const struct commit *c, struct progress *pr)
{
  CLEANUP_FREE uint8_t *buf = malloc (chunk);
  struct ratelimit rl;
  uint64_t off = 0, n;
  bool copy = false, zero = false;
  int r;

  if (!buf)
    return -ENOMEM;
  ratelimit_init (&rl, c->rate, clock_now_ns ());
  for (; off < len; off += n) {
    uint64_t end = MIN (len, ROUND_DOWN (off, chunk) + chunk), start;
    if ((r = next_run (top, base_depth, off, end, &n, &copy, &zero)) < 0)
      return r;
    if (copy) {
      img_ratelimit_wait (&rl);
      start = clock_now_ns ();
      if ((r = copy_extent (top, base, off, n, zero, buf)) < 0)
        return r;
      ratelimit_account (&rl, n, start);
    }
    progress_update (pr, off + n, pr->total);
  }
  return 0;
}

/* BASE as large as TOP (qemu-img commit never shrinks it). */
static bool
grow_base (strata_node *base, uint64_t len)
{
  strata_error *err = NULL;
  int64_t blen = strata_length (base);

  if (blen < 0) {
    fprintf (stderr, "%s: Could not get the base image length: %s\n", progname,
             strerror ((int)-blen));
    return false;
  }
  if ((uint64_t)blen >= len || strata_truncate (base, len, 0, &err))
    return true;
  fprintf (stderr,
           "%s: Top image is larger than the base image, and "
           "resizing the base image failed: %s\n",
           progname, strata_error_message (err));
  strata_error_free (err);
  return false;
}

static uint64_t
chunk_size (strata_node *base)
{
  struct strata_info i = { .size = sizeof i };
  strata_error *err = NULL;

  if (!strata_get_info (base, &i, 0, &err)) {
    strata_error_free (err);
    return CHUNK;
  }
  return MAX (CHUNK, (uint64_t)i.cluster_size);
}

static int
run_commit (strata_node *top, const struct commit *c)
{
  struct progress pr;
  strata_error *err = NULL;
  strata_node *base;
  int64_t len = strata_length (top);
  int depth, r;

  if (!(base = find_base (top, c, &depth)))
    return 1;
  if (len < 0) {
    fprintf (stderr, "%s: Could not get the image length: %s\n", progname,
             strerror ((int)-len));
    return 1;
  }
  if (!strata_reopen (base, true, 0, &err)) {
    fprintf (stderr, "%s: Block job failed: %s\n", progname,
             strata_error_message (err));
    strata_error_free (err);
    return 1;
  }
  progress_start (&pr, PROGRESS_IMG, NULL, c->progress, (uint64_t)len);
  if (!grow_base (base, (uint64_t)len))
    return 1;
  if ((r = copy_down (top, base, depth, (uint64_t)len, chunk_size (base), c,
                      &pr))
          < 0
      || (r = strata_flush (base, 0)) < 0) {
    const char *m = strata_last_error_message ();
    progress_end (&pr, false);
    fprintf (stderr, "%s: Block job failed: %s\n", progname,
             m ? m : strerror (-r));
    return 1;
  }
  if (c->drop && !strata_make_empty (top, 0, &err)) {
    fprintf (stderr, "%s: Could not empty %s: %s\n", progname, c->file,
             strata_error_message (err));
    strata_error_free (err);
    return 1;
  }
  progress_end (&pr, true);
  return 0;
}

int
cmd_commit (int argc, char **argv)
{
  struct commit c = { .cache = "writeback" };
  char cacheopts[128];
  strata_node *top;
  bool wt;
  int r = parse_args (argc, argv, &c);

  if (r)
    return r;
  if (!img_cache_options (c.cache, c.fmt, cacheopts, sizeof cacheopts, &wt))
    return 1;
  if (!(top = open_image (c.file, c.fmt, false, true, cacheopts)))
    return 1;
  r = run_commit (top, &c);
  strata_close (top);
  if (r == 0 && !c.quiet)
    printf ("Image committed.\n");
  return r;
}
