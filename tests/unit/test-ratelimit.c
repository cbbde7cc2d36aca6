/* Unit tests for the byte-rate limiter (src/util/ratelimit.c), driven by
 * a fake clock: a simulated job copies chunks that take COPY_NS each and
 * sleeps for what ratelimit_delay() says, oversleeping by OVERSLEEP_NS. */
#include <stdint.h>

#include "test.h"
#include "util/ratelimit.h"

#define MS 1000000ull
#define SEC 1000000000ull
#define KIB 1024ull
#define MIB (1024ull * 1024)

struct sim {
  struct ratelimit rl;
  uint64_t now, bytes, chunks;
  uint64_t chunk, copy_ns, oversleep_ns;
  uint64_t stall_every, stall_ns; /* every Nth chunk takes longer */
};

/* Run the job until the fake clock reaches UNTIL. */
static void
sim_run (struct sim *s, uint64_t until)
{
  while (s->now < until) {
    uint64_t d = ratelimit_delay (&s->rl, s->now);
    if (d > 0) {
      s->now += d + s->oversleep_ns;
      continue;
    }
    uint64_t start = s->now;
    s->now += s->copy_ns;
    if (s->stall_every && ++s->chunks % s->stall_every == 0)
      s->now += s->stall_ns;
    s->bytes += s->chunk;
    ratelimit_account (&s->rl, s->chunk, start);
  }
}

static double
rel_error (double got, double want)
{
  double e = (got - want) / want;
  return e < 0 ? -e : e;
}

/* Over every 10 s window after the first second, within 1 %. */
static void
check_windows (uint64_t speed, uint64_t chunk, uint64_t copy_ns,
               uint64_t oversleep_ns)
{
  struct sim s
      = { .chunk = chunk, .copy_ns = copy_ns, .oversleep_ns = oversleep_ns };

  ratelimit_init (&s.rl, speed, 0);
  sim_run (&s, 1 * SEC);
  for (int w = 0; w < 3; w++) {
    uint64_t b0 = s.bytes, t0 = s.now;
    sim_run (&s, t0 + 10 * SEC);
    double rate = (double)(s.bytes - b0) * SEC / (double)(s.now - t0);
    CHECK (rel_error (rate, (double)speed) < 0.01);
  }
}

static void
test_rate_accuracy (void)
{
  check_windows (100 * MIB, 512 * KIB, 1 * MS, 0);
  check_windows (100 * MIB, 512 * KIB, 2 * MS, 80000); /* late wake-ups */
  check_windows (50 * MIB, 64 * KIB, 100000, 60000);
  check_windows (1 * MIB, 64 * KIB, 1 * MS, 100000);
  check_windows (3333333, 512 * KIB, 1 * MS, 0); /* not a divisor of 1e9 */
}

/* Writeback stalls of 90 ms every 50 chunks (each shorter than the
 * slack) cost nothing over a window. */
static void
test_stalls_are_made_good (void)
{
  struct sim s = { .chunk = 512 * KIB,
                   .copy_ns = 1 * MS,
                   .oversleep_ns = 50000,
                   .stall_every = 50,
                   .stall_ns = 90 * MS };

  ratelimit_init (&s.rl, 100 * MIB, 0);
  sim_run (&s, 1 * SEC);
  uint64_t b0 = s.bytes, t0 = s.now;
  sim_run (&s, t0 + 10 * SEC);
  CHECK (rel_error ((double)(s.bytes - b0) * SEC / (double)(s.now - t0),
                    100.0 * MIB)
         < 0.01);
}

static void
test_unlimited (void)
{
  struct ratelimit rl;

  ratelimit_init (&rl, 0, 5 * SEC);
  ratelimit_account (&rl, 1ull << 40, 5 * SEC);
  CHECK (ratelimit_delay (&rl, 5 * SEC) == 0);
}

static void
test_exact_delay (void)
{
  struct ratelimit rl;

  ratelimit_init (&rl, 1 * MIB, 0);
  ratelimit_account (&rl, 512 * KIB, 0);
  CHECK (ratelimit_delay (&rl, 0) == SEC / 2);
  CHECK (ratelimit_delay (&rl, 100 * MS) == 400 * MS);
  CHECK (ratelimit_delay (&rl, SEC) == 0);
}

/* A speed change while the job sleeps rescales what is left to sleep. */
static void
test_set_speed_rescales_debt (void)
{
  struct ratelimit rl;

  ratelimit_init (&rl, 1 * MIB, 0);
  ratelimit_account (&rl, 1 * MIB, 0);         /* debt: 1 s */
  ratelimit_set_speed (&rl, 2 * MIB, SEC / 2); /* 0.5 MiB left: 0.25 s */
  CHECK (ratelimit_delay (&rl, SEC / 2) == SEC / 4);
  ratelimit_set_speed (&rl, 0, SEC / 2); /* unlimited: go now */
  CHECK (ratelimit_delay (&rl, SEC / 2) == 0);
  ratelimit_set_speed (&rl, 1 * MIB, SEC); /* limited again: no debt */
  CHECK (ratelimit_delay (&rl, SEC) == 0);
  ratelimit_account (&rl, 256 * KIB, SEC);
  CHECK (ratelimit_delay (&rl, SEC) == SEC / 4);
}

/* The rate after a change holds over the next window. */
static void
test_set_speed_rate (void)
{
  struct sim s
      = { .chunk = 512 * KIB, .copy_ns = 1 * MS, .oversleep_ns = 50000 };

  ratelimit_init (&s.rl, 100 * MIB, 0);
  sim_run (&s, 3 * SEC);
  ratelimit_set_speed (&s.rl, 50 * MIB, s.now);
  sim_run (&s, s.now + SEC);
  uint64_t b0 = s.bytes, t0 = s.now;
  sim_run (&s, t0 + 10 * SEC);
  CHECK (rel_error ((double)(s.bytes - b0) * SEC / (double)(s.now - t0),
                    50.0 * MIB)
         < 0.01);
}

/* An idle job (or one whose I/O is slower than the rate) builds up no
 * more than the slack as burst credit. */
static void
test_idle_builds_no_burst (void)
{
  struct ratelimit rl;

  ratelimit_init (&rl, 1 * MIB, 0);
  ratelimit_account (&rl, 64 * KIB, 0);
  /* Idle for 100 s, then two chunks back to back. */
  ratelimit_account (&rl, 1 * MIB, 100 * SEC);
  CHECK (ratelimit_delay (&rl, 100 * SEC) == SEC - RATELIMIT_SLACK_NS);
}

TESTS (T (test_rate_accuracy), T (test_stalls_are_made_good),
       T (test_unlimited), T (test_exact_delay),
       T (test_set_speed_rescales_debt), T (test_set_speed_rate),
       T (test_idle_builds_no_burst))
