/* Sparse mode: the per-layer predictors (which bundles a token needs), and the read of a layer's
 * needed bundles as runs of consecutive positions, with access collapse. */
#define _GNU_SOURCE
#include "ripple_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#if defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* ---- predictor blob (ripple_gguf/predictor.py, docs/FORMAT.md 3b) ---- */

#define RIPPLE_PREDICTOR_VERSION 2 /* predictor.VERSION */

static size_t pad64(size_t n) {
    return (n + 63) & ~(size_t) 63;
}

void ripple_predictor_free(ripple_predictor * p) {
    if (p) {
        free(p->x_shift);
        free(p->x_scale);
        free(p->w1t);
        free(p->b1);
        free(p->w2t);
        free(p->b2);
        free(p->sk.blob);
        free(p);
    }
}

static int all_finite(const float * v, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(v[i])) {
            return 0;
        }
    }
    return 1;
}

/* no f16 infinity or nan (exponent bits all ones) */
static int all_finite_f16(const ggml_fp16_t * v, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if ((v[i] & 0x7C00) == 0x7C00) {
            return 0;
        }
    }
    return 1;
}

ripple_predictor * ripple_predictor_load(const uint8_t * blob, size_t size, int n_embd, int n_ff,
                                         char * err, size_t err_len) {
    uint32_t hdr[7];
    if (size >= 64 && memcmp(blob, "RPSK", 4) == 0) {
        ripple_predictor * p = calloc(1, sizeof(*p));
        if (!p) {
            snprintf(err, err_len, "out of memory for a predictor");
            return NULL;
        }
        if (ripple_sketch_load(p, blob, size, n_embd, n_ff, err, err_len) != 0) {
            free(p);
            return NULL;
        }
        return p;
    }
    if (size < 64 || memcmp(blob, "RPRD", 4) != 0) {
        snprintf(err, err_len, "predictor blob has no RPRD or RPSK header");
        return NULL;
    }
    memcpy(hdr, blob, sizeof(hdr));
    const uint32_t version = hdr[1], e = hdr[2], f = hdr[3], rank = hdr[4], blob_size = hdr[6];
    float threshold;
    memcpy(&threshold, blob + 20, 4);
    if (version != RIPPLE_PREDICTOR_VERSION) {
        snprintf(err, err_len, "predictor blob version %u is not supported (this build reads version %d): "
                 "convert the model again", version, RIPPLE_PREDICTOR_VERSION);
        return NULL;
    }
    if ((int) e != n_embd || (int) f != n_ff || rank == 0 || blob_size != size) {
        snprintf(err, err_len, "predictor blob (%u x %u, rank %u, %u bytes) does not fit a layer of "
                 "%d x %d in %zu bytes", e, f, rank, blob_size, n_embd, n_ff, size);
        return NULL;
    }
    const size_t o_sc = 64 + pad64(4 * (size_t) e);
    const size_t o_w1 = o_sc + pad64(4 * (size_t) e);
    const size_t o_b1 = o_w1 + pad64(2 * (size_t) rank * e);
    const size_t o_w2 = o_b1 + pad64(4 * (size_t) rank);
    const size_t o_b2 = o_w2 + pad64(2 * (size_t) f * rank);
    if (o_b2 + pad64(4 * (size_t) f) != size) {
        snprintf(err, err_len, "predictor blob size %zu does not match its dimensions", size);
        return NULL;
    }
    ripple_predictor * p = calloc(1, sizeof(*p));
    if (!p) {
        snprintf(err, err_len, "out of memory for a predictor");
        return NULL;
    }
    p->rank = (int32_t) rank;
    p->threshold = threshold;
    p->x_shift = malloc(sizeof(float) * e);
    p->x_scale = malloc(sizeof(float) * e);
    p->w1t = malloc(sizeof(ggml_fp16_t) * rank * e);
    p->b1 = malloc(sizeof(float) * rank);
    p->w2t = malloc(sizeof(ggml_fp16_t) * (size_t) f * rank);
    p->b2 = malloc(sizeof(float) * f);
    if (!p->x_shift || !p->x_scale || !p->w1t || !p->b1 || !p->w2t || !p->b2) {
        ripple_predictor_free(p);
        snprintf(err, err_len, "out of memory for a predictor");
        return NULL;
    }
    memcpy(p->x_shift, blob + 64, 4 * (size_t) e);
    memcpy(p->x_scale, blob + o_sc, 4 * (size_t) e);
    memcpy(p->w1t, blob + o_w1, sizeof(ggml_fp16_t) * rank * e);
    memcpy(p->b1, blob + o_b1, 4 * (size_t) rank);
    memcpy(p->w2t, blob + o_w2, sizeof(ggml_fp16_t) * (size_t) f * rank);
    memcpy(p->b2, blob + o_b2, 4 * (size_t) f);
    /* a non-finite value would select every neuron or none, silently */
    const char * bad = !isfinite(threshold) ? "threshold"
                     : !all_finite(p->x_shift, e) || !all_finite(p->x_scale, e) ? "input standardisation"
                     : !all_finite_f16(p->w1t, (size_t) rank * e) || !all_finite(p->b1, rank) ? "first layer"
                     : !all_finite_f16(p->w2t, (size_t) f * rank) || !all_finite(p->b2, f) ? "second layer" : NULL;
    if (bad) {
        ripple_predictor_free(p);
        snprintf(err, err_len, "predictor blob: %s holds inf or nan", bad);
        return NULL;
    }
    return p;
}

/* Dot product of f16 weights and f32 values with 8 independent partial sums (one vector register),
 * combined in a fixed order: the same order of additions for every call, so a token's selection
 * never depends on the batch. */
static float dot(const ggml_fp16_t * a, const float * b, int64_t n) {
    float acc[8] = { 0 };
    int64_t i = 0;
#if defined(__F16C__) && defined(__FMA__)
    __m256 v = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        v = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (a + i))), _mm256_loadu_ps(b + i), v);
    }
    _mm256_storeu_ps(acc, v);
#else
    for (; i + 8 <= n; i += 8) {
        for (int k = 0; k < 8; k++) {
            acc[k] += ggml_fp16_to_fp32(a[i + k]) * b[i + k];
        }
    }
#endif
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) {
        s += ggml_fp16_to_fp32(a[i]) * b[i];
    }
    return s;
}

typedef struct {
    const ripple_predictor *   p;
    const ripple_layer *       L;
    const struct ggml_tensor * src1;
    uint8_t *                  tok;
    float *                    hid; /* n_tokens x rank */
    float *                    z;   /* n_tokens x n_embd: the standardised inputs */
} predict_job;

/* tokens split among threads; a single token's neurons split among them instead (its hidden layer
 * computed by thread 0, then shared after a barrier) */
static void predict_task(void * v, int ith, int nth) {
    const predict_job * j = v;
    const ripple_predictor * p = j->p;
    const int64_t n_embd = j->L->d.n_embd, n_ff = j->L->d.n_ff, T = j->src1->ne[1];
    const int split_tokens = T > 1 || nth == 1;
    const int64_t t0 = split_tokens ? T * ith / nth : 0, t1 = split_tokens ? T * (ith + 1) / nth : T;
    const int64_t i0 = split_tokens ? 0 : n_ff * ith / nth, i1 = split_tokens ? n_ff : n_ff * (ith + 1) / nth;
    for (int64_t t = t0; t < t1; t++) {
        const float * x = (const float *) ((const char *) j->src1->data + t * j->src1->nb[1]);
        float * hid = j->hid + (size_t) t * (size_t) p->rank;
        if (split_tokens || ith == 0) {
            float * z = j->z + (size_t) t * (size_t) n_embd;
            for (int64_t k = 0; k < n_embd; k++) {
                z[k] = (x[k] - p->x_shift[k]) * p->x_scale[k];
            }
            for (int32_t r = 0; r < p->rank; r++) {
                const float v = dot(p->w1t + (size_t) r * n_embd, z, n_embd) + p->b1[r];
                hid[r] = v > 0.0f ? v : 0.0f;
            }
        }
#ifdef RIPPLE_OPENMP
        if (!split_tokens) {
            #pragma omp barrier
        }
#endif
        uint8_t * m = j->tok + t * n_ff;
        for (int64_t i = i0; i < i1; i++) {
            m[i] = dot(p->w2t + (size_t) i * p->rank, hid, p->rank) + p->b2[i] > p->threshold;
        }
    }
}

/* tok[t * n_ff + i] = 1 when the predictor selects neuron i for token t of src1; need[i] = 1 for
 * the union over the tokens. Returns the number of (token, neuron) pairs selected. pool NULL: this
 * thread alone. */
int64_t ripple_predict(ripple_pool * pool, int n_threads, const ripple_predictor * p, const ripple_layer * L,
                       const struct ggml_tensor * src1, uint8_t * need, uint8_t * tok) {
    const int64_t n_ff = L->d.n_ff, T = src1->ne[1];
    float * buf = p->kind == RIPPLE_PREDICTOR_SKETCH ? NULL
                : malloc(sizeof(float) * ((size_t) p->rank + (size_t) L->d.n_embd) * (size_t) T);
    predict_job j = { p, L, src1, tok, buf, buf ? buf + (size_t) p->rank * (size_t) T : NULL };
    if (p->kind == RIPPLE_PREDICTOR_SKETCH) {
        ripple_sketch_predict(pool, n_threads, p, L, src1, tok, NULL);
    } else if (!buf) {
        memset(tok, 1, (size_t) (n_ff * T)); /* no memory for the predictor: every neuron */
    } else if (pool && n_threads > 1 && (T > 1 || ripple_pool_is_openmp())) {
        ripple_pool_run(pool, n_threads, predict_task, &j);
    } else {
        predict_task(&j, 0, 1);
    }
    free(buf);
    int64_t selected = 0;
    memset(need, 0, (size_t) n_ff);
    for (int64_t t = 0; t < T; t++) {
        const uint8_t * m = tok + t * n_ff;
        for (int64_t i = 0; i < n_ff; i++) {
            need[i] |= m[i];
            selected += m[i];
        }
    }
    return selected;
}

/* ---- reading a layer's needed bundles ---- */

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
            fprintf(stderr, "ripple: warning: %s: O_DIRECT refused (%s); reading through the page cache\n", m->path, why);
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

/* ---- next-layer prefetch ---- */

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

void ripple_prefetch_start(ripple_prefetch * pf, ripple_model * m, int layer, const struct ggml_tensor * src1) {
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
    ripple_predict(NULL, 1, pred, L, src1, need, tok);
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
    form_requests(L, fd, direct, pf->have, ripple_get_collapse_bytes() / (int64_t) bs, pf->buf, pf->reqs,
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
