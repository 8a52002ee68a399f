#!/usr/bin/env python3
"""Offline cost and read quality of the placement methods on synthetic structured activations.

For each layer width n: draw calibration masks from a topic model (ripple_gguf.eval.synthetic.TopicModel),
count co-activations (n x n uint32; ~822 MB at n = 14,336), time ``ripple_order`` (single-threaded
C) and report the peak RSS of the process, then the run statistics of every method on a held-out
draw of the same topics. Sparse topic counts leave most pairs at 0, which the sort skips, so
--dense also times the worst case: every pair i < j has a random count in [1, tokens] (only the
upper triangle is read, so the matrix is not symmetrised). Nothing is asserted: the figures are
printed (and saved with --json).

    python scripts/bench_placement.py [--n 1536 14336] [--tokens 3000] [--dense] [--json OUT]
    taskset -c 0 python scripts/bench_placement.py      # one core for everything
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from ripple_gguf.eval.synthetic import TopicModel, counts
from ripple_gguf.offline import placement as P


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(n: int, tokens: int, seed: int) -> dict:
    # topics sized like a ReLU FFN's active set: ~5% of the neurons per token
    group = max(8, n // 200)
    model = TopicModel(n, n_topics=64, group=group, seed=seed)
    t0 = time.perf_counter()
    freq, co = counts(model.masks(tokens, seed=seed + 1))
    t_counts = time.perf_counter() - t0
    rss_before = peak_rss_mib()
    t0 = time.perf_counter()
    order = P.ripple_order(co)
    t_ripple = time.perf_counter() - t0
    rss_after = peak_rss_mib()
    nonzero_pairs = int(np.count_nonzero(np.triu(co, 1))) if n <= 4096 else None
    del co
    held_out = model.masks(min(tokens, 2000), seed=seed + 2)
    quality = {}
    for method in P.METHODS:
        o = order if method == "ripple" else P.placements(method, freq, None, n)
        s = P.run_stats(held_out, o)
        s.pop("run_length_hist")
        quality[method] = s
    return {"n": n, "tokens": tokens, "counts_seconds": t_counts, "ripple_seconds": t_ripple,
            "peak_rss_mib_before_ripple": rss_before, "peak_rss_mib_after_ripple": rss_after,
            "matrix_mib": n * n * 4 / 2**20, "nonzero_pairs": nonzero_pairs, "quality": quality}


def bench_dense(n: int, tokens: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    co = np.empty((n, n), dtype=np.uint32)
    for lo in range(0, n, 1024):  # in slabs: no int64 temporary of the whole matrix
        co[lo:lo + 1024] = rng.integers(1, tokens + 1, size=(min(1024, n - lo), n), dtype=np.uint32)
    rss_before = peak_rss_mib()
    t0 = time.perf_counter()
    order = P.ripple_order(co)
    t_ripple = time.perf_counter() - t0
    P.check_order(order, n)
    return {"n": n, "tokens": tokens, "ripple_seconds": t_ripple, "peak_rss_mib_before_ripple": rss_before,
            "peak_rss_mib_after_ripple": peak_rss_mib(), "matrix_mib": n * n * 4 / 2**20,
            "nonzero_pairs": n * (n - 1) // 2}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1536, 14336], help="layer widths (n_ff)")
    ap.add_argument("--tokens", type=int, default=3000, help="calibration tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense", action="store_true", help="worst case: random counts on every pair")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    results = []
    for n in args.n:
        if args.dense:
            r = bench_dense(n, args.tokens, args.seed)
            results.append(r)
            print(f"n = {n}, dense: ripple_order {r['ripple_seconds']:.2f} s; peak RSS "
                  f"{r['peak_rss_mib_before_ripple']:.0f} -> {r['peak_rss_mib_after_ripple']:.0f} MiB "
                  f"(matrix {r['matrix_mib']:.0f} MiB, {r['nonzero_pairs']:,} pairs)")
            continue
        r = bench(n, args.tokens, args.seed)
        results.append(r)
        print(f"n = {n}: ripple_order {r['ripple_seconds']:.2f} s (counts {r['counts_seconds']:.1f} s); "
              f"peak RSS {r['peak_rss_mib_before_ripple']:.0f} -> {r['peak_rss_mib_after_ripple']:.0f} MiB "
              f"(matrix {r['matrix_mib']:.0f} MiB)")
        for method, s in r["quality"].items():
            print(f"  {method:>9}: mean run {s['mean_run_length']:.2f}, max run {s['max_run_length']}, "
                  f"reads/token {s['reads_per_token']:.1f}, needed/token {s['needed_per_token']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
