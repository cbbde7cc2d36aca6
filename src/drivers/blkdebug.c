/* strata: the blkdebug filter driver.  Placeholder until it lands: opening
 * it fails. */
#include <errno.h>

#include "block/node.h"

static bool
blkdebug_open (strata_node *node, strata_opts *opts, unsigned flags,
            strata_error **errp)
{
  (void) opts;
  (void) flags;
  error_set (errp, ENOTSUP, "%s: driver 'blkdebug' is not implemented yet",
             node->node_name ? node->node_name : "node");
  return false;
}

const struct strata_driver blkdebug_driver = {
  .name = "blkdebug",
  .is_filter = true,
  .has_file_child = true,
  .open = blkdebug_open,
};
