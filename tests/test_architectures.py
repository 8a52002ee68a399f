"""Dense-FFN architectures besides llama and gpt2 (gemma2, qwen2, phi3), with activations beyond
the float16 range, and the converter's self-check of its own output (issue 10, "Why" 2 and 8)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import ripple_gguf
from ripple_gguf.cli import main
from ripple_gguf.format.layout import RippleFormatError
from ripple_gguf.offline import quality
from ripple_gguf.offline.convert import convert
from ripple_gguf.offline.pipeline import OfflineConfig
from ripple_gguf.offline.predictor import read_predictor
from ripple_gguf.offline.profile import ActivationCapture, tokenize_chunks
from .synth import reseal, make_model, stock_logits

TOKENS = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 46, 32, 84, 104, 101, 32, 113, 117, 105, 99,
          107, 32, 98, 114, 111, 119, 110, 32, 102, 111, 120]


def cfg(**kw) -> OfflineConfig:
    base = dict(calib_tokens=1024, chunk_tokens=128, threshold_tokens=256, eval_tokens=256, predictor_rank=16,
                threads=2, quiet=True)
    base.update(kw)
    return OfflineConfig(**base)


@pytest.fixture
def mode():
    """Sets the mode for a test; the previous one restored after it."""
    before = ripple_gguf.settings()["mode"]
    yield lambda m: ripple_gguf.configure(mode=m)
    ripple_gguf.configure(mode=before)


@pytest.fixture(scope="module", params=["gemma2", "qwen2"])
def packed(request, tmp_path_factory):
    """(source, packed file) of a synthetic model of the architecture, converted with profiling; no
    numpy warning (overflow, invalid value) may occur on the way."""
    d = tmp_path_factory.mktemp(request.param)
    src = make_model(d / "src.gguf", arch=request.param, ffn_type="Q8_0", n_layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rf = convert(src, d / "m.ripple.gguf", offline=cfg(), quiet=True)
    return src, rf


def test_activations_exceed_float16(packed):
    """The synthetic models are what the issue describes: FFN post-activations beyond 65504 and
    FFN input features of 1e3 and more next to features of 1e-7."""
    src, _ = packed
    chunks = tokenize_chunks(src, [("t", quality.heldout_text(4000))], 128, 128)
    with ActivationCapture(src, chunk_tokens=128, n_threads=1) as cap:
        c = cap.run(chunks[0])
    for b in cap.blocks:
        assert np.abs(c.h[b]).max() > np.finfo(np.float16).max
        assert np.abs(c.x[b]).max() > 1e3 and c.x[b].std(axis=0).min() < 1e-5


def test_predictors_finite_and_useful(packed):
    _, rf = packed
    assert rf.has_predictors and all(np.isfinite(rf.sparsity["thresholds"]))
    for layer in rf.layers:
        p = read_predictor(rf, layer)  # a sketch (the default kind): its steps and scales are finite
        p.check_finite()
        assert len(p.out) == OfflineConfig().sketch_outliers and p.act == ("gelu" if "gemma" in rf.gguf.get("general.architecture") else "silu")
    m = rf.predictor_metrics
    assert 0.1 < m["predicted_fraction"] < 0.95, m  # before: recall 0.0, NaN thresholds
    assert m["recall"] > m["predicted_fraction"] + 0.1, m  # far better than a random choice of as many


def test_exact_mode_equals_stock(packed, mode):
    src, rf = packed
    mode("exact")
    got = quality.run(rf.path, tokens=TOKENS, n_ctx=256, n_threads=1, n_batch=64)["logits"]
    (want,) = stock_logits([src], TOKENS)
    np.testing.assert_array_equal(got, want)


def test_sparse_mode_runs_and_is_plausible(packed, mode):
    _, rf = packed
    # the self-check's perplexity test passed; a tiny model's bundles are all read anyway (its
    # selections touch every page), so its default may be exact for that reason alone
    assert rf.default_mode == "sparse" or "cannot read less than exact mode" in rf.default_mode_reason, \
        rf.default_mode_reason
    mode("exact")
    exact = quality.run(rf.path, tokens=TOKENS, n_ctx=256, n_threads=1, n_batch=64)["logits"]
    mode("sparse")
    ripple_gguf.reset_stats()
    sparse = quality.run(rf.path, tokens=TOKENS, n_ctx=256, n_threads=1, n_batch=64)["logits"]
    s = ripple_gguf.stats()
    assert np.isfinite(sparse).all()
    assert s["neurons_computed"] < s["neurons_total"]  # predictors did select
    assert quality.top1_agreement(sparse, exact) >= 0.6
    ppl_e, ppl_s = quality.perplexity(exact, TOKENS), quality.perplexity(sparse, TOKENS)
    assert ppl_s < 1.5 * ppl_e


def test_pages_touched_and_the_self_checks_page_limit(packed, monkeypatch):
    """quality.page_fraction: the pages that hold the bundles sparse mode selects, per token decoded
    one at a time; with 1-byte pages exactly the needed bytes, with larger pages more, never above
    the whole FFN. The self-check makes exact the default mode when they pass PAGE_LIMIT."""
    _, rf = packed
    toks = TOKENS[:16]
    exact_bytes = quality.page_fraction(rf.path, toks, page=1)
    assert exact_bytes["pages"] == pytest.approx(exact_bytes["needed"], abs=1e-12)
    assert 0 < exact_bytes["needed"] < 1 and exact_bytes["tokens"] == len(toks)
    small, big = quality.page_fraction(rf.path, toks, page=256), quality.page_fraction(rf.path, toks, page=1 << 20)
    assert exact_bytes["needed"] <= small["pages"] <= big["pages"] == pytest.approx(1.0)
    # read with no cache: every needed bundle, and the gaps the collapse threshold merges
    assert exact_bytes["needed"] - 1e-9 <= exact_bytes["read"] <= 1 + 1e-9 and exact_bytes["requests"] >= 1
    monkeypatch.setattr(quality, "PAGE_LIMIT", 0.0)
    r = quality.self_check(rf.path, n_tokens=64)
    assert r["default_mode"] == "exact" and "cannot read less than exact mode" in r["reason"], r
    assert f"({rf.layers[0].bundle_size}-byte bundles)" in r["reason"] and len(r["reason"]) < 256


def test_fused_gate_up_is_refused(tmp_path):
    """phi3 keeps gate and up in one ffn_up of 2 x n_ff rows: refused with a message naming the file."""
    src = make_model(tmp_path / "phi.gguf", arch="phi3", ffn_type="Q8_0")
    (stock,) = stock_logits([src], TOKENS[:8])  # llama.cpp itself runs it
    assert np.isfinite(stock).all()
    for profile in (None, cfg()):
        with pytest.raises(RippleFormatError, match=r"phi\.gguf.*ffn_up\.weight holds gate and up fused"):
            convert(src, tmp_path / "x.gguf", offline=profile, quiet=True)
    assert main(["convert", src, str(tmp_path / "x.gguf"), "--quiet"]) == 2
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
@pytest.mark.real_model
def test_self_check_falls_back_to_exact(real_model, tmp_path, mode, caplog):
    """SmolLM2 with only the 20% most active neurons counted active: the predictors pass (recall
    near its target) but sparse mode's perplexity is about 3x exact mode's on the held-out text,
    so the file gets exact as its default mode; the runtime follows it unless the user chose one."""
    rf = convert(real_model, tmp_path / "m.ripple.gguf", quiet=True,
                 offline=cfg(chunk_tokens=256, threshold_tokens=512, active_fraction=0.2))
    err = caplog.text  # the converter's warning (logged; the command prints it)
    assert "the file's default mode is exact" in err and "sparse-mode perplexity" in err
    assert rf.default_mode == "exact" and "over exact mode's" in rf.default_mode_reason
    assert rf.to_json()["runtime"]["default_mode"] == "exact"
    toks = quality.tokenize(real_model, "The capital of France is Paris. The capital of Italy is")
    want = quality.run(real_model, tokens=toks, stock=True, n_threads=1)["logits"]
    mode("auto")
    got = quality.run(rf.path, tokens=toks, n_threads=1)["logits"]
    np.testing.assert_array_equal(got, want)  # exact: stock's logits
    note = ripple_gguf.settings()["mode_note"]
    assert "m.ripple.gguf: exact" in note and "over exact mode's" in note
    assert ripple_gguf.last_load()["default_mode"] == "exact"
    mode("sparse")  # the user's explicit choice wins
    got = quality.run(rf.path, tokens=toks, n_threads=1)["logits"]
    assert not np.array_equal(got, want)


def test_unknown_predictor_blob_version_refused_at_load(packed, tmp_path):
    """A sketch blob of a version this build does not know (a newer converter's) is refused at load."""
    import shutil

    _, rf = packed
    path = tmp_path / "newer.gguf"
    shutil.copyfile(rf.path, path)
    with open(path, "r+b") as f:
        f.seek(rf.layers[0].predictor_offset + 4)
        f.write((3).to_bytes(4, "little"))
    reseal(path)  # a file written by that converter carries checksums of its own bytes
    with pytest.raises(RippleFormatError, match="sketch predictor version 3 with 2 bits is not supported"):
        quality.run(path, tokens=TOKENS[:4], n_ctx=64, n_threads=1)
