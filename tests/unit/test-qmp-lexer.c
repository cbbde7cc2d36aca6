/* Unit tests for the QMP framing lexer (src/control/lexer.c): what makes
 * a message, what is a lexical error, and how input split or joined
 * across reads is framed. */
#include "control/lexer.h"
#include "test.h"

#define MAX (1u << 20)

/* Feed TEXT and collect what the lexer reports, as "M:<text>" for a
 * message, "E:<error>" for an error and "O" for oversized, joined by '|'
 * into OUT.  Stops at MORE or OVERSIZED. */
static void
drain (struct qmp_lexer *lx, char *out, size_t outsz)
{
  struct qmp_lex_token tok;

  for (;;) {
    enum qmp_lex_kind k = qmp_lexer_next (lx, &tok);
    size_t used = strlen (out);
    if (k == QMP_LEX_MORE)
      return;
    if (k == QMP_LEX_MESSAGE)
      snprintf (out + used, outsz - used, "%sM:%.*s", used ? "|" : "",
                (int)tok.len, tok.text);
    else if (k == QMP_LEX_ERROR)
      snprintf (out + used, outsz - used, "%sE:%s", used ? "|" : "",
                tok.error);
    else {
      snprintf (out + used, outsz - used, "%sO", used ? "|" : "");
      return;
    }
  }
}

/* Feed each of the NULL-terminated chunks in turn, draining after each. */
static char *
frame (const char *const *chunks)
{
  static char out[4096];
  struct qmp_lexer lx;

  out[0] = '\0';
  qmp_lexer_init (&lx, MAX);
  for (; *chunks; chunks++) {
    CHECK (qmp_lexer_feed (&lx, *chunks, strlen (*chunks)));
    drain (&lx, out, sizeof out);
  }
  qmp_lexer_free (&lx);
  return out;
}

#define FRAME(...) frame ((const char *const[]){ __VA_ARGS__, NULL })

static void
test_one_message (void)
{
  CHECK (
      strcmp (FRAME ("{\"execute\": \"quit\"}\n"), "M:{\"execute\": \"quit\"}")
      == 0);
}

static void
test_nothing_until_balanced (void)
{
  struct qmp_lexer lx;
  struct qmp_lex_token tok;

  qmp_lexer_init (&lx, MAX);
  CHECK (qmp_lexer_feed (&lx, "{\"a\": {\"b\": [1, 2", 17));
  CHECK (qmp_lexer_next (&lx, &tok) == QMP_LEX_MORE);
  CHECK (qmp_lexer_feed (&lx, "]}", 2));
  CHECK (qmp_lexer_next (&lx, &tok) == QMP_LEX_MORE);
  CHECK (qmp_lexer_feed (&lx, "}", 1));
  CHECK (qmp_lexer_next (&lx, &tok) == QMP_LEX_MESSAGE);
  CHECK (tok.len == 20);
  CHECK (memcmp (tok.text, "{\"a\": {\"b\": [1, 2]}}", 20) == 0);
  CHECK (qmp_lexer_next (&lx, &tok) == QMP_LEX_MORE);
  qmp_lexer_free (&lx);
}

static void
test_split_across_reads (void)
{
  CHECK (strcmp (FRAME ("{\"exec", "ute\": \"qu", "ery-version\"", "}"),
                 "M:{\"execute\": \"query-version\"}")
         == 0);
}

static void
test_split_byte_by_byte (void)
{
  const char *msg = "{\"a\": \"x\\\"}\", \"b\": [true, false, null, -1.5e3]}";
  struct qmp_lexer lx;
  struct qmp_lex_token tok;
  int messages = 0;

  qmp_lexer_init (&lx, MAX);
  for (size_t i = 0; msg[i]; i++) {
    CHECK (qmp_lexer_feed (&lx, msg + i, 1));
    while (qmp_lexer_next (&lx, &tok) != QMP_LEX_MORE) {
      CHECK (tok.kind == QMP_LEX_MESSAGE);
      CHECK (tok.len == strlen (msg));
      CHECK (memcmp (tok.text, msg, tok.len) == 0);
      messages++;
    }
  }
  CHECK (messages == 1);
  qmp_lexer_free (&lx);
}

static void
test_several_in_one_read (void)
{
  CHECK (strcmp (FRAME ("{\"a\":1}{\"b\":2}\r\n  [3]\n{\"c\""),
                 "M:{\"a\":1}|M:{\"b\":2}|M:[3]")
         == 0);
}

static void
test_braces_inside_strings (void)
{
  CHECK (strcmp (FRAME ("{\"s\": \"}}]]{{\"}"), "M:{\"s\": \"}}]]{{\"}") == 0);
  CHECK (strcmp (FRAME ("{\"s\": '}'}"), "M:{\"s\": '}'}") == 0);
}

static void
test_escaped_quotes (void)
{
  /* \" does not end the string; \\ does not escape the closing quote. */
  CHECK (strcmp (FRAME ("{\"s\": \"a\\\"}\"}"), "M:{\"s\": \"a\\\"}\"}") == 0);
  CHECK (strcmp (FRAME ("{\"s\": \"a\\\\\"}"), "M:{\"s\": \"a\\\\\"}") == 0);
  /* An escape split across reads. */
  CHECK (strcmp (FRAME ("{\"s\": \"a\\", "\"}\"}"), "M:{\"s\": \"a\\\"}\"}")
         == 0);
}

static void
test_nesting (void)
{
  CHECK (strcmp (FRAME ("[[[{\"a\": [{}, []]}]]] {}"),
                 "M:[[[{\"a\": [{}, []]}]]]|M:{}")
         == 0);
}

static void
test_top_level_scalars_and_strings (void)
{
  CHECK (strcmp (FRAME ("\"hi\" 42 true\n"), "M:\"hi\"|M:42|M:true") == 0);
  /* A scalar ends only at a byte that cannot continue it. */
  CHECK (strcmp (FRAME ("12", "34", " "), "M:1234") == 0);
}

static void
test_stray_bytes (void)
{
  CHECK (strcmp (FRAME ("@{\"a\":1}\n{\"b\":2}"),
                 "E:JSON parse error, stray '@'|M:{\"b\":2}")
         == 0);
  CHECK (strcmp (FRAME ("\x01\n"), "E:JSON parse error, stray '\\u0001'")
         == 0);
  CHECK (strcmp (FRAME ("\xc3\xa9\n"), "E:JSON parse error, stray '\\uFFFD'")
         == 0);
  CHECK (strcmp (FRAME ("{\"a\": @}\n"), "E:JSON parse error, stray '@'")
         == 0);
}

static void
test_invalid_keyword (void)
{
  CHECK (strcmp (FRAME ("{\"a\": nul}\n[1]"),
                 "E:JSON parse error, invalid keyword 'nul'|M:[1]")
         == 0);
  CHECK (strcmp (FRAME ("hello world\n"),
                 "E:JSON parse error, invalid keyword 'hello'")
         == 0);
  /* A keyword split across reads is judged once complete. */
  CHECK (strcmp (FRAME ("[tr", "ue]"), "M:[true]") == 0);
  CHECK (strcmp (FRAME ("[tr", "uth]\n"),
                 "E:JSON parse error, invalid keyword 'truth'")
         == 0);
}

static void
test_closing_brace_alone (void)
{
  /* Skipped alone, without the skip to the next newline. */
  CHECK (strcmp (FRAME ("}{\"a\":1}"),
                 "E:JSON parse error, expecting value|M:{\"a\":1}")
         == 0);
}

static void
test_recovery_waits_for_newline (void)
{
  CHECK (strcmp (FRAME ("# {\"a\":1}", " {\"b\":2}", "\n{\"c\":3}"),
                 "E:JSON parse error, stray '#'|M:{\"c\":3}")
         == 0);
}

static void
test_oversized (void)
{
  struct qmp_lexer lx;
  struct qmp_lex_token tok;
  char chunk[100];

  qmp_lexer_init (&lx, 1000);
  CHECK (qmp_lexer_feed (&lx, "{\"a\": \"", 7));
  memset (chunk, 'x', sizeof chunk);
  for (int i = 0; i < 9; i++) {
    CHECK (qmp_lexer_feed (&lx, chunk, sizeof chunk));
    CHECK (qmp_lexer_next (&lx, &tok) == QMP_LEX_MORE);
  }
  CHECK (qmp_lexer_feed (&lx, chunk, sizeof chunk));
  CHECK (qmp_lexer_next (&lx, &tok) == QMP_LEX_OVERSIZED);
  qmp_lexer_free (&lx);
}

static void
test_limit_counts_one_message (void)
{
  /* Many small messages in total over the limit are fine: the lexer
   * forgets what it has framed. */
  struct qmp_lexer lx;
  struct qmp_lex_token tok;
  int messages = 0;

  qmp_lexer_init (&lx, 64);
  for (int i = 0; i < 100; i++) {
    CHECK (qmp_lexer_feed (&lx, "{\"execute\": \"x\"}", 16));
    while (qmp_lexer_next (&lx, &tok) == QMP_LEX_MESSAGE)
      messages++;
    CHECK (tok.kind == QMP_LEX_MORE);
    CHECK (lx.len == 0);
  }
  CHECK (messages == 100);
  qmp_lexer_free (&lx);
}

static void
test_big_message_then_memory_back (void)
{
  struct qmp_lexer lx;
  struct qmp_lex_token tok;
  size_t big = 4u << 20, avail;
  char *p;

  qmp_lexer_init (&lx, 16u << 20);
  p = qmp_lexer_space (&lx, big + 2, &avail);
  CHECK (p && avail >= big + 2);
  p[0] = '"';
  memset (p + 1, 'y', big);
  p[big + 1] = '"';
  qmp_lexer_commit (&lx, big + 2);
  CHECK (qmp_lexer_next (&lx, &tok) == QMP_LEX_MESSAGE);
  CHECK (tok.len == big + 2);
  CHECK (qmp_lexer_next (&lx, &tok) == QMP_LEX_MORE);
  CHECK (lx.cap < (1u << 20));
  qmp_lexer_free (&lx);
}

TESTS (T (test_one_message), T (test_nothing_until_balanced),
       T (test_split_across_reads), T (test_split_byte_by_byte),
       T (test_several_in_one_read), T (test_braces_inside_strings),
       T (test_escaped_quotes), T (test_nesting),
       T (test_top_level_scalars_and_strings), T (test_stray_bytes),
       T (test_invalid_keyword), T (test_closing_brace_alone),
       T (test_recovery_waits_for_newline), T (test_oversized),
       T (test_limit_counts_one_message),
       T (test_big_message_then_memory_back))
