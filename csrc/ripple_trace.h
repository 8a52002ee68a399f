/* The activity trace and the read log (ripple_trace.c; started and read through ripple.h). */
#pragma once

#include <stdint.h>

#include "ripple_io.h"

/* one record per layer fetch: the neurons it needed */
void ripple_trace_record(int handle, int layer, int64_t n_tokens, const int32_t * neurons, int64_t n);
/* append a layer fetch's requests to the read log */
void ripple_iolog_record(int layer, int64_t n_tokens, const ripple_io_req * reqs, int n);
