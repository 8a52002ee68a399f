/* Reads checked against the file's checksum table (ripple_verify.c, docs/FORMAT.md 2b). Nothing is
 * checked while ripple_set_verify_reads is off. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "ripple_model.h"

/* The bundles at positions pos[0..n) of a layer, held at buf + p * bundle_size; 0, or -1 with the
 * error (file, offset) set. */
int ripple_verify_bundles(const ripple_model * m, int layer, const uint8_t * buf, const int64_t * pos, int64_t n);
/* Bytes [off, off + len) of a layer's standard tensor `kind` held in buf; off a multiple of the
 * checksum block, len whole blocks or up to the end of the tensor. */
int ripple_verify_tensor(const ripple_model * m, int layer, int kind, const uint8_t * buf, uint64_t off, uint64_t len);
/* Read size bytes of the standard tensor behind a binding, at offset, into dst (checked). */
int ripple_read_tensor(const ripple_binding * b, void * dst, size_t offset, size_t size);
