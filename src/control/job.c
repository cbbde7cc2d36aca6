/* strata: job.  Placeholder until it lands. */
#include "control/qmp.h"
