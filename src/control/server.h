/* strata: stratad's QMP server -- listening unix sockets, monitor
 * connections and the event loop that serves them (see server.c and
 * docs/qmp.md). */
#ifndef STRATA_SERVER_H
#define STRATA_SERVER_H

#include <jansson.h>
#include <stdbool.h>

/* The largest QMP message (one JSON value) a client may send, and the most
 * output a client may leave unread, before its connection is closed. */
#define QMP_MAX_MESSAGE (16u << 20)
#define QMP_MAX_QUEUED  (16u << 20)

struct qmp_server;

/* A new server with no sockets.  Blocks SIGTERM and SIGINT in the calling
 * thread (call it before starting any thread) and receives them through a
 * signalfd.  Returns NULL and sets *ERRMSG (malloc'd) on failure.  Free
 * with qmp_server_free(). */
struct qmp_server *qmp_server_new (char **errmsg);

/* Listen on the unix socket PATH.  A stale socket file (nobody listening)
 * is replaced; a live one is an error.  The file is removed by
 * qmp_server_free(). */
bool qmp_server_listen (struct qmp_server *srv, const char *path,
                        char **errmsg);

/* Serve until quit or SIGTERM/SIGINT; then stop accepting, deliver the
 * queued events and replies that can go out without blocking, and return. */
void qmp_server_run (struct qmp_server *srv);

/* Close every connection, remove the socket files. */
void qmp_server_free (struct qmp_server *srv);

/* strata_version_number() split, as query-version reports it. */
void qmp_version (int *major, int *minor, int *micro);

/* KEY=VALUE[,KEY=VALUE...] strings (",," escapes a comma; dotted keys
 * nest) to a JSON object: values that look like integers become integers,
 * "true"/"false"/"on"/"off" booleans, except for keys that are always
 * strings (node-name, filename, ...).  Returns a new reference, or NULL
 * with *ERRMSG (malloc'd) set. */
json_t *qmp_keyval_parse (char *const *args, int nargs, char **errmsg);

#endif
