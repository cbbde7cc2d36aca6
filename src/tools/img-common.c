/* strata-img: helpers shared by the subcommands (see img.h). */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <strata/strata.h>

#include "tools/img.h"
#include "util/opts.h"
#include "util/ratelimit.h"

const char *progname = "strata-img";

void
fail_msg (const char *msg)
{
  fprintf (stderr, "%s: %s\n", progname, msg);
}

void
fail_err (strata_error *err)
{
  fail_msg (strata_error_message (err));
  strata_error_free (err);
}

double
now (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

bool
parse_output (const char *s, enum output *out)
{
  if (strcmp (s, "human") == 0)
    *out = OUTPUT_HUMAN;
  else if (strcmp (s, "json") == 0)
    *out = OUTPUT_JSON;
  else {
    fprintf (stderr, "%s: --output must be used with human or json as "
             "argument.\n", progname);
    return false;
  }
  return true;
}

/* qemu's size_to_str(): three significant digits, binary units, switching
 * to the next unit from 1000 of the current one. */
void
size_to_str (uint64_t val, char *buf, size_t len)
{
  static const char *const suffixes[] = { "", "Ki", "Mi", "Gi", "Ti", "Pi",
                                          "Ei" };
  int e, i;

  frexp (val / (1000.0 / 1024.0), &e);
  i = (e - 1) / 10;
  if (i < 0)
    i = 0;
  if (i > 6)
    i = 6;
  snprintf (buf, len, "%0.3g %sB", (double) val / (double) (UINT64_C (1) << (i * 10)),
            suffixes[i]);
}

strata_node *
open_image (const char *filename, const char *fmt, bool force_share, bool rw,
            const char *extra)
{
  strata_error *err = NULL;
  unsigned flags = (rw ? STRATA_OPEN_RDWR : 0)
                   | (force_share ? STRATA_OPEN_FORCE_SHARE : 0);
  strata_node *n = strata_open (filename, fmt, extra, flags, &err);

  if (!n) {
    fprintf (stderr, "%s: Could not open '%s': %s\n", progname, filename,
             strata_error_message (err));
    strata_error_free (err);
  }
  else if (rw && !fmt)
    img_raw_probe_warning (n, filename);
  return n;
}

void
img_raw_probe_warning (strata_node *n, const char *filename)
{
  struct strata_info info;

  if (!strata_get_info (n, &info, 0, NULL) || !info.format
      || strcmp (info.format, "raw") != 0)
    return;
  fprintf (stderr,
           "WARNING: Image format was not specified for '%s' and probing "
           "guessed raw.\n"
           "         Automatically detecting the format is dangerous for "
           "raw images, write operations on block 0 will be restricted.\n"
           "         Specify the 'raw' format explicitly to remove the "
           "restrictions.\n",
           filename);
}

void
print_json (json_t *j)
{
  char *s = json_dumps (j, JSON_INDENT (4) | JSON_PRESERVE_ORDER);

  if (s)
    printf ("%s\n", s);
  free (s);
}

bool
img_parse_rate (const char *s, uint64_t *out)
{
  if (!parse_size (s, out) || *out > INT64_MAX) {
    fprintf (stderr,
             "%s: Invalid rate limit specified. You may use k, M, "
             "G, T, P or E suffixes for\n%s: kilobytes, megabytes, "
             "gigabytes, terabytes, petabytes and exabytes.\n",
             progname, progname);
    return false;
  }
  return true;
}

bool
img_cache_options (const char *mode, const char *fmt, char *buf, size_t size,
                   bool *writethrough)
{
  if (!cache_mode_options (mode, fmt, buf, size, writethrough)) {
    fprintf (stderr, "%s: Invalid cache option: %s\n", progname, mode);
    return false;
  }
  return true;
}

void
img_ratelimit_wait (const struct ratelimit *rl)
{
  uint64_t ns = ratelimit_delay (rl, ratelimit_now_ns ());
  struct timespec ts
      = { .tv_sec = ns / 1000000000u, .tv_nsec = ns % 1000000000u };

  if (!ns)
    return;
  while (nanosleep (&ts, &ts) < 0 && errno == EINTR)
    ;
}


/* ---- -p ---- */

void
img_progress_start (struct img_progress *p, bool wanted, uint64_t total)
{
  p->on = wanted && isatty (STDOUT_FILENO);
  p->start = now ();
  p->drawn_at = 0;
  p->total = total;
  if (p->on)
    img_progress_update (p, 0);
}

static void
progress_draw (struct img_progress *p, uint64_t done, double t)
{
  double pct = p->total ? 100.0 * (double) done / (double) p->total : 100.0;
  double elapsed = t - p->start;
  double rate = elapsed > 0 ? (double) done / elapsed : 0;
  char bar[31], sz[32];
  int fill = (int) (pct * 30 / 100);

  for (int i = 0; i < 30; i++)
    bar[i] = i < fill ? '#' : ' ';
  bar[30] = 0;
  size_to_str ((uint64_t) rate, sz, sizeof sz);
  printf ("\r[%s] %6.2f%%  %10s/s", bar, pct, sz);
  if (done > 0 && done < p->total && rate > 0) {
    uint64_t left = (uint64_t) ((double) (p->total - done) / rate);
    printf ("  %02" PRIu64 ":%02" PRIu64 ":%02" PRIu64 " left", left / 3600,
            left / 60 % 60, left % 60);
  }
  else
    printf ("               ");
  fflush (stdout);
}

void
img_progress_update (struct img_progress *p, uint64_t done)
{
  double t;

  if (!p->on)
    return;
  t = now ();
  if (done != 0 && t - p->drawn_at < 0.1)
    return;
  p->drawn_at = t;
  progress_draw (p, done, t);
}

void
img_progress_end (struct img_progress *p, bool ok)
{
  if (!p->on)
    return;
  if (ok)
    progress_draw (p, p->total, now ());
  printf ("\n");
  fflush (stdout);
}
