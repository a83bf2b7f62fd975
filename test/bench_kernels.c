// bench_kernels.c: GFLOP/s of matmul and matmul_backward_input (fast and _ref) on the matrix
// shapes of Qwen2.5-0.5B's MLP, for the main weight types, 1 and 2 threads. Not part of
// `make test`; build it by hand (or through `make bench`):
//   cc -O2 -march=native -std=c11 -D_POSIX_C_SOURCE=200809L -pthread -o /tmp/bk
//      test/bench_kernels.c quant.c kernels/*.c threads.c common.c -lm
//   /tmp/bk            full table (the _ref timings take a minute)
//   /tmp/bk --no-ref   fast kernels only
// One line per (type, shape, T, direction): GFLOP/s at 1 and 2 threads and the speed-up over _ref
// (single-threaded). FLOPs are 2 * T * OUT * IN per product.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
    int T, backward, ref;
} Job;

static void run(const Job *j) {
    if (j->backward) {
        if (j->ref) matmul_backward_input_ref(j->dinp, j->dout, j->W, j->T);
        else matmul_backward_input(j->dinp, j->dout, j->W, j->T);
    } else {
        if (j->ref) matmul_ref(j->out, j->inp, j->W, NULL, j->T);
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

int main(int argc, char **argv) {
    int with_ref = !(argc > 1 && strcmp(argv[1], "--no-ref") == 0);
    const int types[] = {TYPE_Q4_0, TYPE_Q8_0, TYPE_Q4_K, TYPE_Q6_K, TYPE_F32};
    const int shapes[2][2] = {{4864, 896}, {896, 4864}};  // [OUT, IN]: gate/up, down
    const int Ts[] = {1, 128};
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
                for (int backward = 0; backward < 2; backward++) {
                    Job j = {&W, out, inp, dout, dinp, T, backward, 0};
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
                           backward ? "backward" : "forward", flop / t1 * 1e-9, flop / t2 * 1e-9);
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
