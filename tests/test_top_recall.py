"""Top-2% recall: the fraction of each token's largest neurons (by |h|) that a selection holds."""
from __future__ import annotations

import numpy as np
import pytest

from ripple_gguf.offline.quality import TOP_RECALL_FRACTION, index_recall, top_indices, top_recall


def test_hand_made_case():
    # n_ff 100: each token's top ceil(0.02 x 100) = 2 neurons by |h|
    h = np.full((2, 100), 0.1, np.float32)
    h[0, 7], h[0, 3] = 5.0, -4.0  # |h|: the sign does not matter
    h[1, 0], h[1, 99] = 9.0, 8.0
    sel = np.zeros((2, 100), bool)
    sel[0, [7, 50]] = True  # neuron 3 missed: 1 of 2
    sel[1, [0, 99, 50]] = True  # both: 2 of 2
    assert TOP_RECALL_FRACTION == 0.02
    idx = top_indices(np.abs(h))
    assert idx.shape == (2, 2) and idx.dtype == np.int32
    assert sorted(idx[0]) == [3, 7] and sorted(idx[1]) == [0, 99]
    assert top_recall(sel, np.abs(h)) == pytest.approx(0.75)  # mean of 0.5 and 1.0 over tokens
    assert index_recall(sel, idx) == pytest.approx(0.75)
    # every neuron selected: 1; none: 0
    assert top_recall(np.ones_like(sel), np.abs(h)) == 1.0
    assert top_recall(np.zeros_like(sel), np.abs(h)) == 0.0
    # k rounds up: ceil(0.02 x 101) = 3, ceil(0.02 x 10) = 1; the fraction is a parameter
    assert top_indices(np.ones((1, 101))).shape == (1, 3)
    assert top_indices(np.ones((1, 10))).shape == (1, 1)
    assert sorted(top_indices(np.arange(10.0)[None], 0.3)[0]) == [7, 8, 9]


def test_zero_activations_are_not_needed():
    # a ReLU-family token with one nonzero neuron among its top 2: only that one counts; a token
    # with no nonzero neuron is left out of the mean
    h = np.zeros((3, 100), np.float32)
    h[0, 5] = 2.0
    h[1, [1, 2]] = 1.0
    sel = np.zeros((3, 100), bool)
    sel[0, 5] = True
    idx = top_indices(h)
    assert sorted(idx[0]) == [-1, 5] and (idx[2] == -1).all()
    assert top_recall(sel, h) == pytest.approx(0.5)  # token 0: 1/1, token 1: 0/2, token 2: left out
    assert top_recall(sel, np.zeros_like(h)) == 1.0  # nothing to recall


def test_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((64, 1536)).astype(np.float32)
    sel = rng.random((64, 1536)) < 0.7
    k = 31  # ceil(0.02 x 1536)
    direct = np.mean([sel[t, np.argsort(-np.abs(h[t]))[:k]].mean() for t in range(64)])
    assert top_recall(sel, np.abs(h)) == pytest.approx(direct, abs=1e-12)
    # the selection of exactly the top neurons recalls all of them
    top = np.zeros_like(sel)
    np.put_along_axis(top, top_indices(np.abs(h)), True, axis=1)
    assert top.sum() == 64 * k and top_recall(top, np.abs(h)) == 1.0


def test_bad_shapes():
    with pytest.raises(ValueError, match="differ"):
        top_recall(np.zeros((2, 10), bool), np.ones((2, 11)))
    with pytest.raises(ValueError, match="do not match"):
        index_recall(np.zeros((2, 10), bool), np.zeros((3, 1), np.int32))
    with pytest.raises(ValueError, match="beyond n_ff"):
        index_recall(np.zeros((1, 10), bool), np.array([[10]]))
    with pytest.raises(ValueError, match="fraction"):
        top_indices(np.ones((1, 10)), 0.0)
    with pytest.raises(ValueError, match="tokens, n_ff"):
        top_indices(np.ones(10))
