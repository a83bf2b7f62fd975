// kernels/neon.c: the fast products' pieces in NEON (arm64: Apple Silicon, Graviton): Q4_0 and Q8_0
// dequantized in registers (the other formats through quant.c's dequantize_row), fp32 tiles of
// 16 x 6 in 24 of the 32 q registers, and the fp32 rows of generation. All ROUTE_FP32
// (test/test_quant.c, run under qemu-aarch64 by .ci/run). dispatch.c picks these on arm64.
#include <math.h>

#include "kernels.h"

#if HAVE_NEON

// --- Dequantization in registers ---------------------------------------------------------------

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
int dequantize_span_neon(Type type, float *out, const uint8_t *row, int i0, int n) {
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

// --- The tiles ---------------------------------------------------------------------------------

// The tile for one vector of 16 tokens (number tv) in four registers of 4: 4 x FWD_N
// accumulators take 24 of the 32 registers. fwd_tile_neon calls it for each of M vectors.
static void fwd_micro_neon(const Fwd *f, const FwdTile *tl, int tv) {
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

// One forward tile of M vectors of 16 tokens, a vector at a time.
void fwd_tile_neon(const Fwd *f, const FwdTile *tl, int M) {
    for (int m = 0; m < M; m++) fwd_micro_neon(f, tl, tl->tv0 + m);
}

// Tokens past the last one of a backward tile read these zeros, so that its loop has no branch.
static const uint32_t BWD_ZEROS[BWD_OC];

// The tile for the 16 columns c0 + 16m ... (four registers of 4) x BWD_N tokens: 4 x BWD_N
// accumulators take 24 of the 32 registers. bwd_tile_neon calls it for each of M vectors.
static void bwd_micro_neon(const Bwd *b, const BwdTile *tl, int m) {
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

// One backward tile of M vectors of 16 columns, a vector at a time.
void bwd_tile_neon(const Bwd *b, const BwdTile *tl, int M) {
    for (int m = 0; m < M; m++) bwd_micro_neon(b, tl, m);
}

// --- Few tokens: fp32 rows -----------------------------------------------------------------------

// dot_f32 (kernels.h): four sums of 4 lanes, the tail in plain C.
float dot_f32_neon(const float *a, const float *b, int n) {
    int i = 0;
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
}

// axpy_f32 (kernels.h): 4 lanes, the tail through fmaf (the same rounding as the lanes).
void axpy_f32_neon(float *y, float a, const float *x, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

// *s = row . x[n] for Q4_0 and Q8_0, dequantizing in registers; returns 0 for other formats.
int row_dot_neon(float *s, Type type, const uint8_t *row, const float *x, int n) {
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

#endif  // HAVE_NEON
