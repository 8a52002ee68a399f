#!/usr/bin/env python3
"""Perplexity cost of the bundles' down-column type, with the runtime summing the columns.

One conversion per --down-type (no profiling), every neuron computed with exact_down="bundles",
perplexity over held-out tokens in chunks of 512, next to stock llama.cpp on the source.

    python scripts/down_columns.py [--tokens 2048] [--types same,q8_0,f16,f32] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

import ripple_gguf
from ripple_gguf import models, quality
from ripple_gguf.convert import convert


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--types", default="same,q8_0,f16,f32")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    src = models.default_model_path()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ripple-down-"))
    work.mkdir(parents=True, exist_ok=True)
    toks = quality.tokenize(src, quality.heldout_text(60000), args.tokens)
    chunks = [toks[i:i + 512] for i in range(0, len(toks), 512)]

    def ppl(path, stock=False) -> float:
        nll = []
        for c in chunks:
            lg = quality.run(path, tokens=c, stock=stock, n_ctx=512)["logits"].astype(np.float64)[:-1]
            lg -= lg.max(-1, keepdims=True)
            lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
            nll.extend(-lp[np.arange(len(c) - 1), c[1:]])
        return float(np.exp(np.mean(nll)))

    base = ppl(src, stock=True)
    print(f"stock {src.name}: perplexity {base:.3f} over {len(toks)} held-out tokens")
    ripple_gguf.configure(exact_down="bundles")
    for t in args.types.split(","):
        dst = work / f"down-{t}.ripple.gguf"
        convert(src, dst, down_type=t, quiet=True)
        p = ppl(dst)
        print(f"--down-type {t:5s}: {dst.stat().st_size:,} bytes, perplexity {p:.3f} ({p / base - 1:+.2%})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
