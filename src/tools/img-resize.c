/* strata-img resize: placeholder until its implementation lands. */
#include <stdio.h>

#include "tools/img.h"

int
cmd_resize (int argc, char **argv)
{
  (void) argc;
  (void) argv;
  fprintf (stderr, "%s: resize: not implemented yet\n", progname);
  return 1;
}
