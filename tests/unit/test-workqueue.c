/* The work queue (src/util/workqueue.c): every item runs exactly once, no
 * more than the pool's threads run at a time, workqueue_free() runs what
 * is still queued, and the two rules that keep queued items from waiting
 * behind a blocked one (the slow-item wake-up and workqueue_nudge()). */
#include <pthread.h>
#include <stdbool.h>
#include <time.h>

#include "test.h"

#include "util/clock.h"
#include "util/workqueue.h"

#define MS 1000000ull /* ns */

struct item {
  struct workqueue_item wi; /* first */
  int runs;                 /* atomic */
  unsigned sleep_ms;
  struct gate *gate; /* wait for it to open before returning */
  struct meet *meet; /* return once another item met here too */
  bool met;          /* whether it did, within a second */
};

static int running, max_running, done; /* atomic */

/* Poll *COUNTER until it reaches N; false after TIMEOUT_MS. */
static bool
wait_count (int *counter, int n, unsigned timeout_ms)
{
  uint64_t end = clock_now_ns () + timeout_ms * MS;

  while (__atomic_load_n (counter, __ATOMIC_SEQ_CST) < n) {
    if (clock_now_ns () > end)
      return false;
    usleep (1000);
  }
  return true;
}

/* A gate the test opens; items wait on it. */
struct gate {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  bool open;
};

static void
gate_wait (struct gate *g)
{
  pthread_mutex_lock (&g->lock);
  while (!g->open)
    pthread_cond_wait (&g->cond, &g->lock);
  pthread_mutex_unlock (&g->lock);
}

static void
gate_open (struct gate *g)
{
  pthread_mutex_lock (&g->lock);
  g->open = true;
  pthread_cond_broadcast (&g->cond);
  pthread_mutex_unlock (&g->lock);
}

/* Two items meet when both are running at once; each gives up after a
 * second, so an item that waits for a partner never run does not hang
 * the test.  The wait has a timeout, so its clock is CLOCK_MONOTONIC. */
struct meet {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int arrived;
};

static void
meet_init (struct meet *m)
{
  pthread_condattr_t attr;

  pthread_mutex_init (&m->lock, NULL);
  pthread_condattr_init (&attr);
  pthread_condattr_setclock (&attr, CLOCK_MONOTONIC);
  pthread_cond_init (&m->cond, &attr);
  pthread_condattr_destroy (&attr);
  m->arrived = 0;
}

static bool
meet_wait (struct meet *m)
{
  struct timespec until = clock_timespec (clock_now_ns () + CLOCK_NS_PER_SEC);
  bool met;

  pthread_mutex_lock (&m->lock);
  m->arrived++;
  pthread_cond_broadcast (&m->cond);
  while (m->arrived < 2
         && pthread_cond_timedwait (&m->cond, &m->lock, &until) == 0)
    ;
  met = m->arrived >= 2;
  pthread_mutex_unlock (&m->lock);
  return met;
}

static void
item_run (struct workqueue_item *wi)
{
  struct item *it = (struct item *)wi;
  int now = __atomic_add_fetch (&running, 1, __ATOMIC_SEQ_CST);
  int max = __atomic_load_n (&max_running, __ATOMIC_SEQ_CST);

  while (now > max
         && !__atomic_compare_exchange_n (&max_running, &max, now, false,
                                          __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
    ;
  __atomic_add_fetch (&it->runs, 1, __ATOMIC_SEQ_CST);
  if (it->sleep_ms)
    usleep (it->sleep_ms * 1000);
  if (it->gate)
    gate_wait (it->gate);
  if (it->meet)
    it->met = meet_wait (it->meet);
  __atomic_sub_fetch (&running, 1, __ATOMIC_SEQ_CST);
  __atomic_add_fetch (&done, 1, __ATOMIC_SEQ_CST);
}

static struct item *
items_new (size_t n)
{
  struct item *v = calloc (n, sizeof *v);

  CHECK (v);
  for (size_t i = 0; i < n; i++)
    v[i].wi.run = item_run;
  running = max_running = done = 0;
  return v;
}

/* Queue V[FROM..TO) as one batch. */
static void
submit (struct workqueue *wq, struct item *v, size_t from, size_t to,
        unsigned wake)
{
  for (size_t i = from; i + 1 < to; i++)
    v[i].wi.next = &v[i + 1].wi;
  workqueue_submit (wq, &v[from].wi, &v[to - 1].wi, (unsigned)(to - from),
                    wake);
}

/* A pool whose threads have all started and gone to sleep. */
static struct workqueue *
idle_pool (unsigned threads, uint64_t slow_ns)
{
  struct workqueue *wq = workqueue_new (threads, slow_ns);

  CHECK (wq);
  usleep (100 * 1000);
  return wq;
}

static void
test_every_item_runs_once (void)
{
  enum { N = 1000 };
  struct workqueue *wq = workqueue_new (4, 200 * 1000);
  struct item *v = items_new (N);

  CHECK (wq);
  for (size_t i = 0; i < N; i += 10)
    submit (wq, v, i, i + 10, 1);
  CHECK (wait_count (&done, N, 10000));
  workqueue_free (wq);
  for (size_t i = 0; i < N; i++)
    CHECK (v[i].runs == 1);
  free (v);
}

static void
test_concurrency_is_bounded_by_the_pool (void)
{
  enum { N = 12, THREADS = 3 };
  struct workqueue *wq = workqueue_new (THREADS, 200 * 1000);
  struct item *v = items_new (N);

  CHECK (wq);
  for (size_t i = 0; i < N; i++)
    v[i].sleep_ms = 30;
  submit (wq, v, 0, N, N); /* ask for more threads than there are */
  CHECK (wait_count (&done, N, 10000));
  /* Sleeping items overlap: every thread ran, and never a fourth. */
  CHECK (max_running == THREADS);
  workqueue_free (wq);
  free (v);
}

static void
test_free_runs_what_is_queued (void)
{
  enum { N = 20 };
  struct workqueue *wq = idle_pool (2, 1000 * MS);
  struct item *v = items_new (N);

  for (size_t i = 0; i < N; i++)
    v[i].sleep_ms = 5;
  submit (wq, v, 0, N, 0); /* nobody woken: they wait in the queue */
  workqueue_free (wq);
  /* Returned only once all had run. */
  CHECK (__atomic_load_n (&done, __ATOMIC_SEQ_CST) == N);
  for (size_t i = 0; i < N; i++)
    CHECK (v[i].runs == 1);
  free (v);
}

static void
test_nudge_wakes_threads_for_queued_items (void)
{
  struct gate g
      = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false };
  struct workqueue *wq = idle_pool (2, 1000 * MS);
  struct item *v = items_new (2);

  CHECK (!workqueue_nudge (wq, false)); /* nothing queued */
  v[0].gate = &g;
  submit (wq, v, 0, 1, 1); /* blocks one thread */
  CHECK (wait_count (&v[0].runs, 1, 2000));
  submit (wq, v, 1, 2, 0); /* the other sleeps on */
  CHECK (workqueue_nudge (wq, false));
  usleep (50 * 1000);
  CHECK (v[1].runs == 0);
  CHECK (workqueue_nudge (wq, true));
  CHECK (wait_count (&v[1].runs, 1, 2000));
  CHECK (v[0].runs == 1 && !g.open); /* it ran beside the blocked one */
  gate_open (&g);
  workqueue_free (wq);
  free (v);
}

static void
test_slow_item_wakes_threads_for_those_behind_it (void)
{
  struct meet m;
  struct workqueue *wq = idle_pool (2, 20 * MS);
  struct item *v = items_new (3);

  /* One thread woken for three items: the slow first one, then two that
   * can only finish side by side.  Only the slow-item rule gets the
   * second thread going. */
  meet_init (&m);
  v[0].sleep_ms = 60;
  v[1].meet = v[2].meet = &m;
  submit (wq, v, 0, 3, 1);
  CHECK (wait_count (&done, 3, 5000));
  CHECK (v[1].met && v[2].met);
  workqueue_free (wq);
  free (v);
}

static void
test_short_items_are_short_in_the_average (void)
{
  enum { N = 200 };
  struct workqueue *wq = workqueue_new (2, 1000 * MS);
  struct item *v = items_new (N);

  CHECK (wq);
  /* Slow until proved short. */
  CHECK (workqueue_avg_ns (wq) == 2000 * MS);
  submit (wq, v, 0, N, 2);
  CHECK (wait_count (&done, N, 5000));
  usleep (10 * 1000); /* the last items' times are in */
  CHECK (workqueue_avg_ns (wq) < 1000 * MS);
  workqueue_free (wq);
  free (v);
}

TESTS (T (test_every_item_runs_once),
       T (test_concurrency_is_bounded_by_the_pool),
       T (test_free_runs_what_is_queued),
       T (test_nudge_wakes_threads_for_queued_items),
       T (test_slow_item_wakes_threads_for_those_behind_it),
       T (test_short_items_are_short_in_the_average))
