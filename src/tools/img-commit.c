/* strata-img commit: placeholder until its implementation lands. */
#include <stdio.h>

#include "tools/img.h"

int
cmd_commit (int argc, char **argv)
{
  (void) argc;
  (void) argv;
  fprintf (stderr, "%s: commit: not implemented yet\n", progname);
  return 1;
}
