/* strata: QEMU's BlockdevOptions for stratad (QAPI schema checks).
 *
 * A blockdev definition is checked against the schema of the drivers
 * strata has, in the order QEMU's QAPI visitor checks it (members in
 * schema order, nested definitions where they appear, unknown members at
 * the end of each object), with QEMU 7.2's messages, and then flattened
 * into the core's dotted options ("file.filename=...", "backing=" for
 * null).  Nothing here looks at nodes: references are checked by the
 * core when it opens the definition.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "control/blockdev-schema.h"
#include "util/cleanup.h"

enum kind {
  K_STR,
  K_BOOL,
  K_INT,
  K_ENUM,
  K_OBJ,
  K_REF,
  K_REF_OR_NULL,
  K_LIST /* of objects with MEMBERS */
};

struct member {
  const char *name;
  enum kind kind;
  bool required;
  const char *const *values;    /* K_ENUM */
  const struct member *members; /* K_OBJ, K_LIST */
  bool pass;                    /* hand to the core */
};

static const char *const discard_values[] = { "ignore", "unmap", NULL };
static const char *const dz_values[] = { "off", "on", "unmap", NULL };
static const char *const locking_values[] = { "off", "on", "auto", NULL };
static const char *const aio_values[]
    = { "threads", "native", "io_uring", NULL };
static const char *const driver_values[]
    = { "blkdebug", "copy-on-read", "file", "nbd", "qcow2", "raw", NULL };

static const struct member cache_members[] = {
  { "direct", K_BOOL, false, NULL, NULL, true },
  { "no-flush", K_BOOL, false, NULL, NULL, true },
  { NULL },
};

/* BlockdevOptionsBase, then each driver's variant members. */
static const struct member base_members[] = {
  { "driver", K_ENUM, true, driver_values, NULL, true },
  { "node-name", K_STR, false, NULL, NULL, true },
  { "discard", K_ENUM, false, discard_values, NULL, false },
  { "cache", K_OBJ, false, NULL, cache_members, true },
  { "read-only", K_BOOL, false, NULL, NULL, true },
  { "auto-read-only", K_BOOL, false, NULL, NULL, false },
  { "force-share", K_BOOL, false, NULL, NULL, true },
  { "detect-zeroes", K_ENUM, false, dz_values, NULL, false },
  { NULL },
};
static const struct member file_members[] = {
  { "filename", K_STR, true, NULL, NULL, true },
  { "locking", K_ENUM, false, locking_values, NULL, true },
  { "aio", K_ENUM, false, aio_values, NULL, true },
  { NULL },
};
static const struct member raw_members[] = {
  { "file", K_REF, true, NULL, NULL, true },
  { "offset", K_INT, false, NULL, NULL, true },
  { "size", K_INT, false, NULL, NULL, true },
  { NULL },
};
static const struct member qcow2_members[] = {
  { "file", K_REF, true, NULL, NULL, true },
  { "backing", K_REF_OR_NULL, false, NULL, NULL, true },
  { "l2-cache-size", K_INT, false, NULL, NULL, true },
  { "l2-cache-entry-size", K_INT, false, NULL, NULL, true },
  { NULL },
};

/* SocketAddress; which members a type needs is checked by
 * check_nbd_server (QEMU's union). */
static const char *const socket_types[]
    = { "inet", "unix", "vsock", "fd", NULL };
static const struct member socket_members[] = {
  { "type", K_ENUM, true, socket_types, NULL, true },
  { "path", K_STR, false, NULL, NULL, true },
  { "host", K_STR, false, NULL, NULL, true },
  { "port", K_STR, false, NULL, NULL, true },
  { NULL },
};
/* BlockdevOptionsNbd without TLS, dirty bitmaps and open-timeout. */
static const struct member nbd_members[] = {
  { "server", K_OBJ, true, NULL, socket_members, true },
  { "export", K_STR, false, NULL, NULL, true },
  { "reconnect-delay", K_INT, false, NULL, NULL, true },
  { NULL },
};

static const struct member cor_members[] = {
  { "file", K_REF, true, NULL, NULL, true },
  { "bottom", K_STR, false, NULL, NULL, true },
  { NULL },
};
static const struct member inject_error_members[] = {
  { "event", K_STR, true, NULL, NULL, true },
  { "state", K_INT, false, NULL, NULL, true },
  { "iotype", K_STR, false, NULL, NULL, true },
  { "errno", K_INT, false, NULL, NULL, true },
  { "sector", K_INT, false, NULL, NULL, true },
  { "once", K_BOOL, false, NULL, NULL, true },
  { "immediately", K_BOOL, false, NULL, NULL, true },
  { "countdown", K_INT, false, NULL, NULL, true }, /* strata's own */
  { NULL },
};
/* The subset of QEMU's BlockdevOptionsBlkdebug in drivers/blkdebug.c. */
static const struct member blkdebug_members[] = {
  { "image", K_REF, true, NULL, NULL, true },
  { "config", K_STR, false, NULL, NULL, true },
  { "inject-error", K_LIST, false, NULL, inject_error_members, true },
  { NULL },
};

static const struct member *
variant_members (const char *driver)
{
  if (strcmp (driver, "file") == 0)
    return file_members;
  if (strcmp (driver, "copy-on-read") == 0)
    return cor_members;
  if (strcmp (driver, "blkdebug") == 0)
    return blkdebug_members;
  if (strcmp (driver, "raw") == 0)
    return raw_members;
  if (strcmp (driver, "nbd") == 0)
    return nbd_members;
  return qcow2_members;
}

/* The members SocketAddress's type needs, in QEMU's words. */
static bool
check_nbd_server (json_t *obj, const char *path, struct qmp_error *err)
{
  json_t *server = json_object_get (obj, "server");
  const char *type = json_string_value (json_object_get (server, "type"));
  const char *need[2] = { NULL, NULL };

  if (strcmp (type, "unix") == 0)
    need[0] = "path";
  else if (strcmp (type, "inet") == 0)
    need[0] = "host", need[1] = "port";
  else {
    qmp_error_set (err, "GenericError",
                   "strata does not implement "
                   "server.type '%s' (only 'unix' and 'inet')",
                   type);
    return false;
  }
  for (int i = 0; i < 2 && need[i]; i++)
    if (!json_object_get (server, need[i])) {
      qmp_error_set (err, "GenericError",
                     "Parameter '%sserver.%s' is "
                     "missing",
                     path, need[i]);
      return false;
    }
  json_int_t delay
      = json_integer_value (json_object_get (obj, "reconnect-delay"));
  if (delay < 0 || delay > UINT32_MAX) {
    qmp_error_set (err, "GenericError",
                   "Parameter '%sreconnect-delay' expects uint32_t", path);
    return false;
  }
  return true;
}

static bool visit_blockdev (json_t *obj, const char *path, strata_opts *out,
                            const char *prefix, struct qmp_error *err);
static bool visit_list (json_t *list, const struct member *spec,
                        const char *path, strata_opts *out, const char *prefix,
                        struct qmp_error *err);

static bool
put (strata_opts *out, const char *prefix, const char *name, const char *value,
     struct qmp_error *err)
{
  char *key;
  bool ok;

  if (asprintf (&key, "%s%s", prefix, name) < 0) {
    qmp_error_set (err, "GenericError", "out of memory");
    return false;
  }
  ok = opts_set (out, key, value);
  free (key);
  if (!ok)
    qmp_error_set (err, "GenericError", "out of memory");
  return ok;
}

static const char *
kind_name (enum kind k)
{
  switch (k) {
  case K_BOOL: return "boolean";
  case K_INT: return "integer";
  case K_OBJ: return "object";
  case K_REF: return "BlockdevRef";
  case K_REF_OR_NULL: return "BlockdevRefOrNull";
  case K_LIST: return "array";
  default: return "string";
  }
}

/* Check OBJ's members against SPEC and flatten the ones the core takes
 * into OUT under PREFIX.  PATH prefixes names in messages. */
static bool
visit_members (json_t *obj, const struct member *spec, const char *path,
               strata_opts *out, const char *prefix, struct qmp_error *err)
{
  char buf[64];

  for (const struct member *m = spec; m->name; m++) {
    json_t *v = json_object_get (obj, m->name);
    CLEANUP_FREE char *p = NULL, *px = NULL;
    bool ok;

    if (asprintf (&p, "%s%s", path, m->name) < 0
        || asprintf (&px, "%s%s.", prefix, m->name) < 0) {
      qmp_error_set (err, "GenericError", "out of memory");
      return false;
    }
    if (!v) {
      if (m->required) {
        qmp_error_set (err, "GenericError", "Parameter '%s' is missing", p);
        return false;
      }
      continue;
    }
    switch (m->kind) {
    case K_STR:
    case K_ENUM: ok = json_is_string (v); break;
    case K_BOOL: ok = json_is_boolean (v); break;
    case K_INT: ok = json_is_integer (v); break;
    case K_OBJ: ok = json_is_object (v); break;
    case K_REF: ok = json_is_string (v) || json_is_object (v); break;
    case K_LIST: ok = json_is_array (v); break;
    default: ok = json_is_string (v) || json_is_object (v) || json_is_null (v);
    }
    if (!ok) {
      qmp_error_set (err, "GenericError",
                     "Invalid parameter type for '%s', expected: %s", p,
                     kind_name (m->kind));
      return false;
    }
    if (m->kind == K_ENUM) {
      const char *const *e = m->values;
      while (*e && strcmp (*e, json_string_value (v)) != 0)
        e++;
      if (!*e) {
        /* QEMU's visitor names an enum member without its path. */
        qmp_error_set (err, "GenericError",
                       "Parameter '%s' does not accept value '%s'", m->name,
                       json_string_value (v));
        return false;
      }
    }
    if (strcmp (m->name, "detect-zeroes") == 0
        && strcmp (json_string_value (v), "off") != 0) {
      qmp_error_set (err, "GenericError",
                     "strata does not implement "
                     "detect-zeroes=%s",
                     json_string_value (v));
      return false;
    }
    if (m->kind == K_LIST) {
      if (!visit_list (v, m->members, p, out, px, err))
        return false;
      continue;
    }
    if (json_is_object (v)) {
      CLEANUP_FREE char *np = NULL;
      if (asprintf (&np, "%s.", p) < 0)
        np = NULL;
      if (!np
          || (m->kind == K_OBJ
                  ? !visit_members (v, m->members, np, out, px, err)
                  : !visit_blockdev (v, np, out, px, err)))
        return false;
      continue;
    }
    if (!m->pass)
      continue;
    if (json_is_null (v))
      ok = put (out, prefix, m->name, "", err);
    else if (json_is_boolean (v))
      ok = put (out, prefix, m->name, json_is_true (v) ? "on" : "off", err);
    else if (json_is_integer (v)) {
      snprintf (buf, sizeof buf, "%" JSON_INTEGER_FORMAT,
                json_integer_value (v));
      ok = put (out, prefix, m->name, buf, err);
    }
    else
      ok = put (out, prefix, m->name, json_string_value (v), err);
    if (!ok)
      return false;
  }
  return true;
}

/* Unknown members, after the known ones as QEMU's visitor reports them. */
static bool
check_unknown (json_t *obj, const struct member *a, const struct member *b,
               const char *path, struct qmp_error *err)
{
  const char *key;
  json_t *v;

  json_object_foreach (obj, key, v) {
    const struct member *m = NULL;
    for (const struct member *s = a; !m && s->name; s++)
      if (strcmp (s->name, key) == 0)
        m = s;
    for (const struct member *s = b; !m && b && s->name; s++)
      if (strcmp (s->name, key) == 0)
        m = s;
    if (!m) {
      qmp_error_set (err, "GenericError", "Parameter '%s%s' is unexpected",
                     path, key);
      return false;
    }
    if (m->kind == K_OBJ) {
      CLEANUP_FREE char *np = NULL;
      if (asprintf (&np, "%s%s.", path, key) < 0
          || !check_unknown (v, m->members, NULL, np, err))
        return false;
    }
  }
  return true;
}

/* A list of objects: element I is checked as PATH[I] and flattened
 * under PREFIX.I. (QEMU's dotted list syntax). */
static bool
visit_list (json_t *list, const struct member *spec, const char *path,
            strata_opts *out, const char *prefix, struct qmp_error *err)
{
  size_t i;
  json_t *e;

  json_array_foreach (list, i, e) {
    CLEANUP_FREE char *p = NULL, *np = NULL, *px = NULL;

    if (asprintf (&p, "%s[%zu]", path, i) < 0 || asprintf (&np, "%s.", p) < 0
        || asprintf (&px, "%s%zu.", prefix, i) < 0) {
      qmp_error_set (err, "GenericError", "out of memory");
      return false;
    }
    if (!json_is_object (e)) {
      qmp_error_set (err, "GenericError",
                     "Invalid parameter type for '%s', expected: object", p);
      return false;
    }
    if (!visit_members (e, spec, np, out, px, err)
        || !check_unknown (e, spec, NULL, np, err))
      return false;
  }
  return true;
}

static bool
visit_blockdev (json_t *obj, const char *path, strata_opts *out,
                const char *prefix, struct qmp_error *err)
{
  const char *driver;
  const struct member *variant;

  if (!visit_members (obj, base_members, path, out, prefix, err))
    return false;
  driver = json_string_value (json_object_get (obj, "driver"));
  variant = variant_members (driver);
  return visit_members (obj, variant, path, out, prefix, err)
         && check_unknown (obj, base_members, variant, path, err)
         && (strcmp (driver, "nbd") != 0 || check_nbd_server (obj, path, err));
}

bool
blockdev_options_visit (json_t *obj, const char *path, strata_opts *out,
                        struct qmp_error *err)
{
  return visit_blockdev (obj, path, out, "", err);
}
