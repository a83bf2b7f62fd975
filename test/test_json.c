// test_json.c: the JSON parser against hand-written expectations: every escape, surrogate pairs,
// invalid UTF-8, control characters, nesting limits, trailing garbage, numbers, error positions,
// duplicate keys (small objects and large ones), json_get, the string writer, and the speed of
// parsing the 7 MB tokenizer.json.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../common.h"
#include "../json.h"
#include "test.h"

// Parses a NUL-terminated text (or n bytes when n > 0); returns 0 on success.
static int parse(Json *j, const char *text, size_t n, Err *e) {
    return json_parse(j, text, n ? n : strlen(text), e);
}

// Checks that `text` is rejected, and that the message contains `want` when want is not NULL.
static void check_rejects(const char *name, const char *text, size_t n, const char *want) {
    Json j;
    Err e = {{0}};
    int rc = parse(&j, text, n, &e);
    check(rc < 0 && (!want || strstr(e.msg, want)), name, "rc %d, message '%s', wanted '%s'", rc, e.msg, want ? want : "");
    if (rc == 0) json_free(&j);
}

// Checks that `text` is one string whose bytes are want[0..want_len).
static void check_string(const char *name, const char *text, const char *want, size_t want_len) {
    Json j;
    Err e = {{0}};
    int rc = parse(&j, text, 0, &e);
    int ok = rc == 0 && j.type == JSON_STRING && j.len == want_len && memcmp(j.str, want, want_len) == 0 && j.str[want_len] == 0;
    check(ok, name, "rc %d (%s), len %zu want %zu", rc, e.msg, rc == 0 ? j.len : 0, want_len);
    if (rc == 0) json_free(&j);
}

static void test_escapes(void) {
    check_string("json escapes: simple", "\"a\\\"b\\\\c\\/d\\be\\ff\\ng\\rh\\ti\"", "a\"b\\c/d\be\ff\ng\rh\ti", 17);
    check_string("json escapes: \\u ASCII and 2-byte", "\"\\u0041\\u00e9\\u00E9\"", "A\xC3\xA9\xC3\xA9", 5);
    check_string("json escapes: \\u 3-byte", "\"\\u20ac\\uFFFD\"", "\xE2\x82\xAC\xEF\xBF\xBD", 6);
    check_string("json escapes: surrogate pair U+1F600", "\"\\ud83d\\ude00\"", "\xF0\x9F\x98\x80", 4);
    check_string("json escapes: surrogate pair U+10FFFF", "\"\\uDBFF\\uDFFF\"", "\xF4\x8F\xBF\xBF", 4);
    check_string("json escapes: \\u0000 kept", "\"a\\u0000b\"", "a\0b", 3);
    check_string("json raw UTF-8 kept", "\"\xE6\x9D\xB1\xE4\xBA\xAC \xF0\x9F\x98\x80\"", "\xE6\x9D\xB1\xE4\xBA\xAC \xF0\x9F\x98\x80", 11);
    check_string("json empty string", "\"\"", "", 0);
    check_rejects("json rejects lone high surrogate", "\"\\ud800\"", 0, "lone high surrogate");
    check_rejects("json rejects high surrogate + non-surrogate", "\"\\ud800\\u0041\"", 0, "lone high surrogate");
    check_rejects("json rejects lone low surrogate", "\"\\udc00\\ud800\"", 0, "lone low surrogate");
    check_rejects("json rejects high surrogate at end", "\"\\ud83d\"", 0, "surrogate");
    check_rejects("json rejects bad escape", "\"\\x41\"", 0, "invalid escape");
    check_rejects("json rejects short \\u", "\"\\u12\"", 0, "4 hex digits");
    check_rejects("json rejects \\u non-hex", "\"\\u12g4\"", 0, "4 hex digits");
    check_rejects("json rejects unterminated string", "\"abc", 0, "unterminated string");
    check_rejects("json rejects backslash at end", "\"abc\\", 0, "unterminated string");
    check_rejects("json rejects raw newline in string", "\"a\nb\"", 0, "control character");
    check_rejects("json rejects raw tab in string", "\"a\tb\"", 0, "control character");
    check_rejects("json rejects raw NUL in string", "\"a\0b\"", 5, "control character");
}

static void test_utf8(void) {
    check_rejects("json rejects overlong 2-byte", "\"\xC0\x80\"", 0, "invalid UTF-8");
    check_rejects("json rejects overlong 3-byte", "\"\xE0\x80\xAF\"", 0, "invalid UTF-8");
    check_rejects("json rejects overlong 4-byte", "\"\xF0\x80\x80\xAF\"", 0, "invalid UTF-8");
    check_rejects("json rejects encoded surrogate", "\"\xED\xA0\x80\"", 0, "invalid UTF-8");
    check_rejects("json rejects past U+10FFFF", "\"\xF4\x90\x80\x80\"", 0, "invalid UTF-8");
    check_rejects("json rejects 0xFF byte", "\"a\xFF\"", 0, "invalid UTF-8");
    check_rejects("json rejects lone continuation", "\"\x80\"", 0, "invalid UTF-8");
    check_rejects("json rejects truncated sequence", "\"\xE2\x82\"", 0, "invalid UTF-8");
    check_rejects("json rejects invalid UTF-8 in key", "{\"\xC3\":1}", 0, "invalid UTF-8");
    check_rejects("json rejects non-ASCII outside strings", "[\xC3\xA9]", 0, "unexpected character");
}

static void test_structure(void) {
    char deep[600];
    for (int n = 256; n <= 257; n++) {
        for (int k = 0; k < n; k++) deep[k] = '[', deep[n + k] = ']';
        Json j;
        Err e = {{0}};
        int rc = json_parse(&j, deep, 2 * (size_t)n, &e);
        if (n == 256) check(rc == 0, "json nesting 256 accepted", "%s", e.msg);
        else check(rc < 0 && strstr(e.msg, "nesting"), "json nesting 257 rejected", "rc %d '%s'", rc, e.msg);
        if (rc == 0) json_free(&j);
    }
    check_rejects("json rejects trailing value", "1 2", 0, "trailing");
    check_rejects("json rejects trailing garbage", "{} x", 0, "line 1, column 4: trailing");
    check_rejects("json rejects trailing comma in array", "[1,]", 0, "value expected");
    check_rejects("json rejects trailing comma in object", "{\"a\":1,}", 0, "object key");
    check_rejects("json rejects missing colon", "{\"a\" 1}", 0, "':' expected");
    check_rejects("json rejects unquoted key", "{a:1}", 0, "object key");
    check_rejects("json rejects unterminated array", "[1, 2", 0, "unterminated array");
    check_rejects("json rejects empty text", "", 0, "end of the text");
    check_rejects("json rejects bare word", "nul", 0, "unexpected character");
    check_rejects("json error position", "{\n  \"a\": tru\n}", 0, "line 2, column 8: unexpected character");
    check_rejects("json error column counts characters", "[\"\xC3\xA9\xC3\xA9\", x]", 0, "line 1, column 8:");

    const char *text = "\xEF\xBB\xBF { \"a\" : [true, false, null, {}, []], \"b\": \"x\", \"c\": 3 } \r\n";
    Json j;
    Err e = {{0}};
    int rc = parse(&j, text, 0, &e);
    check(rc == 0 && j.type == JSON_OBJECT && j.len == 3, "json object with BOM and whitespace", "rc %d '%s'", rc, e.msg);
    if (rc != 0) return;
    const Json *a = json_get(&j, "a"), *b = json_get(&j, "b");
    check(a && a->type == JSON_ARRAY && a->len == 5 && a->items[0].type == JSON_BOOL && a->items[0].boolean == 1 &&
              a->items[1].boolean == 0 && a->items[2].type == JSON_NULL && a->items[3].type == JSON_OBJECT &&
              a->items[3].len == 0 && a->items[4].type == JSON_ARRAY && a->items[4].len == 0,
          "json_get and array items", "a %p", (const void *)a);
    check(b && b->type == JSON_STRING && strcmp(b->str, "x") == 0, "json_get string member", "b %p", (const void *)b);
    check(json_get(&j, "d") == NULL && json_get(&j, "") == NULL && json_get(a, "a") == NULL && json_get(NULL, "a") == NULL,
          "json_get missing / not an object", "should be NULL");
    check(strcmp(j.keys[2], "c") == 0 && j.key_lens[1] == 1 && j.items[2].number == 3, "json keys in file order", "%s", j.keys[2]);
    json_free(&j);
}

static void test_numbers(void) {
    const char *text = "[0, -0, 1, -12, 3.25, 1.5e3, -12.25E-2, 1E+2, 123456789012, 2.5e-308, 1.7976931348623157e308]";
    const double want[] = {0, -0.0, 1, -12, 3.25, 1500, -0.1225, 100, 123456789012.0, 2.5e-308, 1.7976931348623157e308};
    Json j;
    Err e = {{0}};
    int rc = parse(&j, text, 0, &e);
    int ok = rc == 0 && j.len == 11;
    for (size_t k = 0; ok && k < 11; k++) ok = j.items[k].type == JSON_NUMBER && j.items[k].number == want[k];
    check(ok, "json numbers", "rc %d '%s'", rc, e.msg);
    check(rc == 0 && signbit(j.items[1].number), "json -0 keeps its sign", "not negative zero");
    if (rc == 0) json_free(&j);
    check_rejects("json rejects leading zero", "01", 0, "leading zero");
    check_rejects("json rejects '1.'", "1.", 0, "after '.'");
    check_rejects("json rejects '.5'", ".5", 0, "unexpected character");
    check_rejects("json rejects '+1'", "+1", 0, "unexpected character");
    check_rejects("json rejects '-'", "-", 0, "invalid number");
    check_rejects("json rejects '1e'", "1e", 0, "exponent");
    check_rejects("json rejects '1e+'", "[1e+]", 0, "exponent");
    check_rejects("json rejects 1e400", "1e400", 0, "out of range");
    check_rejects("json rejects NaN", "NaN", 0, "unexpected character");
    check_rejects("json rejects hex", "0x10", 0, "trailing");
    // A number at the very end of a buffer that is not NUL-terminated.
    char buf[4] = {'4', '2', '7', 'X'};
    rc = json_parse(&j, buf, 3, &e);
    check(rc == 0 && j.type == JSON_NUMBER && j.number == 427, "json number at end of unterminated buffer", "rc %d", rc);
}

static void test_writer(void) {
    const char in[] = "q\"b\\n\n\r\t\b\f\x01\x1f\x7f\0\xC3\xA9\xF0\x9F\x98\x80\xFFz";
    size_t n = sizeof in - 1;
    const char *want = "\"q\\\"b\\\\n\\n\\r\\t\\b\\f\\u0001\\u001f\\u007f\\u0000\xC3\xA9\xF0\x9F\x98\x80\\ufffdz\"";
    FILE *f = tmpfile();
    if (!f) {
        check(0, "json_write_string", "tmpfile failed");
        return;
    }
    json_write_string(f, in, n);
    long size = ftell(f);
    rewind(f);
    char out[256] = {0};
    size_t got = fread(out, 1, sizeof out - 1, f);
    fclose(f);
    check(size >= 0 && got == strlen(want) && memcmp(out, want, got) == 0, "json_write_string escapes", "got %s", out);
    Json j;
    Err e = {{0}};
    int rc = json_parse(&j, out, got, &e);
    // Round trip: everything but the invalid 0xFF byte (now U+FFFD) comes back.
    int ok = rc == 0 && j.type == JSON_STRING && j.len == n + 2 && memcmp(j.str, in, n - 2) == 0 &&
             memcmp(j.str + n - 2, "\xEF\xBF\xBDz", 4) == 0;
    check(ok, "json_write_string round trip", "rc %d '%s'", rc, e.msg);
    if (rc == 0) json_free(&j);
}

static void test_big_file(void) {
    Err e = {{0}};
    size_t len;
    char *text = read_file("data/tokenizer.json", &len, &e);
    if (!text) {
        check(0, "json parses tokenizer.json", "%s", e.msg);
        return;
    }
    Json j;
    int rc = json_parse(&j, text, len, &e);
    const Json *vocab = rc == 0 ? json_get(json_get(&j, "model"), "vocab") : NULL;
    check(vocab && vocab->len == 151643, "json parses tokenizer.json", "rc %d '%s'", rc, e.msg);
    if (rc == 0) json_free(&j);
    free(text);
}

// A text {"k0": 0, "k1": 1, ..., "k{n-1}": n-1} with key `dup_of`'s name again at index `at`
// (at < 0: no duplicate). malloc'ed.
static char *many_keys(int n, int at, int dup_of) {
    char *text = xmalloc((size_t)n * 32 + 64), *p = text;
    p += sprintf(p, "{");
    for (int k = 0; k < n; k++) p += sprintf(p, "%s\"k%d\": %d", k ? ",\n" : "", k == at ? dup_of : k, k);
    sprintf(p, "}");
    return text;
}

static void test_duplicate_keys(void) {
    check_rejects("json rejects a duplicate key, with its line, column and name",
                  "{\"prompt\": \"a\", \"completion\": \"b\", \"prompt\": \"c\"}", 0,
                  "line 1, column 36: duplicate key \"prompt\"");
    check_rejects("json rejects a duplicate key in a nested object", "[{\"a\": {\"x\": 1,\n \"x\": 2}}]", 0,
                  "line 2, column 2: duplicate key \"x\"");
    check_rejects("json rejects keys equal after unescaping", "{\"\\u0041\": 1, \"A\": 2}", 0, "duplicate key \"A\"");
    check_rejects("json rejects duplicate empty keys", "{\"\": 1, \"\": 2}", 0, "duplicate key \"\"");
    check_rejects("json shows control characters of a duplicate key as '?'", "{\"a\\nb\": 1, \"a\\nb\": 2}", 0,
                  "duplicate key \"a?b\"");
    check_rejects("json cuts a long duplicate key", "{\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\": 1, "
                  "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\": 2}", 0,
                  "duplicate key \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...\"");
    check_rejects("json compares keys past a NUL (\\u0000)", "{\"a\\u0000b\": 1, \"a\\u0000c\": 2, \"a\\u0000b\": 3}", 0,
                  "column 32: duplicate key");
    Json j;
    Err e = {{0}};
    int rc = parse(&j, "{\"a\": {\"x\": 1}, \"b\": {\"x\": 2}, \"A\": 3}", 0, &e);
    check(rc == 0, "json allows one key in sibling objects, and keys that differ in case", "%s", e.msg);
    if (rc == 0) json_free(&j);
    // Large objects are checked when they close: the first repeated key is the one reported.
    int cases[][3] = {{5000, -1, 0}, {5000, 4999, 0}, {5000, 17, 3}, {5000, 2500, 4998}, {17, 16, 0}, {16, 15, 14}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        int n = cases[c][0], at = cases[c][1], of = cases[c][2];
        char *text = many_keys(n, at, of), want[64], name[128];
        snprintf(want, sizeof want, "line %d, column 1: duplicate key \"k%d\"", (at > of ? at : of) + 1, of);
        if (at < 0) snprintf(name, sizeof name, "json object of %d different keys", n);
        else snprintf(name, sizeof name, "json object of %d keys, key %d repeated at %d", n, of, at);
        rc = parse(&j, text, 0, &e);
        if (at < 0) check(rc == 0, name, "%s", e.msg);
        else check(rc < 0 && strstr(e.msg, want), name, "rc %d '%s', wanted '%s'", rc, e.msg, want);
        if (rc == 0) json_free(&j);
        free(text);
    }
    char *two = many_keys(3000, 2999, 2000);  // and a second repeat earlier: k10 at index 1000
    memcpy(strstr(two, "\"k1000\""), "\"k10\"  ", 7);
    rc = parse(&j, two, 0, &e);
    check(rc < 0 && strstr(e.msg, "line 1001, column 1: duplicate key \"k10\""), "json reports the first of two repeats", "'%s'", e.msg);
    free(two);
}

void test_json(void) {
    test_escapes();
    test_utf8();
    test_structure();
    test_numbers();
    test_duplicate_keys();
    test_writer();
    test_big_file();
}
