"""The layout of a ripple-packed GGUF (docs/FORMAT.md): ggml row types and sizes, the split
down-column table (the C library's, through the binding), the GGUF header as parsed, one FFN layer's bundles and offsets
(:class:`RippleLayer`), and what the offline stage stores besides them (:class:`OfflineData`).
Shared by the reader, the writer and the converter; no I/O here."""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType as V

from .. import binding
from . import constants as C

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

REGION_HEADER = struct.Struct("<8sIIQ32s")  # magic, format version, n_layers, region size, id
FOOTER = struct.Struct("<8sQ32s")  # magic, region size, id

SCALAR_FORMATS = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
    V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d",
}
ARRAY_DTYPES = {t: np.dtype(f) for t, f in SCALAR_FORMATS.items()}


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


def _split_types() -> dict:
    """{type: SplitType} of every ggml type whose down columns can be split, as the C library's
    ripple_split_info (csrc/ripple_split.c) tells them: C owns the table."""
    out = {}
    for t in T:
        info = binding.split_info(t)
        if info is not None:
            out[t] = SplitType(*info[:3])
    return out


# Split down columns (constants.DOWN_LAYOUTS): source types whose blocks (or k-quant sub-blocks)
# are a scale, maybe a minimum, and one small integer per value.
SPLIT_TYPES = _split_types()


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


# --- the GGUF header, as parsed -----------------------------------------------------------------

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


# --- the ripple layout ---------------------------------------------------------------------------

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


def metadata_sha256(header: bytes, skip: tuple[int, int]) -> str:
    """sha256 of a GGUF header (its bytes up to the end of the tensor infos: every key/value record
    and tensor info) without the bytes [skip[0], skip[1]) of the ripple.metadata.sha256 record."""
    h = hashlib.sha256(b"ripple-gguf metadata\0")
    h.update(header[:skip[0]])
    h.update(header[skip[1]:])
    return h.hexdigest()


@dataclass
class OfflineData:
    """What the offline stage learned, stored with the bundles (docs/FORMAT.md section 4)."""

    rule: str  # C.SPARSITY_RULES
    active_fraction: float
    thresholds: Sequence[float]  # per layer
    predictors: Sequence[bytes]  # per layer blob (ripple_gguf.offline.predictor layout), or empty
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
