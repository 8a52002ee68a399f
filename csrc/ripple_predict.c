/* A layer's predictor: which bundles a token needs. Low-rank predictors (ripple_gguf/offline/predictor.py,
 * docs/FORMAT.md 3b) are computed here; sketch predictors (RPSK blobs) in ripple_sketch.c. */
#include "ripple_kernels.h"
#include "ripple_predict.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* ---- predictor blob (ripple_gguf/offline/predictor.py, docs/FORMAT.md 3b) ---- */

#define RIPPLE_PREDICTOR_VERSION 2 /* predictor.VERSION */

static size_t pad64(size_t n) {
    return (n + 63) & ~(size_t) 63;
}

void ripple_predictor_free(ripple_predictor * p) {
    if (p) {
        free(p->x_shift);
        free(p->x_scale);
        free(p->w1t);
        free(p->b1);
        free(p->w2t);
        free(p->b2);
        free(p->sk.mem);
        free(p);
    }
}

static int all_finite(const float * v, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(v[i])) {
            return 0;
        }
    }
    return 1;
}

/* no f16 infinity or nan (exponent bits all ones) */
static int all_finite_f16(const ggml_fp16_t * v, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if ((v[i] & 0x7C00) == 0x7C00) {
            return 0;
        }
    }
    return 1;
}

ripple_predictor * ripple_predictor_load(const uint8_t * blob, size_t size, int n_embd, int n_ff,
                                         char * err, size_t err_len) {
    uint32_t hdr[7];
    if (size >= 64 && memcmp(blob, "RPSK", 4) == 0) {
        ripple_predictor * p = calloc(1, sizeof(*p));
        if (!p) {
            snprintf(err, err_len, "out of memory for a predictor");
            return NULL;
        }
        if (ripple_sketch_load(p, blob, size, n_embd, n_ff, err, err_len) != 0) {
            free(p);
            return NULL;
        }
        return p;
    }
    if (size < 64 || memcmp(blob, "RPRD", 4) != 0) {
        snprintf(err, err_len, "predictor blob has no RPRD or RPSK header");
        return NULL;
    }
    memcpy(hdr, blob, sizeof(hdr));
    const uint32_t version = hdr[1], e = hdr[2], f = hdr[3], rank = hdr[4], blob_size = hdr[6];
    float threshold;
    memcpy(&threshold, blob + 20, 4);
    if (version != RIPPLE_PREDICTOR_VERSION) {
        snprintf(err, err_len, "predictor blob version %u is not supported (this build reads version %d): "
                 "convert the model again", version, RIPPLE_PREDICTOR_VERSION);
        return NULL;
    }
    if ((int) e != n_embd || (int) f != n_ff || rank == 0 || blob_size != size) {
        snprintf(err, err_len, "predictor blob (%u x %u, rank %u, %u bytes) does not fit a layer of "
                 "%d x %d in %zu bytes", e, f, rank, blob_size, n_embd, n_ff, size);
        return NULL;
    }
    const size_t o_sc = 64 + pad64(4 * (size_t) e);
    const size_t o_w1 = o_sc + pad64(4 * (size_t) e);
    const size_t o_b1 = o_w1 + pad64(2 * (size_t) rank * e);
    const size_t o_w2 = o_b1 + pad64(4 * (size_t) rank);
    const size_t o_b2 = o_w2 + pad64(2 * (size_t) f * rank);
    if (o_b2 + pad64(4 * (size_t) f) != size) {
        snprintf(err, err_len, "predictor blob size %zu does not match its dimensions", size);
        return NULL;
    }
    ripple_predictor * p = calloc(1, sizeof(*p));
    if (!p) {
        snprintf(err, err_len, "out of memory for a predictor");
        return NULL;
    }
    p->rank = (int32_t) rank;
    p->threshold = threshold;
    p->x_shift = malloc(sizeof(float) * e);
    p->x_scale = malloc(sizeof(float) * e);
    p->w1t = malloc(sizeof(ggml_fp16_t) * rank * e);
    p->b1 = malloc(sizeof(float) * rank);
    p->w2t = malloc(sizeof(ggml_fp16_t) * (size_t) f * rank);
    p->b2 = malloc(sizeof(float) * f);
    if (!p->x_shift || !p->x_scale || !p->w1t || !p->b1 || !p->w2t || !p->b2) {
        ripple_predictor_free(p);
        snprintf(err, err_len, "out of memory for a predictor");
        return NULL;
    }
    memcpy(p->x_shift, blob + 64, 4 * (size_t) e);
    memcpy(p->x_scale, blob + o_sc, 4 * (size_t) e);
    memcpy(p->w1t, blob + o_w1, sizeof(ggml_fp16_t) * rank * e);
    memcpy(p->b1, blob + o_b1, 4 * (size_t) rank);
    memcpy(p->w2t, blob + o_w2, sizeof(ggml_fp16_t) * (size_t) f * rank);
    memcpy(p->b2, blob + o_b2, 4 * (size_t) f);
    /* a non-finite value would select every neuron or none, silently */
    const char * bad = !isfinite(threshold) ? "threshold"
                     : !all_finite(p->x_shift, e) || !all_finite(p->x_scale, e) ? "input standardisation"
                     : !all_finite_f16(p->w1t, (size_t) rank * e) || !all_finite(p->b1, rank) ? "first layer"
                     : !all_finite_f16(p->w2t, (size_t) f * rank) || !all_finite(p->b2, f) ? "second layer" : NULL;
    if (bad) {
        ripple_predictor_free(p);
        snprintf(err, err_len, "predictor blob: %s holds inf or nan", bad);
        return NULL;
    }
    return p;
}

/* Dot product of f16 weights and f32 values with 8 independent partial sums (one vector register),
 * combined in a fixed order: the same order of additions for every call, so a token's selection
 * never depends on the batch. */
static float dot(const ggml_fp16_t * a, const float * b, int64_t n) {
    float acc[8] = { 0 };
    int64_t i = 0;
#if defined(__F16C__) && defined(__FMA__)
    __m256 v = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        v = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (a + i))), _mm256_loadu_ps(b + i), v);
    }
    _mm256_storeu_ps(acc, v);
#else
    for (; i + 8 <= n; i += 8) {
        for (int k = 0; k < 8; k++) {
            acc[k] += ggml_fp16_to_fp32(a[i + k]) * b[i + k];
        }
    }
#endif
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) {
        s += ggml_fp16_to_fp32(a[i]) * b[i];
    }
    return s;
}

typedef struct {
    const ripple_predictor *   p;
    const ripple_layer *       L;
    const struct ggml_tensor * src1;
    uint8_t *                  tok;
    float *                    hid; /* n_tokens x rank */
    float *                    z;   /* n_tokens x n_embd: the standardised inputs */
} predict_job;

/* tokens split among threads; a single token's neurons split among them instead (its hidden layer
 * computed by thread 0, then shared after a barrier) */
static void predict_task(void * v, int ith, int nth) {
    const predict_job * j = v;
    const ripple_predictor * p = j->p;
    const int64_t n_embd = j->L->d.n_embd, n_ff = j->L->d.n_ff, T = j->src1->ne[1];
    const int split_tokens = T > 1 || nth == 1;
    const int64_t t0 = split_tokens ? T * ith / nth : 0, t1 = split_tokens ? T * (ith + 1) / nth : T;
    const int64_t i0 = split_tokens ? 0 : n_ff * ith / nth, i1 = split_tokens ? n_ff : n_ff * (ith + 1) / nth;
    for (int64_t t = t0; t < t1; t++) {
        const float * x = (const float *) ((const char *) j->src1->data + t * j->src1->nb[1]);
        float * hid = j->hid + (size_t) t * (size_t) p->rank;
        if (split_tokens || ith == 0) {
            float * z = j->z + (size_t) t * (size_t) n_embd;
            for (int64_t k = 0; k < n_embd; k++) {
                z[k] = (x[k] - p->x_shift[k]) * p->x_scale[k];
            }
            for (int32_t r = 0; r < p->rank; r++) {
                const float v = dot(p->w1t + (size_t) r * n_embd, z, n_embd) + p->b1[r];
                hid[r] = v > 0.0f ? v : 0.0f;
            }
        }
#ifdef RIPPLE_OPENMP
        if (!split_tokens) {
            #pragma omp barrier
        }
#endif
        uint8_t * m = j->tok + t * n_ff;
        for (int64_t i = i0; i < i1; i++) {
            m[i] = dot(p->w2t + (size_t) i * p->rank, hid, p->rank) + p->b2[i] > p->threshold;
        }
    }
}

/* tok[t * n_ff + i] = 1 when the predictor selects neuron i for token t of src1; need[i] = 1 for
 * the union over the tokens. Returns the number of (token, neuron) pairs selected. pool NULL: this
 * thread alone. */
int64_t ripple_predict(ripple_pool * pool, int n_threads, const ripple_predictor * p, const ripple_layer * L,
                       const struct ggml_tensor * src1, uint8_t * need, uint8_t * tok) {
    const int64_t n_ff = L->d.n_ff, T = src1->ne[1];
    float * buf = p->kind == RIPPLE_PREDICTOR_SKETCH ? NULL
                : malloc(sizeof(float) * ((size_t) p->rank + (size_t) L->d.n_embd) * (size_t) T);
    predict_job j = { p, L, src1, tok, buf, buf ? buf + (size_t) p->rank * (size_t) T : NULL };
    if (p->kind == RIPPLE_PREDICTOR_SKETCH) {
        ripple_sketch_predict(pool, n_threads, p, L, src1, tok, NULL);
    } else if (!buf) {
        memset(tok, 1, (size_t) (n_ff * T)); /* no memory for the predictor: every neuron */
    } else if (pool && n_threads > 1 && (T > 1 || ripple_pool_is_openmp())) {
        ripple_pool_run(pool, n_threads, predict_task, &j);
    } else {
        predict_task(&j, 0, 1);
    }
    free(buf);
    int64_t selected = 0;
    memset(need, 0, (size_t) n_ff);
    for (int64_t t = 0; t < T; t++) {
        const uint8_t * m = tok + t * n_ff;
        for (int64_t i = 0; i < n_ff; i++) {
            need[i] |= m[i];
            selected += m[i];
        }
    }
    return selected;
}
