/* strata: qcow2 persistent dirty bitmaps, loaded into the node's registry
 * and stored back (qcow2.txt "Bitmaps extension", "Bitmap table", "Bitmap
 * data"; the directory itself is parsed in bitmaps.c).
 *
 *   bitmap table entry (8 bytes):  bits 9-55 host offset of one cluster
 *     of bitmap data, or 0: then bit 0 says all zeros (0) / all ones (1);
 *     bits 1-8 and 56-63 reserved (zero)
 *   bitmap data: bit I covers guest bytes [I << g, (I + 1) << g), bit I % 8
 *     of byte I / 8; cluster K of the table holds bytes [K*cs, (K+1)*cs)
 *
 * The life of a bitmap in a read-write open, as QEMU keeps it:
 *   open   every bitmap is loaded (one marked in use was left by a writer
 *          that did not close: it is registered inconsistent, its data not
 *          read); then each is marked in use on disk, the directory
 *          rewritten in place and flushed.  A crash from here on leaves
 *          them marked, and QEMU (and strata) treat them as inconsistent.
 *   close  (store) each persistent bitmap of the registry is written anew:
 *          data clusters (all-zero clusters are not stored), its table,
 *          then a new directory without the in-use flags; refcounts and
 *          data are flushed; then the header's extension (and autoclear
 *          bit 0) points at the new directory in one write, flushed; only
 *          then are the old directory, tables and data freed.  A crash
 *          before the header write leaks the new clusters, after it the
 *          old ones; the header never names a half-written directory.
 *          An inconsistent bitmap keeps its old entry and clusters.
 * A read-only open loads the bitmaps and never writes them.
 *
 * Every table entry is untrusted: reserved bits, alignment, the header
 * and the end of the file are checked before a cluster is read, and a bad
 * one fails the load naming the bitmap and the entry.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/dirty.h"
#include "drivers/qcow2/qcow2.h"
#include "util/checked.h"
#include "util/cleanup.h"

#define BME_OFFSET_MASK 0x00fffffffffffe00ull
#define BME_RESERVED 0xff000000000001feull
#define BME_ALL_ONES 1ull

static void
set_load_error (strata_node *node, struct qcow2_state *s, strata_error *why)
{
  strata_error *e = NULL;

  error_set (&e, ENOTSUP,
             "%s: image has persistent dirty bitmaps that strata cannot "
             "keep up to date, and their directory is unreadable (%s); open "
             "it read-only",
             node->filename, strata_error_message (why));
  strata_error_free (why);
  strata_error_free (s->bm_load_err);
  s->bm_load_err = e;
}

/* Bitmap B's table, checked, in host order: *TABLE (caller frees). */
static bool
read_table (strata_node *node, const struct qcow2_bitmap *b, uint64_t **table,
            strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  uint64_t *t = malloc ((b->table_size ? b->table_size : 1) * 8);
  uint64_t flen = (uint64_t)MAX (node_length (node->file), 0);
  int r;

  if (!t) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  if (b->table_size
      && (r = node_pread (node->file, b->table, t, b->table_size * 8ull, 0))
             < 0) {
    free (t);
    error_set (errp, -r, "%s: cannot read the table of bitmap '%s': %s",
               node->filename, b->name, strerror (-r));
    return false;
  }
  for (uint32_t k = 0; k < b->table_size; k++) {
    uint64_t e = be64_load ((uint8_t *)&t[k]), off = e & BME_OFFSET_MASK;

    t[k] = e;
    if ((e & BME_RESERVED) || (off && (e & BME_ALL_ONES))
        || (off
            && (off < s->cluster_size || off % s->cluster_size
                || off + s->cluster_size > flen))) {
      free (t);
      error_set (errp, EINVAL,
                 "%s: bitmap '%s' table entry %" PRIu32 " (0x%016" PRIx64
                 ") is reserved, unaligned, in the header or past the end "
                 "of the file",
                 node->filename, b->name, k, e);
      return false;
    }
  }
  *table = t;
  return true;
}

/* Read bitmap B's data into BM. */
static bool
load_data (strata_node *node, const struct qcow2_bitmap *b,
           struct dirty_bitmap *bm, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE uint64_t *t = NULL;
  CLEANUP_FREE uint8_t *buf = malloc (s->cluster_size);
  uint64_t cs = s->cluster_size;
  int r;

  if (!buf) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  if (!read_table (node, b, &t, errp))
    return false;
  for (uint32_t k = 0; k < b->table_size; k++) {
    uint64_t off = t[k] & BME_OFFSET_MASK;

    if (!off && !(t[k] & BME_ALL_ONES))
      continue;
    if (!off)
      memset (buf, 0xff, cs);
    else if ((r = node_pread (node->file, off, buf, cs, 0)) < 0) {
      error_set (errp, -r, "%s: cannot read the data of bitmap '%s': %s",
                 node->filename, b->name, strerror (-r));
      return false;
    }
    dirty_deserialize_or (bm, k * cs, cs, buf);
  }
  return true;
}

/* Register every bitmap of D on NODE; false (and none registered) on the
 * first failure. */
static bool
load_all (strata_node *node, const struct qcow2_bitmap_dir *d,
          strata_error **errp)
{
  uint32_t i;

  for (i = 0; i < d->count; i++) {
    const struct qcow2_bitmap *b = &d->e[i];
    unsigned flags
        = DIRTY_PERSISTENT | (b->flags & BITMAP_FLAG_AUTO ? 0 : DIRTY_DISABLED)
          | (b->flags & BITMAP_FLAG_IN_USE ? DIRTY_INCONSISTENT : 0);
    struct dirty_bitmap *bm
        = node_bitmap_add (node, b->name, 1ull << b->gbits, flags, errp);

    if (!bm)
      break;
    if (!(b->flags & BITMAP_FLAG_IN_USE) && !load_data (node, b, bm, errp))
      break;
  }
  if (i == d->count)
    return true;
  for (uint32_t j = 0; j <= i && j < d->count; j++)
    node_bitmap_remove (node, d->e[j].name, NULL);
  return false;
}

bool
qcow2_bitmaps_load (strata_node *node, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  strata_error *why = NULL;
  struct qcow2_bitmap_dir *d;

  if (s->version < 3)
    return true;
  if (qcow2_bitmap_dir_read (node, &d, &why)
      && (!d || load_all (node, d, &why))) {
    s->bm_dir = d;
    return true;
  }
  qcow2_bitmap_dir_free (d);
  set_load_error (node, s, why);
  if (node->read_only)
    return true;
  error_set (errp, strata_error_errno (s->bm_load_err), "%s",
             strata_error_message (s->bm_load_err));
  return false;
}

bool
qcow2_bitmaps_writable (strata_node *node, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  struct qcow2_bitmap_dir *d = s->bm_dir;
  bool change = false;
  int r;

  if (s->bm_load_err) {
    error_set (errp, strata_error_errno (s->bm_load_err), "%s",
               strata_error_message (s->bm_load_err));
    return false;
  }
  if (s->version < 3)
    return true;
  for (uint32_t i = 0; d && i < d->count; i++) {
    uint8_t *flags = d->raw + d->e[i].pos + 12;

    if (!(d->e[i].flags & BITMAP_FLAG_IN_USE)) {
      be32_store (flags, be32_load (flags) | BITMAP_FLAG_IN_USE);
      change = true;
    }
  }
  if (change
      && ((r = node_pwrite (node->file, d->offset, d->raw, d->size, 0)) < 0
          || (r = node_flush (node->file)) < 0)) {
    error_set (errp, -r, "%s: cannot mark the persistent bitmaps in use: %s",
               node->filename, strerror (-r));
    return false;
  }
  s->bm_writable = true;
  return true;
}

void
qcow2_bitmaps_forget (struct qcow2_state *s)
{
  qcow2_bitmap_dir_free (s->bm_dir);
  s->bm_dir = NULL;
  strata_error_free (s->bm_load_err);
  s->bm_load_err = NULL;
  s->bm_writable = false;
}

/* N contiguous clusters: one from the free space (so that rewriting the
 * bitmaps at every close reuses what the last close freed), more past
 * the end. */
static int64_t
alloc_run_locked (strata_node *node, uint64_t n)
{
  return n == 1 ? qcow2_alloc_cluster_locked (node)
                : qcow2_alloc_contiguous_locked (node, n);
}

/* Write BM's data clusters and its table; *TABLE, *SIZE for its entry. */
static int
write_bitmap_locked (strata_node *node, struct dirty_bitmap *bm,
                     uint64_t *table, uint32_t *size)
{
  struct qcow2_state *s = node->opaque;
  uint64_t cs = s->cluster_size, total = dirty_serialized_size (bm);
  uint64_t n = (total + cs - 1) / cs, tclusters = (n * 8 + cs - 1) / cs;
  CLEANUP_FREE uint8_t *t = calloc (tclusters ? tclusters : 1, cs);
  CLEANUP_FREE uint8_t *buf = malloc (cs);
  int64_t c;
  int r;

  if (!t || !buf)
    return io_error (ENOMEM, "out of memory");
  for (uint64_t k = 0; k < n; k++) {
    bool zero = true;

    dirty_serialize (bm, k * cs, cs, buf);
    for (uint64_t i = 0; i < cs && zero; i++)
      zero = !buf[i];
    if (zero)
      continue;
    if ((c = qcow2_alloc_cluster_locked (node)) < 0)
      return (int)c;
    if ((r = node_pwrite (node->file, (uint64_t)c, buf, cs, 0)) < 0)
      return r;
    be64_store (t + k * 8, (uint64_t)c);
  }
  *table = 0;
  *size = (uint32_t)n;
  if (!n)
    return 0;
  if ((c = alloc_run_locked (node, tclusters)) < 0)
    return (int)c;
  if ((r = node_pwrite (node->file, (uint64_t)c, t, tclusters * cs, 0)) < 0)
    return r;
  *table = (uint64_t)c;
  return 0;
}

/* Append BM's directory entry (no extra data) to F. */
static void
put_entry (FILE *f, struct dirty_bitmap *bm, uint64_t table, uint32_t size)
{
  const char *name = dirty_name (bm);
  size_t len = strlen (name);
  uint8_t h[24] = { 0 }, pad[8] = { 0 };

  be64_store (h, table);
  be32_store (h + 8, size);
  be32_store (h + 12,
              dirty_flags (bm) & DIRTY_DISABLED ? 0 : BITMAP_FLAG_AUTO);
  h[16] = BITMAP_TYPE_DIRTY;
  h[17] = (uint8_t)__builtin_ctzll (dirty_granularity (bm));
  be16_store (h + 18, (uint16_t)len);
  fwrite (h, 1, sizeof h, f);
  fwrite (name, 1, len, f);
  fwrite (pad, 1, ROUND_UP (24 + len, 8) - 24 - len, f);
}

/* The new first cluster: OLD's header fields, its extensions but the
 * bitmaps one, then (COUNT > 0) the bitmaps extension E, the end marker
 * and the backing file name; autoclear bit 0 as COUNT says.  One write
 * from offset 0, as backing.c rewrites it. */
static int
write_header_locked (strata_node *node, const struct qcow2_bitmap_ext *e)
{
  struct qcow2_state *s = node->opaque;
  uint64_t cs = s->cluster_size, ext_end, pos = s->header_length, off;
  CLEANUP_FREE uint8_t *old = calloc (1, cs), *out = calloc (1, cs);
  int64_t flen = node_length (node->file);
  uint64_t old_len, bf_off, bf_end, autoclear, used;
  uint32_t bf_size;
  uint8_t ext[24];
  int r;

  if (!old || !out)
    return io_error (ENOMEM, "out of memory");
  if (flen < 0)
    return (int)flen;
  old_len = MIN (cs, (uint64_t)flen);
  if ((r = node_pread (node->file, 0, old, old_len, 0)) < 0)
    return r;
  if (be32_load (old) != QCOW2_MAGIC
      || !qcow2_extensions_end (node, s, old, old_len, &ext_end, NULL))
    return io_error (EIO, "%s: the header changed on disk", node->filename);
  bf_off = be64_load (old + 8);
  bf_size = be32_load (old + 16);
  if (bf_off
      && (!checked_add_u64 (bf_off, bf_size, &bf_end) || bf_end > old_len))
    return io_error (EIO,
                     "%s: the backing file name is outside the first "
                     "cluster",
                     node->filename);
  memcpy (out, old, s->header_length);
  for (off = s->header_length; off < ext_end;) {
    uint64_t step = 8 + ROUND_UP ((uint64_t)be32_load (old + off + 4), 8);

    if (be32_load (old + off) != QCOW2_EXT_BITMAPS) {
      memcpy (out + pos, old + off, MIN (step, ext_end - off));
      pos += step;
    }
    off += step;
  }
  if (e->count) {
    be32_store (ext, e->count);
    be32_store (ext + 4, 0);
    be64_store (ext + 8, e->dir_size);
    be64_store (ext + 16, e->dir_offset);
    be32_store (out + pos, QCOW2_EXT_BITMAPS);
    be32_store (out + pos + 4, sizeof ext);
    memcpy (out + pos + 8, ext, sizeof ext);
    pos += 8 + sizeof ext;
  }
  pos += 8; /* the end marker: zeros */
  if (pos + (bf_off ? bf_size : 0) > cs)
    return io_error (ENOSPC,
                     "%s: the bitmaps extension does not fit in the "
                     "first cluster",
                     node->filename);
  if (bf_off) {
    memcpy (out + pos, old + bf_off, bf_size);
    be64_store (out + 8, pos);
  }
  used = pos + (bf_off ? bf_size : 0);
  autoclear = e->count ? s->autoclear | QCOW2_AUTOCLEAR_BITMAPS
                       : s->autoclear & ~QCOW2_AUTOCLEAR_BITMAPS;
  be64_store (out + 88, autoclear);
  used = MIN (
      ROUND_UP (MAX (used, qcow2_header_used (node, s, old, old_len)), 512),
      cs);
  if ((r = qcow2_write_header_field (node, 0, out, used)) < 0
      || (r = node_flush (node->file)) < 0)
    return r;
  s->autoclear = autoclear;
  return 0;
}

/* s->exts (which bitmaps.c reads the extension from) as the header now
 * has it. */
static int
update_exts (struct qcow2_state *s, const struct qcow2_bitmap_ext *e)
{
  struct qcow2_ext *x = NULL;
  uint8_t *data;

  for (unsigned i = 0; i < s->nexts; i++)
    if (s->exts[i].type == QCOW2_EXT_BITMAPS)
      x = &s->exts[i];
  if (!e->count) {
    if (x) {
      free (x->data);
      *x = s->exts[--s->nexts];
    }
    return 0;
  }
  if (!(data = malloc (24)))
    return io_error (ENOMEM, "out of memory");
  be32_store (data, e->count);
  be32_store (data + 4, 0);
  be64_store (data + 8, e->dir_size);
  be64_store (data + 16, e->dir_offset);
  if (!x) {
    struct qcow2_ext *v = realloc (s->exts, (s->nexts + 1) * sizeof *v);
    if (!v) {
      free (data);
      return io_error (ENOMEM, "out of memory");
    }
    s->exts = v;
    x = &s->exts[s->nexts++];
    x->data = NULL;
  }
  free (x->data);
  *x = (struct qcow2_ext){ QCOW2_EXT_BITMAPS, 24, data };
  return 0;
}

/* Drop the references of OLD's entries that KEEP does not keep, and of
 * OLD's directory.  A table that no longer reads back is leaked. */
static int
free_old_locked (strata_node *node, const struct qcow2_bitmap_dir *old,
                 const bool *keep)
{
  struct qcow2_state *s = node->opaque;
  uint64_t cs = s->cluster_size;
  int r;

  for (uint32_t i = 0; old && i < old->count; i++) {
    const struct qcow2_bitmap *b = &old->e[i];
    CLEANUP_FREE uint64_t *t = NULL;

    if (keep[i] || !read_table (node, b, &t, NULL))
      continue;
    for (uint32_t k = 0; k < b->table_size; k++)
      if ((t[k] & BME_OFFSET_MASK)
          && (r
              = qcow2_free_clusters_locked (node, t[k] & BME_OFFSET_MASK, cs))
                 < 0)
        return r;
    if (b->table_size
        && (r = qcow2_free_clusters_locked (
                node, b->table, ROUND_UP (b->table_size * 8ull, cs)))
               < 0)
      return r;
  }
  if (old
      && (r = qcow2_free_clusters_locked (node, old->offset,
                                          ROUND_UP (old->size, cs)))
             < 0)
    return r;
  return 0;
}

/* The old entry named NAME, or -1. */
static int64_t
old_entry (const struct qcow2_bitmap_dir *old, const char *name)
{
  for (uint32_t i = 0; old && i < old->count; i++)
    if (strcmp (old->e[i].name, name) == 0)
      return i;
  return -1;
}

/* The new directory into *DIR (malloc'd), *E its count and size; each
 * persistent bitmap's data written, inconsistent ones kept as they were
 * (KEEP[i] for old entry i). */
static int
write_bitmaps_locked (strata_node *node, struct qcow2_bitmap_ext *e,
                      uint8_t **dir, bool *keep)
{
  struct qcow2_state *s = node->opaque;
  const struct qcow2_bitmap_dir *old = s->bm_dir;
  CLEANUP_FREE struct dirty_bitmap **l = NULL;
  size_t n, size = 0;
  FILE *f;
  int r = 0;

  *dir = NULL;
  if (!(l = node_bitmaps (node, &n))
      || !(f = open_memstream ((char **)dir, &size)))
    return io_error (ENOMEM, "out of memory");
  e->count = 0;
  for (size_t i = 0; i < n && r == 0; i++) {
    unsigned flags = dirty_flags (l[i]);
    int64_t o = old_entry (old, dirty_name (l[i]));
    uint64_t table = 0;
    uint32_t tsize = 0;

    if (!(flags & DIRTY_PERSISTENT))
      continue;
    if (flags & DIRTY_INCONSISTENT) {
      if (o < 0)
        continue;
      fwrite (old->raw + old->e[o].pos, 1, old->e[o].len, f);
      keep[o] = true;
    }
    else if ((r = write_bitmap_locked (node, l[i], &table, &tsize)) == 0)
      put_entry (f, l[i], table, tsize);
    e->count++;
  }
  if (fclose (f) != 0 && r == 0)
    r = io_error (ENOMEM, "out of memory");
  e->dir_size = size;
  return r;
}

bool
qcow2_bitmaps_store (strata_node *node, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  uint32_t nold = s->bm_dir ? s->bm_dir->count : 0;
  CLEANUP_FREE bool *keep = calloc (nold + 1, sizeof *keep);
  CLEANUP_FREE uint8_t *dir = NULL, *padded = NULL;
  struct qcow2_bitmap_dir *now = NULL;
  struct qcow2_bitmap_ext e = { 0 };
  uint64_t cs = s->cluster_size;
  int64_t off;
  int r;
  LOCK_GUARD (&node->lock);

  if (!s->bm_writable)
    return true;
  if (!keep) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  if ((r = write_bitmaps_locked (node, &e, &dir, keep)) < 0)
    goto fail;
  if (e.count) {
    if (!(padded = calloc (1, ROUND_UP (e.dir_size, cs)))) {
      r = io_error (ENOMEM, "out of memory");
      goto fail;
    }
    memcpy (padded, dir, e.dir_size);
    if ((off = alloc_run_locked (node, ROUND_UP (e.dir_size, cs) / cs)) < 0) {
      r = (int)off;
      goto fail;
    }
    e.dir_offset = (uint64_t)off;
    if ((r = node_pwrite (node->file, e.dir_offset, padded,
                          ROUND_UP (e.dir_size, cs), 0))
        < 0)
      goto fail;
  }
  /* New clusters and their refcounts durable, then the header. */
  if ((r = qcow2_writeback_refcounts_locked (node)) < 0
      || (r = node_flush (node->file)) < 0
      || (r = write_header_locked (node, &e)) < 0
      || (r = update_exts (s, &e)) < 0)
    goto fail;
  s->bm_writable = false;
  /* From here a failure leaks the old clusters only. */
  if ((r = free_old_locked (node, s->bm_dir, keep)) < 0
      || (r = qcow2_writeback_refcounts_locked (node)) < 0
      || (r = node_flush (node->file)) < 0)
    goto fail;
  qcow2_bitmap_dir_free (s->bm_dir);
  s->bm_dir = NULL;
  if (!qcow2_bitmap_dir_read (node, &now, errp))
    return false;
  s->bm_dir = now;
  return true;

fail:
  error_set (errp, -r, "%s: cannot store the persistent bitmaps: %s",
             node->filename, strerror (-r));
  return false;
}

bool
qcow2_bitmap_can_store (strata_node *node, const char *name,
                        uint64_t granularity, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE struct dirty_bitmap **l = NULL;
  size_t n = 0, persistent = 0;

  (void)name;
  (void)granularity; /* the registry checks it against QEMU's limits */
  if (s->version < 3) {
    error_set (errp, ENOTSUP, "Cannot store dirty bitmaps in qcow2 v2 files");
    return false;
  }
  if (s->bm_load_err) {
    error_set (errp, strata_error_errno (s->bm_load_err), "%s",
               strata_error_message (s->bm_load_err));
    return false;
  }
  if (!(l = node_bitmaps (node, &n))) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  for (size_t i = 0; i < n; i++)
    persistent += !!(dirty_flags (l[i]) & DIRTY_PERSISTENT);
  if (persistent >= 65535) {
    error_set (errp, ENOSPC,
               "Maximum number of persistent bitmaps is already reached");
    return false;
  }
  return true;
}
