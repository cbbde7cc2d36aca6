/* strata-img convert: copy one or more images into a new one (qemu-img
 * convert).
 *
 *   convert [-f FMT] [-O FMT] [-B BACKING [-F BFMT]] [-c] [-o OPTS] [-n]
 *           [--target-is-zero] [-p] [-q] [-S SPARSE] [-m N] [-W] [-U]
 *           [-t CACHE] [-T SRC_CACHE] [-C] SRC [SRC...] DST
 *
 * This file parses the arguments, checks them as qemu-img does, creates
 * and opens the target and opens the sources; the copy itself (chunks,
 * zero detection, threads, in-order writes) is convert-copy.c's.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <strata/strata.h>

#include "checked.h"
#include "clock.h"
#include "cleanup.h"
#include "opts.h"
#include "img.h"
#include "progress.h"
#include "ratelimit.h"
#include "convert.h"

/* ---- the command ---- */

/* Threads for -m N requests: at most two per CPU.  Each owns a 2 MiB
 * buffer that the kernel copies into and out of; beyond what keeps the
 * CPUs busy, more buffers only push each other out of the caches (on 2
 * CPUs, 8 threads took about 1.3x the CPU time of 4 on tmpfs and 2x on
 * ext4 for the same copy). */
static int
copy_threads (int requested)
{
  long ncpu = sysconf (_SC_NPROCESSORS_ONLN);

  if (ncpu < 1)
    ncpu = 1;
  return (int)MIN ((long)requested, 2 * ncpu);
}

struct convert_args {
  const char *fmt, *ofmt, *backing, *bfmt, *cache, *src_cache;
  const char *snapshot; /* -l */
  char *options;
  char *opt_backing, *opt_bfmt; /* -o backing_file/backing_fmt: as -B/-F */
  bool compressed, skip_create, quiet, progress, force_share, target_is_zero;
  bool salvage, bitmaps;
  bool out_of_order;
  uint64_t min_sparse, rate;
  int threads;
};

/* "DST: error while converting FMT: MSG" as qemu-img words a failed
 * creation, without the file name strata's message starts with. */
static void
fail_create (const char *dst, const char *ofmt, strata_error *err)
{
  const char *m = strata_error_message (err);
  size_t n = strlen (dst);

  if (strncmp (m, dst, n) == 0 && strncmp (m + n, ": ", 2) == 0)
    m += n + 2;
  /* qemu-img finds these before it creates anything, and says only so. */
  if (!strncmp (m, "Unknown file format '", 21)
      || !strncmp (m, "Invalid parameter '", 19)) {
    fail_msg (m);
    strata_error_free (err);
    return;
  }
  fprintf (stderr, "%s: %s: error while converting %s: %s\n", progname, dst,
           ofmt, m);
  strata_error_free (err);
}

/* The value OPTIONS give KEY, malloc'd, or NULL. */
static char *
option_value (const char *options, const char *key)
{
  CLEANUP_OPTS strata_opts *o = opts_new ();
  const char *v;

  if (!o || !options || !opts_parse (o, options, NULL))
    return NULL;
  v = opts_get (o, key);
  return v ? strdup (v) : NULL;
}

/* Whether OPTIONS set KEY to something other than "off". */
static bool
option_set (const char *options, const char *key)
{
  CLEANUP_FREE char *v = option_value (options, key);

  return v && strcmp (v, "off") != 0;
}

static bool
same_file (const char *a, const char *b)
{
  struct stat sa, sb;

  return stat (a, &sa) == 0 && stat (b, &sb) == 0 && sa.st_dev == sb.st_dev
         && sa.st_ino == sb.st_ino;
}

/* The -B backing file must open, relative to the new image's directory
 * (checked before anything is created). */
static bool
check_backing (const char *dst, const struct convert_args *a)
{
  CLEANUP_FREE char *path = NULL;
  const char *slash = strrchr (dst, '/');
  strata_error *err = NULL;
  strata_node *b;

  if (a->backing[0] != '/' && slash && !strstr (a->backing, "://")) {
    if (asprintf (&path, "%.*s%s", (int)(slash - dst + 1), dst, a->backing)
        < 0)
      return false;
  }
  b = strata_open (path ? path : a->backing, a->bfmt, NULL,
                   STRATA_OPEN_FORCE_SHARE, &err);
  if (!b) {
    fprintf (stderr,
             "%s: Could not open '%s': Could not open backing file: "
             "%s\n",
             progname, dst, strata_error_message (err));
    strata_error_free (err);
    return false;
  }
  strata_close (b);
  return true;
}

/* Validate the options that need no file, in qemu-img's order. */
static bool
check_args (const struct convert_args *a)
{
  bool raw = strcmp (a->ofmt, "raw") == 0;

  if (a->target_is_zero && !a->skip_create) {
    fail_msg ("--target-is-zero requires use of -n flag");
    return false;
  }
  if (a->skip_create && a->options) {
    fail_msg ("-o has no effect when skipping image creation");
    return false;
  }
  if (!a->skip_create && raw && a->backing) {
    fprintf (stderr,
             "%s: Backing file not supported for file format "
             "'raw'\n",
             progname);
    return false;
  }
  if (!a->skip_create && raw && a->bfmt) {
    fprintf (stderr,
             "%s: Backing file format not supported for file format "
             "'raw'\n",
             progname);
    return false;
  }
  if (a->compressed && strcmp (a->ofmt, "qcow2") != 0) {
    fail_msg ("Compression not supported for this file format");
    return false;
  }
  if (a->compressed && option_set (a->options, "preallocation")) {
    fail_msg ("Compression and preallocation not supported at the same "
              "time");
    return false;
  }
  if (!a->skip_create && a->backing && !a->bfmt) {
    fail_msg ("Use of backing file requires explicit backing format");
    return false;
  }
  return true;
}

/* Create DST for TOTAL bytes; nothing is left behind on failure. */
static bool
create_target (const char *dst, uint64_t total, const struct convert_args *a)
{
  CLEANUP_FREE char *all = NULL;
  strata_error *err = NULL;

  /* The size and backing come last: they replace any given with -o, as
   * qemu-img ignores -o size. */
  if (asprintf (&all, "%s%ssize=%" PRIu64 "%s%s%s%s",
                a->options ? a->options : "", a->options ? "," : "", total,
                a->backing ? ",backing_file=" : "",
                a->backing ? a->backing : "", a->bfmt ? ",backing_fmt=" : "",
                a->bfmt ? a->bfmt : "")
      < 0)
    return false;
  if (!strata_create (dst, a->ofmt, all, STRATA_CREATE_DRY_RUN, &err)) {
    fail_create (dst, a->ofmt, err);
    return false;
  }
  if (a->backing && !check_backing (dst, a))
    return false;
  if (!strata_create (dst, a->ofmt, all, 0, &err)) {
    fail_create (dst, a->ofmt, err);
    return false;
  }
  return true;
}

static int
parse_convert_args (int argc, char **argv, struct convert_args *a)
{
  enum { OPT_TARGET_IS_ZERO = 256, OPT_UNSUPPORTED, OPT_SALVAGE, OPT_BITMAPS };
  static const struct option lopts[] = {
    { "help", no_argument, NULL, 'h' },
    { "force-share", no_argument, NULL, 'U' },
    { "target-is-zero", no_argument, NULL, OPT_TARGET_IS_ZERO },
    { "object", required_argument, NULL, OPT_UNSUPPORTED },
    IMG_IMAGE_OPTS_OPTION,
    { "target-image-opts", no_argument, NULL, OPT_UNSUPPORTED },
    { "salvage", no_argument, NULL, OPT_SALVAGE },
    { "bitmaps", no_argument, NULL, OPT_BITMAPS },
    { NULL, 0, NULL, 0 },
  };
  int c, idx;

  while ((c = getopt_long (argc, argv, ":hf:O:B:F:co:l:S:pt:T:qnm:WUr:C",
                           lopts, &idx))
         != -1) {
    switch (c) {
    case 'f': a->fmt = optarg; break;
    case 'O': a->ofmt = optarg; break;
    case 'B': a->backing = optarg; break;
    case 'F': a->bfmt = optarg; break;
    case 'c': a->compressed = true; break;
    case 'n': a->skip_create = true; break;
    case 'p': a->progress = true; break;
    case 'q': a->quiet = true; break;
    case 'W': a->out_of_order = true; break;
    case 'U': a->force_share = true; break;
    case 'C': break; /* copy offloading: the result is the same */
    case 't': a->cache = optarg; break;
    case 'T': a->src_cache = optarg; break;
    case OPT_TARGET_IS_ZERO: a->target_is_zero = true; break;
    case OPT_SALVAGE: a->salvage = true; break;
    case OPT_BITMAPS: a->bitmaps = true; break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'o': {
      char *n;
      if (asprintf (&n, "%s%s%s", a->options ? a->options : "",
                    a->options ? "," : "", optarg)
          < 0)
        return 1;
      free (a->options);
      a->options = n;
      break;
    }
    case 'S': {
      uint64_t v;
      if (optarg[0] == '-' || !parse_size (optarg, &v)) {
        fail_msg ("Invalid buffer size for sparse output specified. You may "
                  "use k, M, G, T, P or E suffixes for");
        fail_msg ("kilobytes, megabytes, gigabytes, terabytes, petabytes and "
                  "exabytes.");
        return 1;
      }
      if (v % SECTOR || v > (16u << 20)) {
        fail_msg ("Invalid buffer size for sparse output specified. Valid "
                  "sizes are multiples of 512 up to 16777216. Select 0 to "
                  "disable sparse detection (fully allocates output).");
        return 1;
      }
      a->min_sparse = v;
      break;
    }
    case 'm': {
      char *end;
      long v = strtol (optarg, &end, 10);
      if (*optarg == '\0' || *end || v < 1 || v > 16) {
        fail_msg ("Invalid number of coroutines. Allowed number of "
                  "coroutines is between 1 and 16");
        return 1;
      }
      a->threads = v;
      break;
    }
    case 'l': a->snapshot = optarg; break;
    case 'r':
      if (!img_parse_rate (optarg, &a->rate))
        return 1;
      break;
    case OPT_UNSUPPORTED:
      fprintf (stderr, "%s: --%s is not supported\n", progname,
               lopts[idx].name);
      return 1;
    case 'h':
      printf ("usage: %s convert [-f FMT] [-O FMT] [-B BACKING [-F BFMT]] "
              "[-c] [-o OPTS] [-n] [--target-is-zero] [-p] [-q] [-S SIZE] "
              "[-m N] [-W] [-U] [-t CACHE] [-T CACHE] [-C] SRC [SRC...] "
              "DST\n",
              progname);
      return -1;
    default: return img_option_error (c, argv);
    }
  }
  if (a->quiet)
    a->progress = false;
  /* qemu-img takes -o backing_file=... as -B (and backing_fmt as -F). */
  if (!a->backing
      && (a->opt_backing = option_value (a->options, "backing_file"))) {
    a->backing = a->opt_backing;
    if (!a->bfmt)
      a->bfmt = a->opt_bfmt = option_value (a->options, "backing_fmt");
  }
  /* As qemu-img: the target, if named, is the last argument. */
  if (img_has_help_option (a->options))
    return img_print_create_help (a->ofmt,
                                  argc - optind >= 2 ? argv[argc - 1] : NULL)
               ? 1
               : -1;
  if (argc - optind < 2) {
    fail_msg ("Must specify image file name");
    return 1;
  }
  return 0;
}

/* Record each layer's L2 span and the top's alignment (see struct
 * source). */
static bool
source_layers (struct source *s)
{
  int n = 0;

  for (strata_node *l = s->node; l; l = strata_backing (l))
    n++;
  if (!(s->spans = calloc (n, sizeof *s->spans)))
    return false;
  s->nlayers = n;
  s->align = SECTOR;
  n = 0;
  for (strata_node *l = s->node; l; l = strata_backing (l), n++) {
    struct strata_info info = { .size = sizeof info };
    struct strata_qcow2_info q = { .size = sizeof q };
    strata_error *err = NULL;
    uint64_t cs;

    if (!strata_get_info (l, &info, 0, &err)) {
      strata_error_free (err);
      continue;
    }
    cs = info.cluster_size;
    if (cs && strcmp (info.format, "qcow2") == 0
        && strata_get_qcow2_info (l, &q, 0, NULL))
      s->spans[n] = cs * (cs / (q.extended_l2 ? 16 : 8));
    if (n == 0 && cs > s->align)
      s->align = cs;
  }
  return true;
}

/* Open the sources (SRC...) and add up their sizes. */
static bool
open_sources (struct convert *c, char **names, int n,
              const struct convert_args *a)
{
  char extra[256];
  bool wt;

  if (!cache_mode_options (a->src_cache, a->fmt, extra, sizeof extra, &wt)) {
    fprintf (stderr, "%s: Invalid source cache option: %s\n", progname,
             a->src_cache);
    return false;
  }
  c->src = calloc (n, sizeof *c->src);
  if (!c->src)
    return false;
  for (int i = 0; i < n; i++) {
    int64_t len;

    c->src[i].name = names[i];
    c->src[i].node
        = a->snapshot
              ? img_open_snapshot (names[i], a->fmt, a->force_share,
                                   a->snapshot)
              : open_image (names[i], a->fmt, a->force_share, false, extra);
    if (!c->src[i].node)
      return false;
    c->nsrc = i + 1;
    len = strata_length (c->src[i].node);
    if (len < 0) {
      fprintf (stderr, "%s: Could not get size of %s: %s\n", progname,
               names[i], strerror ((int)-len));
      return false;
    }
    c->src[i].base = c->total;
    c->src[i].real = len;
    c->src[i].size = ROUND_UP ((uint64_t)len, SECTOR);
    c->total += c->src[i].size;
    if (!source_layers (&c->src[i])) {
      fail_msg ("out of memory");
      return false;
    }
  }
  return true;
}

/* Open (and first create, without -n) the target. */
static bool
open_target (struct convert *c, const char *dst, const struct convert_args *a)
{
  struct strata_info info = { .size = sizeof info };
  strata_error *err = NULL;
  char extra[256];
  bool wt;
  int64_t len;

  if (!img_cache_options (a->cache, a->ofmt, extra, sizeof extra, &wt))
    return false;
  c->wflags = wt ? STRATA_REQ_FUA : 0;
  for (int i = 0; i < c->nsrc; i++)
    if (same_file (c->src[i].name, dst)) {
      fprintf (stderr,
               "%s: %s: error while converting %s: Failed to get "
               "\"write\" lock\nIs another process using the image [%s]?\n",
               progname, dst, a->ofmt, dst);
      return false;
    }
  if (!a->skip_create && !create_target (dst, c->total, a))
    return false;
  c->dst = open_image (dst, a->ofmt, false, true, extra);
  if (!c->dst)
    return false;
  len = strata_length (c->dst);
  if (a->skip_create && len >= 0 && (uint64_t)len < c->total) {
    fail_msg ("output file is smaller than input file");
    return false;
  }
  if (!strata_get_info (c->dst, &info, 0, &err)) {
    fail_err (err);
    return false;
  }
  c->cluster = info.cluster_size ? info.cluster_size : 65536;
  /* A new image reads as zeros unless a backing file shows through. */
  c->zero_init = a->skip_create ? a->target_is_zero : !info.has_backing;
  return true;
}

/* qcow2 v3: the format that holds persistent bitmaps. */
static bool
holds_bitmaps (strata_node *n, const char **fmt)
{
  struct strata_info info = { .size = sizeof info };
  struct strata_qcow2_info q = { .size = sizeof q };

  if (!strata_get_info (n, &info, 0, NULL))
    return false;
  *fmt = info.format;
  return info.format_specific && !strcmp (info.format_specific, "qcow2")
         && strata_get_qcow2_info (n, &q, 0, NULL)
         && strcmp (q.compat, "0.10") != 0;
}

/* --bitmaps, as qemu-img checks it before creating the target: a source
 * format that holds bitmaps, none of them inconsistent (in use). */
static bool
bitmaps_source (struct convert *c)
{
  struct strata_bitmap_info **l;
  strata_error *err = NULL;
  const char *fmt;
  size_t n;

  if (!holds_bitmaps (c->src[0].node, &fmt)) {
    fail_msg ("Source lacks bitmap support");
    return false;
  }
  if (!strata_bitmap_list (c->src[0].node, &l, &n, 0, &err)) {
    fail_err (err);
    return false;
  }
  for (size_t i = 0; i < n; i++)
    if (l[i]->flags & STRATA_BITMAP_IN_USE) {
      fprintf (stderr,
               "%s: Cannot copy inconsistent bitmap '%s'\nTry "
               "--skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to "
               "delete it\n",
               progname, l[i]->name);
      strata_bitmap_list_free (l);
      return false;
    }
  strata_bitmap_list_free (l);
  return true;
}

/* After the copy, as qemu-img: each of the source's bitmaps made on the
 * target (granularity, enabled or not) and filled from the source's. */
static bool
bitmaps_copy (struct convert *c)
{
  struct strata_bitmap_info **l;
  strata_error *err = NULL;
  size_t n;
  bool ok = true;

  if (!strata_bitmap_list (c->src[0].node, &l, &n, 0, &err)) {
    fail_err (err);
    return false;
  }
  for (size_t i = 0; i < n && ok; i++) {
    const char *name = l[i]->name;

    if (!strata_bitmap_add (c->dst, name, l[i]->granularity,
                            l[i]->flags & STRATA_BITMAP_AUTO
                                ? 0
                                : STRATA_BITMAP_ADD_DISABLED,
                            &err)) {
      fprintf (stderr, "%s: Failed to create bitmap %s: %s\n", progname,
               name, strata_error_message (err));
      ok = false;
    }
    else if (!strata_bitmap_merge (c->dst, name, c->src[0].node, name, 0,
                                   &err)) {
      fprintf (stderr, "%s: Failed to populate bitmap %s: %s\n", progname,
               name, strata_error_message (err));
      ok = false;
    }
  }
  strata_error_free (err);
  strata_bitmap_list_free (l);
  return ok;
}

/* ... and after: the target must hold them too. */
static bool
bitmaps_target (struct convert *c)
{
  const char *fmt = "?";

  if (holds_bitmaps (c->dst, &fmt))
    return true;
  fprintf (stderr, "%s: Format driver '%s' does not support bitmaps\n",
           progname, fmt);
  return false;
}

int
cmd_convert (int argc, char **argv)
{
  struct convert_args a = { .ofmt = "raw",
                            .cache = "unsafe",
                            .src_cache = "writeback",
                            .min_sparse = 4096,
                            .threads = 8 };
  struct convert c = { 0 };
  const char *dst;
  int r = parse_convert_args (argc, argv, &a);

  if (r != 0) {
    free (a.options);
    free (a.opt_backing);
    free (a.opt_bfmt);
    return r < 0 ? 0 : r;
  }
  dst = argv[argc - 1];
  r = 1;
  if (a.snapshot && argc - 1 - optind > 1) {
    fail_msg ("No support for concatenating multiple snapshot");
    goto out;
  }
  if (a.bitmaps && argc - 1 - optind > 1) {
    fail_msg ("Copying bitmaps only possible with single source");
    goto out;
  }
  if (!check_args (&a)
      || !open_sources (&c, argv + optind, argc - 1 - optind, &a)
      || (a.bitmaps && !bitmaps_source (&c))
      || (img_image_opts = false) /* sources only: the target is a name */
      || !open_target (&c, dst, &a) || (a.bitmaps && !bitmaps_target (&c)))
    goto out;
  c.compressed = a.compressed;
  c.backing_mode = a.backing != NULL;
  c.out_of_order = a.out_of_order;
  c.progress = a.progress;
  c.min_sparse = a.min_sparse;
  c.salvage = a.salvage;
  ratelimit_init (&c.rl, a.rate, clock_now_ns ());
  c.align = MAX (a.min_sparse, SECTOR) / SECTOR;
  while (c.align & (c.align - 1))
    c.align &= c.align - 1; /* the power of two at or below */
  c.bufsize = c.compressed ? MAX (CONVERT_BUF, c.cluster) : CONVERT_BUF;
  r = convert_run (&c, a.rate ? 1 : copy_threads (a.threads));
  if (r == 0 && a.bitmaps && !bitmaps_copy (&c))
    r = 1;
out:
  if (c.dst)
    strata_close (c.dst);
  for (int i = 0; i < c.nsrc; i++) {
    strata_close (c.src[i].node);
    free (c.src[i].spans);
  }
  free (c.src);
  free (a.options);
  free (a.opt_backing);
  free (a.opt_bfmt);
  return r;
}
