// safetensors.c: reads safetensors files (mapped, validated down to the last byte) and the shards
// of a Hugging Face model directory; writes them atomically (adapters, gradients, tests).
//
// Leaves out: dtypes other than F32/F16/BF16, and what the tensor names mean (modelfile.c maps
// Hugging Face names onto the model; lora.c reads adapters). Read safetensors.h first.
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "json.h"
#include "quant.h"

// The reference implementation refuses headers over 100 MB; so do we.
#define ST_MAX_HEADER ((uint64_t)100 << 20)
// JSON numbers are doubles: integers are exact up to 2^53.
#define ST_MAX_INT 9007199254740992.0

// ---------------------------------------------------------------------------------------------
// FileMap

// Reads the whole file with read() when mmap is not possible (empty files, odd file systems).
static int read_all(FileMap *m, int fd, size_t size, const char *path, Err *e) {
    unsigned char *buf = xmalloc(size);
    size_t got = 0;
    while (got < size) {
        ssize_t r = read(fd, buf + got, size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            free(buf);
            return err_set(e, "%s: read error: %s", path, r < 0 ? strerror(errno) : "file shrank while reading");
        }
        got += (size_t)r;
    }
    m->data = buf;
    m->size = size;
    m->mapped = 0;
    return 0;
}

int file_map(FileMap *m, const char *path, Err *e) {
    memset(m, 0, sizeof *m);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return err_set(e, "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return err_set(e, "%s: not a regular file", path);
    }
    if ((uint64_t)st.st_size > (uint64_t)SIZE_MAX / 2) {
        close(fd);
        return err_set(e, "%s: file too large", path);
    }
    size_t size = (size_t)st.st_size;
    int rc = 0;
    void *p = size > 0 ? mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
    if (p != MAP_FAILED) {
        m->data = p;
        m->size = size;
        m->mapped = 1;
    } else {
        rc = read_all(m, fd, size, path, e);
    }
    close(fd);
    return rc;
}

void file_unmap(FileMap *m) {
    if (m->mapped) munmap((void *)m->data, m->size);
    else free((void *)m->data);
    memset(m, 0, sizeof *m);
}

// ---------------------------------------------------------------------------------------------
// Shared helpers

static const char *dtype_name(int type) {
    return type == TYPE_F32 ? "F32" : type == TYPE_F16 ? "F16" : type == TYPE_BF16 ? "BF16" : NULL;
}

static size_t dtype_size(int type) { return type == TYPE_F32 ? 4 : 2; }

// Bytes of a tensor: product of the shape x element size; -1 on overflow or a negative dim.
static int tensor_bytes(size_t *out, int type, int n_dims, const int64_t *shape) {
    size_t n = dtype_size(type);
    for (int d = 0; d < n_dims; d++) {
        if (shape[d] < 0 || (uint64_t)shape[d] > SIZE_MAX) return -1;
        if (size_mul(&n, n, (size_t)shape[d]) != 0) return -1;
    }
    *out = n;
    return 0;
}

static int cmp_str_ptr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

// The first name that occurs twice, or NULL.
static const char *find_duplicate(const char **names, int n) {
    const char **sorted = xmalloc(sizeof(char *) * (size_t)(n > 0 ? n : 1));
    memcpy(sorted, names, sizeof(char *) * (size_t)n);
    qsort(sorted, (size_t)n, sizeof(char *), cmp_str_ptr);
    const char *dup = NULL;
    for (int i = 1; i < n && !dup; i++)
        if (strcmp(sorted[i - 1], sorted[i]) == 0) dup = sorted[i];
    free(sorted);
    return dup;
}

// ---------------------------------------------------------------------------------------------
// Writing

// Writes the "__metadata__" member from metadata_json (an object of strings), re-serialized.
static int write_metadata(FILE *h, const char *path, const char *metadata_json, Err *e) {
    Json j;
    Err je;
    if (json_parse(&j, metadata_json, strlen(metadata_json), &je) != 0)
        return err_set(e, "%s: metadata: %s", path, je.msg);
    int rc = 0;
    if (j.type != JSON_OBJECT) rc = err_set(e, "%s: metadata is not a JSON object", path);
    for (size_t i = 0; rc == 0 && i < j.len; i++)
        if (j.items[i].type != JSON_STRING) rc = err_set(e, "%s: metadata '%s' is not a string", path, j.keys[i]);
    if (rc == 0) {
        fputs("\"__metadata__\":{", h);
        for (size_t i = 0; i < j.len; i++) {
            if (i) fputc(',', h);
            json_write_string(h, j.keys[i], j.key_lens[i]);
            fputc(':', h);
            json_write_string(h, j.items[i].str, j.items[i].len);
        }
        fputc('}', h);
    }
    json_free(&j);
    return rc;
}

// Checks the tensors and computes their byte counts into sizes[n].
static int check_tensors(const char *path, const StTensor *t, int n, size_t *sizes, Err *e) {
    const char **names = xmalloc(sizeof(char *) * (size_t)(n > 0 ? n : 1));
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        names[i] = t[i].name;
        if (!t[i].name || !t[i].name[0] || strcmp(t[i].name, "__metadata__") == 0)
            rc = err_set(e, "%s: tensor %d has no usable name", path, i);
        else if (!dtype_name(t[i].type))
            rc = err_set(e, "%s: tensor '%s': type %d cannot be stored (F32, F16, BF16 only)", path, t[i].name, t[i].type);
        else if (t[i].n_dims < 0 || t[i].n_dims > 4 || tensor_bytes(&sizes[i], t[i].type, t[i].n_dims, t[i].shape) != 0)
            rc = err_set(e, "%s: tensor '%s': bad shape", path, t[i].name);
        else if (!t[i].data && sizes[i] > 0)
            rc = err_set(e, "%s: tensor '%s': no data", path, t[i].name);
    }
    const char *dup = rc == 0 ? find_duplicate(names, n) : NULL;
    if (dup) rc = err_set(e, "%s: tensor name '%s' given twice", path, dup);
    free(names);
    return rc;
}

// The JSON header (without padding) into a malloc'ed buffer.
static int build_header(char **out, size_t *out_len, const char *path, const StTensor *t, int n,
                        const size_t *sizes, const char *metadata_json, Err *e) {
    FILE *h = open_memstream(out, out_len);
    if (!h) return err_set(e, "%s: cannot build the header", path);
    fputc('{', h);
    int rc = metadata_json ? write_metadata(h, path, metadata_json, e) : 0;
    size_t offset = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        if (i || metadata_json) fputc(',', h);
        json_write_string(h, t[i].name, strlen(t[i].name));
        fprintf(h, ":{\"dtype\":\"%s\",\"shape\":[", dtype_name(t[i].type));
        for (int d = 0; d < t[i].n_dims; d++) fprintf(h, "%s%lld", d ? "," : "", (long long)t[i].shape[d]);
        if (size_add(&offset, offset, sizes[i]) != 0) rc = err_set(e, "%s: tensors too large", path);
        fprintf(h, "],\"data_offsets\":[%zu,%zu]}", offset - sizes[i], offset);
    }
    fputc('}', h);
    if (fclose(h) != 0 && rc == 0) rc = err_set(e, "%s: cannot build the header", path);
    if (rc != 0) free(*out);
    return rc;
}

int safetensors_write(const char *path, const StTensor *tensors, int n, const char *metadata_json, Err *e) {
    if (n < 0) return err_set(e, "%s: negative tensor count", path);
    size_t *sizes = xmalloc(sizeof(size_t) * (size_t)(n > 0 ? n : 1));
    char *header = NULL;
    size_t header_len = 0;
    if (check_tensors(path, tensors, n, sizes, e) != 0 ||
        build_header(&header, &header_len, path, tensors, n, sizes, metadata_json, e) != 0) {
        free(sizes);
        return -1;
    }
    size_t padded = (header_len + 7) / 8 * 8;
    AtomicFile af;
    if (atomic_open(&af, path, e) != 0) {
        free(sizes);
        free(header);
        return -1;
    }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    fwrite(len8, 1, 8, af.f);
    fwrite(header, 1, header_len, af.f);
    for (size_t i = header_len; i < padded; i++) fputc(' ', af.f);
    for (int i = 0; i < n; i++)
        if (sizes[i]) fwrite(tensors[i].data, 1, sizes[i], af.f);
    free(sizes);
    free(header);
    return atomic_close(&af, e);
}

// ---------------------------------------------------------------------------------------------
// Reading

// A JSON number that is a whole number in [0, 2^53].
static int json_uint(const Json *j, uint64_t *out) {
    if (!j || j->type != JSON_NUMBER || !(j->number >= 0 && j->number <= ST_MAX_INT) || j->number != (double)(uint64_t)j->number)
        return -1;
    *out = (uint64_t)j->number;
    return 0;
}

static int parse_dtype(const Json *j) {
    if (!j || j->type != JSON_STRING) return -1;
    if (strcmp(j->str, "F32") == 0) return TYPE_F32;
    if (strcmp(j->str, "F16") == 0) return TYPE_F16;
    if (strcmp(j->str, "BF16") == 0) return TYPE_BF16;
    return -1;
}

// Fills t from the header entry j (name already set) and checks it against the data section.
static int parse_entry(StTensor *t, uint64_t *begin, const Json *j, const char *path, size_t data_size, Err *e) {
    if (j->type != JSON_OBJECT) return err_set(e, "%s: tensor '%s': header entry is not an object", path, t->name);
    const Json *dtype = json_get(j, "dtype"), *shape = json_get(j, "shape"), *offs = json_get(j, "data_offsets");
    if (!dtype || !shape || !offs || j->len != 3)
        return err_set(e, "%s: tensor '%s': header entry needs exactly dtype, shape and data_offsets", path, t->name);
    t->type = parse_dtype(dtype);
    if (t->type < 0)
        return err_set(e, "%s: tensor '%s': dtype %s%s%s not supported (F32, F16, BF16)", path, t->name,
                       dtype->type == JSON_STRING ? "'" : "", dtype->type == JSON_STRING ? dtype->str : "(not a string)",
                       dtype->type == JSON_STRING ? "'" : "");
    if (shape->type != JSON_ARRAY || shape->len > 4)
        return err_set(e, "%s: tensor '%s': shape is not an array of at most 4 dimensions", path, t->name);
    t->n_dims = (int)shape->len;
    for (int d = 0; d < t->n_dims; d++) {
        uint64_t v;
        if (json_uint(&shape->items[d], &v) != 0) return err_set(e, "%s: tensor '%s': bad dimension in shape", path, t->name);
        t->shape[d] = (int64_t)v;
    }
    uint64_t end;
    if (offs->type != JSON_ARRAY || offs->len != 2 || json_uint(&offs->items[0], begin) != 0 ||
        json_uint(&offs->items[1], &end) != 0 || *begin > end)
        return err_set(e, "%s: tensor '%s': data_offsets is not [begin, end] with begin <= end", path, t->name);
    if (tensor_bytes(&t->nbytes, t->type, t->n_dims, t->shape) != 0)
        return err_set(e, "%s: tensor '%s': shape too large", path, t->name);
    if (end - *begin != t->nbytes)
        return err_set(e, "%s: tensor '%s': data_offsets span %llu bytes but dtype and shape need %zu", path, t->name,
                       (unsigned long long)(end - *begin), t->nbytes);
    if (end > data_size)
        return err_set(e, "%s: tensor '%s': data [%llu, %llu) is past the end of the file (data section of %zu bytes)",
                       path, t->name, (unsigned long long)*begin, (unsigned long long)end, data_size);
    return 0;
}

static int parse_metadata(StFile *f, const Json *j, Err *e) {
    if (j->type != JSON_OBJECT) return err_set(e, "%s: __metadata__ is not an object", f->path);
    f->meta_keys = xcalloc(j->len + 1, sizeof(char *));
    f->meta_values = xcalloc(j->len + 1, sizeof(char *));
    for (size_t i = 0; i < j->len; i++) {
        if (j->items[i].type != JSON_STRING)
            return err_set(e, "%s: __metadata__ '%s' is not a string", f->path, j->keys[i]);
        f->meta_keys[f->n_meta] = xstrdup(j->keys[i]);
        f->meta_values[f->n_meta] = xstrdup(j->items[i].str);
        f->n_meta++;
    }
    return 0;
}

typedef struct {
    uint64_t begin;
    int index;
} OffsetIndex;

static int cmp_offset(const void *a, const void *b) {
    const OffsetIndex *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : x->index - y->index;
}

// Orders f->tensors by offset and checks that they tile the data section with no gap or overlap.
static int order_by_offset(StFile *f, const uint64_t *begins, size_t data_size, Err *e) {
    OffsetIndex *ord = xmalloc(sizeof(OffsetIndex) * (size_t)(f->n > 0 ? f->n : 1));
    for (int i = 0; i < f->n; i++) ord[i] = (OffsetIndex){begins[i], i};
    qsort(ord, (size_t)f->n, sizeof *ord, cmp_offset);
    StTensor *sorted = xmalloc(sizeof(StTensor) * (size_t)(f->n > 0 ? f->n : 1));
    uint64_t pos = 0;
    int rc = 0;
    for (int i = 0; i < f->n; i++) {
        sorted[i] = f->tensors[ord[i].index];
        if (ord[i].begin != pos && rc == 0)
            rc = err_set(e, "%s: tensor '%s': data starts at %llu, expected %llu (tensors must tile the data without gaps or overlaps)",
                         f->path, sorted[i].name, (unsigned long long)ord[i].begin, (unsigned long long)pos);
        pos = ord[i].begin + sorted[i].nbytes;
    }
    if (rc == 0 && pos != data_size)
        rc = err_set(e, "%s: %llu bytes of data after the last tensor", f->path, (unsigned long long)(data_size - pos));
    free(f->tensors);
    f->tensors = sorted;
    free(ord);
    return rc;
}

// Parses the header JSON and fills f's tensors and metadata.
static int parse_header(StFile *f, const Json *h, size_t data_size, const unsigned char *data, Err *e) {
    if (h->type != JSON_OBJECT) return err_set(e, "%s: header is not a JSON object", f->path);
    if (h->len > (size_t)INT32_MAX) return err_set(e, "%s: too many tensors", f->path);
    f->tensors = xcalloc(h->len + 1, sizeof(StTensor));
    uint64_t *begins = xcalloc(h->len + 1, sizeof(uint64_t));
    const char **names = xcalloc(h->len + 1, sizeof(char *));
    int rc = 0, n_names = 0;
    for (size_t i = 0; i < h->len && rc == 0; i++) {
        names[n_names++] = h->keys[i];
        if (h->key_lens[i] != strlen(h->keys[i]) || h->key_lens[i] == 0) {
            rc = err_set(e, "%s: a tensor name is empty or holds a NUL character", f->path);
        } else if (strcmp(h->keys[i], "__metadata__") == 0) {
            rc = f->meta_keys ? 0 : parse_metadata(f, &h->items[i], e);
        } else {
            StTensor *t = &f->tensors[f->n];
            t->name = xstrdup(h->keys[i]);
            f->n++;
            rc = parse_entry(t, &begins[f->n - 1], &h->items[i], f->path, data_size, e);
            if (rc == 0) t->data = data + begins[f->n - 1];
        }
    }
    const char *dup = rc == 0 ? find_duplicate(names, n_names) : NULL;
    if (dup) rc = err_set(e, "%s: '%s' appears twice in the header", f->path, dup);
    if (rc == 0) rc = order_by_offset(f, begins, data_size, e);
    free(begins);
    free(names);
    return rc;
}

int safetensors_open(StFile *f, const char *path, Err *e) {
    memset(f, 0, sizeof *f);
    f->path = xstrdup(path);
    if (file_map(&f->map, path, e) != 0) {
        safetensors_close(f);
        return -1;
    }
    const unsigned char *p = f->map.data;
    size_t size = f->map.size;
    uint64_t n = 0;
    for (int i = 0; i < 8 && size >= 8; i++) n |= (uint64_t)p[i] << (8 * i);
    int rc = 0;
    if (size < 8) rc = err_set(e, "%s: too short for a safetensors file (%zu bytes)", path, size);
    else if (n > size - 8) rc = err_set(e, "%s: header length %llu is past the end of the file (%zu bytes)", path, (unsigned long long)n, size);
    else if (n > ST_MAX_HEADER) rc = err_set(e, "%s: header length %llu is over the 100 MB limit", path, (unsigned long long)n);
    else if (n < 2) rc = err_set(e, "%s: header of %llu bytes cannot be a JSON object", path, (unsigned long long)n);
    else if (p[8] != '{') rc = err_set(e, "%s: header does not start with '{': not a safetensors file", path);
    Json h;
    Err je;
    if (rc == 0 && json_parse(&h, (const char *)p + 8, (size_t)n, &je) != 0) rc = err_set(e, "%s: header: %s", path, je.msg);
    else if (rc == 0) {
        rc = parse_header(f, &h, size - 8 - (size_t)n, p + 8 + n, e);
        json_free(&h);
    }
    if (rc != 0) safetensors_close(f);
    return rc;
}

void safetensors_close(StFile *f) {
    for (int i = 0; i < f->n; i++) free((char *)f->tensors[i].name);
    for (int i = 0; i < f->n_meta; i++) free(f->meta_keys[i]), free(f->meta_values[i]);
    free(f->tensors);
    free(f->meta_keys);
    free(f->meta_values);
    if (f->map.data || f->map.size) file_unmap(&f->map);
    free(f->path);
    memset(f, 0, sizeof *f);
}

const StTensor *safetensors_find(const StFile *f, const char *name) {
    for (int i = 0; i < f->n; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
    return NULL;
}

const char *safetensors_metadata(const StFile *f, const char *key) {
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta_keys[i], key) == 0) return f->meta_values[i];
    return NULL;
}

// ---------------------------------------------------------------------------------------------
// Model directories

static char *path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = xmalloc(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

// Index of file `name` among the shard names, adding it when new.
static int shard_slot(char ***names, int *n, const char *name) {
    for (int i = 0; i < *n; i++)
        if (strcmp((*names)[i], name) == 0) return i;
    *names = realloc(*names, sizeof(char *) * (size_t)(*n + 1));
    if (!*names) exit(1);
    (*names)[*n] = xstrdup(name);
    return (*n)++;
}

// A shard file name must stay inside the directory.
static int bad_shard_name(const char *s) {
    return s[0] == 0 || strchr(s, '/') != NULL || strcmp(s, ".") == 0 || strcmp(s, "..") == 0;
}

// Opens every shard named by the index and checks the index against the shards' contents.
static int open_shards(StModel *s, const char *dir, const char *index_path, const Json *map, Err *e) {
    char **names = NULL;
    int n_names = 0, rc = 0;
    int *slot = xcalloc(map->len + 1, sizeof(int));
    for (size_t i = 0; i < map->len && rc == 0; i++) {
        const Json *v = &map->items[i];
        if (v->type != JSON_STRING || bad_shard_name(v->str) || v->len != strlen(v->str))
            rc = err_set(e, "%s: weight_map['%s'] is not a file name in the directory", index_path, map->keys[i]);
        else if (n_names >= 100000)
            rc = err_set(e, "%s: too many shard files", index_path);
        else
            slot[i] = shard_slot(&names, &n_names, v->str);
    }
    s->files = xcalloc((size_t)n_names + 1, sizeof(StFile));
    for (int k = 0; k < n_names && rc == 0; k++) {
        char *p = path_join(dir, names[k]);
        rc = safetensors_open(&s->files[k], p, e);
        free(p);
        if (rc == 0) s->n_files++;
    }
    for (size_t i = 0; i < map->len && rc == 0; i++)
        if (!safetensors_find(&s->files[slot[i]], map->keys[i]))
            rc = err_set(e, "%s: tensor '%s' is not in %s as the index says", index_path, map->keys[i], names[slot[i]]);
    size_t total = 0;
    for (int k = 0; k < s->n_files && rc == 0; k++) total += (size_t)s->files[k].n;
    if (rc == 0 && total != map->len)
        rc = err_set(e, "%s: the shards hold %zu tensors but the index lists %zu", index_path, total, map->len);
    for (int k = 0; k < n_names; k++) free(names[k]);
    free(names);
    free(slot);
    return rc;
}

static int open_index(StModel *s, const char *dir, const char *index_path, Err *e) {
    size_t len;
    char *text = read_file(index_path, &len, e);
    if (!text) return -1;
    Json j;
    Err je;
    int rc = json_parse(&j, text, len, &je);
    free(text);
    if (rc != 0) return err_set(e, "%s: %s", index_path, je.msg);
    const Json *map = json_get(&j, "weight_map");
    if (!map || map->type != JSON_OBJECT) rc = err_set(e, "%s: no \"weight_map\" object", index_path);
    const char **keys = map && rc == 0 ? xcalloc(map->len + 1, sizeof(char *)) : NULL;
    for (size_t i = 0; keys && i < map->len; i++) keys[i] = map->keys[i];
    const char *dup = keys ? find_duplicate(keys, (int)map->len) : NULL;
    if (dup) rc = err_set(e, "%s: tensor '%s' is listed twice", index_path, dup);
    if (rc == 0 && map->len > (size_t)INT32_MAX) rc = err_set(e, "%s: too many tensors", index_path);
    if (rc == 0) rc = open_shards(s, dir, index_path, map, e);
    free(keys);
    json_free(&j);
    return rc;
}

int safetensors_open_dir(StModel *s, const char *dir, Err *e) {
    memset(s, 0, sizeof *s);
    char *index = path_join(dir, "model.safetensors.index.json");
    struct stat st;
    int rc;
    if (stat(index, &st) == 0) {
        rc = open_index(s, dir, index, e);
    } else {
        char *single = path_join(dir, "model.safetensors");
        s->files = xcalloc(1, sizeof(StFile));
        rc = safetensors_open(&s->files[0], single, e);
        if (rc == 0) s->n_files = 1;
        free(single);
    }
    free(index);
    if (rc != 0) safetensors_close_dir(s);
    return rc;
}

void safetensors_close_dir(StModel *s) {
    for (int k = 0; k < s->n_files; k++) safetensors_close(&s->files[k]);
    free(s->files);
    memset(s, 0, sizeof *s);
}

const StTensor *safetensors_dir_find(const StModel *s, const char *name, const StFile **file) {
    for (int k = 0; k < s->n_files; k++) {
        const StTensor *t = safetensors_find(&s->files[k], name);
        if (t) {
            if (file) *file = &s->files[k];
            return t;
        }
    }
    return NULL;
}
