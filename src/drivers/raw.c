/* strata: the raw format driver.
 *
 * The guest sees the bytes of the `file` child, optionally only the window
 * [offset, offset+size) of it.  With a window the image cannot be resized
 * (the window is fixed by the user), and every request is checked against
 * the window here, because a caller between nodes is not range-checked by
 * the core.
 *
 * When the format was probed rather than named, a write must not change
 * what the first sector probes as: otherwise a guest could write a qcow2
 * header into its raw disk and make the next open follow a backing file of
 * its choosing on the host.  Such writes fail with EPERM, as in QEMU.
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "block/node.h"
#include "drivers/file.h"
#include "drivers/registry.h"
#include "util/checked.h"

struct raw_state {
  uint64_t offset;
  uint64_t size;    /* guest length: the window, or the file's length as
                     * of open and of our own truncates (no syscall per
                     * request); atomic, a truncate may race with I/O */
  bool has_size;    /* a window was given: size is fixed */
};

static int
raw_probe (const uint8_t *buf, size_t len)
{
  (void) buf;
  (void) len;
  return 1;  /* anything is raw, as a last resort */
}

/* Would BUF (the start of an image) probe as a format other than raw?
 * Stops writes into a probed raw image from changing its format. */
static bool
raw_probe_finds_format (const uint8_t *buf, size_t len)
{
  for (size_t i = 0; i < driver_count; i++) {
    const struct strata_driver *d = driver_list[i];
    if (d != &raw_driver && d->probe && d->probe (buf, len) > 0)
      return true;
  }
  return false;
}

static bool
raw_open (strata_node *node, strata_opts *opts, unsigned flags,
          strata_error **errp)
{
  struct raw_state *s = node->opaque;
  int64_t flen = node_length (node->file);

  (void) flags;
  s->has_size = opts_has (opts, "size");
  if (!opts_get_size (opts, "offset", 0, &s->offset, errp)
      || !opts_get_size (opts, "size", 0, &s->size, errp))
    return false;
  if (flen < 0) {
    error_set (errp, -flen, "%s: cannot get the file size", node->filename);
    return false;
  }
  if (s->offset > (uint64_t) flen) {
    error_set (errp, EINVAL, "%s: offset %" PRIu64 " is past the end of the "
               "file (%" PRId64 " bytes)", node->filename, s->offset, flen);
    return false;
  }
  if (!s->has_size)
    s->size = flen - s->offset;
  else if (s->size > (uint64_t) flen - s->offset) {
    error_set (errp, EINVAL, "%s: offset %" PRIu64 " plus size %" PRIu64
               " is past the end of the file (%" PRId64 " bytes)",
               node->filename, s->offset, s->size, flen);
    return false;
  }
  return true;
}

static bool
raw_windowed (const struct raw_state *s)
{
  return s->has_size || s->offset;
}

static int
raw_check (strata_node *node, uint64_t offset, uint64_t len)
{
  struct raw_state *s = node->opaque;

  if (raw_windowed (s) && !range_inside (offset, len, s->size))
    return io_error (EIO, "%s: request at offset %" PRIu64 " length %" PRIu64
                     " is outside the raw window of %" PRIu64 " bytes",
                     node->filename, offset, len, s->size);
  return 0;
}

static int
raw_preadv (strata_node *node, uint64_t offset, uint64_t len,
            const struct iovec *iov, int iovcnt, unsigned flags)
{
  struct raw_state *s = node->opaque;
  int r = raw_check (node, offset, len);

  return r ? r : node_preadv (node->file, s->offset + offset, len, iov,
                              iovcnt, flags);
}

/* Refuse a write into sector 0 of a probed image that would make it probe
 * as another format. */
static int
raw_check_probed_write (strata_node *node, uint64_t offset, uint64_t len,
                        const struct iovec *iov, int iovcnt)
{
  struct raw_state *s = node->opaque;
  uint8_t sector[512];
  uint64_t pos = offset;
  int r;

  if (!node->format_probed || offset >= sizeof sector)
    return 0;
  r = node_pread (node->file, s->offset, sector, sizeof sector, 0);
  if (r < 0)
    return r;
  for (int i = 0; i < iovcnt && pos < sizeof sector; i++) {
    size_t n = MIN (iov[i].iov_len, sizeof sector - pos);
    memcpy (sector + pos, iov[i].iov_base, n);
    pos += iov[i].iov_len;
  }
  (void) len;
  if (raw_probe_finds_format (sector, sizeof sector))
    return io_error (EPERM, "%s: refusing to write an image header into "
                     "sector 0 of an image whose format was probed as raw; "
                     "name the format (-f raw) to allow it", node->filename);
  return 0;
}

static int
raw_pwritev (strata_node *node, uint64_t offset, uint64_t len,
             const struct iovec *iov, int iovcnt, unsigned flags)
{
  struct raw_state *s = node->opaque;
  int r = raw_check (node, offset, len);

  if (r == 0)
    r = raw_check_probed_write (node, offset, len, iov, iovcnt);
  return r ? r : node_pwritev (node->file, s->offset + offset, len, iov,
                               iovcnt, flags);
}

static int
raw_pwrite_zeroes (strata_node *node, uint64_t offset, uint64_t len,
                   unsigned flags)
{
  struct raw_state *s = node->opaque;
  int r = raw_check (node, offset, len);

  return r ? r : node_pwrite_zeroes (node->file, s->offset + offset, len,
                                     flags);
}

static int
raw_pdiscard (strata_node *node, uint64_t offset, uint64_t len,
              unsigned flags)
{
  struct raw_state *s = node->opaque;
  int r = raw_check (node, offset, len);

  return r ? r : node_pdiscard (node->file, s->offset + offset, len, flags);
}

static int
raw_block_status (strata_node *node, uint64_t offset, uint64_t len,
                  struct bstat *bs)
{
  struct raw_state *s = node->opaque;

  *bs = (struct bstat){
    .pnum = len,
    .flags = BS_ALLOCATED | BS_OFFSET | BS_RECURSE,
    .map = s->offset + offset,
    .file = node->file,
  };
  return 0;
}

static int64_t
raw_get_length (strata_node *node)
{
  struct raw_state *s = node->opaque;

  return __atomic_load_n (&s->size, __ATOMIC_ACQUIRE);
}

static bool
raw_truncate (strata_node *node, uint64_t size, unsigned flags,
              strata_error **errp)
{
  struct raw_state *s = node->opaque;

  if (raw_windowed (s)) {
    error_set (errp, ENOTSUP, "%s: cannot resize a raw image with an offset "
               "or size window", node->filename);
    return false;
  }
  if (!node_truncate (node->file, size, flags, errp))
    return false;
  __atomic_store_n (&s->size, size, __ATOMIC_RELEASE);
  return true;
}

static bool
raw_create (const char *filename, strata_opts *opts, strata_error **errp)
{
  uint64_t size;

  if (!opts_get_size (opts, "size", 0, &size, errp))
    return false;
  return file_create (filename, size, opts_get (opts, "preallocation"),
                      errp);
}

/* qemu-img measure -O raw: the guest size (sector-aligned when given as
 * an option); holes count, since the file's length is what is needed. */
static bool
raw_measure (strata_opts *opts, strata_node *src, uint64_t *required,
             uint64_t *fully_allocated, strata_error **errp)
{
  uint64_t size;

  if (!opts_get_size (opts, "size", 0, &size, errp))
    return false;
  opts_get (opts, "preallocation");
  if (src) {
    int64_t len = strata_length (src);
    if (len < 0) {
      error_set (errp, (int) -len, "%s: cannot get the image size",
                 src->filename);
      return false;
    }
    size = len;
  }
  else
    size = (size + 511) / 512 * 512;
  *required = *fully_allocated = size;
  return true;
}

static const char *const raw_create_options[] = {
  "size", "preallocation", NULL,
};

const struct strata_driver raw_driver = {
  .name           = "raw",
  .state_size     = sizeof (struct raw_state),
  .has_file_child = true,
  .probe          = raw_probe,
  .open           = raw_open,
  .create         = raw_create,
  .create_options = raw_create_options,
  .measure        = raw_measure,
  .preadv         = raw_preadv,
  .pwritev        = raw_pwritev,
  .pwrite_zeroes  = raw_pwrite_zeroes,
  .pdiscard       = raw_pdiscard,
  .block_status   = raw_block_status,
  .get_length     = raw_get_length,
  .truncate       = raw_truncate,
};
