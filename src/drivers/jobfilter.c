/* strata: the filter drivers QEMU's commit and mirror jobs put in the
 * graph for their life: "mirror_top" over the device of a blockdev-mirror,
 * drive-mirror or active block-commit, "commit_top" over the top of an
 * intermediate block-commit.
 *
 *      [mirror_top] --file--> [qcow2 top] --backing--> [mid] ...
 *
 * The job opens one (named by filter-node-name, else automatically) with
 * its `file` child on the node QEMU puts it over and holds it, so the node
 * is listed, its name is taken and blockdev-del finds it busy, as in QEMU.
 * In strata it stands beside the data path: guest requests keep going to
 * the device node, where the jobs track writes (src/jobs/commit.c).  Were
 * one on a path, every operation would pass to `file` (the core does that
 * for a filter that leaves an operation NULL).  commit_top is opened read-
 * only, as QEMU opens it.  Neither can be made by blockdev-add (QEMU's
 * schema has no such driver; control/blockdev-schema.c keeps the list).
 */
#include "drivers/registry.h"

/* Nothing to open beyond the `file` child the core attached. */
static bool
jobfilter_open (strata_node *node, strata_opts *opts, unsigned flags,
                strata_error **errp)
{
  (void)node;
  (void)opts;
  (void)flags;
  (void)errp;
  return true;
}

const struct strata_driver mirror_top_driver = {
  .name = "mirror_top",
  .is_filter = true,
  .has_file_child = true,
  .open = jobfilter_open,
  .get_info = filter_get_info,
};

const struct strata_driver commit_top_driver = {
  .name = "commit_top",
  .is_filter = true,
  .has_file_child = true,
  .open = jobfilter_open,
  .get_info = filter_get_info,
};
