/* strata: in-memory dirty bitmaps; see dirty.h.
 *
 * One bit per piece in 64-bit words, a count of the set bits kept up to
 * date, the bitmap's mutex around both.  Nodes keep their bitmaps in a
 * short singly linked list (node->dirty) changed and walked under
 * list_lock; node->ndirty, read without the lock, lets writes to a node
 * without bitmaps skip it.
 *
 * Named bitmaps are on the same list (so a write marks them as it marks a
 * job's), with their name and flags; disabled and inconsistent ones are
 * skipped by writes.  The registry calls change the list under list_lock
 * like attach and detach.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

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
  char *name;             /* named (registry), or NULL */
  _Atomic unsigned flags; /* DIRTY_* */
  atomic_int busy;        /* users */
  uint64_t seq;           /* order of addition */
};

static atomic_uint_fast64_t add_seq;

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
  free (bm->name);
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
    if (atomic_load (&bm->flags) & (DIRTY_DISABLED | DIRTY_INCONSISTENT))
      continue;
    else if (bm->sync && result >= 0)
      bm->sync (bm->sync_opaque, kind, offset, len, iov, iovcnt);
    else
      dirty_set (bm, offset, len);
  pthread_rwlock_unlock (&list_lock);
}

/* The named bitmap NAME on NODE; list_lock held. */
static struct dirty_bitmap *
lookup (strata_node *node, const char *name)
{
  for (struct dirty_bitmap *bm = node->dirty; bm; bm = bm->next)
    if (bm->name && strcmp (bm->name, name) == 0)
      return bm;
  return NULL;
}

struct dirty_bitmap *
node_bitmap_add (strata_node *node, const char *name, uint64_t granularity,
                 unsigned flags, strata_error **errp)
{
  struct dirty_bitmap *bm;
  int64_t len = node_length (node);

  if (!*name) {
    error_set (errp, EINVAL, "Bitmap name cannot be empty");
    return NULL;
  }
  if (strlen (name) > DIRTY_MAX_NAME) {
    error_set (errp, EINVAL, "Bitmap name is too long");
    return NULL;
  }
  if (granularity < DIRTY_MIN_GRANULARITY
      || granularity > DIRTY_MAX_GRANULARITY
      || (granularity & (granularity - 1))) {
    error_set (errp, EINVAL,
               "Granularity must be power of 2 and at least 512");
    return NULL;
  }
  if (len < 0) {
    error_set (errp, (int)-len, "%s: cannot get the length: %s",
               node->filename, strerror ((int)-len));
    return NULL;
  }
  if (!(bm = dirty_new ((uint64_t)len, (uint32_t)granularity))
      || !(bm->name = strdup (name))) {
    dirty_free (bm);
    error_set (errp, ENOMEM, "out of memory");
    return NULL;
  }
  bm->flags = flags & DIRTY_FLAGS_MASK;
  bm->seq = atomic_fetch_add (&add_seq, 1);
  pthread_rwlock_wrlock (&list_lock);
  if (lookup (node, name)) {
    pthread_rwlock_unlock (&list_lock);
    dirty_free (bm);
    error_set (errp, EEXIST, "Bitmap already exists: %s", name);
    return NULL;
  }
  bm->node = node;
  bm->next = node->dirty;
  node->dirty = bm;
  atomic_fetch_add (&node->ndirty, 1);
  pthread_rwlock_unlock (&list_lock);
  return bm;
}

struct dirty_bitmap *
node_bitmap_find (strata_node *node, const char *name, strata_error **errp)
{
  struct dirty_bitmap *bm;

  pthread_rwlock_rdlock (&list_lock);
  bm = lookup (node, name);
  pthread_rwlock_unlock (&list_lock);
  if (!bm)
    error_set (errp, ENOENT, "Dirty bitmap '%s' not found", name);
  return bm;
}

bool
node_bitmap_remove (strata_node *node, const char *name, strata_error **errp)
{
  struct dirty_bitmap *bm = node_bitmap_find (node, name, errp);

  if (!bm)
    return false;
  if (dirty_busy (bm)) {
    error_set (errp, EBUSY,
               "Bitmap '%s' is currently in use by another operation and "
               "cannot be used",
               name);
    return false;
  }
  node_dirty_detach (node, bm);
  dirty_free (bm);
  return true;
}

static int
seq_cmp (const void *a, const void *b)
{
  uint64_t x = (*(struct dirty_bitmap *const *)a)->seq;
  uint64_t y = (*(struct dirty_bitmap *const *)b)->seq;

  return x < y ? -1 : x > y;
}

struct dirty_bitmap **
node_bitmaps (strata_node *node, size_t *n)
{
  struct dirty_bitmap **l;
  size_t k = 0;

  pthread_rwlock_rdlock (&list_lock);
  for (struct dirty_bitmap *bm = node->dirty; bm; bm = bm->next)
    k += bm->name != NULL;
  if ((l = calloc (k + 1, sizeof *l))) {
    k = 0;
    for (struct dirty_bitmap *bm = node->dirty; bm; bm = bm->next)
      if (bm->name)
        l[k++] = bm;
  }
  pthread_rwlock_unlock (&list_lock);
  if (!l)
    return NULL;
  qsort (l, k, sizeof *l, seq_cmp);
  *n = k;
  return l;
}

bool
node_bitmaps_resize (strata_node *node, uint64_t size)
{
  bool ok = true;

  pthread_rwlock_rdlock (&list_lock);
  for (struct dirty_bitmap *bm = node->dirty; bm; bm = bm->next)
    if (bm->name)
      ok &= dirty_resize (bm, size);
  pthread_rwlock_unlock (&list_lock);
  return ok;
}

void
node_bitmaps_drop (strata_node *node)
{
  struct dirty_bitmap *gone = NULL;

  pthread_rwlock_wrlock (&list_lock);
  for (struct dirty_bitmap **p = &node->dirty; *p;) {
    struct dirty_bitmap *bm = *p;
    if (!bm->name) {
      p = &bm->next;
      continue;
    }
    *p = bm->next;
    bm->node = NULL;
    bm->next = gone;
    gone = bm;
    atomic_fetch_sub (&node->ndirty, 1);
  }
  pthread_rwlock_unlock (&list_lock);
  while (gone) {
    struct dirty_bitmap *next = gone->next;
    dirty_free (gone);
    gone = next;
  }
}

const char *
dirty_name (const struct dirty_bitmap *bm)
{
  return bm->name;
}

unsigned
dirty_flags (const struct dirty_bitmap *bm)
{
  return atomic_load (&bm->flags);
}

bool
dirty_recording (const struct dirty_bitmap *bm)
{
  return !(dirty_flags (bm) & (DIRTY_DISABLED | DIRTY_INCONSISTENT));
}

uint64_t
dirty_size (const struct dirty_bitmap *bm)
{
  return bm->size;
}

void
dirty_set_flag (struct dirty_bitmap *bm, unsigned flag, bool on)
{
  if (on)
    atomic_fetch_or (&bm->flags, flag & DIRTY_FLAGS_MASK);
  else
    atomic_fetch_and (&bm->flags, ~flag);
}

void
dirty_busy_get (struct dirty_bitmap *bm)
{
  atomic_fetch_add (&bm->busy, 1);
}

void
dirty_busy_put (struct dirty_bitmap *bm)
{
  atomic_fetch_sub (&bm->busy, 1);
}

bool
dirty_busy (const struct dirty_bitmap *bm)
{
  return atomic_load (&bm->busy) > 0;
}

void
dirty_clear_all (struct dirty_bitmap *bm)
{
  pthread_mutex_lock (&bm->lock);
  memset (bm->words, 0, ((bm->nbits + 63) / 64 + 1) * sizeof *bm->words);
  bm->nset = 0;
  pthread_mutex_unlock (&bm->lock);
}

bool
dirty_merge (struct dirty_bitmap *dst, struct dirty_bitmap *src,
             strata_error **errp)
{
  uint64_t from = 0, off, len;

  if (dst->size != src->size) {
    error_set (errp, EINVAL,
               "Bitmaps are of different sizes (destination size is %" PRIu64
               ", source size is %" PRIu64 ") and can't be merged",
               dst->size, src->size);
    return false;
  }
  if (dst == src)
    return true;
  /* Run by run: the granularities may differ (a coarser DST takes every
   * piece a run touches). */
  while (dirty_next (src, from, UINT64_MAX, &off, &len) && off >= from) {
    dirty_set (dst, off, len);
    from = off + len;
    if (from >= src->size)
      break;
  }
  return true;
}

uint64_t
dirty_serialized_size (const struct dirty_bitmap *bm)
{
  return (bm->nbits + 7) / 8;
}

void
dirty_serialize (struct dirty_bitmap *bm, uint64_t start, uint64_t len,
                 uint8_t *buf)
{
  uint64_t total = dirty_serialized_size (bm);

  pthread_mutex_lock (&bm->lock);
  for (uint64_t i = 0; i < len; i++) {
    uint64_t b = start + i;
    buf[i] = b < total ? (uint8_t)(bm->words[b / 8] >> (b % 8 * 8)) : 0;
  }
  pthread_mutex_unlock (&bm->lock);
}

void
dirty_deserialize_or (struct dirty_bitmap *bm, uint64_t start, uint64_t len,
                      const uint8_t *buf)
{
  uint64_t total = dirty_serialized_size (bm);

  pthread_mutex_lock (&bm->lock);
  for (uint64_t i = 0; i < len && start + i < total; i++) {
    uint64_t b = start + i, *w = &bm->words[b / 8];
    uint64_t add = (uint64_t)buf[i] << (b % 8 * 8);
    uint64_t last = bm->nbits - b * 8; /* valid bits in this byte */

    if (last < 8)
      add &= ((1ull << last) - 1) << (b % 8 * 8);
    add &= ~*w;
    *w |= add;
    bm->nset += (uint64_t)__builtin_popcountll (add);
  }
  pthread_mutex_unlock (&bm->lock);
}

bool
dirty_resize (struct dirty_bitmap *bm, uint64_t size)
{
  uint64_t nbits = (size + dirty_granularity (bm) - 1) >> bm->gbits;
  size_t nwords = (nbits + 63) / 64 + 1, old = (bm->nbits + 63) / 64 + 1;
  uint64_t *w;

  pthread_mutex_lock (&bm->lock);
  if (nbits < bm->nbits)
    change (bm, nbits, bm->nbits, false);
  w = bm->words;
  if (nwords > old) {
    if (!(w = realloc (bm->words, nwords * sizeof *w))) {
      pthread_mutex_unlock (&bm->lock);
      return false;
    }
    memset (w + old, 0, (nwords - old) * sizeof *w);
  }
  bm->words = w;
  bm->nbits = nbits;
  bm->size = size;
  pthread_mutex_unlock (&bm->lock);
  return true;
}
