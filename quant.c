// quant.c: element types and block formats (bit-exact with ggml's), their conversions to and from
// float, and the matrix products over a frozen, possibly quantized, weight matrix.
//
// Reading order: the half conversions, one struct per block format (with its bytes drawn), the
// scalar dequantizers and quantizers, then the _ref products (the definitions), and last the fast
// products, which are the only place in sft with CPU intrinsics (behind #if, scalar code always
// compiled). Left out: ggml's searches for the best K-quant scales (ours are simpler, see
// pack_scales_k4), and the other ggml types (IQ*, Q2_K, Q3_K, ...). Tests: test/test_quant.c.
#define _DEFAULT_SOURCE  // syscall(), for the AMX permission
#include "quant.h"

#include <assert.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "threads.h"

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__x86_64__) && defined(__linux__) && !defined(SFT_REF)
#include <cpuid.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
// vdpbf16ps and the bf16 conversions (with the AVX-512 they extend).
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define HAVE_BF16_DOT 1
#else
#define HAVE_BF16_DOT 0
#endif
// vpdpwssd (AVX512-VNNI): products on 16-bit integers (the forward tiles, and generation's rows
// for Q4_0 and Q6_K: see X16).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__) && defined(__F16C__)
#define HAVE_INT16_DOT 1
#else
#define HAVE_INT16_DOT 0
#endif
// The other fast paths, each compiled only where the one before it is not: AVX2 with FMA (x86-64-v3:
// most x86 laptops), then NEON (arm64: Apple Silicon, Graviton). Neither changes the AVX-512 code.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__)
#define HAVE_AVX2 1
#else
#define HAVE_AVX2 0
#endif
#if defined(__ARM_NEON) && defined(__aarch64__) && !HAVE_AVX2
#include <arm_neon.h>
#define HAVE_NEON 1
#else
#define HAVE_NEON 0
#endif

// Products and conversions are rounded as written (no fused multiply-add unless spelled out by an
// intrinsic), so results do not depend on the compiler; gcc's -std=c11 already means that.
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

float bf16_to_fp32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

uint16_t fp32_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40);  // quiet NaN
    return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

// ---------------------------------------------------------------------------------------------
// Block formats. Halves are little-endian IEEE fp16 ("d"), as in ggml-common.h.

#define QK 32      // elements per block of the simple formats
#define QK_K 256   // elements per super-block of the K-quants
#define QK_NF4 64  // elements per NF4 block (bitsandbytes' QLoRA default blocksize)

// Q4_0: |d: f16|qs: 16 bytes| = 18 bytes; value j = d * (q_j - 8), q_j in 0..15,
// q_j = low nibble of qs[j] for j < 16, high nibble of qs[j - 16] for j >= 16.
typedef struct {
    uint16_t d;
    uint8_t qs[QK / 2];
} BlockQ4_0;
static_assert(sizeof(BlockQ4_0) == 18, "Q4_0 block");

// Q4_1: |d: f16|m: f16|qs: 16 bytes| = 20 bytes; value j = d * q_j + m (nibbles as in Q4_0).
typedef struct {
    uint16_t d, m;
    uint8_t qs[QK / 2];
} BlockQ4_1;
static_assert(sizeof(BlockQ4_1) == 20, "Q4_1 block");

// Q5_0: |d: f16|qh: 4 bytes (u32 LE)|qs: 16 bytes| = 22 bytes; value j = d * (q_j - 16), where
// q_j = nibble j as in Q4_0 | (bit j of qh) << 4.
typedef struct {
    uint16_t d;
    uint8_t qh[4];
    uint8_t qs[QK / 2];
} BlockQ5_0;
static_assert(sizeof(BlockQ5_0) == 22, "Q5_0 block");

// Q5_1: |d: f16|m: f16|qh: 4 bytes|qs: 16 bytes| = 24 bytes; value j = d * q_j + m.
typedef struct {
    uint16_t d, m;
    uint8_t qh[4];
    uint8_t qs[QK / 2];
} BlockQ5_1;
static_assert(sizeof(BlockQ5_1) == 24, "Q5_1 block");

// Q8_0: |d: f16|qs: 32 x int8| = 34 bytes; value j = d * qs[j].
typedef struct {
    uint16_t d;
    int8_t qs[QK];
} BlockQ8_0;
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 block");

// Q4_K: |d: f16|dmin: f16|scales: 12 bytes|qs: 128 bytes| = 144 bytes for 256 values in 8 groups
// of 32. Group g has a 6-bit scale sc_g and a 6-bit min m_g packed in `scales` (see
// scale_min_k4); value = d * sc_g * q - dmin * m_g. qs holds 4 chunks of 32 bytes: chunk c has
// group 2c in its low nibbles and group 2c+1 in its high nibbles.
typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qs[QK_K / 2];
} BlockQ4_K;
static_assert(sizeof(BlockQ4_K) == 144, "Q4_K block");

// Q5_K: |d: f16|dmin: f16|scales: 12 bytes|qh: 32 bytes|qs: 128 bytes| = 176 bytes. As Q4_K,
// plus a fifth bit: bit g of qh[l] is the high bit of element l of group g.
typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2];
} BlockQ5_K;
static_assert(sizeof(BlockQ5_K) == 176, "Q5_K block");

// Q6_K: |ql: 128 bytes|qh: 64 bytes|scales: 16 x int8|d: f16| = 210 bytes for 256 values in 16
// groups of 16; value = d * scales[g] * (q - 32), q 6 bits: 4 from ql, 2 from qh (see
// dequantize_q6_K for the order).
typedef struct {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    uint16_t d;
} BlockQ6_K;
static_assert(sizeof(BlockQ6_K) == 210, "Q6_K block");

// NF4 (ours, in memory only): |absmax: f32|qs: 32 bytes| = 36 bytes for 64 values;
// value j = NF4_CODE[q_j] * absmax, q_j = high nibble of qs[j/2] for even j, low nibble for odd j
// (the packing order of bitsandbytes).
typedef struct {
    float absmax;
    uint8_t qs[QK_NF4 / 2];
} BlockNF4;
static_assert(sizeof(BlockNF4) == 36, "NF4 block");

// The 16 NormalFloat-4 values of bitsandbytes (functional.py, get_4bit_type("nf4")).
static const float NF4_CODE[16] = {
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

static uint32_t load_u32le(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
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

// Scale and min of group j (0..7) of a Q4_K/Q5_K block: groups 0-3 take the low 6 bits of
// bytes j and j+4; groups 4-7 take a nibble of byte j+4 and the top 2 bits of bytes j-4 and j.
static void scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
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

static void quantize_q4_0(BlockQ4_0 *y, const float *x) {
    float amax = 0.0f, max = 0.0f;  // the value of largest magnitude, with its sign
    for (int j = 0; j < QK; j++) {
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    float d = max / -8;
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
    case TYPE_Q8_0: for (int64_t b = 0; b < nb; b++) quantize_q8_0((BlockQ8_0 *)out + b, in + b * QK); return 0;
    case TYPE_NF4: for (int64_t b = 0; b < nb; b++) quantize_nf4((BlockNF4 *)out + b, in + b * QK_NF4); return 0;
    case TYPE_Q4_K: for (int64_t b = 0; b < nb; b++) quantize_q4_K((BlockQ4_K *)out + b, in + b * QK_K); return 0;
    case TYPE_Q5_K: for (int64_t b = 0; b < nb; b++) quantize_q5_K((BlockQ5_K *)out + b, in + b * QK_K); return 0;
    case TYPE_Q6_K: for (int64_t b = 0; b < nb; b++) quantize_q6_K((BlockQ6_K *)out + b, in + b * QK_K); return 0;
    default: return -1;
    }
}

// ---------------------------------------------------------------------------------------------
// Products, reference versions: the definitions. Each weight block is dequantized once into a
// small buffer; every output is a plain float sum in a fixed order (blocks, then elements).

static inline const uint8_t *qmatrix_row_data(const QMatrix *W, int r) {
    return (const uint8_t *)W->data + (size_t)r * row_bytes(W->type, W->cols);
}

// out is (T, OUT), inp is (T, IN), W is (OUT, IN), bias is (OUT) or NULL.
void matmul_ref(float *out, const float *inp, const QMatrix *W, const float *bias, int T) {
    int OUT = W->rows, IN = W->cols, bs = type_info(W->type)->block;
    float buf[QK_K];
    for (int o = 0; o < OUT; o++) {
        const uint8_t *row = qmatrix_row_data(W, o);
        for (int t = 0; t < T; t++) out[(size_t)t * OUT + o] = 0.0f;
        for (int b = 0; b < IN / bs; b++) {
            dequantize_block(W->type, buf, row, b);
            for (int t = 0; t < T; t++) {
                const float *x = inp + (size_t)t * IN + (size_t)b * bs;
                float acc = out[(size_t)t * OUT + o];
                for (int j = 0; j < bs; j++) acc += buf[j] * x[j];
                out[(size_t)t * OUT + o] = acc;
            }
        }
        if (bias)
            for (int t = 0; t < T; t++) out[(size_t)t * OUT + o] += bias[o];
    }
}

// dinp is (T, IN), dout is (T, OUT), W is (OUT, IN).
void matmul_backward_input_ref(float *dinp, const float *dout, const QMatrix *W, int T) {
    int OUT = W->rows, IN = W->cols, bs = type_info(W->type)->block;
    float buf[QK_K];
    for (int o = 0; o < OUT; o++) {
        const uint8_t *row = qmatrix_row_data(W, o);
        for (int b = 0; b < IN / bs; b++) {
            dequantize_block(W->type, buf, row, b);
            for (int t = 0; t < T; t++) {
                float d = dout[(size_t)t * OUT + o];
                float *dx = dinp + (size_t)t * IN + (size_t)b * bs;
                for (int j = 0; j < bs; j++) dx[j] += d * buf[j];
            }
        }
    }
}

void qmatrix_row(float *out, const QMatrix *W, int r) {
    dequantize_row(W->type, out, qmatrix_row_data(W, r), W->cols);
}

// ---------------------------------------------------------------------------------------------
// Products, fast versions (make debug, -DSFT_REF, uses the _ref versions instead).
#if !defined(SFT_REF)
//
// matmul_route chooses, per product, one of these (quant.h: Route), matmul and
// matmul_backward_input dispatch by it:
// - Few tokens (generation: T = 1): rows. Each weight row is dequantized once (SIMD per format;
//   for T = 1 and Q4_0, Q8_0, Q4_K, Q6_K in registers, fused with the dot product) and dotted
//   with every token row (forward), or added to every token's gradient row (backward), in fp32.
//   On AVX512-VNNI, Q4_0 and Q6_K rows take the activations in 16-bit integers instead (X16,
//   ROUTE_INT16_ROWS): 1.5x faster, with an error a hundred times below bf16's.
// - More tokens (training, prompts): compute-bound register tiles.
//   Forward, AVX512-VNNI, quantized weights: the weights' own integers times the activations in
//   14-bit integers (vpdpwssd, ROUTE_INT16_TILES; see matmul_int16): exact products, so that the
//   loss is as accurate as with fp32 weights. Lanes are 16 tokens; tile = 4 x 16 tokens x FWD_N
//   rows over the blocks of a K-chunk of IN.
//   Backward (and the forward of Q4_1, Q5_1) with AVX512-BF16: both factors rounded to bf16, fp32
//   sums (vdpbf16ps, ROUTE_BF16: two exact products per lane, 32 multiply-adds an instruction, 24
//   accumulators in registers; or AMX tiles, ROUTE_AMX). Activations are rounded once per call and
//   packed into the pool's shared scratch; weight rows are dequantized to bf16, a chunk at a time,
//   into the thread's own scratch. Backward: lanes are 16 input columns; tile = 4 x 16 columns x
//   BWD_N tokens, over chunks of BWD_OC rows of W, whose slices are interleaved in pairs of rows.
//   The relative error of a product is at most 2^-7 (bounds in test/test_quant.c), and the
//   gradients measured on the fixtures stay below PyTorch bf16 autocast's.
//   Why not llama.cpp's 8-bit activations (vpdpbusd): their error per value is absmax / 254 of
//   its block, 2-3x that of bf16 rounding, which would make the loss less exact than the peer's.
// Every route splits the output rows (forward) or input columns (backward) among the threads, and
// every output element is computed by one thread in an order fixed by the sizes alone, so results
// do not depend on the thread count.
// Other CPUs (each route below compiled only where the one before is not), all ROUTE_FP32:
// - AVX2 + FMA (x86-64-v3): every format dequantized in registers of 8 floats (dequantize_span,
//   and for T = 1 fused with the dot product: row_dot_avx2); fp32 tiles of 16 tokens (or input
//   columns) x 6 in 12 of the 16 ymm registers (fwd_tile_avx2, bwd_tile_avx2), at the FMA peak
//   (2 x 8 MACs a cycle; ~100 GFLOP/s a Zen 4 core). Errors: those of fp32 sums, as for F32
//   weights.
// - NEON (arm64): Q4_0 and Q8_0 dequantized in registers (T = 1: row_dot_neon), fp32 tiles of
//   16 x 6 in 24 of the 32 q registers (fwd_tile_neon, bwd_tile_neon).
// - Anything else: the same tiles in plain C (fwd_tile_c, bwd_tile_c), which compilers vectorize
//   as they can.

#define FWD_TILE_MIN_T 5  // tokens from which the tiles beat fp32 rows (measured: forward,
#define BWD_TILE_MIN_T 2  // T = 4 takes the same time both ways; backward, tiles win from T = 2)
#define FWD_N 6           // rows of W per forward tile
#define FWD_BLOCK 48      // rows of W per block of finished outputs (a multiple of FWD_N)
#define BWD_N 6           // tokens per backward tile
#define BWD_OC 256        // rows of W (pairs: 128) per backward chunk
#define BWD_CB 128        // columns of W per backward block (or the block size if larger)
#define CHUNK_ALIGN 256   // K-chunks are multiples of every block size

static size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

// Loops over the registers of a tile must be unrolled completely, or the accumulators spill.
#if defined(__clang__)
#define UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define UNROLL _Pragma("GCC unroll 8")
#else
#define UNROLL
#endif

// --- SIMD dequantization ---------------------------------------------------------------------

#if (defined(__AVX512F__) && defined(__AVX512BW__)) || HAVE_AVX2 || HAVE_NEON
// A block's fp16 scale, with the CPU's own conversion where there is one.
static inline float half_scalar(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif HAVE_NEON
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
#else
    return fp16_to_fp32(h);
#endif
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
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
static int dequantize_span_avx512(int type, float *out, const uint8_t *row, int i0, int n) {
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
#endif

#if HAVE_AVX2
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
static int dequantize_span_avx2(int type, float *out, const uint8_t *row, int i0, int n) {
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
#endif

#if HAVE_NEON
// NEON: Q4_0 and Q8_0 blocks decoded into registers of 4 floats, w[k] = values 4k ... 4k + 3
// (the values of dequantize_row); the other formats take the plain C dequantizers.

// v[8] = 32 small integers as floats: lo holds elements 0-15 as int8, hi elements 16-31.
static inline void i8x32_f32(float32x4_t v[8], int8x16_t lo, int8x16_t hi) {
    int16x8_t s[4] = {vmovl_s8(vget_low_s8(lo)), vmovl_s8(vget_high_s8(lo)), vmovl_s8(vget_low_s8(hi)),
                      vmovl_s8(vget_high_s8(hi))};
UNROLL
    for (int k = 0; k < 4; k++) {
        v[2 * k] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(s[k])));
        v[2 * k + 1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(s[k])));
    }
}

static inline void q4_0_f32x4(float32x4_t w[8], const BlockQ4_0 *x) {
    uint8x16_t q = vld1q_u8(x->qs);
    int8x16_t e8 = vdupq_n_s8(8);
    i8x32_f32(w, vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(15))), e8),
              vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), e8));
    float d = half_scalar(x->d);
UNROLL
    for (int k = 0; k < 8; k++) w[k] = vmulq_n_f32(w[k], d);
}

static inline void q8_0_f32x4(float32x4_t w[8], const BlockQ8_0 *x) {
    i8x32_f32(w, vld1q_s8(x->qs), vld1q_s8(x->qs + 16));
    float d = half_scalar(x->d);
UNROLL
    for (int k = 0; k < 8; k++) w[k] = vmulq_n_f32(w[k], d);
}

// Returns 1 when it wrote out[n] = elements [i0, i0 + n) of the row.
static int dequantize_span_neon(int type, float *out, const uint8_t *row, int i0, int n) {
    const TypeInfo *ti = type_info(type);
    const uint8_t *p = row + (size_t)(i0 / ti->block) * ti->bytes;
    float32x4_t w[8];
    if (type != TYPE_Q4_0 && type != TYPE_Q8_0) return 0;
    for (int b = 0; b < n / QK; b++) {
        if (type == TYPE_Q4_0) q4_0_f32x4(w, (const BlockQ4_0 *)p + b);
        else q8_0_f32x4(w, (const BlockQ8_0 *)p + b);
UNROLL
        for (int k = 0; k < 8; k++) vst1q_f32(out + 32 * b + 4 * k, w[k]);
    }
    return 1;
}
#endif

// out[n] = elements [i0, i0 + n) of a row; i0 and n are multiples of the type's block size.
// Bit-exact with dequantize_row (the SIMD versions keep ggml's order of operations).
static void dequantize_span(int type, float *out, const uint8_t *row, int i0, int n) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (dequantize_span_avx512(type, out, row, i0, n)) return;
#elif HAVE_AVX2
    if (dequantize_span_avx2(type, out, row, i0, n)) return;
#elif HAVE_NEON
    if (dequantize_span_neon(type, out, row, i0, n)) return;
#endif
    const TypeInfo *ti = type_info(type);
    dequantize_row(type, out, row + (size_t)(i0 / ti->block) * ti->bytes, n);
}

// --- bf16 pairs ------------------------------------------------------------------------------

// out[(n + 1) / 2] = in[n] rounded to bf16, two per 32-bit word: element 2j in the low half of
// out[j], element 2j + 1 in the high half (0 when n is odd and 2j + 1 = n).
static void to_bf16_pairs(uint32_t *out, const float *in, int n) {
    int i = 0;
#if HAVE_BF16_DOT
    for (; i + 32 <= n; i += 32)
        _mm512_storeu_si512(out + i / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(in + i + 16), _mm512_loadu_ps(in + i)));
    if (i < n) {  // the tail through masks, so that every element is rounded the same way
        int r = n - i;
        __m512 lo = _mm512_maskz_loadu_ps((__mmask16)((1u << (r < 16 ? r : 16)) - 1), in + i);
        __m512 hi = _mm512_maskz_loadu_ps((__mmask16)(r > 16 ? (1u << (r - 16)) - 1 : 0), in + i + 16);
        _mm512_mask_storeu_epi32(out + i / 2, (__mmask16)((1u << ((r + 1) / 2)) - 1), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
#else
    for (; i + 1 < n; i += 2) out[i / 2] = fp32_to_bf16(in[i]) | (uint32_t)fp32_to_bf16(in[i + 1]) << 16;
    if (i < n) out[i / 2] = fp32_to_bf16(in[i]);
#endif
}

// out[n] = the pairs (a[i], b[i]) in bf16: a[i] in the low half, b[i] in the high half; zeros
// after them up to a multiple of 16.
static void to_bf16_interleaved(uint32_t *out, const float *a, const float *b, int n) {
    int i = 0;
#if HAVE_BF16_DOT
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (; i < n; i += 16) {
        __mmask16 m = (__mmask16)(n - i >= 16 ? 0xffff : (1u << (n - i)) - 1);
        __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(m, b + i), _mm512_maskz_loadu_ps(m, a + i));
        _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(idx, ab));
    }
#else
    for (; i < n; i++) out[i] = fp32_to_bf16(a[i]) | (uint32_t)fp32_to_bf16(b[i]) << 16;
    for (; i % 16; i++) out[i] = 0;
#endif
}

// --- The tiled products ----------------------------------------------------------------------
//
// Both tiled products multiply 32-bit words: a bf16 pair (two products per vdpbf16ps lane) when
// `pairs` is set, else one fp32 value (one vfmadd231ps product). The pair route is taken for
// quantized weights on CPUs with AVX512-BF16; F32, F16 and BF16 weights (and every type on other
// CPUs) take the fp32 route, exact up to fp32 sums, at half the speed.

static int tile_pairs(int type) {
#if HAVE_BF16_DOT
    return type != TYPE_F32 && type != TYPE_F16 && type != TYPE_BF16;
#else
    (void)type;
    return 0;
#endif
}

// out[n] = the words of in[n]: fp32 values (pairs = 0) or bf16 pairs (pairs = 1, (n + 1) / 2 words).
static void to_words(uint32_t *out, const float *in, int n, int pairs) {
    if (pairs) to_bf16_pairs(out, in, n);
    else memcpy(out, in, (size_t)n * sizeof(float));
}

#if defined(__AVX512F__)
// acc + x . w for one word per lane.
static inline __attribute__((always_inline)) __m512 madd_words(__m512 acc, __m512i x, __m512i w, const int pairs) {
#if HAVE_BF16_DOT
    if (pairs) return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
#endif
    (void)pairs;
    return _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), acc);
}
#endif

// The word at p, whatever was stored there (floats or bf16 pairs): read through memcpy, which
// compilers turn into a plain load, so that no pointer is read as another type.
static inline uint32_t word_at(const uint32_t *p) {
    uint32_t w;
    memcpy(&w, p, sizeof w);
    return w;
}

// acc + x . w for one word, in plain C (fp32 words only: the pair route needs AVX512-BF16).
static float madd_word_c(float acc, uint32_t x, uint32_t w) { return acc + f32_from_bits(x) * f32_from_bits(w); }

// --- The forward product ---------------------------------------------------------------------

typedef struct {
    float *out;            // (T, OUT)
    const float *bias;     // (OUT) or NULL
    const QMatrix *W;      // (OUT, IN)
    int T, TP;             // tokens; TP = T rounded up to 16
    int pairs;             // words are bf16 pairs (1) or fp32 values (0)
    const uint32_t *x;     // words of inp: word k of token t at x[k * TP + t], zeros for t >= T
    int KC;                // elements of IN per K-chunk
} Fwd;

// One tile: tokens 16 * tv0 ... (M vectors of 16) x rows o0 ... o0 + nrows - 1, over the words
// [k0, k0 + K) of the K-chunk; wb + n * K holds row o0 + n's words. The sums start from zero
// (first K-chunk) or from dst + n * TP + token, and go back there: a block of the thread's
// staging buffer, which fwd_flush writes into out after the last K-chunk.
typedef struct {
    int nrows, tv0, k0, K, first;
    const uint32_t *wb;
    float *dst;
} FwdTile;

#if defined(__AVX512F__)
static inline __attribute__((always_inline)) void fwd_tile_avx512(const Fwd *f, const FwdTile *tl, const int M, const int pairs) {
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
#endif

#if HAVE_AVX2
// The tile for one vector of 16 tokens (number tv) held in H registers of 8 (fp32 words): H = 2,
// or 1 when tokens 8-15 of the vector are all padding. 2 x FWD_N accumulators take 12 of the 16
// registers. fwd_tile calls it for each of the M vectors.
static inline __attribute__((always_inline)) void fwd_tile_avx2(const Fwd *f, const FwdTile *tl, int tv, const int H) {
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
#endif

#if HAVE_NEON
// The tile for one vector of 16 tokens (number tv) in four registers of 4: 4 x FWD_N
// accumulators take 24 of the 32 registers. fwd_tile calls it for each of M vectors.
static void fwd_tile_neon(const Fwd *f, const FwdTile *tl, int tv) {
    float32x4_t acc[4][FWD_N];
    float *dst = tl->dst + 16 * tv;
UNROLL
    for (int n = 0; n < FWD_N; n++)
UNROLL
        for (int j = 0; j < 4; j++)
            acc[j][n] = tl->first || n >= tl->nrows ? vdupq_n_f32(0) : vld1q_f32(dst + (size_t)n * f->TP + 4 * j);
    const uint32_t *x = f->x + (size_t)tl->k0 * f->TP + 16 * tv, *wb = tl->wb;
    for (int k = 0; k < tl->K; k++, x += f->TP, wb++) {
        float32x4_t xv[4];
UNROLL
        for (int j = 0; j < 4; j++) xv[j] = vreinterpretq_f32_u32(vld1q_u32(x + 4 * j));
UNROLL
        for (int n = 0; n < FWD_N; n++) {
            float w = f32_from_bits(word_at(wb + (size_t)n * tl->K));
UNROLL
            for (int j = 0; j < 4; j++) acc[j][n] = vfmaq_n_f32(acc[j][n], xv[j], w);
        }
    }
UNROLL
    for (int n = 0; n < FWD_N; n++)
        if (n < tl->nrows)
UNROLL
            for (int j = 0; j < 4; j++) vst1q_f32(dst + (size_t)n * f->TP + 4 * j, acc[j][n]);
}
#endif

// The same tile in plain C (fp32 words).
static void fwd_tile_c(const Fwd *f, const FwdTile *tl, int M) {
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

static void fwd_tile(const Fwd *f, const FwdTile *tl, int M) {
#if defined(__AVX512F__)
#if HAVE_BF16_DOT
    if (f->pairs) {
        switch (M) {
        case 4: fwd_tile_avx512(f, tl, 4, 1); return;
        case 3: fwd_tile_avx512(f, tl, 3, 1); return;
        case 2: fwd_tile_avx512(f, tl, 2, 1); return;
        default: fwd_tile_avx512(f, tl, 1, 1); return;
        }
    }
#endif
    switch (M) {
    case 4: fwd_tile_avx512(f, tl, 4, 0); return;
    case 3: fwd_tile_avx512(f, tl, 3, 0); return;
    case 2: fwd_tile_avx512(f, tl, 2, 0); return;
    default: fwd_tile_avx512(f, tl, 1, 0); return;
    }
    (void)fwd_tile_c;  // compiled and checked everywhere, used where no SIMD route is
#elif HAVE_AVX2
    for (int m = 0; m < M; m++) {
        if (16 * (tl->tv0 + m) + 8 < f->T) fwd_tile_avx2(f, tl, tl->tv0 + m, 2);
        else fwd_tile_avx2(f, tl, tl->tv0 + m, 1);
    }
    (void)fwd_tile_c;
#elif HAVE_NEON
    for (int m = 0; m < M; m++) fwd_tile_neon(f, tl, tl->tv0 + m);
    (void)fwd_tile_c;
#else
    fwd_tile_c(f, tl, M);
#endif
}

#if defined(__AVX512F__)
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
#endif

#if HAVE_AVX2
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
#endif

// out[t, o0 + n] = stage[n * TP + t] (+ bias) for n < nrows: a block of finished rows, written
// a token row at a time.
static void fwd_flush(const Fwd *f, const float *stage, int o0, int nrows) {
    int OUT = f->W->rows, t = 0;
#if defined(__AVX512F__)
    for (; nrows % 16 == 0 && t + 16 <= f->T; t += 16) {  // 16 x 16 blocks, transposed in registers
        for (int n0 = 0; n0 < nrows; n0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(stage + (size_t)(n0 + i) * f->TP + t);
            transpose16(r);
            __m512 b = f->bias ? _mm512_loadu_ps(f->bias + o0 + n0) : _mm512_setzero_ps();
            for (int i = 0; i < 16; i++)
                _mm512_storeu_ps(f->out + (size_t)(t + i) * OUT + o0 + n0, f->bias ? _mm512_add_ps(r[i], b) : r[i]);
        }
    }
#elif HAVE_AVX2
    for (; nrows % 8 == 0 && t + 8 <= f->T; t += 8) {  // 8 x 8 blocks, transposed in registers
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
#endif
    for (; t < f->T; t++) {
        float *y = f->out + (size_t)t * OUT + o0;
        for (int n = 0; n < nrows; n++) y[n] = stage[(size_t)n * f->TP + t];
        if (f->bias)
            for (int n = 0; n < nrows; n++) y[n] += f->bias[o0 + n];
    }
}

// Rows [r0, r1) of the output, every token: blocks of FWD_BLOCK rows, K-chunk by K-chunk (so
// that the chunk of packed activations stays in the cache while the block's rows go through it),
// FWD_N rows at a time; the block's sums wait in the thread's staging buffer.
static void fwd_rows(void *ctx, int r0, int r1) {
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

static void matmul_tiles(float *out, const float *inp, const QMatrix *W, const float *bias, int T) {
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
    parallel_for(fwd_rows, &f, OUT, FWD_N);
}

#if HAVE_INT16_DOT
// --- Many tokens, exact weights: the forward product in 16-bit integers (AVX512-VNNI) ----------
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

// w[kn / 2] = values k0 .. k0 + kn - 1 of a row as int16 pairs (value 2j in the low half of word
// j), s[kn / 32] the scale of each block of 32 values and, when the type has a min (returns 1),
// o[kn / 32] its offset: value = s * w - o. k0 and kn are multiples of the type's block size.
// Only for the types of has_unpack16 (the others, F32, F16, BF16, Q4_1, Q5_1, take the other tiles).
static int unpack16(int type, uint32_t *w, float *s, float *o, const uint8_t *row, int k0, int kn) {
    int16_t *v = (int16_t *)(void *)w;  // scratch of the pool: 64-byte aligned, only ever read as words
    const __m256i m15 = _mm256_set1_epi8(15);
    switch (type) {
    case TYPE_Q4_0: case TYPE_Q5_0: {
        int q5 = type == TYPE_Q5_0;
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
        return 0;
    }
    case TYPE_Q8_0:
        for (int b = 0; b < kn / QK; b++) {
            const BlockQ8_0 *blk = (const BlockQ8_0 *)row + k0 / QK + b;
            _mm512_storeu_si512(v + 32 * b, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)blk->qs)));
            s[b] = half_scalar(blk->d);
        }
        return 0;
    case TYPE_Q4_K: case TYPE_Q5_K: {
        int q5 = type == TYPE_Q5_K;
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
        return 1;
    }
    case TYPE_Q6_K:
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
        return 0;
    case TYPE_NF4: {
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
        return 0;
    }
    default:
        return 0;
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

// Rows [r0, r1) of the output, every token, as fwd_rows: blocks of FWD_BLOCK rows, K-chunk by
// K-chunk, FWD_N rows unpacked at a time.
static void fwd16_rows(void *ctx, int r0, int r1) {
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

// Tokens [t0, t1) of inp in 14-bit integers, one scale per K-chunk (dx = absmax / XQ_MAX; NaN when
// the chunk holds a NaN or an infinity, so that the outputs are not finite either), as int16 pairs
// into f->x, with the sums of each block's xq.
static void pack_x16(void *ctx, int t0, int t1) {
    PackX16 *px = ctx;
    Fwd16 *f = px->f;
    int IN = f->f.W->cols, KC = f->f.KC, TP = f->f.TP;
    uint32_t *q = scratch_local((size_t)IN * sizeof(int16_t) + 64), *xw = (uint32_t *)f->x;
    for (int t = t0; t < t1; t++) {
        const float *x = px->inp + (size_t)t * IN;
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
        for (int k = 0; k < IN / 2; k++) xw[(size_t)k * TP + t] = q[k];
    }
}

// The types unpack16 knows.
static int has_unpack16(int type) {
    return type == TYPE_Q4_0 || type == TYPE_Q5_0 || type == TYPE_Q8_0 || type == TYPE_Q4_K || type == TYPE_Q5_K ||
           type == TYPE_Q6_K || type == TYPE_NF4;
}

// out[T, OUT] = inp[T, IN] W^T (+ bias) on 16-bit integers, for the types of has_unpack16 (IN a
// multiple of 32).
static void matmul_int16(float *out, const float *inp, const QMatrix *W, const float *bias, int T) {
    int IN = W->cols, TP = (int)round_up((size_t)T, 16);
    // K-chunks keep the packed activations of a chunk (TP x KC int16) within ~320 KB, in chunks of
    // about the same size (a short last chunk would pay a tile's set-up for a few blocks)
    size_t budget = 320 * 1024 / 2 / (size_t)TP, parts = ((size_t)IN + budget - 1) / budget;
    int KC = (int)round_up(((size_t)IN + parts - 1) / parts, CHUNK_ALIGN);
    if (KC >= IN) KC = IN;
    int chunks = (IN + KC - 1) / KC;
    size_t xw = (size_t)IN / 2 * TP * 4, dxb = (size_t)chunks * TP * 4, xsb = (size_t)IN / 32 * TP * 4;
    uint8_t *mem = scratch_shared(xw + dxb + xsb);
    Fwd16 f = {{out, bias, W, T, TP, 0, NULL, KC}, (uint32_t *)mem, (float *)(mem + xw), (float *)(mem + xw + dxb)};
    PackX16 px = {&f, inp};
    parallel_for(pack_x16, &px, TP, 16);
    parallel_for(fwd16_rows, &f, W->rows, FWD_N);
}
#endif

// --- The backward product --------------------------------------------------------------------

typedef struct {
    float *dinp;           // (T, IN)
    const QMatrix *W;      // (OUT, IN)
    int T, pairs;          // tokens; words are bf16 pairs of rows (1) or fp32 values (0)
    int OW;                // words of a row of dout: (OUT + 1) / 2 pairs, or OUT values
    const uint32_t *d;     // words of dout: word q (rows 2q, 2q + 1, or row q) of token t at d[t * OW + q]
} Bwd;

// One tile: columns c0 + 16 m + lane (M vectors, the last one cut at ncols) x tokens
// t0 ... t0 + N - 1, over the words [q0, q0 + Q) of the chunk of rows; wp + q * ldw holds the
// words (pairs of rows, or rows) of word q0 + q.
typedef struct {
    int c0, ncols, t0, N, q0, Q;
    const uint32_t *wp;
    int ldw;
} BwdTile;

#if defined(__AVX512F__)
static inline __attribute__((always_inline)) void bwd_tile_avx512(const Bwd *b, const BwdTile *tl, const int M, const int pairs) {
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
#endif

#if HAVE_AVX2 || HAVE_NEON
// Tokens past the last one of a backward tile read these zeros, so that its loop has no branch.
static const uint32_t BWD_ZEROS[BWD_OC];
#endif

#if HAVE_AVX2
// The tile for the 16 columns c0 + 16m ... (two registers of 8, fp32 words) x BWD_N tokens:
// 2 x BWD_N accumulators take 12 of the 16 registers. bwd_tile calls it for each of M vectors.
static void bwd_tile_avx2(const Bwd *b, const BwdTile *tl, int m) {
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
#endif

#if HAVE_NEON
// The tile for the 16 columns c0 + 16m ... (four registers of 4) x BWD_N tokens: 4 x BWD_N
// accumulators take 24 of the 32 registers. bwd_tile calls it for each of M vectors.
static void bwd_tile_neon(const Bwd *b, const BwdTile *tl, int m) {
    float32x4_t acc[4][BWD_N];
UNROLL
    for (int n = 0; n < BWD_N; n++)
UNROLL
        for (int j = 0; j < 4; j++) acc[j][n] = vdupq_n_f32(0);
    const uint32_t *d[BWD_N], *wp = tl->wp + 16 * m;
    for (int n = 0; n < BWD_N; n++) d[n] = n < tl->N ? b->d + (size_t)(tl->t0 + n) * b->OW + tl->q0 : BWD_ZEROS;
    for (int q = 0; q < tl->Q; q++, wp += tl->ldw) {
        float32x4_t wv[4];
UNROLL
        for (int j = 0; j < 4; j++) wv[j] = vreinterpretq_f32_u32(vld1q_u32(wp + 4 * j));
UNROLL
        for (int n = 0; n < BWD_N; n++) {
            float dv = f32_from_bits(word_at(d[n] + q));
UNROLL
            for (int j = 0; j < 4; j++) acc[j][n] = vfmaq_n_f32(acc[j][n], wv[j], dv);
        }
    }
    int left = tl->ncols - 16 * m;  // columns of this vector to write, 1..16
UNROLL
    for (int n = 0; n < BWD_N; n++) {  // every n, so that acc stays in registers
        if (n >= tl->N) continue;
        float *dx = b->dinp + (size_t)(tl->t0 + n) * b->W->cols + tl->c0 + 16 * m, a[16];
UNROLL
        for (int j = 0; j < 4; j++) {
            if (left >= 16) vst1q_f32(dx + 4 * j, vaddq_f32(vld1q_f32(dx + 4 * j), acc[j][n]));
            else vst1q_f32(a + 4 * j, acc[j][n]);
        }
        for (int j = 0; j < left && left < 16; j++) dx[j] += a[j];
    }
}
#endif

static void bwd_tile_c(const Bwd *b, const BwdTile *tl, int M) {
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

static void bwd_tile(const Bwd *b, const BwdTile *tl, int M) {
#if defined(__AVX512F__)
#if HAVE_BF16_DOT
    if (b->pairs) {
        switch (M) {
        case 4: bwd_tile_avx512(b, tl, 4, 1); return;
        case 3: bwd_tile_avx512(b, tl, 3, 1); return;
        case 2: bwd_tile_avx512(b, tl, 2, 1); return;
        default: bwd_tile_avx512(b, tl, 1, 1); return;
        }
    }
#endif
    switch (M) {
    case 4: bwd_tile_avx512(b, tl, 4, 0); return;
    case 3: bwd_tile_avx512(b, tl, 3, 0); return;
    case 2: bwd_tile_avx512(b, tl, 2, 0); return;
    default: bwd_tile_avx512(b, tl, 1, 0); return;
    }
    (void)bwd_tile_c;
#elif HAVE_AVX2
    for (int m = 0; m < M; m++) bwd_tile_avx2(b, tl, m);
    (void)bwd_tile_c;
#elif HAVE_NEON
    for (int m = 0; m < M; m++) bwd_tile_neon(b, tl, m);
    (void)bwd_tile_c;
#else
    bwd_tile_c(b, tl, M);
#endif
}

// Columns [c0, c1) of dinp, every token, BWD_OC rows of W at a time: the rows' slices [c0, c1)
// are dequantized (reading each row's bytes in order) into words (interleaved in pairs of rows
// for the bf16 route) in blocks of CB columns; then every token goes through each block.
static void bwd_cols(void *ctx, int c0, int c1) {
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

static void matmul_backward_tiles(float *dinp, const float *dout, const QMatrix *W, int T) {
    int pairs = tile_pairs(W->type), bs = type_info(W->type)->block;
    Bwd b = {dinp, W, T, pairs, pairs ? (W->rows + 1) / 2 : W->rows, NULL};
    if (pairs) {
        b.d = scratch_shared((size_t)T * b.OW * sizeof(uint32_t));
        PackD pd = {&b, dout};
        parallel_for(pack_d, &pd, T, 1);
    } else {
        b.d = (const uint32_t *)(const void *)dout;  // fp32 words: dout as it is
    }
    parallel_for(bwd_cols, &b, W->cols, bs > 16 ? bs : 16);
}

// --- AMX tiles (decided at run time) -----------------------------------------------------------
//
// Intel's AMX (Sapphire Rapids and later) multiplies whole tiles: one tdpbf16ps adds the product
// of a 16 x 32 bf16 tile and a 32 x 16 bf16 tile into a 16 x 16 fp32 tile, 8192 products an
// instruction, the same rounding as vdpbf16ps (bf16 factors, fp32 sums). The CPU may have it and
// the kernel may refuse it: amx_ready() asks both once per process (cpuid, then Linux's
// arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)); SFT_NO_AMX=1 in the environment turns it off.
// The tile configuration belongs to a thread: every chunk of work loads it and releases it.
//
// Eight tiles of 16 rows x 64 bytes: C0-C3 (tiles 0-3) a 32 x 32 block of fp32 results, A0, A1
// (4, 5) two 16-row blocks of the left factor, B0, B1 (6, 7) two 16-column blocks of the right
// one, whose rows are pairs of k (two bf16 in each 32-bit word, as vdpbf16ps reads them).
//   forward   out[T, OUT] = x[T, IN] W^T: A = tokens x pairs of IN; B = pairs of IN x 16 rows of W
//   backward  dinp[T, IN] += dout[T, OUT] W: A = tokens x pairs of OUT (pack_d's words);
//             B = pairs of rows of W x 16 columns (bwd_cols's interleaved words)
// C tiles are rows of the output itself (stride OUT or IN floats), through a 16 x 16 staging tile
// where a block is cut by the last token or column.
//
// Built with -DSFT_AMX_EMULATE, the tile instructions are C functions on this thread's own eight
// tiles (any CPU with AVX512-BF16), so that CI tests this code where no CPU has AMX.
#if HAVE_BF16_DOT && defined(__x86_64__) && defined(__linux__) && (defined(__clang__) || __GNUC__ >= 11)
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
#endif

#if HAVE_AMX
#define AMX_PAIRS 16  // pairs of k in a tile row (64 bytes of bf16)

// LDTILECFG's 64 bytes: palette 1; per tile, bytes per row and rows.
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} AmxConfig;
static_assert(sizeof(AmxConfig) == 64, "AMX tile configuration");

#if defined(SFT_AMX_EMULATE)
static _Thread_local uint32_t emu_tiles[8][16][16];  // the tiles of this thread: 16 rows x 16 words

static void tile_config(void) {}
static void tile_release(void) {}
static void tile_load(int t, const void *p, size_t stride) {
    for (int r = 0; r < 16; r++) memcpy(emu_tiles[t][r], (const char *)p + r * stride, 64);
}
static void tile_store(int t, void *p, size_t stride) {
    for (int r = 0; r < 16; r++) memcpy((char *)p + r * stride, emu_tiles[t][r], 64);
}
static void tile_zero(int t) { memset(emu_tiles[t], 0, sizeof emu_tiles[t]); }
// C[m][n] += sum_k A[m].bf16[2k] * B[k].bf16[2n] + A[m].bf16[2k+1] * B[k].bf16[2n+1]
static void tile_dp(int c, int a, int b) {
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 16; n++) {
            float acc = f32_from_bits(emu_tiles[c][m][n]);
            for (int k = 0; k < 16; k++) {
                uint32_t x = emu_tiles[a][m][k], w = emu_tiles[b][k][n];
                acc += f32_from_bits(x << 16) * f32_from_bits(w << 16);
                acc += f32_from_bits(x & 0xffff0000u) * f32_from_bits(w & 0xffff0000u);
            }
            emu_tiles[c][m][n] = f32_bits(acc);
        }
}
#define AMX_TARGET
#else
// The tile number of an AMX instruction is part of its encoding: one case per tile, folded away
// when the functions are inlined with a constant.
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))
static inline __attribute__((always_inline)) AMX_TARGET void tile_config(void) {
    AmxConfig cfg = {.palette = 1};
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
}
static inline __attribute__((always_inline)) AMX_TARGET void tile_release(void) { _tile_release(); }
static inline __attribute__((always_inline)) AMX_TARGET void tile_load(int t, const void *p, size_t stride) {
    switch (t) {
    case 0: _tile_loadd(0, p, stride); break;
    case 1: _tile_loadd(1, p, stride); break;
    case 2: _tile_loadd(2, p, stride); break;
    case 3: _tile_loadd(3, p, stride); break;
    case 4: _tile_loadd(4, p, stride); break;
    case 5: _tile_loadd(5, p, stride); break;
    case 6: _tile_loadd(6, p, stride); break;
    default: _tile_loadd(7, p, stride); break;
    }
}
static inline __attribute__((always_inline)) AMX_TARGET void tile_store(int t, void *p, size_t stride) {
    switch (t) {
    case 0: _tile_stored(0, p, stride); break;
    case 1: _tile_stored(1, p, stride); break;
    case 2: _tile_stored(2, p, stride); break;
    default: _tile_stored(3, p, stride); break;
    }
}
static inline __attribute__((always_inline)) AMX_TARGET void tile_zero(int t) {
    switch (t) {
    case 0: _tile_zero(0); break;
    case 1: _tile_zero(1); break;
    case 2: _tile_zero(2); break;
    default: _tile_zero(3); break;
    }
}
// C_c += A_a B_b for the four products of a 32 x 32 block: (0, 4, 6), (1, 4, 7), (2, 5, 6), (3, 5, 7).
static inline __attribute__((always_inline)) AMX_TARGET void tile_dp(int c, int a, int b) {
    (void)a, (void)b;
    switch (c) {
    case 0: _tile_dpbf16ps(0, 4, 6); break;
    case 1: _tile_dpbf16ps(1, 4, 7); break;
    case 2: _tile_dpbf16ps(2, 5, 6); break;
    default: _tile_dpbf16ps(3, 5, 7); break;
    }
}
#endif

// The C tile of token block tb (0, 1) and column block cb (0, 1) of a 32 x 32 block; its A and B.
static inline int tile_c(int tb, int cb) { return 2 * tb + cb; }

// Loads (load = 1) or stores C tile c from / to the rows t0.. and columns n0.. of y (row stride
// ld floats), nt <= 16 rows and nc <= 16 columns of which exist: whole tiles directly, cut ones
// through stage[16 x 16].
static inline __attribute__((always_inline)) AMX_TARGET void tile_c_io(int c, float *y, size_t ld, int nt, int nc,
                                                                        float *stage, int load) {
    if (nt == 16 && nc == 16) {
        if (load) tile_load(c, y, ld * sizeof(float));
        else tile_store(c, y, ld * sizeof(float));
        return;
    }
    if (load) {
        memset(stage, 0, 256 * sizeof(float));
        for (int r = 0; r < nt; r++) memcpy(stage + 16 * r, y + r * ld, (size_t)nc * sizeof(float));
        tile_load(c, stage, 64);
    } else {
        tile_store(c, stage, 64);
        for (int r = 0; r < nt; r++) memcpy(y + r * ld, stage + 16 * r, (size_t)nc * sizeof(float));
    }
}

// dst[k * 16 + j] = src[j * ld + k] for j < 16, k < n (n a multiple of 16): 16 rows of words
// turned into n rows of 16, 16 x 16 blocks transposed in registers.
static void transpose_words16(uint32_t *dst, const uint32_t *src, size_t ld, int n) {
    for (int k0 = 0; k0 < n; k0 += 16) {
        __m512 r[16];
        for (int j = 0; j < 16; j++) r[j] = _mm512_castsi512_ps(_mm512_loadu_si512(src + j * ld + k0));
        transpose16(r);
        for (int k = 0; k < 16; k++) _mm512_storeu_si512(dst + (size_t)(k0 + k) * 16, _mm512_castps_si512(r[k]));
    }
}

typedef struct {
    float *out;            // (T, OUT)
    const float *bias;     // (OUT) or NULL
    const QMatrix *W;      // (OUT, IN)
    int T, KP;             // tokens; pairs of IN rounded up to AMX_PAIRS
    const uint32_t *x;     // [round_up(T, 32), KP] inp as bf16 pairs, token-major, zeros past T and IN
} AmxFwd;

// Rows [r0, r1) of the output (r0 a multiple of 32), every token: per block of 32 rows of W, its
// bf16 pairs as two B operands [KP, 16] (one per 16 rows), then every block of 32 tokens through
// the whole of IN with the four C tiles in registers.
static AMX_TARGET void amx_fwd_rows(void *ctx, int r0, int r1) {
    const AmxFwd *f = ctx;
    const QMatrix *W = f->W;
    int IN = W->cols, OUT = W->rows, KP = f->KP;
    float *tmp = scratch_local((size_t)IN * sizeof(float) + 16 * (size_t)KP * 4 * 3 + 256 * sizeof(float));
    uint32_t *rows16 = (uint32_t *)(tmp + IN), *B = rows16 + 16 * (size_t)KP;  // B: [2][KP][16]
    float *stage = (float *)(B + 32 * (size_t)KP);
    tile_config();
    for (int o0 = r0; o0 < r1; o0 += 32) {
        for (int g = 0; g < 2; g++) {
            for (int j = 0; j < 16; j++) {
                uint32_t *words = rows16 + (size_t)j * KP;
                int o = o0 + 16 * g + j;
                memset(words, 0, (size_t)KP * sizeof(uint32_t));
                if (o >= r1) continue;
                dequantize_span(W->type, tmp, qmatrix_row_data(W, o), 0, IN);
                to_bf16_pairs(words, tmp, IN);
            }
            transpose_words16(B + (size_t)g * KP * 16, rows16, (size_t)KP, KP);
        }
        int nrows = r1 - o0 < 32 ? r1 - o0 : 32;
        for (int t0 = 0; t0 < f->T; t0 += 32) {
            for (int c = 0; c < 4; c++) tile_zero(c);
            for (int k = 0; k < KP; k += AMX_PAIRS) {
                tile_load(4, f->x + (size_t)t0 * KP + k, (size_t)KP * 4);
                tile_load(5, f->x + (size_t)(t0 + 16) * KP + k, (size_t)KP * 4);
                tile_load(6, B + (size_t)k * 16, 64);
                tile_load(7, B + (size_t)KP * 16 + (size_t)k * 16, 64);
                tile_dp(0, 4, 6), tile_dp(1, 4, 7), tile_dp(2, 5, 6), tile_dp(3, 5, 7);
            }
            for (int tb = 0; tb < 2; tb++)
                for (int cb = 0; cb < 2; cb++) {
                    int nt = f->T - (t0 + 16 * tb), nc = nrows - 16 * cb;
                    if (nt <= 0 || nc <= 0) continue;
                    tile_c_io(tile_c(tb, cb), f->out + (size_t)(t0 + 16 * tb) * OUT + o0 + 16 * cb, (size_t)OUT,
                              nt < 16 ? nt : 16, nc < 16 ? nc : 16, stage, 0);
                }
        }
        if (f->bias)
            for (int t = 0; t < f->T; t++)
                for (int n = 0; n < nrows; n++) f->out[(size_t)t * OUT + o0 + n] += f->bias[o0 + n];
    }
    tile_release();
}

// The left operands of the AMX products: rows [t0, t1) of src[T, n] as rows of `words` bf16 pairs
// in dst[round_up(T, 32), words] (zeros past n, and for the rows past T).
typedef struct {
    uint32_t *dst;
    const float *src;
    int T, n, words;
} AmxRows;

static void amx_pack_rows(void *ctx, int t0, int t1) {
    const AmxRows *p = ctx;
    for (int t = t0; t < t1; t++) {
        uint32_t *row = p->dst + (size_t)t * p->words;
        memset(row, 0, (size_t)p->words * sizeof(uint32_t));
        if (t < p->T) to_bf16_pairs(row, p->src + (size_t)t * p->n, p->n);
    }
}

static void matmul_amx(float *out, const float *inp, const QMatrix *W, const float *bias, int T) {
    int TP = (int)round_up((size_t)T, 32), KP = (int)round_up((size_t)(W->cols + 1) / 2, AMX_PAIRS);
    uint32_t *x = scratch_shared((size_t)TP * KP * sizeof(uint32_t));
    AmxFwd f = {out, bias, W, T, KP, x};
    AmxRows p = {x, inp, T, W->cols, KP};
    parallel_for(amx_pack_rows, &p, TP, 16);
    parallel_for(amx_fwd_rows, &f, W->rows, 32);
}

typedef struct {
    float *dinp;           // (T, IN)
    const QMatrix *W;      // (OUT, IN)
    int T, QP;             // tokens; pairs of rows of W rounded up to AMX_PAIRS
    const uint32_t *d;     // [round_up(T, 32), QP] dout as bf16 pairs along OUT, zeros past T and OUT
} AmxBwd;

#define AMX_BWD_QC 512  // pairs of rows of W whose B operands are made at one time

// Columns [c0, c1) of dinp (c0 a multiple of 32 and of the block size), every token: per block of
// CB columns and AMX_BWD_QC pairs of rows, their words interleaved in pairs of rows as B operands
// [QC, 16] per 16 columns, then every block of 32 tokens x 32 columns, the C tiles loaded from dinp
// and stored back after the chunk's pairs.
static AMX_TARGET void amx_bwd_cols(void *ctx, int c0, int c1) {
    const AmxBwd *b = ctx;
    const QMatrix *W = b->W;
    int OUT = W->rows, IN = W->cols, bs = type_info(W->type)->block, CB = bs > 64 ? bs : 64;
    float *tmp = scratch_local(2 * (size_t)CB * sizeof(float) + (size_t)AMX_BWD_QC * CB * 4 + 256 * sizeof(float));
    float *wa = tmp, *wb = tmp + CB, *stage = wb + CB;
    uint32_t *B = (uint32_t *)(stage + 256);  // [CB / 16][QC][16]
    tile_config();
    for (int cb0 = c0; cb0 < c1; cb0 += CB) {
        int ncols = c1 - cb0 < CB ? c1 - cb0 : CB;
        for (int q0 = 0; q0 < b->QP; q0 += AMX_BWD_QC) {
            int nq = b->QP - q0 < AMX_BWD_QC ? b->QP - q0 : AMX_BWD_QC;
            for (int q = 0; q < nq; q++) {
                int oa = 2 * (q0 + q);
                if (oa < OUT) dequantize_span(W->type, wa, qmatrix_row_data(W, oa), cb0, ncols);
                else memset(wa, 0, (size_t)ncols * sizeof(float));
                if (oa + 1 < OUT) dequantize_span(W->type, wb, qmatrix_row_data(W, oa + 1), cb0, ncols);
                else memset(wb, 0, (size_t)ncols * sizeof(float));
                for (int g = 0; g < ncols / 16; g++)
                    to_bf16_interleaved(B + ((size_t)g * AMX_BWD_QC + q) * 16, wa + 16 * g, wb + 16 * g, 16);
            }
            for (int t0 = 0; t0 < b->T; t0 += 32) {
                for (int g = 0; g < ncols / 16; g += 2) {  // ncols: a multiple of 32
                    for (int tb = 0; tb < 2; tb++)
                        for (int cb = 0; cb < 2; cb++) {
                            int nt = b->T - (t0 + 16 * tb);
                            if (nt <= 0) tile_zero(tile_c(tb, cb));
                            else tile_c_io(tile_c(tb, cb), b->dinp + (size_t)(t0 + 16 * tb) * IN + cb0 + 16 * (g + cb),
                                           (size_t)IN, nt < 16 ? nt : 16, 16, stage, 1);
                        }
                    for (int k = 0; k < nq; k += AMX_PAIRS) {
                        tile_load(4, b->d + (size_t)t0 * b->QP + q0 + k, (size_t)b->QP * 4);
                        tile_load(5, b->d + (size_t)(t0 + 16) * b->QP + q0 + k, (size_t)b->QP * 4);
                        tile_load(6, B + ((size_t)g * AMX_BWD_QC + k) * 16, 64);
                        tile_load(7, B + ((size_t)(g + 1) * AMX_BWD_QC + k) * 16, 64);
                        tile_dp(0, 4, 6), tile_dp(1, 4, 7), tile_dp(2, 5, 6), tile_dp(3, 5, 7);
                    }
                    for (int tb = 0; tb < 2; tb++)
                        for (int cb = 0; cb < 2; cb++) {
                            int nt = b->T - (t0 + 16 * tb);
                            if (nt > 0)
                                tile_c_io(tile_c(tb, cb), b->dinp + (size_t)(t0 + 16 * tb) * IN + cb0 + 16 * (g + cb),
                                          (size_t)IN, nt < 16 ? nt : 16, 16, stage, 0);
                        }
                }
            }
        }
    }
    tile_release();
}

static void matmul_backward_amx(float *dinp, const float *dout, const QMatrix *W, int T) {
    int TP = (int)round_up((size_t)T, 32), QP = (int)round_up((size_t)(W->rows + 1) / 2, AMX_PAIRS);
    int bs = type_info(W->type)->block;
    uint32_t *d = scratch_shared((size_t)TP * QP * sizeof(uint32_t));
    AmxBwd b = {dinp, W, T, QP, d};
    AmxRows p = {d, dout, T, W->rows, QP};
    parallel_for(amx_pack_rows, &p, TP, 16);
    parallel_for(amx_bwd_cols, &b, W->cols, bs > 64 ? bs : 64);
}
#endif  // HAVE_AMX

#if HAVE_AMX
// Whether the AMX route runs, decided once per process (Linux grants the tile state to a whole
// process): the one mutable state of quant.c, written once under pthread_once.
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static int amx_state;                  // 1: AMX runs
static const char *amx_why = "";       // why it does or does not, for kernel_path

static void amx_decide(void) {
    const char *no = getenv("SFT_NO_AMX");
    if (no && *no && strcmp(no, "0") != 0) {
        amx_why = "AMX off: SFT_NO_AMX is set";
        return;
    }
#if defined(SFT_AMX_EMULATE)
    amx_state = 1, amx_why = "AMX tiles emulated in C (SFT_AMX_EMULATE build)";
#else
    unsigned a, b, c, d;
    uint32_t xcr0, xcr0_hi;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) {
        amx_why = "no AMX on this CPU";  // cpuid.7.0: EDX bit 24 AMX-TILE, bit 22 AMX-BF16
        return;
    }
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) {
        amx_why = "AMX refused by the kernel (arch_prctl)";
        return;
    }
    __asm__ volatile("xgetbv" : "=a"(xcr0), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0 & (3u << 17)) != (3u << 17)) {  // XTILECFG, XTILEDATA enabled by the OS
        amx_why = "AMX not enabled by the kernel (XCR0)";
        return;
    }
    amx_state = 1, amx_why = "AMX tiles, tdpbf16ps";
#endif
}

static int amx_on(void) {
    pthread_once(&amx_once, amx_decide);
    return amx_state;
}
#endif

// --- Few tokens: fp32 rows ---------------------------------------------------------------------

// sum of a[i] * b[i], in a fixed order for a given n.
static float dot_f32(const float *a, const float *b, int n) {
    int i = 0;
#if defined(__AVX512F__)
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
#elif HAVE_AVX2
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
#elif HAVE_NEON
    float32x4_t s0 = vdupq_n_f32(0), s1 = s0, s2 = s0, s3 = s0;
    for (; i + 16 <= n; i += 16) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        s2 = vfmaq_f32(s2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        s3 = vfmaq_f32(s3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    float r = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < n; i++) r += a[i] * b[i];
    return r;
#else
    float s[8] = {0};
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
    for (; i < n; i++) s[0] += a[i] * b[i];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
#endif
}

// y[n] += a * x[n]
static void axpy_f32(float *y, float a, const float *x, int n) {
    int i = 0;
#if defined(__AVX512F__)
    __m512 va = _mm512_set1_ps(a);
    for (; i < n; i += 16) {
        __mmask16 m = (__mmask16)(n - i >= 16 ? 0xffff : (1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
    }
#elif HAVE_AVX2
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    if (i < n) {  // masked, so that every element is rounded the same way (maskstore is slow on AMD: not in the loop)
        __m256i m = tail_mask8(n - i);
        _mm256_maskstore_ps(y + i, m, _mm256_fmadd_ps(va, _mm256_maskload_ps(x + i, m), _mm256_maskload_ps(y + i, m)));
    }
#elif HAVE_NEON
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
#else
    for (; i < n; i++) y[i] += a * x[i];
#endif
}

struct X16;
typedef struct {
    float *out;          // (T, OUT) forward, or dinp (T, IN) backward
    const float *inp;    // (T, IN) forward, or dout (T, OUT) backward
    const QMatrix *W;    // (OUT, IN)
    const float *bias;   // (OUT) or NULL
    int T;
    const struct X16 *x16;  // [T] inp in 16-bit integers (forward, where W's type has a kernel), or NULL
} Rows;

#if defined(__AVX512F__) && defined(__AVX512BW__)
// *s = row . x[n] for the formats that generation reads most, dequantizing in registers (the
// values are those of dequantize_row); returns 0 for other formats.
static int row_dot_avx512(float *s, int type, const uint8_t *row, const float *x, int n) {
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
#endif

#if HAVE_AVX2
// acc[k] += w[k] * x[8k ... 8k + 7] for k < 4.
static inline void fma4(__m256 acc[4], const __m256 w[4], const float *x) {
UNROLL
    for (int k = 0; k < 4; k++) acc[k] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(x + 8 * k), acc[k]);
}

// *s = row . x[n], dequantizing in registers (the values of dequantize_row) as row_dot_avx512
// does; returns 0 for the formats without a decoder in registers (F32, F16, BF16).
static int row_dot_avx2(float *s, int type, const uint8_t *row, const float *x, int n) {
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
#endif

#if HAVE_NEON
// *s = row . x[n] for Q4_0 and Q8_0, dequantizing in registers; returns 0 for other formats.
static int row_dot_neon(float *s, int type, const uint8_t *row, const float *x, int n) {
    float32x4_t acc[4] = {vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)}, w[8];
    if (type != TYPE_Q4_0 && type != TYPE_Q8_0) return 0;
    for (int i = 0; i < n / QK; i++, x += QK) {
        if (type == TYPE_Q4_0) q4_0_f32x4(w, (const BlockQ4_0 *)row + i);
        else q8_0_f32x4(w, (const BlockQ8_0 *)row + i);
UNROLL
        for (int k = 0; k < 8; k++) acc[k % 4] = vfmaq_f32(acc[k % 4], w[k], vld1q_f32(x + 4 * k));
    }
    *s = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
    return 1;
}
#endif

// *s = row . x[n] with the row dequantized in registers, where the SIMD route has a decoder for
// its format; returns 0 (and leaves *s) otherwise.
static int row_dot(float *s, int type, const uint8_t *row, const float *x, int n) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    return row_dot_avx512(s, type, row, x, n);
#elif HAVE_AVX2
    return row_dot_avx2(s, type, row, x, n);
#elif HAVE_NEON
    return row_dot_neon(s, type, row, x, n);
#else
    (void)s, (void)type, (void)row, (void)x, (void)n;
    return 0;
#endif
}

#if HAVE_INT16_DOT
// --- Few tokens, 16-bit integer activations (AVX512-VNNI) --------------------------------------
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

typedef struct X16 {
    int16_t *q;     // [IN] xq, in the order the type's kernel reads (see x16_layout)
    float *d;       // [IN / 32] dx of each block of 32 values
    float *s32;     // [IN / 32] dx * the sum of the block's xq
    float *s16;     // [IN / 16] dx * the sum of each 16 xq (Q6_K's groups)
} X16;

// Q4_0's byte j holds values j and j + 16 of its block: its kernel reads xq per pair of blocks
// A, B as |A 0-15|B 0-15|A 16-31|B 16-31|, the order of its nibbles. The other types read xq in
// natural order. Returns -1 for the types without a 16-bit kernel (and for odd block counts).
static int x16_layout(int type, int IN) {
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

// The fp16 scales of n <= 16 Q4_0 blocks (18 bytes each, the scale first), as floats (0 past n):
// for 16 blocks, the 16-bit words at byte 18 k picked out of two pairs of 128-byte loads (a gather
// is slower on Zen 4 than the whole row product).
static inline __m512 q4_0_scales16(const BlockQ4_0 *w, int n) {
    if (n < 16) {
        uint16_t h[16] = {0};
        for (int i = 0; i < n; i++) h[i] = w[i].d;
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
    }
    const uint8_t *p = (const uint8_t *)w;  // blocks 0-7 at bytes 0..126, 8-15 at 144..270
    const __m512i idx = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                         63, 54, 45, 36, 27, 18, 9, 0);
    __m512i lo = _mm512_permutex2var_epi16(_mm512_loadu_si512(p), idx, _mm512_loadu_si512(p + 64));
    __m512i hi = _mm512_permutex2var_epi16(_mm512_loadu_si512(p + 144), idx, _mm512_loadu_si512(p + 208));
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm512_castsi512_si256(lo), _mm512_castsi512_si128(hi), 1));
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
        __m512 dw = q4_0_scales16(w + g, n);
        __m512 s = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(m, x->d + g));
        off = _mm512_fmadd_ps(dw, _mm512_maskz_loadu_ps(m, x->s32 + g), off);
        const int16_t *xq = x->q + 32 * g;
        for (; i + 4 <= n; i += 4) {
            acc0 = _mm512_fmadd_ps(q4_0_pair_sums(w + g + i, xq + 32 * i), _mm512_permutexvar_ps(lane_index(i, i + 1), s), acc0);
            acc1 = _mm512_fmadd_ps(q4_0_pair_sums(w + g + i + 2, xq + 32 * i + 64),
                                   _mm512_permutexvar_ps(lane_index(i + 2, i + 3), s), acc1);
        }
        if (i < n) acc0 = _mm512_fmadd_ps(q4_0_pair_sums(w + g + i, xq + 32 * i), _mm512_permutexvar_ps(lane_index(i, i + 1), s), acc0);
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
static float row_dot16(int type, const uint8_t *row, const X16 *x, int n) {
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
#endif

static void rows_forward(void *ctx, int r0, int r1) {
    const Rows *r = ctx;
    int OUT = r->W->rows, IN = r->W->cols;
    float *w = scratch_local((size_t)IN * sizeof(float));
    for (int o = r0; o < r1; o++) {
        float s;
#if HAVE_INT16_DOT
        if (r->x16) {
            for (int t = 0; t < r->T; t++) {
                s = row_dot16(r->W->type, qmatrix_row_data(r->W, o), &r->x16[t], IN);
                r->out[(size_t)t * OUT + o] = r->bias ? s + r->bias[o] : s;
            }
            continue;
        }
#endif
        if (r->T == 1 && row_dot(&s, r->W->type, qmatrix_row_data(r->W, o), r->inp, IN)) {
            r->out[o] = r->bias ? s + r->bias[o] : s;
            continue;
        }
        dequantize_span(r->W->type, w, qmatrix_row_data(r->W, o), 0, IN);
        for (int t = 0; t < r->T; t++) {
            float s = dot_f32(w, r->inp + (size_t)t * IN, IN);
            r->out[(size_t)t * OUT + o] = r->bias ? s + r->bias[o] : s;
        }
    }
}

static void rows_backward(void *ctx, int c0, int c1) {
    const Rows *r = ctx;
    int OUT = r->W->rows, IN = r->W->cols;
    float *w = scratch_local((size_t)(c1 - c0) * sizeof(float));
    for (int o = 0; o < OUT; o++) {
        dequantize_span(r->W->type, w, qmatrix_row_data(r->W, o), c0, c1 - c0);
        for (int t = 0; t < r->T; t++) axpy_f32(r->out + (size_t)t * IN + c0, r->inp[(size_t)t * OUT + o], w, c1 - c0);
    }
}
#endif  // !SFT_REF

Kernels kernels(void) {
#if defined(SFT_REF)
    Kernels k = {0, 0, 0};
#elif HAVE_AMX
    Kernels k = {HAVE_BF16_DOT, HAVE_INT16_DOT, amx_on()};
#else
    Kernels k = {HAVE_BF16_DOT, HAVE_INT16_DOT, 0};
#endif
    return k;
}

const char *kernel_path(void) {
#if defined(SFT_REF)
    return "reference (the scalar definitions, -DSFT_REF)";
#elif HAVE_BF16_DOT
    static char text[200];  // the same text on every call
    const char *fwd = HAVE_INT16_DOT ? "exact weights x int16 activations (vpdpwssd)" : "bf16 (vdpbf16ps)";
#if HAVE_AMX
    const char *bwd = amx_on() ? amx_why : "vdpbf16ps", *note = amx_on() ? "" : amx_why;
#else
    const char *bwd = "vdpbf16ps", *note = "no AMX in this build";
#endif
    snprintf(text, sizeof text, "avx512: forward %s, backward bf16 (%s)%s%s", fwd, bwd, *note ? "; " : "", note);
    return text;
#elif defined(__AVX512F__)
    return "avx512 (fp32 tiles)";
#elif HAVE_AVX2
    return "avx2-fma (fp32 tiles)";
#elif HAVE_NEON
    return "neon (fp32 tiles)";
#else
    return "portable C (fp32 tiles)";
#endif
}

Route matmul_route(const QMatrix *W, int T, int backward) {
#if defined(SFT_REF)
    (void)W, (void)T, (void)backward;
    return ROUTE_FP32;
#else
    int bf16 = tile_pairs(W->type);  // quantized weights on a CPU with AVX512-BF16
#if HAVE_AMX
    int amx = bf16 && amx_on();
#else
    int amx = 0;
#endif
    if (backward) return T < BWD_TILE_MIN_T || !bf16 ? ROUTE_FP32 : amx ? ROUTE_AMX : ROUTE_BF16;
#if HAVE_INT16_DOT
    if (T < FWD_TILE_MIN_T) return x16_layout(W->type, W->cols) >= 0 ? ROUTE_INT16_ROWS : ROUTE_FP32;
    if (W->cols % 32 == 0 && has_unpack16(W->type)) return ROUTE_INT16_TILES;
#endif
    if (T < FWD_TILE_MIN_T || !bf16) return ROUTE_FP32;
    return amx ? ROUTE_AMX : ROUTE_BF16;
#endif
}

// The one dispatch point of the forward product: matmul_route's choice, then the kernel.
void matmul(float *out, const float *inp, const QMatrix *W, const float *bias, int T) {
#if defined(SFT_REF)
    matmul_ref(out, inp, W, bias, T);
#else
    if (T <= 0 || W->rows <= 0 || W->cols <= 0) {
        matmul_ref(out, inp, W, bias, T);
        return;
    }
    Route route = matmul_route(W, T, 0);
    if (T < FWD_TILE_MIN_T) {  // generation: a row at a time
        Rows r = {out, inp, W, bias, T, NULL};
#if HAVE_INT16_DOT
        X16 x16[FWD_TILE_MIN_T];
        if (route == ROUTE_INT16_ROWS) x16_prepare(x16, inp, W, T), r.x16 = x16;
#endif
        parallel_for(rows_forward, &r, W->rows, 4);
        return;
    }
#if HAVE_INT16_DOT
    if (route == ROUTE_INT16_TILES) {
        matmul_int16(out, inp, W, bias, T);
        return;
    }
#endif
#if HAVE_AMX
    if (route == ROUTE_AMX) {
        matmul_amx(out, inp, W, bias, T);
        return;
    }
#endif
    matmul_tiles(out, inp, W, bias, T);  // ROUTE_BF16 or ROUTE_FP32: tile_pairs decides
#endif
}

void matmul_backward_input(float *dinp, const float *dout, const QMatrix *W, int T) {
#if defined(SFT_REF)
    matmul_backward_input_ref(dinp, dout, W, T);
#else
    if (T <= 0 || W->rows <= 0 || W->cols <= 0) return;
    Route route = matmul_route(W, T, 1);
    if (T < BWD_TILE_MIN_T) {
        int bs = type_info(W->type)->block;
        Rows r = {dinp, dout, W, NULL, T, NULL};
        parallel_for(rows_backward, &r, W->cols, bs > 64 ? bs : 64);
        return;
    }
#if HAVE_AMX
    if (route == ROUTE_AMX) {
        matmul_backward_amx(dinp, dout, W, T);
        return;
    }
#endif
    (void)route;
    matmul_backward_tiles(dinp, dout, W, T);
#endif
}
