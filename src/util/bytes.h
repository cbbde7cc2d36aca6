/* strata: big-endian loads and stores for on-disk and on-wire formats
 * (qcow2 headers and tables, NBD messages).  Through memcpy, so they work
 * at any alignment and compile to one load or store and a byte swap (a
 * loop over the bytes does not, and walking L2 tables pays for it). */
#ifndef STRATA_BYTES_H
#define STRATA_BYTES_H

#include <stdint.h>
#include <string.h>

#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define bytes_be64(v) (v)
#define bytes_be32(v) (v)
#else
#define bytes_be64(v) __builtin_bswap64 (v)
#define bytes_be32(v) __builtin_bswap32 (v)
#endif

static inline uint64_t
be64_load (const uint8_t *p)
{
  uint64_t v;
  memcpy (&v, p, sizeof v);
  return bytes_be64 (v);
}
static inline uint32_t
be32_load (const uint8_t *p)
{
  uint32_t v;
  memcpy (&v, p, sizeof v);
  return bytes_be32 (v);
}
static inline uint16_t
be16_load (const uint8_t *p)
{
  return (uint16_t)(p[0] << 8 | p[1]);
}
static inline void
be64_store (uint8_t *p, uint64_t v)
{
  v = bytes_be64 (v);
  memcpy (p, &v, sizeof v);
}
static inline void
be32_store (uint8_t *p, uint32_t v)
{
  v = bytes_be32 (v);
  memcpy (p, &v, sizeof v);
}

static inline void
be16_store (uint8_t *p, uint16_t v)
{
  p[0] = v >> 8;
  p[1] = v & 0xff;
}

#endif
