"""The ripple-packed file format: layout, reader, and detection of damaged files."""
from __future__ import annotations

import os
import shutil
import struct

import gguf
import numpy as np
import pytest

from ripple_gguf.format import constants as C
from ripple_gguf.format.constants import Keys
from ripple_gguf.format.layout import RippleFormatError
from ripple_gguf.format.reader import RippleFile, read_gguf_header
from ripple_gguf.offline.convert import convert
from .synth import make_model


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    d = tmp_path_factory.mktemp("fmt")
    src = make_model(d / "src.gguf", n_layers=3, ffn_type={"gate": "q8_0", "up": "q4_0", "down": "f16"})
    dst = d / "src.ripple.gguf"
    convert(src, dst, quiet=True)
    return src, str(dst)


def _copy(path, tmp_path, name="copy.gguf"):
    out = tmp_path / name
    shutil.copyfile(path, out)
    return str(out)


def test_standard_part_is_the_source(packed):
    src, dst = packed
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys()
    for name, t in ta.items():
        u = tb[name]
        assert (t.tensor_type, list(t.shape)) == (u.tensor_type, list(u.shape))
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8)), name
    for key, f in a.fields.items():
        if key.startswith("GGUF."):
            continue
        assert b.fields[key].types == f.types
        assert all(np.array_equal(x, y) for x, y in zip(f.parts, b.fields[key].parts)), key
    assert {k for k in b.fields if k not in a.fields and not k.startswith("GGUF.")} == \
        {k for k in b.fields if k.startswith("ripple.")}
    # the FFN weight tensors hold the last data offsets
    by_offset = [t.name for t in sorted(b.tensors, key=lambda t: t.data_offset)]
    ffn = [f"blk.{i}.ffn_{k}.weight" for i in range(3) for k in ("gate", "up", "down")]
    assert by_offset[-len(ffn):] == ffn


def test_region_layout(packed):
    src, dst = packed
    rf = RippleFile.open(dst)
    assert rf.file_size == os.path.getsize(dst)
    assert rf.region_offset % C.ALIGNMENT == 0
    assert rf.region_offset + rf.region_size == rf.file_size
    assert rf.source.size == os.path.getsize(src) and rf.source.name == "src.gguf"
    with open(dst, "rb") as f:
        f.seek(rf.region_offset)
        head = f.read(C.HEADER_SIZE)
        f.seek(rf.file_size - C.FOOTER_SIZE)
        foot = f.read()
    magic, version, n_layers, size, rid = struct.unpack_from("<8sIIQ32s", head)
    assert (magic, version, n_layers, size, rid.hex()) == (C.REGION_MAGIC, C.FORMAT_VERSION, 3, rf.region_size, rf.region_id)
    assert head[struct.calcsize("<8sIIQ32s"):] == bytes(C.HEADER_SIZE - struct.calcsize("<8sIIQ32s"))
    fmagic, fsize, fid = struct.unpack_from("<8sQ32s", foot)
    assert (fmagic, fsize, fid.hex(), len(foot)) == (C.FOOTER_MAGIC, rf.region_size, rf.region_id, C.FOOTER_SIZE)
    prev_end = rf.region_offset + C.HEADER_SIZE
    for i, l in enumerate(rf.layers):
        assert l.block == i and l.n_ff == 128 and l.n_embd == 64
        assert (l.bundles_offset - rf.region_offset) % C.ALIGNMENT == 0 and l.bundles_offset >= prev_end
        assert l.bundle_size == 68 + 36 + 128  # q8_0 row + q4_0 row + f16 column
        assert l.order.dtype == np.int32 and np.array_equal(l.order, np.arange(128))
        prev_end = l.bundles_offset + l.n_ff * l.bundle_size
    assert rf.metadata[Keys.Placement.METHOD] == "original"
    rf.check_quick()
    rf.verify_full()


def test_layer_desc_offsets_point_at_standard_tensors(packed):
    _, dst = packed
    rf = RippleFile.open(dst)
    r = gguf.GGUFReader(dst)
    offs = {t.name: t.data_offset for t in r.tensors}
    for l in rf.layers:
        assert l.gate_offset == offs[f"blk.{l.block}.ffn_gate.weight"]
        assert l.up_offset == offs[f"blk.{l.block}.ffn_up.weight"]
        assert l.down_offset == offs[f"blk.{l.block}.ffn_down.weight"]
        assert (l.gate_type, l.up_type, l.down_type, l.down_src_type) == (8, 2, 1, 1)


def test_deterministic(packed, tmp_path):
    src, dst = packed
    again = tmp_path / "again.gguf"
    convert(src, again, quiet=True)
    with open(dst, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()


def test_to_json_and_is_ripple(packed):
    src, dst = packed
    assert RippleFile.is_ripple(dst) and not RippleFile.is_ripple(src)
    j = RippleFile.open(dst).to_json()
    assert j["format_version"] == C.FORMAT_VERSION and j["placement"]["method"] == "original"
    assert j["region"]["id"] == RippleFile.open(dst).region_id
    assert [l["block"] for l in j["layers"]] == [0, 1, 2] and "order" not in j["layers"][0]
    assert j["layers"][0]["down_type"] == "F16"


def test_open_rejects_plain_gguf(packed):
    src, _ = packed
    with pytest.raises(RippleFormatError, match="src.gguf.*not a ripple-packed"):
        RippleFile.open(src)


def test_truncated_file_detected(packed, tmp_path):
    _, dst = packed
    p = _copy(dst, tmp_path)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 100)
    rf = RippleFile.open(p)  # metadata still parses
    with pytest.raises(RippleFormatError, match="copy.gguf.*file size"):
        rf.check_quick()
    with pytest.raises(RippleFormatError, match="copy.gguf"):
        rf.verify_full()


def test_truncated_into_tensor_data_detected(packed, tmp_path):
    _, dst = packed
    p = _copy(dst, tmp_path)
    with open(p, "r+b") as f:
        f.truncate(RippleFile.open(dst).region_offset - 4096)
    with pytest.raises(RippleFormatError, match="copy.gguf.*truncated"):
        RippleFile.open(p)


def test_corrupt_header_detected(packed, tmp_path):
    _, dst = packed
    p = _copy(dst, tmp_path)
    with open(p, "r+b") as f:
        f.write(b"XXXX")
    with pytest.raises(RippleFormatError, match="copy.gguf.*not a GGUF"):
        RippleFile.open(p)
    p2 = _copy(dst, tmp_path, "kv.gguf")
    with open(p2, "r+b") as f:
        f.seek(16)
        f.write(struct.pack("<Q", 1 << 40))  # absurd key count
    with pytest.raises(RippleFormatError, match="kv.gguf.*corrupt"):
        RippleFile.open(p2)


def test_altered_bundle_detected(packed, tmp_path):
    _, dst = packed
    rf = RippleFile.open(dst)
    l = rf.layers[1]
    # a byte of the down column of a bundle check_quick does not sample
    p = _copy(dst, tmp_path)
    pos = l.bundles_offset + 5 * l.bundle_size + l.bundle_size - 1
    with open(p, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))
    RippleFile.open(p).check_quick()  # cheap check samples only a few bundles
    with pytest.raises(RippleFormatError, match="copy.gguf.*sha256"):
        RippleFile.open(p).verify_full()
    # a sampled bundle's up row
    p2 = _copy(dst, tmp_path, "up.gguf")
    pos = l.bundles_offset + l.gate_row_size
    with open(p2, "r+b") as f:
        f.seek(pos)
        f.write(b"\xAA\x55")
    with pytest.raises(RippleFormatError, match="up.gguf.*layer 1.*up row"):
        RippleFile.open(p2).check_quick()


def test_bundles_checked_against_tensors_not_only_checksum(packed, tmp_path):
    """A region whose checksum was recomputed still has to match the standard tensors."""
    _, dst = packed
    rf = RippleFile.open(dst)
    l = rf.layers[0]
    p = _copy(dst, tmp_path)
    with open(p, "r+b") as f:
        pos = l.bundles_offset + 7 * l.bundle_size + l.bundle_size - 2
        f.seek(pos)
        f.write(b"\x12\x34")
    r = gguf.GGUFReader(p, "r+")  # patch the checksum in place
    import hashlib
    with open(p, "rb") as f:
        f.seek(rf.region_offset)
        digest = hashlib.sha256(f.read(rf.region_size)).hexdigest()
    field = r.fields[Keys.Region.SHA256]
    field.parts[field.data[0]][:] = np.frombuffer(digest.encode(), dtype=np.uint8)
    r.data.flush()
    del r
    with pytest.raises(RippleFormatError, match="copy.gguf.*layer 0.*neuron 7"):
        RippleFile.open(p).verify_full()


def test_region_from_another_file_detected(packed, tmp_path):
    src, dst = packed
    other_src = make_model(tmp_path / "other.gguf", n_layers=3, seed=1,
                           ffn_type={"gate": "q8_0", "up": "q4_0", "down": "f16"})
    other = tmp_path / "other.ripple.gguf"
    convert(other_src, other, quiet=True)
    a, b = RippleFile.open(dst), RippleFile.open(other)
    assert a.region_size == b.region_size
    p = _copy(dst, tmp_path, "mixed.gguf")
    with open(other, "rb") as f, open(p, "r+b") as g:
        f.seek(b.region_offset)
        g.seek(a.region_offset)
        g.write(f.read())
    with pytest.raises(RippleFormatError, match="mixed.gguf.*region header"):
        RippleFile.open(p).check_quick()


def test_header_reader_matches_gguf_py(packed):
    _, dst = packed
    h = read_gguf_header(dst)
    r = gguf.GGUFReader(dst)
    assert [t.name for t in h.tensors] == [t.name for t in r.tensors]
    assert [h.data_offset + t.offset for t in h.tensors] == [int(t.data_offset) for t in r.tensors]
    assert [t.nbytes for t in h.tensors] == [int(t.n_bytes) for t in r.tensors]


@pytest.mark.parametrize("version", [1, 2])
def test_other_format_version_is_refused(packed, tmp_path, version):
    """Version 2 files (no checksum table) and version 1 are refused: convert again."""
    _, dst = packed
    data = bytearray(open(dst, "rb").read())
    at = data.index(C.Keys.FORMAT_VERSION.encode()) + len(C.Keys.FORMAT_VERSION)
    assert struct.unpack_from("<II", data, at) == (4, C.FORMAT_VERSION)  # GGUF u32 value
    struct.pack_into("<I", data, at + 4, version)
    old = tmp_path / f"v{version}.ripple.gguf"
    old.write_bytes(bytes(data))
    with pytest.raises(RippleFormatError,
                       match=f"v{version}.ripple.gguf: ripple format version {version} is not supported.*convert"):
        RippleFile.open(old)


def test_crc32c():
    """CRC32C (Castagnoli) as the checksum table holds it: the standard check value, and blocks."""
    from ripple_gguf.binding import crc32c, crc32c_blocks

    assert crc32c(b"123456789") == 0xE3069283 and crc32c(b"") == 0
    data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8)
    blocks = crc32c_blocks(data, 1000)
    assert blocks.size == 101 and blocks[-1] == crc32c(data[100_000:].tobytes())
    assert all(blocks[i] == crc32c(data[i * 1000:(i + 1) * 1000].tobytes()) for i in range(100))


def test_checksum_table_covers_every_read(packed):
    """One CRC per bundle and per 64 KiB of each standard FFN tensor, and the header digest."""
    from ripple_gguf.binding import crc32c_blocks

    _, dst = packed
    rf = RippleFile.open(dst)
    data = np.fromfile(dst, dtype=np.uint8)
    assert rf.checksum_block == C.CHECKSUM_BLOCK and rf.checksum_offset % 64 == 0
    assert rf.region_offset < rf.checksum_offset < rf.file_size - C.FOOTER_SIZE
    for l, ck in zip(rf.layers, rf.checksums()):
        got = data[l.bundles_offset:l.bundles_offset + l.block_bytes]
        assert np.array_equal(crc32c_blocks(got, l.bundle_size), ck.bundles)
        want = [crc32c_blocks(data[o:o + n], C.CHECKSUM_BLOCK)
                for o, n in zip((l.gate_offset, l.up_offset, l.down_offset), l.tensor_bytes)]
        assert np.array_equal(np.concatenate(want), ck.tensors)
        assert ck.down_table == 0 and ck.predictor == 0  # f16 columns, no profiling
    assert list(read_gguf_header(dst).kv)[-1] == Keys.METADATA_SHA256


def test_damaged_checksum_table_or_header_detected(packed, tmp_path):
    _, dst = packed
    rf = RippleFile.open(dst)
    p = _copy(dst, tmp_path, "table.gguf")
    with open(p, "r+b") as f:
        f.seek(rf.checksum_offset + 5)
        f.write(b"\x01")
    with pytest.raises(RippleFormatError, match="table.gguf: checksum table does not match"):
        RippleFile.open(p).check_quick()
    with pytest.raises(RippleFormatError, match="table.gguf: region sha256"):
        RippleFile.open(p).verify_full()
    # a byte of a source key's value (general.name) and a tensor info's offset
    hdr = read_gguf_header(dst)
    for name, off in (("name.gguf", hdr.kv["general.name"].span[1] - 1),
                      ("info.gguf", hdr.header_end - 8)):  # the low byte of an offset
        p = _copy(dst, tmp_path, name)
        with open(p, "r+b") as f:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0x20]))
        with pytest.raises(RippleFormatError, match=f"{name}: GGUF header"):
            RippleFile.open(p).check_quick()


def test_gguf_part_is_gguf_writers(packed):
    """The GGUF part is gguf-py's GGUFWriter's rendering of its records and tensor infos: the
    package's reader and gguf-py's agree on every key/value and tensor info, every source record
    keeps its bytes, and GGUFWriter renders the header read back to the file's own bytes."""
    from ripple_gguf.format.writer import render_gguf_header

    src, dst = packed
    h, s, r = read_gguf_header(dst), read_gguf_header(src), gguf.GGUFReader(dst)
    fields = [f for f in r.fields.values() if not f.name.startswith("GGUF.")]
    assert [f.name for f in fields] == list(h.kv)
    for f in fields:
        v = h.kv[f.name]
        assert f.types[0] == v.type and (len(f.types) == 1 or f.types[1] == v.sub_type), f.name
        got = f.contents()
        assert (list(got) == list(v.value)) if v.type == gguf.GGUFValueType.ARRAY else got == v.value, f.name
    assert [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), int(t.data_offset))
            for t in r.tensors] == [(t.name, t.shape, t.type, h.data_offset + t.offset) for t in h.tensors]
    data, sdata = open(dst, "rb").read(), open(src, "rb").read()
    for key, v in s.kv.items():
        assert data[slice(*h.kv[key].span)] == sdata[slice(*v.span)], key
    kvs = [(k, v.type, v.value, v.sub_type) for k, v in h.kv.items()]
    raw, kv_end = render_gguf_header(kvs, h.tensors, h.alignment, os.path.dirname(dst) + "/scratch.header")
    assert kv_end == h.kv[Keys.METADATA_SHA256].span[1]
    assert raw == data[:h.header_end]


def test_empty_array_source_key_is_refused(tmp_path, monkeypatch):
    """gguf-py's GGUFWriter cannot write an empty array (and so never wrote one): a source holding one
    is refused naming the file and the key, before anything is written."""
    from ripple_gguf.format import layout
    from ripple_gguf.offline import convert as convert_mod

    src = make_model(tmp_path / "m.gguf")
    real = convert_mod.read_gguf_header

    def with_empty_array(path):
        hdr = real(path)
        end = max(v.span[1] for v in hdr.kv.values())
        hdr.kv["test.empty"] = layout.GGUFValue(int(gguf.GGUFValueType.ARRAY), np.zeros(0, np.uint8), int(gguf.GGUFValueType.UINT8), (end, end))
        return hdr

    monkeypatch.setattr(convert_mod, "read_gguf_header", with_empty_array)
    dst = tmp_path / "m.ripple.gguf"
    with pytest.raises(RippleFormatError, match=r"m\.gguf: metadata key 'test\.empty' is an empty array"):
        convert(src, dst)
    assert not dst.exists()
