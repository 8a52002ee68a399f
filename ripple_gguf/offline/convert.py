"""Convert a GGUF model into a ripple-packed GGUF (docs/FORMAT.md).

The converter validates the source, plans one :class:`~ripple_gguf.format.layout.RippleLayer` per
FFN layer (types, placement order) and hands :func:`ripple_gguf.format.writer.write_ripple_gguf` a
function that builds one layer's bundles at a time from the source memmap
(:func:`ripple_gguf.format.bundles.make_layer_bundles`, also what ``verify`` uses to re-derive the
region from a packed file's own standard tensors).
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Mapping

import numpy as np
from gguf.constants import GGMLQuantizationType as T

from ..atomic import atomic_output, check_destination
from ..format import constants as C
from ..format.bundles import make_layer_bundles
from ..format.layout import (SUPPORTED_FFN_TYPES, GGUFHeader, RippleFormatError, RippleLayer, SourceInfo,
                             block_size, can_split, ffn_layers_of, type_name)
from ..format.reader import RippleFile, read_gguf_header
from ..format.writer import write_ripple_gguf

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
    and the file carries no predictors. With an
    :class:`~ripple_gguf.offline.pipeline.OfflineConfig` the source is profiled first: its
    placement (``offline.placement``), activity thresholds, predictors and held-out quality figures
    go into the file. An :class:`~ripple_gguf.offline.pipeline.OfflineResult` already computed
    (``pipeline.run``, then ``result.for_placement(method)``) is packed as it is, without profiling
    again. ``stage_seconds``, when given, is filled with the time of each stage."""
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
        from .pipeline import OfflineResult, run as run_offline

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
        from ..progress import progress as shown

        return shown(it, desc="write", unit="layer", quiet=quiet)

    data = np.memmap(src, dtype=np.uint8, mode="r")
    try:
        with atomic_output(dst, sources=[src]) as tmp:
            write_ripple_gguf(tmp, hdr, layers, source=source, placement_method=placement, progress=progress,
                              offline=data_offline,
                              make_bundles=lambda l: make_layer_bundles(data, l, src_offsets[l.block]))
            # the converter checks its own output before the rename: anything raised here leaves
            # dst untouched and removes the temporary
            if data_offline is not None and data_offline.predictors:
                from .quality import check_output

                checked = check_output(tmp, data_offline, quiet=quiet, stage_seconds=times)
                if checked is not data_offline:  # the same file with exact as its default mode
                    write_ripple_gguf(tmp, hdr, layers, source=source, placement_method=placement,
                                      progress=progress, offline=checked,
                                      make_bundles=lambda l: make_layer_bundles(data, l, src_offsets[l.block]))
        times["write"] = time.perf_counter() - t0
    finally:
        del data
    return RippleFile.open(dst)


def reusable(packed: Path, source_sha256: str) -> bool:
    """True if ``packed`` is an intact ripple file converted from the source with this sha256 by
    the full offline stage (predictors present)."""
    if not packed.exists():
        return False
    try:
        rf = RippleFile.open(packed)
        rf.check_quick()
    except (RippleFormatError, OSError):
        return False
    if rf.source.sha256 != source_sha256 or not any(l.predictor_size for l in rf.layers):
        return False
    if any(l.frequency is None for l in rf.layers):  # packed before bundle frequencies were recorded
        return False
    if rf.metadata.get(C.Keys.TOOL_VERSION) != f"{C.TOOL_NAME} {C.TOOL_VERSION}":  # an older converter's checks
        return False
    # packed with today's default offline settings (older defaults: convert again)
    from .pipeline import OfflineConfig

    cfg, pm, sp, md = OfflineConfig(), rf.predictor_metrics or {}, rf.sparsity or {}, rf.metadata
    if md.get(C.Keys.Predictor.KIND, "lowrank") != cfg.predictor:
        return False
    if cfg.predictor == "sketch":
        return (abs(float(md.get(C.Keys.Predictor.SKETCH_BUDGET, -1)) - cfg.sketch_budget) < 1e-4
                and int(md.get(C.Keys.Predictor.SKETCH_OUTLIERS, -1)) == cfg.sketch_outliers
                and abs(float(pm.get("sketch_uncertainty", 0.0)) - cfg.sketch_uncertainty) < 1e-6)
    fit = pm.get("fit_fraction")
    return (abs(float(sp.get("active_fraction", -1)) - cfg.active_fraction) < 1e-4
            and (fit is None if cfg.predictor_fit_fraction is None
                 else fit is not None and abs(float(fit) - cfg.predictor_fit_fraction) < 1e-4))
