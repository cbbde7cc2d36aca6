/* strata: the NBD server's internals, shared by its files (not installed;
 * callers use server.h).  Wire layouts are in protocol.h; the spec is the
 * NetworkBlockDevice project's doc/proto.md.
 *
 *   accept loop ──> reader thread ──(request)──> work queue ──(reply)──┐
 *   server.c         per connection              shared (16 threads)   │
 *                    handshake.c, then           commands.c runs it,   │
 *                    transmission.c              reply.c sends the     v
 *                         ^                      queue itself, else the
 *                         └── budget ◄────────── writer thread per
 *                             released           connection (blocking send)
 *
 *   server.c        the server, exports, listening, accept, connections
 *   handshake.c     option negotiation              (proto.md "Handshake")
 *   transmission.c  the reader: socket input, request checks, budget
 *                                          (proto.md "Transmission phase")
 *   commands.c      handing requests to the work queue, running them on
 *                   the node                      (proto.md "Request types")
 *   reply.c         building replies, the reply queue, the writer thread
 *                   (proto.md "Simple reply message", "Structured reply
 *                   chunk message")
 *
 * Invariants:
 * - Only the reader reads the socket.  After the handshake, one thread at
 *   a time sends (c->sending): a worker that queues a reply when nobody
 *   is sending sends the whole queue without blocking (MSG_DONTWAIT, many
 *   replies per sendmsg); what would block is left to the connection's
 *   writer thread, the only one that waits on the socket.  So a client
 *   that never reads blocks only its own writer, then its own reader
 *   (through the budget: at most NBD_MAX_INFLIGHT requests and
 *   NBD_MAX_QUEUED bytes of payload and reply per connection), never the
 *   work queue.
 * - A request is fully validated by the reader, before it reaches a
 *   worker: every wire value is range-checked with checked arithmetic.
 *   While a local export's requests are short the reader runs short
 *   reads and writes itself and sends their replies together
 *   (commands.c); the rest go to the work queue.
 * - A connection is freed by its reader only once its budget is back to
 *   zero, i.e. no request and no queued reply refers to it.
 *
 * Locks.  Taken only in this order (an arrow: the right one may be taken
 * while the left one is held; no other pair is ever held together):
 *
 *     srv->lock  ──>  c->lock
 *
 *   srv->lock    struct nbd_server: the export list and every export's
 *                REFS, the connection list, each connection's EXP
 *                (bound during the handshake, read-only afterwards),
 *                ACTIVE, LAST_CLIENT_GONE and STOPPING.  srv->cond:
 *                a connection ended (nbd_server_run waits for the last).
 *   c->lock      struct conn: the reply queue (HEAD, TAIL), the budget
 *                (INFLIGHT, QUEUED), LAST_REQUEST_MS, READER_WAITS,
 *                SENDING, DEAD, QUIT.  c->cond: budget released (the
 *                reader waits); c->wcond: a reply queued or QUIT set (the
 *                writer waits).  Held around sendmsg never: it is dropped
 *                while the queue is sent.
 *   pool lock    src/util/workqueue.c: the queue of requests handed to
 *                the workers.  Taken with no NBD lock held (by the reader
 *                handing over a batch, or nudging workers), never held
 *                while a request runs.
 *   node locks   taken inside strata_* calls, which this module makes
 *                with none of its own locks held; an export's GONE
 *                callback runs with none held either.
 * Connection fields outside c->lock belong to the reader (RBUF, BATCH)
 * or are set during the handshake and read-only afterwards.
 * A function that expects srv->lock held ends in _server_locked, one that
 * expects c->lock held in _conn_locked, one that expects the pool lock
 * in _pool_locked; no function here expects a node's lock (_locked).
 * No condition variable here is waited on with a timeout (timeouts are
 * poll()'s on the socket), so none needs a CLOCK_MONOTONIC attribute.
 */
#ifndef STRATA_NBD_INTERNAL_H
#define STRATA_NBD_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <strata/strata.h>

#include "nbd/server.h"
#include "util/clock.h"
#include "util/workqueue.h"

#define NBD_MAX_NAME 4096
#define NBD_MAX_OPTION (16 * 1024)        /* longest option we parse */
#define NBD_MAX_OPTION_SKIP (1024 * 1024) /* longest we skip politely */
#define NBD_MIN_BLOCK 1
#define NBD_PREF_BLOCK 4096
#define NBD_MAX_BLOCK (32 * 1024 * 1024)
#define NBD_MAX_INFLIGHT 64
#define NBD_MAX_QUEUED (4 * 1024 * 1024)
#define NBD_MAX_EXTENTS 1024
#define NBD_SPARSE_MIN (64 * 1024) /* smaller reads: no holes */
#define NBD_HANDSHAKE_MS 10000
#define NBD_PAYLOAD_MS 30000
#define NBD_WORKERS 16
#define NBD_MAX_LISTEN 8
#define NBD_RBUF (128 * 1024)      /* reader's buffer */
#define NBD_BATCH 8                /* requests per hand-over */
#define NBD_HEAVY_LEN (256 * 1024) /* may block: own worker */
#define NBD_SLOW_REQUEST_NS 200000 /* requests this long: parallel */
#define NBD_INLINE_NS 20000        /* requests this short: the reader's */
#define NBD_DEFER_MAX 16           /* replies held back for one sendmsg */
#define NBD_NUDGE_MS 2             /* see wait_readable */
/* A full server with a client waiting frees the slot of a connection idle
 * this long (no request for it and none in flight). */
#define NBD_EVICT_MS 30000

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
  size_t off;    /* bytes already sent */
  uint64_t cost; /* budget to release once sent */
  unsigned char data[];
};

struct conn {
  struct nbd_server *srv;
  int fd;
  struct conn *next; /* server's list */

  /* Set during the handshake, read-only afterwards. */
  struct nbd_export *exp;
  bool structured;
  bool no_zeroes;
  bool ctx_base, ctx_depth; /* selected meta contexts */
  bool local;               /* no remote node under the export: the
                             * reader may run short requests itself */
  char *ctx_export;         /* export they were selected for */

  /* The reader's buffer: requests arrive many per recv under load. */
  unsigned char *rbuf;
  size_t rpos, rlen;
  /* Requests parsed but not yet handed to the work queue: the reader
   * hands them over together, before it would wait (see
   * request_submit_batch). */
  struct workqueue_item *batch, *batch_tail;
  unsigned nbatch, nheavy;
  /* Moving averages (1/8 weight) of this connection's requests' run time
   * in ns, [1] for writes and [0] for the rest, so that allocating writes
   * (a cluster copied from the backing file) and page-cache reads are
   * each judged on their own (conn_avg): written by whoever ran one
   * (reader or worker), atomically. */
  uint64_t avg_ns[2];

  pthread_mutex_t lock;     /* protects everything below */
  pthread_cond_t cond;      /* budget released (reader waits) */
  pthread_cond_t wcond;     /* reply queued, quit (writer waits) */
  uint64_t last_request_ms; /* monotonic; 0 until transmission */
  struct reply *head, *tail;
  unsigned inflight; /* requests + queued replies */
  uint64_t queued;   /* their bytes */
  unsigned deferred; /* replies queued but held back (reply_queue) */
  bool reader_waits; /* in cond_wait on COND */
  bool sending;      /* the writer is sending outside LOCK */
  bool dead;         /* socket failed: drop replies */
  bool quit;         /* writer: exit once queue empty */
  pthread_t writer;
};

/* One NBD request, from the reader to a worker. */
struct nbd_request {
  struct workqueue_item item; /* first: the work queue's link */
  struct conn *conn;
  uint64_t cookie, offset;
  uint32_t len;
  uint16_t flags, type;
  uint64_t cost;
  void *payload;
};

struct nbd_server {
  pthread_mutex_t lock;
  pthread_cond_t cond;         /* connection ended */
  struct nbd_export **exports; /* newest last */
  size_t nr_exports;
  int listen_fds[NBD_MAX_LISTEN];
  size_t nr_listen;
  int tcp_port;
  int wake[2]; /* self-pipe for the accept loop */
  unsigned max_clients;
  unsigned evict_ms; /* see nbd_server_set_evict_after */
  bool persistent;
  bool stopping;
  unsigned active;       /* connections alive */
  bool last_client_gone; /* a negotiated client left, none is connected */
  struct conn *conns;

  /* The workers, with their own lock: the hot path never takes LOCK. */
  struct workqueue *pool;
};

static inline uint64_t
nbd_now_ms (void)
{
  return clock_now_ns () / CLOCK_NS_PER_MS;
}

/* server.c: the export named NAME with a new reference (nbd_export_unref),
 * or NULL. */
struct nbd_export *nbd_export_find (struct nbd_server *srv, const char *name);
/* Drop a reference (E may be NULL); takes srv->lock. */
void nbd_export_unref (struct nbd_server *srv, struct nbd_export *e);

/* handshake.c: true once the client has chosen an export (c->exp). */
bool conn_handshake (struct conn *c);

/* transmission.c: read exactly LEN bytes from C (its buffer first),
 * waiting at most TIMEOUT_MS (-1: forever) for each chunk; false on EOF,
 * error or timeout.  Only the connection's reader calls these. */
bool conn_read (struct conn *c, void *buf, size_t len, int timeout_ms);
bool conn_skip (struct conn *c, uint64_t len, int timeout_ms);
/* Serve requests until the client disconnects or the connection dies;
 * the requests parsed by then are handed over (they still reply). */
void conn_transmission (struct conn *c);

/* commands.c: add REQ to C's batch; a full batch goes to the work queue
 * at once, the rest with request_submit_batch(). */
void request_submit (struct conn *c, struct nbd_request *req);
void request_submit_batch (struct conn *c);
/* Run C's batch on the reader when it is one short request (the reader
 * is about to wait for the client); see commands.c. */
void request_run_lone (struct conn *c);

/* reply.c */
/* A reply of LEN bytes (data[] unset), or NULL; freed once sent. */
struct reply *reply_new (size_t len);
/* A simple reply header with DATA_LEN bytes of room after it. */
struct reply *reply_simple (uint64_t cookie, int err, size_t data_len);
/* A structured chunk header at P. */
void reply_chunk_header (unsigned char *p, uint16_t flags, uint16_t type,
                         uint64_t cookie, uint32_t len);
/* REQ's failure with ERR (an errno), simple or structured as C wants. */
struct reply *reply_error (struct conn *c, const struct nbd_request *req,
                           int err);
/* Queue R (NULL: allocation failed, which drops the connection) and give
 * back COST once it has left.  With DEFER (the reader, running requests
 * itself) R may wait in the queue, up to NBD_DEFER_MAX replies, for
 * reply_send_deferred() to send them with one sendmsg. */
void reply_queue (struct conn *c, struct reply *r, uint64_t cost, bool defer);
/* Send the replies reply_queue held back (unless a sender has them). */
void reply_send_deferred (struct conn *c);
/* The connection's writer thread (ARG: the conn). */
void *reply_writer (void *arg);

#endif
