/* strata: stratad's QMP server.
 *
 * One control thread runs an epoll loop over:
 *
 *   listening unix sockets --accept--> monitor connections
 *   a signalfd (SIGTERM, SIGINT)        -> stop
 *   an eventfd                          -> events queued by qmp_event_emit()
 *                                          from any thread, delivered here
 *
 * Wire protocol (QEMU's, docs/qmp.md): on connect the server sends the
 * greeting; the client sends a stream of JSON values (not necessarily one
 * per line); every reply and event is one line of JSON ended by "\r\n".
 *
 * Framing.  Each client's input goes through a QMP lexer (lexer.c): like
 * QEMU's JSON streamer, a message ends where its braces and brackets
 * balance (outside strings).  The span is then handed to jansson.  A
 * lexical error gets an error reply (the lexer then skips input up to the
 * next newline, as QEMU does).  A message still incomplete at
 * QMP_MAX_MESSAGE bytes gets an error reply and the connection is closed
 * after the reply is sent.
 *
 * Output.  Sockets are non-blocking; each client has an output queue
 * flushed on EPOLLOUT, so a client that does not read never delays the
 * others.  A client with more than QMP_MAX_QUEUED bytes unread is dropped.
 *
 * Locks.  Connections, listeners and the command tables belong to the
 * control thread alone and take no lock.  One lock:
 *
 *   event_lock   the queue of pending events and event_fd; taken by any
 *                thread in qmp_event_emit(), by the control thread to take
 *                the queue.  A leaf: nothing else is taken under it.
 *                Job threads emit under the job lock (job lock -> event_lock).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <strata/strata.h>

#include "control/lexer.h"
#include "control/qmp.h"
#include "control/server.h"
#include "util/cleanup.h"
#include "util/sockets.h"


enum watch_kind { W_LISTEN, W_CLIENT, W_SIGNAL, W_EVENT };

/* The first member of everything registered with epoll. */
struct watch {
  enum watch_kind kind;
  int fd;
};

struct listener {
  struct watch w;
  char *path;
  struct listener *next;
};

struct client {
  struct watch w;
  struct qmp_server *srv;
  struct client *prev, *next;
  struct qmp_lexer lex;  /* input, framed into messages */
  /* Output queue: bytes [out_off, out_len) still to send. */
  char *out;
  size_t out_off, out_len, out_cap;
  uint32_t events;        /* what epoll watches now */
  bool negotiated, oob, closing, dead;
};

struct qmp_server {
  int epfd;
  struct watch sig, evt;
  struct listener *listeners;
  struct client *clients;
  struct client *graveyard;  /* dropped, freed at the end of the batch */
  bool stop;
};

/* ---- events: a queue shared with other threads ---- */

struct pending_event {
  json_t *msg;
  struct pending_event *next;
};

static pthread_mutex_t event_lock = PTHREAD_MUTEX_INITIALIZER;
static struct pending_event *event_head, **event_tail = &event_head;
static int event_fd = -1;

void
qmp_event_emit (const char *name, json_t *data)
{
  struct timeval tv;
  struct pending_event *pe;
  json_t *msg;
  uint64_t one = 1;

  gettimeofday (&tv, NULL);
  msg = json_object ();
  json_object_set_new (msg, "event", json_string (name));
  if (data)
    json_object_set_new (msg, "data", data);
  json_object_set_new (msg, "timestamp",
                       json_pack ("{s:I,s:I}", "seconds", (json_int_t) tv.tv_sec,
                                  "microseconds", (json_int_t) tv.tv_usec));
  pe = malloc (sizeof *pe);
  if (!pe) {
    json_decref (msg);
    return;
  }
  pe->msg = msg;
  pe->next = NULL;
  pthread_mutex_lock (&event_lock);
  *event_tail = pe;
  event_tail = &pe->next;
  if (event_fd >= 0 && write (event_fd, &one, sizeof one) < 0) {
    /* The counter is already non-zero: the loop will wake anyway. */
  }
  pthread_mutex_unlock (&event_lock);
}

static struct pending_event *
events_take (void)
{
  struct pending_event *list;

  pthread_mutex_lock (&event_lock);
  list = event_head;
  event_head = NULL;
  event_tail = &event_head;
  pthread_mutex_unlock (&event_lock);
  return list;
}

/* ---- output ---- */

static void client_drop (struct client *c);
static void client_free (struct client *c);

static void
client_watch (struct client *c)
{
  uint32_t want = 0;
  struct epoll_event ev;

  if (c->dead)
    return;
  if (!c->closing)
    want |= EPOLLIN;
  if (c->out_len > c->out_off)
    want |= EPOLLOUT;
  if (want == c->events)
    return;
  ev.events = want;
  ev.data.ptr = &c->w;
  epoll_ctl (c->srv->epfd, EPOLL_CTL_MOD, c->w.fd, &ev);
  c->events = want;
}

/* Send what the socket takes now.  Drops the client on error, or when it
 * is closing and everything went out. */
static void
client_flush (struct client *c)
{
  while (!c->dead && c->out_len > c->out_off) {
    ssize_t n = send (c->w.fd, c->out + c->out_off, c->out_len - c->out_off,
                      MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK)
        break;
      client_drop (c);
      return;
    }
    c->out_off += n;
  }
  if (c->dead)
    return;
  if (c->out_off == c->out_len)
    c->out_off = c->out_len = 0;
  if (c->closing && c->out_len == 0) {
    client_drop (c);
    return;
  }
  client_watch (c);
}

/* Queue one line: MSG serialised, then "\r\n". */
static void
client_send (struct client *c, json_t *msg)
{
  char *text;
  size_t len, need;

  if (c->dead)
    return;
  text = json_dumps (msg, JSON_PRESERVE_ORDER | JSON_ENSURE_ASCII
                              | JSON_ENCODE_ANY);
  if (!text) {
    client_drop (c);
    return;
  }
  len = strlen (text);
  if (c->out_len - c->out_off + len + 2 > QMP_MAX_QUEUED) {
    /* It does not read what it asked for: let it go. */
    free (text);
    client_drop (c);
    return;
  }
  if (c->out_off > 0 && c->out_off >= c->out_cap / 2) {
    memmove (c->out, c->out + c->out_off, c->out_len - c->out_off);
    c->out_len -= c->out_off;
    c->out_off = 0;
  }
  need = c->out_len + len + 2;
  if (need > c->out_cap) {
    size_t cap = c->out_cap ? c->out_cap : 4096;
    char *p;
    while (cap < need)
      cap *= 2;
    p = realloc (c->out, cap);
    if (!p) {
      free (text);
      client_drop (c);
      return;
    }
    c->out = p;
    c->out_cap = cap;
  }
  memcpy (c->out + c->out_len, text, len);
  memcpy (c->out + c->out_len + len, "\r\n", 2);
  c->out_len += len + 2;
  free (text);
}

static void
send_error (struct client *c, json_t *id, const char *class, const char *desc)
{
  json_t *msg = json_object ();

  if (id)
    json_object_set (msg, "id", id);
  json_object_set_new (msg, "error",
                       json_pack ("{s:s,s:s}", "class", class, "desc", desc));
  client_send (c, msg);
  json_decref (msg);
}

/* ---- the server's own commands ---- */

static void deliver_events (struct qmp_server *srv);

struct cmd_ctx {
  struct qmp_server *srv;
  struct client *client;
};

static json_t *
cmd_qmp_capabilities (struct cmd_ctx *ctx, json_t *args,
                      struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "enable", "any", false },
    { NULL, NULL, false },
  };
  json_t *enable, *v;
  size_t i;
  bool oob = false;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  enable = args ? json_object_get (args, "enable") : NULL;
  if (enable && !json_is_array (enable)) {
    qmp_error_set (err, "GenericError",
                   "Invalid parameter type for 'enable', expected: array");
    return NULL;
  }
  json_array_foreach (enable, i, v) {
    if (!json_is_string (v)) {
      qmp_error_set (err, "GenericError",
                     "Invalid parameter type for 'enable[%zu]', expected: "
                     "string", i);
      return NULL;
    }
    if (strcmp (json_string_value (v), "oob") != 0) {
      /* QEMU's words, including the odd 'null'. */
      qmp_error_set (err, "GenericError",
                     "Parameter 'null' does not accept value '%s'",
                     json_string_value (v));
      return NULL;
    }
    oob = true;
  }
  /* QEMU checks the arguments first, then refuses a second time. */
  if (ctx->client->negotiated) {
    qmp_error_set (err, "CommandNotFound",
                   "Capabilities negotiation is already complete, command "
                   "ignored");
    return NULL;
  }
  ctx->client->negotiated = true;
  ctx->client->oob = oob;
  return json_object ();
}

void
qmp_version (int *major, int *minor, int *micro)
{
  unsigned v = strata_version_number ();

  *major = v >> 16;
  *minor = (v >> 8) & 0xff;
  *micro = v & 0xff;
}

static json_t *
version_json (void)
{
  int major, minor, micro;
  CLEANUP_FREE char *package = NULL;

  qmp_version (&major, &minor, &micro);
  if (asprintf (&package, "strata-%s", strata_version ()) < 0)
    package = NULL;
  return json_pack ("{s:{s:i,s:i,s:i},s:s}", "qemu", "micro", micro,
                    "minor", minor, "major", major, "package",
                    package ? package : "strata");
}

static const struct qmp_arg no_args[] = { { NULL, NULL, false } };

static json_t *
cmd_query_version (struct cmd_ctx *ctx, json_t *args, struct qmp_error *err)
{
  (void) ctx;
  if (!qmp_args_check (args, no_args, err))
    return NULL;
  return version_json ();
}

static json_t *cmd_query_commands (struct cmd_ctx *ctx, json_t *args,
                                   struct qmp_error *err);

static json_t *
cmd_quit (struct cmd_ctx *ctx, json_t *args, struct qmp_error *err)
{
  if (!qmp_args_check (args, no_args, err))
    return NULL;
  ctx->srv->stop = true;
  /* qemu-system's event; qemu-storage-daemon sends none (docs/qmp.md). */
  qmp_event_emit ("SHUTDOWN", json_pack ("{s:b,s:s}", "guest", 0, "reason",
                                         "host-qmp-quit"));
  return json_object ();
}

struct server_command {
  const char *name;
  json_t *(*fn) (struct cmd_ctx *ctx, json_t *args, struct qmp_error *err);
};

static const struct server_command server_commands[] = {
  { "qmp_capabilities", cmd_qmp_capabilities },
  { "query-version", cmd_query_version },
  { "query-commands", cmd_query_commands },
  { "quit", cmd_quit },
  { NULL, NULL },
};

static void
list_command (const struct qmp_command *c, void *opaque)
{
  json_array_append_new (opaque, json_pack ("{s:s}", "name", c->name));
}

static json_t *
cmd_query_commands (struct cmd_ctx *ctx, json_t *args, struct qmp_error *err)
{
  json_t *list = json_array ();

  (void) ctx;
  if (!qmp_args_check (args, no_args, err)) {
    json_decref (list);
    return NULL;
  }
  for (const struct server_command *c = server_commands; c->name; c++)
    json_array_append_new (list, json_pack ("{s:s}", "name", c->name));
  qmp_foreach_command (list_command, list);
  return list;
}

/* ---- dispatch: QEMU's checks, in QEMU's order ---- */

static void
dispatch (struct client *c, json_t *msg)
{
  struct qmp_error err = { NULL, NULL };
  struct cmd_ctx ctx = { c->srv, c };
  const char *key, *name = NULL;
  json_t *v, *id, *args = NULL, *ret = NULL, *reply;
  bool oob = false;

  if (!json_is_object (msg)) {
    send_error (c, NULL, "GenericError", "QMP input must be a JSON object");
    return;
  }
  id = json_object_get (msg, "id");
  json_object_foreach (msg, key, v) {
    if (strcmp (key, "execute") == 0
        || (strcmp (key, "exec-oob") == 0 && c->oob)) {
      if (!json_is_string (v)) {
        qmp_error_set (&err, "GenericError",
                       "QMP input member '%s' must be a string", key);
        break;
      }
      oob = key[4] == '-';
      name = json_string_value (v);
    }
    else if (strcmp (key, "arguments") == 0) {
      if (!json_is_object (v)) {
        qmp_error_set (&err, "GenericError",
                       "QMP input member 'arguments' must be an object");
        break;
      }
      args = v;
    }
    else if (strcmp (key, "id") != 0) {
      qmp_error_set (&err, "GenericError",
                     "QMP input member '%s' is unexpected", key);
      break;
    }
  }
  if (!err.desc && !name)
    qmp_error_set (&err, "GenericError", "QMP input lacks member 'execute'");
  if (!err.desc && !c->negotiated && strcmp (name, "qmp_capabilities") != 0)
    qmp_error_set (&err, "CommandNotFound",
                   "Expecting capabilities negotiation with "
                   "'qmp_capabilities'");
  if (!err.desc) {
    const struct server_command *sc = server_commands;
    const struct qmp_command *bc;
    while (sc->name && strcmp (sc->name, name) != 0)
      sc++;
    bc = sc->name ? NULL : qmp_find_command (name);
    if (!sc->name && !bc)
      qmp_error_set (&err, "CommandNotFound",
                     "The command %s has not been found", name);
    else if (oob)
      qmp_error_set (&err, "GenericError",
                     "The command %s does not support OOB", name);
    else if (sc->name)
      ret = sc->fn (&ctx, args, &err);
    else
      ret = bc->fn (args, &err);
    if (!ret && !err.desc)
      qmp_error_set (&err, "GenericError", "%s failed", name);
  }
  if (err.desc) {
    send_error (c, id, err.class, err.desc);
    qmp_error_clear (&err);
    json_decref (ret);
    return;
  }
  /* Events the command raised go out before its reply, as in QEMU where
   * they are sent while the command runs. */
  deliver_events (c->srv);
  reply = json_object ();
  json_object_set_new (reply, "return", ret);
  if (id)
    json_object_set (reply, "id", id);
  client_send (c, reply);
  json_decref (reply);
}

/* ---- input: framing and parsing ---- */

/* jansson's messages where QEMU's parser has its own words for the same
 * mistake; the rest pass through after QEMU's prefix. */
static void
parse_error (struct client *c, const json_error_t *je)
{
  const char *text = je->text;
  char buf[256];

  if (strstr (text, "':' expected"))
    text = "missing : in object pair";
  else if (strstr (text, "unexpected token"))
    text = "expecting value";
  snprintf (buf, sizeof buf, "JSON parse error, %s", text);
  send_error (c, NULL, "GenericError", buf);
}

static void
handle_message (struct client *c, const char *p, size_t len)
{
  json_error_t je;
  json_t *msg = json_loadb (p, len, JSON_DECODE_ANY, &je);

  if (!msg) {
    parse_error (c, &je);
    return;
  }
  dispatch (c, msg);
  json_decref (msg);
}

/* Frame the new input, dispatching each complete message (lexer.c). */
static void
client_scan (struct client *c)
{
  struct qmp_lex_token tok;

  while (!c->closing && !c->dead) {
    switch (qmp_lexer_next (&c->lex, &tok)) {
    case QMP_LEX_MESSAGE:
      handle_message (c, tok.text, tok.len);
      break;
    case QMP_LEX_ERROR:
      send_error (c, NULL, "GenericError", tok.error);
      break;
    case QMP_LEX_OVERSIZED:
      send_error (c, NULL, "GenericError",
                  "QMP input exceeds the limit of 16 MiB per message; "
                  "closing the connection");
      c->closing = true;
      return;
    case QMP_LEX_MORE:
      return;
    }
  }
}

static void
client_read (struct client *c)
{
  size_t avail;
  char *space = qmp_lexer_space (&c->lex, 65536, &avail);
  ssize_t n;

  if (!space) {
    client_drop (c);
    return;
  }
  n = recv (c->w.fd, space, avail, MSG_DONTWAIT);
  if (n < 0) {
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
      client_drop (c);
    return;
  }
  if (n == 0) {
    /* Gone, maybe mid-message: only this connection is lost. */
    client_drop (c);
    return;
  }
  qmp_lexer_commit (&c->lex, n);
  client_scan (c);
}

/* ---- connections ---- */

static void
client_drop (struct client *c)
{
  if (c->dead)
    return;
  c->dead = true;
  epoll_ctl (c->srv->epfd, EPOLL_CTL_DEL, c->w.fd, NULL);
  close (c->w.fd);
  c->w.fd = -1;
  /* Unlinked now, freed at the end of the loop iteration (an event for it
   * may still be in the batch epoll returned, or a caller up the stack
   * may still hold it). */
  if (c->prev)
    c->prev->next = c->next;
  else
    c->srv->clients = c->next;
  if (c->next)
    c->next->prev = c->prev;
  c->prev = NULL;
  c->next = c->srv->graveyard;
  c->srv->graveyard = c;
}

static void
free_graveyard (struct qmp_server *srv)
{
  while (srv->graveyard) {
    struct client *next = srv->graveyard->next;
    client_free (srv->graveyard);
    srv->graveyard = next;
  }
}

static void
client_free (struct client *c)
{
  qmp_lexer_free (&c->lex);
  free (c->out);
  free (c);
}

static void
accept_client (struct qmp_server *srv, struct listener *l)
{
  struct epoll_event ev;
  struct client *c;
  json_t *greeting;
  int fd;

  fd = accept4 (l->w.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd < 0)
    return;
  c = calloc (1, sizeof *c);
  if (!c) {
    close (fd);
    return;
  }
  c->w.kind = W_CLIENT;
  c->w.fd = fd;
  c->srv = srv;
  qmp_lexer_init (&c->lex, QMP_MAX_MESSAGE);
  c->events = EPOLLIN;
  ev.events = EPOLLIN;
  ev.data.ptr = &c->w;
  if (epoll_ctl (srv->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
    close (fd);
    free (c);
    return;
  }
  c->next = srv->clients;
  if (c->next)
    c->next->prev = c;
  srv->clients = c;
  greeting = json_pack ("{s:{s:o,s:[s]}}", "QMP", "version", version_json (),
                        "capabilities", "oob");
  client_send (c, greeting);
  json_decref (greeting);
  client_flush (c);
}

static void
deliver_events (struct qmp_server *srv)
{
  struct pending_event *pe = events_take (), *next;

  for (; pe; pe = next) {
    next = pe->next;
    for (struct client *c = srv->clients, *cn; c; c = cn) {
      cn = c->next;
      if (c->negotiated && !c->closing)
        client_send (c, pe->msg);
    }
    json_decref (pe->msg);
    free (pe);
  }
}

/* ---- the server ---- */

static char *errmsg_printf (const char *fmt, ...)
    __attribute__ ((format (printf, 1, 2)));

static char *
errmsg_printf (const char *fmt, ...)
{
  va_list ap;
  char *s;

  va_start (ap, fmt);
  if (vasprintf (&s, fmt, ap) < 0)
    s = NULL;
  va_end (ap);
  return s;
}

static bool
add_watch (struct qmp_server *srv, struct watch *w)
{
  struct epoll_event ev = { .events = EPOLLIN, .data.ptr = w };
  return epoll_ctl (srv->epfd, EPOLL_CTL_ADD, w->fd, &ev) == 0;
}

struct qmp_server *
qmp_server_new (char **errmsg)
{
  struct qmp_server *srv = calloc (1, sizeof *srv);
  sigset_t mask;

  if (!srv) {
    *errmsg = errmsg_printf ("out of memory");
    return NULL;
  }
  srv->epfd = srv->sig.fd = srv->evt.fd = -1;
  qmp_job_events_init ();
  sigemptyset (&mask);
  sigaddset (&mask, SIGTERM);
  sigaddset (&mask, SIGINT);
  pthread_sigmask (SIG_BLOCK, &mask, NULL);
  signal (SIGPIPE, SIG_IGN);
  srv->epfd = epoll_create1 (EPOLL_CLOEXEC);
  srv->sig.kind = W_SIGNAL;
  srv->sig.fd = signalfd (-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
  srv->evt.kind = W_EVENT;
  srv->evt.fd = eventfd (0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (srv->epfd < 0 || srv->sig.fd < 0 || srv->evt.fd < 0
      || !add_watch (srv, &srv->sig) || !add_watch (srv, &srv->evt)) {
    *errmsg = errmsg_printf ("event loop: %s", strerror (errno));
    qmp_server_free (srv);
    return NULL;
  }
  pthread_mutex_lock (&event_lock);
  event_fd = srv->evt.fd;
  pthread_mutex_unlock (&event_lock);
  return srv;
}

/* Is somebody listening on PATH? */
static bool
socket_live (const struct sockaddr_un *addr)
{
  int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  bool live;

  if (fd < 0)
    return false;
  live = connect (fd, (const struct sockaddr *) addr, sizeof *addr) == 0;
  close (fd);
  return live;
}

bool
qmp_server_listen (struct qmp_server *srv, const char *path, char **errmsg)
{
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  struct listener *l;
  struct stat st;
  int fd;

  if (strlen (path) >= sizeof addr.sun_path) {
    *errmsg = errmsg_printf ("%s: socket path too long (at most %zu bytes)",
                             path, sizeof addr.sun_path - 1);
    return false;
  }
  strcpy (addr.sun_path, path);
  if (lstat (path, &st) == 0) {
    if (!S_ISSOCK (st.st_mode)) {
      *errmsg = errmsg_printf ("%s: exists and is not a socket", path);
      return false;
    }
    if (socket_live (&addr)) {
      *errmsg = errmsg_printf ("%s: a daemon is already listening there",
                               path);
      return false;
    }
    unlink (path);
  }
  fd = unix_socket_listen (path, 64, true);
  if (fd < 0) {
    *errmsg = errmsg_printf ("%s: %s", path, strerror (-fd));
    return false;
  }
  l = calloc (1, sizeof *l);
  if (l)
    l->path = strdup (path);
  if (!l || !l->path) {
    free (l);
    close (fd);
    unlink (path);
    *errmsg = errmsg_printf ("out of memory");
    return false;
  }
  l->w.kind = W_LISTEN;
  l->w.fd = fd;
  l->next = srv->listeners;
  srv->listeners = l;
  if (!add_watch (srv, &l->w)) {
    *errmsg = errmsg_printf ("%s: %s", path, strerror (errno));
    return false;
  }
  return true;
}

static void
handle_signal (struct qmp_server *srv)
{
  struct signalfd_siginfo si;

  while (read (srv->sig.fd, &si, sizeof si) == sizeof si) {
    if (!srv->stop)
      qmp_event_emit ("SHUTDOWN", json_pack ("{s:b,s:s}", "guest", 0,
                                             "reason", "host-signal"));
    srv->stop = true;
  }
}

void
qmp_server_run (struct qmp_server *srv)
{
  struct epoll_event evs[64];

  while (!srv->stop) {
    int n = epoll_wait (srv->epfd, evs, 64, -1);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      perror ("stratad: epoll_wait");
      break;
    }
    for (int i = 0; i < n; i++) {
      struct watch *w = evs[i].data.ptr;
      struct client *c;
      uint64_t count;

      switch (w->kind) {
      case W_LISTEN:
        if (!srv->stop)
          accept_client (srv, (struct listener *) w);
        break;
      case W_SIGNAL:
        handle_signal (srv);
        break;
      case W_EVENT:
        if (read (w->fd, &count, sizeof count) < 0) {
          /* nothing pending */
        }
        deliver_events (srv);
        break;
      case W_CLIENT:
        c = (struct client *) w;
        if (c->dead)
          break;
        if (evs[i].events & (EPOLLERR | EPOLLHUP) && !(evs[i].events & EPOLLIN))
          client_drop (c);
        else if (evs[i].events & EPOLLIN)
          client_read (c);
        if (!c->dead)
          client_flush (c);
        break;
      }
    }
    /* Events queued by this batch's commands, then their replies. */
    deliver_events (srv);
    for (struct client *c = srv->clients, *cn; c; c = cn) {
      cn = c->next;
      if (c->out_len > c->out_off)
        client_flush (c);
    }
    free_graveyard (srv);
  }
  /* Stop accepting; send what can go out now (the reply to quit, the
   * SHUTDOWN event). */
  for (struct listener *l = srv->listeners; l; l = l->next)
    if (l->w.fd >= 0) {
      epoll_ctl (srv->epfd, EPOLL_CTL_DEL, l->w.fd, NULL);
      close (l->w.fd);
      l->w.fd = -1;
    }
  deliver_events (srv);
  for (struct client *c = srv->clients; c; c = c->next)
    if (c->out_len > c->out_off)
      send (c->w.fd, c->out + c->out_off, c->out_len - c->out_off,
            MSG_NOSIGNAL | MSG_DONTWAIT);
}

void
qmp_server_free (struct qmp_server *srv)
{
  if (!srv)
    return;
  while (srv->clients)
    client_drop (srv->clients);
  free_graveyard (srv);
  while (srv->listeners) {
    struct listener *l = srv->listeners;
    srv->listeners = l->next;
    if (l->w.fd >= 0)
      close (l->w.fd);
    unlink (l->path);
    free (l->path);
    free (l);
  }
  pthread_mutex_lock (&event_lock);
  if (event_fd == srv->evt.fd)
    event_fd = -1;
  pthread_mutex_unlock (&event_lock);
  for (struct pending_event *pe = events_take (), *next; pe; pe = next) {
    next = pe->next;
    json_decref (pe->msg);
    free (pe);
  }
  if (srv->sig.fd >= 0)
    close (srv->sig.fd);
  if (srv->evt.fd >= 0)
    close (srv->evt.fd);
  if (srv->epfd >= 0)
    close (srv->epfd);
  free (srv);
}
