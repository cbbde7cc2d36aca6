/* strata: creating qcow2 images (qemu-img create -f qcow2).
 *
 * A new image is laid out as QEMU lays it out (docs/interop/qcow2.txt,
 * "Header" and "Host cluster management"):
 *
 *   cluster 0        header, header extensions, backing file name
 *   clusters 1..R    refcount table (R clusters)
 *   next B           refcount blocks covering every cluster of this layout
 *   next L           L1 table, all entries 0 (nothing allocated)
 *
 * and with preallocation (metadata, falloc, full) also
 *
 *   next N2          every L2 table, each entry mapping a data cluster
 *   next ND          the data clusters, in guest order: left sparse
 *                    (metadata: reads as zeros), fallocated (falloc) or
 *                    written with zeros (full)
 *
 * R, B and the rest depend on each other (the refcount blocks must count
 * themselves), so they are computed to a fixed point.  Every option is
 * validated before the file is touched; a file this function created is
 * removed again if writing it fails.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "drivers/file.h"
#include "drivers/qcow2/qcow2.h"
#include "util/checked.h"
#include "util/cleanup.h"

struct create_params {
  uint64_t size;
  uint32_t cluster_bits;
  int version;              /* 2 or 3 */
  bool lazy_refcounts;
  bool extended_l2;
  uint8_t compression;      /* QCOW2_COMP_* */
  uint32_t refcount_order;
  const char *backing_file;
  const char *backing_fmt;
  enum { PREALLOC_OFF, PREALLOC_METADATA, PREALLOC_FALLOC,
         PREALLOC_FULL } prealloc;
};

static bool
parse_params (const char *filename, strata_opts *opts,
              struct create_params *p, strata_error **errp)
{
  uint64_t csize, rbits;
  const char *compat = opts_get (opts, "compat");
  const char *ctype = opts_get (opts, "compression_type");
  const char *prealloc = opts_get (opts, "preallocation");

  *p = (struct create_params){ .version = 3, .refcount_order = 4 };
  if (!opts_get_size (opts, "size", 0, &p->size, errp)
      || !opts_get_size (opts, "cluster_size", 65536, &csize, errp)
      || !opts_get_size (opts, "refcount_bits", 16, &rbits, errp)
      || !opts_get_bool (opts, "lazy_refcounts", false, &p->lazy_refcounts,
                         errp)
      || !opts_get_bool (opts, "extended_l2", false, &p->extended_l2, errp))
    return false;
  p->backing_file = opts_get (opts, "backing_file");
  p->backing_fmt = opts_get (opts, "backing_fmt");

  if (!is_power_of_2 (csize) || csize < (1u << QCOW2_MIN_CLUSTER_BITS)
      || csize > (1u << QCOW2_MAX_CLUSTER_BITS)) {
    error_set (errp, EINVAL, "%s: Cluster size must be a power of two "
               "between 512 and 2048k", filename);
    return false;
  }
  p->cluster_bits = __builtin_ctzll (csize);
  if (!compat || strcmp (compat, "1.1") == 0 || strcmp (compat, "v3") == 0)
    p->version = 3;
  else if (strcmp (compat, "0.10") == 0 || strcmp (compat, "v2") == 0)
    p->version = 2;
  else {
    error_set (errp, EINVAL, "%s: Invalid compatibility level: '%s'",
               filename, compat);
    return false;
  }
  if (rbits != 16) {
    error_set (errp, ENOTSUP, "%s: refcount_bits=%" PRIu64 " is not "
               "supported (only 16)", filename, rbits);
    return false;
  }
  if (!ctype || strcmp (ctype, "zlib") == 0)
    p->compression = QCOW2_COMP_ZLIB;
  else if (strcmp (ctype, "zstd") == 0)
    p->compression = QCOW2_COMP_ZSTD;
  else {
    error_set (errp, EINVAL, "%s: Invalid compression type '%s' (zlib or "
               "zstd)", filename, ctype);
    return false;
  }
  if (p->version == 2 && p->lazy_refcounts) {
    error_set (errp, EINVAL, "%s: Lazy refcounts only supported with "
               "compatibility level 1.1 and above (use compat=1.1 or "
               "greater)", filename);
    return false;
  }
  if (p->version == 2 && p->compression != QCOW2_COMP_ZLIB) {
    error_set (errp, EINVAL, "%s: Compression type zstd requires "
               "compatibility level 1.1 or above", filename);
    return false;
  }
  if (p->extended_l2 && p->version == 2) {
    error_set (errp, EINVAL, "%s: Extended L2 entries are only supported "
               "with compatibility level 1.1 and above", filename);
    return false;
  }
  if (p->extended_l2 && csize < 16384) {
    error_set (errp, EINVAL, "%s: Extended L2 entries are only supported "
               "with cluster sizes of at least 16384 bytes", filename);
    return false;
  }
  if (!prealloc || strcmp (prealloc, "off") == 0)
    p->prealloc = PREALLOC_OFF;
  else if (strcmp (prealloc, "metadata") == 0)
    p->prealloc = PREALLOC_METADATA;
  else if (strcmp (prealloc, "falloc") == 0)
    p->prealloc = PREALLOC_FALLOC;
  else if (strcmp (prealloc, "full") == 0)
    p->prealloc = PREALLOC_FULL;
  else {
    error_set (errp, EINVAL, "%s: Invalid preallocation mode: '%s' (off, "
               "metadata, falloc or full)", filename, prealloc);
    return false;
  }
  if (p->prealloc != PREALLOC_OFF && p->backing_file) {
    error_set (errp, EINVAL, "%s: Backing file and preallocation can only "
               "be used at the same time if extended_l2 is on", filename);
    if (!p->extended_l2)
      return false;
    strata_error_free (*errp);
    *errp = NULL;
  }
  if (p->backing_fmt && !p->backing_file) {
    error_set (errp, EINVAL, "%s: Backing format cannot be used without "
               "backing file", filename);
    return false;
  }
  if (p->backing_file && strlen (p->backing_file) > QCOW2_MAX_BACKING_NAME) {
    error_set (errp, EINVAL, "%s: backing file name is longer than %d "
               "bytes", filename, QCOW2_MAX_BACKING_NAME);
    return false;
  }
  if (p->backing_fmt && strlen (p->backing_fmt) > 16) {
    error_set (errp, EINVAL, "%s: backing format name '%s' is too long",
               filename, p->backing_fmt);
    return false;
  }
  return true;
}

/* The header cluster: header, extensions, backing file name.  Returns the
 * number of bytes used, or 0 when they do not fit in one cluster. */
static size_t
build_header (uint8_t *h, uint64_t csize, const struct create_params *p,
              uint32_t l1_size, uint64_t l1_offset, uint64_t rt_offset,
              uint32_t rt_clusters)
{
  static const struct { uint8_t type, bit; const char *name; } features[] = {
    { 0, 0, "dirty bit" }, { 0, 1, "corrupt bit" },
    { 0, 2, "external data file" }, { 0, 3, "compression type" },
    { 0, 4, "extended L2 entries" }, { 1, 0, "lazy refcounts" },
    { 2, 0, "bitmaps" }, { 2, 1, "raw external data" },
  };
  uint32_t hlen = p->version == 3 ? 112 : 72;
  uint64_t incompat = 0;
  size_t pos = hlen;

  memset (h, 0, csize);
  be32_store (h, QCOW2_MAGIC);
  be32_store (h + 4, p->version);
  be32_store (h + 20, p->cluster_bits);
  be64_store (h + 24, p->size);
  be32_store (h + 36, l1_size);
  be64_store (h + 40, l1_offset);
  be64_store (h + 48, rt_offset);
  be32_store (h + 56, rt_clusters);
  if (p->version == 3) {
    if (p->compression != QCOW2_COMP_ZLIB)
      incompat |= QCOW2_INCOMPAT_COMPRESSION;
    if (p->extended_l2)
      incompat |= QCOW2_INCOMPAT_EXTL2;
    be64_store (h + 72, incompat);
    be64_store (h + 80, p->lazy_refcounts ? QCOW2_COMPAT_LAZY_REFCOUNTS : 0);
    be32_store (h + 96, p->refcount_order);
    be32_store (h + 100, hlen);
    h[104] = p->compression;
  }

  /* Extensions: each is type, length, data padded to 8 bytes. */
  if (p->backing_fmt) {
    size_t n = strlen (p->backing_fmt);
    be32_store (h + pos, QCOW2_EXT_BACKING_FORMAT);
    be32_store (h + pos + 4, n);
    memcpy (h + pos + 8, p->backing_fmt, n);
    pos += 8 + ROUND_UP (n, 8);
  }
  if (p->version == 3) {
    size_t n = sizeof features / sizeof features[0] * 48;
    be32_store (h + pos, QCOW2_EXT_FEATURE_TABLE);
    be32_store (h + pos + 4, n);
    for (size_t i = 0; i < sizeof features / sizeof features[0]; i++) {
      uint8_t *f = h + pos + 8 + i * 48;
      f[0] = features[i].type;
      f[1] = features[i].bit;
      memcpy (f + 2, features[i].name, strlen (features[i].name));
    }
    pos += 8 + n;
  }
  pos += 8;  /* end of extensions: type 0, length 0 */
  if (p->backing_file) {
    size_t n = strlen (p->backing_file);
    if (pos + n > csize)
      return 0;
    be64_store (h + 8, pos);
    be32_store (h + 16, n);
    memcpy (h + pos, p->backing_file, n);
    pos += n;
  }
  return pos <= csize ? pos : 0;
}

/* Write the L2 tables of a preallocated image: entry k maps guest cluster
 * k to data cluster DATA_BASE + k * csize. */
static int
write_prealloc_l2 (strata_node *file, uint8_t *buf, uint64_t csize,
                   const struct create_params *p, uint64_t l2_base,
                   uint64_t n_l2, uint64_t data_base, uint64_t n_data)
{
  uint64_t esize = p->extended_l2 ? 16 : 8, per = csize / esize;
  int r = 0;

  for (uint64_t i = 0; r == 0 && i < n_l2; i++) {
    memset (buf, 0, csize);
    for (uint64_t j = 0; j < per; j++) {
      uint64_t k = i * per + j;
      if (k >= n_data)
        break;
      /* With extended L2 the host cluster is reserved but its
       * subclusters stay unallocated (bitmap 0), as QEMU does, so a
       * backing file still shows through until the guest writes. */
      be64_store (buf + j * esize,
                  (data_base + k * csize) | QCOW2_OFLAG_COPIED);
    }
    r = node_pwrite (file, l2_base + i * csize, buf, csize, 0);
  }
  return r;
}

/* Give the data clusters their space as the preallocation mode asks. */
static int
prealloc_data (strata_node *file, uint8_t *buf, uint64_t csize,
               const struct create_params *p, uint64_t data_base,
               uint64_t n_data)
{
  uint64_t len = n_data * csize;
  int r = 0;

  switch (p->prealloc) {
  case PREALLOC_OFF:
    return 0;
  case PREALLOC_METADATA:
    /* A sparse tail: the data clusters read as zeros. */
    return node_truncate (file, data_base + len, 0, NULL) ? 0 : -EIO;
  case PREALLOC_FALLOC:
    if (!len)
      return 0;
    return node_pwrite_zeroes (file, data_base, len, 0);
  case PREALLOC_FULL:
    memset (buf, 0, csize);
    for (uint64_t i = 0; r == 0 && i < n_data; i++)
      r = node_pwrite (file, data_base + i * csize, buf, csize, 0);
    return r;
  }
  return 0;
}

bool
qcow2_create (const char *filename, strata_opts *opts, strata_error **errp)
{
  struct create_params p;
  uint64_t csize, l2_entries, l1_entries, l1_clusters, rc_per_block;
  uint64_t rt_clusters = 1, rb_clusters = 1, total, n_l2, n_data;
  uint64_t l1_offset, l2_base, data_base;
  CLEANUP_FREE uint8_t *buf = NULL;
  strata_node *file;
  bool existed;
  int r = 0;

  if (!parse_params (filename, opts, &p, errp))
    return false;
  csize = UINT64_C (1) << p.cluster_bits;
  l2_entries = csize / (p.extended_l2 ? 16 : 8);
  l1_entries = (p.size + csize * l2_entries - 1) / (csize * l2_entries);
  if (p.size > QCOW2_MAX_OFFSET || l1_entries * 8 > QCOW2_MAX_L1_BYTES) {
    error_set (errp, EFBIG, "%s: image size %" PRIu64 " is too large for "
               "cluster size %" PRIu64, filename, p.size, csize);
    return false;
  }
  l1_clusters = MAX (1, ROUND_UP (l1_entries * 8, csize) / csize);
  n_l2 = p.prealloc != PREALLOC_OFF ? l1_entries : 0;
  n_data = p.prealloc != PREALLOC_OFF ? (p.size + csize - 1) / csize : 0;
  rc_per_block = csize * 8 / (1u << p.refcount_order);
  /* Refcount blocks must cover every cluster of the layout, themselves
   * included, and the table must list every block. */
  for (;;) {
    uint64_t need;
    total = 1 + rt_clusters + rb_clusters + l1_clusters + n_l2 + n_data;
    need = (total + rc_per_block - 1) / rc_per_block;
    if (need > rb_clusters) {
      rb_clusters = need;
      continue;
    }
    if (rt_clusters * csize / 8 < rb_clusters) {
      rt_clusters = ROUND_UP (rb_clusters * 8, csize) / csize;
      continue;
    }
    break;
  }
  if (rt_clusters * csize > QCOW2_MAX_REFTABLE_BYTES) {
    error_set (errp, EFBIG, "%s: image size %" PRIu64 " needs a refcount "
               "table that is too large", filename, p.size);
    return false;
  }
  l1_offset = (1 + rt_clusters + rb_clusters) * csize;
  l2_base = l1_offset + l1_clusters * csize;
  data_base = l2_base + n_l2 * csize;
  buf = calloc (1, csize);
  if (!buf) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  if (!build_header (buf, csize, &p, l1_entries, l1_offset, csize,
                     rt_clusters)) {
    error_set (errp, EINVAL, "%s: the header and backing file name do not "
               "fit in one cluster of %" PRIu64 " bytes", filename, csize);
    return false;
  }

  /* Everything is valid: now touch the disk. */
  existed = access (filename, F_OK) == 0;
  if (!file_create (filename, 0, "off", errp))
    return false;
  file = node_open_image (filename, "file", NULL, STRATA_OPEN_RDWR, errp);
  if (!file) {
    if (!existed)
      unlink (filename);
    return false;
  }
  r = node_pwrite (file, 0, buf, csize, 0);
  /* Refcount table: entry i points at refcount block i. */
  for (uint64_t i = 0; r == 0 && i < rt_clusters; i++) {
    memset (buf, 0, csize);
    for (uint64_t j = 0; j < csize / 8; j++) {
      uint64_t blk = i * (csize / 8) + j;
      if (blk < rb_clusters)
        be64_store (buf + j * 8, (1 + rt_clusters + blk) * csize);
    }
    r = node_pwrite (file, (1 + i) * csize, buf, csize, 0);
  }
  /* Refcount blocks: every cluster of the layout has refcount 1. */
  for (uint64_t b = 0; r == 0 && b < rb_clusters; b++) {
    memset (buf, 0, csize);
    for (uint64_t j = 0; j < rc_per_block; j++) {
      uint64_t cl = b * rc_per_block + j;
      if (cl < total) {
        buf[j * 2] = 0;
        buf[j * 2 + 1] = 1;
      }
    }
    r = node_pwrite (file, (1 + rt_clusters + b) * csize, buf, csize, 0);
  }
  /* L1 table: empty, or pointing at the preallocated L2 tables. */
  if (r == 0 && !n_l2)
    r = node_pwrite_zeroes (file, l1_offset, l1_clusters * csize, 0);
  for (uint64_t c = 0; r == 0 && n_l2 && c < l1_clusters; c++) {
    memset (buf, 0, csize);
    for (uint64_t j = 0; j < csize / 8; j++) {
      uint64_t i = c * (csize / 8) + j;
      if (i < n_l2)
        be64_store (buf + j * 8, (l2_base + i * csize) | QCOW2_OFLAG_COPIED);
    }
    r = node_pwrite (file, l1_offset + c * csize, buf, csize, 0);
  }
  if (r == 0)
    r = write_prealloc_l2 (file, buf, csize, &p, l2_base, n_l2, data_base,
                           n_data);
  if (r == 0)
    r = prealloc_data (file, buf, csize, &p, data_base, n_data);
  if (r == 0)
    r = node_flush (file);
  node_unref (file);
  if (r < 0) {
    const char *detail = strata_last_error_message ();
    if (!existed)
      unlink (filename);
    error_set (errp, -r, "%s: cannot write the new image: %s", filename,
               detail ? detail : strerror (-r));
    return false;
  }
  return true;
}

const char *const qcow2_create_options[] = {
  "size", "backing_file", "backing_fmt", "cluster_size", "compat",
  "lazy_refcounts", "extended_l2", "compression_type", "preallocation",
  "refcount_bits", NULL,
};
