/* Unit tests of the dirty bitmaps (src/block/dirty.c). */
#include <stdlib.h>
#include <string.h>

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

/* The registry: names unique, QEMU's refusals, writes mark recording
 * bitmaps only, busy ones are not removable, the node frees them. */
static void
test_registry (void)
{
  char *img = test_make_image ("reg.raw", 1 << 20);
  strata_node *n = strata_open (img, "raw", NULL, STRATA_OPEN_RDWR, NULL);
  struct dirty_bitmap *a, *b, *c, **l;
  strata_error *err = NULL;
  char buf[4096] = { 1 }, *longname = malloc (DIRTY_MAX_NAME + 2);
  size_t k;

  CHECK (n && longname);
  a = node_bitmap_add (n, "a", 65536, 0, NULL);
  b = node_bitmap_add (n, "b", 4096, DIRTY_DISABLED | DIRTY_PERSISTENT, NULL);
  CHECK (a && b && dirty_recording (a) && !dirty_recording (b));
  CHECK (!node_bitmap_add (n, "a", 65536, 0, &err));
  CHECK (strcmp (strata_error_message (err), "Bitmap already exists: a") == 0);
  strata_error_free (err);
  err = NULL;
  CHECK (!node_bitmap_add (n, "x", 1000, 0, &err));
  CHECK (strstr (strata_error_message (err), "power of 2"));
  strata_error_free (err);
  err = NULL;
  CHECK (!node_bitmap_add (n, "", 65536, 0, NULL));
  memset (longname, 'n', DIRTY_MAX_NAME + 1);
  longname[DIRTY_MAX_NAME + 1] = 0;
  CHECK (!node_bitmap_add (n, longname, 65536, 0, NULL));
  CHECK (strata_pwrite (n, buf, sizeof buf, 70000, 0) == 0);
  CHECK (strata_pwrite_zeroes (n, 300000, 1, 0) == 0);
  CHECK (dirty_count (a) == 2 * 65536 && dirty_count (b) == 0);
  dirty_set_flag (b, DIRTY_DISABLED, false);
  CHECK (strata_pdiscard (n, 4096, 4096, 0) == 0);
  CHECK (dirty_count (b) == 4096 && dirty_count (a) == 3 * 65536);
  CHECK ((l = node_bitmaps (n, &k)) && k == 2 && l[0] == a && l[1] == b);
  free (l);
  CHECK (node_bitmap_find (n, "b", NULL) == b);
  CHECK (!node_bitmap_find (n, "z", &err));
  CHECK (strcmp (strata_error_message (err), "Dirty bitmap 'z' not found")
         == 0);
  strata_error_free (err);
  dirty_busy_get (b);
  CHECK (!node_bitmap_remove (n, "b", NULL));
  dirty_busy_put (b);
  CHECK (node_bitmap_remove (n, "b", NULL)
         && !node_bitmap_find (n, "b", NULL));
  c = node_bitmap_add (n, "c", 512, DIRTY_INCONSISTENT, NULL);
  CHECK (strata_pwrite (n, buf, sizeof buf, 0, 0) == 0);
  CHECK (c && dirty_count (c) == 0);
  strata_close (n); /* frees a and c (ASan would see a leak) */
  free (longname);
  free (img);
}

/* Serialisation as qcow2 stores it, merge, resize. */
static void
test_serialize_merge_resize (void)
{
  struct dirty_bitmap *a = dirty_new (100 * 512, 512);
  struct dirty_bitmap *b = dirty_new (100 * 512, 4096);
  uint8_t out[16], in[16] = { 0 };

  dirty_set (a, 0, 512);        /* bit 0 */
  dirty_set (a, 9 * 512, 512);  /* bit 9: byte 1 bit 1 */
  dirty_set (a, 99 * 512, 512); /* bit 99: byte 12 bit 3 */
  CHECK (dirty_serialized_size (a) == 13);
  dirty_serialize (a, 0, sizeof out, out);
  CHECK (out[0] == 1 && out[1] == 2 && out[12] == 8 && out[13] == 0);
  in[2] = 0x81;  /* bits 16 and 23 */
  in[12] = 0xff; /* only bits 96..99 exist */
  dirty_deserialize_or (a, 0, sizeof in, in);
  CHECK (dirty_count (a) == 3 * 512 + 2 * 512 + 3 * 512);
  dirty_clear_all (a);
  dirty_set (a, 0, 512);
  dirty_set (a, 9 * 512, 512);
  dirty_set (a, 99 * 512, 512);
  dirty_set (b, 0, 1);
  CHECK (dirty_merge (a, b, NULL) && dirty_count (a) == 8 * 512 + 2 * 512);
  CHECK (dirty_resize (a, 200 * 512) && dirty_count (a) == 10 * 512);
  dirty_set (a, 150 * 512, 1);
  CHECK (dirty_resize (a, 9 * 512) && dirty_count (a) == 8 * 512);
  CHECK (!dirty_merge (a, b, NULL));
  dirty_free (a);
  dirty_free (b);
}

TESTS (T (test_set_clear_count), T (test_runs_are_bounded),
       T (test_bad_granularity), T (test_registry),
       T (test_serialize_merge_resize))
