/* strata: qcow2 consistency check and repair (qemu-img check), from
 * qcow2.txt "Host cluster management", "Cluster mapping" and "Snapshots".
 *
 * The check counts, in memory, the references to every host cluster of the
 * file, from everything that may point at one:
 *
 *   header cluster ................................. cluster 0
 *   active L1 table -> L2 tables -> data clusters     (normal, zero with an
 *                                                      offset, compressed:
 *                                                      every host cluster
 *                                                      its bytes touch)
 *   snapshot table, each snapshot's L1 -> L2s -> data
 *   refcount table -> refcount blocks
 *
 * and compares the counts with the refcounts on disk:
 *   on disk > counted   leak ("Leaked cluster N refcount=X reference=Y")
 *   on disk < counted   corruption ("ERROR cluster N ...")
 * It also reports malformed entries (reserved bits, unaligned offsets,
 * regions past the end of the file) and OFLAG_COPIED bits that disagree
 * with "refcount == 1".  Messages, counts and the order of the walk follow
 * qemu-img 7.2 so that both tools report the same for the same image.
 *
 * Memory: one 16-bit counter per host cluster of the file (a count that
 * reaches 0xffff or the image's refcount maximum is reported as an
 * overflow); files with more than CHECK_MAX_CLUSTERS clusters are refused.
 * One L1 table (bounded by QCOW2_MAX_L1_BYTES) and one L2 table are in
 * memory at a time.
 *
 * Repairs (crash safety): a refcount is only ever set to the counted
 * number of references, never below it, and each change is one small
 * in-place write of the refcount entry; raised refcounts and lowered ones
 * are flushed before any OFLAG_COPIED bit is changed, because setting
 * COPIED promises refcount == 1.  A crash at any point leaves leaks at
 * worst.  A refcount of 0 for a referenced cluster is raised in place when
 * its refcount block exists; missing or damaged refcount blocks would need
 * the refcount structure rebuilt, which strata does not do (the check then
 * fails, as qemu-img does under -r leaks).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"
#include "util/checked.h"
#include "util/cleanup.h"

#define CHECK_MAX_CLUSTERS (1ull << 29)       /* 1 GiB of counters */
#define CHECK_MAX_SNAPSHOT_TABLE (64ull << 20) /* bytes */
#define REFT_RESERVED 0x1ffull
#define REFT_OFFSET_MASK (~REFT_RESERVED)

struct check {
  strata_node *node;
  struct qcow2_state *s;
  struct strata_check_result *res;
  strata_message_fn message; /* where report() sends lines, or NULL */
  void *opaque;
  uint16_t *ref;        /* counted references per host cluster */
  uint64_t nb;          /* clusters covered by REF */
  uint64_t alloc;       /* entries allocated in REF (nb + 1) */
  uint64_t ref_max;     /* highest count REF may hold */
  int64_t file_len;
  bool rebuild;         /* a referenced cluster has refcount 0 */
  bool rebuild_blocks;  /* the refcount blocks themselves are damaged */
  uint8_t *l2;          /* one L2 table */
};

static void __attribute__ ((format (printf, 2, 3)))
report (struct check *c, const char *fmt, ...)
{
  va_list ap;
  char *line;

  if (!c->message)
    return;
  va_start (ap, fmt);
  if (vasprintf (&line, fmt, ap) >= 0) {
    c->message (c->opaque, line);
    free (line);
  }
  va_end (ap);
}

/* ---- on-disk refcounts ---- */

/* The refcount block holding host cluster IDX as QEMU finds it: the
 * table entry with its reserved bits masked, 0 when there is none. */
static int
rc_block (struct check *c, uint64_t idx, uint64_t *boff)
{
  struct qcow2_state *s = c->s;
  uint64_t bi = idx / s->rc_per_block;

  *boff = bi < s->rt_entries ? s->rt[bi] & REFT_OFFSET_MASK : 0;
  if (*boff % s->cluster_size || *boff >= QCOW2_MAX_OFFSET)
    return -EIO;
  return 0;
}

static int
rc_get (struct check *c, uint64_t idx, uint64_t *rc)
{
  struct qcow2_state *s = c->s;
  uint64_t boff;
  uint8_t *blk;
  int r;

  *rc = 0;
  if ((r = rc_block (c, idx, &boff)) < 0 || !boff)
    return r;
  if ((r = qcow2_cache_get_locked (c->node, &s->rc_cache, boff, &blk)) < 0)
    return r;
  *rc = qcow2_rc_load (s, blk, idx % s->rc_per_block);
  return 0;
}

/* Set the refcount of host cluster IDX to V in place (not flushed). */
static int
rc_set (struct check *c, uint64_t idx, uint64_t v)
{
  struct qcow2_state *s = c->s;
  uint64_t boff, first;
  uint8_t *blk;
  unsigned n;
  int r;

  if ((r = rc_block (c, idx, &boff)) < 0)
    return r;
  if (!boff || boff >> s->cluster_bits >= c->nb)
    return -EIO;
  if ((r = qcow2_cache_get_locked (c->node, &s->rc_cache, boff, &blk)) < 0)
    return r;
  qcow2_rc_store (s, blk, idx % s->rc_per_block, v, &first, &n);
  r = node_pwrite (c->node->file, boff + first, blk + first, n, 0);
  if (r < 0) {
    qcow2_cache_forget_locked (&s->rc_cache, boff);
    return r;
  }
  if (v == 0 && idx < s->free_hint)
    s->free_hint = idx;
  return 0;
}

/* ---- counting references ---- */

/* Count one reference to every host cluster of [offset, offset + size).
 * A region may end inside the cluster past the end of the file (the last
 * cluster may be partly written); one reaching further is a corruption. */
static int
inc_refs (struct check *c, uint64_t offset, uint64_t size)
{
  struct qcow2_state *s = c->s;
  uint64_t end, k, last;

  if (size == 0)
    return 0;
  if (!checked_add_u64 (offset, size, &end)
      || end >= (uint64_t) c->file_len + s->cluster_size) {
    report (c, "ERROR: counting reference for region exceeding the end of "
            "the file by one cluster or more: offset 0x%" PRIx64 " size 0x%"
            PRIx64, offset, size);
    c->res->corruptions++;
    return 0;
  }
  last = (end - 1) >> s->cluster_bits;
  for (k = offset >> s->cluster_bits; k <= last; k++) {
    if (k >= c->alloc)  /* cannot happen: end < file_len + cluster */
      return -EIO;
    if (k >= c->nb)
      c->nb = k + 1;
    if (c->ref[k] >= c->ref_max) {
      report (c, "ERROR: overflow cluster offset=0x%" PRIx64,
              k << s->cluster_bits);
      report (c, "Use qemu-img amend to increase the refcount entry width "
              "or qemu-img convert to create a clean copy if the image "
              "cannot be opened for writing");
      c->res->corruptions++;
      continue;
    }
    c->ref[k]++;
  }
  return 0;
}

static uint64_t
l2_entry_at (const struct qcow2_state *s, const uint8_t *t, uint64_t i,
             uint64_t *bitmap)
{
  *bitmap = s->ext_l2 ? be64_load (t + i * 16 + 8) : 0;
  return be64_load (t + i * s->l2_entry_size);
}

/* QEMU's cluster types, decided as qcow2_get_cluster_type() does. */
enum check_ctype { CT_UNALLOCATED, CT_ZERO_PLAIN, CT_ZERO_ALLOC, CT_NORMAL,
                   CT_COMPRESSED };

static enum check_ctype
entry_type (const struct qcow2_state *s, uint64_t e)
{
  if (e & QCOW2_OFLAG_COMPRESSED)
    return CT_COMPRESSED;
  if ((e & QCOW2_OFLAG_ZERO) && !s->ext_l2)
    return e & QCOW2_OFFSET_MASK ? CT_ZERO_ALLOC : CT_ZERO_PLAIN;
  return e & QCOW2_OFFSET_MASK ? CT_NORMAL : CT_UNALLOCATED;
}

static int
count_compressed (struct check *c, uint64_t i, uint64_t e, uint64_t bitmap,
                  bool frag)
{
  struct qcow2_state *s = c->s;
  uint64_t coff = qcow2_compressed_offset (s, e);
  uint64_t nsec = qcow2_compressed_sectors (s, e) + 1;

  if (e & QCOW2_OFLAG_COPIED) {
    report (c, "ERROR: coffset=0x%" PRIx64 ": copied flag must never be set "
            "for compressed clusters", coff);
    c->res->corruptions++;
  }
  if (bitmap) {
    report (c, "ERROR compressed cluster %" PRIu64 " with non-zero "
            "subcluster allocation bitmap, entry=0x%" PRIx64, i,
            (uint64_t) (e & ~QCOW2_OFLAG_COPIED));
    c->res->corruptions++;
    return 0;
  }
  if (frag) {
    c->res->allocated_clusters++;
    c->res->compressed_clusters++;
    c->res->fragmented_clusters++;  /* compressed data is never in place */
  }
  return inc_refs (c, coff, nsec * 512 - (coff & 511));
}

static int
count_normal (struct check *c, uint64_t e, uint64_t bitmap, bool frag,
              uint64_t *next_contig)
{
  struct qcow2_state *s = c->s;
  uint64_t off = e & QCOW2_OFFSET_MASK;

  if ((bitmap >> 32) & bitmap) {
    c->res->corruptions++;
    report (c, "ERROR offset=%" PRIx64 ": Allocated cluster has corrupted "
            "subcluster allocation bitmap", off);
  }
  if (off % s->cluster_size) {
    bool data = s->ext_l2 ? (bitmap & QCOW2_BITMAP_ALLOC_ALL)
                          : !(e & QCOW2_OFLAG_ZERO);
    c->res->corruptions++;
    if (data)
      report (c, "ERROR offset=%" PRIx64 ": Data cluster is not properly "
              "aligned; L2 entry corrupted.", off);
    else
      report (c, "ERROR offset=%" PRIx64 ": Preallocated cluster is not "
              "properly aligned; L2 entry corrupted.", off);
  }
  if (frag) {
    c->res->allocated_clusters++;
    if (*next_contig && off != *next_contig)
      c->res->fragmented_clusters++;
    *next_contig = off + s->cluster_size;
  }
  return inc_refs (c, off, s->cluster_size);
}

static int
count_l2 (struct check *c, uint64_t l2_off, bool frag)
{
  struct qcow2_state *s = c->s;
  uint64_t next_contig = 0;
  int r;

  /* A table wholly past the end of the file reads as zeros: no entries. */
  if (l2_off >= (uint64_t) c->file_len)
    return 0;
  if ((r = node_pread (c->node->file, l2_off, c->l2, s->cluster_size, 0))
      < 0) {
    report (c, "ERROR: I/O error in check_refcounts_l2");
    c->res->check_errors++;
    return r;
  }
  for (uint64_t i = 0; i < s->l2_entries; i++) {
    uint64_t bitmap, e = l2_entry_at (s, c->l2, i, &bitmap);
    enum check_ctype t = entry_type (s, e);

    if (t != CT_COMPRESSED && (e & QCOW2_L2_RESERVED)) {
      report (c, "ERROR found l2 entry with reserved bits set: %" PRIx64, e);
      c->res->corruptions++;
    }
    switch (t) {
    case CT_COMPRESSED:
      r = count_compressed (c, i, e, bitmap, frag);
      break;
    case CT_ZERO_ALLOC:
    case CT_NORMAL:
      r = count_normal (c, e, bitmap, frag, &next_contig);
      break;
    case CT_ZERO_PLAIN:
      break;
    case CT_UNALLOCATED:
      if (bitmap & QCOW2_BITMAP_ALLOC_ALL) {
        c->res->corruptions++;
        report (c, "ERROR: Unallocated cluster has non-zero subcluster "
                "allocation map");
      }
      break;
    }
    if (r < 0)
      return r;
  }
  return 0;
}

static int
count_l1 (struct check *c, uint64_t l1_off, uint32_t l1_size, bool frag)
{
  struct qcow2_state *s = c->s;
  CLEANUP_FREE uint8_t *l1 = NULL;
  uint64_t bytes = (uint64_t) l1_size * 8;
  int r;

  if (!l1_size)
    return 0;
  if ((r = inc_refs (c, l1_off, bytes)) < 0)
    return r;
  if (!(l1 = malloc (bytes))) {
    c->res->check_errors++;
    return -ENOMEM;
  }
  if ((r = node_pread (c->node->file, l1_off, l1, bytes, 0)) < 0) {
    report (c, "ERROR: I/O error in check_refcounts_l1");
    c->res->check_errors++;
    return r;
  }
  for (uint64_t i = 0; i < l1_size; i++) {
    uint64_t e = be64_load (l1 + i * 8), l2_off = e & QCOW2_OFFSET_MASK;

    if (!e)
      continue;
    if (e & QCOW2_L1_RESERVED) {
      report (c, "ERROR found L1 entry with reserved bits set: %" PRIx64, e);
      c->res->corruptions++;
    }
    if ((r = inc_refs (c, l2_off, s->cluster_size)) < 0)
      return r;
    if (l2_off % s->cluster_size) {
      report (c, "ERROR l2_offset=%" PRIx64 ": Table is not cluster "
              "aligned; L1 entry corrupted", l2_off);
      c->res->corruptions++;
    }
    if ((r = count_l2 (c, l2_off, frag)) < 0)
      return r;
  }
  return 0;
}

/* Walk the snapshot table: each snapshot's L1 tree, then the table. */
static int
count_snapshots (struct check *c)
{
  struct qcow2_state *s = c->s;
  uint8_t h[12], e[40];
  uint64_t table, off;
  CLEANUP_FREE char *id = NULL, *name = NULL;
  int r;

  if (!s->nb_snapshots)
    return 0;
  if (!(id = malloc (65536)) || !(name = malloc (65536))) {
    c->res->check_errors++;
    return -ENOMEM;
  }
  if ((r = node_pread (c->node->file, 60, h, sizeof h, 0)) < 0) {
    c->res->check_errors++;
    return r;
  }
  table = off = be64_load (h + 4);
  for (uint32_t i = 0; i < s->nb_snapshots; i++) {
    uint64_t l1_off, len;
    uint32_t l1_size, extra;
    uint16_t id_len, name_len;

    off = ROUND_UP (off, 8);
    if ((r = node_pread (c->node->file, off, e, sizeof e, 0)) < 0) {
      c->res->check_errors++;
      return r;
    }
    l1_off = be64_load (e);
    l1_size = be32_load (e + 8);
    id_len = be16_load (e + 12);
    name_len = be16_load (e + 14);
    extra = be32_load (e + 36);
    len = 40ull + extra;
    if (off - table + len + id_len + name_len > CHECK_MAX_SNAPSHOT_TABLE) {
      report (c, "ERROR snapshot table too large");
      c->res->check_errors++;
      return -EFBIG;
    }
    if ((r = node_pread (c->node->file, off + len, id, id_len, 0)) < 0
        || (r = node_pread (c->node->file, off + len + id_len, name,
                            name_len, 0)) < 0) {
      c->res->check_errors++;
      return r;
    }
    id[id_len] = name[name_len] = '\0';
    off += len + id_len + name_len;
    if (l1_off % s->cluster_size) {
      report (c, "ERROR snapshot %s (%s) l1_offset=%#" PRIx64 ": L1 table "
              "is not cluster aligned; snapshot table entry corrupted", id,
              name, l1_off);
      c->res->corruptions++;
      continue;
    }
    if ((uint64_t) l1_size * 8 > QCOW2_MAX_L1_BYTES) {
      report (c, "ERROR snapshot %s (%s) l1_size=%#" PRIx32 ": L1 table is "
              "too large; snapshot table entry corrupted", id, name,
              l1_size);
      c->res->corruptions++;
      continue;
    }
    if ((r = count_l1 (c, l1_off, l1_size, false)) < 0)
      return r;
  }
  return inc_refs (c, table, off - table);
}

static int
count_refblocks (struct check *c)
{
  struct qcow2_state *s = c->s;
  int r;

  for (uint64_t i = 0; i < s->rt_entries; i++) {
    uint64_t off = s->rt[i] & REFT_OFFSET_MASK, k = off >> s->cluster_bits;

    if (s->rt[i] & REFT_RESERVED) {
      report (c, "ERROR refcount table entry %" PRIu64 " has reserved bits "
              "set", i);
      c->res->corruptions++;
      c->rebuild_blocks = true;
      continue;
    }
    if (off % s->cluster_size) {
      report (c, "ERROR refcount block %" PRIu64 " is not cluster aligned; "
              "refcount table entry corrupted", i);
      c->res->corruptions++;
      c->rebuild_blocks = true;
      continue;
    }
    if (k >= c->nb) {
      report (c, "ERROR refcount block %" PRIu64 " is outside image", i);
      c->res->corruptions++;
      c->rebuild_blocks = true;
      continue;
    }
    if (off) {
      if ((r = inc_refs (c, off, s->cluster_size)) < 0)
        return r;
      if (c->ref[k] != 1) {
        report (c, "ERROR refcount block %" PRIu64 " refcount=%u", i,
                c->ref[k]);
        c->res->corruptions++;
        c->rebuild_blocks = true;
      }
    }
  }
  return 0;
}

/* The persistent bitmaps' clusters (qcow2.txt "Bitmaps extension",
 * "Bitmap directory", "Bitmap table"): counted only while autoclear bit 0
 * says they are consistent, as QEMU reads them (once it is clear they are
 * leaks).  A table entry with reserved bits set or an unaligned offset is
 * a corruption, as in QEMU's check, and is not counted. */
static int
count_bitmaps (struct check *c)
{
  struct qcow2_state *s = c->s;
  const struct qcow2_ext *x = NULL;
  CLEANUP_FREE uint8_t *dir = NULL;
  uint64_t dir_len, dir_off, pos = 0;
  uint32_t count;
  int r;

  for (unsigned i = 0; (s->autoclear & 1) && i < s->nexts; i++)
    if (s->exts[i].type == 0x23852875 && s->exts[i].len >= 24)
      x = &s->exts[i];
  if (!x)
    return 0;
  count = be32_load (x->data);
  dir_len = be64_load (x->data + 8);
  dir_off = be64_load (x->data + 16);
  if (dir_len > (64u << 20) || !(dir = malloc (dir_len ? dir_len : 1))) {
    c->res->check_errors++;
    return 0;
  }
  if ((r = inc_refs (c, dir_off, dir_len)) < 0)
    return r;
  if ((r = node_pread (c->node->file, dir_off, dir, dir_len, 0)) < 0) {
    c->res->check_errors++;
    return r;
  }
  for (uint32_t i = 0; i < count && pos + 24 <= dir_len; i++) {
    uint64_t t_off = be64_load (dir + pos), t_size = be32_load (dir + pos + 8);
    CLEANUP_FREE uint8_t *t = NULL;

    pos += ROUND_UP (24ull + be32_load (dir + pos + 20)
                         + be16_load (dir + pos + 18), 8);
    if (t_size > QCOW2_MAX_L1_BYTES / 8 || !(t = malloc (t_size * 8 + 1))) {
      c->res->corruptions++;
      continue;
    }
    if ((r = inc_refs (c, t_off, t_size * 8)) < 0)
      return r;
    if ((r = node_pread (c->node->file, t_off, t, t_size * 8, 0)) < 0) {
      c->res->check_errors++;
      return r;
    }
    for (uint64_t j = 0; j < t_size; j++) {
      uint64_t e = be64_load (t + j * 8), d = e & 0x00fffffffffffe00ull;
      if ((e & 0xff000000000001feull) || (d && (e & 1))
          || (d % s->cluster_size)) {
        c->res->corruptions++;
        continue;
      }
      if (d && (r = inc_refs (c, d, s->cluster_size)) < 0)
        return r;
    }
  }
  return 0;
}

static int
count_all (struct check *c)
{
  struct qcow2_state *s = c->s;
  int r;

  if ((r = inc_refs (c, 0, s->cluster_size)) < 0
      || (r = count_l1 (c, s->l1_offset, s->l1_size, true)) < 0
      || (r = count_snapshots (c)) < 0 || (r = count_bitmaps (c)) < 0
      || (r = inc_refs (c, s->rt_offset, s->rt_entries * 8)) < 0)
    return r;
  return count_refblocks (c);
}

/* ---- comparing and repairing ---- */

/* Compare every cluster's refcount with the count; with FIX, set the
 * refcounts that FIX allows to the count.  *HIGHEST is the last cluster
 * in use by either. */
static void
compare (struct check *c, unsigned fix, uint64_t *highest)
{
  struct strata_check_result *res = c->res;

  *highest = 0;
  for (uint64_t i = 0; i < c->nb; i++) {
    uint64_t rc, ref = c->ref[i];
    int64_t *fixed = NULL;
    int r = rc_get (c, i, &rc);

    if (r < 0) {
      report (c, "Can't get refcount for cluster %" PRIu64 ": %s", i,
              strerror (-r));
      res->check_errors++;
      continue;
    }
    if (rc > 0 || ref > 0)
      *highest = i;
    if (rc == ref)
      continue;
    if (rc == 0)
      c->rebuild = true;
    if (rc > ref && (fix & STRATA_CHECK_FIX_LEAKS))
      fixed = &res->leaks_fixed;
    else if (rc < ref && (fix & STRATA_CHECK_FIX_ERRORS))
      fixed = &res->corruptions_fixed;
    report (c, "%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%"
            PRIu64, fixed ? "Repairing" : rc < ref ? "ERROR" : "Leaked", i,
            rc, ref);
    if (fixed && rc_set (c, i, ref) == 0) {
      (*fixed)++;
      continue;
    }
    if (rc < ref)
      res->corruptions++;
    else
      res->leaks++;
  }
}

/* Could the L2 table at OFF be rewritten without touching other metadata?
 * Only when it is one aligned cluster inside the file, referenced once. */
static bool
l2_writable (struct check *c, uint64_t off)
{
  uint64_t k = off >> c->s->cluster_bits;

  return off && off % c->s->cluster_size == 0 && k < c->nb
         && c->ref[k] == 1;
}

static int
fix_copied_l2 (struct check *c, uint64_t l2_off, bool repair)
{
  struct qcow2_state *s = c->s;
  struct strata_check_result *res = c->res;
  unsigned dirty = 0;
  int r;

  if ((r = node_pread (c->node->file, l2_off, c->l2, s->cluster_size, 0))
      < 0) {
    report (c, "ERROR: Could not read L2 table: %s", strerror (-r));
    res->check_errors++;
    return r;
  }
  for (uint64_t j = 0; j < s->l2_entries; j++) {
    uint64_t bitmap, e = l2_entry_at (s, c->l2, j, &bitmap), rc;
    enum check_ctype t = entry_type (s, e);

    if (t != CT_NORMAL && t != CT_ZERO_ALLOC)
      continue;
    if (rc_get (c, (e & QCOW2_OFFSET_MASK) >> s->cluster_bits, &rc) < 0)
      continue;
    if ((rc == 1) == !!(e & QCOW2_OFLAG_COPIED))
      continue;
    res->corruptions++;
    report (c, "%s OFLAG_COPIED data cluster: l2_entry=%" PRIx64
            " refcount=%" PRIu64, repair ? "Repairing" : "ERROR", e, rc);
    if (repair) {
      e = rc == 1 ? e | QCOW2_OFLAG_COPIED : e & ~QCOW2_OFLAG_COPIED;
      be64_store (c->l2 + j * s->l2_entry_size, e);
      dirty++;
    }
  }
  if (!dirty)
    return 0;
  if (!l2_writable (c, l2_off)) {
    report (c, "ERROR: Could not write L2 table; metadata overlap check "
            "failed: %s", strerror (EIO));
    res->check_errors++;
    return -EIO;
  }
  qcow2_l2_forget_table_locked (c->node, l2_off);
  if ((r = node_pwrite (c->node->file, l2_off, c->l2, s->cluster_size, 0))
      < 0) {
    report (c, "ERROR: Could not write L2 table: %s", strerror (-r));
    res->check_errors++;
    return r;
  }
  res->corruptions -= dirty;
  res->corruptions_fixed += dirty;
  return 0;
}

/* OFLAG_COPIED must be set exactly on the L1 and L2 entries whose cluster
 * has refcount 1 (the refcounts on disk, after any repair). */
static int
check_copied (struct check *c, unsigned fix)
{
  struct qcow2_state *s = c->s;
  struct strata_check_result *res = c->res;
  bool repair;
  int r;

  if (fix & STRATA_CHECK_FIX_ERRORS)
    repair = true;
  else if (fix & STRATA_CHECK_FIX_LEAKS)
    repair = !res->check_errors && !res->corruptions && !res->leaks;
  else
    repair = false;
  for (uint32_t i = 0; i < s->l1_size; i++) {
    uint64_t e = s->l1[i], l2_off = e & QCOW2_OFFSET_MASK, rc;

    if (!l2_off)
      continue;
    if (rc_get (c, l2_off >> s->cluster_bits, &rc) < 0)
      continue;
    if ((rc == 1) != !!(e & QCOW2_OFLAG_COPIED)) {
      res->corruptions++;
      report (c, "%s OFLAG_COPIED L2 cluster: l1_index=%" PRIu32
              " l1_entry=%" PRIx64 " refcount=%" PRIu64,
              repair ? "Repairing" : "ERROR", i, e, rc);
      if (repair) {
        uint8_t be[8];
        uint64_t ne = rc == 1 ? e | QCOW2_OFLAG_COPIED
                              : e & ~QCOW2_OFLAG_COPIED;
        be64_store (be, ne);
        if ((r = node_pwrite (c->node->file, s->l1_offset + i * 8ull, be,
                              8, 0)) < 0) {
          res->check_errors++;
          return r;
        }
        s->l1[i] = ne;
        res->corruptions--;
        res->corruptions_fixed++;
      }
    }
    if (l2_off >= (uint64_t) c->file_len)
      continue;  /* reads as zeros: nothing allocated */
    if ((r = fix_copied_l2 (c, l2_off, repair)) < 0)
      return r;
  }
  return 0;
}

static int
check_refcounts (struct check *c, unsigned fix, strata_error **errp)
{
  struct strata_check_result pre;
  uint64_t highest;
  int r;

  if ((r = count_all (c)) < 0) {
    error_set (errp, -r, "%s: the check could not walk the metadata",
               c->node->filename);
    return r;
  }
  pre = *c->res;
  compare (c, 0, &highest);
  if (fix) {
    /* A refcount of 0 for a referenced cluster is raised in place under
     * FIX_ERRORS; damaged refcount blocks would need a rebuild. */
    if ((c->rebuild && !(fix & STRATA_CHECK_FIX_ERRORS))
        || c->rebuild_blocks) {
      report (c, "ERROR need to rebuild refcount structures");
      c->res->check_errors++;
      error_set (errp, EIO, "%s: the refcount structure needs to be "
                 "rebuilt%s", c->node->filename, c->rebuild_blocks
                 ? " (strata cannot rebuild it; use qemu-img check -r all)"
                 : "");
      return -EIO;
    }
    if (c->res->leaks || c->res->corruptions) {
      *c->res = pre;
      compare (c, fix, &highest);
      if ((r = node_flush (c->node->file)) < 0) {
        c->res->check_errors++;
        error_set (errp, -r, "%s: cannot flush the repaired refcounts",
                   c->node->filename);
        return r;
      }
    }
  }
  if ((r = check_copied (c, fix)) < 0) {
    error_set (errp, -r, "%s: the check of OFLAG_COPIED failed",
               c->node->filename);
    return r;
  }
  if (fix && (r = node_flush (c->node->file)) < 0) {
    c->res->check_errors++;
    error_set (errp, -r, "%s: cannot flush the repairs", c->node->filename);
    return r;
  }
  c->res->image_end_offset = (highest + 1) << c->s->cluster_bits;
  return 0;
}

int
qcow2_check (strata_node *node, struct strata_check_result *res,
             unsigned fix, strata_message_fn message, void *opaque,
             strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  struct check c = { .node = node,
                     .s = s,
                     .res = res,
                     .message = message,
                     .opaque = opaque };
  uint64_t rc_max = qcow2_rc_max (s);
  int64_t len;
  int r;

  LOCK_GUARD (&node->lock);
  res->total_clusters = (s->size + s->cluster_size - 1) >> s->cluster_bits;
  if ((len = node_length (node->file)) < 0) {
    res->check_errors++;
    error_set (errp, (int) -len, "%s: cannot get the file length",
               node->filename);
    return (int) len;
  }
  c.file_len = len;
  c.nb = ((uint64_t) len + s->cluster_size - 1) >> s->cluster_bits;
  if (c.nb > CHECK_MAX_CLUSTERS) {
    res->check_errors++;
    error_set (errp, EFBIG, "%s: the file has %" PRIu64 " clusters, more "
               "than the check supports (%llu)", node->filename, c.nb,
               CHECK_MAX_CLUSTERS);
    return -EFBIG;
  }
  c.alloc = c.nb + 1;
  c.ref_max = MIN (rc_max, UINT16_MAX);
  c.ref = calloc (c.alloc, sizeof *c.ref);
  c.l2 = malloc (s->cluster_size);
  if (!c.ref || !c.l2) {
    free (c.ref);
    free (c.l2);
    res->check_errors++;
    error_set (errp, ENOMEM, "%s: out of memory for the check",
               node->filename);
    return -ENOMEM;
  }
  r = check_refcounts (&c, fix, errp);
  free (c.ref);
  free (c.l2);
  return r;
}
