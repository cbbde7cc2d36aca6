/* Unit tests of the request tracker (src/block/tracker.c). */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#include "block/tracker.h"
#include "test.h"

struct waiter {
  struct tracker *t;
  uint64_t off, len;
  bool serialising;
  atomic_bool started, done;
};

static void *
waiter_thread (void *arg)
{
  struct waiter *w = arg;
  struct tracked_req r;

  atomic_store (&w->started, true);
  tracker_begin (w->t, &r, w->off, w->len, w->serialising);
  atomic_store (&w->done, true);
  tracker_end (w->t, &r);
  return NULL;
}

/* Start a thread that begins a request after OLD; report whether it got
 * through while OLD was still in flight. */
static bool
blocked_by (struct tracker *t, uint64_t off, uint64_t len, bool ser,
            struct tracked_req *old)
{
  struct waiter w = { .t = t, .off = off, .len = len, .serialising = ser };
  pthread_t th;
  bool blocked;

  pthread_create (&th, NULL, waiter_thread, &w);
  while (!atomic_load (&w.started))
    sched_yield ();
  usleep (50 * 1000);
  blocked = !atomic_load (&w.done);
  tracker_end (t, old);
  pthread_join (th, NULL);
  CHECK (atomic_load (&w.done));
  return blocked;
}

static void
test_ordinary_requests_overlap_freely (void)
{
  struct tracker t;
  struct tracked_req a;

  tracker_init (&t);
  tracker_begin (&t, &a, 0, 4096, false);
  CHECK (!blocked_by (&t, 1024, 4096, false, &a));
  CHECK (tracker_waits (&t) == 0);
  tracker_destroy (&t);
}

static void
test_serialising_waits_for_older_overlap (void)
{
  struct tracker t;
  struct tracked_req a;

  tracker_init (&t);
  tracker_begin (&t, &a, 0, 4096, false);
  CHECK (blocked_by (&t, 4095, 10, true, &a));
  CHECK (tracker_waits (&t) == 1);
  tracker_destroy (&t);
}

static void
test_ordinary_waits_for_older_serialising (void)
{
  struct tracker t;
  struct tracked_req a;

  tracker_init (&t);
  tracker_begin (&t, &a, 65536, 65536, true);
  CHECK (blocked_by (&t, 0, 65537, false, &a));
  tracker_destroy (&t);
}

static void
test_disjoint_ranges_do_not_wait (void)
{
  struct tracker t;
  struct tracked_req a;

  tracker_init (&t);
  tracker_begin (&t, &a, 0, 4096, true);
  CHECK (!blocked_by (&t, 4096, 4096, true, &a));   /* adjacent, not overlapping */
  tracker_destroy (&t);
}

static void
test_wait_idle_waits_for_overlap_only (void)
{
  struct tracker t;
  struct tracked_req a;

  tracker_init (&t);
  tracker_begin (&t, &a, 100, 10, false);
  tracker_wait_idle (&t, 0, 100);        /* disjoint: returns at once */
  CHECK (tracker_count (&t) == 1);
  tracker_end (&t, &a);
  tracker_wait_idle (&t, 0, 0);
  CHECK (tracker_count (&t) == 0);
  tracker_destroy (&t);
}

/* Serialising requests on one range make a racy read-modify-write safe. */
static struct tracker stress_t;
static volatile long stress_counter;

static void *
stress_thread (void *arg)
{
  (void) arg;
  for (int i = 0; i < 2000; i++) {
    struct tracked_req r;
    long v;

    tracker_begin (&stress_t, &r, 512, 512, true);
    v = stress_counter;
    if (i % 64 == 0)
      sched_yield ();
    stress_counter = v + 1;
    tracker_end (&stress_t, &r);
  }
  return NULL;
}

static void
test_serialising_excludes_each_other (void)
{
  pthread_t th[8];

  tracker_init (&stress_t);
  stress_counter = 0;
  for (int i = 0; i < 8; i++)
    pthread_create (&th[i], NULL, stress_thread, NULL);
  for (int i = 0; i < 8; i++)
    pthread_join (th[i], NULL);
  CHECK (stress_counter == 8 * 2000);
  CHECK (tracker_count (&stress_t) == 0);
  tracker_destroy (&stress_t);
}

TESTS (T (test_ordinary_requests_overlap_freely),
       T (test_serialising_waits_for_older_overlap),
       T (test_ordinary_waits_for_older_serialising),
       T (test_disjoint_ranges_do_not_wait),
       T (test_wait_idle_waits_for_overlap_only),
       T (test_serialising_excludes_each_other))
