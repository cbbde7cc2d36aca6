/* strata-img measure: the file size an image would need (qemu-img measure).
 *
 *   measure [--output=human|json] [-O FMT] [-o OPTS] [-U]
 *           (--size SIZE | [-f FMT] FILE)
 *
 * The numbers come from the output format's driver (strata_measure).  The
 * "bitmaps" line appears where qemu-img 7.2 prints it: when both the
 * source and the output can hold persistent bitmaps (a qcow2 v3 source and
 * a qcow2 v3 output).  strata copies no bitmaps, so it is always 0.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <strata/strata.h>

#include "util/cleanup.h"
#include "util/opts.h"
#include "tools/img.h"

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
  struct strata_info info;
  strata_error *err = NULL;

  if (!strata_get_info (src, &info, 0, &err)) {
    strata_error_free (err);
    return false;
  }
  return info.format_specific && strcmp (info.format_specific, "qcow2") == 0
         && strcmp (info.qcow2.compat, "0.10") != 0;
}

static void
measure_print (enum output out, uint64_t required, uint64_t full, bool bitmaps)
{
  if (out == OUTPUT_JSON) {
    json_t *o = json_object ();
    if (bitmaps)
      json_object_set_new (o, "bitmaps", json_integer (0));
    json_object_set_new (o, "required", json_integer (required));
    json_object_set_new (o, "fully-allocated", json_integer (full));
    print_json (o);
    json_decref (o);
    return;
  }
  printf ("required size: %" PRIu64 "\n", required);
  printf ("fully allocated size: %" PRIu64 "\n", full);
  if (bitmaps)
    printf ("bitmaps size: 0\n");
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
    { NULL, 0, NULL, 0 },
  };
  enum output out = OUTPUT_HUMAN;
  const char *fmt = NULL, *ofmt = "raw", *filename = NULL;
  CLEANUP_FREE char *options = NULL, *all = NULL;
  bool force_share = false, have_size = false, bitmaps = false;
  uint64_t size = 0, required, full;
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
    case 'l':
      fail_msg ("Failed to load snapshot: internal snapshots are not "
                "supported by measure");
      return 1;
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
    case 'h':
      printf ("usage: %s measure [--output=human|json] [-O FMT] [-o OPTS] "
              "[--size N | [-f FMT] [-U] FILE]\n",
              progname);
      return 0;
    default: return 1;
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
    src = open_image (filename, fmt, force_share, false, NULL);
    if (!src)
      return 1;
    bitmaps = strcmp (ofmt, "qcow2") == 0 && !wants_compat_v2 (options)
              && src_has_bitmap_support (src);
  }
  else if (asprintf (&all, "size=%" PRIu64, size) < 0) {
    return 1;
  }
  if (options && !append_opt (&all, options)) {
    strata_close (src);
    return 1;
  }
  if (!strata_measure (ofmt, all, src, &required, &full, &err)) {
    fail_err (err);
    strata_close (src);
    return 1;
  }
  strata_close (src);
  measure_print (out, required, full, bitmaps);
  return 0;
}
