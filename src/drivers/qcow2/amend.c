/* strata qcow2: amend. */
#include <errno.h>

#include "drivers/qcow2/qcow2.h"

bool
qcow2_amend (strata_node *node, strata_opts *opts, strata_error **errp)
{
  (void) opts;
  error_set (errp, ENOTSUP, "%s: amend is not implemented yet",
             node->filename);
  return false;
}
