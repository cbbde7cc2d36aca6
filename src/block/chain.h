/* strata: walking a backing chain (src/block/chain.c).
 *
 *   [copy-on-read] --file--> [qcow2 top] --backing--> [qcow2 mid]
 *                                                          |
 *                                      [qcow2 base] <--backing
 *
 * The chain below a node is what chain_next() visits: a filter's `file`,
 * a format's `backing`.  A "layer" is a node of the chain that is not a
 * filter; the depth of a layer counts layers (TOP's backing layer is at
 * depth 1), as block status and qemu-img count them.  This is the one
 * walker: the copy-on-read filter, block-stream and the strata-img chain
 * commands all look layers up through it, so a name means the same layer
 * to each of them.
 *
 * Nothing here takes a reference or a lock: the graph must not change
 * during a call (the caller holds the graph lock or owns the chain).
 */
#ifndef STRATA_CHAIN_H
#define STRATA_CHAIN_H

#include <stdbool.h>
#include <stdint.h>

#include "block/node.h"

/* The next node down: a filter's child, a format's backing, or NULL. */
strata_node *chain_next (strata_node *n);
/* The next layer below N, skipping filters above and below N's format
 * node (strata_backing()), or NULL. */
strata_node *chain_backing (strata_node *n);
/* The last node of N's chain (N itself when nothing is below it). */
strata_node *chain_bottom (strata_node *n);
/* Is NODE strictly below TOP (through filters)? */
bool chain_contains (strata_node *top, strata_node *node);
/* The depth of layer NODE below TOP (1 = the first layer below TOP's
 * format node), or -1 when NODE is not a layer below TOP. */
int chain_depth (strata_node *top, strata_node *node);

/* QEMU's allocated-above test: is the start of [OFFSET, OFFSET+*N)
 * allocated in a layer from FROM down to the one above BASE (BASE NULL:
 * to the bottom)?  *N shrinks to where the answer may change: each layer
 * that does not allocate the start bounds the extent the layers under it
 * may report, so a range never runs from one layer's data into data an
 * upper layer overrides.  Past a shorter layer's end counts as allocated
 * (zeros that layer defines).  Block status is shallow: no lseek below.
 * 0 or a negative errno. */
int chain_allocated_above (strata_node *from, strata_node *base,
                           uint64_t offset, uint64_t *n, bool *allocated);

/* How chain_find_file() matches NAME against a layer L; ABOVE is the
 * layer just above L (TOP's format node for the first one).  A layer
 * matches when any of the requested rules holds:
 *   CHAIN_MATCH_PATH      NAME is L's file name, or the same file taken
 *                         from the current directory (block-stream's
 *                         `base`, strata-img stream -b, rebase's new base)
 *   CHAIN_MATCH_RELATIVE  NAME taken from ABOVE's directory, as a backing
 *                         name recorded in ABOVE would be, is L's file
 *                         (block-stream's `base`, strata-img commit -b)
 *   CHAIN_MATCH_RECORDED  NAME is the backing name ABOVE's header records
 *                         (strata-img stream -b and commit -b) */
#define CHAIN_MATCH_PATH STRATA_CHAIN_PATH
#define CHAIN_MATCH_RELATIVE STRATA_CHAIN_RELATIVE
#define CHAIN_MATCH_RECORDED STRATA_CHAIN_RECORDED

/* The first layer below TOP that NAME names by the rules in MATCH, or
 * NULL.  *ABOVE (ABOVE may be NULL) gets the layer above it.  Borrowed:
 * the caller takes a reference if it keeps it. */
strata_node *chain_find_file (strata_node *top, const char *name,
                              unsigned match, strata_node **above);
/* The node named NODE_NAME if it is TOP or below TOP, else NULL.
 * Borrowed. */
strata_node *chain_find_node (strata_node *top, const char *node_name);

/* NAME as a backing name recorded in the image FILENAME resolves: from
 * FILENAME's directory unless NAME is absolute (caller frees; NULL when
 * out of memory). */
char *chain_resolve_name (const char *filename, const char *name);
/* The backing name ABOVE's header records, or NULL.  Borrowed from the
 * driver: valid until ABOVE's header changes. */
const char *chain_recorded_name (strata_node *above);
/* The layer just above LAYER in TOP's chain (TOP's format node for the
 * first layer below it), or NULL when LAYER is not a layer below TOP. */
strata_node *chain_above (strata_node *top, strata_node *layer);
/* The name to record in TOP's header so that it names LAYER, a layer
 * below TOP, whose ABOVE is chain_above(): what ABOVE records when that means
 * the same file from TOP's directory (an absolute name, a protocol URI, or
 * ABOVE in TOP's directory), else LAYER's absolute path.  Caller frees; NULL
 * with errno set on failure. */
char *chain_backing_name_for (strata_node *top, strata_node *layer);

#endif
