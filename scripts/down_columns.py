#!/usr/bin/env python3
"""Perplexity cost of the bundles' down-column type, with the runtime summing the columns.

One conversion per --down-type (no profiling), every neuron computed with exact_down="bundles",
perplexity over held-out tokens in chunks of 512, next to stock llama.cpp on the source; and
per conversion the bundle bytes per neuron against the source's FFN bytes per neuron.

    python scripts/down_columns.py [--tokens 2048] [--types same,q8_0,f16,f32] [--workdir DIR]
    python scripts/down_columns.py --requantize Q4_K_M --types split,q8_0   # the default model
                                                                             # re-quantized by llama.cpp
    python scripts/down_columns.py --requantize Q4_K_M --types split,q8_0 --profiled

With --profiled the source is profiled once (the converter's defaults) and every conversion packs
those predictors; sparse mode is measured too: its perplexity and the bundle bytes a token needs
when decoded one at a time (--decode-tokens), against the dense FFN bytes (what stock reads).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

import ripple_gguf
from ripple_gguf.eval import models
from ripple_gguf.format.layout import type_name
from ripple_gguf.offline import quality
from ripple_gguf.offline.convert import convert


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--types", default="same,q8_0,f16,f32")
    ap.add_argument("--source", help="GGUF model (default: the default model)")
    ap.add_argument("--requantize", metavar="FTYPE",
                    help="first re-quantize the source with llama.cpp to this file type (e.g. Q4_K_M, Q6_K)")
    ap.add_argument("--profiled", action="store_true", help="profile the source and measure sparse mode too")
    ap.add_argument("--decode-tokens", type=int, default=256, help="with --profiled: tokens decoded one at a time")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    src = Path(args.source) if args.source else models.default_model_path()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ripple-down-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.requantize:
        dst = work / f"{src.stem}.{args.requantize.upper()}.gguf"
        if not dst.exists():
            models.make_quantized_variant(src, dst, args.requantize)
        src = dst
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

    offline = None
    if args.profiled:
        from ripple_gguf.offline.pipeline import OfflineConfig, run as run_offline

        offline = run_offline(src, OfflineConfig(quiet=True)).for_placement("ripple")
    base = ppl(src, stock=True)
    print(f"stock {src.name}: {src.stat().st_size:,} bytes, perplexity {base:.3f} over {len(toks)} held-out tokens")
    ripple_gguf.configure(exact_down="bundles")
    for t in args.types.split(","):
        dst = work / f"{src.stem}.down-{t}.ripple.gguf"
        rf = convert(src, dst, down_type=t, offline=offline, quiet=True)
        ripple_gguf.configure(mode="exact")
        p = ppl(dst)
        n = sum(l.n_ff for l in rf.layers)
        bundles = sum(l.n_ff * l.bundle_size for l in rf.layers)
        source = sum(sum(l.tensor_bytes) for l in rf.layers)
        tables = sum(l.down_table_size for l in rf.layers)
        kinds = Counter(f"{type_name(l.down_src_type)}->{'split' if l.split else type_name(l.down_type)}"
                        for l in rf.layers)
        print(f"--down-type {t:5s}: {dst.stat().st_size:,} bytes, perplexity {p:.3f} ({p / base - 1:+.2%}); "
              f"bundle bytes per neuron {bundles / n:.1f} vs source {source / n:.1f} ({bundles / source:.1%}); "
              f"scale tables {tables:,} bytes; down {dict(kinds)}", flush=True)
        if offline is not None:
            ripple_gguf.configure(mode="sparse", sparse_down="bundles")
            sp = ppl(dst)
            r = quality.mode_perplexity(dst, toks, "sparse", decode_tokens=args.decode_tokens)
            d = r["decode_stats"]
            print(f"    sparse mode: perplexity {sp:.3f} ({sp / base - 1:+.2%}); decoding {r['decode_tokens']} tokens "
                  f"one at a time the needed bundles are {d['needed_bytes'] / d['dense_bytes']:.1%} of the dense FFN "
                  f"bytes, neurons computed {d['neurons_computed'] / d['neurons_total']:.1%}", flush=True)
            ripple_gguf.configure(mode="exact", sparse_down="auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
