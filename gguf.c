// gguf.c: the GGUF container, versions 2 and 3 (little endian): a validating reader over a
// memory mapping, and a streaming writer (header first, then tensor data in pieces).
//
// Leaves out: big-endian files, version 1, arrays of arrays, and what the keys and tensor names
// mean (modelfile.c). Read gguf.h for the byte layout.
#include "gguf.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"

#define GGUF_MAX_NAME 64  // ggml's GGML_MAX_NAME: tensor names are shorter than this

// ---------------------------------------------------------------------------------------------
// Reading: a cursor over the mapped bytes; every read checks the remaining length first.

typedef struct {
    const unsigned char *p;
    size_t size, pos;
    const char *path;
    Err *e;
} Reader;

static int truncated(Reader *r, const char *what) {
    return err_set(r->e, "%s: truncated at byte %zu while reading %s (file of %zu bytes)", r->path, r->pos, what, r->size);
}

static int read_bytes(Reader *r, void *out, size_t n, const char *what) {
    if (n > r->size - r->pos) return truncated(r, what);
    memcpy(out, r->p + r->pos, n);
    r->pos += n;
    return 0;
}

static uint64_t load_le(const unsigned char *b, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v |= (uint64_t)b[i] << (8 * i);
    return v;
}

static int read_u32(Reader *r, uint32_t *out, const char *what) {
    unsigned char b[4];
    if (read_bytes(r, b, 4, what) != 0) return -1;
    *out = (uint32_t)load_le(b, 4);
    return 0;
}

static int read_u64(Reader *r, uint64_t *out, const char *what) {
    unsigned char b[8];
    if (read_bytes(r, b, 8, what) != 0) return -1;
    *out = load_le(b, 8);
    return 0;
}

// Length of the valid UTF-8 prefix of s[0..n).
static size_t utf8_prefix(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t k = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
        if (k == 0 || k > n - i || (k == 2 && c < 0xC2)) return i;
        for (size_t j = 1; j < k; j++)
            if ((s[i + j] & 0xC0) != 0x80) return i;
        unsigned c1 = s[i + 1 < n ? i + 1 : i];
        if (k == 3 && ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 >= 0xA0))) return i;  // overlong, surrogate
        if (k == 4 && ((c == 0xF0 && c1 < 0x90) || c > 0xF4 || (c == 0xF4 && c1 >= 0x90))) return i;
        i += k;
    }
    return i;
}

// Reads a string into a malloc'ed NUL-terminated copy. Names (utf8_name = 1) must be UTF-8
// without NUL bytes; values may hold any bytes (tokens are checked by the tokenizer).
static int read_str(Reader *r, char **out, uint64_t *len_out, int utf8_name, const char *what) {
    uint64_t n;
    if (read_u64(r, &n, what) != 0) return -1;
    if (n > r->size - r->pos)
        return err_set(r->e, "%s: %s at byte %zu: string length %llu is past the end of the file", r->path, what,
                       r->pos - 8, (unsigned long long)n);
    const unsigned char *s = r->p + r->pos;
    if (utf8_name && (utf8_prefix(s, (size_t)n) != n || memchr(s, 0, (size_t)n)))
        return err_set(r->e, "%s: %s at byte %zu is not valid UTF-8 text", r->path, what, r->pos);
    char *c = xmalloc((size_t)n + 1);
    memcpy(c, s, (size_t)n);
    c[n] = 0;
    r->pos += (size_t)n;
    *out = c;
    if (len_out) *len_out = n;
    return 0;
}

// Bytes of one value of a scalar type; 0 for STRING, ARRAY and unknown types.
static size_t scalar_size(uint32_t type) {
    switch (type) {
    case GGUF_UINT8: case GGUF_INT8: case GGUF_BOOL: return 1;
    case GGUF_UINT16: case GGUF_INT16: return 2;
    case GGUF_UINT32: case GGUF_INT32: case GGUF_FLOAT32: return 4;
    case GGUF_UINT64: case GGUF_INT64: case GGUF_FLOAT64: return 8;
    default: return 0;
    }
}

// Decodes a little-endian scalar into kv->v.
static void set_scalar(GgufKV *kv, const unsigned char *b) {
    uint64_t u = load_le(b, (int)scalar_size((uint32_t)kv->type));
    switch (kv->type) {
    case GGUF_INT8: kv->v.i = (int8_t)u; break;
    case GGUF_INT16: kv->v.i = (int16_t)u; break;
    case GGUF_INT32: kv->v.i = (int32_t)u; break;
    case GGUF_INT64: kv->v.i = (int64_t)u; break;
    case GGUF_FLOAT32: { uint32_t x = (uint32_t)u; float f; memcpy(&f, &x, 4); kv->v.f = f; break; }
    case GGUF_FLOAT64: memcpy(&kv->v.f, &u, 8); break;
    default: kv->v.u = u; break;
    }
}

static int read_array(Reader *r, GgufKV *kv) {
    uint32_t et;
    uint64_t n;
    if (read_u32(r, &et, "an array type") != 0 || read_u64(r, &n, "an array length") != 0) return -1;
    kv->arr_type = (int)et;
    kv->n = n;
    size_t es = scalar_size(et), left = r->size - r->pos;
    if (et == GGUF_STRING) {
        if (n > left / 8)
            return err_set(r->e, "%s: key '%s': array of %llu strings cannot fit in the file", r->path, kv->key, (unsigned long long)n);
        kv->strs = xcalloc((size_t)n + 1, sizeof(char *));
        kv->str_lens = xcalloc((size_t)n + 1, sizeof(uint64_t));
        for (uint64_t i = 0; i < n; i++)
            if (read_str(r, &kv->strs[i], &kv->str_lens[i], 0, "a string of an array") != 0) return -1;
        return 0;
    }
    if (es == 0)
        return err_set(r->e, "%s: key '%s': unsupported array element type %u", r->path, kv->key, et);
    if (n > left / es)
        return err_set(r->e, "%s: key '%s': array of %llu elements is past the end of the file", r->path, kv->key, (unsigned long long)n);
    kv->arr = xmalloc((size_t)n * es);
    return read_bytes(r, kv->arr, (size_t)n * es, "array elements");
}

static int read_kv(Reader *r, GgufKV *kv) {
    uint32_t type;
    if (read_str(r, &kv->key, NULL, 1, "a metadata key") != 0 || read_u32(r, &type, "a value type") != 0) return -1;
    kv->type = (int)type;
    if (type == GGUF_STRING) return read_str(r, &kv->str, &kv->n, 0, "a string value");
    if (type == GGUF_ARRAY) return read_array(r, kv);
    size_t es = scalar_size(type);
    if (es == 0) return err_set(r->e, "%s: key '%s': unknown value type %u", r->path, kv->key, type);
    unsigned char b[8];
    if (read_bytes(r, b, es, "a value") != 0) return -1;
    set_scalar(kv, b);
    if (type == GGUF_BOOL && kv->v.u > 1) return err_set(r->e, "%s: key '%s': bool value %llu", r->path, kv->key, (unsigned long long)kv->v.u);
    return 0;
}

static int read_tensor_info(Reader *r, GgufTensor *t) {
    uint32_t n_dims, type;
    if (read_str(r, &t->name, NULL, 1, "a tensor name") != 0) return -1;
    if (strlen(t->name) >= GGUF_MAX_NAME || t->name[0] == 0)
        return err_set(r->e, "%s: tensor name '%.80s' is empty or longer than %d bytes", r->path, t->name, GGUF_MAX_NAME - 1);
    if (read_u32(r, &n_dims, "a tensor's n_dims") != 0) return -1;
    if (n_dims > 4) return err_set(r->e, "%s: tensor '%s': n_dims %u is more than 4", r->path, t->name, n_dims);
    t->n_dims = (int)n_dims;
    for (int d = 0; d < 4; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        uint64_t ne;
        if (read_u64(r, &ne, "a tensor dimension") != 0) return -1;
        if (ne > (uint64_t)INT64_MAX) return err_set(r->e, "%s: tensor '%s': dimension %u is negative", r->path, t->name, d);
        t->ne[d] = (int64_t)ne;
    }
    if (read_u32(r, &type, "a tensor type") != 0 || read_u64(r, &t->offset, "a tensor offset") != 0) return -1;
    const TypeInfo *ti = type_info((int)type);
    if (!ti || type == TYPE_NF4) return err_set(r->e, "%s: tensor '%s': unsupported type %u", r->path, t->name, type);
    t->type = (int)type;
    return 0;
}

// Byte count of a tensor from its type and dims: the rows must be whole blocks; no overflow.
static int tensor_size(GgufTensor *t, const char *path, Err *e) {
    const TypeInfo *ti = type_info(t->type);
    if (t->ne[0] % ti->block != 0)
        return err_set(e, "%s: tensor '%s': row of %lld elements is not a multiple of %s's block of %d", path, t->name,
                       (long long)t->ne[0], ti->name, ti->block);
    size_t n = 0, elems = 1;
    int bad = (uint64_t)(t->ne[0] / ti->block) > SIZE_MAX || size_mul(&n, (size_t)(t->ne[0] / ti->block), ti->bytes) != 0;
    for (int d = 0; d < 4 && !bad; d++) {
        bad = (uint64_t)t->ne[d] > SIZE_MAX || size_mul(&elems, elems, (size_t)t->ne[d]) != 0;
        if (d > 0 && !bad) bad = size_mul(&n, n, (size_t)t->ne[d]) != 0;
    }
    if (bad || n > (size_t)INT64_MAX || elems > (size_t)INT64_MAX) return err_set(e, "%s: tensor '%s': size overflows", path, t->name);
    t->nbytes = n;
    return 0;
}

typedef struct {
    uint64_t offset;
    int index;
} OffsetIndex;

static int cmp_offset(const void *a, const void *b) {
    const OffsetIndex *x = a, *y = b;
    return x->offset < y->offset ? -1 : x->offset > y->offset ? 1 : x->index - y->index;
}

static int cmp_str_ptr(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

// The first of n names that occurs twice, or NULL. names[i] at base + i * stride.
static const char *find_duplicate(const void *base, size_t stride, int n) {
    char **sorted = xmalloc(sizeof(char *) * (size_t)(n > 0 ? n : 1));
    for (int i = 0; i < n; i++) memcpy(&sorted[i], (const char *)base + (size_t)i * stride, sizeof(char *));
    qsort(sorted, (size_t)n, sizeof(char *), cmp_str_ptr);
    const char *dup = NULL;
    for (int i = 1; i < n && !dup; i++)
        if (strcmp(sorted[i - 1], sorted[i]) == 0) dup = sorted[i];
    free(sorted);
    return dup;
}

// Sizes, alignment, bounds and overlaps of the tensor data; sets each tensor's data pointer.
static int place_tensors(GgufFile *g, Err *e) {
    size_t data_size = g->map.size > g->data_offset ? g->map.size - g->data_offset : 0;
    OffsetIndex *ord = xmalloc(sizeof(OffsetIndex) * (size_t)(g->n_tensors > 0 ? g->n_tensors : 1));
    int rc = 0;
    for (int i = 0; i < g->n_tensors && rc == 0; i++) {
        GgufTensor *t = &g->tensors[i];
        ord[i] = (OffsetIndex){t->offset, i};
        if (tensor_size(t, g->path, e) != 0) rc = -1;
        else if (t->offset % g->alignment != 0)
            rc = err_set(e, "%s: tensor '%s': data offset %llu is not a multiple of the alignment %zu", g->path, t->name,
                         (unsigned long long)t->offset, g->alignment);
        else if (t->offset > data_size || t->nbytes > data_size - t->offset)
            rc = err_set(e, "%s: tensor '%s': data [%llu, +%zu) is past the end of the file (data section of %zu bytes)",
                         g->path, t->name, (unsigned long long)t->offset, t->nbytes, data_size);
        else
            t->data = g->map.data + g->data_offset + t->offset;
    }
    if (rc == 0) qsort(ord, (size_t)g->n_tensors, sizeof *ord, cmp_offset);
    for (int i = 1; i < g->n_tensors && rc == 0; i++) {
        const GgufTensor *a = &g->tensors[ord[i - 1].index], *b = &g->tensors[ord[i].index];
        if (a->offset + a->nbytes > b->offset)
            rc = err_set(e, "%s: tensors '%s' and '%s' overlap in the data section", g->path, a->name, b->name);
    }
    free(ord);
    return rc;
}

static int read_header(Reader *r, GgufFile *g, uint64_t *n_tensors, uint64_t *n_kv) {
    char magic[4];
    if (read_bytes(r, magic, 4, "the magic") != 0) return -1;
    if (memcmp(magic, "GGUF", 4) != 0) return err_set(r->e, "%s: not a GGUF file (bad magic)", r->path);
    if (read_u32(r, &g->version, "the version") != 0) return -1;
    if (g->version == 1) return err_set(r->e, "%s: GGUF version 1 is not supported (2 and 3 are)", r->path);
    if (g->version > 0xFFFF) return err_set(r->e, "%s: big-endian GGUF files are not supported", r->path);
    if (g->version != 2 && g->version != 3) return err_set(r->e, "%s: unsupported GGUF version %u (2 and 3 are)", r->path, g->version);
    if (read_u64(r, n_tensors, "the tensor count") != 0 || read_u64(r, n_kv, "the metadata count") != 0) return -1;
    size_t left = r->size - r->pos;
    // Each key/value takes at least 12 bytes, each tensor info at least 24.
    if (*n_kv > left / 12 || *n_kv > INT32_MAX)
        return err_set(r->e, "%s: metadata count %llu cannot fit in the file", r->path, (unsigned long long)*n_kv);
    if (*n_tensors > left / 24 || *n_tensors > INT32_MAX)
        return err_set(r->e, "%s: tensor count %llu cannot fit in the file", r->path, (unsigned long long)*n_tensors);
    return 0;
}

static int read_alignment(GgufFile *g, Err *e) {
    g->alignment = 32;
    const GgufKV *kv = gguf_find_kv(g, "general.alignment");
    if (!kv) return 0;
    if (kv->type != GGUF_UINT32 || kv->v.u == 0 || (kv->v.u & (kv->v.u - 1)) != 0)
        return err_set(e, "%s: general.alignment must be a uint32 power of two", g->path);
    g->alignment = (size_t)kv->v.u;
    return 0;
}

static int parse(GgufFile *g, Err *e) {
    Reader r = {g->map.data, g->map.size, 0, g->path, e};
    uint64_t n_tensors = 0, n_kv = 0;
    if (read_header(&r, g, &n_tensors, &n_kv) != 0) return -1;
    g->kv = xcalloc((size_t)n_kv + 1, sizeof(GgufKV));
    for (uint64_t i = 0; i < n_kv; i++, g->n_kv++)
        if (read_kv(&r, &g->kv[i]) != 0) return g->n_kv++, -1;
    const char *dup = find_duplicate(&g->kv[0].key, sizeof(GgufKV), g->n_kv);
    if (dup) return err_set(e, "%s: metadata key '%s' appears twice", g->path, dup);
    if (read_alignment(g, e) != 0) return -1;
    g->tensors = xcalloc((size_t)n_tensors + 1, sizeof(GgufTensor));
    for (uint64_t i = 0; i < n_tensors; i++, g->n_tensors++)
        if (read_tensor_info(&r, &g->tensors[i]) != 0) return g->n_tensors++, -1;
    dup = find_duplicate(&g->tensors[0].name, sizeof(GgufTensor), g->n_tensors);
    if (dup) return err_set(e, "%s: tensor name '%s' appears twice", g->path, dup);
    g->data_offset = r.pos + (g->alignment - r.pos % g->alignment) % g->alignment;
    if (g->n_tensors > 0 && g->data_offset > g->map.size)
        return err_set(e, "%s: the data section starts at %zu, past the end of the file", g->path, g->data_offset);
    return place_tensors(g, e);
}

int gguf_open(GgufFile *g, const char *path, Err *e) {
    memset(g, 0, sizeof *g);
    g->path = xstrdup(path);
    int rc = file_map(&g->map, path, e);
    if (rc == 0) rc = parse(g, e);
    if (rc != 0) gguf_close(g);
    return rc;
}

void gguf_close(GgufFile *g) {
    for (int i = 0; i < g->n_kv; i++) {
        GgufKV *kv = &g->kv[i];
        for (uint64_t k = 0; kv->strs && k < kv->n; k++) free(kv->strs[k]);
        free(kv->key), free(kv->str), free(kv->arr), free(kv->strs), free(kv->str_lens);
    }
    for (int i = 0; i < g->n_tensors; i++) free(g->tensors[i].name);
    free(g->kv);
    free(g->tensors);
    if (g->map.data || g->map.size) file_unmap(&g->map);
    free(g->path);
    memset(g, 0, sizeof *g);
}

const GgufKV *gguf_find_kv(const GgufFile *g, const char *key) {
    for (int i = 0; i < g->n_kv; i++)
        if (g->kv[i].key && strcmp(g->kv[i].key, key) == 0) return &g->kv[i];
    return NULL;
}

const GgufTensor *gguf_find_tensor(const GgufFile *g, const char *name) {
    for (int i = 0; i < g->n_tensors; i++)
        if (g->tensors[i].name && strcmp(g->tensors[i].name, name) == 0) return &g->tensors[i];
    return NULL;
}

static int is_int_type(int t) {
    return t == GGUF_UINT8 || t == GGUF_INT8 || t == GGUF_UINT16 || t == GGUF_INT16 || t == GGUF_UINT32 ||
           t == GGUF_INT32 || t == GGUF_UINT64 || t == GGUF_INT64;
}

static int is_signed(int t) { return t == GGUF_INT8 || t == GGUF_INT16 || t == GGUF_INT32 || t == GGUF_INT64; }

int gguf_get_int(const GgufFile *g, const char *key, int64_t *out, int missing, Err *e) {
    const GgufKV *kv = gguf_find_kv(g, key);
    if (!kv) return missing;
    if (!is_int_type(kv->type)) return err_set(e, "%s: %s is not an integer", g->path, key);
    if (!is_signed(kv->type) && kv->v.u > (uint64_t)INT64_MAX) return err_set(e, "%s: %s is out of range", g->path, key);
    *out = is_signed(kv->type) ? kv->v.i : (int64_t)kv->v.u;
    return 0;
}

int gguf_get_float(const GgufFile *g, const char *key, double *out, int missing, Err *e) {
    const GgufKV *kv = gguf_find_kv(g, key);
    if (!kv) return missing;
    if (kv->type == GGUF_FLOAT32 || kv->type == GGUF_FLOAT64) *out = kv->v.f;
    else if (is_int_type(kv->type)) *out = is_signed(kv->type) ? (double)kv->v.i : (double)kv->v.u;
    else return err_set(e, "%s: %s is not a number", g->path, key);
    return 0;
}

int gguf_get_bool(const GgufFile *g, const char *key, int *out, int missing, Err *e) {
    const GgufKV *kv = gguf_find_kv(g, key);
    if (!kv) return missing;
    if (kv->type != GGUF_BOOL) return err_set(e, "%s: %s is not a bool", g->path, key);
    *out = (int)kv->v.u;
    return 0;
}

int gguf_get_str(const GgufFile *g, const char *key, const char **out, int missing, Err *e) {
    const GgufKV *kv = gguf_find_kv(g, key);
    if (!kv) return missing;
    if (kv->type != GGUF_STRING) return err_set(e, "%s: %s is not a string", g->path, key);
    *out = kv->str;
    return 0;
}

int64_t gguf_arr_int(const GgufKV *kv, uint64_t i) {
    size_t es = scalar_size((uint32_t)kv->arr_type);
    uint64_t u = load_le((const unsigned char *)kv->arr + i * es, (int)es);
    switch (kv->arr_type) {
    case GGUF_INT8: return (int8_t)u;
    case GGUF_INT16: return (int16_t)u;
    case GGUF_INT32: return (int32_t)u;
    default: return (int64_t)u;
    }
}

// ---------------------------------------------------------------------------------------------
// Writing: metadata and tensor infos are serialized into memory buffers, then written in one go.

static void buf_put(unsigned char **buf, size_t *len, size_t *cap, const void *p, size_t n) {
    if (n > *cap - *len) {
        size_t want = *cap ? *cap : 4096;
        while (want - *len < n) want *= 2;
        unsigned char *b = realloc(*buf, want);
        if (!b) {
            fprintf(stderr, "sft: out of memory (%zu bytes)\n", want);
            exit(1);
        }
        *buf = b;
        *cap = want;
    }
    memcpy(*buf + *len, p, n);
    *len += n;
}

static void put_le(GgufWriter *w, uint64_t v, int n) {
    unsigned char b[8];
    for (int i = 0; i < n; i++) b[i] = (unsigned char)(v >> (8 * i));
    buf_put(&w->meta, &w->meta_len, &w->meta_cap, b, (size_t)n);
}

static void put_str(GgufWriter *w, const char *s) {
    size_t n = strlen(s);
    put_le(w, n, 8);
    buf_put(&w->meta, &w->meta_len, &w->meta_cap, s, n);
}

// One scalar of `type` from *value (host representation) into the metadata buffer.
static void put_scalar(GgufWriter *w, int type, const void *value) {
    uint64_t u = 0;
    switch (type) {
    case GGUF_UINT8: case GGUF_BOOL: u = *(const uint8_t *)value; break;
    case GGUF_INT8: u = (uint8_t) * (const int8_t *)value; break;
    case GGUF_UINT16: u = *(const uint16_t *)value; break;
    case GGUF_INT16: u = (uint16_t) * (const int16_t *)value; break;
    case GGUF_UINT32: u = *(const uint32_t *)value; break;
    case GGUF_INT32: u = (uint32_t) * (const int32_t *)value; break;
    case GGUF_FLOAT32: { uint32_t x; memcpy(&x, value, 4); u = x; break; }
    case GGUF_UINT64: case GGUF_INT64: case GGUF_FLOAT64: memcpy(&u, value, 8); break;
    case GGUF_STRING: put_str(w, *(const char *const *)value); return;
    default: w->failed = 1; return;
    }
    put_le(w, u, (int)scalar_size((uint32_t)type));
}

int gguf_writer_open(GgufWriter *w, const char *path, Err *e) {
    memset(w, 0, sizeof *w);
    w->alignment = 32;
    return atomic_open(&w->af, path, e);
}

void gguf_add_kv(GgufWriter *w, const char *key, int type, const void *value) {
    if (strcmp(key, "general.alignment") == 0 && type == GGUF_UINT32) w->alignment = *(const uint32_t *)value;
    put_str(w, key);
    put_le(w, (uint64_t)type, 4);
    put_scalar(w, type, value);
    w->n_kv++;
}

void gguf_add_array(GgufWriter *w, const char *key, int elem_type, const void *values, uint64_t n) {
    put_str(w, key);
    put_le(w, GGUF_ARRAY, 4);
    put_le(w, (uint64_t)elem_type, 4);
    put_le(w, n, 8);
    size_t es = elem_type == GGUF_STRING ? sizeof(char *) : scalar_size((uint32_t)elem_type);
    if (es == 0) w->failed = 1;
    for (uint64_t i = 0; i < n && es; i++) put_scalar(w, elem_type, (const char *)values + i * es);
    w->n_kv++;
}

void gguf_add_u32(GgufWriter *w, const char *key, uint32_t v) { gguf_add_kv(w, key, GGUF_UINT32, &v); }
void gguf_add_f32(GgufWriter *w, const char *key, float v) { gguf_add_kv(w, key, GGUF_FLOAT32, &v); }
void gguf_add_str(GgufWriter *w, const char *key, const char *s) { gguf_add_kv(w, key, GGUF_STRING, &s); }
void gguf_add_bool(GgufWriter *w, const char *key, int v) {
    uint8_t b = v != 0;
    gguf_add_kv(w, key, GGUF_BOOL, &b);
}

// Tensor infos go into w->infos with offset 0 for now; gguf_write_header fills the offsets.
int gguf_add_tensor(GgufWriter *w, const char *name, int type, int n_dims, const int64_t *ne, Err *e) {
    const TypeInfo *ti = type_info(type);
    const char *path = w->af.path;
    if (!ti || type == TYPE_NF4) return err_set(e, "%s: tensor '%s': type %d cannot be stored in GGUF", path, name, type);
    if (n_dims < 1 || n_dims > 4) return err_set(e, "%s: tensor '%s': %d dimensions", path, name, n_dims);
    size_t n = row_bytes(type, ne[0]);
    if (n == 0 && ne[0] != 0) return err_set(e, "%s: tensor '%s': row of %lld is not whole %s blocks", path, name, (long long)ne[0], ti->name);
    for (int d = 1; d < n_dims; d++)
        if (ne[d] < 0 || size_mul(&n, n, (size_t)ne[d]) != 0) return err_set(e, "%s: tensor '%s': bad shape", path, name);
    size_t *sizes = realloc(w->sizes, sizeof(size_t) * (size_t)(w->n_tensors + 1));
    if (!sizes) return err_set(e, "out of memory");
    w->sizes = sizes;
    w->sizes[w->n_tensors++] = n;
    unsigned char b[8];
    uint64_t len = strlen(name);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(len >> (8 * i));
    buf_put(&w->infos, &w->infos_len, &w->infos_cap, b, 8);
    buf_put(&w->infos, &w->infos_len, &w->infos_cap, name, (size_t)len);
    uint64_t fields[6] = {(uint64_t)n_dims, 0, 0, 0, 0, 0};
    for (int d = 0; d < n_dims; d++) fields[1 + d] = (uint64_t)ne[d];
    for (int f = 0; f <= n_dims; f++) {
        for (int i = 0; i < 8; i++) b[i] = (unsigned char)(fields[f] >> (8 * i));
        buf_put(&w->infos, &w->infos_len, &w->infos_cap, b, f == 0 ? 4 : 8);
    }
    for (int i = 0; i < 4; i++) b[i] = (unsigned char)((uint32_t)type >> (8 * i));
    buf_put(&w->infos, &w->infos_len, &w->infos_cap, b, 4);
    memset(b, 0, 8);
    buf_put(&w->infos, &w->infos_len, &w->infos_cap, b, 8);  // offset, filled in by gguf_write_header
    return 0;
}

static size_t pad_to(size_t n, size_t align) { return (align - n % align) % align; }

// Walks the serialized infos and writes each tensor's data offset (padded to the alignment).
static void fill_offsets(GgufWriter *w) {
    size_t pos = 0;
    uint64_t offset = 0;
    for (uint64_t t = 0; t < w->n_tensors; t++) {
        uint64_t name_len = load_le(w->infos + pos, 8);
        pos += 8 + name_len;
        uint32_t n_dims = (uint32_t)load_le(w->infos + pos, 4);
        pos += 4 + 8 * (size_t)n_dims + 4;
        for (int i = 0; i < 8; i++) w->infos[pos + i] = (unsigned char)(offset >> (8 * i));
        pos += 8;
        offset += w->sizes[t] + pad_to(w->sizes[t], w->alignment);
    }
}

// "PATH: write error: REASON" for a write to w's file that failed, REASON from errno.
static int write_error(const GgufWriter *w, Err *e) {
    int saved = errno;
    return err_set(e, "%s: write error: %s", w->af.path, saved ? strerror(saved) : "unknown I/O error");
}

int gguf_write_header(GgufWriter *w, Err *e) {
    if (w->failed) return err_set(e, "%s: bad metadata value type", w->af.path);
    if (w->alignment == 0 || (w->alignment & (w->alignment - 1))) return err_set(e, "%s: alignment is not a power of two", w->af.path);
    fill_offsets(w);
    unsigned char h[24] = {'G', 'G', 'U', 'F', 3, 0, 0, 0};
    for (int i = 0; i < 8; i++) h[8 + i] = (unsigned char)(w->n_tensors >> (8 * i));
    for (int i = 0; i < 8; i++) h[16 + i] = (unsigned char)(w->n_kv >> (8 * i));
    FILE *f = w->af.f;
    errno = 0;
    if (fwrite(h, 1, sizeof h, f) != sizeof h || fwrite(w->meta, 1, w->meta_len, f) != w->meta_len ||
        fwrite(w->infos, 1, w->infos_len, f) != w->infos_len)
        return write_error(w, e);
    size_t pos = sizeof h + w->meta_len + w->infos_len;
    for (size_t i = pad_to(pos, w->alignment); i > 0; i--)
        if (fputc(0, f) == EOF) return write_error(w, e);
    return 0;
}

// Moves past finished (and empty) tensors, padding each one's data to the alignment.
static void finish_tensors(GgufWriter *w) {
    while (w->cur < w->n_tensors && w->cur_written == w->sizes[w->cur]) {
        for (size_t i = pad_to(w->sizes[w->cur], w->alignment); i > 0; i--) fputc(0, w->af.f);
        w->cur++;
        w->cur_written = 0;
    }
}

int gguf_write_data(GgufWriter *w, const void *data, size_t n, Err *e) {
    const unsigned char *p = data;
    while (n > 0) {
        finish_tensors(w);
        if (w->cur >= w->n_tensors) return err_set(e, "%s: more tensor data than the tensor infos announce", w->af.path);
        size_t k = w->sizes[w->cur] - w->cur_written;
        if (k > n) k = n;
        errno = 0;
        if (fwrite(p, 1, k, w->af.f) != k) return write_error(w, e);
        w->cur_written += k;
        p += k;
        n -= k;
    }
    finish_tensors(w);
    return 0;
}

static void free_writer(GgufWriter *w) {
    free(w->meta);
    free(w->infos);
    free(w->sizes);
    w->meta = w->infos = NULL;
    w->sizes = NULL;
}

int gguf_writer_close(GgufWriter *w, Err *e) {
    finish_tensors(w);
    int short_data = w->cur < w->n_tensors;
    free_writer(w);
    if (short_data) {
        atomic_abort(&w->af);
        return err_set(e, "%s: tensor data missing at the end", w->af.path);
    }
    return atomic_close(&w->af, e);
}

void gguf_writer_abort(GgufWriter *w) {
    free_writer(w);
    atomic_abort(&w->af);
}
