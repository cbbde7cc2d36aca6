/* strata-img rebase: placeholder until its implementation lands. */
#include <stdio.h>

#include "tools/img.h"

int
cmd_rebase (int argc, char **argv)
{
  (void) argc;
  (void) argv;
  fprintf (stderr, "%s: rebase: not implemented yet\n", progname);
  return 1;
}
