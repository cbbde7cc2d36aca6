/* strata: qcow2 guest-to-host cluster map (qcow2.txt "Cluster mapping",
 * "Extended L2 Entries").
 *
 *   L1 entry:  bit 63 COPIED | bits 9-55 L2 table offset
 *   L2 entry:  bit 63 COPIED | bit 62 COMPRESSED | descriptor
 *     standard descriptor:   bits 9-55 host cluster offset, bit 0 ZERO (v3)
 *     compressed descriptor: x = 62 - (cluster_bits - 8);
 *                            bits 0..x-1 host byte offset,
 *                            bits x..61 additional 512-byte sectors
 *   extended L2 (16 bytes):  the entry, then a bitmap: bits 0-31 subcluster
 *                            allocated, bits 32-63 subcluster reads as zero
 *
 * The L2 cache holds slices of L2 tables (cache.c), keyed by the slice's
 * host offset: a lookup reads at most one slice, and a walk (an extent)
 * takes the next slice of the same table when it crosses into it.  Code
 * that handles a table whole goes through qcow2_l2_read_table_locked and
 * qcow2_l2_put_table_locked, so a dirty slice is never lost or bypassed.
 *
 * Invariants kept: the L1 table is in memory and written through; an L2
 * table is on disk (zeroed) and its refcount is on disk before the L1 entry
 * that points at it (a flush separates them); every entry is validated
 * before it is used, so a hostile image yields EIO with the entry named,
 * never a read of the header or past a sane offset.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"
#include "util/checked.h"
#include "util/cleanup.h"

/* Validated L2 table offset for guest OFFSET, 0 when none. */
static int
l2_table_offset (strata_node *node, uint64_t offset, uint64_t *l2_offset)
{
  struct qcow2_state *s = node->opaque;
  uint64_t i = qcow2_l1_index (s, offset), e, off;

  if (i >= s->l1_size)
    return io_error (EIO, "%s: guest offset %" PRIu64 " is beyond the L1 "
                     "table", node->filename, offset);
  e = s->l1[i];
  off = e & QCOW2_OFFSET_MASK;
  if (e & QCOW2_L1_RESERVED)
    return io_error (EIO, "%s: L1 entry %" PRIu64 " 0x%" PRIx64 " has "
                     "reserved bits set", node->filename, i, e);
  if (off % s->cluster_size)
    return io_error (EIO, "%s: L1 entry %" PRIu64 " L2 table offset 0x%"
                     PRIx64 " is not aligned to the cluster size",
                     node->filename, i, off);
  if (off && qcow2_past_end_locked (node, off))
    return io_error (EIO, "%s: L1 entry %" PRIu64 " L2 table offset 0x%"
                     PRIx64 " is past the end of the file", node->filename,
                     i, off);
  *l2_offset = off;
  return 0;
}

int
qcow2_check_l2_entry (strata_node *node, uint64_t offset, uint64_t entry,
                      uint64_t bitmap)
{
  struct qcow2_state *s = node->opaque;
  const char *fn = node->filename;
  uint64_t host = entry & QCOW2_OFFSET_MASK;

  if (entry & QCOW2_OFLAG_COMPRESSED) {
    uint64_t coff = qcow2_compressed_offset (s, entry);
    if (s->ext_l2 && bitmap)
      return io_error (EIO, "%s: L2 entry for guest offset %" PRIu64
                       " is compressed but has subcluster bitmap 0x%" PRIx64,
                       fn, offset, bitmap);
    if (coff >= QCOW2_MAX_OFFSET || coff < s->cluster_size
        || qcow2_past_end_locked (node, coff))
      return io_error (EIO, "%s: L2 entry for guest offset %" PRIu64
                       " compressed data offset 0x%" PRIx64 " is outside "
                       "the file's data area", fn, offset, coff);
    return 0;
  }
  if ((entry & QCOW2_L2_RESERVED)
      || ((s->version < 3 || s->ext_l2) && (entry & QCOW2_OFLAG_ZERO)))
    return io_error (EIO, "%s: L2 entry for guest offset %" PRIu64 " 0x%"
                     PRIx64 " has reserved bits set", fn, offset, entry);
  if (host % s->cluster_size)
    return io_error (EIO, "%s: L2 entry for guest offset %" PRIu64 " host "
                     "offset 0x%" PRIx64 " is not aligned to the cluster "
                     "size", fn, offset, host);
  if (!host && (entry & QCOW2_OFLAG_COPIED))
    return io_error (EIO, "%s: L2 entry for guest offset %" PRIu64 " 0x%"
                     PRIx64 " points into the image header (host offset 0)",
                     fn, offset, entry);
  if (host && qcow2_past_end_locked (node, host))
    return io_error (EIO, "%s: L2 entry for guest offset %" PRIu64 " host "
                     "offset 0x%" PRIx64 " is past the end of the file", fn,
                     offset, host);
  if (s->ext_l2) {
    uint32_t alloc = bitmap & 0xffffffffu, zero = bitmap >> 32;
    if (alloc & zero)
      return io_error (EIO, "%s: L2 bitmap for guest offset %" PRIu64 " 0x%"
                       PRIx64 " marks subclusters both allocated and zero",
                       fn, offset, bitmap);
    if (alloc && !host)
      return io_error (EIO, "%s: L2 bitmap for guest offset %" PRIu64 " 0x%"
                       PRIx64 " allocates subclusters of no host cluster",
                       fn, offset, bitmap);
  }
  return 0;
}

/* Byte position of guest OFFSET's L2 entry in its slice. */
static inline uint64_t
slice_pos (const struct qcow2_state *s, uint64_t offset)
{
  return ((offset >> s->cluster_bits) & (s->l2_slice_entries - 1))
         * s->l2_entry_size;
}

/* The cached slice of the L2 table at L2_OFFSET that holds guest
 * OFFSET's entry.  The pointer is valid until the next cache call. */
static inline int
l2_slice_get_locked (strata_node *node, uint64_t l2_offset, uint64_t offset,
                     uint8_t **slice)
{
  struct qcow2_state *s = node->opaque;
  uint64_t soff = qcow2_l2_slice_offset (s, l2_offset, offset);
  int r;

  if ((*slice = qcow2_cache_last_locked (&s->l2_cache, soff)))
    return 0;
  if ((r = qcow2_cache_get_locked (node, &s->l2_cache, soff, slice)) < 0)
    return io_error (-r, "%s: cannot read the L2 table at 0x%" PRIx64,
                     node->filename, l2_offset);
  return 0;
}

int
qcow2_l2_read_table_locked (strata_node *node, uint64_t l2_offset,
                            uint8_t *buf)
{
  struct qcow2_state *s = node->opaque;
  const uint8_t *c;
  int r;

  if (s->l2_slice_size == s->cluster_size
      && (c = qcow2_cache_peek_locked (&s->l2_cache, l2_offset))) {
    memcpy (buf, c, s->cluster_size);
    return 0;
  }
  if ((r = node_pread (node->file, l2_offset, buf, s->cluster_size, 0)) < 0)
    return io_error (-r, "%s: cannot read the L2 table at 0x%" PRIx64,
                     node->filename, l2_offset);
  for (uint64_t k = 0; k < s->cluster_size; k += s->l2_slice_size)
    if ((c = qcow2_cache_peek_locked (&s->l2_cache, l2_offset + k)))
      memcpy (buf + k, c, s->l2_slice_size);
  return 0;
}

void
qcow2_l2_put_table_locked (strata_node *node, uint64_t l2_offset,
                           const uint8_t *table)
{
  struct qcow2_state *s = node->opaque;
  uint8_t *c;

  for (uint64_t k = 0; k < s->cluster_size; k += s->l2_slice_size)
    if ((c = qcow2_cache_peek_locked (&s->l2_cache, l2_offset + k)))
      memcpy (c, table + k, s->l2_slice_size);
}

void
qcow2_l2_forget_table_locked (strata_node *node, uint64_t l2_offset)
{
  struct qcow2_state *s = node->opaque;

  for (uint64_t k = 0; k < s->cluster_size; k += s->l2_slice_size)
    qcow2_cache_forget_locked (&s->l2_cache, l2_offset + k);
}

int
qcow2_get_l2_entry_locked (strata_node *node, uint64_t offset, uint64_t *entry,
                           uint64_t *bitmap, uint64_t *l2_offset)
{
  struct qcow2_state *s = node->opaque;
  uint8_t *t;
  uint64_t pos;
  int r = l2_table_offset (node, offset, l2_offset);

  *entry = *bitmap = 0;
  if (r < 0 || !*l2_offset)
    return r;
  if ((r = l2_slice_get_locked (node, *l2_offset, offset, &t)) < 0)
    return r;
  pos = slice_pos (s, offset);
  *entry = be64_load (t + pos);
  if (s->ext_l2)
    *bitmap = be64_load (t + pos + 8);
  return qcow2_check_l2_entry (node, offset, *entry, *bitmap);
}

/* Type and host offset of the unit (subcluster, or cluster) at OFFSET.
 * Zero and unallocated units of a cluster that has a host cluster (a zero
 * cluster that kept its allocation, an extended L2 entry's zero or
 * unallocated subclusters) have its host offset too, as QEMU's
 * ZERO_ALLOC and UNALLOCATED_ALLOC, which qemu-img map shows. */
static void
classify (const struct qcow2_state *s, uint64_t offset, uint64_t entry,
          uint64_t bitmap, enum qcow2_ctype *type, uint64_t *host)
{
  uint64_t in_cluster = offset & (s->cluster_size - 1);
  uint64_t cluster = entry & QCOW2_OFFSET_MASK;

  *host = cluster ? cluster + in_cluster : 0;
  if (entry & QCOW2_OFLAG_COMPRESSED) {
    *type = QCOW2_COMPRESSED;
    *host = 0;
    return;
  }
  if (s->ext_l2) {
    unsigned sc = in_cluster / s->subcluster_size;
    if (bitmap & (1ull << sc))
      *type = QCOW2_NORMAL;
    else
      *type = bitmap & (1ull << (32 + sc)) ? QCOW2_ZERO : QCOW2_UNALLOCATED;
    return;
  }
  if (entry & QCOW2_OFLAG_ZERO)
    *type = QCOW2_ZERO;
  else
    *type = cluster ? QCOW2_NORMAL : QCOW2_UNALLOCATED;
}

int
qcow2_get_extent_locked (strata_node *node, uint64_t offset, uint64_t len,
                         struct qcow2_extent *ext)
{
  struct qcow2_state *s = node->opaque;
  uint64_t table_end, pos = offset, l2_offset;
  uint64_t span = s->l2_entries << s->cluster_bits;
  uint64_t slice_span = s->l2_slice_entries << s->cluster_bits, end, stop;
  uint8_t *t;
  int r;

  table_end = ROUND_DOWN (offset, span) + span;
  len = MIN (len, table_end - offset);
  end = offset + len;
  memset (ext, 0, sizeof *ext);
  if ((r = l2_table_offset (node, offset, &l2_offset)) < 0)
    return r;
  if (!l2_offset) {
    /* No L2 table: all of its span is unallocated. */
    ext->type = QCOW2_UNALLOCATED;
    ext->bytes = len;
    return 0;
  }
  /* One lookup per slice the walk crosses: the extent never leaves this
   * table, and nothing below touches the cache while T is in use. */
  for (; pos < end; pos = stop) {
    if ((r = l2_slice_get_locked (node, l2_offset, pos, &t)) < 0)
      return r;
    stop = MIN (end, ROUND_DOWN (pos, slice_span) + slice_span);
    while (pos < stop) {
      const uint8_t *p = t + slice_pos (s, pos);
      uint64_t entry = be64_load (p);
      uint64_t bitmap = s->ext_l2 ? be64_load (p + 8) : 0;
      uint64_t host, unit_end;
      enum qcow2_ctype type;

      if ((entry || bitmap)
          && (r = qcow2_check_l2_entry (node, pos, entry, bitmap)) < 0)
        return r;
      classify (s, pos, entry, bitmap, &type, &host);
      unit_end = ROUND_DOWN (pos, s->subcluster_size) + s->subcluster_size;
      if (type == QCOW2_COMPRESSED)
        unit_end = ROUND_DOWN (pos, s->cluster_size) + s->cluster_size;
      if (pos == offset) {
        ext->type = type;
        ext->host = host;
        if (type == QCOW2_COMPRESSED) {
          uint64_t nsec = qcow2_compressed_sectors (s, entry);
          ext->coffset = qcow2_compressed_offset (s, entry);
          ext->csize = (nsec + 1) * 512 - (ext->coffset & 511);
        }
      }
      else if (type != ext->type || type == QCOW2_COMPRESSED
               || (host != 0) != (ext->host != 0)
               || (host && host != ext->host + (pos - offset)))
        goto out;
      pos = MIN (unit_end, end);
      if (type == QCOW2_COMPRESSED)
        goto out;
    }
  }
out:
  ext->bytes = pos - offset;
  return 0;
}

/* Write TABLE as a new L2 table for the L1 entry of guest OFFSET and point
 * that entry at it: the table is on disk (flushed) before the L1 entry.
 * Returns the table's host offset or a negative errno. */
static int64_t
install_l2_table_locked (strata_node *node, uint64_t offset,
                         const uint8_t *table)
{
  struct qcow2_state *s = node->opaque;
  uint64_t i = qcow2_l1_index (s, offset), soff;
  uint8_t be[8];
  int64_t new_off;
  int r;

  if ((new_off = qcow2_alloc_cluster_locked (node)) < 0)
    return new_off;
  if ((r = qcow2_overlap_add_locked (node, QCOW2_META_L2, new_off)) < 0
      || (r = node_pwrite (node->file, new_off, table, s->cluster_size, 0))
             < 0
      || (r = node_flush (node->file)) < 0)
    return r;
  be64_store (be, (uint64_t) new_off | QCOW2_OFLAG_COPIED);
  if ((r = qcow2_overlap_check_locked (node, s->l1_offset + i * 8, 8,
                                       QCOW2_META_L1, "L1 table", offset))
          < 0
      || (r = node_pwrite (node->file, s->l1_offset + i * 8, be, 8, 0)) < 0)
    return r;
  s->l1[i] = (uint64_t)new_off | QCOW2_OFLAG_COPIED;
  /* Slices left from an earlier table at NEW_OFF take the new bytes; the
   * slice the caller is about to change is cached without a read. */
  qcow2_l2_put_table_locked (node, new_off, table);
  soff = qcow2_l2_slice_offset (s, new_off, offset);
  if ((r = qcow2_cache_put_locked (node, &s->l2_cache, soff,
                                   table + (soff - new_off)))
      < 0)
    return r;
  return new_off;
}

/* Copy the L2 table at OLD_OFF, which an internal snapshot shares, so the
 * active image gets its own.  A cluster's refcount counts the L1 tables
 * (active and snapshots) that reach it, so the clusters the table maps keep
 * their refcounts (already > 1) and only lose COPIED in the copy.  The copy
 * is written and flushed before the L1 entry points at it, and the old
 * table loses the active image's reference last. */
static int64_t
cow_l2_table_locked (strata_node *node, uint64_t offset, uint64_t old_off)
{
  struct qcow2_state *s = node->opaque;
  uint64_t i = qcow2_l1_index (s, offset);
  uint64_t span = s->l2_entries << s->cluster_bits;
  CLEANUP_FREE uint8_t *t = malloc (s->cluster_size);
  int64_t new_off;
  int r;

  if (!t)
    return -ENOMEM;
  /* The copy is written whole: the entries it carries must not reach the
   * disk before what they map. */
  if ((r = qcow2_writeback_locked (node)) < 0
      || (r = qcow2_l2_read_table_locked (node, old_off, t)) < 0)
    return r;
  for (uint64_t j = 0; j < s->l2_entries; j++) {
    uint8_t *p = t + j * s->l2_entry_size;
    uint64_t e = be64_load (p);
    uint64_t bm = s->ext_l2 ? be64_load (p + 8) : 0;
    if ((r = qcow2_check_l2_entry (node, i * span + (j << s->cluster_bits), e,
                                   bm)) < 0)
      return r;
    be64_store (p, e & ~QCOW2_OFLAG_COPIED);
  }
  if ((new_off = install_l2_table_locked (node, offset, t)) < 0)
    return new_off;
  if ((r = node_flush (node->file)) < 0
      || (r = qcow2_refcount_update_locked (node, old_off, -1)) < 0)
    return r;
  return new_off;
}

/* Give guest OFFSET an L2 table; returns its offset or a negative errno. */
static int64_t
ensure_l2_table_locked (strata_node *node, uint64_t offset)
{
  struct qcow2_state *s = node->opaque;
  uint64_t i = qcow2_l1_index (s, offset), l2_offset;
  CLEANUP_FREE uint8_t *zeros = NULL;
  int r = l2_table_offset (node, offset, &l2_offset);

  if (r < 0)
    return r;
  if (l2_offset)
    return s->l1[i] & QCOW2_OFLAG_COPIED
               ? (int64_t) l2_offset
               : cow_l2_table_locked (node, offset, l2_offset);
  if (!(zeros = calloc (1, s->cluster_size)))
    return -ENOMEM;
  return install_l2_table_locked (node, offset, zeros);
}

int64_t
qcow2_ensure_l2_table_locked (strata_node *node, uint64_t offset)
{
  return ensure_l2_table_locked (node, offset);
}

static int
set_l2_entry (strata_node *node, uint64_t offset, uint64_t entry,
              uint64_t bitmap, bool defer)
{
  struct qcow2_state *s = node->opaque;
  int64_t l2_offset = ensure_l2_table_locked (node, offset);
  uint64_t pos, soff;
  uint8_t *t, buf[16];
  int r;

  if (l2_offset < 0)
    return l2_offset;
  if ((r = l2_slice_get_locked (node, l2_offset, offset, &t)) < 0)
    return r;
  soff = qcow2_l2_slice_offset (s, l2_offset, offset);
  pos = slice_pos (s, offset);
  be64_store (buf, entry);
  be64_store (buf + 8, bitmap);
  if ((r = qcow2_overlap_check_locked (node, l2_offset, s->cluster_size,
                                       QCOW2_META_L2, "L2 table", offset))
      < 0)
    return r;
  if (defer) {
    memcpy (t + pos, buf, s->l2_entry_size);
    qcow2_cache_mark_dirty_locked (&s->l2_cache, soff);
    return 0;
  }
  if ((r = node_pwrite (node->file, soff + pos, buf, s->l2_entry_size, 0))
      < 0) {
    qcow2_cache_forget_locked (&s->l2_cache, soff);
    return r;
  }
  memcpy (t + pos, buf, s->l2_entry_size);
  return 0;
}

int
qcow2_set_l2_entry_locked (strata_node *node, uint64_t offset,
                           uint64_t entry, uint64_t bitmap)
{
  return set_l2_entry (node, offset, entry, bitmap, false);
}

int
qcow2_set_l2_entry_deferred_locked (strata_node *node, uint64_t offset,
                                    uint64_t entry, uint64_t bitmap)
{
  return set_l2_entry (node, offset, entry, bitmap, true);
}
