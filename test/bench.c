// bench.c: one speed or memory figure per run, for `make bench` (test/bench.sh runs it once per
// figure, so that each peak RSS belongs to one job). Not part of `make test`.
//
//   test/bench MODEL forward T      prompt processing: tokens/s of one forward pass over T tokens
//   test/bench MODEL prefill T      a prompt of T tokens through model_infer (KV cache filled, logits
//                                   of the last position only: what llama-bench's pp figure measures)
//   test/bench MODEL generate N     generation: tokens/s of N tokens decoded one by one (KV cache),
//                                   the median of 3 runs
//   test/bench MODEL train T        training: tokens/s of forward + backward + AdamW at length T (the
//                                   median of 3 steps)
//                                   (LoRA r=8 on all seven projections, loss on every token)
// Prints one JSON object: {"what", "T", "tokens_per_s", "seconds", "peak_rss_mb"}; generation adds
// "weights_gb_s", the bytes of weights read a second (every layer's matrices and the output layer,
// once per token), to compare with the memory bandwidth that test/bench_kernels prints; a prompt
// adds "gflop_s", the products' multiply-adds (x2) a second, to compare with its dot-product peak.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "../common.h"
#include "../lora.h"
#include "../model.h"
#include "../optim.h"
#include "../threads.h"

static double peak_rss_mb(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
#ifdef __APPLE__
    return (double)ru.ru_maxrss / (1024.0 * 1024.0);  // bytes on macOS
#else
    return (double)ru.ru_maxrss / 1024.0;             // kilobytes on Linux
#endif
}

// tokens[T]: a fixed pseudo-random sequence of ordinary token ids.
static void make_tokens(int *tokens, int T, int n_vocab) {
    uint64_t rng = 1234;
    for (int t = 0; t < T; t++) tokens[t] = (int)(rng_next(&rng) % (uint64_t)(n_vocab < 150000 ? n_vocab : 150000));
}

static double bench_forward(Model *m, int T, int reps) {
    int *tokens = xmalloc(sizeof(int) * (size_t)T);
    unsigned char *mask = xmalloc((size_t)T);
    make_tokens(tokens, T, m->tok.n_vocab);
    memset(mask, 1, (size_t)T);
    Activations *a = activations_new(&m->config, NULL, T);
    model_forward_backward(m, NULL, a, tokens, mask, T, 1.0f, 0, 0);  // warm-up
    double t0 = now_seconds();
    for (int r = 0; r < reps; r++) model_forward_backward(m, NULL, a, tokens, mask, T, 1.0f, 0, 0);
    double s = (now_seconds() - t0) / reps;
    activations_free(a);
    free(tokens);
    free(mask);
    return s;
}

static double bench_prefill(Model *m, int T, int reps) {
    int *tokens = xmalloc(sizeof(int) * (size_t)T);
    make_tokens(tokens, T, m->tok.n_vocab);
    KVCache *kv = kvcache_new(&m->config, T);
    float *logits = xmalloc(sizeof(float) * (size_t)m->config.V);
    model_infer(m, NULL, kv, tokens, T, logits);  // warm-up
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        kvcache_reset(kv);
        double t0 = now_seconds();
        model_infer(m, NULL, kv, tokens, T, logits);
        double s = now_seconds() - t0;
        if (s < best) best = s;
    }
    kvcache_free(kv);
    free(logits);
    free(tokens);
    return best;
}

static double median3(double a, double b, double c) {
    return a > b ? (b > c ? b : a > c ? c : a) : (a > c ? a : b > c ? c : b);
}

// Seconds for N tokens decoded one by one: the median of three runs (the peers report a mean or
// a median of several too; these machines are shared).
static double bench_generate(Model *m, int N) {
    KVCache *kv = kvcache_new(&m->config, N + 8);
    float *logits = xmalloc(sizeof(float) * (size_t)m->config.V);
    int tok = 9707;  // "Hello"
    double s[3];
    model_infer(m, NULL, kv, &tok, 1, logits);  // warm-up
    for (int r = 0; r < 3; r++) {
        kvcache_reset(kv);
        double t0 = now_seconds();
        for (int i = 0; i < N; i++) model_infer(m, NULL, kv, &tok, 1, logits);
        s[r] = now_seconds() - t0;
    }
    kvcache_free(kv);
    free(logits);
    return median3(s[0], s[1], s[2]);
}

static double bench_train(Model *m, int T, int steps) {
    int *tokens = xmalloc(sizeof(int) * (size_t)T);
    unsigned char *mask = xmalloc((size_t)T);
    make_tokens(tokens, T, m->tok.n_vocab);
    memset(mask, 1, (size_t)T);
    Lora lora;
    lora_init(&lora, &m->config, 8, 16.0f, 0.05f, (1u << LORA_NTARGETS) - 1, 42);
    AdamW opt;
    adamw_init(&opt, lora.n_params, 0.9, 0.999, 1e-8, 0.0);
    Activations *a = activations_new(&m->config, &lora, T);
    double sec[3] = {0};
    for (int s = 0; s <= steps; s++) {  // step 0 is a warm-up; the median step of the others
        double t0 = now_seconds();
        lora_zero_grad(&lora);
        model_forward_backward(m, &lora, a, tokens, mask, T, 1.0f / (float)(T - 1), 1, 1000 + (uint64_t)s);
        adamw_step(&opt, lora.params, lora.grads, 2e-4f);
        if (s > 0) sec[(s - 1) % 3] = now_seconds() - t0;
    }
    activations_free(a);
    adamw_free(&opt);
    lora_free(&lora);
    free(tokens);
    free(mask);
    return median3(sec[0], sec[1], sec[2]);
}

static double matrix_bytes(const QMatrix *W) { return (double)row_bytes(W->type, W->cols) * W->rows; }

// The multiply-adds of the layers' products for one token of a prompt (the output layer runs for
// the last token only).
static double token_macs(const Model *m) {
    double n = 0;
    for (int l = 0; l < m->config.L; l++) {
        const LayerWeights *w = &m->w.layers[l];
        const QMatrix *all[7] = {&w->wq, &w->wk, &w->wv, &w->wo, &w->wgate, &w->wup, &w->wdown};
        for (int i = 0; i < 7; i++) n += (double)all[i]->rows * all[i]->cols;
    }
    return n;
}

// The bytes of weights that one generated token reads.
static double token_weight_bytes(const Model *m) {
    double b = matrix_bytes(&m->w.lm_head);
    for (int l = 0; l < m->config.L; l++) {
        const LayerWeights *w = &m->w.layers[l];
        b += matrix_bytes(&w->wq) + matrix_bytes(&w->wk) + matrix_bytes(&w->wv) + matrix_bytes(&w->wo) +
             matrix_bytes(&w->wgate) + matrix_bytes(&w->wup) + matrix_bytes(&w->wdown);
    }
    return b;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: test/bench MODEL forward|prefill|generate|train T [threads]\n");
        return 1;
    }
    const char *what = argv[2];
    int T = atoi(argv[3]);
    threads_init(argc > 4 ? atoi(argv[4]) : 0);
    Model m;
    Err e;
    if (model_load(&m, argv[1], -1, &e) != 0) {
        fprintf(stderr, "bench: %s\n", e.msg);
        return 1;
    }
    // as sft generate and sft chat load it (training and evaluation keep the file's mapping)
    if (strcmp(what, "prefill") == 0 || strcmp(what, "generate") == 0) model_hugepages(&m);
    double sec;
    int tokens = T;
    if (strcmp(what, "forward") == 0) sec = bench_forward(&m, T, 2);
    else if (strcmp(what, "prefill") == 0) sec = bench_prefill(&m, T, 3);
    else if (strcmp(what, "generate") == 0) sec = bench_generate(&m, T);
    else if (strcmp(what, "train") == 0) sec = bench_train(&m, T, 3);
    else {
        fprintf(stderr, "bench: unknown figure '%s'\n", what);
        return 1;
    }
    printf("{\"what\": \"%s\", \"T\": %d, \"threads\": %d, \"tokens_per_s\": %.1f, \"seconds\": %.3f, \"peak_rss_mb\": %.0f",
           what, T, threads_count(), tokens / sec, sec, peak_rss_mb());
    if (strcmp(what, "prefill") == 0) printf(", \"gflop_s\": %.1f", 2 * token_macs(&m) * tokens / sec * 1e-9);
    if (strcmp(what, "generate") == 0) printf(", \"weights_gb_s\": %.1f", token_weight_bytes(&m) * tokens / sec * 1e-9);
    printf("}\n");
    model_free(&m);
    threads_free();
    return 0;
}
