/* strata: NBD option negotiation (proto.md "Handshake": "Newstyle
 * negotiation" and "Option types"; fixed newstyle only).
 *
 *   server: NBDMAGIC IHAVEOPT handshake_flags
 *   client: client_flags, then options until EXPORT_NAME or a GO that
 *           succeeds (transmission starts) or ABORT (disconnect)
 *
 * Runs on the connection's reader thread, before the writer exists, so
 * every reply is written straight to the socket.  Bounds: option data
 * NBD_MAX_OPTION bytes (longer ones up to NBD_MAX_OPTION_SKIP are skipped
 * with ERR_TOO_BIG), names NBD_MAX_NAME, 1024 options per connection, and
 * NBD_HANDSHAKE_MS per read.  Meta contexts: base:allocation always,
 * qemu:allocation-depth when the export offers it; a GO for another
 * export than the one they were set for clears them.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "nbd/internal.h"
#include "nbd/protocol.h"
#include "util/bytes.h"

static bool
write_full (int fd, const void *buf, size_t len)
{
  const unsigned char *p = buf;
  while (len > 0) {
    ssize_t n = send (fd, p, len, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return false;
    p += n;
    len -= (size_t)n;
  }
  return true;
}

static bool
opt_reply (struct conn *c, uint32_t opt, uint32_t type, const void *data,
           uint32_t len)
{
  unsigned char h[20];
  be64_store (h, NBD_OPT_REPLY_MAGIC);
  be32_store (h + 8, opt);
  be32_store (h + 12, type);
  be32_store (h + 16, len);
  return write_full (c->fd, h, sizeof h) && write_full (c->fd, data, len);
}

static bool
opt_error (struct conn *c, uint32_t opt, uint32_t type, const char *msg)
{
  return opt_reply (c, opt, type, msg, (uint32_t)strlen (msg));
}

/* Reads a 32-bit length-prefixed string at *POS of DATA[LEN] into a new
 * NUL-terminated string (caller frees), or NULL when it does not fit. */
static char *
take_string (const unsigned char *data, uint32_t len, uint32_t *pos,
             uint32_t max)
{
  uint32_t n;
  char *s;
  if (len - *pos < 4)
    return NULL;
  n = be32_load (data + *pos);
  *pos += 4;
  if (n > max || n > len - *pos || memchr (data + *pos, 0, n))
    return NULL;
  s = malloc ((size_t)n + 1);
  if (!s)
    return NULL;
  memcpy (s, data + *pos, n);
  s[n] = 0;
  *pos += n;
  return s;
}

/* The transmission flags C sees for E: DF only with structured replies. */
static uint16_t
conn_tflags (const struct conn *c, const struct nbd_export *e)
{
  return e->tflags | (c->structured ? NBD_FLAG_SEND_DF : 0);
}

static bool
send_info (struct conn *c, uint32_t opt, struct nbd_export *e,
           const uint16_t *reqs, uint16_t nr_reqs)
{
  unsigned char b[18];
  /* The description goes out unasked, as QEMU's server sends it. */
  bool name = false, desc = e->description != NULL;

  for (uint16_t i = 0; i < nr_reqs; i++) {
    if (reqs[i] == NBD_INFO_NAME)
      name = true;
    if (reqs[i] == NBD_INFO_DESCRIPTION)
      desc = true;
  }
  be16_store (b, NBD_INFO_EXPORT);
  be64_store (b + 2, e->size);
  be16_store (b + 10, conn_tflags (c, e));
  if (!opt_reply (c, opt, NBD_REP_INFO, b, 12))
    return false;
  be16_store (b, NBD_INFO_BLOCK_SIZE);
  be32_store (b + 2, NBD_MIN_BLOCK);
  be32_store (b + 6, NBD_PREF_BLOCK);
  be32_store (b + 10, NBD_MAX_BLOCK);
  if (!opt_reply (c, opt, NBD_REP_INFO, b, 14))
    return false;
  for (int k = 0; k < 2; k++) {
    const char *s
        = k == 0 ? (name ? e->name : NULL) : (desc ? e->description : NULL);
    size_t n = s ? strlen (s) : 0;
    unsigned char *p;
    bool ok;
    if (!s)
      continue;
    p = malloc (n + 2);
    if (!p)
      return false;
    be16_store (p, k == 0 ? NBD_INFO_NAME : NBD_INFO_DESCRIPTION);
    memcpy (p + 2, s, n);
    ok = opt_reply (c, opt, NBD_REP_INFO, p, (uint32_t)n + 2);
    free (p);
    if (!ok)
      return false;
  }
  return true;
}

/* C uses export E from now on (taking over the caller's reference). */
static void
conn_bind (struct conn *c, struct nbd_export *e)
{
  pthread_mutex_lock (&c->srv->lock);
  c->exp = e;
  pthread_mutex_unlock (&c->srv->lock);
}

/* INFO and GO.  Returns -1 to disconnect, 0 to continue, 1 to start
 * transmission. */
static int
opt_info_go (struct conn *c, uint32_t opt, const unsigned char *d,
             uint32_t len)
{
  uint32_t pos = 0;
  char *name = take_string (d, len, &pos, NBD_MAX_NAME);
  uint16_t nr, reqs[64];
  struct nbd_export *e;
  int ret = 0;

  if (!name || len - pos < 2)
    goto invalid;
  nr = be16_load (d + pos);
  pos += 2;
  if ((uint64_t)nr * 2 != len - pos || nr > 64)
    goto invalid;
  for (uint16_t i = 0; i < nr; i++)
    reqs[i] = be16_load (d + pos + 2 * i);
  e = nbd_export_find (c->srv, name);
  if (!e) {
    ret = opt_error (c, opt, NBD_REP_ERR_UNKNOWN, "no such export") ? 0 : -1;
    free (name);
    return ret;
  }
  /* Bound before the client hears it is: a removal must see it. */
  if (opt == NBD_OPT_GO)
    conn_bind (c, e);
  if (!send_info (c, opt, e, reqs, nr)
      || !opt_reply (c, opt, NBD_REP_ACK, NULL, 0)) {
    if (opt != NBD_OPT_GO)
      nbd_export_unref (c->srv, e); /* else conn_run drops c->exp's */
    free (name);
    return -1;
  }
  if (opt == NBD_OPT_GO) {
    if (!c->ctx_export || strcmp (c->ctx_export, name) != 0)
      c->ctx_base = c->ctx_depth = false;
    ret = 1;
  }
  else
    nbd_export_unref (c->srv, e);
  free (name);
  return ret;

invalid:
  free (name);
  return opt_error (c, opt, NBD_REP_ERR_INVALID, "malformed option") ? 0 : -1;
}

/* One NBD_REP_SERVER reply per export.  The replies are built under the
 * lock and sent after it, since a client may be slow to read. */
static bool
opt_list (struct conn *c)
{
  struct nbd_server *srv = c->srv;
  unsigned char **msgs = NULL;
  uint32_t *lens = NULL;
  size_t n = 0;
  bool ok = true;

  pthread_mutex_lock (&srv->lock);
  msgs = calloc (srv->nr_exports + 1, sizeof *msgs);
  lens = calloc (srv->nr_exports + 1, sizeof *lens);
  for (size_t i = 0; msgs && lens && i < srv->nr_exports; i++) {
    struct nbd_export *e = srv->exports[i];
    size_t nl = strlen (e->name);
    size_t dn = e->description ? strlen (e->description) : 0;
    unsigned char *p = malloc (4 + nl + dn);
    if (!p)
      break;
    be32_store (p, (uint32_t)nl);
    memcpy (p + 4, e->name, nl);
    if (dn)
      memcpy (p + 4 + nl, e->description, dn);
    msgs[n] = p;
    lens[n++] = (uint32_t)(4 + nl + dn);
  }
  if (!msgs || !lens || n != srv->nr_exports)
    ok = false;
  pthread_mutex_unlock (&srv->lock);
  for (size_t i = 0; ok && i < n; i++)
    ok = opt_reply (c, NBD_OPT_LIST, NBD_REP_SERVER, msgs[i], lens[i]);
  for (size_t i = 0; i < n; i++)
    free (msgs[i]);
  free (msgs);
  free (lens);
  return ok && opt_reply (c, NBD_OPT_LIST, NBD_REP_ACK, NULL, 0);
}

static bool
send_context (struct conn *c, uint32_t opt, uint32_t id, const char *name)
{
  unsigned char b[64];
  size_t n = strlen (name);
  be32_store (b, id);
  memcpy (b + 4, name, n);
  return opt_reply (c, opt, NBD_REP_META_CONTEXT, b, (uint32_t)(4 + n));
}

/* Which of our contexts a query names: bit 0 base:allocation, bit 1
 * qemu:allocation-depth.  LIST accepts the namespace alone. */
static unsigned
match_query (const char *q, bool list, bool depth_ok)
{
  unsigned m = 0;
  if (strcmp (q, "base:allocation") == 0 || (list && strcmp (q, "base:") == 0))
    m |= 1;
  if (depth_ok
      && (strcmp (q, "qemu:allocation-depth") == 0
          || (list && strcmp (q, "qemu:") == 0)))
    m |= 2;
  return m;
}

static int
opt_meta_context (struct conn *c, uint32_t opt, const unsigned char *d,
                  uint32_t len)
{
  bool list = opt == NBD_OPT_LIST_META_CONTEXT;
  uint32_t pos = 0, nr;
  char *name = NULL;
  struct nbd_export *e;
  unsigned sel = 0;

  if (!c->structured)
    return opt_error (c, opt, NBD_REP_ERR_INVALID,
                      "structured replies not negotiated")
               ? 0
               : -1;
  name = take_string (d, len, &pos, NBD_MAX_NAME);
  if (!name || len - pos < 4)
    goto invalid;
  nr = be32_load (d + pos);
  pos += 4;
  for (uint32_t i = 0; i < nr; i++) {
    char *q = take_string (d, len, &pos, NBD_MAX_OPTION);
    if (!q)
      goto invalid;
    sel |= match_query (q, list, true);
    free (q);
  }
  if (pos != len)
    goto invalid;
  e = nbd_export_find (c->srv, name);
  if (!e) {
    free (name);
    return opt_error (c, opt, NBD_REP_ERR_UNKNOWN, "no such export") ? 0 : -1;
  }
  if (!e->flags.allocation_depth)
    sel &= ~2u;
  if (list && nr == 0)
    sel = e->flags.allocation_depth ? 3 : 1;
  nbd_export_unref (c->srv, e);
  if (!list) {
    c->ctx_base = sel & 1;
    c->ctx_depth = sel & 2;
    free (c->ctx_export);
    c->ctx_export = name;
    name = NULL;
  }
  free (name);
  if ((sel & 1)
      && !send_context (c, opt, CTX_BASE_ALLOCATION, "base:allocation"))
    return -1;
  if ((sel & 2)
      && !send_context (c, opt, CTX_ALLOCATION_DEPTH, "qemu:allocation-depth"))
    return -1;
  return opt_reply (c, opt, NBD_REP_ACK, NULL, 0) ? 0 : -1;

invalid:
  free (name);
  return opt_error (c, opt, NBD_REP_ERR_INVALID, "malformed option") ? 0 : -1;
}

/* One option.  Returns -1 to disconnect, 0 to continue, 1 to start
 * transmission. */
static int
handle_option (struct conn *c, uint32_t opt, unsigned char *d, uint32_t len)
{
  switch (opt) {
  case NBD_OPT_EXPORT_NAME: {
    unsigned char b[10 + 124] = { 0 };
    char name[NBD_MAX_NAME + 1];
    struct nbd_export *e;
    if (len > NBD_MAX_NAME || memchr (d, 0, len))
      return -1;
    if (len)
      memcpy (name, d, len);
    name[len] = 0;
    e = nbd_export_find (c->srv, name);
    if (!e)
      return -1; /* this option has no way to say no */
    be64_store (b, e->size);
    be16_store (b + 8, conn_tflags (c, e));
    conn_bind (c, e); /* keeps the reference; conn_run drops it */
    if (!write_full (c->fd, b, c->no_zeroes ? 10 : sizeof b))
      return -1;
    if (!c->ctx_export || strcmp (c->ctx_export, name) != 0)
      c->ctx_base = c->ctx_depth = false;
    return 1;
  }
  case NBD_OPT_ABORT: opt_reply (c, opt, NBD_REP_ACK, NULL, 0); return -1;
  case NBD_OPT_LIST:
    if (len)
      return opt_error (c, opt, NBD_REP_ERR_INVALID, "unexpected data") ? 0
                                                                        : -1;
    return opt_list (c) ? 0 : -1;
  case NBD_OPT_INFO:
  case NBD_OPT_GO: return opt_info_go (c, opt, d, len);
  case NBD_OPT_STRUCTURED_REPLY:
    if (len)
      return opt_error (c, opt, NBD_REP_ERR_INVALID, "unexpected data") ? 0
                                                                        : -1;
    c->structured = true;
    return opt_reply (c, opt, NBD_REP_ACK, NULL, 0) ? 0 : -1;
  case NBD_OPT_LIST_META_CONTEXT:
  case NBD_OPT_SET_META_CONTEXT: return opt_meta_context (c, opt, d, len);
  default:
    return opt_error (c, opt, NBD_REP_ERR_UNSUP, "option not supported") ? 0
                                                                         : -1;
  }
}

/* True once the client has chosen an export. */
bool
conn_handshake (struct conn *c)
{
  unsigned char b[18];
  uint32_t cflags;
  unsigned char *data;

  be64_store (b, NBD_MAGIC);
  be64_store (b + 8, NBD_IHAVEOPT);
  be16_store (b + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  if (!write_full (c->fd, b, 18) || !conn_read (c, b, 4, NBD_HANDSHAKE_MS))
    return false;
  cflags = be32_load (b);
  if (!(cflags & NBD_FLAG_C_FIXED_NEWSTYLE)
      || (cflags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)))
    return false;
  c->no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES;

  data = malloc (NBD_MAX_OPTION);
  if (!data)
    return false;
  for (unsigned n = 0; n < 1024; n++) { /* bound the option count too */
    uint32_t opt, len;
    int r;
    if (!conn_read (c, b, 16, NBD_HANDSHAKE_MS)
        || be64_load (b) != NBD_IHAVEOPT)
      break;
    opt = be32_load (b + 8);
    len = be32_load (b + 12);
    if (len > NBD_MAX_OPTION) {
      if (len > NBD_MAX_OPTION_SKIP || opt == NBD_OPT_EXPORT_NAME
          || !conn_skip (c, len, NBD_HANDSHAKE_MS)
          || !opt_error (c, opt, NBD_REP_ERR_TOO_BIG, "option too long"))
        break;
      continue;
    }
    if (!conn_read (c, data, len, NBD_HANDSHAKE_MS))
      break;
    r = handle_option (c, opt, data, len);
    if (r) {
      free (data);
      return r > 0;
    }
  }
  free (data);
  return false;
}
