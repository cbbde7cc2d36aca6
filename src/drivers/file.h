/* strata: what the file protocol driver (src/drivers/file.c) offers other
 * drivers.  Formats that store their image in a plain file (raw, qcow2)
 * create that file through it. */
#ifndef STRATA_DRIVERS_FILE_H
#define STRATA_DRIVERS_FILE_H

#include <stdbool.h>
#include <stdint.h>

#include "util/error.h"

/* Create (or truncate) FILENAME as a plain file of SIZE bytes with
 * PREALLOC "off", "falloc" or "full" (NULL = "off").  A file this call
 * created is removed again if it fails. */
bool file_create (const char *filename, uint64_t size, const char *prealloc,
                  strata_error **errp);

#endif
