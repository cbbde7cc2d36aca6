/* strata: the library's version (include/strata/version.h).
 *
 * The one place a program learns which strata it runs: every tool's
 * --version and the daemon's query-version print strata_version(), so a
 * release changes only meson.build's project version.
 */
#include <strata/strata.h>

#define STR(x) #x
#define XSTR(x) STR (x)

const char *
strata_version (void)
{
  return XSTR (STRATA_VERSION_MAJOR) "." XSTR (STRATA_VERSION_MINOR) "." XSTR (
      STRATA_VERSION_MICRO);
}

unsigned
strata_version_number (void)
{
  return STRATA_VERSION_NUMBER (STRATA_VERSION_MAJOR, STRATA_VERSION_MINOR,
                                STRATA_VERSION_MICRO);
}
