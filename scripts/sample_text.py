#!/usr/bin/env python3
"""Greedy text from the same ripple-packed file in exact and in sparse mode, side by side.

    python scripts/sample_text.py [FILE] [--prompt TEXT] [--tokens 96]

FILE defaults to the default model packed by the converter's defaults (`ripple-gguf quickstart`
makes it). Chat template of the model, temperature 0; prints the mode's text and the sparse run's
stats (neurons computed, needed bytes against the dense FFN).
"""
from __future__ import annotations

import argparse
import logging
import sys

import ripple_gguf
from ripple_gguf.quickstart import ensure_default_ripple


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", nargs="?")
    ap.add_argument("--prompt", default="Explain in a few sentences why the sky is blue.")
    ap.add_argument("--tokens", type=int, default=96)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the library's progress lines
    import llama_cpp

    path = args.file or str(ensure_default_ripple())
    for mode in ("exact", "sparse"):
        ripple_gguf.configure(mode=mode)
        ripple_gguf.reset_stats()
        llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)
        out = llm.create_chat_completion([{"role": "user", "content": args.prompt}], max_tokens=args.tokens,
                                         temperature=0.0)
        llm.close()
        s = ripple_gguf.stats()
        print(f"--- {mode} mode: neurons computed {s['neurons_computed'] / max(1, s['neurons_total']):.1%}, "
              f"needed bytes {s['needed_bytes'] / max(1, s['dense_bytes']):.1%} of the dense FFN")
        print(out["choices"][0]["message"]["content"].strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
