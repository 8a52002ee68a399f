/* Flash store: the ripple-packed files llama.cpp has loaded, bundle lookup, run formation and
 * reads, plus the process-wide counters and error slot the control API exposes. */
#define _GNU_SOURCE
#include "ripple_internal.h"

/* ggml's logger (exported by libggml-base; declared in ggml's internal ggml-impl.h, which the
 * build does not fetch): llama.cpp's log callback receives what goes through it */

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <sys/mman.h>
#include <unistd.h>

ripple_counters g_ripple_counters;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER; /* models list, error slot */
static ripple_model *  g_models;
static ripple_model *  g_loading;
static int             g_next_handle = 1;
static int64_t         g_cache_bytes = 0;
static int             g_exact_down = RIPPLE_EXACT_DOWN_TENSOR;
static int             g_mode = RIPPLE_MODE_EXACT;
static int64_t         g_collapse_bytes = 0;
static int             g_cache_policy = RIPPLE_CACHE_PINNED;
static double          g_cache_fraction = 0.0; /* > 0: budget = fraction of each model's FFN bytes */
static int             g_direct_io = 0;
static int             g_prefetch = 1;
static int             g_overlap = 1;
static int             g_sparse_down_rows = 1;
/* storage cost model (ripple_set_cost_model); the default matches ripple_gguf.storage.DEFAULT */
static double          g_cost_latency = 51.5e-6, g_cost_bandwidth = 3.5e9, g_cost_parallelism = 104.0;
static char            g_error[1024];
static int             g_load_bound, g_load_expected; /* FFN tensors taken / in the file, latest successful load */
static int64_t         g_load_read_bytes = -1; /* the process's storage reads during the latest load */
static double          g_load_seconds;

/* read_bytes of /proc/self/io: what the process made the kernel read from storage (page faults,
 * read calls and O_DIRECT alike; not what came from the page cache); -1 when unavailable */
int64_t ripple_proc_read_bytes(void) {
    FILE * f = fopen("/proc/self/io", "r");
    long long v = -1;
    char line[128];
    while (f && fgets(line, sizeof(line), f)) {
        if (sscanf(line, "read_bytes: %lld", &v) == 1) {
            break;
        }
    }
    if (f) {
        fclose(f);
    }
    return v;
}

uint64_t ripple_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t) ts.tv_sec * 1000000000ull + (uint64_t) ts.tv_nsec;
}

void ripple_set_error(const char * fmt, ...) {
    char msg[sizeof(g_error)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&g_mu);
    memcpy(g_error, msg, sizeof(g_error));
    pthread_mutex_unlock(&g_mu);
    fprintf(stderr, "ripple: error: %s\n", msg);
}

int ripple_take_last_error(char * buf, size_t buf_len) {
    pthread_mutex_lock(&g_mu);
    int had = g_error[0] != 0;
    if (buf_len) {
        snprintf(buf, buf_len, "%s", g_error);
    }
    g_error[0] = 0;
    pthread_mutex_unlock(&g_mu);
    return had;
}

static void set_err(char * err, size_t err_len, const char * fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_err(char * err, size_t err_len, const char * fmt, ...) {
    if (!err || !err_len) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

/* ---- models ---- */

/* Split down columns (docs/FORMAT.md section 3). The file's f32 (scale, min) table becomes
 * L->down_tab, planar: per group of neurons the n_embd scales, then the n_embd minimums for the
 * types that have them (the others' must be 0). In f16 when every value is exactly an f16 (always
 * for Q4_0..Q8_0, whose block scales are f16 fields), else in f32: a k-quant entry is an f16
 * super-block scale times an integer of up to 7 bits, up to 18 significant bits (docs/FORMAT.md). */
static int split_table(ripple_layer * L, const void * table) {
    const ripple_layer_desc * d = &L->d;
    const size_t n = (size_t) (d->n_ff / L->down_group) * (size_t) d->n_embd;
    const int planes = L->down_has_min ? 2 : 1;
    int f16 = 1;
    for (size_t e = 0; e < n; e++) {
        float v[2];
        memcpy(v, (const char *) table + e * sizeof(v), sizeof(v));
        if (!isfinite(v[0]) || !isfinite(v[1]) || (!L->down_has_min && v[1] != 0.0f)) {
            return -1;
        }
        for (int k = 0; k < planes && f16; k++) {
            f16 = ggml_fp16_to_fp32(ggml_fp32_to_fp16(v[k])) == v[k];
        }
    }
    const size_t elem = f16 ? sizeof(ggml_fp16_t) : sizeof(float);
    char * tab = malloc(n * (size_t) planes * elem);
    if (!tab) {
        return -1;
    }
    for (size_t e = 0; e < n; e++) {
        const size_t b = e / (size_t) d->n_embd, r = e % (size_t) d->n_embd;
        for (int k = 0; k < planes; k++) {
            float v;
            memcpy(&v, (const char *) table + (e * 2 + (size_t) k) * sizeof(float), sizeof(v));
            char * at = tab + ((b * (size_t) planes + (size_t) k) * (size_t) d->n_embd + r) * elem;
            if (f16) {
                const ggml_fp16_t h = ggml_fp32_to_fp16(v);
                memcpy(at, &h, sizeof(h));
            } else {
                memcpy(at, &v, sizeof(v));
            }
        }
    }
    L->down_tab = tab;
    L->down_tab_f16 = f16;
    return 0;
}

static int split_layout(ripple_layer * L, const ripple_layer_desc * d) {
    int32_t bits, qoff, group, has_min;
    if (!ripple_split_info(d->down_type, &bits, &qoff, &group, &has_min)) {
        return -1;
    }
    L->down_bits = bits;
    L->down_qoff = qoff;
    L->down_group = group;
    L->down_has_min = has_min;
    const uint64_t tab = (uint64_t) d->n_ff / (uint64_t) group * (uint64_t) d->n_embd * 2 * sizeof(float);
    if (d->n_ff % group || d->n_embd % 8 || d->down_type != d->down_src_type || !d->down_table ||
        d->down_table_size != tab) {
        return -1;
    }
    L->down_row = (size_t) bits * (size_t) d->n_embd / 8;
    /* checked now (a bad table refuses the load), kept only from its first use */
    if (split_table(L, d->down_table) != 0) {
        return -1;
    }
    free(L->down_tab);
    L->down_tab = NULL;
    return 0;
}

static void model_free(ripple_model * m) {
    ripple_cache_free(&m->cache);
    for (int l = 0; l < m->n_layers; l++) {
        free(m->layers[l].order);
        free(m->layers[l].pos_of);
        ripple_predictor_free(m->layers[l].pred);
        free(m->layers[l].down_tab);
        free(m->layers[l].bundle_crc);
        free(m->layers[l].freq);
        free(m->layers[l].tensor_crc[0]); /* one allocation for the three */
        for (int k = 0; k < 3; k++) {
            if (m->layers[l].std_map[k]) {
                munmap(m->layers[l].std_map[k], m->layers[l].std_map_len[k]);
            }
        }
    }
    free(m->layers);
    free(m->layer_of_block);
    free(m->bindings);
    if (m->fd >= 0) {
        close(m->fd);
    }
    if (m->dfd >= 0) {
        close(m->dfd);
    }
    free(m->scratch);
    pthread_mutex_destroy(&m->mu);
    free(m->path);
    free(m);
}

/* unlink and free when nothing references it any more; g_mu held */
static int model_maybe_release(ripple_model * m) {
    if (m->loading || m->n_buffers > 0) {
        return 0;
    }
    for (ripple_model ** p = &g_models; *p; p = &(*p)->next) {
        if (*p == m) {
            *p = m->next;
            break;
        }
    }
    model_free(m);
    return 1;
}

/* cache budget of a model under the current settings; g_mu held */
static size_t model_cache_budget(const ripple_model * m) {
    if (g_cache_fraction > 0.0) {
        double ffn = 0.0;
        for (int l = 0; l < m->n_layers; l++) {
            ffn += (double) m->layers[l].d.n_ff * (double) m->layers[l].d.bundle_size;
        }
        return (size_t) (g_cache_fraction * ffn);
    }
    return (size_t) (g_cache_bytes > 0 ? g_cache_bytes : 0);
}

/* Copy a layer's part of the checksum table: one CRC per bundle, one per crc_block bytes of each
 * standard tensor. */
static int layer_checksums(ripple_layer * L, const ripple_layer_desc * d, char * err, size_t err_len,
                           const char * path) {
    L->tensor_bytes[RIPPLE_GATE] = (uint64_t) d->n_ff * L->gate_row;
    L->tensor_bytes[RIPPLE_UP] = (uint64_t) d->n_ff * L->up_row;
    L->tensor_bytes[RIPPLE_DOWN] = (uint64_t) d->n_embd * ggml_row_size((enum ggml_type) d->down_src_type, d->n_ff);
    uint64_t count = 0, at[3];
    for (int k = 0; k < 3 && d->crc_block > 0; k++) {
        at[k] = count;
        count += (L->tensor_bytes[k] + d->crc_block - 1) / d->crc_block;
    }
    if (!d->bundle_crc || !d->tensor_crc || d->crc_block == 0 || d->tensor_crc_count != count) {
        set_err(err, err_len, "%s: layer %d: checksums missing or of the wrong size (%llu tensor blocks, "
                "expected %llu)", path, d->block, (unsigned long long) d->tensor_crc_count, (unsigned long long) count);
        return -1;
    }
    L->bundle_crc = malloc(sizeof(uint32_t) * (size_t) d->n_ff);
    L->tensor_crc[0] = malloc(sizeof(uint32_t) * (size_t) (count ? count : 1));
    if (!L->bundle_crc || !L->tensor_crc[0]) {
        set_err(err, err_len, "out of memory");
        return -1;
    }
    memcpy(L->bundle_crc, d->bundle_crc, sizeof(uint32_t) * (size_t) d->n_ff);
    memcpy(L->tensor_crc[0], d->tensor_crc, sizeof(uint32_t) * (size_t) count);
    for (int k = 1; k < 3; k++) {
        L->tensor_crc[k] = L->tensor_crc[0] + at[k];
    }
    return 0;
}

/* A model from its descriptors (validated), not yet in the registry; NULL with err. */
static ripple_model * model_create(const char * path, uint64_t file_size, int32_t n_layers,
                                   const ripple_layer_desc * layers, char * err, size_t err_len) {
    if (n_layers <= 0 || !layers) {
        set_err(err, err_len, "%s: no FFN layers described", path);
        return NULL;
    }
    ripple_model * m = calloc(1, sizeof(*m));
    if (!m) {
        set_err(err, err_len, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&m->mu, NULL);
    m->dfd = -1;
    m->fd = open(path, O_RDONLY | O_CLOEXEC);
    m->path = strdup(path);
    if (m->fd < 0) {
        set_err(err, err_len, "%s: cannot open: %s", path, strerror(errno));
        model_free(m);
        return NULL;
    }
    struct stat st;
    if (fstat(m->fd, &st) != 0 || (uint64_t) st.st_size != file_size) {
        set_err(err, err_len, "%s: file size %lld does not match the %llu bytes recorded at conversion",
                path, (long long) st.st_size, (unsigned long long) file_size);
        model_free(m);
        return NULL;
    }
    m->dev = st.st_dev;
    m->ino = st.st_ino;
    m->file_size = file_size;
    m->n_layers = n_layers;
    m->layers = calloc((size_t) n_layers, sizeof(ripple_layer));
    m->bindings = calloc((size_t) n_layers * 3, sizeof(ripple_binding));
    m->max_block = -1;
    m->crc_block = layers[0].crc_block;
    for (int l = 0; l < n_layers; l++) {
        const ripple_layer_desc * d = &layers[l];
        ripple_layer * L = &m->layers[l];
        L->d = *d;
        L->d.order = NULL;
        L->d.predictor = NULL;
        L->d.down_table = NULL;
        L->d.bundle_crc = NULL;
        L->d.tensor_crc = NULL;
        L->d.frequency = NULL;
        if (d->frequency) {
            L->freq = malloc((size_t) d->n_ff);
            if (!L->freq) {
                set_err(err, err_len, "out of memory");
                model_free(m);
                return NULL;
            }
            memcpy(L->freq, d->frequency, (size_t) d->n_ff);
        }
        if (d->crc_block != m->crc_block) {
            set_err(err, err_len, "%s: layer %d: checksum block size differs from the other layers'", path, d->block);
            model_free(m);
            return NULL;
        }
        if (d->predictor) {
            char perr[256];
            /* checked now (a bad blob refuses the load), kept only from its first use in sparse mode */
            ripple_predictor * p = ripple_predictor_load(d->predictor, d->predictor_size, d->n_embd, d->n_ff, perr, sizeof(perr));
            if (!p) {
                set_err(err, err_len, "%s: layer %d: %s", path, d->block, perr);
                model_free(m);
                return NULL;
            }
            ripple_predictor_free(p);
            L->has_pred = 1;
        }
        if (d->n_ff <= 0 || d->n_embd <= 0 || d->up_type < 0 || d->up_type >= GGML_TYPE_COUNT ||
            d->down_type < 0 || d->down_type >= GGML_TYPE_COUNT || d->gate_type >= GGML_TYPE_COUNT ||
            d->down_src_type < 0 || d->down_src_type >= GGML_TYPE_COUNT) {
            set_err(err, err_len, "%s: layer %d: invalid descriptor", path, d->block);
            model_free(m);
            return NULL;
        }
        L->gate_row = d->gate_type >= 0 ? ggml_row_size((enum ggml_type) d->gate_type, d->n_embd) : 0;
        L->up_row = ggml_row_size((enum ggml_type) d->up_type, d->n_embd);
        if (d->down_layout == 0 && d->n_embd % ggml_blck_size((enum ggml_type) d->down_type) == 0) {
            L->down_row = ggml_row_size((enum ggml_type) d->down_type, d->n_embd);
        } else if (d->down_layout == 1) {
            if (split_layout(L, d) != 0) {
                if (!L->down_group) {
                    set_err(err, err_len, "%s: layer %d: down columns of type %s cannot be split", path, d->block,
                            ggml_type_name((enum ggml_type) d->down_type));
                } else {
                    set_err(err, err_len, "%s: layer %d: split down columns of type %s need n_ff a multiple of %d, "
                            "n_embd a multiple of 8 and a %llu-byte scale table of finite values, minimums 0 where the type has "
                            "none (got %llu bytes)", path,
                            d->block, ggml_type_name((enum ggml_type) d->down_type), L->down_group,
                            (unsigned long long) ((uint64_t) d->n_ff / (uint64_t) L->down_group * (uint64_t) d->n_embd * 8),
                            (unsigned long long) d->down_table_size);
                }
                model_free(m);
                return NULL;
            }
        } else {
            set_err(err, err_len, "%s: layer %d: down layout %d with type %s does not fit n_embd %d", path,
                    d->block, d->down_layout, ggml_type_name((enum ggml_type) d->down_type), d->n_embd);
            model_free(m);
            return NULL;
        }
        if (L->gate_row + L->up_row + L->down_row != d->bundle_size) {
            set_err(err, err_len, "%s: layer %d: bundle size %llu does not match its parts (%zu+%zu+%zu)",
                    path, d->block, (unsigned long long) d->bundle_size, L->gate_row, L->up_row, L->down_row);
            model_free(m);
            return NULL;
        }
        if (d->n_ff % ggml_blck_size((enum ggml_type) d->down_src_type) != 0) {
            set_err(err, err_len, "%s: layer %d: ffn_down of type %s cannot hold rows of %d values", path, d->block,
                    ggml_type_name((enum ggml_type) d->down_src_type), d->n_ff);
            model_free(m);
            return NULL;
        }
        L->dense_bytes = (uint64_t) d->n_ff * (L->gate_row + L->up_row) +
                         (uint64_t) d->n_embd * ggml_row_size((enum ggml_type) d->down_src_type, d->n_ff);
        if (layer_checksums(L, d, err, err_len, path) != 0) {
            model_free(m);
            return NULL;
        }
        uint64_t end = d->bundles_offset + (uint64_t) d->n_ff * d->bundle_size;
        if (end > file_size || end < d->bundles_offset) {
            set_err(err, err_len, "%s: layer %d: bundles end at %llu, past the end of the file (%llu bytes)",
                    path, d->block, (unsigned long long) end, (unsigned long long) file_size);
            model_free(m);
            return NULL;
        }
        L->order = malloc(sizeof(int32_t) * (size_t) d->n_ff);
        L->pos_of = malloc(sizeof(int32_t) * (size_t) d->n_ff);
        for (int32_t i = 0; i < d->n_ff; i++) {
            L->pos_of[i] = -1;
        }
        for (int32_t p = 0; p < d->n_ff; p++) {
            int32_t n = d->order ? d->order[p] : p;
            if (n < 0 || n >= d->n_ff || L->pos_of[n] != -1) {
                set_err(err, err_len, "%s: layer %d: placement order is not a permutation", path, d->block);
                model_free(m);
                return NULL;
            }
            L->order[p] = n;
            L->pos_of[n] = p;
        }
        if (d->block > m->max_block) {
            m->max_block = d->block;
        }
        for (int k = 0; k < 3; k++) {
            m->bindings[l * 3 + k] = (ripple_binding){ m, l, k };
        }
    }
    m->layer_of_block = malloc(sizeof(int) * (size_t) (m->max_block + 1));
    for (int b = 0; b <= m->max_block; b++) {
        m->layer_of_block[b] = -1;
    }
    for (int l = 0; l < n_layers; l++) {
        if (m->layers[l].d.block < 0 || m->layer_of_block[m->layers[l].d.block] != -1) {
            set_err(err, err_len, "%s: duplicate or negative block index %d", path, m->layers[l].d.block);
            model_free(m);
            return NULL;
        }
        m->layer_of_block[m->layers[l].d.block] = l;
    }

    return m;
}

int ripple_model_begin_load(const char * path, uint64_t file_size, int32_t n_layers,
                            const ripple_layer_desc * layers, char * err, size_t err_len) {
    ripple_model * m = model_create(path, file_size, n_layers, layers, err, err_len);
    if (!m) {
        return -1;
    }
    ripple_stats_start();
    pthread_mutex_lock(&g_mu);
    if (g_loading) {
        pthread_mutex_unlock(&g_mu);
        set_err(err, err_len, "%s: another ripple model (%s) is still loading", path, g_loading->path);
        model_free(m);
        return -1;
    }
    ripple_cache_init(&m->cache, m->n_layers, m->layers, model_cache_budget(m), g_cache_policy);
    m->handle = g_next_handle++;
    m->default_mode = RIPPLE_MODE_SPARSE;
    m->loading = 1;
    m->next = g_models;
    g_models = m;
    g_loading = m;
    m->load_io0 = ripple_proc_read_bytes();
    m->load_t0 = ripple_now_ns();
    pthread_mutex_unlock(&g_mu);
    return m->handle;
}

static ripple_model * find_handle(int handle) {
    for (ripple_model * m = g_models; m; m = m->next) {
        if (m->handle == handle) {
            return m;
        }
    }
    return NULL;
}

void ripple_model_end_load(int handle, int ok) {
    pthread_mutex_lock(&g_mu);
    ripple_model * m = find_handle(handle);
    if (m) {
        if (g_loading == m) {
            g_loading = NULL;
        }
        m->loading = 0;
        if (!ok) {
            m->closed = 1;
        } else {
            const int64_t io = ripple_proc_read_bytes();
            g_load_bound = m->n_bound;
            g_load_expected = m->expected_tensors;
            g_load_read_bytes = io >= 0 && m->load_io0 >= 0 ? io - m->load_io0 : -1;
            g_load_seconds = (double) (ripple_now_ns() - m->load_t0) * 1e-9;
        }
        model_maybe_release(m);
    }
    pthread_mutex_unlock(&g_mu);
    ripple_loadhook_end_load();
}

int ripple_model_set_default_mode(int handle, int mode) {
    if (mode != RIPPLE_MODE_EXACT && mode != RIPPLE_MODE_SPARSE) {
        return -1;
    }
    pthread_mutex_lock(&g_mu);
    ripple_model * m = find_handle(handle);
    if (m) {
        __atomic_store_n(&m->default_mode, mode, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&g_mu);
    return m ? 0 : -1;
}

void ripple_store_set_info(int handle, int expected_tensors, const char * default_mode_reason, int64_t io0,
                           uint64_t t0) {
    pthread_mutex_lock(&g_mu);
    ripple_model * m = find_handle(handle);
    if (m) {
        m->load_io0 = io0; /* the load began with the file's checks */
        m->load_t0 = t0;
        m->expected_tensors = expected_tensors;
        snprintf(m->default_mode_reason, sizeof(m->default_mode_reason), "%s", default_mode_reason);
    }
    pthread_mutex_unlock(&g_mu);
}

int ripple_model_get_info(int handle, ripple_model_info * out) {
    pthread_mutex_lock(&g_mu);
    ripple_model * m = find_handle(handle);
    if (m) {
        out->bound_tensors = m->n_bound;
        out->expected_tensors = m->expected_tensors;
        out->default_mode = m->default_mode;
        snprintf(out->default_mode_reason, sizeof(out->default_mode_reason), "%s", m->default_mode_reason);
    }
    pthread_mutex_unlock(&g_mu);
    return m ? 0 : -1;
}

int64_t ripple_store_collapse_gap(void) {
    /* storage.CostModel.collapse_gap_bytes: bandwidth * latency / min(queue depth, parallelism),
     * 0 under 4 KiB (a bandwidth-bound device) */
    const double q = ripple_get_io_threads() < g_cost_parallelism ? ripple_get_io_threads() : g_cost_parallelism;
    const double gap = g_cost_bandwidth * g_cost_latency / q;
    return gap < 4096 ? 0 : (int64_t) gap;
}

int ripple_model_bound_tensors(int handle) {
    pthread_mutex_lock(&g_mu);
    ripple_model * m = find_handle(handle);
    int n = m ? m->n_bound : -1;
    pthread_mutex_unlock(&g_mu);
    return n;
}

ripple_model * ripple_store_loading(void) {
    pthread_mutex_lock(&g_mu);
    ripple_model * m = g_loading;
    pthread_mutex_unlock(&g_mu);
    return m;
}

void ripple_store_buffer_ref(ripple_model * m) {
    pthread_mutex_lock(&g_mu);
    m->n_buffers++;
    pthread_mutex_unlock(&g_mu);
}

void ripple_store_buffer_unref(ripple_model * m) {
    char path[1024];
    pthread_mutex_lock(&g_mu);
    m->n_buffers--;
    snprintf(path, sizeof(path), "%s", m->path);
    const int freed = !m->standalone && model_maybe_release(m);
    pthread_mutex_unlock(&g_mu);
    if (freed) {
        ripple_stats_report(path);
    }
}

bool ripple_store_is_ripple_fd(int fd) {
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        return false;
    }
    bool found = false;
    pthread_mutex_lock(&g_mu);
    if (g_loading && g_loading->dev == st.st_dev && g_loading->ino == st.st_ino) {
        found = true;
    }
    pthread_mutex_unlock(&g_mu);
    return found;
}

/* Parse "blk.N.ffn_KIND.weight"; returns the kind or -1. */
static int parse_ffn_name(const char * name, int * block) {
    int n = 0, len = 0;
    char kind[8] = { 0 };
    if (sscanf(name, "blk.%d.ffn_%7[a-z].weight%n", &n, kind, &len) != 2 || name[len] != 0) {
        return -1;
    }
    *block = n;
    if (!strcmp(kind, "gate")) return RIPPLE_GATE;
    if (!strcmp(kind, "up")) return RIPPLE_UP;
    if (!strcmp(kind, "down")) return RIPPLE_DOWN;
    return -1;
}

/* The binding for a weight of the loading model, after checking it is the tensor described. */
const ripple_binding * ripple_store_claim(ripple_model * m, const struct ggml_tensor * t) {
    int block = -1;
    int kind = parse_ffn_name(t->name, &block);
    if (!m || kind < 0 || block > m->max_block || m->layer_of_block[block] < 0) {
        return NULL;
    }
    int l = m->layer_of_block[block];
    const ripple_layer_desc * d = &m->layers[l].d;
    if (t->ne[2] != 1 || t->ne[3] != 1) {
        return NULL;
    }
    switch (kind) {
        case RIPPLE_GATE:
            if (d->gate_type < 0 || (int) t->type != d->gate_type || t->ne[0] != d->n_embd || t->ne[1] != d->n_ff) return NULL;
            break;
        case RIPPLE_UP:
            if ((int) t->type != d->up_type || t->ne[0] != d->n_embd || t->ne[1] != d->n_ff) return NULL;
            break;
        default:
            if ((int) t->type != d->down_src_type || t->ne[0] != d->n_ff || t->ne[1] != d->n_embd) return NULL;
            break;
    }
    return &m->bindings[l * 3 + kind];
}

/* ---- reads ---- */

int ripple_pread_full(int fd, void * dst, size_t size, uint64_t offset, const char * path) {
    uint8_t * p = dst;
    size_t done = 0;
    while (done < size) {
        ssize_t r = pread(fd, p + done, size - done, (off_t) (offset + done));
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            ripple_set_error("%s: read of %zu bytes at offset %llu failed: %s", path, size,
                             (unsigned long long) offset, strerror(errno));
            return -1;
        }
        if (r == 0) {
            ripple_set_error("%s: read of %zu bytes at offset %llu hit the end of the file after %zu bytes "
                             "(file truncated or modified after loading?)",
                             path, size, (unsigned long long) offset, done);
            return -1;
        }
        done += (size_t) r;
    }
    return 0;
}

/* ---- checks of what was read against the checksum table ---- */

static const char * const k_kind_name[3] = { "ffn_gate", "ffn_up", "ffn_down" };

int ripple_verify_bundles(const ripple_model * m, int layer, const uint8_t * buf, const int64_t * pos, int64_t n) {
    if (!ripple_get_verify_reads()) {
        return 0;
    }
    const ripple_layer * L = &m->layers[layer];
    const size_t bs = L->d.bundle_size;
    uint32_t got[64];
    for (int64_t i0 = 0; i0 < n; i0 += 64) {
        const int64_t k = n - i0 < 64 ? n - i0 : 64;
        ripple_crc32c_pieces(buf, bs, bs, pos + i0, k, got);
        for (int64_t i = 0; i < k; i++) {
            const int64_t p = pos[i0 + i];
            if (got[i] != L->bundle_crc[p]) {
                ripple_set_error("%s: checksum mismatch: the bundle of layer %d at position %lld (file offset %llu, "
                                 "%zu bytes) is not what was converted (file damaged or modified after loading?)",
                                 m->path, L->d.block, (long long) p,
                                 (unsigned long long) (L->d.bundles_offset + (uint64_t) p * bs), bs);
                return -1;
            }
        }
    }
    return 0;
}

int ripple_verify_tensor(const ripple_model * m, int layer, int kind, const uint8_t * buf, uint64_t off, uint64_t len) {
    if (!ripple_get_verify_reads()) {
        return 0;
    }
    const ripple_layer * L = &m->layers[layer];
    const uint64_t B = m->crc_block, first = off / B;
    const uint64_t base = kind == RIPPLE_GATE ? L->d.gate_offset : kind == RIPPLE_UP ? L->d.up_offset : L->d.down_offset;
    uint32_t got[64];
    for (uint64_t done = 0; done < len;) {
        const uint64_t chunk = len - done < 64 * B ? len - done : 64 * B;
        ripple_crc32c_blocks(buf + done, chunk, B, got);
        for (uint64_t i = 0; i * B < chunk; i++) {
            const uint64_t blk = first + done / B + i;
            if (got[i] != L->tensor_crc[kind][blk]) {
                ripple_set_error("%s: checksum mismatch: bytes %llu.. of blk.%d.%s.weight (file offset %llu) are "
                                 "not what was converted (file damaged or modified after loading?)", m->path,
                                 (unsigned long long) (blk * B), L->d.block, k_kind_name[kind],
                                 (unsigned long long) (base + blk * B));
                return -1;
            }
        }
        done += chunk;
    }
    return 0;
}

/* A fallback read of part of a standard tensor: whole checksum blocks are read and checked, the
 * part asked for copied out. */
int ripple_store_read_tensor(const ripple_binding * b, void * dst, size_t offset, size_t size) {
    const ripple_model * m = b->model;
    const ripple_layer * L = &m->layers[b->layer];
    const ripple_layer_desc * d = &L->d;
    uint64_t base = b->kind == RIPPLE_GATE ? d->gate_offset : b->kind == RIPPLE_UP ? d->up_offset : d->down_offset;
    RIPPLE_COUNT(fallback_reads, 1);
    const uint64_t total = L->tensor_bytes[b->kind], B = m->crc_block;
    if ((uint64_t) offset + size > total) {
        ripple_set_error("%s: read of %zu bytes at %zu is outside blk.%d.%s.weight (%llu bytes)", m->path, size, offset,
                         d->block, k_kind_name[b->kind], (unsigned long long) total);
        return -1;
    }
    const uint64_t a0 = (uint64_t) offset / B * B;
    uint64_t a1 = ((uint64_t) offset + size + B - 1) / B * B;
    a1 = a1 < total ? a1 : total;
    uint8_t * tmp = malloc((size_t) (a1 - a0));
    if (!tmp) {
        ripple_set_error("out of memory");
        return -1;
    }
    int rc = ripple_pread_full(m->fd, tmp, (size_t) (a1 - a0), base + a0, m->path);
    if (rc == 0) {
        rc = ripple_verify_tensor(m, b->layer, b->kind, tmp, a0, a1 - a0);
    }
    if (rc == 0) {
        memcpy(dst, tmp + (offset - a0), size);
    }
    free(tmp);
    return rc;
}

/* ---- settings and counters ---- */

/* re-make every model's cache under the current budget and policy; g_mu held */
static void remake_caches(void) {
    for (ripple_model * m = g_models; m; m = m->next) {
        pthread_mutex_lock(&m->mu);
        ripple_cache_free(&m->cache);
        ripple_cache_init(&m->cache, m->n_layers, m->layers, model_cache_budget(m), g_cache_policy);
        pthread_mutex_unlock(&m->mu);
    }
}

int ripple_set_cache(int64_t cache_bytes, int policy) {
    if (policy < RIPPLE_CACHE_LRU || policy > RIPPLE_CACHE_PINNED) {
        return -1;
    }
    pthread_mutex_lock(&g_mu);
    g_cache_bytes = cache_bytes > 0 ? cache_bytes : 0;
    g_cache_fraction = 0.0;
    g_cache_policy = policy;
    remake_caches();
    pthread_mutex_unlock(&g_mu);
    return 0;
}

int ripple_set_cache_fraction(double fraction, int policy) {
    if (!(fraction > 0.0 && fraction <= 1.0) || policy < RIPPLE_CACHE_LRU || policy > RIPPLE_CACHE_PINNED) {
        return -1;
    }
    pthread_mutex_lock(&g_mu);
    g_cache_fraction = fraction;
    g_cache_bytes = 0;
    g_cache_policy = policy;
    remake_caches();
    pthread_mutex_unlock(&g_mu);
    return 0;
}

double ripple_get_cache_fraction(void) {
    pthread_mutex_lock(&g_mu);
    double v = g_cache_fraction;
    pthread_mutex_unlock(&g_mu);
    return v;
}

void ripple_set_direct_io(int on) {
    __atomic_store_n(&g_direct_io, on ? 1 : 0, __ATOMIC_RELAXED);
}

void ripple_set_prefetch(int on) {
    __atomic_store_n(&g_prefetch, on ? 1 : 0, __ATOMIC_RELAXED);
}

int ripple_get_prefetch(void) {
    return __atomic_load_n(&g_prefetch, __ATOMIC_RELAXED);
}

void ripple_set_overlap(int on) {
    __atomic_store_n(&g_overlap, on ? 1 : 0, __ATOMIC_RELAXED);
}

int ripple_get_overlap(void) {
    return __atomic_load_n(&g_overlap, __ATOMIC_RELAXED);
}

void ripple_set_sparse_down_rows(int on) {
    __atomic_store_n(&g_sparse_down_rows, on ? 1 : 0, __ATOMIC_RELAXED);
}

int ripple_get_sparse_down_rows(void) {
    return __atomic_load_n(&g_sparse_down_rows, __ATOMIC_RELAXED);
}

int ripple_get_direct_io(void) {
    return __atomic_load_n(&g_direct_io, __ATOMIC_RELAXED);
}

void ripple_set_cost_model(double latency_s, double bandwidth_bps, double parallelism) {
    pthread_mutex_lock(&g_mu);
    if (latency_s >= 0.0 && bandwidth_bps > 0.0 && parallelism >= 1.0) {
        g_cost_latency = latency_s;
        g_cost_bandwidth = bandwidth_bps;
        g_cost_parallelism = parallelism;
    }
    pthread_mutex_unlock(&g_mu);
}

double ripple_cost_batch(int64_t n_requests, uint64_t bytes) {
    pthread_mutex_lock(&g_mu);
    double lat = g_cost_latency, bw = g_cost_bandwidth, par = g_cost_parallelism;
    pthread_mutex_unlock(&g_mu);
    double qd = (double) ripple_get_io_threads();
    double depth = qd < par ? qd : par;
    return (double) n_requests / (depth > 1.0 ? depth : 1.0) * lat + (double) bytes / bw;
}

int ripple_get_cache_policy(void) {
    pthread_mutex_lock(&g_mu);
    int v = g_cache_policy;
    pthread_mutex_unlock(&g_mu);
    return v;
}

int ripple_set_mode(int mode) {
    if (mode != RIPPLE_MODE_EXACT && mode != RIPPLE_MODE_SPARSE && mode != RIPPLE_MODE_AUTO) {
        return -1;
    }
    __atomic_store_n(&g_mode, mode, __ATOMIC_RELAXED);
    return 0;
}

int ripple_get_mode(void) {
    return __atomic_load_n(&g_mode, __ATOMIC_RELAXED);
}

int ripple_mode_of(const ripple_model * m) {
    const int mode = ripple_get_mode();
    return mode == RIPPLE_MODE_AUTO ? __atomic_load_n(&m->default_mode, __ATOMIC_RELAXED) : mode;
}

void ripple_set_collapse_bytes(int64_t gap_bytes) {
    __atomic_store_n(&g_collapse_bytes, gap_bytes > 0 ? gap_bytes : 0, __ATOMIC_RELAXED);
}

int64_t ripple_get_collapse_bytes(void) {
    return __atomic_load_n(&g_collapse_bytes, __ATOMIC_RELAXED);
}

int ripple_set_exact_down(int source) {
    if (source != RIPPLE_EXACT_DOWN_TENSOR && source != RIPPLE_EXACT_DOWN_BUNDLES) {
        return -1;
    }
    __atomic_store_n(&g_exact_down, source, __ATOMIC_RELAXED);
    return 0;
}

int ripple_get_exact_down(void) {
    return __atomic_load_n(&g_exact_down, __ATOMIC_RELAXED);
}

int64_t ripple_get_cache_bytes(void) {
    pthread_mutex_lock(&g_mu);
    int64_t v = g_cache_bytes;
    pthread_mutex_unlock(&g_mu);
    return v;
}

#define LOAD(field) __atomic_load_n(&g_ripple_counters.field, __ATOMIC_RELAXED)

void ripple_get_stats(ripple_stats * out) {
    memset(out, 0, sizeof(*out));
    out->ffn_matmuls = LOAD(ffn_matmuls);
    out->neurons_computed = LOAD(neurons_computed);
    out->neurons_total = LOAD(neurons_total);
    out->read_ops = LOAD(read_ops);
    out->bytes_read = LOAD(bytes_read);
    out->cache_hits = LOAD(cache_hits);
    out->cache_misses = LOAD(cache_misses);
    out->fallback_reads = LOAD(fallback_reads);
    out->io_seconds = (double) LOAD(io_ns) * 1e-9;
    out->compute_seconds = (double) LOAD(compute_ns) * 1e-9;
    out->predictor_seconds = (double) LOAD(predictor_ns) * 1e-9;
    out->tokens = LOAD(tokens);
    out->needed_bytes = LOAD(needed_bytes);
    out->dense_bytes = LOAD(dense_bytes);
    out->collapse_extra_bytes = LOAD(collapse_extra_bytes);
    out->needed_runs = LOAD(needed_runs);
    out->needed_bundles = LOAD(needed_bundles);
    out->max_run_length = LOAD(max_run_length);
    out->stream_reads = LOAD(stream_reads);
    out->prefetch_bytes = LOAD(prefetch_bytes);
    out->prefetch_used_bytes = LOAD(prefetch_used_bytes);
    out->prefetch_seconds = (double) LOAD(prefetch_ns) * 1e-9;
    out->io_exposed_seconds = (double) LOAD(io_exposed_ns) * 1e-9;
    pthread_mutex_lock(&g_mu);
    for (ripple_model * m = g_models; m; m = m->next) {
        pthread_mutex_lock(&m->mu);
        out->cache_bytes += (uint64_t) m->cache.n_used * m->cache.slot_size + m->cache.resident_used;
        out->cache_capacity += (uint64_t) m->cache.n_slots * m->cache.slot_size;
        pthread_mutex_unlock(&m->mu);
    }
    pthread_mutex_unlock(&g_mu);
}

void ripple_reset_stats(void) {
    memset(&g_ripple_counters, 0, sizeof(g_ripple_counters));
}

/* ---- standalone store (trace replay) ---- */

int ripple_store_open(const char * path, uint64_t file_size, int32_t n_layers, const ripple_layer_desc * layers,
                      char * err, size_t err_len) {
    ripple_model * m = model_create(path, file_size, n_layers, layers, err, err_len);
    if (!m) {
        return -1;
    }
    pthread_mutex_lock(&g_mu);
    ripple_cache_init(&m->cache, m->n_layers, m->layers, model_cache_budget(m), g_cache_policy);
    m->handle = g_next_handle++;
    m->standalone = 1;
    m->n_buffers = 1; /* the caller's reference, dropped by ripple_store_close */
    m->next = g_models;
    g_models = m;
    pthread_mutex_unlock(&g_mu);
    return m->handle;
}

static ripple_model * find_standalone(int handle) {
    pthread_mutex_lock(&g_mu);
    ripple_model * m = find_handle(handle);
    if (m && !m->standalone) {
        m = NULL;
    }
    pthread_mutex_unlock(&g_mu);
    return m;
}

int ripple_store_fetch(int handle, int32_t layer, const int32_t * neurons, int64_t n, int64_t n_tokens) {
    ripple_model * m = find_standalone(handle);
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
    pthread_mutex_lock(&g_mu);
    ripple_model * m = find_handle(handle);
    if (m && m->standalone && m->n_buffers > 0) {
        m->n_buffers = 0;
        m->closed = 1;
        model_maybe_release(m);
    }
    pthread_mutex_unlock(&g_mu);
}

/* ---- activity trace ---- */

static pthread_mutex_t g_trace_mu = PTHREAD_MUTEX_INITIALIZER;
static int32_t *       g_trace;
static int64_t         g_trace_len, g_trace_cap, g_trace_dropped;
static int             g_trace_on;
static int64_t *       g_iolog;
static int64_t         g_iolog_len, g_iolog_cap;

int ripple_trace_start(int64_t max_int32s) {
    if (max_int32s <= 0) {
        return -1;
    }
    pthread_mutex_lock(&g_trace_mu);
    free(g_trace);
    g_trace = malloc(sizeof(int32_t) * (size_t) max_int32s);
    g_trace_cap = g_trace ? max_int32s : 0;
    g_trace_len = 0;
    g_trace_dropped = 0;
    free(g_iolog);
    g_iolog_cap = max_int32s / 2 > 0 ? max_int32s / 2 : 1;
    g_iolog = malloc(sizeof(int64_t) * (size_t) g_iolog_cap);
    g_iolog_len = 0;
    if (!g_iolog) {
        free(g_trace);
        g_trace = NULL;
        g_trace_cap = 0;
    }
    g_trace_on = g_trace != NULL;
    pthread_mutex_unlock(&g_trace_mu);
    return g_trace ? 0 : -1;
}

void ripple_trace_stop(void) {
    pthread_mutex_lock(&g_trace_mu);
    g_trace_on = 0;
    pthread_mutex_unlock(&g_trace_mu);
}

int64_t ripple_trace_read(int32_t * out, int64_t cap) {
    pthread_mutex_lock(&g_trace_mu);
    int64_t n = g_trace_len;
    if (out && cap > 0) {
        memcpy(out, g_trace, sizeof(int32_t) * (size_t) (cap < n ? cap : n));
    }
    pthread_mutex_unlock(&g_trace_mu);
    return n;
}

int64_t ripple_trace_dropped(void) {
    pthread_mutex_lock(&g_trace_mu);
    int64_t n = g_trace_dropped;
    pthread_mutex_unlock(&g_trace_mu);
    return n;
}

void ripple_trace_record(int handle, int layer, int64_t n_tokens, const int32_t * neurons, int64_t n) {
    if (!__atomic_load_n(&g_trace_on, __ATOMIC_RELAXED)) {
        return;
    }
    pthread_mutex_lock(&g_trace_mu);
    if (g_trace_on) {
        if (g_trace_len + 4 + n > g_trace_cap) {
            g_trace_dropped++;
        } else {
            int32_t * r = g_trace + g_trace_len;
            r[0] = handle;
            r[1] = layer;
            r[2] = (int32_t) n_tokens;
            r[3] = (int32_t) n;
            memcpy(r + 4, neurons, sizeof(int32_t) * (size_t) n);
            g_trace_len += 4 + n;
        }
    }
    pthread_mutex_unlock(&g_trace_mu);
}

void ripple_iolog_record(int layer, int64_t n_tokens, const ripple_io_req * reqs, int n) {
    if (!__atomic_load_n(&g_trace_on, __ATOMIC_RELAXED)) {
        return;
    }
    pthread_mutex_lock(&g_trace_mu);
    if (g_trace_on) {
        if (g_iolog_len + 3 + n > g_iolog_cap) {
            g_trace_dropped++;
        } else {
            int64_t * r = g_iolog + g_iolog_len;
            r[0] = layer;
            r[1] = n_tokens;
            r[2] = n;
            for (int i = 0; i < n; i++) {
                r[3 + i] = (int64_t) reqs[i].len;
            }
            g_iolog_len += 3 + n;
        }
    }
    pthread_mutex_unlock(&g_trace_mu);
}

int64_t ripple_iolog_read(int64_t * out, int64_t cap) {
    pthread_mutex_lock(&g_trace_mu);
    int64_t n = g_iolog_len;
    if (out && cap > 0) {
        memcpy(out, g_iolog, sizeof(int64_t) * (size_t) (cap < n ? cap : n));
    }
    pthread_mutex_unlock(&g_trace_mu);
    return n;
}

const ripple_predictor * ripple_layer_predictor(ripple_model * m, int layer) {
    ripple_layer * L = &m->layers[layer];
    if (!L->has_pred) {
        return NULL;
    }
    pthread_mutex_lock(&m->mu);
    if (!L->pred) {
        const size_t size = (size_t) L->d.predictor_size;
        uint8_t * blob = malloc(size ? size : 1);
        char perr[256];
        if (!blob) {
            ripple_set_error("%s: layer %d: out of memory for the predictor", m->path, L->d.block);
        } else if (ripple_pread_full(m->fd, blob, size, L->d.predictor_file_offset, m->path) == 0) {
            if (ripple_crc32c(blob, size) != L->d.predictor_crc) {
                ripple_set_error("%s: layer %d: predictor blob does not match its checksum (file offset %llu): "
                                 "file modified after loading?", m->path, L->d.block,
                                 (unsigned long long) L->d.predictor_file_offset);
            } else if (!(L->pred = ripple_predictor_load(blob, size, L->d.n_embd, L->d.n_ff, perr, sizeof(perr)))) {
                ripple_set_error("%s: layer %d: %s", m->path, L->d.block, perr);
            }
        }
        free(blob);
    }
    const ripple_predictor * p = L->pred;
    pthread_mutex_unlock(&m->mu);
    return p;
}

const void * ripple_layer_down_table(ripple_model * m, int layer) {
    ripple_layer * L = &m->layers[layer];
    if (!L->down_bits) {
        return NULL;
    }
    pthread_mutex_lock(&m->mu);
    if (!L->down_tab) {
        const size_t size = (size_t) L->d.down_table_size;
        uint8_t * table = malloc(size ? size : 1);
        if (!table) {
            ripple_set_error("%s: layer %d: out of memory for the down scale table", m->path, L->d.block);
        } else if (ripple_pread_full(m->fd, table, size, L->d.down_table_file_offset, m->path) == 0) {
            if (ripple_crc32c(table, size) != L->d.down_table_crc) {
                ripple_set_error("%s: layer %d: down scale table does not match its checksum (file offset %llu): "
                                 "file modified after loading?", m->path, L->d.block,
                                 (unsigned long long) L->d.down_table_file_offset);
            } else if (split_table(L, table) != 0) {
                ripple_set_error("%s: layer %d: bad down scale table", m->path, L->d.block);
            }
        }
        free(table);
    }
    const void * t = L->down_tab;
    pthread_mutex_unlock(&m->mu);
    return t;
}

/* ---- counters without Python: RIPPLE_STATS_FILE, and a summary line through ggml's logger ---- */

int ripple_stats_json(char * buf, size_t len) {
    ripple_stats st;
    ripple_get_stats(&st);
    const uint64_t lookups = st.cache_hits + st.cache_misses;
    const double hit_rate = lookups ? (double) st.cache_hits / (double) lookups : 0.0;
    const double mean_run = st.needed_runs ? (double) st.needed_bundles / (double) st.needed_runs : 0.0;
    pthread_mutex_lock(&g_mu);
    const unsigned long long bound = (unsigned long long) g_load_bound, expected = (unsigned long long) g_load_expected;
    const long long load_read = (long long) g_load_read_bytes;
    const double load_s = g_load_seconds;
    pthread_mutex_unlock(&g_mu);
#define U(f) "\"" #f "\": %llu, "
#define D(f) "\"" #f "\": %.9f, "
    return snprintf(buf, len,
                    "{" U(ffn_matmuls) U(neurons_computed) U(neurons_total) U(read_ops) U(bytes_read) U(cache_hits)
                    U(cache_misses) U(fallback_reads) U(cache_bytes) U(cache_capacity) D(io_seconds) D(compute_seconds)
                    U(tokens) U(needed_bytes) U(dense_bytes) U(collapse_extra_bytes) U(max_run_length)
                    D(predictor_seconds) U(stream_reads) U(prefetch_bytes) U(prefetch_used_bytes) D(prefetch_seconds)
                    D(io_exposed_seconds) D(cache_hit_rate) "\"mean_run_length\": %.9f, "
                    "\"load_ffn_tensors_bound\": %llu, \"load_ffn_tensors_expected\": %llu, \"load_read_bytes\": %lld, "
                    "\"load_seconds\": %.6f}",
                    (unsigned long long) st.ffn_matmuls, (unsigned long long) st.neurons_computed,
                    (unsigned long long) st.neurons_total, (unsigned long long) st.read_ops,
                    (unsigned long long) st.bytes_read, (unsigned long long) st.cache_hits,
                    (unsigned long long) st.cache_misses, (unsigned long long) st.fallback_reads,
                    (unsigned long long) st.cache_bytes, (unsigned long long) st.cache_capacity, st.io_seconds,
                    st.compute_seconds, (unsigned long long) st.tokens, (unsigned long long) st.needed_bytes,
                    (unsigned long long) st.dense_bytes, (unsigned long long) st.collapse_extra_bytes,
                    (unsigned long long) st.max_run_length, st.predictor_seconds, (unsigned long long) st.stream_reads,
                    (unsigned long long) st.prefetch_bytes, (unsigned long long) st.prefetch_used_bytes,
                    st.prefetch_seconds, st.io_exposed_seconds, hit_rate, mean_run, bound, expected, load_read, load_s);
#undef U
#undef D
}

/* the JSON written whole to a temporary beside the file, then renamed over it */
static void stats_file_write(void) {
    static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    static int warned = 0;
    const char * path = getenv("RIPPLE_STATS_FILE");
    if (!path || !*path) {
        return;
    }
    char json[2048], tmp[4096];
    ripple_stats_json(json, sizeof(json));
    pthread_mutex_lock(&mu);
    snprintf(tmp, sizeof(tmp), "%s.%d.tmp", path, (int) getpid());
    FILE * f = fopen(tmp, "w");
    int ok = f && fputs(json, f) >= 0 && fputc('\n', f) != EOF;
    ok = f && fclose(f) == 0 && ok;
    ok = ok && rename(tmp, path) == 0;
    if (!ok) {
        unlink(tmp);
        if (!warned) {
            warned = 1;
            fprintf(stderr, "ripple: warning: cannot write RIPPLE_STATS_FILE %s: %s\n", path, strerror(errno));
        }
    }
    pthread_mutex_unlock(&mu);
}

#define RIPPLE_STATS_PERIOD_S 5

static void * stats_thread_main(void * arg) {
    (void) arg;
    for (;;) {
        sleep(RIPPLE_STATS_PERIOD_S);
        stats_file_write();
    }
    return NULL;
}

static void stats_thread_once(void) {
    pthread_t tid;
    if (pthread_create(&tid, NULL, stats_thread_main, NULL) == 0) {
        pthread_detach(tid);
    }
}

void ripple_stats_start(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    const char * path = getenv("RIPPLE_STATS_FILE");
    if (path && *path) {
        pthread_once(&once, stats_thread_once);
    }
}

void ripple_stats_report(const char * model_path) {
    ripple_stats st;
    ripple_get_stats(&st);
    const uint64_t lookups = st.cache_hits + st.cache_misses;
    ggml_log_internal(GGML_LOG_LEVEL_INFO, "ripple: %s freed: %llu tokens, %.1f%% of FFN neurons computed, %.1f MiB read in %llu reads "
                  "(I/O %.2f s, %.2f s of it waited for), cache hit rate %.1f%%\n", model_path,
                  (unsigned long long) st.tokens,
                  st.neurons_total ? 100.0 * (double) st.neurons_computed / (double) st.neurons_total : 0.0,
                  (double) st.bytes_read / 1048576.0, (unsigned long long) st.read_ops, st.io_seconds,
                  st.io_exposed_seconds, lookups ? 100.0 * (double) st.cache_hits / (double) lookups : 0.0);
    stats_file_write();
}
