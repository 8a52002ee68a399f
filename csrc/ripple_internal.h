/* Internal structures shared by the backend, the flash store, the cache and the kernels. */
#pragma once

#include "ripple.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "ggml.h"
#include "ggml-backend.h"

enum ripple_kind { RIPPLE_GATE = 0, RIPPLE_UP = 1, RIPPLE_DOWN = 2 };

struct ripple_model;

/* What tensor->extra points to for a weight the backend owns. */
typedef struct ripple_binding {
    struct ripple_model * model;
    int                   layer; /* index into model->layers */
    int                   kind;  /* enum ripple_kind */
} ripple_binding;

typedef struct ripple_layer {
    ripple_layer_desc d;
    int32_t * order;    /* position -> neuron */
    int32_t * pos_of;   /* neuron -> position */
    size_t    gate_row; /* bytes of each part of a bundle */
    size_t    up_row;
    size_t    down_row;
} ripple_layer;

/* ---- neuron cache (ripple_cache.c): LRU over bundles, byte budget ---- */
typedef struct ripple_cache {
    size_t    slot_size;  /* bytes per slot = largest bundle of the model */
    int64_t   n_slots;    /* capacity in bundles */
    int64_t   n_used;
    uint8_t * arena;      /* n_slots * slot_size, anonymous NORESERVE mapping */
    size_t    arena_size;
    int32_t * slot_layer; /* slot -> layer, -1 when free */
    int32_t * slot_pos;   /* slot -> position in layer */
    int64_t * prev;       /* LRU list: head = most recent */
    int64_t * next;
    int64_t   head, tail;
    int32_t ** slot_of;   /* [layer][position] -> slot or -1 */
    int        n_layers;
} ripple_cache;

void      ripple_cache_init(ripple_cache * c, int n_layers, const ripple_layer * layers, size_t budget_bytes);
void      ripple_cache_free(ripple_cache * c);
/* Pointer to the cached bundle (and mark it most recently used), NULL on a miss. */
uint8_t * ripple_cache_get(ripple_cache * c, int layer, int64_t pos);
/* Admit a bundle, evicting the least recently used ones; no-op when the budget is 0. */
void      ripple_cache_put(ripple_cache * c, int layer, int64_t pos, const uint8_t * data, size_t size);

/* ---- a ripple-packed file loaded by llama.cpp (ripple_store.c) ---- */
typedef struct ripple_model {
    int             handle;
    char *          path;
    int             fd;
    dev_t           dev;
    ino_t           ino;
    uint64_t        file_size;
    int             n_layers;
    ripple_layer *  layers;
    int             max_block;
    int *           layer_of_block; /* blk index -> layer index or -1 */
    ripple_binding *bindings;       /* n_layers * 3 */
    int             loading;        /* inside begin_load/end_load */
    int             n_bound;
    int             n_buffers;      /* weight buffers referencing the model */
    int             closed;         /* end_load(ok=0) or unloaded */
    pthread_mutex_t mu;             /* guards the cache */
    ripple_cache    cache;
    struct ripple_model * next;
} ripple_model;

/* registry of models (ripple_store.c) */
ripple_model * ripple_store_loading(void);        /* the model inside its load window, or NULL */
const ripple_binding * ripple_store_claim(ripple_model * m, const struct ggml_tensor * t);
void ripple_store_buffer_ref(ripple_model * m);
void ripple_store_buffer_unref(ripple_model * m);
bool ripple_store_is_ripple_fd(int fd);

/* Fetch the bundles at positions [0, n_ff) flagged in `need` (NULL = all) of one layer into
 * dst (position order, bundle_size apart). Returns 0 or -1 with ripple_set_error called. */
int ripple_store_fetch_layer(ripple_model * m, int layer, const uint8_t * need, uint8_t * dst);
/* Read size bytes of the standard tensor behind a binding, at offset, into dst. */
int ripple_store_read_tensor(const ripple_binding * b, void * dst, size_t offset, size_t size);
int ripple_pread_full(int fd, void * dst, size_t size, uint64_t offset, const char * path);

/* ---- kernels (ripple_kernels.c) ---- */
typedef struct ripple_pool ripple_pool;
ripple_pool * ripple_pool_new(void);
void          ripple_pool_free(ripple_pool * p);
typedef void (*ripple_task_fn)(void * arg, int ith, int nth);
void          ripple_pool_run(ripple_pool * p, int n_threads, ripple_task_fn fn, void * arg);

/* Rows of one weight matrix wherever they lie: row i at base + (map ? map[i] : i) * stride. */
typedef struct ripple_rows {
    enum ggml_type  type;
    int64_t         row_len;  /* values per row */
    int64_t         n_rows;
    const uint8_t * base;
    size_t          stride;
    const int32_t * map;
} ripple_rows;

/* dst[i, t] = dot(row i, src1[:, t]) with ggml's vec_dot (stock's arithmetic) */
int ripple_kernel_rows(ripple_pool * pool, int n_threads, const ripple_rows * rows,
                       const struct ggml_tensor * src1, struct ggml_tensor * dst);
/* dst = sum over neurons of h[neuron] * down column of the bundles in `ws` (position order) */
int ripple_kernel_down(ripple_pool * pool, int n_threads, const ripple_layer * L,
                       const uint8_t * ws, const struct ggml_tensor * src1, struct ggml_tensor * dst);

/* ---- errors and counters (ripple_store.c) ---- */
void ripple_set_error(const char * fmt, ...) __attribute__((format(printf, 1, 2)));

typedef struct ripple_counters {
    uint64_t ffn_matmuls, neurons_computed, neurons_total, read_ops, bytes_read;
    uint64_t cache_hits, cache_misses, fallback_reads;
    uint64_t io_ns, compute_ns;
} ripple_counters;
extern ripple_counters g_ripple_counters;
#define RIPPLE_COUNT(field, v) __atomic_fetch_add(&g_ripple_counters.field, (uint64_t)(v), __ATOMIC_RELAXED)
uint64_t ripple_now_ns(void);

/* ---- load hook (ripple_loadhook.c) ---- */
void ripple_loadhook_end_load(void);

/* ---- backend (ripple_backend.c) ---- */
ggml_backend_reg_t ggml_backend_ripple_reg(void);
