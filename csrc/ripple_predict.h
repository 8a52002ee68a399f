/* A layer's predictor (ripple_predict.c): which bundles a token needs. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "ggml.h"
#include "ripple_layer.h"
#include "ripple_sketch.h"

enum { RIPPLE_PREDICTOR_LOWRANK = 0, RIPPLE_PREDICTOR_SKETCH = 1 };

/* Low rank, in f32 (from the blob, weights f16 there):
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

/* a predictor blob (RPRD: ripple_gguf/offline/predictor.py, docs/FORMAT.md 3b; RPSK: a sketch) checked and
 * copied; NULL with err */
ripple_predictor * ripple_predictor_load(const uint8_t * blob, size_t size, int n_embd, int n_ff,
                                         char * err, size_t err_len);
void ripple_predictor_free(ripple_predictor * p);
/* tok[t * n_ff + neuron] = 1 for the neurons the predictor selects for token t of src1, need[neuron]
 * the union over tokens; returns the (token, neuron) pairs selected. pool NULL: this thread alone. */
int64_t ripple_predict(struct ripple_pool * pool, int n_threads, const ripple_predictor * p, const ripple_layer * L,
                       const struct ggml_tensor * src1, uint8_t * need, uint8_t * tok);
