/* strata: a fixed pool of threads running queued work items (workqueue.c).
 *
 * An item is a struct the caller embeds in its own (container_of), with
 * the function that runs it.  Items run in the order they were queued,
 * each on one of the pool's threads, at most NR_THREADS at a time.
 *
 * The queue does not wake a thread per item: waking one costs more than
 * a short item (a 4 KiB read from the page cache), so the submitter says
 * how many sleeping threads a batch deserves (workqueue_submit's WAKE),
 * and may look at workqueue_avg_ns() to decide.  Two rules keep items
 * from waiting behind one that blocks: an item that ran longer than
 * SLOW_NS wakes a thread for each item still queued when it ends, and
 * workqueue_nudge() lets a caller with nothing better to do (a reader
 * waiting for its socket) wake threads for queued items.
 *
 * Locks: one mutex (the pool lock) guards the queue, the stack of idle
 * threads, the quit flag and writes of the average (read atomically
 * without it).  An idle thread sleeps on a semaphore of its own, without
 * a timeout, posted by whoever pops it off the idle stack (after the pool
 * lock is dropped).  The pool lock is never held while an item runs, so
 * an item may take any lock of its caller, and submit more items.
 */
#ifndef STRATA_WORKQUEUE_H
#define STRATA_WORKQUEUE_H

#include <stdbool.h>
#include <stdint.h>

struct workqueue;

struct workqueue_item {
  struct workqueue_item *next; /* the queue's; a batch is linked by it */
  /* Runs ITEM on a pool thread; may free it. */
  void (*run) (struct workqueue_item *item);
};

/* A pool of NR_THREADS threads (fewer when thread creation fails; NULL
 * when none could start).  Items running longer than SLOW_NS count as
 * slow (see above); the average starts at twice SLOW_NS, so items count
 * as slow until they have proved short.  Freed by workqueue_free(). */
struct workqueue *workqueue_new (unsigned nr_threads, uint64_t slow_ns);

/* Queue the N items FIRST..LAST (linked through ->next; LAST->next is
 * set to NULL) and wake up to WAKE sleeping threads for them (fewer when
 * fewer sleep).  WAKE 0 leaves them to threads that are awake, to the
 * slow-item rule and to workqueue_nudge().  Threads are woken after the
 * pool lock is dropped, so they do not wake only to wait for it. */
void workqueue_submit (struct workqueue *wq, struct workqueue_item *first,
                       struct workqueue_item *last, unsigned n, unsigned wake);

/* Do items wait in the queue while threads sleep?  With WAKE, wake a
 * thread for each of them (as many as sleep). */
bool workqueue_nudge (struct workqueue *wq, bool wake);

/* The moving average (1/8 weight) of the items' wall time, in ns; reads
 * no lock, so a submitter may call it per batch. */
uint64_t workqueue_avg_ns (struct workqueue *wq);

/* Run every item still queued, then stop the threads and free WQ.  Once
 * this has started only the items that run may submit more (they run
 * too, before it returns). */
void workqueue_free (struct workqueue *wq);

#endif
