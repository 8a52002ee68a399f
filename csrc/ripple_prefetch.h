/* Next-layer prefetch (ripple_prefetch.c): while layer l computes (and the attention of l+1 after
 * it), a thread reads the bundles layer l+1's predictor selects from layer l's FFN input, minus
 * those cached. */
#pragma once

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "ripple_io.h"
#include "ripple_kernels.h"
#include "ripple_model.h"

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
void ripple_prefetch_start(ripple_prefetch * pf, ripple_pool * pool, int n_threads, ripple_model * m, int layer,
                           const struct ggml_tensor * src1);
/* Wait for the batch; the prefetched data when it is for (m, layer), else NULL (and dropped). */
const ripple_prefetch * ripple_prefetch_take(ripple_prefetch * pf, ripple_model * m, int layer);
