// optim.h: what turns gradients into a step: AdamW, the learning-rate schedules and gradient
// clipping, with PyTorch's and Hugging Face's arithmetic (torch.optim.AdamW,
// torch.nn.utils.clip_grad_norm_, transformers' get_{linear,cosine,constant}_schedule_with_warmup).
//
// It works on flat float arrays (Lora.params / Lora.grads of lora.h) and knows nothing of the
// model. The training loop that calls it is train_step in train.c.
#ifndef OPTIM_H
#define OPTIM_H

#include <stddef.h>

// AdamW with decoupled weight decay. m and v are allocated once (adamw_init) and saved in
// checkpoints; t is the number of steps taken so far.
typedef struct {
    double beta1, beta2, eps; // 0.9, 0.999, 1e-8 (doubles, as PyTorch's Python floats)
    double weight_decay;      // p -= lr * weight_decay * p, applied with each update
    float *m;                 // [n] first moment (exp_avg)
    float *v;                 // [n] second moment (exp_avg_sq)
    size_t n;
    long t;                   // steps taken
} AdamW;

void adamw_init(AdamW *opt, size_t n, double beta1, double beta2, double eps, double weight_decay);
void adamw_free(AdamW *opt);

// One step at learning rate lr (torch.optim.AdamW, foreach=False):
//   t += 1
//   p  *= 1 - lr * wd
//   m   = beta1 m + (1 - beta1) g          v = beta2 v + (1 - beta2) g^2
//   p  -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// params[n], grads[n].
void adamw_step(AdamW *opt, float *params, const float *grads, float lr);

typedef enum { SCHEDULE_LINEAR, SCHEDULE_COSINE, SCHEDULE_CONSTANT } Schedule;

// "linear" / "cosine" / "constant" to a Schedule, or -1.
int schedule_from_name(const char *name);
const char *schedule_name(Schedule s);

// Learning rate of optimizer step `step` (0-based: the first step is 0) of `total` steps, as
// Hugging Face's schedulers give it: linear warmup from 0 over `warmup` steps, then
//   linear:   peak * (total - step) / (total - warmup), down to 0
//   cosine:   peak * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))
//   constant: peak
// (With warmup > 0 the first step runs at lr 0, as in transformers.)
float lr_at(Schedule s, float peak, long step, long warmup, long total);

// Warmup steps for --warmup-ratio: ceil(ratio * total), as transformers computes them.
long warmup_from_ratio(double ratio, long total);

// The L2 norm of g[n], summed in double in index order (the same whatever the thread count).
double grad_norm(const float *g, size_t n);

// torch.nn.utils.clip_grad_norm_: when norm > max_norm, scales g[n] by max_norm / (norm + 1e-6).
// norm is the value grad_norm returned; max_norm <= 0 turns clipping off.
void clip_grad_norm(float *g, size_t n, double norm, float max_norm);

#endif
