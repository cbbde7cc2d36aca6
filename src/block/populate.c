/* strata: copy-up (node_copy_up in node.h).  Placeholder until the
 * copy-on-read work lands. */
#include <errno.h>

#include "block/node.h"

int
node_copy_up (strata_node *top, strata_node *base, uint64_t offset,
              uint64_t len, uint64_t *copied)
{
  (void) top;
  (void) base;
  (void) offset;
  (void) len;
  if (copied)
    *copied = 0;
  return -ENOTSUP;
}
