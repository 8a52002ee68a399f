/* The FFN kernels (ripple_kernels.c): ggml's CPU backend found at run time, the thread pool, and the
 * row and down-projection kernels on bundles wherever they lie. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "ggml.h"
#include "ripple_layer.h"

/* ggml's CPU backend, found at run time (linked, global, or a module loaded by ggml): its type
 * traits (NULL when no CPU backend is loaded), and its initialisation (-1 when not found) */
struct ggml_type_traits_cpu;
const struct ggml_type_traits_cpu * ripple_cpu_traits(enum ggml_type type);
int ripple_cpu_init(void);

typedef struct ripple_pool ripple_pool;
ripple_pool * ripple_pool_new(void);
void          ripple_pool_free(ripple_pool * p);
typedef void (*ripple_task_fn)(void * arg, int ith, int nth);
void          ripple_pool_run(ripple_pool * p, int n_threads, ripple_task_fn fn, void * arg);
/* the tasks run on an OpenMP team (they may use `omp barrier`) */
int           ripple_pool_is_openmp(void);

/* Rows of one weight matrix wherever they lie: row i at ptrs[map[i]] + ptr_off (bundles wherever
 * each is: cache slot or read buffer), or at base + (map ? map[i] : i) * stride. */
typedef struct ripple_rows {
    enum ggml_type  type;
    int64_t         row_len;  /* values per row */
    int64_t         n_rows;
    const uint8_t * base;
    size_t          stride;
    const int32_t * map;
    const int32_t * list;     /* rows to compute (the others are set to 0); NULL = all */
    int64_t         n_list;
    const uint8_t * const * ptrs; /* NULL: base/stride */
    size_t          ptr_off;
    int             keep;     /* with a list: the rows not in it are left as they are (not set to 0) */
} ripple_rows;

/* dsts[m][i, t] = dot(row i of rows[m], src1[:, t]) with ggml's vec_dot (stock's arithmetic), for
 * n_mats (1 or 2) matrices of the same shape and list, computed in one pass over the rows */
int ripple_kernel_rows(ripple_pool * pool, int n_threads, const ripple_rows * rows, int n_mats,
                       const struct ggml_tensor * src1, struct ggml_tensor * const * dsts);
/* one token's FFN activations x (n_ff) with those not selected for it (token_mask, may be NULL) and,
 * with rule, those with |h| <= the layer's threshold set to 0 */
void ripple_mask_activations(const ripple_layer * L, const float * x, const uint8_t * token_mask, int rule, float * out);
/* dst = sum over neurons of h[neuron] * down column of the bundles (ptrs: per position), computed
 * as stock's dot products on its activations converted to the vec_dot type (split layouts: in the
 * integer form; others summed in f32 over `positions`, NULL = all). h values not selected for their
 * token (token_mask, n_tokens x n_ff, neuron order) and, with apply_rule and the magnitude rule,
 * those with |h| <= threshold are dropped before the conversion. */
int ripple_kernel_down(ripple_pool * pool, int n_threads, const ripple_layer * L, const uint8_t * const * ptrs,
                       const int32_t * positions, int64_t n_positions, int apply_rule,
                       const uint8_t * token_mask, const struct ggml_tensor * src1, struct ggml_tensor * dst);
