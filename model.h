// model.h: the Qwen2 transformer (Qwen2ForCausalLM) over frozen, possibly quantized weights.
//
// Dimension letters, used in every shape comment of the project:
//   B  examples in a batch          T   tokens in a sequence       C  hidden size (896)
//   V  vocabulary rows (151936)     L   layers (24)                NH query heads (14)
//   NKV key/value heads (2)         HS  head size (64)             FF MLP size (4864)
//   R  LoRA rank (8)
// Shapes are row-major: [T, C] means T rows of C floats.
//
// Files: modelfile.c reads and writes model files into a Model (GGUF via gguf.c, Hugging Face
// directories via safetensors.c); model.c computes the forward and backward passes.
#ifndef MODEL_H
#define MODEL_H

#include <signal.h>
#include <stdint.h>
#include "common.h"
#include "quant.h"
#include "tokenizer.h"

typedef struct {
    int C;              // hidden size
    int L;              // layers
    int NH;             // query heads
    int NKV;            // key/value heads (grouped-query attention: NH % NKV == 0)
    int HS;             // head size, C / NH
    int FF;             // MLP intermediate size
    int V;              // vocabulary rows of the embedding / lm_head
    int max_seq;        // context length (max_position_embeddings)
    float rope_theta;   // 1e6 for Qwen2.5
    float rms_eps;      // 1e-6
    int tied;           // 1 when lm_head is the token embedding
} Config;

typedef struct {
    QMatrix wq;          // [NH*HS, C]
    QMatrix wk;          // [NKV*HS, C]
    QMatrix wv;          // [NKV*HS, C]
    QMatrix wo;          // [C, NH*HS]
    QMatrix wgate;       // [FF, C]
    QMatrix wup;         // [FF, C]
    QMatrix wdown;       // [C, FF]
    float *bq;           // [NH*HS]
    float *bk;           // [NKV*HS]
    float *bv;           // [NKV*HS]
    float *attn_norm;    // [C]
    float *ffn_norm;     // [C]
} LayerWeights;

// Frozen weights. Matrices keep their stored (or --quant) type; norms and biases are F32.
typedef struct {
    QMatrix embed;        // [V, C] token_embd / model.embed_tokens
    QMatrix lm_head;      // [V, C] output / lm_head; a copy of embed's descriptor when tied
    float *out_norm;      // [C]
    LayerWeights *layers; // [L]
} Weights;

// Sampling defaults (generation_config.json, else Qwen2.5-Instruct's).
typedef struct {
    float temperature, top_p, repetition_penalty;
    int top_k;
} GenDefaults;

typedef struct ModelStorage ModelStorage;  // mappings and buffers behind the weights (modelfile.c)

typedef struct {
    char *path;           // as given on the command line
    char *arch;           // "qwen2"
    char *hf_id;          // the Hugging Face id the model names for itself, or NULL: config.json's
                          // "_name_or_path", or a GGUF's general.source.huggingface.repository,
                          // general.source.repo_url, general.repo_url, general.source.url or general.url,
                          // when it is "org/name" or https://huggingface.co/org/name
    Config config;
    Weights w;
    Tokenizer tok;
    GenDefaults gen;
    ModelStorage *storage;
} Model;

// Loads a GGUF file or a Hugging Face model directory and validates everything: structure,
// hyperparameters, tensor names, shapes and types, and the tokenizer. quant < 0 keeps the stored
// types of a GGUF file (and means q4_0 for safetensors); otherwise matrices are converted to it.
int model_load(Model *m, const char *path, int quant, Err *e);
void model_free(Model *m);
// Moves the matrices that point into a GGUF file into a copy of it in 2 MB pages (Linux's
// transparent huge pages; elsewhere, or when refused, nothing changes) and closes the file. For
// generation (sft generate, sft chat), which streams every weight once per token: from the
// file's 4 KB pages it ran 8-20% slower on Qwen2.5-0.5B (Q4_0, Q4_K_M, Q8_0; 2026-12-07). The
// file's pages leave the process as they are copied (peak memory unchanged); the copy took no
// time in the median of 10 loads, and ~0.3 s in one of them (the kernel compacting memory).
void model_hugepages(Model *m);

// Loads only the tokenizer of a tokenizer.json, a model directory or a GGUF file (sft tokenize,
// sft init --tokenizer). Validates it as model_load does.
int model_load_tokenizer(Tokenizer *tok, const char *path, Err *e);

// ---------------------------------------------------------------------------------------------
// Compute (model.c). Training and evaluation run whole sequences; generation runs with a KV cache.
struct Lora;

// Everything the forward pass saves for the backward pass, for sequences of up to max_T tokens,
// sized for the adapter's rank and dropout. Allocated once; no allocation happens inside forward
// or backward. A forward pass alone (backward = 0) touches only one layer's share of it.
typedef struct Activations Activations;
Activations *activations_new(const Config *c, const struct Lora *lora, int max_T);
void activations_free(Activations *a);
int activations_max_T(const Activations *a);  // the tokens a pass may have
// Tokens at the start of every sequence of the last pass on a that ran once for them all (the
// prefix they share: a chat template's system prompt; SFT_NO_SHARED_PREFIX=1 turns it off)
int activations_shared(const Activations *a);
// The same with a memory budget in bytes (activations_new: 512 MiB). The MLP's gate and up of every
// layer are kept in floats when they fit it, else in bf16 (half the bytes; the backward pass then
// takes them rounded, the loss is unchanged); layers whose gate/up do not fit even so recompute
// gate_proj and up_proj in the backward pass.
Activations *activations_new_budget(const Config *c, const struct Lora *lora, int max_T, size_t budget);
// The same with the layout given: layers 0..ff_layers-1 keep their gate/up (in bf16 with ff_bf16),
// the others recompute them (activations_new_budget picks it; the tests name each).
Activations *activations_new_layout(const Config *c, const struct Lora *lora, int max_T, int ff_layers, int ff_bf16);
typedef struct {
    size_t bytes;   // of the arrays
    int ff_layers;  // layers that keep their gate/up; the others recompute them
    int ff_bf16;    // 1: kept in bf16
} ActivationsMemory;
ActivationsMemory activations_memory(const Activations *a);
// Passes on a then read *stop before each layer (forward and backward) and each chunk of the loss,
// and return NAN at once when it is set: a signal stops a step within a fraction of a second. The
// gradients of such a pass are partial; the caller drops them. stop NULL: never stop (the default).
void activations_watch(Activations *a, const volatile sig_atomic_t *stop);

// Runs tokens[T] through the model (with the adapter when lora is not NULL) and returns the sum
// of the negative log-likelihoods of the target tokens: token t (t >= 1) is a target when
// mask[t] = 1, predicted from position t - 1 (mask[0] is ignored).
// With backward = 1, also accumulates into lora->grads the gradient of grad_scale * (that sum)
// (the caller zeroes the grads and sets grad_scale = 1 / target tokens of the optimizer step).
// dropout_seed = 0 means no dropout; otherwise LoRA dropout masks come from
// rng_hash_uniform(dropout_seed, ...), so they do not depend on the thread count.
// Only positions up to the last target run (later ones cannot change the loss).
// Returns NAN, computing nothing, for a token id outside [0, V), T > max_T, or an adapter whose
// rank or dropout (> 0 needs room for masks) differs from the one a was made for.
double model_forward_backward(Model *m, struct Lora *lora, Activations *a, const int *tokens,
                              const unsigned char *mask, int T, float grad_scale, int backward,
                              uint64_t dropout_seed);

// The same for B sequences at once, the sum over all of them: their tokens (each cut after its last
// target) stacked into one pass of sum T tokens <= max_T, every matrix product over all rows, each
// sequence attending only to itself (positions from 0). The prefix that they all start with runs
// once (activations_shared). Results equal the sum of B single calls up to float rounding; the
// dropout masks are those of one sequence of the stacked tokens, the prefix's drawn once for all.
typedef struct {
    const int *tokens;           // [T]
    const unsigned char *mask;   // [T] mask[t] = 1: token t is a target (mask[0] ignored)
    int T;
} Sequence;
double model_forward_backward_batch(Model *m, struct Lora *lora, Activations *a, const Sequence *seqs, int B,
                                    float grad_scale, int backward, uint64_t dropout_seed);

// Keys and values of the tokens seen so far, for generation.
typedef struct KVCache KVCache;
KVCache *kvcache_new(const Config *c, int max_T);
void kvcache_free(KVCache *kv);
void kvcache_reset(KVCache *kv);   // forget every token
int kvcache_len(const KVCache *kv);
// exact = 1: the passes through this cache take training's products (exact weights, 14/16-bit
// activations), not inference's 8-bit activations (quant.h: matmul_inference), for logits that
// are checked against a reference (sft eval --logits). Off by a new cache.
void kvcache_exact(KVCache *kv, int exact);

// Runs tokens[n] at the positions after those already in the cache (a prompt when n > 1, one new
// token when n = 1), appends their keys and values, and writes the last token's logits[V]
// (logits may be NULL: only the cache is filled). Returns -1, changing nothing, when the cache
// would overflow its max_T, or for a token id outside [0, V) or an adapter of another model.
int model_infer(Model *m, const struct Lora *lora, KVCache *kv, const int *tokens, int n, float *logits);

// The kernels of model.c, public for the finite-difference tests (test/test_model.c).
// Shapes use the letters above; backward kernels accumulate (+=).
// out[T, C], rstd[T] <- inp[T, C], w[C]:  out = inp / sqrt(mean(inp^2) + eps) * w
void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int T, int C, float eps);
void rmsnorm_backward(float *dinp, const float *dout, const float *inp, const float *rstd, const float *w, int T, int C);
// cos, sin [max_T, HS/2]; x[T, H*HS] rotated in place at positions pos0.. (pairs j, j + HS/2)
void rope_tables(float *cos_t, float *sin_t, int max_T, int HS, float theta);
void rope_forward(float *x, const float *cos_t, const float *sin_t, int T, int pos0, int H, int HS);
void rope_backward(float *dx, const float *cos_t, const float *sin_t, int T, int pos0, int H, int HS);
// (attention: attention.h)
// h[n] = silu(gate) * up;  dgate[n], dup[n] +=
void swiglu_forward(float *h, const float *gate, const float *up, int n);
void swiglu_backward(float *dgate, float *dup, const float *dh, const float *gate, const float *up, int n);
// Returns the sum of row_loss[n] = logsumexp(logits[r]) - logits[r, targets[r]] over logits[n, V];
// logits is overwritten: with backward, by grad_scale * (softmax - onehot(target)).
// crossentropy_ref is the textbook version (the reference build runs it), crossentropy the one that runs.
double crossentropy(float *logits, double *row_loss, const int *targets, int n, int V, float grad_scale, int backward);
double crossentropy_ref(float *logits, double *row_loss, const int *targets, int n, int V, float grad_scale,
                        int backward);

#endif
