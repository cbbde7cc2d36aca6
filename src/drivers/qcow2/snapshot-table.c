/* strata: the qcow2 snapshot table (qcow2.txt "Snapshots"): reading it,
 * checking every entry, writing it anew, finding an entry.
 *
 * The snapshot table is nb_snapshots entries starting at snapshots_offset
 * (header bytes 60-71), each 8-byte aligned:
 *
 *   0- 7 l1_table_offset     8-11 l1_size       12-13 id_str_size
 *  14-15 name_size          16-19 date_sec      20-23 date_nsec
 *  24-31 vm_clock_nsec      32-35 vm_state_size 36-39 extra_data_size
 *  extra data: 0-7 vm_state_size_large, 8-15 disk_size, 16-23 icount
 *  then id_str, name (no NUL), padding to 8 bytes
 *
 * Every field is checked before use: counts and sizes against the limits
 * below, offsets against the file and against the image's core metadata
 * (a table placed over the header, the L1 or the refcount table by a
 * hostile image is refused, so it can never be freed).  A new table is
 * written to new clusters and flushed, then published by one header
 * write, then the old one is freed: a crash leaks clusters at worst.
 *
 * Limits, as QEMU's: at most 65536 snapshots, a table of at most 64 MiB,
 * at most 1024 bytes of extra data per entry.  The snapshot operations
 * themselves (create, apply, delete, reference counting) are in
 * snapshot.c.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/qcow2/snapshot-table.h"
#include "util/checked.h"
#include "util/cleanup.h"

void
qcow2_snap_table_free (struct snap_table *t)
{
  for (uint32_t i = 0; t->sn && i < t->n; i++) {
    free (t->sn[i].extra);
    free (t->sn[i].id);
    free (t->sn[i].name);
  }
  free (t->sn);
  *t = (struct snap_table){ 0 };
}

static size_t
entry_bytes (uint32_t extra, size_t id_len, size_t name_len)
{
  return ROUND_UP (40 + (size_t)extra + id_len + name_len, 8);
}

/* A string of LEN bytes from P, refused when it holds a NUL. */
static char *
take_string (const uint8_t *p, size_t len)
{
  char *s;

  if (memchr (p, 0, len) || !(s = malloc (len + 1)))
    return NULL;
  memcpy (s, p, len);
  s[len] = 0;
  return s;
}

/* Parse entry I (fixed part FIX, the rest at REST) into SN. */
static bool
parse_entry (strata_node *node, uint32_t i, const uint8_t *fix,
             const uint8_t *rest, struct snap *sn, strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  uint16_t id_len = be16_load (fix + 12), name_len = be16_load (fix + 14);
  uint32_t extra = be32_load (fix + 36);

  sn->l1_offset = be64_load (fix);
  sn->l1_size = be32_load (fix + 8);
  sn->date_sec = be32_load (fix + 16);
  sn->date_nsec = be32_load (fix + 20);
  sn->vm_clock_nsec = be64_load (fix + 24);
  sn->vm_state_size = be32_load (fix + 32);
  sn->extra_size = extra;
  sn->disk_size = s->size;
  sn->icount = UINT64_MAX;
  if (extra >= 8)
    sn->vm_state_size = be64_load (rest);
  if (extra >= 16)
    sn->disk_size = be64_load (rest + 8);
  if (extra >= 24)
    sn->icount = be64_load (rest + 16);
  if (!(sn->extra = malloc (extra ? extra : 1))
      || !(sn->id = take_string (rest + extra, id_len))
      || !(sn->name = take_string (rest + extra + id_len, name_len))) {
    error_set (errp, EINVAL,
               "%s: snapshot table entry %" PRIu32 " has an "
               "id or name with a NUL byte",
               node->filename, i);
    return false;
  }
  memcpy (sn->extra, rest, extra);
  if (sn->disk_size > (1ull << 62) || sn->disk_size % 512) {
    error_set (errp, EINVAL,
               "%s: snapshot table entry %" PRIu32 " disk size "
               "%" PRIu64 " is invalid",
               node->filename, i, sn->disk_size);
    return false;
  }
  return true;
}

/* Whether host bytes [off, off+len) touch the header cluster, the active
 * L1 table or the refcount table: a table placed there by a hostile image
 * must never be freed. */
bool
qcow2_snap_overlaps_core (const struct qcow2_state *s, uint64_t off,
                          uint64_t len)
{
  uint64_t end = off + len, l1_end = s->l1_offset + s->l1_size * 8ull;
  uint64_t rt_end
      = s->rt_offset + ((uint64_t)s->rt_clusters << s->cluster_bits);

  return len
         && (off < s->cluster_size
             || (s->l1_size && off < l1_end && s->l1_offset < end)
             || (off < rt_end && s->rt_offset < end));
}

/* Whether LEN bytes of entry I at POS lie inside the file (FLEN bytes)
 * and within the table's size limit. */
static bool
entry_fits (strata_node *node, const struct snap_table *t, uint32_t i,
            uint64_t pos, uint64_t len, int64_t flen, strata_error **errp)
{
  if (pos - t->offset + len <= SNAP_MAX_TABLE && pos + len <= (uint64_t)flen)
    return true;
  error_set (errp, EINVAL,
             "%s: snapshot table entry %" PRIu32 " at 0x%" PRIx64
             " is past the end of the file or the table's size "
             "limit (%llu bytes)",
             node->filename, i, pos, SNAP_MAX_TABLE);
  return false;
}

/* Read and check the whole snapshot table. */
bool
qcow2_snap_table_read_locked (strata_node *node, struct snap_table *t,
                              strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  const char *fn = node->filename;
  int64_t flen = node_length (node->file);
  uint8_t h[12];
  uint64_t pos;
  int r;

  *t = (struct snap_table){ 0 };
  if (flen < 0 || (r = node_pread (node->file, 60, h, sizeof h, 0)) < 0) {
    error_set (errp, EIO, "%s: cannot read the snapshot table location", fn);
    return false;
  }
  t->n = be32_load (h);
  t->offset = pos = be64_load (h + 4);
  if (t->n == 0)
    return true;
  if (t->n > SNAP_MAX_COUNT) {
    error_set (errp, EFBIG,
               "%s: nb_snapshots %" PRIu32 " is too large (max "
               "%d)",
               fn, t->n, SNAP_MAX_COUNT);
    return false;
  }
  if (pos % s->cluster_size || pos == 0 || pos >= QCOW2_MAX_OFFSET) {
    error_set (errp, EINVAL,
               "%s: snapshot table offset 0x%" PRIx64 " is "
               "invalid",
               fn, pos);
    return false;
  }
  if (!(t->sn = calloc (t->n, sizeof *t->sn))) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  for (uint32_t i = 0; i < t->n; i++) {
    uint8_t fix[40];
    CLEANUP_FREE uint8_t *rest = NULL;
    uint64_t len;

    if (!entry_fits (node, t, i, pos, 40, flen, errp))
      goto fail;
    if ((r = node_pread (node->file, pos, fix, 40, 0)) < 0) {
      error_set (errp, -r, "%s: cannot read snapshot table entry %" PRIu32, fn,
                 i);
      goto fail;
    }
    if (be32_load (fix + 36) > SNAP_MAX_EXTRA) {
      error_set (errp, EINVAL,
                 "%s: snapshot table entry %" PRIu32 " extra "
                 "data size %" PRIu32 " is too large (max %d)",
                 fn, i, be32_load (fix + 36), SNAP_MAX_EXTRA);
      goto fail;
    }
    /* The padding of the last entry may be past the end of the file. */
    len = 40ull + be32_load (fix + 36) + be16_load (fix + 12)
          + be16_load (fix + 14);
    if (!entry_fits (node, t, i, pos, len, flen, errp))
      goto fail;
    if (!(rest = malloc (len - 40 + 1))) {
      error_set (errp, ENOMEM, "out of memory");
      goto fail;
    }
    if ((r = node_pread (node->file, pos + 40, rest, len - 40, 0)) < 0) {
      error_set (errp, -r, "%s: cannot read snapshot table entry %" PRIu32, fn,
                 i);
      goto fail;
    }
    if (!parse_entry (node, i, fix, rest, &t->sn[i], errp))
      goto fail;
    pos += ROUND_UP (len, 8);
  }
  t->bytes = pos - t->offset;
  if (qcow2_snap_overlaps_core (s, t->offset, t->bytes)) {
    error_set (errp, EINVAL,
               "%s: snapshot table at 0x%" PRIx64 " overlaps "
               "the header, the L1 table or the refcount table",
               fn, t->offset);
    goto fail;
  }
  return true;

fail:
  qcow2_snap_table_free (t);
  return false;
}

/* Write BYTES of BUF to newly allocated clusters, flushed.  Returns the
 * offset or a negative errno. */
int64_t
qcow2_snap_write_new_locked (strata_node *node, const uint8_t *buf,
                             uint64_t bytes)
{
  struct qcow2_state *s = node->opaque;
  uint64_t n = ROUND_UP (bytes, s->cluster_size) >> s->cluster_bits;
  CLEANUP_FREE uint8_t *padded = calloc (n ? n : 1, s->cluster_size);
  int64_t off;
  int r;

  if (!padded)
    return -ENOMEM;
  memcpy (padded, buf, bytes);
  if ((off = qcow2_alloc_contiguous_locked (node, n)) < 0)
    return off;
  if ((r = qcow2_overlap_check_locked (node, off, n << s->cluster_bits, 0,
                                       "snapshot metadata", UINT64_MAX))
          < 0
      || (r = node_pwrite (node->file, off, padded, n << s->cluster_bits, 0))
             < 0
      || (r = node_flush (node->file)) < 0) {
    qcow2_free_clusters_locked (node, off, n << s->cluster_bits);
    return r;
  }
  return off;
}

/* ---- writing the table ---- */

static uint8_t *
serialize (const struct snap_table *t, uint64_t *bytes)
{
  uint64_t total = 0, pos = 0;
  uint8_t *buf;

  for (uint32_t i = 0; i < t->n; i++)
    total += entry_bytes (MAX (t->sn[i].extra_size, SNAP_EXTRA_KNOWN),
                          strlen (t->sn[i].id), strlen (t->sn[i].name));
  if (total > SNAP_MAX_TABLE || !(buf = calloc (1, total ? total : 1)))
    return NULL;
  for (uint32_t i = 0; i < t->n; i++) {
    const struct snap *sn = &t->sn[i];
    uint32_t extra = MAX (sn->extra_size, SNAP_EXTRA_KNOWN);
    size_t il = strlen (sn->id), nl = strlen (sn->name);
    uint8_t *p = buf + pos;

    be64_store (p, sn->l1_offset);
    be32_store (p + 8, sn->l1_size);
    be16_store (p + 12, il);
    be16_store (p + 14, nl);
    be32_store (p + 16, sn->date_sec);
    be32_store (p + 20, sn->date_nsec);
    be64_store (p + 24, sn->vm_clock_nsec);
    be32_store (p + 32, (uint32_t)MIN (sn->vm_state_size, UINT32_MAX));
    be32_store (p + 36, extra);
    memcpy (p + 40, sn->extra, sn->extra_size);
    be64_store (p + 40, sn->vm_state_size);
    be64_store (p + 48, sn->disk_size);
    be64_store (p + 56, sn->icount);
    memcpy (p + 40 + extra, sn->id, il);
    memcpy (p + 40 + extra + il, sn->name, nl);
    pos += entry_bytes (extra, il, nl);
  }
  *bytes = total;
  return buf;
}

/* Write T to new clusters, publish it with one header write, free OLD's
 * clusters. */
bool
qcow2_snap_table_publish_locked (strata_node *node, const struct snap_table *t,
                                 const struct snap_table *old,
                                 strata_error **errp)
{
  struct qcow2_state *s = node->opaque;
  CLEANUP_FREE uint8_t *buf = NULL;
  uint64_t bytes = 0;
  int64_t off = 0;
  uint8_t h[12];
  int r;

  if (!(buf = serialize (t, &bytes))) {
    error_set (errp, EFBIG,
               "%s: the snapshot table would be larger than "
               "%llu bytes",
               node->filename, SNAP_MAX_TABLE);
    return false;
  }
  if (t->n && (off = qcow2_snap_write_new_locked (node, buf, bytes)) < 0) {
    r = (int)off;
    goto fail;
  }
  be32_store (h, t->n);
  be64_store (h + 4, (uint64_t)off);
  if ((r = qcow2_write_header_field (node, 60, h, sizeof h)) < 0
      || (r = node_flush (node->file)) < 0)
    goto fail;
  s->nb_snapshots = t->n;
  /* Unreferenced now: a failure from here on only leaks the old table. */
  if (old->n)
    qcow2_free_clusters_locked (node, old->offset, old->bytes);
  return true;

fail:
  error_set (errp, -r, "%s: cannot write the snapshot table: %s",
             node->filename, strerror (-r));
  return false;
}

/* ---- lookups ---- */

int
qcow2_snap_find_by_name (const struct snap_table *t, const char *name)
{
  for (uint32_t i = 0; i < t->n; i++)
    if (strcmp (t->sn[i].name, name) == 0)
      return (int)i;
  return -1;
}

/* As qemu-img snapshot -a: an id first, then a name. */
int
qcow2_snap_find (const struct snap_table *t, const char *arg)
{
  for (uint32_t i = 0; i < t->n; i++)
    if (strcmp (t->sn[i].id, arg) == 0)
      return (int)i;
  return qcow2_snap_find_by_name (t, arg);
}

/* The next id: one more than the largest numeric id (QEMU's rule; an id
 * that is not a number counts as 0). */
char *
qcow2_snap_new_id (const struct snap_table *t)
{
  unsigned long max = 0;
  char *id;

  for (uint32_t i = 0; i < t->n; i++) {
    unsigned long v = strtoul (t->sn[i].id, NULL, 10);
    max = MAX (max, v);
  }
  if (asprintf (&id, "%lu", max + 1) < 0)
    return NULL;
  return id;
}
