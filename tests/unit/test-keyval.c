/* Unit tests for KEY=VALUE option strings (src/control/keyval.c): the
 * objects they make, the value types chosen without a schema, and the
 * errors for what they refuse. */
#include "control/server.h"
#include "test.h"

/* Parse the NULL-terminated ARGS; return the compact JSON (caller frees)
 * or NULL with *ERR set (caller frees). */
static char *
parse (char **err, char *const *args)
{
  int n = 0;
  json_t *obj;
  char *s;

  while (args[n])
    n++;
  *err = NULL;
  obj = qmp_keyval_parse (args, n, err);
  if (!obj)
    return NULL;
  s = json_dumps (obj, JSON_COMPACT | JSON_SORT_KEYS);
  json_decref (obj);
  return s;
}

#define PARSE(err, ...) parse (err, (char *const[]){ __VA_ARGS__, NULL })

static void
expect_json (const char *want, char *got, char *err)
{
  if (!got || strcmp (got, want) != 0)
    fprintf (stderr, "want %s, got %s (%s)\n", want, got ? got : "NULL",
             err ? err : "");
  CHECK (got && strcmp (got, want) == 0);
  CHECK (err == NULL);
  free (got);
}

static void
expect_error (const char *want, char *got, char *err)
{
  if (!err || strcmp (err, want) != 0)
    fprintf (stderr, "want error \"%s\", got \"%s\"\n", want,
             err ? err : "(none)");
  CHECK (got == NULL);
  CHECK (err && strcmp (err, want) == 0);
  free (err);
}

static void
test_flat (void)
{
  char *err;
  char *got = PARSE (&err, "driver=file,filename=a.img,node-name=n0");
  expect_json ("{\"driver\":\"file\",\"filename\":\"a.img\","
               "\"node-name\":\"n0\"}",
               got, err);
}

static void
test_dotted_keys_nest (void)
{
  char *err;
  char *got = PARSE (&err, "driver=qcow2,file.driver=file,"
                           "file.filename=a.qcow2,backing.file.x.y=z");
  expect_json ("{\"backing\":{\"file\":{\"x\":{\"y\":\"z\"}}},"
               "\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\","
               "\"filename\":\"a.qcow2\"}}",
               got, err);
}

static void
test_several_arguments_merge (void)
{
  char *err;
  char *got
      = PARSE (&err, "driver=raw", "file.driver=file", "file.filename=x");
  expect_json ("{\"driver\":\"raw\",\"file\":{\"driver\":\"file\","
               "\"filename\":\"x\"}}",
               got, err);
}

static void
test_value_types (void)
{
  char *err;
  char *got = PARSE (&err, "a=true,b=on,c=false,d=off,e=42,f=-7,g=4k,"
                           "h=1.5,i=,j=99999999999999999999");
  expect_json ("{\"a\":true,\"b\":true,\"c\":false,\"d\":false,\"e\":42,"
               "\"f\":-7,\"g\":\"4k\",\"h\":\"1.5\",\"i\":\"\","
               "\"j\":\"99999999999999999999\"}",
               got, err);
}

static void
test_naming_keys_stay_strings (void)
{
  char *err;
  char *got = PARSE (&err, "node-name=1,port=10809,file.filename=on,"
                           "id=true,read-only=on");
  expect_json ("{\"file\":{\"filename\":\"on\"},\"id\":\"true\","
               "\"node-name\":\"1\",\"port\":\"10809\",\"read-only\":true}",
               got, err);
}

static void
test_double_comma_escapes (void)
{
  char *err;
  char *got = PARSE (&err, "filename=a,,b.img,driver=file");
  expect_json ("{\"driver\":\"file\",\"filename\":\"a,b.img\"}", got, err);
}

static void
test_empty_items_skipped (void)
{
  char *err;
  char *got = PARSE (&err, ",driver=file,", "");
  expect_json ("{\"driver\":\"file\"}", got, err);
}

static void
test_value_may_hold_equals (void)
{
  char *err;
  char *got = PARSE (&err, "filename=a=b");
  expect_json ("{\"filename\":\"a=b\"}", got, err);
}

static void
test_error_no_equals (void)
{
  char *err;
  char *got = PARSE (&err, "driver=file,readonly");
  expect_error ("'readonly': expected KEY=VALUE", got, err);
}

static void
test_error_given_twice (void)
{
  char *err;
  char *got = PARSE (&err, "driver=file", "driver=raw");
  expect_error ("'driver' given twice", got, err);
  got = PARSE (&err, "file.driver=file,file.driver=raw");
  expect_error ("'file.driver' given twice", got, err);
  /* A key that already holds an object. */
  got = PARSE (&err, "file.driver=file,file=x");
  expect_error ("'file' given twice", got, err);
}

static void
test_error_value_and_object (void)
{
  char *err;
  char *got = PARSE (&err, "file=x,file.driver=file");
  expect_error ("'file' is both a value and an object", got, err);
}

static void
test_error_empty_key (void)
{
  char *err;
  char *got = PARSE (&err, "=x");
  expect_error ("invalid key ''", got, err);
  got = PARSE (&err, "file.=x");
  expect_error ("invalid key 'file.'", got, err);
  /* An empty component before a dot: the message names the key up to it. */
  got = PARSE (&err, ".a=x");
  expect_error ("invalid key ''", got, err);
}

TESTS (T (test_flat), T (test_dotted_keys_nest),
       T (test_several_arguments_merge), T (test_value_types),
       T (test_naming_keys_stay_strings), T (test_double_comma_escapes),
       T (test_empty_items_skipped), T (test_value_may_hold_equals),
       T (test_error_no_equals), T (test_error_given_twice),
       T (test_error_value_and_object), T (test_error_empty_key))
