/* strata: request tracker; see tracker.h for the rules. */
#include "block/tracker.h"
#include "util/cleanup.h"

void
tracker_init (struct tracker *t)
{
  pthread_mutex_init (&t->lock, NULL);
  pthread_cond_init (&t->cond, NULL);
  t->head = NULL;
  t->next_seq = 0;
  t->waits = 0;
}

void
tracker_destroy (struct tracker *t)
{
  pthread_cond_destroy (&t->cond);
  pthread_mutex_destroy (&t->lock);
}

static bool
overlaps (const struct tracked_req *r, uint64_t offset, uint64_t len)
{
  if (len == 0 || r->len == 0)
    return true; /* a zero length means "everything" */
  return r->offset < offset + len && offset < r->offset + r->len;
}

/* Is there an older request that REQ must wait for?  Caller holds t->lock. */
static bool
must_wait_tracker_locked (struct tracker *t, const struct tracked_req *req)
{
  for (struct tracked_req *r = t->head; r; r = r->next) {
    if (r->seq >= req->seq)
      continue;
    if (!(req->serialising || r->serialising))
      continue;
    if (overlaps (r, req->offset, req->len))
      return true;
  }
  return false;
}

void
tracker_begin (struct tracker *t, struct tracked_req *req, uint64_t offset,
               uint64_t len, bool serialising)
{
  LOCK_GUARD (&t->lock);
  req->offset = offset;
  req->len = len;
  req->serialising = serialising;
  req->seq = t->next_seq++;
  req->prev = NULL;
  req->next = t->head;
  if (t->head)
    t->head->prev = req;
  t->head = req;
  if (must_wait_tracker_locked (t, req)) {
    t->waits++;
    do
      pthread_cond_wait (&t->cond, &t->lock);
    while (must_wait_tracker_locked (t, req));
  }
}

void
tracker_end (struct tracker *t, struct tracked_req *req)
{
  LOCK_GUARD (&t->lock);
  if (req->prev)
    req->prev->next = req->next;
  else
    t->head = req->next;
  if (req->next)
    req->next->prev = req->prev;
  pthread_cond_broadcast (&t->cond);
}

void
tracker_wait_idle (struct tracker *t, uint64_t offset, uint64_t len)
{
  LOCK_GUARD (&t->lock);
  for (;;) {
    bool busy = false;

    for (struct tracked_req *r = t->head; r && !busy; r = r->next)
      busy = overlaps (r, offset, len);
    if (!busy)
      return;
    pthread_cond_wait (&t->cond, &t->lock);
  }
}

unsigned
tracker_count (struct tracker *t)
{
  unsigned n = 0;

  LOCK_GUARD (&t->lock);
  for (struct tracked_req *r = t->head; r; r = r->next)
    n++;
  return n;
}

uint64_t
tracker_seq (struct tracker *t)
{
  LOCK_GUARD (&t->lock);
  return t->next_seq;
}

unsigned
tracker_waits (struct tracker *t)
{
  LOCK_GUARD (&t->lock);
  return t->waits;
}
