/* strata: error reporting.
 *
 * The control-path convention (after QEMU's include/qapi/error.h): a
 * function that can fail takes `strata_error **errp` last and returns a
 * value that says whether it failed (false or NULL).  On failure it sets
 * *errp exactly once with error_set(); ERRP may be NULL when the caller does
 * not want the details.  A function never both logs an error and returns
 * it.  Messages say what was wrong and where: "img.qcow2: L1 table offset
 * 0x1234 is not aligned to the cluster size".
 */
#ifndef STRATA_ERROR_H
#define STRATA_ERROR_H

#include <stdbool.h>
#include <strata/strata.h>

struct strata_error {
  int errnum;   /* positive errno */
  char *msg;
};

/* Set *errp (when ERRP is not NULL) to a new error.  *errp must be NULL. */
void error_set (strata_error **errp, int errnum, const char *fmt, ...)
    __attribute__ ((format (printf, 3, 4)));

/* Like error_set(), appending ": " and strerror(errnum) to the message. */
void error_set_errno (strata_error **errp, int errnum, const char *fmt, ...)
    __attribute__ ((format (printf, 3, 4)));

/* Prefix an existing error's message with "PREFIX: ". */
void error_prepend (strata_error **errp, const char *fmt, ...)
    __attribute__ ((format (printf, 2, 3)));

/* Move SRC into *DST (or free it when DST is NULL). */
void error_propagate (strata_error **dst, strata_error *src);

/* Data path: record the detail of a failure for this thread and return
 * -ERRNUM, so a driver can write `return io_error (EIO, "...")`. */
int io_error (int errnum, const char *fmt, ...)
    __attribute__ ((format (printf, 2, 3)));
void io_error_clear (void);

#endif
