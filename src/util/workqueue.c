/* strata: a fixed pool of threads running queued work items.
 *
 *   workqueue_submit ──> [ item ─> item ─> ... ] ──> NR_THREADS threads
 *        (wake N)          one FIFO, pool lock         run item->run()
 *                                                      outside the lock
 *
 * Invariants (all under the pool lock):
 * - NR_ITEMS is the length of the list HEAD..TAIL; TAIL is NULL exactly
 *   when HEAD is.
 * - IDLE counts the threads in pthread_cond_wait: a signal sent while
 *   IDLE > 0 wakes a thread that will look at the queue, so waking
 *   min(IDLE, queued) threads never leaves a woken thread with nothing
 *   to do, unless an awake thread took the item first.
 * - A thread leaves only when QUIT is set and the queue is empty, so
 *   workqueue_free() runs everything queued before it joins.
 * See workqueue.h for the wake policy.
 */
#include <pthread.h>
#include <stdlib.h>

#include "util/clock.h"
#include "util/workqueue.h"

struct workqueue {
  pthread_mutex_t lock; /* the pool lock: everything below but THREADS */
  pthread_cond_t cond;  /* items queued, or QUIT set */
  struct workqueue_item *head, *tail;
  unsigned nr_items; /* in HEAD..TAIL */
  unsigned idle;     /* threads waiting on COND */
  uint64_t slow_ns;
  uint64_t avg_ns; /* moving average of an item's wall time (written
                    * under the lock, read atomically without it) */
  bool quit;
  size_t nr_threads;
  pthread_t threads[];
};

/* Items waiting in the queue that a sleeping thread could take. */
static unsigned
workqueue_waiting_pool_locked (struct workqueue *wq)
{
  return wq->nr_items < wq->idle ? wq->nr_items : wq->idle;
}

/* Wake a sleeping thread for each of them; returns how many. */
static unsigned
workqueue_wake_pool_locked (struct workqueue *wq)
{
  unsigned n = workqueue_waiting_pool_locked (wq);

  for (unsigned i = 0; i < n; i++)
    pthread_cond_signal (&wq->cond);
  return n;
}

static void *
workqueue_thread (void *arg)
{
  struct workqueue *wq = arg;

  pthread_mutex_lock (&wq->lock);
  for (;;) {
    struct workqueue_item *item = wq->head;
    uint64_t took;

    if (!item) {
      if (wq->quit)
        break;
      wq->idle++;
      pthread_cond_wait (&wq->cond, &wq->lock);
      wq->idle--;
      continue;
    }
    wq->head = item->next;
    if (!wq->head)
      wq->tail = NULL;
    wq->nr_items--;
    pthread_mutex_unlock (&wq->lock);
    took = clock_now_ns ();
    item->run (item);
    took = clock_now_ns () - took;
    pthread_mutex_lock (&wq->lock);
    /* Stored atomically: workqueue_avg_ns() reads it without the lock. */
    __atomic_store_n (&wq->avg_ns, wq->avg_ns - wq->avg_ns / 8 + took / 8,
                      __ATOMIC_RELAXED);
    /* Items queued behind a slow one (this thread took them while items
     * were short) get threads of their own now. */
    if (took > wq->slow_ns)
      workqueue_wake_pool_locked (wq);
  }
  pthread_mutex_unlock (&wq->lock);
  return NULL;
}

struct workqueue *
workqueue_new (unsigned nr_threads, uint64_t slow_ns)
{
  struct workqueue *wq;

  if (nr_threads == 0)
    return NULL;
  wq = calloc (1, sizeof *wq + nr_threads * sizeof wq->threads[0]);
  if (!wq)
    return NULL;
  pthread_mutex_init (&wq->lock, NULL);
  pthread_cond_init (&wq->cond, NULL);
  wq->slow_ns = slow_ns;
  wq->avg_ns = 2 * slow_ns;
  for (unsigned i = 0; i < nr_threads; i++)
    if (pthread_create (&wq->threads[wq->nr_threads], NULL, workqueue_thread,
                        wq)
        == 0)
      wq->nr_threads++;
  if (wq->nr_threads == 0) {
    workqueue_free (wq);
    return NULL;
  }
  return wq;
}

void
workqueue_submit (struct workqueue *wq, struct workqueue_item *first,
                  struct workqueue_item *last, unsigned n, unsigned wake)
{
  if (!first)
    return;
  last->next = NULL;
  pthread_mutex_lock (&wq->lock);
  if (wq->tail)
    wq->tail->next = first;
  else
    wq->head = first;
  wq->tail = last;
  wq->nr_items += n;
  if (wake > wq->idle)
    wake = wq->idle;
  pthread_mutex_unlock (&wq->lock);
  while (wake-- > 0)
    pthread_cond_signal (&wq->cond);
}

bool
workqueue_nudge (struct workqueue *wq, bool wake)
{
  unsigned n;

  pthread_mutex_lock (&wq->lock);
  n = wake ? workqueue_wake_pool_locked (wq)
           : workqueue_waiting_pool_locked (wq);
  pthread_mutex_unlock (&wq->lock);
  return n > 0;
}

uint64_t
workqueue_avg_ns (struct workqueue *wq)
{
  return __atomic_load_n (&wq->avg_ns, __ATOMIC_RELAXED);
}

void
workqueue_free (struct workqueue *wq)
{
  if (!wq)
    return;
  pthread_mutex_lock (&wq->lock);
  wq->quit = true;
  pthread_cond_broadcast (&wq->cond);
  pthread_mutex_unlock (&wq->lock);
  for (size_t i = 0; i < wq->nr_threads; i++)
    pthread_join (wq->threads[i], NULL);
  pthread_cond_destroy (&wq->cond);
  pthread_mutex_destroy (&wq->lock);
  free (wq);
}
