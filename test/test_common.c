// test_common.c: overflow-safe sizes, whole-file reads, the counter-based random draws.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "../common.h"
#include "test.h"

void test_common(void) {
    size_t r = 0;
    check(size_mul(&r, SIZE_MAX / 2, 3) == -1, "size_mul overflow", "accepted");
    check(size_mul(&r, 151936, 896) == 0 && r == (size_t)151936 * 896, "size_mul", "got %zu", r);
    check(size_add(&r, SIZE_MAX, 1) == -1, "size_add overflow", "accepted");
    Err e;
    char *s = read_file("test/tmp/does-not-exist", NULL, &e);
    check(s == NULL && e.msg[0] != 0, "read_file missing file", "no error");
    // rng_hash_bits: the dropout masks, 32 draws at a time, against rng_hash_uniform one by one
    const float ps[] = {0.0f, 0.05f, 0.1f, 0.5f, 0.999f, 1.0f};
    const int ns[] = {1, 31, 32, 37, 896, 4864};
    int bad = 0, first_n = 0, first_i = 0;
    float first_p = 0;
    for (size_t a = 0; a < sizeof ps / sizeof ps[0]; a++)
        for (size_t b = 0; b < sizeof ns / sizeof ns[0]; b++) {
            uint32_t bits[4864 / 32 + 1];
            memset(bits, 0xff, sizeof bits);
            rng_hash_bits(bits, 1000 + a, 17, b, ns[b], ps[a]);
            for (int i = 0; i < (ns[b] + 31) / 32 * 32; i++) {
                int want = i < ns[b] && rng_hash_uniform(1000 + a, 17, b, (uint64_t)i) >= ps[a];
                if ((int)(bits[i / 32] >> (i % 32) & 1) != want && bad++ == 0) first_n = ns[b], first_i = i, first_p = ps[a];
            }
        }
    check(bad == 0, "rng_hash_bits matches rng_hash_uniform >= p (bits past n clear)",
          "%d mismatches, first at n %d, i %d, p %g", bad, first_n, first_i, first_p);
}
