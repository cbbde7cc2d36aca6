/* strata-img stream: pull the backing chain's data into an image that no
 * daemon has open (block-stream, offline).
 *
 *   strata-img stream [-q] [-p] [-f FMT] [-t CACHE] [-r RATE] [-b BASE] FILE
 *
 * Copies into FILE everything its chain holds above BASE (without -b: the
 * whole chain) that FILE does not allocate itself, with strata_copy_up in
 * chunks (zeros as zero clusters; chunks FILE allocates are skipped without
 * reading them), flushes, then rewrites FILE's header to name BASE as its
 * backing file (without -b: none).  The guest view never changes, so a
 * kill at any moment leaves a good image on the old chain with some data
 * copied, and running the command again copies only what is still
 * missing.
 *
 * BASE names a layer of the chain as the header above it records it, or
 * by a path to the same file.  The new header records that same name when
 * it means the same file from FILE's directory, else the absolute path.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "img.h"
#include "progress.h"
#include "checked.h"
#include "clock.h"
#include "cleanup.h"
#include "opts.h"
#include "ratelimit.h"

/* Progress is made durable (a flush) this often, so that a run that is
 * killed leaves its copies mapped and the next run skips them. */
#define FLUSH_BYTES (UINT64_C (64) << 20)
#define FLUSH_NS (UINT64_C (500) * 1000 * 1000)

/* Bytes per strata_copy_up call, rounded up to whole clusters: small enough
 * for a smooth rate and progress, large enough for long sequential I/O. */
#define STREAM_CHUNK (UINT64_C (1) << 20)

struct stream {
  const char *file, *fmt, *cache, *base;
  uint64_t rate; /* bytes per second, 0 = unlimited */
  bool progress, quiet;
};

/* 0 when parsed, else the exit code. */
static int
parse_args (int argc, char **argv, struct stream *st)
{
  static const struct option lopts[] = {
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  int c;

  while ((c = getopt_long (argc, argv, "hf:t:b:r:pq", lopts, NULL)) != -1) {
    switch (c) {
    case 'f': st->fmt = optarg; break;
    case 't': st->cache = optarg; break;
    case 'b': st->base = optarg; break;
    case 'p': st->progress = true; break;
    case 'q': st->quiet = true; break;
    case 'r':
      if (!img_parse_rate (optarg, &st->rate))
        return 1;
      break;
    case 'h':
      printf ("usage: %s stream [-q] [-p] [-f fmt] [-t cache] "
              "[-r rate_limit] [-b base] filename\n",
              progname);
      exit (0);
    default:
      fprintf (stderr, "Try '%s --help' for more information\n", progname);
      return 1;
    }
  }
  if (optind != argc - 1)
    return img_usage_error ("Expecting one image file name");
  st->file = argv[optind];
  st->progress = st->progress && !st->quiet;
  return 0;
}

/* Find BASE in TOP's chain: the layer, and the name to record in TOP's
 * header for it (*NAME is malloc'd). */
static strata_node *
find_base (strata_node *top, const struct stream *st, char **name)
{
  strata_error *err = NULL;
  strata_node *l = strata_chain_find (
      top, st->base, STRATA_CHAIN_PATH | STRATA_CHAIN_RECORDED, NULL, &err);

  if (!l) {
    strata_error_free (err);
    fprintf (stderr, "%s: Did not find '%s' in the backing chain of '%s'\n",
             progname, st->base, st->file);
    return NULL;
  }
  if (!(*name = strata_chain_backing_name (top, l, 0, &err))) {
    fail_err (err);
    return NULL;
  }
  return l;
}

/* Copy the chain above BASE into TOP, chunk by chunk. */
static bool
pull (strata_node *top, strata_node *base, const struct stream *st)
{
  int64_t size = strata_length (top);
  struct strata_info info = { .size = sizeof info };
  struct progress pr;
  uint64_t chunk = STREAM_CHUNK, unflushed = 0;
  uint64_t flushed_at = clock_now_ns ();
  struct ratelimit rl;

  if (size < 0) {
    fprintf (stderr, "%s: %s: cannot get the image length: %s\n", progname,
             st->file, strerror (-size));
    return false;
  }
  if (strata_get_info (top, &info, 0, NULL) && info.cluster_size)
    chunk = ROUND_UP (chunk, info.cluster_size);
  ratelimit_init (&rl, st->rate, clock_now_ns ());
  progress_start (&pr, PROGRESS_IMG, NULL, st->progress, (uint64_t)size);
  for (uint64_t pos = 0; pos < (uint64_t)size;) {
    uint64_t n = MIN (chunk, size - pos), copied;
    uint64_t start = clock_now_ns ();
    int r = strata_copy_up (top, base, pos, n, &copied, 0);

    if (r < 0) {
      fprintf (
          stderr, "%s: error while streaming at offset %" PRIu64 ": %s (%s)\n",
          progname, pos, strerror (-r), strata_last_error_message () ?: "");
      progress_end (&pr, false);
      return false;
    }
    pos += n;
    unflushed += copied;
    if (unflushed >= FLUSH_BYTES
        || (unflushed && clock_now_ns () - flushed_at >= FLUSH_NS)) {
      if ((r = strata_flush (top, 0)) < 0) {
        fprintf (stderr, "%s: cannot flush '%s': %s\n", progname, st->file,
                 strerror (-r));
        return false;
      }
      unflushed = 0;
      flushed_at = clock_now_ns ();
    }
    progress_update (&pr, pos, pr.total);
    if (copied) {
      ratelimit_account (&rl, copied, start);
      img_ratelimit_wait (&rl);
    }
  }
  progress_end (&pr, true);
  return true;
}

static int
stream (strata_node *top, const struct stream *st)
{
  CLEANUP_FREE char *name = NULL;
  strata_node *base = NULL;
  struct strata_info bi = { .size = sizeof bi };
  strata_error *err = NULL;
  int r;

  if (!strata_backing (top)) {
    fprintf (stderr, "%s: '%s' does not have a backing file\n", progname,
             st->file);
    return 1;
  }
  if (st->base && !(base = find_base (top, st, &name)))
    return 1;
  /* With BASE the direct backing file, nothing lies between. */
  if (base != strata_backing (top)) {
    if (!pull (top, base, st))
      return 1;
    if ((r = strata_flush (top, 0)) < 0) {
      fprintf (stderr, "%s: cannot flush '%s': %s\n", progname, st->file,
               strerror (-r));
      return 1;
    }
    if ((base && !strata_get_info (base, &bi, 0, &err))
        || !strata_change_backing_file (top, name, base ? bi.format : NULL, 0,
                                        &err)) {
      fail_err (err);
      return 1;
    }
  }
  if (!st->quiet)
    printf ("Image streamed.\n");
  return 0;
}

int
cmd_stream (int argc, char **argv)
{
  struct stream st = { .cache = "writeback" };
  char cacheopts[128];
  strata_node *top;
  bool wt;
  int r = parse_args (argc, argv, &st);

  if (r)
    return r;
  if (st.fmt && !strata_driver_exists (st.fmt)) {
    fprintf (stderr, "%s: Invalid format name: '%s'\n", progname, st.fmt);
    return 1;
  }
  if (!img_cache_options (st.cache, st.fmt, cacheopts, sizeof cacheopts, &wt))
    return 1;
  if (!(top = open_image (st.file, st.fmt, false, true, cacheopts)))
    return 1;
  r = stream (top, &st);
  strata_close (top);
  return r;
}
