"""Placement orders (original, frequency, ripple) and their run statistics: small crafted cases
with known answers, a pure-Python reference of the greedy path, synthetic structured activations."""
from __future__ import annotations

import numpy as np
import pytest

from ripple_gguf.eval.synthetic import TopicModel, counts
from ripple_gguf.offline import placement as P


def reference_greedy_path(co: np.ndarray) -> np.ndarray:
    """The documented algorithm, written plainly (a test oracle for the C implementation)."""
    n = co.shape[0]
    iu, ju = np.triu_indices(n, 1)
    w = co[iu, ju].astype(np.int64)
    keep = w > 0
    iu, ju, w = iu[keep], ju[keep], w[keep]
    pairs = np.lexsort((ju, iu, -w))  # decreasing count, ties by (i, j)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    adj = [[] for _ in range(n)]
    for k in pairs:
        i, j = int(iu[k]), int(ju[k])
        if len(adj[i]) < 2 and len(adj[j]) < 2 and find(i) != find(j):
            parent[find(i)] = find(j)
            adj[i].append(j)
            adj[j].append(i)
    freq = np.diag(co).astype(np.int64)
    frags = {}
    for i in range(n):
        frags.setdefault(find(i), []).append(i)
    out = []
    for members in sorted(frags.values(), key=lambda ms: (-freq[ms].max(), ms[int(np.argmax(freq[ms]))])):
        ends = [i for i in members if len(adj[i]) < 2]
        cur = min(ends, key=lambda i: (-freq[i], i))
        prev = -1
        while cur != -1:
            out.append(cur)
            nxt = [x for x in adj[cur] if x != prev]
            prev, cur = cur, (nxt[0] if nxt else -1)
    return np.array(out, dtype=np.int32)


def random_counts(rng, n, tokens=200, p=0.05):
    return counts(rng.random((tokens, n)) < p)


def is_permutation(order, n):
    return order.shape == (n,) and np.array_equal(np.sort(order), np.arange(n))


# ---- orders ----

def test_original_and_frequency_orders():
    assert np.array_equal(P.original_order(4), [0, 1, 2, 3])
    order = P.frequency_order(np.array([3, 7, 3, 0, 7]))
    assert order.dtype == np.int32
    assert np.array_equal(order, [1, 4, 0, 2, 3])  # ties by neuron id


def test_chain_is_recovered_under_a_shuffle():
    n = 12
    chain = np.arange(n)
    co = np.zeros((n, n), dtype=np.int32)
    for a, b in zip(chain[:-1], chain[1:]):
        co[a, b] = co[b, a] = 100 - a  # strong along the chain
    co[0, 5] = co[5, 0] = co[3, 9] = co[9, 3] = 1  # weak distractors
    np.fill_diagonal(co, 100)
    perm = np.random.default_rng(0).permutation(n)
    shuffled = co[np.ix_(perm, perm)]  # neuron k of `shuffled` is neuron perm[k] of `co`
    order = P.ripple_order(shuffled)
    recovered = perm[order]
    assert np.array_equal(recovered, chain) or np.array_equal(recovered, chain[::-1])


def test_two_cliques_are_each_contiguous():
    n = 10
    a, b = [0, 2, 4, 6, 8], [1, 3, 5, 7, 9]
    co = np.zeros((n, n), dtype=np.float32)
    co[np.ix_(a, a)] = 50
    co[np.ix_(b, b)] = 40
    co[0, 1] = co[1, 0] = 2  # the cliques touch weakly
    order = P.ripple_order(co)
    pos = np.argsort(order)
    for clique in (a, b):
        p = np.sort(pos[clique])
        assert p[-1] - p[0] == len(clique) - 1


def test_zero_matrix_gives_identity():
    assert np.array_equal(P.ripple_order(np.zeros((7, 7), dtype=np.int32)), np.arange(7))
    assert P.ripple_order(np.zeros((0, 0), dtype=np.int32)).shape == (0,)
    assert np.array_equal(P.ripple_order(np.ones((1, 1), dtype=np.int32)), [0])


def test_isolated_neurons_follow_fragments_by_frequency():
    co = np.zeros((5, 5), dtype=np.int32)
    co[3, 4] = co[4, 3] = 2
    np.fill_diagonal(co, [1, 0, 9, 2, 4])
    # fragments: {3,4} (best 4: freq 4), {2} (9), {0} (1), {1} (0); {3,4} walked from 4
    assert np.array_equal(P.ripple_order(co), [2, 4, 3, 0, 1])


@pytest.mark.parametrize("n,seed", [(2, 0), (3, 1), (17, 2), (64, 3), (150, 4)])
def test_matches_reference(n, seed):
    rng = np.random.default_rng(seed)
    _, co = random_counts(rng, n, tokens=60, p=0.1)  # small counts: many ties
    assert np.array_equal(P.ripple_order(co), reference_greedy_path(co))


def test_large_counts_take_the_radix_path():
    rng = np.random.default_rng(5)
    n = 80
    upper = np.triu(rng.integers(0, 1 << 32, size=(n, n), dtype=np.uint64), 1)
    upper[rng.random((n, n)) < 0.3] = 0
    upper[0, 1:6] = (1 << 32) - 1  # ties at the top of the range
    co = (upper + upper.T).astype(np.uint32)
    np.fill_diagonal(co, rng.integers(0, 1 << 32, size=n, dtype=np.uint64).astype(np.uint32))
    assert np.array_equal(P.ripple_order(co), reference_greedy_path(co))


def test_input_dtypes_and_validation():
    rng = np.random.default_rng(6)
    _, co = random_counts(rng, 40)
    want = P.ripple_order(co)
    for dtype in (np.int32, np.int64, np.float32, np.float64):
        assert np.array_equal(P.ripple_order(co.astype(dtype)), want)
    assert np.array_equal(P.ripple_order(np.asfortranarray(co)), want)
    with pytest.raises(ValueError, match="non-integer"):
        P.ripple_order(co.astype(np.float32) + 0.5)
    with pytest.raises(ValueError, match="negative"):
        P.ripple_order(-co.astype(np.int32))
    with pytest.raises(ValueError, match="square"):
        P.ripple_order(co[:, :-1])


def test_random_matrices_permutation_determinism_objective():
    rng = np.random.default_rng(7)
    for _ in range(3):
        freq, co = random_counts(rng, 300, tokens=400, p=0.03)
        order = P.ripple_order(co)
        assert is_permutation(order, 300)
        assert np.array_equal(order, P.ripple_order(co.copy()))
        ripple = P.adjacent_coactivation(co, order)
        assert ripple >= P.adjacent_coactivation(co, P.frequency_order(freq))
        assert ripple >= P.adjacent_coactivation(co, P.original_order(300))


def test_structured_objective_strictly_better():
    model = TopicModel(300, n_topics=20, group=15, seed=1)
    freq, co = counts(model.masks(2000, seed=2))
    ripple = P.adjacent_coactivation(co, P.ripple_order(co))
    assert ripple > P.adjacent_coactivation(co, P.frequency_order(freq))
    assert ripple > P.adjacent_coactivation(co, P.original_order(300))


def test_placements_dispatcher():
    rng = np.random.default_rng(8)
    freq, co = random_counts(rng, 30)
    assert np.array_equal(P.placements("original", None, None, 30), np.arange(30))
    assert np.array_equal(P.placements("frequency", freq, None, 30), P.frequency_order(freq))
    assert np.array_equal(P.placements("ripple", None, co, 30), P.ripple_order(co))
    with pytest.raises(ValueError, match="unknown placement"):
        P.placements("random", freq, co, 30)
    with pytest.raises(ValueError, match="expected 31"):
        P.placements("ripple", freq, co, 31)
    with pytest.raises(ValueError, match="needs co"):
        P.placements("ripple", freq, None, 30)


# ---- run statistics ----

def test_run_stats_by_hand():
    masks = np.array([
        [1, 1, 0, 1, 0, 0],  # runs {0,1}, {3}
        [0, 0, 0, 0, 0, 0],  # nothing needed
        [1, 1, 1, 1, 1, 1],  # one run of 6
        [0, 1, 0, 1, 0, 1],  # three runs of 1
    ], dtype=bool)
    s = P.run_stats(masks, P.original_order(6))
    assert (s["tokens"], s["needed"], s["runs"], s["max_run_length"]) == (4, 12, 6, 6)
    assert s["mean_run_length"] == pytest.approx(12 / 6)
    assert s["reads_per_token"] == pytest.approx(6 / 4)
    assert s["needed_per_token"] == pytest.approx(12 / 4)
    assert np.array_equal(s["run_length_hist"], [0, 4, 1, 0, 0, 0, 1])
    # the order [1, 3, 5, 0, 2, 4] makes the last token one run of 3
    s = P.run_stats(masks, np.array([1, 3, 5, 0, 2, 4]))
    # token 0: positions of {0,1,3} = {3,0,1} -> runs {0,1},{3}; token 2: one run of 6
    assert (s["needed"], s["runs"], s["max_run_length"]) == (12, 4, 6)
    assert np.array_equal(s["run_length_hist"], [0, 1, 1, 1, 0, 0, 1])


def test_run_stats_empty():
    s = P.run_stats(np.zeros((0, 5), dtype=bool), P.original_order(5))
    assert (s["tokens"], s["runs"], s["mean_run_length"], s["reads_per_token"]) == (0, 0, 0.0, 0.0)
    with pytest.raises(ValueError, match="permutation"):
        P.RunStats(np.array([0, 0, 1]))


def test_streaming_equals_one_shot(monkeypatch):
    rng = np.random.default_rng(9)
    masks = rng.random((257, 100)) < 0.2
    order = rng.permutation(100).astype(np.int32)
    whole = P.run_stats(masks, order)
    batches = P.run_stats((masks[i:i + 50] for i in range(0, 257, 50)), order)
    monkeypatch.setattr(P.RunStats, "_CHUNK_CELLS", 333)  # internal chunking, 3 rows a step
    chunked = P.run_stats(masks, order)
    for s in (batches, chunked):
        for key in ("tokens", "needed", "runs", "max_run_length", "mean_run_length"):
            assert s[key] == whole[key]
        assert np.array_equal(s["run_length_hist"], whole["run_length_hist"])
    # against a per-token count of runs
    pos = np.argsort(order)
    runs = sum(int((np.diff(np.sort(pos[np.flatnonzero(m)])) != 1).sum()) + 1 for m in masks if m.any())
    assert whole["runs"] == runs and whole["needed"] == int(masks.sum())


def test_ripple_order_lengthens_reads_on_held_out_tokens():
    model = TopicModel(1024, n_topics=48, group=24, seed=3)
    freq, co = counts(model.masks(3000, seed=4))  # calibration draw
    held_out = model.masks(2000, seed=5)  # evaluation draw: same topics, other tokens
    mean = {m: P.run_stats(held_out, P.placements(m, freq, co, 1024))["mean_run_length"] for m in P.METHODS}
    assert mean["ripple"] >= 3 * mean["original"]
    assert mean["ripple"] > mean["frequency"]
