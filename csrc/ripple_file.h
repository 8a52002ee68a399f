/* The reader of ripple-packed files (ripple_file.c), through ggml's gguf API: every check of
 * docs/FORMAT.md section 5, every error naming the file and the problem. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "ripple.h"

struct gguf_context;

typedef struct ripple_file {
    char *                path;
    struct gguf_context * g;
    int                   fd;
    uint64_t              file_size;      /* ripple.file_size (= the file's size once checked) */
    uint64_t              region_offset, region_size;
    uint64_t              ck_offset, ck_size, ck_block; /* absolute offset of the checksum table */
    int32_t               n_layers;
    ripple_layer_desc *   descs;
    int32_t *             order;          /* flat, as in the file */
    uint32_t *            crc;            /* the checksum table, once read */
    uint8_t **            blobs;          /* per layer: down table then predictor (load_blobs) */
    int                   default_mode;   /* RIPPLE_MODE_EXACT / SPARSE */
    char                  default_mode_reason[256];
    int                   expected_tensors;
    uint32_t              version;        /* ripple.format_version */
} ripple_file;

/* 1 ripple-packed (*out set, its metadata checked), 0 not ripple, -1 err ("<path>: <problem>") */
int  ripple_file_open(const char * path, ripple_file ** out, char * err, size_t err_len);
/* the load-time checks: file size, region header and footer, sampled bundles, checksum table and
 * header digests */
int  ripple_file_check_quick(ripple_file * f, char * err, size_t err_len);
/* the down scale tables and predictor blobs read and checked (descs point at them) */
int  ripple_file_load_blobs(ripple_file * f, char * err, size_t err_len);
/* open + check_quick (+ load_blobs with blobs): 1 (*out set), 0 not ripple, -1 err */
int  ripple_file_read(const char * path, int blobs, ripple_file ** out, char * err, size_t err_len);
void ripple_file_free(ripple_file * f);
