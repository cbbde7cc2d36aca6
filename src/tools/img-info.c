/* strata-img info: an image's (or with --backing-chain, every layer's)
 * description, as qemu-img info (7.2) prints it.
 *
 *   info [--output=human|json] [--backing-chain] [-U] [-f FMT] FILE
 *
 * The JSON keys come in the order qemu-img's QDict iterates them, so the
 * text matches byte for byte; qcow2's format-specific data (and its
 * persistent bitmaps) follow the generic fields.  Without --backing-chain
 * the backing file is not opened, so an image whose backing file is
 * missing still has its info.
 */
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <strata/strata.h>

#include "checked.h"
#include "cleanup.h"
#include "opts.h"
#include "img.h"

/* The persistent bitmaps of a qcow2 v3 image, for its format-specific
 * data: the count (0 for none, and for a v2 image, which holds none), or
 * -1 when they cannot be listed (the error is printed). */
static int
info_bitmaps (strata_node *n, const struct strata_qcow2_info *q,
              struct strata_bitmap_info ***l)
{
  strata_error *err = NULL;
  size_t count;

  *l = NULL;
  if (strcmp (q->compat, "0.10") == 0)
    return 0;
  if (!strata_bitmap_list (n, l, &count, 0, &err)) {
    fail_err (err);
    return -1;
  }
  return (int) count;
}

/* The "bitmaps" of the format-specific data, as qemu-img info lists them
 * (only when there are some). */
static void
info_bitmaps_json (struct strata_bitmap_info **l, int n, json_t *d)
{
  json_t *arr;

  if (n <= 0)
    return;
  arr = json_array ();
  for (int k = 0; k < n; k++) {
    json_t *b = json_object (), *flags = json_array ();

    if (l[k]->flags & STRATA_BITMAP_IN_USE)
      json_array_append_new (flags, json_string ("in-use"));
    if (l[k]->flags & STRATA_BITMAP_AUTO)
      json_array_append_new (flags, json_string ("auto"));
    json_object_set_new (b, "flags", flags);
    json_object_set_new (b, "name", json_string (l[k]->name));
    json_object_set_new (b, "granularity", json_integer (l[k]->granularity));
    json_array_append_new (arr, b);
  }
  json_object_set_new (d, "bitmaps", arr);
}

static void
info_bitmaps_human (struct strata_bitmap_info **l, int n)
{
  if (n > 0)
    printf ("    bitmaps:\n");
  for (int k = 0; k < n; k++) {
    int f = 0;

    printf ("        [%d]:\n            flags:\n", k);
    if (l[k]->flags & STRATA_BITMAP_IN_USE)
      printf ("                [%d]: in-use\n", f++);
    if (l[k]->flags & STRATA_BITMAP_AUTO)
      printf ("                [%d]: auto\n", f++);
    printf ("            name: %s\n            granularity: %" PRIu64 "\n",
            l[k]->name, l[k]->granularity);
  }
}

static json_t *
info_json (const struct strata_info *i, const struct strata_qcow2_info *q,
           struct strata_snapshot_info *const *snaps, size_t nsnaps,
           struct strata_bitmap_info **bitmaps, int nbitmaps)
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
    json_object_set_new (d, "compat", json_string (q->compat));
    if (strcmp (q->compat, "0.10") != 0) {
      json_object_set_new (d, "compression-type",
                           json_string (q->compression_type));
      json_object_set_new (d, "lazy-refcounts",
                           json_boolean (q->lazy_refcounts));
    }
    else
      json_object_set_new (d, "compression-type",
                           json_string (q->compression_type));
    info_bitmaps_json (bitmaps, nbitmaps, d);
    json_object_set_new (d, "refcount-bits",
                         json_integer (q->refcount_bits));
    if (strcmp (q->compat, "0.10") != 0) {
      json_object_set_new (d, "corrupt", json_boolean (q->corrupt));
      json_object_set_new (d, "extended-l2",
                           json_boolean (q->extended_l2));
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
info_human (const struct strata_info *i, const struct strata_qcow2_info *q,
            struct strata_snapshot_info *const *snaps, size_t nsnaps,
            struct strata_bitmap_info **bitmaps, int nbitmaps)
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
    printf ("    compat: %s\n", q->compat);
    printf ("    compression type: %s\n", q->compression_type);
    if (strcmp (q->compat, "0.10") != 0)
      printf ("    lazy refcounts: %s\n",
              q->lazy_refcounts ? "true" : "false");
    info_bitmaps_human (bitmaps, nbitmaps);
    printf ("    refcount bits: %d\n", q->refcount_bits);
    if (strcmp (q->compat, "0.10") != 0) {
      printf ("    corrupt: %s\n", q->corrupt ? "true" : "false");
      printf ("    extended l2: %s\n", q->extended_l2 ? "true" : "false");
    }
  }
}

struct info {
  enum output out;
  bool chain, force_share;
  const char *fmt, *filename;
};

/* 0 when parsed, else the exit code. */
static int
parse_args (int argc, char **argv, struct info *in)
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
  int c;

  while ((c = getopt_long (argc, argv, ":f:Uh", lopts, NULL)) != -1) {
    switch (c) {
    case 'O':
      if (!parse_output (optarg, &in->out))
        return 1;
      break;
    case 'B': in->chain = true; break;
    case 'U': in->force_share = true; break;
    case 'f': in->fmt = optarg; break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'h':
      printf ("usage: %s info [--output=human|json] [--backing-chain] [-U] "
              "[-f FMT] FILE\n", progname);
      exit (0);
    default: return img_option_error (c, argv);
    }
  }
  if (optind != argc - 1)
    return img_usage_error ("Expecting one image file name");
  in->filename = argv[optind];
  return 0;
}

/* Add N's description to ARR (JSON) or print it; false on failure. */
static bool
info_node (const struct info *in, strata_node *n, bool first, json_t *arr)
{
  struct strata_info info = { .size = sizeof info };
  struct strata_qcow2_info q = { .size = sizeof q };
  struct strata_snapshot_info **snaps = NULL;
  struct strata_bitmap_info **bitmaps = NULL;
  strata_error *err = NULL;
  CLEANUP_FREE char *full = NULL;
  const char *filename = in->filename;
  size_t nsnaps = 0;
  int nbitmaps = 0;

  if (!strata_get_info (n, &info, 0, &err)
      || !strata_snapshot_list (n, &snaps, &nsnaps, 0, &err)
      || (info.format_specific && strcmp (info.format_specific, "qcow2") == 0
          && !strata_get_qcow2_info (n, &q, 0, &err))) {
    fail_err (err);
    strata_snapshot_list_free (snaps, nsnaps);
    return false;
  }
  if (info.format_specific && strcmp (info.format_specific, "qcow2") == 0
      && (nbitmaps = info_bitmaps (n, &q, &bitmaps)) < 0) {
    strata_snapshot_list_free (snaps, nsnaps);
    return false;
  }
  /* Unopened, the backing file is named as the image's directory
   * makes it (qemu's path_combine()). */
  if (!in->chain && info.backing_filename && !info.full_backing_filename
      && info.backing_filename[0] != '/' && strrchr (filename, '/')) {
    const char *slash = strrchr (filename, '/');
    if (asprintf (&full, "%.*s%s", (int)(slash - filename + 1), filename,
                  info.backing_filename)
        < 0)
      full = NULL;
    info.full_backing_filename = full;
  }
  if (in->out == OUTPUT_JSON)
    json_array_append_new (arr, info_json (&info, &q, snaps, nsnaps, bitmaps,
                                           nbitmaps));
  else {
    if (!first)
      printf ("\n");
    info_human (&info, &q, snaps, nsnaps, bitmaps, nbitmaps);
  }
  strata_snapshot_list_free (snaps, nsnaps);
  strata_bitmap_list_free (bitmaps);
  return true;
}

static int
info_run (const struct info *in)
{
  strata_node *top, *n;
  json_t *arr;
  int ret = 0;

  /* Without --backing-chain qemu-img does not open the backing file (so
   * an image whose backing file is missing still has its info). */
  top = open_image_flags (in->filename, in->fmt,
                          (in->force_share ? STRATA_OPEN_FORCE_SHARE : 0)
                              | (in->chain ? 0 : STRATA_OPEN_NO_BACKING),
                          NULL);
  if (!top)
    return 1;
  arr = json_array ();
  for (n = top; n; n = in->chain ? strata_backing (n) : NULL) {
    if (!info_node (in, n, n == top, arr)) {
      ret = 1;
      break;
    }
  }
  if (ret == 0 && in->out == OUTPUT_JSON)
    print_json (in->chain ? arr : json_array_get (arr, 0));
  json_decref (arr);
  strata_close (top);
  return ret;
}

int
cmd_info (int argc, char **argv)
{
  struct info in = { .out = OUTPUT_HUMAN };
  int r = parse_args (argc, argv, &in);

  return r ? r : info_run (&in);
}
