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

// "q_proj", "k_proj", ... indexed by LORA_Q ... LORA_DOWN.
extern const char *const lora_target_names[LORA_NTARGETS];

typedef struct {
    float *A;    // [R, in]  (NULL when this projection is not a target); points into Lora.params
    float *B;    // [out, R]
    float *dA;   // [R, in]  points into Lora.grads
    float *dB;   // [out, R]
    int in, out;
} LoraPair;

typedef struct Lora {
    int R;                // rank
    float alpha;          // lora_alpha; the update is scaled by alpha / R
    float dropout;        // lora_dropout, used only while training
    unsigned targets;     // bit LORA_Q ... LORA_DOWN set for each target projection
    int L;                // layers
    LoraPair *pairs;      // [L * LORA_NTARGETS], pairs[l * LORA_NTARGETS + LORA_Q] ...
    float *params;        // [n_params]: every A and B, layer by layer, target by target, A then B
    float *grads;         // [n_params]: same layout
    size_t n_params;
    char *base_model;     // base_model_name_or_path written to adapter_config.json
} Lora;

// One adapted projection during a pass of model.c: where it keeps its LoRA state.
typedef struct {
    const LoraPair *pair;  // NULL: no adapter on this projection
    float *u;              // [T, R] A dropout(x), saved for the backward pass
    float *du;             // [T, R] scratch of the backward pass
    float *xdrop;          // [T, in] scratch for dropout(x) when p > 0
    float *bt;             // [R, out] scratch: B^T, then dB^T in the backward pass
    uint32_t *keep;        // [T, (in + 31) / 32] dropout masks, bit set = kept (when p > 0):
                           // lora_forward draws them, lora_backward reads them
    float scale;           // alpha / R
    int R;
    float p;               // dropout probability; 0 outside training
    uint64_t seed;         // dropout masks: rng_hash_uniform(seed, site, t, i)
    uint64_t site;         // l * LORA_NTARGETS + target
} LoraSite;

// The LoRA kernels (model.c), public for the tests. With s->p > 0, input i of token t is kept
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

// Loads DIR/adapter_config.json + DIR/adapter_model.safetensors (ours or PEFT's). Checks that
// rank, targets and shapes fit the model; NaN/Inf values and tensors matching no layer are errors.
int lora_load(Lora *lora, const char *dir, const Config *c, Err *e);

// Writes DIR/adapter_config.json and DIR/adapter_model.safetensors atomically
// (temp file, fsync, rename). lora_save_grads writes the gradients, under the same tensor names,
// into the one safetensors file `path` (sft grads).
int lora_save(const Lora *lora, const char *dir, Err *e);
int lora_save_grads(const Lora *lora, const char *path, Err *e);

#endif
