/* strata: driver options.
 *
 * Options are an ordered list of string keys and values, with nesting
 * spelled by dots as in QEMU's flattened option dictionaries
 * ("file.filename=a.img,file.cache.direct=on").  Parsing accepts QEMU's
 * "key=value,key=value" syntax with ",," for a literal comma.  Each option
 * records whether a driver consumed it, so that leftovers can be refused by
 * name instead of being silently ignored.
 */
#ifndef STRATA_OPTS_H
#define STRATA_OPTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A sibling by its bare name: the programs in src/tools have src/util/ (not
 * src/) on their include path. */
#include "error.h"

struct opt {
  char *key;
  char *value;
  bool used;
};

typedef struct strata_opts {
  struct opt *v;
  size_t n;
} strata_opts;

/* Caller frees with opts_free(). */
strata_opts *opts_new (void);
void opts_free (strata_opts *opts);
static inline void
cleanup_opts (strata_opts **p)
{
  if (*p)
    opts_free (*p);
}
#define CLEANUP_OPTS __attribute__ ((cleanup (cleanup_opts)))

/* Parse STR and add its options (later keys replace earlier ones). */
bool opts_parse (strata_opts *opts, const char *str, strata_error **errp);

/* Set KEY to VALUE, replacing any old value.  Returns false on ENOMEM. */
bool opts_set (strata_opts *opts, const char *key, const char *value);

/* Return the value of KEY and mark it used, or NULL when absent. */
const char *opts_get (strata_opts *opts, const char *key);
bool opts_has (const strata_opts *opts, const char *key);

/* Typed getters: when KEY is absent *out = DEF.  A malformed value fails
 * with a message naming the key. */
bool opts_get_bool (strata_opts *opts, const char *key, bool def, bool *out,
                    strata_error **errp);
bool opts_get_size (strata_opts *opts, const char *key, uint64_t def,
                    uint64_t *out, strata_error **errp);

/* Move every "PREFIX.x" option into a new list as "x".  Returns the new
 * list (possibly empty), owned by the caller, or NULL on ENOMEM. */
strata_opts *opts_extract (strata_opts *opts, const char *prefix);

/* Fail naming the first option nobody used: "WHAT: unknown option 'k'". */
bool opts_check_used (const strata_opts *opts, const char *what,
                      strata_error **errp);

/* Parse a size with an optional binary suffix (B, K, M, G, T, P, E; any
 * case), decimal or 0x-hex, fractions allowed with a suffix ("1.5G").
 * Returns false on garbage or overflow. */
bool parse_size (const char *str, uint64_t *out);

/* Translate a QEMU cache mode (-t/--cache of qemu-io, qemu-img, qemu-nbd:
 * none, writeback, writethrough, directsync, unsafe) into the options of
 * the file node under an image of FORMAT (NULL = probed): "file.cache.*",
 * or "cache.*" when FORMAT is the file driver itself.  *WRITETHROUGH says
 * whether every write must be made durable (FUA).  False for an unknown
 * mode. */
bool cache_mode_options (const char *mode, const char *format, char *buf,
                         size_t size, bool *writethrough);

/* Parse "on/off/true/false/yes/no/1/0". */
bool parse_bool (const char *str, bool *out);

#endif
