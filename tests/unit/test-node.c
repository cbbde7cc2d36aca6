/* Unit tests of the node core with the file and raw drivers
 * (src/block/node.c, api.c, src/drivers/file.c, raw.c). */
#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block/node.h"
#include "test.h"

static off_t
file_size (const char *path)
{
  struct stat st;
  CHECK (stat (path, &st) == 0);
  return st.st_size;
}

static void
read_file_at (const char *path, off_t off, void *buf, size_t len)
{
  int fd = open (path, O_RDONLY);
  CHECK (fd >= 0 && pread (fd, buf, len, off) == (ssize_t) len);
  close (fd);
}

static bool
all_bytes (const uint8_t *p, size_t len, uint8_t v)
{
  for (size_t i = 0; i < len; i++)
    if (p[i] != v)
      return false;
  return true;
}

static void
test_raw_roundtrip_and_file_bytes (void)
{
  char *img = test_make_image ("rt.raw", 1 << 20);
  strata_node *n = strata_open (img, "raw", NULL, STRATA_OPEN_RDWR, NULL);
  uint8_t buf[3000], back[3000];

  CHECK (n && strata_length (n) == 1 << 20);
  memset (buf, 0x5a, sizeof buf);
  CHECK (strata_pwrite (n, buf, sizeof buf, 12345, 0) == 0);
  CHECK (strata_pread (n, back, sizeof back, 12345, 0) == 0);
  CHECK (memcmp (buf, back, sizeof buf) == 0);
  CHECK (strata_flush (n, 0) == 0);
  strata_close (n);
  read_file_at (img, 12345, back, sizeof back);
  CHECK (all_bytes (back, sizeof back, 0x5a));
  free (img);
}

static void
test_past_end_refused_naming_file (void)
{
  char *img = test_make_image ("end.raw", 4096);
  strata_node *n = strata_open (img, "raw", NULL, STRATA_OPEN_RDWR, NULL);
  uint8_t buf[512] = { 1 };

  CHECK (n);
  CHECK (strata_pread (n, buf, 512, 4096, 0) == -EIO);
  CHECK_STR_CONTAINS (strata_last_error_message (), img);
  CHECK_STR_CONTAINS (strata_last_error_message (), "past the end");
  CHECK (strata_pwrite (n, buf, 512, 3585, 0) == -EIO);
  CHECK (strata_pwrite_zeroes (n, UINT64_MAX - 10, 100, 0) == -EIO);
  CHECK (strata_pread (n, buf, 512, 3584, 0) == 0);
  strata_close (n);
  CHECK (file_size (img) == 4096);   /* nothing grew the file */
  free (img);
}

static void
test_raw_window (void)
{
  char *img = test_make_image ("win.raw", 65536);
  strata_node *n = strata_open (img, "raw", "offset=4096,size=8192",
                                STRATA_OPEN_RDWR, NULL);
  strata_error *err = NULL;
  uint8_t buf[512], back[512];

  CHECK (n && strata_length (n) == 8192);
  memset (buf, 0xee, sizeof buf);
  CHECK (strata_pwrite (n, buf, 512, 0, 0) == 0);
  CHECK (strata_pread (n, back, 512, 8192, 0) == -EIO);
  CHECK (!strata_truncate (n, 4096, 0, &err));
  CHECK_STR_CONTAINS (strata_error_message (err), "window");
  strata_error_free (err);
  strata_close (n);
  read_file_at (img, 4096, back, 512);
  CHECK (all_bytes (back, 512, 0xee));
  read_file_at (img, 0, back, 512);
  CHECK (all_bytes (back, 512, 0));
  free (img);
}

static void
test_raw_window_past_file_refused (void)
{
  char *img = test_make_image ("winbad.raw", 8192);
  strata_error *err = NULL;

  CHECK (!strata_open (img, "raw", "offset=4096,size=8192", 0, &err));
  CHECK_STR_CONTAINS (strata_error_message (err), "past the end");
  strata_error_free (err);
  err = NULL;
  CHECK (!strata_open (img, "raw", "offset=1M", 0, &err));
  strata_error_free (err);
  free (img);
}

static void
test_open_errors_are_named (void)
{
  char *img = test_make_image ("errs.raw", 4096), *missing;
  strata_error *err = NULL;

  CHECK (asprintf (&missing, "%s/nope.raw", test_tmpdir ()) > 0);
  CHECK (!strata_open (missing, "raw", NULL, 0, &err));
  CHECK (strata_error_errno (err) == ENOENT);
  CHECK_STR_CONTAINS (strata_error_message (err), missing);
  strata_error_free (err), err = NULL;

  CHECK (!strata_open (test_tmpdir (), "raw", NULL, 0, &err));
  CHECK_STR_CONTAINS (strata_error_message (err), "Is a directory");
  strata_error_free (err), err = NULL;

  CHECK (!strata_open (img, "vmdk-ish", NULL, 0, &err));
  CHECK_STR_CONTAINS (strata_error_message (err), "'vmdk-ish'");
  strata_error_free (err), err = NULL;

  CHECK (!strata_open (img, "raw", "colour=blue", 0, &err));
  CHECK_STR_CONTAINS (strata_error_message (err), "unknown option 'colour'");
  strata_error_free (err), err = NULL;

  CHECK (!strata_open (img, "raw", "file.cache.direct=perhaps", 0, &err));
  CHECK_STR_CONTAINS (strata_error_message (err), "cache.direct");
  strata_error_free (err);
  free (missing);
  free (img);
}

static void
test_probe_finds_raw (void)
{
  char *img = test_make_image ("probe.img", 4096);
  strata_node *n = strata_open (img, NULL, NULL, 0, NULL);
  struct strata_info info = { .size = sizeof info };

  CHECK (n);
  CHECK (strata_get_info (n, &info, 0, NULL));
  CHECK (strcmp (info.format, "raw") == 0);
  CHECK (info.virtual_size == 4096 && info.read_only);
  strata_close (n);
  free (img);
}

static void
test_read_only_refuses_writes (void)
{
  char *img = test_make_image ("ro.raw", 4096);
  strata_node *n = strata_open (img, "raw", NULL, 0, NULL);
  uint8_t buf[16] = { 0 };

  CHECK (n);
  CHECK (strata_pwrite (n, buf, 16, 0, 0) == -EPERM);
  CHECK_STR_CONTAINS (strata_last_error_message (), "read-only");
  CHECK (strata_pwrite_zeroes (n, 0, 16, 0) == -EPERM);
  CHECK (strata_pdiscard (n, 0, 16, 0) == -EPERM);
  CHECK (!strata_truncate (n, 8192, 0, NULL));
  strata_close (n);
  CHECK (file_size (img) == 4096);
  free (img);
}

static void
test_direct_unaligned_rmw (void)
{
  char *img = test_make_image ("direct.raw", 10000);  /* not block-aligned */
  strata_node *n = strata_open (img, "raw", "file.cache.direct=on",
                                STRATA_OPEN_RDWR, NULL);
  uint8_t buf[1000], back[1002];

  CHECK (n);
  memset (buf, 0x11, sizeof buf);
  CHECK (strata_pwrite (n, buf, 1000, 1, 0) == 0);
  memset (buf, 0x22, sizeof buf);
  CHECK (strata_pwrite (n, buf, 7, 9993, 0) == 0);  /* tail of the file */
  CHECK (strata_pread (n, back, 1002, 0, 0) == 0);
  CHECK (back[0] == 0 && all_bytes (back + 1, 1000, 0x11) && back[1001] == 0);
  strata_close (n);
  CHECK (file_size (img) == 10000);   /* RMW padding did not grow it */
  read_file_at (img, 9993, back, 7);
  CHECK (all_bytes (back, 7, 0x22));
  free (img);
}

static void
test_zeroes_and_block_status (void)
{
  char *img = test_make_image ("zero.raw", 1 << 20);
  strata_node *n = strata_open (img, "raw", NULL, STRATA_OPEN_RDWR, NULL);
  static uint8_t buf[65536];
  struct strata_extent e = { .size = sizeof e };

  CHECK (n);
  memset (buf, 0x77, sizeof buf);
  CHECK (strata_pwrite (n, buf, sizeof buf, 0, 0) == 0);
  CHECK (strata_pwrite (n, buf, sizeof buf, 131072, 0) == 0);
  CHECK (strata_block_status (n, 0, 1 << 20, &e, 0) == 0);
  CHECK ((e.flags & STRATA_BS_ALLOCATED) && (e.flags & STRATA_BS_DATA));
  CHECK (e.depth == 0 && e.length >= 65536 && e.length < (1 << 20));

  CHECK (strata_pwrite_zeroes (n, 131072, 65536, STRATA_REQ_MAY_UNMAP) == 0);
  CHECK (strata_pwrite_zeroes (n, 4096, 4096, 0) == 0);
  CHECK (strata_pread (n, buf, sizeof buf, 131072, 0) == 0);
  CHECK (all_bytes (buf, sizeof buf, 0));
  CHECK (strata_pread (n, buf, 8192, 0, 0) == 0);
  CHECK (all_bytes (buf, 4096, 0x77) && all_bytes (buf + 4096, 4096, 0));
  /* The unmapped range is a hole now: raw is allocated, but reads zero. */
  CHECK (strata_block_status (n, 131072, 65536, &e, 0) == 0);
  CHECK ((e.flags & STRATA_BS_ALLOCATED) && (e.flags & STRATA_BS_ZERO));
  CHECK (!(e.flags & STRATA_BS_DATA));
  strata_close (n);
  free (img);
}

struct worker {
  strata_node *n;
  int id;
  int errors;
};

static void *
worker_thread (void *arg)
{
  struct worker *w = arg;
  uint8_t buf[4096], back[4096];

  for (int round = 0; round < 50; round++) {
    uint64_t off = ((uint64_t) round * 8 + w->id) * 4096;
    memset (buf, w->id + round, sizeof buf);
    if (strata_pwrite (w->n, buf, sizeof buf, off, 0) < 0
        || strata_pread (w->n, back, sizeof back, off, 0) < 0
        || memcmp (buf, back, sizeof buf))
      w->errors++;
  }
  return NULL;
}

static void
test_concurrent_io_from_threads (void)
{
  char *img = test_make_image ("mt.raw", 50 * 8 * 4096);
  strata_node *n = strata_open (img, "raw", NULL, STRATA_OPEN_RDWR, NULL);
  pthread_t th[8];
  struct worker w[8];

  CHECK (n);
  for (int i = 0; i < 8; i++) {
    w[i] = (struct worker){ .n = n, .id = i };
    pthread_create (&th[i], NULL, worker_thread, &w[i]);
  }
  for (int i = 0; i < 8; i++) {
    pthread_join (th[i], NULL);
    CHECK (w[i].errors == 0);
  }
  CHECK (tracker_count (&n->tracker) == 0);
  strata_close (n);
  free (img);
}

static void *
flush_thread (void *arg)
{
  struct worker *w = arg;
  uint8_t buf[512];

  memset (buf, w->id, sizeof buf);
  for (int i = 0; i < 100; i++)
    if (strata_pwrite (w->n, buf, sizeof buf, w->id * 512, 0) < 0
        || strata_flush (w->n, 0) < 0)
      w->errors++;
  return NULL;
}

/* Flushes from many threads share fdatasync calls (group commit); none
 * may hang, fail or return before a sync that began after it was asked. */
static void
test_concurrent_flushes (void)
{
  char *img = test_make_image ("flush.raw", 8 * 512);
  strata_node *n = strata_open (img, "raw", NULL, STRATA_OPEN_RDWR, NULL);
  pthread_t th[8];
  struct worker w[8];
  uint8_t back[512];

  CHECK (n);
  for (int i = 0; i < 8; i++) {
    w[i] = (struct worker){ .n = n, .id = i };
    pthread_create (&th[i], NULL, flush_thread, &w[i]);
  }
  for (int i = 0; i < 8; i++) {
    pthread_join (th[i], NULL);
    CHECK (w[i].errors == 0);
  }
  strata_close (n);
  read_file_at (img, 7 * 512, back, 512);
  CHECK (all_bytes (back, 512, 7));
  free (img);
}

static void
test_truncate_grows_and_shrinks (void)
{
  char *img = test_make_image ("trunc.raw", 4096);
  strata_node *n = strata_open (img, "raw", NULL, STRATA_OPEN_RDWR, NULL);
  uint8_t buf[512];

  CHECK (n);
  CHECK (strata_truncate (n, 1 << 20, 0, NULL));
  CHECK (strata_length (n) == 1 << 20);
  CHECK (strata_pread (n, buf, 512, (1 << 20) - 512, 0) == 0);
  CHECK (all_bytes (buf, 512, 0));
  CHECK (strata_truncate (n, 2048, 0, NULL));
  CHECK (strata_length (n) == 2048);
  strata_close (n);
  CHECK (file_size (img) == 2048);
  free (img);
}

TESTS (T (test_raw_roundtrip_and_file_bytes),
       T (test_past_end_refused_naming_file), T (test_raw_window),
       T (test_raw_window_past_file_refused), T (test_open_errors_are_named),
       T (test_probe_finds_raw), T (test_read_only_refuses_writes),
       T (test_direct_unaligned_rmw), T (test_zeroes_and_block_status),
       T (test_concurrent_io_from_threads), T (test_concurrent_flushes),
       T (test_truncate_grows_and_shrinks))
