/* strata-img convert: placeholder until its implementation lands. */
#include <stdio.h>

#include "tools/img.h"

int
cmd_convert (int argc, char **argv)
{
  (void) argc;
  (void) argv;
  fprintf (stderr, "%s: convert: not implemented yet\n", progname);
  return 1;
}
