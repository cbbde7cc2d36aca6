/* strata: the commit job (src/jobs/commit.c): block-commit's work, started
 * by src/control/commands-commit.c once the QMP arguments are checked.
 */
#ifndef STRATA_JOBS_COMMIT_H
#define STRATA_JOBS_COMMIT_H

#include <stdbool.h>
#include <stdint.h>

#include "block/node.h"
#include "jobs/job.h"
#include "util/error.h"

struct commit_params {
  const char *job_id;       /* "" when none was given (then refused) */
  strata_node *device;      /* the root node named as the device (borrowed) */
  strata_node *top;         /* the highest layer committed (borrowed) */
  strata_node *base;        /* the layer it all goes into (borrowed) */
  strata_node *overlay;     /* the layer above TOP, whose backing becomes
                               BASE (borrowed); NULL for an active commit */
  bool active;              /* TOP is the device's active layer */
  const char *backing_file; /* the name OVERLAY records, or NULL: BASE's */
  int64_t speed;            /* bytes/s, 0: unlimited; < 0 refused */
  enum job_on_error on_error;
  bool auto_finalize, auto_dismiss;
  const char *filter_node_name; /* the job filter's name, or NULL */
};

/* Create and start a commit job, intermediate (TOP below the device's
 * active layer) or active, job lock and graph lock held.  The job holds a
 * filter node for its life, as QEMU's (drivers/jobfilter.c): commit_top
 * over TOP, made after the job; mirror_top over DEVICE for an active
 * commit, made before it.  False with *ERRP set
 * (a job that was created has sent created and null). */
bool commit_start_job_locked (const struct commit_params *p,
                              strata_error **errp);

/* blockdev-mirror: the active commit's engine copying SOURCE (the device's
 * active layer) into any TARGET of the same size, type "mirror".  SYNC
 * says what is copied before the guest's new writes: full (everything the
 * chain allocates), top (what SOURCE itself allocates), none. */
enum mirror_sync { MIRROR_SYNC_FULL, MIRROR_SYNC_TOP, MIRROR_SYNC_NONE };

struct mirror_params {
  const char *job_id;  /* "" when none was given (then refused) */
  strata_node *device; /* the root node named as the device (borrowed) */
  strata_node *source; /* DEVICE without its filters (borrowed) */
  strata_node *target; /* (borrowed) */
  /* drive-mirror: the node that becomes TARGET's backing at the pivot
   * (sync=top: SOURCE's backing; sync=none: SOURCE), or NULL (borrowed) */
  strata_node *target_backing;
  enum mirror_sync sync;
  int64_t speed;
  enum job_on_error on_source_error, on_target_error;
  bool write_blocking; /* copy-mode=write-blocking */
  uint64_t buf_size;   /* buf-size: bytes of copies in flight; 0: default */
  bool auto_finalize, auto_dismiss;
  const char *filter_node_name; /* the mirror_top filter's name, or NULL */
};

/* Create and start a mirror job, job lock and graph lock held; its
 * mirror_top filter over DEVICE is made before the job, as QEMU's. */
bool mirror_start_job_locked (const struct mirror_params *p,
                              strata_error **errp);

#endif
