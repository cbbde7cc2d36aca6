/* strata-img check: consistency check (and -r repair) of an image, as
 * qemu-img check (7.2) reports it.
 *
 *   check [-r leaks|all] [--output=human|json] [-U] [-f FMT] [-q] FILE
 *
 * Exit codes are qemu-img's: 0 clean, 1 check failed, 2 corruptions, 3
 * leaks only, 63 a format without checks.  After a repair the image is
 * checked again and the report shows the second pass with the first pass's
 * fixed counts.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include <strata/strata.h>

#include "checked.h"
#include "cleanup.h"
#include "opts.h"
#include "img.h"

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

struct check {
  enum output out;
  bool force_share, quiet;
  const char *fmt, *filename;
  unsigned fix; /* STRATA_CHECK_FIX_* */
};

/* 0 when parsed, else the exit code. */
static int
parse_args (int argc, char **argv, struct check *ck)
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
  int c;

  while ((c = getopt_long (argc, argv, ":f:r:Uqh", lopts, NULL)) != -1) {
    switch (c) {
    case 'O':
      if (!parse_output (optarg, &ck->out))
        return 1;
      break;
    case 'U': ck->force_share = true; break;
    case 'f': ck->fmt = optarg; break;
    case 'q': ck->quiet = true; break;
    case 'r':
      if (strcmp (optarg, "leaks") == 0)
        ck->fix = STRATA_CHECK_FIX_LEAKS;
      else if (strcmp (optarg, "all") == 0)
        ck->fix = STRATA_CHECK_FIX_LEAKS | STRATA_CHECK_FIX_ERRORS;
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
      exit (0);
    default: return img_option_error (c, argv);
    }
  }
  if (optind != argc - 1)
    return img_usage_error ("Expecting one image file name");
  ck->filename = argv[optind];
  if (ck->force_share && ck->fix) {
    fprintf (stderr,
             "%s: Could not open '%s': force-share=on can only be "
             "used with read-only images\n",
             progname, ck->filename);
    return 1;
  }
  return 0;
}

/* strata_check() printing problems as they are found: 0 or a negative
 * errno (*ERR set). */
static int
run_check (strata_node *node, struct strata_check_result *res, unsigned fix,
           strata_error **err)
{
  if (strata_check (node, res, check_message, NULL, fix, err))
    return 0;
  return -strata_error_errno (*err);
}

/* Check NODE into *RES, repairing as CK says and then checking again, as
 * qemu-img does; strata_check()'s return. */
static int
check_node (const struct check *ck, strata_node *node,
            struct strata_check_result *res, strata_error **err)
{
  int r = run_check (node, res, ck->fix, err);

  if (r == 0 && (res->corruptions_fixed || res->leaks_fixed)) {
    int64_t leaks_fixed = res->leaks_fixed;
    int64_t corruptions_fixed = res->corruptions_fixed;

    if (ck->out == OUTPUT_HUMAN && !ck->quiet)
      printf ("The following inconsistencies were found and repaired:\n\n"
              "    %" PRId64 " leaked clusters\n    %" PRId64 " corruptions"
              "\n\nDouble checking the fixed image now...\n",
              leaks_fixed, corruptions_fixed);
    r = run_check (node, res, 0, err);
    res->leaks_fixed = leaks_fixed;
    res->corruptions_fixed = corruptions_fixed;
  }
  return r;
}

/* qemu-img check cannot open an image whose bitmap directory QEMU cannot
 * load, and exits 1: so does this, with the reason naming the field.
 * Formats without bitmaps pass. */
static bool
bitmaps_readable (strata_node *node, strata_error **err)
{
  struct strata_bitmap_info **l;
  size_t n;

  if (strata_bitmap_list (node, &l, &n, 0, err)) {
    strata_bitmap_list_free (l);
    return true;
  }
  if (strata_error_errno (*err) != ENOTSUP)
    return false;
  strata_error_free (*err);
  *err = NULL;
  return true;
}

static int
check_run (const struct check *ck)
{
  struct strata_check_result res = { .size = sizeof res };
  struct strata_info info = { .size = sizeof info };
  strata_error *err = NULL;
  strata_node *node;
  int r;

  node = open_image (ck->filename, ck->fmt, ck->force_share, ck->fix != 0,
                     NULL);
  if (!node)
    return 1;
  if (!strata_get_info (node, &info, 0, &err)
      || !bitmaps_readable (node, &err)) {
    fail_err (err);
    strata_close (node);
    return 1;
  }
  r = check_node (ck, node, &res, &err);
  if (r == -ENOTSUP) {
    fprintf (stderr, "%s: This image format does not support checks\n",
             progname);
    strata_error_free (err);
    strata_close (node);
    return 63;
  }
  if (r == 0 && !ck->quiet) {
    if (ck->out == OUTPUT_JSON)
      check_json (&res, ck->filename, info.format);
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

int
cmd_check (int argc, char **argv)
{
  struct check ck = { .out = OUTPUT_HUMAN };
  int r = parse_args (argc, argv, &ck);

  return r ? r : check_run (&ck);
}
