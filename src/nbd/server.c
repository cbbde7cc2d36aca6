/* strata: the NBD server: exports, listening sockets, the accept loop
 * and connections (proto.md "Protocol phases"; the module's map, its
 * invariants and its locks are in internal.h).
 *
 * Each accepted connection gets a reader thread (conn_run: the
 * handshake, then transmission) and, once it negotiated, a writer thread;
 * a connection is freed by its reader once no request and no reply
 * refers to it.  The accept loop admits at most max_clients connections
 * (the rest wait in the listen backlog); when full and a client waits,
 * it disconnects the connection idle longest, if one has been idle for
 * evict_ms.  Exports are reference-counted (the server's list and each
 * connection that chose one), so they can be added and removed while
 * clients are connected; a removed export's GONE callback runs when its
 * last reference goes.
 *
 * Choices:
 * - CAN_MULTI_CONN: advertised when the caller says so (every connection
 *   shares one node and strata_flush() on it is global; strata-nbd says
 *   so unless it takes one client at a time, as qemu-nbd; stratad always,
 *   as qemu-storage-daemon).
 * - DF is advertised with structured replies (handshake.c).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "nbd/internal.h"
#include "nbd/protocol.h"
#include "util/error.h"
#include "util/sockets.h"

/* How long C has been idle (ms): no request in flight and none received
 * for that long; 0 when busy or still negotiating.  c->lock held. */
static uint64_t
idle_for_conn_locked (struct conn *c, uint64_t now)
{
  if (c->inflight > 0 || c->last_request_ms == 0 || c->dead)
    return 0;
  return now > c->last_request_ms ? now - c->last_request_ms : 0;
}

/* ---- exports ---- */

/* With srv->lock held. */
static ssize_t
export_index_server_locked (struct nbd_server *srv, const char *name)
{
  for (size_t i = 0; i < srv->nr_exports; i++)
    if (strcmp (srv->exports[i]->name, name) == 0)
      return (ssize_t)i;
  return -1;
}

/* The export named NAME with a new reference (nbd_export_unref), or NULL. */
struct nbd_export *
nbd_export_find (struct nbd_server *srv, const char *name)
{
  struct nbd_export *e = NULL;
  ssize_t i;

  pthread_mutex_lock (&srv->lock);
  if ((i = export_index_server_locked (srv, name)) >= 0) {
    e = srv->exports[i];
    e->refs++;
  }
  pthread_mutex_unlock (&srv->lock);
  return e;
}

/* Drop a reference taken with srv->lock held; returns the export when it
 * must be freed (outside the lock: GONE may take the caller's locks). */
static struct nbd_export *
export_unref_server_locked (struct nbd_export *e)
{
  return --e->refs == 0 ? e : NULL;
}

static void
export_free (struct nbd_export *e)
{
  if (!e)
    return;
  if (e->gone)
    e->gone (e->gone_opaque);
  free (e->name);
  free (e->description);
  free (e);
}

void
nbd_export_unref (struct nbd_server *srv, struct nbd_export *e)
{
  struct nbd_export *dead;

  if (!e)
    return;
  pthread_mutex_lock (&srv->lock);
  dead = export_unref_server_locked (e);
  pthread_mutex_unlock (&srv->lock);
  export_free (dead);
}

/* ---- connections ---- */

/* Disconnect C: replies are dropped, buffered requests are not run, and
 * the shutdown wakes its reader and writer.  srv->lock may be held. */
static void
conn_drop (struct conn *c)
{
  pthread_mutex_lock (&c->lock);
  c->dead = true;
  shutdown (c->fd, SHUT_RDWR);
  if (c->reader_waits)
    pthread_cond_signal (&c->cond);
  pthread_mutex_unlock (&c->lock);
}

/* Serve the connection on FD until it ends; true when the client
 * completed the handshake (it chose an export and transmission began). */
static bool
conn_run (struct nbd_server *srv, int fd)
{
  struct conn *c = calloc (1, sizeof *c);
  bool negotiated = false;
  int one = 1;

  if (!c) {
    close (fd);
    return false;
  }
  c->srv = srv;
  c->fd = fd;
  /* Parallel until proved short. */
  c->avg_ns[0] = c->avg_ns[1] = 2 * NBD_SLOW_REQUEST_NS;
  if (!(c->rbuf = malloc (NBD_RBUF))) {
    free (c);
    close (fd);
    return false;
  }
  pthread_mutex_init (&c->lock, NULL);
  pthread_cond_init (&c->cond, NULL);
  pthread_cond_init (&c->wcond, NULL);
  setsockopt (fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

  pthread_mutex_lock (&srv->lock);
  c->next = srv->conns;
  srv->conns = c;
  bool stopping = srv->stopping;
  pthread_mutex_unlock (&srv->lock);

  if (!stopping && conn_handshake (c)
      && pthread_create (&c->writer, NULL, reply_writer, c) == 0) {
    negotiated = true;
    conn_transmission (c);
    pthread_mutex_lock (&c->lock);
    while (c->inflight > 0) {
      c->reader_waits = true;
      pthread_cond_wait (&c->cond, &c->lock);
    }
    c->reader_waits = false;
    c->quit = true;
    pthread_cond_signal (&c->wcond);
    pthread_mutex_unlock (&c->lock);
    pthread_join (c->writer, NULL);
  }

  pthread_mutex_lock (&srv->lock);
  for (struct conn **pp = &srv->conns; *pp; pp = &(*pp)->next)
    if (*pp == c) {
      *pp = c->next;
      break;
    }
  pthread_mutex_unlock (&srv->lock);
  close (fd);
  nbd_export_unref (srv, c->exp);
  free (c->ctx_export);
  free (c->rbuf);
  pthread_cond_destroy (&c->wcond);
  pthread_cond_destroy (&c->cond);
  pthread_mutex_destroy (&c->lock);
  free (c);
  return negotiated;
}

struct conn_arg {
  struct nbd_server *srv;
  int fd;
};

static void
wake (struct nbd_server *srv)
{
  char b = 0;
  if (write (srv->wake[1], &b, 1) < 0) {
    /* The pipe is full: the loop is awake anyway. */
  }
}

static void *
conn_thread (void *arg)
{
  struct conn_arg a = *(struct conn_arg *)arg;
  bool negotiated;

  free (arg);
  negotiated = conn_run (a.srv, a.fd);
  /* Wake the accept loop before the count drops: once it is zero the
   * server may be freed. */
  pthread_mutex_lock (&a.srv->lock);
  wake (a.srv);
  a.srv->active--;
  /* A server that is not persistent ends when the last client leaves,
   * if that client had negotiated (as qemu-nbd): a client that gave up
   * in the handshake (a probe, a listing, garbage) does not end it. */
  if (negotiated && a.srv->active == 0)
    a.srv->last_client_gone = true;
  pthread_cond_broadcast (&a.srv->cond);
  pthread_mutex_unlock (&a.srv->lock);
  return NULL;
}

void
nbd_server_serve_fd (struct nbd_server *srv, int fd)
{
  (void)conn_run (srv, fd);
}

/* ---- the server ---- */

struct nbd_server *
nbd_server_new (void)
{
  struct nbd_server *srv = calloc (1, sizeof *srv);
  if (!srv)
    return NULL;
  if (pipe2 (srv->wake, O_CLOEXEC | O_NONBLOCK) < 0) {
    free (srv);
    return NULL;
  }
  pthread_mutex_init (&srv->lock, NULL);
  pthread_cond_init (&srv->cond, NULL);
  srv->max_clients = 1;
  srv->evict_ms = NBD_EVICT_MS;
  srv->persistent = true;
  srv->pool = workqueue_new (NBD_WORKERS, NBD_SLOW_REQUEST_NS);
  if (!srv->pool) {
    nbd_server_free (srv);
    return NULL;
  }
  return srv;
}

bool
nbd_server_add_export (struct nbd_server *srv, const char *name,
                       const char *description, strata_node *node,
                       const struct nbd_export_flags *flags,
                       strata_error **errp)
{
  return nbd_server_add_export_full (srv, name, description, node, flags, NULL,
                                     NULL, errp);
}

bool
nbd_server_add_export_full (struct nbd_server *srv, const char *name,
                            const char *description, strata_node *node,
                            const struct nbd_export_flags *flags,
                            void (*gone) (void *opaque), void *opaque,
                            strata_error **errp)
{
  struct nbd_export *e, **v;
  int64_t size = strata_length (node);

  if (strlen (name) > NBD_MAX_NAME) {
    error_set (errp, EINVAL, "export name longer than %d bytes", NBD_MAX_NAME);
    return false;
  }
  if (description && strlen (description) > NBD_MAX_NAME) {
    error_set (errp, EINVAL, "export description longer than %d bytes",
               NBD_MAX_NAME);
    return false;
  }
  if (size < 0) {
    error_set_errno (errp, (int)-size, "export '%s': cannot get its size",
                     name);
    return false;
  }
  e = calloc (1, sizeof *e);
  if (!e) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  *e = (struct nbd_export){
    .node = node, .flags = *flags, .size = (uint64_t)size, .refs = 1
  };
  e->name = strdup (name);
  e->description = description ? strdup (description) : NULL;
  if (!e->name || (description && !e->description)) {
    export_free (e);
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  e->tflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA
              | NBD_FLAG_SEND_CACHE;
  if (flags->writable)
    e->tflags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES
                 | NBD_FLAG_SEND_FAST_ZERO;
  else
    e->tflags |= NBD_FLAG_READ_ONLY;
  if (flags->multi_conn)
    e->tflags |= NBD_FLAG_CAN_MULTI_CONN;

  pthread_mutex_lock (&srv->lock);
  if (export_index_server_locked (srv, name) >= 0) {
    pthread_mutex_unlock (&srv->lock);
    export_free (e);
    error_set (errp, EEXIST, "export '%s' already exists", name);
    return false;
  }
  v = realloc (srv->exports, (srv->nr_exports + 1) * sizeof *v);
  if (!v) {
    pthread_mutex_unlock (&srv->lock);
    export_free (e);
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  srv->exports = v;
  v[srv->nr_exports++] = e;
  /* Only now: a failed add must not report the export gone. */
  e->gone = gone;
  e->gone_opaque = opaque;
  pthread_mutex_unlock (&srv->lock);
  return true;
}

/* Does a client that has not hung up use E?  A client that closed its
 * end a moment ago still holds a reference until its reader notices;
 * it does not make the export busy.  srv->lock held. */
static bool
export_has_live_client_server_locked (struct nbd_server *srv,
                                      struct nbd_export *e)
{
  for (struct conn *c = srv->conns; c; c = c->next) {
    struct pollfd pfd = { .fd = c->fd, .events = POLLRDHUP };
    if (c->exp != e)
      continue;
    if (poll (&pfd, 1, 0) == 0
        || !(pfd.revents & (POLLRDHUP | POLLHUP | POLLERR)))
      return true;
  }
  /* Other references are options (INFO, meta contexts) being answered
   * in a handshake: not clients of the export yet. */
  return false;
}

bool
nbd_server_remove_export (struct nbd_server *srv, const char *name, bool hard,
                          strata_error **errp)
{
  struct nbd_export *e, *dead;
  ssize_t i;

  pthread_mutex_lock (&srv->lock);
  if ((i = export_index_server_locked (srv, name)) < 0) {
    pthread_mutex_unlock (&srv->lock);
    error_set (errp, ENOENT, "export '%s' not found", name);
    return false;
  }
  e = srv->exports[i];
  if (!hard && e->refs > 1 && export_has_live_client_server_locked (srv, e)) {
    pthread_mutex_unlock (&srv->lock);
    error_set (errp, EBUSY, "export '%s' still in use", name);
    return false;
  }
  memmove (&srv->exports[i], &srv->exports[i + 1],
           (srv->nr_exports - (size_t)i - 1) * sizeof *srv->exports);
  srv->nr_exports--;
  /* Disconnect its clients; each drops its reference as it ends. */
  for (struct conn *c = srv->conns; c; c = c->next)
    if (c->exp == e)
      shutdown (c->fd, SHUT_RDWR);
  dead = export_unref_server_locked (e);
  pthread_mutex_unlock (&srv->lock);
  export_free (dead);
  return true;
}

void
nbd_server_retarget (struct nbd_server *srv, strata_node *old,
                     strata_node *new)
{
  pthread_mutex_lock (&srv->lock);
  for (size_t i = 0; i < srv->nr_exports; i++)
    if (srv->exports[i]->node == old)
      __atomic_store_n (&srv->exports[i]->node, new, __ATOMIC_RELEASE);
  pthread_mutex_unlock (&srv->lock);
}

void
nbd_server_set_evict_after (struct nbd_server *srv, unsigned ms)
{
  srv->evict_ms = ms;
}

void
nbd_server_set_limits (struct nbd_server *srv, unsigned max_clients,
                       bool persistent)
{
  srv->max_clients = max_clients ? max_clients : UINT_MAX;
  srv->persistent = persistent;
}

static bool
add_listen_fd (struct nbd_server *srv, int fd, strata_error **errp)
{
  if (srv->nr_listen >= NBD_MAX_LISTEN) {
    close (fd);
    error_set (errp, EMFILE, "too many listening sockets");
    return false;
  }
  srv->listen_fds[srv->nr_listen++] = fd;
  return true;
}

bool
nbd_server_listen_unix (struct nbd_server *srv, const char *path,
                        strata_error **errp)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  struct stat st;
  int fd;

  if (strlen (path) >= sizeof sun.sun_path) {
    error_set (errp, ENAMETOOLONG, "%s: socket path too long", path);
    return false;
  }
  strcpy (sun.sun_path, path);
  if (lstat (path, &st) == 0 && S_ISSOCK (st.st_mode))
    unlink (path);
  fd = unix_socket_listen (path, 16, false);
  if (fd < 0) {
    error_set_errno (errp, -fd, "%s", path);
    return false;
  }
  return add_listen_fd (srv, fd, errp);
}

bool
nbd_server_listen_tcp (struct nbd_server *srv, const char *host,
                       const char *port, strata_error **errp)
{
  struct addrinfo hints = { .ai_family = AF_UNSPEC,
                            .ai_socktype = SOCK_STREAM,
                            .ai_flags = AI_PASSIVE | AI_ADDRCONFIG };
  struct addrinfo *res, *a;
  int r, bound = 0, err = 0;

  r = getaddrinfo (host, port, &hints, &res);
  if (r != 0) {
    error_set (errp, EINVAL, "%s:%s: %s", host ? host : "", port,
               gai_strerror (r));
    return false;
  }
  for (a = res; a; a = a->ai_next) {
    int one = 1, fd;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    fd = socket (a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      err = errno;
      continue;
    }
    setsockopt (fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (a->ai_family == AF_INET6)
      setsockopt (fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind (fd, a->ai_addr, a->ai_addrlen) < 0 || listen (fd, 16) < 0) {
      err = errno;
      close (fd);
      continue;
    }
    if (getsockname (fd, (struct sockaddr *)&ss, &sl) == 0)
      srv->tcp_port = ntohs (ss.ss_family == AF_INET6
                                 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                 : ((struct sockaddr_in *)&ss)->sin_port);
    if (!add_listen_fd (srv, fd, errp)) {
      freeaddrinfo (res);
      return false;
    }
    bound++;
    /* Port 0: every address family must use the port the first got. */
    if (strcmp (port, "0") == 0)
      break;
  }
  freeaddrinfo (res);
  if (!bound) {
    error_set_errno (errp, err ? err : EADDRNOTAVAIL, "%s:%s",
                     host ? host : "", port);
    return false;
  }
  return true;
}

int
nbd_server_tcp_port (struct nbd_server *srv)
{
  return srv->tcp_port;
}

static void
accept_one (struct nbd_server *srv, int lfd)
{
  struct conn_arg *a;
  pthread_t t;
  pthread_attr_t attr;
  int fd = accept4 (lfd, NULL, NULL, SOCK_CLOEXEC);

  if (fd < 0)
    return;
  a = malloc (sizeof *a);
  if (!a) {
    close (fd);
    return;
  }
  a->srv = srv;
  a->fd = fd;
  pthread_mutex_lock (&srv->lock);
  srv->active++;
  pthread_mutex_unlock (&srv->lock);
  pthread_attr_init (&attr);
  pthread_attr_setdetachstate (&attr, PTHREAD_CREATE_DETACHED);
  if (pthread_create (&t, &attr, conn_thread, a) != 0) {
    free (a);
    close (fd);
    pthread_mutex_lock (&srv->lock);
    srv->active--;
    pthread_mutex_unlock (&srv->lock);
  }
  pthread_attr_destroy (&attr);
}

/* Is a connection idle for srv->evict_ms?  With EVICT, disconnect the one
 * idle longest. */
static bool
evict_candidate (struct nbd_server *srv, bool evict)
{
  uint64_t now = nbd_now_ms (), best_idle = 0;
  struct conn *best = NULL;

  pthread_mutex_lock (&srv->lock);
  for (struct conn *c = srv->conns; c; c = c->next) {
    uint64_t idle;
    pthread_mutex_lock (&c->lock);
    idle = idle_for_conn_locked (c, now);
    pthread_mutex_unlock (&c->lock);
    if (idle >= srv->evict_ms && idle > best_idle) {
      best = c;
      best_idle = idle;
    }
  }
  if (best && evict)
    conn_drop (best); /* dead: not a candidate twice */
  pthread_mutex_unlock (&srv->lock);
  return best != NULL;
}

void
nbd_server_run (struct nbd_server *srv)
{
  for (;;) {
    struct pollfd pfd[NBD_MAX_LISTEN + 1];
    size_t n = 0;
    bool full, evictable = false;
    char b[64];

    pthread_mutex_lock (&srv->lock);
    if (srv->stopping || (!srv->persistent && srv->last_client_gone)) {
      pthread_mutex_unlock (&srv->lock);
      break;
    }
    full = srv->active >= srv->max_clients;
    pthread_mutex_unlock (&srv->lock);

    /* When full, look at the listening sockets only while some
     * connection could make room, so that a waiting client does not make
     * this loop spin. */
    if (full)
      evictable = evict_candidate (srv, false);
    pfd[n++] = (struct pollfd){ .fd = srv->wake[0], .events = POLLIN };
    for (size_t i = 0; (!full || evictable) && i < srv->nr_listen; i++)
      pfd[n++] = (struct pollfd){ .fd = srv->listen_fds[i], .events = POLLIN };
    if (poll (pfd, n, full ? 1000 : -1) < 0)
      continue;
    while (read (srv->wake[0], b, sizeof b) > 0)
      ;
    for (size_t i = 1; i < n; i++)
      if (pfd[i].revents & POLLIN) {
        if (full)
          evict_candidate (srv, true); /* its slot frees up shortly */
        else
          accept_one (srv, pfd[i].fd);
      }
  }

  /* Disconnect whoever is left and wait for them. */
  pthread_mutex_lock (&srv->lock);
  for (struct conn *c = srv->conns; c; c = c->next)
    conn_drop (c);
  while (srv->active > 0)
    pthread_cond_wait (&srv->cond, &srv->lock);
  pthread_mutex_unlock (&srv->lock);
}

void
nbd_server_stop (struct nbd_server *srv)
{
  pthread_mutex_lock (&srv->lock);
  srv->stopping = true;
  for (struct conn *c = srv->conns; c; c = c->next)
    conn_drop (c);
  pthread_mutex_unlock (&srv->lock);
  wake (srv);
}

void
nbd_server_free (struct nbd_server *srv)
{
  if (!srv)
    return;
  workqueue_free (srv->pool); /* connections have ended: nothing queued */
  for (size_t i = 0; i < srv->nr_listen; i++)
    close (srv->listen_fds[i]);
  /* Connections have ended (nbd_server_run waits for them), so the
   * list holds the last references. */
  for (size_t i = 0; i < srv->nr_exports; i++)
    export_free (export_unref_server_locked (srv->exports[i]));
  free (srv->exports);
  close (srv->wake[0]);
  close (srv->wake[1]);
  pthread_cond_destroy (&srv->cond);
  pthread_mutex_destroy (&srv->lock);
  free (srv);
}
