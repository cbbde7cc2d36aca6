/* Unit tests of the qcow2 driver's arithmetic (src/drivers/qcow2/qcow2.h,
 * cluster.c, refcount.c).
 *
 * The pure part runs on a struct qcow2_state filled by hand, at every
 * cluster size (cluster_bits 9..21, standard and extended L2 entries) and
 * every refcount width (refcount_bits 1..64): the L1/L2 indices of guest
 * offsets, the entry masks, the compressed cluster descriptor, the
 * refcount table/block indices and the refcount entries themselves
 * (qcow2_rc_load/qcow2_rc_store, packed from the least significant bit
 * below 8 bits, big-endian from 8).  Each expected value is computed
 * here from qcow2.txt's definitions, not from the driver's helpers.
 *
 * The second part opens small images laid out here byte by byte (a file
 * in the test's temporary directory, no QEMU) and drives the _locked
 * functions under node->lock: refcounts read, raised to their maximum and
 * back, allocated, and L2 entries set and read back through the L1 table
 * at the index the arithmetic names.
 */
#include <inttypes.h>
#include <pthread.h>

#include "block/node.h"
#include "drivers/qcow2/qcow2.h"
#include "test.h"
#include "util/checked.h"

static struct qcow2_state
geometry (unsigned cluster_bits, bool ext_l2, unsigned refcount_bits)
{
  struct qcow2_state s;

  memset (&s, 0, sizeof s);
  s.cluster_bits = cluster_bits;
  s.cluster_size = 1ull << cluster_bits;
  s.ext_l2 = ext_l2;
  s.refcount_bits = refcount_bits;
  qcow2_derive_geometry (&s);
  return s;
}

static void
test_geometry_at_every_cluster_size (void)
{
  for (unsigned cb = QCOW2_MIN_CLUSTER_BITS; cb <= QCOW2_MAX_CLUSTER_BITS;
       cb++) {
    for (int ext = 0; ext < 2; ext++) {
      struct qcow2_state s = geometry (cb, ext, 16);
      uint64_t cs = 1ull << cb;

      CHECK (s.l2_entry_size == (ext ? 16u : 8u));
      CHECK (s.l2_entries * s.l2_entry_size == cs);
      CHECK (s.subcluster_size == (ext ? cs / 32 : cs));
      /* 16-bit refcounts: a block holds cluster_size / 2 of them. */
      CHECK (s.rc_per_block == cs / 2);
    }
  }
}

static void
test_l1_l2_index (void)
{
  for (unsigned cb = QCOW2_MIN_CLUSTER_BITS; cb <= QCOW2_MAX_CLUSTER_BITS;
       cb++) {
    for (int ext = 0; ext < 2; ext++) {
      struct qcow2_state s = geometry (cb, ext, 16);
      uint64_t cs = 1ull << cb, n = cs / (ext ? 16 : 8);
      uint64_t span = n * cs; /* guest bytes one L2 table maps */
      const uint64_t offs[] = { 0,
                                1,
                                cs - 1,
                                cs,
                                span - 1,
                                span,
                                span + cs,
                                3 * span + 5 * cs + 7,
                                (1ull << 50) + cs * (n - 1) };

      for (size_t i = 0; i < sizeof offs / sizeof offs[0]; i++) {
        uint64_t o = offs[i];
        CHECK (qcow2_l1_index (&s, o) == o / span);
        CHECK (qcow2_l2_index (&s, o) == (o % span) / cs);
        /* The two indices and the offset in the cluster give it back. */
        CHECK (qcow2_l1_index (&s, o) * span + qcow2_l2_index (&s, o) * cs
                   + (o & (cs - 1))
               == o);
      }
      CHECK (qcow2_l2_index (&s, span - 1) == n - 1);
      CHECK (qcow2_l1_index (&s, span - 1) == 0);
      CHECK (qcow2_l1_index (&s, span) == 1 && qcow2_l2_index (&s, span) == 0);
    }
  }
}

static void
test_entry_masks (void)
{
  /* qcow2.txt: host offsets are bits 9-55; L1 entries reserve bits 0-8
   * and 56-62; standard L2 entries bits 1-8 and 56-61. */
  uint64_t off = 0;
  for (int b = 9; b <= 55; b++)
    off |= 1ull << b;
  CHECK (QCOW2_OFFSET_MASK == off);
  CHECK (QCOW2_MAX_OFFSET == 1ull << 56);
  CHECK ((QCOW2_L1_RESERVED | QCOW2_OFFSET_MASK | QCOW2_OFLAG_COPIED)
         == UINT64_MAX);
  CHECK ((QCOW2_L1_RESERVED & (QCOW2_OFFSET_MASK | QCOW2_OFLAG_COPIED)) == 0);
  CHECK ((QCOW2_L2_RESERVED | QCOW2_OFFSET_MASK | QCOW2_OFLAG_COPIED
          | QCOW2_OFLAG_COMPRESSED | QCOW2_OFLAG_ZERO)
         == UINT64_MAX);
  CHECK ((QCOW2_L2_RESERVED
          & (QCOW2_OFFSET_MASK | QCOW2_OFLAG_COPIED | QCOW2_OFLAG_COMPRESSED
             | QCOW2_OFLAG_ZERO))
         == 0);
  CHECK ((QCOW2_BITMAP_ALLOC_ALL ^ QCOW2_BITMAP_ZERO_ALL) == UINT64_MAX);
}

static void
test_compressed_descriptor (void)
{
  for (unsigned cb = QCOW2_MIN_CLUSTER_BITS; cb <= QCOW2_MAX_CLUSTER_BITS;
       cb++) {
    struct qcow2_state s = geometry (cb, false, 16);
    unsigned x = 62 - (cb - 8);
    uint64_t cs = 1ull << cb;
    /* (host byte offset, compressed length) pairs: within one sector,
     * across sectors, ending exactly on a sector, a whole cluster plus
     * one unaligned sector (the most a compressed cluster may take). */
    const uint64_t cases[][2] = {
      { cs, 1 },       { cs + 100, 400 },   { cs + 511, 2 },
      { 3 * cs, 512 }, { 5 * cs + 17, cs }, { (1ull << x) - 600, 512 },
    };

    CHECK (qcow2_csize_shift (&s) == x);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
      uint64_t host = cases[i][0], len = cases[i][1];
      uint64_t e = qcow2_compressed_entry (&s, host, len);
      uint64_t sectors = (host + len - 1) / 512 - host / 512;

      CHECK (e & QCOW2_OFLAG_COMPRESSED);
      CHECK (!(e & QCOW2_OFLAG_COPIED));
      CHECK (qcow2_compressed_offset (&s, e) == host);
      CHECK (qcow2_compressed_sectors (&s, e) == sectors);
      /* The fields as qcow2.txt lays them out. */
      CHECK ((e & ((1ull << x) - 1)) == host);
      CHECK (((e >> x) & ((1ull << (62 - x)) - 1)) == sectors);
      /* The sectors cover the data and end in the sector of its last
       * byte. */
      CHECK ((host & ~511ull) + (sectors + 1) * 512 >= host + len);
      CHECK ((host & ~511ull) + sectors * 512 < host + len);
    }
    /* The sector count field is cluster_bits - 8 bits wide: a cluster's
     * worth of bytes at an unaligned offset (cs / 512 sectors after the
     * first) always fits. */
    CHECK (62 - x == cb - 8);
    CHECK (cs / 512 <= (1ull << (62 - x)) - 1);
  }
}

static void
test_refcount_indices (void)
{
  for (unsigned cb = QCOW2_MIN_CLUSTER_BITS; cb <= QCOW2_MAX_CLUSTER_BITS;
       cb++) {
    for (unsigned order = 0; order <= 6; order++) {
      unsigned bits = 1u << order;
      struct qcow2_state s = geometry (cb, false, bits);
      uint64_t per_block = (1ull << cb) * 8 / bits;
      const uint64_t idx[] = {
        0, 1, per_block - 1, per_block, 7 * per_block + 3, (1ull << 40) + 5
      };

      CHECK (s.rc_per_block == per_block);
      for (size_t i = 0; i < sizeof idx / sizeof idx[0]; i++) {
        CHECK (qcow2_rt_index (&s, idx[i]) == idx[i] / per_block);
        CHECK (qcow2_rb_index (&s, idx[i]) == idx[i] % per_block);
        CHECK (qcow2_rt_index (&s, idx[i]) * per_block
                   + qcow2_rb_index (&s, idx[i])
               == idx[i]);
      }
      CHECK (qcow2_rc_max (&s)
             == (bits == 64 ? UINT64_MAX : (1ull << bits) - 1));
    }
  }
}

/* A value of BITS bits that differs per entry J and uses the top bit. */
static uint64_t
pattern (unsigned bits, uint64_t j)
{
  uint64_t max = bits == 64 ? UINT64_MAX : (1ull << bits) - 1;
  return ((j + 1) * 0x9e3779b97f4a7c15ull ^ (j << 7)) & max;
}

/* Entry J of a block with entries of BITS bits, as qcow2.txt defines it:
 * below 8 bits packed from the least significant bit of each byte, from 8
 * on big-endian bytes. */
static uint64_t
spec_load (const uint8_t *blk, unsigned bits, uint64_t j)
{
  uint64_t v = 0;

  if (bits < 8)
    return (blk[j * bits / 8] >> (j * bits % 8)) & ((1u << bits) - 1);
  for (unsigned k = 0; k < bits / 8; k++)
    v = v << 8 | blk[j * bits / 8 + k];
  return v;
}

static void
test_refcount_entries_at_every_width (void)
{
  for (unsigned order = 0; order <= 6; order++) {
    unsigned bits = 1u << order;
    struct qcow2_state s = geometry (9, false, bits);
    uint64_t n = s.rc_per_block, max = qcow2_rc_max (&s);
    uint8_t blk[512], before[512];

    /* Every entry set, in an order that mixes neighbours. */
    memset (blk, 0, sizeof blk);
    for (uint64_t k = 0; k < n; k++) {
      uint64_t j = (k * 37) % n, first;
      unsigned len;

      memcpy (before, blk, sizeof blk);
      qcow2_rc_store (&s, blk, j, pattern (bits, j), &first, &len);
      /* Only bytes within [first, first + len) changed, and they hold
       * entry J. */
      CHECK (len == (bits < 8 ? 1 : bits / 8));
      CHECK (first == j * bits / 8);
      CHECK (memcmp (blk, before, first) == 0);
      CHECK (memcmp (blk + first + len, before + first + len,
                     sizeof blk - first - len)
             == 0);
    }
    for (uint64_t j = 0; j < n; j++) {
      CHECK (qcow2_rc_load (&s, blk, j) == pattern (bits, j));
      CHECK (spec_load (blk, bits, j) == pattern (bits, j));
    }
    /* The maximum and zero, at the first and last entry. */
    for (int end = 0; end < 2; end++) {
      uint64_t j = end ? n - 1 : 0, first;
      unsigned len;

      qcow2_rc_store (&s, blk, j, max, &first, &len);
      CHECK (qcow2_rc_load (&s, blk, j) == max);
      qcow2_rc_store (&s, blk, j, 0, &first, &len);
      CHECK (qcow2_rc_load (&s, blk, j) == 0);
      CHECK (qcow2_rc_load (&s, blk, end ? j - 1 : 1)
             == pattern (bits, end ? j - 1 : 1));
    }
  }
}

static void
test_refcount_byte_layout (void)
{
  uint8_t blk[16];
  uint64_t first;
  unsigned len;
  struct qcow2_state s1 = geometry (9, false, 1);
  struct qcow2_state s4 = geometry (9, false, 4);
  struct qcow2_state s16 = geometry (9, false, 16);
  struct qcow2_state s64 = geometry (9, false, 64);

  memset (blk, 0, sizeof blk);
  qcow2_rc_store (&s1, blk, 0, 1, &first, &len);
  qcow2_rc_store (&s1, blk, 9, 1, &first, &len);
  CHECK (blk[0] == 0x01 && blk[1] == 0x02);
  memset (blk, 0, sizeof blk);
  qcow2_rc_store (&s4, blk, 1, 0xa, &first, &len);
  qcow2_rc_store (&s4, blk, 2, 0x3, &first, &len);
  CHECK (blk[0] == 0xa0 && blk[1] == 0x03);
  memset (blk, 0, sizeof blk);
  qcow2_rc_store (&s16, blk, 1, 0x0102, &first, &len);
  CHECK (blk[2] == 0x01 && blk[3] == 0x02 && first == 2 && len == 2);
  memset (blk, 0, sizeof blk);
  qcow2_rc_store (&s64, blk, 1, 0x0102030405060708ull, &first, &len);
  CHECK (first == 8 && len == 8);
  for (int k = 0; k < 8; k++)
    CHECK (blk[8 + k] == k + 1);
}

/* ---- on an image: the _locked functions ---- */

/* Entry J := V in a block of BITS-bit entries, as qcow2.txt lays it out. */
static void
spec_store (uint8_t *blk, unsigned bits, uint64_t j, uint64_t v)
{
  if (bits < 8) {
    unsigned shift = j * bits % 8, mask = ((1u << bits) - 1) << shift;
    blk[j * bits / 8] = (blk[j * bits / 8] & ~mask) | ((v << shift) & mask);
    return;
  }
  for (unsigned k = bits / 8; k-- > 0; v >>= 8)
    blk[j * bits / 8 + k] = v & 0xff;
}

/* A fresh qcow2 v3 image of SIZE bytes with 2^CB-byte clusters and
 * 2^ORDER-bit refcounts, laid out by hand (strata_create makes 16-bit
 * refcounts only): header, refcount table, one refcount block, L1 table.
 * Returns the node opened read-write. */
static strata_node *
open_image (const char *name, unsigned cb, unsigned order, uint64_t size)
{
  uint64_t cs = 1ull << cb, l2_span = (cs / 8) * cs;
  uint64_t l1_size = (size + l2_span - 1) / l2_span;
  uint64_t l1_clusters = (l1_size * 8 + cs - 1) / cs;
  uint64_t nclusters = 3 + l1_clusters;
  uint8_t *img = calloc (nclusters, cs);
  char *path;
  int fd;
  strata_error *err = NULL;
  strata_node *n;

  CHECK (img && nclusters <= cs * 8 >> order);
  be32_store (img + 0, QCOW2_MAGIC);
  be32_store (img + 4, 3);   /* version */
  be32_store (img + 20, cb); /* cluster_bits */
  be64_store (img + 24, size);
  be32_store (img + 36, (uint32_t)l1_size);
  be64_store (img + 40, 3 * cs); /* L1 table */
  be64_store (img + 48, 1 * cs); /* refcount table */
  be32_store (img + 56, 1);      /* its clusters */
  be32_store (img + 96, order);  /* refcount_order */
  be32_store (img + 100, 104);   /* header_length */
  be64_store (img + cs, 2 * cs); /* refcount block 0 */
  for (uint64_t c = 0; c < nclusters; c++)
    spec_store (img + 2 * cs, 1u << order, c, 1);
  if (asprintf (&path, "%s/%s", test_tmpdir (), name) < 0)
    abort ();
  fd = open (path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
  CHECK (fd >= 0);
  CHECK (write (fd, img, nclusters * cs) == (ssize_t)(nclusters * cs));
  close (fd);
  free (img);
  n = strata_open (path, "qcow2", NULL, STRATA_OPEN_RDWR, &err);
  if (!n)
    fprintf (stderr, "%s: %s\n", path, strata_error_message (err));
  free (path);
  CHECK (n && strcmp (n->drv->name, "qcow2") == 0);
  return n;
}

static void
test_refcounts_on_an_image_at_every_width (void)
{
  for (unsigned order = 0; order <= 6; order++) {
    unsigned bits = 1u << order;
    char name[32];
    strata_node *n;
    struct qcow2_state *s;
    uint64_t rc, max;
    int64_t host;

    snprintf (name, sizeof name, "rc%u.qcow2", bits);
    n = open_image (name, 12, order, 4 << 20);
    s = n->opaque;
    CHECK (s->refcount_bits == bits && s->rc_per_block == 4096 * 8 / bits);
    max = qcow2_rc_max (s);
    pthread_mutex_lock (&n->lock);
    /* The header cluster is referenced once; far past the end nothing. */
    CHECK (qcow2_refcount_get_locked (n, 0, &rc) == 0 && rc == 1);
    CHECK (qcow2_refcount_get_locked (n, 1ull << 30, &rc) == 0 && rc == 0);
    /* A new cluster starts at 1 and goes up to the width's maximum. */
    host = qcow2_alloc_cluster_locked (n);
    CHECK (host > 0 && host % 4096 == 0);
    CHECK (qcow2_refcount_get_locked (n, host / 4096, &rc) == 0 && rc == 1);
    if (bits <= 4) {
      for (uint64_t v = 1; v < max; v++)
        CHECK (qcow2_refcount_update_locked (n, host, 1) == 0);
      CHECK (qcow2_refcount_get_locked (n, host / 4096, &rc) == 0
             && rc == max);
      /* One more does not fit: refused, the count unchanged. */
      CHECK (qcow2_refcount_update_locked (n, host, 1) < 0);
      CHECK (qcow2_refcount_get_locked (n, host / 4096, &rc) == 0
             && rc == max);
      for (uint64_t v = max; v > 1; v--)
        CHECK (qcow2_refcount_update_locked (n, host, -1) == 0);
    }
    else {
      CHECK (qcow2_refcount_update_locked (n, host, 1) == 0);
      CHECK (qcow2_refcount_get_locked (n, host / 4096, &rc) == 0 && rc == 2);
      CHECK (qcow2_refcount_update_locked (n, host, -1) == 0);
    }
    CHECK (qcow2_refcount_get_locked (n, host / 4096, &rc) == 0 && rc == 1);
    /* The neighbours of the cluster kept their counts. */
    CHECK (qcow2_refcount_get_locked (n, host / 4096 + 1, &rc) == 0
           && rc == 0);
    CHECK (qcow2_refcount_update_locked (n, host, -1) == 0);
    CHECK (qcow2_refcount_get_locked (n, host / 4096, &rc) == 0 && rc == 0);
    /* Below zero is refused. */
    CHECK (qcow2_refcount_update_locked (n, host, -1) < 0);
    pthread_mutex_unlock (&n->lock);
    strata_close (n);
  }
}

static void
test_l2_entries_through_the_l1_table (void)
{
  const unsigned cbs[] = { 9, 12, 16 };

  for (size_t c = 0; c < sizeof cbs / sizeof cbs[0]; c++) {
    uint64_t cs = 1ull << cbs[c];
    char name[32];
    strata_node *n;
    struct qcow2_state *s;
    uint64_t span, offs[3];

    snprintf (name, sizeof name, "l2-%u.qcow2", cbs[c]);
    n = open_image (name, cbs[c], 4, 64 << 20);
    s = n->opaque;
    span = s->l2_entries * cs;
    /* The first entry, the last of the first table, one further on. */
    offs[0] = 0;
    offs[1] = MIN (span, s->size) - cs;
    offs[2] = MIN (5 * span + 3 * cs, s->size) - cs;
    pthread_mutex_lock (&n->lock);
    for (int i = 0; i < 3; i++) {
      uint64_t entry, bitmap, l2_offset, e;
      int64_t host = qcow2_alloc_cluster_locked (n);

      CHECK (host > 0);
      e = QCOW2_OFLAG_COPIED | (uint64_t)host;
      CHECK (qcow2_set_l2_entry_locked (n, offs[i], e, 0) == 0);
      CHECK (
          qcow2_get_l2_entry_locked (n, offs[i], &entry, &bitmap, &l2_offset)
          == 0);
      CHECK (entry == e && bitmap == 0);
      /* The L2 table is the one the L1 entry at the computed index names,
       * and the entry sits at the computed index in it. */
      CHECK (l2_offset != 0
             && (s->l1[qcow2_l1_index (s, offs[i])] & QCOW2_OFFSET_MASK)
                    == l2_offset);
      /* The next cluster of the guest is still unallocated. */
      if (offs[i] + cs < s->size) {
        CHECK (qcow2_get_l2_entry_locked (n, offs[i] + cs, &entry, &bitmap,
                                          &l2_offset)
               == 0);
        CHECK (entry == 0);
      }
    }
    pthread_mutex_unlock (&n->lock);
    CHECK (strata_flush (n, 0) == 0);
    strata_close (n);
  }
}

TESTS (T (test_geometry_at_every_cluster_size), T (test_l1_l2_index),
       T (test_entry_masks), T (test_compressed_descriptor),
       T (test_refcount_indices), T (test_refcount_entries_at_every_width),
       T (test_refcount_byte_layout),
       T (test_refcounts_on_an_image_at_every_width),
       T (test_l2_entries_through_the_l1_table))
