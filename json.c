// json.c: a strict JSON parser (RFC 8259) into a tree of Json values, and a string writer.
//
// Strict on purpose: invalid UTF-8, lone surrogate escapes, control characters inside strings,
// leading zeros, trailing garbage, nesting deeper than 256, numbers out of double's range and a key
// twice in one object are errors (Python's json keeps the last of two equal keys, this parser used
// to keep the first: refusing both is the only answer that cannot silently differ), reported as "line L, column C: reason" (column counted in characters, both from 1).
// Leaves out: comments, NaN/Infinity literals, streaming. A leading UTF-8 byte order mark is
// skipped, as RFC 8259 allows. Read json.h for the tree; tokenizer.c shows a large user.
#include "json.h"

#include <locale.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define JSON_MAX_DEPTH 256

typedef struct {
    const unsigned char *s;  // the text
    size_t n;                // its length in bytes
    size_t i;                // the read position
    Err *e;
} Parser;

// Fills the error with the line and column of byte offset `at`.
static int fail_at(Parser *p, size_t at, const char *reason) {
    size_t line = 1, col = 1;
    for (size_t k = 0; k < at && k < p->n; k++) {
        if (p->s[k] == '\n') {
            line++;
            col = 1;
        } else if ((p->s[k] & 0xC0) != 0x80) {
            col++;  // count characters, not continuation bytes
        }
    }
    return err_set(p->e, "line %zu, column %zu: %s", line, col, reason);
}

static void skip_ws(Parser *p) {
    while (p->i < p->n) {
        unsigned char c = p->s[p->i];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->i++;
    }
}

// Length of the valid UTF-8 sequence at s[0..n) (1..4), or 0 when it is invalid
// (overlong forms, surrogates U+D800..U+DFFF and code points past U+10FFFF are invalid).
static size_t utf8_valid_len(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    if (c < 0xC2) return 0;
    if (c < 0xE0) return (n >= 2 && (s[1] & 0xC0) == 0x80) ? 2 : 0;
    if (c < 0xF0) {
        if (n < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
        if (c == 0xE0 && s[1] < 0xA0) return 0;  // overlong
        if (c == 0xED && s[1] >= 0xA0) return 0;  // surrogate
        return 3;
    }
    if (c < 0xF5) {
        if (n < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80) return 0;
        if (c == 0xF0 && s[1] < 0x90) return 0;  // overlong
        if (c == 0xF4 && s[1] >= 0x90) return 0;  // past U+10FFFF
        return 4;
    }
    return 0;
}

static size_t utf8_put(char *out, unsigned cp) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

// Reads the 4 hex digits of a \u escape at p->s[at..at+4); -1 when they are not hex digits.
static long hex4(const Parser *p, size_t at) {
    if (at + 4 > p->n) return -1;
    long v = 0;
    for (int k = 0; k < 4; k++) {
        unsigned char c = p->s[at + k];
        int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

// Decodes the escape at p->s[p->i] (just after the backslash) into out; returns bytes written or -1.
static int parse_escape(Parser *p, char *out) {
    size_t at = p->i - 1;  // the backslash
    if (p->i >= p->n) return fail_at(p, at, "unterminated string");
    unsigned char c = p->s[p->i++];
    switch (c) {
    case '"': *out = '"'; return 1;
    case '\\': *out = '\\'; return 1;
    case '/': *out = '/'; return 1;
    case 'b': *out = '\b'; return 1;
    case 'f': *out = '\f'; return 1;
    case 'n': *out = '\n'; return 1;
    case 'r': *out = '\r'; return 1;
    case 't': *out = '\t'; return 1;
    case 'u': break;
    default: return fail_at(p, at, "invalid escape in string");
    }
    long hi = hex4(p, p->i);
    if (hi < 0) return fail_at(p, at, "\\u must be followed by 4 hex digits");
    p->i += 4;
    unsigned cp = (unsigned)hi;
    if (hi >= 0xDC00 && hi <= 0xDFFF) return fail_at(p, at, "lone low surrogate escape");
    if (hi >= 0xD800 && hi <= 0xDBFF) {
        long lo = (p->i + 1 < p->n && p->s[p->i] == '\\' && p->s[p->i + 1] == 'u') ? hex4(p, p->i + 2) : -1;
        if (lo < 0xDC00 || lo > 0xDFFF) return fail_at(p, at, "lone high surrogate escape");
        p->i += 6;
        cp = 0x10000 + (((unsigned)hi - 0xD800) << 10) + ((unsigned)lo - 0xDC00);
    }
    return (int)utf8_put(out, cp);
}

// Parses a string whose opening quote is at p->s[p->i]. *out is malloc'ed and NUL-terminated.
static int parse_string(Parser *p, char **out, size_t *out_len) {
    size_t start = p->i++;
    size_t end = p->i;  // find the closing quote first: the decoded string is never longer
    while (end < p->n && p->s[end] != '"') end += (p->s[end] == '\\') ? 2 : 1;
    if (end >= p->n) return fail_at(p, start, "unterminated string");
    char *buf = xmalloc(end - p->i + 1);
    size_t k = 0;
    while (p->i < end) {
        unsigned char c = p->s[p->i];
        if (c == '\\') {
            p->i++;
            int w = parse_escape(p, buf + k);
            if (w < 0) goto bad;
            k += (size_t)w;
        } else if (c < 0x20) {
            fail_at(p, p->i, "control character in string (must be escaped)");
            goto bad;
        } else if (c < 0x80) {
            buf[k++] = (char)c;
            p->i++;
        } else {
            size_t w = utf8_valid_len(p->s + p->i, end - p->i);
            if (w == 0) {
                fail_at(p, p->i, "invalid UTF-8 in string");
                goto bad;
            }
            memcpy(buf + k, p->s + p->i, w);
            k += w;
            p->i += w;
        }
    }
    p->i = end + 1;
    buf[k] = 0;
    *out = buf;
    *out_len = k;
    return 0;
bad:
    free(buf);
    return -1;
}

static int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

// Validates the number grammar -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? and converts with strtod.
static int parse_number(Parser *p, double *out) {
    size_t start = p->i, i = p->i;
    const unsigned char *s = p->s;
    if (i < p->n && s[i] == '-') i++;
    if (i >= p->n || !is_digit(s[i])) return fail_at(p, start, "invalid number");
    if (s[i] == '0') {
        i++;
        if (i < p->n && is_digit(s[i])) return fail_at(p, start, "leading zero in number");
    } else {
        while (i < p->n && is_digit(s[i])) i++;
    }
    if (i < p->n && s[i] == '.') {
        i++;
        if (i >= p->n || !is_digit(s[i])) return fail_at(p, start, "invalid number: digit expected after '.'");
        while (i < p->n && is_digit(s[i])) i++;
    }
    if (i < p->n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < p->n && (s[i] == '+' || s[i] == '-')) i++;
        if (i >= p->n || !is_digit(s[i])) return fail_at(p, start, "invalid number: digit expected in exponent");
        while (i < p->n && is_digit(s[i])) i++;
    }
    size_t len = i - start;
    char small[64];
    char *buf = len < sizeof small ? small : xmalloc(len + 1);
    memcpy(buf, s + start, len);
    buf[len] = 0;
    char *end;
    double v = strtod(buf, &end);
    if (end != buf + len) {  // a locale whose decimal point is not '.' (setlocale): use its own
        char *dot = strchr(buf, '.');
        if (dot) *dot = localeconv()->decimal_point[0];
        v = strtod(buf, &end);
    }
    if (buf != small) free(buf);
    if (!isfinite(v)) return fail_at(p, start, "number out of range");
    *out = v;
    p->i = i;
    return 0;
}

static int parse_value(Parser *p, Json *out, int depth);

// A growing array of values (and keys, for objects) while a container is read.
typedef struct {
    Json *items;
    char **keys;
    size_t *key_lens;
    size_t *key_ats;  // objects: [len] offset of each key's opening quote, for the duplicate error
    uint32_t *key_hashes;  // objects: [len] key_hash of each key, taken while it is hot in cache
    size_t len, cap;
} Builder;

// ---------------------------------------------------------------------------------------------
// Duplicate keys. While an object has fewer than KEYS_LINEAR keys (nearly all objects), each new
// key is compared with the earlier ones. An object with more (tokenizer.json's vocabulary has
// 151,643 keys) is checked once when it closes: (hash, index) pairs are radix-sorted by hash, so
// that equal keys become neighbours, with sequential memory access (a hash set probed once per key
// costs a cache miss per key, and made tokenizer.json's parse a third slower).

#define KEYS_LINEAR 16

// A hash of s[0..n) that reads 8 bytes at a time (keys are short: most take one or two steps).
static uint32_t key_hash(const char *s, size_t n) {
    uint64_t h = (uint64_t)n * 0x9E3779B97F4A7C15ull, w;
    for (; n >= 8; s += 8, n -= 8) {
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 32;
    }
    w = 0;
    memcpy(&w, s, n);
    h = (h ^ w) * 0xFF51AFD7ED558CCDull;
    h ^= h >> 33;
    h *= 0xC4CEB9FE1A85EC53ull;
    return (uint32_t)(h >> 32);
}

static int key_equal(const Builder *b, size_t a, size_t c) {
    return b->key_lens[a] == b->key_lens[c] && memcmp(b->keys[a], b->keys[c], b->key_lens[a]) == 0;
}

// 1 when key b->keys[b->len] equals one of b->keys[0..len).
static int key_seen_linear(const Builder *b) {
    for (size_t i = 0; i < b->len; i++)
        if (key_equal(b, i, b->len)) return 1;
    return 0;
}

// Sorts a[n] by bits 32..63 (stable: three passes of 11 bits); the result is in a or tmp, returned.
static uint64_t *sort_by_high_bits(uint64_t *a, uint64_t *tmp, size_t n) {
    for (int shift = 32; shift < 64; shift += 11) {
        size_t start[2048] = {0};
        for (size_t i = 0; i < n; i++) start[(a[i] >> shift) & 2047]++;
        for (size_t d = 0, sum = 0; d < 2048; d++) {
            size_t c = start[d];
            start[d] = sum;
            sum += c;
        }
        for (size_t i = 0; i < n; i++) tmp[start[(a[i] >> shift) & 2047]++] = a[i];
        uint64_t *t = a;
        a = tmp;
        tmp = t;
    }
    return a;
}

// The smallest index k such that keys[k] equals an earlier key, or SIZE_MAX when all differ.
// Needs b->len < 2^32.
static size_t first_duplicate(const Builder *b) {
    size_t n = b->len, dup = SIZE_MAX;
    uint64_t *pairs = xmalloc(2 * n * sizeof *pairs);
    for (size_t k = 0; k < n; k++) pairs[k] = (uint64_t)b->key_hashes[k] << 32 | k;
    const uint64_t *s = sort_by_high_bits(pairs, pairs + n, n);
    for (size_t i = 0, j; i < n; i = j) {  // s[i..j): one hash, indices ascending
        for (j = i + 1; j < n && s[j] >> 32 == s[i] >> 32; j++) {
            for (size_t a = i; a < j; a++)
                if ((uint32_t)s[j] < dup && key_equal(b, (uint32_t)s[a], (uint32_t)s[j])) dup = (uint32_t)s[j];
        }
    }
    free(pairs);
    return dup;
}

// Fails at key k of b with "duplicate key \"KEY\"", the key cut to 60 bytes (at a character
// boundary) and its control characters shown as '?'.
static int fail_duplicate(Parser *p, const Builder *b, size_t k) {
    const char *key = b->keys[k];
    size_t n = b->key_lens[k], m = 0;
    char shown[64], reason[160];
    for (; m < n && m < 60; m++) shown[m] = (unsigned char)key[m] < 0x20 || key[m] == 0x7F ? '?' : key[m];
    int cut = m < n;
    while (cut && m > 0 && ((unsigned char)key[m] & 0xC0) == 0x80) m--;  // not half a character
    shown[m] = 0;
    snprintf(reason, sizeof reason, "duplicate key \"%s%s\" (a key may appear once in an object)", shown, cut ? "..." : "");
    return fail_at(p, b->key_ats[k], reason);
}

// Copies n elements of `size` bytes into a new block of cap elements (xmalloc exits when memory
// runs out, as everywhere in sft) and frees the old block.
static void *grow(void *old, size_t n, size_t cap, size_t size) {
    void *p = xmalloc(cap * size);
    if (n) memcpy(p, old, n * size);
    free(old);
    return p;
}

static void builder_push(Builder *b, int with_keys) {
    if (b->len < b->cap) return;
    size_t cap = b->cap ? b->cap * 2 : 4;
    b->items = grow(b->items, b->len, cap, sizeof *b->items);
    if (with_keys) {
        b->keys = grow(b->keys, b->len, cap, sizeof *b->keys);
        b->key_lens = grow(b->key_lens, b->len, cap, sizeof *b->key_lens);
        b->key_ats = grow(b->key_ats, b->len, cap, sizeof *b->key_ats);
        b->key_hashes = grow(b->key_hashes, b->len, cap, sizeof *b->key_hashes);
    }
    b->cap = cap;
}

// Moves the builder's arrays into out (shrunk to size), or frees them when failed.
static int builder_finish(Builder *b, Json *out, int failed) {
    free(b->key_ats);
    free(b->key_hashes);
    if (failed) {
        Json tmp = {.type = b->keys ? JSON_OBJECT : JSON_ARRAY, .len = b->len, .items = b->items, .keys = b->keys, .key_lens = b->key_lens};
        json_free(&tmp);
        return -1;
    }
    out->len = b->len;
    out->items = b->items;
    out->keys = b->keys;
    out->key_lens = b->key_lens;
    return 0;
}

// Parses '[' values ']' or '{' "key": value '}' starting at p->s[p->i].
static int parse_container(Parser *p, Json *out, int depth) {
    int is_obj = p->s[p->i] == '{';
    unsigned char close = is_obj ? '}' : ']';
    size_t open_at = p->i++;
    if (depth >= JSON_MAX_DEPTH) return fail_at(p, open_at, "nesting deeper than 256");
    out->type = is_obj ? JSON_OBJECT : JSON_ARRAY;
    Builder b = {0};
    skip_ws(p);
    if (p->i < p->n && p->s[p->i] == close) {
        p->i++;
        return builder_finish(&b, out, 0);
    }
    for (;;) {
        builder_push(&b, is_obj);
        if (is_obj) {
            skip_ws(p);
            if (p->i >= p->n || p->s[p->i] != '"') return builder_finish(&b, out, fail_at(p, p->i, "object key (a string) expected"));
            b.key_ats[b.len] = p->i;
            if (b.len >= UINT32_MAX) return builder_finish(&b, out, fail_at(p, p->i, "more than 4294967295 keys in one object"));
            if (parse_string(p, &b.keys[b.len], &b.key_lens[b.len]) < 0) return builder_finish(&b, out, 1);
            b.key_hashes[b.len] = key_hash(b.keys[b.len], b.key_lens[b.len]);
            if (b.len < KEYS_LINEAR && key_seen_linear(&b)) {
                fail_duplicate(p, &b, b.len);
                free(b.keys[b.len]);
                return builder_finish(&b, out, 1);
            }
            skip_ws(p);
            if (p->i >= p->n || p->s[p->i] != ':') {
                free(b.keys[b.len]);
                return builder_finish(&b, out, fail_at(p, p->i, "':' expected after object key"));
            }
            p->i++;
        }
        memset(&b.items[b.len], 0, sizeof b.items[b.len]);
        if (parse_value(p, &b.items[b.len], depth + 1) < 0) {
            if (is_obj) free(b.keys[b.len]);
            return builder_finish(&b, out, 1);
        }
        b.len++;
        skip_ws(p);
        if (p->i < p->n && p->s[p->i] == ',') {
            p->i++;
            continue;
        }
        if (p->i < p->n && p->s[p->i] == close) {
            p->i++;
            size_t dup = is_obj && b.len > KEYS_LINEAR ? first_duplicate(&b) : SIZE_MAX;
            return builder_finish(&b, out, dup == SIZE_MAX ? 0 : fail_duplicate(p, &b, dup));
        }
        if (p->i >= p->n) return builder_finish(&b, out, fail_at(p, open_at, is_obj ? "unterminated object" : "unterminated array"));
        return builder_finish(&b, out, fail_at(p, p->i, is_obj ? "',' or '}' expected" : "',' or ']' expected"));
    }
}

static int match_word(Parser *p, const char *w) {
    size_t n = strlen(w);
    if (p->n - p->i < n || memcmp(p->s + p->i, w, n) != 0) return 0;
    p->i += n;
    return 1;
}

static int parse_value(Parser *p, Json *out, int depth) {
    skip_ws(p);
    if (p->i >= p->n) return fail_at(p, p->i, "value expected, found the end of the text");
    unsigned char c = p->s[p->i];
    if (c == '{' || c == '[') return parse_container(p, out, depth);
    if (c == '"') {
        out->type = JSON_STRING;
        return parse_string(p, &out->str, &out->len);
    }
    if (c == '-' || is_digit(c)) {
        out->type = JSON_NUMBER;
        return parse_number(p, &out->number);
    }
    if (match_word(p, "true")) {
        out->type = JSON_BOOL;
        out->boolean = 1;
        return 0;
    }
    if (match_word(p, "false")) {
        out->type = JSON_BOOL;
        return 0;
    }
    if (match_word(p, "null")) {
        out->type = JSON_NULL;
        return 0;
    }
    return fail_at(p, p->i, "unexpected character, value expected");
}

int json_parse(Json *out, const char *text, size_t len, Err *e) {
    memset(out, 0, sizeof *out);
    Parser p = {(const unsigned char *)text, len, 0, e};
    if (len >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0) p.i = 3;
    if (parse_value(&p, out, 0) < 0) {
        memset(out, 0, sizeof *out);
        return -1;
    }
    skip_ws(&p);
    if (p.i < p.n) {
        json_free(out);
        return fail_at(&p, p.i, "trailing characters after the JSON value");
    }
    return 0;
}

void json_free(Json *j) {
    if (!j) return;
    if (j->type == JSON_STRING) free(j->str);
    if (j->type == JSON_ARRAY || j->type == JSON_OBJECT) {
        for (size_t k = 0; k < j->len; k++) {
            json_free(&j->items[k]);
            if (j->keys) free(j->keys[k]);
        }
        free(j->items);
        free(j->keys);
        free(j->key_lens);
    }
    memset(j, 0, sizeof *j);
}

const Json *json_get(const Json *j, const char *key) {
    if (!j || j->type != JSON_OBJECT) return NULL;
    size_t n = strlen(key);
    for (size_t k = 0; k < j->len; k++)
        if (j->key_lens[k] == n && memcmp(j->keys[k], key, n) == 0) return &j->items[k];
    return NULL;
}

void json_write_string(FILE *f, const char *s, size_t len) {
    const unsigned char *u = (const unsigned char *)s;
    fputc('"', f);
    for (size_t i = 0; i < len;) {
        unsigned char c = u[i];
        if (c == '"' || c == '\\') {
            fputc('\\', f);
            fputc(c, f);
        } else if (c == '\n') {
            fputs("\\n", f);
        } else if (c == '\r') {
            fputs("\\r", f);
        } else if (c == '\t') {
            fputs("\\t", f);
        } else if (c == '\b') {
            fputs("\\b", f);
        } else if (c == '\f') {
            fputs("\\f", f);
        } else if (c < 0x20 || c == 0x7F) {
            fprintf(f, "\\u%04x", c);
        } else if (c >= 0x80) {
            size_t w = utf8_valid_len(u + i, len - i);
            if (w == 0) {
                fputs("\\ufffd", f);  // invalid UTF-8 byte: written as U+FFFD so the output stays JSON
                i++;
                continue;
            }
            fwrite(u + i, 1, w, f);
            i += w;
            continue;
        } else {
            fputc(c, f);
        }
        i++;
    }
    fputc('"', f);
}
