/* strata-img measure: placeholder until its implementation lands. */
#include <stdio.h>

#include "tools/img.h"

int
cmd_measure (int argc, char **argv)
{
  (void) argc;
  (void) argv;
  fprintf (stderr, "%s: measure: not implemented yet\n", progname);
  return 1;
}
