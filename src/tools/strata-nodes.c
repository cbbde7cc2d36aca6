/* strata nodes: the daemon's block graph as a tree.
 *
 * query-named-block-nodes lists the nodes flat; the edges are found by
 * filenames, as people read them: a format node's "file" child is the
 * protocol node with the same (plain) filename, its backing child the
 * format node whose filename is the image's backing file.  Roots are the
 * nodes nobody points at; whatever a cycle left over is printed last.
 * QEMU names nodes opened with explicit children "json:{...}": the file
 * is the innermost "filename" in it.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "qmp-client.h"
#include "strata-cmds.h"

/* The protocol-level filename under FILENAME: QEMU (and stratad) report
 * "json:{...}" for a node opened with explicit children; the bytes are in
 * its innermost "file".  Returns a malloc'd string. */
static char *
plain_filename (const char *filename)
{
  json_t *obj, *v;
  char *out;

  if (strncmp (filename, "json:", 5) != 0)
    return strdup (filename);
  obj = json_loads (filename + 5, 0, NULL);
  v = obj;
  while (json_is_object (json_object_get (v, "file")))
    v = json_object_get (v, "file");
  out = strdup (json_is_string (json_object_get (v, "filename"))
                    ? json_string_value (json_object_get (v, "filename"))
                    : filename);
  json_decref (obj);
  return out;
}

static bool
same_file (const char *a, const char *b)
{
  char *pa, *pb;
  bool same;

  if (!*a || !*b)
    return false;
  pa = plain_filename (a);
  pb = plain_filename (b);
  same = strcmp (pa, pb) == 0;
  free (pa);
  free (pb);
  return same;
}

static bool
is_protocol (const char *drv)
{
  static const char *const protocols[] = { "file", "host_device", "nbd",
                                           "null-co", "null-aio", "http",
                                           "https", NULL };
  for (const char *const *p = protocols; *p; p++)
    if (strcmp (*p, drv) == 0)
      return true;
  return false;
}

/* The node among NODES (not USED) whose filename is NAME and that is a
 * protocol node (WANT_PROTOCOL) or a format node. */
static json_t *
find_node (json_t *nodes, bool *used, const char *name, bool want_protocol,
           json_t *self)
{
  size_t i;
  json_t *n;

  if (!*name)
    return NULL;
  json_array_foreach (nodes, i, n) {
    if (n == self || used[i] || !same_file (str (n, "file"), name))
      continue;
    if (is_protocol (str (n, "drv")) == want_protocol)
      return n;
  }
  return NULL;
}

static size_t
index_of (json_t *nodes, json_t *node)
{
  size_t i;
  json_t *n;

  json_array_foreach (nodes, i, n)
    if (n == node)
      return i;
  return 0;
}

static void
print_node (json_t *nodes, bool *used, json_t *node, int depth,
            const char *role)
{
  json_t *image = json_object_get (node, "image"), *child;
  json_t *vsize = json_object_get (image, "virtual-size");
  json_t *bimage = json_object_get (image, "backing-image");
  char size[32] = "";
  const char *backing_name;
  char *shown;

  used[index_of (nodes, node)] = true;
  if (json_is_integer (vsize))
    human_size (json_integer_value (vsize), size, sizeof size);
  shown = plain_filename (str (node, "file"));
  printf ("%*s%s%s%s  %s  %s%s%s%s\n", depth * 4, "", role, *role ? ": " : "",
          str (node, "node-name"), str (node, "drv"), shown,
          *size ? "  (" : "", size, *size ? ")" : "");
  free (shown);
  if (!is_protocol (str (node, "drv"))) {
    child = find_node (nodes, used, str (node, "file"), true, node);
    if (child)
      print_node (nodes, used, child, depth + 1, "file");
  }
  backing_name = bimage ? str (bimage, "filename") : str (node,
                                                          "backing_file");
  child = find_node (nodes, used, backing_name, false, node);
  if (child)
    print_node (nodes, used, child, depth + 1, "backing");
  else if (*backing_name)
    printf ("%*sbacking: %s (not a named node)\n", (depth + 1) * 4, "",
            backing_name);
}

/* Is NODE somebody's child (file or backing), judged by filenames? */
static bool
is_child (json_t *nodes, json_t *node)
{
  size_t i;
  json_t *n;
  const char *file = str (node, "file");

  json_array_foreach (nodes, i, n) {
    json_t *bimage = json_object_get (json_object_get (n, "image"),
                                      "backing-image");
    const char *backing = bimage ? str (bimage, "filename")
                                 : str (n, "backing_file");
    if (n == node)
      continue;
    if (is_protocol (str (node, "drv")) && !is_protocol (str (n, "drv"))
        && same_file (str (n, "file"), file))
      return true;
    if (!is_protocol (str (node, "drv")) && same_file (backing, file))
      return true;
  }
  return false;
}

int
cmd_nodes (int argc, char **argv)
{
  json_t *nodes, *n;
  bool *used;
  size_t i;

  (void) argv;
  if (argc != 1)
    client_die ("usage: strata nodes");
  nodes = client_execute ("query-named-block-nodes",
                   json_pack ("{s:b}", "flat", 0));
  if (json_output) {
    print_json (nodes);
    json_decref (nodes);
    return 0;
  }
  if (!json_is_array (nodes))
    client_die ("query-named-block-nodes: not a list");
  if (json_array_size (nodes) == 0) {
    printf ("no block nodes\n");
    json_decref (nodes);
    return 0;
  }
  used = calloc (json_array_size (nodes) + 1, sizeof *used);
  json_array_foreach (nodes, i, n)
    if (!used[i] && !is_child (nodes, n))
      print_node (nodes, used, n, 0, "");
  /* Whatever the filename matching left over (a cycle, say). */
  json_array_foreach (nodes, i, n)
    if (!used[i])
      print_node (nodes, used, n, 0, "");
  free (used);
  json_decref (nodes);
  return 0;
}
