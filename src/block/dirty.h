/* strata: in-memory dirty bitmaps (src/block/dirty.c).
 *
 * A bitmap records which GRANULARITY-sized pieces of a node were written
 * since it was made or last cleared there.  A job attaches one to the node
 * whose guest writes it must follow (active commit, mirror); every write,
 * write-zeroes and discard that reaches that node marks its range, once it
 * has ended (so a job that clears a piece, reads it and copies it, and
 * meanwhile sees a guest write to it, finds the piece dirty again and
 * copies it once more).  Marks are made before the request leaves the
 * node's request tracker, so a drain of the node (a whole-node serialising
 * request) sees every write's mark.
 *
 * A bitmap has its own lock; the lists on nodes are guarded by one lock in
 * dirty.c, and a node without bitmaps pays one atomic load per write.
 *
 * Named bitmaps (the node's registry, QEMU's block-dirty-bitmap-*): a
 * bitmap with a name, unique on its node, kept on the node's list until
 * removed or the node closes.  Its state, as query-named-block-nodes'
 * "dirty-bitmaps" shows it:
 *   recording     enabled and consistent: writes mark it
 *   persistent    a format driver stores it in the image (qcow2 bitmaps.c
 *                 loads them at open and stores them at close)
 *   inconsistent  loaded marked in use (its writer did not close it
 *                 cleanly): neither recording nor usable, only removable
 *   busy          a user (backup, an NBD export) holds it: not removable,
 *                 not changeable through the QMP commands
 * The registry calls are control-plane calls (one thread at a time: the
 * daemon's loop, a tool's main, a driver's open and close); a pointer from
 * node_bitmap_find stays valid until that thread removes the bitmap.
 * Marking runs on any thread, under the bitmap's own lock.
 */
#ifndef STRATA_DIRTY_H
#define STRATA_DIRTY_H

#include <stdbool.h>
#include <stdint.h>

#include "block/node.h"
#include "util/error.h"

struct dirty_bitmap;

/* A clean bitmap over SIZE bytes; GRANULARITY is a power of two >= 512.
 * NULL when out of memory. */
struct dirty_bitmap *dirty_new (uint64_t size, uint32_t granularity);
void dirty_free (struct dirty_bitmap *bm);

uint32_t dirty_granularity (const struct dirty_bitmap *bm);
/* Mark or clear every piece that [OFFSET, OFFSET+LEN) touches (callers
 * clear what they are about to copy, in whole pieces). */
void dirty_set (struct dirty_bitmap *bm, uint64_t offset, uint64_t len);
void dirty_clear (struct dirty_bitmap *bm, uint64_t offset, uint64_t len);
/* Bytes marked (pieces times the granularity, the last one cut to the
 * size). */
uint64_t dirty_count (struct dirty_bitmap *bm);
/* The first dirty run at or after FROM (else from 0), at most MAX bytes
 * (at least one piece), as *OFFSET and *LEN; false when all is clean. */
bool dirty_next (struct dirty_bitmap *bm, uint64_t from, uint64_t max,
                 uint64_t *offset, uint64_t *len);

/* Write-blocking: writes to the node do not mark BM; each calls SYNC
 * instead, after the node's own write and before the request ends (so
 * the writer waits for it), with what was written (IOV for data, NULL for
 * zeroes and discards).  SYNC handles its own errors.  Set before
 * attaching. */
enum node_write_kind {
  NODE_WRITE_DATA,
  NODE_WRITE_ZEROES,
  NODE_WRITE_DISCARD
};
typedef void (*dirty_sync_fn) (void *opaque, enum node_write_kind kind,
                               uint64_t offset, uint64_t len,
                               const struct iovec *iov, int iovcnt);
void dirty_set_sync (struct dirty_bitmap *bm, dirty_sync_fn fn, void *opaque);

/* Attach BM to NODE (its writes mark it from now on) or detach it; a
 * detach waits for the writes that are calling its SYNC. */
bool node_dirty_attach (strata_node *node, struct dirty_bitmap *bm);
void node_dirty_detach (strata_node *node, struct dirty_bitmap *bm);
/* For node.c: [OFFSET, OFFSET+LEN) of NODE was written (KIND, IOV) with
 * RESULT (a failed write marks every bitmap, write-blocking ones too). */
void node_dirty_write (strata_node *node, enum node_write_kind kind,
                       uint64_t offset, uint64_t len, const struct iovec *iov,
                       int iovcnt, int result);

/* The registry of named bitmaps. */
#define DIRTY_PERSISTENT (1u << 0)   /* stored in the image */
#define DIRTY_DISABLED (1u << 1)     /* not recording */
#define DIRTY_INCONSISTENT (1u << 2) /* found in use: data unusable */
#define DIRTY_FLAGS_MASK 7u
#define DIRTY_MIN_GRANULARITY 512u
#define DIRTY_MAX_GRANULARITY (1u << 31)
#define DIRTY_MAX_NAME 1023 /* bytes, QEMU's BDRV_BITMAP_MAX_NAME_SIZE */

/* Add bitmap NAME to NODE, covering its current length, clean, with FLAGS
 * (DIRTY_*); it records from now on unless disabled or inconsistent.  The
 * node owns it.  Fails (QEMU's texts) when the name is empty, too long or
 * taken, or the granularity is not a power of two in 512..2^31. */
struct dirty_bitmap *node_bitmap_add (strata_node *node, const char *name,
                                      uint64_t granularity, unsigned flags,
                                      strata_error **errp);
/* NAME on NODE, or NULL (errp: "Dirty bitmap 'NAME' not found"). */
struct dirty_bitmap *node_bitmap_find (strata_node *node, const char *name,
                                       strata_error **errp);
/* Remove and free NAME; a busy bitmap is refused. */
bool node_bitmap_remove (strata_node *node, const char *name,
                         strata_error **errp);
/* NODE's named bitmaps, in the order they were added, as a
 * NULL-terminated array the caller frees (not the bitmaps); *N their
 * number.  NULL when out of memory. */
struct dirty_bitmap **node_bitmaps (strata_node *node, size_t *n);
/* Every named bitmap of NODE to SIZE bytes (node.c, after a resize);
 * false when out of memory. */
bool node_bitmaps_resize (strata_node *node, uint64_t size);
/* Detach and free every named bitmap of NODE (node.c, after the driver's
 * close stored the persistent ones). */
void node_bitmaps_drop (strata_node *node);

const char *dirty_name (const struct dirty_bitmap *bm); /* NULL: unnamed */
unsigned dirty_flags (const struct dirty_bitmap *bm);   /* DIRTY_* */
bool dirty_recording (const struct dirty_bitmap *bm);
uint64_t dirty_size (const struct dirty_bitmap *bm);
/* Change DIRTY_DISABLED, DIRTY_PERSISTENT or DIRTY_INCONSISTENT. */
void dirty_set_flag (struct dirty_bitmap *bm, unsigned flag, bool on);
/* Busy: a count of users; node_bitmap_remove refuses while it is > 0. */
void dirty_busy_get (struct dirty_bitmap *bm);
void dirty_busy_put (struct dirty_bitmap *bm);
bool dirty_busy (const struct dirty_bitmap *bm);
/* Clear every piece. */
void dirty_clear_all (struct dirty_bitmap *bm);
/* DST |= SRC; the two must have one size and granularity (else false,
 * with QEMU's text). */
bool dirty_merge (struct dirty_bitmap *dst, struct dirty_bitmap *src,
                  strata_error **errp);
/* Bitmap bits as stored in files (qcow2.txt "Bitmap data"): bit I of the
 * bitmap is bit I % 8 of byte I / 8.  Copy LEN bytes starting at byte
 * START of that serialisation out to BUF (bits past the end read as 0),
 * or OR LEN bytes from BUF in.  dirty_serialized_size: the bytes the
 * whole bitmap takes. */
uint64_t dirty_serialized_size (const struct dirty_bitmap *bm);
void dirty_serialize (struct dirty_bitmap *bm, uint64_t start, uint64_t len,
                      uint8_t *buf);
void dirty_deserialize_or (struct dirty_bitmap *bm, uint64_t start,
                           uint64_t len, const uint8_t *buf);
/* Grow or shrink to SIZE bytes (pieces past the old end are clean);
 * false when out of memory. */
bool dirty_resize (struct dirty_bitmap *bm, uint64_t size);

#endif
