/* strata-io: an I/O tool with qemu-io's command line and output lines.
 *
 *   strata-io [-f FMT] [-r] [-U] [-t CACHE] [-n] [-o OPTS] [-c CMD]... [FILE]
 *
 * Commands run in order from -c, or else one per line from standard
 * input; without FILE, "open" opens one.  The output lines ("read 512/512
 * bytes at offset 0", the timing line, "Pattern verification failed at
 * offset ...", the map and alloc lines) are those of qemu-io so that
 * scripts and test harnesses written for it work unchanged.  The exit
 * status is 1 when any command failed.
 *
 * qemu-io's aio_read and aio_write run here to completion before the next
 * command, so their completion lines come at once; qemu-io prints them
 * when its main loop next runs (aio_flush, or exit).  With an aio_flush
 * after each request the two print the same.
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

#define MAX_REQUEST 2147483136ULL /* qemu-io's limit for one request */
#define CHUNK (4u << 20)          /* bytes moved per call */

static const char *progname = "strata-io";

struct io_ctx {
  strata_node *node;
  const char *filename;
  const char *format;
  bool writethrough; /* -t writethrough/directsync: FUA every write */
};

/* ---- qemu-io's number and report formats ---- */

static void
cvtstr (double value, char *str, size_t size)
{
  static const char *const suffix[] = {
    " EiB", " PiB", " TiB", " GiB", " MiB", " KiB",
  };
  const char *sfx = " bytes";
  char *trim;

  for (int i = 0; i < 6; i++) {
    double unit = (double)(UINT64_C (1) << (10 * (6 - i)));
    if (value >= unit) {
      value /= unit;
      sfx = suffix[i];
      break;
    }
  }
  snprintf (str, size - 6, "%.3f", value);
  trim = strstr (str, ".000");
  if (trim)
    *trim = '\0';
  strcat (str, sfx);
}

static void
print_report (const char *op, double t, uint64_t offset, uint64_t bytes,
              uint64_t total, int cnt)
{
  char s1[64], s2[64], ts[64];
  unsigned secs = (unsigned)t, centi = (unsigned)((t - secs) * 100);

  printf ("%s %" PRIu64 "/%" PRIu64 " bytes at offset %" PRIu64 "\n", op,
          total, bytes, offset);
  if (secs < 60)
    snprintf (ts, sizeof ts, "%02u.%02u sec", secs, centi);
  else
    snprintf (ts, sizeof ts, "%u:%02u:%02u.%02u", secs / 3600, secs / 60 % 60,
              secs % 60, centi);
  if (t <= 0)
    t = 1e-9;
  cvtstr ((double)total, s1, sizeof s1);
  cvtstr ((double)total / t, s2, sizeof s2);
  printf ("%s, %d ops; %s (%s/sec and %.4f ops/sec)\n", s1, cnt, ts, s2,
          cnt / t);
}

/* -C: qemu-io's one machine-readable line instead of the two above. */
static void
print_csv (double t, uint64_t total, int cnt)
{
  unsigned secs = (unsigned)t, centi = (unsigned)((t - secs) * 100);

  if (t <= 0)
    t = 1e-9;
  printf ("%" PRIu64 ",%d,%u:%02u:%02u.%02u,%.3f,%.3f\n", total, cnt,
          secs / 3600, secs / 60 % 60, secs % 60, centi, total / t, cnt / t);
}

/* The report every data command ends with, unless -q; T0 is when the
 * command started (clock_now_ns()). */
static void
report (const char *op, bool csv, uint64_t t0, uint64_t offset, uint64_t len)
{
  double t = (double) (clock_now_ns () - t0) / CLOCK_NS_PER_SEC;

  if (csv)
    print_csv (t, len, 1);
  else
    print_report (op, t, offset, len, len, 1);
}

static void
dump_buffer (const uint8_t *p, uint64_t offset, uint64_t len)
{
  for (uint64_t i = 0; i < len; i += 16) {
    uint64_t n = MIN (16, len - i);

    printf ("%08" PRIx64 ":  ", offset + i);
    for (uint64_t j = 0; j < n; j++)
      printf ("%02x ", p[i + j]);
    printf (" ");
    for (uint64_t j = 0; j < n; j++)
      putchar (isalnum (p[i + j]) ? p[i + j] : '.');
    printf ("\n");
  }
}

/* Parse a number as qemu-io's cvtnum does (suffixes, 0x). */
static bool
cvtnum (const char *s, uint64_t *out)
{
  if (!parse_size (s, out)) {
    printf ("Parsing error: non-numeric argument, or extraneous/"
            "unrecognized suffix -- %s\n",
            s);
    return false;
  }
  if (*out > INT64_MAX) {
    /* A number, just too big: qemu-io's ERANGE message. */
    printf ("Parsing error: argument too large -- %s\n", s);
    return false;
  }
  return true;
}

static bool
parse_pattern (const char *s, int *pattern)
{
  char *end;
  long v = strtol (s, &end, 0);

  if (*s == '\0' || *end || v < 0 || v > 255) {
    printf ("%s is not a valid pattern byte\n", s);
    return false;
  }
  *pattern = (int)v;
  return true;
}

static bool
parse_off_len (char **argv, uint64_t *off, uint64_t *len)
{
  if (!cvtnum (argv[0], off) || !cvtnum (argv[1], len))
    return false;
  if (*len > MAX_REQUEST) {
    printf ("length cannot exceed %llu, given %s\n", MAX_REQUEST, argv[1]);
    return false;
  }
  return true;
}

static void
print_io_failure (const char *op, int r)
{
  const char *detail = strata_last_error_message ();

  if (detail)
    printf ("%s failed: %s (%s)\n", op, strerror (-r), detail);
  else
    printf ("%s failed: %s\n", op, strerror (-r));
}

/* ---- opening and closing ---- */

/* Open FILENAME into IO (which has none open) as main's options or the
 * open command ask, with qemu-io's messages.  Returns false after one. */
static bool
open_image (struct io_ctx *io, const char *filename, const char *format,
            const char *cache, const char *extra, unsigned flags)
{
  char cacheopts[128], *options = NULL;
  strata_error *err = NULL;
  bool writethrough;

  if ((flags & STRATA_OPEN_FORCE_SHARE) && (flags & STRATA_OPEN_RDWR)) {
    /* qemu-io -U implies nothing about writing; refuse as it does. */
    fprintf (stderr,
             "%s: can't open device %s: force-share=on can only be "
             "used with read-only images\n",
             progname, filename);
    return false;
  }
  if (!cache_mode_options (cache, format, cacheopts, sizeof cacheopts,
                           &writethrough)) {
    fprintf (stderr, "%s: Invalid cache option: %s\n", progname, cache);
    return false;
  }
  if (asprintf (&options, "%s%s%s", cacheopts, extra ? "," : "",
                extra ? extra : "")
      < 0)
    return false;
  io->node = strata_open (filename, format, options, flags, &err);
  free (options);
  if (!io->node) {
    fprintf (stderr, "%s: can't open device %s: %s\n", progname, filename,
             strata_error_message (err));
    strata_error_free (err);
    return false;
  }
  io->filename = filename;
  io->format = format;
  io->writethrough = writethrough;
  /* A driver named in the options is no probe. */
  if (!format && !(extra && strstr (extra, "driver=")))
    tool_warn_probed_raw (io->node, filename);
  return true;
}

/* Flush and close IO's image.  Returns false when the flush failed (the
 * image is closed all the same). */
static bool
close_image (struct io_ctx *io)
{
  bool ok = strata_flush (io->node, 0) == 0;

  strata_close (io->node);
  io->node = NULL;
  io->filename = NULL;
  io->format = NULL;
  return ok;
}

/* ---- commands ---- */

/* Each returns 0 on success and -1 when the command failed. */

/* The options read, readv and aio_read share. */
struct read_opts {
  int pattern;      /* -P: the byte every checked byte must be, or -1 */
  uint64_t pat_off; /* -s: where the check starts, from OFF */
  uint64_t pat_len; /* -l: how many bytes it checks */
  bool have_pat_len;
  bool quiet, verbose, csv;
};

static int command_usage (const char *name);

/* One option of read, readv or aio_read: false when it is not one. */
static bool
read_option (int c, struct read_opts *o, bool *bad)
{
  switch (c) {
  case 'P': *bad = !parse_pattern (optarg, &o->pattern); return true;
  case 'q': o->quiet = true; return true;
  case 'v': o->verbose = true; return true;
  case 'C': o->csv = true; return true;
  default: return false;
  }
}

/* Read LEN bytes at OFF in chunks, checking O's pattern over its range
 * and dumping them with -v.  *MISMATCH tells whether the check failed
 * (qemu-io's line already printed).  Returns 0, or -1 after
 * "FAILOP failed: ..." when the I/O failed. */
static int
read_checked (struct io_ctx *io, uint64_t off, uint64_t len,
              const struct read_opts *o, const char *failop, bool *mismatch)
{
  uint64_t cs = o->pat_off, ce = o->pat_off + o->pat_len;
  uint64_t first_bad = 0;
  uint8_t bad_byte = 0;
  CLEANUP_FREE uint8_t *buf = NULL;

  *mismatch = false;
  /* qemu-io prints the pattern verdict before the hexdump, so -v keeps
   * the whole request in memory (qemu-io does too) and dumps it last. */
  buf = malloc ((o->verbose ? len : MIN (len, CHUNK)) ?: 1);
  if (!buf) {
    printf ("%s failed: %s\n", failop, strerror (ENOMEM));
    return -1;
  }
  for (uint64_t done = 0; done < len || len == 0;) {
    size_t n = MIN (len - done, CHUNK);
    uint8_t *p = buf + (o->verbose ? done : 0);
    int r = strata_pread (io->node, p, n, off + done, 0);

    if (r < 0) {
      print_io_failure (failop, r);
      return -1;
    }
    for (uint64_t i = MAX (cs, done);
         o->pattern >= 0 && !*mismatch && i < MIN (ce, done + n); i++) {
      if (p[i - done] != o->pattern) {
        *mismatch = true;
        first_bad = off + i;
        bad_byte = p[i - done];
      }
    }
    done += n;
    if (len == 0)
      break;
  }
  /* Exactly qemu-io's line on stdout, which harnesses diff; where the
   * first difference is goes to stderr for the person reading it. */
  if (*mismatch) {
    printf ("Pattern verification failed at offset %" PRIu64 ", %" PRIu64
            " bytes\n",
            off + cs, ce - cs);
    fflush (stdout);
    fprintf (stderr,
             "%s: first mismatch at offset %" PRIu64 " (0x%" PRIx64
             "): expected 0x%02x, read 0x%02x\n",
             progname, first_bad, first_bad, o->pattern, bad_byte);
  }
  if (o->verbose)
    dump_buffer (buf, off, len);
  return 0;
}

static int
cmd_read (struct io_ctx *io, int argc, char **argv)
{
  struct read_opts o = { .pattern = -1 };
  bool bad = false, have_pat_off = false, mismatch;
  uint64_t off, len;
  uint64_t t0;
  int c;

  optind = 0;
  while ((c = getopt (argc, argv, "+bCl:pP:qs:v")) != -1) {
    if (read_option (c, &o, &bad)) {
      if (bad)
        return -1;
      continue;
    }
    switch (c) {
    case 'b':
      printf ("read -b: strata-io has no VM state to read\n");
      return -1;
    case 'p': break; /* qemu-io ignores it too */
    case 's':
      if (!cvtnum (optarg, &o.pat_off))
        return -1;
      have_pat_off = true;
      break;
    case 'l':
      if (!cvtnum (optarg, &o.pat_len))
        return -1;
      o.have_pat_len = true;
      break;
    default: return -1;
    }
  }
  if (argc - optind != 2)
    return command_usage ("read");
  if (o.pattern < 0 && (have_pat_off || o.have_pat_len))
    return command_usage ("read");
  if (!parse_off_len (argv + optind, &off, &len))
    return -1;
  /* Without -l the check runs from -s to the end of the request. */
  if (!o.have_pat_len)
    o.pat_len = o.pat_off <= len ? len - o.pat_off : 0;
  if (o.pat_off > len || o.pat_len > len - o.pat_off) {
    printf ("pattern verification range exceeds end of read data\n");
    return -1;
  }
  t0 = clock_now_ns ();
  if (read_checked (io, off, len, &o, "read", &mismatch) < 0)
    return -1;
  if (!o.quiet)
    report ("read", o.csv, t0, off, len);
  return mismatch ? -1 : 0;
}

/* write -s FILE: LEN bytes of FILE's content, repeated from its start
 * when FILE is shorter (qemu-io's qemu_io_alloc_from_file), or NULL after
 * a message on stderr. */
static uint8_t *
data_from_file (const char *file, uint64_t len)
{
  FILE *f = fopen (file, "r");
  uint8_t *buf;
  size_t got;

  if (!f) {
    perror (file);
    return NULL;
  }
  if (len > SIZE_MAX || !(buf = calloc (1, len ?: 1))) {
    fprintf (stderr, "%s: %s\n", file, strerror (ENOMEM));
    fclose (f);
    return NULL;
  }
  got = fread (buf, 1, len, f);
  if (ferror (f)) {
    perror (file);
    got = 0;
  }
  else if (got == 0)
    fprintf (stderr, "%s: file is empty\n", file);
  fclose (f);
  if (got == 0) {
    free (buf);
    return NULL;
  }
  for (uint64_t pos = got; pos < len; pos += got)
    memcpy (buf + pos, buf, MIN (got, len - pos));
  return buf;
}

/* Write LEN bytes at OFF: zeroes with ZERO (FLAGS may hold MAY_UNMAP),
 * else SRC's bytes when SRC, else PATTERN.  Returns 0, or -1 after
 * "FAILOP failed: ..." when the I/O failed. */
static int
write_range (struct io_ctx *io, uint64_t off, uint64_t len, bool zero,
             int pattern, const uint8_t *src, unsigned flags,
             const char *failop)
{
  CLEANUP_FREE uint8_t *buf = NULL;
  int r;

  if (io->writethrough)
    flags |= STRATA_REQ_FUA;
  if (zero) {
    r = strata_pwrite_zeroes (io->node, off, len, flags);
    if (r < 0)
      print_io_failure (failop, r);
    return r < 0 ? -1 : 0;
  }
  if (!src && !(buf = malloc (MIN (len, CHUNK) ?: 1))) {
    printf ("%s failed: %s\n", failop, strerror (ENOMEM));
    return -1;
  }
  if (!src)
    memset (buf, pattern, MIN (len, CHUNK));
  for (uint64_t done = 0; done < len || len == 0;) {
    size_t n = MIN (len - done, CHUNK);

    r = strata_pwrite (io->node, src ? src + done : buf, n, off + done, flags);
    if (r < 0) {
      print_io_failure (failop, r);
      return -1;
    }
    done += n;
    if (len == 0)
      break;
  }
  return 0;
}

static int
cmd_write (struct io_ctx *io, int argc, char **argv)
{
  int c, pattern = 0xcd;
  bool quiet = false, zero = false, unmap = false, fua = false;
  bool compressed = false, csv = false, no_fallback = false;
  bool have_pattern = false;
  const char *src = NULL;
  unsigned flags;
  uint64_t off, len;
  uint64_t t0;
  CLEANUP_FREE uint8_t *buf = NULL;

  optind = 0;
  while ((c = getopt (argc, argv, "+bcCfnP:qs:uz")) != -1) {
    switch (c) {
    case 'P':
      if (!parse_pattern (optarg, &pattern))
        return -1;
      have_pattern = true;
      break;
    case 's': src = optarg; break;
    case 'q': quiet = true; break;
    case 'z': zero = true; break;
    case 'u': unmap = true; break;
    case 'f': fua = true; break;
    case 'c': compressed = true; break;
    case 'C': csv = true; break;
    case 'n': no_fallback = true; break;
    case 'b':
      printf ("write -b: strata-io has no VM state to write\n");
      return -1;
    default: return -1;
    }
  }
  if (argc - optind != 2)
    return command_usage ("write");
  if (zero + have_pattern + !!src > 1) {
    printf ("Only one of -z, -P, and -s can be specified at the same time\n");
    return -1;
  }
  if (no_fallback && !zero) {
    printf ("-n requires -z to be specified\n");
    return -1;
  }
  if (unmap && !zero) {
    printf ("-u requires -z to be specified\n");
    return -1;
  }
  if (!parse_off_len (argv + optind, &off, &len))
    return -1;
  if (compressed && zero) {
    printf ("-c and -z cannot be specified at the same time\n");
    return -1;
  }
  if (no_fallback) {
    /* QEMU's BDRV_REQ_NO_FALLBACK has no strata equivalent yet. */
    printf ("write -n: strata-io cannot promise a write of zeroes without "
            "a fallback\n");
    return -1;
  }
  flags = fua ? STRATA_REQ_FUA : 0;
  if (compressed)
    flags |= STRATA_REQ_COMPRESSED;
  if (unmap)
    flags |= STRATA_REQ_MAY_UNMAP;
  if (src && !(buf = data_from_file (src, len)))
    return -1;
  t0 = clock_now_ns ();
  if (write_range (io, off, len, zero, pattern, buf, flags, "write") < 0)
    return -1;
  if (!quiet)
    report ("wrote", csv, t0, off, len);
  return 0;
}

static int
cmd_discard (struct io_ctx *io, int argc, char **argv)
{
  int c, r;
  bool quiet = false, csv = false;
  uint64_t off, len;
  uint64_t t0;

  optind = 0;
  while ((c = getopt (argc, argv, "+Cq")) != -1) {
    switch (c) {
    case 'C': csv = true; break;
    case 'q': quiet = true; break;
    default: return -1;
    }
  }
  if (argc - optind != 2)
    return command_usage ("discard");
  if (!parse_off_len (argv + optind, &off, &len))
    return -1;
  t0 = clock_now_ns ();
  r = strata_pdiscard (io->node, off, len, 0);
  if (r < 0) {
    print_io_failure ("discard", r);
    return -1;
  }
  if (!quiet)
    report ("discard", csv, t0, off, len);
  return 0;
}

/* qemu-io's map and alloc show what the top layer itself holds (a zero
 * cluster there counts), not what its backing files do. */
static bool
top_allocated (const struct strata_extent *e)
{
  return e->depth == 0 && (e->flags & STRATA_BS_ALLOCATED);
}

static int
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

static int
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

static int
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

static int
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
      printf ("    lazy refcounts: %s\n",
              q.lazy_refcounts ? "true" : "false");
    printf ("    refcount bits: %d\n", q.refcount_bits);
    if (v3) {
      printf ("    corrupt: %s\n", q.corrupt ? "true" : "false");
      printf ("    extended l2: %s\n",
              q.extended_l2 ? "true" : "false");
    }
  }
  return 0;
}

static int
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

static int
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

static int
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

/* "off len [len..]" of readv, writev, aio_read and aio_write: the
 * offset and the sum of the lengths, with qemu-io's messages. */
static bool
parse_vector (int argc, char **argv, uint64_t *off, uint64_t *total)
{
  if (!cvtnum (argv[0], off))
    return false;
  *total = 0;
  for (int i = 1; i < argc; i++) {
    uint64_t len;

    if (!cvtnum (argv[i], &len))
      return false;
    if (len > MAX_REQUEST) {
      printf ("Argument '%s' exceeds maximum size %llu\n", argv[i],
              MAX_REQUEST);
      return false;
    }
    *total += len;
    if (*total > MAX_REQUEST) {
      printf ("The total number of bytes exceed the maximum size %llu\n",
              MAX_REQUEST);
      return false;
    }
  }
  return true;
}

/* readv and aio_read.  strata-io runs an aio_read to completion at once;
 * as in qemu-io, a submitted aio_read succeeds whatever its outcome. */
static int
readv_common (struct io_ctx *io, int argc, char **argv, bool aio)
{
  const char *name = aio ? "aio_read" : "readv";
  struct read_opts o = { .pattern = -1 };
  bool bad = false, invalid = false, mismatch;
  uint64_t off, len;
  uint64_t t0;
  int c;

  optind = 0;
  while ((c = getopt (argc, argv, aio ? "+CiP:qv" : "+CP:qv")) != -1) {
    if (c == 'i' && aio)
      invalid = true;
    else if (!read_option (c, &o, &bad))
      return command_usage (name);
    else if (bad)
      return -1;
  }
  if (argc - optind < 2)
    return command_usage (name);
  if (invalid) {
    /* qemu-io's -i only exercises its accounting: nothing is read. */
    printf ("injecting invalid read request\n");
    return 0;
  }
  if (!parse_vector (argc - optind, argv + optind, &off, &len))
    return -1;
  o.pat_len = len;
  t0 = clock_now_ns ();
  if (read_checked (io, off, len, &o, "readv", &mismatch) < 0)
    return aio ? 0 : -1;
  if (!o.quiet)
    report ("read", o.csv, t0, off, len);
  return mismatch && !aio ? -1 : 0;
}

static int
cmd_readv (struct io_ctx *io, int argc, char **argv)
{
  return readv_common (io, argc, argv, false);
}

static int
cmd_aio_read (struct io_ctx *io, int argc, char **argv)
{
  return readv_common (io, argc, argv, true);
}

/* writev and aio_write, run to completion at once like aio_read. */
static int
writev_common (struct io_ctx *io, int argc, char **argv, bool aio)
{
  const char *name = aio ? "aio_write" : "writev";
  int c, pattern = 0xcd;
  bool quiet = false, csv = false, zero = false, unmap = false;
  bool invalid = false;
  unsigned flags = 0;
  uint64_t off, len;
  uint64_t t0;

  optind = 0;
  while ((c = getopt (argc, argv, aio ? "+CfiP:quz" : "+CfP:q")) != -1) {
    switch (c) {
    case 'P':
      if (!parse_pattern (optarg, &pattern))
        return -1;
      break;
    case 'C': csv = true; break;
    case 'f': flags |= STRATA_REQ_FUA; break;
    case 'q': quiet = true; break;
    case 'i': invalid = true; break;
    case 'u': unmap = true; break;
    case 'z': zero = true; break;
    default: return command_usage (name);
    }
  }
  if (argc - optind < 2)
    return command_usage (name);
  if (invalid) {
    printf ("injecting invalid write request\n");
    return 0;
  }
  if (unmap && !zero) {
    printf ("-u requires -z to be specified\n");
    return -1;
  }
  if (zero && argc - optind > 2) {
    printf ("-z supports only a single length parameter\n");
    return -1;
  }
  if (!parse_vector (argc - optind, argv + optind, &off, &len))
    return -1;
  if (unmap)
    flags |= STRATA_REQ_MAY_UNMAP;
  t0 = clock_now_ns ();
  if (write_range (io, off, len, zero, pattern, NULL, flags, name) < 0)
    return aio ? 0 : -1;
  if (!quiet)
    report ("wrote", csv, t0, off, len);
  return 0;
}

static int
cmd_writev (struct io_ctx *io, int argc, char **argv)
{
  return writev_common (io, argc, argv, false);
}

static int
cmd_aio_write (struct io_ctx *io, int argc, char **argv)
{
  return writev_common (io, argc, argv, true);
}

static int
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

static int
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

static int
cmd_abort (struct io_ctx *io, int argc, char **argv)
{
  (void)io;
  (void)argc;
  (void)argv;
  fflush (stdout);
  abort ();
}

static int
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

static int
cmd_close (struct io_ctx *io, int argc, char **argv)
{
  (void)argc;
  (void)argv;
  return close_image (io) ? 0 : -1;
}

static int cmd_help (struct io_ctx *io, int argc, char **argv);

struct command {
  const char *name;
  int (*fn) (struct io_ctx *io, int argc, char **argv);
  int argmin, argmax; /* qemu-io's bounds on words after the name;
                       * argmax -1: no bound */
  const char *usage;
  bool nofile; /* runs without an open image */
  bool writes; /* refused on a read-only image */
};

/* In qemu-io's order, which "help" keeps; quit is handled by the loop. */
static const struct command commands[] = {
  { "abort", cmd_abort, 0, 0,
    "abort -- simulate a program crash using abort(3)", true },
  { "aio_flush", cmd_flush, 0, 0,
    "aio_flush -- completes all outstanding aio requests" },
  { "aio_read", cmd_aio_read, 2, -1,
    "aio_read [-Ciqv] [-P pattern] off len [len..] -- asynchronously reads "
    "a number of bytes" },
  { "aio_write", cmd_aio_write, 2, -1,
    "aio_write [-Cfiquz] [-P pattern] off len [len..] -- asynchronously "
    "writes a number of bytes",
    false, true },
  { "alloc", cmd_alloc, 1, 2,
    "alloc offset [count] -- checks if offset is allocated in the file" },
  { "close", cmd_close, 0, 0, "close -- close the current open file" },
  { "discard", cmd_discard, 2, -1,
    "discard [-Cq] off len -- discards a number of bytes at a specified "
    "offset",
    false, true },
  { "flush", cmd_flush, 0, 0,
    "flush -- flush all in-core file state to disk" },
  { "help", cmd_help, 0, 1, "help [command] -- help for one or all commands",
    true },
  { "info", cmd_info, 0, 0,
    "info -- prints information about the current file" },
  { "length", cmd_length, 0, 0,
    "length -- gets the length of the current file" },
  { "map", cmd_map, 0, 0, "map  -- prints the allocated areas of a file" },
  { "open", cmd_open, 1, -1,
    "open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the "
    "file specified by path",
    true },
  { "quit", NULL, 0, 0, "quit -- exit the program", true },
  { "read", cmd_read, 2, -1,
    "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number "
    "of bytes at a specified offset" },
  { "readv", cmd_readv, 2, -1,
    "readv [-Cqv] [-P pattern] off len [len..] -- reads a number of bytes "
    "at a specified offset" },
  { "reopen", cmd_reopen, 0, -1,
    "reopen [(-r|-w)] -- reopens an image read-only or read-write" },
  { "sigraise", cmd_sigraise, 1, 1, "sigraise signal -- raises a signal",
    true },
  { "sleep", cmd_sleep, 1, 1,
    "sleep -- waits for the given value in milliseconds", true },
  { "truncate", cmd_truncate, 1, 3,
    "truncate [-m prealloc_mode] off -- truncates the current file at the "
    "given offset",
    false, true },
  { "write", cmd_write, 2, -1,
    "write [-bcCfnquz] [-P pattern | -s source_file] off len -- writes a "
    "number of bytes at a specified offset",
    false, true },
  { "writev", cmd_writev, 2, -1,
    "writev [-Cfq] [-P pattern] off len [len..] -- writes a number of bytes "
    "at a specified offset",
    false, true },
};
#define NCOMMANDS (sizeof commands / sizeof commands[0])

static const struct command *
find_command (const char *name)
{
  for (size_t i = 0; i < NCOMMANDS; i++)
    if (strcmp (name, commands[i].name) == 0)
      return &commands[i];
  return NULL;
}

/* A bad option: getopt named it on stderr; qemu-io adds the usage line. */
static int
command_usage (const char *name)
{
  printf ("%s\n", find_command (name)->usage);
  return -1;
}

static int
cmd_help (struct io_ctx *io, int argc, char **argv)
{
  const struct command *cmd;

  (void)io;
  if (argc < 2) {
    for (size_t i = 0; i < NCOMMANDS; i++)
      printf ("%s\n", commands[i].usage);
    printf ("\nUse 'help commandname' for extended help.\n");
    return 0;
  }
  cmd = find_command (argv[1]);
  if (!cmd) {
    printf ("command %s not found\n", argv[1]);
    return -1;
  }
  printf ("%s\n", cmd->usage);
  return 0;
}

static bool
is_read_only (struct io_ctx *io)
{
  struct strata_info info = { .size = sizeof info };

  return strata_get_info (io->node, &info, 0, NULL) && info.read_only;
}

/* Split LINE in place on blanks.  Returns argc; argv has room for MAX. */
static int
split_line (char *line, char **argv, int max)
{
  int argc = 0;

  for (char *tok = strtok (line, " \t\n"); tok && argc < max - 1;
       tok = strtok (NULL, " \t\n"))
    argv[argc++] = tok;
  argv[argc] = NULL;
  return argc;
}

/* qemu-io checks the word count before running a command, with these
 * messages; without it "length x" would run and succeed. */
static bool
check_argc (const struct command *cmd, int argc)
{
  int n = argc - 1;

  if (n >= cmd->argmin && (cmd->argmax < 0 || n <= cmd->argmax))
    return true;
  if (cmd->argmax < 0)
    fprintf (stderr,
             "bad argument count %d to %s, expected at least %d "
             "arguments\n",
             n, cmd->name, cmd->argmin);
  else if (cmd->argmin == cmd->argmax)
    fprintf (stderr, "bad argument count %d to %s, expected %d arguments\n", n,
             cmd->name, cmd->argmin);
  else
    fprintf (stderr,
             "bad argument count %d to %s, expected between %d and "
             "%d arguments\n",
             n, cmd->name, cmd->argmin, cmd->argmax);
  return false;
}

/* Run one command line.  Returns 0, -1 on failure, 1 for quit. */
static int
run_command (struct io_ctx *io, const char *cmdline)
{
  CLEANUP_FREE char *line = strdup (cmdline);
  char *argv[64];
  const struct command *cmd;
  int argc;

  if (!line)
    return -1;
  argc = split_line (line, argv, 64);
  if (argc == 0)
    return 0;
  if (strcmp (argv[0], "quit") == 0 || strcmp (argv[0], "q") == 0)
    return 1;
  cmd = find_command (argv[0]);
  if (cmd && cmd->writes && io->node && is_read_only (io)) {
    fprintf (stderr, "%s: Block node is read-only\n", progname);
    return -1;
  }
  if (cmd && !cmd->nofile && !io->node) {
    /* qemu-io's line has no program name; test_io_bad_input wants one
     * on every line about opening. */
    fprintf (stderr, "%s: no file open, try 'help open'\n", progname);
    return -1;
  }
  if (cmd) {
    int r = check_argc (cmd, argc) ? cmd->fn (io, argc, argv) : -1;

    fflush (stdout);
    return r;
  }
  fprintf (stderr, "command \"%s\" not found\n", argv[0]);
  return -1;
}

static void
usage (FILE *f)
{
  fprintf (
      f,
      "Usage: %s [OPTIONS]... [-c COMMAND]... [FILE]\n"
      "\n"
      "  -c, --cmd COMMAND    run COMMAND (repeatable); without -c commands\n"
      "                       are read from standard input\n"
      "  -f, --format FMT     image format (raw, file); probed when absent\n"
      "  -r, --read-only      open the image read-only\n"
      "  -U, --force-share    open read-only without taking image locks\n"
      "  -t, --cache MODE     none, writeback (default), writethrough,\n"
      "                       directsync or unsafe\n"
      "  -n, --nocache        same as -t none\n"
      "  -C, --copy-on-read   copy what reads fetch from backing files into\n"
      "                       the image (a copy-on-read filter on top)\n"
      "  -o, --options OPTS   extra driver options, key=value,...\n"
      "  -h, --help           show this help\n"
      "  -V, --version        show the version\n",
      progname);
}

int
main (int argc, char **argv)
{
  static const struct option long_options[] = {
    { "cmd", required_argument, NULL, 'c' },
    { "format", required_argument, NULL, 'f' },
    { "read-only", no_argument, NULL, 'r' },
    { "force-share", no_argument, NULL, 'U' },
    { "cache", required_argument, NULL, 't' },
    { "nocache", no_argument, NULL, 'n' },
    { "copy-on-read", no_argument, NULL, 'C' },
    { "options", required_argument, NULL, 'o' },
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' },
    { NULL, 0, NULL, 0 },
  };
  struct io_ctx io = { 0 };
  CLEANUP_FREE const char **cmds = calloc (argc, sizeof *cmds);
  const char *cache = "writeback", *extra = NULL;
  unsigned flags = STRATA_OPEN_RDWR;
  const char *format = NULL;
  int ncmds = 0, c, failed = 0;

  if (!cmds)
    return 1;
  while ((c = getopt_long (argc, argv, "c:f:rUt:nCo:hV", long_options, NULL))
         != -1) {
    switch (c) {
    case 'c': cmds[ncmds++] = optarg; break;
    case 'f': format = optarg; break;
    case 'r': flags &= ~STRATA_OPEN_RDWR; break;
    case 'U': flags |= STRATA_OPEN_FORCE_SHARE; break;
    case 't': cache = optarg; break;
    case 'n': cache = "none"; break;
    case 'C': flags |= STRATA_OPEN_COPY_ON_READ; break;
    case 'o': extra = optarg; break;
    case 'h': usage (stdout); return 0;
    case 'V':
      printf ("strata-io version %s\n", strata_version ());
      return 0;
    default: usage (stderr); return 1;
    }
  }
  if (optind < argc - 1) {
    fprintf (stderr, "%s: too many arguments\n", progname);
    return 1;
  }
  /* qemu-io without a file waits for an open command. */
  if (optind < argc
      && !open_image (&io, argv[optind], format, cache, extra, flags))
    return 1;

  if (ncmds) {
    for (int i = 0; i < ncmds; i++) {
      int r = run_command (&io, cmds[i]);
      if (r < 0)
        failed = 1;
      if (r > 0)
        break;
    }
  }
  else {
    char *line = NULL;
    size_t cap = 0;

    for (;;) {
      int r;

      printf ("strata-io> ");
      fflush (stdout);
      if (getline (&line, &cap, stdin) < 0)
        break;
      r = run_command (&io, line);
      if (r < 0)
        failed = 1;
      if (r > 0)
        break;
    }
    free (line);
  }
  if (io.node && !close_image (&io))
    failed = 1;
  return failed;
}
