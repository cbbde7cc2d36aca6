/* strata qcow2: snapshot.  Placeholder until it lands. */
#include "drivers/qcow2/qcow2.h"
