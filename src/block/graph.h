/* strata: the registry of named nodes (graph.c).  Names follow QEMU's
 * rule: a letter, then letters, digits, '-', '.', '_'; at most 31
 * characters.  Automatic names ("#block001") start with '#' so that they
 * can never clash with a user's. */
#ifndef STRATA_GRAPH_H
#define STRATA_GRAPH_H

#include <stddef.h>

#include "block/node.h"

#define GRAPH_NAME_MAX 31

/* The one graph-edit lock: held by whoever changes the graph (opens a
 * node over existing ones, attaches or detaches a child, reopens,
 * deletes) and by walks that must see no edit half done.  Taken before
 * the job lock and any node lock.  Not recursive. */
void graph_lock (void);
void graph_unlock (void);

/* Is NAME valid and free?  Errors carry QEMU's texts: "Invalid
 * node-name: 'x'", "Node name too long", "Duplicate nodes with
 * node-name='x'". */
bool graph_name_check (const char *name, strata_error **errp);

/* Called by the core when a node is created and freed. */
bool graph_register (strata_node *node, strata_error **errp);
void graph_unregister (strata_node *node);

/* The live node named NAME with a new reference, or NULL. */
strata_node *graph_lookup (const char *name);

/* Every live node, newest last, each with a new reference; release with
 * graph_list_free().  Returns the count. */
size_t graph_list (strata_node ***out);
void graph_list_free (strata_node **nodes, size_t n);

/* The parents of NODE: up to MAX edges are stored; returns how many
 * there are.  CHILD_NAME is borrowed from the parent ("file",
 * "backing"). */
struct graph_edge {
  strata_node *parent;
  const char *child_name;
};
int graph_parents (strata_node *node, struct graph_edge *edges, int max);

/* Replacing a node in its users: an active commit's pivot calls
 * graph_replace_users (graph lock held) after making OLD forward its
 * requests to NEW; the hook the control layer sets moves every export of
 * OLD to NEW (its graph user, its reference, the NBD server's pointer). */
void graph_set_replace_hook (void (*fn) (strata_node *old, strata_node *new));
void graph_replace_users (strata_node *old, strata_node *new);

/* Users: who holds a node besides its parents (an export, a block job),
 * so that blockdev-del and conflicting jobs can say who.  WHO is a phrase
 * such as "export 'exp0'" or "block job 'job0'"; it is copied.  A node may
 * have several users.  Thread-safe. */
bool graph_add_user (strata_node *node, const char *who);
void graph_remove_user (strata_node *node, const char *who);
/* The first user's phrase (caller frees), or NULL when there is none. */
char *graph_first_user (strata_node *node);

#endif
