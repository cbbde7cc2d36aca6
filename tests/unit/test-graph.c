/* strata: unit tests of the node-name registry (graph.c) and of nodes
 * used by reference: name rules, lookups, parents and reference counts. */
#include <stdio.h>

#include "block/graph.h"
#include "test.h"
#include "util/cleanup.h"

static char *
make_qcow2 (const char *name, const char *backing)
{
  char *path, *o;
  strata_error *err = NULL;

  CHECK (asprintf (&path, "%s/%s", test_tmpdir (), name) > 0);
  if (backing)
    CHECK (asprintf (&o, "size=1M,backing_file=%s/%s,backing_fmt=qcow2",
                     test_tmpdir (), backing) > 0);
  else
    CHECK ((o = strdup ("size=1M")) != NULL);
  CHECK (strata_create (path, "qcow2", o, 0, &err));
  free (o);
  return path;
}

static strata_node *
open_opts (const char *str, strata_error **errp)
{
  strata_opts *o = opts_new ();
  strata_node *n;

  CHECK (o && opts_parse (o, str, NULL));
  n = node_open (o, STRATA_OPEN_RDWR, errp);
  opts_free (o);
  return n;
}

static void
check_name_err (const char *name, const char *msg)
{
  strata_error *err = NULL;

  CHECK (!graph_name_check (name, &err));
  CHECK (err && strcmp (strata_error_message (err), msg) == 0);
  strata_error_free (err);
}

static void
test_name_rules (void)
{
  CHECK (graph_name_check ("a", NULL));
  CHECK (graph_name_check ("Node-1.x_y", NULL));
  CHECK (graph_name_check ("a234567890123456789012345678901", NULL));
  check_name_err ("1bad", "Invalid node-name: '1bad'");
  check_name_err ("#block001", "Invalid node-name: '#block001'");
  check_name_err ("", "Invalid node-name: ''");
  check_name_err ("a b", "Invalid node-name: 'a b'");
  check_name_err ("a2345678901234567890123456789012", "Node name too long");
}

static void
test_register_lookup_unregister (void)
{
  CLEANUP_FREE char *img = make_qcow2 ("reg.qcow2", NULL);
  CLEANUP_FREE char *o = NULL;
  strata_error *err = NULL;
  strata_node *n, *m;

  CHECK (asprintf (&o, "driver=qcow2,node-name=reg,file.filename=%s", img)
         > 0);
  n = open_opts (o, &err);
  CHECK (n);
  m = graph_lookup ("reg");
  CHECK (m == n && atomic_load (&n->refcnt) == 2);
  node_unref (m);
  /* The implicit file node got an automatic name, also registered. */
  m = graph_lookup (n->file->node_name);
  CHECK (m == n->file && n->file->node_name[0] == '#');
  node_unref (m);
  CHECK (!open_opts (o, &err));
  CHECK (strcmp (strata_error_message (err),
                 "Duplicate nodes with node-name='reg'") == 0);
  strata_error_free (err);
  node_unref (n);
  CHECK (graph_lookup ("reg") == NULL);
}

static void
test_file_by_reference (void)
{
  CLEANUP_FREE char *img = make_qcow2 ("ref.qcow2", NULL);
  CLEANUP_FREE char *o = NULL;
  strata_error *err = NULL;
  struct graph_edge e[2];
  strata_node *f, *q, *q2;

  CHECK (asprintf (&o, "driver=file,node-name=f,filename=%s", img) > 0);
  CHECK ((f = open_opts (o, &err)));
  CHECK ((q = open_opts ("driver=qcow2,node-name=q,file=f", &err)));
  CHECK (q->file == f && atomic_load (&f->refcnt) == 2);
  CHECK (graph_parents (f, e, 2) == 1 && e[0].parent == q
         && strcmp (e[0].child_name, "file") == 0);
  /* A second writer over the same file is refused. */
  q2 = open_opts ("driver=qcow2,node-name=q2,file=f", &err);
  CHECK (!q2);
  CHECK_STR_CONTAINS (strata_error_message (err), "Permission conflict on "
                      "node 'f'");
  strata_error_free (err);
  err = NULL;
  CHECK (!open_opts ("driver=qcow2,node-name=q3,file=nosuch", &err));
  CHECK (strcmp (strata_error_message (err),
                 "Cannot find device='nosuch' nor node-name='nosuch'") == 0);
  strata_error_free (err);
  CHECK (atomic_load (&f->refcnt) == 2);
  node_unref (q);
  CHECK (atomic_load (&f->refcnt) == 1);
  CHECK (graph_parents (f, e, 2) == 0);
  node_unref (f);
}

static void
test_backing_by_reference_and_null (void)
{
  CLEANUP_FREE char *base = make_qcow2 ("b.qcow2", NULL);
  CLEANUP_FREE char *top = make_qcow2 ("t.qcow2", "b.qcow2");
  CLEANUP_FREE char *o1 = NULL, *o2 = NULL, *o3 = NULL;
  strata_error *err = NULL;
  strata_node *b, *t, *t0;
  struct graph_edge e[2];

  CHECK (asprintf (&o1, "driver=qcow2,node-name=b,file.filename=%s", base)
         > 0);
  CHECK (asprintf (&o2, "driver=qcow2,node-name=t,backing=b,"
                   "file.filename=%s", top) > 0);
  CHECK (asprintf (&o3, "driver=qcow2,node-name=t0,backing=,"
                   "file.filename=%s,file.node-name=t0file", top) > 0);
  CHECK ((b = open_opts (o1, &err)));
  CHECK ((t = open_opts (o2, &err)));
  CHECK (t->backing == b && t->backing_explicit);
  CHECK (graph_parents (b, e, 2) == 1 && e[0].parent == t
         && strcmp (e[0].child_name, "backing") == 0);
  node_unref (t);
  CHECK (atomic_load (&b->refcnt) == 1);
  /* backing= (null) opens no backing even though the header names one. */
  CHECK ((t0 = open_opts (o3, &err)));
  CHECK (t0->backing == NULL && graph_lookup ("t0file") == t0->file);
  node_unref (t0->file);
  node_unref (t0);
  CHECK (graph_lookup ("t0file") == NULL);
  CHECK (!open_opts ("driver=qcow2,node-name=x,backing=nosuch,"
                     "file=b", &err));
  node_unref (b);
  strata_error_free (err);
}

static void
test_failed_open_unregisters (void)
{
  CLEANUP_FREE char *o = NULL;
  strata_error *err = NULL;

  CHECK (asprintf (&o, "driver=qcow2,node-name=gone,file.node-name=gonef,"
                   "file.filename=%s/missing.qcow2", test_tmpdir ()) > 0);
  CHECK (!open_opts (o, &err));
  CHECK_STR_CONTAINS (strata_error_message (err), "No such file");
  strata_error_free (err);
  CHECK (graph_lookup ("gone") == NULL && graph_lookup ("gonef") == NULL);
  CHECK (graph_name_check ("gone", NULL));
}

TESTS (T (test_name_rules), T (test_register_lookup_unregister),
       T (test_file_by_reference), T (test_backing_by_reference_and_null),
       T (test_failed_open_unregisters))
