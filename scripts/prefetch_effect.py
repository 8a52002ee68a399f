#!/usr/bin/env python3
"""Next-layer prefetch on or off, side by side: sparse decoding token by token with O_DIRECT reads
and a small neuron cache, rounds alternating the two settings on the same model instance.

Per setting: exposed I/O ms per token (``io_exposed_seconds``: reads the compute waited for), end-to-end
ms per token, bytes read per token, how much of the read-ahead the next layer used, and whether the
logits equal those of the run without prefetch (they must: prefetch changes where bytes come from,
not which).

    python scripts/prefetch_effect.py [RIPPLE.gguf] [--tokens 64] [--rounds 3] [--cache-fraction 0.1] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", nargs="?", help="ripple-packed GGUF with predictors (default: the quickstart's)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache-fraction", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the library's progress lines

    import llama_cpp
    import ripple_gguf
    from ripple_gguf.offline import quality
    from ripple_gguf.quickstart import ensure_default_ripple
    from ripple_gguf.runtime.pagecache import drop_pages

    path = args.file or str(ensure_default_ripple())
    ripple_gguf.configure(mode="sparse", direct_io=True)
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=1, n_ubatch=1, n_threads=args.threads,
                          logits_all=False, verbose=False)
    tokens = llm.tokenize(quality.heldout_text(4000).encode())[: args.tokens]
    rows = {False: [], True: []}
    logits = {}
    for _ in range(args.rounds):
        for pf in (False, True):
            ripple_gguf.configure(prefetch=pf, cache_fraction=args.cache_fraction)  # empties the cache
            drop_pages(path)
            llm.reset()
            ripple_gguf.reset_stats()
            t0 = time.perf_counter()
            llm.eval(tokens)
            wall = time.perf_counter() - t0
            s = ripple_gguf.stats()
            logits.setdefault(pf, np.array(llm.scores[llm.n_tokens - 1] if llm.scores.shape[0] > 1 else llm.scores[0]))
            n = s["tokens"]
            rows[pf].append({"e2e_ms": 1e3 * wall / n, "io_ms": 1e3 * s["io_exposed_seconds"] / n,
                             "read_kib": s["bytes_read"] / n / 1024, "ops": s["read_ops"] / n,
                             "prefetch_kib": s["prefetch_bytes"] / n / 1024,
                             "prefetch_used": s["prefetch_used_bytes"] / s["prefetch_bytes"] if s["prefetch_bytes"] else 0.0,
                             "prefetch_ms": 1e3 * s["prefetch_seconds"] / n})
    med = {pf: {k: statistics.median(r[k] for r in rows[pf]) for k in rows[pf][0]} for pf in rows}
    same = bool(np.array_equal(logits[False], logits[True]))
    print(f"{path}: {len(tokens)} tokens one at a time, O_DIRECT, cache fraction {args.cache_fraction}, "
          f"{args.rounds} rounds (medians)")
    print(f"{'prefetch':<9} {'e2e ms/tok':>10} {'exposed I/O':>11} {'read KiB/tok':>12} {'ops/tok':>8} "
          f"{'ahead KiB/tok':>13} {'ahead used':>10} {'ahead ms/tok':>12}")
    for pf in (False, True):
        m = med[pf]
        print(f"{'on' if pf else 'off':<9} {m['e2e_ms']:>10.2f} {m['io_ms']:>11.2f} {m['read_kib']:>12.1f} "
              f"{m['ops']:>8.1f} {m['prefetch_kib']:>13.1f} {m['prefetch_used']:>10.1%} {m['prefetch_ms']:>12.2f}")
    print(f"exposed I/O off/on: {med[False]['io_ms'] / max(med[True]['io_ms'], 1e-9):.2f}x; "
          f"end-to-end off/on: {med[False]['e2e_ms'] / med[True]['e2e_ms']:.2f}x; logits identical: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"file": path, "rounds": rows, "median": med, "logits_identical": same}, f, indent=2,
                      default=str)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
