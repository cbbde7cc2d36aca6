/* strata: the qcow2 driver: open, backing chain, close (qcow2.txt
 * "Header", "Backing file" fields, feature bits).
 *
 * Opening validates the header (header.c), loads the L1 and refcount
 * tables, and decides whether the image may be written:
 *   - the dirty bit (lazy refcounts in use, refcounts may be stale): a
 *     read-only open leaves it; a read-write open repairs the refcounts
 *     with the full check and then clears it, as QEMU does;
 *   - the corrupt bit allows read-only opens only;
 *   - strata sets neither, and keeps refcounts exact even when
 *     lazy_refcounts is on;
 *   - internal snapshots are kept: clusters and L2 tables they share
 *     (no COPIED flag) are copied before the active image changes them;
 *   - persistent bitmaps (bitmaps extension, autoclear bit 0) are loaded
 *     into the node's registry, marked in use by a read-write open and
 *     stored at close (bitmaps-persist.c), so autoclear bit 0 stays set;
 *     a directory strata cannot keep (malformed, unknown flags) refuses
 *     read-write opens and reopens, naming the reason;
 *   - other autoclear bits, and bit 0 with no valid bitmaps, are cleared
 *     when opening read-write, as the spec asks of a writer that does not
 *     maintain them.
 * The backing file is opened read-only with the format the header names;
 * a missing format is refused rather than probed, and the chain of real
 * paths is passed down (option x-backing-chain) to refuse loops and chains
 * deeper than QCOW2_MAX_CHAIN_DEPTH.
 */
#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/graph.h"
#include "drivers/qcow2/qcow2.h"
#include "drivers/registry.h"
#include "util/checked.h"
#include "util/cleanup.h"

static int
qcow2_probe (const uint8_t *buf, size_t len)
{
  /* As QEMU probes: a whole header with a version.  Version 0 is not
   * qcow at all there (raw); version 1 is QEMU's older qcow format, which
   * strata refuses by name rather than show its metadata as raw data. */
  return len >= 104 && be32_load (buf) == QCOW2_MAGIC && be32_load (buf + 4)
         ? 100 : 0;
}

/* The dirty bit says refcounts may be stale (lazy refcounts, then a
 * crash).  As QEMU does on a read-write open: repair them with the full
 * check, then clear the bit (flushed), so the image is consistent before
 * anything allocates from it. */
static bool
repair_dirty (strata_node *node, struct qcow2_state *s, strata_error **errp)
{
  struct strata_check_result res = { 0 };
  uint64_t incompat = s->incompat & ~QCOW2_INCOMPAT_DIRTY;
  uint8_t be[8];
  int r;

  r = qcow2_check (node, &res,
                   STRATA_CHECK_FIX_LEAKS | STRATA_CHECK_FIX_ERRORS, NULL,
                   NULL, errp);
  if (r < 0) {
    error_prepend (errp, "%s: the image has the dirty bit set and its "
                   "refcounts could not be repaired", node->filename);
    return false;
  }
  if (res.check_errors || res.corruptions > res.corruptions_fixed
      || res.leaks > res.leaks_fixed) {
    error_set (errp, EIO, "%s: the image has the dirty bit set and %" PRId64
               " problems remain after repairing its refcounts; it can only "
               "be opened read-only", node->filename,
               res.check_errors + res.corruptions - res.corruptions_fixed
                   + res.leaks - res.leaks_fixed);
    return false;
  }
  be64_store (be, incompat);
  if ((r = node_flush (node->file)) < 0
      || (r = qcow2_write_header_field (node, 72, be, sizeof be)) < 0
      || (r = node_flush (node->file)) < 0) {
    error_set (errp, -r, "%s: cannot clear the dirty bit after repairing "
               "the refcounts", node->filename);
    return false;
  }
  s->incompat = incompat;
  return true;
}

static bool
check_writable (strata_node *node, struct qcow2_state *s, strata_error **errp)
{
  const char *fn = node->filename;

  if (s->incompat & QCOW2_INCOMPAT_CORRUPT) {
    error_set (errp, EROFS, "%s: the image is marked corrupt (incompatible "
               "feature bit 1); it can only be opened read-only, repair it "
               "with 'qemu-img check -r all'", fn);
    return false;
  }
  /* Before anything is written: the dirty repair writes too. */
  if (s->bm_load_err) {
    error_set (errp, strata_error_errno (s->bm_load_err), "%s",
               strata_error_message (s->bm_load_err));
    return false;
  }
  if ((s->incompat & QCOW2_INCOMPAT_DIRTY) && !repair_dirty (node, s, errp))
    return false;
  if (s->autoclear & ~(s->bm_dir ? QCOW2_AUTOCLEAR_BITMAPS : 0)) {
    uint64_t keep = s->autoclear & (s->bm_dir ? QCOW2_AUTOCLEAR_BITMAPS : 0);
    uint8_t be[8];
    int r;

    be64_store (be, keep);
    r = qcow2_write_header_field (node, 88, be, sizeof be);
    if (r == 0)
      r = node_flush (node->file);
    if (r < 0) {
      error_set (errp, -r, "%s: cannot clear the autoclear feature bits",
                 fn);
      return false;
    }
    s->autoclear = keep;
  }
  return qcow2_bitmaps_writable (node, errp);
}

/* NAME relative to the directory of OVERLAY, spelled as QEMU spells it:
 * the overlay's path up to its last slash, then NAME ("c.qcow2" +
 * "b.qcow2" = "b.qcow2", "dir/c.qcow2" + "b.qcow2" = "dir/b.qcow2"), so
 * that info and map print the same file names as qemu-img. */
static char *
resolve_backing (const char *overlay, const char *name)
{
  const char *slash = strrchr (overlay, '/');
  char *out;

  if (name[0] == '/' || !slash || driver_for_filename (name))
    return strdup (name);
  if (asprintf (&out, "%.*s%s", (int) (slash - overlay + 1), overlay, name)
      < 0)
    return NULL;
  return out;
}

static bool
open_backing (strata_node *node, struct qcow2_state *s, const char *chain,
              unsigned flags, strata_error **errp)
{
  const char *fn = node->filename;
  CLEANUP_FREE char *path = NULL, *mine = NULL, *theirs = NULL;
  CLEANUP_FREE char *newchain = NULL;
  strata_opts *extra = NULL;
  strata_node *b;
  unsigned depth = 1;

  if (!s->backing_format) {
    error_set (errp, EINVAL, "%s: backing file '%s' has no backing format "
               "in the image header; strata does not probe backing files "
               "(a probed raw file could be mistaken for another format); "
               "set it with 'qemu-img rebase -u -b %s -F <format>'", fn,
               s->backing_name, s->backing_name);
    return false;
  }
  /* An NBD URI names no local file: it is used as written, neither
   * joined with the overlay's directory nor resolved by realpath. */
  if (!(path = resolve_backing (fn, s->backing_name))
      || !(mine = driver_for_filename (node->file->filename)
                      ? strdup (node->file->filename)
                      : realpath (node->file->filename, NULL))) {
    error_set_errno (errp, errno, "%s: cannot resolve the image path", fn);
    return false;
  }
  if (!(theirs = driver_for_filename (path) ? strdup (path)
                                             : realpath (path, NULL))) {
    /* qemu's words, so that tools print what qemu-img prints. */
    error_set_errno (errp, errno,
                     "Could not open backing file: Could not open '%s'",
                     path);
    return false;
  }
  for (const char *p = chain; p && *p; depth++) {
    const char *nl = strchr (p, '\n');
    size_t l = nl ? (size_t) (nl - p) : strlen (p);
    if (strlen (theirs) == l && strncmp (theirs, p, l) == 0) {
      error_set (errp, ELOOP, "%s: backing file '%s' makes a loop in the "
                 "backing chain", fn, theirs);
      return false;
    }
    p = nl ? nl + 1 : p + l;
  }
  if (strcmp (theirs, mine) == 0) {
    error_set (errp, ELOOP, "%s: backing file '%s' is the image itself", fn,
               theirs);
    return false;
  }
  if (depth >= QCOW2_MAX_CHAIN_DEPTH) {
    error_set (errp, ELOOP, "%s: backing chain depth %u exceeds %d", fn,
               depth + 1, QCOW2_MAX_CHAIN_DEPTH);
    return false;
  }
  if (asprintf (&newchain, "%s%s%s", chain ? chain : "", chain ? "\n" : "",
                mine) < 0) {
    newchain = NULL;
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  if (strcmp (s->backing_format, "qcow2") == 0
      && (!(extra = opts_new ())
          || !opts_set (extra, "x-backing-chain", newchain))) {
    opts_free (extra);
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  b = node_open_image (path, s->backing_format, extra,
                       flags & STRATA_OPEN_FORCE_SHARE, errp);
  opts_free (extra);
  if (!b) {
    /* Name the top image and the failing layer, not every layer between. */
    if (!chain)
      error_prepend (errp, "Could not open backing file");
    return false;
  }
  if (!node_attach_child (node, "backing", b, errp)) {
    node_unref (b);
    return false;
  }
  return true;
}

/* A backing given by the options instead of the header: "backing" = ""
 * (QMP null) opens none, "backing" = "name" uses an existing node, and
 * "backing.*" opens a new one, read-only unless it says otherwise. */
static bool
explicit_backing (strata_node *node, const char *ref, strata_opts *bopts,
                  unsigned flags, strata_error **errp)
{
  strata_node *b;

  node->backing_explicit = true;
  if (ref && bopts->n) {
    error_set (errp, EINVAL, "%s: 'backing' names a node and gives options",
               node->filename);
    return false;
  }
  if (ref && !*ref)
    return true;
  if (ref && !(b = graph_lookup (ref))) {
    error_set (errp, ENOENT, "Could not open backing file: Cannot find "
               "device='%s' nor node-name='%s'", ref, ref);
    return false;
  }
  if (!ref && !(b = node_open (bopts, flags & STRATA_OPEN_FORCE_SHARE,
                               errp))) {
    error_prepend (errp, "Could not open backing file");
    return false;
  }
  if (!node_attach_child (node, "backing", b, errp)) {
    node_unref (b);
    return false;
  }
  return true;
}

static void
qcow2_close (strata_node *node)
{
  struct qcow2_state *s = node->opaque;

  /* Nobody can be told of a failure here: the write-back is best effort,
   * and what it cannot write is lost as a crash would lose it (bitmaps
   * not stored stay marked in use: QEMU and strata call them
   * inconsistent). */
  if (!node->read_only && s->l2_cache.e && s->rc_cache.e) {
    int r;
    strata_error *err = NULL;

    if (!qcow2_bitmaps_store (node, &err)) {
      fprintf (stderr, "%s\n", strata_error_message (err));
      strata_error_free (err);
    }
    pthread_mutex_lock (&node->lock);
    r = qcow2_writeback_locked (node);
    pthread_mutex_unlock (&node->lock);
    if (r == 0)
      node_flush (node->file);
  }
  qcow2_compress_stop (s->compress_pool);
  s->compress_pool = NULL;
  qcow2_cow_spares_free (s);
  qcow2_cache_destroy (&s->l2_cache);
  qcow2_cache_destroy (&s->rc_cache);
  qcow2_overlap_destroy (s);
  qcow2_bitmaps_forget (s);
  free (s->l1);
  free (s->rt);
  s->l1 = s->rt = NULL;
  qcow2_free_header (s);
  tracker_destroy (&s->clusters);
}

/* The L2 cache (slices of QCOW2_L2_SLICE_DEFAULT bytes, up to
 * QCOW2_L2_CACHE_DEFAULT of them unless l2-cache-size says otherwise) and
 * the refcount block cache.  The default cache is bounded, not sized to
 * the image: a miss reads one slice, so a cache that maps a few GiB keeps
 * random reads fast while memory stays flat as images grow. */
static bool
init_caches (strata_node *node, struct qcow2_state *s, strata_opts *opts,
             strata_error **errp)
{
  uint64_t span = s->l2_entries << s->cluster_bits, need, bytes, slice;
  unsigned n;

  need = ((s->size + span - 1) / span) * s->cluster_size;
  if (!opts_get_size (opts, "l2-cache-size",
                      MIN (need, QCOW2_L2_CACHE_DEFAULT), &bytes, errp)
      || !opts_get_size (opts, "l2-cache-entry-size",
                         MIN (s->cluster_size, QCOW2_L2_SLICE_DEFAULT),
                         &slice, errp))
    return false;
  if (bytes > QCOW2_MAX_L2_CACHE_BYTES) {
    error_set (errp, EINVAL, "%s: l2-cache-size %" PRIu64 " is too large "
               "(max %llu)", node->filename, bytes, QCOW2_MAX_L2_CACHE_BYTES);
    return false;
  }
  if (slice < 512 || slice > s->cluster_size || (slice & (slice - 1))) {
    error_set (errp, EINVAL, "L2 cache entry size must be a power of two "
               "between 512 and the cluster size (%" PRIu64 ")",
               s->cluster_size);
    return false;
  }
  s->l2_slice_size = slice;
  s->l2_slice_entries = slice / s->l2_entry_size;
  n = MAX (bytes / slice, 2);
  if (!qcow2_cache_init (&s->l2_cache, n, slice)
      || !qcow2_cache_init (&s->rc_cache, 4, s->cluster_size)) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  return true;
}

static bool
qcow2_open (strata_node *node, strata_opts *opts, unsigned flags,
            strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  const char *chain = opts_get (opts, "x-backing-chain");
  const char *bref = opts_get (opts, "backing");
  const char *snap_id = opts_get (opts, "x-snapshot-id");
  const char *snap_name = opts_get (opts, "x-snapshot-name");
  strata_opts *bopts = opts_extract (opts, "backing");

  tracker_init (&s->clusters);
  if (!bopts) {
    error_set (errp, ENOMEM, "out of memory");
    goto fail;
  }
  if (!qcow2_read_header (node, s, errp)
      || ((snap_id || snap_name)
          && !qcow2_snapshot_load_tmp (node, snap_id, snap_name, errp))
      || !qcow2_overlap_init (node, errp)
      || !init_caches (node, s, opts, errp)
      || !qcow2_bitmaps_load (node, errp)
      || (!node->read_only && !check_writable (node, s, errp)))
    goto fail;
  if (bref || bopts->n) {
    if (!explicit_backing (node, bref, bopts, flags, errp))
      goto fail;
  }
  else if (s->backing_name && !(flags & STRATA_OPEN_NO_BACKING)
           && !open_backing (node, s, chain, flags, errp))
    goto fail;
  opts_free (bopts);
  return true;

fail:
  opts_free (bopts);
  qcow2_close (node);
  return false;
}

static int64_t
qcow2_get_length (strata_node *node)
{
  struct qcow2_state *s = node->opaque;
  return (int64_t) s->size;
}

static bool
qcow2_get_info (strata_node *node, struct strata_info *info,
                strata_error **errp)
{
  struct qcow2_state *s = node->opaque;

  (void) errp;
  info->cluster_size = s->cluster_size;
  info->vm_state_offset = ROUND_UP (s->size,
                                    s->l2_entries << s->cluster_bits);
  info->dirty = s->incompat & QCOW2_INCOMPAT_DIRTY;
  info->backing_filename = s->backing_name;
  info->backing_format = s->backing_format;
  info->format_specific = "qcow2";
  return true;
}

/* strata_get_qcow2_info: QEMU's format-specific data. */
static bool
qcow2_get_format_info (strata_node *node, const char *format, void *out,
                       strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  struct strata_qcow2_info *info = out;

  (void) errp;
  if (strcmp (format, "qcow2") != 0)
    return false;
  info->compat = s->version >= 3 ? "1.1" : "0.10";
  info->compression_type = s->compression == QCOW2_COMP_ZSTD ? "zstd"
                                                               : "zlib";
  info->lazy_refcounts = s->compat & QCOW2_COMPAT_LAZY_REFCOUNTS;
  info->refcount_bits = s->refcount_bits;
  info->corrupt = s->incompat & QCOW2_INCOMPAT_CORRUPT;
  info->extended_l2 = s->ext_l2;
  return true;
}

static bool
qcow2_reopen (strata_node *node, bool read_write, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;

  /* Going read-only: the bitmaps are stored as at close. */
  if (!read_write)
    return qcow2_bitmaps_store (node, errp);
  return check_writable (node, s, errp);
}

/* The check reads tables from the file: write the cache back first. */
static int
qcow2_check_written (strata_node *node, struct strata_check_result *res,
                     unsigned fix, strata_message_fn message, void *opaque,
                     strata_error **errp)
{
  int r = 0;

  if (!node->read_only) {
    pthread_mutex_lock (&node->lock);
    r = qcow2_writeback_locked (node);
    pthread_mutex_unlock (&node->lock);
  }
  if (r < 0) {
    error_set (errp, -r, "%s: cannot write the metadata cache back",
               node->filename);
    return r;
  }
  return qcow2_check (node, res, fix, message, opaque, errp);
}

const struct strata_driver qcow2_driver = {
  .name           = "qcow2",
  .state_size     = sizeof (struct qcow2_state),
  .has_file_child = true,
  .probe          = qcow2_probe,
  .open           = qcow2_open,
  .close          = qcow2_close,
  .preadv         = qcow2_preadv,
  .pwritev        = qcow2_pwritev,
  .pwritev_compressed = qcow2_pwritev_compressed,
  .pwrite_zeroes  = qcow2_pwrite_zeroes,
  .flush          = qcow2_flush,
  .pdiscard       = qcow2_pdiscard,
  .block_status   = qcow2_block_status,
  .get_length     = qcow2_get_length,
  .truncate       = qcow2_truncate,
  .measure        = qcow2_measure,
  .get_info       = qcow2_get_info,
  .get_format_info = qcow2_get_format_info,
  .reopen         = qcow2_reopen,
  .check          = qcow2_check_written,
  .create         = qcow2_create,
  .create_options = qcow2_create_options,
  .snapshot_list  = qcow2_snapshot_list,
  .bitmap_list    = qcow2_bitmap_list,
  .bitmap_can_store = qcow2_bitmap_can_store,
  .snapshot_create = qcow2_snapshot_create,
  .snapshot_apply = qcow2_snapshot_apply,
  .snapshot_delete = qcow2_snapshot_delete,
  .amend          = qcow2_amend,
  .change_backing_file = qcow2_change_backing_file,
  .make_empty     = qcow2_make_empty,
};
