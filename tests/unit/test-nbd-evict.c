/* The NBD server frees the slot of an idle connection only when a client
 * waits for one (nbd_server_set_evict_after), with libnbd as the client. */
#include <libnbd.h>
#include <pthread.h>
#include <unistd.h>

#include "test.h"

#include "nbd/server.h"

static void *
serve (void *srv)
{
  nbd_server_run (srv);
  return NULL;
}

static struct nbd_handle *
connect_to (const char *sock)
{
  struct nbd_handle *h = nbd_create ();

  CHECK (h && nbd_connect_unix (h, sock) == 0);
  return h;
}

static void
test_idle_client_makes_room_only_for_a_waiting_one (void)
{
  char *img = test_make_image ("evict.raw", 1 << 20), *sock = NULL;
  strata_node *node = strata_open (img, "raw", NULL, 0, NULL);
  struct nbd_server *srv = nbd_server_new ();
  struct nbd_export_flags flags = { 0 };
  struct nbd_handle *a, *b;
  char buf[512];
  pthread_t t;

  CHECK (node && srv);
  CHECK (asprintf (&sock, "%s/evict.sock", test_tmpdir ()) > 0);
  CHECK (nbd_server_add_export (srv, "", NULL, node, &flags, NULL));
  nbd_server_set_limits (srv, 1, true);
  nbd_server_set_evict_after (srv, 200);
  CHECK (nbd_server_listen_unix (srv, sock, NULL));
  CHECK (pthread_create (&t, NULL, serve, srv) == 0);

  a = connect_to (sock);
  CHECK (nbd_pread (a, buf, sizeof buf, 0, 0) == 0);
  /* Idle past the limit, but nobody waits: A keeps its slot. */
  usleep (400 * 1000);
  CHECK (nbd_pread (a, buf, sizeof buf, 0, 0) == 0);
  usleep (400 * 1000);
  /* B waits in the backlog; the server drops idle A to let it in. */
  b = connect_to (sock);
  CHECK (nbd_pread (b, buf, sizeof buf, 0, 0) == 0);
  CHECK (nbd_pread (a, buf, sizeof buf, 0, 0) == -1);

  nbd_close (a);
  nbd_close (b);
  nbd_server_stop (srv);
  CHECK (pthread_join (t, NULL) == 0);
  nbd_server_free (srv);
  strata_close (node);
  free (sock);
  free (img);
}

TESTS (T (test_idle_client_makes_room_only_for_a_waiting_one))
