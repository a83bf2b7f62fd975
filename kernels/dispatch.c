// kernels/dispatch.c: the one place that chooses how a product runs. At run time, per product:
// matmul_route picks the arithmetic from W's type, the token count, the product and the CPU, and
// matmul, matmul_inference and matmul_backward_input call the kernel of that route. At compile time, per piece: which
// instruction set's version of each tile, decoder and dot product this build uses (the HAVE_
// macros of kernels.h), the plain C one of tiles.c where it has none. make debug and make
// test-ref (-DSFT_REF) call quant.c's definitions instead.
//
// The routes (quant.h: Route):
// - Few tokens (generation: T = 1): rows (tiles.c: matmul_rows). Each weight row is dequantized
//   once (SIMD per format; for T = 1 and the formats generation reads most, in registers, fused
//   with the dot product: row_dot) and dotted with every token row (forward), or added to every
//   token's gradient row (backward), in fp32. On AVX512-VNNI, Q4_0 and Q6_K rows take the
//   activations in 16-bit integers instead (avx512_vnni.c: matmul_rows16, ROUTE_INT16_ROWS):
//   1.5x faster, with an error a hundred times below bf16's.
// - More tokens (training, prompts): compute-bound register tiles (tiles.c: matmul_tiles,
//   matmul_backward_tiles). Forward, AVX512-VNNI, quantized weights: the weights' own integers
//   times the activations in 14-bit integers (avx512_vnni.c: matmul_int16, ROUTE_INT16_TILES):
//   exact products, so that the loss is as accurate as with fp32 weights. Backward (and the
//   forward of Q4_1, Q5_1) with AVX512-BF16: both factors rounded to bf16, fp32 sums (vdpbf16ps,
//   ROUTE_BF16: two exact products per lane, 32 multiply-adds an instruction, 24 accumulators in
//   registers; or AMX tiles, amx.c, ROUTE_AMX). Activations are rounded once per call and packed
//   into the pool's shared scratch; weight rows are dequantized to bf16, a chunk at a time, into
//   the thread's own scratch. Lanes are 16 tokens (forward) or input columns (backward); a tile
//   is 4 x 16 lanes x 6. The relative error of a product is at most 2^-7 (bounds in
//   test/test_quant.c), and the gradients measured on the fixtures stay below PyTorch bf16
//   autocast's. Why not llama.cpp's 8-bit activations (vpdpbusd) here: their error per value is
//   absmax / 254 of its block, 2-3x that of bf16 rounding, which would make the loss less exact
//   than the peer's.
// - Inference (matmul_inference: the prompts and tokens of generate and chat, never a loss or a
//   gradient) on AVX512-VNNI: those 8-bit activations, per block of 32, times the weights' own
//   integers with vpdpbusd, twice the multiply-adds of an instruction of the routes above. Prompts
//   of Q4_0: tiles of 2 x 16 tokens x 6 rows (avx512_vnni.c: matmul_int8, ROUTE_INT8_TILES).
//   Generation's rows of Q4_0, Q5_0, Q5_1, Q8_0 and the K-quants, with AVX512-VBMI (matmul_rows8,
//   ROUTE_INT8_ROWS): a third of the instructions per weight, so that they keep up with memory.
//   The logits' error, measured on the fixtures, is 0.8-1.1x PyTorch bf16 autocast's (test_model.c
//   allows 1.5x, as issue 9 does for inference). Other products of inference take the routes above.
// - Other CPUs, all ROUTE_FP32: the same rows and tiles in fp32 words, with AVX2 + FMA (avx2.c),
//   NEON (neon.c) or plain C (tiles.c, which compilers vectorize as they can).
#include <stdio.h>

#include "../common.h"
#include "kernels.h"

// --- This build's version of each piece ----------------------------------------------------------

void dequantize_span(Type type, float *out, const uint8_t *row, int i0, int n) {
#if HAVE_AVX512
    if (dequantize_span_avx512(type, out, row, i0, n)) return;
#elif HAVE_AVX2
    if (dequantize_span_avx2(type, out, row, i0, n)) return;
#elif HAVE_NEON
    if (dequantize_span_neon(type, out, row, i0, n)) return;
#endif
    const TypeInfo *ti = type_info(type);
    dequantize_row(type, out, row + (size_t)(i0 / ti->block) * ti->bytes, n);
}

int row_dot(float *s, Type type, const uint8_t *row, const float *x, int n) {
#if HAVE_AVX512
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

float dot_f32(const float *a, const float *b, int n) {
#if HAVE_AVX512
    return dot_f32_avx512(a, b, n);
#elif HAVE_AVX2
    return dot_f32_avx2(a, b, n);
#elif HAVE_NEON
    return dot_f32_neon(a, b, n);
#else
    return dot_f32_c(a, b, n);
#endif
}

void axpy_f32(float *y, float a, const float *x, int n) {
#if HAVE_AVX512
    axpy_f32_avx512(y, a, x, n);
#elif HAVE_AVX2
    axpy_f32_avx2(y, a, x, n);
#elif HAVE_NEON
    axpy_f32_neon(y, a, x, n);
#else
    axpy_f32_c(y, a, x, n);
#endif
}

void to_bf16_pairs(uint32_t *out, const float *in, int n) {
#if HAVE_BF16_DOT
    to_bf16_pairs_avx512(out, in, n);
#else
    to_bf16_pairs_c(out, in, n);
#endif
}

void to_bf16_interleaved(uint32_t *out, const float *a, const float *b, int n) {
#if HAVE_BF16_DOT
    to_bf16_interleaved_avx512(out, a, b, n);
#else
    to_bf16_interleaved_c(out, a, b, n);
#endif
}

// Quantized weights on a CPU with AVX512-BF16 multiply bf16 pairs; the rest fp32 values.
int tile_pairs(Type type) {
#if HAVE_BF16_DOT
    return type != TYPE_F32 && type != TYPE_F16 && type != TYPE_BF16;
#else
    (void)type;
    return 0;
#endif
}

void fwd_tile(const Fwd *f, const FwdTile *tl, int M) {
#if HAVE_AVX512
    fwd_tile_avx512(f, tl, M);
#elif HAVE_AVX2
    fwd_tile_avx2(f, tl, M);
#elif HAVE_NEON
    fwd_tile_neon(f, tl, M);
#else
    fwd_tile_c(f, tl, M);
#endif
}

void bwd_tile(const Bwd *b, const BwdTile *tl, int M) {
#if HAVE_AVX512
    bwd_tile_avx512(b, tl, M);
#elif HAVE_AVX2
    bwd_tile_avx2(b, tl, M);
#elif HAVE_NEON
    bwd_tile_neon(b, tl, M);
#else
    bwd_tile_c(b, tl, M);
#endif
}

int fwd_flush_simd(const Fwd *f, const float *stage, int o0, int nrows) {
#if HAVE_AVX512
    return fwd_flush_avx512(f, stage, o0, nrows);
#elif HAVE_AVX2
    return fwd_flush_avx2(f, stage, o0, nrows);
#else
    (void)f, (void)stage, (void)o0, (void)nrows;
    return 0;
#endif
}

// --- What this build does on this CPU ------------------------------------------------------------

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
    static char text[300];  // the same text on every call
    const char *fwd = !HAVE_INT16_DOT ? "bf16 (vdpbf16ps)"
                      : HAVE_INT8_ROWS ? "exact weights x int16 activations (vpdpwssd); inference: Q4_0 prompts, "
                                         "Q4_0/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K generation x int8 (vpdpbusd)"
                                       : "exact weights x int16 activations (vpdpwssd); inference: Q4_0 prompts x int8 (vpdpbusd)";
#if HAVE_AMX
    const char *bwd = amx_on() ? amx_why() : "vdpbf16ps", *note = amx_on() ? "" : amx_why();
#else
    const char *bwd = "vdpbf16ps", *note = "no AMX in this build";
#endif
    snprintf(text, sizeof text, "avx512: forward %s, backward bf16 (%s)%s%s", fwd, bwd, *note ? "; " : "", note);
    return text;
#elif HAVE_AVX512
    return "avx512 (fp32 tiles)";
#elif HAVE_AVX2
    return "avx2-fma (fp32 tiles)";
#elif HAVE_NEON
    return "neon (fp32 tiles)";
#else
    return "portable C (fp32 tiles)";
#endif
}

// --- The one dispatch point ----------------------------------------------------------------------

Route matmul_route(const QMatrix *W, int T, Product product) {
#if defined(SFT_REF)
    (void)W, (void)T, (void)product;
    return ROUTE_FP32;
#else
    int backward = product == PRODUCT_BACKWARD;
    int bf16 = tile_pairs(W->type);  // quantized weights on a CPU with AVX512-BF16
#if HAVE_AMX
    int amx = bf16 && amx_on();
#else
    int amx = 0;
#endif
    if (backward) return T < BWD_TILE_MIN_T || !bf16 ? ROUTE_FP32 : amx ? ROUTE_AMX : ROUTE_BF16;
#if HAVE_INT16_DOT
    if (product == PRODUCT_INFERENCE && T >= FWD_TILE_MIN_T && int8_tiles_type(W->type, W->cols)) return ROUTE_INT8_TILES;
    if (product == PRODUCT_INFERENCE && T < FWD_TILE_MIN_T && int8_rows_type(W->type, W->cols)) return ROUTE_INT8_ROWS;
    if (T < FWD_TILE_MIN_T) return int16_rows_type(W->type, W->cols) ? ROUTE_INT16_ROWS : ROUTE_FP32;
    if (int16_tiles_type(W->type, W->cols)) return ROUTE_INT16_TILES;
#endif
    if (T < FWD_TILE_MIN_T || !bf16) return ROUTE_FP32;
    return amx ? ROUTE_AMX : ROUTE_BF16;
#endif
}

// What sft train --trace prints after a product: its shapes and its route.
static void trace_product(double t0, const char *name, const QMatrix *W, int T, Product product) {
    static const char *const routes[] = {"fp32", "bf16", "amx", "int16-tiles", "int16-rows", "int8-tiles", "int8-rows"};
    Route r = matmul_route(W, T, product);
    if (product == PRODUCT_BACKWARD)
        trace_op(t0, name, "dinp[%d, %d] += <- dout[%d, %d], W %s [%d, %d], %s", T, W->cols, T, W->rows,
                 type_info(W->type)->name, W->rows, W->cols, routes[r]);
    else
        trace_op(t0, name, "out[%d, %d] <- inp[%d, %d], W %s [%d, %d], %s", T, W->rows, T, W->cols,
                 type_info(W->type)->name, W->rows, W->cols, routes[r]);
}

// out[T, OUT] = inp[T, IN] @ W[OUT, IN]^T (+ bias): matmul_route's choice, then its kernel.
static void forward_product(float *out, const float *inp, const QMatrix *W, const float *bias, int T, Product product) {
    double t0 = trace_start();
#if defined(SFT_REF)
    (void)product;
    matmul_ref(out, inp, W, bias, T);
#else
    if (T <= 0 || W->rows <= 0 || W->cols <= 0) {
        matmul_ref(out, inp, W, bias, T);
        return;
    }
    switch (matmul_route(W, T, product)) {
#if HAVE_INT16_DOT
    case ROUTE_INT16_ROWS: matmul_rows16(out, inp, W, bias, T); break;
    case ROUTE_INT16_TILES: matmul_int16(out, inp, W, bias, T); break;
    case ROUTE_INT8_TILES: matmul_int8(out, inp, W, bias, T); break;
#if HAVE_INT8_ROWS
    case ROUTE_INT8_ROWS: matmul_rows8(out, inp, W, bias, T); break;
#endif
#endif
#if HAVE_AMX
    case ROUTE_AMX: matmul_amx(out, inp, W, bias, T); break;
#endif
    default:  // ROUTE_FP32 or ROUTE_BF16 (tile_pairs decides the words)
        if (T < FWD_TILE_MIN_T) matmul_rows(out, inp, W, bias, T);
        else matmul_tiles(out, inp, W, bias, T);
    }
#endif
    if (trace_on) trace_product(t0, product == PRODUCT_INFERENCE ? "matmul_inference" : "matmul", W, T, product);
}

void matmul(float *out, const float *inp, const QMatrix *W, const float *bias, int T) {
    forward_product(out, inp, W, bias, T, PRODUCT_FORWARD);
}

void matmul_inference(float *out, const float *inp, const QMatrix *W, const float *bias, int T) {
    forward_product(out, inp, W, bias, T, PRODUCT_INFERENCE);
}

// dinp[T, IN] += dout[T, OUT] @ W[OUT, IN]: matmul_route's choice, then its kernel.
void matmul_backward_input(float *dinp, const float *dout, const QMatrix *W, int T) {
    double t0 = trace_start();
#if defined(SFT_REF)
    matmul_backward_input_ref(dinp, dout, W, T);
#else
    if (T <= 0 || W->rows <= 0 || W->cols <= 0) return;
    switch (matmul_route(W, T, PRODUCT_BACKWARD)) {
#if HAVE_AMX
    case ROUTE_AMX: matmul_backward_amx(dinp, dout, W, T); break;
#endif
    default:  // ROUTE_FP32 or ROUTE_BF16
        if (T < BWD_TILE_MIN_T) matmul_backward_rows(dinp, dout, W, T);
        else matmul_backward_tiles(dinp, dout, W, T);
    }
#endif
    if (trace_on) trace_product(t0, "matmul_backward_input", W, T, PRODUCT_BACKWARD);
}
