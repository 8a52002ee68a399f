#!/usr/bin/env python3
"""Anonymous memory (RssAnon) of one process at each stage: import llama_cpp, import ripple_gguf,
load, a 128-token prompt, 32 tokens decoded one at a time; stock llama.cpp on the source file or
the plugin (exact or sparse mode, O_DIRECT, cache off) on its ripple-packed copy. What membench's
limits charge besides file pages.

    python scripts/process_memory.py stock|exact|sparse [SRC.gguf RIPPLE.gguf]
"""
from __future__ import annotations

import re
import sys


def anon_mib() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"RssAnon:\s+(\d+)", f.read()).group(1)) / 1024


def main() -> int:
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    if which not in ("stock", "exact", "sparse"):
        print(__doc__, file=sys.stderr)
        return 2
    marks = [("start", anon_mib())]
    import llama_cpp

    marks.append(("llama_cpp", anon_mib()))
    import ripple_gguf
    from ripple_gguf.eval import models
    from ripple_gguf.offline import quality

    if which != "stock":
        ripple_gguf.configure(mode=which, direct_io=True, cache_mb=0)
    marks.append(("ripple_gguf", anon_mib()))
    if len(sys.argv) > 3:
        src, packed = sys.argv[2], sys.argv[3]
    else:
        from ripple_gguf.quickstart import ensure_default_ripple

        src, packed = str(models.default_model_path()), str(ensure_default_ripple(quiet=True))
    toks = quality.tokenize(src, quality.heldout_text(), 160)
    marks.append(("tokenized", anon_mib()))
    llm = llama_cpp.Llama(model_path=src if which == "stock" else packed, n_ctx=168, n_batch=128, n_threads=2,
                          logits_all=False, verbose=False)
    marks.append(("load", anon_mib()))
    llm.eval(toks[:128])
    marks.append(("prompt", anon_mib()))
    for t in toks[128:160]:
        llm.eval([t])
    marks.append(("decode", anon_mib()))
    steps = ", ".join(f"{name} +{b - a:.1f}" for (_, a), (name, b) in zip(marks, marks[1:]))
    print(f"{which}: RssAnon {marks[-1][1]:.1f} MiB ({steps} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
