/* strata: qcow2 header and header extensions (qcow2.txt "Header" and
 * "Header extensions").
 *
 *   bytes  0- 71  common header (magic, version, backing name location,
 *                 cluster_bits, size, L1 and refcount table, snapshots)
 *   bytes 72-103  version 3 only: feature bits, refcount_order,
 *                 header_length; byte 104 compression_type if present
 *   then          header extensions (type, length, data padded to 8
 *                 bytes), up to an end marker, inside the first cluster
 *   somewhere     the backing file name, also inside the first cluster
 *
 * Every field is untrusted: each is checked before it is used for an
 * allocation, an offset or arithmetic, and a failure names the field and
 * its value.  The whole header is never rewritten: the few fields strata
 * changes (autoclear bits, refcount table location) are written in place,
 * so unknown extensions stay on disk as they were; they are also kept in
 * memory (s->exts) for a future rewrite.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"
#include "util/checked.h"
#include "util/cleanup.h"

static const struct qcow2_feature_name builtin_features[] = {
  { 0, 0, "dirty bit" },
  { 0, 1, "corrupt bit" },
  { 0, 2, "external data file" },
  { 0, 3, "compression type" },
  { 0, 4, "extended L2 entries" },
  { 1, 0, "lazy refcounts" },
  { 2, 0, "bitmaps" },
  { 2, 1, "raw external data" },
};

const char *
qcow2_feature_name (const struct qcow2_state *s, uint8_t type, uint8_t bit)
{
  for (unsigned i = 0; i < s->nfeatures; i++)
    if (s->features[i].type == type && s->features[i].bit == bit)
      return s->features[i].name;
  for (size_t i = 0; i < sizeof builtin_features / sizeof *builtin_features;
       i++)
    if (builtin_features[i].type == type && builtin_features[i].bit == bit)
      return builtin_features[i].name;
  return NULL;
}

void
qcow2_free_header (struct qcow2_state *s)
{
  for (unsigned i = 0; i < s->nexts; i++)
    free (s->exts[i].data);
  free (s->exts);
  free (s->features);
  free (s->backing_name);
  free (s->backing_format);
  s->exts = NULL;
  s->features = NULL;
  s->backing_name = s->backing_format = NULL;
  s->nexts = s->nfeatures = 0;
}

int
qcow2_write_header_field (strata_node *node, uint64_t off, const void *buf,
                          size_t len)
{
  return node_pwrite (node->file, off, buf, len, 0);
}

static bool
parse_feature_table (strata_node *node, struct qcow2_state *s,
                     const uint8_t *p, uint32_t len, strata_error **errp)
{
  unsigned n = len / 48;

  if (len % 48) {
    error_set (errp, EINVAL, "%s: feature name table length %" PRIu32
               " is not a multiple of 48", node->filename, len);
    return false;
  }
  free (s->features);
  s->features = calloc (n ? n : 1, sizeof *s->features);
  if (!s->features) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  s->nfeatures = n;
  for (unsigned i = 0; i < n; i++, p += 48) {
    s->features[i].type = p[0];
    s->features[i].bit = p[1];
    memcpy (s->features[i].name, p + 2, 46);
    s->features[i].name[46] = 0;
    for (char *c = s->features[i].name; *c; c++)
      if ((unsigned char) *c < 0x20 || (unsigned char) *c > 0x7e)
        *c = '?';
  }
  return true;
}

static bool
keep_extension (struct qcow2_state *s, uint32_t type, const uint8_t *p,
                uint32_t len, strata_error **errp)
{
  struct qcow2_ext *v = realloc (s->exts, (s->nexts + 1) * sizeof *v);
  uint8_t *data = malloc (len ? len : 1);

  if (v)
    s->exts = v;
  if (!v || !data) {
    free (data);
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  memcpy (data, p, len);
  s->exts[s->nexts++] = (struct qcow2_ext){ type, len, data };
  return true;
}

/* Walk the extensions in HDR[start, end). */
static bool
parse_extensions (strata_node *node, struct qcow2_state *s,
                  const uint8_t *hdr, uint64_t start, uint64_t end,
                  strata_error **errp)
{
  uint64_t off = start;

  while (off + 8 <= end) {
    uint32_t type = be32_load (hdr + off), len = be32_load (hdr + off + 4);
    const uint8_t *p = hdr + off + 8;

    if (type == QCOW2_EXT_END)
      return true;
    if (len > end - off - 8) {
      error_set (errp, EINVAL, "%s: header extension 0x%08" PRIx32
                 " length %" PRIu32 " runs past the first cluster",
                 node->filename, type, len);
      return false;
    }
    switch (type) {
    case QCOW2_EXT_BACKING_FORMAT:
      if (len == 0 || len > 63) {
        error_set (errp, EINVAL, "%s: backing format length %" PRIu32
                   " is invalid (1..63)", node->filename, len);
        return false;
      }
      free (s->backing_format);
      if (!(s->backing_format = strndup ((const char *) p, len))) {
        error_set (errp, ENOMEM, "out of memory");
        return false;
      }
      break;
    case QCOW2_EXT_FEATURE_TABLE:
      if (!parse_feature_table (node, s, p, len, errp))
        return false;
      break;
    default:
      if (!keep_extension (s, type, p, len, errp))
        return false;
    }
    off += 8 + ROUND_UP ((uint64_t) len, 8);
  }
  return true;
}

static bool
check_features (strata_node *node, struct qcow2_state *s, strata_error **errp)
{
  uint64_t bad = s->incompat & ~QCOW2_INCOMPAT_SUPPORTED;

  if (s->incompat & QCOW2_INCOMPAT_DATA_FILE)
    bad |= QCOW2_INCOMPAT_DATA_FILE;
  for (unsigned bit = 0; bit < 64; bit++) {
    const char *name;
    if (!(bad & (1ull << bit)))
      continue;
    name = qcow2_feature_name (s, 0, bit);
    error_set (errp, ENOTSUP, "%s: incompatible feature bit %u (%s) is not "
               "supported", node->filename, bit, name ? name : "unknown");
    return false;
  }
  return true;
}

/* Check that the table [off, off + bytes) is aligned and inside the file. */
static bool
check_table (strata_node *node, struct qcow2_state *s, const char *what,
             uint64_t off, uint64_t bytes, uint64_t max, uint64_t flen,
             strata_error **errp)
{
  uint64_t end;

  if (bytes > max) {
    error_set (errp, EFBIG, "%s: %s size %" PRIu64 " bytes is too large "
               "(max %" PRIu64 ")", node->filename, what, bytes, max);
    return false;
  }
  if (bytes == 0)
    return true;
  if (off % s->cluster_size) {
    error_set (errp, EINVAL, "%s: %s offset 0x%" PRIx64 " is not aligned to "
               "the cluster size", node->filename, what, off);
    return false;
  }
  if (off == 0) {
    error_set (errp, EINVAL, "%s: %s offset 0x0 overlaps the header",
               node->filename, what);
    return false;
  }
  if (!checked_add_u64 (off, bytes, &end) || end > flen) {
    error_set (errp, EINVAL, "%s: %s offset 0x%" PRIx64 " plus %" PRIu64
               " bytes is past the end of the file (%" PRIu64 " bytes)",
               node->filename, what, off, bytes, flen);
    return false;
  }
  return true;
}

static bool
load_table (strata_node *node, uint64_t off, uint64_t n, uint64_t **out,
            const char *what, strata_error **errp)
{
  CLEANUP_FREE uint8_t *raw = malloc (n ? n * 8 : 1);
  uint64_t *t = calloc (n ? n : 1, sizeof *t);
  int r;

  if (!raw || !t) {
    free (t);
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  if (n && (r = node_pread (node->file, off, raw, n * 8, 0)) < 0) {
    free (t);
    error_set (errp, -r, "%s: cannot read the %s: %s", node->filename, what,
               strerror (-r));
    return false;
  }
  for (uint64_t i = 0; i < n; i++)
    t[i] = be64_load (raw + i * 8);
  *out = t;
  return true;
}

static bool
parse_fields (strata_node *node, struct qcow2_state *s, const uint8_t *h,
              uint64_t flen, strata_error **errp)
{
  const char *fn = node->filename;
  uint64_t l2_span, l1_need, bf_off = be64_load (h + 8), end;
  uint32_t bf_size = be32_load (h + 16), crypt = be32_load (h + 32);

  s->size = be64_load (h + 24);
  s->l1_size = be32_load (h + 36);
  s->l1_offset = be64_load (h + 40);
  s->rt_offset = be64_load (h + 48);
  s->rt_clusters = be32_load (h + 56);
  s->nb_snapshots = be32_load (h + 60);
  if (crypt) {
    error_set (errp, ENOTSUP, "%s: crypt_method %" PRIu32 " (encryption) is "
               "not supported", fn, crypt);
    return false;
  }
  l2_span = s->l2_entries << s->cluster_bits;
  if (s->size > (1ull << 62)) {
    error_set (errp, EFBIG, "%s: size %" PRIu64 " is too large", fn, s->size);
    return false;
  }
  l1_need = (s->size + l2_span - 1) / l2_span;
  if ((uint64_t) s->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
    error_set (errp, EFBIG, "%s: l1_size %" PRIu32 " is too large (max %u "
               "entries)", fn, s->l1_size, QCOW2_MAX_L1_BYTES / 8);
    return false;
  }
  if (s->l1_size < l1_need) {
    error_set (errp, EINVAL, "%s: l1_size %" PRIu32 " is too small for the "
               "virtual size %" PRIu64 " (needs %" PRIu64 ")", fn,
               s->l1_size, s->size, l1_need);
    return false;
  }
  if (!check_table (node, s, "L1 table", s->l1_offset, s->l1_size * 8ull,
                    QCOW2_MAX_L1_BYTES, flen, errp))
    return false;
  if (s->rt_clusters == 0) {
    error_set (errp, EINVAL, "%s: refcount_table_clusters 0 is invalid", fn);
    return false;
  }
  if (!check_table (node, s, "refcount table", s->rt_offset,
                    (uint64_t) s->rt_clusters << s->cluster_bits,
                    QCOW2_MAX_REFTABLE_BYTES, flen, errp))
    return false;
  s->rt_entries = ((uint64_t) s->rt_clusters << s->cluster_bits) / 8;
  if (s->nb_snapshots > 65536) {
    error_set (errp, EINVAL, "%s: nb_snapshots %" PRIu32 " is too large", fn,
               s->nb_snapshots);
    return false;
  }
  if (s->nb_snapshots
      && !check_table (node, s, "snapshot table", be64_load (h + 64), 40,
                       UINT64_MAX, flen, errp))
    return false;
  if (bf_size > QCOW2_MAX_BACKING_NAME) {
    error_set (errp, EINVAL, "%s: backing file name length %" PRIu32
               " is too long (max %d)", fn, bf_size, QCOW2_MAX_BACKING_NAME);
    return false;
  }
  if (bf_off && bf_size) {
    if (!checked_add_u64 (bf_off, bf_size, &end)
        || end > MIN (s->cluster_size, flen)) {
      error_set (errp, EINVAL, "%s: backing file name offset 0x%" PRIx64
                 " length %" PRIu32 " is outside the first cluster", fn,
                 bf_off, bf_size);
      return false;
    }
    if (!(s->backing_name = strndup ((const char *) h + bf_off, bf_size))
        || strlen (s->backing_name) != bf_size) {
      error_set (errp, EINVAL, "%s: backing file name at offset 0x%" PRIx64
                 " contains a NUL byte", fn, bf_off);
      return false;
    }
  }
  return true;
}

bool
qcow2_read_header (strata_node *node, struct qcow2_state *s,
                   strata_error **errp)
{
  const char *fn = node->filename;
  int64_t flen = node_length (node->file);
  uint8_t small[112] = { 0 };
  CLEANUP_FREE uint8_t *h = NULL;
  uint64_t ext_start;
  int r;

  if (flen < 0) {
    error_set (errp, -flen, "%s: cannot get the file size", fn);
    return false;
  }
  /* The magic first, so a short file of another kind is "not qcow2". */
  if (flen > 0
      && (r = node_pread (node->file, 0, small,
                          MIN ((uint64_t) flen, sizeof small), 0)) < 0) {
    error_set (errp, -r, "%s: cannot read the header: %s", fn, strerror (-r));
    return false;
  }
  if (be32_load (small) != QCOW2_MAGIC) {
    /* qemu's words: callers already name the file. */
    error_set (errp, EINVAL, "Image is not in qcow2 format");
    return false;
  }
  if (flen < 72) {
    error_set (errp, EINVAL, "%s: file size %" PRId64 " is too small for a "
               "qcow2 header (72 bytes)", fn, flen);
    return false;
  }
  s->version = be32_load (small + 4);
  if (s->version != 2 && s->version != 3) {
    error_set (errp, ENOTSUP, "%s: version %" PRIu32 " is not supported "
               "(2 or 3)", fn, s->version);
    return false;
  }
  s->cluster_bits = be32_load (small + 20);
  if (s->cluster_bits < QCOW2_MIN_CLUSTER_BITS
      || s->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
    error_set (errp, EINVAL, "%s: cluster_bits %" PRIu32 " is out of range "
               "(%d..%d)", fn, s->cluster_bits, QCOW2_MIN_CLUSTER_BITS,
               QCOW2_MAX_CLUSTER_BITS);
    return false;
  }
  s->cluster_size = 1ull << s->cluster_bits;
  if (s->version == 2) {
    s->header_length = 72;
    s->refcount_order = 4;
  }
  else {
    if (flen < 104) {
      error_set (errp, EINVAL, "%s: file size %" PRId64 " is too small for "
                 "a version 3 header (104 bytes)", fn, flen);
      return false;
    }
    s->incompat = be64_load (small + 72);
    s->compat = be64_load (small + 80);
    s->autoclear = be64_load (small + 88);
    s->refcount_order = be32_load (small + 96);
    s->header_length = be32_load (small + 100);
    if (s->header_length < 104 || s->header_length % 8
        || s->header_length > s->cluster_size
        || s->header_length > (uint64_t) flen) {
      error_set (errp, EINVAL, "%s: header_length %" PRIu32 " is invalid "
                 "(a multiple of 8, 104..min(cluster size, file size))", fn,
                 s->header_length);
      return false;
    }
    if (s->refcount_order > 6) {
      error_set (errp, EINVAL, "%s: refcount_order %" PRIu32 " is out of "
                 "range (0..6)", fn, s->refcount_order);
      return false;
    }
  }
  s->refcount_bits = 1u << s->refcount_order;

  /* Everything else lives in the first cluster. */
  h = calloc (1, s->cluster_size);
  if (!h) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  if ((r = node_pread (node->file, 0, h, MIN (s->cluster_size,
                                              (uint64_t) flen), 0)) < 0) {
    error_set (errp, -r, "%s: cannot read the header: %s", fn, strerror (-r));
    return false;
  }
  if (s->header_length > 104)
    s->compression = h[104];
  if (s->compression > QCOW2_COMP_ZSTD) {
    error_set (errp, ENOTSUP, "%s: compression_type %u is not supported "
               "(0 zlib, 1 zstd)", fn, s->compression);
    return false;
  }
  if (!!s->compression != !!(s->incompat & QCOW2_INCOMPAT_COMPRESSION)) {
    error_set (errp, EINVAL, "%s: compression_type %u does not match the "
               "compression type incompatible bit", fn, s->compression);
    return false;
  }
  ext_start = s->header_length;
  if (!parse_extensions (node, s, h, ext_start, s->cluster_size, errp)
      || !check_features (node, s, errp))
    return false;
  s->ext_l2 = !!(s->incompat & QCOW2_INCOMPAT_EXTL2);
  if (s->ext_l2 && s->cluster_bits < 14) {
    error_set (errp, EINVAL, "%s: cluster_bits %" PRIu32 " is too small for "
               "extended L2 entries (min 14)", fn, s->cluster_bits);
    return false;
  }
  qcow2_derive_geometry (s);
  if (!parse_fields (node, s, h, flen, errp))
    return false;
  s->file_end = ROUND_UP ((uint64_t) flen, s->cluster_size);
  return load_table (node, s->l1_offset, s->l1_size, &s->l1, "L1 table",
                     errp)
         && load_table (node, s->rt_offset, s->rt_entries, &s->rt,
                        "refcount table", errp);
}
