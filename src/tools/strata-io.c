/* strata-io: an I/O tool with qemu-io's command line and output lines.
 *
 *   strata-io [-f FMT] [-r] [-U] [-t CACHE] [-n] [-o OPTS] [-c CMD]... [FILE]
 *
 * Commands run in order from -c, or else one per line from standard
 * input; without FILE, "open" opens one.  The output lines ("read 512/512
 * bytes at offset 0", the timing line, "Pattern verification failed at
 * offset ...", the map and alloc lines) are those of qemu-io so that
 * scripts and test harnesses written for it work unchanged.  The exit
 * status is 1 when any command failed.
 *
 * qemu-io's aio_read and aio_write run here to completion before the next
 * command, so their completion lines come at once; qemu-io prints them
 * when its main loop next runs (aio_flush, or exit).  With an aio_flush
 * after each request the two print the same.
 *
 * This file has the command table, the line parser and main(); the
 * commands are in io-rw.c and io-cmds.c, the formats in io-common.c.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <strata/strata.h>

#include "tool-common.h"
#include "checked.h"
#include "clock.h"
#include "cleanup.h"
#include "opts.h"
#include "io.h"

const char *const progname = "strata-io";

static int cmd_help (struct io_ctx *io, int argc, char **argv);

struct command {
  const char *name;
  int (*fn) (struct io_ctx *io, int argc, char **argv);
  int argmin, argmax; /* qemu-io's bounds on words after the name;
                       * argmax -1: no bound */
  const char *usage;
  bool nofile; /* runs without an open image */
  bool writes; /* refused on a read-only image */
};

/* In qemu-io's order, which "help" keeps; quit is handled by the loop. */
static const struct command commands[] = {
  { "abort", cmd_abort, 0, 0,
    "abort -- simulate a program crash using abort(3)", true },
  { "aio_flush", cmd_flush, 0, 0,
    "aio_flush -- completes all outstanding aio requests" },
  { "aio_read", cmd_aio_read, 2, -1,
    "aio_read [-Ciqv] [-P pattern] off len [len..] -- asynchronously reads "
    "a number of bytes" },
  { "aio_write", cmd_aio_write, 2, -1,
    "aio_write [-Cfiquz] [-P pattern] off len [len..] -- asynchronously "
    "writes a number of bytes",
    false, true },
  { "alloc", cmd_alloc, 1, 2,
    "alloc offset [count] -- checks if offset is allocated in the file" },
  { "close", cmd_close, 0, 0, "close -- close the current open file" },
  { "discard", cmd_discard, 2, -1,
    "discard [-Cq] off len -- discards a number of bytes at a specified "
    "offset",
    false, true },
  { "flush", cmd_flush, 0, 0,
    "flush -- flush all in-core file state to disk" },
  { "help", cmd_help, 0, 1, "help [command] -- help for one or all commands",
    true },
  { "info", cmd_info, 0, 0,
    "info -- prints information about the current file" },
  { "length", cmd_length, 0, 0,
    "length -- gets the length of the current file" },
  { "map", cmd_map, 0, 0, "map  -- prints the allocated areas of a file" },
  { "open", cmd_open, 1, -1,
    "open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the "
    "file specified by path",
    true },
  { "quit", NULL, 0, 0, "quit -- exit the program", true },
  { "read", cmd_read, 2, -1,
    "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number "
    "of bytes at a specified offset" },
  { "readv", cmd_readv, 2, -1,
    "readv [-Cqv] [-P pattern] off len [len..] -- reads a number of bytes "
    "at a specified offset" },
  { "reopen", cmd_reopen, 0, -1,
    "reopen [(-r|-w)] -- reopens an image read-only or read-write" },
  { "sigraise", cmd_sigraise, 1, 1, "sigraise signal -- raises a signal",
    true },
  { "sleep", cmd_sleep, 1, 1,
    "sleep -- waits for the given value in milliseconds", true },
  { "truncate", cmd_truncate, 1, 3,
    "truncate [-m prealloc_mode] off -- truncates the current file at the "
    "given offset",
    false, true },
  { "write", cmd_write, 2, -1,
    "write [-bcCfnquz] [-P pattern | -s source_file] off len -- writes a "
    "number of bytes at a specified offset",
    false, true },
  { "writev", cmd_writev, 2, -1,
    "writev [-Cfq] [-P pattern] off len [len..] -- writes a number of bytes "
    "at a specified offset",
    false, true },
};
#define NCOMMANDS (sizeof commands / sizeof commands[0])

static const struct command *
find_command (const char *name)
{
  for (size_t i = 0; i < NCOMMANDS; i++)
    if (strcmp (name, commands[i].name) == 0)
      return &commands[i];
  return NULL;
}

/* A bad option: getopt named it on stderr; qemu-io adds the usage line. */
int
command_usage (const char *name)
{
  printf ("%s\n", find_command (name)->usage);
  return -1;
}

static int
cmd_help (struct io_ctx *io, int argc, char **argv)
{
  const struct command *cmd;

  (void)io;
  if (argc < 2) {
    for (size_t i = 0; i < NCOMMANDS; i++)
      printf ("%s\n", commands[i].usage);
    printf ("\nUse 'help commandname' for extended help.\n");
    return 0;
  }
  cmd = find_command (argv[1]);
  if (!cmd) {
    printf ("command %s not found\n", argv[1]);
    return -1;
  }
  printf ("%s\n", cmd->usage);
  return 0;
}

static bool
is_read_only (struct io_ctx *io)
{
  struct strata_info info = { .size = sizeof info };

  return strata_get_info (io->node, &info, 0, NULL) && info.read_only;
}

/* Split LINE in place on blanks.  Returns argc; argv has room for MAX. */
static int
split_line (char *line, char **argv, int max)
{
  int argc = 0;

  for (char *tok = strtok (line, " \t\n"); tok && argc < max - 1;
       tok = strtok (NULL, " \t\n"))
    argv[argc++] = tok;
  argv[argc] = NULL;
  return argc;
}

/* qemu-io checks the word count before running a command, with these
 * messages; without it "length x" would run and succeed. */
static bool
check_argc (const struct command *cmd, int argc)
{
  int n = argc - 1;

  if (n >= cmd->argmin && (cmd->argmax < 0 || n <= cmd->argmax))
    return true;
  if (cmd->argmax < 0)
    fprintf (stderr,
             "bad argument count %d to %s, expected at least %d "
             "arguments\n",
             n, cmd->name, cmd->argmin);
  else if (cmd->argmin == cmd->argmax)
    fprintf (stderr, "bad argument count %d to %s, expected %d arguments\n", n,
             cmd->name, cmd->argmin);
  else
    fprintf (stderr,
             "bad argument count %d to %s, expected between %d and "
             "%d arguments\n",
             n, cmd->name, cmd->argmin, cmd->argmax);
  return false;
}

/* Run one command line.  Returns 0, -1 on failure, 1 for quit. */
static int
run_command (struct io_ctx *io, const char *cmdline)
{
  CLEANUP_FREE char *line = strdup (cmdline);
  char *argv[64];
  const struct command *cmd;
  int argc;

  if (!line)
    return -1;
  argc = split_line (line, argv, 64);
  if (argc == 0)
    return 0;
  if (strcmp (argv[0], "quit") == 0 || strcmp (argv[0], "q") == 0)
    return 1;
  cmd = find_command (argv[0]);
  if (cmd && cmd->writes && io->node && is_read_only (io)) {
    fprintf (stderr, "%s: Block node is read-only\n", progname);
    return -1;
  }
  if (cmd && !cmd->nofile && !io->node) {
    /* qemu-io's line has no program name; test_io_bad_input wants one
     * on every line about opening. */
    fprintf (stderr, "%s: no file open, try 'help open'\n", progname);
    return -1;
  }
  if (cmd) {
    int r = check_argc (cmd, argc) ? cmd->fn (io, argc, argv) : -1;

    fflush (stdout);
    return r;
  }
  fprintf (stderr, "command \"%s\" not found\n", argv[0]);
  return -1;
}

static void
usage (FILE *f)
{
  fprintf (
      f,
      "Usage: %s [OPTIONS]... [-c COMMAND]... [FILE]\n"
      "\n"
      "  -c, --cmd COMMAND    run COMMAND (repeatable); without -c commands\n"
      "                       are read from standard input\n"
      "  -f, --format FMT     image format (raw, file); probed when absent\n"
      "  -r, --read-only      open the image read-only\n"
      "  -U, --force-share    open read-only without taking image locks\n"
      "  -t, --cache MODE     none, writeback (default), writethrough,\n"
      "                       directsync or unsafe\n"
      "  -n, --nocache        same as -t none\n"
      "  -C, --copy-on-read   copy what reads fetch from backing files into\n"
      "                       the image (a copy-on-read filter on top)\n"
      "  -o, --options OPTS   extra driver options, key=value,...\n"
      "  -h, --help           show this help\n"
      "  -V, --version        show the version\n",
      progname);
}

int
main (int argc, char **argv)
{
  static const struct option long_options[] = {
    { "cmd", required_argument, NULL, 'c' },
    { "format", required_argument, NULL, 'f' },
    { "read-only", no_argument, NULL, 'r' },
    { "force-share", no_argument, NULL, 'U' },
    { "cache", required_argument, NULL, 't' },
    { "nocache", no_argument, NULL, 'n' },
    { "copy-on-read", no_argument, NULL, 'C' },
    { "options", required_argument, NULL, 'o' },
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' },
    { NULL, 0, NULL, 0 },
  };
  struct io_ctx io = { 0 };
  CLEANUP_FREE const char **cmds = calloc (argc, sizeof *cmds);
  const char *cache = "writeback", *extra = NULL;
  unsigned flags = STRATA_OPEN_RDWR;
  const char *format = NULL;
  int ncmds = 0, c, failed = 0;

  if (!cmds)
    return 1;
  while ((c = getopt_long (argc, argv, "c:f:rUt:nCo:hV", long_options, NULL))
         != -1) {
    switch (c) {
    case 'c': cmds[ncmds++] = optarg; break;
    case 'f': format = optarg; break;
    case 'r': flags &= ~STRATA_OPEN_RDWR; break;
    case 'U': flags |= STRATA_OPEN_FORCE_SHARE; break;
    case 't': cache = optarg; break;
    case 'n': cache = "none"; break;
    case 'C': flags |= STRATA_OPEN_COPY_ON_READ; break;
    case 'o': extra = optarg; break;
    case 'h': usage (stdout); return 0;
    case 'V': printf ("strata-io version %s\n", strata_version ()); return 0;
    default: usage (stderr); return 1;
    }
  }
  if (optind < argc - 1) {
    fprintf (stderr, "%s: too many arguments\n", progname);
    return 1;
  }
  /* qemu-io without a file waits for an open command. */
  if (optind < argc
      && !open_image (&io, argv[optind], format, cache, extra, flags))
    return 1;

  if (ncmds) {
    for (int i = 0; i < ncmds; i++) {
      int r = run_command (&io, cmds[i]);
      if (r < 0)
        failed = 1;
      if (r > 0)
        break;
    }
  }
  else {
    char *line = NULL;
    size_t cap = 0;

    for (;;) {
      int r;

      printf ("strata-io> ");
      fflush (stdout);
      if (getline (&line, &cap, stdin) < 0)
        break;
      r = run_command (&io, line);
      if (r < 0)
        failed = 1;
      if (r > 0)
        break;
    }
    free (line);
  }
  if (io.node && !close_image (&io))
    failed = 1;
  return failed;
}
