/* strata: the blkdebug filter driver, error injection for tests.
 *
 *      [format or nothing] --file--> [blkdebug] --file--> [image child]
 *
 * Requests pass through to the child unless a rule matches them; then
 * they fail with the rule's errno, without reaching the child.  Options
 * are the subset of QEMU's blkdebug (BlockdevOptionsBlkdebug) that makes
 * sense without debug events:
 *
 *   image                  the child: a node name, or nested options
 *                          (image.driver defaults to "file")
 *   filename               instead of image: "blkdebug::PATH" or "PATH",
 *                          a file child (so strata-io -o file.driver=...
 *                          works; config files are not supported)
 *   inject-error.N.event   which requests (required unless iotype is
 *                          given): read_aio, read_backing_aio,
 *                          read_compressed, cow_read -> reads;
 *                          write_aio, write_compressed, cow_write,
 *                          pwritev -> writes; pwritev_zero ->
 *                          write-zeroes; flush_to_os, flush_to_disk ->
 *                          flushes
 *   inject-error.N.iotype  read, write, write-zeroes, discard, flush or
 *                          block-status: overrides what EVENT implies
 *   inject-error.N.errno   default 5 (EIO)
 *   inject-error.N.sector  fail only requests covering byte sector*512
 *                          (default -1: every request of that type)
 *   inject-error.N.once    fail one request, then never again
 *   inject-error.N.countdown  K >= 1: let the first K-1 requests the
 *                          rule matches through and fail the Kth; with
 *                          once=on only the Kth (a transient error),
 *                          otherwise the Kth and every later one (a disk
 *                          that went away).  strata's own option, after
 *                          SQLite's fault injector: a test sweeps K =
 *                          1, 2, ... to fail each request of an
 *                          operation in turn (tests/integration/
 *                          test_fault_sweep.py).  Default 0: no countdown
 *   inject-error.N.immediately  accepted; errors are always immediate
 *
 * QEMU arms a rule when a format driver above raises the event and then
 * fails reads and writes; strata's formats raise no events, so a rule is
 * armed from the start and fails the requests its event names.  Rules are
 * per node, so one daemon can run many.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/graph.h"
#include "block/node.h"
#include "drivers/registry.h"
#include "util/cleanup.h"

enum io_type {
  IO_READ,
  IO_WRITE,
  IO_WRITE_ZEROES,
  IO_DISCARD,
  IO_FLUSH,
  IO_BLOCK_STATUS,
  IO_TYPES
};

static const char *const iotype_names[IO_TYPES] = {
  "read", "write", "write-zeroes", "discard", "flush", "block-status",
};

static const struct {
  const char *event;
  enum io_type type;
} events[] = {
  { "read_aio", IO_READ },
  { "read_backing_aio", IO_READ },
  { "read_compressed", IO_READ },
  { "cow_read", IO_READ },
  { "write_aio", IO_WRITE },
  { "write_compressed", IO_WRITE },
  { "cow_write", IO_WRITE },
  { "pwritev", IO_WRITE },
  { "pwritev_zero", IO_WRITE_ZEROES },
  { "flush_to_os", IO_FLUSH },
  { "flush_to_disk", IO_FLUSH },
};

/* QEMU's other BlkdebugEvent names: metadata events of its qcow2 driver,
 * which strata cannot tell apart from data I/O. */
static const char *const unsupported_events[] = {
  "l1_update",
  "l1_grow_alloc_table",
  "l1_grow_write_table",
  "l1_grow_activate_table",
  "l2_load",
  "l2_update",
  "l2_update_compressed",
  "l2_alloc_cow_read",
  "l2_alloc_write",
  "vmstate_load",
  "vmstate_save",
  "reftable_load",
  "reftable_grow",
  "reftable_update",
  "refblock_load",
  "refblock_update",
  "refblock_update_part",
  "refblock_alloc",
  "refblock_alloc_hookup",
  "refblock_alloc_write",
  "refblock_alloc_write_blocks",
  "refblock_alloc_write_table",
  "refblock_alloc_switch_table",
  "cluster_alloc",
  "cluster_alloc_bytes",
  "cluster_free",
  "pwritev_rmw_head",
  "pwritev_rmw_after_head",
  "pwritev_rmw_tail",
  "pwritev_rmw_after_tail",
  "pwritev_done",
  "empty_image_prepare",
  "l1_shrink_write_table",
  "l1_shrink_free_l2_clusters",
  "cor_write",
  "cluster_alloc_space",
  "none",
  NULL,
};

struct rule {
  enum io_type type;
  int err;
  int64_t offset; /* byte offset, or -1 for any request */
  bool once;
  atomic_bool spent;
  int64_t countdown;        /* fail the countdown'th match; 0: no countdown */
  atomic_int_fast64_t seen; /* matching requests so far (countdown rules) */
};

struct blkdebug_state {
  struct rule *rules;
  size_t nrules;
};

static bool
rule_event (struct rule *r, const char *event, const char *key,
            strata_error **errp)
{
  for (size_t i = 0; i < sizeof events / sizeof events[0]; i++) {
    if (strcmp (events[i].event, event) == 0) {
      r->type = events[i].type;
      return true;
    }
  }
  for (size_t i = 0; unsupported_events[i]; i++) {
    if (strcmp (unsupported_events[i], event) == 0) {
      error_set (errp, ENOTSUP,
                 "blkdebug: %s: event '%s' is not supported: "
                 "strata's formats raise no debug events; use read_aio, "
                 "write_aio, pwritev_zero, flush_to_disk or an iotype",
                 key, event);
      return false;
    }
  }
  /* QEMU's schema check, which names the member only. */
  error_set (errp, EINVAL, "Parameter 'event' does not accept value '%s'",
             event);
  return false;
}

static bool
rule_iotype (struct rule *r, const char *name, strata_error **errp)
{
  for (int i = 0; i < IO_TYPES; i++) {
    if (strcmp (iotype_names[i], name) == 0) {
      r->type = i;
      return true;
    }
  }
  error_set (errp, EINVAL, "Parameter 'iotype' does not accept value '%s'",
             name);
  return false;
}

/* A decimal integer in [MIN, MAX]. */
static bool
rule_int (const char *v, const char *key, int64_t min, int64_t max,
          int64_t *out, strata_error **errp)
{
  char *end;

  errno = 0;
  *out = v ? strtoll (v, &end, 10) : 0;
  if (v && (errno || end == v || *end || *out < min || *out > max)) {
    error_set (errp, EINVAL,
               "%s: expected an integer from %" PRId64 " to %" PRId64
               ", got '%s'",
               key, min, max, v);
    return false;
  }
  return true;
}

/* Parse inject-error.N.* into R; false with *errp set on bad input. */
static bool
rule_parse (strata_opts *opts, size_t n, struct rule *r, strata_error **errp)
{
  char key[64];
  const char *v;
  int64_t x;
  bool b;

#define KEY(name)                                                             \
  (snprintf (key, sizeof key, "inject-error.%zu." name, n), key)
  if (opts_get (opts, KEY ("state"))) {
    error_set (errp, ENOTSUP, "blkdebug: %s: states are not supported", key);
    return false;
  }
  v = opts_get (opts, KEY ("event"));
  if (!v && !opts_get (opts, KEY ("iotype"))) {
    error_set (errp, EINVAL, "Missing event name for rule");
    return false;
  }
  if (v && !rule_event (r, v, key, errp))
    return false;
  if ((v = opts_get (opts, KEY ("iotype"))) && !rule_iotype (r, v, errp))
    return false;
  if (!rule_int (opts_get (opts, KEY ("errno")), key, 1, 4095, &x, errp))
    return false;
  r->err = x ? (int)x : EIO;
  v = opts_get (opts, KEY ("sector"));
  if (!rule_int (v, key, -1, INT64_MAX / 512, &x, errp))
    return false;
  r->offset = v && x >= 0 ? x * 512 : -1;
  if (!rule_int (opts_get (opts, KEY ("countdown")), key, 0, INT64_MAX,
                 &r->countdown, errp))
    return false;
  if (!opts_get_bool (opts, KEY ("once"), false, &r->once, errp)
      || !opts_get_bool (opts, KEY ("immediately"), false, &b, errp))
    return false;
#undef KEY
  return true;
}

static bool
rule_exists (const strata_opts *opts, size_t n)
{
  char prefix[40];
  int len = snprintf (prefix, sizeof prefix, "inject-error.%zu.", n);

  for (size_t i = 0; i < opts->n; i++)
    if (strncmp (opts->v[i].key, prefix, len) == 0)
      return true;
  return false;
}

static bool
blkdebug_parse_rules (struct blkdebug_state *s, strata_opts *opts,
                      strata_error **errp)
{
  while (rule_exists (opts, s->nrules)) {
    struct rule *r = realloc (s->rules, (s->nrules + 1) * sizeof *r);

    if (!r) {
      error_set (errp, ENOMEM, "out of memory");
      return false;
    }
    s->rules = r;
    r = &s->rules[s->nrules];
    memset (r, 0, sizeof *r);
    atomic_init (&r->spent, false);
    atomic_init (&r->seen, 0);
    if (!rule_parse (opts, s->nrules, r, errp))
      return false;
    s->nrules++;
  }
  return true;
}

static const char *const cache_keys[] = { "cache.direct", "cache.no-flush" };

/* The child from image=NAME, image.*, or filename. */
static strata_node *
blkdebug_open_child (strata_opts *opts, unsigned flags, strata_error **errp)
{
  const char *ref = opts_get (opts, "image"), *fn;
  CLEANUP_OPTS strata_opts *sub = opts_extract (opts, "image");
  strata_node *child;

  if (!sub) {
    error_set (errp, ENOMEM, "out of memory");
    return NULL;
  }
  fn = opts_get (opts, "filename");
  if ((ref != NULL) + (sub->n > 0) + (fn != NULL) > 1) {
    error_set (errp, EINVAL,
               "blkdebug: give one of 'image' (a node name), "
               "'image.*' options or 'filename'");
    return NULL;
  }
  if (ref) {
    for (size_t i = 0; i < sizeof cache_keys / sizeof cache_keys[0]; i++)
      opts_get (opts, cache_keys[i]); /* the node has its own */
    if (!(child = graph_lookup (ref)))
      error_set (errp, ENOENT, "Cannot find device='%s' nor node-name='%s'",
                 ref, ref);
    return child;
  }
  if (fn && strncmp (fn, "blkdebug:", 9) == 0) {
    const char *colon = strchr (fn + 9, ':');
    if (!colon || colon != fn + 9) {
      error_set (errp, ENOTSUP,
                 "%s: blkdebug config files are not "
                 "supported; use inject-error options",
                 fn);
      return NULL;
    }
    fn = colon + 1;
  }
  if (fn && !opts_set (sub, "filename", fn)) {
    error_set (errp, ENOMEM, "out of memory");
    return NULL;
  }
  if (sub->n == 0) {
    error_set (errp, EINVAL, "blkdebug: an 'image' child is required");
    return NULL;
  }
  /* The cache mode of the tools (-t) names the node under the format:
   * it belongs to the image. */
  for (size_t i = 0; i < sizeof cache_keys / sizeof cache_keys[0]; i++) {
    const char *v = opts_get (opts, cache_keys[i]);
    if (v && !opts_has (sub, cache_keys[i])
        && !opts_set (sub, cache_keys[i], v)) {
      error_set (errp, ENOMEM, "out of memory");
      return NULL;
    }
  }
  if (!opts_has (sub, "driver") && !opts_set (sub, "driver", "file")) {
    error_set (errp, ENOMEM, "out of memory");
    return NULL;
  }
  return node_open (sub, flags, errp);
}

static void
blkdebug_close (strata_node *node)
{
  struct blkdebug_state *s = node->opaque;

  free (s->rules);
}

static bool
blkdebug_open (strata_node *node, strata_opts *opts, unsigned flags,
               strata_error **errp)
{
  struct blkdebug_state *s = node->opaque;
  strata_node *child;

  if (opts_get (opts, "config")) {
    error_set (errp, ENOTSUP,
               "blkdebug: config files are not supported; "
               "use inject-error options");
    return false;
  }
  if (!blkdebug_parse_rules (s, opts, errp))
    goto fail;
  if (!(child = blkdebug_open_child (opts, flags, errp)))
    goto fail;
  if (!node_attach_child (node, "file", child, errp)) {
    node_unref (child);
    goto fail;
  }
  if (!(node->filename = strdup (child->filename))) {
    error_set (errp, ENOMEM, "out of memory");
    goto fail;
  }
  return true;

fail:
  blkdebug_close (node);
  return false;
}

/* 0, or the injected error for a request of TYPE at [offset, offset+len)
 * (LEN 0: a request without a range, which only "any offset" rules hit). */
static int
blkdebug_check (strata_node *node, enum io_type type, uint64_t offset,
                uint64_t len)
{
  struct blkdebug_state *s = node->opaque;

  for (size_t i = 0; i < s->nrules; i++) {
    struct rule *r = &s->rules[i];

    if (r->type != type || atomic_load (&r->spent))
      continue;
    if (r->offset >= 0
        && !((uint64_t)r->offset >= offset
             && (uint64_t)r->offset - offset < len))
      continue;
    if (r->countdown > 0 && atomic_fetch_add (&r->seen, 1) + 1 < r->countdown)
      continue; /* not yet the countdown'th match */
    if (r->once && atomic_exchange (&r->spent, true))
      continue; /* another thread took it */
    if (type == IO_FLUSH)
      return io_error (r->err, "%s: blkdebug: injected flush error",
                       node->filename);
    return io_error (r->err,
                     "%s: blkdebug: injected %s error at offset %" PRIu64,
                     node->filename, iotype_names[type], offset);
  }
  return 0;
}

static int
blkdebug_preadv (strata_node *node, uint64_t offset, uint64_t len,
                 const struct iovec *iov, int iovcnt, unsigned flags)
{
  int r = blkdebug_check (node, IO_READ, offset, len);

  return r ? r : node_preadv (node->file, offset, len, iov, iovcnt, flags);
}

static int
blkdebug_pwritev (strata_node *node, uint64_t offset, uint64_t len,
                  const struct iovec *iov, int iovcnt, unsigned flags)
{
  int r = blkdebug_check (node, IO_WRITE, offset, len);

  return r ? r : node_pwritev (node->file, offset, len, iov, iovcnt, flags);
}

static int
blkdebug_pwrite_zeroes (strata_node *node, uint64_t offset, uint64_t len,
                        unsigned flags)
{
  int r = blkdebug_check (node, IO_WRITE_ZEROES, offset, len);

  return r ? r : node_pwrite_zeroes (node->file, offset, len, flags);
}

static int
blkdebug_pdiscard (strata_node *node, uint64_t offset, uint64_t len,
                   unsigned flags)
{
  int r = blkdebug_check (node, IO_DISCARD, offset, len);

  return r ? r : node_pdiscard (node->file, offset, len, flags);
}

static int
blkdebug_flush (strata_node *node)
{
  return blkdebug_check (node, IO_FLUSH, 0, 0); /* the core flushes file */
}

static int
blkdebug_block_status (strata_node *node, uint64_t offset, uint64_t len,
                       struct bstat *bs)
{
  int r = blkdebug_check (node, IO_BLOCK_STATUS, offset, len);

  if (r == 0)
    *bs = (struct bstat){ .pnum = len,
                          .map = offset,
                          .file = node->file,
                          .flags = BS_OFFSET | BS_RECURSE };
  return r;
}

const struct strata_driver blkdebug_driver = {
  .name = "blkdebug",
  .state_size = sizeof (struct blkdebug_state),
  .is_filter = true,
  .open = blkdebug_open,
  .close = blkdebug_close,
  .preadv = blkdebug_preadv,
  .pwritev = blkdebug_pwritev,
  .pwrite_zeroes = blkdebug_pwrite_zeroes,
  .pdiscard = blkdebug_pdiscard,
  .flush = blkdebug_flush,
  .block_status = blkdebug_block_status,
};
