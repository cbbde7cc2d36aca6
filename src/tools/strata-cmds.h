/* The strata client's commands and the output helpers they share.
 *
 * strata.c holds main(), the command table and the small commands (add,
 * del, snapshot, events, raw); strata-nodes.c the node tree; strata-jobs.c
 * the block job commands.  Each command is called as cmd_<name>(argc,
 * argv) with argv[0] the command's name, once connected, and returns the
 * exit status.
 */
#ifndef STRATA_TOOLS_STRATA_CMDS_H
#define STRATA_TOOLS_STRATA_CMDS_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "tool-common.h"

/* --json: print QMP's JSON instead of the human form. */
extern bool json_output;

/* OBJ's string member KEY, or "" when it has none. */
const char *str (json_t *obj, const char *key);
/* V as indented JSON on stdout. */
void print_json (json_t *v);

int cmd_nodes (int argc, char **argv); /* strata-nodes.c */
int cmd_pull (int argc, char **argv);  /* strata-jobs.c */
int cmd_commit (int argc, char **argv); /* strata-jobs.c */
int cmd_copy (int argc, char **argv);   /* strata-jobs.c */
int cmd_jobs (int argc, char **argv);
int cmd_job (int argc, char **argv);

#endif
