/* The registry of ripple-packed files: the models llama.cpp loads (their descriptors validated,
 * one load window at a time, the weights the backend claims, freed when their last weight buffer
 * goes) and the standalone stores; each model's neuron cache under the cache budget and policy;
 * and what a model loads at its first use (predictors, split down scale tables). */
#define _GNU_SOURCE
#include "ripple.h"
#include "ripple_base.h"
#include "ripple_cache.h"
#include "ripple_io.h"
#include "ripple_model.h"
#include "ripple_predict.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER; /* the models list and the settings below */
static ripple_model *  g_models;
static ripple_model *  g_loading;
static int             g_next_handle = 1;
static int64_t         g_cache_bytes = 0;
static int             g_cache_policy = RIPPLE_CACHE_PINNED;
static double          g_cache_fraction = 0.0; /* > 0: budget = fraction of each model's FFN bytes */
static int             g_load_bound, g_load_expected; /* FFN tensors taken / in the file, latest successful load */
static int64_t         g_load_read_bytes = -1; /* the process's storage reads during the latest load */
static double          g_load_seconds;

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

void ripple_model_set_load_info(int handle, int expected_tensors, const char * default_mode_reason, int64_t io0,
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

ripple_model * ripple_registry_loading(void) {
    pthread_mutex_lock(&g_mu);
    ripple_model * m = g_loading;
    pthread_mutex_unlock(&g_mu);
    return m;
}

int ripple_registry_loading_handle(void) {
    pthread_mutex_lock(&g_mu);
    const int h = g_loading ? g_loading->handle : 0;
    pthread_mutex_unlock(&g_mu);
    return h;
}

int ripple_registry_loading_file(int fd) {
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        return 0;
    }
    int h = 0;
    pthread_mutex_lock(&g_mu);
    if (g_loading && g_loading->dev == st.st_dev && g_loading->ino == st.st_ino) {
        h = g_loading->handle;
    }
    pthread_mutex_unlock(&g_mu);
    return h;
}

void ripple_model_buffer_ref(ripple_model * m) {
    pthread_mutex_lock(&g_mu);
    m->n_buffers++;
    pthread_mutex_unlock(&g_mu);
}

int ripple_model_buffer_unref(ripple_model * m, char * path, size_t path_len) {
    pthread_mutex_lock(&g_mu);
    m->n_buffers--;
    snprintf(path, path_len, "%s", m->path);
    const int freed = !m->standalone && model_maybe_release(m);
    pthread_mutex_unlock(&g_mu);
    return freed;
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

const ripple_binding * ripple_model_claim(ripple_model * m, const struct ggml_tensor * t) {
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

/* ---- cache budget and policy ---- */

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

int ripple_get_cache_policy(void) {
    pthread_mutex_lock(&g_mu);
    int v = g_cache_policy;
    pthread_mutex_unlock(&g_mu);
    return v;
}

int64_t ripple_get_cache_bytes(void) {
    pthread_mutex_lock(&g_mu);
    int64_t v = g_cache_bytes;
    pthread_mutex_unlock(&g_mu);
    return v;
}

/* ---- standalone stores ---- */

int ripple_registry_open_standalone(const char * path, uint64_t file_size, int32_t n_layers,
                                    const ripple_layer_desc * layers, char * err, size_t err_len) {
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

ripple_model * ripple_registry_standalone(int handle) {
    pthread_mutex_lock(&g_mu);
    ripple_model * m = find_handle(handle);
    if (m && !m->standalone) {
        m = NULL;
    }
    pthread_mutex_unlock(&g_mu);
    return m;
}

void ripple_registry_close_standalone(int handle) {
    pthread_mutex_lock(&g_mu);
    ripple_model * m = find_handle(handle);
    if (m && m->standalone && m->n_buffers > 0) {
        m->n_buffers = 0;
        m->closed = 1;
        model_maybe_release(m);
    }
    pthread_mutex_unlock(&g_mu);
}

/* ---- what the registry reports ---- */

void ripple_registry_cache_usage(uint64_t * bytes, uint64_t * capacity) {
    *bytes = 0;
    *capacity = 0;
    pthread_mutex_lock(&g_mu);
    for (ripple_model * m = g_models; m; m = m->next) {
        pthread_mutex_lock(&m->mu);
        *bytes += (uint64_t) m->cache.n_used * m->cache.slot_size + m->cache.resident_used;
        *capacity += (uint64_t) m->cache.n_slots * m->cache.slot_size;
        pthread_mutex_unlock(&m->mu);
    }
    pthread_mutex_unlock(&g_mu);
}

void ripple_registry_last_load(int * bound, int * expected, int64_t * read_bytes, double * seconds) {
    pthread_mutex_lock(&g_mu);
    *bound = g_load_bound;
    *expected = g_load_expected;
    *read_bytes = g_load_read_bytes;
    *seconds = g_load_seconds;
    pthread_mutex_unlock(&g_mu);
}

/* ---- loaded at first use ---- */

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
