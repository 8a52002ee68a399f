/* CRC32C pieces (ripple_crc.c; the whole-buffer and block forms are in ripple.h). */
#pragma once

#include <stddef.h>
#include <stdint.h>

/* out[i] = CRC32C of the len bytes at base + (idx ? idx[i] : i) * stride, for i < n */
void ripple_crc32c_pieces(const uint8_t * base, size_t stride, size_t len, const int64_t * idx, int64_t n,
                          uint32_t * out);
