/* strata: qcow2 metadata table cache.
 *
 * L2 tables and refcount blocks are one cluster each and are cached here,
 * keyed by their host offset, evicting the least recently used.  The cache
 * is write-through: whoever changes a table writes the changed bytes to the
 * file in the same critical section (see refcount.c and cluster.c for the
 * order), so an entry is never dirty and eviction never does I/O.  All
 * calls happen under node->lock.
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

static struct qcow2_cache_entry *
cache_slot (struct qcow2_cache *c, uint64_t offset, bool *hit)
{
  struct qcow2_cache_entry *victim = &c->e[0];

  for (unsigned i = 0; i < c->n; i++) {
    if (c->e[i].offset == offset) {
      *hit = true;
      c->e[i].lru = ++c->tick;
      return &c->e[i];
    }
    if (c->e[i].lru < victim->lru)
      victim = &c->e[i];
  }
  *hit = false;
  return victim;
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
  struct qcow2_cache_entry *e = cache_slot (c, offset, &hit);
  int r;

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
qcow2_cache_put_locked (struct qcow2_cache *c, uint64_t offset,
                        const uint8_t *table)
{
  bool hit;
  struct qcow2_cache_entry *e = cache_slot (c, offset, &hit);
  int r;

  if (!hit && (r = cache_fill (e, c, offset)) < 0)
    return r;
  memcpy (e->buf, table, c->table_size);
  return 0;
}

void
qcow2_cache_forget_locked (struct qcow2_cache *c, uint64_t offset)
{
  for (unsigned i = 0; i < c->n; i++)
    if (c->e[i].offset == offset)
      c->e[i].offset = 0, c->e[i].lru = 0;
}
