"""Convert a GGUF model into a ripple-packed GGUF (docs/FORMAT.md).

The converter validates the source, plans one :class:`~ripple_gguf.format.RippleLayer` per FFN
layer (types, placement order) and hands :func:`ripple_gguf.format.write_ripple_gguf` a function
that builds one layer's bundles at a time from the source memmap. :func:`make_layer_bundles` is
also what ``verify`` uses to re-derive the region from a packed file's own standard tensors.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from typing import Mapping

import numpy as np
from gguf.constants import GGMLQuantizationType as T

from ripple_gguf import _native as rows  # ggml's own row conversions
from ripple_gguf import constants as C
from ripple_gguf.atomic import atomic_output, check_destination
from ripple_gguf.format import (FLOAT_TYPES, SPLIT_TYPES, SUPPORTED_FFN_TYPES, GGUFHeader,
                                RippleFile, RippleFormatError, RippleLayer, SourceInfo, block_size,
                                can_split, ffn_layers_of, read_gguf_header, row_size, split_planes,
                                type_name, write_ripple_gguf)

DOWN_TYPES = {"auto": None, "split": None, "same": None, "f16": T.F16, "f32": T.F32, "q8_0": T.Q8_0}
# Measured on SmolLM2-135M Q4_1 (docs/BENCHMARKS.md): down columns re-quantized to Q4_1 along n_embd
# raise perplexity by 8.6% when the columns are what the runtime multiplies; Q8_0 columns by 0.65%;
# split columns (the source's own values, scales in a table) are exact and smaller than either.
# "auto" keeps float sources as they are and splits every quantized type (legacy and k-quants:
# bundles never larger than the source's bytes per neuron); Q8_0 columns only where a layer cannot
# be split (n_embd not a multiple of 8).
_AUTO_KEEPS = (T.F32, T.F16, T.BF16)
PLACEMENTS = ("original",)

# llama.cpp's fallback (llama-quant.cpp) when a row is not a whole number of 256-value super-blocks.
_K_FALLBACK = {T.Q2_K: T.IQ4_NL, T.Q3_K: T.IQ4_NL, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}




def to_f32(ggml_type: int, raw: np.ndarray, nrows: int, n_per_row: int) -> np.ndarray:
    if ggml_type == T.F32:
        return raw.view("<f4").reshape(nrows, n_per_row)
    if ggml_type == T.F16:
        return raw.view("<f2").astype(np.float32).reshape(nrows, n_per_row)
    if ggml_type == T.BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(nrows, n_per_row)
    return rows.dequantize(int(ggml_type), np.ascontiguousarray(raw).reshape(-1), nrows, n_per_row)


def from_f32(ggml_type: int, values: np.ndarray) -> np.ndarray:
    if ggml_type == T.F32:
        v = np.ascontiguousarray(values, dtype="<f4")
        return v.view(np.uint8).reshape(v.shape[0], -1)
    return rows.quantize(int(ggml_type), values)


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
    return rows.split_rows(src_type, raw, n_embd, n_ff)


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


# --- planning ---------------------------------------------------------------------------------

def resolve_down(requested: str, down_src_type: int, n_ff: int, n_embd: int) -> tuple[int, int]:
    """(down_type, down_layout) for a ``--down-type`` choice: "split" and "auto" split the
    columns when the source type allows it (``SPLIT_TYPES``), the other choices store columns."""
    if requested not in DOWN_TYPES:
        raise ValueError(f"unknown down type {requested!r} (choose from {', '.join(DOWN_TYPES)})")
    if requested in ("auto", "split") and can_split(down_src_type, n_ff, n_embd):
        return int(down_src_type), C.DOWN_SPLIT
    return resolve_down_type("auto" if requested == "split" else requested, down_src_type, n_embd), C.DOWN_COLUMN


def resolve_down_type(requested: str, down_src_type: int, n_embd: int) -> int:
    """Type of re-quantized/transposed down columns (column layout)."""
    if requested not in DOWN_TYPES:
        raise ValueError(f"unknown down type {requested!r} (choose from {', '.join(DOWN_TYPES)})")
    if requested in ("auto", "split"):
        t = T(down_src_type) if T(down_src_type) in _AUTO_KEEPS else T.Q8_0
    else:
        t = T(down_src_type) if DOWN_TYPES[requested] is None else DOWN_TYPES[requested]
    if n_embd % block_size(t):
        t = _K_FALLBACK.get(t, t)
        if n_embd % block_size(t):
            t = T.F16
    return int(t)


def validate_source(hdr: GGUFHeader) -> list[int]:
    """Raise RippleFormatError unless ``hdr`` is a dense-FFN GGUF we can pack; return its FFN blocks."""
    p = hdr.path
    if C.Keys.FORMAT_VERSION in hdr.kv:
        raise RippleFormatError(p, "already ripple-packed (has ripple.format_version); convert the original GGUF")
    exps = [t.name for t in hdr.tensors if t.name.startswith("blk.") and "_exps" in t.name]
    if exps:
        raise RippleFormatError(p, f"mixture-of-experts tensors ({exps[0]}, ...) are not supported")
    blocks = ffn_layers_of(hdr)
    if not blocks:
        raise RippleFormatError(p, "no FFN layers (no blk.N.ffn_up/ffn_down.weight tensors)")
    n_embd = None
    for b in blocks:
        ts = {k: hdr.tensor(C.ffn_tensor_name(b, k)) for k in C.FFN_KINDS}
        for k in ("up", "down"):
            if ts[k] is None:
                raise RippleFormatError(p, f"layer {b}: missing {C.ffn_tensor_name(b, k)}")
        for k, t in ts.items():
            if t is not None and t.type not in SUPPORTED_FFN_TYPES:
                raise RippleFormatError(p, f"{t.name}: tensor type {type_name(t.type)} is not supported "
                                           f"(supported: {', '.join(type_name(x) for x in sorted(SUPPORTED_FFN_TYPES))})")
        up, down = ts["up"], ts["down"]
        if ts["gate"] is None and len(up.shape) == 2 and len(down.shape) == 2 and \
                up.shape[0] == down.shape[1] and up.shape[1] == 2 * down.shape[0]:
            raise RippleFormatError(p, f"layer {b}: {up.name} holds gate and up fused ({up.shape[1]} rows for "
                                       f"{down.shape[0]} neurons, e.g. phi3): not supported")
        if len(up.shape) != 2 or len(down.shape) != 2 or down.shape != up.shape[::-1] or \
                (ts["gate"] is not None and ts["gate"].shape != up.shape):
            raise RippleFormatError(p, f"layer {b}: inconsistent FFN shapes gate={ts['gate'] and list(ts['gate'].shape)} "
                                       f"up={list(up.shape)} down={list(down.shape)}")
        if n_embd is not None and up.shape[0] != n_embd:
            raise RippleFormatError(p, f"layer {b}: n_embd {up.shape[0]} differs from {n_embd} of earlier layers")
        n_embd = up.shape[0]
    return blocks


def plan_layers(hdr: GGUFHeader, blocks: list[int], *, down_type: str,
                orders: Mapping[int, np.ndarray] | None) -> list[RippleLayer]:
    layers = []
    for b in blocks:
        gate = hdr.tensor(C.ffn_tensor_name(b, "gate"))
        up, down = hdr.tensor(C.ffn_tensor_name(b, "up")), hdr.tensor(C.ffn_tensor_name(b, "down"))
        n_embd, n_ff = up.shape
        order = np.arange(n_ff, dtype=np.int32) if orders is None or b not in orders else \
            np.asarray(orders[b], dtype=np.int32)
        if order.shape != (n_ff,) or not np.array_equal(np.sort(order), np.arange(n_ff)):
            raise ValueError(f"placement order of layer {b} is not a permutation of {n_ff} neurons")
        dt, layout = resolve_down(down_type, down.type, n_ff, n_embd)
        layers.append(RippleLayer(
            block=b, n_ff=n_ff, n_embd=n_embd, gate_type=gate.type if gate else C.NO_GATE, up_type=up.type,
            down_type=dt, down_src_type=down.type, order=order, down_layout=layout))
    return layers


def sha256_file(path: str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def convert(src: os.PathLike | str, dst: os.PathLike | str, *, placement: str = "original",
            orders: Mapping[int, np.ndarray] | None = None, down_type: str = "auto",
            offline: "OfflineConfig | OfflineResult | None" = None, quiet: bool = False,
            stage_seconds: dict | None = None) -> RippleFile:
    """Pack ``src`` into ``dst``.

    Without ``offline`` the bundles keep the original order (or ``orders``: block -> permutation)
    and the file carries no predictors. With an :class:`~ripple_gguf.offline.OfflineConfig` the
    source is profiled first: its placement (``offline.placement``), activity thresholds,
    predictors and held-out quality figures go into the file. An
    :class:`~ripple_gguf.offline.OfflineResult` already computed (``offline.run``, then
    ``result.for_placement(method)``) is packed as it is, without profiling again. ``stage_seconds``,
    when given, is filled with the time of each stage."""
    src, dst = os.fspath(src), os.fspath(dst)
    times = stage_seconds if stage_seconds is not None else {}
    if offline is None and placement not in PLACEMENTS and orders is None:
        raise ValueError(f"placement {placement!r} needs profiling (an OfflineConfig); without it: "
                         f"{', '.join(PLACEMENTS)}")
    check_destination(dst, [src])  # before the (long) offline stage; atomic_output checks again
    hdr = read_gguf_header(src)
    blocks = validate_source(hdr)
    data_offline = None
    if offline is not None:
        from ripple_gguf.offline import OfflineResult, run as run_offline

        if isinstance(offline, OfflineResult):
            result = offline
        else:
            result = run_offline(src, offline)
            times.update(result.stage_seconds)
        orders, data_offline = result.orders, result.data
        placement = data_offline.placement_quality.get("method", placement)
    t0 = time.perf_counter()
    layers = plan_layers(hdr, blocks, down_type=down_type, orders=orders)
    source = SourceInfo(os.path.basename(src), sha256_file(src), hdr.file_size)
    src_offsets = {}
    for l in layers:
        t = [hdr.tensor(C.ffn_tensor_name(l.block, k)) for k in C.FFN_KINDS]
        src_offsets[l.block] = tuple(hdr.data_offset + x.offset if x is not None else 0 for x in t)

    def progress(it):
        from tqdm import tqdm
        return tqdm(it, desc="ripple", unit="layer", disable=quiet or not sys.stderr.isatty())

    data = np.memmap(src, dtype=np.uint8, mode="r")
    try:
        with atomic_output(dst, sources=[src]) as tmp:
            write_ripple_gguf(tmp, hdr, layers, source=source, placement_method=placement, progress=progress,
                              offline=data_offline,
                              make_bundles=lambda l: make_layer_bundles(data, l, src_offsets[l.block]))
            # the converter checks its own output before the rename: anything raised here leaves
            # dst untouched and removes the temporary
            if data_offline is not None and data_offline.predictors:
                from ripple_gguf.quality import check_output

                checked = check_output(tmp, data_offline, quiet=quiet, stage_seconds=times)
                if checked is not data_offline:  # the same file with exact as its default mode
                    write_ripple_gguf(tmp, hdr, layers, source=source, placement_method=placement,
                                      progress=progress, offline=checked,
                                      make_bundles=lambda l: make_layer_bundles(data, l, src_offsets[l.block]))
        times["write"] = time.perf_counter() - t0
    finally:
        del data
    return RippleFile.open(dst)
