/* A layer's fetch: the bundles a batch needs, found in the neuron cache or read from the file as
 * runs of consecutive positions (access collapse merging runs separated by short gaps, the cost
 * model choosing for batches of several tokens between those runs and streaming the whole layer),
 * checked against the checksum table, and offered to the cache once the layer's compute is done.
 * Reads may overlap compute: a reader thread per fetch reads them in pieces. */
#define _GNU_SOURCE
#include "ripple.h"
#include "ripple_base.h"
#include "ripple_cache.h"
#include "ripple_cost.h"
#include "ripple_fetch.h"
#include "ripple_io.h"
#include "ripple_prefetch.h"
#include "ripple_trace.h"
#include "ripple_verify.h"

#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* The descriptor reads go through: O_DIRECT when the setting is on and the file system accepts it
 * (opened once per model; a refusal is reported once and buffered reads are used). */
int ripple_read_fd(ripple_model * m, int * direct) {
    *direct = 0;
    if (!ripple_get_direct_io()) {
        return m->fd;
    }
    pthread_mutex_lock(&m->mu);
    if (m->direct_state == 0) {
        char why[256];
        struct stat st;
        m->dfd = fstat(m->fd, &st) == 0 ? ripple_open_direct(m->path, st.st_dev, st.st_ino, why, sizeof(why)) : -1;
        m->direct_state = m->dfd >= 0 ? 1 : -1;
        if (m->dfd < 0) {
            RIPPLE_LOG_WARN("ripple: warning: %s: O_DIRECT refused (%s); reading through the page cache\n", m->path, why);
        }
    }
    int fd = m->direct_state == 1 ? m->dfd : m->fd;
    pthread_mutex_unlock(&m->mu);
    *direct = fd != m->fd;
    return fd;
}

#define RIPPLE_STREAM_CHUNK (1u << 20) /* a streamed layer is read in requests of this size */

static void count_max_run(uint64_t max_run) {
    uint64_t prev = __atomic_load_n(&g_ripple_counters.max_run_length, __ATOMIC_RELAXED);
    while (max_run > prev &&
           !__atomic_compare_exchange_n(&g_ripple_counters.max_run_length, &prev, max_run, 0, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
    }
}

/* Requests for the positions flagged in `missing`: runs of consecutive positions, runs separated by
 * at most `gap` positions merged (access collapse); read_len[p] = bundles in p's request. */
static void form_requests(const ripple_layer * L, int fd, int direct, const uint8_t * missing, int64_t gap,
                          uint8_t * dst, ripple_io_req * reqs, int * n_req, int32_t * read_len, uint64_t * planned,
                          uint64_t * extra) {
    const size_t bs = L->d.bundle_size;
    const int64_t n = L->d.n_ff;
    for (int64_t p = 0; p < n;) {
        if (!missing[p]) {
            p++;
            continue;
        }
        int64_t last = p; /* [p, last] is the request; extend over short gaps */
        uint64_t gap_bytes = 0;
        for (int64_t q = p + 1; q < n; q++) {
            if (missing[q]) {
                gap_bytes += (uint64_t) (q - last - 1) * bs;
                last = q;
            } else if (q - last > gap) {
                break;
            }
        }
        for (int64_t r = p; r <= last; r++) {
            read_len[r] = (int32_t) (last - p + 1);
        }
        *extra += gap_bytes;
        reqs[(*n_req)++] = (ripple_io_req){ fd, direct, L->d.bundles_offset + (uint64_t) p * bs,
                                            (size_t) (last - p + 1) * bs, dst + p * bs };
        *planned += (uint64_t) (last - p + 1) * bs;
        p = last + 1;
    }
}

void ripple_fetch_requests(const ripple_layer * L, int fd, int direct, const uint8_t * missing, int64_t gap,
                           uint8_t * dst, ripple_io_req * reqs, int * n_req, int32_t * read_len, uint64_t * planned,
                           uint64_t * extra) {
    form_requests(L, fd, direct, missing, gap, dst, reqs, n_req, read_len, planned, extra);
}

/* Offer the bundles read (flagged in `read`) to the cache. */
static void admit(ripple_model * m, int layer, const uint8_t * dst, const uint8_t * read, const int32_t * read_len) {
    const ripple_layer * L = &m->layers[layer];
    const size_t bs = L->d.bundle_size;
    pthread_mutex_lock(&m->mu);
    for (int64_t p = 0; p < L->d.n_ff; p++) {
        if (read[p]) {
            ripple_cache_put(&m->cache, layer, p, dst + p * bs, bs, read_len[p]);
        }
    }
    pthread_mutex_unlock(&m->mu);
}

/* ---- overlapped reads: a reader thread per fetch reads the pieces one after the other ---- */

static void * reader_main(void * arg) {
    ripple_fetch * f = arg;
    pthread_mutex_lock(&f->mu);
    for (;;) {
        while (!f->quit && !f->queued) {
            pthread_cond_wait(&f->cv, &f->mu);
        }
        if (f->quit) {
            break;
        }
        f->queued = 0;
        const int n_pieces = f->n_pieces;
        const char * path = f->m->path;
        for (int k = 0; k < n_pieces; k++) {
            const int r0 = k ? f->req_end[k - 1] : 0, r1 = f->req_end[k];
            const int failed = f->read_rc != 0;
            pthread_mutex_unlock(&f->mu);
            uint64_t bytes = 0, t0 = ripple_now_ns();
            const int rc = failed ? -1 : ripple_io_run(f->reqs + r0, r1 - r0, path, &bytes);
            const uint64_t ns = ripple_now_ns() - t0;
            pthread_mutex_lock(&f->mu);
            f->bytes += bytes;
            f->io_ns += ns;
            if (rc != 0) {
                f->read_rc = -1; /* the later pieces are not read */
            }
            f->landed = k + 1;
            pthread_cond_broadcast(&f->cv);
        }
    }
    pthread_mutex_unlock(&f->mu);
    return NULL;
}

static int reader_start(ripple_fetch * f) {
    if (!f->started) {
        pthread_mutex_init(&f->mu, NULL);
        pthread_cond_init(&f->cv, NULL);
        if (pthread_create(&f->tid, NULL, reader_main, f) != 0) {
            pthread_mutex_destroy(&f->mu);
            pthread_cond_destroy(&f->cv);
            return -1;
        }
        f->started = 1;
    }
    pthread_mutex_lock(&f->mu);
    f->landed = 0;
    f->read_rc = 0;
    f->bytes = 0;
    f->io_ns = 0;
    f->queued = 1;
    pthread_cond_broadcast(&f->cv);
    pthread_mutex_unlock(&f->mu);
    return 0;
}

int ripple_fetch_piece(ripple_fetch * f, int k) {
    if (k < f->verified) {
        return f->rc;
    }
    const uint64_t t0 = ripple_now_ns();
    pthread_mutex_lock(&f->mu);
    while (f->landed <= k) {
        pthread_cond_wait(&f->cv, &f->mu);
    }
    const int read_rc = f->read_rc;
    pthread_mutex_unlock(&f->mu);
    RIPPLE_COUNT(io_exposed_ns, ripple_now_ns() - t0);
    for (; f->verified <= k; f->verified++) {
        const int j = f->verified;
        const int64_t c0 = j ? f->check_end[j - 1] : 0;
        if (f->rc == 0 && read_rc != 0) {
            f->rc = -1; /* the reader set the error */
        }
        if (f->rc == 0) {
            f->rc = ripple_verify_bundles(f->m, f->layer, f->dst, f->check + c0, f->check_end[j] - c0);
        }
    }
    if (f->verified == f->n_pieces) { /* everything landed: the reader's totals */
        RIPPLE_COUNT(io_ns, f->io_ns);
        RIPPLE_COUNT(bytes_read, f->bytes);
        f->n_pieces = 0;
        f->pending = f->rc == 0 && f->m->cache.n_slots > 0;
    }
    return f->rc;
}

int ripple_fetch_finish(ripple_fetch * f) {
    if (f->n_pieces == 0) {
        return 0;
    }
    return ripple_fetch_piece(f, f->n_pieces - 1);
}

/* Fetch the bundles at the positions flagged in `need` (NULL = all): cache hits are used where they
 * are (with f; without f they are copied into dst), misses read into dst as runs of consecutive
 * positions, runs separated by a gap the collapse setting covers merged into one request (access
 * collapse), the layer's requests issued together to the I/O engine. For a batch of several tokens
 * the cost model chooses between those requests and streaming the whole layer. Counts the runs of
 * needed positions (the placement's quality, before cache and collapse). With f, f->ptr[p] is where
 * bundle p is and the bundles read are offered to the cache by ripple_fetch_admit once the layer's
 * compute is done (admitting them now could evict a slot the compute reads); without f they are
 * offered at once. With f and overlap the reads are left in flight in pieces (see ripple_fetch). */
int ripple_fetch_bundles(ripple_model * m, int layer, const uint8_t * need, int64_t n_tokens, uint8_t * dst,
                         const ripple_prefetch * pf, ripple_fetch * f, int overlap) {
    const ripple_layer * L = &m->layers[layer];
    const size_t bs = L->d.bundle_size;
    const int64_t n = L->d.n_ff;
    const int64_t gap = ripple_get_collapse_bytes() / (int64_t) bs;
    if (f) {
        if (ripple_fetch_finish(f) != 0) { /* never leave reads in flight into a buffer being reused */
            f->n_pieces = 0;
        }
        ripple_fetch_admit(f); /* a fetch whose compute did not finish: its reads are still good */
        if (f->cap < n) {
            free(f->ptr);
            free(f->admit);
            free(f->read_len);
            free(f->list);
            free(f->check);
            free(f->reqs);
            f->ptr = malloc(sizeof(*f->ptr) * (size_t) n);
            f->admit = malloc((size_t) n);
            f->read_len = malloc(sizeof(int32_t) * (size_t) n);
            f->list = malloc(sizeof(int32_t) * (size_t) n);
            f->check = malloc(sizeof(int64_t) * (size_t) n);
            f->reqs = malloc(sizeof(ripple_io_req) * (size_t) (n + 1));
            f->cap = f->ptr && f->admit && f->read_len && f->list && f->check && f->reqs ? n : 0;
            if (!f->cap) {
                ripple_set_error("out of memory");
                return -1;
            }
        }
        f->n_pieces = 0;
        f->verified = 0;
        f->rc = 0;
    }
    uint8_t * missing = f ? f->admit : malloc((size_t) n);
    int32_t * read_len = f ? f->read_len : malloc(sizeof(int32_t) * (size_t) n); /* length of the read a bundle came in */
    ripple_io_req * reqs = f ? f->reqs : malloc(sizeof(ripple_io_req) * (size_t) (n + 1));
    int64_t * check = f ? f->check : malloc(sizeof(int64_t) * (size_t) n); /* positions whose bytes came from the file */
    if (!missing || !read_len || !reqs || !check) {
        if (!f) {
            free(missing);
            free(read_len);
            free(reqs);
            free(check);
        }
        ripple_set_error("out of memory");
        return -1;
    }
    uint64_t hits = 0, misses = 0, runs = 0, needed = 0, max_run = 0, cur = 0, pf_used = 0;
    uint8_t * from_pf = pf ? calloc((size_t) n, 1) : NULL;
    pthread_mutex_lock(&m->mu);
    for (int64_t p = 0; p < n; p++) {
        missing[p] = 0;
        if (need && !need[p]) {
            cur = 0;
            continue;
        }
        needed++;
        if (++cur == 1) {
            runs++;
        }
        if (cur > max_run) {
            max_run = cur;
        }
        const uint8_t * c = ripple_cache_get(&m->cache, layer, p);
        if (f) {
            f->ptr[p] = c ? c : dst + p * bs;
        }
        if (c) {
            if (!f) {
                memcpy(dst + p * bs, c, bs);
            }
            hits++;
        } else if (from_pf && pf->have[p]) {
            memcpy(dst + p * bs, pf->buf + p * bs, bs); /* read ahead: a miss whose read is done */
            read_len[p] = pf->read_len[p];
            from_pf[p] = 1;
            pf_used++;
            misses++;
        } else {
            missing[p] = 1;
            misses++;
        }
    }
    pthread_mutex_unlock(&m->mu);
    RIPPLE_COUNT(prefetch_used_bytes, pf_used * bs);

    int direct = 0;
    const int fd = ripple_read_fd(m, &direct);
    int n_req = 0;
    uint64_t planned = 0, extra = 0;
    form_requests(L, fd, direct, missing, gap, dst, reqs, &n_req, read_len, &planned, &extra);
    int streamed = 0;
    if (n_tokens > 1 && n_req > 1) {
        const uint64_t dense = (uint64_t) n * bs;
        const int64_t chunks = (int64_t) ((dense + RIPPLE_STREAM_CHUNK - 1) / RIPPLE_STREAM_CHUNK);
        if (ripple_cost_batch(chunks, dense) < ripple_cost_batch(n_req, planned)) {
            /* streaming the layer is cheaper: consecutive chunks covering every bundle */
            const size_t per = (size_t) ((n + chunks - 1) / chunks) * bs;
            n_req = 0;
            for (uint64_t off = 0; off < dense; off += per) {
                const size_t len = dense - off < per ? (size_t) (dense - off) : per;
                reqs[n_req++] = (ripple_io_req){ fd, direct, L->d.bundles_offset + off, len, dst + off };
            }
            for (int64_t p = 0; p < n; p++) {
                read_len[p] = (int32_t) n;
            }
            extra = dense - misses * bs - hits * bs;
            streamed = 1;
        }
    }
    ripple_iolog_record(layer, n_tokens, reqs, n_req);
    RIPPLE_COUNT(read_ops, n_req);
    RIPPLE_COUNT(collapse_extra_bytes, extra);
    RIPPLE_COUNT(stream_reads, streamed);
    RIPPLE_COUNT(cache_hits, hits);
    RIPPLE_COUNT(cache_misses, misses);
    RIPPLE_COUNT(needed_runs, runs);
    RIPPLE_COUNT(needed_bundles, needed);
    RIPPLE_COUNT(needed_bytes, needed * bs);
    RIPPLE_COUNT(dense_bytes, L->dense_bytes);
    count_max_run(max_run);

    /* bytes used from the file now: the misses (read here or ahead), and with a streamed layer
     * every needed bundle that is used from dst (the cached copies are used in place with f) */
#define RIPPLE_FROM_FILE(p) (missing[p] || (from_pf && from_pf[p]) || (streamed && (!need || need[p]) && !f))
    if (f && overlap && n_req > 0) {
        /* pieces of about equal bytes, whole requests each; the needed neurons listed present
         * first, then by the piece their bytes arrive in (requests lie in position order) */
        uint64_t total = 0, acc = 0;
        for (int r = 0; r < n_req; r++) {
            total += reqs[r].len;
        }
        int np = 0;
        for (int r = 0; r < n_req; r++) {
            acc += reqs[r].len;
            if (acc * RIPPLE_FETCH_PIECES >= total * (uint64_t) (np + 1) || r == n_req - 1) {
                f->req_end[np++] = r + 1;
            }
            if (np == RIPPLE_FETCH_PIECES - 1 && r < n_req - 1) {
                f->req_end[np++] = n_req;
                break;
            }
        }
        int64_t k = 0, c = 0;
        for (int64_t p = 0; p < n; p++) {
            if ((!need || need[p]) && !missing[p]) {
                f->list[k++] = L->order[p];
            }
        }
        f->n_ready = k;
        for (int j = 0; j < np; j++) {
            const ripple_io_req * last = &reqs[f->req_end[j] - 1];
            const int64_t p_end = (int64_t) ((last->offset + last->len - L->d.bundles_offset) / bs);
            const int64_t p_start = (int64_t) ((reqs[j ? f->req_end[j - 1] : 0].offset - L->d.bundles_offset) / bs);
            for (int64_t p = p_start; p < p_end; p++) {
                if (missing[p]) {
                    f->list[k++] = L->order[p];
                    check[c++] = p;
                }
            }
            f->piece_end[j] = k;
            f->check_end[j] = c;
        }
        /* bundles read ahead are computed at once: checked now */
        int64_t n_pf = 0;
        for (int64_t p = 0; p < n; p++) {
            if (from_pf && from_pf[p]) {
                check[c + n_pf++] = p;
                missing[p] = 1; /* offered to the cache as read */
            }
        }
        free(from_pf);
        if (n_pf && ripple_verify_bundles(m, layer, dst, check + c, n_pf) != 0) {
            return -1;
        }
        f->m = m;
        f->layer = layer;
        f->dst = dst;
        f->n_pieces = np;
        if (reader_start(f) != 0) {
            f->n_pieces = 0;
            ripple_set_error("cannot start a reader thread");
            return -1;
        }
        return 0;
    }
    uint64_t bytes = 0, t0 = ripple_now_ns();
    int rc = ripple_io_run(reqs, n_req, m->path, &bytes);
    const uint64_t io = ripple_now_ns() - t0;
    RIPPLE_COUNT(io_ns, io);
    RIPPLE_COUNT(io_exposed_ns, io);
    RIPPLE_COUNT(bytes_read, bytes);
    if (rc == 0) {
        int64_t n_check = 0;
        for (int64_t p = 0; p < n; p++) {
            if (RIPPLE_FROM_FILE(p)) {
                check[n_check++] = p;
            }
        }
        rc = ripple_verify_bundles(m, layer, dst, check, n_check);
    }
#undef RIPPLE_FROM_FILE
    if (from_pf) {
        for (int64_t p = 0; p < n; p++) {
            missing[p] |= from_pf[p];
        }
    }
    free(from_pf);
    if (f) {
        f->m = m;
        f->layer = layer;
        f->dst = dst;
        f->pending = rc == 0 && m->cache.n_slots > 0;
        return rc;
    }
    free(reqs);
    free(check);
    if (rc == 0 && m->cache.n_slots > 0) {
        admit(m, layer, dst, missing, read_len);
    }
    free(missing);
    free(read_len);
    return rc;
}

void ripple_fetch_admit(ripple_fetch * f) {
    if (f->n_pieces > 0 && ripple_fetch_finish(f) != 0) {
        f->pending = 0;
    }
    if (f->pending) {
        f->pending = 0;
        admit(f->m, f->layer, f->dst, f->admit, f->read_len);
    }
}

void ripple_fetch_free(ripple_fetch * f) {
    if (f->n_pieces > 0) {
        ripple_fetch_finish(f);
    }
    if (f->started) {
        pthread_mutex_lock(&f->mu);
        f->quit = 1;
        pthread_cond_broadcast(&f->cv);
        pthread_mutex_unlock(&f->mu);
        pthread_join(f->tid, NULL);
        pthread_mutex_destroy(&f->mu);
        pthread_cond_destroy(&f->cv);
    }
    free(f->ptr);
    free(f->admit);
    free(f->read_len);
    free(f->list);
    free(f->check);
    free(f->reqs);
    memset(f, 0, sizeof(*f));
}
