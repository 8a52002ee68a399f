/* ripple-gguf control API: the only symbols Python binds (through cffi, ABI mode).
 *
 * The library reads ripple-packed files itself (csrc/ripple_file.c, through ggml's gguf API):
 * ripple_load_begin identifies the file a host is about to load, checks it and claims its FFN
 * tensors, for Python's load wrapper and for the load-function hook a host without Python gets
 * (GGML_BACKEND_PATH). This header is parsed by cffi: no preprocessor logic below the
 * RIPPLE_CDEF_BEGIN marker except the include guard lines the binding strips.
 */
#ifndef RIPPLE_H
#define RIPPLE_H
#include <stddef.h>
#include <stdbool.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif
#pragma GCC visibility push(default)
/* RIPPLE_CDEF_BEGIN */

/* The numbering of every choice the API takes or reports, declared here only (Python reads the
 * values through the binding). */
enum ripple_mode {
    RIPPLE_MODE_EXACT = 0,  /* every neuron computed */
    RIPPLE_MODE_SPARSE = 1, /* per token and layer only the bundles the layer's predictor selects */
    RIPPLE_MODE_AUTO = 2,   /* each model's own default (sparse unless its file says exact) */
};
enum ripple_cache_policy {
    RIPPLE_CACHE_LRU = 0,     /* least recently used evicted first */
    RIPPLE_CACHE_S3FIFO = 1,  /* S3-FIFO (SOSP'23): small FIFO + main 2-bit CLOCK FIFO + ghost */
    RIPPLE_CACHE_LINKING = 2, /* S3-FIFO admitting a bundle read in a run of L with probability 1/L */
    RIPPLE_CACHE_PINNED = 3,  /* the most frequently needed bundles, kept once read, never evicted */
};
/* When a neuron counts as active (ripple.sparsity.rule in the file, constants.SPARSITY_RULES; the
 * gate rule only for oracle sparsity, ripple_sparsify) */
enum ripple_activity_rule {
    RIPPLE_RULE_NONE = -1,     /* none: the file was packed without profiling */
    RIPPLE_RULE_NONZERO = 0,   /* "nonzero": h != 0 */
    RIPPLE_RULE_MAGNITUDE = 1, /* "magnitude": |h| > the layer's threshold */
    RIPPLE_RULE_GATE = 2,      /* "gate" (CATS): |act(gate)| > the layer's threshold */
};
/* the gate activation of a gated FFN (ripple_sparsify's gate rule) */
enum ripple_glu_activation {
    RIPPLE_GLU_SILU = 0, /* "silu": x * sigmoid(x) */
    RIPPLE_GLU_GELU = 1, /* "gelu": ggml's tanh approximation */
};
/* where exact mode takes the down projection from: the standard ffn_down tensor (stock's own
 * arithmetic, the default) or the down columns of the bundles (what sparse mode reads) */
enum ripple_exact_down {
    RIPPLE_EXACT_DOWN_TENSOR = 0,
    RIPPLE_EXACT_DOWN_BUNDLES = 1,
};
/* sparse mode's down projection (ripple_set_sparse_down_rows) */
enum ripple_sparse_down {
    RIPPLE_SPARSE_DOWN_BUNDLES = 0, /* always from the bundles' down columns */
    RIPPLE_SPARSE_DOWN_AUTO = 1,    /* the standard ffn_down rows when the file is read through the page cache */
};
/* the I/O engine (ripple_set_io_engine) */
enum ripple_io_engine {
    RIPPLE_IO_ENGINE_THREADS = 0, /* reader threads */
    RIPPLE_IO_ENGINE_URING = 1,   /* io_uring (raw system calls, used when the kernel allows it) */
    RIPPLE_IO_ENGINE_AUTO = 2,    /* io_uring for batches of small requests (mean < 64 KiB), threads for large ones */
};

typedef struct ripple_layer_desc {
    int32_t  block;          /* N of blk.N.ffn_* */
    int32_t  n_ff;           /* neurons (bundles) in the layer */
    int32_t  n_embd;         /* model width: length of every bundle part */
    int32_t  gate_type;      /* ggml type of the gate row, -1 for an ungated FFN */
    int32_t  up_type;        /* ggml type of the up row */
    int32_t  down_type;      /* ggml type of the down column (row of the transposed down) */
    uint64_t bundles_offset; /* absolute file offset of the bundle at position 0 */
    uint64_t bundle_size;    /* bytes per bundle: gate | up | down */
    const int32_t * order;   /* n_ff entries: neuron id stored at each position */
    uint64_t gate_offset;    /* absolute file offsets of the standard tensors (gate: 0 if none) */
    uint64_t up_offset;
    uint64_t down_offset;
    int32_t  down_src_type;  /* ggml type of the standard ffn_down tensor */
    int32_t  act_rule;       /* enum ripple_activity_rule: NONE, NONZERO or MAGNITUDE */
    float    act_threshold;  /* RIPPLE_RULE_MAGNITUDE: a neuron is active iff |h| > act_threshold */
    const uint8_t * predictor; /* predictor blob (ripple_gguf/offline/predictor.py layout), NULL = none; copied */
    uint64_t predictor_size;
    int32_t  down_layout;    /* 0 column (a row of down_type), 1 split (the source's integers; scales in down_table) */
    const uint8_t * down_table; /* split: f32 (scale, min)[n_ff/group][n_embd], value = scale * (q - offset) + min; copied */
    uint64_t down_table_size;
    /* checksum table (docs/FORMAT.md 2b): every read from the file is checked against it */
    const uint32_t * bundle_crc; /* n_ff CRC32C, one per bundle, position order; copied */
    const uint32_t * tensor_crc; /* CRC32C of each crc_block bytes of the standard ffn_gate (none when
                                    ungated), ffn_up and ffn_down data, in that order; copied */
    uint64_t tensor_crc_count;
    uint64_t crc_block;          /* bytes per tensor checksum block (the last block of a tensor may be shorter) */
    const uint8_t * frequency;   /* n_ff, position order: how often each bundle is needed (255 = every
                                    token), measured by the converter; NULL = unknown; copied */
    uint64_t predictor_file_offset; /* absolute offset of the predictor blob: the blob is checked at load
                                       and read again from here at its first use (sparse mode) */
    uint32_t predictor_crc;      /* CRC32C of the blob */
    uint64_t down_table_file_offset; /* absolute offset of the split down scale table: checked at load,
                                        read again from here at its first use */
    uint32_t down_table_crc;     /* CRC32C of the table */
} ripple_layer_desc;

typedef struct ripple_stats {
    uint64_t ffn_matmuls;      /* MUL_MATs computed by the backend */
    uint64_t neurons_computed; /* bundle rows computed, summed over matmuls and tokens */
    uint64_t neurons_total;    /* rows a dense FFN would have computed */
    uint64_t read_ops;         /* read requests issued to the file */
    uint64_t bytes_read;       /* bytes those requests returned */
    uint64_t cache_hits;       /* bundles served from the neuron cache */
    uint64_t cache_misses;     /* bundles that had to be read */
    uint64_t fallback_reads;   /* weight tensors read whole through get_tensor */
    uint64_t cache_bytes;      /* bytes held by the neuron caches now */
    uint64_t cache_capacity;   /* byte budget of the neuron caches now */
    double   io_seconds;       /* wall time spent in reads */
    double   compute_seconds;  /* wall time spent in FFN kernels */
    uint64_t tokens;           /* tokens through the first FFN layer */
    uint64_t needed_bytes;     /* bytes of the bundles the predictors asked for (all in exact mode) */
    uint64_t dense_bytes;      /* bytes of the dense FFN (standard ffn_gate/up/down tensors) per token and layer */
    uint64_t collapse_extra_bytes; /* bytes read in gaps merged by access collapse */
    uint64_t needed_runs;      /* contiguous runs of needed bundles (before cache and collapse) */
    uint64_t needed_bundles;   /* bundles in those runs */
    uint64_t max_run_length;   /* longest run of needed bundles */
    double   predictor_seconds;
    uint64_t stream_reads;     /* layer fetches the cost model served by reading the whole layer */
    uint64_t prefetch_bytes;   /* bytes read ahead for the next layer (also in bytes_read/read_ops) */
    uint64_t prefetch_used_bytes; /* bytes of prefetched bundles the next layer needed */
    double   prefetch_seconds; /* wall time of the read-ahead, overlapped with compute (not in io_seconds) */
    double   io_exposed_seconds; /* wall time compute waited for reads (io_seconds minus what overlapped compute) */
} ripple_stats;

/* Versions of the ggml this library was compiled against (recorded at build time). */
const char * ripple_built_ggml_version(void);
const char * ripple_built_ggml_commit(void);

/* Register the RIPPLE device into the ggml instance already loaded in the process. Idempotent.
 * Returns 0, or -1 with a message in err. */
int ripple_register(char * err, size_t err_len);

/* Load hook: drop MAP_POPULATE / WILLNEED prefetch of ripple files inside libllama.
 * Returns 0 when installed, -1 with the reason in err when it cannot apply. */
int ripple_loadhook_install(char * err, size_t err_len);
int ripple_loadhook_active(void);

/* Before a host loads `path` with llama.cpp: the file identified and read (ggml's gguf API), checked
 * (metadata and tensor infos, file size, region header and footer, sampled bundles, checksum table
 * and header digests; with claim also the down scale tables and predictor blobs), and with claim
 * != 0 its FFN tensors claimed until ripple_model_end_load. Returns 0 when the file is not
 * ripple-packed (load it as is), a model handle > 0, or -1 with "<path>: <problem>" in err
 * (refuse the load). */
int ripple_load_begin(const char * path, int claim, char * err, size_t err_len);

typedef struct ripple_model_info {
    int32_t bound_tensors;    /* FFN weight tensors the backend took in the load */
    int32_t expected_tensors; /* FFN weight tensors of the file (gate+up+down over the layers) */
    int32_t default_mode;     /* RIPPLE_MODE_EXACT or RIPPLE_MODE_SPARSE: the file's own default */
    char    default_mode_reason[256];
} ripple_model_info;
/* Returns 0, -1 for an unknown handle. */
int ripple_model_get_info(int handle, ripple_model_info * out);

/* Defaults and bounds of the settings (README, Settings): beyond a bound a value is a typo. */
#define RIPPLE_DEFAULT_CACHE_MB 64
#define RIPPLE_MAX_CACHE_MB 1048576 /* 1 TiB */
#define RIPPLE_DEFAULT_IO_THREADS 8
#define RIPPLE_MAX_IO_THREADS 64

/* Settings from the RIPPLE_* environment variables (README, Settings), every one checked: 0, or -1
 * with "<VARIABLE> must be <rule>, got '<value>'" in err. Values: mode enum ripple_mode,
 * cache_policy enum ripple_cache_policy, io_engine enum ripple_io_engine, exact_down enum
 * ripple_exact_down, sparse_down enum ripple_sparse_down. */
typedef struct ripple_env_settings {
    int32_t mode;
    double  cache_mb;       /* -1 when RIPPLE_CACHE_FRACTION gives the budget */
    double  cache_fraction; /* 0 when not given */
    int32_t cache_policy;
    int32_t collapse;       /* 1: the cost model's threshold, 0: off */
    int32_t direct_io;
    int32_t io_threads;
    int32_t io_engine;
    int32_t prefetch;
    int32_t overlap;
    int32_t exact_down;
    int32_t sparse_down;
    int32_t no_load_hook;   /* RIPPLE_NO_LOAD_HOOK */
    int32_t verify_reads;   /* RIPPLE_VERIFY_READS (diagnostic) */
} ripple_env_settings;
int ripple_settings_from_env(ripple_env_settings * out, char * err, size_t err_len);
/* Put them into the backend (what a host without Python gets at registration). */
void ripple_settings_apply(const ripple_env_settings * s);

/* Close the load window of ripple_load_begin. `ok` = 0 when llama.cpp failed to load the model. */
void ripple_model_end_load(int handle, int ok);

/* Settings. The cache budget and policy (enum ripple_cache_policy) apply to every model's neuron
 * cache (existing caches are emptied and re-made). Returns 0, -1 for an unknown policy. */
int ripple_set_cache(int64_t cache_bytes, int policy);
int ripple_get_cache_policy(void);
int64_t ripple_get_cache_bytes(void);

/* Mode (enum ripple_mode). Sparse: layers without a predictor stay exact, the activity rule is
 * applied to h. Returns 0, -1 for an unknown mode. */
int ripple_set_mode(int mode);
int ripple_get_mode(void);
/* Access collapse: two runs of bundles to read whose gap is at most gap_bytes are read as one
 * request (0 = off). */
void ripple_set_collapse_bytes(int64_t gap_bytes);
int64_t ripple_get_collapse_bytes(void);

/* Cache budget as a fraction of each model's FFN bytes (bundles), instead of ripple_set_cache's
 * absolute bytes; 0 < fraction <= 1. Returns 0, -1 for a bad fraction or policy. */
int ripple_set_cache_fraction(double fraction, int policy);
double ripple_get_cache_fraction(void); /* 0 when the budget is absolute */

/* I/O engine: reader threads (= queue depth of a layer's batch of reads), O_DIRECT on or off
 * (aligned bounce buffers; a file system that refuses it falls back to buffered reads with a
 * warning), and the storage cost model: a batch of n requests of B bytes issued together takes
 * n / min(threads, parallelism) * latency_s + B / bandwidth. It decides, for batches of several
 * tokens, between reading the union of the needed bundles and streaming the whole layer. */
typedef struct ripple_cost_model {
    double latency_s;     /* fixed cost of one request at queue depth 1 */
    double bandwidth_bps; /* sequential bandwidth */
    double parallelism;   /* requests the device serves at once */
} ripple_cost_model;
/* The model of a device without a probe-storage profile (ripple_gguf.runtime.storage.DEFAULT), what the
 * backend starts with: a mainstream PCIe 3 NVMe SSD through its published figures (Samsung 970 EVO
 * Plus 1 TB: 3,500 MB/s sequential read, 4 KB random read 19,000 IOPS at QD1 and 600,000 IOPS at
 * QD32 x 4 workers). */
void ripple_storage_default_model(ripple_cost_model * out);
int ripple_set_io_threads(int n);
int ripple_get_io_threads(void);
/* Engine: enum ripple_io_engine (default auto). ripple_get_io_engine returns the engine in force
 * (threads when io_uring is wanted but refused, the reason in why). ripple_set_io_engine returns -1
 * for io_uring in a build without it. */
int ripple_set_io_engine(int engine);
int ripple_get_io_engine(char * why, size_t why_len);
void ripple_set_direct_io(int on);
int ripple_get_direct_io(void);
void ripple_set_cost_model(double latency_s, double bandwidth_bps, double parallelism);
/* Next-layer prefetch (sparse mode, one-token batches): after a layer's fetch, layer l+1's
 * predictor runs on layer l's FFN input and a background thread reads what it selects (minus
 * cached bundles) while layer l and the attention of l+1 compute; io_seconds then counts only the
 * time the next fetch waits. */
void ripple_set_prefetch(int on);
int ripple_get_prefetch(void);
/* Overlapped reads (default on): a layer's reads are issued in pieces and the gate/up rows of the
 * bundles already in memory, then of each piece as it lands, are computed while the rest are read. */
void ripple_set_overlap(int on);
int ripple_get_overlap(void);
/* Sparse mode's down projection (enum ripple_sparse_down): auto (default) on the standard ffn_down
 * rows when the file is read through the page cache (no direct_io), with the activations not
 * selected set to 0 (stock's dot products); bundles: always from the bundles' down columns (what
 * direct_io always does). */
void ripple_set_sparse_down_rows(int on);
int ripple_get_sparse_down_rows(void);

/* Activity trace: while on, every layer fetch appends one record of int32s
 * [model handle, layer index, tokens in the batch, n, n neuron ids needed]. ripple_trace_read copies
 * up to cap int32s (NULL: none) and returns the number stored; ripple_trace_start clears it and
 * keeps at most max_int32s (older records are kept, newer dropped when full). */
int ripple_trace_start(int64_t max_int32s);
void ripple_trace_stop(void);
int64_t ripple_trace_read(int32_t * out, int64_t cap);
int64_t ripple_trace_dropped(void);
/* Read log (on while a trace is on): per layer fetch, int64s [layer index, tokens in the batch,
 * n requests, n request lengths in bytes] in the order issued; what a storage cost model replays. */
int64_t ripple_iolog_read(int64_t * out, int64_t cap);

/* Standalone store (trace replay, benchmarks): the same reads, collapse, cache and counters as a
 * model loaded by llama.cpp, without llama.cpp. ripple_store_fetch reads the bundles of the given
 * neurons of a layer for a batch of n_tokens tokens. Returns a handle (> 0) or -1 with err. */
int ripple_store_open_file(const char * path, char * err, size_t err_len);
int ripple_store_fetch(int handle, int32_t layer, const int32_t * neurons, int64_t n, int64_t n_tokens);
void ripple_store_close(int handle);

/* Where exact mode takes the down projection from (enum ripple_exact_down). Returns 0, -1 for an
 * unknown source. */
int ripple_set_exact_down(int source);
int ripple_get_exact_down(void);

void ripple_get_stats(ripple_stats * out);
/* stats() as a JSON object (the struct's fields with needed_runs/needed_bundles as mean_run_length,
 * plus cache_hit_rate, and load_ffn_tensors_bound / load_ffn_tensors_expected: the FFN weight tensors
 * the backend took in the latest successful ripple load, and those the file has; load_read_bytes
 * and load_seconds: the bytes the process made the kernel read from storage during that load,
 * as /proc/self/io counts them, -1 when unknown, and its wall time): what RIPPLE_STATS_FILE
 * receives; returns the length it needs */
int ripple_stats_json(char * buf, size_t len);
void ripple_reset_stats(void);

/* CRC32C (Castagnoli; the SSE4.2 / ARMv8 instruction when the CPU has it). ripple_crc32c_blocks
 * writes the CRC of each `block` bytes of data to out (ceil(len / block) entries, the last block
 * possibly shorter). */
uint32_t ripple_crc32c(const void * data, size_t len);
void ripple_crc32c_blocks(const void * data, uint64_t len, uint64_t block, uint32_t * out);
/* Checking reads against the checksum table: on (1, default) or off (0: a diagnostic, to measure
 * what the checks cost; environment RIPPLE_VERIFY_READS=0). */
void ripple_set_verify_reads(int on);
int ripple_get_verify_reads(void);
/* Gate and up of a layer computed in one pass when the graph has them next to each other: on (1,
 * default) or off (0: each MUL_MAT alone, the path a graph the backend does not recognise takes;
 * a diagnostic for tests). */
void ripple_set_pair_matmuls(int on);
int ripple_get_pair_matmuls(void);

/* Sketch predictor scores (ripple_gguf/offline/sketch.py's reference, for tests): for n_tokens FFN inputs x
 * (n_tokens x n_embd floats) the score of every neuron (n_tokens x n_ff) and whether it is
 * selected. Returns 0, or -1 with err for a blob this build does not accept. */
int ripple_sketch_scores(const uint8_t * blob, size_t size, int32_t n_embd, int32_t n_ff, const float * x,
                         int64_t n_tokens, float * scores, uint8_t * selected, char * err, size_t err_len);

/* Diagnostic (measurement only, scripts/sparsity_sweep.py): sketch predictors keep a fixed fraction of
 * each token's neurons (the highest scores) instead of the calibrated threshold; 0 turns it off. */
void ripple_set_sketch_topk(double fraction);
double ripple_get_sketch_topk(void);

/* Message of the last failure inside graph compute or I/O ("" if none); cleared by reading. */
int ripple_take_last_error(char * buf, size_t buf_len);

/* ggml's own row conversions, for the converter: rows of n_per_row values. */
size_t ripple_row_size(int32_t type, int64_t n_per_row);
int64_t ripple_block_size(int32_t type);
int ripple_dequantize_rows(int32_t type, const void * src, float * dst, int64_t nrows, int64_t n_per_row);
size_t ripple_quantize_rows(int32_t type, const float * src, void * dst, int64_t nrows, int64_t n_per_row);

/* Split down columns (docs/FORMAT.md section 3, csrc/ripple_split.c). ripple_split_info: 1 when
 * `type` can be split, with the bits of each stored integer, the offset subtracted from it, the
 * values per scale-table entry (group) and whether the entries carry a minimum; 0 otherwise.
 * ripple_split_rows: rows of n_per_row values of such a type unpacked into the stored integers
 * q[nrows * n_per_row] (0 .. 2^bits - 1; Q8_0: the int8's byte; q may be NULL) and the f32 pairs
 * scale_min[nrows * n_per_row / group][2] = (scale, min) of each group, value = scale * (q - offset)
 * + min as ggml dequantizes it. Returns 0, or -1 for a type or length that cannot be split. */
int ripple_split_info(int32_t type, int32_t * bits, int32_t * offset, int32_t * group, int32_t * has_min);
int ripple_split_rows(int32_t type, const void * src, int64_t nrows, int64_t n_per_row, uint8_t * q, float * scale_min);

/* Neuron placement (ripple_gguf/offline/placement.py): the greedy Hamiltonian path over co-activation
 * counts co (n*n row-major; only the upper triangle i < j and the diagonal = frequency are read).
 * Writes the neuron id at each position to order[n]. 0 < n < 65536. Returns 0, or -1 on bad
 * arguments or when out of memory. */
int ripple_greedy_path(int32_t n, const uint32_t * co, int32_t * order);

/* Activation capture (offline stage): pass ripple_capture_eval as llama_context_params.cb_eval
 * and a ripple_capture as its user data. After each llama_decode, x[b] holds x_rows[b] rows of the
 * FFN input of block b (the ffn_up matmul's input, x_len[b] floats each) and h[b] h_rows[b] rows of
 * the post-activation vector (the ffn_down matmul's input, h_len[b] floats each); g[b], when
 * given, the gate pre-activation of a gated FFN (the ffn_gate matmul's output). */
typedef struct ripple_capture {
    int32_t   n_blocks;   /* entries in the arrays below */
    int32_t   max_tokens; /* rows each buffer holds */
    float **  x;          /* per block, NULL = not captured */
    float **  h;
    int64_t * x_len;
    int64_t * h_len;
    int32_t * x_rows;
    int32_t * h_rows;
    float **  g;          /* gate pre-activation (ffn_gate matmul output, h_len floats), may be NULL */
    int64_t * g_len;
    int32_t * g_rows;
    int32_t   errors;     /* nodes skipped: unexpected type or shape, or too many tokens */
} ripple_capture;
bool ripple_capture_eval(void * tensor, bool ask, void * user_data);

/* Oracle sparsity (measurement only): as cb_eval with a ripple_sparsify as user data, drops the
 * neurons of block b at or below thresholds[b] (< 0: block untouched) in a gated FFN: rule
 * RIPPLE_RULE_GATE zeroes gate pre-activations g with |act(g)| <= threshold right after the
 * ffn_gate matmul; RIPPLE_RULE_MAGNITUDE zeroes GLU outputs h with |h| <= threshold. */
typedef struct ripple_sparsify {
    int32_t       n_blocks;
    const float * thresholds;
    int32_t       rule;       /* RIPPLE_RULE_GATE or RIPPLE_RULE_MAGNITUDE */
    int32_t       activation; /* gate rule: enum ripple_glu_activation */
    int32_t       errors;
    int64_t       zeroed;     /* gate values zeroed so far */
    int64_t       total;      /* gate values seen so far */
} ripple_sparsify;
bool ripple_sparsify_eval(void * tensor, bool ask, void * user_data);

/* RIPPLE_CDEF_END */
#pragma GCC visibility pop
#ifdef __cplusplus
}
#endif
#endif
