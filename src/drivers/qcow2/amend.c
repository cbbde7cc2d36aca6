/* strata qcow2: amend.  Placeholder until it lands. */
#include "drivers/qcow2/qcow2.h"
