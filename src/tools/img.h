/* strata-img: the seam between main() and the subcommands.
 *
 * Each subcommand lives in its own file, img-<name>.c, and is called as
 * cmd_<name>(argc, argv) with argv[0] the subcommand name and optind reset
 * to 1.  It returns the process exit code (qemu-img's codes).  Messages go
 * to stderr as "strata-img: ...".
 */
#ifndef STRATA_TOOLS_IMG_H
#define STRATA_TOOLS_IMG_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <strata/strata.h>

#include "tool-common.h"

extern const char *progname;

enum output { OUTPUT_HUMAN, OUTPUT_JSON };

/* "strata-img: MSG" on stderr. */
void fail_msg (const char *msg);
/* The same with ERR's message; frees ERR. */
void fail_err (strata_error *err);
/* --output=human|json, with qemu-img's message on anything else. */
bool parse_output (const char *s, enum output *out);
/* Open FILENAME, printing qemu-img's "Could not open" message on failure.
 * EXTRA is a dotted option string or NULL. */
strata_node *open_image (const char *filename, const char *fmt,
                         bool force_share, bool rw, const char *extra);
/* --image-opts was given: open_image() takes the file name as an option
 * string ("driver=qcow2,file.filename=a.qcow2"), as qemu-img does. */
extern bool img_image_opts;
/* The subcommands' --image-opts entry and getopt value. */
enum { IMG_OPT_IMAGE_OPTS = 0x4000 };
#define IMG_IMAGE_OPTS_OPTION                                               \
  { "image-opts", no_argument, NULL, IMG_OPT_IMAGE_OPTS }
/* FILENAME read-only as its internal snapshot PARAM (-l of convert and
 * measure: "snapshot.id=ID,snapshot.name=NAME" or "ID_OR_NAME"), with
 * qemu-img's messages. */
strata_node *img_open_snapshot (const char *filename, const char *fmt,
                                bool force_share, const char *param);
/* The same with strata_open()'s FLAGS (STRATA_OPEN_*). */
strata_node *open_image_flags (const char *filename, const char *fmt,
                               unsigned flags, const char *extra);
/* qemu-img's warning when a probed image turned out raw and is opened
 * read-write (open_image() prints it; snapshot -a prints it again, as
 * qemu-img does). */
/* Whether OPTIONS (a -o list) holds "help" or "?". */
bool img_has_help_option (const char *options);
/* qemu-img's list of FMT's creation options for -o help: with the file
 * protocol's merged in when FILENAME (the target) is given.  Returns the
 * exit code (1 with qemu-img's message on an unknown format). */
int img_print_create_help (const char *fmt, const char *filename);
/* JSON with qemu-img's four-space indentation on stdout. */
void print_json (json_t *j);
/* A size argument (k, M, ... suffixes) up to INT64_MAX, with qemu-img's
 * two messages naming WHAT ("image size", "start offset"): a bad suffix
 * or sign, or a number out of range. */
bool img_parse_size_arg (const char *s, const char *what, uint64_t *out);
/* -r RATE of commit and stream: a size (k, M, ... suffixes) up to
 * INT64_MAX, with qemu-img's message on anything else. */
bool img_parse_rate (const char *s, uint64_t *out);
/* -t MODE as the file-node options under FMT (cache_mode_options()), with
 * qemu-img's "Invalid cache option" message on an unknown mode. */
bool img_cache_options (const char *mode, const char *fmt, char *buf,
                        size_t size, bool *writethrough);
/* Sleep as long as RL asks before more bytes may go (not at all at 0). */
struct ratelimit;
void img_ratelimit_wait (const struct ratelimit *rl);

/* img-snapshot.c: the snapshot table as qemu-img prints it (snapshot -l
 * and info). */
void snapshot_list_human (struct strata_snapshot_info *const *l, size_t n);
json_t *snapshot_list_json (struct strata_snapshot_info *const *l,
                            size_t n);

/* img-snapshot.c, for the subcommands that parse options as qemu-img:
 * "strata-img: MSG" and the "Try ... --help" line; returns 1. */
int img_usage_error (const char *msg);
/* qemu-img's message for getopt_long's ':' (missing argument, when C is
 * ':') or '?' (unknown option) at ARGV[optind - 1]; returns 1. */
int img_option_error (int c, char **argv);

/* strata-img.c (main and the command table): the general help on stdout
 * (qemu-img's help()). */
void img_help (void);

/* The subcommands. */
int cmd_create (int argc, char **argv);     /* img-create.c */
int cmd_info (int argc, char **argv);       /* img-info.c */
int cmd_bitmap (int argc, char **argv);     /* img-bitmap.c */
int cmd_map (int argc, char **argv);        /* img-map.c */
int cmd_check (int argc, char **argv);      /* img-check.c */
int cmd_compare (int argc, char **argv);    /* img-compare.c */
int cmd_bench (int argc, char **argv);      /* img-bench.c */
int cmd_convert (int argc, char **argv);    /* img-convert.c */
int cmd_measure (int argc, char **argv);    /* img-measure.c */
int cmd_commit (int argc, char **argv);     /* img-commit.c */
int cmd_rebase (int argc, char **argv);     /* img-rebase.c */
int cmd_resize (int argc, char **argv);     /* img-resize.c */
int cmd_snapshot (int argc, char **argv);   /* img-snapshot.c */
int cmd_amend (int argc, char **argv);      /* img-amend.c */
int cmd_stream (int argc, char **argv);     /* img-stream.c */

#endif
