/* strata qcow2: qemu-img amend (qcow2.txt "Header": version, feature bits,
 * refcount_order, header_length; "Header extensions").
 *
 * What changes, in QEMU 7.2's order and with its messages:
 *   compat=1.1 (upgrade)  the header is rewritten as version 3 (112 bytes,
 *                         extensions and backing name moved after it);
 *   lazy_refcounts=on|off the compatible bit 0 (strata keeps refcounts
 *                         exact either way, so nothing else changes);
 *   size=                 resize.c (growing, or shrinking as QEMU's amend
 *                         does, without --shrink);
 *   refcount_bits=        a new refcount table and blocks of the new width
 *                         written past the end of the file, covering it
 *                         and themselves, flushed, then published with one
 *                         header write (table place and refcount_order),
 *                         then the old ones freed; refused when a count
 *                         does not fit, with QEMU's message;
 *   compat=0.10 (last)    refused for incompatible features (extended L2,
 *                         external data file) and refcount widths other
 *                         than 16; zstd is dropped when no cluster is
 *                         compressed; zero clusters of every L1 table
 *                         (active and snapshots') are converted (below);
 *                         then the header is rewritten as version 2.
 * Zero clusters without a backing file become unallocated, which reads
 * the same.  Those that must become data are written: a preallocated one
 * (refcount 1) gets zeros in its own cluster, one over a backing file in
 * an L2 table only the active image uses gets a new cluster of zeros;
 * zeros first, flushed, then the entries.  Zero clusters shared with
 * internal snapshots that would need data are refused (QEMU converts
 * them, and in 7.2 leaves OFLAG_COPIED errors behind).
 *
 * The header rewrite is one write from offset 0 of at most a cluster,
 * after everything else is flushed, as backing.c does for a backing file
 * change.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"
#include "util/checked.h"
#include "util/cleanup.h"

#define V3_HEADER_LENGTH 112

struct amend {
  int version; /* 0: unchanged */
  int lazy;    /* -1 unchanged, 0 off, 1 on */
  bool has_size;
  uint64_t size;
  uint64_t refcount_bits; /* 0: unchanged */
};

static const char *const creation_only[] = {
  "cluster_size", "extended_l2", "compression_type", "preallocation", NULL,
};

static bool
parse_compat (strata_node *node, const char *v, int *version,
              strata_error **errp)
{
  (void) node;
  if (!strcmp (v, "0.10") || !strcmp (v, "v2"))
    *version = 2;
  else if (!strcmp (v, "1.1") || !strcmp (v, "v3"))
    *version = 3;
  else {
    error_set (errp, EINVAL, "Unknown compatibility level %s", v);
    return false;
  }
  return true;
}

/* The backing options may only repeat what the image says. */
static bool
same_backing (const char *want, const char *have)
{
  return !want || (have && !strcmp (want, have));
}

static bool
parse_options (strata_node *node, strata_opts *opts, struct amend *a,
               strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  const char *v, *bf = NULL, *bfmt = NULL;

  *a = (struct amend){ .lazy = -1 };
  for (size_t i = 0; i < opts->n; i++)
    for (const char *const *k = creation_only; *k; k++)
      if (!strcmp (opts->v[i].key, *k)) {
        error_set (errp, EINVAL,
                   "Invalid parameter '%s'\nThis option is "
                   "only supported for image creation",
                   *k);
        return false;
      }
  if ((v = opts_get (opts, "compat"))
      && !parse_compat (node, v, &a->version, errp))
    return false;
  if ((v = opts_get (opts, "size"))) {
    a->has_size = true;
    if (!parse_size (v, &a->size) || a->size > INT64_MAX) {
      error_set (errp, EINVAL,
                 "Parameter 'size' expects a non-negative "
                 "number below 2^64\nOptional suffix k, M, G, T, P or E "
                 "means kilo-, mega-, giga-, tera-, peta-\nand exabytes, "
                 "respectively.");
      return false;
    }
  }
  if (opts_has (opts, "backing_file") || opts_has (opts, "backing_fmt")) {
    bf = opts_get (opts, "backing_file");
    bfmt = opts_get (opts, "backing_fmt");
    if (!same_backing (bf, s->backing_name)
        || !same_backing (bfmt, s->backing_format)) {
      error_set (errp, EINVAL,
                 "Cannot amend the backing file\nYou can use "
                 "'qemu-img rebase' instead.");
      return false;
    }
  }
  if ((v = opts_get (opts, "lazy_refcounts"))) {
    if (strcmp (v, "on") && strcmp (v, "off")) {
      error_set (errp, EINVAL,
                 "Parameter 'lazy_refcounts' expects 'on' or "
                 "'off'");
      return false;
    }
    a->lazy = !strcmp (v, "on");
  }
  if ((v = opts_get (opts, "refcount_bits"))) {
    char *end;
    unsigned long long b = strtoull (v, &end, 10);
    if (!*v || *end || b == 0 || b > 64 || (b & (b - 1))) {
      error_set (errp, EINVAL,
                 "Refcount width must be a power of two and "
                 "may not exceed 64 bits");
      return false;
    }
    a->refcount_bits = b;
  }
  return true;
}

/* QEMU's checks across options, then strata's refusals. */
static bool
check_combination (strata_node *node, const struct amend *a,
                   strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  int version = a->version ? a->version : (int) s->version;

  /* Only an explicit lazy_refcounts=on counts: a downgrade drops the bit. */
  if (a->lazy == 1 && version < 3) {
    error_set (errp, EINVAL,
               "Lazy refcounts only supported with "
               "compatibility level 1.1 and above (use compat=1.1 or "
               "greater)");
    return false;
  }
  if (a->refcount_bits && a->refcount_bits != 16 && version < 3) {
    error_set (errp, EINVAL,
               "Refcount widths other than 16 bits require "
               "compatibility level 1.1 or above (use compat=1.1 or "
               "greater)");
    return false;
  }
  return true;
}

/* ---- the header ---- */

/* Rewrite the first cluster as VERSION with feature bits COMPAT and
 * INCOMPAT: header fields, the same extensions, end marker, backing name.
 */
static int
write_header_locked (strata_node *node, uint32_t version, uint64_t compat,
                     uint64_t incompat, uint8_t compression)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE uint8_t *old = calloc (1, s->cluster_size);
  CLEANUP_FREE uint8_t *out = calloc (1, s->cluster_size);
  int64_t flen = node_length (node->file);
  uint64_t hl = version >= 3 ? V3_HEADER_LENGTH : 72, old_len, ext_end;
  uint64_t exts, pos,
      name_len = s->backing_name ? strlen (s->backing_name) : 0;
  strata_error *err = NULL;
  int r;

  if (!old || !out)
    return -ENOMEM;
  if (flen < 0)
    return (int) flen;
  old_len = MIN (s->cluster_size, (uint64_t) flen);
  if ((r = node_pread (node->file, 0, old, old_len, 0)) < 0)
    return r;
  if (!qcow2_extensions_end (node, s, old, old_len, &ext_end, &err)) {
    r = io_error (EINVAL, "%s", strata_error_message (err));
    strata_error_free (err);
    return r;
  }
  exts = ext_end - s->header_length;
  if (hl + exts + 8 + name_len > s->cluster_size)
    return io_error (ENOSPC,
                     "%s: the header extensions and backing file "
                     "name do not fit in the first cluster",
                     node->filename);
  memcpy (out, old, 72);
  be32_store (out + 4, version);
  if (version >= 3) {
    be64_store (out + 72, incompat);
    be64_store (out + 80, compat);
    be64_store (out + 88, 0);
    be32_store (out + 96, s->refcount_order);
    be32_store (out + 100, (uint32_t) hl);
    out[104] = compression;
  }
  memcpy (out + hl, old + s->header_length, exts);
  pos = hl + exts + 8; /* after the end marker (zeros) */
  be64_store (out + 8, name_len ? pos : 0);
  be32_store (out + 16, (uint32_t) name_len);
  memcpy (out + pos, s->backing_name ? s->backing_name : "", name_len);
  /* Also clear what the old header used past the new one. */
  return qcow2_write_header_field (
      node, 0, out,
      MIN (ROUND_UP (MAX (pos + name_len,
                          qcow2_header_used (node, s, old, old_len)),
                     512),
           s->cluster_size));
}

/* ---- downgrade ---- */

/* What a version 2 image needs instead of a zero cluster. */
enum zero_fix {
  ZERO_CLEAR, /* unallocated: no backing file, reads as zeros */
  ZERO_FILL,  /* write zeros into its own host cluster (refcount 1) */
  ZERO_ALLOC, /* a new cluster of zeros (over a backing file, in an L2
                 table only the active image uses) */
  ZERO_BAD,   /* shared with a snapshot: strata does not untangle it */
};

static int
zero_fix_of (strata_node *node, uint64_t e, bool owned_table,
             enum zero_fix *fix)
{
  struct qcow2_state *s = node->opaque;
  uint64_t host = e & QCOW2_OFFSET_MASK, rc;
  int r;

  if (!host) {
    *fix = !s->backing_name ? ZERO_CLEAR : owned_table ? ZERO_ALLOC : ZERO_BAD;
    return 0;
  }
  if ((r = qcow2_refcount_get_locked (node, host >> s->cluster_bits, &rc)) < 0)
    return r;
  *fix = rc == 1 ? ZERO_FILL : ZERO_BAD;
  return 0;
}

/* Give the zero entry E (in table T at J) its version 2 form: zeros
 * written first (the caller flushes before writing T). */
static int
fix_zero_entry (strata_node *node, uint8_t *t, uint64_t j, uint64_t e,
                enum zero_fix fix, const uint8_t *zeros)
{
  struct qcow2_state *s = node->opaque;
  uint64_t host = e & QCOW2_OFFSET_MASK;
  int64_t a;
  int r;

  if (fix == ZERO_CLEAR) {
    be64_store (t + j * s->l2_entry_size, 0);
    return 0;
  }
  if (fix == ZERO_ALLOC) {
    if ((a = qcow2_alloc_cluster_locked (node)) < 0)
      return (int) a;
    host = (uint64_t) a;
  }
  if ((r = qcow2_overlap_check_locked (node, host, s->cluster_size, 0, "data",
                                       UINT64_MAX))
          < 0
      || (r = node_pwrite (node->file, host, zeros, s->cluster_size, 0)) < 0)
    return r;
  be64_store (t + j * s->l2_entry_size, fix == ZERO_ALLOC
                                            ? host | QCOW2_OFLAG_COPIED
                                            : e & ~QCOW2_OFLAG_ZERO);
  return 0;
}

/* For every L2 table of L1 (N entries; ACTIVE: the active image's): count
 * compressed entries, zero entries and those strata cannot convert (BAD),
 * and with FIX convert them (the caller checked BAD is 0). */
static int
scan_zero_locked (strata_node *node, const uint64_t *l1, uint64_t n,
                  bool active, bool fix, uint64_t *compressed, uint64_t *bad,
                  uint64_t *zeros)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE uint8_t *t = malloc (s->cluster_size);
  CLEANUP_FREE uint8_t *zbuf = calloc (1, s->cluster_size);
  int r;

  if (!t || !zbuf)
    return -ENOMEM;
  for (uint64_t i = 0; i < n; i++) {
    uint64_t l2 = l1[i] & QCOW2_OFFSET_MASK;
    bool changed = false, owned = false;
    if (!l2)
      continue;
    if (l2 % s->cluster_size || qcow2_past_end_locked (node, l2))
      return io_error (EIO,
                       "%s: L1 entry %" PRIu64 " 0x%" PRIx64 " is "
                       "invalid",
                       node->filename, i, l1[i]);
    if (active) {
      uint64_t rc;
      if ((r = qcow2_refcount_get_locked (node, l2 >> s->cluster_bits, &rc))
          < 0)
        return r;
      owned = rc == 1;
    }
    if ((r = qcow2_l2_read_table_locked (node, l2, t)) < 0)
      return r;
    for (uint64_t j = 0; j < s->l2_entries; j++) {
      uint64_t e = be64_load (t + j * s->l2_entry_size);
      enum zero_fix zf;
      if (e & QCOW2_OFLAG_COMPRESSED) {
        (*compressed)++;
        continue;
      }
      if (!(e & QCOW2_OFLAG_ZERO))
        continue;
      (*zeros)++;
      if ((r = zero_fix_of (node, e, owned, &zf)) < 0)
        return r;
      if (zf == ZERO_BAD)
        (*bad)++;
      else if (fix) {
        if ((r = fix_zero_entry (node, t, j, e, zf, zbuf)) < 0)
          return r;
        changed = true;
      }
    }
    if (!changed)
      continue;
    /* The zeros, then the entries that map them. */
    if ((r = node_flush (node->file)) < 0
        || (r = qcow2_overlap_check_locked (node, l2, s->cluster_size,
                                            QCOW2_META_L2, "L2 table",
                                            UINT64_MAX))
               < 0
        || (r = node_pwrite (node->file, l2, t, s->cluster_size, 0)) < 0)
      return r;
    qcow2_l2_put_table_locked (node, l2, t);
  }
  return 0;
}

/* Run scan_zero_locked over the active L1 and every snapshot's. */
static int
scan_all_locked (strata_node *node, bool fix, uint64_t *compressed,
                 uint64_t *bad, uint64_t *zeros)
{
  struct qcow2_state *s = node->opaque;
  struct qcow2_snapshot_l1 *l1s = NULL;
  int n, r;

  *compressed = *bad = *zeros = 0;
  if ((r = scan_zero_locked (node, s->l1, s->l1_size, true, fix, compressed,
                             bad, zeros))
      < 0)
    return r;
  if ((n = qcow2_snapshot_l1s_locked (node, &l1s)) < 0)
    return n;
  for (int i = 0; i < n && r == 0; i++)
    r = scan_zero_locked (node, l1s[i].l1, l1s[i].size, false, fix, compressed,
                          bad, zeros);
  qcow2_snapshot_l1s_free (l1s, n);
  return r;
}

static bool
downgrade_locked (strata_node *node, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  uint64_t incompat = s->incompat & ~QCOW2_INCOMPAT_DIRTY;
  uint64_t compressed, bad, zeros;
  const char *m;
  int r;

  if (incompat & ~QCOW2_INCOMPAT_COMPRESSION) {
    error_set (errp, ENOTSUP,
               "Cannot downgrade an image with incompatible "
               "features 0x%" PRIx64 " set",
               incompat);
    return false;
  }
  if (s->refcount_bits != 16) {
    error_set (errp, ENOTSUP, "compat=0.10 requires refcount_bits=16");
    return false;
  }
  io_error_clear ();
  if ((r = qcow2_writeback_locked (node)) < 0
      || (r = node_flush (node->file)) < 0
      || (r = scan_all_locked (node, false, &compressed, &bad, &zeros)) < 0)
    goto fail;
  if (s->compression != QCOW2_COMP_ZLIB && compressed) {
    error_set (errp, ENOTSUP,
               "Cannot downgrade an image with zstd "
               "compression type and existing compressed clusters");
    return false;
  }
  if (bad) {
    error_set (errp, ENOTSUP,
               "%s: cannot downgrade to compat=0.10: %" PRIu64
               " zero clusters shared with internal snapshots would have to "
               "be written as data; strata does not untangle them (delete "
               "the snapshots first)",
               node->filename, bad);
    return false;
  }
  if ((zeros
       && ((r = scan_all_locked (node, true, &compressed, &bad, &zeros)) < 0
           || (r = node_flush (node->file)) < 0))
      || (r = write_header_locked (node, 2, 0, 0, 0)) < 0
      || (r = node_flush (node->file)) < 0)
    goto fail;
  s->version = 2;
  s->header_length = 72;
  s->compat = s->incompat = s->autoclear = 0;
  s->compression = QCOW2_COMP_ZLIB;
  return true;

fail:
  m = strata_last_error_message ();
  error_set (errp, -r, "%s: cannot downgrade the image: %s", node->filename,
             m && *m ? m : strerror (-r));
  return false;
}

/* Upgrade to version 3 (TO_V3) and/or set lazy refcounts (LAZY -1:
 * unchanged). */
static bool
upgrade_locked (strata_node *node, bool to_v3, int lazy, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  uint64_t compat = s->compat;
  uint8_t be[8];
  int r;

  if (lazy >= 0)
    compat = lazy ? compat | QCOW2_COMPAT_LAZY_REFCOUNTS
                  : compat & ~QCOW2_COMPAT_LAZY_REFCOUNTS;
  if (s->version < 3 && !to_v3)
    return true; /* lazy_refcounts=off on version 2: nothing to do */
  if (s->version >= 3 && compat == s->compat)
    return true;
  be64_store (be, compat);
  if ((r = qcow2_writeback_locked (node)) < 0
      || (r = node_flush (node->file)) < 0
      || (r = s->version >= 3
                  ? qcow2_write_header_field (node, 80, be, sizeof be)
                  : write_header_locked (node, 3, compat, s->incompat,
                                         s->compression))
             < 0
      || (r = node_flush (node->file)) < 0) {
    error_set (errp, -r, "%s: cannot write the header: %s", node->filename,
               strerror (-r));
    return false;
  }
  if (s->version < 3) {
    s->version = 3;
    s->header_length = V3_HEADER_LENGTH;
  }
  s->compat = compat;
  return true;
}

/* ---- refcount width ---- */

/* The refcount of every host cluster below the end of the file. */
static int
read_refcounts_locked (strata_node *node, uint64_t n, uint64_t *rc)
{
  int r;

  for (uint64_t c = 0; c < n; c++)
    if ((r = qcow2_refcount_get_locked (node, c, &rc[c])) < 0)
      return r;
  return 0;
}

/* Rewrite the refcount structures with BITS-wide entries: a new table and
 * blocks covering the whole file (themselves included) written past its
 * end and flushed, then one header write of the table's place and
 * refcount_order, then the old table and blocks freed in the new ones.
 * A crash leaks the new or the old structures at worst. */
static bool
change_width_locked (strata_node *node, uint32_t bits, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  struct qcow2_state w = { .refcount_bits = bits };
  uint64_t cs = s->cluster_size, per_cl = cs / 8, rpb = cs * 8 / bits;
  uint64_t n = s->file_end >> s->cluster_bits, T = 1, K = 1, total, max;
  uint64_t old_off = s->rt_offset, old_cl = s->rt_clusters, old_n;
  CLEANUP_FREE uint64_t *rc = NULL, *old_rt = NULL;
  CLEANUP_FREE uint8_t *blocks = NULL, *table = NULL;
  uint64_t *rt = NULL;
  uint8_t h[52];
  const char *m;
  int r;

  max = bits == 64 ? UINT64_MAX : (1ull << bits) - 1;
  for (int i = 0; i < 64; i++) { /* the structures cover themselves */
    total = n + T + K;
    K = (total + rpb - 1) / rpb;
    T = (K + per_cl - 1) / per_cl;
  }
  total = n + T + K;
  if (T * cs > QCOW2_MAX_REFTABLE_BYTES) {
    error_set (errp, EFBIG, "%s: the refcount table would be too large",
               node->filename);
    return false;
  }
  if (!(rc = calloc (total, sizeof *rc)) || !(blocks = calloc (K, cs))
      || !(table = calloc (T, cs)) || !(rt = calloc (T * per_cl, 8))) {
    free (rt);
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  io_error_clear ();
  if ((r = qcow2_writeback_locked (node)) < 0
      || (r = node_flush (node->file)) < 0
      || (r = read_refcounts_locked (node, n, rc)) < 0)
    goto fail;
  for (uint64_t c = n; c < total; c++)
    rc[c] = 1;
  for (uint64_t c = 0; c < total; c++) {
    uint64_t first;
    unsigned len;
    if (rc[c] > max) {
      free (rt);
      error_set (errp, EINVAL,
                 "Cannot decrease refcount entry width to %" PRIu32
                 " bits: Cluster at offset 0x%" PRIx64 " has a "
                 "refcount of %" PRIu64,
                 bits, c * cs, rc[c]);
      return false;
    }
    qcow2_rc_store (&w, blocks + (c / rpb) * cs, c % rpb, rc[c], &first, &len);
  }
  for (uint64_t k = 0; k < K; k++) {
    rt[k] = (n + T + k) * cs;
    be64_store (table + k * 8, rt[k]);
  }
  /* Bytes 48-99: the table's place, then the fields between it and
   * refcount_order as they are. */
  if ((r = node_pread (node->file, 48, h, sizeof h, 0)) < 0
      || (r = qcow2_overlap_check_locked (node, n * cs, (T + K) * cs, 0,
                                          "refcount table", UINT64_MAX))
             < 0
      || (r = node_pwrite (node->file, n * cs, table, T * cs, 0)) < 0
      || (r = node_pwrite (node->file, (n + T) * cs, blocks, K * cs, 0)) < 0
      || (r = node_flush (node->file)) < 0)
    goto fail;
  be64_store (h, n * cs);
  be32_store (h + 8, (uint32_t) T);
  be32_store (h + 48, (uint32_t) __builtin_ctz (bits));
  if ((r = qcow2_write_header_field (node, 48, h, sizeof h)) < 0
      || (r = node_flush (node->file)) < 0)
    goto fail;
  old_rt = s->rt;
  old_n = s->rt_entries;
  s->rt = rt;
  s->rt_entries = T * per_cl;
  s->rt_offset = n * cs;
  s->rt_clusters = (uint32_t) T;
  s->refcount_order = __builtin_ctz (bits);
  s->refcount_bits = bits;
  s->rc_per_block = rpb;
  s->free_hint = 1;
  s->file_end = total * cs;
  qcow2_cache_destroy (&s->rc_cache);
  if (!qcow2_cache_init (&s->rc_cache, 4, cs)) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  /* Unreferenced now: a failure from here on only leaks them. */
  for (uint64_t i = 0; i < old_n; i++)
    if (old_rt[i] & ~0x1ffull)
      qcow2_refcount_update_locked (node, old_rt[i] & ~0x1ffull, -1);
  qcow2_free_clusters_locked (node, old_off, old_cl * cs);
  return true;

fail:
  free (rt);
  m = strata_last_error_message ();
  error_set (errp, -r, "%s: cannot change the refcount width: %s",
             node->filename, m && *m ? m : strerror (-r));
  return false;
}

static bool
width_locked (strata_node *node, const void *bits, strata_error **errp)
{
  return change_width_locked (node, *(const uint32_t *)bits, errp);
}

bool
qcow2_amend (strata_node *node, strata_opts *opts, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  struct amend a;
  bool ok;

  if (!parse_options (node, opts, &a, errp)
      || !check_combination (node, &a, errp))
    return false;
  if (node->read_only) {
    error_set (errp, EROFS, "%s: the image is open read-only", node->filename);
    return false;
  }
  if (a.version != 2) {
    pthread_mutex_lock (&node->lock);
    ok = upgrade_locked (node, a.version == 3, a.lazy, errp);
    pthread_mutex_unlock (&node->lock);
    if (!ok)
      return false;
  }
  if (a.refcount_bits && a.refcount_bits != s->refcount_bits) {
    uint32_t bits = (uint32_t) a.refcount_bits;
    if (!qcow2_run_exclusive (node, width_locked, &bits, errp))
      return false;
  }
  if (a.has_size && a.size != s->size
      && !qcow2_truncate (node, a.size, 0, errp))
    return false;
  if (a.version == 2 && s->version >= 3) {
    struct tracked_req req;
    tracker_begin (&s->clusters, &req, 0, UINT64_MAX / 2, true);
    pthread_mutex_lock (&node->lock);
    ok = downgrade_locked (node, errp);
    pthread_mutex_unlock (&node->lock);
    tracker_end (&s->clusters, &req);
    return ok;
  }
  return true;
}
