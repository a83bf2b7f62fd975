// sha256.h: SHA-256 (FIPS 180-4), for the checksums of checkpoints (train.c), written in the
// format of `sha256sum` so that `sha256sum -c checksums.sha256` checks them too.
//
// Leaves out: HMAC and every other hash. Plain C, one block at a time; about 300 MB/s.
#ifndef SHA256_H
#define SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t h[8];            // the chaining state
    unsigned char block[64];  // bytes not yet compressed
    size_t fill;              // bytes in block
    uint64_t bytes;           // bytes hashed so far
} Sha256;

void sha256_init(Sha256 *s);
void sha256_update(Sha256 *s, const void *data, size_t n);
void sha256_final(Sha256 *s, unsigned char digest[32]);
// hex[65] = the lowercase hex digest of data[n], NUL-terminated.
void sha256_hex(char hex[65], const void *data, size_t n);

#endif
