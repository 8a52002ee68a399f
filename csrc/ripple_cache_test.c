/* Test harness for the neuron cache (tests/test_cache.py, scripts/bench_cache.py): a cache over
 * fake layers whose bundles hold a pattern derived from (layer, position), so a hit can be checked
 * byte for byte. Not used by the runtime. */
#include "ripple_cache.h"
#include "ripple_cache_test.h"

#include <stdlib.h>
#include <string.h>

typedef struct ripple_cache_test {
    ripple_cache   cache;
    ripple_layer * layers;
    int            n_layers;
    size_t         bundle_size;
    uint8_t *      buf; /* one bundle */
} ripple_cache_test;

static void fill_pattern(uint8_t * dst, size_t n, int layer, int64_t pos) {
    uint32_t x = (uint32_t) layer * 2654435761u ^ (uint32_t) pos * 40503u ^ 0x9E3779B9u;
    for (size_t i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        dst[i] = (uint8_t) (x >> 24);
    }
}

static bool in_range(const ripple_cache_test * t, int layer, int64_t pos) {
    return layer >= 0 && layer < t->n_layers && pos >= 0 && pos < t->layers[layer].d.n_ff;
}

void * ripple_cache_test_new(int n_layers, const int32_t * n_ff, size_t bundle_size, size_t budget, int policy) {
    return ripple_cache_test_new_freq(n_layers, n_ff, NULL, bundle_size, budget, policy);
}

void * ripple_cache_test_new_freq(int n_layers, const int32_t * n_ff, const uint8_t * freq, size_t bundle_size,
                                  size_t budget, int policy) {
    ripple_cache_test * t = calloc(1, sizeof(*t));
    if (!t) {
        return NULL;
    }
    t->n_layers = n_layers;
    t->bundle_size = bundle_size;
    t->layers = calloc((size_t) n_layers, sizeof(ripple_layer));
    t->buf = malloc(bundle_size ? bundle_size : 1);
    if (!t->layers || !t->buf) {
        free(t->layers);
        free(t->buf);
        free(t);
        return NULL;
    }
    for (int l = 0; l < n_layers; l++) {
        t->layers[l].d.block = l;
        t->layers[l].d.n_ff = n_ff[l];
        t->layers[l].d.bundle_size = bundle_size;
        if (freq) { /* flat over the layers, position order */
            t->layers[l].freq = malloc((size_t) n_ff[l] ? (size_t) n_ff[l] : 1);
            if (t->layers[l].freq) {
                memcpy(t->layers[l].freq, freq, (size_t) n_ff[l]);
            }
            freq += n_ff[l];
        }
    }
    ripple_cache_init(&t->cache, n_layers, t->layers, budget, policy);
    return t;
}

void ripple_cache_test_free(void * handle) {
    ripple_cache_test * t = handle;
    if (!t) {
        return;
    }
    ripple_cache_free(&t->cache);
    for (int l = 0; l < t->n_layers; l++) {
        free(t->layers[l].freq);
    }
    free(t->layers);
    free(t->buf);
    free(t);
}

int ripple_cache_test_get(void * handle, int layer, int64_t pos) {
    ripple_cache_test * t = handle;
    if (!in_range(t, layer, pos)) {
        return -2;
    }
    const uint8_t * p = ripple_cache_get(&t->cache, layer, pos);
    if (!p) {
        return 0;
    }
    fill_pattern(t->buf, t->bundle_size, layer, pos);
    return memcmp(p, t->buf, t->bundle_size) == 0 ? 1 : -1;
}

void ripple_cache_test_put(void * handle, int layer, int64_t pos, int32_t run_length) {
    ripple_cache_test * t = handle;
    if (!in_range(t, layer, pos)) {
        return;
    }
    fill_pattern(t->buf, t->bundle_size, layer, pos);
    ripple_cache_put(&t->cache, layer, pos, t->buf, t->bundle_size, run_length);
}

int ripple_cache_test_where(void * handle, int layer, int64_t pos) {
    const ripple_cache_test * t = handle;
    return in_range(t, layer, pos) ? ripple_cache_where(&t->cache, layer, pos) : -1;
}

int64_t ripple_cache_test_used_bytes(void * handle) {
    const ripple_cache * c = &((ripple_cache_test *) handle)->cache;
    return (int64_t) ((size_t) c->n_used * c->slot_size);
}

int64_t ripple_cache_test_capacity(void * handle) {
    return ((ripple_cache_test *) handle)->cache.n_slots;
}
