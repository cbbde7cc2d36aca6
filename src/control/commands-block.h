/* strata: what the block-graph command files share
 * (commands-block.c, commands-query.c; block-stream's checks). */
#ifndef STRATA_CONTROL_COMMANDS_BLOCK_H
#define STRATA_CONTROL_COMMANDS_BLOCK_H

#include <jansson.h>

#include "block/node.h"
#include "control/qmp.h"

/* query-named-block-nodes (commands-query.c). */
json_t *cmd_query_named_block_nodes (json_t *args, struct qmp_error *err);

/* NAME as a backing name of NODE resolves: relative to NODE's directory
 * (caller frees; NULL on ENOMEM). */
char *qmp_full_backing_filename (strata_node *node, const char *name);

#endif
