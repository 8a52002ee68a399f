#!/usr/bin/env python3
"""A ripple file's predictors measured on any text: recall and top-2% recall per layer.

The converter stores these figures for the held-out pydoc text (``ripple.predictor.metrics``).
This script measures them on another text, e.g. Debian's fortunes: the source model runs on stock
llama.cpp with its activations captured (as in the offline stage: chunks of 256 tokens), each
layer's predictor of the file selects neurons from the captured FFN input, and the selection is
compared with the truly active neurons (the file's activity rule) and with each token's top 2% by
|h| (``ripple_gguf.offline.quality.top_recall``). With ``--text heldout`` and 1024 tokens it reproduces the
stored figures.

    python scripts/predictor_text_recall.py FILE.ripple.gguf [SRC.gguf] [--text fortunes] [--tokens 1024] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ripple_gguf.eval import corpora, models
from ripple_gguf.format.reader import RippleFile
from ripple_gguf.offline import quality
from ripple_gguf.offline.pipeline import OfflineConfig, activity_score
from ripple_gguf.offline.predictor import metrics, read_predictor
from ripple_gguf.offline.profile import ActivationCapture, tokenize_chunks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", help="ripple-packed GGUF with predictors")
    ap.add_argument("src", nargs="?", help="its source GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--text", default="fortunes", help="heldout, fortunes (default) or a UTF-8 text file")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens measured (default 1024, as the converter)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="write the figures as JSON")
    args = ap.parse_args()

    rf = RippleFile.open(args.file)
    src = Path(args.src) if args.src else models.default_model_path()
    if not rf.has_predictors:
        print(f"{args.file}: no predictors", file=sys.stderr)
        return 2
    sp = rf.sparsity
    layers = {l.block: l for l in rf.layers}
    preds = {b: read_predictor(rf, l) for b, l in layers.items()}
    thr = dict(zip(layers, sp["thresholds"]))
    chunk = OfflineConfig().chunk_tokens
    name, text = corpora.load_text(args.text, 40 * args.tokens)  # the converter's 40 characters per token
    chunks = tokenize_chunks(src, [(name, text)], args.tokens, chunk)
    sel = {b: [] for b in layers}
    act = {b: [] for b in layers}
    top = {b: [] for b in layers}
    with ActivationCapture(src, chunk_tokens=chunk, n_threads=args.threads) as cap:
        for toks in chunks:
            c = cap.run(toks)
            for b in layers:
                sel[b].append(preds[b].predict(c.x[b]))
                act[b].append(activity_score(sp["rule"], c.h[b]) > thr[b])
                top[b].append(quality.top_indices(np.abs(c.h[b])))
    per = {"recall": [], "over_prediction": [], "predicted_fraction": [], "top2_recall": []}
    for b in layers:
        s = np.concatenate(sel[b])
        m = metrics(s, np.concatenate(act[b]))
        for k in ("recall", "over_prediction", "predicted_fraction"):
            per[k].append(float(m[k]))
        per["top2_recall"].append(quality.index_recall(s, np.concatenate(top[b])))
    n = sum(len(c) for c in chunks)
    out = {"file": str(args.file), "source": str(src), "text": name, "tokens": n, "per_layer": per,
           **{k: float(np.mean(v)) for k, v in per.items()}, "min_top2_recall": min(per["top2_recall"]),
           "min_top2_block": list(layers)[int(np.argmin(per["top2_recall"]))]}
    print(f"{Path(args.file).name} on {n} tokens of {name}: recall {out['recall']:.3f} (mean over layers), "
          f"over-prediction {out['over_prediction']:.2f}x, predicted fraction {out['predicted_fraction']:.3f}; "
          f"top-2% recall mean {out['top2_recall']:.3f}, min {out['min_top2_recall']:.3f} "
          f"(block {out['min_top2_block']})")
    print(f"{'block':>5} {'recall':>6} {'top2':>6}")
    for i, b in enumerate(layers):
        print(f"{b:>5} {per['recall'][i]:>6.3f} {per['top2_recall'][i]:>6.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
