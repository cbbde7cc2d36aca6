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

#include "img.h"
#include "progress.h"
#include "checked.h"
#include "cleanup.h"
#include "opts.h"

#define CHUNK (1u << 20) /* bytes compared at a time: bounds the memory */

struct rebase {
  const char *file, *fmt, *cache, *src_cache;
  const char *base, *base_fmt; /* base NULL: none (-u without -b) */
  bool unsafe, quiet, progress, force_share, compress;
};

/* 0 when parsed, else the exit code. */
static int
parse_args (int argc, char **argv, struct rebase *rb)
{
  static const struct option lopts[] = {
    { "help", no_argument, NULL, 'h' },
    { "force-share", no_argument, NULL, 'U' },
    IMG_IMAGE_OPTS_OPTION,
    { NULL, 0, NULL, 0 },
  };
  bool have_b = false;
  int c;

  while ((c = getopt_long (argc, argv, ":hf:F:b:upt:T:qUc", lopts, NULL))
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
    case 'c': rb->compress = true; break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'h':
      printf ("usage: %s rebase [-U] [-q] [-f fmt] [-t cache] "
              "[-T src_cache] [-p] [-u] [-c] -b backing_file "
              "[-F backing_fmt] filename\n",
              progname);
      exit (0);
    default: return img_option_error (c, argv);
    }
  }
  if (rb->quiet)
    rb->progress = false;
  if (optind != argc - 1) {
    return img_usage_error ("Expecting one image file name");
  }
  rb->file = argv[optind];
  if (!rb->unsafe && !have_b) {
    return img_usage_error (
        "Must specify backing file (-b) or use unsafe mode (-u)");
  }
  if (rb->base && !*rb->base)
    rb->base = NULL;
  return 0;
}

static bool
check_format_name (const char *fmt)
{
  if (fmt && !strata_driver_exists (fmt)) {
    fprintf (stderr, "%s: Invalid format name: '%s'\n", progname, fmt);
    return false;
  }
  return true;
}

static bool
set_backing (strata_node *n, const struct rebase *rb)
{
  strata_error *err = NULL;

  if (strata_change_backing_file (n, rb->base, rb->base_fmt, 0, &err))
    return true;
  /* A format with no backing file: qemu-img says only ENOTSUP's text. */
  fprintf (stderr, "%s: Could not change the backing file to '%s': %s\n",
           progname, rb->base ? rb->base : "",
           strata_error_errno (err) == ENOTSUP ? strerror (ENOTSUP)
                                               : strata_error_message (err));
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

/* NAME relative to FILE's directory, as qemu-img resolves -b.  Caller
 * frees. */
static char *
relative_to (const char *file, const char *name)
{
  const char *slash = strrchr (file, '/');
  char *out;

  if (name[0] == '/' || !slash)
    return strdup (name);
  if (asprintf (&out, "%.*s%s", (int)(slash - file + 1), file, name) < 0)
    return NULL;
  return out;
}

/* Depth of the layer of FILE's chain that is the file PATH opened as
 * FMT, or -1. */
static int
depth_in_chain (strata_node *file, const char *path, const char *fmt)
{
  struct strata_info i = { .size = sizeof i };
  strata_error *err = NULL;
  int depth;
  strata_node *n
      = strata_chain_find (file, path, STRATA_CHAIN_PATH, &depth, &err);

  if (!n || !strata_get_info (n, &i, 0, &err)) {
    strata_error_free (err);
    return -1;
  }
  return strcmp (i.format, fmt) == 0 ? depth : -1;
}

struct safe {
  strata_node *file, *newb; /* newb NULL: -b "" */
  uint64_t len, newlen;
  int skip_depth; /* allocated at or below: same in both */
  bool old_zero;  /* no old backing: write zeros as such */
  bool compress;  /* -c: whole clusters, compressed */
  uint64_t cluster, window;
  uint8_t *old, *cur;
};

/* Read N bytes of the new chain at OFF into BUF (zeros past its end). */
static int
read_new (struct safe *sf, uint64_t off, uint64_t n, uint8_t *buf)
{
  uint64_t have = off < sf->newlen ? MIN (n, sf->newlen - off) : 0;

  memset (buf + have, 0, n - have);
  return have ? strata_pread (sf->newb, buf, have, off, 0) : 0;
}

/* Write into FILE the sectors of [OFF, OFF+N) where the old view (in
 * sf->old) and the new one (sf->cur) differ, as runs of sectors. */
static int
write_differences (struct safe *sf, uint64_t off, uint64_t n)
{
  for (uint64_t i = 0; i < n;) {
    uint64_t j, step = MIN (512, n - i);
    if (memcmp (sf->old + i, sf->cur + i, step) == 0) {
      i += step;
      continue;
    }
    for (j = i + step; j < n; j += MIN (512, n - j))
      if (memcmp (sf->old + j, sf->cur + j, MIN (512, n - j)) == 0)
        break;
    int r = sf->old_zero
                ? strata_pwrite_zeroes (sf->file, off + i, j - i, 0)
                : strata_pwrite (sf->file, sf->old + i, j - i, off + i, 0);
    if (r < 0)
      return r;
    i = j;
  }
  return 0;
}

/* One window: the ranges FILE does not allocate itself, unless a layer
 * the old and new chains share defines them. */
static int
rebase_window (struct safe *sf, uint64_t off, uint64_t end)
{
  struct strata_extent ext = { .size = sizeof ext };
  int r;

  for (; off < end; off += ext.length) {
    if ((r = strata_block_status (sf->file, off, end - off, &ext, 0)) < 0)
      return r;
    if ((ext.depth == 0 && (ext.flags & STRATA_BS_ALLOCATED))
        || (sf->skip_depth > 0 && ext.depth >= sf->skip_depth))
      continue;
    if ((r = strata_pread (sf->file, sf->old, ext.length, off, 0)) < 0
        || (r = read_new (sf, off, ext.length, sf->cur)) < 0
        || (r = write_differences (sf, off, ext.length)) < 0)
      return r;
  }
  return 0;
}

/* Whether the cluster piece [POS, POS+N) has bytes FILE allocates itself
 * (*OWN) and bytes to compare (*NEED). */
static int
classify_piece (struct safe *sf, uint64_t pos, uint64_t n, bool *own,
                bool *need)
{
  struct strata_extent ext = { .size = sizeof ext };
  int r;

  *own = *need = false;
  for (uint64_t q = pos; q < pos + n; q += ext.length) {
    if ((r = strata_block_status (sf->file, q, pos + n - q, &ext, 0)) < 0)
      return r;
    if (ext.depth == 0 && (ext.flags & STRATA_BS_ALLOCATED))
      *own = true;
    else if (sf->skip_depth <= 0 || ext.depth < sf->skip_depth)
      *need = true;
  }
  return 0;
}

/* -c: a cluster FILE does not allocate at all and whose content differs
 * is written whole and compressed (with its old content); one FILE
 * partly allocates goes the uncompressed way. */
static int
rebase_window_compressed (struct safe *sf, uint64_t off, uint64_t end)
{
  for (uint64_t pos = off, n; pos < end; pos += n) {
    bool own, need;
    int r;
    n = MIN (sf->cluster - pos % sf->cluster, end - pos);
    if ((r = classify_piece (sf, pos, n, &own, &need)) < 0)
      return r;
    if (!need)
      continue;
    if (own || pos % sf->cluster) {
      if ((r = rebase_window (sf, pos, pos + n)) < 0)
        return r;
      continue;
    }
    if ((r = strata_pread (sf->file, sf->old, n, pos, 0)) < 0
        || (r = read_new (sf, pos, n, sf->cur)) < 0)
      return r;
    if (memcmp (sf->old, sf->cur, n) != 0
        && (r
            = strata_pwrite (sf->file, sf->old, n, pos, STRATA_REQ_COMPRESSED))
               < 0)
      return r;
  }
  return 0;
}

static int
copy_differences (struct safe *sf, struct progress *pr)
{
  for (uint64_t off = 0; off < sf->len; off += sf->window) {
    uint64_t end = MIN (sf->len, off + sf->window);
    int r = sf->compress && !sf->old_zero
                ? rebase_window_compressed (sf, off, end)
                : rebase_window (sf, off, end);
    if (r < 0)
      return r;
    progress_update (pr, end, pr->total);
  }
  return strata_flush (sf->file, 0);
}

/* Open the new backing file (read-only, with its own chain). */
static strata_node *
open_new_base (const struct rebase *rb, const char *srcopts, uint64_t *len)
{
  CLEANUP_FREE char *path = relative_to (rb->file, rb->base);
  strata_error *err = NULL;
  strata_node *n;
  int64_t l;

  if (!path) {
    fail_msg ("out of memory");
    return NULL;
  }
  if (!(n
        = strata_open (path, rb->base_fmt, srcopts,
                       rb->force_share ? STRATA_OPEN_FORCE_SHARE : 0, &err))) {
    fprintf (stderr, "%s: Could not open new backing file '%s': %s\n",
             progname, rb->base, strata_error_message (err));
    strata_error_free (err);
    return NULL;
  }
  if ((l = strata_length (n)) < 0) {
    fprintf (stderr,
             "%s: Could not get the size of the new backing file "
             "'%s': %s\n",
             progname, rb->base, strerror ((int)-l));
    strata_close (n);
    return NULL;
  }
  *len = (uint64_t)l;
  return n;
}

static int
rebase_safe_run (const struct rebase *rb, struct safe *sf, const char *srcopts)
{
  struct progress pr;
  int64_t l = strata_length (sf->file);
  int r;

  if (l < 0) {
    fprintf (stderr, "%s: Could not get the size of '%s': %s\n", progname,
             rb->file, strerror ((int)-l));
    return 1;
  }
  sf->len = (uint64_t)l;
  /* As qemu-img: without an old backing file the differences are zeros
   * and become zero writes, otherwise data. */
  sf->old_zero = !strata_backing (sf->file);
  if (rb->base) {
    CLEANUP_FREE char *path = relative_to (rb->file, rb->base);
    if (!(sf->newb = open_new_base (rb, srcopts, &sf->newlen)))
      return 1;
    sf->skip_depth = path ? depth_in_chain (sf->file, path, rb->base_fmt) : -1;
  }
  progress_start (&pr, PROGRESS_IMG, NULL, rb->progress, sf->len);
  if ((r = copy_differences (sf, &pr)) < 0) {
    progress_end (&pr, false);
    const char *m = strata_last_error_message ();
    fprintf (stderr,
             "%s: Could not copy the differing data into '%s': "
             "%s\n",
             progname, rb->file, m ? m : strerror (-r));
    return 1;
  }
  if (!set_backing (sf->file, rb))
    return 1;
  progress_end (&pr, true);
  return 0;
}

/* FILE's cluster size and the window compared at a time; -c needs a
 * format that stores compressed clusters. */
static bool
file_geometry (const struct rebase *rb, struct safe *sf)
{
  struct strata_info i = { .size = sizeof i };
  strata_error *err = NULL;

  if (!strata_get_info (sf->file, &i, 0, &err)) {
    fail_err (err);
    return false;
  }
  if (rb->compress && strcmp (i.format, "qcow2") != 0) {
    fail_msg ("Compression not supported for this file format");
    return false;
  }
  sf->compress = rb->compress;
  sf->cluster = i.cluster_size ? i.cluster_size : 512;
  sf->window = MAX (CHUNK, sf->cluster);
  return true;
}

static int
rebase_safe (const struct rebase *rb, const char *cacheopts,
             const char *srcopts)
{
  struct safe sf = { 0 };
  int r;

  if (!(sf.file = open_image (rb->file, rb->fmt, false, true, cacheopts)))
    return 1;
  if (!file_geometry (rb, &sf)) {
    strata_close (sf.file);
    return 1;
  }
  sf.old = malloc (sf.window);
  sf.cur = malloc (sf.window);
  if (!sf.old || !sf.cur) {
    fail_msg ("out of memory");
    r = 1;
  }
  else
    r = rebase_safe_run (rb, &sf, srcopts);
  free (sf.old);
  free (sf.cur);
  if (sf.newb)
    strata_close (sf.newb);
  strata_close (sf.file);
  return r;
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
  if (!img_cache_options (rb.cache, rb.fmt, cacheopts, sizeof cacheopts, &wt))
    return 1;
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
  if (rb.unsafe && rb.compress) {
    fail_msg ("Compression is not supported in unsafe mode");
    return 1;
  }
  if (rb.unsafe)
    return rebase_unsafe (&rb, cacheopts);
  return rebase_safe (&rb, cacheopts, srcopts);
}
