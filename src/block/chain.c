/* strata: walking a backing chain.  See chain.h for the picture and the
 * words (node, layer, depth).
 *
 * File names are compared as QEMU compares them when it looks a backing
 * file up by name: equal strings, or the same file once both are resolved
 * by realpath().  A name that cannot be resolved (a protocol URI, a file
 * that is gone) matches only as the same string.  Which spellings of a
 * name count (from the current directory, from the directory of the image
 * above, or as that image's header records it) is the caller's choice,
 * because block-stream, qemu-img stream and qemu-img commit each accept a
 * different set, and strata matches each of them.
 */
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/chain.h"
#include "util/cleanup.h"

strata_node *
chain_next (strata_node *n)
{
  return n->drv->is_filter ? n->file : n->backing;
}

strata_node *
chain_backing (strata_node *n)
{
  return node_skip_filters (node_skip_filters (n)->backing);
}

strata_node *
chain_bottom (strata_node *n)
{
  for (strata_node *below; (below = chain_next (n));)
    n = below;
  return n;
}

bool
chain_contains (strata_node *top, strata_node *node)
{
  for (strata_node *n = chain_next (top); n; n = chain_next (n))
    if (n == node)
      return true;
  return false;
}

/* The first node below TOP's format node: where the layers below TOP
 * start (filters between TOP and its format node are not below it). */
static strata_node *
below_top (strata_node *top)
{
  return chain_next (node_skip_filters (top));
}

int
chain_depth (strata_node *top, strata_node *node)
{
  int depth = 0;

  for (strata_node *n = below_top (top); n; n = chain_next (n)) {
    if (n->drv->is_filter)
      continue;
    depth++;
    if (n == node)
      return depth;
  }
  return -1;
}

static bool
same_file (const char *a, const char *b)
{
  CLEANUP_FREE char *ra = NULL, *rb = NULL;

  if (strcmp (a, b) == 0)
    return true;
  ra = realpath (a, NULL);
  rb = realpath (b, NULL);
  return ra && rb && strcmp (ra, rb) == 0;
}

char *
chain_resolve_name (const char *filename, const char *name)
{
  const char *slash = strrchr (filename, '/');
  char *out;

  if (name[0] == '/' || !slash)
    return strdup (name);
  if (asprintf (&out, "%.*s%s", (int)(slash - filename + 1), filename, name)
      < 0)
    return NULL;
  return out;
}

const char *
chain_recorded_name (strata_node *above)
{
  struct strata_info info = { 0 };
  strata_error *err = NULL;

  above = node_skip_filters (above);
  if (!above->drv->get_info || !above->drv->get_info (above, &info, &err)) {
    strata_error_free (err);
    return NULL;
  }
  return info.backing_filename;
}

/* Does NAME name layer L, found below ABOVE, by the rules in MATCH? */
static bool
names_layer (strata_node *above, strata_node *l, const char *name,
             unsigned match)
{
  if (match & CHAIN_MATCH_RECORDED) {
    const char *rec = chain_recorded_name (above);
    if (rec && strcmp (rec, name) == 0)
      return true;
  }
  if ((match & CHAIN_MATCH_PATH) && same_file (l->filename, name))
    return true;
  if (match & CHAIN_MATCH_RELATIVE) {
    CLEANUP_FREE char *full = chain_resolve_name (above->filename, name);
    if (full && same_file (l->filename, full))
      return true;
  }
  return false;
}

strata_node *
chain_find_file (strata_node *top, const char *name, unsigned match,
                 strata_node **above)
{
  strata_node *over = node_skip_filters (top);

  for (strata_node *n = below_top (top); n; n = chain_next (n)) {
    if (n->drv->is_filter)
      continue;
    if (names_layer (over, n, name, match)) {
      if (above)
        *above = over;
      return n;
    }
    over = n;
  }
  return NULL;
}

strata_node *
chain_find_node (strata_node *top, const char *node_name)
{
  for (strata_node *n = top; n; n = chain_next (n))
    if (n->node_name && strcmp (n->node_name, node_name) == 0)
      return n;
  return NULL;
}

/* The resolved directory of PATH (caller frees), or NULL. */
static char *
real_dir (const char *path)
{
  CLEANUP_FREE char *copy = strdup (path);

  return copy ? realpath (dirname (copy), NULL) : NULL;
}

strata_node *
chain_above (strata_node *top, strata_node *layer)
{
  strata_node *over = node_skip_filters (top);

  for (strata_node *n = below_top (top); n; n = chain_next (n)) {
    if (n->drv->is_filter)
      continue;
    if (n == layer)
      return over;
    over = n;
  }
  return NULL;
}

char *
chain_backing_name_for (strata_node *top, strata_node *layer)
{
  strata_node *above = chain_above (top, layer);
  const char *rec;
  CLEANUP_FREE char *adir = NULL, *tdir = NULL;

  if (!above) {
    errno = ENOENT;
    return NULL;
  }
  rec = chain_recorded_name (above);

  if (rec && (rec[0] == '/' || driver_for_filename (rec)))
    return strdup (rec);
  adir = real_dir (node_skip_filters (above)->filename);
  tdir = real_dir (node_skip_filters (top)->filename);
  if (rec && adir && tdir && strcmp (adir, tdir) == 0)
    return strdup (rec);
  return realpath (layer->filename, NULL);
}

int
chain_allocated_above (strata_node *from, strata_node *base, uint64_t offset,
                       uint64_t *n, bool *allocated)
{
  base = base ? node_skip_filters (base) : NULL;
  *allocated = false;
  for (strata_node *l = from ? node_skip_filters (from) : NULL; l && l != base;
       l = chain_backing (l)) {
    int64_t size = node_length (l);
    struct bstat bs;
    int r;

    if (size < 0)
      return size;
    if (offset >= (uint64_t)size) {
      *allocated = true;
      return 0;
    }
    if (*n > (uint64_t)size - offset)
      *n = size - offset;
    r = node_block_status_flags (l, offset, *n, &bs, STRATA_BS_SHALLOW);
    if (r < 0)
      return r;
    if (bs.pnum < *n)
      *n = bs.pnum;
    if (bs.flags & BS_ALLOCATED) {
      *allocated = true;
      return 0;
    }
  }
  return 0;
}
