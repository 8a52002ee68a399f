#!/usr/bin/env python3
"""What sparse mode can save on a page-granular read: the needed bundles of held-out tokens decoded
one at a time (sparse mode, no cache) against the 4 KiB pages that hold them, both per token and
as a fraction of the dense FFN. A read with O_DIRECT (or through the page cache) moves whole 4 KiB
pages, so when most pages hold at least one needed bundle the reads cannot fall below that figure
whatever the collapse threshold.

    python scripts/page_floor.py [RIPPLE.gguf] [--tokens 64] [--page 4096]
"""
from __future__ import annotations

import argparse

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", nargs="?", help="ripple-packed GGUF (default: the quickstart's)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--page", type=int, default=4096)
    args = ap.parse_args()

    import llama_cpp
    import ripple_gguf
    from ripple_gguf.format.reader import RippleFile
    from ripple_gguf.offline import quality
    from ripple_gguf.runtime import trace

    path = args.file
    if path is None:
        from ripple_gguf.quickstart import ensure_default_ripple

        path = str(ensure_default_ripple(quiet=True))
    rf = RippleFile.open(path)
    ripple_gguf.configure(mode="sparse", cache_mb=0)
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=1, n_ubatch=1, n_threads=2, verbose=False)
    toks = llm.tokenize(quality.heldout_text(4000).encode())[: args.tokens]
    trace.start()
    llm.eval(toks)
    tr = trace.stop()
    need = pages = dense = 0
    position = {}
    for r in tr:
        L = rf.layers[r.layer]
        if r.layer not in position:
            order = np.asarray(L.order)
            position[r.layer] = np.empty_like(order)
            position[r.layer][order] = np.arange(len(order))
        start = np.sort(position[r.layer][r.neurons]).astype(np.int64) * L.bundle_size  # layers start page-aligned
        touched = np.unique(np.concatenate([start // args.page, (start + L.bundle_size - 1) // args.page]))
        need += len(start) * L.bundle_size
        pages += len(touched) * args.page
        dense += L.n_ff * L.bundle_size
    n = tr.tokens
    print(f"{n} tokens, bundles of {rf.layers[0].bundle_size} bytes: needed {need / n / 1e6:.2f} MB per token "
          f"({need / dense:.1%} of dense); the {args.page}-byte pages holding them {pages / n / 1e6:.2f} MB "
          f"({pages / dense:.1%}); dense {dense / n / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
