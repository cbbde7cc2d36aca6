/* strata: KEY=VALUE option strings to JSON objects, for stratad's
 * --blockdev and the strata client's `add`.
 *
 * "driver=qcow2,node-name=top,file.driver=file,file.filename=a.qcow2"
 * becomes {"driver": "qcow2", "node-name": "top",
 *          "file": {"driver": "file", "filename": "a.qcow2"}}.
 * QEMU converts values with the command's schema; without one, a value
 * that reads as an integer becomes an integer and true/false/on/off a
 * boolean, except for keys that name things (which stay strings).  Pass
 * JSON for anything this gets wrong.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "control/server.h"

static const char *const string_keys[] = {
  "driver", "node-name", "filename", "file", "backing", "format", "node",
  "overlay", "snapshot-file", "snapshot-node-name", "data-file", "path",
  "host", "export", "name", "id", "description", "type", "port",
  "iothread", "tls-creds", "tls-authz", NULL,
};

static char *
keyval_error (const char *fmt, ...)
{
  va_list ap;
  char *s;

  va_start (ap, fmt);
  if (vasprintf (&s, fmt, ap) < 0)
    s = NULL;
  va_end (ap);
  return s;
}

static json_t *
keyval_value (const char *key, const char *value)
{
  char *end;
  long long n;

  for (const char *const *k = string_keys; *k; k++)
    if (strcmp (*k, key) == 0)
      return json_string (value);
  if (strcmp (value, "true") == 0 || strcmp (value, "on") == 0)
    return json_true ();
  if (strcmp (value, "false") == 0 || strcmp (value, "off") == 0)
    return json_false ();
  errno = 0;
  n = strtoll (value, &end, 10);
  if (*value && *end == '\0' && errno == 0)
    return json_integer (n);
  return json_string (value);
}

/* Set DOTTED=VALUE in OBJ, creating the objects on the way. */
static bool
keyval_set (json_t *obj, char *dotted, const char *value, char **errmsg)
{
  char *dot, *key = dotted;
  json_t *child;

  while ((dot = strchr (key, '.')) != NULL) {
    *dot = '\0';
    if (!*key) {
      *errmsg = keyval_error ("invalid key '%s'", dotted);
      return false;
    }
    child = json_object_get (obj, key);
    if (!child) {
      child = json_object ();
      json_object_set_new (obj, key, child);
    }
    else if (!json_is_object (child)) {
      *errmsg = keyval_error ("'%s' is both a value and an object", key);
      return false;
    }
    *dot = '.';
    obj = child;
    key = dot + 1;
  }
  if (!*key || json_object_get (obj, key)) {
    *errmsg = keyval_error (*key ? "'%s' given twice" : "invalid key '%s'",
                            dotted);
    return false;
  }
  json_object_set_new (obj, key, keyval_value (key, value));
  return true;
}

/* One "k=v,k=v" string into OBJ. */
static bool
keyval_parse_one (json_t *obj, const char *arg, char **errmsg)
{
  size_t len = strlen (arg);
  char *buf = malloc (len + 1), *val;
  const char *p = arg;
  bool ok = true;

  if (!buf) {
    *errmsg = keyval_error ("out of memory");
    return false;
  }
  while (ok && *p) {
    size_t n = 0;
    char *eq;
    /* One item, with ",," unescaped to ",". */
    while (*p && !(p[0] == ',' && p[1] != ',')) {
      if (p[0] == ',' && p[1] == ',')
        p++;
      buf[n++] = *p++;
    }
    buf[n] = '\0';
    if (*p == ',')
      p++;
    if (n == 0)
      continue;
    eq = strchr (buf, '=');
    if (!eq) {
      *errmsg = keyval_error ("'%s': expected KEY=VALUE", buf);
      ok = false;
      break;
    }
    *eq = '\0';
    val = eq + 1;
    ok = keyval_set (obj, buf, val, errmsg);
  }
  free (buf);
  return ok;
}

json_t *
qmp_keyval_parse (char *const *args, int nargs, char **errmsg)
{
  json_t *obj = json_object ();

  for (int i = 0; i < nargs; i++)
    if (!keyval_parse_one (obj, args[i], errmsg)) {
      json_decref (obj);
      return NULL;
    }
  return obj;
}
