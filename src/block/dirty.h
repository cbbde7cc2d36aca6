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
 */
#ifndef STRATA_DIRTY_H
#define STRATA_DIRTY_H

#include <stdbool.h>
#include <stdint.h>

#include "block/node.h"

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

#endif
