// optim.c: AdamW, learning-rate schedules and global gradient-norm clipping (see optim.h).
//
// Plain loops: the adapter has a few million parameters at most, so the step costs next to
// nothing beside the forward and backward passes. AdamW updates each parameter on its own, so it
// runs on the thread pool without its results depending on --threads; sums (the gradient norm)
// run in a fixed order on one thread. Read train.c's training loop next.
#include "optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "threads.h"

void adamw_init(AdamW *opt, size_t n, double beta1, double beta2, double eps, double weight_decay) {
    opt->beta1 = beta1;
    opt->beta2 = beta2;
    opt->eps = eps;
    opt->weight_decay = weight_decay;
    opt->m = xcalloc(n, sizeof(float));
    opt->v = xcalloc(n, sizeof(float));
    opt->n = n;
    opt->t = 0;
}

void adamw_free(AdamW *opt) {
    free(opt->m);
    free(opt->v);
    memset(opt, 0, sizeof *opt);
}

// params[n] are updated in place from grads[n]; the scalars follow PyTorch (Python floats, i.e.
// double), the per-element arithmetic is float as in a float32 tensor.
// The constants of one step, and the arrays it updates.
typedef struct {
    AdamW *opt;
    float *params;
    const float *grads;
    size_t base;                 // parameters base + [0, n) in this call (parallel_for counts in int)
    float decay, step_size, bc2_sqrt, b2, eps, one_b1, one_b2;
} AdamWStep;

static void adamw_range(void *ctx, int start, int end) {
    const AdamWStep *s = ctx;
    float *m_ = s->opt->m, *v_ = s->opt->v;
    for (size_t i = s->base + (size_t)start; i < s->base + (size_t)end; i++) {
        float g = s->grads[i];
        float p = s->params[i] * s->decay;
        float m = m_[i] + s->one_b1 * (g - m_[i]);
        float v = v_[i] * s->b2 + s->one_b2 * g * g;
        float denom = sqrtf(v) / s->bc2_sqrt + s->eps;
        s->params[i] = p - s->step_size * (m / denom);
        m_[i] = m;
        v_[i] = v;
    }
}

void adamw_step(AdamW *opt, float *params, const float *grads, float lr) {
    double t0 = trace_start();
    opt->t += 1;
    double bc1 = 1.0 - pow(opt->beta1, (double)opt->t);
    double bc2 = 1.0 - pow(opt->beta2, (double)opt->t);
    AdamWStep s = {.opt = opt, .params = params, .grads = grads};
    s.decay = (float)(1.0 - (double)lr * opt->weight_decay);
    s.step_size = (float)((double)lr / bc1);
    s.bc2_sqrt = (float)sqrt(bc2);
    s.b2 = (float)opt->beta2, s.eps = (float)opt->eps;
    s.one_b1 = (float)(1.0 - opt->beta1), s.one_b2 = (float)(1.0 - opt->beta2);
    size_t block = (size_t)1 << 30;
    for (s.base = 0; s.base < opt->n; s.base += block)
        parallel_for(adamw_range, &s, (int)(opt->n - s.base < block ? opt->n - s.base : block), 64);
    trace_op(t0, "adamw_step", "params[%zu], m, v <- grads[%zu], lr %g, step %ld", opt->n, opt->n, lr, (long)opt->t);
}

int schedule_from_name(const char *name) {
    if (strcmp(name, "linear") == 0) return SCHEDULE_LINEAR;
    if (strcmp(name, "cosine") == 0) return SCHEDULE_COSINE;
    if (strcmp(name, "constant") == 0) return SCHEDULE_CONSTANT;
    return -1;
}

const char *schedule_name(Schedule s) {
    return s == SCHEDULE_LINEAR ? "linear" : s == SCHEDULE_COSINE ? "cosine" : "constant";
}

// The factor transformers' lr_lambda returns; the lr is peak times it.
static double schedule_factor(Schedule s, long step, long warmup, long total) {
    if (step < warmup) return (double)step / (double)(warmup > 1 ? warmup : 1);
    if (s == SCHEDULE_CONSTANT) return 1.0;
    long span = total - warmup > 1 ? total - warmup : 1;
    if (s == SCHEDULE_LINEAR) {
        double f = (double)(total - step) / (double)span;
        return f > 0 ? f : 0;
    }
    double progress = (double)(step - warmup) / (double)span;
    double f = 0.5 * (1.0 + cos(3.14159265358979323846 * progress));
    return f > 0 ? f : 0;
}

float lr_at(Schedule s, float peak, long step, long warmup, long total) {
    return (float)((double)peak * schedule_factor(s, step, warmup, total));
}

long warmup_from_ratio(double ratio, long total) {
    return (long)ceil(ratio * (double)total);
}

double grad_norm(const float *g, size_t n) {
    double sum = 0;
    for (size_t i = 0; i < n; i++) sum += (double)g[i] * (double)g[i];
    return sqrt(sum);
}

void clip_grad_norm(float *g, size_t n, double norm, float max_norm) {
    if (max_norm <= 0) return;
    double coef = (double)max_norm / (norm + 1e-6);
    if (!(coef < 1.0)) return;
    float c = (float)coef;
    for (size_t i = 0; i < n; i++) g[i] *= c;
}
