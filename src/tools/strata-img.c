/* strata-img: image tool with qemu-img's subcommands, options, exit codes
 * and JSON field names, so scripts written for qemu-img work unchanged.
 *
 * This file holds main() and the command table; each subcommand is
 * img-<name>.c (create, info, map, check, compare, bench, convert,
 * measure, commit, rebase, resize, snapshot, amend, stream), called as
 * img.h describes, and the helpers they share are in img-common.c.
 *
 * Exit codes are qemu-img's: 0 success, 1 failure (compare: different),
 * 2 error (compare), and check's 0/1/2/3/63.
 */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "img.h"

static void
usage (FILE *f)
{
  fprintf (f,
    "Usage: %s COMMAND [OPTIONS]...\n"
    "\n"
    "Commands (options as in qemu-img):\n"
    "  create   -f FMT [-b BACKING -F BFMT] [-u] [-o OPTS] [-q] FILE [SIZE]\n"
    "  info     [--output=human|json] [--backing-chain] [-U] [-f FMT] FILE\n"
    "  map      [--output=human|json] [--start-offset=O] [--max-length=L]\n"
    "           [-U] [-f FMT] FILE\n"
    "  check    [-r leaks|all] [--output=human|json] [-U] [-f FMT] [-q] FILE\n"
    "  compare  [-s] [-q] [-U] [-f FMT] [-F FMT] A B\n"
    "  bench    [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=N]\n"
    "           [--no-drain] [-o OFFSET] [--pattern=P] [-q] [-s SIZE]\n"
    "           [-S STEP] [-t CACHE] [-w] [-U] FILE\n"
    "  convert  [-f FMT] [-O FMT] [-B BACKING [-F BFMT]] [-c] [-o OPTS] [-n]\n"
    "           [--target-is-zero] [-p] [-q] [-S SIZE] [-m N] [-W] [-U]\n"
    "           [-r RATE] [-t CACHE] [-T CACHE] SRC [SRC...] DST\n"
    "  commit   [-f FMT] [-t CACHE] [-b BASE] [-r RATE] [-d] [-p] [-q] FILE\n"
    "  rebase   [-f FMT] [-t CACHE] [-T CACHE] [-p] [-u] [-q] [-U]\n"
    "           -b BACKING [-F BFMT] FILE\n"
    "  resize   [-f FMT] [--preallocation=MODE] [-q] [--shrink] FILE\n"
    "           [+ | -]SIZE\n"
    "  measure  [--output=human|json] [-O FMT] [-o OPTS]\n"
    "           [--size N | [-f FMT] [-U] FILE]\n"
    "  snapshot [-U] [-q] [-l | -a NAME | -c NAME | -d NAME] FILE\n"
    "  amend    [-p] [-q] [-f FMT] [-t CACHE] [--force] -o OPTS FILE\n"
    "  bitmap   (--merge SOURCE | --add | --remove | --clear | --enable |\n"
    "           --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]]\n"
    "           [-g GRANULARITY] [-f FMT] FILE BITMAP\n"
    "  stream   (strata's own: see strata-img stream -h)\n", progname);
}

void
img_help (void)
{
  usage (stdout);
}

int
main (int argc, char **argv)
{
  static const struct {
    const char *name;
    int (*fn) (int argc, char **argv);
  } cmds[] = {
    { "create", cmd_create }, { "info", cmd_info }, { "map", cmd_map },
    { "check", cmd_check }, { "compare", cmd_compare },
    { "bench", cmd_bench }, { "convert", cmd_convert },
    { "measure", cmd_measure }, { "commit", cmd_commit },
    { "rebase", cmd_rebase }, { "resize", cmd_resize },
    { "snapshot", cmd_snapshot }, { "amend", cmd_amend },
    { "bitmap", cmd_bitmap },
    { "stream", cmd_stream },
  };

  if (argc < 2) {
    fprintf (stderr, "%s: Not enough arguments\nTry '%s --help' for more "
             "information\n", progname, progname);
    return 1;
  }
  if (strcmp (argv[1], "--help") == 0 || strcmp (argv[1], "-h") == 0) {
    usage (stdout);
    return 0;
  }
  if (strcmp (argv[1], "--version") == 0 || strcmp (argv[1], "-V") == 0) {
    printf ("strata-img version %s\n", strata_version ());
    return 0;
  }
  for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
    if (strcmp (argv[1], cmds[i].name) == 0) {
      int r;
      optind = 1;
      r = cmds[i].fn (argc - 1, argv + 1);
      fflush (stdout);
      return r;
    }
  }
  fprintf (stderr, "%s: Command not found: %s\n", progname, argv[1]);
  return 1;
}
