/* strata-img snapshot [-U] [-q] [-l | -a SNAPSHOT | -c SNAPSHOT |
 * -d SNAPSHOT] FILE, as qemu-img 7.2 (options, messages, exit codes), and
 * the snapshot table as qemu-img prints it (here and in info).
 *
 * qemu-img's rules kept: no action lists nothing; -a takes an id or a
 * name (an id first), -d only a name; -c accepts a name that exists (the
 * new snapshot gets a new id).
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "img.h"

void
snapshot_list_human (struct strata_snapshot_info *const *l, size_t n)
{
  printf ("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE",
          "VM CLOCK", "ICOUNT");
  for (size_t i = 0; i < n; i++) {
    char size[32], date[32] = "", clock[64], icount[32] = "";
    uint64_t secs = l[i]->vm_clock_nsec / 1000000000;
    time_t t = (time_t) l[i]->date_sec;
    struct tm tm;

    size_to_str (l[i]->vm_state_size, size, sizeof size);
    if (localtime_r (&t, &tm))
      strftime (date, sizeof date, "%Y-%m-%d %H:%M:%S", &tm);
    snprintf (clock, sizeof clock, "%02d:%02d:%02d.%03d", (int) (secs / 3600),
              (int) ((secs / 60) % 60), (int) (secs % 60),
              (int) ((l[i]->vm_clock_nsec / 1000000) % 1000));
    if (l[i]->icount != UINT64_MAX)
      snprintf (icount, sizeof icount, "%" PRId64, (int64_t) l[i]->icount);
    printf ("%-9s %-16s %8s%20s%13s%11s\n", l[i]->id, l[i]->name, size, date,
            clock, icount);
  }
}

json_t *
snapshot_list_json (struct strata_snapshot_info *const *l, size_t n)
{
  json_t *arr = json_array ();

  /* qemu-img's member order. */
  for (size_t i = 0; i < n; i++) {
    json_t *o = json_object ();
    if (l[i]->icount != UINT64_MAX)
      json_object_set_new (o, "icount",
                           json_integer ((json_int_t) l[i]->icount));
    json_object_set_new (o, "vm-clock-nsec",
                         json_integer (l[i]->vm_clock_nsec % 1000000000));
    json_object_set_new (o, "name", json_string (l[i]->name));
    json_object_set_new (o, "date-sec", json_integer (l[i]->date_sec));
    json_object_set_new (o, "date-nsec", json_integer (l[i]->date_nsec));
    json_object_set_new (o, "vm-clock-sec",
                         json_integer (l[i]->vm_clock_nsec / 1000000000));
    json_object_set_new (o, "id", json_string (l[i]->id));
    json_object_set_new (o, "vm-state-size",
                         json_integer ((json_int_t) l[i]->vm_state_size));
    json_array_append_new (arr, o);
  }
  return arr;
}

int
img_usage_error (const char *msg)
{
  fprintf (stderr, "%s: %s\nTry '%s --help' for more information\n", progname,
           msg, progname);
  return 1;
}

int
img_option_error (int c, char **argv)
{
  char buf[128];

  snprintf (buf, sizeof buf,
            c == ':' ? "missing argument for option '%.40s'"
                     : "unrecognized option '%.40s'",
            argv[optind - 1]);
  return img_usage_error (buf);
}

static int
list (strata_node *n)
{
  struct strata_snapshot_info **l;
  strata_error *err = NULL;
  size_t count;

  if (!strata_snapshot_list (n, &l, &count, 0, &err)) {
    fail_err (err);
    return 1;
  }
  if (count > 0) {
    printf ("Snapshot list:\n");
    snapshot_list_human (l, count);
  }
  strata_snapshot_list_free (l, count);
  return 0;
}

/* ERR's message, or qemu-img's words when the format has no snapshots. */
static const char *
unsupported_text (int action, const strata_error *err)
{
  if (strata_error_errno (err) != ENOTSUP)
    return strata_error_message (err);
  return action == 'c'   ? "-95 (Operation not supported)"
         : action == 'a' ? "Block driver does not support snapshots"
                         : "snapshot not found";
}

int
cmd_snapshot (int argc, char **argv)
{
  static const struct option lopts[] = {
    { "help", no_argument, NULL, 'h' },
    { "force-share", no_argument, NULL, 'U' },
    IMG_IMAGE_OPTS_OPTION,
    { NULL, 0, NULL, 0 },
  };
  const char *name = NULL, *file;
  bool force_share = false, quiet = false, ok = true;
  strata_error *err = NULL;
  strata_node *n;
  int c, action = 0;

  opterr = 0;
  while ((c = getopt_long (argc, argv, ":la:c:d:hqU", lopts, NULL)) != -1) {
    switch (c) {
    case 'l':
    case 'a':
    case 'c':
    case 'd':
      if (action)
        return img_usage_error ("Cannot mix '-l', '-a', '-c', '-d'");
      action = c;
      name = optarg;
      break;
    case 'q': quiet = true; break;
    case 'U': force_share = true; break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'h':
      printf ("usage: %s snapshot [-U] [-q] [-l | -a snapshot | -c snapshot "
              "| -d snapshot] filename\n",
              progname);
      return 0;
    default: return img_option_error (c, argv);
    }
  }
  (void) quiet; /* qemu-img snapshot prints nothing it could silence */
  if (optind != argc - 1)
    return img_usage_error ("Expecting one image file name");
  file = argv[optind];
  if (!(n
        = open_image (file, NULL, force_share, action && action != 'l', NULL)))
    return 1;
  switch (action) {
  case 'l':
    c = list (n);
    strata_close (n);
    return c;
  case 'c': ok = strata_snapshot_create (n, name, 0, &err); break;
  case 'a':
    /* qemu-img opens a probed raw image a second time to apply. */
    tool_warn_probed_raw (n, file);
    ok = strata_snapshot_apply (n, name, 0, &err);
    break;
  case 'd': ok = strata_snapshot_delete (n, name, 0, &err); break;
  }
  if (!ok)
    fprintf (stderr, "%s: Could not %s snapshot '%s': %s\n", progname,
             action == 'c'   ? "create"
             : action == 'a' ? "apply"
                             : "delete",
             name, unsupported_text (action, err));
  strata_error_free (err);
  strata_close (n);
  return ok ? 0 : 1;
}
