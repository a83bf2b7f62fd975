// quant.h: tensor element types (ggml's numbering, as stored in GGUF files), their block formats
// drawn byte by byte, and the matrix products of the model over frozen, possibly quantized, weights.
//
// Where things live:
//   quant.c            the types, the formats' decoders and encoders, and the definitions of the
//                      products (matmul_ref, matmul_backward_input_ref: plain loops, no #if)
//   kernels/dispatch.c matmul and matmul_backward_input: the one place that chooses how a product
//                      runs (matmul_route), and the instruction set of each piece
//   kernels/           the fast products: tiles.c (the tiling drivers, the few-token rows, the same
//                      tiles in plain C), one file per instruction set (avx512.c, avx512_vnni.c,
//                      amx.c, avx2.c, neon.c), kernels.h (what they share)
// Every fast product has the signature of its _ref definition; make debug and make test-ref
// (-DSFT_REF) use the definitions everywhere. Tests: test/test_quant.c.
#ifndef QUANT_H
#define QUANT_H

#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

// ggml's type ids (ggml.h, enum ggml_type). These numbers are what GGUF files store.
typedef enum {
    TYPE_F32 = 0,
    TYPE_F16 = 1,
    TYPE_Q4_0 = 2,
    TYPE_Q4_1 = 3,
    TYPE_Q5_0 = 6,
    TYPE_Q5_1 = 7,
    TYPE_Q8_0 = 8,
    TYPE_Q4_K = 12,
    TYPE_Q5_K = 13,
    TYPE_Q6_K = 14,
    TYPE_BF16 = 30,
    TYPE_NF4 = 200,  // bitsandbytes' QLoRA 4-bit NormalFloat: in memory only, never in a GGUF file
} Type;

// ---------------------------------------------------------------------------------------------
// Block formats. Halves are little-endian IEEE fp16 ("d"), as in ggml-common.h. quant.c decodes
// them (dequantize_row) and encodes them (quantize_row); kernels/ decodes them in SIMD registers.

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

// The 16 NormalFloat-4 values of bitsandbytes (functional.py, get_4bit_type("nf4")), in quant.c.
extern const float NF4_CODE[16];

// The 32-bit little-endian word at p (Q5_0's and Q5_1's qh).
static inline uint32_t load_u32le(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

// Scale and min of group j (0..7) of a Q4_K/Q5_K block: groups 0-3 take the low 6 bits of
// bytes j and j+4; groups 4-7 take a nibble of byte j+4 and the top 2 bits of bytes j-4 and j.
static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

// ---------------------------------------------------------------------------------------------
// Types, conversions and products.

// Name ("q4_0"), elements per block and bytes per block of a type; NULL for an unknown id.
typedef struct {
    const char *name;
    int block;        // elements per block (1 for F32/F16/BF16)
    size_t bytes;     // bytes per block
} TypeInfo;
const TypeInfo *type_info(int type);

// Type id from a name as used on the command line ("q4_0", "nf4", "f32", ...), or -1.
int type_from_name(const char *name);

// Bytes of a row of n elements; 0 when n is not a multiple of the block size or on overflow.
size_t row_bytes(int type, int64_t n);

// Conversions of single halves.
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);
// bf16 is the top half of a float; inline, so that loops over arrays vectorize.
static inline float bf16_to_fp32(uint16_t h) {
    uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

static inline uint16_t fp32_to_bf16(float f) {  // round to nearest even, as PyTorch does
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t nan = (x & 0x7fffffff) > 0x7f800000;  // quiet NaN, else rounded
    return (uint16_t)(nan ? (x >> 16) | 0x40 : (x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

// out[n] = the values of one row in[row_bytes(type, n)], n a multiple of the block size.
// Bit-exact with ggml's dequantize_row_* for every type in Type.
void dequantize_row(int type, float *out, const void *in, int64_t n);

// out[row_bytes(type, n)] = in[n] quantized. Supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0,
// NF4 (Q4_0/Q4_1/Q5_0/Q8_0 match ggml's quantize_row_*_ref), and Q4_K, Q5_K, Q6_K with simpler
// rules than ggml's (same format, different bytes). Returns -1 for other types (Q5_1).
int quantize_row(int type, void *out, const float *in, int64_t n);

// A frozen weight matrix W[rows, cols] stored row after row in its own type:
// row r starts at data + r * row_bytes(type, cols).
typedef struct {
    Type type;
    int rows;          // OUT: output features
    int cols;          // IN: input features, a multiple of the type's block size
    const void *data;  // rows * row_bytes(type, cols) bytes (mapped from a file or owned elsewhere)
} QMatrix;

// The bytes of row r of W.
static inline const uint8_t *qmatrix_row_data(const QMatrix *W, int r) {
    return (const uint8_t *)W->data + (size_t)r * row_bytes(W->type, W->cols);
}

// The fast products (kernels/) run on the thread pool (threads.h) and use its scratch memory: call them
// from one thread at a time, not from inside a parallel_for chunk. Their results do not depend
// on the number of threads; they differ from the _ref versions by the rounding of the factors
// to bf16 (when T is large enough, see kernels/dispatch.c), within the bounds tested in test/test_quant.c.

// out[T, OUT] = inp[T, IN] @ W[OUT, IN]^T (+ bias[OUT] when bias is not NULL).
void matmul(float *out, const float *inp, const QMatrix *W, const float *bias, int T);
// The same product for inference only (the prompts of generate and chat, never a loss or a
// gradient): where this build has it, with 8-bit activations (ROUTE_INT8_TILES), faster and less
// exact; otherwise matmul.
void matmul_inference(float *out, const float *inp, const QMatrix *W, const float *bias, int T);
void matmul_ref(float *out, const float *inp, const QMatrix *W, const float *bias, int T);

// dinp[T, IN] += dout[T, OUT] @ W[OUT, IN]: the input gradient through a frozen matrix,
// dequantizing blocks on the fly, never a whole matrix.
void matmul_backward_input(float *dinp, const float *dout, const QMatrix *W, int T);
void matmul_backward_input_ref(float *dinp, const float *dout, const QMatrix *W, int T);

// What the fast products do in this build on this CPU (the tests choose their bounds by it).
typedef struct {
    int bf16;    // many tokens, quantized weights: both factors rounded to bf16 (AVX512-BF16)
    int int16;   // AVX512-VNNI: forward products on 16-bit integer activations (see Route)
    int amx;     // the bf16 products run on AMX tiles (decided at run time; SFT_NO_AMX=1: never)
} Kernels;
Kernels kernels(void);

// The same in words ("avx512-bf16 ...", "avx2-fma ...", "reference ...", ...), for sft info and
// the training plan.
const char *kernel_path(void);

// The arithmetic of one product: what matmul, matmul_backward_input or matmul_inference does for W
// and T tokens in this build on this CPU (they dispatch by it), and so the error bound it must meet
// (test/test_quant.c).
typedef enum {
    ROUTE_FP32,         // fp32 sums of exact fp32 products (the definitions, F32 weights, CPUs
                        // without AVX512-BF16, few tokens)
    ROUTE_BF16,         // both factors rounded to bf16 (vdpbf16ps), fp32 sums
    ROUTE_AMX,          // the same on AMX tiles
    ROUTE_INT16_TILES,  // exact weights, activations in 14-bit integers per token and K-chunk
    ROUTE_INT16_ROWS,   // exact weights, activations in 16-bit integers per block of 32 (T < 5)
    ROUTE_INT8_TILES,   // exact weights, activations in 8-bit integers per block of 32 (inference)
    ROUTE_INT8_ROWS,    // the same for T < 5 (inference: generation)
} Route;
typedef enum { PRODUCT_FORWARD, PRODUCT_BACKWARD, PRODUCT_INFERENCE } Product;
Route matmul_route(const QMatrix *W, int T, Product product);

// out[C] = row r of W dequantized (embedding lookup).
void qmatrix_row(float *out, const QMatrix *W, int r);

#endif
