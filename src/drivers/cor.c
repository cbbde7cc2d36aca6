/* strata: the copy-on-read filter driver (QEMU's "copy-on-read").
 *
 *      [copy-on-read] --file--> [qcow2 top] --backing--> ... [bottom] --> ...
 *
 * A read first copies into the format node under the filter (TOP) what
 * TOP lacks of the read range and the chain holds (node_copy_up, which
 * serialises against writes to TOP), then reads from TOP.  With `bottom`
 * (a node name in TOP's backing chain) only data from the layers down to
 * bottom, inclusive, is copied, as QEMU's filter does for block-stream.
 * Everything else passes through to `file`, which the core does for a
 * filter that leaves an operation NULL.
 */
#include <errno.h>

#include "block/chain.h"
#include "block/graph.h"
#include "block/node.h"
#include "drivers/registry.h"

struct cor_state {
  strata_node *bottom; /* a reference, or NULL */
};

static strata_node *
cor_format_node (strata_node *node)
{
  return node_skip_filters (node->file);
}

static bool
cor_open (strata_node *node, strata_opts *opts, unsigned flags,
          strata_error **errp)
{
  struct cor_state *s = node->opaque;
  const char *bottom = opts_get (opts, "bottom");
  strata_node *top;

  (void)flags;
  if (node->read_only || node->file->read_only) {
    error_set (errp, EPERM, "Can't use copy-on-read on read-only device");
    return false;
  }
  if (!bottom)
    return true;
  if (!(s->bottom = graph_lookup (bottom))) {
    error_set (errp, ENOENT, "Bottom node '%s' not found", bottom);
    return false;
  }
  if (s->bottom->drv->is_filter) {
    error_set (errp, EINVAL, "Bottom node '%s' is a filter", bottom);
    node_unref (s->bottom);
    s->bottom = NULL;
    return false;
  }
  top = cor_format_node (node);
  if (s->bottom != top && !chain_contains (top, s->bottom)) {
    error_set (errp, EINVAL,
               "Bottom node '%s' is not in the backing chain "
               "of '%s'",
               bottom, node->file->node_name);
    node_unref (s->bottom);
    s->bottom = NULL;
    return false;
  }
  return true;
}

static void
cor_close (strata_node *node)
{
  struct cor_state *s = node->opaque;

  node_unref (s->bottom);
}

/* Copy into TOP what it lacks of the range (also NBD_CMD_CACHE). */
static int
cor_prefetch (strata_node *node, uint64_t offset, uint64_t len)
{
  struct cor_state *s = node->opaque;
  strata_node *top = cor_format_node (node);
  /* Below a filter named as bottom: the format node it stands for. */
  strata_node *base
      = s->bottom ? node_skip_filters (s->bottom)->backing : NULL;

  /* Reopened read-only (strata-io reopen -r): plain reads. */
  return top->read_only ? 0 : node_copy_up (top, base, offset, len, NULL);
}

static int
cor_preadv (strata_node *node, uint64_t offset, uint64_t len,
            const struct iovec *iov, int iovcnt, unsigned flags)
{
  int r = cor_prefetch (node, offset, len);

  return r < 0 ? r : node_preadv (node->file, offset, len, iov, iovcnt, flags);
}

/* What QEMU's bdrv_get_info() answers for a filter: the child's cluster
 * size, VM state offset and dirty flag; the rest stays the filter's.  The
 * job filters (jobfilter.c) answer the same. */
bool
filter_get_info (strata_node *node, struct strata_info *info,
                 strata_error **errp)
{
  strata_node *f = node->file;
  struct strata_info fi = { 0 };

  if (!f->drv->get_info)
    return true;
  if (!f->drv->get_info (f, &fi, errp))
    return false;
  info->cluster_size = fi.cluster_size;
  info->vm_state_offset = fi.vm_state_offset;
  info->dirty = fi.dirty;
  return true;
}

const struct strata_driver copy_on_read_driver = {
  .name = "copy-on-read",
  .state_size = sizeof (struct cor_state),
  .is_filter = true,
  .has_file_child = true,
  .open = cor_open,
  .close = cor_close,
  .preadv = cor_preadv,
  .get_info = filter_get_info,
  .prefetch = cor_prefetch,
};
