/* strata-img snapshot: placeholder until its implementation lands. */
#include <stdio.h>

#include "tools/img.h"

int
cmd_snapshot (int argc, char **argv)
{
  (void) argc;
  (void) argv;
  fprintf (stderr, "%s: snapshot: not implemented yet\n", progname);
  return 1;
}
