/* strata: block nodes and the driver interface.
 *
 * A node is one driver instance with a name, options and named children:
 *
 *        [qcow2 "top"] --backing--> [qcow2 "base"]
 *              |                          |
 *            file                       file
 *              v                          v
 *        [file top.qcow2]           [file base.qcow2]
 *
 * Format and filter drivers have a primary child, `file` (a filter's single
 * child is also called `file`); formats may have a `backing` child.
 * Protocol drivers have none.  The core (node.c) owns the request tracker,
 * permission bookkeeping, range checks of the public API and the walk down
 * backing chains, so drivers implement only what they change.  A driver
 * leaves an operation NULL when it lacks it: the core then answers for it
 * (pass-through to `file` for filters, an emulation, or -ENOTSUP).
 */
#ifndef STRATA_NODE_H
#define STRATA_NODE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include <strata/strata.h>

#include "block/tracker.h"

struct dirty_bitmap;
#include "util/error.h"
#include "util/opts.h"

/* Permissions, numbered as QEMU numbers them (the lock bytes depend on
 * it): bit i is lock byte 100+i when held, 200+i when not shared. */
enum {
  PERM_CONSISTENT_READ = 1u << 0,
  PERM_WRITE = 1u << 1,
  PERM_WRITE_UNCHANGED = 1u << 2,
  PERM_RESIZE = 1u << 3,
  PERM_ALL = 0xf,
  PERM_COUNT = 4,
};
const char *perm_name (unsigned bit_index);

/* One layer's answer to block_status. */
#define BS_ALLOCATED STRATA_BS_ALLOCATED /* defined by this layer */
#define BS_ZERO STRATA_BS_ZERO
#define BS_DATA STRATA_BS_DATA
#define BS_OFFSET STRATA_BS_OFFSET /* map/file are valid */
#define BS_RECURSE (1u << 8)       /* ask `file` at map for DATA/ZERO */
/* Ask `file` at map whether these data bytes read as zeros (QEMU's
 * BDRV_BLOCK_RECURSE): a format sets it for its data where the file's holes
 * tell zeros apart (qcow2 only when metadata-preallocated, as QEMU 7.2).
 * Without it a format's data is data, whatever the file holds there. */
#define BS_REFINE_ZERO (1u << 9)

struct bstat {
  uint64_t pnum; /* bytes covered, > 0 */
  unsigned flags;
  uint64_t map;             /* offset in `file` when BS_OFFSET */
  struct strata_node *file; /* node holding the bytes when BS_OFFSET */
};

struct strata_driver {
  const char *name;
  size_t state_size;   /* bytes of zeroed driver state at node->opaque */
  bool has_file_child; /* the core opens `file` before calling open */
  bool is_filter;      /* guest view == file's view (for pass-through) */
  bool remote;         /* a request may wait on a network for long */

  /* Protocol drivers whose file names are not paths (URIs): does NAME
   * belong to this driver?  The core then opens a file name it claims
   * with this driver under the format, and never joins such a name with
   * a directory or resolves it with realpath().  NULL: plain paths (the
   * "file" driver takes whatever no driver claims). */
  bool (*claims_filename) (const char *name);

  /* Score how likely BUF (the first bytes of a file) is this format;
   * 0 = no.  Only format drivers. */
  int (*probe) (const uint8_t *buf, size_t len);

  bool (*open) (struct strata_node *node, strata_opts *opts, unsigned flags,
                strata_error **errp);
  void (*close) (struct strata_node *node);

  /* Data path: return 0 or a negative errno; describe failures with
   * io_error().  Ranges are already checked against overflow. */
  int (*preadv) (struct strata_node *node, uint64_t offset, uint64_t len,
                 const struct iovec *iov, int iovcnt, unsigned flags);
  int (*pwritev) (struct strata_node *node, uint64_t offset, uint64_t len,
                  const struct iovec *iov, int iovcnt, unsigned flags);
  /* Store whole clusters compressed (STRATA_REQ_COMPRESSED). */
  int (*pwritev_compressed) (struct strata_node *node, uint64_t offset,
                             uint64_t len, const struct iovec *iov, int iovcnt,
                             unsigned flags);
  int (*pwrite_zeroes) (struct strata_node *node, uint64_t offset,
                        uint64_t len, unsigned flags);
  int (*pdiscard) (struct strata_node *node, uint64_t offset, uint64_t len,
                   unsigned flags);
  int (*flush) (struct strata_node *node);
  /* Do what a read of the range would do to the image (copy-on-read)
   * without returning the data: NBD_CMD_CACHE, as QEMU's
   * BDRV_REQ_PREFETCH.  NULL: a filter passes it to `file`; any other
   * node has nothing to do. */
  int (*prefetch) (struct strata_node *node, uint64_t offset, uint64_t len);
  int (*block_status) (struct strata_node *node, uint64_t offset, uint64_t len,
                       struct bstat *bs);

  /* Create an image file named FILENAME.  OPTS holds "size" and the
   * format's creation options (qemu-img create -o ...), already checked
   * against create_options.  The driver validates every value before it
   * touches the disk; on failure nothing is left behind that was not there
   * before. */
  bool (*create) (const char *filename, strata_opts *opts,
                  strata_error **errp);
  /* NULL-terminated names of the options create() accepts; the core
   * refuses any other before calling it. */
  const char *const *create_options;

  /* Control path. */
  int64_t (*get_length) (struct strata_node *node);
  bool (*truncate) (struct strata_node *node, uint64_t size, unsigned flags,
                    strata_error **errp);
  bool (*get_info) (struct strata_node *node, struct strata_info *info,
                    strata_error **errp);
  /* Switch between read-only and read-write.  Children are reopened by the
   * core first (going read-write) or last (going read-only). */
  bool (*reopen) (struct strata_node *node, bool read_write,
                  strata_error **errp);
  /* Consistency check (qemu-img check): fill RES (zeroed by the core);
   * FIX is STRATA_CHECK_FIX_*, only passed for a read-write node; MESSAGE
   * (may be NULL) gets OPAQUE and one line per problem.  Returns 0 when
   * the check completed, or a negative errno with *errp set. */
  int (*check) (struct strata_node *node, struct strata_check_result *res,
                unsigned fix, strata_message_fn message, void *opaque,
                strata_error **errp);
  /* Format-specific information: fill *INFO, the public struct for
   * FORMAT (struct strata_qcow2_info for "qcow2", size already set), or
   * return false (*errp may stay unset: the core says ENOTSUP). */
  bool (*get_format_info) (struct strata_node *node, const char *format,
                           void *info, strata_error **errp);

  /* Chain edits (strata-img rebase/commit, block-stream).  Rewrite the
   * backing file name and format recorded in the image header; NULL
   * BACKING_FILE removes the backing file.  Crash-safe: after a crash the
   * header names either the old or the new backing file. */
  bool (*change_backing_file) (struct strata_node *node,
                               const char *backing_file,
                               const char *backing_fmt, strata_error **errp);
  /* Drop every allocation of this layer so that it reads through to its
   * backing file (qemu-img commit without -d). */
  bool (*make_empty) (struct strata_node *node, strata_error **errp);

  /* Internal snapshots (qcow2; src/drivers/qcow2/snapshot.c). */
  int (*snapshot_list) (struct strata_node *node,
                        struct strata_snapshot_info **list,
                        strata_error **errp);
  bool (*snapshot_create) (struct strata_node *node, const char *name,
                           strata_error **errp);
  bool (*snapshot_apply) (struct strata_node *node, const char *name,
                          strata_error **errp);
  bool (*snapshot_delete) (struct strata_node *node, const char *name,
                           strata_error **errp);

  /* Persistent dirty bitmaps stored in the image (strata_bitmap_list):
   * *LIST a NULL-terminated array of *N entries, each malloc'd. */
  bool (*bitmap_list) (struct strata_node *node,
                       struct strata_bitmap_info ***list, size_t *n,
                       strata_error **errp);
  /* Whether the image can store one more persistent bitmap NAME of
   * GRANULARITY (else false with QEMU's reason); NULL: it cannot. */
  bool (*bitmap_can_store) (struct strata_node *node, const char *name,
                            uint64_t granularity, strata_error **errp);

  /* Change creation options of an open image in place (qemu-img amend).
   * OPTS was checked against create_options. */
  bool (*amend) (struct strata_node *node, strata_opts *opts,
                 strata_error **errp);
  /* qemu-img measure: sizes for an image created with OPTS ("size" and
   * the creation options) holding SRC's data (SRC may be NULL). */
  bool (*measure) (strata_opts *opts, struct strata_node *src,
                   uint64_t *required, uint64_t *fully_allocated,
                   strata_error **errp);
};

struct strata_child {
  char *name; /* "file", "backing" */
  struct strata_node *node;
};

#define NODE_MAX_CHILDREN 4

struct strata_node {
  const struct strata_driver *drv;
  void *opaque; /* driver state, drv->state_size bytes */
  char *node_name;
  char *filename;      /* for messages: the file under this node */
  unsigned open_flags; /* STRATA_OPEN_* */
  bool read_only;
  bool format_probed;    /* the format was guessed, not named */
  bool backing_explicit; /* backing came from options or a graph
                          * change, not from the image header */
  unsigned perm, shared; /* PERM_* held and shared */
  atomic_int refcnt;

  struct strata_child children[NODE_MAX_CHILDREN];
  int nchildren;
  struct strata_node *file;    /* == child "file", or NULL */
  struct strata_node *backing; /* == child "backing", or NULL */

  struct tracker tracker; /* requests in flight on this node */
  /* Dirty bitmaps its writes mark (src/block/dirty.c; under its lock),
   * and their number, read without it. */
  struct dirty_bitmap *dirty;
  atomic_int ndirty;
  /* Set once by node_forward_to(): the node that took this one's place
   * (an active commit's pivot); requests that reach this node go there. */
  struct strata_node *_Atomic replaced_by;
  /* Set before REPLACED_BY by node_forward_writes_to(): reads stay. */
  bool forward_writes_only;
  char **users; /* graph_add_user(): who holds this node */
  size_t nusers;
  pthread_mutex_t lock; /* driver metadata; docs/architecture.md, Locks */
};
typedef struct strata_node strata_node;

/* Open a node from OPTS (consumed: the caller still frees the list).  The
 * "driver" key names the driver; without it the format is probed from
 * `file`.  "file" may name an existing node instead of giving "file.*"
 * options; "node-name" must be valid and unused (graph.h).  An unused
 * option fails the open.  Returns a node with one reference, or NULL. */
strata_node *node_open (strata_opts *opts, unsigned flags,
                        strata_error **errp);

/* Open an image file by name with an optional format; used for backing
 * files and by the tools.  EXTRA may be NULL. */
strata_node *node_open_image (const char *filename, const char *format,
                              strata_opts *extra, unsigned flags,
                              strata_error **errp);

void node_ref (strata_node *node);

/* NODE, or the first node below it that is not a filter (NULL stays
 * NULL): the format node a filter chain stands for. */
static inline strata_node *
node_skip_filters (strata_node *node)
{
  while (node && node->drv->is_filter && node->file)
    node = node->file;
  return node;
}
void node_unref (strata_node *node);

/* NODE, or the node that took its place (node_forward_to), followed to
 * the end. */
static inline strata_node *
node_resolve (strata_node *node)
{
  strata_node *r;

  while (
      node
      && (r = atomic_load_explicit (&node->replaced_by, memory_order_acquire)))
    node = r;
  return node;
}
/* From now on, requests that reach OLD (reads, writes, zeroes, discards;
 * through the API also flush, block status and length) go to NEW, which
 * OLD keeps a reference to.  The caller has drained OLD and holds its
 * requests out (a whole-node serialising tracker request) while it calls
 * this: those that waited find the forward when they go on. */
void node_forward_to (strata_node *old, strata_node *new);
/* The same for writes, write-zeroes and discards only: reads that reach
 * OLD still read OLD.  For OLD that stays NEW's backing (a sync=none
 * mirror's pivot), whose reads through that edge must not come back to
 * NEW; its former users' writes held at the pivot must land in NEW. */
void node_forward_writes_to (strata_node *old, strata_node *new);

/* Attach CHILD (taking over the caller's reference) under NAME. */
bool node_attach_child (strata_node *parent, const char *name,
                        strata_node *child, strata_error **errp);
/* Detach and drop the reference of child NAME, if any. */
void node_detach_child (strata_node *parent, const char *name);

/* Internal data path: requests between nodes.  No check against the
 * node's length (a format may grow its file); overflow is refused. */
/* Internal request flag for writes and zeroes: the caller already holds a
 * serialising request of NODE's tracker over the range (copy-up), so the
 * core must not register another one, which would wait for it. */
#define NODE_REQ_SERIALISED (1u << 16)
int node_preadv (strata_node *node, uint64_t offset, uint64_t len,
                 const struct iovec *iov, int iovcnt, unsigned flags);
int node_pwritev (strata_node *node, uint64_t offset, uint64_t len,
                  const struct iovec *iov, int iovcnt, unsigned flags);
int node_pread (strata_node *node, uint64_t offset, void *buf, size_t len,
                unsigned flags);
int node_pwrite (strata_node *node, uint64_t offset, const void *buf,
                 size_t len, unsigned flags);
int node_pwrite_zeroes (strata_node *node, uint64_t offset, uint64_t len,
                        unsigned flags);
int node_pdiscard (strata_node *node, uint64_t offset, uint64_t len,
                   unsigned flags);
int node_flush (strata_node *node);
int node_prefetch (strata_node *node, uint64_t offset, uint64_t len);
/* One layer (and the file below it for DATA/ZERO). */
int node_block_status (strata_node *node, uint64_t offset, uint64_t len,
                       struct bstat *bs);
/* The same; the file below is consulted where the driver asks: for the
 * whole answer with BS_RECURSE (raw over a file), for zeros in its data
 * with BS_REFINE_ZERO, which STRATA_BS_SHALLOW ignores. */
int node_block_status_flags (strata_node *node, uint64_t offset, uint64_t len,
                             struct bstat *bs, unsigned flags);
int64_t node_length (strata_node *node);
/* Whether NODE or a node under it (file and backing children, all the
 * way down) is of a remote driver: its requests may take a network's
 * time.  Walks the graph without the graph lock: call it where the
 * graph cannot change under the caller (a request in flight, or a
 * caller that holds a reference to NODE, whose children it owns). */
bool node_has_remote (strata_node *node);
bool node_truncate (strata_node *node, uint64_t size, unsigned flags,
                    strata_error **errp);

/* The cache mode of the protocol node at the bottom of NODE's `file`
 * children, as its driver's get_info reports it (the file driver's
 * cache.direct and cache.no-flush; false for a driver without them). */
void node_cache_mode (strata_node *node, bool *direct, bool *no_flush);

/* The bytes the protocol node at the bottom of NODE's `file` children
 * really allocates (the file driver: st_blocks * 512), or a negative
 * errno (-ENOTSUP when its driver cannot tell). */
int64_t node_allocated_size (strata_node *node);

/* Driver registry.  The list is src/drivers/registry.c's: the core knows
 * drivers only through it, never by name. */
extern const struct strata_driver *const driver_list[];
extern const size_t driver_count;
/* The driver named NAME, or NULL. */
const struct strata_driver *driver_find (const char *name);
/* The protocol driver that claims NAME (an NBD URI...), or NULL for a
 * plain path. */
const struct strata_driver *driver_for_filename (const char *name);

/* Chain edits: the driver's operation or ENOTSUP naming the format. */
bool node_change_backing_file (strata_node *node, const char *backing_file,
                               const char *backing_fmt, strata_error **errp);
bool node_make_empty (strata_node *node, strata_error **errp);

/* Copy-up (src/block/populate.c), shared by the copy-on-read filter,
 * block-stream and strata_copy_up (strata-img stream).  Copy into TOP every
 * part of [OFFSET, OFFSET+LEN) that TOP does not allocate and that some layer
 * below TOP and above BASE allocates (BASE NULL: the whole chain), reading
 * it through TOP's backing chain.  Regions that read as zeros become zero
 * clusters (pwrite_zeroes, never data).  The copy is serialised against
 * writes to TOP so that a newer guest write is never overwritten by a
 * stale copy.  *COPIED (may be NULL) gets the bytes written into TOP.
 * Returns 0 or a negative errno with io_error() set. */
int node_copy_up (strata_node *top, strata_node *base, uint64_t offset,
                  uint64_t len, uint64_t *copied);

/* node_copy_up for callers that copy several ranges at once and want
 * TOP's clusters allocated as one caller's in-order copy would allocate
 * them: BEFORE_WRITE(OPAQUE), when not NULL, is called (and may block)
 * just before the first write into TOP, after the range was read; a
 * negative errno from it ends the copy-up with that error, unwritten. */
int node_copy_up_ordered (strata_node *top, strata_node *base, uint64_t offset,
                          uint64_t len, uint64_t *copied,
                          int (*before_write) (void *opaque), void *opaque);

/* The unit node_copy_up widens a range to: TOP's cluster size (64 KiB
 * for a format without clusters).  Two copy-ups at once must not share
 * one, or each may wait for the other. */
uint64_t node_copy_up_unit (strata_node *top);

#endif
