"""The writer of ripple-packed GGUFs (docs/FORMAT.md): the GGUF header (the source's key/value
records, then the ripple.* keys, then the tensor infos) rendered by gguf-py's GGUFWriter, the
source's standard tensors copied byte for byte with the FFN tensors last, then the ripple region
(header, bundle blocks, down scale tables, predictor blobs, checksum table, footer) appended; the
header rendered again last with the digests (same length).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGUFValueType as V

from .. import binding
from . import constants as C
from .constants import Keys
from .layout import (ARRAY_DTYPES, FOOTER, REGION_HEADER, GGUFHeader,
                     GGUFTensorInfo, OfflineData, RippleFormatError, RippleLayer, SourceInfo, align,
                     metadata_sha256)

# --- the GGUF part (gguf-py's GGUFWriter) ------------------------------------------------------

KV = Tuple[str, int, Any, Optional[int]]  # key, value type, value, array element type


def _kv(key: str, vtype: int, value: Any, sub_type: int | None = None) -> KV:
    return key, vtype, value, sub_type


def _gguf_value(v: Any) -> Any:
    """A value as GGUFWriter packs it (numeric arrays as lists)."""
    return v.tolist() if isinstance(v, np.ndarray) else v


def render_gguf_header(kvs: Sequence[KV], tensors: Sequence[GGUFTensorInfo], alignment: int,
                       scratch: os.PathLike | str) -> tuple[bytes, int]:
    """(the bytes, the end of the key/value records) of a GGUF header: the records in order, then
    the tensor infos with their data offsets packed at ``alignment``; written by gguf-py's
    GGUFWriter to the file ``scratch`` (removed)."""
    w = GGUFWriter(scratch, arch="")
    w.kv_data = [{}]  # no general.architecture of its own: the records are the caller's, in order
    w.data_alignment = alignment
    for key, vtype, value, sub_type in kvs:
        w.add_key_value(key, _gguf_value(value), V(vtype), None if sub_type is None else V(sub_type))
    for t in tensors:
        # GGUFWriter takes numpy's order (ne0 last) and a non-byte dtype to keep the shape as given
        w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.nbytes, raw_dtype=t.type)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        kv_end = w.fout[0].tell()
        w.write_ti_data_to_file()
    finally:
        w.close()
    try:
        with open(scratch, "rb") as f:
            return f.read(), kv_end
    finally:
        os.unlink(scratch)


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

    def ripple_kvs(region_offset: int, file_size: int, table_sha: str, region_sha: str, meta_sha: str) -> list[KV]:
        I32, U64 = V.INT32, V.UINT64
        arr = lambda key, sub, vals: _kv(key, V.ARRAY, np.asarray(vals, dtype=ARRAY_DTYPES[sub]), sub)
        return [
            _kv(Keys.FORMAT_VERSION, V.UINT32, C.FORMAT_VERSION),
            _kv(Keys.TOOL_VERSION, V.STRING, f"{C.TOOL_NAME} {C.TOOL_VERSION}"),
            _kv(Keys.Source.NAME, V.STRING, source.name),
            _kv(Keys.Source.SHA256, V.STRING, source.sha256),
            _kv(Keys.Source.SIZE, U64, source.size),
            _kv(Keys.Region.OFFSET, U64, region_offset),
            _kv(Keys.Region.SIZE, U64, region_size),
            _kv(Keys.Region.ID, V.STRING, region_id.hex()),
            _kv(Keys.Region.FILE_SIZE, U64, file_size),
            _kv(Keys.Region.ALIGNMENT, V.UINT32, C.ALIGNMENT),
            _kv(Keys.Checksum.OFFSET, U64, ck_offset),
            _kv(Keys.Checksum.SIZE, U64, ck_size),
            _kv(Keys.Checksum.BLOCK_SIZE, V.UINT32, ck_block),
            _kv(Keys.Layout.N_LAYERS, V.UINT32, len(layers)),
            _kv(Keys.Layout.N_EMBD, V.UINT32, layers[0].n_embd),
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
            _kv(Keys.Placement.METHOD, V.STRING, placement_method),
            arr(Keys.Placement.ORDER, I32, np.concatenate([l.order for l in layers])),
            *offline_kvs(),
            # Last: the digests, known once the region is written (the header is then rewritten,
            # same length); the metadata hash covers every record before its own.
            _kv(Keys.Checksum.SHA256, V.STRING, table_sha),
            _kv(Keys.Region.SHA256, V.STRING, region_sha),
            _kv(Keys.METADATA_SHA256, V.STRING, meta_sha),
        ]

    def offline_kvs() -> list[KV]:
        if offline is None:
            return []
        F32, U64 = V.FLOAT32, V.UINT64
        arr = lambda key, sub, vals: _kv(key, V.ARRAY, np.asarray(vals, dtype=ARRAY_DTYPES[sub]), sub)
        kv = [
            _kv(Keys.Placement.QUALITY, V.STRING, json.dumps(offline.placement_quality, sort_keys=True)),
            _kv(Keys.Sparsity.RULE, V.STRING, offline.rule),
            _kv(Keys.Sparsity.ACTIVE_FRACTION, F32, float(offline.active_fraction)),
            arr(Keys.Sparsity.THRESHOLD, F32, [float(t) for t in offline.thresholds]),
            _kv(Keys.Calibration.TEXT, V.STRING, offline.calib_text),
            _kv(Keys.Calibration.TOKENS, V.UINT32, int(offline.calib_tokens)),
            _kv(Keys.Calibration.SEED, V.UINT32, int(offline.seed)),
        ]
        if len(offline.frequency):
            kv.append(arr(Keys.Placement.FREQUENCY, V.UINT8,
                          np.concatenate([np.asarray(f, dtype=np.uint8)[l.order]
                                          for f, l in zip(offline.frequency, layers)])))
        if blobs:
            kv += [
                _kv(Keys.Predictor.RANK, V.UINT32, int(offline.predictor_rank)),
                _kv(Keys.Predictor.RECALL_TARGET, F32, float(offline.recall_target)),
                arr(Keys.Predictor.OFFSET, U64, rel_offsets["predictor"]),
                arr(Keys.Predictor.SIZE, U64, [l.predictor_size for l in layers]),
                _kv(Keys.Predictor.METRICS, V.STRING, json.dumps(offline.predictor_metrics, sort_keys=True)),
                _kv(Keys.Predictor.KIND, V.STRING, offline.predictor_kind),
                *([_kv(Keys.Predictor.SKETCH_OUTLIERS, V.UINT32, int(offline.sketch_outliers)),
                   _kv(Keys.Predictor.SKETCH_BUDGET, V.FLOAT32, float(offline.sketch_budget))]
                  if offline.predictor_kind == "sketch" else []),
                _kv(Keys.Runtime.DEFAULT_MODE, V.STRING, offline.default_mode),
            ]
            if offline.default_mode_reason:
                kv.append(_kv(Keys.Runtime.DEFAULT_MODE_REASON, V.STRING, offline.default_mode_reason))
        return kv

    src_kvs = [(k, v.type, v.value, v.sub_type) for k, v in sorted(src.kv.items(), key=lambda kv: kv[1].span[0])]
    for k, vtype, value, _ in src_kvs:
        if vtype == V.ARRAY and len(value) == 0:  # gguf-py never writes one; GGUFWriter refuses it
            raise RippleFormatError(src.path, f"metadata key {k!r} is an empty array, which gguf-py's GGUFWriter "
                                    "cannot write (GGUF files written by gguf-py never hold one)")
    scratch = f"{os.fspath(dst)}.header"

    def header_bytes(region_offset: int, file_size: int, table_sha: str, region_sha: str) -> bytes:
        rk = ripple_kvs(region_offset, file_size, table_sha, region_sha, placeholder)
        raw, kv_end = render_gguf_header(src_kvs + rk, ordered, a, scratch)
        key = rk[-1][0].encode("utf-8")
        meta = (kv_end - (8 + len(key) + 4 + 8 + 64), kv_end)  # the last record
        digest = metadata_sha256(raw, meta).encode("ascii")
        return raw[:kv_end - 64] + digest + raw[kv_end:]  # the digest's hex string ends the record

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
