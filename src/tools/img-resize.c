/* strata-img resize [-f FMT] [--shrink] [--preallocation=MODE] [-q] FILE
 * [+|-]SIZE, as qemu-img 7.2: the size is the last argument and is taken
 * before the options are parsed (so "-1G" is a size, not an option);
 * shrinking needs --shrink; preallocation only for growing.
 *
 * Preallocation of the new range: "falloc" and "full" write it (zeros),
 * "metadata" is accepted for qcow2 and maps nothing new (strata's qcow2
 * reads an unmapped range as zeros, the same contents).
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "img.h"
#include "opts.h"

/* The largest image qemu's block layer allows: INT64_MAX rounded down to
 * its largest request alignment (2 GiB - 1 rounded to the sector). */
#define BDRV_MAX_LENGTH UINT64_C (9223372035781033984)

/* SIZE as qemu-img takes it: [+|-]N[suffix]. */
static bool
parse_new_size (const char *arg, int *sign, uint64_t *n)
{
  *sign = arg[0] == '+' ? 1 : arg[0] == '-' ? -1 : 0;
  if (parse_size (arg + (*sign != 0), n) && *n <= INT64_MAX)
    return true;
  fprintf (stderr,
           "%s: Parameter 'size' expects a non-negative number below "
           "2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, "
           "giga-, tera-, peta-\nand exabytes, respectively.\n",
           progname);
  return false;
}

/* Write zeros over [from, to), allocating it (falloc, full). */
static bool
fill_zeros (strata_node *n, uint64_t from, uint64_t to)
{
  static char zeros[1 << 20];

  for (uint64_t pos = from; pos < to;) {
    uint64_t len = to - pos < sizeof zeros ? to - pos : sizeof zeros;
    int r = strata_pwrite (n, zeros, len, pos, 0);
    if (r < 0) {
      const char *m = strata_last_error_message ();
      fprintf (stderr, "%s: Failed to preallocate the new range: %s\n",
               progname, m ? m : strerror (-r));
      return false;
    }
    pos += len;
  }
  return true;
}

static bool
valid_prealloc (const char *p)
{
  return !p || !strcmp (p, "off") || !strcmp (p, "metadata")
         || !strcmp (p, "falloc") || !strcmp (p, "full");
}

int
cmd_resize (int argc, char **argv)
{
  enum { OPT_SHRINK = 256, OPT_PREALLOC };
  static const struct option lopts[] = {
    { "help", no_argument, NULL, 'h' },
    { "shrink", no_argument, NULL, OPT_SHRINK },
    { "preallocation", required_argument, NULL, OPT_PREALLOC },
    IMG_IMAGE_OPTS_OPTION,
    { NULL, 0, NULL, 0 },
  };
  const char *fmt = NULL, *prealloc = NULL, *size_arg;
  bool quiet = false, shrink = false;
  strata_error *err = NULL;
  uint64_t n, total;
  strata_node *node;
  int64_t cur;
  int c, sign;

  if (argc < 3)
    return img_usage_error ("Not enough arguments");
  size_arg = argv[--argc];
  opterr = 0;
  while ((c = getopt_long (argc, argv, ":f:hq", lopts, NULL)) != -1) {
    switch (c) {
    case 'f': fmt = optarg; break;
    case 'q': quiet = true; break;
    case OPT_SHRINK: shrink = true; break;
    case OPT_PREALLOC: prealloc = optarg; break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'h':
      printf ("usage: %s resize [-f FMT] [--preallocation=PREALLOC] "
              "[--shrink] [-q] FILE [+|-]SIZE\n",
              progname);
      return 0;
    default: return img_option_error (c, argv);
    }
  }
  if (optind != argc - 1)
    return img_usage_error ("Expecting image file name and size");
  if (!valid_prealloc (prealloc)) {
    fprintf (stderr, "%s: Invalid preallocation mode '%s'\n", progname,
             prealloc);
    return 1;
  }
  if (!parse_new_size (size_arg, &sign, &n))
    return 1;
  if (!(node = open_image (argv[optind], fmt, false, true, NULL)))
    return 1;
  if ((cur = strata_length (node)) < 0) {
    fprintf (stderr, "%s: %s: cannot get the image size\n", progname,
             argv[optind]);
    strata_close (node);
    return 1;
  }
  total = sign > 0   ? (uint64_t)cur + n
          : sign < 0 ? (n >= (uint64_t)cur ? 0 : (uint64_t)cur - n)
                     : n;
  c = 1;
  if (total == 0 || total > INT64_MAX)
    fail_msg ("New image size must be positive");
  else if (total > BDRV_MAX_LENGTH)
    fprintf (stderr, "%s: offset(%" PRIu64 ") exceeds maximum(%" PRIu64 ")\n",
             progname, total, BDRV_MAX_LENGTH);
  else if (total <= (uint64_t)cur && prealloc && strcmp (prealloc, "off"))
    fail_msg ("Preallocation can only be used for growing images");
  else if (total < (uint64_t)cur && !shrink)
    fprintf (stderr,
             "%s: Use the --shrink option to perform a shrink "
             "operation.\n%s: warning: Shrinking an image will delete all "
             "data beyond the shrunken image's end. Before performing such "
             "an operation, make sure there is no important data there.\n",
             progname, progname);
  else if (!strata_truncate (node, total, 0, &err))
    fail_err (err);
  else if (prealloc
           && (!strcmp (prealloc, "falloc") || !strcmp (prealloc, "full"))
           && !fill_zeros (node, (uint64_t)cur, total))
    ;
  else
    c = 0;
  if (c == 0 && !quiet)
    printf ("Image resized.\n");
  strata_close (node);
  return c;
}
