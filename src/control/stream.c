/* strata: stream.  Placeholder until it lands. */
#include "control/qmp.h"
