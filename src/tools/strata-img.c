/* strata-img: image tool with qemu-img's subcommands, options, exit codes
 * and JSON field names, so scripts written for qemu-img work unchanged.
 *
 *   create   -f FMT [-b BACKING -F BFMT] [-u] [-o OPTS] [-q] FILE [SIZE]
 *   info     [--output=human|json] [--backing-chain] [-U] [-f FMT] FILE
 *   map      [--output=human|json] [--start-offset=O] [--max-length=L]
 *            [-U] [-f FMT] FILE
 *   check    [-r leaks|all] [--output=human|json] [-U] [-f FMT] [-q] FILE
 *   compare  [-s] [-q] [-U] [-f FMT] [-F FMT] A B
 *   bench    [-c N] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFF] [-w] [-t CACHE]
 *            [-f FMT] [--pattern=P] [--flush-interval=N] [-q] [-U] FILE
 *
 * Exit codes are qemu-img's: 0 success, 1 failure (compare: different),
 * 2 error (compare), and check's 0/1/2/3/63.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <strata/strata.h>

#include "util/checked.h"
#include "util/cleanup.h"
#include "util/opts.h"
#include "tools/img.h"

/* ---- create ---- */

/* Open the backing file PATH of the new image FILENAME, or print
 * qemu-img's two lines on failure. */
static strata_node *
open_backing (const char *filename, const char *path, const char *fmt)
{
  strata_error *err = NULL;
  strata_node *b = strata_open (path, fmt, NULL, STRATA_OPEN_FORCE_SHARE,
                                &err);

  if (!b) {
    fprintf (stderr, "%s: %s: %s\nCould not open backing image.\n",
             progname, filename, strata_error_message (err));
    strata_error_free (err);
  }
  return b;
}

/* -b without -F: as qemu-img 7.2, a backing file's format is never
 * guessed; its message names what probing found (with no newline after
 * it, as qemu-img prints it), unless -u says not to open it.  Returns 1. */
static int
no_backing_format (const char *filename, const char *path, bool unsafe)
{
  struct strata_info info;
  strata_node *b;

  if (unsafe) {
    fprintf (stderr, "%s: %s: Backing file specified without backing "
             "format\n", progname, filename);
    return 1;
  }
  if (!(b = open_backing (filename, path, NULL)))
    return 1;
  if (strata_get_info (b, &info, 0, NULL))
    fprintf (stderr, "%s: %s: Backing file specified without backing "
             "format\nDetected format of %s.", progname, filename,
             info.format);
  strata_close (b);
  return 1;
}

/* qemu-img's "Formatting" line: the creation options in the format's
 * order, each with its value or its default (size-typed ones as bytes),
 * then the file protocol's. */
static void
print_formatting (const char *filename, const char *fmt, const char *all)
{
  static const struct {
    const char *name, *def;
    bool is_size;
  } qcow2[] = {
    { "cluster_size", "65536", true }, { "extended_l2", "off", false },
    { "preallocation", NULL, false },  { "compression_type", "zlib", false },
    { "size", NULL, true },            { "compat", NULL, false },
    { "backing_file", NULL, false },   { "backing_fmt", NULL, false },
    { "data_file", NULL, false },      { "data_file_raw", NULL, false },
    { "encryption", NULL, false },     { "encrypt.format", NULL, false },
    { "lazy_refcounts", "off", false }, { "refcount_bits", "16", false },
    { "nocow", NULL, false },          { "extent_size_hint", NULL, true },
    { NULL, NULL, false },
  }, raw[] = {
    { "size", NULL, true },        { "preallocation", NULL, false },
    { "nocow", NULL, false },      { "extent_size_hint", NULL, true },
    { NULL, NULL, false },
  };
  CLEANUP_OPTS strata_opts *o = opts_new ();
  const __typeof__ (qcow2[0]) *d = strcmp (fmt, "qcow2") ? raw : qcow2;

  printf ("Formatting '%s', fmt=%s", filename, fmt);
  if (!o || !opts_parse (o, all, NULL)) {
    printf ("\n");
    return;
  }
  for (; d->name; d++) {
    const char *v = opts_get (o, d->name);
    uint64_t n;

    if (v && d->is_size && parse_size (v, &n))
      printf (" %s=%" PRIu64, d->name, n);
    else if (v || d->def)
      printf (" %s=%s", d->name, v ? v : d->def);
  }
  printf ("\n");
}

int
cmd_create (int argc, char **argv)
{
  static const struct option lopts[] = {
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  const char *fmt = "raw", *backing = NULL, *bfmt = NULL, *filename;
  CLEANUP_FREE char *options = NULL, *backing_path = NULL;
  CLEANUP_FREE char *opt_backing = NULL, *opt_bfmt = NULL;
  bool quiet = false, unsafe = false;
  uint64_t size = 0;
  bool have_size = false;
  strata_error *err = NULL;
  int c;

  while ((c = getopt_long (argc, argv, ":f:b:F:uo:qh", lopts, NULL)) != -1) {
    switch (c) {
    case 'f': fmt = optarg; break;
    case 'b': backing = optarg; break;
    case 'F': bfmt = optarg; break;
    case 'u': unsafe = true; break;
    case 'q': quiet = true; break;
    case 'o': {
      char *n;
      if (asprintf (&n, "%s%s%s", options ? options : "", options ? "," : "",
                    optarg) < 0)
        return 1;
      free (options);
      options = n;
      break;
    }
    case 'h':
      printf ("usage: %s create [-f FMT] [-b BACKING -F BFMT] [-u] "
              "[-o OPTS] [-q] FILE [SIZE]\n", progname);
      return 0;
    default: return img_option_error (c, argv);
    }
  }
  if (img_has_help_option (options))
    return img_print_create_help (fmt, optind < argc ? argv[optind] : NULL);
  if (optind >= argc)
    return img_usage_error ("Expecting image file name");
  filename = argv[optind++];
  if (optind < argc) {
    const char *s = argv[optind++];
    if (!img_parse_size_arg (s, "image size", &size))
      return 1;
    have_size = true;
  }
  if (optind < argc) {
    char msg[128];
    snprintf (msg, sizeof msg, "Unexpected argument: %.100s", argv[optind]);
    return img_usage_error (msg);
  }
  /* -o size, backing_file and backing_fmt stand for SIZE, -b and -F. */
  if (options) {
    CLEANUP_OPTS strata_opts *o = opts_new ();

    if (o && opts_parse (o, options, NULL)) {
      const char *v = opts_get (o, "size");

      if (v && have_size) {
        fprintf (stderr, "%s: %s: The image size must be specified only "
                 "once\n", progname, filename);
        return 1;
      }
      if (v && parse_size (v, &size) && size <= INT64_MAX)
        have_size = true;
      if (!backing && (v = opts_get (o, "backing_file")))
        backing = opt_backing = strdup (v);
      if (!bfmt && (v = opts_get (o, "backing_fmt")))
        bfmt = opt_bfmt = strdup (v);
    }
  }
  if (!strcmp (fmt, "raw") && (backing || bfmt)) {
    fprintf (stderr, "%s: %s: Backing file %snot supported for file format "
             "'raw'\n", progname, filename, backing ? "" : "format ");
    return 1;
  }
  if (bfmt && !backing) {
    fail_msg ("-F requires -b (a backing file)");
    return 1;
  }
  if (backing && !strcmp (backing, filename)) {
    fprintf (stderr, "%s: %s: Error: Trying to create an image with the "
             "same filename as the backing file\n", progname, filename);
    return 1;
  }
  if (backing && !*backing) {
    fprintf (stderr, "%s: %s: Expected backing file name, got empty "
             "string\n", progname, filename);
    return 1;
  }

  /* A relative backing name is relative to the new image's directory; a
   * URI (nbd://, nbd+unix://) is not a path. */
  if (backing && backing[0] != '/' && strrchr (filename, '/')
      && !strstr (backing, "://")) {
    const char *slash = strrchr (filename, '/');
    if (asprintf (&backing_path, "%.*s%s", (int) (slash - filename + 1),
                  filename, backing) < 0)
      return 1;
  }

  if (backing && !bfmt)
    return no_backing_format (filename,
                              backing_path ? backing_path : backing, unsafe);

  /* The size defaults to the backing file's. */
  if (backing && !have_size) {
    strata_node *b;
    int64_t bsize;

    if (unsafe) {
      fprintf (stderr, "%s: %s: Image creation needs a size parameter\n",
               progname, filename);
      return 1;
    }
    b = open_backing (filename, backing_path ? backing_path : backing, bfmt);
    if (!b)
      return 1;
    bsize = strata_length (b);
    strata_close (b);
    if (bsize < 0) {
      fprintf (stderr, "%s: %s: cannot get the size of the backing file\n",
               progname, backing);
      return 1;
    }
    size = ((uint64_t) bsize + 511) / 512 * 512; /* qemu's length */
    have_size = true;
  }
  else if (backing && !unsafe) {
    /* Make sure the backing file can be opened, as qemu-img does. */
    strata_node *b
        = open_backing (filename, backing_path ? backing_path : backing, bfmt);
    if (!b)
      return 1;
    strata_close (b);
  }
  if (!have_size) {
    fprintf (stderr, "%s: %s: Image creation needs a size parameter\n",
             progname, filename);
    return 1;
  }

  {
    char sizebuf[32];
    CLEANUP_FREE char *all = NULL, *sized = NULL;

    snprintf (sizebuf, sizeof sizebuf, "%" PRIu64, size);
    if (asprintf (&all, "size=%s%s%s%s%s%s%s", sizebuf,
                  backing ? ",backing_file=" : "", backing ? backing : "",
                  bfmt ? ",backing_fmt=" : "", bfmt ? bfmt : "",
                  options ? "," : "", options ? options : "") < 0)
      return 1;
    /* qemu's block layer works in sectors: the image gets the size
     * rounded up to 512 (the Formatting line shows it as given). */
    if (asprintf (&sized, "%s,size=%" PRIu64, all,
                  (size + 511) / 512 * 512) < 0)
      return 1;
    if (!strata_create (filename, fmt, sized, STRATA_CREATE_DRY_RUN, &err)) {
      fail_err (err);
      return 1;
    }
    if (!quiet) {
      print_formatting (filename, fmt, all);
      fflush (stdout);
    }
    if (!strata_create (filename, fmt, sized, 0, &err)) {
      fail_err (err);
      return 1;
    }
  }
  return 0;
}

/* ---- info ---- */

/* The "bitmaps" of a qcow2 v3 image's format-specific data, as qemu-img
 * info lists them (only when there are some). */
static void
info_bitmaps_json (const struct strata_info *i, json_t *d)
{
  struct img_bitmap *l;
  int n = strcmp (i->qcow2.compat, "0.10") ? img_qcow2_bitmaps (i->filename,
                                                                &l)
                                           : 0;
  json_t *arr = json_array ();

  for (int k = 0; k < n; k++) {
    json_t *b = json_object (), *flags = json_array ();

    if (l[k].flags & 1)
      json_array_append_new (flags, json_string ("in-use"));
    if (l[k].flags & 2)
      json_array_append_new (flags, json_string ("auto"));
    json_object_set_new (b, "flags", flags);
    json_object_set_new (b, "name", json_string (l[k].name));
    json_object_set_new (b, "granularity",
                         json_integer (INT64_C (1) << l[k].granularity_bits));
    json_array_append_new (arr, b);
  }
  if (n > 0) {
    json_object_set_new (d, "bitmaps", arr);
    img_bitmaps_free (l, n);
  }
  else
    json_decref (arr);
}

static void
info_bitmaps_human (const struct strata_info *i)
{
  struct img_bitmap *l;
  int n = strcmp (i->qcow2.compat, "0.10") ? img_qcow2_bitmaps (i->filename,
                                                                &l)
                                           : 0;

  if (n > 0)
    printf ("    bitmaps:\n");
  for (int k = 0; k < n; k++) {
    int f = 0;

    printf ("        [%d]:\n            flags:\n", k);
    if (l[k].flags & 1)
      printf ("                [%d]: in-use\n", f++);
    if (l[k].flags & 2)
      printf ("                [%d]: auto\n", f++);
    printf ("            name: %s\n            granularity: %" PRIu64 "\n",
            l[k].name, UINT64_C (1) << l[k].granularity_bits);
  }
  if (n > 0)
    img_bitmaps_free (l, n);
}

static json_t *
info_json (const struct strata_info *i,
           const struct strata_snapshot_info *snaps, int nsnaps)
{
  json_t *o = json_object ();

  if (i->backing_format)
    json_object_set_new (o, "backing-filename-format",
                         json_string (i->backing_format));
  if (nsnaps > 0)
    json_object_set_new (o, "snapshots", snapshot_list_json (snaps, nsnaps));
  json_object_set_new (o, "virtual-size", json_integer (i->virtual_size));
  json_object_set_new (o, "filename", json_string (i->filename));
  if (i->cluster_size)
    json_object_set_new (o, "cluster-size", json_integer (i->cluster_size));
  json_object_set_new (o, "format", json_string (i->format));
  if (!i->actual_size_unknown)
    json_object_set_new (o, "actual-size", json_integer (i->actual_size));
  if (i->format_specific && strcmp (i->format_specific, "qcow2") == 0) {
    json_t *fs = json_object (), *d = json_object ();

    json_object_set_new (fs, "type", json_string ("qcow2"));
    json_object_set_new (d, "compat", json_string (i->qcow2.compat));
    if (strcmp (i->qcow2.compat, "0.10") != 0) {
      json_object_set_new (d, "compression-type",
                           json_string (i->qcow2.compression_type));
      json_object_set_new (d, "lazy-refcounts",
                           json_boolean (i->qcow2.lazy_refcounts));
    }
    else
      json_object_set_new (d, "compression-type",
                           json_string (i->qcow2.compression_type));
    info_bitmaps_json (i, d);
    json_object_set_new (d, "refcount-bits",
                         json_integer (i->qcow2.refcount_bits));
    if (strcmp (i->qcow2.compat, "0.10") != 0) {
      json_object_set_new (d, "corrupt", json_boolean (i->qcow2.corrupt));
      json_object_set_new (d, "extended-l2",
                           json_boolean (i->qcow2.extended_l2));
    }
    json_object_set_new (fs, "data", d);
    json_object_set_new (o, "format-specific", fs);
  }
  if (i->backing_filename) {
    json_object_set_new (o, "full-backing-filename",
                         json_string (i->full_backing_filename
                                          ? i->full_backing_filename
                                          : i->backing_filename));
    json_object_set_new (o, "backing-filename",
                         json_string (i->backing_filename));
  }
  if (!i->dirty_unknown)
    json_object_set_new (o, "dirty-flag", json_boolean (i->dirty));
  return o;
}

static void
info_human (const struct strata_info *i,
            const struct strata_snapshot_info *snaps, int nsnaps)
{
  char s[32];

  printf ("image: %s\n", i->filename);
  printf ("file format: %s\n", i->format);
  size_to_str (i->virtual_size, s, sizeof s);
  printf ("virtual size: %s (%" PRIu64 " bytes)\n", s, i->virtual_size);
  if (i->actual_size_unknown)
    snprintf (s, sizeof s, "unavailable");
  else
    size_to_str (i->actual_size, s, sizeof s);
  printf ("disk size: %s\n", s);
  if (i->cluster_size)
    printf ("cluster_size: %u\n", i->cluster_size);
  if (i->dirty)
    printf ("cleanly shut down: no\n");
  if (i->backing_filename) {
    printf ("backing file: %s", i->backing_filename);
    if (i->full_backing_filename
        && strcmp (i->full_backing_filename, i->backing_filename) != 0)
      printf (" (actual path: %s)", i->full_backing_filename);
    printf ("\n");
    if (i->backing_format)
      printf ("backing file format: %s\n", i->backing_format);
  }
  if (nsnaps > 0) {
    printf ("Snapshot list:\n");
    snapshot_list_human (snaps, nsnaps);
  }
  if (i->format_specific && strcmp (i->format_specific, "qcow2") == 0) {
    printf ("Format specific information:\n");
    printf ("    compat: %s\n", i->qcow2.compat);
    printf ("    compression type: %s\n", i->qcow2.compression_type);
    if (strcmp (i->qcow2.compat, "0.10") != 0)
      printf ("    lazy refcounts: %s\n",
              i->qcow2.lazy_refcounts ? "true" : "false");
    info_bitmaps_human (i);
    printf ("    refcount bits: %d\n", i->qcow2.refcount_bits);
    if (strcmp (i->qcow2.compat, "0.10") != 0) {
      printf ("    corrupt: %s\n", i->qcow2.corrupt ? "true" : "false");
      printf ("    extended l2: %s\n", i->qcow2.extended_l2 ? "true" : "false");
    }
  }
}

int
cmd_info (int argc, char **argv)
{
  static const struct option lopts[] = {
    { "output", required_argument, NULL, 'O' },
    { "backing-chain", no_argument, NULL, 'B' },
    { "force-share", no_argument, NULL, 'U' },
    { "format", required_argument, NULL, 'f' },
    { "help", no_argument, NULL, 'h' },
    IMG_IMAGE_OPTS_OPTION,
    { NULL, 0, NULL, 0 },
  };
  enum output out = OUTPUT_HUMAN;
  bool chain = false, force_share = false;
  const char *fmt = NULL;
  strata_node *top, *n;
  json_t *arr;
  int c, ret = 0;

  while ((c = getopt_long (argc, argv, ":f:Uh", lopts, NULL)) != -1) {
    switch (c) {
    case 'O': if (!parse_output (optarg, &out)) return 1; break;
    case 'B': chain = true; break;
    case 'U': force_share = true; break;
    case 'f': fmt = optarg; break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'h':
      printf ("usage: %s info [--output=human|json] [--backing-chain] [-U] "
              "[-f FMT] FILE\n", progname);
      return 0;
    default: return img_option_error (c, argv);
    }
  }
  if (optind != argc - 1)
    return img_usage_error ("Expecting one image file name");
  /* Without --backing-chain qemu-img does not open the backing file (so
   * an image whose backing file is missing still has its info). */
  top = open_image_flags (argv[optind], fmt,
                          (force_share ? STRATA_OPEN_FORCE_SHARE : 0)
                              | (chain ? 0 : STRATA_OPEN_NO_BACKING),
                          NULL);
  if (!top)
    return 1;
  arr = json_array ();
  for (n = top; n; n = chain ? strata_backing (n) : NULL) {
    struct strata_info info;
    struct strata_snapshot_info *snaps = NULL;
    strata_error *err = NULL;
    CLEANUP_FREE char *full = NULL;
    int nsnaps = 0;

    if (!strata_get_info (n, &info, 0, &err)
        || (nsnaps = strata_snapshot_list (n, &snaps, &err)) < 0) {
      fail_err (err);
      ret = 1;
      break;
    }
    /* Unopened, the backing file is named as the image's directory
     * makes it (qemu's path_combine()). */
    if (!chain && info.backing_filename && !info.full_backing_filename
        && info.backing_filename[0] != '/' && strrchr (argv[optind], '/')) {
      const char *slash = strrchr (argv[optind], '/');
      if (asprintf (&full, "%.*s%s", (int) (slash - argv[optind] + 1),
                    argv[optind], info.backing_filename) < 0)
        full = NULL;
      info.full_backing_filename = full;
    }
    if (out == OUTPUT_JSON)
      json_array_append_new (arr, info_json (&info, snaps, nsnaps));
    else {
      if (n != top)
        printf ("\n");
      info_human (&info, snaps, nsnaps);
    }
    strata_snapshot_list_free (snaps, nsnaps);
  }
  if (ret == 0 && out == OUTPUT_JSON)
    print_json (chain ? arr : json_array_get (arr, 0));
  json_decref (arr);
  strata_close (top);
  return ret;
}

/* ---- map ---- */

struct map_entry {
  uint64_t start, length, offset;
  int depth;
  bool present, zero, data, has_offset;
  const char *file;
};

static bool
map_entry_mergeable (const struct map_entry *a, const struct map_entry *b)
{
  if (a->depth != b->depth || a->present != b->present || a->zero != b->zero
      || a->data != b->data || a->has_offset != b->has_offset)
    return false;
  if (a->has_offset && a->offset + a->length != b->offset)
    return false;
  if ((a->file == NULL) != (b->file == NULL)
      || (a->file && strcmp (a->file, b->file) != 0))
    return false;
  return true;
}

static int
map_entry_print (const struct map_entry *e, enum output out, bool first)
{
  if (out == OUTPUT_JSON) {
    printf ("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64
            ", \"depth\": %d, \"present\": %s, \"zero\": %s, \"data\": %s",
            first ? "" : ",\n", e->start, e->length, e->depth,
            e->present ? "true" : "false", e->zero ? "true" : "false",
            e->data ? "true" : "false");
    if (e->has_offset)
      printf (", \"offset\": %" PRIu64, e->offset);
    printf ("}");
    return 0;
  }
  if (e->data && !e->has_offset) {
    fprintf (stderr, "%s: File contains external, encrypted or compressed "
             "clusters.\n", progname);
    return -1;
  }
  if (e->data && !e->zero)
    printf ("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e->start,
            e->length, e->offset, e->file ? e->file : "");
  return 0;
}

int
cmd_map (int argc, char **argv)
{
  static const struct option lopts[] = {
    { "output", required_argument, NULL, 'O' },
    { "start-offset", required_argument, NULL, 's' },
    { "max-length", required_argument, NULL, 'l' },
    { "force-share", no_argument, NULL, 'U' },
    { "format", required_argument, NULL, 'f' },
    { "help", no_argument, NULL, 'h' },
    IMG_IMAGE_OPTS_OPTION,
    { NULL, 0, NULL, 0 },
  };
  enum output out = OUTPUT_HUMAN;
  bool force_share = false, first = true, have = false;
  const char *fmt = NULL;
  uint64_t start = 0, max_len = UINT64_MAX, end;
  struct map_entry cur = { 0 };
  strata_node *n;
  int64_t size;
  int c, ret = 0;

  while ((c = getopt_long (argc, argv, ":f:Uh", lopts, NULL)) != -1) {
    switch (c) {
    case 'O': if (!parse_output (optarg, &out)) return 1; break;
    case 's':
      if (!img_parse_size_arg (optarg, "start offset", &start))
        return 1;
      break;
    case 'l':
      if (!img_parse_size_arg (optarg, "max length", &max_len))
        return 1;
      break;
    case 'U': force_share = true; break;
    case 'f': fmt = optarg; break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'h':
      printf ("usage: %s map [--output=human|json] [--start-offset=O] "
              "[--max-length=L] [-U] [-f FMT] FILE\n", progname);
      return 0;
    default: return img_option_error (c, argv);
    }
  }
  if (optind != argc - 1)
    return img_usage_error ("Expecting one image file name");
  n = open_image (argv[optind], fmt, force_share, false, NULL);
  if (!n)
    return 1;
  size = strata_length (n);
  if (size < 0) {
    fprintf (stderr, "%s: %s: cannot get the image length\n", progname,
             argv[optind]);
    strata_close (n);
    return 1;
  }
  end = MIN ((uint64_t) size, start > (uint64_t) size ? 0 : start + MIN (max_len, (uint64_t) size - start));
  if (out == OUTPUT_JSON)
    printf ("[");
  else
    printf ("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
  for (uint64_t off = start; off < end && ret == 0;) {
    struct strata_extent e;
    struct map_entry next;
    int r = strata_block_status (n, off, end - off, &e, 0);

    if (r < 0) {
      const char *m = strata_last_error_message ();
      fprintf (stderr, "%s: %s\n", progname, m ? m : strerror (-r));
      ret = 1;
      break;
    }
    next = (struct map_entry){
      .start = off, .length = e.length, .depth = e.depth,
      .present = e.flags & STRATA_BS_ALLOCATED,
      .zero = e.flags & STRATA_BS_ZERO, .data = e.flags & STRATA_BS_DATA,
      .has_offset = e.flags & STRATA_BS_OFFSET, .offset = e.map,
      .file = e.file,
    };
    if (have && map_entry_mergeable (&cur, &next))
      cur.length += next.length;
    else {
      if (have && map_entry_print (&cur, out, first) < 0)
        ret = 1;
      first = first && !have;
      cur = next;
      have = true;
    }
    off += e.length;
  }
  if (ret == 0 && have && map_entry_print (&cur, out, first) < 0)
    ret = 1;
  if (ret == 0 && !have && out == OUTPUT_JSON) {
    /* An empty range still gets one entry, as qemu-img prints it. */
    cur = (struct map_entry){ .start = start };
    map_entry_print (&cur, out, true);
  }
  if (out == OUTPUT_JSON)
    printf ("]\n");
  strata_close (n);
  return ret;
}

/* ---- check ---- */

static void
check_message (void *opaque, const char *line)
{
  (void) opaque;
  fprintf (stderr, "%s\n", line);
}

/* qemu-img prints the summary lines only when not quiet. */
static void
check_human (const struct strata_check_result *r)
{
  if (!(r->corruptions || r->leaks || r->check_errors))
    printf ("No errors were found on the image.\n");
  else {
    if (r->corruptions)
      printf ("\n%" PRId64 " errors were found on the image.\nData may be "
              "corrupted, or further writes to the image may corrupt it.\n",
              r->corruptions);
    if (r->leaks)
      printf ("\n%" PRId64 " leaked clusters were found on the image.\nThis "
              "means waste of disk space, but no harm to data.\n", r->leaks);
    if (r->check_errors)
      printf ("\n%" PRId64 " internal errors have occurred during the "
              "check.\n", r->check_errors);
  }
  if (r->total_clusters && r->allocated_clusters)
    printf ("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated, %0.2f%% "
            "fragmented, %0.2f%% compressed clusters\n",
            r->allocated_clusters, r->total_clusters,
            r->allocated_clusters * 100.0 / r->total_clusters,
            r->fragmented_clusters * 100.0 / r->allocated_clusters,
            r->compressed_clusters * 100.0 / r->allocated_clusters);
  if (r->image_end_offset)
    printf ("Image end offset: %" PRIu64 "\n", r->image_end_offset);
}

/* qemu-img's ImageCheck as JSON: optional fields only when non-zero, in
 * the order its QDict iterates them (by key hash), so the text matches. */
static void
check_json (const struct strata_check_result *r, const char *filename,
            const char *format)
{
  json_t *j = json_object ();

#define OPT(key, v) \
  if (v) json_object_set_new (j, key, json_integer ((json_int_t) (v)))
  OPT ("image-end-offset", r->image_end_offset);
  OPT ("compressed-clusters", r->compressed_clusters);
  OPT ("total-clusters", r->total_clusters);
  OPT ("corruptions", r->corruptions);
  OPT ("corruptions-fixed", r->corruptions_fixed);
  json_object_set_new (j, "check-errors", json_integer (r->check_errors));
  OPT ("leaks", r->leaks);
  OPT ("leaks-fixed", r->leaks_fixed);
  OPT ("allocated-clusters", r->allocated_clusters);
  json_object_set_new (j, "filename", json_string (filename));
  json_object_set_new (j, "format", json_string (format));
  OPT ("fragmented-clusters", r->fragmented_clusters);
#undef OPT
  print_json (j);
  json_decref (j);
}

int
cmd_check (int argc, char **argv)
{
  static const struct option lopts[] = {
    { "output", required_argument, NULL, 'O' },
    { "repair", required_argument, NULL, 'r' },
    { "force-share", no_argument, NULL, 'U' },
    { "format", required_argument, NULL, 'f' },
    { "help", no_argument, NULL, 'h' },
    IMG_IMAGE_OPTS_OPTION,
    { NULL, 0, NULL, 0 },
  };
  enum output out = OUTPUT_HUMAN;
  bool force_share = false, quiet = false;
  const char *fmt = NULL, *filename;
  unsigned fix = 0;
  struct strata_check_result res = { .message = check_message };
  struct strata_info info;
  strata_error *err = NULL;
  strata_node *node;
  int c, r;

  while ((c = getopt_long (argc, argv, ":f:r:Uqh", lopts, NULL)) != -1) {
    switch (c) {
    case 'O': if (!parse_output (optarg, &out)) return 1; break;
    case 'U': force_share = true; break;
    case 'f': fmt = optarg; break;
    case 'q': quiet = true; break;
    case 'r':
      if (strcmp (optarg, "leaks") == 0)
        fix = STRATA_CHECK_FIX_LEAKS;
      else if (strcmp (optarg, "all") == 0)
        fix = STRATA_CHECK_FIX_LEAKS | STRATA_CHECK_FIX_ERRORS;
      else {
        char msg[160];
        snprintf (msg, sizeof msg, "Unknown option value for -r (expecting "
                  "'leaks' or 'all'): %.80s", optarg);
        return img_usage_error (msg);
      }
      break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'h':
      printf ("usage: %s check [-r leaks|all] [--output=human|json] [-U] "
              "[-f FMT] [-q] FILE\n", progname);
      return 0;
    default: return img_option_error (c, argv);
    }
  }
  if (optind != argc - 1)
    return img_usage_error ("Expecting one image file name");
  filename = argv[optind];
  if (force_share && fix) {
    fprintf (stderr, "%s: Could not open '%s': force-share=on can only be "
             "used with read-only images\n", progname, filename);
    return 1;
  }
  node = open_image (filename, fmt, force_share, fix != 0, NULL);
  if (!node)
    return 1;
  if (!strata_get_info (node, &info, 0, &err)) {
    fail_err (err);
    strata_close (node);
    return 1;
  }
  r = strata_check (node, &res, fix, &err);
  if (r == -ENOTSUP) {
    fprintf (stderr, "%s: This image format does not support checks\n",
             progname);
    strata_error_free (err);
    strata_close (node);
    return 63;
  }
  if (r == 0 && (res.corruptions_fixed || res.leaks_fixed)) {
    int64_t leaks_fixed = res.leaks_fixed;
    int64_t corruptions_fixed = res.corruptions_fixed;

    if (out == OUTPUT_HUMAN && !quiet)
      printf ("The following inconsistencies were found and repaired:\n\n"
              "    %" PRId64 " leaked clusters\n    %" PRId64 " corruptions"
              "\n\nDouble checking the fixed image now...\n", leaks_fixed,
              corruptions_fixed);
    r = strata_check (node, &res, 0, &err);
    res.leaks_fixed = leaks_fixed;
    res.corruptions_fixed = corruptions_fixed;
  }
  if (r == 0 && !quiet) {
    if (out == OUTPUT_JSON)
      check_json (&res, filename, info.format);
    else
      check_human (&res);
  }
  fflush (stdout);
  strata_close (node);
  if (r < 0 || res.check_errors) {
    fprintf (stderr, "%s: Check failed%s%s\n", progname, r < 0 ? ": " : "",
             r < 0 ? strata_error_message (err) : "");
    strata_error_free (err);
    return 1;
  }
  return res.corruptions ? 2 : res.leaks ? 3 : 0;
}

/* ---- compare ---- */

#define COMPARE_CHUNK (1u << 20)

/* Is [off, off+len) of N all zeros?  Sets *bad to the first nonzero byte. */
static int
range_is_zero (strata_node *n, uint64_t off, uint64_t len, uint8_t *buf,
               uint64_t *bad)
{
  while (len) {
    struct strata_extent e;
    uint64_t chunk;
    int r = strata_block_status (n, off, len, &e, 0);

    if (r < 0)
      return r;
    chunk = MIN (e.length, COMPARE_CHUNK);
    if (!(e.flags & STRATA_BS_ZERO)) {
      r = strata_pread (n, buf, chunk, off, 0);
      if (r < 0)
        return r;
      for (uint64_t i = 0; i < chunk; i++) {
        if (buf[i]) {
          *bad = off + i;
          return 0;
        }
      }
    }
    off += chunk;
    len -= chunk;
  }
  *bad = UINT64_MAX;
  return 0;
}

/* Whether A and B have one format: a raw image's block status (from the
 * file below it) never equals a qcow2 image's in qemu-img. */
static bool
same_driver (strata_node *a, strata_node *b)
{
  struct strata_info ia, ib;

  return strata_get_info (a, &ia, 0, NULL) && strata_get_info (b, &ib, 0, NULL)
         && strcmp (ia.format, ib.format) == 0;
}

#define STRICT_BS                                                            \
  (STRATA_BS_ALLOCATED | STRATA_BS_ZERO | STRATA_BS_DATA | STRATA_BS_OFFSET)

int
cmd_compare (int argc, char **argv)
{
  static const struct option lopts[] = {
    { "force-share", no_argument, NULL, 'U' },
    { "help", no_argument, NULL, 'h' },
    IMG_IMAGE_OPTS_OPTION,
    { NULL, 0, NULL, 0 },
  };
  const char *fmt_a = NULL, *fmt_b = NULL;
  bool strict = false, quiet = false, force_share = false, same_format;
  strata_node *a = NULL, *b = NULL;
  CLEANUP_FREE uint8_t *ba = NULL, *bb = NULL;
  int64_t la, lb;
  uint64_t common, off, bad = UINT64_MAX;
  int c, ret = 2, r = 0;

  while ((c = getopt_long (argc, argv, ":f:F:sqpUh", lopts, NULL)) != -1) {
    switch (c) {
    case 'f': fmt_a = optarg; break;
    case 'F': fmt_b = optarg; break;
    case 's': strict = true; break;
    case 'q': quiet = true; break;
    case 'p': break;  /* progress: not shown yet */
    case 'U': force_share = true; break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'h':
      printf ("usage: %s compare [-s] [-q] [-U] [-f FMT] [-F FMT] A B\n",
              progname);
      return 0;
    default: return img_option_error (c, argv);
    }
  }
  if (optind != argc - 2)
    return img_usage_error ("Expecting two image file names");
  if (!(a = open_image (argv[optind], fmt_a, force_share, false, NULL))
      || !(b = open_image (argv[optind + 1], fmt_b, force_share, false, NULL)))
    goto out;
  la = strata_length (a);
  lb = strata_length (b);
  ba = malloc (COMPARE_CHUNK);
  bb = malloc (COMPARE_CHUNK);
  if (la < 0 || lb < 0 || !ba || !bb) {
    fail_msg ("cannot get the image sizes");
    goto out;
  }
  if (strict && la != lb) {
    if (!quiet)
      printf ("Strict mode: Image size mismatch!\n");
    ret = 1;
    goto out;
  }
  common = MIN (la, lb);
  same_format = same_driver (a, b);
  for (off = 0; off < common;) {
    struct strata_extent ea, eb;
    uint64_t chunk;

    if ((r = strata_block_status (a, off, common - off, &ea, 0)) < 0
        || (r = strata_block_status (b, off, common - off, &eb, 0)) < 0)
      break;
    chunk = MIN (MIN (ea.length, eb.length), COMPARE_CHUNK);
    /* qemu-img compares the whole block status in strict mode: where
     * the data is (an offset, or none for a compressed cluster) too. */
    if (strict
        && ((ea.flags & STRICT_BS) != (eb.flags & STRICT_BS)
            || !same_format)) {
      if (!quiet)
        printf ("Strict mode: Offset %" PRIu64 " block status mismatch!\n",
                off);
      ret = 1;
      goto out;
    }
    if (!((ea.flags & STRATA_BS_ZERO) && (eb.flags & STRATA_BS_ZERO))) {
      if ((r = strata_pread (a, ba, chunk, off, 0)) < 0
          || (r = strata_pread (b, bb, chunk, off, 0)) < 0)
        break;
      if (memcmp (ba, bb, chunk) != 0) {
        uint64_t i = 0;
        while (ba[i] == bb[i])
          i++;
        bad = off + i;
        break;
      }
    }
    off += chunk;
  }
  if (r < 0) {
    const char *m = strata_last_error_message ();
    fprintf (stderr, "%s: Error while reading offset %" PRIu64 ": %s\n",
             progname, off, m ? m : strerror (-r));
    goto out;
  }
  if (bad == UINT64_MAX && la != lb) {
    strata_node *longer = la > lb ? a : b;
    uint64_t llen = MAX (la, lb);

    if (!quiet)
      printf ("Warning: Image size mismatch!\n");
    if ((r = range_is_zero (longer, common, llen - common, ba, &bad)) < 0) {
      fprintf (stderr, "%s: Error while reading offset %" PRIu64 "\n",
               progname, common);
      goto out;
    }
  }
  if (bad != UINT64_MAX) {
    /* qemu-img reports the 512-byte sector where the difference starts. */
    if (!quiet)
      printf ("Content mismatch at offset %" PRIu64 "!\n",
              ROUND_DOWN (bad, 512));
    ret = 1;
  }
  else {
    if (!quiet)
      printf ("Images are identical.\n");
    ret = 0;
  }

out:
  if (b)
    strata_close (b);
  if (a)
    strata_close (a);
  return ret;
}


/* ---- bench ---- */

struct bench {
  strata_node *node;
  bool write;
  bool writethrough;              /* -t writethrough/directsync: FUA */
  uint64_t count, bufsize, offset, step, size, flush_interval;
  int pattern;
  atomic_uint_fast64_t next;      /* index of the next request to issue */
  atomic_uint_fast64_t done;
  atomic_int error;               /* first failure, as a negative errno */
  pthread_mutex_t flush_lock;
};

static void *
bench_worker (void *arg)
{
  struct bench *b = arg;
  CLEANUP_FREE uint8_t *buf = NULL;

  if (posix_memalign ((void **) &buf, 4096, b->bufsize)) {
    atomic_store (&b->error, -ENOMEM);
    return NULL;
  }
  memset (buf, b->pattern, b->bufsize);
  for (;;) {
    uint64_t i = atomic_fetch_add (&b->next, 1);
    uint64_t off;
    int r;

    if (i >= b->count || atomic_load (&b->error))
      break;
    /* Request i starts at offset + i * step, wrapped around the image
     * after the first request, as qemu-img bench does. */
    off = i == 0 ? b->offset
                 : (uint64_t) (((unsigned __int128) b->offset
                                + (unsigned __int128) i * b->step) % b->size);
    r = b->write ? strata_pwrite (b->node, buf, b->bufsize, off,
                                  b->writethrough ? STRATA_REQ_FUA : 0)
                 : strata_pread (b->node, buf, b->bufsize, off, 0);
    if (r == 0 && b->flush_interval
        && (atomic_fetch_add (&b->done, 1) + 1) % b->flush_interval == 0) {
      pthread_mutex_lock (&b->flush_lock);
      r = strata_flush (b->node, 0);
      pthread_mutex_unlock (&b->flush_lock);
    }
    if (r < 0) {
      int expected = 0;
      atomic_compare_exchange_strong (&b->error, &expected, r);
      break;
    }
  }
  return NULL;
}

int
cmd_bench (int argc, char **argv)
{
  static const struct option lopts[] = {
    { "flush-interval", required_argument, NULL, 'I' },
    { "no-drain", no_argument, NULL, 'D' },
    { "pattern", required_argument, NULL, 'P' },
    { "force-share", no_argument, NULL, 'U' },
    { "help", no_argument, NULL, 'h' },
    IMG_IMAGE_OPTS_OPTION,
    { NULL, 0, NULL, 0 },
  };
  struct bench b = { .count = 75000, .bufsize = 4096, .pattern = 0 };
  const char *fmt = NULL, *cache = "writeback";
  uint64_t depth = 64;
  bool quiet = false, force_share = false, step_set = false;
  bool no_drain = false;
  char extra[128];
  pthread_t *th;
  double t0, t1;
  int64_t size;
  int c;

  while ((c = getopt_long (argc, argv, ":c:d:f:i:no:qs:S:t:wUh", lopts,
                           NULL)) != -1) {
    switch (c) {
    case 'c':
      if (!parse_size (optarg, &b.count) || b.count == 0
          || b.count > INT_MAX) {
        fprintf (stderr, "%s: Invalid request count specified\n", progname);
        return 1;
      }
      break;
    case 'd':
      if (!parse_size (optarg, &depth) || depth == 0 || depth > 4096) {
        fprintf (stderr, "%s: Invalid queue depth specified\n", progname);
        return 1;
      }
      break;
    case 'f': fmt = optarg; break;
    case 'i': case 'n': break;   /* aio modes: strata uses threads */
    case 'o':
      if (!parse_size (optarg, &b.offset) || b.offset > INT64_MAX) {
        fprintf (stderr, "%s: Invalid offset specified\n", progname);
        return 1;
      }
      break;
    case 'q': quiet = true; break;
    case 's':
      if (!parse_size (optarg, &b.bufsize) || b.bufsize == 0
          || b.bufsize > INT_MAX) {
        fprintf (stderr, "%s: Invalid buffer size specified\n", progname);
        return 1;
      }
      break;
    case 'S':
      if (!parse_size (optarg, &b.step) || b.step > INT64_MAX) {
        fprintf (stderr, "%s: Invalid step size specified\n", progname);
        return 1;
      }
      step_set = true;
      break;
    case 't': cache = optarg; break;
    case 'w': b.write = true; break;
    case 'I':
      if (!parse_size (optarg, &b.flush_interval)
          || b.flush_interval > INT_MAX) {
        fprintf (stderr, "%s: Invalid flush interval specified\n",
                 progname);
        return 1;
      }
      break;
    case 'D': no_drain = true; break;
    case 'P': {
      char *end;
      long p = strtol (optarg, &end, 0);
      if (*optarg == '\0' || *end || p < 0 || p > 0xff) {
        fprintf (stderr, "%s: Invalid pattern byte specified\n", progname);
        return 1;
      }
      b.pattern = (int) p;
      break;
    }
    case 'U': force_share = true; break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'h':
      printf ("usage: %s bench [-c count] [-d depth] [-f fmt] "
              "[--flush-interval=N] [--no-drain] [-o offset] "
              "[--pattern=P] [-q] [-s size] [-S step] [-t cache] [-w] [-U] "
              "FILE\n", progname);
      return 0;
    default: return img_option_error (c, argv);
    }
  }
  if (optind != argc - 1)
    return img_usage_error ("Expecting one image file name");
  if (b.flush_interval && !b.write) {
    fail_msg ("--flush-interval is only available in write tests");
    return 1;
  }
  if (no_drain && !b.flush_interval) {
    fail_msg ("--no-drain requires --flush-interval");
    return 1;
  }
  if (!step_set)
    b.step = b.bufsize;
  if (!cache_mode_options (cache, fmt, extra, sizeof extra,
                           &b.writethrough)) {
    fprintf (stderr, "%s: Invalid cache mode\n", progname);
    return 1;
  }
  b.node = open_image (argv[optind], fmt, force_share, b.write, extra);
  if (!b.node)
    return 1;
  size = strata_length (b.node);
  if (size <= 0) {
    fprintf (stderr, "%s: %s: the image is empty\n", progname, argv[optind]);
    strata_close (b.node);
    return 1;
  }
  b.size = size;
  if (!quiet)
    printf ("Sending %" PRIu64 " %s requests, %" PRIu64 " bytes each, %" PRIu64
            " in parallel (starting at offset %" PRIu64 ", step size %" PRIu64
            ")\n", b.count, b.write ? "write" : "read", b.bufsize, depth,
            b.offset, b.step);
  fflush (stdout);
  depth = MIN (depth, b.count);
  th = calloc (depth, sizeof *th);
  pthread_mutex_init (&b.flush_lock, NULL);
  t0 = now ();
  for (uint64_t i = 0; th && i < depth; i++)
    if (pthread_create (&th[i], NULL, bench_worker, &b) != 0)
      atomic_store (&b.error, -EAGAIN);
  for (uint64_t i = 0; th && i < depth; i++)
    if (th[i])
      pthread_join (th[i], NULL);
  /* Timed up to the last completion, as qemu-img bench times it; the
   * flush on close below is outside the measurement for both tools. */
  t1 = now ();
  if (b.write && !atomic_load (&b.error)) {
    int r = strata_flush (b.node, 0);
    if (r < 0)
      atomic_store (&b.error, r);
  }
  free (th);
  pthread_mutex_destroy (&b.flush_lock);
  strata_close (b.node);
  if (atomic_load (&b.error)) {
    const char *m = strata_last_error_message ();
    fprintf (stderr, "%s: Failed request: %s\n", progname,
             m ? m : strerror (-atomic_load (&b.error)));
    return 1;
  }
  if (!quiet)
    printf ("Run completed in %3.3f seconds.\n", t1 - t0);
  return 0;
}

/* ---- main ---- */

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
    printf ("strata-img version 0.1.0\n");
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
