/* Sketch predictors (ripple_gguf/offline/sketch.py, docs/FORMAT.md 3c): per token, a score per neuron
 * from a 2-bit copy of the layer's gate and up rows plus k outlier input channels in int8,
 *   g~ = D_g / 2 * d * (2 sum_j c_j xq_j - 3 sum_j xq_j) + sum_k og_k * osg_k * x[out_k]
 * (u~ likewise), score = |act(g~) u~|, selected iff score > threshold. The integer sums use
 * AVX-512 VNNI (u8 codes x s8 activations) when the build has it; the float steps are done in the
 * order sketch.py's reference does them. */
#include "ripple_kernels.h"
#include "ripple_predict.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#include <immintrin.h>
#define RIPPLE_SKETCH_VNNI 1
#endif

#define SKETCH_VERSION 1
#define SKETCH_BITS 2

static size_t pad64(size_t n) {
    return (n + 63) & ~(size_t) 63;
}

int ripple_sketch_load(ripple_predictor * p, const uint8_t * blob, size_t size, int n_embd, int n_ff, char * err,
                       size_t err_len) {
    uint32_t h[10];
    float threshold;
    memcpy(h, blob, sizeof(h));
    memcpy(&threshold, blob + 20, 4);
    const uint32_t version = h[1], e = h[2], f = h[3], bits = h[4], blob_size = h[6], k = h[7], gated = h[8], act = h[9];
    if (version != SKETCH_VERSION || bits != SKETCH_BITS) {
        snprintf(err, err_len, "sketch predictor version %u with %u bits is not supported (this build reads version %d, "
                 "%d bits): convert the model again", version, bits, SKETCH_VERSION, SKETCH_BITS);
        return -1;
    }
    if ((int) e != n_embd || (int) f != n_ff || k > e || gated > 1 || act > 2 || blob_size != size) {
        snprintf(err, err_len, "sketch predictor (%u x %u, %u outliers, gated %u, act %u, %u bytes) does not fit a "
                 "layer of %d x %d in %zu bytes", e, f, k, gated, act, blob_size, n_embd, n_ff, size);
        return -1;
    }
    const size_t npad = ((size_t) e + 63) / 64 * 64, row = npad / 4, g = gated;
    const size_t sizes[9] = { 4 * (size_t) k, 4 * (size_t) k * g, 4 * (size_t) k, 2 * (size_t) f * g, 2 * (size_t) f,
                              (size_t) f * row * g, (size_t) f * row, (size_t) f * k * g, (size_t) f * k };
    size_t off[9], at = 64;
    for (int i = 0; i < 9; i++) {
        off[i] = at;
        at += pad64(sizes[i]);
    }
    if (at != size) {
        snprintf(err, err_len, "sketch predictor size %zu does not match its dimensions (%zu)", size, at);
        return -1;
    }
    uint8_t * copy = malloc(size);
    if (!copy) {
        snprintf(err, err_len, "out of memory for a predictor");
        return -1;
    }
    memcpy(copy, blob, size);
    ripple_sketch * s = &p->sk;
    s->blob = copy;
    s->n_out = (int32_t) k;
    s->gated = (int32_t) gated;
    s->act = (int32_t) act;
    s->n_pad = (int32_t) npad;
    s->out = (const int32_t *) (copy + off[0]);
    s->osg = gated ? (const float *) (copy + off[1]) : NULL;
    s->osu = (const float *) (copy + off[2]);
    s->dg = gated ? (const ggml_fp16_t *) (copy + off[3]) : NULL;
    s->du = (const ggml_fp16_t *) (copy + off[4]);
    s->cg = gated ? copy + off[5] : NULL;
    s->cu = copy + off[6];
    s->og = gated ? (const int8_t *) (copy + off[7]) : NULL;
    s->ou = (const int8_t *) (copy + off[8]);
    p->threshold = threshold;
    const char * bad = NULL;
    for (uint32_t i = 0; i < k && !bad; i++) {
        if (s->out[i] < 0 || s->out[i] >= (int32_t) e || (i && s->out[i] <= s->out[i - 1])) {
            bad = "outlier channel list";
        } else if (!isfinite(s->osu[i]) || (gated && !isfinite(s->osg[i]))) {
            bad = "outlier scales";
        }
    }
    for (uint32_t i = 0; i < f && !bad; i++) {
        if ((s->du[i] & 0x7C00) == 0x7C00 || (gated && (s->dg[i] & 0x7C00) == 0x7C00)) {
            bad = "row steps";
        }
    }
    if (!bad && !isfinite(threshold)) {
        bad = "threshold";
    }
    if (bad) {
        free(copy);
        s->blob = NULL;
        snprintf(err, err_len, "sketch predictor: %s invalid (inf, nan or out of range)", bad);
        return -1;
    }
    p->kind = RIPPLE_PREDICTOR_SKETCH;
    return 0;
}

/* sum_j code_j * xq_j of one row. xp: the activations in the order the codes unpack (see
 * ripple_sketch_prepare). */
static int32_t row_dot(const uint8_t * codes, const int8_t * xp, int64_t groups) {
    int64_t gi = 0;
    int32_t sum = 0;
#ifdef RIPPLE_SKETCH_VNNI
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i acc = _mm512_setzero_si512();
    for (; gi + 4 <= groups; gi += 4) {
        const __m512i v = _mm512_loadu_si512((const void *) (codes + 16 * gi));
        const int8_t * xb = xp + 64 * gi;
        acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(v, m3), _mm512_loadu_si512((const void *) xb));
        acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v, 2), m3), _mm512_loadu_si512((const void *) (xb + 64)));
        acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v, 4), m3), _mm512_loadu_si512((const void *) (xb + 128)));
        acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(v, 6), m3), _mm512_loadu_si512((const void *) (xb + 192)));
    }
    sum = _mm512_reduce_add_epi32(acc);
    const __m128i n3 = _mm_set1_epi8(3);
    __m128i a = _mm_setzero_si128();
    for (; gi < groups; gi++) {
        const __m128i v = _mm_loadu_si128((const __m128i *) (codes + 16 * gi));
        const int8_t * xb = xp + 64 * gi;
        a = _mm_dpbusd_epi32(a, _mm_and_si128(v, n3), _mm_loadu_si128((const __m128i *) xb));
        a = _mm_dpbusd_epi32(a, _mm_and_si128(_mm_srli_epi16(v, 2), n3), _mm_loadu_si128((const __m128i *) (xb + 16)));
        a = _mm_dpbusd_epi32(a, _mm_and_si128(_mm_srli_epi16(v, 4), n3), _mm_loadu_si128((const __m128i *) (xb + 32)));
        a = _mm_dpbusd_epi32(a, _mm_and_si128(_mm_srli_epi16(v, 6), n3), _mm_loadu_si128((const __m128i *) (xb + 48)));
    }
    int32_t t[4];
    _mm_storeu_si128((__m128i *) t, a);
    sum += t[0] + t[1] + t[2] + t[3];
#else
    for (; gi < groups; gi++) {
        for (int b = 0; b < 16; b++) {
            const uint8_t v = codes[16 * gi + b];
            for (int s = 0; s < 4; s++) {
                sum += (int32_t) ((v >> (2 * s)) & 3) * (int32_t) xp[64 * gi + 16 * s + b];
            }
        }
    }
#endif
    return sum;
}

/* The token's quantized activations: xp (n_pad int8, in unpack order), and d, sum xq, y_k. */
typedef struct {
    float   d;
    float   sx;
    int8_t * xp;
    float * yg; /* n_out: x[out_k] * osg[k] */
    float * yu; /* n_out: x[out_k] * osu[k] */
} sketch_token;

static void prepare(const ripple_sketch * s, const float * x, int64_t n_embd, int8_t * xq, sketch_token * tk) {
    float m = 0.0f;
    int64_t o = 0;
    for (int64_t j = 0; j < n_embd; j++) {
        if (o < s->n_out && s->out[o] == j) {
            o++;
            continue;
        }
        const float a = fabsf(x[j]);
        m = a > m ? a : m;
    }
    const float d = m > 0.0f ? m / 127.0f : 1.0f;
    int32_t sx = 0;
    o = 0;
    memset(xq, 0, (size_t) s->n_pad);
    for (int64_t j = 0; j < n_embd; j++) {
        if (o < s->n_out && s->out[o] == j) {
            o++;
            continue;
        }
        const int v = (int) roundf(x[j] / d);
        xq[j] = (int8_t) v;
        sx += v;
    }
    /* unpack order: whole blocks of 4 groups (256 channels) interleaved as the 512-bit kernel
     * loads them, the remaining groups as they are */
    const int64_t groups = s->n_pad / 64, quads = groups / 4 * 4;
    for (int64_t g = 0; g < groups; g++) {
        for (int sh = 0; sh < 4; sh++) {
            const int64_t dst = g < quads ? 64 * (g / 4 * 4) + 64 * sh + 16 * (g % 4) : 64 * g + 16 * sh;
            memcpy(tk->xp + dst, xq + 64 * g + 16 * sh, 16);
        }
    }
    for (int32_t k = 0; k < s->n_out; k++) {
        tk->yu[k] = x[s->out[k]] * s->osu[k];
        tk->yg[k] = s->gated ? x[s->out[k]] * s->osg[k] : 0.0f;
    }
    tk->d = d;
    tk->sx = (float) sx;
}

static float estimate(const ripple_sketch * s, const sketch_token * tk, const uint8_t * codes, const ggml_fp16_t * steps,
                      const int8_t * ow, const float * y, int64_t i) {
    const int64_t groups = s->n_pad / 64;
    const float acc = (float) row_dot(codes + (size_t) i * (size_t) (s->n_pad / 4), tk->xp, groups);
    float v = ((ggml_fp16_to_fp32(steps[i]) / 2.0f) * tk->d) * (2.0f * acc - 3.0f * tk->sx);
    const int8_t * w = ow + (size_t) i * (size_t) s->n_out;
    int32_t k = 0;
    float o = 0.0f;
#ifdef RIPPLE_SKETCH_VNNI
    __m512 a = _mm512_setzero_ps();
    for (; k < s->n_out; k += 16) { /* int8 weights x the token's scaled outlier inputs, 16 at a time */
        const __mmask16 m = s->n_out - k >= 16 ? (__mmask16) 0xFFFF : (__mmask16) ((1u << (s->n_out - k)) - 1);
        const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w + k)));
        a = _mm512_fmadd_ps(wf, _mm512_maskz_loadu_ps(m, y + k), a);
    }
    o = _mm512_reduce_add_ps(a);
#else
    for (; k < s->n_out; k++) {
        o += (float) w[k] * y[k];
    }
#endif
    return v + o;
}

static float act(int kind, float g) {
    if (kind == 0) {
        return g / (1.0f + expf(-g));
    }
    if (kind == 2) {
        return g > 0.0f ? g : 0.0f;
    }
    const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
    return 0.5f * g * (1.0f + tanhf(c * g * (1.0f + 0.044715f * g * g)));
}

float ripple_sketch_score(const ripple_sketch * s, const void * tok, int64_t i) {
    const sketch_token * tk = tok;
    const float u = estimate(s, tk, s->cu, s->du, s->ou, tk->yu, i);
    if (!s->gated) {
        return fabsf(act(s->act, u));
    }
    const float g = estimate(s, tk, s->cg, s->dg, s->og, tk->yg, i);
    return fabsf(act(s->act, g) * u);
}

static double g_topk; /* diagnostic: > 0 keeps this fraction of each token's neurons instead of the threshold */

void ripple_set_sketch_topk(double fraction) {
    g_topk = fraction > 0 && fraction <= 1 ? fraction : 0;
}

double ripple_get_sketch_topk(void) {
    return g_topk;
}

static int cmp_desc(const void * a, const void * b) {
    const float x = *(const float *) a, y = *(const float *) b;
    return (x < y) - (x > y);
}

typedef struct {
    const ripple_predictor *   p;
    const ripple_layer *       L;
    const struct ggml_tensor * src1;
    uint8_t *                  tok;
    float *                    scores; /* optional: n_tokens x n_ff (needed by the top-k rule) */
    uint8_t *                  scratch; /* per thread: 2 * n_pad + 4 * n_out bytes */
    size_t                     scratch_each;
} sketch_job;

static void sketch_task(void * v, int ith, int nth) {
    const sketch_job * j = v;
    const ripple_sketch * s = &j->p->sk;
    const int64_t n_embd = j->L->d.n_embd, n_ff = j->L->d.n_ff, T = j->src1->ne[1];
    const int split_tokens = T > 1 || nth == 1;
    const int64_t t0 = split_tokens ? T * ith / nth : 0, t1 = split_tokens ? T * (ith + 1) / nth : T;
    const int64_t i0 = split_tokens ? 0 : n_ff * ith / nth, i1 = split_tokens ? n_ff : n_ff * (ith + 1) / nth;
    uint8_t * mine = j->scratch + (size_t) ith * j->scratch_each;
    int8_t * xq = (int8_t *) mine;
    float * ys = (float *) (mine + 2 * (size_t) s->n_pad);
    sketch_token tk = { 0, 0, (int8_t *) mine + s->n_pad, ys, ys + s->n_out };
    for (int64_t t = t0; t < t1; t++) {
        const float * x = (const float *) ((const char *) j->src1->data + t * j->src1->nb[1]);
        prepare(s, x, n_embd, xq, &tk); /* each thread its own copy: no barrier for one token */
        uint8_t * m = j->tok + t * n_ff;
        float * sc = j->scores ? j->scores + t * n_ff : NULL;
        for (int64_t i = i0; i < i1; i++) {
            const float score = ripple_sketch_score(s, &tk, i);
            m[i] = score > j->p->threshold;
            if (sc) {
                sc[i] = score;
            }
        }
    }
}

void ripple_sketch_predict(ripple_pool * pool, int n_threads, const ripple_predictor * p, const ripple_layer * L,
                           const struct ggml_tensor * src1, uint8_t * tok, float * scores) {
    const int64_t n_ff = L->d.n_ff, T = src1->ne[1];
    const int nth = n_threads > 1 ? n_threads : 1;
    const size_t each = (2 * (size_t) p->sk.n_pad + 8 * (size_t) p->sk.n_out + 63) & ~(size_t) 63;
    const double topk = g_topk;
    float * own = topk > 0 && !scores ? malloc(sizeof(float) * (size_t) (n_ff * T)) : NULL;
    uint8_t * scratch = aligned_alloc(64, each * (size_t) nth);
    sketch_job j = { p, L, src1, tok, scores ? scores : own, scratch, each };
    float * sorted = topk > 0 ? malloc(sizeof(float) * (size_t) n_ff) : NULL;
    if (!scratch || (topk > 0 && (!j.scores || !sorted))) {
        memset(tok, 1, (size_t) (n_ff * T)); /* no memory for the predictor: every neuron */
        free(scratch);
        free(own);
        free(sorted);
        return;
    }
    if (pool && nth > 1 && (T > 1 || ripple_pool_is_openmp())) {
        ripple_pool_run(pool, nth, sketch_task, &j);
    } else {
        sketch_task(&j, 0, 1);
    }
    if (topk > 0) { /* the k highest scores of each token, k = ceil(fraction * n_ff) */
        const int64_t k = (int64_t) ceil(topk * (double) n_ff);
        for (int64_t t = 0; t < T; t++) {
            const float * sc = j.scores + t * n_ff;
            memcpy(sorted, sc, sizeof(float) * (size_t) n_ff);
            qsort(sorted, (size_t) n_ff, sizeof(float), cmp_desc);
            const float edge = sorted[k - 1];
            for (int64_t i = 0; i < n_ff; i++) {
                tok[t * n_ff + i] = sc[i] >= edge;
            }
        }
    }
    free(scratch);
    free(own);
    free(sorted);
}

int ripple_sketch_scores(const uint8_t * blob, size_t size, int32_t n_embd, int32_t n_ff, const float * x, int64_t n_tokens,
                         float * scores, uint8_t * selected, char * err, size_t err_len) {
    ripple_predictor p;
    memset(&p, 0, sizeof(p));
    if (size < 64 || memcmp(blob, "RPSK", 4) != 0) {
        snprintf(err, err_len, "not a sketch predictor blob");
        return -1;
    }
    if (ripple_sketch_load(&p, blob, size, n_embd, n_ff, err, err_len) != 0) {
        return -1;
    }
    ripple_layer L;
    memset(&L, 0, sizeof(L));
    L.d.n_embd = n_embd;
    L.d.n_ff = n_ff;
    struct ggml_tensor t;
    memset(&t, 0, sizeof(t));
    t.data = (void *) x;
    t.ne[0] = n_embd;
    t.ne[1] = n_tokens;
    t.nb[1] = sizeof(float) * (size_t) n_embd;
    ripple_sketch_predict(NULL, 1, &p, &L, &t, selected, scores);
    free(p.sk.blob);
    return 0;
}
