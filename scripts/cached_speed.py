#!/usr/bin/env python3
"""Decode and prompt speed with the whole FFN in the neuron cache: stock llama.cpp on the source
file and the plugin on its ripple-packed copy (exact and sparse mode), in one process, interleaved
rounds, medians. Stock never sees the plugin: the backend only takes ripple-packed files.

    python scripts/cached_speed.py [SRC.gguf RIPPLE.gguf] [--tokens 80] [--prompt 128] [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", help="source GGUF and its ripple-packed copy (default: the quickstart's)")
    ap.add_argument("--tokens", type=int, default=80, help="tokens decoded one at a time")
    ap.add_argument("--prompt", type=int, default=128, help="tokens of the prompt batch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import ripple_gguf
    import llama_cpp
    from ripple_gguf.offline import quality

    if args.files:
        src, packed = args.files
    else:
        from ripple_gguf.eval import models
        from ripple_gguf.quickstart import ensure_default_ripple
        src, packed = str(models.default_model_path()), str(ensure_default_ripple(quiet=True))
    ripple_gguf.configure(cache_fraction=1.0)
    toks = quality.tokenize(src, quality.heldout_text(), args.prompt + args.tokens)
    systems = {"stock": (src, None), "exact": (packed, "exact"), "sparse": (packed, "sparse")}
    llms = {}
    for name, (path, mode) in systems.items():
        if mode:
            ripple_gguf.configure(mode=mode)
        llms[name] = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=args.threads,
                                     n_threads_batch=args.threads, verbose=False)
    results = {k: {"decode": [], "prompt": []} for k in systems}
    for r in range(args.rounds + 1):  # round 0 warms the caches and is not counted
        for name, (path, mode) in systems.items():
            if mode:
                ripple_gguf.configure(mode=mode)
            llm = llms[name]
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(toks[: args.prompt])
            t1 = time.perf_counter()
            for t in toks[args.prompt:]:
                llm.eval([t])
            t2 = time.perf_counter()
            if r:
                results[name]["prompt"].append(args.prompt / (t1 - t0))
                results[name]["decode"].append(args.tokens / (t2 - t1))
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in results.items()}
    print(f"whole FFN cached, {args.threads} threads, medians of {args.rounds} interleaved rounds")
    print(f"{'system':8} {'decode tok/s':>13} {'vs stock':>9} {'prompt tok/s':>13} {'vs stock':>9}")
    for k, v in med.items():
        print(f"{k:8} {v['decode']:13.1f} {v['decode'] / med['stock']['decode']:9.2f} "
              f"{v['prompt']:13.1f} {v['prompt'] / med['stock']['prompt']:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
