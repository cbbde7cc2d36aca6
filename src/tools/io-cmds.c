/* strata-io: the commands that move no data or manage the image: map,
 * alloc, flush, length, info, truncate, reopen, open, close, and the
 * test helpers sleep, sigraise and abort, with qemu-io's output.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <strata/strata.h>

#include "tool-common.h"
#include "checked.h"
#include "clock.h"
#include "cleanup.h"
#include "opts.h"
#include "io.h"

/* qemu-io's map and alloc show what the top layer itself holds (a zero
 * cluster there counts), not what its backing files do. */
static bool
top_allocated (const struct strata_extent *e)
{
  return e->depth == 0 && (e->flags & STRATA_BS_ALLOCATED);
}

int
cmd_map (struct io_ctx *io, int argc, char **argv)
{
  int64_t size = strata_length (io->node);
  uint64_t off = 0;

  (void)argc;
  (void)argv;
  if (size < 0) {
    printf ("map failed: %s\n", strerror ((int)-size));
    return -1;
  }
  while (off < (uint64_t)size) {
    bool alloc = false;
    uint64_t start = off, run = 0;
    char s1[64], s2[64];

    /* Merge consecutive extents of the same allocation state. */
    while (off < (uint64_t)size) {
      struct strata_extent e = { .size = sizeof e };
      int r = strata_block_status (io->node, off, size - off, &e, 0);

      if (r < 0) {
        print_io_failure ("map", r);
        return -1;
      }
      bool here = top_allocated (&e);

      if (run && alloc != here)
        break;
      alloc = here;
      run += e.length;
      off += e.length;
    }
    cvtstr ((double)run, s1, sizeof s1);
    cvtstr ((double)start, s2, sizeof s2);
    printf ("%s (0x%" PRIx64 ") bytes %s allocated at offset %s (0x%" PRIx64
            ")\n",
            s1, run, alloc ? "   " : "not", s2, start);
  }
  return 0;
}

int
cmd_flush (struct io_ctx *io, int argc, char **argv)
{
  int r = strata_flush (io->node, 0);

  (void)argc;
  (void)argv;
  if (r < 0) {
    print_io_failure ("flush", r);
    return -1;
  }
  return 0;
}

int
cmd_length (struct io_ctx *io, int argc, char **argv)
{
  int64_t size = strata_length (io->node);
  char s[64];

  (void)argc;
  (void)argv;
  if (size < 0) {
    printf ("getlength: %s\n", strerror ((int)-size));
    return -1;
  }
  cvtstr ((double)size, s, sizeof s);
  printf ("%s\n", s);
  return 0;
}

int
cmd_info (struct io_ctx *io, int argc, char **argv)
{
  struct strata_info info = { .size = sizeof info };
  strata_error *err = NULL;
  char s[64];

  (void)argc;
  (void)argv;
  if (!strata_get_info (io->node, &info, 0, &err)) {
    fprintf (stderr, "%s: %s\n", progname, strata_error_message (err));
    strata_error_free (err);
    return -1;
  }
  printf ("format name: %s\n", info.format);
  cvtstr ((double)info.cluster_size, s, sizeof s);
  printf ("cluster size: %s\n", s);
  cvtstr ((double)info.vm_state_offset, s, sizeof s);
  printf ("vm state offset: %s\n", s);
  if (info.format_specific && strcmp (info.format_specific, "qcow2") == 0) {
    struct strata_qcow2_info q = { .size = sizeof q };
    bool v3;

    if (!strata_get_qcow2_info (io->node, &q, 0, &err)) {
      fprintf (stderr, "%s: %s\n", progname, strata_error_message (err));
      strata_error_free (err);
      return -1;
    }
    v3 = strcmp (q.compat, "0.10") != 0;

    printf ("Format specific information:\n");
    printf ("    compat: %s\n", q.compat);
    printf ("    compression type: %s\n", q.compression_type);
    if (v3)
      printf ("    lazy refcounts: %s\n", q.lazy_refcounts ? "true" : "false");
    printf ("    refcount bits: %d\n", q.refcount_bits);
    if (v3) {
      printf ("    corrupt: %s\n", q.corrupt ? "true" : "false");
      printf ("    extended l2: %s\n", q.extended_l2 ? "true" : "false");
    }
  }
  return 0;
}

int
cmd_truncate (struct io_ctx *io, int argc, char **argv)
{
  static const char *const modes[] = { "metadata", "falloc", "full" };
  uint64_t size;
  strata_error *err = NULL;
  int c;

  optind = 0;
  while ((c = getopt (argc, argv, "+m:")) != -1) {
    if (c != 'm')
      return command_usage ("truncate");
    if (strcmp (optarg, "off") == 0)
      continue;
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
      if (strcmp (optarg, modes[i]) == 0) {
        /* QEMU's other modes: strata truncates without preallocating. */
        fprintf (stderr, "%s: truncate -m %s is not supported\n", progname,
                 optarg);
        return -1;
      }
    }
    fprintf (stderr, "%s: Invalid preallocation mode '%s'\n", progname,
             optarg);
    return -1;
  }
  /* qemu-io crashes without a size, and ignores words after it where
   * strata-io refuses them. */
  if (optind == argc)
    return command_usage ("truncate");
  if (argc - optind != 1) {
    fprintf (stderr,
             "bad argument count %d to truncate, expected 1 "
             "argument\n",
             argc - 1);
    return -1;
  }
  if (!cvtnum (argv[optind], &size))
    return -1;
  if (!strata_truncate (io->node, size, 0, &err)) {
    fprintf (stderr, "%s: %s\n", progname, strata_error_message (err));
    strata_error_free (err);
    return -1;
  }
  return 0;
}

int
cmd_reopen (struct io_ctx *io, int argc, char **argv)
{
  int c;
  int rw = -1;
  strata_error *err = NULL;

  optind = 0;
  while ((c = getopt (argc, argv, "+rw")) != -1) {
    if (c == 'r' || c == 'w') {
      if (rw >= 0) {
        printf ("Only one -r/-w option may be given\n");
        return -1;
      }
      rw = c == 'w';
    }
    else
      return -1;
  }
  if (optind != argc)
    return command_usage ("reopen");
  if (rw < 0)
    return 0;
  if (!strata_reopen (io->node, rw, 0, &err)) {
    fprintf (stderr, "%s: %s\n", progname, strata_error_message (err));
    strata_error_free (err);
    return -1;
  }
  return 0;
}

int
cmd_alloc (struct io_ctx *io, int argc, char **argv)
{
  int64_t size = strata_length (io->node);
  uint64_t off, start, count = 512, sum = 0;
  char s[64];

  if (!cvtnum (argv[1], &off) || (argc > 2 && !cvtnum (argv[2], &count)))
    return -1;
  if (size < 0) {
    printf ("is_allocated failed: %s\n", strerror ((int)-size));
    return -1;
  }
  /* qemu-io counts only what lies before the end of the image. */
  count = off >= (uint64_t)size ? 0 : MIN (count, size - off);
  start = off;
  for (uint64_t left = count; left > 0;) {
    struct strata_extent e = { .size = sizeof e };
    int r = strata_block_status (io->node, off, left, &e, 0);
    uint64_t n;

    if (r < 0) {
      printf ("is_allocated failed: %s\n", strerror (-r));
      return -1;
    }
    n = MIN (e.length, left);
    if (n == 0)
      break;
    if (top_allocated (&e))
      sum += n;
    off += n;
    left -= n;
  }
  cvtstr ((double)start, s, sizeof s);
  printf ("%" PRIu64 "/%" PRIu64 " bytes allocated at offset %s\n", sum, count,
          s);
  return 0;
}

int
cmd_sleep (struct io_ctx *io, int argc, char **argv)
{
  char *end;
  long ms = strtol (argv[1], &end, 0);
  struct timespec ts;

  (void)io;
  (void)argc;
  if (ms < 0 || *end) {
    printf ("%s is not a valid number\n", argv[1]);
    return -1;
  }
  ts.tv_sec = ms / 1000;
  ts.tv_nsec = ms % 1000 * 1000000L;
  while (nanosleep (&ts, &ts) < 0 && errno == EINTR)
    ;
  return 0;
}

int
cmd_sigraise (struct io_ctx *io, int argc, char **argv)
{
  uint64_t sig;

  (void)io;
  (void)argc;
  if (!cvtnum (argv[1], &sig))
    return -1;
  if (sig > NSIG) {
    printf ("signal argument '%s' is too large to be a valid signal\n",
            argv[1]);
    return -1;
  }
  /* qemu-io's main loop holds SIGBUS, SIGUSR1, SIGALRM and SIGIO blocked
   * and SIGPIPE ignored for good, so raising one there has no effect:
   * none here either. */
  if (sig == SIGBUS || sig == SIGUSR1 || sig == SIGALRM || sig == SIGIO
      || sig == SIGPIPE)
    return 0;
  /* What was printed so far reaches the reader before the signal does;
   * a signal raise() refuses is ignored, as in qemu-io. */
  fflush (stdout);
  raise ((int)sig);
  return 0;
}

int
cmd_abort (struct io_ctx *io, int argc, char **argv)
{
  (void)io;
  (void)argc;
  (void)argv;
  fflush (stdout);
  abort ();
}

int
cmd_open (struct io_ctx *io, int argc, char **argv)
{
  unsigned flags = STRATA_OPEN_RDWR;
  const char *cache = "writeback", *extra = NULL;
  int c;

  if (io->node) {
    fprintf (stderr, "%s: file open already, try 'help close'\n", progname);
    return -1;
  }
  optind = 0;
  while ((c = getopt (argc, argv, "+rsCnkt:d:o:Ui:")) != -1) {
    switch (c) {
    case 'r': flags &= ~STRATA_OPEN_RDWR; break;
    case 'C': flags |= STRATA_OPEN_COPY_ON_READ; break;
    case 'n': cache = "none"; break;
    case 't': cache = optarg; break;
    case 'o': extra = optarg; break;
    case 'U': flags |= STRATA_OPEN_FORCE_SHARE; break;
    case 's':
    case 'k':
    case 'd':
    case 'i':
      fprintf (stderr, "%s: open -%c is not supported by strata-io\n",
               progname, c);
      return -1;
    default: return command_usage ("open");
    }
  }
  /* qemu-io can take the file from -o too; strata-io wants a path. */
  if (optind == argc) {
    fprintf (stderr, "%s: can't open: Must specify either driver or file\n",
             progname);
    return -1;
  }
  if (argc - optind != 1)
    return command_usage ("open");
  return open_image (io, argv[optind], NULL, cache, extra, flags) ? 0 : -1;
}

int
cmd_close (struct io_ctx *io, int argc, char **argv)
{
  (void)argc;
  (void)argv;
  return close_image (io) ? 0 : -1;
}
