"""Sketch predictors: the C kernel's scores equal sketch.py's reference on synthetic layers; the blob
round-trips; bad blobs are refused naming the problem."""
from __future__ import annotations

import numpy as np
import pytest

from ripple_gguf import binding
from ripple_gguf.offline import sketch as SK


def _layer(rng, n_embd, n_ff, gated=True, heavy=()):
    W_up = rng.standard_normal((n_ff, n_embd)).astype(np.float32) * 0.05
    W_gate = rng.standard_normal((n_ff, n_embd)).astype(np.float32) * 0.05 if gated else None
    X = rng.standard_normal((64, n_embd)).astype(np.float32)
    for j in heavy:  # outlier input channels, as real models have
        X[:, j] *= 40
    return W_up, W_gate, X


@pytest.mark.parametrize("n_embd, n_ff, gated, act, k, weight", [
    (576, 256, True, "silu", 16, 0.5),  # SmolLM2's width: 36 chunks of 16 channels, 16 blocks of 16 rows
    (576, 256, True, "silu", 16, 0.0),  # the plain |h~| (version 1's score)
    (256, 64, True, "gelu", 8, 0.5),
    (256, 64, True, "relu", 8, 2.0),
    (200, 90, False, "silu", 3, 0.5),   # ungated, a width padded to 256, a last block of 10 rows
    (200, 96, False, "relu", 3, 0.0),
    (64, 32, True, "silu", 0, 1.0),     # no outlier channel
])
def test_c_scores_equal_the_reference(n_embd, n_ff, gated, act, k, weight):
    rng = np.random.default_rng(n_embd + n_ff)
    W_up, W_gate, X = _layer(rng, n_embd, n_ff, gated, heavy=(3, n_embd - 5))
    sk = SK.Sketch.build(W_up, W_gate, (X * X).mean(axis=0), n_out=k, act_name=act)
    sk.fit_variance(X, W_up, W_gate, weight).calibrate(X, 0.4)
    assert (sk.var_u > 0) == (weight > 0) and (sk.var_g > 0) == (weight > 0 and gated)
    if k:
        assert {3, n_embd - 5} <= set(sk.out.tolist())  # the heavy channels are kept exact
    blob = sk.to_bytes()
    ref = sk.scores(X)
    got, sel = binding.sketch_scores(blob, n_embd, n_ff, X)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6 * float(np.abs(ref).max()))
    agree = np.mean(sel == (ref > np.float32(sk.threshold)))
    assert agree > 0.999, agree  # only scores within rounding of the threshold may differ
    assert 0.3 < sel.mean() < 0.5
    back = SK.Sketch.from_bytes(blob, n_embd, n_ff)
    np.testing.assert_array_equal(back.scores(X), ref)


def test_sketch_tracks_the_true_activation_ranking():
    rng = np.random.default_rng(1)
    n_embd, n_ff = 256, 512
    W_up, W_gate, X = _layer(rng, n_embd, n_ff, heavy=(7, 100))
    sk = SK.Sketch.build(W_up, W_gate, (X * X).mean(axis=0), n_out=8)
    h = SK.act("silu", X @ W_gate.T) * (X @ W_up.T)
    s = sk.scores(X)
    top = np.argsort(-np.abs(h), axis=1)[:, :10]  # each token's 10 largest |h|
    kept = np.take_along_axis(s, top, axis=1) > np.quantile(s, 0.5, axis=1, keepdims=True)
    assert kept.mean() > 0.97, kept.mean()


def test_bad_sketch_blobs_are_refused():
    rng = np.random.default_rng(2)
    W_up, W_gate, X = _layer(rng, 128, 64)
    blob = bytearray(SK.Sketch.build(W_up, W_gate, (X * X).mean(axis=0), n_out=4).calibrate(X, 0.5).to_bytes())
    with pytest.raises(ValueError, match="does not fit a layer of 128 x 32"):
        binding.sketch_scores(bytes(blob), 128, 32, X)
    bad = bytearray(blob)
    bad[4] = 9  # version
    with pytest.raises(ValueError, match="version 9 .* not supported"):
        binding.sketch_scores(bytes(bad), 128, 64, X)
    bad = bytearray(blob)
    bad[64:68] = (500).to_bytes(4, "little")  # an outlier channel past n_embd
    with pytest.raises(ValueError, match="outlier channel list"):
        binding.sketch_scores(bytes(bad), 128, 64, X)
    with pytest.raises(ValueError, match="version 9"):
        SK.Sketch.from_bytes(bytes(bad[:4]) + (9).to_bytes(4, "little") + bytes(bad[8:]), 128, 64)


def test_allocation_shares_the_budget():
    """uniform: every layer keeps the budget's fraction; relative: thresholds in the ratio of the
    layers' RMS scores, the model's mean fraction still the budget."""
    rng = np.random.default_rng(3)
    scores = {0: np.abs(rng.standard_normal(40000)).astype(np.float32),  # spread
              1: (np.abs(rng.standard_normal(40000)) ** 3 * 5).astype(np.float32)}  # a few large ones dominate
    uni = SK.allocate(scores, 0.6, "uniform")
    for b, s in scores.items():
        assert abs(np.mean(s > uni[b]) - 0.6) < 0.01
    rel = SK.allocate(scores, 0.6, "relative")
    frac = {b: float(np.mean(s > rel[b])) for b, s in scores.items()}
    assert abs(np.mean(list(frac.values())) - 0.6) < 0.01
    assert frac[0] > 0.7 and frac[1] < 0.5, frac  # the heavy-tailed layer gives up neurons
    rms = {b: np.sqrt(np.mean(s.astype(np.float64) ** 2)) for b, s in scores.items()}
    assert abs(rel[0] / rel[1] - rms[0] / rms[1]) < 1e-4 * rms[0] / rms[1]
    assert SK.allocate(scores, 1.0, "relative") == {0: -1.0, 1: -1.0}
    with pytest.raises(ValueError, match="allocation 'bogus'"):
        SK.allocate(scores, 0.6, "bogus")


def test_version_1_blobs_score_plainly():
    """Blobs of version 1 (no variance coefficients) still load, in C and here, and score |h~|."""
    rng = np.random.default_rng(4)
    W_up, W_gate, X = _layer(rng, 128, 48, heavy=(5,))
    sk = SK.Sketch.build(W_up, W_gate, (X * X).mean(axis=0), n_out=4).fit_variance(X, W_up, W_gate, 1.0)
    blob = bytearray(sk.to_bytes())
    assert int.from_bytes(blob[4:8], "little") == SK.VERSION == 2
    blob[4:8] = (1).to_bytes(4, "little")  # a version 1 blob: offsets 40-47 were zero padding
    blob[40:48] = bytes(8)
    old = SK.Sketch.from_bytes(bytes(blob), 128, 48)
    assert old.var_g == old.var_u == 0.0
    plain = SK.Sketch.build(W_up, W_gate, (X * X).mean(axis=0), n_out=4).scores(X)
    np.testing.assert_array_equal(old.scores(X), plain)
    got, _ = binding.sketch_scores(bytes(blob), 128, 48, X)
    np.testing.assert_allclose(got, plain, rtol=2e-5, atol=1e-6 * float(plain.max()))
    assert not np.allclose(sk.scores(X), plain)  # the variance term moves the scores
    bad = bytearray(sk.to_bytes())
    bad[40:44] = np.float32(-1).tobytes()
    with pytest.raises(ValueError, match="variance coefficients"):
        binding.sketch_scores(bytes(bad), 128, 48, X)
