// safetensors.h: Hugging Face's safetensors files (one file, or the shards of a model directory
// listed in model.safetensors.index.json), read through a memory mapping, and written atomically.
//
// Layout of a file:  |u64 N (little endian)|N bytes of JSON header|tensor data|
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
// relative to the data section) and may hold "__metadata__": {string: string}.
// Only F32, F16 and BF16 tensors are supported (what models and PEFT adapters use).
// Also here: FileMap, the read-only file mapping that gguf.c shares. Read gguf.h next.
#ifndef SAFETENSORS_H
#define SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>
#include "common.h"

// A whole file, read-only: mmap'ed, or read into a buffer when mmap is not available.
typedef struct {
    const unsigned char *data;  // [size] bytes
    size_t size;
    int mapped;                 // 1: munmap on close; 0: free
} FileMap;
int file_map(FileMap *m, const char *path, Err *e);
void file_unmap(FileMap *m);

// One tensor. The writer reads name, type, n_dims, shape and data; the reader fills every field.
// Shapes are as in PyTorch: shape[n_dims - 1] is the fastest-varying dimension (row-major).
typedef struct {
    const char *name;
    int type;           // TYPE_F32, TYPE_F16 or TYPE_BF16 (quant.h)
    int n_dims;         // 0..4 (0: a scalar of one element)
    int64_t shape[4];
    const void *data;   // nbytes bytes, little endian; not necessarily aligned for the reader
    size_t nbytes;      // reader: element count x element size (writer: ignored)
} StTensor;

// Writes the tensors, in the order given, into `path` atomically (temporary file + rename).
// metadata_json is NULL or a JSON object whose values are all strings, e.g. {"format":"pt"},
// stored as "__metadata__". Names must be unique, non-empty UTF-8. The header is padded with
// spaces to a multiple of 8 bytes, as the reference implementation does.
int safetensors_write(const char *path, const StTensor *tensors, int n, const char *metadata_json, Err *e);

// An open file. Tensors are in the order of their data offsets.
typedef struct {
    char *path;
    FileMap map;
    StTensor *tensors;   // [n]; names owned here, data points into map
    int n;
    char **meta_keys;    // [n_meta] "__metadata__" entries, NUL-terminated UTF-8
    char **meta_values;  // [n_meta]
    int n_meta;
} StFile;

// Opens and validates a file: header length, JSON, dtypes, shapes, byte counts, offsets inside the
// data section, no overlap and no gap, unique names. On error fills e ("PATH: reason") and
// leaves f empty (safetensors_close on it is harmless).
int safetensors_open(StFile *f, const char *path, Err *e);
void safetensors_close(StFile *f);
const StTensor *safetensors_find(const StFile *f, const char *name);
const char *safetensors_metadata(const StFile *f, const char *key);  // NULL when absent

// The weights of a model directory: DIR/model.safetensors, or the shards named by
// DIR/model.safetensors.index.json ("weight_map": {tensor: file}). Every tensor of the index must
// be in the file it names; every tensor of a shard must be in the index; no name twice.
typedef struct {
    StFile *files;   // [n_files]
    int n_files;
} StModel;
int safetensors_open_dir(StModel *s, const char *dir, Err *e);
void safetensors_close_dir(StModel *s);
// The tensor and the file holding it (for messages), or NULL.
const StTensor *safetensors_dir_find(const StModel *s, const char *name, const StFile **file);

#endif
