/* strata: framing QMP messages on a byte stream (src/control/lexer.c).
 *
 * The lexer owns an input buffer.  A caller appends bytes (or receives
 * straight into qmp_lexer_space()), then calls qmp_lexer_next() until it
 * says QMP_LEX_MORE.  It knows nothing of sockets or connections, so it is
 * tested on its own (tests/unit/test-qmp-lexer.c).
 */
#ifndef STRATA_CONTROL_LEXER_H
#define STRATA_CONTROL_LEXER_H

#include <stdbool.h>
#include <stddef.h>

enum qmp_lex_kind {
  QMP_LEX_MORE,      /* everything buffered is consumed; feed more */
  QMP_LEX_MESSAGE,   /* a complete JSON value: [text, text + len) */
  QMP_LEX_ERROR,     /* a lexical error: error holds QEMU's message */
  QMP_LEX_OVERSIZED, /* the current message exceeds the limit */
};

struct qmp_lex_token {
  enum qmp_lex_kind kind;
  const char *text; /* MESSAGE: valid until the next lexer call */
  size_t len;
  const char *error; /* ERROR: valid until the next lexer call */
};

/* Framing state (see the design note in lexer.c). */
enum qmp_lex_state {
  LEX_IDLE,
  LEX_NESTED,
  LEX_STRING,
  LEX_SCALAR,
  LEX_RECOVER
};

struct qmp_lexer {
  char *buf; /* bytes [0, len); the current message starts at msg_start */
  size_t len, cap, scan, msg_start;
  size_t max_message;
  enum qmp_lex_state state;
  enum qmp_lex_state outer; /* state to return to after a string */
  int depth;
  char quote;
  bool escape;
  char error[128];
};

/* A lexer that reports QMP_LEX_OVERSIZED for a message still incomplete
 * at more than MAX_MESSAGE bytes. */
void qmp_lexer_init (struct qmp_lexer *lx, size_t max_message);
void qmp_lexer_free (struct qmp_lexer *lx);

/* At least MIN bytes of free space at the end of the buffer, for a read
 * straight into it; *AVAIL gets the free size.  NULL when out of memory. */
char *qmp_lexer_space (struct qmp_lexer *lx, size_t min, size_t *avail);
/* N bytes were written into the space qmp_lexer_space() returned. */
void qmp_lexer_commit (struct qmp_lexer *lx, size_t n);
/* Append LEN bytes.  False when out of memory. */
bool qmp_lexer_feed (struct qmp_lexer *lx, const void *data, size_t len);

/* The next message or error in the input.  After an error the lexer skips
 * input as QEMU does (to the next newline, for a stray character). */
enum qmp_lex_kind qmp_lexer_next (struct qmp_lexer *lx,
                                  struct qmp_lex_token *tok);

#endif
