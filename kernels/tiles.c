// kernels/tiles.c: the drivers of the fast products, in portable C: for many tokens, the register
// tiles (matmul_tiles, matmul_backward_tiles); for few tokens, a row of W at a time
// (matmul_rows, matmul_backward_rows); and the same tiles, dot products and conversions in plain
// C, which dispatch.c picks where the build has no instruction set for them.
//
// Each product is a thin wrapper, which packs the activations and calls parallel_for, and one
// range function, the work on output rows [r0, r1) (forward) or input columns [c0, c1)
// (backward). Every output element is computed by one thread in an order fixed by the sizes
// alone, so results do not depend on the thread count. The tiles themselves (fwd_tile, bwd_tile)
// and the decoders (dequantize_span) are this build's, from dispatch.c.
#include "../threads.h"
#include "kernels.h"

// --- Many tokens: the forward tiles --------------------------------------------------------------

// out[n] = the words of in[n]: fp32 values (pairs = 0) or bf16 pairs (pairs = 1, (n + 1) / 2 words).
static void to_words(uint32_t *out, const float *in, int n, int pairs) {
    if (pairs) to_bf16_pairs(out, in, n);
    else memcpy(out, in, (size_t)n * sizeof(float));
}

// out[t, o0 + n] = stage[n * TP + t] (+ bias) for n < nrows: a block of finished rows, written a
// token row at a time after the tokens that fwd_flush_simd transposed in registers.
void fwd_flush(const Fwd *f, const float *stage, int o0, int nrows) {
    int OUT = f->W->rows;
    for (int t = fwd_flush_simd(f, stage, o0, nrows); t < f->T; t++) {
        float *y = f->out + (size_t)t * OUT + o0;
        for (int n = 0; n < nrows; n++) y[n] = stage[(size_t)n * f->TP + t];
        if (f->bias)
            for (int n = 0; n < nrows; n++) y[n] += f->bias[o0 + n];
    }
}

// Rows [r0, r1) of the output, every token: blocks of FWD_BLOCK rows, K-chunk by K-chunk (so
// that the chunk of packed activations stays in the cache while the block's rows go through it),
// FWD_N rows at a time; the block's sums wait in the thread's staging buffer.
static void matmul_tiles_range(void *ctx, int r0, int r1) {
    const Fwd *f = ctx;
    const QMatrix *W = f->W;
    int IN = W->cols, KW = f->pairs ? (f->KC + 1) / 2 : f->KC, NV = f->TP / 16;
    float *tmp = scratch_local((size_t)f->KC * sizeof(float) + (size_t)FWD_N * KW * sizeof(uint32_t) +
                               (size_t)FWD_BLOCK * f->TP * sizeof(float));
    uint32_t *wb = (uint32_t *)(tmp + f->KC);
    float *stage = (float *)(wb + (size_t)FWD_N * KW);
    for (int b0 = r0; b0 < r1; b0 += FWD_BLOCK) {
        int b1 = r1 - b0 < FWD_BLOCK ? r1 : b0 + FWD_BLOCK;
        for (int k0 = 0; k0 < IN; k0 += f->KC) {
            int kn = IN - k0 < f->KC ? IN - k0 : f->KC, K = f->pairs ? (kn + 1) / 2 : kn;
            for (int o0 = b0; o0 < b1; o0 += FWD_N) {
                FwdTile tl = {b1 - o0 < FWD_N ? b1 - o0 : FWD_N, 0, f->pairs ? k0 / 2 : k0, K, k0 == 0, wb,
                              stage + (size_t)(o0 - b0) * f->TP};
                for (int n = 0; n < FWD_N; n++) {
                    if (n < tl.nrows) {
                        dequantize_span(W->type, tmp, qmatrix_row_data(W, o0 + n), k0, kn);
                        to_words(wb + (size_t)n * K, tmp, kn, f->pairs);
                    } else {
                        memset(wb + (size_t)n * K, 0, (size_t)K * sizeof(uint32_t));
                    }
                }
                for (tl.tv0 = 0; tl.tv0 < NV; tl.tv0 += 4) fwd_tile(f, &tl, NV - tl.tv0 < 4 ? NV - tl.tv0 : 4);
            }
        }
        fwd_flush(f, stage, b0, b1 - b0);
    }
}

// Tokens [t0, t1) (multiples of 16, but t1 = TP) of inp packed into f->x.
typedef struct {
    Fwd *f;
    const float *inp;
} PackX;

static void pack_x(void *ctx, int t0, int t1) {
    PackX *px = ctx;
    Fwd *f = px->f;
    int IN = f->W->cols, K = f->pairs ? (IN + 1) / 2 : IN;
    uint32_t *words = scratch_local((size_t)K * sizeof(uint32_t));
    uint32_t *x = (uint32_t *)f->x;
    for (int t = t0; t < t1; t++) {
        if (t < f->T) to_words(words, px->inp + (size_t)t * IN, IN, f->pairs);
        else memset(words, 0, (size_t)K * sizeof(uint32_t));
        for (int k = 0; k < K; k++) memcpy(x + (size_t)k * f->TP + t, words + k, sizeof(uint32_t));
    }
}

// out[T, OUT] = inp[T, IN] W^T (+ bias): the activations packed as words (bf16 pairs or fp32, by
// tile_pairs), then the rows of W split among the threads.
void matmul_tiles(float *out, const float *inp, const QMatrix *W, const float *bias, int T) {
    int OUT = W->rows, IN = W->cols, TP = (int)round_up((size_t)T, 16), pairs = tile_pairs(W->type);
    // K-chunks keep the packed activations of a chunk (TP x KC values) within ~256 KB.
    int KC = (int)(round_up((size_t)(256 * 1024 / (pairs ? 2 : 4) / TP), CHUNK_ALIGN));
    if (KC < CHUNK_ALIGN) KC = CHUNK_ALIGN;
    if (KC >= IN) KC = (int)round_up((size_t)IN, 2);
    size_t words = pairs ? (size_t)(IN + 1) / 2 : (size_t)IN;
    uint32_t *x = scratch_shared(words * TP * sizeof(uint32_t));
    Fwd f = {out, bias, W, T, TP, pairs, x, KC};
    PackX px = {&f, inp};
    parallel_for(pack_x, &px, TP, 16);
    parallel_for(matmul_tiles_range, &f, OUT, FWD_N);
}

// --- Many tokens: the backward tiles -------------------------------------------------------------

// Columns [c0, c1) of dinp, every token, BWD_OC rows of W at a time: the rows' slices [c0, c1)
// are dequantized (reading each row's bytes in order) into words (interleaved in pairs of rows
// for the bf16 route) in blocks of CB columns; then every token goes through each block.
static void matmul_backward_tiles_range(void *ctx, int c0, int c1) {
    const Bwd *b = ctx;
    const QMatrix *W = b->W;
    int OUT = W->rows, bs = type_info(W->type)->block, CB = bs > BWD_CB ? bs : BWD_CB;
    int n = c1 - c0, nblocks = (n + CB - 1) / CB, QMAX = b->pairs ? BWD_OC / 2 : BWD_OC;
    size_t nr = round_up((size_t)n, 16);
    float *tmp = scratch_local(2 * nr * sizeof(float) + (size_t)nblocks * QMAX * CB * sizeof(uint32_t));
    float *wa = tmp, *wb = tmp + nr;
    uint32_t *wp = (uint32_t *)(wb + nr);  // block k, word q at wp + (k * QMAX + q) * CB
    for (int oc0 = 0; oc0 < OUT; oc0 += BWD_OC) {
        int on = OUT - oc0 < BWD_OC ? OUT - oc0 : BWD_OC, Q = b->pairs ? (on + 1) / 2 : on;
        for (int q = 0; q < Q; q++) {
            int oa = oc0 + (b->pairs ? 2 * q : q);
            dequantize_span(W->type, wa, qmatrix_row_data(W, oa), c0, n);
            if (b->pairs && oa + 1 < OUT) dequantize_span(W->type, wb, qmatrix_row_data(W, oa + 1), c0, n);
            else if (b->pairs) memset(wb, 0, (size_t)n * sizeof(float));
            for (int k = 0; k < nblocks; k++) {
                int cw = n - k * CB < CB ? n - k * CB : CB;
                uint32_t *dst = wp + ((size_t)k * QMAX + q) * CB;
                if (b->pairs) to_bf16_interleaved(dst, wa + k * CB, wb + k * CB, cw);
                else memcpy(dst, wa + k * CB, (size_t)cw * sizeof(float));
            }
        }
        for (int k = 0; k < nblocks; k++) {
            int cw = n - k * CB < CB ? n - k * CB : CB;
            for (int t0 = 0; t0 < b->T; t0 += BWD_N) {
                for (int cv = 0; cv < cw; cv += 64) {
                    int ncols = cw - cv < 64 ? cw - cv : 64;
                    BwdTile tl = {c0 + k * CB + cv, ncols, t0, b->T - t0 < BWD_N ? b->T - t0 : BWD_N,
                                  b->pairs ? oc0 / 2 : oc0, Q, wp + (size_t)k * QMAX * CB + cv, CB};
                    bwd_tile(b, &tl, (ncols + 15) / 16);
                }
            }
        }
    }
}

typedef struct {
    Bwd *b;
    const float *dout;
} PackD;

static void pack_d(void *ctx, int t0, int t1) {
    PackD *pd = ctx;
    int OUT = pd->b->W->rows;
    for (int t = t0; t < t1; t++) to_bf16_pairs((uint32_t *)pd->b->d + (size_t)t * pd->b->OW, pd->dout + (size_t)t * OUT, OUT);
}

// dinp[T, IN] += dout[T, OUT] W: dout packed as bf16 pairs (or read as it is, fp32 words), then
// the columns of W split among the threads.
void matmul_backward_tiles(float *dinp, const float *dout, const QMatrix *W, int T) {
    int pairs = tile_pairs(W->type), bs = type_info(W->type)->block;
    Bwd b = {dinp, W, T, pairs, pairs ? (W->rows + 1) / 2 : W->rows, NULL};
    if (pairs) {
        b.d = scratch_shared((size_t)T * b.OW * sizeof(uint32_t));
        PackD pd = {&b, dout};
        parallel_for(pack_d, &pd, T, 1);
    } else {
        b.d = (const uint32_t *)(const void *)dout;  // fp32 words: dout as it is
    }
    parallel_for(matmul_backward_tiles_range, &b, W->cols, bs > 16 ? bs : 16);
}

// --- Few tokens: rows --------------------------------------------------------------------------

typedef struct {
    float *out;          // (T, OUT) forward, or dinp (T, IN) backward
    const float *inp;    // (T, IN) forward, or dout (T, OUT) backward
    const QMatrix *W;    // (OUT, IN)
    const float *bias;   // (OUT) or NULL
    int T;
} Rows;

// Rows [r0, r1) of out, every token: each row of W dequantized once and dotted with every token
// (for one token, in registers where the build has a decoder for the format: row_dot).
static void matmul_rows_range(void *ctx, int r0, int r1) {
    const Rows *r = ctx;
    int OUT = r->W->rows, IN = r->W->cols;
    float *w = scratch_local((size_t)IN * sizeof(float));
    for (int o = r0; o < r1; o++) {
        float s;
        if (r->T == 1 && row_dot(&s, r->W->type, qmatrix_row_data(r->W, o), r->inp, IN)) {
            r->out[o] = r->bias ? s + r->bias[o] : s;
            continue;
        }
        dequantize_span(r->W->type, w, qmatrix_row_data(r->W, o), 0, IN);
        for (int t = 0; t < r->T; t++) {
            s = dot_f32(w, r->inp + (size_t)t * IN, IN);
            r->out[(size_t)t * OUT + o] = r->bias ? s + r->bias[o] : s;
        }
    }
}

// out[T, OUT] = inp[T, IN] W^T (+ bias), in fp32, for few tokens.
void matmul_rows(float *out, const float *inp, const QMatrix *W, const float *bias, int T) {
    Rows r = {out, inp, W, bias, T};
    parallel_for(matmul_rows_range, &r, W->rows, 4);
}

// Columns [c0, c1) of dinp, every token: each row's slice dequantized once and added, times
// dout[t, o], to every token's gradient.
static void matmul_backward_rows_range(void *ctx, int c0, int c1) {
    const Rows *r = ctx;
    int OUT = r->W->rows, IN = r->W->cols;
    float *w = scratch_local((size_t)(c1 - c0) * sizeof(float));
    for (int o = 0; o < OUT; o++) {
        dequantize_span(r->W->type, w, qmatrix_row_data(r->W, o), c0, c1 - c0);
        for (int t = 0; t < r->T; t++) axpy_f32(r->out + (size_t)t * IN + c0, r->inp[(size_t)t * OUT + o], w, c1 - c0);
    }
}

// dinp[T, IN] += dout[T, OUT] W, in fp32, for few tokens.
void matmul_backward_rows(float *dinp, const float *dout, const QMatrix *W, int T) {
    int bs = type_info(W->type)->block;
    Rows r = {dinp, dout, W, NULL, T};
    parallel_for(matmul_backward_rows_range, &r, W->cols, bs > 64 ? bs : 64);
}

// --- The same tiles, dot products and conversions in plain C --------------------------------------

// dot_f32 (kernels.h): eight sums in turn, then the tail.
float dot_f32_c(const float *a, const float *b, int n) {
    int i = 0;
    float s[8] = {0};
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
    for (; i < n; i++) s[0] += a[i] * b[i];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

void axpy_f32_c(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

void to_bf16_pairs_c(uint32_t *out, const float *in, int n) {
    int i = 0;
    for (; i + 1 < n; i += 2) out[i / 2] = fp32_to_bf16(in[i]) | (uint32_t)fp32_to_bf16(in[i + 1]) << 16;
    if (i < n) out[i / 2] = fp32_to_bf16(in[i]);
}

void to_bf16_interleaved_c(uint32_t *out, const float *a, const float *b, int n) {
    int i = 0;
    for (; i < n; i++) out[i] = fp32_to_bf16(a[i]) | (uint32_t)fp32_to_bf16(b[i]) << 16;
    for (; i % 16; i++) out[i] = 0;
}

// acc + x . w for one word, in plain C (fp32 words only: the pair route needs AVX512-BF16).
static float madd_word_c(float acc, uint32_t x, uint32_t w) { return acc + f32_from_bits(x) * f32_from_bits(w); }

// fwd_tile in plain C (fp32 words), which compilers vectorize as they can.
void fwd_tile_c(const Fwd *f, const FwdTile *tl, int M) {
    float acc[4][FWD_N][16];
    for (int m = 0; m < M; m++)
        for (int n = 0; n < FWD_N; n++)
            for (int j = 0; j < 16; j++)
                acc[m][n][j] = tl->first || n >= tl->nrows ? 0.0f : tl->dst[(size_t)n * f->TP + 16 * (tl->tv0 + m) + j];
    for (int k = 0; k < tl->K; k++) {
        const uint32_t *x = f->x + (size_t)(tl->k0 + k) * f->TP + 16 * tl->tv0;
        for (int n = 0; n < FWD_N; n++) {
            uint32_t w = word_at(tl->wb + (size_t)n * tl->K + k);
            for (int m = 0; m < M; m++)
                for (int j = 0; j < 16; j++) acc[m][n][j] = madd_word_c(acc[m][n][j], word_at(x + 16 * m + j), w);
        }
    }
    for (int m = 0; m < M; m++)
        for (int n = 0; n < tl->nrows; n++) memcpy(tl->dst + (size_t)n * f->TP + 16 * (tl->tv0 + m), acc[m][n], sizeof acc[m][n]);
}

// bwd_tile in plain C (fp32 words).
void bwd_tile_c(const Bwd *b, const BwdTile *tl, int M) {
    float acc[4][BWD_N][16] = {{{0}}};
    for (int q = 0; q < tl->Q; q++) {
        const uint32_t *wp = tl->wp + (size_t)q * tl->ldw;
        for (int n = 0; n < tl->N; n++) {
            uint32_t dv = word_at(b->d + (size_t)(tl->t0 + n) * b->OW + tl->q0 + q);
            for (int m = 0; m < M; m++)
                for (int j = 0; j < 16; j++) acc[m][n][j] = madd_word_c(acc[m][n][j], word_at(wp + 16 * m + j), dv);
        }
    }
    for (int m = 0; m < M; m++) {
        int left = tl->ncols - 16 * m;
        for (int n = 0; n < tl->N; n++) {
            float *dx = b->dinp + (size_t)(tl->t0 + n) * b->W->cols + tl->c0 + 16 * m;
            for (int j = 0; j < 16 && j < left; j++) dx[j] += acc[m][n][j];
        }
    }
}
