/* Split down columns (docs/FORMAT.md section 3): which ggml types can be split, and the one
 * unpacking of their blocks into the stored integers and the per-group (scale, min) pairs, used by
 * the converter (through ripple_split_rows), the file reader's table check and the registry.
 *
 * Written from the block layouts ggml documents in ggml-common.h and dequantizes in
 * dequantize_row_* (ggml-quants.c); the pairs are computed with the same float operations as
 * those functions, so scale * (q - offset) + min is bit for bit ggml's value. */
#include "ripple.h"

#include "ggml.h"

#include <string.h>

#define QK_K 256

int ripple_split_info(int32_t type, int32_t * bits, int32_t * offset, int32_t * group, int32_t * has_min) {
    int32_t b, o, g, m;
    switch (type) {
        case GGML_TYPE_Q4_0: b = 4; o = 8;  g = 32; m = 0; break;
        case GGML_TYPE_Q4_1: b = 4; o = 0;  g = 32; m = 1; break;
        case GGML_TYPE_Q5_0: b = 5; o = 16; g = 32; m = 0; break;
        case GGML_TYPE_Q5_1: b = 5; o = 0;  g = 32; m = 1; break;
        case GGML_TYPE_Q8_0: b = 8; o = 0;  g = 32; m = 0; break;
        case GGML_TYPE_Q2_K: b = 2; o = 0;  g = 16; m = 1; break;
        case GGML_TYPE_Q3_K: b = 3; o = 4;  g = 16; m = 0; break;
        case GGML_TYPE_Q4_K: b = 4; o = 0;  g = 32; m = 1; break;
        case GGML_TYPE_Q5_K: b = 5; o = 0;  g = 32; m = 1; break;
        case GGML_TYPE_Q6_K: b = 6; o = 32; g = 16; m = 0; break;
        default: return 0;
    }
    if (bits) *bits = b;
    if (offset) *offset = o;
    if (group) *group = g;
    if (has_min) *has_min = m;
    return 1;
}

static float half_at(const uint8_t * p) {
    ggml_fp16_t h;
    memcpy(&h, p, sizeof(h));
    return ggml_fp16_to_fp32(h);
}

/* the 6-bit scales and minimums of Q4_K/Q5_K's eight 32-value sub-blocks, packed in 12 bytes:
 * sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (minimums); 4-7 with their low 4
 * bits in the nibbles of bytes 8-11 and their top 2 bits in the top bits of bytes 0-3 / 4-7 */
static void k4_scales(const uint8_t * s, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (uint8_t) ((s[j + 8] & 0x0F) | ((s[j] >> 6) << 4));
        mn[j + 4] = (uint8_t) ((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

/* one source block of `type`: its values' stored integers q[] (Q8_0: the int8's byte) and each
 * group's (scale, min) in sm[] */
static void split_block(int type, const uint8_t * x, uint8_t * q, float * sm) {
    switch (type) {
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1: case GGML_TYPE_Q5_0: case GGML_TYPE_Q5_1: {
            /* d (f16), [m (f16)], [qh (u32): bit j = bit 4 of value j], qs[16]: value j in the low
             * nibble of qs[j], value j + 16 in its high nibble */
            const int with_m = type == GGML_TYPE_Q4_1 || type == GGML_TYPE_Q5_1;
            const int five = type == GGML_TYPE_Q5_0 || type == GGML_TYPE_Q5_1;
            const uint8_t * qs = x + (with_m ? 4 : 2) + (five ? 4 : 0);
            uint32_t qh = 0;
            if (five) {
                memcpy(&qh, x + (with_m ? 4 : 2), 4);
            }
            for (int j = 0; j < 16; j++) {
                q[j] = (uint8_t) ((qs[j] & 0x0F) | (((qh >> j) & 1) << 4));
                q[j + 16] = (uint8_t) ((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
            }
            sm[0] = half_at(x);
            sm[1] = with_m ? half_at(x + 2) : 0.0f;
            return;
        }
        case GGML_TYPE_Q8_0: /* d (f16), qs[32] int8 */
            memcpy(q, x + 2, 32);
            sm[0] = half_at(x);
            sm[1] = 0.0f;
            return;
        case GGML_TYPE_Q2_K: {
            /* scales[16] (low nibble: scale, high nibble: minimum of 16 values), qs[64], d, dmin (f16);
             * value v: 2 bits at bit 2*((v/32)%4) of qs[32*(v/128) + v%32] */
            const uint8_t * sc = x, * qs = x + 16;
            const float d = half_at(x + 80), dmin = half_at(x + 82);
            for (int v = 0; v < QK_K; v++) {
                q[v] = (qs[32 * (v / 128) + v % 32] >> (2 * ((v / 32) % 4))) & 3;
            }
            for (int k = 0; k < 16; k++) {
                sm[2 * k] = d * (float) (sc[k] & 0x0F);
                sm[2 * k + 1] = -(dmin * (float) (sc[k] >> 4));
            }
            return;
        }
        case GGML_TYPE_Q3_K: {
            /* hmask[32], qs[64], scales[12], d (f16); value v: low 2 bits as Q2_K's, bit 2 = bit v/32 of
             * hmask[v%32] (ggml subtracts 4 when it is clear: q - 4 with q the 3-bit integer); the 16
             * 6-bit scales (stored + 32): low 4 bits in the nibbles of bytes 0-7 (scales 0-7 low, 8-15
             * high), top 2 bits of scale i at bit 2*(i/4) of byte 8 + i%4 */
            const uint8_t * hm = x, * qs = x + 32, * s = x + 96;
            const float d = half_at(x + 108);
            for (int v = 0; v < QK_K; v++) {
                q[v] = (uint8_t) (((qs[32 * (v / 128) + v % 32] >> (2 * ((v / 32) % 4))) & 3) |
                                  (((hm[v % 32] >> (v / 32)) & 1) << 2));
            }
            for (int k = 0; k < 16; k++) {
                const int lo = k < 8 ? s[k] & 0x0F : s[k - 8] >> 4;
                const int hi = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
                sm[2 * k] = d * (float) ((lo | (hi << 4)) - 32);
                sm[2 * k + 1] = 0.0f;
            }
            return;
        }
        case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K: {
            /* d, dmin (f16), scales[12], [qh[32]: bit v/32 of qh[v%32] = bit 4 of value v], qs[128]:
             * value v in the low (v%64 < 32) or high nibble of qs[32*(v/64) + v%32] */
            const int five = type == GGML_TYPE_Q5_K;
            const uint8_t * qh = x + 16, * qs = x + (five ? 48 : 16);
            const float d = half_at(x), dmin = half_at(x + 2);
            uint8_t sc[8], mn[8];
            k4_scales(x + 4, sc, mn);
            for (int v = 0; v < QK_K; v++) {
                const int nib = (qs[32 * (v / 64) + v % 32] >> (v % 64 < 32 ? 0 : 4)) & 0x0F;
                q[v] = (uint8_t) (nib | (five ? ((qh[v % 32] >> (v / 32)) & 1) << 4 : 0));
            }
            for (int k = 0; k < 8; k++) {
                sm[2 * k] = d * (float) sc[k];
                sm[2 * k + 1] = -(dmin * (float) mn[k]);
            }
            return;
        }
        case GGML_TYPE_Q6_K: {
            /* ql[128], qh[64], scales[16] int8, d (f16); value v = 128n + 32c + l (c < 4, l < 32):
             * low 4 bits in the low (c < 2) or high nibble of ql[64n + 32*(c%2) + l], top 2 bits at
             * bit 2c of qh[32n + l]; ggml subtracts 32 */
            const uint8_t * ql = x, * qh = x + 128;
            const int8_t * sc = (const int8_t *) (x + 192);
            const float d = half_at(x + 208);
            for (int v = 0; v < QK_K; v++) {
                const int n = v / 128, c = (v % 128) / 32, l = v % 32;
                const int lo = (ql[64 * n + 32 * (c % 2) + l] >> (4 * (c / 2))) & 0x0F;
                const int hi = (qh[32 * n + l] >> (2 * c)) & 3;
                q[v] = (uint8_t) (lo | (hi << 4));
            }
            for (int k = 0; k < 16; k++) {
                sm[2 * k] = d * (float) sc[k];
                sm[2 * k + 1] = 0.0f;
            }
            return;
        }
        default:
            return;
    }
}

int ripple_split_rows(int32_t type, const void * src, int64_t nrows, int64_t n_per_row, uint8_t * q, float * scale_min) {
    int32_t group;
    if (!ripple_split_info(type, NULL, NULL, &group, NULL) || nrows < 0 || n_per_row <= 0 ||
        n_per_row % ggml_blck_size((enum ggml_type) type) != 0) {
        return -1;
    }
    const int64_t blck = ggml_blck_size((enum ggml_type) type), nb = n_per_row / blck;
    const size_t bsize = ggml_type_size((enum ggml_type) type);
    uint8_t scratch[QK_K];
    for (int64_t r = 0; r < nrows; r++) {
        const uint8_t * row = (const uint8_t *) src + (size_t) r * (size_t) nb * bsize;
        for (int64_t b = 0; b < nb; b++) {
            uint8_t * qb = q ? q + r * n_per_row + b * blck : scratch;
            split_block(type, row + (size_t) b * bsize, qb, scale_min + (r * n_per_row + b * blck) / group * 2);
        }
    }
    return 0;
}
