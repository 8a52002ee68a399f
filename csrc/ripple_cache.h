/* Neuron cache (ripple_cache.c): bundles in DRAM under a byte budget. Policies: enum
 * ripple_cache_policy (ripple.h). Callers hold the owning model's mutex. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "ripple_layer.h"

enum ripple_cache_queue { RIPPLE_CACHE_SMALL = 0, RIPPLE_CACHE_MAIN = 1 }; /* LRU uses MAIN only */

typedef struct ripple_cache {
    int       policy;     /* enum ripple_cache_policy */
    size_t    slot_size;  /* bytes per slot = largest bundle of the model */
    int64_t   n_slots;    /* capacity in bundles */
    int64_t   n_used;     /* slots holding a bundle (never freed once used) */
    uint8_t * arena;      /* n_slots * slot_size, anonymous NORESERVE mapping */
    size_t    arena_size;
    int32_t * slot_layer; /* slot -> layer, -1 when free */
    int32_t * slot_pos;   /* slot -> position in layer */
    int64_t * prev;       /* queue links, head = newest (LRU: most recent) */
    int64_t * next;
    uint8_t * queue;      /* slot -> enum ripple_cache_queue */
    uint8_t * freq;       /* slot -> accesses since insertion or last reinsertion, capped at 3 */
    int64_t   head[2], tail[2], len[2];
    int64_t   small_cap;  /* S3-FIFO: size of the small queue (10% of the slots) */
    int32_t ** slot_of;   /* [layer][position] -> slot or -1 */
    int64_t ** ghost_at;  /* S3-FIFO: [layer][position] -> ghost stamp, 0 = never a ghost */
    int64_t   ghost_seq;  /* ghost insertions so far; a stamp within ghost_cap of it is a ghost */
    int64_t   ghost_cap;  /* ghost entries remembered = main queue size */
    uint64_t  rng;        /* xorshift64 state of the linking admission, fixed seed */
    uint8_t ** pin;       /* pinned: [layer][position] -> 1 for the bundles the cache keeps */
    /* exact mode keeps whole layers' standard tensors in the same arena instead of bundles (never
     * both: once a layer is resident no bundle is admitted, and a cache holding bundles takes no
     * resident layer) */
    uint8_t ** resident;  /* [layer] -> its standard ffn_gate | ffn_up | ffn_down bytes, or NULL */
    uint8_t * resident_ready; /* [layer]: filled and checked (until then other users read it themselves) */
    size_t    resident_used;
    int       all_fit;    /* the slots hold every bundle of the model: nothing is ever evicted */
    int64_t * fit_base;   /* all_fit: [layer] -> the slot of its position 0 (a layer's bundles lie in position
                           * order, so the rows of a sparse selection are read in one direction) */
    int       n_layers;
} ripple_cache;

/* budget_bytes = 0 (or an unknown policy) leaves the cache empty: every get misses, put is a no-op. */
void      ripple_cache_init(ripple_cache * c, int n_layers, const ripple_layer * layers, size_t budget_bytes, int policy);
void      ripple_cache_free(ripple_cache * c);
/* exact mode: the arena bytes holding layer's standard tensors, filled and checked (NULL: not
 * resident, or still being filled) */
uint8_t * ripple_cache_resident(const ripple_cache * c, int layer);
/* give `bytes` of the arena to layer (NULL when a bundle was ever cached, they do not fit, or the
 * layer has them already); the caller fills them and then calls ripple_cache_resident_ready, or
 * ripple_cache_unresident when it cannot */
uint8_t * ripple_cache_make_resident(ripple_cache * c, int layer, size_t bytes);
void      ripple_cache_resident_ready(ripple_cache * c, int layer);
void      ripple_cache_unresident(ripple_cache * c, int layer);
/* Pointer to the cached bundle, NULL on a miss. A hit updates the policy's recency/frequency. */
uint8_t * ripple_cache_get(ripple_cache * c, int layer, int64_t pos);
/* Offer a bundle read as part of a contiguous read of run_length bundles (lru and s3fifo ignore
 * it), evicting as the policy says; no-op when already cached, not admitted or the budget is 0. */
void      ripple_cache_put(ripple_cache * c, int layer, int64_t pos, const uint8_t * data, size_t size,
                           int32_t run_length);
/* Where a bundle is, without touching the policy: a queue (enum ripple_cache_queue), 2 = ghost,
 * -1 = absent (tests and diagnostics). */
int       ripple_cache_where(const ripple_cache * c, int layer, int64_t pos);
