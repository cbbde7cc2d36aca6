/* strata qcow2: measure.  Placeholder until it lands. */
#include "drivers/qcow2/qcow2.h"
