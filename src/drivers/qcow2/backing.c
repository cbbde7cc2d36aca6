/* strata qcow2: chain edits, rewriting the backing file in the header and
 * emptying the active layer (qcow2.txt "Header": backing_file_offset,
 * backing_file_size; "Header extensions": backing file format name).
 *
 * The first cluster holds everything a backing change touches:
 *
 *   0              header_length        ext end               name end
 *   | header fields | ext ext ... ext END | backing file name |  zeros  |
 *
 * change_backing_file builds the new first cluster in memory from the one
 * on disk: the header fields verbatim except backing_file_offset/size,
 * every extension verbatim in its order except the backing format (which
 * is replaced where it was, or put first, or dropped), the end marker,
 * then the name.  It is written with one write starting at offset 0 and
 * flushed, after the metadata cache and the file were flushed, so the
 * header on disk names the old or the new backing file, and the data the
 * caller wrote for the new one is durable before the header points at it.
 *
 * make_empty: see its comment below.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"
#include "util/checked.h"
#include "util/cleanup.h"

#define QCOW2_MAX_BACKING_FORMAT 63 /* what header.c accepts */

/* Where the extensions end in H (the first cluster, LEN bytes): the
 * offset of the end marker, or LEN when the area runs to the end. */
bool
qcow2_extensions_end (strata_node *node, const struct qcow2_state *s,
                      const uint8_t *h, uint64_t len, uint64_t *end,
                      strata_error **errp)
{
  uint64_t off = s->header_length;

  while (off + 8 <= len) {
    uint32_t type = be32_load (h + off), elen = be32_load (h + off + 4);
    if (type == QCOW2_EXT_END)
      break;
    if (elen > len - off - 8) {
      error_set (errp, EINVAL,
                 "%s: header extension 0x%08" PRIx32 " length %" PRIu32
                 " runs past the first cluster",
                 node->filename, type, elen);
      return false;
    }
    off += 8 + ROUND_UP ((uint64_t)elen, 8);
  }
  *end = MIN (off, len);
  return true;
}

/* Append extension TYPE with LEN bytes of DATA at OUT + *POS. */
static void
put_extension (uint8_t *out, uint64_t *pos, uint32_t type, const void *data,
               uint32_t len)
{
  be32_store (out + *pos, type);
  be32_store (out + *pos + 4, len);
  memcpy (out + *pos + 8, data, len);
  *pos += 8 + ROUND_UP ((uint64_t)len, 8);
}

/* Build in OUT (cluster_size bytes, zeroed) the first cluster of OLD
 * (OLD_LEN bytes) naming FILE/FMT; *USED gets the bytes that matter. */
static bool
build_header (strata_node *node, const struct qcow2_state *s,
              const uint8_t *old, uint64_t old_len, const char *file,
              const char *fmt, uint8_t *out, uint64_t *used,
              strata_error **errp)
{
  uint64_t ext_end, pos = s->header_length, need, off;
  size_t flen = file ? strlen (file) : 0, fmtlen = fmt ? strlen (fmt) : 0;
  bool fmt_done = false;

  if (!qcow2_extensions_end (node, s, old, old_len, &ext_end, errp))
    return false;
  /* Bytes needed: header, the kept extensions, the format, end, name. */
  need = s->header_length + (fmt ? 8 + ROUND_UP (fmtlen, 8) : 0) + 8 + flen;
  for (off = s->header_length; off < ext_end;) {
    uint64_t step = 8 + ROUND_UP ((uint64_t)be32_load (old + off + 4), 8);
    if (be32_load (old + off) != QCOW2_EXT_BACKING_FORMAT)
      need += step;
    off += step;
  }
  if (need > s->cluster_size) {
    error_set (errp, ENOSPC,
               "%s: the backing file name and format do not "
               "fit in the first cluster (%" PRIu64 " bytes needed, cluster "
               "size %" PRIu64 ")",
               node->filename, need, s->cluster_size);
    return false;
  }
  memcpy (out, old, s->header_length);
  for (off = s->header_length; off < ext_end;) {
    uint32_t type = be32_load (old + off), elen = be32_load (old + off + 4);
    uint64_t step = 8 + ROUND_UP ((uint64_t)elen, 8);
    if (type != QCOW2_EXT_BACKING_FORMAT) {
      memcpy (out + pos, old + off, MIN (step, ext_end - off));
      pos += step;
    }
    else if (fmt && !fmt_done) {
      put_extension (out, &pos, type, fmt, fmtlen);
      fmt_done = true;
    }
    off += step;
  }
  if (fmt && !fmt_done) {
    /* Put it first, where QEMU writes it. */
    uint64_t tail = pos - s->header_length, start = s->header_length;
    memmove (out + start + 8 + ROUND_UP (fmtlen, 8), out + start, tail);
    memset (out + start, 0, 8 + ROUND_UP (fmtlen, 8));
    put_extension (out, &start, QCOW2_EXT_BACKING_FORMAT, fmt, fmtlen);
    pos += 8 + ROUND_UP (fmtlen, 8);
  }
  memset (out + pos, 0, 8); /* end marker */
  pos += 8;
  be64_store (out + 8, file ? pos : 0);
  be32_store (out + 16, (uint32_t)flen);
  if (file)
    memcpy (out + pos, file, flen);
  *used = pos + flen;
  return true;
}

static bool
check_names (strata_node *node, const char *file, const char *fmt,
             strata_error **errp)
{
  if (file && strlen (file) > QCOW2_MAX_BACKING_NAME) {
    error_set (errp, EINVAL,
               "%s: backing file name '%.40s...' is too long "
               "(%zu bytes, max %d)",
               node->filename, file, strlen (file), QCOW2_MAX_BACKING_NAME);
    return false;
  }
  if (fmt && strlen (fmt) > QCOW2_MAX_BACKING_FORMAT) {
    error_set (errp, EINVAL,
               "%s: backing format '%.40s...' is too long "
               "(%zu bytes, max %d)",
               node->filename, fmt, strlen (fmt), QCOW2_MAX_BACKING_FORMAT);
    return false;
  }
  return true;
}

/* The end of what the old header uses (extensions and name), so the write
 * also clears a longer old name. */
uint64_t
qcow2_header_used (strata_node *node, const struct qcow2_state *s,
                   const uint8_t *old, uint64_t old_len)
{
  uint64_t bf_off = be64_load (old + 8), bf_end;
  uint32_t bf_size = be32_load (old + 16);
  uint64_t end = s->header_length;

  qcow2_extensions_end (node, s, old, old_len, &end, NULL);
  end = MIN (end + 8, old_len);
  if (bf_off && checked_add_u64 (bf_off, bf_size, &bf_end)
      && bf_end <= old_len)
    end = MAX (end, bf_end);
  return end;
}

static bool
rewrite_header_locked (strata_node *node, const char *file, const char *fmt,
                       strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE uint8_t *old = calloc (1, s->cluster_size);
  CLEANUP_FREE uint8_t *out = calloc (1, s->cluster_size);
  int64_t flen = node_length (node->file);
  uint64_t old_len, used, wlen;
  int r;

  if (!old || !out) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  if (flen < 0) {
    error_set (errp, (int)-flen, "%s: cannot get the file size",
               node->filename);
    return false;
  }
  old_len = MIN (s->cluster_size, (uint64_t)flen);
  /* What the caller wrote for the new backing file goes first. */
  if ((r = qcow2_writeback_locked (node)) < 0
      || (r = node_flush (node->file)) < 0
      || (r = node_pread (node->file, 0, old, old_len, 0)) < 0) {
    error_set (errp, -r, "%s: cannot prepare the header rewrite: %s",
               node->filename, strerror (-r));
    return false;
  }
  if (be32_load (old) != QCOW2_MAGIC) {
    error_set (errp, EIO, "%s: the header changed on disk", node->filename);
    return false;
  }
  if (!build_header (node, s, old, old_len, file, fmt, out, &used, errp))
    return false;
  wlen = MIN (ROUND_UP (MAX (used, qcow2_header_used (node, s, old, old_len)), 512),
              s->cluster_size);
  if ((r = qcow2_write_header_field (node, 0, out, wlen)) < 0
      || (r = node_flush (node->file)) < 0) {
    error_set (errp, -r, "%s: cannot write the header: %s", node->filename,
               strerror (-r));
    return false;
  }
  return true;
}

bool
qcow2_change_backing_file (strata_node *node, const char *backing_file,
                           const char *backing_fmt, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE char *name = NULL, *fmt = NULL;
  const char *file = backing_file && *backing_file ? backing_file : NULL;
  const char *f = file && backing_fmt && *backing_fmt ? backing_fmt : NULL;
  LOCK_GUARD (&node->lock);

  if (!check_names (node, file, f, errp))
    return false;
  if ((file && !(name = strdup (file))) || (f && !(fmt = strdup (f)))) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  if (!rewrite_header_locked (node, file, f, errp))
    return false;
  free (s->backing_name);
  free (s->backing_format);
  s->backing_name = name;
  s->backing_format = fmt;
  name = fmt = NULL;
  return true;
}

/* make_empty (qemu-img commit without -d): afterwards no guest cluster is
 * allocated in this layer, so every read goes to the backing file, and
 * every cluster the layer held is free (or keeps only the references of
 * internal snapshots).  For each L1 entry, in this order:
 *
 *   L2 table only ours (refcount 1): write it back all zeros, flush;
 *   L2 table shared with a snapshot:  clear the L1 entry, flush, drop the
 *                                     table's reference;
 *   then drop one reference from every cluster the old entries mapped,
 *   and hand clusters that became free back to the file system.
 *
 * The pointer goes before the references, so a crash leaves at worst
 * leaked clusters (qemu-img check -r leaks), never an entry mapping a free
 * cluster.  Owned L2 tables stay allocated (empty): the overlap sets never
 * forget an L2 table while the node is open. */

static bool
table_empty (const struct qcow2_state *s, const uint8_t *t)
{
  for (uint64_t i = 0; i < s->cluster_size; i += 8)
    if (be64_load (t + i))
      return false;
  return true;
}

/* Drop one reference from the data cluster at HOST, leaving the refcount
 * block dirty in the cache: written once per block at the end instead of
 * once per cluster.  A crash before that write leaves the old, higher
 * refcount: a leak.  Sets *FREED when the count reached 0. */
static int
drop_ref_deferred_locked (strata_node *node, uint64_t host, bool *freed)
{
  struct qcow2_state *s = node->opaque;
  uint64_t idx = host >> s->cluster_bits, rc, boff, first;
  uint8_t *blk;
  unsigned n;
  int r;

  /* Validates the refcount table entry and loads the block. */
  if ((r = qcow2_refcount_get_locked (node, idx, &rc)) < 0)
    return r;
  if (rc == 0)
    return io_error (EIO,
                     "%s: refcount of host cluster 0x%" PRIx64 " (0) "
                     "would drop below zero",
                     node->filename, host);
  boff = s->rt[idx / s->rc_per_block] & ~0x1ffull;
  if ((r = qcow2_cache_get_locked (node, &s->rc_cache, boff, &blk)) < 0)
    return r;
  qcow2_rc_store (s, blk, idx % s->rc_per_block, rc - 1, &first, &n);
  qcow2_cache_mark_dirty_locked (&s->rc_cache, boff);
  if (rc == 1 && idx < s->free_hint)
    s->free_hint = idx;
  *freed = rc == 1;
  return 0;
}

/* Freed host clusters, merged into runs, handed back to the file system
 * (QEMU's emptied image is short too). */
struct punch {
  uint64_t start, len;
};

static void
punch_flush (strata_node *node, struct punch *p)
{
  if (p->len)
    node_pdiscard (node->file, p->start, p->len, 0);
  p->len = 0;
}

static void
punch_add (strata_node *node, struct punch *p, uint64_t host, uint64_t len)
{
  if (p->len && p->start + p->len == host) {
    p->len += len;
    return;
  }
  punch_flush (node, p);
  p->start = host;
  p->len = len;
}

/* Drop one reference from what the entries of OLD (a copy of an L2 table
 * no longer reachable from this layer's L1 table) mapped. */
static int
release_entries_locked (strata_node *node, const uint8_t *old)
{
  struct qcow2_state *s = node->opaque;
  struct punch p = { 0 };
  int r = 0;

  for (uint64_t j = 0; j < s->l2_entries && r == 0; j++) {
    uint64_t e = be64_load (old + j * s->l2_entry_size);
    uint64_t host = e & QCOW2_OFFSET_MASK;
    bool freed = false;
    if (e & QCOW2_OFLAG_COMPRESSED)
      r = qcow2_free_entry_locked (node, e);
    else if (host && (r = drop_ref_deferred_locked (node, host, &freed)) == 0
             && freed)
      punch_add (node, &p, host, s->cluster_size);
  }
  punch_flush (node, &p);
  return r;
}

static int
empty_l2_locked (strata_node *node, uint64_t i, uint8_t *old)
{
  struct qcow2_state *s = node->opaque;
  uint64_t l2 = s->l1[i] & QCOW2_OFFSET_MASK, rc;
  CLEANUP_FREE uint8_t *zeros = NULL;
  uint8_t be[8] = { 0 };
  int r;

  if ((s->l1[i] & QCOW2_L1_RESERVED) || l2 % s->cluster_size
      || qcow2_past_end_locked (node, l2))
    return io_error (EIO,
                     "%s: L1 entry %" PRIu64 " 0x%" PRIx64 " is "
                     "invalid",
                     node->filename, i, s->l1[i]);
  if ((r = qcow2_l2_read_table_locked (node, l2, old)) < 0)
    return r;
  /* Free nothing a hostile entry names: check them all first. */
  for (uint64_t j = 0; j < s->l2_entries; j++) {
    const uint8_t *p = old + j * s->l2_entry_size;
    if ((r = qcow2_check_l2_entry (
             node, (i * s->l2_entries + j) << s->cluster_bits, be64_load (p),
             s->ext_l2 ? be64_load (p + 8) : 0))
        < 0)
      return r;
  }
  if ((r = qcow2_refcount_get_locked (node, l2 >> s->cluster_bits, &rc)) < 0)
    return r;
  if (rc == 1) {
    if (table_empty (s, old))
      return 0;
    if (!(zeros = calloc (1, s->cluster_size)))
      return -ENOMEM;
    if ((r = qcow2_overlap_check_locked (
             node, l2, s->cluster_size, QCOW2_META_L2, "L2 table", UINT64_MAX))
            < 0
        || (r = node_pwrite (node->file, l2, zeros, s->cluster_size, 0)) < 0)
      return r;
    qcow2_l2_put_table_locked (node, l2, zeros);
    if ((r = node_flush (node->file)) < 0)
      return r;
    return release_entries_locked (node, old);
  }
  if ((r = qcow2_overlap_check_locked (node, s->l1_offset + i * 8, 8,
                                       QCOW2_META_L1, "L1 table", UINT64_MAX))
          < 0
      || (r = node_pwrite (node->file, s->l1_offset + i * 8, be, 8, 0)) < 0
      || (r = node_flush (node->file)) < 0)
    return r;
  s->l1[i] = 0;
  if ((r = release_entries_locked (node, old)) < 0)
    return r;
  return qcow2_refcount_update_locked (node, l2, -1);
}

bool
qcow2_make_empty (strata_node *node, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE uint8_t *old = malloc (s->cluster_size);
  int r = 0;
  LOCK_GUARD (&node->lock);

  if (!old) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  /* Start from a cache with nothing dirty: tables are rewritten whole. */
  if ((r = qcow2_writeback_locked (node)) < 0
      || (r = node_flush (node->file)) < 0)
    goto fail;
  for (uint64_t i = 0; i < s->l1_size; i++) {
    if (!(s->l1[i] & QCOW2_OFFSET_MASK))
      continue;
    if ((r = empty_l2_locked (node, i, old)) < 0)
      goto fail;
  }
  if ((r = qcow2_writeback_locked (node)) < 0
      || (r = node_flush (node->file)) < 0
      || (r = qcow2_truncate_file_locked (node)) < 0)
    goto fail;
  return true;

fail:
  error_set (errp, -r, "%s: cannot empty the image: %s", node->filename,
             strerror (-r));
  return false;
}
