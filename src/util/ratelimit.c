/* strata: byte-rate limiter; the scheme is described in ratelimit.h. */
#include <time.h>

#include "util/ratelimit.h"

#define NS_PER_SEC 1000000000ull

void
ratelimit_init (struct ratelimit *rl, uint64_t speed, uint64_t now)
{
  rl->speed = speed;
  rl->next = now;
  rl->rem = 0;
}

void
ratelimit_set_speed (struct ratelimit *rl, uint64_t speed, uint64_t now)
{
  uint64_t debt = rl->next > now ? rl->next - now : 0;

  /* Bytes still unpaid = debt * old speed; at the new speed they take
   * debt * old / new.  Without an old or a new rate there is no debt. */
  if (rl->speed == 0 || speed == 0)
    debt = 0;
  else
    debt = (uint64_t)((unsigned __int128)debt * rl->speed / speed);
  rl->speed = speed;
  rl->next = now + debt;
  rl->rem = 0;
}

uint64_t
ratelimit_delay (const struct ratelimit *rl, uint64_t now)
{
  if (rl->speed == 0 || rl->next <= now)
    return 0;
  return rl->next - now;
}

void
ratelimit_account (struct ratelimit *rl, uint64_t bytes, uint64_t start)
{
  unsigned __int128 t;

  if (rl->speed == 0)
    return;
  if (rl->next + RATELIMIT_SLACK_NS < start) {
    rl->next = start - RATELIMIT_SLACK_NS;
    rl->rem = 0;
  }
  t = (unsigned __int128)bytes * NS_PER_SEC + rl->rem;
  rl->next += (uint64_t)(t / rl->speed);
  rl->rem = (uint64_t)(t % rl->speed);
}
