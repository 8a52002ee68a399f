/* The activity trace and the read log: while a trace is on, every layer fetch appends the neurons
 * it needed and the requests it issued (what trace replay and a storage cost model use). */
#include "ripple.h"
#include "ripple_trace.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

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
