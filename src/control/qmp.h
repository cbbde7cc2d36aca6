/* strata: the seam between the QMP server (stratad's protocol and event
 * loop) and the commands it dispatches.
 *
 * A command is a function from its "arguments" object to its "return"
 * value.  It runs on the control thread (the event loop) and must not do
 * block I/O that can take long: anything slow belongs in a job
 * (src/jobs/, started by commands-stream.c and friends).  Errors carry QEMU's
 * error class ("GenericError", "CommandNotFound", "DeviceNotFound") and a
 * human description, exactly as the QMP reply shows them:
 *   {"error": {"class": "GenericError", "desc": "..."}}
 * JSON values are jansson's json_t.  Ownership: a handler borrows ARGS and
 * returns a new reference (json_object() for an empty return).
 */
#ifndef STRATA_QMP_H
#define STRATA_QMP_H

#include <jansson.h>
#include <stdbool.h>

#include "block/node.h"
#include "control/control.h"
#include "jobs/job.h"
#include "util/error.h"

/* struct qmp_error, struct qmp_command, qmp_find_command() and the
 * shutdown calls are in control.h, the module's face for the programs. */

void qmp_error_set (struct qmp_error *err, const char *class, const char *fmt,
                    ...) __attribute__ ((format (printf, 3, 4)));
/* ERR as a GenericError with E's message; frees E (may be NULL). */
void qmp_error_from (struct qmp_error *err, strata_error *e);

/* The block-graph commands (src/control/commands-block.c), terminated by a
 * { NULL, NULL } entry.  stratad registers them with its own commands
 * (qmp_capabilities, query-version, query-commands, quit). */
extern const struct qmp_command qmp_block_commands[];
/* NBD server and exports (src/control/commands-export.c). */
extern const struct qmp_command qmp_export_commands[];
/* block-stream and x-block-pull-range (src/control/commands-stream.c). */
extern const struct qmp_command qmp_stream_commands[];
/* block-commit (src/control/commands-commit.c). */
extern const struct qmp_command qmp_commit_commands[];
/* blockdev-mirror (src/control/commands-mirror.c). */
extern const struct qmp_command qmp_mirror_commands[];
/* The job verbs and queries (src/control/commands-job.c). */
extern const struct qmp_command qmp_job_commands[];
/* Announce the jobs' events (src/jobs/) as QMP events; once, before any
 * job can start (qmp_server_new does it). */
void qmp_job_events_init (void);

/* Call FN for every command of the tables above. */
void qmp_foreach_command (void (*fn) (const struct qmp_command *cmd,
                                      void *opaque),
                          void *opaque);

/* Broadcast an event to every negotiated monitor client, with the
 * timestamp taken now.  Takes over DATA (may be NULL).  Thread-safe: may be
 * called from any thread (job threads do, through the job event
 * handler commands-job.c registers); delivery happens on the
 * event loop. */
void qmp_event_emit (const char *name, json_t *data);

/* Argument checking, shared by all commands, with QEMU's messages:
 *   missing:     "Parameter 'node-name' is missing"
 *   wrong type:  "Invalid parameter type for 'node-name', expected: string"
 *   unknown:     "Parameter 'foo' is unexpected"
 * SPEC is an array of { name, type, required } ended by { NULL }.  Types:
 * "string", "bool", "int", "object", "array", "str-or-null", "any". */
struct qmp_arg {
  const char *name;
  const char *type;
  bool required;
};
bool qmp_args_check (json_t *args, const struct qmp_arg *spec,
                     struct qmp_error *err);
/* The same for a nested object: PREFIX ("addr.data.") starts the names
 * in the messages. */
bool qmp_args_check_at (json_t *args, const struct qmp_arg *spec,
                        const char *prefix, struct qmp_error *err);

/* ---- what the job-starting commands share (src/control/job-args.c) ----
 *
 * qmp_str_arg: ARGS' string member KEY, or NULL.
 * qmp_lookup_node: the node (or device) NAME with a reference, else NULL
 *   and "Cannot find device='DEVICE' nor node-name='NAME'".
 * qmp_parse_on_error: ARGS' "on-error" (default report), else QAPI's
 *   "Parameter 'on-error' does not accept value ..." .
 * qmp_check_not_busy_job_locked: every node from TOP down to BASE
 *   (excluded; NULL: to the bottom) is free of other jobs, else
 *   "Node 'x' is busy: ...". */
const char *qmp_str_arg (json_t *args, const char *key);
strata_node *qmp_lookup_node (const char *device, const char *name,
                              struct qmp_error *err);
bool qmp_parse_on_error (json_t *args, enum job_on_error *out,
                         struct qmp_error *err);
bool qmp_check_not_busy_job_locked (strata_node *top, strata_node *base,
                                    struct qmp_error *err);
/* The device a job starts on: a root node (no node above it, no job
 * holding it; an export is no node), with a reference; else NULL and
 * QEMU's error: not found is DeviceNotFound "Device 'x' not found" with
 * DEVICE_NOT_FOUND (block-commit: libvirt probes with it), else "Cannot
 * find device='x' nor node-name='x'"; then "Need a root block node".
 * Job lock held. */
strata_node *qmp_root_node_job_locked (const char *device,
                                       bool device_not_found,
                                       struct qmp_error *err);
/* QEMU's op blocker of a backing file: "Node 'x' is busy: node is used as
 * backing hd of 'y'". */
bool qmp_check_not_backing (strata_node *node, struct qmp_error *err);

#endif
