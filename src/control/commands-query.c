/* strata: the block-graph query commands (query-named-block-nodes,
 * query-block), with QEMU 7.2's reply shapes.
 *
 * QEMU describes a node by its file name, or by "json:{...}" (its
 * options as JSON) when the name alone cannot tell it: a filter, or a
 * format whose backing was chosen by options or a graph edit rather than
 * by its header.  A filter a job put over its device without a name is
 * shown as the device.  The whole walk runs under the graph-edit lock.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/chain.h"
#include "block/graph.h"
#include "block/node.h"
#include "control/commands-block.h"
#include "control/qmp.h"
#include "jobs/job.h"
#include "util/cleanup.h"

static json_t *full_options (strata_node *node);
static char *display_filename (strata_node *node);

/* Did the options or a graph change pick a backing other than the one the
 * image header names?  Then QEMU describes the node with json:{...}. */
static bool
backing_overridden (strata_node *node)
{
  struct strata_info info = { .size = sizeof info };
  CLEANUP_FREE char *bfn = NULL;

  if (!node->backing_explicit || !strata_get_info (node, &info, 0, NULL))
    return false;
  if (!node->backing)
    return info.backing_filename != NULL;
  bfn = display_filename (node->backing);
  return !info.backing_filename || !bfn
         || strcmp (info.backing_filename, bfn) != 0;
}

static json_t *
full_options (strata_node *node)
{
  json_t *o = json_pack ("{s:s}", "driver", node->drv->name);

  if (!node->file) {
    json_object_set_new (o, "filename", json_string (node->filename));
    return o;
  }
  json_object_set_new (o, "file", full_options (node->file));
  if (backing_overridden (node))
    json_object_set_new (o, "backing",
                         node->backing ? full_options (node->backing)
                                       : json_null ());
  return o;
}

/* The name QEMU shows: the file's name, or json:{...} when the node's
 * options cannot be told by a file name.  Caller frees. */
static char *
display_filename (strata_node *node)
{
  json_t *o;
  char *s, *out = NULL;
  bool implicit = false;

  /* A filter (copy-on-read, blkdebug) is never told by a file name,
   * except the one a job put over its device without a name, and QEMU's
   * mirror_top and commit_top, which have no options of their own. */
  if (node->file && job_is_filter (node, &implicit)
      && (implicit || strcmp (node->drv->name, "mirror_top") == 0
          || strcmp (node->drv->name, "commit_top") == 0))
    return display_filename (node->file);
  if (!node->file || (!node->drv->is_filter && !backing_overridden (node)))
    return strdup (node->filename ? node->filename : "");
  o = full_options (node);
  s = json_dumps (o, JSON_SORT_KEYS);
  json_decref (o);
  if (s && asprintf (&out, "json:%s", s) < 0)
    out = NULL;
  free (s);
  return out;
}

/* The node QEMU describes as "backing-image" and counts in the depth is
 * chain_next(): a filter's child, or a format's backing node.  Except
 * during an intermediate commit: QEMU's commit_top sits between the
 * overlay and top, where strata's stands beside (drivers/jobfilter.c), so
 * the walk takes it in here. */
static strata_node *
listed_next (strata_node *node)
{
  strata_node *n = chain_next (node);
  struct graph_edge e[8];
  bool implicit;
  int k;

  if (!n || node->backing != n)
    return n;
  k = graph_parents (n, e, 8);
  for (int i = 0; i < k && i < 8; i++)
    if (strcmp (e[i].child_name, "file") == 0
        && strcmp (e[i].parent->drv->name, "commit_top") == 0
        && job_is_filter (e[i].parent, &implicit))
      return e[i].parent;
  return n;
}

static json_t *
image_info (strata_node *node, bool nested, struct qmp_error *err)
{
  struct strata_info info = { .size = sizeof info };
  struct strata_qcow2_info q = { .size = sizeof q };
  strata_error *e = NULL;
  json_t *o;
  char *fn;

  if (!strata_get_info (node, &info, 0, &e)) {
    qmp_error_from (err, e);
    return NULL;
  }
  /* QEMU's protocol drivers report their length in whole sectors. */
  if (!node->file)
    info.virtual_size = (info.virtual_size + 511) & ~(uint64_t)511;
  fn = display_filename (node);
  o = json_pack ("{s:I, s:s?, s:s}", "virtual-size",
                 (json_int_t)info.virtual_size, "filename", fn, "format",
                 node->drv->name);
  free (fn);
  if (!info.dirty_unknown) /* raw over NBD: none, as QEMU */
    json_object_set_new (o, "dirty-flag", json_boolean (info.dirty));
  if (info.cluster_size)
    json_object_set_new (o, "cluster-size", json_integer (info.cluster_size));
  if (info.actual_size)
    json_object_set_new (o, "actual-size", json_integer (info.actual_size));
  if (info.format_specific && strcmp (info.format_specific, "qcow2") == 0
      && strata_get_qcow2_info (node, &q, 0, NULL))
    json_object_set_new (
        o, "format-specific",
        json_pack ("{s:s, s:{s:s, s:s, s:b, s:i, s:b, s:b}}", "type", "qcow2",
                   "data", "compat", q.compat, "compression-type",
                   q.compression_type, "lazy-refcounts", q.lazy_refcounts,
                   "refcount-bits", q.refcount_bits, "corrupt", q.corrupt,
                   "extended-l2", q.extended_l2));
  if (info.backing_filename) {
    char *full = chain_resolve_name (node->filename, info.backing_filename);
    json_object_set_new (o, "backing-filename",
                         json_string (info.backing_filename));
    if (full)
      json_object_set_new (o, "full-backing-filename", json_string (full));
    free (full);
  }
  if (info.backing_format)
    json_object_set_new (o, "backing-filename-format",
                         json_string (info.backing_format));
  if (nested && listed_next (node)) {
    json_t *b = image_info (listed_next (node), true, err);
    if (!b) {
      json_decref (o);
      return NULL;
    }
    json_object_set_new (o, "backing-image", b);
  }
  return o;
}

static json_t *
block_device_info (strata_node *node, bool flat, struct qmp_error *err)
{
  json_t *image = image_info (node, !flat, err), *o;
  bool direct, no_flush;
  int depth = 0;
  char *fn;

  if (!image)
    return NULL;
  node_cache_mode (node, &direct, &no_flush);
  /* QEMU counts the chain it described in "image": none when flat. */
  for (strata_node *b = listed_next (node); !flat && b; b = listed_next (b))
    depth++;
  fn = display_filename (node);
  o = json_pack ("{s:s, s:s, s:s?, s:b, s:b, s:s, s:i, s:o, s:i, s:i, s:i,"
                 " s:i, s:i, s:i, s:i, s:{s:b, s:b, s:b}}",
                 "node-name", node->node_name, "drv", node->drv->name, "file",
                 fn, "ro", node->read_only, "encrypted", 0, "detect_zeroes",
                 "off", "backing_file_depth", depth, "image", image, "bps", 0,
                 "bps_rd", 0, "bps_wr", 0, "iops", 0, "iops_rd", 0, "iops_wr",
                 0, "write_threshold", 0, "cache", "writeback", 1, "direct",
                 direct, "no-flush", no_flush);
  free (fn);
  if (node->backing) {
    fn = display_filename (node->backing);
    json_object_set_new (o, "backing_file", json_string (fn));
    free (fn);
  }
  return o;
}

json_t *
cmd_query_named_block_nodes (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "flat", "bool", false },
    { NULL },
  };
  strata_node **nodes;
  size_t n;
  bool flat;
  json_t *list;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  flat = json_is_true (json_object_get (args, "flat"));
  graph_lock ();
  n = graph_list (&nodes);
  list = json_array ();
  /* Newest first, as QEMU lists them. */
  for (size_t i = n; i-- > 0;) {
    json_t *o = block_device_info (nodes[i], flat, err);
    if (!o) {
      json_decref (list);
      list = NULL;
      break;
    }
    json_array_append_new (list, o);
  }
  graph_list_free (nodes, n);
  graph_unlock ();
  return list;
}

/* QEMU lists BlockBackends that have a name or a device; strata has
 * neither, as qemu-storage-daemon has neither, so the list is empty. */
json_t *
cmd_query_block (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = { { NULL } };

  if (!qmp_args_check (args, spec, err))
    return NULL;
  return json_array ();
}
