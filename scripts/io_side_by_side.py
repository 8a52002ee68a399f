#!/usr/bin/env python3
"""Ripple vs the original bundle order with the same active sets, on real disk reads (O_DIRECT).

Acceptance measurement of the runtime issue: with the same active sets, ripple placement + access
collapse + linking-aware cache needs at least 3x fewer read ops per token than the original order
with the same cache, and its I/O time per token is at least 2.5x lower.

Steps (ripple_gguf.eval.variants, .replay): the variants (one offline stage; the same bundles and predictors in the
ripple, frequency and original orders; cached under the work directory); a decode trace (held-out
text token by token, n_batch=1, sparse mode on the ripple file: the neurons the predictors
selected); then, in interleaved rounds, the trace replayed on each system's file with O_DIRECT
through the backend's own store (run formation, collapse, cache, I/O engine). Medians over rounds.

    python scripts/io_side_by_side.py [--tokens 128] [--cache-fraction 0.1] [--rounds 3] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys

from ripple_gguf.eval import machine, replay, variants

BASELINE, OURS = "llm-in-a-flash", "ripple"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", help="source GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--work-dir", help="where the variants are cached (default ~/.cache/ripple-gguf/bench)")
    p.add_argument("--tokens", type=int, default=128, help="decoded held-out tokens (default 128)")
    p.add_argument("--cache-fraction", type=float, default=0.1, help="cache budget / FFN bytes (default 0.1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads for the trace (default 2)")
    p.add_argument("--json", metavar="OUT", help="write every figure as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the library's progress lines

    import ripple_gguf
    from ripple_gguf.eval import models
    from ripple_gguf.offline import quality
    from ripple_gguf.runtime import storage

    src = args.source or models.default_model_path()
    paths = variants.prepare_variants(src, args.work_dir or variants.default_work_dir())
    tokens = replay.text_tokens(paths["ripple"], quality.heldout_text(60 * args.tokens), args.tokens)
    machine.progress(f"recording the decode trace: {len(tokens)} held-out tokens, one at a time")
    trace = replay.record_decode_trace(paths["ripple"], tokens, n_threads=args.threads)

    systems = {"ripple": replay.SYSTEMS["ripple"], "llm-in-a-flash": replay.SYSTEMS["llm-in-a-flash"],
               **replay.ABLATIONS, "frequency": replay.SYSTEMS["frequency"]}
    jobs = {n: (lambda s=s: replay.replay_system(paths[s.variant], trace, s, args.cache_fraction, direct_io=True))
            for n, s in systems.items()}
    res = replay.interleaved(jobs, args.rounds)
    ripple_gguf.runtime.backend.reset_settings()

    cm = storage.model_for(paths["ripple"])
    print(f"\n{len(tokens)} held-out tokens decoded one at a time; cache {args.cache_fraction:g} of the FFN; "
          f"O_DIRECT, {ripple_gguf.settings()['io_threads']} I/O threads; disk model {cm.name}; "
          f"medians of {args.rounds} interleaved rounds")
    hdr = (f"{'system':<18} {'policy':<8} {'collapse':>9} {'reads/tok':>9} {'I/O ms/tok':>10} {'read KiB/tok':>12} "
           f"{'needed KiB/tok':>14} {'mean run':>8} {'max run':>7} {'hit rate':>8}")
    print(hdr)
    for n, s in systems.items():
        r = res[n]
        print(f"{n:<18} {s.cache_policy:<8} {int(r['collapse_bytes']) if s.collapse else 0:>9} "
              f"{r['read_ops_per_token']:>9.1f} {r['io_ms_per_token']:>10.2f} {r['bytes_read_per_token'] / 1024:>12.1f} "
              f"{r['needed_bytes_per_token'] / 1024:>14.1f} {r['mean_run_length']:>8.2f} {int(r['max_run_length']):>7} "
              f"{r['cache_hit_rate']:>8.3f}")
    ops = res[BASELINE]["read_ops_per_token"] / res[OURS]["read_ops_per_token"]
    io = res[BASELINE]["io_ms_per_token"] / res[OURS]["io_ms_per_token"]
    io_rounds = [a / b for a, b in zip(res[BASELINE]["io_ms_rounds"], res[OURS]["io_ms_rounds"])]
    print(f"\nread ops per token, {BASELINE} / {OURS}: {ops:.2f}x (goal >= 3x: {'PASS' if ops >= 3 else 'FAIL'})")
    print(f"I/O time per token, {BASELINE} / {OURS}: {io:.2f}x (goal >= 2.5x: {'PASS' if io >= 2.5 else 'FAIL'}); "
          f"per round: {', '.join(f'{x:.2f}' for x in io_rounds)} (median {statistics.median(io_rounds):.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine.machine(), "source": str(src), "files": {k: str(v) for k, v in paths.items()},
                       "tokens": len(tokens), "cache_fraction": args.cache_fraction, "rounds": args.rounds,
                       "cost_model": cm.to_dict(), "systems": {n: dataclasses_dict(s) for n, s in systems.items()},
                       "results": res, "read_ops_ratio": ops, "io_time_ratio": io, "io_time_ratio_rounds": io_rounds},
                      f, indent=2)
    return 0


def dataclasses_dict(s) -> dict:
    import dataclasses

    return dataclasses.asdict(s)


if __name__ == "__main__":
    sys.exit(main())
