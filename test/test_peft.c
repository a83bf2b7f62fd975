// test_peft.c: adapters against the real tools, with no Python: what transformers + peft computed
// (test/peft/make_fixtures.py, run by hand) and one adapter written by llama.cpp's
// convert_lora_to_gguf.py, all committed under test/peft/. Checks both directions:
//   sft reads peft's adapters in their variants (subsets of targets, rank_pattern, alpha_pattern,
//   use_rslora, layers_to_transform, regex target_modules / exclude_modules) and computes the same
//   loss, logits and gradients (--quant f32, F32 weights);
//   the sft train command that made test/peft/sft_trained still writes that adapter, which
//   PeftModel.from_pretrained loaded and ran (its logits are in the fixture);
//   sft export writes what convert_lora_to_gguf.py wrote, and sft reads that file;
// then the refusals, broken GGUF adapters, export of the variants and sft merge.
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../gguf.h"
#include "../lora.h"
#include "../modelfile.h"
#include "../quant.h"
#include "../regex.h"
#include "../safetensors.h"
#include "test.h"

#define PEFT "test/peft"
#define TMP "test/tmp/peft"
#define EVAL_ARGS "--model " PEFT "/model --data " PEFT "/data.jsonl --quant f32 --loss-on all --threads 2"

// Measured against peft on this machine, with the AVX-512 (native), AVX2 (-march=haswell),
// portable (-O2) and reference (-DSFT_REF) builds: loss within 9.4e-8, logits within 6.0e-7 and
// gradients within 1.2e-6 relative (norm of the difference over the norm, worst tensor or
// example). The limits are 1.5 times those: F32 weights run in fp32 on every kernel path (no bf16
// rounding), so the error is sft's float32 against PyTorch's float32, whatever the path.
static const double TOL_LOSS = 1.5e-7, TOL_LOGITS = 9e-7, TOL_GRADS = 1.8e-6;

static char *slurp(const char *path, size_t *len) {
    Err e;
    size_t n;
    char *s = read_file(path, &n, &e);
    if (len) *len = s ? n : 0;
    return s;
}

// The one stderr line of the last command, and whether it is exactly one line containing want.
static int one_line_with(const char *want, char **err) {
    *err = slurp(TMP "/stderr.txt", NULL);
    int lines = 0;
    for (const char *p = *err; p && *p; p++) lines += *p == '\n';
    return *err && lines == 1 && strstr(*err, want) != NULL;
}

// A tensor as floats (F32 only), malloc'ed; NULL when absent.
static float *tensor_f32(const StFile *f, const char *name, size_t *n) {
    const StTensor *t = safetensors_find(f, name);
    if (!t || t->type != TYPE_F32) return NULL;
    float *x = xmalloc(t->nbytes ? t->nbytes : 1);
    memcpy(x, t->data, t->nbytes);
    *n = t->nbytes / 4;
    return x;
}

// Worst relative error (norm) of the logits of every example, and whether the tokens are the same.
static double logits_error(const StFile *got, const StFile *want, int *tokens_same) {
    double worst = 0;
    *tokens_same = 1;
    for (int i = 0;; i++) {
        char ln[32], tn[32];
        size_t n1, n2, m1, m2;
        snprintf(ln, sizeof ln, "logits.%d", i), snprintf(tn, sizeof tn, "tokens.%d", i);
        float *w = tensor_f32(want, ln, &n2), *g = tensor_f32(got, ln, &n1);
        float *wt = tensor_f32(want, tn, &m2), *gt = tensor_f32(got, tn, &m1);
        int present = w != NULL;
        if (present && (!g || n1 != n2 || !gt || !wt || m1 != m2 || memcmp(gt, wt, m1 * 4) != 0)) *tokens_same = 0, worst = INFINITY;
        else if (present) {
            double err = rel_norm_error(g, w, n1);
            worst = err > worst ? err : worst;
        }
        free(w), free(g), free(wt), free(gt);
        if (!present) return i == 0 ? INFINITY : worst;
    }
}

// Worst relative error of the gradients of every tensor of the adapter file.
static double grads_error(const StFile *got, const StFile *want, const StFile *adapter) {
    double worst = got->n == adapter->n ? 0 : INFINITY;
    for (int i = 0; i < adapter->n; i++) {
        size_t n1 = 0, n2 = 0;
        float *g = tensor_f32(got, adapter->tensors[i].name, &n1), *w = tensor_f32(want, adapter->tensors[i].name, &n2);
        double err = g && w && n1 == n2 ? rel_norm_error(g, w, n1) : INFINITY;
        worst = err > worst ? err : worst;
        free(g), free(w);
    }
    return worst;
}

// sft eval --logits and sft grads with one of peft's adapters, against peft's numbers.
static void peft_case(const char *name) {
    char *out = NULL, label[160];
    int rc = run_commandf(&out, TMP "/stderr.txt", "%s eval " EVAL_ARGS " --lora " PEFT "/%s --logits " TMP "/%s.logits", sft_binary(), name, name);
    StFile want, got, grads, adapter;
    Err e;
    char path[256];
    snprintf(path, sizeof path, PEFT "/%s/expected.safetensors", name);
    int ok = rc == 0 && safetensors_open(&want, path, &e) == 0;
    snprintf(label, sizeof label, "peft %s: sft loads the adapter peft saved", name);
    check(ok, label, "exit %d: %s", rc, ok ? "" : e.msg);
    if (!ok) return free(out);
    size_t n;
    float *wl = tensor_f32(&want, "loss", &n);
    double loss = NAN;
    sscanf(out ? out : "", "loss %lf", &loss);
    snprintf(label, sizeof label, "peft %s: loss equals peft's (rel err %.2g)", name, fabs(loss - *wl) / *wl);
    check(fabs(loss - *wl) <= TOL_LOSS * *wl, label, "sft %.9g, peft %.9g", loss, *wl);
    snprintf(path, sizeof path, TMP "/%s.logits", name);
    if (safetensors_open(&got, path, &e) == 0) {
        int same;
        double err = logits_error(&got, &want, &same);
        snprintf(label, sizeof label, "peft %s: same tokens, logits equal peft's (rel err %.2g)", name, err);
        check(same && err <= TOL_LOGITS, label, "tokens %s, worst rel err %.3g", same ? "same" : "differ", err);
        safetensors_close(&got);
    }
    rc = run_commandf(NULL, TMP "/stderr.txt", "%s grads " EVAL_ARGS " --lora " PEFT "/%s --out " TMP "/%s.grads", sft_binary(), name, name);
    snprintf(path, sizeof path, TMP "/%s.grads", name);
    char apath[256];
    snprintf(apath, sizeof apath, PEFT "/%s/adapter_model.safetensors", name);
    if (rc == 0 && safetensors_open(&grads, path, &e) == 0 && safetensors_open(&adapter, apath, &e) == 0) {
        double err = grads_error(&grads, &want, &adapter);
        snprintf(label, sizeof label, "peft %s: every gradient equals peft's (worst rel err %.2g)", name, err);
        check(err <= TOL_GRADS, label, "worst rel err %.3g", err);
        safetensors_close(&grads), safetensors_close(&adapter);
    } else {
        check(0, "sft grads with a peft adapter", "exit %d", rc);
    }
    free(wl), free(out);
    safetensors_close(&want);
}

// The safetensors header (8-byte length + JSON) of a file, malloc'ed; *n its bytes.
static char *st_header(const char *path, size_t *n) {
    size_t len;
    char *s = slurp(path, &len);
    uint64_t h = 0;
    if (s && len >= 8) memcpy(&h, s, 8);
    *n = s && h + 8 <= len ? (size_t)h + 8 : 0;
    return s;
}

// The command that made test/peft/sft_trained (make_fixtures.py's SFT_TRAIN) writes it again.
// adapter_config.json and the safetensors header must be the same bytes on every build. The tensor
// values come from three AdamW steps, whose arithmetic differs in the last bits between kernel
// paths (AVX-512 / AVX2 / NEON / portable), so they must be the same bytes where the arithmetic is
// fixed: the -DSFT_REF build (make test-ref), whose definitions made the fixture; elsewhere they
// must agree to a tolerance (measured: 3e-6 relative with AVX-512 and AVX2, 7.7e-7 portable; the
// limit is 1e-5 for the paths not measured here, NEON among them). An element whose gradient is
// near 0 could take the other sign in its first Adam step (an update of about lr either way),
// which no tolerance on these tiny tensors would absorb; that would fail the same way on every run
// of that build (the result does not depend on threads or timing), never now and then. Then peft's logits with that adapter (PeftModel.from_pretrained)
// equal sft's.
static void sft_trained_case(void) {
    int rc = run_commandf(NULL, TMP "/stderr.txt", "%s train --model " PEFT "/model --data " PEFT "/data.jsonl --quant f32 --loss-on all --rank 4 "
                 "--alpha 8 --max-steps 3 --lr 1e-2 --batch 1 --grad-accum 1 --seed 7 --threads 1 --out " TMP "/trained",
                 sft_binary());
    size_t n1, n2, h1, h2;
    char *a = slurp(TMP "/trained/adapter_config.json", &n1), *b = slurp(PEFT "/sft_trained/adapter_config.json", &n2);
    check(rc == 0 && a && b && n1 == n2 && memcmp(a, b, n1) == 0, "sft train writes the adapter_config.json peft loaded, byte for byte",
          "exit %d", rc);
    free(a), free(b);
    a = st_header(TMP "/trained/adapter_model.safetensors", &h1), b = st_header(PEFT "/sft_trained/adapter_model.safetensors", &h2);
    check(a && b && h1 == h2 && h1 > 0 && memcmp(a, b, h1) == 0, "sft train: the same safetensors header (names, shapes, offsets)", "differs");
    free(a), free(b);
    StFile got, want;
    Err e;
    if (safetensors_open(&got, TMP "/trained/adapter_model.safetensors", &e) != 0 ||
        safetensors_open(&want, PEFT "/sft_trained/adapter_model.safetensors", &e) != 0)
        return check(0, "sft train output", "%s", e.msg);
    double worst = 0;
    int same = got.n == want.n;
    for (int i = 0; i < want.n && same; i++) {
        size_t n, m;
        float *g = tensor_f32(&got, want.tensors[i].name, &n), *w = tensor_f32(&want, want.tensors[i].name, &m);
        same = g && w && n == m;
        double err = same ? rel_norm_error(g, w, n) : INFINITY;
        worst = err > worst ? err : worst;
        free(g), free(w);
    }
#ifdef SFT_REF
    check(same && worst == 0, "sft train: the same tensor bytes (reference kernels)", "worst rel err %.3g", worst);
#else
    char label[128];
    snprintf(label, sizeof label, "sft train: the same tensors (rel err %.2g; bytes with make test-ref)", worst);
    check(same && worst <= 1e-5, label, "worst rel err %.3g", worst);
#endif
    safetensors_close(&got), safetensors_close(&want);
    char *out = NULL;
    rc = run_commandf(&out, TMP "/stderr.txt", "%s eval " EVAL_ARGS " --lora " PEFT "/sft_trained --logits " TMP "/trained.logits", sft_binary());
    StFile l, x;
    if (rc == 0 && safetensors_open(&l, TMP "/trained.logits", &e) == 0 && safetensors_open(&x, PEFT "/sft_trained/expected.safetensors", &e) == 0) {
        int same_tokens;
        double err = logits_error(&l, &x, &same_tokens);
        char label[160];
        snprintf(label, sizeof label, "PeftModel.from_pretrained(sft's adapter) gives sft's logits (rel err %.2g)", err);
        check(same_tokens && err <= TOL_LOGITS, label, "worst %.3g", err);
        safetensors_close(&l), safetensors_close(&x);
    } else {
        check(0, "sft eval --logits with sft_trained", "exit %d", rc);
    }
    free(out);
}

// sft export writes what convert_lora_to_gguf.py wrote from the same PEFT adapter (test/peft/plain.gguf):
// the same keys with the same values (general.name aside: the converter makes "Plain" of the
// directory's name), the same tensor names, types, GGUF dims and bytes. And sft reads that file.
static void gguf_case(void) {
    int rc = run_commandf(NULL, TMP "/stderr.txt", "%s export --model " PEFT "/model --lora " PEFT "/plain --out " TMP "/plain.gguf", sft_binary());
    GgufFile a, b;
    Err e;
    if (rc != 0 || gguf_open(&a, TMP "/plain.gguf", &e) != 0) return check(0, "sft export runs", "exit %d", rc);
    if (gguf_open(&b, PEFT "/plain.gguf", &e) != 0) return gguf_close(&a), check(0, "convert_lora_to_gguf.py's file opens", "%s", e.msg);
    int keys = a.n_kv == b.n_kv;
    for (int i = 0; i < b.n_kv && keys; i++) {
        const GgufKV *x = &b.kv[i], *y = gguf_find_kv(&a, x->key);
        keys = y && y->type == x->type &&
               (strcmp(x->key, "general.name") == 0 || (x->type == GGUF_STRING ? strcmp(x->str, y->str) == 0 : x->v.u == y->v.u));
    }
    check(keys, "sft export: the keys and values convert_lora_to_gguf.py writes", "%d keys, converter %d", a.n_kv, b.n_kv);
    int tensors = a.n_tensors == b.n_tensors;
    for (int i = 0; i < b.n_tensors && tensors; i++) {
        const GgufTensor *x = &b.tensors[i], *y = gguf_find_tensor(&a, x->name);
        tensors = y && y->type == x->type && y->n_dims == x->n_dims && y->ne[0] == x->ne[0] && y->ne[1] == x->ne[1] &&
                  y->nbytes == x->nbytes && memcmp(y->data, x->data, x->nbytes) == 0;
    }
    check(tensors, "sft export: the converter's tensor names, types, dims and bytes", "%d tensors, converter %d", a.n_tensors, b.n_tensors);
    gguf_close(&a), gguf_close(&b);
    char *x = NULL, *y = NULL;
    int r1 = run_commandf(&x, TMP "/stderr.txt", "%s eval " EVAL_ARGS " --lora " PEFT "/plain.gguf", sft_binary());
    int r2 = run_commandf(&y, TMP "/stderr.txt", "%s eval " EVAL_ARGS " --lora " PEFT "/plain", sft_binary());
    check(r1 == 0 && r2 == 0 && x && y && strcmp(x, y) == 0, "sft reads convert_lora_to_gguf.py's adapter: the loss of the PEFT one",
          "'%s' vs '%s'", x ? x : "", y ? y : "");
    free(x), free(y);
}

// Each variant exported to GGUF (rsLoRA as alpha * sqrt(r), other scales folded into B) and read
// back gives the loss of the PEFT directory.
static void export_variants(void) {
    const char *names[] = {"variants", "rslora", "regex"};
    for (int i = 0; i < 3; i++) {
        char *x = NULL, *y = NULL, label[128];
        int r0 = run_commandf(NULL, TMP "/stderr.txt", "%s export --model " PEFT "/model --lora " PEFT "/%s --out " TMP "/%s.gguf --type f32", sft_binary(), names[i], names[i]);
        int r1 = run_commandf(&x, TMP "/stderr.txt", "%s eval " EVAL_ARGS " --lora " TMP "/%s.gguf", sft_binary(), names[i]);
        int r2 = run_commandf(&y, TMP "/stderr.txt", "%s eval " EVAL_ARGS " --lora " PEFT "/%s", sft_binary(), names[i]);
        double lx = NAN, ly = NAN;
        if (x) sscanf(x, "loss %lf", &lx);
        if (y) sscanf(y, "loss %lf", &ly);
        snprintf(label, sizeof label, "export %s to GGUF and read it back: the same loss", names[i]);
        check(r0 == 0 && r1 == 0 && r2 == 0 && fabs(lx - ly) <= 1e-6 * ly, label, "%.9g vs %.9g", lx, ly);
        free(x), free(y);
    }
    GgufFile g;
    Err e;
    double alpha = 0;
    int ok = gguf_open(&g, TMP "/rslora.gguf", &e) == 0;
    if (ok) gguf_get_float(&g, "adapter.lora.alpha", &alpha, 0, &e), gguf_close(&g);
    check(ok && fabs(alpha - 8 * sqrt(8.0)) < 1e-5, "export: rsLoRA alpha 8, r 8 is written as alpha * sqrt(r)", "alpha %g", alpha);
}

// sft merge: GGUF in the base's types and a Hugging Face directory; both without an adapter give
// the loss of base + adapter.
static void merge_cases(void) {
    char *want = NULL, *x = NULL, *y = NULL;
    run_commandf(&want, TMP "/stderr.txt", "%s eval " EVAL_ARGS " --lora " PEFT "/variants", sft_binary());
    int r1 = run_commandf(NULL, TMP "/stderr.txt", "%s merge --model " PEFT "/model --lora " PEFT "/variants --out " TMP "/merged.gguf --type f32", sft_binary());
    int r2 = run_commandf(&x, TMP "/stderr.txt", "%s eval --model " TMP "/merged.gguf --data " PEFT "/data.jsonl --loss-on all", sft_binary());
    int r3 = run_commandf(NULL, TMP "/stderr.txt", "%s merge --model " TMP "/merged.gguf --lora " PEFT "/rslora --out " TMP "/merged_dir/ --dtype f32", sft_binary());
    int r4 = run_commandf(&y, TMP "/stderr.txt", "%s eval --model " TMP "/merged.gguf --data " PEFT "/data.jsonl --loss-on all --lora " PEFT "/rslora", sft_binary());
    char *z = NULL;
    int r5 = run_commandf(&z, TMP "/stderr.txt", "%s eval --model " TMP "/merged_dir --data " PEFT "/data.jsonl --loss-on all --quant f32", sft_binary());
    double lw = NAN, lx = NAN, lz = NAN, ly = NAN;
    if (want) sscanf(want, "loss %lf", &lw);
    if (y) sscanf(y, "loss %lf", &ly);
    if (x) sscanf(x, "loss %lf", &lx);
    if (z) sscanf(z, "loss %lf", &lz);
    check(r1 == 0 && r2 == 0 && fabs(lx - lw) <= 2e-6 * lw, "merge into GGUF f32: the loss of base + adapter", "%.9g vs %.9g", lx, lw);
    check(r3 == 0 && r4 == 0 && r5 == 0 && fabs(lz - ly) <= 2e-6 * ly,
          "merge a GGUF base into a Hugging Face directory (tokenizer.json written): the loss of base + adapter", "%.9g vs %.9g", lz, ly);
    free(want), free(x), free(y), free(z);
    int r6 = run_commandf(NULL, TMP "/stderr.txt", "%s merge --model " PEFT "/model --lora " PEFT "/plain --out " TMP "/m.gguf --dtype f32", sft_binary());
    char *err = NULL;
    check(r6 == 1 && one_line_with("--dtype is for a directory", &err), "merge: --dtype with a GGUF output refused", "%s", err ? err : "");
    free(err);
}

// Writes DIR/adapter_config.json (r 4, alpha 8, the given target_modules and bias JSON, and
// `extra` keys) beside peft's plain adapter_model.safetensors.
static void config_with(const char *dir, const char *targets, const char *bias, const char *extra) {
    char cmd[512], path[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s && cp " PEFT "/plain/adapter_model.safetensors %s/", dir, dir, dir);
    if (system(cmd) != 0) return;
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) return;
    fprintf(f, "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": %s, \"bias\": %s%s}", targets, bias, extra);
    fclose(f);
}

// What plain LoRA cannot express is refused by every command, with one line naming the file.
static void refusals(void) {
    static const char *all = "[\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]";
    const char *cases[][5] = {
        {"", "\"none\"", ", \"use_dora\": true", "use_dora", "DoRA refused"},
        {"", "\"all\"", "", "bias must be", "bias other than none refused"},
        {"", "\"none\"", ", \"lora_bias\": true", "lora_bias", "lora_bias refused"},
        {"", "\"none\"", ", \"modules_to_save\": [\"lm_head\"]", "modules_to_save", "modules_to_save refused"},
        {"[\"q_proj\", \"lm_head\"]", "\"none\"", "", "'lm_head', which is not one of the seven", "target lm_head refused"},
        {"\".*(embed_tokens|_proj)\"", "\"none\"", "", "model.embed_tokens", "regex selecting embed_tokens refused"},
        {"\".*(?<!k)_proj\"", "\"none\"", "", "not supported", "regex sft cannot evaluate refused"},
        {"", "\"none\"", ", \"exclude_modules\": \"model\\\\.layers\\\\.(?=1).*\"", "exclude_modules", "exclude_modules regex sft cannot evaluate refused"},
        {"\"q_proj\"", "\"none\"", "", "selects none", "string target_modules matched whole, as PEFT does"},
    };
    for (int i = 0; i < 9; i++) {
        char dir[128], *err = NULL, label[160];
        snprintf(dir, sizeof dir, TMP "/refuse%d", i);
        config_with(dir, cases[i][0][0] ? cases[i][0] : all, cases[i][1], cases[i][2]);
        int rc = run_commandf(NULL, TMP "/stderr.txt", "%s eval " EVAL_ARGS " --lora %s", sft_binary(), dir);
        snprintf(label, sizeof label, "adapter: %s, one line naming the file", cases[i][4]);
        check(rc == 1 && one_line_with(cases[i][3], &err) && strstr(err, "adapter_config.json"), label, "exit %d: %s", rc, err ? err : "");
        free(err);
    }
    char dir[] = TMP "/subset";  // a subset in some layers, applied exactly: the tensors must match it
    config_with(dir, "[\"q_proj\"]", "\"none\"", ", \"layers_to_transform\": [1]");
    char *err = NULL;
    int rc = run_commandf(NULL, TMP "/stderr.txt", "%s eval " EVAL_ARGS " --lora %s", sft_binary(), dir);
    check(rc == 1 && one_line_with("is not in target_modules", &err), "adapter: tensors outside the config's modules refused", "exit %d: %s", rc, err ? err : "");
    free(err);
}

// regex_fullmatch against Python's re.fullmatch (the expected values are Python's).
static void regex_cases(void) {
    static const struct { const char *p, *t; int want; } c[] = {
        {".*\\.(q_proj|v_proj)", "model.layers.0.self_attn.q_proj", 1},
        {".*\\.(q_proj|v_proj)", "model.layers.0.self_attn.k_proj", 0},
        {"model\\.layers\\.[0-5]\\.self_attn\\.(q|v)_proj", "model.layers.3.self_attn.v_proj", 1},
        {"model\\.layers\\.[0-5]\\.self_attn\\.(q|v)_proj", "model.layers.13.self_attn.v_proj", 0},
        {"(.*\\.)?(model.layers.1.mlp.down_proj)", "model.layers.1.mlp.down_proj", 1},
        {"(.*\\.)?(model.layers.1.mlp.down_proj)", "model.layers.11.mlp.down_proj", 0},
        {"(.*\\.)?(v_proj)", "model.layers.0.self_attn.v_proj", 1},
        {"^model\\.layers\\.\\d+\\.mlp\\..*$", "model.layers.12.mlp.up_proj", 1},
        {"[^.]*\\.layers\\.\\d{1,2}\\..*", "model.layers.123.mlp.up_proj", 0},
        {"(?:x|y)+z?", "xyxyz", 1},
        {"\\w+\\.\\W", "ab..", 1},
        {"a{2,3}", "aaaa", 0},
        {"a{,2}b", "aab", 1},
        {"a{2}", "a{2}", 0},
        {"[\\]a-c]+", "]ab", 1},
        {"(?P<n>la)yers", "layers", 1},
        {"q_proj", "model.layers.0.self_attn.q_proj", 0},
        {"(a|ab)(c|bcd)(d*)", "abcd", 1},
        {"(a*)*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaac", 0},  // Python takes minutes; an NFA does not
    };
    int bad = -1;
    Err e;
    for (size_t i = 0; i < sizeof c / sizeof c[0] && bad < 0; i++)
        if (regex_fullmatch(c[i].p, c[i].t, &e) != c[i].want) bad = (int)i;
    check(bad < 0, "regex_fullmatch agrees with Python's re.fullmatch", "pattern '%s' on '%s'", bad < 0 ? "" : c[bad].p,
          bad < 0 ? "" : c[bad].t);
    const char *unsupported[] = {"a(?=b)", "(a)\\1", "(?i)a", "a\\b", "a**", "(a", "[a-", "a++"};
    int refused = 1;
    for (int i = 0; i < 8; i++) refused &= regex_fullmatch(unsupported[i], "a", &e) == -1 && strstr(e.msg, "regex '");
    check(refused, "regex: look-arounds, back-references, flags, \\b, bad syntax refused with the reason", "%s", e.msg);
}

// A GGUF adapter for the test/peft model (C 64, q 64, kv 32, FF 128, 2 layers), tensors given by
// name and GGUF dims, values 0.01 * (i % 7) (or NaN at element 3 when nan is set).
typedef struct {
    const char *name;
    int64_t ne0, ne1;
} GT;

static void write_adapter_gguf(const char *path, const char *type, const char *arch, const GT *t, int n, int nan) {
    GgufWriter w;
    Err e;
    if (gguf_writer_open(&w, path, &e) != 0) return;
    gguf_add_str(&w, "general.architecture", arch);
    gguf_add_str(&w, "general.type", type);
    gguf_add_str(&w, "adapter.type", "lora");
    gguf_add_f32(&w, "adapter.lora.alpha", 8);
    for (int i = 0; i < n; i++) gguf_add_tensor(&w, t[i].name, TYPE_F32, 2, (int64_t[]){t[i].ne0, t[i].ne1}, &e);
    gguf_write_header(&w, &e);
    for (int i = 0; i < n; i++) {
        size_t m = (size_t)(t[i].ne0 * t[i].ne1);
        float *v = xmalloc(m * 4);
        for (size_t j = 0; j < m; j++) v[j] = 0.01f * (float)(j % 7);
        if (nan && i == n - 1) v[3] = NAN;
        gguf_write_data(&w, v, m * 4, &e);
        free(v);
    }
    gguf_writer_close(&w, &e);
}

static void bad_gguf(void) {
    Config c;
    Err e;
    if (model_peek(PEFT "/model", &c, &e) != 0) return check(0, "model_peek", "%s", e.msg);
    const GT good[2] = {{"blk.1.attn_v.weight.lora_a", 64, 4}, {"blk.1.attn_v.weight.lora_b", 4, 32}};
    struct {
        const char *what, *type, *arch, *want;
        GT t[2];
        int n, nan;
    } cases[] = {
        {"a model, not an adapter", "model", "qwen2", "not 'adapter'", {good[0], good[1]}, 2, 0},
        {"another architecture", "adapter", "llama", "not 'qwen2'", {good[0], good[1]}, 2, 0},
        {"lora_b missing", "adapter", "qwen2", "has lora_a but no lora_b", {good[0]}, 1, 0},
        {"shape that does not fit the base", "adapter", "qwen2", "the model needs", {{"blk.1.attn_v.weight.lora_a", 32, 4}, good[1]}, 2, 0},
        {"lora_a and lora_b of different ranks", "adapter", "qwen2", "lora_a has rank 4, lora_b rank 8", {good[0], {"blk.1.attn_v.weight.lora_b", 8, 32}}, 2, 0},
        {"NaN", "adapter", "qwen2", "NaN", {good[0], good[1]}, 2, 1},
        {"token_embd LoRA", "adapter", "qwen2", "not the lora_a or lora_b", {{"token_embd.weight.lora_a", 264, 4}, {"token_embd.weight.lora_b", 4, 64}}, 2, 0},
        {"layer past the base's", "adapter", "qwen2", "matches no LoRA layer", {{"blk.2.attn_v.weight.lora_a", 64, 4}, good[1]}, 2, 0},
        {"norm tensor", "adapter", "qwen2", "norm tensors", {good[0], {"blk.0.attn_norm.weight", 64, 1}}, 2, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_adapter_gguf(TMP "/bad.gguf", cases[i].type, cases[i].arch, cases[i].t, cases[i].n, cases[i].nan);
        Lora lora;
        Err le = {{0}};
        int rc = lora_load(&lora, TMP "/bad.gguf", &c, &le);
        char label[160];
        snprintf(label, sizeof label, "GGUF adapter refused: %s", cases[i].what);
        check(rc == -1 && strstr(le.msg, cases[i].want) && strstr(le.msg, "bad.gguf"), label, "rc %d: %s", rc, le.msg);
        if (rc == 0) lora_free(&lora);
    }
    write_adapter_gguf(TMP "/good.gguf", "adapter", "qwen2", good, 2, 0);
    Lora lora;
    int ok = lora_load(&lora, TMP "/good.gguf", &c, &e) == 0;
    const LoraPair *p = ok ? &lora.pairs[LORA_NTARGETS + LORA_V] : NULL;
    check(ok && lora.targets == 1u << LORA_V && p->r == 4 && lora_scale(&lora, p) == 2.0f && p->B[32 * 4 - 1] == 0.01f * (127 % 7),
          "GGUF adapter read: one pair, rank from the tensors, scale alpha / r, B [out, r]", "%s", ok ? "wrong" : e.msg);
    if (ok) lora_free(&lora);
}

// base_model_name_or_path: the Hugging Face id the model names (config.json's _name_or_path),
// else the path given.
static void base_model_id(void) {
    char *x = NULL;
    int rc = run_commandf(NULL, TMP "/stderr.txt", "rm -rf " TMP "/named && cp -r " PEFT "/model " TMP "/named && sed -i 's/\"architectures\"/\"_name_or_path\": "
                 "\"Qwen\\/Qwen2.5-0.5B-Instruct\", \"architectures\"/' " TMP "/named/config.json && %s train --model " TMP "/named "
                 "--data " PEFT "/data.jsonl --max-steps 1 --out " TMP "/named_out && grep base_model " TMP "/named_out/adapter_config.json",
                 sft_binary());
    check(rc == 0 && x == NULL, "train on a model naming its id", "exit %d", rc);
    char *cfg = slurp(TMP "/named_out/adapter_config.json", NULL);
    check(cfg && strstr(cfg, "\"base_model_name_or_path\": \"Qwen/Qwen2.5-0.5B-Instruct\""),
          "adapter_config.json: base_model_name_or_path is the model's Hugging Face id", "%s", cfg ? cfg : "");
    free(cfg);
    cfg = slurp(PEFT "/sft_trained/adapter_config.json", NULL);
    check(cfg && strstr(cfg, "\"base_model_name_or_path\": \"test/peft/model\""),
          "adapter_config.json: else the path given", "%s", cfg ? cfg : "");
    free(cfg);
}

void test_peft(void) {
    scratch_dir("peft");
    const char *names[] = {"plain", "variants", "rslora", "regex"};
    for (int i = 0; i < 4; i++) peft_case(names[i]);
    sft_trained_case();
    gguf_case();
    export_variants();
    merge_cases();
    refusals();
    regex_cases();
    bad_gguf();
    base_model_id();
}
