/* Sketch predictors (ripple_sketch.c, docs/FORMAT.md 3c): a 2-bit copy of a layer's gate and up
 * rows plus outlier input channels in int8, scored per token. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "ggml.h"
#include "ripple_layer.h"

struct ripple_predictor;
struct ripple_pool;

/* pointers into the sketch's blob, kept whole */
typedef struct ripple_sketch {
    uint8_t *           blob;
    int32_t             n_out, gated, act, n_pad;
    const int32_t *     out;      /* n_out outlier channels, ascending */
    const float *       osg, * osu; /* per outlier channel: int8 weight scale (gate, up) */
    const ggml_fp16_t * dg, * du; /* per row: 2-bit quantization step */
    const uint8_t *     cg, * cu; /* n_ff rows of n_pad / 4 code bytes */
    const int8_t *      og, * ou; /* n_ff rows of n_out outlier weights */
} ripple_sketch;

/* load a blob into p (its kind set); 0, or -1 with err */
int  ripple_sketch_load(struct ripple_predictor * p, const uint8_t * blob, size_t size, int n_embd, int n_ff, char * err,
                        size_t err_len);
/* per token of src1 the selection (tok[t * n_ff + i]) and optionally the scores */
void ripple_sketch_predict(struct ripple_pool * pool, int n_threads, const struct ripple_predictor * p,
                           const ripple_layer * L, const struct ggml_tensor * src1, uint8_t * tok, float * scores);
