/* Unit tests of the dirty bitmaps (src/block/dirty.c). */
#include "block/dirty.h"
#include "test.h"

#define K 1024ull

static void
test_set_clear_count (void)
{
  struct dirty_bitmap *bm = dirty_new (1000 * K, 64 * K); /* 16 pieces */
  uint64_t off, len;

  CHECK (bm && dirty_granularity (bm) == 64 * K);
  CHECK (dirty_count (bm) == 0 && !dirty_next (bm, 0, ~0ull, &off, &len));
  dirty_set (bm, 65 * K, 1);      /* piece 1 */
  dirty_set (bm, 127 * K, 2 * K); /* pieces 1 and 2 */
  CHECK (dirty_count (bm) == 128 * K);
  CHECK (dirty_next (bm, 0, ~0ull, &off, &len));
  CHECK (off == 64 * K && len == 128 * K);
  dirty_clear (bm, 64 * K, 64 * K);
  CHECK (dirty_next (bm, 0, ~0ull, &off, &len));
  CHECK (off == 128 * K && len == 64 * K);
  /* The last piece is short: 1000 K is 15 pieces and 40 K. */
  dirty_set (bm, 999 * K, 10 * K); /* cut at the end */
  CHECK (dirty_count (bm) == 64 * K + 40 * K);
  CHECK (dirty_next (bm, 200 * K, ~0ull, &off, &len));
  CHECK (off == 960 * K && len == 40 * K);
  /* From past the last dirty run: wraps to the start. */
  dirty_clear (bm, 960 * K, 40 * K);
  CHECK (dirty_next (bm, 500 * K, ~0ull, &off, &len) && off == 128 * K);
  dirty_set (bm, 5000 * K, 64 * K); /* past the end: nothing */
  dirty_set (bm, 0, 0);
  CHECK (dirty_count (bm) == 64 * K);
  dirty_free (bm);
}

static void
test_runs_are_bounded (void)
{
  struct dirty_bitmap *bm = dirty_new (64 << 20, 4096);
  uint64_t off, len, total = 0;

  dirty_set (bm, 0, 64 << 20);
  CHECK (dirty_count (bm) == 64 << 20);
  CHECK (dirty_next (bm, 0, 1 << 20, &off, &len));
  CHECK (off == 0 && len == 1 << 20);
  CHECK (dirty_next (bm, 0, 100, &off, &len) && len == 4096);
  while (dirty_next (bm, 0, 3 << 20, &off, &len)) {
    CHECK (len <= 3 << 20);
    dirty_clear (bm, off, len);
    total += len;
  }
  CHECK (total == 64 << 20 && dirty_count (bm) == 0);
  /* Bits across word boundaries. */
  dirty_set (bm, 63 * 4096, 3 * 4096);
  CHECK (dirty_next (bm, 0, ~0ull, &off, &len));
  CHECK (off == 63 * 4096 && len == 3 * 4096);
  dirty_free (bm);
}

static void
test_bad_granularity (void)
{
  CHECK (dirty_new (1 << 20, 256) == NULL);
  CHECK (dirty_new (1 << 20, 3 * 4096) == NULL);
}

TESTS (T (test_set_clear_count), T (test_runs_are_bounded),
       T (test_bad_granularity))
