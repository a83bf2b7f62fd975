// test_optim.c: AdamW, the learning-rate schedules and clipping against values computed by hand
// (and in Python with the textbook form m_hat / (sqrt(v_hat) + eps)), not through optim.c.
#include <math.h>
#include <stdio.h>

#include "../optim.h"
#include "test.h"

// Two AdamW steps on two parameters, lr 0.1, weight decay 0.01. Expected values from Python:
//   p = p * (1 - lr*wd); m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2
//   p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
static void test_adamw_two_steps(void) {
    AdamW opt;
    adamw_init(&opt, 2, 0.9, 0.999, 1e-8, 0.01);
    float p[2] = {1.0f, -2.0f};
    float g1[2] = {0.5f, 1e-3f}, g2[2] = {-0.25f, 3e-3f};
    adamw_step(&opt, p, g1, 0.1f);
    // step 1: bias correction makes the update lr * g / (|g| + eps): 0.999 - 0.1 * 0.99999998
    float want1[2] = {0.899000002f, -2.0979990000099997f};
    check_close("adamw step 1 (bias correction, weight decay)", p, want1, 2, 1e-6, 1e-6);
    adamw_step(&opt, p, g2, 0.1f);
    float want2[2] = {0.8714672987058463f, -2.1876787025477658f};
    check_close("adamw step 2", p, want2, 2, 2e-6, 1e-6);
    float want_m[2] = {0.02f, 0.9f * 1e-4f + 3e-4f};
    float want_v[2] = {0.00031225f, 0.999f * 1e-9f + 9e-9f};
    check_close("adamw moments", opt.m, want_m, 2, 1e-12, 1e-6);
    check_close("adamw second moments", opt.v, want_v, 2, 1e-15, 1e-6);
    check(opt.t == 2, "adamw step count", "t = %ld", opt.t);
    adamw_free(&opt);
}

// Weight decay alone: zero gradient, so m = v = 0 and the step is p * (1 - lr*wd) exactly
// (0 / (0 + eps) = 0). Weight decay is decoupled: it does not go through m and v.
static void test_adamw_decoupled_decay(void) {
    AdamW opt;
    adamw_init(&opt, 3, 0.9, 0.999, 1e-8, 0.5);
    float p[3] = {2.0f, -4.0f, 0.0f}, g[3] = {0, 0, 0};
    adamw_step(&opt, p, g, 0.1f);
    float want[3] = {1.9f, -3.8f, 0.0f};
    check_close("adamw decoupled weight decay", p, want, 3, 1e-7, 0);
    adamw_free(&opt);
}

// transformers' schedules at known steps (lr_lambda values times the peak 1.0).
static void test_schedules(void) {
    struct { Schedule s; long step, warmup, total; double want; const char *what; } cases[] = {
        {SCHEDULE_LINEAR, 0, 2, 10, 0.0, "linear warmup step 0"},
        {SCHEDULE_LINEAR, 1, 2, 10, 0.5, "linear warmup step 1"},
        {SCHEDULE_LINEAR, 2, 2, 10, 1.0, "linear peak after warmup"},
        {SCHEDULE_LINEAR, 6, 2, 10, 0.5, "linear halfway down"},
        {SCHEDULE_LINEAR, 9, 2, 10, 0.125, "linear last step"},
        {SCHEDULE_LINEAR, 0, 0, 4, 1.0, "linear no warmup first step"},
        {SCHEDULE_LINEAR, 3, 0, 4, 0.25, "linear no warmup last step"},
        {SCHEDULE_COSINE, 0, 0, 10, 1.0, "cosine start"},
        {SCHEDULE_COSINE, 5, 0, 10, 0.5, "cosine middle"},
        {SCHEDULE_COSINE, 6, 2, 10, 0.5, "cosine middle after warmup"},
        {SCHEDULE_COSINE, 1, 2, 10, 0.5, "cosine warmup"},
        {SCHEDULE_COSINE, 4, 0, 8, 0.5, "cosine quarter: 0.5 (1 + cos(pi/2))"},
        {SCHEDULE_COSINE, 2, 0, 8, 0.5 * (1 + 0.70710678118654752), "cosine eighth"},
        {SCHEDULE_CONSTANT, 1, 4, 10, 0.25, "constant warmup"},
        {SCHEDULE_CONSTANT, 4, 4, 10, 1.0, "constant after warmup"},
        {SCHEDULE_CONSTANT, 9, 0, 10, 1.0, "constant last step"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        float got = lr_at(cases[i].s, 1.0f, cases[i].step, cases[i].warmup, cases[i].total);
        float want = (float)cases[i].want;
        check_close(cases[i].what, &got, &want, 1, 1e-7, 0);
    }
    float got = lr_at(SCHEDULE_LINEAR, 2e-4f, 6, 2, 10), want = 1e-4f;
    check_close("linear scales the peak", &got, &want, 1, 0, 1e-6);
    check(warmup_from_ratio(0.1, 25) == 3, "warmup ratio rounds up", "%ld", warmup_from_ratio(0.1, 25));
    check(warmup_from_ratio(0.0, 25) == 0, "warmup ratio 0", "%ld", warmup_from_ratio(0.0, 25));
    check(schedule_from_name("cosine") == SCHEDULE_COSINE && schedule_from_name("warm") == -1,
          "schedule names", "cosine -> %d", schedule_from_name("cosine"));
}

static void test_clipping(void) {
    float g[2] = {3.0f, 4.0f};
    double norm = grad_norm(g, 2);
    check(fabs(norm - 5.0) < 1e-12, "grad norm of (3, 4)", "got %.17g", norm);
    clip_grad_norm(g, 2, norm, 1.0f);
    float want[2] = {0.6f, 0.8f};  // times 5 / (5 + 1e-6): differs from 0.6 in the 7th digit
    check_close("clip to norm 1", g, want, 2, 2e-7, 0);
    float h[2] = {3.0f, 4.0f}, same[2] = {3.0f, 4.0f};
    clip_grad_norm(h, 2, 5.0, 10.0f);
    check_close("no clipping below the limit", h, same, 2, 0, 0);
    clip_grad_norm(h, 2, 5.0, 0.0f);
    check_close("max norm 0 turns clipping off", h, same, 2, 0, 0);
}

void test_optim(void) {
    test_adamw_two_steps();
    test_adamw_decoupled_decay();
    test_schedules();
    test_clipping();
}
