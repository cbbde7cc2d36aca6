/* strata: the command-line client of stratad, for people.
 *
 *   strata [--socket PATH] [--json] COMMAND [ARGS]
 *
 * Commands: nodes, add KEY=VALUE...|JSON, del NODE,
 * snapshot NODE OVERLAY [--format FMT] [--node-name NAME], events,
 * raw '{json}'.  It speaks plain QMP, so it works with
 * qemu-storage-daemon too.  The socket is --socket, else $STRATA_SOCKET,
 * else stratad's default path.  Exit status 1 when the command failed,
 * with the QMP error's description on stderr.
 */
#include <errno.h>
#include <getopt.h>
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

#include "control/server.h"
#include "control/qmp.h"

static const char *socket_path;
static bool json_output;
static int sock = -1;
static volatile sig_atomic_t interrupted;

/* Input from the daemon, split into lines. */
static char *inbuf;
static size_t in_len, in_cap;

static void __attribute__ ((noreturn, format (printf, 1, 2)))
die (const char *fmt, ...)
{
  va_list ap;

  fprintf (stderr, "strata: ");
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fprintf (stderr, "\n");
  exit (1);
}

static void
usage (FILE *f)
{
  fprintf (f,
"Usage: strata [--socket PATH] [--json] COMMAND [ARGS]\n"
"Talk to stratad (or any QMP storage daemon) on its unix socket.\n"
"\n"
"  nodes                          the block graph as a tree\n"
"  add KEY=VALUE...|JSON          add a block node (blockdev-add)\n"
"  del NODE                       remove a block node (blockdev-del)\n"
"  snapshot NODE OVERLAY [--format FMT] [--node-name NAME]\n"
"                                 external snapshot (blockdev-snapshot-sync)\n"
"  events                         print events as they come\n"
"  raw '{\"execute\": ...}'         send one QMP command, print the reply\n"
"\n"
"  --socket PATH   the daemon's socket (default: $STRATA_SOCKET, else\n"
"                  stratad's default path)\n"
"  --json          print QMP's JSON instead of the human form\n");
}

static char *
default_socket (void)
{
  const char *env = getenv ("STRATA_SOCKET");
  char *path = env && *env ? strdup (env) : qmp_default_socket_path ();

  if (!path)
    die ("out of memory");
  return path;
}

/* ---- the connection ---- */

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
      die ("%s: %s", socket_path, strerror (errno));
    }
    off += n;
  }
  free (text);
}

/* The next message from the daemon, or NULL when it closed the
 * connection (or SIGINT arrived). */
static json_t *
read_message (void)
{
  for (;;) {
    char *nl = in_len ? memchr (inbuf, '\n', in_len) : NULL;
    if (nl) {
      size_t len = nl - inbuf + 1;
      json_error_t je;
      json_t *msg = json_loadb (inbuf, len, 0, &je);
      memmove (inbuf, inbuf + len, in_len - len);
      in_len -= len;
      if (!msg)
        die ("%s: bad reply from the daemon: %s", socket_path, je.text);
      return msg;
    }
    if (in_cap - in_len < 65536) {
      in_cap = in_cap ? in_cap * 2 : 65536;
      inbuf = realloc (inbuf, in_cap);
      if (!inbuf)
        die ("out of memory");
    }
    ssize_t n = recv (sock, inbuf + in_len, in_cap - in_len, 0);
    if (n < 0 && errno == EINTR && !interrupted)
      continue;
    if (n <= 0)
      return NULL;
    in_len += n;
  }
}

static void
connect_daemon (void)
{
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  json_t *greeting, *reply;

  if (strlen (socket_path) >= sizeof addr.sun_path)
    die ("%s: socket path too long", socket_path);
  strcpy (addr.sun_path, socket_path);
  sock = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (sock < 0)
    die ("socket: %s", strerror (errno));
  if (connect (sock, (struct sockaddr *) &addr, sizeof addr) < 0) {
    if (errno == ENOENT || errno == ECONNREFUSED)
      die ("no daemon is listening on %s (start stratad, or set --socket / "
           "STRATA_SOCKET)", socket_path);
    die ("%s: %s", socket_path, strerror (errno));
  }
  greeting = read_message ();
  if (!greeting || !json_object_get (greeting, "QMP"))
    die ("%s: no QMP greeting from the daemon", socket_path);
  json_decref (greeting);
  greeting = json_pack ("{s:s}", "execute", "qmp_capabilities");
  send_json (greeting);
  json_decref (greeting);
  reply = read_message ();
  if (!reply || !json_object_get (reply, "return"))
    die ("%s: capabilities negotiation failed", socket_path);
  json_decref (reply);
}

/* Send MSG (taken over) with our id; the reply, skipping events. */
static json_t *
transact (json_t *msg)
{
  static int next_id;
  json_t *id = json_sprintf ("strata-%d", ++next_id);

  json_object_set (msg, "id", id);
  send_json (msg);
  json_decref (msg);
  for (;;) {
    json_t *reply = read_message ();
    if (!reply)
      die ("%s: the daemon closed the connection", socket_path);
    if (json_equal (json_object_get (reply, "id"), id)) {
      json_decref (id);
      return reply;
    }
    json_decref (reply);
  }
}

static void
print_json (json_t *v)
{
  char *text = json_dumps (v, JSON_INDENT (2) | JSON_PRESERVE_ORDER
                                  | JSON_ENCODE_ANY);
  puts (text);
  free (text);
}

/* Run COMMAND with ARGS (taken over, may be NULL); its return value, or
 * exit 1 with the error's description. */
static json_t *
execute (const char *command, json_t *args)
{
  json_t *msg = json_pack ("{s:s}", "execute", command), *reply, *ret, *err;

  if (args)
    json_object_set_new (msg, "arguments", args);
  reply = transact (msg);
  err = json_object_get (reply, "error");
  if (err) {
    fprintf (stderr, "strata: %s\n",
             json_string_value (json_object_get (err, "desc")));
    exit (1);
  }
  ret = json_incref (json_object_get (reply, "return"));
  json_decref (reply);
  return ret;
}

/* ---- nodes: the graph as a tree ---- */

static const char *
str (json_t *obj, const char *key)
{
  const char *s = json_string_value (json_object_get (obj, key));
  return s ? s : "";
}

/* The protocol-level filename under FILENAME: QEMU (and stratad) report
 * "json:{...}" for a node opened with explicit children; the bytes are in
 * its innermost "file".  Returns a malloc'd string. */
static char *
plain_filename (const char *filename)
{
  json_t *obj, *v;
  char *out;

  if (strncmp (filename, "json:", 5) != 0)
    return strdup (filename);
  obj = json_loads (filename + 5, 0, NULL);
  v = obj;
  while (json_is_object (json_object_get (v, "file")))
    v = json_object_get (v, "file");
  out = strdup (json_is_string (json_object_get (v, "filename"))
                    ? json_string_value (json_object_get (v, "filename"))
                    : filename);
  json_decref (obj);
  return out;
}

static bool
same_file (const char *a, const char *b)
{
  char *pa, *pb;
  bool same;

  if (!*a || !*b)
    return false;
  pa = plain_filename (a);
  pb = plain_filename (b);
  same = strcmp (pa, pb) == 0;
  free (pa);
  free (pb);
  return same;
}

static bool
is_protocol (const char *drv)
{
  static const char *const protocols[] = { "file", "host_device", "nbd",
                                           "null-co", "null-aio", "http",
                                           "https", NULL };
  for (const char *const *p = protocols; *p; p++)
    if (strcmp (*p, drv) == 0)
      return true;
  return false;
}

static void
human_size (json_int_t n, char *buf, size_t len)
{
  static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB",
                                       "PiB" };
  double v = n;
  int u = 0;

  while (v >= 1024 && u < 5) {
    v /= 1024;
    u++;
  }
  if (u == 0)
    snprintf (buf, len, "%lld B", (long long) n);
  else
    snprintf (buf, len, "%.3g %s", v, units[u]);
}

/* The node among NODES (not USED) whose filename is NAME and that is a
 * protocol node (WANT_PROTOCOL) or a format node. */
static json_t *
find_node (json_t *nodes, bool *used, const char *name, bool want_protocol,
           json_t *self)
{
  size_t i;
  json_t *n;

  if (!*name)
    return NULL;
  json_array_foreach (nodes, i, n) {
    if (n == self || used[i] || !same_file (str (n, "file"), name))
      continue;
    if (is_protocol (str (n, "drv")) == want_protocol)
      return n;
  }
  return NULL;
}

static size_t
index_of (json_t *nodes, json_t *node)
{
  size_t i;
  json_t *n;

  json_array_foreach (nodes, i, n)
    if (n == node)
      return i;
  return 0;
}

static void
print_node (json_t *nodes, bool *used, json_t *node, int depth,
            const char *role)
{
  json_t *image = json_object_get (node, "image"), *child;
  json_t *vsize = json_object_get (image, "virtual-size");
  json_t *bimage = json_object_get (image, "backing-image");
  char size[32] = "";
  const char *backing_name;
  char *shown;

  used[index_of (nodes, node)] = true;
  if (json_is_integer (vsize))
    human_size (json_integer_value (vsize), size, sizeof size);
  shown = plain_filename (str (node, "file"));
  printf ("%*s%s%s%s  %s  %s%s%s%s\n", depth * 4, "", role, *role ? ": " : "",
          str (node, "node-name"), str (node, "drv"), shown,
          *size ? "  (" : "", size, *size ? ")" : "");
  free (shown);
  if (!is_protocol (str (node, "drv"))) {
    child = find_node (nodes, used, str (node, "file"), true, node);
    if (child)
      print_node (nodes, used, child, depth + 1, "file");
  }
  backing_name = bimage ? str (bimage, "filename") : str (node,
                                                          "backing_file");
  child = find_node (nodes, used, backing_name, false, node);
  if (child)
    print_node (nodes, used, child, depth + 1, "backing");
  else if (*backing_name)
    printf ("%*sbacking: %s (not a named node)\n", (depth + 1) * 4, "",
            backing_name);
}

/* Is NODE somebody's child (file or backing), judged by filenames? */
static bool
is_child (json_t *nodes, json_t *node)
{
  size_t i;
  json_t *n;
  const char *file = str (node, "file");

  json_array_foreach (nodes, i, n) {
    json_t *bimage = json_object_get (json_object_get (n, "image"),
                                      "backing-image");
    const char *backing = bimage ? str (bimage, "filename")
                                 : str (n, "backing_file");
    if (n == node)
      continue;
    if (is_protocol (str (node, "drv")) && !is_protocol (str (n, "drv"))
        && same_file (str (n, "file"), file))
      return true;
    if (!is_protocol (str (node, "drv")) && same_file (backing, file))
      return true;
  }
  return false;
}

static int
cmd_nodes (int argc, char **argv)
{
  json_t *nodes, *n;
  bool *used;
  size_t i;

  (void) argv;
  if (argc != 1)
    die ("usage: strata nodes");
  nodes = execute ("query-named-block-nodes",
                   json_pack ("{s:b}", "flat", 0));
  if (json_output) {
    print_json (nodes);
    json_decref (nodes);
    return 0;
  }
  if (!json_is_array (nodes))
    die ("query-named-block-nodes: not a list");
  if (json_array_size (nodes) == 0) {
    printf ("no block nodes\n");
    json_decref (nodes);
    return 0;
  }
  used = calloc (json_array_size (nodes) + 1, sizeof *used);
  json_array_foreach (nodes, i, n)
    if (!used[i] && !is_child (nodes, n))
      print_node (nodes, used, n, 0, "");
  /* Whatever the filename matching left over (a cycle, say). */
  json_array_foreach (nodes, i, n)
    if (!used[i])
      print_node (nodes, used, n, 0, "");
  free (used);
  json_decref (nodes);
  return 0;
}

/* ---- the other commands ---- */

static void
print_result (json_t *ret, const char *human)
{
  if (json_output)
    print_json (ret);
  else if (human)
    printf ("%s\n", human);
  json_decref (ret);
}

static int
cmd_add (int argc, char **argv)
{
  json_t *args;
  char *errmsg = NULL, *msg = NULL;

  if (argc < 2)
    die ("usage: strata add KEY=VALUE...|JSON");
  if (argc == 2 && argv[1][0] == '{') {
    json_error_t je;
    args = json_loads (argv[1], 0, &je);
    if (!args || !json_is_object (args))
      die ("add: not a JSON object: %s", args ? "" : je.text);
  }
  else {
    args = qmp_keyval_parse (argv + 1, argc - 1, &errmsg);
    if (!args)
      die ("add: %s", errmsg);
  }
  if (asprintf (&msg, "added %s",
                str (args, "node-name")[0] ? str (args, "node-name")
                                           : "a node") < 0)
    msg = NULL;
  print_result (execute ("blockdev-add", args), msg);
  free (msg);
  return 0;
}

static int
cmd_del (int argc, char **argv)
{
  if (argc != 2)
    die ("usage: strata del NODE");
  print_result (execute ("blockdev-del",
                         json_pack ("{s:s}", "node-name", argv[1])),
                NULL);
  return 0;
}

static int
cmd_snapshot (int argc, char **argv)
{
  static const struct option longopts[] = {
    { "format", required_argument, NULL, 'f' },
    { "node-name", required_argument, NULL, 'n' },
    { NULL, 0, NULL, 0 },
  };
  const char *format = "qcow2", *node_name = NULL;
  json_t *args;
  int c;

  optind = 0;  /* re-initialise GNU getopt; options may follow operands */
  while ((c = getopt_long (argc, argv, "f:n:", longopts, NULL)) != -1) {
    if (c == 'f')
      format = optarg;
    else if (c == 'n')
      node_name = optarg;
    else
      exit (1);
  }
  if (argc - optind != 2)
    die ("usage: strata snapshot NODE OVERLAY-FILE [--format FMT] "
         "[--node-name NAME]");
  args = json_pack ("{s:s,s:s,s:s}", "node-name", argv[optind],
                    "snapshot-file", argv[optind + 1], "format", format);
  if (node_name)
    json_object_set_new (args, "snapshot-node-name", json_string (node_name));
  print_result (execute ("blockdev-snapshot-sync", args), NULL);
  return 0;
}

static void
on_sigint (int sig)
{
  (void) sig;
  interrupted = 1;
}

static int
cmd_events (int argc, char **argv)
{
  struct sigaction sa = { .sa_handler = on_sigint };
  json_t *msg;

  (void) argv;
  if (argc != 1)
    die ("usage: strata events");
  sigaction (SIGINT, &sa, NULL);  /* no SA_RESTART: recv returns */
  sigaction (SIGTERM, &sa, NULL);
  setvbuf (stdout, NULL, _IOLBF, 0);
  while (!interrupted && (msg = read_message ()) != NULL) {
    json_t *ts = json_object_get (msg, "timestamp");
    if (!json_object_get (msg, "event")) {
      json_decref (msg);
      continue;
    }
    if (json_output) {
      char *text = json_dumps (msg, JSON_COMPACT | JSON_PRESERVE_ORDER);
      printf ("%s\n", text);
      free (text);
    }
    else {
      time_t secs = json_integer_value (json_object_get (ts, "seconds"));
      json_int_t us = json_integer_value (json_object_get (ts,
                                                          "microseconds"));
      json_t *data = json_object_get (msg, "data");
      char when[64], *text = data ? json_dumps (data, JSON_COMPACT
                                                          | JSON_PRESERVE_ORDER)
                                  : NULL;
      struct tm tm;
      localtime_r (&secs, &tm);
      strftime (when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
      printf ("%s.%06lld %s%s%s\n", when, (long long) us,
              str (msg, "event"), text ? " " : "", text ? text : "");
      free (text);
    }
    json_decref (msg);
  }
  return 0;
}

static int
cmd_raw (int argc, char **argv)
{
  json_error_t je;
  json_t *msg, *reply, *err;
  char *text;

  if (argc != 2)
    die ("usage: strata raw '{\"execute\": ...}'");
  msg = json_loads (argv[1], 0, &je);
  if (!msg || !json_is_object (msg))
    die ("raw: not a JSON object%s%s", msg ? "" : ": ", msg ? "" : je.text);
  reply = transact (msg);
  json_object_del (reply, "id");
  text = json_dumps (reply, (json_output ? JSON_COMPACT : JSON_INDENT (2))
                                | JSON_PRESERVE_ORDER);
  puts (text);
  free (text);
  err = json_object_get (reply, "error");
  if (err) {
    fprintf (stderr, "strata: %s\n",
             json_string_value (json_object_get (err, "desc")));
    json_decref (reply);
    return 1;
  }
  json_decref (reply);
  return 0;
}

int
main (int argc, char **argv)
{
  static const struct option longopts[] = {
    { "socket", required_argument, NULL, 's' },
    { "json", no_argument, NULL, 'j' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  static const struct {
    const char *name;
    int (*fn) (int argc, char **argv);
  } commands[] = {
    { "nodes", cmd_nodes },   { "add", cmd_add },       { "del", cmd_del },
    { "snapshot", cmd_snapshot }, { "events", cmd_events },
    { "raw", cmd_raw },
  };
  char *path = NULL;
  int c;

  while ((c = getopt_long (argc, argv, "+s:jh", longopts, NULL)) != -1) {
    switch (c) {
    case 's':
      socket_path = optarg;
      break;
    case 'j':
      json_output = true;
      break;
    case 'h':
      usage (stdout);
      return 0;
    default:
      usage (stderr);
      return 1;
    }
  }
  if (optind >= argc) {
    usage (stderr);
    return 1;
  }
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    if (strcmp (argv[optind], commands[i].name) == 0) {
      if (!socket_path)
        socket_path = path = default_socket ();
      connect_daemon ();
      c = commands[i].fn (argc - optind, argv + optind);
      close (sock);
      free (inbuf);
      free (path);
      return c;
    }
  die ("unknown command '%s' (see --help)", argv[optind]);
}
