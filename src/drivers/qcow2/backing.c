/* strata qcow2: backing.  Placeholder until it lands. */
#include "drivers/qcow2/qcow2.h"
