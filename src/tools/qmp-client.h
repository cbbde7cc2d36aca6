/* The strata client's one connection to a QMP daemon: see qmp-client.c.
 * Every call that fails to talk to the daemon exits the process through
 * client_die(). */
#ifndef STRATA_TOOLS_QMP_CLIENT_H
#define STRATA_TOOLS_QMP_CLIENT_H

#include <signal.h>

#include <jansson.h>

/* The daemon's socket, as client_connect() was given it (for messages). */
extern const char *client_socket_path;
/* SIGINTs received (client_on_sigint() counts them). */
extern volatile sig_atomic_t client_interrupted;
/* Events that came while we waited for a reply, kept for the job commands
 * (NULL: dropped).  The caller creates and frees the array. */
extern json_t *client_event_queue;

/* "strata: MESSAGE" on stderr, and exit 1. */
void client_die (const char *fmt, ...)
    __attribute__ ((noreturn, format (printf, 1, 2)));
/* The SIGINT handler: counts in client_interrupted. */
void client_on_sigint (int sig);

/* Connect to PATH (kept, not copied), read the greeting and negotiate
 * capabilities. */
void client_connect (const char *path);
/* Close the connection and free its buffer. */
void client_close (void);

/* The next message from the daemon, waiting at most TIMEOUT_MS (-1:
 * forever) with the signal mask WAITMASK (NULL: the current one).  NULL
 * with errno 0 when the daemon closed the connection, EAGAIN when the
 * time ran out, EINTR when a signal arrived. */
json_t *client_next_message (int timeout_ms, const sigset_t *waitmask);
/* The next message, or NULL when the daemon closed the connection (or
 * SIGINT arrived). */
json_t *client_read_message (void);
/* Send MSG (taken over) with our id; the reply (the caller frees it),
 * queueing or dropping the events before it. */
json_t *client_transact (json_t *msg);
/* Run COMMAND with ARGS (taken over, may be NULL); the whole reply. */
json_t *client_execute_reply (const char *command, json_t *args);
/* Run COMMAND with ARGS (taken over, may be NULL); its return value, or
 * exit 1 with the error's description. */
json_t *client_execute (const char *command, json_t *args);

#endif
