/* libstrata: a block layer for virtual-disk images.
 *
 * Copyright (C) 2026 the strata authors
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Public API, a contract that grows without breaking callers:
 *
 * - Handles (strata_node, strata_error) are opaque.  Result structs are
 *   public and can grow at their end: the caller sets their first field,
 *   `size`, to sizeof the struct it was compiled with, and the library
 *   fills only that many bytes (a struct the library allocates itself is
 *   returned by pointer and only grows).  A size smaller than the first
 *   version of the struct fails with EINVAL.
 * - Two return shapes.  Control-path calls (open, info, create, chain and
 *   snapshot edits, check, ...) return bool or a pointer and report
 *   failure through a strata_error out-parameter, passed last (it may be
 *   NULL).  Data-path calls (read, write, zeroes, discard, flush, block
 *   status, prefetch, copy-up, length) return 0 (strata_length: the size)
 *   or a negative errno; strata_last_error_message() has the detail of the
 *   last failure in the calling thread.
 * - Every call that may grow takes `unsigned flags`.  Each call accepts the
 *   bits of its STRATA_<CALL>_MASK and fails with EINVAL on any other bit,
 *   so a caller built against a newer header learns that the library is
 *   too old instead of having a request silently ignored.  Pass 0 for the
 *   defaults.
 */
#ifndef STRATA_STRATA_H
#define STRATA_STRATA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include <strata/version.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct strata_error strata_error;
typedef struct strata_node strata_node;

/* Errors.  An error is owned by whoever received it and freed with
 * strata_error_free(). */
int strata_error_errno (const strata_error *err);
const char *strata_error_message (const strata_error *err);
void strata_error_free (strata_error *err);

/* The message that goes with the last data-path failure in this thread,
 * or NULL.  Valid until the next failing call in this thread. */
const char *strata_last_error_message (void);

/* Open flags. */
#define STRATA_OPEN_RDWR        (1u << 0) /* open for writing */
#define STRATA_OPEN_FORCE_SHARE (1u << 1) /* -U: read-only, take no locks */
#define STRATA_OPEN_NO_BACKING  (1u << 2) /* do not open backing files */
#define STRATA_OPEN_COPY_ON_READ (1u << 3) /* -C: a copy-on-read filter on
                                            * top (needs STRATA_OPEN_RDWR) */
#define STRATA_OPEN_MASK                                                     \
  (STRATA_OPEN_RDWR | STRATA_OPEN_FORCE_SHARE | STRATA_OPEN_NO_BACKING       \
   | STRATA_OPEN_COPY_ON_READ)

/* Open an image.  FORMAT may be NULL to probe (only the top image is ever
 * probed).  OPTIONS is NULL or a "key=value,key=value" list in QEMU's
 * syntax (",," escapes a comma) such as "cache.direct=on" or
 * "offset=4096,size=65536"; "driver" and "file.*" keys are allowed.
 * Returns a node that the caller closes with strata_close(), or NULL and
 * sets *errp. */
strata_node *strata_open (const char *filename, const char *format,
                          const char *options, unsigned flags,
                          strata_error **errp);
void strata_close (strata_node *node);

/* Request flags. */
#define STRATA_REQ_FUA       (1u << 0) /* write: durable before return */
#define STRATA_REQ_MAY_UNMAP (1u << 1) /* zeroes: may free the space */
#define STRATA_REQ_COMPRESSED (1u << 2) /* write: store compressed; whole
                                          * clusters of the format only */
/* The request flags each data-path call accepts. */
#define STRATA_READ_MASK     0u
#define STRATA_WRITE_MASK    (STRATA_REQ_FUA | STRATA_REQ_COMPRESSED)
#define STRATA_ZEROES_MASK   (STRATA_REQ_FUA | STRATA_REQ_MAY_UNMAP)
#define STRATA_DISCARD_MASK  0u
#define STRATA_FLUSH_MASK    0u
#define STRATA_PREFETCH_MASK 0u
#define STRATA_COPY_UP_MASK  0u

int strata_pread (strata_node *node, void *buf, size_t len, uint64_t offset,
                  unsigned flags);
int strata_pwrite (strata_node *node, const void *buf, size_t len,
                   uint64_t offset, unsigned flags);
int strata_preadv (strata_node *node, const struct iovec *iov, int iovcnt,
                   uint64_t offset, unsigned flags);
int strata_pwritev (strata_node *node, const struct iovec *iov, int iovcnt,
                    uint64_t offset, unsigned flags);
int strata_pwrite_zeroes (strata_node *node, uint64_t offset, uint64_t len,
                          unsigned flags);
int strata_pdiscard (strata_node *node, uint64_t offset, uint64_t len,
                     unsigned flags);
int strata_flush (strata_node *node, unsigned flags);
/* Populate the range as a read would (a copy-on-read filter copies it
 * into its image), without returning data; elsewhere nothing to do. */
int strata_prefetch (strata_node *node, uint64_t offset, uint64_t len,
                     unsigned flags);
/* Copy-up (strata-img stream, block-stream): copy into TOP every part of
 * [OFFSET, OFFSET+LEN) that TOP does not allocate and that a layer of its
 * backing chain above BASE allocates (BASE NULL: the whole chain), read
 * through TOP's chain, so that TOP then holds it itself.  Ranges that read
 * as zeros become zero clusters, never data.  The copy is serialised
 * against writes to TOP, so a newer guest write is never overwritten by a
 * stale copy.  BASE must be a layer of TOP's chain (strata_chain_find) or
 * NULL; TOP must be open read-write.  *COPIED (may be NULL) gets the bytes
 * written into TOP. */
int strata_copy_up (strata_node *top, strata_node *base, uint64_t offset,
                    uint64_t len, uint64_t *copied, unsigned flags);

/* Block status of the range starting at OFFSET.  The answer, in *EXT
 * (set ext.size = sizeof ext first), covers ext->length bytes (at least
 * one, at most LEN).  Zeros that no layer allocates have the depth
 * qemu-img map gives them: the bottom layer's, or that of the layer whose
 * backing file ends before them. */
#define STRATA_BS_ALLOCATED (1u << 0) /* some layer of the chain holds it */
#define STRATA_BS_ZERO      (1u << 1) /* reads as zeros */
#define STRATA_BS_DATA      (1u << 2) /* backed by data in a file */
#define STRATA_BS_OFFSET    (1u << 3) /* map is the offset in that file */

struct strata_extent {
  size_t size;        /* set by the caller: sizeof (struct strata_extent) */
  uint64_t length;    /* bytes this answer covers */
  unsigned flags;     /* STRATA_BS_* */
  int depth;          /* layer holding it: 0 = top, 1 = its backing, ... */
  uint64_t map;       /* host offset, when STRATA_BS_OFFSET */
  const char *file;   /* filename holding the data, when known */
};
/* FLAGS: STRATA_BS_SHALLOW always trusts a format layer's answer for its
 * data clusters.  Without it the file under a format is asked whether its
 * data is a hole only where QEMU 7.2 asks (a qcow2 image that looks
 * metadata-preallocated); otherwise, as qemu-img map reports it, a data
 * cluster is data even where its file has a hole.  Raw images report
 * their file's holes either way. */
#define STRATA_BS_SHALLOW (1u << 0)
#define STRATA_BLOCK_STATUS_MASK STRATA_BS_SHALLOW
int strata_block_status (strata_node *node, uint64_t offset, uint64_t len,
                         struct strata_extent *ext, unsigned flags);

/* Size of the image as the guest sees it, or a negative errno.  A
 * data-path call: the NBD server and the tools ask it around every
 * request, a protocol (NBD) can fail it like a read, and a size fits in
 * the non-negative range of the return value as a byte count does in
 * pread(2)'s. */
int64_t strata_length (strata_node *node);

#define STRATA_TRUNCATE_MASK 0u
#define STRATA_REOPEN_MASK   0u
bool strata_truncate (strata_node *node, uint64_t size, unsigned flags,
                      strata_error **errp);
bool strata_reopen (strata_node *node, bool read_write, unsigned flags,
                    strata_error **errp);

/* Information about a node.  Set info.size = sizeof info first. */
struct strata_info {
  size_t size;              /* set by the caller: sizeof (struct strata_info) */
  const char *format;       /* driver name */
  const char *filename;     /* the file under it, if any */
  uint64_t virtual_size;
  uint64_t actual_size;     /* bytes allocated on the host, 0 if unknown */
  bool actual_size_unknown; /* the protocol cannot tell (NBD): QEMU shows
                             * "disk size: unavailable", no actual-size */
  bool dirty_unknown;       /* no dirty-flag to show: raw over NBD */
  uint32_t cluster_size;    /* 0 when the format has none */
  bool read_only;
  bool cache_direct;        /* the protocol bypasses the host page cache
                             * (the file driver's cache.direct) */
  bool cache_no_flush;      /* flushes are ignored (cache.no-flush) */
  bool has_backing;
  bool dirty;                     /* qcow2 dirty bit (lazy refcounts) */
  uint64_t vm_state_offset;       /* where a format keeps VM state (qcow2:
                                   * the size rounded up to one L2 table's
                                   * span), 0 when it has none */
  const char *backing_filename;   /* as recorded in the image, or NULL */
  const char *backing_format;     /* as recorded in the image, or NULL */
  const char *full_backing_filename;  /* the path actually opened */
  /* The format that has a format-specific information call
   * ("qcow2": strata_get_qcow2_info), or NULL. */
  const char *format_specific;
};
#define STRATA_GET_INFO_MASK 0u
bool strata_get_info (strata_node *node, struct strata_info *info,
                      unsigned flags, strata_error **errp);

/* What qcow2 images have beyond struct strata_info (QEMU's
 * format-specific data).  Set info.size = sizeof info first.  Fails with
 * ENOTSUP when NODE (below its filters) is not a qcow2 image.  The strings
 * are static. */
struct strata_qcow2_info {
  size_t size;                  /* set by the caller: sizeof the struct */
  const char *compat;           /* "0.10" or "1.1" */
  const char *compression_type; /* "zlib" or "zstd" */
  bool lazy_refcounts;
  int refcount_bits;
  bool corrupt;
  bool extended_l2;
};
#define STRATA_GET_QCOW2_INFO_MASK 0u
bool strata_get_qcow2_info (strata_node *node, struct strata_qcow2_info *info,
                            unsigned flags, strata_error **errp);

/* The next layer of the backing chain below NODE (skipping filters), or
 * NULL.  Borrowed: valid while NODE is open. */
strata_node *strata_backing (strata_node *node);

/* Find a layer of TOP's backing chain (below TOP; filters are never
 * layers) by file name.  FLAGS says which spellings of NAME count; a layer
 * matches when any of them does (give at least one):
 *   STRATA_CHAIN_PATH      NAME is the layer's file name, or the same file
 *                          from the current directory
 *   STRATA_CHAIN_RELATIVE  NAME, taken from the directory of the layer
 *                          above as a backing name recorded there would
 *                          be, is the same file
 *   STRATA_CHAIN_RECORDED  NAME is the backing name the layer above
 *                          records in its header
 * Returns the first matching layer (borrowed: valid while TOP is open)
 * and its depth in *DEPTH (may be NULL; 1 = TOP's backing layer, as
 * struct strata_extent counts), or NULL with *errp set (ENOENT). */
#define STRATA_CHAIN_PATH     (1u << 0)
#define STRATA_CHAIN_RELATIVE (1u << 1)
#define STRATA_CHAIN_RECORDED (1u << 2)
#define STRATA_CHAIN_FIND_MASK                                               \
  (STRATA_CHAIN_PATH | STRATA_CHAIN_RELATIVE | STRATA_CHAIN_RECORDED)
strata_node *strata_chain_find (strata_node *top, const char *name,
                                unsigned flags, int *depth,
                                strata_error **errp);
/* The node named NODE_NAME when it is TOP or in TOP's chain (filters
 * included), or NULL with *errp set (ENOENT).  Borrowed. */
#define STRATA_CHAIN_FIND_NODE_MASK 0u
strata_node *strata_chain_find_node (strata_node *top, const char *node_name,
                                     unsigned flags, strata_error **errp);
/* The backing file name to record in TOP's header so that it names LAYER,
 * a layer below TOP: the name the layer above LAYER records when it means
 * the same file from TOP's directory, else LAYER's absolute path.  The
 * caller frees it; NULL with *errp set on failure. */
#define STRATA_CHAIN_BACKING_NAME_MASK 0u
char *strata_chain_backing_name (strata_node *top, strata_node *layer,
                                 unsigned flags, strata_error **errp);

/* Consistency check (qemu-img check).  The format driver walks its
 * metadata and counts problems; FIX asks it to repair some of them, which
 * needs a node opened read-write.  Repairs never lower a reference count
 * below the number of references the check found, so a crash during a
 * repair can at worst leave more leaked clusters.  MESSAGE, when not
 * NULL, is called with OPAQUE and one line (without newline) per problem
 * found or repaired, as qemu-img prints them ("Leaked cluster 5
 * refcount=2 reference=1").
 *
 * Returns true when the check ran to the end (RES holds the counts, and
 * check_errors > 0 means parts could not be checked), or false with *errp
 * set when it could not complete: ENOTSUP when the format has no check,
 * EROFS when a fix is asked of a read-only node (RES is then untouched;
 * after a failure during the walk it holds what was counted so far). */
#define STRATA_CHECK_FIX_LEAKS  (1u << 0) /* lower leaked refcounts */
#define STRATA_CHECK_FIX_ERRORS (1u << 1) /* raise too-low refcounts, ... */
#define STRATA_CHECK_MASK (STRATA_CHECK_FIX_LEAKS | STRATA_CHECK_FIX_ERRORS)

typedef void (*strata_message_fn) (void *opaque, const char *line);

/* Set res.size = sizeof res first. */
struct strata_check_result {
  size_t size;                /* set by the caller: sizeof the struct */
  int64_t corruptions;        /* problems that may lose or corrupt data */
  int64_t leaks;              /* clusters with a too-high refcount */
  int64_t check_errors;       /* parts that could not be checked */
  int64_t corruptions_fixed;
  int64_t leaks_fixed;
  uint64_t image_end_offset;  /* end of the last used cluster, 0 = unknown */
  /* Guest clusters: all, allocated, not contiguous with the previous
   * allocated cluster, compressed (0 when the format has no clusters). */
  uint64_t total_clusters;
  uint64_t allocated_clusters;
  uint64_t fragmented_clusters;
  uint64_t compressed_clusters;
};
bool strata_check (strata_node *node, struct strata_check_result *res,
                   strata_message_fn message, void *opaque, unsigned flags,
                   strata_error **errp);

/* Create an image.  FORMAT names the driver ("raw", "qcow2"); OPTIONS is
 * "key=value,..." with "size" and the format's creation options as
 * qemu-img create -o takes them ("cluster_size=65536,backing_file=b").
 * An option the format does not know fails, naming it; on failure no new
 * file is left behind. */
#define STRATA_CREATE_DRY_RUN (1u << 0) /* only validate the arguments */
#define STRATA_CREATE_MASK STRATA_CREATE_DRY_RUN
bool strata_create (const char *filename, const char *format,
                    const char *options, unsigned flags,
                    strata_error **errp);
/* Is there a driver named NAME ("qcow2", "raw", "file", "nbd", ...)? */
bool strata_driver_exists (const char *name);

/* ---- chain edits (strata-img rebase/commit, block-stream) ---- */

/* Rewrite the backing file name and format in NODE's image header (NULL
 * BACKING_FILE: no backing file).  Only the header changes; the caller
 * makes the content right first (rebase's safe mode).  NODE must be open
 * read-write.  Crash-safe. */
#define STRATA_CHANGE_BACKING_MASK 0u
bool strata_change_backing_file (strata_node *node, const char *backing_file,
                                 const char *backing_fmt, unsigned flags,
                                 strata_error **errp);
/* Drop every allocation of NODE's top layer (qemu-img commit without
 * -d), so that it reads as its backing file. */
#define STRATA_MAKE_EMPTY_MASK 0u
bool strata_make_empty (strata_node *node, unsigned flags,
                        strata_error **errp);

/* ---- internal snapshots (qemu-img snapshot) ---- */

/* One snapshot.  Allocated by the library, so it only grows: SIZE says
 * how many bytes of it this library fills. */
struct strata_snapshot_info {
  size_t size;               /* sizeof the library's struct */
  char *id;                  /* "1", "2", ... */
  char *name;
  uint64_t vm_state_size;
  uint64_t date_sec;
  uint32_t date_nsec;
  uint64_t vm_clock_nsec;
  uint64_t icount;           /* UINT64_MAX when not recorded */
  uint64_t disk_size;        /* guest size when taken */
};
/* The snapshot table: *LIST gets an array of *N pointers to snapshots
 * (0 when the format has none), freed with strata_snapshot_list_free();
 * or false with *errp set. */
#define STRATA_SNAPSHOT_MASK 0u
bool strata_snapshot_list (strata_node *node,
                           struct strata_snapshot_info ***list, size_t *n,
                           unsigned flags, strata_error **errp);
void strata_snapshot_list_free (struct strata_snapshot_info **list, size_t n);
/* NAME is a name or an id, as qemu-img snapshot -a/-d take it.  FLAGS
 * (STRATA_SNAPSHOT_MASK): 0. */
bool strata_snapshot_create (strata_node *node, const char *name,
                             unsigned flags, strata_error **errp);
bool strata_snapshot_apply (strata_node *node, const char *name,
                            unsigned flags, strata_error **errp);
bool strata_snapshot_delete (strata_node *node, const char *name,
                             unsigned flags, strata_error **errp);

/* ---- amend and measure ---- */

/* qemu-img amend -o OPTIONS on an image open read-write. */
#define STRATA_AMEND_MASK 0u
bool strata_amend (strata_node *node, const char *options, unsigned flags,
                   strata_error **errp);
/* qemu-img measure: the file size FORMAT with OPTIONS ("size=..." and
 * creation options) needs to hold SRC's data (SRC NULL: an empty image of
 * "size"), and when fully allocated. */
#define STRATA_MEASURE_MASK 0u
bool strata_measure (const char *format, const char *options,
                     strata_node *src, uint64_t *required,
                     uint64_t *fully_allocated, unsigned flags,
                     strata_error **errp);

/* ---- version ---- */

/* The library's version, "MAJOR.MINOR.MICRO" (static storage), and the
 * same as STRATA_VERSION_NUMBER (MAJOR, MINOR, MICRO).  Compare with the
 * STRATA_VERSION_* macros of include/strata/version.h to tell the headers
 * compiled against from the library run with. */
const char *strata_version (void);
unsigned strata_version_number (void);

/* ---- persistent dirty bitmaps ---- */

/* A persistent dirty bitmap stored in an image (qcow2's bitmaps
 * extension; qemu-img info lists them).  The library allocates each entry
 * on its own, so a later version may add fields at the end of this struct
 * without changing what a caller built against this one sees. */
#define STRATA_BITMAP_IN_USE (1u << 0) /* not saved cleanly: may be stale */
#define STRATA_BITMAP_AUTO   (1u << 1) /* enabled: tracks every write */
struct strata_bitmap_info {
  char *name;
  unsigned flags;       /* STRATA_BITMAP_IN_USE, STRATA_BITMAP_AUTO */
  uint64_t granularity; /* bytes of the disk per bit */
};
/* The persistent bitmaps of NODE's image (below any filters), in the order
 * the image stores them: *LIST gets a NULL-terminated array of *N entries,
 * freed with strata_bitmap_list_free().  An image that can hold bitmaps
 * and has none gives *N = 0, as does one whose bitmaps a program lacking
 * bitmap support has invalidated (QEMU ignores those too).  Returns false
 * with *errp set: ENOTSUP when the format holds no bitmaps (raw, qcow2
 * version 2), EINVAL when the bitmap metadata is malformed (the message
 * names the field), or the errno of a failed read.
 *
 * A qcow2 image's bitmaps are loaded when it is opened, record writes
 * while enabled, and are stored back when it is closed; an image whose
 * bitmaps strata cannot keep (malformed, unknown flags) cannot be opened
 * read-write, and strata_open() says why.
 *
 * FLAGS: none yet (STRATA_BITMAP_LIST_MASK); others fail with EINVAL. */
#define STRATA_BITMAP_LIST_MASK 0u
bool strata_bitmap_list (strata_node *node, struct strata_bitmap_info ***list,
                         size_t *n, unsigned flags, strata_error **errp);
void strata_bitmap_list_free (struct strata_bitmap_info **list);

/* Named dirty bitmaps of an open node, as qemu-img bitmap and QEMU's
 * block-dirty-bitmap-* change them (QEMU's error texts).  add: a new
 * bitmap NAME on NODE (below any filters), recording unless
 * STRATA_BITMAP_ADD_DISABLED, stored in the image unless
 * STRATA_BITMAP_ADD_TRANSIENT (the format must hold bitmaps: qcow2
 * version 3); GRANULARITY 0 is QEMU's default (the cluster size within
 * 4 KiB..64 KiB).  change: OP on bitmap NAME.  merge: bitmap SOURCE of
 * SRC (any open node of the same length) into NAME of NODE.  FLAGS: as
 * named; others fail with EINVAL. */
#define STRATA_BITMAP_ADD_DISABLED  (1u << 0)
#define STRATA_BITMAP_ADD_TRANSIENT (1u << 1)
#define STRATA_BITMAP_ADD_MASK      3u
bool strata_bitmap_add (strata_node *node, const char *name,
                        uint64_t granularity, unsigned flags,
                        strata_error **errp);
enum strata_bitmap_op {
  STRATA_BITMAP_REMOVE,
  STRATA_BITMAP_CLEAR,
  STRATA_BITMAP_ENABLE,
  STRATA_BITMAP_DISABLE,
};
bool strata_bitmap_change (strata_node *node, const char *name,
                           enum strata_bitmap_op op, unsigned flags,
                           strata_error **errp);
bool strata_bitmap_merge (strata_node *node, const char *name,
                          strata_node *src, const char *source,
                          unsigned flags, strata_error **errp);

#ifdef __cplusplus
}
#endif

#endif
