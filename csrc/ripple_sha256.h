/* SHA-256 (ripple_sha256.c), for the digests a ripple-packed file carries. */
#pragma once

#include <stddef.h>
#include <stdint.h>

typedef struct ripple_sha256 {
    uint32_t h[8];
    uint64_t len;
    uint8_t  buf[64];
    size_t   fill;
} ripple_sha256;
void ripple_sha256_init(ripple_sha256 * s);
void ripple_sha256_update(ripple_sha256 * s, const void * data, size_t n);
void ripple_sha256_hex(ripple_sha256 * s, char out[65]);
