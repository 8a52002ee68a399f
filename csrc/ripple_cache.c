/* Neuron cache: bundles kept in DRAM under a byte budget, least recently used evicted first.
 * Fixed-size slots (the model's largest bundle) in one anonymous mapping, so the budget is
 * never exceeded and memory is only committed as slots fill. Callers hold the model mutex. */
#define _GNU_SOURCE
#include "ripple_internal.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

void ripple_cache_init(ripple_cache * c, int n_layers, const ripple_layer * layers, size_t budget_bytes) {
    memset(c, 0, sizeof(*c));
    c->head = c->tail = -1;
    c->n_layers = n_layers;
    for (int l = 0; l < n_layers; l++) {
        if (layers[l].d.bundle_size > c->slot_size) {
            c->slot_size = layers[l].d.bundle_size;
        }
    }
    if (c->slot_size == 0 || budget_bytes < c->slot_size) {
        return;
    }
    int64_t total = 0;
    for (int l = 0; l < n_layers; l++) {
        total += layers[l].d.n_ff;
    }
    int64_t n = (int64_t) (budget_bytes / c->slot_size);
    if (n > total) {
        n = total;
    }
    c->arena_size = (size_t) n * c->slot_size;
    void * a = mmap(NULL, c->arena_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (a == MAP_FAILED) {
        c->arena_size = 0;
        return;
    }
    c->arena = a;
    c->n_slots = n;
    c->slot_layer = malloc(sizeof(int32_t) * (size_t) n);
    c->slot_pos = malloc(sizeof(int32_t) * (size_t) n);
    c->prev = malloc(sizeof(int64_t) * (size_t) n);
    c->next = malloc(sizeof(int64_t) * (size_t) n);
    c->slot_of = calloc((size_t) n_layers, sizeof(int32_t *));
    for (int64_t s = 0; s < n; s++) {
        c->slot_layer[s] = -1;
    }
    for (int l = 0; l < n_layers; l++) {
        c->slot_of[l] = malloc(sizeof(int32_t) * (size_t) layers[l].d.n_ff);
        for (int32_t p = 0; p < layers[l].d.n_ff; p++) {
            c->slot_of[l][p] = -1;
        }
    }
}

void ripple_cache_free(ripple_cache * c) {
    if (c->arena) {
        munmap(c->arena, c->arena_size);
    }
    for (int l = 0; c->slot_of && l < c->n_layers; l++) {
        free(c->slot_of[l]);
    }
    free(c->slot_layer);
    free(c->slot_pos);
    free(c->prev);
    free(c->next);
    free(c->slot_of);
    memset(c, 0, sizeof(*c));
    c->head = c->tail = -1;
}

static void lru_unlink(ripple_cache * c, int64_t s) {
    if (c->prev[s] >= 0) c->next[c->prev[s]] = c->next[s]; else c->head = c->next[s];
    if (c->next[s] >= 0) c->prev[c->next[s]] = c->prev[s]; else c->tail = c->prev[s];
}

static void lru_push_front(ripple_cache * c, int64_t s) {
    c->prev[s] = -1;
    c->next[s] = c->head;
    if (c->head >= 0) c->prev[c->head] = s;
    c->head = s;
    if (c->tail < 0) c->tail = s;
}

uint8_t * ripple_cache_get(ripple_cache * c, int layer, int64_t pos) {
    if (!c->n_slots) {
        return NULL;
    }
    int32_t s = c->slot_of[layer][pos];
    if (s < 0) {
        return NULL;
    }
    lru_unlink(c, s);
    lru_push_front(c, s);
    return c->arena + (size_t) s * c->slot_size;
}

void ripple_cache_put(ripple_cache * c, int layer, int64_t pos, const uint8_t * data, size_t size) {
    if (!c->n_slots || size > c->slot_size || c->slot_of[layer][pos] >= 0) {
        return;
    }
    int64_t s;
    if (c->n_used < c->n_slots) {
        s = c->n_used++;
    } else {
        s = c->tail;
        lru_unlink(c, s);
        c->slot_of[c->slot_layer[s]][c->slot_pos[s]] = -1;
    }
    memcpy(c->arena + (size_t) s * c->slot_size, data, size);
    c->slot_layer[s] = layer;
    c->slot_pos[s] = (int32_t) pos;
    c->slot_of[layer][pos] = (int32_t) s;
    lru_push_front(c, s);
}
