/* strata: the list of drivers, the only place that names them all.
 *
 * Order matters in two ways: driver_for_filename() asks the drivers in
 * this order whether they claim a file name, and probing keeps the first
 * of equally scored formats.  The core reads the list through node.h's
 * driver_list and driver_count, so it depends on no driver by name.
 */
#include <stddef.h>

#include "drivers/registry.h"

const struct strata_driver *const driver_list[] = {
  &file_driver,       &nbd_driver,          &qcow2_driver,
  &raw_driver,        &copy_on_read_driver, &blkdebug_driver,
  &mirror_top_driver, &commit_top_driver,
};

const size_t driver_count = sizeof driver_list / sizeof driver_list[0];
