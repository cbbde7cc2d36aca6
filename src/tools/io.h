/* strata-io's shared parts: the open image, qemu-io's number and report
 * formats (io-common.c), and the commands (io-rw.c: the data commands;
 * io-cmds.c: the rest), which strata-io.c's table dispatches.  Every
 * command returns 0 on success and -1 when it failed, having printed
 * what qemu-io prints.
 */
#ifndef STRATA_IO_H
#define STRATA_IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <strata/strata.h>

#define MAX_REQUEST 2147483136ULL /* qemu-io's limit for one request */
#define CHUNK (4u << 20)          /* bytes moved per call */

/* "strata-io", for messages. */
extern const char *const progname;

struct io_ctx {
  strata_node *node;
  const char *filename;
  const char *format;
  bool writethrough; /* -t writethrough/directsync: FUA every write */
};

/* io-common.c */
void cvtstr (double value, char *str, size_t size);
void report (const char *op, bool csv, uint64_t t0, uint64_t offset,
             uint64_t len);
void dump_buffer (const uint8_t *p, uint64_t offset, uint64_t len);
bool cvtnum (const char *s, uint64_t *out);
bool parse_pattern (const char *s, int *pattern);
bool parse_off_len (char **argv, uint64_t *off, uint64_t *len);
void print_io_failure (const char *op, int r);
bool open_image (struct io_ctx *io, const char *filename, const char *format,
                 const char *cache, const char *extra, unsigned flags);
bool close_image (struct io_ctx *io);

/* strata-io.c: print the usage line of command NAME; returns -1. */
int command_usage (const char *name);

/* The commands (io-rw.c, io-cmds.c). */
int cmd_read (struct io_ctx *io, int argc, char **argv);
int cmd_write (struct io_ctx *io, int argc, char **argv);
int cmd_discard (struct io_ctx *io, int argc, char **argv);
int cmd_readv (struct io_ctx *io, int argc, char **argv);
int cmd_aio_read (struct io_ctx *io, int argc, char **argv);
int cmd_writev (struct io_ctx *io, int argc, char **argv);
int cmd_aio_write (struct io_ctx *io, int argc, char **argv);
int cmd_map (struct io_ctx *io, int argc, char **argv);
int cmd_flush (struct io_ctx *io, int argc, char **argv);
int cmd_length (struct io_ctx *io, int argc, char **argv);
int cmd_info (struct io_ctx *io, int argc, char **argv);
int cmd_truncate (struct io_ctx *io, int argc, char **argv);
int cmd_reopen (struct io_ctx *io, int argc, char **argv);
int cmd_alloc (struct io_ctx *io, int argc, char **argv);
int cmd_sleep (struct io_ctx *io, int argc, char **argv);
int cmd_sigraise (struct io_ctx *io, int argc, char **argv);
int cmd_abort (struct io_ctx *io, int argc, char **argv);
int cmd_open (struct io_ctx *io, int argc, char **argv);
int cmd_close (struct io_ctx *io, int argc, char **argv);

#endif
