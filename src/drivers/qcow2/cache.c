/* strata: qcow2 metadata table cache.
 *
 * Refcount blocks (one cluster each) and slices of L2 tables (QEMU's
 * l2-cache-entry-size: a power of two from 512 bytes to the cluster
 * size, 4 KiB by default; qcow2.c) are cached here, keyed by their host
 * offset, evicting the least recently used clean entry.  A slice is
 * the unit of everything: a miss reads one slice, a dirty slice is
 * written back alone, so memory and I/O follow the slices a workload
 * touches, not the tables.  Buffers are allocated at first use.  Most changes
 * are written through (the changed bytes, in the same critical section; see
 * refcount.c and cluster.c for the order).  The allocating write path instead
 * leaves two kinds of change dirty, as QEMU does: refcount increments of new
 * data clusters and the L2 entries that map them.  qcow2_writeback_locked
 * writes them in dependency order:
 *
 *   dirty refcount blocks -> flush (data, refcounts) -> dirty L2 tables
 *
 * so an L2 entry never reaches the disk before the refcount and the data
 * of the cluster it maps.  It runs at flush, close, before anything that
 * copies or orders against a table (COW of an L2 table, freeing clusters,
 * check), and when every entry of a cache is dirty and one must go.  A
 * crash loses the unflushed guest writes and leaks nothing.  All calls
 * happen under node->lock.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"

bool
qcow2_cache_init (struct qcow2_cache *c, unsigned n, size_t table_size)
{
  unsigned nb = 16;

  while (nb < 2 * n)
    nb *= 2;
  c->e = calloc (n, sizeof *c->e);
  c->bucket = malloc (nb * sizeof *c->bucket);
  if (!c->e || !c->bucket) {
    free (c->e);
    free (c->bucket);
    c->e = NULL;
    c->bucket = NULL;
    return false;
  }
  for (unsigned i = 0; i < nb; i++)
    c->bucket[i] = -1;
  for (unsigned i = 0; i < n; i++)
    c->e[i].next = -1;
  c->nbuckets = nb;
  c->n = n;
  c->last = -1;
  c->table_size = table_size;
  c->tick = 0;
  return true;
}

void
qcow2_cache_destroy (struct qcow2_cache *c)
{
  for (unsigned i = 0; c->e && i < c->n; i++)
    free (c->e[i].buf);
  free (c->e);
  free (c->bucket);
  c->e = NULL;
  c->bucket = NULL;
  c->n = 0;
}

/* ---- the index: offset -> entry, so that a lookup is not a scan ---- */

static unsigned
cache_hash (const struct qcow2_cache *c, uint64_t offset)
{
  /* Offsets are cluster-aligned: mix the bits above 512. */
  return (unsigned) (((offset >> 9) * UINT64_C (0x9e3779b97f4a7c15)) >> 32)
         & (c->nbuckets - 1);
}

static inline int
cache_find (const struct qcow2_cache *c, uint64_t offset)
{
  if (c->last >= 0 && c->e[c->last].offset == offset)
    return c->last;
  for (int i = c->bucket[cache_hash (c, offset)]; i >= 0; i = c->e[i].next)
    if (c->e[i].offset == offset)
      return i;
  return -1;
}

/* Give entry E a new OFFSET (0: empty), keeping the index true. */
static void
cache_set_offset (struct qcow2_cache *c, struct qcow2_cache_entry *e,
                  uint64_t offset)
{
  int i = (int) (e - c->e);

  if (e->offset) {
    int *pp = &c->bucket[cache_hash (c, e->offset)];
    while (*pp != i)
      pp = &c->e[*pp].next;
    *pp = e->next;
    e->next = -1;
  }
  e->offset = offset;
  if (offset) {
    int *b = &c->bucket[cache_hash (c, offset)];
    e->next = *b;
    *b = i;
  }
  if (c->last == i)
    c->last = -1;
}

/* The entry for OFFSET, or the clean entry to replace (NULL when every
 * entry is dirty). */
static struct qcow2_cache_entry *
cache_slot (struct qcow2_cache *c, uint64_t offset, bool *hit)
{
  struct qcow2_cache_entry *victim = NULL;
  int i = offset ? cache_find (c, offset) : -1;

  if (i >= 0) {
    *hit = true;
    c->e[i].lru = ++c->tick;
    c->last = i;
    return &c->e[i];
  }
  for (unsigned k = 0; k < c->n; k++)
    if (!c->e[k].dirty && (!victim || c->e[k].lru < victim->lru))
      victim = &c->e[k];
  *hit = false;
  return victim;
}

/* Like cache_slot, writing dirty entries back when none is clean. */
static int
cache_slot_locked (strata_node *node, struct qcow2_cache *c, uint64_t offset,
                   bool *hit, struct qcow2_cache_entry **e)
{
  struct qcow2_state *s = node->opaque;
  int r;

  if ((*e = cache_slot (c, offset, hit)))
    return 0;
  if ((r = c == &s->rc_cache ? qcow2_writeback_refcounts_locked (node)
                             : qcow2_writeback_locked (node)) < 0)
    return r;
  *e = cache_slot (c, offset, hit);
  return *e ? 0 : -EIO;
}

static int
cache_fill (struct qcow2_cache_entry *e, struct qcow2_cache *c,
            uint64_t offset)
{
  if (!e->buf && !(e->buf = malloc (c->table_size)))
    return -ENOMEM;
  cache_set_offset (c, e, offset);
  e->lru = ++c->tick;
  return 0;
}

int
qcow2_cache_get_locked (strata_node *node, struct qcow2_cache *c,
                        uint64_t offset, uint8_t **table)
{
  bool hit;
  struct qcow2_cache_entry *e;
  int i = offset ? cache_find (c, offset) : -1;
  int r;

  /* The common case first: a hit is one hash probe. */
  if (i >= 0) {
    c->e[i].lru = ++c->tick;
    c->last = i;
    *table = c->e[i].buf;
    return 0;
  }
  if ((r = cache_slot_locked (node, c, offset, &hit, &e)) < 0)
    return r;
  if (!hit) {
    if ((r = cache_fill (e, c, offset)) < 0)
      return r;
    r = node_pread (node->file, offset, e->buf, c->table_size, 0);
    if (r < 0) {
      cache_set_offset (c, e, 0);
      return r;
    }
  }
  *table = e->buf;
  return 0;
}

int
qcow2_cache_put_locked (strata_node *node, struct qcow2_cache *c,
                        uint64_t offset, const uint8_t *table)
{
  bool hit;
  struct qcow2_cache_entry *e;
  int r;

  if ((r = cache_slot_locked (node, c, offset, &hit, &e)) < 0)
    return r;
  if (!hit && (r = cache_fill (e, c, offset)) < 0)
    return r;
  memcpy (e->buf, table, c->table_size);
  return 0;
}

uint8_t *
qcow2_cache_peek_locked (struct qcow2_cache *c, uint64_t offset)
{
  int i = offset ? cache_find (c, offset) : -1;

  return i >= 0 ? c->e[i].buf : NULL;
}

void
qcow2_cache_forget_locked (struct qcow2_cache *c, uint64_t offset)
{
  /* A dirty entry is the only copy of its changes: keep it, and let the
   * write-back write it whole. */
  int i = offset ? cache_find (c, offset) : -1;

  if (i >= 0 && !c->e[i].dirty) {
    cache_set_offset (c, &c->e[i], 0);
    c->e[i].lru = 0;
  }
}

void
qcow2_cache_mark_dirty_locked (struct qcow2_cache *c, uint64_t offset)
{
  int i = offset ? cache_find (c, offset) : -1;

  if (i >= 0 && !c->e[i].dirty) {
    c->e[i].dirty = true;
    c->ndirty++;
  }
}

/* Write every dirty entry of C whole (checked against the metadata of
 * other kinds than IGNORE). */
static int
cache_write_dirty (strata_node *node, struct qcow2_cache *c, unsigned ignore,
                   const char *what)
{
  int r;

  for (unsigned i = 0; i < c->n && c->ndirty; i++) {
    struct qcow2_cache_entry *e = &c->e[i];
    if (!e->dirty)
      continue;
    if ((r = qcow2_overlap_check_locked (node, e->offset, c->table_size,
                                         ignore, what, UINT64_MAX)) < 0
        || (r = node_pwrite (node->file, e->offset, e->buf, c->table_size,
                             0)) < 0)
      return r;
    e->dirty = false;
    c->ndirty--;
  }
  return 0;
}

int
qcow2_writeback_refcounts_locked (strata_node *node)
{
  struct qcow2_state *s = node->opaque;
  return cache_write_dirty (node, &s->rc_cache, QCOW2_META_REFBLOCK,
                            "refcount block");
}

int
qcow2_writeback_locked (strata_node *node)
{
  struct qcow2_state *s = node->opaque;
  int r;

  if ((r = qcow2_writeback_refcounts_locked (node)) < 0 || !s->l2_cache.ndirty)
    return r;
  /* The data and refcounts of what the L2 entries map, durable first. */
  if ((r = node_flush (node->file)) < 0)
    return r;
  return cache_write_dirty (node, &s->l2_cache, QCOW2_META_L2, "L2 table");
}
