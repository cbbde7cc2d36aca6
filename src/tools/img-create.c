/* strata-img create: a new image, as qemu-img create (7.2) makes it.
 *
 *   create -f FMT [-b BACKING -F BFMT] [-u] [-o OPTS] [-q] FILE [SIZE]
 *
 * -o size, backing_file and backing_fmt stand for SIZE, -b and -F; a
 * backing file's format is never probed (-F is required, with qemu-img's
 * message naming what probing found); a relative backing name is relative
 * to FILE's directory; the size defaults to the backing file's, rounded up
 * to 512 as qemu's block layer does.  The "Formatting" line lists the
 * creation options in qemu-img's order and is printed only after a dry run
 * of the creation succeeded.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <strata/strata.h>

#include "util/checked.h"
#include "util/cleanup.h"
#include "util/opts.h"
#include "tools/img.h"

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
