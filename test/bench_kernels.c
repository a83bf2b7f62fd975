// bench_kernels.c: GFLOP/s of matmul and matmul_backward_input (fast and _ref) on the matrix
// shapes of Qwen2.5-0.5B's MLP, for the main weight types, 1 and 2 threads. Not part of
// `make test`; build it by hand (or through `make bench`):
//   cc -O2 -march=native -std=c11 -D_POSIX_C_SOURCE=200809L -pthread -o /tmp/bk
//      test/bench_kernels.c quant.c kernels/*.c threads.c common.c -lm
//   /tmp/bk            full table (the _ref timings take a minute)
//   /tmp/bk --no-ref   fast kernels only
//   /tmp/bk --ceilings the memory bandwidth and the dot-product peaks only
// One line per (type, shape, T, product: forward, backward, and the inference forward where it
// takes another route): GFLOP/s at 1 and 2 threads and the speed-up over _ref
// (single-threaded). FLOPs are 2 * T * OUT * IN per product. First, the machine's ceilings that
// the products are measured against: the read bandwidth of memory (what a product of one token,
// which reads every weight once, cannot beat: test/bench's generation prints the bytes of weights
// it reads a second) and, on AVX-512, the peaks of the dot-product instructions that the tiles
// are made of (what T = 128 cannot beat) and of llama.cpp's 8-bit one.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#include "../common.h"
#include "../quant.h"
#include "../threads.h"

// A matrix of random values in `type`: quantized from normal floats where quantize_row can,
// else random bytes with small positive scales written over the scale fields.
static uint8_t *bench_matrix(int type, int rows, int cols, uint64_t seed) {
    size_t rb = row_bytes(type, cols), n = rb * (size_t)rows;
    uint8_t *m = xmalloc(n);
    float *row = xmalloc((size_t)cols * sizeof(float));
    if (quantize_row(type, m, row, 0) == 0) {
        for (int r = 0; r < rows; r++) {
            for (int c = 0; c < cols; c++) row[c] = rng_normal(&seed) * 0.05f;
            quantize_row(type, m + (size_t)r * rb, row, cols);
        }
    } else {
        for (size_t i = 0; i < n; i++) m[i] = (uint8_t)rng_next(&seed);
        size_t bytes = type_info(type)->bytes, at = type == TYPE_Q6_K ? 208 : 0;
        uint16_t h = fp32_to_fp16(0.001f);
        for (size_t b = 0; b < n / bytes; b++) {
            memcpy(m + b * bytes + at, &h, 2);
            if (type == TYPE_Q4_K || type == TYPE_Q5_K) memcpy(m + b * bytes + 2, &h, 2);
        }
    }
    free(row);
    return m;
}

typedef struct {
    const QMatrix *W;
    float *out, *inp, *dout, *dinp;
    int T;
    Product product;
    int ref;
} Job;

static void run(const Job *j) {
    if (j->product == PRODUCT_BACKWARD) {
        if (j->ref) matmul_backward_input_ref(j->dinp, j->dout, j->W, j->T);
        else matmul_backward_input(j->dinp, j->dout, j->W, j->T);
    } else {
        if (j->ref) matmul_ref(j->out, j->inp, j->W, NULL, j->T);
        else if (j->product == PRODUCT_INFERENCE) matmul_inference(j->out, j->inp, j->W, NULL, j->T);
        else matmul(j->out, j->inp, j->W, NULL, j->T);
    }
}

// Seconds per call: the fastest of the calls made in `min_s` seconds (after one warm-up call);
// the fastest, because the machine may be shared.
static double seconds_per_call(const Job *j, double min_s) {
    run(j);
    double start = now_seconds(), best = 1e30;
    do {
        double t0 = now_seconds();
        run(j);
        double dt = now_seconds() - t0;
        best = dt < best ? dt : best;
    } while (now_seconds() - start < min_s);
    return best;
}

typedef struct {
    const uint64_t *a;
    uint64_t sums[64];  // one per 4M-word chunk
} ReadJob;

static void read_range(void *ctx, int c0, int c1) {
    ReadJob *r = ctx;
    for (int c = c0; c < c1; c++) {
        uint64_t s[8] = {0};
        const uint64_t *p = r->a + ((size_t)c << 22);
        for (size_t i = 0; i < (1u << 22); i += 8)
            for (int k = 0; k < 8; k++) s[k] += p[i + k];
        r->sums[c] = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
    }
}

// GB/s of reading 512 MB (far past the caches) with `threads` threads: the best of 5 passes.
static double read_bandwidth(const uint64_t *a, int threads) {
    ReadJob r = {a, {0}};
    threads_init(threads);
    double best = 1e30;
    for (int pass = 0; pass < 5; pass++) {
        double t0 = now_seconds();
        parallel_for(read_range, &r, 16, 1);
        double dt = now_seconds() - t0;
        best = dt < best ? dt : best;
    }
    return 16.0 * (1u << 22) * 8 / best * 1e-9;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
// GFLOP/s of one core issuing only one dot-product instruction: vpdpwssd (which == 0: 16-bit
// integer pairs, the forward tiles), vdpbf16ps (1: bf16 pairs, the backward tiles) or vpdpbusd
// (2: 8-bit quads, llama.cpp's products, 64 multiply-adds an instruction where the others do 32):
// 12 independent sums. Twelve named variables, not an array: gcc keeps those in registers.
static double dot_peak(int which) {
    const long n = 20000000;
    __m512i a = _mm512_set1_epi16(3), b = _mm512_set1_epi16(5);
    __m512i c0 = _mm512_set1_epi32(0), c1 = _mm512_set1_epi32(1), c2 = _mm512_set1_epi32(2), c3 = _mm512_set1_epi32(3);
    __m512i c4 = _mm512_set1_epi32(4), c5 = _mm512_set1_epi32(5), c6 = _mm512_set1_epi32(6), c7 = _mm512_set1_epi32(7);
    __m512i c8 = _mm512_set1_epi32(8), c9 = _mm512_set1_epi32(9), c10 = _mm512_set1_epi32(10), c11 = _mm512_set1_epi32(11);
    __m512bh x = (__m512bh)a, y = (__m512bh)b;
    __m512 f0 = _mm512_set1_ps(0), f1 = _mm512_set1_ps(1), f2 = _mm512_set1_ps(2), f3 = _mm512_set1_ps(3);
    __m512 f4 = _mm512_set1_ps(4), f5 = _mm512_set1_ps(5), f6 = _mm512_set1_ps(6), f7 = _mm512_set1_ps(7);
    __m512 f8 = _mm512_set1_ps(8), f9 = _mm512_set1_ps(9), f10 = _mm512_set1_ps(10), f11 = _mm512_set1_ps(11);
    double t0 = now_seconds();
    for (long k = 0; k < n && which == 0; k++) {
        c0 = _mm512_dpwssd_epi32(c0, a, b), c1 = _mm512_dpwssd_epi32(c1, a, b), c2 = _mm512_dpwssd_epi32(c2, a, b);
        c3 = _mm512_dpwssd_epi32(c3, a, b), c4 = _mm512_dpwssd_epi32(c4, a, b), c5 = _mm512_dpwssd_epi32(c5, a, b);
        c6 = _mm512_dpwssd_epi32(c6, a, b), c7 = _mm512_dpwssd_epi32(c7, a, b), c8 = _mm512_dpwssd_epi32(c8, a, b);
        c9 = _mm512_dpwssd_epi32(c9, a, b), c10 = _mm512_dpwssd_epi32(c10, a, b), c11 = _mm512_dpwssd_epi32(c11, a, b);
    }
    for (long k = 0; k < n && which == 2; k++) {
        c0 = _mm512_dpbusd_epi32(c0, a, b), c1 = _mm512_dpbusd_epi32(c1, a, b), c2 = _mm512_dpbusd_epi32(c2, a, b);
        c3 = _mm512_dpbusd_epi32(c3, a, b), c4 = _mm512_dpbusd_epi32(c4, a, b), c5 = _mm512_dpbusd_epi32(c5, a, b);
        c6 = _mm512_dpbusd_epi32(c6, a, b), c7 = _mm512_dpbusd_epi32(c7, a, b), c8 = _mm512_dpbusd_epi32(c8, a, b);
        c9 = _mm512_dpbusd_epi32(c9, a, b), c10 = _mm512_dpbusd_epi32(c10, a, b), c11 = _mm512_dpbusd_epi32(c11, a, b);
    }
    for (long k = 0; k < n && which == 1; k++) {
        f0 = _mm512_dpbf16_ps(f0, x, y), f1 = _mm512_dpbf16_ps(f1, x, y), f2 = _mm512_dpbf16_ps(f2, x, y);
        f3 = _mm512_dpbf16_ps(f3, x, y), f4 = _mm512_dpbf16_ps(f4, x, y), f5 = _mm512_dpbf16_ps(f5, x, y);
        f6 = _mm512_dpbf16_ps(f6, x, y), f7 = _mm512_dpbf16_ps(f7, x, y), f8 = _mm512_dpbf16_ps(f8, x, y);
        f9 = _mm512_dpbf16_ps(f9, x, y), f10 = _mm512_dpbf16_ps(f10, x, y), f11 = _mm512_dpbf16_ps(f11, x, y);
    }
    double dt = now_seconds() - t0;
    __m512i ci = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
                                  _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7)));
    ci = _mm512_add_epi32(ci, _mm512_add_epi32(_mm512_add_epi32(c8, c9), _mm512_add_epi32(c10, c11)));
    __m512 cf = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(f0, f1), _mm512_add_ps(f2, f3)),
                              _mm512_add_ps(_mm512_add_ps(f4, f5), _mm512_add_ps(f6, f7)));
    cf = _mm512_add_ps(cf, _mm512_add_ps(_mm512_add_ps(f8, f9), _mm512_add_ps(f10, f11)));
    volatile float sink = (float)_mm512_reduce_add_epi32(ci) + _mm512_reduce_add_ps(cf);  // keeps the sums
    (void)sink;
    return 12.0 * 2 * (which == 2 ? 64 : 32) * n / dt * 1e-9;
}
#endif

static void print_ceilings(void) {
    size_t words = (size_t)16 << 22;
    uint64_t *a = xmalloc(words * sizeof(uint64_t));
    for (size_t i = 0; i < words; i++) a[i] = i;
    printf("memory read bandwidth: %.1f GB/s (1 thread), %.1f GB/s (2 threads)\n", read_bandwidth(a, 1),
           read_bandwidth(a, 2));
    free(a);
#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
    printf("peak of one core: vpdpwssd %.1f GFLOP/s, vdpbf16ps %.1f GFLOP/s, vpdpbusd %.1f GFLOP/s\n", dot_peak(0),
           dot_peak(1), dot_peak(2));
#endif
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--ceilings") == 0) {
        print_ceilings();
        threads_free();
        return 0;
    }
    int with_ref = !(argc > 1 && strcmp(argv[1], "--no-ref") == 0);
    const int types[] = {TYPE_Q4_0, TYPE_Q8_0, TYPE_Q4_K, TYPE_Q6_K, TYPE_F32};
    const int shapes[2][2] = {{4864, 896}, {896, 4864}};  // [OUT, IN]: gate/up, down
    const int Ts[] = {1, 128};
    print_ceilings();
    printf("%-5s %-11s %4s %-8s %9s %9s %9s\n", "type", "[OUT x IN]", "T", "product", "1 thread", "2 threads", "fast/ref");
    for (size_t a = 0; a < sizeof types / sizeof types[0]; a++) {
        for (int s = 0; s < 2; s++) {
            int OUT = shapes[s][0], IN = shapes[s][1];
            uint8_t *data = bench_matrix(types[a], OUT, IN, 1 + a);
            QMatrix W = {types[a], OUT, IN, data};
            for (size_t b = 0; b < sizeof Ts / sizeof Ts[0]; b++) {
                int T = Ts[b];
                uint64_t seed = 7;
                float *inp = xmalloc((size_t)T * IN * sizeof(float)), *dinp = xcalloc((size_t)T * IN, sizeof(float));
                float *out = xmalloc((size_t)T * OUT * sizeof(float)), *dout = xmalloc((size_t)T * OUT * sizeof(float));
                for (size_t i = 0; i < (size_t)T * IN; i++) inp[i] = rng_normal(&seed);
                for (size_t i = 0; i < (size_t)T * OUT; i++) dout[i] = rng_normal(&seed);
                double flop = 2.0 * T * OUT * IN;
                for (int p = PRODUCT_FORWARD; p <= PRODUCT_INFERENCE; p++) {
                    if (p == PRODUCT_INFERENCE && matmul_route(&W, T, p) == matmul_route(&W, T, PRODUCT_FORWARD)) continue;
                    Job j = {&W, out, inp, dout, dinp, T, (Product)p, 0};
                    threads_init(1);
                    double t1 = seconds_per_call(&j, 0.5);
                    threads_init(2);
                    double t2 = seconds_per_call(&j, 0.5);
                    double tr = 0;
                    if (with_ref) {
                        threads_init(1);
                        j.ref = 1;
                        tr = seconds_per_call(&j, 0.05);
                    }
                    char shape[32];
                    snprintf(shape, sizeof shape, "[%d x %d]", OUT, IN);
                    printf("%-5s %-11s %4d %-8s %9.1f %9.1f", type_info(types[a])->name, shape, T,
                           p == PRODUCT_BACKWARD ? "backward" : p == PRODUCT_INFERENCE ? "infer" : "forward", flop / t1 * 1e-9, flop / t2 * 1e-9);
                    if (with_ref) printf(" %8.1fx", tr / t1);
                    printf("\n");
                    fflush(stdout);
                }
                free(inp), free(dinp), free(out), free(dout);
            }
            free(data);
        }
    }
    threads_free();
    return 0;
}
