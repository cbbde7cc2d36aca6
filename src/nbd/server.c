/* strata: NBD server (fixed newstyle handshake, simple and structured
 * replies, base:allocation and qemu:allocation-depth).  Wire layouts are in
 * protocol.h; the spec is the NetworkBlockDevice project's doc/proto.md.
 *
 *   accept loop ──> reader thread ──(job)──> worker pool ──(reply)──┐
 *                    per connection           shared                 │
 *                         ^                 sends the queue itself,  v
 *                         └── budget ◄───── else the writer thread per
 *                             released      connection (blocking send)
 *
 * Invariants:
 * - Only the reader reads the socket.  After the handshake, one thread at
 *   a time sends (conn->sending): a worker that queues a reply when
 *   nobody is sending sends the whole queue without blocking (MSG_DONTWAIT,
 *   many replies per sendmsg); what would block is left to the
 *   connection's writer thread, the only one that waits on the socket.  So
 *   a client that never reads blocks only its own writer, then its own
 *   reader (through the budget: at most NBD_MAX_INFLIGHT requests and
 *   NBD_MAX_QUEUED bytes of payload and reply per connection), never the
 *   pool.
 * - A request is fully validated by the reader, before it reaches a
 *   worker: every wire value is range-checked with checked arithmetic.
 * - A connection is freed by its reader only once its budget is back to
 *   zero, i.e. no job and no queued reply refers to it.
 *
 * Choices:
 * - CAN_MULTI_CONN: advertised when the caller says so (every connection
 *   shares one node and strata_flush() on it is global; strata-nbd says so
 *   unless it takes one client at a time, as qemu-nbd; stratad always, as
 *   qemu-storage-daemon).
 * - DF is advertised with structured replies; a DF read is one data
 *   chunk, zeros included.
 * - FAST_ZERO: we cannot know whether the driver zeroes fast, so a
 *   FAST_ZERO request succeeds only when the range already reads as zero
 *   (nothing to do); otherwise ENOTSUP and the client falls back.
 * - Out-of-range WRITE and WRITE_ZEROES fail with ENOSPC (proto.md's
 *   SHOULD), other commands with EINVAL; a READ, WRITE or CACHE longer
 *   than the maximum block size fails with EINVAL (proto.md, and QEMU).
 * - Zero-length requests fail with EINVAL (proto.md leaves them
 *   unspecified; QEMU's server lets them succeed).
 */
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "nbd/protocol.h"
#include "nbd/server.h"
#include "util/checked.h"
#include "util/error.h"
#include "util/bytes.h"
#include "util/sockets.h"

#define NBD_MAX_NAME        4096
#define NBD_MAX_OPTION      (16 * 1024)       /* longest option we parse */
#define NBD_MAX_OPTION_SKIP (1024 * 1024)     /* longest we skip politely */
#define NBD_MIN_BLOCK       1
#define NBD_PREF_BLOCK      4096
#define NBD_MAX_BLOCK       (32 * 1024 * 1024)
#define NBD_MAX_INFLIGHT    64
#define NBD_MAX_QUEUED      (64 * 1024 * 1024)
#define NBD_MAX_EXTENTS     1024
#define NBD_SPARSE_MIN      (64 * 1024)       /* smaller reads: no holes */
#define NBD_HANDSHAKE_MS    10000
#define NBD_PAYLOAD_MS      30000
#define NBD_WORKERS         16
#define NBD_MAX_LISTEN      8
#define NBD_RBUF            (128 * 1024)      /* reader's buffer */
#define NBD_BATCH           8                 /* requests per hand-over */
#define NBD_HEAVY_LEN       (256 * 1024)      /* may block: own worker */
#define NBD_SLOW_JOB_NS     200000            /* jobs this long: parallel */
#define NBD_NUDGE_MS        2                 /* see wait_readable */
/* A full server with a client waiting frees the slot of a connection idle
 * this long (no request for it and none in flight). */
#define NBD_EVICT_MS        30000

#define CTX_BASE_ALLOCATION 1
#define CTX_ALLOCATION_DEPTH 2

/* An export is referenced by the server's list and by every connection
 * that chose it (srv->lock protects REFS); it is freed, and GONE called,
 * when the last reference goes. */
struct nbd_export {
  char *name, *description;
  strata_node *node;
  struct nbd_export_flags flags;
  uint64_t size;
  uint16_t tflags;
  unsigned refs;
  void (*gone) (void *opaque);
  void *gone_opaque;
};

/* A reply ready to send. */
struct reply {
  struct reply *next;
  size_t len;
  size_t off;               /* bytes already sent */
  uint64_t cost;            /* budget to release once sent */
  unsigned char data[];
};

struct conn {
  struct nbd_server *srv;
  int fd;
  struct conn *next;              /* server's list */

  /* Set during the handshake, read-only afterwards. */
  struct nbd_export *exp;
  bool structured;
  bool no_zeroes;
  bool ctx_base, ctx_depth;       /* selected meta contexts */
  char *ctx_export;               /* export they were selected for */

  /* The reader's buffer: requests arrive many per recv under load. */
  unsigned char *rbuf;
  size_t rpos, rlen;
  /* Requests parsed but not yet handed to the pool: the reader hands
   * them over together, before it would wait (see submit_batch). */
  struct job *batch, *batch_tail;
  unsigned nbatch, nheavy;

  pthread_mutex_t lock;           /* protects everything below */
  pthread_cond_t cond;            /* budget released (reader waits) */
  pthread_cond_t wcond;           /* reply queued, quit (writer waits) */
  uint64_t last_request_ms;       /* monotonic; 0 until transmission */
  struct reply *head, *tail;
  unsigned inflight;              /* jobs + queued replies */
  uint64_t queued;                /* their bytes */
  bool reader_waits;              /* in cond_wait on COND */
  bool sending;                   /* the writer is sending outside LOCK */
  bool dead;                      /* socket failed: drop replies */
  bool quit;                      /* writer: exit once queue empty */
  pthread_t writer;
};

struct job {
  struct job *next;
  struct conn *conn;
  uint64_t cookie, offset;
  uint32_t len;
  uint16_t flags, type;
  uint64_t cost;
  void *payload;
};

struct nbd_server {
  pthread_mutex_t lock;
  pthread_cond_t cond;            /* connection ended, job queued */
  struct nbd_export **exports;   /* newest last */
  size_t nr_exports;
  int listen_fds[NBD_MAX_LISTEN];
  size_t nr_listen;
  int tcp_port;
  int wake[2];                    /* self-pipe for the accept loop */
  unsigned max_clients;
  unsigned evict_ms;              /* see nbd_server_set_evict_after */
  bool persistent;
  bool stopping;
  unsigned active;                /* connections alive */
  bool had_client;
  struct conn *conns;

  /* Worker pool, with its own lock: the hot path never takes LOCK. */
  pthread_mutex_t pool_lock;
  pthread_cond_t job_cond;
  struct job *jobs, *jobs_tail;
  unsigned idle_workers;
  unsigned nr_jobs;               /* in JOBS */
  uint64_t job_ns_avg;            /* moving average of a job's wall time */
  bool pool_quit;
  pthread_t workers[NBD_WORKERS];
  size_t nr_workers;
};

static uint64_t
now_ns (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000 + (uint64_t) ts.tv_nsec;
}

static uint64_t
now_ms (void)
{
  return now_ns () / 1000000;
}

/* How long C has been idle (ms): no request in flight and none received
 * for that long; 0 when busy or still negotiating.  c->lock held. */
static uint64_t
idle_for_locked (struct conn *c, uint64_t now)
{
  if (c->inflight > 0 || c->last_request_ms == 0 || c->dead)
    return 0;
  return now > c->last_request_ms ? now - c->last_request_ms : 0;
}

/* ---- socket I/O ---- */

static void submit_batch (struct conn *c);

static bool pool_nudge (struct nbd_server *srv, bool wake);

/* Wait up to TIMEOUT_MS (-1: forever) for C's socket to be readable.
 * While jobs sit in the pool's queue with workers asleep (one worker
 * took a batch of short jobs and one of them blocks), the wait is cut
 * into NBD_NUDGE_MS slices after which those jobs get workers: a reader
 * with nothing to read is the pool's watchdog. */
static bool
wait_readable (struct conn *c, int timeout_ms)
{
  for (;;) {
    struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
    bool nudge = (timeout_ms < 0 || timeout_ms > NBD_NUDGE_MS)
                 && pool_nudge (c->srv, false);
    int r = poll (&pfd, 1, nudge ? NBD_NUDGE_MS : timeout_ms);
    if (r < 0 && errno == EINTR)
      continue;
    if (r == 0 && nudge) {
      pool_nudge (c->srv, true);
      if (timeout_ms > 0)
        timeout_ms -= NBD_NUDGE_MS;
      continue;
    }
    return r > 0;
  }
}

/* recv without blocking; waits (TIMEOUT_MS per chunk) only when nothing
 * has arrived, so a busy connection costs one syscall per recv. */
static ssize_t
recv_some (struct conn *c, void *buf, size_t len, int timeout_ms)
{
  int fd = c->fd;

  for (;;) {
    ssize_t n = recv (fd, buf, len, MSG_DONTWAIT);
    if (n > 0)
      return n;
    if (n == 0)
      return -1;
    if (errno == EINTR)
      continue;
    if ((errno != EAGAIN && errno != EWOULDBLOCK)
        || !wait_readable (c, timeout_ms))
      return -1;
  }
}

/* Read exactly LEN bytes from C (its buffer first), waiting at most
 * TIMEOUT_MS (-1: forever) for each chunk.  False on EOF, error or
 * timeout.  Only the connection's reader calls this. */
static bool
conn_read (struct conn *c, void *buf, size_t len, int timeout_ms)
{
  unsigned char *p = buf;

  while (len > 0) {
    size_t have = c->rlen - c->rpos;
    ssize_t n;

    if (have > 0) {
      size_t k = have < len ? have : len;
      memcpy (p, c->rbuf + c->rpos, k);
      c->rpos += k;
      p += k;
      len -= k;
      continue;
    }
    submit_batch (c);           /* about to wait for the client */
    if (len >= NBD_RBUF / 2) {  /* big payloads go straight to BUF */
      if ((n = recv_some (c, p, len, timeout_ms)) < 0)
        return false;
      p += n;
      len -= (size_t) n;
      continue;
    }
    c->rpos = c->rlen = 0;
    if ((n = recv_some (c, c->rbuf, NBD_RBUF, timeout_ms)) < 0)
      return false;
    c->rlen = (size_t) n;
  }
  return true;
}

static bool
skip_bytes (struct conn *c, uint64_t len, int timeout_ms)
{
  unsigned char buf[4096];
  while (len > 0) {
    size_t n = len < sizeof buf ? (size_t) len : sizeof buf;
    if (!conn_read (c, buf, n, timeout_ms))
      return false;
    len -= n;
  }
  return true;
}

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
    len -= (size_t) n;
  }
  return true;
}

/* ---- handshake ---- */

/* With srv->lock held. */
static ssize_t
export_index (struct nbd_server *srv, const char *name)
{
  for (size_t i = 0; i < srv->nr_exports; i++)
    if (strcmp (srv->exports[i]->name, name) == 0)
      return (ssize_t) i;
  return -1;
}

/* The export named NAME with a new reference (export_unref), or NULL. */
static struct nbd_export *
find_export (struct nbd_server *srv, const char *name)
{
  struct nbd_export *e = NULL;
  ssize_t i;

  pthread_mutex_lock (&srv->lock);
  if ((i = export_index (srv, name)) >= 0) {
    e = srv->exports[i];
    e->refs++;
  }
  pthread_mutex_unlock (&srv->lock);
  return e;
}

/* Drop a reference taken with srv->lock held; returns the export when it
 * must be freed (outside the lock: GONE may take the caller's locks). */
static struct nbd_export *
export_unref_locked (struct nbd_export *e)
{
  return --e->refs == 0 ? e : NULL;
}

static void
export_free (struct nbd_export *e)
{
  if (!e)
    return;
  if (e->gone)
    e->gone (e->gone_opaque);
  free (e->name);
  free (e->description);
  free (e);
}

static void
export_unref (struct nbd_server *srv, struct nbd_export *e)
{
  struct nbd_export *dead;

  if (!e)
    return;
  pthread_mutex_lock (&srv->lock);
  dead = export_unref_locked (e);
  pthread_mutex_unlock (&srv->lock);
  export_free (dead);
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
  return opt_reply (c, opt, type, msg, (uint32_t) strlen (msg));
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
  s = malloc ((size_t) n + 1);
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
    const char *s = k == 0 ? (name ? e->name : NULL)
                           : (desc ? e->description : NULL);
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
    ok = opt_reply (c, opt, NBD_REP_INFO, p, (uint32_t) n + 2);
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
  if ((uint64_t) nr * 2 != len - pos || nr > 64)
    goto invalid;
  for (uint16_t i = 0; i < nr; i++)
    reqs[i] = be16_load (d + pos + 2 * i);
  e = find_export (c->srv, name);
  if (!e) {
    ret = opt_error (c, opt, NBD_REP_ERR_UNKNOWN, "no such export") ? 0 : -1;
    free (name);
    return ret;
  }
  /* Bound before the client hears it is: a removal must see it. */
  if (opt == NBD_OPT_GO)
    conn_bind (c, e);
  if (!send_info (c, opt, e, reqs, nr) || !opt_reply (c, opt, NBD_REP_ACK,
                                                     NULL, 0)) {
    if (opt != NBD_OPT_GO)
      export_unref (c->srv, e);  /* else conn_run drops c->exp's */
    free (name);
    return -1;
  }
  if (opt == NBD_OPT_GO) {
    if (!c->ctx_export || strcmp (c->ctx_export, name) != 0)
      c->ctx_base = c->ctx_depth = false;
    ret = 1;
  }
  else
    export_unref (c->srv, e);
  free (name);
  return ret;

invalid:
  free (name);
  return opt_error (c, opt, NBD_REP_ERR_INVALID, "malformed option") ? 0
                                                                      : -1;
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
    be32_store (p, (uint32_t) nl);
    memcpy (p + 4, e->name, nl);
    if (dn)
      memcpy (p + 4 + nl, e->description, dn);
    msgs[n] = p;
    lens[n++] = (uint32_t) (4 + nl + dn);
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
  return opt_reply (c, opt, NBD_REP_META_CONTEXT, b, (uint32_t) (4 + n));
}

/* Which of our contexts a query names: bit 0 base:allocation, bit 1
 * qemu:allocation-depth.  LIST accepts the namespace alone. */
static unsigned
match_query (const char *q, bool list, bool depth_ok)
{
  unsigned m = 0;
  if (strcmp (q, "base:allocation") == 0 || (list && strcmp (q, "base:") == 0))
    m |= 1;
  if (depth_ok && (strcmp (q, "qemu:allocation-depth") == 0
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
                      "structured replies not negotiated") ? 0 : -1;
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
  e = find_export (c->srv, name);
  if (!e) {
    free (name);
    return opt_error (c, opt, NBD_REP_ERR_UNKNOWN, "no such export") ? 0
                                                                     : -1;
  }
  if (!e->flags.allocation_depth)
    sel &= ~2u;
  if (list && nr == 0)
    sel = e->flags.allocation_depth ? 3 : 1;
  export_unref (c->srv, e);
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
      && !send_context (c, opt, CTX_ALLOCATION_DEPTH,
                        "qemu:allocation-depth"))
    return -1;
  return opt_reply (c, opt, NBD_REP_ACK, NULL, 0) ? 0 : -1;

invalid:
  free (name);
  return opt_error (c, opt, NBD_REP_ERR_INVALID, "malformed option") ? 0
                                                                      : -1;
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
    e = find_export (c->srv, name);
    if (!e)
      return -1;  /* this option has no way to say no */
    be64_store (b, e->size);
    be16_store (b + 8, conn_tflags (c, e));
    conn_bind (c, e);  /* keeps the reference; conn_run drops it */
    if (!write_full (c->fd, b, c->no_zeroes ? 10 : sizeof b))
      return -1;
    if (!c->ctx_export || strcmp (c->ctx_export, name) != 0)
      c->ctx_base = c->ctx_depth = false;
    return 1;
  }
  case NBD_OPT_ABORT:
    opt_reply (c, opt, NBD_REP_ACK, NULL, 0);
    return -1;
  case NBD_OPT_LIST:
    if (len)
      return opt_error (c, opt, NBD_REP_ERR_INVALID, "unexpected data") ? 0
                                                                        : -1;
    return opt_list (c) ? 0 : -1;
  case NBD_OPT_INFO:
  case NBD_OPT_GO:
    return opt_info_go (c, opt, d, len);
  case NBD_OPT_STRUCTURED_REPLY:
    if (len)
      return opt_error (c, opt, NBD_REP_ERR_INVALID, "unexpected data") ? 0
                                                                        : -1;
    c->structured = true;
    return opt_reply (c, opt, NBD_REP_ACK, NULL, 0) ? 0 : -1;
  case NBD_OPT_LIST_META_CONTEXT:
  case NBD_OPT_SET_META_CONTEXT:
    return opt_meta_context (c, opt, d, len);
  default:
    return opt_error (c, opt, NBD_REP_ERR_UNSUP, "option not supported")
               ? 0 : -1;
  }
}

/* True once the client has chosen an export. */
static bool
handshake (struct conn *c)
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
  for (unsigned n = 0; n < 1024; n++) {  /* bound the option count too */
    uint32_t opt, len;
    int r;
    if (!conn_read (c, b, 16, NBD_HANDSHAKE_MS)
        || be64_load (b) != NBD_IHAVEOPT)
      break;
    opt = be32_load (b + 8);
    len = be32_load (b + 12);
    if (len > NBD_MAX_OPTION) {
      if (len > NBD_MAX_OPTION_SKIP || opt == NBD_OPT_EXPORT_NAME
          || !skip_bytes (c, len, NBD_HANDSHAKE_MS)
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

/* ---- replies and the budget ---- */

static struct reply *
reply_new (size_t len)
{
  struct reply *r = malloc (sizeof *r + len);
  if (r) {
    r->next = NULL;
    r->len = len;
    r->cost = 0;
  }
  return r;
}

/* A reply left the connection (sent or dropped): give its budget back.
 * c->lock held. */
static void
budget_release_locked (struct conn *c, uint64_t cost)
{
  c->inflight--;
  c->queued -= cost;
  if (c->reader_waits)
    pthread_cond_signal (&c->cond);
}

/* Replies gathered into one sendmsg. */
#define NBD_SEND_IOV 64

/* Send the queued replies, many per sendmsg, until the queue is empty.
 * Called with c->lock held and nobody sending; the lock is dropped
 * around each sendmsg, and replies queued meanwhile go out in the next
 * round, so under load one syscall carries many replies.  A worker
 * (BLOCK false) never waits on the socket: when it would, or after a few
 * rounds, the rest is left to the writer thread (BLOCK true). */
static void
send_queued_locked (struct conn *c, bool block)
{
  unsigned rounds = 0;

  c->sending = true;
  while (c->head) {
    struct iovec iov[NBD_SEND_IOV];
    struct msghdr msg = { .msg_iov = iov };
    struct reply *r = c->head;
    ssize_t n = 0;

    if (!c->dead) {
      if (!block && rounds++ == 8)
        break;
      for (; r && msg.msg_iovlen < NBD_SEND_IOV; r = r->next)
        iov[msg.msg_iovlen++] = (struct iovec){ r->data + r->off,
                                                r->len - r->off };
      pthread_mutex_unlock (&c->lock);
      do
        n = sendmsg (c->fd, &msg,
                     MSG_NOSIGNAL | (block ? 0 : MSG_DONTWAIT));
      while (n < 0 && errno == EINTR);
      pthread_mutex_lock (&c->lock);
      if (n < 0 && !block && (errno == EAGAIN || errno == EWOULDBLOCK))
        break;
      if (n <= 0) {
        c->dead = true;
        shutdown (c->fd, SHUT_RDWR);  /* wakes the reader */
      }
    }
    /* Retire what went out (all of it when the connection is dead). */
    while ((r = c->head) && (c->dead || (size_t) n >= r->len - r->off)) {
      if (!c->dead)
        n -= (ssize_t) (r->len - r->off);
      c->head = r->next;
      budget_release_locked (c, r->cost);
      free (r);
    }
    if (!c->head)
      c->tail = NULL;
    else if (n > 0)
      c->head->off += (size_t) n;
  }
  c->sending = false;
  if (c->head)
    pthread_cond_signal (&c->wcond);
}

/* Queue R and send it, with whatever else is queued, unless another
 * thread is sending already (it sends R too).  R NULL (allocation
 * failed) drops the connection. */
/* Disconnect C: replies are dropped, buffered requests are not run, and
 * the shutdown wakes its reader and writer.  srv->lock may be held. */
static void
conn_drop (struct conn *c)
{
  pthread_mutex_lock (&c->lock);
  c->dead = true;
  shutdown (c->fd, SHUT_RDWR);
  if (c->reader_waits)
    pthread_cond_signal (&c->cond);
  pthread_mutex_unlock (&c->lock);
}

static void
queue_reply (struct conn *c, struct reply *r, uint64_t cost)
{
  pthread_mutex_lock (&c->lock);
  if (!r) {
    c->dead = true;
    shutdown (c->fd, SHUT_RDWR);
    budget_release_locked (c, cost);
  }
  else if (c->dead) {
    budget_release_locked (c, cost);
    free (r);
  }
  else {
    r->next = NULL;
    r->cost = cost;
    r->off = 0;
    if (c->tail)
      c->tail->next = r;
    else
      c->head = r;
    c->tail = r;
    if (!c->sending)
      send_queued_locked (c, false);
  }
  pthread_mutex_unlock (&c->lock);
}

/* Sends what the workers could not send without waiting; the only
 * thread that blocks on the socket, so a client that does not read
 * stalls only its own connection. */
static void *
writer_thread (void *arg)
{
  struct conn *c = arg;

  pthread_mutex_lock (&c->lock);
  for (;;) {
    if (c->head && !c->sending)
      send_queued_locked (c, true);
    else if (!c->head && c->quit)
      break;
    else
      pthread_cond_wait (&c->wcond, &c->lock);
  }
  pthread_mutex_unlock (&c->lock);
  return NULL;
}

static uint32_t
nbd_errno (int err)
{
  switch (err) {
  case 0: return 0;
  case EPERM: case EROFS: return NBD_EPERM;
  case ENOMEM: return NBD_ENOMEM;
  case EINVAL: return NBD_EINVAL;
  case ENOSPC: case EFBIG: case EDQUOT: return NBD_ENOSPC;
  case EOVERFLOW: return NBD_EOVERFLOW;
  case ENOTSUP: return NBD_ENOTSUP;
  case ESHUTDOWN: return NBD_ESHUTDOWN;
  default: return NBD_EIO;
  }
}

static struct reply *
simple_reply (uint64_t cookie, int err, size_t data_len)
{
  struct reply *r = reply_new (16 + data_len);
  if (r) {
    be32_store (r->data, NBD_SIMPLE_REPLY_MAGIC);
    be32_store (r->data + 4, nbd_errno (err));
    be64_store (r->data + 8, cookie);
  }
  return r;
}

static void
chunk_header (unsigned char *p, uint16_t flags, uint16_t type,
              uint64_t cookie, uint32_t len)
{
  be32_store (p, NBD_STRUCTURED_REPLY_MAGIC);
  be16_store (p + 4, flags);
  be16_store (p + 6, type);
  be64_store (p + 8, cookie);
  be32_store (p + 16, len);
}

static struct reply *
error_reply (struct conn *c, const struct job *j, int err)
{
  struct reply *r;
  bool chunked = c->structured && (j->type == NBD_CMD_READ
                                   || j->type == NBD_CMD_BLOCK_STATUS);
  if (!chunked)
    return simple_reply (j->cookie, err, 0);
  r = reply_new (20 + 6);
  if (r) {
    chunk_header (r->data, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR,
                  j->cookie, 6);
    be32_store (r->data + 20, nbd_errno (err));
    be16_store (r->data + 24, 0);
  }
  return r;
}

/* ---- commands (worker threads) ---- */

/* Extents of [OFFSET, OFFSET+LEN) into EXT[], at most MAX; returns how
 * many, or a negative errno.  They may cover less than LEN. */
static int
get_extents (strata_node *node, uint64_t offset, uint64_t len,
             struct strata_extent *ext, int max, unsigned flags)
{
  int n = 0;
  while (len > 0 && n < max) {
    int r = strata_block_status (node, offset, len, &ext[n], flags);
    if (r < 0)
      return r;
    if (ext[n].length == 0 || ext[n].length > len)
      return -EIO;
    offset += ext[n].length;
    len -= ext[n].length;
    n++;
  }
  return n;
}

static struct reply *
do_read (struct conn *c, struct job *j)
{
  strata_node *node = c->exp->node;
  struct strata_extent *ext;
  struct reply *r;
  uint64_t off = j->offset;
  unsigned char *p;
  int n, err;

  if (!c->structured) {
    r = simple_reply (j->cookie, 0, j->len);
    if (!r)
      return NULL;
    err = strata_pread (node, r->data + 16, j->len, j->offset, 0);
    if (err < 0) {
      free (r);
      return simple_reply (j->cookie, -err, 0);
    }
    return r;
  }

  /* Structured: a hole chunk per zero extent, a data chunk per run of
   * other extents, the last one flagged DONE.  Past NBD_MAX_EXTENTS the
   * rest is one data chunk.  A small read is one data chunk: looking for
   * holes would cost more than sending its zeros.  So is a DF read. */
  struct strata_extent one;

  if (j->len <= NBD_SPARSE_MIN || (j->flags & NBD_CMD_FLAG_DF)) {
    ext = &one;  /* filled in below: the whole read is data */
    n = 0;
  }
  else if (!(ext = malloc (sizeof *ext * (NBD_MAX_EXTENTS + 1))))
    return NULL;
  else {
    /* What a format knows to be zero becomes a hole chunk; its data
     * clusters are not checked for holes in the file (lseek per cluster
     * costs more than it saves), as QEMU does not. */
    n = get_extents (node, j->offset, j->len, ext, NBD_MAX_EXTENTS,
                     STRATA_BS_SHALLOW);
    if (n < 0) {
      if (ext != &one)
        free (ext);
      return error_reply (c, j, -n);
    }
  }
  {
    uint64_t covered = 0;
    int m = 0;
    for (int i = 0; i < n; i++) {
      covered += ext[i].length;
      /* Merge runs of the same kind: one pread for data at any depth. */
      if (m > 0 && !(ext[m - 1].flags & STRATA_BS_ZERO)
                       == !(ext[i].flags & STRATA_BS_ZERO))
        ext[m - 1].length += ext[i].length;
      else
        ext[m++] = ext[i];
    }
    n = m;
    if (covered < j->len) {
      if (n > 0 && !(ext[n - 1].flags & STRATA_BS_ZERO))
        ext[n - 1].length += j->len - covered;
      else
        ext[n++] = (struct strata_extent){ .length = j->len - covered };
    }
  }
  r = reply_new ((size_t) j->len + (size_t) n * 32);
  if (!r) {
    if (ext != &one)
      free (ext);
    return NULL;
  }
  p = r->data;
  for (int i = 0; i < n; i++) {
    uint64_t l = ext[i].length;
    uint16_t done = i == n - 1 ? NBD_REPLY_FLAG_DONE : 0;
    if (ext[i].flags & STRATA_BS_ZERO) {
      chunk_header (p, done, NBD_REPLY_TYPE_OFFSET_HOLE, j->cookie, 12);
      be64_store (p + 20, off);
      be32_store (p + 28, (uint32_t) l);
      p += 32;
    }
    else {
      chunk_header (p, done, NBD_REPLY_TYPE_OFFSET_DATA, j->cookie,
                    (uint32_t) (8 + l));
      be64_store (p + 20, off);
      err = strata_pread (node, p + 28, l, off, 0);
      if (err < 0) {
        free (r);
        if (ext != &one)
          free (ext);
        return error_reply (c, j, -err);
      }
      p += 28 + l;
    }
    off += l;
  }
  if (ext != &one)
    free (ext);
  r->len = (size_t) (p - r->data);
  return r;
}

static uint32_t
depth_value (const struct strata_extent *e)
{
  return (e->flags & STRATA_BS_ALLOCATED) ? (uint32_t) e->depth + 1 : 0;
}

static uint32_t
base_value (const struct strata_extent *e)
{
  return ((e->flags & STRATA_BS_DATA) ? 0 : NBD_STATE_HOLE)
         | ((e->flags & STRATA_BS_ZERO) ? NBD_STATE_ZERO : 0);
}

/* One BLOCK_STATUS chunk for context ID, merging neighbours with equal
 * values; appended at P.  Returns the bytes written. */
static size_t
status_chunk (unsigned char *p, uint64_t cookie, uint32_t id,
              const struct strata_extent *ext, int n, bool done,
              uint32_t (*value) (const struct strata_extent *))
{
  unsigned char *d = p + 24;
  int nd = 0;
  for (int i = 0; i < n; i++) {
    uint32_t v = value (&ext[i]);
    if (nd > 0 && be32_load (d - 4) == v) {
      be32_store (d - 8, be32_load (d - 8) + (uint32_t) ext[i].length);
      continue;
    }
    be32_store (d, (uint32_t) ext[i].length);
    be32_store (d + 4, v);
    d += 8;
    nd++;
  }
  chunk_header (p, done ? NBD_REPLY_FLAG_DONE : 0,
                NBD_REPLY_TYPE_BLOCK_STATUS, cookie,
                (uint32_t) (4 + 8 * nd));
  be32_store (p + 20, id);
  return (size_t) (d - p);
}

static struct reply *
do_block_status (struct conn *c, struct job *j)
{
  struct strata_extent *ext;
  struct reply *r;
  int max = (j->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : NBD_MAX_EXTENTS;
  int n;
  size_t len = 0;

  ext = malloc (sizeof *ext * NBD_MAX_EXTENTS);
  if (!ext)
    return NULL;
  n = get_extents (c->exp->node, j->offset, j->len, ext, max,
                   STRATA_BS_SHALLOW);
  if (n <= 0) {
    free (ext);
    return error_reply (c, j, n < 0 ? -n : EIO);
  }
  r = reply_new (2 * (24 + (size_t) n * 8));
  if (r) {
    if (c->ctx_base)
      len += status_chunk (r->data, j->cookie, CTX_BASE_ALLOCATION, ext, n,
                           !c->ctx_depth, base_value);
    if (c->ctx_depth)
      len += status_chunk (r->data + len, j->cookie, CTX_ALLOCATION_DEPTH,
                           ext, n, true, depth_value);
    r->len = len;
  }
  free (ext);
  return r;
}

static bool
buffer_is_zero (const unsigned char *p, size_t len)
{
  /* First bytes, then the rest against itself shifted by 16. */
  static const unsigned char zero[16];
  if (len < 16)
    return len == 0 || (p[0] == 0 && memcmp (p, p + 1, len - 1) == 0);
  return memcmp (p, zero, 16) == 0 && memcmp (p, p + 16, len - 16) == 0;
}

/* FAST_ZERO: fast only when there is nothing to do. */
static int
fast_zero (strata_node *node, uint64_t offset, uint64_t len)
{
  while (len > 0) {
    struct strata_extent e;
    int r = strata_block_status (node, offset, len, &e, 0);
    if (r < 0)
      return r;
    if (!(e.flags & STRATA_BS_ZERO) || e.length == 0 || e.length > len)
      return -ENOTSUP;
    offset += e.length;
    len -= e.length;
  }
  return 0;
}

static struct reply *
run_job (struct conn *c, struct job *j)
{
  struct nbd_export *e = c->exp;
  unsigned fua = ((j->flags & NBD_CMD_FLAG_FUA) || e->flags.writethrough)
                     ? STRATA_REQ_FUA : 0;
  int r = 0;

  switch (j->type) {
  case NBD_CMD_READ:
    return do_read (c, j);
  case NBD_CMD_BLOCK_STATUS:
    return do_block_status (c, j);
  case NBD_CMD_WRITE:
    if (e->flags.detect_zeroes != ZEROES_OFF
        && buffer_is_zero (j->payload, j->len))
      r = strata_pwrite_zeroes (e->node, j->offset, j->len,
                                fua | (e->flags.detect_zeroes == ZEROES_UNMAP
                                           ? STRATA_REQ_MAY_UNMAP : 0));
    else
      r = strata_pwrite (e->node, j->payload, j->len, j->offset, fua);
    break;
  case NBD_CMD_FLUSH:
    r = strata_flush (e->node, 0);
    break;
  case NBD_CMD_TRIM:
    if (e->flags.discard)
      r = strata_pdiscard (e->node, j->offset, j->len, 0);
    if (r == 0 && fua)
      r = strata_flush (e->node, 0);
    break;
  case NBD_CMD_WRITE_ZEROES:
    if (j->flags & NBD_CMD_FLAG_FAST_ZERO)
      r = fast_zero (e->node, j->offset, j->len);
    else
      r = strata_pwrite_zeroes (e->node, j->offset, j->len,
                                fua | ((e->flags.discard
                                        && !(j->flags
                                             & NBD_CMD_FLAG_NO_HOLE))
                                           ? STRATA_REQ_MAY_UNMAP : 0));
    break;
  case NBD_CMD_CACHE:
    r = strata_prefetch (e->node, j->offset, j->len);
    break;
  default:
    r = -EINVAL;
  }
  return simple_reply (j->cookie, r < 0 ? -r : 0, 0);
}

/* Jobs waiting in the queue that a sleeping worker could take.
 * pool_lock held. */
static unsigned
queued_for_sleepers_locked (struct nbd_server *srv)
{
  return srv->nr_jobs < srv->idle_workers ? srv->nr_jobs
                                          : srv->idle_workers;
}

/* Wake a sleeping worker for each of them; returns how many.  pool_lock
 * held. */
static unsigned
wake_for_queued_locked (struct nbd_server *srv)
{
  unsigned n = queued_for_sleepers_locked (srv);

  for (unsigned i = 0; i < n; i++)
    pthread_cond_signal (&srv->job_cond);
  return n;
}

static void *
worker_thread (void *arg)
{
  struct nbd_server *srv = arg;
  uint64_t took;

  pthread_mutex_lock (&srv->pool_lock);
  for (;;) {
    struct job *j = srv->jobs;
    struct reply *r;
    if (!j) {
      if (srv->pool_quit)
        break;
      srv->idle_workers++;
      pthread_cond_wait (&srv->job_cond, &srv->pool_lock);
      srv->idle_workers--;
      continue;
    }
    srv->jobs = j->next;
    if (!srv->jobs)
      srv->jobs_tail = NULL;
    srv->nr_jobs--;
    pthread_mutex_unlock (&srv->pool_lock);
    took = now_ns ();
    r = run_job (j->conn, j);
    queue_reply (j->conn, r, j->cost);
    free (j->payload);
    free (j);
    took = now_ns () - took;
    pthread_mutex_lock (&srv->pool_lock);
    srv->job_ns_avg = srv->job_ns_avg - srv->job_ns_avg / 8 + took / 8;
    /* Jobs queued behind a slow one (one worker took their batch while
     * jobs were short) get workers of their own now. */
    if (took > NBD_SLOW_JOB_NS)
      wake_for_queued_locked (srv);
  }
  pthread_mutex_unlock (&srv->pool_lock);
  return NULL;
}

/* Whether jobs wait in the queue while workers sleep; with WAKE, wake
 * workers for them. */
static bool
pool_nudge (struct nbd_server *srv, bool wake)
{
  unsigned n;

  pthread_mutex_lock (&srv->pool_lock);
  n = wake ? wake_for_queued_locked (srv) : queued_for_sleepers_locked (srv);
  pthread_mutex_unlock (&srv->pool_lock);
  return n > 0;
}

/* Hand the connection's parsed requests to the pool: one lock for the
 * lot, and sleeping workers woken outside it (so that they do not wake
 * only to wait for it).  The queue is shared: a job waits at most for
 * the running jobs ahead of it; a job that blocks for long wakes
 * workers for the jobs queued behind it and turns later batches
 * parallel (job_ns_avg). */
static void
submit_batch (struct conn *c)
{
  struct nbd_server *srv = c->srv;
  unsigned wake;

  if (!c->batch)
    return;
  pthread_mutex_lock (&srv->pool_lock);
  if (srv->jobs_tail)
    srv->jobs_tail->next = c->batch;
  else
    srv->jobs = c->batch;
  srv->jobs_tail = c->batch_tail;
  srv->nr_jobs += c->nbatch;
  /* Waking a worker costs more than a short job: while jobs are short
   * (page-cache I/O), one worker per batch runs it, and the reader and
   * that worker keep two cores busy with no hand-over per request.  A
   * job that may block (flush, big transfer) gets a worker of its own,
   * and once jobs take long (disk, remote backing file) every job does. */
  wake = srv->job_ns_avg > NBD_SLOW_JOB_NS ? c->nbatch : 1 + c->nheavy;
  if (wake > srv->idle_workers)
    wake = srv->idle_workers;
  pthread_mutex_unlock (&srv->pool_lock);
  c->batch = c->batch_tail = NULL;
  c->nbatch = c->nheavy = 0;
  while (wake-- > 0)
    pthread_cond_signal (&srv->job_cond);
}

/* Add J to the batch; a full batch goes to the pool at once. */
static void
submit (struct conn *c, struct job *j)
{
  j->next = NULL;
  if (c->batch_tail)
    c->batch_tail->next = j;
  else
    c->batch = j;
  c->batch_tail = j;
  if (j->type == NBD_CMD_FLUSH || j->len >= NBD_HEAVY_LEN)
    c->nheavy++;
  if (++c->nbatch == NBD_BATCH)
    submit_batch (c);
}

/* ---- transmission (reader thread) ---- */

/* Wait until COST more bytes fit in the connection's budget, then take
 * them (and one request slot).  False when the connection is dead: its
 * replies could not be sent, so the requests still buffered are not
 * run. */
static bool
budget_take (struct conn *c, uint64_t cost)
{
  pthread_mutex_lock (&c->lock);
  while (!c->dead && (c->inflight >= NBD_MAX_INFLIGHT
                      || (c->inflight > 0
                          && c->queued + cost > NBD_MAX_QUEUED))) {
    if (c->batch) {             /* its jobs hold budget: let them run */
      pthread_mutex_unlock (&c->lock);
      submit_batch (c);
      pthread_mutex_lock (&c->lock);
      continue;
    }
    c->reader_waits = true;
    pthread_cond_wait (&c->cond, &c->lock);
  }
  c->reader_waits = false;
  if (c->dead) {
    pthread_mutex_unlock (&c->lock);
    return false;
  }
  c->inflight++;
  c->queued += cost;
  c->last_request_ms = now_ms ();
  pthread_mutex_unlock (&c->lock);
  return true;
}

/* The errno a request fails with before it runs, or 0. */
static int
check_request (struct conn *c, uint16_t flags, uint16_t type,
               uint64_t offset, uint32_t len)
{
  struct nbd_export *e = c->exp;
  uint16_t allowed = NBD_CMD_FLAG_FUA;
  bool ranged = true, write = false;
  uint64_t end;

  switch (type) {
  case NBD_CMD_READ:
    if (c->structured)
      allowed |= NBD_CMD_FLAG_DF;
    if (len > NBD_MAX_BLOCK)
      return EINVAL;
    break;
  case NBD_CMD_WRITE:
    write = true;
    if (len > NBD_MAX_BLOCK)
      return EINVAL;
    break;
  case NBD_CMD_WRITE_ZEROES:
    write = true;
    allowed |= NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
    break;
  case NBD_CMD_TRIM:
    write = true;
    break;
  case NBD_CMD_CACHE:
    if (len > NBD_MAX_BLOCK)
      return EINVAL;
    break;
  case NBD_CMD_FLUSH:
    ranged = false;
    if (offset || len)
      return EINVAL;
    break;
  case NBD_CMD_BLOCK_STATUS:
    allowed |= NBD_CMD_FLAG_REQ_ONE;
    if (!c->ctx_base && !c->ctx_depth)
      return EINVAL;
    break;
  default:
    return EINVAL;
  }
  if (flags & ~allowed)
    return EINVAL;
  if (write && !e->flags.writable)
    return EPERM;
  if (ranged) {
    if (len == 0)
      return EINVAL;
    if (!checked_add_u64 (offset, len, &end) || end > e->size)
      return (type == NBD_CMD_WRITE || type == NBD_CMD_WRITE_ZEROES)
                 ? ENOSPC : EINVAL;
  }
  return 0;
}

static void
transmission_loop (struct conn *c)
{
  unsigned char h[28];

  pthread_mutex_lock (&c->lock);
  c->last_request_ms = now_ms ();
  pthread_mutex_unlock (&c->lock);
  /* The first bytes of a request may take forever (an idle client); the
   * rest of it must follow promptly. */
  while (conn_read (c, h, 4, -1) && conn_read (c, h + 4, 24, NBD_PAYLOAD_MS)
         && be32_load (h) == NBD_REQUEST_MAGIC) {
    uint16_t flags = be16_load (h + 4), type = be16_load (h + 6);
    uint64_t cookie = be64_load (h + 8), offset = be64_load (h + 16);
    uint32_t len = be32_load (h + 24);
    int err;
    struct job *j;
    uint64_t cost;

    if (type == NBD_CMD_DISC)
      return;
    err = check_request (c, flags, type, offset, len);
    if (type == NBD_CMD_WRITE && (err || len > NBD_MAX_BLOCK)) {
      /* Stay in step: the payload follows the header regardless. */
      if (!skip_bytes (c, len, NBD_PAYLOAD_MS))
        return;
    }
    cost = 32;
    if (!err && (type == NBD_CMD_READ || type == NBD_CMD_WRITE))
      cost += len;
    if (!err && type == NBD_CMD_READ && c->structured)
      cost += (uint64_t) NBD_MAX_EXTENTS * 32;
    if (!budget_take (c, cost))
      return;
    j = calloc (1, sizeof *j);
    if (!j) {
      queue_reply (c, NULL, cost);
      return;
    }
    *j = (struct job){ .conn = c, .cookie = cookie, .offset = offset,
                       .len = len, .flags = flags, .type = type,
                       .cost = cost };
    if (err) {
      queue_reply (c, error_reply (c, j, err), cost);
      free (j);
      continue;
    }
    if (type == NBD_CMD_WRITE) {
      j->payload = malloc (len);
      if (!j->payload || !conn_read (c, j->payload, len, NBD_PAYLOAD_MS)) {
        queue_reply (c, NULL, cost);  /* drops the connection */
        free (j->payload);
        free (j);
        return;
      }
    }
    submit (c, j);
  }
}

static void
transmission (struct conn *c)
{
  transmission_loop (c);
  submit_batch (c);             /* what was parsed still runs and replies */
}

/* ---- connections ---- */

static void
conn_run (struct nbd_server *srv, int fd)
{
  struct conn *c = calloc (1, sizeof *c);
  int one = 1;

  if (!c) {
    close (fd);
    return;
  }
  c->srv = srv;
  c->fd = fd;
  if (!(c->rbuf = malloc (NBD_RBUF))) {
    free (c);
    close (fd);
    return;
  }
  pthread_mutex_init (&c->lock, NULL);
  pthread_cond_init (&c->cond, NULL);
  pthread_cond_init (&c->wcond, NULL);
  setsockopt (fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

  pthread_mutex_lock (&srv->lock);
  c->next = srv->conns;
  srv->conns = c;
  bool stopping = srv->stopping;
  pthread_mutex_unlock (&srv->lock);

  if (!stopping && handshake (c)
      && pthread_create (&c->writer, NULL, writer_thread, c) == 0) {
    transmission (c);
    pthread_mutex_lock (&c->lock);
    while (c->inflight > 0) {
      c->reader_waits = true;
      pthread_cond_wait (&c->cond, &c->lock);
    }
    c->reader_waits = false;
    c->quit = true;
    pthread_cond_signal (&c->wcond);
    pthread_mutex_unlock (&c->lock);
    pthread_join (c->writer, NULL);
  }

  pthread_mutex_lock (&srv->lock);
  for (struct conn **pp = &srv->conns; *pp; pp = &(*pp)->next)
    if (*pp == c) {
      *pp = c->next;
      break;
    }
  pthread_mutex_unlock (&srv->lock);
  close (fd);
  export_unref (srv, c->exp);
  free (c->ctx_export);
  free (c->rbuf);
  pthread_cond_destroy (&c->wcond);
  pthread_cond_destroy (&c->cond);
  pthread_mutex_destroy (&c->lock);
  free (c);
}

struct conn_arg {
  struct nbd_server *srv;
  int fd;
};

static void
wake (struct nbd_server *srv)
{
  char b = 0;
  if (write (srv->wake[1], &b, 1) < 0) {
    /* The pipe is full: the loop is awake anyway. */
  }
}

static void *
conn_thread (void *arg)
{
  struct conn_arg a = *(struct conn_arg *) arg;
  free (arg);
  conn_run (a.srv, a.fd);
  /* Wake the accept loop before the count drops: once it is zero the
   * server may be freed. */
  pthread_mutex_lock (&a.srv->lock);
  wake (a.srv);
  a.srv->active--;
  pthread_cond_broadcast (&a.srv->cond);
  pthread_mutex_unlock (&a.srv->lock);
  return NULL;
}

void
nbd_server_serve_fd (struct nbd_server *srv, int fd)
{
  conn_run (srv, fd);
}

/* ---- the server ---- */

struct nbd_server *
nbd_server_new (void)
{
  struct nbd_server *srv = calloc (1, sizeof *srv);
  if (!srv)
    return NULL;
  if (pipe2 (srv->wake, O_CLOEXEC | O_NONBLOCK) < 0) {
    free (srv);
    return NULL;
  }
  pthread_mutex_init (&srv->lock, NULL);
  pthread_cond_init (&srv->cond, NULL);
  pthread_mutex_init (&srv->pool_lock, NULL);
  pthread_cond_init (&srv->job_cond, NULL);
  srv->max_clients = 1;
  srv->evict_ms = NBD_EVICT_MS;
  srv->persistent = true;
  srv->job_ns_avg = 2 * NBD_SLOW_JOB_NS;  /* parallel until jobs prove short */
  for (size_t i = 0; i < NBD_WORKERS; i++)
    if (pthread_create (&srv->workers[srv->nr_workers], NULL, worker_thread,
                        srv) == 0)
      srv->nr_workers++;
  if (srv->nr_workers == 0) {
    nbd_server_free (srv);
    return NULL;
  }
  return srv;
}

bool
nbd_server_add_export (struct nbd_server *srv, const char *name,
                       const char *description, strata_node *node,
                       const struct nbd_export_flags *flags,
                       strata_error **errp)
{
  return nbd_server_add_export_full (srv, name, description, node, flags,
                                     NULL, NULL, errp);
}

bool
nbd_server_add_export_full (struct nbd_server *srv, const char *name,
                            const char *description, strata_node *node,
                            const struct nbd_export_flags *flags,
                            void (*gone) (void *opaque), void *opaque,
                            strata_error **errp)
{
  struct nbd_export *e, **v;
  int64_t size = strata_length (node);

  if (strlen (name) > NBD_MAX_NAME) {
    error_set (errp, EINVAL, "export name longer than %d bytes",
               NBD_MAX_NAME);
    return false;
  }
  if (description && strlen (description) > NBD_MAX_NAME) {
    error_set (errp, EINVAL, "export description longer than %d bytes",
               NBD_MAX_NAME);
    return false;
  }
  if (size < 0) {
    error_set_errno (errp, (int) -size, "export '%s': cannot get its size",
                     name);
    return false;
  }
  e = calloc (1, sizeof *e);
  if (!e) {
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  *e = (struct nbd_export){ .node = node, .flags = *flags,
                            .size = (uint64_t) size, .refs = 1 };
  e->name = strdup (name);
  e->description = description ? strdup (description) : NULL;
  if (!e->name || (description && !e->description)) {
    export_free (e);
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  e->tflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA
              | NBD_FLAG_SEND_CACHE;
  if (flags->writable)
    e->tflags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES
                 | NBD_FLAG_SEND_FAST_ZERO;
  else
    e->tflags |= NBD_FLAG_READ_ONLY;
  if (flags->multi_conn)
    e->tflags |= NBD_FLAG_CAN_MULTI_CONN;

  pthread_mutex_lock (&srv->lock);
  if (export_index (srv, name) >= 0) {
    pthread_mutex_unlock (&srv->lock);
    export_free (e);
    error_set (errp, EEXIST, "export '%s' already exists", name);
    return false;
  }
  v = realloc (srv->exports, (srv->nr_exports + 1) * sizeof *v);
  if (!v) {
    pthread_mutex_unlock (&srv->lock);
    export_free (e);
    error_set (errp, ENOMEM, "out of memory");
    return false;
  }
  srv->exports = v;
  v[srv->nr_exports++] = e;
  /* Only now: a failed add must not report the export gone. */
  e->gone = gone;
  e->gone_opaque = opaque;
  pthread_mutex_unlock (&srv->lock);
  return true;
}

/* Does a client that has not hung up use E?  A client that closed its
 * end a moment ago still holds a reference until its reader notices;
 * it does not make the export busy.  srv->lock held. */
static bool
export_has_live_client_locked (struct nbd_server *srv, struct nbd_export *e)
{
  for (struct conn *c = srv->conns; c; c = c->next) {
    struct pollfd pfd = { .fd = c->fd, .events = POLLRDHUP };
    if (c->exp != e)
      continue;
    if (poll (&pfd, 1, 0) == 0
        || !(pfd.revents & (POLLRDHUP | POLLHUP | POLLERR)))
      return true;
  }
  /* Other references are options (INFO, meta contexts) being answered
   * in a handshake: not clients of the export yet. */
  return false;
}

bool
nbd_server_remove_export (struct nbd_server *srv, const char *name,
                          bool hard, strata_error **errp)
{
  struct nbd_export *e, *dead;
  ssize_t i;

  pthread_mutex_lock (&srv->lock);
  if ((i = export_index (srv, name)) < 0) {
    pthread_mutex_unlock (&srv->lock);
    error_set (errp, ENOENT, "export '%s' not found", name);
    return false;
  }
  e = srv->exports[i];
  if (!hard && e->refs > 1 && export_has_live_client_locked (srv, e)) {
    pthread_mutex_unlock (&srv->lock);
    error_set (errp, EBUSY, "export '%s' still in use", name);
    return false;
  }
  memmove (&srv->exports[i], &srv->exports[i + 1],
           (srv->nr_exports - (size_t) i - 1) * sizeof *srv->exports);
  srv->nr_exports--;
  /* Disconnect its clients; each drops its reference as it ends. */
  for (struct conn *c = srv->conns; c; c = c->next)
    if (c->exp == e)
      shutdown (c->fd, SHUT_RDWR);
  dead = export_unref_locked (e);
  pthread_mutex_unlock (&srv->lock);
  export_free (dead);
  return true;
}

void
nbd_server_set_evict_after (struct nbd_server *srv, unsigned ms)
{
  srv->evict_ms = ms;
}

void
nbd_server_set_limits (struct nbd_server *srv, unsigned max_clients,
                       bool persistent)
{
  srv->max_clients = max_clients ? max_clients : UINT_MAX;
  srv->persistent = persistent;
}

static bool
add_listen_fd (struct nbd_server *srv, int fd, strata_error **errp)
{
  if (srv->nr_listen >= NBD_MAX_LISTEN) {
    close (fd);
    error_set (errp, EMFILE, "too many listening sockets");
    return false;
  }
  srv->listen_fds[srv->nr_listen++] = fd;
  return true;
}

bool
nbd_server_listen_unix (struct nbd_server *srv, const char *path,
                        strata_error **errp)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  struct stat st;
  int fd;

  if (strlen (path) >= sizeof sun.sun_path) {
    error_set (errp, ENAMETOOLONG, "%s: socket path too long", path);
    return false;
  }
  strcpy (sun.sun_path, path);
  if (lstat (path, &st) == 0 && S_ISSOCK (st.st_mode))
    unlink (path);
  fd = unix_socket_listen (path, 16, false);
  if (fd < 0) {
    error_set_errno (errp, -fd, "%s", path);
    return false;
  }
  return add_listen_fd (srv, fd, errp);
}

bool
nbd_server_listen_tcp (struct nbd_server *srv, const char *host,
                       const char *port, strata_error **errp)
{
  struct addrinfo hints = { .ai_family = AF_UNSPEC,
                            .ai_socktype = SOCK_STREAM,
                            .ai_flags = AI_PASSIVE | AI_ADDRCONFIG };
  struct addrinfo *res, *a;
  int r, bound = 0, err = 0;

  r = getaddrinfo (host, port, &hints, &res);
  if (r != 0) {
    error_set (errp, EINVAL, "%s:%s: %s", host ? host : "", port,
               gai_strerror (r));
    return false;
  }
  for (a = res; a; a = a->ai_next) {
    int one = 1, fd;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    fd = socket (a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      err = errno;
      continue;
    }
    setsockopt (fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (a->ai_family == AF_INET6)
      setsockopt (fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind (fd, a->ai_addr, a->ai_addrlen) < 0 || listen (fd, 16) < 0) {
      err = errno;
      close (fd);
      continue;
    }
    if (getsockname (fd, (struct sockaddr *) &ss, &sl) == 0)
      srv->tcp_port = ntohs (ss.ss_family == AF_INET6
                                 ? ((struct sockaddr_in6 *) &ss)->sin6_port
                                 : ((struct sockaddr_in *) &ss)->sin_port);
    if (!add_listen_fd (srv, fd, errp)) {
      freeaddrinfo (res);
      return false;
    }
    bound++;
    /* Port 0: every address family must use the port the first got. */
    if (strcmp (port, "0") == 0)
      break;
  }
  freeaddrinfo (res);
  if (!bound) {
    error_set_errno (errp, err ? err : EADDRNOTAVAIL, "%s:%s",
                     host ? host : "", port);
    return false;
  }
  return true;
}

int
nbd_server_tcp_port (struct nbd_server *srv)
{
  return srv->tcp_port;
}

static void
accept_one (struct nbd_server *srv, int lfd)
{
  struct conn_arg *a;
  pthread_t t;
  pthread_attr_t attr;
  int fd = accept4 (lfd, NULL, NULL, SOCK_CLOEXEC);

  if (fd < 0)
    return;
  a = malloc (sizeof *a);
  if (!a) {
    close (fd);
    return;
  }
  a->srv = srv;
  a->fd = fd;
  pthread_mutex_lock (&srv->lock);
  srv->active++;
  srv->had_client = true;
  pthread_mutex_unlock (&srv->lock);
  pthread_attr_init (&attr);
  pthread_attr_setdetachstate (&attr, PTHREAD_CREATE_DETACHED);
  if (pthread_create (&t, &attr, conn_thread, a) != 0) {
    free (a);
    close (fd);
    pthread_mutex_lock (&srv->lock);
    srv->active--;
    pthread_mutex_unlock (&srv->lock);
  }
  pthread_attr_destroy (&attr);
}

/* Is a connection idle for srv->evict_ms?  With EVICT, disconnect the one
 * idle longest. */
static bool
evict_candidate (struct nbd_server *srv, bool evict)
{
  uint64_t now = now_ms (), best_idle = 0;
  struct conn *best = NULL;

  pthread_mutex_lock (&srv->lock);
  for (struct conn *c = srv->conns; c; c = c->next) {
    uint64_t idle;
    pthread_mutex_lock (&c->lock);
    idle = idle_for_locked (c, now);
    pthread_mutex_unlock (&c->lock);
    if (idle >= srv->evict_ms && idle > best_idle) {
      best = c;
      best_idle = idle;
    }
  }
  if (best && evict)
    conn_drop (best);   /* dead: not a candidate twice */
  pthread_mutex_unlock (&srv->lock);
  return best != NULL;
}

void
nbd_server_run (struct nbd_server *srv)
{
  for (;;) {
    struct pollfd pfd[NBD_MAX_LISTEN + 1];
    size_t n = 0;
    bool full, evictable = false;
    char b[64];

    pthread_mutex_lock (&srv->lock);
    if (srv->stopping
        || (!srv->persistent && srv->had_client && srv->active == 0)) {
      pthread_mutex_unlock (&srv->lock);
      break;
    }
    full = srv->active >= srv->max_clients;
    pthread_mutex_unlock (&srv->lock);

    /* When full, look at the listening sockets only while some
     * connection could make room, so that a waiting client does not make
     * this loop spin. */
    if (full)
      evictable = evict_candidate (srv, false);
    pfd[n++] = (struct pollfd){ .fd = srv->wake[0], .events = POLLIN };
    for (size_t i = 0; (!full || evictable) && i < srv->nr_listen; i++)
      pfd[n++] = (struct pollfd){ .fd = srv->listen_fds[i],
                                  .events = POLLIN };
    if (poll (pfd, n, full ? 1000 : -1) < 0)
      continue;
    while (read (srv->wake[0], b, sizeof b) > 0)
      ;
    for (size_t i = 1; i < n; i++)
      if (pfd[i].revents & POLLIN) {
        if (full)
          evict_candidate (srv, true);  /* its slot frees up shortly */
        else
          accept_one (srv, pfd[i].fd);
      }
  }

  /* Disconnect whoever is left and wait for them. */
  pthread_mutex_lock (&srv->lock);
  for (struct conn *c = srv->conns; c; c = c->next)
    conn_drop (c);
  while (srv->active > 0)
    pthread_cond_wait (&srv->cond, &srv->lock);
  pthread_mutex_unlock (&srv->lock);
}

void
nbd_server_stop (struct nbd_server *srv)
{
  pthread_mutex_lock (&srv->lock);
  srv->stopping = true;
  for (struct conn *c = srv->conns; c; c = c->next)
    conn_drop (c);
  pthread_mutex_unlock (&srv->lock);
  wake (srv);
}

void
nbd_server_free (struct nbd_server *srv)
{
  if (!srv)
    return;
  pthread_mutex_lock (&srv->pool_lock);
  srv->pool_quit = true;
  pthread_cond_broadcast (&srv->job_cond);
  pthread_mutex_unlock (&srv->pool_lock);
  for (size_t i = 0; i < srv->nr_workers; i++)
    pthread_join (srv->workers[i], NULL);
  for (size_t i = 0; i < srv->nr_listen; i++)
    close (srv->listen_fds[i]);
  /* Connections have ended (nbd_server_run waits for them), so the
   * list holds the last references. */
  for (size_t i = 0; i < srv->nr_exports; i++)
    export_free (export_unref_locked (srv->exports[i]));
  free (srv->exports);
  close (srv->wake[0]);
  close (srv->wake[1]);
  pthread_cond_destroy (&srv->job_cond);
  pthread_mutex_destroy (&srv->pool_lock);
  pthread_cond_destroy (&srv->cond);
  pthread_mutex_destroy (&srv->lock);
  free (srv);
}
