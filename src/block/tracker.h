/* strata: request tracker.
 *
 * Records the byte ranges of requests in flight on a node so that requests
 * that must not overlap can wait for each other.  A request is either
 * ordinary or serialising:
 *
 *   - a serialising request (copy-on-read fill, allocating write, RMW of a
 *     partial block) waits until every overlapping request that began
 *     before it has ended;
 *   - an ordinary request waits only for overlapping serialising requests
 *     that began before it.
 *
 * Every request waits only for requests older than itself, so waits cannot
 * form a cycle.  The tracker is independent of any node so that drivers
 * can keep private trackers at their own granularity (clusters, blocks).
 */
#ifndef STRATA_TRACKER_H
#define STRATA_TRACKER_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

struct tracked_req {
  uint64_t offset, len;
  uint64_t seq;
  bool serialising;
  struct tracked_req *prev, *next;
};

/* Callers use the functions below, never the fields. */
struct tracker {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  struct tracked_req *head;
  uint64_t next_seq;
  unsigned waits;  /* times a request had to wait; for tests and stats */
};

void tracker_init (struct tracker *t);
void tracker_destroy (struct tracker *t);

/* Register REQ (caller-owned storage, usually on the stack) for
 * [offset, offset+len) and wait until it may proceed. */
void tracker_begin (struct tracker *t, struct tracked_req *req,
                    uint64_t offset, uint64_t len, bool serialising);
void tracker_end (struct tracker *t, struct tracked_req *req);

/* Wait until no request overlapping [offset, offset+len) is in flight
 * (LEN 0 means the whole node). */
void tracker_wait_idle (struct tracker *t, uint64_t offset, uint64_t len);

/* Number of requests in flight. */
unsigned tracker_count (struct tracker *t);

/* Requests ever begun: a caller that saw the same number twice knows no
 * request began in between (a job's "has the guest been here?"). */
uint64_t tracker_seq (struct tracker *t);

/* Times a request had to wait for an overlapping one (tests, stats). */
unsigned tracker_waits (struct tracker *t);

#endif
