#!/usr/bin/env python3
"""llama.cpp's own llama-bench, stock against the plugin loaded as a ggml backend module, side by
side in one run (rounds interleaved, so a machine's drift hits both alike).

    python scripts/llama_bench_side_by_side.py [--source SRC.gguf] [--ripple M.ripple.gguf]
           [--rounds 3] [-p 64] [-n 64] [-t 2] [--json OUT]

Stock runs the source GGUF without GGML_BACKEND_PATH; the plugin runs the ripple-packed file in
exact mode and in sparse mode (RIPPLE_MODE), default settings otherwise (64 MiB neuron cache, page
cache reads). Defaults: the real default model and its default conversion (the quickstart's, made once into
~/.cache/ripple-gguf). Prints prompt (pp) and generation (tg) tokens/s, median over rounds,
and each plugin mode's ratio to stock. Needs scripts/build_llama_server.sh's build.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path

from ripple_gguf.runtime import llama_tools


def _bench(exe: Path, model: Path, env: dict, p: int, n: int, t: int, reps: int) -> dict:
    cmd = [str(exe), "-m", str(model), "-p", str(p), "-n", str(n), "-t", str(t), "-r", str(reps), "-o", "json"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    out = {}
    for row in json.loads(r.stdout):
        kind = "pp" if row["n_prompt"] and not row["n_gen"] else "tg"
        out[kind] = row["avg_ts"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", help="source GGUF (default: the real default model)")
    ap.add_argument("--ripple", help="its ripple-packed file (default: the default conversion, cached)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-p", type=int, default=64, help="prompt tokens (default 64)")
    ap.add_argument("-n", type=int, default=64, help="generated tokens (default 64)")
    ap.add_argument("-t", type=int, default=2, help="threads (default 2)")
    ap.add_argument("-r", type=int, default=3, help="llama-bench repetitions per round (default 3)")
    ap.add_argument("--build-dir", help="llama.cpp build (default: the build script's)")
    ap.add_argument("--json", help="write the figures as JSON")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the library's progress lines

    from ripple_gguf import quickstart
    from ripple_gguf.eval import models

    src = Path(a.source) if a.source else models.default_model_path()
    if a.ripple:
        rip = Path(a.ripple)
    elif a.source:
        raise SystemExit("--source needs --ripple (its ripple-packed file)")
    else:  # the quickstart's default conversion (made once, about a minute)
        rip = quickstart.ensure_default_ripple()
    exe = llama_tools.binary("llama-bench", a.build_dir)
    if not exe.exists():
        raise SystemExit(f"{exe} is not built: run scripts/build_llama_server.sh")
    stock_env = {k: v for k, v in os.environ.items() if k != "GGML_BACKEND_PATH" and not k.startswith("RIPPLE_")}
    plugin_env = llama_tools.environment(stock_env)
    cases = {"stock": (src, stock_env), "exact": (rip, dict(plugin_env, RIPPLE_MODE="exact")),
             "sparse": (rip, dict(plugin_env, RIPPLE_MODE="sparse"))}
    runs = {k: [] for k in cases}
    for i in range(a.rounds):
        for name, (model, env) in cases.items():
            runs[name].append(_bench(exe, model, env, a.p, a.n, a.t, a.r))
            print(f"round {i + 1} {name}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in runs[name][-1].items()),
                  file=sys.stderr)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("pp", "tg")} for name, rs in runs.items()}
    print(f"llama-bench -p {a.p} -n {a.n} -t {a.t}, median of {a.rounds} rounds x {a.r} repetitions")
    print(f"{'case':<8}{'pp tok/s':>10}{'tg tok/s':>10}{'pp vs stock':>13}{'tg vs stock':>13}")
    for name, m in med.items():
        print(f"{name:<8}{m['pp']:>10.1f}{m['tg']:>10.1f}{m['pp'] / med['stock']['pp']:>12.2f}x"
              f"{m['tg'] / med['stock']['tg']:>12.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"median": med, "runs": runs, "source": str(src), "ripple": str(rip),
                                            "args": vars(a)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
