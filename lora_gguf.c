// lora_gguf.c: llama.cpp's LoRA adapter files (GGUF), read and written as llama.cpp's
// convert_lora_to_gguf.py writes them and llama.cpp's llama-adapter.cpp reads them:
//
//   general.architecture = "qwen2", general.type = "adapter", adapter.type = "lora",
//   adapter.lora.alpha (float32; llama.cpp scales a pair by alpha / r, r = lora_b's ne[0];
//   alpha 0 means scale 1), and for each adapted projection of layer l, named after its base
//   weight (blk.{l}.attn_q.weight, ...):
//     blk.{l}.attn_q.weight.lora_a   GGUF dims [in, r]   = row-major [r, in]: PEFT's lora_A
//     blk.{l}.attn_q.weight.lora_b   GGUF dims [r, out]  = row-major [out, r]: PEFT's lora_B
//
// Leaves out: LoRA on token_embd / output and mergekit's norm tensors, and activated LoRA
// (adapter.alora.*): refused when read. Read lora.h first, gguf.h for the container.
#include "lora.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "gguf.h"
#include "quant.h"

// GGUF base-weight names of the seven projections, indexed by LORA_Q ... LORA_DOWN.
static const char *const gguf_targets[LORA_NTARGETS] = {"attn_q", "attn_k", "attn_v", "attn_output",
                                                        "ffn_gate", "ffn_up", "ffn_down"};

int lora_is_gguf(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0 || S_ISDIR(st.st_mode)) return 0;
    unsigned char magic[4] = {0};
    FILE *f = fopen(path, "rb");
    size_t got = f ? fread(magic, 1, 4, f) : 0;
    if (f) fclose(f);
    return got == 4 && memcmp(magic, "GGUF", 4) == 0;
}

// "blk.3.attn_q.weight.lora_a" -> layer 3, LORA_Q, is_b 0. Returns -1 for any other name,
// -2 for a projection of a layer at or past L.
static int parse_name(const char *name, int L, int *l, int *k, int *is_b) {
    long layer = 0;
    int digits = 0;
    if (strncmp(name, "blk.", 4) != 0) return -1;
    const char *p = name + 4;
    for (; *p >= '0' && *p <= '9' && digits < 7; p++, digits++) layer = layer * 10 + (*p - '0');
    if (digits == 0 || *p++ != '.' || (name[4] == '0' && digits > 1)) return -1;
    for (*k = 0; *k < LORA_NTARGETS; (*k)++) {
        size_t n = strlen(gguf_targets[*k]);
        if (strncmp(p, gguf_targets[*k], n) != 0 || strncmp(p + n, ".weight.lora_", 13) != 0) continue;
        const char *ab = p + n + 13;
        if ((ab[0] != 'a' && ab[0] != 'b') || ab[1]) return -1;
        *is_b = ab[0] == 'b';
        *l = (int)layer;
        return layer < L ? 0 : -2;
    }
    return -1;
}

// The adapter keys: general.type, adapter.type, general.architecture, adapter.lora.alpha (0 when absent).
static int check_keys(const GgufFile *g, double *alpha, Err *e) {
    const char *s = NULL;
    if (gguf_get_str(g, "general.type", &s, 1, e) != 0 || strcmp(s, "adapter") != 0)
        return s ? err_set(e, "%s: general.type is '%s', not 'adapter': not a LoRA adapter (a model?)", g->path, s)
                 : err_set(e, "%s: general.type is missing or not a string: not a llama.cpp LoRA adapter", g->path);
    s = NULL;
    if (gguf_get_str(g, "adapter.type", &s, 1, e) != 0 || strcmp(s, "lora") != 0)
        return err_set(e, "%s: adapter.type is '%s', not 'lora'", g->path, s ? s : "(missing)");
    s = NULL;
    if (gguf_get_str(g, "general.architecture", &s, 1, e) != 0 || strcmp(s, "qwen2") != 0)
        return err_set(e, "%s: general.architecture is '%s', not 'qwen2'", g->path, s ? s : "(missing)");
    if (gguf_find_kv(g, "adapter.alora.invocation_tokens"))
        return err_set(e, "%s: activated LoRA (adapter.alora.invocation_tokens) is not supported", g->path);
    *alpha = 0;
    if (gguf_get_float(g, "adapter.lora.alpha", alpha, 0, e) < 0) return -1;
    if (!(*alpha >= 0 && *alpha <= 1e6)) return err_set(e, "%s: adapter.lora.alpha = %g is not a number in [0, 1e6]", g->path, *alpha);
    return 0;
}

// One tensor's pair and role, with its shape checked against the model; ranks[2 * pair + is_b] = r.
static int place_tensor(const GgufTensor *t, const Config *c, int *ranks, const char *path, Err *e) {
    int l, k, is_b, in, out;
    int rc = parse_name(t->name, c->L, &l, &k, &is_b);
    size_t n = strlen(t->name);
    if (rc == -1 && n > 12 && strcmp(t->name + n - 12, "_norm.weight") == 0)
        return err_set(e, "%s: tensor '%s': norm tensors in an adapter are not supported (llama.cpp ignores them)", path, t->name);
    if (rc == -1) return err_set(e, "%s: tensor '%s' is not the lora_a or lora_b of one of the seven projections", path, t->name);
    if (rc == -2) return err_set(e, "%s: tensor '%s' matches no LoRA layer of the model (%d layers)", path, t->name, c->L);
    int QD = c->NH * c->HS, KD = c->NKV * c->HS;
    const int ins[LORA_NTARGETS] = {c->C, c->C, c->C, QD, c->C, c->C, c->FF};
    const int outs[LORA_NTARGETS] = {QD, KD, KD, c->C, c->FF, c->FF, c->C};
    in = ins[k], out = outs[k];
    int64_t r = is_b ? t->ne[0] : t->ne[1], other = is_b ? t->ne[1] : t->ne[0], want = is_b ? out : in;
    if (t->n_dims != 2 || other != want || r < 1 || r > LORA_MAX_R)
        return err_set(e, "%s: tensor '%s' has GGUF dims [%lld, %lld], the model needs [%s, %s] with rank r in [1, %d] (%s %d)", path,
                       t->name, (long long)t->ne[0], (long long)t->ne[1], is_b ? "r" : "in", is_b ? "out" : "r", LORA_MAX_R,
                       is_b ? "out" : "in", (int)want);
    if (t->type == TYPE_NF4) return err_set(e, "%s: tensor '%s': type nf4 is not a GGUF type", path, t->name);
    ranks[2 * (l * LORA_NTARGETS + k) + is_b] = (int)r;
    return 0;
}

// The shape of the adapter: every pair whole, lora_a and lora_b of the same rank.
static int gguf_shape(LoraShape *s, const GgufFile *g, const Config *c, double alpha, Err *e) {
    int n = c->L * LORA_NTARGETS;
    int *ranks = xcalloc((size_t)n * 2, sizeof(int));
    int rc = g->n_tensors == 0 ? err_set(e, "%s: the adapter holds no tensor", g->path) : 0;
    for (int i = 0; i < g->n_tensors && rc == 0; i++) rc = place_tensor(&g->tensors[i], c, ranks, g->path, e);
    memset(s, 0, sizeof *s);
    s->L = c->L;
    s->rank = xcalloc((size_t)n, sizeof(int));
    s->alpha = xcalloc((size_t)n, sizeof(float));
    for (int i = 0; i < n && rc == 0; i++) {
        int ra = ranks[2 * i], rb = ranks[2 * i + 1];
        if (ra != rb && (!ra || !rb))
            rc = err_set(e, "%s: blk.%d.%s.weight has lora_%c but no lora_%c", g->path, i / LORA_NTARGETS,
                         gguf_targets[i % LORA_NTARGETS], ra ? 'a' : 'b', ra ? 'b' : 'a');
        else if (ra != rb)
            rc = err_set(e, "%s: blk.%d.%s.weight: lora_a has rank %d, lora_b rank %d", g->path, i / LORA_NTARGETS,
                         gguf_targets[i % LORA_NTARGETS], ra, rb);
        s->rank[i] = ra;
        s->alpha[i] = alpha > 0 ? (float)alpha : (float)ra;  // alpha 0: scale 1, as llama.cpp does
        if (ra && s->lora_alpha == 0) s->lora_alpha = s->alpha[i];
    }
    free(ranks);
    return rc;
}

// Copies tensor t (rows of row_bytes(type, cols)) into dst[rows * cols], checking every value.
static int read_values(float *dst, const GgufTensor *t, const char *path, Err *e) {
    int64_t cols = t->ne[0], rows = t->ne[1];
    size_t rb = row_bytes(t->type, cols);
    for (int64_t r = 0; r < rows; r++) {
        float *row = dst + (size_t)r * cols;
        dequantize_row(t->type, row, (const unsigned char *)t->data + (size_t)r * rb, cols);
        for (int64_t i = 0; i < cols; i++)
            if (!isfinite(row[i]))
                return err_set(e, "%s: tensor '%s': element %lld is %s", path, t->name, (long long)(r * cols + i),
                               isnan(row[i]) ? "NaN" : "infinite");
    }
    return 0;
}

int lora_load_gguf(Lora *lora, const char *path, const Config *c, Err *e) {
    GgufFile g;
    double alpha;
    LoraShape s = {0};
    memset(lora, 0, sizeof *lora);
    if (gguf_open(&g, path, e) != 0) return -1;
    int rc = check_keys(&g, &alpha, e);
    if (rc == 0) rc = gguf_shape(&s, &g, c, alpha, e);
    if (rc == 0) {
        lora_alloc(lora, c, &s);
        for (int i = 0; i < g.n_tensors && rc == 0; i++) {
            int l, k, is_b;
            parse_name(g.tensors[i].name, c->L, &l, &k, &is_b);
            LoraPair *p = &lora->pairs[l * LORA_NTARGETS + k];
            rc = read_values(is_b ? p->B : p->A, &g.tensors[i], path, e);
        }
        if (rc != 0) lora_free(lora);
    }
    lora_shape_free(&s);
    gguf_close(&g);
    return rc;
}

// ---------------------------------------------------------------------------------------------
// Writing.

// llama.cpp's alpha for the adapter, and each pair's factor on B so that alpha / r times it is
// the pair's own scale: 1 for every pair of a plain adapter (alpha = lora_alpha) and of an rsLoRA
// adapter of one rank (alpha = lora_alpha * sqrt(r)).
static float llama_alpha(const Lora *lora, double *fold) {
    const LoraPair *ref = NULL;
    for (int i = 0; i < lora->L * LORA_NTARGETS && !ref; i++)
        if (lora->pairs[i].r == lora->R) ref = &lora->pairs[i];
    float alpha = lora->rslora ? (float)((double)ref->alpha * sqrt((double)ref->r)) : lora->alpha;
    for (int i = 0; i < lora->L * LORA_NTARGETS; i++) {
        const LoraPair *p = &lora->pairs[i];
        fold[i] = 1.0;
        if (!p->r || (lora->rslora ? (p->r == ref->r && p->alpha == ref->alpha) : p->alpha == lora->alpha)) continue;
        double own = lora->rslora ? p->alpha / sqrt((double)p->r) : (double)p->alpha / p->r;
        fold[i] = own / ((double)alpha / p->r);
    }
    return alpha;
}

// The type of a tensor with rows of `cols`: Q8_0 falls back to F16 where rows are not whole
// blocks, as convert_lora_to_gguf.py does.
static int tensor_type(int type, int64_t cols) { return row_bytes(type, cols) ? type : TYPE_F16; }

static int add_infos(GgufWriter *w, const Lora *lora, int type, Err *e) {
    char name[96];
    for (int i = 0; i < lora->L * LORA_NTARGETS; i++) {
        const LoraPair *p = &lora->pairs[i];
        if (!p->r) continue;
        for (int is_b = 0; is_b < 2; is_b++) {
            int64_t ne[2] = {is_b ? p->r : p->in, is_b ? p->out : p->r};
            snprintf(name, sizeof name, "blk.%d.%s.weight.lora_%c", i / LORA_NTARGETS, gguf_targets[i % LORA_NTARGETS], is_b ? 'b' : 'a');
            if (gguf_add_tensor(w, name, tensor_type(type, ne[0]), 2, ne, e) != 0) return -1;
        }
    }
    return 0;
}

// rows[n_rows, cols] times fold, converted row by row and written.
static int write_rows(GgufWriter *w, const float *rows, int64_t n_rows, int64_t cols, double fold, int type, Err *e) {
    int t = tensor_type(type, cols);
    size_t rb = row_bytes(t, cols);
    float *tmp = xmalloc(sizeof(float) * (size_t)cols);
    unsigned char *out = xmalloc(rb);
    int rc = 0;
    for (int64_t r = 0; r < n_rows && rc == 0; r++) {
        for (int64_t i = 0; i < cols; i++) tmp[i] = fold == 1.0 ? rows[(size_t)r * cols + i] : (float)(fold * rows[(size_t)r * cols + i]);
        rc = quantize_row(t, out, tmp, cols) == 0 ? gguf_write_data(w, out, rb, e) : err_set(e, "no quantizer for this type");
    }
    free(tmp);
    free(out);
    return rc;
}

int lora_save_gguf(const Lora *lora, const char *path, int type, const char *name, Err *e) {
    if (type != TYPE_F32 && type != TYPE_F16 && type != TYPE_BF16 && type != TYPE_Q8_0)
        return err_set(e, "%s: an adapter is written as f32, f16, bf16 or q8_0", path);
    double *fold = xmalloc(sizeof(double) * (size_t)lora->L * LORA_NTARGETS);
    float alpha = llama_alpha(lora, fold);
    GgufWriter w;
    if (gguf_writer_open(&w, path, e) != 0) return free(fold), -1;
    gguf_add_str(&w, "general.architecture", "qwen2");
    gguf_add_str(&w, "general.type", "adapter");
    gguf_add_str(&w, "adapter.type", "lora");
    gguf_add_str(&w, "general.name", name);
    gguf_add_f32(&w, "adapter.lora.alpha", alpha);
    gguf_add_u32(&w, "general.quantization_version", 2);
    int rc = add_infos(&w, lora, type, e);
    if (rc == 0) rc = gguf_write_header(&w, e);
    for (int i = 0; i < lora->L * LORA_NTARGETS && rc == 0; i++) {
        const LoraPair *p = &lora->pairs[i];
        if (!p->r) continue;
        rc = write_rows(&w, p->A, p->r, p->in, 1.0, type, e);
        if (rc == 0) rc = write_rows(&w, p->B, p->out, p->r, fold[i], type, e);
    }
    free(fold);
    if (rc != 0) {
        gguf_writer_abort(&w);
        return -1;
    }
    return gguf_writer_close(&w, e);
}
