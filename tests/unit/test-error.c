/* Unit tests of error propagation (src/util/error.c). */
#include <errno.h>
#include <pthread.h>

#include "test.h"
#include "util/error.h"

static bool
fails_deep (strata_error **errp)
{
  error_set (errp, ENOENT, "%s: L1 table offset 0x%x is not aligned",
             "img.qcow2", 0x1234);
  return false;
}

static bool
fails_middle (strata_error **errp)
{
  strata_error *local = NULL;

  if (!fails_deep (&local)) {
    error_propagate (errp, local);
    error_prepend (errp, "opening backing file");
    return false;
  }
  return true;
}

static void
test_set_carries_errno_and_message (void)
{
  strata_error *err = NULL;

  CHECK (!fails_deep (&err));
  CHECK (strata_error_errno (err) == ENOENT);
  CHECK (strcmp (strata_error_message (err),
                 "img.qcow2: L1 table offset 0x1234 is not aligned") == 0);
  strata_error_free (err);
}

static void
test_propagate_and_prepend (void)
{
  strata_error *err = NULL;

  CHECK (!fails_middle (&err));
  CHECK (strata_error_errno (err) == ENOENT);
  CHECK (strcmp (strata_error_message (err),
                 "opening backing file: img.qcow2: L1 table offset 0x1234 "
                 "is not aligned") == 0);
  strata_error_free (err);
}

static void
test_null_errp_is_allowed (void)
{
  CHECK (!fails_middle (NULL));
  error_prepend (NULL, "nothing");
}

static void
test_errno_suffix (void)
{
  strata_error *err = NULL;

  error_set_errno (&err, EACCES, "Could not open '%s'", "x");
  CHECK (strcmp (strata_error_message (err),
                 "Could not open 'x': Permission denied") == 0);
  CHECK (strata_error_errno (err) == EACCES);
  strata_error_free (err);
}

static void
test_first_error_wins (void)
{
  strata_error *err = NULL, *second = NULL;

  error_set (&err, EIO, "first");
  error_set (&second, EINVAL, "second");
  error_propagate (&err, second);   /* freed, not leaked, not replacing */
  CHECK (strcmp (strata_error_message (err), "first") == 0);
  strata_error_free (err);
}

static void
test_io_error_detail_is_per_thread (void)
{
  CHECK (io_error (EIO, "a.img: read at %d failed", 7) == -EIO);
  CHECK (strcmp (strata_last_error_message (), "a.img: read at 7 failed")
         == 0);
  io_error_clear ();
  CHECK (strata_last_error_message () == NULL);
}

static void *
fail_in_thread (void *arg)
{
  (void) arg;
  io_error (EIO, "worker %d failed", 3);
  return (void *) strata_last_error_message ();
}

/* Another thread's failure is not visible here; under LeakSanitizer this
 * also proves a thread's message is freed when the thread exits. */
static void
test_io_error_of_other_thread (void)
{
  pthread_t th;
  void *theirs;

  io_error_clear ();
  pthread_create (&th, NULL, fail_in_thread, NULL);
  pthread_join (th, &theirs);
  CHECK (theirs != NULL);
  CHECK (strata_last_error_message () == NULL);
}

static void
test_nonpositive_errno_becomes_eio (void)
{
  strata_error *err = NULL;

  error_set (&err, 0, "no errno given");
  CHECK (strata_error_errno (err) == EIO);
  strata_error_free (err);
}

TESTS (T (test_set_carries_errno_and_message), T (test_propagate_and_prepend),
       T (test_null_errp_is_allowed), T (test_errno_suffix),
       T (test_first_error_wins), T (test_io_error_detail_is_per_thread),
       T (test_io_error_of_other_thread),
       T (test_nonpositive_errno_becomes_eio))
