// modelfile.c: model files into one in-memory Model (model_load), and Models out to GGUF files
// (sft quantize, sft init), whichever format they came from.
//
// Both formats first become a Source: the config, the tokenizer and one SrcTensor per slot of
// the model (token embedding, output norm, lm_head, then the twelve tensors of each layer),
// every one of them validated (names, shapes, types, hyperparameters, tokenizer). Then:
//   model_load      converts each matrix row by row to the wanted type (or points into the map);
//   model_quantize  streams the Source's rows, converted, into a GGUF file;
//   model_init_random streams random rows of a config's shapes into a GGUF file.
// Leaves out: architectures other than qwen2, and writing safetensors models.
// Read gguf.h and safetensors.h for the containers, model.h for what the weights feed.
#define _DEFAULT_SOURCE  // mmap's MAP_ANONYMOUS and madvise's MADV_HUGEPAGE (Linux)
#include "model.h"
#include "modelfile.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "gguf.h"
#include "json.h"
#include "lora.h"
#include "quant.h"
#include "safetensors.h"
#include "threads.h"

// ---------------------------------------------------------------------------------------------
// Tensor slots and their names in both formats.

enum { S_EMBED, S_OUT_NORM, S_OUTPUT, N_GLOBAL };
enum { K_ATTN_NORM, K_Q, K_QB, K_K, K_KB, K_V, K_VB, K_O, K_FFN_NORM, K_GATE, K_UP, K_DOWN, N_LAYER };

static const char *const global_names[2][N_GLOBAL] = {
    {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"},
    {"token_embd.weight", "output_norm.weight", "output.weight"},
};
static const char *const layer_names[2][N_LAYER] = {
    {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
     "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight",
     "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"},
    {"attn_norm.weight", "attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias", "attn_v.weight",
     "attn_v.bias", "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"},
};
static const char *const layer_prefix[2] = {"model.layers.", "blk."};

static int slot_of(int layer, int kind) { return N_GLOBAL + layer * N_LAYER + kind; }
static int slot_layer(int slot) { return slot < N_GLOBAL ? -1 : (slot - N_GLOBAL) / N_LAYER; }
static int slot_kind(int slot) { return slot < N_GLOBAL ? -1 : (slot - N_GLOBAL) % N_LAYER; }

static int slot_is_matrix(int slot) {
    int k = slot_kind(slot);
    return slot == S_EMBED || slot == S_OUTPUT || k == K_Q || k == K_K || k == K_V || k == K_O || k == K_GATE ||
           k == K_UP || k == K_DOWN;
}

// Name of a slot in a format (gguf = 1 or 0) into buf.
static const char *slot_name(char *buf, size_t cap, int slot, int gguf) {
    if (slot < N_GLOBAL) snprintf(buf, cap, "%s", global_names[gguf][slot]);
    else snprintf(buf, cap, "%s%d.%s", layer_prefix[gguf], slot_layer(slot), layer_names[gguf][slot_kind(slot)]);
    return buf;
}

// The slot a tensor name stands for, or -1 (unknown name) / -2 (layer index >= L).
static int parse_slot(const char *name, int gguf, int L) {
    for (int g = 0; g < N_GLOBAL; g++)
        if (strcmp(name, global_names[gguf][g]) == 0) return g;
    size_t n = strlen(layer_prefix[gguf]);
    if (strncmp(name, layer_prefix[gguf], n) != 0) return -1;
    const char *p = name + n;
    long l = 0;
    int digits = 0;
    for (; *p >= '0' && *p <= '9' && digits < 7; p++, digits++) l = l * 10 + (*p - '0');
    if (digits == 0 || *p != '.' || (name[n] == '0' && digits > 1)) return -1;
    for (int k = 0; k < N_LAYER; k++)
        if (strcmp(p + 1, layer_names[gguf][k]) == 0) return l < L ? slot_of((int)l, k) : -2;
    return -1;
}

// The shape a slot must have: [rows, cols] for matrices, [1, n] for vectors.
static void slot_shape(const Config *c, int slot, int64_t *rows, int64_t *cols) {
    int64_t q = (int64_t)c->NH * c->HS, kv = (int64_t)c->NKV * c->HS;
    int k = slot_kind(slot);
    *rows = 1;
    *cols = c->C;  // the norms
    if (slot == S_EMBED || slot == S_OUTPUT) *rows = c->V;
    else if (k == K_Q) *rows = q;
    else if (k == K_K || k == K_V) *rows = kv;
    else if (k == K_QB) *cols = q;
    else if (k == K_KB || k == K_VB) *cols = kv;
    else if (k == K_O) *rows = c->C, *cols = q;
    else if (k == K_GATE || k == K_UP) *rows = c->FF;
    else if (k == K_DOWN) *rows = c->C, *cols = c->FF;
}

// ---------------------------------------------------------------------------------------------
// A Source: an open model file with everything checked.

typedef struct {
    const char *name;    // as in the file (NULL when the slot is empty)
    int type;
    int n_dims;
    int64_t rows, cols;  // vectors: rows = 1
    const void *data;    // rows * row_bytes(type, cols) bytes
} SrcTensor;

typedef struct {
    char *path;
    int gguf;             // 1: GGUF file; 0: Hugging Face directory
    GgufFile g;
    StModel st;
    Config c;
    SrcTensor *t;         // [N_GLOBAL + L * N_LAYER]
    int n_slots;
    Tokenizer tok;
    int has_tok;
    char *chat_template;  // NULL when unknown
    char *name;           // general.name, or the directory's name
    GenDefaults gen;
} Source;

static char *path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = xmalloc(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

// Reads and parses a JSON file; "PATH: reason" on error.
static int read_json(Json *j, const char *path, Err *e) {
    size_t len;
    char *text = read_file(path, &len, e);
    if (!text) return -1;
    Err je;
    int rc = json_parse(j, text, len, &je);
    free(text);
    return rc == 0 ? 0 : err_set(e, "%s: %s", path, je.msg);
}

// ---------------------------------------------------------------------------------------------
// Hyperparameters

static int check_config(const Config *c, const char *path, Err *e) {
    if (c->L < 1 || c->L > 1024) return err_set(e, "%s: %d layers (1..1024 supported)", path, c->L);
    if (c->C < 1 || c->C > 65536) return err_set(e, "%s: hidden size %d (1..65536 supported)", path, c->C);
    if (c->NH < 1 || c->C % c->NH != 0) return err_set(e, "%s: hidden size %d is not a multiple of the %d heads", path, c->C, c->NH);
    if (c->NKV < 1 || c->NH % c->NKV != 0) return err_set(e, "%s: %d heads are not a multiple of the %d key/value heads", path, c->NH, c->NKV);
    if (c->HS % 2 != 0) return err_set(e, "%s: head size %d is odd (RoPE needs pairs)", path, c->HS);
    if (c->FF < 1 || c->FF > (1 << 20)) return err_set(e, "%s: MLP size %d (1..1048576 supported)", path, c->FF);
    if (c->V < 1 || c->V > (1 << 24)) return err_set(e, "%s: vocabulary of %d rows (1..16777216 supported)", path, c->V);
    if (c->max_seq < 1 || c->max_seq > (1 << 24)) return err_set(e, "%s: context length %d (1..16777216 supported)", path, c->max_seq);
    if (!(c->rope_theta > 0 && isfinite(c->rope_theta))) return err_set(e, "%s: rope theta %g is not a positive number", path, c->rope_theta);
    if (!(c->rms_eps > 0 && c->rms_eps < 1)) return err_set(e, "%s: RMS norm epsilon %g is not in (0, 1)", path, c->rms_eps);
    return 0;
}

// An integer GGUF key in [1, 2^30]; missing: -1 unless dflt > 0.
static int gguf_key_int(int *out, const GgufFile *g, const char *key, int dflt, Err *e) {
    int64_t v = dflt;
    int rc = gguf_get_int(g, key, &v, dflt > 0 ? 0 : 1, e);
    if (rc < 0) return -1;
    if (rc == 1) return err_set(e, "%s: %s is missing", g->path, key);
    if (v < 1 || v > (1 << 30)) return err_set(e, "%s: %s = %lld is out of range", g->path, key, (long long)v);
    *out = (int)v;
    return 0;
}

static int gguf_key_float(float *out, const GgufFile *g, const char *key, Err *e) {
    double v;
    int rc = gguf_get_float(g, key, &v, 1, e);
    if (rc < 0) return -1;
    if (rc == 1) return err_set(e, "%s: %s is missing", g->path, key);
    *out = (float)v;
    return 0;
}

// Config from the qwen2.* keys; V is set later from token_embd's shape.
static int config_from_gguf(Config *c, const GgufFile *g, Err *e) {
    const char *arch = NULL;
    if (gguf_get_str(g, "general.architecture", &arch, 1, e) != 0)
        return arch ? -1 : err_set(e, "%s: general.architecture is missing or not a string", g->path);
    if (strcmp(arch, "qwen2") != 0) return err_set(e, "%s: architecture '%s' is not supported (qwen2 only)", g->path, arch);
    if (gguf_key_int(&c->max_seq, g, "qwen2.context_length", 0, e) || gguf_key_int(&c->C, g, "qwen2.embedding_length", 0, e) ||
        gguf_key_int(&c->L, g, "qwen2.block_count", 0, e) || gguf_key_int(&c->FF, g, "qwen2.feed_forward_length", 0, e) ||
        gguf_key_int(&c->NH, g, "qwen2.attention.head_count", 0, e) ||
        gguf_key_int(&c->NKV, g, "qwen2.attention.head_count_kv", c->NH, e) ||
        gguf_key_float(&c->rope_theta, g, "qwen2.rope.freq_base", e) ||
        gguf_key_float(&c->rms_eps, g, "qwen2.attention.layer_norm_rms_epsilon", e))
        return -1;
    c->HS = c->C / c->NH;
    return 0;
}

// An integer member of config.json in [1, 2^30]; 1 when absent and not required.
static int json_key_int(int *out, const Json *j, const char *key, int required, const char *path, Err *e) {
    const Json *v = json_get(j, key);
    if (!v) return required ? err_set(e, "%s: \"%s\" is missing", path, key) : 1;
    if (v->type != JSON_NUMBER || v->number != floor(v->number) || v->number < 1 || v->number > (double)(1 << 30))
        return err_set(e, "%s: \"%s\" is not an integer in [1, 2^30]", path, key);
    *out = (int)v->number;
    return 0;
}

static int json_key_float(float *out, const Json *j, const char *key, float dflt, const char *path, Err *e) {
    const Json *v = json_get(j, key);
    *out = dflt;
    if (!v) return 0;
    if (v->type != JSON_NUMBER) return err_set(e, "%s: \"%s\" is not a number", path, key);
    *out = (float)v->number;
    return 0;
}

static int has_qwen2_arch(const Json *j) {
    const Json *a = json_get(j, "architectures");
    for (size_t i = 0; a && a->type == JSON_ARRAY && i < a->len; i++)
        if (a->items[i].type == JSON_STRING && strcmp(a->items[i].str, "Qwen2ForCausalLM") == 0) return 1;
    return 0;
}

// Config from a Hugging Face config.json. V = 0 when vocab_size is absent and not required.
static int config_from_json(Config *c, const char *path, int need_vocab, Err *e) {
    Json j;
    if (read_json(&j, path, e) != 0) return -1;
    memset(c, 0, sizeof *c);
    int rc = 0;
    const Json *tie = json_get(&j, "tie_word_embeddings");
    if (j.type != JSON_OBJECT) rc = err_set(e, "%s: not a JSON object", path);
    else if (!has_qwen2_arch(&j)) rc = err_set(e, "%s: \"architectures\" must be [\"Qwen2ForCausalLM\"]", path);
    else if (json_key_int(&c->C, &j, "hidden_size", 1, path, e) < 0 || json_key_int(&c->L, &j, "num_hidden_layers", 1, path, e) < 0 ||
             json_key_int(&c->NH, &j, "num_attention_heads", 1, path, e) < 0 ||
             json_key_int(&c->FF, &j, "intermediate_size", 1, path, e) < 0 ||
             json_key_int(&c->max_seq, &j, "max_position_embeddings", 1, path, e) < 0 ||
             json_key_int(&c->V, &j, "vocab_size", need_vocab, path, e) < 0)
        rc = -1;
    else if (tie && tie->type != JSON_BOOL) rc = err_set(e, "%s: \"tie_word_embeddings\" is not a bool", path);
    if (rc == 0 && json_key_int(&c->NKV, &j, "num_key_value_heads", 0, path, e) == 1) c->NKV = c->NH;
    if (rc == 0 && c->NKV == 0) rc = -1;
    const Json *rp = json_get(&j, "rope_parameters");  // transformers 5 keeps rope_theta in there
    if (rc == 0) rc = json_key_float(&c->rope_theta, rp && !json_get(&j, "rope_theta") ? rp : &j, "rope_theta", 10000.0f, path, e);
    if (rc == 0) rc = json_key_float(&c->rms_eps, &j, "rms_norm_eps", 1e-6f, path, e);
    c->tied = tie && tie->boolean;  // Qwen2Config's default is false
    c->HS = c->NH > 0 ? c->C / c->NH : 0;
    json_free(&j);
    return rc;
}

// ---------------------------------------------------------------------------------------------
// Tokenizer, chat template and sampling defaults

// Every tokenizer.ggml.*_token_id must be an id of the vocabulary.
static int check_special_ids(const GgufFile *g, int64_t n_tokens, Err *e) {
    for (int i = 0; i < g->n_kv; i++) {
        const char *k = g->kv[i].key;
        size_t n = strlen(k);
        if (strncmp(k, "tokenizer.ggml.", 15) != 0 || n < 9 || strcmp(k + n - 9, "_token_id") != 0) continue;
        int64_t id;
        if (gguf_get_int(g, k, &id, 0, e) != 0) return -1;
        if (id < 0 || id >= n_tokens) return err_set(e, "%s: %s = %lld is not a token id (vocabulary of %lld)", g->path, k, (long long)id, (long long)n_tokens);
    }
    return 0;
}

static const GgufKV *string_array(const GgufFile *g, const char *key, Err *e) {
    const GgufKV *kv = gguf_find_kv(g, key);
    if (!kv) return err_set(e, "%s: %s is missing", g->path, key), NULL;
    if (kv->type != GGUF_ARRAY || kv->arr_type != GGUF_STRING || kv->n > INT32_MAX)
        return err_set(e, "%s: %s is not an array of strings", g->path, key), NULL;
    for (uint64_t i = 0; i < kv->n; i++)
        if (kv->str_lens[i] != strlen(kv->strs[i]) || kv->str_lens[i] == 0)
            return err_set(e, "%s: %s[%llu] is empty or holds a NUL byte", g->path, key, (unsigned long long)i), NULL;
    return kv;
}

// token_type[n] from tokenizer.ggml.token_type (all TOKEN_NORMAL when absent).
static int *token_types(const GgufFile *g, uint64_t n, Err *e) {
    const GgufKV *kv = gguf_find_kv(g, "tokenizer.ggml.token_type");
    int *types = xmalloc(sizeof(int) * (size_t)(n > 0 ? n : 1));
    for (uint64_t i = 0; i < n; i++) types[i] = TOKEN_NORMAL;
    if (!kv) return types;
    int ok = kv->type == GGUF_ARRAY && kv->n == n && kv->arr && kv->arr_type != GGUF_FLOAT32 &&
             kv->arr_type != GGUF_FLOAT64 && kv->arr_type != GGUF_BOOL;
    for (uint64_t i = 0; ok && i < n; i++) {
        int64_t t = gguf_arr_int(kv, i);
        ok = t >= TOKEN_NORMAL && t <= TOKEN_BYTE;
        types[i] = (int)t;
    }
    if (ok) return types;
    free(types);
    return err_set(e, "%s: tokenizer.ggml.token_type is not one type (1..6) per token", g->path), NULL;
}

static int tokenizer_from_gguf(Tokenizer *tok, const GgufFile *g, Err *e) {
    const char *model = NULL;
    int rc = gguf_get_str(g, "tokenizer.ggml.model", &model, 1, e);
    if (rc != 0) return rc < 0 ? -1 : err_set(e, "%s: no tokenizer (tokenizer.ggml.model is missing)", g->path);
    if (strcmp(model, "gpt2") != 0) return err_set(e, "%s: tokenizer model '%s' is not supported (gpt2 byte-level BPE only)", g->path, model);
    const GgufKV *tokens = string_array(g, "tokenizer.ggml.tokens", e);
    const GgufKV *merges = tokens ? string_array(g, "tokenizer.ggml.merges", e) : NULL;
    if (!merges) return -1;
    if (tokens->n == 0) return err_set(e, "%s: the vocabulary is empty", g->path);
    if (check_special_ids(g, (int64_t)tokens->n, e) != 0) return -1;
    int *types = token_types(g, tokens->n, e);
    if (!types) return -1;
    rc = tokenizer_build(tok, g->path, tokens->strs, types, (int)tokens->n, merges->strs, (int)merges->n, e);
    free(types);
    return rc;
}

// chat_template of a tokenizer_config.json, or NULL.
static char *template_from_json(const char *path) {
    Json j;
    if (!file_exists(path) || read_json(&j, path, NULL) != 0) return NULL;
    const Json *t = json_get(&j, "chat_template");
    char *s = t && t->type == JSON_STRING && t->len == strlen(t->str) ? xstrdup(t->str) : NULL;
    json_free(&j);
    return s;
}

// The chat template of a directory: tokenizer_config.json's, else chat_template.jinja.
static char *template_in_dir(const char *dir) {
    char *p = path_join(dir, "tokenizer_config.json");
    char *t = template_from_json(p);
    free(p);
    if (t) return t;
    p = path_join(dir, "chat_template.jinja");
    size_t len;
    t = file_exists(p) ? read_file(p, &len, NULL) : NULL;
    if (t && len != strlen(t)) free(t), t = NULL;
    free(p);
    return t;
}

// The chat template beside a tokenizer.json, or in a directory.
static char *template_beside(const char *path) {
    if (is_dir(path)) return template_in_dir(path);
    const char *slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path) : 1;
    char *dir = xmalloc(n + 1);
    memcpy(dir, slash ? path : ".", n);
    dir[n] = 0;
    char *t = template_beside(dir);
    free(dir);
    return t;
}

static int gen_defaults(GenDefaults *g, const char *dir, Err *e) {
    *g = (GenDefaults){.temperature = 0.7f, .top_p = 0.8f, .repetition_penalty = 1.1f, .top_k = 20};
    char *path = dir ? path_join(dir, "generation_config.json") : NULL;
    Json j;
    int rc = 0;
    if (path && file_exists(path)) {
        float top_k = (float)g->top_k;
        rc = read_json(&j, path, e);
        if (rc == 0) {
            rc = j.type != JSON_OBJECT ? err_set(e, "%s: not a JSON object", path) : 0;
            if (rc == 0) rc = json_key_float(&g->temperature, &j, "temperature", g->temperature, path, e);
            if (rc == 0) rc = json_key_float(&g->top_p, &j, "top_p", g->top_p, path, e);
            if (rc == 0) rc = json_key_float(&top_k, &j, "top_k", top_k, path, e);
            if (rc == 0) rc = json_key_float(&g->repetition_penalty, &j, "repetition_penalty", g->repetition_penalty, path, e);
            json_free(&j);
        }
        if (rc == 0 && !(g->temperature >= 0 && g->top_p > 0 && g->top_p <= 1 && top_k >= 0 && top_k <= 1e6f &&
                         top_k == floorf(top_k) && g->repetition_penalty > 0 && isfinite(g->temperature) &&
                         isfinite(g->repetition_penalty)))
            rc = err_set(e, "%s: temperature, top_p, top_k or repetition_penalty out of range", path);
        g->top_k = (int)top_k;
    }
    free(path);
    return rc;
}

static int is_gguf_file(const char *path) {
    unsigned char magic[4] = {0};
    FILE *f = is_dir(path) ? NULL : fopen(path, "rb");
    size_t got = f ? fread(magic, 1, 4, f) : 0;
    if (f) fclose(f);
    return got == 4 && memcmp(magic, "GGUF", 4) == 0;
}

// The chat template that goes with a tokenizer path (GGUF, directory or tokenizer.json), or NULL.
static char *chat_template_of(const char *path) {
    if (!is_gguf_file(path)) return template_beside(path);
    GgufFile g;
    const char *s;
    char *t = NULL;
    if (gguf_open(&g, path, NULL) != 0) return NULL;
    if (gguf_get_str(&g, "tokenizer.chat_template", &s, 1, NULL) == 0) t = xstrdup(s);
    gguf_close(&g);
    return t;
}

int model_load_tokenizer(Tokenizer *tok, const char *path, Err *e) {
    if (!is_gguf_file(path)) return tokenizer_load(tok, path, e);
    GgufFile g;
    if (gguf_open(&g, path, e) != 0) return -1;
    int rc = tokenizer_from_gguf(tok, &g, e);
    gguf_close(&g);
    return rc;
}

// ---------------------------------------------------------------------------------------------
// Tensors: every tensor of the file in its slot, then every slot checked.

// Puts one tensor of the file into its slot (shape as [rows, cols], fastest dimension last).
static int place(Source *s, const char *name, int type, int n_dims, int64_t rows, int64_t cols, const void *data, Err *e) {
    int slot = parse_slot(name, s->gguf, s->c.L);
    if (slot == -2) return err_set(e, "%s: tensor '%s' is for a layer past the %d layers", s->path, name, s->c.L);
    if (slot < 0) return err_set(e, "%s: unknown tensor '%s'", s->path, name);
    if (s->t[slot].name) return err_set(e, "%s: tensor '%s' appears twice", s->path, name);
    if (n_dims < 1 || n_dims > 2) return err_set(e, "%s: tensor '%s' has %d dimensions (1 or 2 expected)", s->path, name, n_dims);
    s->t[slot] = (SrcTensor){name, type, n_dims, rows, cols, data};
    return 0;
}

static int collect_gguf(Source *s, Err *e) {
    for (int i = 0; i < s->g.n_tensors; i++) {
        const GgufTensor *t = &s->g.tensors[i];
        int n_dims = t->n_dims;
        while (n_dims > 2 && t->ne[n_dims - 1] == 1) n_dims--;
        if (place(s, t->name, t->type, n_dims, n_dims == 2 ? t->ne[1] : 1, t->ne[0], t->data, e) != 0) return -1;
    }
    return 0;
}

static int collect_st(Source *s, Err *e) {
    for (int f = 0; f < s->st.n_files; f++)
        for (int i = 0; i < s->st.files[f].n; i++) {
            const StTensor *t = &s->st.files[f].tensors[i];
            if (s->c.tied && strcmp(t->name, "lm_head.weight") == 0) continue;  // tied: the embedding is used
            int64_t rows = t->n_dims == 2 ? t->shape[0] : 1, cols = t->shape[t->n_dims > 0 ? t->n_dims - 1 : 0];
            if (place(s, t->name, t->type, t->n_dims, rows, t->n_dims > 0 ? cols : 1, t->data, e) != 0) return -1;
        }
    return 0;
}

static int check_tensors(Source *s, Err *e) {
    char name[128];
    for (int slot = 0; slot < s->n_slots; slot++) {
        const SrcTensor *t = &s->t[slot];
        if (slot == S_OUTPUT && s->c.tied) continue;
        if (!t->name) return err_set(e, "%s: tensor '%s' is missing", s->path, slot_name(name, sizeof name, slot, s->gguf));
        int64_t rows, cols;
        slot_shape(&s->c, slot, &rows, &cols);
        int want_dims = slot_is_matrix(slot) ? 2 : 1;
        if (t->n_dims != want_dims || t->rows != rows || t->cols != cols)
            return err_set(e, "%s: tensor '%s' has shape [%lld, %lld], expected [%lld, %lld]%s", s->path, t->name,
                           (long long)t->rows, (long long)t->cols, (long long)rows, (long long)cols,
                           t->n_dims != want_dims ? (want_dims == 2 ? " (a matrix)" : " (a vector)") : "");
        if (!type_info(t->type) || t->type == TYPE_NF4 || row_bytes(t->type, t->cols) == 0)
            return err_set(e, "%s: tensor '%s' has an unsupported type or row length", s->path, t->name);
    }
    return 0;
}

static void source_close(Source *s) {
    if (s->gguf) gguf_close(&s->g);
    else safetensors_close_dir(&s->st);
    if (s->has_tok) tokenizer_free(&s->tok);
    free(s->t);
    free(s->chat_template);
    free(s->name);
    free(s->path);
    memset(s, 0, sizeof *s);
}

// A GGUF file: config from the keys, V from token_embd, tokenizer from tokenizer.ggml.*.
static int open_gguf(Source *s, Err *e) {
    if (gguf_open(&s->g, s->path, e) != 0 || config_from_gguf(&s->c, &s->g, e) != 0) return -1;
    const GgufTensor *embd = gguf_find_tensor(&s->g, "token_embd.weight");
    if (!embd || embd->n_dims != 2) return err_set(e, "%s: tensor 'token_embd.weight' is missing or not a matrix", s->path);
    if (embd->ne[1] > (1 << 24)) return err_set(e, "%s: vocabulary of %lld rows is too large", s->path, (long long)embd->ne[1]);
    s->c.V = (int)embd->ne[1];
    s->c.tied = gguf_find_tensor(&s->g, "output.weight") == NULL;
    if (check_config(&s->c, s->path, e) != 0) return -1;
    s->n_slots = N_GLOBAL + s->c.L * N_LAYER;
    s->t = xcalloc((size_t)s->n_slots, sizeof(SrcTensor));
    if (collect_gguf(s, e) != 0 || check_tensors(s, e) != 0) return -1;
    if (tokenizer_from_gguf(&s->tok, &s->g, e) != 0) return -1;
    s->has_tok = 1;
    const char *str = NULL;
    if (gguf_get_str(&s->g, "tokenizer.chat_template", &str, 1, NULL) == 0) s->chat_template = xstrdup(str);
    s->name = xstrdup(gguf_get_str(&s->g, "general.name", &str, 1, NULL) == 0 ? str : "qwen2");
    return gen_defaults(&s->gen, NULL, e);
}

// A Hugging Face directory: config.json, the safetensors, tokenizer.json, generation_config.json.
static int open_dir(Source *s, Err *e) {
    char *cfg = path_join(s->path, "config.json");
    int rc = config_from_json(&s->c, cfg, 1, e);
    if (rc == 0) rc = check_config(&s->c, cfg, e);
    free(cfg);
    if (rc != 0 || safetensors_open_dir(&s->st, s->path, e) != 0) return -1;
    s->n_slots = N_GLOBAL + s->c.L * N_LAYER;
    s->t = xcalloc((size_t)s->n_slots, sizeof(SrcTensor));
    if (collect_st(s, e) != 0 || check_tensors(s, e) != 0) return -1;
    if (tokenizer_load(&s->tok, s->path, e) != 0) return -1;
    s->has_tok = 1;
    s->chat_template = template_beside(s->path);
    const char *base = strrchr(s->path, '/');
    s->name = xstrdup(base && base[1] ? base + 1 : s->path);
    return gen_defaults(&s->gen, s->path, e);
}

static int source_open(Source *s, const char *path, Err *e) {
    memset(s, 0, sizeof *s);
    s->path = xstrdup(path);
    s->gguf = !is_dir(path);
    int rc = s->gguf ? open_gguf(s, e) : open_dir(s, e);
    if (rc == 0 && s->tok.n_vocab > s->c.V)
        rc = err_set(e, "%s: the tokenizer has %d tokens but the embedding only %d rows", path, s->tok.n_vocab, s->c.V);
    if (rc != 0) source_close(s);
    return rc;
}

// ---------------------------------------------------------------------------------------------
// Row conversion, shared by model_load and the GGUF writers: rows of a source tensor (or random
// rows) into rows of another type, in parallel over rows.

// Piecewise-linear inverse of the normal CDF on a grid of NORM_CELLS cells: a normal draw from
// 16 random bits of cell and 16 of position, cheap enough for 494M draws (tails cut at ~3.7 sd).
#define NORM_CELLS 4096

// Inverse normal CDF, Acklam's rational approximation (relative error < 1.2e-9).
static double inv_normal_cdf(double p) {
    static const double a[6] = {-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                                1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00};
    static const double b[5] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                                6.680131188771972e+01, -1.328068155288572e+01};
    static const double c[6] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                                -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00};
    static const double d[4] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00};
    if (p > 0.5) return -inv_normal_cdf(1 - p);
    if (p < 0.02425) {
        double q = sqrt(-2 * log(p));
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
               ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
    }
    double q = p - 0.5, r = q * q;
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
           (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
}

// table[NORM_CELLS + 1]: the quantiles at the cell edges (the two outer edges pulled in).
static void normal_table(float *table) {
    for (int k = 0; k <= NORM_CELLS; k++) {
        double p = k == 0 ? 0.25 / NORM_CELLS : k == NORM_CELLS ? 1 - 0.25 / NORM_CELLS : (double)k / NORM_CELLS;
        table[k] = (float)inv_normal_cdf(p);
    }
}

// out[n] ~ N(0, std) from the row's own stream, so rows can be drawn in any order.
static void normal_row(float *out, int64_t n, uint64_t seed, int slot, int64_t row, float std, const float *table) {
    uint64_t s = seed ^ ((uint64_t)(slot + 1) * 0xD1B54A32D192ED03ull) ^ ((uint64_t)(row + 1) * 0xAEF17502108EF2D9ull);
    for (int64_t i = 0; i < n; i += 2) {
        uint64_t x = rng_next(&s);
        for (int h = 0; h < 2 && i + h < n; h++) {
            uint32_t u = (uint32_t)(x >> (32 * h));
            uint32_t cell = u >> 20;                            // 12 bits
            float f = (float)(u & 0xFFFFF) * (1.0f / 1048576.0f);  // 20 bits
            out[i + h] = std * (table[cell] + f * (table[cell + 1] - table[cell]));
        }
    }
}

typedef enum { FILL_SOURCE, FILL_NORMAL, FILL_ONES } Fill;

typedef struct {
    Fill fill;
    const SrcTensor *src;  // FILL_SOURCE: the rows to convert
    int type;              // output type
    int64_t cols;
    int64_t row0;          // first row of this batch
    unsigned char *out;    // [rows of the batch] rows of row_bytes(type, cols)
    uint64_t seed;         // FILL_NORMAL
    const LoraPair *pair;  // FILL_SOURCE with an adapter (sft merge): each row gets scale * (B A)[row]
    float scale;
    int slot;
    float std;
    const float *table;
    int failed;            // set when quantize_row refuses the type
} RowJob;

// w[cols] += scale * (B A)[row, :] for the pair's A [r, cols] and B [rows, r]; d[cols] is scratch.
// As PEFT's merge: the product B A in float32, then times the scale, then added.
static void add_lora_row(float *w, float *d, const LoraPair *p, float scale, int64_t row) {
    memset(d, 0, sizeof(float) * (size_t)p->in);
    for (int k = 0; k < p->r; k++) {
        float b = p->B[(size_t)row * p->r + k];
        const float *a = p->A + (size_t)k * p->in;
        for (int i = 0; i < p->in; i++) d[i] += b * a[i];
    }
    for (int i = 0; i < p->in; i++) w[i] += d[i] * scale;
}

static void row_job_run(void *ctx, int start, int end) {
    RowJob *j = ctx;
    size_t out_row = row_bytes(j->type, j->cols);
    size_t in_row = j->src ? row_bytes(j->src->type, j->cols) : 0;
    float *tmp = xmalloc(sizeof(float) * (size_t)j->cols * 2);
    for (int r = start; r < end; r++) {
        int64_t row = j->row0 + r;
        unsigned char *dst = j->out + (size_t)r * out_row;
        if (j->fill == FILL_SOURCE) {
            const unsigned char *src = (const unsigned char *)j->src->data + (size_t)row * in_row;
            if (j->src->type == j->type && !j->pair) {
                memcpy(dst, src, out_row);
                continue;
            }
            dequantize_row(j->src->type, tmp, src, j->cols);
            if (j->pair) add_lora_row(tmp, tmp + j->cols, j->pair, j->scale, row);
        } else if (j->fill == FILL_NORMAL) {
            normal_row(tmp, j->cols, j->seed, j->slot, row, j->std, j->table);
        } else {
            for (int64_t i = 0; i < j->cols; i++) tmp[i] = 1.0f;
        }
        if (quantize_row(j->type, dst, tmp, j->cols) != 0) j->failed = 1;
    }
    free(tmp);
}

// Rows [row0, row0 + n) of the job into j->out.
static int run_rows(RowJob *j, int64_t row0, int64_t n, Err *e) {
    j->row0 = row0;
    j->failed = 0;
    parallel_for(row_job_run, j, (int)n, 1);
    if (j->failed) return err_set(e, "conversion to %s is not supported (no quantizer for it)", type_info(j->type)->name);
    return 0;
}

// 1 when quantize_row can produce the type.
static int can_quantize(int type) {
    const TypeInfo *ti = type_info(type);
    if (!ti) return 0;
    float zeros[256] = {0};
    unsigned char out[1024];
    return ti->block <= 256 && ti->bytes <= sizeof out && quantize_row(type, out, zeros, ti->block) == 0;
}

// The type a matrix with rows of `cols` gets when `type` is asked for: `type` when its rows are
// whole blocks, else llama.cpp's fallback (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), else Q8_0,
// else F32; a fallback without a quantizer becomes Q8_0.
static int fit_type(int type, int64_t cols) {
    if (row_bytes(type, cols) != 0) return type;
    int fb = type == TYPE_Q4_K ? TYPE_Q5_0 : type == TYPE_Q5_K ? TYPE_Q5_1 : TYPE_Q8_0;
    if (fb != TYPE_Q8_0 && !can_quantize(fb)) fb = TYPE_Q8_0;
    return row_bytes(fb, cols) != 0 ? fb : TYPE_F32;
}

// ---------------------------------------------------------------------------------------------
// model_load / model_free

struct ModelStorage {
    Source src;        // open files: stored-type matrices point into their mappings
    int src_open;      // src is still open (closed after loading when nothing points into it)
    int in_place;      // matrices used in place from src's mappings
    void **bufs;       // [n_bufs] converted matrices and F32 vectors
    int n_bufs, cap_bufs;
    int noted;         // the fallback note was printed
    void *huge;        // [huge_bytes] the GGUF file's copy in 2 MB pages (model_hugepages), or NULL
    size_t huge_bytes;
};

static void *storage_alloc(ModelStorage *s, size_t n) {
    if (s->n_bufs == s->cap_bufs) {
        s->cap_bufs = s->cap_bufs ? 2 * s->cap_bufs : 64;
        s->bufs = realloc(s->bufs, sizeof(void *) * (size_t)s->cap_bufs);
        if (!s->bufs) {
            fprintf(stderr, "sft: out of memory\n");
            exit(1);
        }
    }
    return s->bufs[s->n_bufs++] = xmalloc(n);
}

// A frozen matrix in type `want` (< 0: the stored type, q4_0 for safetensors).
static int load_matrix(QMatrix *W, ModelStorage *s, const SrcTensor *t, int want, Err *e) {
    int type = want >= 0 ? want : s->src.gguf ? t->type : TYPE_Q4_0;
    int fitted = fit_type(type, t->cols);
    if (fitted != type && !s->noted) {
        fprintf(stderr, "sft: note: %s needs rows of %d; matrices with %lld columns are held as %s\n", type_info(type)->name,
                type_info(type)->block, (long long)t->cols, type_info(fitted)->name);
        s->noted = 1;
    }
    *W = (QMatrix){fitted, (int)t->rows, (int)t->cols, t->data};
    size_t align = fitted == TYPE_F32 ? 4 : 2;
    if (fitted == t->type && (uintptr_t)t->data % align == 0) {  // used in place
        s->in_place++;
        return 0;
    }
    size_t n = row_bytes(fitted, t->cols) * (size_t)t->rows;
    RowJob j = {.fill = FILL_SOURCE, .src = t, .type = fitted, .cols = t->cols, .out = storage_alloc(s, n)};
    W->data = j.out;
    Err je;
    if (run_rows(&j, 0, t->rows, &je) != 0) return err_set(e, "%s: tensor '%s': %.900s", s->src.path, t->name, je.msg);
    return 0;
}

static float *load_vector(ModelStorage *s, const SrcTensor *t) {
    float *v = storage_alloc(s, sizeof(float) * (size_t)t->cols);
    dequantize_row(t->type, v, t->data, t->cols);
    return v;
}

static int load_layer(LayerWeights *lw, ModelStorage *s, int l, int quant, Err *e) {
    const SrcTensor *t = &s->src.t[slot_of(l, 0)];
    lw->attn_norm = load_vector(s, &t[K_ATTN_NORM]);
    lw->ffn_norm = load_vector(s, &t[K_FFN_NORM]);
    lw->bq = load_vector(s, &t[K_QB]);
    lw->bk = load_vector(s, &t[K_KB]);
    lw->bv = load_vector(s, &t[K_VB]);
    if (load_matrix(&lw->wq, s, &t[K_Q], quant, e) || load_matrix(&lw->wk, s, &t[K_K], quant, e) ||
        load_matrix(&lw->wv, s, &t[K_V], quant, e) || load_matrix(&lw->wo, s, &t[K_O], quant, e) ||
        load_matrix(&lw->wgate, s, &t[K_GATE], quant, e) || load_matrix(&lw->wup, s, &t[K_UP], quant, e) ||
        load_matrix(&lw->wdown, s, &t[K_DOWN], quant, e))
        return -1;
    return 0;
}

// ---------------------------------------------------------------------------------------------
// What a model names itself, for an adapter's base_model_name_or_path.

// 1 when s is a Hugging Face id "org/name" (letters, digits, '.', '_', '-'; not starting with
// '.' or '-' so that a path like ./x or ../x is not taken for one).
static int is_hf_id(const char *s, size_t n) {
    const char *slash = memchr(s, '/', n);
    if (!slash || slash == s || slash == s + n - 1 || memchr(slash + 1, '/', n - (size_t)(slash + 1 - s))) return 0;
    if (s[0] == '.' || s[0] == '-' || slash[1] == '.' || slash[1] == '-') return 0;
    for (size_t i = 0; i < n; i++)
        if (!(s[i] == '/' || s[i] == '.' || s[i] == '_' || s[i] == '-' || (s[i] >= '0' && s[i] <= '9') ||
              ((s[i] | 0x20) >= 'a' && (s[i] | 0x20) <= 'z')))
            return 0;
    return 1;
}

// "org/name" from "org/name" or "https://huggingface.co/org/name[/]", or NULL.
static char *hf_id_of(const char *v) {
    const char *prefix = "https://huggingface.co/";
    if (strncmp(v, prefix, strlen(prefix)) == 0) v += strlen(prefix);
    size_t n = strlen(v);
    if (n > 0 && v[n - 1] == '/') n--;
    if (!is_hf_id(v, n)) return NULL;
    char *id = xmalloc(n + 1);
    memcpy(id, v, n);
    id[n] = 0;
    return id;
}

// The id a GGUF model's metadata gives for the model itself (not for the model it was tuned from:
// general.base_model.* are ignored), or NULL.
static char *gguf_hf_id(const GgufFile *g) {
    const char *keys[] = {"general.source.huggingface.repository", "general.source.repo_url", "general.repo_url",
                          "general.source.url", "general.url"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        const char *v;
        char *id = gguf_get_str(g, keys[i], &v, 1, NULL) == 0 ? hf_id_of(v) : NULL;
        if (id) return id;
    }
    return NULL;
}

// config.json's _name_or_path when it is an id, or NULL.
static char *dir_hf_id(const char *dir) {
    char *path = path_join(dir, "config.json");
    Json j;
    char *id = NULL;
    if (read_json(&j, path, NULL) == 0) {
        const Json *v = json_get(&j, "_name_or_path");
        if (v && v->type == JSON_STRING && v->len == strlen(v->str)) id = hf_id_of(v->str);
        json_free(&j);
    }
    free(path);
    return id;
}

int model_load(Model *m, const char *path, int quant, Err *e) {
    memset(m, 0, sizeof *m);
    if (quant >= 0 && (!type_info(quant) || !can_quantize(quant)))
        return err_set(e, "%s: cannot hold weights as type %d (no quantizer for it)", path, quant);
    ModelStorage *s = xcalloc(1, sizeof *s);
    if (source_open(&s->src, path, e) != 0) {
        free(s);
        return -1;
    }
    m->storage = s;
    s->src_open = 1;
    m->path = xstrdup(path);
    m->arch = xstrdup("qwen2");
    m->hf_id = s->src.gguf ? gguf_hf_id(&s->src.g) : dir_hf_id(s->src.path);
    m->config = s->src.c;
    m->gen = s->src.gen;
    m->tok = s->src.tok;
    s->src.has_tok = 0;
    m->w.layers = xcalloc((size_t)m->config.L, sizeof(LayerWeights));
    int rc = load_matrix(&m->w.embed, s, &s->src.t[S_EMBED], quant, e);
    if (rc == 0) m->w.lm_head = m->w.embed;
    if (rc == 0 && !m->config.tied) rc = load_matrix(&m->w.lm_head, s, &s->src.t[S_OUTPUT], quant, e);
    if (rc == 0) m->w.out_norm = load_vector(s, &s->src.t[S_OUT_NORM]);
    for (int l = 0; l < m->config.L && rc == 0; l++) rc = load_layer(&m->w.layers[l], s, l, quant, e);
    if (rc != 0) {
        model_free(m);
        return rc;
    }
    if (s->in_place == 0) {  // everything was converted: give the file's pages back (a BF16 model: ~1 GB)
        source_close(&s->src);
        s->src_open = 0;
    }
    return 0;
}

#if defined(__linux__) && defined(MADV_HUGEPAGE)
typedef struct {
    unsigned char *dst;
    unsigned char *src;
    size_t n;
    int release;  // src is a file mapping: drop its pages once copied (the page cache keeps them)
} CopyJob;

static void copy_pages(void *ctx, int start, int end) {  // 2 MB pages [start, end)
    const CopyJob *j = ctx;
    for (int page = start; page < end; page++) {
        size_t a = (size_t)page << 21, b = a + ((size_t)1 << 21) < j->n ? a + ((size_t)1 << 21) : j->n;
        memcpy(j->dst + a, j->src + a, b - a);
        if (j->release) madvise(j->src + a, b - a, MADV_DONTNEED);
    }
}
#endif

// A copy of the file's n bytes in fresh anonymous memory that Linux backs with 2 MB pages (its
// transparent huge pages, asked for with madvise), read-only, *bytes the length to munmap; NULL
// where that is not possible (other systems, or mmap or madvise refuses). The file's pages leave
// the process as they are copied, so that the two are never resident at once.
static void *hugepage_copy(const FileMap *file, size_t *bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    size_t n = file->size;
    size_t huge = (size_t)1 << 21, len = (n + huge - 1) / huge * huge;
    unsigned char *p = mmap(NULL, len + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    size_t head = (huge - (uintptr_t)p % huge) % huge;  // the pages must start on a 2 MB boundary
    if (head) munmap(p, head);
    if (huge - head) munmap(p + head + len, huge - head);
    p += head;
    if (madvise(p, len, MADV_HUGEPAGE) != 0) {  // a kernel without transparent huge pages
        munmap(p, len);
        return NULL;
    }
    CopyJob j = {p, (unsigned char *)file->data, n, file->mapped};
    parallel_for(copy_pages, &j, (int)(len / huge), 1);
    mprotect(p, len, PROT_READ);
    *bytes = len;
    return p;
#else
    (void)file, (void)bytes;
    return NULL;
#endif
}

// W's data, when it lies in file[n], now at the same offset in copy.
static void repoint(QMatrix *W, const unsigned char *file, size_t n, const unsigned char *copy) {
    const unsigned char *d = W->data;
    if (d >= file && d < file + n) W->data = copy + (d - file);
}

void model_hugepages(Model *m) {
    ModelStorage *s = m->storage;
    if (!s || !s->src_open || !s->src.gguf) return;
    const unsigned char *file = s->src.g.map.data;
    size_t n = s->src.g.map.size;
    s->huge = hugepage_copy(&s->src.g.map, &s->huge_bytes);
    if (!s->huge) return;
    repoint(&m->w.embed, file, n, s->huge);
    repoint(&m->w.lm_head, file, n, s->huge);
    for (int l = 0; l < m->config.L; l++) {
        LayerWeights *lw = &m->w.layers[l];
        QMatrix *ws[] = {&lw->wq, &lw->wk, &lw->wv, &lw->wo, &lw->wgate, &lw->wup, &lw->wdown};
        for (size_t i = 0; i < sizeof ws / sizeof ws[0]; i++) repoint(ws[i], file, n, s->huge);
    }
    source_close(&s->src);  // nothing points into the file any more
    s->src_open = 0;
}

void model_free(Model *m) {
    ModelStorage *s = m->storage;
    if (s) {
        tokenizer_free(&m->tok);
        for (int i = 0; i < s->n_bufs; i++) free(s->bufs[i]);
        free(s->bufs);
        if (s->src_open) source_close(&s->src);
#if defined(__linux__)
        if (s->huge) munmap(s->huge, s->huge_bytes);
#endif
        free(s);
    }
    free(m->w.layers);
    free(m->path);
    free(m->hf_id);
    free(m->arch);
    memset(m, 0, sizeof *m);
}

// ---------------------------------------------------------------------------------------------
// Writing GGUF models: the metadata llama.cpp needs, then every tensor, row batch by row batch.

typedef struct {
    const Config *c;
    const Tokenizer *tok;
    const char *name;
    const char *chat_template;  // may be NULL
    int file_type;              // llama.cpp's LLAMA_FTYPE_*
} ModelMeta;

static void add_config(GgufWriter *w, const ModelMeta *m) {
    gguf_add_str(w, "general.architecture", "qwen2");
    gguf_add_str(w, "general.name", m->name);
    gguf_add_u32(w, "general.file_type", (uint32_t)m->file_type);
    gguf_add_u32(w, "general.quantization_version", 2);
    gguf_add_u32(w, "qwen2.context_length", (uint32_t)m->c->max_seq);
    gguf_add_u32(w, "qwen2.embedding_length", (uint32_t)m->c->C);
    gguf_add_u32(w, "qwen2.block_count", (uint32_t)m->c->L);
    gguf_add_u32(w, "qwen2.feed_forward_length", (uint32_t)m->c->FF);
    gguf_add_u32(w, "qwen2.attention.head_count", (uint32_t)m->c->NH);
    gguf_add_u32(w, "qwen2.attention.head_count_kv", (uint32_t)m->c->NKV);
    gguf_add_f32(w, "qwen2.rope.freq_base", m->c->rope_theta);
    gguf_add_f32(w, "qwen2.attention.layer_norm_rms_epsilon", m->c->rms_eps);
}

// The vocabulary padded to V rows with "[PADi]" tokens (UNUSED), as llama.cpp's converter does.
static void add_tokenizer(GgufWriter *w, const ModelMeta *m) {
    const Tokenizer *tok = m->tok;
    int V = m->c->V;
    const char **tokens = xmalloc(sizeof(char *) * (size_t)V);
    int32_t *types = xmalloc(sizeof(int32_t) * (size_t)V);
    char **pads = xcalloc((size_t)V, sizeof(char *));
    for (int i = 0; i < V; i++) {
        if (i < tok->n_vocab) {
            tokens[i] = tok->vocab[i];
            types[i] = tok->token_type[i];
        } else {
            pads[i] = xmalloc(24);
            snprintf(pads[i], 24, "[PAD%d]", i);
            tokens[i] = pads[i];
            types[i] = TOKEN_UNUSED;
        }
    }
    gguf_add_str(w, "tokenizer.ggml.model", "gpt2");
    gguf_add_str(w, "tokenizer.ggml.pre", "qwen2");
    gguf_add_array(w, "tokenizer.ggml.tokens", GGUF_STRING, tokens, (uint64_t)V);
    gguf_add_array(w, "tokenizer.ggml.token_type", GGUF_INT32, types, (uint64_t)V);
    gguf_add_array(w, "tokenizer.ggml.merges", GGUF_STRING, tok->merges, (uint64_t)tok->n_merges);
    if (tok->eos_id >= 0) gguf_add_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)tok->eos_id);
    if (tok->pad_id >= 0) gguf_add_u32(w, "tokenizer.ggml.padding_token_id", (uint32_t)tok->pad_id);
    if (tok->endoftext_id >= 0) gguf_add_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)tok->endoftext_id);
    gguf_add_bool(w, "tokenizer.ggml.add_bos_token", 0);
    if (m->chat_template) gguf_add_str(w, "tokenizer.chat_template", m->chat_template);
    for (int i = 0; i < V; i++) free(pads[i]);
    free(pads);
    free(tokens);
    free(types);
}

// llama.cpp's rule for Q4_K_M: more bits for the first and last eighths of the layers and every
// third layer between.
static int use_more_bits(int i, int n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

// The output type of a slot. mix = 1: Q4_K_M (base Q4_K); otherwise every matrix in `type`.
static int plan_type(const Config *c, int slot, int type, int mix) {
    if (!slot_is_matrix(slot)) return TYPE_F32;
    int64_t rows, cols;
    slot_shape(c, slot, &rows, &cols);
    if (mix) {
        int k = slot_kind(slot), l = slot_layer(slot);
        type = TYPE_Q4_K;
        if (slot == S_OUTPUT || (c->tied && slot == S_EMBED)) type = cols % 256 ? TYPE_Q8_0 : TYPE_Q6_K;
        else if ((k == K_V || k == K_DOWN) && use_more_bits(l, c->L)) type = TYPE_Q6_K;
    }
    return fit_type(type, cols);
}

// llama.cpp's general.file_type for a --type.
static int file_type_of(int type, int mix) {
    if (mix) return 15;  // LLAMA_FTYPE_MOSTLY_Q4_K_M
    switch (type) {
    case TYPE_F32: return 0;
    case TYPE_F16: return 1;
    case TYPE_Q4_0: return 2;
    case TYPE_Q4_1: return 3;
    case TYPE_Q8_0: return 7;
    case TYPE_Q5_0: return 8;
    case TYPE_Q5_1: return 9;
    case TYPE_Q4_K: return 14;
    case TYPE_Q5_K: return 16;
    case TYPE_Q6_K: return 18;
    case TYPE_BF16: return 32;
    default: return 0;
    }
}

// Parses --type: a type of quant.h that can be stored in GGUF, or "q4_k_m" (*mix = 1).
static int parse_out_type(const char *name, int *mix, Err *e) {
    *mix = name && strcmp(name, "q4_k_m") == 0;
    int type = *mix ? TYPE_Q4_K : type_from_name(name);
    if (type < 0 || type == TYPE_NF4)
        return err_set(e, "--type '%s': not a GGUF type (f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, q4_k_m)", name ? name : "");
    return type;
}

// Order of the tensors in the file: token_embd, the layers, output_norm, output.
static int slot_order(int i, int n_slots) {
    if (i == 0) return S_EMBED;
    if (i < n_slots - 2) return N_GLOBAL + i - 1;
    return i == n_slots - 2 ? S_OUT_NORM : S_OUTPUT;
}

typedef struct {
    const Config *c;
    int *slot_type;        // [n_slots] output type; -1: not written (output when tied)
    int n_slots;
    RowJob proto;          // fill, seed, std, table for random models
    const Source *src;     // FILL_SOURCE
    const Lora *lora;      // FILL_SOURCE: an adapter merged into the matrices it adapts (or NULL)
    float embed_std;
} WritePlan;

static int add_tensor_infos(GgufWriter *w, const WritePlan *p, Err *e) {
    char name[128];
    for (int i = 0; i < p->n_slots; i++) {
        int slot = slot_order(i, p->n_slots);
        if (p->slot_type[slot] < 0) continue;
        int64_t rows, cols;
        slot_shape(p->c, slot, &rows, &cols);
        int64_t ne[2] = {cols, rows};
        if (gguf_add_tensor(w, slot_name(name, sizeof name, slot, 1), p->slot_type[slot], slot_is_matrix(slot) ? 2 : 1, ne, e) != 0)
            return -1;
    }
    return 0;
}

// The adapter's pair on a slot's matrix, or NULL.
static const LoraPair *slot_pair(const Lora *lora, int slot) {
    static const int target[N_LAYER] = {-1, LORA_Q, -1, LORA_K, -1, LORA_V, -1, LORA_O, -1, LORA_GATE, LORA_UP, LORA_DOWN};
    int l = slot_layer(slot), k = l < 0 ? -1 : target[slot_kind(slot)];
    if (!lora || k < 0) return NULL;
    const LoraPair *p = &lora->pairs[l * LORA_NTARGETS + k];
    return p->r ? p : NULL;
}

// Streams one tensor's rows, converted or drawn, in batches of about 4M values.
static int write_tensor(GgufWriter *w, const WritePlan *p, int slot, Err *e) {
    int64_t rows, cols;
    slot_shape(p->c, slot, &rows, &cols);
    RowJob j = p->proto;
    j.type = p->slot_type[slot];
    j.cols = cols;
    j.slot = slot;
    if (p->src) {
        j.src = &p->src->t[slot];
        j.pair = slot_pair(p->lora, slot);
        if (j.pair) j.scale = lora_scale(p->lora, j.pair);
    } else if (!slot_is_matrix(slot) && slot_kind(slot) != K_QB && slot_kind(slot) != K_KB && slot_kind(slot) != K_VB) j.fill = FILL_ONES;
    else if (slot == S_EMBED) j.std = p->embed_std;
    int64_t batch = (1 << 22) / cols > 0 ? (1 << 22) / cols : 1;
    size_t out_row = row_bytes(j.type, cols);
    j.out = xmalloc(out_row * (size_t)(batch < rows ? batch : rows));
    int rc = 0;
    for (int64_t r = 0; r < rows && rc == 0; r += batch) {
        int64_t n = rows - r < batch ? rows - r : batch;
        rc = run_rows(&j, r, n, e);
        if (rc == 0) rc = gguf_write_data(w, j.out, out_row * (size_t)n, e);
    }
    free(j.out);
    return rc;
}

static int write_model(const char *path, const ModelMeta *meta, const WritePlan *p, Err *e) {
    for (int slot = 0; slot < p->n_slots; slot++)
        if (p->slot_type[slot] >= 0 && p->slot_type[slot] != TYPE_F32 && !can_quantize(p->slot_type[slot]) &&
            !(p->src && p->src->t[slot].type == p->slot_type[slot]))
            return err_set(e, "%s: no quantizer for %s yet", path, type_info(p->slot_type[slot])->name);
    GgufWriter w;
    if (gguf_writer_open(&w, path, e) != 0) return -1;
    add_config(&w, meta);
    add_tokenizer(&w, meta);
    int rc = add_tensor_infos(&w, p, e);
    if (rc == 0) rc = gguf_write_header(&w, e);
    for (int i = 0; i < p->n_slots && rc == 0; i++) {
        int slot = slot_order(i, p->n_slots);
        if (p->slot_type[slot] >= 0) rc = write_tensor(&w, p, slot, e);
    }
    if (rc != 0) {
        gguf_writer_abort(&w);
        return -1;
    }
    return gguf_writer_close(&w, e);
}

// Types of every slot for --type; prints one note when some matrices fall back.
static int *plan_types(const Config *c, int n_slots, int type, int mix) {
    int *t = xmalloc(sizeof(int) * (size_t)n_slots);
    int noted = 0;
    for (int slot = 0; slot < n_slots; slot++) {
        t[slot] = slot == S_OUTPUT && c->tied ? -1 : plan_type(c, slot, type, mix);
        int64_t rows, cols;
        slot_shape(c, slot, &rows, &cols);
        if (!mix && t[slot] >= 0 && slot_is_matrix(slot) && t[slot] != type && !noted++)
            fprintf(stderr, "sft: note: %s needs rows of %d; matrices with %lld columns are written as %s\n",
                    type_info(type)->name, type_info(type)->block, (long long)cols, type_info(t[slot])->name);
    }
    return t;
}

int model_quantize(const char *path, const char *type_name, const char *out_path, Err *e) {
    int mix, type = parse_out_type(type_name, &mix, e);
    if (type < 0) return -1;
    Source s;
    if (source_open(&s, path, e) != 0) return -1;
    WritePlan p = {.c = &s.c, .n_slots = s.n_slots, .src = &s, .proto = {.fill = FILL_SOURCE}};
    p.slot_type = plan_types(&s.c, s.n_slots, type, mix);
    ModelMeta meta = {&s.c, &s.tok, s.name, s.chat_template, file_type_of(type, mix)};
    int rc = write_model(out_path, &meta, &p, e);
    free(p.slot_type);
    source_close(&s);
    return rc;
}

// ---------------------------------------------------------------------------------------------
// sft init

static int init_config(Config *c, const char *name, const Tokenizer *tok, Err *e) {
    if (strcmp(name, "tiny") == 0) {
        *c = (Config){.C = 64, .L = 2, .NH = 4, .NKV = 2, .FF = 128, .max_seq = 4096, .rope_theta = 1e6f, .rms_eps = 1e-6f, .tied = 1};
    } else if (strcmp(name, "qwen2.5-0.5b") == 0) {
        *c = (Config){.C = 896, .L = 24, .NH = 14, .NKV = 2, .FF = 4864, .V = 151936, .max_seq = 32768,
                      .rope_theta = 1e6f, .rms_eps = 1e-6f, .tied = 1};
    } else if (config_from_json(c, name, 0, e) != 0) {
        return -1;
    }
    c->HS = c->C / c->NH;
    if (c->V == 0) c->V = (tok->n_vocab + 63) / 64 * 64;
    if (check_config(c, name, e) != 0) return -1;
    if (c->V < tok->n_vocab) return err_set(e, "%s: vocab_size %d is smaller than the tokenizer's %d tokens", name, c->V, tok->n_vocab);
    return 0;
}

int model_init_random(const InitOptions *o, Err *e) {
    int mix, type = parse_out_type(o->type, &mix, e);
    if (type < 0) return -1;
    if (!(o->std >= 0 && o->embed_std >= 0 && isfinite(o->std) && isfinite(o->embed_std)))
        return err_set(e, "--std and --embed-std must be finite and >= 0");
    Tokenizer tok;
    if (model_load_tokenizer(&tok, o->tokenizer, e) != 0) return -1;
    Config c;
    int rc = init_config(&c, o->config, &tok, e);
    float *table = xmalloc(sizeof(float) * (NORM_CELLS + 1));
    normal_table(table);
    WritePlan p = {.c = &c, .n_slots = N_GLOBAL + c.L * N_LAYER, .embed_std = o->embed_std,
                   .proto = {.fill = FILL_NORMAL, .seed = o->seed, .std = o->std, .table = table}};
    p.slot_type = rc == 0 ? plan_types(&c, p.n_slots, type, mix) : NULL;
    char *tmpl = rc == 0 ? chat_template_of(o->tokenizer) : NULL;
    int preset = strcmp(o->config, "tiny") == 0 || strcmp(o->config, "qwen2.5-0.5b") == 0;
    char name[64];
    snprintf(name, sizeof name, "sft-init-%s", preset ? o->config : "random");
    ModelMeta meta = {&c, &tok, name, tmpl, file_type_of(type, mix)};
    if (rc == 0) rc = write_model(o->out, &meta, &p, e);
    free(tmpl);
    free(table);
    free(p.slot_type);
    tokenizer_free(&tok);
    return rc;
}

// ---------------------------------------------------------------------------------------------
// sft info

static void print_tokenizer(FILE *out, const Source *s) {
    const Tokenizer *t = &s->tok;
    fprintf(out, "tokenizer: byte-level BPE, %d tokens, %d merges\n", t->n_vocab, t->n_merges);
    int ids[5] = {t->eos_id, t->pad_id, t->im_start_id, t->im_end_id, t->endoftext_id};
    const char *what[5] = {"eos", "pad", "im_start", "im_end", "endoftext"};
    fprintf(out, "special tokens:");
    for (int i = 0; i < 5; i++)
        if (ids[i] >= 0 && ids[i] < t->n_vocab) fprintf(out, " %s=%d %s", what[i], ids[i], t->vocab[ids[i]]);
    int control = 0;
    for (int i = 0; i < t->n_vocab; i++) control += t->token_type[i] == TOKEN_CONTROL;
    fprintf(out, "\ncontrol tokens: %d\nchat template: %s\n", control, s->chat_template ? "yes" : "no");
}

static void print_tensors(FILE *out, const Source *s) {
    double params = 0, bytes = 0;
    int n = 0;
    fprintf(out, "tensors (shape [rows, cols], row-major; type; bytes):\n");
    for (int i = 0; i < s->n_slots; i++) {
        int slot = slot_order(i, s->n_slots);
        const SrcTensor *t = &s->t[slot];
        if (!t->name || (slot == S_OUTPUT && s->c.tied)) continue;
        size_t b = row_bytes(t->type, t->cols) * (size_t)t->rows;
        char shape[48];
        if (t->n_dims == 1) snprintf(shape, sizeof shape, "[%lld]", (long long)t->cols);
        else snprintf(shape, sizeof shape, "[%lld, %lld]", (long long)t->rows, (long long)t->cols);
        fprintf(out, "  %-44s %-16s %-5s %12zu bytes\n", t->name, shape, type_info(t->type)->name, b);
        params += (double)t->rows * (double)t->cols;
        bytes += (double)b;
        n++;
    }
    fprintf(out, "total: %d tensors, %.0f parameters, %.0f bytes, %.3f bits/weight\n", n, params, bytes, params > 0 ? 8 * bytes / params : 0);
}

int model_info(FILE *out, const char *path, Err *e) {
    Source s;
    if (source_open(&s, path, e) != 0) return -1;
    const Config *c = &s.c;
    fprintf(out, "model: %s (%s)\n", path, s.gguf ? "GGUF" : "Hugging Face directory, safetensors");
    if (s.gguf) fprintf(out, "gguf version: %u, alignment %zu\n", s.g.version, s.g.alignment);
    fprintf(out, "architecture: qwen2 (Qwen2ForCausalLM), name: %s\n", s.name);
    fprintf(out, "hidden %d, layers %d, heads %d, kv heads %d, head size %d, ffn %d, vocab %d, context %d\n", c->C, c->L,
            c->NH, c->NKV, c->HS, c->FF, c->V, c->max_seq);
    fprintf(out, "rope theta %g, rms eps %g, tied embeddings %s\n", c->rope_theta, c->rms_eps, c->tied ? "yes" : "no");
    fprintf(out, "generation defaults: temperature %g, top_p %g, top_k %d, repetition_penalty %g\n", s.gen.temperature,
            s.gen.top_p, s.gen.top_k, s.gen.repetition_penalty);
    print_tokenizer(out, &s);
    print_tensors(out, &s);
    source_close(&s);
    return 0;
}

int model_peek(const char *path, Config *c, Err *e) {
    Source s;
    if (source_open(&s, path, e) != 0) return -1;
    *c = s.c;
    source_close(&s);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// sft merge: W' = W + scale B A in float32 from the base as stored, then written as GGUF (through
// write_model) or as a Hugging Face directory.

// The GGUF types of a merge: --type for every matrix, or each matrix's stored type (a merged one
// that has no quantizer becomes Q8_0), or BF16 for a Hugging Face base.
static int *merge_types(const Source *s, const Lora *lora, const char *type_name, int *file_type, Err *e) {
    int mix = 0, type = TYPE_BF16;
    if (type_name && (type = parse_out_type(type_name, &mix, e)) < 0) return NULL;
    if (type_name || !s->gguf) {
        *file_type = file_type_of(type, mix);
        return plan_types(&s->c, s->n_slots, type, mix);
    }
    int *t = xmalloc(sizeof(int) * (size_t)s->n_slots), common = -1;
    for (int slot = 0; slot < s->n_slots; slot++) {
        t[slot] = slot == S_OUTPUT && s->c.tied ? -1 : !slot_is_matrix(slot) ? TYPE_F32 : s->t[slot].type;
        if (t[slot] >= 0 && t[slot] != TYPE_F32 && slot_pair(lora, slot) && !can_quantize(t[slot])) {
            fprintf(stderr, "sft: note: no quantizer for %s: merged matrices are written as q8_0\n", type_info(t[slot])->name);
            t[slot] = fit_type(TYPE_Q8_0, s->t[slot].cols);
        }
        if (slot_kind(slot) == K_Q) common = t[slot];
    }
    *file_type = common >= 0 ? file_type_of(common, 0) : 0;
    return t;
}

static int merge_gguf(const Source *s, const Lora *lora, const char *out, const char *type_name, Err *e) {
    int file_type = 0;
    int *types = merge_types(s, lora, type_name, &file_type, e);
    if (!types) return -1;
    WritePlan p = {.c = &s->c, .n_slots = s->n_slots, .src = s, .lora = lora, .proto = {.fill = FILL_SOURCE}, .slot_type = types};
    ModelMeta meta = {&s->c, &s->tok, s->name, s->chat_template, file_type};
    int rc = write_model(out, &meta, &p, e);
    free(types);
    return rc;
}

// One slot's tensor, merged, in dtype (TYPE_F32 or TYPE_BF16): a malloc'ed [rows, cols] array.
static void *slot_tensor(const Source *s, const Lora *lora, int slot, int dtype, Err *e) {
    const SrcTensor *t = &s->t[slot];
    RowJob j = {.fill = FILL_SOURCE, .src = t, .type = dtype, .cols = t->cols, .pair = slot_pair(lora, slot)};
    if (j.pair) j.scale = lora_scale(lora, j.pair);
    j.out = xmalloc(row_bytes(dtype, t->cols) * (size_t)t->rows);
    if (run_rows(&j, 0, t->rows, e) == 0) return j.out;
    free(j.out);
    return NULL;
}

// DIR/model.safetensors: every tensor under its Hugging Face name (no lm_head when tied).
static int write_st_weights(const char *dir, const Source *s, const Lora *lora, int dtype, Err *e) {
    StTensor *t = xcalloc((size_t)s->n_slots, sizeof *t);
    char *names = xmalloc((size_t)s->n_slots * 128);
    int n = 0, rc = 0;
    for (int i = 0; i < s->n_slots && rc == 0; i++) {
        int slot = slot_order(i, s->n_slots);
        if (slot == S_OUTPUT && s->c.tied) continue;
        const SrcTensor *src = &s->t[slot];
        void *data = slot_tensor(s, lora, slot, dtype, e);
        if (!data) rc = -1;
        t[n] = (StTensor){.name = slot_name(names + (size_t)n * 128, 128, slot, 0), .type = dtype, .data = data,
                          .n_dims = slot_is_matrix(slot) ? 2 : 1, .shape = {src->rows, src->cols}};
        if (t[n].n_dims == 1) t[n].shape[0] = src->cols;
        n++;
    }
    char *path = path_join(dir, "model.safetensors");
    if (rc == 0) rc = safetensors_write(path, t, n, "{\"format\":\"pt\"}", e);
    for (int i = 0; i < n; i++) free((void *)t[i].data);
    free(path), free(names), free(t);
    return rc;
}

// Writes text (n bytes) into DIR/name atomically.
static int write_text_file(const char *dir, const char *name, const char *text, size_t n, Err *e) {
    char *path = path_join(dir, name);
    AtomicFile af;
    int rc = atomic_open(&af, path, e);
    if (rc == 0 && fwrite(text, 1, n, af.f) != n) atomic_abort(&af), rc = err_set(e, "%s: write failed", path);
    else if (rc == 0) rc = atomic_close(&af, e);
    free(path);
    return rc;
}

static int write_hf_config(const char *dir, const Source *s, int dtype, Err *e) {
    const Config *c = &s->c;
    char buf[2048];
    snprintf(buf, sizeof buf,
             "{\n  \"architectures\": [\"Qwen2ForCausalLM\"],\n  \"attention_dropout\": 0.0,\n  \"bos_token_id\": %d,\n"
             "  \"eos_token_id\": %d,\n  \"hidden_act\": \"silu\",\n  \"hidden_size\": %d,\n  \"initializer_range\": 0.02,\n"
             "  \"intermediate_size\": %d,\n  \"max_position_embeddings\": %d,\n  \"max_window_layers\": %d,\n"
             "  \"model_type\": \"qwen2\",\n  \"num_attention_heads\": %d,\n  \"num_hidden_layers\": %d,\n"
             "  \"num_key_value_heads\": %d,\n  \"rms_norm_eps\": %.9g,\n  \"rope_scaling\": null,\n  \"rope_theta\": %.9g,\n"
             "  \"sliding_window\": null,\n  \"tie_word_embeddings\": %s,\n  \"torch_dtype\": \"%s\",\n  \"use_cache\": true,\n"
             "  \"use_sliding_window\": false,\n  \"vocab_size\": %d\n}\n",
             s->tok.endoftext_id, s->tok.eos_id, c->C, c->FF, c->max_seq, c->L, c->NH, c->L, c->NKV, (double)c->rms_eps,
             (double)c->rope_theta, c->tied ? "true" : "false", dtype == TYPE_BF16 ? "bfloat16" : "float32", c->V);
    return write_text_file(dir, "config.json", buf, strlen(buf), e);
}

static int write_gen_config(const char *dir, const Source *s, Err *e) {
    char buf[512];
    snprintf(buf, sizeof buf,
             "{\n  \"bos_token_id\": %d,\n  \"do_sample\": true,\n  \"eos_token_id\": [%d, %d],\n  \"pad_token_id\": %d,\n"
             "  \"repetition_penalty\": %.9g,\n  \"temperature\": %.9g,\n  \"top_k\": %d,\n  \"top_p\": %.9g\n}\n",
             s->tok.endoftext_id, s->tok.eos_id, s->tok.endoftext_id, s->tok.pad_id, (double)s->gen.repetition_penalty,
             (double)s->gen.temperature, s->gen.top_k, (double)s->gen.top_p);
    return write_text_file(dir, "generation_config.json", buf, strlen(buf), e);
}

static void write_json_str(FILE *f, const char *s) { json_write_string(f, s, strlen(s)); }

// DIR/tokenizer.json for a tokenizer read from GGUF: Qwen2's normalizer, pre-tokenizer and
// decoder, the BPE vocabulary and merges, and the control / user-defined tokens as added tokens
// (padding rows of the embedding, type UNUSED, are left out).
static int write_tokenizer_json(const char *dir, const Tokenizer *tok, Err *e) {
    static const char *bl = "{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": false, \"use_regex\": false}";
    char *path = path_join(dir, "tokenizer.json");
    AtomicFile af;
    int rc = atomic_open(&af, path, e);
    free(path);
    if (rc != 0) return -1;
    FILE *f = af.f;
    const char *sep = "";
    fprintf(f, "{\"version\": \"1.0\", \"truncation\": null, \"padding\": null, \"added_tokens\": [");
    for (int i = 0; i < tok->n_vocab; i++) {
        int t = tok->token_type[i];
        if (t != TOKEN_CONTROL && t != TOKEN_USER_DEFINED) continue;
        fprintf(f, "%s{\"id\": %d, \"content\": ", sep, i), sep = ", ";
        write_json_str(f, tok->vocab[i]);
        fprintf(f, ", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, \"normalized\": false, \"special\": %s}",
                t == TOKEN_CONTROL ? "true" : "false");
    }
    fprintf(f, "], \"normalizer\": {\"type\": \"NFC\"}, \"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": "
               "[{\"type\": \"Split\", \"pattern\": {\"Regex\": \"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?"
               "\\\\p{L}+|\\\\p{N}| ?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+\"}, "
               "\"behavior\": \"Isolated\", \"invert\": false}, %s]}, \"post_processor\": %s, \"decoder\": %s, "
               "\"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": null, \"continuing_subword_prefix\": \"\", "
               "\"end_of_word_suffix\": \"\", \"fuse_unk\": false, \"byte_fallback\": false, \"ignore_merges\": false, \"vocab\": {",
            bl, bl, bl);
    sep = "";
    for (int i = 0; i < tok->n_vocab; i++) {
        if (tok->token_type[i] != TOKEN_NORMAL && tok->token_type[i] != TOKEN_BYTE) continue;
        fputs(sep, f), sep = ", ";
        write_json_str(f, tok->vocab[i]);
        fprintf(f, ": %d", i);
    }
    fprintf(f, "}, \"merges\": [");
    for (int i = 0; i < tok->n_merges; i++) fputs(i ? ", " : "", f), write_json_str(f, tok->merges[i]);
    fprintf(f, "]}}\n");
    return atomic_close(&af, e);
}

static int write_tokenizer_config(const char *dir, const Source *s, Err *e) {
    char *path = path_join(dir, "tokenizer_config.json");
    AtomicFile af;
    int rc = atomic_open(&af, path, e);
    free(path);
    if (rc != 0) return -1;
    const Tokenizer *t = &s->tok;
    fprintf(af.f, "{\n  \"add_bos_token\": false,\n  \"add_prefix_space\": false,\n  \"bos_token\": null,\n  \"chat_template\": ");
    if (s->chat_template) write_json_str(af.f, s->chat_template);
    else fputs("null", af.f);
    fprintf(af.f, ",\n  \"clean_up_tokenization_spaces\": false,\n  \"eos_token\": ");
    write_json_str(af.f, t->eos_id >= 0 ? t->vocab[t->eos_id] : "");
    fprintf(af.f, ",\n  \"errors\": \"replace\",\n  \"model_max_length\": %d,\n  \"pad_token\": ", s->c.max_seq);
    write_json_str(af.f, t->pad_id >= 0 ? t->vocab[t->pad_id] : "");
    fprintf(af.f, ",\n  \"split_special_tokens\": false,\n  \"tokenizer_class\": \"Qwen2Tokenizer\",\n  \"unk_token\": null\n}\n");
    return atomic_close(&af, e);
}

// The tokenizer and generation files of a Hugging Face base, copied as they are.
static int copy_hf_files(const char *dir, const Source *s, Err *e) {
    const char *names[] = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                           "added_tokens.json", "chat_template.jinja", "generation_config.json"};
    int rc = 0;
    for (int i = 0; i < 8 && rc == 0; i++) {
        char *from = path_join(s->path, names[i]);
        size_t len;
        char *text = file_exists(from) ? read_file(from, &len, e) : NULL;
        if (file_exists(from) && !text) rc = -1;
        if (text) rc = write_text_file(dir, names[i], text, len, e);
        free(text), free(from);
    }
    char *gen = path_join(s->path, "generation_config.json");
    if (rc == 0 && !file_exists(gen)) rc = write_gen_config(dir, s, e);
    free(gen);
    return rc;
}

static int merge_dir(const Source *s, const Lora *lora, const char *dir, const char *dtype_name, Err *e) {
    int dtype = dtype_name ? type_from_name(dtype_name) : TYPE_BF16;
    if (dtype != TYPE_BF16 && dtype != TYPE_F32) return err_set(e, "--dtype '%s': a directory is written as bf16 or f32", dtype_name);
    if (make_dirs(dir, e) != 0 || write_st_weights(dir, s, lora, dtype, e) != 0 || write_hf_config(dir, s, dtype, e) != 0) return -1;
    if (!s->gguf) return copy_hf_files(dir, s, e);
    if (write_tokenizer_json(dir, &s->tok, e) != 0 || write_tokenizer_config(dir, s, e) != 0) return -1;
    return write_gen_config(dir, s, e);
}

int model_merge(const char *path, const char *lora_path, const MergeOptions *o, Err *e) {
    Source s;
    Lora lora;
    if (source_open(&s, path, e) != 0) return -1;
    int rc = lora_load(&lora, lora_path, &s.c, e);
    if (rc != 0) return source_close(&s), -1;
    size_t n = strlen(o->out);
    int to_dir = is_dir(o->out) || (n > 0 && o->out[n - 1] == '/');
    if (to_dir && o->type) rc = err_set(e, "--type is for a GGUF output; a directory takes --dtype bf16|f32");
    else if (!to_dir && o->dtype) rc = err_set(e, "--dtype is for a directory output (--out DIR/); a GGUF file takes --type");
    else rc = to_dir ? merge_dir(&s, &lora, o->out, o->dtype, e) : merge_gguf(&s, &lora, o->out, o->type, e);
    lora_free(&lora);
    source_close(&s);
    return rc;
}
