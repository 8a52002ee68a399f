/* Standalone store (trace replay, benchmarks): a ripple-packed file opened without llama.cpp, whose
 * layers are fetched with the same reads, collapse, cache and counters as a loaded model's. */
#include "ripple.h"
#include "ripple_base.h"
#include "ripple_fetch.h"
#include "ripple_file.h"
#include "ripple_model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int ripple_store_open_file(const char * path, char * err, size_t err_len) {
    ripple_file * f = NULL;
    const int r = ripple_file_read(path, 1, &f, err, err_len);
    if (r <= 0) {
        if (r == 0) {
            snprintf(err, err_len, "%s: not a ripple-packed GGUF", path);
        }
        return -1;
    }
    const int handle = ripple_registry_open_standalone(path, f->file_size, f->n_layers, f->descs, err, err_len);
    ripple_file_free(f);
    return handle;
}

int ripple_store_fetch(int handle, int32_t layer, const int32_t * neurons, int64_t n, int64_t n_tokens) {
    ripple_model * m = ripple_registry_standalone(handle);
    if (!m || layer < 0 || layer >= m->n_layers) {
        ripple_set_error("store fetch: no standalone store %d or no layer %d in it", handle, layer);
        return -1;
    }
    const ripple_layer * L = &m->layers[layer];
    const size_t need_bytes = (size_t) L->d.n_ff * (L->d.bundle_size + 1);
    if (m->scratch_cap < need_bytes) {
        free(m->scratch);
        m->scratch = malloc(need_bytes);
        m->scratch_cap = m->scratch ? need_bytes : 0;
        if (!m->scratch) {
            ripple_set_error("out of memory");
            return -1;
        }
    }
    uint8_t * need = m->scratch + (size_t) L->d.n_ff * L->d.bundle_size;
    memset(need, 0, (size_t) L->d.n_ff);
    for (int64_t i = 0; i < n; i++) {
        if (neurons[i] < 0 || neurons[i] >= L->d.n_ff) {
            ripple_set_error("store fetch: neuron %d out of range for layer %d (%d neurons)", neurons[i], layer,
                             L->d.n_ff);
            return -1;
        }
        need[L->pos_of[neurons[i]]] = 1;
    }
    if (layer == 0) {
        RIPPLE_COUNT(tokens, (uint64_t) n_tokens);
    }
    return ripple_fetch_bundles(m, layer, need, n_tokens, m->scratch, NULL, NULL, 0);
}

void ripple_store_close(int handle) {
    ripple_registry_close_standalone(handle);
}
