/* Unit tests for the job state machine's tables (src/jobs/job.c): every
 * (from, to) status pair and every (verb, status) pair is checked against
 * the transitions and verbs QEMU's job model allows (qapi/job.json's
 * JobStatus and JobVerb), written out here as lists rather than as a
 * matrix, so that a slip in either copy shows. */
#include "jobs/job.h"
#include "test.h"

struct edge {
  enum job_status from, to;
};

/* Each status's successors, as QAPI's JobStatus documents them. */
static const struct edge allowed_transitions[] = {
  /* created: started, or torn down before it ran (aborting, null). */
  { JOB_CREATED, JOB_RUNNING },
  { JOB_CREATED, JOB_ABORTING },
  { JOB_CREATED, JOB_NULL },
  /* running: paused, ready (jobs that complete), done, failed. */
  { JOB_RUNNING, JOB_PAUSED },
  { JOB_RUNNING, JOB_READY },
  { JOB_RUNNING, JOB_WAITING },
  { JOB_RUNNING, JOB_ABORTING },
  /* paused: only back to running. */
  { JOB_PAUSED, JOB_RUNNING },
  /* ready: paused there (standby), completed, failed. */
  { JOB_READY, JOB_STANDBY },
  { JOB_READY, JOB_WAITING },
  { JOB_READY, JOB_ABORTING },
  /* standby: only back to ready. */
  { JOB_STANDBY, JOB_READY },
  /* waiting for the transaction: pending, or aborting with it. */
  { JOB_WAITING, JOB_PENDING },
  { JOB_WAITING, JOB_ABORTING },
  /* pending finalisation: its prepare may fail, else it concludes. */
  { JOB_PENDING, JOB_ABORTING },
  { JOB_PENDING, JOB_CONCLUDED },
  /* aborting stays aborting (a second failure) until it concludes. */
  { JOB_ABORTING, JOB_ABORTING },
  { JOB_ABORTING, JOB_CONCLUDED },
  /* concluded until dismissed. */
  { JOB_CONCLUDED, JOB_NULL },
};

static bool
transition_listed (enum job_status from, enum job_status to)
{
  for (size_t i = 0;
       i < sizeof allowed_transitions / sizeof *allowed_transitions; i++)
    if (allowed_transitions[i].from == from && allowed_transitions[i].to == to)
      return true;
  return false;
}

/* The statuses in which each verb is accepted (QAPI's JobVerb). */
static const struct {
  enum job_verb verb;
  enum job_status states[JOB_STATUS_MAX + 1]; /* ended by JOB_STATUS_MAX */
} allowed_verbs[] = {
  { JOB_VERB_CANCEL,
    { JOB_RUNNING, JOB_PAUSED, JOB_READY, JOB_STANDBY, JOB_WAITING,
      JOB_PENDING, JOB_STATUS_MAX } },
  { JOB_VERB_PAUSE,
    { JOB_RUNNING, JOB_PAUSED, JOB_READY, JOB_STANDBY, JOB_WAITING,
      JOB_STATUS_MAX } },
  { JOB_VERB_RESUME,
    { JOB_RUNNING, JOB_PAUSED, JOB_READY, JOB_STANDBY, JOB_WAITING,
      JOB_STATUS_MAX } },
  { JOB_VERB_SET_SPEED,
    { JOB_RUNNING, JOB_PAUSED, JOB_READY, JOB_STANDBY, JOB_WAITING,
      JOB_STATUS_MAX } },
  { JOB_VERB_COMPLETE, { JOB_READY, JOB_STATUS_MAX } },
  { JOB_VERB_FINALIZE, { JOB_PENDING, JOB_STATUS_MAX } },
  { JOB_VERB_DISMISS, { JOB_CONCLUDED, JOB_STATUS_MAX } },
};

static bool
verb_listed (enum job_verb verb, enum job_status s)
{
  for (size_t i = 0; i < sizeof allowed_verbs / sizeof *allowed_verbs; i++) {
    if (allowed_verbs[i].verb != verb)
      continue;
    for (const enum job_status *p = allowed_verbs[i].states;
         *p != JOB_STATUS_MAX; p++)
      if (*p == s)
        return true;
  }
  return false;
}

static void
test_every_transition (void)
{
  int allowed = 0;

  for (int from = 0; from < JOB_STATUS_MAX; from++)
    for (int to = 0; to < JOB_STATUS_MAX; to++) {
      bool want = transition_listed (from, to);
      if (job_transition_allowed (from, to) != want)
        fprintf (stderr, "%s -> %s: table says %d, QEMU %d\n",
                 job_status_name (from), job_status_name (to), !want, want);
      CHECK (job_transition_allowed (from, to) == want);
      allowed += want;
    }
  CHECK (allowed == 19);
}

static void
test_null_is_final (void)
{
  for (int to = 0; to < JOB_STATUS_MAX; to++)
    CHECK (!job_transition_allowed (JOB_NULL, to));
}

static void
test_every_live_state_can_abort (void)
{
  /* Except the ones that pause in place (paused, standby): a cancel
   * resumes them first. */
  const enum job_status live[] = { JOB_CREATED, JOB_RUNNING, JOB_READY,
                                   JOB_WAITING, JOB_PENDING, JOB_ABORTING };
  for (size_t i = 0; i < sizeof live / sizeof *live; i++)
    CHECK (job_transition_allowed (live[i], JOB_ABORTING));
  CHECK (!job_transition_allowed (JOB_PAUSED, JOB_ABORTING));
  CHECK (!job_transition_allowed (JOB_STANDBY, JOB_ABORTING));
  CHECK (!job_transition_allowed (JOB_CONCLUDED, JOB_ABORTING));
}

static void
test_every_verb (void)
{
  int allowed = 0;

  for (int v = 0; v < JOB_VERB_MAX; v++)
    for (int s = 0; s < JOB_STATUS_MAX; s++) {
      bool want = verb_listed (v, s);
      if (job_verb_allowed (v, s) != want)
        fprintf (stderr, "%s in %s: table says %d, QEMU %d\n",
                 job_verb_name (v), job_status_name (s), !want, want);
      CHECK (job_verb_allowed (v, s) == want);
      allowed += want;
    }
  CHECK (allowed == 24);
}

static void
test_no_verb_before_start_or_after_null (void)
{
  for (int v = 0; v < JOB_VERB_MAX; v++) {
    CHECK (!job_verb_allowed (v, JOB_CREATED));
    CHECK (!job_verb_allowed (v, JOB_NULL));
    CHECK (!job_verb_allowed (v, JOB_ABORTING));
  }
}

static void
test_names (void)
{
  static const char *const statuses[] = {
    "created", "running", "paused",   "ready",     "standby",
    "waiting", "pending", "aborting", "concluded", "null",
  };
  static const char *const verbs[] = {
    "cancel",   "pause",    "resume",  "set-speed",
    "complete", "finalize", "dismiss",
  };

  for (int s = 0; s < JOB_STATUS_MAX; s++)
    CHECK (strcmp (job_status_name (s), statuses[s]) == 0);
  for (int v = 0; v < JOB_VERB_MAX; v++)
    CHECK (strcmp (job_verb_name (v), verbs[v]) == 0);
}

static void
test_out_of_range_refused (void)
{
  CHECK (!job_transition_allowed (JOB_STATUS_MAX, JOB_NULL));
  CHECK (!job_transition_allowed (JOB_CREATED, JOB_STATUS_MAX));
  CHECK (!job_verb_allowed (JOB_VERB_MAX, JOB_RUNNING));
  CHECK (!job_verb_allowed (JOB_VERB_CANCEL, JOB_STATUS_MAX));
  CHECK (strcmp (job_status_name (JOB_STATUS_MAX), "invalid") == 0);
}

static void
test_id_rule (void)
{
  CHECK (job_id_wellformed ("job0"));
  CHECK (job_id_wellformed ("J-1.x_y"));
  CHECK (!job_id_wellformed (""));
  CHECK (!job_id_wellformed ("0job"));
  CHECK (!job_id_wellformed ("-job"));
  CHECK (!job_id_wellformed ("job 1"));
  CHECK (!job_id_wellformed ("job/1"));
}

TESTS (T (test_every_transition), T (test_null_is_final),
       T (test_every_live_state_can_abort), T (test_every_verb),
       T (test_no_verb_before_start_or_after_null), T (test_names),
       T (test_out_of_range_refused), T (test_id_rule))
