// model.c: the Qwen2 forward and backward passes with LoRA adapters, and inference with a KV cache.
//
// Training runs a batch of sequences at a time (model_forward_backward_batch), their rows stacked
// into one [T, ...] array for every matrix product, each attending only to itself: the forward pass
// saves what the backward pass needs in one Activations struct; logits and the loss are computed
// only at positions whose next token is a target, a few positions at a time; the backward pass
// runs back to the LoRA matrices only (frozen weights get neither gradient nor storage).
// Generation (model_infer) runs the same block_forward against a KVCache.
// Left out: the products over quantized weights (quant.c), loading (modelfile.c), the adapter's
// storage and files (lora.c). Read model_forward_backward, then block_forward / block_backward.
#include "model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lora.h"
#include "threads.h"

// Products are rounded as written (no fused multiply-add), as in quant.c, so that results do not
// depend on the compiler; gcc's -std=c11 already means that.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#define LOSS_CHUNK 128         // target positions whose logits [LOSS_CHUNK, V] exist at one time
#define INFER_CHUNK 256        // prompt tokens run through the model at one time in model_infer
#define ACT_BUDGET ((size_t)512 << 20)  // bytes of Activations above which layers recompute gate/up
#define ATT_BLOCK 64           // keys scored at one time by the attention kernels
#define ATT_QB 8               // query rows of an attention tile (the tile code names 8 sums)
#define LANES 16               // floats summed side by side in the vectorized loops (one AVX-512 register;
                               // lanes_sum and the tiles of attention are written for 16)

// ---------------------------------------------------------------------------------------------
// Small helpers.

static inline float dot(const float *a, const float *b, int n) {
    float s[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k] * b[i + k];
    for (; i < n; i++) s[0] += a[i] * b[i];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// y[n] += a x[n]; blocks of 8 so that compilers vectorize it at -O2
static inline void axpy(float *restrict y, float a, const float *restrict x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) y[i + k] += a * x[i + k];
    for (; i < n; i++) y[i] += a * x[i];
}

static int min_int(int a, int b) { return a < b ? a : b; }

// Sum of the lanes a[LANES], in a fixed tree.
static float lanes_sum(const float *a) {
    float s[LANES / 2];
    for (int k = 0; k < LANES / 2; k++) s[k] = a[k] + a[k + LANES / 2];
    for (int k = 0; k < LANES / 4; k++) s[k] += s[k + LANES / 4];
    return (s[0] + s[2]) + (s[1] + s[3]);
}

// y[LANES] += scale * a[LANES]
static void lanes_add(float *y, const float *a, float scale) {
    for (int k = 0; k < LANES; k++) y[k] += scale * a[k];
}

// e^x in plain float arithmetic, for the softmaxes and SiLU: loops over it vectorize, which a libm
// call prevents. x = n ln2 + r with |r| <= ln2 / 2 (n rounded by adding 1.5 * 2^23, which leaves
// it in t's low bits), e^r by the polynomial of Cephes' expf (relative error ~1e-7), 2^n written
// into the exponent bits. x is clamped to [-87, 88] so that 2^n stays a normal float: e^-inf
// gives 1.6e-38 rather than 0 (every caller only adds it or scales by it); NaN stays NaN.
static inline float exp_f(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float t = x * 1.44269504f + 12582912.0f, n = t - 12582912.0f;
    float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts, so that n ln2 is exact
    float p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
               1.6666665459e-1f) * r + 5.0000001201e-1f;
    uint32_t bits;
    memcpy(&bits, &t, sizeof bits);                // 0x4B400000 + n
    bits = (bits - 0x4B400000u + 127u) << 23;      // 2^n
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return (p * (r * r) + r + 1.0f) * scale;
}

// Work item k of NH * T -> (head, query row), interleaving short and long causal rows
// (0, T-1, 1, T-2, ...) so that contiguous chunks of items cost about the same.
static void balanced_item(int k, int H, int T, int *h, int *i) {
    int p = k / H, half = p >> 1;
    *h = k % H;
    *i = (p & 1) ? T - 1 - half : half;
}

// ---------------------------------------------------------------------------------------------
// Kernels. Each opens with its shapes; outputs first, then inputs, then dimensions.
// Backward kernels accumulate (+=) into buffers the caller has zeroed.

// x[T, C] = rows tokens[t] of the embedding
static void embed_forward(float *x, const int *tokens, const QMatrix *embed, int T) {
    for (int t = 0; t < T; t++) qmatrix_row(x + (size_t)t * embed->cols, embed, tokens[t]);
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
    NormArgs a = {out, rstd, inp, w, NULL, rstd, C, eps};
    parallel_for(rmsnorm_forward_rows, &a, T, 1);
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
    NormArgs a = {dinp, NULL, inp, w, dout, rstd, C, 0};
    parallel_for(rmsnorm_backward_rows, &a, T, 1);
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
}

// dx[T, H*HS] in place: the transposed rotation (positions 0..T-1)
void rope_backward(float *dx, const float *cos_t, const float *sin_t, int T, int H, int HS) {
    int h2 = HS / 2;
    for (int t = 0; t < T; t++) {
        const float *cs = cos_t + (size_t)t * h2, *sn = sin_t + (size_t)t * h2;
        for (int h = 0; h < H; h++) {
            float *d = dx + ((size_t)t * H + h) * HS;
            for (int j = 0; j < h2; j++) {
                float a = d[j], b = d[j + h2];
                d[j] = a * cs[j] + b * sn[j];
                d[j + h2] = b * cs[j] - a * sn[j];
            }
        }
    }
}

// dst[H, HS, ld] = src[n, H*HS], zeros in the columns n..ld-1: each head's vectors as columns,
// so that the scores of a block of keys (or queries) are HS long axpys instead of short dot
// products, and a tile of LANES columns always exists.
static void transpose_heads(float *dst, const float *src, int n, int ld, int H, int HS) {
    for (int t = 0; t < n; t++)
        for (int h = 0; h < H; h++)
            for (int d = 0; d < HS; d++) dst[((size_t)h * HS + d) * ld + t] = src[((size_t)t * H + h) * HS + d];
    for (int hd = 0; hd < H * HS; hd++)
        for (int t = n; t < ld; t++) dst[(size_t)hd * ld + t] = 0.0f;
}

// Columns of the transposed arrays: n rounded up to LANES.
static int padded(int n) { return (n + LANES - 1) / LANES * LANES; }

// s[nb] = sum_d x[d] * cols[d * ld + j0 + j]: x against nb columns of a transposed [HS, ld] block.
// 32 columns at a time in four independent sums of 8 (the k loops unroll into vector registers),
// also past nb while the columns exist (s has room for 64: the extra sums are ignored).
static void scores_block(float *s, const float *x, const float *cols, int ld, int j0, int nb, int HS) {
    int j = 0, avail = ld - j0;
    for (; j < nb && j + 32 <= avail; j += 32) {
        float a0[8] = {0}, a1[8] = {0}, a2[8] = {0}, a3[8] = {0};
        const float *c = cols + j0 + j;
        for (int d = 0; d < HS; d++, c += ld) {
            float xd = x[d];
            for (int k = 0; k < 8; k++) a0[k] += xd * c[k];
            for (int k = 0; k < 8; k++) a1[k] += xd * c[8 + k];
            for (int k = 0; k < 8; k++) a2[k] += xd * c[16 + k];
            for (int k = 0; k < 8; k++) a3[k] += xd * c[24 + k];
        }
        for (int k = 0; k < 8; k++) s[j + k] = a0[k], s[j + 8 + k] = a1[k], s[j + 16 + k] = a2[k], s[j + 24 + k] = a3[k];
    }
    for (; j < nb; j++) {  // the last columns of the array
        float acc = 0;
        for (int d = 0; d < HS; d++) acc += x[d] * cols[(size_t)d * ld + j0 + j];
        s[j] = acc;
    }
}

// --- Tiles of ATT_QB query rows x LANES keys (sequences of ATT_QB tokens or more) -------------
// Row r of a tile is a pointer x[r] to HS floats; a block of fewer than ATT_QB rows repeats its
// last row, whose results are computed and never stored.

// s[r * ss + k] = x[r] . cols[:, j0 + k] for r < ATT_QB, k < LANES: rows against LANES columns
// of a transposed [HS, ld] array, in ATT_QB independent sums of LANES lanes.
static void tile_scores(float *restrict s, int ss, const float *const *x, const float *restrict cols, int ld, int j0,
                        int HS) {
    float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
    float a4[LANES] = {0}, a5[LANES] = {0}, a6[LANES] = {0}, a7[LANES] = {0};
    const float *c = cols + j0;
    for (int d = 0; d < HS; d++, c += ld) {
        float x0 = x[0][d], x1 = x[1][d], x2 = x[2][d], x3 = x[3][d], x4 = x[4][d], x5 = x[5][d], x6 = x[6][d], x7 = x[7][d];
        for (int k = 0; k < LANES; k++) {
            a0[k] += x0 * c[k], a1[k] += x1 * c[k], a2[k] += x2 * c[k], a3[k] += x3 * c[k];
            a4[k] += x4 * c[k], a5[k] += x5 * c[k], a6[k] += x6 * c[k], a7[k] += x7 * c[k];
        }
    }
    for (int k = 0; k < LANES; k++) {
        s[k] = a0[k], s[ss + k] = a1[k], s[2 * ss + k] = a2[k], s[3 * ss + k] = a3[k];
        s[4 * ss + k] = a4[k], s[5 * ss + k] = a5[k], s[6 * ss + k] = a6[k], s[7 * ss + k] = a7[k];
    }
}

// y[r][d] += sum_{j < nb} c[r * cs + j] * rows[j * rs + d] for r < nr (<= ATT_QB), d < HS: rows of
// keys or values weighted by a tile's probabilities, LANES of d at a time in ATT_QB sums.
static void tile_rows_update(float *const *y, int nr, const float *restrict c, int cs, const float *restrict rows,
                             size_t rs, int nb, int HS) {
    int d0 = 0;
    for (; d0 + LANES <= HS; d0 += LANES) {
        float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
        float a4[LANES] = {0}, a5[LANES] = {0}, a6[LANES] = {0}, a7[LANES] = {0};
        for (int j = 0; j < nb; j++) {
            const float *v = rows + (size_t)j * rs + d0;
            float c0 = c[j], c1 = c[cs + j], c2 = c[2 * cs + j], c3 = c[3 * cs + j];
            float c4 = c[4 * cs + j], c5 = c[5 * cs + j], c6 = c[6 * cs + j], c7 = c[7 * cs + j];
            for (int k = 0; k < LANES; k++) {
                a0[k] += c0 * v[k], a1[k] += c1 * v[k], a2[k] += c2 * v[k], a3[k] += c3 * v[k];
                a4[k] += c4 * v[k], a5[k] += c5 * v[k], a6[k] += c6 * v[k], a7[k] += c7 * v[k];
            }
        }
        lanes_add(y[0] + d0, a0, 1.0f);  // rows past nr repeat the last one: not stored
        if (nr > 1) lanes_add(y[1] + d0, a1, 1.0f);
        if (nr > 2) lanes_add(y[2] + d0, a2, 1.0f);
        if (nr > 3) lanes_add(y[3] + d0, a3, 1.0f);
        if (nr > 4) lanes_add(y[4] + d0, a4, 1.0f);
        if (nr > 5) lanes_add(y[5] + d0, a5, 1.0f);
        if (nr > 6) lanes_add(y[6] + d0, a6, 1.0f);
        if (nr > 7) lanes_add(y[7] + d0, a7, 1.0f);
    }
    for (; d0 < HS; d0++)  // the last elements when HS is not a multiple of LANES
        for (int r = 0; r < nr; r++) {
            float acc = 0;
            for (int j = 0; j < nb; j++) acc += c[r * cs + j] * rows[(size_t)j * rs + d0];
            y[r][d0] += acc;
        }
}

// cols[d * ld + j0 + k] += sum_r x[r][d] * c[r * LANES + k] for d < HS, k < LANES, r < ATT_QB:
// a tile's updates to LANES columns of a transposed [HS, ld] array (rows whose c is zero add nothing).
static void tile_cols_update(float *restrict cols, int ld, int j0, const float *const *x, const float *restrict c,
                             int HS) {
    float *dst = cols + j0;
    for (int d = 0; d < HS; d++, dst += ld) {
        float x0 = x[0][d], x1 = x[1][d], x2 = x[2][d], x3 = x[3][d], x4 = x[4][d], x5 = x[5][d], x6 = x[6][d], x7 = x[7][d];
        for (int k = 0; k < LANES; k++)
            dst[k] += ((x0 * c[k] + x1 * c[LANES + k]) + (x2 * c[2 * LANES + k] + x3 * c[3 * LANES + k])) +
                      ((x4 * c[4 * LANES + k] + x5 * c[5 * LANES + k]) + (x6 * c[6 * LANES + k] + x7 * c[7 * LANES + k]));
    }
}

// x[ATT_QB]: rows i0 .. of head h in a [T, H*HS] array, the last one repeated past T.
static void tile_rows(const float **x, const float *base, int i0, int T, int H, int h, int HS) {
    for (int r = 0; r < ATT_QB; r++) x[r] = base + ((size_t)min_int(i0 + r, T - 1) * H + h) * HS;
}

typedef struct {
    float *out, *lse;
    const float *q, *kt, *v;
    int T, pos0, NH, NKV, HS, ld;   // ld: columns of kt
} AttentionArgs;

// One query row against keys 0..n_keys-1, softmax computed online, ATT_BLOCK keys at a time
// (sequences shorter than ATT_QB tokens: generation).
// out[HS], *lse <- q[HS], kt [HS, ld] (the head's keys transposed), v [n_keys rows of `stride`]
static void attention_row(float *out, float *lse, const float *q, const float *kt, int ld, const float *v, int stride,
                          int n_keys, int HS) {
    float scale = 1.0f / sqrtf((float)HS), m = -INFINITY, s[ATT_BLOCK];
    double sum = 0;
    for (int d = 0; d < HS; d++) out[d] = 0;
    for (int j0 = 0; j0 < n_keys; j0 += ATT_BLOCK) {
        int nb = min_int(ATT_BLOCK, n_keys - j0);
        float bm = -INFINITY;
        scores_block(s, q, kt, ld, j0, nb, HS);
        for (int j = 0; j < nb; j++) {
            s[j] *= scale;
            bm = s[j] > bm ? s[j] : bm;
        }
        if (bm > m) {  // rescale what was summed under the old maximum
            float c = exp_f(m - bm);
            sum *= c;
            for (int d = 0; d < HS; d++) out[d] *= c;
            m = bm;
        }
        for (int j = 0; j < nb; j++) {
            float p = exp_f(s[j] - m);
            sum += p;
            axpy(out, p, v + (size_t)(j0 + j) * stride, HS);
        }
    }
    float inv = (float)(1.0 / sum);
    for (int d = 0; d < HS; d++) out[d] *= inv;
    if (lse) *lse = m + (float)log(sum);
}

static void attention_forward_rows(void *ctx, int start, int end) {
    const AttentionArgs *a = ctx;
    int QD = a->NH * a->HS, KD = a->NKV * a->HS, group = a->NH / a->NKV;
    for (int item = start; item < end; item++) {
        int h, i;
        balanced_item(item, a->NH, a->T, &h, &i);
        int g = h / group;
        attention_row(a->out + (size_t)i * QD + (size_t)h * a->HS, a->lse ? a->lse + (size_t)h * a->T + i : NULL,
                      a->q + (size_t)i * QD + (size_t)h * a->HS, a->kt + (size_t)g * a->HS * a->ld, a->ld,
                      a->v + (size_t)g * a->HS, KD, a->pos0 + i + 1, a->HS);
    }
}

// One block of ATT_QB query rows i0.. of head h against the keys they see, softmax computed
// online, ATT_BLOCK keys (ATT_BLOCK / LANES tiles) at a time; the same sums as attention_row,
// in tiles.
static void attention_block(const AttentionArgs *a, int h, int i0) {
    int HS = a->HS, KD = a->NKV * HS, g = h / (a->NH / a->NKV), nr = min_int(ATT_QB, a->T - i0);
    int n_keys = a->pos0 + i0 + nr;  // keys seen by the block's last row
    const float *kt = a->kt + (size_t)g * HS * a->ld, *v = a->v + (size_t)g * HS, *x[ATT_QB];
    float scale = 1.0f / sqrtf((float)HS), s[ATT_QB * ATT_BLOCK], m[ATT_QB], *out[ATT_QB];
    double sum[ATT_QB];
    tile_rows(x, a->q, i0, a->T, a->NH, h, HS);
    for (int r = 0; r < ATT_QB; r++) {
        out[r] = a->out + ((size_t)min_int(i0 + r, a->T - 1) * a->NH + h) * HS;
        m[r] = -INFINITY, sum[r] = 0;
    }
    for (int r = 0; r < nr; r++)
        for (int d = 0; d < HS; d++) out[r][d] = 0;
    for (int j0 = 0; j0 < n_keys; j0 += ATT_BLOCK) {
        int nb = min_int(ATT_BLOCK, n_keys - j0), nt = padded(nb);
        for (int t0 = 0; t0 < nt; t0 += LANES) tile_scores(s + t0, ATT_BLOCK, x, kt, a->ld, j0 + t0, HS);
        for (int r = 0; r < nr; r++) {
            float *sr = s + r * ATT_BLOCK, bm = -INFINITY, lanes[LANES] = {0};
            int seen = min_int(nb, a->pos0 + i0 + r + 1 - j0);  // keys of this block row r sees (>= 0)
            for (int j = 0; j < seen; j++) {
                sr[j] *= scale;
                bm = sr[j] > bm ? sr[j] : bm;
            }
            if (bm > m[r]) {  // rescale what was summed under the old maximum
                float c = exp_f(m[r] - bm);
                sum[r] *= c;
                for (int d = 0; d < HS; d++) out[r][d] *= c;
                m[r] = bm;
            }
            for (int t0 = 0; t0 < nt; t0 += LANES)
                for (int k = 0; k < LANES; k++) {
                    float p = exp_f(sr[t0 + k] - m[r]);  // computed either way: no branch
                    sr[t0 + k] = t0 + k < seen ? p : 0.0f;
                    lanes[k] += sr[t0 + k];
                }
            sum[r] += lanes_sum(lanes);
        }
        tile_rows_update(out, nr, s, ATT_BLOCK, v + (size_t)j0 * KD, (size_t)KD, nb, HS);
    }
    for (int r = 0; r < nr; r++) {
        float inv = (float)(1.0 / sum[r]);
        for (int d = 0; d < HS; d++) out[r][d] *= inv;
        if (a->lse) a->lse[(size_t)h * a->T + i0 + r] = m[r] + (float)log(sum[r]);
    }
}

static void attention_forward_blocks(void *ctx, int start, int end) {
    const AttentionArgs *a = ctx;
    for (int item = start; item < end; item++) {
        int h, blk;
        balanced_item(item, a->NH, (a->T + ATT_QB - 1) / ATT_QB, &h, &blk);
        attention_block(a, h, blk * ATT_QB);
    }
}

// Causal grouped-query attention: query head h uses kv head h / (NH / NKV), scale 1 / sqrt(HS).
// out[T, NH*HS], lse[NH, T] (or NULL) <- q[T, NH*HS] at positions pos0.., k, v [pos0+T, NKV*HS];
// work[NKV*HS*padded(pos0+T)]: the keys transposed. Row i sees keys 0..pos0+i; one thread per
// (h, block of ATT_QB rows), or per (h, row) for fewer than ATT_QB rows.
void attention_forward(float *out, float *lse, float *work, const float *q, const float *k, const float *v, int T,
                       int pos0, int NH, int NKV, int HS) {
    int ld = padded(pos0 + T);
    transpose_heads(work, k, pos0 + T, ld, NKV, HS);
    AttentionArgs a = {out, lse, q, work, v, T, pos0, NH, NKV, HS, ld};
    if (T >= ATT_QB) parallel_for(attention_forward_blocks, &a, NH * ((T + ATT_QB - 1) / ATT_QB), 1);
    else parallel_for(attention_forward_rows, &a, NH * T, 1);
}

typedef struct {
    float *dq, *dsum;
    float *dkt, *dvt;             // [NKV, HS, ld] dk, dv transposed
    const float *dout, *out, *q, *k, *lse;
    const float *kt, *vt;         // [NKV, HS, ld] k, v transposed
    int T, NH, NKV, HS, ld;
} AttentionBackArgs;

// p[r * LANES + k] = P_ij and ds[r * LANES + k] = scale dS_ij for the rows i = i0 + r of head h
// and the keys j = j0 + k (0 where j > i or i >= T), from the scores s and dp (= dy_i.v_j):
// P_ij = exp(scale s_ij - lse_i), dS_ij = P_ij (dp_ij - D_i), D_i = dy_i.y_i (dsum).
static void tile_probs(float *restrict p, float *restrict ds, const float *restrict s, const float *restrict dp,
                       const AttentionBackArgs *a, int h, int i0, int j0) {
    float scale = 1.0f / sqrtf((float)a->HS);
    for (int r = 0; r < ATT_QB; r++) {
        int i = min_int(i0 + r, a->T - 1), seen = i0 + r < a->T ? i + 1 - j0 : 0;  // keys j0.. row i sees
        float lse = a->lse[(size_t)h * a->T + i], D = a->dsum[(size_t)h * a->T + i];
        for (int k = 0; k < LANES; k++) {
            float e = exp_f(s[r * LANES + k] * scale - lse);  // computed either way: no branch
            p[r * LANES + k] = k < seen ? e : 0.0f;
            ds[r * LANES + k] = p[r * LANES + k] * (dp[r * LANES + k] - D) * scale;
        }
    }
}

// dq of one (head, block of ATT_QB query rows), a tile of LANES keys at a time:
// dq_i += scale sum_j dS_ij k_j
static void attention_backward_q_blocks(void *ctx, int start, int end) {
    const AttentionBackArgs *a = ctx;
    int HS = a->HS, T = a->T, QD = a->NH * HS, KD = a->NKV * HS, group = a->NH / a->NKV;
    float s[ATT_QB * LANES], dp[ATT_QB * LANES], p[ATT_QB * LANES], ds[ATT_QB * LANES], *dq[ATT_QB];
    const float *q[ATT_QB], *dy[ATT_QB];
    for (int item = start; item < end; item++) {
        int h, blk;
        balanced_item(item, a->NH, (T + ATT_QB - 1) / ATT_QB, &h, &blk);
        int i0 = blk * ATT_QB, nr = min_int(ATT_QB, T - i0), g = h / group;
        const float *kt = a->kt + (size_t)g * HS * a->ld, *vt = a->vt + (size_t)g * HS * a->ld;
        tile_rows(q, a->q, i0, T, a->NH, h, HS);
        tile_rows(dy, a->dout, i0, T, a->NH, h, HS);
        for (int r = 0; r < nr; r++) {
            size_t qi = (size_t)(i0 + r) * QD + (size_t)h * HS;
            dq[r] = a->dq + qi;
            a->dsum[(size_t)h * T + i0 + r] = dot(a->dout + qi, a->out + qi, HS);
        }
        for (int j0 = 0; j0 < i0 + nr; j0 += LANES) {
            tile_scores(s, LANES, q, kt, a->ld, j0, HS);
            tile_scores(dp, LANES, dy, vt, a->ld, j0, HS);
            tile_probs(p, ds, s, dp, a, h, i0, j0);
            tile_rows_update(dq, nr, ds, LANES, a->k + (size_t)j0 * KD + (size_t)g * HS, (size_t)KD,
                             min_int(LANES, i0 + nr - j0), HS);
        }
    }
}

// dk, dv for one kv head g and the LANES key rows j0.., summed over the query heads of its group
// and the query rows i >= j (ATT_QB rows at a time), into the transposed dkt, dvt (this item's
// columns only): dv_j += sum_i P_ij dy_i, dk_j += scale sum_i dS_ij q_i
static void attention_backward_kv_blocks(void *ctx, int start, int end) {
    const AttentionBackArgs *a = ctx;
    int HS = a->HS, T = a->T, group = a->NH / a->NKV, ntiles = padded(T) / LANES;
    float s[ATT_QB * LANES], dp[ATT_QB * LANES], p[ATT_QB * LANES], ds[ATT_QB * LANES];
    const float *q[ATT_QB], *dy[ATT_QB];
    for (int item = start; item < end; item++) {
        int g, tile;
        balanced_item(item, a->NKV, ntiles, &g, &tile);
        int j0 = (ntiles - 1 - tile) * LANES;  // short tiles (few rows below them) first
        const float *kt = a->kt + (size_t)g * HS * a->ld, *vt = a->vt + (size_t)g * HS * a->ld;
        for (int h = g * group; h < (g + 1) * group; h++) {
            for (int i0 = j0 / ATT_QB * ATT_QB; i0 < T; i0 += ATT_QB) {
                tile_rows(q, a->q, i0, T, a->NH, h, HS);
                tile_rows(dy, a->dout, i0, T, a->NH, h, HS);
                tile_scores(s, LANES, q, kt, a->ld, j0, HS);
                tile_scores(dp, LANES, dy, vt, a->ld, j0, HS);
                tile_probs(p, ds, s, dp, a, h, i0, j0);
                tile_cols_update(a->dvt + (size_t)g * HS * a->ld, a->ld, j0, dy, p, HS);
                tile_cols_update(a->dkt + (size_t)g * HS * a->ld, a->ld, j0, q, ds, HS);
            }
        }
    }
}

// dq of one (head, query row i), ATT_BLOCK keys at a time (sequences shorter than ATT_QB):
// P_ij = exp(s_ij - lse_i), dS_ij = P_ij (dy_i.v_j - D_i) with D_i = dy_i.y_i, dq_i += scale dS_ij k_j
static void attention_backward_q_rows(void *ctx, int start, int end) {
    const AttentionBackArgs *a = ctx;
    int QD = a->NH * a->HS, KD = a->NKV * a->HS, HS = a->HS, T = a->T, group = a->NH / a->NKV;
    float scale = 1.0f / sqrtf((float)HS), s[ATT_BLOCK], dp[ATT_BLOCK];
    for (int item = start; item < end; item++) {
        int h, i;
        balanced_item(item, a->NH, T, &h, &i);
        int g = h / group;
        size_t qi = (size_t)i * QD + (size_t)h * HS;
        const float *q = a->q + qi, *dy = a->dout + qi, *kt = a->kt + (size_t)g * HS * a->ld;
        const float *vt = a->vt + (size_t)g * HS * a->ld;
        float lse = a->lse[(size_t)h * T + i], D = dot(dy, a->out + qi, HS);
        a->dsum[(size_t)h * T + i] = D;
        for (int j0 = 0; j0 <= i; j0 += ATT_BLOCK) {
            int nb = min_int(ATT_BLOCK, i + 1 - j0);
            scores_block(s, q, kt, a->ld, j0, nb, HS);
            scores_block(dp, dy, vt, a->ld, j0, nb, HS);
            for (int j = 0; j < nb; j++) {
                float p = exp_f(s[j] * scale - lse);
                axpy(a->dq + qi, p * (dp[j] - D) * scale, a->k + (size_t)(j0 + j) * KD + (size_t)g * HS, HS);
            }
        }
    }
}

// dk, dv of one kv head g and one key row j (sequences shorter than ATT_QB), into dkt, dvt
static void attention_backward_kv_rows(void *ctx, int start, int end) {
    const AttentionBackArgs *a = ctx;
    int QD = a->NH * a->HS, HS = a->HS, T = a->T, group = a->NH / a->NKV;
    float scale = 1.0f / sqrtf((float)HS);
    for (int item = start; item < end; item++) {
        int g = item / T, j = item % T;
        float *dkt = a->dkt + (size_t)g * HS * a->ld + j, *dvt = a->dvt + (size_t)g * HS * a->ld + j;
        const float *kt = a->kt + (size_t)g * HS * a->ld + j, *vt = a->vt + (size_t)g * HS * a->ld + j;
        for (int h = g * group; h < (g + 1) * group; h++)
            for (int i = j; i < T; i++) {
                const float *q = a->q + (size_t)i * QD + (size_t)h * HS, *dy = a->dout + (size_t)i * QD + (size_t)h * HS;
                float s = 0, dp = 0;
                for (int d = 0; d < HS; d++) s += q[d] * kt[(size_t)d * a->ld], dp += dy[d] * vt[(size_t)d * a->ld];
                float p = exp_f(s * scale - a->lse[(size_t)h * T + i]), ds = p * (dp - a->dsum[(size_t)h * T + i]) * scale;
                for (int d = 0; d < HS; d++) dvt[(size_t)d * a->ld] += p * dy[d], dkt[(size_t)d * a->ld] += ds * q[d];
            }
    }
}

// dq[T, NH*HS], dk, dv [T, NKV*HS] +=, dsum[NH, T] <- dout, out [T, NH*HS], q, k, v, lse[NH, T];
// work[4*NKV*HS*padded(T)]. The softmax is recomputed from q, k and lse; every output is summed by
// one thread in a fixed order: dq by (head, block of rows), dk and dv by (kv head, tile of keys).
void attention_backward(float *dq, float *dk, float *dv, float *dsum, float *work, const float *dout, const float *out,
                        const float *q, const float *k, const float *v, const float *lse, int T, int NH, int NKV,
                        int HS) {
    int ld = padded(T);
    size_t KN = (size_t)NKV * HS * ld;
    float *kt = work, *vt = work + KN, *dkt = work + 2 * KN, *dvt = work + 3 * KN;
    transpose_heads(kt, k, T, ld, NKV, HS);
    transpose_heads(vt, v, T, ld, NKV, HS);
    memset(dkt, 0, 2 * KN * sizeof(float));
    AttentionBackArgs a = {dq, dsum, dkt, dvt, dout, out, q, k, lse, kt, vt, T, NH, NKV, HS, ld};
    if (T >= ATT_QB) {
        parallel_for(attention_backward_q_blocks, &a, NH * ((T + ATT_QB - 1) / ATT_QB), 1);
        parallel_for(attention_backward_kv_blocks, &a, NKV * (ld / LANES), 1);
    } else {
        parallel_for(attention_backward_q_rows, &a, NH * T, 1);
        parallel_for(attention_backward_kv_rows, &a, NKV * T, 1);
    }
    for (int t = 0; t < T; t++)  // dk, dv += the transposed sums
        for (int g = 0; g < NKV; g++)
            for (int d = 0; d < HS; d++) {
                size_t row = (size_t)t * NKV * HS + (size_t)g * HS + d, col = ((size_t)g * HS + d) * ld + t;
                dk[row] += dkt[col];
                dv[row] += dvt[col];
            }
}

typedef struct {
    float *a, *b;
    const float *c, *d, *e;
} Elementwise;

static float sigmoid(float x) { return 1.0f / (1.0f + exp_f(-x)); }

// h[n] = silu(gate[n]) * up[n] for one chunk, LANES at a time (so that compilers vectorize it)
static void swiglu_forward_chunk(float *restrict h, const float *restrict gate, const float *restrict up, int n) {
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) h[i + k] = gate[i + k] * sigmoid(gate[i + k]) * up[i + k];
    for (; i < n; i++) h[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

static void swiglu_forward_range(void *ctx, int start, int end) {
    const Elementwise *p = ctx;
    swiglu_forward_chunk(p->a + start, p->c + start, p->d + start, end - start);
}

// h[n] = silu(gate[n]) * up[n]
void swiglu_forward(float *h, const float *gate, const float *up, int n) {
    Elementwise p = {h, NULL, gate, up, NULL};
    parallel_for(swiglu_forward_range, &p, n, 1);
}

// dgate[n], dup[n] += for one chunk, LANES at a time
static void swiglu_backward_chunk(float *restrict dgate, float *restrict dup, const float *restrict dh,
                                  const float *restrict gate, const float *restrict up, int n) {
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) {
            float g = gate[i + k], s = sigmoid(g);
            dgate[i + k] += dh[i + k] * up[i + k] * s * (1.0f + g * (1.0f - s));
            dup[i + k] += dh[i + k] * g * s;
        }
    for (; i < n; i++) {
        float g = gate[i], s = sigmoid(g);
        dgate[i] += dh[i] * up[i] * s * (1.0f + g * (1.0f - s));
        dup[i] += dh[i] * g * s;
    }
}

static void swiglu_backward_range(void *ctx, int start, int end) {
    const Elementwise *p = ctx;
    swiglu_backward_chunk(p->a + start, p->b + start, p->c + start, p->d + start, p->e + start, end - start);
}

// dgate[n], dup[n] += <- dh[n], gate[n], up[n]
void swiglu_backward(float *dgate, float *dup, const float *dh, const float *gate, const float *up, int n) {
    Elementwise p = {dgate, dup, dh, gate, up};
    parallel_for(swiglu_backward_range, &p, n, 1);
}

// out[n] += inp[n]
static void residual_add(float *out, const float *inp, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] += inp[i];
}

// ---------------------------------------------------------------------------------------------
// LoRA: y = W x + b + s B (A dropout(x)), s = alpha / R. The kernels split work by output
// element and keep every sum in a fixed order; B is used transposed (s->bt = B^T [R, out]) so that
// the loops over the long `out` dimension run over contiguous memory.
//
// The three products below carry them. R is small (8), the other dimension long (C, FF): sums run
// in LANES lanes (blocks of 16 consecutive elements, which compilers keep in vector registers),
// over 4 rows of the short dimension at a time, so that each long vector is read once per 4 rows.
// Each output's order of summation depends on the sizes alone, not on how threads split the work.

// out[R] = M[R, n] x[n]: the rows of M (row stride ld) against one vector, 4 rows at a time
// (a missing fourth row repeats the first: computed, not stored).
static void rows_dot(float *out, const float *M, size_t ld, const float *x, int R, int n) {
    for (int r = 0; r < R; r += 4) {
        const float *m0 = M + (size_t)r * ld, *m1 = r + 1 < R ? m0 + ld : m0;
        const float *m2 = r + 2 < R ? m0 + 2 * ld : m0, *m3 = r + 3 < R ? m0 + 3 * ld : m0;
        float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
        int i = 0;
        for (; i + LANES <= n; i += LANES)
            for (int k = 0; k < LANES; k++) {
                float xk = x[i + k];
                a0[k] += m0[i + k] * xk, a1[k] += m1[i + k] * xk, a2[k] += m2[i + k] * xk, a3[k] += m3[i + k] * xk;
            }
        float s[4] = {lanes_sum(a0), lanes_sum(a1), lanes_sum(a2), lanes_sum(a3)};
        for (; i < n; i++)  // the last columns
            s[0] += m0[i] * x[i], s[1] += m1[i] * x[i], s[2] += m2[i] * x[i], s[3] += m3[i] * x[i];
        for (int k = 0; k < 4 && r + k < R; k++) out[r + k] = s[k];
    }
}

// y[i] += scale * sum_r c[r] M[r, i] for i < n (M's row stride ld), only where bit i of keep is
// set (keep NULL: everywhere). A block of LANES columns at a time, its rows added 4 at a time.
static void rows_combine(float *y, const float *c, const float *M, size_t ld, int R, int n, float scale,
                         const uint32_t *keep) {
    int i = 0;
    for (; i + LANES <= n; i += LANES) {
        float acc[LANES] = {0};
        int r = 0;
        for (; r + 4 <= R; r += 4) {
            const float *m = M + (size_t)r * ld + i;
            float c0 = c[r], c1 = c[r + 1], c2 = c[r + 2], c3 = c[r + 3];
            for (int k = 0; k < LANES; k++) acc[k] += (c0 * m[k] + c1 * m[ld + k]) + (c2 * m[2 * ld + k] + c3 * m[3 * ld + k]);
        }
        for (; r < R; r++)
            for (int k = 0; k < LANES; k++) acc[k] += c[r] * M[(size_t)r * ld + i + k];
        uint32_t bits = keep ? keep[i / 32] >> (i % 32) : 0xffff;  // i is a multiple of 16: this block's bits
        for (int k = 0; k < LANES; k++) y[i + k] += acc[k] * (scale * (float)(bits >> k & 1));  // no branch
    }
    for (; i < n; i++) {  // the last columns
        float acc = 0;
        for (int r = 0; r < R; r++) acc += c[r] * M[(size_t)r * ld + i];
        if (!keep || (keep[i / 32] >> (i % 32) & 1)) y[i] += scale * acc;
    }
}

// D[r, i] += scale * sum_t U[t, r] X[t, i] for r < R and the columns i in [i0, i1) (a multiple of
// LANES apart, but at the end of X's rows): D has row stride ldd, U is [T, R], X has row stride ldx.
// 4 rows of D at a time (a missing row repeats the first: computed, not stored), summed over
// every token in the lanes of a block of columns.
static void outer_cols(float *D, size_t ldd, const float *U, const float *X, size_t ldx, int T, int R, int i0, int i1,
                       float scale) {
    int i = i0;
    for (; i + LANES <= i1; i += LANES) {
        for (int r = 0; r < R; r += 4) {
            int r1 = r + 1 < R ? r + 1 : r, r2 = r + 2 < R ? r + 2 : r, r3 = r + 3 < R ? r + 3 : r;
            float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
            for (int t = 0; t < T; t++) {
                const float *x = X + (size_t)t * ldx + i, *u = U + (size_t)t * R;
                float u0 = u[r], u1 = u[r1], u2 = u[r2], u3 = u[r3];
                for (int k = 0; k < LANES; k++) a0[k] += u0 * x[k], a1[k] += u1 * x[k], a2[k] += u2 * x[k], a3[k] += u3 * x[k];
            }
            lanes_add(D + (size_t)r * ldd + i, a0, scale);
            if (r + 1 < R) lanes_add(D + (size_t)r1 * ldd + i, a1, scale);
            if (r + 2 < R) lanes_add(D + (size_t)r2 * ldd + i, a2, scale);
            if (r + 3 < R) lanes_add(D + (size_t)r3 * ldd + i, a3, scale);
        }
    }
    for (; i < i1; i++) {  // the last columns
        for (int r = 0; r < R; r++) {
            float acc = 0;
            for (int t = 0; t < T; t++) acc += U[(size_t)t * R + r] * X[(size_t)t * ldx + i];
            D[(size_t)r * ldd + i] += scale * acc;
        }
    }
}

typedef struct {
    const LoraSite *s;
    float *y;           // forward: y[T, out] +=
    float *dx;          // backward: dx[T, in] += (or NULL)
    const float *x;     // x[T, in]
    const float *dy;    // backward: dy[T, out]
    int T, in, out;
} LoraArgs;

// Inverted dropout: an input is kept with probability 1 - p (rng_hash_uniform(seed, site, t, i) >= p)
// and scaled by 1 / (1 - p). The forward pass draws the masks into s->keep, one bit per input;
// the backward pass reads them.
static int dropout_kept(const uint32_t *keep_row, int i) { return keep_row[i / 32] >> (i % 32) & 1; }

// xd[n] = x[n] * scale where the bit of keep[n / 32] is set, else 0
static void dropout_row(float *restrict xd, const float *restrict x, const uint32_t *keep, float scale, int n) {
    int i = 0;
    for (; i + 32 <= n; i += 32, x += 32, xd += 32) {  // a word of the mask at a time, without a branch
        uint32_t w = keep[i / 32];
        for (int j = 0; j < 32; j++) xd[j] = x[j] * (scale * (float)(int)(w >> j & 1));
    }
    for (int j = 0; i + j < n; j++) xd[j] = dropout_kept(keep, i + j) ? x[j] * scale : 0.0f;
}

// The input of A for token t: x[t] itself, or dropout(x[t]) written into its row of s->xdrop
// (draw = 1: the forward pass draws the masks first).
static const float *lora_input_row(const LoraArgs *a, int t, int draw) {
    const LoraSite *s = a->s;
    const float *x = a->x + (size_t)t * a->in;
    if (s->p <= 0) return x;
    uint32_t *keep = s->keep + (size_t)t * ((a->in + 31) / 32);
    if (draw) rng_hash_bits(keep, s->seed, s->site, (uint64_t)t, a->in, s->p);
    float *xd = s->xdrop + (size_t)t * a->in;
    dropout_row(xd, x, keep, 1.0f / (1.0f - s->p), a->in);
    return xd;
}

// s->bt[R, out] = B[out, R]^T
static void lora_transpose_B(const LoraSite *s, int out) {
    for (int o = 0; o < out; o++)
        for (int r = 0; r < s->R; r++) s->bt[(size_t)r * out + o] = s->pair->B[(size_t)o * s->R + r];
}

// Tokens [start, end): u[t, R] = A xd[t]; y[t] += s B u[t]
static void lora_forward_rows(void *ctx, int start, int end) {
    const LoraArgs *a = ctx;
    const LoraSite *s = a->s;
    for (int t = start; t < end; t++) {
        float *u = s->u + (size_t)t * s->R;
        rows_dot(u, s->pair->A, (size_t)a->in, lora_input_row(a, t, 1), s->R, a->in);
        rows_combine(a->y + (size_t)t * a->out, u, s->bt, (size_t)a->out, s->R, a->out, s->scale, NULL);
    }
}

// y[T, out] += s B[out, R] u, with u[T, R] = A[R, in] xd   (xd[T, in] = dropout(x)); one thread per token
void lora_forward(float *y, const LoraSite *s, const float *x, int T, int in, int out) {
    LoraArgs a = {s, y, NULL, x, NULL, T, in, out};
    lora_transpose_B(s, out);
    parallel_for(lora_forward_rows, &a, T, 1);
}

// Tokens [start, end): xd[t] again (for dA), du[t, r] = s sum_o dy[t, o] B[o, r], and
// dx[t, i] += dropout'(t, i) sum_r du[t, r] A[r, i]
static void lora_backward_rows(void *ctx, int start, int end) {
    const LoraArgs *a = ctx;
    const LoraSite *s = a->s;
    float dscale = s->p > 0 ? 1.0f / (1.0f - s->p) : 1.0f;
    for (int t = start; t < end; t++) {
        float *du = s->du + (size_t)t * s->R;
        lora_input_row(a, t, 0);
        rows_dot(du, s->bt, (size_t)a->out, a->dy + (size_t)t * a->out, s->R, a->out);
        for (int r = 0; r < s->R; r++) du[r] *= s->scale;
        if (a->dx)
            rows_combine(a->dx + (size_t)t * a->in, du, s->pair->A, (size_t)a->in, s->R, a->in, dscale,
                         s->p > 0 ? s->keep + (size_t)t * ((a->in + 31) / 32) : NULL);
    }
}

// Columns [start, end) of [0, padded(out) + in): the first padded(out) are dB's rows o,
// dB[o, r] += s sum_t dy[t, o] u[t, r] (summed in s->bt as dB^T), the others dA's columns i,
// dA[r, i] += sum_t du[t, r] xd[t, i]
static void lora_backward_cols(void *ctx, int start, int end) {
    const LoraArgs *a = ctx;
    const LoraSite *s = a->s;
    int ob = padded(a->out), o0 = start, o1 = min_int(end, a->out);
    if (o0 < o1) {
        for (int r = 0; r < s->R; r++) memset(s->bt + (size_t)r * a->out + o0, 0, (size_t)(o1 - o0) * sizeof(float));
        outer_cols(s->bt, (size_t)a->out, s->u, a->dy, (size_t)a->out, a->T, s->R, o0, o1, 1.0f);
        for (int o = o0; o < o1; o++)
            for (int r = 0; r < s->R; r++) s->pair->dB[(size_t)o * s->R + r] += s->scale * s->bt[(size_t)r * a->out + o];
    }
    int i0 = (start > ob ? start : ob) - ob, i1 = end - ob;
    if (i0 < i1)
        outer_cols(s->pair->dA, (size_t)a->in, s->du, s->p > 0 ? s->xdrop : a->x, (size_t)a->in, a->T, s->R, i0, i1, 1.0f);
}

// dA[R, in], dB[out, R] (in s->pair) +=, dx[T, in] += (when not NULL) <- dy[T, out], x[T, in], s->u;
// one thread per token, then per column of dB and dA
void lora_backward(float *dx, const LoraSite *s, const float *dy, const float *x, int T, int in, int out) {
    LoraArgs a = {s, NULL, dx, x, dy, T, in, out};
    lora_transpose_B(s, out);
    parallel_for(lora_backward_rows, &a, T, 1);
    parallel_for(lora_backward_cols, &a, padded(out) + in, LANES);  // s->bt now holds dB^T
}

// out[T, OUT] = inp[T, IN] W^T + bias (+ the adapter's update)
static void linear_forward(float *out, const float *inp, const QMatrix *W, const float *bias, const LoraSite *s, int T) {
    matmul(out, inp, W, bias, T);
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
    const float *cos, *sin;    // [max_T, HS/2]
    const int *seg;            // [B + 1] the sequences of the pass: rows seg[b] .. seg[b+1]-1 of every
    int B;                     // [T, ...] array; each attends only to itself, its positions start at 0
} Pass;

// RoPE and attention see one sequence at a time: the rows of sequence b, at its own positions
// (pos0.. for the one sequence of generation, 0.. in training). lse and dsum [NH, T_b] of each
// sequence lie one after the other.
static void rope_forward_seqs(const Pass *ps, float *x, int H, int pos0) {
    size_t D = (size_t)H * ps->c->HS;
    for (int b = 0; b < ps->B; b++)
        rope_forward(x + ps->seg[b] * D, ps->cos, ps->sin, ps->seg[b + 1] - ps->seg[b], pos0, H, ps->c->HS);
}

static void rope_backward_seqs(const Pass *ps, float *dx, int H) {
    size_t D = (size_t)H * ps->c->HS;
    for (int b = 0; b < ps->B; b++)
        rope_backward(dx + ps->seg[b] * D, ps->cos, ps->sin, ps->seg[b + 1] - ps->seg[b], H, ps->c->HS);
}

// out, lse <- q, k, v of layer buffers (k, v hold pos0 earlier positions first, generation only)
static void attention_forward_seqs(const Pass *ps, float *out, float *lse, const float *q, const float *k,
                                   const float *v, int pos0) {
    const Config *c = ps->c;
    size_t QD = (size_t)c->NH * c->HS, KD = (size_t)c->NKV * c->HS;
    for (int b = 0; b < ps->B; b++) {
        size_t o = (size_t)ps->seg[b];
        attention_forward(out + o * QD, lse ? lse + o * c->NH : NULL, ps->att_work, q + o * QD, k + o * KD, v + o * KD,
                          ps->seg[b + 1] - ps->seg[b], pos0, c->NH, c->NKV, c->HS);
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
    linear_forward(b->gate, b->ln, &lw->wgate, NULL, &sg, T);
    linear_forward(b->up, b->ln, &lw->wup, NULL, &su, T);
}

static void block_forward(const Pass *ps, int l, const LayerBufs *b, int T, int pos0) {
    const Config *c = ps->c;
    const LayerWeights *lw = &ps->w->layers[l];
    int C = c->C, KD = c->NKV * c->HS;
    LoraSite sq = lora_site(ps, l, LORA_Q, b->lora_u, T), sk = lora_site(ps, l, LORA_K, b->lora_u, T);
    LoraSite sv = lora_site(ps, l, LORA_V, b->lora_u, T), so = lora_site(ps, l, LORA_O, b->lora_u, T);
    LoraSite sd = lora_site(ps, l, LORA_DOWN, b->lora_u, T);
    float *k = b->k + (size_t)pos0 * KD, *v = b->v + (size_t)pos0 * KD;

    rmsnorm_forward(b->ln, b->rstd1, b->x, lw->attn_norm, T, C, c->rms_eps);
    linear_forward(b->q, b->ln, &lw->wq, lw->bq, &sq, T);
    linear_forward(k, b->ln, &lw->wk, lw->bk, &sk, T);
    linear_forward(v, b->ln, &lw->wv, lw->bv, &sv, T);
    rope_forward_seqs(ps, b->q, c->NH, pos0);
    rope_forward_seqs(ps, k, c->NKV, pos0);
    attention_forward_seqs(ps, b->att, b->lse, b->q, b->k, b->v, pos0);
    linear_forward(b->xmid, b->att, &lw->wo, NULL, &so, T);
    residual_add(b->xmid, b->x, (size_t)T * C);

    rmsnorm_forward(b->ln, b->rstd2, b->xmid, lw->ffn_norm, T, C, c->rms_eps);
    mlp_gate_up(ps, l, b, T);
    swiglu_forward(b->h, b->gate, b->up, T * c->FF);
    linear_forward(b->xout, b->h, &lw->wdown, NULL, &sd, T);
    residual_add(b->xout, b->xmid, (size_t)T * C);
}

// Gradient buffers of one layer's backward pass (scratch, reused by every layer).
typedef struct {
    float *dres;     // [T, C] in: d loss / d block output; out: d loss / d block input
    float *dln;      // [T, C]
    float *datt;     // [T, NH*HS]
    float *dq;       // [T, NH*HS]
    float *dk, *dv;  // [T, NKV*HS]
    float *dsum;     // [NH, T]
    float *dh;       // [T, FF]
    float *dgate;    // [T, FF]
    float *dup;      // [T, FF]
} GradBufs;

// dq, dk, dv, dsum of g +=  <- datt of g and the layer's saved q, k, v, att, lse: one sequence at a time
static void attention_backward_seqs(const Pass *ps, const GradBufs *g, const LayerBufs *b) {
    const Config *c = ps->c;
    size_t QD = (size_t)c->NH * c->HS, KD = (size_t)c->NKV * c->HS;
    for (int s = 0; s < ps->B; s++) {
        size_t o = (size_t)ps->seg[s];
        attention_backward(g->dq + o * QD, g->dk + o * KD, g->dv + o * KD, g->dsum + o * c->NH, ps->att_work,
                           g->datt + o * QD, b->att + o * QD, b->q + o * QD, b->k + o * KD, b->v + o * KD,
                           b->lse + o * c->NH, ps->seg[s + 1] - ps->seg[s], c->NH, c->NKV, c->HS);
    }
}

// recompute_ff: gate and up were not saved; run gate_proj and up_proj again (same dropout masks).
static void block_backward(const Pass *ps, int l, const LayerBufs *b, const GradBufs *g, int T, int recompute_ff) {
    const Config *c = ps->c;
    const LayerWeights *lw = &ps->w->layers[l];
    int C = c->C, FF = c->FF, QD = c->NH * c->HS, KD = c->NKV * c->HS;
    LoraSite sq = lora_site(ps, l, LORA_Q, b->lora_u, T), sk = lora_site(ps, l, LORA_K, b->lora_u, T);
    LoraSite sv = lora_site(ps, l, LORA_V, b->lora_u, T), so = lora_site(ps, l, LORA_O, b->lora_u, T);
    LoraSite sg = lora_site(ps, l, LORA_GATE, b->lora_u, T), su = lora_site(ps, l, LORA_UP, b->lora_u, T);
    LoraSite sd = lora_site(ps, l, LORA_DOWN, b->lora_u, T);
    float *dln_or_null = l > 0 ? g->dln : NULL;  // layer 0's input gradient would only reach the frozen embedding

    // MLP: xout = xmid + down(silu(gate(ln)) * up(ln)), ln = rmsnorm(xmid)
    rmsnorm_apply(b->ln, b->xmid, b->rstd2, lw->ffn_norm, T, C);
    if (recompute_ff) mlp_gate_up(ps, l, b, T);
    if (sd.pair) swiglu_forward(b->h, b->gate, b->up, T * FF);  // down_proj's input, for its adapter
    memset(g->dh, 0, (size_t)T * FF * sizeof(float));
    linear_backward(g->dh, g->dres, b->h, &lw->wdown, &sd, T);
    memset(g->dgate, 0, (size_t)T * FF * sizeof(float));
    memset(g->dup, 0, (size_t)T * FF * sizeof(float));
    swiglu_backward(g->dgate, g->dup, g->dh, b->gate, b->up, T * FF);
    memset(g->dln, 0, (size_t)T * C * sizeof(float));
    linear_backward(g->dln, g->dgate, b->ln, &lw->wgate, &sg, T);
    linear_backward(g->dln, g->dup, b->ln, &lw->wup, &su, T);
    rmsnorm_backward(g->dres, g->dln, b->xmid, b->rstd2, lw->ffn_norm, T, C);

    // attention: xmid = x + o(attention(rope(q(ln)), rope(k(ln)), v(ln))), ln = rmsnorm(x)
    memset(g->datt, 0, (size_t)T * QD * sizeof(float));
    linear_backward(g->datt, g->dres, b->att, &lw->wo, &so, T);
    memset(g->dq, 0, (size_t)T * QD * sizeof(float));
    memset(g->dk, 0, (size_t)T * KD * sizeof(float));
    memset(g->dv, 0, (size_t)T * KD * sizeof(float));
    attention_backward_seqs(ps, g, b);
    rope_backward_seqs(ps, g->dq, c->NH);
    rope_backward_seqs(ps, g->dk, c->NKV);
    rmsnorm_apply(b->ln, b->x, b->rstd1, lw->attn_norm, T, C);
    memset(g->dln, 0, (size_t)T * C * sizeof(float));
    linear_backward(dln_or_null, g->dq, b->ln, &lw->wq, &sq, T);
    linear_backward(dln_or_null, g->dk, b->ln, &lw->wk, &sk, T);
    linear_backward(dln_or_null, g->dv, b->ln, &lw->wv, &sv, T);
    if (l > 0) rmsnorm_backward(g->dres, g->dln, b->x, b->rstd1, lw->attn_norm, T, C);
}

// ---------------------------------------------------------------------------------------------
// Activations: everything the forward pass saves for the backward pass, and the scratch of both.

struct Activations {
    int max_T;
    int R;            // LoRA rank the arrays were sized for (0: no adapter)
    int L_ff;         // layers 0..L_ff-1 save gate/up; the others recompute them in the backward pass
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
    float *gate;      // [L_ff, max_T, FF] gate_proj output
    float *up;        // [L_ff, max_T, FF] up_proj output
    float *lora_u;    // [L, LORA_NTARGETS, max_T, R] A dropout(x) of each adapted projection (R = 0: none)
    uint32_t *keep;   // [L, LORA_NTARGETS, max_T, in / 32] dropout masks, bit set = kept (only with dropout)
    // scratch
    float *ln;        // [max_T, C]
    float *h;         // [max_T, FF]
    float *ff_gate;   // [max_T, FF] gate of a layer that recomputes it (L_ff < L)
    float *ff_up;     // [max_T, FF]
    float *xdrop;     // [max_T, max(C, FF, NH*HS)] dropout(x) (only when the adapter has dropout)
    float *lora_du;   // [max_T, R]
    float *lora_bt;   // [R, max(C, FF, NH*HS)]
    float *att_work;  // [4 * padded(max_T) * NKV*HS] attention scratch
    float *dres, *dln, *datt, *dq, *dk, *dv, *dsum, *dh, *dgate, *dup;  // GradBufs, for max_T
    // the loss at target positions, LOSS_CHUNK at a time
    int *tokens;      // [max_T] the tokens of the sequences of a pass, one after the other
    int *seg;         // [max_T + 1] where each sequence starts in them (and where the last ends)
    int *pos;         // [max_T] positions t - 1 of the targets t
    float *head_x;    // [LOSS_CHUNK, C] residual rows at those positions
    float *head_rstd; // [LOSS_CHUNK] final RMSNorm
    float *head_ln;   // [LOSS_CHUNK, C] final RMSNorm output
    float *dhead;     // [LOSS_CHUNK, C] gradient of head_ln, then of head_x
    float *logits;    // [LOSS_CHUNK, V] logits, then their gradient
    double *row_loss; // [LOSS_CHUNK]
    float *cos, *sin; // [max_T, HS/2] RoPE tables
    float *mem;       // the one allocation behind every float array above (keep, the int arrays, row_loss:
                      // their own)
};

// Carves n floats from *p.
static float *take(float **p, size_t n) {
    float *r = *p;
    *p += n;
    return r;
}

// Floats in Activations when L_ff layers keep their gate/up; also points the fields into a->mem
// when it is allocated.
static size_t activation_floats(const Config *c, int R, int dropout, int max_T, int L_ff, Activations *a) {
    size_t T = (size_t)max_T, C = c->C, L = c->L, FF = c->FF, QD = (size_t)c->NH * c->HS, KD = (size_t)c->NKV * c->HS;
    size_t recompute = L_ff < c->L ? 1 : 0, MX = C > FF ? C : FF, MO = MX > QD ? MX : QD;
    size_t sizes[] = {
        (L + 1) * T * C, L * T, L * T * QD, L * T * KD, L * T * KD, L * c->NH * T, L * T * QD, L * T * C, L * T,
        L_ff * T * FF, L_ff * T * FF, L * LORA_NTARGETS * T * R,
        T * C, T * FF, recompute * T * FF, recompute * T * FF, dropout ? T * MO : 0, T * R, MO * R, 4 * (size_t)padded(max_T) * KD,
        T * C, T * C, T * QD, T * QD, T * KD, T * KD, c->NH * T, T * FF, T * FF, T * FF,
        LOSS_CHUNK * C, LOSS_CHUNK, LOSS_CHUNK * C, LOSS_CHUNK * C, LOSS_CHUNK * (size_t)c->V,
        T * (c->HS / 2), T * (c->HS / 2),
    };
    float **fields[] = {
        &a->x, &a->rstd1, &a->q, &a->k, &a->v, &a->lse, &a->att, &a->xmid, &a->rstd2, &a->gate, &a->up, &a->lora_u,
        &a->ln, &a->h, &a->ff_gate, &a->ff_up, &a->xdrop, &a->lora_du, &a->lora_bt, &a->att_work,
        &a->dres, &a->dln, &a->datt, &a->dq, &a->dk, &a->dv, &a->dsum, &a->dh, &a->dgate, &a->dup,
        &a->head_x, &a->head_rstd, &a->head_ln, &a->dhead, &a->logits, &a->cos, &a->sin,
    };
    size_t total = 0;
    float *p = a->mem;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        total += sizes[i];
        if (p) *fields[i] = sizes[i] ? take(&p, sizes[i]) : NULL;
    }
    return total;
}

Activations *activations_new(const Config *c, const struct Lora *lora, int max_T) {
    return activations_new_budget(c, lora, max_T, ACT_BUDGET);
}

Activations *activations_new_budget(const Config *c, const struct Lora *lora, int max_T, size_t budget) {
    Activations *a = xcalloc(1, sizeof *a);
    int R = lora ? lora->R : 0, dropout = lora && lora->dropout > 0;
    a->max_T = max_T;
    a->R = R;
    a->L_ff = c->L;  // keep the gate/up of as many layers as the budget allows
    while (a->L_ff > 0 && activation_floats(c, R, dropout, max_T, a->L_ff, a) * sizeof(float) > budget) a->L_ff--;
    a->mem = xmalloc(activation_floats(c, R, dropout, max_T, a->L_ff, a) * sizeof(float));
    activation_floats(c, R, dropout, max_T, a->L_ff, a);
    if (dropout) a->keep = xmalloc(keep_offset(c, c->L, 0, max_T) * sizeof(uint32_t));
    a->pos = xmalloc((size_t)max_T * sizeof(int));
    a->tokens = xmalloc((size_t)max_T * sizeof(int));
    a->seg = xmalloc(((size_t)max_T + 1) * sizeof(int));
    a->row_loss = xmalloc(LOSS_CHUNK * sizeof(double));
    rope_tables(a->cos, a->sin, max_T, c->HS, c->rope_theta);
    return a;
}

int activations_max_T(const Activations *a) { return a->max_T; }

void activations_free(Activations *a) {
    if (!a) return;
    free(a->mem);
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
    LayerBufs b = {
        .x = a->x + l * T * C, .rstd1 = a->rstd1 + l * T, .q = a->q + l * T * QD, .k = a->k + l * T * KD,
        .v = a->v + l * T * KD, .lse = a->lse + l * c->NH * T, .att = a->att + l * T * QD, .xmid = a->xmid + l * T * C,
        .rstd2 = a->rstd2 + l * T, .gate = keep ? a->gate + l * T * c->FF : a->ff_gate,
        .up = keep ? a->up + l * T * c->FF : a->ff_up, .xout = a->x + (l + 1) * T * C,
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

// Returns sum_r row_loss[r], row_loss[n] = logsumexp(logits[r]) - logits[r, targets[r]] <- logits[n, V],
// which is overwritten: with backward, by grad_scale * (softmax - onehot(target)). One thread per row.
double crossentropy(float *logits, double *row_loss, const int *targets, int n, int V, float grad_scale, int backward) {
    XentArgs a = {logits, row_loss, targets, V, grad_scale, backward};
    parallel_for(crossentropy_rows, &a, n, 1);
    double loss = 0;
    for (int r = 0; r < n; r++) loss += row_loss[r];
    return loss;
}

// Sum of the NLLs of the n targets whose previous positions are pos[n]; with backward, adds the
// gradient into dres[T, C] (rows pos). x[T, C] is the residual stream after the last layer.
static double head_loss_chunk(Model *m, Activations *a, float *dres, const float *x, const int *pos, const int *targets,
                              int n, float grad_scale, int backward) {
    const Config *c = &m->config;
    size_t C = c->C;
    for (int r = 0; r < n; r++) memcpy(a->head_x + r * C, x + (size_t)pos[r] * C, C * sizeof(float));
    rmsnorm_forward(a->head_ln, a->head_rstd, a->head_x, m->w.out_norm, n, c->C, c->rms_eps);
    matmul(a->logits, a->head_ln, &m->w.lm_head, NULL, n);
    double loss = crossentropy(a->logits, a->row_loss, targets, n, c->V, grad_scale, backward);
    if (backward) {
        memset(a->dhead, 0, (size_t)n * C * sizeof(float));
        matmul_backward_input(a->dhead, a->logits, &m->w.lm_head, n);
        for (int r = 0; r < n; r++)  // positions are distinct: each row lands in its own row of dres
            rmsnorm_backward(dres + (size_t)pos[r] * C, a->dhead + r * C, a->head_x + r * C, a->head_rstd + r,
                             m->w.out_norm, 1, c->C);
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

// Lays the sequences out one after the other: seg[B + 1] row offsets (each cut after its last
// target), their tokens in a->tokens; returns the rows in all, or -1 on bad input or past max_T.
static int stack_sequences(Activations *a, const Config *c, const Sequence *seqs, int B) {
    if (B < 0 || B > a->max_T) return -1;
    a->seg[0] = 0;
    for (int b = 0; b < B; b++) {
        int n = positions_needed(c, seqs[b].tokens, seqs[b].mask, seqs[b].T);
        if (n < 0 || seqs[b].T > a->max_T || n > a->max_T - a->seg[b]) return -1;
        memcpy(a->tokens + a->seg[b], seqs[b].tokens, (size_t)n * sizeof(int));
        a->seg[b + 1] = a->seg[b] + n;
    }
    return a->seg[B];
}

// Sum of the NLLs of every target of the sequences, after the last layer (x[T, C], rows as in
// a->seg); with backward, their gradient lands in a->dres.
static double head_loss(Model *m, Activations *a, const float *x, const Sequence *seqs, int B, float grad_scale,
                        int backward) {
    int n = 0, targets[LOSS_CHUNK];
    double loss = 0;
    for (int b = 0; b < B; b++) {
        int T = a->seg[b + 1] - a->seg[b];
        for (int t = 1; t <= T; t++) {
            if (seqs[b].mask[t]) a->pos[n] = a->seg[b] + t - 1, targets[n++] = seqs[b].tokens[t];
            if (n == LOSS_CHUNK) loss += head_loss_chunk(m, a, a->dres, x, a->pos, targets, n, grad_scale, backward), n = 0;
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
    Pass ps = {c, &m->w, lora, 0, dropout_seed, a->xdrop, a->keep, a->lora_du, a->lora_bt, a->att_work, a->cos, a->sin,
               a->seg, B};
    if (lora && dropout_seed != 0 && lora->dropout > 0) ps.p = lora->dropout;
    backward = backward && lora;

    embed_forward(a->x, a->tokens, &m->w.embed, T);
    float *xL = a->x;
    for (int l = 0; l < c->L; l++) {
        // Without a backward pass nothing needs keeping: every layer runs in layer 0's arrays (the
        // others stay untouched and cost no memory), the residual stream alternating x[0], x[1].
        LayerBufs b = layer_bufs(a, c, lora, backward ? l : 0);
        if (!backward) b.x = xL, b.xout = a->x + (size_t)((l + 1) % 2) * a->max_T * c->C;
        block_forward(&ps, l, &b, T, 0);
        xL = b.xout;
    }

    if (backward) memset(a->dres, 0, (size_t)T * c->C * sizeof(float));
    double loss = head_loss(m, a, xL, seqs, B, grad_scale, backward);
    if (!backward) return loss;

    GradBufs g = {a->dres, a->dln, a->datt, a->dq, a->dk, a->dv, a->dsum, a->dh, a->dgate, a->dup};
    for (int l = c->L - 1; l >= 0; l--) {
        LayerBufs b = layer_bufs(a, c, lora, l);
        block_backward(&ps, l, &b, &g, T, l >= a->L_ff);
    }
    return loss;
}

// ---------------------------------------------------------------------------------------------
// Generation: keys and values of past tokens, and the scratch for INFER_CHUNK new tokens.

struct KVCache {
    int max_T;         // capacity in tokens
    int n;             // tokens in the cache
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
int kvcache_len(const KVCache *kv) { return kv->n; }

// Runs tokens[n] (n <= INFER_CHUNK) at positions kv->n ...; logits[V] of the last one when not NULL.
static void infer_chunk(Model *m, const Lora *lora, KVCache *kv, const int *tokens, int n, float *logits) {
    const Config *c = &m->config;
    size_t KD = (size_t)c->NKV * c->HS;
    int seg[2] = {0, n};
    Pass ps = {c, &m->w, lora, 0, 0, NULL, NULL, NULL, kv->lora_bt, kv->att_work, kv->cos, kv->sin, seg, 1};
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
    matmul(logits, kv->ln, &m->w.lm_head, NULL, 1);
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
