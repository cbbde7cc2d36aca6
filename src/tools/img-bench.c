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

#include "util/checked.h"
#include "util/cleanup.h"
#include "util/opts.h"
#include "tools/img.h"

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

int
cmd_bench (int argc, char **argv)
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
  struct bench b = { .count = 75000, .bufsize = 4096, .pattern = 0 };
  const char *fmt = NULL, *cache = "writeback";
  uint64_t depth = 64;
  bool quiet = false, force_share = false, step_set = false;
  bool no_drain = false;
  char extra[128];
  pthread_t *th;
  double t0, t1;
  int64_t size;
  int c;

  while ((c = getopt_long (argc, argv, ":c:d:f:i:no:qs:S:t:wUh", lopts,
                           NULL)) != -1) {
    switch (c) {
    case 'c':
      if (!parse_size (optarg, &b.count) || b.count == 0
          || b.count > INT_MAX) {
        fprintf (stderr, "%s: Invalid request count specified\n", progname);
        return 1;
      }
      break;
    case 'd':
      if (!parse_size (optarg, &depth) || depth == 0 || depth > 4096) {
        fprintf (stderr, "%s: Invalid queue depth specified\n", progname);
        return 1;
      }
      break;
    case 'f': fmt = optarg; break;
    case 'i': case 'n': break;   /* aio modes: strata uses threads */
    case 'o':
      if (!parse_size (optarg, &b.offset) || b.offset > INT64_MAX) {
        fprintf (stderr, "%s: Invalid offset specified\n", progname);
        return 1;
      }
      break;
    case 'q': quiet = true; break;
    case 's':
      if (!parse_size (optarg, &b.bufsize) || b.bufsize == 0
          || b.bufsize > INT_MAX) {
        fprintf (stderr, "%s: Invalid buffer size specified\n", progname);
        return 1;
      }
      break;
    case 'S':
      if (!parse_size (optarg, &b.step) || b.step > INT64_MAX) {
        fprintf (stderr, "%s: Invalid step size specified\n", progname);
        return 1;
      }
      step_set = true;
      break;
    case 't': cache = optarg; break;
    case 'w': b.write = true; break;
    case 'I':
      if (!parse_size (optarg, &b.flush_interval)
          || b.flush_interval > INT_MAX) {
        fprintf (stderr, "%s: Invalid flush interval specified\n",
                 progname);
        return 1;
      }
      break;
    case 'D': no_drain = true; break;
    case 'P': {
      char *end;
      long p = strtol (optarg, &end, 0);
      if (*optarg == '\0' || *end || p < 0 || p > 0xff) {
        fprintf (stderr, "%s: Invalid pattern byte specified\n", progname);
        return 1;
      }
      b.pattern = (int) p;
      break;
    }
    case 'U': force_share = true; break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'h':
      printf ("usage: %s bench [-c count] [-d depth] [-f fmt] "
              "[--flush-interval=N] [--no-drain] [-o offset] "
              "[--pattern=P] [-q] [-s size] [-S step] [-t cache] [-w] [-U] "
              "FILE\n", progname);
      return 0;
    default: return img_option_error (c, argv);
    }
  }
  if (optind != argc - 1)
    return img_usage_error ("Expecting one image file name");
  if (b.flush_interval && !b.write) {
    fail_msg ("--flush-interval is only available in write tests");
    return 1;
  }
  if (no_drain && !b.flush_interval) {
    fail_msg ("--no-drain requires --flush-interval");
    return 1;
  }
  if (!step_set)
    b.step = b.bufsize;
  if (!cache_mode_options (cache, fmt, extra, sizeof extra,
                           &b.writethrough)) {
    fprintf (stderr, "%s: Invalid cache mode\n", progname);
    return 1;
  }
  b.node = open_image (argv[optind], fmt, force_share, b.write, extra);
  if (!b.node)
    return 1;
  size = strata_length (b.node);
  if (size <= 0) {
    fprintf (stderr, "%s: %s: the image is empty\n", progname, argv[optind]);
    strata_close (b.node);
    return 1;
  }
  b.size = size;
  if (!quiet)
    printf ("Sending %" PRIu64 " %s requests, %" PRIu64 " bytes each, %" PRIu64
            " in parallel (starting at offset %" PRIu64 ", step size %" PRIu64
            ")\n", b.count, b.write ? "write" : "read", b.bufsize, depth,
            b.offset, b.step);
  fflush (stdout);
  depth = MIN (depth, b.count);
  th = calloc (depth, sizeof *th);
  pthread_mutex_init (&b.flush_lock, NULL);
  t0 = now ();
  for (uint64_t i = 0; th && i < depth; i++)
    if (pthread_create (&th[i], NULL, bench_worker, &b) != 0)
      atomic_store (&b.error, -EAGAIN);
  for (uint64_t i = 0; th && i < depth; i++)
    if (th[i])
      pthread_join (th[i], NULL);
  /* Timed up to the last completion, as qemu-img bench times it; the
   * flush on close below is outside the measurement for both tools. */
  t1 = now ();
  if (b.write && !atomic_load (&b.error)) {
    int r = strata_flush (b.node, 0);
    if (r < 0)
      atomic_store (&b.error, r);
  }
  free (th);
  pthread_mutex_destroy (&b.flush_lock);
  strata_close (b.node);
  if (atomic_load (&b.error)) {
    const char *m = strata_last_error_message ();
    fprintf (stderr, "%s: Failed request: %s\n", progname,
             m ? m : strerror (-atomic_load (&b.error)));
    return 1;
  }
  if (!quiet)
    printf ("Run completed in %3.3f seconds.\n", t1 - t0);
  return 0;
}
