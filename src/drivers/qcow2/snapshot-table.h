/* strata: the qcow2 snapshot table in memory, shared by
 * snapshot-table.c (reading, checking and writing it; the layout is
 * described there) and snapshot.c (the snapshot operations).  Calls
 * ending in _locked expect the node's lock held.
 */
#ifndef STRATA_QCOW2_SNAPSHOT_TABLE_H
#define STRATA_QCOW2_SNAPSHOT_TABLE_H

#include <stdbool.h>
#include <stdint.h>

#include "drivers/qcow2/qcow2.h"

#define SNAP_MAX_COUNT 65536
#define SNAP_MAX_TABLE (64ull << 20)
#define SNAP_MAX_EXTRA 1024
#define SNAP_EXTRA_KNOWN 24

struct snap {
  uint64_t l1_offset;
  uint32_t l1_size;
  uint32_t date_sec, date_nsec;
  uint64_t vm_clock_nsec;
  uint64_t vm_state_size;
  uint64_t disk_size;
  uint64_t icount; /* UINT64_MAX when not recorded */
  uint32_t extra_size;
  uint8_t *extra; /* as read: unknown fields are kept */
  char *id, *name;
};

struct snap_table {
  struct snap *sn;
  uint32_t n;
  uint64_t offset, bytes; /* where it is on disk */
};

/* Free T's entries and zero it. */
void qcow2_snap_table_free (struct snap_table *t);
/* Read and check the whole snapshot table into T (freed by
 * qcow2_snap_table_free). */
bool qcow2_snap_table_read_locked (strata_node *node, struct snap_table *t,
                                   strata_error **errp);
/* Write T to new clusters, publish it with one header write, free OLD's
 * clusters. */
bool qcow2_snap_table_publish_locked (strata_node *node,
                                      const struct snap_table *t,
                                      const struct snap_table *old,
                                      strata_error **errp);
/* Write BYTES of BUF to newly allocated clusters, flushed.  Returns the
 * offset or a negative errno. */
int64_t qcow2_snap_write_new_locked (strata_node *node, const uint8_t *buf,
                                     uint64_t bytes);
/* Whether host bytes [OFF, OFF+LEN) touch the header cluster, the active
 * L1 table or the refcount table. */
bool qcow2_snap_overlaps_core (const struct qcow2_state *s, uint64_t off,
                               uint64_t len);
/* Index of the entry named NAME, or -1. */
int qcow2_snap_find_by_name (const struct snap_table *t, const char *name);
/* As qemu-img snapshot -a/-d: an id first, then a name; -1 if neither. */
int qcow2_snap_find (const struct snap_table *t, const char *arg);
/* The next id (malloc'd; NULL when out of memory). */
char *qcow2_snap_new_id (const struct snap_table *t);

#endif
