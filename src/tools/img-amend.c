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

#include "img.h"
#include "progress.h"
#include "cleanup.h"

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

/* What qemu-img's qcow2 can amend, and what it only knows at creation. */
static const char *const amend_keys[] = {
  "backing_file",   "backing_fmt",   "compat", "data_file", "data_file_raw",
  "lazy_refcounts", "refcount_bits", "size",   NULL,
};
static const char *const create_only_keys[] = {
  "cluster_size",
  "extended_l2",
  "compression_type",
  "preallocation",
  "encryption",
  "encrypt.format",
  NULL,
};

static bool
in_list (const char *const *list, const char *key)
{
  if (!strncmp (key, "encrypt.", 8) && strcmp (key, "encrypt.format"))
    return list == amend_keys;
  for (; *list; list++)
    if (!strcmp (*list, key))
      return true;
  return false;
}

/* qemu-img's checks of the keys, before the driver sees them: the first
 * key it cannot amend is an "Invalid parameter" (with a hint when every
 * key is at least a creation option); the external data file and
 * encryption options strata's qcow2 does not have are refused as QEMU
 * refuses them on such an image, after a bad compat value.  Returns true
 * when the options may go to the driver. */
static bool
keys_ok (const char *options)
{
  CLEANUP_FREE char *copy = strdup (options);
  const char *bad = NULL, *refused = NULL, *compat = NULL;
  bool all_create = true;
  char *save = NULL;

  for (char *t = copy ? strtok_r (copy, ",", &save) : NULL; t;
       t = strtok_r (NULL, ",", &save)) {
    char *eq = strchr (t, '=');
    if (eq)
      *eq = 0;
    if (!in_list (amend_keys, t) && !bad)
      bad = t;
    if (!in_list (amend_keys, t) && !in_list (create_only_keys, t))
      all_create = false;
    if (!strcmp (t, "compat"))
      compat = eq ? eq + 1 : "";
    if (!refused
        && (!strncmp (t, "data_file", 9) || !strncmp (t, "encrypt.", 8)))
      refused = t;
  }
  if (bad) {
    fprintf (stderr, "%s: Invalid parameter '%s'\n%s", progname, bad,
             all_create ? "This option is only supported for image creation\n"
                        : "");
    return false;
  }
  if (!refused)
    return true;
  if (compat && strcmp (compat, "0.10") && strcmp (compat, "v2")
      && strcmp (compat, "1.1") && strcmp (compat, "v3"))
    fprintf (stderr, "%s: Unknown compatibility level %s\n", progname, compat);
  else if (!strcmp (refused, "data_file"))
    fail_msg ("data-file can only be set for images that use an external "
              "data file");
  else if (!strcmp (refused, "data_file_raw"))
    fail_msg ("data-file-raw cannot be set on existing images");
  else
    fail_msg ("Can't amend encryption options - encryption not present");
  return false;
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
  struct strata_info info = { .size = sizeof info };
  strata_error *err = NULL;
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
  else if (img_has_help_option (options)) {
    printf ("%s", qcow2_amend_help);
    ret = 0;
  }
  else if (keys_ok (options)) {
    struct progress pr;
    progress_start (&pr, PROGRESS_IMG, NULL, show, 1);
    if (!strata_amend (n, options, 0, &err))
      fail_err (err);
    else
      ret = 0;
    progress_end (&pr, ret == 0);
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
    IMG_IMAGE_OPTS_OPTION,
    { NULL, 0, NULL, 0 },
  };
  const char *fmt = NULL, *cache = "writeback";
  CLEANUP_FREE char *options = NULL;
  bool quiet = false, show = false, writethrough;
  char cache_opts[128];
  int c;

  opterr = 0;
  while ((c = getopt_long (argc, argv, ":ho:f:t:pq", lopts, NULL)) != -1) {
    switch (c) {
    case 'o':
      if (!(options = join (options, optarg)))
        return 1;
      break;
    case 'f': fmt = optarg; break;
    case 't': cache = optarg; break;
    case 'p': show = true; break;
    case 'q': quiet = true; break;
    case OPT_FORCE: break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
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
  if (fmt && img_has_help_option (options) && strcmp (fmt, "qcow2") == 0) {
    printf ("%s", qcow2_amend_help);
    return 0;
  }
  if (optind != argc - 1) {
    fail_msg ("Expecting one image file name");
    return 1;
  }
  /* Checked as qemu-img does; the mode changes nothing for amend. */
  if (!img_cache_options (cache, "qcow2", cache_opts, sizeof cache_opts,
                          &writethrough))
    return 1;
  if (!*options) {
    fail_msg ("Invalid option list: ");
    return 1;
  }
  return amend (argv[optind], fmt, options, show);
}
