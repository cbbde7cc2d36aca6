/* strata: what the block-graph command files share
 * (commands-block.c, commands-query.c). */
#ifndef STRATA_CONTROL_COMMANDS_BLOCK_H
#define STRATA_CONTROL_COMMANDS_BLOCK_H

#include <jansson.h>

#include "block/node.h"
#include "control/qmp.h"

/* query-named-block-nodes and query-block (commands-query.c). */
json_t *cmd_query_named_block_nodes (json_t *args, struct qmp_error *err);
json_t *cmd_query_block (json_t *args, struct qmp_error *err);

#endif
