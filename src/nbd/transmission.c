/* strata: the NBD transmission phase on the connection's reader thread
 * (proto.md "Transmission phase" and "Request message"): reading the
 * socket, checking each request, taking budget for it.
 *
 *   request:  REQUEST_MAGIC(4) flags(2) type(2) cookie(8) offset(8)
 *             length(4) [payload for WRITE]
 *
 * Only the reader reads the socket, through a NBD_RBUF buffer, so a busy
 * client's requests cost one recv for many.  A request is checked here,
 * completely, before a worker sees it (check_request): every wire value is
 * range-checked with checked arithmetic.  Choices (proto.md leaves them
 * open or makes them a SHOULD):
 * - Out-of-range WRITE and WRITE_ZEROES fail with ENOSPC, other commands
 *   with EINVAL; a READ, WRITE or CACHE longer than the maximum block size
 *   fails with EINVAL (as QEMU's server).
 * - Zero-length requests fail with EINVAL (QEMU's server lets them
 *   succeed).
 * The budget bounds a connection's work: at most NBD_MAX_INFLIGHT
 * requests and NBD_MAX_QUEUED bytes of payload and reply; the reader
 * waits for it (budget_take), and reply.c gives it back.  The first bytes
 * of a request may take forever (an idle client); the rest must follow
 * within NBD_PAYLOAD_MS.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "block/node.h"
#include "nbd/internal.h"
#include "nbd/protocol.h"
#include "util/bytes.h"
#include "util/checked.h"

/* Wait up to TIMEOUT_MS (-1: forever) for C's socket to be readable.
 * While requests sit in the work queue with workers asleep (one worker
 * took a batch of short requests and one of them blocks), the wait is
 * cut into NBD_NUDGE_MS slices after which those requests get workers:
 * a reader with nothing to read is the work queue's watchdog. */
static bool
wait_readable (struct conn *c, int timeout_ms)
{
  for (;;) {
    struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
    bool nudge = (timeout_ms < 0 || timeout_ms > NBD_NUDGE_MS)
                 && workqueue_nudge (c->srv->pool, false);
    int r = poll (&pfd, 1, nudge ? NBD_NUDGE_MS : timeout_ms);
    if (r < 0 && errno == EINTR)
      continue;
    if (r == 0 && nudge) {
      workqueue_nudge (c->srv->pool, true);
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

/* See internal.h. */
bool
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
    request_run_lone (c);      /* about to wait for the client */
    request_submit_batch (c);
    if (len >= NBD_RBUF / 2) { /* big payloads go straight to BUF */
      if ((n = recv_some (c, p, len, timeout_ms)) < 0)
        return false;
      p += n;
      len -= (size_t)n;
      continue;
    }
    c->rpos = c->rlen = 0;
    if ((n = recv_some (c, c->rbuf, NBD_RBUF, timeout_ms)) < 0)
      return false;
    c->rlen = (size_t)n;
  }
  return true;
}

bool
conn_skip (struct conn *c, uint64_t len, int timeout_ms)
{
  unsigned char buf[4096];
  while (len > 0) {
    size_t n = len < sizeof buf ? (size_t)len : sizeof buf;
    if (!conn_read (c, buf, n, timeout_ms))
      return false;
    len -= n;
  }
  return true;
}

/* Wait until COST more bytes fit in the connection's budget, then take
 * them (and one request slot).  False when the connection is dead: its
 * replies could not be sent, so the requests still buffered are not
 * run. */
static bool
budget_take (struct conn *c, uint64_t cost)
{
  pthread_mutex_lock (&c->lock);
  while (!c->dead
         && (c->inflight >= NBD_MAX_INFLIGHT
             || (c->inflight > 0 && c->queued + cost > NBD_MAX_QUEUED))) {
    if (c->batch || c->deferred) { /* they hold budget: let them go */
      pthread_mutex_unlock (&c->lock);
      request_submit_batch (c);
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
  c->last_request_ms = nbd_now_ms ();
  pthread_mutex_unlock (&c->lock);
  return true;
}

/* The errno a request fails with before it runs, or 0. */
static int
check_request (struct conn *c, uint16_t flags, uint16_t type, uint64_t offset,
               uint32_t len)
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
  case NBD_CMD_TRIM: write = true; break;
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
  default: return EINVAL;
  }
  if (flags & ~allowed)
    return EINVAL;
  if (write && !e->flags.writable)
    return EPERM;
  if (ranged) {
    if (len == 0)
      return EINVAL;
    if (!checked_add_u64 (offset, len, &end) || end > e->size)
      return (type == NBD_CMD_WRITE || type == NBD_CMD_WRITE_ZEROES) ? ENOSPC
                                                                     : EINVAL;
  }
  return 0;
}

static void
transmission_loop (struct conn *c)
{
  unsigned char h[28];

  pthread_mutex_lock (&c->lock);
  c->last_request_ms = nbd_now_ms ();
  pthread_mutex_unlock (&c->lock);
  /* The first bytes of a request may take forever (an idle client); the
   * rest of it must follow promptly. */
  while (conn_read (c, h, 4, -1) && conn_read (c, h + 4, 24, NBD_PAYLOAD_MS)
         && be32_load (h) == NBD_REQUEST_MAGIC) {
    uint16_t flags = be16_load (h + 4), type = be16_load (h + 6);
    uint64_t cookie = be64_load (h + 8), offset = be64_load (h + 16);
    uint32_t len = be32_load (h + 24);
    int err;
    struct nbd_request *req;
    uint64_t cost;

    if (type == NBD_CMD_DISC)
      return;
    err = check_request (c, flags, type, offset, len);
    if (type == NBD_CMD_WRITE && (err || len > NBD_MAX_BLOCK)) {
      /* Stay in step: the payload follows the header regardless. */
      if (!conn_skip (c, len, NBD_PAYLOAD_MS))
        return;
    }
    cost = 32;
    if (!err && (type == NBD_CMD_READ || type == NBD_CMD_WRITE))
      cost += len;
    if (!err && type == NBD_CMD_READ && c->structured)
      cost += (uint64_t)NBD_MAX_EXTENTS * 32;
    if (!budget_take (c, cost))
      return;
    req = calloc (1, sizeof *req);
    if (!req) {
      reply_queue (c, NULL, cost, false);
      return;
    }
    *req = (struct nbd_request){ .conn = c,
                                 .cookie = cookie,
                                 .offset = offset,
                                 .len = len,
                                 .flags = flags,
                                 .type = type,
                                 .cost = cost };
    if (err) {
      reply_queue (c, reply_error (c, req, err), cost, true);
      free (req);
      continue;
    }
    if (type == NBD_CMD_WRITE) {
      req->payload = malloc (len);
      if (!req->payload || !conn_read (c, req->payload, len, NBD_PAYLOAD_MS)) {
        reply_queue (c, NULL, cost, false); /* drops the connection */
        free (req->payload);
        free (req);
        return;
      }
    }
    request_submit (c, req);
  }
}

void
conn_transmission (struct conn *c)
{
  /* A request that waits on a network must not hold up the ones behind
   * it: such exports never run requests on the reader (commands.c). */
  c->local = !node_has_remote (c->exp->node);
  transmission_loop (c);
  request_submit_batch (c); /* what was parsed still runs and replies */
}
