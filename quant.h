// quant.h: tensor element types (ggml's numbering, as stored in GGUF files), block formats,
// and the matrix products of the model over frozen, possibly quantized, weights.
//
// Every kernel has a plain scalar _ref version, the definition; a fast version with the same
// signature may exist and is chosen inside quant.c (make debug uses the _ref versions).
#ifndef QUANT_H
#define QUANT_H

#include <stddef.h>
#include <stdint.h>

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
float bf16_to_fp32(uint16_t h);
uint16_t fp32_to_bf16(float f);  // round to nearest even, as PyTorch does

// out[n] = the values of one row in[row_bytes(type, n)], n a multiple of the block size.
// Bit-exact with ggml's dequantize_row_* for every type in Type.
void dequantize_row(int type, float *out, const void *in, int64_t n);

// out[row_bytes(type, n)] = in[n] quantized. Supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0, NF4
// (Q4_0/Q4_1/Q8_0 match ggml's quantize_row_*_ref), and Q4_K, Q5_K, Q6_K with simpler rules than
// ggml's (same format, different bytes). Returns -1 for other types (Q5_0, Q5_1).
int quantize_row(int type, void *out, const float *in, int64_t n);

// A frozen weight matrix W[rows, cols] stored row after row in its own type:
// row r starts at data + r * row_bytes(type, cols).
typedef struct {
    int type;
    int rows;          // OUT: output features
    int cols;          // IN: input features, a multiple of the type's block size
    const void *data;  // rows * row_bytes(type, cols) bytes (mapped from a file or owned elsewhere)
} QMatrix;

// The fast products run on the thread pool (threads.h) and use its scratch memory: call them
// from one thread at a time, not from inside a parallel_for chunk. Their results do not depend
// on the number of threads; they differ from the _ref versions by the rounding of the factors
// to bf16 (when T is large enough, see quant.c), within the bounds tested in test/test_quant.c.

// out[T, OUT] = inp[T, IN] @ W[OUT, IN]^T (+ bias[OUT] when bias is not NULL).
void matmul(float *out, const float *inp, const QMatrix *W, const float *bias, int T);
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

// The arithmetic of one product: what matmul (backward = 0) or matmul_backward_input (1) does for
// W and T tokens in this build on this CPU (they dispatch by it), and so the error bound it must
// meet (test/test_quant.c).
typedef enum {
    ROUTE_FP32,         // fp32 sums of exact fp32 products (the definitions, F32 weights, CPUs
                        // without AVX512-BF16, few tokens)
    ROUTE_BF16,         // both factors rounded to bf16 (vdpbf16ps), fp32 sums
    ROUTE_AMX,          // the same on AMX tiles
    ROUTE_INT16_TILES,  // exact weights, activations in 14-bit integers per token and K-chunk
    ROUTE_INT16_ROWS,   // exact weights, activations in 16-bit integers per block of 32 (T < 5)
} Route;
Route matmul_route(const QMatrix *W, int T, int backward);

// out[C] = row r of W dequantized (embedding lookup).
void qmatrix_row(float *out, const QMatrix *W, int r);

#endif
