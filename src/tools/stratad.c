/* stratad: the storage daemon.  It owns images while they are in use and
 * is driven over QMP on unix sockets, with qemu-storage-daemon's command
 * line where it applies:
 *
 *   stratad [--blockdev JSON|KEY=VALUE,...]...
 *           [--chardev socket,id=ID,path=PATH,server=on,wait=off
 *            --monitor chardev=ID]... [--qmp PATH]
 *           [--pidfile PATH] [--daemonize]
 *
 * Without a monitor it listens on the default path (see
 * strata_default_socket()).  SIGTERM, SIGINT and the quit command stop it:
 * images are flushed and closed, the socket files and the pidfile removed,
 * and it exits 0.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "control.h" /* src/control/control.h */
#include "tool-common.h"
#include "cleanup.h"

#define MAX_SOCKETS 16

struct chardev {
  char *id;
  char *path;
  bool used;
};

struct options {
  struct chardev chardevs[MAX_SOCKETS];
  int nchardevs;
  const char *sockets[MAX_SOCKETS];
  int nsockets;
  /* --blockdev, --nbd-server and --export, run in command-line order as
   * qemu-storage-daemon does. */
  struct {
    const char *option, *arg;
  } cmds[64];
  int ncmds;
  const char *pidfile;
  bool daemonize;
};

static void
usage (FILE *f)
{
  fprintf (f,
"Usage: stratad [OPTIONS]\n"
"The strata storage daemon: owns images and serves QMP on unix sockets.\n"
"\n"
"  --blockdev JSON|KEY=VALUE,...   add a block node (as blockdev-add)\n"
"  --chardev socket,id=ID,path=PATH,server=on,wait=off\n"
"                                  a listening unix socket\n"
"  --monitor chardev=ID            serve QMP on that socket\n"
"  --qmp PATH                      shorthand for the two above\n"
"  --pidfile PATH                  write the daemon's PID there\n"
"  --daemonize                     detach once the sockets listen\n"
"  --nbd-server addr.type=unix,addr.path=PATH[,max-connections=N]\n"
"  --nbd-server addr.type=inet,addr.host=HOST,addr.port=PORT[,...]\n"
"                                  start the NBD server (as nbd-server-start)\n"
"  --export [type=]nbd,id=ID,node-name=NODE[,name=NAME][,writable=on|off]\n"
"           [,description=TEXT][,allocation-depth=on|off]\n"
"                                  export a node over NBD (as block-export-add;\n"
"                                  needs --nbd-server first)\n"
"  -h, --help                      this help\n"
"  -V, --version                   the version\n"
"\n"
"Without a monitor, QMP is served on %s.\n",
           "$XDG_RUNTIME_DIR/strata/stratad.sock (or /run/strata/ for root,\n"
           "/tmp/strata-$UID/ otherwise)");
}

static void __attribute__ ((noreturn, format (printf, 1, 2)))
die (const char *fmt, ...)
{
  va_list ap;

  fprintf (stderr, "stratad: ");
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fprintf (stderr, "\n");
  exit (1);
}

/* The default socket path, shared with the strata client: malloc'd. */
static char *
default_socket (void)
{
  char *path = qmp_default_socket_path ();

  if (!path)
    die ("out of memory");
  return path;
}

/* "socket,id=ID,path=PATH,server=on,wait=off" */
static void
parse_chardev (struct options *o, const char *arg)
{
  char *copy = strdup (arg), *save = NULL, *item;
  struct chardev *cd;
  bool first = true, server = false;

  if (o->nchardevs == MAX_SOCKETS)
    die ("--chardev: at most %d", MAX_SOCKETS);
  cd = &o->chardevs[o->nchardevs];
  for (item = strtok_r (copy, ",", &save); item;
       item = strtok_r (NULL, ",", &save), first = false) {
    char *eq = strchr (item, '=');
    const char *val = eq ? eq + 1 : "";
    if (eq)
      *eq = '\0';
    if ((first && !eq) || strcmp (item, "backend") == 0) {
      if (strcmp (eq ? val : item, "socket") != 0)
        die ("--chardev: only the 'socket' backend is supported");
    }
    else if (strcmp (item, "id") == 0)
      cd->id = strdup (val);
    else if (strcmp (item, "path") == 0)
      cd->path = strdup (val);
    else if (strcmp (item, "server") == 0)
      server = strcmp (val, "on") == 0 || strcmp (val, "") == 0;
    else if (strcmp (item, "wait") == 0) {
      if (strcmp (val, "off") != 0)
        die ("--chardev: only wait=off is supported");
    }
    else
      die ("--chardev: unknown option '%s'", item);
  }
  free (copy);
  if (!cd->id || !cd->path)
    die ("--chardev: id= and path= are required");
  if (!server)
    die ("--chardev: only server=on (a listening socket) is supported");
  for (int i = 0; i < o->nchardevs; i++)
    if (strcmp (o->chardevs[i].id, cd->id) == 0)
      die ("--chardev: duplicate ID '%s'", cd->id);
  o->nchardevs++;
}

/* "chardev=ID[,mode=control][,pretty=off]" */
static void
parse_monitor (struct options *o, const char *arg)
{
  char *copy = strdup (arg), *save = NULL, *item;
  const char *id = NULL;

  for (item = strtok_r (copy, ",", &save); item;
       item = strtok_r (NULL, ",", &save)) {
    char *eq = strchr (item, '=');
    const char *val = eq ? eq + 1 : "";
    if (eq)
      *eq = '\0';
    if (strcmp (item, "chardev") == 0)
      id = val;
    else if (strcmp (item, "mode") == 0 && strcmp (val, "control") == 0)
      ;
    else if (strcmp (item, "pretty") == 0 && strcmp (val, "off") == 0)
      ;
    else
      die ("--monitor: unsupported option '%s'", item);
  }
  if (!id)
    die ("--monitor: chardev= is required");
  for (int i = 0; i < o->nchardevs; i++)
    if (strcmp (o->chardevs[i].id, id) == 0) {
      if (o->chardevs[i].used)
        die ("--monitor: chardev '%s' is already in use", id);
      o->chardevs[i].used = true;
      if (o->nsockets == MAX_SOCKETS)
        die ("--monitor: at most %d", MAX_SOCKETS);
      o->sockets[o->nsockets++] = o->chardevs[i].path;
      free (copy);
      return;
    }
  die ("--monitor: chardev '%s' not found (give --chardev first)", id);
}

static void
parse_args (struct options *o, int argc, char **argv)
{
  enum { O_BLOCKDEV = 256, O_CHARDEV, O_MONITOR, O_QMP, O_EXPORT, O_NBD,
         O_PIDFILE, O_DAEMONIZE };
  static const struct option longopts[] = {
    { "blockdev", required_argument, NULL, O_BLOCKDEV },
    { "chardev", required_argument, NULL, O_CHARDEV },
    { "monitor", required_argument, NULL, O_MONITOR },
    { "qmp", required_argument, NULL, O_QMP },
    { "export", required_argument, NULL, O_EXPORT },
    { "nbd-server", required_argument, NULL, O_NBD },
    { "pidfile", required_argument, NULL, O_PIDFILE },
    { "daemonize", no_argument, NULL, O_DAEMONIZE },
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' },
    { NULL, 0, NULL, 0 },
  };
  int c;

  while ((c = getopt_long_only (argc, argv, "hV", longopts, NULL)) != -1) {
    switch (c) {
    case O_BLOCKDEV:
    case O_EXPORT:
    case O_NBD:
      if (o->ncmds == 64)
        die ("at most 64 --blockdev, --nbd-server and --export options");
      o->cmds[o->ncmds].option = c == O_BLOCKDEV ? "blockdev"
                                 : c == O_EXPORT ? "export" : "nbd-server";
      o->cmds[o->ncmds++].arg = optarg;
      break;
    case O_CHARDEV:
      parse_chardev (o, optarg);
      break;
    case O_MONITOR:
      parse_monitor (o, optarg);
      break;
    case O_QMP:
      if (o->nsockets == MAX_SOCKETS)
        die ("--qmp: at most %d", MAX_SOCKETS);
      o->sockets[o->nsockets++] = optarg;
      break;
    case O_PIDFILE:
      o->pidfile = optarg;
      break;
    case O_DAEMONIZE:
      o->daemonize = true;
      break;
    case 'h':
      usage (stdout);
      exit (0);
    case 'V':
      printf ("stratad version %s\n", strata_version ());
      exit (0);
    default:
      usage (stderr);
      exit (1);
    }
  }
  if (optind < argc)
    die ("unexpected argument '%s' (see --help)", argv[optind]);
}

/* --nbd-server takes a flat SocketAddress (addr.type=unix,addr.path=P);
 * nbd-server-start the legacy one ({"type": "unix", "data": {...}}). */
static void
nbd_server_args (json_t *args)
{
  json_t *addr = json_object_get (args, "addr"), *data, *type;
  const char *key;
  json_t *v;
  void *tmp;

  if (!json_is_object (addr) || !(type = json_object_get (addr, "type")))
    return;
  data = json_object ();
  json_object_foreach_safe (addr, tmp, key, v) {
    if (strcmp (key, "type") != 0) {
      json_object_set (data, key, v);
      json_object_del (addr, key);
    }
  }
  json_object_set_new (addr, "data", data);
}

/* Run one --blockdev, --nbd-server or --export through its QMP command,
 * with the option and its argument named in any error, as
 * qemu-storage-daemon does. */
static bool
run_option (const char *option, const char *arg)
{
  const char *command = strcmp (option, "blockdev") == 0 ? "blockdev-add"
                        : strcmp (option, "export") == 0 ? "block-export-add"
                                                          : "nbd-server-start";
  const struct qmp_command *cmd = qmp_find_command (command);
  struct qmp_error err = { NULL, NULL };
  json_error_t je;
  char *errmsg = NULL;
  json_t *args, *ret;

  if (arg[0] == '{') {
    args = json_loads (arg, 0, &je);
    if (!args) {
      fprintf (stderr, "stratad: --%s %s: %s (column %d)\n", option, arg,
               je.text, je.column);
      return false;
    }
  }
  else {
    /* --export's type may be implied: "--export nbd,id=...". */
    CLEANUP_FREE char *full = NULL;
    char *a = (char *) arg;
    size_t first = strcspn (arg, ",");

    if (strcmp (option, "export") == 0 && !memchr (arg, '=', first)) {
      if (asprintf (&full, "type=%s", arg) < 0)
        die ("out of memory");
      a = full;
    }
    args = qmp_keyval_parse (&a, 1, &errmsg);
    if (!args) {
      fprintf (stderr, "stratad: --%s %s: %s\n", option, arg, errmsg);
      free (errmsg);
      return false;
    }
  }
  if (strcmp (option, "nbd-server") == 0)
    nbd_server_args (args);
  ret = cmd->fn (args, &err);
  json_decref (args);
  if (!ret) {
    /* The command line names the flat address: addr.path, not
     * addr.data.path. */
    char *p = err.desc ? strstr (err.desc, "'addr.data.") : NULL;
    if (p)
      memmove (p + 6, p + 11, strlen (p + 11) + 1);
    fprintf (stderr, "stratad: --%s %s: %s\n", option, arg,
             err.desc ? err.desc : "failed");
    qmp_error_clear (&err);
    return false;
  }
  json_decref (ret);
  return true;
}

/* mkdir -p of PATH's directory, private to us, for the default socket. */
static void
make_socket_dir (const char *path)
{
  char *dir = strdup (path), *slash;

  for (slash = strchr (dir + 1, '/'); slash; slash = strchr (slash + 1, '/')) {
    *slash = '\0';
    if (mkdir (dir, 0700) < 0 && errno != EEXIST)
      die ("%s: %s", dir, strerror (errno));
    *slash = '/';
  }
  free (dir);
}

/* --daemonize: fork; the parent waits on a pipe until the child says its
 * sockets listen (or dies), then exits with the child's verdict. */
static int
daemonize (void)
{
  int fds[2];
  pid_t pid;
  char status;

  if (pipe2 (fds, O_CLOEXEC) < 0)
    die ("pipe: %s", strerror (errno));
  pid = fork ();
  if (pid < 0)
    die ("fork: %s", strerror (errno));
  if (pid > 0) {
    close (fds[1]);
    if (read (fds[0], &status, 1) != 1)
      _exit (1);  /* the child failed and said why on stderr */
    _exit (status == 0 ? 0 : 1);
  }
  close (fds[0]);
  if (setsid () < 0)
    die ("setsid: %s", strerror (errno));
  return fds[1];
}

static void
daemon_ready (int fd)
{
  char ok = 0;

  tool_stdio_to_null ();
  if (write (fd, &ok, 1) != 1) {
    /* The parent is gone; nothing to tell. */
  }
  close (fd);
}

static bool
write_pidfile (const char *path)
{
  FILE *f = fopen (path, "w");

  if (!f) {
    fprintf (stderr, "stratad: %s: %s\n", path, strerror (errno));
    return false;
  }
  fprintf (f, "%d\n", (int) getpid ());
  if (fclose (f) != 0) {
    fprintf (stderr, "stratad: %s: %s\n", path, strerror (errno));
    unlink (path);
    return false;
  }
  return true;
}

int
main (int argc, char **argv)
{
  struct options o = { .nchardevs = 0 };
  struct qmp_server *srv;
  char *errmsg = NULL, *fallback = NULL;
  int ready_fd = -1;
  bool ok = true, pid_written = false;

  parse_args (&o, argc, argv);
  for (int i = 0; i < o.nchardevs; i++)
    if (!o.chardevs[i].used)
      die ("--chardev '%s' has no --monitor", o.chardevs[i].id);
  if (o.nsockets == 0) {
    fallback = default_socket ();
    make_socket_dir (fallback);
    o.sockets[o.nsockets++] = fallback;
  }
  if (o.daemonize)
    ready_fd = daemonize ();

  /* Before any thread: the server blocks SIGTERM/SIGINT for signalfd. */
  srv = qmp_server_new (&errmsg);
  if (!srv)
    die ("%s", errmsg);
  for (int i = 0; ok && i < o.ncmds; i++)
    ok = run_option (o.cmds[i].option, o.cmds[i].arg);
  /* The pidfile is whole before a socket exists: whoever waits for the
   * socket may read it at once. */
  if (ok && o.pidfile)
    ok = pid_written = write_pidfile (o.pidfile);
  for (int i = 0; ok && i < o.nsockets; i++)
    if (!qmp_server_listen (srv, o.sockets[i], &errmsg)) {
      fprintf (stderr, "stratad: %s\n", errmsg);
      free (errmsg);
      ok = false;
    }
  if (ok) {
    if (ready_fd >= 0)
      daemon_ready (ready_fd);
    qmp_server_run (srv);
  }

  qmp_job_shutdown ();
  qmp_export_shutdown ();
  qmp_block_shutdown ();
  qmp_server_free (srv);
  if (pid_written)
    unlink (o.pidfile);
  free (fallback);
  for (int i = 0; i < o.nchardevs; i++) {
    free (o.chardevs[i].id);
    free (o.chardevs[i].path);
  }
  return ok ? 0 : 1;
}
