/* The RIPPLE ggml backend: an ACCEL device with its own buffer type that owns the FFN weights
 * of ripple-packed files and computes their MUL_MATs from neuron bundles read from the file.
 * Layout after ggml-blas: backend interface, device interface, registry interface. */
#define _GNU_SOURCE
#include "ripple.h"
#include "ripple_base.h"
#include "ripple_cache.h"
#include "ripple_fetch.h"
#include "ripple_io.h"
#include "ripple_kernels.h"
#include "ripple_loadhook.h"
#include "ripple_model.h"
#include "ripple_predict.h"
#include "ripple_prefetch.h"
#include "ripple_settings.h"
#include "ripple_stats.h"
#include "ripple_trace.h"
#include "ripple_verify.h"

#include <pthread.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ggml-backend-impl.h"
#include "ggml-cpu.h"

#ifndef RIPPLE_GGML_VERSION
#define RIPPLE_GGML_VERSION "unknown"
#endif
#ifndef RIPPLE_GGML_COMMIT
#define RIPPLE_GGML_COMMIT "unknown"
#endif

#define RIPPLE_NAME "RIPPLE"

const char * ripple_built_ggml_version(void) { return RIPPLE_GGML_VERSION; }
const char * ripple_built_ggml_commit(void) { return RIPPLE_GGML_COMMIT; }

static struct ggml_backend_buffer_type g_buft;

/* ---- buffer ---- */

typedef struct {
    void *         base;
    size_t         size;
    ripple_model * model; /* set for weight buffers allocated inside a model's load window */
} ripple_buffer_ctx;

static void ggml_backend_ripple_buffer_free_buffer(ggml_backend_buffer_t buffer) {
    ripple_buffer_ctx * ctx = buffer->context;
    munmap(ctx->base, ctx->size);
    char path[1024];
    if (ctx->model && ripple_model_buffer_unref(ctx->model, path, sizeof(path))) {
        ripple_stats_report(path); /* the model's last buffer: it is freed */
    }
    free(ctx);
}

static void * ggml_backend_ripple_buffer_get_base(ggml_backend_buffer_t buffer) {
    return ((ripple_buffer_ctx *) buffer->context)->base;
}

static const ripple_binding * binding_of(const struct ggml_tensor * t) {
    if (!t || !t->buffer || t->buffer->buft != &g_buft) {
        return NULL;
    }
    return t->extra;
}

static enum ggml_status ggml_backend_ripple_buffer_init_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor) {
    ripple_buffer_ctx * ctx = buffer->context;
    if (ctx->model && tensor->view_src == NULL) {
        const ripple_binding * b = ripple_model_claim(ctx->model, tensor);
        if (b) {
            tensor->extra = (void *) b;
            __atomic_fetch_add(&ctx->model->n_bound, 1, __ATOMIC_RELAXED);
        }
    }
    return GGML_STATUS_SUCCESS;
}

static void ggml_backend_ripple_buffer_memset_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor,
                                                      uint8_t value, size_t offset, size_t size) {
    (void) buffer;
    if (binding_of(tensor)) {
        return; /* weights live in the file */
    }
    memset((char *) tensor->data + offset, value, size);
}

static void ggml_backend_ripple_buffer_set_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor,
                                                   const void * data, size_t offset, size_t size) {
    (void) buffer;
    if (binding_of(tensor)) {
        return; /* the bundles in the file are the weights: nothing to copy (llama.cpp's mapping is never touched) */
    }
    memcpy((char *) tensor->data + offset, data, size);
}

static void ggml_backend_ripple_buffer_get_tensor(ggml_backend_buffer_t buffer, const struct ggml_tensor * tensor,
                                                   void * data, size_t offset, size_t size) {
    (void) buffer;
    const ripple_binding * b = binding_of(tensor);
    if (b) {
        /* a scheduler fallback wants the weight itself: read the standard tensor's bytes */
        if (ripple_read_tensor(b, data, offset, size) != 0) {
            GGML_ABORT("ripple: cannot read weight %s from %s", tensor->name, b->model->path);
        }
        return;
    }
    memcpy(data, (const char *) tensor->data + offset, size);
}

static void ggml_backend_ripple_buffer_clear(ggml_backend_buffer_t buffer, uint8_t value) {
    ripple_buffer_ctx * ctx = buffer->context;
    if (ctx->model) {
        return; /* weight buffer: clearing would commit every page for nothing */
    }
    memset(ctx->base, value, ctx->size);
}

static const struct ggml_backend_buffer_i ggml_backend_ripple_buffer_i = {
    /* .free_buffer   = */ ggml_backend_ripple_buffer_free_buffer,
    /* .get_base      = */ ggml_backend_ripple_buffer_get_base,
    /* .init_tensor   = */ ggml_backend_ripple_buffer_init_tensor,
    /* .memset_tensor = */ ggml_backend_ripple_buffer_memset_tensor,
    /* .set_tensor    = */ ggml_backend_ripple_buffer_set_tensor,
    /* .get_tensor    = */ ggml_backend_ripple_buffer_get_tensor,
    /* .set_tensor_2d = */ NULL,
    /* .get_tensor_2d = */ NULL,
    /* .cpy_tensor    = */ NULL,
    /* .clear         = */ ggml_backend_ripple_buffer_clear,
    /* .reset         = */ NULL,
};

/* ---- buffer type ---- */

static const char * ggml_backend_ripple_buffer_type_get_name(ggml_backend_buffer_type_t buft) {
    (void) buft;
    return RIPPLE_NAME;
}

static ggml_backend_buffer_t ggml_backend_ripple_buffer_type_alloc_buffer(ggml_backend_buffer_type_t buft, size_t size) {
    ripple_buffer_ctx * ctx = calloc(1, sizeof(*ctx));
    if (!ctx) {
        return NULL;
    }
    /* untouched pages cost nothing: weight buffers are never written */
    ctx->size = size ? size : 1;
    ctx->base = mmap(NULL, ctx->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ctx->base == MAP_FAILED) {
        free(ctx);
        return NULL;
    }
    ctx->model = ripple_registry_loading();
    if (ctx->model) {
        ripple_model_buffer_ref(ctx->model);
    }
    return ggml_backend_buffer_init(buft, ggml_backend_ripple_buffer_i, ctx, size);
}

static size_t ggml_backend_ripple_buffer_type_get_alignment(ggml_backend_buffer_type_t buft) {
    (void) buft;
    return 64;
}

static bool ggml_backend_ripple_buffer_type_is_host(ggml_backend_buffer_type_t buft) {
    (void) buft;
    return false; /* see llama-cpp-integration.md: host weights would be read or computed on directly */
}

static struct ggml_backend_buffer_type g_buft = {
    /* .iface = */ {
        /* .get_name       = */ ggml_backend_ripple_buffer_type_get_name,
        /* .alloc_buffer   = */ ggml_backend_ripple_buffer_type_alloc_buffer,
        /* .get_alignment  = */ ggml_backend_ripple_buffer_type_get_alignment,
        /* .get_max_size   = */ NULL,
        /* .get_alloc_size = */ NULL,
        /* .is_host        = */ ggml_backend_ripple_buffer_type_is_host,
    },
    /* .device  = */ NULL, /* set at registration */
    /* .context = */ NULL,
};

/* ---- exact mode's read-ahead: while a layer computes, the next layer's standard tensors are read
 * into a second set of buffers by a thread of its own ---- */

typedef struct {
    pthread_t       tid;
    pthread_mutex_t mu;
    pthread_cond_t  cv;
    int             started, quit, queued, busy;
    ripple_model *  m;      /* target of the batch in flight or landed */
    int             layer;  /* -1: none */
    int             rc;
    uint64_t        bytes, ns;
    int             n_req;
    ripple_io_req   reqs[3];
    uint8_t *       buf[3];
    size_t          cap[3];
} ripple_ahead;

static void * ahead_main(void * arg) {
    ripple_ahead * a = arg;
    pthread_mutex_lock(&a->mu);
    for (;;) {
        while (!a->quit && !a->queued) {
            pthread_cond_wait(&a->cv, &a->mu);
        }
        if (a->quit) {
            break;
        }
        a->queued = 0;
        const char * path = a->m->path;
        pthread_mutex_unlock(&a->mu);
        uint64_t bytes = 0, t0 = ripple_now_ns();
        const int rc = ripple_io_run(a->reqs, a->n_req, path, &bytes);
        const uint64_t ns = ripple_now_ns() - t0;
        RIPPLE_COUNT(io_ns, ns); /* counted when read: a read-ahead nobody uses (the last layer's, for
                                    a next token that never comes) was still read */
        RIPPLE_COUNT(read_ops, a->n_req);
        RIPPLE_COUNT(bytes_read, bytes);
        pthread_mutex_lock(&a->mu);
        a->rc = rc;
        a->bytes = bytes;
        a->ns = ns;
        a->busy = 0;
        pthread_cond_broadcast(&a->cv);
    }
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

/* wait for the batch in flight (if any); the exposed wait is counted as such */
static void ahead_wait(ripple_ahead * a) {
    if (!a->started) {
        return;
    }
    const uint64_t t0 = ripple_now_ns();
    pthread_mutex_lock(&a->mu);
    const int waited = a->busy;
    while (a->busy) {
        pthread_cond_wait(&a->cv, &a->mu);
    }
    pthread_mutex_unlock(&a->mu);
    if (waited) {
        RIPPLE_COUNT(io_exposed_ns, ripple_now_ns() - t0);
    }
}

static void ahead_free(ripple_ahead * a) {
    if (a->started) {
        ahead_wait(a);
        pthread_mutex_lock(&a->mu);
        a->quit = 1;
        pthread_cond_broadcast(&a->cv);
        pthread_mutex_unlock(&a->mu);
        pthread_join(a->tid, NULL);
        pthread_mutex_destroy(&a->mu);
        pthread_cond_destroy(&a->cv);
    }
    for (int k = 0; k < 3; k++) {
        free(a->buf[k]);
    }
    memset(a, 0, sizeof(*a));
}

/* ---- backend interface ---- */

typedef struct {
    int           n_threads;
    ripple_pool * pool;
    /* the layer whose bundles sit in ws: filled by its gate/up matmul, consumed by its down */
    ripple_model * ws_model;
    int            ws_layer;
    int            ws_valid;
    uint8_t *      ws;
    size_t         ws_cap;
    uint8_t *      tbuf[3]; /* exact mode with direct_io: a layer's standard tensors read for one use */
    size_t         tbuf_cap[3];
    ripple_model * tbuf_model; /* whose layer tbuf holds (all three tensors, checked) */
    int            tbuf_layer;
    ripple_ahead   ahead;      /* exact mode with direct_io: the next layer's tensors read meanwhile */
    float *        hbuf;       /* sparse mode's masked activations (n_tokens x n_ff) */
    size_t         hbuf_cap;
    /* sparse mode: selected positions and neurons of the layer in ws (need: n_ff flags, then
     * n_ff int32 positions, then n_ff int32 neurons) */
    uint8_t *      need;
    size_t         need_cap;
    int64_t        n_sel;
    int            sparse;
    uint8_t *      tokmask; /* n_tokens x n_ff: selected per token */
    size_t         tokmask_cap;
    int64_t        n_selected; /* (token, neuron) pairs selected */
    ripple_prefetch pf;        /* next-layer read-ahead */
    ripple_fetch   fetch;      /* where the bundles of the layer in ws are */
} ripple_backend_ctx;

static const char * ggml_backend_ripple_get_name(ggml_backend_t backend) {
    (void) backend;
    return RIPPLE_NAME;
}

static void ggml_backend_ripple_free(ggml_backend_t backend) {
    ripple_backend_ctx * ctx = backend->context;
    ripple_prefetch_free(&ctx->pf);
    ripple_fetch_free(&ctx->fetch);
    ripple_pool_free(ctx->pool);
    free(ctx->ws);
    ahead_free(&ctx->ahead);
    free(ctx->hbuf);
    for (int k = 0; k < 3; k++) {
        free(ctx->tbuf[k]);
    }
    free(ctx->need);
    free(ctx->tokmask);
    free(ctx);
    free(backend);
}

/* Grow a scratch buffer to at least `need` bytes (contents are not kept). */
static int reserve(uint8_t ** buf, size_t * cap, size_t need, const char * what) {
    if (need <= *cap) {
        return 0;
    }
    free(*buf);
    *buf = malloc(need);
    *cap = *buf ? need : 0;
    if (!*buf) {
        ripple_set_error("out of memory for a %zu-byte %s", need, what);
        return -1;
    }
    return 0;
}

/* Make the bundles of the binding's layer available in ws: all of them (exact mode, or a layer
 * without a predictor), or in sparse mode those the predictor selects for the tokens of src1 (the
 * FFN input, at the gate/up matmul). One fetch serves the gate, up and down matmuls of a token
 * batch: the down matmul ends its use. */
static int ensure_layer(ripple_backend_ctx * ctx, const ripple_binding * b, const struct ggml_tensor * src1,
                        int for_down, int overlap) {
    ripple_model * m = b->model;
    const ripple_layer * L = &m->layers[b->layer];
    if (ctx->ws_valid && ctx->ws_model == m && ctx->ws_layer == b->layer) {
        if (for_down) {
            ctx->ws_valid = 0;
        }
        return 0;
    }
    ctx->ws_valid = 0;
    const int64_t n = L->d.n_ff;
    if (reserve(&ctx->ws, &ctx->ws_cap, (size_t) n * L->d.bundle_size, "layer working set") != 0 ||
        reserve((uint8_t **) &ctx->need, &ctx->need_cap, (size_t) n * (1 + 2 * sizeof(int32_t)), "need list") != 0) {
        return -1;
    }
    uint8_t * need_neuron = ctx->need;
    int32_t * positions = (int32_t *) (ctx->need + n);
    int32_t * neurons = positions + n;
    ctx->n_sel = n;
    ctx->sparse = 0;
    const ripple_predictor * pred = NULL;
    if (ripple_mode_of(m) == RIPPLE_MODE_SPARSE && L->has_pred && !for_down) {
        if (!(pred = ripple_layer_predictor(m, b->layer))) {
            return -1;
        }
    }
    if (pred) {
        uint64_t t0 = ripple_now_ns();
        if (reserve(&ctx->tokmask, &ctx->tokmask_cap, (size_t) (n * src1->ne[1]), "token masks") != 0) {
            return -1;
        }
        ctx->n_selected = ripple_predict(ctx->pool, ctx->n_threads, pred, L, src1, need_neuron, ctx->tokmask);
        RIPPLE_COUNT(predictor_ns, ripple_now_ns() - t0);
        /* positions flagged in place of neurons: the fetch works on positions */
        uint8_t * need_pos = (uint8_t *) neurons; /* scratch, rewritten below */
        for (int64_t p = 0; p < n; p++) {
            need_pos[p] = need_neuron[L->order[p]];
        }
        memcpy(need_neuron, need_pos, (size_t) n);
        int64_t k = 0;
        for (int64_t p = 0; p < n; p++) {
            if (need_neuron[p]) {
                positions[k++] = (int32_t) p;
            }
        }
        for (int64_t q = 0; q < k; q++) {
            neurons[q] = L->order[positions[q]];
        }
        ctx->n_sel = k;
        ctx->sparse = 1;
    }
    if (b->layer == 0) {
        RIPPLE_COUNT(tokens, (uint64_t) src1->ne[1]);
    }
    if (ctx->sparse) {
        ripple_trace_record(m->handle, b->layer, src1->ne[1], neurons, ctx->n_sel);
    }
    /* a read-ahead in flight is waited for; its data serves this fetch when it is for this layer */
    const ripple_prefetch * pf = ripple_prefetch_take(&ctx->pf, m, ctx->sparse ? b->layer : -1);
    if (ripple_fetch_bundles(m, b->layer, ctx->sparse ? need_neuron : NULL, src1->ne[1], ctx->ws, pf, &ctx->fetch,
                             overlap && !for_down) != 0) {
        return -1;
    }
    /* (nothing to read ahead when the cache holds every bundle) */
    if (ctx->sparse && src1->ne[1] == 1 && ripple_get_prefetch() && !m->cache.all_fit) {
        ripple_prefetch_start(&ctx->pf, ctx->pool, ctx->n_threads, m, b->layer + 1, src1);
    }
    ctx->ws_model = m;
    ctx->ws_layer = b->layer;
    ctx->ws_valid = !for_down;
    return 0;
}

/* ---- exact mode: the standard tensors ----
 * With exact_down "tensor" (the default) exact mode computes gate, up and down with stock's own dot
 * products on the standard ffn_gate/up/down tensors of the file: stock's bytes and stock's
 * arithmetic. They are
 *   - without direct_io: mapped read-only (page cache, as stock maps its weights), checked against
 *     their checksums when first used and again whenever the file's size or times change;
 *   - with direct_io: kept whole in the cache's arena for as many layers as its budget holds (read
 *     once, in the order the layers are first used: the access is cyclic, so a fixed set of layers
 *     is what any cache keeps at best), the other layers read with O_DIRECT at every use and checked. */

/* byte offset of tensor `kind` inside a resident layer (gate | up | down) */
static size_t std_offset(const ripple_layer * L, int kind) {
    return kind == RIPPLE_GATE ? 0 : kind == RIPPLE_UP ? (size_t) L->tensor_bytes[RIPPLE_GATE]
                                                       : (size_t) (L->tensor_bytes[RIPPLE_GATE] + L->tensor_bytes[RIPPLE_UP]);
}

static uint64_t std_file_offset(const ripple_layer * L, int kind) {
    return kind == RIPPLE_GATE ? L->d.gate_offset : kind == RIPPLE_UP ? L->d.up_offset : L->d.down_offset;
}

/* A 4 KiB-aligned buffer for tensor `kind` of L read straight from the device (O_DIRECT into it):
 * the aligned span from the tensor's offset rounded down, rounded up. */
static size_t std_skip(const ripple_layer * L, int kind) {
    return (size_t) (std_file_offset(L, kind) & 4095u);
}

static int std_buffer(uint8_t ** buf, size_t * cap, const ripple_layer * L, int kind) {
    const size_t need = (std_skip(L, kind) + (size_t) L->tensor_bytes[kind] + 4095u) & ~(size_t) 4095u;
    if (need <= *cap) {
        return 0;
    }
    free(*buf);
    *buf = NULL;
    *cap = 0;
    if (posix_memalign((void **) buf, 4096, need) != 0) {
        *buf = NULL;
        return -1;
    }
    *cap = need;
    return 0;
}

/* the request reading tensor `kind` of L into such a buffer */
static ripple_io_req std_request(const ripple_layer * L, int kind, int fd, uint8_t * buf) {
    return (ripple_io_req){ fd, 2, std_file_offset(L, kind) - std_skip(L, kind),
                            std_skip(L, kind) + (size_t) L->tensor_bytes[kind], buf };
}

/* tensor `kind` of the layer mapped read-only (NULL: the mapping failed) */
static const uint8_t * std_mapping(ripple_model * m, int layer, int kind) {
    ripple_layer * L = &m->layers[layer];
    pthread_mutex_lock(&m->mu);
    if (!L->std_map[kind]) {
        const size_t page = (size_t) sysconf(_SC_PAGESIZE);
        const uint64_t off = std_file_offset(L, kind), start = off / page * page;
        const size_t len = (size_t) (off - start) + L->tensor_bytes[kind];
        void * p = mmap(NULL, len, PROT_READ, MAP_SHARED, m->fd, (off_t) start);
        if (p != MAP_FAILED) {
            L->std_map[kind] = p;
            L->std_map_len[kind] = len;
            L->std_map_skip[kind] = (size_t) (off - start);
        }
    }
    const uint8_t * at = L->std_map[kind] ? (const uint8_t *) L->std_map[kind] + L->std_map_skip[kind] : NULL;
    pthread_mutex_unlock(&m->mu);
    return at;
}

/* check `len` bytes of tensor `kind` at `buf` against the checksums, a few blocks at a time (each
 * checked while in the CPU cache; a multiple of 3 blocks: the CRC runs three side by side) */
static int std_verify(ripple_model * m, int layer, int kind, const uint8_t * buf, uint64_t len) {
    const size_t piece = (size_t) m->crc_block * 6;
    for (uint64_t off = 0; off < len; off += piece) {
        if (ripple_verify_tensor(m, layer, kind, buf + off, off, len - off < piece ? len - off : piece) != 0) {
            return -1;
        }
    }
    return 0;
}

/* read tensors `kinds` (a bit per enum ripple_kind) of the layer with O_DIRECT into dst[kind], and
 * check them */
static int std_read(ripple_model * m, int layer, int fd, int kinds, uint8_t * const dst[3], int in_place) {
    const ripple_layer * L = &m->layers[layer];
    ripple_io_req reqs[3];
    int n = 0;
    for (int k = 0; k < 3; k++) {
        if ((kinds >> k & 1) && L->tensor_bytes[k]) {
            /* in place: dst[k] is a std_buffer, the tensor at dst[k] + std_skip */
            reqs[n++] = in_place ? std_request(L, k, fd, dst[k])
                                 : (ripple_io_req){ fd, 1, std_file_offset(L, k), (size_t) L->tensor_bytes[k], dst[k] };
        }
    }
    uint64_t bytes = 0, t0 = ripple_now_ns();
    int rc = ripple_io_run(reqs, n, m->path, &bytes);
    const uint64_t io = ripple_now_ns() - t0;
    RIPPLE_COUNT(io_ns, io);
    RIPPLE_COUNT(io_exposed_ns, io);
    RIPPLE_COUNT(read_ops, n);
    RIPPLE_COUNT(bytes_read, bytes);
    for (int k = 0; k < 3 && rc == 0; k++) {
        if ((kinds >> k & 1) && L->tensor_bytes[k]) {
            rc = std_verify(m, layer, k, dst[k] + (in_place ? std_skip(L, k) : 0), L->tensor_bytes[k]);
        }
    }
    return rc;
}

/* Start reading the tensors of the first layer after `cur` (cyclically: the next token's) that
 * exact mode reads from the file at its use: not resident, and not about to become resident (that
 * read fills the arena at the use). Nothing when that is `cur` itself or a sparse layer. */
static void ahead_start(ripple_backend_ctx * ctx, ripple_model * m, int cur, int fd) {
    ripple_ahead * a = &ctx->ahead;
    int target = -1;
    for (int d = 1; d < m->n_layers && target < 0; d++) {
        const int l = (cur + d) % m->n_layers;
        const ripple_layer * L = &m->layers[l];
        pthread_mutex_lock(&m->mu);
        const ripple_cache * c = &m->cache;
        const int resident = c->resident && c->resident[l] != NULL; /* kept, or being filled */
        const int will = !resident && c->resident && c->n_used == 0 &&
                         c->resident_used + ((L->dense_bytes + 63) & ~(uint64_t) 63) <= c->arena_size;
        pthread_mutex_unlock(&m->mu);
        if (will || (ripple_mode_of(m) == RIPPLE_MODE_SPARSE && L->has_pred)) {
            return;
        }
        if (!resident) {
            target = l;
        }
    }
    if (target < 0) {
        return;
    }
    const ripple_layer * L = &m->layers[target];
    a->n_req = 0;
    for (int k = 0; k < 3; k++) {
        if (!L->tensor_bytes[k]) {
            continue;
        }
        if (std_buffer(&a->buf[k], &a->cap[k], L, k) != 0) {
            return; /* no read-ahead: the layer is read at its use */
        }
        a->reqs[a->n_req++] = std_request(L, k, fd, a->buf[k]);
    }
    if (!a->started) {
        pthread_mutex_init(&a->mu, NULL);
        pthread_cond_init(&a->cv, NULL);
        if (pthread_create(&a->tid, NULL, ahead_main, a) != 0) {
            pthread_mutex_destroy(&a->mu);
            pthread_cond_destroy(&a->cv);
            return;
        }
        a->started = 1;
    }
    pthread_mutex_lock(&a->mu);
    a->m = m;
    a->layer = target;
    a->busy = 1;
    a->queued = 1;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
}

/* at[kind] = where tensor `kind` of the layer is, for the kinds in `kinds` (first: the call of the
 * layer's first matmul of the batch, which counts its lookups) */
static int std_tensors(ripple_backend_ctx * ctx, const ripple_binding * b, int kinds, int first, const uint8_t * at[3]) {
    ripple_model * m = b->model;
    ripple_layer * L = &m->layers[b->layer];
    int direct = 0;
    const int fd = ripple_read_fd(m, &direct);
    if (!direct) {
        struct stat st;
        int64_t stamp[5] = { -1, -1, -1, -1, -1 };
        if (fstat(m->fd, &st) == 0) {
            const int64_t now[5] = { (int64_t) st.st_size, (int64_t) st.st_mtim.tv_sec, (int64_t) st.st_mtim.tv_nsec,
                                     (int64_t) st.st_ctim.tv_sec, (int64_t) st.st_ctim.tv_nsec };
            memcpy(stamp, now, sizeof(stamp));
        }
        const int check = !L->std_checked || stamp[0] < 0 || memcmp(stamp, L->std_stamp, sizeof(stamp)) != 0 ||
                          !ripple_get_verify_reads();
        for (int k = 0; k < 3; k++) {
            at[k] = NULL;
            if (!L->tensor_bytes[k] || (!(kinds >> k & 1) && !check)) {
                continue;
            }
            if (stamp[0] < 0 || (uint64_t) stamp[0] < std_file_offset(L, k) + L->tensor_bytes[k]) {
                /* touching a mapped page past the end of the file would raise SIGBUS */
                L->std_checked = 0;
                static const char * const names[3] = { "ffn_gate", "ffn_up", "ffn_down" };
                ripple_set_error("%s: the file %s while loaded (blk.%d.%s.weight ends at %llu)", m->path,
                                 stamp[0] < 0 ? "cannot be examined" : "was truncated", L->d.block, names[k],
                                 (unsigned long long) (std_file_offset(L, k) + L->tensor_bytes[k]));
                return -1;
            }
            at[k] = std_mapping(m, b->layer, k);
            if (!at[k]) {
                ripple_set_error("%s: cannot map blk.%d's FFN tensors", m->path, L->d.block);
                return -1;
            }
            /* the stamp is taken before the check, so a change during it is seen next time */
            if (check && std_verify(m, b->layer, k, at[k], L->tensor_bytes[k]) != 0) {
                L->std_checked = 0;
                return -1;
            }
        }
        if (check && ripple_get_verify_reads() && stamp[0] >= 0) {
            memcpy(L->std_stamp, stamp, sizeof(stamp));
            L->std_checked = 1;
        }
        return 0;
    }
    pthread_mutex_lock(&m->mu);
    uint8_t * res = ripple_cache_resident(&m->cache, b->layer);
    int fill = 0;
    if (!res && first) {
        res = ripple_cache_make_resident(&m->cache, b->layer, (size_t) L->dense_bytes);
        fill = res != NULL;
    }
    pthread_mutex_unlock(&m->mu);
    if (first) {
        RIPPLE_COUNT(cache_hits, res && !fill ? (uint64_t) L->d.n_ff : 0);
        RIPPLE_COUNT(cache_misses, res && !fill ? 0 : (uint64_t) L->d.n_ff);
    }
    if (res) {
        uint8_t * dst[3];
        for (int k = 0; k < 3; k++) {
            dst[k] = res + std_offset(L, k);
            at[k] = dst[k];
        }
        if (fill) {
            const int rc = std_read(m, b->layer, fd, 7, dst, 0);
            pthread_mutex_lock(&m->mu);
            if (rc == 0) {
                ripple_cache_resident_ready(&m->cache, b->layer);
            } else {
                ripple_cache_unresident(&m->cache, b->layer);
            }
            pthread_mutex_unlock(&m->mu);
            return rc;
        }
        return 0;
    }
    /* not resident: the layer's three tensors, read ahead while the previous layer computed, or now */
    (void) kinds;
    if (first || ctx->tbuf_model != m || ctx->tbuf_layer != b->layer) {
        ripple_ahead * a = &ctx->ahead;
        ahead_wait(a);
        int have = 0;
        ctx->tbuf_model = NULL;
        if (a->started && a->m == m && a->layer == b->layer) {
            a->layer = -1;
            if (a->rc == 0) {
                for (int k = 0; k < 3; k++) {
                    uint8_t * t = a->buf[k];
                    const size_t c = a->cap[k];
                    a->buf[k] = ctx->tbuf[k];
                    a->cap[k] = ctx->tbuf_cap[k];
                    ctx->tbuf[k] = t;
                    ctx->tbuf_cap[k] = c;
                }
                for (int k = 0; k < 3; k++) {
                    if (L->tensor_bytes[k] &&
                        std_verify(m, b->layer, k, ctx->tbuf[k] + std_skip(L, k), L->tensor_bytes[k]) != 0) {
                        return -1;
                    }
                }
                have = 1;
            } /* else read now: a failure is reported by that read */
        }
        if (!have) {
            for (int k = 0; k < 3; k++) {
                if (L->tensor_bytes[k] && std_buffer(&ctx->tbuf[k], &ctx->tbuf_cap[k], L, k) != 0) {
                    ripple_set_error("out of memory for blk.%d's FFN tensors", L->d.block);
                    return -1;
                }
            }
            if (std_read(m, b->layer, fd, 7, ctx->tbuf, 1) != 0) {
                return -1;
            }
        }
        ctx->tbuf_model = m;
        ctx->tbuf_layer = b->layer;
        if (first) {
            ahead_start(ctx, m, b->layer, fd);
        }
    }
    for (int k = 0; k < 3; k++) {
        at[k] = L->tensor_bytes[k] ? ctx->tbuf[k] + std_skip(L, k) : NULL;
    }
    return 0;
}

/* Exact mode from the standard tensors: gate and up (up non-NULL: both, in one pass) or down. */
static int exact_from_tensors(ripple_backend_ctx * ctx, const ripple_binding * b, const struct ggml_tensor * src1,
                              struct ggml_tensor * node, struct ggml_tensor * up) {
    ripple_model * m = b->model;
    const ripple_layer * L = &m->layers[b->layer];
    const int first = b->kind != RIPPLE_DOWN;
    if (first && b->layer == 0) {
        RIPPLE_COUNT(tokens, (uint64_t) src1->ne[1]);
    }
    if (first) {
        RIPPLE_COUNT(needed_bytes, L->dense_bytes);
        RIPPLE_COUNT(dense_bytes, L->dense_bytes);
    }
    struct ggml_tensor * dsts[2] = { node, up };
    const int n_mats = up ? 2 : 1;
    int kinds = 0;
    for (int k = 0; k < n_mats; k++) {
        kinds |= 1 << binding_of(dsts[k]->src[0])->kind;
    }
    const uint8_t * at[3];
    if (std_tensors(ctx, b, kinds, first, at) != 0) {
        return -1;
    }
    ripple_rows rows[2];
    for (int k = 0; k < n_mats; k++) {
        const int kind = binding_of(dsts[k]->src[0])->kind;
        const enum ggml_type t = (enum ggml_type) (kind == RIPPLE_GATE ? L->d.gate_type : kind == RIPPLE_UP ? L->d.up_type
                                                                                                       : L->d.down_src_type);
        const int64_t row_len = kind == RIPPLE_DOWN ? L->d.n_ff : L->d.n_embd;
        const int64_t n_rows = kind == RIPPLE_DOWN ? L->d.n_embd : L->d.n_ff;
        rows[k] = (ripple_rows){ t, row_len, n_rows, at[kind], ggml_row_size(t, row_len), NULL, NULL, 0, NULL, 0, 0 };
    }
    return ripple_kernel_rows(ctx->pool, ctx->n_threads, rows, n_mats, src1, dsts);
}

/* Sparse mode's down projection on the standard ffn_down rows of a mapped file (no direct_io: they
 * are in the page cache, where stock reads them too): stock's dot products on the activations with
 * those not selected for their token (and below the activity threshold) set to 0, converted as
 * stock converts them. Per token and row one dot product: the result does not depend on the batch. */
static int down_masked_rows(ripple_backend_ctx * ctx, const ripple_binding * b, const struct ggml_tensor * src1,
                            struct ggml_tensor * node) {
    const ripple_layer * L = &b->model->layers[b->layer];
    const int64_t n_ff = L->d.n_ff, T = src1->ne[1];
    const uint8_t * at[3];
    if (std_tensors(ctx, b, 1 << RIPPLE_DOWN, 0, at) != 0 ||
        reserve((uint8_t **) &ctx->hbuf, &ctx->hbuf_cap, sizeof(float) * (size_t) (n_ff * T), "activations") != 0) {
        return -1;
    }
    const int rule = L->d.act_rule == RIPPLE_RULE_MAGNITUDE;
    for (int64_t t = 0; t < T; t++) {
        ripple_mask_activations(L, (const float *) ((const char *) src1->data + t * src1->nb[1]), ctx->tokmask + t * n_ff,
                                rule, ctx->hbuf + t * n_ff);
    }
    struct ggml_tensor h = *src1;
    h.data = ctx->hbuf;
    h.nb[1] = sizeof(float) * (size_t) n_ff;
    h.nb[2] = h.nb[3] = h.nb[1] * (size_t) T;
    const enum ggml_type t = (enum ggml_type) L->d.down_src_type;
    ripple_rows rows = { t, n_ff, L->d.n_embd, at[RIPPLE_DOWN], ggml_row_size(t, n_ff), NULL, NULL, 0, NULL, 0, 0 };
    return ripple_kernel_rows(ctx->pool, ctx->n_threads, &rows, 1, &h, &node);
}

/* The FFN matmuls of one layer for a token batch: gate and up (computed together when the graph has
 * both next to each other: `up` non-NULL) or down. */
static int ripple_mul_mat(ripple_backend_ctx * ctx, struct ggml_tensor * node, struct ggml_tensor * up) {
    const struct ggml_tensor * src0 = node->src[0];
    const struct ggml_tensor * src1 = node->src[1];
    const ripple_binding * b = binding_of(src0);
    const ripple_layer * L = &b->model->layers[b->layer];
    const int sparse_layer = ripple_mode_of(b->model) == RIPPLE_MODE_SPARSE && L->has_pred;
    /* exact mode: stock's own dot products on the standard ffn_down rows by default. The bundles'
     * split columns multiplied in stock's integer form differ from stock only in the order of the
     * float additions, yet on SmolLM2 Q4_1 that last-bit noise, re-rounded to 8 bits at every
     * following matmul, moves the logits by 1.5% of their range (top-1 0.95). */
    const int from_tensors = !sparse_layer && ripple_get_exact_down() == RIPPLE_EXACT_DOWN_TENSOR;
    if (from_tensors) {
        ctx->ws_valid = 0; /* no bundles in use */
        ripple_fetch_admit(&ctx->fetch);
    } else if (ensure_layer(ctx, b, src1, b->kind == RIPPLE_DOWN, ripple_get_overlap()) != 0 ||
               (b->kind == RIPPLE_DOWN && ripple_fetch_finish(&ctx->fetch) != 0)) {
        return -1;
    }
    const int32_t * positions = ctx->sparse ? (const int32_t *) (ctx->need + L->d.n_ff) : NULL;
    const int32_t * neurons = ctx->sparse ? positions + L->d.n_ff : NULL;
    const int64_t n_sel = from_tensors ? L->d.n_ff : ctx->n_sel;
    uint64_t t0 = ripple_now_ns();
    const uint64_t exposed0 = __atomic_load_n(&g_ripple_counters.io_exposed_ns, __ATOMIC_RELAXED);
    int rc, n_mats = 1;
    if (from_tensors) {
        rc = exact_from_tensors(ctx, b, src1, node, up);
        n_mats = up ? 2 : 1;
    } else if (b->kind == RIPPLE_DOWN && ctx->sparse && !ripple_get_direct_io() && ripple_get_sparse_down_rows()) {
        rc = down_masked_rows(ctx, b, src1, node);
        ripple_fetch_admit(&ctx->fetch);
    } else if (b->kind == RIPPLE_DOWN && L->down_bits && !ripple_layer_down_table(b->model, b->layer)) {
        rc = -1;
    } else if (b->kind == RIPPLE_DOWN) {
        rc = ripple_kernel_down(ctx->pool, ctx->n_threads, L, ctx->fetch.ptr, positions, n_sel, ctx->sparse,
                                ctx->sparse ? ctx->tokmask : NULL, src1, node);
        ripple_fetch_admit(&ctx->fetch); /* the layer's compute is done: its reads may enter the cache */
    } else {
        ripple_rows rows[2];
        struct ggml_tensor * dsts[2] = { node, up };
        n_mats = up ? 2 : 1;
        for (int k = 0; k < n_mats; k++) {
            const int kind = binding_of(dsts[k]->src[0])->kind;
            rows[k] = (ripple_rows){
                /* .type    = */ (enum ggml_type) (kind == RIPPLE_GATE ? L->d.gate_type : L->d.up_type),
                /* .row_len = */ L->d.n_embd,
                /* .n_rows  = */ L->d.n_ff,
                /* .base    = */ NULL,
                /* .stride  = */ 0,
                /* .map     = */ L->pos_of,
                /* .list    = */ neurons ? neurons : L->order, /* position order: bundles as they lie */
                /* .n_list  = */ n_sel,
                /* .ptrs    = */ ctx->fetch.ptr,
                /* .ptr_off = */ kind == RIPPLE_GATE ? 0 : L->gate_row,
                /* .keep    = */ 0,
            };
        }
        ripple_fetch * f = &ctx->fetch;
        if (f->n_pieces == 0) {
            rc = ripple_kernel_rows(ctx->pool, ctx->n_threads, rows, n_mats, src1, dsts);
        } else {
            /* reads in flight: the bundles present first, then each piece as it lands (the rows
             * are independent dot products: the same values in any order) */
            const int n_pieces = f->n_pieces;
            for (int k = 0; k < n_mats; k++) {
                for (int64_t t = 0; t < src1->ne[1]; t++) {
                    memset((char *) dsts[k]->data + t * dsts[k]->nb[1], 0, sizeof(float) * (size_t) L->d.n_ff);
                }
                rows[k].keep = 1;
            }
            rc = 0;
            for (int piece = -1; piece < n_pieces && rc == 0; piece++) {
                const int64_t l0 = piece < 0 ? 0 : piece == 0 ? f->n_ready : f->piece_end[piece - 1];
                const int64_t l1 = piece < 0 ? f->n_ready : f->piece_end[piece];
                if (piece >= 0 && ripple_fetch_piece(f, piece) != 0) {
                    rc = -1;
                    break;
                }
                for (int k = 0; k < n_mats; k++) {
                    rows[k].list = f->list + l0;
                    rows[k].n_list = l1 - l0;
                }
                if (l1 > l0) {
                    rc = ripple_kernel_rows(ctx->pool, ctx->n_threads, rows, n_mats, src1, dsts);
                }
            }
        }
    }
    /* the time spent waiting for reads in flight is I/O, not compute */
    RIPPLE_COUNT(compute_ns, ripple_now_ns() - t0 - (__atomic_load_n(&g_ripple_counters.io_exposed_ns, __ATOMIC_RELAXED) - exposed0));
    RIPPLE_COUNT(ffn_matmuls, n_mats);
    RIPPLE_COUNT(neurons_computed, n_mats * (ctx->sparse && !from_tensors ? (uint64_t) ctx->n_selected
                                                                         : (uint64_t) n_sel * (uint64_t) src1->ne[1]));
    RIPPLE_COUNT(neurons_total, n_mats * (uint64_t) L->d.n_ff * (uint64_t) src1->ne[1]);
    return rc;
}

static bool op_is_empty(enum ggml_op op) {
    return op == GGML_OP_NONE || op == GGML_OP_RESHAPE || op == GGML_OP_TRANSPOSE || op == GGML_OP_VIEW ||
           op == GGML_OP_PERMUTE;
}

/* The up (gate) matmul of the same layer and input as the gate (up) matmul `gate`, when it is the
 * next node to compute: both are then computed in one pass over the layer's neurons. */
static int g_pair = 1;

void ripple_set_pair_matmuls(int on) {
    __atomic_store_n(&g_pair, on ? 1 : 0, __ATOMIC_RELAXED);
}

int ripple_get_pair_matmuls(void) {
    return __atomic_load_n(&g_pair, __ATOMIC_RELAXED);
}

static struct ggml_tensor * paired_up(struct ggml_cgraph * cgraph, int i, const struct ggml_tensor * gate, int * at) {
    if (!ripple_get_pair_matmuls()) {
        return NULL;
    }
    const ripple_binding * bg = binding_of(gate->src[0]);
    const int want = bg->kind == RIPPLE_GATE ? RIPPLE_UP : RIPPLE_GATE;
    for (int k = i + 1; k < ggml_graph_n_nodes(cgraph); k++) {
        struct ggml_tensor * node = ggml_graph_node(cgraph, k);
        if (op_is_empty(node->op) || (node->flags & GGML_TENSOR_FLAG_COMPUTE) == 0) {
            continue;
        }
        const ripple_binding * bu = node->op == GGML_OP_MUL_MAT ? binding_of(node->src[0]) : NULL;
        if (!bu || bu->kind != want || bu->model != bg->model || bu->layer != bg->layer ||
            node->src[1] != gate->src[1] || node == gate->src[1] || gate == node->src[1] ||
            node->ne[1] != gate->ne[1] || node->nb[1] != gate->nb[1]) {
            return NULL;
        }
        *at = k;
        return node;
    }
    return NULL;
}

static enum ggml_status ggml_backend_ripple_graph_compute(ggml_backend_t backend, struct ggml_cgraph * cgraph) {
    ripple_backend_ctx * ctx = backend->context;
    for (int i = 0; i < ggml_graph_n_nodes(cgraph); i++) {
        struct ggml_tensor * node = ggml_graph_node(cgraph, i);
        if (op_is_empty(node->op) || (node->flags & GGML_TENSOR_FLAG_COMPUTE) == 0) {
            continue;
        }
        if (node->op != GGML_OP_MUL_MAT || !binding_of(node->src[0])) {
            ripple_set_error("graph node %s (%s) was not claimed by the ripple backend", node->name, ggml_op_desc(node));
            return GGML_STATUS_FAILED;
        }
        int at = i;
        struct ggml_tensor * up = binding_of(node->src[0])->kind != RIPPLE_DOWN ? paired_up(cgraph, i, node, &at) : NULL;
        if (ripple_mul_mat(ctx, node, up) != 0) {
            ctx->ws_valid = 0;
            return GGML_STATUS_FAILED;
        }
        i = at;
    }
    return GGML_STATUS_SUCCESS;
}

static const struct ggml_backend_i ggml_backend_ripple_i = {
    /* .get_name            = */ ggml_backend_ripple_get_name,
    /* .free                = */ ggml_backend_ripple_free,
    /* .set_tensor_async    = */ NULL,
    /* .get_tensor_async    = */ NULL,
    /* .set_tensor_2d_async = */ NULL,
    /* .get_tensor_2d_async = */ NULL,
    /* .cpy_tensor_async    = */ NULL,
    /* .synchronize         = */ NULL,
    /* .graph_plan_create   = */ NULL,
    /* .graph_plan_free     = */ NULL,
    /* .graph_plan_update   = */ NULL,
    /* .graph_plan_compute  = */ NULL,
    /* .graph_compute       = */ ggml_backend_ripple_graph_compute,
    /* .event_record        = */ NULL,
    /* .event_wait          = */ NULL,
    /* .graph_optimize      = */ NULL,
};

static ggml_guid_t ggml_backend_ripple_guid(void) {
    static ggml_guid guid = { 0x72, 0x69, 0x70, 0x70, 0x6c, 0x65, 0x2d, 0x67, 0x67, 0x75, 0x66, 0x2d, 0x66, 0x66, 0x6e, 0x01 };
    return &guid;
}

static void ggml_backend_ripple_set_n_threads(ggml_backend_t backend, int n_threads) {
    ripple_backend_ctx * ctx = backend->context;
    ctx->n_threads = n_threads > 0 ? n_threads : 1;
}

/* ---- device interface ---- */

static const char * ggml_backend_ripple_device_get_name(ggml_backend_dev_t dev) {
    (void) dev;
    return RIPPLE_NAME;
}

static const char * ggml_backend_ripple_device_get_description(ggml_backend_dev_t dev) {
    (void) dev;
    return "ripple-gguf: FFN weights served from flash as neuron bundles";
}

static void ggml_backend_ripple_device_get_memory(ggml_backend_dev_t dev, size_t * free_mem, size_t * total) {
    (void) dev;
    *free_mem = 0;
    *total = 0;
}

static enum ggml_backend_dev_type ggml_backend_ripple_device_get_type(ggml_backend_dev_t dev) {
    (void) dev;
    return GGML_BACKEND_DEVICE_TYPE_ACCEL;
}

static void ggml_backend_ripple_device_get_props(ggml_backend_dev_t dev, struct ggml_backend_dev_props * props) {
    props->name = ggml_backend_ripple_device_get_name(dev);
    props->description = ggml_backend_ripple_device_get_description(dev);
    props->type = ggml_backend_ripple_device_get_type(dev);
    props->device_id = NULL;
    ggml_backend_ripple_device_get_memory(dev, &props->memory_free, &props->memory_total);
    props->caps = (struct ggml_backend_dev_caps){
        /* .async                = */ false,
        /* .host_buffer          = */ false,
        /* .buffer_from_host_ptr = */ false,
        /* .events               = */ false,
        /* .mmap_support         = */ true,
    };
}

static ggml_backend_t ggml_backend_ripple_device_init_backend(ggml_backend_dev_t dev, const char * params) {
    (void) params;
    ripple_backend_ctx * ctx = calloc(1, sizeof(*ctx));
    ggml_backend_t backend = calloc(1, sizeof(*backend));
    if (!ctx || !backend) {
        free(ctx);
        free(backend);
        return NULL;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    ctx->n_threads = n > 0 ? (int) n : 1;
    ctx->pool = ripple_pool_new();
    ctx->ws_layer = -1;
    *backend = (struct ggml_backend){
        /* .guid    = */ ggml_backend_ripple_guid(),
        /* .iface   = */ ggml_backend_ripple_i,
        /* .device  = */ dev,
        /* .context = */ ctx,
    };
    return backend;
}

static ggml_backend_buffer_type_t ggml_backend_ripple_device_get_buffer_type(ggml_backend_dev_t dev) {
    (void) dev;
    return &g_buft;
}

static bool ggml_backend_ripple_device_supports_op(ggml_backend_dev_t dev, const struct ggml_tensor * op) {
    (void) dev;
    if (op_is_empty(op->op)) {
        /* the weight leaves themselves (op NONE) and views of them: nothing to compute */
        const struct ggml_tensor * t = op->view_src ? op->view_src : op;
        return t->buffer && t->buffer->buft == &g_buft;
    }
    if (op->op != GGML_OP_MUL_MAT) {
        return false;
    }
    const struct ggml_tensor * src0 = op->src[0];
    const struct ggml_tensor * src1 = op->src[1];
    if (!src0 || !src1 || !src0->buffer || src0->buffer->buft != &g_buft) {
        return false;
    }
    if (src1->type != GGML_TYPE_F32 || op->type != GGML_TYPE_F32 || src1->ne[2] != 1 || src1->ne[3] != 1 ||
        src1->nb[0] != sizeof(float) || op->nb[0] != sizeof(float)) {
        return false;
    }
    if (src0->extra) {
        return true; /* a bound weight: src0->extra was set by init_tensor */
    }
    /* llama.cpp's weight_buft_supported probe: a named weight in a 0-size buffer of our type */
    ripple_model * m = ripple_registry_loading();
    return m && src0->buffer->size == 0 && ripple_model_claim(m, src0) != NULL;
}

static bool ggml_backend_ripple_device_supports_buft(ggml_backend_dev_t dev, ggml_backend_buffer_type_t buft) {
    (void) dev;
    return buft == &g_buft || ggml_backend_buft_is_host(buft);
}

static const struct ggml_backend_device_i ggml_backend_ripple_device_i = {
    /* .get_name             = */ ggml_backend_ripple_device_get_name,
    /* .get_description      = */ ggml_backend_ripple_device_get_description,
    /* .get_memory           = */ ggml_backend_ripple_device_get_memory,
    /* .get_type             = */ ggml_backend_ripple_device_get_type,
    /* .get_props            = */ ggml_backend_ripple_device_get_props,
    /* .init_backend         = */ ggml_backend_ripple_device_init_backend,
    /* .get_buffer_type      = */ ggml_backend_ripple_device_get_buffer_type,
    /* .get_host_buffer_type = */ NULL,
    /* .buffer_from_host_ptr = */ NULL,
    /* .supports_op          = */ ggml_backend_ripple_device_supports_op,
    /* .supports_buft        = */ ggml_backend_ripple_device_supports_buft,
    /* .offload_op           = */ NULL,
    /* .event_new            = */ NULL,
    /* .event_free           = */ NULL,
    /* .event_synchronize    = */ NULL,
};

/* ---- registry interface ---- */

static const char * ggml_backend_ripple_reg_get_name(ggml_backend_reg_t reg) {
    (void) reg;
    return RIPPLE_NAME;
}

static size_t ggml_backend_ripple_reg_get_device_count(ggml_backend_reg_t reg) {
    (void) reg;
    return 1;
}

static struct ggml_backend_device g_device;

static ggml_backend_dev_t ggml_backend_ripple_reg_get_device(ggml_backend_reg_t reg, size_t index) {
    (void) reg;
    GGML_ASSERT(index == 0);
    return &g_device;
}

static void * ggml_backend_ripple_get_proc_address(ggml_backend_reg_t reg, const char * name) {
    (void) reg;
    if (strcmp(name, "ggml_backend_set_n_threads") == 0) {
        return (void *) ggml_backend_ripple_set_n_threads;
    }
    return NULL;
}

static const struct ggml_backend_reg_i ggml_backend_ripple_reg_i = {
    /* .get_name         = */ ggml_backend_ripple_reg_get_name,
    /* .get_device_count = */ ggml_backend_ripple_reg_get_device_count,
    /* .get_device       = */ ggml_backend_ripple_reg_get_device,
    /* .get_proc_address = */ ggml_backend_ripple_get_proc_address,
};

static struct ggml_backend_reg g_reg = {
    /* .api_version = */ GGML_BACKEND_API_VERSION,
    /* .iface       = */ ggml_backend_ripple_reg_i,
    /* .context     = */ NULL,
};

static ggml_backend_reg_t ggml_backend_ripple_reg(void) {
    g_device = (struct ggml_backend_device){
        /* .iface   = */ ggml_backend_ripple_device_i,
        /* .reg     = */ &g_reg,
        /* .context = */ NULL,
    };
    g_buft.device = &g_device;
    return &g_reg;
}

int ripple_register(char * err, size_t err_len) {
    static int registered = 0;
    if (registered) {
        return 0;
    }
    if (strcmp(ggml_version(), RIPPLE_GGML_VERSION) != 0) {
        snprintf(err, err_len, "ggml %s is loaded but this library was built against ggml %s",
                 ggml_version(), RIPPLE_GGML_VERSION);
        return -1;
    }
    for (size_t i = 0; i < ggml_backend_reg_count(); i++) {
        if (strcmp(ggml_backend_reg_name(ggml_backend_reg_get(i)), RIPPLE_NAME) == 0) {
            registered = 1; /* another copy of this library registered already */
            return 0;
        }
    }
    if (ripple_cpu_init() != 0) {
        snprintf(err, err_len, "ggml's CPU backend is not loaded in this process");
        return -1;
    }
    ggml_backend_register(ggml_backend_ripple_reg());
    registered = 1;
    return 0;
}

/* Entry point of a host that loads the library as a ggml backend module (GGML_BACKEND_PATH with a
 * llama.cpp built with GGML_BACKEND_DL=ON: llama-server, llama-cli, llama-bench): no Python, so the
 * library checks the ggml it joined, takes its settings from the RIPPLE_* variables, installs both
 * load hooks (the mapping one and llama_model_load_from_file's) and returns its registry. NULL,
 * with the reason in ggml's log, when it cannot serve this process. */
GGML_BACKEND_API ggml_backend_reg_t ggml_backend_init(void);
ggml_backend_reg_t ggml_backend_init(void) {
    static ggml_backend_reg_t reg;
    static int tried;
    if (tried) {
        return reg;
    }
    tried = 1;
    char err[512];
    ripple_env_settings s;
    if (strcmp(ggml_version(), RIPPLE_GGML_VERSION) != 0) {
        RIPPLE_LOG_ERROR("ripple: not loaded: ggml %s is loaded but this library was built "
                          "against ggml %s\n", ggml_version(), RIPPLE_GGML_VERSION);
        return NULL;
    }
    if (ripple_cpu_init() != 0) {
        RIPPLE_LOG_ERROR("ripple: not loaded: ggml's CPU backend is not loaded in this process\n");
        return NULL;
    }
    if (ripple_settings_from_env(&s, err, sizeof(err)) != 0) {
        RIPPLE_LOG_ERROR("ripple: not loaded: %s\n", err);
        return NULL;
    }
    if (ripple_loadfn_hook_install(err, sizeof(err)) != 0) {
        RIPPLE_LOG_ERROR("ripple: not loaded: cannot see which model the host loads: %s\n", err);
        return NULL;
    }
    ripple_settings_apply(&s);
    if (s.no_load_hook) {
        RIPPLE_LOG_INFO("ripple: load hook disabled by RIPPLE_NO_LOAD_HOOK\n");
    } else if (ripple_loadhook_install(err, sizeof(err)) != 0) {
        RIPPLE_LOG_WARN("ripple: load hook unavailable, llama.cpp will read whole ripple files "
                          "at load: %s\n", err);
    }
    reg = ggml_backend_ripple_reg();
    return reg;
}
