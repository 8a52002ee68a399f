/* Neuron placement: the greedy Hamiltonian path (multi-fragment heuristic) over co-activation
 * counts. Python side: ripple_gguf/offline/placement.py (which documents the order's conventions).
 *
 * Pairs i < j with co > 0 are sorted by decreasing count with a stable counting sort keyed on
 * the count (ties stay in (i, j) order), so the cost is O(n^2 + max count) instead of a
 * comparison sort's O(n^2 log n); a pair is a uint32 i*n+j, hence n < 65536. Counts above
 * COUNT_SORT_MAX_KEY (more calibration tokens than any profile uses) fall back to LSD radix
 * passes of 16 bits, which need a second pair array.
 */
#include "ripple.h"

#include <stdlib.h>
#include <string.h>

#define COUNT_SORT_MAX_KEY (1u << 22) /* one pass below this: a 32 MiB histogram at most */
#define RADIX_BITS 16

/* Stable counting sort of pairs by decreasing (co[pair] >> shift) & mask into dst. src == NULL
 * means "all pairs i < j with co > 0, in row-major order" (the first pass reads the matrix
 * directly instead of a materialised list). mask is 2^k - 1; hist has mask + 1 entries. */
static void placement_sort_pass(uint32_t n, const uint32_t * co, const uint32_t * src, uint64_t m,
                                uint32_t * dst, uint32_t shift, uint32_t mask, uint64_t * hist) {
    memset(hist, 0, ((size_t) mask + 1) * sizeof(*hist));
    if (src == NULL) {
        for (uint32_t i = 0; i < n; i++) {
            const uint32_t * row = co + (size_t) i * n;
            for (uint32_t j = i + 1; j < n; j++) {
                if (row[j]) hist[(row[j] >> shift) & mask]++;
            }
        }
    } else {
        for (uint64_t k = 0; k < m; k++) hist[(co[src[k]] >> shift) & mask]++;
    }
    /* decreasing key: the largest key's bucket comes first */
    uint64_t at = 0;
    for (uint64_t key = (uint64_t) mask + 1; key-- > 0;) {
        uint64_t c = hist[key];
        hist[key] = at;
        at += c;
    }
    if (src == NULL) {
        for (uint32_t i = 0; i < n; i++) {
            const uint32_t * row = co + (size_t) i * n;
            for (uint32_t j = i + 1; j < n; j++) {
                if (row[j]) dst[hist[(row[j] >> shift) & mask]++] = i * n + j;
            }
        }
    } else {
        for (uint64_t k = 0; k < m; k++) dst[hist[(co[src[k]] >> shift) & mask]++] = src[k];
    }
}

/* Pairs i < j with co > 0 in decreasing count, ties in increasing i*n+j; *out_m = their number. */
static uint32_t * placement_sorted_pairs(uint32_t n, const uint32_t * co, uint64_t * out_m) {
    uint64_t m = 0;
    uint32_t max_key = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint32_t * row = co + (size_t) i * n;
        for (uint32_t j = i + 1; j < n; j++) {
            m += row[j] != 0;
            if (row[j] > max_key) max_key = row[j];
        }
    }
    *out_m = m;
    uint32_t * pairs = malloc((m ? m : 1) * sizeof(*pairs));
    if (!pairs) return NULL;
    if (m == 0) return pairs;
    if (max_key < COUNT_SORT_MAX_KEY) {
        uint32_t mask = 1; /* keys are masked: the smallest 2^k - 1 >= max_key */
        while (mask < max_key) mask = mask << 1 | 1;
        uint64_t * hist = malloc(((size_t) mask + 1) * sizeof(*hist));
        if (!hist) { free(pairs); return NULL; }
        placement_sort_pass(n, co, NULL, m, pairs, 0, mask, hist);
        free(hist);
        return pairs;
    }
    /* LSD radix: two stable passes (low 16 bits, then high 16 bits) */
    uint32_t * tmp = malloc(m * sizeof(*tmp));
    uint64_t * hist = malloc(((size_t) 1 << RADIX_BITS) * sizeof(*hist));
    if (!tmp || !hist) { free(tmp); free(hist); free(pairs); return NULL; }
    const uint32_t mask = (1u << RADIX_BITS) - 1;
    placement_sort_pass(n, co, NULL, m, tmp, 0, mask, hist);
    placement_sort_pass(n, co, tmp, m, pairs, RADIX_BITS, mask, hist);
    free(tmp);
    free(hist);
    return pairs;
}

static int32_t placement_find(int32_t * parent, int32_t x) {
    while (parent[x] != x) {
        parent[x] = parent[parent[x]]; /* path halving */
        x = parent[x];
    }
    return x;
}

/* Fragment summary for the final linking. */
typedef struct {
    uint32_t best_freq; /* frequency of the fragment's most frequent member */
    int32_t  best_id;   /* that member (smallest id among equals) */
    int32_t  start;     /* endpoint the fragment is walked from */
} placement_fragment;

static int placement_fragment_cmp(const void * a, const void * b) {
    const placement_fragment * x = a, * y = b;
    if (x->best_freq != y->best_freq) return x->best_freq > y->best_freq ? -1 : 1;
    return (x->best_id > y->best_id) - (x->best_id < y->best_id);
}

/* An endpoint is preferred as a start when more frequent, then when its id is smaller. */
static int placement_better(const uint32_t * co, uint32_t n, int32_t a, int32_t b) {
    uint32_t fa = co[(size_t) a * n + a], fb = co[(size_t) b * n + b];
    return fa != fb ? fa > fb : a < b;
}

int ripple_greedy_path(int32_t n_, const uint32_t * co, int32_t * order) {
    if (n_ <= 0 || n_ > 65535 || !co || !order) return -1;
    const uint32_t n = (uint32_t) n_;
    uint64_t m = 0;
    uint32_t * pairs = placement_sorted_pairs(n, co, &m);
    int32_t * adj = malloc((size_t) 2 * n * sizeof(*adj)); /* two neighbours, -1 = none */
    int32_t * parent = malloc((size_t) n * sizeof(*parent));
    placement_fragment * frag = malloc((size_t) n * sizeof(*frag));
    int32_t * slot = malloc((size_t) n * sizeof(*slot)); /* root -> its index in frag, -1 */
    if (!pairs || !adj || !parent || !frag || !slot) {
        free(pairs); free(adj); free(parent); free(frag); free(slot);
        return -1;
    }
    for (uint32_t i = 0; i < n; i++) {
        adj[2 * i] = adj[2 * i + 1] = -1;
        parent[i] = (int32_t) i;
    }

    /* join: both ends must be fragment endpoints of different fragments; n - 1 joins at most */
    uint32_t joins = 0;
    for (uint64_t k = 0; k < m && joins + 1 < n; k++) {
        int32_t i = (int32_t) (pairs[k] / n), j = (int32_t) (pairs[k] % n);
        if (adj[2 * i + 1] >= 0 || adj[2 * j + 1] >= 0) continue; /* degree 2 already */
        int32_t ri = placement_find(parent, i), rj = placement_find(parent, j);
        if (ri == rj) continue;
        parent[ri] = rj;
        adj[2 * i + (adj[2 * i] >= 0)] = j;
        adj[2 * j + (adj[2 * j] >= 0)] = i;
        joins++;
    }
    free(pairs);

    /* link the fragments: by most frequent member (descending, then id), each walked from its
     * better endpoint (more frequent, then smaller id). Any two endpoints of different fragments
     * have co = 0 here (else the loop would have joined them), so this choice costs nothing in
     * adjacent co-activation; it only makes the order deterministic and readable. */
    uint32_t n_frag = 0;
    for (uint32_t i = 0; i < n; i++) slot[i] = -1;
    for (uint32_t i = 0; i < n; i++) {
        int32_t r = placement_find(parent, (int32_t) i);
        uint32_t f = co[(size_t) i * n + i];
        if (slot[r] < 0) {
            slot[r] = (int32_t) n_frag;
            frag[n_frag++] = (placement_fragment) {f, (int32_t) i, -1};
        } else if (f > frag[slot[r]].best_freq) { /* ids ascend: equal keeps the smaller */
            frag[slot[r]].best_freq = f;
            frag[slot[r]].best_id = (int32_t) i;
        }
        if (adj[2 * i + 1] < 0) { /* endpoint (degree 0 or 1) */
            placement_fragment * fr = &frag[slot[r]];
            if (fr->start < 0 || placement_better(co, n, (int32_t) i, fr->start)) fr->start = (int32_t) i;
        }
    }
    qsort(frag, n_frag, sizeof(*frag), placement_fragment_cmp);

    uint32_t p = 0;
    for (uint32_t f = 0; f < n_frag; f++) {
        int32_t prev = -1, cur = frag[f].start;
        while (cur >= 0) {
            if (p >= n) { p = n + 1; break; } /* a cycle: cannot happen with union-find */
            order[p++] = cur;
            int32_t next = adj[2 * cur] != prev ? adj[2 * cur] : adj[2 * cur + 1];
            prev = cur;
            cur = next;
        }
    }
    free(adj); free(parent); free(frag); free(slot);
    return p == n ? 0 : -1;
}
