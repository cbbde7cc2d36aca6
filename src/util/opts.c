/* strata: driver options; see opts.h. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/checked.h"
#include "util/opts.h"

strata_opts *
opts_new (void)
{
  return calloc (1, sizeof (strata_opts));
}

void
opts_free (strata_opts *opts)
{
  if (!opts)
    return;
  for (size_t i = 0; i < opts->n; i++) {
    free (opts->v[i].key);
    free (opts->v[i].value);
  }
  free (opts->v);
  free (opts);
}

static struct opt *
opts_find (const strata_opts *opts, const char *key)
{
  for (size_t i = 0; i < opts->n; i++)
    if (strcmp (opts->v[i].key, key) == 0)
      return &opts->v[i];
  return NULL;
}

/* Takes ownership of KEY and VALUE. */
static bool
opts_set_owned (strata_opts *opts, char *key, char *value)
{
  struct opt *o = opts_find (opts, key);
  struct opt *v;

  if (o) {
    free (key);
    free (o->value);
    o->value = value;
    o->used = false;
    return true;
  }
  v = realloc (opts->v, (opts->n + 1) * sizeof *v);
  if (!v) {
    free (key);
    free (value);
    return false;
  }
  opts->v = v;
  v[opts->n++] = (struct opt){ .key = key, .value = value };
  return true;
}

bool
opts_set (strata_opts *opts, const char *key, const char *value)
{
  char *k = strdup (key), *v = strdup (value);

  if (!k || !v) {
    free (k);
    free (v);
    return false;
  }
  return opts_set_owned (opts, k, v);
}

/* Copy one ",,"-escaped token from *P up to '=' (when STOP_AT_EQ) or ','. */
static char *
scan_token (const char **p, bool stop_at_eq)
{
  const char *s = *p;
  size_t n = 0;
  char *out = malloc (strlen (s) + 1);

  if (!out)
    return NULL;
  while (*s) {
    if (*s == ',') {
      if (s[1] != ',')
        break;
      s++;
    }
    else if (stop_at_eq && *s == '=')
      break;
    out[n++] = *s++;
  }
  out[n] = '\0';
  *p = s;
  return out;
}

bool
opts_parse (strata_opts *opts, const char *str, strata_error **errp)
{
  const char *p = str;

  while (*p) {
    char *key = scan_token (&p, true), *value;

    if (!key) {
      error_set (errp, ENOMEM, "out of memory");
      return false;
    }
    if (*key == '\0') {
      error_set (errp, EINVAL, "invalid option list '%s': empty key", str);
      free (key);
      return false;
    }
    if (*p != '=') {
      error_set (errp, EINVAL, "expected '=' after option '%s'", key);
      free (key);
      return false;
    }
    p++;
    value = scan_token (&p, false);
    if (!value || !opts_set_owned (opts, key, value)) {
      if (!value)
        free (key);
      error_set (errp, ENOMEM, "out of memory");
      return false;
    }
    if (*p == ',')
      p++;
  }
  return true;
}

const char *
opts_get (strata_opts *opts, const char *key)
{
  struct opt *o = opts_find (opts, key);

  if (!o)
    return NULL;
  o->used = true;
  return o->value;
}

bool
opts_has (const strata_opts *opts, const char *key)
{
  return opts_find (opts, key) != NULL;
}

bool
parse_bool (const char *str, bool *out)
{
  static const char *const yes[] = { "on", "true", "yes", "1" };
  static const char *const no[] = { "off", "false", "no", "0" };

  for (size_t i = 0; i < 4; i++) {
    if (strcmp (str, yes[i]) == 0) {
      *out = true;
      return true;
    }
    if (strcmp (str, no[i]) == 0) {
      *out = false;
      return true;
    }
  }
  return false;
}

bool
opts_get_bool (strata_opts *opts, const char *key, bool def, bool *out,
               strata_error **errp)
{
  const char *v = opts_get (opts, key);

  if (!v) {
    *out = def;
    return true;
  }
  if (!parse_bool (v, out)) {
    error_set (errp, EINVAL, "option '%s' expects 'on' or 'off', not '%s'",
               key, v);
    return false;
  }
  return true;
}

bool
opts_get_size (strata_opts *opts, const char *key, uint64_t def,
               uint64_t *out, strata_error **errp)
{
  const char *v = opts_get (opts, key);

  if (!v) {
    *out = def;
    return true;
  }
  if (!parse_size (v, out)) {
    error_set (errp, EINVAL, "option '%s' expects a size, not '%s'", key, v);
    return false;
  }
  return true;
}

strata_opts *
opts_extract (strata_opts *opts, const char *prefix)
{
  strata_opts *sub = opts_new ();
  size_t plen = strlen (prefix), j = 0;

  if (!sub)
    return NULL;
  for (size_t i = 0; i < opts->n; i++) {
    struct opt *o = &opts->v[i];

    if (strncmp (o->key, prefix, plen) == 0 && o->key[plen] == '.') {
      char *k = strdup (o->key + plen + 1);

      if (!k || !opts_set_owned (sub, k, o->value)) {
        opts_free (sub);
        return NULL;
      }
      free (o->key);
      continue;
    }
    opts->v[j++] = *o;
  }
  opts->n = j;
  return sub;
}

bool
opts_check_used (const strata_opts *opts, const char *what,
                 strata_error **errp)
{
  for (size_t i = 0; i < opts->n; i++) {
    if (!opts->v[i].used) {
      error_set (errp, EINVAL, "%s: unknown option '%s'", what,
                 opts->v[i].key);
      return false;
    }
  }
  return true;
}

bool
parse_size (const char *str, uint64_t *out)
{
  const char *p = str;
  char *end;
  uint64_t whole, mult = 1;
  double frac = 0;
  unsigned shift = 0;

  if (!*p || *p == '-' || *p == '+' || *p == ' ')
    return false;
  errno = 0;
  if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
    whole = strtoull (p, &end, 16);
    if (errno || end == p + 2 || *end)
      return false;
    *out = whole;
    return true;
  }
  whole = strtoull (p, &end, 10);
  if (errno || end == p)
    return false;
  if (*end == '.') {
    char *fend;

    frac = strtod (end, &fend);
    if (fend == end + 1)
      return false;
    end = fend;
  }
  switch (*end) {
  case '\0': break;
  case 'b': case 'B': shift = 0; end++; break;
  case 'k': case 'K': shift = 10; end++; break;
  case 'm': case 'M': shift = 20; end++; break;
  case 'g': case 'G': shift = 30; end++; break;
  case 't': case 'T': shift = 40; end++; break;
  case 'p': case 'P': shift = 50; end++; break;
  case 'e': case 'E': shift = 60; end++; break;
  default: return false;
  }
  if (*end)
    return false;
  if (frac != 0 && shift == 0)
    return false;
  mult = UINT64_C (1) << shift;
  if (!checked_mul_u64 (whole, mult, out))
    return false;
  if (frac != 0) {
    double extra = frac * (double) mult;
    uint64_t e = (uint64_t) extra;

    if (extra >= 18446744073709551616.0 || !checked_add_u64 (*out, e, out))
      return false;
  }
  return true;
}

bool
cache_mode_options (const char *mode, const char *format, char *buf,
                    size_t size, bool *writethrough)
{
  const char *prefix = format && strcmp (format, "file") == 0 ? "" : "file.";
  bool direct, no_flush = false;

  *writethrough = false;
  if (strcmp (mode, "none") == 0 || strcmp (mode, "off") == 0)
    direct = true;
  else if (strcmp (mode, "writeback") == 0)
    direct = false;
  else if (strcmp (mode, "writethrough") == 0)
    direct = false, *writethrough = true;
  else if (strcmp (mode, "directsync") == 0)
    direct = true, *writethrough = true;
  else if (strcmp (mode, "unsafe") == 0)
    direct = false, no_flush = true;
  else
    return false;
  snprintf (buf, size, "%scache.direct=%s,%scache.no-flush=%s", prefix,
            direct ? "on" : "off", prefix, no_flush ? "on" : "off");
  return true;
}
