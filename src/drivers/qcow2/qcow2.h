/* strata: qcow2 format driver, shared definitions.
 *
 * Implemented from QEMU's docs/interop/qcow2.txt (versions 2 and 3).  The
 * image is a header cluster, a two-level map from guest clusters to host
 * clusters (L1 table -> L2 tables -> data clusters) and a two-level table
 * of reference counts (refcount table -> refcount blocks) for every host
 * cluster:
 *
 *   guest offset --L1 index--> L2 table --L2 index--> host cluster
 *   host cluster --rt index--> refcount block --index--> refcount
 *
 * Files: header.c (header and extensions), cache.c (metadata table
 * cache), cluster.c (guest->host map), refcount.c (refcounts and cluster
 * allocation), compress.c (compressed clusters), io.c (the data path),
 * resize.c (growing), check.c (consistency check and repair), overlap.c
 * (metadata overlap protection), bitmaps.c (persistent bitmaps' directory),
 * bitmaps-persist.c (loading and storing them), qcow2.c (open,
 * backing chain, the driver table).
 *
 * Locking: node->lock protects everything in struct qcow2_state except
 * the immutable header fields.  Functions with a _locked suffix expect it
 * held.  Metadata reaches the file in the order "refcount, then data,
 * flush, then the L2 entry that points at it" (written through, or for
 * allocating writes written back from the cache at flush; cache.c), so a
 * crash can leak clusters but never map garbage.
 */
#ifndef STRATA_QCOW2_H
#define STRATA_QCOW2_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "block/node.h"
#include "block/tracker.h"
#include "util/bytes.h"

#define QCOW2_MAGIC 0x514649fbu  /* "QFI\xfb" */

#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_MAX_BACKING_NAME 1023
/* Bounds on tables loaded whole into memory, as QEMU keeps them. */
#define QCOW2_MAX_L1_BYTES        (32u << 20)
#define QCOW2_MAX_REFTABLE_BYTES  (8u << 20)
#define QCOW2_MAX_CHAIN_DEPTH 256
#define QCOW2_MAX_L2_CACHE_BYTES  (256ull << 20)
/* The L2 cache's defaults (qcow2.c): slices of 4 KiB (at most a cluster),
 * and at most 1 MiB of them per image. */
#define QCOW2_L2_SLICE_DEFAULT    4096ull
#define QCOW2_L2_CACHE_DEFAULT    (1ull << 20)
#define QCOW2_MAX_OFFSET (1ull << 56) /* offsets are bits 9-55 */

/* Feature bits (header bytes 72-95). */
#define QCOW2_INCOMPAT_DIRTY       (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT     (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE   (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2       (1ull << 4)
#define QCOW2_INCOMPAT_SUPPORTED \
  (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT \
   | QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2)
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)

/* Header extension types. */
#define QCOW2_EXT_END            0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE  0x6803f857u

/* L1/L2 entry bits. */
#define QCOW2_OFLAG_COPIED     (1ull << 63)
#define QCOW2_OFLAG_COMPRESSED (1ull << 62)
#define QCOW2_OFLAG_ZERO       (1ull << 0)
#define QCOW2_OFFSET_MASK      0x00fffffffffffe00ull
#define QCOW2_L1_RESERVED      0x7f000000000001ffull
#define QCOW2_L2_RESERVED      0x3f000000000001feull

#define QCOW2_SUBCLUSTERS 32
#define QCOW2_BITMAP_ALLOC_ALL 0xffffffffull
#define QCOW2_BITMAP_ZERO_ALL  0xffffffff00000000ull

enum qcow2_compression { QCOW2_COMP_ZLIB = 0, QCOW2_COMP_ZSTD = 1 };

struct qcow2_ext {            /* a header extension kept for rewrites */
  uint32_t type;
  uint32_t len;
  uint8_t *data;
};

struct qcow2_feature_name {
  uint8_t type;               /* 0 incompatible, 1 compatible, 2 autoclear */
  uint8_t bit;
  char name[47];
};

/* A cache of cluster-sized metadata tables keyed by host offset. */
struct qcow2_cache_entry {
  uint64_t offset;            /* 0 = empty slot */
  uint64_t lru;
  uint8_t *buf;
  bool dirty;                 /* changed since written (cache.c) */
  int next;                   /* hash chain: next entry index, -1 = end */
};
struct qcow2_cache {
  struct qcow2_cache_entry *e;
  unsigned n;
  int *bucket;                /* hash of offset -> first entry, -1 = none */
  unsigned nbuckets;          /* a power of two */
  int last;                   /* entry of the last hit, -1 = none */
  unsigned ndirty;
  uint64_t tick;
  size_t table_size;
};

/* Sorted host cluster indices of one kind of metadata (overlap.c). */
struct qcow2_meta_set {
  uint64_t *idx;
  size_t n, cap;
};

/* Copy-on-write buffers a node keeps (io.c): enough for the requests
 * that run at once on a few cores. */
#define QCOW2_COW_SPARES 4

struct qcow2_state {
  /* Immutable after open. */
  uint32_t version;
  uint32_t cluster_bits;
  uint64_t cluster_size;
  uint64_t size;              /* virtual size */
  uint32_t l1_size;
  uint64_t l1_offset;
  uint32_t nb_snapshots;
  uint64_t incompat, compat, autoclear;
  uint32_t refcount_order, refcount_bits;
  uint32_t header_length;
  uint8_t compression;
  bool ext_l2;
  uint32_t l2_entry_size;     /* 8 or 16 bytes */
  uint64_t l2_entries;        /* entries per L2 table */
  uint64_t subcluster_size;
  uint64_t rc_per_block;      /* refcounts per refcount block */
  /* The L2 cache holds slices of L2 tables (QEMU's l2-cache-entry-size:
   * a power of two from 512 bytes to the cluster size), set at open. */
  uint64_t l2_slice_size;
  uint64_t l2_slice_entries;  /* entries per slice */
  char *backing_name;
  char *backing_format;
  struct qcow2_ext *exts;     /* unknown extensions, preserved */
  unsigned nexts;
  struct qcow2_feature_name *features;
  unsigned nfeatures;

  /* Protected by node->lock. */
  uint64_t *l1;               /* host byte order */
  uint64_t rt_offset;
  uint32_t rt_clusters;
  uint64_t *rt;               /* refcount table, host byte order */
  uint64_t rt_entries;
  uint64_t free_hint;         /* no free cluster below this index */
  uint64_t file_end;          /* bytes; allocation may extend the file */
  uint64_t compressed_next;   /* next free byte in the host cluster being
                                 filled with compressed data, or 0 */
  struct qcow2_cache l2_cache;
  struct qcow2_cache rc_cache;
  struct qcow2_meta_set meta_rb;   /* refcount blocks */
  struct qcow2_meta_set meta_l2;   /* L2 tables, active and snapshots' */
  struct qcow2_meta_set meta_snap; /* snapshot table, snapshot L1 tables */
  atomic_bool writes_refused;      /* a metadata overlap was caught */
  /* Whether the image looks metadata-preallocated, decided at the first
   * block status (qcow2_block_status): 0 not yet, 1 no, 2 yes. */
  atomic_int prealloc_guess;

  /* compress.c's threads, started at the first compressed write (under
   * node->lock; the pool has its own lock). */
  struct compress_pool *compress_pool;
  bool compress_pool_failed;

  struct tracker clusters;    /* guest-cluster-granular request tracker */
  /* Cluster buffers of finished copy-on-writes, kept for the next ones
   * (io.c; taken and given back with atomic exchanges, no lock). */
  _Atomic (uint8_t *) cow_spare[QCOW2_COW_SPARES];
  /* Refcount increments stay dirty in the cache until the caller writes
   * them back (many at once: snapshot create and apply). */
  bool defer_increments;

  /* bitmaps-persist.c, under node->lock: the directory on disk (NULL:
   * none), why the bitmaps could not be loaded (a read-only open goes on
   * without them), and whether they are marked in use (stored at close). */
  struct qcow2_bitmap_dir *bm_dir;
  strata_error *bm_load_err;
  bool bm_writable;
};

/* The format's arithmetic: pure functions of the immutable header fields
 * (tests/unit/test-qcow2-arith.c checks them at every cluster size and
 * refcount width). */

/* The derived fields, from cluster_bits, cluster_size, ext_l2 and
 * refcount_bits (header.c at open). */
static inline void
qcow2_derive_geometry (struct qcow2_state *s)
{
  s->l2_entry_size = s->ext_l2 ? 16 : 8;
  s->l2_entries = s->cluster_size / s->l2_entry_size;
  s->subcluster_size = s->ext_l2 ? s->cluster_size / QCOW2_SUBCLUSTERS
                                 : s->cluster_size;
  s->rc_per_block = s->cluster_size * 8 / s->refcount_bits;
  /* Whole tables until open chooses the slice size. */
  s->l2_slice_size = s->cluster_size;
  s->l2_slice_entries = s->l2_entries;
}

/* Guest OFFSET's L1 entry, and its entry in that L2 table. */
static inline uint64_t
qcow2_l1_index (const struct qcow2_state *s, uint64_t offset)
{
  return (offset >> s->cluster_bits) / s->l2_entries;
}
static inline uint64_t
qcow2_l2_index (const struct qcow2_state *s, uint64_t offset)
{
  return (offset >> s->cluster_bits) % s->l2_entries;
}

/* The host offset of the slice of the L2 table at L2_OFFSET that holds
 * guest OFFSET's entry: the L2 cache's key for it. */
static inline uint64_t
qcow2_l2_slice_offset (const struct qcow2_state *s, uint64_t l2_offset,
                       uint64_t offset)
{
  /* Entries per table and per slice are powers of two. */
  uint64_t i = (offset >> s->cluster_bits) & (s->l2_entries - 1);
  return l2_offset + (i & ~(s->l2_slice_entries - 1)) * s->l2_entry_size;
}

/* Host cluster IDX's refcount table entry (which refcount block), and its
 * entry in that block. */
static inline uint64_t
qcow2_rt_index (const struct qcow2_state *s, uint64_t idx)
{
  return idx / s->rc_per_block;
}
static inline uint64_t
qcow2_rb_index (const struct qcow2_state *s, uint64_t idx)
{
  return idx % s->rc_per_block;
}

/* The largest refcount refcount_bits holds. */
static inline uint64_t
qcow2_rc_max (const struct qcow2_state *s)
{
  return s->refcount_bits == 64 ? UINT64_MAX
                                : (1ull << s->refcount_bits) - 1;
}

/* A compressed cluster descriptor (bits 0-61 of its L2 entry): with
 * x = 62 - (cluster_bits - 8), bits 0..x-1 are the host byte offset of
 * the compressed data and bits x..61 the number of 512-byte sectors it
 * spans after the first one. */
static inline unsigned
qcow2_csize_shift (const struct qcow2_state *s)
{
  return 62 - (s->cluster_bits - 8);
}
static inline uint64_t
qcow2_compressed_offset (const struct qcow2_state *s, uint64_t entry)
{
  return entry & ((1ull << qcow2_csize_shift (s)) - 1);
}
static inline uint64_t
qcow2_compressed_sectors (const struct qcow2_state *s, uint64_t entry)
{
  unsigned x = qcow2_csize_shift (s);
  return (entry >> x) & ((1ull << (62 - x)) - 1);
}
/* The L2 entry for LEN (> 0) compressed bytes at host byte offset HOST. */
static inline uint64_t
qcow2_compressed_entry (const struct qcow2_state *s, uint64_t host,
                        uint64_t len)
{
  uint64_t nsec = ((host + len - 1) >> 9) - (host >> 9);
  return QCOW2_OFLAG_COMPRESSED | nsec << qcow2_csize_shift (s) | host;
}

/* header.c */
bool qcow2_read_header (strata_node *node, struct qcow2_state *s,
                        strata_error **errp);
void qcow2_free_header (struct qcow2_state *s);
int qcow2_write_header_field (strata_node *node, uint64_t off,
                              const void *buf, size_t len);
const char *qcow2_feature_name (const struct qcow2_state *s, uint8_t type,
                                uint8_t bit);

/* cache.c */
bool qcow2_cache_init (struct qcow2_cache *c, unsigned n, size_t table_size);
void qcow2_cache_destroy (struct qcow2_cache *c);
/* Return the table at OFFSET, reading it when absent; the pointer is valid
 * until the next cache call.  Caller holds node->lock. */
int qcow2_cache_get_locked (strata_node *node, struct qcow2_cache *c,
                            uint64_t offset, uint8_t **table);
/* The table at OFFSET when it is the last one used (no call, for the hot
 * lookups), else NULL: then qcow2_cache_get_locked. */
static inline uint8_t *
qcow2_cache_last_locked (struct qcow2_cache *c, uint64_t offset)
{
  struct qcow2_cache_entry *e = c->last >= 0 ? &c->e[c->last] : NULL;

  if (!e || e->offset != offset)
    return NULL;
  e->lru = ++c->tick;
  return e->buf;
}
/* Install a freshly written table without reading it. */
int qcow2_cache_put_locked (strata_node *node, struct qcow2_cache *c,
                            uint64_t offset, const uint8_t *table);
/* The cached table at OFFSET, or NULL; loads nothing, evicts nothing. */
uint8_t *qcow2_cache_peek_locked (struct qcow2_cache *c, uint64_t offset);
/* Drop a clean table (after a failed write; a dirty one stays). */
void qcow2_cache_forget_locked (struct qcow2_cache *c, uint64_t offset);
/* The cached table at OFFSET has changes that are not on disk. */
void qcow2_cache_mark_dirty_locked (struct qcow2_cache *c, uint64_t offset);
/* Write dirty refcount blocks. */
int qcow2_writeback_refcounts_locked (strata_node *node);
/* Write dirty refcount blocks, flush, write dirty L2 tables (not flushed
 * after: the caller flushes when it needs them durable). */
int qcow2_writeback_locked (strata_node *node);

/* cluster.c */
enum qcow2_ctype {
  QCOW2_UNALLOCATED,  /* read from the backing file */
  QCOW2_ZERO,         /* reads as zeros */
  QCOW2_NORMAL,       /* data at host offset */
  QCOW2_COMPRESSED,   /* compressed data at host offset */
};
struct qcow2_extent {
  enum qcow2_ctype type;
  uint64_t bytes;             /* guest bytes covered from the offset */
  uint64_t host;              /* host offset of the first byte: NORMAL,
                                 and ZERO or UNALLOCATED units of a
                                 cluster that has one; else 0 */
  uint64_t coffset, csize;    /* COMPRESSED: where the compressed bytes are */
};
/* Describe the guest range starting at OFFSET (at most LEN bytes). */
int qcow2_get_extent_locked (strata_node *node, uint64_t offset,
                             uint64_t len, struct qcow2_extent *ext);
/* Raw L2 entry (and bitmap) of the guest cluster at OFFSET; *l2_offset is
 * 0 when no L2 table exists. */
int qcow2_get_l2_entry_locked (strata_node *node, uint64_t offset,
                               uint64_t *entry, uint64_t *bitmap,
                               uint64_t *l2_offset);
/* Set the L2 entry of the guest cluster at OFFSET, allocating its L2
 * table when needed. */
int qcow2_set_l2_entry_locked (strata_node *node, uint64_t offset,
                               uint64_t entry, uint64_t bitmap);
/* The same, left dirty in the cache (cache.c): for an entry that maps a
 * cluster from qcow2_alloc_data_cluster_locked (or reused in place) whose
 * data is written, and whose old mapping needs no freeing. */
int qcow2_set_l2_entry_deferred_locked (strata_node *node, uint64_t offset,
                                        uint64_t entry, uint64_t bitmap);
/* Whole L2 tables, for the code that reads or rewrites one at a time
 * (COW, snapshots, amend, resize, make_empty) while the cache holds
 * slices: a copy of the table at L2_OFFSET into BUF (cluster_size bytes;
 * cached slices, which may be dirty, win over the file); after TABLE was
 * written whole to the file, the cached slices take its bytes; and
 * dropping the clean cached slices of a table. */
int qcow2_l2_read_table_locked (strata_node *node, uint64_t l2_offset,
                                uint8_t *buf);
void qcow2_l2_put_table_locked (strata_node *node, uint64_t l2_offset,
                                const uint8_t *table);
void qcow2_l2_forget_table_locked (strata_node *node, uint64_t l2_offset);
/* snapshot.c: the open option x-snapshot-id/x-snapshot-name. */
bool qcow2_snapshot_load_tmp (strata_node *node, const char *id,
                              const char *name, strata_error **errp);
/* Give guest OFFSET an L2 table (a new empty one, or its own copy of one
 * a snapshot shares); returns its host offset or a negative errno. */
int64_t qcow2_ensure_l2_table_locked (strata_node *node, uint64_t offset);
int qcow2_check_l2_entry (strata_node *node, uint64_t offset,
                          uint64_t entry, uint64_t bitmap);

/* refcount.c */
/* Refcount entry J of a refcount block (any refcount_bits), and storing
 * one: the bytes changed are [*first, *first + *n). */
uint64_t qcow2_rc_load (const struct qcow2_state *s, const uint8_t *blk,
                        uint64_t j);
void qcow2_rc_store (const struct qcow2_state *s, uint8_t *blk, uint64_t j,
                     uint64_t v, uint64_t *first, unsigned *n);
int qcow2_refcount_get_locked (strata_node *node, uint64_t cluster_index,
                               uint64_t *rc);
/* Drop one reference from every cluster of [OFF, OFF+BYTES). */
int qcow2_free_clusters_locked (strata_node *node, uint64_t off,
                                uint64_t bytes);
/* *COUNT: how many of host clusters [0, END) have a refcount, counted up
 * to LIMIT at most (and less when LIMIT is out of reach); one look at
 * each refcount block. */
int qcow2_refcount_count_locked (strata_node *node, uint64_t end,
                                 uint64_t limit, uint64_t *count);
int qcow2_refcount_update_locked (strata_node *node, uint64_t host_offset,
                                  int delta);
/* Allocate one cluster with refcount 1; returns its host offset (> 0) or a
 * negative errno.  The refcount is on disk (not yet flushed). */
int64_t qcow2_alloc_cluster_locked (strata_node *node);
/* The same for a data cluster whose L2 entry will be set with
 * qcow2_set_l2_entry_deferred_locked: the refcount is left dirty in the
 * cache (cache.c), written before that entry. */
int64_t qcow2_alloc_data_cluster_locked (strata_node *node);
/* Take the host cluster at HOST the same way when it is free (a
 * compressed cluster running on into the next host cluster): 1 when it
 * was taken, 0 when it is in use, or a negative errno. */
int qcow2_alloc_data_cluster_at_locked (strata_node *node, uint64_t host);
/* One more reference to HOST's cluster, left dirty in the cache as the
 * two above leave theirs (another compressed cluster packed into it). */
int qcow2_refcount_inc_deferred_locked (strata_node *node, uint64_t host);
/* Drop one reference from the host clusters an L2 entry points at. */
int qcow2_free_entry_locked (strata_node *node, uint64_t entry);
/* Add DELTA references to the host clusters an L2 entry points at. */
int qcow2_ref_entry_locked (strata_node *node, uint64_t entry, int delta);

/* True when host offset OFF is at or past the end of the file (rechecking
 * the file's size first, as another reader's view may have grown). */
bool qcow2_past_end_locked (strata_node *node, uint64_t off);

/* overlap.c: refuse writes that would overwrite metadata. */
enum {
  QCOW2_META_HEADER = 1u << 0,
  QCOW2_META_L1 = 1u << 1,
  QCOW2_META_REFTABLE = 1u << 2,
  QCOW2_META_REFBLOCK = 1u << 3,
  QCOW2_META_L2 = 1u << 4,
  QCOW2_META_SNAPSHOT = 1u << 5,
};
bool qcow2_overlap_init (strata_node *node, strata_error **errp);
void qcow2_overlap_destroy (struct qcow2_state *s);
/* Record a new L2 table or refcount block (KIND) at host offset HOST. */
int qcow2_overlap_add_locked (strata_node *node, unsigned kind,
                              uint64_t host);
/* 0, or EIO (and refuse every later write) when host bytes [HOST,
 * HOST+LEN) hold metadata other than the kinds in IGNORE.  WHAT names the
 * write ("data", "L2 table"); GUEST is its guest offset or UINT64_MAX. */
int qcow2_overlap_check_locked (strata_node *node, uint64_t host,
                                uint64_t len, unsigned ignore,
                                const char *what, uint64_t guest);
/* 0, or EIO once an overlap has been caught. */
int qcow2_writes_refused (strata_node *node);

/* compress.c */
int qcow2_decompress (strata_node *node, uint64_t coffset, uint64_t csize,
                      uint8_t *out);

/* Stop a node's compressor threads (at close; NULL: none). */
void qcow2_compress_stop (struct compress_pool *p);
int qcow2_pwritev_compressed (strata_node *node, uint64_t offset,
                              uint64_t len, const struct iovec *iov,
                              int iovcnt, unsigned flags);

/* io.c: the data-path callbacks. */
int qcow2_preadv (strata_node *node, uint64_t offset, uint64_t len,
                  const struct iovec *iov, int iovcnt, unsigned flags);
int qcow2_pwritev (strata_node *node, uint64_t offset, uint64_t len,
                   const struct iovec *iov, int iovcnt, unsigned flags);
int qcow2_pwrite_zeroes (strata_node *node, uint64_t offset, uint64_t len,
                         unsigned flags);
int qcow2_pdiscard (strata_node *node, uint64_t offset, uint64_t len,
                    unsigned flags);
int qcow2_block_status (strata_node *node, uint64_t offset, uint64_t len,
                        struct bstat *bs);
/* Write the metadata cache back (the core flushes `file` after). */
int qcow2_flush (strata_node *node);
/* Free the copy-on-write buffers the node kept (at close). */
void qcow2_cow_spares_free (struct qcow2_state *s);

/* resize.c */
/* Cut the file after the last cluster with a reference; refcounts must
 * be on disk.  Failing to cut loses only space. */
/* The first cluster H (LEN bytes) as read from the file: where its header
 * extensions end (the end marker, or LEN), false with *errp set when an
 * extension runs past LEN; and the end of everything the header uses
 * (extensions, end marker, backing file name), so that a rewrite can
 * clear what a shorter new header leaves (backing.c). */
bool qcow2_extensions_end (strata_node *node, const struct qcow2_state *s,
                           const uint8_t *h, uint64_t len, uint64_t *end,
                           strata_error **errp);
uint64_t qcow2_header_used (strata_node *node, const struct qcow2_state *s,
                            const uint8_t *h, uint64_t len);
int qcow2_truncate_file_locked (strata_node *node);
bool qcow2_truncate (strata_node *node, uint64_t size, unsigned flags,
                     strata_error **errp);
/* N contiguous clusters (refcounts written), usually past the end of the
 * file; returns the first one's offset or a negative errno. */
int64_t qcow2_alloc_contiguous_locked (strata_node *node, uint64_t n);

/* snapshot.c: internal snapshots (qemu-img snapshot). */
int qcow2_snapshot_list (strata_node *node,
                         struct strata_snapshot_info **list,
                         strata_error **errp);
bool qcow2_snapshot_create (strata_node *node, const char *name,
                            strata_error **errp);
bool qcow2_snapshot_apply (strata_node *node, const char *name,
                           strata_error **errp);
bool qcow2_snapshot_delete (strata_node *node, const char *name,
                            strata_error **errp);
/* Run FN (node, ARG, errp) with guest requests drained and kept out,
 * under node->lock, then rebuild the overlap sets (for operations that
 * move or free tables). */
bool qcow2_run_exclusive (strata_node *node,
                          bool (*fn) (strata_node *, const void *,
                                      strata_error **),
                          const void *arg, strata_error **errp);
/* Every snapshot's L1 table, loaded and checked (for amend): returns the
 * count or a negative errno (io_error); free with qcow2_snapshot_l1s_free. */
struct qcow2_snapshot_l1 {
  uint64_t *l1;               /* host byte order */
  uint32_t size;
};
int qcow2_snapshot_l1s_locked (strata_node *node,
                               struct qcow2_snapshot_l1 **out);
void qcow2_snapshot_l1s_free (struct qcow2_snapshot_l1 *l1s, int n);

/* amend.c: qemu-img amend -o compat=...,lazy_refcounts=... */
bool qcow2_amend (strata_node *node, strata_opts *opts, strata_error **errp);

/* backing.c: chain edits (rewrite the backing file, empty the layer). */
bool qcow2_change_backing_file (strata_node *node, const char *backing_file,
                                const char *backing_fmt, strata_error **errp);
bool qcow2_make_empty (strata_node *node, strata_error **errp);

/* check.c: qemu-img check (and -r leaks|all). */
int qcow2_check (strata_node *node, struct strata_check_result *res,
                 unsigned fix, strata_message_fn message, void *opaque,
                 strata_error **errp);

/* bitmaps.c: the persistent bitmaps' directory (qcow2.txt "Bitmaps
 * extension", "Bitmap directory"), parsed and checked. */
#define QCOW2_EXT_BITMAPS 0x23852875u
#define QCOW2_AUTOCLEAR_BITMAPS (1ull << 0)
#define BITMAP_FLAG_IN_USE (1u << 0)
#define BITMAP_FLAG_AUTO (1u << 1)
#define BITMAP_FLAG_EXTRA_OK (1u << 2)
#define BITMAP_TYPE_DIRTY 1
struct qcow2_bitmap_ext {
  uint32_t count;
  uint64_t dir_size, dir_offset;
};
struct qcow2_bitmap {        /* one directory entry */
  uint64_t pos, len;         /* its bytes in the directory (padded) */
  uint64_t table;            /* bitmap table offset */
  uint32_t table_size;       /* entries */
  uint32_t flags;            /* BITMAP_FLAG_* */
  unsigned gbits;            /* log2 of the granularity */
  char *name;
};
struct qcow2_bitmap_dir {
  uint8_t *raw;              /* the directory as on disk */
  uint64_t offset, size;
  uint32_t count;
  struct qcow2_bitmap *e;
};
/* The extension when the bitmaps are valid: *PRESENT false when there is
 * none or it is stale (autoclear bit 0 clear); false with *errp set when
 * its fields are malformed. */
bool qcow2_bitmap_ext_find (strata_node *node, const struct qcow2_state *s,
                            struct qcow2_bitmap_ext *e, bool *present,
                            strata_error **errp);
/* Read and check the directory: *OUT NULL when there are no valid
 * bitmaps; free with qcow2_bitmap_dir_free.  Reads the file: node->lock
 * held or the node not yet shared. */
bool qcow2_bitmap_dir_read (strata_node *node, struct qcow2_bitmap_dir **out,
                            strata_error **errp);
void qcow2_bitmap_dir_free (struct qcow2_bitmap_dir *d);
/* Table entries a bitmap of granularity 2^G needs for the virtual size. */
uint64_t qcow2_bitmap_table_needed (const struct qcow2_state *s, unsigned g);
/* The public listing (strata_bitmap_list), read from the file. */
bool qcow2_bitmap_list (strata_node *node, struct strata_bitmap_info ***list,
                        size_t *n, strata_error **errp);

/* bitmaps-persist.c: the bitmaps in the node's registry (block/dirty.h).
 * load: at open, every valid bitmap into the registry (in-use ones as
 * inconsistent); a read-write open fails on a directory it cannot keep,
 * a read-only one leaves the registry without them.  writable: after a
 * read-write open or reopen, mark them in use on disk (QEMU's protocol:
 * a crash leaves them marked).  store: write the registry's persistent
 * bitmaps back (close, reopen read-only); false leaves the old ones marked
 * in use.  forget: drop the state at close. */
bool qcow2_bitmaps_load (strata_node *node, strata_error **errp);
bool qcow2_bitmaps_writable (strata_node *node, strata_error **errp);
bool qcow2_bitmaps_store (strata_node *node, strata_error **errp);
void qcow2_bitmaps_forget (struct qcow2_state *s);
/* The driver's bitmap_can_store (strata_bitmap_add of a persistent one). */
bool qcow2_bitmap_can_store (strata_node *node, const char *name,
                             uint64_t granularity, strata_error **errp);

/* create.c: qemu-img create -f qcow2. */
bool qcow2_create (const char *filename, strata_opts *opts,
                   strata_error **errp);
extern const char *const qcow2_create_options[];

/* measure.c: qemu-img measure -O qcow2. */
bool qcow2_measure (strata_opts *opts, strata_node *src, uint64_t *required,
                    uint64_t *fully_allocated, strata_error **errp);

#endif
