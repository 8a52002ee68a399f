"""The ripple-packed GGUF format (version 3): the one writer and the one reader.

A ripple-packed file is a GGUF that stock llama.cpp loads (standard tensors byte-identical to the
source, FFN tensors last) followed by the ripple region: a 4096-byte header, one 4096-aligned block
of neuron bundles per FFN layer, down scale tables, predictor blobs, the checksum table, and a
64-byte footer. docs/FORMAT.md is the specification; every
metadata key name comes from :mod:`ripple_gguf.constants`.

The reader parses only the GGUF header (metadata and tensor infos) with plain reads; it never maps
or reads tensor data unless asked to check it (:meth:`RippleFile.check_quick`,
:meth:`RippleFile.verify_full`).
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
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType as V

from ripple_gguf import constants as C
from ripple_gguf.constants import Keys

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
GGUF_DEFAULT_ALIGNMENT = 32
GGUF_ALIGNMENT_KEY = "general.alignment"

# FFN tensor types the converter understands (dequantize/transpose/re-quantize of down columns).
SUPPORTED_FFN_TYPES = frozenset({
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
})
FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})

_REGION_HEADER = struct.Struct("<8sIIQ32s")  # magic, format version, n_layers, region size, id
_FOOTER = struct.Struct("<8sQ32s")  # magic, region size, id

_SCALAR_FMT = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
    V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d",
}
_ARRAY_DTYPE = {t: np.dtype(f) for t, f in _SCALAR_FMT.items()}


class RippleFormatError(ValueError):
    """A file is not what it claims to be; the message names the file and the problem."""

    def __init__(self, path: os.PathLike | str, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def type_name(ggml_type: int) -> str:
    if ggml_type == C.NO_GATE:
        return "none"
    try:
        return T(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def block_size(ggml_type: int) -> int:
    return GGML_QUANT_SIZES[T(ggml_type)][0]


def row_size(ggml_type: int, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` values (ggml_row_size); 0 for an absent gate."""
    if ggml_type == C.NO_GATE:
        return 0
    blck, size = GGML_QUANT_SIZES[T(ggml_type)]
    if n_per_row % blck:
        raise ValueError(f"{n_per_row} values do not fill whole {T(ggml_type).name} blocks of {blck}")
    return n_per_row // blck * size


def align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class SplitType(NamedTuple):
    """How a split down column stores a type's values (docs/FORMAT.md section 3)."""

    bits: int  # of each stored integer
    offset: int  # value = scale * (q - offset) + min
    group: int  # neurons sharing one scale table entry (a block, or a k-quant sub-block)


# Split down columns (constants.DOWN_LAYOUTS): source types whose blocks (or k-quant sub-blocks)
# are a scale, maybe a minimum, and one small integer per value. The same table is
# ripple_split_info in csrc/ripple_split.c (tests/test_convert.py checks they agree).
SPLIT_TYPES = {
    T.Q4_0: SplitType(4, 8, 32), T.Q4_1: SplitType(4, 0, 32), T.Q5_0: SplitType(5, 16, 32),
    T.Q5_1: SplitType(5, 0, 32), T.Q8_0: SplitType(8, 0, 32),
    T.Q2_K: SplitType(2, 0, 16), T.Q3_K: SplitType(3, 4, 16), T.Q4_K: SplitType(4, 0, 32),
    T.Q5_K: SplitType(5, 0, 32), T.Q6_K: SplitType(6, 32, 16),
}


def split_planes(bits: int) -> list[int]:
    """Bit widths of a split column's planes, in column order: a nibble plane (bits 0-3) when
    ``bits`` >= 4, then a 2-bit and a 1-bit plane for the next bits as present (8 bits: int8)."""
    if bits == 8:
        return [8]
    rest = bits - 4 if bits >= 4 else bits
    return ([4] if bits >= 4 else []) + [w for w in (2, 1) if rest & w]


def split_row_size(src_type: int, n_embd: int) -> int:
    """Bytes of one split down column: n_embd values of the type's bits."""
    return SPLIT_TYPES[T(src_type)].bits * n_embd // 8


def can_split(src_type: int, n_ff: int, n_embd: int) -> bool:
    return src_type in SPLIT_TYPES and n_ff % SPLIT_TYPES[T(src_type)].group == 0 and n_embd % 8 == 0


# --- GGUF header parsing ----------------------------------------------------------------------

@dataclass
class GGUFValue:
    type: int  # GGUFValueType of the value (ARRAY for arrays)
    value: Any  # python scalar / str, numpy array for numeric arrays, list[str] for string arrays
    sub_type: int | None = None  # element type of an array
    span: tuple[int, int] = (0, 0)  # [start, end) of the serialized key/value record in the file


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 first
    type: int
    offset: int  # relative to the data section
    nbytes: int

    @property
    def n_rows(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n


@dataclass
class GGUFHeader:
    path: str
    version: int
    kv: dict[str, GGUFValue]
    tensors: list[GGUFTensorInfo]
    alignment: int
    header_end: int  # end of the tensor infos
    data_offset: int  # absolute start of the tensor data section
    file_size: int

    def tensor(self, name: str) -> GGUFTensorInfo | None:
        return self._by_name.get(name)

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.tensors}

    @property
    def data_end(self) -> int:
        """Absolute end of the last tensor's data."""
        return self.data_offset + max((t.offset + t.nbytes for t in self.tensors), default=0)

    def get(self, key: str, default: Any = None) -> Any:
        v = self.kv.get(key)
        return default if v is None else v.value


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
        fmt = _SCALAR_FMT.get(vtype)
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
                elif sub in _ARRAY_DTYPE:
                    dt = _ARRAY_DTYPE[sub]
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


# --- GGUF serialization -----------------------------------------------------------------------

def _pack_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def pack_kv(key: str, vtype: int, value: Any, sub_type: int | None = None) -> bytes:
    out = _pack_str(key) + struct.pack("<I", vtype)
    if vtype == V.ARRAY:
        assert sub_type is not None
        out += struct.pack("<IQ", sub_type, len(value))
        if sub_type == V.STRING:
            return out + b"".join(_pack_str(s) for s in value)
        return out + np.ascontiguousarray(value, dtype=_ARRAY_DTYPE[sub_type]).tobytes()
    if vtype == V.STRING:
        return out + _pack_str(value)
    return out + struct.pack(_SCALAR_FMT[vtype], value)


def _pack_tensor_info(t: GGUFTensorInfo, offset: int) -> bytes:
    return (_pack_str(t.name) + struct.pack("<I", len(t.shape))
            + struct.pack(f"<{len(t.shape)}Q", *t.shape) + struct.pack("<IQ", t.type, offset))


# --- layout -----------------------------------------------------------------------------------

@dataclass
class RippleLayer:
    """One FFN layer; fields mirror ``ripple_layer_desc`` in csrc/ripple.h."""

    block: int
    n_ff: int
    n_embd: int
    gate_type: int  # C.NO_GATE when ungated
    up_type: int
    down_type: int
    down_src_type: int
    order: np.ndarray  # int32[n_ff]: neuron id stored at each position
    bundles_offset: int = 0  # absolute
    gate_offset: int = 0  # absolute offsets of the standard tensors' data (gate: 0 if none)
    up_offset: int = 0
    down_offset: int = 0
    threshold: float = 0.0  # activity threshold on |post-activation| (rule "magnitude")
    predictor_offset: int = 0  # absolute offset of the predictor blob, 0 = none
    predictor_size: int = 0
    down_layout: int = C.DOWN_COLUMN
    down_table_offset: int = 0  # absolute offset of the split layout's scale table, 0 = none
    frequency: Optional[np.ndarray] = None  # uint8[n_ff], position order: how often needed (255 = always)

    @property
    def split(self) -> bool:
        return self.down_layout == C.DOWN_SPLIT

    @property
    def down_group(self) -> int:
        """Neurons per down scale table entry (split layout)."""
        return SPLIT_TYPES[T(self.down_type)].group

    @property
    def down_table_size(self) -> int:
        """f32 (scale, min) for every group of ffn_down: n_ff/group x n_embd x 2 (split layout)."""
        return self.n_ff // self.down_group * self.n_embd * 8 if self.split else 0

    @property
    def gate_row_size(self) -> int:
        return row_size(self.gate_type, self.n_embd)

    @property
    def up_row_size(self) -> int:
        return row_size(self.up_type, self.n_embd)

    @property
    def down_row_size(self) -> int:
        if self.split:
            return split_row_size(self.down_type, self.n_embd)
        return row_size(self.down_type, self.n_embd)

    @property
    def down_src_row_size(self) -> int:
        return row_size(self.down_src_type, self.n_ff)

    @property
    def bundle_size(self) -> int:
        return self.gate_row_size + self.up_row_size + self.down_row_size

    @property
    def block_bytes(self) -> int:
        return self.n_ff * self.bundle_size

    @property
    def gated(self) -> bool:
        return self.gate_type != C.NO_GATE

    @property
    def tensor_bytes(self) -> tuple[int, int, int]:
        """Bytes of the standard ffn_gate (0 when ungated), ffn_up and ffn_down tensors."""
        return self.n_ff * self.gate_row_size, self.n_ff * self.up_row_size, self.n_embd * self.down_src_row_size

    def checksum_entries(self, block: int) -> int:
        """u32 entries of the layer's part of the checksum table (docs/FORMAT.md section 2b)."""
        return self.n_ff + sum(-(-b // block) for b in self.tensor_bytes) + 2


def ffn_layers_of(hdr: GGUFHeader) -> list[int]:
    """Blocks that carry FFN weight tensors, ascending."""
    blocks = set()
    for t in hdr.tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and \
                parts[2] in ("ffn_gate", "ffn_up", "ffn_down") and parts[1].isdigit():
            blocks.add(int(parts[1]))
    return sorted(blocks)


def is_ffn_tensor(name: str) -> bool:
    parts = name.split(".")
    return (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight"
            and parts[2] in ("ffn_gate", "ffn_up", "ffn_down"))


def region_id_for(source_sha256: str, layers: Sequence[RippleLayer]) -> bytes:
    """Deterministic 32-byte region id: a hash of the source and of the region's layout."""
    h = hashlib.sha256(b"ripple-gguf region\0")
    h.update(struct.pack("<I", C.FORMAT_VERSION))
    h.update(bytes.fromhex(source_sha256))
    for l in layers:
        h.update(struct.pack("<7i", l.block, l.n_ff, l.n_embd, l.gate_type, l.up_type, l.down_type,
                             l.down_src_type))
        h.update(np.ascontiguousarray(l.order, dtype="<i4").tobytes())
        h.update(struct.pack("<QiQ", l.predictor_size, l.down_layout, l.down_table_size))
    return h.digest()


def metadata_sha256(header: bytes, skip: tuple[int, int]) -> str:
    """sha256 of a GGUF header (its bytes up to the end of the tensor infos: every key/value record
    and tensor info) without the bytes [skip[0], skip[1]) of the ripple.metadata.sha256 record."""
    h = hashlib.sha256(b"ripple-gguf metadata\0")
    h.update(header[:skip[0]])
    h.update(header[skip[1]:])
    return h.hexdigest()


@dataclass
class LayerChecksums:
    """A layer's part of the checksum table (CRC32C values)."""

    bundles: np.ndarray  # uint32[n_ff], position order
    tensors: np.ndarray  # uint32: per CHECKSUM_BLOCK of ffn_gate (none when ungated), ffn_up, ffn_down
    down_table: int  # of the down scale table (0: none)
    predictor: int  # of the predictor blob (0: none)


@dataclass
class OfflineData:
    """What the offline stage learned, stored with the bundles (docs/FORMAT.md section 4)."""

    rule: str  # C.SPARSITY_RULES
    active_fraction: float
    thresholds: Sequence[float]  # per layer
    predictors: Sequence[bytes]  # per layer blob (ripple_gguf.predictor layout), or empty
    predictor_rank: int
    recall_target: float
    placement_quality: dict
    predictor_metrics: dict
    calib_text: str
    calib_tokens: int
    seed: int
    default_mode: str = "sparse"  # C.DEFAULT_MODES; written with the predictors
    default_mode_reason: str = ""  # why "exact" (the converter's self-check)
    # per layer, neuron order: how often each neuron is needed, 0..255 (255 = every token); or empty
    frequency: Sequence[np.ndarray] = ()
    predictor_kind: str = "lowrank"  # C.PREDICTOR_KINDS
    sketch_outliers: int = 0  # sketch predictors: exact input channels per layer
    sketch_budget: float = 0.0  # sketch predictors: mean selected fraction the thresholds were calibrated to


@dataclass
class SourceInfo:
    name: str
    sha256: str
    size: int


# --- writer -----------------------------------------------------------------------------------

# -> (uint8 (n_ff, bundle_size) in neuron-id order, the layer's down scale table: bytes, b"" if none)
BundleMaker = Callable[[RippleLayer], "tuple[np.ndarray, bytes]"]


def write_ripple_gguf(dst: os.PathLike | str, src: GGUFHeader, layers: Sequence[RippleLayer], *,
                      source: SourceInfo, placement_method: str, make_bundles: BundleMaker,
                      offline: Optional[OfflineData] = None,
                      progress: Callable[[Iterable], Iterable] = lambda it: it) -> None:
    """Write the ripple-packed file to ``dst`` (the caller owns temp-file and rename handling).

    Fills the absolute offsets of ``layers``. Holds one layer's bundles in memory at a time.
    """
    ffn_names = {C.ffn_tensor_name(l.block, k) for l in layers for k in C.FFN_KINDS}
    rest = [t for t in src.tensors if t.name not in ffn_names]
    ffn = [src.tensor(C.ffn_tensor_name(l.block, k)) for l in layers for k in C.FFN_KINDS]
    ordered = rest + [t for t in ffn if t is not None]
    a = src.alignment

    offsets, pos = [], 0
    for t in ordered:
        offsets.append(pos)
        pos = align(pos + t.nbytes, a)
    data_size = pos

    blobs = list(offline.predictors) if offline is not None else []
    if blobs and len(blobs) != len(layers):
        raise ValueError(f"{len(blobs)} predictors for {len(layers)} layers")
    rel = C.HEADER_SIZE
    for l in layers:
        l.bundles_offset = rel  # relative for now
        rel = align(rel + l.block_bytes, C.ALIGNMENT)
    for l in layers:  # down scale tables (split layout) follow the bundles, 64-byte aligned
        l.down_table_offset = rel if l.down_table_size else 0
        rel = align(rel + l.down_table_size, 64)
    for l, blob in zip(layers, blobs):  # predictors follow the bundles, 64-byte aligned
        l.predictor_offset, l.predictor_size = rel, len(blob)
        rel = align(rel + len(blob), 64)
    ck_block = C.CHECKSUM_BLOCK
    ck_offset, ck_size = rel, 4 * sum(l.checksum_entries(ck_block) for l in layers)
    rel = align(rel + ck_size, C.ALIGNMENT)
    region_size = rel + C.FOOTER_SIZE
    # from the region start, as the keys hold them (the layers get absolute offsets below)
    rel_offsets = {k: [getattr(l, f"{k}_offset") for l in layers] for k in ("bundles", "down_table", "predictor")}
    region_id = region_id_for(source.sha256, layers)

    def ripple_kvs(region_offset: int, file_size: int, table_sha: str, region_sha: str, meta_sha: str) -> list[bytes]:
        I32, U64 = V.INT32, V.UINT64
        arr = lambda key, sub, vals: pack_kv(key, V.ARRAY, vals, sub)
        return [
            pack_kv(Keys.FORMAT_VERSION, V.UINT32, C.FORMAT_VERSION),
            pack_kv(Keys.TOOL_VERSION, V.STRING, f"{C.TOOL_NAME} {C.TOOL_VERSION}"),
            pack_kv(Keys.Source.NAME, V.STRING, source.name),
            pack_kv(Keys.Source.SHA256, V.STRING, source.sha256),
            pack_kv(Keys.Source.SIZE, U64, source.size),
            pack_kv(Keys.Region.OFFSET, U64, region_offset),
            pack_kv(Keys.Region.SIZE, U64, region_size),
            pack_kv(Keys.Region.ID, V.STRING, region_id.hex()),
            pack_kv(Keys.Region.FILE_SIZE, U64, file_size),
            pack_kv(Keys.Region.ALIGNMENT, V.UINT32, C.ALIGNMENT),
            pack_kv(Keys.Checksum.OFFSET, U64, ck_offset),
            pack_kv(Keys.Checksum.SIZE, U64, ck_size),
            pack_kv(Keys.Checksum.BLOCK_SIZE, V.UINT32, ck_block),
            pack_kv(Keys.Layout.N_LAYERS, V.UINT32, len(layers)),
            pack_kv(Keys.Layout.N_EMBD, V.UINT32, layers[0].n_embd),
            arr(Keys.Layout.LAYER_INDEX, I32, [l.block for l in layers]),
            arr(Keys.Layout.N_FF, I32, [l.n_ff for l in layers]),
            arr(Keys.Layout.OFFSET, U64, rel_offsets["bundles"]),
            arr(Keys.Layout.BUNDLE_SIZE, U64, [l.bundle_size for l in layers]),
            arr(Keys.Layout.GATE_TYPE, I32, [l.gate_type for l in layers]),
            arr(Keys.Layout.UP_TYPE, I32, [l.up_type for l in layers]),
            arr(Keys.Layout.DOWN_TYPE, I32, [l.down_type for l in layers]),
            arr(Keys.Layout.DOWN_LAYOUT, I32, [l.down_layout for l in layers]),
            arr(Keys.Layout.DOWN_TABLE_OFFSET, U64, rel_offsets["down_table"]),
            arr(Keys.Layout.DOWN_TABLE_SIZE, U64, [l.down_table_size for l in layers]),
            pack_kv(Keys.Placement.METHOD, V.STRING, placement_method),
            arr(Keys.Placement.ORDER, I32, np.concatenate([l.order for l in layers])),
            *offline_kvs(),
            # Last: the digests, known once the region is written (the header is then rewritten,
            # same length); the metadata hash covers every record before its own.
            pack_kv(Keys.Checksum.SHA256, V.STRING, table_sha),
            pack_kv(Keys.Region.SHA256, V.STRING, region_sha),
            pack_kv(Keys.METADATA_SHA256, V.STRING, meta_sha),
        ]

    def offline_kvs() -> list[bytes]:
        if offline is None:
            return []
        F32, U64 = V.FLOAT32, V.UINT64
        arr = lambda key, sub, vals: pack_kv(key, V.ARRAY, vals, sub)
        kv = [
            pack_kv(Keys.Placement.QUALITY, V.STRING, json.dumps(offline.placement_quality, sort_keys=True)),
            pack_kv(Keys.Sparsity.RULE, V.STRING, offline.rule),
            pack_kv(Keys.Sparsity.ACTIVE_FRACTION, F32, float(offline.active_fraction)),
            arr(Keys.Sparsity.THRESHOLD, F32, [float(t) for t in offline.thresholds]),
            pack_kv(Keys.Calibration.TEXT, V.STRING, offline.calib_text),
            pack_kv(Keys.Calibration.TOKENS, V.UINT32, int(offline.calib_tokens)),
            pack_kv(Keys.Calibration.SEED, V.UINT32, int(offline.seed)),
        ]
        if len(offline.frequency):
            kv.append(arr(Keys.Placement.FREQUENCY, V.UINT8,
                          np.concatenate([np.asarray(f, dtype=np.uint8)[l.order]
                                          for f, l in zip(offline.frequency, layers)])))
        if blobs:
            kv += [
                pack_kv(Keys.Predictor.RANK, V.UINT32, int(offline.predictor_rank)),
                pack_kv(Keys.Predictor.RECALL_TARGET, F32, float(offline.recall_target)),
                arr(Keys.Predictor.OFFSET, U64, rel_offsets["predictor"]),
                arr(Keys.Predictor.SIZE, U64, [l.predictor_size for l in layers]),
                pack_kv(Keys.Predictor.METRICS, V.STRING, json.dumps(offline.predictor_metrics, sort_keys=True)),
                pack_kv(Keys.Predictor.KIND, V.STRING, offline.predictor_kind),
                *([pack_kv(Keys.Predictor.SKETCH_OUTLIERS, V.UINT32, int(offline.sketch_outliers)),
                   pack_kv(Keys.Predictor.SKETCH_BUDGET, V.FLOAT32, float(offline.sketch_budget))]
                  if offline.predictor_kind == "sketch" else []),
                pack_kv(Keys.Runtime.DEFAULT_MODE, V.STRING, offline.default_mode),
            ]
            if offline.default_mode_reason:
                kv.append(pack_kv(Keys.Runtime.DEFAULT_MODE_REASON, V.STRING, offline.default_mode_reason))
        return kv

    src_kvs = list(src.kv.values())

    def header_bytes(region_offset: int, file_size: int, table_sha: str, region_sha: str) -> bytes:
        with open(src.path, "rb") as f:
            raw = []
            for v in sorted(src_kvs, key=lambda v: v.span[0]):
                f.seek(v.span[0])
                raw.append(f.read(v.span[1] - v.span[0]))
        rk = ripple_kvs(region_offset, file_size, table_sha, region_sha, placeholder)
        head = struct.pack("<4sIQQ", GGUF_MAGIC, GGUF_VERSION, len(ordered), len(raw) + len(rk))
        kv_bytes = b"".join(raw) + b"".join(rk)
        infos = b"".join(_pack_tensor_info(t, o) for t, o in zip(ordered, offsets))
        meta = (len(head) + len(kv_bytes) - len(rk[-1]), len(head) + len(kv_bytes))  # the last record
        digest = metadata_sha256(head + kv_bytes + infos, meta).encode("ascii")
        return head + kv_bytes[:-64] + digest + infos  # the digest's hex string ends the record

    placeholder = "0" * 64
    probe = header_bytes(0, 0, placeholder, placeholder)
    data_start = align(len(probe), a)
    region_offset = align(data_start + data_size, C.ALIGNMENT)
    file_size = region_offset + region_size
    header = header_bytes(region_offset, file_size, placeholder, placeholder)
    assert len(header) == len(probe)

    new_abs = {t.name: data_start + o for t, o in zip(ordered, offsets)}
    for l in layers:
        l.bundles_offset += region_offset
        if l.predictor_size:
            l.predictor_offset += region_offset
        if l.down_table_size:
            l.down_table_offset += region_offset
        l.gate_offset = new_abs[C.ffn_tensor_name(l.block, "gate")] if l.gated else 0
        l.up_offset = new_abs[C.ffn_tensor_name(l.block, "up")]
        l.down_offset = new_abs[C.ffn_tensor_name(l.block, "down")]

    from ripple_gguf._native import crc32c, crc32c_blocks

    region_hash = hashlib.sha256()
    tensor_crc: dict[str, np.ndarray] = {}
    with open(src.path, "rb") as fin, open(dst, "wb") as fout:
        fout.write(header)
        _pad_to(fout, data_start)
        for t, o in zip(ordered, offsets):
            _pad_to(fout, data_start + o)
            crcs = _copy_range(fin, src.data_offset + t.offset, t.nbytes, fout,
                               ck_block if t.name in ffn_names else 0)
            if t.name in ffn_names:
                tensor_crc[t.name] = crcs
        _pad_to(fout, region_offset)

        def emit(b: bytes | memoryview) -> None:
            fout.write(b)
            region_hash.update(b)

        emit(_REGION_HEADER.pack(C.REGION_MAGIC, C.FORMAT_VERSION, len(layers), region_size, region_id)
             .ljust(C.HEADER_SIZE, b"\0"))
        tables, bundle_crc = [], []
        for l in progress(layers):
            bundles, table = make_bundles(l)
            assert bundles.shape == (l.n_ff, l.bundle_size) and bundles.dtype == np.uint8
            assert len(table) == l.down_table_size, (len(table), l.down_table_size)
            placed = np.ascontiguousarray(bundles[l.order])
            del bundles
            bundle_crc.append(crc32c_blocks(placed, l.bundle_size))
            emit(memoryview(placed).cast("B"))
            del placed
            tables.append(table)
            end = l.bundles_offset - region_offset + l.block_bytes
            emit(bytes(align(end, C.ALIGNMENT) - end))
        for l, table in zip(layers, tables):
            if table:
                assert fout.tell() == l.down_table_offset, (fout.tell(), l.down_table_offset)
                emit(table)
                emit(bytes(align(len(table), 64) - len(table)))
        for l, blob in zip(layers, blobs):
            assert fout.tell() == l.predictor_offset, (fout.tell(), l.predictor_offset)
            emit(blob)
            emit(bytes(align(len(blob), 64) - len(blob)))
        assert fout.tell() == region_offset + ck_offset, (fout.tell(), region_offset + ck_offset)
        parts = []
        for i, l in enumerate(layers):
            names = [C.ffn_tensor_name(l.block, k) for k in C.FFN_KINDS]
            parts += [bundle_crc[i], *(tensor_crc[n] for n in names if n in tensor_crc),
                      np.array([crc32c(tables[i]), crc32c(blobs[i]) if blobs else 0], dtype=np.uint32)]
        ck_table = np.concatenate(parts).astype("<u4").tobytes()
        assert len(ck_table) == ck_size, (len(ck_table), ck_size)
        emit(ck_table)
        emit(bytes(align(fout.tell(), C.ALIGNMENT) - fout.tell()))
        emit(_FOOTER.pack(C.FOOTER_MAGIC, region_size, region_id).ljust(C.FOOTER_SIZE, b"\0"))
        assert fout.tell() == file_size, (fout.tell(), file_size)
        fout.seek(0)
        fout.write(header_bytes(region_offset, file_size, hashlib.sha256(ck_table).hexdigest(),
                                region_hash.hexdigest()))


def _pad_to(f, pos: int) -> None:
    cur = f.tell()
    assert cur <= pos, (cur, pos)
    if pos > cur:
        f.write(bytes(pos - cur))


def _copy_range(fin, offset: int, n: int, fout, crc_block: int = 0, chunk: int = 8 << 20) -> Optional[np.ndarray]:
    """Copy n bytes; with crc_block, return the CRC32C of each crc_block bytes copied."""
    from ripple_gguf._native import crc32c_blocks

    assert chunk % max(crc_block, 1) == 0
    fin.seek(offset)
    crcs = []
    while n:
        b = fin.read(min(chunk, n))
        if not b:
            raise RippleFormatError(fin.name, f"truncated while copying tensor data at {offset}")
        fout.write(b)
        if crc_block:
            crcs.append(crc32c_blocks(b, crc_block))
        n -= len(b)
    if not crc_block:
        return None
    return np.concatenate(crcs) if crcs else np.zeros(0, dtype=np.uint32)


# --- reader -----------------------------------------------------------------------------------

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
        from ripple_gguf._native import crc32c

        if crc32c(data) != want:
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

    def read_down_table(self, layer: RippleLayer) -> bytes:
        """The layer's down scale table (split layout; b"" for column layouts), checked: finite,
        its entries for the first and last row of ffn_down equal that row's (scale, min) pairs, and it
        matches the checksum table."""
        from ripple_gguf.convert import split_values  # the converter's own parsing

        if not layer.down_table_size:
            return b""
        p = self.path
        fd = os.open(p, os.O_RDONLY)
        try:
            table = _pread(p, fd, layer.down_table_offset, layer.down_table_size)
            dm = np.frombuffer(table, dtype="<f4").reshape(layer.n_ff // layer.down_group, layer.n_embd, 2)
            bad = not np.all(np.isfinite(dm))
            rs = layer.down_src_row_size
            for r in sorted({0, layer.n_embd - 1}):
                raw = np.frombuffer(_pread(p, fd, layer.down_offset + r * rs, rs), dtype=np.uint8)
                bad = bad or not np.array_equal(split_values(raw, layer.down_src_type, layer.n_ff, 1)[1][0], dm[:, r])
        finally:
            os.close(fd)
        if bad:
            raise RippleFormatError(p, f"layer {layer.block}: down scale table does not match ffn_down's scales "
                                       "(file modified after conversion?)")
        self._check_crc(layer, "down scale table", table, self._layer_checksums(layer).down_table)
        return table

    def read_predictor(self, layer: RippleLayer):
        """The layer's predictor (reads its blob): a :class:`ripple_gguf.predictor.Predictor` (low
        rank) or a :class:`ripple_gguf.sketch.Sketch`, by the blob's magic."""
        from ripple_gguf import sketch
        from ripple_gguf.predictor import Predictor

        blob = self.read_predictor_blob(layer)
        try:
            if blob[:4] == sketch.MAGIC:
                return sketch.Sketch.from_bytes(blob, layer.n_embd, layer.n_ff)
            return Predictor.from_bytes(blob, layer.n_embd, layer.n_ff)
        except ValueError as e:
            raise RippleFormatError(self.path, f"layer {layer.block}: bad predictor: {e}") from None

    # --- checks ---

    def _check_frame(self, fd: int) -> None:
        p = self.path
        actual = os.fstat(fd).st_size
        if actual != self.file_size:
            raise RippleFormatError(p, f"file size {actual} != {self.file_size} recorded at conversion "
                                       "(truncated or modified)")
        if self.region_offset + self.region_size != self.file_size:
            raise RippleFormatError(p, "region does not end at the end of the file")
        magic, version, n_layers, size, rid = _REGION_HEADER.unpack(
            _pread(p, fd, self.region_offset, _REGION_HEADER.size))
        if magic != C.REGION_MAGIC:
            raise RippleFormatError(p, f"no ripple region header at offset {self.region_offset}")
        if (version, n_layers, size, rid.hex()) != (self.metadata[Keys.FORMAT_VERSION], self.n_layers, self.region_size,
                                                    self.region_id):
            raise RippleFormatError(p, "region header does not match the metadata (region from another file?)")
        fmagic, fsize, fid = _FOOTER.unpack(_pread(p, fd, self.file_size - C.FOOTER_SIZE, _FOOTER.size))
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
        from ripple_gguf._native import crc32c, crc32c_blocks
        from ripple_gguf.convert import make_layer_bundles  # the converter's own derivation

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
                want, table = make_layer_bundles(data, l)
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
                tensors = [crc32c_blocks(data[o:o + n], self.checksum_block)
                           for o, n in zip(offs, l.tensor_bytes) if n]
                blob = data[l.predictor_offset:l.predictor_offset + l.predictor_size] if l.predictor_size else b""
                if not (np.array_equal(crc32c_blocks(got, l.bundle_size), ck.bundles)
                        and np.array_equal(np.concatenate(tensors), ck.tensors)
                        and crc32c(table) == ck.down_table and crc32c(blob) == ck.predictor):
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
