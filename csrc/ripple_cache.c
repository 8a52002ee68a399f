/* Neuron cache: bundles kept in DRAM under a byte budget, with three policies.
 *
 * Fixed-size slots (the model's largest bundle) in one anonymous mapping, so the budget is never
 * exceeded and memory is only committed as slots fill. Callers hold the model mutex.
 *
 * lru:     one list, a hit moves the slot to the head, the tail is evicted.
 * s3fifo:  S3-FIFO (Yang et al., SOSP'23). New bundles enter a small FIFO (10% of the slots); at
 *          its tail a bundle hit while there moves to the main FIFO, the others are evicted and
 *          remembered in a ghost FIFO of keys (as many as the main queue holds). A bundle found in
 *          the ghost goes straight to main. Main is a CLOCK with a 2-bit counter: the tail is
 *          reinserted with its count decreased while the count is > 0, else evicted.
 * pinned:  a static set: the bundles the converter measured as most often needed (ripple_layer.freq;
 *          ties and files without frequencies: lower layer, then lower position first), as many as
 *          the slots hold, kept once read and never evicted; the others are never admitted. Under a
 *          cyclic access (exact mode reads every bundle of every layer per token) LRU and FIFO
 *          policies evict each bundle before its next use, a static set keeps its share.
 * linking: s3fifo whose admission of new bundles (not ghosts) depends on how they were read: a
 *          bundle from a contiguous read of L bundles is admitted with probability 1/L. On an
 *          IOPS-bound device the request cost dominates and is shared by the L bundles, so 1/L is
 *          the share of a request that caching the bundle saves; isolated bundles (L = 1) are
 *          always admitted. The coin is a xorshift64 with a fixed seed, so runs are reproducible.
 */
#define _GNU_SOURCE
#include "ripple.h"
#include "ripple_cache.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define S3FIFO_SMALL_DIVISOR 10 /* small queue = 1/10 of the slots */
#define S3FIFO_FREQ_MAX 3       /* 2-bit access counter */
#define LINKING_SEED 0x9E3779B97F4A7C15ull

static void cache_reset(ripple_cache * c) {
    memset(c, 0, sizeof(*c));
    c->head[0] = c->head[1] = c->tail[0] = c->tail[1] = -1;
}

void ripple_cache_free(ripple_cache * c) {
    if (c->arena) {
        munmap(c->arena, c->arena_size);
    }
    for (int l = 0; l < c->n_layers; l++) {
        if (c->slot_of) free(c->slot_of[l]);
        if (c->ghost_at) free(c->ghost_at[l]);
        if (c->pin) free(c->pin[l]);
    }
    free(c->pin);
    free(c->resident);
    free(c->resident_ready);
    free(c->slot_layer);
    free(c->slot_pos);
    free(c->prev);
    free(c->next);
    free(c->queue);
    free(c->freq);
    free(c->slot_of);
    free(c->ghost_at);
    free(c->fit_base);
    cache_reset(c);
}

void ripple_cache_init(ripple_cache * c, int n_layers, const ripple_layer * layers, size_t budget_bytes, int policy) {
    cache_reset(c);
    c->policy = policy;
    c->rng = LINKING_SEED;
    for (int l = 0; l < n_layers; l++) {
        if (layers[l].d.bundle_size > c->slot_size) {
            c->slot_size = layers[l].d.bundle_size;
        }
    }
    if (policy < RIPPLE_CACHE_LRU || policy > RIPPLE_CACHE_PINNED || c->slot_size == 0 || budget_bytes < c->slot_size) {
        return;
    }
    int64_t total = 0;
    for (int l = 0; l < n_layers; l++) {
        total += layers[l].d.n_ff;
    }
    int64_t n = (int64_t) (budget_bytes / c->slot_size);
    if (n >= total) {
        n = total;
        c->all_fit = 1;
    }
    if (n == 0) {
        return;
    }
    c->arena_size = (size_t) n * c->slot_size;
    void * a = mmap(NULL, c->arena_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (a == MAP_FAILED) {
        c->arena_size = 0;
        return;
    }
    c->arena = a;
    c->n_layers = n_layers;
    const bool s3 = policy == RIPPLE_CACHE_S3FIFO || policy == RIPPLE_CACHE_LINKING;
    const bool pinned = policy == RIPPLE_CACHE_PINNED;
    c->slot_layer = malloc(sizeof(int32_t) * (size_t) n);
    c->slot_pos = malloc(sizeof(int32_t) * (size_t) n);
    c->prev = malloc(sizeof(int64_t) * (size_t) n);
    c->next = malloc(sizeof(int64_t) * (size_t) n);
    c->queue = malloc((size_t) n);
    c->freq = calloc((size_t) n, 1);
    c->slot_of = calloc((size_t) n_layers, sizeof(int32_t *));
    c->ghost_at = s3 ? calloc((size_t) n_layers, sizeof(int64_t *)) : NULL;
    c->pin = pinned ? calloc((size_t) n_layers, sizeof(uint8_t *)) : NULL;
    c->resident = calloc((size_t) n_layers, sizeof(uint8_t *));
    c->resident_ready = calloc((size_t) n_layers, 1);
    c->fit_base = c->all_fit ? malloc(sizeof(int64_t) * (size_t) n_layers) : NULL;
    bool ok = c->slot_layer && c->slot_pos && c->prev && c->next && c->queue && c->freq && c->slot_of && (!s3 || c->ghost_at) &&
              (!pinned || c->pin) && c->resident && c->resident_ready &&
              (!c->all_fit || c->fit_base);
    for (int l = 0; ok && c->fit_base && l < n_layers; l++) {
        c->fit_base[l] = l ? c->fit_base[l - 1] + layers[l - 1].d.n_ff : 0;
    }
    for (int l = 0; ok && l < n_layers; l++) {
        c->slot_of[l] = malloc(sizeof(int32_t) * (size_t) layers[l].d.n_ff);
        ok = c->slot_of[l] != NULL;
        if (ok && s3) {
            c->ghost_at[l] = calloc((size_t) layers[l].d.n_ff, sizeof(int64_t));
            ok = c->ghost_at[l] != NULL;
        }
        if (ok && pinned) {
            c->pin[l] = calloc((size_t) layers[l].d.n_ff, 1);
            ok = c->pin[l] != NULL;
        }
        for (int32_t p = 0; ok && p < layers[l].d.n_ff; p++) {
            c->slot_of[l][p] = -1;
        }
    }
    if (!ok) { /* out of memory: run without a cache rather than fail the model */
        ripple_cache_free(c);
        return;
    }
    for (int64_t s = 0; s < n; s++) {
        c->slot_layer[s] = -1;
    }
    c->n_slots = n;
    if (pinned) {
        /* the n most frequent: every bundle above a frequency F, then those at F in (layer, position) order */
        int64_t hist[256] = { 0 };
        for (int l = 0; l < n_layers; l++) {
            for (int32_t p = 0; p < layers[l].d.n_ff; p++) {
                hist[layers[l].freq ? layers[l].freq[p] : 0]++;
            }
        }
        int f = 255;
        int64_t above = 0;
        while (f > 0 && above + hist[f] <= n) {
            above += hist[f--];
        }
        int64_t at_f = n - above; /* bundles of frequency f still kept */
        for (int l = 0; l < n_layers; l++) {
            for (int32_t p = 0; p < layers[l].d.n_ff; p++) {
                const int v = layers[l].freq ? layers[l].freq[p] : 0;
                c->pin[l][p] = v > f || (v == f && at_f-- > 0);
            }
        }
    }
    c->small_cap = n / S3FIFO_SMALL_DIVISOR > 0 ? n / S3FIFO_SMALL_DIVISOR : 1;
    c->ghost_cap = n - c->small_cap;
}

/* ---- queues: doubly linked lists over slots, head = newest ---- */

static void queue_unlink(ripple_cache * c, int64_t s) {
    const int q = c->queue[s];
    if (c->prev[s] >= 0) c->next[c->prev[s]] = c->next[s]; else c->head[q] = c->next[s];
    if (c->next[s] >= 0) c->prev[c->next[s]] = c->prev[s]; else c->tail[q] = c->prev[s];
    c->len[q]--;
}

static void queue_push(ripple_cache * c, int q, int64_t s) {
    c->queue[s] = (uint8_t) q;
    c->prev[s] = -1;
    c->next[s] = c->head[q];
    if (c->head[q] >= 0) c->prev[c->head[q]] = s;
    c->head[q] = s;
    if (c->tail[q] < 0) c->tail[q] = s;
    c->len[q]++;
}

/* ---- ghost: a FIFO of keys kept as insertion stamps, as the S3-FIFO paper suggests ---- */

static bool ghost_contains(const ripple_cache * c, int layer, int64_t pos) {
    const int64_t t = c->ghost_at[layer][pos];
    return t > 0 && c->ghost_seq - t < c->ghost_cap;
}

/* ---- eviction: unlink a victim, forget its key, return its slot ---- */

static int64_t evict_lru(ripple_cache * c) {
    const int64_t s = c->tail[RIPPLE_CACHE_MAIN];
    queue_unlink(c, s);
    return s;
}

static int64_t evict_s3fifo(ripple_cache * c) {
    if (c->len[RIPPLE_CACHE_SMALL] >= c->small_cap || c->len[RIPPLE_CACHE_MAIN] == 0) {
        while (c->len[RIPPLE_CACHE_SMALL] > 0) {
            const int64_t s = c->tail[RIPPLE_CACHE_SMALL];
            queue_unlink(c, s);
            if (c->freq[s] > 0) { /* hit while in small: promoted, its count cleared */
                c->freq[s] = 0;
                queue_push(c, RIPPLE_CACHE_MAIN, s);
                continue;
            }
            c->ghost_at[c->slot_layer[s]][c->slot_pos[s]] = ++c->ghost_seq;
            return s;
        }
    }
    /* main: at most S3FIFO_FREQ_MAX + 1 turns of the clock find a count of 0 */
    for (;;) {
        const int64_t s = c->tail[RIPPLE_CACHE_MAIN];
        queue_unlink(c, s);
        if (c->freq[s] == 0) {
            return s;
        }
        c->freq[s]--;
        queue_push(c, RIPPLE_CACHE_MAIN, s);
    }
}

/* xorshift64 (Marsaglia 2003) */
static uint64_t linking_next(ripple_cache * c) {
    uint64_t x = c->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return c->rng = x;
}

int ripple_cache_where(const ripple_cache * c, int layer, int64_t pos) {
    if (!c->n_slots) {
        return -1;
    }
    const int32_t s = c->slot_of[layer][pos];
    if (s >= 0) {
        return c->queue[s];
    }
    return c->ghost_at && ghost_contains(c, layer, pos) ? 2 : -1;
}

uint8_t * ripple_cache_resident(const ripple_cache * c, int layer) {
    return c->resident && layer >= 0 && layer < c->n_layers && c->resident_ready[layer] ? c->resident[layer] : NULL;
}

uint8_t * ripple_cache_make_resident(ripple_cache * c, int layer, size_t bytes) {
    if (!c->resident || layer < 0 || layer >= c->n_layers || c->n_used > 0 || c->resident[layer]) {
        return NULL;
    }
    bytes = (bytes + 63) & ~(size_t) 63;
    if (c->resident_used + bytes > c->arena_size) {
        return NULL;
    }
    c->resident[layer] = c->arena + c->resident_used;
    c->resident_used += bytes;
    return c->resident[layer];
}

void ripple_cache_resident_ready(ripple_cache * c, int layer) {
    if (c->resident && layer >= 0 && layer < c->n_layers && c->resident[layer]) {
        c->resident_ready[layer] = 1;
    }
}

void ripple_cache_unresident(ripple_cache * c, int layer) {
    if (c->resident && layer >= 0 && layer < c->n_layers) {
        c->resident[layer] = NULL; /* its bytes stay given until the cache is made again */
        c->resident_ready[layer] = 0;
    }
}

uint8_t * ripple_cache_get(ripple_cache * c, int layer, int64_t pos) {
    if (!c->n_slots || c->resident_used) {
        return NULL;
    }
    const int32_t s = c->slot_of[layer][pos];
    if (s < 0) {
        return NULL;
    }
    if (c->all_fit || c->policy == RIPPLE_CACHE_PINNED) {
        /* nothing to keep track of: no eviction will ever look at it */
    } else if (c->policy == RIPPLE_CACHE_LRU) {
        queue_unlink(c, s);
        queue_push(c, RIPPLE_CACHE_MAIN, s);
    } else if (c->freq[s] < S3FIFO_FREQ_MAX) {
        c->freq[s]++;
    }
    return c->arena + (size_t) s * c->slot_size;
}

void ripple_cache_put(ripple_cache * c, int layer, int64_t pos, const uint8_t * data, size_t size, int32_t run_length) {
    if (!c->n_slots || c->resident_used || size > c->slot_size || c->slot_of[layer][pos] >= 0) {
        return;
    }
    int q = RIPPLE_CACHE_MAIN;
    if (c->policy == RIPPLE_CACHE_PINNED) {
        if (!c->pin[layer][pos] || c->n_used >= c->n_slots) {
            return; /* not in the set (every member fits: the set has as many bundles as slots) */
        }
    } else if (c->policy != RIPPLE_CACHE_LRU) {
        if (ghost_contains(c, layer, pos)) {
            c->ghost_at[layer][pos] = 0;
        } else if (c->policy == RIPPLE_CACHE_LINKING && run_length > 1 && linking_next(c) % (uint64_t) run_length != 0) {
            return; /* cheap to read again with its run: not admitted */
        } else {
            q = RIPPLE_CACHE_SMALL;
        }
    }
    int64_t s;
    if (c->fit_base) {
        s = c->fit_base[layer] + pos;
        c->n_used++;
    } else if (c->n_used < c->n_slots) {
        s = c->n_used++;
    } else {
        s = c->policy == RIPPLE_CACHE_LRU ? evict_lru(c) : evict_s3fifo(c);
        c->slot_of[c->slot_layer[s]][c->slot_pos[s]] = -1;
    }
    memcpy(c->arena + (size_t) s * c->slot_size, data, size);
    c->slot_layer[s] = layer;
    c->slot_pos[s] = (int32_t) pos;
    c->slot_of[layer][pos] = (int32_t) s;
    c->freq[s] = 0;
    queue_push(c, q, s);
}
