/* strata: overflow-checked arithmetic for sizes and offsets that come from
 * untrusted input (image headers, the network, the command line).  Each
 * returns true when the result fits and stores it in *r. */
#ifndef STRATA_CHECKED_H
#define STRATA_CHECKED_H

#include <stdbool.h>
#include <stdint.h>

static inline bool
checked_add_u64 (uint64_t a, uint64_t b, uint64_t *r)
{
  return !__builtin_add_overflow (a, b, r);
}

static inline bool
checked_mul_u64 (uint64_t a, uint64_t b, uint64_t *r)
{
  return !__builtin_mul_overflow (a, b, r);
}

/* True when [off, off+len) lies inside [0, size). */
static inline bool
range_inside (uint64_t off, uint64_t len, uint64_t size)
{
  return off <= size && len <= size - off;
}

static inline bool
is_power_of_2 (uint64_t v)
{
  return v && !(v & (v - 1));
}

#define ROUND_DOWN(v, a) ((v) / (a) * (a))
#define ROUND_UP(v, a) (((v) + (a) - 1) / (a) * (a))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
