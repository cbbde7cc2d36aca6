/* strata: qcow2 metadata overlap protection (as QEMU's "Preventing invalid
 * write on metadata").
 *
 * A hostile or damaged image can map a guest cluster (or an L2 table, or
 * give a refcount of 0) onto the image's own metadata, so that a guest
 * write would overwrite the header, a table or a refcount block.  Every
 * write to a host cluster is checked first against:
 *
 *   header cluster, active L1 table, refcount table    O(1), from the state
 *   refcount blocks, L2 tables (active and snapshots'),
 *   snapshot table and snapshot L1 tables              binary search in a
 *                                                      sorted set of host
 *                                                      cluster indices
 *
 * The sets are built at open from the refcount table, the L1 tables and
 * the snapshot table, and grow as the driver allocates L2 tables and
 * refcount blocks (neither is ever freed while the node is open).  New
 * metadata is usually placed at the end of the file, so an insert is
 * usually an append.
 *
 * A caught overlap fails the request with EIO and makes the node refuse
 * every later write (QEMU stops the node too); nothing is marked on disk.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"
#include "util/checked.h"
#include "util/cleanup.h"

static const char *
meta_name (unsigned kind)
{
  switch (kind) {
  case QCOW2_META_HEADER: return "image header";
  case QCOW2_META_L1: return "active L1 table";
  case QCOW2_META_REFTABLE: return "refcount table";
  case QCOW2_META_REFBLOCK: return "refcount block";
  case QCOW2_META_L2: return "L2 table";
  default: return "snapshot table or a snapshot's L1 table";
  }
}

/* Index of the first element >= V. */
static size_t
set_lower_bound (const struct qcow2_meta_set *m, uint64_t v)
{
  size_t lo = 0, hi = m->n;

  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (m->idx[mid] < v)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

/* Whether the set holds a cluster index in [first, last]. */
static bool
set_hits (const struct qcow2_meta_set *m, uint64_t first, uint64_t last)
{
  size_t i = set_lower_bound (m, first);
  return i < m->n && m->idx[i] <= last;
}

static int
set_add (struct qcow2_meta_set *m, uint64_t v)
{
  size_t i = set_lower_bound (m, v);

  if (i < m->n && m->idx[i] == v)
    return 0;
  if (m->n == m->cap) {
    size_t cap = m->cap ? m->cap * 2 : 64;
    uint64_t *p = realloc (m->idx, cap * sizeof *p);
    if (!p)
      return -ENOMEM;
    m->idx = p;
    m->cap = cap;
  }
  memmove (m->idx + i + 1, m->idx + i, (m->n - i) * sizeof *m->idx);
  m->idx[i] = v;
  m->n++;
  return 0;
}

static int
cmp_u64 (const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
  return x < y ? -1 : x > y;
}

/* Sort and deduplicate a set filled by appending. */
static void
set_finish (struct qcow2_meta_set *m)
{
  size_t k = 0;

  if (m->n)
    qsort (m->idx, m->n, sizeof *m->idx, cmp_u64);
  for (size_t i = 0; i < m->n; i++)
    if (k == 0 || m->idx[k - 1] != m->idx[i])
      m->idx[k++] = m->idx[i];
  m->n = k;
}

/* Append without keeping the order (set_finish sorts). */
static bool
set_push (struct qcow2_meta_set *m, uint64_t v)
{
  if (m->n == m->cap) {
    size_t cap = m->cap ? m->cap * 2 : 64;
    uint64_t *p = realloc (m->idx, cap * sizeof *p);
    if (!p)
      return false;
    m->idx = p;
    m->cap = cap;
  }
  m->idx[m->n++] = v;
  return true;
}

static void
set_free (struct qcow2_meta_set *m)
{
  free (m->idx);
  *m = (struct qcow2_meta_set){ 0 };
}

/* Add the L2 tables an L1 table (in host byte order) points at. */
static bool
add_l2_tables (struct qcow2_state *s, const uint64_t *l1, uint64_t n)
{
  for (uint64_t i = 0; i < n; i++) {
    uint64_t off = l1[i] & QCOW2_OFFSET_MASK;
    if (off && off % s->cluster_size == 0
        && !set_push (&s->meta_l2, off >> s->cluster_bits))
      return false;
  }
  return true;
}

/* Add the cluster indices of bytes [off, off+len), when sane. */
static bool
add_range (struct qcow2_state *s, uint64_t off, uint64_t len)
{
  uint64_t end;

  if (!len || !checked_add_u64 (off, len, &end) || end > s->file_end)
    return true;  /* not in the file: nothing there to protect */
  for (uint64_t c = off >> s->cluster_bits; c <= (end - 1) >> s->cluster_bits;
       c++)
    if (!set_push (&s->meta_snap, c))
      return false;
  return true;
}

/* Snapshot table (qcow2.txt "Snapshots"): 40-byte fixed part, extra data,
 * id, name, padded to 8 bytes.  Unreadable or insane entries end the walk:
 * protection is best effort for what can be parsed, and the table itself
 * is protected as far as it was walked. */
static int
add_snapshots (strata_node *node, struct qcow2_state *s)
{
  uint8_t h[8], e[40];
  uint64_t off;

  if (node_pread (node->file, 64, h, 8, 0) < 0)
    return 0;
  off = be64_load (h);
  for (uint32_t i = 0; i < s->nb_snapshots; i++) {
    uint64_t l1_off, l1_bytes, len;
    CLEANUP_FREE uint8_t *raw = NULL;
    CLEANUP_FREE uint64_t *l1 = NULL;

    if (off > s->file_end - 40 || node_pread (node->file, off, e, 40, 0) < 0)
      return 0;
    l1_off = be64_load (e);
    l1_bytes = (uint64_t) be32_load (e + 8) * 8;
    len = ROUND_UP (40 + (uint64_t) be32_load (e + 36) + be16_load (e + 12)
                        + be16_load (e + 14), 8);
    if (!add_range (s, off, len))
      return -ENOMEM;
    off += len;
    if (l1_bytes > QCOW2_MAX_L1_BYTES || l1_off % s->cluster_size
        || l1_off > s->file_end || l1_bytes > s->file_end - l1_off)
      continue;
    if (!add_range (s, l1_off, l1_bytes))
      return -ENOMEM;
    if (!l1_bytes || !(raw = malloc (l1_bytes))
        || !(l1 = malloc (l1_bytes)))
      continue;
    if (node_pread (node->file, l1_off, raw, l1_bytes, 0) < 0)
      continue;
    for (uint64_t j = 0; j < l1_bytes / 8; j++)
      l1[j] = be64_load (raw + j * 8);
    if (!add_l2_tables (s, l1, l1_bytes / 8))
      return -ENOMEM;
  }
  return 0;
}

bool
qcow2_overlap_init (strata_node *node, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  for (uint64_t i = 0; i < s->rt_entries; i++) {
    uint64_t off = s->rt[i] & ~0x1ffull;
    if (off && off % s->cluster_size == 0
        && !set_push (&s->meta_rb, off >> s->cluster_bits))
      goto nomem;
  }
  if (!add_l2_tables (s, s->l1, s->l1_size))
    goto nomem;
  if (s->nb_snapshots && add_snapshots (node, s) < 0)
    goto nomem;
  set_finish (&s->meta_rb);
  set_finish (&s->meta_l2);
  set_finish (&s->meta_snap);
  return true;

nomem:
  error_set (errp, ENOMEM, "out of memory");
  return false;
}

void
qcow2_overlap_destroy (struct qcow2_state *s)
{
  set_free (&s->meta_rb);
  set_free (&s->meta_l2);
  set_free (&s->meta_snap);
}

int
qcow2_overlap_add_locked (strata_node *node, unsigned kind, uint64_t host)
{
  struct qcow2_state *s = node->opaque;
  struct qcow2_meta_set *m = kind == QCOW2_META_L2 ? &s->meta_l2
                                                   : &s->meta_rb;
  return set_add (m, host >> s->cluster_bits);
}

/* The kind of metadata bytes [host, host+len) overlap, or 0. */
static unsigned
overlap_kind (const struct qcow2_state *s, uint64_t host, uint64_t len,
              unsigned ignore)
{
  uint64_t end = host + len, first = host >> s->cluster_bits;
  uint64_t last = (end - 1) >> s->cluster_bits;
  uint64_t l1_end = s->l1_offset + (uint64_t) s->l1_size * 8;
  uint64_t rt_end = s->rt_offset + ((uint64_t) s->rt_clusters
                                    << s->cluster_bits);

  if (!(ignore & QCOW2_META_HEADER) && host < s->cluster_size)
    return QCOW2_META_HEADER;
  if (!(ignore & QCOW2_META_L1) && s->l1_size && host < l1_end
      && s->l1_offset < end)
    return QCOW2_META_L1;
  if (!(ignore & QCOW2_META_REFTABLE) && host < rt_end && s->rt_offset < end)
    return QCOW2_META_REFTABLE;
  if (!(ignore & QCOW2_META_REFBLOCK) && set_hits (&s->meta_rb, first, last))
    return QCOW2_META_REFBLOCK;
  if (!(ignore & QCOW2_META_L2) && set_hits (&s->meta_l2, first, last))
    return QCOW2_META_L2;
  if (!(ignore & QCOW2_META_SNAPSHOT) && set_hits (&s->meta_snap, first, last))
    return QCOW2_META_SNAPSHOT;
  return 0;
}

int
qcow2_overlap_check_locked (strata_node *node, uint64_t host, uint64_t len,
                            unsigned ignore, const char *what, uint64_t guest)
{
  struct qcow2_state *s = node->opaque;
  unsigned kind;

  if (!len || host + len < host)
    return 0;
  if (!(kind = overlap_kind (s, host, len, ignore)))
    return 0;
  atomic_store (&s->writes_refused, true);
  if (guest == UINT64_MAX)
    return io_error (EIO, "%s: %s write at host offset 0x%" PRIx64 " would "
                     "overwrite the %s (metadata overlap); refusing further "
                     "writes", node->filename, what, host, meta_name (kind));
  return io_error (EIO, "%s: %s write for guest offset %" PRIu64 " at host "
                   "offset 0x%" PRIx64 " would overwrite the %s (metadata "
                   "overlap); refusing further writes", node->filename, what,
                   guest, host, meta_name (kind));
}

int
qcow2_writes_refused (strata_node *node)
{
  struct qcow2_state *s = node->opaque;

  if (!atomic_load (&s->writes_refused))
    return 0;
  return io_error (EIO, "%s: writes are refused since a write would have "
                   "overwritten the image's metadata", node->filename);
}
