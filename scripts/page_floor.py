#!/usr/bin/env python3
"""What sparse mode can save: the needed bundles of held-out tokens decoded one at a time (sparse
mode) against the 4 KiB pages that hold them and against the bytes the runtime reads for them with
no neuron cache (O_DIRECT, the collapse threshold of the disk holding the file), as fractions of
the dense FFN (``quality.page_fraction``, what the converter's self-check measures). A read moves
whole pages, so when most pages hold a needed bundle the reads cannot fall below that figure.

    python scripts/page_floor.py [RIPPLE.gguf] [--tokens 64] [--page 4096]
"""
from __future__ import annotations

import argparse


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", nargs="?", help="ripple-packed GGUF (default: the quickstart's)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--page", type=int, default=4096)
    args = ap.parse_args()

    from ripple_gguf.offline import quality

    path = args.file
    if path is None:
        from ripple_gguf.quickstart import ensure_default_ripple

        path = str(ensure_default_ripple(quiet=True))
    toks = quality.heldout_tokens(path, args.tokens)
    r = quality.page_fraction(path, toks, page=args.page)
    print(f"{r['tokens']} tokens, bundles of {r['bundle_size']} bytes: needed {r['needed']:.1%} of the dense FFN's "
          f"bytes; the {args.page}-byte pages holding them {r['pages']:.1%}; read with no cache (O_DIRECT, collapse "
          f"threshold {r['collapse_bytes']:,} bytes) {r['read']:.1%} in {r['requests']:.0f} requests per token (the "
          f"converter's self-check makes exact the default mode when either is above {quality.PAGE_LIMIT:.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
