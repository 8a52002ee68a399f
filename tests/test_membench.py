"""``ripple-gguf membench`` end to end on a tiny synthetic model, under real cgroup memory limits."""
from __future__ import annotations

import numpy as np
import pytest

from ripple_gguf.eval import membench, synthetic
from ripple_gguf.offline.pipeline import OfflineConfig
from .synth import make_model

FIELDS = {"system", "memory_fraction", "memory_limit_mb", "cache_mb", "decode_tok_s", "prompt_tok_s",
          "read_mb_per_token", "peak_mb", "ppl"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    d = tmp_path_factory.mktemp("membench")
    src = make_model(d / "src.gguf", n_layers=2, n_embd=64, n_ff=256, ffn_type="Q8_0")
    cfg = OfflineConfig(calib_tokens=512, chunk_tokens=128, threshold_tokens=256, eval_tokens=256,
                        predictor_rank=8, active_fraction=0.3, threads=1, quiet=True)
    try:
        return membench.run(src, fractions=(1.5,), tokens=8, threads=1, work_dir=d / "work", offline=cfg, quiet=True)
    except membench.CgroupError as e:  # the documented refusal where the kernel offers none
        pytest.fail(f"no memory cgroup on this machine: {e}")


def test_every_system_measured_under_the_limit(result):
    rows = result["results"]
    assert [r["system"] for r in rows] == ["llama.cpp", *membench.SYSTEMS]
    for r in rows:
        assert set(r) >= FIELDS and "error" not in r, r
        assert r["decode_tok_s"] > 0 and r["prompt_tok_s"] > 0 and r["ppl"] > 1
    stock_peak = result["model"]["stock_peak_mb"]
    assert rows[0]["peak_mb"] == pytest.approx(stock_peak)
    for r in rows[1:]:
        assert r["memory_limit_mb"] == pytest.approx(1.5 * stock_peak)
        assert r["peak_mb"] <= r["memory_limit_mb"] + 0.5  # the kernel kept the child under its limit
    by = {r["system"]: r for r in rows[1:]}
    # the same held-out tokens: exact mode's perplexity is stock's
    assert by["ripple-exact"]["ppl"] == pytest.approx(by["llama.cpp"]["ppl"], rel=1e-3)


def test_a_limit_below_the_footprint_is_reported_not_fatal(tmp_path):
    src = make_model(tmp_path / "src.gguf", n_layers=1, n_embd=64, n_ff=128, ffn_type="Q8_0")
    r = membench.run_confined({"system": "llama.cpp", "path": str(src), "tokens": list(range(1, 40)),
                               "prompt": 32, "threads": 1}, 8 << 20)
    assert "error" in r and r["peak_mb"] <= 8.5


def test_report_lists_every_row(result):
    text = membench.report(result)
    assert len(text.splitlines()) == 2 + len(result["results"])


# ---- --synthetic: a random-weight llama of a given shape (here a tiny one; 1b in the benchmark) ----

TINY = synthetic.Shape(n_embd=128, n_ff=352, n_layers=2, n_head=4, n_head_kv=2, n_vocab=1000)


def test_the_1b_shape_has_the_proportions_of_a_1b_model():
    s = synthetic.SHAPES["1b"]
    assert 1.0e9 < s.n_params < 1.2e9 and s.n_vocab == 32000
    assert 0.6 < s.ffn_params / s.n_params < 0.72  # FFN about two thirds of the weights


def test_synthetic_model_loads_in_llama_cpp_and_converts(tmp_path):
    from gguf.constants import GGMLQuantizationType as T

    from ripple_gguf.eval.variants import prepare_unprofiled
    from ripple_gguf.format.reader import RippleFile, read_gguf_header
    from ripple_gguf.offline import quality

    src = synthetic.ensure(TINY, tmp_path, quiet=True)
    mtime = src.stat().st_mtime_ns
    assert synthetic.ensure(TINY, tmp_path, quiet=True) == src and src.stat().st_mtime_ns == mtime  # cached
    assert {t.type for t in read_gguf_header(src).tensors if t.name.endswith(".ffn_up.weight")} == {int(T.Q4_1)}
    text = quality.heldout_text(4000)
    toks = quality.tokenize(src, text)
    # a usable vocabulary: whole pieces, not byte by byte, and ids across all of it
    assert len(toks) < len(text.encode()) / 2 and max(toks) > 0.9 * TINY.n_vocab
    logits = quality.run(src, tokens=toks[:48], stock=True, n_ctx=64, n_threads=1)["logits"]
    assert logits.shape == (48, TINY.n_vocab) and np.isfinite(logits).all()
    packed = prepare_unprofiled(src, tmp_path, quiet=True)
    rf = RippleFile.open(packed)
    rf.check_quick()
    assert rf.n_layers == TINY.n_layers and not any(l.predictor_size for l in rf.layers)
    mtime = packed.stat().st_mtime_ns
    assert prepare_unprofiled(src, tmp_path, quiet=True) == packed and packed.stat().st_mtime_ns == mtime


def test_membench_on_a_synthetic_model_runs_exact_only(tmp_path):
    from ripple_gguf.format.reader import RippleFile

    # a limit far above the footprint: the cache is capped at the bundles' bytes
    result = membench.run(synthetic=TINY, fractions=(4.0,), tokens=8, threads=1, work_dir=tmp_path, quiet=True)
    m = result["model"]
    assert m["predictors"] is False and m["synthetic"]["n_layers"] == TINY.n_layers
    assert m["ripple_own_file_mb"] >= 0 and m["stock_anon_mb"] > 0
    rows = {r["system"]: r for r in result["results"] if r["memory_fraction"] is not None}
    assert list(rows) == list(membench.SYSTEMS)
    assert rows["ripple-sparse"]["skipped"] == membench.NOT_APPLICABLE and rows["ripple-sparse"]["decode_tok_s"] is None
    for system in ("llama.cpp", "ripple-exact"):
        assert "error" not in rows[system] and rows[system]["decode_tok_s"] > 0, rows[system]
    bundles_mb = sum(l.block_bytes for l in RippleFile.open(m["packed"]).layers) / 2**20
    assert rows["ripple-exact"]["cache_mb"] == pytest.approx(bundles_mb)
    assert rows["ripple-exact"]["ppl"] == pytest.approx(rows["llama.cpp"]["ppl"], rel=1e-3)
    assert "not applicable" in membench.report(result)
    with pytest.raises(ValueError):
        membench.run("some.gguf", synthetic=TINY, work_dir=tmp_path)


def test_cli_takes_a_source_or_synthetic(capsys):
    from ripple_gguf import cli

    assert cli.main(["membench"]) == 2
    assert cli.main(["membench", "x.gguf", "--synthetic", "1b"]) == 2
    assert "--synthetic NAME" in capsys.readouterr().err
