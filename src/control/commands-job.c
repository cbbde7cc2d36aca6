/* strata: the job commands.  Placeholder until they land. */
#include "control/qmp.h"

const struct qmp_command qmp_job_commands[] = {
  { NULL, NULL },
};

void
qmp_job_shutdown (void)
{
}
