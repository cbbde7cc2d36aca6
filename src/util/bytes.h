/* strata: big-endian loads and stores for on-disk and on-wire formats
 * (qcow2 headers and tables, NBD messages).  Byte by byte, so they work
 * at any alignment. */
#ifndef STRATA_BYTES_H
#define STRATA_BYTES_H

#include <stdint.h>

static inline uint64_t
be64_load (const uint8_t *p)
{
  uint64_t v = 0;
  for (int i = 0; i < 8; i++)
    v = v << 8 | p[i];
  return v;
}
static inline uint32_t
be32_load (const uint8_t *p)
{
  return (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16 | (uint32_t) p[2] << 8
         | p[3];
}
static inline uint16_t
be16_load (const uint8_t *p)
{
  return (uint16_t) (p[0] << 8 | p[1]);
}
static inline void
be64_store (uint8_t *p, uint64_t v)
{
  for (int i = 7; i >= 0; i--, v >>= 8)
    p[i] = v & 0xff;
}
static inline void
be32_store (uint8_t *p, uint32_t v)
{
  for (int i = 3; i >= 0; i--, v >>= 8)
    p[i] = v & 0xff;
}

static inline void
be16_store (uint8_t *p, uint16_t v)
{
  p[0] = v >> 8;
  p[1] = v & 0xff;
}

#endif
