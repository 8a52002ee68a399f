"""The offline stage end to end: profiling through llama.cpp, thresholds, placement, predictors,
quality figures in the file, determinism, and the errors bad calibration input gets."""
from __future__ import annotations

import json

import numpy as np
import pytest

import ripple_gguf
from ripple_gguf.cli import main
from ripple_gguf.format.layout import RippleFormatError
from ripple_gguf.offline import quality
from ripple_gguf.offline.convert import convert
from ripple_gguf.offline.pipeline import OfflineConfig
from ripple_gguf.offline.predictor import read_predictor
from ripple_gguf.offline.profile import ActivationCapture, ProfileError, tokenize_chunks
from .synth import make_model, stock_logits, small_offline

TOKENS = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 200, 3, 17]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("offline")
    return make_model(d / "src.gguf", ffn_type="Q8_0", n_embd=64, n_ff=128, n_layers=2)


def test_capture_matches_shapes_and_all_layers(model):
    chunks = tokenize_chunks(model, [("t", quality.heldout_text(4000))], 256, 128)
    with ActivationCapture(model, chunk_tokens=128, n_threads=1) as cap:
        c = cap.run(chunks[0])
    assert cap.blocks == [0, 1] and cap.gated == {0, 1}
    for b in (0, 1):
        assert c.x[b].shape == (128, 64) and c.h[b].shape == (128, 128) and c.g[b].shape == (128, 128)
        assert np.isfinite(c.h[b]).all() and np.abs(c.h[b]).sum() > 0
    # the post-activation is silu(gate) * up: check it against the captured gate
    silu = c.g[0] / (1 + np.exp(-c.g[0]))
    assert np.corrcoef(np.abs(silu).ravel(), np.abs(c.h[0]).ravel())[0, 1] > 0.3


def test_offline_file_contents_and_exactness(model, tmp_path, exact_mode):
    dst = tmp_path / "m.ripple.gguf"
    times = {}
    rf = convert(model, dst, offline=small_offline(), quiet=True, stage_seconds=times)
    assert {"profile", "predictors", "placement", "write"} <= set(times)
    assert rf.placement_method == "ripple"
    sp = rf.sparsity
    assert sp["rule"] == "magnitude" and all(t > 0 for t in sp["thresholds"])
    assert sp["active_fraction"] == pytest.approx(OfflineConfig().active_fraction)  # stored as f32
    assert rf.has_predictors
    for l in rf.layers:
        assert sorted(l.order.tolist()) == list(range(128))
        p = read_predictor(rf, l)  # the default kind: a sketch of the layer's own rows
        assert (p.n_embd, p.n_ff, p.gated, len(p.out)) == (64, 128, True, OfflineConfig().sketch_outliers)
    assert rf.metadata["ripple.predictor.kind"] == "sketch"
    j = rf.to_json()
    q, pr = j["placement_quality"], j["predictor"]
    for k in ("mean_run_length", "max_run_length", "reads_per_token", "original_mean_run_length",
              "original_reads_per_token", "frequency_mean_run_length"):
        assert isinstance(q[k], (int, float)) and q[k] > 0, k
    assert len(q["per_layer"]["mean_run_length"]) == 2
    for k in ("rank", "recall", "precision", "over_prediction"):
        assert pr[k] > 0, k
    assert len(pr["per_layer"]["recall"]) == 2
    # top-2% recall (quality.top_recall) per layer, its mean and the worst layer
    top2 = pr["per_layer"]["top2_recall"]
    assert len(top2) == 2 and all(0.0 <= t <= 1.0 for t in top2)
    assert pr["min_top2_recall"] == min(top2) and pr["top2_recall"] == pytest.approx(np.mean(top2))
    rf.check_quick()
    rf.verify_full()
    # a permuted file still computes what the source computes: without the plugin, and with it
    (stock_src, stock_dst) = stock_logits([model, dst], TOKENS)
    assert np.array_equal(stock_src, stock_dst)
    got = quality.run(dst, tokens=TOKENS, n_ctx=256, n_threads=1, n_batch=64)["logits"]
    assert np.abs(got - stock_src).max() / (stock_src.max() - stock_src.min()) < 2e-3


def test_deterministic_for_a_seed(model, tmp_path):
    a = convert(model, tmp_path / "a.gguf", offline=small_offline(seed=3), quiet=True)
    b = convert(model, tmp_path / "b.gguf", offline=small_offline(seed=3), quiet=True)
    assert open(a.path, "rb").read() == open(b.path, "rb").read()


def test_predictor_fit_fraction(model, tmp_path):
    """Predictors fitted to the top 25% of |h| (default) or to the active sets (None): different
    predictors, thresholds tuned to the same recall of the active sets either way."""
    cfg = dict(active_fraction=0.5, predictor_recall=0.96, predictor="lowrank")
    top = convert(model, tmp_path / "top.gguf", offline=small_offline(**cfg), quiet=True)
    act = convert(model, tmp_path / "act.gguf", offline=small_offline(predictor_fit_fraction=None, **cfg), quiet=True)
    assert top.predictor_metrics["fit_fraction"] == 0.25 and act.predictor_metrics["fit_fraction"] is None
    assert any(read_predictor(top, l).to_bytes() != read_predictor(act, l).to_bytes() for l in top.layers)
    for rf in (top, act):
        assert rf.predictor_metrics["recall"] > 0.85  # tuned to 0.96 on validation tokens
    # a fit fraction at or above the active fraction fits the active sets: the same file as None
    same = convert(model, tmp_path / "same.gguf", offline=small_offline(predictor_fit_fraction=0.6, **cfg), quiet=True)
    assert same.predictor_metrics["fit_fraction"] is None
    assert all(read_predictor(same, l).to_bytes() == read_predictor(act, l).to_bytes() for l in act.layers)
    with pytest.raises(ProfileError, match="predictor-fit-fraction"):
        convert(model, tmp_path / "x.gguf", offline=small_offline(predictor_fit_fraction=0.0), quiet=True)
    for bad in (-0.5, float("nan")):
        with pytest.raises(ProfileError, match="--sketch-uncertainty must be >= 0"):
            convert(model, tmp_path / "x.gguf", offline=small_offline(sketch_uncertainty=bad), quiet=True)


@pytest.mark.parametrize("method", ["original", "frequency"])
def test_other_placements(model, tmp_path, method):
    rf = convert(model, tmp_path / "m.gguf", offline=small_offline(placement=method, predictor_rank=0), quiet=True)
    assert rf.placement_method == method and not rf.has_predictors
    assert rf.placement_quality["needed"] == "active"
    if method == "original":
        assert all(np.array_equal(l.order, np.arange(l.n_ff)) for l in rf.layers)


def test_bad_calibration_input(model, tmp_path):
    with pytest.raises(ProfileError, match="empty"):
        convert(model, tmp_path / "x.gguf", offline=small_offline(calib=[("blank.txt", "   \n")]), quiet=True)
    with pytest.raises(ProfileError, match="too short.*short.txt"):
        convert(model, tmp_path / "x.gguf", offline=small_offline(calib=[("short.txt", "a few words")]), quiet=True)
    with pytest.raises(ProfileError, match="between 0 and 1"):
        convert(model, tmp_path / "x.gguf", offline=small_offline(active_fraction=1.5), quiet=True)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    assert main(["convert", model, str(tmp_path / "x.gguf"), "--calib", str(bad), "--quiet"]) == 2
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.tmp").exists()


def test_model_without_ffn_layers_is_refused(tmp_path):
    src = make_model(tmp_path / "noffn.gguf", edit=lambda t: [t.pop(k) for k in list(t) if ".ffn_" in k])
    with pytest.raises(RippleFormatError, match="noffn.gguf"):
        convert(src, tmp_path / "x.gguf", offline=small_offline(), quiet=True)


def test_cli_convert_and_inspect(model, tmp_path, capsys):
    dst = tmp_path / "cli.gguf"
    assert main(["convert", model, str(dst), "--calib-tokens", "512", "--predictor-rank", "8", "--quiet"]) == 0
    assert main(["inspect", str(dst), "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["placement"]["method"] == "ripple" and j["placement_quality"]["mean_run_length"] > 0
    assert j["predictor"]["rank"] == 8 and 0 < j["predictor"]["recall"] <= 1
    assert main(["inspect", str(dst)]) == 0
    out = capsys.readouterr().out
    assert f"min {j['predictor']['min_top2_recall']:.3f}" in out and "top-2% recall" in out
    assert "predictor: sketch (budget 0.67, 12 outlier channels, uncertainty 0.5)" in out
    mode = j["runtime"]["default_mode"]
    assert f"default mode: {mode}" in out and (mode == "sparse" or j["runtime"]["default_mode_reason"] in out)
    rows = [l.split() for l in out.splitlines() if l.split()[:1] in (["0"], ["1"])]
    assert [float(r[-1]) for r in rows] == [round(t, 3) for t in j["predictor"]["per_layer"]["top2_recall"]]


@pytest.mark.real_model
@pytest.mark.slow
def test_real_model_defaults(real_model, tmp_path, exact_mode):
    """Default conversion of SmolLM2-135M: placement and predictor quality on held-out text."""
    times = {}
    rf = convert(real_model, tmp_path / "smol.ripple.gguf", offline=OfflineConfig(quiet=True), quiet=True,
                 stage_seconds=times)
    q, p = rf.placement_quality, rf.predictor_metrics
    print(f"stages {times}; mean run ripple {q['mean_run_length']:.2f} frequency "
          f"{q['frequency_mean_run_length']:.2f} original {q['original_mean_run_length']:.2f}; "
          f"recall {p['recall']:.3f} over-prediction {p['over_prediction']:.2f}")
    assert q["mean_run_length"] > q["frequency_mean_run_length"] > q["original_mean_run_length"]
    assert q["reads_per_token"] < q["original_reads_per_token"]
    # a sketch selects the budget's fraction (0.6) of the neurons, those of the largest estimated |h|
    assert abs(p["predicted_fraction"] - OfflineConfig().sketch_budget) < 0.05 and p["recall"] > 0.7, p
    ripple_gguf.reset_stats()
    got = quality.run(rf.path, tokens=TOKENS)["logits"]
    (stock,) = stock_logits([real_model], TOKENS)
    assert ripple_gguf.stats()["ffn_matmuls"] > 0
    assert (got.argmax(-1) == stock.argmax(-1)).all()
    # SmolLM2's 1008-byte bundles, four to a 4 KiB page: at the sketch's density nearly every page
    # holds a needed bundle, so sparse mode cannot read less than exact mode and the self-check
    # makes exact the file's default, saying why
    assert rf.default_mode == "exact" and "touch 9" in rf.default_mode_reason, rf.default_mode_reason
    assert "of its 4 KiB pages (1008-byte bundles) and take 9" in rf.default_mode_reason
    # the quickstart's question in sparse mode at the default conversion: stock's greedy answer
    from ripple_gguf.quickstart import DEFAULT_PROMPT

    prompt = quality.tokenize(real_model, DEFAULT_PROMPT)
    want = quality.run(real_model, prompt_tokens=prompt, n_greedy=8, stock=True)["greedy"].tolist()
    ripple_gguf.configure(mode="sparse")
    answer = quality.run(rf.path, prompt_tokens=prompt, n_greedy=8)["greedy"].tolist()
    assert answer[:3] == want[:3], (answer, want)  # " Paris." and what follows it


@pytest.mark.real_model
@pytest.mark.slow
def test_quickstart_says_which_mode_and_why(real_model, tmp_path, capsys):
    """`ripple-gguf quickstart` (the README's main job) in the file's default mode says which it is
    and why the converter chose exact; with --mode sparse it runs the predictors and still answers
    " Paris"."""
    before = ripple_gguf.settings()["mode"]
    try:
        ripple_gguf.configure(mode="auto")
        assert main(["quickstart", "--out", str(tmp_path), "--tokens", "8"]) == 0
        out = capsys.readouterr().out
        assert "mode exact (the file's default: sparse mode cannot read less than exact mode" in out, out
        assert "ripple-gguf quickstart --mode sparse" in out
        assert main(["quickstart", "--out", str(tmp_path), "--tokens", "8", "--mode", "sparse"]) == 0
        out = capsys.readouterr().out
        assert "The capital of France is Paris" in out and "\nmode sparse:" in out, out
        assert "--mode sparse)" not in out
    finally:
        ripple_gguf.configure(mode=before)


def test_calibration_text_that_is_not_text_is_refused(model, tmp_path, capsys):
    """NUL bytes are valid UTF-8 and used to convert (exit 0) into a model whose predictors were
    trained on nothing; one repeated token is as bad. Both are refused, naming the file."""
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"\0" * 20000)
    out = tmp_path / "x.gguf"
    assert main(["convert", model, str(out), "--calib", str(nul), "--calib-tokens", "512", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nul.txt" in err and "control characters" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(ProfileError, match="same.txt: one token is 99% of the calibration tokens"):
        convert(model, out, offline=small_offline(calib=[("same.txt", "a" * 5000)]), quiet=True)
    with pytest.raises(ProfileError, match=r"few.txt: the calibration tokens hold \d+ distinct tokens, at least 16"):
        convert(model, out, offline=small_offline(calib=[("few.txt", "hello " * 2000)]), quiet=True)
    assert not out.exists()


def test_non_finite_activations_are_refused(tmp_path):
    """A model whose FFN input overflows float32 in llama.cpp (ffn_norm of 1e38) cannot be profiled:
    the error names the file and the layer."""
    def edit(t):
        t["blk.1.ffn_norm.weight"] = np.full(64, 3e38, np.float32)

    src = make_model(tmp_path / "inf.gguf", ffn_type="Q8_0", n_layers=2, edit=edit)
    with pytest.raises(ProfileError, match=r"inf\.gguf: layer 1: FFN input holds inf or nan"):
        convert(src, tmp_path / "x.gguf", offline=small_offline(), quiet=True)
    assert not (tmp_path / "x.gguf").exists()
