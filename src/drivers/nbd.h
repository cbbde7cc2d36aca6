/* strata: NBD URIs as file names (src/drivers/nbd.c), the NBD client
 * driver's own syntax: nbd+unix:///EXPORT?socket=PATH and
 * nbd://HOST[:PORT]/EXPORT, and QEMU's older "nbd:" form.  The driver
 * claims these names (struct strata_driver's claims_filename), so the core
 * and other drivers need nothing from here; the parser is declared for
 * the driver's own use and its tests. */
#ifndef STRATA_DRIVERS_NBD_H
#define STRATA_DRIVERS_NBD_H

#include <stdbool.h>

#include "util/error.h"

struct nbd_uri {
  char *socket; /* unix: the socket path, else NULL */
  char *host, *port;
  char *export;
};
/* nbd_is_uri() only looks at the scheme; nbd_uri_parse() validates the
 * rest. */
bool nbd_is_uri (const char *name);
bool nbd_uri_parse (const char *uri, struct nbd_uri *u, strata_error **errp);
void nbd_uri_clear (struct nbd_uri *u);

#endif
