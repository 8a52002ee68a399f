/* The storage cost model in force (ripple_cost.c; set, and the default device, in ripple.h). */
#pragma once

#include <stdint.h>

/* time of a batch of n_requests read requests of `bytes` in all issued together, at the queue depth
 * of the io threads setting */
double ripple_cost_batch(int64_t n_requests, uint64_t bytes);
/* the access-collapse threshold the model gives at that queue depth (bytes, 0 = collapse off) */
int64_t ripple_cost_collapse_gap(void);
