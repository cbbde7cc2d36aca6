/* strata-nbd: serve an image over NBD, with qemu-nbd's common options.
 *
 *   strata-nbd [-f FMT] [-x NAME] [-D DESC] (-k SOCKET | [-b ADDR] [-p PORT])
 *              [-r] [-t] [-e N] [-A] [--cache MODE] [--discard MODE]
 *              [--detect-zeroes off|on|unmap] [--fork] [--pid-file FILE] [-U] FILE
 *
 * Without -t the server exits once the last client has disconnected, as
 * qemu-nbd does.  Every client shares the one open node, so a writable
 * export with -e > 1 advertises CAN_MULTI_CONN (a flush is global to it).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <strata/strata.h>

#include "nbd/server.h"
#include "util/opts.h"

static const char *progname = "strata-nbd";

static void
usage (FILE *f)
{
  fprintf (f,
    "Usage: %s [OPTIONS] FILE\n"
    "\n"
    "  -f, --format FMT       image format; probed when absent\n"
    "  -x, --export-name NAME export name (default \"\")\n"
    "  -D, --description DESC export description\n"
    "  -k, --socket PATH      listen on a unix socket\n"
    "  -p, --port PORT        TCP port (default 10809)\n"
    "  -b, --bind ADDR        TCP address (default all)\n"
    "  -r, --read-only        export read-only\n"
    "  -t, --persistent       keep serving after the last client left\n"
    "  -e, --shared N         clients at once (default 1)\n"
    "  -A, --allocation-depth offer qemu:allocation-depth\n"
    "      --cache MODE       none, writeback (default), writethrough,\n"
    "                         directsync or unsafe\n"
    "      --discard MODE     ignore (default) or unmap\n"
    "      --detect-zeroes M  off (default), on or unmap (needs\n"
    "                         --discard=unmap): all-zero writes become\n"
    "                         write-zeroes\n"
    "      --fork             go to the background once listening\n"
    "      --pid-file FILE    write the server's PID to FILE\n"
    "  -U, --force-share      open read-only without taking locks\n"
    "      --copy-on-read     copy what reads fetch from backing files into\n"
    "                         the image (with -r too: clients still cannot\n"
    "                         write)\n"
    "  -h, --help             show this help\n", progname);
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

int
main (int argc, char **argv)
{
  enum { OPT_CACHE = 256, OPT_DISCARD, OPT_DETECT_ZEROES, OPT_FORK,
         OPT_PID_FILE, OPT_COPY_ON_READ };
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
    { "cache", required_argument, NULL, OPT_CACHE },
    { "discard", required_argument, NULL, OPT_DISCARD },
    { "detect-zeroes", required_argument, NULL, OPT_DETECT_ZEROES },
    { "fork", no_argument, NULL, OPT_FORK },
    { "pid-file", required_argument, NULL, OPT_PID_FILE },
    { "copy-on-read", no_argument, NULL, OPT_COPY_ON_READ },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  const char *format = NULL, *name = "", *desc = NULL, *sock = NULL;
  const char *port = "10809", *bind_addr = NULL, *cache = "writeback";
  const char *pid_file = NULL;
  bool persistent = false, do_fork = false, force_share = false;
  bool copy_on_read = false;
  struct nbd_export_flags ef = { .writable = true };
  unsigned shared = 1;
  unsigned oflags = STRATA_OPEN_RDWR;
  char cacheopts[128], ready = 1;
  int c, ready_pipe[2] = { -1, -1 };
  strata_node *node;
  strata_error *err = NULL;
  struct nbd_server *srv;
  sigset_t set;
  pthread_t sigthr;

  while ((c = getopt_long (argc, argv, "f:x:D:k:p:b:rte:AUh", long_options,
                           NULL)) != -1) {
    switch (c) {
    case 'f': format = optarg; break;
    case 'x': name = optarg; break;
    case 'D': desc = optarg; break;
    case 'k': sock = optarg; break;
    case 'p': port = optarg; break;
    case 'b': bind_addr = optarg; break;
    case 'r': ef.writable = false; break;
    case 't': persistent = true; break;
    case 'e': {
      char *end;
      unsigned long v;
      errno = 0;
      v = strtoul (optarg, &end, 10);
      if (errno || *end || v < 1 || v > 1024) {
        fprintf (stderr, "%s: Invalid shared device number '%s'\n",
                 progname, optarg);
        return 1;
      }
      shared = (unsigned) v;
      break;
    }
    case 'A': ef.allocation_depth = true; break;
    case 'U': force_share = true; break;
    case OPT_CACHE: cache = optarg; break;
    case OPT_DISCARD:
      if (strcmp (optarg, "unmap") == 0 || strcmp (optarg, "on") == 0)
        ef.discard = true;
      else if (strcmp (optarg, "ignore") == 0 || strcmp (optarg, "off") == 0)
        ef.discard = false;
      else {
        fprintf (stderr, "%s: Invalid discard option '%s'\n", progname,
                 optarg);
        return 1;
      }
      break;
    case OPT_DETECT_ZEROES:
      if (strcmp (optarg, "off") == 0)
        ef.detect_zeroes = ZEROES_OFF;
      else if (strcmp (optarg, "on") == 0)
        ef.detect_zeroes = ZEROES_ON;
      else if (strcmp (optarg, "unmap") == 0)
        ef.detect_zeroes = ZEROES_UNMAP;
      else {
        fprintf (stderr, "%s: Failed to parse detect_zeroes mode: invalid "
                 "parameter value: %s\n", progname, optarg);
        return 1;
      }
      break;
    case OPT_FORK: do_fork = true; break;
    case OPT_PID_FILE: pid_file = optarg; break;
    case OPT_COPY_ON_READ: copy_on_read = true; break;
    case 'h': usage (stdout); return 0;
    default: usage (stderr); return 1;
    }
  }
  if (optind != argc - 1) {
    fprintf (stderr, "%s: %s\n", progname,
             optind == argc ? "no image file given" : "too many arguments");
    return 1;
  }
  if (ef.detect_zeroes == ZEROES_UNMAP && !ef.discard) {
    fprintf (stderr, "%s: setting detect-zeroes to unmap is not allowed "
             "without setting discard operation to unmap\n", progname);
    return 1;
  }
  if (force_share && ef.writable) {
    fprintf (stderr, "%s: --force-share requires --read-only\n", progname);
    return 1;
  }
  if (!cache_mode_options (cache, format, cacheopts, sizeof cacheopts,
                           &ef.writethrough)) {
    fprintf (stderr, "%s: Invalid cache mode '%s'\n", progname, cache);
    return 1;
  }
  if (!ef.writable)
    oflags &= ~STRATA_OPEN_RDWR;
  if (force_share)
    oflags |= STRATA_OPEN_FORCE_SHARE;
  if (copy_on_read && force_share) {
    fprintf (stderr, "%s: --copy-on-read writes to the image and cannot be "
             "used with --force-share\n", progname);
    return 1;
  }
  /* The image takes the copies even when clients may not write. */
  if (copy_on_read)
    oflags |= STRATA_OPEN_RDWR | STRATA_OPEN_COPY_ON_READ;
  ef.multi_conn = shared > 1;

  /* Fork before any thread exists; the parent waits for "listening". */
  if (do_fork) {
    pid_t pid;
    if (pipe (ready_pipe) < 0) {
      perror ("pipe");
      return 1;
    }
    pid = fork ();
    if (pid < 0) {
      perror ("fork");
      return 1;
    }
    if (pid > 0) {
      char b;
      close (ready_pipe[1]);
      return read (ready_pipe[0], &b, 1) == 1 ? 0 : 1;
    }
    close (ready_pipe[0]);
    setsid ();
  }

  /* Signals go to one thread, which stops the server. */
  sigemptyset (&set);
  sigaddset (&set, SIGTERM);
  sigaddset (&set, SIGINT);
  sigaddset (&set, SIGHUP);
  pthread_sigmask (SIG_BLOCK, &set, NULL);
  signal (SIGPIPE, SIG_IGN);

  node = strata_open (argv[optind], format, cacheopts, oflags, &err);
  if (!node) {
    fprintf (stderr, "%s: Failed to blk_new_open '%s': %s\n", progname,
             argv[optind], strata_error_message (err));
    strata_error_free (err);
    return 1;
  }
  srv = nbd_server_new ();
  if (!srv) {
    fprintf (stderr, "%s: cannot start the server\n", progname);
    strata_close (node);
    return 1;
  }
  nbd_server_set_limits (srv, shared, persistent);
  if (!nbd_server_add_export (srv, name, desc, node, &ef, &err)
      || !(sock ? nbd_server_listen_unix (srv, sock, &err)
                : nbd_server_listen_tcp (srv, bind_addr, port, &err))) {
    fprintf (stderr, "%s: %s\n", progname, strata_error_message (err));
    strata_error_free (err);
    nbd_server_free (srv);
    strata_close (node);
    return 1;
  }
  if (pid_file) {
    FILE *f = fopen (pid_file, "w");
    if (!f || fprintf (f, "%ld\n", (long) getpid ()) < 0 || fclose (f)) {
      fprintf (stderr, "%s: %s: %s\n", progname, pid_file, strerror (errno));
      nbd_server_free (srv);
      strata_close (node);
      return 1;
    }
  }
  if (pthread_create (&sigthr, NULL, signal_thread, srv) != 0) {
    fprintf (stderr, "%s: cannot start the signal thread\n", progname);
    return 1;
  }
  if (do_fork) {
    if (write (ready_pipe[1], &ready, 1) != 1) {
      /* The parent is gone; serve anyway. */
    }
    close (ready_pipe[1]);
    /* Like qemu-nbd: let whoever waits on our output see EOF. */
    int null = open ("/dev/null", O_RDWR);
    if (null >= 0) {
      dup2 (null, 0);
      dup2 (null, 1);
      dup2 (null, 2);
      if (null > 2)
        close (null);
    }
  }

  nbd_server_run (srv);
  /* sigwait() is a cancellation point: no stop after the free. */
  pthread_cancel (sigthr);
  pthread_join (sigthr, NULL);
  nbd_server_free (srv);
  if (ef.writable)
    strata_flush (node, 0);
  strata_close (node);
  if (sock)
    unlink (sock);
  if (pid_file)
    unlink (pid_file);
  return 0;
}
