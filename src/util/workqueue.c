/* strata: a fixed pool of threads running queued work items.
 *
 *   workqueue_submit ──> [ item ─> item ─> ... ] ──> NR_THREADS threads
 *        (wake N)          one FIFO, pool lock         run item->run()
 *                                                      outside the lock
 *
 * A thread with nothing to do parks: it pushes itself on the idle stack
 * and sleeps on its own semaphore.  Whoever wakes threads pops them off
 * the stack under the pool lock and posts their semaphores after dropping
 * it.  A hand-over thus costs one futex wake and one futex wait, and the
 * woken thread finds the pool lock free; a condition variable would add a
 * wake at its next unlock (glibc marks a mutex retaken by a waiter as
 * contended) and woken threads would race for the lock.
 *
 * Invariants (all under the pool lock):
 * - NR_ITEMS is the length of the list HEAD..TAIL; TAIL is NULL exactly
 *   when HEAD is.
 * - The idle stack (IDLE_TOP, linked by next_idle, IDLE long) holds the
 *   threads that sleep, or will, without having been posted; a thread
 *   popped from it is posted exactly once and pushes itself again only
 *   after it has woken.  So waking min(IDLE, queued) threads never leaves
 *   a woken thread with nothing to do, unless an awake thread took the
 *   item first.
 * - A thread parks only when the queue is empty and QUIT is not set, and
 *   leaves only when QUIT is set and the queue is empty, so
 *   workqueue_free() runs everything queued before it joins.
 * See workqueue.h for the wake policy.
 */
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdlib.h>

#include "util/clock.h"
#include "util/workqueue.h"

struct worker {
  struct workqueue *wq;
  sem_t wake;               /* posted once per pop from the idle stack */
  struct worker *next_idle; /* the idle stack's link */
  pthread_t thread;
};

struct workqueue {
  pthread_mutex_t lock; /* the pool lock: everything below but WORKERS */
  struct workqueue_item *head, *tail;
  unsigned nr_items; /* in HEAD..TAIL */
  unsigned idle;     /* threads on the idle stack */
  struct worker *idle_top;
  uint64_t slow_ns;
  uint64_t avg_ns; /* moving average of an item's wall time (written
                    * under the lock, read atomically without it) */
  bool quit;
  size_t nr_threads;
  struct worker workers[];
};

/* Items waiting in the queue that a sleeping thread could take. */
static unsigned
workqueue_waiting_pool_locked (struct workqueue *wq)
{
  return wq->nr_items < wq->idle ? wq->nr_items : wq->idle;
}

/* Pop up to N threads off the idle stack; the caller posts them
 * (workqueue_post) once it has dropped the pool lock. */
static struct worker *
workqueue_pop_idle_pool_locked (struct workqueue *wq, unsigned n)
{
  struct worker *chain = NULL;

  while (n-- > 0 && wq->idle_top) {
    struct worker *w = wq->idle_top;
    wq->idle_top = w->next_idle;
    wq->idle--;
    w->next_idle = chain;
    chain = w;
  }
  return chain;
}

static unsigned
workqueue_post (struct worker *chain)
{
  unsigned n = 0;

  while (chain) {
    struct worker *w = chain;
    chain = w->next_idle;
    sem_post (&w->wake);
    n++;
  }
  return n;
}

static void *
workqueue_thread (void *arg)
{
  struct worker *w = arg;
  struct workqueue *wq = w->wq;

  pthread_mutex_lock (&wq->lock);
  for (;;) {
    struct workqueue_item *item = wq->head;
    uint64_t took;

    if (!item) {
      if (wq->quit)
        break;
      w->next_idle = wq->idle_top;
      wq->idle_top = w;
      wq->idle++;
      pthread_mutex_unlock (&wq->lock);
      while (sem_wait (&w->wake) < 0 && errno == EINTR)
        ;
      pthread_mutex_lock (&wq->lock);
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
    if (took > wq->slow_ns && workqueue_waiting_pool_locked (wq)) {
      struct worker *chain = workqueue_pop_idle_pool_locked (
          wq, workqueue_waiting_pool_locked (wq));
      pthread_mutex_unlock (&wq->lock);
      workqueue_post (chain);
      pthread_mutex_lock (&wq->lock);
    }
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
  wq = calloc (1, sizeof *wq + nr_threads * sizeof wq->workers[0]);
  if (!wq)
    return NULL;
  pthread_mutex_init (&wq->lock, NULL);
  wq->slow_ns = slow_ns;
  wq->avg_ns = 2 * slow_ns;
  for (unsigned i = 0; i < nr_threads; i++) {
    struct worker *w = &wq->workers[wq->nr_threads];
    w->wq = wq;
    if (sem_init (&w->wake, 0, 0) < 0)
      break;
    if (pthread_create (&w->thread, NULL, workqueue_thread, w) != 0) {
      sem_destroy (&w->wake);
      break;
    }
    wq->nr_threads++;
  }
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
  struct worker *chain;

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
  chain = workqueue_pop_idle_pool_locked (wq, wake);
  pthread_mutex_unlock (&wq->lock);
  workqueue_post (chain);
}

bool
workqueue_nudge (struct workqueue *wq, bool wake)
{
  struct worker *chain = NULL;
  unsigned n;

  pthread_mutex_lock (&wq->lock);
  n = workqueue_waiting_pool_locked (wq);
  if (wake)
    chain = workqueue_pop_idle_pool_locked (wq, n);
  pthread_mutex_unlock (&wq->lock);
  workqueue_post (chain);
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
  struct worker *chain;

  if (!wq)
    return;
  pthread_mutex_lock (&wq->lock);
  wq->quit = true;
  chain = workqueue_pop_idle_pool_locked (wq, wq->idle);
  pthread_mutex_unlock (&wq->lock);
  workqueue_post (chain);
  for (size_t i = 0; i < wq->nr_threads; i++) {
    pthread_join (wq->workers[i].thread, NULL);
    sem_destroy (&wq->workers[i].wake);
  }
  pthread_mutex_destroy (&wq->lock);
  free (wq);
}
