/* CRC32C (Castagnoli, as iSCSI/ext4: reflected 0x82F63B78, init and final xor ~0) of the bytes the
 * runtime reads from a ripple file, checked against the file's checksum table (docs/FORMAT.md
 * section 2b). The SSE4.2 / ARMv8 CRC instruction when the CPU has it (three independent pieces
 * interleaved, so the instruction's 3-cycle latency is hidden), else slicing-by-8 tables. */
#include "ripple.h"
#include "ripple_crc.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define RIPPLE_CRC_X86 1
#elif defined(__aarch64__) && defined(__ARM_FEATURE_CRC32)
#include <arm_acle.h>
#define RIPPLE_CRC_ARM 1
#endif

static uint32_t g_table[8][256];
static int      g_hw = -1; /* -1 not decided, 0 tables, 1 instruction */

static void init_tables(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) {
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        }
        g_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        for (int t = 1; t < 8; t++) {
            g_table[t][i] = (g_table[t - 1][i] >> 8) ^ g_table[0][g_table[t - 1][i] & 0xff];
        }
    }
}

static void decide(void) {
    if (__atomic_load_n(&g_hw, __ATOMIC_ACQUIRE) >= 0) {
        return;
    }
    init_tables(); /* idempotent: racing first callers write the same values */
#if defined(RIPPLE_CRC_X86)
    __builtin_cpu_init();
    const int hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#elif defined(RIPPLE_CRC_ARM)
    const int hw = 1;
#else
    const int hw = 0;
#endif
    __atomic_store_n(&g_hw, hw, __ATOMIC_RELEASE);
}

static uint32_t crc_sw(uint32_t c, const uint8_t * p, size_t n) {
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= c;
        c = g_table[7][v & 0xff] ^ g_table[6][(v >> 8) & 0xff] ^ g_table[5][(v >> 16) & 0xff] ^
            g_table[4][(v >> 24) & 0xff] ^ g_table[3][(v >> 32) & 0xff] ^ g_table[2][(v >> 40) & 0xff] ^
            g_table[1][(v >> 48) & 0xff] ^ g_table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) {
        c = (c >> 8) ^ g_table[0][(c ^ *p++) & 0xff];
    }
    return c;
}

#if defined(RIPPLE_CRC_X86)
#define HW_ATTR __attribute__((target("sse4.2")))
#define CRC8(c, v) ((uint32_t) _mm_crc32_u64((c), (v)))
#define CRC1(c, v) _mm_crc32_u8((c), (v))
#elif defined(RIPPLE_CRC_ARM)
#define HW_ATTR
#define CRC8(c, v) __crc32cd((c), (v))
#define CRC1(c, v) __crc32cb((c), (v))
#endif

#ifdef HW_ATTR
static HW_ATTR uint32_t crc_hw(uint32_t c, const uint8_t * p, size_t n) {
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = CRC8(c, v);
        p += 8;
        n -= 8;
    }
    while (n--) {
        c = CRC1(c, *p++);
    }
    return c;
}

/* three pieces of the same length at once: independent dependency chains */
static HW_ATTR void crc_hw3(const uint8_t * a, const uint8_t * b, const uint8_t * d, size_t n, uint32_t out[3]) {
    uint32_t ca = ~0u, cb = ~0u, cd = ~0u;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t va, vb, vd;
        memcpy(&va, a + i, 8);
        memcpy(&vb, b + i, 8);
        memcpy(&vd, d + i, 8);
        ca = CRC8(ca, va);
        cb = CRC8(cb, vb);
        cd = CRC8(cd, vd);
    }
    for (; i < n; i++) {
        ca = CRC1(ca, a[i]);
        cb = CRC1(cb, b[i]);
        cd = CRC1(cd, d[i]);
    }
    out[0] = ~ca;
    out[1] = ~cb;
    out[2] = ~cd;
}
#endif

uint32_t ripple_crc32c(const void * data, size_t len) {
    decide();
#ifdef HW_ATTR
    if (g_hw) {
        return ~crc_hw(~0u, data, len);
    }
#endif
    return ~crc_sw(~0u, data, len);
}

void ripple_crc32c_pieces(const uint8_t * base, size_t stride, size_t len, const int64_t * idx, int64_t n,
                          uint32_t * out) {
    decide();
    int64_t i = 0;
#ifdef HW_ATTR
    if (g_hw) {
        for (; i + 2 <= n; i += 3) {
            /* two left: the second again as the third chain (two chains would be latency-bound anyway) */
            const int64_t x = idx ? idx[i] : i, y = idx ? idx[i + 1] : i + 1;
            const int64_t z = i + 2 < n ? (idx ? idx[i + 2] : i + 2) : y;
            uint32_t c[3];
            crc_hw3(base + (size_t) x * stride, base + (size_t) y * stride, base + (size_t) z * stride, len, c);
            memcpy(out + i, c, sizeof(uint32_t) * (size_t) (i + 2 < n ? 3 : 2));
        }
    }
#endif
    for (; i < n; i++) {
        out[i] = ripple_crc32c(base + (size_t) (idx ? idx[i] : i) * stride, len);
    }
}

void ripple_crc32c_blocks(const void * data, uint64_t len, uint64_t block, uint32_t * out) {
    if (block == 0) {
        return;
    }
    const int64_t whole = (int64_t) (len / block);
    ripple_crc32c_pieces(data, (size_t) block, (size_t) block, NULL, whole, out);
    if (len % block) {
        out[whole] = ripple_crc32c((const uint8_t *) data + (uint64_t) whole * block, (size_t) (len % block));
    }
}
