/* Copy-on-read against guest writes, for test_copy_on_read.py.
 *
 *   cor_stress IMAGE EXPECTED CLUSTER_SIZE CLUSTERS READERS WRITERS ROUNDS
 *
 * IMAGE is a qcow2 overlay, opened with a copy-on-read filter on top, over
 * a backing file that reads 0xbb everywhere.  Writer w owns the clusters c
 * with c % WRITERS == w and writes 4 KiB slices of them with new patterns,
 * cluster after cluster; readers keep reading, through the filter, the
 * cluster some writer is at, so copy-ups of not yet copied clusters race
 * the writes to them.  A copy-up that wrote its stale 0xbb over a newer
 * guest write would lose that write.
 * At the end EXPECTED gets the guest view the writes should have left
 * (raw bytes), which the test compares with the image.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <strata/strata.h>

#define SLICE 4096

static strata_node *node;
static unsigned readers, writers, clusters, rounds;
static size_t cs;
static uint8_t *model;
static atomic_bool done;
static atomic_uint at[64]; /* the cluster each writer is writing */

static void
die (const char *what)
{
  fprintf (stderr, "%s: %s\n", what, strata_last_error_message ());
  exit (1);
}

static void *
writer (void *arg)
{
  unsigned w = (unsigned)(size_t)arg, seed = w * 7919 + 1;
  uint8_t buf[SLICE];

  for (unsigned r = 0; r < rounds; r++) {
    for (unsigned c = w; c < clusters; c += writers) {
      uint64_t off = c * cs + (rand_r (&seed) % (cs / SLICE)) * SLICE;
      uint8_t p = 1 + rand_r (&seed) % 0xb0;

      atomic_store (&at[w], c);
      memset (buf, p, SLICE);
      if (strata_pwrite (node, buf, SLICE, off, 0) < 0)
        die ("write");
      memset (model + off, p, SLICE);
    }
  }
  return NULL;
}

static void *
reader (void *arg)
{
  unsigned seed = (unsigned)(size_t)arg * 104729 + 3;
  uint8_t *buf = malloc (2 * cs);

  while (!atomic_load (&done)) {
    unsigned c = atomic_load (&at[rand_r (&seed) % writers]);
    unsigned n = 1 + rand_r (&seed) % 2;

    if (c + n > clusters)
      n = clusters - c;
    if (strata_pread (node, buf, n * cs, c * cs, 0) < 0)
      die ("read");
  }
  free (buf);
  return NULL;
}

int
main (int argc, char **argv)
{
  strata_error *err = NULL;
  pthread_t tid[64];
  FILE *f;

  if (argc != 8)
    return 2;
  cs = strtoul (argv[3], NULL, 0);
  clusters = atoi (argv[4]);
  readers = atoi (argv[5]);
  writers = atoi (argv[6]);
  rounds = atoi (argv[7]);
  if (readers + writers > 64 || !writers || cs % SLICE)
    return 2;
  node = strata_open (argv[1], "qcow2", NULL,
                      STRATA_OPEN_RDWR | STRATA_OPEN_COPY_ON_READ, &err);
  if (!node) {
    fprintf (stderr, "%s\n", strata_error_message (err));
    return 1;
  }
  model = malloc (clusters * cs);
  memset (model, 0xbb, clusters * cs);
  for (unsigned i = 0; i < readers; i++)
    pthread_create (&tid[i], NULL, reader, (void *)(size_t)i);
  for (unsigned i = 0; i < writers; i++)
    pthread_create (&tid[readers + i], NULL, writer, (void *)(size_t)i);
  for (unsigned i = 0; i < writers; i++)
    pthread_join (tid[readers + i], NULL);
  atomic_store (&done, true);
  for (unsigned i = 0; i < readers; i++)
    pthread_join (tid[i], NULL);
  if (strata_flush (node, 0) < 0)
    die ("flush");
  strata_close (node);
  if (!(f = fopen (argv[2], "wb"))
      || fwrite (model, 1, clusters * cs, f) != clusters * cs || fclose (f))
    return 1;
  free (model);
  return 0;
}
