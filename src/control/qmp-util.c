/* strata: QMP errors and argument checking shared by every command; see
 * qmp.h.  Messages are QEMU's, word for word, because management software
 * matches on them. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "control/qmp.h"

void
qmp_error_set (struct qmp_error *err, const char *class, const char *fmt, ...)
{
  va_list ap;
  char *desc;

  if (!err || err->desc)
    return;  /* the first error wins */
  va_start (ap, fmt);
  if (vasprintf (&desc, fmt, ap) < 0)
    desc = NULL;
  va_end (ap);
  err->class = class;
  err->desc = desc ? desc : strdup ("out of memory");
}

void
qmp_error_from (struct qmp_error *err, strata_error *e)
{
  qmp_error_set (err, "GenericError", "%s",
                 e ? strata_error_message (e) : "unknown error");
  strata_error_free (e);
}

void
qmp_error_clear (struct qmp_error *err)
{
  free (err->desc);
  err->desc = NULL;
  err->class = NULL;
}

static bool
type_matches (json_t *v, const char *type)
{
  if (strcmp (type, "any") == 0)
    return true;
  if (strcmp (type, "string") == 0)
    return json_is_string (v);
  if (strcmp (type, "bool") == 0)
    return json_is_boolean (v);
  if (strcmp (type, "int") == 0)
    return json_is_integer (v);
  if (strcmp (type, "object") == 0)
    return json_is_object (v);
  if (strcmp (type, "array") == 0)
    return json_is_array (v);
  if (strcmp (type, "str-or-null") == 0)
    return json_is_string (v) || json_is_null (v);
  return false;
}

static const char *
type_name (const char *type)
{
  if (strcmp (type, "str-or-null") == 0)
    return "string";
  if (strcmp (type, "bool") == 0)
    return "boolean";
  if (strcmp (type, "int") == 0)
    return "integer";
  return type;
}

bool
qmp_args_check_at (json_t *args, const struct qmp_arg *spec,
                   const char *prefix, struct qmp_error *err)
{
  const char *key;
  json_t *v;

  if (args && !json_is_object (args)) {
    qmp_error_set (err, "GenericError",
                   "QMP input member 'arguments' must be an object");
    return false;
  }
  for (const struct qmp_arg *a = spec; a->name; a++) {
    v = args ? json_object_get (args, a->name) : NULL;
    if (!v) {
      if (a->required) {
        qmp_error_set (err, "GenericError", "Parameter '%s%s' is missing",
                       prefix, a->name);
        return false;
      }
      continue;
    }
    if (!type_matches (v, a->type)) {
      qmp_error_set (err, "GenericError",
                     "Invalid parameter type for '%s%s', expected: %s",
                     prefix, a->name, type_name (a->type));
      return false;
    }
  }
  if (args) {
    json_object_foreach (args, key, v) {
      const struct qmp_arg *a = spec;
      while (a->name && strcmp (a->name, key) != 0)
        a++;
      if (!a->name) {
        qmp_error_set (err, "GenericError", "Parameter '%s%s' is unexpected",
                       prefix, key);
        return false;
      }
    }
  }
  return true;
}

bool
qmp_args_check (json_t *args, const struct qmp_arg *spec,
                struct qmp_error *err)
{
  return qmp_args_check_at (args, spec, "", err);
}

char *
qmp_default_socket_path (void)
{
  const char *xdg = getenv ("XDG_RUNTIME_DIR");
  char *path;

  if (xdg && *xdg) {
    if (asprintf (&path, "%s/strata/stratad.sock", xdg) < 0)
      path = NULL;
  }
  else if (geteuid () == 0)
    path = strdup ("/run/strata/stratad.sock");
  else if (asprintf (&path, "/tmp/strata-%u/stratad.sock",
                     (unsigned) geteuid ()) < 0)
    path = NULL;
  return path;
}

/* ---- the command tables ---- */

static const struct qmp_command *const tables[] = {
  qmp_block_commands,
  qmp_export_commands,
  qmp_stream_commands,
  qmp_commit_commands,
  qmp_mirror_commands,
  qmp_job_commands,
};

const struct qmp_command *
qmp_find_command (const char *name)
{
  for (size_t t = 0; t < sizeof tables / sizeof tables[0]; t++)
    for (const struct qmp_command *c = tables[t]; c->name; c++)
      if (strcmp (c->name, name) == 0)
        return c;
  return NULL;
}

void
qmp_foreach_command (void (*fn) (const struct qmp_command *cmd, void *opaque),
                     void *opaque)
{
  for (size_t t = 0; t < sizeof tables / sizeof tables[0]; t++)
    for (const struct qmp_command *c = tables[t]; c->name; c++)
      fn (c, opaque);
}
