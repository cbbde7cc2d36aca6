/* strata: checking a QMP blockdev definition against QEMU's
 * BlockdevOptions schema (blockdev-schema.c). */
#ifndef STRATA_CONTROL_BLOCKDEV_SCHEMA_H
#define STRATA_CONTROL_BLOCKDEV_SCHEMA_H

#include <jansson.h>
#include <stdbool.h>

#include "control/qmp.h"
#include "util/opts.h"

/* Check the definition OBJ and add its options to OUT as dotted keys.
 * PATH ("" or "options[0].") starts the member names in the messages.
 * False with ERR set (QEMU's texts) when OBJ does not fit the schema. */
bool blockdev_options_visit (json_t *obj, const char *path, strata_opts *out,
                             struct qmp_error *err);

#endif
