// test_common.c: overflow-safe sizes, whole-file reads, the counter-based random draws.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "../common.h"
#include "../sha256.h"
#include "test.h"

// SHA-256 against FIPS 180-4's examples: empty, one block, two blocks (56 bytes: the length
// spills into a second padding block), and a million 'a' fed in uneven pieces.
static void test_sha256(void) {
    static const char *const msg[3] = {"", "abc", "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"};
    static const char *const want[4] = {
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"};
    char hex[65];
    for (int i = 0; i < 3; i++) {
        sha256_hex(hex, msg[i], strlen(msg[i]));
        check(strcmp(hex, want[i]) == 0, "sha256 of a FIPS 180-4 example", "'%s': got %s", msg[i], hex);
    }
    char *a = malloc(1000000);
    memset(a, 'a', 1000000);
    Sha256 s;
    unsigned char d[32];
    sha256_init(&s);
    for (size_t at = 0, n = 1; at < 1000000; at += n, n = n * 3 % 997 + 1)
        sha256_update(&s, a + at, at + n > 1000000 ? 1000000 - at : n);
    sha256_final(&s, d);
    for (int i = 0; i < 32; i++) snprintf(hex + 2 * i, 3, "%02x", d[i]);
    check(strcmp(hex, want[3]) == 0, "sha256 of a million 'a' in uneven pieces", "got %s", hex);
    free(a);
}

void test_common(void) {
    test_sha256();
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
