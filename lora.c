// lora.c: low-rank adapters: their arithmetic (lora_forward, lora_backward, at the end of the
// file), their storage (one array of parameters, one of gradients), PEFT's initialization, and
// their files in Hugging Face PEFT's format (adapter_config.json + adapter_model.safetensors),
// read strictly and written atomically.
//
// PEFT's variants are read exactly as PEFT applies them (any subset of the seven projections in
// any layers, per-module ranks and alphas, rsLoRA), and written back so that PEFT reads the same.
// Left out: where the adapters sit in the model (model.c: linear_forward, lora_site), the optimizer
// (optim.c) and llama.cpp's GGUF adapters (lora_gguf.c). What PEFT can do that plain LoRA cannot
// express (DoRA, LoRA biases, modules_to_save, ...) is refused with a clear error. Read lora.h first.
#include "lora.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "quant.h"
#include "regex.h"
#include "safetensors.h"
#include "threads.h"
#include "vec.h"

// Products are rounded as written (no fused multiply-add), as in quant.c.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

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

static void shape_alloc(LoraShape *s, int L) {
    memset(s, 0, sizeof *s);
    s->L = L;
    s->rank = xcalloc((size_t)L * LORA_NTARGETS, sizeof(int));
    s->alpha = xcalloc((size_t)L * LORA_NTARGETS, sizeof(float));
}

void lora_shape_free(LoraShape *s) {
    free(s->rank);
    free(s->alpha);
    memset(s, 0, sizeof *s);
}

// Allocates params and grads (zeroed) and points every adapted pair into them.
void lora_alloc(Lora *lora, const Config *c, const LoraShape *s) {
    memset(lora, 0, sizeof *lora);
    lora->alpha = s->lora_alpha;
    lora->dropout = s->dropout;
    lora->rslora = s->rslora;
    lora->L = c->L;
    lora->pairs = xcalloc((size_t)c->L * LORA_NTARGETS, sizeof(LoraPair));
    size_t n = 0;
    for (int i = 0; i < c->L * LORA_NTARGETS; i++) {
        LoraPair *p = &lora->pairs[i];
        target_shape(c, i % LORA_NTARGETS, &p->in, &p->out);
        p->r = s->rank[i];
        p->alpha = s->alpha[i];
        if (p->r > lora->R) lora->R = p->r;
        if (p->r) lora->targets |= 1u << (i % LORA_NTARGETS);
        n += (size_t)p->r * (size_t)(p->in + p->out);
    }
    lora->params = xcalloc(n ? n : 1, sizeof(float));
    lora->grads = xcalloc(n ? n : 1, sizeof(float));
    lora->n_params = n;
    size_t off = 0;
    for (int i = 0; i < c->L * LORA_NTARGETS; i++) {
        LoraPair *p = &lora->pairs[i];
        if (!p->r) continue;
        p->A = lora->params + off, p->dA = lora->grads + off;
        off += (size_t)p->r * p->in;
        p->B = lora->params + off, p->dB = lora->grads + off;
        off += (size_t)p->out * p->r;
    }
    lora->base_model = xstrdup("");
}

void lora_init(Lora *lora, const Config *c, int R, float alpha, float dropout, unsigned targets, uint64_t seed) {
    LoraShape s;
    shape_alloc(&s, c->L);
    s.lora_alpha = alpha, s.dropout = dropout;
    for (int i = 0; i < c->L * LORA_NTARGETS; i++) {
        s.rank[i] = targets & (1u << (i % LORA_NTARGETS)) ? R : 0;
        s.alpha[i] = alpha;
    }
    lora_alloc(lora, c, &s);
    lora_shape_free(&s);
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

float lora_scale(const Lora *lora, const LoraPair *p) {
    if (lora->rslora) return (float)((double)p->alpha / sqrt((double)p->r));
    return p->alpha / (float)p->r;
}

int lora_same_shape(const Lora *a, const Lora *b) {
    if (a->L != b->L || a->R != b->R || a->rslora != b->rslora || a->alpha != b->alpha || a->n_params != b->n_params)
        return 0;
    for (int i = 0; i < a->L * LORA_NTARGETS; i++)
        if (a->pairs[i].r != b->pairs[i].r || (a->pairs[i].r && a->pairs[i].alpha != b->pairs[i].alpha)) return 0;
    return 1;
}

// ---------------------------------------------------------------------------------------------
// Reading adapter_config.json: PEFT's rules (peft/tuners/tuners_utils.py check_target_module_exists,
// peft/utils/other.py get_pattern_key) applied to every module name of a Qwen2ForCausalLM.

// Module i of a model with L layers, as named_modules() names it: i < 7 L are the projections
// (layer i / 7, target i % 7; *layer set), then 6 per layer and 6 global modules that an adapter
// must not target (*layer = -1 for those without ".{index}." in the name). -1 past the last.
static int module_name(char *buf, size_t cap, int i, int L, int *layer) {
    static const char *const per_layer[6] = {"", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm", ".post_attention_layernorm"};
    static const char *const global[6] = {"model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"};
    *layer = -1;
    if (i < L * LORA_NTARGETS) {
        int k = i % LORA_NTARGETS;
        *layer = i / LORA_NTARGETS;
        snprintf(buf, cap, "model.layers.%d.%s.%s", *layer, k <= LORA_O ? "self_attn" : "mlp", lora_target_names[k]);
    } else if ((i -= L * LORA_NTARGETS) < 6 * L) {
        snprintf(buf, cap, "model.layers.%d%s", i / 6, per_layer[i % 6]);
        if (i % 6) *layer = i / 6;
    } else if ((i -= 6 * L) < 6) {
        snprintf(buf, cap, "%s", global[i]);
    } else {
        return -1;
    }
    return 0;
}

static int ends_with_module(const char *key, const char *name) {
    size_t n = strlen(key), m = strlen(name);
    return strcmp(key, name) == 0 || (n > m && key[n - m - 1] == '.' && strcmp(key + n - m, name) == 0);
}

// PEFT's list rule: key equals an entry or ends with "." + entry. -1 for a non-string entry.
static int in_name_list(const Json *list, const char *key, const char *what, const char *path, Err *e) {
    for (size_t i = 0; i < list->len; i++) {
        if (list->items[i].type != JSON_STRING) return err_set(e, "%s: %s[%zu] is not a string", path, what, i);
        if (ends_with_module(key, list->items[i].str)) return 1;
    }
    return 0;
}

// A regex of the config against key; errors name the file and the field.
static int config_regex(const char *pattern, const char *key, const char *what, const char *path, Err *e) {
    Err re;
    int m = regex_fullmatch(pattern, key, &re);
    if (m < 0) return err_set(e, "%s: %s: %s; sft cannot apply it exactly", path, what, re.msg);
    return m;
}

typedef struct {
    const Json *target_modules, *exclude_modules, *layers, *layers_pattern;
    const char *path;
} PeftRules;

// Whether layers_to_transform lets layer l through: PEFT finds the layer index after
// layers_pattern (any pattern when it is empty); in Qwen2's names the only index follows
// "model.layers", so a pattern finds it when it matches "layers" or "model.layers" whole.
static int layer_allowed(const PeftRules *r, int l, Err *e) {
    const Json *lp = r->layers_pattern, *lt = r->layers;
    if (l < 0) return 0;
    if (lp && lp->type != JSON_NULL && !(lp->type == JSON_STRING && lp->str[0] == 0) && !(lp->type == JSON_ARRAY && lp->len == 0)) {
        int found = 0;
        size_t n = lp->type == JSON_ARRAY ? lp->len : 1;
        for (size_t i = 0; i < n && !found; i++) {
            const Json *p = lp->type == JSON_ARRAY ? &lp->items[i] : lp;
            if (p->type != JSON_STRING) return err_set(e, "%s: layers_pattern must be a string or a list of strings", r->path);
            int a = config_regex(p->str, "layers", "layers_pattern", r->path, e), b = a < 0 ? a : config_regex(p->str, "model.layers", "layers_pattern", r->path, e);
            if (a < 0 || b < 0) return -1;
            found = a || b;
        }
        if (!found) return 0;
    }
    if (lt->type == JSON_NUMBER) return lt->number == l;
    for (size_t i = 0; i < lt->len; i++)
        if (lt->items[i].type != JSON_NUMBER) return err_set(e, "%s: layers_to_transform[%zu] is not a number", r->path, i);
        else if (lt->items[i].number == l) return 1;
    return 0;
}

// 1 when PEFT would put a LoRA layer on module `key` (of layer index `layer`, -1 if none).
static int peft_targets(const PeftRules *r, const char *key, int is_proj, int layer, Err *e) {
    const Json *ex = r->exclude_modules, *tm = r->target_modules;
    int m = 0;
    if (ex && ex->type == JSON_STRING) m = config_regex(ex->str, key, "exclude_modules", r->path, e);
    else if (ex && ex->type == JSON_ARRAY) m = in_name_list(ex, key, "exclude_modules", r->path, e);
    if (m != 0) return m < 0 ? -1 : 0;
    if (tm->type == JSON_STRING && strcmp(tm->str, "all-linear") == 0) return is_proj;  // every Linear but lm_head
    if (tm->type == JSON_STRING) return config_regex(tm->str, key, "target_modules", r->path, e);
    m = in_name_list(tm, key, "target_modules", r->path, e);
    if (m <= 0 || !r->layers || r->layers->type == JSON_NULL || (r->layers->type == JSON_ARRAY && r->layers->len == 0)) return m;
    return layer_allowed(r, layer, e);
}

// rank_pattern / alpha_pattern: the value of the first key k with (.*\.)?(k) matching the whole
// module name, as a number in [lo, hi]; 0 (nothing set) when none matches.
static int pattern_value(double *out, const Json *pat, const char *key, const char *what, double lo, double hi,
                         const char *path, Err *e) {
    for (size_t i = 0; pat && pat->type == JSON_OBJECT && i < pat->len; i++) {
        size_t n = strlen(pat->keys[i]) + 16;
        char *re = xmalloc(n);
        snprintf(re, n, "(.*\\.)?(%s)", pat->keys[i]);
        int m = config_regex(re, key, what, path, e);
        free(re);
        if (m < 0) return -1;
        if (!m) continue;
        const Json *v = &pat->items[i];
        if (v->type != JSON_NUMBER || !(v->number >= lo && v->number <= hi))
            return err_set(e, "%s: %s['%s'] must be a number in [%g, %g]", path, what, pat->keys[i], lo, hi);
        *out = v->number;
        return 1;
    }
    return 0;
}

static int is_empty_or_null(const Json *j) {
    return !j || j->type == JSON_NULL || ((j->type == JSON_OBJECT || j->type == JSON_ARRAY || j->type == JSON_STRING) && j->len == 0);
}

static int is_true(const Json *j) { return j && j->type == JSON_BOOL && j->boolean; }

// PEFT features that plain LoRA cannot express: refused, never ignored.
static int check_plain_lora(const Json *cfg, const char *path, Err *e) {
    const Json *pt = json_get(cfg, "peft_type"), *bias = json_get(cfg, "bias"), *tm = json_get(cfg, "target_modules");
    if (pt && (pt->type != JSON_STRING || strcmp(pt->str, "LORA") != 0))
        return err_set(e, "%s: peft_type is not \"LORA\"", path);
    if (bias && !(bias->type == JSON_STRING && strcmp(bias->str, "none") == 0))
        return err_set(e, "%s: bias must be \"none\" (LoRA biases are not supported)", path);
    const char *flags[][2] = {{"use_dora", "DoRA"}, {"lora_bias", "LoRA biases"}, {"fan_in_fan_out", "fan_in_fan_out (Conv1D layers)"},
                              {"use_qalora", "QA-LoRA"}};
    for (int i = 0; i < 4; i++)
        if (is_true(json_get(cfg, flags[i][0]))) return err_set(e, "%s: %s: %s is not supported", path, flags[i][0], flags[i][1]);
    const char *empties[] = {"modules_to_save", "layer_replication", "trainable_token_indices", "target_parameters",
                             "alora_invocation_tokens", "arrow_config"};
    for (int i = 0; i < 6; i++)
        if (!is_empty_or_null(json_get(cfg, empties[i])))
            return err_set(e, "%s: %s is not supported (sft adapts only the seven projections with plain LoRA)", path, empties[i]);
    if (!tm || !((tm->type == JSON_ARRAY && tm->len > 0) || tm->type == JSON_STRING))
        return err_set(e, "%s: target_modules must be a non-empty list of module names or a string", path);
    const Json *lt = json_get(cfg, "layers_to_transform");
    if (!is_empty_or_null(lt) && tm->type == JSON_STRING)
        return err_set(e, "%s: layers_to_transform cannot be used with a string target_modules (PEFT refuses it too)", path);
    if (!is_empty_or_null(lt) && lt->type != JSON_NUMBER && lt->type != JSON_ARRAY)
        return err_set(e, "%s: layers_to_transform must be an integer or a list of integers", path);
    const Json *rp = json_get(cfg, "rank_pattern"), *ap = json_get(cfg, "alpha_pattern");
    if ((rp && rp->type != JSON_OBJECT && rp->type != JSON_NULL) || (ap && ap->type != JSON_OBJECT && ap->type != JSON_NULL))
        return err_set(e, "%s: rank_pattern and alpha_pattern must be objects", path);
    return 0;
}

// Fills s->rank and s->alpha of every projection PEFT would adapt; refuses any other module.
static int select_modules(LoraShape *s, const Json *cfg, int r, const char *path, Err *e) {
    PeftRules rules = {json_get(cfg, "target_modules"), json_get(cfg, "exclude_modules"), json_get(cfg, "layers_to_transform"),
                       json_get(cfg, "layers_pattern"), path};
    char key[96];
    int layer, n = 0;
    for (int i = 0; module_name(key, sizeof key, i, s->L, &layer) == 0; i++) {
        int is_proj = i < s->L * LORA_NTARGETS;
        int m = peft_targets(&rules, key, is_proj, layer, e);
        if (m < 0) return -1;
        if (!m) continue;
        if (!is_proj)
            return err_set(e, "%s: target_modules selects '%s', which is not one of the seven projections (q_proj, k_proj, "
                           "v_proj, o_proj, gate_proj, up_proj, down_proj); sft adapts only those", path, key);
        double rk = r, ak = s->lora_alpha;
        if (pattern_value(&rk, json_get(cfg, "rank_pattern"), key, "rank_pattern", 1, LORA_MAX_R, path, e) < 0 ||
            pattern_value(&ak, json_get(cfg, "alpha_pattern"), key, "alpha_pattern", 1e-30, 1e6, path, e) < 0)
            return -1;
        if (rk != floor(rk)) return err_set(e, "%s: rank_pattern: the rank of '%s' is not an integer", path, key);
        s->rank[i] = (int)rk;
        s->alpha[i] = (float)ak;
        n++;
    }
    if (n == 0) return err_set(e, "%s: target_modules selects none of the model's projections", path);
    return 0;
}

// r, lora_alpha, lora_dropout, use_rslora into s.
static int config_numbers(LoraShape *s, const Json *cfg, int *r, const char *path, Err *e) {
    const Json *jr = json_get(cfg, "r"), *alpha = json_get(cfg, "lora_alpha"), *drop = json_get(cfg, "lora_dropout");
    const Json *rs = json_get(cfg, "use_rslora");
    if (cfg->type != JSON_OBJECT) return err_set(e, "%s: not a JSON object", path);
    if (!jr || jr->type != JSON_NUMBER || jr->number != floor(jr->number) || jr->number < 1 || jr->number > LORA_MAX_R)
        return err_set(e, "%s: r must be an integer in [1, %d]", path, LORA_MAX_R);
    if (alpha && (alpha->type != JSON_NUMBER || !(alpha->number > 0) || alpha->number > 1e6))
        return err_set(e, "%s: lora_alpha must be a positive number", path);
    if (drop && drop->type != JSON_NULL && (drop->type != JSON_NUMBER || !(drop->number >= 0 && drop->number < 1)))
        return err_set(e, "%s: lora_dropout must be a number in [0, 1)", path);
    if (rs && rs->type != JSON_BOOL && rs->type != JSON_NULL) return err_set(e, "%s: use_rslora must be true or false", path);
    *r = (int)jr->number;
    s->lora_alpha = alpha ? (float)alpha->number : 8.0f;  // PEFT's default
    s->dropout = drop && drop->type == JSON_NUMBER ? (float)drop->number : 0.0f;
    s->rslora = is_true(rs);
    return 0;
}

int lora_read_peft_config(LoraShape *s, char **base_model, const char *path, const Config *c, Err *e) {
    size_t len;
    char *text = read_file(path, &len, e);
    shape_alloc(s, c->L);
    *base_model = NULL;
    if (!text) return lora_shape_free(s), -1;
    Json cfg;
    Err je;
    int rc = json_parse(&cfg, text, len, &je);
    free(text);
    if (rc != 0) return lora_shape_free(s), err_set(e, "%s: %s", path, je.msg);
    int r = 0;
    rc = config_numbers(s, &cfg, &r, path, e);
    if (rc == 0) rc = check_plain_lora(&cfg, path, e);
    if (rc == 0) rc = select_modules(s, &cfg, r, path, e);
    const Json *base = json_get(&cfg, "base_model_name_or_path");
    if (rc == 0) *base_model = xstrdup(base && base->type == JSON_STRING ? base->str : "");
    else lora_shape_free(s);
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
        int64_t rows = is_B ? p->out : p->r, cols = is_B ? p->r : p->in;
        if (!p->A) rc = err_set(e, "%s: tensor '%s': %s is not in target_modules of adapter_config.json", path, t->name, lora_target_names[k]);
        else if (t->n_dims != 2 || t->shape[0] != rows || t->shape[1] != cols)
            rc = err_set(e, "%s: tensor '%s' has shape [%lld, %lld], the model needs [%lld, %lld] (rank %d)", path, t->name,
                         (long long)(t->n_dims > 0 ? t->shape[0] : 0), (long long)(t->n_dims > 1 ? t->shape[1] : 0),
                         (long long)rows, (long long)cols, p->r);
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

// A PEFT directory: the config decides the pairs, the tensors must be exactly those.
static int load_peft(Lora *lora, const char *dir, const Config *c, Err *e) {
    char path[1100];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    LoraShape s;
    char *base;
    if (lora_read_peft_config(&s, &base, path, c, e) != 0) return -1;
    lora_alloc(lora, c, &s);
    lora_shape_free(&s);
    free(lora->base_model);
    lora->base_model = base;
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

int lora_load(Lora *lora, const char *path, const Config *c, Err *e) {
    memset(lora, 0, sizeof *lora);
    return lora_is_gguf(path) ? lora_load_gguf(lora, path, c, e) : load_peft(lora, path, c, e);
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

// The targets adapted in layer l.
static unsigned layer_targets(const Lora *lora, int l) {
    unsigned t = 0;
    for (int k = 0; k < LORA_NTARGETS; k++)
        if (lora->pairs[l * LORA_NTARGETS + k].r) t |= 1u << k;
    return t;
}

// 1 when the pairs are one set of targets in each of a set of layers (*n_layers of them).
static int is_product(const Lora *lora, unsigned *targets, int *n_layers) {
    *targets = 0, *n_layers = 0;
    for (int l = 0; l < lora->L; l++) {
        unsigned t = layer_targets(lora, l);
        if (!t) continue;
        if (*targets && t != *targets) return 0;
        *targets = t, (*n_layers)++;
    }
    return 1;
}

// The most common rank of the adapted pairs (the first one seen on a tie).
static int common_rank(const Lora *lora) {
    int best = lora->R, best_n = 0;
    for (int i = 0; i < lora->L * LORA_NTARGETS; i++) {
        int r = lora->pairs[i].r, n = 0;
        for (int j = 0; j < lora->L * LORA_NTARGETS && r; j++) n += lora->pairs[j].r == r;
        if (n > best_n) best = r, best_n = n;
    }
    return best;
}

// {"model.layers.1.mlp.down_proj": 2, ...}: the pairs whose rank (alpha = 0) or alpha (alpha = 1)
// is not the config's r / lora_alpha. PEFT matches these keys as (.*\.)?(key): only that module.
static void write_pattern(FILE *f, const Lora *lora, int alpha, int r0) {
    const char *sep = "";
    char key[96];
    int layer;
    fputc('{', f);
    for (int i = 0; i < lora->L * LORA_NTARGETS; i++) {
        const LoraPair *p = &lora->pairs[i];
        if (!p->r || (alpha ? p->alpha == lora->alpha : p->r == r0)) continue;
        module_name(key, sizeof key, i, lora->L, &layer);
        fprintf(f, "%s\"%s\": ", sep, key);
        if (alpha) write_float(f, p->alpha);
        else fprintf(f, "%d", p->r);
        sep = ", ";
    }
    fputc('}', f);
}

// target_modules naming exactly the adapted pairs: the target names (with layers_to_transform,
// written by write_layers, when not every layer has them), or else every module's full name.
static void write_targets(FILE *f, const Lora *lora) {
    unsigned t;
    int n_layers, layer;
    const char *sep = "";
    char key[96];
    int product = is_product(lora, &t, &n_layers);
    fputc('[', f);
    for (int i = 0; i < (product ? LORA_NTARGETS : lora->L * LORA_NTARGETS); i++) {
        if (product ? !(t & (1u << i)) : !lora->pairs[i].r) continue;
        if (!product) module_name(key, sizeof key, i, lora->L, &layer);
        fprintf(f, "%s\"%s\"", sep, product ? lora_target_names[i] : key), sep = ", ";
    }
    fputc(']', f);
}

static void write_layers(FILE *f, const Lora *lora) {
    unsigned t;
    int n_layers;
    if (!is_product(lora, &t, &n_layers) || n_layers == lora->L) {
        fputs("null", f);
        return;
    }
    const char *sep = "";
    fputc('[', f);
    for (int l = 0; l < lora->L; l++)
        if (layer_targets(lora, l)) fprintf(f, "%s%d", sep, l), sep = ", ";
    fputc(']', f);
}

static int write_config(const Lora *lora, const char *path, Err *e) {
    AtomicFile af;
    if (atomic_open(&af, path, e) != 0) return -1;
    FILE *f = af.f;
    int r0 = common_rank(lora);
    fprintf(f, "{\n  \"alpha_pattern\": ");
    write_pattern(f, lora, 1, r0);
    fprintf(f, ",\n  \"auto_mapping\": null,\n  \"base_model_name_or_path\": ");
    json_write_string(f, lora->base_model, strlen(lora->base_model));
    fprintf(f, ",\n  \"bias\": \"none\",\n  \"fan_in_fan_out\": false,\n  \"inference_mode\": true,\n"
               "  \"init_lora_weights\": true,\n  \"layers_pattern\": null,\n  \"layers_to_transform\": ");
    write_layers(f, lora);
    fprintf(f, ",\n  \"lora_alpha\": ");
    write_float(f, lora->alpha);
    fprintf(f, ",\n  \"lora_dropout\": ");
    write_float(f, lora->dropout);
    fprintf(f, ",\n  \"modules_to_save\": null,\n  \"peft_type\": \"LORA\",\n  \"r\": %d,\n  \"rank_pattern\": ", r0);
    write_pattern(f, lora, 0, r0);
    fprintf(f, ",\n  \"revision\": null,\n  \"target_modules\": ");
    write_targets(f, lora);
    fprintf(f, ",\n  \"task_type\": \"CAUSAL_LM\",\n  \"use_dora\": false,\n  \"use_rslora\": %s\n}\n", lora->rslora ? "true" : "false");
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
                              .shape = {is_B ? p->out : p->r, is_B ? p->r : p->in},
                              .data = is_B ? (grads ? p->dB : p->B) : (grads ? p->dA : p->A)};
            n++;
        }
    }
    int rc = safetensors_write(path, t, n, "{\"format\":\"pt\"}", e);
    free(t);
    free(names);
    return rc;
}

// Both files are written under temporary names first; then the old adapter_model.safetensors
// goes, and the new files take their names, config first. A crash at any point leaves the old
// pair, one file alone (not an adapter: lora_load refuses it), or the new pair: never one file
// of each. The fault points stand for such crashes in the tests.
int lora_save(const Lora *lora, const char *dir, Err *e) {
    char cfg[1100], cfg_new[1120], st[1100], st_new[1120];
    snprintf(cfg, sizeof cfg, "%s/adapter_config.json", dir);
    snprintf(st, sizeof st, "%s/adapter_model.safetensors", dir);
    snprintf(cfg_new, sizeof cfg_new, "%s.new", cfg);
    snprintf(st_new, sizeof st_new, "%s.new", st);
    if (make_dirs(dir, e) != 0 || write_config(lora, cfg_new, e) != 0) return -1;
    if (write_tensors(lora, st_new, 0, e) != 0) return remove(cfg_new), -1;
    fault_point("lora-save-written");
    int r = 0;
    if (remove(st) != 0 && errno != ENOENT) r = err_set(e, "%s: cannot replace it: %s", st, strerror(errno));
    if (r == 0) fault_point("lora-save-removed");
    if (r == 0 && rename(cfg_new, cfg) != 0) r = err_set(e, "%s: cannot rename to %s: %s", cfg_new, cfg, strerror(errno));
    if (r == 0) fault_point("lora-save-config");
    if (r == 0 && rename(st_new, st) != 0) r = err_set(e, "%s: cannot rename to %s: %s", st_new, st, strerror(errno));
    if (r != 0) remove(cfg_new), remove(st_new);
    return r;
}

int lora_save_grads(const Lora *lora, const char *path, Err *e) { return write_tensors(lora, path, 1, e); }
// ---------------------------------------------------------------------------------------------
// LoRA: y = W x + b + s B (A dropout(x)), s = alpha / R. The kernels split work by output
// element and keep every sum in a fixed order; B is used transposed (s->bt = B^T [R, out]) so that
// the loops over the long `out` dimension run over contiguous memory.
//
// The three products below carry them. R is small (8), the other dimension long (C, FF): sums run
// in LANES lanes (blocks of 16 consecutive elements, which compilers keep in vector registers),
// over 4 rows of the short dimension at a time, so that each long vector is read once per 4 rows.
// Each output's order of summation depends on the sizes alone, not on how threads split the work.

// out[R] = M[R, n] x[n]: the rows of M (row stride ld) against one vector, 4 rows at a time
// (a missing fourth row repeats the first: computed, not stored).
static void rows_dot(float *out, const float *M, size_t ld, const float *x, int R, int n) {
    for (int r = 0; r < R; r += 4) {
        const float *m0 = M + (size_t)r * ld, *m1 = r + 1 < R ? m0 + ld : m0;
        const float *m2 = r + 2 < R ? m0 + 2 * ld : m0, *m3 = r + 3 < R ? m0 + 3 * ld : m0;
        float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
        int i = 0;
        for (; i + LANES <= n; i += LANES)
            for (int k = 0; k < LANES; k++) {
                float xk = x[i + k];
                a0[k] += m0[i + k] * xk, a1[k] += m1[i + k] * xk, a2[k] += m2[i + k] * xk, a3[k] += m3[i + k] * xk;
            }
        float s[4] = {lanes_sum(a0), lanes_sum(a1), lanes_sum(a2), lanes_sum(a3)};
        for (; i < n; i++)  // the last columns
            s[0] += m0[i] * x[i], s[1] += m1[i] * x[i], s[2] += m2[i] * x[i], s[3] += m3[i] * x[i];
        for (int k = 0; k < 4 && r + k < R; k++) out[r + k] = s[k];
    }
}

// y[i] += scale * sum_r c[r] M[r, i] for i < n (M's row stride ld), only where bit i of keep is
// set (keep NULL: everywhere). A block of LANES columns at a time, its rows added 4 at a time.
static void rows_combine(float *y, const float *c, const float *M, size_t ld, int R, int n, float scale,
                         const uint32_t *keep) {
    int i = 0;
    for (; i + LANES <= n; i += LANES) {
        float acc[LANES] = {0};
        int r = 0;
        for (; r + 4 <= R; r += 4) {
            const float *m = M + (size_t)r * ld + i;
            float c0 = c[r], c1 = c[r + 1], c2 = c[r + 2], c3 = c[r + 3];
            for (int k = 0; k < LANES; k++) acc[k] += (c0 * m[k] + c1 * m[ld + k]) + (c2 * m[2 * ld + k] + c3 * m[3 * ld + k]);
        }
        for (; r < R; r++)
            for (int k = 0; k < LANES; k++) acc[k] += c[r] * M[(size_t)r * ld + i + k];
        uint32_t bits = keep ? keep[i / 32] >> (i % 32) : 0xffff;  // i is a multiple of 16: this block's bits
        for (int k = 0; k < LANES; k++) y[i + k] += acc[k] * (scale * (float)(bits >> k & 1));  // no branch
    }
    for (; i < n; i++) {  // the last columns
        float acc = 0;
        for (int r = 0; r < R; r++) acc += c[r] * M[(size_t)r * ld + i];
        if (!keep || (keep[i / 32] >> (i % 32) & 1)) y[i] += scale * acc;
    }
}

// D[r, i] += scale * sum_t U[t, r] X[t, i] for r < R and the columns i in [i0, i1) (a multiple of
// LANES apart, but at the end of X's rows): D has row stride ldd, U is [T, R], X has row stride ldx.
// 4 rows of D at a time (a missing row repeats the first: computed, not stored), summed over
// every token in the lanes of a block of columns.
static void outer_cols(float *D, size_t ldd, const float *U, const float *X, size_t ldx, int T, int R, int i0, int i1,
                       float scale) {
    int i = i0;
    for (; i + LANES <= i1; i += LANES) {
        for (int r = 0; r < R; r += 4) {
            int r1 = r + 1 < R ? r + 1 : r, r2 = r + 2 < R ? r + 2 : r, r3 = r + 3 < R ? r + 3 : r;
            float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
            for (int t = 0; t < T; t++) {
                const float *x = X + (size_t)t * ldx + i, *u = U + (size_t)t * R;
                float u0 = u[r], u1 = u[r1], u2 = u[r2], u3 = u[r3];
                for (int k = 0; k < LANES; k++) a0[k] += u0 * x[k], a1[k] += u1 * x[k], a2[k] += u2 * x[k], a3[k] += u3 * x[k];
            }
            lanes_add(D + (size_t)r * ldd + i, a0, scale);
            if (r + 1 < R) lanes_add(D + (size_t)r1 * ldd + i, a1, scale);
            if (r + 2 < R) lanes_add(D + (size_t)r2 * ldd + i, a2, scale);
            if (r + 3 < R) lanes_add(D + (size_t)r3 * ldd + i, a3, scale);
        }
    }
    for (; i < i1; i++) {  // the last columns
        for (int r = 0; r < R; r++) {
            float acc = 0;
            for (int t = 0; t < T; t++) acc += U[(size_t)t * R + r] * X[(size_t)t * ldx + i];
            D[(size_t)r * ldd + i] += scale * acc;
        }
    }
}

typedef struct {
    const LoraSite *s;
    float *y;           // forward: y[T, out] +=
    float *dx;          // backward: dx[T, in] += (or NULL)
    const float *x;     // x[T, in]
    const float *dy;    // backward: dy[T, out]
    int T, in, out;
} LoraArgs;

// Inverted dropout: an input is kept with probability 1 - p (rng_hash_uniform(seed, site, t, i) >= p)
// and scaled by 1 / (1 - p). The forward pass draws the masks into s->keep, one bit per input;
// the backward pass reads them.
static int dropout_kept(const uint32_t *keep_row, int i) { return keep_row[i / 32] >> (i % 32) & 1; }

// xd[n] = x[n] * scale where the bit of keep[n / 32] is set, else 0
static void dropout_row(float *restrict xd, const float *restrict x, const uint32_t *keep, float scale, int n) {
    int i = 0;
    for (; i + 32 <= n; i += 32, x += 32, xd += 32) {  // a word of the mask at a time, without a branch
        uint32_t w = keep[i / 32];
        for (int j = 0; j < 32; j++) xd[j] = x[j] * (scale * (float)(int)(w >> j & 1));
    }
    for (int j = 0; i + j < n; j++) xd[j] = dropout_kept(keep, i + j) ? x[j] * scale : 0.0f;
}

// The input of A for token t: x[t] itself, or dropout(x[t]) written into its row of s->xdrop
// (draw = 1: the forward pass draws the masks first).
static const float *lora_input_row(const LoraArgs *a, int t, int draw) {
    const LoraSite *s = a->s;
    const float *x = a->x + (size_t)t * a->in;
    if (s->p <= 0) return x;
    uint32_t *keep = s->keep + (size_t)t * ((a->in + 31) / 32);
    if (draw) rng_hash_bits(keep, s->seed, s->site, (uint64_t)t, a->in, s->p);
    float *xd = s->xdrop + (size_t)t * a->in;
    dropout_row(xd, x, keep, 1.0f / (1.0f - s->p), a->in);
    return xd;
}

// s->bt[R, out] = B[out, R]^T
static void lora_transpose_B(const LoraSite *s, int out) {
    for (int o = 0; o < out; o++)
        for (int r = 0; r < s->R; r++) s->bt[(size_t)r * out + o] = s->pair->B[(size_t)o * s->R + r];
}

// Tokens [start, end): u[t, R] = A xd[t]; y[t] += s B u[t]
static void lora_forward_rows(void *ctx, int start, int end) {
    const LoraArgs *a = ctx;
    const LoraSite *s = a->s;
    for (int t = start; t < end; t++) {
        float *u = s->u + (size_t)t * s->R;
        rows_dot(u, s->pair->A, (size_t)a->in, lora_input_row(a, t, 1), s->R, a->in);
        rows_combine(a->y + (size_t)t * a->out, u, s->bt, (size_t)a->out, s->R, a->out, s->scale, NULL);
    }
}

// y[T, out] += s B[out, R] u, with u[T, R] = A[R, in] xd   (xd[T, in] = dropout(x)); one thread per token
void lora_forward(float *y, const LoraSite *s, const float *x, int T, int in, int out) {
    double t0 = trace_start();
    LoraArgs a = {s, y, NULL, x, NULL, T, in, out};
    lora_transpose_B(s, out);
    parallel_for(lora_forward_rows, &a, T, 1);
    trace_op(t0, "lora_forward", "y[%d, %d] += <- x[%d, %d], A[%d, %d], B[%d, %d]",
             T, out, T, in, s->R, in, out, s->R);
}

// Tokens [start, end): xd[t] again (for dA), du[t, r] = s sum_o dy[t, o] B[o, r], and
// dx[t, i] += dropout'(t, i) sum_r du[t, r] A[r, i]
static void lora_backward_rows(void *ctx, int start, int end) {
    const LoraArgs *a = ctx;
    const LoraSite *s = a->s;
    float dscale = s->p > 0 ? 1.0f / (1.0f - s->p) : 1.0f;
    for (int t = start; t < end; t++) {
        float *du = s->du + (size_t)t * s->R;
        lora_input_row(a, t, 0);
        rows_dot(du, s->bt, (size_t)a->out, a->dy + (size_t)t * a->out, s->R, a->out);
        for (int r = 0; r < s->R; r++) du[r] *= s->scale;
        if (a->dx)
            rows_combine(a->dx + (size_t)t * a->in, du, s->pair->A, (size_t)a->in, s->R, a->in, dscale,
                         s->p > 0 ? s->keep + (size_t)t * ((a->in + 31) / 32) : NULL);
    }
}

// Columns [start, end) of [0, padded(out) + in): the first padded(out) are dB's rows o,
// dB[o, r] += s sum_t dy[t, o] u[t, r] (summed in s->bt as dB^T), the others dA's columns i,
// dA[r, i] += sum_t du[t, r] xd[t, i]
static void lora_backward_cols(void *ctx, int start, int end) {
    const LoraArgs *a = ctx;
    const LoraSite *s = a->s;
    int ob = padded(a->out), o0 = start, o1 = min_int(end, a->out);
    if (o0 < o1) {
        for (int r = 0; r < s->R; r++) memset(s->bt + (size_t)r * a->out + o0, 0, (size_t)(o1 - o0) * sizeof(float));
        outer_cols(s->bt, (size_t)a->out, s->u, a->dy, (size_t)a->out, a->T, s->R, o0, o1, 1.0f);
        for (int o = o0; o < o1; o++)
            for (int r = 0; r < s->R; r++) s->pair->dB[(size_t)o * s->R + r] += s->scale * s->bt[(size_t)r * a->out + o];
    }
    int i0 = (start > ob ? start : ob) - ob, i1 = end - ob;
    if (i0 < i1)
        outer_cols(s->pair->dA, (size_t)a->in, s->du, s->p > 0 ? s->xdrop : a->x, (size_t)a->in, a->T, s->R, i0, i1, 1.0f);
}

// dA[R, in], dB[out, R] (in s->pair) +=, dx[T, in] += (when not NULL) <- dy[T, out], x[T, in], s->u;
// one thread per token, then per column of dB and dA
void lora_backward(float *dx, const LoraSite *s, const float *dy, const float *x, int T, int in, int out) {
    double t0 = trace_start();
    LoraArgs a = {s, NULL, dx, x, dy, T, in, out};
    lora_transpose_B(s, out);
    parallel_for(lora_backward_rows, &a, T, 1);
    parallel_for(lora_backward_cols, &a, padded(out) + in, LANES);  // s->bt now holds dB^T
    trace_op(t0, "lora_backward", "dA[%d, %d], dB[%d, %d]%s += <- dy[%d, %d], x[%d, %d]",
             s->R, in, out, s->R, dx ? ", dx" : "", T, out, T, in);
}

