/* strata-io: qemu-io's number and report formats, and opening and
 * closing the image, shared by the commands.
 *
 * The numbers ("512 bytes", "4 KiB", "1.000 MiB/sec") and the report
 * lines ("read 512/512 bytes at offset 0" and the timing line after it)
 * are qemu-io's, so that scripts and test harnesses written for it work
 * unchanged.
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

/* ---- qemu-io's number and report formats ---- */

void
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
void
report (const char *op, bool csv, uint64_t t0, uint64_t offset, uint64_t len)
{
  double t = (double)(clock_now_ns () - t0) / CLOCK_NS_PER_SEC;

  if (csv)
    print_csv (t, len, 1);
  else
    print_report (op, t, offset, len, len, 1);
}

void
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
bool
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

bool
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

bool
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

void
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
bool
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
bool
close_image (struct io_ctx *io)
{
  bool ok = strata_flush (io->node, 0) == 0;

  strata_close (io->node);
  io->node = NULL;
  io->filename = NULL;
  io->format = NULL;
  return ok;
}
