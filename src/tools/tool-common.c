/* strata: pieces shared by strata-img, strata-io, strata-nbd and stratad. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "tools/tool-common.h"

void
tool_warn_probed_raw (strata_node *n, const char *filename)
{
  struct strata_info info;

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
