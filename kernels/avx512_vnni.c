// kernels/avx512_vnni.c: the products on integers (AVX512-VNNI). On 16 bits (vpdpwssd): the forward
// tiles of training (matmul_int16) and the rows of few tokens for Q4_0 and Q6_K (matmul_rows16).
// Both multiply the weights' own small integers, exactly, by activations rounded to 14- or 16-bit
// integers, so their error is far below bf16's (bounds: test/test_quant.c, ROUTE_INT16_TILES,
// ROUTE_INT16_ROWS). On 8 bits (vpdpbusd), for inference only: the tiles of Q4_0 prompts
// (matmul_int8) and generation's rows of Q4_0, Q5_0, Q5_1, Q8_0 and the K-quants (matmul_rows8),
// with llama.cpp's error (ROUTE_INT8_TILES, ROUTE_INT8_ROWS). dispatch.c (matmul_route) sends a
// product here.
#include <float.h>
#include <math.h>

#include "../threads.h"
#include "kernels.h"

#if HAVE_INT16_DOT

// --- Many tokens, exact weights: the forward tiles ---------------------------------------------
//
// The forward product of training and of prompts (what the loss and the logits see) multiplies
// the weights' own small integers (unpack16: Q4_0's q - 8, Q8_0's q, Q4_K's q, Q6_K's scale * (q -
// 32), NF4's codes in 13 bits) by the activations in 14-bit integers with one scale per token and
// K-chunk: x ~ dx * xq, |xq| <= 16383, an error of at most absmax / 32766, ~50x below bf16's
// rounding. vpdpwssd sums a block's 32 products exactly in int32 (|w| <= 4096, so |sum| <= 32 *
// 4096 * 16383 < 2^31); then the block's scale (and min) apply in float: acc += s * isum - o * (sum
// of the block's xq). The forward's error is so that of fp32 sums: the loss is as exact as with
// fp32 weights; the backward products keep bf16 factors (their error, measured on the fixtures,
// is below PyTorch bf16 autocast's: test_model.c). Same speed as the bf16 tiles: vpdpwssd does 32
// multiply-adds like vdpbf16ps, each block adds two instructions (12%), and unpacking the weights'
// integers costs less than dequantizing them to bf16.
// Tile: up to 4 vectors of 16 tokens x FWD_N rows: 24 int32 sums in registers; the float sums of
// the blocks so far wait in L1.

#define XQ_MAX 16383  // |xq|: activations in 14-bit integers (see the overflow bound above)
#define NF4_BITS 4095  // NF4's codes as integers: round(code * 4095), |w| <= 4096 as for Q6_K

// The unpackers of unpack16, one per family of formats: v[kn] = values k0 .. k0 + kn - 1 of a row
// as int16, s[kn / 32] the scale of each block of 32 values (and o[kn / 32] its offset).

// Q4_0 (q - 8) and Q5_0 (q - 16, the fifth bits from qh): value j of a block is the low nibble of
// byte j, value j + 16 the high one.
static void unpack16_q4_0(int16_t *v, float *s, const uint8_t *row, int k0, int kn, int q5) {
    const __m256i m15 = _mm256_set1_epi8(15);
    size_t bytes = q5 ? sizeof(BlockQ5_0) : sizeof(BlockQ4_0);
    for (int b = 0; b < kn / QK; b++) {
        const uint8_t *blk = row + (size_t)(k0 / QK + b) * bytes;
        const uint8_t *qs = q5 ? ((const BlockQ5_0 *)blk)->qs : ((const BlockQ4_0 *)blk)->qs;
        __m128i q = _mm_loadu_si128((const __m128i *)qs);  // value j: low nibble of byte j, j + 16: high
        __m256i n = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), m15);
        if (q5) n = _mm256_mask_add_epi8(n, (__mmask32)load_u32le(((const BlockQ5_0 *)blk)->qh), n, _mm256_set1_epi8(16));
        _mm512_storeu_si512(v + 32 * b, _mm512_sub_epi16(_mm512_cvtepu8_epi16(n), _mm512_set1_epi16(q5 ? 16 : 8)));
        s[b] = half_scalar(*(const uint16_t *)(const void *)blk);
    }
}

static void unpack16_q8_0(int16_t *v, float *s, const uint8_t *row, int k0, int kn) {
    for (int b = 0; b < kn / QK; b++) {
        const BlockQ8_0 *blk = (const BlockQ8_0 *)row + k0 / QK + b;
        _mm512_storeu_si512(v + 32 * b, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)blk->qs)));
        s[b] = half_scalar(blk->d);
    }
}

// Q4_K and Q5_K: q, with the group's scale d * sc and offset dmin * m.
static void unpack16_k(int16_t *v, float *s, float *o, const uint8_t *row, int k0, int kn, int q5) {
    const __m256i m15 = _mm256_set1_epi8(15);
    for (int i = 0; i < kn / QK_K; i++) {
        const uint8_t *blk = row + (size_t)(k0 / QK_K + i) * (q5 ? sizeof(BlockQ5_K) : sizeof(BlockQ4_K));
        const BlockQ4_K *k4 = (const BlockQ4_K *)blk;  // d, dmin, scales: the same places in Q5_K
        const uint8_t *qs = q5 ? ((const BlockQ5_K *)blk)->qs : k4->qs;
        __m256i qh = q5 ? _mm256_loadu_si256((const __m256i *)((const BlockQ5_K *)blk)->qh) : _mm256_setzero_si256();
        float d = half_scalar(k4->d), dmin = half_scalar(k4->dmin);
        for (int g = 0; g < 8; g++) {
            uint8_t sc, m;
            scale_min_k4(g, k4->scales, &sc, &m);
            s[8 * i + g] = d * sc, o[8 * i + g] = dmin * m;
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * (g / 2)));  // group g: nibble g % 2
            __m256i n = _mm256_and_si256(g % 2 ? _mm256_srli_epi16(q, 4) : q, m15);
            __m256i h = _mm256_and_si256(_mm256_srli_epi16(qh, g), _mm256_set1_epi8(1));  // Q5_K: bit g of qh
            n = _mm256_or_si256(n, _mm256_slli_epi16(h, 4));
            _mm512_storeu_si512(v + 256 * i + 32 * g, _mm512_cvtepu8_epi16(n));
        }
    }
}

// Q6_K: the group's own int8 scale times (q - 32), with the block's d as the scale.
static void unpack16_q6_K(int16_t *v, float *s, const uint8_t *row, int k0, int kn) {
    const __m256i m15 = _mm256_set1_epi8(15);
    for (int i = 0; i < kn / QK_K; i++) {
        const BlockQ6_K *blk = (const BlockQ6_K *)row + k0 / QK_K + i;
        float d = half_scalar(blk->d);
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = blk->ql + 64 * h, *qhp = blk->qh + 32 * h;
            __m256i a = _mm256_loadu_si256((const __m256i *)ql), b = _mm256_loadu_si256((const __m256i *)(ql + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i *)qhp), m3 = _mm256_set1_epi8(3);
            __m256i lo[4] = {_mm256_and_si256(a, m15), _mm256_and_si256(b, m15),
                             _mm256_and_si256(_mm256_srli_epi16(a, 4), m15), _mm256_and_si256(_mm256_srli_epi16(b, 4), m15)};
            for (int k = 0; k < 4; k++) {  // values 128h + 32k + l: groups 8h + 2k (l < 16) and + 1
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), m3);
                __m512i q = _mm512_cvtepu8_epi16(_mm256_or_si256(lo[k], _mm256_slli_epi16(hi, 4)));
                const int8_t *sc = blk->scales + 8 * h + 2 * k;
                __m512i scale = _mm512_inserti64x4(_mm512_set1_epi16(sc[0]), _mm256_set1_epi16(sc[1]), 1);
                _mm512_storeu_si512(v + 256 * i + 128 * h + 32 * k, _mm512_mullo_epi16(_mm512_sub_epi16(q, _mm512_set1_epi16(32)), scale));
            }
        }
        for (int b = 0; b < 8; b++) s[8 * i + b] = d;
    }
}

// NF4: the codes in 13-bit integers (round(code * NF4_BITS)), absmax / NF4_BITS as the scale.
static void unpack16_nf4(int16_t *v, float *s, const uint8_t *row, int k0, int kn) {
    const __m256i m15 = _mm256_set1_epi8(15);
    int16_t codes[32] = {0};  // the 16 codes in 12-bit integers, then zeros (vpermw reads 32)
    for (int c = 0; c < 16; c++) codes[c] = (int16_t)lrintf(NF4_CODE[c] * NF4_BITS);
    __m512i table = _mm512_loadu_si512(codes);
    for (int b = 0; b < kn / QK_NF4; b++) {
        const BlockNF4 *blk = (const BlockNF4 *)row + k0 / QK_NF4 + b;
        __m256i q = _mm256_loadu_si256((const __m256i *)blk->qs);  // value 2j: high nibble of byte j
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m15), lo = _mm256_and_si256(q, m15);
        __m256i e0 = _mm256_unpacklo_epi8(hi, lo), e1 = _mm256_unpackhi_epi8(hi, lo);  // per 128-bit lane
        __m256i first = _mm256_permute2x128_si256(e0, e1, 0x20), second = _mm256_permute2x128_si256(e0, e1, 0x31);
        _mm512_storeu_si512(v + 64 * b, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(first), table));
        _mm512_storeu_si512(v + 64 * b + 32, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(second), table));
        s[2 * b] = s[2 * b + 1] = blk->absmax / NF4_BITS;
    }
}

// w[kn / 2] = values k0 .. k0 + kn - 1 of a row as int16 pairs (value 2j in the low half of word
// j), s[kn / 32] the scale of each block of 32 values and, when the type has a min (returns 1),
// o[kn / 32] its offset: value = s * w - o. k0 and kn are multiples of the type's block size.
// Only for the types of int16_tiles_type (the others, F32, F16, BF16, Q4_1, Q5_1, take the other tiles).
static int unpack16(Type type, uint32_t *w, float *s, float *o, const uint8_t *row, int k0, int kn) {
    int16_t *v = (int16_t *)(void *)w;  // scratch of the pool: 64-byte aligned, only ever read as words
    switch (type) {
    case TYPE_Q4_0: unpack16_q4_0(v, s, row, k0, kn, 0); return 0;
    case TYPE_Q5_0: unpack16_q4_0(v, s, row, k0, kn, 1); return 0;
    case TYPE_Q8_0: unpack16_q8_0(v, s, row, k0, kn); return 0;
    case TYPE_Q4_K: unpack16_k(v, s, o, row, k0, kn, 0); return 1;
    case TYPE_Q5_K: unpack16_k(v, s, o, row, k0, kn, 1); return 1;
    case TYPE_Q6_K: unpack16_q6_K(v, s, row, k0, kn); return 0;
    case TYPE_NF4: unpack16_nf4(v, s, row, k0, kn); return 0;
    default: return 0;
    }
}

typedef struct {
    Fwd f;                 // out, bias, W, T, TP, KC as for the bf16 tiles (f.x unused)
    const uint32_t *x;     // xq as int16 pairs: word k of token t at x[k * TP + t], zeros for t >= T
    const float *dx;       // [chunks, TP] the activation scale of each token in each K-chunk
    const float *xs;       // [IN / 32, TP] the sum of each block's xq, as floats
} Fwd16;

// One tile: tokens 16 * tv0 ... (M <= 4 vectors of 16) x the FWD_N rows whose words are w + n * nw,
// scales s + n * ns and offsets o + n * ns (o NULL: none; nrows real rows, the others repeat the
// last) over the blocks of K-chunk c (words k0 .. k0 + 16 nb); the chunk's sums, times dx, are added
// into (first chunk: written to) dst + n * TP + token.
typedef struct {
    const uint32_t *w;
    const float *s, *o;
    size_t nw, ns;
    int nrows, tv0, c, k0, nb, first;
    float *dst;
    int bw;   // words of a block of 32 values: 16
} Tile16;

static inline __attribute__((always_inline)) void fwd16_tile(const Fwd16 *f, const Tile16 *tl, const int M) {
    int TP = f->f.TP;
    float part[4][FWD_N][16];
    const uint32_t *w[FWD_N];
    for (int n = 0; n < FWD_N; n++) w[n] = tl->w + (n < tl->nrows ? n : tl->nrows - 1) * tl->nw;
    for (int b = 0; b < tl->nb; b++) {
        const uint32_t *x = f->x + (size_t)(tl->k0 + 16 * b) * TP + 16 * tl->tv0;
        __m512i is[4][FWD_N], xv[4];
UNROLL
        for (int m = 0; m < M; m++)
UNROLL
            for (int n = 0; n < FWD_N; n++) is[m][n] = _mm512_setzero_si512();
        for (int j = 0; j < tl->bw; j++, x += TP) {  // a bound from memory: gcc would unroll 16 and spill
UNROLL
            for (int m = 0; m < M; m++) xv[m] = _mm512_loadu_si512(x + 16 * m);
UNROLL
            for (int n = 0; n < FWD_N; n++) {
                __m512i wv = _mm512_set1_epi32((int)word_at(w[n] + 16 * b + j));
UNROLL
                for (int m = 0; m < M; m++) is[m][n] = _mm512_dpwssd_epi32(is[m][n], xv[m], wv);
            }
        }
        const float *xs = f->xs + (size_t)(tl->k0 / 16 + b) * TP + 16 * tl->tv0;
UNROLL
        for (int n = 0; n < FWD_N; n++) {
            int r = n < tl->nrows ? n : tl->nrows - 1;
            __m512 sv = _mm512_set1_ps(tl->s[r * tl->ns + b]), ov = _mm512_set1_ps(tl->o ? tl->o[r * tl->ns + b] : 0.0f);
UNROLL
            for (int m = 0; m < M; m++) {
                __m512 p = b ? _mm512_loadu_ps(part[m][n]) : _mm512_setzero_ps();
                p = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[m][n]), sv, p);
                if (tl->o) p = _mm512_fnmadd_ps(ov, _mm512_loadu_ps(xs + 16 * m), p);
                _mm512_storeu_ps(part[m][n], p);
            }
        }
    }
    for (int m = 0; m < M; m++) {
        __m512 dx = _mm512_loadu_ps(f->dx + (size_t)tl->c * TP + 16 * (tl->tv0 + m));
        for (int n = 0; n < tl->nrows; n++) {
            float *d = tl->dst + (size_t)n * TP + 16 * (tl->tv0 + m);
            __m512 prev = tl->first ? _mm512_setzero_ps() : _mm512_loadu_ps(d);
            _mm512_storeu_ps(d, _mm512_fmadd_ps(_mm512_loadu_ps(part[m][n]), dx, prev));
        }
    }
}

// gcc 12's partial redundancy elimination and loop-invariant motion turn the tile's 24 int32 sums
// into copies through other registers around every vpdpwssd (half the speed); without those two
// passes it keeps them in place, as clang does.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-pre", "no-tree-loop-im")))
#endif
static void fwd16_tiles(const Fwd16 *f, const Tile16 *tl, int M) {
    switch (M) {
    case 4: fwd16_tile(f, tl, 4); return;
    case 3: fwd16_tile(f, tl, 3); return;
    case 2: fwd16_tile(f, tl, 2); return;
    default: fwd16_tile(f, tl, 1); return;
    }
}

// Rows [r0, r1) of the output, every token, as matmul_tiles_range: blocks of FWD_BLOCK rows, K-chunk by
// K-chunk, FWD_N rows unpacked at a time.
static void matmul_int16_range(void *ctx, int r0, int r1) {
    const Fwd16 *f = ctx;
    const QMatrix *W = f->f.W;
    int IN = W->cols, KC = f->f.KC, NV = f->f.TP / 16;
    size_t nw = (size_t)KC / 2, ns = (size_t)KC / 32;
    uint32_t *w = scratch_local(FWD_N * (nw + 2 * ns) * 4 + (size_t)FWD_BLOCK * f->f.TP * sizeof(float));
    float *s = (float *)(w + FWD_N * nw), *o = s + FWD_N * ns, *stage = o + FWD_N * ns;
    for (int b0 = r0; b0 < r1; b0 += FWD_BLOCK) {
        int b1 = r1 - b0 < FWD_BLOCK ? r1 : b0 + FWD_BLOCK;
        for (int k0 = 0, c = 0; k0 < IN; k0 += KC, c++) {
            int kn = IN - k0 < KC ? IN - k0 : KC, offsets = 0;
            for (int o0 = b0; o0 < b1; o0 += FWD_N) {
                int nrows = b1 - o0 < FWD_N ? b1 - o0 : FWD_N;
                for (int n = 0; n < nrows; n++)
                    offsets = unpack16(W->type, w + n * nw, s + n * ns, o + n * ns, qmatrix_row_data(W, o0 + n), k0, kn);
                Tile16 tl = {w, s, offsets ? o : NULL, nw, ns, nrows, 0, c, k0 / 2, kn / 32, k0 == 0,
                             stage + (size_t)(o0 - b0) * f->f.TP, 16};
                for (tl.tv0 = 0; tl.tv0 < NV; tl.tv0 += 4) fwd16_tiles(f, &tl, NV - tl.tv0 < 4 ? NV - tl.tv0 : 4);
            }
        }
        fwd_flush(&f->f, stage, b0, b1 - b0);
    }
}

typedef struct {
    Fwd16 *f;
    const float *inp;
} PackX16;

// Token t of inp in 14-bit integers, one scale per K-chunk (dx = absmax / XQ_MAX; NaN when the
// chunk holds a NaN or an infinity, so that the outputs are not finite either), as int16 pairs into
// q[IN / 2], with the sums of each block's xq into f->xs and the scales into f->dx. Padding tokens
// (t >= T) are zeros.
static void pack_token16(const Fwd16 *f, const float *inp, int t, uint32_t *q) {
    int IN = f->f.W->cols, KC = f->f.KC, TP = f->f.TP;
    const float *x = inp + (size_t)t * IN;
    for (int k0 = 0, c = 0; k0 < IN; k0 += KC, c++) {
        int kn = IN - k0 < KC ? IN - k0 : KC;
        __m512 amax = _mm512_setzero_ps();
        __mmask16 bad = 0;
        for (int k = 0; k < kn && t < f->f.T; k += 16) {
            __m512 v = _mm512_loadu_ps(x + k0 + k);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
            bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);  // NaN, inf
        }
        float a = _mm512_reduce_max_ps(amax);
        __m512 id = _mm512_set1_ps(a > 0 ? (float)XQ_MAX / a : 0.0f);
        int zero = t >= f->f.T || bad;  // padding tokens, and non-finite chunks (dx NaN says it)
        for (int k = 0; k < kn; k += 32) {  // 32 values: one block, 16 words
            __m512 v0 = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(x + k0 + k);
            __m512 v1 = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(x + k0 + k + 16);
            __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
            ((float *)f->xs)[(size_t)((k0 + k) / 32) * TP + t] = (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            __m512i words = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtsepi32_epi16(q0)), _mm512_cvtsepi32_epi16(q1), 1);
            _mm512_storeu_si512(q + (k0 + k) / 2, words);
        }
        ((float *)f->dx)[(size_t)c * TP + t] = bad ? NAN : a / (float)XQ_MAX;
    }
}

// Tokens [t0, t1) (multiples of 16) of inp into f->x: 16 tokens packed side by side, then their
// words transposed in 16 x 16 blocks into f->x's token-minor order (word k of token t at k * TP + t).
static void pack_x16(void *ctx, int t0, int t1) {
    PackX16 *px = ctx;
    Fwd16 *f = px->f;
    int words = f->f.W->cols / 2;
    uint32_t *q = scratch_local((size_t)16 * words * sizeof(uint32_t));
    for (int g = t0; g < t1; g += 16) {
        for (int j = 0; j < 16; j++) pack_token16(f, px->inp, g + j, q + (size_t)j * words);
        transpose_words16((uint32_t *)f->x + g, (size_t)f->f.TP, q, (size_t)words, words);
    }
}

// matmul_int16 takes W: the types unpack16 knows, IN a multiple of 32.
int int16_tiles_type(Type type, int IN) {
    return IN % 32 == 0 && (type == TYPE_Q4_0 || type == TYPE_Q5_0 || type == TYPE_Q8_0 || type == TYPE_Q4_K ||
                            type == TYPE_Q5_K || type == TYPE_Q6_K || type == TYPE_NF4);
}

// The elements of IN per K-chunk for TP tokens whose activations take `bytes` each: the packed
// activations of a chunk within ~320 KB, in chunks of about the same size (a short last chunk
// would pay a tile's set-up for a few blocks).
static int k_chunk(int IN, int TP, size_t bytes) {
    size_t budget = 320 * 1024 / bytes / (size_t)TP, parts = ((size_t)IN + budget - 1) / budget;
    int KC = (int)round_up(((size_t)IN + parts - 1) / parts, CHUNK_ALIGN);
    return KC >= IN ? IN : KC;
}

// out[T, OUT] = inp[T, IN] W^T (+ bias) on 16-bit integers, for the types of int16_tiles_type (IN a
// multiple of 32).
void matmul_int16(float *out, const float *inp, const QMatrix *W, const float *bias, int T) {
    int IN = W->cols, TP = (int)round_up((size_t)T, 16);
    int KC = k_chunk(IN, TP, sizeof(int16_t));
    int chunks = (IN + KC - 1) / KC;
    size_t xw = (size_t)IN / 2 * TP * 4, dxb = (size_t)chunks * TP * 4, xsb = (size_t)IN / 32 * TP * 4;
    uint8_t *mem = scratch_shared(xw + dxb + xsb);
    Fwd16 f = {{out, bias, W, T, TP, 0, NULL, KC}, (uint32_t *)mem, (float *)(mem + xw), (float *)(mem + xw + dxb)};
    PackX16 px = {&f, inp};
    parallel_for(pack_x16, &px, TP, 16);
    parallel_for(matmul_int16_range, &f, W->rows, FWD_N);
}

// --- Prompts at inference: 8-bit activations, Q4_0 ----------------------------------------------
//
// A prompt at inference (generation's prefill: sft generate, chat; never the loss or a gradient)
// may take llama.cpp's arithmetic: each token's activations rounded to 8-bit integers with one
// scale per block of 32 values, x ~ dx * xq with dx = absmax / 127, an error of at most
// absmax / 254 per value; times Q4_0's own nibbles q (0..15) with vpdpbusd, which sums 4 products
// of unsigned and signed bytes a lane: 64 multiply-adds an instruction, twice vpdpwssd. Per block,
// with the weights' scale dW: dW (dx sum q xq - 8 dx sum xq), the second term packed with the
// activations. The logits' error that this adds is measured on the fixtures against PyTorch bf16
// autocast's (test_model.c): the issue allows inference 1.5x the peer's.
// Tile: up to 2 vectors of 16 tokens x FWD_N rows, 8 words a block (not 16), the float sums in
// registers beside the 12 integer ones (4 vectors, with the float sums in L1 as the 16-bit tiles
// keep them, ran at 254 GFLOP/s against 316 on one core).

typedef struct {
    Fwd f;                 // out, bias, W, T, TP, KC as for the other tiles (f.x unused)
    const uint32_t *x;     // xq as int8 quads: word k (values 4k .. 4k + 3) of token t at x[k * TP + t]
    const float *dx;       // [IN / 32, TP] the scale of each block of each token
    const float *off;      // [IN / 32, TP] 8 dx (sum of the block's xq): Q4_0's offset, applied per block
} Fwd8;

// One tile: tokens 16 * tv0 ... (M <= 2 vectors of 16) x the FWD_N rows whose nibbles (one byte
// each, in order) are w + n * nw and scales s + n * ns (nrows real rows, the others repeat the
// last), over blocks b0 .. b0 + nb - 1 of the row; the sums are added into (first chunk: written
// to) dst + n * TP + token.
typedef struct {
    const uint32_t *w;
    const float *s;
    size_t nw, ns;
    int nrows, tv0, b0, nb, first;
    float *dst;
    int bw;   // words of a block of 32 nibbles: 8 (a bound from memory, as fwd16_tile's)
} Tile8;

static inline __attribute__((always_inline)) void fwd8_tile(const Fwd8 *f, const Tile8 *tl, const int M) {
    int TP = f->f.TP;
    const uint32_t *w[FWD_N];
    __m512 acc[2][FWD_N];
    for (int n = 0; n < FWD_N; n++) w[n] = tl->w + (n < tl->nrows ? n : tl->nrows - 1) * tl->nw;
UNROLL
    for (int m = 0; m < M; m++)
UNROLL
        for (int n = 0; n < FWD_N; n++) acc[m][n] = _mm512_setzero_ps();
    for (int b = 0; b < tl->nb; b++) {
        const uint32_t *x = f->x + (size_t)(tl->b0 + b) * 8 * TP + 16 * tl->tv0;
        __m512i is[2][FWD_N], xv[2];
UNROLL
        for (int m = 0; m < M; m++)
UNROLL
            for (int n = 0; n < FWD_N; n++) is[m][n] = _mm512_setzero_si512();
        for (int j = 0; j < tl->bw; j++, x += TP) {
UNROLL
            for (int m = 0; m < M; m++) xv[m] = _mm512_loadu_si512(x + 16 * m);
UNROLL
            for (int n = 0; n < FWD_N; n++) {
                __m512i wv = _mm512_set1_epi32((int)word_at(w[n] + 8 * b + j));
UNROLL
                for (int m = 0; m < M; m++) is[m][n] = _mm512_dpbusd_epi32(is[m][n], wv, xv[m]);
            }
        }
        size_t at = (size_t)(tl->b0 + b) * TP + 16 * tl->tv0;
UNROLL
        for (int n = 0; n < FWD_N; n++) {
            int r = n < tl->nrows ? n : tl->nrows - 1;
            __m512 sv = _mm512_set1_ps(tl->s[r * tl->ns + b]);
UNROLL
            for (int m = 0; m < M; m++) {
                __m512 blk = _mm512_fmsub_ps(_mm512_cvtepi32_ps(is[m][n]), _mm512_loadu_ps(f->dx + at + 16 * m),
                                             _mm512_loadu_ps(f->off + at + 16 * m));
                acc[m][n] = _mm512_fmadd_ps(blk, sv, acc[m][n]);
            }
        }
    }
UNROLL
    for (int m = 0; m < M; m++)
UNROLL
        for (int n = 0; n < FWD_N; n++) {
            if (n >= tl->nrows) break;
            float *d = tl->dst + (size_t)n * TP + 16 * (tl->tv0 + m);
            _mm512_storeu_ps(d, tl->first ? acc[m][n] : _mm512_add_ps(acc[m][n], _mm512_loadu_ps(d)));
        }
}

#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-pre", "no-tree-loop-im")))  // as fwd16_tiles
#endif
static void fwd8_tiles(const Fwd8 *f, const Tile8 *tl, int M) {
    if (M == 2) fwd8_tile(f, tl, 2);
    else fwd8_tile(f, tl, 1);
}

// w[kn / 4] = Q4_0's nibbles of values k0 .. k0 + kn - 1 of a row, one byte each in order, s[kn / 32]
// the blocks' scales.
static void unpack8_q4_0(uint32_t *w, float *s, const uint8_t *row, int k0, int kn) {
    const __m256i m15 = _mm256_set1_epi8(15);
    for (int b = 0; b < kn / QK; b++) {
        const BlockQ4_0 *blk = (const BlockQ4_0 *)row + k0 / QK + b;
        __m128i q = _mm_loadu_si128((const __m128i *)blk->qs);  // value j: low nibble of byte j, j + 16: high
        _mm256_storeu_si256((__m256i *)(w + 8 * b), _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), m15));
        s[b] = half_scalar(blk->d);
    }
}

// Rows [r0, r1) of the output, every token, as matmul_int16_range.
static void matmul_int8_range(void *ctx, int r0, int r1) {
    const Fwd8 *f = ctx;
    const QMatrix *W = f->f.W;
    int IN = W->cols, KC = f->f.KC, NV = f->f.TP / 16;
    size_t nw = (size_t)KC / 4, ns = (size_t)KC / 32;
    uint32_t *w = scratch_local(FWD_N * (nw + ns) * 4 + (size_t)FWD_BLOCK * f->f.TP * sizeof(float));
    float *s = (float *)(w + FWD_N * nw), *stage = s + FWD_N * ns;
    for (int b0 = r0; b0 < r1; b0 += FWD_BLOCK) {
        int b1 = r1 - b0 < FWD_BLOCK ? r1 : b0 + FWD_BLOCK;
        for (int k0 = 0; k0 < IN; k0 += KC) {
            int kn = IN - k0 < KC ? IN - k0 : KC;
            for (int o0 = b0; o0 < b1; o0 += FWD_N) {
                int nrows = b1 - o0 < FWD_N ? b1 - o0 : FWD_N;
                for (int n = 0; n < nrows; n++) unpack8_q4_0(w + n * nw, s + n * ns, qmatrix_row_data(W, o0 + n), k0, kn);
                Tile8 tl = {w, s, nw, ns, nrows, 0, k0 / 32, kn / 32, k0 == 0, stage + (size_t)(o0 - b0) * f->f.TP, 8};
                for (tl.tv0 = 0; tl.tv0 < NV; tl.tv0 += 2) fwd8_tiles(f, &tl, NV - tl.tv0 < 2 ? NV - tl.tv0 : 2);
            }
        }
        fwd_flush(&f->f, stage, b0, b1 - b0);
    }
}

typedef struct {
    Fwd8 *f;
    const float *inp;
    int words;   // words of a token's row: IN / 4 rounded up to 16 (transpose_words16 takes 16 at a time)
} PackX8;

// One block of 32 values x[0..31] (zeros when x is NULL) in 8-bit integers, x ~ dx * xq: *lo the
// xq of values 0-15, *hi of 16-31, *sum their sum. Returns dx = absmax / 127; NaN, with zero xq,
// when the block holds a NaN or an infinity, so that the outputs are not finite either.
static inline float quantize_block8(const float *x, __m128i *lo, __m128i *hi, int *sum) {
    __m512 v0 = x ? _mm512_loadu_ps(x) : _mm512_setzero_ps(), v1 = x ? _mm512_loadu_ps(x + 16) : _mm512_setzero_ps();
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    int bad = _mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q) || !(amax <= FLT_MAX);  // NaN, inf
    __m512 id = _mm512_set1_ps(amax > 0 && !bad ? 127.0f / amax : 0.0f);
    __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
    if (bad) q0 = q1 = _mm512_setzero_si512();
    *lo = _mm512_cvtsepi32_epi8(q0), *hi = _mm512_cvtsepi32_epi8(q1);
    *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    return bad ? NAN : amax / 127.0f;
}

// Token t of inp in 8-bit integers, one scale per block of 32 (quantize_block8), as quads into
// q[IN / 4], with dx and the offsets 8 dx (sum xq) into f. Padding tokens (t >= T) are zeros.
static void pack_token8(const Fwd8 *f, const float *inp, int t, uint32_t *q) {
    int IN = f->f.W->cols, TP = f->f.TP;
    const float *x = inp + (size_t)t * IN;
    for (int b = 0; b < IN / 32; b++) {
        __m128i lo, hi;
        int sum;
        float dx = quantize_block8(t < f->f.T ? x + 32 * b : NULL, &lo, &hi, &sum);
        _mm_storeu_si128((__m128i *)(q + 8 * b), lo);
        _mm_storeu_si128((__m128i *)(q + 8 * b + 4), hi);
        ((float *)f->dx)[(size_t)b * TP + t] = dx;
        ((float *)f->off)[(size_t)b * TP + t] = 8.0f * dx * (float)sum;
    }
}

// Tokens [t0, t1) (multiples of 16) of inp into f->x, as pack_x16.
static void pack_x8(void *ctx, int t0, int t1) {
    PackX8 *px = ctx;
    Fwd8 *f = px->f;
    uint32_t *q = scratch_local((size_t)16 * px->words * sizeof(uint32_t));
    memset(q, 0, (size_t)16 * px->words * sizeof(uint32_t));  // the words past IN / 4
    for (int g = t0; g < t1; g += 16) {
        for (int j = 0; j < 16; j++) pack_token8(f, px->inp, g + j, q + (size_t)j * px->words);
        transpose_words16((uint32_t *)f->x + g, (size_t)f->f.TP, q, (size_t)px->words, px->words);
    }
}

// matmul_int8 takes W: Q4_0, IN a multiple of 32.
int int8_tiles_type(Type type, int IN) { return type == TYPE_Q4_0 && IN % 32 == 0; }

// out[T, OUT] = inp[T, IN] W^T (+ bias) with 8-bit activations, for the types of int8_tiles_type:
// inference only.
void matmul_int8(float *out, const float *inp, const QMatrix *W, const float *bias, int T) {
    int IN = W->cols, TP = (int)round_up((size_t)T, 16), words = (int)round_up((size_t)IN / 4, 16);
    int KC = k_chunk(IN, TP, 1);
    size_t xw = (size_t)words * TP * 4, sb = (size_t)IN / 32 * TP * 4;
    uint8_t *mem = scratch_shared(xw + 2 * sb);
    Fwd8 f = {{out, bias, W, T, TP, 0, NULL, KC}, (uint32_t *)mem, (float *)(mem + xw), (float *)(mem + xw + sb)};
    PackX8 px = {&f, inp, words};
    parallel_for(pack_x8, &px, TP, 16);
    parallel_for(matmul_int8_range, &f, W->rows, FWD_N);
}

// --- Few tokens, 16-bit integer activations: rows ------------------------------------------------
//
// Generation reads every weight once per token: the product must cost less than bringing the
// weights from memory. Here the weights stay the exact small integers of their blocks (Q4_0's
// q - 8, Q8_0's q, ...) and a token's activations become 16-bit integers with one scale per block
// of 32: x[k] ~ dx * xq[k], |xq| <= 32767, an error of at most dx / 2 = absmax / 65534 per value,
// a hundred times below bf16's rounding. vpdpwssd adds 32 exact integer products an instruction;
// per block of weights, one conversion and one multiply-add apply the scales; offsets (Q4_0's -8,
// Q6_K's -32) and Q4_K's mins come out once per block through the sums of xq. Why not 8-bit
// activations, as llama.cpp: their error is 2-3x that of bf16 rounding (absmax / 254 per value),
// more than the bf16 tiles that training uses, for no fewer instructions per block here.

typedef struct {
    int16_t *q;     // [IN] xq, in the order the type's kernel reads (see x16_layout)
    float *d;       // [IN / 32] dx of each block of 32 values
    float *s32;     // [IN / 32] dx * the sum of the block's xq
    float *s16;     // [IN / 16] dx * the sum of each 16 xq (Q6_K's groups)
} X16;

// Q4_0's byte j holds values j and j + 16 of its block: its kernel reads xq per pair of blocks
// A, B as |A 0-15|B 0-15|A 16-31|B 16-31|, the order of its nibbles. The other types read xq in
// natural order. Returns -1 for the types without a 16-bit kernel (and for odd block counts).
static int x16_layout(Type type, int IN) {
    switch (type) {
    case TYPE_Q4_0: return IN % 64 == 0 ? 1 : -1;
    case TYPE_Q6_K: return 0;
    default: return -1;  // Q8_0, Q4_K and the rest: the fp32 rows (row_dot) are as fast, and exact
    }
}

// x16 <- x[n], n a multiple of 32 (of 64 for the pair layout)
static void x16_quantize(const X16 *x16, const float *x, int n, int pairs) {
    for (int b = 0; b < n / 32; b++) {
        __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        __m512 id = _mm512_set1_ps(amax > 0 ? 32767.0f / amax : 0.0f);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
        int bad = _mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q) || !(amax <= FLT_MAX);  // NaN, inf: the outputs too
        if (bad) q0 = q1 = _mm512_setzero_si512();
        float dx = bad ? NAN : amax / 32767.0f;
        int s0 = _mm512_reduce_add_epi32(q0), s1 = _mm512_reduce_add_epi32(q1);
        x16->d[b] = dx;
        x16->s32[b] = dx * (float)(s0 + s1);
        x16->s16[2 * b] = dx * (float)s0, x16->s16[2 * b + 1] = dx * (float)s1;
        int16_t *lo = pairs ? x16->q + 64 * (b / 2) + 16 * (b % 2) : x16->q + 32 * b, *hi = pairs ? lo + 32 : lo + 16;
        _mm256_storeu_si256((__m256i *)lo, _mm512_cvtsepi32_epi16(q0));
        _mm256_storeu_si256((__m256i *)hi, _mm512_cvtsepi32_epi16(q1));
    }
}

// Lane k of the result: s[idx[k]]; idx starts as |i x 8|j x 8|.
static inline __m512i lane_index(int i, int j) { return _mm512_inserti64x4(_mm512_set1_epi32(i), _mm256_set1_epi32(j), 1); }

// Bytes [at, at + 64) of p, those at or past end as 0: a masked load, which reads nothing past end.
static inline __m512i load_bytes_below(const uint8_t *p, size_t at, size_t end) {
    if (at >= end) return _mm512_setzero_si512();
    __mmask64 m = end - at >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (end - at)) - 1;
    return _mm512_maskz_loadu_epi8(m, p + at);
}

// The fp16 scales of n <= 16 Q4_0 blocks (18 bytes each, the scale first), as floats (0 past n):
// the 16-bit words at byte 18 k picked out of two pairs of 128-byte loads (a gather is slower on
// Zen 4 than the whole row product; so was copying the words of a short group to the stack one
// at a time, which stalled the vector load after them: 20% of Q4_0 generation).
static inline __m512 q4_0_scales16(const BlockQ4_0 *w, int n) {
    const uint8_t *p = (const uint8_t *)w;  // blocks 0-7 at bytes 0..126, 8-15 at 144..270
    const __m512i idx = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                         63, 54, 45, 36, 27, 18, 9, 0);
    __m512i lo, hi;
    if (n == 16) {
        lo = _mm512_permutex2var_epi16(_mm512_loadu_si512(p), idx, _mm512_loadu_si512(p + 64));
        hi = _mm512_permutex2var_epi16(_mm512_loadu_si512(p + 144), idx, _mm512_loadu_si512(p + 208));
    } else {  // the bytes of the n blocks only
        size_t end = (size_t)n * sizeof(BlockQ4_0);
        lo = _mm512_permutex2var_epi16(load_bytes_below(p, 0, end), idx, load_bytes_below(p, 64, end));
        hi = _mm512_permutex2var_epi16(load_bytes_below(p, 144, end), idx, load_bytes_below(p, 208, end));
    }
    __m256i h = _mm256_inserti128_si256(_mm512_castsi512_si256(lo), _mm512_castsi512_si128(hi), 1);
    return _mm512_maskz_cvtph_ps((__mmask16)((1u << n) - 1), h);
}

// The `bytes` that lie 2 KB past p into the cache: the hardware's prefetcher alone leaves a row
// kernel waiting on memory (measured: generation 10-20% faster with it). A prefetch is a hint:
// one past the end of the matrix reads nothing.
static inline void prefetch_ahead(const void *p, int bytes) {
    for (int c = 0; c < bytes; c += 64) __builtin_prefetch((const char *)p + 2048 + c);
}

// sum_k q_k xq_k of two Q4_0 blocks w[0], w[1] against their xq (pair layout), as floats: lanes
// 0-7 block w[0]'s products, 8-15 block w[1]'s.
static inline __m512 q4_0_pair_sums(const BlockQ4_0 *w, const int16_t *xq) {
    __m256i qs = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)w[0].qs)),
                                         _mm_loadu_si128((const __m128i *)w[1].qs), 1);
    __m512i v = _mm512_cvtepu8_epi16(qs);
    __m512i p = _mm512_madd_epi16(_mm512_and_si512(v, _mm512_set1_epi16(15)), _mm512_loadu_si512(xq));
    return _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(p, _mm512_srli_epi16(v, 4), _mm512_loadu_si512(xq + 32)));
}

// sum_b dW_b dx_b (sum_k q_k xq_k - 8 sum_k xq_k) over the blocks of a Q4_0 row: two blocks a
// vector, their 16 scales in one register per 16 blocks, two sums in turn (so that no multiply-add
// waits for the one before).
static float dot16_q4_0(const BlockQ4_0 *w, const X16 *x, int nb) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, off = acc0;
    for (int g = 0; g < nb; g += 16) {
        int n = nb - g < 16 ? nb - g : 16, i = 0;  // n is even
        __mmask16 m = (__mmask16)((1u << n) - 1);
        prefetch_ahead(w + g, 16 * (int)sizeof(BlockQ4_0));
        __m512 dw = q4_0_scales16(w + g, n);
        __m512 s = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(m, x->d + g));
        off = _mm512_fmadd_ps(dw, _mm512_maskz_loadu_ps(m, x->s32 + g), off);
        const int16_t *xq = x->q + 32 * g;
        __m512i idx = lane_index(0, 1);  // lane_index(i, i + 1), stepped with i (one add, not three ops)
        for (; i + 4 <= n; i += 4, idx = _mm512_add_epi32(idx, _mm512_set1_epi32(4))) {
            acc0 = _mm512_fmadd_ps(q4_0_pair_sums(w + g + i, xq + 32 * i), _mm512_permutexvar_ps(idx, s), acc0);
            acc1 = _mm512_fmadd_ps(q4_0_pair_sums(w + g + i + 2, xq + 32 * i + 64),
                                   _mm512_permutexvar_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(2)), s), acc1);
        }
        if (i < n) acc0 = _mm512_fmadd_ps(q4_0_pair_sums(w + g + i, xq + 32 * i), _mm512_permutexvar_ps(idx, s), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_fnmadd_ps(_mm512_set1_ps(8.0f), off, _mm512_add_ps(acc0, acc1)));
}

// Q6_K: group G (16 values) is d sc_G (q - 32); a vector holds 32 values, two groups.
static float dot16_q6_K(const BlockQ6_K *w, const X16 *x, int nb) {
    __m512 acc = _mm512_setzero_ps(), off = _mm512_setzero_ps();
    const __m512i m15 = _mm512_set1_epi16(15), m3 = _mm512_set1_epi16(3);
    for (int i = 0; i < nb; i++) {
        __m512 sc = _mm512_mul_ps(_mm512_set1_ps(half_scalar(w[i].d)),
                                  _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w[i].scales))));
        off = _mm512_fmadd_ps(sc, _mm512_loadu_ps(x->s16 + 16 * i), off);
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = w[i].ql + 64 * h, *qhp = w[i].qh + 32 * h;
            __m512i a = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)ql));
            __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(ql + 32)));
            __m512i qh = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)qhp));
            __m512i q[4] = {
                _mm512_or_si512(_mm512_and_si512(a, m15), _mm512_slli_epi16(_mm512_and_si512(qh, m3), 4)),
                _mm512_or_si512(_mm512_and_si512(b, m15), _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(qh, 2), m3), 4)),
                _mm512_or_si512(_mm512_srli_epi16(a, 4), _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(qh, 4), m3), 4)),
                _mm512_or_si512(_mm512_srli_epi16(b, 4), _mm512_slli_epi16(_mm512_srli_epi16(qh, 6), 4)),
            };
            for (int k = 0; k < 4; k++) {
                int G = 8 * h + 2 * k, xb = 8 * i + 4 * h + k;
                const int16_t *xq = x->q + 32 * xb;
                __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), q[k], _mm512_loadu_si512(xq));
                __m512 s = _mm512_mul_ps(_mm512_permutexvar_ps(lane_index(G, G + 1), sc), _mm512_set1_ps(x->d[xb]));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, acc);
            }
        }
    }
    return _mm512_reduce_add_ps(acc) - 32.0f * _mm512_reduce_add_ps(off);
}

// *s = row . x for the types of x16_layout.
static float row_dot16(Type type, const uint8_t *row, const X16 *x, int n) {
    if (type == TYPE_Q4_0) return dot16_q4_0((const BlockQ4_0 *)row, x, n / QK);
    return dot16_q6_K((const BlockQ6_K *)row, x, n / QK_K);
}

// x16[T] <- inp[T, IN] in the pool's shared scratch, for the types of x16_layout.
static void x16_prepare(X16 *x16, const float *inp, const QMatrix *W, int T) {
    int layout = x16_layout(W->type, W->cols), IN = W->cols;
    size_t per = round_up((size_t)IN * sizeof(int16_t), 64) + 2 * round_up((size_t)IN / 32 * sizeof(float), 64) +
                 round_up((size_t)IN / 16 * sizeof(float), 64);
    uint8_t *mem = scratch_shared(per * (size_t)T);
    for (int t = 0; t < T; t++, mem += per) {
        x16[t].q = (int16_t *)mem;
        x16[t].d = (float *)(mem + round_up((size_t)IN * sizeof(int16_t), 64));
        x16[t].s32 = x16[t].d + round_up((size_t)IN / 32 * sizeof(float), 64) / sizeof(float);
        x16[t].s16 = x16[t].s32 + round_up((size_t)IN / 32 * sizeof(float), 64) / sizeof(float);
        x16_quantize(&x16[t], inp + (size_t)t * IN, IN, layout);
    }
}

// matmul_rows16 takes W: the types of x16_layout.
int int16_rows_type(Type type, int IN) { return x16_layout(type, IN) >= 0; }

typedef struct {
    float *out;          // (T, OUT)
    const float *bias;   // (OUT) or NULL
    const QMatrix *W;    // (OUT, IN)
    int T;
    const X16 *x16;      // [T] inp in 16-bit integers
} Rows16;

// Rows [r0, r1) of out, every token: one row of W at a time, its dot product with each token.
static void rows16_range(void *ctx, int r0, int r1) {
    const Rows16 *r = ctx;
    int OUT = r->W->rows;
    for (int o = r0; o < r1; o++) {
        for (int t = 0; t < r->T; t++) {
            float s = row_dot16(r->W->type, qmatrix_row_data(r->W, o), &r->x16[t], r->W->cols);
            r->out[(size_t)t * OUT + o] = r->bias ? s + r->bias[o] : s;
        }
    }
}

// out[T, OUT] = inp[T, IN] W^T (+ bias) for T < FWD_TILE_MIN_T tokens and the types of x16_layout.
void matmul_rows16(float *out, const float *inp, const QMatrix *W, const float *bias, int T) {
    X16 x16[FWD_TILE_MIN_T];
    x16_prepare(x16, inp, W, T);
    Rows16 r = {out, bias, W, T, x16};
    parallel_for(rows16_range, &r, W->rows, 4);
}

// --- Generation at inference: 8-bit activations, Q4_0, Q5_0, Q5_1, Q8_0 and K-quant rows ---------
//
// matmul_inference's rows (T < FWD_TILE_MIN_T: generation) for Q4_0, Q5_0, Q5_1, Q8_0 and the
// K-quants: a token's activations in 8-bit integers per block of 32 as the prompt's tiles take
// them, times the weights' own integers with vpdpbusd (64 multiply-adds an instruction), one
// vector of bytes per 4 blocks of Q4_0, Q5_0 or Q5_1, 2 of Q8_0 or a quarter of a K-quant's,
// each block's (or group's) scales applied in its lanes: a third of the instructions per weight
// of the 16-bit rows (Q4_0, Q6_K) and of the fp32 rows (the others), which could not keep up with
// memory at one thread. vpdpbusd multiplies unsigned by signed bytes: the weights are made
// unsigned (Q4_0's q, 0..15, Q5_0's and Q5_1's, 0..31, Q4_K's, Q5_K's and Q6_K's as they are;
// Q8_0's q + 128, one xor) and the offset that this adds (8, 16, 32 or 128 times the sum of xq)
// starts the integer sum, from the activations' side. The mins of Q5_1, Q4_K and Q5_K take the
// sums of xq as they are: dmin m_g dx (sum of xq of group g), once per group.

// matmul_inference's rows take W: Q4_0, Q5_0, Q5_1 and Q8_0 in groups of 4 blocks, Q4_K, Q5_K, Q6_K.
int int8_rows_type(Type type, int IN) {
    int by4 = type == TYPE_Q4_0 || type == TYPE_Q5_0 || type == TYPE_Q5_1 || type == TYPE_Q8_0;
    int k = type == TYPE_Q4_K || type == TYPE_Q5_K || type == TYPE_Q6_K;
    return HAVE_INT8_ROWS && ((by4 && IN % 128 == 0) || (k && IN % QK_K == 0));
}

#if HAVE_INT8_ROWS

// A token's activations, per group of 4 blocks (128 values), as the kernels read them:
typedef struct {
    int8_t q[128];     // xq: Q4_0, Q5_0, Q5_1: |values 0-15 of blocks 0..3|values 16-31 of blocks 0..3|;
                       // Q4_K, Q5_K: blocks 0, 2, 1, 3 (as the low and high nibbles of 64 bytes);
                       // Q8_0, Q6_K in order
    union {
        int32_t c[2][16];  // the offset of int32 lane k of the product of vector v: -8 or -16 (Q4_0,
                           // Q5_0: one vector, both halves of q), -128 (Q8_0) or -32 (Q6_K) (vector
                           // v = q[64 v ..]) times the sum of its xq
        float dsum[4];     // Q5_1, Q4_K, Q5_K, which have mins and no offsets: dx times the sum of
                           // xq of block k
    };
    float d[2][16];        // dx of the block that lane k of vector v takes
} X8Group;                 // 384 bytes: every vector on a line of its own (a 400-byte group was 8% slower)

// g[n / 128] <- x[n] for W's type, n a multiple of 128, one scale per block of 32 (quantize_block8).
static void x8_quantize(Type type, X8Group *g, const float *x, int n) {
    const __m512i ones = _mm512_set1_epi8(1);
    int q4 = type == TYPE_Q4_0 || type == TYPE_Q5_0 || type == TYPE_Q5_1;
    int k_quant = type == TYPE_Q4_K || type == TYPE_Q5_K, mins = k_quant || type == TYPE_Q5_1;
    for (int b = 0; b < n / 32; b++) {
        X8Group *gr = &g[b / 4];
        int k = b % 4, at = k_quant && (k == 1 || k == 2) ? 3 - k : k;  // Q4_K, Q5_K: 0, 2, 1, 3
        __m128i lo, hi;
        int sum;
        float dx = quantize_block8(x + 32 * b, &lo, &hi, &sum);
        _mm_storeu_si128((__m128i *)(gr->q + (q4 ? 16 * k : 32 * at)), lo);
        _mm_storeu_si128((__m128i *)(gr->q + (q4 ? 64 + 16 * k : 32 * at + 16)), hi);
        if (q4) _mm_storeu_ps(&gr->d[0][4 * k], _mm_set1_ps(dx));
        else _mm256_storeu_ps(&gr->d[at / 2][8 * (at % 2)], _mm256_set1_ps(dx));
        if (mins) gr->dsum[k] = dx * (float)sum;
        if (k < 3 || mins) continue;
        // the group is whole: its offsets, summed by the lanes of the product itself
        __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(gr->q));
        __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(gr->q + 64));
        if (q4) {
            _mm512_storeu_si512(gr->c[0], _mm512_mullo_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(type == TYPE_Q4_0 ? -8 : -16)));
        } else {
            __m512i offset = _mm512_set1_epi32(type == TYPE_Q8_0 ? -128 : -32);
            _mm512_storeu_si512(gr->c[0], _mm512_mullo_epi32(s0, offset));
            _mm512_storeu_si512(gr->c[1], _mm512_mullo_epi32(s1, offset));
        }
    }
}

// The nibbles of 4 Q4_0 blocks w[0..3], those of block L in bytes 16 L .. 16 L + 15 (byte j: values
// j and j + 16 of the block), and their 4 scales, block L's in lanes 4 L .. 4 L + 3: the 72 bytes
// of the blocks read as two overlapping 64-byte loads (bytes 0-63 and 8-71), which vpermt2b and
// vpermw pick from (no read past the 4 blocks).
static const uint8_t Q4_0_QS_BYTES[64] = {
    2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17,   // block 0: bytes 2-17 of the first load
    20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35,   // block 1: 20-35
    38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53,   // block 2: 38-53
    112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 123, 124, 125, 126, 127,  // block 3: 56-71 = 48-63 of the second
};
static inline __m512i q4_0_nibbles4(const BlockQ4_0 *w, __m512 *scales) {
    const uint8_t *p = (const uint8_t *)w;
    __m512i a = _mm512_loadu_si512(p), b = _mm512_loadu_si512(p + 8);
    const __m512i halves = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 27, 27, 27, 27, 18, 18, 18, 18,
                                            9, 9, 9, 9, 0, 0, 0, 0);  // the fp16 scales: words 0, 9, 18, 27
    *scales = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(halves, a)));
    return _mm512_permutex2var_epi8(a, _mm512_loadu_si512(Q4_0_QS_BYTES), b);
}

// acc + dW dx (start + sum_k q_k xq_k) per lane, for 4 blocks laid out as Q4_0's nibbles: the
// unsigned weights of values 0-15 of each block in lo, of 16-31 in hi, their scales dW in lanes
// 4 L .. 4 L + 3; start: the offsets (x->c[0]) or zero.
static inline __m512 group8_sum(__m512i start, __m512i lo, __m512i hi, __m512 dw, const X8Group *x, __m512 acc) {
    __m512i is = _mm512_dpbusd_epi32(start, lo, _mm512_loadu_si512(x->q));
    is = _mm512_dpbusd_epi32(is, hi, _mm512_loadu_si512(x->q + 64));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(dw, _mm512_loadu_ps(x->d[0])), acc);
}

// The product of 4 blocks of a Q4_0 row with their group of x, added to acc: per block, dW dx
// sum_k (q_k - 8) xq_k, in the 4 lanes of the block.
static inline __m512 q4_0_group8(const BlockQ4_0 *w, const X8Group *x, __m512 acc) {
    const __m512i m15 = _mm512_set1_epi8(15);
    __m512 dw;
    __m512i q = q4_0_nibbles4(w, &dw);
    return group8_sum(_mm512_loadu_si512(x->c[0]), _mm512_and_si512(q, m15),
                      _mm512_and_si512(_mm512_srli_epi16(q, 4), m15), dw, x, acc);
}

// The 5-bit weights of 4 Q5_0 or Q5_1 blocks at p, laid out as Q4_0's nibbles (q4_0_nibbles4):
// the low ones (values 0-15 of each block) in *lo and the high ones in *hi, each with its fifth
// bit (bit 4). The blocks are read as two overlapping 64-byte loads, at p and p + second (88 or 96
// bytes in all); qs_bytes picks the 16 bytes of qs of each block out of them (vpermt2b), and
// `words` 16-bit words (vpermt2w) that it returns: its words 24-27 and 28-31 must be the low and
// the high halves of the blocks' 32-bit qh (the fifth bit of value j in bit j), which become two
// 64-bit masks: bit 16 L + j of the low one is bit j of block L's qh, of the high one bit j + 16.
static inline __m512i q5_values4(const uint8_t *p, int second, __m512i words, const uint8_t *qs_bytes, __m512i *lo,
                                 __m512i *hi) {
    __m512i a = _mm512_loadu_si512(p), b = _mm512_loadu_si512(p + second);
    __m512i picked = _mm512_permutex2var_epi16(a, words, b);
    __m128i qh = _mm512_extracti32x4_epi32(picked, 3);
    __mmask64 low = (__mmask64)_mm_cvtsi128_si64(qh), high = (__mmask64)_mm_extract_epi64(qh, 1);
    const __m512i m15 = _mm512_set1_epi8(15), bit4 = _mm512_set1_epi8(16);
    __m512i q = _mm512_permutex2var_epi8(a, _mm512_loadu_si512(qs_bytes), b);
    __m512i l = _mm512_and_si512(q, m15), h = _mm512_and_si512(_mm512_srli_epi16(q, 4), m15);
    *lo = _mm512_mask_blend_epi8(low, l, _mm512_or_si512(l, bit4));
    *hi = _mm512_mask_blend_epi8(high, h, _mm512_or_si512(h, bit4));
    return picked;
}

// Q5_0: |d|qh|qs| = 22 bytes a block, 88 for 4, read at bytes 0 and 24. qs of block L at 22 L + 6.
static const uint8_t Q5_0_QS_BYTES[64] = {
    6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,        // block 0: bytes 6-21 of the first load
    28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43,        // block 1: 28-43
    90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102, 103, 104, 105,  // block 2: 50-65 = 26-41 of the second
    112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 123, 124, 125, 126, 127,  // block 3: 72-87 = 48-63
};

// The product of 4 blocks of a Q5_0 row with their group of x, added to acc: per block, dW dx
// sum_k (q_k - 16) xq_k, in the 4 lanes of the block.
static inline __m512 q5_0_group8(const BlockQ5_0 *w, const X8Group *x, __m512 acc) {
    // words 0-15: d of block L (bytes 0, 22, 44 of the first load, 42 of the second: word 32 + k is
    // byte 24 + 2 k) in 4 L .. 4 L + 3; 24-31: the halves of the qh (bytes 2, 24, 46; 44)
    const __m512i words = _mm512_set_epi16(55, 24, 13, 2, 54, 23, 12, 1, 0, 0, 0, 0, 0, 0, 0, 0,
                                           53, 53, 53, 53, 22, 22, 22, 22, 11, 11, 11, 11, 0, 0, 0, 0);
    __m512i lo, hi;
    __m512i picked = q5_values4((const uint8_t *)w, 24, words, Q5_0_QS_BYTES, &lo, &hi);
    __m512 dw = _mm512_cvtph_ps(_mm512_castsi512_si256(picked));
    return group8_sum(_mm512_loadu_si512(x->c[0]), lo, hi, dw, x, acc);
}

// Q5_1: |d|m|qh|qs| = 24 bytes a block, 96 for 4, read at bytes 0 and 32. qs of block L at 24 L + 8.
static const uint8_t Q5_1_QS_BYTES[64] = {
    8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,        // block 0: bytes 8-23 of the first load
    32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47,        // block 1: 32-47
    88, 89, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102, 103,    // block 2: 56-71 = 24-39 of the second
    112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 123, 124, 125, 126, 127,  // block 3: 80-95 = 48-63
};

// The product of 4 blocks of a Q5_1 row with their group of x, added to acc: per block, d dx sum_k
// q_k xq_k in the 4 lanes of the block, plus m dx (sum of the block's xq) in lanes 0-3.
static inline __m512 q5_1_group8(const BlockQ5_1 *w, const X8Group *x, __m512 acc) {
    // words 0-15: d of block L (word 12 L; 52 = byte 40 of the second load) in 4 L .. 4 L + 3;
    // 16-19: m of blocks 0-3; 24-31: the halves of the qh
    const __m512i words = _mm512_set_epi16(55, 27, 15, 3, 54, 26, 14, 2, 0, 0, 0, 0, 53, 25, 13, 1,
                                           52, 52, 52, 52, 24, 24, 24, 24, 12, 12, 12, 12, 0, 0, 0, 0);
    __m512i lo, hi;
    __m512i picked = q5_values4((const uint8_t *)w, 32, words, Q5_1_QS_BYTES, &lo, &hi);
    __m512 dw = _mm512_cvtph_ps(_mm512_castsi512_si256(picked));
    __m512 m = _mm512_maskz_cvtph_ps(0x000f, _mm512_extracti64x4_epi64(picked, 1));
    acc = _mm512_fmadd_ps(m, _mm512_maskz_loadu_ps(0x000f, x->dsum), acc);
    return group8_sum(_mm512_setzero_si512(), lo, hi, dw, x, acc);
}

// The weights of 2 Q8_0 blocks w[0..1] made unsigned (q + 128), block L's in bytes 32 L .. 32 L +
// 31, and their scales, block L's in lanes 8 L .. 8 L + 7: the 68 bytes of the blocks as two
// overlapping 64-byte loads (bytes 0-63 and 4-67), as q4_0_nibbles4.
static const uint8_t Q8_0_QS_BYTES[64] = {
    2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17,   // block 0: bytes 2-33 of the first load
    18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33,
    36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51,   // block 1: 36-67 (64-67: 60-63 of the second)
    52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 124, 125, 126, 127,
};
static inline __m512i q8_0_pair(const BlockQ8_0 *w, __m512 *scales) {
    const uint8_t *p = (const uint8_t *)w;
    __m512i a = _mm512_loadu_si512(p), b = _mm512_loadu_si512(p + 4);
    const __m512i halves = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 17, 17, 17, 17, 17, 17, 17, 17,
                                            0, 0, 0, 0, 0, 0, 0, 0);  // the fp16 scales: words 0, 17
    *scales = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(halves, a)));
    __m512i q = _mm512_permutex2var_epi8(a, _mm512_loadu_si512(Q8_0_QS_BYTES), b);
    return _mm512_xor_si512(q, _mm512_set1_epi8((char)0x80));
}

// The product of 4 blocks of a Q8_0 row with their group of x, added to acc: per block, dW dx
// sum_k ((q_k + 128) - 128) xq_k, in the 8 lanes of the block.
static inline __m512 q8_0_group8(const BlockQ8_0 *w, const X8Group *x, __m512 acc) {
    for (int v = 0; v < 2; v++) {
        __m512 dw;
        __m512i q = q8_0_pair(w + 2 * v, &dw);
        __m512i is = _mm512_dpbusd_epi32(_mm512_loadu_si512(x->c[v]), q, _mm512_loadu_si512(x->q + 64 * v));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(dw, _mm512_loadu_ps(x->d[v])), acc);
    }
    return acc;
}

// The 8 scales and 8 mins of a Q4_K block, as bytes sc_0 .. sc_7, m_0 .. m_7 (scale_min_k4 for
// all 8 groups at once). As 32-bit words u0, u1, u2 of `scales`: sc_0-3 = u0 & 63, m_0-3 = u1 & 63,
// sc_4-7 = the low nibbles of u2 and the top 2 bits of u0, m_4-7 = the high nibbles of u2 and the
// top 2 bits of u1. (The 16-byte load reads 4 bytes of qs beyond the 12.)
static inline __m128i k4_scales_mins(const uint8_t *scales) {
    __m128i u = _mm_loadu_si128((const __m128i *)scales);
    __m128i a = _mm_shuffle_epi32(u, _MM_SHUFFLE(2, 1, 2, 0));  // u0, u2, u1, u2
    __m128i b = _mm_shuffle_epi32(u, _MM_SHUFFLE(1, 1, 0, 0));  // u0, u0, u1, u1
    __m128i low = _mm_and_si128(_mm_srlv_epi32(a, _mm_set_epi32(4, 0, 0, 0)),
                                _mm_set_epi32(0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f));
    __m128i top = _mm_and_si128(_mm_srli_epi32(b, 2), _mm_set_epi32(0x30303030, 0, 0x30303030, 0));
    return _mm_or_si128(low, top);
}

// The product of a Q4_K block (q5 = 0) or a Q5_K block (q5 = 1) with its 2 groups of x, added to
// acc: per group g of 32 values, d sc_g dx sum_k q_k xq_k in the 8 lanes of the group, less dmin
// m_g dx (sum of the group's xq). Half h of the block (values 128 h ..) is 64 bytes of qs: groups
// 4h and 4h + 2 in the low nibbles of its two halves, 4h + 1 and 4h + 3 in the high ones; Q5_K's
// fifth bit of value l of group g is bit g of qh[l].
static inline __m512 k_block8(const uint8_t *blk, const X8Group *x, __m512 acc, const int q5) {
    const BlockQ4_K *w = (const BlockQ4_K *)(const void *)blk;  // d, dmin, scales: the same places in Q5_K
    const uint8_t *qs = q5 ? ((const BlockQ5_K *)(const void *)blk)->qs : w->qs;
    const __m512i m15 = _mm512_set1_epi8(15), bit4 = _mm512_set1_epi8(16);
    __m512i qh = q5 ? _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)((const BlockQ5_K *)(const void *)blk)->qh))
                    : _mm512_setzero_si512();  // both halves: qh[0..31]
    __m512 dm = _mm512_insertf32x8(_mm512_set1_ps(half_scalar(w->d)), _mm256_set1_ps(half_scalar(w->dmin)), 1);
    __m512 scales = _mm512_mul_ps(dm, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(k4_scales_mins(w->scales))));
    __m256 dsum = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(x[0].dsum)), _mm_loadu_ps(x[1].dsum), 1);
    acc = _mm512_fnmadd_ps(scales, _mm512_insertf32x8(_mm512_setzero_ps(), dsum, 1), acc);  // lanes 8-15: the mins
    for (int h = 0; h < 2; h++, x++) {
        __m512i bits = _mm512_loadu_si512(qs + 64 * h);
        __m512i q[2] = {_mm512_and_si512(bits, m15), _mm512_and_si512(_mm512_srli_epi16(bits, 4), m15)};
        for (int v = 0; q5 && v < 2; v++) {  // bit 4h + v of qh for bytes 0-31, 4h + v + 2 for 32-63
            __m512i select = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << (4 * h + v))),
                                                _mm256_set1_epi8((char)(1 << (4 * h + v + 2))), 1);
            q[v] = _mm512_mask_blend_epi8(_mm512_test_epi8_mask(qh, select), q[v], _mm512_or_si512(q[v], bit4));
        }
        for (int v = 0; v < 2; v++) {  // vector v: groups 4h + v (lanes 0-7) and 4h + v + 2 (8-15)
            __m512i is = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[v], _mm512_loadu_si512(x->q + 64 * v));
            __m512i g = _mm512_inserti64x4(_mm512_set1_epi32(4 * h + v), _mm256_set1_epi32(4 * h + v + 2), 1);
            __m512 s = _mm512_permutexvar_ps(g, scales);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(s, _mm512_loadu_ps(x->d[v])), acc);
        }
    }
    return acc;
}

// The product of a Q6_K block with its 2 groups of x, added to acc: per group G of 16 values,
// d sc_G dx sum_k (q_k - 32) xq_k, in the 4 lanes of the group. Half h of the block (values
// 128 h ..) takes 64 bytes of ql (low nibbles: values 0-63, high: 64-127) and 32 of qh (bits 2j,
// 2j + 1 of byte l: the top bits of value l + 32 j).
static inline __m512 q6_k_block8(const BlockQ6_K *w, const X8Group *x, __m512 acc) {
    const __m512i m15 = _mm512_set1_epi8(15), m3 = _mm512_set1_epi8(3);
    const __m512i by4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);  // lane k: group k / 4
    __m512 sc = _mm512_mul_ps(_mm512_set1_ps(half_scalar(w->d)),
                              _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w->scales))));
    for (int h = 0; h < 2; h++, x++) {
        __m512i ql = _mm512_loadu_si512(w->ql + 64 * h);
        __m256i qh = _mm256_loadu_si256((const __m256i *)(w->qh + 32 * h));
        __m512i top = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);  // bits 0-1: values 0-63
        __m512i q[2] = {
            _mm512_or_si512(_mm512_and_si512(ql, m15), _mm512_slli_epi16(_mm512_and_si512(top, m3), 4)),
            _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m15),
                            _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(top, 4), m3), 4)),
        };
        for (int v = 0; v < 2; v++) {  // values 128 h + 64 v ..: groups 8 h + 4 v ..
            __m512i is = _mm512_dpbusd_epi32(_mm512_loadu_si512(x->c[v]), q[v], _mm512_loadu_si512(x->q + 64 * v));
            __m512 s = _mm512_permutexvar_ps(_mm512_add_epi32(by4, _mm512_set1_epi32(8 * h + 4 * v)), sc);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(s, _mm512_loadu_ps(x->d[v])), acc);
        }
    }
    return acc;
}

// The 16 lane sums of row . x, the row's nb blocks of 32 (a multiple of 4; of 8 for the K-quants)
// of W's type.
static inline __attribute__((always_inline)) __m512 dot8_lanes(Type type, const uint8_t *row, const X8Group *x, int nb) {
    __m512 acc = _mm512_setzero_ps();
    if (type == TYPE_Q4_0) {
        const BlockQ4_0 *w = (const BlockQ4_0 *)(const void *)row;
        for (int i = 0; i < nb; i += 4, x++) {
            if (i % 16 == 0) prefetch_ahead(w + i, 16 * (int)sizeof(BlockQ4_0));
            acc = q4_0_group8(w + i, x, acc);
        }
    } else if (type == TYPE_Q5_0) {
        const BlockQ5_0 *w = (const BlockQ5_0 *)(const void *)row;
        for (int i = 0; i < nb; i += 4, x++) {
            if (i % 16 == 0) prefetch_ahead(w + i, 16 * (int)sizeof(BlockQ5_0));
            acc = q5_0_group8(w + i, x, acc);
        }
    } else if (type == TYPE_Q8_0) {
        const BlockQ8_0 *w = (const BlockQ8_0 *)(const void *)row;
        for (int i = 0; i < nb; i += 4, x++) {
            if (i % 8 == 0) prefetch_ahead(w + i, 8 * (int)sizeof(BlockQ8_0));
            acc = q8_0_group8(w + i, x, acc);
        }
    } else if (type == TYPE_Q5_1) {
        const BlockQ5_1 *w = (const BlockQ5_1 *)(const void *)row;
        for (int i = 0; i < nb; i += 4, x++) {
            if (i % 16 == 0) prefetch_ahead(w + i, 16 * (int)sizeof(BlockQ5_1));
            acc = q5_1_group8(w + i, x, acc);
        }
    } else if (type == TYPE_Q4_K || type == TYPE_Q5_K) {
        int q5 = type == TYPE_Q5_K;
        size_t bytes = q5 ? sizeof(BlockQ5_K) : sizeof(BlockQ4_K);
        for (int i = 0; i < nb / 8; i++, x += 2) {
            prefetch_ahead(row + i * bytes, (int)bytes);
            acc = k_block8(row + i * bytes, x, acc, q5);
        }
    } else {
        const BlockQ6_K *w = (const BlockQ6_K *)(const void *)row;
        for (int i = 0; i < nb / 8; i++, x += 2) {
            prefetch_ahead(w + i, (int)sizeof(BlockQ6_K));
            acc = q6_k_block8(w + i, x, acc);
        }
    }
    return acc;
}

// The sums of the 16 lanes of a, b, c, d, as [a, b, c, d].
static inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // per 128 bits: a b a b
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xee));  // a b c d
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

typedef struct {
    float *out;          // (T, OUT)
    const float *bias;   // (OUT) or NULL
    const QMatrix *W;    // (OUT, IN)
    int T;
    const X8Group *x8;   // [T, IN / 128] inp in 8-bit integers
} Rows8;

// Rows [r0, r1) of out (r0 a multiple of 4), every token: four rows of W at a time, one after the
// other as they lie in memory (reading them side by side was 30% slower from memory), with one
// reduction for the four; the last rows of W one at a time. type is W's, a constant in each copy
// that rows8_range makes, so that the loops carry no test of the type.
static inline __attribute__((always_inline)) void rows8_typed(const Rows8 *r, int r0, int r1, const Type type) {
    int OUT = r->W->rows, nb = r->W->cols / QK;
    size_t rb = row_bytes(type, r->W->cols);
    for (int o = r0; o < r1;) {
        const uint8_t *w = (const uint8_t *)r->W->data + (size_t)o * rb;
        int n = r1 - o >= 4 ? 4 : 1;
        for (int t = 0; t < r->T; t++) {
            float s[4];
            const X8Group *x = r->x8 + (size_t)t * (nb / 4);
            if (n == 4) {  // in the order of memory, one statement each (not the arguments of one call,
                           // which gcc evaluates last first: backwards, 2x slower from memory)
                __m512 a0 = dot8_lanes(type, w, x, nb);
                __m512 a1 = dot8_lanes(type, w + rb, x, nb);
                __m512 a2 = dot8_lanes(type, w + 2 * rb, x, nb);
                __m512 a3 = dot8_lanes(type, w + 3 * rb, x, nb);
                _mm_storeu_ps(s, reduce4(a0, a1, a2, a3));
            } else {
                s[0] = _mm512_reduce_add_ps(dot8_lanes(type, w, x, nb));
            }
            for (int k = 0; k < n; k++) r->out[(size_t)t * OUT + o + k] = r->bias ? s[k] + r->bias[o + k] : s[k];
        }
        o += n;
    }
}

static void rows8_range(void *ctx, int r0, int r1) {
    const Rows8 *r = ctx;
    switch (r->W->type) {
    case TYPE_Q4_0: rows8_typed(r, r0, r1, TYPE_Q4_0); break;
    case TYPE_Q5_0: rows8_typed(r, r0, r1, TYPE_Q5_0); break;
    case TYPE_Q8_0: rows8_typed(r, r0, r1, TYPE_Q8_0); break;
    case TYPE_Q5_1: rows8_typed(r, r0, r1, TYPE_Q5_1); break;
    case TYPE_Q4_K: rows8_typed(r, r0, r1, TYPE_Q4_K); break;
    case TYPE_Q5_K: rows8_typed(r, r0, r1, TYPE_Q5_K); break;
    default: rows8_typed(r, r0, r1, TYPE_Q6_K); break;
    }
}

// out[T, OUT] = inp[T, IN] W^T (+ bias) for T < FWD_TILE_MIN_T tokens and the types of
// int8_rows_type: inference only.
void matmul_rows8(float *out, const float *inp, const QMatrix *W, const float *bias, int T) {
    int IN = W->cols;
    X8Group *x8 = scratch_shared((size_t)T * (IN / 128) * sizeof(X8Group));
    for (int t = 0; t < T; t++) x8_quantize(W->type, x8 + (size_t)t * (IN / 128), inp + (size_t)t * IN, IN);
    Rows8 r = {out, bias, W, T, x8};
    parallel_for(rows8_range, &r, W->rows, 4);
}

#endif  // HAVE_INT8_ROWS

#endif  // HAVE_INT16_DOT
