/* strata qcow2: measure (qemu-img measure -O qcow2).
 *
 * The fully allocated size of a qcow2 image of V bytes (V rounded up to
 * the cluster size C) is, from docs/interop/qcow2.txt:
 *
 *   header       1 cluster
 *   L2 tables    one entry (8 bytes, 16 with extended L2) per data
 *                cluster, rounded up to whole tables
 *   L1 table     one 8-byte entry per L2 table, rounded up to whole
 *                clusters (counted as the L1 needs, never fewer than a
 *                cluster)
 *   refcounts    blocks of C*8/refcount_bits entries counting every
 *                cluster above, the blocks and the table themselves; the
 *                table holds C/8 block offsets per cluster
 *   data         V
 *
 * The required size is the same metadata plus only the data clusters the
 * source needs: a cluster counts when some byte of it is allocated data
 * that does not read as zeros (with a backing file, or with falloc/full
 * preallocation, every cluster counts).  This overestimates like QEMU
 * does, since metadata is counted for the fully allocated image; the
 * numbers are the ones qemu-img measure prints.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/qcow2.h"
#include "util/checked.h"

struct measure_params {
  uint64_t size;
  uint64_t csize;
  uint64_t refcount_bits;
  bool extended_l2;
  bool backing;
  bool prealloc_data; /* falloc or full: every data cluster written */
};

/* A boolean option, with qemu-img's message for a bad value. */
static bool
measure_bool (strata_opts *opts, const char *key, bool *out,
              strata_error **errp)
{
  const char *v = opts_get (opts, key);

  *out = false;
  if (v && !parse_bool (v, out)) {
    error_set (errp, EINVAL, "Parameter '%s' expects 'on' or 'off'", key);
    return false;
  }
  return true;
}

static bool
measure_params (strata_opts *opts, struct measure_params *p,
                strata_error **errp)
{
  const char *prealloc, *compat;
  bool lazy;

  *p = (struct measure_params){ 0 };
  if (!opts_get_size (opts, "size", 0, &p->size, errp)
      || !opts_get_size (opts, "cluster_size", 65536, &p->csize, errp)
      || !opts_get_size (opts, "refcount_bits", 16, &p->refcount_bits, errp)
      || !measure_bool (opts, "extended_l2", &p->extended_l2, errp)
      || !measure_bool (opts, "lazy_refcounts", &lazy, errp))
    return false;
  compat = opts_get (opts, "compat");
  if (compat && strcmp (compat, "0.10") != 0 && strcmp (compat, "1.1") != 0) {
    error_set (errp, EINVAL, "Invalid compatibility level: '%s'", compat);
    return false;
  }
  if (!is_power_of_2 (p->csize) || p->csize < (1u << QCOW2_MIN_CLUSTER_BITS)
      || p->csize > (1u << QCOW2_MAX_CLUSTER_BITS)) {
    error_set (errp, EINVAL,
               "Cluster size must be a power of two between "
               "512 and 2048k");
    return false;
  }
  if (!is_power_of_2 (p->refcount_bits) || p->refcount_bits > 64) {
    error_set (errp, EINVAL,
               "Refcount width must be a power of two and may "
               "not exceed 64 bits");
    return false;
  }
  if (p->extended_l2 && p->csize < 16384) {
    error_set (errp, EINVAL,
               "Extended L2 entries are only supported with "
               "cluster sizes of at least 16384 bytes");
    return false;
  }
  prealloc = opts_get (opts, "preallocation");
  if (prealloc && strcmp (prealloc, "off") != 0
      && strcmp (prealloc, "metadata") != 0 && strcmp (prealloc, "falloc") != 0
      && strcmp (prealloc, "full") != 0) {
    error_set (errp, EINVAL, "invalid parameter value: %s", prealloc);
    return false;
  }
  p->prealloc_data = prealloc
                     && (strcmp (prealloc, "falloc") == 0
                         || strcmp (prealloc, "full") == 0);
  p->backing = opts_get (opts, "backing_file") != NULL;
  return true;
}

static uint64_t
div_round_up (uint64_t a, uint64_t b)
{
  return a / b + (a % b != 0);
}

/* Clusters of refcount blocks and table needed to count CLUSTERS data and
 * metadata clusters plus themselves: the smallest fixed point. */
static uint64_t
refcount_clusters (uint64_t clusters, uint64_t csize, uint64_t refcount_bits)
{
  uint64_t per_block = csize * 8 / refcount_bits, per_table = csize / 8;
  uint64_t blocks = 0, table = 0, prev;

  do {
    prev = blocks + table;
    blocks = div_round_up (clusters + blocks + table, per_block);
    table = div_round_up (blocks, per_table);
  } while (blocks + table != prev);
  return blocks + table;
}

/* Bytes of a fully allocated image whose data is VSIZE (cluster-aligned)
 * bytes. */
static uint64_t
full_size (uint64_t vsize, const struct measure_params *p)
{
  uint64_t esize = p->extended_l2 ? 16 : 8;
  uint64_t l2_entries = ROUND_UP (vsize / p->csize, p->csize / esize);
  uint64_t l1_entries = ROUND_UP (l2_entries * esize / p->csize, p->csize / 8);
  uint64_t meta = p->csize + l2_entries * esize + l1_entries * 8;

  /* Refcount blocks and table: the smallest count covering the metadata
   * above, the data and themselves. */

  meta += refcount_clusters ((meta + vsize) / p->csize, p->csize,
                             p->refcount_bits)
          * p->csize;
  return meta + vsize;
}

/* The layers of a source's chain (filters skipped). */
struct chain {
  strata_node **layer;
  int n;
};

static void
chain_free (struct chain *c)
{
  free (c->layer);
}

static int
chain_init (struct chain *c, strata_node *node)
{
  int n = 0;

  for (strata_node *l = node; l; l = l->backing, n++) {
    while (l->drv->is_filter && l->file)
      l = l->file;
    if (n > QCOW2_MAX_CHAIN_DEPTH)
      return io_error (ELOOP, "%s: backing chain too deep", node->filename);
  }
  c->layer = calloc (n, sizeof *c->layer);
  if (!c->layer)
    return io_error (ENOMEM, "out of memory");
  c->n = n;
  n = 0;
  for (strata_node *l = node; l; l = l->backing, n++) {
    while (l->drv->is_filter && l->file)
      l = l->file;
    c->layer[n] = l;
  }
  return 0;
}

/* Status of [OFF, OFF+LEN) through the chain: *FLAGS gets BS_DATA for
 * allocated data, BS_ZERO for zeros (unallocated at the bottom included),
 * *PNUM the bytes it covers. */
static int
chain_status (const struct chain *c, uint64_t off, uint64_t len,
              unsigned *flags, uint64_t *pnum)
{
  for (int k = 0; k < c->n; k++) {
    struct bstat bs;
    int64_t size = node_length (c->layer[k]);
    int r;

    if (size < 0)
      return (int)size;
    if ((uint64_t)size <= off)
      break; /* past the end of a shorter backing file */
    len = MIN (len, (uint64_t)size - off);
    /* Each layer as QEMU 7.2 reports it to qemu-img measure: a qcow2
     * data cluster counts even where its host cluster is a hole, unless
     * the image looks metadata-preallocated (BS_REFINE_ZERO). */
    r = node_block_status (c->layer[k], off, len, &bs);
    if (r < 0)
      return r;
    len = bs.pnum;
    if (bs.flags & BS_ALLOCATED) {
      *flags = bs.flags & (BS_DATA | BS_ZERO);
      *pnum = len;
      return 0;
    }
  }
  *flags = BS_ZERO;
  *pnum = len;
  return 0;
}

/* Bytes of whole clusters of SRC that hold data not reading as zeros.  A
 * data extent counts from the start of its first cluster to the end of its
 * last one, and the scan resumes there. */
static int
allocated_data (strata_node *src, uint64_t size, uint64_t csize, uint64_t *out)
{
  struct chain c = { 0 };
  uint64_t off = 0, n = 0;
  int r = chain_init (&c, src);

  while (r == 0 && off < size) {
    uint64_t pnum = 0;
    unsigned flags = 0;

    r = chain_status (&c, off, size - off, &flags, &pnum);
    if (r < 0)
      break;
    if (!(flags & BS_ZERO) && (flags & BS_DATA)) {
      uint64_t end = ROUND_UP (off + pnum, csize);
      n += end - ROUND_DOWN (off, csize);
      off = end;
    }
    else
      off += pnum;
  }
  chain_free (&c);
  *out = n;
  return r;
}

bool
qcow2_measure (strata_opts *opts, strata_node *src, uint64_t *required,
               uint64_t *fully_allocated, strata_error **errp)
{
  struct measure_params p;
  uint64_t vsize, data = 0, full;

  if (!measure_params (opts, &p, errp))
    return false;
  if (src) {
    int64_t len = strata_length (src);

    if (len < 0) {
      error_set (errp, (int)-len, "%s: cannot get the image size",
                 src->filename);
      return false;
    }
    p.size = len;
  }
  if (p.size > QCOW2_MAX_OFFSET) {
    error_set (errp, EFBIG, "image size %" PRIu64 " is too large", p.size);
    return false;
  }
  vsize = ROUND_UP (p.size, p.csize);
  if (vsize / (p.csize * (p.csize / (p.extended_l2 ? 16 : 8))) * 8
      > QCOW2_MAX_L1_BYTES) {
    error_set (errp, EFBIG,
               "The image size is too large (try using a "
               "larger cluster size)");
    return false;
  }
  if (src && !p.backing) {
    int r = allocated_data (src, p.size, p.csize, &data);
    if (r < 0) {
      const char *m = strata_last_error_message ();
      error_set (errp, -r, "%s: block status failed: %s", src->filename,
                 m ? m : strerror (-r));
      return false;
    }
  }
  else if (src)
    data = vsize; /* the new backing may share nothing with SRC */
  if (p.prealloc_data)
    data = vsize;
  full = full_size (vsize, &p);
  *fully_allocated = full;
  *required = full - vsize + data;
  return true;
}
