/* strata-img bench: timed runs of reads or writes, as qemu-img bench (7.2)
 * issues them.
 *
 *   bench [-c N] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFF] [-w] [-t CACHE]
 *         [-f FMT] [--pattern=P] [--flush-interval=N] [--no-drain] [-q]
 *         [-U] FILE
 *
 * DEPTH threads take request numbers from one counter (qemu-img keeps
 * DEPTH requests in flight on its AIO context); request i starts at
 * OFF + i * STEP, wrapped around the image.  The time is taken up to the
 * last completion; the final flush of a write run is outside it.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <strata/strata.h>

#include "checked.h"
#include "cleanup.h"
#include "clock.h"
#include "opts.h"
#include "img.h"

struct bench {
  strata_node *node;
  bool write;
  bool writethrough;              /* -t writethrough/directsync: FUA */
  uint64_t count, bufsize, offset, step, size, flush_interval;
  int pattern;
  atomic_uint_fast64_t next;      /* index of the next request to issue */
  atomic_uint_fast64_t done;
  atomic_int error;               /* first failure, as a negative errno */
  pthread_mutex_t flush_lock;
};

static void *
bench_worker (void *arg)
{
  struct bench *b = arg;
  CLEANUP_FREE uint8_t *buf = NULL;

  if (posix_memalign ((void **) &buf, 4096, b->bufsize)) {
    atomic_store (&b->error, -ENOMEM);
    return NULL;
  }
  memset (buf, b->pattern, b->bufsize);
  for (;;) {
    uint64_t i = atomic_fetch_add (&b->next, 1);
    uint64_t off;
    int r;

    if (i >= b->count || atomic_load (&b->error))
      break;
    /* Request i starts at offset + i * step, wrapped around the image
     * after the first request, as qemu-img bench does. */
    off = i == 0 ? b->offset
                 : (uint64_t) (((unsigned __int128) b->offset
                                + (unsigned __int128) i * b->step) % b->size);
    r = b->write ? strata_pwrite (b->node, buf, b->bufsize, off,
                                  b->writethrough ? STRATA_REQ_FUA : 0)
                 : strata_pread (b->node, buf, b->bufsize, off, 0);
    if (r == 0 && b->flush_interval
        && (atomic_fetch_add (&b->done, 1) + 1) % b->flush_interval == 0) {
      pthread_mutex_lock (&b->flush_lock);
      r = strata_flush (b->node, 0);
      pthread_mutex_unlock (&b->flush_lock);
    }
    if (r < 0) {
      int expected = 0;
      atomic_compare_exchange_strong (&b->error, &expected, r);
      break;
    }
  }
  return NULL;
}

/* The options that are not the run's own state. */
struct bench_args {
  const char *fmt, *cache, *filename;
  uint64_t depth;
  bool quiet, force_share, no_drain;
};

/* A size option at most MAX (INT64_MAX when 0), or qemu-img's message
 * "Invalid WHAT specified". */
static bool
bench_size (const char *s, const char *what, bool nonzero, uint64_t max,
            uint64_t *out)
{
  if (!parse_size (s, out) || (nonzero && *out == 0) || *out > max) {
    fprintf (stderr, "%s: Invalid %s specified\n", progname, what);
    return false;
  }
  return true;
}

/* --pattern=P: a byte, in any base strtol() reads. */
static bool
bench_pattern (const char *s, int *out)
{
  char *end;
  long p = strtol (s, &end, 0);

  if (*s == '\0' || *end || p < 0 || p > 0xff) {
    fprintf (stderr, "%s: Invalid pattern byte specified\n", progname);
    return false;
  }
  *out = (int)p;
  return true;
}

/* 0 when parsed, else the exit code. */
static int
parse_args (int argc, char **argv, struct bench_args *a, struct bench *b)
{
  static const struct option lopts[] = {
    { "flush-interval", required_argument, NULL, 'I' },
    { "no-drain", no_argument, NULL, 'D' },
    { "pattern", required_argument, NULL, 'P' },
    { "force-share", no_argument, NULL, 'U' },
    { "help", no_argument, NULL, 'h' },
    IMG_IMAGE_OPTS_OPTION,
    { NULL, 0, NULL, 0 },
  };
  bool step_set = false;
  int c;

  while ((c = getopt_long (argc, argv, ":c:d:f:i:no:qs:S:t:wUh", lopts,
                           NULL)) != -1) {
    switch (c) {
    case 'c':
      if (!bench_size (optarg, "request count", true, INT_MAX, &b->count))
        return 1;
      break;
    case 'd':
      if (!bench_size (optarg, "queue depth", true, 4096, &a->depth))
        return 1;
      break;
    case 'f': a->fmt = optarg; break;
    case 'i': case 'n': break;   /* aio modes: strata uses threads */
    case 'o':
      if (!bench_size (optarg, "offset", false, INT64_MAX, &b->offset))
        return 1;
      break;
    case 'q': a->quiet = true; break;
    case 's':
      if (!bench_size (optarg, "buffer size", true, INT_MAX, &b->bufsize))
        return 1;
      break;
    case 'S':
      if (!bench_size (optarg, "step size", false, INT64_MAX, &b->step))
        return 1;
      step_set = true;
      break;
    case 't': a->cache = optarg; break;
    case 'w': b->write = true; break;
    case 'I':
      if (!bench_size (optarg, "flush interval", false, INT_MAX,
                       &b->flush_interval))
        return 1;
      break;
    case 'D': a->no_drain = true; break;
    case 'P':
      if (!bench_pattern (optarg, &b->pattern))
        return 1;
      break;
    case 'U': a->force_share = true; break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'h':
      printf ("usage: %s bench [-c count] [-d depth] [-f fmt] "
              "[--flush-interval=N] [--no-drain] [-o offset] "
              "[--pattern=P] [-q] [-s size] [-S step] [-t cache] [-w] [-U] "
              "FILE\n", progname);
      exit (0);
    default: return img_option_error (c, argv);
    }
  }
  if (optind != argc - 1)
    return img_usage_error ("Expecting one image file name");
  a->filename = argv[optind];
  if (b->flush_interval && !b->write) {
    fail_msg ("--flush-interval is only available in write tests");
    return 1;
  }
  if (a->no_drain && !b->flush_interval) {
    fail_msg ("--no-drain requires --flush-interval");
    return 1;
  }
  if (!step_set)
    b->step = b->bufsize;
  return 0;
}

/* DEPTH threads until the last request completed; the seconds taken. */
static double
bench_threads (struct bench *b, uint64_t depth)
{
  pthread_t *th = calloc (depth, sizeof *th);
  uint64_t t0, t1;

  t0 = clock_now_ns ();
  for (uint64_t i = 0; th && i < depth; i++)
    if (pthread_create (&th[i], NULL, bench_worker, b) != 0)
      atomic_store (&b->error, -EAGAIN);
  for (uint64_t i = 0; th && i < depth; i++)
    if (th[i])
      pthread_join (th[i], NULL);
  /* Timed up to the last completion, as qemu-img bench times it; the
   * flush on close is outside the measurement for both tools. */
  t1 = clock_now_ns ();
  free (th);
  return (double) (t1 - t0) / CLOCK_NS_PER_SEC;
}

static int
bench_run (const struct bench_args *a, struct bench *b)
{
  uint64_t depth = a->depth;
  char extra[128];
  double secs;
  int64_t size;

  if (!cache_mode_options (a->cache, a->fmt, extra, sizeof extra,
                           &b->writethrough)) {
    fprintf (stderr, "%s: Invalid cache mode\n", progname);
    return 1;
  }
  b->node = open_image (a->filename, a->fmt, a->force_share, b->write, extra);
  if (!b->node)
    return 1;
  size = strata_length (b->node);
  if (size <= 0) {
    fprintf (stderr, "%s: %s: the image is empty\n", progname, a->filename);
    strata_close (b->node);
    return 1;
  }
  b->size = size;
  if (!a->quiet)
    printf ("Sending %" PRIu64 " %s requests, %" PRIu64 " bytes each, %" PRIu64
            " in parallel (starting at offset %" PRIu64 ", step size %" PRIu64
            ")\n",
            b->count, b->write ? "write" : "read", b->bufsize, depth,
            b->offset, b->step);
  fflush (stdout);
  depth = MIN (depth, b->count);
  pthread_mutex_init (&b->flush_lock, NULL);
  secs = bench_threads (b, depth);
  if (b->write && !atomic_load (&b->error)) {
    int r = strata_flush (b->node, 0);
    if (r < 0)
      atomic_store (&b->error, r);
  }
  pthread_mutex_destroy (&b->flush_lock);
  strata_close (b->node);
  if (atomic_load (&b->error)) {
    const char *m = strata_last_error_message ();
    fprintf (stderr, "%s: Failed request: %s\n", progname,
             m ? m : strerror (-atomic_load (&b->error)));
    return 1;
  }
  if (!a->quiet)
    printf ("Run completed in %3.3f seconds.\n", secs);
  return 0;
}

int
cmd_bench (int argc, char **argv)
{
  struct bench_args a = { .cache = "writeback", .depth = 64 };
  struct bench b = { .count = 75000, .bufsize = 4096, .pattern = 0 };
  int r = parse_args (argc, argv, &a, &b);

  return r ? r : bench_run (&a, &b);
}
