/* strata-io: the data commands, read, write, discard and their vector
 * and aio forms (readv, writev, aio_read, aio_write), with qemu-io's
 * options, patterns (-P, -s, -l), checks and messages.
 *
 * aio_read and aio_write run to completion here before the next command
 * (see strata-io.c).
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

int
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

int
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

int
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

int
cmd_readv (struct io_ctx *io, int argc, char **argv)
{
  return readv_common (io, argc, argv, false);
}

int
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

int
cmd_writev (struct io_ctx *io, int argc, char **argv)
{
  return writev_common (io, argc, argv, false);
}

int
cmd_aio_write (struct io_ctx *io, int argc, char **argv)
{
  return writev_common (io, argc, argv, true);
}
