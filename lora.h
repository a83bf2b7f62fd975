// lora.h: low-rank adapters on the seven projections of each layer, in Hugging Face PEFT's format.
//
// A target linear layer computes y = W x + b + (alpha / R) * B (A dropout(x)),
// with A [R, in] and B [out, R], F32, trainable; W and b frozen.
#ifndef LORA_H
#define LORA_H

#include <stdint.h>
#include "common.h"
#include "model.h"

enum { LORA_Q, LORA_K, LORA_V, LORA_O, LORA_GATE, LORA_UP, LORA_DOWN, LORA_NTARGETS };

#define LORA_MAX_R 4096   // the largest rank an adapter file may have

// Which projections of which layers an adapter has, with their ranks and alphas: what a PEFT
// adapter_config.json or a GGUF adapter's tensors say, before any tensor is read.
typedef struct {
    int L;
    int *rank;           // [L * LORA_NTARGETS]: 0 when that projection is not adapted
    float *alpha;        // [L * LORA_NTARGETS]
    float lora_alpha;    // the default alpha (PEFT's lora_alpha)
    float dropout;
    int rslora;
} LoraShape;

// "q_proj", "k_proj", ... indexed by LORA_Q ... LORA_DOWN.
extern const char *const lora_target_names[LORA_NTARGETS];

typedef struct {
    float *A;    // [r, in]  (NULL when this projection is not adapted); points into Lora.params
    float *B;    // [out, r]
    float *dA;   // [r, in]  points into Lora.grads
    float *dB;   // [out, r]
    int in, out;
    int r;       // this projection's rank: Lora.R, or less with PEFT's rank_pattern / a GGUF adapter
    float alpha; // this projection's lora_alpha: Lora.alpha, or another with PEFT's alpha_pattern
} LoraPair;

// An adapter as its file says it: each pair with its own rank and alpha (model.c applies each
// pair's rank and lora_scale).
typedef struct Lora {
    int R;                // rank: the largest rank of any pair
    float alpha;          // lora_alpha
    float dropout;        // lora_dropout, used only while training
    int rslora;           // use_rslora: a pair is scaled by alpha / sqrt(r) instead of alpha / r
    unsigned targets;     // bit LORA_Q ... LORA_DOWN set for each projection adapted in some layer
    int L;                // layers
    LoraPair *pairs;      // [L * LORA_NTARGETS], pairs[l * LORA_NTARGETS + LORA_Q] ...
    float *params;        // [n_params]: every A and B, layer by layer, target by target, A then B
    float *grads;         // [n_params]: same layout
    size_t n_params;
    char *base_model;     // base_model_name_or_path written to adapter_config.json
} Lora;

// The scale of a pair's update: alpha / r, or alpha / sqrt(r) with rsLoRA (float32 of the
// double quotient, as PEFT's Python float meets a float32 tensor).
float lora_scale(const Lora *lora, const LoraPair *p);

// One adapted projection during a pass of model.c: where it keeps its LoRA state.
typedef struct {
    const LoraPair *pair;  // NULL: no adapter on this projection
    float *u;              // [T, R] A dropout(x), saved for the backward pass
    float *du;             // [T, R] scratch of the backward pass
    float *xdrop;          // [T, in] scratch for dropout(x) when p > 0
    float *bt;             // [R, out] scratch: B^T, then dB^T in the backward pass
    uint32_t *keep;        // [T, (in + 31) / 32] dropout masks, bit set = kept (when p > 0):
                           // lora_forward draws them, lora_backward reads them
    float scale;           // lora_scale of the pair: alpha / r (rsLoRA: alpha / sqrt(r))
    int R;                 // the pair's rank r
    float p;               // dropout probability; 0 outside training
    uint64_t seed;         // dropout masks: rng_hash_uniform(seed, site, t, i)
    uint64_t site;         // l * LORA_NTARGETS + target
} LoraSite;

// The LoRA kernels (lora.c), called by model.c. With s->p > 0, input i of token t is kept
// when rng_hash_uniform(s->seed, s->site, t, i) >= p.
// y[T, out] += scale B (u[T, R] = A dropout(x[T, in]))
void lora_forward(float *y, const LoraSite *s, const float *x, int T, int in, int out);
// dA, dB of s->pair +=, dx[T, in] += (when not NULL) <- dy[T, out], x[T, in], s->u
void lora_backward(float *dx, const LoraSite *s, const float *dy, const float *x, int T, int in, int out);

// Parses "q_proj,v_proj" into a target bit set; -1 with e filled for an unknown name.
int lora_parse_targets(unsigned *targets, const char *list, Err *e);

// Allocates an adapter for the model and initializes it as PEFT does: A ~ U(-1/sqrt(in), 1/sqrt(in))
// (Kaiming-uniform, a = sqrt(5)), B = 0, from the given seed.
void lora_init(Lora *lora, const Config *c, int R, float alpha, float dropout, unsigned targets,
               uint64_t seed);
void lora_free(Lora *lora);
void lora_zero_grad(Lora *lora);

// Allocates an adapter of that shape (zeroed).
void lora_alloc(Lora *lora, const Config *c, const LoraShape *s);

// Loads an adapter: a PEFT directory (DIR/adapter_config.json + DIR/adapter_model.safetensors,
// ours or PEFT's, in the variants lora_read_peft_config accepts) or a llama.cpp LoRA GGUF file.
// Checks that every tensor fits the model; NaN/Inf values and tensors matching no layer are errors.
int lora_load(Lora *lora, const char *path, const Config *c, Err *e);

// Reads a PEFT adapter_config.json into s, applying PEFT's own rules to the model's module names
// (model.layers.{l}.self_attn.q_proj, ...): target_modules (names, name suffixes, "all-linear",
// a regular expression), exclude_modules, layers_to_transform / layers_pattern, rank_pattern,
// alpha_pattern, use_rslora. Refused with the reason: DoRA, LoRA biases, modules_to_save,
// targets outside the seven projections, patterns this matcher cannot evaluate, other PEFT types.
// base_model: base_model_name_or_path (malloc'ed, "" when absent).
int lora_read_peft_config(LoraShape *s, char **base_model, const char *path, const Config *c, Err *e);
void lora_shape_free(LoraShape *s);

// 1 when both adapters have the same pairs, ranks, alphas and scaling (a checkpoint's check).
int lora_same_shape(const Lora *a, const Lora *b);

// Writes DIR/adapter_config.json and DIR/adapter_model.safetensors, each atomically (temp file,
// fsync, rename), and the pair so that a crash never leaves one old file beside one new (lora.c
// says how: DIR may then hold one file alone, which lora_load refuses). lora_save_grads writes the gradients, under the same tensor names,
// into the one safetensors file `path` (sft grads).
// adapter_config.json says r and lora_alpha (the most common ones), rank_pattern / alpha_pattern
// for pairs that differ, and target_modules (+ layers_to_transform) naming exactly the pairs.
int lora_save(const Lora *lora, const char *dir, Err *e);
int lora_save_grads(const Lora *lora, const char *path, Err *e);

// llama.cpp's LoRA adapter GGUF (lora_gguf.c), as convert_lora_to_gguf.py writes it:
// general.architecture "qwen2", general.type "adapter", adapter.type "lora", adapter.lora.alpha,
// and per pair blk.{l}.{attn_q,...}.weight.lora_a (GGUF dims [in, r]) and .lora_b ([r, out]).
// llama.cpp scales every pair by alpha / r (r from the tensor; alpha 0 means scale 1): a pair whose
// scale differs (rsLoRA with mixed ranks, alpha_pattern) is written with B times the ratio.
// type: TYPE_F32, TYPE_F16, TYPE_BF16 or TYPE_Q8_0 (Q8_0 where rows are whole blocks, else F16,
// as the converter does). name: general.name. Written atomically.
int lora_save_gguf(const Lora *lora, const char *path, int type, const char *name, Err *e);
// 1 when path is a file that starts with the GGUF magic.
int lora_is_gguf(const char *path);
int lora_load_gguf(Lora *lora, const char *path, const Config *c, Err *e);

#endif
