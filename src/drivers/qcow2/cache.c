/* strata: qcow2 metadata table cache.
 *
 * L2 tables and refcount blocks are one cluster each and are cached here,
 * keyed by their host offset, evicting the least recently used clean
 * entry.  Most changes are written through (the changed bytes, in the same
 * critical section; see refcount.c and cluster.c for the order).  The
 * allocating write path instead leaves two kinds of change dirty, as QEMU
 * does: refcount increments of new data clusters and the L2 entries that
 * map them.  qcow2_writeback_locked writes them in dependency order:
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
  c->e = calloc (n, sizeof *c->e);
  if (!c->e)
    return false;
  c->n = n;
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
  c->e = NULL;
  c->n = 0;
}

/* The entry for OFFSET, or the clean entry to replace (NULL when every
 * entry is dirty). */
static struct qcow2_cache_entry *
cache_slot (struct qcow2_cache *c, uint64_t offset, bool *hit)
{
  struct qcow2_cache_entry *victim = NULL;

  for (unsigned i = 0; i < c->n; i++) {
    if (c->e[i].offset == offset) {
      *hit = true;
      c->e[i].lru = ++c->tick;
      return &c->e[i];
    }
    if (!c->e[i].dirty && (!victim || c->e[i].lru < victim->lru))
      victim = &c->e[i];
  }
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
  e->offset = offset;
  e->lru = ++c->tick;
  return 0;
}

int
qcow2_cache_get_locked (strata_node *node, struct qcow2_cache *c,
                        uint64_t offset, uint8_t **table)
{
  bool hit;
  struct qcow2_cache_entry *e;
  int r;

  if ((r = cache_slot_locked (node, c, offset, &hit, &e)) < 0)
    return r;
  if (!hit) {
    if ((r = cache_fill (e, c, offset)) < 0)
      return r;
    r = node_pread (node->file, offset, e->buf, c->table_size, 0);
    if (r < 0) {
      e->offset = 0;
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

void
qcow2_cache_forget_locked (struct qcow2_cache *c, uint64_t offset)
{
  /* A dirty entry is the only copy of its changes: keep it, and let the
   * write-back write it whole. */
  for (unsigned i = 0; i < c->n; i++)
    if (c->e[i].offset == offset && !c->e[i].dirty)
      c->e[i].offset = 0, c->e[i].lru = 0;
}

void
qcow2_cache_mark_dirty_locked (struct qcow2_cache *c, uint64_t offset)
{
  for (unsigned i = 0; i < c->n; i++)
    if (c->e[i].offset == offset && !c->e[i].dirty) {
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
