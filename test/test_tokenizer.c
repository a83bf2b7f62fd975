// test_tokenizer.c: the tokenizer against Hugging Face's ids and against hand-made expectations.
//   - qwen2.inp/.out: 46 texts with the ids of Hugging Face's Qwen2 tokenizer (llama.cpp's tests);
//   - corpus.inp/.out/.nfc: 44 texts (scripts, emoji, NFD, code, CRLF, special tokens, a 20 KB
//     document) with the ids of @lenml/tokenizers and their NFC (make_expected.js, run by hand);
//   - random.inp/.out: 300 random strings (marks, jamo, Thai, emoji, special tokens) and their ids;
//   - nfc_tests.txt: NFC cases of the Unicode Consortium's NormalizationTest.txt;
//   - a small hand-built vocabulary whose BPE merges are worked out by hand;
//   - U+FFFD replacement and the streaming decoder against hand-written bytes;
//   - bad tokenizer files give errors; the command line, GGUF included.
// The Qwen2.5 tokenizer (data/tokenizer.json) is loaded once.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../common.h"
#include "../tokenizer.h"
#include "test.h"

#define SEP "\n__ggml_vocab_test__\n"

// Texts of a file in llama.cpp's test format: pieces separated by SEP, the last one empty.
typedef struct {
    char *buf;
    char **text;  // [n] pointers into buf
    size_t *len;  // [n]
    int n;
} Texts;

static int texts_read(Texts *t, const char *path) {
    Err e;
    size_t len;
    memset(t, 0, sizeof *t);
    t->buf = read_file(path, &len, &e);
    if (!t->buf) return -1;
    t->text = xmalloc(sizeof(char *) * 256);
    t->len = xmalloc(sizeof(size_t) * 256);
    for (char *p = t->buf, *q; (q = strstr(p, SEP)) != NULL && t->n < 256; p = q + strlen(SEP)) {
        t->text[t->n] = p;
        t->len[t->n++] = (size_t)(q - p);
    }
    return 0;
}

static void texts_free(Texts *t) {
    free(t->buf);
    free(t->text);
    free(t->len);
}

// Compares the ids of each text with the lines of `out` (" id id ..."). Returns the mismatches.
static int check_ids_file(const Tokenizer *tok, const char *name, const char *inp, const char *out) {
    Texts t;
    Err e;
    size_t len;
    char *want = read_file(out, &len, &e);
    if (texts_read(&t, inp) != 0 || !want) {
        check(0, name, "cannot read %s / %s", inp, out);
        free(want);
        return 1;
    }
    int bad = 0, shown = 0;
    char *line = want;
    for (int k = 0; k < t.n; k++) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        int *ids;
        int n = tokenizer_encode(tok, t.text[k], t.len[k], &ids, &e);
        char *got = xmalloc(12 * (size_t)(n > 0 ? n : 0) + 1);
        size_t at = 0;
        got[0] = 0;
        for (int i = 0; i < n; i++) at += (size_t)sprintf(got + at, " %d", ids[i]);
        if (n < 0 || strcmp(got, line) != 0) {
            bad++;
            if (shown++ < 3) printf("    text %d '%.60s': got '%.200s', want '%.200s'\n", k, t.text[k], got, line);
        }
        free(got);
        free(ids);
        line = nl ? nl + 1 : line + strlen(line);
    }
    check(bad == 0 && t.n > 0, name, "%d of %d texts differ", bad, t.n);
    texts_free(&t);
    free(want);
    return bad;
}

// decode(encode(text)) must be the NFC form of the text, given by `nfc` (same format).
static void check_round_trip(const Tokenizer *tok, const char *name, const char *inp, const char *nfc) {
    Texts a, b;
    Err e;
    if (texts_read(&a, inp) != 0 || texts_read(&b, nfc) != 0 || a.n != b.n) {
        check(0, name, "cannot read %s / %s", inp, nfc);
        return;
    }
    int bad = 0;
    for (int k = 0; k < a.n; k++) {
        int *ids;
        int n = tokenizer_encode(tok, a.text[k], a.len[k], &ids, &e);
        char *d = tokenizer_decode(tok, ids, n);
        if (n < 0 || strlen(d) != b.len[k] || memcmp(d, b.text[k], b.len[k]) != 0) {
            if (bad++ < 3) printf("    text %d: decoded '%.80s', want '%.80s'\n", k, d, b.text[k]);
        }
        free(d);
        free(ids);
    }
    check(bad == 0, name, "%d of %d texts differ", bad, a.n);
    texts_free(&a);
    texts_free(&b);
}

// Hex code points "0041 030A" to UTF-8 in out; returns the length.
static size_t hex_to_utf8(char *out, const char *hex) {
    size_t n = 0;
    char *end;
    for (const char *p = hex;; p = end) {
        unsigned long cp = strtoul(p, &end, 16);
        if (end == p) break;
        unsigned char *o = (unsigned char *)out + n;
        if (cp < 0x80) o[0] = (unsigned char)cp, n += 1;
        else if (cp < 0x800) o[0] = (unsigned char)(0xC0 | (cp >> 6)), o[1] = (unsigned char)(0x80 | (cp & 0x3F)), n += 2;
        else if (cp < 0x10000) o[0] = (unsigned char)(0xE0 | (cp >> 12)), o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F)), o[2] = (unsigned char)(0x80 | (cp & 0x3F)), n += 3;
        else o[0] = (unsigned char)(0xF0 | (cp >> 18)), o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F)), o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F)), o[3] = (unsigned char)(0x80 | (cp & 0x3F)), n += 4;
    }
    out[n] = 0;
    return n;
}

static void test_nfc_conformance(void) {
    Err e;
    size_t len;
    char *text = read_file("test/tokenizer/nfc_tests.txt", &len, &e);
    if (!text) {
        check(0, "NFC: NormalizationTest cases", "%s", e.msg);
        return;
    }
    int n = 0, bad = 0;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        if (line[0] == '#') continue;
        char *semi = strchr(line, ';');
        if (!semi) continue;
        *semi = 0;
        char src[256], want[256];
        size_t ns = hex_to_utf8(src, line), nw = hex_to_utf8(want, semi + 1), got_len, again_len;
        char *got = tokenizer_nfc(src, ns, &got_len), *again = tokenizer_nfc(want, nw, &again_len);
        if (got_len != nw || memcmp(got, want, nw) != 0 || again_len != nw || memcmp(again, want, nw) != 0)
            if (bad++ < 3) printf("    NFC(%s) differs from %s\n", line, semi + 1);
        free(got);
        free(again);
        n++;
    }
    check(bad == 0 && n > 3000, "NFC: NormalizationTest.txt cases (and NFC of NFC)", "%d of %d differ", bad, n);
    free(text);
}

// ---------------------------------------------------------------------------------------------
// A hand-built vocabulary: ids 0..255 are the byte-level characters of bytes 0..255, then
// 256 "aa", 257 "aaa", 258 "ab", 259 "Ġa", and 260 "<s>" (a control token).

static char **small_vocab(void) {
    char **v = xmalloc(sizeof(char *) * 261);
    for (unsigned b = 0; b < 256; b++) {
        // GPT-2's byte-level map, written out: printable bytes stand for themselves.
        unsigned cp = b;
        if (b <= 0x20) cp = 256 + b;
        else if (b >= 0x7F && b <= 0xA0) cp = 256 + 33 + (b - 0x7F);
        else if (b == 0xAD) cp = 256 + 67;
        char *s = xmalloc(4);
        if (cp < 0x80) s[0] = (char)cp, s[1] = 0;
        else s[0] = (char)(0xC0 | (cp >> 6)), s[1] = (char)(0x80 | (cp & 0x3F)), s[2] = 0;
        v[b] = s;
    }
    v[256] = xstrdup("aa");
    v[257] = xstrdup("aaa");
    v[258] = xstrdup("ab");
    v[259] = xstrdup("\xC4\xA0" "a");  // "Ġa"
    v[260] = xstrdup("<s>");
    return v;
}

static void free_vocab(char **v, int n) {
    for (int k = 0; k < n; k++) free(v[k]);
    free(v);
}

static int ids_equal(const Tokenizer *tok, const char *text, const int *want, int n_want) {
    int *ids;
    Err e;
    int n = tokenizer_encode(tok, text, strlen(text), &ids, &e);
    int ok = n == n_want && (n == 0 || memcmp(ids, want, sizeof(int) * (size_t)n) == 0);
    if (!ok) {
        printf("    '%s':", text);
        for (int k = 0; k < n; k++) printf(" %d", ids[k]);
        printf("\n");
    }
    free(ids);
    return ok;
}

static void test_small_vocab(void) {
    char **v = small_vocab();
    int types[261];
    for (int k = 0; k < 261; k++) types[k] = TOKEN_NORMAL;
    types[260] = TOKEN_CONTROL;
    char *merges[] = {"a a", "aa a", "a b", "\xC4\xA0 a"};
    Tokenizer tok;
    Err e;
    int rc = tokenizer_build(&tok, "small", v, types, 261, merges, 4, &e);
    check(rc == 0 && tok.n_vocab == 261 && tok.n_merges == 4, "tokenizer_build: small vocabulary", "%s", rc ? e.msg : "");
    if (rc == 0) {
        // "aaab": (a,a) at 0 merges first (rank 0), then (aa,a) (rank 1); the stale (a,a) at 1 and
        // (a,b) at 2 are skipped. " aab": (a,a) (rank 0) beats (Ġ,a) (rank 3), which goes stale.
        check(ids_equal(&tok, "aaab", (int[]){257, 'b'}, 2), "BPE by rank: aaab -> aaa b", "see above");
        check(ids_equal(&tok, " aab", (int[]){' ', 256, 'b'}, 3), "BPE by rank: ' aab' -> Ġ aa b", "see above");
        check(ids_equal(&tok, " ab", (int[]){' ', 258}, 2), "BPE by rank: ' ab' -> Ġ ab", "see above");
        check(ids_equal(&tok, "aaaa", (int[]){256, 256}, 2), "BPE leftmost first: aaaa -> aa aa", "see above");
        check(ids_equal(&tok, "a<s>b<s", (int[]){'a', 260, 'b', '<', 's'}, 5), "control token inside text", "see above");
        check(tok.eos_id == -1 && tok.pad_id == -1 && tokenizer_token_id(&tok, "<s>") == 260, "no <|im_end|>: eos -1",
              "eos %d pad %d", tok.eos_id, tok.pad_id);
        tokenizer_free(&tok);
    }
    char *bad_merge[] = {"a c"};
    rc = tokenizer_build(&tok, "small", v, types, 261, bad_merge, 1, &e);
    check(rc < 0 && strstr(e.msg, "merge 0"), "build rejects merge whose result is unknown", "rc %d '%s'", rc, e.msg);
    char *bad_merge2[] = {"a zz"};
    rc = tokenizer_build(&tok, "small", v, types, 261, bad_merge2, 1, &e);
    check(rc < 0 && strstr(e.msg, "'zz'"), "build rejects merge naming an unknown token", "rc %d '%s'", rc, e.msg);
    char *bad_merge3[] = {"ab"};
    rc = tokenizer_build(&tok, "small", v, types, 261, bad_merge3, 1, &e);
    check(rc < 0 && strstr(e.msg, "one space"), "build rejects merge without a space", "rc %d '%s'", rc, e.msg);
    types[5] = 9;
    rc = tokenizer_build(&tok, "small", v, types, 261, merges, 4, &e);
    check(rc < 0 && strstr(e.msg, "type 9"), "build rejects unknown token type", "rc %d '%s'", rc, e.msg);
    types[5] = TOKEN_NORMAL;
    char *keep = v[257];
    v[257] = xstrdup("aa");
    rc = tokenizer_build(&tok, "small", v, types, 261, merges, 4, &e);
    check(rc < 0 && strstr(e.msg, "duplicate token 'aa' (ids 256 and 257)"), "build rejects duplicate token", "rc %d '%s'", rc, e.msg);
    free(v[257]);
    v[257] = xstrdup("a\xFF");
    rc = tokenizer_build(&tok, "small", v, types, 261, merges, 4, &e);
    check(rc < 0 && strstr(e.msg, "not valid UTF-8"), "build rejects non-UTF-8 token", "rc %d '%s'", rc, e.msg);
    free(v[257]);
    v[257] = keep;
    free_vocab(v, 261);
}

// Writes text to DIR/name and loads it as a tokenizer; returns tokenizer_load's status.
static int load_text(const char *dir, const char *name, const char *text, Err *e) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) return err_set(e, "cannot write %s", path);
    fputs(text, f);
    fclose(f);
    Tokenizer tok;
    int rc = tokenizer_load(&tok, path, e);
    if (rc == 0) tokenizer_free(&tok);
    return rc;
}

static void test_bad_files(void) {
    const char *dir = scratch_dir("tokenizer");
    Err e;
    struct {
        const char *name, *json, *want;
    } cases[] = {
        {"bad JSON", "{\"model\": {\"vocab\": {\"a\": 0,}}}", "line 1, column 29"},
        {"unknown merge token", "{\"model\": {\"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a c\"]}}", "merge 0 'a c'"},
        {"merged token missing", "{\"model\": {\"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [[\"a\", \"b\"]]}}", "not in the vocabulary"},
        {"duplicate token", "{\"model\": {\"vocab\": {\"a\": 0, \"b\": 1, \"a\": 2}, \"merges\": []}}", "line 1, column 38: duplicate key \"a\""},
        {"id given twice", "{\"model\": {\"vocab\": {\"a\": 0, \"b\": 0}, \"merges\": []}}", "id 0 is given to two tokens"},
        {"added token reusing an id", "{\"added_tokens\": [{\"id\": 1, \"content\": \"<x>\"}], \"model\": {\"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": []}}", "two tokens"},
        {"id out of range", "{\"model\": {\"vocab\": {\"a\": 0, \"b\": -1}, \"merges\": []}}", "model.vocab['b'] is not an id"},
        {"huge id", "{\"model\": {\"vocab\": {\"a\": 0, \"b\": 1e12}, \"merges\": []}}", "is not an id"},
        {"fractional id", "{\"model\": {\"vocab\": {\"a\": 0.5}, \"merges\": []}}", "is not an id"},
        {"gap in ids", "{\"model\": {\"vocab\": {\"a\": 0, \"b\": 2}, \"merges\": []}}", "token id 1 has no token"},
        {"bad merge form", "{\"model\": {\"vocab\": {\"a\": 0}, \"merges\": [\"a a a\"]}}", "model.merges[0]"},
        {"bad merge pair", "{\"model\": {\"vocab\": {\"a\": 0}, \"merges\": [[\"a\"]]}}", "model.merges[0]"},
        {"not BPE", "{\"model\": {\"type\": \"Unigram\", \"vocab\": {\"a\": 0}, \"merges\": []}}", "not \"BPE\""},
        {"no vocab", "{\"model\": {\"merges\": []}}", "no model.vocab"},
        {"empty vocab", "{\"model\": {\"vocab\": {}, \"merges\": []}}", "empty"},
        {"NUL in token", "{\"model\": {\"vocab\": {\"a\\u0000b\": 0}, \"merges\": []}}", "NUL"},
        {"lone surrogate", "{\"model\": {\"vocab\": {\"\\ud800\": 0}, \"merges\": []}}", "surrogate"},
        {"not an object", "[1, 2]", "not a JSON object"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        char name[128];
        snprintf(name, sizeof name, "tokenizer.json rejected: %s", cases[k].name);
        e.msg[0] = 0;
        int rc = load_text(dir, "tokenizer.json", cases[k].json, &e);
        check(rc < 0 && strstr(e.msg, cases[k].want) && strstr(e.msg, "tokenizer.json"), name, "rc %d '%s'", rc, e.msg);
    }
    int rc = load_text(dir, "tokenizer.json",
                       "{\"added_tokens\": [{\"id\": 2, \"content\": \"ab\", \"special\": true}],"
                       " \"model\": {\"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [[\"a\", \"b\"]]}}", &e);
    check(rc == 0, "tokenizer.json accepted: pair-form merges, added token repeating its vocab entry", "'%s'", e.msg);
    Tokenizer tok;
    rc = tokenizer_load(&tok, dir, &e);  // the directory holding tokenizer.json
    check(rc == 0 && tok.n_vocab == 3 && tok.token_type[2] == TOKEN_CONTROL, "tokenizer_load of a directory", "'%s'", e.msg);
    if (rc == 0) tokenizer_free(&tok);
    // model.ignore_merges: a pre-token that is a whole token wins over the merges.
    const char *vocab = "\"vocab\": {\"a\": 0, \"b\": 1, \"c\": 2, \"bc\": 3, \"abc\": 4}, \"merges\": [\"b c\"]";
    for (int ignore = 0; ignore < 2; ignore++) {
        char json[512], path[512];
        snprintf(json, sizeof json, "{\"model\": {\"ignore_merges\": %s, %s}}", ignore ? "true" : "false", vocab);
        snprintf(path, sizeof path, "%s/ignore.json", dir);
        FILE *f = fopen(path, "wb");
        if (f) fputs(json, f), fclose(f);
        rc = tokenizer_load(&tok, path, &e);
        int *ids = NULL, n = rc == 0 ? tokenizer_encode(&tok, "abc", 3, &ids, &e) : -1;
        int ok = ignore ? (n == 1 && ids[0] == 4) : (n == 2 && ids[0] == 0 && ids[1] == 3);
        check(ok, ignore ? "ignore_merges true: abc -> abc" : "ignore_merges false: abc -> a bc", "rc %d n %d", rc, n);
        free(ids);
        if (rc == 0) tokenizer_free(&tok);
    }
    rc = tokenizer_load(&tok, "test/tmp/no-such-file.json", &e);
    check(rc < 0 && strstr(e.msg, "no-such-file.json"), "tokenizer_load of a missing file", "'%s'", e.msg);
}

// ---------------------------------------------------------------------------------------------
// Decoding: U+FFFD as Rust's String::from_utf8_lossy, and the streaming decoder.

// Id of the byte-level token of one raw byte in Qwen2's vocabulary.
static int byte_token(const Tokenizer *tok, unsigned b) {
    unsigned cp = b <= 0x20 ? 256 + b : (b >= 0x7F && b <= 0xA0) ? 256 + 33 + (b - 0x7F) : b == 0xAD ? 256 + 67 : b;
    char s[4] = {0};
    if (cp < 0x80) s[0] = (char)cp;
    else s[0] = (char)(0xC0 | (cp >> 6)), s[1] = (char)(0x80 | (cp & 0x3F));
    return tokenizer_token_id(tok, s);
}

// Decodes the byte tokens of raw[0..n) and compares with want.
static void check_lossy(const Tokenizer *tok, const char *name, const char *raw, size_t n, const char *want) {
    int ids[16];
    for (size_t k = 0; k < n; k++) ids[k] = byte_token(tok, (unsigned char)raw[k]);
    char *got = tokenizer_decode(tok, ids, (int)n);
    check(strcmp(got, want) == 0, name, "got '%s' want '%s'", got, want);
    // The stream gives the same bytes, whatever the split.
    DecodeStream ds = {0};
    char out[512], piece[256];
    size_t at = 0;
    for (size_t k = 0; k < n; k++) {
        int w = decode_stream_push(&ds, tok, ids[k], piece, sizeof piece);
        memcpy(out + at, piece, (size_t)w);
        at += (size_t)w;
    }
    at += (size_t)decode_stream_flush(&ds, out + at, (int)(sizeof out - at));
    out[at] = 0;
    char sname[160];
    snprintf(sname, sizeof sname, "%s (stream)", name);
    check(strcmp(out, want) == 0, sname, "got '%s' want '%s'", out, want);
    free(got);
}

#define FFFD "\xEF\xBF\xBD"

static void test_decode(const Tokenizer *tok) {
    check_lossy(tok, "decode: valid 3-byte character", "\xE4\xB8\xAD", 3, "\xE4\xB8\xAD");
    check_lossy(tok, "decode: truncated 3-byte sequence then ASCII", "\xE2\x82" "A", 3, FFFD "A");
    check_lossy(tok, "decode: truncated 4-byte sequence at the end", "\xF0\x9F\x98", 3, FFFD);
    check_lossy(tok, "decode: overlong C0 80", "\xC0\x80", 2, FFFD FFFD);
    check_lossy(tok, "decode: surrogate ED A0 80", "\xED\xA0\x80", 3, FFFD FFFD FFFD);
    check_lossy(tok, "decode: past U+10FFFF", "\xF4\x90\x80\x80", 4, FFFD FFFD FFFD FFFD);
    check_lossy(tok, "decode: lone continuation bytes", "a\x80\xBF" "b", 4, "a" FFFD FFFD "b");
    check_lossy(tok, "decode: FF and FE", "\xFF\xFE", 2, FFFD FFFD);
    check_lossy(tok, "decode: E0 then bad second byte", "\xE0\x80\x80", 3, FFFD FFFD FFFD);

    // The stream never emits half a character: "中文😀" pushed byte token by byte token.
    const char *text = "\xE4\xB8\xAD\xE6\x96\x87\xF0\x9F\x98\x80";
    int emitted[10];
    DecodeStream ds = {0};
    char piece[256];
    for (int k = 0; k < 10; k++) emitted[k] = decode_stream_push(&ds, tok, byte_token(tok, (unsigned char)text[k]), piece, sizeof piece);
    int want[10] = {0, 0, 3, 0, 0, 3, 0, 0, 0, 4};
    check(memcmp(emitted, want, sizeof want) == 0 && decode_stream_flush(&ds, piece, sizeof piece) == 0,
          "decode stream: whole characters only", "emitted %d %d %d ... %d", emitted[0], emitted[1], emitted[2], emitted[9]);

    // Whole tokens of a real text: each piece is valid UTF-8 and the pieces add up to decode().
    const char *s = "Hello 世界! 東京だぬ。 👨‍👩‍👧 é <|im_end|>";
    int *ids;
    Err e;
    int n = tokenizer_encode(tok, s, strlen(s), &ids, &e);
    char all[512];
    size_t at = 0;
    memset(&ds, 0, sizeof ds);
    for (int k = 0; k < n; k++) at += (size_t)decode_stream_push(&ds, tok, ids[k], all + at, (int)(sizeof all - at));
    at += (size_t)decode_stream_flush(&ds, all + at, (int)(sizeof all - at));
    all[at] = 0;
    char *d = tokenizer_decode(tok, ids, n);
    check(strcmp(all, d) == 0 && strcmp(d, s) == 0, "decode stream of real tokens == decode == text", "'%s' / '%s'", all, d);
    int bad_ids[] = {-5, 9707, 1 << 30};
    char *skip = tokenizer_decode(tok, bad_ids, 3);
    check(strcmp(skip, "Hello") == 0, "decode skips ids out of range", "'%s'", skip);
    free(skip);
    free(d);
    free(ids);
}

// ---------------------------------------------------------------------------------------------

static void test_qwen_basics(const Tokenizer *tok) {
    check(tok->n_vocab == 151665 && tok->n_merges == 151387, "qwen: vocab and merge counts", "%d, %d", tok->n_vocab, tok->n_merges);
    check(tok->eos_id == 151645 && tok->pad_id == 151643 && tok->im_start_id == 151644 && tok->im_end_id == 151645 &&
              tok->endoftext_id == 151643,
          "qwen: eos = <|im_end|>, pad = <|endoftext|>", "eos %d pad %d", tok->eos_id, tok->pad_id);
    check(strcmp(tok->vocab[220], "\xC4\xA0") == 0 && strcmp(tok->vocab[0], "!") == 0 && strcmp(tok->merges[0], "\xC4\xA0 \xC4\xA0") == 0 &&
              tok->token_type[151644] == TOKEN_CONTROL && tok->token_type[100] == TOKEN_NORMAL,
          "qwen: vocab strings, merges, token types", "vocab[220] '%s'", tok->vocab[220]);
    check(tokenizer_token_id(tok, "<|im_end|>") == 151645 && tokenizer_token_id(tok, "Hello") == 9707 &&
              tokenizer_token_id(tok, "no such token!") == -1,
          "qwen: tokenizer_token_id", "%d", tokenizer_token_id(tok, "Hello"));
    check(ids_equal(tok, "<|im_start|>user\nHi<|im_end|>", (int[]){151644, 872, 198, 13048, 151645}, 5), "qwen: chat markup ids", "see above");
    check(ids_equal(tok, "", NULL, 0), "qwen: empty text gives no ids", "see above");
    // (?i:'s) also matches 'ſ (U+017F folds to s, in Oniguruma as in the regex crate), so
    // "x'ſome" is "x" "'ſ" "ome" (the JavaScript reference keeps "'ſome" whole: not in the corpus).
    int *a, *b, *c;
    Err e0;
    int na = tokenizer_encode(tok, "x'\xC5\xBFome", 7, &a, &e0), nb = tokenizer_encode(tok, "x'\xC5\xBF", 4, &b, &e0);
    int nc = tokenizer_encode(tok, "ome", 3, &c, &e0);
    check(na == nb + nc && memcmp(a, b, sizeof(int) * (size_t)nb) == 0 && memcmp(a + nb, c, sizeof(int) * (size_t)nc) == 0,
          "qwen: 'ſ is a contraction", "%d ids vs %d + %d", na, nb, nc);
    free(a), free(b), free(c);
    int *ids;
    Err e;
    int n = tokenizer_encode(tok, "ok\xC3(", 4, &ids, &e);
    check(n < 0 && strstr(e.msg, "UTF-8") && ids == NULL, "qwen: invalid UTF-8 text is an error", "n %d '%s'", n, e.msg);
}


static void test_long_word(const Tokenizer *tok) {
    // A 100 KB word without spaces (pseudo-random letters): BPE must not be quadratic.
    size_t n = 100000;
    char *w = xmalloc(n + 1);
    uint64_t state = 7;
    for (size_t k = 0; k < n; k++) w[k] = (char)('a' + rng_next(&state) % 10);
    w[n] = 0;
    int *ids;
    Err e;
    double t0 = now_seconds();
    int m = tokenizer_encode(tok, w, n, &ids, &e);
    double dt = now_seconds() - t0;
    char *d = tokenizer_decode(tok, ids, m);
    // Not a speed test (make bench measures speed): quadratic merging would take minutes here,
    // the heap takes milliseconds, so a 30 s bound separates them on any machine or sanitizer.
    check(m > 0 && dt < 30 && strcmp(d, w) == 0, "qwen: 100 KB word is not quadratic, decodes back", "%d ids in %.3f s", m, dt);
    free(d), free(ids), free(w);
}

// sft tokenize, with tokenizer.json, a directory and a GGUF file that sft init writes.
static void test_tokenize_cli(void) {
    char cmd[1024], *out = NULL;
    const char *sft = sft_binary(), *dir = scratch_dir("tokenizer_cli");
    snprintf(cmd, sizeof cmd, "%s tokenize --tokenizer data/tokenizer.json 'Hello, world! <|im_start|>東京だぬ。'", sft);
    int rc = run_command(cmd, &out);
    check(rc == 0 && out && strcmp(out, "9707 11 1879 0 220 151644 102356 46553 35685 133300 1773\n") == 0, "cli: tokenize TEXT", "rc %d out '%s'", rc, out ? out : "");
    free(out), out = NULL;
    snprintf(cmd, sizeof cmd, "%s tokenize --tokenizer data --decode '9707, 11 1879 0 220 151644 102356 46553 35685 133300 1773'", sft);
    rc = run_command(cmd, &out);
    check(rc == 0 && out && strcmp(out, "Hello, world! <|im_start|>東京だぬ。\n") == 0, "cli: --decode with a directory", "rc %d out '%s'", rc, out ? out : "");
    free(out), out = NULL;
    snprintf(cmd, sizeof cmd, "printf 'a\\r\\n\\tb' > %s/t.txt && %s tokenize --tokenizer data/tokenizer.json --file %s/t.txt", dir, sft, dir);
    rc = run_command(cmd, &out);
    check(rc == 0 && out && strcmp(out, "64 319 2233\n") == 0, "cli: --file keeps CR, LF and tabs", "rc %d out '%s'", rc, out ? out : "");
    free(out), out = NULL;
    snprintf(cmd, sizeof cmd, "printf '{\"model\": [' > %s/bad.json && %s tokenize --tokenizer %s/bad.json hi", dir, sft, dir);
    rc = run_command(cmd, NULL);
    check(rc == 1, "cli: bad tokenizer file exits 1", "rc %d", rc);
    snprintf(cmd, sizeof cmd, "%s tokenize --tokenizer data --decode '1 2 999999'", sft);
    rc = run_command(cmd, NULL);
    check(rc == 1, "cli: id out of range exits 1", "rc %d", rc);
    snprintf(cmd, sizeof cmd, "%s init --config tiny --tokenizer data/tokenizer.json --out %s/tiny.gguf && "
             "%s tokenize --tokenizer %s/tiny.gguf 'Hello, world! <|im_start|>東京だぬ。'", sft, dir, sft, dir);
    rc = run_command(cmd, &out);
    check(rc == 0 && out && strcmp(out, "9707 11 1879 0 220 151644 102356 46553 35685 133300 1773\n") == 0, "cli: tokenizer of a GGUF file", "rc %d out '%s'", rc, out ? out : "");
    free(out);
}

void test_tokenizer(void) {
    Tokenizer tok;
    Err e;
    int rc = tokenizer_load(&tok, "data/tokenizer.json", &e);
    check(rc == 0, "qwen: load data/tokenizer.json", "%s", e.msg);
    if (rc != 0) return;
    test_qwen_basics(&tok);
    check_ids_file(&tok, "qwen: Hugging Face's ids for the 46 llama.cpp texts", "test/tokenizer/qwen2.inp", "test/tokenizer/qwen2.out");
    check_ids_file(&tok, "qwen: reference ids for the 44 corpus texts", "test/tokenizer/corpus.inp", "test/tokenizer/corpus.out");
    check_ids_file(&tok, "qwen: reference ids for 300 random texts", "test/tokenizer/random.inp", "test/tokenizer/random.out");
    check_round_trip(&tok, "qwen: decode(encode(x)) == NFC(x), corpus", "test/tokenizer/corpus.inp", "test/tokenizer/corpus.nfc");
    check_round_trip(&tok, "qwen: decode(encode(x)) == x, llama.cpp texts", "test/tokenizer/qwen2.inp", "test/tokenizer/qwen2.inp");
    test_decode(&tok);
    test_long_word(&tok);
    tokenizer_free(&tok);
    test_nfc_conformance();
    test_small_vocab();
    test_bad_files();
    test_tokenize_cli();
}
