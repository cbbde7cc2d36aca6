/* strata: the progress bar of strata-img -p and strata pull --verbose
 * (progress.c).
 *
 * One state and one set of rules for both: the rate is an average over
 * samples at least 200 ms apart, smoothed (70 % old, 30 % new), and until
 * there is one, the average since the first sample; the time left is
 * what remains at that rate; the percent is virsh's (truncated to two
 * decimals, never 100 before the end); a bar on a terminal is redrawn in
 * place at most ten times a second.  Each program keeps the look its
 * tests and users know:
 *
 *   PROGRESS_IMG  strata-img -p, on stdout, nothing at all off a terminal:
 *                 "[######                        ]  20.00%    1.5 MiB/s
 *                 00:00:27 left"
 *   PROGRESS_JOB  strata's block jobs, on stderr, the bar fitted to the
 *                 terminal: "Block Pull: [####      ]  45.00 %   1 MiB/s
 *                 0:00:27 left"; off a terminal virsh's lines
 *                 "Block Pull: [45.00 %]", one per change.
 *
 * Not thread-safe: callers with threads serialise the updates.
 */
#ifndef STRATA_TOOLS_PROGRESS_H
#define STRATA_TOOLS_PROGRESS_H

#include <stdbool.h>
#include <stdint.h>

enum progress_look { PROGRESS_IMG, PROGRESS_JOB };

struct progress {
  enum progress_look look;
  const char *label; /* PROGRESS_JOB: "Block Pull" */
  bool on;           /* anything is shown at all */
  bool tty;          /* on a terminal: a bar redrawn in place */
  bool drawn;        /* a bar is on the terminal's line */
  bool shown;        /* off a terminal: a line was printed, at shown_pct */
  double shown_pct;
  uint64_t total, done;          /* total 0: not known yet */
  uint64_t drawn_ns;             /* when the bar was last drawn */
  uint64_t first_ns, first_done; /* the first sample */
  uint64_t sample_ns, sample_done;
  double rate; /* bytes/s, smoothed; 0: unknown */
};

/* Start P with LOOK (LABEL for PROGRESS_JOB).  Nothing is shown unless
 * WANTED (and, for PROGRESS_IMG, stdout is a terminal).  PROGRESS_IMG
 * draws its empty bar at once. */
void progress_start (struct progress *p, enum progress_look look,
                     const char *label, bool wanted, uint64_t total);
/* DONE bytes of TOTAL (a new total restarts the rate's sampling); shown
 * when something changed and at most ten times a second. */
void progress_update (struct progress *p, uint64_t done, uint64_t total);
/* The end: with OK the bar (or line) at 100 %, then the bar's newline. */
void progress_end (struct progress *p, bool ok);
/* virsh's percent of DONE in TOTAL: truncated to two decimals, never 100
 * before the end, 0 while TOTAL is not known. */
double progress_percent (uint64_t done, uint64_t total);

#endif
