/* strata: the drivers strata is built with (src/drivers/registry.c).
 *
 * The core (src/block/) never names a driver: it finds one by name with
 * driver_find(), by a file name it claims with driver_for_filename(), or
 * by probing, all through the list registry.c defines.  A driver's own
 * file includes this header so that its definition matches the
 * declaration here; adding a driver means one line here and one in
 * registry.c.
 */
#ifndef STRATA_DRIVERS_REGISTRY_H
#define STRATA_DRIVERS_REGISTRY_H

#include "block/node.h"

extern const struct strata_driver file_driver;         /* drivers/file.c */
extern const struct strata_driver nbd_driver;          /* drivers/nbd.c */
extern const struct strata_driver qcow2_driver;        /* drivers/qcow2/ */
extern const struct strata_driver raw_driver;          /* drivers/raw.c */
extern const struct strata_driver copy_on_read_driver; /* drivers/cor.c */
extern const struct strata_driver blkdebug_driver;     /* blkdebug.c */
extern const struct strata_driver mirror_top_driver;   /* jobfilter.c */
extern const struct strata_driver commit_top_driver;   /* jobfilter.c */

/* What QEMU's bdrv_get_info() answers for a filter: its `file` child's
 * cluster size, VM state offset and dirty flag (drivers/cor.c). */
bool filter_get_info (strata_node *node, struct strata_info *info,
                      strata_error **errp);

#endif
