/* strata: the block-node core.
 *
 * Opening builds a node from options, opening the `file` child first for
 * drivers that have one and probing the format when none is named.  Every
 * request passes through the node's request tracker.  The public strata_*
 * data-path functions check ranges against the image length once, for
 * every layer below; the node_* functions used between layers check only
 * for overflow, because a format legitimately grows its file.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/dirty.h"
#include "block/graph.h"
#include "block/node.h"
#include "util/checked.h"
#include "util/cleanup.h"

const struct strata_driver *
driver_find (const char *name)
{
  for (size_t i = 0; i < driver_count; i++)
    if (strcmp (driver_list[i]->name, name) == 0)
      return driver_list[i];
  return NULL;
}

const struct strata_driver *
driver_for_filename (const char *name)
{
  for (size_t i = 0; i < driver_count; i++)
    if (driver_list[i]->claims_filename
        && driver_list[i]->claims_filename (name))
      return driver_list[i];
  return NULL;
}

const char *
perm_name (unsigned i)
{
  static const char *const names[PERM_COUNT] = {
    "consistent read",
    "write",
    "write unchanged",
    "resize",
  };
  return i < PERM_COUNT ? names[i] : "unknown";
}

/* ---- graph ---- */

void
node_ref (strata_node *node)
{
  atomic_fetch_add (&node->refcnt, 1);
}

static void
node_free (strata_node *node)
{
  /* After the driver's close stored the persistent ones. */
  node_bitmaps_drop (node);
  graph_unregister (node);
  for (int i = 0; i < node->nchildren; i++) {
    node_unref (node->children[i].node);
    free (node->children[i].name);
  }
  if (node->replaced_by)
    node_unref (node->replaced_by);
  tracker_destroy (&node->tracker);
  pthread_mutex_destroy (&node->lock);
  for (size_t i = 0; i < node->nusers; i++)
    free (node->users[i]);
  free (node->users);
  free (node->opaque);
  free (node->node_name);
  free (node->filename);
  free (node);
}

void
node_unref (strata_node *node)
{
  if (!node || atomic_fetch_sub (&node->refcnt, 1) != 1)
    return;
  tracker_wait_idle (&node->tracker, 0, 0);
  if (node->drv->close)
    node->drv->close (node);
  node_free (node);
}

static void
node_update_child_pointers (strata_node *parent)
{
  parent->file = parent->backing = NULL;
  for (int i = 0; i < parent->nchildren; i++) {
    if (strcmp (parent->children[i].name, "file") == 0)
      parent->file = parent->children[i].node;
    else if (strcmp (parent->children[i].name, "backing") == 0)
      parent->backing = parent->children[i].node;
  }
}

bool
node_attach_child (strata_node *parent, const char *name, strata_node *child,
                   strata_error **errp)
{
  char *n;

  for (int i = 0; i < parent->nchildren; i++) {
    if (strcmp (parent->children[i].name, name) == 0) {
      error_set (errp, EEXIST, "node already has a '%s' child", name);
      return false;
    }
  }
  if (parent->nchildren == NODE_MAX_CHILDREN || !(n = strdup (name))) {
    error_set (errp, ENOMEM, "cannot attach child '%s'", name);
    return false;
  }
  parent->children[parent->nchildren++] = (struct strata_child){ n, child };
  node_update_child_pointers (parent);
  return true;
}

void
node_detach_child (strata_node *parent, const char *name)
{
  for (int i = 0; i < parent->nchildren; i++) {
    if (strcmp (parent->children[i].name, name) == 0) {
      node_unref (parent->children[i].node);
      free (parent->children[i].name);
      parent->children[i] = parent->children[--parent->nchildren];
      break;
    }
  }
  node_update_child_pointers (parent);
}

void
node_cache_mode (strata_node *node, bool *direct, bool *no_flush)
{
  struct strata_info info = { 0 };
  strata_error *err = NULL;

  while (node->file)
    node = node->file;
  if (node->drv->get_info && !node->drv->get_info (node, &info, &err))
    strata_error_free (err);
  *direct = info.cache_direct;
  *no_flush = info.cache_no_flush;
}

int64_t
node_allocated_size (strata_node *node)
{
  struct strata_info info = { 0 };
  strata_error *err = NULL;

  while (node->file)
    node = node->file;
  if (!node->drv->get_info)
    return -ENOTSUP;
  if (!node->drv->get_info (node, &info, &err)) {
    int r = -strata_error_errno (err);
    strata_error_free (err);
    return r < 0 ? r : -EIO;
  }
  if (info.actual_size_unknown || info.actual_size > INT64_MAX)
    return -ENOTSUP;
  return (int64_t)info.actual_size;
}

/* ---- opening ---- */

static atomic_uint node_counter;

static const struct strata_driver *
probe_format (strata_node *file, strata_error **errp)
{
  uint8_t buf[512] = { 0 };
  const struct strata_driver *best = NULL;
  int best_score = 0, r;
  int64_t len = node_length (file);

  if (len < 0) {
    error_set (errp, -len, "%s: cannot get the length to probe the format",
               file->filename);
    return NULL;
  }
  r = node_pread (file, 0, buf, MIN ((uint64_t)len, sizeof buf), 0);
  if (r < 0) {
    error_set (errp, -r, "%s: cannot read the header to probe the format: %s",
               file->filename, strerror (-r));
    return NULL;
  }
  for (size_t i = 0; i < driver_count; i++) {
    const struct strata_driver *d = driver_list[i];
    int score = d->probe ? d->probe (buf, sizeof buf) : 0;
    if (score > best_score) {
      best_score = score;
      best = d;
    }
  }
  if (!best)
    error_set (errp, EINVAL, "%s: cannot determine the image format",
               file->filename);
  return best;
}

/* Read the generic options every node accepts. */
static bool
node_common_options (strata_opts *opts, unsigned *flags, strata_error **errp)
{
  bool ro, fs;

  if (!opts_get_bool (opts, "read-only", !(*flags & STRATA_OPEN_RDWR), &ro,
                      errp)
      || !opts_get_bool (opts, "force-share",
                         !!(*flags & STRATA_OPEN_FORCE_SHARE), &fs, errp))
    return false;
  if (fs && !ro) {
    error_set (errp, EINVAL,
               "force-share=on can only be used with read-only images");
    return false;
  }
  *flags = (*flags & ~(STRATA_OPEN_RDWR | STRATA_OPEN_FORCE_SHARE))
           | (ro ? 0 : STRATA_OPEN_RDWR) | (fs ? STRATA_OPEN_FORCE_SHARE : 0);
  return true;
}

static strata_node *
node_alloc (const struct strata_driver *drv, const char *name, unsigned flags)
{
  strata_node *node = calloc (1, sizeof *node);

  if (!node)
    return NULL;
  node->opaque = drv->state_size ? calloc (1, drv->state_size) : NULL;
  if (name)
    node->node_name = strdup (name);
  else if (asprintf (&node->node_name, "#block%03u",
                     atomic_fetch_add (&node_counter, 1))
           < 0)
    node->node_name = NULL;
  if ((drv->state_size && !node->opaque) || !node->node_name) {
    free (node->opaque);
    free (node->node_name);
    free (node);
    return NULL;
  }
  node->drv = drv;
  node->open_flags = flags;
  node->read_only = !(flags & STRATA_OPEN_RDWR);
  node->perm = PERM_CONSISTENT_READ;
  if (!node->read_only)
    node->perm |= PERM_WRITE | PERM_RESIZE;
  node->shared = (flags & STRATA_OPEN_FORCE_SHARE)
                     ? PERM_ALL
                     : PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;
  atomic_init (&node->refcnt, 1);
  tracker_init (&node->tracker);
  pthread_mutex_init (&node->lock, NULL);
  return node;
}

/* An existing node used as the `file` child of a new node opened with
 * FLAGS.  A writer needs a writable child that no other parent uses as its
 * `file` (both would allocate from it), as QEMU's permission check
 * decides for formats over one file; a filter (FILTER, or the other
 * parent) shares everything, as QEMU's filters do. */
static strata_node *
node_use_by_name (const char *name, const char *user, unsigned flags,
                  bool filter, strata_error **errp)
{
  strata_node *file = graph_lookup (name);
  struct graph_edge e[NODE_MAX_CHILDREN];
  int n;

  if (!file) {
    error_set (errp, ENOENT, "Cannot find device='%s' nor node-name='%s'",
               name, name);
    return NULL;
  }
  if ((flags & STRATA_OPEN_RDWR) && file->read_only) {
    error_set (errp, EROFS, "Block node is read-only");
    node_unref (file);
    return NULL;
  }
  n = graph_parents (file, e, NODE_MAX_CHILDREN);
  for (int i = 0; i < n && i < NODE_MAX_CHILDREN; i++) {
    if (strcmp (e[i].child_name, "file") != 0 || filter
        || e[i].parent->drv->is_filter)
      continue;
    if (!e[i].parent->read_only || (flags & STRATA_OPEN_RDWR)) {
      const char *old = e[i].parent->node_name, *new = user ?: "(new)";
      bool old_writes = !e[i].parent->read_only;
      error_set (errp, EBUSY,
                 "Permission conflict on node '%s': "
                 "permissions 'write, resize' are both required by node "
                 "'%s' (uses node '%s' as 'file' child) and unshared by "
                 "node '%s' (uses node '%s' as 'file' child).",
                 name, old_writes ? old : new, name, old_writes ? new : old,
                 name);
      node_unref (file);
      return NULL;
    }
  }
  return file;
}

strata_node *
node_open (strata_opts *opts, unsigned flags, strata_error **errp)
{
  const struct strata_driver *drv = NULL;
  const char *drvname, *name;
  strata_node *file = NULL, *node;
  strata_opts *file_opts;
  const char *what, *file_ref;

  if (!node_common_options (opts, &flags, errp))
    return NULL;
  drvname = opts_get (opts, "driver");
  name = opts_get (opts, "node-name");
  if (drvname && !(drv = driver_find (drvname))) {
    error_set (errp, EINVAL, "Unknown driver '%s'", drvname);
    return NULL;
  }
  bool probed = false;

  if (name && !graph_name_check (name, errp))
    return NULL;
  file_ref = opts_get (opts, "file");
  file_opts = opts_extract (opts, "file");
  if (!file_opts) {
    error_set (errp, ENOMEM, "out of memory");
    return NULL;
  }
  if (file_ref && (file_opts->n || (drv && !drv->has_file_child))) {
    error_set (errp, EINVAL, "%s: 'file' names a node and gives options",
               file_ref);
    opts_free (file_opts);
    return NULL;
  }
  if (!drv || drv->has_file_child) {
    if (file_ref)
      file = node_use_by_name (file_ref, name, flags, drv && drv->is_filter,
                               errp);
    else if (file_opts->n == 0) {
      error_set (errp, EINVAL, "%s: a 'file' child is required",
                 drvname ? drvname : "image");
      opts_free (file_opts);
      return NULL;
    }
    else if (!opts_has (file_opts, "driver")
             && !opts_set (file_opts, "driver", "file")) {
      opts_free (file_opts);
      error_set (errp, ENOMEM, "out of memory");
      return NULL;
    }
    else
      file = node_open (file_opts, flags & ~STRATA_OPEN_NO_BACKING, errp);
    opts_free (file_opts);
    if (!file)
      return NULL;
    if (!drv) {
      if (!(drv = probe_format (file, errp))) {
        node_unref (file);
        return NULL;
      }
      probed = true;
    }
  }
  else if (file_opts->n) {
    error_set (errp, EINVAL, "%s: driver '%s' takes no 'file' child",
               opts_get (file_opts, "filename") ?: "image", drv->name);
    opts_free (file_opts);
    return NULL;
  }
  else
    opts_free (file_opts);

  node = node_alloc (drv, name, flags);
  if (!node) {
    node_unref (file);
    error_set (errp, ENOMEM, "out of memory");
    return NULL;
  }
  node->format_probed = probed;
  if (!graph_register (node, errp)) {
    node_unref (file);
    node_free (node);
    return NULL;
  }
  if (file) {
    if (!node_attach_child (node, "file", file, errp)) {
      node_unref (file);
      node_free (node);
      return NULL;
    }
    node->filename = strdup (file->filename);
  }
  if (!drv->open (node, opts, flags, errp)) {
    node_free (node);
    return NULL;
  }
  what = node->filename ? node->filename : drv->name;
  if (!opts_check_used (opts, what, errp)) {
    node_unref (node);
    return NULL;
  }
  return node;
}

/* A copy-on-read filter over NODE, taking over the caller's reference
 * (STRATA_OPEN_COPY_ON_READ: qemu-io -C). */
static strata_node *
node_wrap_copy_on_read (strata_node *node, unsigned flags, strata_error **errp)
{
  strata_opts *opts = opts_new ();
  strata_node *cor = NULL;

  if (!opts || !opts_set (opts, "driver", "copy-on-read")
      || !opts_set (opts, "file", node->node_name))
    error_set (errp, ENOMEM, "out of memory");
  else
    cor = node_open (opts, flags, errp);
  opts_free (opts);
  node_unref (node); /* the filter holds its own */
  return cor;
}

strata_node *
node_open_image (const char *filename, const char *format, strata_opts *extra,
                 unsigned flags, strata_error **errp)
{
  strata_opts *opts = opts_new ();
  const struct strata_driver *drv = format ? driver_find (format) : NULL;
  const struct strata_driver *proto;
  strata_node *node = NULL;
  bool cor = flags & STRATA_OPEN_COPY_ON_READ;
  bool ok;

  if (!opts) {
    error_set (errp, ENOMEM, "out of memory");
    return NULL;
  }
  if (format && !drv) {
    error_set (errp, EINVAL, "Unknown driver '%s'", format);
    opts_free (opts);
    return NULL;
  }
  for (size_t i = 0; extra && i < extra->n; i++)
    if (!opts_set (opts, extra->v[i].key, extra->v[i].value))
      goto oom;
  if (format && !opts_set (opts, "driver", format))
    goto oom;
  if (drv && !drv->has_file_child)
    ok = opts_has (opts, "filename") || opts_set (opts, "filename", filename);
  else if (opts_has (opts, "file.filename"))
    ok = true;
  else if ((proto = driver_for_filename (filename)))
    /* A name a protocol driver claims (an NBD URI) is that protocol's
     * node under the format (raw, qcow2 or probed), as a path is a file
     * node. */
    ok = (opts_has (opts, "file.driver")
          || opts_set (opts, "file.driver", proto->name))
         && opts_set (opts, "file.filename", filename);
  else
    ok = opts_set (opts, "file.filename", filename);
  if (!ok)
    goto oom;
  node = node_open (opts, flags & ~STRATA_OPEN_COPY_ON_READ, errp);
  opts_free (opts);
  if (node && cor)
    node = node_wrap_copy_on_read (node, flags & ~STRATA_OPEN_COPY_ON_READ,
                                   errp);
  return node;

oom:
  opts_free (opts);
  error_set (errp, ENOMEM, "out of memory");
  return NULL;
}

/* ---- data path between nodes ---- */

static int
check_overflow (strata_node *node, uint64_t offset, uint64_t len)
{
  if (offset > INT64_MAX || len > INT64_MAX - offset)
    return io_error (EINVAL,
                     "%s: request at offset %" PRIu64 " length %" PRIu64
                     " overflows",
                     node->filename, offset, len);
  return 0;
}

static int
check_writable (strata_node *node)
{
  if (node->read_only)
    return io_error (EPERM, "%s: the image is opened read-only",
                     node->filename ? node->filename : node->node_name);
  return 0;
}

/* The node that took NODE's place, if one did (node_forward_to). */
static inline strata_node *
forwarded (strata_node *node)
{
  return atomic_load_explicit (&node->replaced_by, memory_order_acquire);
}

void
node_forward_writes_to (strata_node *old, strata_node *new)
{
  old->forward_writes_only = true;
  node_forward_to (old, new);
}

void
node_forward_to (strata_node *old, strata_node *new)
{
  node_ref (new);
  atomic_store_explicit (&old->replaced_by, new, memory_order_release);
}

int
node_preadv (strata_node *node, uint64_t offset, uint64_t len,
             const struct iovec *iov, int iovcnt, unsigned flags)
{
  struct tracked_req req;
  bool track = !(flags & NODE_REQ_SERIALISED);
  strata_node *fwd;
  int r = check_overflow (node, offset, len);

  flags &= ~NODE_REQ_SERIALISED;
  if (r < 0 || len == 0)
    return r;
  if (!node->drv->preadv) {
    if (node->drv->is_filter && node->file)
      return node_preadv (node->file, offset, len, iov, iovcnt, flags);
    return -ENOTSUP;
  }
  if (track)
    tracker_begin (&node->tracker, &req, offset, len, false);
  if ((fwd = forwarded (node)) && !node->forward_writes_only) {
    if (track)
      tracker_end (&node->tracker, &req);
    return node_preadv (fwd, offset, len, iov, iovcnt, flags);
  }
  r = node->drv->preadv (node, offset, len, iov, iovcnt, flags);
  if (track)
    tracker_end (&node->tracker, &req);
  return r;
}

int
node_prefetch (strata_node *node, uint64_t offset, uint64_t len)
{
  int r = check_overflow (node, offset, len);

  if (r < 0 || len == 0)
    return r;
  if (node->drv->prefetch)
    return node->drv->prefetch (node, offset, len);
  if (node->drv->is_filter && node->file)
    return node_prefetch (node->file, offset, len);
  return 0;
}

int
node_pwritev (strata_node *node, uint64_t offset, uint64_t len,
              const struct iovec *iov, int iovcnt, unsigned flags)
{
  struct tracked_req req;
  strata_node *fwd;
  bool track = !(flags & NODE_REQ_SERIALISED);
  int r = check_overflow (node, offset, len);

  if (r == 0)
    r = check_writable (node);
  flags &= ~NODE_REQ_SERIALISED;
  if (r < 0 || len == 0)
    return r;
  if ((flags & STRATA_REQ_COMPRESSED) && !node->drv->pwritev_compressed) {
    if (node->drv->is_filter && node->file)
      return node_pwritev (node->file, offset, len, iov, iovcnt, flags);
    return io_error (ENOTSUP,
                     "%s: the %s format cannot store compressed "
                     "data",
                     node->filename, node->drv->name);
  }
  if (!node->drv->pwritev) {
    if (node->drv->is_filter && node->file)
      return node_pwritev (node->file, offset, len, iov, iovcnt, flags);
    return -ENOTSUP;
  }
  if (track)
    tracker_begin (&node->tracker, &req, offset, len, false);
  if ((fwd = forwarded (node))) {
    if (track)
      tracker_end (&node->tracker, &req);
    return node_pwritev (fwd, offset, len, iov, iovcnt, flags);
  }
  if (flags & STRATA_REQ_COMPRESSED)
    r = node->drv->pwritev_compressed (node, offset, len, iov, iovcnt,
                                       flags & ~STRATA_REQ_COMPRESSED);
  else
    r = node->drv->pwritev (node, offset, len, iov, iovcnt, flags);
  node_dirty_write (node, NODE_WRITE_DATA, offset, len, iov, iovcnt, r);
  if (track)
    tracker_end (&node->tracker, &req);
  return r;
}

int
node_pread (strata_node *node, uint64_t offset, void *buf, size_t len,
            unsigned flags)
{
  struct iovec iov = { .iov_base = buf, .iov_len = len };
  return node_preadv (node, offset, len, &iov, 1, flags);
}

int
node_pwrite (strata_node *node, uint64_t offset, const void *buf, size_t len,
             unsigned flags)
{
  struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
  return node_pwritev (node, offset, len, &iov, 1, flags);
}

/* Write zeroes with ordinary writes, for drivers that cannot do better. */
static int
emulate_write_zeroes (strata_node *node, uint64_t offset, uint64_t len,
                      unsigned flags)
{
  const size_t chunk = 1 << 20;
  CLEANUP_FREE void *zeroes = calloc (1, MIN (len, chunk));

  if (!zeroes)
    return -ENOMEM;
  while (len) {
    size_t n = MIN (len, chunk);
    struct iovec iov = { .iov_base = zeroes, .iov_len = n };
    int r = node->drv->pwritev (node, offset, n, &iov, 1,
                                flags & STRATA_REQ_FUA);
    if (r < 0)
      return r;
    offset += n;
    len -= n;
  }
  return 0;
}

int
node_pwrite_zeroes (strata_node *node, uint64_t offset, uint64_t len,
                    unsigned flags)
{
  struct tracked_req req;
  strata_node *fwd;
  bool track = !(flags & NODE_REQ_SERIALISED);
  int r = check_overflow (node, offset, len);

  if (r == 0)
    r = check_writable (node);
  flags &= ~NODE_REQ_SERIALISED;
  if (r < 0 || len == 0)
    return r;
  if (!node->drv->pwrite_zeroes && !node->drv->pwritev && node->drv->is_filter
      && node->file)
    return node_pwrite_zeroes (node->file, offset, len, flags);
  if (track)
    tracker_begin (&node->tracker, &req, offset, len, false);
  if ((fwd = forwarded (node))) {
    if (track)
      tracker_end (&node->tracker, &req);
    return node_pwrite_zeroes (fwd, offset, len, flags);
  }
  r = -ENOTSUP;
  if (node->drv->pwrite_zeroes)
    r = node->drv->pwrite_zeroes (node, offset, len, flags);
  if (r == -ENOTSUP && node->drv->pwritev)
    r = emulate_write_zeroes (node, offset, len, flags);
  node_dirty_write (node, NODE_WRITE_ZEROES, offset, len, NULL, 0, r);
  if (track)
    tracker_end (&node->tracker, &req);
  return r;
}

int
node_pdiscard (strata_node *node, uint64_t offset, uint64_t len,
               unsigned flags)
{
  struct tracked_req req;
  strata_node *fwd;
  int r = check_overflow (node, offset, len);

  if (r == 0)
    r = check_writable (node);
  if (r < 0 || len == 0)
    return r;
  if (!node->drv->pdiscard) {
    if (node->drv->is_filter && node->file)
      return node_pdiscard (node->file, offset, len, flags);
    return 0; /* discard is advisory */
  }
  tracker_begin (&node->tracker, &req, offset, len, false);
  if ((fwd = forwarded (node))) {
    tracker_end (&node->tracker, &req);
    return node_pdiscard (fwd, offset, len, flags);
  }
  r = node->drv->pdiscard (node, offset, len, flags);
  node_dirty_write (node, NODE_WRITE_DISCARD, offset, len, NULL, 0, r);
  tracker_end (&node->tracker, &req);
  return r == -ENOTSUP ? 0 : r;
}

int
node_flush (strata_node *node)
{
  int r = 0;

  if (node->read_only)
    return 0;
  if (node->drv->flush)
    r = node->drv->flush (node);
  if (r == 0 && node->file)
    r = node_flush (node->file);
  return r;
}

int
node_block_status (strata_node *node, uint64_t offset, uint64_t len,
                   struct bstat *bs)
{
  return node_block_status_flags (node, offset, len, bs, 0);
}

int
node_block_status_flags (strata_node *node, uint64_t offset, uint64_t len,
                         struct bstat *bs, unsigned flags)
{
  struct bstat fbs;
  int r = check_overflow (node, offset, len);

  if (r < 0)
    return r;
  memset (bs, 0, sizeof *bs);
  if (len == 0)
    return io_error (EINVAL, "block status of an empty range");
  if (node->drv->block_status)
    r = node->drv->block_status (node, offset, len, bs);
  else if (node->drv->is_filter && node->file) {
    *bs = (struct bstat){ .pnum = len,
                          .map = offset,
                          .file = node->file,
                          .flags = BS_OFFSET | BS_RECURSE };
  }
  else
    *bs = (struct bstat){ .pnum = len, .flags = BS_ALLOCATED | BS_DATA };
  if (r < 0)
    return r;
  if (bs->pnum == 0 || bs->pnum > len)
    return io_error (EIO,
                     "%s: driver %s answered block status for %" PRIu64
                     " bytes of %" PRIu64,
                     node->filename, node->drv->name, bs->pnum, len);
  if (!(bs->flags & BS_OFFSET) || !bs->file || bs->file == node) {
    bs->flags &= ~BS_REFINE_ZERO;
    return 0;
  }
  if (!(bs->flags & BS_RECURSE)
      && (!(bs->flags & BS_REFINE_ZERO) || (flags & STRATA_BS_SHALLOW))) {
    /* The format knows: its data is data (QEMU 7.2 asks the file only
     * for BDRV_BLOCK_RECURSE, and never with want_zero=false). */
    bs->flags &= ~BS_REFINE_ZERO;
    return 0;
  }

  /* Refine with what the file below says of those bytes. */
  r = node_block_status (bs->file, bs->map, bs->pnum, &fbs);
  if (r < 0)
    return r;
  bs->pnum = fbs.pnum;
  if (bs->flags & BS_RECURSE) {
    bs->flags = (bs->flags & ~(BS_RECURSE | BS_DATA | BS_ZERO))
                | (fbs.flags & (BS_ALLOCATED | BS_DATA | BS_ZERO));
    if (fbs.flags & BS_OFFSET) {
      bs->map = fbs.map;
      bs->file = fbs.file;
    }
  }
  else {
    bs->flags &= ~BS_REFINE_ZERO;
    if (fbs.flags & BS_ZERO)
      bs->flags |= BS_ZERO;
  }
  return 0;
}

bool
node_has_remote (strata_node *node)
{
  for (; node; node = node->backing)
    if (node->drv->remote || (node->file && node_has_remote (node->file)))
      return true;
  return false;
}

int64_t
node_length (strata_node *node)
{
  if (node->drv->get_length)
    return node->drv->get_length (node);
  if (node->drv->is_filter && node->file)
    return node_length (node->file);
  return -ENOTSUP;
}

bool
node_truncate (strata_node *node, uint64_t size, unsigned flags,
               strata_error **errp)
{
  if (node->read_only || !(node->perm & PERM_RESIZE)) {
    error_set (errp, EPERM, "%s: cannot resize an image opened read-only",
               node->filename);
    return false;
  }
  if (size > INT64_MAX) {
    error_set (errp, EINVAL, "%s: size %" PRIu64 " is too large",
               node->filename, size);
    return false;
  }
  if (node->drv->truncate) {
    int64_t len;

    if (!node->drv->truncate (node, size, flags, errp))
      return false;
    /* The node's bitmaps follow its new length (as QEMU's do). */
    if ((len = node_length (node)) >= 0
        && !node_bitmaps_resize (node, (uint64_t)len)) {
      error_set (errp, ENOMEM, "out of memory");
      return false;
    }
    return true;
  }
  if (node->drv->is_filter && node->file)
    return node_truncate (node->file, size, flags, errp);
  error_set (errp, ENOTSUP, "%s: the %s driver cannot resize images",
             node->filename, node->drv->name);
  return false;
}

/* ---- chain edits ---- */

bool
node_change_backing_file (strata_node *node, const char *backing_file,
                          const char *backing_fmt, strata_error **errp)
{
  if (!node->drv->change_backing_file) {
    error_set (errp, ENOTSUP, "%s: format '%s' cannot record a backing file",
               node->filename, node->drv->name);
    return false;
  }
  if (node->read_only) {
    error_set (errp, EROFS, "%s: image is open read-only", node->filename);
    return false;
  }
  return node->drv->change_backing_file (node, backing_file, backing_fmt,
                                         errp);
}

bool
node_make_empty (strata_node *node, strata_error **errp)
{
  if (!node->drv->make_empty) {
    error_set (errp, ENOTSUP, "%s: format '%s' cannot be emptied",
               node->filename, node->drv->name);
    return false;
  }
  if (node->read_only) {
    error_set (errp, EROFS, "%s: image is open read-only", node->filename);
    return false;
  }
  return node->drv->make_empty (node, errp);
}
