// attention.c: causal grouped-query attention, forward and backward, twice: the textbook
// definition (plain loops over head, query and key; the reference build runs it) and the tiled
// version that runs otherwise (online softmax, keys transposed, 16-lane tiles, one thread per
// block of rows). test/test_model.c checks one against the other and both by finite differences.
#include "attention.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "threads.h"
#include "vec.h"

// Products are rounded as written (no fused multiply-add), as in quant.c.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#define ATT_BLOCK 64           // keys scored at one time by the attention kernels
#define ATT_QB 8               // query rows of an attention tile (the tile code names 8 sums)

// ---------------------------------------------------------------------------------------------
// The textbook version: the definition, one head, one query row, one key at a time.

// out[T, NH*HS], lse[NH, T] (or NULL) <- q[T, NH*HS] at positions pos0.., k, v [pos0+T, NKV*HS];
// p = work[pos0+T]: one row of probabilities. For head h and row i (position pos0 + i):
//   s_j = q_i . k_j / sqrt(HS) for the keys j <= pos0 + i,  p_j = exp(s_j - max) / sum,
//   out_i = sum_j p_j v_j,  lse_i = max + log(sum)
void attention_forward_ref(float *out, float *lse, float *work, const float *q, const float *k, const float *v, int T,
                           int pos0, int NH, int NKV, int HS) {
    int QD = NH * HS, KD = NKV * HS;
    float scale = 1.0f / sqrtf((float)HS), *p = work;
    for (int h = 0; h < NH; h++) {
        int g = h / (NH / NKV);  // the kv head of query head h
        for (int i = 0; i < T; i++) {
            const float *qi = q + (size_t)i * QD + (size_t)h * HS;
            float *oi = out + (size_t)i * QD + (size_t)h * HS, max = -INFINITY;
            int n_keys = pos0 + i + 1;
            for (int j = 0; j < n_keys; j++) {
                const float *kj = k + (size_t)j * KD + (size_t)g * HS;
                float s = 0;
                for (int d = 0; d < HS; d++) s += qi[d] * kj[d];
                p[j] = s * scale;
                if (p[j] > max) max = p[j];
            }
            double sum = 0;
            for (int j = 0; j < n_keys; j++) sum += p[j] = expf(p[j] - max);
            for (int d = 0; d < HS; d++) oi[d] = 0;
            for (int j = 0; j < n_keys; j++) {
                const float *vj = v + (size_t)j * KD + (size_t)g * HS;
                float pj = (float)(p[j] / sum);
                for (int d = 0; d < HS; d++) oi[d] += pj * vj[d];
            }
            if (lse) lse[(size_t)h * T + i] = max + (float)log(sum);
        }
    }
}

// dq[T, NH*HS] +=, dk, dv [pos0+T, NKV*HS] +=, dsum[NH, T] <- dout, out [T, NH*HS], q at positions
// pos0.., k, v [pos0+T, NKV*HS], lse[NH, T] (work is not needed). For head h, row i and each key
// j <= pos0 + i, with the probability p_ij recomputed from lse_i and D_i = dout_i . out_i (in dsum):
//   dv_j += p_ij dout_i,  ds_ij = p_ij (dout_i . v_j - D_i) / sqrt(HS),
//   dq_i += ds_ij k_j,    dk_j += ds_ij q_i
void attention_backward_ref(float *dq, float *dk, float *dv, float *dsum, float *work, const float *dout,
                            const float *out, const float *q, const float *k, const float *v, const float *lse, int T,
                            int pos0, int NH, int NKV, int HS) {
    (void)work;
    int QD = NH * HS, KD = NKV * HS;
    float scale = 1.0f / sqrtf((float)HS);
    for (int h = 0; h < NH; h++) {
        int g = h / (NH / NKV);
        for (int i = 0; i < T; i++) {
            size_t qi = (size_t)i * QD + (size_t)h * HS;
            float D = 0;
            for (int d = 0; d < HS; d++) D += dout[qi + d] * out[qi + d];
            dsum[(size_t)h * T + i] = D;
            for (int j = 0; j <= pos0 + i; j++) {
                size_t kj = (size_t)j * KD + (size_t)g * HS;
                float s = 0, dp = 0;
                for (int d = 0; d < HS; d++) s += q[qi + d] * k[kj + d], dp += dout[qi + d] * v[kj + d];
                float p = expf(s * scale - lse[(size_t)h * T + i]), ds = p * (dp - D) * scale;
                for (int d = 0; d < HS; d++) {
                    dv[kj + d] += p * dout[qi + d];
                    dq[qi + d] += ds * k[kj + d];
                    dk[kj + d] += ds * q[qi + d];
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The dispatch: the textbook version in the reference build, the tiled one otherwise.

void attention_forward(float *out, float *lse, float *work, const float *q, const float *k, const float *v, int T,
                       int pos0, int NH, int NKV, int HS) {
    double t0 = trace_start();
#if defined(SFT_REF)
    attention_forward_ref(out, lse, work, q, k, v, T, pos0, NH, NKV, HS);
#else
    attention_forward_tiled(out, lse, work, q, k, v, T, pos0, NH, NKV, HS);
#endif
    trace_op(t0, "attention_forward", "out[%d, %d*%d], lse <- q[%d, %d*%d], k, v[%d, %d*%d]",
             T, NH, HS, T, NH, HS, pos0 + T, NKV, HS);
}

void attention_backward(float *dq, float *dk, float *dv, float *dsum, float *work, const float *dout, const float *out,
                        const float *q, const float *k, const float *v, const float *lse, int T, int pos0, int NH,
                        int NKV, int HS) {
    double t0 = trace_start();
#if defined(SFT_REF)
    attention_backward_ref(dq, dk, dv, dsum, work, dout, out, q, k, v, lse, T, pos0, NH, NKV, HS);
#else
    attention_backward_tiled(dq, dk, dv, dsum, work, dout, out, q, k, v, lse, T, pos0, NH, NKV, HS);
#endif
    trace_op(t0, "attention_backward", "dq[%d, %d*%d], dk, dv[%d, %d*%d] += <- dout[%d, %d*%d]",
             T, NH, HS, pos0 + T, NKV, HS, T, NH, HS);
}

// ---------------------------------------------------------------------------------------------
// The tiled version.

// Work item k of NH * T -> (head, query row), interleaving short and long causal rows
// (0, T-1, 1, T-2, ...) so that contiguous chunks of items cost about the same.
static void balanced_item(int k, int H, int T, int *h, int *i) {
    int p = k / H, half = p >> 1;
    *h = k % H;
    *i = (p & 1) ? T - 1 - half : half;
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
void attention_forward_tiled(float *out, float *lse, float *work, const float *q, const float *k, const float *v,
                             int T, int pos0, int NH, int NKV, int HS) {
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
    int T, pos0, NH, NKV, HS, ld; // query rows at positions pos0..; pos0 + T keys
} AttentionBackArgs;

// p[r * LANES + k] = P_ij and ds[r * LANES + k] = scale dS_ij for the rows i = i0 + r of head h
// and the keys j = j0 + k (0 where j > pos0 + i or i >= T), from the scores s and dp (= dy_i.v_j):
// P_ij = exp(scale s_ij - lse_i), dS_ij = P_ij (dp_ij - D_i), D_i = dy_i.y_i (dsum).
static void tile_probs(float *restrict p, float *restrict ds, const float *restrict s, const float *restrict dp,
                       const AttentionBackArgs *a, int h, int i0, int j0) {
    float scale = 1.0f / sqrtf((float)a->HS);
    for (int r = 0; r < ATT_QB; r++) {
        int i = min_int(i0 + r, a->T - 1), seen = i0 + r < a->T ? a->pos0 + i + 1 - j0 : 0;  // keys j0.. row i sees
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
        for (int j0 = 0; j0 < a->pos0 + i0 + nr; j0 += LANES) {
            tile_scores(s, LANES, q, kt, a->ld, j0, HS);
            tile_scores(dp, LANES, dy, vt, a->ld, j0, HS);
            tile_probs(p, ds, s, dp, a, h, i0, j0);
            tile_rows_update(dq, nr, ds, LANES, a->k + (size_t)j0 * KD + (size_t)g * HS, (size_t)KD,
                             min_int(LANES, a->pos0 + i0 + nr - j0), HS);
        }
    }
}

// dk, dv for one kv head g and the LANES key rows j0.., summed over the query heads of its group
// and the query rows i >= j - pos0 (ATT_QB rows at a time), into the transposed dkt, dvt (this item's
// columns only): dv_j += sum_i P_ij dy_i, dk_j += scale sum_i dS_ij q_i
static void attention_backward_kv_blocks(void *ctx, int start, int end) {
    const AttentionBackArgs *a = ctx;
    int HS = a->HS, T = a->T, group = a->NH / a->NKV, ntiles = a->ld / LANES;
    float s[ATT_QB * LANES], dp[ATT_QB * LANES], p[ATT_QB * LANES], ds[ATT_QB * LANES];
    const float *q[ATT_QB], *dy[ATT_QB];
    for (int item = start; item < end; item++) {
        int g, tile;
        balanced_item(item, a->NKV, ntiles, &g, &tile);
        int j0 = (ntiles - 1 - tile) * LANES;  // short tiles (few rows below them) first
        const float *kt = a->kt + (size_t)g * HS * a->ld, *vt = a->vt + (size_t)g * HS * a->ld;
        for (int h = g * group; h < (g + 1) * group; h++) {
            for (int i0 = (j0 > a->pos0 ? j0 - a->pos0 : 0) / ATT_QB * ATT_QB; i0 < T; i0 += ATT_QB) {
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
        for (int j0 = 0; j0 <= a->pos0 + i; j0 += ATT_BLOCK) {
            int nb = min_int(ATT_BLOCK, a->pos0 + i + 1 - j0);
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
    int QD = a->NH * a->HS, HS = a->HS, T = a->T, group = a->NH / a->NKV, keys = a->pos0 + T;
    float scale = 1.0f / sqrtf((float)HS);
    for (int item = start; item < end; item++) {
        int g = item / keys, j = item % keys;
        float *dkt = a->dkt + (size_t)g * HS * a->ld + j, *dvt = a->dvt + (size_t)g * HS * a->ld + j;
        const float *kt = a->kt + (size_t)g * HS * a->ld + j, *vt = a->vt + (size_t)g * HS * a->ld + j;
        for (int h = g * group; h < (g + 1) * group; h++)
            for (int i = j > a->pos0 ? j - a->pos0 : 0; i < T; i++) {
                const float *q = a->q + (size_t)i * QD + (size_t)h * HS, *dy = a->dout + (size_t)i * QD + (size_t)h * HS;
                float s = 0, dp = 0;
                for (int d = 0; d < HS; d++) s += q[d] * kt[(size_t)d * a->ld], dp += dy[d] * vt[(size_t)d * a->ld];
                float p = exp_f(s * scale - a->lse[(size_t)h * T + i]), ds = p * (dp - a->dsum[(size_t)h * T + i]) * scale;
                for (int d = 0; d < HS; d++) dvt[(size_t)d * a->ld] += p * dy[d], dkt[(size_t)d * a->ld] += ds * q[d];
            }
    }
}

// dq[T, NH*HS] +=, dk, dv [pos0+T, NKV*HS] +=, dsum[NH, T] <- dout, out [T, NH*HS], q at positions
// pos0.., k, v [pos0+T, NKV*HS], lse[NH, T]; work[4*NKV*HS*padded(pos0+T)]. The softmax is
// recomputed from q, k and lse; every output is summed by one thread in a fixed order: dq by
// (head, block of rows), dk and dv by (kv head, tile of keys).
void attention_backward_tiled(float *dq, float *dk, float *dv, float *dsum, float *work, const float *dout,
                              const float *out, const float *q, const float *k, const float *v, const float *lse,
                              int T, int pos0, int NH, int NKV, int HS) {
    int keys = pos0 + T, ld = padded(keys);
    size_t KN = (size_t)NKV * HS * ld;
    float *kt = work, *vt = work + KN, *dkt = work + 2 * KN, *dvt = work + 3 * KN;
    transpose_heads(kt, k, keys, ld, NKV, HS);
    transpose_heads(vt, v, keys, ld, NKV, HS);
    memset(dkt, 0, 2 * KN * sizeof(float));
    AttentionBackArgs a = {dq, dsum, dkt, dvt, dout, out, q, k, lse, kt, vt, T, pos0, NH, NKV, HS, ld};
    if (T >= ATT_QB) {
        parallel_for(attention_backward_q_blocks, &a, NH * ((T + ATT_QB - 1) / ATT_QB), 1);
        parallel_for(attention_backward_kv_blocks, &a, NKV * (ld / LANES), 1);
    } else {
        parallel_for(attention_backward_q_rows, &a, NH * T, 1);
        parallel_for(attention_backward_kv_rows, &a, NKV * keys, 1);
    }
    for (int t = 0; t < keys; t++)  // dk, dv += the transposed sums
        for (int g = 0; g < NKV; g++)
            for (int d = 0; d < HS; d++) {
                size_t row = (size_t)t * NKV * HS + (size_t)g * HS + d, col = ((size_t)g * HS + d) * ld + t;
                dk[row] += dkt[col];
                dv[row] += dvt[col];
            }
}
