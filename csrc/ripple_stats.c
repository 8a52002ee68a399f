/* The counters as the control API reports them (ripple_get_stats, JSON), and without Python:
 * RIPPLE_STATS_FILE rewritten every few seconds while a model is loaded and when one is freed, with
 * a summary line through ggml's logger. */
#include "ripple.h"
#include "ripple_base.h"
#include "ripple_model.h"
#include "ripple_stats.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
    ripple_registry_cache_usage(&out->cache_bytes, &out->cache_capacity);
}

void ripple_reset_stats(void) {
    memset(&g_ripple_counters, 0, sizeof(g_ripple_counters));
}

/* ---- counters without Python ---- */

int ripple_stats_json(char * buf, size_t len) {
    ripple_stats st;
    ripple_get_stats(&st);
    const uint64_t lookups = st.cache_hits + st.cache_misses;
    const double hit_rate = lookups ? (double) st.cache_hits / (double) lookups : 0.0;
    const double mean_run = st.needed_runs ? (double) st.needed_bundles / (double) st.needed_runs : 0.0;
    int bound, expected;
    int64_t load_read;
    double load_s;
    ripple_registry_last_load(&bound, &expected, &load_read, &load_s);
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
                    st.prefetch_seconds, st.io_exposed_seconds, hit_rate, mean_run, (unsigned long long) bound,
                    (unsigned long long) expected, (long long) load_read, load_s);
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
            RIPPLE_LOG_WARN("ripple: warning: cannot write RIPPLE_STATS_FILE %s: %s\n", path, strerror(errno));
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
    RIPPLE_LOG_INFO("ripple: %s freed: %llu tokens, %.1f%% of FFN neurons computed, %.1f MiB read in %llu reads "
                    "(I/O %.2f s, %.2f s of it waited for), cache hit rate %.1f%%\n", model_path,
                    (unsigned long long) st.tokens,
                    st.neurons_total ? 100.0 * (double) st.neurons_computed / (double) st.neurons_total : 0.0,
                    (double) st.bytes_read / 1048576.0, (unsigned long long) st.read_ops, st.io_seconds,
                    st.io_exposed_seconds, lookups ? 100.0 * (double) st.cache_hits / (double) lookups : 0.0);
    stats_file_write();
}
