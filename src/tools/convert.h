/* strata-img convert's copy engine (convert-copy.c), as the command
 * (img-convert.c) sets it up: the sources concatenated into one address
 * space, the target, and the state the copy threads share.  The lock
 * (c->lock, helpers named _convert_locked) guards the cursor, the cached
 * block status and the write turns; docs/architecture.md, Locks.
 */
#ifndef STRATA_CONVERT_H
#define STRATA_CONVERT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include <strata/strata.h>

#include "progress.h"
#include "ratelimit.h"

#define CONVERT_BUF (2u << 20) /* bytes per chunk, as qemu-img */
#define SECTOR 512u

enum chunk_status { ST_DATA, ST_ZERO, ST_BACKING };

struct source {
  const char *name;
  strata_node *node;
  uint64_t base; /* offset of its first byte in the copy */
  uint64_t size; /* rounded up to whole sectors, as qemu-img */
  uint64_t real; /* the image's own length */
  /* qemu-img's chunking, which zero detection depends on: QEMU's qcow2
   * answers block status up to the end of one L2 table's span at most
   * (spans[k] for layer k of the chain, 0 for other formats), and
   * qemu-img trims each answer to the top image's cluster size (align). */
  uint64_t *spans;
  int nlayers;
  uint64_t align;
};

struct chunk {
  uint64_t off, len, seq;
  enum chunk_status status;
};

struct convert {
  /* Set up before the threads start. */
  struct source *src;
  int nsrc;
  uint64_t total;
  strata_node *dst;
  bool compressed, backing_mode, zero_init, out_of_order, progress;
  bool salvage;        /* --salvage: unreadable sectors become zeros */
  uint64_t min_sparse; /* bytes; 0 = no zero detection */
  uint64_t align;      /* sectors: zero runs are cut at these */
  uint64_t cluster;    /* target cluster size (compressed chunks) */
  uint64_t bufsize;
  unsigned wflags; /* STRATA_REQ_FUA for writethrough caches */

  pthread_mutex_t lock;
  /* Waiters for their turn to write: chunk SEQ waits on turn[SEQ % nturn].
   * Each thread holds one chunk, so the waiting chunks are fewer than
   * nturn apart and never share a condition. */
  pthread_cond_t turn[16];
  unsigned nturn;
  /* The cursor and the cached block status, under lock. */
  uint64_t next, seq;
  uint64_t status_end;
  enum chunk_status status;
  /* In-order writes: the sequence number whose turn it is. */
  uint64_t written_seq;
  uint64_t done; /* bytes finished, for -p */
  /* -r: one thread takes the chunks then, so nothing else touches it. */
  struct ratelimit rl;
  struct progress prog;
  /* The first failure. */
  int err;
  char *err_msg;
};

/* Run the copy with N threads (at most 16).  Returns 0 or 1 (the message
 * printed). */
int convert_run (struct convert *c, int n);

#endif
