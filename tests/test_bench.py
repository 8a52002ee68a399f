"""``ripple-gguf bench`` end to end on a tiny synthetic model with planted co-activation groups."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ripple_gguf.eval import bench
from ripple_gguf.eval.report import report
from ripple_gguf.offline.pipeline import OfflineConfig
from .synth import encode, make_model

N_FF, N_EMBD, GROUPS = 256, 64, 16
FIELDS = {"system", "storage", "cache_fraction", "io_ms_per_token", "e2e_ms_per_token", "read_ops_per_token",
          "bytes_read_per_token", "needed_bytes_per_token", "effective_bandwidth_mb_s", "limit_io_ms_per_token",
          "mean_run_length", "max_run_length", "cache_hit_rate", "peak_rss_mb"}


def plant_groups(t: dict) -> None:
    """Neurons in groups of 16 scattered over the layer share their gate and up rows (plus a little
    noise), so a group fires together: structure a placement can find and the original order hides."""
    rng = np.random.default_rng(7)
    for name in [k for k in t if k.endswith("ffn_gate.weight") or k.endswith("ffn_up.weight")]:
        protos = rng.standard_normal((GROUPS, N_EMBD)).astype(np.float32) / np.sqrt(N_EMBD)
        group = rng.permutation(np.arange(N_FF) % GROUPS)
        rows = protos[group] * 3 + rng.standard_normal((N_FF, N_EMBD)).astype(np.float32) * 0.05 / np.sqrt(N_EMBD)
        t[name] = encode(rows, t[name][1] if isinstance(t[name], tuple) and t[name][1] is not None else None)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    src = make_model(d / "src.gguf", n_layers=2, n_embd=N_EMBD, n_ff=N_FF, ffn_type="Q8_0", edit=plant_groups)
    cfg = OfflineConfig(calib_tokens=512, chunk_tokens=128, threshold_tokens=256, eval_tokens=256,
                        predictor_rank=8, active_fraction=0.2, threads=1, quiet=True)
    return bench.run(src, offline=cfg, tokens=12, fractions=(0.05, 0.1), rounds=1, n_threads=1, ppl_tokens=24,
                     cross_dataset=False, work_dir=d / "work", quiet=True)


def test_one_result_per_system_storage_and_fraction(result):
    json.dumps(result)  # serialisable as it is
    assert {"machine", "model", "results"} <= set(result)
    keys = [(r["system"], r["storage"], r["cache_fraction"]) for r in result["results"]]
    assert sorted(keys) == sorted((s, st, f) for s in ("llama.cpp", "llm-in-a-flash", "frequency", "ripple")
                                  for st in ("local-disk", "ufs4.0", "ufs3.1") for f in (0.05, 0.1))
    for r in result["results"]:
        assert set(r) == FIELDS
        assert all(isinstance(r[k], (int, float)) and np.isfinite(r[k]) for k in FIELDS - {"system", "storage"})
        assert r["needed_bytes_per_token"] > 0 and r["peak_rss_mb"] > 0 and r["e2e_ms_per_token"] > 0


def test_same_active_sets_and_placement_structure(result):
    ours = [r for r in result["results"] if r["system"] != "llama.cpp"]
    # the same trace everywhere: the bytes a token needs do not depend on order, cache or storage
    assert len({r["needed_bytes_per_token"] for r in ours}) == 1
    for st in ("local-disk", "ufs4.0", "ufs3.1"):
        for f in (0.05, 0.1):
            get = {r["system"]: r for r in ours if r["storage"] == st and r["cache_fraction"] == f}
            assert get["ripple"]["mean_run_length"] >= get["llm-in-a-flash"]["mean_run_length"]
            assert get["ripple"]["read_ops_per_token"] <= get["llm-in-a-flash"]["read_ops_per_token"]
    assert [p["mode"] for p in result["perplexity"]] == ["stock", "exact", "sparse"]
    assert {v["system"] for v in result["model_validation"]} == {"llm-in-a-flash", "frequency", "ripple"}
    assert "ripple" in report(result)


def test_plot_writes_a_png(result, tmp_path):
    pytest.importorskip("matplotlib")
    from ripple_gguf.eval.plots import plot

    out = plot(result, str(tmp_path / "bench.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
