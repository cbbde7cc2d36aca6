/* strata: in-memory dirty bitmaps; see dirty.h.
 *
 * One bit per piece in 64-bit words, a count of the set bits kept up to
 * date, the bitmap's mutex around both.  Nodes keep their bitmaps in a
 * short singly linked list (node->dirty) changed and walked under
 * list_lock; node->ndirty, read without the lock, lets writes to a node
 * without bitmaps skip it.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "block/dirty.h"
#include "util/checked.h"

struct dirty_bitmap {
  pthread_mutex_t lock;
  uint64_t size;  /* bytes covered */
  unsigned gbits; /* log2 of the granularity */
  uint64_t nbits; /* pieces */
  uint64_t nset;  /* pieces marked */
  uint64_t *words;
  strata_node *node;  /* attached to, or NULL */
  dirty_sync_fn sync; /* write-blocking, or NULL */
  void *sync_opaque;
  struct dirty_bitmap *next;
};

/* Writers (node_dirty_write) read the lists, attach and detach change
 * them: a detach waits for the SYNC calls in progress. */
static pthread_rwlock_t list_lock = PTHREAD_RWLOCK_INITIALIZER;

struct dirty_bitmap *
dirty_new (uint64_t size, uint32_t granularity)
{
  struct dirty_bitmap *bm;
  unsigned gbits = 0;

  if (granularity < 512 || (granularity & (granularity - 1)))
    return NULL;
  while ((1u << gbits) < granularity)
    gbits++;
  if (!(bm = calloc (1, sizeof *bm)))
    return NULL;
  bm->size = size;
  bm->gbits = gbits;
  bm->nbits = (size + granularity - 1) >> gbits;
  bm->words = calloc ((bm->nbits + 63) / 64 + 1, sizeof *bm->words);
  if (!bm->words) {
    free (bm);
    return NULL;
  }
  pthread_mutex_init (&bm->lock, NULL);
  return bm;
}

void
dirty_free (struct dirty_bitmap *bm)
{
  if (!bm)
    return;
  pthread_mutex_destroy (&bm->lock);
  free (bm->words);
  free (bm);
}

uint32_t
dirty_granularity (const struct dirty_bitmap *bm)
{
  return 1u << bm->gbits;
}

/* Pieces [*FIRST, *END) that [OFFSET, OFFSET+LEN) touches, cut to the
 * bitmap; false when none. */
static bool
pieces (const struct dirty_bitmap *bm, uint64_t offset, uint64_t len,
        uint64_t *first, uint64_t *end)
{
  if (len == 0 || offset >= bm->size)
    return false;
  len = MIN (len, bm->size - offset);
  *first = offset >> bm->gbits;
  *end = ((offset + len - 1) >> bm->gbits) + 1;
  return true;
}

/* Set (VALUE) or clear the bits [FIRST, END); bm->lock held. */
static void
change (struct dirty_bitmap *bm, uint64_t first, uint64_t end, bool value)
{
  for (uint64_t i = first; i < end; i++) {
    uint64_t bit = 1ull << (i % 64), *w = &bm->words[i / 64];

    if (!!(*w & bit) == value)
      continue;
    *w ^= bit;
    bm->nset += value ? 1 : -1;
  }
}

void
dirty_set (struct dirty_bitmap *bm, uint64_t offset, uint64_t len)
{
  uint64_t first, end;

  if (!pieces (bm, offset, len, &first, &end))
    return;
  pthread_mutex_lock (&bm->lock);
  change (bm, first, end, true);
  pthread_mutex_unlock (&bm->lock);
}

void
dirty_clear (struct dirty_bitmap *bm, uint64_t offset, uint64_t len)
{
  uint64_t first, end;

  if (!pieces (bm, offset, len, &first, &end))
    return;
  pthread_mutex_lock (&bm->lock);
  change (bm, first, end, false);
  pthread_mutex_unlock (&bm->lock);
}

uint64_t
dirty_count (struct dirty_bitmap *bm)
{
  uint64_t n, last;

  pthread_mutex_lock (&bm->lock);
  n = bm->nset << bm->gbits;
  last = bm->nbits - 1;
  /* The last piece may be short. */
  if (bm->nset && (bm->words[last / 64] & (1ull << (last % 64))))
    n -= (bm->nbits << bm->gbits) - bm->size;
  pthread_mutex_unlock (&bm->lock);
  return n;
}

/* The first set bit at or after FROM, or nbits; bm->lock held. */
static uint64_t
find_set (const struct dirty_bitmap *bm, uint64_t from)
{
  for (uint64_t i = from; i < bm->nbits;) {
    uint64_t w = bm->words[i / 64] >> (i % 64);

    if (w)
      return MIN (i + (uint64_t)__builtin_ctzll (w), bm->nbits);
    i = (i / 64 + 1) * 64;
  }
  return bm->nbits;
}

bool
dirty_next (struct dirty_bitmap *bm, uint64_t from, uint64_t max,
            uint64_t *offset, uint64_t *len)
{
  uint64_t i, j, limit;

  pthread_mutex_lock (&bm->lock);
  i = find_set (bm, MIN (from >> bm->gbits, bm->nbits));
  if (i == bm->nbits)
    i = find_set (bm, 0);
  if (i == bm->nbits) {
    pthread_mutex_unlock (&bm->lock);
    return false;
  }
  limit = MAX (max >> bm->gbits, 1);
  for (j = i + 1; j < bm->nbits && j - i < limit; j++)
    if (!(bm->words[j / 64] & (1ull << (j % 64))))
      break;
  pthread_mutex_unlock (&bm->lock);
  *offset = i << bm->gbits;
  *len = MIN (j << bm->gbits, bm->size) - *offset;
  return true;
}

void
dirty_set_sync (struct dirty_bitmap *bm, dirty_sync_fn fn, void *opaque)
{
  bm->sync = fn;
  bm->sync_opaque = opaque;
}

bool
node_dirty_attach (strata_node *node, struct dirty_bitmap *bm)
{
  pthread_rwlock_wrlock (&list_lock);
  if (bm->node) {
    pthread_rwlock_unlock (&list_lock);
    return false;
  }
  bm->node = node;
  bm->next = node->dirty;
  node->dirty = bm;
  atomic_fetch_add (&node->ndirty, 1);
  pthread_rwlock_unlock (&list_lock);
  return true;
}

void
node_dirty_detach (strata_node *node, struct dirty_bitmap *bm)
{
  pthread_rwlock_wrlock (&list_lock);
  for (struct dirty_bitmap **p = &node->dirty; *p; p = &(*p)->next)
    if (*p == bm) {
      *p = bm->next;
      bm->next = NULL;
      bm->node = NULL;
      atomic_fetch_sub (&node->ndirty, 1);
      break;
    }
  pthread_rwlock_unlock (&list_lock);
}

void
node_dirty_write (strata_node *node, enum node_write_kind kind,
                  uint64_t offset, uint64_t len, const struct iovec *iov,
                  int iovcnt, int result)
{
  if (atomic_load_explicit (&node->ndirty, memory_order_acquire) == 0)
    return;
  pthread_rwlock_rdlock (&list_lock);
  for (struct dirty_bitmap *bm = node->dirty; bm; bm = bm->next)
    if (bm->sync && result >= 0)
      bm->sync (bm->sync_opaque, kind, offset, len, iov, iovcnt);
    else
      dirty_set (bm, offset, len);
  pthread_rwlock_unlock (&list_lock);
}
