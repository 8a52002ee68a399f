"""The reader of ripple-packed GGUFs (docs/FORMAT.md) and of any GGUF's header.

:func:`read_gguf_header` parses only the GGUF header (metadata and tensor infos) with plain reads;
:class:`RippleFile` checks the ripple metadata against the layout and never maps or reads tensor
data unless asked to check it (:meth:`RippleFile.check_quick`, :meth:`RippleFile.verify_full`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
from gguf.constants import GGUFValueType as V

from .. import binding
from . import constants as C
from .bundles import make_layer_bundles
from .constants import Keys
from .layout import (ARRAY_DTYPES, FOOTER, GGUF_ALIGNMENT_KEY, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, REGION_HEADER,
                     SCALAR_FORMATS, GGUFHeader, GGUFTensorInfo, GGUFValue, RippleFormatError, RippleLayer,
                     SourceInfo, align, can_split, metadata_sha256, row_size, type_name)

# --- the GGUF header -------------------------------------------------------------------------

class _Cursor:
    def __init__(self, f: io.BufferedReader, path: str, size: int):
        self.f, self.path, self.size, self.pos = f, path, size, 0

    def read(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise RippleFormatError(self.path, f"truncated GGUF header (needs {n} bytes at offset "
                                               f"{self.pos}, file has {self.size})")
        b = self.f.read(n)
        if len(b) != n:
            raise RippleFormatError(self.path, f"short read at offset {self.pos}")
        self.pos += n
        return b

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > self.size:
            raise RippleFormatError(self.path, f"corrupt GGUF header: string of {n} bytes at offset {self.pos}")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == V.STRING:
            return self.string()
        fmt = SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise RippleFormatError(self.path, f"corrupt GGUF header: value type {vtype} at offset {self.pos}")
        return self.unpack(fmt)


def _open_regular(path: str) -> io.BufferedReader:
    """``path`` opened for reading; RippleFormatError when it is not a readable regular file (a
    FIFO is refused before opening it: the open would wait for a writer)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise RippleFormatError(path, f"cannot read: {kind}")
        return open(path, "rb")
    except OSError as e:
        raise RippleFormatError(path, f"cannot read: {e.strerror or e}") from e


# A length-prefixed ripple.* key name (u64 length, then "ripple." and a lower-case name), as the
# writer serializes it: evidence that a GGUF whose header does not parse was meant to be ripple.
_RIPPLE_KEY_BYTES = re.compile(rb"[\x08-\xff]\x00{7}ripple\.[a-z_]")
_RIPPLE_SCAN_BYTES = 64 << 20  # headers (metadata, vocabularies, tensor infos) are smaller


def _mentions_ripple_key(path: str) -> bool:
    with _open_regular(path) as f:
        return _RIPPLE_KEY_BYTES.search(f.read(_RIPPLE_SCAN_BYTES)) is not None


def read_gguf_header(path: os.PathLike | str) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor infos (no tensor data is read)."""
    path = os.fspath(path)
    f = _open_regular(path)
    with f:
        size = os.fstat(f.fileno()).st_size
        cur = _Cursor(f, path, size)
        if size < 24 or cur.read(4) != GGUF_MAGIC:
            raise RippleFormatError(path, "not a GGUF file (bad magic)")
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise RippleFormatError(path, f"unsupported GGUF version {version}")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        if n_tensors > size // 24 or n_kv > size // 12:
            raise RippleFormatError(path, f"corrupt GGUF header: {n_tensors} tensors, {n_kv} keys")
        kv: dict[str, GGUFValue] = {}
        for _ in range(n_kv):
            start = cur.pos
            key = cur.string()
            vtype = cur.unpack("<I")
            if vtype == V.ARRAY:
                sub, count = cur.unpack("<I"), cur.unpack("<Q")
                if sub == V.STRING:
                    if count > size:
                        raise RippleFormatError(path, f"corrupt GGUF header: array of {count} at key {key!r}")
                    val: Any = [cur.string() for _ in range(count)]
                elif sub in ARRAY_DTYPES:
                    dt = ARRAY_DTYPES[sub]
                    val = np.frombuffer(cur.read(count * dt.itemsize), dtype=dt)
                else:
                    raise RippleFormatError(path, f"corrupt GGUF header: array type {sub} at key {key!r}")
                kv[key] = GGUFValue(V.ARRAY, val, sub, (start, cur.pos))
            else:
                kv[key] = GGUFValue(vtype, cur.value(vtype), None, (start, cur.pos))
        tensors = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if not 1 <= n_dims <= 4:
                raise RippleFormatError(path, f"corrupt GGUF header: tensor {name!r} has {n_dims} dims")
            shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
            ttype, offset = cur.unpack("<I"), cur.unpack("<Q")
            try:
                nbytes = row_size(ttype, shape[0]) * int(np.prod(shape[1:], dtype=np.int64))
            except (ValueError, KeyError):
                raise RippleFormatError(path, f"tensor {name!r}: unknown ggml type {ttype} or bad "
                                              f"shape {list(shape)}") from None
            tensors.append(GGUFTensorInfo(name, shape, ttype, offset, nbytes))
        alignment = kv[GGUF_ALIGNMENT_KEY].value if GGUF_ALIGNMENT_KEY in kv else GGUF_DEFAULT_ALIGNMENT
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise RippleFormatError(path, f"corrupt GGUF header: alignment {alignment!r}")
        hdr = GGUFHeader(path, version, kv, tensors, alignment, cur.pos, align(cur.pos, alignment), size)
    if hdr.data_end > size:
        raise RippleFormatError(path, f"truncated: tensor data ends at {hdr.data_end}, file has {size} bytes")
    return hdr


# --- the ripple file ----------------------------------------------------------------------------

def _pread(path: str, fd: int, offset: int, n: int) -> bytes:
    b = os.pread(fd, n, offset)
    if len(b) != n:
        raise RippleFormatError(path, f"truncated: wanted {n} bytes at offset {offset}, got {len(b)}")
    return b


# Type of every ripple.* key this version writes (docs/FORMAT.md section 4): (GGUF type, element
# type of an array). A damaged or hand-edited key fails at open with its name, not later.
_U32, _U64, _I32, _F32, _STR = (V.UINT32, None), (V.UINT64, None), (V.INT32, None), (V.FLOAT32, None), (V.STRING, None)
_KEY_TYPES = {
    Keys.FORMAT_VERSION: _U32, Keys.TOOL_VERSION: _STR,
    Keys.Source.NAME: _STR, Keys.Source.SHA256: _STR, Keys.Source.SIZE: _U64,
    Keys.Region.OFFSET: _U64, Keys.Region.SIZE: _U64, Keys.Region.SHA256: _STR, Keys.Region.ID: _STR,
    Keys.Region.FILE_SIZE: _U64, Keys.Region.ALIGNMENT: _U32,
    Keys.Layout.N_LAYERS: _U32, Keys.Layout.N_EMBD: _U32,
    **{k: (V.ARRAY, V.INT32) for k in (Keys.Layout.LAYER_INDEX, Keys.Layout.N_FF, Keys.Layout.GATE_TYPE,
                                       Keys.Layout.UP_TYPE, Keys.Layout.DOWN_TYPE, Keys.Layout.DOWN_LAYOUT,
                                       Keys.Placement.ORDER)},
    **{k: (V.ARRAY, V.UINT64) for k in (Keys.Layout.OFFSET, Keys.Layout.BUNDLE_SIZE, Keys.Layout.DOWN_TABLE_OFFSET,
                                        Keys.Layout.DOWN_TABLE_SIZE, Keys.Predictor.OFFSET, Keys.Predictor.SIZE)},
    Keys.Placement.METHOD: _STR, Keys.Placement.QUALITY: _STR,
    Keys.Sparsity.RULE: _STR, Keys.Sparsity.ACTIVE_FRACTION: _F32, Keys.Sparsity.THRESHOLD: (V.ARRAY, V.FLOAT32),
    Keys.Calibration.TEXT: _STR, Keys.Calibration.TOKENS: _U32, Keys.Calibration.SEED: _U32,
    Keys.Predictor.RANK: _U32, Keys.Predictor.RECALL_TARGET: _F32, Keys.Predictor.METRICS: _STR,
    Keys.Placement.FREQUENCY: (V.ARRAY, V.UINT8),
    Keys.Predictor.KIND: _STR, Keys.Predictor.SKETCH_OUTLIERS: _U32, Keys.Predictor.SKETCH_BUDGET: _F32,
}
# Written together or not at all: by a conversion with profiling, and with predictors.
_PROFILE_KEYS = (Keys.Placement.QUALITY, Keys.Sparsity.RULE, Keys.Sparsity.ACTIVE_FRACTION, Keys.Sparsity.THRESHOLD,
                 Keys.Calibration.TEXT, Keys.Calibration.TOKENS, Keys.Calibration.SEED)
_PREDICTOR_KEYS = (Keys.Predictor.RANK, Keys.Predictor.RECALL_TARGET, Keys.Predictor.OFFSET, Keys.Predictor.SIZE,
                   Keys.Predictor.METRICS)
_JSON_KEYS = (Keys.Placement.QUALITY, Keys.Predictor.METRICS)


def _type_text(vtype: int, sub: Optional[int]) -> str:
    names = {V.UINT8: "u8", V.INT8: "i8", V.UINT16: "u16", V.INT16: "i16", V.UINT32: "u32", V.INT32: "i32",
             V.FLOAT32: "f32", V.BOOL: "bool", V.STRING: "string", V.UINT64: "u64", V.INT64: "i64", V.FLOAT64: "f64"}
    return f"{names.get(sub, sub)}[]" if vtype == V.ARRAY else names.get(vtype, f"type {vtype}")


def _check_key_types(p: str, kv: dict[str, GGUFValue]) -> None:
    """Every known ripple.* key of its documented type, the optional groups whole, JSON values
    objects, and the fractions in range."""
    for key, (vtype, sub) in _KEY_TYPES.items():
        v = kv.get(key)
        if v is not None and (v.type, v.sub_type if v.type == V.ARRAY else None) != (vtype, sub):
            raise RippleFormatError(p, f"metadata key {key} is {_type_text(v.type, v.sub_type)}, expected "
                                       f"{_type_text(vtype, sub)} (damaged or edited file)")
    for group, what in ((_PROFILE_KEYS, "profiling"), (_PREDICTOR_KEYS, "predictor")):
        have = [k for k in group if k in kv]
        if have and len(have) != len(group):
            missing = next(k for k in group if k not in kv)
            raise RippleFormatError(p, f"missing metadata key {missing} (the file has other {what} keys, "
                                       f"e.g. {have[0]}: damaged or edited file)")
    if Keys.Predictor.RANK in kv and Keys.Sparsity.RULE not in kv:
        raise RippleFormatError(p, f"predictor keys without the profiling keys (no {Keys.Sparsity.RULE})")
    for key in _JSON_KEYS:
        if key in kv:
            try:
                ok = isinstance(json.loads(kv[key].value), dict)
            except ValueError:
                ok = False
            if not ok:
                raise RippleFormatError(p, f"metadata key {key} is not a JSON object (damaged or edited file)")
    kind = kv.get(Keys.Predictor.KIND)
    if kind is not None and kind.value not in C.PREDICTOR_KINDS:
        raise RippleFormatError(p, f"metadata key {Keys.Predictor.KIND} is {kind.value!r}, expected one of "
                                   f"{', '.join(C.PREDICTOR_KINDS)}")
    for key in (Keys.Sparsity.ACTIVE_FRACTION, Keys.Predictor.RECALL_TARGET, Keys.Predictor.SKETCH_BUDGET):
        if key in kv and not 0.0 < kv[key].value <= 1.0:  # also false for NaN
            raise RippleFormatError(p, f"metadata key {key} is {kv[key].value}, expected a fraction in (0, 1]")


def _int_key(p: str, md: dict, key: str) -> int:
    v = md.get(key)
    if v is None:
        raise RippleFormatError(p, f"missing metadata key {key}")
    if type(v) is not int:
        raise RippleFormatError(p, f"{key} must be an integer, got {v!r:.40}")
    return v


def _attach_offline(p: str, md: dict, layers: list[RippleLayer], region_offset: int, region_size: int) -> None:
    """Per-layer thresholds and predictor blobs from the optional offline-stage keys."""
    n = len(layers)
    if Keys.Sparsity.RULE in md:
        rule = str(md[Keys.Sparsity.RULE])
        if rule not in C.SPARSITY_RULES:
            raise RippleFormatError(p, f"unknown sparsity rule {rule!r}")
        thr = np.asarray(md.get(Keys.Sparsity.THRESHOLD, []), dtype=np.float64)
        if thr.shape != (n,) or not np.all(np.isfinite(thr)) or np.any(thr < 0):
            raise RippleFormatError(p, f"{Keys.Sparsity.THRESHOLD} must hold {n} finite non-negative values")
        for l, t in zip(layers, thr):
            l.threshold = float(t)
    if Keys.Predictor.OFFSET in md:
        offs = np.asarray(md[Keys.Predictor.OFFSET], dtype=np.int64)
        sizes = np.asarray(md.get(Keys.Predictor.SIZE, []), dtype=np.int64)
        if offs.shape != (n,) or sizes.shape != (n,):
            raise RippleFormatError(p, f"{Keys.Predictor.OFFSET}/{Keys.Predictor.SIZE} must hold {n} entries")
        for l, o, sz in zip(layers, offs, sizes):
            if sz <= 0 or o % 64 or o + sz > region_size - C.FOOTER_SIZE or o < C.HEADER_SIZE:
                raise RippleFormatError(p, f"layer {l.block}: predictor blob outside the region")
            l.predictor_offset, l.predictor_size = region_offset + int(o), int(sz)
    mode = md.get(Keys.Runtime.DEFAULT_MODE)
    if mode is not None and mode not in C.DEFAULT_MODES:
        raise RippleFormatError(p, f"{Keys.Runtime.DEFAULT_MODE} is {mode!r}, expected one of {', '.join(C.DEFAULT_MODES)}")


@dataclass
class LayerChecksums:
    """A layer's part of the checksum table (CRC32C values)."""

    bundles: np.ndarray  # uint32[n_ff], position order
    tensors: np.ndarray  # uint32: per CHECKSUM_BLOCK of ffn_gate (none when ungated), ffn_up, ffn_down
    down_table: int  # of the down scale table (0: none)
    predictor: int  # of the predictor blob (0: none)


@dataclass
class RippleFile:
    path: str
    file_size: int
    n_layers: int
    n_embd: int
    metadata: dict[str, Any]  # every ripple.* key
    source: SourceInfo
    region_offset: int
    region_size: int
    region_id: str  # hex
    placement_method: str
    layers: list[RippleLayer]
    gguf: GGUFHeader = field(repr=False)
    checksum_offset: int = 0  # absolute offset of the checksum table
    checksum_size: int = 0
    checksum_block: int = 0  # bytes per checksum of the standard FFN tensors
    _checksums: Optional[list[LayerChecksums]] = field(default=None, repr=False)

    @staticmethod
    def is_ripple(path: os.PathLike | str) -> bool:
        """Whether ``path`` is meant to be ripple-packed: a GGUF with any ``ripple.*`` key.

        False for other files, including a GGUF whose header does not parse and holds no
        ``ripple.*`` key name (stock llama.cpp then reports on it). Raises RippleFormatError when
        the file cannot be read, or looks like ripple but its header does not parse: such a file
        must never go to stock llama.cpp as "not ripple"."""
        p = os.fspath(path)
        try:
            hdr = read_gguf_header(p)
        except RippleFormatError:
            if _mentions_ripple_key(p):  # also raises, naming the file, when it cannot be read
                raise
            return False
        return any(k.startswith("ripple.") for k in hdr.kv)

    @classmethod
    def open(cls, path: os.PathLike | str) -> "RippleFile":
        hdr = read_gguf_header(path)
        p = hdr.path
        md = {k: v.value for k, v in hdr.kv.items() if k.startswith("ripple.")}
        if Keys.FORMAT_VERSION not in md:
            what = f"has {', '.join(sorted(md)[:3])}{', ...' if len(md) > 3 else ''} but " if md else ""
            raise RippleFormatError(p, f"not a ripple-packed GGUF ({what}no ripple.format_version key)")
        if md[Keys.FORMAT_VERSION] not in C.READ_VERSIONS:
            raise RippleFormatError(p, f"ripple format version {md[Keys.FORMAT_VERSION]!r} is not "
                                       f"supported (this tool reads {' and '.join(map(str, C.READ_VERSIONS))}): "
                                       "convert the source again")
        if md.get(Keys.Predictor.KIND, "lowrank") != "lowrank" and md[Keys.FORMAT_VERSION] < 4:
            raise RippleFormatError(p, f"{Keys.Predictor.KIND} in a format {md[Keys.FORMAT_VERSION]} file (damaged or edited)")
        _check_key_types(p, hdr.kv)

        def need(key: str) -> Any:
            if key not in md:
                raise RippleFormatError(p, f"missing metadata key {key}")
            return md[key]

        n_layers, n_embd = int(need(Keys.Layout.N_LAYERS)), int(need(Keys.Layout.N_EMBD))
        arrays = {}
        for key in (Keys.Layout.LAYER_INDEX, Keys.Layout.N_FF, Keys.Layout.OFFSET, Keys.Layout.BUNDLE_SIZE,
                    Keys.Layout.GATE_TYPE, Keys.Layout.UP_TYPE, Keys.Layout.DOWN_TYPE,
                    Keys.Layout.DOWN_LAYOUT, Keys.Layout.DOWN_TABLE_OFFSET, Keys.Layout.DOWN_TABLE_SIZE):
            arr = np.asarray(need(key))
            if arr.shape != (n_layers,):
                raise RippleFormatError(p, f"{key} has {arr.size} entries, expected {n_layers}")
            arrays[key] = [int(x) for x in arr]
        order = np.asarray(need(Keys.Placement.ORDER)).astype(np.int32)
        n_ffs = arrays[Keys.Layout.N_FF]
        if order.size != sum(n_ffs):
            raise RippleFormatError(p, f"{Keys.Placement.ORDER} has {order.size} entries, expected {sum(n_ffs)}")
        freq = np.asarray(md[Keys.Placement.FREQUENCY], dtype=np.uint8) if Keys.Placement.FREQUENCY in md else None
        if freq is not None and freq.size != sum(n_ffs):
            raise RippleFormatError(p, f"{Keys.Placement.FREQUENCY} has {freq.size} entries, expected {sum(n_ffs)}")
        region_offset, region_size = int(need(Keys.Region.OFFSET)), int(need(Keys.Region.SIZE))
        if region_offset < hdr.data_end or region_offset % C.ALIGNMENT:
            raise RippleFormatError(p, f"region offset {region_offset} overlaps the tensor data or is unaligned")
        layers, start = [], 0
        for i in range(n_layers):
            g = lambda key: arrays[key][i]
            blk, n_ff = g(Keys.Layout.LAYER_INDEX), g(Keys.Layout.N_FF)
            tensors = {k: hdr.tensor(C.ffn_tensor_name(blk, k)) for k in C.FFN_KINDS}
            if tensors["up"] is None or tensors["down"] is None:
                raise RippleFormatError(p, f"layer {blk}: standard FFN tensors missing")
            gate_type = g(Keys.Layout.GATE_TYPE)
            if (tensors["gate"] is None) != (gate_type == C.NO_GATE) or \
                    (tensors["gate"] is not None and tensors["gate"].type != gate_type) or \
                    tensors["up"].type != g(Keys.Layout.UP_TYPE):
                raise RippleFormatError(p, f"layer {blk}: ripple gate/up types disagree with the tensors")
            lorder = order[start:start + n_ff]
            start += n_ff
            if lorder.size and (lorder.min() < 0 or lorder.max() >= n_ff or
                                not np.all(np.bincount(lorder, minlength=n_ff) == 1)):
                raise RippleFormatError(p, f"layer {blk}: placement order is not a permutation of {n_ff}")
            layer = RippleLayer(
                block=blk, n_ff=n_ff, n_embd=n_embd, gate_type=gate_type, up_type=g(Keys.Layout.UP_TYPE),
                down_type=g(Keys.Layout.DOWN_TYPE), down_src_type=tensors["down"].type, order=lorder,
                bundles_offset=region_offset + g(Keys.Layout.OFFSET),
                gate_offset=hdr.data_offset + tensors["gate"].offset if tensors["gate"] else 0,
                up_offset=hdr.data_offset + tensors["up"].offset,
                down_offset=hdr.data_offset + tensors["down"].offset,
                frequency=freq[start - n_ff:start] if freq is not None else None)
            layout = g(Keys.Layout.DOWN_LAYOUT)
            if layout not in range(len(C.DOWN_LAYOUTS)):
                raise RippleFormatError(p, f"layer {blk}: unknown down layout {layout}")
            layer.down_layout = layout
            if layer.split and (layer.down_type != layer.down_src_type or
                                not can_split(layer.down_type, n_ff, n_embd)):
                raise RippleFormatError(p, f"layer {blk}: split down columns of type {type_name(layer.down_type)} "
                                           f"from ffn_down of type {type_name(layer.down_src_type)}")
            if tensors["up"].shape != (n_embd, n_ff) or tensors["down"].shape != (n_ff, n_embd):
                raise RippleFormatError(p, f"layer {blk}: FFN tensor shapes disagree with n_ff={n_ff}, n_embd={n_embd}")
            try:
                bs = layer.bundle_size
            except (ValueError, KeyError):
                raise RippleFormatError(p, f"layer {blk}: bad bundle types") from None
            if bs != g(Keys.Layout.BUNDLE_SIZE):
                raise RippleFormatError(p, f"layer {blk}: bundle size {g(Keys.Layout.BUNDLE_SIZE)} != {bs}")
            if g(Keys.Layout.OFFSET) % C.ALIGNMENT or \
                    layer.bundles_offset + layer.block_bytes > region_offset + region_size - C.FOOTER_SIZE:
                raise RippleFormatError(p, f"layer {blk}: bundle block outside the region")
            t_off, t_size = g(Keys.Layout.DOWN_TABLE_OFFSET), g(Keys.Layout.DOWN_TABLE_SIZE)
            if t_size != layer.down_table_size or (t_size and (
                    t_off % 64 or t_off < C.HEADER_SIZE or t_off + t_size > region_size - C.FOOTER_SIZE)):
                raise RippleFormatError(p, f"layer {blk}: down scale table ({t_size} bytes at {t_off}) does not fit "
                                           f"the layout (expected {layer.down_table_size} bytes inside the region)")
            layer.down_table_offset = region_offset + t_off if t_size else 0
            layers.append(layer)
        _attach_offline(p, md, layers, region_offset, region_size)
        ck_off, ck_size, ck_block = (_int_key(p, md, k) for k in (Keys.Checksum.OFFSET, Keys.Checksum.SIZE,
                                                                  Keys.Checksum.BLOCK_SIZE))
        for key in (Keys.Checksum.SHA256, Keys.METADATA_SHA256):
            if not isinstance(need(key), str) or len(need(key)) != 64:
                raise RippleFormatError(p, f"{key} is not a sha256 hex digest")
        if ck_block <= 0 or ck_size != 4 * sum(l.checksum_entries(ck_block) for l in layers) or \
                ck_off % 64 or ck_off < C.HEADER_SIZE or ck_off + ck_size > region_size - C.FOOTER_SIZE:
            raise RippleFormatError(p, f"checksum table ({ck_size} bytes at {ck_off}, blocks of {ck_block}) does "
                                       "not fit the layout")
        src = SourceInfo(str(md.get(Keys.Source.NAME, "")), str(md.get(Keys.Source.SHA256, "")),
                         int(md.get(Keys.Source.SIZE, 0)))
        return cls(path=p, file_size=int(need(Keys.Region.FILE_SIZE)), n_layers=n_layers, n_embd=n_embd,
                   metadata=md, source=src, region_offset=region_offset, region_size=region_size,
                   region_id=str(need(Keys.Region.ID)), placement_method=str(md.get(Keys.Placement.METHOD, "")),
                   layers=layers, gguf=hdr, checksum_offset=region_offset + ck_off, checksum_size=ck_size,
                   checksum_block=ck_block)

    # --- offline-stage data ---

    def _json(self, key: str) -> Optional[dict]:
        v = self.metadata.get(key)
        return json.loads(v) if v else None

    @property
    def sparsity(self) -> Optional[dict]:
        """{"rule", "active_fraction", "thresholds"} or None for a file packed without profiling."""
        if Keys.Sparsity.RULE not in self.metadata:
            return None
        return {"rule": str(self.metadata[Keys.Sparsity.RULE]),
                "active_fraction": float(self.metadata[Keys.Sparsity.ACTIVE_FRACTION]),
                "thresholds": [l.threshold for l in self.layers]}

    @property
    def placement_quality(self) -> Optional[dict]:
        return self._json(Keys.Placement.QUALITY)

    @property
    def predictor_metrics(self) -> Optional[dict]:
        return self._json(Keys.Predictor.METRICS)

    @property
    def default_mode(self) -> str:
        """The mode the runtime uses for this file unless the user chose one: the file's
        ``ripple.runtime.default_mode``; without it sparse when the file has predictors, else exact."""
        return str(self.metadata.get(Keys.Runtime.DEFAULT_MODE, "sparse" if self.has_predictors else "exact"))

    @property
    def default_mode_reason(self) -> str:
        if Keys.Runtime.DEFAULT_MODE_REASON in self.metadata:
            return str(self.metadata[Keys.Runtime.DEFAULT_MODE_REASON])
        return "the file has predictors" if self.has_predictors else "the file has no predictors"

    @property
    def has_predictors(self) -> bool:
        return all(l.predictor_size for l in self.layers)

    def checksums(self) -> list[LayerChecksums]:
        """The checksum table, per layer (read once; checked against ripple.checksum.sha256)."""
        if self._checksums is None:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                raw = _pread(self.path, fd, self.checksum_offset, self.checksum_size)
            finally:
                os.close(fd)
            if hashlib.sha256(raw).hexdigest() != self.metadata[Keys.Checksum.SHA256]:
                raise RippleFormatError(self.path, "checksum table does not match ripple.checksum.sha256 "
                                                   "(file damaged or modified after conversion)")
            crc, at, out = np.frombuffer(raw, dtype="<u4").astype(np.uint32), 0, []
            for l in self.layers:
                n = l.checksum_entries(self.checksum_block)
                part = crc[at:at + n]
                out.append(LayerChecksums(part[:l.n_ff], part[l.n_ff:n - 2], int(part[n - 2]), int(part[n - 1])))
                at += n
            self._checksums = out
        return self._checksums

    def _layer_checksums(self, layer: RippleLayer) -> LayerChecksums:
        return self.checksums()[next(i for i, l in enumerate(self.layers) if l.block == layer.block)]

    def _check_crc(self, layer: RippleLayer, what: str, data: bytes, want: int) -> None:
        if binding.crc32c(data) != want:
            raise RippleFormatError(self.path, f"layer {layer.block}: {what} does not match its checksum "
                                               "(file damaged or modified after conversion)")

    def read_predictor_blob(self, layer: RippleLayer) -> bytes:
        """The layer's predictor blob, checked against the checksum table."""
        if not layer.predictor_size:
            raise RippleFormatError(self.path, f"layer {layer.block}: no predictor in this file")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            blob = _pread(self.path, fd, layer.predictor_offset, layer.predictor_size)
        finally:
            os.close(fd)
        self._check_crc(layer, "predictor blob", blob, self._layer_checksums(layer).predictor)
        return blob

    # --- checks ---

    def _check_frame(self, fd: int) -> None:
        p = self.path
        actual = os.fstat(fd).st_size
        if actual != self.file_size:
            raise RippleFormatError(p, f"file size {actual} != {self.file_size} recorded at conversion "
                                       "(truncated or modified)")
        if self.region_offset + self.region_size != self.file_size:
            raise RippleFormatError(p, "region does not end at the end of the file")
        magic, version, n_layers, size, rid = REGION_HEADER.unpack(
            _pread(p, fd, self.region_offset, REGION_HEADER.size))
        if magic != C.REGION_MAGIC:
            raise RippleFormatError(p, f"no ripple region header at offset {self.region_offset}")
        if (version, n_layers, size, rid.hex()) != (self.metadata[Keys.FORMAT_VERSION], self.n_layers, self.region_size,
                                                    self.region_id):
            raise RippleFormatError(p, "region header does not match the metadata (region from another file?)")
        fmagic, fsize, fid = FOOTER.unpack(_pread(p, fd, self.file_size - C.FOOTER_SIZE, FOOTER.size))
        if fmagic != C.FOOTER_MAGIC or fsize != self.region_size or fid.hex() != self.region_id:
            raise RippleFormatError(p, "region footer does not match the metadata")

    def _check_bundle_rows(self, fd: int, layer: RippleLayer, positions: Iterable[int]) -> None:
        p = self.path
        for pos in positions:
            nid = int(layer.order[pos])
            b = _pread(p, fd, layer.bundles_offset + pos * layer.bundle_size, layer.gate_row_size + layer.up_row_size)
            g, u = b[:layer.gate_row_size], b[layer.gate_row_size:]
            if layer.gated and g != _pread(p, fd, layer.gate_offset + nid * layer.gate_row_size, layer.gate_row_size):
                raise RippleFormatError(p, f"layer {layer.block}: bundle at position {pos} (neuron {nid}) "
                                           "gate row differs from ffn_gate")
            if u != _pread(p, fd, layer.up_offset + nid * layer.up_row_size, layer.up_row_size):
                raise RippleFormatError(p, f"layer {layer.block}: bundle at position {pos} (neuron {nid}) "
                                           "up row differs from ffn_up")

    def _check_metadata(self, fd: int) -> None:
        raw = _pread(self.path, fd, 0, self.gguf.header_end)
        if metadata_sha256(raw, self.gguf.kv[Keys.METADATA_SHA256].span) != self.metadata[Keys.METADATA_SHA256]:
            raise RippleFormatError(self.path, "GGUF header (metadata or tensor infos) does not match "
                                               f"{Keys.METADATA_SHA256}: modified after conversion")

    def check_quick(self) -> None:
        """The load-time check (a few small reads): file size, region header and footer, a few
        bundles against the standard tensors, the checksum table's and the header's digests.
        Raises RippleFormatError on a mismatch."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            self._check_frame(fd)
            for l in self.layers:
                self._check_bundle_rows(fd, l, sorted({0, l.n_ff // 2, l.n_ff - 1}))
            self.checksums()
            self._check_metadata(fd)
        finally:
            os.close(fd)

    def verify_full(self, progress: Callable[[Iterable], Iterable] = lambda it: it) -> None:
        """Region checksum, every bundle re-derived from the file's own standard tensors, every
        entry of the checksum table, and the header's digest."""
        p = self.path
        fd = os.open(p, os.O_RDONLY)
        try:
            self._check_frame(fd)
            h = hashlib.sha256()
            off, end = self.region_offset, self.region_offset + self.region_size
            while off < end:
                b = _pread(p, fd, off, min(16 << 20, end - off))
                h.update(b)
                off += len(b)
            if h.hexdigest() != self.metadata.get(Keys.Region.SHA256):
                raise RippleFormatError(p, "region sha256 does not match ripple.region.sha256")
        finally:
            os.close(fd)
        data = np.memmap(p, dtype=np.uint8, mode="r")
        try:
            for l in progress(self.layers):
                want, table = make_layer_bundles(data, l)  # the converter's own derivation
                want = want[l.order]
                got = data[l.bundles_offset:l.bundles_offset + l.block_bytes].reshape(l.n_ff, l.bundle_size)
                if table != bytes(data[l.down_table_offset:l.down_table_offset + l.down_table_size]):
                    raise RippleFormatError(p, f"layer {l.block}: down scale table differs from ffn_down's scales")
                bad = np.flatnonzero(np.any(want != got, axis=1))
                if bad.size:
                    pos = int(bad[0])
                    raise RippleFormatError(p, f"layer {l.block}: {bad.size} bundles differ from the standard "
                                               f"tensors (first at position {pos}, neuron {int(l.order[pos])})")
                ck = self._layer_checksums(l)
                offs = (l.gate_offset, l.up_offset, l.down_offset)
                tensors = [binding.crc32c_blocks(data[o:o + n], self.checksum_block)
                           for o, n in zip(offs, l.tensor_bytes) if n]
                blob = data[l.predictor_offset:l.predictor_offset + l.predictor_size] if l.predictor_size else b""
                if not (np.array_equal(binding.crc32c_blocks(got, l.bundle_size), ck.bundles)
                        and np.array_equal(np.concatenate(tensors), ck.tensors)
                        and binding.crc32c(table) == ck.down_table and binding.crc32c(blob) == ck.predictor):
                    raise RippleFormatError(p, f"layer {l.block}: checksum table entries do not match the data")
        finally:
            del data
        fd = os.open(p, os.O_RDONLY)
        try:
            self._check_metadata(fd)
        finally:
            os.close(fd)

    def _predictor_json(self) -> Optional[dict]:
        m = self.predictor_metrics
        if m is None:
            return None
        return {"rank": self.metadata.get(Keys.Predictor.RANK),
                "recall_target": self.metadata.get(Keys.Predictor.RECALL_TARGET), **m}

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format_version": self.metadata[Keys.FORMAT_VERSION],
            "tool_version": self.metadata.get(Keys.TOOL_VERSION),
            "file_size": self.file_size,
            "source": {"name": self.source.name, "sha256": self.source.sha256, "size": self.source.size},
            "region": {"offset": self.region_offset, "size": self.region_size, "id": self.region_id,
                       "sha256": self.metadata.get(Keys.Region.SHA256)},
            "n_layers": self.n_layers,
            "n_embd": self.n_embd,
            "placement": {"method": self.placement_method},
            "placement_quality": self.placement_quality,
            "sparsity": self.sparsity,
            "predictor": self._predictor_json(),
            "runtime": {"default_mode": self.default_mode, "default_mode_reason": self.default_mode_reason},
            "calibration": {"text": self.metadata.get(Keys.Calibration.TEXT),
                            "tokens": self.metadata.get(Keys.Calibration.TOKENS),
                            "seed": self.metadata.get(Keys.Calibration.SEED)},
            "layers": [{
                "block": l.block, "n_ff": l.n_ff, "gate_type": type_name(l.gate_type),
                "up_type": type_name(l.up_type), "down_type": type_name(l.down_type),
                "down_layout": C.DOWN_LAYOUTS[l.down_layout],
                "down_src_type": type_name(l.down_src_type), "bundles_offset": l.bundles_offset,
                "bundle_size": l.bundle_size,
            } for l in self.layers],
        }
