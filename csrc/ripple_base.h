/* What every file of the library needs: the error slot of the control API, logging through ggml's
 * logger, the process-wide counters and the clock. ripple_base.c calls nothing else of the library
 * (tests/test_c_layers.py checks that no file calls back into a file that calls it). */
#pragma once

#include <stdint.h>

#include "ggml.h"

/* The message of a failure inside graph compute or I/O, for ripple_take_last_error; also logged. */
void ripple_set_error(const char * fmt, ...) __attribute__((format(printf, 1, 2)));

/* ggml's logger, exported by libggml-base (declared in ggml's internal ggml-impl.h, which the build
 * does not fetch): what llama.cpp's hosts print and redirect (llama-cpp-python's log callback, the
 * log of llama-server). The same levels as ggml's GGML_LOG_* macros. */
void ggml_log_internal(enum ggml_log_level level, const char * format, ...) __attribute__((format(printf, 2, 3)));
#define RIPPLE_LOG_INFO(...)  ggml_log_internal(GGML_LOG_LEVEL_INFO, __VA_ARGS__)
#define RIPPLE_LOG_WARN(...)  ggml_log_internal(GGML_LOG_LEVEL_WARN, __VA_ARGS__)
#define RIPPLE_LOG_ERROR(...) ggml_log_internal(GGML_LOG_LEVEL_ERROR, __VA_ARGS__)

/* The counters ripple_get_stats reports, added to from any thread. */
typedef struct ripple_counters {
    uint64_t ffn_matmuls, neurons_computed, neurons_total, read_ops, bytes_read;
    uint64_t cache_hits, cache_misses, fallback_reads;
    uint64_t io_ns, compute_ns, predictor_ns;
    uint64_t tokens, needed_bytes, dense_bytes, collapse_extra_bytes, needed_runs, needed_bundles, max_run_length;
    uint64_t stream_reads, prefetch_bytes, prefetch_used_bytes, prefetch_ns;
    uint64_t io_exposed_ns;
} ripple_counters;
extern ripple_counters g_ripple_counters;
#define RIPPLE_COUNT(field, v) __atomic_fetch_add(&g_ripple_counters.field, (uint64_t) (v), __ATOMIC_RELAXED)

uint64_t ripple_now_ns(void);     /* CLOCK_MONOTONIC */
int64_t ripple_proc_read_bytes(void); /* read_bytes of /proc/self/io, -1 when unavailable */
