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
struct ripple_pool;

/* What tensor->extra points to for a weight the backend owns. */
typedef struct ripple_binding {
    struct ripple_model * model;
    int                   layer; /* index into model->layers */
    int                   kind;  /* enum ripple_kind */
} ripple_binding;

/* A sketch predictor (ripple_sketch.c, docs/FORMAT.md 3c): pointers into its blob, kept whole */
typedef struct ripple_sketch {
    uint8_t *           blob;
    int32_t             n_out, gated, act, n_pad;
    const int32_t *     out;      /* n_out outlier channels, ascending */
    const float *       osg, * osu; /* per outlier channel: int8 weight scale (gate, up) */
    const ggml_fp16_t * dg, * du; /* per row: 2-bit quantization step */
    const uint8_t *     cg, * cu; /* n_ff rows of n_pad / 4 code bytes */
    const int8_t *      og, * ou; /* n_ff rows of n_out outlier weights */
} ripple_sketch;

enum { RIPPLE_PREDICTOR_LOWRANK = 0, RIPPLE_PREDICTOR_SKETCH = 1 };

/* A layer's predictor. Low rank, in f32 (from the blob, weights f16 there):
 * z = (x - x_shift) * x_scale, logits = W2T relu(W1T z + b1) + b2, selected iff logit > threshold;
 * or a sketch: selected iff score > threshold. */
typedef struct ripple_predictor {
    int     kind;  /* RIPPLE_PREDICTOR_* */
    int32_t rank;
    float   threshold;
    float * x_shift; /* n_embd */
    float * x_scale; /* n_embd */
    ggml_fp16_t * w1t; /* rank x n_embd, as stored (f16 halves the memory the predictors keep) */
    float * b1;  /* rank */
    ggml_fp16_t * w2t; /* n_ff x rank */
    float * b2;  /* n_ff */
    ripple_sketch sk;
} ripple_predictor;

typedef struct ripple_layer {
    ripple_layer_desc d;
    int32_t * order;    /* position -> neuron */
    int32_t * pos_of;   /* neuron -> position */
    ripple_predictor * pred; /* loaded at its first use (ripple_layer_predictor); NULL = not yet, or none */
    int       has_pred;          /* the file has a predictor for this layer */
    size_t    gate_row; /* bytes of each part of a bundle */
    size_t    up_row;
    size_t    down_row;
    void *    down_tab;  /* split down columns: per group of down_group neurons its n_embd scales, then
                            (down_has_min) its n_embd minimums, f16 (down_tab_f16) or f32; loaded at
                            first use (ripple_layer_down_table); NULL for column layouts */
    int       down_bits; /* split (ripple_split_info): bits per stored value (2, 3, 4, 5, 6 or 8); 0: column layout */
    int       down_qoff; /* split: offset subtracted from the stored integer */
    int       down_group;   /* split: neurons per table entry (32, or 16 for Q2_K/Q3_K/Q6_K) */
    int       down_has_min; /* split: the entries carry a minimum (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) */
    int       down_tab_f16; /* split: the table holds f16 values (every entry is one exactly), else f32 */
    uint64_t  dense_bytes; /* the layer's standard ffn_gate/up/down tensors: what a dense FFN reads */
    /* exact mode without direct_io: the standard ffn_gate/up/down tensors mapped read-only (page
     * cache, as stock llama.cpp maps its weights), and the file's (size, mtime, ctime) when they last
     * passed their checksums: while the file keeps them they are not checked again */
    void *    std_map[3];
    size_t    std_map_len[3];
    size_t    std_map_skip[3]; /* bytes from a mapping's start to the tensor (page alignment) */
    int       std_checked;
    int64_t   std_stamp[5];
    uint8_t * freq;            /* n_ff, position order: how often needed (255 = every token); NULL = unknown */
    uint32_t * bundle_crc;     /* n_ff, position order */
    uint32_t * tensor_crc[3];  /* per enum ripple_kind: one per crc_block bytes of the standard tensor */
    uint64_t  tensor_bytes[3]; /* bytes of the standard tensors (gate: 0 when ungated) */
} ripple_layer;

/* ---- neuron cache (ripple_cache.c): bundles in DRAM under a byte budget ---- */
enum ripple_cache_policy {
    RIPPLE_CACHE_LRU     = 0, /* least recently used evicted first */
    RIPPLE_CACHE_S3FIFO  = 1, /* S3-FIFO (SOSP'23): small FIFO + main 2-bit CLOCK FIFO + ghost */
    RIPPLE_CACHE_LINKING = 2, /* S3-FIFO admitting a bundle read in a run of L with probability 1/L */
    RIPPLE_CACHE_PINNED  = 3, /* the most frequently needed bundles, kept once read, never evicted */
};
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
    int             dfd;            /* O_DIRECT descriptor, opened on first use; -1 none */
    int             direct_state;   /* 0 not tried, 1 dfd open, -1 refused (buffered reads used) */
    uint8_t *       scratch;        /* ripple_store_fetch: one layer's bundles */
    size_t          scratch_cap;
    int             standalone;     /* opened by ripple_store_open (replay), not by llama.cpp */
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

/* registry of models (ripple_store.c); ripple_load_begin (ripple_file.c) fills the descriptors */
/* Announce a ripple-packed file that llama.cpp is about to load. Until ripple_model_end_load,
 * the backend claims the blk.N.ffn_{gate,up,down}.weight tensors described by `layers`.
 * Returns a model handle (> 0), or -1 with a message in err. */
int ripple_model_begin_load(const char * path, uint64_t file_size, int32_t n_layers,
                            const ripple_layer_desc * layers, char * err, size_t err_len);
/* The mode RIPPLE_MODE_AUTO means for a loaded model (EXACT or SPARSE). Returns 0, -1 for a bad
 * mode or an unknown handle. */
int ripple_model_set_default_mode(int handle, int mode);
int ripple_model_bound_tensors(int handle);
void ripple_store_set_info(int handle, int expected_tensors, const char * default_mode_reason, int64_t io0,
                           uint64_t t0);
int64_t ripple_proc_read_bytes(void); /* read_bytes of /proc/self/io, -1 when unavailable */
int ripple_store_open(const char * path, uint64_t file_size, int32_t n_layers, const ripple_layer_desc * layers,
                      char * err, size_t err_len);
int64_t ripple_store_collapse_gap(void); /* the access-collapse threshold of the cost model in force */

/* ---- the reader of ripple-packed files (ripple_file.c) ---- */
struct ripple_file;
/* 1 ripple-packed (*out set, its metadata checked), 0 not ripple, -1 err ("<path>: <problem>") */
int  ripple_file_open(const char * path, struct ripple_file ** out, char * err, size_t err_len);
int  ripple_file_check_quick(struct ripple_file * f, char * err, size_t err_len);
int  ripple_file_load_blobs(struct ripple_file * f, char * err, size_t err_len);
void ripple_file_free(struct ripple_file * f);

typedef struct ripple_sha256 {
    uint32_t h[8];
    uint64_t len;
    uint8_t  buf[64];
    size_t   fill;
} ripple_sha256;
void ripple_sha256_init(ripple_sha256 * s);
void ripple_sha256_update(ripple_sha256 * s, const void * data, size_t n);
void ripple_sha256_hex(ripple_sha256 * s, char out[65]);

/* ggml's logger (exported by libggml-base): what llama.cpp's hosts print and redirect */
void ggml_log_internal(enum ggml_log_level level, const char * format, ...);

/* the load-function hook (ripple_loadhook.c): llama_model_load_from_file of every module of a host
 * process without Python goes through ripple_load_begin */
int ripple_loadfn_hook_install(char * err, size_t err_len);

ripple_model * ripple_store_loading(void);        /* the model inside its load window, or NULL */
const ripple_binding * ripple_store_claim(ripple_model * m, const struct ggml_tensor * t);
void ripple_store_buffer_ref(ripple_model * m);
void ripple_store_buffer_unref(ripple_model * m);
bool ripple_store_is_ripple_fd(int fd);

/* Read size bytes of the standard tensor behind a binding, at offset, into dst. */
int ripple_store_read_tensor(const ripple_binding * b, void * dst, size_t offset, size_t size);
int ripple_pread_full(int fd, void * dst, size_t size, uint64_t offset, const char * path);

/* ---- checksums (ripple_crc.c) and checks of what was read (ripple_store.c) ---- */
/* out[i] = CRC32C of the len bytes at base + (idx ? idx[i] : i) * stride, for i < n */
void ripple_crc32c_pieces(const uint8_t * base, size_t stride, size_t len, const int64_t * idx, int64_t n,
                          uint32_t * out);
/* The bundles at positions pos[0..n) of a layer, held at buf + p * bundle_size, against the
 * checksum table; 0, or -1 with the error (file, offset) set. Nothing checked when verification is off. */
int ripple_verify_bundles(const ripple_model * m, int layer, const uint8_t * buf, const int64_t * pos, int64_t n);
/* Bytes [off, off + len) of a layer's standard tensor `kind` held in buf; off a multiple of the
 * checksum block, len whole blocks or up to the end of the tensor. */
int ripple_verify_tensor(const ripple_model * m, int layer, int kind, const uint8_t * buf, uint64_t off, uint64_t len);

/* ---- I/O engine (ripple_io.c) ---- */
typedef struct ripple_io_req {
    int       fd;
    int       direct; /* fd was opened with O_DIRECT: 1 aligned transfers through a bounce buffer;
                         2 offset and dst 4 KiB-aligned, read straight into dst, which has room for
                         len rounded up to 4 KiB (the end of the file may come after len) */
    uint64_t  offset;
    size_t    len;
    uint8_t * dst;
} ripple_io_req;
/* Issue the requests together (queue depth = the io threads setting) and wait for all; bytes the
 * device transferred (alignment included) in *dev_bytes. 0, or -1 with the error set. */
int ripple_io_run(const ripple_io_req * reqs, int n, const char * path, uint64_t * dev_bytes);
/* O_DIRECT descriptor of the file (same inode as dev/ino), or -1 with the reason in why */
int ripple_open_direct(const char * path, dev_t dev, ino_t ino, char * why, size_t why_len);
/* append a layer fetch's requests to the read log when tracing */
void ripple_iolog_record(int layer, int64_t n_tokens, const ripple_io_req * reqs, int n);

/* ---- sparse mode (ripple_sparse.c) ---- */
ripple_predictor * ripple_predictor_load(const uint8_t * blob, size_t size, int n_embd, int n_ff,
                                         char * err, size_t err_len);
void ripple_predictor_free(ripple_predictor * p);
/* sketch predictors (ripple_sketch.c): load into p (its kind set), and per token the selection
 * (tok[t * n_ff + i]) and optionally the scores */
int  ripple_sketch_load(ripple_predictor * p, const uint8_t * blob, size_t size, int n_embd, int n_ff, char * err,
                        size_t err_len);
void ripple_sketch_predict(struct ripple_pool * pool, int n_threads, const ripple_predictor * p, const ripple_layer * L,
                           const struct ggml_tensor * src1, uint8_t * tok, float * scores);
/* tok[t * n_ff + neuron] = 1 for the neurons the predictor selects for token t of src1, need[neuron]
 * the union over tokens; returns the (token, neuron) pairs selected */
/* the layer's predictor, read from the file and checked at its first use (memory only where sparse
 * mode runs); NULL with the error set when it cannot be, NULL without error when there is none */
const ripple_predictor * ripple_layer_predictor(struct ripple_model * m, int layer);
/* the same for the split down columns' scale table (L->down_tab); NULL for other layouts */
const void * ripple_layer_down_table(struct ripple_model * m, int layer);
int64_t ripple_predict(struct ripple_pool * pool, int n_threads, const ripple_predictor * p, const ripple_layer * L,
                       const struct ggml_tensor * src1, uint8_t * need, uint8_t * tok);
/* Next-layer prefetch: while layer l computes (and the attention of l+1 after it), a thread reads
 * the bundles layer l+1's predictor selects from layer l's FFN input, minus those cached. */
typedef struct ripple_prefetch {
    pthread_mutex_t mu;
    pthread_cond_t  cv;
    int             started;  /* thread running */
    int             queued;   /* a batch waits for the thread */
    int             busy;     /* a batch is queued or being read */
    int             quit;
    ripple_model *  m;        /* target of the batch / of the data in buf */
    int             layer;
    int             valid;    /* buf holds the batch's bundles (read without error) */
    uint8_t *       buf;      /* n_ff * bundle_size of the target layer, position order */
    size_t          buf_cap;
    uint8_t *       have;     /* per position: 1 = in buf */
    int32_t *       read_len; /* per position: bundles in its request */
    uint8_t *       scratch;  /* predictor output (n_ff) */
    size_t          n_cap;    /* capacity of have/read_len/scratch/reqs in positions */
    ripple_io_req * reqs;
    int             n_req;
    int             rc;
    uint64_t        bytes, ns;
    pthread_t       tid;
} ripple_prefetch;
void ripple_prefetch_free(ripple_prefetch * pf);
/* Start reading the predicted bundles of layer `layer` of m for the token in src1 (one token). */
void ripple_prefetch_start(ripple_prefetch * pf, ripple_model * m, int layer, const struct ggml_tensor * src1);
/* Wait for the batch; the prefetched data when it is for (m, layer), else NULL (and dropped). */
const ripple_prefetch * ripple_prefetch_take(ripple_prefetch * pf, ripple_model * m, int layer);

/* Where the needed bundles of a layer fetch are, and which were read from the file: those are offered
 * to the cache by ripple_fetch_admit once the layer's compute is done.
 * A fetch with overlap returns while its reads are in flight: a reader thread reads the requests in
 * up to RIPPLE_FETCH_PIECES pieces, one after the other, and the caller computes the bundles already
 * present (list[0, n_ready)) and then each piece's (list[piece_end[k-1], piece_end[k])) as soon as
 * ripple_fetch_piece(f, k) says it landed and passed its checksums. */
#define RIPPLE_FETCH_PIECES 4
typedef struct ripple_fetch {
    const uint8_t ** ptr;      /* per position: the bundle (cache slot or read buffer) */
    uint8_t *        admit;    /* per position: read by this fetch */
    int32_t *        read_len; /* per position: bundles in its request */
    int64_t          cap;
    ripple_model *   m;
    int              layer;
    const uint8_t *  dst;
    int              pending;
    /* overlap */
    int32_t *        list;      /* needed neurons: present first, then piece by piece */
    int64_t          n_ready;
    int              n_pieces;  /* 0: nothing in flight */
    int64_t          piece_end[RIPPLE_FETCH_PIECES];
    int64_t *        check;     /* positions read, to verify, piece by piece */
    int64_t          check_end[RIPPLE_FETCH_PIECES];
    ripple_io_req *  reqs;
    int              req_end[RIPPLE_FETCH_PIECES];
    int              verified;  /* pieces checked by the caller */
    int              rc;        /* first failure of a piece (read or checksum) */
    /* reader thread */
    pthread_t        tid;
    int              started, quit, queued;
    int              landed;    /* pieces read (or failed) */
    int              read_rc;
    uint64_t         bytes, io_ns;
    pthread_mutex_t  mu;
    pthread_cond_t   cv;
} ripple_fetch;
/* read the bundles at positions flagged in need (NULL = all), for a batch of n_tokens; access
 * collapse, and for batches of several tokens the cost model's union-or-stream choice; bundles in pf
 * (a prefetch of this layer, may be NULL) are taken from it. With f, cache hits stay in place
 * (f->ptr) and admission waits for ripple_fetch_admit; without f, hits are copied into dst. With f
 * and overlap, the reads may still be in flight on return (f->n_pieces > 0). */
int ripple_fetch_bundles(ripple_model * m, int layer, const uint8_t * need, int64_t n_tokens, uint8_t * dst,
                         const ripple_prefetch * pf, ripple_fetch * f, int overlap);
/* wait for piece k of an overlapped fetch, check it; 0 or -1 (error set) */
int ripple_fetch_piece(ripple_fetch * f, int k);
/* wait for every read of f still in flight (and check them); 0 or -1 */
int ripple_fetch_finish(ripple_fetch * f);
void ripple_fetch_admit(ripple_fetch * f);
void ripple_fetch_free(ripple_fetch * f);
int ripple_read_fd(ripple_model * m, int * direct);
/* activity trace (ripple_trace_start): one record per layer fetch */
void ripple_trace_record(int handle, int layer, int64_t n_tokens, const int32_t * neurons, int64_t n);
/* cost of a batch of read requests issued together (ripple_set_cost_model) */
double ripple_cost_batch(int64_t n_requests, uint64_t bytes);
int ripple_get_direct_io(void);
int ripple_get_mode(void);
int ripple_mode_of(const ripple_model * m); /* the mode in force for m (RIPPLE_MODE_AUTO resolved) */
int64_t ripple_get_collapse_bytes(void);

/* ---- kernels (ripple_kernels.c) ---- */
/* ggml's CPU backend, found at run time (linked, global, or a module loaded by ggml): its type
 * traits (NULL when no CPU backend is loaded), and its initialisation (-1 when not found) */
const struct ggml_type_traits_cpu * ripple_cpu_traits(enum ggml_type type);
int ripple_cpu_init(void);

typedef struct ripple_pool ripple_pool;
ripple_pool * ripple_pool_new(void);
void          ripple_pool_free(ripple_pool * p);
typedef void (*ripple_task_fn)(void * arg, int ith, int nth);
void          ripple_pool_run(ripple_pool * p, int n_threads, ripple_task_fn fn, void * arg);
/* the tasks run on an OpenMP team (they may use `omp barrier`) */
int           ripple_pool_is_openmp(void);

/* Rows of one weight matrix wherever they lie: row i at ptrs[map[i]] + ptr_off (bundles wherever
 * each is: cache slot or read buffer), or at base + (map ? map[i] : i) * stride. */
typedef struct ripple_rows {
    enum ggml_type  type;
    int64_t         row_len;  /* values per row */
    int64_t         n_rows;
    const uint8_t * base;
    size_t          stride;
    const int32_t * map;
    const int32_t * list;     /* rows to compute (the others are set to 0); NULL = all */
    int64_t         n_list;
    const uint8_t * const * ptrs; /* NULL: base/stride */
    size_t          ptr_off;
    int             keep;     /* with a list: the rows not in it are left as they are (not set to 0) */
} ripple_rows;

/* dsts[m][i, t] = dot(row i of rows[m], src1[:, t]) with ggml's vec_dot (stock's arithmetic), for
 * n_mats (1 or 2) matrices of the same shape and list, computed in one pass over the rows */
int ripple_kernel_rows(ripple_pool * pool, int n_threads, const ripple_rows * rows, int n_mats,
                       const struct ggml_tensor * src1, struct ggml_tensor * const * dsts);
/* dst = sum over neurons of h[neuron] * down column of the bundles (ptrs: per position), computed
 * as stock's dot products on its activations converted to the vec_dot type (split layouts: in the
 * integer form; others summed in f32 over `positions`, NULL = all). h values not selected for their
 * token (token_mask, n_tokens x n_ff, neuron order) and, with apply_rule and the magnitude rule,
 * those with |h| <= threshold are dropped before the conversion. */
/* one token's FFN activations x (n_ff) with those not selected for it (token_mask, may be NULL) and,
 * with rule, those with |h| <= the layer's threshold set to 0 */
void ripple_mask_activations(const ripple_layer * L, const float * x, const uint8_t * token_mask, int rule, float * out);
int ripple_kernel_down(ripple_pool * pool, int n_threads, const ripple_layer * L, const uint8_t * const * ptrs,
                       const int32_t * positions, int64_t n_positions, int apply_rule,
                       const uint8_t * token_mask, const struct ggml_tensor * src1, struct ggml_tensor * dst);

/* ---- errors and counters (ripple_store.c) ---- */
void ripple_set_error(const char * fmt, ...) __attribute__((format(printf, 1, 2)));

typedef struct ripple_counters {
    uint64_t ffn_matmuls, neurons_computed, neurons_total, read_ops, bytes_read;
    uint64_t cache_hits, cache_misses, fallback_reads;
    uint64_t io_ns, compute_ns, predictor_ns;
    uint64_t tokens, needed_bytes, dense_bytes, collapse_extra_bytes, needed_runs, needed_bundles, max_run_length;
    uint64_t stream_reads, prefetch_bytes, prefetch_used_bytes, prefetch_ns;
    uint64_t io_exposed_ns;
} ripple_counters;
extern ripple_counters g_ripple_counters;
#define RIPPLE_COUNT(field, v) __atomic_fetch_add(&g_ripple_counters.field, (uint64_t)(v), __ATOMIC_RELAXED)
uint64_t ripple_now_ns(void);

/* counters without Python: RIPPLE_STATS_FILE written every few seconds once a model is loaded
 * (ripple_stats_start) and when a model is freed (ripple_stats_report, which also logs a summary
 * line through ggml's logger) */
void ripple_stats_start(void);
void ripple_stats_report(const char * model_path);

/* ---- load hook (ripple_loadhook.c) ---- */
void ripple_loadhook_end_load(void);

/* ---- backend (ripple_backend.c) ---- */
ggml_backend_reg_t ggml_backend_ripple_reg(void);
