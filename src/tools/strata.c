/* strata: the command-line client of stratad, for people.
 *
 *   strata [--socket PATH] [--json] COMMAND [ARGS]
 *
 * Commands: nodes, add KEY=VALUE...|JSON, del NODE,
 * snapshot NODE OVERLAY [--format FMT] [--node-name NAME], events,
 * raw '{json}', and the block jobs as virsh has them: pull NODE (virsh
 * blockpull), jobs, job ID (virsh blockjob); see docs/client.md.  It
 * speaks plain QMP, so it works with qemu-storage-daemon too.  The socket
 * is --socket, else $STRATA_SOCKET, else stratad's default path.  Exit
 * status 1 when the command failed, with the QMP error's description on
 * stderr.
 *
 * This file holds main(), the command table and the small commands (add,
 * del, snapshot, events, raw); the connection is qmp-client.c, the node
 * tree strata-nodes.c and the block job commands strata-jobs.c.
 */
#include <getopt.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <strata/strata.h>

#include "control.h" /* src/control/control.h */
#include "qmp-client.h"
#include "strata-cmds.h"

bool json_output;

static void
usage (FILE *f)
{
  fprintf (f,
"Usage: strata [--socket PATH] [--json] COMMAND [ARGS]\n"
"Talk to stratad (or any QMP storage daemon) on its unix socket.\n"
"\n"
"  nodes                          the block graph as a tree\n"
"  add KEY=VALUE...|JSON          add a block node (blockdev-add)\n"
"  del NODE                       remove a block node (blockdev-del)\n"
"  snapshot NODE OVERLAY [--format FMT] [--node-name NAME]\n"
"                                 external snapshot (blockdev-snapshot-sync)\n"
"  events                         print events as they come\n"
"  raw '{\"execute\": ...}'         send one QMP command, print the reply\n"
"  pull NODE [--base NODE] [--bandwidth RATE [--bytes]]\n"
"       [--wait [--verbose] [--timeout SECONDS] [--async]]\n"
"                                 copy the backing chain's data into NODE\n"
"                                 (block-stream); the job's ID is NODE\n"
"  commit DEVICE [--top NODE] [--base NODE] [--active [--pivot|--keep-overlay]]\n"
"       [--bandwidth RATE [--bytes]] [--wait [--verbose] [--timeout S] [--async]]\n"
"                                 copy layers down into a lower one\n"
"                                 (block-commit, as virsh blockcommit)\n"
"  copy DEVICE --dest FILE|NODE [--format F] [--shallow] [--reuse-external]\n"
"       [--blockdev] [--pivot|--finish] [--bandwidth RATE [--bytes]] [--wait ...]\n"
"                                 mirror DEVICE into a copy (blockdev-mirror,\n"
"                                 as virsh blockcopy)\n"
"  jobs                           the running block jobs\n"
"  job ID [--info | --abort [--async] | --pivot [--async] |\n"
"         --bandwidth RATE [--bytes]]\n"
"                                 show, cancel, complete or re-limit a job\n"
"\n"
"  RATE is MiB/s (bytes/s with --bytes), or bytes/s when it has a K, M,\n"
"  G or T suffix (500K, 50M, 1G); 0 means no limit.  With --wait, Ctrl-C\n"
"  or --timeout cancels the job and waits for it to end (not with\n"
"  --async).  Exit status 1 when the job was aborted or failed.\n"
"\n"
"  --socket PATH   the daemon's socket (default: $STRATA_SOCKET, else\n"
"                  stratad's default path)\n"
"  --json          print QMP's JSON instead of the human form\n"
"  -V, --version   print strata's version\n");
}

static char *
default_socket (void)
{
  const char *env = getenv ("STRATA_SOCKET");
  char *path = env && *env ? strdup (env) : qmp_default_socket_path ();

  if (!path)
    client_die ("out of memory");
  return path;
}

const char *
str (json_t *obj, const char *key)
{
  const char *s = json_string_value (json_object_get (obj, key));
  return s ? s : "";
}

void
print_json (json_t *v)
{
  char *text = json_dumps (v, JSON_INDENT (2) | JSON_PRESERVE_ORDER
                                  | JSON_ENCODE_ANY);
  puts (text);
  free (text);
}


static void
print_result (json_t *ret, const char *human)
{
  if (json_output)
    print_json (ret);
  else if (human)
    printf ("%s\n", human);
  json_decref (ret);
}

static int
cmd_add (int argc, char **argv)
{
  json_t *args;
  char *errmsg = NULL, *msg = NULL;

  if (argc < 2)
    client_die ("usage: strata add KEY=VALUE...|JSON");
  if (argc == 2 && argv[1][0] == '{') {
    json_error_t je;
    args = json_loads (argv[1], 0, &je);
    if (!args || !json_is_object (args))
      client_die ("add: not a JSON object: %s", args ? "" : je.text);
  }
  else {
    args = qmp_keyval_parse (argv + 1, argc - 1, &errmsg);
    if (!args)
      client_die ("add: %s", errmsg);
  }
  if (asprintf (&msg, "added %s",
                str (args, "node-name")[0] ? str (args, "node-name")
                                           : "a node") < 0)
    msg = NULL;
  print_result (client_execute ("blockdev-add", args), msg);
  free (msg);
  return 0;
}

static int
cmd_del (int argc, char **argv)
{
  if (argc != 2)
    client_die ("usage: strata del NODE");
  print_result (client_execute ("blockdev-del",
                         json_pack ("{s:s}", "node-name", argv[1])),
                NULL);
  return 0;
}

static int
cmd_snapshot (int argc, char **argv)
{
  static const struct option longopts[] = {
    { "format", required_argument, NULL, 'f' },
    { "node-name", required_argument, NULL, 'n' },
    { NULL, 0, NULL, 0 },
  };
  const char *format = "qcow2", *node_name = NULL;
  json_t *args;
  int c;

  optind = 0;  /* re-initialise GNU getopt; options may follow operands */
  while ((c = getopt_long (argc, argv, "f:n:", longopts, NULL)) != -1) {
    if (c == 'f')
      format = optarg;
    else if (c == 'n')
      node_name = optarg;
    else
      exit (1);
  }
  if (argc - optind != 2)
    client_die ("usage: strata snapshot NODE OVERLAY-FILE [--format FMT] "
         "[--node-name NAME]");
  args = json_pack ("{s:s,s:s,s:s}", "node-name", argv[optind],
                    "snapshot-file", argv[optind + 1], "format", format);
  if (node_name)
    json_object_set_new (args, "snapshot-node-name", json_string (node_name));
  print_result (client_execute ("blockdev-snapshot-sync", args), NULL);
  return 0;
}

static int
cmd_events (int argc, char **argv)
{
  struct sigaction sa = { .sa_handler = client_on_sigint };
  json_t *msg;

  (void) argv;
  if (argc != 1)
    client_die ("usage: strata events");
  sigaction (SIGINT, &sa, NULL);  /* no SA_RESTART: recv returns */
  sigaction (SIGTERM, &sa, NULL);
  setvbuf (stdout, NULL, _IOLBF, 0);
  while (!client_interrupted && (msg = client_read_message ()) != NULL) {
    json_t *ts = json_object_get (msg, "timestamp");
    if (!json_object_get (msg, "event")) {
      json_decref (msg);
      continue;
    }
    if (json_output) {
      char *text = json_dumps (msg, JSON_COMPACT | JSON_PRESERVE_ORDER);
      printf ("%s\n", text);
      free (text);
    }
    else {
      time_t secs = json_integer_value (json_object_get (ts, "seconds"));
      json_int_t us = json_integer_value (json_object_get (ts,
                                                          "microseconds"));
      json_t *data = json_object_get (msg, "data");
      char when[64], *text = data ? json_dumps (data, JSON_COMPACT
                                                          | JSON_PRESERVE_ORDER)
                                  : NULL;
      struct tm tm;
      localtime_r (&secs, &tm);
      strftime (when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
      printf ("%s.%06lld %s%s%s\n", when, (long long) us,
              str (msg, "event"), text ? " " : "", text ? text : "");
      free (text);
    }
    json_decref (msg);
  }
  return 0;
}

static int
cmd_raw (int argc, char **argv)
{
  json_error_t je;
  json_t *msg, *reply, *err;
  char *text;

  if (argc != 2)
    client_die ("usage: strata raw '{\"execute\": ...}'");
  msg = json_loads (argv[1], 0, &je);
  if (!msg || !json_is_object (msg))
    client_die ("raw: not a JSON object%s%s", msg ? "" : ": ", msg ? "" : je.text);
  reply = client_transact (msg);
  json_object_del (reply, "id");
  text = json_dumps (reply, (json_output ? JSON_COMPACT : JSON_INDENT (2))
                                | JSON_PRESERVE_ORDER);
  puts (text);
  free (text);
  err = json_object_get (reply, "error");
  if (err) {
    fprintf (stderr, "strata: %s\n",
             json_string_value (json_object_get (err, "desc")));
    json_decref (reply);
    return 1;
  }
  json_decref (reply);
  return 0;
}

int
main (int argc, char **argv)
{
  static const struct option longopts[] = {
    { "socket", required_argument, NULL, 's' },
    { "json", no_argument, NULL, 'j' },
    { "help", no_argument, NULL, 'h' },
    { "version", no_argument, NULL, 'V' },
    { NULL, 0, NULL, 0 },
  };
  static const struct {
    const char *name;
    int (*fn) (int argc, char **argv);
  } commands[] = {
    { "nodes", cmd_nodes },   { "add", cmd_add },       { "del", cmd_del },
    { "snapshot", cmd_snapshot }, { "events", cmd_events },
    { "raw", cmd_raw },       { "pull", cmd_pull },     { "jobs", cmd_jobs },
    { "job", cmd_job },       { "commit", cmd_commit }, { "copy", cmd_copy },
  };
  const char *socket_path = NULL;
  char *path = NULL;
  int c;

  while ((c = getopt_long (argc, argv, "+s:jhV", longopts, NULL)) != -1) {
    switch (c) {
    case 's':
      socket_path = optarg;
      break;
    case 'j':
      json_output = true;
      break;
    case 'h':
      usage (stdout);
      return 0;
    case 'V':
      printf ("strata version %s\n", strata_version ());
      return 0;
    default:
      usage (stderr);
      return 1;
    }
  }
  if (optind >= argc) {
    usage (stderr);
    return 1;
  }
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    if (strcmp (argv[optind], commands[i].name) == 0) {
      if (!socket_path)
        socket_path = path = default_socket ();
      client_connect (socket_path);
      c = commands[i].fn (argc - optind, argv + optind);
      client_close ();
      free (path);
      return c;
    }
  client_die ("unknown command '%s' (see --help)", argv[optind]);
}

