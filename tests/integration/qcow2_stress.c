/* Concurrency stress for test_qcow2_concurrency.py.
 *
 *   qcow2_stress IMAGE THREADS CLUSTER_SIZE CLUSTERS ROUNDS
 *
 * Thread t owns bytes [t * S, (t + 1) * S) of every cluster, S = CLUSTER_SIZE
 * / THREADS, and writes them with pattern t + 1 in a shuffled cluster order,
 * ROUNDS times, so threads keep allocating and rewriting the same clusters
 * at once.  Every so often a thread zeroes its slice and writes it again.
 * If two allocating writes to one cluster were not serialised, one slice
 * would be lost, which the test sees by reading the image back.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <strata/strata.h>

static strata_node *node;
static unsigned threads, clusters, rounds;
static size_t cs;

static void *
worker (void *arg)
{
  unsigned t = (unsigned) (size_t) arg, seed = t * 7919 + 1;
  size_t slice = cs / threads;
  unsigned *order = malloc (clusters * sizeof *order);
  char *buf = malloc (slice);

  memset (buf, t + 1, slice);
  for (unsigned i = 0; i < clusters; i++)
    order[i] = i;
  for (unsigned r = 0; r < rounds; r++) {
    for (unsigned i = clusters - 1; i > 0; i--) {
      unsigned j = rand_r (&seed) % (i + 1), x = order[i];
      order[i] = order[j];
      order[j] = x;
    }
    for (unsigned i = 0; i < clusters; i++) {
      uint64_t off = (uint64_t) order[i] * cs + t * slice;
      if (rand_r (&seed) % 8 == 0
          && strata_pwrite_zeroes (node, off, slice, 0) < 0)
        goto fail;
      if (strata_pwrite (node, buf, slice, off, 0) < 0)
        goto fail;
    }
  }
  free (order);
  free (buf);
  return NULL;

fail:
  fprintf (stderr, "thread %u: %s\n", t, strata_last_error_message ());
  exit (1);
}

int
main (int argc, char **argv)
{
  strata_error *err = NULL;
  pthread_t tid[64];

  if (argc != 6)
    return 2;
  threads = atoi (argv[2]);
  cs = strtoul (argv[3], NULL, 0);
  clusters = atoi (argv[4]);
  rounds = atoi (argv[5]);
  if (threads < 1 || threads > 64)
    return 2;
  node = strata_open (argv[1], "qcow2", NULL, STRATA_OPEN_RDWR, &err);
  if (!node) {
    fprintf (stderr, "%s\n", strata_error_message (err));
    return 1;
  }
  for (unsigned t = 0; t < threads; t++)
    pthread_create (&tid[t], NULL, worker, (void *) (size_t) t);
  for (unsigned t = 0; t < threads; t++)
    pthread_join (tid[t], NULL);
  if (strata_flush (node, 0) < 0)
    return 1;
  strata_close (node);
  return 0;
}
