// gguf.h: GGUF files (versions 2 and 3), the format of llama.cpp / ggml: read and write.
//
// Layout (all little endian):
//   |"GGUF"|u32 version|u64 n_tensors|u64 n_kv|
//   n_kv x   |string key|u32 value type|value|          string = |u64 len|len bytes, no NUL|
//   n_tensors x |string name|u32 n_dims|n_dims x u64 ne|u32 type|u64 offset|
//   padding to general.alignment (default 32), then the data section; each tensor's offset is
//   relative to it and a multiple of the alignment.
// Dimensions are fastest-first: a matrix W[rows, cols] has ne[0] = cols, ne[1] = rows.
// An array value is |u32 element type|u64 count|elements| (arrays of arrays are not supported).
// What the model keys mean is modelfile.c's business; this file only knows the container.
#ifndef GGUF_H
#define GGUF_H

#include <stddef.h>
#include <stdint.h>
#include "common.h"
#include "safetensors.h"  // FileMap

typedef enum {
    GGUF_UINT8 = 0, GGUF_INT8 = 1, GGUF_UINT16 = 2, GGUF_INT16 = 3, GGUF_UINT32 = 4, GGUF_INT32 = 5,
    GGUF_FLOAT32 = 6, GGUF_BOOL = 7, GGUF_STRING = 8, GGUF_ARRAY = 9, GGUF_UINT64 = 10,
    GGUF_INT64 = 11, GGUF_FLOAT64 = 12,
} GgufType;

// One metadata entry. Scalars are held in the union; strings and arrays are copied out of the file.
typedef struct {
    char *key;              // NUL-terminated UTF-8
    int type;               // GgufType
    int arr_type;           // GGUF_ARRAY: the element type
    uint64_t n;             // GGUF_ARRAY: element count; GGUF_STRING: bytes
    union {
        uint64_t u;         // UINT8..UINT64, BOOL (0/1)
        int64_t i;          // INT8..INT64
        double f;           // FLOAT32, FLOAT64
    } v;
    char *str;              // GGUF_STRING: [n] bytes + NUL
    void *arr;              // GGUF_ARRAY of numbers/bools: [n] elements as stored (little endian)
    char **strs;            // GGUF_ARRAY of strings: [n] NUL-terminated copies
    uint64_t *str_lens;     // GGUF_ARRAY of strings: [n] byte lengths
} GgufKV;

typedef struct {
    char *name;
    int type;               // Type (quant.h), a known one
    int n_dims;             // 1..4
    int64_t ne[4];          // fastest-first; unused dims are 1
    uint64_t offset;        // in the data section
    size_t nbytes;
    const void *data;       // points into the mapping
} GgufTensor;

typedef struct {
    char *path;
    uint32_t version;
    FileMap map;
    GgufKV *kv;             // [n_kv] in file order
    int n_kv;
    GgufTensor *tensors;    // [n_tensors] in file order
    int n_tensors;
    size_t alignment;       // general.alignment or 32
    size_t data_offset;     // start of the data section in the file
} GgufFile;

// Opens, parses and validates the container: magic, version, counts, every string and array
// length, value types, tensor types, dims (n_dims <= 4, products without overflow, rows a whole
// number of blocks), offsets aligned and inside the file, no overlapping tensors, unique keys and
// tensor names, valid UTF-8. Errors name the file and the item. g is empty after an error.
int gguf_open(GgufFile *g, const char *path, Err *e);
void gguf_close(GgufFile *g);

const GgufKV *gguf_find_kv(const GgufFile *g, const char *key);
const GgufTensor *gguf_find_tensor(const GgufFile *g, const char *name);

// Typed getters. Missing key: return `missing` (0 or -1 as the caller wishes) without touching e.
// Present with a wrong type or out of range: -1 with e filled. Integers of every width are accepted
// by gguf_get_int; floats of both widths (and integers) by gguf_get_float.
int gguf_get_int(const GgufFile *g, const char *key, int64_t *out, int missing, Err *e);
int gguf_get_float(const GgufFile *g, const char *key, double *out, int missing, Err *e);
int gguf_get_bool(const GgufFile *g, const char *key, int *out, int missing, Err *e);
int gguf_get_str(const GgufFile *g, const char *key, const char **out, int missing, Err *e);
// Element i of an integer array (any integer width), as int64.
int64_t gguf_arr_int(const GgufKV *kv, uint64_t i);

// ---------------------------------------------------------------------------------------------
// Writing. Collect the metadata and the tensor infos first, then write the header, then stream
// each tensor's bytes in the same order (in as many pieces as you like: a row at a time);
// the writer pads between tensors. Output goes to a temporary file renamed on gguf_writer_close.
// Keys and names are not checked for duplicates here (the tests build broken files with it).
typedef struct {
    AtomicFile af;
    unsigned char *meta;     // serialized key/value pairs
    size_t meta_len, meta_cap;
    uint64_t n_kv;
    unsigned char *infos;    // serialized tensor infos
    size_t infos_len, infos_cap;
    uint64_t n_tensors;
    size_t *sizes;           // [n_tensors] bytes of each tensor
    size_t alignment;
    uint64_t cur;            // tensor being written
    size_t cur_written;      // bytes of it written so far
    int failed;              // a write failed: close reports it
} GgufWriter;

int gguf_writer_open(GgufWriter *w, const char *path, Err *e);
// Scalars: value points to a value of the type (uint8_t, int16_t, float, double, ..., BOOL: uint8_t;
// STRING: a NUL-terminated const char *).
void gguf_add_kv(GgufWriter *w, const char *key, int type, const void *value);
// Arrays: values points to n elements of elem_type (STRING: const char *const *).
void gguf_add_array(GgufWriter *w, const char *key, int elem_type, const void *values, uint64_t n);
void gguf_add_u32(GgufWriter *w, const char *key, uint32_t v);
void gguf_add_f32(GgufWriter *w, const char *key, float v);
void gguf_add_bool(GgufWriter *w, const char *key, int v);
void gguf_add_str(GgufWriter *w, const char *key, const char *s);
// ne fastest-first, as in the file. Returns -1 (e filled) for a bad type or shape.
int gguf_add_tensor(GgufWriter *w, const char *name, int type, int n_dims, const int64_t *ne, Err *e);
int gguf_write_header(GgufWriter *w, Err *e);
int gguf_write_data(GgufWriter *w, const void *data, size_t n, Err *e);
// Checks that every tensor was written in full, then renames the file into place.
int gguf_writer_close(GgufWriter *w, Err *e);
void gguf_writer_abort(GgufWriter *w);   // frees everything, removes the temporary file

#endif
