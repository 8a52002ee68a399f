/* FFN kernels computed from bundles, with ggml's own type traits for every weight type,
 * and the small thread pool that runs them (the CPU backend's pool is idle meanwhile). */
#define _GNU_SOURCE
#include "ripple_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-cpu.h"

#ifdef RIPPLE_OPENMP
#include <omp.h>
#endif

/* ---- thread pool: workers 1..n-1, the caller is thread 0 ---- */

#define RIPPLE_MAX_THREADS 256

struct ripple_pool {
    pthread_mutex_t mu;
    pthread_cond_t  start, done;
    pthread_t       threads[RIPPLE_MAX_THREADS];
    int             n_workers; /* started so far */
    int             n_active;  /* workers taking part in the current job */
    uint64_t        generation;
    int             pending;
    int             quit;
    ripple_task_fn  fn;
    void *          arg;
    int             nth;
};

typedef struct { ripple_pool * p; int ith; } worker_arg;

static void * worker_main(void * v) {
    worker_arg a = *(worker_arg *) v;
    free(v);
    ripple_pool * p = a.p;
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->quit && p->generation == seen) {
            pthread_cond_wait(&p->start, &p->mu);
        }
        if (p->quit) {
            break;
        }
        seen = p->generation;
        if (a.ith >= p->n_active) {
            continue;
        }
        ripple_task_fn fn = p->fn;
        void * arg = p->arg;
        int nth = p->nth;
        pthread_mutex_unlock(&p->mu);
        fn(arg, a.ith, nth);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0) {
            pthread_cond_signal(&p->done);
        }
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

ripple_pool * ripple_pool_new(void) {
    ripple_pool * p = calloc(1, sizeof(*p));
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->start, NULL);
    pthread_cond_init(&p->done, NULL);
    p->n_workers = 1; /* index 0 is the caller */
    return p;
}

void ripple_pool_free(ripple_pool * p) {
    if (!p) {
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->quit = 1;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n_workers; i++) {
        pthread_join(p->threads[i], NULL);
    }
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->start);
    pthread_cond_destroy(&p->done);
    free(p);
}

void ripple_pool_run(ripple_pool * p, int n_threads, ripple_task_fn fn, void * arg) {
    if (n_threads < 1) n_threads = 1;
    if (n_threads > RIPPLE_MAX_THREADS) n_threads = RIPPLE_MAX_THREADS;
    if (n_threads == 1) {
        fn(arg, 0, 1);
        return;
    }
#ifdef RIPPLE_OPENMP
    /* the OpenMP team ggml's CPU backend uses (see CMakeLists.txt) */
    #pragma omp parallel num_threads(n_threads)
    {
        fn(arg, omp_get_thread_num(), omp_get_num_threads());
    }
    return;
#endif
    pthread_mutex_lock(&p->mu);
    while (p->n_workers < n_threads) {
        worker_arg * a = malloc(sizeof(*a));
        a->p = p;
        a->ith = p->n_workers;
        if (pthread_create(&p->threads[p->n_workers], NULL, worker_main, a) != 0) {
            free(a);
            break;
        }
        p->n_workers++;
    }
    if (n_threads > p->n_workers) {
        n_threads = p->n_workers;
    }
    p->fn = fn;
    p->arg = arg;
    p->nth = n_threads;
    p->n_active = n_threads;
    p->pending = n_threads - 1;
    p->generation++;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);

    fn(arg, 0, n_threads);

    pthread_mutex_lock(&p->mu);
    while (p->pending > 0) {
        pthread_cond_wait(&p->done, &p->mu);
    }
    pthread_mutex_unlock(&p->mu);
}

/* ---- rows kernel: dst[i, t] = dot(row i, x_t) with ggml's vec_dot, as stock's mul_mat does ----
 * Used for the gate/up rows of bundles and, in exact mode, for the rows of the standard down tensor. */

typedef struct {
    ripple_rows          rows;
    const uint8_t *      xq;        /* tokens converted to the vec_dot type */
    size_t               xq_stride;
    int64_t              n_tokens;
    struct ggml_tensor * dst;
    ggml_vec_dot_t       vec_dot;
} rows_job;

static void rows_task(void * v, int ith, int nth) {
    rows_job * j = v;
    const ripple_rows * r = &j->rows;
    const int64_t n = r->list ? r->n_list : r->n_rows;
    const int64_t per = (n + nth - 1) / nth;
    const int64_t k0 = per * ith;
    const int64_t k1 = k0 + per < n ? k0 + per : n;
    for (int64_t k = k0; k < k1; k++) {
        const int64_t i = r->list ? r->list[k] : k;
        const uint8_t * row = r->base + (size_t) (r->map ? r->map[i] : i) * r->stride;
        for (int64_t t = 0; t < j->n_tokens; t++) {
            float * out = (float *) ((char *) j->dst->data + i * j->dst->nb[0] + t * j->dst->nb[1]);
            j->vec_dot((int) r->row_len, out, 0, row, 0, j->xq + t * j->xq_stride, 0, 1);
        }
    }
}

int ripple_kernel_rows(ripple_pool * pool, int n_threads, const ripple_rows * rows,
                       const struct ggml_tensor * src1, struct ggml_tensor * dst) {
    const struct ggml_type_traits_cpu * tc = ggml_get_type_traits_cpu(rows->type);
    const enum ggml_type vt = tc->vec_dot_type;
    const int64_t n_tokens = src1->ne[1];
    const size_t xq_stride = ggml_row_size(vt, rows->row_len);
    uint8_t * xq = malloc(xq_stride * (size_t) n_tokens);
    if (!xq || !tc->vec_dot) {
        free(xq);
        ripple_set_error("no vec_dot for type %s", ggml_type_name(rows->type));
        return -1;
    }
    for (int64_t t = 0; t < n_tokens; t++) {
        const float * x = (const float *) ((const char *) src1->data + t * src1->nb[1]);
        if (vt == GGML_TYPE_F32) {
            memcpy(xq + t * xq_stride, x, sizeof(float) * (size_t) rows->row_len);
        } else {
            ggml_get_type_traits_cpu(vt)->from_float(x, xq + t * xq_stride, rows->row_len);
        }
    }
    if (rows->list) {
        for (int64_t t = 0; t < n_tokens; t++) {
            memset((char *) dst->data + t * dst->nb[1], 0, sizeof(float) * (size_t) rows->n_rows);
        }
    }
    rows_job j = {
        /* .rows      = */ *rows,
        /* .xq        = */ xq,
        /* .xq_stride = */ xq_stride,
        /* .n_tokens  = */ n_tokens,
        /* .dst       = */ dst,
        /* .vec_dot   = */ tc->vec_dot,
    };
    ripple_pool_run(pool, n_threads, rows_task, &j);
    free(xq);
    return 0;
}

static void f32_to_float(const void * x, float * y, int64_t n) {
    memcpy(y, x, sizeof(float) * (size_t) n);
}

/* ggml leaves F32's to_float empty (identity) */
static ggml_to_float_t to_float_of(enum ggml_type type) {
    return type == GGML_TYPE_F32 ? f32_to_float : ggml_get_type_traits(type)->to_float;
}

/* Stock llama.cpp multiplies the down projection with the activations converted to the weight's
 * vec_dot type (Q8_0/Q8_1/Q8_K/F16...). Rounding them the same way first makes the sum of
 * products below equal to stock's dot products up to the order of additions. */
static void dequant_vec_dot_type(enum ggml_type vt, const void * src, float * dst, int64_t n) {
    if (vt == GGML_TYPE_Q8_1) { /* { ggml_half d, s; int8_t qs[32]; } */
        const uint8_t * b = src;
        for (int64_t i = 0; i < n; i += 32, b += 36) {
            ggml_fp16_t d;
            memcpy(&d, b, sizeof(d));
            const float df = ggml_fp16_to_fp32(d);
            for (int k = 0; k < 32; k++) dst[i + k] = df * (float) (int8_t) b[4 + k];
        }
    } else if (vt == GGML_TYPE_Q8_K) { /* { float d; int8_t qs[256]; int16_t bsums[16]; } */
        const uint8_t * b = src;
        for (int64_t i = 0; i < n; i += 256, b += 4 + 256 + 32) {
            float d;
            memcpy(&d, b, sizeof(d));
            for (int k = 0; k < 256; k++) dst[i + k] = d * (float) (int8_t) b[4 + k];
        }
    } else {
        to_float_of(vt)(src, dst, n);
    }
}

/* token_mask (n_tokens x n, may be NULL): values not selected for their token are zeroed before the
 * rounding, because the rounding's block scales depend on every value of the block: a batch that
 * computed a neuron for another token must round this token's values as a lone token would. */
static int round_like_stock(enum ggml_type weight_type, const struct ggml_tensor * src1, const uint8_t * token_mask,
                            float * out) {
    const int64_t n = src1->ne[0];
    const enum ggml_type vt = ggml_get_type_traits_cpu(weight_type)->vec_dot_type;
    void * tmp = vt == GGML_TYPE_F32 ? NULL : malloc(ggml_row_size(vt, n));
    float * masked = token_mask ? malloc(sizeof(float) * (size_t) n) : NULL;
    if ((vt != GGML_TYPE_F32 && !tmp) || (token_mask && !masked)) {
        free(tmp);
        free(masked);
        return -1;
    }
    for (int64_t t = 0; t < src1->ne[1]; t++) {
        const float * h = (const float *) ((const char *) src1->data + t * src1->nb[1]);
        if (token_mask) {
            for (int64_t i = 0; i < n; i++) {
                masked[i] = token_mask[t * n + i] ? h[i] : 0.0f;
            }
            h = masked;
        }
        if (vt == GGML_TYPE_F32 || n % ggml_blck_size(vt) != 0) {
            memcpy(out + t * n, h, sizeof(float) * (size_t) n);
        } else {
            ggml_get_type_traits_cpu(vt)->from_float(h, tmp, n);
            dequant_vec_dot_type(vt, tmp, out + t * n, n);
        }
    }
    free(tmp);
    free(masked);
    return 0;
}

/* ---- down: out[:, t] = sum_i h[i, t] * column_i ----
 * Threads own slices of the output rows (n_embd), never neurons: every output value is the sum of
 * its terms in position order, whatever the thread count, the batch and the other tokens' selections,
 * so a token's result depends on its own activations only (batched and single-token evaluation, and a
 * prompt whose prefix came from the KV cache, give the same logits). */

/* Rows [r0, r1) of neuron i's column from a split down part: value r = d * (q_r - offset) + m with
 * (d, m) of row r in the scale-table entry of i's source block, the formulas of ggml's
 * dequantize_row_q4_0 etc. r0 and r1 are multiples of 8. */
static void split_to_float(const ripple_layer * L, const uint8_t * src, int64_t i, int64_t r0, int64_t r1, float * y) {
    const int64_t n = L->d.n_embd;
    const float * dm = L->down_tab + (size_t) (i / 32) * (size_t) n * 2;
    const float off = (float) L->down_qoff;
    if (L->down_bits == 8) {
        const int8_t * q = (const int8_t *) src;
        for (int64_t r = r0; r < r1; r++) {
            y[r - r0] = (float) q[r] * dm[2 * r];
        }
        return;
    }
    const uint8_t * hi = L->down_bits == 5 ? src + n / 2 : NULL;
    for (int64_t b = r0 / 2; b < r1 / 2; b++) {
        int q0 = src[b] & 0x0F, q1 = src[b] >> 4;
        if (hi) {
            const int64_t r = 2 * b;
            q0 |= ((hi[r >> 3] >> (r & 7)) & 1) << 4;
            q1 |= ((hi[(r + 1) >> 3] >> ((r + 1) & 7)) & 1) << 4;
        }
        y[2 * b - r0] = ((float) q0 - off) * dm[4 * b] + dm[4 * b + 1];
        y[2 * b + 1 - r0] = ((float) q1 - off) * dm[4 * b + 2] + dm[4 * b + 3];
    }
}

#define RIPPLE_DOWN_BLOCK 32 /* columns dequantized together, then applied to every token */

typedef struct {
    const ripple_layer *       L;
    const uint8_t *            ws;
    const int32_t *            positions; /* NULL = all */
    int64_t                    n_positions;
    const float *              h;    /* n_tokens x n_ff activations, rounded like stock */
    int64_t                    n_tokens;
    int64_t                    step; /* slice granularity in rows */
    ggml_to_float_t            to_float;
    float *                    cols; /* per thread: RIPPLE_DOWN_BLOCK x n_embd */
    struct ggml_tensor *       dst;
} down_job;

static void down_task(void * v, int ith, int nth) {
    down_job * j = v;
    const ripple_layer * L = j->L;
    const int64_t n_ff = L->d.n_ff, n_embd = L->d.n_embd, T = j->n_tokens;
    const int64_t n_steps = n_embd / j->step;
    const int64_t r0 = n_steps * ith / nth * j->step, r1 = n_steps * (ith + 1) / nth * j->step, w = r1 - r0;
    if (w == 0) {
        return;
    }
    const size_t bs = L->d.bundle_size;
    const size_t off = L->gate_row + L->up_row;
    /* a slice of a non-split column starts at its byte offset (whole blocks of the column type) */
    const size_t slice_off = L->down_tab ? 0 : ggml_row_size((enum ggml_type) L->d.down_type, r0);
    float * cols = j->cols + (size_t) ith * RIPPLE_DOWN_BLOCK * (size_t) n_embd;
    int64_t nrn[RIPPLE_DOWN_BLOCK];
    for (int64_t t = 0; t < T; t++) {
        memset((char *) j->dst->data + t * j->dst->nb[1] + r0 * sizeof(float), 0, sizeof(float) * (size_t) w);
    }
    const int64_t n = j->positions ? j->n_positions : n_ff;
    for (int64_t k0 = 0; k0 < n; k0 += RIPPLE_DOWN_BLOCK) {
        int nb = 0;
        for (int64_t k = k0; k < n && k < k0 + RIPPLE_DOWN_BLOCK; k++) {
            const int64_t p = j->positions ? j->positions[k] : k;
            const int64_t i = L->order[p];
            int used = 0;
            for (int64_t t = 0; t < T && !used; t++) {
                used = j->h[t * n_ff + i] != 0.0f;
            }
            if (!used) {
                continue;
            }
            const uint8_t * src = j->ws + (size_t) p * bs + off;
            float * y = cols + (size_t) nb * (size_t) w;
            if (L->down_tab) {
                split_to_float(L, src, i, r0, r1, y);
            } else {
                j->to_float(src + slice_off, y, w);
            }
            nrn[nb++] = i;
        }
        for (int64_t t = 0; t < T; t++) {
            float * a = (float *) ((char *) j->dst->data + t * j->dst->nb[1]) + r0;
            const float * ht = j->h + t * n_ff;
            for (int c = 0; c < nb; c++) {
                const float hv = ht[nrn[c]];
                if (hv == 0.0f) {
                    continue;
                }
                const float * y = cols + (size_t) c * (size_t) w;
                for (int64_t r = 0; r < w; r++) {
                    a[r] += hv * y[r];
                }
            }
        }
    }
}

int ripple_kernel_down(ripple_pool * pool, int n_threads, const ripple_layer * L, const uint8_t * ws,
                       const int32_t * positions, int64_t n_positions, int apply_rule,
                       const uint8_t * token_mask, const struct ggml_tensor * src1, struct ggml_tensor * dst) {
    ggml_to_float_t to_float = to_float_of((enum ggml_type) L->d.down_type);
    if (!to_float && !L->down_tab) {
        ripple_set_error("no to_float for type %s", ggml_type_name((enum ggml_type) L->d.down_type));
        return -1;
    }
    if (n_threads < 1) n_threads = 1;
    const int64_t n_tokens = src1->ne[1];
    float * h = malloc(sizeof(float) * (size_t) (n_tokens * L->d.n_ff));
    if (!h || round_like_stock((enum ggml_type) L->d.down_src_type, src1, token_mask, h) != 0) {
        free(h);
        ripple_set_error("out of memory for the down projection");
        return -1;
    }
    if (apply_rule && L->d.act_rule == 1) { /* magnitude: |h| <= threshold is not active */
        const float thr = L->d.act_threshold;
        for (int64_t e = 0; e < n_tokens * L->d.n_ff; e++) {
            if (fabsf(h[e]) <= thr) {
                h[e] = 0.0f;
            }
        }
    }
    /* slices of whole column blocks; a multiple of 32 rows keeps every value on the same vector path */
    const int64_t n_embd = L->d.n_embd;
    const int64_t blk = L->down_tab ? 8 : ggml_blck_size((enum ggml_type) L->d.down_type);
    const int64_t step = n_embd % 32 == 0 && 32 % blk == 0 ? 32 : (n_embd % blk == 0 ? blk : n_embd);
    float * cols = malloc(sizeof(float) * (size_t) n_threads * RIPPLE_DOWN_BLOCK * (size_t) n_embd);
    if (!cols) {
        free(h);
        ripple_set_error("out of memory for the down projection");
        return -1;
    }
    down_job j = { L, ws, positions, n_positions, h, n_tokens, step, to_float, cols, dst };
    ripple_pool_run(pool, n_threads, down_task, &j);
    free(cols);
    free(h);
    return 0;
}

/* ---- ggml's row conversions for the converter ---- */

size_t ripple_row_size(int32_t type, int64_t n_per_row) {
    if (type < 0 || type >= GGML_TYPE_COUNT || n_per_row % ggml_blck_size((enum ggml_type) type) != 0) {
        return 0;
    }
    return ggml_row_size((enum ggml_type) type, n_per_row);
}

int64_t ripple_block_size(int32_t type) {
    if (type < 0 || type >= GGML_TYPE_COUNT) {
        return 0;
    }
    return ggml_blck_size((enum ggml_type) type);
}

int ripple_dequantize_rows(int32_t type, const void * src, float * dst, int64_t nrows, int64_t n_per_row) {
    if (!ripple_row_size(type, n_per_row)) {
        return -1;
    }
    ggml_to_float_t to_float = to_float_of((enum ggml_type) type);
    if (!to_float) {
        return -1;
    }
    const size_t rs = ggml_row_size((enum ggml_type) type, n_per_row);
    for (int64_t r = 0; r < nrows; r++) {
        to_float((const char *) src + r * rs, dst + r * n_per_row, n_per_row);
    }
    return 0;
}

size_t ripple_quantize_rows(int32_t type, const float * src, void * dst, int64_t nrows, int64_t n_per_row) {
    if (!ripple_row_size(type, n_per_row) || ggml_quantize_requires_imatrix((enum ggml_type) type)) {
        return 0;
    }
    ggml_quantize_init((enum ggml_type) type);
    return ggml_quantize_chunk((enum ggml_type) type, src, dst, 0, nrows, n_per_row, NULL);
}
