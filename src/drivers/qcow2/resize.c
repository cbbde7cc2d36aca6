/* strata: growing a qcow2 image (qcow2.txt "Header": size, l1_size,
 * l1_table_offset).
 *
 * Only growth is supported.  The steps keep the image valid at every crash
 * point:
 *   1. when the L1 table is too small, write a larger copy to new clusters
 *      (refcounts first), flush, then point the header at it with one
 *      12-byte write of l1_size and l1_table_offset, flush, and free the
 *      old table;
 *   2. zero the new guest range where something could show through: a
 *      longer backing file (as QEMU does) or stale bytes past the old end
 *      in the last cluster;
 *   3. write the new size into the header and flush.
 * A crash before step 3 leaves the old size and, at worst, leaked clusters.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"
#include "util/checked.h"
#include "util/cleanup.h"

/* Allocate N contiguous clusters past the end of the file. */
static int64_t
alloc_contiguous_locked (strata_node *node, uint64_t n)
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
    for (uint64_t j = 0; j < i; j++)
      qcow2_refcount_update_locked (node, first + (j << s->cluster_bits), -1);
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
  if ((off = alloc_contiguous_locked (node, n)) < 0) {
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
    error_set (errp, EINVAL, "%s: size %" PRIu64 " is not a multiple of 512",
               node->filename, size);
    return false;
  }
  if (size < old) {
    error_set (errp, ENOTSUP, "%s: shrinking a qcow2 image (from %" PRIu64
               " to %" PRIu64 " bytes) is not supported", node->filename,
               old, size);
    return false;
  }
  if (s->nb_snapshots) {
    error_set (errp, ENOTSUP, "%s: cannot resize an image with internal "
               "snapshots", node->filename);
    return false;
  }
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
