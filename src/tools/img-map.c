/* strata-img map: where an image's data is, as qemu-img map (7.2) shows it.
 *
 *   map [--output=human|json] [--start-offset=O] [--max-length=L] [-U]
 *       [-f FMT] FILE
 *
 * The block status of the whole chain, one extent at a time, merged while
 * neighbours agree (depth, flags, file and contiguous offsets).  The human
 * form lists only the data extents and refuses images whose data has no
 * offset (compressed clusters); JSON lists every extent.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <strata/strata.h>

#include "checked.h"
#include "cleanup.h"
#include "opts.h"
#include "img.h"

struct map_entry {
  uint64_t start, length, offset;
  int depth;
  bool present, zero, data, has_offset;
  const char *file;
};

static bool
map_entry_mergeable (const struct map_entry *a, const struct map_entry *b)
{
  if (a->depth != b->depth || a->present != b->present || a->zero != b->zero
      || a->data != b->data || a->has_offset != b->has_offset)
    return false;
  if (a->has_offset && a->offset + a->length != b->offset)
    return false;
  if ((a->file == NULL) != (b->file == NULL)
      || (a->file && strcmp (a->file, b->file) != 0))
    return false;
  return true;
}

/* Append V in decimal at P; returns the end. */
static char *
put_u64 (char *p, uint64_t v)
{
  char tmp[20];
  int n = 0;

  do
    tmp[n++] = (char)('0' + v % 10);
  while ((v /= 10) != 0);
  while (n)
    *p++ = tmp[--n];
  return p;
}

static char *
put_str (char *p, const char *s)
{
  size_t n = strlen (s);

  memcpy (p, s, n);
  return p + n;
}

static const char *
json_bool (bool b)
{
  return b ? "true" : "false";
}

/* One JSON entry, as qemu-img prints it.  Formatted by hand: a chain of
 * 65,536 extents spent a quarter of strata-img map's instructions in
 * printf. */
static void
map_entry_print_json (const struct map_entry *e, bool first)
{
  char buf[256], *p = buf;

  p = put_str (p, first ? "{ \"start\": " : ",\n{ \"start\": ");
  p = put_u64 (p, e->start);
  p = put_str (p, ", \"length\": ");
  p = put_u64 (p, e->length);
  p = put_str (p, ", \"depth\": ");
  p = put_u64 (p, (uint64_t)e->depth);
  p = put_str (p, ", \"present\": ");
  p = put_str (p, json_bool (e->present));
  p = put_str (p, ", \"zero\": ");
  p = put_str (p, json_bool (e->zero));
  p = put_str (p, ", \"data\": ");
  p = put_str (p, json_bool (e->data));
  if (e->has_offset) {
    p = put_str (p, ", \"offset\": ");
    p = put_u64 (p, e->offset);
  }
  *p++ = '}';
  fwrite (buf, 1, (size_t)(p - buf), stdout);
}

static int
map_entry_print (const struct map_entry *e, enum output out, bool first)
{
  if (out == OUTPUT_JSON) {
    map_entry_print_json (e, first);
    return 0;
  }
  if (e->data && !e->has_offset) {
    fprintf (stderr, "%s: File contains external, encrypted or compressed "
             "clusters.\n", progname);
    return -1;
  }
  if (e->data && !e->zero)
    printf ("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e->start,
            e->length, e->offset, e->file ? e->file : "");
  return 0;
}

struct map {
  enum output out;
  bool force_share;
  const char *fmt, *filename;
  uint64_t start, max_len;
};

/* 0 when parsed, else the exit code. */
static int
parse_args (int argc, char **argv, struct map *m)
{
  static const struct option lopts[] = {
    { "output", required_argument, NULL, 'O' },
    { "start-offset", required_argument, NULL, 's' },
    { "max-length", required_argument, NULL, 'l' },
    { "force-share", no_argument, NULL, 'U' },
    { "format", required_argument, NULL, 'f' },
    { "help", no_argument, NULL, 'h' },
    IMG_IMAGE_OPTS_OPTION,
    { NULL, 0, NULL, 0 },
  };
  int c;

  while ((c = getopt_long (argc, argv, ":f:Uh", lopts, NULL)) != -1) {
    switch (c) {
    case 'O':
      if (!parse_output (optarg, &m->out))
        return 1;
      break;
    case 's':
      if (!img_parse_size_arg (optarg, "start offset", &m->start))
        return 1;
      break;
    case 'l':
      if (!img_parse_size_arg (optarg, "max length", &m->max_len))
        return 1;
      break;
    case 'U': m->force_share = true; break;
    case 'f': m->fmt = optarg; break;
    case IMG_OPT_IMAGE_OPTS: img_image_opts = true; break;
    case 'h':
      printf ("usage: %s map [--output=human|json] [--start-offset=O] "
              "[--max-length=L] [-U] [-f FMT] FILE\n", progname);
      exit (0);
    default: return img_option_error (c, argv);
    }
  }
  if (optind != argc - 1)
    return img_usage_error ("Expecting one image file name");
  m->filename = argv[optind];
  return 0;
}

/* The extents of [START, END) of N, merged and printed. */
static int
map_range (const struct map *m, strata_node *n, uint64_t start, uint64_t end)
{
  enum output out = m->out;
  bool first = true, have = false;
  struct map_entry cur = { 0 };
  int ret = 0;

  for (uint64_t off = start; off < end && ret == 0;) {
    struct strata_extent e = { .size = sizeof e };
    struct map_entry next;
    int r = strata_block_status (n, off, end - off, &e, 0);

    if (r < 0) {
      const char *msg = strata_last_error_message ();
      fprintf (stderr, "%s: %s\n", progname, msg ? msg : strerror (-r));
      ret = 1;
      break;
    }
    next = (struct map_entry){
      .start = off, .length = e.length, .depth = e.depth,
      .present = e.flags & STRATA_BS_ALLOCATED,
      .zero = e.flags & STRATA_BS_ZERO, .data = e.flags & STRATA_BS_DATA,
      .has_offset = e.flags & STRATA_BS_OFFSET, .offset = e.map,
      .file = e.file,
    };
    if (have && map_entry_mergeable (&cur, &next))
      cur.length += next.length;
    else {
      if (have && map_entry_print (&cur, out, first) < 0)
        ret = 1;
      first = first && !have;
      cur = next;
      have = true;
    }
    off += e.length;
  }
  if (ret == 0 && have && map_entry_print (&cur, out, first) < 0)
    ret = 1;
  if (ret == 0 && !have && out == OUTPUT_JSON) {
    /* An empty range still gets one entry, as qemu-img prints it. */
    cur = (struct map_entry){ .start = start };
    map_entry_print (&cur, out, true);
  }
  return ret;
}

static int
map_run (const struct map *m)
{
  uint64_t start = m->start, max_len = m->max_len, end;
  strata_node *n;
  int64_t size;
  int ret;

  n = open_image (m->filename, m->fmt, m->force_share, false, NULL);
  if (!n)
    return 1;
  size = strata_length (n);
  if (size < 0) {
    fprintf (stderr, "%s: %s: cannot get the image length\n", progname,
             m->filename);
    strata_close (n);
    return 1;
  }
  end = MIN ((uint64_t)size,
             start > (uint64_t)size
                 ? 0
                 : start + MIN (max_len, (uint64_t)size - start));
  if (m->out == OUTPUT_JSON)
    printf ("[");
  else
    printf ("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
  ret = map_range (m, n, start, end);
  if (m->out == OUTPUT_JSON)
    printf ("]\n");
  strata_close (n);
  return ret;
}

int
cmd_map (int argc, char **argv)
{
  struct map m = { .out = OUTPUT_HUMAN, .max_len = UINT64_MAX };
  int r = parse_args (argc, argv, &m);

  return r ? r : map_run (&m);
}
