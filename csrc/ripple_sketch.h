/* Sketch predictors (ripple_sketch.c, docs/FORMAT.md 3c): a 2-bit copy of a layer's gate and up
 * rows plus outlier input channels in int8, scored per token. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "ggml.h"
#include "ripple_layer.h"

struct ripple_predictor;
struct ripple_pool;

/* a sketch as the kernel reads it (repacked from the blob at load, in one allocation `mem`): rows in
 * blocks of 16 (the last padded with zero rows) */
typedef struct ripple_sketch {
    uint8_t *           mem;
    int32_t             n_out, gated, act, n_pad, n_blk;
    float               var_g, var_u; /* V_g, V_u: the estimates' variance per unit D^2 |x_s|^2 (0: plain |h~|) */
    const int32_t *     out;        /* n_out outlier channels, ascending */
    const float *       osg, * osu; /* per outlier channel: int8 weight scale (gate, up) */
    const float *       hg, * hu;   /* per row: half the 2-bit quantization step */
    /* codes: per block and chunk of 16 channels 64 bytes, the 4 bytes of row r at 4r, channel
     * 16c + 4s + b in bits 2s of byte b (so each of 4 shifts gives 4 consecutive channels of every row) */
    const uint8_t *     cg, * cu;
    const int8_t *      og, * ou;   /* per block: n_out x 16 outlier weights (channel-major) */
} ripple_sketch;

/* load a blob into p (its kind set); 0, or -1 with err */
int  ripple_sketch_load(struct ripple_predictor * p, const uint8_t * blob, size_t size, int n_embd, int n_ff, char * err,
                        size_t err_len);
/* per token of src1 the selection (tok[t * n_ff + i]) and optionally the scores */
void ripple_sketch_predict(struct ripple_pool * pool, int n_threads, const struct ripple_predictor * p,
                           const ripple_layer * L, const struct ggml_tensor * src1, uint8_t * tok, float * scores);
