/* strata: qcow2 reference counts and cluster allocation (qcow2.txt "Host
 * cluster management").
 *
 *   refcount table (contiguous clusters at refcount_table_offset):
 *     entry i = offset of the refcount block for host clusters
 *               [i * rc_per_block, (i + 1) * rc_per_block), 0 = none
 *   refcount block: rc_per_block entries of refcount_bits each, big-endian
 *     (sub-byte widths are packed from the least significant bit)
 *
 * A host cluster is free when its refcount is 0, which includes clusters
 * that no refcount block covers.  Invariants kept:
 *   - a refcount is written (and flushed by the caller) before anything
 *     points at the cluster, and dropped only after the pointer is gone;
 *   - a new refcount block describes itself: it is placed in the range it
 *     covers, written and flushed before the table entry points at it;
 *   - a grown refcount table is written with the blocks for its own
 *     clusters, flushed, then published by one write of the header's
 *     offset and size fields; the old table is freed afterwards.
 * So a crash at any point leaks clusters at worst.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"
#include "util/checked.h"
#include "util/cleanup.h"

uint64_t
qcow2_rc_load (const struct qcow2_state *s, const uint8_t *blk, uint64_t j)
{
  unsigned b = s->refcount_bits;
  uint64_t v = 0;

  if (b < 8)
    return (blk[j * b / 8] >> (j * b % 8)) & ((1u << b) - 1);
  for (unsigned k = 0; k < b / 8; k++)
    v = v << 8 | blk[j * (b / 8) + k];
  return v;
}

void
qcow2_rc_store (const struct qcow2_state *s, uint8_t *blk, uint64_t j,
                uint64_t v, uint64_t *first, unsigned *n)
{
  unsigned b = s->refcount_bits;

  if (b < 8) {
    unsigned shift = j * b % 8, mask = ((1u << b) - 1) << shift;
    *first = j * b / 8;
    *n = 1;
    blk[*first] = (blk[*first] & ~mask) | ((v << shift) & mask);
    return;
  }
  *first = j * (b / 8);
  *n = b / 8;
  for (int k = b / 8 - 1; k >= 0; k--, v >>= 8)
    blk[*first + k] = v & 0xff;
}

/* Validated refcount block offset for table index BI, 0 when none. */
static int
block_offset (strata_node *node, uint64_t bi, uint64_t *off)
{
  struct qcow2_state *s = node->opaque;

  *off = 0;
  if (bi >= s->rt_entries)
    return 0;
  *off = s->rt[bi] & ~0x1ffull;
  if (*off % s->cluster_size || *off >= QCOW2_MAX_OFFSET
      || (*off && qcow2_past_end_locked (node, *off)))
    return io_error (EIO, "%s: refcount table entry %" PRIu64 " 0x%" PRIx64
                     " is not a valid refcount block offset", node->filename,
                     bi, s->rt[bi]);
  return 0;
}

int
qcow2_refcount_get_locked (strata_node *node, uint64_t idx, uint64_t *rc)
{
  struct qcow2_state *s = node->opaque;
  uint64_t off;
  uint8_t *blk;
  int r = block_offset (node, qcow2_rt_index (s, idx), &off);

  *rc = 0;
  if (r < 0 || !off)
    return r;
  if ((r = qcow2_cache_get_locked (node, &s->rc_cache, off, &blk)) < 0)
    return io_error (-r, "%s: cannot read the refcount block at 0x%" PRIx64,
                     node->filename, off);
  *rc = qcow2_rc_load (s, blk, qcow2_rb_index (s, idx));
  return 0;
}

int
qcow2_refcount_count_locked (strata_node *node, uint64_t end, uint64_t limit,
                             uint64_t *count)
{
  struct qcow2_state *s = node->opaque;
  uint64_t n = 0, i = 0;

  /* Stop as soon as LIMIT is reached or out of reach; an empty refcount
   * table entry skips its whole block unread. */
  while (i < end && n < limit && n + (end - i) >= limit) {
    uint64_t bi = qcow2_rt_index (s, i), off, stop;
    uint8_t *blk;
    int r = block_offset (node, bi, &off);

    if (r < 0)
      return r;
    stop = MIN (end, (bi + 1) * s->rc_per_block);
    if (off) {
      if ((r = qcow2_cache_get_locked (node, &s->rc_cache, off, &blk)) < 0)
        return io_error (-r,
                         "%s: cannot read the refcount block at 0x%" PRIx64,
                         node->filename, off);
      for (uint64_t j = qcow2_rb_index (s, i); i < stop && n < limit; i++, j++)
        n += qcow2_rc_load (s, blk, j) != 0;
    }
    i = stop;
  }
  *count = n;
  return 0;
}

bool
qcow2_past_end_locked (strata_node *node, uint64_t off)
{
  struct qcow2_state *s = node->opaque;
  int64_t len;

  if (off < s->file_end)
    return false;
  len = node_length (node->file);
  if (len > 0 && ROUND_UP ((uint64_t) len, s->cluster_size) > s->file_end)
    s->file_end = ROUND_UP ((uint64_t) len, s->cluster_size);
  return off >= s->file_end;
}

static void
note_end (struct qcow2_state *s, uint64_t cluster_index)
{
  uint64_t end = (cluster_index + 1) << s->cluster_bits;
  if (end > s->file_end)
    s->file_end = end;
}

/* Grow the refcount table so that it has an entry BI.  AVOID is a cluster
 * index the caller is about to use. */
static int
grow_table_locked (strata_node *node, uint64_t bi, uint64_t avoid)
{
  struct qcow2_state *s = node->opaque;
  uint64_t cs = s->cluster_size, rpb = s->rc_per_block, per_cl = cs / 8;
  uint64_t t0, T, K = 1, r0, last, need;
  CLEANUP_FREE uint8_t *tab = NULL, *blocks = NULL;
  uint64_t *newrt;
  uint8_t hdr[12];
  uint64_t old_off = s->rt_offset, old_clusters = s->rt_clusters;
  int r;

  t0 = MAX (s->file_end >> s->cluster_bits, s->rt_entries * rpb);
  t0 = MAX (t0, avoid + 1);
  r0 = t0 / rpb;
  T = (bi + 1 + per_cl - 1) / per_cl;
  for (int iter = 0;; iter++) {
    uint64_t T2, K2;
    last = (t0 + T + K - 1) / rpb;
    K2 = last - r0 + 1;
    need = MAX (bi, last) + 1;
    T2 = (need + need / 4 + per_cl - 1) / per_cl;
    if ((T2 <= T && K2 == K) || iter > 64)
      break;
    T = MAX (T, T2);
    K = K2;
  }
  if (T * cs > QCOW2_MAX_REFTABLE_BYTES || (T * cs) >> s->cluster_bits != T
      || T > UINT32_MAX)
    return io_error (EFBIG, "%s: refcount table would grow past %u bytes",
                     node->filename, QCOW2_MAX_REFTABLE_BYTES);
  tab = calloc (T, cs);
  blocks = calloc (K, cs);
  newrt = calloc (T * per_cl, sizeof *newrt);
  if (!tab || !blocks || !newrt) {
    free (newrt);
    return -ENOMEM;
  }
  memcpy (newrt, s->rt, s->rt_entries * sizeof *newrt);
  for (uint64_t k = 0; k < K; k++)
    newrt[r0 + k] = (t0 + T + k) * cs;
  for (uint64_t c = t0; c < t0 + T + K; c++) {
    uint64_t first;
    unsigned n;
    qcow2_rc_store (s, blocks + (c / rpb - r0) * cs, c % rpb, 1, &first, &n);
  }
  for (uint64_t i = 0; i < T * per_cl; i++)
    be64_store (tab + i * 8, newrt[i]);
  for (uint64_t k = 0; k < K; k++)
    if ((r = qcow2_overlap_add_locked (node, QCOW2_META_REFBLOCK,
                                       (t0 + T + k) * cs)) < 0)
      goto fail;
  if ((r = qcow2_overlap_check_locked (node, t0 * cs, T * cs, 0,
                                       "refcount table", UINT64_MAX)) < 0
      || (r = node_pwrite (node->file, (t0 + T) * cs, blocks, K * cs, 0)) < 0
      || (r = node_pwrite (node->file, t0 * cs, tab, T * cs, 0)) < 0
      || (r = node_flush (node->file)) < 0)
    goto fail;
  be64_store (hdr, t0 * cs);
  be32_store (hdr + 8, (uint32_t) T);
  if ((r = qcow2_write_header_field (node, 48, hdr, sizeof hdr)) < 0
      || (r = node_flush (node->file)) < 0)
    goto fail;
  free (s->rt);
  s->rt = newrt;
  s->rt_entries = T * per_cl;
  s->rt_offset = t0 * cs;
  s->rt_clusters = T;
  note_end (s, t0 + T + K - 1);
  for (uint64_t k = 0; k < K; k++)
    qcow2_cache_put_locked (node, &s->rc_cache, (t0 + T + k) * cs,
                            blocks + k * cs);
  /* The old table is unreferenced now; a failure here only leaks it. */
  return qcow2_free_clusters_locked (node, old_off, old_clusters * cs);

fail:
  free (newrt);
  return r;
}

/* Make sure a refcount block covers host cluster index IDX. */
static int
ensure_block_locked (strata_node *node, uint64_t idx, uint64_t *boff)
{
  struct qcow2_state *s = node->opaque;
  uint64_t rpb = s->rc_per_block, bi = idx / rpb, cs = s->cluster_size;
  uint64_t start = bi * rpb, end = start + rpb, b, first;
  CLEANUP_FREE uint8_t *blk = NULL;
  unsigned n;
  uint8_t be[8];
  int r;

  if (bi >= s->rt_entries && (r = grow_table_locked (node, bi, idx)) < 0)
    return r;
  if ((r = block_offset (node, bi, boff)) < 0 || *boff)
    return r;
  if (bi == 0)
    return io_error (EIO, "%s: refcount table entry 0 is empty",
                     node->filename);
  /* Place the block inside its own range, past the end of the file when
   * possible; every cluster of an uncovered range is free. */
  b = MAX (start, s->file_end >> s->cluster_bits);
  if (b == idx)
    b++;
  if (b >= end)
    b = start == idx ? start + 1 : start;
  if (!(blk = calloc (1, cs)))
    return -ENOMEM;
  qcow2_rc_store (s, blk, b % rpb, 1, &first, &n);
  if ((r = qcow2_overlap_check_locked (node, b * cs, cs, 0, "refcount block",
                                       UINT64_MAX)) < 0
      || (r = qcow2_overlap_add_locked (node, QCOW2_META_REFBLOCK, b * cs))
             < 0
      || (r = node_pwrite (node->file, b * cs, blk, cs, 0)) < 0
      || (r = node_flush (node->file)) < 0)
    return r;
  be64_store (be, b * cs);
  if ((r = node_pwrite (node->file, s->rt_offset + bi * 8, be, 8, 0)) < 0)
    return r;
  s->rt[bi] = b * cs;
  note_end (s, b);
  *boff = b * cs;
  return qcow2_cache_put_locked (node, &s->rc_cache, b * cs, blk);
}

/* Add DELTA to a refcount; DEFER (increments only) leaves the change
 * dirty in the cache for qcow2_writeback_locked to write. */
static int
refcount_update (strata_node *node, uint64_t host_offset, int delta,
                 bool defer)
{
  struct qcow2_state *s = node->opaque;
  uint64_t idx = host_offset >> s->cluster_bits, boff, v, first;
  uint8_t *blk;
  unsigned n;
  int r;

  /* Only an increment may need a new refcount block. */
  r = delta > 0 ? ensure_block_locked (node, idx, &boff)
                : block_offset (node, qcow2_rt_index (s, idx), &boff);
  if (r < 0)
    return r;
  if (!boff)
    return io_error (EIO, "%s: refcount of host cluster 0x%" PRIx64 " (0) "
                     "would drop below zero", node->filename, host_offset);
  if ((r = qcow2_overlap_check_locked (node, boff, s->cluster_size,
                                       QCOW2_META_REFBLOCK, "refcount block",
                                       UINT64_MAX)) < 0
      || (r = qcow2_cache_get_locked (node, &s->rc_cache, boff, &blk)) < 0)
    return r;
  v = qcow2_rc_load (s, blk, qcow2_rb_index (s, idx));
  if ((delta < 0 && v == 0) || (delta > 0 && v == qcow2_rc_max (s)))
    return io_error (EIO, "%s: refcount of host cluster 0x%" PRIx64 " (%"
                     PRIu64 ") would %s", node->filename, host_offset, v,
                     delta < 0 ? "drop below zero" : "overflow");
  v += delta;
  qcow2_rc_store (s, blk, qcow2_rb_index (s, idx), v, &first, &n);
  if ((defer || s->defer_increments) && delta > 0)
    qcow2_cache_mark_dirty_locked (&s->rc_cache, boff);
  else if ((r = node_pwrite (node->file, boff + first, blk + first, n, 0))
           < 0) {
    qcow2_cache_forget_locked (&s->rc_cache, boff);
    return r;
  }
  if (v == 0 && idx < s->free_hint)
    s->free_hint = idx;
  /* A freed cluster may be reused for anything: stop packing compressed
   * data into it. */
  if (v == 0 && s->compressed_next
      && s->compressed_next >> s->cluster_bits == idx)
    s->compressed_next = 0;
  return 0;
}

int
qcow2_refcount_update_locked (strata_node *node, uint64_t host_offset,
                              int delta)
{
  return refcount_update (node, host_offset, delta, false);
}

static int64_t
alloc_cluster (strata_node *node, bool defer)
{
  struct qcow2_state *s = node->opaque;
  uint64_t idx = MAX (s->free_hint, 1), rc;
  int r;

  for (;; idx++) {
    if (idx >= (QCOW2_MAX_OFFSET >> s->cluster_bits))
      return io_error (ENOSPC, "%s: no free cluster below the format's "
                       "maximum offset", node->filename);
    if ((r = qcow2_refcount_get_locked (node, idx, &rc)) < 0)
      return r;
    if (rc == 0)
      break;
  }
  /* A refcount of 0 on metadata: handing it out would overwrite it. */
  if ((r = qcow2_overlap_check_locked (node, idx << s->cluster_bits,
                                       s->cluster_size, 0, "new cluster",
                                       UINT64_MAX)) < 0)
    return r;
  if ((r = refcount_update (node, idx << s->cluster_bits, 1, defer)) < 0)
    return r;
  s->free_hint = idx + 1;
  note_end (s, idx);
  return (int64_t) (idx << s->cluster_bits);
}

int64_t
qcow2_alloc_cluster_locked (strata_node *node)
{
  return alloc_cluster (node, false);
}

int64_t
qcow2_alloc_data_cluster_locked (strata_node *node)
{
  return alloc_cluster (node, true);
}

int
qcow2_alloc_data_cluster_at_locked (strata_node *node, uint64_t host)
{
  struct qcow2_state *s = node->opaque;
  uint64_t idx = host >> s->cluster_bits, rc;
  int r;

  if (idx >= (QCOW2_MAX_OFFSET >> s->cluster_bits))
    return 0;
  if ((r = qcow2_refcount_get_locked (node, idx, &rc)) < 0)
    return r;
  if (rc)
    return 0;
  if ((r = qcow2_overlap_check_locked (node, host, s->cluster_size, 0,
                                       "new cluster", UINT64_MAX)) < 0
      || (r = refcount_update (node, host, 1, true)) < 0)
    return r;
  if (idx == s->free_hint)
    s->free_hint = idx + 1;
  note_end (s, idx);
  return 1;
}

int
qcow2_refcount_inc_deferred_locked (strata_node *node, uint64_t host)
{
  return refcount_update (node, host, 1, true);
}

int
qcow2_free_entry_locked (strata_node *node, uint64_t entry)
{
  return qcow2_ref_entry_locked (node, entry, -1);
}

int
qcow2_ref_entry_locked (strata_node *node, uint64_t entry, int delta)
{
  struct qcow2_state *s = node->opaque;
  int r;

  if (entry & QCOW2_OFLAG_COMPRESSED) {
    uint64_t coff = qcow2_compressed_offset (s, entry);
    uint64_t nsec = qcow2_compressed_sectors (s, entry);
    uint64_t last = (coff & ~511ull) + nsec * 512;
    for (uint64_t c = ROUND_DOWN (coff, s->cluster_size); c <= last;
         c += s->cluster_size)
      if ((r = qcow2_refcount_update_locked (node, c, delta)) < 0)
        return r;
    return 0;
  }
  if (entry & QCOW2_OFFSET_MASK)
    return qcow2_refcount_update_locked (node, entry & QCOW2_OFFSET_MASK,
                                         delta);
  return 0;
}

int
qcow2_free_clusters_locked (strata_node *node, uint64_t off, uint64_t bytes)
{
  struct qcow2_state *s = node->opaque;
  int r;

  for (uint64_t c = off; bytes && c < off + bytes; c += s->cluster_size)
    if ((r = qcow2_refcount_update_locked (node, c, -1)) < 0)
      return r;
  return 0;
}
