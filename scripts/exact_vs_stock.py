#!/usr/bin/env python3
"""Exact mode of the RIPPLE backend against stock llama.cpp on the real model, side by side.

Prints, for SmolLM2-135M-Instruct:
- the F16 variant (made locally from the Q4_1 file): max |logit difference| / logit range over
  256 held-out tokens, and whether 64 greedy tokens are identical;
- the original Q4_1 file: top-1 agreement over 256 held-out tokens and both perplexities;
- generation speed (tokens/s) of stock and plugin in the same run.
Stock results come from a fresh interpreter that never imports ripple_gguf.

    python scripts/exact_vs_stock.py [--tokens 257] [--workdir DIR] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import ripple_gguf
from ripple_gguf.eval import models
from ripple_gguf.offline import quality
from ripple_gguf.offline.convert import convert

PROMPT = "The capital of France is"

_SPEED = r"""
import sys, time
if sys.argv[2] == "plugin":
    import ripple_gguf
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, verbose=False)
toks = llm.tokenize(sys.argv[3].encode())
llm.eval(toks)
t = time.perf_counter()
n = int(sys.argv[4])
for i in range(n):
    llm.eval([llm.sample(temp=0)])
print(n / (time.perf_counter() - t))
"""


def speed(path, plugin: bool, n: int = 64) -> float:
    r = subprocess.run([sys.executable, "-c", _SPEED, os.fspath(path), "plugin" if plugin else "stock", PROMPT, str(n)],
                       capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=257, help="held-out tokens evaluated (default 257)")
    ap.add_argument("--workdir", help="where variants are written (default: a temporary directory)")
    ap.add_argument("--json", help="write the results as JSON")
    ap.add_argument("--down-columns", default="same,q8_0,f32",
                    help="also measure exact_down='bundles' (the down columns) for these --down-type values "
                         "(comma-separated, '' for none; default same,q8_0,f32)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ripple-exact-"))
    work.mkdir(parents=True, exist_ok=True)
    src = models.default_model_path()
    toks = quality.tokenize(src, quality.heldout_text(), args.tokens)
    prompt = quality.tokenize(src, PROMPT)
    out = {"model": src.name, "tokens": len(toks)}

    f16 = work / "smol-f16.gguf"
    if not f16.exists():
        models.make_float_variant(src, f16)
    f16r = work / "smol-f16.ripple.gguf"
    convert(f16, f16r, quiet=True)
    st = quality.run(f16r, tokens=toks, prompt_tokens=prompt, n_greedy=64, stock=True)
    pl = quality.run(f16r, tokens=toks, prompt_tokens=prompt, n_greedy=64)
    rng = float(st["logits"].max() - st["logits"].min())
    out["f16"] = {
        "max_abs_logit_diff_over_range": float(np.abs(pl["logits"] - st["logits"]).max()) / rng,
        "greedy_identical": int((pl["greedy"] == st["greedy"]).all()),
        "greedy_tokens": int(len(st["greedy"])),
    }

    q = work / "smol.ripple.gguf"
    convert(src, q, quiet=True)
    st = quality.run(src, tokens=toks, stock=True)["logits"]
    ripple_gguf.reset_stats()
    pl = quality.run(q, tokens=toks)["logits"]
    s = ripple_gguf.stats()
    out["q4_1"] = {
        "top1_agreement": quality.top1_agreement(pl[:-1], st[:-1]),
        "ppl_stock": quality.perplexity(st, toks),
        "ppl_plugin": quality.perplexity(pl, toks),
        "ffn_matmuls": s["ffn_matmuls"],
        "neurons_computed_fraction": s["neurons_computed"] / max(1, s["neurons_total"]),
    }
    out["speed_tokens_per_s"] = {"stock": speed(src, False), "plugin": speed(q, True)}

    out["down_columns"] = {}
    ripple_gguf.configure(exact_down="bundles")
    for dt in filter(None, args.down_columns.split(",")):
        p = work / f"smol-down-{dt}.ripple.gguf"
        convert(src, p, down_type=dt, quiet=True)
        pl = quality.run(p, tokens=toks)["logits"]
        out["down_columns"][dt] = {"file_bytes": p.stat().st_size, "top1_agreement": quality.top1_agreement(pl[:-1], st[:-1]),
                                   "ppl_plugin": quality.perplexity(pl, toks)}
    ripple_gguf.configure(exact_down="tensor")

    f, qq, sp = out["f16"], out["q4_1"], out["speed_tokens_per_s"]
    print(f"model {src.name}, {len(toks)} held-out tokens (pydoc_data topics)")
    print(f"F16 variant : max |logit diff| / range = {f['max_abs_logit_diff_over_range']:.2e}; "
          f"{f['greedy_tokens']} greedy tokens identical: {bool(f['greedy_identical'])}")
    print(f"Q4_1 source : top-1 agreement {qq['top1_agreement']:.4f}; perplexity stock {qq['ppl_stock']:.4f}, "
          f"plugin {qq['ppl_plugin']:.4f} ({qq['ppl_plugin'] / qq['ppl_stock'] - 1:+.3%})")
    print(f"speed       : stock {sp['stock']:.1f} tokens/s, plugin {sp['plugin']:.1f} tokens/s "
          f"(plugin/stock {sp['plugin'] / sp['stock']:.2f})")
    for dt, r in out["down_columns"].items():
        print(f"down columns --down-type {dt:5s}: {r['file_bytes']:,} bytes; top-1 agreement {r['top1_agreement']:.4f}; "
              f"perplexity {r['ppl_plugin']:.4f} (exact_down='bundles')")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
