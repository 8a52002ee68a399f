"""Storage probe and cost model: a quick probe on the real disk, fits, presets, profiles."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ripple_gguf.runtime import storage as S


@pytest.fixture(autouse=True)
def profile_dir(tmp_path, monkeypatch):
    d = tmp_path / "profiles"
    monkeypatch.setenv("RIPPLE_STORAGE_PROFILE_DIR", str(d))
    return d


@pytest.fixture(scope="module")
def quick_probe(tmp_path_factory):
    return S.probe(tmp_path_factory.mktemp("probe"), quick=True, progress=False)


def test_quick_probe_is_sane(quick_probe):
    r = quick_probe
    # quick: few short points on a small file (a few seconds; not timed here, the machine is shared)
    assert r["quick"] and r["file_bytes"] <= 64 << 20 and r["seconds_per_point"] <= 0.2 and r["windows"] <= 2
    pts = r["points"]
    assert {p["queue_depth"] for p in pts} == {1, 8, 32}
    for p in pts:
        assert p["mb_s"] > 0 and p["iops"] > 0 and p["requests"] > 0
        assert 0 < p["lat_p50_us"] <= p["lat_p99_us"]
    qd1 = {p["size"]: p["mb_s"] for p in pts if p["queue_depth"] == 1}
    iops1 = {p["size"]: p["iops"] for p in pts if p["queue_depth"] == 1}
    # random reads are request-bound at 4 KiB: larger requests move more bytes, fewer requests
    assert np.median([v for s, v in qd1.items() if s >= 64 * 1024]) > 2 * qd1[4096]
    assert iops1[4096] > iops1[max(iops1)]
    assert all(s["mb_s"] > 0 for s in r["sequential"])
    model = S.CostModel.from_dict(r["model"])
    assert model == S.CostModel.fit(r, name=model.name)
    assert r["fit"] == model.fit_error(r)
    assert not any(name.startswith(".ripple-probe-") for name in os.listdir(r["path"]))


def test_fit_reproduces_a_synthetic_model():
    true = S.CostModel(latency_s=80e-6, bandwidth_bps=1.5e9, parallelism=6.0, queue_depth=32)
    pts = [{"size": s, "queue_depth": q, "mb_s": true.throughput(s, q) / 1e6}
           for q in S.DEFAULT_QUEUE_DEPTHS for s in S.DEFAULT_SIZES]
    fit = S.CostModel.fit({"points": pts})
    assert fit.fit_error({"points": pts})["max_abs_rel_error"] < 1e-6
    rng = np.random.default_rng(0)
    for _ in range(20):
        sizes = rng.integers(1, 64, rng.integers(1, 200)) * 4096
        assert fit.batch_time(sizes) == pytest.approx(true.batch_time(sizes), rel=1e-6)
    assert fit.collapse_gap_bytes() == pytest.approx(true.collapse_gap_bytes(), rel=1e-6, abs=1)


def test_batch_time_and_collapse_threshold():
    m = S.CostModel(latency_s=100e-6, bandwidth_bps=1e9, parallelism=4, queue_depth=32)
    assert m.batch_time([]) == 0.0
    assert m.batch_time([4096] * 8) == pytest.approx(8 * 100e-6 / 4 + 8 * 4096 / 1e9)
    gap = m.collapse_gap_bytes()  # 1e9 * 100e-6 / 4 = 25,000 bytes
    assert gap == 25_000
    # at the threshold, two runs with the gap read through cost what two requests cost
    assert m.batch_time([4096 + gap + 4096]) == pytest.approx(m.batch_time([4096, 4096]))
    assert m.batch_time([8192 + gap - 4096]) < m.batch_time([4096, 4096])
    bandwidth_bound = S.CostModel(latency_s=20e-6, bandwidth_bps=0.5e9, parallelism=32, queue_depth=32)
    assert bandwidth_bound.collapse_gap_bytes() == 0      # 312 bytes: not worth a page
    assert S.UFS40.collapse_gap_bytes() > 0 and S.UFS31.collapse_gap_bytes() > 0 and S.DEFAULT.collapse_gap_bytes() > 0
    with pytest.raises(ValueError, match="bandwidth_bps"):
        S.CostModel(latency_s=1e-4, bandwidth_bps=0, parallelism=1)


@pytest.mark.parametrize("model, seq_bps, rand_4k_bps", [
    (S.UFS40, 4.0e9, 1.0e9),                 # PowerInfer-2: ~4 GB/s sequential, ~1 GB/s 4 KB random
    (S.UFS40, 4.2e9, None),                  # Samsung UFS 4.0: 4,200 MB/s sequential read
    (S.UFS31, 2.1e9, 100_000 * 4096),        # Samsung eUFS 3.1: 2,100 MB/s, 100K IOPS 4 KB random
    (S.DEFAULT, 3.5e9, None),                # Samsung 970 EVO Plus: 3,500 MB/s sequential read
])
def test_presets_match_their_cited_figures(model, seq_bps, rand_4k_bps):
    assert model.throughput(4 << 20) == pytest.approx(seq_bps, rel=0.10)
    if rand_4k_bps is not None:
        assert model.throughput(4096, 32) == pytest.approx(rand_4k_bps, rel=0.10)


def test_default_matches_its_qd1_figure():
    assert S.DEFAULT.throughput(4096, 1) / 4096 == pytest.approx(19_000, rel=0.10)          # IOPS at QD1
    assert S.DEFAULT.throughput(4096, 128) / 4096 == pytest.approx(600_000, rel=0.10)       # QD32 x 4 workers


def test_profile_round_trip_keyed_by_device(quick_probe, tmp_path, profile_dir):
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"x")
    assert S.load_profile(model_file) is None
    assert S.model_for(model_file) is S.DEFAULT
    saved = S.save_profile(quick_probe)
    assert saved.parent == profile_dir and saved.name == f"{S.device_info(model_file)['key']}.json"
    assert S.device_info(model_file)["dev"] == "%d:%d" % (os.major(os.stat(tmp_path).st_dev),
                                                          os.minor(os.stat(tmp_path).st_dev))
    loaded = S.load_profile(model_file)
    assert loaded == S.CostModel.from_dict(quick_probe["model"])
    assert S.model_for(model_file) == loaded
    assert S.CostModel.from_dict(json.loads(json.dumps(loaded.to_dict()))) == loaded
    saved.write_text("{not json")
    with pytest.raises(ValueError, match=str(saved)):
        S.load_profile(model_file)
    with pytest.warns(RuntimeWarning, match="default storage model"):
        assert S.model_for(model_file) is S.DEFAULT


def test_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("RIPPLE_STORAGE_PROFILE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert S.profile_dir() == tmp_path / "ripple-gguf" / "storage"


def test_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        S.probe(missing, quick=True, progress=False)
    if os.geteuid() == 0:  # root writes through permission bits; procfs refuses new files even to root
        target = "/proc"
    else:
        target = tmp_path / "locked"
        target.mkdir()
        target.chmod(0o500)
    try:
        with pytest.raises(OSError, match=str(target)):
            S.probe(target, quick=True, progress=False)
    finally:
        if target != "/proc":
            target.chmod(0o700)


def test_cli_quick_json(tmp_path, profile_dir, capsys):
    from ripple_gguf.cli import main

    assert main(["probe-storage", str(tmp_path), "--quick", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["profile"] == str(profile_dir / f"{out['device']['key']}.json")
    assert S.load_profile(tmp_path) == S.CostModel.from_dict(out["model"])
    assert main(["probe-storage", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
