/* strata: the export commands.  Placeholder until they land. */
#include "control/qmp.h"

const struct qmp_command qmp_export_commands[] = {
  { NULL, NULL },
};

void
qmp_export_shutdown (void)
{
}
