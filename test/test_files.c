// test_files.c: safetensors and GGUF containers, model files (model_load), sft init/quantize/info.
//
// Expectations are independent of the code under test where it matters: byte layouts written out
// by hand, files built byte by byte here, Hugging Face names mapped by a table of this file, and
// broken files that must each give an error (truncated at every byte, huge counts, bad offsets...).
// Models are tiny: the 259-token tokenizer of test/fixtures, hidden size 64.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../common.h"
#include "../gguf.h"
#include "../model.h"
#include "../modelfile.h"
#include "../quant.h"
#include "../safetensors.h"
#include "test.h"

#define FIXTURE_TOKENIZER "test/fixtures/tied/model"

// ---------------------------------------------------------------------------------------------
// Byte building

typedef struct {
    unsigned char *p;
    size_t n, cap;
} Buf;

static void put(Buf *b, const void *p, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
}
static void put_le(Buf *b, uint64_t v, int n) {
    unsigned char x[8];
    for (int i = 0; i < n; i++) x[i] = (unsigned char)(v >> (8 * i));
    put(b, x, (size_t)n);
}
static void put_str(Buf *b, const char *s) {
    put_le(b, strlen(s), 8);
    put(b, s, strlen(s));
}
static void put_pad(Buf *b, size_t align) {
    while (b->n % align) put_le(b, 0, 1);
}

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return;
    fwrite(p, 1, n, f);
    fclose(f);
}

static void write_text(const char *path, const char *s) { write_bytes(path, s, strlen(s)); }

// DIR/NAME in one of 8 static buffers used in turn: good for a call's arguments; paths kept
// longer are copied into a Path.
static const char *path_in(const char *dir, const char *name) {
    static char buf[8][600];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%.280s/%.280s", dir, name);
    return buf[k];
}

typedef struct {
    char s[600];
} Path;

static Path path_of(const char *dir, const char *name) {
    Path p;
    snprintf(p.s, sizeof p.s, "%.280s/%.280s", dir, name);
    return p;
}

static int contains(const char *s, const char *sub) { return s && strstr(s, sub) != NULL; }

// ---------------------------------------------------------------------------------------------
// safetensors

// |u64 len|header|data| as the format says, header padded with spaces to 8.
static Buf st_bytes(const char *header, const void *data, size_t n) {
    Buf b = {0};
    size_t len = (strlen(header) + 7) / 8 * 8;
    put_le(&b, len, 8);
    put(&b, header, strlen(header));
    for (size_t i = strlen(header); i < len; i++) put(&b, " ", 1);
    put(&b, data, n);
    return b;
}

static void test_st_write_bytes(const char *dir) {
    float a[2] = {1.0f, -2.0f};
    StTensor t = {.name = "a", .type = TYPE_F32, .n_dims = 1, .shape = {2}, .data = a};
    Err e;
    const char *path = path_in(dir, "w.safetensors");
    int rc = safetensors_write(path, &t, 1, "{\"format\":\"pt\"}", &e);
    size_t n = 0;
    char *got = read_file(path, &n, &e);
    const char *hdr = "{\"__metadata__\":{\"format\":\"pt\"},\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    Buf want = st_bytes(hdr, a, sizeof a);
    check(rc == 0 && got && n == want.n && memcmp(got, want.p, n) == 0, "safetensors_write bytes", "rc %d, %zu bytes (want %zu)", rc, n, want.n);
    free(got);
    free(want.p);
}

static void test_st_read(const char *dir) {
    // a: F16 [1, 2] = {1, -2}; b: BF16 [2] = {1.5, -0.25}; listed out of order.
    const unsigned char data[8] = {0x00, 0x3C, 0x00, 0xC0, 0xC0, 0x3F, 0x80, 0xBE};
    Buf b = st_bytes("{\"b\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[4,8]},"
                     "\"a\":{\"dtype\":\"F16\",\"shape\":[1,2],\"data_offsets\":[0,4]},\"__metadata__\":{\"k\":\"v\"}}",
                     data, sizeof data);
    const char *path = path_in(dir, "r.safetensors");
    write_bytes(path, b.p, b.n);
    free(b.p);
    StFile f;
    Err e;
    int rc = safetensors_open(&f, path, &e);
    check(rc == 0, "safetensors_open hand-made file", "%s", e.msg);
    if (rc != 0) return;
    const StTensor *ta = safetensors_find(&f, "a"), *tb = safetensors_find(&f, "b");
    check(f.n == 2 && f.tensors[0].name && strcmp(f.tensors[0].name, "a") == 0, "safetensors order by offset", "n %d", f.n);
    check(ta && ta->type == TYPE_F16 && ta->n_dims == 2 && ta->shape[0] == 1 && ta->shape[1] == 2 && ta->nbytes == 4,
          "safetensors F16 entry", "wrong");
    check(tb && tb->type == TYPE_BF16 && tb->n_dims == 1 && tb->shape[0] == 2 && tb->nbytes == 4, "safetensors BF16 entry", "wrong");
    float va[2], vb[2], wa[2] = {1, -2}, wb[2] = {1.5f, -0.25f};
    if (ta && tb) {
        dequantize_row(TYPE_F16, va, ta->data, 2);
        dequantize_row(TYPE_BF16, vb, tb->data, 2);
        check_close("safetensors F16 values", va, wa, 2, 0, 0);
        check_close("safetensors BF16 values", vb, wb, 2, 0, 0);
    }
    const char *m = safetensors_metadata(&f, "k");
    check(m && strcmp(m, "v") == 0 && !safetensors_metadata(&f, "x"), "safetensors __metadata__", "got %s", m ? m : "NULL");
    safetensors_close(&f);
}

static void st_expect_error(const char *dir, const char *name, const Buf *b, const char *want) {
    const char *path = path_in(dir, "bad.safetensors");
    write_bytes(path, b->p, b->n);
    StFile f;
    Err e = {{0}};
    int rc = safetensors_open(&f, path, &e);
    check(rc == -1 && contains(e.msg, path) && (!want || contains(e.msg, want)), name, "rc %d, message '%s'", rc, e.msg);
    if (rc == 0) safetensors_close(&f);
}

static void test_st_broken(const char *dir) {
    unsigned char d[16] = {0};
    struct {
        const char *name, *header, *want;
        size_t n;
    } cases[] = {
        {"st: header not JSON", "{\"a\":", "header", 8},
        {"st: header not an object", "[1]", "header", 0},
        {"st: unknown dtype", "{\"a\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}}", "I64", 8},
        {"st: shape/bytes mismatch", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", "need 8", 4},
        {"st: data past the end", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", "past the end", 8},
        {"st: overlap", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", "gaps", 12},
        {"st: gap", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", "gaps", 12},
        {"st: trailing data", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", "after the last", 8},
        {"st: duplicate name", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", "duplicate key \"a\"", 8},
        {"st: 5 dims", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1],\"data_offsets\":[0,4]}}", "shape", 4},
        {"st: negative dim", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", "dimension", 4},
        {"st: fractional dim", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", "dimension", 4},
        {"st: huge dims", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4503599627370496,4503599627370496],\"data_offsets\":[0,4]}}", "too large", 4},
        {"st: huge offsets", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[9007199254740988,9007199254740992]}}", "past the end", 4},
        {"st: reversed offsets", "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,0]}}", "begin <= end", 4},
        {"st: no data_offsets", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", "data_offsets", 4},
        {"st: metadata not strings", "{\"__metadata__\":{\"k\":1}}", "not a string", 0},
        {"st: bad UTF-8 name", "{\"\xff\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", NULL, 4},
        {"st: empty name", "{\"\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", "empty", 4},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        Buf b = st_bytes(cases[i].header, d, cases[i].n);
        st_expect_error(dir, cases[i].name, &b, cases[i].want);
        free(b.p);
    }
    Buf b = {0};
    put_le(&b, 1000, 8);
    put(&b, "{}", 2);
    st_expect_error(dir, "st: header length past the end", &b, "past the end");
    b.n = 0;
    put_le(&b, UINT64_MAX, 8);
    st_expect_error(dir, "st: header length 2^64-1", &b, "past the end");
    b.n = 3;
    st_expect_error(dir, "st: shorter than 8 bytes", &b, "too short");
    free(b.p);
    // Every proper prefix of a valid file is an error.
    float v[3] = {1, 2, 3};
    Buf ok = st_bytes("{\"__metadata__\":{\"a\":\"b\"},\"x\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]}}", v, sizeof v);
    int fails = 0;
    const char *path = path_in(dir, "cut.safetensors");
    for (size_t k = 0; k < ok.n; k++) {
        write_bytes(path, ok.p, k);
        StFile f;
        Err e;
        if (safetensors_open(&f, path, &e) == 0) fails++, safetensors_close(&f);
    }
    check(fails == 0, "st: every truncation is an error", "%d prefixes of %zu accepted", fails, ok.n);
    free(ok.p);
}

static void test_st_shards(const char *dir) {
    float a[2] = {1, 2}, b[3] = {3, 4, 5};
    StTensor ta[2] = {{.name = "a", .type = TYPE_F32, .n_dims = 1, .shape = {2}, .data = a},
                      {.name = "c", .type = TYPE_F32, .n_dims = 0, .data = b}};
    StTensor tb = {.name = "b", .type = TYPE_F32, .n_dims = 1, .shape = {3}, .data = b};
    Err e;
    safetensors_write(path_in(dir, "m-1.safetensors"), ta, 2, NULL, &e);
    safetensors_write(path_in(dir, "m-2.safetensors"), &tb, 1, NULL, &e);
    Path pindex = path_of(dir, "model.safetensors.index.json");
    const char *index = pindex.s;
    write_text(index, "{\"metadata\":{\"total_size\":20},\"weight_map\":{\"a\":\"m-1.safetensors\",\"b\":\"m-2.safetensors\",\"c\":\"m-1.safetensors\"}}");
    StModel s;
    int rc = safetensors_open_dir(&s, dir, &e);
    check(rc == 0 && s.n_files == 2, "st shards: open with index", "%s", rc ? e.msg : "files");
    if (rc == 0) {
        const StFile *f = NULL;
        const StTensor *t = safetensors_dir_find(&s, "b", &f);
        check(t && t->shape[0] == 3 && ((const float *)t->data)[2] == 5 && f == &s.files[1], "st shards: find across files", "wrong");
        safetensors_close_dir(&s);
    }
    struct { const char *name, *json, *want; } bad[] = {
        {"st shards: tensor in the wrong file", "{\"weight_map\":{\"a\":\"m-2.safetensors\",\"b\":\"m-2.safetensors\",\"c\":\"m-1.safetensors\"}}", "not in"},
        {"st shards: tensor missing from the index", "{\"weight_map\":{\"a\":\"m-1.safetensors\",\"b\":\"m-2.safetensors\"}}", "index lists"},
        {"st shards: path outside the directory", "{\"weight_map\":{\"a\":\"../m-1.safetensors\"}}", "not a file name"},
        {"st shards: missing shard", "{\"weight_map\":{\"a\":\"m-9.safetensors\"}}", "m-9"},
        {"st shards: no weight_map", "{\"x\":{}}", "weight_map"},
        {"st shards: index not JSON", "{\"weight_map\":", "index.json"},
        {"st shards: a tensor twice in the index", "{\"weight_map\":{\"a\":\"m-1.safetensors\",\"a\":\"m-1.safetensors\",\"b\":\"m-2.safetensors\"}}",
         "model.safetensors.index.json: line 1, column 38: duplicate key \"a\""},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_text(index, bad[i].json);
        Err e2 = {{0}};
        rc = safetensors_open_dir(&s, dir, &e2);
        check(rc == -1 && contains(e2.msg, bad[i].want), bad[i].name, "rc %d: %s", rc, e2.msg);
        if (rc == 0) safetensors_close_dir(&s);
    }
    remove(index);
}

// ---------------------------------------------------------------------------------------------
// GGUF containers

static void test_gguf_write_bytes(const char *dir) {
    const char *path = path_in(dir, "min.gguf");
    GgufWriter w;
    Err e;
    float data[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    int64_t ne[1] = {8};
    int rc = gguf_writer_open(&w, path, &e);
    gguf_add_u32(&w, "a", 7);
    rc |= gguf_add_tensor(&w, "t", TYPE_F32, 1, ne, &e);
    rc |= gguf_write_header(&w, &e);
    rc |= gguf_write_data(&w, data, 16, &e);  // in two pieces
    rc |= gguf_write_data(&w, data + 4, 16, &e);
    rc |= gguf_writer_close(&w, &e);
    Buf want = {0};
    put(&want, "GGUF", 4);
    put_le(&want, 3, 4);
    put_le(&want, 1, 8);
    put_le(&want, 1, 8);
    put_str(&want, "a");
    put_le(&want, GGUF_UINT32, 4);
    put_le(&want, 7, 4);
    put_str(&want, "t");
    put_le(&want, 1, 4);
    put_le(&want, 8, 8);
    put_le(&want, TYPE_F32, 4);
    put_le(&want, 0, 8);
    put_pad(&want, 32);
    put(&want, data, sizeof data);
    size_t n = 0;
    char *got = read_file(path, &n, &e);
    check(rc == 0 && got && n == want.n && memcmp(got, want.p, n) == 0, "gguf writer bytes", "rc %d, %zu bytes (want %zu)", rc, n, want.n);
    free(got);
    free(want.p);
}

// Writes every value type, arrays of every type (strings too), an F32 and a Q8_0 tensor, with
// general.alignment 64, and reads them back.
static void test_gguf_roundtrip(const char *dir) {
    const char *path = path_in(dir, "all.gguf");
    GgufWriter w;
    Err e;
    int rc = gguf_writer_open(&w, path, &e);
    uint8_t u8 = 200; int8_t i8 = -100; uint16_t u16 = 60000; int16_t i16 = -30000; uint32_t u32 = 4000000000u;
    int32_t i32 = -2000000000; float f32 = 1.5f; uint8_t b = 1; uint64_t u64 = 1ull << 60; int64_t i64 = -(1ll << 60);
    double f64 = -0.125; const char *s = "héllo";
    const void *vals[13] = {&u8, &i8, &u16, &i16, &u32, &i32, &f32, &b, &s, NULL, &u64, &i64, &f64};
    char key[32];
    for (int t = 0; t <= GGUF_FLOAT64; t++) {
        if (t == GGUF_ARRAY) continue;
        snprintf(key, sizeof key, "k.%d", t);
        gguf_add_kv(&w, key, t, vals[t]);
    }
    int32_t ai[3] = {-1, 0, 7};
    uint8_t ab[2] = {0, 1};
    double ad[2] = {0.5, -3};
    const char *as[3] = {"x", "", "Ġthe"};
    gguf_add_array(&w, "arr.i32", GGUF_INT32, ai, 3);
    gguf_add_array(&w, "arr.bool", GGUF_BOOL, ab, 2);
    gguf_add_array(&w, "arr.f64", GGUF_FLOAT64, ad, 2);
    gguf_add_array(&w, "arr.str", GGUF_STRING, as, 3);
    gguf_add_array(&w, "arr.empty", GGUF_UINT8, NULL, 0);
    gguf_add_u32(&w, "general.alignment", 64);
    float f[6] = {1, 2, 3, 4, 5, 6}, q[64];
    for (int i = 0; i < 64; i++) q[i] = (float)i / 8 - 4;
    unsigned char q8[68];
    quantize_row(TYPE_Q8_0, q8, q, 64);
    int64_t ne_f[2] = {3, 2}, ne_q[2] = {32, 2};
    rc |= gguf_add_tensor(&w, "f", TYPE_F32, 2, ne_f, &e);
    rc |= gguf_add_tensor(&w, "q", TYPE_Q8_0, 2, ne_q, &e);
    rc |= gguf_write_header(&w, &e);
    rc |= gguf_write_data(&w, f, sizeof f, &e);
    rc |= gguf_write_data(&w, q8, sizeof q8, &e);
    rc |= gguf_writer_close(&w, &e);
    GgufFile g;
    rc |= gguf_open(&g, path, &e);
    check(rc == 0, "gguf roundtrip: write and open", "%s", e.msg);
    if (rc != 0) return;
    int64_t iv;
    double dv;
    int bv;
    const char *sv;
    int ok = 1;
    int64_t want_i[] = {200, -100, 60000, -30000, 4000000000ll, -2000000000};
    for (int t = 0; t <= GGUF_INT32; t++) {
        snprintf(key, sizeof key, "k.%d", t);
        ok &= gguf_get_int(&g, key, &iv, 1, &e) == 0 && iv == want_i[t] && gguf_find_kv(&g, key)->type == t;
    }
    ok &= gguf_get_int(&g, "k.10", &iv, 1, &e) == 0 && iv == (int64_t)(1ull << 60);
    ok &= gguf_get_int(&g, "k.11", &iv, 1, &e) == 0 && iv == -(1ll << 60);
    ok &= gguf_get_float(&g, "k.6", &dv, 1, &e) == 0 && dv == 1.5;
    ok &= gguf_get_float(&g, "k.12", &dv, 1, &e) == 0 && dv == -0.125;
    ok &= gguf_get_bool(&g, "k.7", &bv, 1, &e) == 0 && bv == 1;
    ok &= gguf_get_str(&g, "k.8", &sv, 1, &e) == 0 && strcmp(sv, "héllo") == 0;
    check(ok, "gguf roundtrip: every scalar type", "mismatch");
    const GgufKV *kv = gguf_find_kv(&g, "arr.i32");
    ok = kv && kv->arr_type == GGUF_INT32 && kv->n == 3 && gguf_arr_int(kv, 0) == -1 && gguf_arr_int(kv, 2) == 7;
    kv = gguf_find_kv(&g, "arr.str");
    ok &= kv && kv->arr_type == GGUF_STRING && kv->n == 3 && strcmp(kv->strs[2], "Ġthe") == 0 && kv->str_lens[1] == 0;
    kv = gguf_find_kv(&g, "arr.f64");
    double d1 = 0;
    if (kv && kv->arr) memcpy(&d1, (char *)kv->arr + 8, 8);
    ok &= kv && kv->n == 2 && d1 == -3;
    kv = gguf_find_kv(&g, "arr.empty");
    ok &= kv && kv->n == 0 && gguf_find_kv(&g, "arr.bool")->n == 2;
    check(ok, "gguf roundtrip: arrays (ints, strings, f64, empty)", "mismatch");
    check(gguf_get_int(&g, "k.8", &iv, 1, &e) == -1 && gguf_get_int(&g, "nope", &iv, 5, &e) == 5, "gguf getters: wrong type / missing", "no error");
    const GgufTensor *tf = gguf_find_tensor(&g, "f"), *tq = gguf_find_tensor(&g, "q");
    check(g.alignment == 64 && g.data_offset % 64 == 0 && tf && tq && tq->offset == 64, "gguf roundtrip: alignment 64", "alignment %zu", g.alignment);
    if (tf && tq) {
        check(tf->ne[0] == 3 && tf->ne[1] == 2 && tf->nbytes == 24 && memcmp(tf->data, f, 24) == 0, "gguf roundtrip: f32 tensor", "wrong");
        check(tq->type == TYPE_Q8_0 && tq->nbytes == 68 && memcmp(tq->data, q8, 68) == 0, "gguf roundtrip: q8_0 tensor", "wrong");
    }
    gguf_close(&g);
}

// A small valid version-2 file built by hand: 2 keys, 2 tensors, data a multiple of 32 bytes.
static Buf gguf_valid(void) {
    Buf b = {0};
    put(&b, "GGUF", 4);
    put_le(&b, 2, 4);
    put_le(&b, 2, 8);
    put_le(&b, 2, 8);
    put_str(&b, "general.name");
    put_le(&b, GGUF_STRING, 4);
    put_str(&b, "x");
    put_str(&b, "list");
    put_le(&b, GGUF_ARRAY, 4);
    put_le(&b, GGUF_STRING, 4);
    put_le(&b, 2, 8);
    put_str(&b, "ab");
    put_str(&b, "c");
    const char *names[2] = {"w", "v"};
    for (int t = 0; t < 2; t++) {
        put_str(&b, names[t]);
        put_le(&b, 2, 4);
        put_le(&b, 4, 8);
        put_le(&b, 2, 8);
        put_le(&b, TYPE_F32, 4);
        put_le(&b, 32 * (uint64_t)t, 8);
    }
    put_pad(&b, 32);
    for (int i = 0; i < 16; i++) put_le(&b, 0x3f800000, 4);
    return b;
}

static void gguf_expect_error(const char *dir, const char *name, const Buf *b, const char *want) {
    const char *path = path_in(dir, "bad.gguf");
    write_bytes(path, b->p, b->n);
    GgufFile g;
    Err e = {{0}};
    int rc = gguf_open(&g, path, &e);
    check(rc == -1 && contains(e.msg, path) && (!want || contains(e.msg, want)), name, "rc %d, message '%s'", rc, e.msg);
    if (rc == 0) gguf_close(&g);
}

// A file with one tensor info: name, n_dims, ne[], type, offset; then `data` bytes.
static Buf gguf_one_tensor(uint32_t version, const char *name, uint32_t n_dims, const uint64_t *ne, uint32_t type,
                           uint64_t offset, size_t data) {
    Buf b = {0};
    put(&b, "GGUF", 4);
    put_le(&b, version, 4);
    put_le(&b, 1, 8);
    put_le(&b, 0, 8);
    put_str(&b, name);
    put_le(&b, n_dims, 4);
    for (uint32_t d = 0; d < n_dims; d++) put_le(&b, ne[d], 8);
    put_le(&b, type, 4);
    put_le(&b, offset, 8);
    put_pad(&b, 32);
    for (size_t i = 0; i < data; i++) put_le(&b, 0, 1);
    return b;
}

// A file with one key of the given type followed by raw value bytes.
static Buf gguf_one_kv(const char *key, uint32_t type, const Buf *value) {
    Buf b = {0};
    put(&b, "GGUF", 4);
    put_le(&b, 3, 4);
    put_le(&b, 0, 8);
    put_le(&b, 1, 8);
    put_str(&b, key);
    put_le(&b, type, 4);
    put(&b, value->p, value->n);
    return b;
}

static void test_gguf_broken_header(const char *dir) {
    Buf ok = gguf_valid(), b = {0};
    GgufFile g;
    Err e;
    Path pv2 = path_of(dir, "v2.gguf"), pcut = path_of(dir, "cut.gguf");
    const char *path = pv2.s;
    write_bytes(path, ok.p, ok.n);
    int rc = gguf_open(&g, path, &e);
    check(rc == 0 && g.version == 2 && g.n_tensors == 2 && g.tensors[1].offset == 32, "gguf: hand-made version 2 file", "%s", e.msg);
    if (rc == 0) gguf_close(&g);
    int fails = 0;
    const char *cut = pcut.s;
    for (size_t k = 0; k < ok.n; k++) {
        write_bytes(cut, ok.p, k);
        if (gguf_open(&g, cut, &e) == 0) fails++, gguf_close(&g);
    }
    check(fails == 0, "gguf: every truncation is an error", "%d of %zu prefixes accepted", fails, ok.n);
    put(&b, ok.p, ok.n);
    b.p[0] = 'X';
    gguf_expect_error(dir, "gguf: wrong magic", &b, "magic");
    b.p[0] = 'G';
    struct { uint32_t v; const char *want; } versions[] = {{1, "version 1"}, {4, "version 4"}, {0x03000000, "big-endian"}};
    for (int i = 0; i < 3; i++) {
        for (int k = 0; k < 4; k++) b.p[4 + k] = (unsigned char)(versions[i].v >> (8 * k));
        gguf_expect_error(dir, versions[i].want, &b, versions[i].want);
    }
    for (int k = 0; k < 4; k++) b.p[4 + k] = k == 0 ? 3 : 0;
    for (int k = 0; k < 8; k++) b.p[8 + k] = 0xff;
    gguf_expect_error(dir, "gguf: huge tensor count", &b, "tensor count");
    for (int k = 0; k < 8; k++) b.p[8 + k] = k == 0 ? 2 : 0, b.p[16 + k] = k == 6 ? 1 : 0;
    gguf_expect_error(dir, "gguf: huge metadata count", &b, "metadata count");
    free(b.p);
    free(ok.p);
}

static void test_gguf_broken_kv(const char *dir) {
    Buf v = {0}, b;
    put_le(&v, 1ull << 62, 8);
    b = gguf_one_kv("s", GGUF_STRING, &v);
    gguf_expect_error(dir, "gguf: huge string length", &b, "string length");
    free(b.p);
    v.n = 0;
    put_le(&v, GGUF_UINT32, 4);
    put_le(&v, 1ull << 61, 8);
    b = gguf_one_kv("a", GGUF_ARRAY, &v);
    gguf_expect_error(dir, "gguf: huge array count", &b, "array of");
    free(b.p);
    v.n = 0;
    put_le(&v, GGUF_STRING, 4);
    put_le(&v, 1ull << 61, 8);
    b = gguf_one_kv("a", GGUF_ARRAY, &v);
    gguf_expect_error(dir, "gguf: huge string array count", &b, "strings");
    free(b.p);
    v.n = 0;
    put_le(&v, GGUF_ARRAY, 4);
    put_le(&v, 1, 8);
    b = gguf_one_kv("a", GGUF_ARRAY, &v);
    gguf_expect_error(dir, "gguf: array of arrays", &b, "array element type");
    free(b.p);
    v.n = 0;
    put_le(&v, 0, 4);
    b = gguf_one_kv("a", 13, &v);
    gguf_expect_error(dir, "gguf: unknown value type", &b, "unknown value type");
    free(b.p);
    b = gguf_one_kv("\xc3\x28", GGUF_UINT32, &v);
    gguf_expect_error(dir, "gguf: bad UTF-8 key", &b, "UTF-8");
    free(b.p);
    v.n = 0;
    put_le(&v, 2, 1);
    b = gguf_one_kv("b", GGUF_BOOL, &v);
    gguf_expect_error(dir, "gguf: bool value 2", &b, "bool");
    free(b.p);
    v.n = 0;
    put_le(&v, 48, 4);
    b = gguf_one_kv("general.alignment", GGUF_UINT32, &v);
    gguf_expect_error(dir, "gguf: alignment not a power of two", &b, "alignment");
    free(b.p);
    // Duplicate keys: the same pair twice.
    Buf d = {0};
    put(&d, "GGUF", 4);
    put_le(&d, 3, 4);
    put_le(&d, 0, 8);
    put_le(&d, 2, 8);
    for (int i = 0; i < 2; i++) put_str(&d, "k"), put_le(&d, GGUF_UINT8, 4), put_le(&d, 1, 1);
    gguf_expect_error(dir, "gguf: duplicate key", &d, "twice");
    free(d.p);
    free(v.p);
}

static void test_gguf_broken_tensors(const char *dir) {
    uint64_t ne2[2] = {4, 2}, ne5[5] = {1, 1, 1, 1, 1}, big[4] = {1ull << 40, 1ull << 40, 1ull << 40, 1};
    uint64_t neg[1] = {1ull << 63}, q33[1] = {33};
    struct {
        const char *name, *want;
        Buf b;
    } cases[] = {
        {"gguf: n_dims 5", "n_dims 5", gguf_one_tensor(3, "t", 5, ne5, TYPE_F32, 0, 32)},
        {"gguf: unknown tensor type", "unsupported type 99", gguf_one_tensor(3, "t", 2, ne2, 99, 0, 32)},
        {"gguf: NF4 is not a file type", "unsupported type 200", gguf_one_tensor(3, "t", 2, ne2, TYPE_NF4, 0, 32)},
        {"gguf: data past the end", "past the end", gguf_one_tensor(3, "t", 2, ne2, TYPE_F32, 0, 16)},
        {"gguf: offset past the end", "past the end", gguf_one_tensor(3, "t", 2, ne2, TYPE_F32, 1ull << 62, 32)},
        {"gguf: offset not aligned", "alignment", gguf_one_tensor(3, "t", 2, ne2, TYPE_F32, 8, 64)},
        {"gguf: element count overflows", "overflow", gguf_one_tensor(3, "t", 3, big, TYPE_F32, 0, 32)},
        {"gguf: negative dimension", "negative", gguf_one_tensor(3, "t", 1, neg, TYPE_F32, 0, 32)},
        {"gguf: row not whole blocks", "block", gguf_one_tensor(3, "t", 1, q33, TYPE_Q8_0, 0, 64)},
        {"gguf: bad UTF-8 tensor name", "UTF-8", gguf_one_tensor(3, "a\xff", 2, ne2, TYPE_F32, 0, 32)},
        {"gguf: empty tensor name", "empty", gguf_one_tensor(3, "", 2, ne2, TYPE_F32, 0, 32)},
        {"gguf: tensor name of 64 bytes", "longer", gguf_one_tensor(3, "0123456789012345678901234567890123456789012345678901234567890123", 2, ne2, TYPE_F32, 0, 32)},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        gguf_expect_error(dir, cases[i].name, &cases[i].b, cases[i].want);
        free(cases[i].b.p);
    }
    // Two tensors: same name; overlapping data.
    for (int dup = 0; dup < 2; dup++) {
        Buf b = {0};
        put(&b, "GGUF", 4);
        put_le(&b, 3, 4);
        put_le(&b, 2, 8);
        put_le(&b, 0, 8);
        for (int t = 0; t < 2; t++) {
            put_str(&b, dup ? "same" : (t ? "b" : "a"));
            put_le(&b, 1, 4);
            put_le(&b, 16, 8);
            put_le(&b, TYPE_F32, 4);
            put_le(&b, dup ? 64 * (uint64_t)t : 32 * (uint64_t)t, 8);
        }
        put_pad(&b, 32);
        for (int i = 0; i < 128; i++) put_le(&b, 0, 1);
        gguf_expect_error(dir, dup ? "gguf: duplicate tensor name" : "gguf: overlapping tensors", &b, dup ? "twice" : "overlap");
        free(b.p);
    }
}

// ---------------------------------------------------------------------------------------------
// Models

// Copies a GGUF file through the writer with one edit, so that broken models differ from a valid
// one in exactly one place.
typedef struct {
    const char *drop;       // a key or tensor name to leave out
    const char *rename;     // tensor to rename to `to`
    const char *to;
    const char *key;        // a key to set to u32 `value` (or to string `str`)
    uint32_t value;
    const char *str;
    const char *swap;       // tensor whose ne[0] and ne[1] are swapped
    const char *extra;      // a tensor to add (F32 [4])
} Edit;

static void copy_kv(GgufWriter *w, const GgufKV *kv) {
    if (kv->type == GGUF_ARRAY) {
        gguf_add_array(w, kv->key, kv->arr_type, kv->arr_type == GGUF_STRING ? (const void *)kv->strs : kv->arr, kv->n);
    } else if (kv->type == GGUF_STRING) {
        gguf_add_str(w, kv->key, kv->str);
    } else if (kv->type == GGUF_FLOAT32) {
        gguf_add_f32(w, kv->key, (float)kv->v.f);
    } else if (kv->type == GGUF_FLOAT64) {
        gguf_add_kv(w, kv->key, kv->type, &kv->v.f);
    } else {
        uint64_t u = kv->v.u;  // little-endian host: the low bytes hold every narrower integer
        gguf_add_kv(w, kv->key, kv->type, &u);
    }
}

static int copy_gguf(const char *src, const char *dst, const Edit *ed) {
    GgufFile g;
    GgufWriter w;
    Err e;
    if (gguf_open(&g, src, &e) != 0 || gguf_writer_open(&w, dst, &e) != 0) return -1;
    for (int i = 0; i < g.n_kv; i++) {
        const GgufKV *kv = &g.kv[i];
        if (ed->drop && strcmp(kv->key, ed->drop) == 0) continue;
        if (ed->key && strcmp(kv->key, ed->key) == 0) continue;
        copy_kv(&w, kv);
    }
    if (ed->key && ed->str) gguf_add_str(&w, ed->key, ed->str);
    else if (ed->key) gguf_add_u32(&w, ed->key, ed->value);
    int rc = 0;
    for (int i = 0; i < g.n_tensors; i++) {
        const GgufTensor *t = &g.tensors[i];
        if (ed->drop && strcmp(t->name, ed->drop) == 0) continue;
        int64_t ne[4] = {t->ne[0], t->ne[1], t->ne[2], t->ne[3]};
        if (ed->swap && strcmp(t->name, ed->swap) == 0) ne[0] = t->ne[1], ne[1] = t->ne[0];
        const char *name = ed->rename && strcmp(t->name, ed->rename) == 0 ? ed->to : t->name;
        rc |= gguf_add_tensor(&w, name, t->type, t->n_dims, ne, &e);
    }
    int64_t ne4[1] = {4};
    float four[4] = {0};
    if (ed->extra) rc |= gguf_add_tensor(&w, ed->extra, TYPE_F32, 1, ne4, &e);
    rc |= gguf_write_header(&w, &e);
    for (int i = 0; i < g.n_tensors && rc == 0; i++)
        if (!(ed->drop && strcmp(g.tensors[i].name, ed->drop) == 0)) rc |= gguf_write_data(&w, g.tensors[i].data, g.tensors[i].nbytes, &e);
    if (ed->extra) rc |= gguf_write_data(&w, four, sizeof four, &e);
    rc |= gguf_writer_close(&w, &e);
    gguf_close(&g);
    return rc;
}

static int init_model(const char *out, const char *type, const char *extra) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s init --config tiny --tokenizer %s --type %s --seed 7 --out %s %s", sft_binary(),
             FIXTURE_TOKENIZER, type, out, extra ? extra : "");
    return run_command(cmd, NULL);
}

static void test_model_broken(const char *dir, const char *f32) {
    Model m;
    Err e;
    int rc = model_load(&m, f32, -1, &e);
    check(rc == 0, "model: copy harness baseline loads", "%s", e.msg);
    if (rc == 0) model_free(&m);
    Path pout = path_of(dir, "edited.gguf");
    const char *out = pout.s;
    Edit same = {0};
    rc = copy_gguf(f32, out, &same) || model_load(&m, out, -1, &e);
    check(rc == 0, "model: unedited copy loads", "%s", e.msg);
    if (rc == 0) model_free(&m);
    struct { const char *name; Edit ed; const char *want; } cases[] = {
        {"model: missing tensor", {.drop = "blk.1.ffn_up.weight"}, "'blk.1.ffn_up.weight' is missing"},
        {"model: missing embedding", {.drop = "token_embd.weight"}, "token_embd.weight"},
        {"model: missing norm", {.drop = "output_norm.weight"}, "output_norm.weight' is missing"},
        {"model: unknown tensor", {.rename = "blk.0.attn_q.bias", .to = "blk.0.attn_q.biass"}, "unknown tensor 'blk.0.attn_q.biass'"},
        {"model: extra tensor", {.extra = "rope_freqs.weight"}, "unknown tensor 'rope_freqs.weight'"},
        {"model: layer past the end", {.rename = "blk.1.attn_norm.weight", .to = "blk.7.attn_norm.weight"}, "past the 2 layers"},
        {"model: leading-zero layer", {.rename = "blk.1.attn_norm.weight", .to = "blk.01.attn_norm.weight"}, "unknown tensor"},
        {"model: wrong shape", {.swap = "blk.0.ffn_gate.weight"}, "expected [128, 64]"},
        {"model: heads do not divide C", {.key = "qwen2.attention.head_count", .value = 3}, "heads"},
        {"model: kv heads do not divide heads", {.key = "qwen2.attention.head_count_kv", .value = 3}, "key/value heads"},
        {"model: zero hidden size", {.key = "qwen2.embedding_length", .value = 0}, "embedding_length"},
        {"model: fewer layers than tensors", {.key = "qwen2.block_count", .value = 1}, "past the 1 layers"},
        {"model: missing block_count", {.drop = "qwen2.block_count"}, "block_count is missing"},
        {"model: not qwen2", {.key = "general.architecture", .str = "llama"}, "'llama' is not supported"},
        {"model: eos id out of range", {.key = "tokenizer.ggml.eos_token_id", .value = 100000}, "eos_token_id"},
        {"model: no vocabulary", {.drop = "tokenizer.ggml.tokens"}, "tokenizer.ggml.tokens"},
        {"model: no tokenizer", {.drop = "tokenizer.ggml.model"}, "no tokenizer"},
        {"model: not a BPE tokenizer", {.key = "tokenizer.ggml.model", .str = "llama"}, "not supported"},
        {"model: token types wrong", {.key = "tokenizer.ggml.token_type", .value = 1}, "token_type"},
        {"model: rope theta as string", {.key = "qwen2.rope.freq_base", .str = "big"}, "freq_base"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        Err e2 = {{0}};
        rc = copy_gguf(f32, out, &cases[i].ed);
        int lr = rc == 0 ? model_load(&m, out, -1, &e2) : 0;
        check(rc == 0 && lr == -1 && contains(e2.msg, out) && contains(e2.msg, cases[i].want), cases[i].name, "copy %d, load %d: '%s'", rc, lr, e2.msg);
        if (lr == 0) model_free(&m);
    }
    // Truncations of a whole model file, at 150 points spread over it.
    size_t n;
    char *bytes = read_file(f32, &n, &e);
    int accepted = 0;
    for (int k = 0; bytes && k < 150; k++) {
        write_bytes(out, bytes, n * (size_t)k / 150);
        if (model_load(&m, out, -1, &e) == 0) accepted++, model_free(&m);
    }
    check(bytes && accepted == 0, "model: truncated files are errors", "%d accepted", accepted);
    free(bytes);
}

// Random byte flips in the metadata and tensor infos of a valid model, and in the header of a
// safetensors file: each load must fail or succeed cleanly (the sanitizers watch for the rest).
static void test_model_fuzz(const char *dir, const char *f32, const char *hf) {
    GgufFile g;
    Err e;
    size_t n, head = gguf_open(&g, f32, &e) == 0 ? g.data_offset : 0;
    if (head) gguf_close(&g);
    char *bytes = read_file(f32, &n, &e);
    Path pout = path_of(dir, "fuzz.gguf");
    uint64_t rng = 42;
    int loaded = 0, failed = 0;
    Model m;
    for (int it = 0; bytes && head && it < 200; it++) {
        char *copy = malloc(n);
        memcpy(copy, bytes, n);
        for (int k = 0; k < 1 + it % 3; k++) copy[rng_next(&rng) % head] ^= (char)(1 + rng_next(&rng) % 255);
        write_bytes(pout.s, copy, n);
        free(copy);
        if (model_load(&m, pout.s, -1, &e) == 0) loaded++, model_free(&m);
        else failed++;
    }
    check(bytes && head && failed > 0, "model: 200 GGUF files with flipped header bytes", "no file rejected");
    printf("    (%d loaded, %d rejected)\n", loaded, failed);
    free(bytes);
    Path st = path_of(hf, "model-00001-of-00002.safetensors"), keep = path_of(dir, "keep.safetensors");
    bytes = read_file(st.s, &n, &e);
    rename(st.s, keep.s);
    size_t hlen = 0;
    for (int i = 0; bytes && n >= 8 && i < 8; i++) hlen |= (size_t)(unsigned char)bytes[i] << (8 * i);
    hlen = hlen < n ? hlen + 8 : 0;
    loaded = failed = 0;
    for (int it = 0; hlen && hlen < n && it < 150; it++) {
        char *copy = malloc(n);
        memcpy(copy, bytes, n);
        copy[rng_next(&rng) % hlen] ^= (char)(1 + rng_next(&rng) % 255);
        write_bytes(st.s, copy, n);
        free(copy);
        if (model_load(&m, hf, TYPE_F32, &e) == 0) loaded++, model_free(&m);
        else failed++;
    }
    check(hlen && failed > 0, "model: 150 safetensors files with flipped header bytes", "no file rejected");
    printf("    (%d loaded, %d rejected)\n", loaded, failed);
    rename(keep.s, st.s);
    free(bytes);
}

// q4_k_m on a model whose rows are whole 256-blocks: llama.cpp's mix (Q6_K for the tied
// embedding and for attn_v / ffn_down of layers 0, 3, 6, 7 of 8; Q4_K elsewhere). Without the
// K-quant quantizers the command must fail cleanly.
static void test_q4_k_m(const char *dir) {
    Path cfg = path_of(dir, "k-config.json"), out = path_of(dir, "k.gguf");
    write_text(cfg.s, "{\"architectures\": [\"Qwen2ForCausalLM\"], \"hidden_size\": 256, \"num_hidden_layers\": 8, "
                      "\"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"intermediate_size\": 512, "
                      "\"max_position_embeddings\": 512, \"tie_word_embeddings\": true}");
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s init --config %s --tokenizer %s --type q4_k_m --out %s", sft_binary(), cfg.s, FIXTURE_TOKENIZER, out.s);
    int rc = run_command(cmd, NULL);
    float z[256] = {0};
    unsigned char q[512];
    int have = quantize_row(TYPE_Q4_K, q, z, 256) == 0 && quantize_row(TYPE_Q6_K, q, z, 256) == 0;
    if (!have) {
        check(rc == 1, "q4_k_m without K-quant quantizers: exit 1", "exit %d", rc);
        return;
    }
    GgufFile g;
    Err e;
    if (rc != 0 || gguf_open(&g, out.s, &e) != 0) {
        check(0, "sft init --type q4_k_m", "exit %d", rc);
        return;
    }
    int ok = gguf_find_tensor(&g, "token_embd.weight")->type == TYPE_Q6_K;
    for (int l = 0; l < 8; l++) {
        char name[64];
        int more = l == 0 || l == 3 || l == 6 || l == 7;
        snprintf(name, sizeof name, "blk.%d.attn_v.weight", l);
        ok &= gguf_find_tensor(&g, name)->type == (more ? TYPE_Q6_K : TYPE_Q4_K);
        snprintf(name, sizeof name, "blk.%d.ffn_down.weight", l);
        ok &= gguf_find_tensor(&g, name)->type == (more ? TYPE_Q6_K : TYPE_Q4_K);
        snprintf(name, sizeof name, "blk.%d.attn_q.weight", l);
        ok &= gguf_find_tensor(&g, name)->type == TYPE_Q4_K;
    }
    int64_t ft = 0;
    gguf_get_int(&g, "general.file_type", &ft, 0, &e);
    check(ok && ft == 15, "sft init --type q4_k_m: llama.cpp's mix", "types differ (file_type %lld)", (long long)ft);
    gguf_close(&g);
}

// The Hugging Face name and [rows, cols] of every GGUF tensor of a tiny model, written from the
// naming rules (not from modelfile.c's tables).
static const char *hf_name(char *buf, size_t cap, const char *g) {
    static const char *map[][2] = {
        {"attn_norm.weight", "input_layernorm.weight"}, {"attn_q.weight", "self_attn.q_proj.weight"},
        {"attn_q.bias", "self_attn.q_proj.bias"}, {"attn_k.weight", "self_attn.k_proj.weight"},
        {"attn_k.bias", "self_attn.k_proj.bias"}, {"attn_v.weight", "self_attn.v_proj.weight"},
        {"attn_v.bias", "self_attn.v_proj.bias"}, {"attn_output.weight", "self_attn.o_proj.weight"},
        {"ffn_norm.weight", "post_attention_layernorm.weight"}, {"ffn_gate.weight", "mlp.gate_proj.weight"},
        {"ffn_up.weight", "mlp.up_proj.weight"}, {"ffn_down.weight", "mlp.down_proj.weight"},
    };
    int l;
    char rest[64];
    if (strcmp(g, "token_embd.weight") == 0) return "model.embed_tokens.weight";
    if (strcmp(g, "output_norm.weight") == 0) return "model.norm.weight";
    if (strcmp(g, "output.weight") == 0) return "lm_head.weight";
    if (sscanf(g, "blk.%d.%63s", &l, rest) == 2)
        for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
            if (strcmp(rest, map[i][0]) == 0) return snprintf(buf, cap, "model.layers.%d.%s", l, map[i][1]), buf;
    return NULL;
}

static const char *tiny_config =
    "{\"architectures\": [\"Qwen2ForCausalLM\"], \"hidden_size\": 64, \"num_hidden_layers\": 2, "
    "\"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"intermediate_size\": 128, \"vocab_size\": %d, "
    "\"max_position_embeddings\": 4096, \"rope_theta\": 1000000.0, \"rms_norm_eps\": 1e-06, \"tie_word_embeddings\": true}";

// Writes an HF directory holding the weights of an F32 GGUF, as BF16 when bf16 = 1, in `shards` files.
static int gguf_to_hf(const char *gguf, const char *dir, int bf16, int shards, int vocab) {
    GgufFile g;
    Err e;
    if (gguf_open(&g, gguf, &e) != 0) return -1;
    StTensor *t = calloc((size_t)g.n_tensors, sizeof *t);
    char (*names)[96] = calloc((size_t)g.n_tensors, sizeof *names);
    uint16_t **conv = calloc((size_t)g.n_tensors, sizeof *conv);
    for (int i = 0; i < g.n_tensors; i++) {
        const GgufTensor *gt = &g.tensors[i];
        size_t n = gt->nbytes / 4;
        t[i] = (StTensor){.name = hf_name(names[i], sizeof names[i], gt->name), .type = bf16 ? TYPE_BF16 : TYPE_F32,
                          .n_dims = gt->n_dims, .shape = {gt->n_dims == 2 ? gt->ne[1] : gt->ne[0], gt->ne[0]}, .data = gt->data};
        if (bf16) {
            conv[i] = malloc(2 * n);
            for (size_t k = 0; k < n; k++) conv[i][k] = fp32_to_bf16(((const float *)gt->data)[k]);
            t[i].data = conv[i];
        }
    }
    int rc = 0, per = (g.n_tensors + shards - 1) / shards;
    char cfg[1024], idx[16384] = "{\"weight_map\": {", file[64];
    for (int s = 0; s < shards && shards > 1; s++) {
        snprintf(file, sizeof file, "model-%05d-of-%05d.safetensors", s + 1, shards);
        int lo = s * per, hi = lo + per < g.n_tensors ? lo + per : g.n_tensors;
        rc |= safetensors_write(path_in(dir, file), t + lo, hi - lo, "{\"format\":\"pt\"}", &e);
        for (int i = lo; i < hi; i++)
            snprintf(idx + strlen(idx), sizeof idx - strlen(idx), "%s\"%s\": \"%s\"", i ? ", " : "", t[i].name, file);
    }
    if (shards > 1) write_text(path_in(dir, "model.safetensors.index.json"), strcat(idx, "}}"));
    else rc |= safetensors_write(path_in(dir, "model.safetensors"), t, g.n_tensors, NULL, &e);
    snprintf(cfg, sizeof cfg, tiny_config, vocab);
    write_text(path_in(dir, "config.json"), cfg);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "cp %s/tokenizer.json %s/tokenizer_config.json %s/", FIXTURE_TOKENIZER, FIXTURE_TOKENIZER, dir);
    rc |= system(cmd);
    for (int i = 0; i < g.n_tensors; i++) free(conv[i]);
    free(conv);
    free(names);
    free(t);
    gguf_close(&g);
    return rc;
}

// Every weight of a equals (within tol) the same weight of b, dequantized.
static int same_weights(const Model *a, const Model *b, double tol) {
    const Config *c = &a->config;
    float *x = malloc(sizeof(float) * (size_t)c->FF * 4), *y = malloc(sizeof(float) * (size_t)c->FF * 4);
    int ok = a->config.C == b->config.C && a->config.V == b->config.V;
    const QMatrix *ma[] = {&a->w.embed, &a->w.lm_head}, *mb[] = {&b->w.embed, &b->w.lm_head};
    for (int l = -1; l < c->L && ok; l++) {
        int n = l < 0 ? 2 : 7;
        const QMatrix *la[7], *lb[7];
        if (l >= 0) {
            const LayerWeights *p = &a->w.layers[l], *q = &b->w.layers[l];
            const QMatrix *pa[7] = {&p->wq, &p->wk, &p->wv, &p->wo, &p->wgate, &p->wup, &p->wdown};
            const QMatrix *pb[7] = {&q->wq, &q->wk, &q->wv, &q->wo, &q->wgate, &q->wup, &q->wdown};
            memcpy(la, pa, sizeof la), memcpy(lb, pb, sizeof lb);
            for (int i = 0; i < c->C; i++) ok &= fabsf(p->attn_norm[i] - q->attn_norm[i]) <= tol && fabsf(p->ffn_norm[i] - q->ffn_norm[i]) <= tol;
            for (int i = 0; i < c->NKV * c->HS; i++) ok &= fabsf(p->bk[i] - q->bk[i]) <= tol && fabsf(p->bv[i] - q->bv[i]) <= tol;
            for (int i = 0; i < c->C; i++) ok &= fabsf(p->bq[i] - q->bq[i]) <= tol;
        } else {
            memcpy(la, ma, sizeof ma), memcpy(lb, mb, sizeof mb);
        }
        for (int k = 0; k < n && ok; k++) {
            ok &= la[k]->rows == lb[k]->rows && la[k]->cols == lb[k]->cols;
            for (int r = 0; r < la[k]->rows && ok; r++) {
                qmatrix_row(x, la[k], r);
                qmatrix_row(y, lb[k], r);
                for (int i = 0; i < la[k]->cols; i++) ok &= fabsf(x[i] - y[i]) <= tol;
            }
        }
    }
    for (int i = 0; i < c->C; i++) ok &= fabsf(a->w.out_norm[i] - b->w.out_norm[i]) <= tol;
    free(x);
    free(y);
    return ok;
}

static void test_model_hf(const char *dir, const char *f32) {
    Model g, h;
    Err e;
    Path phf = path_of(dir, "hf"), phf2 = path_of(dir, "hf2");
    const char *hf = phf.s;
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "mkdir -p %s", hf);
    system(cmd);
    int rc = gguf_to_hf(f32, hf, 0, 1, 320) || model_load(&g, f32, -1, &e);
    if (rc == 0 && model_load(&h, hf, TYPE_F32, &e) != 0) rc = -1, model_free(&g);
    check(rc == 0, "model: HF directory loads", "%s", e.msg);
    if (rc != 0) return;
    check(same_weights(&g, &h, 0), "model: HF (F32) weights equal the GGUF's", "differ");
    check(h.config.tied && h.config.V == 320 && h.tok.n_vocab == 259 && g.tok.n_vocab == 320, "model: HF config and tokenizer", "V %d tok %d/%d", h.config.V, h.tok.n_vocab, g.tok.n_vocab);
    check(h.gen.temperature == 0.7f && h.gen.top_p == 0.8f && h.gen.top_k == 20 && h.gen.repetition_penalty == 1.1f, "model: Qwen2.5 sampling defaults", "wrong");
    model_free(&h);
    write_text(path_in(hf, "generation_config.json"), "{\"temperature\": 0.3, \"top_k\": 5, \"do_sample\": true}");
    rc = model_load(&h, hf, TYPE_Q8_0, &e);
    check(rc == 0 && h.gen.temperature == 0.3f && h.gen.top_k == 5 && h.gen.top_p == 0.8f && h.w.layers[1].wdown.type == TYPE_Q8_0,
          "model: generation_config.json and --quant q8_0", "%s", rc ? e.msg : "wrong");
    if (rc == 0) {
        // Independent: quant.c's own quantize_row on the GGUF's F32 rows.
        const QMatrix *W = &g.w.layers[1].wdown;
        float row[128], want[128], got[128];
        unsigned char q[256];
        qmatrix_row(row, W, 5);
        quantize_row(TYPE_Q8_0, q, row, W->cols);
        dequantize_row(TYPE_Q8_0, want, q, W->cols);
        qmatrix_row(got, &h.w.layers[1].wdown, 5);
        check_close("model: --quant q8_0 row equals quantize_row's", got, want, (size_t)W->cols, 0, 0);
        model_free(&h);
    }
    write_text(path_in(hf, "generation_config.json"), "{\"top_p\": 7}");
    rc = model_load(&h, hf, -1, &e);
    check(rc == -1 && contains(e.msg, "generation_config.json"), "model: bad generation_config.json", "%s", e.msg);
    remove(path_in(hf, "generation_config.json"));
    // BF16 in two shards with an index: the same weights, rounded to BF16.
    const char *hf2 = phf2.s;
    snprintf(cmd, sizeof cmd, "mkdir -p %s", hf2);
    system(cmd);
    rc = gguf_to_hf(f32, hf2, 1, 2, 320) || model_load(&h, hf2, TYPE_F32, &e);
    check(rc == 0 && same_weights(&g, &h, 0.005), "model: BF16 shards with an index", "%s", rc ? e.msg : "weights differ");
    if (rc == 0) model_free(&h);
    // Broken directories.
    char cfg[1024];
    snprintf(cfg, sizeof cfg, tiny_config, 100);
    write_text(path_in(hf, "config.json"), cfg);
    rc = model_load(&h, hf, -1, &e);
    check(rc == -1 && contains(e.msg, "[100, 64]"), "model: HF vocab_size disagrees with the embedding", "%s", e.msg);
    write_text(path_in(hf, "config.json"), "{\"architectures\": [\"LlamaForCausalLM\"]}");
    rc = model_load(&h, hf, -1, &e);
    check(rc == -1 && contains(e.msg, "Qwen2ForCausalLM"), "model: HF architecture not Qwen2", "%s", e.msg);
    snprintf(cfg, sizeof cfg, tiny_config, 320);
    *strstr(cfg, "true") = 0;
    strcat(cfg, "false}");
    write_text(path_in(hf, "config.json"), cfg);
    rc = model_load(&h, hf, -1, &e);
    check(rc == -1 && contains(e.msg, "lm_head.weight' is missing"), "model: untied without lm_head", "%s", e.msg);
    snprintf(cfg, sizeof cfg, tiny_config, 320);
    write_text(path_in(hf, "config.json"), cfg);
    remove(path_in(hf, "tokenizer.json"));
    rc = model_load(&h, hf, -1, &e);
    check(rc == -1 && contains(e.msg, "tokenizer"), "model: HF without tokenizer.json", "%s", e.msg);
    model_free(&g);
}

// A key twice in config.json is refused with the file, the place and the key (hf: a loadable
// Hugging Face directory, left as it was).
static void test_model_hf_duplicate_key(const char *dir, const char *hf) {
    Path pdup = path_of(dir, "hf-dup");
    char cmd[1400], cfg[1024];
    snprintf(cmd, sizeof cmd, "rm -rf %s && cp -r %s %s", pdup.s, hf, pdup.s);
    system(cmd);
    snprintf(cfg, sizeof cfg, tiny_config, 320);
    char *twice = xmalloc(strlen(cfg) + 64);
    sprintf(twice, "{\"vocab_size\": 320,\n%s", cfg + 1);
    write_text(path_in(pdup.s, "config.json"), twice);
    free(twice);
    Model m;
    Err e = {{0}};
    int rc = model_load(&m, pdup.s, -1, &e);
    check(rc == -1 && contains(e.msg, "hf-dup/config.json: line 2, column ") && contains(e.msg, "duplicate key \"vocab_size\""),
          "model: a key twice in config.json refused", "rc %d '%s'", rc, e.msg);
    if (rc == 0) model_free(&m);
}

static void test_model_init(const char *dir) {
    Path pf = path_of(dir, "tiny-f32.gguf"), pq = path_of(dir, "tiny-q8.gguf"), pa = path_of(dir, "again.gguf");
    const char *f32 = pf.s, *q8 = pq.s, *again = pa.s;
    int rc = init_model(f32, "f32", "--embed-std 0.5") | init_model(q8, "q8_0", NULL) | init_model(again, "q8_0", NULL);
    check(rc == 0, "sft init tiny (f32, q8_0)", "exit status %d", rc);
    if (rc != 0) return;
    size_t n1, n2;
    Err e;
    char *a = read_file(q8, &n1, &e), *b = read_file(again, &n2, &e);
    check(a && b && n1 == n2 && memcmp(a, b, n1) == 0, "sft init is deterministic", "files differ");
    free(a), free(b);
    init_model(again, "q8_0", "--threads 1");
    a = read_file(q8, &n1, &e), b = read_file(again, &n2, &e);
    check(a && b && n1 == n2 && memcmp(a, b, n1) == 0, "sft init: same bytes with --threads 1", "files differ");
    free(a), free(b);
    init_model(again, "q8_0", "--seed 8");
    a = read_file(q8, &n1, &e), b = read_file(again, &n2, &e);
    check(a && b && n1 == n2 && memcmp(a, b, n1) != 0, "sft init: another seed, other weights", "same bytes");
    free(a), free(b);
    Model m;
    rc = model_load(&m, f32, -1, &e);
    check(rc == 0, "model_load of an sft init model", "%s", e.msg);
    if (rc != 0) return;
    const Config *c = &m.config;
    check(c->C == 64 && c->L == 2 && c->NH == 4 && c->NKV == 2 && c->FF == 128 && c->V == 320 && c->tied && c->HS == 16,
          "sft init tiny: config", "C %d L %d V %d", c->C, c->L, c->V);
    check(m.w.embed.type == TYPE_F32 && m.w.lm_head.data == m.w.embed.data && m.w.layers[0].wq.type == TYPE_F32,
          "sft init: stored types kept, lm_head tied", "wrong");
    // Embedding ~ N(0, 0.5), matrices ~ N(0, 0.02), norms 1.
    double s1 = 0, s2 = 0, in1 = 0, mx = 0;
    size_t n = (size_t)c->V * c->C;
    const float *E = m.w.embed.data;
    for (size_t i = 0; i < n; i++) s1 += E[i], s2 += (double)E[i] * E[i], in1 += fabsf(E[i]) < 0.5f, mx = fmax(mx, fabsf(E[i]));
    double mean = s1 / n, sd = sqrt(s2 / n - mean * mean);
    check(fabs(mean) < 0.02 && fabs(sd - 0.5) < 0.015 && fabs(in1 / n - 0.6827) < 0.01 && mx < 2.5,
          "sft init: embedding ~ N(0, 0.5)", "mean %g sd %g within-1sd %g max %g", mean, sd, in1 / n, mx);
    const float *Q = m.w.layers[1].wup.data;
    s2 = 0;
    for (int i = 0; i < c->FF * c->C; i++) s2 += (double)Q[i] * Q[i];
    sd = sqrt(s2 / (c->FF * c->C));
    int ones = 1;
    for (int i = 0; i < c->C; i++) ones &= m.w.layers[1].ffn_norm[i] == 1 && m.w.out_norm[i] == 1;
    check(fabs(sd - 0.02) < 0.001 && ones, "sft init: matrices ~ N(0, 0.02), norms 1", "sd %g", sd);
    model_free(&m);
    rc = model_load(&m, q8, TYPE_F32, &e);
    check(rc == 0 && m.w.layers[0].wq.type == TYPE_F32 && m.w.embed.type == TYPE_F32, "model_load --quant f32 of a q8_0 file", "%s", e.msg);
    if (rc == 0) model_free(&m);
    rc = model_load(&m, q8, TYPE_Q4_K, &e);
    check(rc == 0 && m.w.embed.type == TYPE_Q5_0, "model_load --quant q4_k on 64 columns: q5_0 (llama.cpp's fallback)", "%s",
          rc ? e.msg : type_info(m.w.embed.type)->name);
    if (rc == 0) model_free(&m);
    test_model_hf(dir, f32);
    test_model_broken(dir, f32);
    test_model_fuzz(dir, f32, path_in(dir, "hf2"));
    test_model_hf_duplicate_key(dir, path_in(dir, "hf2"));
    test_q4_k_m(dir);
}

static void test_files_cli(const char *dir) {
    Path pf = path_of(dir, "tiny-f32.gguf"), pq = path_of(dir, "tiny-q4.gguf");
    const char *f32 = pf.s;
    char cmd[2048], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s info --model %s", sft_binary(), f32);
    int rc = run_command(cmd, &out);
    char line[256] = "";
    const char *at = out ? strstr(out, "blk.1.ffn_down.weight") : NULL;
    if (at) snprintf(line, sizeof line, "%.*s", (int)strcspn(at, "\n"), at);
    check(rc == 0 && contains(line, " [64, 128] ") && contains(line, " f32 ") && contains(line, " 32768 bytes") &&
              contains(out, "blk.0.attn_k.bias") && contains(out, "total: 26 tensors, 94784 parameters") && contains(out, "320 tokens"),
          "sft info lists the tensors", "exit %d:\n%s", rc, out ? out : "");
    free(out);
    // quantize: GGUF f32 -> q4_0, then the q4_0 rows equal quantize_row's on the f32 rows.
    const char *q4 = pq.s;
    snprintf(cmd, sizeof cmd, "%s quantize --model %s --type q4_0 --out %s", sft_binary(), f32, q4);
    rc = run_command(cmd, NULL);
    Model a, b;
    Err e;
    if (rc == 0 && model_load(&a, f32, -1, &e) == 0) {
        if (model_load(&b, q4, -1, &e) == 0) {
            float row[64], want[64], got[64];
            unsigned char q[64];
            int ok = b.w.layers[0].wk.type == TYPE_Q4_0 && b.w.embed.type == TYPE_Q4_0;
            for (int r = 0; r < a.w.embed.rows && ok; r++) {
                qmatrix_row(row, &a.w.embed, r);
                quantize_row(TYPE_Q4_0, q, row, 64);
                dequantize_row(TYPE_Q4_0, want, q, 64);
                qmatrix_row(got, &b.w.embed, r);
                ok = memcmp(got, want, sizeof got) == 0;
            }
            check(ok, "sft quantize f32 -> q4_0", "rows differ");
            model_free(&b);
        } else {
            check(0, "sft quantize f32 -> q4_0", "%s", e.msg);
        }
        model_free(&a);
    } else {
        check(0, "sft quantize f32 -> q4_0", "exit %d", rc);
    }
    // A write that fails (here: past the file size limit, SIGXFSZ ignored) gives the reason.
    snprintf(cmd, sizeof cmd, "ulimit -f 4; trap '' XFSZ; %s quantize --model %s --type f32 --out %s/big.gguf 2>%s/err.txt",
             sft_binary(), f32, dir, dir);
    rc = run_command(cmd, NULL);
    char *err = read_file(path_in(dir, "err.txt"), NULL, NULL);
    check(rc == 1 && contains(err, "big.gguf: write error: File too large"), "sft quantize: a failed write says why",
          "exit %d: %s", rc, err ? err : "");
    free(err);
    snprintf(cmd, sizeof cmd, "%s info --model %s/does-not-exist.gguf", sft_binary(), dir);
    check(run_command(cmd, NULL) == 1, "sft info on a missing file exits 1", "other status");
    snprintf(cmd, sizeof cmd, "%s quantize --model %s --type q3_x --out %s/x.gguf", sft_binary(), f32, dir);
    check(run_command(cmd, NULL) == 1, "sft quantize --type q3_x exits 1", "other status");
}

void test_files(void) {
    const char *d = scratch_dir("files");
    char dir[512];
    snprintf(dir, sizeof dir, "%s", d);
    test_st_write_bytes(dir);
    test_st_read(dir);
    test_st_broken(dir);
    test_st_shards(dir);
    test_gguf_write_bytes(dir);
    test_gguf_roundtrip(dir);
    test_gguf_broken_header(dir);
    test_gguf_broken_kv(dir);
    test_gguf_broken_tensors(dir);
    test_model_init(dir);
    test_files_cli(dir);
}
