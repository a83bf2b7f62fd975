// vec.h: the small float helpers that model.c, attention.c and lora.c share: sums in LANES
// lanes (which compilers keep in vector registers), a vectorizable e^x, and index helpers.
// Plain C: the compiler vectorizes the loops at -O2; the order of every sum is fixed, so results
// do not depend on the compiler or the thread count.
#ifndef VEC_H
#define VEC_H

#include <stdint.h>
#include <string.h>

#define LANES 16               // floats summed side by side in the vectorized loops (one AVX-512 register;
                               // lanes_sum and the tiles of attention are written for 16)


static inline float dot(const float *a, const float *b, int n) {
    float s[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k] * b[i + k];
    for (; i < n; i++) s[0] += a[i] * b[i];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// y[n] += a x[n]; blocks of 8 so that compilers vectorize it at -O2
static inline void axpy(float *restrict y, float a, const float *restrict x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) y[i + k] += a * x[i + k];
    for (; i < n; i++) y[i] += a * x[i];
}

static inline int min_int(int a, int b) { return a < b ? a : b; }

// Sum of the lanes a[LANES], in a fixed tree.
static inline float lanes_sum(const float *a) {
    float s[LANES / 2];
    for (int k = 0; k < LANES / 2; k++) s[k] = a[k] + a[k + LANES / 2];
    for (int k = 0; k < LANES / 4; k++) s[k] += s[k + LANES / 4];
    return (s[0] + s[2]) + (s[1] + s[3]);
}

// y[LANES] += scale * a[LANES]
static inline void lanes_add(float *y, const float *a, float scale) {
    for (int k = 0; k < LANES; k++) y[k] += scale * a[k];
}

// e^x in plain float arithmetic, for the softmaxes and SiLU: loops over it vectorize, which a libm
// call prevents. x = n ln2 + r with |r| <= ln2 / 2 (n rounded by adding 1.5 * 2^23, which leaves
// it in t's low bits), e^r by the polynomial of Cephes' expf (relative error ~1e-7), 2^n written
// into the exponent bits. x is clamped to [-87, 88] so that 2^n stays a normal float: e^-inf
// gives 1.6e-38 rather than 0 (every caller only adds it or scales by it); NaN stays NaN.
static inline float exp_f(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float t = x * 1.44269504f + 12582912.0f, n = t - 12582912.0f;
    float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts, so that n ln2 is exact
    float p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
               1.6666665459e-1f) * r + 5.0000001201e-1f;
    uint32_t bits;
    memcpy(&bits, &t, sizeof bits);                // 0x4B400000 + n
    bits = (bits - 0x4B400000u + 127u) << 23;      // 2^n
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return (p * (r * r) + r + 1.0f) * scale;
}


// Columns of the transposed arrays: n rounded up to LANES.
static inline int padded(int n) { return (n + LANES - 1) / LANES * LANES; }

#endif
