/* Process-wide settings read on the compute and read paths: each a value behind its setter and
 * getter (ripple.h). Those with a registry-wide effect live with what they affect: the cache budget
 * and policy in ripple_model.c, the I/O engine's in ripple_io.c, the cost model in ripple_cost.c. */
#include "ripple.h"
#include "ripple_model.h"
#include "ripple_settings.h"

static int     g_mode = RIPPLE_MODE_EXACT;
static int     g_exact_down = RIPPLE_EXACT_DOWN_TENSOR;
static int64_t g_collapse_bytes = 0;
static int     g_direct_io = 0;
static int     g_prefetch = 1;
static int     g_overlap = 1;
static int     g_sparse_down_rows = RIPPLE_SPARSE_DOWN_AUTO;
static int     g_verify = 1;

int ripple_set_mode(int mode) {
    if (mode != RIPPLE_MODE_EXACT && mode != RIPPLE_MODE_SPARSE && mode != RIPPLE_MODE_AUTO) {
        return -1;
    }
    __atomic_store_n(&g_mode, mode, __ATOMIC_RELAXED);
    return 0;
}

int ripple_get_mode(void) {
    return __atomic_load_n(&g_mode, __ATOMIC_RELAXED);
}

int ripple_mode_of(const ripple_model * m) {
    const int mode = ripple_get_mode();
    return mode == RIPPLE_MODE_AUTO ? __atomic_load_n(&m->default_mode, __ATOMIC_RELAXED) : mode;
}

int ripple_set_exact_down(int source) {
    if (source != RIPPLE_EXACT_DOWN_TENSOR && source != RIPPLE_EXACT_DOWN_BUNDLES) {
        return -1;
    }
    __atomic_store_n(&g_exact_down, source, __ATOMIC_RELAXED);
    return 0;
}

int ripple_get_exact_down(void) {
    return __atomic_load_n(&g_exact_down, __ATOMIC_RELAXED);
}

void ripple_set_collapse_bytes(int64_t gap_bytes) {
    __atomic_store_n(&g_collapse_bytes, gap_bytes > 0 ? gap_bytes : 0, __ATOMIC_RELAXED);
}

int64_t ripple_get_collapse_bytes(void) {
    return __atomic_load_n(&g_collapse_bytes, __ATOMIC_RELAXED);
}

void ripple_set_direct_io(int on) {
    __atomic_store_n(&g_direct_io, on ? 1 : 0, __ATOMIC_RELAXED);
}

int ripple_get_direct_io(void) {
    return __atomic_load_n(&g_direct_io, __ATOMIC_RELAXED);
}

void ripple_set_prefetch(int on) {
    __atomic_store_n(&g_prefetch, on ? 1 : 0, __ATOMIC_RELAXED);
}

int ripple_get_prefetch(void) {
    return __atomic_load_n(&g_prefetch, __ATOMIC_RELAXED);
}

void ripple_set_overlap(int on) {
    __atomic_store_n(&g_overlap, on ? 1 : 0, __ATOMIC_RELAXED);
}

int ripple_get_overlap(void) {
    return __atomic_load_n(&g_overlap, __ATOMIC_RELAXED);
}

void ripple_set_sparse_down_rows(int on) {
    __atomic_store_n(&g_sparse_down_rows, on ? RIPPLE_SPARSE_DOWN_AUTO : RIPPLE_SPARSE_DOWN_BUNDLES, __ATOMIC_RELAXED);
}

int ripple_get_sparse_down_rows(void) {
    return __atomic_load_n(&g_sparse_down_rows, __ATOMIC_RELAXED);
}

void ripple_set_verify_reads(int on) {
    __atomic_store_n(&g_verify, on ? 1 : 0, __ATOMIC_RELAXED);
}

int ripple_get_verify_reads(void) {
    return __atomic_load_n(&g_verify, __ATOMIC_RELAXED);
}
