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
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RIPPLE_SKETCH_AVX2 1 /* the integer sums and estimates in 256-bit lanes, the scores per neuron */
#endif

#define SKETCH_VERSION 2 /* sketch.VERSION; version 1 (no variance terms) is read too */
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
    if (version < 1 || version > SKETCH_VERSION || bits != SKETCH_BITS) {
        snprintf(err, err_len, "sketch predictor version %u with %u bits is not supported (this build reads versions 1 "
                 "to %d, %d bits): convert the model again", version, bits, SKETCH_VERSION, SKETCH_BITS);
        return -1;
    }
    float var[2] = { 0.0f, 0.0f }; /* V_g, V_u */
    if (version >= 2) {
        memcpy(var, blob + 40, sizeof(var));
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
    const size_t n_blk = ((size_t) f + 15) / 16, nc = npad / 16;
    const uint8_t * b_out = blob + off[0];
    const float * b_osg = (const float *) (blob + off[1]), * b_osu = (const float *) (blob + off[2]);
    const ggml_fp16_t * b_dg = (const ggml_fp16_t *) (blob + off[3]), * b_du = (const ggml_fp16_t *) (blob + off[4]);
    const char * bad = NULL;
    for (uint32_t i = 0; i < k && !bad; i++) {
        int32_t o, prev = -1;
        memcpy(&o, b_out + 4 * i, 4);
        if (i) {
            memcpy(&prev, b_out + 4 * (i - 1), 4);
        }
        float su, sg = 0.0f;
        memcpy(&su, b_osu + i, 4);
        if (gated) {
            memcpy(&sg, b_osg + i, 4);
        }
        if (o < 0 || o >= (int32_t) e || o <= prev) {
            bad = "outlier channel list";
        } else if (!isfinite(su) || !isfinite(sg)) {
            bad = "outlier scales";
        }
    }
    for (uint32_t i = 0; i < f && !bad; i++) {
        ggml_fp16_t du, dg = 0;
        memcpy(&du, b_du + i, 2);
        if (gated) {
            memcpy(&dg, b_dg + i, 2);
        }
        if ((du & 0x7C00) == 0x7C00 || (dg & 0x7C00) == 0x7C00) {
            bad = "row steps";
        }
    }
    if (!bad && !isfinite(threshold)) {
        bad = "threshold";
    }
    if (!bad && !(isfinite(var[0]) && isfinite(var[1]) && var[0] >= 0.0f && var[1] >= 0.0f)) {
        bad = "variance coefficients";
    }
    if (bad) {
        snprintf(err, err_len, "sketch predictor: %s invalid (inf, nan or out of range)", bad);
        return -1;
    }
    /* repacked for the kernel, in one allocation of the blob's size but for the padding of the last
     * block: outlier list and scales, half steps (f32), codes and outlier weights by blocks of 16
     * rows (see ripple_sketch.h) */
    const size_t n_mat = gated ? 2 : 1, rows = n_blk * 16;
    const size_t psz[6] = { 4 * (size_t) k, 4 * (size_t) k * 2, 4 * rows * 2, rows * row * n_mat, rows * k * n_mat, 0 };
    size_t poff[6], pat = 0;
    for (int i = 0; i < 6; i++) {
        poff[i] = pat;
        pat += pad64(psz[i]);
    }
    uint8_t * mem = aligned_alloc(64, pat);
    if (!mem) {
        snprintf(err, err_len, "out of memory for a predictor");
        return -1;
    }
    memset(mem, 0, pat);
    ripple_sketch * s = &p->sk;
    s->mem = mem;
    s->n_out = (int32_t) k;
    s->gated = (int32_t) gated;
    s->act = (int32_t) act;
    s->n_pad = (int32_t) npad;
    s->n_blk = (int32_t) n_blk;
    s->var_g = gated ? var[0] : 0.0f;
    s->var_u = var[1];
    memcpy(mem + poff[0], b_out, 4 * (size_t) k);
    s->out = (const int32_t *) (mem + poff[0]);
    float * os = (float *) (mem + poff[1]), * half = (float *) (mem + poff[2]);
    memcpy(os + k, b_osu, 4 * (size_t) k);
    for (uint32_t i = 0; i < f; i++) {
        ggml_fp16_t du, dg = 0;
        memcpy(&du, b_du + i, 2);
        half[rows + i] = ggml_fp16_to_fp32(du) / 2.0f;
        if (gated) {
            memcpy(&dg, b_dg + i, 2);
            half[i] = ggml_fp16_to_fp32(dg) / 2.0f;
        }
    }
    if (gated) {
        memcpy(os, b_osg, 4 * (size_t) k);
    }
    s->osg = gated ? os : NULL;
    s->osu = os + k;
    s->hg = gated ? half : NULL;
    s->hu = half + rows;
    uint8_t * codes = mem + poff[3];
    int8_t * ow = (int8_t *) (mem + poff[4]);
    for (size_t mi = 0; mi < n_mat; mi++) {
        const int up = mi + 1 == n_mat;
        const uint8_t * src = blob + off[up ? 6 : 5];
        const int8_t * osrc = (const int8_t *) (blob + off[up ? 8 : 7]);
        uint8_t * dst = codes + mi * rows * row;
        int8_t * odst = ow + mi * rows * k;
        for (size_t i = 0; i < f; i++) {
            const uint8_t * r = src + i * row;
            uint8_t * blk = dst + (i / 16) * nc * 64 + 4 * (i % 16);
            for (size_t j = 0; j < npad; j++) { /* channel j = 64g + 16s + b at byte 16g + b, bits 2s */
                const unsigned c = (r[16 * (j / 64) + j % 16] >> (2 * ((j % 64) / 16))) & 3;
                blk[(j / 16) * 64 + j % 4] |= (uint8_t) (c << (2 * ((j % 16) / 4)));
            }
            for (size_t o = 0; o < k; o++) {
                odst[(i / 16) * 16 * k + o * 16 + i % 16] = osrc[i * k + o];
            }
        }
        if (up) {
            s->cu = dst;
            s->ou = odst;
        } else {
            s->cg = dst;
            s->og = odst;
        }
    }
    if (!gated) {
        s->cg = NULL;
        s->og = NULL;
    }
    p->threshold = threshold;
    p->kind = RIPPLE_PREDICTOR_SKETCH;
    return 0;
}

/* The token's quantized activations: xq (n_pad int8, the outlier channels 0), d, sum xq and
 * y_k = x[out_k] * os_k. */
typedef struct {
    float    d;
    float    sx3; /* 3 * sum xq */
    float    nx2; /* sum x_j^2 over the channels that are not outliers */
    int8_t * xq;
    float *  yg; /* n_out */
    float *  yu; /* n_out */
} sketch_token;

static size_t token_bytes(const ripple_sketch * s) {
    return pad64((size_t) s->n_pad + 8 * (size_t) s->n_out);
}

static void prepare(const ripple_sketch * s, const float * x, int64_t n_embd, uint8_t * mem, sketch_token * tk) {
    tk->xq = (int8_t *) mem;
    tk->yg = (float *) (mem + s->n_pad);
    tk->yu = tk->yg + s->n_out;
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
    float nx2 = 0.0f;
    o = 0;
    memset(tk->xq, 0, (size_t) s->n_pad);
    for (int64_t j = 0; j < n_embd; j++) {
        if (o < s->n_out && s->out[o] == j) {
            o++;
            continue;
        }
        const int v = (int) roundf(x[j] / d);
        tk->xq[j] = (int8_t) v;
        sx += v;
        nx2 += x[j] * x[j];
    }
    tk->nx2 = nx2;
    for (int32_t k = 0; k < s->n_out; k++) {
        tk->yu[k] = x[s->out[k]] * s->osu[k];
        tk->yg[k] = s->gated ? x[s->out[k]] * s->osg[k] : 0.0f;
    }
    tk->d = d;
    tk->sx3 = 3.0f * (float) sx;
}

static float act1(int kind, float g) {
    if (kind == RIPPLE_GLU_SILU) {
        return g / (1.0f + expf(-g));
    }
    if (kind == 2) { /* relu */
        return g > 0.0f ? g : 0.0f;
    }
    const float c = 0.7978845608028654f; /* sqrt(2 / pi): ggml's GELU, tanh form */
    return 0.5f * g * (1.0f + tanhf(c * g * (1.0f + 0.044715f * g * g)));
}

/* act'(g) */
static float dact1(int kind, float g) {
    if (kind == RIPPLE_GLU_SILU) {
        const float sg = 1.0f / (1.0f + expf(-g));
        return sg * (1.0f + g * (1.0f - sg));
    }
    if (kind == 2) {
        return g > 0.0f ? 1.0f : 0.0f;
    }
    const float c = 0.7978845608028654f, a = 0.044715f;
    const float t = tanhf(c * g * (1.0f + a * g * g));
    return 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * c * (1.0f + 3.0f * a * g * g);
}

#ifndef RIPPLE_SKETCH_VNNI
/* the score of one neuron from its estimates (gated: g, u; else u alone), vg / vu the variances of
 * the estimates (sketch.py's scores, the reference) */
static float score1(const ripple_sketch * s, float g, float u, float vg, float vu) {
    if (s->var_g == 0.0f && s->var_u == 0.0f) {
        return fabsf(s->gated ? act1(s->act, g) * u : act1(s->act, u));
    }
    if (!s->gated) {
        const float h = act1(s->act, u), du = dact1(s->act, u);
        return sqrtf(h * h + (du * du) * vu);
    }
    const float a = act1(s->act, g), da = dact1(s->act, g) * u, h = a * u;
    return sqrtf(h * h + ((da * da) * vg + (a * a) * vu));
}
#endif

#ifdef RIPPLE_SKETCH_VNNI
/* e^x, |relative error| < 2e-7 (Cephes' expf: n = round(x log2 e), a degree-6 polynomial of the
 * remainder, times 2^n); 0 and inf beyond the float range */
static inline __m512 v_exp(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* the estimates of a block's 16 rows: one 64-byte load holds 16 channels of every row, and each
 * dpbusd multiplies 4 of them with the token's 4 activations broadcast: the row sums build up in
 * the 16 lanes, with no horizontal reduction */
static inline __m512 estimate16(const ripple_sketch * s, const sketch_token * tk, const uint8_t * codes, const float * half,
                                const int8_t * ow, const float * y) {
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    const int64_t nc = s->n_pad / 16;
    for (int64_t c = 0; c < nc; c++) {
        const __m512i v = _mm512_load_si512((const void *) (codes + 64 * c));
        int32_t xd[4];
        memcpy(xd, tk->xq + 16 * c, 16);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(v, m3), _mm512_set1_epi32(xd[0]));
        a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(_mm512_srli_epi16(v, 2), m3), _mm512_set1_epi32(xd[1]));
        a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(_mm512_srli_epi16(v, 4), m3), _mm512_set1_epi32(xd[2]));
        a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(_mm512_srli_epi16(v, 6), m3), _mm512_set1_epi32(xd[3]));
    }
    const __m512 acc = _mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1));
    const __m512 q = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(2.0f), acc), _mm512_set1_ps(tk->sx3));
    __m512 e = _mm512_mul_ps(_mm512_mul_ps(_mm512_load_ps(half), _mm512_set1_ps(tk->d)), q);
    __m512 o = _mm512_setzero_ps();
    for (int32_t k = 0; k < s->n_out; k++) {
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) (ow + 16 * k))));
        o = _mm512_fmadd_ps(w, _mm512_set1_ps(y[k]), o);
    }
    return _mm512_add_ps(e, o);
}

static inline __m512 act16(int kind, __m512 g) {
    if (kind == RIPPLE_GLU_SILU) {
        return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), v_exp(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    }
    if (kind == 2) {
        return _mm512_max_ps(g, _mm512_setzero_ps());
    }
    float v[16];
    _mm512_storeu_ps(v, g);
    for (int l = 0; l < 16; l++) {
        v[l] = act1(kind, v[l]);
    }
    return _mm512_loadu_ps(v);
}

/* act(g) and act'(g) of 16 lanes */
static inline void act_dact16(int kind, __m512 g, __m512 * a, __m512 * da) {
    if (kind == RIPPLE_GLU_SILU) {
        const __m512 one = _mm512_set1_ps(1.0f);
        const __m512 den = _mm512_add_ps(one, v_exp(_mm512_sub_ps(_mm512_setzero_ps(), g)));
        const __m512 sg = _mm512_div_ps(one, den);
        *a = _mm512_div_ps(g, den);
        *da = _mm512_mul_ps(sg, _mm512_add_ps(one, _mm512_mul_ps(g, _mm512_sub_ps(one, sg))));
        return;
    }
    if (kind == 2) {
        *a = _mm512_max_ps(g, _mm512_setzero_ps());
        *da = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_set1_ps(1.0f));
        return;
    }
    float v[16], w[16];
    _mm512_storeu_ps(v, g);
    for (int l = 0; l < 16; l++) {
        w[l] = dact1(kind, v[l]);
        v[l] = act1(kind, v[l]);
    }
    *a = _mm512_loadu_ps(v);
    *da = _mm512_loadu_ps(w);
}

/* V D_i^2 |x_s|^2 of the block's rows: D = 2 x the half step */
static inline __m512 var16(float V, const float * half, float nx2) {
    const __m512 d = _mm512_mul_ps(_mm512_set1_ps(2.0f), _mm512_load_ps(half));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(V), _mm512_mul_ps(d, d)), _mm512_set1_ps(nx2));
}
#endif

/* scores of the rows of block `blk` for one token into sc[0..16) */
static void score_block(const ripple_sketch * s, const sketch_token * tk, int64_t blk, float * sc) {
    const int64_t nc = s->n_pad / 16, rows = (int64_t) s->n_blk * 16;
    const size_t cb = (size_t) blk * (size_t) nc * 64, ob = (size_t) blk * 16 * (size_t) s->n_out;
#ifdef RIPPLE_SKETCH_VNNI
    const __m512 u = estimate16(s, tk, s->cu + cb, s->hu + 16 * blk, s->ou + ob, tk->yu);
    __m512 r;
    if (s->var_g != 0.0f || s->var_u != 0.0f) {
        const __m512 vu = var16(s->var_u, s->hu + 16 * blk, tk->nx2);
        __m512 a, da;
        if (s->gated) {
            const __m512 g = estimate16(s, tk, s->cg + cb, s->hg + 16 * blk, s->og + ob, tk->yg);
            act_dact16(s->act, g, &a, &da);
            const __m512 vg = var16(s->var_g, s->hg + 16 * blk, tk->nx2);
            const __m512 h = _mm512_mul_ps(a, u), du = _mm512_mul_ps(da, u);
            const __m512 var = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(du, du), vg), _mm512_mul_ps(_mm512_mul_ps(a, a), vu));
            r = _mm512_sqrt_ps(_mm512_add_ps(_mm512_mul_ps(h, h), var));
        } else {
            act_dact16(s->act, u, &a, &da);
            r = _mm512_sqrt_ps(_mm512_add_ps(_mm512_mul_ps(a, a), _mm512_mul_ps(_mm512_mul_ps(da, da), vu)));
        }
    } else if (s->gated) {
        const __m512 g = estimate16(s, tk, s->cg + cb, s->hg + 16 * blk, s->og + ob, tk->yg);
        r = _mm512_mul_ps(act16(s->act, g), u);
    } else {
        r = act16(s->act, u);
    }
    _mm512_storeu_ps(sc, _mm512_abs_ps(r));
#else
    float est[2][16];
    for (int mi = 0; mi < 1 + s->gated; mi++) {
        const int up = mi == s->gated;
        const uint8_t * codes = (up ? s->cu : s->cg) + cb;
        const int8_t * ow = (up ? s->ou : s->og) + ob;
        const float * half = (up ? s->hu : s->hg) + 16 * blk;
        const float * y = up ? tk->yu : tk->yg;
#ifdef RIPPLE_SKETCH_AVX2
        /* per half of the block (8 rows, bytes 32h..32h+31 of each chunk): maddubs of the codes and
         * the token's activations into 16-bit sums (at most 4 x 762 per chunk, so 8 chunks fit),
         * widened to 32 bits every 8 chunks */
        const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
        for (int h = 0; h < 2; h++) {
            __m256i acc = _mm256_setzero_si256();
            for (int64_t c0 = 0; c0 < nc; c0 += 8) {
                __m256i a16 = _mm256_setzero_si256();
                const int64_t c1 = c0 + 8 < nc ? c0 + 8 : nc;
                for (int64_t c = c0; c < c1; c++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *) (codes + 64 * c + 32 * h));
                    int32_t xd[4];
                    memcpy(xd, tk->xq + 16 * c, 16);
                    a16 = _mm256_add_epi16(a16, _mm256_maddubs_epi16(_mm256_and_si256(v, m3), _mm256_set1_epi32(xd[0])));
                    a16 = _mm256_add_epi16(a16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 2), m3),
                                                                     _mm256_set1_epi32(xd[1])));
                    a16 = _mm256_add_epi16(a16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m3),
                                                                     _mm256_set1_epi32(xd[2])));
                    a16 = _mm256_add_epi16(a16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 6), m3),
                                                                     _mm256_set1_epi32(xd[3])));
                }
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(a16, ones));
            }
            const __m256 q = _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(2.0f), _mm256_cvtepi32_ps(acc)), _mm256_set1_ps(tk->sx3));
            __m256 e = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(half + 8 * h), _mm256_set1_ps(tk->d)), q);
            __m256 o = _mm256_setzero_ps();
            for (int32_t k = 0; k < s->n_out; k++) {
                int64_t w8;
                memcpy(&w8, ow + 16 * k + 8 * h, 8);
                const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(w8)));
                o = _mm256_fmadd_ps(w, _mm256_set1_ps(y[k]), o);
            }
            _mm256_storeu_ps(est[mi] + 8 * h, _mm256_add_ps(e, o));
        }
#else
        for (int l = 0; l < 16; l++) {
            int32_t acc = 0;
            for (int64_t c = 0; c < nc; c++) {
                for (int b = 0; b < 4; b++) {
                    const uint8_t v = codes[64 * c + 4 * l + b];
                    for (int sh = 0; sh < 4; sh++) {
                        acc += (int32_t) ((v >> (2 * sh)) & 3) * (int32_t) tk->xq[16 * c + 4 * sh + b];
                    }
                }
            }
            float o = 0.0f;
            for (int32_t k = 0; k < s->n_out; k++) {
                o += (float) ow[16 * k + l] * y[k];
            }
            est[mi][l] = (half[l] * tk->d) * (2.0f * (float) acc - tk->sx3) + o;
        }
#endif
    }
    for (int l = 0; l < 16; l++) {
        const float dg = 2.0f * (s->gated ? s->hg[16 * blk + l] : 0.0f), du = 2.0f * s->hu[16 * blk + l];
        sc[l] = score1(s, est[0][l], est[s->gated][l], (s->var_g * (dg * dg)) * tk->nx2, (s->var_u * (du * du)) * tk->nx2);
    }
#endif
    (void) rows;
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
    float *                    scores;  /* optional: n_tokens x n_ff (needed by the top-k rule) */
    uint8_t *                  scratch; /* token_bytes per token (one token: per thread) */
} sketch_job;

/* tokens split among threads, each thread's tokens prepared first and then scored block by block
 * (a block's codes read once for them all); a single token's blocks split among the threads
 * instead (each thread prepares its own copy of the token: no barrier) */
static void sketch_task(void * v, int ith, int nth) {
    const sketch_job * j = v;
    const ripple_sketch * s = &j->p->sk;
    const int64_t n_embd = j->L->d.n_embd, n_ff = j->L->d.n_ff, T = j->src1->ne[1], n_blk = s->n_blk;
    const int split_tokens = T > 1 || nth == 1;
    const int64_t t0 = split_tokens ? T * ith / nth : 0, t1 = split_tokens ? T * (ith + 1) / nth : 1;
    const int64_t b0 = split_tokens ? 0 : n_blk * ith / nth, b1 = split_tokens ? n_blk : n_blk * (ith + 1) / nth;
    const size_t each = token_bytes(s);
    uint8_t * mine = j->scratch + (size_t) (split_tokens ? t0 : ith) * each;
    if (t1 <= t0) {
        return;
    }
    sketch_token tks[64];
    const float thr = j->p->threshold;
    for (int64_t c0 = t0; c0 < t1; c0 += 64) { /* up to 64 tokens at a time */
        const int64_t c1 = c0 + 64 < t1 ? c0 + 64 : t1;
        for (int64_t t = c0; t < c1; t++) {
            const float * x = (const float *) ((const char *) j->src1->data + t * j->src1->nb[1]);
            prepare(s, x, n_embd, mine + (size_t) (t - t0) * each, &tks[t - c0]);
        }
        for (int64_t blk = b0; blk < b1; blk++) {
            const int64_t i0 = 16 * blk, nl = n_ff - i0 < 16 ? n_ff - i0 : 16;
            for (int64_t t = c0; t < c1; t++) {
                float sc[16];
                score_block(s, &tks[t - c0], blk, sc);
                uint8_t * m = j->tok + t * n_ff + i0;
                for (int64_t l = 0; l < nl; l++) {
                    m[l] = sc[l] > thr;
                }
                if (j->scores) {
                    memcpy(j->scores + t * n_ff + i0, sc, sizeof(float) * (size_t) nl);
                }
            }
        }
    }
}

void ripple_sketch_predict(ripple_pool * pool, int n_threads, const ripple_predictor * p, const ripple_layer * L,
                           const struct ggml_tensor * src1, uint8_t * tok, float * scores) {
    const int64_t n_ff = L->d.n_ff, T = src1->ne[1];
    const int nth = n_threads > 1 ? n_threads : 1;
    const size_t each = token_bytes(&p->sk);
    const double topk = g_topk;
    float * own = topk > 0 && !scores ? malloc(sizeof(float) * (size_t) (n_ff * T)) : NULL;
    uint8_t * scratch = aligned_alloc(64, each * (size_t) (T > nth ? T : nth));
    sketch_job j = { p, L, src1, tok, scores ? scores : own, scratch };
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
    free(p.sk.mem);
    return 0;
}
