/* Activation capture for the offline stage: a ggml scheduler eval callback (llama.cpp's
 * cb_eval) that copies, per layer, the input of the ffn_up matmul (the FFN input) and the input of
 * the ffn_down matmul (the post-activation FFN vector) into buffers the Python profiler owns. */
#include "ripple.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static int parse_block(const char * name, const char * kind) {
    int n = -1, len = 0;
    char k[8] = { 0 };
    if (sscanf(name, "blk.%d.ffn_%7[a-z].weight%n", &n, k, &len) != 2 || name[len] != 0 || strcmp(k, kind) != 0) {
        return -1;
    }
    return n;
}

/* which buffer a node fills: 0 = FFN input, 1 = post-activation, 2 = gate pre-activation; -1 none */
static int capture_target(const ripple_capture * c, const struct ggml_tensor * t, int * block) {
    if (t->op != GGML_OP_MUL_MAT || !t->src[0] || !t->src[1]) {
        return -1;
    }
    int b = parse_block(t->src[0]->name, "up");
    if (b >= 0 && b < c->n_blocks && c->x[b]) {
        *block = b;
        return 0;
    }
    b = parse_block(t->src[0]->name, "down");
    if (b >= 0 && b < c->n_blocks && c->h[b]) {
        *block = b;
        return 1;
    }
    b = parse_block(t->src[0]->name, "gate");
    if (b >= 0 && b < c->n_blocks && c->g && c->g[b]) {
        *block = b;
        return 2;
    }
    return -1;
}

bool ripple_capture_eval(void * tensor, bool ask, void * user_data) {
    ripple_capture * c = user_data;
    const struct ggml_tensor * t = tensor;
    int block = -1;
    int which = capture_target(c, t, &block);
    if (ask) {
        return which >= 0;
    }
    if (which < 0) {
        return true;
    }
    /* inputs of the up/down matmuls; for the gate, its output */
    const struct ggml_tensor * src = which == 2 ? t : t->src[1];
    const int64_t len = which == 0 ? c->x_len[block] : which == 1 ? c->h_len[block] : c->g_len[block];
    const int64_t rows = src->ne[1] * src->ne[2] * src->ne[3];
    if (src->type != GGML_TYPE_F32 || src->ne[0] != len || rows > c->max_tokens) {
        c->errors++;
        return true;
    }
    float * dst = which == 0 ? c->x[block] : which == 1 ? c->h[block] : c->g[block];
    if (ggml_is_contiguous(src)) {
        ggml_backend_tensor_get(src, dst, 0, (size_t) (rows * len) * sizeof(float));
    } else {
        for (int64_t r = 0; r < src->ne[1]; r++) {
            ggml_backend_tensor_get(src, dst + r * len, (size_t) r * src->nb[1], (size_t) len * sizeof(float));
        }
    }
    (which == 0 ? c->x_rows : which == 1 ? c->h_rows : c->g_rows)[block] = (int32_t) rows;
    return true;
}

/* Oracle sparsity for measurement. Rule "gate" (CATS): after each ffn_gate matmul, zero the gate
 * pre-activations whose activation is at or below the layer's threshold, so act(0) * up = 0 drops
 * the neuron. Rule "magnitude": zero the GLU outputs (the down matmul's input) at or below it. */
static int sparsify_block(const ripple_sparsify * s, const struct ggml_tensor * t) {
    if (s->rule == RIPPLE_RULE_GATE) {
        return t->op == GGML_OP_MUL_MAT && t->src[0] ? parse_block(t->src[0]->name, "gate") : -1;
    }
    /* the GLU node: its first input is the gate matmul (split form) */
    const struct ggml_tensor * g = t->src[0];
    if (t->op != GGML_OP_GLU || !g || g->op != GGML_OP_MUL_MAT || !g->src[0]) {
        return -1;
    }
    return parse_block(g->src[0]->name, "gate");
}

bool ripple_sparsify_eval(void * tensor, bool ask, void * user_data) {
    ripple_sparsify * s = user_data;
    struct ggml_tensor * t = tensor;
    int b = sparsify_block(s, t);
    if (b < 0 || b >= s->n_blocks || s->thresholds[b] < 0) {
        return !ask;
    }
    if (ask) {
        return true;
    }
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t) || !t->buffer || !ggml_backend_buffer_is_host(t->buffer)) {
        s->errors++;
        return true;
    }
    float * v = t->data;
    const int64_t n = ggml_nelements(t);
    const float thr = s->thresholds[b];
    int64_t zeroed = 0;
    for (int64_t i = 0; i < n; i++) {
        const float x = v[i];
        const float a = s->rule != RIPPLE_RULE_GATE ? x
                      : s->activation == RIPPLE_GLU_SILU ? x / (1.0f + expf(-x))
                                           : 0.5f * x * (1.0f + tanhf(0.7978845608f * (x + 0.044715f * x * x * x)));
        if (fabsf(a) <= thr) {
            v[i] = 0.0f;
            zeroed++;
        }
    }
    s->zeroed += zeroed;
    s->total += n;
    return true;
}
