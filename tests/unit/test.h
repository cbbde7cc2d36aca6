/* strata: a minimal unit-test harness.
 *
 * A test file defines `static void test_x (void)` functions and lists them
 * in TESTS(...).  CHECK fails the current test and continues with the next;
 * the program exits 1 when any test failed, so meson counts the file as
 * failed and the log names the failing test and line.
 */
#ifndef STRATA_TEST_H
#define STRATA_TEST_H

#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static jmp_buf test_jmp;
static const char *test_current;

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      fprintf (stderr, "FAIL %s: %s:%d: %s\n", test_current, __FILE__,       \
               __LINE__, #cond);                                             \
      longjmp (test_jmp, 1);                                                 \
    }                                                                        \
  } while (0)

#define CHECK_STR_CONTAINS(hay, needle)                                      \
  do {                                                                       \
    const char *h_ = (hay);                                                  \
    if (!h_ || !strstr (h_, (needle))) {                                     \
      fprintf (stderr, "FAIL %s: %s:%d: \"%s\" does not contain \"%s\"\n",   \
               test_current, __FILE__, __LINE__, h_ ? h_ : "(null)",         \
               (needle));                                                    \
      longjmp (test_jmp, 1);                                                 \
    }                                                                        \
  } while (0)

struct test_case {
  const char *name;
  void (*fn) (void);
};

#define T(fn) { #fn, fn }
#define TESTS(...)                                                           \
  int main (void)                                                            \
  {                                                                          \
    static const struct test_case cases[] = { __VA_ARGS__ };                 \
    volatile int failed = 0;                                                 \
    int n = sizeof cases / sizeof cases[0];                                  \
    for (volatile int i = 0; i < n; i++) {                                   \
      test_current = cases[i].name;                                          \
      if (setjmp (test_jmp) == 0) {                                          \
        cases[i].fn ();                                                      \
        printf ("ok %s\n", cases[i].name);                                   \
      }                                                                      \
      else                                                                   \
        failed++;                                                            \
    }                                                                        \
    printf ("%d passed, %d failed\n", n - failed, failed);                   \
    return failed != 0;                                                      \
  }

/* A fresh temporary directory for this test program; removed at exit. */
static char test_dir[256];
__attribute__ ((unused)) static void
test_dir_cleanup (void)
{
  char cmd[300];
  snprintf (cmd, sizeof cmd, "rm -rf '%s'", test_dir);
  if (system (cmd)) {}
}
__attribute__ ((unused)) static const char *
test_tmpdir (void)
{
  if (!test_dir[0]) {
    const char *base = getenv ("TMPDIR");
    snprintf (test_dir, sizeof test_dir, "%s/strata-unit-XXXXXX",
              base ? base : "/tmp");
    if (!mkdtemp (test_dir))
      abort ();
    atexit (test_dir_cleanup);
  }
  return test_dir;
}

/* A file of SIZE zero bytes named NAME in the test directory; returns
 * its path (caller frees). */
__attribute__ ((unused)) static char *
test_make_image (const char *name, off_t size)
{
  char *path;
  int fd;

  if (asprintf (&path, "%s/%s", test_tmpdir (), name) < 0)
    abort ();
  fd = open (path, O_CREAT | O_TRUNC | O_RDWR, 0644);
  CHECK (fd >= 0 && ftruncate (fd, size) == 0);
  close (fd);
  return path;
}

#endif
