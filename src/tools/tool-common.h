/* strata: small pieces the command-line tools share (tool-common.c). */
#ifndef STRATA_TOOL_COMMON_H
#define STRATA_TOOL_COMMON_H

#include <strata/strata.h>

/* QEMU's warning, on stderr, when N was opened without a format and
 * probing found raw (write operations on block 0 are then restricted). */
void tool_warn_probed_raw (strata_node *n, const char *filename);

/* Point stdin, stdout and stderr at /dev/null (a daemon once detached). */
void tool_stdio_to_null (void);

#endif
