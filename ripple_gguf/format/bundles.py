"""A bundle's bytes (docs/FORMAT.md section 3): one FFN neuron's gate row, up row and down column
back to back, built from a file's standard FFN tensors. The converter packs these; the reader's
full verification derives them again from a packed file's own tensors. Values are converted by
ggml itself (the native library's row conversions and split-type unpacking)."""
from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as T

from .. import binding
from .layout import FLOAT_TYPES, SPLIT_TYPES, RippleLayer, split_planes


def to_f32(ggml_type: int, raw: np.ndarray, nrows: int, n_per_row: int) -> np.ndarray:
    """``nrows`` rows of ``n_per_row`` values of ``ggml_type`` as f32: ggml's own to_float of the
    type (F16 and BF16 included), F32 a view of ``raw``."""
    if ggml_type == T.F32:
        return raw.view("<f4").reshape(nrows, n_per_row)
    return binding.dequantize(int(ggml_type), np.ascontiguousarray(raw).reshape(-1), nrows, n_per_row)


def from_f32(ggml_type: int, values: np.ndarray) -> np.ndarray:
    if ggml_type == T.F32:
        v = np.ascontiguousarray(values, dtype="<f4")
        return v.view(np.uint8).reshape(v.shape[0], -1)
    return binding.quantize(int(ggml_type), values)


def down_columns(raw: np.ndarray, src_type: int, dst_type: int, n_ff: int, n_embd: int) -> np.ndarray:
    """Rows of the transposed ffn_down (uint8, n_ff x row_size(dst_type, n_embd)).

    ``raw`` is the ffn_down data: n_embd rows of n_ff values. Float columns that keep their type are
    transposed element by element (exact); everything else goes dequantize -> transpose -> quantize.
    """
    if src_type == dst_type and src_type in FLOAT_TYPES:
        elem = "<f4" if src_type == T.F32 else "<u2"
        t = np.ascontiguousarray(raw.view(elem).reshape(n_embd, n_ff).T)
        return t.view(np.uint8).reshape(n_ff, -1)
    return from_f32(dst_type, np.ascontiguousarray(to_f32(src_type, raw, n_embd, n_ff).T))


def split_values(raw: np.ndarray, src_type: int, n_ff: int, n_embd: int) -> tuple[np.ndarray, np.ndarray]:
    """The integers and group scales of ffn_down (``raw``: n_embd rows of n_ff values of a
    ``SPLIT_TYPES`` type): q (uint8, n_embd x n_ff; Q8_0: the int8's bytes) and f32 (scale, min)
    per row and group (n_embd x n_ff/group x 2), such that value = scale * (q - offset) + min,
    ggml's value bit for bit (the native library's unpacking, csrc/ripple_split.c)."""
    return binding.split_rows(src_type, raw, n_embd, n_ff)


def split_down(raw: np.ndarray, src_type: int, n_ff: int, n_embd: int) -> tuple[np.ndarray, bytes]:
    """Split down columns (uint8, n_ff x split_row_size) and the layer's scale table (f32
    n_ff/group x n_embd x 2: (scale, min) of row r for the group holding neuron i at
    [i // group, r]).

    Column i holds value r = 0..n_embd-1 of neuron i as the source stores it: 8 bits (int8), or
    the planes of ``split_planes`` one after the other, each holding the next bits of every value,
    value r at bit width*(r % (8/width)) of byte r/(8/width) of the plane."""
    q, sm = split_values(raw, src_type, n_ff, n_embd)
    qt = np.ascontiguousarray(q.T)  # n_ff x n_embd
    parts, shift = [], 0
    for width in split_planes(SPLIT_TYPES[T(src_type)].bits):
        if width == 8:
            parts.append(qt)
            break
        per = 8 // width
        v = ((qt >> shift) & ((1 << width) - 1)).reshape(n_ff, n_embd // per, per)
        parts.append(np.bitwise_or.reduce(v << (width * np.arange(per, dtype=np.uint8)), axis=2).astype(np.uint8))
        shift += width
    table = np.ascontiguousarray(sm.transpose(1, 0, 2), dtype="<f4")
    return np.ascontiguousarray(np.concatenate(parts, axis=1)), table.tobytes()


def make_layer_bundles(data: np.ndarray, layer: RippleLayer,
                       offsets: tuple[int, int, int] | None = None) -> tuple[np.ndarray, bytes]:
    """Bundles of one layer in neuron-id order (uint8, n_ff x bundle_size) and its down scale
    table (b"" unless the layer's down columns are split).

    ``data`` maps a whole file; ``offsets`` = absolute (gate, up, down) data offsets in it
    (default: the layer's own, i.e. the packed file's standard tensors).
    """
    go, uo, do = offsets if offsets is not None else (layer.gate_offset, layer.up_offset, layer.down_offset)
    n_ff, g, u = layer.n_ff, layer.gate_row_size, layer.up_row_size
    out = np.empty((n_ff, layer.bundle_size), dtype=np.uint8)
    if layer.gated:
        out[:, :g] = data[go:go + n_ff * g].reshape(n_ff, g)
    out[:, g:g + u] = data[uo:uo + n_ff * u].reshape(n_ff, u)
    down = data[do:do + layer.n_embd * layer.down_src_row_size]
    if layer.split:
        out[:, g + u:], table = split_down(down, layer.down_src_type, n_ff, layer.n_embd)
        return out, table
    out[:, g + u:] = down_columns(down, layer.down_src_type, layer.down_type, n_ff, layer.n_embd)
    return out, b""
