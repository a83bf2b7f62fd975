// test_common.c: overflow-safe sizes and whole-file reads.
#include <stdint.h>
#include <stdlib.h>
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
}
