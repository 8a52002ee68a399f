"""``ripple-gguf membench`` end to end on a tiny synthetic model, under real cgroup memory limits."""
from __future__ import annotations

import pytest

from ripple_gguf import membench
from ripple_gguf.offline import OfflineConfig
from synth import make_model

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
