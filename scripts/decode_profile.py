#!/usr/bin/env python3
"""Where a decoded token's time goes: end-to-end ms per token and the backend's I/O, FFN compute
and predictor time, for held-out tokens evaluated one at a time on the default ripple file.

    python scripts/decode_profile.py exact|sparse [RIPPLE.gguf] [--tokens 48] [--threads 2] [--collapse BYTES]

Settings come from the RIPPLE_* variables as usual (e.g. RIPPLE_DIRECT_IO=1 RIPPLE_CACHE_FRACTION=0.1);
--collapse fixes the collapse gap in bytes (``configure(collapse=N)``).
"""
from __future__ import annotations

import argparse
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["exact", "sparse"])
    ap.add_argument("file", nargs="?", help="ripple-packed GGUF (default: the quickstart's)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--collapse", type=int, help="collapse gap in bytes (default: the disk's cost model)")
    args = ap.parse_args()

    import ripple_gguf
    import llama_cpp
    from ripple_gguf.offline import quality
    from ripple_gguf.quickstart import ensure_default_ripple

    path = args.file or str(ensure_default_ripple(quiet=True))
    ripple_gguf.configure(mode=args.mode, **({"collapse": args.collapse} if args.collapse is not None else {}))
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=1, n_ubatch=1, n_threads=args.threads, verbose=False)
    toks = llm.tokenize(quality.heldout_text(4000).encode())[: args.tokens]
    llm.eval(toks[:8])  # warm the cache and the threads
    llm.reset()
    ripple_gguf.reset_stats()
    t0 = time.perf_counter()
    llm.eval(toks)
    wall = time.perf_counter() - t0
    s = ripple_gguf.stats()
    n = s["tokens"]
    print(f"{args.mode}: e2e {1e3 * wall / n:.1f} ms/token; backend I/O {1e3 * s['io_seconds'] / n:.2f}, FFN compute "
          f"{1e3 * s['compute_seconds'] / n:.2f}, predictors {1e3 * s['predictor_seconds'] / n:.2f} ms/token; "
          f"cache hit rate {s['cache_hit_rate']:.3f}; read {s['bytes_read'] / n / 1e6:.2f} MB in "
          f"{s['read_ops'] / n:.0f} requests per token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
