/* strata pull, jobs and job: the block jobs, watched as virsh's blockpull
 * and blockjob watch them.
 *
 * A job is named by its ID, which for 'strata pull NODE' is NODE itself
 * (QEMU wants an explicit job-id for a node that no device uses, and one
 * job per node is what virsh's disk-keyed jobs give people anyway).  The
 * end of a job is learnt from its BLOCK_JOB_COMPLETED /
 * BLOCK_JOB_CANCELLED event, its progress from query-block-jobs every half
 * second, as virsh does.  With --wait, SIGINT is blocked except while
 * waiting for a message, and the first one cancels the job.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <jansson.h>

#include "qmp-client.h"
#include "progress.h"
#include "strata-cmds.h"
#include "cleanup.h"
#include "clock.h"

enum job_end {
  JOB_RUNNING,
  JOB_READY,
  JOB_COMPLETED,
  JOB_CANCELLED,
  JOB_FAILED
};

#define JOB_POLL_MS 500

struct job_wait {
  const char *id;
  const char *label; /* "Block Pull" */
  bool verbose;      /* draw the progress */
  bool async;        /* after a cancel, do not wait for the end */
  bool until_ready;  /* BLOCK_JOB_READY ends the wait (active commit) */
  sigset_t waitmask; /* SIGINT unblocked: while waiting for a message */
  int64_t deadline;  /* CLOCK_MONOTONIC ms for the cancel; 0: none */

  bool cancel_sent;
  int interrupts;   /* SIGINTs already acted on */
  int absent_polls; /* polls that did not find the job */
  char *error;      /* the job's error message, malloc'd */

  struct progress bar; /* off unless verbose */
};

static int64_t
now_ms (void)
{
  return (int64_t)(clock_now_ns () / CLOCK_NS_PER_MS);
}

/* RATE in bytes/s.  A bare number is MiB/s as in virsh (bytes/s with
 * BYTES); with a B, K, M, G, T, P or E suffix (binary, "KiB" also
 * accepted) it is bytes/s whatever BYTES says.  Dies on anything else,
 * before anything is sent. */
static json_int_t
parse_rate (const char *cmd, const char *s, bool bytes)
{
  static const char units[] = "BKMGTPE";
  const char *unit;
  char *end;
  unsigned long long n;
  int shift = bytes ? 0 : 20;

  if (*s == '-')
    client_die ("%s: bandwidth '%s' must not be negative", cmd, s);
  errno = 0;
  n = strtoull (s, &end, 10);
  if (!isdigit ((unsigned char)*s) || end == s)
    client_die (
        "%s: bandwidth '%s' is not a rate: give MiB/s, or bytes/s with "
        "--bytes or a K, M, G or T suffix",
        cmd, s);
  if (*end) {
    unit = strchr (units, toupper ((unsigned char)*end));
    if (!unit
        || !(end[1] == '\0' || (unit > units && strcmp (end + 1, "iB") == 0)))
      client_die (
          "%s: bandwidth '%s' has an unknown unit '%s' (use K, M, G or T: "
          "powers of 1024 bytes/s)",
          cmd, s, end);
    shift = 10 * (unit - units);
  }
  if (errno == ERANGE || n > (unsigned long long)INT64_MAX >> shift)
    client_die ("%s: bandwidth '%s' is out of range (at most %lld bytes/s)",
                cmd, s, (long long)INT64_MAX);
  return (json_int_t)(n << shift);
}

/* --timeout SECONDS in milliseconds, as virsh bounds it. */
static int64_t
parse_timeout (const char *cmd, const char *s)
{
  char *end;
  long n;

  errno = 0;
  n = strtol (s, &end, 10);
  if (!isdigit ((unsigned char)*s) || *end || errno || n <= 0
      || n > INT_MAX / 1000)
    client_die ("%s: timeout '%s' is not a positive number of seconds", cmd,
                s);
  return (int64_t)n * 1000;
}

/* virsh's names for the QMP job types. */
static const char *
job_label (const char *type)
{
  if (strcmp (type, "stream") == 0)
    return "Block Pull";
  if (strcmp (type, "mirror") == 0)
    return "Block Copy";
  if (strcmp (type, "commit") == 0)
    return "Block Commit";
  if (strcmp (type, "backup") == 0)
    return "Backup";
  return "Unknown job";
}

/* Percent done with virsh's rounding (progress_percent()) of the
 * numbers a job reports: a job whose length is not known yet (len 0) has
 * done nothing, not everything. */
static double
job_percent (json_int_t offset, json_int_t len)
{
  return progress_percent (offset > 0 ? (uint64_t)offset : 0,
                           len > 0 ? (uint64_t)len : 0);
}

/* Take in a new sample of the job from query-block-jobs: the bar shows
 * it (when verbose). */
static void
job_sample (struct job_wait *w, json_t *job)
{
  json_int_t len = json_integer_value (json_object_get (job, "len"));
  json_int_t offset = json_integer_value (json_object_get (job, "offset"));

  progress_update (&w->bar, offset > 0 ? (uint64_t)offset : 0,
                   len > 0 ? (uint64_t)len : 0);
}

/* If EV says how our job ended, that end; JOB_RUNNING otherwise. */
static enum job_end
job_event (struct job_wait *w, json_t *ev)
{
  const char *name = str (ev, "event");
  json_t *data = json_object_get (ev, "data");

  if (strcmp (str (data, "device"), w->id) != 0)
    return JOB_RUNNING;
  if (strcmp (name, "BLOCK_JOB_CANCELLED") == 0)
    return JOB_CANCELLED;
  if (strcmp (name, "BLOCK_JOB_READY") == 0)
    return w->until_ready ? JOB_READY : JOB_RUNNING;
  if (strcmp (name, "BLOCK_JOB_COMPLETED") != 0)
    return JOB_RUNNING;
  if (json_object_get (data, "error")) {
    free (w->error);
    w->error = strdup (str (data, "error"));
    return JOB_FAILED;
  }
  return JOB_COMPLETED;
}

/* The end among the queued events, which are dropped. */
static enum job_end
job_drain_events (struct job_wait *w)
{
  enum job_end end = JOB_RUNNING, e;
  size_t i;
  json_t *ev;

  json_array_foreach (client_event_queue, i, ev)
    if ((e = job_event (w, ev)) != JOB_RUNNING && end == JOB_RUNNING)
      end = e;
  json_array_clear (client_event_queue);
  return end;
}

/* Query the job.  Returns false when the daemon no longer lists it. */
static bool
job_poll (struct job_wait *w)
{
  json_t *jobs = client_execute ("query-block-jobs", NULL), *job;
  size_t i;
  bool found = false;

  json_array_foreach (jobs, i, job)
    if (strcmp (str (job, "device"), w->id) == 0) {
      job_sample (w, job);
      found = true;
    }
  json_decref (jobs);
  return found;
}

/* block-job-cancel; a job that is already gone is not an error here: its
 * end event tells how it ended. */
static void
job_cancel (struct job_wait *w)
{
  json_t *reply = client_execute_reply ("block-job-cancel",
                                        json_pack ("{s:s}", "device", w->id));
  json_t *err = json_object_get (reply, "error");

  if (err && strcmp (str (err, "class"), "DeviceNotActive") != 0) {
    fprintf (stderr, "strata: %s\n", str (err, "desc"));
    json_decref (reply);
    exit (1);
  }
  json_decref (reply);
  w->cancel_sent = true;
}

/* Wait (with SIGINT blocked except in WAITMASK's ppoll) for up to MS
 * milliseconds for a message, and queue the events. */
static void
job_listen (int ms, const sigset_t *waitmask)
{
  json_t *msg = client_next_message (ms < 0 ? 0 : ms, waitmask);

  if (!msg && errno == 0)
    client_die ("%s: the daemon closed the connection", client_socket_path);
  if (msg && json_object_get (msg, "event"))
    json_array_append (client_event_queue, msg);
  json_decref (msg);
}

/* Whether it is time to cancel: SIGINT, or the --timeout ran out. */
static bool
job_should_cancel (struct job_wait *w)
{
  return !w->cancel_sent
         && (client_interrupted > w->interrupts
             || (w->deadline && now_ms () >= w->deadline));
}

/* Follow job W to its end, cancelling it on SIGINT or at the deadline.
 * With async, or on a second SIGINT, stop waiting once the cancel is
 * sent.  SIGINT must be blocked; WAITMASK unblocks it. */
static enum job_end
job_wait (struct job_wait *w, const sigset_t *waitmask)
{
  int64_t next_poll = 0;
  enum job_end end;

  for (;;) {
    if ((end = job_drain_events (w)) != JOB_RUNNING)
      return end;
    if (job_should_cancel (w)) {
      w->interrupts = client_interrupted;
      job_cancel (w);
      if (w->async)
        return JOB_CANCELLED;
    }
    else if (w->cancel_sent && client_interrupted > w->interrupts)
      return JOB_CANCELLED;
    if (now_ms () >= next_poll) {
      bool present = job_poll (w);
      if ((end = job_drain_events (w)) != JOB_RUNNING)
        return end;
      /* Gone without an event (a daemon that sends none): give the event
       * a poll's time to arrive, then take the disappearance as the end. */
      if (!present && ++w->absent_polls >= 2)
        return w->cancel_sent ? JOB_CANCELLED : JOB_COMPLETED;
      next_poll = now_ms () + JOB_POLL_MS;
    }
    int64_t until = next_poll;
    if (w->deadline && !w->cancel_sent && w->deadline < until)
      until = w->deadline;
    job_listen ((int)(until - now_ms ()), waitmask);
  }
}

/* Block SIGINT (it is seen in job_wait's ppoll only) and count it. */
static void
catch_sigint (sigset_t *waitmask)
{
  struct sigaction sa = { .sa_handler = client_on_sigint };
  sigset_t block;

  sigemptyset (&block);
  sigaddset (&block, SIGINT);
  sigprocmask (SIG_BLOCK, &block, waitmask);
  sigdelset (waitmask, SIGINT);
  sigaction (SIGINT, &sa, NULL);
}

/* The options pull and commit share, and what they make of them. */
struct job_opts {
  const char *rate, *timeout;
  bool bytes, wait;
};

#define JOB_LONGOPTS                                                          \
  { "bandwidth", required_argument, NULL, 'r' },                              \
      { "bytes", no_argument, NULL, 'B' },                                    \
      { "wait", no_argument, NULL, 'w' },                                     \
      { "verbose", no_argument, NULL, 'v' },                                  \
      { "timeout", required_argument, NULL, 't' },                            \
  {                                                                           \
    "async", no_argument, NULL, 'a'                                           \
  }

/* Take option C if it is one of JOB_LONGOPTS; false if it is not. */
static bool
job_opt (int c, struct job_opts *o, struct job_wait *w)
{
  switch (c) {
  case 'r': o->rate = optarg; return true;
  case 'B': o->bytes = true; return true;
  case 'w': o->wait = true; return true;
  case 'v': w->verbose = true; return true;
  case 't': o->timeout = optarg; return true;
  case 'a': w->async = true; return true;
  default: return false;
  }
}

/* Check the shared options of command CMD; the speed to ask for. */
static json_int_t
job_opts_check (const char *cmd, struct job_opts *o, struct job_wait *w)
{
  if (!o->wait && (w->verbose || o->timeout || w->async))
    client_die ("%s: --%s needs --wait", cmd,
                w->verbose   ? "verbose"
                : o->timeout ? "timeout"
                             : "async");
  if (o->bytes && !o->rate)
    client_die ("%s: --bytes needs --bandwidth", cmd);
  if (o->timeout)
    w->deadline = now_ms () + parse_timeout (cmd, o->timeout);
  return o->rate ? parse_rate (cmd, o->rate, o->bytes) : 0;
}

/* Send COMMAND (ARGS taken over) and, with WAIT, follow job W until it
 * ends (or is READY, with W->until_ready), SIGINT cancelling it. */
static enum job_end
job_run (struct job_wait *w, const char *command, json_t *args, bool wait)
{
  progress_start (&w->bar, PROGRESS_JOB, w->label, w->verbose, 0);
  if (!wait) {
    json_decref (client_execute (command, args));
    return JOB_RUNNING;
  }
  /* From here on events are kept and SIGINT cancels the job. */
  client_event_queue = json_array ();
  catch_sigint (&w->waitmask);
  json_decref (client_execute (command, args));
  return job_wait (w, &w->waitmask);
}

/* Print how job W ended, virsh's "WORD complete/aborted/failed" (a
 * failure's message on stderr); the exit status. */
static int
job_report (struct job_wait *w, enum job_end end, const char *word)
{
  progress_end (&w->bar, end == JOB_COMPLETED);
  if (end == JOB_FAILED && w->error)
    fprintf (stderr, "strata: %s: %s\n", w->id, w->error);
  printf ("%s %s\n", word,
          end == JOB_COMPLETED   ? "complete"
          : end == JOB_CANCELLED ? "aborted"
                                 : "failed");
  free (w->error);
  json_decref (client_event_queue);
  return end == JOB_COMPLETED ? 0 : 1;
}

int
cmd_pull (int argc, char **argv)
{
  static const struct option longopts[] = {
    { "base", required_argument, NULL, 'b' },
    JOB_LONGOPTS,
    { NULL, 0, NULL, 0 },
  };
  struct job_wait w = { .label = "Block Pull" };
  struct job_opts o = { 0 };
  const char *base = NULL;
  json_int_t speed;
  json_t *args;
  enum job_end end;
  int c;

  optind = 0;
  while ((c = getopt_long (argc, argv, "", longopts, NULL)) != -1) {
    if (c == 'b')
      base = optarg;
    else if (!job_opt (c, &o, &w))
      exit (1);
  }
  if (argc - optind != 1)
    client_die (
        "usage: strata pull NODE [--base NODE] [--bandwidth RATE [--bytes]] "
        "[--wait [--verbose] [--timeout S] [--async]]");
  speed = job_opts_check ("pull", &o, &w);
  w.id = argv[optind];
  args = json_pack ("{s:s,s:s}", "job-id", w.id, "device", w.id);
  if (base)
    json_object_set_new (args, "base-node", json_string (base));
  if (speed)
    json_object_set_new (args, "speed", json_integer (speed));
  end = job_run (&w, "block-stream", args, o.wait);
  if (!o.wait) {
    printf ("Block Pull started\n");
    return 0;
  }
  return job_report (&w, end, "Pull");
}

/* What a synchronised (READY) job is left to do. */
enum job_then { JOB_THEN_LEAVE, JOB_THEN_COMPLETE, JOB_THEN_CANCEL };

/* The end of a job waited for until READY (END): unless it ended some
 * other way, leave it mirroring (SYNCED printed), or complete or cancel it
 * and wait for its end (DONE printed); the exit status. */
static int
job_after_ready (struct job_wait *w, enum job_end end, enum job_then then,
                 const char *synced, const char *done, const char *word)
{
  if (end != JOB_READY)
    return job_report (w, end, word);
  progress_end (&w->bar, true);
  if (then != JOB_THEN_LEAVE) {
    w->until_ready = false;
    json_decref (client_execute (
        then == JOB_THEN_COMPLETE ? "block-job-complete" : "block-job-cancel",
        json_pack ("{s:s}", "device", w->id)));
    w->cancel_sent = then == JOB_THEN_CANCEL; /* the plan, not an abort */
    end = job_wait (w, &w->waitmask);
    if (!(end == JOB_COMPLETED
          || (then == JOB_THEN_CANCEL && end == JOB_CANCELLED)))
      return job_report (w, end, word);
  }
  printf ("%s\n", then == JOB_THEN_LEAVE ? synced : done);
  free (w->error);
  json_decref (client_event_queue);
  return 0;
}

/* virsh blockcommit: an intermediate commit (--top below DEVICE's active
 * layer) ends as pull does; an active one (--active) runs until it is
 * synchronised (READY), then --pivot completes it (the device moves onto
 * the base), --keep-overlay cancels it (the base stays up to date, the
 * device on its overlay), and neither leaves it running. */
int
cmd_commit (int argc, char **argv)
{
  static const struct option longopts[] = {
    { "top", required_argument, NULL, 'T' },
    { "base", required_argument, NULL, 'b' },
    { "active", no_argument, NULL, 'A' },
    { "pivot", no_argument, NULL, 'p' },
    { "keep-overlay", no_argument, NULL, 'k' },
    JOB_LONGOPTS,
    { NULL, 0, NULL, 0 },
  };
  struct job_wait w = { .label = "Block Commit" };
  struct job_opts o = { 0 };
  const char *top = NULL, *base = NULL;
  bool active = false, pivot = false, keep = false;
  json_int_t speed;
  json_t *args;
  enum job_end end;
  int c;

  optind = 0;
  while ((c = getopt_long (argc, argv, "", longopts, NULL)) != -1) {
    switch (c) {
    case 'T': top = optarg; break;
    case 'b': base = optarg; break;
    case 'A': active = true; break;
    case 'p': pivot = true; break;
    case 'k': keep = true; break;
    default:
      if (!job_opt (c, &o, &w))
        exit (1);
    }
  }
  if (argc - optind != 1)
    client_die ("usage: strata commit DEVICE [--top NODE] [--base NODE] "
                "[--active [--pivot|--keep-overlay]] [--bandwidth RATE "
                "[--bytes]] [--wait [--verbose] [--timeout S] [--async]]");
  w.id = argv[optind];
  if (pivot && keep)
    client_die ("commit: --pivot and --keep-overlay exclude each other");
  /* As virsh: both imply --active and --wait. */
  if (pivot || keep)
    active = o.wait = true;
  if (active && top && strcmp (top, w.id) != 0)
    client_die ("commit: --active commits the active layer of %s, not '%s'",
                w.id, top);
  if (!active && (!top || strcmp (top, w.id) == 0))
    client_die ("commit: committing the active layer of %s needs --active",
                w.id);
  speed = job_opts_check ("commit", &o, &w);
  args = json_pack ("{s:s,s:s}", "job-id", w.id, "device", w.id);
  if (top && !active)
    json_object_set_new (args, "top-node", json_string (top));
  if (base)
    json_object_set_new (args, "base-node", json_string (base));
  if (speed)
    json_object_set_new (args, "speed", json_integer (speed));
  w.until_ready = active;
  end = job_run (&w, "block-commit", args, o.wait);
  if (!o.wait) {
    printf ("%s started\n", active ? "Active Block Commit" : "Block Commit");
    return 0;
  }
  return job_after_ready (&w, end,
                          pivot  ? JOB_THEN_COMPLETE
                          : keep ? JOB_THEN_CANCEL
                                 : JOB_THEN_LEAVE,
                          "Now in synchronized phase",
                          pivot ? "Successfully pivoted"
                                : "Commit complete, overlay image kept",
                          "Commit");
}

/* Does a node whose "file" is FILE keep its image in PATH?  FILE is the
 * path, or (a node whose options a plain name cannot say, such as an
 * explicit backing) "json:{...}" with the path as file.filename. */
static bool
image_file_is (const char *file, const char *path)
{
  json_t *o;
  bool same;

  if (strcmp (file, path) == 0)
    return true;
  if (strncmp (file, "json:", 5) != 0 || !(o = json_loads (file + 5, 0, NULL)))
    return false;
  same = strcmp (str (json_object_get (o, "file"), "filename"), path) == 0;
  json_decref (o);
  return same;
}

/* DEVICE's image facts from query-named-block-nodes (a new reference),
 * or NULL; *BACKING_NODE (may stay NULL) the name of the format node
 * whose file is DEVICE's backing file, malloc'd. */
static json_t *
node_image (const char *device, char **backing_node)
{
  json_t *nodes = client_execute ("query-named-block-nodes", NULL), *n;
  json_t *img = NULL;
  const char *bk;
  size_t i;

  *backing_node = NULL;
  json_array_foreach (nodes, i, n)
    if (strcmp (str (n, "node-name"), device) == 0)
      img = json_incref (json_object_get (n, "image"));
  bk = img ? json_string_value (json_object_get (img, "full-backing-filename"))
           : NULL;
  json_array_foreach (nodes, i, n)
    if (bk && !*backing_node && strcmp (str (n, "drv"), "file") != 0
        && image_file_is (str (n, "file"), bk))
      *backing_node = strdup (str (n, "node-name"));
  json_decref (nodes);
  return img;
}

/* Make DEST (FORMAT, SIZE bytes, over BACKING when not NULL) with
 * strata-img from the directory this program runs from; dies on failure.
 * The daemon and the client share the host, as virsh's blockcopy assumes
 * when libvirt creates the copy. */
static void
create_dest (const char *dest, const char *format, json_int_t size,
             const char *backing, const char *backing_fmt)
{
  char self[4096], *slash, cmd[8192 + 64];
  ssize_t n = readlink ("/proc/self/exe", self, sizeof self - 1);
  char sz[32];
  pid_t pid;
  int status;

  if (n < 0)
    client_die ("copy: cannot find strata-img: %s", strerror (errno));
  self[n] = '\0';
  if ((slash = strrchr (self, '/')))
    *slash = '\0';
  snprintf (cmd, sizeof cmd, "%s/strata-img", self);
  snprintf (sz, sizeof sz, "%lld", (long long)size);
  fflush (NULL);
  if ((pid = fork ()) == 0) {
    if (backing)
      execl (cmd, "strata-img", "create", "-q", "-u", "-f", format, "-b",
             backing, "-F", backing_fmt, dest, sz, (char *)NULL);
    else
      execl (cmd, "strata-img", "create", "-q", "-f", format, dest, sz,
             (char *)NULL);
    fprintf (stderr, "strata: copy: %s: %s\n", cmd, strerror (errno));
    _exit (127);
  }
  if (pid < 0 || waitpid (pid, &status, 0) < 0 || !WIFEXITED (status)
      || WEXITSTATUS (status) != 0)
    client_die ("copy: could not create %s", dest);
}

/* virsh blockcopy: a mirror of DEVICE into --dest, a file (made here
 * unless --reuse-external; --shallow: over DEVICE's backing file, sync=top)
 * or with --blockdev a node; without --wait it runs on ("Block Copy
 * started"), with --wait it is left mirroring once synchronised ("Now in
 * mirroring phase"), --pivot completes it (the device's users move to the
 * copy) and --finish cancels it leaving a consistent copy. */
int
cmd_copy (int argc, char **argv)
{
  static const struct option longopts[] = {
    { "dest", required_argument, NULL, 'd' },
    { "format", required_argument, NULL, 'f' },
    { "shallow", no_argument, NULL, 's' },
    { "reuse-external", no_argument, NULL, 'R' },
    { "blockdev", no_argument, NULL, 'D' },
    { "pivot", no_argument, NULL, 'p' },
    { "finish", no_argument, NULL, 'F' },
    JOB_LONGOPTS,
    { NULL, 0, NULL, 0 },
  };
  struct job_wait w = { .label = "Block Copy", .until_ready = true };
  struct job_opts o = { 0 };
  const char *dest = NULL, *format = NULL, *target;
  bool shallow = false, reuse = false, blockdev = false, pivot = false;
  bool finish = false;
  char tname[64];
  json_int_t speed;
  json_t *args;
  enum job_end end;
  int c;

  optind = 0;
  while ((c = getopt_long (argc, argv, "", longopts, NULL)) != -1) {
    switch (c) {
    case 'd': dest = optarg; break;
    case 'f': format = optarg; break;
    case 's': shallow = true; break;
    case 'R': reuse = true; break;
    case 'D': blockdev = true; break;
    case 'p': pivot = true; break;
    case 'F': finish = true; break;
    default:
      if (!job_opt (c, &o, &w))
        exit (1);
    }
  }
  if (argc - optind != 1 || !dest)
    client_die ("usage: strata copy DEVICE --dest FILE|NODE [--format F] "
                "[--shallow] [--reuse-external] [--blockdev] "
                "[--pivot|--finish] [--bandwidth RATE [--bytes]] [--wait "
                "[--verbose] [--timeout S] [--async]]");
  w.id = argv[optind];
  if (pivot && finish)
    client_die ("copy: --pivot and --finish exclude each other");
  if (blockdev && (format || reuse))
    client_die ("copy: --blockdev takes a node: no --%s",
                format ? "format" : "reuse-external");
  if (pivot || finish)
    o.wait = true;
  speed = job_opts_check ("copy", &o, &w);
  target = dest;
  if (!blockdev) {
    CLEANUP_FREE char *bnode = NULL;
    json_t *img = node_image (w.id, &bnode);
    const char *fmt, *bk;

    if (!img)
      client_die ("copy: no node named '%s'", w.id);
    fmt = format ? format : str (img, "format");
    bk = shallow ? json_string_value (
             json_object_get (img, "full-backing-filename"))
                 : NULL;
    if (!reuse)
      create_dest (dest, fmt,
                   json_integer_value (json_object_get (img, "virtual-size")),
                   bk, bk ? str (img, "backing-filename-format") : NULL);
    snprintf (tname, sizeof tname, "%s-copy", w.id);
    target = tname;
    args = json_pack ("{s:s,s:s,s:{s:s,s:s}}", "driver", fmt, "node-name",
                      target, "file", "driver", "file", "filename", dest);
    /* The copy reads its backing file through the node the device already
     * has for it (a second open would want its own locks). */
    if (shallow && bk && bnode)
      json_object_set_new (args, "backing", json_string (bnode));
    json_decref (img);
    json_decref (client_execute ("blockdev-add", args));
  }
  args = json_pack ("{s:s,s:s,s:s,s:s}", "job-id", w.id, "device", w.id,
                    "target", target, "sync", shallow ? "top" : "full");
  if (speed)
    json_object_set_new (args, "speed", json_integer (speed));
  end = job_run (&w, "blockdev-mirror", args, o.wait);
  if (!o.wait) {
    printf ("Block Copy started\n");
    return 0;
  }
  return job_after_ready (
      &w, end,
      pivot    ? JOB_THEN_COMPLETE
      : finish ? JOB_THEN_CANCEL
               : JOB_THEN_LEAVE,
      "Now in mirroring phase",
      pivot ? "Successfully pivoted" : "Successfully copied", "Copy");
}

/* "45.00 %", or "-" while the length is not known. */
static void
format_progress (json_t *job, char *buf, size_t len)
{
  json_int_t total = json_integer_value (json_object_get (job, "len"));
  json_int_t done = json_integer_value (json_object_get (job, "offset"));

  if (total <= 0)
    snprintf (buf, len, "-");
  else
    snprintf (buf, len, "%.2f %%", job_percent (done, total));
}

int
cmd_jobs (int argc, char **argv)
{
  json_t *jobs, *job;
  size_t i;
  int idw = 2;

  (void)argv;
  if (argc != 1)
    client_die ("usage: strata jobs");
  jobs = client_execute ("query-block-jobs", NULL);
  if (json_output || !json_is_array (jobs)) {
    print_json (jobs);
    json_decref (jobs);
    return 0;
  }
  if (json_array_size (jobs) == 0)
    printf ("no block jobs\n");
  json_array_foreach (jobs, i, job)
    if ((int)strlen (str (job, "device")) > idw)
      idw = strlen (str (job, "device"));
  if (json_array_size (jobs))
    printf ("%-*s  %-8s  %-9s  %8s  %-24s  %s\n", idw, "ID", "TYPE", "STATUS",
            "DONE", "OFFSET/LENGTH", "SPEED");
  json_array_foreach (jobs, i, job) {
    json_int_t speed = json_integer_value (json_object_get (job, "speed"));
    char pct[32], off[16], len[16], rate[32] = "unlimited", sizes[40];

    format_progress (job, pct, sizeof pct);
    human_size (json_integer_value (json_object_get (job, "offset")), off,
                sizeof off);
    human_size (json_integer_value (json_object_get (job, "len")), len,
                sizeof len);
    snprintf (sizes, sizeof sizes, "%s / %s", off, len);
    if (speed > 0)
      human_rate (speed, rate, sizeof rate);
    printf ("%-*s  %-8s  %-9s  %8s  %-24s  %s\n", idw, str (job, "device"),
            str (job, "type"), str (job, "status"), pct, sizes, rate);
  }
  json_decref (jobs);
  return 0;
}

/* virsh blockjob --info: "Block Pull: [ 45.00 %]" and the bandwidth. */
static int
job_info (const char *id)
{
  json_t *jobs = client_execute ("query-block-jobs", NULL), *job,
         *found = NULL;
  size_t i;

  json_array_foreach (jobs, i, job)
    if (strcmp (str (job, "device"), id) == 0)
      found = job;
  if (json_output)
    print_json (found ? found : json_null ());
  else if (!found)
    printf ("No current block job for %s\n", id);
  else {
    json_int_t speed = json_integer_value (json_object_get (found, "speed"));
    printf (
        "%s: [%5.2f %%]", job_label (str (found, "type")),
        job_percent (json_integer_value (json_object_get (found, "offset")),
                     json_integer_value (json_object_get (found, "len"))));
    if (speed > 0) {
      const char *unit;
      double v = scale_binary (speed, &unit);
      printf ("    Bandwidth limit: %lld bytes/s (%-.3f %s/s)",
              (long long)speed, v, unit);
    }
    printf ("\n");
  }
  json_decref (jobs);
  return 0;
}

/* blockjob --abort (cancel) or --pivot (complete: a synchronised mirror or
 * active commit moves the device onto its copy), then (unless ASYNC) wait
 * for the job to end. */
static int
job_end_by (const char *id, bool pivot, bool async)
{
  struct job_wait w = { .id = id, .label = "", .cancel_sent = true };
  sigset_t waitmask;

  client_event_queue = json_array ();
  catch_sigint (&waitmask);
  json_decref (
      client_execute (pivot ? "block-job-complete" : "block-job-cancel",
                      json_pack ("{s:s}", "device", id)));
  if (!async)
    job_wait (&w, &waitmask);
  free (w.error);
  json_decref (client_event_queue);
  return 0;
}

int
cmd_job (int argc, char **argv)
{
  static const struct option longopts[] = {
    { "abort", no_argument, NULL, 'A' },
    { "pivot", no_argument, NULL, 'p' },
    { "async", no_argument, NULL, 'a' },
    { "info", no_argument, NULL, 'i' },
    { "bandwidth", required_argument, NULL, 'r' },
    { "bytes", no_argument, NULL, 'B' },
    { NULL, 0, NULL, 0 },
  };
  bool abort_job = false, async = false, info = false, bytes = false;
  bool pivot = false;
  const char *rate = NULL;
  json_int_t speed;
  int c;

  optind = 0;
  while ((c = getopt_long (argc, argv, "", longopts, NULL)) != -1) {
    switch (c) {
    case 'A': abort_job = true; break;
    case 'p': pivot = true; break;
    case 'a': async = true; break;
    case 'i': info = true; break;
    case 'r': rate = optarg; break;
    case 'B': bytes = true; break;
    default: exit (1);
    }
  }
  if (argc - optind != 1)
    client_die ("usage: strata job ID [--abort | --pivot [--async]] [--info] "
                "[--bandwidth RATE [--bytes]]");
  if (async && !pivot)
    abort_job = true; /* --async alone: an abort that does not wait */
  if (abort_job + pivot + info + !!rate > 1)
    client_die ("job: --abort, --pivot, --info and --bandwidth exclude each "
                "other");
  if (bytes && !rate)
    client_die ("job: --bytes needs --bandwidth");
  if (rate) {
    speed = parse_rate ("job", rate, bytes);
    json_decref (client_execute (
        "block-job-set-speed",
        json_pack ("{s:s,s:I}", "device", argv[optind], "speed", speed)));
    return 0;
  }
  if (abort_job || pivot)
    return job_end_by (argv[optind], pivot, async);
  return job_info (argv[optind]);
}
