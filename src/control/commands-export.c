/* strata: the NBD server and export commands of stratad (nbd-server-start,
 * nbd-server-stop, block-export-add, block-export-del,
 * query-block-exports) with qemu-storage-daemon 7.2's arguments, replies,
 * error texts and BLOCK_EXPORT_DELETED events.
 *
 * One NBD server (src/nbd/server.c) runs in its own thread while started;
 * its worker pool serves every export, so exports never block the monitor.
 * An export holds a reference to its node and registers itself as a user
 * of it (blockdev-del then says the node is in use).  The export record
 * lives until the server reports the export gone, which is after the last
 * client of a removed export has disconnected: until then query shows it
 * with "shutting-down": true, and only then is BLOCK_EXPORT_DELETED
 * emitted, as QEMU does.
 */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/graph.h"
#include "block/node.h"
#include "control/qmp.h"
#include "nbd/server.h"
#include "util/cleanup.h"

struct export {
  struct export *next;     /* oldest first */
  char *id, *name, *user;
  strata_node *node;
  bool shutting_down;
};

/* Protects everything below.  Never held while calling into the NBD
 * server, whose callbacks (export_gone) take it. */
static pthread_mutex_t exp_lock = PTHREAD_MUTEX_INITIALIZER;
static struct export *exports;
static struct nbd_server *server;
static pthread_t server_thread;

/* The export named ID, exp_lock held. */
static struct export *
export_find_exp_locked (const char *id)
{
  for (struct export *e = exports; e; e = e->next)
    if (strcmp (e->id, id) == 0)
      return e;
  return NULL;
}

static void
export_append (struct export *e)
{
  struct export **pp = &exports;

  pthread_mutex_lock (&exp_lock);
  while (*pp)
    pp = &(*pp)->next;
  e->next = NULL;
  *pp = e;
  pthread_mutex_unlock (&exp_lock);
}

static void
export_unlink (struct export *e)
{
  pthread_mutex_lock (&exp_lock);
  for (struct export **pp = &exports; *pp; pp = &(*pp)->next)
    if (*pp == e) {
      *pp = e->next;
      break;
    }
  pthread_mutex_unlock (&exp_lock);
}

/* The record's own memory (not the node reference or the graph user). */
static void
export_free (struct export *e)
{
  if (!e)
    return;
  free (e->id);
  free (e->name);
  free (e->user);
  free (e);
}

/* The NBD server's callback: the export is removed and unused. */
static void
export_gone (void *opaque)
{
  struct export *e = opaque;

  export_unlink (e);
  qmp_event_emit ("BLOCK_EXPORT_DELETED", json_pack ("{s:s}", "id", e->id));
  graph_remove_user (e->node, e->user);
  node_unref (e->node);
  export_free (e);
}

/* The graph's replace hook (an active commit's pivot, graph lock held):
 * every export of OLD now serves NEW, which takes its graph user and its
 * reference.  OLD itself forwards what was already on its way. */
static void
export_replace (strata_node *old, strata_node *new)
{
  struct nbd_server *srv;
  bool any = false;

  pthread_mutex_lock (&exp_lock);
  srv = server;
  for (struct export *e = exports; e; e = e->next)
    if (e->node == old) {
      graph_remove_user (old, e->user);
      graph_add_user (new, e->user);
      node_ref (new);
      e->node = new;
      node_unref (old);
      any = true;
    }
  pthread_mutex_unlock (&exp_lock);
  if (any && srv)
    nbd_server_retarget (srv, old, new);
}

static void *
server_run (void *arg)
{
  nbd_server_run (arg);
  return NULL;
}

/* ---- nbd-server-start ---- */

/* SocketAddressLegacy: {"type": "unix", "data": {"path": P}} or
 * {"type": "inet", "data": {"host": H, "port": P}}. */
static bool
listen_on (struct nbd_server *srv, json_t *addr, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "type", "string", true }, { "data", "object", true }, { NULL },
  };
  static const struct qmp_arg unix_spec[] = {
    { "path", "string", true }, { "abstract", "bool", false },
    { "tight", "bool", false }, { NULL },
  };
  static const struct qmp_arg inet_spec[] = {
    { "host", "string", true }, { "port", "string", true },
    { "numeric", "bool", false }, { "to", "int", false },
    { "ipv4", "bool", false }, { "ipv6", "bool", false },
    { "keep-alive", "bool", false }, { NULL },
  };
  const char *type;
  json_t *data;
  strata_error *e = NULL;
  bool ok;

  if (!qmp_args_check_at (addr, spec, "addr.", err))
    return false;
  type = json_string_value (json_object_get (addr, "type"));
  data = json_object_get (addr, "data");
  if (strcmp (type, "unix") == 0) {
    if (!qmp_args_check_at (data, unix_spec, "addr.data.", err))
      return false;
    ok = nbd_server_listen_unix (
        srv, json_string_value (json_object_get (data, "path")), &e);
  }
  else if (strcmp (type, "inet") == 0) {
    if (!qmp_args_check_at (data, inet_spec, "addr.data.", err))
      return false;
    ok = nbd_server_listen_tcp (
        srv, json_string_value (json_object_get (data, "host")),
        json_string_value (json_object_get (data, "port")), &e);
  }
  else {
    qmp_error_set (err, "GenericError",
                   "Parameter 'type' does not accept value '%s'", type);
    return false;
  }
  if (!ok) {
    qmp_error_set (err, "GenericError", "%s", strata_error_message (e));
    strata_error_free (e);
  }
  return ok;
}

static json_t *
cmd_nbd_server_start (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "addr", "object", true }, { "tls-creds", "string", false },
    { "tls-authz", "string", false }, { "max-connections", "any", false },
    { NULL },
  };
  struct nbd_server *srv;
  json_t *v;
  json_int_t max = 0;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  if ((v = json_object_get (args, "max-connections"))) {
    /* QEMU's input visitor: a uint32 is read as a uint64 first. */
    if (!json_is_integer (v)) {
      qmp_error_set (err, "GenericError", "Parameter 'max-connections' "
                     "expects uint64");
      return NULL;
    }
    max = json_integer_value (v);
    if (max < 0 || max > UINT_MAX) {
      qmp_error_set (err, "GenericError", "Parameter 'max-connections' "
                     "expects uint32_t");
      return NULL;
    }
  }
  if (json_object_get (args, "tls-creds")) {
    qmp_error_set (err, "GenericError", "No TLS credentials with id '%s'",
                   json_string_value (json_object_get (args, "tls-creds")));
    return NULL;
  }
  if (json_object_get (args, "tls-authz")) {
    qmp_error_set (err, "GenericError", "'tls-authz' provided but TLS is "
                   "not enabled");
    return NULL;
  }
  pthread_mutex_lock (&exp_lock);
  srv = server;
  pthread_mutex_unlock (&exp_lock);
  if (srv) {
    qmp_error_set (err, "GenericError", "NBD server already running");
    return NULL;
  }
  if (!(srv = nbd_server_new ())) {
    qmp_error_set (err, "GenericError", "NBD server: out of memory");
    return NULL;
  }
  nbd_server_set_limits (srv, (unsigned) max, true);
  if (!listen_on (srv, json_object_get (args, "addr"), err))
    goto fail;
  if (pthread_create (&server_thread, NULL, server_run, srv) != 0) {
    qmp_error_set (err, "GenericError", "NBD server: cannot start a thread");
    goto fail;
  }
  pthread_mutex_lock (&exp_lock);
  server = srv;
  pthread_mutex_unlock (&exp_lock);
  return json_object ();

fail:
  nbd_server_free (srv);
  return NULL;
}

/* ---- nbd-server-stop ---- */

/* Remove every export (disconnecting clients), stop and free the server.
 * The events come out oldest export first, as QEMU's do. */
static void
server_stop (void)
{
  struct nbd_server *srv;

  for (;;) {
    CLEANUP_FREE char *name = NULL;

    pthread_mutex_lock (&exp_lock);
    srv = server;
    for (struct export *e = exports; e && !name; e = e->next)
      if (!e->shutting_down) {
        e->shutting_down = true;
        name = strdup (e->name);
      }
    pthread_mutex_unlock (&exp_lock);
    if (!name)
      break;
    nbd_server_remove_export (srv, name, true, NULL);
  }
  if (!srv)
    return;
  nbd_server_stop (srv);
  pthread_join (server_thread, NULL);
  nbd_server_free (srv);  /* reports any export still held */
  pthread_mutex_lock (&exp_lock);
  server = NULL;
  pthread_mutex_unlock (&exp_lock);
}

static json_t *
cmd_nbd_server_stop (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = { { NULL } };
  bool running;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  pthread_mutex_lock (&exp_lock);
  running = server != NULL;
  pthread_mutex_unlock (&exp_lock);
  if (!running) {
    qmp_error_set (err, "GenericError", "NBD server not running");
    return NULL;
  }
  server_stop ();
  return json_object ();
}

void
qmp_export_shutdown (void)
{
  server_stop ();
}

/* ---- block-export-add ---- */

/* QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'. */
static bool
id_wellformed (const char *id)
{
  if (!((id[0] >= 'a' && id[0] <= 'z') || (id[0] >= 'A' && id[0] <= 'Z')))
    return false;
  for (const char *p = id + 1; *p; p++)
    if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')
          || (*p >= '0' && *p <= '9') || *p == '-' || *p == '.'
          || *p == '_'))
      return false;
  return true;
}

static bool
opt_bool (json_t *args, const char *key)
{
  return json_is_true (json_object_get (args, key));
}

#define NBD_MAX_STRING 4096   /* NBD_MAX_STRING_SIZE in QEMU's nbd.h */

static json_t *
cmd_block_export_add (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "type", "string", true }, { "id", "string", true },
    { "fixed-iothread", "bool", false }, { "iothread", "string", false },
    { "node-name", "string", true }, { "writable", "bool", false },
    { "writethrough", "bool", false }, { "name", "string", false },
    { "description", "string", false }, { "bitmaps", "array", false },
    { "allocation-depth", "bool", false }, { NULL },
  };
  const char *type, *id, *node_name, *name, *desc;
  struct nbd_export_flags flags = { 0 };
  struct nbd_server *srv;
  strata_node *node = NULL;
  struct export *e = NULL;
  strata_error *se = NULL;
  bool taken;

  graph_set_replace_hook (export_replace);
  type = json_string_value (json_object_get (args, "type"));
  if (type && strcmp (type, "nbd") != 0) {
    qmp_error_set (err, "GenericError", "Export type '%s' is not supported "
                   "by stratad (only 'nbd')", type);
    return NULL;
  }
  if (!qmp_args_check (args, spec, err))
    return NULL;
  id = json_string_value (json_object_get (args, "id"));
  node_name = json_string_value (json_object_get (args, "node-name"));
  name = json_string_value (json_object_get (args, "name"));
  desc = json_string_value (json_object_get (args, "description"));
  if (!name)
    name = node_name;
  if (!id_wellformed (id)) {
    qmp_error_set (err, "GenericError", "Invalid block export id");
    return NULL;
  }
  pthread_mutex_lock (&exp_lock);
  taken = export_find_exp_locked (id) != NULL;
  srv = server;
  pthread_mutex_unlock (&exp_lock);
  if (taken) {
    qmp_error_set (err, "GenericError", "Block export id '%s' is already "
                   "in use", id);
    return NULL;
  }
  if (!(node = graph_lookup (node_name))) {
    qmp_error_set (err, "GenericError",
                   "Cannot find device='' nor node-name='%s'", node_name);
    return NULL;
  }
  flags.writable = opt_bool (args, "writable");
  flags.writethrough = opt_bool (args, "writethrough");
  flags.allocation_depth = opt_bool (args, "allocation-depth");
  /* Every connection shares the node, and a flush is global to it. */
  flags.multi_conn = true;
  flags.discard = true;  /* the node's own discard option decides */
  if (flags.writable && node->read_only) {
    qmp_error_set (err, "GenericError", "Cannot export read-only node as "
                   "writable");
    goto fail;
  }
  if (json_object_get (args, "bitmaps")
      && json_array_size (json_object_get (args, "bitmaps")) > 0) {
    qmp_error_set (err, "GenericError", "Bitmap '%s' is not found",
                   json_string_value (json_array_get (
                       json_object_get (args, "bitmaps"), 0)));
    goto fail;
  }
  if (!srv) {
    qmp_error_set (err, "GenericError", "NBD server not running");
    goto fail;
  }
  if (strlen (name) > NBD_MAX_STRING) {
    qmp_error_set (err, "GenericError", "export name '%s' too long", name);
    goto fail;
  }
  if (desc && strlen (desc) > NBD_MAX_STRING) {
    qmp_error_set (err, "GenericError", "description '%s' too long", desc);
    goto fail;
  }
  if ((e = calloc (1, sizeof *e))
      && asprintf (&e->user, "export '%s'", id) < 0)
    e->user = NULL;  /* asprintf leaves it undefined */
  if (!e || !e->user || !(e->id = strdup (id)) || !(e->name = strdup (name))
      || !graph_add_user (node, e->user)) {
    qmp_error_set (err, "GenericError", "out of memory");
    goto fail;
  }
  e->node = node;
  /* Listed before the server knows it, so that export_gone finds it. */
  export_append (e);
  if (!nbd_server_add_export_full (srv, name, desc, node, &flags,
                                   export_gone, e, &se)) {
    if (strata_error_errno (se) == EEXIST)
      qmp_error_set (err, "GenericError", "NBD server already has export "
                     "named '%s'", name);
    else
      qmp_error_set (err, "GenericError", "%s", strata_error_message (se));
    strata_error_free (se);
    export_unlink (e);
    graph_remove_user (node, e->user);
    goto fail;
  }
  return json_object ();

fail:
  export_free (e);
  node_unref (node);
  return NULL;
}

/* ---- block-export-del ---- */

static json_t *
cmd_block_export_del (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = {
    { "id", "string", true }, { "mode", "string", false }, { NULL },
  };
  const char *id, *mode;
  CLEANUP_FREE char *name = NULL;
  struct nbd_server *srv;
  struct export *e;
  strata_error *se = NULL;
  bool hard;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  id = json_string_value (json_object_get (args, "id"));
  mode = json_string_value (json_object_get (args, "mode"));
  if (mode && strcmp (mode, "safe") != 0 && strcmp (mode, "hard") != 0) {
    qmp_error_set (err, "GenericError",
                   "Parameter 'mode' does not accept value '%s'", mode);
    return NULL;
  }
  hard = mode && strcmp (mode, "hard") == 0;
  pthread_mutex_lock (&exp_lock);
  e = export_find_exp_locked (id);
  srv = server;
  if (!e)
    qmp_error_set (err, "GenericError", "Export '%s' is not found", id);
  else if (e->shutting_down)
    qmp_error_set (err, "GenericError", "Export '%s' is already shutting "
                   "down", id);
  else if (!(name = strdup (e->name)))
    qmp_error_set (err, "GenericError", "out of memory");
  else
    e->shutting_down = true;  /* first: the removal may free E at once */
  pthread_mutex_unlock (&exp_lock);
  if (!name)
    return NULL;
  if (!nbd_server_remove_export (srv, name, hard, &se)) {
    pthread_mutex_lock (&exp_lock);
    if ((e = export_find_exp_locked (id)))
      e->shutting_down = false;
    pthread_mutex_unlock (&exp_lock);
    if (strata_error_errno (se) == EBUSY)
      qmp_error_set (err, "GenericError", "export '%s' still in use", id);
    else
      qmp_error_set (err, "GenericError", "%s", strata_error_message (se));
    strata_error_free (se);
    return NULL;
  }
  return json_object ();
}

/* ---- query-block-exports ---- */

static json_t *
cmd_query_block_exports (json_t *args, struct qmp_error *err)
{
  static const struct qmp_arg spec[] = { { NULL } };
  json_t *list;

  if (!qmp_args_check (args, spec, err))
    return NULL;
  list = json_array ();
  pthread_mutex_lock (&exp_lock);
  /* Newest first, as QEMU lists them. */
  for (struct export *e = exports; e; e = e->next)
    json_array_insert_new (
        list, 0,
        json_pack ("{s:s,s:b,s:s,s:s}", "node-name", e->node->node_name,
                   "shutting-down", e->shutting_down, "type", "nbd", "id",
                   e->id));
  pthread_mutex_unlock (&exp_lock);
  return list;
}

const struct qmp_command qmp_export_commands[] = {
  { "nbd-server-start", cmd_nbd_server_start },
  { "nbd-server-stop", cmd_nbd_server_stop },
  { "block-export-add", cmd_block_export_add },
  { "block-export-del", cmd_block_export_del },
  { "query-block-exports", cmd_query_block_exports },
  { NULL, NULL },
};
