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

#include "checked.h"
#include "cleanup.h"
#include "opts.h"
#include "img.h"

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
  struct strata_info info = { .size = sizeof info };
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

struct create {
  const char *fmt, *backing, *bfmt, *filename;
  char *options;                /* the -o lists joined by commas */
  char *opt_backing, *opt_bfmt; /* -o backing_file and backing_fmt */
  bool quiet, unsafe, have_size;
  bool help; /* -o help: list the creation options */
  uint64_t size;
};

/* -o size, backing_file and backing_fmt stand for SIZE, -b and -F.
 * Returns false (with qemu-img's message) when the size is given twice. */
static bool
fold_options (struct create *cr)
{
  CLEANUP_OPTS strata_opts *o = opts_new ();
  const char *v;

  if (!o || !opts_parse (o, cr->options, NULL))
    return true;
  v = opts_get (o, "size");
  if (v && cr->have_size) {
    fprintf (stderr,
             "%s: %s: The image size must be specified only "
             "once\n",
             progname, cr->filename);
    return false;
  }
  if (v && parse_size (v, &cr->size) && cr->size <= INT64_MAX)
    cr->have_size = true;
  if (!cr->backing && (v = opts_get (o, "backing_file")))
    cr->backing = cr->opt_backing = strdup (v);
  if (!cr->bfmt && (v = opts_get (o, "backing_fmt")))
    cr->bfmt = cr->opt_bfmt = strdup (v);
  return true;
}

/* The combinations qemu-img refuses before it opens anything. */
static bool
check_backing_args (const struct create *cr)
{
  const char *filename = cr->filename, *backing = cr->backing;

  if (!strcmp (cr->fmt, "raw") && (backing || cr->bfmt)) {
    fprintf (stderr,
             "%s: %s: Backing file %snot supported for file format "
             "'raw'\n",
             progname, filename, backing ? "" : "format ");
    return false;
  }
  if (cr->bfmt && !backing) {
    fail_msg ("-F requires -b (a backing file)");
    return false;
  }
  if (backing && !strcmp (backing, filename)) {
    fprintf (stderr,
             "%s: %s: Error: Trying to create an image with the "
             "same filename as the backing file\n",
             progname, filename);
    return false;
  }
  if (backing && !*backing) {
    fprintf (stderr,
             "%s: %s: Expected backing file name, got empty "
             "string\n",
             progname, filename);
    return false;
  }
  return true;
}

/* 0 when parsed, else the exit code. */
static int
parse_args (int argc, char **argv, struct create *cr)
{
  static const struct option lopts[] = {
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  int c;

  while ((c = getopt_long (argc, argv, ":f:b:F:uo:qh", lopts, NULL)) != -1) {
    switch (c) {
    case 'f': cr->fmt = optarg; break;
    case 'b': cr->backing = optarg; break;
    case 'F': cr->bfmt = optarg; break;
    case 'u': cr->unsafe = true; break;
    case 'q': cr->quiet = true; break;
    case 'o': {
      char *n;
      if (asprintf (&n, "%s%s%s", cr->options ? cr->options : "",
                    cr->options ? "," : "", optarg)
          < 0)
        return 1;
      free (cr->options);
      cr->options = n;
      break;
    }
    case 'h':
      printf ("usage: %s create [-f FMT] [-b BACKING -F BFMT] [-u] "
              "[-o OPTS] [-q] FILE [SIZE]\n", progname);
      exit (0);
    default: return img_option_error (c, argv);
    }
  }
  if (img_has_help_option (cr->options)) {
    cr->help = true;
    cr->filename = optind < argc ? argv[optind] : NULL;
    return 0;
  }
  if (optind >= argc)
    return img_usage_error ("Expecting image file name");
  cr->filename = argv[optind++];
  if (optind < argc) {
    const char *s = argv[optind++];
    if (!img_parse_size_arg (s, "image size", &cr->size))
      return 1;
    cr->have_size = true;
  }
  if (optind < argc) {
    char msg[128];
    snprintf (msg, sizeof msg, "Unexpected argument: %.100s", argv[optind]);
    return img_usage_error (msg);
  }
  if (cr->options && !fold_options (cr))
    return 1;
  return check_backing_args (cr) ? 0 : 1;
}

/* Without a size, the backing file's (rounded up to 512 as qemu's length
 * is); with one, a backing file that qemu-img would open must open. */
static bool
size_from_backing (struct create *cr, const char *path)
{
  strata_node *b;
  int64_t bsize;

  if (cr->have_size) {
    if (cr->unsafe)
      return true;
    /* Make sure the backing file can be opened, as qemu-img does. */
    if (!(b = open_backing (cr->filename, path, cr->bfmt)))
      return false;
    strata_close (b);
    return true;
  }
  if (cr->unsafe) {
    fprintf (stderr, "%s: %s: Image creation needs a size parameter\n",
             progname, cr->filename);
    return false;
  }
  if (!(b = open_backing (cr->filename, path, cr->bfmt)))
    return false;
  bsize = strata_length (b);
  strata_close (b);
  if (bsize < 0) {
    fprintf (stderr, "%s: %s: cannot get the size of the backing file\n",
             progname, cr->backing);
    return false;
  }
  cr->size = ((uint64_t)bsize + 511) / 512 * 512; /* qemu's length */
  cr->have_size = true;
  return true;
}

/* The dry run, the Formatting line, then the image. */
static int
create_image (const struct create *cr)
{
  const char *backing = cr->backing, *bfmt = cr->bfmt;
  char sizebuf[32];
  CLEANUP_FREE char *all = NULL, *sized = NULL;
  strata_error *err = NULL;

  snprintf (sizebuf, sizeof sizebuf, "%" PRIu64, cr->size);
  if (asprintf (&all, "size=%s%s%s%s%s%s%s", sizebuf,
                backing ? ",backing_file=" : "", backing ? backing : "",
                bfmt ? ",backing_fmt=" : "", bfmt ? bfmt : "",
                cr->options ? "," : "", cr->options ? cr->options : "")
      < 0)
    return 1;
  /* qemu's block layer works in sectors: the image gets the size
   * rounded up to 512 (the Formatting line shows it as given). */
  if (asprintf (&sized, "%s,size=%" PRIu64, all, (cr->size + 511) / 512 * 512)
      < 0)
    return 1;
  if (!strata_create (cr->filename, cr->fmt, sized, STRATA_CREATE_DRY_RUN,
                      &err)) {
    fail_err (err);
    return 1;
  }
  if (!cr->quiet) {
    print_formatting (cr->filename, cr->fmt, all);
    fflush (stdout);
  }
  if (!strata_create (cr->filename, cr->fmt, sized, 0, &err)) {
    fail_err (err);
    return 1;
  }
  return 0;
}

static int
create_run (struct create *cr)
{
  const char *filename = cr->filename, *backing = cr->backing;
  CLEANUP_FREE char *backing_path = NULL;

  if (cr->help)
    return img_print_create_help (cr->fmt, filename);
  /* A relative backing name is relative to the new image's directory; a
   * URI (nbd://, nbd+unix://) is not a path. */
  if (backing && backing[0] != '/' && strrchr (filename, '/')
      && !strstr (backing, "://")) {
    const char *slash = strrchr (filename, '/');
    if (asprintf (&backing_path, "%.*s%s", (int) (slash - filename + 1),
                  filename, backing) < 0)
      return 1;
  }
  if (backing && !cr->bfmt)
    return no_backing_format (filename, backing_path ? backing_path : backing,
                              cr->unsafe);
  if (backing
      && !size_from_backing (cr, backing_path ? backing_path : backing))
    return 1;
  if (!cr->have_size) {
    fprintf (stderr, "%s: %s: Image creation needs a size parameter\n",
             progname, filename);
    return 1;
  }
  return create_image (cr);
}

int
cmd_create (int argc, char **argv)
{
  struct create cr = { .fmt = "raw" };
  int r = parse_args (argc, argv, &cr);

  if (r == 0)
    r = create_run (&cr);
  free (cr.options);
  free (cr.opt_backing);
  free (cr.opt_bfmt);
  return r;
}
