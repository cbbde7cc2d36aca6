/* strata: the copy-on-read filter driver.  Placeholder until it lands: opening
 * it fails. */
#include <errno.h>

#include "block/node.h"

static bool
copy_on_read_open (strata_node *node, strata_opts *opts, unsigned flags,
            strata_error **errp)
{
  (void) opts;
  (void) flags;
  error_set (errp, ENOTSUP, "%s: driver 'copy-on-read' is not implemented yet",
             node->node_name ? node->node_name : "node");
  return false;
}

const struct strata_driver copy_on_read_driver = {
  .name = "copy-on-read",
  .is_filter = true,
  .has_file_child = true,
  .open = copy_on_read_open,
};
