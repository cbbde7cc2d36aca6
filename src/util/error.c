/* strata: error reporting; see error.h for the convention. */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/error.h"

static strata_error *
error_new (int errnum, char *msg)
{
  strata_error *err = malloc (sizeof *err);

  if (!err) {
    free (msg);
    return NULL;
  }
  err->errnum = errnum > 0 ? errnum : EIO;
  err->msg = msg;
  return err;
}

static char *
vformat (const char *fmt, va_list ap)
{
  char *s;

  if (vasprintf (&s, fmt, ap) < 0)
    return NULL;
  return s;
}

void
error_set (strata_error **errp, int errnum, const char *fmt, ...)
{
  va_list ap;
  char *msg;

  if (!errp)
    return;
  va_start (ap, fmt);
  msg = vformat (fmt, ap);
  va_end (ap);
  *errp = error_new (errnum, msg ? msg : strdup ("out of memory"));
}

void
error_set_errno (strata_error **errp, int errnum, const char *fmt, ...)
{
  va_list ap;
  char *msg, *full = NULL;

  if (!errp)
    return;
  va_start (ap, fmt);
  msg = vformat (fmt, ap);
  va_end (ap);
  if (msg && asprintf (&full, "%s: %s", msg, strerror (errnum)) < 0)
    full = NULL;
  free (msg);
  *errp = error_new (errnum, full ? full : strdup ("out of memory"));
}

void
error_prepend (strata_error **errp, const char *fmt, ...)
{
  va_list ap;
  char *prefix, *full;

  if (!errp || !*errp)
    return;
  va_start (ap, fmt);
  prefix = vformat (fmt, ap);
  va_end (ap);
  if (prefix && asprintf (&full, "%s: %s", prefix, (*errp)->msg) >= 0) {
    free ((*errp)->msg);
    (*errp)->msg = full;
  }
  free (prefix);
}

void
error_propagate (strata_error **dst, strata_error *src)
{
  if (dst && !*dst)
    *dst = src;
  else
    strata_error_free (src);
}

int
strata_error_errno (const strata_error *err)
{
  return err ? err->errnum : 0;
}

const char *
strata_error_message (const strata_error *err)
{
  if (!err)
    return "";
  return err->msg ? err->msg : "out of memory";
}

void
strata_error_free (strata_error *err)
{
  if (err) {
    free (err->msg);
    free (err);
  }
}

/* The detail of the last data-path failure, per thread.  A pthread key
 * rather than __thread so that a thread's message is freed when the
 * thread exits (worker threads of the tools and of library users). */
static pthread_key_t io_error_key;
static pthread_once_t io_error_once = PTHREAD_ONCE_INIT;

static void
io_error_key_init (void)
{
  pthread_key_create (&io_error_key, free);
}

static void
io_error_store (char *msg)
{
  pthread_once (&io_error_once, io_error_key_init);
  free (pthread_getspecific (io_error_key));
  pthread_setspecific (io_error_key, msg);
}

int
io_error (int errnum, const char *fmt, ...)
{
  va_list ap;
  char *msg;

  va_start (ap, fmt);
  msg = vformat (fmt, ap);
  va_end (ap);
  io_error_store (msg);
  return -errnum;
}

void
io_error_clear (void)
{
  io_error_store (NULL);
}

const char *
strata_last_error_message (void)
{
  pthread_once (&io_error_once, io_error_key_init);
  return pthread_getspecific (io_error_key);
}
