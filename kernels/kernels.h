// kernels/kernels.h: what the fast products share (private to kernels/): which instruction sets
// this build has, the sizes of the tiles, the descriptors of a tile, and the functions each file
// gives the others.
//
// The files: dispatch.c chooses (matmul, matmul_backward_input: the route per product; and per
// piece the instruction set of this build); tiles.c drives the products (the range functions
// that parallel_for runs, the packing of the activations) and holds the same tiles in plain C;
// avx512.c, avx512_vnni.c, amx.c, avx2.c and neon.c hold the intrinsics, each whole file behind
// its HAVE_ macro. A file's microkernels are always_inline and specialised at compile time (M,
// pairs), and the loop over their registers sits beside them, so that one call crosses files per
// tile, span or row, never per element. Read quant.c (the definitions) first.
#ifndef KERNELS_H
#define KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "../quant.h"

// --- The instruction sets of this build ---------------------------------------------------------

// AVX-512 (F and BW): every format dequantized in zmm registers, fp32 (or bf16) tiles of 16 lanes.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define HAVE_AVX512 1
#else
#define HAVE_AVX512 0
#endif
// vdpbf16ps and the bf16 conversions (with the AVX-512 they extend).
#if defined(__AVX512BF16__) && HAVE_AVX512
#define HAVE_BF16_DOT 1
#else
#define HAVE_BF16_DOT 0
#endif
// vpdpwssd (AVX512-VNNI): products on 16-bit integers (the forward tiles, and generation's rows
// for Q4_0 and Q6_K: see avx512_vnni.c).
#if defined(__AVX512VNNI__) && HAVE_AVX512 && defined(__F16C__)
#define HAVE_INT16_DOT 1
#else
#define HAVE_INT16_DOT 0
#endif
// vpermt2b (AVX512-VBMI, with the above): generation's rows of Q4_0 on 8-bit activations pick the
// nibbles of 4 blocks with one (avx512_vnni.c: matmul_rows8); without it, the 16-bit rows.
#if defined(__AVX512VBMI__) && HAVE_INT16_DOT
#define HAVE_INT8_ROWS 1
#else
#define HAVE_INT8_ROWS 0
#endif
// AMX tiles beside AVX512-BF16, on Linux (which grants the tile state), with a compiler that knows
// the intrinsics; whether the CPU has them is decided at run time (amx_on).
#if HAVE_BF16_DOT && defined(__x86_64__) && defined(__linux__) && (defined(__clang__) || __GNUC__ >= 11)
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
#endif
// The other fast paths, each compiled only where the one before it is not: AVX2 with FMA (x86-64-v3:
// most x86 laptops), then NEON (arm64: Apple Silicon, Graviton). Neither changes the AVX-512 code.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !HAVE_AVX512
#define HAVE_AVX2 1
#else
#define HAVE_AVX2 0
#endif
#if defined(__ARM_NEON) && defined(__aarch64__) && !HAVE_AVX2
#define HAVE_NEON 1
#else
#define HAVE_NEON 0
#endif

#if HAVE_AVX512 || HAVE_AVX2 || defined(__F16C__)
#include <immintrin.h>
#endif
#if HAVE_NEON
#include <arm_neon.h>
#endif

// Products and conversions are rounded as written (no fused multiply-add unless spelled out by an
// intrinsic), so results do not depend on the compiler; gcc's -std=c11 already means that.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

// Loops over the registers of a tile must be unrolled completely, or the accumulators spill.
#if defined(__clang__)
#define UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define UNROLL _Pragma("GCC unroll 8")
#else
#define UNROLL
#endif

// --- Sizes -------------------------------------------------------------------------------------

#define FWD_TILE_MIN_T 5  // tokens from which the tiles beat fp32 rows (measured: forward,
#define BWD_TILE_MIN_T 2  // T = 4 takes the same time both ways; backward, tiles win from T = 2)
#define FWD_N 6           // rows of W per forward tile
#define FWD_BLOCK 48      // rows of W per block of finished outputs (a multiple of FWD_N)
#define BWD_N 6           // tokens per backward tile
#define BWD_OC 256        // rows of W (pairs: 128) per backward chunk
#define BWD_CB 128        // columns of W per backward block (or the block size if larger)
#define CHUNK_ALIGN 256   // K-chunks are multiples of every block size

static inline size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

// --- Words -------------------------------------------------------------------------------------

static inline float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

// The word at p, whatever was stored there (floats or bf16 pairs): read through memcpy, which
// compilers turn into a plain load, so that no pointer is read as another type.
static inline uint32_t word_at(const uint32_t *p) {
    uint32_t w;
    memcpy(&w, p, sizeof w);
    return w;
}

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

// --- The tiles ---------------------------------------------------------------------------------
//
// Both tiled products multiply 32-bit words: a bf16 pair (two products per vdpbf16ps lane) when
// `pairs` is set, else one fp32 value (one fused multiply-add). The pair route is taken for
// quantized weights on CPUs with AVX512-BF16; F32, F16 and BF16 weights (and every type on other
// CPUs) take the fp32 route, exact up to fp32 sums, at half the speed.

// The forward product out[T, OUT] = inp[T, IN] W^T (+ bias), as the tiles see it.
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

// The backward product dinp[T, IN] += dout[T, OUT] W, as the tiles see it.
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

// --- dispatch.c: this build's version of each piece --------------------------------------------

// out[n] = elements [i0, i0 + n) of a row; i0 and n are multiples of the type's block size.
// Bit-exact with dequantize_row (the SIMD versions keep ggml's order of operations).
void dequantize_span(Type type, float *out, const uint8_t *row, int i0, int n);
// *s = row . x[n] with the row dequantized in registers, where this build has a decoder for its
// format in registers; returns 0 (and leaves *s) otherwise.
int row_dot(float *s, Type type, const uint8_t *row, const float *x, int n);
float dot_f32(const float *a, const float *b, int n);       // sum of a[i] * b[i], fixed order
void axpy_f32(float *y, float a, const float *x, int n);    // y[n] += a * x[n]
// out[(n + 1) / 2] = in[n] rounded to bf16, two per 32-bit word: element 2j in the low half of
// out[j], element 2j + 1 in the high half (0 when n is odd and 2j + 1 = n).
void to_bf16_pairs(uint32_t *out, const float *in, int n);
// out[n] = the pairs (a[i], b[i]) in bf16: a[i] in the low half, b[i] in the high half; zeros
// after them up to a multiple of 16.
void to_bf16_interleaved(uint32_t *out, const float *a, const float *b, int n);
int tile_pairs(Type type);  // the tiles of W's type multiply bf16 pairs (1) or fp32 values (0)
void fwd_tile(const Fwd *f, const FwdTile *tl, int M);    // one tile, M <= 4 vectors of 16 tokens
void bwd_tile(const Bwd *b, const BwdTile *tl, int M);    // one tile, M <= 4 vectors of 16 columns
// out[t, o0 + n] = stage[n * TP + t] (+ bias) for n < nrows, for the first tokens, in blocks
// transposed in registers; returns how many tokens it wrote (fwd_flush writes the others).
int fwd_flush_simd(const Fwd *f, const float *stage, int o0, int nrows);

// --- tiles.c: the drivers (one range function and a thin parallel wrapper each), plain C -------

void matmul_rows(float *out, const float *inp, const QMatrix *W, const float *bias, int T);
void matmul_backward_rows(float *dinp, const float *dout, const QMatrix *W, int T);
void matmul_tiles(float *out, const float *inp, const QMatrix *W, const float *bias, int T);
void matmul_backward_tiles(float *dinp, const float *dout, const QMatrix *W, int T);
// out[t, o0 + n] = stage[n * TP + t] (+ bias) for n < nrows, every token: a block of finished rows.
void fwd_flush(const Fwd *f, const float *stage, int o0, int nrows);
void fwd_tile_c(const Fwd *f, const FwdTile *tl, int M);
void bwd_tile_c(const Bwd *b, const BwdTile *tl, int M);
float dot_f32_c(const float *a, const float *b, int n);
void axpy_f32_c(float *y, float a, const float *x, int n);
void to_bf16_pairs_c(uint32_t *out, const float *in, int n);
void to_bf16_interleaved_c(uint32_t *out, const float *a, const float *b, int n);

// --- The instruction sets: each returns 0 (did nothing) where it has no version for the type ----

#if HAVE_AVX512  // avx512.c
int dequantize_span_avx512(Type type, float *out, const uint8_t *row, int i0, int n);
int row_dot_avx512(float *s, Type type, const uint8_t *row, const float *x, int n);
float dot_f32_avx512(const float *a, const float *b, int n);
void axpy_f32_avx512(float *y, float a, const float *x, int n);
void fwd_tile_avx512(const Fwd *f, const FwdTile *tl, int M);
void bwd_tile_avx512(const Bwd *b, const BwdTile *tl, int M);
int fwd_flush_avx512(const Fwd *f, const float *stage, int o0, int nrows);  // returns the tokens done
// dst[k * ldd + j] = src[j * ld + k] for j < 16, k < n (n a multiple of 16)
void transpose_words16(uint32_t *dst, size_t ldd, const uint32_t *src, size_t ld, int n);
#endif
#if HAVE_BF16_DOT  // avx512.c
void to_bf16_pairs_avx512(uint32_t *out, const float *in, int n);
void to_bf16_interleaved_avx512(uint32_t *out, const float *a, const float *b, int n);
#endif
#if HAVE_INT16_DOT  // avx512_vnni.c
int int16_tiles_type(Type type, int IN);  // matmul_int16 takes W: 1, or 0
int int16_rows_type(Type type, int IN);   // matmul_rows16 takes W: 1, or 0
void matmul_int16(float *out, const float *inp, const QMatrix *W, const float *bias, int T);
void matmul_rows16(float *out, const float *inp, const QMatrix *W, const float *bias, int T);
int int8_tiles_type(Type type, int IN);   // matmul_int8 takes W: 1, or 0
void matmul_int8(float *out, const float *inp, const QMatrix *W, const float *bias, int T);
int int8_rows_type(Type type, int IN);    // matmul_rows8 takes W: 1, or 0 (always 0 without HAVE_INT8_ROWS)
#if HAVE_INT8_ROWS
void matmul_rows8(float *out, const float *inp, const QMatrix *W, const float *bias, int T);
#endif
#endif
#if HAVE_AMX  // amx.c
int amx_on(void);            // the AMX route runs (decided once per process)
const char *amx_why(void);   // why it does or does not
void matmul_amx(float *out, const float *inp, const QMatrix *W, const float *bias, int T);
void matmul_backward_amx(float *dinp, const float *dout, const QMatrix *W, int T);
#endif
#if HAVE_AVX2  // avx2.c
int dequantize_span_avx2(Type type, float *out, const uint8_t *row, int i0, int n);
int row_dot_avx2(float *s, Type type, const uint8_t *row, const float *x, int n);
float dot_f32_avx2(const float *a, const float *b, int n);
void axpy_f32_avx2(float *y, float a, const float *x, int n);
void fwd_tile_avx2(const Fwd *f, const FwdTile *tl, int M);
void bwd_tile_avx2(const Bwd *b, const BwdTile *tl, int M);
int fwd_flush_avx2(const Fwd *f, const float *stage, int o0, int nrows);
#endif
#if HAVE_NEON  // neon.c
int dequantize_span_neon(Type type, float *out, const uint8_t *row, int i0, int n);
int row_dot_neon(float *s, Type type, const uint8_t *row, const float *x, int n);
float dot_f32_neon(const float *a, const float *b, int n);
void axpy_f32_neon(float *y, float a, const float *x, int n);
void fwd_tile_neon(const Fwd *f, const FwdTile *tl, int M);
void bwd_tile_neon(const Bwd *b, const BwdTile *tl, int M);
#endif

#endif
