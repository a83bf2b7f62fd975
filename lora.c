// lora.c: the adapter's storage (one array of parameters, one of gradients), PEFT's
// initialization, and its files in Hugging Face PEFT's format (adapter_config.json +
// adapter_model.safetensors), read strictly and written atomically.
//
// Left out: the adapter's arithmetic (model.c: lora_forward / lora_backward) and the optimizer
// (optim.c). PEFT features beyond plain LoRA (DoRA, rsLoRA, per-module ranks, layer subsets,
// LoRA biases, fan_in_fan_out, modules_to_save) are refused with a clear error. Read lora.h first.
#include "lora.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "quant.h"
#include "safetensors.h"

const char *const lora_target_names[LORA_NTARGETS] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"};

// in and out features of each projection.
static void target_shape(const Config *c, int target, int *in, int *out) {
    int QD = c->NH * c->HS, KD = c->NKV * c->HS;
    const int ins[LORA_NTARGETS] = {c->C, c->C, c->C, QD, c->C, c->C, c->FF};
    const int outs[LORA_NTARGETS] = {QD, KD, KD, c->C, c->FF, c->FF, c->C};
    *in = ins[target];
    *out = outs[target];
}

// "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
static void tensor_name(char *buf, size_t cap, int l, int target, int is_B) {
    snprintf(buf, cap, "base_model.model.model.layers.%d.%s.%s.lora_%c.weight", l, target <= LORA_O ? "self_attn" : "mlp",
             lora_target_names[target], is_B ? 'B' : 'A');
}

static int target_index(const char *name, size_t len) {
    for (int k = 0; k < LORA_NTARGETS; k++)
        if (strlen(lora_target_names[k]) == len && memcmp(lora_target_names[k], name, len) == 0) return k;
    return -1;
}

int lora_parse_targets(unsigned *targets, const char *list, Err *e) {
    *targets = 0;
    if (strcmp(list, "all") == 0 || strcmp(list, "all-linear") == 0) {
        *targets = (1u << LORA_NTARGETS) - 1;
        return 0;
    }
    for (const char *p = list; *p;) {
        size_t n = strcspn(p, ",");
        int k = target_index(p, n);
        if (k < 0) return err_set(e, "unknown LoRA target '%.*s' (known: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, all-linear)", (int)n, p);
        *targets |= 1u << k;
        p += n + (p[n] == ',');
    }
    if (*targets == 0) return err_set(e, "no LoRA target given");
    return 0;
}

// Allocates params and grads (zeroed) and points every pair into them.
static void lora_alloc(Lora *lora, const Config *c, int R, float alpha, float dropout, unsigned targets) {
    memset(lora, 0, sizeof *lora);
    lora->R = R;
    lora->alpha = alpha;
    lora->dropout = dropout;
    lora->targets = targets;
    lora->L = c->L;
    lora->pairs = xcalloc((size_t)c->L * LORA_NTARGETS, sizeof(LoraPair));
    size_t n = 0;
    for (int pass = 0; pass < 2; pass++) {  // pass 0 counts, pass 1 points
        size_t off = 0;
        for (int l = 0; l < c->L; l++) {
            for (int k = 0; k < LORA_NTARGETS; k++) {
                if (!(targets & (1u << k))) continue;
                LoraPair *p = &lora->pairs[l * LORA_NTARGETS + k];
                target_shape(c, k, &p->in, &p->out);
                if (pass == 1) {
                    p->A = lora->params + off;
                    p->dA = lora->grads + off;
                    p->B = lora->params + off + (size_t)R * p->in;
                    p->dB = lora->grads + off + (size_t)R * p->in;
                }
                off += (size_t)R * p->in + (size_t)p->out * R;
            }
        }
        if (pass == 0) {
            n = off;
            lora->params = xcalloc(n, sizeof(float));
            lora->grads = xcalloc(n, sizeof(float));
        }
    }
    lora->n_params = n;
    lora->base_model = xstrdup("");
}

void lora_init(Lora *lora, const Config *c, int R, float alpha, float dropout, unsigned targets, uint64_t seed) {
    lora_alloc(lora, c, R, alpha, dropout, targets);
    uint64_t state = seed;
    for (int i = 0; i < c->L * LORA_NTARGETS; i++) {
        LoraPair *p = &lora->pairs[i];
        if (!p->A) continue;
        float bound = 1.0f / sqrtf((float)p->in);  // kaiming_uniform_(a = sqrt(5)) on [R, in]
        for (size_t j = 0; j < (size_t)R * p->in; j++) p->A[j] = (2.0f * rng_uniform(&state) - 1.0f) * bound;
    }
}

void lora_free(Lora *lora) {
    free(lora->pairs);
    free(lora->params);
    free(lora->grads);
    free(lora->base_model);
    memset(lora, 0, sizeof *lora);
}

void lora_zero_grad(Lora *lora) { memset(lora->grads, 0, lora->n_params * sizeof(float)); }

// ---------------------------------------------------------------------------------------------
// Reading adapter_config.json.

// The target bit set of PEFT's target_modules: a list of module names (or name suffixes like
// "self_attn.q_proj"), or one string: "all-linear" or a regular expression, from which every
// target name that appears in it as a whole word is taken.
static int config_targets(unsigned *targets, const Json *tm, const char *path, Err *e) {
    *targets = 0;
    if (tm && tm->type == JSON_STRING) {
        if (strcmp(tm->str, "all-linear") == 0) {
            *targets = (1u << LORA_NTARGETS) - 1;
            return 0;
        }
        for (int k = 0; k < LORA_NTARGETS; k++) {
            size_t n = strlen(lora_target_names[k]);
            for (const char *p = strstr(tm->str, lora_target_names[k]); p; p = strstr(p + 1, lora_target_names[k])) {
                int before = p == tm->str || !(p[-1] == '_' || (p[-1] >= 'a' && p[-1] <= 'z'));
                int after = !(p[n] == '_' || (p[n] >= 'a' && p[n] <= 'z'));
                if (before && after) *targets |= 1u << k;
            }
        }
        if (!*targets) return err_set(e, "%s: target_modules '%s' names none of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj", path, tm->str);
        return 0;
    }
    if (!tm || tm->type != JSON_ARRAY || tm->len == 0)
        return err_set(e, "%s: target_modules must be a non-empty list of module names or a string", path);
    for (size_t i = 0; i < tm->len; i++) {
        const Json *s = &tm->items[i];
        if (s->type != JSON_STRING) return err_set(e, "%s: target_modules[%zu] is not a string", path, i);
        const char *dot = strrchr(s->str, '.');
        const char *leaf = dot ? dot + 1 : s->str;
        int k = target_index(leaf, strlen(leaf));
        if (k < 0) return err_set(e, "%s: target module '%s' is not a projection of a Qwen2 layer (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)", path, s->str);
        *targets |= 1u << k;
    }
    return 0;
}

static int is_empty_or_null(const Json *j) {
    return !j || j->type == JSON_NULL || ((j->type == JSON_OBJECT || j->type == JSON_ARRAY) && j->len == 0);
}

static int is_true(const Json *j) { return j && j->type == JSON_BOOL && j->boolean; }

// PEFT features this adapter must not use.
static int check_plain_lora(const Json *cfg, const char *path, Err *e) {
    const Json *pt = json_get(cfg, "peft_type"), *bias = json_get(cfg, "bias");
    if (pt && (pt->type != JSON_STRING || strcmp(pt->str, "LORA") != 0))
        return err_set(e, "%s: peft_type is not \"LORA\"", path);
    if (bias && !(bias->type == JSON_STRING && strcmp(bias->str, "none") == 0))
        return err_set(e, "%s: bias must be \"none\" (LoRA biases are not supported)", path);
    const char *flags[] = {"use_dora", "use_rslora", "fan_in_fan_out"};
    for (int i = 0; i < 3; i++)
        if (is_true(json_get(cfg, flags[i]))) return err_set(e, "%s: %s is not supported", path, flags[i]);
    const char *empties[] = {"rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save", "layer_replication"};
    for (int i = 0; i < 5; i++)
        if (!is_empty_or_null(json_get(cfg, empties[i]))) return err_set(e, "%s: %s is not supported", path, empties[i]);
    return 0;
}

typedef struct {
    int R;
    float alpha, dropout;
    unsigned targets;
    char *base_model;
} LoraConfig;

static int read_config(LoraConfig *lc, const char *dir, Err *e) {
    char path[1100];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    size_t len;
    char *text = read_file(path, &len, e);
    if (!text) return -1;
    Json cfg;
    Err je;
    int rc = json_parse(&cfg, text, len, &je);
    free(text);
    if (rc != 0) return err_set(e, "%s: %s", path, je.msg);
    rc = -1;
    const Json *r = json_get(&cfg, "r"), *alpha = json_get(&cfg, "lora_alpha"), *drop = json_get(&cfg, "lora_dropout");
    const Json *base = json_get(&cfg, "base_model_name_or_path");
    if (cfg.type != JSON_OBJECT) err_set(e, "%s: not a JSON object", path);
    else if (!r || r->type != JSON_NUMBER || r->number != floor(r->number) || r->number < 1 || r->number > LORA_MAX_R)
        err_set(e, "%s: r must be an integer in [1, %d]", path, LORA_MAX_R);
    else if (alpha && (alpha->type != JSON_NUMBER || !(alpha->number > 0) || alpha->number > 1e6))
        err_set(e, "%s: lora_alpha must be a positive number", path);
    else if (drop && drop->type != JSON_NULL && (drop->type != JSON_NUMBER || !(drop->number >= 0 && drop->number < 1)))
        err_set(e, "%s: lora_dropout must be a number in [0, 1)", path);
    else if (check_plain_lora(&cfg, path, e) == 0 && config_targets(&lc->targets, json_get(&cfg, "target_modules"), path, e) == 0) {
        lc->R = (int)r->number;
        lc->alpha = alpha ? (float)alpha->number : 8.0f;  // PEFT's default
        lc->dropout = drop && drop->type == JSON_NUMBER ? (float)drop->number : 0.0f;
        lc->base_model = xstrdup(base && base->type == JSON_STRING ? base->str : "");
        rc = 0;
    }
    json_free(&cfg);
    return rc;
}

// ---------------------------------------------------------------------------------------------
// Reading adapter_model.safetensors.

// Copies tensor t (F32, F16 or BF16) into dst[n], checking every value is finite.
static int copy_values(float *dst, const StTensor *t, size_t n, const char *path, Err *e) {
    const unsigned char *src = t->data;
    for (size_t i = 0; i < n; i++) {
        float v;
        if (t->type == TYPE_F32) {
            memcpy(&v, src + 4 * i, 4);
        } else {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            v = t->type == TYPE_F16 ? fp16_to_fp32(h) : bf16_to_fp32(h);
        }
        if (!isfinite(v)) return err_set(e, "%s: tensor '%s': element %zu is %s", path, t->name, i, isnan(v) ? "NaN" : "infinite");
        dst[i] = v;
    }
    return 0;
}

// Finds the (layer, target, A or B) that a tensor name denotes; -1 when it matches none.
static int match_tensor(const Lora *lora, const char *name, int *l, int *k, int *is_B) {
    char buf[160];
    for (*l = 0; *l < lora->L; (*l)++)
        for (*k = 0; *k < LORA_NTARGETS; (*k)++)
            for (*is_B = 0; *is_B < 2; (*is_B)++) {
                tensor_name(buf, sizeof buf, *l, *k, *is_B);
                if (strcmp(buf, name) == 0) return 0;
            }
    return -1;
}

static int read_tensors(Lora *lora, const StFile *f, const char *path, Err *e) {
    size_t n_pairs = (size_t)lora->L * LORA_NTARGETS;
    unsigned char *seen = xcalloc(2 * n_pairs, 1);
    int rc = 0;
    for (int i = 0; i < f->n && rc == 0; i++) {
        const StTensor *t = &f->tensors[i];
        int l, k, is_B;
        if (match_tensor(lora, t->name, &l, &k, &is_B) != 0) {
            rc = err_set(e, "%s: tensor '%s' matches no LoRA layer of the model (%d layers)", path, t->name, lora->L);
            break;
        }
        LoraPair *p = &lora->pairs[l * LORA_NTARGETS + k];
        int64_t rows = is_B ? p->out : lora->R, cols = is_B ? lora->R : p->in;
        if (!p->A) rc = err_set(e, "%s: tensor '%s': %s is not in target_modules of adapter_config.json", path, t->name, lora_target_names[k]);
        else if (t->n_dims != 2 || t->shape[0] != rows || t->shape[1] != cols)
            rc = err_set(e, "%s: tensor '%s' has shape [%lld, %lld], the model needs [%lld, %lld] (rank %d)", path, t->name,
                         (long long)(t->n_dims > 0 ? t->shape[0] : 0), (long long)(t->n_dims > 1 ? t->shape[1] : 0),
                         (long long)rows, (long long)cols, lora->R);
        else rc = copy_values(is_B ? p->B : p->A, t, (size_t)rows * cols, path, e);
        seen[2 * (l * LORA_NTARGETS + k) + is_B] = 1;
    }
    for (size_t i = 0; i < 2 * n_pairs && rc == 0; i++) {
        if (lora->pairs[i / 2].A && !seen[i]) {
            char name[160];
            tensor_name(name, sizeof name, (int)(i / 2 / LORA_NTARGETS), (int)(i / 2 % LORA_NTARGETS), (int)(i % 2));
            rc = err_set(e, "%s: tensor '%s' is missing", path, name);
        }
    }
    free(seen);
    return rc;
}

int lora_load(Lora *lora, const char *dir, const Config *c, Err *e) {
    LoraConfig lc = {0};
    memset(lora, 0, sizeof *lora);
    if (read_config(&lc, dir, e) != 0) return -1;
    lora_alloc(lora, c, lc.R, lc.alpha, lc.dropout, lc.targets);
    free(lora->base_model);
    lora->base_model = lc.base_model;
    char path[1100];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    StFile f;
    int rc = safetensors_open(&f, path, e);
    if (rc == 0) {
        rc = read_tensors(lora, &f, path, e);
        safetensors_close(&f);
    }
    if (rc != 0) lora_free(lora);
    return rc;
}

// ---------------------------------------------------------------------------------------------
// Writing.

// The shortest decimal that reads back as the same float (0.05 rather than 0.0500000007).
static void write_float(FILE *f, float v) {
    char buf[32];
    for (int p = 1; p <= 9; p++) {
        snprintf(buf, sizeof buf, "%.*g", p, (double)v);
        if (strtof(buf, NULL) == v) break;
    }
    fputs(buf, f);
}

static int write_config(const Lora *lora, const char *dir, Err *e) {
    char path[1100];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    AtomicFile af;
    if (atomic_open(&af, path, e) != 0) return -1;
    FILE *f = af.f;
    fprintf(f, "{\n  \"alpha_pattern\": {},\n  \"auto_mapping\": null,\n  \"base_model_name_or_path\": ");
    json_write_string(f, lora->base_model, strlen(lora->base_model));
    fprintf(f, ",\n  \"bias\": \"none\",\n  \"fan_in_fan_out\": false,\n  \"inference_mode\": true,\n"
               "  \"init_lora_weights\": true,\n  \"layers_pattern\": null,\n  \"layers_to_transform\": null,\n"
               "  \"lora_alpha\": ");
    write_float(f, lora->alpha);
    fprintf(f, ",\n  \"lora_dropout\": ");
    write_float(f, lora->dropout);
    fprintf(f, ",\n  \"modules_to_save\": null,\n  \"peft_type\": \"LORA\",\n  \"r\": %d,\n  \"rank_pattern\": {},\n"
               "  \"revision\": null,\n  \"target_modules\": [", lora->R);
    const char *sep = "";
    for (int k = 0; k < LORA_NTARGETS; k++)
        if (lora->targets & (1u << k)) fprintf(f, "%s\"%s\"", sep, lora_target_names[k]), sep = ", ";
    fprintf(f, "],\n  \"task_type\": \"CAUSAL_LM\",\n  \"use_dora\": false,\n  \"use_rslora\": false\n}\n");
    return atomic_close(&af, e);
}

// Writes A and B (grads = 0) or dA and dB (grads = 1) of every pair into path.
static int write_tensors(const Lora *lora, const char *path, int grads, Err *e) {
    int n = 0;
    StTensor *t = xcalloc((size_t)lora->L * LORA_NTARGETS * 2, sizeof *t);
    char *names = xmalloc((size_t)lora->L * LORA_NTARGETS * 2 * 160);
    for (int i = 0; i < lora->L * LORA_NTARGETS; i++) {
        const LoraPair *p = &lora->pairs[i];
        if (!p->A) continue;
        for (int is_B = 0; is_B < 2; is_B++) {
            char *name = names + (size_t)n * 160;
            tensor_name(name, 160, i / LORA_NTARGETS, i % LORA_NTARGETS, is_B);
            t[n] = (StTensor){.name = name, .type = TYPE_F32, .n_dims = 2,
                              .shape = {is_B ? p->out : lora->R, is_B ? lora->R : p->in},
                              .data = is_B ? (grads ? p->dB : p->B) : (grads ? p->dA : p->A)};
            n++;
        }
    }
    int rc = safetensors_write(path, t, n, "{\"format\":\"pt\"}", e);
    free(t);
    free(names);
    return rc;
}

int lora_save(const Lora *lora, const char *dir, Err *e) {
    if (make_dirs(dir, e) != 0 || write_config(lora, dir, e) != 0) return -1;
    char path[1100];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    return write_tensors(lora, path, 0, e);
}

int lora_save_grads(const Lora *lora, const char *path, Err *e) { return write_tensors(lora, path, 1, e); }
