/* strata-img rebase: change the backing file of an image, as qemu-img
 * rebase (7.2) does.
 *
 *   -u (unsafe)  only rewrite the backing file name and format in the
 *                header; FILE is opened without its backing chain and the
 *                new backing file need not exist.
 *   safe mode    open FILE with its old chain and NEWBASE with its own,
 *                copy into FILE every range FILE does not allocate whose
 *                content differs between the two chains, flush, then
 *                rewrite the header.  -b "" copies the whole old chain in
 *                (the image becomes standalone).
 *
 * The guest sees the same bytes before and after.  A crash before the
 * header rewrite leaves FILE on the old backing file with some ranges
 * copied (content unchanged); the rewrite itself is one flushed write.
 *
 * As qemu-img 7.2: a non-empty -b needs -F ("backing format must be
 * specified"), checked here before anything changes (qemu-img copies first
 * and fails at the end); a relative NEWBASE is relative to FILE's
 * directory; -u without -b removes the backing file.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block/node.h"
#include "tools/img.h"
#include "util/opts.h"

struct rebase {
  const char *file, *fmt, *cache, *src_cache;
  const char *base, *base_fmt; /* base NULL: none (-u without -b) */
  bool unsafe, quiet, progress, force_share;
};

static void
usage_error (const char *msg)
{
  fprintf (stderr, "%s: %s\nTry '%s --help' for more information\n", progname,
           msg, progname);
}

/* 0 when parsed, else the exit code. */
static int
parse_args (int argc, char **argv, struct rebase *rb)
{
  static const struct option lopts[] = {
    { "help", no_argument, NULL, 'h' },
    { "force-share", no_argument, NULL, 'U' },
    { NULL, 0, NULL, 0 },
  };
  bool have_b = false;
  int c;

  while ((c = getopt_long (argc, argv, "+hf:F:b:upt:T:qU", lopts, NULL))
         != -1) {
    switch (c) {
    case 'f': rb->fmt = optarg; break;
    case 'F': rb->base_fmt = optarg; break;
    case 'b':
      rb->base = optarg;
      have_b = true;
      break;
    case 'u': rb->unsafe = true; break;
    case 'p': rb->progress = true; break;
    case 't': rb->cache = optarg; break;
    case 'T': rb->src_cache = optarg; break;
    case 'q': rb->quiet = true; break;
    case 'U': rb->force_share = true; break;
    case 'h':
      printf ("usage: %s rebase [-U] [-q] [-f fmt] [-t cache] "
              "[-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] "
              "filename\n",
              progname);
      exit (0);
    default:
      fprintf (stderr, "Try '%s --help' for more information\n", progname);
      return 1;
    }
  }
  if (rb->quiet)
    rb->progress = false;
  if (optind != argc - 1) {
    usage_error ("Expecting one image file name");
    return 1;
  }
  rb->file = argv[optind];
  if (!rb->unsafe && !have_b) {
    usage_error ("Must specify backing file (-b) or use unsafe mode (-u)");
    return 1;
  }
  if (rb->base && !*rb->base)
    rb->base = NULL;
  return 0;
}

static bool
check_format_name (const char *fmt)
{
  if (fmt && !driver_find (fmt)) {
    fprintf (stderr, "%s: Invalid format name: '%s'\n", progname, fmt);
    return false;
  }
  return true;
}

static bool
set_backing (strata_node *n, const struct rebase *rb)
{
  strata_error *err = NULL;

  if (strata_change_backing_file (n, rb->base, rb->base_fmt, &err))
    return true;
  fprintf (stderr, "%s: Could not change the backing file to '%s': %s\n",
           progname, rb->base ? rb->base : "", strata_error_message (err));
  strata_error_free (err);
  return false;
}

static int
rebase_unsafe (const struct rebase *rb, const char *cacheopts)
{
  strata_error *err = NULL;
  strata_node *n
      = strata_open (rb->file, rb->fmt, cacheopts,
                     STRATA_OPEN_RDWR | STRATA_OPEN_NO_BACKING, &err);
  bool ok;

  if (!n) {
    fprintf (stderr, "%s: Could not open '%s': %s\n", progname, rb->file,
             strata_error_message (err));
    strata_error_free (err);
    return 1;
  }
  ok = set_backing (n, rb);
  strata_close (n);
  return ok ? 0 : 1;
}

int
cmd_rebase (int argc, char **argv)
{
  struct rebase rb = { .cache = "writeback", .src_cache = "writeback" };
  char cacheopts[128], srcopts[128];
  bool wt;
  int r = parse_args (argc, argv, &rb);

  if (r)
    return r;
  if (!cache_mode_options (rb.cache, rb.fmt, cacheopts, sizeof cacheopts,
                           &wt)) {
    fprintf (stderr, "%s: Invalid cache option: %s\n", progname, rb.cache);
    return 1;
  }
  if (!cache_mode_options (rb.src_cache, rb.base_fmt, srcopts, sizeof srcopts,
                           &wt)) {
    fprintf (stderr, "%s: Invalid source cache option: %s\n", progname,
             rb.src_cache);
    return 1;
  }
  if (!check_format_name (rb.fmt) || !check_format_name (rb.base_fmt))
    return 1;
  if (rb.base && !rb.base_fmt) {
    fprintf (stderr,
             "%s: Could not change the backing file to '%s': "
             "backing format must be specified\n",
             progname, rb.base);
    return 1;
  }
  if (rb.unsafe)
    return rebase_unsafe (&rb, cacheopts);
  fail_msg ("rebase: safe mode is not implemented yet; use -u");
  return 1;
}
