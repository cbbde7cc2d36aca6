/* strata-img amend: placeholder until its implementation lands. */
#include <stdio.h>

#include "tools/img.h"

int
cmd_amend (int argc, char **argv)
{
  (void) argc;
  (void) argv;
  fprintf (stderr, "%s: amend: not implemented yet\n", progname);
  return 1;
}
