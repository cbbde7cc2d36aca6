/* strata: NBD replies (proto.md "Simple reply message" and "Structured
 * reply chunk message"), the per-connection reply queue, its writer
 * thread and the budget that bounds it.
 *
 *   simple reply:      SIMPLE_MAGIC(4) error(4) cookie(8) [data]
 *   structured chunk:  STRUCTURED_MAGIC(4) flags(2) type(2) cookie(8)
 *                      length(4) payload(length)
 *
 * A worker that queues a reply when nobody is sending on the connection
 * sends the whole queue without blocking (MSG_DONTWAIT, many replies per
 * sendmsg); replies queued meanwhile go out in its next round.  The
 * reader, when it runs short requests itself (commands.c), holds its
 * replies back (DEFER) until it would wait for the client or has
 * NBD_DEFER_MAX of them, so that one sendmsg carries them all.  What
 * would block is left to the connection's writer thread, the only
 * thread that waits on the socket.  Every reply carries the budget its
 * request took (transmission.c's budget_take); it is given back when the
 * reply has left, or been dropped because the connection is dead.
 * Locks: c->lock (internal.h), dropped around each sendmsg.
 */
#include <errno.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "nbd/internal.h"
#include "nbd/protocol.h"
#include "util/bytes.h"

struct reply *
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
budget_release_conn_locked (struct conn *c, uint64_t cost)
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
send_queued_conn_locked (struct conn *c, bool block)
{
  unsigned rounds = 0;

  c->sending = true;
  c->deferred = 0; /* whatever was held back goes now */
  while (c->head) {
    struct iovec iov[NBD_SEND_IOV];
    struct msghdr msg = { .msg_iov = iov };
    struct reply *r = c->head;
    ssize_t n = 0;

    if (!c->dead) {
      if (!block && rounds++ == 8)
        break;
      for (; r && msg.msg_iovlen < NBD_SEND_IOV; r = r->next)
        iov[msg.msg_iovlen++]
            = (struct iovec){ r->data + r->off, r->len - r->off };
      pthread_mutex_unlock (&c->lock);
      do
        n = sendmsg (c->fd, &msg, MSG_NOSIGNAL | (block ? 0 : MSG_DONTWAIT));
      while (n < 0 && errno == EINTR);
      pthread_mutex_lock (&c->lock);
      if (n < 0 && !block && (errno == EAGAIN || errno == EWOULDBLOCK))
        break;
      if (n <= 0) {
        c->dead = true;
        shutdown (c->fd, SHUT_RDWR); /* wakes the reader */
      }
    }
    /* Retire what went out (all of it when the connection is dead). */
    while ((r = c->head) && (c->dead || (size_t)n >= r->len - r->off)) {
      if (!c->dead)
        n -= (ssize_t)(r->len - r->off);
      c->head = r->next;
      budget_release_conn_locked (c, r->cost);
      free (r);
    }
    if (!c->head)
      c->tail = NULL;
    else if (n > 0)
      c->head->off += (size_t)n;
  }
  c->sending = false;
  if (c->head)
    pthread_cond_signal (&c->wcond);
}

/* Queue R and send it, with whatever else is queued, unless another
 * thread is sending already (it sends R too) or DEFER holds it back.  R
 * NULL (allocation failed) drops the connection. */
void
reply_queue (struct conn *c, struct reply *r, uint64_t cost, bool defer)
{
  pthread_mutex_lock (&c->lock);
  if (!r) {
    c->dead = true;
    shutdown (c->fd, SHUT_RDWR);
    budget_release_conn_locked (c, cost);
  }
  else if (c->dead) {
    budget_release_conn_locked (c, cost);
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
    if (c->sending)
      ; /* the sender takes R in its next round */
    else if (defer && ++c->deferred < NBD_DEFER_MAX)
      ; /* reply_send_deferred sends it with the ones to come */
    else
      send_queued_conn_locked (c, false);
  }
  pthread_mutex_unlock (&c->lock);
}

void
reply_send_deferred (struct conn *c)
{
  pthread_mutex_lock (&c->lock);
  if (c->deferred && !c->sending)
    send_queued_conn_locked (c, false);
  pthread_mutex_unlock (&c->lock);
}

/* Sends what the workers could not send without waiting; the only
 * thread that blocks on the socket, so a client that does not read
 * stalls only its own connection. */
void *
reply_writer (void *arg)
{
  struct conn *c = arg;

  pthread_mutex_lock (&c->lock);
  for (;;) {
    if (c->head && !c->sending)
      send_queued_conn_locked (c, true);
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
  case EPERM:
  case EROFS: return NBD_EPERM;
  case ENOMEM: return NBD_ENOMEM;
  case EINVAL: return NBD_EINVAL;
  case ENOSPC:
  case EFBIG:
  case EDQUOT: return NBD_ENOSPC;
  case EOVERFLOW: return NBD_EOVERFLOW;
  case ENOTSUP: return NBD_ENOTSUP;
  case ESHUTDOWN: return NBD_ESHUTDOWN;
  default: return NBD_EIO;
  }
}

struct reply *
reply_simple (uint64_t cookie, int err, size_t data_len)
{
  struct reply *r = reply_new (16 + data_len);
  if (r) {
    be32_store (r->data, NBD_SIMPLE_REPLY_MAGIC);
    be32_store (r->data + 4, nbd_errno (err));
    be64_store (r->data + 8, cookie);
  }
  return r;
}

void
reply_chunk_header (unsigned char *p, uint16_t flags, uint16_t type,
                    uint64_t cookie, uint32_t len)
{
  be32_store (p, NBD_STRUCTURED_REPLY_MAGIC);
  be16_store (p + 4, flags);
  be16_store (p + 6, type);
  be64_store (p + 8, cookie);
  be32_store (p + 16, len);
}

struct reply *
reply_error (struct conn *c, const struct nbd_request *req, int err)
{
  struct reply *r;
  bool chunked
      = c->structured
        && (req->type == NBD_CMD_READ || req->type == NBD_CMD_BLOCK_STATUS);
  if (!chunked)
    return reply_simple (req->cookie, err, 0);
  r = reply_new (20 + 6);
  if (r) {
    reply_chunk_header (r->data, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR,
                        req->cookie, 6);
    be32_store (r->data + 20, nbd_errno (err));
    be16_store (r->data + 24, 0);
  }
  return r;
}
