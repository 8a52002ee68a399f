/* A layer of a ripple-packed file as the runtime holds it: what the registry fills (ripple_model.c)
 * and the cache, the predictors, the reads and the kernels use. Types only. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "ripple.h"

/* the three FFN weights of a layer, in bundle order */
enum ripple_kind { RIPPLE_GATE = 0, RIPPLE_UP = 1, RIPPLE_DOWN = 2 };

struct ripple_predictor;

typedef struct ripple_layer {
    ripple_layer_desc d;
    int32_t * order;    /* position -> neuron */
    int32_t * pos_of;   /* neuron -> position */
    struct ripple_predictor * pred; /* loaded at its first use (ripple_layer_predictor); NULL = not yet, or none */
    int       has_pred;          /* the file has a predictor for this layer */
    size_t    gate_row; /* bytes of each part of a bundle */
    size_t    up_row;
    size_t    down_row;
    void *    down_tab;  /* split down columns: per group of down_group neurons its n_embd scales, then
                            (down_has_min) its n_embd minimums, f16 (down_tab_f16) or f32; loaded at
                            first use (ripple_layer_down_table); NULL for column layouts */
    int       down_bits; /* split (ripple_split_info): bits per stored value (2, 3, 4, 5, 6 or 8); 0: column layout */
    int       down_qoff; /* split: offset subtracted from the stored integer */
    int       down_group;   /* split: neurons per table entry (32, or 16 for Q2_K/Q3_K/Q6_K) */
    int       down_has_min; /* split: the entries carry a minimum (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) */
    int       down_tab_f16; /* split: the table holds f16 values (every entry is one exactly), else f32 */
    uint64_t  dense_bytes; /* the layer's standard ffn_gate/up/down tensors: what a dense FFN reads */
    /* exact mode without direct_io: the standard ffn_gate/up/down tensors mapped read-only (page
     * cache, as stock llama.cpp maps its weights), and the file's (size, mtime, ctime) when they last
     * passed their checksums: while the file keeps them they are not checked again */
    void *    std_map[3];
    size_t    std_map_len[3];
    size_t    std_map_skip[3]; /* bytes from a mapping's start to the tensor (page alignment) */
    int       std_checked;
    int64_t   std_stamp[5];
    uint8_t * freq;            /* n_ff, position order: how often needed (255 = every token); NULL = unknown */
    uint32_t * bundle_crc;     /* n_ff, position order */
    uint32_t * tensor_crc[3];  /* per enum ripple_kind: one per crc_block bytes of the standard tensor */
    uint64_t  tensor_bytes[3]; /* bytes of the standard tensors (gate: 0 when ungated) */
} ripple_layer;
