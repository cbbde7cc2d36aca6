/* strata: the public API (include/strata/strata.h) over the node core.
 *
 * This is the one place where requests are checked against the image's
 * length, so drivers below never see a request past the end of the guest
 * view, and where block status walks down the backing chain.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "block/chain.h"
#include "block/dirty.h"
#include "block/node.h"
#include "util/checked.h"

/* The one check of a call's flags: a bit outside MASK fails with EINVAL,
 * reported through ERRP (control path) and as the thread's last data-path
 * error (so a data-path caller just returns the result).  Returns 0 or
 * -EINVAL. */
static int
check_flags (const char *call, unsigned flags, unsigned mask,
             strata_error **errp)
{
  unsigned bad = flags & ~mask;

  if (!bad)
    return 0;
  error_set (errp, EINVAL, "%s: unknown flags 0x%x", call, bad);
  return io_error (EINVAL, "%s: unknown flags 0x%x", call, bad);
}

/* A caller-sized result struct: SIZE (its first field) must cover at
 * least the first version of the struct, FIRST bytes. */
static bool
check_size (const char *call, size_t size, size_t first, strata_error **errp)
{
  if (size >= first)
    return true;
  error_set (errp, EINVAL, "%s: struct size %zu is smaller than %zu", call,
             size, first);
  io_error (EINVAL, "%s: struct size %zu is smaller than %zu", call, size,
            first);
  return false;
}

/* Copy the library's FULL result into the caller's OUT, at most SIZE
 * bytes (the caller's struct may be older and shorter), keeping SIZE. */
static void
copy_sized (void *out, const void *full, size_t full_size, size_t size)
{
  memcpy ((char *)out + sizeof (size_t), (const char *)full + sizeof (size_t),
          MIN (size, full_size) - sizeof (size_t));
}

strata_node *
strata_open (const char *filename, const char *format, const char *options,
             unsigned flags, strata_error **errp)
{
  strata_opts *extra = NULL;
  strata_node *node;

  if (check_flags ("strata_open", flags, STRATA_OPEN_MASK, errp) < 0)
    return NULL;
  if (!filename || !*filename) {
    error_set (errp, EINVAL, "no image file name given");
    return NULL;
  }
  if (options && *options) {
    if (!(extra = opts_new ())) {
      error_set (errp, ENOMEM, "out of memory");
      return NULL;
    }
    if (!opts_parse (extra, options, errp)) {
      opts_free (extra);
      return NULL;
    }
  }
  node = node_open_image (filename, format, extra, flags, errp);
  opts_free (extra);
  return node;
}

void
strata_close (strata_node *node)
{
  node_unref (node);
}

int64_t
strata_length (strata_node *node)
{
  return node_length (node_resolve (node));
}

static int
check_range (strata_node *node, uint64_t offset, uint64_t len)
{
  int64_t size = node_length (node);

  if (size < 0)
    return io_error (-size, "%s: cannot get the image length", node->filename);
  if (!range_inside (offset, len, size))
    return io_error (EIO,
                     "%s: request at offset %" PRIu64 " length %" PRIu64
                     " is past the end of the image (%" PRId64 " bytes)",
                     node->filename, offset, len, size);
  return 0;
}

static uint64_t
iov_size (const struct iovec *iov, int iovcnt)
{
  uint64_t n = 0;

  for (int i = 0; i < iovcnt; i++)
    n += iov[i].iov_len;
  return n;
}

int
strata_preadv (strata_node *node, const struct iovec *iov, int iovcnt,
               uint64_t offset, unsigned flags)
{
  uint64_t len = iov_size (iov, iovcnt);
  int r = check_flags ("strata_preadv", flags, STRATA_READ_MASK, NULL);

  if (r == 0)
    r = check_range (node, offset, len);
  return r < 0 ? r : node_preadv (node, offset, len, iov, iovcnt, flags);
}

int
strata_pwritev (strata_node *node, const struct iovec *iov, int iovcnt,
                uint64_t offset, unsigned flags)
{
  uint64_t len = iov_size (iov, iovcnt);
  int r = check_flags ("strata_pwritev", flags, STRATA_WRITE_MASK, NULL);

  if (r == 0)
    r = check_range (node, offset, len);
  return r < 0 ? r : node_pwritev (node, offset, len, iov, iovcnt, flags);
}

int
strata_pread (strata_node *node, void *buf, size_t len, uint64_t offset,
              unsigned flags)
{
  struct iovec iov = { .iov_base = buf, .iov_len = len };
  return strata_preadv (node, &iov, 1, offset, flags);
}

int
strata_pwrite (strata_node *node, const void *buf, size_t len, uint64_t offset,
               unsigned flags)
{
  struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
  return strata_pwritev (node, &iov, 1, offset, flags);
}

int
strata_prefetch (strata_node *node, uint64_t offset, uint64_t len,
                 unsigned flags)
{
  int r = check_flags ("strata_prefetch", flags, STRATA_PREFETCH_MASK, NULL);

  if (r == 0)
    r = check_range (node, offset, len);
  return r < 0 ? r : node_prefetch (node, offset, len);
}

int
strata_copy_up (strata_node *top, strata_node *base, uint64_t offset,
                uint64_t len, uint64_t *copied, unsigned flags)
{
  int r = check_flags ("strata_copy_up", flags, STRATA_COPY_UP_MASK, NULL);

  if (copied)
    *copied = 0;
  if (r == 0)
    r = check_range (top, offset, len);
  if (r < 0)
    return r;
  top = node_skip_filters (top);
  if (base && !chain_contains (top, base))
    return io_error (EINVAL, "%s: the base '%s' is not in its backing chain",
                     top->filename, base->filename);
  if (top->read_only)
    return io_error (EPERM, "%s: the image is opened read-only",
                     top->filename);
  return node_copy_up (top, base, offset, len, copied);
}

int
strata_pwrite_zeroes (strata_node *node, uint64_t offset, uint64_t len,
                      unsigned flags)
{
  int r
      = check_flags ("strata_pwrite_zeroes", flags, STRATA_ZEROES_MASK, NULL);

  if (r == 0)
    r = check_range (node, offset, len);
  return r < 0 ? r : node_pwrite_zeroes (node, offset, len, flags);
}

int
strata_pdiscard (strata_node *node, uint64_t offset, uint64_t len,
                 unsigned flags)
{
  int r = check_flags ("strata_pdiscard", flags, STRATA_DISCARD_MASK, NULL);

  if (r == 0)
    r = check_range (node, offset, len);
  return r < 0 ? r : node_pdiscard (node, offset, len, 0);
}

int
strata_flush (strata_node *node, unsigned flags)
{
  int r = check_flags ("strata_flush", flags, STRATA_FLUSH_MASK, NULL);

  return r < 0 ? r : node_flush (node_resolve (node));
}

/* An extent of LEN bytes at DEPTH that reads as zeros and is allocated
 * nowhere.  Unallocated zeros keep the host offset their layer gave in BS
 * (an extended L2 entry's unallocated subclusters), as qemu-img map shows
 * it; BS is NULL past the end of a node. */
static int
zero_extent (struct strata_extent *ext, uint64_t len, int depth,
             const struct bstat *bs)
{
  *ext = (struct strata_extent){
    .size = ext->size, .length = len, .flags = STRATA_BS_ZERO, .depth = depth
  };
  if (bs && (bs->flags & BS_OFFSET) && bs->file) {
    ext->flags |= STRATA_BS_OFFSET;
    ext->map = bs->map;
    ext->file = bs->file->filename;
  }
  return 0;
}

/* Walk down filters and backing edges until a layer defines the range. */
int
strata_block_status (strata_node *node, uint64_t offset, uint64_t len,
                     struct strata_extent *ext, unsigned flags)
{
  int r = check_flags ("strata_block_status", flags, STRATA_BLOCK_STATUS_MASK,
                       NULL);
  int depth = 0;

  if (r < 0)
    return r;
  node = node_resolve (node);
  if (!check_size ("strata_block_status", ext->size,
                   sizeof (struct strata_extent), NULL))
    return -EINVAL;
  if ((r = check_range (node, offset, len)) < 0)
    return r;
  if (len == 0)
    return io_error (EINVAL, "block status of an empty range");
  for (;;) {
    struct bstat bs;
    int64_t size;

    node = node_skip_filters (node);
    size = node_length (node);
    if (size < 0)
      return (int)size;
    if ((uint64_t)size <= offset) {
      /* Past the end of a shorter backing file: reads as zeros. */
      return zero_extent (ext, len, depth, NULL);
    }
    len = MIN (len, (uint64_t)size - offset);
    r = node_block_status_flags (node, offset, len, &bs,
                                 flags & STRATA_BS_SHALLOW);
    if (r < 0)
      return r;
    len = bs.pnum;
    if (!(bs.flags & BS_ALLOCATED) && node->backing) {
      /* Unallocated here, over a backing file that ends before OFFSET:
       * zeros of this layer, unallocated (qemu-img map's depth; QEMU's
       * block status sets ZERO when the backing file is shorter).  An
       * extent that crosses the end is cut there below. */
      int64_t bsize = node_length (node_skip_filters (node->backing));
      if (bsize < 0)
        return (int)bsize;
      if ((uint64_t)bsize <= offset)
        return zero_extent (ext, len, depth, &bs);
    }
    if (!(bs.flags & BS_ALLOCATED) && !node->backing)
      return zero_extent (ext, len, depth, &bs); /* nothing below */
    if (bs.flags & BS_ALLOCATED) {
      *ext = (struct strata_extent){
        .size = ext->size,
        .length = len,
        .flags = bs.flags
                 & (STRATA_BS_ALLOCATED | STRATA_BS_ZERO | STRATA_BS_DATA
                    | STRATA_BS_OFFSET),
        .depth = depth,
        .map = bs.map,
        .file = (bs.flags & BS_OFFSET) && bs.file ? bs.file->filename : NULL,
      };
      return 0;
    }
    node = node->backing;
    depth++;
  }
}

bool
strata_truncate (strata_node *node, uint64_t size, unsigned flags,
                 strata_error **errp)
{
  if (check_flags ("strata_truncate", flags, STRATA_TRUNCATE_MASK, errp) < 0)
    return false;
  return node_truncate (node, size, flags, errp);
}

/* Reopen NODE and its `file` chain.  Going read-write, the bottom goes
 * first so a format never writes through a read-only file; going
 * read-only, the top goes first so it can flush its metadata. */
static bool
node_reopen (strata_node *node, bool rw, strata_error **errp)
{
  bool was_rw = !node->read_only;
  unsigned perm = node->perm;

  if (rw == was_rw)
    return true;
  if (rw && (node->open_flags & STRATA_OPEN_FORCE_SHARE)) {
    error_set (errp, EINVAL,
               "%s: cannot reopen read-write: the image was "
               "opened with force-share",
               node->filename);
    return false;
  }
  if (rw && node->file && !node_reopen (node->file, true, errp))
    return false;
  if (!rw) {
    int r = node_flush (node);
    if (r < 0) {
      error_set (errp, -r, "%s: cannot flush before reopening read-only",
                 node->filename);
      return false;
    }
  }
  node->perm = rw ? perm | PERM_WRITE | PERM_RESIZE
                  : perm & ~(PERM_WRITE | PERM_RESIZE);
  node->read_only = !rw;
  if (node->drv->reopen && !node->drv->reopen (node, rw, errp)) {
    node->perm = perm;
    node->read_only = !was_rw;
    if (rw && node->file)
      node_reopen (node->file, false, NULL);
    return false;
  }
  if (rw)
    node->open_flags |= STRATA_OPEN_RDWR;
  else
    node->open_flags &= ~STRATA_OPEN_RDWR;
  if (!rw && node->file && !node_reopen (node->file, false, errp))
    return false;
  return true;
}

bool
strata_reopen (strata_node *node, bool read_write, unsigned flags,
               strata_error **errp)
{
  if (check_flags ("strata_reopen", flags, STRATA_REOPEN_MASK, errp) < 0)
    return false;
  tracker_wait_idle (&node->tracker, 0, 0);
  return node_reopen (node, read_write, errp);
}

/* The whole struct strata_info of this library for NODE. */
static bool
get_info_full (strata_node *node, struct strata_info *info,
               strata_error **errp)
{
  int64_t size = node_length (node);
  strata_node *bottom = node;

  if (size < 0) {
    error_set (errp, -size, "%s: cannot get the image length", node->filename);
    return false;
  }
  *info = (struct strata_info){
    .size = sizeof *info,
    .format = node->drv->name,
    .filename = node->filename,
    .virtual_size = size,
    .read_only = node->read_only,
    .has_backing = node->backing != NULL,
    .full_backing_filename = node->backing ? node->backing->filename : NULL,
  };
  if (node->drv->get_info && !node->drv->get_info (node, info, errp))
    return false;
  /* QEMU reports a protocol name as recorded, not as the opened node
   * names it. */
  if (info->backing_filename && driver_for_filename (info->backing_filename))
    info->full_backing_filename = info->backing_filename;
  while (bottom->file)
    bottom = bottom->file;
  if (bottom != node && bottom->drv->get_info) {
    struct strata_info b = { 0 };
    if (!bottom->drv->get_info (bottom, &b, errp))
      return false;
    info->actual_size = b.actual_size;
    info->actual_size_unknown = b.actual_size_unknown;
    info->cache_direct = b.cache_direct;
    info->cache_no_flush = b.cache_no_flush;
    /* A format with no information of its own (raw) passes the
     * protocol's on, as QEMU's bdrv_get_info() does. */
    if (!node->drv->get_info)
      info->dirty_unknown = b.dirty_unknown;
  }
  return true;
}

bool
strata_get_info (strata_node *node, struct strata_info *info, unsigned flags,
                 strata_error **errp)
{
  struct strata_info full;

  if (check_flags ("strata_get_info", flags, STRATA_GET_INFO_MASK, errp) < 0
      || !check_size ("strata_get_info", info->size, sizeof full, errp)
      || !get_info_full (node, &full, errp))
    return false;
  copy_sized (info, &full, sizeof full, info->size);
  return true;
}

bool
strata_get_qcow2_info (strata_node *node, struct strata_qcow2_info *info,
                       unsigned flags, strata_error **errp)
{
  struct strata_qcow2_info full = { .size = sizeof full };

  if (check_flags ("strata_get_qcow2_info", flags, STRATA_GET_QCOW2_INFO_MASK,
                   errp)
          < 0
      || !check_size ("strata_get_qcow2_info", info->size, sizeof full, errp))
    return false;
  node = node_skip_filters (node);
  if (!node->drv->get_format_info
      || !node->drv->get_format_info (node, "qcow2", &full, errp)) {
    if (errp && !*errp)
      error_set (errp, ENOTSUP, "%s: not a qcow2 image", node->filename);
    return false;
  }
  copy_sized (info, &full, sizeof full, info->size);
  return true;
}

bool
strata_check (strata_node *node, struct strata_check_result *res,
              strata_message_fn message, void *opaque, unsigned flags,
              strata_error **errp)
{
  struct strata_check_result full = { .size = sizeof full };
  int r;

  if (check_flags ("strata_check", flags, STRATA_CHECK_MASK, errp) < 0
      || !check_size ("strata_check", res->size, sizeof full, errp))
    return false;
  node = node_skip_filters (node);
  if (!node->drv->check) {
    error_set (errp, ENOTSUP, "This image format does not support checks");
    return false;
  }
  if (flags && node->read_only) {
    error_set (errp, EROFS, "%s: cannot repair an image opened read-only",
               node->filename);
    return false;
  }
  tracker_wait_idle (&node->tracker, 0, 0);
  r = node->drv->check (node, &full, flags, message, opaque, errp);
  if (r < 0 && errp && !*errp)
    error_set (errp, -r, "%s: check failed", node->filename);
  copy_sized (res, &full, sizeof full, res->size);
  return r >= 0;
}

strata_node *
strata_backing (strata_node *node)
{
  return chain_backing (node);
}

strata_node *
strata_chain_find (strata_node *top, const char *name, unsigned flags,
                   int *depth, strata_error **errp)
{
  strata_node *layer;

  if (check_flags ("strata_chain_find", flags, STRATA_CHAIN_FIND_MASK, errp)
      < 0)
    return NULL;
  if (!flags) {
    error_set (errp, EINVAL, "strata_chain_find: no matching rule in flags");
    return NULL;
  }
  if (!(layer = chain_find_file (top, name, flags, NULL))) {
    error_set (errp, ENOENT, "Did not find '%s' in the backing chain of '%s'",
               name, top->filename);
    return NULL;
  }
  if (depth)
    *depth = chain_depth (top, layer);
  return layer;
}

strata_node *
strata_chain_find_node (strata_node *top, const char *node_name,
                        unsigned flags, strata_error **errp)
{
  strata_node *n;

  if (check_flags ("strata_chain_find_node", flags,
                   STRATA_CHAIN_FIND_NODE_MASK, errp)
      < 0)
    return NULL;
  if (!(n = chain_find_node (top, node_name)))
    error_set (errp, ENOENT, "Node '%s' is not in the backing chain of '%s'",
               node_name, top->filename);
  return n;
}

char *
strata_chain_backing_name (strata_node *top, strata_node *layer,
                           unsigned flags, strata_error **errp)
{
  char *name;

  if (check_flags ("strata_chain_backing_name", flags,
                   STRATA_CHAIN_BACKING_NAME_MASK, errp)
      < 0)
    return NULL;
  if (!(name = chain_backing_name_for (top, layer)))
    error_set_errno (errp, errno, "%s", layer->filename);
  return name;
}

/* Every key of OPTS is one of DRV's creation options. */
static bool
create_options_check (const struct strata_driver *drv, strata_opts *opts,
                      const char *filename, strata_error **errp)
{
  for (size_t i = 0; i < opts->n; i++) {
    const char *const *k = drv->create_options;

    while (k && *k && strcmp (*k, opts->v[i].key) != 0)
      k++;
    if (!k || !*k) {
      error_set (errp, EINVAL, "%s: Invalid parameter '%s'", filename,
                 opts->v[i].key);
      return false;
    }
  }
  return true;
}

bool
strata_create (const char *filename, const char *format, const char *options,
               unsigned flags, strata_error **errp)
{
  const struct strata_driver *drv = format ? driver_find (format) : NULL;
  strata_opts *opts;
  bool ok;

  if (check_flags ("strata_create", flags, STRATA_CREATE_MASK, errp) < 0)
    return false;
  if (!drv) {
    error_set (errp, EINVAL, "%s: Unknown file format '%s'", filename,
               format ? format : "(none)");
    return false;
  }
  if (!drv->create) {
    error_set (errp, ENOTSUP,
               "%s: format '%s' does not support image "
               "creation",
               filename, format);
    return false;
  }
  if (!(opts = opts_new ())) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  ok = !options || opts_parse (opts, options, errp);
  /* Refuse unknown options before anything touches the disk. */
  ok = ok && create_options_check (drv, opts, filename, errp);
  if (!(flags & STRATA_CREATE_DRY_RUN))
    ok = ok && drv->create (filename, opts, errp);
  opts_free (opts);
  return ok;
}

/* ---- chain edits, snapshots, amend, measure: thin wrappers ---- */

static bool
unsupported (strata_node *node, const char *what, strata_error **errp)
{
  error_set (errp, ENOTSUP, "%s: format '%s' does not support %s",
             node->filename, node->drv->name, what);
  return false;
}

bool
strata_change_backing_file (strata_node *node, const char *backing_file,
                            const char *backing_fmt, unsigned flags,
                            strata_error **errp)
{
  if (check_flags ("strata_change_backing_file", flags,
                   STRATA_CHANGE_BACKING_MASK, errp)
      < 0)
    return false;
  return node_change_backing_file (node_skip_filters (node), backing_file,
                                   backing_fmt, errp);
}

bool
strata_make_empty (strata_node *node, unsigned flags, strata_error **errp)
{
  if (check_flags ("strata_make_empty", flags, STRATA_MAKE_EMPTY_MASK, errp)
      < 0)
    return false;
  return node_make_empty (node_skip_filters (node), errp);
}

bool
strata_snapshot_list (strata_node *node, struct strata_snapshot_info ***list,
                      size_t *n, unsigned flags, strata_error **errp)
{
  struct strata_snapshot_info *arr = NULL;
  int count = 0;

  *list = NULL;
  *n = 0;
  if (check_flags ("strata_snapshot_list", flags, STRATA_SNAPSHOT_MASK, errp)
      < 0)
    return false;
  node = node_skip_filters (node);
  if (node->drv->snapshot_list
      && (count = node->drv->snapshot_list (node, &arr, errp)) < 0)
    return false;
  /* One allocation per snapshot, so that the struct can grow. */
  if (!(*list = calloc (count ? count : 1, sizeof **list))) {
    error_set (errp, ENOMEM, "out of memory");
    goto fail;
  }
  for (int i = 0; i < count; i++) {
    if (!((*list)[i] = malloc (sizeof *arr))) {
      error_set (errp, ENOMEM, "out of memory");
      goto fail;
    }
    *(*list)[i] = arr[i];
    (*list)[i]->size = sizeof *arr;
    arr[i].id = arr[i].name = NULL;
    ++*n;
  }
  free (arr);
  return true;

fail:
  for (int i = *n; i < count; i++) {
    free (arr[i].id);
    free (arr[i].name);
  }
  free (arr);
  strata_snapshot_list_free (*list, *n);
  *list = NULL;
  *n = 0;
  return false;
}

void
strata_snapshot_list_free (struct strata_snapshot_info **list, size_t n)
{
  for (size_t i = 0; list && i < n; i++) {
    free (list[i]->id);
    free (list[i]->name);
    free (list[i]);
  }
  free (list);
}

bool
strata_snapshot_create (strata_node *node, const char *name, unsigned flags,
                        strata_error **errp)
{
  if (check_flags ("strata_snapshot_create", flags, STRATA_SNAPSHOT_MASK, errp)
      < 0)
    return false;
  node = node_skip_filters (node);
  if (!node->drv->snapshot_create)
    return unsupported (node, "internal snapshots", errp);
  return node->drv->snapshot_create (node, name, errp);
}

bool
strata_snapshot_apply (strata_node *node, const char *name, unsigned flags,
                       strata_error **errp)
{
  if (check_flags ("strata_snapshot_apply", flags, STRATA_SNAPSHOT_MASK, errp)
      < 0)
    return false;
  node = node_skip_filters (node);
  if (!node->drv->snapshot_apply)
    return unsupported (node, "internal snapshots", errp);
  return node->drv->snapshot_apply (node, name, errp);
}

bool
strata_snapshot_delete (strata_node *node, const char *name, unsigned flags,
                        strata_error **errp)
{
  if (check_flags ("strata_snapshot_delete", flags, STRATA_SNAPSHOT_MASK, errp)
      < 0)
    return false;
  node = node_skip_filters (node);
  if (!node->drv->snapshot_delete)
    return unsupported (node, "internal snapshots", errp);
  return node->drv->snapshot_delete (node, name, errp);
}

bool
strata_amend (strata_node *node, const char *options, unsigned flags,
              strata_error **errp)
{
  CLEANUP_OPTS strata_opts *opts = NULL;

  if (check_flags ("strata_amend", flags, STRATA_AMEND_MASK, errp) < 0)
    return false;
  node = node_skip_filters (node);
  if (!node->drv->amend)
    return unsupported (node, "amend", errp);
  if (!(opts = opts_new ())) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  if (!opts_parse (opts, options ? options : "", errp)
      || !create_options_check (node->drv, opts, node->filename, errp))
    return false;
  return node->drv->amend (node, opts, errp);
}

bool
strata_measure (const char *format, const char *options, strata_node *src,
                uint64_t *required, uint64_t *fully_allocated, unsigned flags,
                strata_error **errp)
{
  const struct strata_driver *drv = format ? driver_find (format) : NULL;
  CLEANUP_OPTS strata_opts *opts = NULL;

  if (check_flags ("strata_measure", flags, STRATA_MEASURE_MASK, errp) < 0)
    return false;
  if (!drv) {
    error_set (errp, EINVAL, "Unknown file format '%s'",
               format ? format : "(none)");
    return false;
  }
  if (!drv->measure) {
    error_set (errp, ENOTSUP,
               "Block driver '%s' does not support size "
               "measurement",
               format);
    return false;
  }
  if (!(opts = opts_new ())) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  if (!opts_parse (opts, options ? options : "", errp)
      || !create_options_check (drv, opts, format, errp))
    return false;
  return drv->measure (opts, src, required, fully_allocated, errp);
}

bool
strata_bitmap_list (strata_node *node, struct strata_bitmap_info ***list,
                    size_t *n, unsigned flags, strata_error **errp)
{
  *list = NULL;
  *n = 0;
  if (check_flags ("strata_bitmap_list", flags, STRATA_BITMAP_LIST_MASK, errp)
      < 0)
    return false;
  node = node_skip_filters (node);
  if (!node->drv->bitmap_list)
    return unsupported (node, "persistent bitmaps", errp);
  return node->drv->bitmap_list (node, list, n, errp);
}

/* QEMU's bdrv_get_default_bitmap_granularity. */
static uint64_t
default_granularity (strata_node *node)
{
  struct strata_info info = { 0 };

  if (node->drv->get_info && node->drv->get_info (node, &info, NULL)
      && info.cluster_size)
    return MIN (MAX (info.cluster_size, 4096), 65536);
  return 65536;
}

static const char *
node_label (strata_node *node)
{
  return node->node_name ? node->node_name : node->filename;
}

bool
strata_bitmap_add (strata_node *node, const char *name, uint64_t granularity,
                   unsigned flags, strata_error **errp)
{
  bool persistent = !(flags & STRATA_BITMAP_ADD_TRANSIENT);

  if (check_flags ("strata_bitmap_add", flags, STRATA_BITMAP_ADD_MASK, errp)
      < 0)
    return false;
  node = node_skip_filters (node);
  if (!granularity)
    granularity = default_granularity (node);
  if (granularity < DIRTY_MIN_GRANULARITY || (granularity & (granularity - 1))
      || granularity > DIRTY_MAX_GRANULARITY) {
    error_set (errp, EINVAL,
               "Granularity must be power of 2 and at least 512");
    return false;
  }
  if (persistent && node_bitmap_find (node, name, NULL)) {
    error_set (errp, EEXIST, "Bitmap already exists: %s", name);
    return false;
  }
  if (persistent && !node->drv->bitmap_can_store) {
    error_set (errp, ENOTSUP,
               "Can't store persistent bitmaps to %s: Operation not "
               "supported",
               node_label (node));
    return false;
  }
  if (persistent
      && !node->drv->bitmap_can_store (node, name, granularity, errp)) {
    error_prepend (errp, "Can't make bitmap '%s' persistent in '%s'", name,
                   node_label (node));
    return false;
  }
  return node_bitmap_add (node, name, granularity,
                          (persistent ? DIRTY_PERSISTENT : 0)
                              | (flags & STRATA_BITMAP_ADD_DISABLED
                                     ? DIRTY_DISABLED
                                     : 0),
                          errp)
         != NULL;
}

/* NAME on NODE, usable by the commands that change it (QEMU's
 * bdrv_dirty_bitmap_check). */
static struct dirty_bitmap *
usable_bitmap (strata_node *node, const char *name, strata_error **errp)
{
  struct dirty_bitmap *bm = node_bitmap_find (node, name, errp);

  if (bm && dirty_busy (bm)) {
    error_set (errp, EBUSY,
               "Bitmap '%s' is currently in use by another operation and "
               "cannot be used",
               name);
    return NULL;
  }
  if (bm && (dirty_flags (bm) & DIRTY_INCONSISTENT)) {
    error_set (errp, EINVAL,
               "Bitmap '%s' is inconsistent and cannot be used\nTry "
               "block-dirty-bitmap-remove to delete this bitmap from disk",
               name);
    return NULL;
  }
  return bm;
}

bool
strata_bitmap_change (strata_node *node, const char *name,
                      enum strata_bitmap_op op, unsigned flags,
                      strata_error **errp)
{
  struct dirty_bitmap *bm;

  if (check_flags ("strata_bitmap_change", flags, 0, errp) < 0)
    return false;
  node = node_skip_filters (node);
  if (op == STRATA_BITMAP_REMOVE)
    return node_bitmap_remove (node, name, errp);
  if (!(bm = usable_bitmap (node, name, errp)))
    return false;
  switch (op) {
  case STRATA_BITMAP_CLEAR: dirty_clear_all (bm); break;
  case STRATA_BITMAP_ENABLE: dirty_set_flag (bm, DIRTY_DISABLED, false); break;
  case STRATA_BITMAP_DISABLE: dirty_set_flag (bm, DIRTY_DISABLED, true); break;
  default:
    error_set (errp, EINVAL, "strata_bitmap_change: unknown operation %d",
               (int)op);
    return false;
  }
  return true;
}

bool
strata_bitmap_merge (strata_node *node, const char *name, strata_node *src,
                     const char *source, unsigned flags, strata_error **errp)
{
  struct dirty_bitmap *dst, *from;

  if (check_flags ("strata_bitmap_merge", flags, 0, errp) < 0)
    return false;
  node = node_skip_filters (node);
  src = node_skip_filters (src);
  if (!(dst = usable_bitmap (node, name, errp))
      || !(from = node_bitmap_find (src, source, errp)))
    return false;
  if (dirty_flags (from) & DIRTY_INCONSISTENT) {
    error_set (errp, EINVAL,
               "Bitmap '%s' is inconsistent and cannot be used\nTry "
               "block-dirty-bitmap-remove to delete this bitmap from disk",
               source);
    return false;
  }
  return dirty_merge (dst, from, errp);
}

void
strata_bitmap_list_free (struct strata_bitmap_info **list)
{
  if (!list)
    return;
  for (size_t i = 0; list[i]; i++) {
    free (list[i]->name);
    free (list[i]);
  }
  free (list);
}

bool
strata_driver_exists (const char *name)
{
  return name && driver_find (name);
}
