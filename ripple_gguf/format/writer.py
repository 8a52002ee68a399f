"""The writer of ripple-packed GGUFs (docs/FORMAT.md): the source's standard tensors copied
byte for byte with the FFN tensors last, then the ripple region (header, bundle blocks, down scale
tables, predictor blobs, checksum table, footer); the GGUF header rewritten last with the digests.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
from gguf.constants import GGUFValueType as V

from .. import binding
from . import constants as C
from .constants import Keys
from .layout import (ARRAY_DTYPES, FOOTER, GGUF_MAGIC, GGUF_VERSION, REGION_HEADER, SCALAR_FORMATS, GGUFHeader,
                     GGUFTensorInfo, OfflineData, RippleFormatError, RippleLayer, SourceInfo, align,
                     metadata_sha256)

# --- GGUF serialization ------------------------------------------------------------------------

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
        return out + np.ascontiguousarray(value, dtype=ARRAY_DTYPES[sub_type]).tobytes()
    if vtype == V.STRING:
        return out + _pack_str(value)
    return out + struct.pack(SCALAR_FORMATS[vtype], value)


def _pack_tensor_info(t: GGUFTensorInfo, offset: int) -> bytes:
    return (_pack_str(t.name) + struct.pack("<I", len(t.shape))
            + struct.pack(f"<{len(t.shape)}Q", *t.shape) + struct.pack("<IQ", t.type, offset))


# --- the file ----------------------------------------------------------------------------------

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

        emit(REGION_HEADER.pack(C.REGION_MAGIC, C.FORMAT_VERSION, len(layers), region_size, region_id)
             .ljust(C.HEADER_SIZE, b"\0"))
        tables, bundle_crc = [], []
        for l in progress(layers):
            bundles, table = make_bundles(l)
            assert bundles.shape == (l.n_ff, l.bundle_size) and bundles.dtype == np.uint8
            assert len(table) == l.down_table_size, (len(table), l.down_table_size)
            placed = np.ascontiguousarray(bundles[l.order])
            del bundles
            bundle_crc.append(binding.crc32c_blocks(placed, l.bundle_size))
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
                      np.array([binding.crc32c(tables[i]), binding.crc32c(blobs[i]) if blobs else 0], dtype=np.uint32)]
        ck_table = np.concatenate(parts).astype("<u4").tobytes()
        assert len(ck_table) == ck_size, (len(ck_table), ck_size)
        emit(ck_table)
        emit(bytes(align(fout.tell(), C.ALIGNMENT) - fout.tell()))
        emit(FOOTER.pack(C.FOOTER_MAGIC, region_size, region_id).ljust(C.FOOTER_SIZE, b"\0"))
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
    assert chunk % max(crc_block, 1) == 0
    fin.seek(offset)
    crcs = []
    while n:
        b = fin.read(min(chunk, n))
        if not b:
            raise RippleFormatError(fin.name, f"truncated while copying tensor data at {offset}")
        fout.write(b)
        if crc_block:
            crcs.append(binding.crc32c_blocks(b, crc_block))
        n -= len(b)
    if not crc_block:
        return None
    return np.concatenate(crcs) if crcs else np.zeros(0, dtype=np.uint32)
