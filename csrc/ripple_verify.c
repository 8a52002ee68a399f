/* Checks of what was read against the file's checksum table (docs/FORMAT.md 2b): a CRC32C per
 * bundle and per block of each standard tensor; and the fallback read of a weight a scheduler asks
 * for, whole checksum blocks read and checked. */
#include "ripple.h"
#include "ripple_base.h"
#include "ripple_crc.h"
#include "ripple_io.h"
#include "ripple_verify.h"

#include <stdlib.h>
#include <string.h>

static const char * const k_kind_name[3] = { "ffn_gate", "ffn_up", "ffn_down" };

int ripple_verify_bundles(const ripple_model * m, int layer, const uint8_t * buf, const int64_t * pos, int64_t n) {
    if (!ripple_get_verify_reads()) {
        return 0;
    }
    const ripple_layer * L = &m->layers[layer];
    const size_t bs = L->d.bundle_size;
    uint32_t got[64];
    for (int64_t i0 = 0; i0 < n; i0 += 64) {
        const int64_t k = n - i0 < 64 ? n - i0 : 64;
        ripple_crc32c_pieces(buf, bs, bs, pos + i0, k, got);
        for (int64_t i = 0; i < k; i++) {
            const int64_t p = pos[i0 + i];
            if (got[i] != L->bundle_crc[p]) {
                ripple_set_error("%s: checksum mismatch: the bundle of layer %d at position %lld (file offset %llu, "
                                 "%zu bytes) is not what was converted (file damaged or modified after loading?)",
                                 m->path, L->d.block, (long long) p,
                                 (unsigned long long) (L->d.bundles_offset + (uint64_t) p * bs), bs);
                return -1;
            }
        }
    }
    return 0;
}

int ripple_verify_tensor(const ripple_model * m, int layer, int kind, const uint8_t * buf, uint64_t off, uint64_t len) {
    if (!ripple_get_verify_reads()) {
        return 0;
    }
    const ripple_layer * L = &m->layers[layer];
    const uint64_t B = m->crc_block, first = off / B;
    const uint64_t base = kind == RIPPLE_GATE ? L->d.gate_offset : kind == RIPPLE_UP ? L->d.up_offset : L->d.down_offset;
    uint32_t got[64];
    for (uint64_t done = 0; done < len;) {
        const uint64_t chunk = len - done < 64 * B ? len - done : 64 * B;
        ripple_crc32c_blocks(buf + done, chunk, B, got);
        for (uint64_t i = 0; i * B < chunk; i++) {
            const uint64_t blk = first + done / B + i;
            if (got[i] != L->tensor_crc[kind][blk]) {
                ripple_set_error("%s: checksum mismatch: bytes %llu.. of blk.%d.%s.weight (file offset %llu) are "
                                 "not what was converted (file damaged or modified after loading?)", m->path,
                                 (unsigned long long) (blk * B), L->d.block, k_kind_name[kind],
                                 (unsigned long long) (base + blk * B));
                return -1;
            }
        }
        done += chunk;
    }
    return 0;
}

/* A fallback read of part of a standard tensor: whole checksum blocks are read and checked, the
 * part asked for copied out. */
int ripple_read_tensor(const ripple_binding * b, void * dst, size_t offset, size_t size) {
    const ripple_model * m = b->model;
    const ripple_layer * L = &m->layers[b->layer];
    const ripple_layer_desc * d = &L->d;
    uint64_t base = b->kind == RIPPLE_GATE ? d->gate_offset : b->kind == RIPPLE_UP ? d->up_offset : d->down_offset;
    RIPPLE_COUNT(fallback_reads, 1);
    const uint64_t total = L->tensor_bytes[b->kind], B = m->crc_block;
    if ((uint64_t) offset + size > total) {
        ripple_set_error("%s: read of %zu bytes at %zu is outside blk.%d.%s.weight (%llu bytes)", m->path, size, offset,
                         d->block, k_kind_name[b->kind], (unsigned long long) total);
        return -1;
    }
    const uint64_t a0 = (uint64_t) offset / B * B;
    uint64_t a1 = ((uint64_t) offset + size + B - 1) / B * B;
    a1 = a1 < total ? a1 : total;
    uint8_t * tmp = malloc((size_t) (a1 - a0));
    if (!tmp) {
        ripple_set_error("out of memory");
        return -1;
    }
    int rc = ripple_pread_full(m->fd, tmp, (size_t) (a1 - a0), base + a0, m->path);
    if (rc == 0) {
        rc = ripple_verify_tensor(m, b->layer, b->kind, tmp, a0, a1 - a0);
    }
    if (rc == 0) {
        memcpy(dst, tmp + (offset - a0), size);
    }
    free(tmp);
    return rc;
}
