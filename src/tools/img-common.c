/* strata-img: helpers shared by the subcommands (see img.h). */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <strata/strata.h>

#include "tools/img.h"

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
  return n;
}

void
print_json (json_t *j)
{
  char *s = json_dumps (j, JSON_INDENT (4) | JSON_PRESERVE_ORDER);

  if (s)
    printf ("%s\n", s);
  free (s);
}

