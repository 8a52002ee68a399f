/* Neuron cache test harness (tests/test_cache.py, scripts/bench_cache.py): a library of its own
 * (ripple_gguf/_ripple_cache_test.so), not part of the runtime library. Parsed by cffi like
 * ripple.h: no preprocessor logic between the RIPPLE_CDEF markers. */
#ifndef RIPPLE_CACHE_TEST_H
#define RIPPLE_CACHE_TEST_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif
#pragma GCC visibility push(default)
/* RIPPLE_CDEF_BEGIN */

/* A cache (enum ripple_cache_policy; pinned needs frequencies) over n_layers fake layers of n_ff[l]
 * bundles of bundle_size bytes, each holding a pattern derived from (layer, position). */
void *  ripple_cache_test_new(int n_layers, const int32_t * n_ff, size_t bundle_size, size_t budget, int policy);
/* the same with each bundle's frequency (flat u8 over the layers, position order; NULL = unknown) */
void *  ripple_cache_test_new_freq(int n_layers, const int32_t * n_ff, const uint8_t * freq, size_t bundle_size,
                                   size_t budget, int policy);
void    ripple_cache_test_free(void * t);
/* 1 hit with the right bytes, 0 miss, -1 hit with wrong bytes, -2 out of range. Updates the policy. */
int     ripple_cache_test_get(void * t, int layer, int64_t pos);
void    ripple_cache_test_put(void * t, int layer, int64_t pos, int32_t run_length);
/* Without touching the policy: 0 in the small queue, 1 in main (lru: 1), 2 ghost, -1 absent. */
int     ripple_cache_test_where(void * t, int layer, int64_t pos);
int64_t ripple_cache_test_used_bytes(void * t); /* bytes of the slots in use */
int64_t ripple_cache_test_capacity(void * t);   /* slots */

/* RIPPLE_CDEF_END */
#pragma GCC visibility pop
#ifdef __cplusplus
}
#endif
#endif
