/* strata: pieces shared by strata-img, strata-io, strata-nbd, stratad and
 * strata. */
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "tool-common.h"

void
tool_warn_probed_raw (strata_node *n, const char *filename)
{
  struct strata_info info = { .size = sizeof info };

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
tool_stdio_to_null (void)
{
  int null = open ("/dev/null", O_RDWR);

  if (null < 0)
    return;
  dup2 (null, 0);
  dup2 (null, 1);
  dup2 (null, 2);
  if (null > 2)
    close (null);
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

double
scale_binary (int64_t n, const char **unit)
{
  static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB",
                                       "PiB", "EiB" };
  double v = n;
  int u = 0;

  while (v >= 1024 && u < 6) {
    v /= 1024;
    u++;
  }
  *unit = units[u];
  return v;
}

void
human_size (int64_t n, char *buf, size_t len)
{
  const char *unit;
  double v = scale_binary (n, &unit);

  if (n < 1024)
    snprintf (buf, len, "%lld B", (long long) n);
  else
    snprintf (buf, len, "%.3g %s", v, unit);
}

void
human_rate (double bps, char *buf, size_t len)
{
  human_size ((int64_t) bps, buf, len);
  strncat (buf, "/s", len - strlen (buf) - 1);
}
