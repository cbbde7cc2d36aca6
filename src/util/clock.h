/* strata: the one monotonic clock reading.
 *
 * Everything that measures an interval (rate limits, progress, request
 * latency, timeouts) reads CLOCK_MONOTONIC through clock_now_ns(), so the
 * unit is the same everywhere and a wall-clock step (NTP, date -s) never
 * makes a job sleep for hours or a rate go negative.  Wall-clock time
 * (event timestamps, snapshot dates) is CLOCK_REALTIME and not here.
 */
#ifndef STRATA_UTIL_CLOCK_H
#define STRATA_UTIL_CLOCK_H

#include <stdint.h>
#include <time.h>

#define CLOCK_NS_PER_SEC UINT64_C (1000000000)
#define CLOCK_NS_PER_MS UINT64_C (1000000)

/* CLOCK_MONOTONIC in nanoseconds. */
static inline uint64_t
clock_now_ns (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * CLOCK_NS_PER_SEC + (uint64_t)ts.tv_nsec;
}

/* NS (a clock_now_ns() time) as the timespec pthread_cond_timedwait()
 * takes, for condition variables set to CLOCK_MONOTONIC. */
static inline struct timespec
clock_timespec (uint64_t ns)
{
  return (struct timespec){ .tv_sec = (time_t)(ns / CLOCK_NS_PER_SEC),
                            .tv_nsec = (long)(ns % CLOCK_NS_PER_SEC) };
}

#endif
