#!/usr/bin/env python3
"""Sparse-mode perplexity of a file with sketch predictors when every token keeps a fixed fraction
of its neurons (the highest scores) instead of the calibrated per-layer thresholds: the comparison
that chose thresholds (docs/BENCHMARKS.md, "Sketch predictors"). Uses the library's diagnostic
``ripple_set_sketch_topk``.

    python scripts/sketch_topk.py FILE.ripple.gguf FRACTION [FRACTION ...] [--tokens 2048]
"""
from __future__ import annotations

import argparse
import sys

import ripple_gguf
from ripple_gguf import binding
from ripple_gguf.offline import quality


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("fractions", type=float, nargs="+")
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens (default 2048, windows of 512)")
    a = ap.parse_args(argv)
    toks = quality.heldout_tokens(a.file, a.tokens)
    exact = quality.mode_perplexity(a.file, toks, "exact", chunk=512)["ppl"]
    thr = quality.mode_perplexity(a.file, toks, "sparse", chunk=512)
    kept = thr["stats"]["neurons_computed"] / thr["stats"]["neurons_total"]
    print(f"exact {exact:.4f}; thresholds: {thr['ppl']:.4f} ({thr['ppl'] / exact - 1:+.2%}), {kept:.1%} of the neurons")
    try:
        for f in a.fractions:
            binding.set_sketch_topk(f)
            r = quality.mode_perplexity(a.file, toks, "sparse", chunk=512)
            kept = r["stats"]["neurons_computed"] / r["stats"]["neurons_total"]
            print(f"top-k {f:.2f}: {r['ppl']:.4f} ({r['ppl'] / exact - 1:+.2%}), {kept:.1%} of the neurons")
    finally:
        binding.set_sketch_topk(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
