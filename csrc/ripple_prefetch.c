/* Next-layer prefetch (sparse mode, one-token batches): after a layer's fetch, the next layer's
 * predictor runs on this layer's FFN input and a thread of its own reads what it selects (minus
 * cached bundles) while this layer and the next layer's attention compute; the next fetch takes
 * the bundles from it. */
#include "ripple.h"
#include "ripple_base.h"
#include "ripple_cache.h"
#include "ripple_fetch.h"
#include "ripple_io.h"
#include "ripple_predict.h"
#include "ripple_prefetch.h"
#include "ripple_trace.h"

#include <stdlib.h>
#include <string.h>

static void * prefetch_main(void * arg) {
    ripple_prefetch * pf = arg;
    pthread_mutex_lock(&pf->mu);
    for (;;) {
        while (!pf->queued && !pf->quit) {
            pthread_cond_wait(&pf->cv, &pf->mu);
        }
        if (pf->quit) {
            break;
        }
        pf->queued = 0;
        pthread_mutex_unlock(&pf->mu);
        uint64_t bytes = 0, t0 = ripple_now_ns();
        int rc = ripple_io_run(pf->reqs, pf->n_req, pf->m->path, &bytes);
        uint64_t ns = ripple_now_ns() - t0;
        pthread_mutex_lock(&pf->mu);
        pf->rc = rc;
        pf->bytes = bytes;
        pf->ns = ns;
        pf->valid = rc == 0;
        pf->busy = 0;
        pthread_cond_broadcast(&pf->cv);
    }
    pthread_mutex_unlock(&pf->mu);
    return NULL;
}

static void prefetch_wait(ripple_prefetch * pf) {
    const uint64_t t0 = ripple_now_ns();
    pthread_mutex_lock(&pf->mu);
    const int was_busy = pf->busy;
    while (pf->busy) {
        pthread_cond_wait(&pf->cv, &pf->mu);
    }
    pthread_mutex_unlock(&pf->mu);
    if (was_busy) { /* compute waiting for a read-ahead to finish */
        RIPPLE_COUNT(io_exposed_ns, ripple_now_ns() - t0);
    }
}

void ripple_prefetch_free(ripple_prefetch * pf) {
    if (pf->started) {
        prefetch_wait(pf);
        pthread_mutex_lock(&pf->mu);
        pf->quit = 1;
        pthread_cond_broadcast(&pf->cv);
        pthread_mutex_unlock(&pf->mu);
        pthread_join(pf->tid, NULL);
        pthread_mutex_destroy(&pf->mu);
        pthread_cond_destroy(&pf->cv);
    }
    free(pf->buf);
    free(pf->have);
    free(pf->read_len);
    free(pf->scratch);
    free(pf->reqs);
    memset(pf, 0, sizeof(*pf));
}

void ripple_prefetch_start(ripple_prefetch * pf, ripple_pool * pool, int n_threads, ripple_model * m, int layer,
                           const struct ggml_tensor * src1) {
    if (layer < 0 || layer >= m->n_layers || src1->ne[1] != 1) {
        return;
    }
    const ripple_layer * L = &m->layers[layer];
    const ripple_predictor * pred = L->d.n_embd == src1->ne[0] ? ripple_layer_predictor(m, layer) : NULL;
    if (!pred) {
        return; /* (a predictor that cannot be loaded fails that layer's own fetch) */
    }
    prefetch_wait(pf);
    pf->valid = 0;
    const int64_t n = L->d.n_ff;
    const size_t bs = L->d.bundle_size;
    if (pf->buf_cap < (size_t) n * bs) {
        free(pf->buf);
        pf->buf = malloc((size_t) n * bs);
        pf->buf_cap = pf->buf ? (size_t) n * bs : 0;
    }
    if (pf->n_cap < (size_t) n) {
        free(pf->have);
        free(pf->read_len);
        free(pf->scratch);
        free(pf->reqs);
        pf->have = malloc((size_t) n);
        pf->read_len = malloc(sizeof(int32_t) * (size_t) n);
        pf->scratch = malloc(2 * (size_t) n);
        pf->reqs = malloc(sizeof(ripple_io_req) * (size_t) n);
        pf->n_cap = pf->have && pf->read_len && pf->scratch && pf->reqs ? (size_t) n : 0;
    }
    if (!pf->buf || pf->n_cap < (size_t) n) {
        return; /* no memory: no prefetch, the fetch reads everything itself */
    }
    if (!pf->started) {
        pthread_mutex_init(&pf->mu, NULL);
        pthread_cond_init(&pf->cv, NULL);
        if (pthread_create(&pf->tid, NULL, prefetch_main, pf) != 0) {
            return;
        }
        pf->started = 1;
    }
    uint64_t t0 = ripple_now_ns();
    uint8_t * need = pf->scratch, * tok = pf->scratch + n;
    ripple_predict(pool, n_threads, pred, L, src1, need, tok); /* on the compute threads, as the layer's own */
    RIPPLE_COUNT(predictor_ns, ripple_now_ns() - t0);
    pthread_mutex_lock(&m->mu);
    for (int64_t p = 0; p < n; p++) {
        pf->have[p] = need[L->order[p]] && ripple_cache_where(&m->cache, layer, p) < 0;
    }
    pthread_mutex_unlock(&m->mu);
    int direct = 0;
    const int fd = ripple_read_fd(m, &direct);
    uint64_t planned = 0, extra = 0;
    pf->n_req = 0;
    ripple_fetch_requests(L, fd, direct, pf->have, ripple_get_collapse_bytes() / (int64_t) bs, pf->buf, pf->reqs,
                          &pf->n_req, pf->read_len, &planned, &extra);
    if (pf->n_req == 0) {
        return;
    }
    for (int i = 0; i < pf->n_req; i++) { /* gap bundles merged into a request are in buf too */
        const int64_t p0 = (int64_t) ((pf->reqs[i].offset - L->d.bundles_offset) / bs);
        memset(pf->have + p0, 1, pf->reqs[i].len / bs);
    }
    ripple_iolog_record(layer, 1, pf->reqs, pf->n_req);
    RIPPLE_COUNT(read_ops, pf->n_req);
    RIPPLE_COUNT(collapse_extra_bytes, extra);
    pthread_mutex_lock(&pf->mu);
    pf->m = m;
    pf->layer = layer;
    pf->busy = 1;
    pf->queued = 1;
    pthread_cond_broadcast(&pf->cv);
    pthread_mutex_unlock(&pf->mu);
}

const ripple_prefetch * ripple_prefetch_take(ripple_prefetch * pf, ripple_model * m, int layer) {
    if (!pf->started) {
        return NULL;
    }
    uint64_t t0 = ripple_now_ns();
    pthread_mutex_lock(&pf->mu);
    const int was_busy = pf->busy;
    while (pf->busy) {
        pthread_cond_wait(&pf->cv, &pf->mu);
    }
    const int hit = pf->valid && pf->m == m && pf->layer == layer;
    const uint64_t bytes = pf->bytes, ns = pf->ns;
    const int had = pf->valid || pf->rc != 0;
    pf->bytes = 0;
    pf->ns = 0;
    pf->rc = 0;
    if (!hit) {
        pf->valid = 0;
    }
    pthread_mutex_unlock(&pf->mu);
    if (was_busy) { /* the wait is I/O the compute did not hide */
        const uint64_t waited = ripple_now_ns() - t0;
        RIPPLE_COUNT(io_ns, waited);
        RIPPLE_COUNT(io_exposed_ns, waited);
    }
    if (had) {
        RIPPLE_COUNT(bytes_read, bytes);
        RIPPLE_COUNT(prefetch_bytes, bytes);
        RIPPLE_COUNT(prefetch_ns, ns);
    }
    return hit ? pf : NULL;
}
