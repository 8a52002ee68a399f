"""The RIPPLE backend inside stock llama.cpp: exact-mode logits against stock for every tensor
type, gated and ungated FFNs, counters, and the failures it must report instead of computing."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import llama_cpp
import ripple_gguf
from ripple_gguf.format.layout import RippleFormatError
from ripple_gguf.offline import quality
from ripple_gguf.offline.convert import convert
from .synth import make_model, stock_logits

TOKENS = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 200, 3, 17]
FLOATS = ["F32", "F16", "BF16"]
LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def _dims(type_name: str) -> dict:
    return dict(n_embd=256, n_ff=512, n_layers=2) if type_name.endswith("_K") else dict(n_embd=64, n_ff=192, n_layers=2)


def plugin_logits(path, tokens=TOKENS, n_batch=64) -> np.ndarray:
    return quality.run(path, tokens=tokens, n_ctx=256, n_threads=1, n_batch=n_batch)["logits"]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (b.max() - b.min()))


@pytest.fixture
def down_from_bundles():
    ripple_gguf.configure(exact_down="bundles")
    yield
    ripple_gguf.configure(exact_down="tensor")


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("type_name", FLOATS + LEGACY + KQUANTS)
def test_exact_mode_matches_stock(tmp_path, type_name, gated):
    """Gate, up and down on the standard tensors with ggml's own dot products: stock's logits."""
    src = make_model(tmp_path / "src.gguf", ffn_type=type_name, gated=gated, **_dims(type_name))
    dst = tmp_path / "m.ripple.gguf"
    convert(src, dst, quiet=True)
    (stock,) = stock_logits([src], TOKENS)
    ripple_gguf.reset_stats()
    got = plugin_logits(dst)
    s = ripple_gguf.stats()
    n_layers = _dims(type_name)["n_layers"]
    assert s["ffn_matmuls"] == n_layers * (3 if gated else 2)  # one ubatch: every FFN matmul served
    assert s["neurons_computed"] == s["neurons_total"] > 0
    # Stock may pick other kernels for the same arithmetic (weights repacked for its GEMMs,
    # tinyBLAS for batches): other orders of additions, and for types whose activations are
    # rounded to 8 bits a last-bit difference can flip a rounding step.
    assert rel_err(got, stock) < (1e-4 if type_name in ("F32", "F16") else 2e-3), type_name
    assert (got.argmax(-1) == stock.argmax(-1)).all()


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("type_name", FLOATS + LEGACY + KQUANTS)
def test_down_columns_match_stock(tmp_path, type_name, gated, down_from_bundles):
    """The down projection summed from the bundles' columns (what sparse mode reads). With exact
    (f32) columns and with split columns (the source's own values and scales, the default for
    every quantized type) only the order of additions differs from stock; with columns
    re-quantized to the source type the re-quantization along the other axis adds its rounding."""
    src = make_model(tmp_path / "src.gguf", ffn_type=type_name, gated=gated, **_dims(type_name))
    exact = tmp_path / "exact.ripple.gguf"
    same = tmp_path / "same.ripple.gguf"
    convert(src, exact, down_type="f32", quiet=True)
    convert(src, same, down_type="same", quiet=True)
    (stock,) = stock_logits([src], TOKENS)
    got = plugin_logits(exact)
    # Quantized types: both sides round activations to 8 bits before the down projection, so a
    # last-bit difference upstream (order of additions) can flip a rounding step; and Q4_1/Q5_1's
    # vec_dot adds the block minimum times the activation block sum rounded to f16 (Q8_1's `s`)
    # where the columns multiply the exact sum. Both stay within a few 1e-3 of the logit range.
    assert rel_err(got, stock) < (1e-3 if type_name in FLOATS else 5e-3), type_name
    if type_name in LEGACY + KQUANTS:
        split = tmp_path / "split.ripple.gguf"
        assert all(l.split for l in convert(src, split, down_type="split", quiet=True).layers)
        got_split = plugin_logits(split)
        # split columns are multiplied in stock's own integer form (Q8_1's rounded `s`, Q8_K's
        # block sums included). K-quants: stock multiplies the super-block scale once per 256
        # values, the split columns its product with each sub-block scale per group (another
        # rounding order), and stock's repacked k-quant kernels differ from its vec_dot too: a
        # flipped 8-bit rounding of some later matmul's input reaches ~1.5e-3 of the logit range on
        # these random models, as exact mode on the standard tensors does (2e-3 above).
        print(f"{type_name}: split {rel_err(got_split, stock):.2e}, f32 columns {rel_err(got, stock):.2e} from stock")
        assert rel_err(got_split, stock) < (1e-3 if type_name in LEGACY else 2e-3), type_name
    requant = plugin_logits(same)
    # re-quantizing the transposed down projection adds about one more rounding of the source's
    # own precision: small for 4+ bits, large for the 2-3 bit K-quants (random weights, no outliers)
    tol = 1e-3 if type_name in FLOATS else 0.25 if type_name in ("Q2_K", "Q3_K") else 0.08
    assert rel_err(requant, stock) < tol, type_name


def test_batch_splits_and_thread_counts_agree(tmp_path):
    src = make_model(tmp_path / "src.gguf", ffn_type="Q4_0", n_embd=64, n_ff=192, n_layers=3)
    dst = tmp_path / "m.ripple.gguf"
    convert(src, dst, down_type="f32", quiet=True)
    one = plugin_logits(dst, n_batch=64)
    small = plugin_logits(dst, n_batch=3)  # prompt processed in ubatches of 3 tokens
    assert rel_err(small, one) < 1e-4
    llm = llama_cpp.Llama(model_path=os.fspath(dst), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
    llm.eval(TOKENS)
    two = np.array(llm.scores[: len(TOKENS)], dtype=np.float32)
    llm.close()
    assert rel_err(two, one) < 1e-4


def test_counters_and_cache(tmp_path):
    src = make_model(tmp_path / "src.gguf", ffn_type="F16", n_embd=64, n_ff=128, n_layers=2)
    dst = tmp_path / "m.ripple.gguf"
    rf = convert(src, dst, quiet=True)
    ffn_bytes = sum(l.n_ff * l.bundle_size for l in rf.layers)
    try:
        # exact mode from the bundles, no cache: every bundle once per token batch
        ripple_gguf.configure(cache_mb=0, exact_down="bundles")
        ripple_gguf.reset_stats()
        plugin_logits(dst, TOKENS[:4])
        s = ripple_gguf.stats()
        assert s["bytes_read"] == ffn_bytes
        assert s["read_ops"] == len(rf.layers)  # original order: one read of bundles per layer
        assert s["cache_hits"] == 0 and s["cache_misses"] == sum(l.n_ff for l in rf.layers)
        assert s["io_seconds"] > 0

        ripple_gguf.configure(cache_mb=1)  # holds the whole FFN of this model
        ripple_gguf.reset_stats()
        llm = llama_cpp.Llama(model_path=os.fspath(dst), n_ctx=64, n_threads=1, verbose=False)
        llm.eval(TOKENS[:2])
        first = ripple_gguf.stats()
        llm.eval(TOKENS[2:4])
        second = ripple_gguf.stats()
        llm.close()
        assert first["bytes_read"] == ffn_bytes
        assert second["bytes_read"] == ffn_bytes  # bundles from the neuron cache
        assert second["cache_hits"] - first["cache_hits"] == sum(l.n_ff for l in rf.layers)
        assert 0 < second["cache_bytes"] <= second["cache_capacity"] <= 1024 * 1024
    finally:
        ripple_gguf.runtime.backend.reset_settings()


def test_exact_mode_reads_the_standard_tensors(tmp_path):
    """Exact mode computes on the standard tensors: mapped (nothing read explicitly), or with
    direct_io read with O_DIRECT, the first layers kept whole in the cache's budget."""
    src = make_model(tmp_path / "src.gguf", ffn_type="Q8_0", n_embd=64, n_ff=128, n_layers=3)
    dst = tmp_path / "m.ripple.gguf"
    rf = convert(src, dst, quiet=True)
    dense = [l.n_embd * l.n_ff * 34 // 32 * 3 for l in rf.layers]  # Q8_0: 34 bytes per 32 values
    (ref,) = stock_logits([src], TOKENS[:6])

    def one_by_one():
        llm = llama_cpp.Llama(model_path=os.fspath(dst), n_ctx=64, n_batch=1, n_threads=2, logits_all=True,
                              verbose=False)
        ripple_gguf.reset_stats()
        llm.eval(TOKENS[:6])
        out = np.array(llm.scores[:6])
        llm.close()
        return out, ripple_gguf.stats()

    try:
        ripple_gguf.configure(mode="exact", cache_mb=0)
        mapped, s = one_by_one()
        assert s["bytes_read"] == 0 and s["neurons_computed"] == s["neurons_total"] > 0  # on a mapping of the file
        assert rel_err(mapped, ref) < 2e-3 and (mapped.argmax(-1) == ref.argmax(-1)).all()
        # a budget for one layer and a half: layer 0 resident, the others read at every use
        ripple_gguf.configure(direct_io=True, cache_mb=1.5 * dense[0] / 2**20)
        direct, s = one_by_one()
        assert np.array_equal(direct, mapped)
        # the last layer's read-ahead fetched layer 1 again for a next token that did not come
        # (O_DIRECT reads whole aligned 4 KiB blocks: at most two more per request)
        assert s["read_ops"] == 3 + 6 * 2 * 3 + 3
        assert 0 <= s["bytes_read"] - (dense[0] + 6 * (dense[1] + dense[2]) + dense[1]) <= s["read_ops"] * 8192
        assert s["cache_hits"] == 5 * rf.layers[0].n_ff and s["cache_misses"] == rf.layers[0].n_ff + 6 * 2 * 128
        assert s["io_exposed_seconds"] > 0
    finally:
        ripple_gguf.runtime.backend.reset_settings()


def test_other_gguf_files_are_left_to_llama_cpp(tmp_path):
    src = make_model(tmp_path / "plain.gguf", ffn_type="Q8_0")
    ripple_gguf.reset_stats()
    got = plugin_logits(src)
    assert ripple_gguf.stats()["ffn_matmuls"] == 0
    (stock,) = stock_logits([src], TOKENS)
    assert np.array_equal(got, stock)


@pytest.mark.parametrize("source", ["bundles", "tensors"])
def test_io_error_fails_the_request(tmp_path, source):
    src = make_model(tmp_path / "src.gguf", ffn_type="Q8_0")
    dst = tmp_path / "m.ripple.gguf"
    rf = convert(src, dst, quiet=True)
    try:
        # exact mode reading the bundles, or the standard tensors with O_DIRECT
        ripple_gguf.configure(cache_mb=0, exact_down="bundles" if source == "bundles" else "tensor",
                              direct_io=source == "tensors")
        llm = llama_cpp.Llama(model_path=os.fspath(dst), n_ctx=64, n_threads=1, verbose=False)
        llm.eval(TOKENS[:2])
        ripple_gguf.last_error()
        # the file is cut short under the running model (a failing or replaced disk file)
        os.truncate(dst, (rf.layers[0].bundles_offset if source == "bundles" else rf.layers[0].down_offset) + 16)
        with pytest.raises(RuntimeError, match="llama_decode returned"):
            llm.eval(TOKENS[2:4])
        msg = ripple_gguf.last_error()
        assert str(dst) in msg and "end of the file" in msg
        llm.close()
    finally:
        ripple_gguf.runtime.backend.reset_settings()


def test_modified_file_is_refused_at_load(tmp_path):
    src = make_model(tmp_path / "src.gguf", ffn_type="Q4_0")
    dst = tmp_path / "m.ripple.gguf"
    rf = convert(src, dst, quiet=True)
    bad = tmp_path / "modified.ripple.gguf"
    shutil.copy(dst, bad)
    with open(bad, "r+b") as f:  # flip bytes inside the first bundle
        f.seek(rf.layers[0].bundles_offset + 5)
        f.write(b"\xff\x00\xff")
    with pytest.raises(RippleFormatError, match="modified.ripple.gguf"):
        llama_cpp.Llama(model_path=os.fspath(bad), n_ctx=64, verbose=False)
    table = tmp_path / "table.ripple.gguf"  # a scale table entry of the last row changed
    shutil.copy(dst, table)
    l = rf.layers[1]
    assert l.split
    with open(table, "r+b") as f:
        f.seek(l.down_table_offset + ((l.n_ff // 32 - 1) * l.n_embd + l.n_embd - 1) * 8)
        f.write(struct.pack("<f", 0.5))
    with pytest.raises(RippleFormatError, match="table.ripple.gguf: layer 1: down scale table"):
        llama_cpp.Llama(model_path=os.fspath(table), n_ctx=64, verbose=False)
    truncated = tmp_path / "truncated.ripple.gguf"
    shutil.copy(dst, truncated)
    os.truncate(truncated, os.path.getsize(dst) - 4096)
    with pytest.raises(RippleFormatError, match="truncated.ripple.gguf"):
        llama_cpp.Llama(model_path=os.fspath(truncated), n_ctx=64, verbose=False)


def test_kquant_scale_tables_are_checked_at_load(tmp_path):
    """A k-quant table (Q6_K: groups of 16, no minimums) is checked against ffn_down's own
    super-blocks at load, and a minimum where the type has none is refused even with the
    checksums made to match."""
    from .synth import reseal

    src = make_model(tmp_path / "src.gguf", ffn_type="Q6_K", **_dims("Q6_K"))
    dst = tmp_path / "m.ripple.gguf"
    rf = convert(src, dst, quiet=True)
    l = rf.layers[1]
    assert l.split and l.down_group == 16
    last = ((l.n_ff // 16 - 1) * l.n_embd + l.n_embd - 1) * 8  # the last row's last scale
    middle = ((l.n_ff // 32) * l.n_embd + l.n_embd // 2) * 8 + 4  # a minimum of a middle row
    for name, at, reason in (("scale", last, "does not match ffn_down's scales"),
                             ("minimum", middle, "minimums 0 where the type has none")):
        bad = tmp_path / f"{name}.ripple.gguf"
        shutil.copy(dst, bad)
        with open(bad, "r+b") as f:
            f.seek(l.down_table_offset + at)
            f.write(struct.pack("<f", 0.5))
        reseal(bad)
        with pytest.raises(RippleFormatError, match=f"{name}.ripple.gguf: layer 1: .*{reason}"):
            llama_cpp.Llama(model_path=os.fspath(bad), n_ctx=64, verbose=False)


def test_wrong_llama_cpp_build_is_refused():
    code = (
        "import llama_cpp; llama_cpp.__version__ = '0.3.35'\n"
        "try:\n    import ripple_gguf\nexcept ImportError as e:\n    print('refused:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused:" in r.stdout and "0.3.36" in r.stdout and "0.3.35" in r.stdout, r.stdout + r.stderr


def test_registration_is_idempotent_and_visible_to_llama_cpp():
    import ctypes
    from pathlib import Path

    ripple_gguf.register()
    ripple_gguf.register()
    ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so.0"))  # libllama's instance
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    names = [ggml.ggml_backend_dev_name(ggml.ggml_backend_dev_get(i)) for i in range(ggml.ggml_backend_dev_count())]
    assert names.count(b"RIPPLE") == 1, names
    assert ripple_gguf.settings()["load_hook"] is True


def test_without_mmap_and_with_two_models_at_once(tmp_path):
    """use_mmap=False hands set_tensor a staging copy (ignored: bundles are read from the file);
    two models of the same file in one process each get their own binding and working set."""
    src = make_model(tmp_path / "src.gguf", ffn_type="Q5_0", n_embd=64, n_ff=128, n_layers=2)
    dst = tmp_path / "m.ripple.gguf"
    convert(src, dst, quiet=True)
    (stock,) = stock_logits([src], TOKENS)
    kw = dict(model_path=os.fspath(dst), n_ctx=256, logits_all=True, n_threads=1, verbose=False)
    a = llama_cpp.Llama(use_mmap=False, **kw)
    b = llama_cpp.Llama(**kw)
    assert ripple_gguf.last_load()["bound_tensors"] == 6
    try:
        for t in range(0, len(TOKENS), 4):  # interleave the two models' decodes
            a.eval(TOKENS[t:t + 4])
            b.eval(TOKENS[t:t + 4])
        for llm in (a, b):
            got = np.array(llm.scores[: len(TOKENS)], dtype=np.float32)
            assert rel_err(got, stock) < 2e-3
    finally:
        a.close()
        b.close()


def test_stats_reach_a_file_and_the_log_without_python_reading_them(tmp_path):
    """RIPPLE_STATS_FILE gets stats() as JSON when a model is freed (and every few seconds while
    one is loaded), and a summary line goes through ggml's logger: counters for host processes
    that have no Python (llama-server)."""
    import json
    import subprocess
    import sys

    src = make_model(tmp_path / "src.gguf", ffn_type="Q8_0", n_embd=64, n_ff=128, n_layers=2)
    dst = tmp_path / "m.ripple.gguf"
    convert(src, dst, quiet=True)
    out = tmp_path / "stats.json"
    code = ("import ripple_gguf, llama_cpp\n"
            f"llm = llama_cpp.Llama(model_path={str(dst)!r}, n_ctx=64, n_threads=1, verbose=True)\n"
            f"llm.eval({TOKENS[:6]!r})\n"
            "print('KEYS', sorted(ripple_gguf.stats()))\n"
            "llm.close()\n")
    env = dict(os.environ, RIPPLE_STATS_FILE=str(out))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    stats = json.loads(out.read_text())
    assert stats["tokens"] == 6 and stats["ffn_matmuls"] == 2 * 3 and stats["neurons_computed"] > 0
    keys = next(l for l in p.stdout.splitlines() if l.startswith("KEYS"))
    assert keys == "KEYS " + str(sorted(stats))  # stats() is this JSON
    assert f"ripple: {dst} freed: 6 tokens, 100.0% of FFN neurons computed" in p.stderr, p.stderr[-2000:]
    assert not list(tmp_path.glob("stats.json.*.tmp"))


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("type_name", ["F16", "Q4_1", "Q5_0", "Q4_K"])
def test_paired_gate_up_equals_each_matmul_alone(tmp_path, type_name, gated):
    """Gate and up computed in one pass give the logits of each MUL_MAT computed alone (the path a
    graph the backend does not recognise takes), from the standard tensors and from the bundles,
    in a batch and token by token."""
    from ripple_gguf import binding

    src = make_model(tmp_path / "src.gguf", ffn_type=type_name, gated=gated, **_dims(type_name))
    dst = tmp_path / "m.ripple.gguf"
    convert(src, dst, quiet=True)
    try:
        for exact_down in ("tensor", "bundles"):
            ripple_gguf.configure(exact_down=exact_down)
            got = {}
            for pair in (1, 0):
                binding.set_pair_matmuls(pair)
                got[pair] = [plugin_logits(dst, n_batch=n) for n in (64, 1)]
            for a, b in zip(got[1], got[0]):
                assert np.array_equal(a, b), (type_name, gated, exact_down)
    finally:
        binding.set_pair_matmuls(True)
        ripple_gguf.runtime.backend.reset_settings()
