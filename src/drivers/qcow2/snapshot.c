/* strata: qcow2 internal snapshots (qcow2.txt "Snapshots").
 *
 * The snapshot table (its layout, reading, checking and writing it) is in
 * snapshot-table.c; this file has the operations on snapshots.
 *
 * A snapshot is a copy of the active L1 table.  A host cluster's refcount
 * counts the L1 tables (active and snapshots') that reach it, so taking a
 * snapshot adds one to every L2 table and data cluster the active L1
 * reaches, and the active image then copies before writing anything whose
 * refcount is above one: bit 63 (COPIED) of an active L1/L2 entry is set
 * exactly when the refcount of what it points at is 1 (sync_copied).
 * Snapshot L1 tables carry no meaningful COPIED bits (strata writes none).
 *
 * Crash safety: references are added before anything points at the
 * clusters and dropped only after the last pointer is gone; a new table
 * (snapshot table or active L1) is written to new clusters and flushed,
 * then published by one header write, then the old one is freed.  A crash
 * leaks clusters at worst (or, between dropping a reference and setting
 * COPIED again, leaves a cluster copied once more than needed).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "drivers/qcow2/snapshot-table.h"
#include "util/checked.h"
#include "util/cleanup.h"

/* An L1 table in host byte order as big-endian bytes, without COPIED. */
static uint8_t *
l1_to_disk (const uint64_t *l1, uint64_t n)
{
  uint8_t *raw = malloc (n ? n * 8 : 1);

  for (uint64_t i = 0; raw && i < n; i++)
    be64_store (raw + i * 8, l1[i] & ~QCOW2_OFLAG_COPIED);
  return raw;
}

/* Check a snapshot's L1 table location and load it (host byte order). */
static bool
load_snap_l1_locked (strata_node *node, const struct snap *sn, uint64_t **l1,
                     strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  uint64_t bytes = (uint64_t)sn->l1_size * 8;
  CLEANUP_FREE uint8_t *raw = NULL;
  int64_t flen = node_length (node->file);
  int r;

  *l1 = NULL;
  if (bytes > QCOW2_MAX_L1_BYTES || sn->l1_offset % s->cluster_size
      || (bytes && sn->l1_offset == 0) || flen < 0
      || !range_inside (sn->l1_offset, bytes, (uint64_t)flen)
      || qcow2_snap_overlaps_core (s, sn->l1_offset, bytes)) {
    error_set (errp, EINVAL,
               "%s: snapshot '%s' L1 table (offset 0x%" PRIx64 ", %" PRIu32
               " entries) is invalid",
               node->filename, sn->name, sn->l1_offset, sn->l1_size);
    return false;
  }
  if (!(raw = malloc (bytes ? bytes : 1))
      || !(*l1 = calloc (sn->l1_size ? sn->l1_size : 1, sizeof **l1))) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  if (bytes
      && (r = node_pread (node->file, sn->l1_offset, raw, bytes, 0)) < 0) {
    free (*l1);
    *l1 = NULL;
    error_set (errp, -r, "%s: cannot read snapshot '%s' L1 table",
               node->filename, sn->name);
    return false;
  }
  for (uint32_t i = 0; i < sn->l1_size; i++)
    (*l1)[i] = be64_load (raw + i * 8);
  return true;
}

/* ---- walking an L1 tree ---- */

/* Validated L2 table offset of L1 entry E (index I), 0 when none. */
static int
l2_of (strata_node *node, uint64_t i, uint64_t e, uint64_t *l2)
{
  struct qcow2_state *s = node->opaque;

  *l2 = e & QCOW2_OFFSET_MASK;
  if ((e & QCOW2_L1_RESERVED) || *l2 % s->cluster_size
      || (*l2 && qcow2_past_end_locked (node, *l2)))
    return io_error (EIO,
                     "%s: L1 entry %" PRIu64 " 0x%" PRIx64 " is "
                     "invalid",
                     node->filename, i, e);
  return 0;
}

/* A copy of the L2 table at OFF (the cache holds slices, and its pointers
 * do not survive refcount updates that may evict). */
static int
read_l2_locked (strata_node *node, uint64_t off, uint8_t *buf)
{
  return qcow2_l2_read_table_locked (node, off, buf);
}

/* Add DELTA to the refcount of every L2 table and cluster that L1 reaches.
 * With DELTA 0, only check every entry (before a change that must not
 * stop half-way on a bad one). */
static int
tree_ref_locked (strata_node *node, const uint64_t *l1, uint64_t n, int delta)
{
  struct qcow2_state *s = node->opaque;
  uint64_t span = s->l2_entries << s->cluster_bits, l2;
  CLEANUP_FREE uint8_t *t = malloc (s->cluster_size);
  int r;

  if (!t)
    return -ENOMEM;
  for (uint64_t i = 0; i < n; i++) {
    if ((r = l2_of (node, i, l1[i], &l2)) < 0)
      return r;
    if (!l2)
      continue;
    if ((r = read_l2_locked (node, l2, t)) < 0)
      return r;
    for (uint64_t j = 0; j < s->l2_entries; j++) {
      uint8_t *p = t + j * s->l2_entry_size;
      uint64_t e = be64_load (p), bm = s->ext_l2 ? be64_load (p + 8) : 0;
      if ((r = qcow2_check_l2_entry (node, i * span + (j << s->cluster_bits),
                                     e, bm))
              < 0
          || (delta && (r = qcow2_ref_entry_locked (node, e, delta)) < 0))
        return r;
    }
    if (delta && (r = qcow2_refcount_update_locked (node, l2, delta)) < 0)
      return r;
    if (delta < 0)
      qcow2_l2_forget_table_locked (node, l2);
  }
  return 0;
}

/* tree_ref_locked (+1) with the increments collected in the refcount
 * cache and written once per block, not once per cluster.  The caller
 * flushes before anything points at the new references. */
static int
tree_ref_increment_locked (strata_node *node, const uint64_t *l1, uint64_t n)
{
  struct qcow2_state *s = node->opaque;
  int r;

  s->defer_increments = true;
  r = tree_ref_locked (node, l1, n, 1);
  s->defer_increments = false;
  if (r == 0)
    r = qcow2_writeback_refcounts_locked (node);
  return r;
}

/* Check every entry of the tree L1 (N entries) reaches, then add one
 * reference to each, flushed: nothing may point at the tree before this
 * returns 0, and a bad entry stops it before anything changed. */
static int
tree_ref_add_locked (strata_node *node, const uint64_t *l1, uint64_t n)
{
  int r;

  if ((r = tree_ref_locked (node, l1, n, 0)) < 0
      || (r = tree_ref_increment_locked (node, l1, n)) < 0)
    return r;
  return node_flush (node->file);
}

/* Whether the cluster at OFF has refcount 1. */
static int
sole_owner (strata_node *node, uint64_t off)
{
  struct qcow2_state *s = node->opaque;
  uint64_t rc;
  int r = qcow2_refcount_get_locked (node, off >> s->cluster_bits, &rc);

  return r < 0 ? r : rc == 1;
}

/* Set COPIED in one L2 table's entries exactly where the refcount is 1;
 * writes the table when it changed. */
static int
sync_l2_copied (strata_node *node, uint64_t l2, uint8_t *t)
{
  struct qcow2_state *s = node->opaque;
  bool changed = false;
  int r;

  if ((r = read_l2_locked (node, l2, t)) < 0)
    return r;
  for (uint64_t j = 0; j < s->l2_entries; j++) {
    uint8_t *p = t + j * s->l2_entry_size;
    uint64_t e = be64_load (p), want = e & ~QCOW2_OFLAG_COPIED;
    if (!(e & QCOW2_OFLAG_COMPRESSED) && (e & QCOW2_OFFSET_MASK)) {
      if ((r = sole_owner (node, e & QCOW2_OFFSET_MASK)) < 0)
        return r;
      if (r)
        want |= QCOW2_OFLAG_COPIED;
    }
    if (want != e) {
      be64_store (p, want);
      changed = true;
    }
  }
  if (!changed)
    return 0;
  if ((r = qcow2_overlap_check_locked (node, l2, s->cluster_size,
                                       QCOW2_META_L2, "L2 table", UINT64_MAX))
          < 0
      || (r = node_pwrite (node->file, l2, t, s->cluster_size, 0)) < 0)
    return r;
  qcow2_l2_put_table_locked (node, l2, t);
  return 0;
}

/* Make the COPIED bits of the active L1 table and its L2 tables say
 * exactly "refcount is 1", after references were added or dropped. */
static int
sync_copied_locked (strata_node *node)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE uint8_t *t = malloc (s->cluster_size), *raw = NULL;
  bool changed = false;
  uint64_t l2;
  int r;

  if (!t)
    return -ENOMEM;
  for (uint64_t i = 0; i < s->l1_size; i++) {
    uint64_t want;
    if ((r = l2_of (node, i, s->l1[i], &l2)) < 0)
      return r;
    if (!l2)
      continue;
    if ((r = sync_l2_copied (node, l2, t)) < 0
        || (r = sole_owner (node, l2)) < 0)
      return r;
    want = r ? s->l1[i] | QCOW2_OFLAG_COPIED : s->l1[i] & ~QCOW2_OFLAG_COPIED;
    changed |= want != s->l1[i];
    s->l1[i] = want;
  }
  if (!changed)
    return 0;
  if (!(raw = malloc (s->l1_size * 8ull)))
    return -ENOMEM;
  for (uint64_t i = 0; i < s->l1_size; i++)
    be64_store (raw + i * 8, s->l1[i]);
  return node_pwrite (node->file, s->l1_offset, raw, s->l1_size * 8ull, 0);
}

/* Open-time, read-only: make snapshot ID and/or NAME (both must match
 * when both are given; ID alone is tried as an id, then as a name, as
 * qemu-img's -l ID_OR_NAME) the image a reader sees: its L1 table and its
 * size in place of the active ones (QEMU's bdrv_snapshot_load_tmp()).
 * Nothing is written. */
bool
qcow2_snapshot_load_tmp (strata_node *node, const char *id, const char *name,
                         strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  struct snap_table t;
  uint64_t *l1 = NULL;
  int i = -1;
  bool ok = false;

  if (!node->read_only) {
    error_set (errp, EINVAL, "%s: a snapshot is loaded read-only",
               node->filename);
    return false;
  }
  if (!qcow2_snap_table_read_locked (node, &t, errp))
    return false;
  for (uint32_t k = 0; k < t.n && i < 0; k++)
    if ((!id || !strcmp (t.sn[k].id, id))
        && (!name || !strcmp (t.sn[k].name, name)))
      i = (int)k;
  if (i < 0 && id && !name)
    i = qcow2_snap_find_by_name (&t, id);
  if (i < 0)
    error_set (errp, ENOENT, "Can't find snapshot");
  else if (load_snap_l1_locked (node, &t.sn[i], &l1, errp)) {
    for (uint32_t k = 0; k < t.sn[i].l1_size; k++)
      l1[k] &= ~QCOW2_OFLAG_COPIED;
    free (s->l1);
    s->l1 = l1;
    s->l1_size = t.sn[i].l1_size;
    s->l1_offset = t.sn[i].l1_offset;
    s->size = t.sn[i].disk_size;
    ok = true;
  }
  qcow2_snap_table_free (&t);
  return ok;
}

/* ---- the driver operations ---- */

/* Run FN (node, ARG, errp) with every guest request drained and kept
 * out, under the lock, and rebuild the overlap sets afterwards (tables
 * moved or were freed). */
bool
qcow2_run_exclusive (strata_node *node,
                     bool (*fn) (strata_node *, const void *, strata_error **),
                     const void *arg, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  struct tracked_req req;
  strata_error *err = NULL;
  bool ok;

  io_error_clear ();
  tracker_begin (&s->clusters, &req, 0, UINT64_MAX / 2, true);
  pthread_mutex_lock (&node->lock);
  ok = fn (node, arg, errp);
  qcow2_overlap_destroy (s);
  if (!qcow2_overlap_init (node, &err)) {
    error_propagate (ok ? errp : NULL, err);
    ok = false;
  }
  pthread_mutex_unlock (&node->lock);
  tracker_end (&s->clusters, &req);
  return ok;
}

static bool
writable (strata_node *node, strata_error **errp)
{
  int r;

  if (node->read_only) {
    error_set (errp, EROFS, "%s: the image is open read-only", node->filename);
    return false;
  }
  if ((r = qcow2_writes_refused (node)) < 0
      || (r = qcow2_writeback_locked (node)) < 0
      || (r = node_flush (node->file)) < 0) {
    error_set (errp, -r, "%s: %s", node->filename,
               strata_last_error_message () ? strata_last_error_message ()
                                            : strerror (-r));
    return false;
  }
  return true;
}

static bool
io_fail (strata_node *node, int r, const char *what, strata_error **errp)
{
  const char *m = strata_last_error_message ();

  /* The data path's message names the file already. */
  if (m && *m)
    error_set (errp, -r, "%s: %s", what, m);
  else
    error_set (errp, -r, "%s: %s: %s", node->filename, what, strerror (-r));
  return false;
}

static bool
create_locked (strata_node *node, const void *arg, strata_error **errp)
{
  const char *name = arg;
  struct qcow2_state *s = node->opaque;
  struct snap_table old, t;
  CLEANUP_FREE uint8_t *raw = NULL;
  struct timespec ts;
  struct snap *sn;
  int64_t l1_off;
  bool ok = false;
  int r;

  if (!writable (node, errp)
      || !qcow2_snap_table_read_locked (node, &old, errp))
    return false;
  t = old;
  if (old.n >= SNAP_MAX_COUNT) {
    error_set (errp, EFBIG, "%s: too many snapshots (max %d)", node->filename,
               SNAP_MAX_COUNT);
    goto out;
  }
  if (strlen (name) > UINT16_MAX) {
    error_set (errp, EINVAL, "%s: snapshot name is longer than %d bytes",
               node->filename, UINT16_MAX);
    goto out;
  }
  if (!(t.sn = calloc (old.n + 1, sizeof *t.sn))) {
    error_set (errp, ENOMEM, "out of memory");
    goto out;
  }
  if (old.n)
    memcpy (t.sn, old.sn, old.n * sizeof *t.sn);
  t.n = old.n + 1;
  sn = &t.sn[old.n];
  clock_gettime (CLOCK_REALTIME, &ts);
  *sn = (struct snap){ .l1_size = s->l1_size,
                       .date_sec = ts.tv_sec,
                       .date_nsec = ts.tv_nsec / 1000 * 1000,
                       .disk_size = s->size,
                       .icount = 0 };
  if (!(sn->id = qcow2_snap_new_id (&old)) || !(sn->name = strdup (name))
      || !(sn->extra = calloc (1, SNAP_EXTRA_KNOWN))
      || !(raw = l1_to_disk (s->l1, s->l1_size))) {
    error_set (errp, ENOMEM, "out of memory");
    goto out_new;
  }
  sn->extra_size = SNAP_EXTRA_KNOWN;
  /* References first, then COPIED cleared, then the copy and the table
   * that point at them. */
  if ((r = tree_ref_add_locked (node, s->l1, s->l1_size)) < 0
      || (r = sync_copied_locked (node)) < 0) {
    io_fail (node, r, "cannot add the snapshot's references", errp);
    goto out_new;
  }
  if ((l1_off = qcow2_snap_write_new_locked (node, raw, s->l1_size * 8ull))
      < 0) {
    io_fail (node, (int)l1_off, "cannot write the snapshot's L1 table", errp);
    goto out_new;
  }
  sn->l1_offset = l1_off;
  ok = qcow2_snap_table_publish_locked (node, &t, &old, errp);

out_new:
  free (sn->id);
  free (sn->name);
  free (sn->extra);
  free (t.sn);
out:
  qcow2_snap_table_free (&old);
  return ok;
}

bool
qcow2_snapshot_create (strata_node *node, const char *name,
                       strata_error **errp)
{
  return qcow2_run_exclusive (node, create_locked, name, errp);
}

/* Drop the active tree OLD (N entries at OFF) after the header stopped
 * pointing at it. */
static void
drop_old_active_locked (strata_node *node, uint64_t *old, uint64_t n,
                        uint64_t off)
{
  struct qcow2_state *s = node->opaque;

  /* Failures only leak: nothing points at these any more. */
  tree_ref_locked (node, old, n, -1);
  qcow2_free_clusters_locked (node, off, ROUND_UP (n * 8, s->cluster_size));
}

static bool
apply_locked (strata_node *node, const void *arg, strata_error **errp)
{
  const char *name = arg;
  struct qcow2_state *s = node->opaque;
  uint64_t span = s->l2_entries << s->cluster_bits, need, n;
  CLEANUP_FREE uint64_t *sl1 = NULL;
  CLEANUP_FREE uint8_t *raw = NULL;
  CLEANUP_FREE uint64_t *l1 = NULL; /* until it becomes the active L1 */
  uint64_t *old_l1 = s->l1, old_n = s->l1_size, old_off = s->l1_offset;
  struct snap_table t;
  struct snap *sn;
  int64_t off;
  uint8_t h[24] = { 0 };
  bool ok = false;
  int i, r;

  if (!writable (node, errp) || !qcow2_snap_table_read_locked (node, &t, errp))
    return false;
  if ((i = qcow2_snap_find (&t, name)) < 0) {
    error_set (errp, ENOENT,
               "Failed to load snapshot: No such file or "
               "directory");
    goto out;
  }
  sn = &t.sn[i];
  need = sn->disk_size / span + !!(sn->disk_size % span);
  n = MAX (need, sn->l1_size);
  if (n * 8 > QCOW2_MAX_L1_BYTES) {
    error_set (errp, EFBIG,
               "%s: snapshot '%s' needs an L1 table larger than "
               "%u bytes",
               node->filename, sn->name, QCOW2_MAX_L1_BYTES);
    goto out;
  }
  if (!load_snap_l1_locked (node, sn, &sl1, errp))
    goto out;
  if (!(l1 = calloc (n ? n : 1, sizeof *l1))) {
    error_set (errp, ENOMEM, "out of memory");
    goto out;
  }
  for (uint64_t k = 0; k < sn->l1_size; k++)
    l1[k] = sl1[k] & ~QCOW2_OFLAG_COPIED;
  if (!(raw = l1_to_disk (l1, n))) {
    error_set (errp, ENOMEM, "out of memory");
    goto out;
  }
  if ((r = tree_ref_add_locked (node, l1, n)) < 0
      || (off = qcow2_snap_write_new_locked (node, raw, n * 8)) < 0) {
    io_fail (node, r < 0 ? r : (int)off, "cannot load the snapshot", errp);
    goto out;
  }
  /* Size, crypt_method (0) and the L1 table in one write. */
  be64_store (h, sn->disk_size);
  be32_store (h + 12, (uint32_t)n);
  be64_store (h + 16, (uint64_t)off);
  if ((r = qcow2_write_header_field (node, 24, h, sizeof h)) < 0
      || (r = node_flush (node->file)) < 0) {
    io_fail (node, r, "cannot switch to the snapshot", errp);
    goto out;
  }
  s->l1 = l1;
  l1 = NULL;
  s->l1_size = n;
  s->l1_offset = off;
  s->size = sn->disk_size;
  drop_old_active_locked (node, old_l1, old_n, old_off);
  free (old_l1);
  if ((r = sync_copied_locked (node)) < 0)
    io_fail (node, r, "cannot update the COPIED flags", errp);
  else
    ok = true;
out:
  qcow2_snap_table_free (&t);
  return ok;
}

bool
qcow2_snapshot_apply (strata_node *node, const char *name, strata_error **errp)
{
  return qcow2_run_exclusive (node, apply_locked, name, errp);
}

static bool
delete_locked (strata_node *node, const void *arg, strata_error **errp)
{
  const char *name = arg;
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE uint64_t *sl1 = NULL;
  struct snap_table old, t;
  struct snap gone;
  bool ok = false;
  int i, r;

  if (!writable (node, errp)
      || !qcow2_snap_table_read_locked (node, &old, errp))
    return false;
  if ((i = qcow2_snap_find_by_name (&old, name)) < 0) {
    error_set (errp, ENOENT, "snapshot not found");
    goto out;
  }
  gone = old.sn[i];
  for (uint32_t k = 0; k < old.n; k++)
    if (k != (uint32_t)i && gone.l1_size
        && old.sn[k].l1_offset == gone.l1_offset) {
      error_set (errp, EINVAL,
                 "%s: snapshots '%s' and '%s' share an L1 "
                 "table at 0x%" PRIx64 "; not deleting either",
                 node->filename, gone.name, old.sn[k].name, gone.l1_offset);
      goto out;
    }
  if (!load_snap_l1_locked (node, &gone, &sl1, errp))
    goto out;
  if ((r = tree_ref_locked (node, sl1, gone.l1_size, 0)) < 0) {
    io_fail (node, r, "snapshot's tables are damaged; not deleting it", errp);
    goto out;
  }
  t = old;
  if (!(t.sn = malloc ((old.n ? old.n : 1) * sizeof *t.sn))) {
    error_set (errp, ENOMEM, "out of memory");
    goto out;
  }
  memcpy (t.sn, old.sn, i * sizeof *t.sn);
  memcpy (t.sn + i, old.sn + i + 1, (old.n - i - 1) * sizeof *t.sn);
  t.n = old.n - 1;
  ok = qcow2_snap_table_publish_locked (node, &t, &old, errp);
  free (t.sn);
  if (!ok)
    goto out;
  /* Unreachable now: drop its references, then set COPIED where the
   * active image became the only owner. */
  if ((r = tree_ref_locked (node, sl1, gone.l1_size, -1)) < 0
      || (r = qcow2_free_clusters_locked (
              node, gone.l1_offset,
              ROUND_UP (gone.l1_size * 8ull, s->cluster_size)))
             < 0
      || (r = node_flush (node->file)) < 0
      || (r = sync_copied_locked (node)) < 0)
    ok = io_fail (node, r, "cannot release the snapshot's clusters", errp);
out:
  qcow2_snap_table_free (&old);
  return ok;
}

bool
qcow2_snapshot_delete (strata_node *node, const char *name,
                       strata_error **errp)
{
  return qcow2_run_exclusive (node, delete_locked, name, errp);
}

int
qcow2_snapshot_list (strata_node *node, struct strata_snapshot_info **list,
                     strata_error **errp)
{
  struct snap_table t;
  struct strata_snapshot_info *out;
  bool ok;
  int n;

  pthread_mutex_lock (&node->lock);
  ok = qcow2_snap_table_read_locked (node, &t, errp);
  pthread_mutex_unlock (&node->lock);
  if (!ok)
    return -1;
  if (!(out = calloc (t.n ? t.n : 1, sizeof *out))) {
    qcow2_snap_table_free (&t);
    error_set (errp, ENOMEM, "out of memory");
    return -1;
  }
  for (uint32_t i = 0; i < t.n; i++) {
    const struct snap *sn = &t.sn[i];
    out[i] = (struct strata_snapshot_info){
      .id = sn->id,
      .name = sn->name,
      .vm_state_size = sn->vm_state_size,
      .date_sec = sn->date_sec,
      .date_nsec = sn->date_nsec,
      .vm_clock_nsec = sn->vm_clock_nsec,
      .icount = sn->icount,
      .disk_size = sn->disk_size,
    };
    t.sn[i].id = t.sn[i].name = NULL; /* moved */
  }
  *list = out;
  n = (int)t.n;
  qcow2_snap_table_free (&t);
  return n;
}

int
qcow2_snapshot_l1s_locked (strata_node *node, struct qcow2_snapshot_l1 **out)
{
  struct snap_table t;
  strata_error *err = NULL;
  int r = 0;

  *out = NULL;
  if (!qcow2_snap_table_read_locked (node, &t, &err)) {
    r = io_error (strata_error_errno (err), "%s", strata_error_message (err));
    strata_error_free (err);
    return r;
  }
  if (!(*out = calloc (t.n ? t.n : 1, sizeof **out))) {
    qcow2_snap_table_free (&t);
    return -ENOMEM;
  }
  for (uint32_t i = 0; i < t.n && r == 0; i++) {
    if (!load_snap_l1_locked (node, &t.sn[i], &(*out)[i].l1, &err)) {
      r = io_error (strata_error_errno (err), "%s",
                    strata_error_message (err));
      strata_error_free (err);
      err = NULL;
    }
    (*out)[i].size = t.sn[i].l1_size;
  }
  r = r < 0 ? r : (int)t.n;
  if (r < 0) {
    qcow2_snapshot_l1s_free (*out, t.n);
    *out = NULL;
  }
  qcow2_snap_table_free (&t);
  return r;
}

void
qcow2_snapshot_l1s_free (struct qcow2_snapshot_l1 *l1s, int n)
{
  for (int i = 0; l1s && i < n; i++)
    free (l1s[i].l1);
  free (l1s);
}
