/* strata: the file protocol driver.
 *
 * Reads and writes a regular file or a block device with pread/pwrite.
 *
 * cache.direct=on opens with O_DIRECT.  Requests whose offset, length or
 * buffers are not aligned to the device's block size go through an aligned
 * bounce buffer; an unaligned write becomes read-modify-write of the
 * enclosing blocks, serialised against other writes to those blocks by a
 * private request tracker so that two RMWs of one block cannot undo each
 * other.
 *
 * Image locking follows QEMU's file-posix driver so that strata and QEMU
 * protect each other's images: open-file-description (OFD) read locks on
 *
 *     byte 100 + i   while this node holds permission i
 *     byte 200 + i   while this node does not share permission i
 *
 * with permissions numbered consistent-read 0, write 1, write-unchanged 2,
 * resize 3 (byte 0 belongs to libvirt and is left alone).  A conflict is a
 * lock another open file description holds on byte 200+i for a permission i
 * we want, or on byte 100+i for a permission we refuse to share.  Locks are
 * taken first and conflicts tested after, so two openers racing each other
 * both see the conflict.  The locks live on a separate read-only
 * descriptor that stays open for the node's life, so reopening the data
 * descriptor read-write never drops or contradicts them.
 *
 * Block status asks lseek(SEEK_DATA, SEEK_HOLE), whose cost on tmpfs grows
 * with the bytes it walks: SEEK_HOLE from inside a long run of data walks
 * the page cache to the run's end however little the caller asked about.
 * The last run of data found is remembered (as QEMU's file-posix does), so
 * a caller walking a run in pieces pays for the run once.  Only a discard,
 * a write of zeroes or a truncation can turn data into a hole: each bumps
 * bstat_gen and forgets the run, and an answer found while that happened
 * is not remembered.  bstat_lock guards the run and the generation; it is a
 * leaf, held for no system call.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/falloc.h>
#include <limits.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "block/node.h"
#include "drivers/file.h"
#include "drivers/registry.h"
#include "util/checked.h"
#include "util/cleanup.h"

#define LOCK_BASE_PERM 100
#define LOCK_BASE_SHARED 200

struct file_state {
  int fd;
  int lock_fd;          /* -1 when not locking */
  bool direct;
  bool no_flush;
  bool is_block;
  uint32_t align;       /* request alignment; 1 unless O_DIRECT */
  atomic_bool no_zero_range, no_punch_hole;
  struct tracker rmw;   /* O_DIRECT writes, at block granularity */
  unsigned locked_perm, locked_unshared;

  /* Group commit: concurrent flushes share one fdatasync.  A caller takes
   * ticket ++requested; a sync that starts after that covers the caller's
   * writes, so the caller waits until a sync that began with
   * target >= ticket has completed (done >= ticket). */
  pthread_mutex_t sync_lock;
  pthread_cond_t sync_cond;
  uint64_t sync_requested, sync_done;
  bool sync_running;
  int sync_error;       /* errno of the last failed sync, for its batch */

  /* The last run of data lseek found: [data_start, data_end), empty when
   * equal; bstat_gen counts the changes that may punch holes. */
  pthread_mutex_t bstat_lock;
  uint64_t data_start, data_end, bstat_gen;
};

/* ---- locking ---- */

static int
lock_byte (int fd, int byte, short type)
{
  struct flock fl = {
    .l_type = type, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1,
  };
  return fcntl (fd, F_OFD_SETLK, &fl) == 0 ? 0 : -errno;
}

/* 1 when another open file description holds a lock on BYTE, 0 when none,
 * or a negative errno. */
static int
lock_byte_taken (int fd, int byte)
{
  struct flock fl = {
    .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1,
  };
  if (fcntl (fd, F_OFD_GETLK, &fl) < 0)
    return -errno;
  return fl.l_type != F_UNLCK;
}

/* Parse one "lock:" line of /proc/PID/fdinfo/FD and say whether it is a
 * lock on BYTE of the file DEV:INO. */
static bool
lock_line_matches (const char *line, dev_t dev, ino_t ino, int byte)
{
  unsigned maj, min;
  unsigned long long i;
  long long start;
  char end[32];
  const char *p = strstr (line, "OFDLCK");

  if (!p)
    p = strstr (line, "POSIX");
  if (!p)
    return false;
  /* Skip to the "MAJ:MIN:INODE" field: the first token with a colon. */
  for (p = strchr (p, ' '); p && *p; p++) {
    if (*p != ' ')
      continue;
    if (sscanf (p, " %x:%x:%llu %lld %31s", &maj, &min, &i, &start, end) == 5)
      break;
  }
  if (!p || !*p)
    return false;
  if (maj != major (dev) || min != minor (dev) || i != (unsigned long long) ino)
    return false;
  if (byte < start)
    return false;
  return strcmp (end, "EOF") == 0 || byte <= atoll (end);
}

/* Find a process other than us (through SELF_FD) that holds a lock on BYTE
 * of the file open as FD.  Returns its pid and fills COMM, or 0 when the
 * system does not say (another user's process, or no /proc). */
static pid_t
lock_holder (int fd, int self_fd, int byte, char *comm, size_t commlen)
{
  struct stat st;
  DIR *proc;
  struct dirent *de;
  pid_t found = 0, me = getpid ();

  if (fstat (fd, &st) < 0 || !(proc = opendir ("/proc")))
    return 0;
  while (!found && (de = readdir (proc))) {
    char path[64];
    DIR *fdinfo;
    struct dirent *fe;
    pid_t pid = atoi (de->d_name);

    if (pid <= 0)
      continue;
    snprintf (path, sizeof path, "/proc/%d/fdinfo", pid);
    if (!(fdinfo = opendir (path)))
      continue;
    while (!found && (fe = readdir (fdinfo))) {
      char fpath[sizeof path + 260], line[256];
      FILE *f;

      if (fe->d_name[0] == '.' || (pid == me && atoi (fe->d_name) == self_fd))
        continue;
      snprintf (fpath, sizeof fpath, "%s/%s", path, fe->d_name);
      if (!(f = fopen (fpath, "r")))
        continue;
      while (fgets (line, sizeof line, f))
        if (strncmp (line, "lock:", 5) == 0
            && lock_line_matches (line, st.st_dev, st.st_ino, byte)) {
          found = pid;
          break;
        }
      fclose (f);
    }
    closedir (fdinfo);
  }
  closedir (proc);
  if (found) {
    char path[64];
    FILE *f;

    snprintf (path, sizeof path, "/proc/%d/comm", found);
    comm[0] = '\0';
    if ((f = fopen (path, "r"))) {
      if (fgets (comm, commlen, f))
        comm[strcspn (comm, "\n")] = '\0';
      fclose (f);
    }
  }
  return found;
}

/* Make the locks on s->lock_fd say PERM held and UNSHARED not shared. */
static int
lock_set (struct file_state *s, unsigned perm, unsigned unshared)
{
  for (int i = 0; i < PERM_COUNT; i++) {
    int r = lock_byte (s->lock_fd, LOCK_BASE_PERM + i,
                       perm & (1u << i) ? F_RDLCK : F_UNLCK);
    if (r == 0)
      r = lock_byte (s->lock_fd, LOCK_BASE_SHARED + i,
                     unshared & (1u << i) ? F_RDLCK : F_UNLCK);
    if (r < 0)
      return r;
  }
  s->locked_perm = perm;
  s->locked_unshared = unshared;
  return 0;
}

/* Make the locks on s->lock_fd say PERM held and SHARED shared, or change
 * nothing and fail naming FILENAME and the holder of a conflicting lock. */
static bool
file_lock_perms (struct file_state *s, const char *filename, unsigned perm,
                 unsigned shared, strata_error **errp)
{
  unsigned unshared = PERM_ALL & ~shared;
  unsigned old_perm = s->locked_perm, old_unshared = s->locked_unshared;
  int r;

  if (s->lock_fd < 0)
    return true;
  r = lock_set (s, perm, unshared);
  if (r < 0) {
    lock_set (s, old_perm, old_unshared);
    error_set_errno (errp, -r, "%s: cannot take the image locks",
                     filename);
    return false;
  }
  for (int i = 0; i < 2 * PERM_COUNT; i++) {
    unsigned bit = 1u << (i % PERM_COUNT);
    bool shared_lock = i >= PERM_COUNT;
    int byte;
    char comm[64];
    pid_t pid;

    /* Holding perm i conflicts with others not sharing it (byte 200+i);
     * not sharing i conflicts with others holding it (byte 100+i). */
    if (!shared_lock && !(perm & bit))
      continue;
    if (shared_lock && !(unshared & bit))
      continue;
    byte = (shared_lock ? LOCK_BASE_PERM : LOCK_BASE_SHARED) + i % PERM_COUNT;
    r = lock_byte_taken (s->lock_fd, byte);
    if (r == 0)
      continue;
    lock_set (s, old_perm, old_unshared);
    if (r < 0) {
      error_set_errno (errp, -r, "%s: cannot test the image locks",
                       filename);
      return false;
    }
    pid = lock_holder (s->lock_fd, s->lock_fd, byte, comm, sizeof comm);
    if (pid)
      error_set (errp, EAGAIN,
                 "Failed to get %s\"%s\" lock: '%s' is in use by process %d "
                 "(%s)", shared_lock ? "shared " : "",
                 perm_name (i % PERM_COUNT), filename, (int) pid, comm);
    else
      error_set (errp, EAGAIN,
                 "Failed to get %s\"%s\" lock: '%s' is in use by another "
                 "process", shared_lock ? "shared " : "",
                 perm_name (i % PERM_COUNT), filename);
    return false;
  }
  return true;
}

static bool
file_apply_locks (strata_node *node, strata_error **errp)
{
  return file_lock_perms (node->opaque, node->filename, node->perm,
                          node->shared, errp);
}

/* ---- open/close ---- */

static int
file_open_flags (const struct file_state *s, bool rw)
{
  return (rw ? O_RDWR : O_RDONLY) | O_CLOEXEC | (s->direct ? O_DIRECT : 0);
}

/* Find the smallest alignment O_DIRECT accepts on this file. */
static uint32_t
probe_direct_alignment (int fd, bool is_block)
{
  int ssz;
  CLEANUP_FREE void *buf = NULL;

  if (is_block && ioctl (fd, BLKSSZGET, &ssz) == 0 && ssz > 0)
    return ssz;
  if (posix_memalign (&buf, 4096, 4096))
    return 4096;
  for (uint32_t a = 512; a < 4096; a *= 2) {
    ssize_t r = pread (fd, buf, a, 0);
    if (r > 0)
      return a;
    if (r == 0)
      break;  /* empty file: nothing to learn from */
  }
  return 4096;
}

static bool
file_open (strata_node *node, strata_opts *opts, unsigned flags,
           strata_error **errp)
{
  struct file_state *s = node->opaque;
  const char *filename = opts_get (opts, "filename");
  const char *locking = opts_get (opts, "locking");
  const char *aio = opts_get (opts, "aio");
  struct stat st;
  bool want_lock;

  s->fd = s->lock_fd = -1;
  if (!filename || !*filename) {
    error_set (errp, EINVAL, "the file driver needs a 'filename'");
    return false;
  }
  if (!(node->filename = strdup (filename))) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  if (!opts_get_bool (opts, "cache.direct", false, &s->direct, errp)
      || !opts_get_bool (opts, "cache.no-flush", false, &s->no_flush, errp))
    return false;
  if (aio && strcmp (aio, "threads") != 0 && strcmp (aio, "native") != 0
      && strcmp (aio, "io_uring") != 0) {
    error_set (errp, EINVAL, "%s: invalid aio mode '%s'", filename, aio);
    return false;
  }
  if (!locking || strcmp (locking, "auto") == 0 || strcmp (locking, "on") == 0)
    want_lock = !(flags & STRATA_OPEN_FORCE_SHARE);
  else if (strcmp (locking, "off") == 0)
    want_lock = false;
  else {
    error_set (errp, EINVAL, "%s: locking must be on, off or auto, not '%s'",
               filename, locking);
    return false;
  }

  s->fd = open (filename, file_open_flags (s, flags & STRATA_OPEN_RDWR));
  if (s->fd < 0) {
    error_set_errno (errp, errno, "Could not open '%s'", filename);
    return false;
  }
  if (fstat (s->fd, &st) < 0) {
    error_set_errno (errp, errno, "%s: cannot stat", filename);
    goto fail;
  }
  if (S_ISDIR (st.st_mode)) {
    error_set (errp, EISDIR, "Could not open '%s': Is a directory", filename);
    goto fail;
  }
  if (!S_ISREG (st.st_mode) && !S_ISBLK (st.st_mode)) {
    error_set (errp, EINVAL, "Could not open '%s': not a regular file or "
               "block device", filename);
    goto fail;
  }
  s->is_block = S_ISBLK (st.st_mode);
  s->align = s->direct ? probe_direct_alignment (s->fd, s->is_block) : 1;
  tracker_init (&s->rmw);
  pthread_mutex_init (&s->sync_lock, NULL);
  pthread_cond_init (&s->sync_cond, NULL);
  pthread_mutex_init (&s->bstat_lock, NULL);

  if (want_lock) {
    s->lock_fd = open (filename, O_RDONLY | O_CLOEXEC);
    if (s->lock_fd < 0) {
      error_set_errno (errp, errno, "Could not open '%s' for locking",
                       filename);
      goto fail_tracker;
    }
    if (!file_apply_locks (node, errp))
      goto fail_tracker;
  }
  return true;

fail_tracker:
  pthread_mutex_destroy (&s->bstat_lock);
  pthread_cond_destroy (&s->sync_cond);
  pthread_mutex_destroy (&s->sync_lock);
  tracker_destroy (&s->rmw);
fail:
  if (s->lock_fd >= 0)
    close (s->lock_fd);
  close (s->fd);
  return false;
}

static void
file_close (strata_node *node)
{
  struct file_state *s = node->opaque;

  tracker_destroy (&s->rmw);
  pthread_mutex_destroy (&s->bstat_lock);
  pthread_cond_destroy (&s->sync_cond);
  pthread_mutex_destroy (&s->sync_lock);
  if (s->lock_fd >= 0)
    close (s->lock_fd);  /* drops every OFD lock */
  close (s->fd);
}

static bool
file_reopen (strata_node *node, bool rw, strata_error **errp)
{
  struct file_state *s = node->opaque;
  int fd = open (node->filename, file_open_flags (s, rw));

  if (fd < 0) {
    error_set_errno (errp, errno, "Could not reopen '%s' %s", node->filename,
                     rw ? "read-write" : "read-only");
    return false;
  }
  if (!file_apply_locks (node, errp)) {
    close (fd);
    return false;
  }
  close (s->fd);
  s->fd = fd;
  return true;
}

/* ---- data path ---- */

static int64_t
file_get_length (strata_node *node)
{
  struct file_state *s = node->opaque;
  struct stat st;
  uint64_t size;

  if (s->is_block)
    return ioctl (s->fd, BLKGETSIZE64, &size) == 0 ? (int64_t) size : -errno;
  return fstat (s->fd, &st) == 0 ? st.st_size : -errno;
}

static bool
iov_aligned (const struct iovec *iov, int iovcnt, uint32_t align)
{
  for (int i = 0; i < iovcnt; i++)
    if ((uintptr_t) iov[i].iov_base % align || iov[i].iov_len % align)
      return false;
  return true;
}

/* Read LEN bytes; bytes past the end of the file read as zeros. */
static int
full_preadv (strata_node *node, int fd, uint64_t offset, uint64_t len,
             const struct iovec *iov, int iovcnt)
{
  struct iovec local[IOV_MAX < 64 ? IOV_MAX : 64];
  int n;

  if (iovcnt > (int) (sizeof local / sizeof local[0]))
    return io_error (EINVAL, "%s: too many buffers (%d)", node->filename,
                     iovcnt);
  memcpy (local, iov, iovcnt * sizeof *iov);
  n = iovcnt;
  for (struct iovec *v = local; len > 0;) {
    ssize_t r = preadv (fd, v, n, offset);

    if (r < 0) {
      if (errno == EINTR)
        continue;
      return io_error (errno, "%s: read at offset %" PRIu64 " failed: %s",
                       node->filename, offset, strerror (errno));
    }
    if (r == 0) {
      /* End of file: the rest reads as zeros. */
      for (; n > 0; v++, n--)
        memset (v->iov_base, 0, v->iov_len);
      return 0;
    }
    offset += r;
    len -= r;
    while (n > 0 && (size_t) r >= v->iov_len) {
      r -= v->iov_len;
      v++;
      n--;
    }
    if (n > 0) {
      v->iov_base = (char *) v->iov_base + r;
      v->iov_len -= r;
    }
  }
  return 0;
}

static int
full_pwritev (strata_node *node, int fd, uint64_t offset, uint64_t len,
              const struct iovec *iov, int iovcnt, unsigned flags)
{
  struct iovec local[64];
  int n = iovcnt, rwf = (flags & STRATA_REQ_FUA) ? RWF_DSYNC : 0;

  if (iovcnt > (int) (sizeof local / sizeof local[0]))
    return io_error (EINVAL, "%s: too many buffers (%d)", node->filename,
                     iovcnt);
  memcpy (local, iov, iovcnt * sizeof *iov);
  for (struct iovec *v = local; len > 0;) {
    ssize_t r = pwritev2 (fd, v, n, offset, rwf);

    if (r < 0) {
      if (errno == EINTR)
        continue;
      return io_error (errno, "%s: write at offset %" PRIu64 " failed: %s",
                       node->filename, offset, strerror (errno));
    }
    offset += r;
    len -= r;
    while (n > 0 && (size_t) r >= v->iov_len) {
      r -= v->iov_len;
      v++;
      n--;
    }
    if (n > 0) {
      v->iov_base = (char *) v->iov_base + r;
      v->iov_len -= r;
    }
  }
  return 0;
}

static void
iov_copy_out (const struct iovec *iov, int iovcnt, const char *src)
{
  for (int i = 0; i < iovcnt; src += iov[i].iov_len, i++)
    memcpy (iov[i].iov_base, src, iov[i].iov_len);
}

static void
iov_copy_in (char *dst, const struct iovec *iov, int iovcnt)
{
  for (int i = 0; i < iovcnt; dst += iov[i].iov_len, i++)
    memcpy (dst, iov[i].iov_base, iov[i].iov_len);
}

static int
file_preadv (strata_node *node, uint64_t offset, uint64_t len,
             const struct iovec *iov, int iovcnt, unsigned flags)
{
  struct file_state *s = node->opaque;
  uint64_t start, end;
  CLEANUP_FREE char *bounce = NULL;
  struct iovec biov;
  int r;

  (void) flags;
  if (offset % s->align == 0 && len % s->align == 0
      && iov_aligned (iov, iovcnt, s->align))
    return full_preadv (node, s->fd, offset, len, iov, iovcnt);

  start = ROUND_DOWN (offset, s->align);
  end = ROUND_UP (offset + len, s->align);
  if (posix_memalign ((void **) &bounce, MAX (s->align, 512), end - start))
    return -ENOMEM;
  biov = (struct iovec){ .iov_base = bounce, .iov_len = end - start };
  r = full_preadv (node, s->fd, start, end - start, &biov, 1);
  if (r == 0)
    iov_copy_out (iov, iovcnt, bounce + (offset - start));
  return r;
}

/* O_DIRECT write of an unaligned range: read-modify-write of the blocks
 * around it.  The caller holds a serialising rmw-tracker entry for them. */
static int
file_pwrite_rmw (strata_node *node, uint64_t offset, uint64_t len,
                 const struct iovec *iov, int iovcnt, unsigned flags)
{
  struct file_state *s = node->opaque;
  uint64_t start = ROUND_DOWN (offset, s->align);
  uint64_t end = ROUND_UP (offset + len, s->align);
  int64_t old_size = file_get_length (node);
  CLEANUP_FREE char *bounce = NULL;
  struct iovec biov;
  int r;

  if (old_size < 0)
    return io_error (-old_size, "%s: cannot get the file size",
                     node->filename);
  if (posix_memalign ((void **) &bounce, MAX (s->align, 512), end - start))
    return -ENOMEM;
  biov = (struct iovec){ .iov_base = bounce, .iov_len = end - start };
  r = full_preadv (node, s->fd, start, end - start, &biov, 1);
  if (r < 0)
    return r;
  iov_copy_in (bounce + (offset - start), iov, iovcnt);
  r = full_pwritev (node, s->fd, start, end - start, &biov, 1, flags);
  if (r < 0)
    return r;
  /* The padding must not grow the file past what was asked for. */
  if (!s->is_block && end > (uint64_t) old_size
      && ftruncate (s->fd, MAX ((uint64_t) old_size, offset + len)) < 0)
    return io_error (errno, "%s: cannot trim the file after a write: %s",
                     node->filename, strerror (errno));
  return 0;
}

static int
file_pwritev (strata_node *node, uint64_t offset, uint64_t len,
              const struct iovec *iov, int iovcnt, unsigned flags)
{
  struct file_state *s = node->opaque;
  struct tracked_req req;
  bool aligned;
  int r;

  if (!s->direct)
    return full_pwritev (node, s->fd, offset, len, iov, iovcnt, flags);
  aligned = offset % s->align == 0 && len % s->align == 0
            && iov_aligned (iov, iovcnt, s->align);
  tracker_begin (&s->rmw, &req, ROUND_DOWN (offset, s->align),
                 ROUND_UP (offset + len, s->align)
                     - ROUND_DOWN (offset, s->align),
                 !aligned);
  if (aligned)
    r = full_pwritev (node, s->fd, offset, len, iov, iovcnt, flags);
  else
    r = file_pwrite_rmw (node, offset, len, iov, iovcnt, flags);
  tracker_end (&s->rmw, &req);
  return r;
}

static int
file_sync (strata_node *node)
{
  struct file_state *s = node->opaque;
  uint64_t ticket;
  int err = 0;

  if (s->no_flush)
    return 0;
  pthread_mutex_lock (&s->sync_lock);
  ticket = ++s->sync_requested;
  while (s->sync_done < ticket) {
    if (s->sync_running) {
      pthread_cond_wait (&s->sync_cond, &s->sync_lock);
      continue;
    }
    /* Run a sync for everyone who asked so far. */
    uint64_t target = s->sync_requested;
    int r;

    s->sync_running = true;
    pthread_mutex_unlock (&s->sync_lock);
    r = fdatasync (s->fd) < 0 ? errno : 0;
    pthread_mutex_lock (&s->sync_lock);
    s->sync_running = false;
    s->sync_done = target;
    s->sync_error = r;
    pthread_cond_broadcast (&s->sync_cond);
  }
  /* The batch that covered us may have failed: report it to everyone in
   * it (a later successful batch clears it for later callers). */
  err = s->sync_error;
  pthread_mutex_unlock (&s->sync_lock);
  if (err)
    return io_error (err, "%s: flush failed: %s", node->filename,
                     strerror (err));
  return 0;
}

/* After anything that may have turned data into a hole. */
static void
forget_data_run (struct file_state *s)
{
  pthread_mutex_lock (&s->bstat_lock);
  s->bstat_gen++;
  s->data_start = s->data_end = 0;
  pthread_mutex_unlock (&s->bstat_lock);
}

static int
try_fallocate (struct file_state *s, atomic_bool *unsupported, int mode,
               uint64_t offset, uint64_t len)
{
  if (atomic_load (unsupported))
    return -ENOTSUP;
  if (fallocate (s->fd, mode, offset, len) == 0) {
    forget_data_run (s);
    return 0;
  }
  if (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL) {
    atomic_store (unsupported, true);
    return -ENOTSUP;
  }
  return -errno;
}

static int
file_pwrite_zeroes (strata_node *node, uint64_t offset, uint64_t len,
                    unsigned flags)
{
  struct file_state *s = node->opaque;
  struct tracked_req req;
  int r = -ENOTSUP;

  /* Serialise against RMW writes that may still hold stale blocks. */
  if (s->direct)
    tracker_begin (&s->rmw, &req, ROUND_DOWN (offset, s->align),
                   ROUND_UP (offset + len, s->align)
                       - ROUND_DOWN (offset, s->align), true);
  if ((flags & STRATA_REQ_MAY_UNMAP) && !s->is_block) {
    int64_t size = file_get_length (node);

    if (size >= 0 && offset + len > (uint64_t) size) {
      /* Growing: the new tail reads as zeros without being written. */
      r = 0;
      if ((uint64_t) size > offset)
        r = try_fallocate (s, &s->no_punch_hole,
                           FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           offset, size - offset);
      if (r == 0 && ftruncate (s->fd, offset + len) < 0)
        r = -errno;
      forget_data_run (s);
    }
    else
      r = try_fallocate (s, &s->no_punch_hole,
                         FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                         len);
  }
  if (r == -ENOTSUP)
    r = try_fallocate (s, &s->no_zero_range, FALLOC_FL_ZERO_RANGE, offset,
                       len);
  if (s->direct)
    tracker_end (&s->rmw, &req);
  if (r == 0 && (flags & STRATA_REQ_FUA))
    r = file_sync (node);
  if (r < 0 && r != -ENOTSUP)
    return io_error (-r, "%s: writing zeroes at offset %" PRIu64
                     " failed: %s", node->filename, offset, strerror (-r));
  return r;  /* -ENOTSUP: the core writes zero buffers instead */
}

static int
file_pdiscard (strata_node *node, uint64_t offset, uint64_t len,
               unsigned flags)
{
  struct file_state *s = node->opaque;
  int64_t size = file_get_length (node);

  (void) flags;
  if (size < 0 || offset >= (uint64_t) size)
    return 0;
  len = MIN (len, (uint64_t) size - offset);
  return try_fallocate (s, &s->no_punch_hole,
                        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                        len);
}

static int
file_flush (strata_node *node)
{
  return file_sync (node);
}

/* Whether OFFSET is in the remembered run of data; *END gets its end. */
static bool
in_data_run (struct file_state *s, uint64_t offset, uint64_t *end,
             uint64_t *gen)
{
  bool in;

  pthread_mutex_lock (&s->bstat_lock);
  in = offset >= s->data_start && offset < s->data_end;
  *end = s->data_end;
  *gen = s->bstat_gen;
  pthread_mutex_unlock (&s->bstat_lock);
  return in;
}

static void
remember_data_run (struct file_state *s, uint64_t start, uint64_t end,
                   uint64_t gen)
{
  pthread_mutex_lock (&s->bstat_lock);
  if (s->bstat_gen == gen) {
    s->data_start = start;
    s->data_end = end;
  }
  pthread_mutex_unlock (&s->bstat_lock);
}

static int
file_block_status (strata_node *node, uint64_t offset, uint64_t len,
                   struct bstat *bs)
{
  struct file_state *s = node->opaque;
  int64_t size = file_get_length (node);
  uint64_t run_end, gen;
  off_t data, hole;

  bs->flags = BS_ALLOCATED | BS_OFFSET;
  bs->map = offset;
  bs->file = node;
  bs->pnum = len;
  if (size < 0)
    return io_error (-size, "%s: cannot get the file size", node->filename);
  if (offset >= (uint64_t) size) {
    bs->flags |= BS_ZERO;
    return 0;
  }
  if (s->is_block) {
    bs->flags |= BS_DATA;
    return 0;
  }
  if (in_data_run (s, offset, &run_end, &gen)) {
    bs->flags |= BS_DATA;
    bs->pnum = MIN (len, MIN (run_end, (uint64_t)size) - offset);
    return 0;
  }
  data = lseek (s->fd, offset, SEEK_DATA);
  if (data < 0) {
    /* ENXIO: a hole up to the end; anything else: assume data. */
    bs->flags |= errno == ENXIO ? BS_ZERO : BS_DATA;
    if (errno == ENXIO)
      bs->pnum = MIN (len, (uint64_t) size - offset);
    return 0;
  }
  if ((uint64_t) data > offset) {
    bs->flags |= BS_ZERO;
    bs->pnum = MIN (len, (uint64_t) data - offset);
    return 0;
  }
  hole = lseek (s->fd, offset, SEEK_HOLE);
  bs->flags |= BS_DATA;
  if (hole > (off_t) offset) {
    bs->pnum = MIN (len, (uint64_t) hole - offset);
    remember_data_run (s, offset, hole, gen);
  }
  return 0;
}

static bool
file_truncate (strata_node *node, uint64_t size, unsigned flags,
               strata_error **errp)
{
  struct file_state *s = node->opaque;
  int64_t cur = file_get_length (node);

  (void) flags;
  if (s->is_block) {
    if (cur >= 0 && (uint64_t) cur >= size)
      return true;
    error_set (errp, EINVAL, "%s: cannot grow a block device to %" PRIu64
               " bytes", node->filename, size);
    return false;
  }
  if (ftruncate (s->fd, size) < 0) {
    error_set_errno (errp, errno, "%s: cannot resize to %" PRIu64 " bytes",
                     node->filename, size);
    forget_data_run (s);
    return false;
  }
  forget_data_run (s);
  return true;
}

static bool
file_get_info (strata_node *node, struct strata_info *info,
               strata_error **errp)
{
  struct file_state *s = node->opaque;
  struct stat st;

  info->cache_direct = s->direct;
  info->cache_no_flush = s->no_flush;
  if (fstat (s->fd, &st) < 0) {
    error_set_errno (errp, errno, "%s: cannot stat", node->filename);
    return false;
  }
  info->actual_size = (uint64_t) st.st_blocks * 512;
  return true;
}

const struct strata_driver file_driver = {
  .name          = "file",
  .state_size    = sizeof (struct file_state),
  .open          = file_open,
  .close         = file_close,
  .reopen        = file_reopen,
  .preadv        = file_preadv,
  .pwritev       = file_pwritev,
  .pwrite_zeroes = file_pwrite_zeroes,
  .pdiscard      = file_pdiscard,
  .flush         = file_flush,
  .block_status  = file_block_status,
  .get_length    = file_get_length,
  .truncate      = file_truncate,
  .get_info      = file_get_info,
};

/* ---- creation ---- */

static int
write_zeroes_fd (int fd, uint64_t size)
{
  static const char zeroes[65536];

  for (uint64_t off = 0; off < size;) {
    ssize_t n = pwrite (fd, zeroes, MIN (sizeof zeroes, size - off), off);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      return -errno;
    off += n;
  }
  return 0;
}

bool
file_create (const char *filename, uint64_t size, const char *prealloc,
             strata_error **errp)
{
  bool existed = access (filename, F_OK) == 0;
  struct file_state lock_state = { .lock_fd = -1 };
  int fd, r = 0;

  if (!prealloc)
    prealloc = "off";
  if (strcmp (prealloc, "off") && strcmp (prealloc, "falloc")
      && strcmp (prealloc, "full")) {
    error_set (errp, EINVAL, "%s: invalid preallocation mode '%s' (off, "
               "falloc or full)", filename, prealloc);
    return false;
  }
  if (size > INT64_MAX) {
    error_set (errp, EFBIG, "%s: size %" PRIu64 " is too large", filename,
               size);
    return false;
  }
  /* Lock before truncating, as QEMU does: an image somebody has open
   * (a running VM, a strata daemon) must not be wiped by a create. */
  fd = open (filename, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    error_set_errno (errp, errno, "Could not create '%s'", filename);
    return false;
  }
  lock_state.lock_fd = fd;
  if (!file_lock_perms (&lock_state, filename,
                        PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
                        PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED, errp)) {
    close (fd);
    if (!existed)
      unlink (filename);
    return false;
  }
  if (ftruncate (fd, 0) < 0 || ftruncate (fd, size) < 0)
    r = -errno;
  else if (strcmp (prealloc, "falloc") == 0 && size
           && fallocate (fd, 0, 0, size) < 0)
    r = -errno;
  else if (strcmp (prealloc, "full") == 0)
    r = write_zeroes_fd (fd, size);
  if (r == 0 && fsync (fd) < 0)
    r = -errno;
  close (fd);
  if (r < 0) {
    if (!existed)
      unlink (filename);
    error_set_errno (errp, -r, "Could not create '%s' with %" PRIu64
                     " bytes (preallocation=%s)", filename, size, prealloc);
    return false;
  }
  return true;
}
