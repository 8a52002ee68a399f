/* FFN kernels computed from bundles, with ggml's own type traits for every weight type,
 * and the small thread pool that runs them (the CPU backend's pool is idle meanwhile). */
#define _GNU_SOURCE
#include "ripple.h"
#include "ripple_base.h"
#include "ripple_kernels.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-cpu.h"

#include <dlfcn.h>
#include <link.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#ifdef RIPPLE_OPENMP
#include <omp.h>
#endif

/* ---- ggml's CPU backend, found at run time ----
 * Its type traits (vec_dot, from_float) are what the kernels compute with. In a process where
 * ggml's libraries are linked or promoted to the global scope (llama-cpp-python, after
 * ripple_gguf/_native.py) they are found by name; where ggml loads its CPU backend as a module
 * (builds with GGML_BACKEND_DL, llama.cpp's releases and llama-server) that module is in a local
 * scope, so it is looked up among the loaded libraries. Nothing links to ggml-cpu at build time. */

static int find_cpu_module(struct dl_phdr_info * info, size_t size, void * data) {
    (void) size;
    const char * name = info->dlpi_name;
    const char * base = name ? strrchr(name, '/') : NULL;
    if (base && strncmp(base + 1, "libggml-cpu", 11) == 0) {
        snprintf((char *) data, 4096, "%s", name);
        return 1;
    }
    return 0;
}

static void * cpu_symbol(const char * sym) {
    void * p = dlsym(RTLD_DEFAULT, sym);
    if (p) {
        return p;
    }
    char path[4096] = "";
    dl_iterate_phdr(find_cpu_module, path);
    void * h = path[0] ? dlopen(path, RTLD_NOW | RTLD_NOLOAD) : NULL;
    if (h) {
        p = dlsym(h, sym);
        dlclose(h); /* NOLOAD took a reference; ggml keeps the module loaded */
    }
    return p;
}

typedef const struct ggml_type_traits_cpu * (*ripple_traits_fn)(enum ggml_type);
static ripple_traits_fn g_cpu_traits;

const struct ggml_type_traits_cpu * ripple_cpu_traits(enum ggml_type type) {
    ripple_traits_fn f = __atomic_load_n(&g_cpu_traits, __ATOMIC_ACQUIRE);
    if (!f) {
        f = (ripple_traits_fn) cpu_symbol("ggml_get_type_traits_cpu");
        __atomic_store_n(&g_cpu_traits, f, __ATOMIC_RELEASE);
    }
    return f ? f(type) : NULL;
}

int ripple_cpu_init(void) {
    void (*init)(void) = (void (*)(void)) cpu_symbol("ggml_cpu_init");
    if (!init) {
        return -1;
    }
    init();
    return ripple_cpu_traits(GGML_TYPE_F32) ? 0 : -1;
}

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

int ripple_pool_is_openmp(void) {
#ifdef RIPPLE_OPENMP
    return 1;
#else
    return 0;
#endif
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
 * Used for the gate/up rows of bundles (both matrices of a layer in one pass over the neurons) and,
 * in exact mode for k-quant sources, for the rows of the standard down tensor. */

typedef struct {
    ripple_rows          rows[2];
    int                  n_mats;
    const uint8_t *      xq[2];     /* tokens converted to each matrix's vec_dot type */
    size_t               xq_stride[2];
    int64_t              n_tokens;
    struct ggml_tensor * dst[2];
    ggml_vec_dot_t       vec_dot[2];
} rows_job;

#define RIPPLE_ROWS_AHEAD 4 /* bundles ahead whose gate/up rows are prefetched */

static const uint8_t * row_at(const ripple_rows * r, int64_t i) {
    const int64_t at = r->map ? r->map[i] : i;
    return r->ptrs ? r->ptrs[at] + r->ptr_off : r->base + (size_t) at * r->stride;
}

static void rows_task(void * v, int ith, int nth) {
    rows_job * j = v;
    const ripple_rows * r0 = &j->rows[0];
    const int64_t n = r0->list ? r0->n_list : r0->n_rows;
    const int64_t per = (n + nth - 1) / nth;
    const int64_t k0 = per * ith;
    const int64_t k1 = k0 + per < n ? k0 + per : n;
    const size_t row_bytes = ggml_row_size(r0->type, r0->row_len);
    for (int64_t k = k0; k < k1; k++) {
        const int64_t i = r0->list ? r0->list[k] : k;
        if (r0->ptrs && k + RIPPLE_ROWS_AHEAD < k1) { /* bundles lie apart: prefetch a later one's rows */
            const int64_t ia = r0->list ? r0->list[k + RIPPLE_ROWS_AHEAD] : k + RIPPLE_ROWS_AHEAD;
            for (int m = 0; m < j->n_mats; m++) {
                const uint8_t * at = row_at(&j->rows[m], ia);
                for (size_t c = 0; c < row_bytes; c += 64) {
                    __builtin_prefetch(at + c);
                }
            }
        }
        for (int m = 0; m < j->n_mats; m++) {
            const uint8_t * row = row_at(&j->rows[m], i);
            const struct ggml_tensor * dst = j->dst[m];
            for (int64_t t = 0; t < j->n_tokens; t++) {
                float * out = (float *) ((char *) dst->data + i * dst->nb[0] + t * dst->nb[1]);
                j->vec_dot[m]((int) r0->row_len, out, 0, row, 0, j->xq[m] + t * j->xq_stride[m], 0, 1);
            }
        }
    }
}

int ripple_kernel_rows(ripple_pool * pool, int n_threads, const ripple_rows * rows, int n_mats,
                       const struct ggml_tensor * src1, struct ggml_tensor * const * dsts) {
    const int64_t n_tokens = src1->ne[1];
    rows_job j = { 0 };
    j.n_mats = n_mats;
    j.n_tokens = n_tokens;
    uint8_t * owned[2] = { NULL, NULL };
    for (int m = 0; m < n_mats; m++) {
        const struct ggml_type_traits_cpu * tc = ripple_cpu_traits(rows[m].type);
        if (!tc) {
            free(owned[0]);
            ripple_set_error("ggml's CPU backend is not loaded in this process");
            return -1;
        }
        const enum ggml_type vt = tc->vec_dot_type;
        j.rows[m] = rows[m];
        j.dst[m] = dsts[m];
        j.vec_dot[m] = tc->vec_dot;
        j.xq_stride[m] = ggml_row_size(vt, rows[m].row_len);
        if (m == 1 && ripple_cpu_traits(rows[0].type)->vec_dot_type == vt) {
            j.xq[1] = j.xq[0]; /* the same conversion of the same input */
            continue;
        }
        owned[m] = malloc(j.xq_stride[m] * (size_t) n_tokens);
        if (!owned[m] || !tc->vec_dot) {
            free(owned[0]);
            free(owned[1]);
            ripple_set_error("no vec_dot for type %s", ggml_type_name(rows[m].type));
            return -1;
        }
        for (int64_t t = 0; t < n_tokens; t++) {
            const float * x = (const float *) ((const char *) src1->data + t * src1->nb[1]);
            if (vt == GGML_TYPE_F32) {
                memcpy(owned[m] + t * j.xq_stride[m], x, sizeof(float) * (size_t) rows[m].row_len);
            } else {
                ripple_cpu_traits(vt)->from_float(x, owned[m] + t * j.xq_stride[m], rows[m].row_len);
            }
        }
        j.xq[m] = owned[m];
        if (rows[m].list && !rows[m].keep) {
            for (int64_t t = 0; t < n_tokens; t++) {
                memset((char *) dsts[m]->data + t * dsts[m]->nb[1], 0, sizeof(float) * (size_t) rows[m].n_rows);
            }
        }
    }
    if (n_mats == 2 && rows[1].list && !rows[1].keep && j.xq[1] == j.xq[0]) {
        for (int64_t t = 0; t < n_tokens; t++) {
            memset((char *) dsts[1]->data + t * dsts[1]->nb[1], 0, sizeof(float) * (size_t) rows[1].n_rows);
        }
    }
    ripple_pool_run(pool, n_threads, rows_task, &j);
    free(owned[0]);
    free(owned[1]);
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

/* ---- down: out[:, t] = sum_i h[i, t] * column_i ----
 * Threads own slices of the output rows (n_embd), never neurons: every output value is the sum of
 * its terms in a fixed order (source groups in order; within a group an exact integer sum),
 * whatever the thread count, the batch and the other tokens' selections, so a token's result depends on its own activations only (batched and
 * single-token evaluation, and a prompt whose prefix came from the KV cache, give the same logits).
 *
 * The activations go through what stock does to them first: converted to the vec_dot type of the
 * source's ffn_down (Q8_0/Q8_1 for the legacy quants, Q8_K for the k-quants, F16...). Split layouts
 * (the bundle holds the source's own quantized down values, the (scale, min) of each group of 32 or
 * 16 neurons in the layer table) are then multiplied in stock's integer form: per output row r and
 * group g of neurons,
 *     out[r] += scale[g,r] * d_x * sum_j (q_w[j,r] - offset) * q_x[j]  (+ min[g,r] * d_x * sum_j q_x[j])
 * with d_x the scale of the activation block holding the group (32 values for Q8_0/Q8_1, 256 for
 * Q8_K) and the activation sum Q8_1's rounded `s` or Q8_K's integer block sums, as stock's vec_dot
 * uses them: stock's dot product up to the order of the float operations (stock multiplies a
 * k-quant's super-block scale once per super-block, here its product with each sub-block scale per
 * group). Other layouts (float columns, or re-quantized columns) are dequantized and summed in f32. */

typedef struct {
    const ripple_layer *       L;
    const uint8_t * const *    ptrs;      /* per position: the bundle */
    const int32_t *            positions; /* float path: positions to sum (NULL = all) */
    int64_t                    n_positions;
    int64_t                    n_tokens;
    int64_t                    step;      /* slice granularity in rows */
    /* integer path: the activations in the vec_dot type, one row per token, and the neurons with a
     * non-zero value for some token, ascending, grouped by the layer's groups */
    const uint8_t *            xq;
    size_t                     xq_stride;
    size_t                     xq_block;  /* bytes per block: 34 (Q8_0), 36 (Q8_1), 292 (Q8_K) */
    int64_t                    xq_vals;   /* values per block: 32, or 256 for Q8_K */
    enum ggml_type             xq_type;
    const int32_t *            nlist;     /* neurons */
    const int32_t *            grp_start; /* n_ff / group + 1: group g's neurons are nlist[grp_start[g] .. grp_start[g + 1]) */
    /* float path: the activations rounded like stock, n_tokens x n_ff */
    const float *              h;
    ggml_to_float_t            to_float;
    uint8_t *                  work;      /* per thread: work_per_thread bytes */
    size_t                     work_per_thread;
    struct ggml_tensor *       dst;
} down_job;

static void slice_of(const down_job * j, int ith, int nth, int64_t * r0, int64_t * r1) {
    const int64_t n_steps = j->L->d.n_embd / j->step;
    *r0 = n_steps * ith / nth * j->step;
    *r1 = n_steps * (ith + 1) / nth * j->step;
}

/* The planes of a split column of `bits` < 8 (docs/FORMAT.md section 3): a nibble plane (bits
 * 0-3) when bits >= 4, then a 2-bit plane and a 1-bit plane holding the next bits, as present in
 * the remaining count; each plane packs value r at bit width*(r % (8/width)) of byte r/(8/width).
 * Returns the number of planes; width[p] and at[p] (byte offset in the column) of each. */
static int split_planes(int bits, int64_t n_embd, int width[3], int64_t at[3]) {
    int n = 0, rest = bits;
    int64_t pos = 0;
    for (int w = 4; w >= 1; w /= 2) {
        if (rest >= w && (w == 4 || (rest & w))) {
            width[n] = w;
            at[n++] = pos;
            pos += n_embd * w / 8;
            rest -= w;
        }
    }
    return n;
}

/* rows [r0, r1) of a split column as 16-bit integers q - offset (r0, r1 multiples of 8) */
static void split_unpack(const ripple_layer * L, const uint8_t * src, int64_t r0, int64_t r1, int16_t * y) {
    const int off = L->down_qoff;
    const int64_t n = r1 - r0;
    if (L->down_bits == 8) {
        const int8_t * q = (const int8_t *) src + r0;
        for (int64_t r = 0; r < n; r++) {
            y[r] = q[r];
        }
        return;
    }
    int width[3];
    int64_t at[3];
    const int n_planes = split_planes(L->down_bits, L->d.n_embd, width, at);
    /* the first plane subtracts the offset when it is the only one */
    const int off0 = n_planes == 1 ? off : 0;
    int shift = 0;
    for (int p = 0; p < n_planes; p++) {
        const uint8_t * s = src + at[p] + r0 * width[p] / 8;
        const int64_t nb = n * width[p] / 8;
        int64_t b = 0;
        if (width[p] == 4) { /* always the first plane */
#ifdef __AVX2__
            /* 16 bytes -> 32 values: low and high nibbles interleaved back into row order */
            const __m128i m4 = _mm_set1_epi8(0x0F);
            const __m256i o16 = _mm256_set1_epi16((short) off0);
            for (; b + 16 <= nb; b += 16) {
                const __m128i x = _mm_loadu_si128((const __m128i *) (s + b));
                const __m128i lo = _mm_and_si128(x, m4), hi = _mm_and_si128(_mm_srli_epi16(x, 4), m4);
                _mm256_storeu_si256((__m256i *) (y + 2 * b), _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(lo, hi)), o16));
                _mm256_storeu_si256((__m256i *) (y + 2 * b + 16), _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_unpackhi_epi8(lo, hi)), o16));
            }
#endif
            for (; b < nb; b++) {
                y[2 * b] = (int16_t) ((s[b] & 0x0F) - off0);
                y[2 * b + 1] = (int16_t) ((s[b] >> 4) - off0);
            }
        } else {
            if (p == 0) { /* Q2_K, Q3_K: the 2-bit plane comes first */
                for (int64_t r = 0; r < n; r++) {
                    y[r] = (int16_t) -off0;
                }
            }
            if (width[p] == 2) {
                for (; b < nb; b++) {
                    for (int k = 0; k < 4; k++) {
                        y[4 * b + k] = (int16_t) (y[4 * b + k] + (((s[b] >> (2 * k)) & 3) << shift));
                    }
                }
            } else {
                for (; b < nb; b++) {
                    for (int k = 0; k < 8; k++) {
                        y[8 * b + k] = (int16_t) (y[8 * b + k] + (((s[b] >> k) & 1) << shift));
                    }
                }
            }
        }
        shift += width[p];
    }
    if (n_planes > 1) {
        for (int64_t r = 0; r < n; r++) {
            y[r] = (int16_t) (y[r] - off);
        }
    }
}

/* S[r] = sum_k col[k][r] * q[k] over the m columns (stride w) of one source block: exact integer
 * sums, the products summed in 16-bit lanes and moved to 32-bit ones every `limit` non-zero terms
 * (the caller's bound that keeps the 16-bit sums in range). */
static void block_sum(const int16_t * col, int64_t w, const int16_t * q, int m, int limit, int32_t * S) {
    int64_t c = 0;
#ifdef __AVX512BW__
#define RIPPLE_WIDEN(a, lo, hi) do { \
        lo = _mm512_add_epi32(lo, _mm512_cvtepi16_epi32(_mm512_castsi512_si256(a))); \
        hi = _mm512_add_epi32(hi, _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(a, 1))); \
        a = _mm512_setzero_si512(); } while (0)
    for (; c + 128 <= w; c += 128) { /* 128 rows: 4 registers of 16-bit sums, 8 of 32-bit ones */
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        __m512i s0 = a0, s1 = a0, s2 = a0, s3 = a0, s4 = a0, s5 = a0, s6 = a0, s7 = a0;
        int cnt = 0;
        for (int k = 0; k < m; k++) {
            if (!q[k]) {
                continue;
            }
            const __m512i qv = _mm512_set1_epi16(q[k]);
            const int16_t * ck = col + (size_t) k * (size_t) w + c;
            a0 = _mm512_add_epi16(a0, _mm512_mullo_epi16(_mm512_loadu_si512(ck), qv));
            a1 = _mm512_add_epi16(a1, _mm512_mullo_epi16(_mm512_loadu_si512(ck + 32), qv));
            a2 = _mm512_add_epi16(a2, _mm512_mullo_epi16(_mm512_loadu_si512(ck + 64), qv));
            a3 = _mm512_add_epi16(a3, _mm512_mullo_epi16(_mm512_loadu_si512(ck + 96), qv));
            if (++cnt == limit) {
                RIPPLE_WIDEN(a0, s0, s1); RIPPLE_WIDEN(a1, s2, s3); RIPPLE_WIDEN(a2, s4, s5); RIPPLE_WIDEN(a3, s6, s7);
                cnt = 0;
            }
        }
        RIPPLE_WIDEN(a0, s0, s1); RIPPLE_WIDEN(a1, s2, s3); RIPPLE_WIDEN(a2, s4, s5); RIPPLE_WIDEN(a3, s6, s7);
        _mm512_storeu_si512(S + c, s0);      _mm512_storeu_si512(S + c + 16, s1);
        _mm512_storeu_si512(S + c + 32, s2); _mm512_storeu_si512(S + c + 48, s3);
        _mm512_storeu_si512(S + c + 64, s4); _mm512_storeu_si512(S + c + 80, s5);
        _mm512_storeu_si512(S + c + 96, s6); _mm512_storeu_si512(S + c + 112, s7);
    }
    for (; c + 32 <= w; c += 32) {
        __m512i a0 = _mm512_setzero_si512(), s0 = a0, s1 = a0;
        int cnt = 0;
        for (int k = 0; k < m; k++) {
            if (!q[k]) {
                continue;
            }
            a0 = _mm512_add_epi16(a0, _mm512_mullo_epi16(_mm512_loadu_si512(col + (size_t) k * (size_t) w + c),
                                                         _mm512_set1_epi16(q[k])));
            if (++cnt == limit) {
                RIPPLE_WIDEN(a0, s0, s1);
                cnt = 0;
            }
        }
        RIPPLE_WIDEN(a0, s0, s1);
        _mm512_storeu_si512(S + c, s0);
        _mm512_storeu_si512(S + c + 16, s1);
    }
#undef RIPPLE_WIDEN
#endif
    for (; c < w; c++) {
        int32_t sum = 0;
        for (int k = 0; k < m; k++) {
            sum += (int32_t) col[(size_t) k * (size_t) w + c] * q[k];
        }
        S[c] = sum;
    }
}

/* out[r] += S[r] * (d[r] * dx) + m[r] * sx: a group's integer sums scaled as stock scales them (m
 * NULL: no minimums); d and m are f16 (f16 != 0) or f32 table rows; one rounding sequence on every
 * path (the multiply-add fused) */
static void block_scale_add(float * out, const int32_t * S, const void * d, const void * m, int f16, float dx,
                            float sx, int64_t w) {
    int64_t r = 0;
#if defined(__AVX512F__)
    const __m512 vdx = _mm512_set1_ps(dx), vsx = _mm512_set1_ps(sx);
#define RIPPLE_TAB16(p) (f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) ((const ggml_fp16_t *) (p) + r))) \
                             : _mm512_loadu_ps((const float *) (p) + r))
    for (; r + 16 <= w; r += 16) {
        const __m512 sc = _mm512_mul_ps(RIPPLE_TAB16(d), vdx);
        const __m512 mn = m ? _mm512_mul_ps(RIPPLE_TAB16(m), vsx) : _mm512_setzero_ps();
        const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(S + r)), sc, mn);
        _mm512_storeu_ps(out + r, _mm512_add_ps(_mm512_loadu_ps(out + r), t));
    }
#undef RIPPLE_TAB16
#endif
    for (; r < w; r++) {
        const float dv = f16 ? ggml_fp16_to_fp32(((const ggml_fp16_t *) d)[r]) : ((const float *) d)[r];
        const float mv = !m ? 0.0f : f16 ? ggml_fp16_to_fp32(((const ggml_fp16_t *) m)[r]) : ((const float *) m)[r];
        out[r] += fmaf((float) S[r], dv * dx, mv * sx);
    }
}

/* The activation block of the integer path holding neuron i: its int8 values, its scale d_x and,
 * for a group of `group` neurons from `i`, the sum of the group's values times d_x (Q8_1: its f16
 * `s`, the whole 32-block's; Q8_K: from the 16-value integer sums) */
static const int8_t * xq_block_of(const down_job * j, int64_t t, int64_t i, int group, float * dx, float * sx) {
    const uint8_t * xb = j->xq + (size_t) t * j->xq_stride + (size_t) (i / j->xq_vals) * j->xq_block;
    if (j->xq_type == GGML_TYPE_Q8_K) { /* { float d; int8_t qs[256]; int16_t bsums[16]; } */
        memcpy(dx, xb, sizeof(float));
        if (sx) {
            int32_t sum = 0;
            for (int64_t k = (i % 256) / 16; k < (i % 256 + group) / 16; k++) {
                int16_t bs;
                memcpy(&bs, xb + 4 + 256 + 2 * k, sizeof(bs));
                sum += bs;
            }
            *sx = *dx * (float) sum;
        }
        return (const int8_t *) (xb + 4);
    }
    ggml_fp16_t h;
    memcpy(&h, xb, sizeof(h));
    *dx = ggml_fp16_to_fp32(h);
    if (j->xq_type == GGML_TYPE_Q8_1) { /* { ggml_half d, s; int8_t qs[32]; } */
        if (sx) {
            memcpy(&h, xb + 2, sizeof(h));
            *sx = ggml_fp16_to_fp32(h);
        }
        return (const int8_t *) (xb + 4);
    }
    if (sx) { /* Q8_0 { ggml_half d; int8_t qs[32]; } carries no sum: the types it serves have no minimums */
        *sx = 0.0f;
    }
    return (const int8_t *) (xb + 2);
}

/* Threads own slices of the output rows. The groups are visited in order; a group's columns
 * (the neurons some token uses) are unpacked once, then each token's integer sums over the group are
 * formed and added to its output scaled as stock scales them, so every output value is its groups'
 * terms summed in group order, whatever the batch and the thread count. */
static void down_split_task(void * v, int ith, int nth) {
    const down_job * j = v;
    const ripple_layer * L = j->L;
    const int64_t n_ff = L->d.n_ff, n_embd = L->d.n_embd, T = j->n_tokens, G = L->down_group, ng = n_ff / G;
    int64_t r0, r1;
    slice_of(j, ith, nth, &r0, &r1);
    const int64_t w = r1 - r0;
    if (w == 0) {
        return;
    }
    const size_t off = L->gate_row + L->up_row;
    /* |q_w - offset| <= max_w, |q_x| <= 127: sums of this many neurons' products fit int16 */
    const int max_w = L->down_bits == 8 ? 128 : L->down_qoff > (1 << L->down_bits) - 1 - L->down_qoff ?
                                                L->down_qoff : (1 << L->down_bits) - 1 - L->down_qoff;
    const int limit = 32767 / (max_w * 127);
    int16_t * col = (int16_t *) (j->work + (size_t) ith * j->work_per_thread); /* G x w */
    int32_t * S = (int32_t *) (col + (size_t) G * (size_t) w);                  /* w */
    int width[3] = { 8 };
    int64_t at[3] = { 0 };
    const int n_planes = L->down_bits == 8 ? 1 : split_planes(L->down_bits, n_embd, width, at);
    const size_t elem = L->down_tab_f16 ? sizeof(ggml_fp16_t) : sizeof(float);
    const int tab_planes = L->down_has_min ? 2 : 1;
    for (int64_t t = 0; t < T; t++) {
        memset((float *) ((char *) j->dst->data + t * j->dst->nb[1]) + r0, 0, sizeof(float) * (size_t) w);
    }
    const int64_t n_list = j->grp_start[ng];
    for (int64_t g = 0; g < ng; g++) {
        const int64_t k0 = j->grp_start[g], k1 = j->grp_start[g + 1];
        if (k0 == k1) {
            continue;
        }
        /* the next neurons' slices, while this group computes: bundles lie apart, so the hardware
         * prefetcher does not follow them */
        for (int64_t k = k1; k < n_list && k < k1 + 32; k++) {
            const uint8_t * col_at = j->ptrs[L->pos_of[j->nlist[k]]] + off;
            for (int p = 0; p < n_planes; p++) {
                const uint8_t * a = col_at + at[p] + r0 * width[p] / 8;
                for (int64_t c = 0; c < w * width[p] / 8; c += 64) {
                    __builtin_prefetch(a + c);
                }
            }
        }
        const int m = (int) (k1 - k0);
        for (int k = 0; k < m; k++) {
            split_unpack(L, j->ptrs[L->pos_of[j->nlist[k0 + k]]] + off, r0, r1, col + (size_t) k * (size_t) w);
        }
        const char * dw = (const char *) L->down_tab + ((size_t) g * (size_t) tab_planes * (size_t) n_embd + (size_t) r0) * elem;
        const char * mw = L->down_has_min ? dw + (size_t) n_embd * elem : NULL;
        for (int64_t t = 0; t < T; t++) {
            float dx, sx = 0.0f;
            const int8_t * qx = xq_block_of(j, t, g * G, (int) G, &dx, mw ? &sx : NULL);
            int16_t q[32];
            int any = 0;
            for (int k = 0; k < m; k++) {
                q[k] = qx[j->nlist[k0 + k] % j->xq_vals];
                any |= q[k];
            }
            if (!any) {
                continue; /* every q_x of the group is 0, and so is its sum */
            }
            block_sum(col, w, q, m, limit, S);
            float * out = (float *) ((char *) j->dst->data + t * j->dst->nb[1]) + r0;
            block_scale_add(out, S, dw, mw, L->down_tab_f16, dx, sx, w);
        }
    }
}

#define RIPPLE_DOWN_BLOCK 32 /* float path: columns dequantized together, then applied to every token */

static void down_float_task(void * v, int ith, int nth) {
    const down_job * j = v;
    const ripple_layer * L = j->L;
    const int64_t n_ff = L->d.n_ff, T = j->n_tokens;
    int64_t r0, r1;
    slice_of(j, ith, nth, &r0, &r1);
    const int64_t w = r1 - r0;
    if (w == 0) {
        return;
    }
    const size_t off = L->gate_row + L->up_row;
    /* a slice of a column starts at its byte offset (whole blocks of the column type) */
    const size_t slice_off = ggml_row_size((enum ggml_type) L->d.down_type, r0);
    float * cols = (float *) (j->work + (size_t) ith * j->work_per_thread);
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
            j->to_float(j->ptrs[p] + off + slice_off, cols + (size_t) nb * (size_t) w, w);
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

void ripple_mask_activations(const ripple_layer * L, const float * x, const uint8_t * token_mask, int rule, float * out) {
    const float thr = L->d.act_threshold;
    for (int64_t i = 0; i < L->d.n_ff; i++) {
        const float v = x[i];
        out[i] = (token_mask && !token_mask[i]) || (rule && fabsf(v) <= thr) ? 0.0f : v;
    }
}

/* Stock's vec_dot types that carry the block layout the integer path reads */
static int q8_block_of(enum ggml_type vt, down_job * j) {
    j->xq_type = vt;
    switch (vt) {
        case GGML_TYPE_Q8_0: j->xq_block = 34; j->xq_vals = 32; return 1;
        case GGML_TYPE_Q8_1: j->xq_block = 36; j->xq_vals = 32; return 1;
        case GGML_TYPE_Q8_K: j->xq_block = 4 + 256 + 32; j->xq_vals = 256; return 1;
        default: return 0;
    }
}

int ripple_kernel_down(ripple_pool * pool, int n_threads, const ripple_layer * L, const uint8_t * const * ptrs,
                       const int32_t * positions, int64_t n_positions, int apply_rule,
                       const uint8_t * token_mask, const struct ggml_tensor * src1, struct ggml_tensor * dst) {
    if (n_threads < 1) n_threads = 1;
    const int64_t n_tokens = src1->ne[1], n_ff = L->d.n_ff, n_embd = L->d.n_embd;
    const struct ggml_type_traits_cpu * dtc = ripple_cpu_traits((enum ggml_type) L->d.down_src_type);
    if (!dtc) {
        ripple_set_error("ggml's CPU backend is not loaded in this process");
        return -1;
    }
    const enum ggml_type vt = dtc->vec_dot_type;
    down_job j = { 0 };
    j.L = L;
    j.ptrs = ptrs;
    j.positions = positions;
    j.n_positions = n_positions;
    j.n_tokens = n_tokens;
    j.dst = dst;
    const int integer = L->down_bits && L->down_tab != NULL && q8_block_of(vt, &j) &&
                        !(L->down_has_min && vt == GGML_TYPE_Q8_0);
    if (L->down_bits && !integer) { /* split columns are only read in the integer form */
        ripple_set_error("layer %d: split down columns of type %s need their scale table and activations of type "
                         "Q8_0, Q8_1 or Q8_K (ggml's vec_dot type here: %s)", L->d.block,
                         ggml_type_name((enum ggml_type) L->d.down_type), ggml_type_name(vt));
        return -1;
    }
    j.to_float = integer ? NULL : to_float_of((enum ggml_type) L->d.down_type);
    if (!integer && !j.to_float) {
        ripple_set_error("no to_float for type %s", ggml_type_name((enum ggml_type) L->d.down_type));
        return -1;
    }
    /* slices of whole column blocks; a multiple of 32 rows keeps every value on the same vector path */
    const int64_t blk = integer ? 8 : ggml_blck_size((enum ggml_type) L->d.down_type);
    j.step = n_embd % 32 == 0 && 32 % blk == 0 ? 32 : (n_embd % blk == 0 ? blk : n_embd);
    const int64_t w_max = ((n_embd / j.step + n_threads - 1) / n_threads) * j.step;

    /* the activations masked (token_mask: not selected for their token) and, with apply_rule, with
     * |h| <= threshold dropped, before the conversion: its block scales depend on every value of the
     * block, so a batch that computed a neuron for another token converts this token's values as a
     * lone token would */
    const size_t vt_row = ggml_row_size(vt, n_ff);
    float * hm = malloc(sizeof(float) * (size_t) n_ff);
    uint8_t * xq = vt == GGML_TYPE_F32 ? NULL : malloc(vt_row * (size_t) n_tokens);
    float * h = integer ? NULL : malloc(sizeof(float) * (size_t) (n_tokens * n_ff));
    /* integer path: per thread a group's unpacked columns (group x w int16) and its sums (w int32) */
    const int64_t G = integer ? L->down_group : 1, ng = n_ff / G;
    j.work_per_thread = integer ? ((size_t) G * sizeof(int16_t) + sizeof(int32_t)) * (size_t) w_max
                                : sizeof(float) * RIPPLE_DOWN_BLOCK * (size_t) w_max;
    j.work_per_thread = (j.work_per_thread + 63) & ~(size_t) 63;
    j.work = malloc(j.work_per_thread * (size_t) n_threads);
    int32_t * lists = integer ? malloc(sizeof(int32_t) * (size_t) (n_ff + ng + 1)) : NULL;
    if (!hm || (vt != GGML_TYPE_F32 && !xq) || (!integer && !h) || !j.work || (integer && !lists)) {
        free(lists);
        free(hm);
        free(xq);
        free(h);
        free(j.work);
        ripple_set_error("out of memory for the down projection");
        return -1;
    }
    const int rule = apply_rule && L->d.act_rule == RIPPLE_RULE_MAGNITUDE; /* magnitude: |h| <= threshold is not active */
    const ggml_from_float_t from_float = vt == GGML_TYPE_F32 ? NULL : ripple_cpu_traits(vt)->from_float;
    for (int64_t t = 0; t < n_tokens; t++) {
        ripple_mask_activations(L, (const float *) ((const char *) src1->data + t * src1->nb[1]),
                                token_mask ? token_mask + t * n_ff : NULL, rule, hm);
        if (integer) {
            from_float(hm, xq + (size_t) t * vt_row, n_ff);
        } else if (from_float == NULL || n_ff % ggml_blck_size(vt) != 0) {
            memcpy(h + t * n_ff, hm, sizeof(float) * (size_t) n_ff);
        } else {
            from_float(hm, xq, n_ff);
            dequant_vec_dot_type(vt, xq, h + t * n_ff, n_ff);
        }
    }
    j.xq = xq;
    j.xq_stride = vt_row;
    j.h = h;
    if (integer) {
        /* the neurons with a non-zero value for some token, by group */
        int32_t * nlist = lists, * grp_start = lists + n_ff;
        int64_t k = 0;
        for (int64_t g = 0; g < ng; g++) {
            grp_start[g] = (int32_t) k;
            for (int64_t i = g * G; i < (g + 1) * G; i++) {
                int any = 0;
                for (int64_t t = 0; t < n_tokens && !any; t++) {
                    float dx;
                    any = xq_block_of(&j, t, i, 1, &dx, NULL)[i % j.xq_vals] != 0;
                }
                if (any) {
                    nlist[k++] = (int32_t) i;
                }
            }
        }
        grp_start[ng] = (int32_t) k;
        j.nlist = nlist;
        j.grp_start = grp_start;
    }
    ripple_pool_run(pool, n_threads, integer ? down_split_task : down_float_task, &j);
    free(lists);
    free(hm);
    free(xq);
    free(h);
    free(j.work);
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
