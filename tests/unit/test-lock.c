/* Unit tests of image locking in the file driver (src/drivers/file.c).
 *
 * OFD locks of two open file descriptions conflict even inside one
 * process, so two nodes opened here behave as two processes would.  The
 * byte layout is checked directly, because interoperating with QEMU
 * depends on it byte for byte.
 */
#include <fcntl.h>
#include <unistd.h>

#include "block/node.h"
#include "test.h"

/* Does some other open file description hold a lock on BYTE? */
static bool
byte_locked (const char *path, int byte)
{
  int fd = open (path, O_RDONLY);
  struct flock fl = {
    .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1,
  };
  bool r;

  CHECK (fd >= 0 && fcntl (fd, F_OFD_GETLK, &fl) == 0);
  r = fl.l_type != F_UNLCK;
  close (fd);
  return r;
}

static void
test_rw_lock_bytes_match_qemu (void)
{
  char *img = test_make_image ("bytes.raw", 65536);
  strata_node *n = strata_open (img, "raw", NULL, STRATA_OPEN_RDWR, NULL);

  CHECK (n);
  /* Held: consistent read (100), write (101), resize (103).  Not shared:
   * write (201) and resize (203).  Byte 0 is libvirt's. */
  CHECK (byte_locked (img, 100) && byte_locked (img, 101));
  CHECK (!byte_locked (img, 102) && byte_locked (img, 103));
  CHECK (!byte_locked (img, 200) && byte_locked (img, 201));
  CHECK (!byte_locked (img, 202) && byte_locked (img, 203));
  CHECK (!byte_locked (img, 0));
  strata_close (n);
  CHECK (!byte_locked (img, 100) && !byte_locked (img, 201));
  free (img);
}

static void
test_ro_lock_bytes (void)
{
  char *img = test_make_image ("ro.raw", 65536);
  strata_node *n = strata_open (img, "raw", NULL, 0, NULL);

  CHECK (n);
  CHECK (byte_locked (img, 100) && !byte_locked (img, 101));
  CHECK (byte_locked (img, 201) && byte_locked (img, 203));
  strata_close (n);
  free (img);
}

static void
test_second_writer_refused_naming_holder (void)
{
  char *img = test_make_image ("two.raw", 65536), pid[32];
  strata_node *a = strata_open (img, "raw", NULL, STRATA_OPEN_RDWR, NULL);
  strata_error *err = NULL;
  strata_node *b = strata_open (img, "raw", NULL, STRATA_OPEN_RDWR, &err);

  CHECK (a && !b);
  CHECK_STR_CONTAINS (strata_error_message (err), "Failed to get");
  CHECK_STR_CONTAINS (strata_error_message (err), "lock");
  CHECK_STR_CONTAINS (strata_error_message (err), img);
  snprintf (pid, sizeof pid, "process %d (", (int) getpid ());
  CHECK_STR_CONTAINS (strata_error_message (err), pid);
  strata_error_free (err);
  strata_close (a);
  b = strata_open (img, "raw", NULL, STRATA_OPEN_RDWR, NULL);
  CHECK (b);   /* free again once the holder closed */
  strata_close (b);
  free (img);
}

static void
test_reader_refused_while_writer_holds (void)
{
  char *img = test_make_image ("rw-ro.raw", 65536);
  strata_node *a = strata_open (img, "raw", NULL, STRATA_OPEN_RDWR, NULL);
  strata_error *err = NULL;
  strata_node *b = strata_open (img, "raw", NULL, 0, &err);

  CHECK (a && !b);
  CHECK_STR_CONTAINS (strata_error_message (err),
                      "Failed to get shared \"write\" lock");
  strata_error_free (err);
  strata_close (a);
  free (img);
}

static void
test_readers_share_and_force_share_ignores_locks (void)
{
  char *img = test_make_image ("share.raw", 65536);
  strata_node *a = strata_open (img, "raw", NULL, 0, NULL);
  strata_node *b = strata_open (img, "raw", NULL, 0, NULL);
  strata_node *w, *fs;

  CHECK (a && b);
  strata_close (b);
  strata_close (a);
  w = strata_open (img, "raw", NULL, STRATA_OPEN_RDWR, NULL);
  fs = strata_open (img, "raw", NULL, STRATA_OPEN_FORCE_SHARE, NULL);
  CHECK (w && fs);
  strata_close (fs);
  strata_close (w);
  free (img);
}

static void
test_force_share_with_write_refused (void)
{
  char *img = test_make_image ("fsrw.raw", 4096);
  strata_error *err = NULL;

  CHECK (!strata_open (img, "raw", NULL,
                       STRATA_OPEN_RDWR | STRATA_OPEN_FORCE_SHARE, &err));
  CHECK_STR_CONTAINS (strata_error_message (err), "force-share");
  strata_error_free (err);
  free (img);
}

static void
test_reopen_rw_checks_locks (void)
{
  char *img = test_make_image ("reopen.raw", 65536);
  strata_node *a = strata_open (img, "raw", NULL, 0, NULL);
  strata_node *b = strata_open (img, "raw", NULL, 0, NULL);
  strata_error *err = NULL;
  char buf[1] = { 'x' };

  CHECK (a && b);
  CHECK (strata_pwrite (a, buf, 1, 0, 0) == -EPERM);
  CHECK (!strata_reopen (a, true, 0, &err));   /* b needs it unchanged */
  CHECK_STR_CONTAINS (strata_error_message (err), "\"write\" lock");
  strata_error_free (err);
  CHECK (strata_pwrite (a, buf, 1, 0, 0) == -EPERM);
  strata_close (b);
  CHECK (strata_reopen (a, true, 0, NULL));
  CHECK (strata_pwrite (a, buf, 1, 0, 0) == 0);
  CHECK (byte_locked (img, 101));
  CHECK (!strata_open (img, "raw", NULL, 0, NULL));
  CHECK (strata_reopen (a, false, 0, NULL));
  CHECK (!byte_locked (img, 101));
  b = strata_open (img, "raw", NULL, 0, NULL);
  CHECK (b);
  strata_close (b);
  strata_close (a);
  free (img);
}

static void
test_locking_off (void)
{
  char *img = test_make_image ("off.raw", 4096);
  strata_node *a = strata_open (img, "raw", "file.locking=off",
                                STRATA_OPEN_RDWR, NULL);

  CHECK (a);
  CHECK (!byte_locked (img, 100) && !byte_locked (img, 201));
  strata_close (a);
  free (img);
}

TESTS (T (test_rw_lock_bytes_match_qemu), T (test_ro_lock_bytes),
       T (test_second_writer_refused_naming_holder),
       T (test_reader_refused_while_writer_holds),
       T (test_readers_share_and_force_share_ignores_locks),
       T (test_force_share_with_write_refused),
       T (test_reopen_rw_checks_locks), T (test_locking_off))
