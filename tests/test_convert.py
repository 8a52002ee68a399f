"""The converter: every supported type, bundle contents, stock llama.cpp loading, bad inputs, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from ripple_gguf.cli import main
from ripple_gguf.format import constants as C
from ripple_gguf.format.bundles import from_f32
from ripple_gguf.format.layout import RippleFormatError
from ripple_gguf.format.reader import RippleFile
from ripple_gguf.offline.convert import convert, resolve_down_type
from .synth import make_model, stock_logits

FLOATS = ["F32", "F16", "BF16"]
LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
TOKENS = [1, 72, 101, 108, 108, 111, 200, 3, 44, 2]


def _dims(type_name: str) -> dict:
    # K-quant rows are whole 256-value super-blocks: n_embd (gate/up) and n_ff (down) too
    return dict(n_embd=256, n_ff=256, n_layers=1) if type_name.endswith("_K") else dict(n_embd=64, n_ff=128)


def _f32(raw: np.ndarray, qtype: int, shape: tuple[int, int]) -> np.ndarray:
    return gguf.quants.dequantize(np.asarray(raw).view(np.uint8), T(qtype)).reshape(shape).astype(np.float32)


def _split_decode(cols: np.ndarray, table: np.ndarray, l) -> np.ndarray:
    """Split down columns decoded as docs/FORMAT.md section 3 describes them (position order)."""
    bits, off, group = {T.Q4_0: (4, 8, 32), T.Q4_1: (4, 0, 32), T.Q5_0: (5, 16, 32), T.Q5_1: (5, 0, 32),
                        T.Q8_0: (8, 0, 32), T.Q2_K: (2, 0, 16), T.Q3_K: (3, 4, 16), T.Q4_K: (4, 0, 32),
                        T.Q5_K: (5, 0, 32), T.Q6_K: (6, 32, 16)}[T(l.down_type)]
    n = l.n_embd
    assert cols.shape[1] == bits * n // 8
    if bits == 8:
        q = cols.view(np.int8).astype(np.float32)
    else:
        # planes one after the other: 4 bits (if bits >= 4), then 2 and 1 bits as the rest has them
        widths = ([4] if bits >= 4 else []) + [w for w in (2, 1) if (bits % 4 if bits >= 4 else bits) & w]
        q = np.zeros((cols.shape[0], n), dtype=np.int32)
        at = shift = 0
        for w in widths:
            plane = cols[:, at:at + n * w // 8].astype(np.int32)
            for k in range(8 // w):  # value r at bit w * (r % (8/w)) of byte r // (8/w)
                q[:, k::8 // w] |= ((plane >> (w * k)) & ((1 << w) - 1)) << shift
            at += n * w // 8
            shift += w
        q = q.astype(np.float32)
    dm = table.reshape(l.n_ff // group, n, 2)[l.order // group]  # entry of each neuron's group
    return (q - np.float32(off)) * dm[..., 0] + dm[..., 1]


def _check_bundles(src: str, rf: RippleFile) -> None:
    """Every bundle equals the source's rows/column, read through gguf-py (independent of our reader)."""
    r = gguf.GGUFReader(src)
    ts = {t.name: t for t in r.tensors}
    data = np.fromfile(rf.path, dtype=np.uint8)
    for l in rf.layers:
        blk = data[l.bundles_offset:l.bundles_offset + l.n_ff * l.bundle_size].reshape(l.n_ff, l.bundle_size)
        g, u = l.gate_row_size, l.up_row_size
        up = np.asarray(ts[f"blk.{l.block}.ffn_up.weight"].data).view(np.uint8).reshape(l.n_ff, -1)
        assert np.array_equal(blk[:, g:g + u], up[l.order])
        if l.gated:
            gate = np.asarray(ts[f"blk.{l.block}.ffn_gate.weight"].data).view(np.uint8).reshape(l.n_ff, -1)
            assert np.array_equal(blk[:, :g], gate[l.order])
        down_t = ts[f"blk.{l.block}.ffn_down.weight"]
        down_f = _f32(down_t.data, down_t.tensor_type, (l.n_embd, l.n_ff))  # n_embd rows of n_ff
        cols = blk[:, g + u:]
        if l.split:
            table = data[l.down_table_offset:l.down_table_offset + l.down_table_size]
            assert np.array_equal(_split_decode(cols, table.view("<f4"), l), down_f.T[l.order])  # exact
            continue
        assert l.down_table_size == 0 and l.down_table_offset == 0
        if l.down_type == down_t.tensor_type and l.down_type in (T.F32, T.F16, T.BF16):
            raw = np.asarray(down_t.data).view(np.uint8).reshape(l.n_embd, l.n_ff, -1)
            assert np.array_equal(cols, raw.transpose(1, 0, 2).reshape(l.n_ff, -1)[l.order])  # exact
        else:
            # ggml's quantizer applied to the dequantized transposed column
            assert np.array_equal(cols, from_f32(l.down_type, np.ascontiguousarray(down_f.T))[l.order])
        # and the stored column decodes to the source column (within the target type's error)
        back = _f32(np.ascontiguousarray(cols), l.down_type, (l.n_ff, l.n_embd))
        err = np.abs(back - down_f.T[l.order]).max()
        assert err <= 0.5 * np.abs(down_f).max(), (T(l.down_type).name, err)


@pytest.mark.parametrize("type_name", FLOATS + LEGACY + KQUANTS)
def test_round_trip_every_type(tmp_path, type_name):
    src = make_model(tmp_path / "m.gguf", ffn_type=type_name, **_dims(type_name))
    rf = convert(src, tmp_path / "m.ripple.gguf", down_type="same", quiet=True)
    assert RippleFile.open(rf.path).layers[0].down_type == getattr(T, type_name)
    assert all(l.gate_type == l.up_type == l.down_src_type == getattr(T, type_name) for l in rf.layers)
    _check_bundles(src, rf)
    rf.check_quick()
    rf.verify_full()


@pytest.mark.parametrize("type_name", ["F16", "Q4_1", "Q6_K"])
def test_round_trip_ungated(tmp_path, type_name):
    src = make_model(tmp_path / "m.gguf", gated=False, ffn_type=type_name, **_dims(type_name))
    rf = convert(src, tmp_path / "m.ripple.gguf", down_type="same", quiet=True)
    assert all(l.gate_type == C.NO_GATE and l.gate_offset == 0 for l in rf.layers)
    assert rf.layers[0].bundle_size == 2 * rf.layers[0].up_row_size
    _check_bundles(src, rf)
    rf.verify_full()


@pytest.mark.parametrize("source, down_type, expect, layout", [
    ("Q4_0", "f16", T.F16, "column"), ("Q4_0", "f32", T.F32, "column"), ("Q4_0", "q8_0", T.Q8_0, "column"),
    ("Q4_0", "same", T.Q4_0, "column"), ("Q4_0", "auto", T.Q4_0, "split"), ("Q4_0", "split", T.Q4_0, "split"),
    ("Q6_K", "auto", T.Q6_K, "split"), ("Q6_K", "same", T.Q6_K, "column"), ("Q6_K", "q8_0", T.Q8_0, "column")])
def test_down_type_option(tmp_path, source, down_type, expect, layout):
    src = make_model(tmp_path / "m.gguf", ffn_type=source, **{**_dims(source), "n_layers": 2})
    rf = convert(src, tmp_path / "m.ripple.gguf", down_type=down_type, quiet=True)
    assert [l.down_type for l in rf.layers] == [expect] * 2
    assert [C.DOWN_LAYOUTS[l.down_layout] for l in rf.layers] == [layout] * 2
    _check_bundles(src, rf)


@pytest.mark.parametrize("type_name", LEGACY + KQUANTS)
def test_split_down_columns_every_type(tmp_path, type_name):
    """Split columns hold the source's own values: decoded, they equal ffn_down's columns bit for
    bit, with the stored integers' bits per value and one table entry per group of neurons (the
    block, or the k-quant sub-block)."""
    dims = _dims(type_name)
    src = make_model(tmp_path / "m.gguf", ffn_type=type_name, **dims)
    rf = convert(src, tmp_path / "m.ripple.gguf", down_type="split", quiet=True)
    bits, group = {"Q8_0": (8, 32), "Q5_0": (5, 32), "Q5_1": (5, 32), "Q2_K": (2, 16), "Q3_K": (3, 16),
                   "Q5_K": (5, 32), "Q6_K": (6, 16)}.get(type_name, (4, 32))
    l = rf.layers[0]
    assert l.split and l.down_type == getattr(T, type_name)
    assert l.down_table_size == dims["n_ff"] // group * dims["n_embd"] * 8
    assert l.down_row_size == bits * dims["n_embd"] // 8
    _check_bundles(src, rf)
    rf.verify_full()
    # a damaged scale table is caught by verify
    with open(rf.path, "r+b") as f:
        f.seek(l.down_table_offset + 8)
        f.write(b"\x7f")
    with pytest.raises(RippleFormatError, match="sha256|scale table"):
        RippleFile.open(rf.path).verify_full()


def test_split_types_agree_with_the_library():
    """format.SPLIT_TYPES (the Python reader and writer) and ripple_split_info (the C reader,
    store and kernels) describe the same types."""
    from ripple_gguf import binding
    from ripple_gguf.format.layout import SPLIT_TYPES

    for t in T:
        info = binding.split_info(t)
        assert (info[:3] if info else None) == (tuple(SPLIT_TYPES[t]) if t in SPLIT_TYPES else None), t.name
        if info:  # minimums exactly for the types whose values carry one
            assert info[3] == (t in (T.Q4_1, T.Q5_1, T.Q2_K, T.Q4_K, T.Q5_K)), t.name


@pytest.mark.parametrize("type_name", FLOATS + LEGACY + KQUANTS)
def test_bundles_never_larger_than_the_source(tmp_path, type_name):
    """The default conversion stores every neuron in at most the source's bytes per neuron (gate
    row + up row + its share of ffn_down): float columns transposed, quantized ones split."""
    dims = _dims(type_name)
    src = make_model(tmp_path / "m.gguf", ffn_type=type_name, **dims)
    rf = convert(src, tmp_path / "m.ripple.gguf", quiet=True)
    for l in rf.layers:
        assert l.split == (type_name not in FLOATS)
        source_per_neuron = sum(l.tensor_bytes) / l.n_ff
        assert l.bundle_size <= source_per_neuron, (type_name, l.bundle_size, source_per_neuron)
        if l.split:  # strictly smaller: the scales left out of the bundle
            assert l.bundle_size < source_per_neuron
    rf.verify_full()


def test_split_needs_whole_groups(tmp_path):
    """A layer whose n_embd is not a multiple of 8 cannot be split (the column's bit planes are
    whole bytes): "split" and "auto" store Q8_0 columns, or F16 where n_embd is not whole Q8_0
    blocks either, larger than the source's down column (docs/FORMAT.md section 3)."""
    src = make_model(tmp_path / "m.gguf", n_embd=36, n_ff=256, n_head=4,
                     ffn_type={"gate": "F32", "up": "F32", "down": "Q4_K"})
    for down_type in ("split", "auto"):
        rf = convert(src, tmp_path / f"{down_type}.ripple.gguf", down_type=down_type, quiet=True)
        assert all(not l.split and l.down_type == T.F16 for l in rf.layers)
        _check_bundles(src, rf)


def test_kquant_down_falls_back_like_llama_cpp(tmp_path):
    assert [T(resolve_down_type("same", t, 64)) for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)] == \
        [T.IQ4_NL, T.IQ4_NL, T.Q5_0, T.Q5_1, T.Q8_0]
    assert resolve_down_type("same", T.Q4_K, 512) == T.Q4_K
    assert resolve_down_type("q8_0", T.F32, 48) == T.F16  # not whole 32-blocks either
    # n_embd 64: K-quant gate/up impossible, so Q8_0 gate/up with a Q4_K/Q2_K down (n_ff 256)
    src = make_model(tmp_path / "m.gguf", n_embd=64, n_ff=256,
                     ffn_type={"gate": "Q8_0", "up": "Q8_0", "down": "Q4_K"})
    rf = convert(src, tmp_path / "m.ripple.gguf", down_type="same", quiet=True)
    assert RippleFile.open(rf.path).metadata[C.Keys.Layout.DOWN_TYPE].tolist() == [T.Q5_0, T.Q5_0]
    _check_bundles(src, rf)
    src = make_model(tmp_path / "q2.gguf", n_embd=64, n_ff=256,
                     ffn_type={"gate": "Q8_0", "up": "Q8_0", "down": "Q2_K"})
    rf = convert(src, tmp_path / "q2.ripple.gguf", down_type="same", quiet=True)
    assert [l.down_type for l in rf.layers] == [T.IQ4_NL] * 2
    _check_bundles(src, rf)


def test_permuted_placement(tmp_path):
    """The writer takes any per-layer permutation (what a placement pass will hand it)."""
    src = make_model(tmp_path / "m.gguf", ffn_type="Q5_1")
    rng = np.random.default_rng(3)
    orders = {0: rng.permutation(128), 1: rng.permutation(128)}
    rf = convert(src, tmp_path / "m.ripple.gguf", orders=orders, placement="test-random", quiet=True)
    again = RippleFile.open(rf.path)
    assert again.placement_method == "test-random"
    for l in again.layers:
        assert np.array_equal(l.order, orders[l.block])
    _check_bundles(src, again)
    again.check_quick()
    again.verify_full()
    with pytest.raises(ValueError, match="not a permutation"):
        convert(src, tmp_path / "bad.gguf", orders={0: np.zeros(128, int)}, quiet=True)


@pytest.mark.parametrize("kw", [dict(ffn_type="F32"), dict(gated=False, ffn_type="F16"),
                                dict(ffn_type="Q4_K", n_embd=256, n_ff=256), dict(ffn_type="Q8_0")],
                         ids=["f32", "gpt2-f16", "q4_k", "q8_0"])
def test_stock_llama_cpp_gives_identical_logits(tmp_path, kw):
    src = make_model(tmp_path / "m.gguf", **kw)
    dst = tmp_path / "m.ripple.gguf"
    convert(src, dst, quiet=True)
    a, b = stock_logits([src, dst], TOKENS)
    assert a.shape == (len(TOKENS), 259) and np.isfinite(a).all()
    assert np.array_equal(a, b)


# --- bad sources ------------------------------------------------------------------------------

def _expect_error(src, tmp_path, pattern):
    dst = tmp_path / "out.gguf"
    with pytest.raises(RippleFormatError, match=pattern) as e:
        convert(src, dst, quiet=True)
    assert os.fspath(src) in str(e.value)
    assert not dst.exists() and not Path(str(dst) + ".tmp").exists()


def test_rejects_truncated(tmp_path):
    src = make_model(tmp_path / "m.gguf")
    with open(src, "r+b") as f:
        f.truncate(os.path.getsize(src) - 1000)
    _expect_error(src, tmp_path, "truncated")
    with open(src, "r+b") as f:
        f.truncate(100)
    _expect_error(src, tmp_path, "truncated")


def test_rejects_not_gguf(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"not a model at all" * 10)
    _expect_error(p, tmp_path, "not a GGUF")
    p.write_bytes(b"")
    _expect_error(p, tmp_path, "not a GGUF")


def test_rejects_corrupt_header(tmp_path):
    src = make_model(tmp_path / "m.gguf")
    with open(src, "r+b") as f:
        f.seek(24)  # the first key's length
        f.write((1 << 50).to_bytes(8, "little"))
    _expect_error(src, tmp_path, "corrupt")


def test_rejects_moe(tmp_path):
    def add_experts(t):
        t["blk.0.ffn_up_exps.weight"] = np.zeros((2, 128, 64), np.float32)
    src = make_model(tmp_path / "m.gguf", edit=add_experts)
    _expect_error(src, tmp_path, "mixture-of-experts.*ffn_up_exps")


def test_rejects_missing_down(tmp_path):
    src = make_model(tmp_path / "m.gguf", edit=lambda t: t.pop("blk.1.ffn_down.weight"))
    _expect_error(src, tmp_path, "layer 1: missing blk.1.ffn_down.weight")


def test_rejects_no_ffn(tmp_path):
    def drop(t):
        for k in [k for k in t if ".ffn_" in k and k.endswith("weight") and "norm" not in k]:
            t.pop(k)
    src = make_model(tmp_path / "m.gguf", edit=drop)
    _expect_error(src, tmp_path, "no FFN layers")


@pytest.mark.parametrize("qtype", ["IQ4_NL", "F64"])
def test_rejects_unsupported_type(tmp_path, qtype):
    if qtype == "F64":
        src = make_model(tmp_path / "m.gguf",
                         edit=lambda t: t.__setitem__("blk.0.ffn_up.weight", np.zeros((128, 64), np.float64)))
    else:
        src = make_model(tmp_path / "m.gguf", ffn_type={"up": qtype})
    _expect_error(src, tmp_path, f"blk.0.ffn_up.weight: tensor type {qtype} is not supported")


def test_rejects_ripple_input(tmp_path):
    src = make_model(tmp_path / "m.gguf")
    dst = tmp_path / "m.ripple.gguf"
    convert(src, dst, quiet=True)
    _expect_error(dst, tmp_path, "already ripple-packed")


# --- CLI --------------------------------------------------------------------------------------

def test_cli(tmp_path, capsys):
    src = make_model(tmp_path / "m.gguf", ffn_type="Q4_0")
    dst = tmp_path / "m.ripple.gguf"
    assert main(["convert", src, str(dst), "--down-type", "q8_0", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["inspect", str(dst), "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["n_layers"] == 2 and j["layers"][1]["down_type"] == "Q8_0"
    assert main(["inspect", str(dst)]) == 0
    assert "Q4_0" in capsys.readouterr().out
    assert main(["verify", str(dst)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["verify", src]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ripple-gguf: error: ") and "m.gguf" in err
    assert main(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "x.gguf")]) == 2
    assert "missing.gguf" in capsys.readouterr().err
    # --no-profile keeps the original order unless a profiled placement is asked for
    fast = tmp_path / "fast.ripple.gguf"
    assert main(["convert", src, str(fast), "--no-profile", "--quiet"]) == 0
    assert main(["inspect", str(fast), "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["placement"]["method"] == "original" and j["layers"][0]["down_layout"] == "split"
    assert main(["convert", src, str(fast), "--no-profile", "--placement", "ripple", "--quiet"]) == 2
    assert "needs profiling" in capsys.readouterr().err


def test_cli_process_has_no_traceback(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"junk")
    r = subprocess.run([sys.executable, "-m", "ripple_gguf.cli", "inspect", str(p)], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2
    assert r.stderr.startswith("ripple-gguf: error: ") and "Traceback" not in r.stderr


# --- the real model ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.real_model
def test_real_model(tmp_path, real_model):
    REAL_MODEL = real_model
    dst = tmp_path / "smol.ripple.gguf"
    rf = convert(REAL_MODEL, dst, quiet=True)
    assert rf.n_layers == 30 and rf.n_embd == 576 and all(l.n_ff == 1536 for l in rf.layers)
    assert all(l.down_type == T.Q4_1 and l.split for l in rf.layers)  # auto: split Q4_1 columns
    rf.check_quick()
    rf.verify_full()
    toks = [1, 504, 3575, 282, 4649, 314]
    a, b = stock_logits([REAL_MODEL, dst], toks)
    assert np.array_equal(a, b)
