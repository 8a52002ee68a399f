/* The error slot, the counters and the clock (ripple_base.h): the leaf every other file uses. */
#include "ripple_base.h"

#include "ripple.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

ripple_counters g_ripple_counters;

static pthread_mutex_t g_error_mu = PTHREAD_MUTEX_INITIALIZER;
static char            g_error[1024];

void ripple_set_error(const char * fmt, ...) {
    char msg[sizeof(g_error)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&g_error_mu);
    memcpy(g_error, msg, sizeof(g_error));
    pthread_mutex_unlock(&g_error_mu);
    RIPPLE_LOG_ERROR("ripple: error: %s\n", msg);
}

int ripple_take_last_error(char * buf, size_t buf_len) {
    pthread_mutex_lock(&g_error_mu);
    int had = g_error[0] != 0;
    if (buf_len) {
        snprintf(buf, buf_len, "%s", g_error);
    }
    g_error[0] = 0;
    pthread_mutex_unlock(&g_error_mu);
    return had;
}

uint64_t ripple_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t) ts.tv_sec * 1000000000ull + (uint64_t) ts.tv_nsec;
}

/* what the process made the kernel read from storage (page faults, read calls and O_DIRECT alike;
 * not what came from the page cache) */
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
