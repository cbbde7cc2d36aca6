/* strata: the block-graph QMP commands.  Placeholder until the block
 * commands land: the table is empty, so stratad answers CommandNotFound. */
#include "control/qmp.h"

const struct qmp_command qmp_block_commands[] = {
  { NULL, NULL },
};

void
qmp_block_shutdown (void)
{
}
