/* strata: the registry of named nodes.
 *
 * Every node has a name: the one its options give ("node-name"), checked
 * against QEMU's rule, or an automatic "#blockNNN".  The registry maps
 * names to nodes so that options can refer to an existing node ("file":
 * "name", "backing": "name") and the control plane can find and list
 * nodes.  It holds no references: node_open registers a node when it is
 * allocated and node_free unregisters it, so a lookup takes a reference
 * only while the node is still alive (refcount above zero).
 *
 * Parents are not stored separately: a node's parents are the registered
 * nodes whose children include it, found by walking the registry.  Graph
 * edits (opening nodes over others, attach, detach, reopen, a job's
 * backing change) are made under the one graph-edit lock, so a walk under
 * the registry lock sees a consistent set of edges.
 *
 * Locks:
 *   edit_lock      graph_lock()/graph_unlock(): every graph edit, and
 *                  walks that must not see one half done (the QMP block
 *                  commands, a job's prepare/abort).  Held across node
 *                  opens and reopens, so it is taken first.
 *   registry_lock  the registry array, the node names, the users.  A
 *                  leaf: nothing is taken while it is held.
 * Order: edit_lock -> job lock -> node lock; registry_lock under any.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "block/graph.h"

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t edit_lock = PTHREAD_MUTEX_INITIALIZER;
static strata_node **graph_nodes;  /* in registration order */
static size_t graph_n, graph_cap;

static strata_node *
lookup_registry_locked (const char *name)
{
  for (size_t i = 0; i < graph_n; i++)
    if (strcmp (graph_nodes[i]->node_name, name) == 0)
      return graph_nodes[i];
  return NULL;
}

static bool
name_char_ok (char c)
{
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
         || (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_';
}

void
graph_lock (void)
{
  pthread_mutex_lock (&edit_lock);
}

void
graph_unlock (void)
{
  pthread_mutex_unlock (&edit_lock);
}

bool
graph_name_check (const char *name, strata_error **errp)
{
  const char *p;

  if (!((name[0] >= 'a' && name[0] <= 'z')
        || (name[0] >= 'A' && name[0] <= 'Z'))) {
    error_set (errp, EINVAL, "Invalid node-name: '%s'", name);
    return false;
  }
  for (p = name; *p; p++) {
    if (!name_char_ok (*p)) {
      error_set (errp, EINVAL, "Invalid node-name: '%s'", name);
      return false;
    }
  }
  if (p - name > GRAPH_NAME_MAX) {
    error_set (errp, EINVAL, "Node name too long");
    return false;
  }
  pthread_mutex_lock (&registry_lock);
  p = lookup_registry_locked (name) ? name : NULL;
  pthread_mutex_unlock (&registry_lock);
  if (p) {
    error_set (errp, EEXIST, "Duplicate nodes with node-name='%s'", name);
    return false;
  }
  return true;
}

bool
graph_register (strata_node *node, strata_error **errp)
{
  bool ok = false;

  pthread_mutex_lock (&registry_lock);
  if (lookup_registry_locked (node->node_name)) {
    error_set (errp, EEXIST, "Duplicate nodes with node-name='%s'",
               node->node_name);
    goto out;
  }
  if (graph_n == graph_cap) {
    size_t cap = graph_cap ? graph_cap * 2 : 16;
    strata_node **v = realloc (graph_nodes, cap * sizeof *v);
    if (!v) {
      error_set (errp, ENOMEM, "out of memory");
      goto out;
    }
    graph_nodes = v;
    graph_cap = cap;
  }
  graph_nodes[graph_n++] = node;
  ok = true;
out:
  pthread_mutex_unlock (&registry_lock);
  return ok;
}

void
graph_unregister (strata_node *node)
{
  pthread_mutex_lock (&registry_lock);
  for (size_t i = 0; i < graph_n; i++) {
    if (graph_nodes[i] == node) {
      memmove (&graph_nodes[i], &graph_nodes[i + 1],
               (graph_n - i - 1) * sizeof *graph_nodes);
      graph_n--;
      break;
    }
  }
  if (graph_n == 0) {
    free (graph_nodes);
    graph_nodes = NULL;
    graph_cap = 0;
  }
  pthread_mutex_unlock (&registry_lock);
}

/* Take a reference unless the node is already on its way out. */
static bool
try_ref (strata_node *node)
{
  int n = atomic_load (&node->refcnt);

  while (n > 0)
    if (atomic_compare_exchange_weak (&node->refcnt, &n, n + 1))
      return true;
  return false;
}

strata_node *
graph_lookup (const char *name)
{
  strata_node *node;

  pthread_mutex_lock (&registry_lock);
  node = lookup_registry_locked (name);
  if (node && !try_ref (node))
    node = NULL;
  pthread_mutex_unlock (&registry_lock);
  return node;
}

size_t
graph_list (strata_node ***out)
{
  size_t n = 0;

  pthread_mutex_lock (&registry_lock);
  *out = calloc (graph_n ? graph_n : 1, sizeof **out);
  for (size_t i = 0; *out && i < graph_n; i++)
    if (try_ref (graph_nodes[i]))
      (*out)[n++] = graph_nodes[i];
  pthread_mutex_unlock (&registry_lock);
  return n;
}

void
graph_list_free (strata_node **nodes, size_t n)
{
  for (size_t i = 0; i < n; i++)
    node_unref (nodes[i]);
  free (nodes);
}

int
graph_parents (strata_node *node, struct graph_edge *edges, int max)
{
  int n = 0;

  pthread_mutex_lock (&registry_lock);
  for (size_t i = 0; i < graph_n; i++) {
    strata_node *p = graph_nodes[i];
    for (int c = 0; c < p->nchildren; c++) {
      if (p->children[c].node != node)
        continue;
      if (n < max)
        edges[n] = (struct graph_edge){ p, p->children[c].name };
      n++;
    }
  }
  pthread_mutex_unlock (&registry_lock);
  return n;
}

/* ---- replacing a node in its users ---- */

static void (*replace_hook) (strata_node *old, strata_node *new);

void
graph_set_replace_hook (void (*fn) (strata_node *old, strata_node *new))
{
  replace_hook = fn;
}

void
graph_replace_users (strata_node *old, strata_node *new)
{
  if (replace_hook)
    replace_hook (old, new);
}

/* ---- users ---- */

bool
graph_add_user (strata_node *node, const char *who)
{
  char **v, *copy = strdup (who);

  if (!copy)
    return false;
  pthread_mutex_lock (&registry_lock);
  v = realloc (node->users, (node->nusers + 1) * sizeof *v);
  if (v) {
    node->users = v;
    v[node->nusers++] = copy;
  }
  pthread_mutex_unlock (&registry_lock);
  if (!v)
    free (copy);
  return v != NULL;
}

void
graph_remove_user (strata_node *node, const char *who)
{
  pthread_mutex_lock (&registry_lock);
  for (size_t i = 0; i < node->nusers; i++) {
    if (strcmp (node->users[i], who) == 0) {
      free (node->users[i]);
      memmove (&node->users[i], &node->users[i + 1],
               (node->nusers - i - 1) * sizeof *node->users);
      if (--node->nusers == 0) {
        free (node->users);
        node->users = NULL;
      }
      break;
    }
  }
  pthread_mutex_unlock (&registry_lock);
}

char *
graph_first_user (strata_node *node)
{
  char *r = NULL;

  pthread_mutex_lock (&registry_lock);
  if (node->nusers > 0)
    r = strdup (node->users[0]);
  pthread_mutex_unlock (&registry_lock);
  return r;
}
