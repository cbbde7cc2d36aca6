/* strata: qcow2 persistent dirty bitmaps, read side (qcow2.txt "Bitmaps
 * extension" and "Bitmaps").
 *
 *   header extension 0x23852875 (24 bytes, valid only while autoclear
 *   bit 0 is set):
 *     0- 3 nb_bitmaps (>= 1)          4- 7 reserved, zero
 *     8-15 bitmap_directory_size     16-23 bitmap_directory_offset
 *   bitmap directory (contiguous, cluster-aligned), nb_bitmaps entries:
 *     0- 7 bitmap_table_offset        8-11 bitmap_table_size (entries)
 *    12-15 flags (0 in_use, 1 auto, 2 extra_data_compatible; 3-31 zero)
 *       16 type (1 = dirty tracking)    17 granularity_bits (0-63)
 *    18-19 name_size (>= 1)          20-23 extra_data_size
 *     extra data, name (unique, not NUL-terminated), zero padding to 8
 *
 * This file parses and checks the directory (listing, and for
 * bitmaps-persist.c, which loads the bitmaps into the node's registry and
 * stores them back).  With autoclear bit 0 clear, a program lacking bitmap
 * support wrote the image and the bitmaps are stale: they are not listed,
 * as QEMU does not list them.
 *
 * Every field is untrusted and checked before use; a bad one fails the
 * listing with a message naming it.  The directory is read from the file
 * under node->lock each time it is listed: nothing is cached, because a
 * read-only node's file may be changed by its read-write owner.  Limits
 * are QEMU's (qcow2-bitmap.c): granularity 512 B..2 GiB, a table of at
 * most 2^27 entries, at most 512 MiB of bitmap data.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"
#include "util/checked.h"
#include "util/cleanup.h"

#define BITMAP_EXT_LEN 24
#define BITMAP_ENTRY_HEADER 24
#define BITMAP_MAX_COUNT 65535 /* QEMU's limit */
#define BITMAP_MAX_NAME 1023   /* QEMU's limit */
#define BITMAP_MAX_DIR_BYTES (64u << 20)
#define BITMAP_MIN_GBITS 9
#define BITMAP_MAX_GBITS 31
#define BITMAP_MAX_TABLE (1u << 27)
#define BITMAP_MAX_DATA (512ull << 20)

/* The bitmaps extension when the bitmaps are valid: *PRESENT false when
 * there is none (or it is stale: autoclear bit 0 clear).  False with
 * *errp set when its fields are malformed. */
bool
qcow2_bitmap_ext_find (strata_node *node, const struct qcow2_state *s,
                       struct qcow2_bitmap_ext *e, bool *present,
                       strata_error **errp)
{
  const char *fn = node->filename;
  const struct qcow2_ext *x = NULL;
  int64_t flen;
  uint64_t end;

  *present = false;
  if (s->version < 3 || !(s->autoclear & QCOW2_AUTOCLEAR_BITMAPS))
    return true;
  for (unsigned i = 0; i < s->nexts && !x; i++)
    if (s->exts[i].type == QCOW2_EXT_BITMAPS)
      x = &s->exts[i];
  if (!x)
    return true;
  if (x->len != BITMAP_EXT_LEN) {
    error_set (errp, EINVAL,
               "%s: bitmaps extension length %" PRIu32 " is invalid (24)", fn,
               x->len);
    return false;
  }
  e->count = be32_load (x->data);
  e->dir_size = be64_load (x->data + 8);
  e->dir_offset = be64_load (x->data + 16);
  if (e->count == 0 || e->count > BITMAP_MAX_COUNT) {
    error_set (errp, EINVAL,
               "%s: bitmaps extension nb_bitmaps %" PRIu32
               " is out of range (1..%d)",
               fn, e->count, BITMAP_MAX_COUNT);
    return false;
  }
  if (be32_load (x->data + 4) != 0) {
    error_set (errp, EINVAL,
               "%s: bitmaps extension reserved field is not "
               "zero",
               fn);
    return false;
  }
  if (e->dir_size < (uint64_t)e->count * BITMAP_ENTRY_HEADER
      || e->dir_size > BITMAP_MAX_DIR_BYTES) {
    error_set (errp, EINVAL,
               "%s: bitmap directory size %" PRIu64 " is out "
               "of range for %" PRIu32 " bitmaps (%" PRIu64 "..%u)",
               fn, e->dir_size, e->count,
               (uint64_t)e->count * BITMAP_ENTRY_HEADER, BITMAP_MAX_DIR_BYTES);
    return false;
  }
  if (e->dir_offset == 0 || e->dir_offset % s->cluster_size) {
    error_set (errp, EINVAL,
               "%s: bitmap directory offset 0x%" PRIx64
               " is not a non-zero multiple of the cluster size",
               fn, e->dir_offset);
    return false;
  }
  flen = node_length (node->file);
  if (flen < 0 || !checked_add_u64 (e->dir_offset, e->dir_size, &end)
      || end > (uint64_t)flen) {
    error_set (errp, EINVAL,
               "%s: bitmap directory offset 0x%" PRIx64 " plus %" PRIu64
               " bytes is past the end of the file",
               fn, e->dir_offset, e->dir_size);
    return false;
  }
  *present = true;
  return true;
}

/* Bitmap table entries a bitmap of granularity 2^G over the virtual size
 * needs: one per cluster of bitmap data. */
uint64_t
qcow2_bitmap_table_needed (const struct qcow2_state *s, unsigned g)
{
  uint64_t bits = g >= 63 ? (s->size ? 1 : 0)
                          : (s->size >> g) + !!(s->size & ((1ull << g) - 1));
  uint64_t bytes = bits / 8 + !!(bits % 8);

  return bytes / s->cluster_size + !!(bytes % s->cluster_size);
}

/* Check the directory entry at D (LEFT bytes remain in the directory) and
 * return its padded size, or 0 with *errp set. */
static uint64_t
check_entry (strata_node *node, const struct qcow2_state *s, const uint8_t *d,
             uint64_t left, uint32_t i, strata_error **errp)
{
  const char *fn = node->filename;
  uint64_t table, table_end, flen, len;
  uint32_t table_size, flags, extra;
  unsigned type, g, name_size;

  if (left < BITMAP_ENTRY_HEADER) {
    error_set (errp, EINVAL,
               "%s: bitmap directory entry %" PRIu32 " runs "
               "past the directory",
               fn, i);
    return 0;
  }
  table = be64_load (d);
  table_size = be32_load (d + 8);
  flags = be32_load (d + 12);
  type = d[16];
  g = d[17];
  name_size = be16_load (d + 18);
  extra = be32_load (d + 20);
  /* Entries are padded to 8 bytes and the directory is their sum. */
  len = ROUND_UP ((uint64_t)BITMAP_ENTRY_HEADER + extra + name_size, 8);
  if (len > left) {
    error_set (errp, EINVAL,
               "%s: bitmap directory entry %" PRIu32 " (name "
               "%u bytes, extra data %" PRIu32 " bytes) runs past the "
               "directory",
               fn, i, name_size, extra);
    return 0;
  }
  if (name_size == 0 || name_size > BITMAP_MAX_NAME) {
    error_set (errp, EINVAL,
               "%s: bitmap %" PRIu32 " name size %u is out of "
               "range (1..%d)",
               fn, i, name_size, BITMAP_MAX_NAME);
    return 0;
  }
  if (memchr (d + BITMAP_ENTRY_HEADER + extra, 0, name_size)) {
    error_set (errp, EINVAL,
               "%s: bitmap %" PRIu32 " name contains a NUL "
               "byte",
               fn, i);
    return 0;
  }
  if (flags
      & ~(BITMAP_FLAG_IN_USE | BITMAP_FLAG_AUTO | BITMAP_FLAG_EXTRA_OK)) {
    error_set (errp, EINVAL,
               "%s: bitmap %" PRIu32 " has reserved flags "
               "0x%" PRIx32 " set",
               fn, i, flags);
    return 0;
  }
  if (type != BITMAP_TYPE_DIRTY) {
    error_set (errp, EINVAL,
               "%s: bitmap %" PRIu32 " type %u is not a dirty "
               "tracking bitmap (1)",
               fn, i, type);
    return 0;
  }
  if (g < BITMAP_MIN_GBITS || g > BITMAP_MAX_GBITS) {
    error_set (errp, EINVAL,
               "%s: bitmap %" PRIu32 " granularity_bits %u is "
               "out of range (%d..%d)",
               fn, i, g, BITMAP_MIN_GBITS, BITMAP_MAX_GBITS);
    return 0;
  }
  for (uint64_t p = BITMAP_ENTRY_HEADER + extra + name_size; p < len; p++)
    if (d[p]) {
      error_set (errp, EINVAL,
                 "%s: bitmap %" PRIu32 " directory entry "
                 "padding is not zero",
                 fn, i);
      return 0;
    }
  /* The table: aligned, inside the file, and (unless the bitmap is marked
   * in use, when its metadata may be outdated) as long as the virtual size
   * needs. */
  flen = (uint64_t)MAX (node_length (node->file), 0);
  if (table_size > BITMAP_MAX_TABLE) {
    error_set (errp, EINVAL,
               "%s: bitmap %" PRIu32 " table size %" PRIu32
               " is too large (max %u entries)",
               fn, i, table_size, BITMAP_MAX_TABLE);
    return 0;
  }
  if (table_size && table < s->cluster_size) {
    error_set (errp, EINVAL,
               "%s: bitmap %" PRIu32 " table offset 0x%" PRIx64
               " points into the image header",
               fn, i, table);
    return 0;
  }
  if (!(flags & BITMAP_FLAG_IN_USE)
      && ((s->size >> g) + 8) / 8 > BITMAP_MAX_DATA) {
    error_set (errp, EINVAL,
               "%s: bitmap %" PRIu32 " granularity_bits %u makes more than "
               "512 MiB of bitmap data for the virtual size",
               fn, i, g);
    return 0;
  }
  if (table % s->cluster_size || (table_size && !table)
      || !checked_add_u64 (table, (uint64_t)table_size * 8, &table_end)
      || table_end > flen) {
    error_set (errp, EINVAL,
               "%s: bitmap %" PRIu32 " table offset 0x%" PRIx64 " (%" PRIu32
               " entries) is unaligned or outside the file",
               fn, i, table, table_size);
    return 0;
  }
  if (!(flags & BITMAP_FLAG_IN_USE)
      && table_size != qcow2_bitmap_table_needed (s, g)) {
    error_set (errp, EINVAL,
               "%s: bitmap %" PRIu32 " table has %" PRIu32
               " entries; the virtual size needs %" PRIu64,
               fn, i, table_size, qcow2_bitmap_table_needed (s, g));
    return 0;
  }
  return len;
}

void
qcow2_bitmap_dir_free (struct qcow2_bitmap_dir *d)
{
  if (!d)
    return;
  for (uint32_t i = 0; i < d->count && d->e; i++)
    free (d->e[i].name);
  free (d->e);
  free (d->raw);
  free (d);
}

static int
name_cmp (const void *a, const void *b)
{
  return strcmp ((*(struct qcow2_bitmap *const *)a)->name,
                 (*(struct qcow2_bitmap *const *)b)->name);
}

/* Names are unique (qcow2.txt): a duplicate is a malformed directory. */
static bool
check_unique (strata_node *node, const struct qcow2_bitmap_dir *d,
              strata_error **errp)
{
  CLEANUP_FREE struct qcow2_bitmap **sorted
      = malloc (d->count * sizeof *sorted);

  if (!sorted) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  for (uint32_t i = 0; i < d->count; i++)
    sorted[i] = &d->e[i];
  qsort (sorted, d->count, sizeof *sorted, name_cmp);
  for (uint32_t i = 1; i < d->count; i++)
    if (strcmp (sorted[i - 1]->name, sorted[i]->name) == 0) {
      error_set (errp, EINVAL,
                 "%s: bitmap name '%s' appears twice in the "
                 "bitmap directory",
                 node->filename, sorted[i]->name);
      return false;
    }
  return true;
}

/* Parse and check D->raw into D->e. */
static bool
parse_directory (strata_node *node, const struct qcow2_state *s,
                 struct qcow2_bitmap_dir *d, strata_error **errp)
{
  uint64_t pos = 0, len;

  if (!(d->e = calloc (d->count, sizeof *d->e))) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  for (uint32_t i = 0; i < d->count; i++, pos += len) {
    const uint8_t *p = d->raw + pos;
    struct qcow2_bitmap *b = &d->e[i];

    if (!(len = check_entry (node, s, p, d->size - pos, i, errp)))
      return false;
    b->pos = pos;
    b->len = len;
    b->table = be64_load (p);
    b->table_size = be32_load (p + 8);
    b->flags = be32_load (p + 12);
    b->gbits = p[17];
    if (!(b->name = strndup ((const char *)p + BITMAP_ENTRY_HEADER
                                 + be32_load (p + 20),
                             be16_load (p + 18)))) {
      error_set (errp, ENOMEM, "out of memory");
      return false;
    }
  }
  if (pos != d->size) {
    error_set (errp, EINVAL,
               "%s: bitmap directory size %" PRIu64 " does "
               "not match its %" PRIu32 " entries (%" PRIu64 " bytes)",
               node->filename, d->size, d->count, pos);
    return false;
  }
  return check_unique (node, d, errp);
}

bool
qcow2_bitmap_dir_read (strata_node *node, struct qcow2_bitmap_dir **out,
                       strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  struct qcow2_bitmap_ext e;
  struct qcow2_bitmap_dir *d;
  bool present;
  int r;

  *out = NULL;
  if (!qcow2_bitmap_ext_find (node, s, &e, &present, errp))
    return false;
  if (!present)
    return true;
  if (!(d = calloc (1, sizeof *d)) || !(d->raw = malloc (e.dir_size))) {
    free (d);
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  d->offset = e.dir_offset;
  d->size = e.dir_size;
  d->count = e.count;
  if ((r = node_pread (node->file, e.dir_offset, d->raw, e.dir_size, 0)) < 0) {
    error_set (errp, -r, "%s: cannot read the bitmap directory: %s",
               node->filename, strerror (-r));
    qcow2_bitmap_dir_free (d);
    return false;
  }
  if (!parse_directory (node, s, d, errp)) {
    qcow2_bitmap_dir_free (d);
    return false;
  }
  *out = d;
  return true;
}

bool
qcow2_bitmap_list (strata_node *node, struct strata_bitmap_info ***list,
                   size_t *n, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  struct qcow2_bitmap_dir *d;
  struct strata_bitmap_info **l;
  bool ok;

  *list = NULL;
  *n = 0;
  if (s->version < 3) {
    error_set (errp, ENOTSUP,
               "%s: qcow2 version 2 images hold no "
               "persistent bitmaps",
               node->filename);
    return false;
  }
  pthread_mutex_lock (&node->lock);
  ok = qcow2_bitmap_dir_read (node, &d, errp);
  pthread_mutex_unlock (&node->lock);
  if (!ok)
    return false;
  if (!(l = calloc ((d ? d->count : 0) + 1, sizeof *l)))
    goto oom;
  for (uint32_t i = 0; d && i < d->count; i++) {
    if (!(l[i] = calloc (1, sizeof **l))
        || !(l[i]->name = strdup (d->e[i].name)))
      goto oom;
    l[i]->flags
        = (d->e[i].flags & BITMAP_FLAG_IN_USE ? STRATA_BITMAP_IN_USE : 0)
          | (d->e[i].flags & BITMAP_FLAG_AUTO ? STRATA_BITMAP_AUTO : 0);
    l[i]->granularity = UINT64_C (1) << d->e[i].gbits;
  }
  *list = l;
  *n = d ? d->count : 0;
  qcow2_bitmap_dir_free (d);
  return true;

oom:
  strata_bitmap_list_free (l);
  qcow2_bitmap_dir_free (d);
  error_set (errp, ENOMEM, "out of memory");
  return false;
}
