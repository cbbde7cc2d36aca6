/* strata: the argument checks that the commands starting block jobs
 * (block-stream, block-commit) share, with QEMU 7.2's texts.  Declared in
 * qmp.h.  Callers hold the graph lock for the node lookups and walks, and
 * the job lock for the busy check.
 */
#include <string.h>

#include "block/chain.h"
#include "block/graph.h"
#include "control/qmp.h"

const char *
qmp_str_arg (json_t *args, const char *key)
{
  return json_string_value (json_object_get (args, key));
}

strata_node *
qmp_lookup_node (const char *device, const char *name, struct qmp_error *err)
{
  strata_node *node = graph_lookup (name);

  if (!node)
    qmp_error_set (err, "GenericError",
                   "Cannot find device='%s' nor node-name='%s'", device, name);
  return node;
}

static const char *const on_error_names[] = {
  [JOB_ON_ERROR_REPORT] = "report",
  [JOB_ON_ERROR_IGNORE] = "ignore",
  [JOB_ON_ERROR_ENOSPC] = "enospc",
  [JOB_ON_ERROR_STOP] = "stop",
};

bool
qmp_parse_on_error (json_t *args, enum job_on_error *out,
                    struct qmp_error *err)
{
  const char *v = qmp_str_arg (args, "on-error");

  *out = JOB_ON_ERROR_REPORT;
  if (!v)
    return true;
  for (size_t i = 0; i < sizeof on_error_names / sizeof *on_error_names; i++)
    if (strcmp (v, on_error_names[i]) == 0) {
      *out = i;
      return true;
    }
  qmp_error_set (err, "GenericError",
                 "Parameter 'on-error' does not accept value '%s'", v);
  return false;
}

bool
qmp_check_not_busy_job_locked (strata_node *top, strata_node *base,
                               struct qmp_error *err)
{
  for (strata_node *n = top; n && n != base; n = chain_next (n)) {
    struct job *j = job_holding_job_locked (n);
    if (j) {
      qmp_error_set (err, "GenericError", "Node '%s' is busy: %s",
                     n->node_name, j->user);
      return false;
    }
  }
  return true;
}

strata_node *
qmp_root_node_job_locked (const char *device, bool device_not_found,
                          struct qmp_error *err)
{
  strata_node *n = graph_lookup (device);

  if (!n) {
    if (device_not_found)
      qmp_error_set (err, "DeviceNotFound", "Device '%s' not found", device);
    else
      qmp_error_set (err, "GenericError",
                     "Cannot find device='%s' nor node-name='%s'", device,
                     device);
    return NULL;
  }
  if (graph_parents (n, NULL, 0) > 0 || job_holding_job_locked (n)) {
    qmp_error_set (err, "GenericError", "Need a root block node");
    node_unref (n);
    return NULL;
  }
  return n;
}

bool
qmp_check_not_backing (strata_node *node, struct qmp_error *err)
{
  struct graph_edge e[8];
  int n = graph_parents (node, e, 8);

  for (int i = 0; i < n && i < 8; i++)
    if (strcmp (e[i].child_name, "backing") == 0) {
      qmp_error_set (err, "GenericError",
                     "Node '%s' is busy: node is used as backing hd of '%s'",
                     node->node_name, e[i].parent->node_name);
      return false;
    }
  return true;
}
