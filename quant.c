// quant.c: element types and block formats (bit-exact with ggml's), their conversions to and from
// float, and the definitions of the matrix products over a frozen, possibly quantized, weight
// matrix.
//
// Reading order: the half conversions, the types, the scalar dequantizers and quantizers (the
// blocks they read and write are drawn in quant.h), then the _ref products: for each token and
// each output row, the row's dot product with the token's activations (row_dot_ref, which for
// Q4_0 is dot_q4_0, the format's arithmetic written out). The fast products, which give the same
// results within the bounds of test/test_quant.c, are in kernels/ (start at kernels/dispatch.c).
// Left out: ggml's searches for the best K-quant scales (ours are simpler, see pack_scales_k4),
// and the other ggml types (IQ*, Q2_K, Q3_K, ...). Tests: test/test_quant.c.
#include "quant.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

// Products and conversions are rounded as written (no fused multiply-add), so results do not
// depend on the compiler; gcc's -std=c11 already means that, clang needs the pragma.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

// ---------------------------------------------------------------------------------------------
// Halves.

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

// IEEE half: |sign 1|exponent 5 (bias 15)|mantissa 10|.
float fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000 | (mant << 13));  // inf, NaN
    if (exp == 0) {
        float v = (float)mant * (1.0f / 16777216.0f);  // subnormal: mant * 2^-24, exact
        return sign ? -v : v;
    }
    return f32_from_bits(sign | ((exp + 112) << 23) | (mant << 13));
}

// Round to nearest, ties to even (what F16C's vcvtps2ph with mode 0 and ggml's fallback do).
uint16_t fp32_to_fp16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t a = x & 0x7fffffff;
    if (a > 0x7f800000) return sign | 0x7e00;            // NaN
    if (a >= 0x477ff000) return sign | 0x7c00;           // >= 65520 rounds to infinity
    if (a >= 0x38800000) {                               // a normal half (>= 2^-14)
        uint32_t r = a + 0xfff + ((a >> 13) & 1);
        return sign | (uint16_t)((r - 0x38000000) >> 13);
    }
    if (a < 0x33000000) return sign;                     // <= 2^-25 rounds to zero
    uint32_t e = a >> 23;                                // 102..112: a subnormal half
    uint32_t m = (a & 0x7fffff) | 0x800000;
    uint32_t s = 126 - e;                                // value / 2^-24 = m >> s
    uint32_t q = m >> s, rem = m & ((1u << s) - 1), half = 1u << (s - 1);
    if (rem > half || (rem == half && (q & 1))) q++;
    return sign | (uint16_t)q;
}

// The 16 NormalFloat-4 values of bitsandbytes (functional.py, get_4bit_type("nf4")).
const float NF4_CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

// ---------------------------------------------------------------------------------------------
// Types.

static const TypeInfo TYPE_F32_INFO = {"f32", 1, 4};
static const TypeInfo TYPE_F16_INFO = {"f16", 1, 2};
static const TypeInfo TYPE_BF16_INFO = {"bf16", 1, 2};
static const TypeInfo TYPE_Q4_0_INFO = {"q4_0", QK, sizeof(BlockQ4_0)};
static const TypeInfo TYPE_Q4_1_INFO = {"q4_1", QK, sizeof(BlockQ4_1)};
static const TypeInfo TYPE_Q5_0_INFO = {"q5_0", QK, sizeof(BlockQ5_0)};
static const TypeInfo TYPE_Q5_1_INFO = {"q5_1", QK, sizeof(BlockQ5_1)};
static const TypeInfo TYPE_Q8_0_INFO = {"q8_0", QK, sizeof(BlockQ8_0)};
static const TypeInfo TYPE_Q4_K_INFO = {"q4_k", QK_K, sizeof(BlockQ4_K)};
static const TypeInfo TYPE_Q5_K_INFO = {"q5_k", QK_K, sizeof(BlockQ5_K)};
static const TypeInfo TYPE_Q6_K_INFO = {"q6_k", QK_K, sizeof(BlockQ6_K)};
static const TypeInfo TYPE_NF4_INFO = {"nf4", QK_NF4, sizeof(BlockNF4)};

const TypeInfo *type_info(int type) {
    switch (type) {
    case TYPE_F32: return &TYPE_F32_INFO;
    case TYPE_F16: return &TYPE_F16_INFO;
    case TYPE_BF16: return &TYPE_BF16_INFO;
    case TYPE_Q4_0: return &TYPE_Q4_0_INFO;
    case TYPE_Q4_1: return &TYPE_Q4_1_INFO;
    case TYPE_Q5_0: return &TYPE_Q5_0_INFO;
    case TYPE_Q5_1: return &TYPE_Q5_1_INFO;
    case TYPE_Q8_0: return &TYPE_Q8_0_INFO;
    case TYPE_Q4_K: return &TYPE_Q4_K_INFO;
    case TYPE_Q5_K: return &TYPE_Q5_K_INFO;
    case TYPE_Q6_K: return &TYPE_Q6_K_INFO;
    case TYPE_NF4: return &TYPE_NF4_INFO;
    default: return NULL;
    }
}

int type_from_name(const char *name) {
    static const int all[] = {TYPE_F32, TYPE_F16, TYPE_BF16, TYPE_Q4_0, TYPE_Q4_1, TYPE_Q5_0,
                              TYPE_Q5_1, TYPE_Q8_0, TYPE_Q4_K, TYPE_Q5_K, TYPE_Q6_K, TYPE_NF4};
    if (!name) return -1;
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (strcasecmp(name, type_info(all[i])->name) == 0) return all[i];
    return -1;
}

size_t row_bytes(int type, int64_t n) {
    const TypeInfo *ti = type_info(type);
    if (!ti || n < 0 || n % ti->block != 0) return 0;
    uint64_t blocks = (uint64_t)(n / ti->block);
    if (blocks > SIZE_MAX / ti->bytes) return 0;
    return (size_t)blocks * ti->bytes;
}

// ---------------------------------------------------------------------------------------------
// Dequantization, one block at a time (the expressions are ggml's, so results are bit-exact).

static void dequantize_q4_0(float *y, const BlockQ4_0 *x) {
    float d = fp16_to_fp32(x->d);
    for (int j = 0; j < QK / 2; j++) {
        y[j] = ((x->qs[j] & 0x0f) - 8) * d;
        y[j + QK / 2] = ((x->qs[j] >> 4) - 8) * d;
    }
}

static void dequantize_q4_1(float *y, const BlockQ4_1 *x) {
    float d = fp16_to_fp32(x->d), m = fp16_to_fp32(x->m);
    for (int j = 0; j < QK / 2; j++) {
        y[j] = (x->qs[j] & 0x0f) * d + m;
        y[j + QK / 2] = (x->qs[j] >> 4) * d + m;
    }
}

static void dequantize_q5_0(float *y, const BlockQ5_0 *x) {
    float d = fp16_to_fp32(x->d);
    uint32_t qh = load_u32le(x->qh);
    for (int j = 0; j < QK / 2; j++) {
        int h0 = ((qh >> j) << 4) & 0x10, h1 = (qh >> (j + 12)) & 0x10;
        y[j] = (((x->qs[j] & 0x0f) | h0) - 16) * d;
        y[j + QK / 2] = (((x->qs[j] >> 4) | h1) - 16) * d;
    }
}

static void dequantize_q5_1(float *y, const BlockQ5_1 *x) {
    float d = fp16_to_fp32(x->d), m = fp16_to_fp32(x->m);
    uint32_t qh = load_u32le(x->qh);
    for (int j = 0; j < QK / 2; j++) {
        int h0 = ((qh >> j) << 4) & 0x10, h1 = (qh >> (j + 12)) & 0x10;
        y[j] = ((x->qs[j] & 0x0f) | h0) * d + m;
        y[j + QK / 2] = ((x->qs[j] >> 4) | h1) * d + m;
    }
}

static void dequantize_q8_0(float *y, const BlockQ8_0 *x) {
    float d = fp16_to_fp32(x->d);
    for (int j = 0; j < QK; j++) y[j] = x->qs[j] * d;
}

static void dequantize_q4_K(float *y, const BlockQ4_K *x) {
    float d = fp16_to_fp32(x->d), min = fp16_to_fp32(x->dmin);
    const uint8_t *q = x->qs;
    for (int g = 0; g < 8; g += 2, q += 32) {
        uint8_t sc, m;
        scale_min_k4(g, x->scales, &sc, &m);
        float d1 = d * sc, m1 = min * m;
        scale_min_k4(g + 1, x->scales, &sc, &m);
        float d2 = d * sc, m2 = min * m;
        for (int l = 0; l < 32; l++) *y++ = d1 * (q[l] & 0x0f) - m1;
        for (int l = 0; l < 32; l++) *y++ = d2 * (q[l] >> 4) - m2;
    }
}

static void dequantize_q5_K(float *y, const BlockQ5_K *x) {
    float d = fp16_to_fp32(x->d), min = fp16_to_fp32(x->dmin);
    const uint8_t *ql = x->qs, *qh = x->qh;
    uint8_t u1 = 1, u2 = 2;
    for (int g = 0; g < 8; g += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
        uint8_t sc, m;
        scale_min_k4(g, x->scales, &sc, &m);
        float d1 = d * sc, m1 = min * m;
        scale_min_k4(g + 1, x->scales, &sc, &m);
        float d2 = d * sc, m2 = min * m;
        for (int l = 0; l < 32; l++) *y++ = d1 * ((ql[l] & 0x0f) + (qh[l] & u1 ? 16 : 0)) - m1;
        for (int l = 0; l < 32; l++) *y++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
    }
}

// Each half (128 values) of a Q6_K block: value l + 32k (k = 0..3, l = 0..31) takes its low
// 4 bits from ql[l] (k = 0, 2: low/high nibble) or ql[l + 32] (k = 1, 3), its high 2 bits from
// bits 2k..2k+1 of qh[l], and its scale from scales[l / 16 + 2k].
static void dequantize_q6_K(float *y, const BlockQ6_K *x) {
    float d = fp16_to_fp32(x->d);
    const uint8_t *ql = x->ql, *qh = x->qh;
    const int8_t *sc = x->scales;
    for (int n = 0; n < QK_K; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
        for (int l = 0; l < 32; l++) {
            int is = l / 16;
            int q1 = (int8_t)((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32;
            int q2 = (int8_t)((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
            int q3 = (int8_t)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            int q4 = (int8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * sc[is] * q1;
            y[l + 32] = d * sc[is + 2] * q2;
            y[l + 64] = d * sc[is + 4] * q3;
            y[l + 96] = d * sc[is + 6] * q4;
        }
    }
}

static void dequantize_nf4(float *y, const BlockNF4 *x) {
    for (int j = 0; j < QK_NF4 / 2; j++) {
        y[2 * j] = NF4_CODE[x->qs[j] >> 4] * x->absmax;
        y[2 * j + 1] = NF4_CODE[x->qs[j] & 0x0f] * x->absmax;
    }
}

// out[block] = block number b of a row in `type` (one block = type_info(type)->block values).
static void dequantize_block(int type, float *out, const void *row, int64_t b) {
    const uint8_t *p = row;
    switch (type) {
    case TYPE_F32: memcpy(out, p + b * 4, 4); break;
    case TYPE_F16: {
        uint16_t h;
        memcpy(&h, p + b * 2, 2);
        out[0] = fp16_to_fp32(h);
        break;
    }
    case TYPE_BF16: {
        uint16_t h;
        memcpy(&h, p + b * 2, 2);
        out[0] = bf16_to_fp32(h);
        break;
    }
    case TYPE_Q4_0: dequantize_q4_0(out, (const BlockQ4_0 *)row + b); break;
    case TYPE_Q4_1: dequantize_q4_1(out, (const BlockQ4_1 *)row + b); break;
    case TYPE_Q5_0: dequantize_q5_0(out, (const BlockQ5_0 *)row + b); break;
    case TYPE_Q5_1: dequantize_q5_1(out, (const BlockQ5_1 *)row + b); break;
    case TYPE_Q8_0: dequantize_q8_0(out, (const BlockQ8_0 *)row + b); break;
    case TYPE_Q4_K: dequantize_q4_K(out, (const BlockQ4_K *)row + b); break;
    case TYPE_Q5_K: dequantize_q5_K(out, (const BlockQ5_K *)row + b); break;
    case TYPE_Q6_K: dequantize_q6_K(out, (const BlockQ6_K *)row + b); break;
    case TYPE_NF4: dequantize_nf4(out, (const BlockNF4 *)row + b); break;
    default: break;
    }
}

void dequantize_row(int type, float *out, const void *in, int64_t n) {
    const TypeInfo *ti = type_info(type);
    if (!ti) return;
    if (type == TYPE_F32) {
        memcpy(out, in, (size_t)n * sizeof(float));
        return;
    }
    if (type == TYPE_F16 || type == TYPE_BF16) {
        const uint8_t *p = in;
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            out[i] = type == TYPE_F16 ? fp16_to_fp32(h) : bf16_to_fp32(h);
        }
        return;
    }
    for (int64_t b = 0; b < n / ti->block; b++) dequantize_block(type, out + b * ti->block, in, b);
}

// ---------------------------------------------------------------------------------------------
// Quantization of one block (Q4_0, Q4_1, Q8_0: ggml's quantize_row_*_ref, expression by
// expression; NF4: bitsandbytes' nearest-code rule).

// The value of x[0..31] of largest magnitude, with its sign (the first of equal magnitudes).
static float signed_max(const float *x) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK; j++) {
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    return max;
}

static void quantize_q4_0(BlockQ4_0 *y, const float *x) {
    float d = signed_max(x) / -8;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    y->d = fp32_to_fp16(d);
    for (int j = 0; j < QK / 2; j++) {
        float x0 = x[j] * id, x1 = x[j + QK / 2] * id;  // rounded before the add, as in ggml
        int q0 = (int8_t)(x0 + 8.5f), q1 = (int8_t)(x1 + 8.5f);
        q0 = q0 < 15 ? q0 : 15;
        q1 = q1 < 15 ? q1 : 15;
        y->qs[j] = (uint8_t)((q0 & 0x0f) | (q1 << 4));
    }
}

// Q5_0 as ggml's quantize_row_q5_0_ref: d = max / -16, q = min(31, (int)(x / d + 16.5)), the low
// 4 bits in qs as Q4_0's, the fifth of value j in bit j of qh.
static void quantize_q5_0(BlockQ5_0 *y, const float *x) {
    float d = signed_max(x) / -16;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    y->d = fp32_to_fp16(d);
    uint32_t qh = 0;
    for (int j = 0; j < QK / 2; j++) {
        float x0 = x[j] * id, x1 = x[j + QK / 2] * id;  // rounded before the add, as in ggml
        int q0 = (int8_t)(x0 + 16.5f), q1 = (int8_t)(x1 + 16.5f);
        q0 = q0 < 31 ? q0 : 31;
        q1 = q1 < 31 ? q1 : 31;
        y->qs[j] = (uint8_t)((q0 & 0x0f) | (q1 & 0x0f) << 4);
        qh |= (uint32_t)(q0 >> 4) << j | (uint32_t)(q1 >> 4) << (j + QK / 2);
    }
    for (int k = 0; k < 4; k++) y->qh[k] = (uint8_t)(qh >> (8 * k));
}

static void quantize_q4_1(BlockQ4_1 *y, const float *x) {
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < QK; j++) {
        if (x[j] < min) min = x[j];
        if (x[j] > max) max = x[j];
    }
    float d = (max - min) / 15;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    y->d = fp32_to_fp16(d);
    y->m = fp32_to_fp16(min);
    for (int j = 0; j < QK / 2; j++) {
        float x0 = (x[j] - min) * id, x1 = (x[j + QK / 2] - min) * id;
        int q0 = (int8_t)(x0 + 0.5f), q1 = (int8_t)(x1 + 0.5f);
        q0 = q0 < 15 ? q0 : 15;
        q1 = q1 < 15 ? q1 : 15;
        y->qs[j] = (uint8_t)((q0 & 0x0f) | (q1 << 4));
    }
}

static void quantize_q8_0(BlockQ8_0 *y, const float *x) {
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
    float d = amax / 127;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    y->d = fp32_to_fp16(d);
    for (int j = 0; j < QK; j++) y->qs[j] = (int8_t)roundf(x[j] * id);
}

// Index of the NF4 code nearest to x in [-1, 1]; ties go to the lower code, as in bitsandbytes'
// dQuantizeNF4 (which compares x > midpoint).
static int nf4_index(float x) {
    int q = 0;
    for (int k = 0; k < 15; k++) {
        float mid = (float)(((double)NF4_CODE[k] + (double)NF4_CODE[k + 1]) / 2);
        if (x > mid) q = k + 1;
    }
    return q;
}

static void quantize_nf4(BlockNF4 *y, const float *x) {
    float amax = 0.0f;
    for (int j = 0; j < QK_NF4; j++) amax = fmaxf(amax, fabsf(x[j]));
    float id = amax != 0.0f ? 1.0f / amax : 0.0f;
    y->absmax = amax;
    for (int j = 0; j < QK_NF4 / 2; j++)
        y->qs[j] = (uint8_t)(nf4_index(x[2 * j] * id) << 4 | nf4_index(x[2 * j + 1] * id));
}

// The K-quants. Simpler than ggml's quantize_row_q*_K_ref (no search for the best scale, no
// importance weights), so their bytes differ from ggml's; the format, and so the decoding, is
// the same. Each group gets the scale (and min) that spans its values, the scales are rounded
// to 6 (Q4_K, Q5_K) or 8 (Q6_K) bits against the block's largest one, and every value is then
// rounded with the scale it will be decoded with.

// Scales and mins of 8 groups of 32 (scale = range / nmax, min = -min(0, lowest)) packed as
// scale_min_k4 reads them; returns d and dmin through the block's halves.
static void pack_scales_k4(uint8_t *scales, uint16_t *d, uint16_t *dmin, const float *x, int nmax) {
    float sc[8], mn[8], max_sc = 0, max_mn = 0;
    for (int g = 0; g < 8; g++) {
        float lo = 0, hi = x[32 * g];
        for (int j = 0; j < 32; j++) {
            lo = fminf(lo, x[32 * g + j]);
            hi = fmaxf(hi, x[32 * g + j]);
        }
        sc[g] = (hi - lo) / nmax;
        mn[g] = lo < 0 ? -lo : 0.0f;  // never -0: the bytes must not depend on fmaxf(0, -0)
        max_sc = fmaxf(max_sc, sc[g]);
        max_mn = fmaxf(max_mn, mn[g]);
    }
    float isc = max_sc > 0 ? 63 / max_sc : 0, imn = max_mn > 0 ? 63 / max_mn : 0;
    memset(scales, 0, 12);
    for (int g = 0; g < 8; g++) {
        int ls = (int)lrintf(isc * sc[g]), lm = (int)lrintf(imn * mn[g]);
        ls = ls < 63 ? ls : 63;
        lm = lm < 63 ? lm : 63;
        if (g < 4) {
            scales[g] |= (uint8_t)ls;
            scales[g + 4] |= (uint8_t)lm;
        } else {
            scales[g + 4] = (uint8_t)((ls & 0x0f) | (lm & 0x0f) << 4);
            scales[g - 4] |= (uint8_t)((ls >> 4) << 6);
            scales[g] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    *d = fp32_to_fp16(max_sc / 63);
    *dmin = fp32_to_fp16(max_mn / 63);
}

// L[256] = the integers (0..nmax) that a Q4_K/Q5_K block with these scales decodes closest to x.
static void levels_k4(uint8_t *L, const float *x, const uint8_t *scales, uint16_t d16, uint16_t dmin16, int nmax) {
    for (int g = 0; g < 8; g++) {
        uint8_t sc, m;
        scale_min_k4(g, scales, &sc, &m);
        float d = fp16_to_fp32(d16) * sc, dm = fp16_to_fp32(dmin16) * m;
        for (int j = 0; j < 32; j++) {
            int l = d != 0.0f ? (int)lrintf((x[32 * g + j] + dm) / d) : 0;
            L[32 * g + j] = (uint8_t)(l < 0 ? 0 : l > nmax ? nmax : l);
        }
    }
}

static void quantize_q4_K(BlockQ4_K *y, const float *x) {
    uint8_t L[QK_K];
    pack_scales_k4(y->scales, &y->d, &y->dmin, x, 15);
    levels_k4(L, x, y->scales, y->d, y->dmin, 15);
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) y->qs[32 * c + l] = (uint8_t)(L[64 * c + l] | L[64 * c + 32 + l] << 4);
}

static void quantize_q5_K(BlockQ5_K *y, const float *x) {
    uint8_t L[QK_K];
    pack_scales_k4(y->scales, &y->d, &y->dmin, x, 31);
    levels_k4(L, x, y->scales, y->d, y->dmin, 31);
    memset(y->qh, 0, sizeof y->qh);
    for (int c = 0; c < 4; c++) {
        for (int l = 0; l < 32; l++) {
            int a = L[64 * c + l], b = L[64 * c + 32 + l];
            y->qs[32 * c + l] = (uint8_t)((a & 0x0f) | (b & 0x0f) << 4);
            y->qh[l] |= (uint8_t)((a >> 4) << (2 * c) | (b >> 4) << (2 * c + 1));
        }
    }
}

// Q6_K: 16 groups of 16, each with the signed scale that maps its largest magnitude to -32.
static void quantize_q6_K(BlockQ6_K *y, const float *x) {
    float sc[16], max_sc = 0, amax_sc = 0;
    for (int g = 0; g < 16; g++) {
        float amax = 0, max = 0;
        for (int j = 0; j < 16; j++) {
            if (fabsf(x[16 * g + j]) > amax) {
                amax = fabsf(x[16 * g + j]);
                max = x[16 * g + j];
            }
        }
        sc[g] = max / -32;
        if (fabsf(sc[g]) > amax_sc) {
            amax_sc = fabsf(sc[g]);
            max_sc = sc[g];
        }
    }
    float isc = max_sc != 0 ? -128 / max_sc : 0;
    y->d = fp32_to_fp16(max_sc != 0 ? 1 / isc : 0);
    uint8_t L[QK_K];
    for (int g = 0; g < 16; g++) {
        int ls = (int)lrintf(isc * sc[g]);
        y->scales[g] = (int8_t)(ls < -128 ? -128 : ls > 127 ? 127 : ls);
        float d = fp16_to_fp32(y->d) * y->scales[g];
        for (int j = 0; j < 16; j++) {
            int l = d != 0.0f ? (int)lrintf(x[16 * g + j] / d) : 0;
            L[16 * g + j] = (uint8_t)((l < -32 ? -32 : l > 31 ? 31 : l) + 32);
        }
    }
    for (int h = 0; h < 2; h++) {
        uint8_t *ql = y->ql + 64 * h, *qh = y->qh + 32 * h;
        const uint8_t *Lh = L + 128 * h;
        for (int l = 0; l < 32; l++) {
            ql[l] = (uint8_t)((Lh[l] & 0x0f) | (Lh[l + 64] & 0x0f) << 4);
            ql[l + 32] = (uint8_t)((Lh[l + 32] & 0x0f) | (Lh[l + 96] & 0x0f) << 4);
            qh[l] = (uint8_t)(Lh[l] >> 4 | (Lh[l + 32] >> 4) << 2 | (Lh[l + 64] >> 4) << 4 | (Lh[l + 96] >> 4) << 6);
        }
    }
}

int quantize_row(int type, void *out, const float *in, int64_t n) {
    const TypeInfo *ti = type_info(type);
    if (!ti || n < 0 || n % ti->block != 0) return -1;
    uint8_t *p = out;
    int64_t nb = n / ti->block;
    switch (type) {
    case TYPE_F32: memcpy(out, in, (size_t)n * sizeof(float)); return 0;
    case TYPE_F16:
    case TYPE_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = type == TYPE_F16 ? fp32_to_fp16(in[i]) : fp32_to_bf16(in[i]);
            memcpy(p + 2 * i, &h, 2);
        }
        return 0;
    case TYPE_Q4_0: for (int64_t b = 0; b < nb; b++) quantize_q4_0((BlockQ4_0 *)out + b, in + b * QK); return 0;
    case TYPE_Q4_1: for (int64_t b = 0; b < nb; b++) quantize_q4_1((BlockQ4_1 *)out + b, in + b * QK); return 0;
    case TYPE_Q5_0: for (int64_t b = 0; b < nb; b++) quantize_q5_0((BlockQ5_0 *)out + b, in + b * QK); return 0;
    case TYPE_Q8_0: for (int64_t b = 0; b < nb; b++) quantize_q8_0((BlockQ8_0 *)out + b, in + b * QK); return 0;
    case TYPE_NF4: for (int64_t b = 0; b < nb; b++) quantize_nf4((BlockNF4 *)out + b, in + b * QK_NF4); return 0;
    case TYPE_Q4_K: for (int64_t b = 0; b < nb; b++) quantize_q4_K((BlockQ4_K *)out + b, in + b * QK_K); return 0;
    case TYPE_Q5_K: for (int64_t b = 0; b < nb; b++) quantize_q5_K((BlockQ5_K *)out + b, in + b * QK_K); return 0;
    case TYPE_Q6_K: for (int64_t b = 0; b < nb; b++) quantize_q6_K((BlockQ6_K *)out + b, in + b * QK_K); return 0;
    default: return -1;
    }
}

// ---------------------------------------------------------------------------------------------
// Products, reference versions: the definitions. Every output is one row of W dotted with one
// row of activations: a plain float sum over the elements in order, each weight decoded as
// dequantize_row decodes it (the fast products in kernels/ are tested against these).

// The dot product of a Q4_0 row[n / 32] with x[n]: value j of a block is d * (q_j - 8), q_j the
// low nibble of qs[j] for j < 16 and the high nibble of qs[j - 16] after. Written out (not through
// dequantize_q4_0), so that a breakpoint here stops first in the model's first product.
static float dot_q4_0(const BlockQ4_0 *row, const float *x, int n) {
    float acc = 0.0f;
    for (int b = 0; b < n / QK; b++, x += QK) {
        float d = fp16_to_fp32(row[b].d);
        for (int j = 0; j < QK / 2; j++) acc += ((row[b].qs[j] & 0x0f) - 8) * d * x[j];
        for (int j = 0; j < QK / 2; j++) acc += ((row[b].qs[j] >> 4) - 8) * d * x[j + QK / 2];
    }
    return acc;
}

// row[n] . x[n] for a row stored in `type`: Q4_0 through dot_q4_0, the other types a block at a
// time through dequantize_block, then a dot product.
static float row_dot_ref(Type type, const void *row, const float *x, int n) {
    if (type == TYPE_Q4_0) return dot_q4_0(row, x, n);
    int bs = type_info(type)->block;
    float w[QK_K], acc = 0.0f;
    for (int b = 0; b < n / bs; b++, x += bs) {
        dequantize_block(type, w, row, b);
        for (int j = 0; j < bs; j++) acc += w[j] * x[j];
    }
    return acc;
}

// y[n] += a * row[n] for a row stored in `type`, a block at a time.
static void row_axpy_ref(Type type, float *y, float a, const void *row, int n) {
    int bs = type_info(type)->block;
    float w[QK_K];
    for (int b = 0; b < n / bs; b++, y += bs) {
        dequantize_block(type, w, row, b);
        for (int j = 0; j < bs; j++) y[j] += a * w[j];
    }
}

// out is (T, OUT), inp is (T, IN), W is (OUT, IN), bias is (OUT) or NULL:
// out[t, o] = W[o] . inp[t] (+ bias[o]).
void matmul_ref(float *out, const float *inp, const QMatrix *W, const float *bias, int T) {
    int OUT = W->rows, IN = W->cols;
    for (int t = 0; t < T; t++) {
        for (int o = 0; o < OUT; o++) {
            float s = row_dot_ref(W->type, qmatrix_row_data(W, o), inp + (size_t)t * IN, IN);
            out[(size_t)t * OUT + o] = bias ? s + bias[o] : s;
        }
    }
}

// dinp is (T, IN), dout is (T, OUT), W is (OUT, IN): dinp[t] += dout[t, o] * W[o] for every o.
void matmul_backward_input_ref(float *dinp, const float *dout, const QMatrix *W, int T) {
    int OUT = W->rows, IN = W->cols;
    for (int t = 0; t < T; t++)
        for (int o = 0; o < OUT; o++)
            row_axpy_ref(W->type, dinp + (size_t)t * IN, dout[(size_t)t * OUT + o], qmatrix_row_data(W, o), IN);
}

void qmatrix_row(float *out, const QMatrix *W, int r) {
    dequantize_row(W->type, out, qmatrix_row_data(W, r), W->cols);
}
