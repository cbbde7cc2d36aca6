/* strata-img: helpers shared by the subcommands (see img.h). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <strata/strata.h>

#include "img.h"
#include "cleanup.h"
#include "clock.h"
#include "opts.h"
#include "ratelimit.h"

const char *progname = "strata-img";

void
fail_msg (const char *msg)
{
  fprintf (stderr, "%s: %s\n", progname, msg);
}

void
fail_err (strata_error *err)
{
  fail_msg (strata_error_message (err));
  strata_error_free (err);
}

bool
parse_output (const char *s, enum output *out)
{
  if (strcmp (s, "human") == 0)
    *out = OUTPUT_HUMAN;
  else if (strcmp (s, "json") == 0)
    *out = OUTPUT_JSON;
  else {
    fprintf (stderr, "%s: --output must be used with human or json as "
             "argument.\n", progname);
    return false;
  }
  return true;
}

bool img_image_opts;
/* img_open_snapshot() is opening: failures are qemu-img's "Failed to load
 * snapshot". */
static bool loading_snapshot;

/* --image-opts: OPTS ("driver=qcow2,file.filename=a.qcow2,...") as the
 * file name (file.filename or filename), the format (driver) and the
 * other options joined with EXTRA, each malloc'd.  False when OPTS names
 * no file. */
static bool
image_opts_split (const char *opts, const char *extra, char **path,
                  char **driver, char **rest)
{
  CLEANUP_OPTS strata_opts *o = opts_new ();
  const char *v;
  size_t len = 0;

  if (!o || !strchr (opts, '=') || !opts_parse (o, opts, NULL))
    return false;
  if (!(v = opts_get (o, "file.filename")) && !(v = opts_get (o, "filename")))
    return false;
  *path = strdup (v);
  if ((v = opts_get (o, "driver")))
    *driver = strdup (v);
  /* file.driver=file is the default; another (blkdebug) is passed on. */
  if ((v = opts_get (o, "file.driver")) && strcmp (v, "file") != 0
      && !opts_set (o, "x-file-driver", v))
    return false;
  if (!(*rest = strdup (extra ? extra : "")))
    return false;
  len = strlen (*rest);
  for (size_t i = 0; i < o->n; i++) {
    char *r;
    const char *k = o->v[i].key;
    if (o->v[i].used)
      continue;
    if (asprintf (&r, "%s%s%s=%s", *rest, len ? "," : "",
                  strcmp (k, "x-file-driver") ? k : "file.driver",
                  o->v[i].value) < 0)
      return false;
    free (*rest);
    *rest = r;
    len = strlen (r);
  }
  if (!len) {
    free (*rest);
    *rest = NULL;
  }
  return *path != NULL;
}

strata_node *
open_image (const char *filename, const char *fmt, bool force_share, bool rw,
            const char *extra)
{
  return open_image_flags (filename, fmt,
                           (rw ? STRATA_OPEN_RDWR : 0)
                               | (force_share ? STRATA_OPEN_FORCE_SHARE : 0),
                           extra);
}

strata_node *
open_image_flags (const char *filename, const char *fmt, unsigned flags,
                  const char *extra)
{
  strata_error *err = NULL;
  bool rw = flags & STRATA_OPEN_RDWR;
  CLEANUP_FREE char *path = NULL, *driver = NULL, *rest = NULL;
  strata_node *n;

  if (img_image_opts) {
    if (fmt) {
      fail_msg ("--image-opts and --format are mutually exclusive");
      return NULL;
    }
    if (!image_opts_split (filename, extra, &path, &driver, &rest)) {
      fprintf (stderr,
               "%s: Could not open '%s': Cannot find device='%s' nor "
               "node-name='%s'\n",
               progname, filename, filename, filename);
      return NULL;
    }
    n = strata_open (path, driver, rest, flags, &err);
    if (n && rw && !driver)
      tool_warn_probed_raw (n, path);
    fmt = "";  /* warned (or not) already */
  }
  else
    n = strata_open (filename, fmt, extra, flags, &err);
  if (!n && loading_snapshot)
    fprintf (stderr, "%s: Failed to load snapshot: %s\n", progname,
             strata_error_message (err));
  else if (!n)
    fprintf (stderr, "%s: Could not open '%s': %s\n", progname, filename,
             strata_error_message (err));
  else if (rw && !fmt)
    tool_warn_probed_raw (n, filename);
  strata_error_free (err);
  return n;
}

/* PARAM of -l as open options: "snapshot.id=ID,snapshot.name=NAME" or
 * "ID_OR_NAME". */
static bool
snapshot_param (const char *param, char **extra)
{
  CLEANUP_OPTS strata_opts *o = opts_new ();
  const char *id, *name;

  if (strncmp (param, "snapshot.", 9) != 0)
    return asprintf (extra, "x-snapshot-id=%s", param) >= 0;
  if (!o || !opts_parse (o, param, NULL))
    return false;
  id = opts_get (o, "snapshot.id");
  name = opts_get (o, "snapshot.name");
  for (size_t i = 0; i < o->n; i++)
    if (!o->v[i].used) {
      fprintf (stderr, "%s: Invalid parameter '%s'\n", progname,
               o->v[i].key);
      return false;
    }
  return asprintf (extra, "%s%s%s%s%s", id ? "x-snapshot-id=" : "",
                   id ? id : "", id && name ? "," : "",
                   name ? "x-snapshot-name=" : "", name ? name : "")
         >= 0;
}

strata_node *
img_open_snapshot (const char *filename, const char *fmt, bool force_share,
                   const char *param)
{
  CLEANUP_FREE char *extra = NULL;
  unsigned flags = force_share ? STRATA_OPEN_FORCE_SHARE : 0;
  strata_node *n = open_image_flags (filename, fmt, flags, NULL);
  struct strata_info info = { .size = sizeof info };

  if (!n)
    return NULL;
  /* As qemu-img: the image opens first, then its snapshot loads. */
  if (!strata_get_info (n, &info, 0, NULL)
      || strcmp (info.format, "qcow2") != 0) {
    fprintf (stderr, "%s: Failed to load snapshot: Block format '%s' used "
             "by device '' does not support temporarily loading internal "
             "snapshots\n", progname, info.format ? info.format : "?");
    strata_close (n);
    return NULL;
  }
  strata_close (n);
  if (!snapshot_param (param, &extra)) {
    fprintf (stderr, "%s: Failed in parsing snapshot param '%s'\n",
             progname, param);
    return NULL;
  }
  loading_snapshot = true;
  n = open_image_flags (filename, img_image_opts ? NULL : "qcow2", flags,
                        extra);
  loading_snapshot = false;
  return n;
}

/* S with qemu's empty containers: "[" and "]" on lines of their own,
 * the "]" indented as the line that opens it (jansson writes "[]"). */
static void
print_qemu_json (const char *s)
{
  const char *line = s;
  bool in_str = false;

  for (const char *p = s; *p; p++) {
    if (in_str) {
      if (*p == '\\' && p[1])
        putchar (*p++);
      else if (*p == '"')
        in_str = false;
    }
    else if (*p == '"')
      in_str = true;
    else if (*p == '\n')
      line = p + 1;
    else if ((*p == '[' && p[1] == ']') || (*p == '{' && p[1] == '}')) {
      printf ("%c\n%.*s", *p, (int) strspn (line, " "), line);
      continue;
    }
    putchar (*p);
  }
  putchar ('\n');
}

void
print_json (json_t *j)
{
  char *s = json_dumps (j, JSON_INDENT (4) | JSON_PRESERVE_ORDER);

  if (s)
    print_qemu_json (s);
  free (s);
}

bool
img_parse_size_arg (const char *s, const char *what, uint64_t *out)
{
  char *end;
  bool overflow;

  errno = 0;
  (void) strtoull (s, &end, 0);
  overflow = errno == ERANGE;
  if (s[0] == '-' || (!parse_size (s, out) && !overflow)) {
    fprintf (stderr,
             "%s: Invalid %s specified. You may use k, M, G, T, P or E "
             "suffixes for\n%s: kilobytes, megabytes, gigabytes, terabytes, "
             "petabytes and exabytes.\n",
             progname, what, progname);
    return false;
  }
  if (overflow || *out > INT64_MAX) {
    fprintf (stderr,
             "%s: Invalid %s specified. Must be between 0 and "
             "9223372036854775807.\n",
             progname, what);
    return false;
  }
  return true;
}

bool
img_parse_rate (const char *s, uint64_t *out)
{
  if (!parse_size (s, out) || *out > INT64_MAX) {
    fprintf (stderr,
             "%s: Invalid rate limit specified. You may use k, M, "
             "G, T, P or E suffixes for\n%s: kilobytes, megabytes, "
             "gigabytes, terabytes, petabytes and exabytes.\n",
             progname, progname);
    return false;
  }
  return true;
}

bool
img_cache_options (const char *mode, const char *fmt, char *buf, size_t size,
                   bool *writethrough)
{
  if (!cache_mode_options (mode, fmt, buf, size, writethrough)) {
    fprintf (stderr, "%s: Invalid cache option: %s\n", progname, mode);
    return false;
  }
  return true;
}

void
img_ratelimit_wait (const struct ratelimit *rl)
{
  uint64_t ns = ratelimit_delay (rl, clock_now_ns ());
  struct timespec ts
      = { .tv_sec = ns / 1000000000u, .tv_nsec = ns % 1000000000u };

  if (!ns)
    return;
  while (nanosleep (&ts, &ts) < 0 && errno == EINTR)
    ;
}


/* ---- -o help ---- */

/* qemu-img 7.2's creation option texts, one line each, sorted by name. */
static const char *const qcow2_create_opts[] = {
  "backing_file=<str>     - File name of a base image\n",
  "backing_fmt=<str>      - Image format of the base image\n",
  "cluster_size=<size>    - qcow2 cluster size\n",
  "compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])\n",
  "compression_type=<str> - Compression method used for image cluster compression\n",
  "data_file=<str>        - File name of an external data file\n",
  "data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image\n",
  "encrypt.cipher-alg=<str> - Name of encryption cipher algorithm\n",
  "encrypt.cipher-mode=<str> - Name of encryption cipher mode\n",
  "encrypt.format=<str>   - Encrypt the image, format choices: 'aes', 'luks'\n",
  "encrypt.hash-alg=<str> - Name of encryption hash algorithm\n",
  "encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds\n",
  "encrypt.ivgen-alg=<str> - Name of IV generator algorithm\n",
  "encrypt.ivgen-hash-alg=<str> - Name of IV generator hash algorithm\n",
  "encrypt.key-secret=<str> - ID of secret providing qcow AES key or LUKS passphrase\n",
  "encryption=<bool (on/off)> - Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)\n",
  "extended_l2=<bool (on/off)> - Extended L2 tables\n",
  "lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n",
  "preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)\n",
  "refcount_bits=<num>    - Width of a reference count entry in bits\n",
  "size=<size>            - Virtual disk size\n",
  NULL,
};
static const char *const raw_create_opts[] = {
  "size=<size>            - Virtual disk size\n",
  NULL,
};
/* The file protocol's, merged in when the target file is named. */
static const char *const file_create_opts[] = {
  "extent_size_hint=<size> - Extent size hint for the image file, 0 to "
  "disable\n",
  "nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)\n",
  "preallocation=<str>    - Preallocation mode (allowed values: off, "
  "falloc, full)\n",
  "size=<size>            - Virtual disk size\n",
  NULL,
};

bool
img_has_help_option (const char *options)
{
  CLEANUP_FREE char *copy = options ? strdup (options) : NULL;
  char *save = NULL;

  for (char *t = copy ? strtok_r (copy, ",", &save) : NULL; t;
       t = strtok_r (NULL, ",", &save))
    if (!strcmp (t, "help") || !strcmp (t, "?"))
      return true;
  return false;
}

/* The length of LINE's option name. */
static size_t
opt_name_len (const char *line)
{
  return strcspn (line, "=");
}

static int
opt_name_cmp (const char *a, const char *b)
{
  size_t la = opt_name_len (a), lb = opt_name_len (b);
  int r = strncmp (a, b, la < lb ? la : lb);

  return r ? r : (la > lb) - (la < lb);
}

int
img_print_create_help (const char *fmt, const char *filename)
{
  const char *const *f = !strcmp (fmt, "qcow2") ? qcow2_create_opts
                         : !strcmp (fmt, "raw") ? raw_create_opts
                                                : NULL;
  const char *const *p = file_create_opts;

  if (!f) {
    fprintf (stderr, "%s: Unknown file format '%s'\n", progname, fmt);
    return 1;
  }
  if (!filename) {
    printf ("Supported %s options:\n", fmt);
    for (; *f; f++)
      printf ("  %s", *f);
    printf ("\nThe protocol level may support further options.\n"
            "Specify the target filename to include those options.\n");
    return 0;
  }
  /* Both lists merged by name; the format's text wins on a tie. */
  printf ("Supported options:\n");
  while (*f || *p) {
    int cmp = !*p ? -1 : !*f ? 1 : opt_name_cmp (*f, *p);

    printf ("  %s", cmp <= 0 ? *f : *p);
    if (cmp <= 0)
      f++;
    if (cmp >= 0)
      p++;
  }
  return 0;
}
