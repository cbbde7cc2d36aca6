/* strata: the control module as the programs see it (stratad, strata).
 *
 * src/tools/ is built with only include/ and src/util/ on its include
 * path, so that strata-img and strata-io can use nothing but the public
 * API; stratad and strata add src/control/ and include this header (and
 * server.h, which it includes), nothing else of the module.  It names only
 * jansson and standard types: the commands' internals (qmp.h, the block
 * graph) stay out of the programs' reach.
 */
#ifndef STRATA_CONTROL_H
#define STRATA_CONTROL_H

#include <jansson.h>
#include <stdbool.h>

#include "server.h"

/* A QMP error: QEMU's class and a human description. */
struct qmp_error {
  const char *class; /* static string: "GenericError", ... */
  char *desc;        /* malloc'd; NULL when no error */
};
void qmp_error_clear (struct qmp_error *err);

/* Handler: return a new reference, or NULL after qmp_error_set(). */
typedef json_t *(*qmp_handler) (json_t *args, struct qmp_error *err);

struct qmp_command {
  const char *name;
  qmp_handler fn;
};

/* The command named NAME among the module's commands, or NULL. */
const struct qmp_command *qmp_find_command (const char *name);

/* Where stratad listens and the strata client connects when no socket is
 * named: $XDG_RUNTIME_DIR/strata/stratad.sock, else
 * /run/strata/stratad.sock for root, else /tmp/strata-$UID/stratad.sock.
 * Caller frees; NULL on ENOMEM. */
char *qmp_default_socket_path (void);

/* Called once at daemon shutdown: flush and close every node the commands
 * opened (in an order that closes overlays before what they use). */
void qmp_block_shutdown (void);
/* Called before qmp_block_shutdown(): cancel jobs, stop exports. */
void qmp_job_shutdown (void);
void qmp_export_shutdown (void);

#endif
