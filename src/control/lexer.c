/* strata: framing QMP messages on a byte stream.
 *
 * A QMP client sends a stream of JSON values, not necessarily one per
 * line.  Like QEMU's JSON streamer, a message ends where its braces and
 * brackets balance outside strings; a top-level string or scalar is a
 * message of its own.  The span is handed back whole to the caller, which
 * parses it (stratad's server with jansson).
 *
 *   IDLE --'{' '['--> NESTED --balanced--> message, IDLE
 *   IDLE --'"' '\''-> STRING (outer IDLE) --quote--> message, IDLE
 *   NESTED --quote--> STRING (outer NESTED) --quote--> NESTED
 *   IDLE --letter/digit--> SCALAR --other byte--> message, IDLE
 *   any --stray byte--> error, RECOVER --'\n'--> IDLE
 *
 * Inside strings a backslash escapes the next byte, so \" and \\ do not
 * end one.  Outside strings, a letter run that is not true/false/null is
 * a lexical error ("invalid keyword"), and a byte that cannot start any
 * JSON token is a "stray" one: QEMU's words for both.  After such an
 * error the input is skipped up to the next newline, as QEMU does.  A
 * closing brace at the top level is an error of its own, skipped alone.
 *
 * The buffer keeps only the message being read: what precedes it is
 * dropped when the lexer runs out of input, and a message still
 * incomplete past max_message bytes is reported once the input is used
 * up, so one client cannot make the daemon buffer without bound.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "control/lexer.h"

/* Free space kept for one read, and the point past which a buffer that
 * carried a big message is given back. */
#define LEX_CHUNK 65536
#define LEX_SHRINK_ABOVE (1u << 20)

void
qmp_lexer_init (struct qmp_lexer *lx, size_t max_message)
{
  memset (lx, 0, sizeof *lx);
  lx->max_message = max_message;
  lx->state = LEX_IDLE;
}

void
qmp_lexer_free (struct qmp_lexer *lx)
{
  free (lx->buf);
  lx->buf = NULL;
  lx->len = lx->cap = lx->scan = lx->msg_start = 0;
}

char *
qmp_lexer_space (struct qmp_lexer *lx, size_t min, size_t *avail)
{
  if (lx->cap - lx->len < min) {
    size_t cap = lx->cap ? lx->cap : LEX_CHUNK;
    char *p;

    while (cap - lx->len < min)
      cap *= 2;
    p = realloc (lx->buf, cap);
    if (!p)
      return NULL;
    lx->buf = p;
    lx->cap = cap;
  }
  *avail = lx->cap - lx->len;
  return lx->buf + lx->len;
}

void
qmp_lexer_commit (struct qmp_lexer *lx, size_t n)
{
  lx->len += n;
}

bool
qmp_lexer_feed (struct qmp_lexer *lx, const void *data, size_t len)
{
  size_t avail;
  char *p = qmp_lexer_space (lx, len, &avail);

  if (!p)
    return false;
  memcpy (p, data, len);
  qmp_lexer_commit (lx, len);
  return true;
}

static bool
is_space (char ch)
{
  return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n';
}

/* Can CH appear in a number or in true/false/null? */
static bool
is_scalar_char (char ch)
{
  return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z')
         || (ch >= 'A' && ch <= 'Z') || ch == '-' || ch == '+' || ch == '.'
         || ch == '_';
}

/* The lexical error at POS, in QEMU's words; input is then skipped to the
 * next newline. */
static enum qmp_lex_kind
lex_error_at (struct qmp_lexer *lx, size_t pos, struct qmp_lex_token *tok)
{
  unsigned char ch = lx->buf[pos];

  if (is_scalar_char (ch)) {
    size_t end = pos;
    while (end < lx->len && end - pos < 64 && is_scalar_char (lx->buf[end]))
      end++;
    snprintf (lx->error, sizeof lx->error,
              "JSON parse error, invalid keyword '%.*s'", (int)(end - pos),
              lx->buf + pos);
  }
  else if (ch >= 0x20 && ch < 0x7f)
    snprintf (lx->error, sizeof lx->error, "JSON parse error, stray '%c'", ch);
  else if (ch >= 0x80)
    snprintf (lx->error, sizeof lx->error,
              "JSON parse error, stray '\\uFFFD'");
  else
    snprintf (lx->error, sizeof lx->error, "JSON parse error, stray '\\u%04X'",
              ch);
  lx->state = LEX_RECOVER;
  lx->scan = pos;
  tok->kind = QMP_LEX_ERROR;
  tok->error = lx->error;
  return tok->kind;
}

/* Inside nested JSON outside strings: is the word starting at POS one
 * that JSON allows?  Returns false for a letter run that is no keyword.
 * Sets *INCOMPLETE when the buffer ends inside the word. */
static bool
word_ok (const struct qmp_lexer *lx, size_t pos, bool *incomplete)
{
  const char *b = lx->buf;
  size_t end = pos;

  *incomplete = false;
  while (end < lx->len && is_scalar_char (b[end]))
    end++;
  if (end == lx->len) {
    *incomplete = true;
    return true;
  }
  if (!((b[pos] >= 'a' && b[pos] <= 'z') || (b[pos] >= 'A' && b[pos] <= 'Z')))
    return true; /* a number: the parser judges it */
  return (end - pos == 4 && memcmp (b + pos, "true", 4) == 0)
         || (end - pos == 5 && memcmp (b + pos, "false", 5) == 0)
         || (end - pos == 4 && memcmp (b + pos, "null", 4) == 0);
}

/* The message [msg_start, END) is complete. */
static enum qmp_lex_kind
lex_message (struct qmp_lexer *lx, size_t end, struct qmp_lex_token *tok)
{
  lx->state = LEX_IDLE;
  tok->kind = QMP_LEX_MESSAGE;
  tok->text = lx->buf + lx->msg_start;
  tok->len = end - lx->msg_start;
  lx->msg_start = end;
  lx->scan = end;
  return tok->kind;
}

/* Out of input at POS: drop what is done with, keep the current message,
 * and give memory back after a big one. */
static enum qmp_lex_kind
lex_more (struct qmp_lexer *lx, size_t pos, struct qmp_lex_token *tok)
{
  lx->scan = pos;
  if (lx->msg_start > 0) {
    memmove (lx->buf, lx->buf + lx->msg_start, lx->len - lx->msg_start);
    lx->len -= lx->msg_start;
    lx->scan -= lx->msg_start;
    lx->msg_start = 0;
  }
  if (lx->cap > LEX_SHRINK_ABOVE && lx->len < lx->cap / 4) {
    size_t cap = lx->len > LEX_CHUNK ? lx->len * 2 : LEX_CHUNK * 2;
    char *p = realloc (lx->buf, cap);
    if (p) {
      lx->buf = p;
      lx->cap = cap;
    }
  }
  tok->kind = lx->len > lx->max_message ? QMP_LEX_OVERSIZED : QMP_LEX_MORE;
  return tok->kind;
}

static void
lex_enter_string (struct qmp_lexer *lx, char quote)
{
  lx->outer = lx->state;
  lx->state = LEX_STRING;
  lx->quote = quote;
  lx->escape = false;
}

enum qmp_lex_kind
qmp_lexer_next (struct qmp_lexer *lx, struct qmp_lex_token *tok)
{
  size_t pos = lx->scan;
  bool incomplete;

  memset (tok, 0, sizeof *tok);
  while (pos < lx->len) {
    char ch = lx->buf[pos];

    switch (lx->state) {
    case LEX_RECOVER:
      if (ch == '\n')
        lx->state = LEX_IDLE;
      pos++;
      lx->msg_start = pos;
      break;
    case LEX_IDLE:
      lx->msg_start = pos;
      if (is_space (ch)) {
        pos++;
        lx->msg_start = pos;
      }
      else if (ch == '{' || ch == '[') {
        lx->state = LEX_NESTED;
        lx->depth = 1;
        pos++;
      }
      else if (ch == '"' || ch == '\'') {
        lex_enter_string (lx, ch);
        pos++;
      }
      else if (ch == '}' || ch == ']') {
        pos++;
        lx->msg_start = lx->scan = pos;
        tok->kind = QMP_LEX_ERROR;
        tok->error = "JSON parse error, expecting value";
        return tok->kind;
      }
      else if (is_scalar_char (ch)) {
        if (!word_ok (lx, pos, &incomplete))
          return lex_error_at (lx, pos, tok);
        if (incomplete)
          return lex_more (lx, pos, tok);
        lx->state = LEX_SCALAR;
        pos++;
      }
      else
        return lex_error_at (lx, pos, tok);
      break;
    case LEX_SCALAR:
      if (is_scalar_char (ch)) {
        pos++;
        break;
      }
      return lex_message (lx, pos, tok);
    case LEX_STRING:
      pos++;
      if (lx->escape)
        lx->escape = false;
      else if (ch == '\\')
        lx->escape = true;
      else if (ch == lx->quote) {
        lx->state = lx->outer;
        if (lx->state == LEX_IDLE)
          return lex_message (lx, pos, tok);
      }
      break;
    case LEX_NESTED:
      if (ch == '"' || ch == '\'') {
        lex_enter_string (lx, ch);
        pos++;
      }
      else if (ch == '{' || ch == '[') {
        lx->depth++;
        pos++;
      }
      else if (ch == '}' || ch == ']') {
        pos++;
        if (--lx->depth == 0)
          return lex_message (lx, pos, tok);
      }
      else if (is_space (ch) || ch == ',' || ch == ':')
        pos++;
      else if (is_scalar_char (ch)) {
        if (!word_ok (lx, pos, &incomplete))
          return lex_error_at (lx, pos, tok);
        if (incomplete)
          return lex_more (lx, pos, tok);
        while (pos < lx->len && is_scalar_char (lx->buf[pos]))
          pos++;
      }
      else
        return lex_error_at (lx, pos, tok);
      break;
    }
  }
  return lex_more (lx, pos, tok);
}
