#!/usr/bin/env python3
"""Offline-stage figures on held-out text for several active fractions, one conversion each.

For each fraction: stage times, placement quality of ripple / frequency / original order (mean and
max run length of the bundles the predictors select, reads per token) and predictor recall,
precision, over-prediction. Defaults otherwise (calibration: pydoc_data topics, 4096 tokens).

    python scripts/offline_report.py [SRC.gguf] [--fractions 0.2,0.3,0.5] [--workdir DIR] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from ripple_gguf.eval import models
from ripple_gguf.offline.convert import convert
from ripple_gguf.offline.pipeline import OfflineConfig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", nargs="?")
    ap.add_argument("--fractions", default="0.2,0.3,0.5")
    ap.add_argument("--workdir")
    ap.add_argument("--json")
    args = ap.parse_args()
    src = Path(args.src) if args.src else models.default_model_path()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ripple-offline-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'f':>5} {'secs':>6} {'ripple run':>10} {'freq run':>9} {'orig run':>9} {'ratio':>6} {'max run':>8} "
          f"{'reads/tok':>10} {'orig reads':>10} {'recall':>7} {'prec':>6} {'overpred':>8} {'pred frac':>9}")
    for f in [float(x) for x in args.fractions.split(",")]:
        times = {}
        t0 = time.perf_counter()
        rf = convert(src, work / f"f{f}.ripple.gguf", offline=OfflineConfig(active_fraction=f, quiet=True),
                     quiet=True, stage_seconds=times)
        total = time.perf_counter() - t0
        q, p = rf.placement_quality, rf.predictor_metrics
        row = {"active_fraction": f, "seconds": total, "stages": times,
               **{k: v for k, v in q.items() if not isinstance(v, (dict, list))},
               **{f"predictor_{k}": v for k, v in p.items() if not isinstance(v, (dict, list))}}
        rows.append(row)
        print(f"{f:>5.2f} {total:>6.1f} {q['mean_run_length']:>10.2f} {q['frequency_mean_run_length']:>9.2f} "
              f"{q['original_mean_run_length']:>9.2f} {q['mean_run_length'] / q['original_mean_run_length']:>6.2f} "
              f"{q['max_run_length']:>8} {q['reads_per_token']:>10.0f} {q['original_reads_per_token']:>10.0f} "
              f"{p['recall']:>7.3f} {p['precision']:>6.3f} {p['over_prediction']:>8.2f} {p['predicted_fraction']:>9.3f}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": src.name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
