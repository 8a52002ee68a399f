/* The registry of ripple-packed files (ripple_model.c): the models llama.cpp loads (one load window
 * at a time) and the standalone stores, their layers validated from the file's descriptors, their
 * neuron caches under the cache budget and policy, and what they load at first use. */
#pragma once

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "ggml.h"
#include "ripple_cache.h"
#include "ripple_layer.h"

struct ripple_model;
struct ripple_predictor;

/* What tensor->extra points to for a weight the backend owns. */
typedef struct ripple_binding {
    struct ripple_model * model;
    int                   layer; /* index into model->layers */
    int                   kind;  /* enum ripple_kind */
} ripple_binding;

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
    int             dfd;            /* O_DIRECT descriptor, opened on first use; -1 none */
    int             direct_state;   /* 0 not tried, 1 dfd open, -1 refused (buffered reads used) */
    uint8_t *       scratch;        /* ripple_store_fetch: one layer's bundles */
    size_t          scratch_cap;
    int             standalone;     /* a standalone store (replay), not loaded by llama.cpp */
    int             default_mode;   /* RIPPLE_MODE_EXACT/SPARSE: what RIPPLE_MODE_AUTO means for this file */
    int             expected_tensors; /* FFN weight tensors of the file */
    char            default_mode_reason[256];
    int64_t         load_io0;         /* ripple_proc_read_bytes() when the load began */
    uint64_t        load_t0;
    uint64_t        crc_block;      /* bytes per checksum block of the standard FFN tensors */
    pthread_mutex_t mu;             /* guards the cache */
    ripple_cache    cache;
    struct ripple_model * next;
} ripple_model;

/* ---- models llama.cpp loads ---- */
/* Announce a ripple-packed file that llama.cpp is about to load (its descriptors checked and
 * copied). Until ripple_model_end_load, the backend claims the blk.N.ffn_{gate,up,down}.weight
 * tensors described by `layers`. Returns a model handle (> 0), or -1 with a message in err. */
int ripple_model_begin_load(const char * path, uint64_t file_size, int32_t n_layers,
                            const ripple_layer_desc * layers, char * err, size_t err_len);
/* The mode RIPPLE_MODE_AUTO means for a loaded model (EXACT or SPARSE). Returns 0, -1 for a bad
 * mode or an unknown handle. */
int ripple_model_set_default_mode(int handle, int mode);
/* what ripple_model_get_info reports, and where the load's read and time counts start */
void ripple_model_set_load_info(int handle, int expected_tensors, const char * default_mode_reason, int64_t io0,
                                uint64_t t0);
ripple_model * ripple_registry_loading(void);   /* the model inside its load window, or NULL */
int ripple_registry_loading_handle(void);       /* its handle, 0 when none */
int ripple_registry_loading_file(int fd);       /* its handle when fd is its file, else 0 */
/* The binding for a weight of the loading model, after checking it is the tensor described. */
const ripple_binding * ripple_model_claim(ripple_model * m, const struct ggml_tensor * t);
/* weight buffers: the model lives while one references it; unref returns 1 when that freed the
 * model (its path copied to path) */
void ripple_model_buffer_ref(ripple_model * m);
int  ripple_model_buffer_unref(ripple_model * m, char * path, size_t path_len);

/* ---- standalone stores (ripple_store.c) ---- */
int ripple_registry_open_standalone(const char * path, uint64_t file_size, int32_t n_layers,
                                    const ripple_layer_desc * layers, char * err, size_t err_len);
ripple_model * ripple_registry_standalone(int handle); /* NULL when no standalone store has it */
void ripple_registry_close_standalone(int handle);

/* ---- what the registry reports (ripple_stats.c) ---- */
/* bytes the neuron caches of every model hold now, and their budgets */
void ripple_registry_cache_usage(uint64_t * bytes, uint64_t * capacity);
/* the latest successful ripple load: FFN tensors taken and in the file, the process's storage reads
 * during it (-1 unknown) and its wall time */
void ripple_registry_last_load(int * bound, int * expected, int64_t * read_bytes, double * seconds);

/* ---- loaded at first use ---- */
/* the layer's predictor, read from the file and checked at its first use (memory only where sparse
 * mode runs); NULL with the error set when it cannot be, NULL without error when there is none */
const struct ripple_predictor * ripple_layer_predictor(ripple_model * m, int layer);
/* the same for the split down columns' scale table (L->down_tab); NULL for other layouts */
const void * ripple_layer_down_table(ripple_model * m, int layer);
