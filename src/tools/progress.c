/* strata: the one progress bar of the tools; the rules and the two looks
 * are described in progress.h. */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "progress.h"
#include "tool-common.h"
#include "clock.h"

#define REDRAW_NS (100 * CLOCK_NS_PER_MS)
#define SAMPLE_NS (200 * CLOCK_NS_PER_MS)
#define BAR_FULL "##################################################"

double
progress_percent (uint64_t done, uint64_t total)
{
  double pct;

  if (total == 0 || done == 0)
    return 0;
  if (done >= total)
    return 100;
  pct = (double)(uint64_t)(done * 10000.0 / total) / 100.0;
  return pct > 99.99 ? 99.99 : pct;
}

/* Bytes per second now; 0 when not known. */
static double
current_rate (const struct progress *p, uint64_t now)
{
  if (p->rate > 0)
    return p->rate;
  if (now > p->first_ns && p->done > p->first_done)
    return (double)(p->done - p->first_done) * CLOCK_NS_PER_SEC
           / (double)(now - p->first_ns);
  return 0;
}

/* Seconds left at RATE, or -1 when that is not known. */
static int64_t
seconds_left (const struct progress *p, double rate)
{
  if (rate <= 0)
    return -1;
  if (p->done >= p->total)
    return 0;
  return (int64_t)((double)(p->total - p->done) / rate);
}

static int
terminal_columns (int fd)
{
  struct winsize ws;

  if (ioctl (fd, TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 40)
    return ws.ws_col;
  return 80;
}

/* "\r[####    ]  45.00%    1.5 MiB/s  00:00:27 left" on stdout. */
static void
draw_img (const struct progress *p, double pct, double rate, int64_t left)
{
  char sz[32];
  int fill = (int)(pct * 30 / 100);

  size_to_str ((uint64_t)rate, sz, sizeof sz);
  printf ("\r[%.*s%*s] %6.2f%%  %10s/s", fill, BAR_FULL, 30 - fill, "", pct,
          sz);
  if (p->done > 0 && p->done < p->total && left >= 0)
    printf ("  %02" PRId64 ":%02" PRId64 ":%02" PRId64 " left", left / 3600,
            left / 60 % 60, left % 60);
  else
    printf ("               ");
  fflush (stdout);
}

/* "\rBlock Pull: [####  ]  45.00 %   1 MiB/s  0:00:27 left", cleared to
 * the end of the line, on stderr. */
static void
draw_job (const struct progress *p, double pct, double rate, int64_t left)
{
  char rs[32] = "-- B/s", ls[32] = "--:--:--";
  int width = terminal_columns (STDERR_FILENO) - (int)strlen (p->label) - 46;
  int fill;

  width = width > 50 ? 50 : width < 10 ? 10 : width;
  fill = (int)(pct * width / 100);
  if (rate > 0)
    human_rate (rate, rs, sizeof rs);
  if (left >= 0)
    snprintf (ls, sizeof ls, "%" PRId64 ":%02" PRId64 ":%02" PRId64,
              left / 3600, left / 60 % 60, left % 60);
  fprintf (stderr, "\r%s: [%.*s%*s] %6.2f %%  %11s  %s left\033[K", p->label,
           fill, BAR_FULL, width - fill, "", pct, rs, ls);
  fflush (stderr);
}

static void
show (struct progress *p, double pct, uint64_t now)
{
  double rate = current_rate (p, now);
  int64_t left = seconds_left (p, rate);

  if (!p->tty) {
    /* Only PROGRESS_JOB shows anything off a terminal. */
    if (!p->shown || pct != p->shown_pct) {
      fprintf (stderr, "%s: [%5.2f %%]\n", p->label, pct);
      fflush (stderr);
    }
    p->shown = true;
    p->shown_pct = pct;
    return;
  }
  if (p->look == PROGRESS_IMG)
    draw_img (p, pct, rate, left);
  else
    draw_job (p, pct, rate, left);
  p->drawn = true;
  p->drawn_ns = now;
}

/* Take in DONE of TOTAL at NOW for the rate. */
static void
sample (struct progress *p, uint64_t done, uint64_t total, uint64_t now)
{
  if (!p->first_ns) {
    p->first_ns = p->sample_ns = now;
    p->first_done = p->sample_done = done;
  }
  else if (total == p->total && now - p->sample_ns >= SAMPLE_NS) {
    double inst = ((double)done - (double)p->sample_done) * CLOCK_NS_PER_SEC
                  / (double)(now - p->sample_ns);
    p->rate = p->rate > 0 ? 0.7 * p->rate + 0.3 * inst : inst;
  }
  if (total != p->total || now - p->sample_ns >= SAMPLE_NS) {
    p->sample_ns = now;
    p->sample_done = done;
  }
  p->total = total;
  p->done = done;
}

void
progress_start (struct progress *p, enum progress_look look, const char *label,
                bool wanted, uint64_t total)
{
  int fd = look == PROGRESS_IMG ? STDOUT_FILENO : STDERR_FILENO;

  *p = (struct progress){ .look = look, .label = label, .total = total };
  p->tty = isatty (fd);
  p->on = wanted && (p->tty || look == PROGRESS_JOB);
  if (p->on && look == PROGRESS_IMG)
    progress_update (p, 0, total);
}

void
progress_update (struct progress *p, uint64_t done, uint64_t total)
{
  uint64_t now;

  if (!p->on)
    return;
  now = clock_now_ns ();
  sample (p, done, total, now);
  /* A job's length may not be known yet (0): nothing until it is.  A bar
   * at most ten times a second. */
  if ((total == 0 && p->look == PROGRESS_JOB)
      || (p->drawn && now - p->drawn_ns < REDRAW_NS))
    return;
  show (p, total ? progress_percent (done, total) : 100, now);
}

void
progress_end (struct progress *p, bool ok)
{
  if (!p->on)
    return;
  if (ok) {
    p->done = p->total;
    show (p, 100, clock_now_ns ());
  }
  if (p->drawn) {
    fputc ('\n', p->look == PROGRESS_IMG ? stdout : stderr);
    fflush (p->look == PROGRESS_IMG ? stdout : stderr);
  }
}
