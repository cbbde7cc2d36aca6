/* strata: the stream job (src/jobs/stream.c): block-stream's work, started
 * from typed parameters, so that the daemon, a tool or a library caller
 * can start it alike.  The caller has checked the arguments: that BASE is
 * below DEVICE, that no other job holds the nodes between them. */
#ifndef STRATA_JOBS_STREAM_H
#define STRATA_JOBS_STREAM_H

#include <stdbool.h>
#include <stdint.h>

#include "block/node.h"
#include "jobs/job.h"
#include "util/error.h"

struct stream_params {
  const char *job_id;           /* "" when none was given (then refused) */
  strata_node *device;          /* the node named as the device (borrowed) */
  strata_node *base;            /* below DEVICE, or NULL: the whole chain */
  const char *backing_file;     /* the name to record, or NULL: BASE's */
  const char *filter_node_name; /* the copy-on-read filter's, or NULL */
  int64_t speed;                /* bytes/s, 0: unlimited; < 0 refused */
  enum job_on_error on_error;
  bool auto_finalize, auto_dismiss;
  bool yield_to_guest;  /* x-yield-to-guest: idle-aware streaming */
  uint64_t floor_speed; /* x-guest-floor-speed, while the guest is busy */
};

/* Create and start a stream job, job lock held (and the graph lock: it
 * opens the filter node).  The image streamed into is DEVICE below its
 * filters.  Takes its own references; the caller keeps its own.  False
 * with *ERRP set (QEMU's texts) when the job could not start. */
bool stream_start_job_locked (const struct stream_params *p,
                              strata_error **errp);

#endif
