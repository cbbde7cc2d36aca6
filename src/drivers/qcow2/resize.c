/* strata: resizing a qcow2 image (qcow2.txt "Header": size, l1_size,
 * l1_table_offset).
 *
 * Growing keeps the image valid at every crash point:
 *   1. when the L1 table is too small, write a larger copy to new clusters
 *      (refcounts first), flush, then point the header at it with one
 *      12-byte write of l1_size and l1_table_offset, flush, and free the
 *      old table;
 *   2. zero the new guest range where something could show through: a
 *      longer backing file (as QEMU does) or stale bytes past the old end
 *      in the last cluster;
 *   3. write the new size into the header and flush.
 * A crash before step 3 leaves the old size and, at worst, leaked clusters.
 *
 * Shrinking (qemu-img resize --shrink) drops every cluster that starts at
 * or past the new end, pointers first:
 *   1. clear the L2 entries of the last, partly kept L2 table (copying it
 *      first when a snapshot shares it) and the L1 entries of the L2 tables
 *      wholly past the end; flush;
 *   2. drop the references they held (data clusters, then the L2 tables);
 *   3. write the new size and flush;
 *   4. truncate the file after its last used cluster, as QEMU does.
 * The L1 table keeps its size.  Snapshots keep their own tables, so they
 * are untouched (and QEMU, like strata, allows this).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"
#include "util/checked.h"
#include "util/cleanup.h"

/* Allocate N contiguous clusters past the end of the file. */
int64_t
qcow2_alloc_contiguous_locked (strata_node *node, uint64_t n)
{
  struct qcow2_state *s = node->opaque;

  for (int attempt = 0; attempt < 4; attempt++) {
    uint64_t first = 0, saved_hint = s->free_hint;
    bool contiguous = true;
    uint64_t i;
    int r = 0;

    s->free_hint = s->file_end >> s->cluster_bits;
    for (i = 0; i < n; i++) {
      int64_t c = qcow2_alloc_cluster_locked (node);
      if (c < 0) {
        r = (int) c;
        break;
      }
      if (i == 0)
        first = c;
      else if ((uint64_t) c != first + (i << s->cluster_bits))
        contiguous = false;
      if (!contiguous) {
        qcow2_refcount_update_locked (node, c, -1);
        break;
      }
    }
    if (r == 0 && contiguous) {
      s->free_hint = MIN (saved_hint, s->free_hint);
      return (int64_t) first;
    }
    /* A refcount block landed in the middle: give back and retry past it. */
    qcow2_free_clusters_locked (node, first, i << s->cluster_bits);
    s->free_hint = MIN (saved_hint, s->free_hint);
    if (r < 0)
      return r;
  }
  return io_error (ENOSPC, "%s: cannot allocate %" PRIu64 " contiguous "
                   "clusters", node->filename, n);
}

static bool
grow_l1_locked (strata_node *node, uint64_t entries, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  uint64_t bytes = entries * 8, n = ROUND_UP (bytes, s->cluster_size)
                                    >> s->cluster_bits;
  uint64_t old_off = s->l1_offset, old_n;
  CLEANUP_FREE uint8_t *raw = calloc (n, s->cluster_size);
  uint64_t *l1 = calloc (entries, sizeof *l1);
  uint8_t hdr[12];
  int64_t off;
  int r;

  if (!raw || !l1) {
    free (l1);
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  memcpy (l1, s->l1, s->l1_size * sizeof *l1);
  for (uint64_t i = 0; i < s->l1_size; i++)
    be64_store (raw + i * 8, l1[i]);
  if ((off = qcow2_alloc_contiguous_locked (node, n)) < 0) {
    r = (int) off;
    goto fail;
  }
  be32_store (hdr, (uint32_t) entries);
  be64_store (hdr + 4, (uint64_t) off);
  if ((r = node_pwrite (node->file, off, raw, n * s->cluster_size, 0)) < 0
      || (r = node_flush (node->file)) < 0
      || (r = qcow2_write_header_field (node, 36, hdr, sizeof hdr)) < 0
      || (r = node_flush (node->file)) < 0)
    goto fail;
  old_n = ROUND_UP ((uint64_t) s->l1_size * 8, s->cluster_size)
          >> s->cluster_bits;
  free (s->l1);
  s->l1 = l1;
  s->l1_size = entries;
  s->l1_offset = off;
  /* The old table is unreferenced now; failing here only leaks it. */
  for (uint64_t i = 0; old_off && i < old_n; i++)
    qcow2_refcount_update_locked (node, old_off + (i << s->cluster_bits),
                                  -1);
  return true;

fail:
  free (l1);
  error_set (errp, -r, "%s: cannot grow the L1 table to %" PRIu64
             " entries: %s", node->filename, entries, strerror (-r));
  return false;
}

/* Zero guest bytes [from, to) with the driver's own write path. */
static int
zero_range (strata_node *node, uint64_t from, uint64_t to)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE uint8_t *zeros = NULL;
  int r = from < to ? qcow2_pwrite_zeroes (node, from, to - from, 0) : 0;

  if (r != -ENOTSUP)
    return r;
  if (!(zeros = calloc (1, s->cluster_size)))
    return -ENOMEM;
  /* Version 2 has no zero flag: write zeros. */
  for (uint64_t pos = from, n; pos < to; pos += n) {
    struct iovec iov;
    n = MIN (to - pos, s->cluster_size - (pos % s->cluster_size));
    iov = (struct iovec){ .iov_base = zeros, .iov_len = n };
    if ((r = qcow2_pwritev (node, pos, n, &iov, 1, 0)) < 0)
      return r;
  }
  return 0;
}

/* Step 1 for the L2 table holding guest cluster KEEP (cluster aligned,
 * not L2-table aligned): clear the entries from KEEP to the table's end
 * (or END), keeping the old ones in DROPPED (up to l2_entries). */
static int
clear_tail_entries_locked (strata_node *node, uint64_t keep, uint64_t end,
                           uint64_t *dropped, uint64_t *ndropped)
{
  struct qcow2_state *s = node->opaque;
  uint64_t span = s->l2_entries << s->cluster_bits;
  uint64_t stop = MIN (ROUND_UP (keep + 1, span), end), e, bm, l2off;
  int r;

  for (uint64_t pos = keep; pos < stop; pos += s->cluster_size) {
    if ((r = qcow2_get_l2_entry_locked (node, pos, &e, &bm, &l2off)) < 0)
      return r;
    if (!l2off)
      return 0;
    if (!e && !bm)
      continue;
    if ((r = qcow2_set_l2_entry_locked (node, pos, 0, 0)) < 0)
      return r;
    dropped[(*ndropped)++] = e;
  }
  return 0;
}

/* Step 1 for the L2 tables wholly past KEEP: clear their L1 entries (one
 * write of the table); their offsets go to TABLES. */
static int
clear_l1_tail_locked (strata_node *node, uint64_t first, uint64_t *tables,
                      uint64_t *ntables)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE uint8_t *raw = NULL;
  uint64_t n = s->l1_size;

  for (uint64_t i = first; i < n; i++) {
    uint64_t off = s->l1[i] & QCOW2_OFFSET_MASK;
    if (!s->l1[i])
      continue;
    if ((s->l1[i] & QCOW2_L1_RESERVED) || off % s->cluster_size
        || (off && qcow2_past_end_locked (node, off)))
      return io_error (EIO,
                       "%s: L1 entry %" PRIu64 " 0x%" PRIx64 " is "
                       "invalid",
                       node->filename, i, s->l1[i]);
    if (off)
      tables[(*ntables)++] = off;
  }
  if (!*ntables)
    return 0;
  if (!(raw = malloc (n * 8)))
    return -ENOMEM;
  for (uint64_t i = 0; i < n; i++)
    be64_store (raw + i * 8, i >= first ? 0 : s->l1[i]);
  for (uint64_t i = first; i < n; i++)
    s->l1[i] = 0;
  return node_pwrite (node->file, s->l1_offset, raw, n * 8, 0);
}

/* Step 2 for one dropped L2 table: its entries' references, then its own. */
static int
drop_table_locked (strata_node *node, uint64_t l2)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE uint8_t *t = malloc (s->cluster_size);
  int r;

  if (!t)
    return -ENOMEM;
  if ((r = qcow2_l2_read_table_locked (node, l2, t)) < 0)
    return r;
  for (uint64_t j = 0; j < s->l2_entries; j++) {
    uint64_t e = be64_load (t + j * s->l2_entry_size);
    if ((r = qcow2_check_l2_entry (node, UINT64_MAX, e, 0)) < 0
        || (r = qcow2_free_entry_locked (node, e)) < 0)
      return r;
  }
  qcow2_l2_forget_table_locked (node, l2);
  return qcow2_refcount_update_locked (node, l2, -1);
}

/* Step 4: cut the file after the last cluster with a reference (also
 * after make_empty). */
int
qcow2_truncate_file_locked (strata_node *node)
{
  struct qcow2_state *s = node->opaque;
  int64_t flen = node_length (node->file);
  uint64_t last, rc = 0;
  int r;

  if (flen < 0)
    return (int) flen;
  last = ROUND_UP ((uint64_t) flen, s->cluster_size) >> s->cluster_bits;
  while (last > 1) {
    if ((r = qcow2_refcount_get_locked (node, last - 1, &rc)) < 0)
      return r;
    if (rc)
      break;
    last--;
  }
  if ((last << s->cluster_bits) >= (uint64_t) flen)
    return 0;
  if (!node_truncate (node->file, last << s->cluster_bits, 0, NULL))
    return 0; /* only space is lost */
  s->file_end = last << s->cluster_bits;
  s->free_hint = MIN (s->free_hint, last);
  return 0;
}

static int
shrink_locked (strata_node *node, uint64_t size)
{
  struct qcow2_state *s = node->opaque;
  uint64_t span = s->l2_entries << s->cluster_bits;
  uint64_t keep = ROUND_UP (size, s->cluster_size),
           first = ROUND_UP (keep, span) / span;
  CLEANUP_FREE uint64_t *dropped = malloc (s->l2_entries * sizeof *dropped);
  CLEANUP_FREE uint64_t *tables = malloc ((s->l1_size + 1) * sizeof *tables);
  uint64_t ndropped = 0, ntables = 0;
  uint8_t be[8];
  int r;

  if (!dropped || !tables)
    return -ENOMEM;
  if ((r = qcow2_writeback_locked (node)) < 0
      || (r = node_flush (node->file)) < 0)
    return r;
  if (keep % span && keep < s->size
      && (r = clear_tail_entries_locked (node, keep, s->size, dropped,
                                         &ndropped))
             < 0)
    return r;
  if ((r = clear_l1_tail_locked (node, first, tables, &ntables)) < 0
      || (r = node_flush (node->file)) < 0)
    return r;
  for (uint64_t i = 0; i < ndropped; i++)
    if ((r = qcow2_free_entry_locked (node, dropped[i])) < 0)
      return r;
  for (uint64_t i = 0; i < ntables; i++)
    if ((r = drop_table_locked (node, tables[i])) < 0)
      return r;
  be64_store (be, size);
  if ((r = node_flush (node->file)) < 0
      || (r = qcow2_write_header_field (node, 24, be, sizeof be)) < 0
      || (r = node_flush (node->file)) < 0)
    return r;
  s->size = size;
  return qcow2_truncate_file_locked (node);
}

static bool
shrink_exclusive (strata_node *node, const void *size, strata_error **errp)
{
  uint64_t sz = *(const uint64_t *) size;
  const char *m;
  int r = shrink_locked (node, sz);

  if (r < 0) {
    m = strata_last_error_message ();
    error_set (errp, -r, "%s: cannot shrink the image to %" PRIu64
               " bytes: %s", node->filename, sz, m && *m ? m : strerror (-r));
    return false;
  }
  return true;
}

bool
qcow2_truncate (strata_node *node, uint64_t size, unsigned flags,
                strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  uint64_t span = s->l2_entries << s->cluster_bits, need, old = s->size;
  uint64_t zero_to;
  uint8_t be[8];
  int64_t blen = 0;
  int r;

  (void) flags;
  if ((r = qcow2_writes_refused (node)) < 0) {
    error_set (errp, -r, "%s: cannot resize: writes are refused since a "
               "write would have overwritten the image's metadata",
               node->filename);
    return false;
  }
  if (size % 512) {
    /* qemu-img's words (the size is the user's, not the file's). */
    error_set (errp, EINVAL, "The new size must be a multiple of 512");
    return false;
  }
  if (size < old)   /* tables are freed: the overlap sets are rebuilt */
    return qcow2_run_exclusive (node, shrink_exclusive, &size, errp);
  if (size == old)
    return true;
  need = size / span + !!(size % span);
  if (need * 8 > QCOW2_MAX_L1_BYTES) {
    error_set (errp, EFBIG, "%s: size %" PRIu64 " needs an L1 table larger "
               "than %u bytes", node->filename, size, QCOW2_MAX_L1_BYTES);
    return false;
  }
  pthread_mutex_lock (&node->lock);
  if (need > s->l1_size && !grow_l1_locked (node, need, errp)) {
    pthread_mutex_unlock (&node->lock);
    return false;
  }
  pthread_mutex_unlock (&node->lock);

  if (node->backing && (blen = node_length (node->backing)) < 0)
    blen = 0;
  zero_to = MIN (size, MAX ((uint64_t) blen, ROUND_UP (old,
                                                       s->cluster_size)));
  be64_store (be, size);
  if ((r = zero_range (node, old, zero_to)) < 0
      || (r = node_flush (node)) < 0
      || (r = qcow2_write_header_field (node, 24, be, sizeof be)) < 0
      || (r = node_flush (node->file)) < 0) {
    error_set (errp, -r, "%s: cannot grow the image to %" PRIu64 " bytes: %s",
               node->filename, size, strerror (-r));
    return false;
  }
  pthread_mutex_lock (&node->lock);
  s->size = size;
  pthread_mutex_unlock (&node->lock);
  return true;
}
