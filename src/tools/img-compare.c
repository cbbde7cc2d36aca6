/* strata-img compare: whether two images show the guest the same bytes, as
 * qemu-img compare (7.2) decides it.
 *
 *   compare [-s] [-q] [-U] [-f FMT] [-F FMT] A B
 *
 * Block status first, so ranges that are zero in both are not read; the
 * first difference is reported as the 512-byte sector holding it; a longer
 * image must be zero past the shorter one's end (not with -s, where the
 * sizes and every extent's block status must match too).  Exit codes: 0
 * identical, 1 different, 2 error.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <strata/strata.h>

#include "checked.h"
#include "cleanup.h"
#include "opts.h"
#include "img.h"

#define COMPARE_CHUNK (1u << 20)

/* Is [off, off+len) of N all zeros?  Sets *bad to the first nonzero byte. */
static int
range_is_zero (strata_node *n, uint64_t off, uint64_t len, uint8_t *buf,
               uint64_t *bad)
{
  while (len) {
    struct strata_extent e = { .size = sizeof e };
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
  struct strata_info ia = { .size = sizeof ia }, ib = { .size = sizeof ib };

  return strata_get_info (a, &ia, 0, NULL) && strata_get_info (b, &ib, 0, NULL)
         && strcmp (ia.format, ib.format) == 0;
}

#define STRICT_BS                                                            \
  (STRATA_BS_ALLOCATED | STRATA_BS_ZERO | STRATA_BS_DATA | STRATA_BS_OFFSET)

struct compare {
  const char *fmt_a, *fmt_b, *file_a, *file_b;
  bool strict, quiet, force_share;
};

/* 0 when parsed, else the exit code. */
static int
parse_args (int argc, char **argv, struct compare *cmp)
{
  static const struct option lopts[] = {
    { "force-share", no_argument, NULL, 'U' },
    { "help", no_argument, NULL, 'h' },
    IMG_IMAGE_OPTS_OPTION,
    { NULL, 0, NULL, 0 },
  };
  int c;

  while ((c = getopt_long (argc, argv, ":f:F:sqpUh", lopts, NULL)) != -1) {
    switch (c) {
    case 'f': cmp->fmt_a = optarg; break;
    case 'F': cmp->fmt_b = optarg; break;
    case 's': cmp->strict = true; break;
    case 'q': cmp->quiet = true; break;
    case 'p': break;  /* progress: not shown yet */
    case 'U': cmp->force_share = true; break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'h':
      printf ("usage: %s compare [-s] [-q] [-U] [-f FMT] [-F FMT] A B\n",
              progname);
      exit (0);
    default: return img_option_error (c, argv);
    }
  }
  if (optind != argc - 2)
    return img_usage_error ("Expecting two image file names");
  cmp->file_a = argv[optind];
  cmp->file_b = argv[optind + 1];
  return 0;
}

static int
compare_run (const struct compare *cmp)
{
  bool strict = cmp->strict, quiet = cmp->quiet, same_format;
  strata_node *a = NULL, *b = NULL;
  CLEANUP_FREE uint8_t *ba = NULL, *bb = NULL;
  int64_t la, lb;
  uint64_t common, off, bad = UINT64_MAX;
  int ret = 2, r = 0;

  if (!(a
        = open_image (cmp->file_a, cmp->fmt_a, cmp->force_share, false, NULL))
      || !(b = open_image (cmp->file_b, cmp->fmt_b, cmp->force_share, false,
                           NULL)))
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
    struct strata_extent ea = { .size = sizeof ea }, eb = { .size = sizeof eb };
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

int
cmd_compare (int argc, char **argv)
{
  struct compare cmp = { 0 };
  int r = parse_args (argc, argv, &cmp);

  return r ? r : compare_run (&cmp);
}
