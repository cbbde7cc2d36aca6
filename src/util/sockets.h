/* strata: listening unix sockets that appear only when they accept. */
#ifndef STRATA_SOCKETS_H
#define STRATA_SOCKETS_H

#include <stdbool.h>

/* Create a listening unix socket at PATH (which must not exist, or the
 * caller has removed a stale one).  The socket is bound to a temporary
 * name beside PATH, put into listen state, and only then renamed to PATH,
 * so whoever waits for PATH to exist (tests, scripts, the daemon's own
 * --daemonize parent) can connect at once instead of racing bind against
 * listen.  Returns the fd or a negative errno. */
int unix_socket_listen (const char *path, int backlog, bool nonblock);

#endif
