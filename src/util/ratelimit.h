/* strata: a byte-rate limiter for block jobs (ratelimit.c).
 *
 * Virtual scheduling: the limiter keeps NEXT, the time at which every
 * byte dispatched so far has been paid for at SPEED bytes per second.  A
 * job asks ratelimit_delay() before a chunk (sleep that long, 0 = go),
 * then reports the bytes the chunk moved with ratelimit_account(), giving
 * the time the chunk was dispatched, so the chunk's own I/O time counts as
 * time paid.  NEXT never lags the clock by more than RATELIMIT_SLACK_NS:
 * a late wake-up or a short I/O stall (page-cache writeback) is made
 * good, and an idle job builds no burst beyond it (100 ms: at most 1 % of
 * a 10 s window, the accuracy the limiter promises).  The time per
 * byte is computed exactly (the nanosecond remainder is carried), so a job
 * that always has work moves SPEED bytes per second to within one chunk.
 *
 * Time is passed in by the caller (clock_now_ns() in real use), so
 * the unit test drives the limiter with a fake clock.  Not thread-safe:
 * the job framework guards it with the job lock.
 */
#ifndef STRATA_RATELIMIT_H
#define STRATA_RATELIMIT_H

#include <stdint.h>

/* How far NEXT may fall behind the clock: credit for oversleeping and
 * stalls. */
#define RATELIMIT_SLACK_NS 100000000ull /* 100 ms */

struct ratelimit {
  uint64_t speed; /* bytes per second; 0 = unlimited */
  uint64_t next;  /* ns: when the bytes dispatched so far are paid for */
  uint64_t rem;   /* remainder of the last division, in 1/speed ns */
};

void ratelimit_init (struct ratelimit *rl, uint64_t speed, uint64_t now);
/* Change the rate at NOW.  The debt still to be slept is rescaled to the
 * new rate (0, unlimited, cancels it), so a job sleeping on it can
 * recompute its delay at once. */
void ratelimit_set_speed (struct ratelimit *rl, uint64_t speed, uint64_t now);
/* Nanoseconds to wait at NOW before dispatching more (0 = go now). */
uint64_t ratelimit_delay (const struct ratelimit *rl, uint64_t now);
/* BYTES were dispatched at time START. */
void ratelimit_account (struct ratelimit *rl, uint64_t bytes, uint64_t start);

#endif
