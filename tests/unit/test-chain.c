/* strata: unit tests of the backing-chain walker (src/block/chain.c) and
 * its public face (strata_chain_find and friends), on a chain of qcow2
 * images in the test directory:
 *
 *   [copy-on-read] -> top.qcow2 -> mid.qcow2 -> base.qcow2
 *
 * Each overlay records its backing file by a relative name, so that the
 * three ways of naming a layer (path, relative to the image above, as
 * recorded) can be told apart. */
#include <limits.h>
#include <stdio.h>
#include <sys/stat.h>

#include "block/chain.h"
#include "test.h"
#include "util/cleanup.h"

/* Create DIR/NAME over BACKING (a name as recorded, or NULL), from inside
 * DIR so that relative names resolve; returns the path. */
static char *
make_qcow2 (const char *dir, const char *name, const char *backing)
{
  char *path, *o;
  char cwd[PATH_MAX];
  strata_error *err = NULL;

  CHECK (getcwd (cwd, sizeof cwd) && chdir (dir) == 0);
  CHECK (asprintf (&path, "%s/%s", dir, name) > 0);
  if (backing)
    CHECK (asprintf (&o, "size=1M,backing_file=%s,backing_fmt=qcow2", backing)
           > 0);
  else
    CHECK ((o = strdup ("size=1M")) != NULL);
  if (!strata_create (path, "qcow2", o, 0, &err))
    fprintf (stderr, "%s\n", strata_error_message (err));
  CHECK (!err);
  CHECK (chdir (cwd) == 0);
  free (o);
  return path;
}

struct chain {
  char *base, *mid, *top;
  strata_node *filter, *t, *m, *b;
};

/* The chain above, opened with a copy-on-read filter on top. */
static void
chain_open (struct chain *c)
{
  strata_error *err = NULL;

  c->base = make_qcow2 (test_tmpdir (), "base.qcow2", NULL);
  c->mid = make_qcow2 (test_tmpdir (), "mid.qcow2", "base.qcow2");
  c->top = make_qcow2 (test_tmpdir (), "top.qcow2", "mid.qcow2");
  c->filter = strata_open (c->top, "qcow2", NULL,
                           STRATA_OPEN_RDWR | STRATA_OPEN_COPY_ON_READ, &err);
  CHECK (c->filter && c->filter->drv->is_filter);
  c->t = c->filter->file;
  CHECK (c->t && !c->t->drv->is_filter);
  c->m = c->t->backing;
  CHECK (c->m && c->m->backing);
  c->b = c->m->backing;
  /* Relative names below resolve from the test directory only through
   * the rules that say so, never from the current directory. */
  CHECK (chdir ("/") == 0);
}

static void
chain_close (struct chain *c)
{
  strata_close (c->filter);
  free (c->base);
  free (c->mid);
  free (c->top);
}

static void
test_walk (void)
{
  struct chain c;

  chain_open (&c);
  CHECK (chain_next (c.filter) == c.t);
  CHECK (chain_next (c.t) == c.m);
  CHECK (chain_next (c.b) == NULL);
  CHECK (chain_backing (c.filter) == c.m);
  CHECK (chain_backing (c.m) == c.b);
  CHECK (chain_backing (c.b) == NULL);
  CHECK (strata_backing (c.filter) == c.m);
  CHECK (chain_bottom (c.filter) == c.b);
  CHECK (chain_bottom (c.b) == c.b);
  chain_close (&c);
}

static void
test_contains_and_depth (void)
{
  struct chain c;

  chain_open (&c);
  CHECK (chain_contains (c.filter, c.t));
  CHECK (chain_contains (c.filter, c.b));
  CHECK (chain_contains (c.t, c.b));
  CHECK (!chain_contains (c.t, c.t));       /* strictly below */
  CHECK (!chain_contains (c.m, c.t));       /* not above */
  CHECK (!chain_contains (c.t, c.t->file)); /* a format's file is no layer */
  CHECK (chain_depth (c.filter, c.m) == 1);
  CHECK (chain_depth (c.t, c.b) == 2);
  CHECK (chain_depth (c.filter, c.t) == -1);
  CHECK (chain_depth (c.m, c.t) == -1);
  CHECK (chain_above (c.filter, c.m) == c.t);
  CHECK (chain_above (c.filter, c.b) == c.m);
  CHECK (chain_above (c.m, c.t) == NULL);
  chain_close (&c);
}

static void
test_find_by_path (void)
{
  struct chain c;
  strata_node *above = NULL;

  chain_open (&c);
  CHECK (chain_find_file (c.filter, c.base, CHAIN_MATCH_PATH, &above) == c.b);
  CHECK (above == c.m);
  CHECK (chain_find_file (c.filter, c.mid, CHAIN_MATCH_PATH, &above) == c.m);
  CHECK (above == c.t);
  /* TOP itself is not below TOP. */
  CHECK (chain_find_file (c.filter, c.top, CHAIN_MATCH_PATH, NULL) == NULL);
  /* "base.qcow2" from the current directory ("/") is no file. */
  CHECK (chain_find_file (c.filter, "base.qcow2", CHAIN_MATCH_PATH, NULL)
         == NULL);
  chain_close (&c);
}

static void
test_find_relative_and_recorded (void)
{
  struct chain c;
  CLEANUP_FREE char *dotted = NULL;

  chain_open (&c);
  CHECK (chain_find_file (c.filter, "base.qcow2", CHAIN_MATCH_RELATIVE, NULL)
         == c.b);
  CHECK (chain_find_file (c.filter, "mid.qcow2", CHAIN_MATCH_RECORDED, NULL)
         == c.m);
  /* Another spelling of the same file: relative, not recorded. */
  CHECK (asprintf (&dotted, "./base.qcow2") > 0);
  CHECK (chain_find_file (c.filter, dotted, CHAIN_MATCH_RELATIVE, NULL)
         == c.b);
  CHECK (chain_find_file (c.filter, dotted, CHAIN_MATCH_RECORDED, NULL)
         == NULL);
  CHECK (strcmp (chain_recorded_name (c.t), "mid.qcow2") == 0);
  CHECK (chain_recorded_name (c.b) == NULL);
  chain_close (&c);
}

static void
test_find_node (void)
{
  struct chain c;

  chain_open (&c);
  CHECK (chain_find_node (c.filter, c.m->node_name) == c.m);
  CHECK (chain_find_node (c.filter, c.filter->node_name) == c.filter);
  CHECK (chain_find_node (c.m, c.t->node_name) == NULL);
  CHECK (chain_find_node (c.filter, "no-such-node") == NULL);
  chain_close (&c);
}

static void
test_resolve_name (void)
{
  CLEANUP_FREE char *a = chain_resolve_name ("/d/top.qcow2", "b.qcow2");
  CLEANUP_FREE char *b = chain_resolve_name ("top.qcow2", "b.qcow2");
  CLEANUP_FREE char *c = chain_resolve_name ("d/top.qcow2", "/x/b.qcow2");

  CHECK (a && strcmp (a, "/d/b.qcow2") == 0);
  CHECK (b && strcmp (b, "b.qcow2") == 0);
  CHECK (c && strcmp (c, "/x/b.qcow2") == 0);
}

static void
test_backing_name_for (void)
{
  struct chain c;
  CLEANUP_FREE char *same = NULL, *other = NULL, *sub = NULL;
  CLEANUP_FREE char *real = realpath (test_tmpdir (), NULL);
  CLEANUP_FREE char *want = NULL;
  strata_node *t2;

  chain_open (&c);
  /* TOP and MID share a directory: MID's recorded name stays. */
  CHECK ((same = chain_backing_name_for (c.filter, c.b)) != NULL);
  CHECK (strcmp (same, "base.qcow2") == 0);
  /* An overlay elsewhere gets the absolute path. */
  CHECK (asprintf (&sub, "%s/sub", test_tmpdir ()) > 0);
  CHECK (mkdir (sub, 0755) == 0);
  CHECK (asprintf (&want, "%s/mid.qcow2", test_tmpdir ()) > 0);
  free (make_qcow2 (sub, "t2.qcow2", want));
  free (want);
  CHECK (asprintf (&want, "%s/t2.qcow2", sub) > 0);
  CHECK ((t2 = strata_open (want, "qcow2", NULL, 0, NULL)) != NULL);
  CHECK ((other = chain_backing_name_for (t2, t2->backing->backing)) != NULL);
  free (want);
  CHECK (asprintf (&want, "%s/base.qcow2", real) > 0);
  CHECK (strcmp (other, want) == 0);
  strata_close (t2);
  CHECK (chain_backing_name_for (c.m, c.t) == NULL && errno == ENOENT);
  chain_close (&c);
}

static void
test_public_find (void)
{
  struct chain c;
  strata_error *err = NULL;
  int depth = 0;

  chain_open (&c);
  CHECK (strata_chain_find (c.filter, "base.qcow2", STRATA_CHAIN_RELATIVE,
                            &depth, &err)
         == c.b);
  CHECK (depth == 2);
  CHECK (!strata_chain_find (c.filter, "nope", STRATA_CHAIN_PATH, NULL, &err));
  CHECK (err && strata_error_errno (err) == ENOENT);
  CHECK_STR_CONTAINS (strata_error_message (err), "Did not find 'nope'");
  strata_error_free (err);
  err = NULL;
  CHECK (!strata_chain_find (c.filter, c.base, 0, NULL, &err));
  CHECK (err && strata_error_errno (err) == EINVAL);
  strata_error_free (err);
  err = NULL;
  CHECK (strata_chain_find_node (c.filter, c.b->node_name, 0, NULL) == c.b);
  CHECK (!strata_chain_find_node (c.m, c.t->node_name, 0, &err));
  CHECK (err && strata_error_errno (err) == ENOENT);
  strata_error_free (err);
  chain_close (&c);
}

TESTS (T (test_walk), T (test_contains_and_depth), T (test_find_by_path),
       T (test_find_relative_and_recorded), T (test_find_node),
       T (test_resolve_name), T (test_backing_name_for), T (test_public_find))
