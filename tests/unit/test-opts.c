/* Unit tests of option parsing (src/util/opts.c). */
#include <stdint.h>

#include "test.h"
#include "util/opts.h"

static void
test_parse_pairs (void)
{
  strata_opts *o = opts_new ();

  CHECK (opts_parse (o, "driver=raw,file.filename=a.img,size=1M", NULL));
  CHECK (o->n == 3);
  CHECK (strcmp (opts_get (o, "driver"), "raw") == 0);
  CHECK (strcmp (opts_get (o, "file.filename"), "a.img") == 0);
  opts_free (o);
}

static void
test_comma_escape (void)
{
  strata_opts *o = opts_new ();

  CHECK (opts_parse (o, "filename=a,,b.img,x=1", NULL));
  CHECK (strcmp (opts_get (o, "filename"), "a,b.img") == 0);
  CHECK (strcmp (opts_get (o, "x"), "1") == 0);
  opts_free (o);
}

static void
test_later_key_wins (void)
{
  strata_opts *o = opts_new ();

  CHECK (opts_parse (o, "a=1,a=2", NULL));
  CHECK (o->n == 1);
  CHECK (strcmp (opts_get (o, "a"), "2") == 0);
  opts_free (o);
}

static void
test_missing_equals_refused (void)
{
  strata_opts *o = opts_new ();
  strata_error *err = NULL;

  CHECK (!opts_parse (o, "a=1,bogus", &err));
  CHECK_STR_CONTAINS (strata_error_message (err), "'bogus'");
  CHECK (strata_error_errno (err) == EINVAL);
  strata_error_free (err);
  opts_free (o);
}

static void
test_extract_prefix (void)
{
  strata_opts *o = opts_new (), *sub;

  CHECK (opts_parse (o, "driver=raw,file.driver=file,file.filename=x,"
                        "filex=1,file.cache.direct=on", NULL));
  sub = opts_extract (o, "file");
  CHECK (sub && sub->n == 3);
  CHECK (strcmp (opts_get (sub, "cache.direct"), "on") == 0);
  CHECK (o->n == 2);                 /* "filex" is not under "file." */
  CHECK (opts_has (o, "filex"));
  CHECK (!opts_has (o, "file.driver"));
  opts_free (sub);
  opts_free (o);
}

static void
test_unused_option_named (void)
{
  strata_opts *o = opts_new ();
  strata_error *err = NULL;

  CHECK (opts_parse (o, "driver=raw,colour=blue", NULL));
  opts_get (o, "driver");
  CHECK (!opts_check_used (o, "img", &err));
  CHECK_STR_CONTAINS (strata_error_message (err), "unknown option 'colour'");
  strata_error_free (err);
  opts_get (o, "colour");
  CHECK (opts_check_used (o, "img", NULL));
  opts_free (o);
}

static void
test_bool_values (void)
{
  strata_opts *o = opts_new ();
  strata_error *err = NULL;
  bool b;

  CHECK (opts_parse (o, "a=on,b=off,c=maybe", NULL));
  CHECK (opts_get_bool (o, "a", false, &b, NULL) && b);
  CHECK (opts_get_bool (o, "b", true, &b, NULL) && !b);
  CHECK (opts_get_bool (o, "absent", true, &b, NULL) && b);
  CHECK (!opts_get_bool (o, "c", false, &b, &err));
  CHECK_STR_CONTAINS (strata_error_message (err), "'c'");
  strata_error_free (err);
  opts_free (o);
}

static void
test_sizes (void)
{
  uint64_t v;

  CHECK (parse_size ("0", &v) && v == 0);
  CHECK (parse_size ("512", &v) && v == 512);
  CHECK (parse_size ("4k", &v) && v == 4096);
  CHECK (parse_size ("4K", &v) && v == 4096);
  CHECK (parse_size ("1M", &v) && v == 1048576);
  CHECK (parse_size ("1.5G", &v) && v == 1610612736ULL);
  CHECK (parse_size ("0x1000", &v) && v == 4096);
  CHECK (parse_size ("3B", &v) && v == 3);
  CHECK (parse_size ("8E", &v) && v == 9223372036854775808ULL);
}

static void
test_size_garbage_and_overflow (void)
{
  uint64_t v;

  CHECK (!parse_size ("", &v));
  CHECK (!parse_size ("abc", &v));
  CHECK (!parse_size ("-1", &v));
  CHECK (!parse_size ("1Q", &v));
  CHECK (!parse_size ("1.5", &v));          /* a fraction needs a unit */
  CHECK (!parse_size ("16E", &v));          /* 2^64 overflows */
  CHECK (!parse_size ("99999999999999999999", &v));
  CHECK (!parse_size ("0x", &v));
  CHECK (!parse_size ("1kk", &v));
}

static void
test_cache_modes (void)
{
  char buf[128];
  bool wt;

  CHECK (cache_mode_options ("none", "qcow2", buf, sizeof buf, &wt) && !wt);
  CHECK (strcmp (buf, "file.cache.direct=on,file.cache.no-flush=off") == 0);
  CHECK (cache_mode_options ("writeback", NULL, buf, sizeof buf, &wt) && !wt);
  CHECK (strcmp (buf, "file.cache.direct=off,file.cache.no-flush=off") == 0);
  CHECK (cache_mode_options ("writethrough", "raw", buf, sizeof buf, &wt)
         && wt);
  CHECK (strcmp (buf, "file.cache.direct=off,file.cache.no-flush=off") == 0);
  CHECK (cache_mode_options ("directsync", "raw", buf, sizeof buf, &wt) && wt);
  CHECK (strcmp (buf, "file.cache.direct=on,file.cache.no-flush=off") == 0);
  CHECK (cache_mode_options ("unsafe", "file", buf, sizeof buf, &wt) && !wt);
  CHECK (strcmp (buf, "cache.direct=off,cache.no-flush=on") == 0);
  CHECK (!cache_mode_options ("fast", "raw", buf, sizeof buf, &wt));
}

TESTS (T (test_cache_modes), T (test_parse_pairs), T (test_comma_escape), T (test_later_key_wins),
       T (test_missing_equals_refused), T (test_extract_prefix),
       T (test_unused_option_named), T (test_bool_values), T (test_sizes),
       T (test_size_garbage_and_overflow))
