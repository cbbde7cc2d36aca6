/* strata-img measure: the file size an image would need (qemu-img measure).
 *
 *   measure [--output=human|json] [-O FMT] [-o OPTS] [-U]
 *           (--size SIZE | [-f FMT] FILE)
 *
 * The numbers come from the output format's driver (strata_measure).  The
 * "bitmaps" line appears where qemu-img 7.2 prints it: when both the
 * source and the output can hold persistent bitmaps (a qcow2 v3 source and
 * a qcow2 v3 output), with the size qemu-img counts for the source's
 * persistent bitmaps, read from its bitmap directory.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <strata/strata.h>

#include "cleanup.h"
#include "opts.h"
#include "img.h"

/* Append OPT to the comma-separated list *LIST (-o may repeat). */
static bool
append_opt (char **list, const char *opt)
{
  char *n;

  if (asprintf (&n, "%s%s%s", *list ? *list : "", *list ? "," : "", opt) < 0)
    return false;
  free (*list);
  *list = n;
  return true;
}

/* Whether OPTIONS ask for a qcow2 v2 image (compat=0.10). */
static bool
wants_compat_v2 (const char *options)
{
  CLEANUP_OPTS strata_opts *o = opts_new ();
  const char *c;

  if (!o || !options || !opts_parse (o, options, NULL))
    return false;
  c = opts_get (o, "compat");
  return c && strcmp (c, "0.10") == 0;
}

/* A qcow2 v3 source can hold persistent bitmaps. */
static bool
src_has_bitmap_support (strata_node *src)
{
  struct strata_info info = { .size = sizeof info };
  struct strata_qcow2_info q = { .size = sizeof q };
  strata_error *err = NULL;

  if (!strata_get_info (src, &info, 0, &err)) {
    strata_error_free (err);
    return false;
  }
  return info.format_specific && strcmp (info.format_specific, "qcow2") == 0
         && strata_get_qcow2_info (src, &q, 0, NULL)
         && strcmp (q.compat, "0.10") != 0;
}

/* What the persistent bitmaps of SRC (VSIZE bytes) would take in a qcow2
 * output with CLUSTER-byte clusters, as qemu-img measure counts them: each
 * bitmap's data and table clusters, and the directory.  A source whose
 * bitmaps cannot be listed counts none. */
static uint64_t
bitmaps_size (strata_node *src, uint64_t vsize, uint64_t cluster)
{
  struct strata_bitmap_info **l;
  strata_error *err = NULL;
  uint64_t total = 0, dir_bytes = 0;
  size_t n;

  if (!strata_bitmap_list (src, &l, &n, 0, &err)) {
    strata_error_free (err);
    return 0;
  }
  for (size_t i = 0; i < n; i++) {
    uint64_t g = l[i]->granularity;
    uint64_t bits = vsize / g + !!(vsize % g);
    uint64_t clusters = (bits + cluster * 8 - 1) / (cluster * 8);

    total += clusters * cluster
             + (clusters * 8 + cluster - 1) / cluster * cluster;
    dir_bytes += (24 + strlen (l[i]->name) + 7) & ~7ull;
  }
  strata_bitmap_list_free (l);
  return total + (dir_bytes + cluster - 1) / cluster * cluster;
}

/* The output's cluster size from OPTIONS (-o cluster_size), 64k by
 * default. */
static uint64_t
output_cluster_size (const char *options)
{
  CLEANUP_OPTS strata_opts *o = opts_new ();
  const char *v;
  uint64_t n;

  if (o && options && opts_parse (o, options, NULL)
      && (v = opts_get (o, "cluster_size")) && parse_size (v, &n) && n)
    return n;
  return 65536;
}

static void
measure_print (enum output out, uint64_t required, uint64_t full, bool bitmaps,
               uint64_t bitmap_bytes)
{
  if (out == OUTPUT_JSON) {
    json_t *o = json_object ();
    if (bitmaps)
      json_object_set_new (o, "bitmaps", json_integer (bitmap_bytes));
    json_object_set_new (o, "required", json_integer (required));
    json_object_set_new (o, "fully-allocated", json_integer (full));
    print_json (o);
    json_decref (o);
    return;
  }
  printf ("required size: %" PRIu64 "\n", required);
  printf ("fully allocated size: %" PRIu64 "\n", full);
  if (bitmaps)
    printf ("bitmaps size: %" PRIu64 "\n", bitmap_bytes);
}

/* qemu-img's words for formats it knows but cannot measure, and for -o
 * help (which measure does not take); false after printing them. */
static bool
measurable (const char *ofmt, const char *options)
{
  static const char *const other[]
      = { "vmdk", "vdi", "vpc", "vhdx", "qed", "qcow", "parallels", NULL };

  for (const char *const *f = other; *f; f++)
    if (!strcmp (ofmt, *f)) {
      fprintf (stderr,
               "%s: Block driver '%s' does not support size "
               "measurement\n",
               progname, ofmt);
      return false;
    }
  if (img_has_help_option (options)) {
    fprintf (stderr,
             "%s: Invalid parameter '%s'\n%s: Invalid options for "
             "file format '%s'\n",
             progname, strstr (options, "help") ? "help" : "?", progname,
             ofmt);
    return false;
  }
  return true;
}

/* ERR from strata_measure as qemu-img words it: an unknown option is
 * "Invalid parameter" then "Invalid options for file format". */
static void
measure_fail (const char *ofmt, strata_error *err)
{
  const char *m = strata_error_message (err);
  const char *p = strstr (m, "Invalid parameter '");

  if (p) {
    fprintf (stderr, "%s: %s\n%s: Invalid options for file format '%s'\n",
             progname, p, progname, ofmt);
    strata_error_free (err);
    return;
  }
  fail_err (err);
}

int
cmd_measure (int argc, char **argv)
{
  static const struct option lopts[] = {
    { "output", required_argument, NULL, 'J' },
    { "size", required_argument, NULL, 's' },
    { "force-share", no_argument, NULL, 'U' },
    { "format", required_argument, NULL, 'f' },
    { "help", no_argument, NULL, 'h' },
    IMG_IMAGE_OPTS_OPTION,
    { NULL, 0, NULL, 0 },
  };
  enum output out = OUTPUT_HUMAN;
  const char *fmt = NULL, *ofmt = "raw", *filename = NULL, *snapshot = NULL;
  CLEANUP_FREE char *options = NULL, *all = NULL;
  bool force_share = false, have_size = false, bitmaps = false;
  uint64_t size = 0, required, full, bitmap_bytes = 0;
  strata_node *src = NULL;
  strata_error *err = NULL;
  int c;

  while ((c = getopt_long (argc, argv, "f:O:o:l:Uh", lopts, NULL)) != -1) {
    switch (c) {
    case 'J':
      if (!parse_output (optarg, &out))
        return 1;
      break;
    case 'f': fmt = optarg; break;
    case 'O': ofmt = optarg; break;
    case 'U': force_share = true; break;
    case 'o':
      if (!append_opt (&options, optarg))
        return 1;
      break;
    case 'l': snapshot = optarg; break;
    case 's':
      if (optarg[0] == '-' || !parse_size (optarg, &size)) {
        fail_msg ("Invalid image size specified. You may use k, M, G, T, "
                  "P or E suffixes for");
        fail_msg ("kilobytes, megabytes, gigabytes, terabytes, petabytes "
                  "and exabytes.");
        return 1;
      }
      if (size > INT64_MAX) {
        fail_msg ("Invalid image size specified. Must be between 0 and "
                  "9223372036854775807.");
        return 1;
      }
      have_size = true;
      break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'h':
      printf ("usage: %s measure [--output=human|json] [-O FMT] [-o OPTS] "
              "[--size N | [-f FMT] [-U] FILE]\n",
              progname);
      return 0;
    default:
      /* qemu-img measure answers a bad option (getopt has said which)
       * with the general help, and success. */
      img_help ();
      return 0;
    }
  }
  if (optind < argc)
    filename = argv[optind++];
  if (optind < argc) {
    fail_msg ("At most one filename argument is allowed.");
    return 1;
  }
  if (have_size && filename) {
    fail_msg ("--size N cannot be used together with a filename.");
    return 1;
  }
  if (!have_size && !filename) {
    fail_msg ("Either --size N or one filename must be specified.");
    return 1;
  }
  if (filename) {
    src = snapshot ? img_open_snapshot (filename, fmt, force_share, snapshot)
                   : open_image (filename, fmt, force_share, false, NULL);
    if (!src)
      return 1;
    bitmaps = strcmp (ofmt, "qcow2") == 0 && !wants_compat_v2 (options)
              && src_has_bitmap_support (src);
    if (bitmaps && strata_length (src) > 0)
      bitmap_bytes = bitmaps_size (src, strata_length (src),
                                   output_cluster_size (options));
  }
  else if (asprintf (&all, "size=%" PRIu64, size) < 0) {
    return 1;
  }
  if (options && !append_opt (&all, options)) {
    strata_close (src);
    return 1;
  }
  if (!measurable (ofmt, options)
      || !strata_measure (ofmt, all, src, &required, &full, 0, &err)) {
    if (err)
      measure_fail (ofmt, err);
    strata_close (src);
    return 1;
  }
  strata_close (src);
  measure_print (out, required, full, bitmaps, bitmap_bytes);
  return 0;
}
