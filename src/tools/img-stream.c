/* strata-img stream: placeholder until its implementation lands. */
#include <stdio.h>

#include "tools/img.h"

int
cmd_stream (int argc, char **argv)
{
  (void) argc;
  (void) argv;
  fprintf (stderr, "%s: stream: not implemented yet\n", progname);
  return 1;
}
