/* The storage cost model (ripple_gguf/runtime/storage.py's CostModel): a batch of n requests of B bytes in
 * all issued together takes n / min(queue depth, parallelism) * latency + B / bandwidth. It decides
 * between reading the union of a batch's needed bundles and streaming the whole layer, and gives
 * the access-collapse threshold. */
#include "ripple.h"
#include "ripple_cost.h"

#include <pthread.h>

/* The default device from its published figures, derived as storage._from_figures does: the time
 * of a 4 KiB request at QD1 and at the deep queue, minus its transfer time, give the latency and,
 * by their ratio, the parallelism. */
#define DEFAULT_SEQ_BPS 3.5e9       /* sequential read */
#define DEFAULT_IOPS_4K 600000.0    /* 4 KB random read at QD32 x 4 workers */
#define DEFAULT_IOPS_4K_QD1 19000.0 /* 4 KB random read at QD1 */
#define DEFAULT_LATENCY (1.0 / DEFAULT_IOPS_4K_QD1 - 4096.0 / DEFAULT_SEQ_BPS)
#define DEFAULT_PARALLELISM (DEFAULT_LATENCY / (1.0 / DEFAULT_IOPS_4K - 4096.0 / DEFAULT_SEQ_BPS))
#define MIN_COLLAPSE_GAP 4096 /* a break-even gap below one page: the device is bandwidth-bound */

static pthread_mutex_t   g_cost_mu = PTHREAD_MUTEX_INITIALIZER;
static ripple_cost_model g_cost = { DEFAULT_LATENCY, DEFAULT_SEQ_BPS, DEFAULT_PARALLELISM };

void ripple_storage_default_model(ripple_cost_model * out) {
    *out = (ripple_cost_model){ DEFAULT_LATENCY, DEFAULT_SEQ_BPS, DEFAULT_PARALLELISM };
}

void ripple_set_cost_model(double latency_s, double bandwidth_bps, double parallelism) {
    pthread_mutex_lock(&g_cost_mu);
    if (latency_s >= 0.0 && bandwidth_bps > 0.0 && parallelism >= 1.0) {
        g_cost = (ripple_cost_model){ latency_s, bandwidth_bps, parallelism };
    }
    pthread_mutex_unlock(&g_cost_mu);
}

static ripple_cost_model cost_now(void) {
    pthread_mutex_lock(&g_cost_mu);
    const ripple_cost_model c = g_cost;
    pthread_mutex_unlock(&g_cost_mu);
    return c;
}

double ripple_cost_batch(int64_t n_requests, uint64_t bytes) {
    const ripple_cost_model c = cost_now();
    double qd = (double) ripple_get_io_threads();
    double depth = qd < c.parallelism ? qd : c.parallelism;
    return (double) n_requests / (depth > 1.0 ? depth : 1.0) * c.latency_s + (double) bytes / c.bandwidth_bps;
}

/* storage.CostModel.collapse_gap_bytes: bandwidth * latency / min(queue depth, parallelism), 0 when
 * that is under a page */
int64_t ripple_cost_collapse_gap(void) {
    const ripple_cost_model c = cost_now();
    const double q = ripple_get_io_threads() < c.parallelism ? ripple_get_io_threads() : c.parallelism;
    const double gap = c.bandwidth_bps * c.latency_s / q;
    return gap < MIN_COLLAPSE_GAP ? 0 : (int64_t) gap;
}
