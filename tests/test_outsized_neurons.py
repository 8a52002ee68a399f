"""Models of other architectures with outsized neurons planted in a few layers (issue 13): the
default conversion keeps sparse mode within 5% perplexity of exact mode, or its self-check makes
exact the file's default mode; the predictors select the outsized neurons where they are large;
a token never needs more bytes than the dense layer.

(On a real qwen2 0.5B Q4_K_M, a few FFN neurons of some layers reach 100-1500x the layer's median
|h|; predictors that missed them took sparse mode to 10x exact mode's perplexity.)
"""
from __future__ import annotations

import numpy as np
import pytest

from ripple_gguf.offline import quality
from ripple_gguf.offline.convert import convert
from ripple_gguf.offline.pipeline import OfflineConfig
from ripple_gguf.offline.predictor import read_predictor
from ripple_gguf.offline.profile import ActivationCapture, tokenize_chunks
from .synth import make_model

pytestmark = pytest.mark.slow

PLANTED = {1: [7, 50, 130, 201], 2: [7, 50, 130, 201]}  # block -> outsized neurons
N_LAYERS, N_FF = 4, 256
CHUNK = 256  # the synthetic models' context
EVAL_TOKENS = 1024  # held-out tokens of the perplexity comparison (the self-check uses the first 512)
DECODE_TOKENS = 64


def small_default() -> OfflineConfig:
    """The default OfflineConfig with only the token counts made small (the models are tiny)."""
    return OfflineConfig(calib_tokens=1024, chunk_tokens=128, threshold_tokens=256, eval_tokens=256, threads=2,
                         quiet=True)


@pytest.fixture(scope="module", params=["qwen2", "gemma2"])
def packed(request, tmp_path_factory):
    """(source, packed file) of the architecture with outsized neurons planted, converted with the
    default configuration. The down weights are F32: h of these neurons (up to 1e8 here) would
    overflow the f16 scale of the Q8_0 copy of h that a quantized down matmul makes (ggml)."""
    d = tmp_path_factory.mktemp(request.param)
    src = make_model(d / "src.gguf", arch=request.param, n_layers=N_LAYERS, n_ff=N_FF, outsized=PLANTED,
                     ffn_type={"gate": "Q8_0", "up": "Q8_0", "down": None})
    rf = convert(src, d / "m.ripple.gguf", offline=small_default(), quiet=True)
    return src, rf


@pytest.fixture(scope="module")
def heldout(packed):
    """{block: (X, |h|)} of the source on held-out text."""
    src, _ = packed
    chunks = tokenize_chunks(src, [("heldout", quality.heldout_text(60 * 1024))], 4 * CHUNK, CHUNK)
    xs, hs = {}, {}
    with ActivationCapture(src, chunk_tokens=CHUNK, n_threads=2) as cap:
        for c in cap.iterate(chunks):
            for b in cap.blocks:
                xs.setdefault(b, []).append(c.x[b].copy())
                hs.setdefault(b, []).append(np.abs(c.h[b]))
    return {b: (np.concatenate(xs[b]), np.concatenate(hs[b]).astype(np.float64)) for b in xs}


def test_planted_neurons_are_outsized(packed, heldout):
    """Where they fire (their 99th percentile over tokens; some fire on few tokens), the planted neurons' |h| is far beyond the
    layer's median |h| and far beyond the typical ordinary neuron's 99th percentile."""
    src, _ = packed
    for b, neurons in PLANTED.items():
        _, h = heldout[b]
        med = np.median(h)
        p99 = np.quantile(h, 0.99, axis=0)
        ordinary = np.delete(p99, neurons)
        ratio = p99[neurons] / med
        print(f"\n{src}: layer {b}: planted neurons' p99 |h| / layer median |h|: {np.round(ratio)}; "
              f"/ ordinary neurons' median p99: {np.round(p99[neurons] / np.median(ordinary))}; "
              f"largest ordinary p99 / median: {ordinary.max() / med:.0f}")
        assert (ratio > 100).all()
        assert (p99[neurons] > 20 * np.median(ordinary)).all()


def test_planted_neurons_selected(packed, heldout):
    """The layer's predictor selects a planted neuron on (nearly) every token where it is among the
    token's top 2% by |h|; the conversion's own top-2% recall is reported."""
    _, rf = packed
    layers = {l.block: l for l in rf.layers}
    for b, neurons in PLANTED.items():
        X, h = heldout[b]
        sel = read_predictor(rf, layers[b]).predict(X)
        top = quality.top_indices(h)
        big = np.zeros_like(sel)
        np.put_along_axis(big, np.where(top >= 0, top, 0), top >= 0, axis=1)
        big[:, np.setdiff1d(np.arange(h.shape[1]), neurons)] = False  # planted neurons in a token's top 2%
        recall_planted = sel[big].mean()
        print(f"\n{rf.path}: layer {b}: planted neurons in the top 2% on {int(big.sum())} (token, neuron) pairs, "
              f"selected {recall_planted:.4f}; layer top-2% recall {quality.top_recall(sel, h):.4f}, "
              f"selected fraction {sel.mean():.3f}")
        assert big.sum() > 0.05 * len(h) * len(neurons)  # they are large on many tokens
        assert recall_planted >= 0.98
    m = rf.predictor_metrics
    print(f"\n{rf.path}: conversion: top-2% recall {m['top2_recall']:.4f} (worst layer {m['min_top2_recall']:.4f})")


def test_sparse_within_5_percent_or_exact_by_default(packed):
    """Sparse mode within 5% of exact mode's perplexity on held-out text (the default mode sparse),
    or exact as the file's default mode with the self-check's perplexity reason; either way a token
    decoded alone never needs more bytes than the dense layers."""
    _, rf = packed
    toks = quality.heldout_tokens(rf.path, EVAL_TOKENS)
    assert len(toks) == EVAL_TOKENS
    exact = quality.mode_perplexity(rf.path, toks, "exact", chunk=CHUNK)["ppl"]
    sparse = quality.mode_perplexity(rf.path, toks, "sparse", chunk=CHUNK, decode_tokens=DECODE_TOKENS)
    s = sparse["decode_stats"]
    print(f"\n{rf.path}: default mode {rf.default_mode} {rf.default_mode_reason!r}; perplexity on {len(toks)} held-out "
          f"tokens: exact {exact:.4f}, sparse {sparse['ppl']:.4f} ({sparse['ppl'] / exact - 1:+.2%}); decoding "
          f"{DECODE_TOKENS} tokens one at a time: needed {s['needed_bytes']} bytes, dense {s['dense_bytes']} "
          f"({s['needed_bytes'] / s['dense_bytes']:.3f})")
    assert np.isfinite(exact) and np.isfinite(sparse["ppl"])
    if rf.default_mode == "sparse":
        assert sparse["ppl"] <= exact * 1.05
    else:
        assert rf.default_mode == "exact" and "perplexity" in rf.default_mode_reason, rf.default_mode_reason
    assert 0 < s["needed_bytes"] <= s["dense_bytes"]
