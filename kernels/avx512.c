// kernels/avx512.c: the fast products' pieces in AVX-512 (F, BW; BF16 where the CPU has it): every
// format dequantized in zmm registers, the forward and backward tiles (fp32 words, or bf16 pairs
// through vdpbf16ps), the transposes that write finished tiles, and the fp32 rows of generation.
// The values are those of quant.c's definitions (dequantize_row) and the tiles' sums are tested
// against matmul_ref (test/test_quant.c). Left out: the 16-bit integer products (avx512_vnni.c)
// and AMX (amx.c). dispatch.c picks these functions on an AVX-512 build.
#include "kernels.h"

#if HAVE_AVX512

// --- Dequantization in registers ---------------------------------------------------------------

static __m512 cvt_u8x16(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }

static void dq_q4_0_avx512(float *y, const BlockQ4_0 *x) {
    __m512 d = _mm512_set1_ps(half_scalar(x->d));
    __m128i q = _mm_loadu_si128((const __m128i *)x->qs), m = _mm_set1_epi8(15);
    __m512i e = _mm512_set1_epi32(8);
    __m512i lo = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(q, m)), e);
    __m512i hi = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), m)), e);
    _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d));
    _mm512_storeu_ps(y + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d));
}

static void dq_q4_1_avx512(float *y, const BlockQ4_1 *x) {
    __m512 d = _mm512_set1_ps(half_scalar(x->d)), mn = _mm512_set1_ps(half_scalar(x->m));
    __m128i q = _mm_loadu_si128((const __m128i *)x->qs), m = _mm_set1_epi8(15);
    _mm512_storeu_ps(y, _mm512_add_ps(_mm512_mul_ps(cvt_u8x16(_mm_and_si128(q, m)), d), mn));
    _mm512_storeu_ps(y + 16, _mm512_add_ps(_mm512_mul_ps(cvt_u8x16(_mm_and_si128(_mm_srli_epi16(q, 4), m)), d), mn));
}

// Q5: the fifth bits of elements 0-15 are bits 0-15 of qh, of elements 16-31 bits 16-31.
static void q5_ints(__m512i *lo, __m512i *hi, const uint8_t *qs, uint32_t qh) {
    __m128i q = _mm_loadu_si128((const __m128i *)qs), m = _mm_set1_epi8(15);
    __m512i s = _mm512_set1_epi32(16);
    *lo = _mm512_cvtepu8_epi32(_mm_and_si128(q, m));
    *hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), m));
    *lo = _mm512_mask_add_epi32(*lo, (__mmask16)(qh & 0xffff), *lo, s);
    *hi = _mm512_mask_add_epi32(*hi, (__mmask16)(qh >> 16), *hi, s);
}

static void dq_q5_0_avx512(float *y, const BlockQ5_0 *x) {
    __m512 d = _mm512_set1_ps(half_scalar(x->d));
    __m512i lo, hi, s = _mm512_set1_epi32(16);
    q5_ints(&lo, &hi, x->qs, load_u32le(x->qh));
    _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, s)), d));
    _mm512_storeu_ps(y + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, s)), d));
}

static void dq_q5_1_avx512(float *y, const BlockQ5_1 *x) {
    __m512 d = _mm512_set1_ps(half_scalar(x->d)), mn = _mm512_set1_ps(half_scalar(x->m));
    __m512i lo, hi;
    q5_ints(&lo, &hi, x->qs, load_u32le(x->qh));
    _mm512_storeu_ps(y, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), d), mn));
    _mm512_storeu_ps(y + 16, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), d), mn));
}

static void dq_q8_0_avx512(float *y, const BlockQ8_0 *x) {
    __m512 d = _mm512_set1_ps(half_scalar(x->d));
    __m128i a = _mm_loadu_si128((const __m128i *)x->qs), b = _mm_loadu_si128((const __m128i *)(x->qs + 16));
    _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), d));
    _mm512_storeu_ps(y + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), d));
}

// d * q - m for 16 integers q (as ggml writes it: a product, then a difference).
static inline __m512 scaled_min(__m512i q, float d, float m) {
    return _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(q)), _mm512_set1_ps(m));
}

// y[32] = d1 * q - m1 for 32 integers q.
static void store_scaled_min(float *y, __m512i q0, __m512i q1, float d1, float m1) {
    _mm512_storeu_ps(y, scaled_min(q0, d1, m1));
    _mm512_storeu_ps(y + 16, scaled_min(q1, d1, m1));
}

static void dq_q4_K_avx512(float *y, const BlockQ4_K *x) {
    float d = half_scalar(x->d), min = half_scalar(x->dmin);
    __m512i m15 = _mm512_set1_epi32(15);
    for (int c = 0; c < 4; c++, y += 64) {
        uint8_t sc, m;
        const uint8_t *q = x->qs + 32 * c;
        __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)));
        scale_min_k4(2 * c, x->scales, &sc, &m);
        store_scaled_min(y, _mm512_and_si512(a, m15), _mm512_and_si512(b, m15), d * sc, min * m);
        scale_min_k4(2 * c + 1, x->scales, &sc, &m);
        store_scaled_min(y + 32, _mm512_srli_epi32(a, 4), _mm512_srli_epi32(b, 4), d * sc, min * m);
    }
}

static void dq_q5_K_avx512(float *y, const BlockQ5_K *x) {
    float d = half_scalar(x->d), min = half_scalar(x->dmin);
    __m512i m15 = _mm512_set1_epi32(15), s = _mm512_set1_epi32(16);
    __m512i ha = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)x->qh));
    __m512i hb = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(x->qh + 16)));
    for (int c = 0; c < 4; c++, y += 64) {
        uint8_t sc, m;
        const uint8_t *q = x->qs + 32 * c;
        __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)));
        __m512i u1 = _mm512_set1_epi32(1 << (2 * c)), u2 = _mm512_set1_epi32(2 << (2 * c));
        __m512i a0 = _mm512_mask_add_epi32(_mm512_and_si512(a, m15), _mm512_test_epi32_mask(ha, u1), _mm512_and_si512(a, m15), s);
        __m512i b0 = _mm512_mask_add_epi32(_mm512_and_si512(b, m15), _mm512_test_epi32_mask(hb, u1), _mm512_and_si512(b, m15), s);
        __m512i a1 = _mm512_mask_add_epi32(_mm512_srli_epi32(a, 4), _mm512_test_epi32_mask(ha, u2), _mm512_srli_epi32(a, 4), s);
        __m512i b1 = _mm512_mask_add_epi32(_mm512_srli_epi32(b, 4), _mm512_test_epi32_mask(hb, u2), _mm512_srli_epi32(b, 4), s);
        scale_min_k4(2 * c, x->scales, &sc, &m);
        store_scaled_min(y, a0, b0, d * sc, min * m);
        scale_min_k4(2 * c + 1, x->scales, &sc, &m);
        store_scaled_min(y + 32, a1, b1, d * sc, min * m);
    }
}

// q[k] = the values minus 32 of elements l + 32k ... l + 32k + 15 (k = 0..3) of one half of a
// Q6_K block (ql, qh: that half's bytes), as dequantize_q6_K assembles them.
static inline void q6_ints(__m512i q[4], const uint8_t *ql, const uint8_t *qh, int l) {
    __m512i m15 = _mm512_set1_epi32(15), m3 = _mm512_set1_epi32(3), o = _mm512_set1_epi32(32);
    __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ql + l)));
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ql + 32 + l)));
    __m512i h = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qh + l)));
    __m512i lo[4] = {_mm512_and_si512(a, m15), _mm512_and_si512(b, m15), _mm512_srli_epi32(a, 4), _mm512_srli_epi32(b, 4)};
UNROLL
    for (int k = 0; k < 4; k++) {
        __m512i hi = _mm512_and_si512(_mm512_srli_epi32(h, 2 * k), m3);
        q[k] = _mm512_sub_epi32(_mm512_or_si512(lo[k], _mm512_slli_epi32(hi, 4)), o);
    }
}

// scale * q, as floats.
static inline __m512 scaled(__m512i q, float scale) { return _mm512_mul_ps(_mm512_set1_ps(scale), _mm512_cvtepi32_ps(q)); }

static void dq_q6_K_avx512(float *y, const BlockQ6_K *x) {
    float d = half_scalar(x->d);
    for (int h = 0; h < 2; h++, y += 128) {
        const int8_t *sc = x->scales + 8 * h;
        for (int l = 0; l < 32; l += 16) {
            __m512i q[4];
            q6_ints(q, x->ql + 64 * h, x->qh + 32 * h, l);
UNROLL
            for (int k = 0; k < 4; k++) _mm512_storeu_ps(y + l + 32 * k, scaled(q[k], d * sc[l / 16 + 2 * k]));
        }
    }
}

static void dq_nf4_avx512(float *y, const BlockNF4 *x) {
    __m512 code = _mm512_loadu_ps(NF4_CODE), amax = _mm512_set1_ps(x->absmax);
    __m512i shift = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4), m15 = _mm512_set1_epi32(15);
    for (int j = 0; j < 4; j++) {
        __m128i q = _mm_loadl_epi64((const __m128i *)(x->qs + 8 * j));
        __m512i b = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(q, q));  // byte k twice: elements 2k, 2k+1
        __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(b, shift), m15);
        _mm512_storeu_ps(y + 16 * j, _mm512_mul_ps(_mm512_permutexvar_ps(idx, code), amax));
    }
}

// Returns 1 when it wrote out[n] = elements [i0, i0 + n) of the row.
int dequantize_span_avx512(Type type, float *out, const uint8_t *row, int i0, int n) {
    const TypeInfo *ti = type_info(type);
    const uint8_t *p = row + (size_t)(i0 / ti->block) * ti->bytes;
    int nb = n / ti->block, i = 0;
    switch (type) {
    case TYPE_F16:
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 2 * i))));
        for (; i < n; i++) out[i] = fp16_to_fp32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
        return 1;
    case TYPE_BF16:
        for (; i + 16 <= n; i += 16) {
            __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p + 2 * i)));
            _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
        }
        for (; i < n; i++) out[i] = bf16_to_fp32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
        return 1;
    case TYPE_Q4_0: for (int b = 0; b < nb; b++) dq_q4_0_avx512(out + 32 * b, (const BlockQ4_0 *)p + b); return 1;
    case TYPE_Q4_1: for (int b = 0; b < nb; b++) dq_q4_1_avx512(out + 32 * b, (const BlockQ4_1 *)p + b); return 1;
    case TYPE_Q5_0: for (int b = 0; b < nb; b++) dq_q5_0_avx512(out + 32 * b, (const BlockQ5_0 *)p + b); return 1;
    case TYPE_Q5_1: for (int b = 0; b < nb; b++) dq_q5_1_avx512(out + 32 * b, (const BlockQ5_1 *)p + b); return 1;
    case TYPE_Q8_0: for (int b = 0; b < nb; b++) dq_q8_0_avx512(out + 32 * b, (const BlockQ8_0 *)p + b); return 1;
    case TYPE_Q4_K: for (int b = 0; b < nb; b++) dq_q4_K_avx512(out + 256 * b, (const BlockQ4_K *)p + b); return 1;
    case TYPE_Q5_K: for (int b = 0; b < nb; b++) dq_q5_K_avx512(out + 256 * b, (const BlockQ5_K *)p + b); return 1;
    case TYPE_Q6_K: for (int b = 0; b < nb; b++) dq_q6_K_avx512(out + 256 * b, (const BlockQ6_K *)p + b); return 1;
    case TYPE_NF4: for (int b = 0; b < nb; b++) dq_nf4_avx512(out + 64 * b, (const BlockNF4 *)p + b); return 1;
    default: return 0;
    }
}

// --- bf16 pairs --------------------------------------------------------------------------------

#if HAVE_BF16_DOT
// to_bf16_pairs (kernels.h) with vcvtne2ps2bf16; the tail through masks, so that every element is
// rounded the same way.
void to_bf16_pairs_avx512(uint32_t *out, const float *in, int n) {
    int i = 0;
    for (; i + 32 <= n; i += 32)
        _mm512_storeu_si512(out + i / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(in + i + 16), _mm512_loadu_ps(in + i)));
    if (i < n) {
        int r = n - i;
        __m512 lo = _mm512_maskz_loadu_ps((__mmask16)((1u << (r < 16 ? r : 16)) - 1), in + i);
        __m512 hi = _mm512_maskz_loadu_ps((__mmask16)(r > 16 ? (1u << (r - 16)) - 1 : 0), in + i + 16);
        _mm512_mask_storeu_epi32(out + i / 2, (__mmask16)((1u << ((r + 1) / 2)) - 1), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

// to_bf16_interleaved (kernels.h): 16 pairs a vector, their halves interleaved by vpermw.
void to_bf16_interleaved_avx512(uint32_t *out, const float *a, const float *b, int n) {
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = (__mmask16)(n - i >= 16 ? 0xffff : (1u << (n - i)) - 1);
        __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(m, b + i), _mm512_maskz_loadu_ps(m, a + i));
        _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(idx, ab));
    }
}
#endif

// --- The tiles ---------------------------------------------------------------------------------

// acc + x . w for one word per lane.
static inline __attribute__((always_inline)) __m512 madd_words(__m512 acc, __m512i x, __m512i w, const int pairs) {
#if HAVE_BF16_DOT
    if (pairs) return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
#endif
    (void)pairs;
    return _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), acc);
}

// The microkernel: M vectors of 16 tokens x FWD_N rows, 4 x FWD_N = 24 accumulators in registers,
// words multiplied as bf16 pairs (pairs = 1) or fp32 values; M and pairs fixed at compile time.
static inline __attribute__((always_inline)) void fwd_micro_avx512(const Fwd *f, const FwdTile *tl, const int M, const int pairs) {
    __m512 acc[4][FWD_N];
UNROLL
    for (int m = 0; m < M; m++)
UNROLL
        for (int n = 0; n < FWD_N; n++)
            acc[m][n] = tl->first || n >= tl->nrows ? _mm512_setzero_ps()
                        : _mm512_loadu_ps(tl->dst + (size_t)n * f->TP + 16 * (tl->tv0 + m));
    const uint32_t *x = f->x + (size_t)tl->k0 * f->TP + 16 * tl->tv0, *wb = tl->wb;
    for (int k = 0; k < tl->K; k++, x += f->TP, wb++) {
        __m512i xv[4];
UNROLL
        for (int m = 0; m < M; m++) xv[m] = _mm512_loadu_si512(x + 16 * m);
UNROLL
        for (int n = 0; n < FWD_N; n++) {
            __m512i wv = _mm512_set1_epi32((int)word_at(wb + (size_t)n * tl->K));
UNROLL
            for (int m = 0; m < M; m++) acc[m][n] = madd_words(acc[m][n], xv[m], wv, pairs);
        }
    }
UNROLL
    for (int m = 0; m < M; m++)
UNROLL
        for (int n = 0; n < FWD_N; n++)
            if (n < tl->nrows) _mm512_storeu_ps(tl->dst + (size_t)n * f->TP + 16 * (tl->tv0 + m), acc[m][n]);
}

// One forward tile of M vectors (f->pairs: bf16 pairs or fp32 words), through the microkernel
// specialised for it.
void fwd_tile_avx512(const Fwd *f, const FwdTile *tl, int M) {
#if HAVE_BF16_DOT
    if (f->pairs) {
        switch (M) {
        case 4: fwd_micro_avx512(f, tl, 4, 1); return;
        case 3: fwd_micro_avx512(f, tl, 3, 1); return;
        case 2: fwd_micro_avx512(f, tl, 2, 1); return;
        default: fwd_micro_avx512(f, tl, 1, 1); return;
        }
    }
#endif
    switch (M) {
    case 4: fwd_micro_avx512(f, tl, 4, 0); return;
    case 3: fwd_micro_avx512(f, tl, 3, 0); return;
    case 2: fwd_micro_avx512(f, tl, 2, 0); return;
    default: fwd_micro_avx512(f, tl, 1, 0); return;
    }
}

// The microkernel: M vectors of 16 columns x BWD_N tokens, M and pairs fixed at compile time.
static inline __attribute__((always_inline)) void bwd_micro_avx512(const Bwd *b, const BwdTile *tl, const int M, const int pairs) {
    __m512 acc[4][BWD_N];
UNROLL
    for (int m = 0; m < M; m++)
UNROLL
        for (int n = 0; n < BWD_N; n++) acc[m][n] = _mm512_setzero_ps();
    // Tokens past the last one read zeros, so that the loop has no branch.
    static const uint32_t zeros[BWD_OC] = {0};
    const uint32_t *d[BWD_N], *wp = tl->wp;
    int N = tl->N;
    for (int n = 0; n < BWD_N; n++) d[n] = n < N ? b->d + (size_t)(tl->t0 + n) * b->OW + tl->q0 : zeros;
    for (int q = 0; q < tl->Q; q++, wp += tl->ldw) {
        __m512i wv[4];
UNROLL
        for (int m = 0; m < M; m++) wv[m] = _mm512_loadu_si512(wp + 16 * m);
UNROLL
        for (int n = 0; n < BWD_N; n++) {
            __m512i dv = _mm512_set1_epi32((int)word_at(d[n] + q));
UNROLL
            for (int m = 0; m < M; m++) acc[m][n] = madd_words(acc[m][n], wv[m], dv, pairs);
        }
    }
UNROLL
    for (int m = 0; m < M; m++) {
        int left = tl->ncols - 16 * m;
        __mmask16 mask = (__mmask16)(left >= 16 ? 0xffff : (1u << left) - 1);
UNROLL
        for (int n = 0; n < BWD_N; n++) {
            if (n >= N) continue;
            float *dx = b->dinp + (size_t)(tl->t0 + n) * b->W->cols + tl->c0 + 16 * m;
            _mm512_mask_storeu_ps(dx, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dx), acc[m][n]));
        }
    }
}

// One backward tile of M vectors, through the microkernel specialised for it.
void bwd_tile_avx512(const Bwd *b, const BwdTile *tl, int M) {
#if HAVE_BF16_DOT
    if (b->pairs) {
        switch (M) {
        case 4: bwd_micro_avx512(b, tl, 4, 1); return;
        case 3: bwd_micro_avx512(b, tl, 3, 1); return;
        case 2: bwd_micro_avx512(b, tl, 2, 1); return;
        default: bwd_micro_avx512(b, tl, 1, 1); return;
        }
    }
#endif
    switch (M) {
    case 4: bwd_micro_avx512(b, tl, 4, 0); return;
    case 3: bwd_micro_avx512(b, tl, 3, 0); return;
    case 2: bwd_micro_avx512(b, tl, 2, 0); return;
    default: bwd_micro_avx512(b, tl, 1, 0); return;
    }
}

// --- Finished tiles: transposes --------------------------------------------------------------

// r[i][j] becomes r[j][i]: 1 x 1, 2 x 2, 4 x 4 and 8 x 8 blocks swapped in turn.
static void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        for (int k = 0; k < 2; k++) {
            __m512d a = _mm512_castps_pd(t[i + k]), b = _mm512_castps_pd(t[i + k + 2]);
            r[i + 2 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            r[i + 2 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        }
    }
    for (int i = 0; i < 16; i += 8) {
        for (int k = 0; k < 4; k++) {
            t[i + k] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0x88);
            t[i + k + 4] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0xdd);
        }
    }
    for (int k = 0; k < 8; k++) {
        r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
        r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xdd);
    }
}

// fwd_flush_simd (kernels.h): 16 x 16 blocks of tokens x rows, transposed in registers, while
// nrows is a multiple of 16; returns the tokens written.
int fwd_flush_avx512(const Fwd *f, const float *stage, int o0, int nrows) {
    int OUT = f->W->rows, t = 0;
    for (; nrows % 16 == 0 && t + 16 <= f->T; t += 16) {
        for (int n0 = 0; n0 < nrows; n0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(stage + (size_t)(n0 + i) * f->TP + t);
            transpose16(r);
            __m512 b = f->bias ? _mm512_loadu_ps(f->bias + o0 + n0) : _mm512_setzero_ps();
            for (int i = 0; i < 16; i++)
                _mm512_storeu_ps(f->out + (size_t)(t + i) * OUT + o0 + n0, f->bias ? _mm512_add_ps(r[i], b) : r[i]);
        }
    }
    return t;
}

// dst[k * ldd + j] = src[j * ld + k] for j < 16, k < n (n a multiple of 16): 16 rows of words
// turned into n rows of 16, 16 x 16 blocks transposed in registers (amx.c's B operands, ldd 16;
// avx512_vnni.c's packed activations, ldd the padded token count).
void transpose_words16(uint32_t *dst, size_t ldd, const uint32_t *src, size_t ld, int n) {
    for (int k0 = 0; k0 < n; k0 += 16) {
        __m512 r[16];
        for (int j = 0; j < 16; j++) r[j] = _mm512_castsi512_ps(_mm512_loadu_si512(src + j * ld + k0));
        transpose16(r);
        for (int k = 0; k < 16; k++) _mm512_storeu_si512(dst + (size_t)(k0 + k) * ldd, _mm512_castps_si512(r[k]));
    }
}

// --- Few tokens: fp32 rows -----------------------------------------------------------------------

// dot_f32 (kernels.h): four sums of 16 lanes, the tail through a mask.
float dot_f32_avx512(const float *a, const float *b, int n) {
    int i = 0;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (; i + 64 <= n; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i < n; i += 16) {
        __mmask16 m = (__mmask16)(n - i >= 16 ? 0xffff : (1u << (n - i)) - 1);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

// axpy_f32 (kernels.h): 16 lanes, the tail through a mask.
void axpy_f32_avx512(float *y, float a, const float *x, int n) {
    __m512 va = _mm512_set1_ps(a);
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = (__mmask16)(n - i >= 16 ? 0xffff : (1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
    }
}

// *s = row . x[n] for the formats that generation reads most, dequantizing in registers (the
// values are those of dequantize_row); returns 0 for other formats.
int row_dot_avx512(float *s, Type type, const uint8_t *row, const float *x, int n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    if (type == TYPE_Q4_0) {
        const BlockQ4_0 *b = (const BlockQ4_0 *)row;
        __m512i m15 = _mm512_set1_epi32(15), e8 = _mm512_set1_epi32(8);
        for (int i = 0; i < n / QK; i++, x += QK) {
            __m512 d = _mm512_set1_ps(half_scalar(b[i].d));
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b[i].qs));
            __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, m15), e8)), d);
            __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), e8)), d);
            a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), a0);
            a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), a1);
        }
    } else if (type == TYPE_Q8_0) {
        const BlockQ8_0 *b = (const BlockQ8_0 *)row;
        for (int i = 0; i < n / QK; i++, x += QK) {
            __m512 d = _mm512_set1_ps(half_scalar(b[i].d));
            __m512i v0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b[i].qs));
            __m512i v1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b[i].qs + 16)));
            a0 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v0), d), _mm512_loadu_ps(x), a0);
            a1 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v1), d), _mm512_loadu_ps(x + 16), a1);
        }
    } else if (type == TYPE_Q4_K) {
        const BlockQ4_K *b = (const BlockQ4_K *)row;
        __m512i m15 = _mm512_set1_epi32(15);
        for (int i = 0; i < n / QK_K; i++) {
            float d = half_scalar(b[i].d), min = half_scalar(b[i].dmin);
            for (int c = 0; c < 4; c++, x += 64) {
                uint8_t sc, m;
                const uint8_t *q = b[i].qs + 32 * c;
                __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
                __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)));
                scale_min_k4(2 * c, b[i].scales, &sc, &m);
                float d1 = d * sc, m1 = min * m;
                scale_min_k4(2 * c + 1, b[i].scales, &sc, &m);
                float d2 = d * sc, m2 = min * m;
                a0 = _mm512_fmadd_ps(scaled_min(_mm512_and_si512(v0, m15), d1, m1), _mm512_loadu_ps(x), a0);
                a1 = _mm512_fmadd_ps(scaled_min(_mm512_and_si512(v1, m15), d1, m1), _mm512_loadu_ps(x + 16), a1);
                a0 = _mm512_fmadd_ps(scaled_min(_mm512_srli_epi32(v0, 4), d2, m2), _mm512_loadu_ps(x + 32), a0);
                a1 = _mm512_fmadd_ps(scaled_min(_mm512_srli_epi32(v1, 4), d2, m2), _mm512_loadu_ps(x + 48), a1);
            }
        }
    } else if (type == TYPE_Q6_K) {
        const BlockQ6_K *b = (const BlockQ6_K *)row;
        for (int i = 0; i < n / QK_K; i++) {
            float d = half_scalar(b[i].d);
            for (int h = 0; h < 2; h++, x += 128) {
                const int8_t *sc = b[i].scales + 8 * h;
                for (int l = 0; l < 32; l += 16) {
                    __m512i q[4];
                    q6_ints(q, b[i].ql + 64 * h, b[i].qh + 32 * h, l);
                    a0 = _mm512_fmadd_ps(scaled(q[0], d * sc[l / 16]), _mm512_loadu_ps(x + l), a0);
                    a1 = _mm512_fmadd_ps(scaled(q[1], d * sc[l / 16 + 2]), _mm512_loadu_ps(x + l + 32), a1);
                    a0 = _mm512_fmadd_ps(scaled(q[2], d * sc[l / 16 + 4]), _mm512_loadu_ps(x + l + 64), a0);
                    a1 = _mm512_fmadd_ps(scaled(q[3], d * sc[l / 16 + 6]), _mm512_loadu_ps(x + l + 96), a1);
                }
            }
        }
    } else {
        return 0;
    }
    *s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    return 1;
}

#endif  // HAVE_AVX512
