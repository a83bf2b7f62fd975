// test_quant.c: block formats, half conversions, the matrix products and the thread pool.
//
// Expectations come from outside our code: blocks whose bytes are written by hand from each
// format's definition (ggml-common.h / ggml-quants.c, bitsandbytes for NF4) with the values they
// must decode to; quantized blocks computed by hand following ggml's quantize_row_*_ref; float64
// products of the dequantized matrix; and error bounds derived from the formats.
//
// Tolerances of the products:
// - matmul_ref vs a float64 product of the dequantized matrix: |err| <= 1e-5 * sum_j |w_j x_j|
//   (fp32 sums of at most ~1000 terms: n * 2^-24 ~ 6e-5 worst case, ~1e-6 typical).
// - fast vs ref, F32/F16/BF16 weights: both are fp32 sums of exact fp32 products, in different
//   orders: |err| <= 2e-5 * sum_j |w_j x_j|.
// - fast vs ref, quantized weights: the fast products may round both factors to bf16 (8
//   significant bits: relative error <= 2^-8 each, so <= 2^-7 + 2^-16 per product; the bf16
//   route of kernels/), then sum in fp32 (<= n * 2^-24 < 2^-13 relative for our n):
//   |err| <= (2^-7 + 2^-12) * sum_j |w_j x_j|, the rounding of each factor bounded, not a fitted
//   number. (An int8 route for the activations, as llama.cpp's, would need amax_block(x) / 254 *
//   sum_j |w_j| more, and would break test_model.c's token-by-token logits, which expect fp32
//   products for T < 8.)
//   A wrong block, scale or offset is off by far more than this (QUANT_VERBOSE=1 prints the
//   worst error / bound of each check; the largest is ~0.9, on one-term sums).
// The thread pool: parallel_for covers [0, n) once, with aligned chunks, for 0 to 3 threads, and
// the products give the same bits for 1 and 2 threads.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../common.h"
#include "../quant.h"
#include "../threads.h"
#include "test.h"

// ---------------------------------------------------------------------------------------------
// Half conversions: hand-picked values around every rounding edge.

static void test_halves(void) {
    struct { float f; uint16_t h; } f16[] = {
        {1.0f, 0x3c00}, {-2.0f, 0xc000}, {65504.0f, 0x7bff}, {65519.0f, 0x7bff}, {65520.0f, 0x7c00},
        {1.0f / 3.0f, 0x3555}, {0x1p-24f, 0x0001}, {0x1p-25f, 0x0000}, {0x1.8p-25f, 0x0001},
        {0x1.8p-24f, 0x0002}, {0x1p-14f, 0x0400}, {1.0f + 0x1p-11f, 0x3c00}, {1.0f + 0x1.8p-10f, 0x3c02},
        {-0.0f, 0x8000}, {0x1.ffcp-15f, 0x0400}, {0x1p-15f, 0x0200}, {1e10f, 0x7c00}, {-1e-10f, 0x8000},
    };
    int bad = 0;
    for (size_t i = 0; i < sizeof f16 / sizeof f16[0]; i++) {
        uint16_t h = fp32_to_fp16(f16[i].f);
        if (h != f16[i].h) {
            if (bad++ < 5) printf("    fp32_to_fp16(%a) = 0x%04x, want 0x%04x\n", f16[i].f, h, f16[i].h);
        }
    }
    check(bad == 0, "fp32_to_fp16 rounds to nearest even", "%d wrong", bad);
    check(fp32_to_fp16(NAN) == 0x7e00 && fp32_to_fp16(INFINITY) == 0x7c00, "fp32_to_fp16 nan inf", "0x%04x", fp32_to_fp16(NAN));

    struct { uint16_t h; float f; } h16[] = {
        {0x3c00, 1.0f}, {0xc000, -2.0f}, {0x7bff, 65504.0f}, {0x0001, 0x1p-24f}, {0x03ff, 0x1.ff8p-15f},
        {0x0400, 0x1p-14f}, {0x3555, 0.333251953125f}, {0x8000, -0.0f}, {0x7c00, INFINITY}, {0xfc00, -INFINITY},
    };
    bad = 0;
    for (size_t i = 0; i < sizeof h16 / sizeof h16[0]; i++) {
        float f = fp16_to_fp32(h16[i].h);
        if (memcmp(&f, &h16[i].f, 4) != 0 && bad++ < 5) printf("    fp16_to_fp32(0x%04x) = %a\n", h16[i].h, f);
    }
    check(bad == 0 && isnan(fp16_to_fp32(0x7e00)), "fp16_to_fp32", "%d wrong", bad);
    // Every half survives the round trip (NaNs excepted).
    bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue;
        if (fp32_to_fp16(fp16_to_fp32((uint16_t)h)) != h) bad++;
    }
    check(bad == 0, "fp16 round trip of all 63488 halves", "%d wrong", bad);

    struct { float f; uint16_t h; } b16[] = {
        {1.0f, 0x3f80}, {-2.5f, 0xc020}, {1.0f + 0x1p-8f, 0x3f80}, {1.0f + 0x1.8p-7f, 0x3f82},
        {1.0f + 0x1.2p-8f, 0x3f81}, {3.14159265f, 0x4049}, {-0.0f, 0x8000}, {3.4e38f, 0x7f80},
    };
    bad = 0;
    for (size_t i = 0; i < sizeof b16 / sizeof b16[0]; i++) {
        uint16_t h = fp32_to_bf16(b16[i].f);
        if (h != b16[i].h && bad++ < 5) printf("    fp32_to_bf16(%a) = 0x%04x, want 0x%04x\n", b16[i].f, h, b16[i].h);
    }
    check(bad == 0, "fp32_to_bf16 rounds to nearest even", "%d wrong", bad);
    check(bf16_to_fp32(0x4049) == 3.140625f && bf16_to_fp32(0xc020) == -2.5f, "bf16_to_fp32", "%g", bf16_to_fp32(0x4049));
    check((fp32_to_bf16(NAN) & 0x7fc0) == 0x7fc0, "fp32_to_bf16 keeps NaN a NaN", "0x%04x", fp32_to_bf16(NAN));
}

// ---------------------------------------------------------------------------------------------
// Types.

static void test_types(void) {
    struct { int type; const char *name; int block; size_t bytes; } t[] = {
        {TYPE_F32, "f32", 1, 4}, {TYPE_F16, "f16", 1, 2}, {TYPE_BF16, "bf16", 1, 2},
        {TYPE_Q4_0, "q4_0", 32, 18}, {TYPE_Q4_1, "q4_1", 32, 20}, {TYPE_Q5_0, "q5_0", 32, 22},
        {TYPE_Q5_1, "q5_1", 32, 24}, {TYPE_Q8_0, "q8_0", 32, 34}, {TYPE_Q4_K, "q4_k", 256, 144},
        {TYPE_Q5_K, "q5_k", 256, 176}, {TYPE_Q6_K, "q6_k", 256, 210}, {TYPE_NF4, "nf4", 64, 36},
    };
    int bad = 0;
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        const TypeInfo *ti = type_info(t[i].type);
        if (!ti || strcmp(ti->name, t[i].name) || ti->block != t[i].block || ti->bytes != t[i].bytes ||
            type_from_name(t[i].name) != t[i].type) {
            bad++;
            printf("    type %d (%s) wrong\n", t[i].type, t[i].name);
        }
    }
    check(bad == 0, "type_info, type_from_name", "%d wrong", bad);
    check(type_info(4) == NULL && type_info(99) == NULL && type_from_name("q3_k") == -1 &&
          type_from_name("Q4_0") == TYPE_Q4_0, "unknown types", "accepted");
    check(row_bytes(TYPE_Q4_0, 896) == 504 && row_bytes(TYPE_Q6_K, 4864) == 19 * 210 &&
          row_bytes(TYPE_F16, 7) == 14 && row_bytes(TYPE_NF4, 896) == 14 * 36, "row_bytes", "%zu", row_bytes(TYPE_Q4_0, 896));
    check(row_bytes(TYPE_Q4_0, 33) == 0 && row_bytes(TYPE_Q4_K, 896) == 0 && row_bytes(TYPE_F32, -4) == 0 &&
          row_bytes(TYPE_F32, INT64_MAX) == 0 && row_bytes(77, 32) == 0, "row_bytes rejects", "accepted");
}

// ---------------------------------------------------------------------------------------------
// Hand-written blocks. Each test lists the bytes of one block and the values it must decode to;
// `want` starts as `fill` and the listed (index, value) pairs override it.

typedef struct { int i; float v; } Val;

static void check_block(const char *name, int type, const uint8_t *bytes, int n, float fill,
                        const Val *vals, int nvals) {
    float want[256], got[256];
    for (int i = 0; i < n; i++) want[i] = fill;
    for (int k = 0; k < nvals; k++) want[vals[k].i] = vals[k].v;
    for (int i = 0; i < n; i++) got[i] = NAN;
    dequantize_row(type, got, bytes, n);
    check_close(name, got, want, (size_t)n, 0, 0);
}

static void test_blocks_simple(void) {
    // F32: 1.5, -2.0 (little-endian IEEE).
    const uint8_t f32[] = {0x00, 0x00, 0xc0, 0x3f, 0x00, 0x00, 0x00, 0xc0};
    check_block("dequantize f32", TYPE_F32, f32, 2, 0, (Val[]){{0, 1.5f}, {1, -2.0f}}, 2);
    // F16: 1.0, -2.0, 2^-24, 65504.
    const uint8_t f16[] = {0x00, 0x3c, 0x00, 0xc0, 0x01, 0x00, 0xff, 0x7b};
    check_block("dequantize f16", TYPE_F16, f16, 4, 0, (Val[]){{0, 1}, {1, -2}, {2, 0x1p-24f}, {3, 65504}}, 4);
    // BF16: 1.0, -2.5, 3.140625.
    const uint8_t bf16[] = {0x80, 0x3f, 0x20, 0xc0, 0x49, 0x40};
    check_block("dequantize bf16", TYPE_BF16, bf16, 3, 0, (Val[]){{0, 1}, {1, -2.5f}, {2, 3.140625f}}, 3);

    // Q4_0: d = 0.5; qs[0] = 0x0f: x0 = (15-8)/2, x16 = (0-8)/2; qs[1] = 0x8a: x1 = 1, x17 = 0;
    // other bytes 0x88: zeros.
    uint8_t q4_0[18] = {0x00, 0x38, 0x0f, 0x8a};
    memset(q4_0 + 4, 0x88, 14);
    check_block("dequantize q4_0", TYPE_Q4_0, q4_0, 32, 0, (Val[]){{0, 3.5f}, {16, -4}, {1, 1}, {17, 0}}, 4);

    // Q4_1: d = 1, m = -1; qs[0] = 0x21: x0 = 0, x16 = 1; qs[15] = 0xf0: x15 = -1, x31 = 14;
    // other bytes 0x00: -1.
    uint8_t q4_1[20] = {0x00, 0x3c, 0x00, 0xbc, 0x21};
    q4_1[4 + 15] = 0xf0;
    check_block("dequantize q4_1", TYPE_Q4_1, q4_1, 32, -1, (Val[]){{0, 0}, {16, 1}, {15, -1}, {31, 14}}, 4);

    // Q5_0: d = 2; qh = bits 0, 16, 31; qs[0] = 0x3f: x0 = (0x1f-16)*2 = 30, x16 = (0x13-16)*2 = 6;
    // element 31 has its high bit and a zero nibble: (16-16)*2 = 0; the rest (0-16)*2 = -32.
    uint8_t q5_0[22] = {0x00, 0x40, 0x01, 0x00, 0x01, 0x80, 0x3f};
    check_block("dequantize q5_0", TYPE_Q5_0, q5_0, 32, -32, (Val[]){{0, 30}, {16, 6}, {31, 0}}, 3);

    // Q5_1: d = 0.5, m = 1; qh = bit 31; qs[0] = 0x01: x0 = 1.5, x16 = 1;
    // qs[15] = 0xf0: x15 = 1, x31 = (0x1f)*0.5 + 1 = 16.5; the rest 1.
    uint8_t q5_1[24] = {0x00, 0x38, 0x00, 0x3c, 0x00, 0x00, 0x00, 0x80, 0x01};
    q5_1[8 + 15] = 0xf0;
    check_block("dequantize q5_1", TYPE_Q5_1, q5_1, 32, 1, (Val[]){{0, 1.5f}, {16, 1}, {15, 1}, {31, 16.5f}}, 4);

    // Q8_0: d = 0.25; qs = 127, -128, -1, zeros.
    uint8_t q8_0[34] = {0x00, 0x34, 0x7f, 0x80, 0xff};
    check_block("dequantize q8_0", TYPE_Q8_0, q8_0, 32, 0, (Val[]){{0, 31.75f}, {1, -32}, {2, -0.25f}}, 3);

    // NF4: absmax = 2.0 (f32); qs[0] = 0x0f: x0 = -1*2, x1 = 1*2; qs[1] = 0x78: x2 = 0, x3 = 0.0795...*2.
    uint8_t nf4[36] = {0x00, 0x00, 0x00, 0x40, 0x0f, 0x78};
    memset(nf4 + 6, 0x77, 30);
    check_block("dequantize nf4", TYPE_NF4, nf4, 64, 0, (Val[]){{0, -2}, {1, 2}, {2, 0}, {3, 0.07958029955625534f * 2}}, 4);
}

static void test_blocks_k(void) {
    // Q4_K: d = 1, dmin = 0.5. scales[0] = 0x41: group 0 scale 1 (and top bits 01 -> group 4 scale
    // += 16); scales[4] = 0x82: group 0 min 2 (top bits 10 -> group 4 min += 32); scales[8] = 0x53:
    // group 4 scale 3 | 16 = 19, min 5 | 32 = 37. Other groups: scale 0, min 0 -> zeros.
    // qs[0] = 0xf7: x0 = 1*7 - 0.5*2 = 6 (x32, group 1, is 0 whatever its nibble);
    // other group-0 values -1. qs[64] = 0x0a (chunk 2, low nibble = group 4): x128 = 19*10 - 18.5.
    uint8_t q4k[144] = {0x00, 0x3c, 0x00, 0x38, 0x41, 0, 0, 0, 0x82, 0, 0, 0, 0x53};
    q4k[16 + 0] = 0xf7;
    q4k[16 + 64] = 0x0a;
    Val v4[64 + 32];
    int nv = 0;
    for (int i = 0; i < 32; i++) v4[nv++] = (Val){i, i == 0 ? 6.0f : -1.0f};
    for (int i = 128; i < 160; i++) v4[nv++] = (Val){i, i == 128 ? 171.5f : -18.5f};
    check_block("dequantize q4_K", TYPE_Q4_K, q4k, 256, 0, v4, nv);

    // Q5_K: the same header and nibbles, plus qh[0] = 0x11 (fifth bit of element 0 of groups 0
    // and 4) and qh[1] = 0x01 (element 1 of group 0): x0 = 23 - 1, x1 = 16 - 1, x128 = 19*26 - 18.5.
    uint8_t q5k[176] = {0x00, 0x3c, 0x00, 0x38, 0x41, 0, 0, 0, 0x82, 0, 0, 0, 0x53};
    q5k[16] = 0x11;
    q5k[17] = 0x01;
    q5k[48 + 0] = 0xf7;
    q5k[48 + 64] = 0x0a;
    nv = 0;
    for (int i = 0; i < 32; i++) v4[nv++] = (Val){i, i == 0 ? 22.0f : i == 1 ? 15.0f : -1.0f};
    for (int i = 128; i < 160; i++) v4[nv++] = (Val){i, i == 128 ? 475.5f : -18.5f};
    check_block("dequantize q5_K", TYPE_Q5_K, q5k, 256, 0, v4, nv);

    // Q6_K: d = 0.5, scales {2,1,-1,1,1,1,1,1, 3,1,...}. All ql = 0 and qh = 0xaa (every 2-bit
    // field 2: q = 32 - 32 = 0) except: ql[0] = 0x35, qh[0] = 0xe4 (fields 0,1,2,3):
    //   x0  = 0.5*2*((5 | 0<<4) - 32) = -27      x32 = 0.5*-1*((0 | 1<<4) - 32) = 8
    //   x64 = 0.5*1*((3 | 2<<4) - 32) = 1.5      x96 = 0.5*1*((0 | 3<<4) - 32) = 8
    // ql[17] = 0x01: x17 = 0.5*1*1 = 0.5; second half: ql[64] = 0x0f, qh[32] = 0xab:
    //   x128 = 0.5*3*((15 | 3<<4) - 32) = 46.5.
    uint8_t q6k[210] = {0};
    memset(q6k + 128, 0xaa, 64);
    q6k[0] = 0x35;
    q6k[128] = 0xe4;
    q6k[17] = 0x01;
    q6k[64] = 0x0f;
    q6k[128 + 32] = 0xab;
    const int8_t sc[16] = {2, 1, -1, 1, 1, 1, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1};
    memcpy(q6k + 192, sc, 16);
    q6k[208] = 0x00;
    q6k[209] = 0x38;
    check_block("dequantize q6_K", TYPE_Q6_K, q6k, 256, 0,
                (Val[]){{0, -27}, {32, 8}, {64, 1.5f}, {96, 8}, {17, 0.5f}, {128, 46.5f}}, 6);
}

// ---------------------------------------------------------------------------------------------
// Quantization: blocks computed by hand with ggml's quantize_row_*_ref rules.

static void check_bytes(const char *name, const uint8_t *got, const uint8_t *want, size_t n) {
    size_t i = 0;
    while (i < n && got[i] == want[i]) i++;
    check(i == n, name, "byte %zu is 0x%02x, want 0x%02x", i, i < n ? got[i] : 0, i < n ? want[i] : 0);
}

static void test_quantize_hand(void) {
    // Q8_0: amax 127 -> d = 1 (0x3c00), q = roundf(x): ties away from zero.
    float x[64] = {127, 2.5f, -2.5f, 0.49f, -15, 15};
    uint8_t got[64], want[64] = {0x00, 0x3c, 127, 3, (uint8_t)-3, 0, (uint8_t)-15, 15};
    quantize_row(TYPE_Q8_0, got, x, 32);
    check_bytes("quantize q8_0 (d = 1)", got, want, 34);
    // amax 1 -> d = 1/127 -> 0x2008 (2^-7 * (1 + 8/1024)); x1 = -0.25 -> round(-31.75) = -32.
    float x2[32] = {1.0f, -0.25f};
    uint8_t want2[34] = {0x08, 0x20, 127, (uint8_t)-32};
    quantize_row(TYPE_Q8_0, got, x2, 32);
    check_bytes("quantize q8_0 (d = 1/127)", got, want2, 34);

    // Q4_0: max magnitude -8 -> d = -8/-8 = 1, q = min(15, (int)(x + 8.5)):
    // -8 -> 0, 7 -> 15, 7.9 -> 16 -> 15, 0.4 -> 8, 0.5 -> 9, -0.6 -> 7; x16 = 3 -> 11; zeros -> 8.
    float x3[32] = {-8, 7, 7.9f, 0.4f, 0.5f, -0.6f};
    x3[16] = 3;
    uint8_t want3[18] = {0x00, 0x3c, 0x00 | 11 << 4, 0x8f, 0x8f, 0x88, 0x89, 0x87};
    memset(want3 + 8, 0x88, 10);
    quantize_row(TYPE_Q4_0, got, x3, 32);
    check_bytes("quantize q4_0 (negative max)", got, want3, 18);
    // Positive max 4 -> d = -0.5 (0xb800), id = -2: 4 -> 0, -4 -> 16 -> 15, 1 -> 6.5 -> 6.
    float x4[32] = {4, -4, 1};
    uint8_t want4[18] = {0x00, 0xb8, 0x80, 0x8f, 0x86};
    memset(want4 + 5, 0x88, 13);
    quantize_row(TYPE_Q4_0, got, x4, 32);
    check_bytes("quantize q4_0 (positive max)", got, want4, 18);

    // Q5_0: max magnitude -16 -> d = 1, q = min(31, (int)(x + 16.5)): -16 -> 0, 15 -> 31, 15.9 ->
    // 32 -> 31, 0.4 -> 16, 0.5 -> 17, -0.6 -> 15; x16 = 3 -> 19; zeros -> 16. The fifth bits (q >> 4)
    // of values 0-31 in qh: 0, 1, 1, 1, 1, 0, then 1s = 0xffffffde. (gguf-py's quants.quantize
    // gives the same bytes, and the same for 256 random values.)
    float x9[32] = {-16, 15, 15.9f, 0.4f, 0.5f, -0.6f};
    x9[16] = 3;
    uint8_t want9[22] = {0x00, 0x3c, 0xde, 0xff, 0xff, 0xff, 0x30, 0x0f, 0x0f, 0x00, 0x01, 0x0f};
    quantize_row(TYPE_Q5_0, got, x9, 32);
    check_bytes("quantize q5_0", got, want9, 22);

    // Q4_1: min -1, max 14 -> d = 1 (0x3c00), m = -1 (0xbc00), q = min(15, (int)(x + 1 + 0.5)):
    // -1 -> 0, 14 -> 15, 0.4 -> 1, 0.6 -> 2; zeros -> 1.
    float x5[32] = {-1, 14, 0.4f, 0.6f};
    uint8_t want5[20] = {0x00, 0x3c, 0x00, 0xbc, 0x10, 0x1f, 0x11, 0x12};
    memset(want5 + 8, 0x11, 12);
    quantize_row(TYPE_Q4_1, got, x5, 32);
    check_bytes("quantize q4_1", got, want5, 20);

    // NF4: absmax 2; 2 -> 1.0 (15), -2 -> -1.0 (0), 0.1 -> 0.05 (8: above the midpoint 0.0398),
    // 0.07 -> 0.035 (7), -0.7 -> -0.35 (3: below the midpoint -0.3397), zeros -> 7.
    float x6[64] = {2, -2, 0.1f, 0.07f, -0.7f};
    uint8_t want6[36] = {0x00, 0x00, 0x00, 0x40, 0xf0, 0x87, 0x37};
    memset(want6 + 7, 0x77, 29);
    quantize_row(TYPE_NF4, got, x6, 64);
    check_bytes("quantize nf4", got, want6, 36);

    float x7[3] = {1.0f, 65520.0f, 1.0f / 3.0f};
    uint8_t want7[6] = {0x00, 0x3c, 0x00, 0x7c, 0x55, 0x35};
    quantize_row(TYPE_F16, got, x7, 3);
    check_bytes("quantize f16", got, want7, 6);
    float x8[2] = {1.0f, 1.0f + 0x1.8p-7f};
    uint8_t want8[4] = {0x80, 0x3f, 0x82, 0x3f};
    quantize_row(TYPE_BF16, got, x8, 2);
    check_bytes("quantize bf16", got, want8, 4);
    check(quantize_row(TYPE_Q4_0, got, x, 31) == -1 && quantize_row(77, got, x, 32) == -1 &&
          quantize_row(TYPE_Q5_1, got, x, 32) == -1, "quantize_row rejects", "accepted");

    // Our K-quantizers (not ggml's search, see quant.c) on a block of ones:
    // Q4_K: every group spans [0, 1]: scale 1/15, min 0; the largest scale -> 63, d = fp16(1/945)
    // = 0x1456, dmin = 0; 6-bit scales 63 packed as 0xff x4 (63 | top bits of groups 4-7),
    // mins 0, 0x0f x4 (low bits of groups 4-7's scales); levels round(1 / (d*63)) = 15.
    float ones[256];
    for (int i = 0; i < 256; i++) ones[i] = 1.0f;
    uint8_t kgot[210], k4[144] = {0x56, 0x14, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0x0f, 0x0f, 0x0f, 0x0f};
    memset(k4 + 16, 0xff, 128);
    quantize_row(TYPE_Q4_K, kgot, ones, 256);
    check_bytes("quantize q4_K (ones)", kgot, k4, 144);
    // Q6_K: group scale 1/-32, the largest -> -128, d = fp16(1/4096) = 0x0c00; levels
    // round(1 / (2^-12 * -128)) = -32 -> 0 after the +32: ql = qh = 0, scales 0x80.
    uint8_t k6[210] = {0};
    memset(k6 + 192, 0x80, 16);
    k6[209] = 0x0c;
    quantize_row(TYPE_Q6_K, kgot, ones, 256);
    check_bytes("quantize q6_K (ones)", kgot, k6, 210);
}

// Round trips on random data: the error of each element stays within what the format allows.
static void test_quantize_error(void) {
    enum { N = 4096 };
    uint64_t rng = 42;
    float *x = xmalloc(N * sizeof(float)), *y = xmalloc(N * sizeof(float));
    uint8_t *q = xmalloc(N * 2);
    for (int i = 0; i < N; i++) x[i] = rng_normal(&rng) * (i % 97 == 0 ? 10.0f : 1.0f);
    struct { int type; int block; double bound; const char *name; } t[] = {
        // Q8_0: |e| <= d/2 (+ d's fp16 rounding: 2^-11 of amax); Q4_0: |e| <= |d| (the value
        // opposite the max can clamp from 8 to 7); Q4_1: d/2 + fp16 rounding of d and m;
        // NF4: half the widest gap between codes (-1 .. -0.696) of absmax.
        {TYPE_Q8_0, 32, 0.5 / 127 + 1.0 / 2048, "q8_0 error <= d/2"},
        {TYPE_Q4_0, 32, 1.0 / 8 + 1.0 / 2048, "q4_0 error <= |d|"},
        {TYPE_Q5_0, 32, 1.0 / 16 + 1.0 / 2048, "q5_0 error <= |d|"},
        {TYPE_Q4_1, 32, 0.5 / 15 + 3.0 / 2048, "q4_1 error <= d/2"},
        {TYPE_NF4, 64, (1.0 - 0.6961928009986877) / 2 + 1e-6, "nf4 error <= half gap"},
        // K-quants: half a step of the group (range/15, range/31, 2*amax/64) plus the rounding
        // of the 6-bit (8-bit) scales, measured against the super-block's amax.
        {TYPE_Q4_K, 256, 0.5 * 2 / 15 + 2.0 / 63, "q4_K error <= half a step"},
        {TYPE_Q5_K, 256, 0.5 * 2 / 31 + 2.0 / 63, "q5_K error <= half a step"},
        {TYPE_Q6_K, 256, 0.5 / 32 + 1.0 / 128, "q6_K error <= half a step"},
    };
    for (size_t k = 0; k < sizeof t / sizeof t[0]; k++) {
        quantize_row(t[k].type, q, x, N);
        dequantize_row(t[k].type, y, q, N);
        double worst = 0, sq = 0, sqx = 0;  // error / (amax of its block, or range for Q4_1)
        double rms_bound[] = {0.02, 0.2, 0.1, 0.12, 0.2, 0.12, 0.06, 0.04};  // per entry of t
        for (int b = 0; b < N / t[k].block; b++) {
            float amax = 0, mn = x[b * t[k].block], mx = mn;
            for (int j = 0; j < t[k].block; j++) {
                float v = x[b * t[k].block + j];
                amax = fmaxf(amax, fabsf(v));
                mn = fminf(mn, v);
                mx = fmaxf(mx, v);
            }
            double ref = t[k].type == TYPE_Q4_1 ? (double)mx - mn : amax;
            for (int j = 0; j < t[k].block; j++) {
                int i = b * t[k].block + j;
                double e = fabs((double)y[i] - x[i]) / ref;
                worst = e > worst ? e : worst;
                sq += ((double)y[i] - x[i]) * ((double)y[i] - x[i]);
                sqx += (double)x[i] * x[i];
            }
        }
        check(worst <= t[k].bound && sqrt(sq / sqx) < rms_bound[k], t[k].name,
              "max error %.4g of the block's scale (bound %.4g), relative rms %.4g", worst, t[k].bound, sqrt(sq / sqx));
        printf("    %s: max error %.4g of the block scale, relative rms %.4g\n", type_info(t[k].type)->name, worst, sqrt(sq / sqx));
    }
    free(x);
    free(y);
    free(q);
}

// ---------------------------------------------------------------------------------------------
// Products.

// A random matrix [rows, cols] in `type`: quantized from normal floats where quantize_row can,
// else random bytes with sane scales written over the scale fields (offsets from the formats).
static uint8_t *random_matrix(int type, int rows, int cols, uint64_t seed) {
    size_t rb = row_bytes(type, cols), n = rb * (size_t)rows;
    uint8_t *m = xmalloc(n);
    float *row = xmalloc((size_t)cols * sizeof(float));
    if (quantize_row(type, m, row, 0) == 0 || type == TYPE_F32) {
        for (int r = 0; r < rows; r++) {
            for (int c = 0; c < cols; c++) row[c] = rng_normal(&seed) * 0.1f;
            quantize_row(type, m + (size_t)r * rb, row, cols);
        }
        free(row);
        return m;
    }
    for (size_t i = 0; i < n; i++) m[i] = (uint8_t)rng_next(&seed);
    const TypeInfo *ti = type_info(type);
    size_t half_at[2] = {0, 2};
    int halves = type == TYPE_Q4_1 || type == TYPE_Q5_1 || type == TYPE_Q4_K || type == TYPE_Q5_K ? 2 : 1;
    if (type == TYPE_Q6_K) half_at[0] = 208;
    for (size_t b = 0; b < n / ti->bytes; b++) {
        for (int h = 0; h < halves; h++) {
            uint16_t v = fp32_to_fp16((rng_uniform(&seed) + 0.5f) * (type >= TYPE_Q4_K ? 0.002f : 0.01f));
            memcpy(m + b * ti->bytes + half_at[h], &v, 2);
        }
    }
    free(row);
    return m;
}

static float *random_floats(size_t n, uint64_t seed, float scale) {
    float *x = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = rng_normal(&seed) * scale * (i % 61 == 7 ? 20.0f : 1.0f);
    return x;
}

// The dequantized matrix, in float64.
static double *dequantized(const QMatrix *W) {
    double *w = xmalloc((size_t)W->rows * W->cols * sizeof(double));
    float *row = xmalloc((size_t)W->cols * sizeof(float));
    for (int r = 0; r < W->rows; r++) {
        qmatrix_row(row, W, r);
        for (int c = 0; c < W->cols; c++) w[(size_t)r * W->cols + c] = row[c];
    }
    free(row);
    return w;
}

// Compares got with want, elementwise, against per-element bounds; prints the worst case.
static void check_bounded(const char *name, const float *got, const float *want, const double *bound, size_t n) {
    size_t bad = 0, first = 0;
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - want[i]);
        if (!(e <= bound[i])) {
            if (!bad) first = i;
            bad++;
        }
        if (bound[i] > 0 && e / bound[i] > worst) worst = e / bound[i];
    }
    check(bad == 0, name, "%zu of %zu outside the bound; first [%zu] got %.9g want %.9g bound %.3g",
          bad, n, first, got[first], want[first], bound[first]);
    if (bad == 0 && getenv("QUANT_VERBOSE")) printf("    worst error / bound = %.3g\n", worst);
}

static const int ALL_TYPES[] = {TYPE_F32, TYPE_F16, TYPE_BF16, TYPE_Q4_0, TYPE_Q4_1, TYPE_Q5_0,
                                TYPE_Q5_1, TYPE_Q8_0, TYPE_Q4_K, TYPE_Q5_K, TYPE_Q6_K, TYPE_NF4};

// matmul_ref and matmul_backward_input_ref against float64 products of the dequantized matrix.
static void test_ref_vs_f64(void) {
    for (size_t k = 0; k < sizeof ALL_TYPES / sizeof ALL_TYPES[0]; k++) {
        int type = ALL_TYPES[k], T = 3, OUT = 5, IN = type_info(type)->block >= 64 ? 512 : 96;
        uint8_t *data = random_matrix(type, OUT, IN, 100 + k);
        QMatrix W = {type, OUT, IN, data};
        double *w = dequantized(&W);
        float *x = random_floats((size_t)T * IN, 7, 1.0f), *dy = random_floats((size_t)T * OUT, 8, 1.0f);
        float *bias = random_floats(OUT, 9, 1.0f);
        float *out = xmalloc((size_t)T * OUT * 4), *want = xmalloc((size_t)T * OUT * 4);
        double *bound = xmalloc((size_t)T * (IN > OUT ? IN : OUT) * 8);
        matmul_ref(out, x, &W, bias, T);
        for (int t = 0; t < T; t++) {
            for (int o = 0; o < OUT; o++) {
                double s = bias[o], a = fabs(bias[o]);
                for (int i = 0; i < IN; i++) {
                    s += w[(size_t)o * IN + i] * x[(size_t)t * IN + i];
                    a += fabs(w[(size_t)o * IN + i] * x[(size_t)t * IN + i]);
                }
                want[t * OUT + o] = (float)s;
                bound[t * OUT + o] = 1e-5 * a + 1e-30;
            }
        }
        char name[96];
        snprintf(name, sizeof name, "matmul_ref %s = float64 product", type_info(type)->name);
        check_bounded(name, out, want, bound, (size_t)T * OUT);

        float *dx = random_floats((size_t)T * IN, 10, 1.0f), *dxw = xmalloc((size_t)T * IN * 4);
        for (int t = 0; t < T; t++) {
            for (int i = 0; i < IN; i++) {
                double s = dx[(size_t)t * IN + i], a = fabs(s);
                for (int o = 0; o < OUT; o++) {
                    s += dy[t * OUT + o] * w[(size_t)o * IN + i];
                    a += fabs(dy[t * OUT + o] * w[(size_t)o * IN + i]);
                }
                dxw[(size_t)t * IN + i] = (float)s;
                bound[(size_t)t * IN + i] = 1e-5 * a + 1e-30;
            }
        }
        matmul_backward_input_ref(dx, dy, &W, T);
        snprintf(name, sizeof name, "matmul_backward_input_ref %s = float64 product", type_info(type)->name);
        check_bounded(name, dx, dxw, bound, (size_t)T * IN);

        float *row = xmalloc((size_t)IN * 4), *want_row = xmalloc((size_t)IN * 4);
        qmatrix_row(row, &W, 3);
        dequantize_row(type, want_row, data + 3 * row_bytes(type, IN), IN);
        snprintf(name, sizeof name, "qmatrix_row %s", type_info(type)->name);
        check_close(name, row, want_row, (size_t)IN, 0, 0);
        free(row), free(want_row), free(dx), free(dxw), free(data), free(w), free(x), free(dy);
        free(bias), free(out), free(want), free(bound);
    }
}

// The bound of one output of a product: sum_k of p_k = w_k x_k (w dequantized, float64) under the
// arithmetic of the route that ran it (matmul_route):
//   every route: fp32 sums (and a bias) within 2e-5 of sum |p_k|;
//   ROUTE_BF16, ROUTE_AMX: both factors rounded to bf16, a relative error of at most 2^-8 each,
//     independent from one product to the next: 7.5 standard deviations of their sum,
//     0.025 * sqrt(sum p_k^2) (the worst case, 2^-7 * sum |p_k|, would let a dropped pair through);
//   ROUTE_INT16_TILES: exact weights, x within dx / 2 with dx = amax(x) / 16383 (of a K-chunk; here of
//     the whole row, which is larger): sum |w_k| * amax / 32766; NF4's codes in 13 bits add
//     amax |w| * sum |x_k| / 8190;
//   ROUTE_INT16_ROWS: the same with 16 bits: sum |w_k| * amax / 65534;
//   ROUTE_INT8_TILES, ROUTE_INT8_ROWS: x rounded to a multiple of dx = amax(x of the block of 32) / 127, an error
//     uniform in +-dx / 2 (variance dx^2 / 12), independent from one value to the next: 7.5
//     standard deviations of the sum, 7.5 sqrt(sum_k w_k^2 dx_k^2 / 12) (the worst case, sum |w_k|
//     dx_k / 2, would let a dropped pair through in most outputs).
typedef struct {
    double abs, sq, w, x, wmax, xmax;  // sum |p|, sum p^2, sum |w|, sum |x|, max |w|, max |x|
    double w8;                         // sum over blocks of 32 of (sum w_k^2) * (amax |x_k| / 127)^2
} Terms;

static double route_bound(Route route, int type, const Terms *t) {
    double b = 2e-5 * t->abs;
    if (route == ROUTE_BF16 || route == ROUTE_AMX) b += 0.025 * sqrt(t->sq);
    if (route == ROUTE_INT16_TILES) b += t->w * t->xmax / 32766 + (type == TYPE_NF4 ? t->wmax * t->x / 8190 : 0);
    if (route == ROUTE_INT16_ROWS) b += t->w * t->xmax / 65534;
    if (route == ROUTE_INT8_TILES || route == ROUTE_INT8_ROWS) b += 7.5 * sqrt(t->w8 / 12);
    return b;
}

static void terms_add(Terms *t, double w, double x) {
    double p = w * x;
    t->abs += fabs(p), t->sq += p * p, t->w += fabs(w), t->x += fabs(x);
    t->wmax = fmax(t->wmax, fabs(w)), t->xmax = fmax(t->xmax, fabs(x));
}

// The terms of one output: row wr[n] (dequantized) against token row xr[n], and bias b.
static Terms output_terms(const double *wr, const float *xr, int n, float b) {
    Terms tm = {0};
    for (int i = 0; i < n; i++) terms_add(&tm, wr[i], xr[i]);
    for (int i0 = 0; i0 < n; i0 += 32) {
        double sq = 0, amax = 0;
        for (int i = i0; i < n && i < i0 + 32; i++) sq += wr[i] * wr[i], amax = fmax(amax, fabs(xr[i]));
        tm.w8 += sq * (amax / 127) * (amax / 127);
    }
    tm.abs += fabs(b);
    return tm;
}

// What one size of one type measured: the worst error / bound, how many outputs broke their bound,
// and how many outputs a dropped last pair of products (the last two k of the sum) would have
// moved past their bound (the bound's power to see one: most of them).
typedef struct {
    double worst;
    size_t bad, n, seen, outputs;
    int threads_differ;
    char first[160];
} Result;

static void result_add(Result *r, const char *what, size_t i, double got, double want, double bound, double dropped) {
    double e = fabs(got - want);
    r->outputs++;
    if (bound > 0 && e / bound > r->worst) r->worst = e / bound;
    if (!(e <= bound) && r->bad++ == 0)
        snprintf(r->first, sizeof r->first, "%s [%zu] got %.9g want %.9g bound %.3g", what, i, got, want, bound);
    r->seen += fabs(dropped) > bound;
}

// The forward product of one size through `product` (matmul or matmul_inference) against the
// definition (1 thread), each output within the bound of its route; then with 2 threads, bit for bit.
static void forward_vs_ref(Result *r, Product product, const QMatrix *W, const double *w, const float *x, const float *bias,
                           int T) {
    int OUT = W->rows, IN = W->cols;
    float *got = xmalloc((size_t)T * OUT * 4), *want = xmalloc((size_t)T * OUT * 4), *got2 = xmalloc((size_t)T * OUT * 4);
    void (*product_fn)(float *, const float *, const QMatrix *, const float *, int) =
        product == PRODUCT_INFERENCE ? matmul_inference : matmul;
    Route route = matmul_route(W, T, product);
    matmul_ref(want, x, W, bias, T);
    threads_init(1);
    product_fn(got, x, W, bias, T);
    threads_init(2);
    product_fn(got2, x, W, bias, T);
    r->threads_differ |= memcmp(got, got2, (size_t)T * OUT * 4) != 0;
    for (int t = 0; t < T; t++)
        for (int o = 0; o < OUT; o++) {
            const double *wr = w + (size_t)o * IN;
            const float *xr = x + (size_t)t * IN;
            Terms tm = output_terms(wr, xr, IN, bias[o]);
            double dropped = IN >= 2 ? wr[IN - 1] * xr[IN - 1] + wr[IN - 2] * xr[IN - 2] : 0;
            result_add(r, product == PRODUCT_INFERENCE ? "inference" : "forward", (size_t)t * OUT + o,
                       got[(size_t)t * OUT + o], want[(size_t)t * OUT + o], route_bound(route, W->type, &tm), dropped);
        }
    free(got), free(want), free(got2);
}

// The fast products of one size against the definitions (1 thread), each output within the bound
// of its route; then the same outputs with 2 threads, bit for bit: the forward product of
// training, that of inference, and the backward one.
static void fast_vs_ref(Result *fr, Result *ir, Result *br, int type, int T, int OUT, int IN, uint64_t seed) {
    uint8_t *data = random_matrix(type, OUT, IN, seed);
    QMatrix W = {type, OUT, IN, data};
    double *w = dequantized(&W);
    float *x = random_floats((size_t)T * IN, seed + 1, 1.0f), *bias = random_floats(OUT, seed + 2, 1.0f);
    float *dy = random_floats((size_t)T * OUT, seed + 3, 1.0f), *dx0 = random_floats((size_t)T * IN, seed + 4, 1.0f);
    for (size_t i = 0; i < (size_t)T * IN; i++) x[i] += 0.5f;  // a mean, as activations have: else a
                                                               // block's min (Q5_1, K-quants) adds ~0
    size_t nmax = (size_t)T * (IN > OUT ? IN : OUT);
    float *got = xmalloc(nmax * 4), *want = xmalloc(nmax * 4), *got2 = xmalloc(nmax * 4);
    Route bwd = matmul_route(&W, T, PRODUCT_BACKWARD);
    forward_vs_ref(fr, PRODUCT_FORWARD, &W, w, x, bias, T);
    forward_vs_ref(ir, PRODUCT_INFERENCE, &W, w, x, bias, T);

    memcpy(want, dx0, (size_t)T * IN * 4), memcpy(got, dx0, (size_t)T * IN * 4), memcpy(got2, dx0, (size_t)T * IN * 4);
    matmul_backward_input_ref(want, dy, &W, T);
    threads_init(1);
    matmul_backward_input(got, dy, &W, T);
    threads_init(2);
    matmul_backward_input(got2, dy, &W, T);
    br->threads_differ |= memcmp(got, got2, (size_t)T * IN * 4) != 0;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < IN; i++) {
            Terms tm = {0};
            const float *d = dy + (size_t)t * OUT;
            for (int o = 0; o < OUT; o++) terms_add(&tm, w[(size_t)o * IN + i], d[o]);
            tm.abs += fabs(dx0[(size_t)t * IN + i]);
            double dropped = OUT >= 2 ? w[(size_t)(OUT - 1) * IN + i] * d[OUT - 1] + w[(size_t)(OUT - 2) * IN + i] * d[OUT - 2] : 0;
            result_add(br, "backward", (size_t)t * IN + i, got[(size_t)t * IN + i], want[(size_t)t * IN + i],
                       route_bound(bwd, type, &tm), dropped);
        }
    free(data), free(w), free(x), free(bias), free(dy), free(dx0), free(got), free(want), free(got2);
}

static const char *route_name(Route r) {
    static const char *const names[] = {"fp32", "bf16", "amx", "int16-tiles", "int16-rows", "int8-tiles", "int8-rows"};
    return names[r];
}

// Every type through every token count the kernels branch on (few-token rows, partial and full
// vectors of 16 tokens and tiles of 4 vectors), inner sizes that are not a multiple of a tile or
// of a K-chunk (3 blocks; over 1024 for two K-chunks at T = 128), 37 and 70 rows (not multiples
// of the 6 rows of a tile or the 16 or 32 of a vector or AMX tile), and 300 rows (two chunks of
// the backward product's rows). Generation's rows also get the inner size of Qwen2.5-0.5B's hidden
// state, 896 = 28 blocks of 32 (the 16-bit rows of Q4_0 take it as a group of 16 blocks and a
// short one of 12), or 1280 for the types of 256-value blocks.
static void test_fast_vs_ref(void) {
    static const int tokens[] = {1, 2, 3, 15, 16, 17, 31, 32, 33, 64, 65, 128};
    int saved = threads_count(), nt = sizeof tokens / sizeof tokens[0];
    for (size_t k = 0; k < sizeof ALL_TYPES / sizeof ALL_TYPES[0]; k++) {
        int type = ALL_TYPES[k], bs = type_info(type)->block, small = 3 * (bs > 32 ? bs : 32);
        int big = bs == 256 ? 1280 : bs == 64 ? 1088 : 1120;
        Result fr = {0}, ir = {0}, br = {0};
        int rows_in = bs == 256 ? 1280 : 896;
        for (int a = 0; a < nt; a++) fast_vs_ref(&fr, &ir, &br, type, tokens[a], 37, small, 1000 + 40 * k + a);
        fast_vs_ref(&fr, &ir, &br, type, 128, 70, big, 1000 + 40 * k + 30);
        fast_vs_ref(&fr, &ir, &br, type, 17, 300, small, 1000 + 40 * k + 31);
        for (int T = 1; T <= 3; T++) fast_vs_ref(&fr, &ir, &br, type, T, 37, rows_in, 1000 + 40 * k + 32 + T);
        QMatrix W = {type, 70, big, NULL}, W1 = {type, 37, rows_in, NULL};
        char name[256];
        Result *rs[3] = {&fr, &br, &ir};
        static const char *const products[3] = {"matmul", "matmul_backward_input", "matmul_inference"};
        for (int d = 0; d < 3; d++) {
            Result *r = rs[d];
            snprintf(name, sizeof name,
                     "%s %s vs the definitions, T 1..128, %d sizes, routes %s (T 1) %s (T 128): worst error/bound %.2f, "
                     "a dropped last pair seen in %.0f%% of outputs",
                     products[d], type_info(type)->name, nt + 5,
                     route_name(matmul_route(&W1, 1, (Product)d)), route_name(matmul_route(&W, 128, (Product)d)), r->worst,
                     100.0 * (double)r->seen / (double)r->outputs);
            check(r->bad == 0, name, "%zu of %zu outside the bound; first: %s", r->bad, r->outputs, r->first);
            snprintf(name, sizeof name, "%s %s: the same bits with 1 and 2 threads", products[d], type_info(type)->name);
            check(!r->threads_differ, name, "results differ");
        }
    }
    if (saved > 1) threads_init(saved); else threads_free();
}

// A NaN or an infinity in a token's activations makes that token's outputs non-finite, on every
// route (none may round it away).
static void test_fast_nonfinite(void) {
    const int types[] = {TYPE_Q4_0, TYPE_Q8_0, TYPE_Q4_K, TYPE_F32}, Ts[] = {1, 3, 17}, OUT = 5, IN = 256;
    const float vals[] = {NAN, INFINITY};
    int finite = 0;
    for (size_t k = 0; k < sizeof types / sizeof types[0]; k++) {
        uint8_t *data = random_matrix(types[k], OUT, IN, 300 + k);
        QMatrix W = {types[k], OUT, IN, data};
        for (int a = 0; a < 3; a++) {
            for (int v = 0; v < 2; v++) {
                int T = Ts[a];
                float *x = random_floats((size_t)T * IN, 400 + k, 1.0f), *out = xmalloc((size_t)T * OUT * 4);
                x[(size_t)(T - 1) * IN + 40] = vals[v];
                matmul(out, x, &W, NULL, T);
                for (int o = 0; o < OUT; o++) finite += isfinite(out[(size_t)(T - 1) * OUT + o]) != 0;
                matmul_inference(out, x, &W, NULL, T);
                for (int o = 0; o < OUT; o++) finite += isfinite(out[(size_t)(T - 1) * OUT + o]) != 0;
                free(x), free(out);
            }
        }
        free(data);
    }
    check(finite == 0, "matmul, matmul_inference: a NaN or inf activation gives non-finite outputs", "%d outputs finite", finite);
}


// ---------------------------------------------------------------------------------------------
// The thread pool.

typedef struct {
    int *hits;
    int align;
    int bad_align;
} CoverCtx;

static void cover(void *ctx, int start, int end) {
    CoverCtx *c = ctx;
    if (start % c->align) c->bad_align = 1;
    for (int i = start; i < end; i++) c->hits[i]++;
}

static void test_threads(void) {
    int saved = threads_count();
    int hits[1000];
    int ok = 1;
    for (int nt = 0; nt <= 3; nt++) {
        if (nt == 0) threads_free(); else threads_init(nt);  // 0: before threads_init
        const int ns[4] = {1, 31, 32, 1000}, aligns[3] = {1, 32, 7};
        for (int a = 0; a < 4; a++) {
            for (int b = 0; b < 3; b++) {
                memset(hits, 0, sizeof hits);
                CoverCtx c = {hits, aligns[b], 0};
                parallel_for(cover, &c, ns[a], aligns[b]);
                for (int i = 0; i < ns[a]; i++) ok &= hits[i] == 1;
                ok &= !c.bad_align;
            }
        }
        // Many small jobs in a row (generation makes ~170 per token).
        for (int r = 0; r < 2000; r++) {
            memset(hits, 0, 64 * sizeof(int));
            CoverCtx c = {hits, 8, 0};
            parallel_for(cover, &c, 64, 8);
            for (int i = 0; i < 64; i++) ok &= hits[i] == 1;
        }
    }
    check(ok, "parallel_for covers [0, n) once, aligned, for 0-3 threads", "a chunk was missed or repeated");
    threads_init(0);
    check(threads_count() >= 1, "threads_init(0) uses the online cores", "%d", threads_count());
    if (saved > 1) threads_init(saved); else threads_free();
    check(threads_count() == saved, "thread count restored", "%d", threads_count());
}

void test_quant(void) {
    test_halves();
    test_types();
    test_blocks_simple();
    test_blocks_k();
    test_quantize_hand();
    test_quantize_error();
    test_ref_vs_f64();
    test_threads();
    test_fast_vs_ref();
    test_fast_nonfinite();
}
