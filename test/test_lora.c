// test_lora.c: adapters: PEFT's initialization, the PEFT file format (names, shapes, config keys)
// written and read, what PEFT writes (bf16 tensors, target_modules as a string), one clear error
// for every adapter that does not fit the model, and `sft grads` against the reference gradients.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../json.h"
#include "../lora.h"
#include "../model.h"
#include "../quant.h"
#include "../safetensors.h"
#include "test.h"

#define FIXTURES "test/fixtures"

// The tied fixture's shapes: C 32, 4 heads of 8 sharing 2 kv heads, FF 64, 2 layers.
static Config tiny_config(void) {
    return (Config){.C = 32, .L = 2, .NH = 4, .NKV = 2, .HS = 8, .FF = 64, .V = 264, .max_seq = 256,
                    .rope_theta = 1e4f, .rms_eps = 1e-6f, .tied = 1};
}

static void targets_checks(void) {
    unsigned t = 0;
    Err e;
    check(lora_parse_targets(&t, "q_proj,v_proj", &e) == 0 && t == ((1u << LORA_Q) | (1u << LORA_V)),
          "targets q_proj,v_proj", "got %#x", t);
    check(lora_parse_targets(&t, "all-linear", &e) == 0 && t == 0x7f, "targets all-linear", "got %#x", t);
    check(lora_parse_targets(&t, "q_proj,lm_head", &e) == -1 && strstr(e.msg, "lm_head"), "unknown target refused",
          "accepted");
}

static void init_checks(void) {
    Config c = tiny_config();
    Lora a, b;
    lora_init(&a, &c, 4, 8, 0.05f, 0x7f, 7);
    lora_init(&b, &c, 4, 8, 0.05f, 0x7f, 7);
    // per layer: A [4, in] and B [out, 4] for q (32->32), k, v (32->16), o (32->32), gate, up (32->64), down (64->32)
    size_t want = 2 * 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32));
    check(a.n_params == want, "lora_init parameter count", "got %zu want %zu", a.n_params, want);
    int ok = memcmp(a.params, b.params, a.n_params * sizeof(float)) == 0;
    check(ok, "lora_init deterministic", "two inits with seed 7 differ");
    double max_ratio = 0, sum = 0;
    size_t n = 0, nonzero_B = 0;
    for (int i = 0; i < c.L * LORA_NTARGETS; i++) {
        const LoraPair *p = &a.pairs[i];
        for (int j = 0; j < 4 * p->in; j++, n++) {
            double r = fabs(p->A[j]) * sqrt((double)p->in);  // |A| / bound
            max_ratio = r > max_ratio ? r : max_ratio;
            sum += p->A[j] * sqrt((double)p->in);
        }
        for (int j = 0; j < p->out * 4; j++) nonzero_B += p->B[j] != 0;
    }
    check(max_ratio <= 1 && max_ratio > 0.98 && fabs(sum / n) < 0.05 && nonzero_B == 0,
          "lora_init: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0", "max |A| sqrt(in) %.3f, mean %.3f, %zu non-zero in B",
          max_ratio, sum / n, nonzero_B);
    lora_free(&b);
    lora_init(&b, &c, 4, 8, 0.05f, 0x7f, 8);
    check(memcmp(a.params, b.params, a.n_params * sizeof(float)) != 0, "lora_init depends on the seed", "same values");
    lora_free(&a);
    lora_free(&b);
}

// Writes DIR/adapter_config.json with the given r and target_modules JSON, and the tensors.
static void write_adapter(const char *dir, int r, const char *targets_json, const char *extra, const StTensor *t, int n) {
    char path[512];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    FILE *f = fopen(path, "w");
    fprintf(f, "{\"peft_type\": \"LORA\", \"r\": %d, \"lora_alpha\": 16, \"lora_dropout\": 0.1, \"target_modules\": %s, "
               "\"bias\": \"none\", \"task_type\": \"CAUSAL_LM\"%s}", r, targets_json, extra);
    fclose(f);
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    Err e;
    if (safetensors_write(path, t, n, "{\"format\":\"pt\"}", &e) != 0) printf("cannot write %s: %s\n", path, e.msg);
}

// An adapter on q_proj only, for the tiny config: layer l's A [r, 32] and B [32, r].
typedef struct {
    char names[4][96];
    float a[2][8 * 32], b[2][32 * 8];
    StTensor t[4];
} QAdapter;

static void q_adapter(QAdapter *q, int r) {
    for (int l = 0; l < 2; l++) {
        for (int i = 0; i < 8 * 32; i++) q->a[l][i] = 0.01f * (float)(i % 17) - 0.05f * l, q->b[l][i] = 0.02f * (float)(i % 5);
        snprintf(q->names[2 * l], 96, "base_model.model.model.layers.%d.self_attn.q_proj.lora_A.weight", l);
        snprintf(q->names[2 * l + 1], 96, "base_model.model.model.layers.%d.self_attn.q_proj.lora_B.weight", l);
        q->t[2 * l] = (StTensor){.name = q->names[2 * l], .type = TYPE_F32, .n_dims = 2, .shape = {r, 32}, .data = q->a[l]};
        q->t[2 * l + 1] = (StTensor){.name = q->names[2 * l + 1], .type = TYPE_F32, .n_dims = 2, .shape = {32, r}, .data = q->b[l]};
    }
}

// lora_load must fail with a message containing `want`.
static void expect_error(const char *name, const char *dir, const char *want) {
    Config c = tiny_config();
    Lora lora;
    Err e = {{0}};
    int rc = lora_load(&lora, dir, &c, &e);
    check(rc == -1 && strstr(e.msg, want) != NULL, name, "rc %d, message '%s' (wanted '%s')", rc, e.msg, want);
    if (rc == 0) lora_free(&lora);
}

static void load_checks(void) {
    Config c = tiny_config();
    QAdapter q;
    Lora lora;
    Err e;
    const char *dir = scratch_dir("lora_q");
    char d[256];
    snprintf(d, sizeof d, "%s", dir);

    q_adapter(&q, 4);
    write_adapter(d, 4, "\".*\\\\.q_proj\"", "", q.t, 4);  // a regex, matched whole as PEFT does
    int ok = lora_load(&lora, d, &c, &e) == 0;
    check(ok && lora.targets == 1u << LORA_Q && lora.R == 4 && lora.alpha == 16 && fabsf(lora.dropout - 0.1f) < 1e-7f &&
              memcmp(lora.pairs[LORA_NTARGETS + LORA_Q].A, q.a[1], 4 * 32 * sizeof(float)) == 0 &&
              memcmp(lora.pairs[LORA_NTARGETS + LORA_Q].B, q.b[1], 32 * 4 * sizeof(float)) == 0,
          "PEFT adapter, target_modules a string", "%s", ok ? "wrong values" : e.msg);
    if (ok) lora_free(&lora);

    uint16_t bf[2][8 * 32];  // bf16 tensors, as PEFT saves an adapter trained in bf16
    for (int l = 0; l < 2; l++)
        for (int i = 0; i < 4 * 32; i++) bf[l][i] = fp32_to_bf16(q.a[l][i]);
    q.t[0].type = q.t[2].type = TYPE_BF16;
    q.t[0].data = bf[0], q.t[2].data = bf[1];
    write_adapter(d, 4, "[\"q_proj\"]", ", \"use_rslora\": false, \"some_future_key\": [1, 2]", q.t, 4);
    ok = lora_load(&lora, d, &c, &e) == 0;
    check(ok && lora.pairs[LORA_Q].A[5] == bf16_to_fp32(bf[0][5]), "bf16 adapter tensors, unknown keys ignored", "%s",
          ok ? "wrong values" : e.msg);
    if (ok) lora_free(&lora);
    q.t[0].type = q.t[2].type = TYPE_F32;
    q.t[0].data = q.a[0], q.t[2].data = q.a[1];

    write_adapter(d, 8, "[\"q_proj\"]", "", q.t, 4);
    expect_error("adapter: rank of the config does not match the tensors", d, "shape [4, 32]");
    write_adapter(d, 4, "[\"q_proj\", \"lm_head\"]", "", q.t, 4);
    expect_error("adapter: target module the model lacks", d, "lm_head");
    write_adapter(d, 4, "[\"q_proj\", \"v_proj\"]", "", q.t, 4);
    expect_error("adapter: missing tensor", d, "layers.0.self_attn.v_proj.lora_A.weight' is missing");
    write_adapter(d, 4, "[\"q_proj\"]", ", \"use_dora\": true", q.t, 4);
    expect_error("adapter: DoRA refused", d, "use_dora");
    snprintf(q.names[2], 96, "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight");
    write_adapter(d, 4, "[\"q_proj\"]", "", q.t, 4);
    expect_error("adapter: layer past the model's", d, "matches no LoRA layer");
    snprintf(q.names[2], 96, "base_model.model.lm_head.lora_A.weight");
    write_adapter(d, 4, "[\"q_proj\"]", "", q.t, 4);
    expect_error("adapter: tensor matching no layer", d, "'base_model.model.lm_head.lora_A.weight' matches no");
    q_adapter(&q, 4);
    q.a[1][7] = NAN;
    write_adapter(d, 4, "[\"q_proj\"]", "", q.t, 4);
    expect_error("adapter: NaN refused", d, "NaN");
    q.a[1][7] = INFINITY;
    write_adapter(d, 4, "[\"q_proj\"]", "", q.t, 4);
    expect_error("adapter: Inf refused", d, "infinite");
    q_adapter(&q, 4);
    q.t[1].shape[0] = 16, q.t[1].shape[1] = 8;  // same bytes, the wrong shape
    write_adapter(d, 4, "[\"q_proj\"]", "", q.t, 4);
    expect_error("adapter: transposed B refused", d, "needs [32, 4]");
    FILE *f = fopen("test/tmp/lora_q/adapter_config.json", "w");
    fputs("{\"r\": 4,", f);
    fclose(f);
    expect_error("adapter: broken adapter_config.json", d, "adapter_config.json: line 1");
    expect_error("adapter: missing directory", "test/tmp/no-such-adapter", "no-such-adapter/adapter_config.json");
    Config cu = {.C = 64, .L = 2, .NH = 4, .NKV = 1, .HS = 16, .FF = 96, .V = 272};
    ok = lora_load(&lora, FIXTURES "/tied/adapter", &cu, &e) == -1 && strstr(e.msg, "shape") != NULL;
    check(ok, "adapter of another model refused", "message '%s'", e.msg);
}

// lora_save writes what the contract names: the config keys and the tensor names and shapes.
static void save_checks(void) {
    Config c = tiny_config();
    Lora a, b;
    Err e;
    lora_init(&a, &c, 4, 16, 0.05f, (1u << LORA_V) | (1u << LORA_DOWN), 3);
    for (size_t i = 0; i < a.n_params; i++) a.params[i] += 0.001f * (float)(i % 7), a.grads[i] = (float)i;
    const char *dir = scratch_dir("lora_save");
    char d[256], path[300];
    snprintf(d, sizeof d, "%s/out", dir);
    check(lora_save(&a, d, &e) == 0, "lora_save", "%s", e.msg);

    snprintf(path, sizeof path, "%s/adapter_config.json", d);
    char *text = read_file(path, NULL, &e);
    Json j;
    int ok = text && json_parse(&j, text, strlen(text), &e) == 0;
    if (ok) {
        const Json *tm = json_get(&j, "target_modules"), *r = json_get(&j, "r"), *al = json_get(&j, "lora_alpha");
        const Json *dr = json_get(&j, "lora_dropout"), *pt = json_get(&j, "peft_type");
        ok = tm && tm->type == JSON_ARRAY && tm->len == 2 && strcmp(tm->items[0].str, "v_proj") == 0 &&
             strcmp(tm->items[1].str, "down_proj") == 0 && r && r->number == 4 && al && al->number == 16 && dr &&
             dr->number == 0.05 && pt && strcmp(pt->str, "LORA") == 0 && strstr(text, "\"lora_dropout\": 0.05,");
        json_free(&j);
    }
    check(ok, "adapter_config.json: r, lora_alpha, lora_dropout, target_modules, peft_type", "%s", text ? text : e.msg);
    free(text);

    StFile f;
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", d);
    ok = safetensors_open(&f, path, &e) == 0;
    if (ok) {
        const StTensor *t1 = safetensors_find(&f, "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight");
        const StTensor *t2 = safetensors_find(&f, "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight");
        ok = f.n == 8 && t1 && t1->type == TYPE_F32 && t1->shape[0] == 4 && t1->shape[1] == 64 && t2 &&
             t2->shape[0] == 16 && t2->shape[1] == 4 && safetensors_metadata(&f, "format") &&
             memcmp(t1->data, a.pairs[LORA_NTARGETS + LORA_DOWN].A, 4 * 64 * 4) == 0;
        safetensors_close(&f);
    }
    check(ok, "adapter_model.safetensors: PEFT names, shapes [r, in] / [out, r], format pt", "%s", e.msg);

    ok = lora_load(&b, d, &c, &e) == 0;
    check(ok && b.n_params == a.n_params && memcmp(a.params, b.params, a.n_params * 4) == 0 && b.targets == a.targets,
          "lora_load reads back what lora_save wrote", "%s", ok ? "differs" : e.msg);
    if (ok) lora_free(&b);

    snprintf(path, sizeof path, "%s/grads.safetensors", dir);
    ok = lora_save_grads(&a, path, &e) == 0 && safetensors_open(&f, path, &e) == 0;
    if (ok) {
        const StTensor *t = safetensors_find(&f, "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight");
        ok = t && memcmp(t->data, a.pairs[LORA_V].dA, 4 * 32 * 4) == 0;
        safetensors_close(&f);
    }
    check(ok, "lora_save_grads writes dA / dB under the adapter's names", "%s", e.msg);
    lora_free(&a);
}

// `sft grads` on the tied fixture (F32 weights): the loss line and every gradient tensor against
// the reference.
static void grads_cli(void) {
    const double tol_loss = 1e-5, tol_grads = 1e-4;
    char cmd[1024], *out = NULL;
    const char *dir = scratch_dir("grads");
    snprintf(cmd, sizeof cmd, "%s grads --model " FIXTURES "/tied/model --lora " FIXTURES "/tied/adapter --data "
             FIXTURES "/data.jsonl --quant f32 --threads 2 --out %s/g.safetensors", sft_binary(), dir);
    int rc = run_command(cmd, &out);
    StFile want, got, adapter;
    Err e;
    char path[300];
    snprintf(path, sizeof path, "%s/g.safetensors", dir);
    int ok = rc == 0 && safetensors_open(&got, path, &e) == 0;
    check(ok, "sft grads runs", "exit %d: %s", rc, out ? out : "");
    if (!ok) {
        free(out);
        return;
    }
    safetensors_open(&want, FIXTURES "/tied/expected_f32.safetensors", &e);
    safetensors_open(&adapter, FIXTURES "/tied/adapter/adapter_model.safetensors", &e);
    double loss = 0, wl = NAN;
    const StTensor *wt = safetensors_find(&want, "loss");
    float wf;
    if (wt) memcpy(&wf, wt->data, 4), wl = wf;
    check(sscanf(out, "loss %lf", &loss) == 1 && fabs(loss - wl) < tol_loss * wl, "sft grads prints the loss",
          "output '%s', want %.9g", out, wl);
    double worst = 0;
    int bad = got.n != adapter.n;
    for (int i = 0; i < adapter.n && !bad; i++) {
        const StTensor *g = safetensors_find(&got, adapter.tensors[i].name);
        const StTensor *w = safetensors_find(&want, adapter.tensors[i].name);
        if (!g || !w || g->nbytes != w->nbytes || g->shape[0] != adapter.tensors[i].shape[0]) {
            bad = 1;
            break;
        }
        size_t n = g->nbytes / 4;
        float *a = xmalloc(g->nbytes), *b = xmalloc(g->nbytes);
        memcpy(a, g->data, g->nbytes);
        memcpy(b, w->data, g->nbytes);
        double err = rel_norm_error(a, b, n);
        worst = err > worst ? err : worst;
        free(a), free(b);
    }
    char name[128];
    snprintf(name, sizeof name, "sft grads: the adapter's names and shapes, the reference values (max err %.2g)", worst);
    check(!bad && worst < tol_grads, name, "%d tensors written for %d, worst rel err %.3g", got.n, adapter.n, worst);
    safetensors_close(&got), safetensors_close(&want), safetensors_close(&adapter);
    free(out);

    snprintf(cmd, sizeof cmd, "%s grads --model " FIXTURES "/tied/model --lora " FIXTURES "/untied/adapter --data "
             FIXTURES "/data.jsonl --out %s/g2.safetensors", sft_binary(), dir);
    rc = run_command(cmd, NULL);
    char *err = read_file("test/tmp/last_stderr.txt", NULL, &e);
    int lines = 0;
    for (const char *p = err; p && *p; p++) lines += *p == '\n';
    check(rc == 1 && lines == 1 && strstr(err, "adapter_model.safetensors"), "sft grads: adapter of another model, one error line",
          "exit %d, stderr '%s'", rc, err ? err : "");
    free(err);
}

// A key twice in adapter_config.json is refused with the file, the place and the key.
static void duplicate_key_checks(void) {
    QAdapter q;
    char d[256];
    snprintf(d, sizeof d, "%s", scratch_dir("lora_dup"));
    q_adapter(&q, 4);
    write_adapter(d, 4, "[\"q_proj\"]", ",\n \"r\": 8", q.t, 4);
    Config c = tiny_config();
    Lora lora;
    Err e = {{0}};
    int rc = lora_load(&lora, d, &c, &e);
    check(rc == -1 && strstr(e.msg, "lora_dup/adapter_config.json: line 2, column 2: duplicate key \"r\""),
          "adapter: a key twice in adapter_config.json refused", "rc %d '%s'", rc, e.msg);
    if (rc == 0) lora_free(&lora);
}

void test_lora(void) {
    targets_checks();
    init_checks();
    load_checks();
    duplicate_key_checks();
    save_checks();
    grads_cli();
}
