/* strata: the NBD server module, shared by strata-nbd and stratad.
 *
 * Threads, not callbacks: each connection has a reader thread (handshake,
 * then requests) and a writer thread (sends queued replies); a worker pool
 * shared by all connections runs the requests, so a connection can have
 * many requests in flight and replies may leave out of order.  A
 * connection's in-flight requests and queued reply bytes are bounded, so a
 * client that never reads its replies stalls only itself.
 */
#ifndef STRATA_NBD_SERVER_H
#define STRATA_NBD_SERVER_H

#include <stdbool.h>
#include <strata/strata.h>

struct nbd_server;

struct nbd_export_flags {
  bool writable;          /* else the export is read-only */
  bool allocation_depth;  /* offer the qemu:allocation-depth context */
  bool multi_conn;        /* advertise CAN_MULTI_CONN: every connection
                           * shares NODE and a flush is global to it (the
                           * caller decides, as qemu-nbd does not with
                           * -e 1, where a second connection would wait) */
  bool discard;           /* TRIM and WRITE_ZEROES may unmap; else TRIM is
                           * a successful no-op (qemu-nbd --discard=ignore) */
  bool writethrough;      /* every write is FUA (cache=writethrough) */
  /* detect-zeroes: a WRITE whose payload is all zeros is done as
   * WRITE_ZEROES (ZEROES_UNMAP: which may unmap, needs DISCARD). */
  enum { ZEROES_OFF, ZEROES_ON, ZEROES_UNMAP } detect_zeroes;
};

/* A server with no exports and its worker pool.  Freed by
 * nbd_server_free(). */
struct nbd_server *nbd_server_new (void);

/* Export NODE (borrowed: it must outlive the server) as NAME.
 * DESCRIPTION may be NULL. */
bool nbd_server_add_export (struct nbd_server *srv, const char *name,
                            const char *description, strata_node *node,
                            const struct nbd_export_flags *flags,
                            strata_error **errp);
/* The same, and call GONE(OPAQUE) once the export is removed and its last
 * client has gone (from whichever thread that happens in), or when the
 * server is freed.  NODE must stay valid until then. */
bool nbd_server_add_export_full (struct nbd_server *srv, const char *name,
                                 const char *description, strata_node *node,
                                 const struct nbd_export_flags *flags,
                                 void (*gone) (void *opaque), void *opaque,
                                 strata_error **errp);
/* Stop offering export NAME.  Connected clients keep using it unless HARD,
 * which disconnects them; without HARD an export with clients is not
 * removed (EBUSY: "export 'x' still in use").  ENOENT when unknown. */
bool nbd_server_remove_export (struct nbd_server *srv, const char *name,
                               bool hard, strata_error **errp);

/* How many clients may be connected at once (0: no limit) (further ones
 * wait in the listen backlog), and whether nbd_server_run() returns once
 * the last client has gone (PERSISTENT false, like qemu-nbd without -t):
 * the last one, if it completed the handshake; a client that gave up
 * while negotiating does not end the server, as it does not qemu-nbd's. */
void nbd_server_set_limits (struct nbd_server *srv, unsigned max_clients,
                            bool persistent);

/* A full server with a client waiting for a slot disconnects the
 * connection idle longest (no request for MS milliseconds, 30 s by
 * default, and none in flight), so that a vanished client cannot hold a
 * slot forever. */
void nbd_server_set_evict_after (struct nbd_server *srv, unsigned ms);

/* Exports serving OLD serve NEW from their next request on (an active
 * commit's pivot).  The caller keeps OLD alive and makes OLD forward the
 * requests already on their way to it (node_forward_to). */
void nbd_server_retarget (struct nbd_server *srv, strata_node *old,
                          strata_node *new);

bool nbd_server_listen_unix (struct nbd_server *srv, const char *path,
                             strata_error **errp);
/* HOST may be NULL (all addresses); PORT "0" picks a free port, which
 * nbd_server_tcp_port() then reports. */
bool nbd_server_listen_tcp (struct nbd_server *srv, const char *host,
                            const char *port, strata_error **errp);
int nbd_server_tcp_port (struct nbd_server *srv);

/* Serve one connection on FD (a connected socket, which this closes) in
 * the calling thread; returns when the client has gone. */
void nbd_server_serve_fd (struct nbd_server *srv, int fd);

/* Accept clients until nbd_server_stop(), or until the last client has
 * gone when the server is not persistent (see nbd_server_set_limits).
 * Returns after every
 * connection has ended. */
void nbd_server_run (struct nbd_server *srv);

/* Safe from any thread (not from a signal handler): stop accepting and
 * disconnect every client. */
void nbd_server_stop (struct nbd_server *srv);

void nbd_server_free (struct nbd_server *srv);

#endif
