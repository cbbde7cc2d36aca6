/* strata-nbd: serve an image over NBD, with qemu-nbd's common options.
 *
 *   strata-nbd [-f FMT] [-x NAME] [-D DESC] (-k SOCKET | [-b ADDR] [-p PORT])
 *              [-r] [-t] [-e N] [-A] [-n] [--cache MODE] [--discard MODE]
 *              [--detect-zeroes off|on|unmap] [--fork] [--pid-file FILE]
 *              [-U] [--copy-on-read] FILE
 *
 * The command line behaves as qemu-nbd 7.2's, messages and exit codes
 * included (tests/integration/test_nbd_parity.py runs both): options are
 * checked as they come, then the argument count; the server listens
 * before it opens the image; the PID file is written once the export
 * exists and is left behind at exit, the socket is removed.  Without -t
 * the server exits once the last client has disconnected, if that client
 * had completed the handshake (one that gave up while negotiating, such
 * as a listing or a port probe, does not end it).  Every client
 * shares the one open node, so with -e other than 1 (0: no limit) a
 * writable export advertises CAN_MULTI_CONN (a flush is global to it).
 * -U and --copy-on-read are strata's own.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <malloc.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <strata/strata.h>

#include "server.h" /* src/nbd/server.h: the NBD server module */
#include "tool-common.h"
#include "opts.h"

static const char *progname = "strata-nbd";

/* Longest export name or description (proto.md's limit). */
#define NBD_MAX_STRING 4096

enum {
  OPT_CACHE = 256,
  OPT_DISCARD,
  OPT_DETECT_ZEROES,
  OPT_FORK,
  OPT_PID_FILE,
  OPT_COPY_ON_READ
};

static void
usage (FILE *f)
{
  fprintf (
      f,
      "Usage: %s [OPTIONS] FILE\n"
      "\n"
      "  -f, --format FMT       image format; probed when absent\n"
      "  -x, --export-name NAME export name (default \"\")\n"
      "  -D, --description DESC export description\n"
      "  -k, --socket PATH      listen on a unix socket\n"
      "  -p, --port PORT        TCP port (default 10809)\n"
      "  -b, --bind ADDR        TCP address (default 0.0.0.0)\n"
      "  -r, --read-only        export read-only\n"
      "  -t, --persistent       keep serving after the last client left\n"
      "  -e, --shared N         clients at once (default 1, 0: any)\n"
      "  -A, --allocation-depth offer qemu:allocation-depth\n"
      "  -n, --nocache          --cache=none\n"
      "      --cache MODE       none, writeback (default), writethrough,\n"
      "                         directsync or unsafe\n"
      "      --discard MODE     ignore (default) or unmap\n"
      "      --detect-zeroes M  off (default), on or unmap (needs\n"
      "                         --discard=unmap): all-zero writes become\n"
      "                         write-zeroes\n"
      "      --fork             go to the background once listening\n"
      "      --pid-file FILE    write the server's PID to FILE\n"
      "  -U, --force-share      open read-only without taking locks\n"
      "      --copy-on-read     copy what reads fetch from backing\n"
      "                         files into the image (with -r too:\n"
      "                         clients still cannot write)\n"
      "  -h, --help             show this help\n"
      "  -V, --version          show the version\n",
      progname);
}

static void *
signal_thread (void *arg)
{
  struct nbd_server *srv = arg;
  sigset_t set;
  int sig;

  sigemptyset (&set);
  sigaddset (&set, SIGTERM);
  sigaddset (&set, SIGINT);
  sigaddset (&set, SIGHUP);
  if (sigwait (&set, &sig) == 0)
    nbd_server_stop (srv);
  return NULL;
}

/* What the command line asked for. */
struct nbd_cmdline {
  const char *format, *name, *desc, *sock, *port, *bind_addr, *cache;
  const char *pid_file, *filename;
  bool persistent, do_fork, force_share, copy_on_read;
  struct nbd_export_flags ef;
  unsigned shared; /* 0: no limit */
};

/* qemu-nbd's second line after a bad option: ARGV0 as the user typed it. */
static int
try_help (const char *argv0)
{
  fprintf (stderr, "%s: Try `%s --help' for more information.\n", progname,
           argv0);
  return 1;
}

/* -e N: an int in C's notation (0x10, 010), >= 0; 0 means no limit. */
static bool
parse_shared (const char *arg, unsigned *shared)
{
  char *end;
  long v;

  errno = 0;
  v = strtol (arg, &end, 0);
  if (errno || end == arg || *end || v < 0 || v > INT_MAX) {
    fprintf (stderr, "%s: Invalid shared device number '%s'\n", progname, arg);
    return false;
  }
  *shared = (unsigned)v;
  return true;
}

static bool
parse_discard (const char *arg, bool *discard)
{
  if (strcmp (arg, "unmap") == 0 || strcmp (arg, "on") == 0)
    *discard = true;
  else if (strcmp (arg, "ignore") == 0 || strcmp (arg, "off") == 0)
    *discard = false;
  else {
    fprintf (stderr, "%s: Invalid discard mode `%s'\n", progname, arg);
    return false;
  }
  return true;
}

/* As qemu-nbd: unmap needs --discard=unmap given before it. */
static bool
parse_detect_zeroes (const char *arg, struct nbd_export_flags *ef)
{
  if (strcmp (arg, "off") == 0)
    ef->detect_zeroes = ZEROES_OFF;
  else if (strcmp (arg, "on") == 0)
    ef->detect_zeroes = ZEROES_ON;
  else if (strcmp (arg, "unmap") == 0)
    ef->detect_zeroes = ZEROES_UNMAP;
  else {
    fprintf (stderr,
             "%s: Failed to parse detect_zeroes mode: invalid "
             "parameter value: %s\n",
             progname, arg);
    return false;
  }
  if (ef->detect_zeroes == ZEROES_UNMAP && !ef->discard) {
    fprintf (stderr,
             "%s: setting detect-zeroes to unmap is not allowed "
             "without setting discard operation to unmap\n",
             progname);
    return false;
  }
  return true;
}

static bool
check_length (const char *what, const char *arg)
{
  if (strlen (arg) > NBD_MAX_STRING) {
    fprintf (stderr, "%s: export %s '%s' too long\n", progname, what, arg);
    return false;
  }
  return true;
}

static bool
check_cache (const char *mode)
{
  char buf[128];
  bool writethrough;

  if (!cache_mode_options (mode, NULL, buf, sizeof buf, &writethrough)) {
    fprintf (stderr, "%s: Invalid cache mode `%s'\n", progname, mode);
    return false;
  }
  return true;
}

/* One option; false when it was bad (the message is printed).  Checked
 * as it comes, in qemu-nbd's order, so the first bad one is reported. */
static bool
parse_option (int c, const char *arg, char **argv, struct nbd_cmdline *cl)
{
  switch (c) {
  case 'f': cl->format = arg; return true;
  case 'x': cl->name = arg; return check_length ("name", arg);
  case 'D': cl->desc = arg; return check_length ("description", arg);
  case 'k':
    cl->sock = arg;
    if (arg[0] != '/') {
      fprintf (stderr, "%s: socket path must be absolute\n", progname);
      return false;
    }
    return true;
  case 'p': cl->port = arg; return true;
  case 'b': cl->bind_addr = arg; return true;
  case 'r': cl->ef.writable = false; return true;
  case 't': cl->persistent = true; return true;
  case 'e': return parse_shared (arg, &cl->shared);
  case 'A': cl->ef.allocation_depth = true; return true;
  case 'U': cl->force_share = true; return true;
  case 'n': arg = "none"; /* fall through */
  case OPT_CACHE: cl->cache = arg; return check_cache (arg);
  case OPT_DISCARD: return parse_discard (arg, &cl->ef.discard);
  case OPT_DETECT_ZEROES: return parse_detect_zeroes (arg, &cl->ef);
  case OPT_FORK: cl->do_fork = true; return true;
  case OPT_PID_FILE: cl->pid_file = arg; return true;
  case OPT_COPY_ON_READ: cl->copy_on_read = true; return true;
  default:
    /* getopt has said what was wrong. */
    try_help (argv[0]);
    return false;
  }
}

/* Exit status: -1 to go on serving, else exit with it. */
static int
parse_cmdline (int argc, char **argv, struct nbd_cmdline *cl)
{
  static const struct option long_options[] = {
    { "format", required_argument, NULL, 'f' },
    { "export-name", required_argument, NULL, 'x' },
    { "description", required_argument, NULL, 'D' },
    { "socket", required_argument, NULL, 'k' },
    { "port", required_argument, NULL, 'p' },
    { "bind", required_argument, NULL, 'b' },
    { "read-only", no_argument, NULL, 'r' },
    { "persistent", no_argument, NULL, 't' },
    { "shared", required_argument, NULL, 'e' },
    { "allocation-depth", no_argument, NULL, 'A' },
    { "force-share", no_argument, NULL, 'U' },
    { "nocache", no_argument, NULL, 'n' },
    { "cache", required_argument, NULL, OPT_CACHE },
    { "discard", required_argument, NULL, OPT_DISCARD },
    { "detect-zeroes", required_argument, NULL, OPT_DETECT_ZEROES },
    { "fork", no_argument, NULL, OPT_FORK },
    { "pid-file", required_argument, NULL, OPT_PID_FILE },
    { "copy-on-read", no_argument, NULL, OPT_COPY_ON_READ },
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' },
    { NULL, 0, NULL, 0 },
  };
  int c;

  while ((c = getopt_long (argc, argv, "f:x:D:k:p:b:rte:AUnhV", long_options,
                           NULL))
         != -1) {
    if (c == 'h') {
      usage (stdout);
      return 0;
    }
    if (c == 'V') {
      printf ("strata-nbd version %s\n", strata_version ());
      return 0;
    }
    if (!parse_option (c, optarg, argv, cl))
      return 1;
  }
  if (optind != argc - 1) {
    fprintf (stderr,
             "%s: Invalid number of arguments\n"
             "Try `%s --help' for more information.\n",
             progname, argv[0]);
    return 1;
  }
  cl->filename = argv[optind];
  if (cl->force_share && cl->ef.writable) {
    fprintf (stderr, "%s: --force-share requires --read-only\n", progname);
    return 1;
  }
  if (cl->copy_on_read && cl->force_share) {
    fprintf (stderr,
             "%s: --copy-on-read writes to the image and cannot be "
             "used with --force-share\n",
             progname);
    return 1;
  }
  return -1;
}

/* Listen before opening the image, as qemu-nbd does, with its messages. */
static bool
listen_cmdline (struct nbd_server *srv, const struct nbd_cmdline *cl)
{
  const char *host = cl->bind_addr ? cl->bind_addr : "0.0.0.0";
  struct addrinfo hints = { .ai_family = AF_UNSPEC,
                            .ai_socktype = SOCK_STREAM,
                            .ai_flags = AI_PASSIVE };
  struct sockaddr_un sun;
  struct addrinfo *res;
  strata_error *err = NULL;
  int r, e;

  if (cl->sock) {
    if (strlen (cl->sock) >= sizeof sun.sun_path) {
      fprintf (stderr,
               "%s: UNIX socket path '%s' is too long\n"
               "Path must be less than %zu bytes\n",
               progname, cl->sock, sizeof sun.sun_path);
      return false;
    }
    if (nbd_server_listen_unix (srv, cl->sock, &err))
      return true;
    fprintf (stderr, "%s: Failed to bind socket to %s: %s\n", progname,
             cl->sock, strerror (strata_error_errno (err)));
    strata_error_free (err);
    return false;
  }
  r = getaddrinfo (host, cl->port, &hints, &res);
  if (r != 0) {
    fprintf (stderr, "%s: address resolution failed for %s:%s: %s\n", progname,
             host, cl->port, gai_strerror (r));
    return false;
  }
  freeaddrinfo (res);
  if (nbd_server_listen_tcp (srv, host, cl->port, &err))
    return true;
  e = strata_error_errno (err);
  fprintf (stderr, "%s: %s: %s\n", progname,
           e == EADDRINUSE ? "Failed to find an available port"
                           : "Failed to bind socket",
           strerror (e));
  strata_error_free (err);
  return false;
}

/* qemu's raw driver warns when writes to a probed raw image are limited. */
static void
warn_probed_raw (strata_node *node, const struct nbd_cmdline *cl)
{
  if (!cl->format && cl->ef.writable)
    tool_warn_probed_raw (node, cl->filename);
}

static bool
write_pid_file (const char *path)
{
  FILE *f = fopen (path, "w");

  if (!f || fprintf (f, "%ld\n", (long)getpid ()) < 0 || fclose (f)) {
    fprintf (stderr, "%s: Could not create '%s': %s\n", progname, path,
             strerror (errno));
    return false;
  }
  return true;
}

/* With --fork the parent waits on a pipe for "listening" and exits 0 then,
 * 1 if the child closed it first.  Before any thread exists.  Returns in
 * the child (or without --fork) with the write end in *READY_FD. */
static int
fork_server (int *ready_fd)
{
  int p[2];
  pid_t pid;
  char b;

  if (pipe (p) < 0) {
    perror ("pipe");
    return 1;
  }
  pid = fork ();
  if (pid < 0) {
    perror ("fork");
    return 1;
  }
  if (pid > 0) {
    close (p[1]);
    return read (p[0], &b, 1) == 1 ? 0 : 1;
  }
  close (p[0]);
  setsid ();
  *ready_fd = p[1];
  return -1;
}

/* Tell the parent we listen, and let whoever waits on our output see EOF,
 * as qemu-nbd does. */
static void
detach (int ready_fd)
{
  char ready = 1;

  if (write (ready_fd, &ready, 1) != 1) {
    /* The parent is gone; serve anyway. */
  }
  close (ready_fd);
  tool_stdio_to_null ();
}

static strata_node *
open_image (struct nbd_cmdline *cl)
{
  unsigned oflags = cl->ef.writable ? STRATA_OPEN_RDWR : 0;
  strata_error *err = NULL;
  strata_node *node;
  char cacheopts[128];

  cache_mode_options (cl->cache, cl->format, cacheopts, sizeof cacheopts,
                      &cl->ef.writethrough);
  if (cl->force_share)
    oflags |= STRATA_OPEN_FORCE_SHARE;
  /* The image takes the copies even when clients may not write. */
  if (cl->copy_on_read)
    oflags |= STRATA_OPEN_RDWR | STRATA_OPEN_COPY_ON_READ;
  node = strata_open (cl->filename, cl->format, cacheopts, oflags, &err);
  if (!node) {
    fprintf (stderr, "%s: Failed to blk_new_open '%s': %s\n", progname,
             cl->filename, strata_error_message (err));
    strata_error_free (err);
  }
  return node;
}

/* Listen, open, export; then serve until the last client left (or a
 * signal, with -t). */
static int
serve (struct nbd_cmdline *cl, int ready_fd)
{
  struct nbd_server *srv;
  strata_node *node = NULL;
  strata_error *err = NULL;
  pthread_t sigthr;
  bool listening = false;
  int ret = 1;

  srv = nbd_server_new ();
  if (!srv) {
    fprintf (stderr, "%s: cannot start the server\n", progname);
    return 1;
  }
  nbd_server_set_limits (srv, cl->shared, cl->persistent);
  if (!listen_cmdline (srv, cl))
    goto out;
  listening = true;
  node = open_image (cl);
  if (!node)
    goto out;
  warn_probed_raw (node, cl);
  cl->ef.multi_conn = cl->shared != 1;
  if (!nbd_server_add_export (srv, cl->name, cl->desc, node, &cl->ef, &err)) {
    fprintf (stderr, "%s: %s\n", progname, strata_error_message (err));
    strata_error_free (err);
    goto out;
  }
  if (cl->pid_file && !write_pid_file (cl->pid_file))
    goto out;
  if (pthread_create (&sigthr, NULL, signal_thread, srv) != 0) {
    fprintf (stderr, "%s: cannot start the signal thread\n", progname);
    goto out;
  }
  if (ready_fd >= 0)
    detach (ready_fd);

  nbd_server_run (srv);
  /* sigwait() is a cancellation point: no stop after the free. */
  pthread_cancel (sigthr);
  pthread_join (sigthr, NULL);
  ret = 0;
out:
  nbd_server_free (srv);
  if (node) {
    if (ret == 0 && cl->ef.writable)
      strata_flush (node, 0);
    strata_close (node);
  }
  if (cl->sock && listening)
    unlink (cl->sock);
  return ret;
}

int
main (int argc, char **argv)
{
  struct nbd_cmdline cl = {
    .name = "",
    .port = "10809",
    .cache = "writeback",
    .shared = 1,
    .ef = { .writable = true },
  };
  int ready_fd = -1, r;
  sigset_t set;

  /* One malloc arena for every thread: with one per thread (16 workers,
   * a reader and a writer per connection) each keeps the request and
   * reply buffers it once held, and a mixed load's peak RSS was 31 MiB
   * against qemu-nbd's 20; with one it is 18.  The threads mostly take
   * turns (few run at once on a host's cores), so the shared lock costs
   * no measurable throughput. */
  mallopt (M_ARENA_MAX, 1);
  r = parse_cmdline (argc, argv, &cl);
  if (r >= 0)
    return r;
  /* Fork before any thread exists; the parent waits for "listening". */
  if (cl.do_fork) {
    r = fork_server (&ready_fd);
    if (r >= 0)
      return r;
  }

  /* Signals go to one thread, which stops the server. */
  sigemptyset (&set);
  sigaddset (&set, SIGTERM);
  sigaddset (&set, SIGINT);
  sigaddset (&set, SIGHUP);
  pthread_sigmask (SIG_BLOCK, &set, NULL);
  signal (SIGPIPE, SIG_IGN);

  return serve (&cl, ready_fd);
}
