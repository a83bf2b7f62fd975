// model.c: the Qwen2 forward and backward passes with LoRA adapters, and inference with a KV cache.
//
// Training runs a batch of sequences at a time (model_forward_backward_batch), their rows stacked
// into one [T, ...] array for every matrix product, each attending only to itself and to the prefix
// that they all share (a chat template's system prompt: it runs once): the forward pass saves
// what the backward pass needs in one Activations struct; logits and the loss are computed
// only at positions whose next token is a target, a few positions at a time; the backward pass
// runs back to the LoRA matrices only (frozen weights get neither gradient nor storage).
// Generation (model_infer) runs the same block_forward against a KVCache.
// Left out: the products over quantized weights (quant.c), loading (modelfile.c), the adapter's
// storage and files (lora.c). Read model_forward_backward, then block_forward / block_backward.
#include "model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "lora.h"
#include "threads.h"
#include "vec.h"

// Products are rounded as written (no fused multiply-add), as in quant.c, so that results do not
// depend on the compiler; gcc's -std=c11 already means that.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#define LOSS_CHUNK 128         // target positions whose logits [LOSS_CHUNK, V] exist at one time
#define INFER_CHUNK 256        // prompt tokens run through the model at one time in model_infer
#define ACT_BUDGET ((size_t)512 << 20)  // bytes of Activations above which layers recompute gate/up

// ---------------------------------------------------------------------------------------------
// Kernels. Each opens with its shapes; outputs first, then inputs, then dimensions.
// Backward kernels accumulate (+=) into buffers the caller has zeroed.

// x[T, C] = rows tokens[t] of the embedding
static void embed_forward(float *x, const int *tokens, const QMatrix *embed, int T) {
    double t0 = trace_start();
    for (int t = 0; t < T; t++) qmatrix_row(x + (size_t)t * embed->cols, embed, tokens[t]);
    trace_op(t0, "embed_forward", "x[%d, %d] <- tokens[%d], embed %s [%d, %d]",
             T, embed->cols, T, type_info(embed->type)->name, embed->rows, embed->cols);
}

// The RMSNorm kernels run one thread per block of rows.
typedef struct {
    float *out;                    // out, or dinp in the backward pass
    float *rstd_out;               // rstd, written by rmsnorm_forward
    const float *inp, *w, *dout, *rstd;
    int C;
    float eps;
} NormArgs;

static void rmsnorm_apply_rows(void *ctx, int start, int end) {
    const NormArgs *a = ctx;
    for (int t = start; t < end; t++) {
        const float *x = a->inp + (size_t)t * a->C;
        float *o = a->out + (size_t)t * a->C;
        for (int c = 0; c < a->C; c++) o[c] = (x[c] * a->rstd[t]) * a->w[c];
    }
}

// out[T, C] = inp[T, C] * rstd[T] * w[C]
static void rmsnorm_apply(float *out, const float *inp, const float *rstd, const float *w, int T, int C) {
    NormArgs a = {out, NULL, inp, w, NULL, rstd, C, 0};
    parallel_for(rmsnorm_apply_rows, &a, T, 1);
}

static void rmsnorm_forward_rows(void *ctx, int start, int end) {
    const NormArgs *a = ctx;
    for (int t = start; t < end; t++) {
        const float *x = a->inp + (size_t)t * a->C;
        double ss = 0;
        for (int c = 0; c < a->C; c++) ss += (double)x[c] * x[c];
        a->rstd_out[t] = (float)(1.0 / sqrt(ss / a->C + a->eps));
    }
    rmsnorm_apply_rows(ctx, start, end);
}

// out[T, C], rstd[T] = 1 / sqrt(mean(inp^2) + eps) <- inp[T, C], w[C]
void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int T, int C, float eps) {
    double t0 = trace_start();
    NormArgs a = {out, rstd, inp, w, NULL, rstd, C, eps};
    parallel_for(rmsnorm_forward_rows, &a, T, 1);
    trace_op(t0, "rmsnorm_forward", "out[%d, %d], rstd[%d] <- inp[%d, %d], w[%d]", T, C, T, T, C, C);
}

static void rmsnorm_backward_rows(void *ctx, int start, int end) {
    const NormArgs *a = ctx;
    int C = a->C;
    for (int t = start; t < end; t++) {
        const float *x = a->inp + (size_t)t * C, *dy = a->dout + (size_t)t * C, *w = a->w;
        float *dx = a->out + (size_t)t * C;
        double sum = 0;
        for (int c = 0; c < C; c++) sum += (double)dy[c] * w[c] * x[c];
        float r = a->rstd[t], k = (float)(sum * r * r * r / C);
        for (int c = 0; c < C; c++) dx[c] += r * w[c] * dy[c] - x[c] * k;
    }
}

// dinp[T, C] += <- dout[T, C], inp[T, C], rstd[T], w[C]
// y = x r w with r = (mean(x^2) + eps)^-1/2:  dx = r w dy - x r^3 / C * sum(dy w x)
void rmsnorm_backward(float *dinp, const float *dout, const float *inp, const float *rstd, const float *w, int T, int C) {
    double t0 = trace_start();
    NormArgs a = {dinp, NULL, inp, w, dout, rstd, C, 0};
    parallel_for(rmsnorm_backward_rows, &a, T, 1);
    trace_op(t0, "rmsnorm_backward", "dinp[%d, %d] += <- dout[%d, %d], inp[%d, %d]", T, C, T, C, T, C);
}

// cos, sin [max_T, HS/2] as Hugging Face computes them: inv_freq_j = theta^(-2j/HS) and the angle
// t * inv_freq_j rounded to float, as its float32 arithmetic does.
void rope_tables(float *cos_t, float *sin_t, int max_T, int HS, float theta) {
    for (int j = 0; j < HS / 2; j++) {
        float inv = (float)(1.0 / pow(theta, 2.0 * j / HS));
        for (int t = 0; t < max_T; t++) {
            float angle = (float)t * inv;
            cos_t[(size_t)t * (HS / 2) + j] = (float)cos((double)angle);
            sin_t[(size_t)t * (HS / 2) + j] = (float)sin((double)angle);
        }
    }
}

// x[T, H*HS] rotated in place at positions pos0..pos0+T-1 <- cos, sin [max_T, HS/2]
// rotate_half convention: pairs (j, j + HS/2).
void rope_forward(float *x, const float *cos_t, const float *sin_t, int T, int pos0, int H, int HS) {
    double t0 = trace_start();
    int h2 = HS / 2;
    for (int t = 0; t < T; t++) {
        const float *cs = cos_t + (size_t)(pos0 + t) * h2, *sn = sin_t + (size_t)(pos0 + t) * h2;
        for (int h = 0; h < H; h++) {
            float *v = x + ((size_t)t * H + h) * HS;
            for (int j = 0; j < h2; j++) {
                float a = v[j], b = v[j + h2];
                v[j] = a * cs[j] - b * sn[j];
                v[j + h2] = b * cs[j] + a * sn[j];
            }
        }
    }
    trace_op(t0, "rope_forward", "x[%d, %d*%d] rotated at positions %d..%d", T, H, HS, pos0, pos0 + T - 1);
}

// dx[T, H*HS] in place: the transposed rotation (positions pos0..pos0+T-1)
void rope_backward(float *dx, const float *cos_t, const float *sin_t, int T, int pos0, int H, int HS) {
    double t0 = trace_start();
    int h2 = HS / 2;
    for (int t = 0; t < T; t++) {
        const float *cs = cos_t + (size_t)(pos0 + t) * h2, *sn = sin_t + (size_t)(pos0 + t) * h2;
        for (int h = 0; h < H; h++) {
            float *d = dx + ((size_t)t * H + h) * HS;
            for (int j = 0; j < h2; j++) {
                float a = d[j], b = d[j + h2];
                d[j] = a * cs[j] + b * sn[j];
                d[j + h2] = b * cs[j] - a * sn[j];
            }
        }
    }
    trace_op(t0, "rope_backward", "dx[%d, %d*%d] rotated back", T, H, HS);
}

typedef struct {
    float *h;                      // forward: h[n] =
    float *dgate, *dup;            // backward: dgate[n], dup[n] +=
    const float *gate, *up, *dh;   // inputs (dh: backward only)
} SwigluArgs;

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_f(-x)); }

// h[LANES] = silu(g) * u: one vector on AVX-512 (gcc vectorizes a loop of fixed length, inlined)
static inline void swiglu_lanes(float *restrict h, const float *restrict g, const float *restrict u) {
    for (int k = 0; k < LANES; k++) h[k] = g[k] * sigmoid(g[k]) * u[k];
}

// h[i] = silu(gate[i]) * up[i] for i in [start, end), LANES at a time; a short end goes through
// a zero-padded copy, so that the lane function is the only loop body
static void swiglu_forward_range(void *ctx, int start, int end) {
    const SwigluArgs *a = ctx;
    int i = start;
    for (; i + LANES <= end; i += LANES) swiglu_lanes(a->h + i, a->gate + i, a->up + i);
    if (i < end) {
        float h[LANES], g[LANES] = {0}, u[LANES] = {0};
        memcpy(g, a->gate + i, (size_t)(end - i) * sizeof(float));
        memcpy(u, a->up + i, (size_t)(end - i) * sizeof(float));
        swiglu_lanes(h, g, u);
        memcpy(a->h + i, h, (size_t)(end - i) * sizeof(float));
    }
}

// h[n] = silu(gate[n]) * up[n]
void swiglu_forward(float *h, const float *gate, const float *up, int n) {
    double t0 = trace_start();
    SwigluArgs a = {.h = h, .gate = gate, .up = up};
    parallel_for(swiglu_forward_range, &a, n, LANES);
    trace_op(t0, "swiglu_forward", "h[%d] <- gate[%d], up[%d]", n, n, n);
}

// dgate[LANES], dup[LANES] += <- dh, g, u: silu(g) = g s with s = sigmoid(g),
// silu'(g) = s (1 + g (1 - s))
static inline void swiglu_backward_lanes(float *restrict dgate, float *restrict dup, const float *restrict dh,
                                         const float *restrict g, const float *restrict u) {
    for (int k = 0; k < LANES; k++) {
        float s = sigmoid(g[k]);
        dgate[k] += dh[k] * u[k] * s * (1.0f + g[k] * (1.0f - s));
        dup[k] += dh[k] * g[k] * s;
    }
}

// dgate[i], dup[i] += for i in [start, end), LANES at a time (a short end through padded copies)
static void swiglu_backward_range(void *ctx, int start, int end) {
    const SwigluArgs *a = ctx;
    int i = start;
    for (; i + LANES <= end; i += LANES)
        swiglu_backward_lanes(a->dgate + i, a->dup + i, a->dh + i, a->gate + i, a->up + i);
    if (i < end) {
        size_t bytes = (size_t)(end - i) * sizeof(float);
        float dg[LANES] = {0}, du[LANES] = {0}, dh[LANES] = {0}, g[LANES] = {0}, u[LANES] = {0};
        memcpy(dg, a->dgate + i, bytes);
        memcpy(du, a->dup + i, bytes);
        memcpy(dh, a->dh + i, bytes);
        memcpy(g, a->gate + i, bytes);
        memcpy(u, a->up + i, bytes);
        swiglu_backward_lanes(dg, du, dh, g, u);
        memcpy(a->dgate + i, dg, bytes);
        memcpy(a->dup + i, du, bytes);
    }
}

// dgate[n], dup[n] += <- dh[n], gate[n], up[n]
void swiglu_backward(float *dgate, float *dup, const float *dh, const float *gate, const float *up, int n) {
    double t0 = trace_start();
    SwigluArgs a = {.dgate = dgate, .dup = dup, .gate = gate, .up = up, .dh = dh};
    parallel_for(swiglu_backward_range, &a, n, LANES);
    trace_op(t0, "swiglu_backward", "dgate[%d], dup[%d] += <- dh[%d]", n, n, n);
}

// gate and up kept in bf16 (halving the largest activations of training, as PyTorch's autocast
// keeps them) and restored to floats for the backward pass.
typedef struct {
    const float *gate, *up;
    uint16_t *gate16, *up16;
} Bf16Keep;

typedef struct {
    float *gate, *up;
    const uint16_t *gate16, *up16;
} Bf16Restore;

static inline void bf16_lanes(uint16_t *restrict out, const float *restrict x) {
    for (int k = 0; k < LANES; k++) out[k] = fp32_to_bf16(x[k]);
}

static inline void fp32_lanes(float *restrict out, const uint16_t *restrict x) {
    for (int k = 0; k < LANES; k++) out[k] = bf16_to_fp32(x[k]);
}

// gate16[i], up16[i] = for i in [start, end), LANES at a time (vectorized) but for a short end
static void bf16_keep_range(void *ctx, int start, int end) {
    const Bf16Keep *a = ctx;
    int i = start;
    for (; i + LANES <= end; i += LANES) bf16_lanes(a->gate16 + i, a->gate + i), bf16_lanes(a->up16 + i, a->up + i);
    for (; i < end; i++) a->gate16[i] = fp32_to_bf16(a->gate[i]), a->up16[i] = fp32_to_bf16(a->up[i]);
}

static void bf16_restore_range(void *ctx, int start, int end) {
    const Bf16Restore *a = ctx;
    int i = start;
    for (; i + LANES <= end; i += LANES) fp32_lanes(a->gate + i, a->gate16 + i), fp32_lanes(a->up + i, a->up16 + i);
    for (; i < end; i++) a->gate[i] = bf16_to_fp32(a->gate16[i]), a->up[i] = bf16_to_fp32(a->up16[i]);
}

// gate16[n], up16[n] = gate, up rounded to bf16 (nearest even)
static void bf16_keep(uint16_t *gate16, uint16_t *up16, const float *gate, const float *up, int n) {
    Bf16Keep a = {gate, up, gate16, up16};
    parallel_for(bf16_keep_range, &a, n, LANES);
}

// gate[n], up[n] = gate16, up16
static void bf16_restore(float *gate, float *up, const uint16_t *gate16, const uint16_t *up16, int n) {
    Bf16Restore a = {gate, up, gate16, up16};
    parallel_for(bf16_restore_range, &a, n, LANES);
}

// out[n] += inp[n]
static void residual_add(float *out, const float *inp, size_t n) {
    double t0 = trace_start();
    for (size_t i = 0; i < n; i++) out[i] += inp[i];
    trace_op(t0, "residual_add", "out[%zu] += inp[%zu]", n, n);
}

// out[T, OUT] = inp[T, IN] W^T + bias (+ the adapter's update); at inference, the product may take
// 8-bit activations (quant.h: matmul_inference)
static void linear_forward(int infer, float *out, const float *inp, const QMatrix *W, const float *bias,
                           const LoraSite *s, int T) {
    if (infer) matmul_inference(out, inp, W, bias, T);
    else matmul(out, inp, W, bias, T);
    if (s->pair) lora_forward(out, s, inp, T, W->cols, W->rows);
}

// dinp[T, IN] += (when not NULL), adapter gradients += <- dout[T, OUT], inp[T, IN]
static void linear_backward(float *dinp, const float *dout, const float *inp, const QMatrix *W, const LoraSite *s,
                            int T) {
    if (dinp) matmul_backward_input(dinp, dout, W, T);
    if (s->pair) lora_backward(dinp, s, dout, inp, T, W->cols, W->rows);
}

// ---------------------------------------------------------------------------------------------
// One transformer block. LayerBufs names the arrays of one layer: slices of Activations in
// training, the KV cache and its scratch in generation.

typedef struct {
    float *x;        // [T, C] block input (residual stream)
    float *rstd1;    // [T]
    float *q;        // [T, NH*HS] queries after RoPE
    float *k, *v;    // [pos0+T, NKV*HS] keys (after RoPE) and values of every position so far
    float *lse;      // [NH, T] or NULL
    float *att;      // [T, NH*HS] attention output, o_proj's input
    float *xmid;     // [T, C] residual stream after attention
    float *rstd2;    // [T]
    float *gate;     // [T, FF] gate_proj output, before SiLU
    float *up;       // [T, FF]
    uint16_t *gate16, *up16;  // [T, FF] gate and up kept in bf16 for the backward pass (NULL: kept as they are)
    float *xout;     // [T, C] block output (may be x itself in generation)
    float *lora_u;   // [LORA_NTARGETS, T, R]
    float *ln;       // [T, C] scratch: an RMSNorm output
    float *h;        // [T, FF] scratch: silu(gate) * up
} LayerBufs;

// What every kernel call of a pass shares.
typedef struct {
    const Config *c;
    const Weights *w;
    const Lora *lora;          // NULL: no adapter
    float p;                   // LoRA dropout, 0 unless training with a seed
    uint64_t seed;
    float *xdrop;              // [T, max(C, FF, NH*HS)] scratch for dropout(x), NULL when p = 0
    uint32_t *keep;            // [L, LORA_NTARGETS, T, in / 32] dropout masks, NULL when p = 0
    float *lora_du;            // [T, R] scratch of the backward pass
    float *lora_bt;            // [R, max(C, FF, NH*HS)] scratch: B^T, then dB^T
    float *att_work;           // [4 * padded(T) * NKV*HS] attention scratch (transposed heads)
    float *att_cat;            // [4 * T * NKV*HS] with a shared prefix: one sequence's keys and values
                               // after the prefix's, and their gradients
    const float *cos, *sin;    // [max_T, HS/2]
    int shared;                // rows 0 .. shared-1: a prefix that every sequence of the pass starts with
    const int *seg;            // [B + 1] the sequences of the pass: rows seg[b] .. seg[b+1]-1 of every
    int B;                     // [T, ...] array; each attends to the shared prefix and to itself, its
                               // own rows at positions shared..
    int infer;                 // inference (model_infer): no loss, no gradient; 0 in training and eval
} Pass;

// RoPE and attention see one sequence at a time: the shared prefix at positions 0.., then the
// rows of each sequence b at its own positions (pos0.. for the one sequence of generation, shared..
// in training). lse and dsum [NH, T_b] of the prefix and of each sequence lie one after the other.
static void rope_forward_seqs(const Pass *ps, float *x, int H, int pos0) {
    size_t D = (size_t)H * ps->c->HS;
    rope_forward(x, ps->cos, ps->sin, ps->shared, 0, H, ps->c->HS);
    for (int b = 0; b < ps->B; b++)
        rope_forward(x + ps->seg[b] * D, ps->cos, ps->sin, ps->seg[b + 1] - ps->seg[b], pos0 + ps->shared, H,
                     ps->c->HS);
}

static void rope_backward_seqs(const Pass *ps, float *dx, int H) {
    size_t D = (size_t)H * ps->c->HS;
    rope_backward(dx, ps->cos, ps->sin, ps->shared, 0, H, ps->c->HS);
    for (int b = 0; b < ps->B; b++)
        rope_backward(dx + ps->seg[b] * D, ps->cos, ps->sin, ps->seg[b + 1] - ps->seg[b], ps->shared, H, ps->c->HS);
}

// dst[shared + n, D] = the prefix's rows of src, then the n rows of sequence b
static const float *after_prefix(float *dst, const Pass *ps, const float *src, int b, size_t D) {
    size_t n = (size_t)(ps->seg[b + 1] - ps->seg[b]);
    memcpy(dst, src, (size_t)ps->shared * D * sizeof(float));
    memcpy(dst + (size_t)ps->shared * D, src + (size_t)ps->seg[b] * D, n * D * sizeof(float));
    return dst;
}

// out, lse <- q, k, v of layer buffers (k, v hold pos0 earlier positions first, generation only)
static void attention_forward_seqs(const Pass *ps, float *out, float *lse, const float *q, const float *k,
                                   const float *v, int pos0) {
    const Config *c = ps->c;
    size_t QD = (size_t)c->NH * c->HS, KD = (size_t)c->NKV * c->HS;
    if (ps->shared) attention_forward(out, lse, ps->att_work, q, k, v, ps->shared, 0, c->NH, c->NKV, c->HS);
    for (int b = 0; b < ps->B; b++) {
        size_t o = (size_t)ps->seg[b], n = (size_t)(ps->seg[b + 1] - ps->seg[b]), keys = ps->shared + n;
        if (n == 0) continue;
        const float *kb = k + o * KD, *vb = v + o * KD;  // the sequence's keys, after the prefix's
        if (ps->shared) {
            kb = after_prefix(ps->att_cat, ps, k, b, KD);
            vb = after_prefix(ps->att_cat + keys * KD, ps, v, b, KD);
        }
        attention_forward(out + o * QD, lse ? lse + o * c->NH : NULL, ps->att_work, q + o * QD, kb, vb, (int)n,
                          pos0 + ps->shared, c->NH, c->NKV, c->HS);
    }
}

// Words of dropout masks per token of each target's input, and where (l, target)'s masks start.
static size_t keep_words(const Config *c, int target) {
    int in = target == LORA_O ? c->NH * c->HS : target == LORA_DOWN ? c->FF : c->C;
    return (size_t)(in + 31) / 32;
}

static size_t keep_offset(const Config *c, int l, int target, int T) {
    size_t per_layer = 0, before = 0;
    for (int k = 0; k < LORA_NTARGETS; k++) {
        if (k == target) before = per_layer;
        per_layer += keep_words(c, k);
    }
    return ((size_t)l * per_layer + before) * (size_t)T;
}

static LoraSite lora_site(const Pass *ps, int l, int target, float *lora_u, int T) {
    LoraSite s = {0};
    if (!ps->lora || !ps->lora->pairs[l * LORA_NTARGETS + target].A) return s;
    s.pair = &ps->lora->pairs[l * LORA_NTARGETS + target];
    s.R = s.pair->r;  // this projection's rank (PEFT's rank_pattern), at most the adapter's R
    s.u = lora_u + (size_t)target * T * ps->lora->R;
    s.du = ps->lora_du;
    s.bt = ps->lora_bt;
    s.xdrop = ps->xdrop;
    s.keep = ps->keep ? ps->keep + keep_offset(ps->c, l, target, T) : NULL;
    s.scale = lora_scale(ps->lora, s.pair);  // alpha / r, or alpha / sqrt(r) with rsLoRA
    s.p = ps->p;
    s.seed = ps->seed;
    s.site = (uint64_t)l * LORA_NTARGETS + (uint64_t)target;
    return s;
}

static void mlp_gate_up(const Pass *ps, int l, const LayerBufs *b, int T) {
    const LayerWeights *lw = &ps->w->layers[l];
    LoraSite sg = lora_site(ps, l, LORA_GATE, b->lora_u, T), su = lora_site(ps, l, LORA_UP, b->lora_u, T);
    linear_forward(ps->infer, b->gate, b->ln, &lw->wgate, NULL, &sg, T);
    linear_forward(ps->infer, b->up, b->ln, &lw->wup, NULL, &su, T);
}

static void block_forward(const Pass *ps, int l, const LayerBufs *b, int T, int pos0) {
    trace_frame("block_forward", "layer %d, %d tokens", l, T);
    const Config *c = ps->c;
    const LayerWeights *lw = &ps->w->layers[l];
    int C = c->C, KD = c->NKV * c->HS;
    LoraSite sq = lora_site(ps, l, LORA_Q, b->lora_u, T), sk = lora_site(ps, l, LORA_K, b->lora_u, T);
    LoraSite sv = lora_site(ps, l, LORA_V, b->lora_u, T), so = lora_site(ps, l, LORA_O, b->lora_u, T);
    LoraSite sd = lora_site(ps, l, LORA_DOWN, b->lora_u, T);
    float *k = b->k + (size_t)pos0 * KD, *v = b->v + (size_t)pos0 * KD;

    rmsnorm_forward(b->ln, b->rstd1, b->x, lw->attn_norm, T, C, c->rms_eps);
    linear_forward(ps->infer, b->q, b->ln, &lw->wq, lw->bq, &sq, T);
    linear_forward(ps->infer, k, b->ln, &lw->wk, lw->bk, &sk, T);
    linear_forward(ps->infer, v, b->ln, &lw->wv, lw->bv, &sv, T);
    rope_forward_seqs(ps, b->q, c->NH, pos0);
    rope_forward_seqs(ps, k, c->NKV, pos0);
    attention_forward_seqs(ps, b->att, b->lse, b->q, b->k, b->v, pos0);
    linear_forward(ps->infer, b->xmid, b->att, &lw->wo, NULL, &so, T);
    residual_add(b->xmid, b->x, (size_t)T * C);

    rmsnorm_forward(b->ln, b->rstd2, b->xmid, lw->ffn_norm, T, C, c->rms_eps);
    mlp_gate_up(ps, l, b, T);
    swiglu_forward(b->h, b->gate, b->up, T * c->FF);
    if (b->gate16) bf16_keep(b->gate16, b->up16, b->gate, b->up, T * c->FF);
    linear_forward(ps->infer, b->xout, b->h, &lw->wdown, NULL, &sd, T);
    residual_add(b->xout, b->xmid, (size_t)T * C);
}

// Gradient buffers of one layer's backward pass (scratch, reused by every layer).
typedef struct {
    float *dres;     // [T, C] in: d loss / d block output; out: d loss / d block input
    float *dh;       // [T, FF]
    float *dgate;    // [T, FF]
    float *dup;      // [T, FF]
    float *dln2;     // [T, C] gradient of the MLP's RMSNorm output
    float *datt;     // [T, NH*HS]
    float *dq;       // [T, NH*HS]
    float *dk, *dv;  // [T, NKV*HS]
    float *dsum;     // [NH, T]
    float *dln1;     // [T, C] gradient of the attention's RMSNorm output
} GradBufs;

// Zeroes the buffers that the backward kernels of one layer add into: all of g but dres (the
// gradient arriving from the layer above) and dsum (written, not added to).
static void grads_zero(const GradBufs *g, const Config *c, int T) {
    size_t TC = (size_t)T * c->C, TF = (size_t)T * c->FF, TQ = (size_t)T * c->NH * c->HS;
    size_t TK = (size_t)T * c->NKV * c->HS;
    float *bufs[] = {g->dh, g->dgate, g->dup, g->dln2, g->datt, g->dq, g->dk, g->dv, g->dln1};
    size_t sizes[] = {TF, TF, TF, TC, TQ, TQ, TK, TK, TC};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) memset(bufs[i], 0, sizes[i] * sizeof(float));
}

// dq, dk, dv, dsum of g +=  <- datt of g and the layer's saved q, k, v, att, lse: the shared
// prefix, then one sequence at a time (its keys after the prefix's: the prefix's dk, dv gather
// what every sequence adds to them, in the order of the sequences)
static void attention_backward_seqs(const Pass *ps, const GradBufs *g, const LayerBufs *b) {
    const Config *c = ps->c;
    size_t QD = (size_t)c->NH * c->HS, KD = (size_t)c->NKV * c->HS, P = (size_t)ps->shared;
    if (P)
        attention_backward(g->dq, g->dk, g->dv, g->dsum, ps->att_work, g->datt, b->att, b->q, b->k, b->v, b->lse,
                           ps->shared, 0, c->NH, c->NKV, c->HS);
    for (int s = 0; s < ps->B; s++) {
        size_t o = (size_t)ps->seg[s], n = (size_t)(ps->seg[s + 1] - ps->seg[s]), keys = P + n;
        if (n == 0) continue;
        float *dk = g->dk + o * KD, *dv = g->dv + o * KD;
        const float *k = b->k + o * KD, *v = b->v + o * KD;
        if (P) {  // dk, dv [keys, KD] of the sequence's keys after the prefix's, added back below
            float *cat = ps->att_cat;
            k = after_prefix(cat, ps, b->k, s, KD), v = after_prefix(cat + keys * KD, ps, b->v, s, KD);
            dk = cat + 2 * keys * KD, dv = cat + 3 * keys * KD;
            memset(dk, 0, 2 * keys * KD * sizeof(float));
        }
        attention_backward(g->dq + o * QD, dk, dv, g->dsum + o * c->NH, ps->att_work, g->datt + o * QD,
                           b->att + o * QD, b->q + o * QD, k, v, b->lse + o * c->NH, (int)n, (int)P, c->NH, c->NKV,
                           c->HS);
        if (P) {  // the prefix's rows, then the sequence's own (y += 1 x: exact sums)
            axpy(g->dk, 1.0f, dk, (int)(P * KD)), axpy(g->dv, 1.0f, dv, (int)(P * KD));
            axpy(g->dk + o * KD, 1.0f, dk + P * KD, (int)(n * KD));
            axpy(g->dv + o * KD, 1.0f, dv + P * KD, (int)(n * KD));
        }
    }
}

// recompute_ff: gate and up were not saved; run gate_proj and up_proj again (same dropout masks).
// With b->gate16, the backward pass takes gate and up rounded to bf16 (kept so, or recomputed).
static void block_backward(const Pass *ps, int l, const LayerBufs *b, const GradBufs *g, int T, int recompute_ff) {
    trace_frame("block_backward", "layer %d, %d tokens", l, T);
    const Config *c = ps->c;
    const LayerWeights *lw = &ps->w->layers[l];
    int C = c->C, FF = c->FF;
    LoraSite sq = lora_site(ps, l, LORA_Q, b->lora_u, T), sk = lora_site(ps, l, LORA_K, b->lora_u, T);
    LoraSite sv = lora_site(ps, l, LORA_V, b->lora_u, T), so = lora_site(ps, l, LORA_O, b->lora_u, T);
    LoraSite sg = lora_site(ps, l, LORA_GATE, b->lora_u, T), su = lora_site(ps, l, LORA_UP, b->lora_u, T);
    LoraSite sd = lora_site(ps, l, LORA_DOWN, b->lora_u, T);
    float *dln1_or_null = l > 0 ? g->dln1 : NULL;  // layer 0's input gradient would only reach the frozen embedding
    grads_zero(g, c, T);

    // MLP: xout = xmid + down(silu(gate(ln)) * up(ln)), ln = rmsnorm(xmid)
    rmsnorm_apply(b->ln, b->xmid, b->rstd2, lw->ffn_norm, T, C);
    if (recompute_ff) mlp_gate_up(ps, l, b, T);
    if (b->gate16) {  // the backward pass sees gate and up as kept, recomputed or not
        if (recompute_ff) bf16_keep(b->gate16, b->up16, b->gate, b->up, T * FF);
        bf16_restore(b->gate, b->up, b->gate16, b->up16, T * FF);
    }
    if (sd.pair) swiglu_forward(b->h, b->gate, b->up, T * FF);  // down_proj's input, for its adapter
    linear_backward(g->dh, g->dres, b->h, &lw->wdown, &sd, T);
    swiglu_backward(g->dgate, g->dup, g->dh, b->gate, b->up, T * FF);
    linear_backward(g->dln2, g->dgate, b->ln, &lw->wgate, &sg, T);
    linear_backward(g->dln2, g->dup, b->ln, &lw->wup, &su, T);
    rmsnorm_backward(g->dres, g->dln2, b->xmid, b->rstd2, lw->ffn_norm, T, C);

    // attention: xmid = x + o(attention(rope(q(ln)), rope(k(ln)), v(ln))), ln = rmsnorm(x)
    linear_backward(g->datt, g->dres, b->att, &lw->wo, &so, T);
    attention_backward_seqs(ps, g, b);
    rope_backward_seqs(ps, g->dq, c->NH);
    rope_backward_seqs(ps, g->dk, c->NKV);
    rmsnorm_apply(b->ln, b->x, b->rstd1, lw->attn_norm, T, C);
    linear_backward(dln1_or_null, g->dq, b->ln, &lw->wq, &sq, T);
    linear_backward(dln1_or_null, g->dk, b->ln, &lw->wk, &sk, T);
    linear_backward(dln1_or_null, g->dv, b->ln, &lw->wv, &sv, T);
    if (l > 0) rmsnorm_backward(g->dres, g->dln1, b->x, b->rstd1, lw->attn_norm, T, C);
}

// ---------------------------------------------------------------------------------------------
// Activations: everything the forward pass saves for the backward pass, and the scratch of both.

struct Activations {
    int max_T;
    int R;            // LoRA rank the arrays were sized for (0: no adapter)
    int L_ff;         // layers 0..L_ff-1 save gate/up; the others recompute them in the backward pass
    int ff_bf16;      // 1: gate/up are saved in bf16 (gate16, up16), as those of every layer in floats would
                      // not fit the budget
    size_t bytes;     // of the arrays below
    // saved by the forward pass
    float *x;         // [L+1, max_T, C] residual stream entering each layer (x[L]: leaving the last)
    float *rstd1;     // [L, max_T] attention RMSNorm
    float *q;         // [L, max_T, NH*HS] queries after RoPE
    float *k;         // [L, max_T, NKV*HS] keys after RoPE
    float *v;         // [L, max_T, NKV*HS]
    float *lse;       // [L, NH, max_T] log-sum-exp of each attention row
    float *att;       // [L, max_T, NH*HS] attention output
    float *xmid;      // [L, max_T, C] residual stream after attention
    float *rstd2;     // [L, max_T] MLP RMSNorm
    float *gate;      // [L_ff, max_T, FF] gate_proj output (NULL with ff_bf16)
    float *up;        // [L_ff, max_T, FF] up_proj output
    uint16_t *gate16; // [L_ff + 1, max_T, FF] with ff_bf16: gate, up in bf16; the last slot for a layer that
    uint16_t *up16;   // recomputes them
    float *lora_u;    // [L, LORA_NTARGETS, max_T, R] A dropout(x) of each adapted projection (R = 0: none)
    uint32_t *keep;   // [L, LORA_NTARGETS, max_T, in / 32] dropout masks, bit set = kept (only with dropout)
    float *dres;      // [max_T, C] d loss / d the residual stream: from the loss, then through each layer
    // scratch of one layer, forward or backward (the loss's scratch below shares its memory)
    float *ln;        // [max_T, C]
    float *h;         // [max_T, FF]
    float *ff_gate;   // [max_T, FF] gate of a layer that recomputes it (L_ff < L) or keeps it in bf16
    float *ff_up;     // [max_T, FF]
    float *xdrop;     // [max_T, max(C, FF, NH*HS)] dropout(x) (only when the adapter has dropout)
    float *lora_du;   // [max_T, R]
    float *lora_bt;   // [R, max(C, FF, NH*HS)]
    float *att_work;  // [4 * padded(max_T) * NKV*HS] attention scratch
    float *att_cat;   // [4 * max_T * NKV*HS] a sequence's keys and values after the shared prefix's
    float *dh, *dgate, *dup, *dln2, *datt, *dq, *dk, *dv, *dsum, *dln1;  // GradBufs, for max_T
    // the loss at target positions, LOSS_CHUNK at a time
    int *tokens;      // [max_T] the tokens of a pass: the prefix its sequences share, then the rest of each
    int shared;       // tokens of that prefix (0: none)
    int *seg;         // [max_T + 1] where the rest of each sequence starts in them (and where the last ends)
    int *pos;         // [max_T] positions t - 1 of the targets t
    float *head_x;    // [LOSS_CHUNK, C] residual rows at those positions
    float *head_rstd; // [LOSS_CHUNK] final RMSNorm
    float *head_ln;   // [LOSS_CHUNK, C] final RMSNorm output, then the gradient of head_x
    float *dhead;     // [LOSS_CHUNK, C] gradient of head_ln
    float *logits;    // [LOSS_CHUNK, V] logits, then their gradient
    double *row_loss; // [LOSS_CHUNK]
    float *cos, *sin; // [max_T, HS/2] RoPE tables
    float *mem;       // the one allocation behind every float array above (gate16, up16, keep, the int
                      // arrays, row_loss: their own)
    const volatile sig_atomic_t *stop;  // set by a signal handler: the pass returns at the next layer
};

// 1 when the flag that activations_watch named is set: the pass in progress returns NAN.
static int stop_asked(const Activations *a) { return a->stop && *a->stop; }

// Carves n floats from *p.
static float *take(float **p, size_t n) {
    float *r = *p;
    *p += n;
    return r;
}

// Carves fields[i] of sizes[i] floats, one after the other, from p (when not NULL); returns the
// floats in all.
static size_t carve(float *p, float **fields[], const size_t sizes[], size_t n) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (p) *fields[i] = sizes[i] ? take(&p, sizes[i]) : NULL;
        total += sizes[i];
    }
    return total;
}

// Floats in Activations when L_ff layers keep their gate/up (in bf16 with a->ff_bf16, those not
// counted); also points the fields into a->mem when it is allocated. The layers' scratch and the
// loss's are never in use at one time: they share memory.
static size_t activation_floats(const Config *c, int R, int dropout, int max_T, int L_ff, Activations *a) {
    size_t T = (size_t)max_T, C = c->C, L = c->L, FF = c->FF, QD = (size_t)c->NH * c->HS, KD = (size_t)c->NKV * c->HS;
    size_t recompute = L_ff < c->L ? 1 : 0, MX = C > FF ? C : FF, MO = MX > QD ? MX : QD;
    size_t kept = a->ff_bf16 ? 0 : (size_t)L_ff, scratch = recompute || a->ff_bf16 ? 1 : 0;
    size_t saved_sizes[] = {
        (L + 1) * T * C, L * T, L * T * QD, L * T * KD, L * T * KD, L * c->NH * T, L * T * QD, L * T * C, L * T,
        kept * T * FF, kept * T * FF, L * LORA_NTARGETS * T * R, T * C, T * (c->HS / 2), T * (c->HS / 2),
    };
    float **saved[] = {
        &a->x, &a->rstd1, &a->q, &a->k, &a->v, &a->lse, &a->att, &a->xmid, &a->rstd2,
        &a->gate, &a->up, &a->lora_u, &a->dres, &a->cos, &a->sin,
    };
    size_t layer_sizes[] = {
        T * C, T * FF, scratch * T * FF, scratch * T * FF, dropout ? T * MO : 0, T * R, MO * R, 4 * (size_t)padded(max_T) * KD,
        4 * T * KD, T * FF, T * FF, T * FF, T * C, T * QD, T * QD, T * KD, T * KD, c->NH * T, T * C,
    };
    float **layer[] = {
        &a->ln, &a->h, &a->ff_gate, &a->ff_up, &a->xdrop, &a->lora_du, &a->lora_bt, &a->att_work, &a->att_cat,
        &a->dh, &a->dgate, &a->dup, &a->dln2, &a->datt, &a->dq, &a->dk, &a->dv, &a->dsum, &a->dln1,
    };
    size_t head_sizes[] = {LOSS_CHUNK * C, LOSS_CHUNK, LOSS_CHUNK * C, LOSS_CHUNK * C, LOSS_CHUNK * (size_t)c->V};
    float **head[] = {&a->head_x, &a->head_rstd, &a->head_ln, &a->dhead, &a->logits};
    size_t n_saved = carve(a->mem, saved, saved_sizes, sizeof saved / sizeof saved[0]);
    float *shared = a->mem ? a->mem + n_saved : NULL;
    size_t n_layer = carve(shared, layer, layer_sizes, sizeof layer / sizeof layer[0]);
    size_t n_head = carve(shared, head, head_sizes, sizeof head / sizeof head[0]);
    return n_saved + (n_layer > n_head ? n_layer : n_head);
}

Activations *activations_new(const Config *c, const struct Lora *lora, int max_T) {
    return activations_new_budget(c, lora, max_T, ACT_BUDGET);
}

// Values in each of gate16, up16 with ff_bf16: a slot [max_T, FF] per layer that keeps them, and
// one for the layers that recompute them.
static size_t bf16_values(const Config *c, int max_T, int ff_layers) {
    return ((size_t)ff_layers + (ff_layers < c->L ? 1 : 0)) * (size_t)max_T * c->FF;
}

// Bytes of Activations when ff_layers layers keep their gate/up (in bf16 with ff_bf16).
static size_t bytes_needed(const Config *c, int R, int dropout, int max_T, int ff_layers, int ff_bf16) {
    Activations probe = {.ff_bf16 = ff_bf16};  // no memory: activation_floats only counts
    size_t halves = ff_bf16 ? 2 * bf16_values(c, max_T, ff_layers) : 0;
    return activation_floats(c, R, dropout, max_T, ff_layers, &probe) * sizeof(float) + halves * sizeof(uint16_t);
}

Activations *activations_new_budget(const Config *c, const struct Lora *lora, int max_T, size_t budget) {
    int R = lora ? lora->R : 0, dropout = lora && lora->dropout > 0, ff_layers = c->L;
    // Every layer keeps its gate/up in floats when they fit the budget, else in bf16 (half the bytes);
    // then as many layers as fit keep them, and the others recompute them.
    int ff_bf16 = bytes_needed(c, R, dropout, max_T, c->L, 0) > budget;
    while (ff_layers > 0 && bytes_needed(c, R, dropout, max_T, ff_layers, ff_bf16) > budget) ff_layers--;
    return activations_new_layout(c, lora, max_T, ff_layers, ff_bf16);
}

Activations *activations_new_layout(const Config *c, const struct Lora *lora, int max_T, int ff_layers, int ff_bf16) {
    Activations *a = xcalloc(1, sizeof *a);
    int R = lora ? lora->R : 0, dropout = lora && lora->dropout > 0;
    a->max_T = max_T;
    a->R = R;
    a->L_ff = ff_layers < 0 ? 0 : ff_layers > c->L ? c->L : ff_layers;
    a->ff_bf16 = ff_bf16 != 0;
    a->bytes = bytes_needed(c, R, dropout, max_T, a->L_ff, a->ff_bf16);
    a->mem = xmalloc(activation_floats(c, R, dropout, max_T, a->L_ff, a) * sizeof(float));
    activation_floats(c, R, dropout, max_T, a->L_ff, a);
    if (a->ff_bf16) {
        size_t n = bf16_values(c, max_T, a->L_ff);
        a->gate16 = xmalloc(n * sizeof(uint16_t));
        a->up16 = xmalloc(n * sizeof(uint16_t));
    }
    if (dropout) a->keep = xmalloc(keep_offset(c, c->L, 0, max_T) * sizeof(uint32_t));
    a->pos = xmalloc((size_t)max_T * sizeof(int));
    a->tokens = xmalloc((size_t)max_T * sizeof(int));
    a->seg = xmalloc(((size_t)max_T + 1) * sizeof(int));
    a->row_loss = xmalloc(LOSS_CHUNK * sizeof(double));
    rope_tables(a->cos, a->sin, max_T, c->HS, c->rope_theta);
    return a;
}

int activations_max_T(const Activations *a) { return a->max_T; }
int activations_shared(const Activations *a) { return a->shared; }

ActivationsMemory activations_memory(const Activations *a) {
    ActivationsMemory m = {a->bytes, a->L_ff, a->ff_bf16};
    return m;
}

void activations_watch(Activations *a, const volatile sig_atomic_t *stop) { a->stop = stop; }

void activations_free(Activations *a) {
    if (!a) return;
    free(a->mem);
    free(a->gate16);
    free(a->up16);
    free(a->keep);
    free(a->pos);
    free(a->tokens);
    free(a->seg);
    free(a->row_loss);
    free(a);
}

// The arrays of layer l in Activations, for a sequence of T tokens.
static LayerBufs layer_bufs(const Activations *a, const Config *c, const Lora *lora, int l) {
    size_t T = (size_t)a->max_T, C = c->C, QD = (size_t)c->NH * c->HS, KD = (size_t)c->NKV * c->HS;
    int R = lora ? lora->R : 0, keep = l < a->L_ff;
    size_t slot = (size_t)(keep ? l : a->L_ff) * T * c->FF;  // of gate16, up16
    LayerBufs b = {
        .x = a->x + l * T * C, .rstd1 = a->rstd1 + l * T, .q = a->q + l * T * QD, .k = a->k + l * T * KD,
        .v = a->v + l * T * KD, .lse = a->lse + l * c->NH * T, .att = a->att + l * T * QD, .xmid = a->xmid + l * T * C,
        .rstd2 = a->rstd2 + l * T, .gate = keep && !a->ff_bf16 ? a->gate + l * T * c->FF : a->ff_gate,
        .up = keep && !a->ff_bf16 ? a->up + l * T * c->FF : a->ff_up, .xout = a->x + (l + 1) * T * C,
        .gate16 = a->ff_bf16 ? a->gate16 + slot : NULL, .up16 = a->ff_bf16 ? a->up16 + slot : NULL,
        .lora_u = R ? a->lora_u + (size_t)l * LORA_NTARGETS * T * R : NULL, .ln = a->ln, .h = a->h,
    };
    return b;
}

// ---------------------------------------------------------------------------------------------
// The loss at target positions: logits exist for LOSS_CHUNK positions at a time.

typedef struct {
    float *logits;
    double *row_loss;
    const int *targets;
    int V;
    float grad_scale;
    int backward;
} XentArgs;

// Returns logsumexp(z[V]) - z[target]; with backward, z becomes grad_scale * (softmax(z) - onehot(target)),
// else exp(z - max z). Max and sum run in LANES lanes (vectorized), the sum in double.
static double crossentropy_row(float *restrict z, int target, int V, float grad_scale, int backward) {
    float mx[LANES], target_z = z[target];
    double sums[LANES] = {0};
    int n = V - V % LANES;
    for (int k = 0; k < LANES; k++) mx[k] = -INFINITY;
    for (int i = 0; i < n; i += LANES)
        for (int k = 0; k < LANES; k++) mx[k] = z[i + k] > mx[k] ? z[i + k] : mx[k];
    float m = mx[0];
    for (int k = 1; k < LANES; k++) m = mx[k] > m ? mx[k] : m;
    for (int i = n; i < V; i++) m = z[i] > m ? z[i] : m;
    for (int i = 0; i < n; i += LANES) {
        for (int k = 0; k < LANES; k++) z[i + k] = exp_f(z[i + k] - m);
        for (int k = 0; k < LANES; k++) sums[k] += z[i + k];
    }
    double sum = 0;
    for (int k = 0; k < LANES; k++) sum += sums[k];
    for (int i = n; i < V; i++) {
        z[i] = exp_f(z[i] - m);
        sum += z[i];
    }
    if (backward) {
        float scale = grad_scale / (float)sum;  // softmax = exp(z - m) / sum
        int i = 0;
        for (; i + LANES <= V; i += LANES)
            for (int k = 0; k < LANES; k++) z[i + k] *= scale;
        for (; i < V; i++) z[i] *= scale;
        z[target] -= grad_scale;
    }
    return m + log(sum) - target_z;
}

static void crossentropy_rows(void *ctx, int start, int end) {
    const XentArgs *a = ctx;
    for (int r = start; r < end; r++)
        a->row_loss[r] = crossentropy_row(a->logits + (size_t)r * a->V, a->targets[r], a->V, a->grad_scale, a->backward);
}

// The textbook version. For each row r, z = logits[r]:
//   row_loss[r] = log(sum_i exp(z_i - max z)) + max z - z[target],
//   with backward: z_i = grad_scale * (exp(z_i - max z) / sum - (i == target)).
double crossentropy_ref(float *logits, double *row_loss, const int *targets, int n, int V, float grad_scale,
                        int backward) {
    double loss = 0;
    for (int r = 0; r < n; r++) {
        float *z = logits + (size_t)r * V, max = -INFINITY;
        for (int i = 0; i < V; i++)
            if (z[i] > max) max = z[i];
        double sum = 0;
        for (int i = 0; i < V; i++) sum += expf(z[i] - max);
        row_loss[r] = max + log(sum) - z[targets[r]];
        loss += row_loss[r];
        if (!backward) continue;
        for (int i = 0; i < V; i++) z[i] = grad_scale * (float)(expf(z[i] - max) / sum);
        z[targets[r]] -= grad_scale;
    }
    return loss;
}

// Returns sum_r row_loss[r], row_loss[n] = logsumexp(logits[r]) - logits[r, targets[r]] <- logits[n, V],
// which is overwritten: with backward, by grad_scale * (softmax - onehot(target)). One thread per row
// (the reference build: crossentropy_ref).
double crossentropy(float *logits, double *row_loss, const int *targets, int n, int V, float grad_scale, int backward) {
    double t0 = trace_start();
#if defined(SFT_REF)
    return crossentropy_ref(logits, row_loss, targets, n, V, grad_scale, backward);
#else
    XentArgs a = {logits, row_loss, targets, V, grad_scale, backward};
    parallel_for(crossentropy_rows, &a, n, 1);
    double loss = 0;
    for (int r = 0; r < n; r++) loss += row_loss[r];
    return loss;
#endif
    trace_op(t0, "crossentropy", "row_loss[%d]%s <- logits[%d, %d]", n, backward ? ", dlogits" : "", n, V);
}

// Sum of the NLLs of the n targets whose previous positions are pos[n]; with backward, adds the
// gradient into dres[T, C] (rows pos). x[T, C] is the residual stream after the last layer.
static double head_loss_chunk(Model *m, Activations *a, float *dres, const float *x, const int *pos, const int *targets,
                              int n, float grad_scale, int backward) {
    trace_frame("head_loss_chunk", "%d target positions", n);
    const Config *c = &m->config;
    size_t C = c->C;
    for (int r = 0; r < n; r++) memcpy(a->head_x + r * C, x + (size_t)pos[r] * C, C * sizeof(float));
    rmsnorm_forward(a->head_ln, a->head_rstd, a->head_x, m->w.out_norm, n, c->C, c->rms_eps);
    matmul(a->logits, a->head_ln, &m->w.lm_head, NULL, n);
    double loss = crossentropy(a->logits, a->row_loss, targets, n, c->V, grad_scale, backward);
    if (backward) {
        memset(a->dhead, 0, (size_t)n * C * sizeof(float));
        matmul_backward_input(a->dhead, a->logits, &m->w.lm_head, n);
        memset(a->head_ln, 0, (size_t)n * C * sizeof(float));  // head_ln is done with: it takes d head_x
        rmsnorm_backward(a->head_ln, a->dhead, a->head_x, a->head_rstd, m->w.out_norm, n, c->C);
        for (int r = 0; r < n; r++) {  // a row of the shared prefix may be here more than once: each adds
            float *d = dres + (size_t)pos[r] * C;
            for (size_t i = 0; i < C; i++) d[i] += a->head_ln[r * C + i];
        }
    }
    return loss;
}

// ---------------------------------------------------------------------------------------------
// Training and evaluation.

// Checks tokens and mask; returns the number of positions the loss depends on (the last target
// index: later positions influence nothing), 0 when there is no target, -1 on bad input.
static int positions_needed(const Config *c, const int *tokens, const unsigned char *mask, int T) {
    if (T < 0) return -1;
    int last = 0;
    for (int t = 0; t < T; t++) {
        if (tokens[t] < 0 || tokens[t] >= c->V) return -1;
        if (t > 0 && mask[t]) last = t;
    }
    return last;
}

// Rows that the sequences of a pass can run once for all: the longest prefix common to those with
// a target (two or more; needed[b] > 0: the rows sequence b needs), at most the rows each needs;
// *tokens = its tokens. Its rows, and so their dropout masks, are the same for every sequence; the
// gradients that reach them are summed. 0 when SFT_NO_SHARED_PREFIX is set (each sequence then
// runs every row of its own).
static int shared_prefix(const int **tokens, const Sequence *seqs, const int *needed, int B) {
    const char *no = getenv("SFT_NO_SHARED_PREFIX");
    int shared = 0, with_targets = 0;
    for (int b = 0; b < B; b++) {
        if (needed[b] == 0) continue;
        if (with_targets++ == 0) *tokens = seqs[b].tokens, shared = needed[b];
        int k = 0;
        while (k < shared && k < needed[b] && seqs[b].tokens[k] == (*tokens)[k]) k++;
        shared = k;
    }
    return with_targets < 2 || (no && *no && strcmp(no, "0") != 0) ? 0 : shared;
}

// Lays the sequences out: the prefix they share (shared_prefix), then the rest of each one after
// the other, each cut after its last target: seg[B + 1] row offsets, the tokens in a->tokens;
// returns the rows in all, or -1 on bad input or past max_T. A sequence's targets in the prefix
// read their rows there (head_loss).
static int stack_sequences(Activations *a, const Config *c, const Sequence *seqs, int B) {
    if (B < 0 || B > a->max_T) return -1;
    for (int b = 0; b < B; b++) {  // the rows each sequence needs, in seg[b + 1] until the layout below
        a->seg[b + 1] = positions_needed(c, seqs[b].tokens, seqs[b].mask, seqs[b].T);
        if (a->seg[b + 1] < 0 || seqs[b].T > a->max_T) return -1;
    }
    const int *prefix = NULL;
    int shared = shared_prefix(&prefix, seqs, a->seg + 1, B);
    if (shared > 0) memcpy(a->tokens, prefix, (size_t)shared * sizeof(int));
    a->shared = shared, a->seg[0] = shared;
    for (int b = 0; b < B; b++) {
        int n = a->seg[b + 1], rest = n > shared ? n - shared : 0;
        if (rest > a->max_T - a->seg[b]) return -1;
        memcpy(a->tokens + a->seg[b], seqs[b].tokens + shared, (size_t)rest * sizeof(int));
        a->seg[b + 1] = a->seg[b] + rest;
    }
    return a->seg[B];
}

// Sum of the NLLs of every target of the sequences, after the last layer (x[T, C], rows as in
// a->seg, after the shared prefix's); with backward, their gradient lands in a->dres.
static double head_loss(Model *m, Activations *a, const float *x, const Sequence *seqs, int B, float grad_scale,
                        int backward) {
    int n = 0, targets[LOSS_CHUNK], P = a->shared;
    double loss = 0;
    for (int b = 0; b < B; b++) {
        for (int t = 1; t < seqs[b].T; t++) {
            if (seqs[b].mask[t]) {  // row t - 1 predicts token t: in the prefix, or in the rest of b
                a->pos[n] = t - 1 < P ? t - 1 : a->seg[b] + t - 1 - P;
                targets[n++] = seqs[b].tokens[t];
            }
            if (n < LOSS_CHUNK) continue;
            if (stop_asked(a)) return NAN;
            loss += head_loss_chunk(m, a, a->dres, x, a->pos, targets, n, grad_scale, backward), n = 0;
        }
    }
    if (n > 0) loss += head_loss_chunk(m, a, a->dres, x, a->pos, targets, n, grad_scale, backward);
    return loss;
}

double model_forward_backward(Model *m, struct Lora *lora, Activations *a, const int *tokens,
                              const unsigned char *mask, int T, float grad_scale, int backward,
                              uint64_t dropout_seed) {
    Sequence s = {tokens, mask, T};
    return model_forward_backward_batch(m, lora, a, &s, 1, grad_scale, backward, dropout_seed);
}

double model_forward_backward_batch(Model *m, struct Lora *lora, Activations *a, const Sequence *seqs, int B,
                                    float grad_scale, int backward, uint64_t dropout_seed) {
    const Config *c = &m->config;
    int T = stack_sequences(a, c, seqs, B);
    if (T < 0 || (lora && (lora->R != a->R || lora->L != c->L))) return NAN;
    if (lora && dropout_seed != 0 && lora->dropout > 0 && !a->keep) return NAN;
    if (T == 0) return 0;
    Pass ps = {.c = c, .w = &m->w, .lora = lora, .seed = dropout_seed, .xdrop = a->xdrop, .keep = a->keep,
               .lora_du = a->lora_du, .lora_bt = a->lora_bt, .att_work = a->att_work, .att_cat = a->att_cat,
               .cos = a->cos, .sin = a->sin, .shared = a->shared, .seg = a->seg, .B = B};
    if (lora && dropout_seed != 0 && lora->dropout > 0) ps.p = lora->dropout;
    backward = backward && lora;
    trace_frame("model_forward_backward_batch", "%d sequences, %d tokens (%d shared)%s", B, T, a->shared,
                backward ? ", backward" : "");

    embed_forward(a->x, a->tokens, &m->w.embed, T);
    float *xL = a->x;
    for (int l = 0; l < c->L; l++) {
        if (stop_asked(a)) return NAN;
        // Without a backward pass nothing needs keeping: every layer runs in layer 0's arrays (the
        // others stay untouched and cost no memory), the residual stream alternating x[0], x[1].
        LayerBufs b = layer_bufs(a, c, lora, backward ? l : 0);
        if (!backward) b.x = xL, b.xout = a->x + (size_t)((l + 1) % 2) * a->max_T * c->C;
        if (!backward || l >= a->L_ff) b.gate16 = b.up16 = NULL;  // nothing to keep: no backward pass, or
                                                                   // the backward pass recomputes them
        block_forward(&ps, l, &b, T, 0);
        xL = b.xout;
    }

    if (backward) memset(a->dres, 0, (size_t)T * c->C * sizeof(float));
    double loss = head_loss(m, a, xL, seqs, B, grad_scale, backward);
    if (!backward) return loss;

    GradBufs g = {a->dres, a->dh, a->dgate, a->dup, a->dln2, a->datt, a->dq, a->dk, a->dv, a->dsum, a->dln1};
    for (int l = c->L - 1; l >= 0; l--) {
        if (stop_asked(a)) return NAN;
        LayerBufs b = layer_bufs(a, c, lora, l);
        block_backward(&ps, l, &b, &g, T, l >= a->L_ff);
        fault_point("backward-layer");  // the tests' stand-in for a signal between two layers
    }
    return loss;
}

// ---------------------------------------------------------------------------------------------
// Generation: keys and values of past tokens, and the scratch for INFER_CHUNK new tokens.

struct KVCache {
    int max_T;         // capacity in tokens
    int n;             // tokens in the cache
    int exact;         // kvcache_exact: matmul, not matmul_inference
    float *k, *v;      // [L, max_T, NKV*HS] keys after RoPE, values
    float *cos, *sin;  // [max_T, HS/2]
    float *att_work;   // [NKV*HS, padded(max_T)] the keys transposed for the attention kernel
    float *x;          // [INFER_CHUNK, C] residual stream (block input and output)
    float *xmid;       // [INFER_CHUNK, C]
    float *ln;         // [INFER_CHUNK, C]
    float *q, *att;    // [INFER_CHUNK, NH*HS]
    float *gate, *up;  // [INFER_CHUNK, FF]
    float *h;          // [INFER_CHUNK, FF]
    float *rstd1, *rstd2;  // [INFER_CHUNK]
    int lora_R;        // rank the two arrays below were sized for (0: none yet)
    float *lora_u;     // [LORA_NTARGETS, INFER_CHUNK, lora_R]
    float *lora_bt;    // [lora_R, max(C, FF, NH*HS)]
};

KVCache *kvcache_new(const Config *c, int max_T) {
    KVCache *kv = xcalloc(1, sizeof *kv);
    size_t T = max_T > 0 ? (size_t)max_T : 1, N = INFER_CHUNK, KD = (size_t)c->NKV * c->HS, QD = (size_t)c->NH * c->HS;
    kv->max_T = (int)T;
    kv->k = xmalloc((size_t)c->L * T * KD * sizeof(float));
    kv->v = xmalloc((size_t)c->L * T * KD * sizeof(float));
    kv->att_work = xmalloc((size_t)padded((int)T) * KD * sizeof(float));
    kv->cos = xmalloc(T * (c->HS / 2) * sizeof(float));
    kv->sin = xmalloc(T * (c->HS / 2) * sizeof(float));
    rope_tables(kv->cos, kv->sin, (int)T, c->HS, c->rope_theta);
    kv->x = xmalloc(N * c->C * sizeof(float));
    kv->xmid = xmalloc(N * c->C * sizeof(float));
    kv->ln = xmalloc(N * c->C * sizeof(float));
    kv->q = xmalloc(N * QD * sizeof(float));
    kv->att = xmalloc(N * QD * sizeof(float));
    kv->gate = xmalloc(N * c->FF * sizeof(float));
    kv->up = xmalloc(N * c->FF * sizeof(float));
    kv->h = xmalloc(N * c->FF * sizeof(float));
    kv->rstd1 = xmalloc(N * sizeof(float));
    kv->rstd2 = xmalloc(N * sizeof(float));
    return kv;
}

void kvcache_free(KVCache *kv) {
    if (!kv) return;
    float *arrays[] = {kv->k, kv->v, kv->cos, kv->sin, kv->x, kv->xmid, kv->ln, kv->q, kv->att,
                       kv->gate, kv->up, kv->h, kv->rstd1, kv->rstd2, kv->lora_u, kv->lora_bt, kv->att_work};
    for (size_t i = 0; i < sizeof arrays / sizeof arrays[0]; i++) free(arrays[i]);
    free(kv);
}

void kvcache_reset(KVCache *kv) { kv->n = 0; }
void kvcache_exact(KVCache *kv, int exact) { kv->exact = exact; }
int kvcache_len(const KVCache *kv) { return kv->n; }

// Runs tokens[n] (n <= INFER_CHUNK) at positions kv->n ...; logits[V] of the last one when not NULL.
static void infer_chunk(Model *m, const Lora *lora, KVCache *kv, const int *tokens, int n, float *logits) {
    const Config *c = &m->config;
    size_t KD = (size_t)c->NKV * c->HS;
    int seg[2] = {0, n};
    Pass ps = {.c = c, .w = &m->w, .lora = lora, .lora_bt = kv->lora_bt, .att_work = kv->att_work, .cos = kv->cos,
               .sin = kv->sin, .seg = seg, .B = 1, .infer = !kv->exact};
    embed_forward(kv->x, tokens, &m->w.embed, n);
    for (int l = 0; l < c->L; l++) {
        LayerBufs b = {
            .x = kv->x, .rstd1 = kv->rstd1, .q = kv->q, .k = kv->k + (size_t)l * kv->max_T * KD,
            .v = kv->v + (size_t)l * kv->max_T * KD, .lse = NULL, .att = kv->att, .xmid = kv->xmid,
            .rstd2 = kv->rstd2, .gate = kv->gate, .up = kv->up, .xout = kv->x, .lora_u = kv->lora_u,
            .ln = kv->ln, .h = kv->h,
        };
        block_forward(&ps, l, &b, n, kv->n);
    }
    kv->n += n;
    if (!logits) return;
    float rstd;
    rmsnorm_forward(kv->ln, &rstd, kv->x + (size_t)(n - 1) * c->C, m->w.out_norm, 1, c->C, c->rms_eps);
    if (kv->exact) matmul(logits, kv->ln, &m->w.lm_head, NULL, 1);
    else matmul_inference(logits, kv->ln, &m->w.lm_head, NULL, 1);
}

int model_infer(Model *m, const struct Lora *lora, KVCache *kv, const int *tokens, int n, float *logits) {
    const Config *c = &m->config;
    if (n <= 0 || n > kv->max_T - kv->n) return -1;
    if (lora && lora->L != c->L) return -1;
    if (lora && lora->R > kv->lora_R) {  // the adapter's scratch, sized at its first use
        size_t MO = (size_t)(c->FF > c->C ? c->FF : c->C), QD = (size_t)c->NH * c->HS;
        MO = MO > QD ? MO : QD;
        free(kv->lora_u);
        free(kv->lora_bt);
        kv->lora_R = lora->R;
        kv->lora_u = xmalloc((size_t)LORA_NTARGETS * INFER_CHUNK * lora->R * sizeof(float));
        kv->lora_bt = xmalloc(MO * lora->R * sizeof(float));
    }
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->V) return -1;
    for (int i = 0; i < n; i += INFER_CHUNK) {
        int len = min_int(INFER_CHUNK, n - i);
        infer_chunk(m, lora, kv, tokens + i, len, i + len == n ? logits : NULL);
    }
    return 0;
}
