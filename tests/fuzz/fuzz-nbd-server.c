/* libFuzzer target: the NBD server against a hostile client.
 *
 * The input is everything a client sends: the handshake (client flags,
 * options) and then requests.  A thread writes it into one end of a
 * socketpair, then reads and discards whatever the server answers until
 * EOF; the server serves the other end with nbd_server_serve_fd() against
 * a 1 MiB raw image in a memfd, writable, with both meta contexts
 * offered.  The image is reset per input so runs replay.  Anything but a
 * clean disconnect is a bug: a crash, a sanitizer report, a leak or a
 * hang (the server never waits for a client longer than its timeouts,
 * and this client always closes).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <strata/strata.h>

#include "nbd/server.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

struct client {
  int fd;
  const uint8_t *data;
  size_t size;
};

static void *
client_thread (void *arg)
{
  struct client *c = arg;
  char buf[65536];
  size_t off = 0;

  while (off < c->size) {
    ssize_t n = send (c->fd, c->data + off, c->size - off, MSG_NOSIGNAL);
    if (n <= 0)
      break;
    off += (size_t) n;
  }
  shutdown (c->fd, SHUT_WR);
  while (read (c->fd, buf, sizeof buf) > 0)
    ;
  close (c->fd);
  return NULL;
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  static struct nbd_server *srv;
  static strata_node *node;
  static int memfd = -1;
  int sv[2];
  pthread_t t;
  struct client c;

  if (!srv) {
    char path[64];
    strata_error *err = NULL;
    struct nbd_export_flags flags = { .writable = true,
                                      .allocation_depth = true,
                                      .discard = true };
    memfd = memfd_create ("fuzz-nbd", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate (memfd, 1 << 20) < 0)
      abort ();
    snprintf (path, sizeof path, "/proc/self/fd/%d", memfd);
    node = strata_open (path, "raw", NULL, STRATA_OPEN_RDWR, &err);
    srv = nbd_server_new ();
    if (!node || !srv
        || !nbd_server_add_export (srv, "", "fuzz", node, &flags, &err))
      abort ();
  }
  /* Same image contents for every input: a little data, the rest hole. */
  if (ftruncate (memfd, 0) < 0 || ftruncate (memfd, 1 << 20) < 0
      || pwrite (memfd, "strata", 6, 4096) != 6)
    abort ();

  if (socketpair (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
    abort ();
  c = (struct client){ .fd = sv[1], .data = data, .size = size };
  if (pthread_create (&t, NULL, client_thread, &c) != 0)
    abort ();
  nbd_server_serve_fd (srv, sv[0]);
  pthread_join (t, NULL);
  return 0;
}
