/* strata: the command-line client of stratad, for people.
 *
 *   strata [--socket PATH] [--json] COMMAND [ARGS]
 *
 * Commands: nodes, add KEY=VALUE...|JSON, del NODE,
 * snapshot NODE OVERLAY [--format FMT] [--node-name NAME], events,
 * raw '{json}', and the block jobs as virsh has them: pull NODE (virsh
 * blockpull), jobs, job ID (virsh blockjob); see docs/client.md.  It
 * speaks plain QMP, so it works with qemu-storage-daemon too.  The socket
 * is --socket, else $STRATA_SOCKET, else stratad's default path.  Exit
 * status 1 when the command failed, with the QMP error's description on
 * stderr.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
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
static volatile sig_atomic_t interrupted;  /* SIGINTs received */
/* Events that came while we waited for a reply, kept for the job commands
 * (NULL: dropped). */
static json_t *event_queue;

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
"  pull NODE [--base NODE] [--bandwidth RATE [--bytes]]\n"
"       [--wait [--verbose] [--timeout SECONDS] [--async]]\n"
"                                 copy the backing chain's data into NODE\n"
"                                 (block-stream); the job's ID is NODE\n"
"  jobs                           the running block jobs\n"
"  job ID [--info | --abort [--async] | --bandwidth RATE [--bytes]]\n"
"                                 show, cancel or re-limit one job\n"
"\n"
"  RATE is MiB/s (bytes/s with --bytes), or bytes/s when it has a K, M,\n"
"  G or T suffix (500K, 50M, 1G); 0 means no limit.  With --wait, Ctrl-C\n"
"  or --timeout cancels the job and waits for it to end (not with\n"
"  --async).  Exit status 1 when the pull was aborted or failed.\n"
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
    die ("%s: bad reply from the daemon: %s", socket_path, je.text);
  return msg;
}

/* The next message from the daemon, waiting at most TIMEOUT_MS (-1:
 * forever) with the signal mask WAITMASK (NULL: the current one), so that
 * a caller that blocks SIGINT can still be woken by it here and only here.
 * NULL with errno 0 when the daemon closed the connection, EAGAIN when the
 * time ran out, EINTR when a signal arrived. */
static json_t *
next_message (int timeout_ms, const sigset_t *waitmask)
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
      die ("%s: %s", socket_path, strerror (errno));
    if (r == 0) {
      errno = EAGAIN;
      return NULL;
    }
    if (in_cap - in_len < 65536) {
      in_cap = in_cap ? in_cap * 2 : 65536;
      inbuf = realloc (inbuf, in_cap);
      if (!inbuf)
        die ("out of memory");
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
static json_t *
read_message (void)
{
  for (;;) {
    json_t *msg = next_message (-1, NULL);
    if (msg || errno != EINTR || interrupted)
      return msg;
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
    json_t *reply = next_message (-1, NULL);
    if (!reply && errno == EINTR)
      continue;  /* the caller looks at 'interrupted' once it has its reply */
    if (!reply)
      die ("%s: the daemon closed the connection", socket_path);
    if (json_equal (json_object_get (reply, "id"), id)) {
      json_decref (id);
      return reply;
    }
    if (event_queue && json_object_get (reply, "event"))
      json_array_append (event_queue, reply);
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

/* Run COMMAND with ARGS (taken over, may be NULL); the whole reply. */
static json_t *
execute_reply (const char *command, json_t *args)
{
  json_t *msg = json_pack ("{s:s}", "execute", command);

  if (args)
    json_object_set_new (msg, "arguments", args);
  return transact (msg);
}

/* Run COMMAND with ARGS (taken over, may be NULL); its return value, or
 * exit 1 with the error's description. */
static json_t *
execute (const char *command, json_t *args)
{
  json_t *reply = execute_reply (command, args), *ret, *err;

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

/* N in the largest binary unit that keeps it at least 1; the unit's
 * name in *UNIT. */
static double
scale_binary (json_int_t n, const char **unit)
{
  static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB",
                                       "PiB", "EiB" };
  double v = n;
  int u = 0;

  while (v >= 1024 && u < 6) {
    v /= 1024;
    u++;
  }
  *unit = units[u];
  return v;
}

static void
human_size (json_int_t n, char *buf, size_t len)
{
  const char *unit;
  double v = scale_binary (n, &unit);

  if (n < 1024)
    snprintf (buf, len, "%lld B", (long long) n);
  else
    snprintf (buf, len, "%.3g %s", v, unit);
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
  interrupted++;
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

/* ---- block jobs: pull, jobs, job ----
 *
 * Modelled on virsh's blockpull and blockjob.  A job is named by its ID,
 * which for 'strata pull NODE' is NODE itself (QEMU wants an explicit
 * job-id for a node that no device uses, and one job per node is what
 * virsh's disk-keyed jobs give people anyway).  The end of a job is
 * learnt from its BLOCK_JOB_COMPLETED / BLOCK_JOB_CANCELLED event, its
 * progress from query-block-jobs every half second, as virsh does. */

enum job_end { JOB_RUNNING, JOB_COMPLETED, JOB_CANCELLED, JOB_FAILED };

#define JOB_POLL_MS 500

struct job_wait {
  const char *id;
  const char *label;   /* "Block Pull" */
  bool verbose;        /* draw the progress */
  bool async;          /* after a cancel, do not wait for the end */
  int64_t deadline;    /* CLOCK_MONOTONIC ms for the cancel; 0: none */
  bool tty;            /* progress on a terminal: a bar redrawn in place */

  bool cancel_sent;
  int interrupts;      /* SIGINTs already acted on */
  int absent_polls;    /* polls that did not find the job */
  char *error;         /* the job's error message, malloc'd */

  json_int_t len, offset;  /* len 0: not known yet */
  bool shown;              /* a percentage was printed: shown_pct */
  double shown_pct;
  int64_t sample_ms;       /* when offset was sampled */
  double rate;             /* bytes/s, smoothed; 0: unknown */
  bool drawn;              /* a bar is on the terminal's line */
};

static int64_t
now_ms (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* RATE in bytes/s.  A bare number is MiB/s as in virsh (bytes/s with
 * BYTES); with a B, K, M, G, T, P or E suffix (binary, "KiB" also
 * accepted) it is bytes/s whatever BYTES says.  Dies on anything else,
 * before anything is sent. */
static json_int_t
parse_rate (const char *cmd, const char *s, bool bytes)
{
  static const char units[] = "BKMGTPE";
  const char *unit;
  char *end;
  unsigned long long n;
  int shift = bytes ? 0 : 20;

  if (*s == '-')
    die ("%s: bandwidth '%s' must not be negative", cmd, s);
  errno = 0;
  n = strtoull (s, &end, 10);
  if (!isdigit ((unsigned char) *s) || end == s)
    die ("%s: bandwidth '%s' is not a rate: give MiB/s, or bytes/s with "
         "--bytes or a K, M, G or T suffix",
         cmd, s);
  if (*end) {
    unit = strchr (units, toupper ((unsigned char) *end));
    if (!unit
        || !(end[1] == '\0' || (unit > units && strcmp (end + 1, "iB") == 0)))
      die ("%s: bandwidth '%s' has an unknown unit '%s' (use K, M, G or T: "
           "powers of 1024 bytes/s)",
           cmd, s, end);
    shift = 10 * (unit - units);
  }
  if (errno == ERANGE || n > (unsigned long long) INT64_MAX >> shift)
    die ("%s: bandwidth '%s' is out of range (at most %lld bytes/s)", cmd, s,
         (long long) INT64_MAX);
  return (json_int_t) (n << shift);
}

/* --timeout SECONDS in milliseconds, as virsh bounds it. */
static int64_t
parse_timeout (const char *cmd, const char *s)
{
  char *end;
  long n;

  errno = 0;
  n = strtol (s, &end, 10);
  if (!isdigit ((unsigned char) *s) || *end || errno || n <= 0
      || n > INT_MAX / 1000)
    die ("%s: timeout '%s' is not a positive number of seconds", cmd, s);
  return (int64_t) n * 1000;
}

/* virsh's names for the QMP job types. */
static const char *
job_label (const char *type)
{
  if (strcmp (type, "stream") == 0)
    return "Block Pull";
  if (strcmp (type, "mirror") == 0)
    return "Block Copy";
  if (strcmp (type, "commit") == 0)
    return "Block Commit";
  if (strcmp (type, "backup") == 0)
    return "Backup";
  return "Unknown job";
}

/* Percent done with virsh's rounding: truncated to two decimals, never
 * 100 before the end.  A job whose length is not known yet (len 0) has
 * done nothing, not everything. */
static double
job_percent (json_int_t offset, json_int_t len)
{
  double p;

  if (len <= 0 || offset <= 0)
    return 0;
  if (offset >= len)
    return 100;
  p = (json_int_t) (offset * 10000.0 / len) / 100.0;
  return p > 99.99 ? 99.99 : p;
}

static void
human_rate (double bps, char *buf, size_t len)
{
  human_size ((json_int_t) bps, buf, len);
  strncat (buf, "/s", len - strlen (buf) - 1);
}

static int
terminal_columns (void)
{
  struct winsize ws;

  if (ioctl (STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 40)
    return ws.ws_col;
  return 80;
}

/* The bar, in place: "\rBlock Pull: [####....]  45.00 %  1 MiB/s  0:00:27
 * left", cleared to the end of the line. */
static void
job_draw_bar (struct job_wait *w, double pct)
{
  char rate[32] = "", left[32] = "--:--:--";
  int width = terminal_columns () - (int) strlen (w->label) - 46, fill;

  if (width > 50)
    width = 50;
  if (width < 10)
    width = 10;
  fill = (int) (pct * width / 100);
  if (w->rate > 0) {
    long secs = (long) ((w->len - w->offset) / w->rate);
    human_rate (w->rate, rate, sizeof rate);
    snprintf (left, sizeof left, "%ld:%02ld:%02ld", secs / 3600,
              secs / 60 % 60, secs % 60);
  }
  else
    strcpy (rate, "-- B/s");
  fprintf (stderr, "\r%s: [%.*s%*s] %6.2f %%  %11s  %s left\033[K", w->label,
           fill, "##################################################",
           width - fill, "", pct, rate, left);
  w->drawn = true;
}

/* Show the progress: a bar on a terminal, else virsh's line, printed when
 * the percentage changed.  Nothing until the job's length is known. */
static void
job_show (struct job_wait *w, bool done)
{
  double pct = done ? 100 : job_percent (w->offset, w->len);

  if (!w->verbose || (!done && w->len <= 0))
    return;
  if (w->tty)
    job_draw_bar (w, pct);
  else if (!w->shown || pct != w->shown_pct)
    fprintf (stderr, "%s: [%5.2f %%]\n", w->label, pct);
  w->shown = true;
  w->shown_pct = pct;
  fflush (stderr);
}

/* Take in a new sample of the job from query-block-jobs. */
static void
job_sample (struct job_wait *w, json_t *job)
{
  json_int_t len = json_integer_value (json_object_get (job, "len"));
  json_int_t offset = json_integer_value (json_object_get (job, "offset"));
  int64_t now = now_ms ();

  if (w->len > 0 && len == w->len && now - w->sample_ms >= 200) {
    double inst = (offset - w->offset) * 1000.0 / (now - w->sample_ms);
    w->rate = w->rate > 0 ? 0.7 * w->rate + 0.3 * inst : inst;
  }
  if (len != w->len || now - w->sample_ms >= 200) {
    w->sample_ms = now;
    w->offset = offset;
  }
  w->len = len;
}

/* If EV says how our job ended, that end; JOB_RUNNING otherwise. */
static enum job_end
job_event (struct job_wait *w, json_t *ev)
{
  const char *name = str (ev, "event");
  json_t *data = json_object_get (ev, "data");

  if (strcmp (str (data, "device"), w->id) != 0)
    return JOB_RUNNING;
  if (strcmp (name, "BLOCK_JOB_CANCELLED") == 0)
    return JOB_CANCELLED;
  if (strcmp (name, "BLOCK_JOB_COMPLETED") != 0)
    return JOB_RUNNING;
  if (json_object_get (data, "error")) {
    free (w->error);
    w->error = strdup (str (data, "error"));
    return JOB_FAILED;
  }
  w->len = json_integer_value (json_object_get (data, "len"));
  w->offset = json_integer_value (json_object_get (data, "offset"));
  return JOB_COMPLETED;
}

/* The end among the queued events, which are dropped. */
static enum job_end
job_drain_events (struct job_wait *w)
{
  enum job_end end = JOB_RUNNING, e;
  size_t i;
  json_t *ev;

  json_array_foreach (event_queue, i, ev)
    if ((e = job_event (w, ev)) != JOB_RUNNING && end == JOB_RUNNING)
      end = e;
  json_array_clear (event_queue);
  return end;
}

/* Query the job.  Returns false when the daemon no longer lists it. */
static bool
job_poll (struct job_wait *w)
{
  json_t *jobs = execute ("query-block-jobs", NULL), *job;
  size_t i;
  bool found = false;

  json_array_foreach (jobs, i, job)
    if (strcmp (str (job, "device"), w->id) == 0) {
      job_sample (w, job);
      found = true;
    }
  json_decref (jobs);
  return found;
}

/* block-job-cancel; a job that is already gone is not an error here: its
 * end event tells how it ended. */
static void
job_cancel (struct job_wait *w)
{
  json_t *reply = execute_reply ("block-job-cancel",
                                 json_pack ("{s:s}", "device", w->id));
  json_t *err = json_object_get (reply, "error");

  if (err && strcmp (str (err, "class"), "DeviceNotActive") != 0) {
    fprintf (stderr, "strata: %s\n", str (err, "desc"));
    json_decref (reply);
    exit (1);
  }
  json_decref (reply);
  w->cancel_sent = true;
}

/* Wait (with SIGINT blocked except in WAITMASK's ppoll) for up to MS
 * milliseconds for a message, and queue the events. */
static void
job_listen (int ms, const sigset_t *waitmask)
{
  json_t *msg = next_message (ms < 0 ? 0 : ms, waitmask);

  if (!msg && errno == 0)
    die ("%s: the daemon closed the connection", socket_path);
  if (msg && json_object_get (msg, "event"))
    json_array_append (event_queue, msg);
  json_decref (msg);
}

/* Whether it is time to cancel: SIGINT, or the --timeout ran out. */
static bool
job_should_cancel (struct job_wait *w)
{
  return !w->cancel_sent
         && (interrupted > w->interrupts
             || (w->deadline && now_ms () >= w->deadline));
}

/* Follow job W to its end, cancelling it on SIGINT or at the deadline.
 * With async, or on a second SIGINT, stop waiting once the cancel is
 * sent.  SIGINT must be blocked; WAITMASK unblocks it. */
static enum job_end
job_wait (struct job_wait *w, const sigset_t *waitmask)
{
  int64_t next_poll = 0;
  enum job_end end;

  for (;;) {
    if ((end = job_drain_events (w)) != JOB_RUNNING)
      return end;
    if (job_should_cancel (w)) {
      w->interrupts = interrupted;
      job_cancel (w);
      if (w->async)
        return JOB_CANCELLED;
    }
    else if (w->cancel_sent && interrupted > w->interrupts)
      return JOB_CANCELLED;
    if (now_ms () >= next_poll) {
      bool present = job_poll (w);
      if ((end = job_drain_events (w)) != JOB_RUNNING)
        return end;
      /* Gone without an event (a daemon that sends none): give the event
       * a poll's time to arrive, then take the disappearance as the end. */
      if (!present && ++w->absent_polls >= 2)
        return w->cancel_sent ? JOB_CANCELLED : JOB_COMPLETED;
      if (present)
        job_show (w, false);
      next_poll = now_ms () + JOB_POLL_MS;
    }
    int64_t until = next_poll;
    if (w->deadline && !w->cancel_sent && w->deadline < until)
      until = w->deadline;
    job_listen ((int) (until - now_ms ()), waitmask);
  }
}

/* Block SIGINT (it is seen in job_wait's ppoll only) and count it. */
static void
catch_sigint (sigset_t *waitmask)
{
  struct sigaction sa = { .sa_handler = on_sigint };
  sigset_t block;

  sigemptyset (&block);
  sigaddset (&block, SIGINT);
  sigprocmask (SIG_BLOCK, &block, waitmask);
  sigdelset (waitmask, SIGINT);
  sigaction (SIGINT, &sa, NULL);
}

static int
cmd_pull (int argc, char **argv)
{
  static const struct option longopts[] = {
    { "base", required_argument, NULL, 'b' },
    { "bandwidth", required_argument, NULL, 'r' },
    { "bytes", no_argument, NULL, 'B' },
    { "wait", no_argument, NULL, 'w' },
    { "verbose", no_argument, NULL, 'v' },
    { "timeout", required_argument, NULL, 't' },
    { "async", no_argument, NULL, 'a' },
    { NULL, 0, NULL, 0 },
  };
  struct job_wait w = { .label = "Block Pull" };
  const char *base = NULL, *rate = NULL, *timeout = NULL;
  bool bytes = false, wait = false;
  json_int_t speed = 0;
  sigset_t waitmask;
  json_t *args;
  enum job_end end;
  int c;

  optind = 0;
  while ((c = getopt_long (argc, argv, "", longopts, NULL)) != -1) {
    switch (c) {
    case 'b': base = optarg; break;
    case 'r': rate = optarg; break;
    case 'B': bytes = true; break;
    case 'w': wait = true; break;
    case 'v': w.verbose = true; break;
    case 't': timeout = optarg; break;
    case 'a': w.async = true; break;
    default: exit (1);
    }
  }
  if (argc - optind != 1)
    die ("usage: strata pull NODE [--base NODE] [--bandwidth RATE [--bytes]] "
         "[--wait [--verbose] [--timeout S] [--async]]");
  if (!wait && (w.verbose || timeout || w.async))
    die ("pull: --%s needs --wait",
         w.verbose ? "verbose" : timeout ? "timeout" : "async");
  if (bytes && !rate)
    die ("pull: --bytes needs --bandwidth");
  if (rate)
    speed = parse_rate ("pull", rate, bytes);
  if (timeout)
    w.deadline = now_ms () + parse_timeout ("pull", timeout);
  w.id = argv[optind];
  w.tty = isatty (STDERR_FILENO);

  args = json_pack ("{s:s,s:s}", "job-id", w.id, "device", w.id);
  if (base)
    json_object_set_new (args, "base-node", json_string (base));
  if (speed)
    json_object_set_new (args, "speed", json_integer (speed));
  if (!wait) {
    json_decref (execute ("block-stream", args));
    printf ("Block Pull started\n");
    return 0;
  }
  /* From here on events are kept and SIGINT cancels the job. */
  event_queue = json_array ();
  catch_sigint (&waitmask);
  json_decref (execute ("block-stream", args));
  end = job_wait (&w, &waitmask);
  if (end == JOB_COMPLETED)
    job_show (&w, true);
  if (w.drawn)
    fputc ('\n', stderr);
  if (end == JOB_FAILED && w.error)
    fprintf (stderr, "strata: %s: %s\n", w.id, w.error);
  printf ("%s\n", end == JOB_COMPLETED   ? "Pull complete"
                  : end == JOB_CANCELLED ? "Pull aborted"
                                         : "Pull failed");
  free (w.error);
  json_decref (event_queue);
  return end == JOB_COMPLETED ? 0 : 1;
}

/* "45.00 %", or "-" while the length is not known. */
static void
format_progress (json_t *job, char *buf, size_t len)
{
  json_int_t total = json_integer_value (json_object_get (job, "len"));
  json_int_t done = json_integer_value (json_object_get (job, "offset"));

  if (total <= 0)
    snprintf (buf, len, "-");
  else
    snprintf (buf, len, "%.2f %%", job_percent (done, total));
}

static int
cmd_jobs (int argc, char **argv)
{
  json_t *jobs, *job;
  size_t i;
  int idw = 2;

  (void) argv;
  if (argc != 1)
    die ("usage: strata jobs");
  jobs = execute ("query-block-jobs", NULL);
  if (json_output || !json_is_array (jobs)) {
    print_json (jobs);
    json_decref (jobs);
    return 0;
  }
  if (json_array_size (jobs) == 0)
    printf ("no block jobs\n");
  json_array_foreach (jobs, i, job)
    if ((int) strlen (str (job, "device")) > idw)
      idw = strlen (str (job, "device"));
  if (json_array_size (jobs))
    printf ("%-*s  %-8s  %-9s  %8s  %-24s  %s\n", idw, "ID", "TYPE",
            "STATUS", "DONE", "OFFSET/LENGTH", "SPEED");
  json_array_foreach (jobs, i, job) {
    json_int_t speed = json_integer_value (json_object_get (job, "speed"));
    char pct[32], off[16], len[16], rate[32] = "unlimited", sizes[40];

    format_progress (job, pct, sizeof pct);
    human_size (json_integer_value (json_object_get (job, "offset")), off,
                sizeof off);
    human_size (json_integer_value (json_object_get (job, "len")), len,
                sizeof len);
    snprintf (sizes, sizeof sizes, "%s / %s", off, len);
    if (speed > 0)
      human_rate (speed, rate, sizeof rate);
    printf ("%-*s  %-8s  %-9s  %8s  %-24s  %s\n", idw, str (job, "device"),
            str (job, "type"), str (job, "status"), pct, sizes, rate);
  }
  json_decref (jobs);
  return 0;
}

/* virsh blockjob --info: "Block Pull: [ 45.00 %]" and the bandwidth. */
static int
job_info (const char *id)
{
  json_t *jobs = execute ("query-block-jobs", NULL), *job, *found = NULL;
  size_t i;

  json_array_foreach (jobs, i, job)
    if (strcmp (str (job, "device"), id) == 0)
      found = job;
  if (json_output)
    print_json (found ? found : json_null ());
  else if (!found)
    printf ("No current block job for %s\n", id);
  else {
    json_int_t speed = json_integer_value (json_object_get (found, "speed"));
    printf ("%s: [%5.2f %%]", job_label (str (found, "type")),
            job_percent (json_integer_value (json_object_get (found,
                                                              "offset")),
                         json_integer_value (json_object_get (found, "len"))));
    if (speed > 0) {
      const char *unit;
      double v = scale_binary (speed, &unit);
      printf ("    Bandwidth limit: %lld bytes/s (%-.3f %s/s)",
              (long long) speed, v, unit);
    }
    printf ("\n");
  }
  json_decref (jobs);
  return 0;
}

/* blockjob --abort: cancel, then (unless ASYNC) wait for the job to end. */
static int
job_abort (const char *id, bool async)
{
  struct job_wait w = { .id = id, .label = "", .cancel_sent = true };
  sigset_t waitmask;

  event_queue = json_array ();
  catch_sigint (&waitmask);
  json_decref (execute ("block-job-cancel", json_pack ("{s:s}", "device",
                                                       id)));
  if (!async)
    job_wait (&w, &waitmask);
  free (w.error);
  json_decref (event_queue);
  return 0;
}

static int
cmd_job (int argc, char **argv)
{
  static const struct option longopts[] = {
    { "abort", no_argument, NULL, 'A' },
    { "async", no_argument, NULL, 'a' },
    { "info", no_argument, NULL, 'i' },
    { "bandwidth", required_argument, NULL, 'r' },
    { "bytes", no_argument, NULL, 'B' },
    { NULL, 0, NULL, 0 },
  };
  bool abort_job = false, async = false, info = false, bytes = false;
  const char *rate = NULL;
  json_int_t speed;
  int c;

  optind = 0;
  while ((c = getopt_long (argc, argv, "", longopts, NULL)) != -1) {
    switch (c) {
    case 'A': abort_job = true; break;
    case 'a': async = abort_job = true; break;
    case 'i': info = true; break;
    case 'r': rate = optarg; break;
    case 'B': bytes = true; break;
    default: exit (1);
    }
  }
  if (argc - optind != 1)
    die ("usage: strata job ID [--abort [--async]] [--info] "
         "[--bandwidth RATE [--bytes]]");
  if (abort_job + info + !!rate > 1)
    die ("job: --abort, --info and --bandwidth exclude each other");
  if (bytes && !rate)
    die ("job: --bytes needs --bandwidth");
  if (rate) {
    speed = parse_rate ("job", rate, bytes);
    json_decref (execute ("block-job-set-speed",
                          json_pack ("{s:s,s:I}", "device", argv[optind],
                                     "speed", speed)));
    return 0;
  }
  if (abort_job)
    return job_abort (argv[optind], async);
  return job_info (argv[optind]);
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
    { "raw", cmd_raw },       { "pull", cmd_pull },     { "jobs", cmd_jobs },
    { "job", cmd_job },
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
