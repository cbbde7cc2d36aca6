/* strata-io: an I/O tool with qemu-io's command line and output lines.
 *
 *   strata-io [-f FMT] [-r] [-U] [-t CACHE] [-n] [-o OPTS] [-c CMD]... FILE
 *
 * Commands run in order from -c, or else one per line from standard
 * input.  The output lines ("read 512/512 bytes at offset 0", the timing
 * line, "Pattern verification failed at offset ...", the map lines) are
 * those of qemu-io so that scripts and test harnesses written for it work
 * unchanged.  The exit status is 1 when any command failed.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <strata/strata.h>

#include "util/checked.h"
#include "util/cleanup.h"
#include "util/opts.h"

#define MAX_REQUEST 2147483136ULL   /* qemu-io's limit for one request */
#define CHUNK (4u << 20)            /* bytes moved per call */

static const char *progname = "strata-io";

struct io_ctx {
  strata_node *node;
  const char *filename;
  const char *format;
  bool writethrough;     /* -t writethrough/directsync: FUA every write */
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
    double unit = (double) (UINT64_C (1) << (10 * (6 - i)));
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

static double
now (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void
print_report (const char *op, double t, uint64_t offset, uint64_t bytes,
              uint64_t total, int cnt)
{
  char s1[64], s2[64], ts[64];
  unsigned secs = (unsigned) t, centi = (unsigned) ((t - secs) * 100);

  printf ("%s %" PRIu64 "/%" PRIu64 " bytes at offset %" PRIu64 "\n", op,
          total, bytes, offset);
  if (secs < 60)
    snprintf (ts, sizeof ts, "%02u.%02u sec", secs, centi);
  else
    snprintf (ts, sizeof ts, "%u:%02u:%02u.%02u", secs / 3600,
              secs / 60 % 60, secs % 60, centi);
  if (t <= 0)
    t = 1e-9;
  cvtstr ((double) total, s1, sizeof s1);
  cvtstr ((double) total / t, s2, sizeof s2);
  printf ("%s, %d ops; %s (%s/sec and %.4f ops/sec)\n", s1, cnt, ts, s2,
          cnt / t);
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
            "unrecognized suffix -- %s\n", s);
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
  *pattern = (int) v;
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

/* ---- commands ---- */

/* Each returns 0 on success and -1 when the command failed. */

static int
cmd_read (struct io_ctx *io, int argc, char **argv)
{
  int c, pattern = -1, r = 0;
  bool quiet = false, verbose = false, mismatch = false;
  uint64_t off, len, first_bad = 0;
  uint8_t bad_byte = 0;
  double t0;
  CLEANUP_FREE uint8_t *buf = NULL;

  optind = 0;
  while ((c = getopt (argc, argv, "+P:qv")) != -1) {
    switch (c) {
    case 'P': if (!parse_pattern (optarg, &pattern)) return -1; break;
    case 'q': quiet = true; break;
    case 'v': verbose = true; break;
    default: return -1;
    }
  }
  if (argc - optind != 2) {
    fprintf (stderr, "bad argument count %d to read, expected 2 arguments\n",
             argc - optind);
    return -1;
  }
  if (!parse_off_len (argv + optind, &off, &len))
    return -1;
  /* qemu-io prints the pattern verdict before the hexdump, so -v keeps
   * the whole request in memory (qemu-io does too) and dumps it last. */
  buf = malloc ((verbose ? len : MIN (len, CHUNK)) ?: 1);
  if (!buf) {
    printf ("read failed: %s\n", strerror (ENOMEM));
    return -1;
  }
  t0 = now ();
  for (uint64_t done = 0; done < len || len == 0;) {
    size_t n = MIN (len - done, CHUNK);
    uint8_t *p = buf + (verbose ? done : 0);

    r = strata_pread (io->node, p, n, off + done, 0);
    if (r < 0) {
      print_io_failure ("read", r);
      return -1;
    }
    for (size_t i = 0; pattern >= 0 && !mismatch && i < n; i++) {
      if (p[i] != pattern) {
        mismatch = true;
        first_bad = off + done + i;
        bad_byte = p[i];
      }
    }
    done += n;
    if (len == 0)
      break;
  }
  /* Exactly qemu-io's line on stdout, which harnesses diff; where the
   * first difference is goes to stderr for the person reading it. */
  if (mismatch) {
    printf ("Pattern verification failed at offset %" PRIu64 ", %" PRIu64
            " bytes\n", off, len);
    fflush (stdout);
    fprintf (stderr, "%s: first mismatch at offset %" PRIu64 " (0x%" PRIx64
             "): expected 0x%02x, read 0x%02x\n", progname, first_bad,
             first_bad, pattern, bad_byte);
  }
  if (verbose)
    dump_buffer (buf, off, len);
  if (!quiet)
    print_report ("read", now () - t0, off, len, len, 1);
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
    len = 1;    /* not "empty" */
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

static int
cmd_write (struct io_ctx *io, int argc, char **argv)
{
  int c, pattern = 0xcd, r;
  bool quiet = false, zero = false, unmap = false, fua = false;
  bool compressed = false;
  bool have_pattern = false;
  const char *src = NULL;
  unsigned flags;
  uint64_t off, len;
  double t0;
  CLEANUP_FREE uint8_t *buf = NULL;

  optind = 0;
  while ((c = getopt (argc, argv, "+P:qzufcs:")) != -1) {
    switch (c) {
    case 'P':
      if (!parse_pattern (optarg, &pattern)) return -1;
      have_pattern = true;
      break;
    case 's': src = optarg; break;
    case 'q': quiet = true; break;
    case 'z': zero = true; break;
    case 'u': unmap = true; break;
    case 'f': fua = true; break;
    case 'c': compressed = true; break;
    default: return -1;
    }
  }
  if (argc - optind != 2) {
    fprintf (stderr, "bad argument count %d to write, expected 2 arguments\n",
             argc - optind);
    return -1;
  }
  if (zero + have_pattern + !!src > 1) {
    printf ("Only one of -z, -P, and -s can be specified at the same time\n");
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
  flags = (fua || io->writethrough) ? STRATA_REQ_FUA : 0;
  if (compressed)
    flags |= STRATA_REQ_COMPRESSED;
  t0 = now ();
  if (zero) {
    r = strata_pwrite_zeroes (io->node, off, len,
                              flags | (unmap ? STRATA_REQ_MAY_UNMAP : 0));
    if (r < 0) {
      print_io_failure ("write", r);
      return -1;
    }
  }
  else {
    if (src && !(buf = data_from_file (src, len)))
      return -1;
    if (!src && !(buf = malloc (MIN (len, CHUNK) ?: 1))) {
      printf ("write failed: %s\n", strerror (ENOMEM));
      return -1;
    }
    if (!src)
      memset (buf, pattern, MIN (len, CHUNK));
    for (uint64_t done = 0; done < len || len == 0;) {
      size_t n = MIN (len - done, CHUNK);

      r = strata_pwrite (io->node, buf + (src ? done : 0), n, off + done,
                         flags);
      if (r < 0) {
        print_io_failure ("write", r);
        return -1;
      }
      done += n;
      if (len == 0)
        break;
    }
  }
  if (!quiet)
    print_report ("wrote", now () - t0, off, len, len, 1);
  return 0;
}

static int
cmd_discard (struct io_ctx *io, int argc, char **argv)
{
  int c, r;
  bool quiet = false;
  uint64_t off, len;
  double t0;

  optind = 0;
  while ((c = getopt (argc, argv, "+q")) != -1) {
    if (c != 'q')
      return -1;
    quiet = true;
  }
  if (argc - optind != 2) {
    fprintf (stderr, "bad argument count %d to discard, expected 2 "
             "arguments\n", argc - optind);
    return -1;
  }
  if (!parse_off_len (argv + optind, &off, &len))
    return -1;
  t0 = now ();
  r = strata_pdiscard (io->node, off, len, 0);
  if (r < 0) {
    print_io_failure ("discard", r);
    return -1;
  }
  if (!quiet)
    print_report ("discard", now () - t0, off, len, len, 1);
  return 0;
}

static int
cmd_map (struct io_ctx *io, int argc, char **argv)
{
  int64_t size = strata_length (io->node);
  uint64_t off = 0;

  (void) argc;
  (void) argv;
  if (size < 0) {
    printf ("map failed: %s\n", strerror ((int) -size));
    return -1;
  }
  while (off < (uint64_t) size) {
    bool alloc = false;
    uint64_t start = off, run = 0;
    char s1[64], s2[64];

    /* Merge consecutive extents of the same allocation state. */
    while (off < (uint64_t) size) {
      struct strata_extent e;
      int r = strata_block_status (io->node, off, size - off, &e, 0);

      if (r < 0) {
        print_io_failure ("map", r);
        return -1;
      }
      /* qemu-io's map shows what the top layer itself holds. */
      bool here = e.depth == 0 && (e.flags & STRATA_BS_ALLOCATED);

      if (run && alloc != here)
        break;
      alloc = here;
      run += e.length;
      off += e.length;
    }
    cvtstr ((double) run, s1, sizeof s1);
    cvtstr ((double) start, s2, sizeof s2);
    printf ("%s (0x%" PRIx64 ") bytes %s allocated at offset %s (0x%" PRIx64
            ")\n", s1, run, alloc ? "   " : "not", s2, start);
  }
  return 0;
}

static int
cmd_flush (struct io_ctx *io, int argc, char **argv)
{
  int r = strata_flush (io->node, 0);

  (void) argc;
  (void) argv;
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

  (void) argc;
  (void) argv;
  if (size < 0) {
    printf ("getlength: %s\n", strerror ((int) -size));
    return -1;
  }
  cvtstr ((double) size, s, sizeof s);
  printf ("%s\n", s);
  return 0;
}

static int
cmd_info (struct io_ctx *io, int argc, char **argv)
{
  struct strata_info info;
  strata_error *err = NULL;
  char s[64];

  (void) argc;
  (void) argv;
  if (!strata_get_info (io->node, &info, 0, &err)) {
    fprintf (stderr, "%s: %s\n", progname, strata_error_message (err));
    strata_error_free (err);
    return -1;
  }
  printf ("format name: %s\n", info.format);
  cvtstr ((double) info.cluster_size, s, sizeof s);
  printf ("cluster size: %s\n", s);
  cvtstr ((double) info.vm_state_offset, s, sizeof s);
  printf ("vm state offset: %s\n", s);
  if (info.format_specific && strcmp (info.format_specific, "qcow2") == 0) {
    bool v3 = strcmp (info.qcow2.compat, "0.10") != 0;

    printf ("Format specific information:\n");
    printf ("    compat: %s\n", info.qcow2.compat);
    printf ("    compression type: %s\n", info.qcow2.compression_type);
    if (v3)
      printf ("    lazy refcounts: %s\n",
              info.qcow2.lazy_refcounts ? "true" : "false");
    printf ("    refcount bits: %d\n", info.qcow2.refcount_bits);
    if (v3) {
      printf ("    corrupt: %s\n", info.qcow2.corrupt ? "true" : "false");
      printf ("    extended l2: %s\n",
              info.qcow2.extended_l2 ? "true" : "false");
    }
  }
  return 0;
}

static int
cmd_truncate (struct io_ctx *io, int argc, char **argv)
{
  uint64_t size;
  strata_error *err = NULL;

  if (argc != 2) {
    fprintf (stderr, "bad argument count %d to truncate, expected 1 "
             "argument\n", argc - 1);
    return -1;
  }
  if (!cvtnum (argv[1], &size))
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
  if (optind != argc) {
    fprintf (stderr, "bad argument count %d to reopen, expected 0 "
             "arguments\n", argc - optind);
    return -1;
  }
  if (rw < 0)
    return 0;
  if (!strata_reopen (io->node, rw, 0, &err)) {
    fprintf (stderr, "%s: %s\n", progname, strata_error_message (err));
    strata_error_free (err);
    return -1;
  }
  return 0;
}

static int cmd_help (struct io_ctx *io, int argc, char **argv);

struct command {
  const char *name;
  int (*fn) (struct io_ctx *io, int argc, char **argv);
  int argmin, argmax;   /* qemu-io's bounds on words after the name;
                         * argmax -1: no bound */
  const char *usage;
};

static const struct command commands[] = {
  { "discard", cmd_discard, 2, -1, "discard [-q] off len -- discards a "
    "number of bytes at a specified offset" },
  { "flush", cmd_flush, 0, 0, "flush -- flush all in-core file state to "
    "disk" },
  { "help", cmd_help, 0, 1, "help [command] -- help for one or all "
    "commands" },
  { "info", cmd_info, 0, 0, "info -- prints information about the current "
    "file" },
  { "length", cmd_length, 0, 0, "length -- gets the length of the current "
    "file" },
  { "map", cmd_map, 0, 0, "map  -- prints the allocated areas of a file" },
  { "read", cmd_read, 2, -1, "read [-qv] [-P pattern] off len -- reads a "
    "number of bytes at a specified offset" },
  { "reopen", cmd_reopen, 0, -1, "reopen [(-r|-w)] -- reopens an image "
    "read-only or read-write" },
  { "truncate", cmd_truncate, 1, 3, "truncate off -- truncates the current "
    "file at the given offset" },
  { "write", cmd_write, 2, -1, "write [-cfquz] [-P pattern | -s source_file] "
    "off len -- "
    "writes a number of bytes at a specified offset" },
};
#define NCOMMANDS (sizeof commands / sizeof commands[0])

static int
cmd_help (struct io_ctx *io, int argc, char **argv)
{
  (void) io;
  for (size_t i = 0; i < NCOMMANDS; i++)
    if (argc < 2 || strcmp (argv[1], commands[i].name) == 0)
      printf ("%s\n", commands[i].usage);
  if (argc < 2 || strcmp (argv[1], "quit") == 0)  /* "help read": one line */
    printf ("quit -- exit the program\n");
  return 0;
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
    fprintf (stderr, "bad argument count %d to %s, expected at least %d "
             "arguments\n", n, cmd->name, cmd->argmin);
  else if (cmd->argmin == cmd->argmax)
    fprintf (stderr, "bad argument count %d to %s, expected %d arguments\n",
             n, cmd->name, cmd->argmin);
  else
    fprintf (stderr, "bad argument count %d to %s, expected between %d and "
             "%d arguments\n", n, cmd->name, cmd->argmin, cmd->argmax);
  return false;
}

/* Run one command line.  Returns 0, -1 on failure, 1 for quit. */
static int
run_command (struct io_ctx *io, const char *cmdline)
{
  CLEANUP_FREE char *line = strdup (cmdline);
  char *argv[64];
  int argc;

  if (!line)
    return -1;
  argc = split_line (line, argv, 64);
  if (argc == 0)
    return 0;
  if (strcmp (argv[0], "quit") == 0 || strcmp (argv[0], "q") == 0)
    return 1;
  for (size_t i = 0; i < NCOMMANDS; i++) {
    if (strcmp (argv[0], commands[i].name) == 0) {
      int r = check_argc (&commands[i], argc)
                  ? commands[i].fn (io, argc, argv) : -1;
      fflush (stdout);
      return r;
    }
  }
  fprintf (stderr, "command \"%s\" not found\n", argv[0]);
  return -1;
}

static void
usage (FILE *f)
{
  fprintf (f,
    "Usage: %s [OPTIONS]... [-c COMMAND]... FILE\n"
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
    "  -V, --version        show the version\n", progname);
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
  int ncmds = 0, c, failed = 0;
  char cacheopts[128], *options = NULL;
  strata_error *err = NULL;

  if (!cmds)
    return 1;
  while ((c = getopt_long (argc, argv, "+c:f:rUt:nCo:hV", long_options,
                           NULL)) != -1) {
    switch (c) {
    case 'c': cmds[ncmds++] = optarg; break;
    case 'f': io.format = optarg; break;
    case 'r': flags &= ~STRATA_OPEN_RDWR; break;
    case 'U': flags |= STRATA_OPEN_FORCE_SHARE; break;
    case 't': cache = optarg; break;
    case 'n': cache = "none"; break;
    case 'C': flags |= STRATA_OPEN_COPY_ON_READ; break;
    case 'o': extra = optarg; break;
    case 'h': usage (stdout); return 0;
    case 'V': printf ("strata-io version 0.1.0\n"); return 0;
    default: usage (stderr); return 1;
    }
  }
  if (optind != argc - 1) {
    fprintf (stderr, "%s: %s\n", progname,
             optind == argc ? "no image file given" : "too many arguments");
    return 1;
  }
  io.filename = argv[optind];
  if ((flags & STRATA_OPEN_FORCE_SHARE) && (flags & STRATA_OPEN_RDWR)) {
    /* qemu-io -U implies nothing about writing; refuse as it does. */
    fprintf (stderr, "%s: can't open device %s: force-share=on can only be "
             "used with read-only images\n", progname, io.filename);
    return 1;
  }
  if (!cache_mode_options (cache, io.format, cacheopts, sizeof cacheopts,
                           &io.writethrough)) {
    fprintf (stderr, "%s: Invalid cache option: %s\n", progname, cache);
    return 1;
  }
  if (asprintf (&options, "%s%s%s", cacheopts, extra ? "," : "",
                extra ? extra : "") < 0)
    return 1;
  io.node = strata_open (io.filename, io.format, options, flags, &err);
  free (options);
  if (!io.node) {
    fprintf (stderr, "%s: can't open device %s: %s\n", progname, io.filename,
             strata_error_message (err));
    strata_error_free (err);
    return 1;
  }

  if (!io.format) {
    struct strata_info info;
    if (strata_get_info (io.node, &info, 0, NULL)
        && strcmp (info.format, "raw") == 0)
      fprintf (stderr, "WARNING: Image format was not specified for '%s' and "
               "probing guessed raw.\n         Automatically detecting the "
               "format is dangerous for raw images, write operations on "
               "block 0 will be restricted.\n         Specify the 'raw' "
               "format explicitly to remove the restrictions.\n",
               io.filename);
  }

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
  if (strata_flush (io.node, 0) < 0)
    failed = 1;
  strata_close (io.node);
  return failed;
}
