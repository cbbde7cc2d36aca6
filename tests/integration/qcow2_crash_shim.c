/* LD_PRELOAD shim for test_qcow2_crash.py: simulate a power failure.
 *
 * Writes and flushes of the file named by $CRASH_FILE are counted as
 * events.  At event number $CRASH_AT (1-based) the process stops before
 * the write or flush; with
 * $CRASH_LOSE=1 it first undoes every write since the last fdatasync/fsync
 * of that file (they were only in the page cache), restoring the old bytes
 * and size from an undo log; with $CRASH_LOSE=2 it undoes a random subset
 * of them and with 3 all but the latest, as a disk that reorders its
 * cache may.  $CRASH_COUNT names a file that receives the
 * number of events when the process exits normally, then the numbers of
 * the writes to the first 512 bytes (header updates), so the
 * test can aim at the steps around them.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

struct undo { off_t off; size_t len; char *old; off_t old_size; };
static struct undo *log_v;
static size_t log_n, log_cap;
static long writes;
static long header_writes[64];
static int nheader;

static int
is_target (int fd)
{
  char link[64], path[PATH_MAX];
  const char *want = getenv ("CRASH_FILE");
  ssize_t n;

  if (!want)
    return 0;
  snprintf (link, sizeof link, "/proc/self/fd/%d", fd);
  n = readlink (link, path, sizeof path - 1);
  if (n < 0)
    return 0;
  path[n] = 0;
  return strcmp (path, want) == 0;
}

/* MODE 1: lose every unflushed write.  MODE 2: lose a random subset
 * (seeded by the crash point).  MODE 3: keep only the latest.  Modes 2 and
 * 3 keep any write that overlaps a later kept one; they model a disk that
 * holds a later write without an earlier one. */
static void
rollback (int fd, int mode, unsigned seed)
{
  ssize_t (*real) (int, const void *, size_t, off_t)
      = dlsym (RTLD_NEXT, "pwrite64");
  char *kept = calloc (log_n + 1, 1);

  srand (seed);
  for (size_t i = log_n; i-- > 0;) {
    struct undo *u = &log_v[i];
    int lose = mode == 1 || (mode == 2 && rand () % 2)
               || (mode == 3 && i + 1 < log_n);
    for (size_t j = i + 1; lose && mode >= 2 && j < log_n; j++)
      if (kept[j] && log_v[j].off < u->off + (off_t) u->len
          && u->off < log_v[j].off + (off_t) log_v[j].len)
        lose = 0;
    kept[i] = !lose;
    if (!lose)
      continue;
    real (fd, u->old, u->len, u->off);
    if (mode == 1)
      ftruncate (fd, u->old_size);
  }
  free (kept);
}

/* Count one event (a write or a flush) and crash when it is the one. */
static void
event (int fd)
{
  const char *at = getenv ("CRASH_AT");

  writes++;
  if (at && atol (at) == writes) {
    if (getenv ("CRASH_LOSE") && atoi (getenv ("CRASH_LOSE")))
      rollback (fd, atoi (getenv ("CRASH_LOSE")), (unsigned) writes);
    _exit (99);
  }
}

static void
before_write (int fd, off_t off, size_t len)
{
  struct stat st;
  struct undo u;

  if (off < 512 && nheader < 64)
    header_writes[nheader++] = writes + 1;
  event (fd);
  fstat (fd, &st);
  u = (struct undo){ off, len, calloc (1, len ? len : 1), st.st_size };
  if (off < st.st_size)
    pread (fd, u.old, len, off);
  if (log_n == log_cap) {
    log_cap = log_cap ? 2 * log_cap : 64;
    log_v = realloc (log_v, log_cap * sizeof *log_v);
  }
  log_v[log_n++] = u;
}

static void
synced (int fd)
{
  if (!is_target (fd))
    return;
  for (size_t i = 0; i < log_n; i++)
    free (log_v[i].old);
  log_n = 0;
}

static size_t
iov_len (const struct iovec *iov, int n)
{
  size_t l = 0;
  for (int i = 0; i < n; i++)
    l += iov[i].iov_len;
  return l;
}

ssize_t
pwritev2 (int fd, const struct iovec *iov, int n, off_t off, int flags)
{
  ssize_t (*real) (int, const struct iovec *, int, off_t, int)
      = dlsym (RTLD_NEXT, "pwritev2");
  if (is_target (fd))
    before_write (fd, off, iov_len (iov, n));
  return real (fd, iov, n, off, flags);
}

ssize_t
pwritev64v2 (int fd, const struct iovec *iov, int n, off_t off, int flags)
{
  return pwritev2 (fd, iov, n, off, flags);
}

ssize_t
pwritev (int fd, const struct iovec *iov, int n, off_t off)
{
  ssize_t (*real) (int, const struct iovec *, int, off_t)
      = dlsym (RTLD_NEXT, "pwritev");
  if (is_target (fd))
    before_write (fd, off, iov_len (iov, n));
  return real (fd, iov, n, off);
}

ssize_t
pwrite64 (int fd, const void *buf, size_t len, off_t off)
{
  ssize_t (*real) (int, const void *, size_t, off_t)
      = dlsym (RTLD_NEXT, "pwrite64");
  if (is_target (fd))
    before_write (fd, off, len);
  return real (fd, buf, len, off);
}

ssize_t
pwrite (int fd, const void *buf, size_t len, off_t off)
{
  return pwrite64 (fd, buf, len, off);
}

int
fdatasync (int fd)
{
  int (*real) (int) = dlsym (RTLD_NEXT, "fdatasync");
  int r;

  if (is_target (fd))
    event (fd);  /* a crash during the flush may lose any of its writes */
  r = real (fd);
  if (r == 0)
    synced (fd);
  return r;
}

int
fsync (int fd)
{
  int (*real) (int) = dlsym (RTLD_NEXT, "fsync");
  int r;

  if (is_target (fd))
    event (fd);  /* a crash during the flush may lose any of its writes */
  r = real (fd);
  if (r == 0)
    synced (fd);
  return r;
}

__attribute__ ((destructor)) static void
report (void)
{
  const char *out = getenv ("CRASH_COUNT");
  FILE *f;

  if (out && (f = fopen (out, "w"))) {
    fprintf (f, "%ld\n", writes);
    for (int i = 0; i < nheader; i++)
      fprintf (f, "%ld\n", header_writes[i]);
    fclose (f);
  }
}
