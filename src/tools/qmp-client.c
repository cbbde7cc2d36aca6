/* The strata client's connection to a QMP daemon (stratad, or
 * qemu-storage-daemon: it speaks plain QMP) over a unix socket.
 *
 * One connection per process: client_connect() reads the greeting and
 * negotiates capabilities; then client_transact() sends a command with an
 * id of ours and returns the reply with that id.  Messages are lines of
 * JSON; what arrives between a command and its reply is an event, kept in
 * client_event_queue while a job command wants them (NULL: dropped).  A
 * SIGINT counted in client_interrupted interrupts a wait for a message
 * only where the caller's signal mask lets it through (ppoll), so a job
 * watcher that blocks SIGINT sees it exactly where it can act on it.
 *
 * Failures to talk to the daemon are fatal: client_die() prints
 * "strata: ..." and exits 1.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "qmp-client.h"

const char *client_socket_path;
volatile sig_atomic_t client_interrupted;
json_t *client_event_queue;

static int sock = -1;

/* Input from the daemon, split into lines. */
static char *inbuf;
static size_t in_len, in_cap;

void
client_die (const char *fmt, ...)
{
  va_list ap;

  fprintf (stderr, "strata: ");
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fprintf (stderr, "\n");
  exit (1);
}

void
client_on_sigint (int sig)
{
  (void) sig;
  client_interrupted++;
}

static void
send_json (json_t *msg)
{
  char *text = json_dumps (msg, JSON_COMPACT);
  size_t len = strlen (text), off = 0;

  while (off < len) {
    ssize_t n = send (sock, text + off, len - off, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      client_die ("%s: %s", client_socket_path, strerror (errno));
    }
    off += n;
  }
  free (text);
}

/* A whole message already buffered, or NULL. */
static json_t *
buffered_message (void)
{
  char *nl = in_len ? memchr (inbuf, '\n', in_len) : NULL;
  size_t len;
  json_error_t je;
  json_t *msg;

  if (!nl)
    return NULL;
  len = nl - inbuf + 1;
  msg = json_loadb (inbuf, len, 0, &je);
  memmove (inbuf, inbuf + len, in_len - len);
  in_len -= len;
  if (!msg)
    client_die ("%s: bad reply from the daemon: %s", client_socket_path, je.text);
  return msg;
}

/* The next message from the daemon, waiting at most TIMEOUT_MS (-1:
 * forever) with the signal mask WAITMASK (NULL: the current one), so that
 * a caller that blocks SIGINT can still be woken by it here and only here.
 * NULL with errno 0 when the daemon closed the connection, EAGAIN when the
 * time ran out, EINTR when a signal arrived. */
json_t *
client_next_message (int timeout_ms, const sigset_t *waitmask)
{
  struct timespec ts = { timeout_ms / 1000, timeout_ms % 1000 * 1000000L };
  json_t *msg;

  while (!(msg = buffered_message ())) {
    struct pollfd pfd = { .fd = sock, .events = POLLIN };
    int r = ppoll (&pfd, 1, timeout_ms < 0 ? NULL : &ts, waitmask);
    ssize_t n;

    if (r < 0 && errno == EINTR)
      return NULL;
    if (r < 0)
      client_die ("%s: %s", client_socket_path, strerror (errno));
    if (r == 0) {
      errno = EAGAIN;
      return NULL;
    }
    if (in_cap - in_len < 65536) {
      in_cap = in_cap ? in_cap * 2 : 65536;
      inbuf = realloc (inbuf, in_cap);
      if (!inbuf)
        client_die ("out of memory");
    }
    n = recv (sock, inbuf + in_len, in_cap - in_len, 0);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      errno = 0;
      return NULL;
    }
    in_len += n;
  }
  return msg;
}

/* The next message from the daemon, or NULL when it closed the
 * connection (or SIGINT arrived). */
json_t *
client_read_message (void)
{
  for (;;) {
    json_t *msg = client_next_message (-1, NULL);
    if (msg || errno != EINTR || client_interrupted)
      return msg;
  }
}

void
client_connect (const char *path)
{
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  json_t *greeting, *reply;

  client_socket_path = path;
  if (strlen (client_socket_path) >= sizeof addr.sun_path)
    client_die ("%s: socket path too long", client_socket_path);
  strcpy (addr.sun_path, client_socket_path);
  sock = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (sock < 0)
    client_die ("socket: %s", strerror (errno));
  if (connect (sock, (struct sockaddr *) &addr, sizeof addr) < 0) {
    if (errno == ENOENT || errno == ECONNREFUSED)
      client_die ("no daemon is listening on %s (start stratad, or set --socket / "
           "STRATA_SOCKET)", client_socket_path);
    client_die ("%s: %s", client_socket_path, strerror (errno));
  }
  greeting = client_read_message ();
  if (!greeting || !json_object_get (greeting, "QMP"))
    client_die ("%s: no QMP greeting from the daemon", client_socket_path);
  json_decref (greeting);
  greeting = json_pack ("{s:s}", "execute", "qmp_capabilities");
  send_json (greeting);
  json_decref (greeting);
  reply = client_read_message ();
  if (!reply || !json_object_get (reply, "return"))
    client_die ("%s: capabilities negotiation failed", client_socket_path);
  json_decref (reply);
}

/* Send MSG (taken over) with our id; the reply, skipping events. */
json_t *
client_transact (json_t *msg)
{
  static int next_id;
  json_t *id = json_sprintf ("strata-%d", ++next_id);

  json_object_set (msg, "id", id);
  send_json (msg);
  json_decref (msg);
  for (;;) {
    json_t *reply = client_next_message (-1, NULL);
    if (!reply && errno == EINTR)
      continue;  /* the caller looks at 'client_interrupted' once it has its reply */
    if (!reply)
      client_die ("%s: the daemon closed the connection", client_socket_path);
    if (json_equal (json_object_get (reply, "id"), id)) {
      json_decref (id);
      return reply;
    }
    if (client_event_queue && json_object_get (reply, "event"))
      json_array_append (client_event_queue, reply);
    json_decref (reply);
  }
}

/* Run COMMAND with ARGS (taken over, may be NULL); the whole reply. */
json_t *
client_execute_reply (const char *command, json_t *args)
{
  json_t *msg = json_pack ("{s:s}", "execute", command);

  if (args)
    json_object_set_new (msg, "arguments", args);
  return client_transact (msg);
}

/* Run COMMAND with ARGS (taken over, may be NULL); its return value, or
 * exit 1 with the error's description. */
json_t *
client_execute (const char *command, json_t *args)
{
  json_t *reply = client_execute_reply (command, args), *ret, *err;

  err = json_object_get (reply, "error");
  if (err) {
    fprintf (stderr, "strata: %s\n",
             json_string_value (json_object_get (err, "desc")));
    json_decref (reply);
    exit (1);
  }
  ret = json_incref (json_object_get (reply, "return"));
  json_decref (reply);
  return ret;
}

void
client_close (void)
{
  close (sock);
  sock = -1;
  free (inbuf);
  inbuf = NULL;
  in_len = in_cap = 0;
}
