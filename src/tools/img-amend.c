/* strata-img amend [-p] [-q] [-f FMT] [-t CACHE] [--force] -o OPTIONS FILE,
 * as qemu-img 7.2: several -o are joined with ','; "-o help" lists the
 * options qcow2 can amend; the driver (src/drivers/qcow2/amend.c) says
 * what it refuses, in qemu-img's words.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/img.h"
#include "util/cleanup.h"

static const char qcow2_amend_help[]
    = "Amend options for 'qcow2':\n"
      "  backing_file=<str>     - File name of a base image\n"
      "  backing_fmt=<str>      - Image format of the base image\n"
      "  compat=<str>           - Compatibility level (v2 [0.10] or v3 "
      "[1.1])\n"
      "  data_file=<str>        - File name of an external data file\n"
      "  data_file_raw=<bool (on/off)> - The external data file must stay "
      "valid "
      "as a raw image\n"
      "  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds\n"
      "  encrypt.keyslot=<num>  - Select a single keyslot to modify "
      "explicitly\n"
      "  encrypt.new-secret=<str> - New secret to set in the matching "
      "keyslots. "
      "Empty string to erase\n"
      "  encrypt.old-secret=<str> - Select all keyslots that match this "
      "password\n"
      "  encrypt.state=<str>    - Select new state of affected keyslots "
      "(active/inactive)\n"
      "  lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n"
      "  refcount_bits=<num>    - Width of a reference count entry in bits\n"
      "  size=<size>            - Virtual disk size\n";

/* Keys qemu-img knows for qcow2 (amendable or creation-only); any other
 * is "Invalid parameter". */
static const char *const qcow2_keys[] = {
  "backing_file",     "backing_fmt",   "compat",       "lazy_refcounts",
  "refcount_bits",    "size",          "cluster_size", "extended_l2",
  "compression_type", "preallocation", NULL,
};

static bool
has_help (const char *options)
{
  CLEANUP_FREE char *copy = strdup (options);
  char *save = NULL;

  for (char *t = copy ? strtok_r (copy, ",", &save) : NULL; t;
       t = strtok_r (NULL, ",", &save))
    if (!strcmp (t, "help") || !strcmp (t, "?"))
      return true;
  return false;
}

/* The first key of OPTIONS that qemu-img would not know, or NULL. */
static char *
unknown_key (const char *options)
{
  CLEANUP_FREE char *copy = strdup (options);
  char *save = NULL;

  for (char *t = copy ? strtok_r (copy, ",", &save) : NULL; t;
       t = strtok_r (NULL, ",", &save)) {
    const char *const *k = qcow2_keys;
    char *eq = strchr (t, '=');
    if (eq)
      *eq = 0;
    while (*k && strcmp (*k, t))
      k++;
    if (!*k)
      return strdup (t);
  }
  return NULL;
}

static void
progress (bool on, bool done)
{
  if (!on)
    return;
  if (!done)
    printf ("    (0.00/100%%)\r");
  else
    printf ("    (100.00/100%%)\r    (100.00/100%%)\r\n");
  fflush (stdout);
}

static char *
join (char *options, const char *more)
{
  char *out;

  if (!options)
    return strdup (more);
  if (asprintf (&out, "%s,%s", options, more) < 0)
    out = NULL;
  free (options);
  return out;
}

static int
amend (const char *file, const char *fmt, const char *options, bool show)
{
  struct strata_info info;
  strata_error *err = NULL;
  CLEANUP_FREE char *bad = NULL;
  strata_node *n = open_image (file, fmt, false, true, NULL);
  int ret = 1;

  if (!n)
    return 1;
  if (!strata_get_info (n, &info, 0, &err))
    fail_err (err);
  else if (strcmp (info.format, "qcow2"))
    fprintf (stderr,
             "%s: Format driver '%s' does not support option "
             "amendment\n",
             progname, info.format);
  else if (has_help (options)) {
    printf ("%s", qcow2_amend_help);
    ret = 0;
  }
  else if ((bad = unknown_key (options)))
    fprintf (stderr, "%s: Invalid parameter '%s'\n", progname, bad);
  else {
    progress (show, false);
    if (!strata_amend (n, options, &err))
      fail_err (err);
    else
      ret = 0;
    progress (show && ret == 0, true);
  }
  strata_close (n);
  return ret;
}

int
cmd_amend (int argc, char **argv)
{
  enum { OPT_FORCE = 256 };
  static const struct option lopts[] = {
    { "help", no_argument, NULL, 'h' },
    { "force", no_argument, NULL, OPT_FORCE },
    { NULL, 0, NULL, 0 },
  };
  const char *fmt = NULL;
  CLEANUP_FREE char *options = NULL;
  bool quiet = false, show = false;
  int c;

  opterr = 0;
  while ((c = getopt_long (argc, argv, ":ho:f:t:pq", lopts, NULL)) != -1) {
    switch (c) {
    case 'o':
      if (!(options = join (options, optarg)))
        return 1;
      break;
    case 'f': fmt = optarg; break;
    case 't': break; /* the cache mode changes nothing here */
    case 'p': show = true; break;
    case 'q': quiet = true; break;
    case OPT_FORCE: break;
    case 'h':
      printf ("usage: %s amend [-p] [-q] [-f FMT] [-t CACHE] [--force] -o "
              "OPTIONS FILE\n",
              progname);
      return 0;
    default: return img_option_error (c, argv);
    }
  }
  if (!options)
    return img_usage_error ("Must specify options (-o)");
  if (quiet)
    show = false;
  if (fmt && has_help (options) && strcmp (fmt, "qcow2") == 0) {
    printf ("%s", qcow2_amend_help);
    return 0;
  }
  if (optind != argc - 1) {
    fail_msg ("Expecting one image file name");
    return 1;
  }
  if (!*options) {
    fail_msg ("Invalid option list: ");
    return 1;
  }
  return amend (argv[optind], fmt, options, show);
}
