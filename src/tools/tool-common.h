/* strata: small pieces the command-line tools share (tool-common.c). */
#ifndef STRATA_TOOL_COMMON_H
#define STRATA_TOOL_COMMON_H

#include <stddef.h>
#include <stdint.h>

#include <strata/strata.h>

/* QEMU's warning, on stderr, when N was opened without a format and
 * probing found raw (write operations on block 0 are then restricted). */
void tool_warn_probed_raw (strata_node *n, const char *filename);

/* Point stdin, stdout and stderr at /dev/null (a daemon once detached). */
void tool_stdio_to_null (void);

/* qemu's size_to_str() (qemu-img's sizes): "1.5 GiB", the next unit from
 * 1000 of the current one. */
void size_to_str (uint64_t val, char *buf, size_t len);
/* N in the largest binary unit that keeps it at least 1; the unit's
 * name in *UNIT. */
double scale_binary (int64_t n, const char **unit);
/* strata's sizes: "512 B", "1.5 MiB". */
void human_size (int64_t n, char *buf, size_t len);
/* BPS bytes/s as human_size() and "/s": "1.5 MiB/s". */
void human_rate (double bps, char *buf, size_t len);

#endif
