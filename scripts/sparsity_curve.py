#!/usr/bin/env python3
"""Perplexity against the active fraction, with the true activations (a perfect predictor).

For each target fraction f, the per-layer thresholds are calibrated exactly as the converter does
(the quantile of the activity score on the first calibration tokens); then stock llama.cpp runs
the held-out text with every neuron below its threshold dropped and the perplexity is measured.
Rules: "magnitude" (|h|, the down matmul's input) and "gate" (|act(gate)|, CATS). Gated FFNs.

    python scripts/sparsity_curve.py [SRC.gguf] [--fractions 0.05,0.1,...] [--tokens 2048] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ripple_gguf.eval import models
from ripple_gguf.format import constants as C
from ripple_gguf.format.reader import read_gguf_header
from ripple_gguf.offline import quality
from ripple_gguf.offline.pipeline import OfflineConfig
from ripple_gguf.offline.profile import ActivationCapture, calibration_text_default, tokenize_chunks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", nargs="?", help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--fractions", default="0.05,0.1,0.15,0.2,0.25,0.3,0.4,0.5,0.7")
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens (chunks of 512)")
    ap.add_argument("--rules", default="magnitude,gate", help="activity rules to measure")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    args = ap.parse_args()
    src = Path(args.src) if args.src else models.default_model_path()
    arch = read_gguf_header(src).get("general.architecture", "")
    act_name = C.ARCH_GLU_ACTIVATION.get(arch)
    if act_name is None:
        print(f"{src}: architecture {arch!r} has no known gate activation", file=sys.stderr)
        return 2
    cfg = OfflineConfig()
    head = tokenize_chunks(src, [calibration_text_default()], cfg.threshold_tokens, cfg.chunk_tokens)
    act = {"silu": lambda g: g / (1.0 + np.exp(-g)),  # ggml's gelu is the tanh approximation
           "gelu": lambda g: 0.5 * g * (1.0 + np.tanh(0.7978845608028654 * (g + 0.044715 * g ** 3))),
           }[act_name]
    scores = {"gate": {}, "magnitude": {}}
    with ActivationCapture(src, chunk_tokens=cfg.chunk_tokens, n_threads=args.threads) as cap:
        for toks in head:
            c = cap.run(toks)
            for b in c.g:
                scores["gate"].setdefault(b, []).append(np.abs(act(c.g[b])))
                scores["magnitude"].setdefault(b, []).append(np.abs(c.h[b]))
    scores = {r: {b: np.concatenate(v) for b, v in d.items()} for r, d in scores.items()}
    evals = tokenize_chunks(src, [("held-out", quality.heldout_text(60 * args.tokens))], args.tokens, 512)
    dense, _ = quality.oracle_perplexity(src, evals, {}, "gate", act_name, n_threads=args.threads)
    rows = [{"rule": "dense", "active_fraction": 1.0, "dropped": 0.0, "ppl": dense, "ppl_increase": 0.0}]
    print(f"{src.name}: held-out {len(evals) * 512} tokens; dense perplexity {dense:.4f}")
    print(f"{'rule':>9} {'target f':>8} {'dropped':>8} {'ppl':>10} {'vs dense':>10}")
    for rule in args.rules.split(","):
        for f in [float(x) for x in args.fractions.split(",")]:
            thr = {b: float(np.quantile(s, 1.0 - f)) for b, s in scores[rule].items()}
            ppl, dropped = quality.oracle_perplexity(src, evals, thr, rule, act_name, n_threads=args.threads)
            rows.append({"rule": rule, "active_fraction": f, "dropped": dropped, "ppl": ppl,
                         "ppl_increase": ppl / dense - 1})
            print(f"{rule:>9} {f:>8.2f} {dropped:>8.3f} {ppl:>10.4f} {ppl / dense - 1:>+10.2%}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": src.name, "tokens": len(evals) * 512, "curve": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
