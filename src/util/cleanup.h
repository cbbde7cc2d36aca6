/* strata: scope-bound cleanup helpers.
 *
 * Variables declared with these macros are released when they go out of
 * scope, so early returns on error paths cannot leak.
 */
#ifndef STRATA_CLEANUP_H
#define STRATA_CLEANUP_H

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

static inline void
cleanup_free (void *p)
{
  free (*(void **) p);
}
#define CLEANUP_FREE __attribute__ ((cleanup (cleanup_free)))

static inline void
cleanup_close (int *fd)
{
  if (*fd >= 0)
    close (*fd);
}
#define CLEANUP_CLOSE __attribute__ ((cleanup (cleanup_close)))

static inline void
cleanup_unlock (pthread_mutex_t **m)
{
  if (*m)
    pthread_mutex_unlock (*m);
}
#define LOCK_GUARD_CAT2(a, b) a##b
#define LOCK_GUARD_CAT(a, b) LOCK_GUARD_CAT2 (a, b)
/* Hold MUTEX until the end of the enclosing scope. */
#define LOCK_GUARD(mutex)                                                   \
  pthread_mutex_t *LOCK_GUARD_CAT (lock_guard_, __LINE__)                   \
      __attribute__ ((cleanup (cleanup_unlock), unused))                    \
      = (pthread_mutex_lock (mutex), (mutex))

#endif
