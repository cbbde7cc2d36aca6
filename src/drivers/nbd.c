/* strata: the nbd protocol driver, a client of an NBD server on libnbd.
 *
 * Options follow QEMU's blockdev nbd driver:
 *
 *     server.type=unix  server.path=SOCKET
 *     server.type=inet  server.host=HOST  server.port=PORT (default 10809)
 *     export=NAME  reconnect-delay=SECONDS (default 0)
 *
 * or filename=URI with one of the URIs nbd_uri_parse() accepts:
 *
 *     nbd+unix:///EXPORT?socket=PATH
 *     nbd://HOST[:PORT][/EXPORT]          (also nbd+tcp://)
 *
 * Connections: libnbd runs the synchronous calls of one handle one after
 * another, so the node keeps a small pool of handles (connections) and a
 * request borrows a free one.  A second connection is opened only when
 * the server advertises CAN_MULTI_CONN (then a flush on any connection
 * covers the writes of all of them) and a request finds every handle
 * busy; up to NBD_MAX_CONNS.  Without multi-conn one handle serves the
 * node, as before: correct, not overlapped.
 *
 * Reconnect: a request that finds its connection dead (the server went
 * away or answered ESHUTDOWN, not another error reply) closes that handle
 * and connects again, every 100 ms until reconnect-delay seconds after the
 * connection died; then it is re-run on the new handle.  Once that window
 * has passed, a request makes one attempt and fails with EIO at once if
 * it does not connect.  With reconnect-delay=0 a lost connection fails
 * every request.
 *
 * Block status asks for the base:allocation meta context before
 * connecting; NBD_STATE_HOLE clear means data, NBD_STATE_ZERO means reads
 * as zeroes.  As a protocol layer every byte is allocated here.
 *
 * libnbd is loaded (dlopen) at the first open of an nbd node, not linked:
 * it brings about twenty libraries (gnutls, libxml2, ICU, libstdc++)
 * whose relocations cost every program start more than a whole
 * `strata-img map` of a written image, though few runs ever open an NBD
 * export.  Its header still gives the types; the calls go through the
 * pointers below, named as libnbd names them.
 */
#include <dlfcn.h>
#include <errno.h>
#include <inttypes.h>
#include <libnbd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "block/node.h"
#include "drivers/nbd.h"
#include "drivers/registry.h"
#include "util/checked.h"
#include "util/cleanup.h"
#include "util/clock.h"

/* ---- libnbd, loaded at the first open ---- */

#define LIBNBD_SONAME "libnbd.so.0"
/* clang-format off */
#define LIBNBD_CALLS(X) \
  X (nbd_add_meta_context) \
  X (nbd_aio_connect_tcp) \
  X (nbd_aio_connect_unix) \
  X (nbd_aio_is_closed) \
  X (nbd_aio_is_dead) \
  X (nbd_aio_is_ready) \
  X (nbd_block_status) \
  X (nbd_can_flush) \
  X (nbd_can_fua) \
  X (nbd_can_meta_context) \
  X (nbd_can_multi_conn) \
  X (nbd_can_trim) \
  X (nbd_can_zero) \
  X (nbd_close) \
  X (nbd_connect_tcp) \
  X (nbd_connect_unix) \
  X (nbd_create) \
  X (nbd_flush) \
  X (nbd_get_errno) \
  X (nbd_get_error) \
  X (nbd_get_size) \
  X (nbd_is_read_only) \
  X (nbd_poll) \
  X (nbd_pread) \
  X (nbd_pwrite) \
  X (nbd_set_export_name) \
  X (nbd_shutdown) \
  X (nbd_trim) \
  X (nbd_zero)
/* clang-format on */

#define LIBNBD_POINTER(f) static __typeof__ (f) *libnbd_##f;
LIBNBD_CALLS (LIBNBD_POINTER)
#undef LIBNBD_POINTER

static pthread_once_t libnbd_once = PTHREAD_ONCE_INIT;
/* Process-wide, not node state: written once, under libnbd_once, and only
 * read after it. */
static char libnbd_error[256];

static void
libnbd_load (void)
{
  void *lib = dlopen (LIBNBD_SONAME, RTLD_NOW | RTLD_LOCAL);
  const char *missing = NULL;

  if (!lib) {
    snprintf (libnbd_error, sizeof libnbd_error, "%s", dlerror ());
    return;
  }
#define LIBNBD_RESOLVE(f)                                                     \
  if (!(libnbd_##f = (__typeof__ (f) *)dlsym (lib, #f)) && !missing)          \
    missing = #f;
  LIBNBD_CALLS (LIBNBD_RESOLVE)
#undef LIBNBD_RESOLVE
  if (missing)
    snprintf (libnbd_error, sizeof libnbd_error, "%s has no %s", LIBNBD_SONAME,
              missing);
}

/* Load libnbd once; false (and *ERRP set) when it cannot be used. */
static bool
libnbd_ready (strata_error **errp)
{
  pthread_once (&libnbd_once, libnbd_load);
  if (libnbd_error[0]) {
    error_set (errp, ENOTSUP, "the nbd driver needs libnbd: %s", libnbd_error);
    return false;
  }
  return true;
}

/* The rest of this file calls libnbd by its own names. */
#define nbd_add_meta_context libnbd_nbd_add_meta_context
#define nbd_aio_connect_tcp libnbd_nbd_aio_connect_tcp
#define nbd_aio_connect_unix libnbd_nbd_aio_connect_unix
#define nbd_aio_is_closed libnbd_nbd_aio_is_closed
#define nbd_aio_is_dead libnbd_nbd_aio_is_dead
#define nbd_aio_is_ready libnbd_nbd_aio_is_ready
#define nbd_block_status libnbd_nbd_block_status
#define nbd_can_flush libnbd_nbd_can_flush
#define nbd_can_fua libnbd_nbd_can_fua
#define nbd_can_meta_context libnbd_nbd_can_meta_context
#define nbd_can_multi_conn libnbd_nbd_can_multi_conn
#define nbd_can_trim libnbd_nbd_can_trim
#define nbd_can_zero libnbd_nbd_can_zero
#define nbd_close libnbd_nbd_close
#define nbd_connect_tcp libnbd_nbd_connect_tcp
#define nbd_connect_unix libnbd_nbd_connect_unix
#define nbd_create libnbd_nbd_create
#define nbd_flush libnbd_nbd_flush
#define nbd_get_errno libnbd_nbd_get_errno
#define nbd_get_error libnbd_nbd_get_error
#define nbd_get_size libnbd_nbd_get_size
#define nbd_is_read_only libnbd_nbd_is_read_only
#define nbd_poll libnbd_nbd_poll
#define nbd_pread libnbd_nbd_pread
#define nbd_pwrite libnbd_nbd_pwrite
#define nbd_set_export_name libnbd_nbd_set_export_name
#define nbd_shutdown libnbd_nbd_shutdown
#define nbd_trim libnbd_nbd_trim
#define nbd_zero libnbd_nbd_zero

/* ---- the driver ---- */

#define NBD_DEFAULT_PORT "10809"
#define NBD_MAX_CHUNK (32u << 20)        /* bytes per NBD request */
#define NBD_RECONNECT_INTERVAL_NS 100000000L
#define NBD_STATE_HOLE_BIT 1u
#define NBD_STATE_ZERO_BIT 2u

#define NBD_MAX_CONNS 4
#define NBD_GROW_TIMEOUT_MS 5000

/* One connection of the pool; its handle and dead_since belong to the
 * request that holds it (busy). */
struct nbd_conn {
  struct nbd_handle *h;        /* NULL while disconnected */
  uint64_t dead_since;         /* clock_now_ns() when it died */
  bool busy;
};

struct nbd_state {
  struct nbd_uri uri;
  uint64_t reconnect_delay;    /* seconds */
  bool no_flush;

  pthread_mutex_t lock;        /* the pool's busy flags and count */
  pthread_cond_t cond;         /* a connection became free */
  struct nbd_conn conns[NBD_MAX_CONNS];
  int nconns;                  /* connections in the pool */
  int max_conns;               /* 1, or NBD_MAX_CONNS with multi-conn */
  bool growing;                /* nbd_grow() is connecting one more */
  atomic_bool closing;

  int64_t size;
  bool can_fua, can_trim, can_zero, can_flush, have_alloc;
};

/* ---- URIs ---- */

static const char *const uri_schemes[] = {
  "nbd://", "nbd+tcp://", "nbd+unix://", "nbds://", "nbds+tcp://",
  "nbds+unix://",
};

/* The URIs, and QEMU's older "nbd:" syntax (see nbd_legacy_parse). */
bool
nbd_is_uri (const char *name)
{
  if (strncmp (name, "nbd:", 4) == 0)
    return true;
  for (size_t i = 0; i < sizeof uri_schemes / sizeof uri_schemes[0]; i++)
    if (strncmp (name, uri_schemes[i], strlen (uri_schemes[i])) == 0)
      return true;
  return false;
}

void
nbd_uri_clear (struct nbd_uri *u)
{
  free (u->socket);
  free (u->host);
  free (u->port);
  free (u->export);
  *u = (struct nbd_uri){ 0 };
}

static int
hexval (char c)
{
  if (c >= '0' && c <= '9')
    return c - '0';
  c |= 0x20;
  return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Percent-decode N bytes of S; NULL (errno EINVAL) on a bad escape. */
static char *
uri_decode (const char *s, size_t n)
{
  char *out = malloc (n + 1), *p = out;

  if (!out)
    return NULL;
  for (size_t i = 0; i < n; i++) {
    if (s[i] != '%') {
      *p++ = s[i];
      continue;
    }
    if (i + 2 >= n || hexval (s[i + 1]) < 0 || hexval (s[i + 2]) < 0
        || (s[i + 1] == '0' && s[i + 2] == '0')) {
      free (out);
      errno = EINVAL;
      return NULL;
    }
    *p++ = (char) (hexval (s[i + 1]) * 16 + hexval (s[i + 2]));
    i += 2;
  }
  *p = 0;
  return out;
}

/* PORT is a TCP port number, 1 to 65535, in decimal. */
static bool
port_ok (const char *name, const char *port, strata_error **errp)
{
  char *end;
  unsigned long n;

  errno = 0;
  n = strtoul (port, &end, 10);
  if (!*port || *end || errno || n == 0 || n > 65535 || port[0] < '0'
      || port[0] > '9') {
    error_set (errp, EINVAL, "%s: bad port '%s'", name, port);
    return false;
  }
  return true;
}

/* QEMU's filename syntax from before URIs, still found in backing file
 * names: nbd:unix:PATH[:exportname=NAME] and
 * nbd:HOST:PORT[:exportname=NAME] (HOST may be [IPv6]). */
static bool
nbd_legacy_parse (const char *name, struct nbd_uri *u, strata_error **errp)
{
  const char *spec = name + 4, *en = strstr (spec, ":exportname=");
  size_t speclen = en ? (size_t) (en - spec) : strlen (spec);
  const char *colon;

  if (!(u->export = strdup (en ? en + 12 : "")))
    goto oom;
  if (speclen == 0) {
    error_set (errp, EINVAL, "%s: missing the server (nbd:unix:PATH or "
               "nbd:HOST:PORT)", name);
    goto fail;
  }
  if (strncmp (spec, "unix:", 5) == 0) {
    if (speclen == 5) {
      error_set (errp, EINVAL, "%s: missing socket path", name);
      goto fail;
    }
    if (!(u->socket = strndup (spec + 5, speclen - 5)))
      goto oom;
    return true;
  }
  if (spec[0] == '[') {
    const char *end = memchr (spec, ']', speclen);
    colon = end && end + 1 < spec + speclen && end[1] == ':' ? end + 1
                                                               : NULL;
    if (colon && !(u->host = strndup (spec + 1, end - spec - 1)))
      goto oom;
  }
  else {
    colon = memchr (spec, ':', speclen);
    if (colon && !(u->host = strndup (spec, colon - spec)))
      goto oom;
  }
  if (!colon || !u->host || !*u->host) {
    error_set (errp, EINVAL, "%s: expected nbd:HOST:PORT or nbd:unix:PATH",
               name);
    goto fail;
  }
  if (!(u->port = strndup (colon + 1, spec + speclen - colon - 1)))
    goto oom;
  if (!port_ok (name, u->port, errp))
    goto fail;
  return true;

oom:
  error_set (errp, ENOMEM, "out of memory");
fail:
  nbd_uri_clear (u);
  return false;
}

bool
nbd_uri_parse (const char *uri, struct nbd_uri *u, strata_error **errp)
{
  const char *p, *auth, *path, *query;
  size_t authlen, pathlen;
  bool is_unix;

  *u = (struct nbd_uri){ 0 };
  if (strncmp (uri, "nbds", 4) == 0) {
    error_set (errp, ENOTSUP, "%s: NBD over TLS (nbds) is not supported",
               uri);
    return false;
  }
  if (strncmp (uri, "nbd+unix://", 11) == 0)
    is_unix = true, p = uri + 11;
  else if (strncmp (uri, "nbd+tcp://", 10) == 0)
    is_unix = false, p = uri + 10;
  else if (strncmp (uri, "nbd://", 6) == 0)
    is_unix = false, p = uri + 6;
  else if (strncmp (uri, "nbd:", 4) == 0)
    return nbd_legacy_parse (uri, u, errp);
  else {
    error_set (errp, EINVAL, "%s: not an NBD URI (nbd://HOST[:PORT]/EXPORT "
               "or nbd+unix:///EXPORT?socket=PATH)", uri);
    return false;
  }
  auth = p;
  authlen = strcspn (p, "/?#");
  path = auth + authlen;
  pathlen = *path == '/' ? strcspn (path, "?#") : 0;
  query = path + pathlen;
  if (*query == '#' || strchr (query, '#')) {
    error_set (errp, EINVAL, "%s: fragments are not allowed", uri);
    return false;
  }
  if (pathlen && !(u->export = uri_decode (path + 1, pathlen - 1))) {
    error_set (errp, EINVAL, "%s: bad %%-escape in the export name", uri);
    return false;
  }
  if (!pathlen && !(u->export = strdup ("")))
    goto oom;

  if (is_unix) {
    const char *q = query;
    if (authlen) {
      error_set (errp, EINVAL, "%s: nbd+unix takes no host (write "
                 "nbd+unix:///EXPORT?socket=PATH)", uri);
      goto fail;
    }
    if (*q != '?' || strncmp (q + 1, "socket=", 7) != 0) {
      error_set (errp, EINVAL, "%s: missing ?socket=PATH", uri);
      goto fail;
    }
    q += 8;
    if (strchr (q, '&')) {
      error_set (errp, EINVAL, "%s: unknown query parameter after socket "
                 "(only ?socket=PATH is allowed)", uri);
      goto fail;
    }
    if (!*q) {
      error_set (errp, EINVAL, "%s: missing socket path", uri);
      goto fail;
    }
    if (!(u->socket = uri_decode (q, strlen (q)))) {
      error_set (errp, EINVAL, "%s: bad %%-escape in the socket path", uri);
      goto fail;
    }
    return true;
  }

  if (*query) {
    error_set (errp, EINVAL, "%s: unknown query parameter '%s' (socket= "
               "needs nbd+unix://)", uri, query + 1);
    goto fail;
  }
  if (!authlen) {
    error_set (errp, EINVAL, "%s: missing host name", uri);
    goto fail;
  }
  {
    const char *hend, *colon;
    if (auth[0] == '[') {
      hend = memchr (auth, ']', authlen);
      if (!hend || hend == auth + 1) {
        error_set (errp, EINVAL, "%s: bad IPv6 address", uri);
        goto fail;
      }
      if (!(u->host = strndup (auth + 1, hend - auth - 1)))
        goto oom;
      colon = hend + 1 < auth + authlen ? hend + 1 : NULL;
      if (colon && *colon != ':') {
        error_set (errp, EINVAL, "%s: bad host '%.*s'", uri, (int) authlen,
                   auth);
        goto fail;
      }
    }
    else {
      colon = memchr (auth, ':', authlen);
      if (memchr (auth, '@', authlen)) {
        error_set (errp, EINVAL, "%s: user names are not supported", uri);
        goto fail;
      }
      if (colon == auth) {
        error_set (errp, EINVAL, "%s: missing host name", uri);
        goto fail;
      }
      if (!(u->host = strndup (auth, colon ? (size_t) (colon - auth)
                                           : authlen)))
        goto oom;
    }
    if (colon) {
      if (!(u->port = strndup (colon + 1, auth + authlen - colon - 1)))
        goto oom;
      if (!port_ok (uri, u->port, errp))
        goto fail;
    }
    else if (!(u->port = strdup (NBD_DEFAULT_PORT)))
      goto oom;
  }
  return true;

oom:
  error_set (errp, ENOMEM, "out of memory");
fail:
  nbd_uri_clear (u);
  return false;
}

/* The URI naming U, for messages and node->filename, as QEMU writes it
 * (qemu-img info shows it): no "/" when the export name is empty. */
static char *
nbd_uri_format (const struct nbd_uri *u)
{
  const char *slash = *u->export ? "/" : "";
  char *s;
  int r;

  if (u->socket)
    r = asprintf (&s, "nbd+unix://%s%s?socket=%s", slash, u->export,
                  u->socket);
  else if (strchr (u->host, ':'))
    r = asprintf (&s, "nbd://[%s]:%s%s%s", u->host, u->port, slash,
                  u->export);
  else
    r = asprintf (&s, "nbd://%s:%s%s%s", u->host, u->port, slash,
                  u->export);
  return r < 0 ? NULL : s;
}

/* ---- connections ---- */

/* Why a connection failed, in QEMU's words for the two failures a user
 * meets most (nobody listens; no such export), else in libnbd's. */
static void
nbd_connect_error (const struct nbd_state *s, char *msg, size_t msglen)
{
  const char *e = nbd_get_error ();
  int errnum = nbd_get_errno ();

  if (!e)
    snprintf (msg, msglen, "timed out");
  else if (strstr (e, ": connect: ") && errnum > 0 && s->uri.socket)
    snprintf (msg, msglen, "Failed to connect to '%s': %s", s->uri.socket,
              strerror (errnum));
  else if (strstr (e, ": connect: ") && errnum > 0)
    snprintf (msg, msglen, "Failed to connect to '%s:%s': %s", s->uri.host,
              s->uri.port, strerror (errnum));
  else if (strstr (e, "handshake: ") && errnum == ENOENT)
    snprintf (msg, msglen, "Requested export not available");
  else
    snprintf (msg, msglen, "cannot connect to the NBD server: %s", e);
}

/* A connected handle, or NULL with the reason in MSG.  TIMEOUT_MS < 0
 * waits as long as the connection takes; otherwise the handshake must be
 * done by then (a server at its client limit keeps a new connection in
 * its listen backlog, unanswered). */
static struct nbd_handle *
nbd_connect_handle_timeout (struct nbd_state *s, int timeout_ms,
                            char *msg, size_t msglen)
{
  struct nbd_handle *h = nbd_create ();
  uint64_t deadline;
  int r;

  if (!h) {
    snprintf (msg, msglen, "%s", nbd_get_error ());
    return NULL;
  }
  if (nbd_set_export_name (h, s->uri.export) < 0
      || nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) < 0) {
    snprintf (msg, msglen, "%s", nbd_get_error ());
    nbd_close (h);
    return NULL;
  }
  if (timeout_ms < 0)
    r = s->uri.socket ? nbd_connect_unix (h, s->uri.socket)
                      : nbd_connect_tcp (h, s->uri.host, s->uri.port);
  else {
    deadline = clock_now_ns () + (uint64_t) timeout_ms * CLOCK_NS_PER_MS;
    r = s->uri.socket ? nbd_aio_connect_unix (h, s->uri.socket)
                      : nbd_aio_connect_tcp (h, s->uri.host, s->uri.port);
    while (r == 0 && nbd_aio_is_ready (h) != 1) {
      uint64_t now = clock_now_ns ();
      long left = now < deadline ? (long) ((deadline - now) / CLOCK_NS_PER_MS)
                                 : 0;
      /* In slices, so that closing the node need not wait long. */
      if (left <= 0 || atomic_load (&s->closing) || nbd_aio_is_dead (h) == 1
          || nbd_aio_is_closed (h) == 1)
        r = -1;
      else if (nbd_poll (h, (int) MIN (left, 100)) < 0)
        r = -1;
    }
  }
  if (r < 0) {
    nbd_connect_error (s, msg, msglen);
    nbd_close (h);
    return NULL;
  }
  return h;
}

static struct nbd_handle *
nbd_connect_handle (struct nbd_state *s, char *msg, size_t msglen)
{
  return nbd_connect_handle_timeout (s, -1, msg, msglen);
}

/* Connect C again after it died at c->dead_since: retry until
 * reconnect-delay seconds after that, or once when that time is past.
 * The caller holds C (busy). */
static bool
nbd_reconnect (strata_node *node, struct nbd_conn *c, char *msg,
               size_t msglen)
{
  struct nbd_state *s = node->opaque;
  uint64_t deadline;
  struct nbd_handle *h;

  if (s->reconnect_delay == 0)
    return false;
  deadline = c->dead_since
             + MIN (s->reconnect_delay, (uint64_t) 86400 * 365)
                   * CLOCK_NS_PER_SEC;
  for (;;) {
    if ((h = nbd_connect_handle (s, msg, msglen))) {
      int64_t size = nbd_get_size (h);
      if (size != s->size) {
        snprintf (msg, msglen, "the export size changed from %" PRId64
                  " to %" PRId64 " bytes across the reconnect", s->size, size);
        nbd_close (h);
        return false;
      }
      c->h = h;
      return true;
    }
    if (clock_now_ns () >= deadline)
      return false;
    nanosleep (&(struct timespec){ 0, NBD_RECONNECT_INTERVAL_NS }, NULL);
  }
}

/* Open one more connection in the background, so that no request waits
 * for a handshake that may never come. */
static void *
nbd_grow (void *arg)
{
  struct nbd_state *s = arg;
  char msg[256];
  struct nbd_handle *h = nbd_connect_handle_timeout (s, NBD_GROW_TIMEOUT_MS,
                                                     msg, sizeof msg);

  if (h && nbd_get_size (h) != s->size) {
    nbd_close (h);
    h = NULL;
  }
  pthread_mutex_lock (&s->lock);
  if (h && s->nconns < NBD_MAX_CONNS)
    s->conns[s->nconns++] = (struct nbd_conn){ .h = h };
  else {
    if (h)
      nbd_close (h);
    s->max_conns = s->nconns;  /* the server takes no more: stop asking */
  }
  s->growing = false;
  pthread_cond_broadcast (&s->cond);
  pthread_mutex_unlock (&s->lock);
  return NULL;
}

/* Borrow a free connection, waiting for one; when all are busy and the
 * pool may grow, a background thread opens another. */
static struct nbd_conn *
nbd_conn_get (struct nbd_state *s)
{
  struct nbd_conn *c;

  pthread_mutex_lock (&s->lock);
  for (;;) {
    c = NULL;
    for (int i = 0; i < s->nconns && !c; i++)
      if (!s->conns[i].busy)
        c = &s->conns[i];
    if (c)
      break;
    if (s->nconns < s->max_conns && !s->growing
        && !atomic_load (&s->closing)) {
      pthread_attr_t attr;
      pthread_t t;
      pthread_attr_init (&attr);
      pthread_attr_setdetachstate (&attr, PTHREAD_CREATE_DETACHED);
      s->growing = pthread_create (&t, &attr, nbd_grow, s) == 0;
      pthread_attr_destroy (&attr);
      if (!s->growing)
        s->max_conns = s->nconns;
    }
    pthread_cond_wait (&s->cond, &s->lock);
  }
  c->busy = true;
  pthread_mutex_unlock (&s->lock);
  return c;
}

static void
nbd_conn_put (struct nbd_state *s, struct nbd_conn *c)
{
  pthread_mutex_lock (&s->lock);
  c->busy = false;
  pthread_cond_signal (&s->cond);
  pthread_mutex_unlock (&s->lock);
}

/* ---- requests ---- */

enum nbd_op { NBD_OP_READ, NBD_OP_WRITE, NBD_OP_ZERO, NBD_OP_TRIM,
              NBD_OP_FLUSH, NBD_OP_STATUS };

struct nbd_req {
  enum nbd_op op;
  uint64_t offset, len;
  void *buf;
  uint32_t flags;
  struct bstat *bs;
};

static int
nbd_extent (void *opaque, const char *context, uint64_t offset,
            uint32_t *entries, size_t nr, int *error)
{
  struct nbd_req *r = opaque;

  (void) offset;
  (void) error;
  if (strcmp (context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0 || nr < 2
      || r->bs->pnum)
    return 0;
  r->bs->pnum = MIN ((uint64_t) entries[0], r->len);
  r->bs->flags = BS_ALLOCATED | BS_OFFSET
                 | (entries[1] & NBD_STATE_HOLE_BIT ? 0 : BS_DATA)
                 | (entries[1] & NBD_STATE_ZERO_BIT ? BS_ZERO : 0);
  return 0;
}

static int
nbd_issue (struct nbd_handle *h, struct nbd_req *r)
{
  switch (r->op) {
  case NBD_OP_READ:
    return nbd_pread (h, r->buf, r->len, r->offset, 0);
  case NBD_OP_WRITE:
    return nbd_pwrite (h, r->buf, r->len, r->offset, r->flags);
  case NBD_OP_ZERO:
    return nbd_zero (h, r->len, r->offset, r->flags);
  case NBD_OP_TRIM:
    return nbd_trim (h, r->len, r->offset, r->flags);
  case NBD_OP_FLUSH:
    return nbd_flush (h, 0);
  case NBD_OP_STATUS:
    r->bs->pnum = 0;
    return nbd_block_status (h, r->len, r->offset,
                             (nbd_extent_callback){ .callback = nbd_extent,
                                                    .user_data = r },
                             LIBNBD_CMD_FLAG_REQ_ONE);
  }
  return -1;
}

static const char *
nbd_op_name (enum nbd_op op)
{
  static const char *const names[] = {
    "read", "write", "write zeroes", "trim", "flush", "block status",
  };
  return names[op];
}

/* Run R on a connection of the pool, reconnecting it when it is lost
 * (see the top). */
static int
nbd_run (strata_node *node, struct nbd_req *r)
{
  struct nbd_state *s = node->opaque;
  struct nbd_conn *c = nbd_conn_get (s);
  char msg[512] = "";
  int err, ret;

  for (;;) {
    if (c->h) {
      if (nbd_issue (c->h, r) == 0) {
        ret = 0;
        break;
      }
      err = nbd_get_errno ();
      snprintf (msg, sizeof msg, "%s", nbd_get_error ());
      /* ESHUTDOWN is the server's answer while it shuts down: the
       * connection is as good as lost. */
      if (err != ESHUTDOWN && !nbd_aio_is_dead (c->h)
          && !nbd_aio_is_closed (c->h)) {
        ret = io_error (err ? err : EIO, "%s: NBD %s at offset %" PRIu64
                        " length %" PRIu64 " failed: %s", node->filename,
                        nbd_op_name (r->op), r->offset, r->len, msg);
        break;
      }
      nbd_close (c->h);
      c->h = NULL;
      c->dead_since = clock_now_ns ();
    }
    if (!nbd_reconnect (node, c, msg, sizeof msg)) {
      if (s->reconnect_delay == 0)
        ret = io_error (EIO, "%s: connection to the NBD server lost%s%s",
                        node->filename, *msg ? ": " : "", msg);
      else
        ret = io_error (EIO, "%s: connection to the NBD server lost, "
                        "reconnect failed within %" PRIu64 " s: %s",
                        node->filename, s->reconnect_delay, msg);
      break;
    }
  }
  nbd_conn_put (s, c);
  return ret;
}

/* Split a vectored request into chunks the server takes, bouncing a chunk
 * that spans iovec elements. */
static int
nbd_rw (strata_node *node, enum nbd_op op, uint64_t offset, uint64_t len,
        const struct iovec *iov, int iovcnt, uint32_t flags)
{
  uint64_t done = 0;
  int i = 0;
  size_t skip = 0;   /* bytes of iov[i] already consumed */

  while (done < len) {
    uint64_t n = MIN (len - done, NBD_MAX_CHUNK);
    struct nbd_req r = { .op = op, .offset = offset + done, .len = n,
                         .flags = flags };
    CLEANUP_FREE char *bounce = NULL;
    int ret;

    while (i < iovcnt && skip == iov[i].iov_len)
      i++, skip = 0;
    if (i < iovcnt && iov[i].iov_len - skip >= n)
      r.buf = (char *) iov[i].iov_base + skip;
    else {
      if (!(bounce = malloc (n)))
        return -ENOMEM;
      r.buf = bounce;
      if (op == NBD_OP_WRITE) {
        size_t pos = 0, sk = skip;
        for (int j = i; pos < n && j < iovcnt; j++, sk = 0) {
          size_t m = MIN (iov[j].iov_len - sk, n - pos);
          memcpy (bounce + pos, (char *) iov[j].iov_base + sk, m);
          pos += m;
        }
      }
    }
    if ((ret = nbd_run (node, &r)) < 0)
      return ret;
    /* Advance through the iovec, copying a read out of the bounce. */
    for (uint64_t pos = 0; pos < n; ) {
      size_t m = MIN (iov[i].iov_len - skip, n - pos);
      if (bounce && op == NBD_OP_READ)
        memcpy ((char *) iov[i].iov_base + skip, bounce + pos, m);
      pos += m;
      skip += m;
      if (skip == iov[i].iov_len && pos < n)
        i++, skip = 0;
    }
    done += n;
  }
  return 0;
}

static int
nbd_preadv (strata_node *node, uint64_t offset, uint64_t len,
            const struct iovec *iov, int iovcnt, unsigned flags)
{
  (void) flags;
  return nbd_rw (node, NBD_OP_READ, offset, len, iov, iovcnt, 0);
}

static int nbd_node_flush (strata_node *node);

static int
nbd_pwritev (strata_node *node, uint64_t offset, uint64_t len,
             const struct iovec *iov, int iovcnt, unsigned flags)
{
  struct nbd_state *s = node->opaque;
  bool fua = (flags & STRATA_REQ_FUA) && s->can_fua;
  int r = nbd_rw (node, NBD_OP_WRITE, offset, len, iov, iovcnt,
                  fua ? LIBNBD_CMD_FLAG_FUA : 0);

  if (r == 0 && (flags & STRATA_REQ_FUA) && !s->can_fua)
    r = nbd_node_flush (node);
  return r;
}

/* Zero and trim ranges are limited to 32 bits by the protocol. */
static int
nbd_ranged (strata_node *node, enum nbd_op op, uint64_t offset, uint64_t len,
            uint32_t flags)
{
  while (len) {
    uint64_t n = MIN (len, (uint64_t) 1 << 30);
    struct nbd_req r = { .op = op, .offset = offset, .len = n,
                         .flags = flags };
    int ret = nbd_run (node, &r);
    if (ret < 0)
      return ret;
    offset += n;
    len -= n;
  }
  return 0;
}

static int
nbd_pwrite_zeroes (strata_node *node, uint64_t offset, uint64_t len,
                   unsigned flags)
{
  struct nbd_state *s = node->opaque;
  uint32_t f = 0;

  if (!s->can_zero)
    return -ENOTSUP;  /* the core writes zeroes instead */
  /* Without MAY_UNMAP the server must keep the range allocated. */
  if (!(flags & STRATA_REQ_MAY_UNMAP))
    f |= LIBNBD_CMD_FLAG_NO_HOLE;
  if ((flags & STRATA_REQ_FUA) && s->can_fua)
    f |= LIBNBD_CMD_FLAG_FUA;
  return nbd_ranged (node, NBD_OP_ZERO, offset, len, f);
}

static int
nbd_pdiscard (strata_node *node, uint64_t offset, uint64_t len,
              unsigned flags)
{
  struct nbd_state *s = node->opaque;

  (void) flags;
  if (!s->can_trim)
    return -ENOTSUP;
  return nbd_ranged (node, NBD_OP_TRIM, offset, len, 0);
}

static int
nbd_node_flush (strata_node *node)
{
  struct nbd_state *s = node->opaque;
  struct nbd_req r = { .op = NBD_OP_FLUSH };

  if (!s->can_flush || s->no_flush)
    return 0;
  return nbd_run (node, &r);
}

static int
nbd_node_block_status (strata_node *node, uint64_t offset, uint64_t len,
                       struct bstat *bs)
{
  struct nbd_state *s = node->opaque;
  struct nbd_req r = { .op = NBD_OP_STATUS, .offset = offset, .bs = bs };
  int ret;

  bs->map = offset;
  bs->file = node;
  if (!s->have_alloc || offset >= (uint64_t) s->size) {
    bs->pnum = len;
    bs->flags = BS_ALLOCATED | BS_OFFSET
                | (offset >= (uint64_t) s->size ? BS_ZERO : BS_DATA);
    return 0;
  }
  r.len = MIN (MIN (len, (uint64_t) s->size - offset), (uint64_t) 1 << 30);
  if ((ret = nbd_run (node, &r)) < 0)
    return ret;
  if (!bs->pnum)
    return io_error (EIO, "%s: the NBD server answered block status at "
                     "offset %" PRIu64 " with no extent", node->filename,
                     offset);
  return 0;
}

static int64_t
nbd_get_length (strata_node *node)
{
  struct nbd_state *s = node->opaque;
  return s->size;
}

static bool
nbd_get_info (strata_node *node, struct strata_info *info,
              strata_error **errp)
{
  (void) node;
  (void) errp;
  info->actual_size = 0;  /* unknown over NBD */
  info->actual_size_unknown = true;
  info->dirty_unknown = true;
  return true;
}

/* ---- open and close ---- */

static bool
nbd_options (strata_node *node, strata_opts *opts, strata_error **errp)
{
  struct nbd_state *s = node->opaque;
  const char *filename = opts_get (opts, "filename");
  const char *type = opts_get (opts, "server.type");
  const char *path = opts_get (opts, "server.path");
  const char *host = opts_get (opts, "server.host");
  const char *port = opts_get (opts, "server.port");
  const char *export = opts_get (opts, "export");
  bool direct;

  if (!opts_get_size (opts, "reconnect-delay", 0, &s->reconnect_delay, errp)
      || !opts_get_bool (opts, "cache.direct", false, &direct, errp)
      || !opts_get_bool (opts, "cache.no-flush", false, &s->no_flush, errp))
    return false;
  if (filename) {
    if (type || path || host || port || export) {
      error_set (errp, EINVAL, "%s: an NBD URI and server.*/export options "
                 "cannot be combined", filename);
      return false;
    }
    return nbd_uri_parse (filename, &s->uri, errp);
  }
  if (!type) {
    error_set (errp, EINVAL, "nbd: needs 'server.type' (unix or inet) or a "
               "'filename' URI");
    return false;
  }
  if (strcmp (type, "unix") == 0) {
    if (!path || !*path || host || port) {
      error_set (errp, EINVAL, "nbd: server.type=unix needs server.path "
                 "and takes no server.host or server.port");
      return false;
    }
    s->uri.socket = strdup (path);
  }
  else if (strcmp (type, "inet") == 0) {
    char *end;
    unsigned long p;
    if (!host || !*host || path) {
      error_set (errp, EINVAL, "nbd: server.type=inet needs server.host "
                 "and takes no server.path");
      return false;
    }
    errno = 0;
    p = port ? strtoul (port, &end, 10) : 1;
    if (port && (!*port || *end || errno || p == 0 || p > 65535)) {
      error_set (errp, EINVAL, "nbd: bad server.port '%s'", port);
      return false;
    }
    s->uri.host = strdup (host);
    s->uri.port = strdup (port ? port : NBD_DEFAULT_PORT);
  }
  else {
    error_set (errp, EINVAL, "nbd: server.type '%s' is not unix or inet",
               type);
    return false;
  }
  s->uri.export = strdup (export ? export : "");
  if (!s->uri.export || (!s->uri.socket && !(s->uri.host && s->uri.port))) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  return true;
}

static void nbd_node_close (strata_node *node);
static bool nbd_open_connect (strata_node *node, strata_opts *opts,
                              unsigned flags, strata_error **errp);

/* The core frees a node whose open failed without calling close. */
static bool
nbd_open (strata_node *node, strata_opts *opts, unsigned flags,
          strata_error **errp)
{
  bool ok;

  pthread_mutex_init (&((struct nbd_state *) node->opaque)->lock, NULL);
  pthread_cond_init (&((struct nbd_state *) node->opaque)->cond, NULL);
  ok = libnbd_ready (errp) && nbd_open_connect (node, opts, flags, errp);
  if (!ok)
    nbd_node_close (node);
  return ok;
}

static bool
nbd_open_connect (strata_node *node, strata_opts *opts, unsigned flags,
                  strata_error **errp)
{
  struct nbd_state *s = node->opaque;
  struct nbd_handle *h;
  char msg[512];

  if (!nbd_options (node, opts, errp))
    return false;
  if (!(node->filename = nbd_uri_format (&s->uri))) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  if (!(h = nbd_connect_handle (s, msg, sizeof msg))) {
    error_set (errp, EIO, "%s", msg);
    return false;
  }
  s->conns[0].h = h;
  s->nconns = 1;
  s->max_conns = nbd_can_multi_conn (h) == 1 ? NBD_MAX_CONNS : 1;
  if ((s->size = nbd_get_size (h)) < 0) {
    error_set (errp, EIO, "%s: %s", node->filename, nbd_get_error ());
    return false;
  }
  if ((flags & STRATA_OPEN_RDWR) && nbd_is_read_only (h) == 1) {
    error_set (errp, EROFS, "%s: the NBD export is read-only",
               node->filename);
    return false;
  }
  s->can_fua = nbd_can_fua (h) == 1;
  s->can_trim = nbd_can_trim (h) == 1;
  s->can_zero = nbd_can_zero (h) == 1;
  s->can_flush = nbd_can_flush (h) == 1;
  s->have_alloc
      = nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
  return true;
}

static void
nbd_node_close (strata_node *node)
{
  struct nbd_state *s = node->opaque;

  /* Wait for a connection being opened in the background. */
  pthread_mutex_lock (&s->lock);
  atomic_store (&s->closing, true);
  while (s->growing)
    pthread_cond_wait (&s->cond, &s->lock);
  pthread_mutex_unlock (&s->lock);
  for (int i = 0; i < s->nconns; i++)
    if (s->conns[i].h) {
      nbd_shutdown (s->conns[i].h, 0);
      nbd_close (s->conns[i].h);
      s->conns[i].h = NULL;
    }
  nbd_uri_clear (&s->uri);
  pthread_cond_destroy (&s->cond);
  pthread_mutex_destroy (&s->lock);
}

const struct strata_driver nbd_driver = {
  .name          = "nbd",
  .state_size    = sizeof (struct nbd_state),
  .claims_filename = nbd_is_uri,
  .remote        = true,
  .open          = nbd_open,
  .close         = nbd_node_close,
  .preadv        = nbd_preadv,
  .pwritev       = nbd_pwritev,
  .pwrite_zeroes = nbd_pwrite_zeroes,
  .pdiscard      = nbd_pdiscard,
  .flush         = nbd_node_flush,
  .block_status  = nbd_node_block_status,
  .get_length    = nbd_get_length,
  .get_info      = nbd_get_info,
};
