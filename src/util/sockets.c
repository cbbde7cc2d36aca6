/* strata: listening unix sockets; see sockets.h. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "util/sockets.h"

int
unix_socket_listen (const char *path, int backlog, bool nonblock)
{
  struct sockaddr_un tmp = { .sun_family = AF_UNIX };
  int fd, r;

  if (strlen (path) >= sizeof tmp.sun_path)
    return -ENAMETOOLONG;
  /* PATH.PID.tmp when it fits; otherwise bind PATH directly (a window
   * between bind and listen remains only for such long names). */
  if ((size_t) snprintf (tmp.sun_path, sizeof tmp.sun_path, "%s.%d.tmp",
                         path, (int) getpid ()) >= sizeof tmp.sun_path)
    strcpy (tmp.sun_path, path);
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC
                            | (nonblock ? SOCK_NONBLOCK : 0), 0);
  if (fd < 0)
    return -errno;
  if (strcmp (tmp.sun_path, path) != 0)
    unlink (tmp.sun_path);  /* stale, from a crash of an earlier run */
  if (bind (fd, (struct sockaddr *) &tmp, sizeof tmp) < 0)
    goto fail;
  if (listen (fd, backlog) < 0
      || (strcmp (tmp.sun_path, path) != 0
          && rename (tmp.sun_path, path) < 0)) {
    r = -errno;
    unlink (tmp.sun_path);
    close (fd);
    return r;
  }
  return fd;

fail:
  r = -errno;
  close (fd);
  return r;
}
