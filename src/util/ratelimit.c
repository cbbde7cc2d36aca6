/* strata: rate limiter.  Placeholder until it lands. */
#include <stddef.h>
