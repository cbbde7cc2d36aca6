/* strata-img bitmap (--merge SOURCE | --add | --remove | --clear |
 * --enable | --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]] [-g
 * GRANULARITY] [--image-opts | -f FMT] FILE BITMAP, as qemu-img 7.2
 * (options, messages, exit codes).
 *
 * qemu-img's rules kept: the actions run in the order given, on one
 * read-write open of FILE, and the first that fails stops the rest with
 * "Operation OP on bitmap NAME failed: WHY" (exit 1; the actions before it
 * stay done, as the image is closed normally).  --add makes a persistent,
 * enabled bitmap (-g its granularity); --merge takes SOURCE from FILE, or
 * from SOURCE_FILE opened read-only.  The bitmaps reach the image when it
 * is closed (the qcow2 driver stores them).
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "img.h"

enum {
  OPT_ADD = 0x5000,
  OPT_REMOVE,
  OPT_CLEAR,
  OPT_ENABLE,
  OPT_DISABLE,
  OPT_MERGE
};

struct action {
  int op;             /* OPT_* */
  const char *source; /* --merge */
};

static const char *
op_name (int op)
{
  switch (op) {
  case OPT_ADD: return "add";
  case OPT_REMOVE: return "remove";
  case OPT_CLEAR: return "clear";
  case OPT_ENABLE: return "enable";
  case OPT_DISABLE: return "disable";
  default: return "merge";
  }
}

static bool
run_action (strata_node *n, strata_node *src, const char *bitmap,
            const struct action *a, uint64_t granularity, strata_error **err)
{
  switch (a->op) {
  case OPT_ADD: return strata_bitmap_add (n, bitmap, granularity, 0, err);
  case OPT_REMOVE:
    return strata_bitmap_change (n, bitmap, STRATA_BITMAP_REMOVE, 0, err);
  case OPT_CLEAR:
    return strata_bitmap_change (n, bitmap, STRATA_BITMAP_CLEAR, 0, err);
  case OPT_ENABLE:
    return strata_bitmap_change (n, bitmap, STRATA_BITMAP_ENABLE, 0, err);
  case OPT_DISABLE:
    return strata_bitmap_change (n, bitmap, STRATA_BITMAP_DISABLE, 0, err);
  default:
    return strata_bitmap_merge (n, bitmap, src ? src : n, a->source, 0, err);
  }
}

static void
usage (void)
{
  printf ("usage: %s bitmap (--merge SOURCE | --add | --remove | --clear | "
          "--enable | --disable)... [-b source_file [-F source_fmt]] "
          "[-g granularity] [--image-opts | -f fmt] filename bitmap\n",
          progname);
}

int
cmd_bitmap (int argc, char **argv)
{
  static const struct option lopts[] = {
    { "help", no_argument, NULL, 'h' },
    IMG_IMAGE_OPTS_OPTION,
    { "add", no_argument, NULL, OPT_ADD },
    { "remove", no_argument, NULL, OPT_REMOVE },
    { "clear", no_argument, NULL, OPT_CLEAR },
    { "enable", no_argument, NULL, OPT_ENABLE },
    { "disable", no_argument, NULL, OPT_DISABLE },
    { "merge", required_argument, NULL, OPT_MERGE },
    { NULL, 0, NULL, 0 },
  };
  const char *fmt = NULL, *src_file = NULL, *src_fmt = NULL;
  const char *file, *bitmap;
  CLEANUP_FREE struct action *acts = calloc (argc, sizeof *acts);
  bool add = false, merge = false;
  uint64_t granularity = 0;
  strata_node *n, *src = NULL;
  strata_error *err = NULL;
  int c, nacts = 0, ret = 0;

  if (!acts) {
    fail_msg ("out of memory");
    return 1;
  }
  opterr = 0;
  while ((c = getopt_long (argc, argv, ":b:f:F:g:h", lopts, NULL)) != -1) {
    switch (c) {
    case 'h': usage (); return 0;
    case 'b': src_file = optarg; break;
    case 'f': fmt = optarg; break;
    case 'F': src_fmt = optarg; break;
    case 'g':
      if (!img_parse_size_arg (optarg, "granularity", &granularity))
        return 1;
      break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case OPT_ADD:
    case OPT_REMOVE:
    case OPT_CLEAR:
    case OPT_ENABLE:
    case OPT_DISABLE:
    case OPT_MERGE:
      acts[nacts++] = (struct action){ c, c == OPT_MERGE ? optarg : NULL };
      add |= c == OPT_ADD;
      merge |= c == OPT_MERGE;
      break;
    default: return img_option_error (c, argv);
    }
  }
  if (nacts == 0) {
    fail_msg ("Need at least one of --add, --remove, --clear, "
              "--enable, --disable, or --merge");
    return 1;
  }
  if (granularity && !add) {
    fail_msg ("granularity only supported with --add");
    return 1;
  }
  if (src_fmt && !src_file) {
    fail_msg ("-F only supported with -b");
    return 1;
  }
  if (src_file && !merge) {
    fail_msg ("Merge bitmap source file only supported with "
              "--merge");
    return 1;
  }
  if (optind != argc - 2) {
    fail_msg ("Expecting filename and bitmap name");
    return 1;
  }
  file = argv[optind];
  bitmap = argv[optind + 1];
  if (!(n = open_image (file, fmt, false, true, NULL)))
    return 1;
  if (src_file
      && !(src = open_image (src_file, src_fmt, false, false, NULL))) {
    strata_close (n);
    return 1;
  }
  for (int i = 0; i < nacts && !ret; i++)
    if (!run_action (n, src, bitmap, &acts[i], granularity, &err)) {
      fprintf (stderr, "%s: Operation %s on bitmap %s failed: %s\n", progname,
               op_name (acts[i].op), bitmap, strata_error_message (err));
      strata_error_free (err);
      ret = 1;
    }
  if (src)
    strata_close (src);
  strata_close (n);
  return ret;
}
