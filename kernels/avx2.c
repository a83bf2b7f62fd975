// kernels/avx2.c: the fast products' pieces in AVX2 with FMA and F16C (x86-64-v3: most x86 laptops
// and desktops without AVX-512): every format dequantized in registers of 8 floats, fp32 tiles of
// 16 tokens (or input columns) x 6 in 12 of the 16 ymm registers, at the FMA peak (2 x 8 MACs a
// cycle; ~100 GFLOP/s a Zen 4 core), and the fp32 rows of generation. All ROUTE_FP32: the errors
// of fp32 sums, as for F32 weights (test/test_quant.c). dispatch.c picks these on an AVX2 build.
#include "kernels.h"

#if HAVE_AVX2

// --- Dequantization in registers ---------------------------------------------------------------

// AVX2: each block (a group of groups for the K-quants) is decoded into registers of 8 floats,
// w[k] = values 8k ... 8k + 7, which dequantize_span_avx2 stores and row_dot_avx2 multiplies
// straight away. The values are dequantize_row's (the same operations in the same order).

// v[4] = 32 small integers as floats: lo holds elements 0-15 as int8, hi elements 16-31.
static inline void i8x32_ps(__m256 v[4], __m128i lo, __m128i hi) {
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    v[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    v[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
}

// *lo, *hi = the low and the high nibbles of the 16 bytes at qs.
static inline void nibbles16(__m128i *lo, __m128i *hi, const uint8_t *qs) {
    __m128i q = _mm_loadu_si128((const __m128i *)qs), m15 = _mm_set1_epi8(15);
    *lo = _mm_and_si128(q, m15);
    *hi = _mm_and_si128(_mm_srli_epi16(q, 4), m15);
}

// Byte j = 16 where bit j (0..15) of `bits` is set, else 0: the fifth bits of Q5_0 and Q5_1.
static inline __m128i fifth_bits16(uint32_t bits) {
    const __m128i spread = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m128i bit = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
    __m128i v = _mm_and_si128(_mm_shuffle_epi8(_mm_cvtsi32_si128((int)(bits & 0xffff)), spread), bit);
    return _mm_and_si128(_mm_cmpeq_epi8(v, bit), _mm_set1_epi8(16));
}

// Byte j = 16 where bit k of byte j of h is set, else 0: the fifth bits of Q5_K group k.
static inline __m128i fifth_bits_k(__m128i h, int k) {
    __m128i b = _mm_and_si128(_mm_srl_epi16(h, _mm_cvtsi32_si128(k)), _mm_set1_epi8(1));
    return _mm_slli_epi16(b, 4);
}

// w[k] = w[k] * d (+ m when add_m), for the 4 vectors of a 32-value block.
static inline void scale4(__m256 w[4], float d, float m, int add_m) {
    __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
UNROLL
    for (int k = 0; k < 4; k++) w[k] = add_m ? _mm256_add_ps(_mm256_mul_ps(w[k], vd), vm) : _mm256_mul_ps(w[k], vd);
}

// w[k] = d * w[k] - m (as ggml writes it: a product, then a difference).
static inline void scale_min4(__m256 w[4], float d, float m) {
    __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
UNROLL
    for (int k = 0; k < 4; k++) w[k] = _mm256_sub_ps(_mm256_mul_ps(vd, w[k]), vm);
}

// w[4] = the 32 values of one block.
static inline void q4_0_ps(__m256 w[4], const BlockQ4_0 *x) {
    __m128i lo, hi, e8 = _mm_set1_epi8(8);
    nibbles16(&lo, &hi, x->qs);
    i8x32_ps(w, _mm_sub_epi8(lo, e8), _mm_sub_epi8(hi, e8));
    scale4(w, half_scalar(x->d), 0, 0);
}

static inline void q4_1_ps(__m256 w[4], const BlockQ4_1 *x) {
    __m128i lo, hi;
    nibbles16(&lo, &hi, x->qs);
    i8x32_ps(w, lo, hi);
    scale4(w, half_scalar(x->d), half_scalar(x->m), 1);
}

static inline void q5_0_ps(__m256 w[4], const BlockQ5_0 *x) {
    __m128i lo, hi, s = _mm_set1_epi8(16);
    uint32_t qh = load_u32le(x->qh);
    nibbles16(&lo, &hi, x->qs);
    lo = _mm_sub_epi8(_mm_or_si128(lo, fifth_bits16(qh)), s);
    hi = _mm_sub_epi8(_mm_or_si128(hi, fifth_bits16(qh >> 16)), s);
    i8x32_ps(w, lo, hi);
    scale4(w, half_scalar(x->d), 0, 0);
}

static inline void q5_1_ps(__m256 w[4], const BlockQ5_1 *x) {
    __m128i lo, hi;
    uint32_t qh = load_u32le(x->qh);
    nibbles16(&lo, &hi, x->qs);
    i8x32_ps(w, _mm_or_si128(lo, fifth_bits16(qh)), _mm_or_si128(hi, fifth_bits16(qh >> 16)));
    scale4(w, half_scalar(x->d), half_scalar(x->m), 1);
}

static inline void q8_0_ps(__m256 w[4], const BlockQ8_0 *x) {
    i8x32_ps(w, _mm_loadu_si128((const __m128i *)x->qs), _mm_loadu_si128((const __m128i *)(x->qs + 16)));
    scale4(w, half_scalar(x->d), 0, 0);
}

// w[8] = values 64c ... 64c + 63 of a Q4_K block: groups 2c and 2c + 1.
static inline __attribute__((always_inline)) void q4_K_ps(__m256 w[8], const BlockQ4_K *x, int c) {
    float d = half_scalar(x->d), min = half_scalar(x->dmin);
    uint8_t sc, m;
    __m128i a0, a1, b0, b1;  // a: bytes 0-15 of the chunk, b: bytes 16-31; 0: low nibbles, 1: high
    nibbles16(&a0, &a1, x->qs + 32 * c);
    nibbles16(&b0, &b1, x->qs + 32 * c + 16);
    i8x32_ps(w, a0, b0);
    i8x32_ps(w + 4, a1, b1);
    scale_min_k4(2 * c, x->scales, &sc, &m);
    scale_min4(w, d * sc, min * m);
    scale_min_k4(2 * c + 1, x->scales, &sc, &m);
    scale_min4(w + 4, d * sc, min * m);
}

static inline __attribute__((always_inline)) void q5_K_ps(__m256 w[8], const BlockQ5_K *x, int c) {
    float d = half_scalar(x->d), min = half_scalar(x->dmin);
    uint8_t sc, m;
    __m128i a0, a1, b0, b1;
    __m128i ha = _mm_loadu_si128((const __m128i *)x->qh), hb = _mm_loadu_si128((const __m128i *)(x->qh + 16));
    nibbles16(&a0, &a1, x->qs + 32 * c);
    nibbles16(&b0, &b1, x->qs + 32 * c + 16);
    i8x32_ps(w, _mm_or_si128(a0, fifth_bits_k(ha, 2 * c)), _mm_or_si128(b0, fifth_bits_k(hb, 2 * c)));
    i8x32_ps(w + 4, _mm_or_si128(a1, fifth_bits_k(ha, 2 * c + 1)), _mm_or_si128(b1, fifth_bits_k(hb, 2 * c + 1)));
    scale_min_k4(2 * c, x->scales, &sc, &m);
    scale_min4(w, d * sc, min * m);
    scale_min_k4(2 * c + 1, x->scales, &sc, &m);
    scale_min4(w + 4, d * sc, min * m);
}

// w[2k], w[2k + 1] = values l + 32k ... l + 32k + 15 (k = 0..3, l = 0 or 16) of half h of a Q6_K
// block, assembled as dequantize_q6_K does.
static inline __attribute__((always_inline)) void q6_K_ps(__m256 w[8], const BlockQ6_K *x, int h, int l) {
    const uint8_t *ql = x->ql + 64 * h, *qh = x->qh + 32 * h;
    const int8_t *sc = x->scales + 8 * h;
    float d = half_scalar(x->d);
    __m128i m15 = _mm_set1_epi8(15), m3 = _mm_set1_epi8(3), o = _mm_set1_epi8(32);
    __m128i a = _mm_loadu_si128((const __m128i *)(ql + l)), b = _mm_loadu_si128((const __m128i *)(ql + 32 + l));
    __m128i hb = _mm_loadu_si128((const __m128i *)(qh + l));
    __m128i lo[4] = {_mm_and_si128(a, m15), _mm_and_si128(b, m15), _mm_and_si128(_mm_srli_epi16(a, 4), m15),
                     _mm_and_si128(_mm_srli_epi16(b, 4), m15)};
UNROLL
    for (int k = 0; k < 4; k++) {
        __m128i hi = _mm_and_si128(_mm_srl_epi16(hb, _mm_cvtsi32_si128(2 * k)), m3);
        __m128i q = _mm_sub_epi8(_mm_or_si128(lo[k], _mm_slli_epi16(hi, 4)), o);
        __m256 s = _mm256_set1_ps(d * sc[l / 16 + 2 * k]);
        w[2 * k] = _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
        w[2 * k + 1] = _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))));
    }
}

// w[8] = the 64 values of an NF4 block: codes looked up in two registers of 8.
static inline __attribute__((always_inline)) void nf4_ps(__m256 w[8], const BlockNF4 *x) {
    __m256 lo = _mm256_loadu_ps(NF4_CODE), hi = _mm256_loadu_ps(NF4_CODE + 8), amax = _mm256_set1_ps(x->absmax);
    __m256i shift = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0), m15 = _mm256_set1_epi32(15);
UNROLL
    for (int k = 0; k < 8; k++) {
        __m128i q = _mm_cvtsi32_si128((int)load_u32le(x->qs + 4 * k));
        __m256i b = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(q, q));  // byte j twice: elements 2j, 2j + 1
        __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(b, shift), m15);
        __m256 code = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                                       _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 picks hi
        w[k] = _mm256_mul_ps(code, amax);
    }
}

// The sum of the 8 lanes, in a fixed order.
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The lanes j < left (all 8 when left >= 8) of a maskload / maskstore.
static inline __m256i tail_mask8(int left) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline void store_ps(float *y, const __m256 *w, int n) {
UNROLL
    for (int k = 0; k < n; k++) _mm256_storeu_ps(y + 8 * k, w[k]);
}

// Returns 1 when it wrote out[n] = elements [i0, i0 + n) of the row.
int dequantize_span_avx2(Type type, float *out, const uint8_t *row, int i0, int n) {
    const TypeInfo *ti = type_info(type);
    const uint8_t *p = row + (size_t)(i0 / ti->block) * ti->bytes;
    int nb = n / ti->block, i = 0;
    __m256 w[8];
    switch (type) {
    case TYPE_F16:
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * i))));
        for (; i < n; i++) out[i] = fp16_to_fp32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
        return 1;
    case TYPE_BF16:
        for (; i + 8 <= n; i += 8) {
            __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + 2 * i)));
            _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
        }
        for (; i < n; i++) out[i] = bf16_to_fp32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
        return 1;
    case TYPE_Q4_0:
        for (int b = 0; b < nb; b++) q4_0_ps(w, (const BlockQ4_0 *)p + b), store_ps(out + 32 * b, w, 4);
        return 1;
    case TYPE_Q4_1:
        for (int b = 0; b < nb; b++) q4_1_ps(w, (const BlockQ4_1 *)p + b), store_ps(out + 32 * b, w, 4);
        return 1;
    case TYPE_Q5_0:
        for (int b = 0; b < nb; b++) q5_0_ps(w, (const BlockQ5_0 *)p + b), store_ps(out + 32 * b, w, 4);
        return 1;
    case TYPE_Q5_1:
        for (int b = 0; b < nb; b++) q5_1_ps(w, (const BlockQ5_1 *)p + b), store_ps(out + 32 * b, w, 4);
        return 1;
    case TYPE_Q8_0:
        for (int b = 0; b < nb; b++) q8_0_ps(w, (const BlockQ8_0 *)p + b), store_ps(out + 32 * b, w, 4);
        return 1;
    case TYPE_Q4_K:
        for (int b = 0; b < nb; b++)
            for (int c = 0; c < 4; c++) q4_K_ps(w, (const BlockQ4_K *)p + b, c), store_ps(out + 256 * b + 64 * c, w, 8);
        return 1;
    case TYPE_Q5_K:
        for (int b = 0; b < nb; b++)
            for (int c = 0; c < 4; c++) q5_K_ps(w, (const BlockQ5_K *)p + b, c), store_ps(out + 256 * b + 64 * c, w, 8);
        return 1;
    case TYPE_Q6_K:
        for (int b = 0; b < nb; b++) {
            for (int h = 0; h < 2; h++) {
                for (int l = 0; l < 32; l += 16) {
                    q6_K_ps(w, (const BlockQ6_K *)p + b, h, l);
UNROLL
                    for (int k = 0; k < 4; k++) store_ps(out + 256 * b + 128 * h + 32 * k + l, w + 2 * k, 2);
                }
            }
        }
        return 1;
    case TYPE_NF4:
        for (int b = 0; b < nb; b++) nf4_ps(w, (const BlockNF4 *)p + b), store_ps(out + 64 * b, w, 8);
        return 1;
    default: return 0;
    }
}

// --- The tiles ---------------------------------------------------------------------------------

// The tile for one vector of 16 tokens (number tv) held in H registers of 8 (fp32 words): H = 2,
// or 1 when tokens 8-15 of the vector are all padding. 2 x FWD_N accumulators take 12 of the 16
// registers. fwd_tile_avx2 calls it for each of the M vectors.
static inline __attribute__((always_inline)) void fwd_micro_avx2(const Fwd *f, const FwdTile *tl, int tv, const int H) {
    __m256 acc[2][FWD_N], xv[2];
    float *dst = tl->dst + 16 * tv;
UNROLL
    for (int n = 0; n < FWD_N; n++)
UNROLL
        for (int h = 0; h < H; h++)
            acc[h][n] = tl->first || n >= tl->nrows ? _mm256_setzero_ps() : _mm256_loadu_ps(dst + (size_t)n * f->TP + 8 * h);
    const uint32_t *x = f->x + (size_t)tl->k0 * f->TP + 16 * tv, *wb = tl->wb;
    for (int k = 0; k < tl->K; k++, x += f->TP, wb++) {
UNROLL
        for (int h = 0; h < H; h++) xv[h] = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(x + 8 * h)));
UNROLL
        for (int n = 0; n < FWD_N; n++) {
            __m256 wv = _mm256_castsi256_ps(_mm256_set1_epi32((int)word_at(wb + (size_t)n * tl->K)));
UNROLL
            for (int h = 0; h < H; h++) acc[h][n] = _mm256_fmadd_ps(xv[h], wv, acc[h][n]);
        }
    }
UNROLL
    for (int n = 0; n < FWD_N; n++)
UNROLL
        for (int h = 0; h < H; h++)
            if (n < tl->nrows) _mm256_storeu_ps(dst + (size_t)n * f->TP + 8 * h, acc[h][n]);
}

// One forward tile of M vectors of 16 tokens: a vector at a time, in one register of 8 where
// tokens 8-15 of the vector are all padding.
void fwd_tile_avx2(const Fwd *f, const FwdTile *tl, int M) {
    for (int m = 0; m < M; m++) {
        if (16 * (tl->tv0 + m) + 8 < f->T) fwd_micro_avx2(f, tl, tl->tv0 + m, 2);
        else fwd_micro_avx2(f, tl, tl->tv0 + m, 1);
    }
}

// Tokens past the last one of a backward tile read these zeros, so that its loop has no branch.
static const uint32_t BWD_ZEROS[BWD_OC];

// The tile for the 16 columns c0 + 16m ... (two registers of 8, fp32 words) x BWD_N tokens:
// 2 x BWD_N accumulators take 12 of the 16 registers. bwd_tile_avx2 calls it for each of M vectors.
static void bwd_micro_avx2(const Bwd *b, const BwdTile *tl, int m) {
    __m256 acc[2][BWD_N];
UNROLL
    for (int n = 0; n < BWD_N; n++) acc[0][n] = acc[1][n] = _mm256_setzero_ps();
    const uint32_t *d[BWD_N], *wp = tl->wp + 16 * m;
    for (int n = 0; n < BWD_N; n++) d[n] = n < tl->N ? b->d + (size_t)(tl->t0 + n) * b->OW + tl->q0 : BWD_ZEROS;
    for (int q = 0; q < tl->Q; q++, wp += tl->ldw) {
        __m256 w0 = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)wp));
        __m256 w1 = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(wp + 8)));
UNROLL
        for (int n = 0; n < BWD_N; n++) {
            __m256 dv = _mm256_castsi256_ps(_mm256_set1_epi32((int)word_at(d[n] + q)));
            acc[0][n] = _mm256_fmadd_ps(w0, dv, acc[0][n]);
            acc[1][n] = _mm256_fmadd_ps(w1, dv, acc[1][n]);
        }
    }
UNROLL
    for (int h = 0; h < 2; h++) {
        int left = tl->ncols - 16 * m - 8 * h;
        __m256i mask = tail_mask8(left);
UNROLL
        for (int n = 0; n < BWD_N; n++) {  // every n, so that acc stays in registers
            if (n >= tl->N || left <= 0) continue;
            float *dx = b->dinp + (size_t)(tl->t0 + n) * b->W->cols + tl->c0 + 16 * m + 8 * h;
            if (left >= 8) _mm256_storeu_ps(dx, _mm256_add_ps(_mm256_loadu_ps(dx), acc[h][n]));
            else _mm256_maskstore_ps(dx, mask, _mm256_add_ps(_mm256_maskload_ps(dx, mask), acc[h][n]));
        }
    }
}

// One backward tile of M vectors of 16 columns, a vector at a time.
void bwd_tile_avx2(const Bwd *b, const BwdTile *tl, int M) {
    for (int m = 0; m < M; m++) bwd_micro_avx2(b, tl, m);
}

// --- Finished tiles: transposes --------------------------------------------------------------

// r[i][j] becomes r[j][i]: pairs interleaved, then pairs of pairs, then the 128-bit halves.
static void transpose8(__m256 r[8]) {
    __m256 t[8];
UNROLL
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
UNROLL
    for (int i = 0; i < 8; i += 4) {
UNROLL
        for (int k = 0; k < 2; k++) {
            r[i + 2 * k] = _mm256_shuffle_ps(t[i + k], t[i + k + 2], 0x44);
            r[i + 2 * k + 1] = _mm256_shuffle_ps(t[i + k], t[i + k + 2], 0xee);
        }
    }
UNROLL
    for (int k = 0; k < 4; k++) {
        t[k] = _mm256_permute2f128_ps(r[k], r[k + 4], 0x20);
        t[k + 4] = _mm256_permute2f128_ps(r[k], r[k + 4], 0x31);
    }
UNROLL
    for (int k = 0; k < 8; k++) r[k] = t[k];
}

// fwd_flush_simd (kernels.h): 8 x 8 blocks of tokens x rows, transposed in registers, while nrows
// is a multiple of 8; returns the tokens written.
int fwd_flush_avx2(const Fwd *f, const float *stage, int o0, int nrows) {
    int OUT = f->W->rows, t = 0;
    for (; nrows % 8 == 0 && t + 8 <= f->T; t += 8) {
        for (int n0 = 0; n0 < nrows; n0 += 8) {
            __m256 r[8];
UNROLL
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(stage + (size_t)(n0 + i) * f->TP + t);
            transpose8(r);
            __m256 b = f->bias ? _mm256_loadu_ps(f->bias + o0 + n0) : _mm256_setzero_ps();
UNROLL
            for (int i = 0; i < 8; i++)
                _mm256_storeu_ps(f->out + (size_t)(t + i) * OUT + o0 + n0, f->bias ? _mm256_add_ps(r[i], b) : r[i]);
        }
    }
    return t;
}

// --- Few tokens: fp32 rows -----------------------------------------------------------------------

// dot_f32 (kernels.h): four sums of 8 lanes, then 8 at a time, the tail through a mask.
float dot_f32_avx2(const float *a, const float *b, int n) {
    int i = 0;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    if (i < n) {
        __m256i m = tail_mask8(n - i);
        s0 = _mm256_fmadd_ps(_mm256_maskload_ps(a + i, m), _mm256_maskload_ps(b + i, m), s0);
    }
    return hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

// axpy_f32 (kernels.h): 8 lanes, the tail masked, so that every element is rounded the same way
// (maskstore is slow on AMD: not in the loop).
void axpy_f32_avx2(float *y, float a, const float *x, int n) {
    int i = 0;
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    if (i < n) {
        __m256i m = tail_mask8(n - i);
        _mm256_maskstore_ps(y + i, m, _mm256_fmadd_ps(va, _mm256_maskload_ps(x + i, m), _mm256_maskload_ps(y + i, m)));
    }
}

// acc[k] += w[k] * x[8k ... 8k + 7] for k < 4.
static inline void fma4(__m256 acc[4], const __m256 w[4], const float *x) {
UNROLL
    for (int k = 0; k < 4; k++) acc[k] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(x + 8 * k), acc[k]);
}

// *s = row . x[n], dequantizing in registers (the values of dequantize_row) as row_dot_avx512
// does; returns 0 for the formats without a decoder in registers (F32, F16, BF16).
int row_dot_avx2(float *s, Type type, const uint8_t *row, const float *x, int n) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}, w[8];
    switch (type) {
    case TYPE_Q4_0:
        for (int i = 0; i < n / QK; i++, x += QK) q4_0_ps(w, (const BlockQ4_0 *)row + i), fma4(acc, w, x);
        break;
    case TYPE_Q4_1:
        for (int i = 0; i < n / QK; i++, x += QK) q4_1_ps(w, (const BlockQ4_1 *)row + i), fma4(acc, w, x);
        break;
    case TYPE_Q5_0:
        for (int i = 0; i < n / QK; i++, x += QK) q5_0_ps(w, (const BlockQ5_0 *)row + i), fma4(acc, w, x);
        break;
    case TYPE_Q5_1:
        for (int i = 0; i < n / QK; i++, x += QK) q5_1_ps(w, (const BlockQ5_1 *)row + i), fma4(acc, w, x);
        break;
    case TYPE_Q8_0:
        for (int i = 0; i < n / QK; i++, x += QK) q8_0_ps(w, (const BlockQ8_0 *)row + i), fma4(acc, w, x);
        break;
    case TYPE_Q4_K:
        for (int i = 0; i < n / QK_K; i++) {
            for (int c = 0; c < 4; c++, x += 64) {
                q4_K_ps(w, (const BlockQ4_K *)row + i, c);
                fma4(acc, w, x);
                fma4(acc, w + 4, x + 32);
            }
        }
        break;
    case TYPE_Q5_K:
        for (int i = 0; i < n / QK_K; i++) {
            for (int c = 0; c < 4; c++, x += 64) {
                q5_K_ps(w, (const BlockQ5_K *)row + i, c);
                fma4(acc, w, x);
                fma4(acc, w + 4, x + 32);
            }
        }
        break;
    case TYPE_Q6_K:
        for (int i = 0; i < n / QK_K; i++, x += QK_K) {
            for (int h = 0; h < 2; h++) {
                for (int l = 0; l < 32; l += 16) {
                    q6_K_ps(w, (const BlockQ6_K *)row + i, h, l);
UNROLL
                    for (int k = 0; k < 4; k++) {
                        const float *xk = x + 128 * h + 32 * k + l;
                        acc[k] = _mm256_fmadd_ps(w[2 * k], _mm256_loadu_ps(xk), acc[k]);
                        acc[k] = _mm256_fmadd_ps(w[2 * k + 1], _mm256_loadu_ps(xk + 8), acc[k]);
                    }
                }
            }
        }
        break;
    case TYPE_NF4:
        for (int i = 0; i < n / QK_NF4; i++, x += QK_NF4) nf4_ps(w, (const BlockNF4 *)row + i), fma4(acc, w, x), fma4(acc, w + 4, x + 32);
        break;
    default: return 0;
    }
    *s = hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    return 1;
}

#endif  // HAVE_AVX2
