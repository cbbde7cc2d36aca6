/* Block status dump for test_qcow2_map.py.
 *
 *   qcow2_map [-n] IMAGE
 *
 * Prints one line per strata_block_status() answer over the whole image:
 *   start length depth allocated zero data offset|-
 * and, last, "cluster_size N has_backing B".  -n opens with
 * STRATA_OPEN_NO_BACKING.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <strata/strata.h>

int
main (int argc, char **argv)
{
  unsigned flags = 0;
  strata_error *err = NULL;
  strata_node *node;
  struct strata_info info = { .size = sizeof info };
  int64_t size;
  const char *path = argv[argc - 1];

  if (argc == 3 && strcmp (argv[1], "-n") == 0)
    flags |= STRATA_OPEN_NO_BACKING;
  node = strata_open (path, "qcow2", NULL, flags, &err);
  if (!node) {
    fprintf (stderr, "%s\n", strata_error_message (err));
    return 1;
  }
  size = strata_length (node);
  for (uint64_t off = 0; off < (uint64_t) size;) {
    struct strata_extent e = { .size = sizeof e };
    if (strata_block_status (node, off, size - off, &e, 0) < 0) {
      fprintf (stderr, "%s\n", strata_last_error_message ());
      return 1;
    }
    printf ("%" PRIu64 " %" PRIu64 " %d %d %d %d ", off, e.length, e.depth,
            !!(e.flags & STRATA_BS_ALLOCATED), !!(e.flags & STRATA_BS_ZERO),
            !!(e.flags & STRATA_BS_DATA));
    if (e.flags & STRATA_BS_OFFSET)
      printf ("%" PRIu64 "\n", e.map);
    else
      printf ("-\n");
    off += e.length;
  }
  if (!strata_get_info (node, &info, 0, &err)) {
    fprintf (stderr, "%s\n", strata_error_message (err));
    return 1;
  }
  printf ("cluster_size %u has_backing %d\n", info.cluster_size,
          info.has_backing);
  strata_close (node);
  return 0;
}
