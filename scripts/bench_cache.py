"""Neuron cache policies (lru, s3fifo, linking) replayed on a synthetic activation trace.

The trace imitates a ripple-packed FFN: neurons that fire together sit in contiguous clusters
(placement), cluster popularity is Zipf-like and clusters stay active for a few tokens in a row
(correlated runs), and Zipf-popular isolated neurons are scattered over the layer. Per token and
layer the replay does what the flash store does: look every active bundle up, read the missing ones
as runs of consecutive positions, offer each to the cache with the length of its run.

Prints the hit rate, read requests and bundles read per token at cache budgets of 5% and 10% of the
FFN bundles. Usage: python scripts/bench_cache.py [--tokens 1500] [--layers 4] [--n-ff 2048]
"""
from __future__ import annotations

import argparse

import numpy as np

from ripple_gguf import _native
from ripple_gguf.binding import CACHE_POLICIES

POLICIES = {p: CACHE_POLICIES[p] for p in ("lru", "s3fifo", "linking")}
BUNDLE = 16  # bytes: the content does not matter here


def zipf_weights(n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** alpha
    return rng.permutation(w / w.sum())


def make_trace(args, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """trace[token][layer] = sorted active positions"""
    layers = []
    for _ in range(args.layers):
        lengths = rng.geometric(1 / args.cluster_len, size=args.n_ff)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        starts = starts[starts < args.n_ff]
        bounds = np.append(starts, args.n_ff)
        layers.append((bounds, zipf_weights(len(starts), args.alpha, rng), zipf_weights(args.n_ff, args.alpha, rng)))
    active = [set() for _ in range(args.layers)]
    trace = []
    for _ in range(args.tokens):
        row = []
        for l, (bounds, cluster_w, neuron_w) in enumerate(layers):
            keep = {c for c in active[l] if rng.random() < args.persist}
            while len(keep) < args.clusters:
                keep.add(int(rng.choice(len(cluster_w), p=cluster_w)))
            active[l] = keep
            pos = [np.arange(bounds[c], bounds[c + 1]) for c in keep]
            pos = np.concatenate(pos)
            pos = pos[rng.random(len(pos)) < args.density]
            singles = rng.choice(args.n_ff, size=args.singles, p=neuron_w)
            row.append(np.unique(np.concatenate([pos, singles])))
        trace.append(row)
    return trace


def replay(trace, n_ff: int, n_layers: int, slots: int, policy: int) -> tuple[float, float, float]:
    ffi, lib = _native.cache_test_library()
    h = lib.ripple_cache_test_new(n_layers, ffi.new("int32_t[]", [n_ff] * n_layers), BUNDLE, slots * BUNDLE, policy)
    hits = needed = reads = bundles = 0
    try:
        for row in trace:
            for layer, positions in enumerate(row):
                missing = []
                for p in positions.tolist():
                    r = lib.ripple_cache_test_get(h, layer, p)
                    if r < 0:
                        raise RuntimeError(f"cache returned wrong bytes for ({layer}, {p})")
                    if r:
                        hits += 1
                    else:
                        missing.append(p)
                needed += len(positions)
                i = 0
                while i < len(missing):  # runs of consecutive missing positions: one read each
                    j = i + 1
                    while j < len(missing) and missing[j] == missing[j - 1] + 1:
                        j += 1
                    for p in missing[i:j]:
                        lib.ripple_cache_test_put(h, layer, p, j - i)
                    reads += 1
                    bundles += j - i
                    i = j
    finally:
        lib.ripple_cache_test_free(h)
    return hits / max(needed, 1), reads / len(trace), bundles / len(trace)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--n-ff", type=int, default=2048)
    ap.add_argument("--cluster-len", type=float, default=24, help="mean length of a co-activation cluster")
    ap.add_argument("--clusters", type=int, default=6, help="active clusters per token and layer")
    ap.add_argument("--persist", type=float, default=0.6, help="chance a cluster stays active at the next token")
    ap.add_argument("--density", type=float, default=0.85, help="share of an active cluster's neurons that fire")
    ap.add_argument("--singles", type=int, default=40, help="isolated Zipf-popular neurons per token and layer")
    ap.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of cluster and neuron popularity")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    trace = make_trace(args, np.random.default_rng(args.seed))
    total = args.layers * args.n_ff
    active = np.mean([sum(len(p) for p in row) for row in trace])
    print(f"{args.tokens} tokens, {args.layers} layers x {args.n_ff} bundles, {active:.0f} active bundles per token")
    print(f"{'budget':>7} {'policy':>8} {'hit rate':>9} {'reads/token':>12} {'bundles read/token':>19}")
    for frac in (0.05, 0.10):
        slots = int(total * frac)
        for name, policy in POLICIES.items():
            hit, reads, bundles = replay(trace, args.n_ff, args.layers, slots, policy)
            print(f"{frac:>7.0%} {name:>8} {hit:>9.3f} {reads:>12.1f} {bundles:>19.1f}")


if __name__ == "__main__":
    main()
