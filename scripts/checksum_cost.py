#!/usr/bin/env python3
"""What checking every read against the checksum table costs: decode speed with the checks on and
off (the RIPPLE_VERIFY_READS diagnostic switch), everything cached (``cache_fraction=1.0``), exact
and sparse mode, on one model instance, in interleaved rounds (the order alternates from round to
round) so a busy machine slows both settings alike.

With everything cached the bundles come from the neuron cache (checked once, when read); what is
left is exact mode's read of every layer's standard ffn_down rows per token (checked per 64 KiB)
and the bookkeeping of each fetch.

    python scripts/checksum_cost.py [RIPPLE.gguf] [--tokens 48] [--rounds 9] [--threads 2] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", nargs="?", help="ripple-packed GGUF with predictors (default: the quickstart's)")
    ap.add_argument("--tokens", type=int, default=48, help="tokens decoded one at a time per measurement")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()

    import llama_cpp
    import ripple_gguf
    from ripple_gguf import _native, quality
    from ripple_gguf.quickstart import ensure_default_ripple

    path = args.file or str(ensure_default_ripple())
    ripple_gguf.configure(cache_fraction=1.0)
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=1, n_ubatch=1, n_threads=args.threads, verbose=False)
    toks = quality.tokenize(path, quality.heldout_text(), args.tokens)

    def decode() -> float:
        llm.reset()
        t0 = time.perf_counter()
        for t in toks:
            llm.eval([t])
        return time.perf_counter() - t0

    configs = [(m, v) for m in ("exact", "sparse") for v in (1, 0)]
    for mode, _ in configs[::2]:  # warm-up: fills the neuron cache and the page cache
        ripple_gguf.configure(mode=mode)
        decode()
    times = {c: [] for c in configs}
    try:
        for r in range(args.rounds):
            for mode, verify in configs if r % 2 == 0 else configs[::-1]:
                ripple_gguf.configure(mode=mode)
                _native.lib.ripple_set_verify_reads(verify)
                times[(mode, verify)].append(decode())
    finally:
        _native.lib.ripple_set_verify_reads(1)
    llm.close()

    out = {"file": path, "tokens": len(toks), "rounds": args.rounds, "threads": args.threads, "modes": {}}
    print(f"{path}: {len(toks)} tokens decoded one at a time, {args.rounds} interleaved rounds, "
          f"{args.threads} threads, cache_fraction 1.0")
    print(f"{'mode':<8}{'checks on tok/s':>17}{'checks off tok/s':>18}{'time ratio on/off':>19}{'paired ratio':>14}")
    for mode in ("exact", "sparse"):
        on, off = times[(mode, 1)], times[(mode, 0)]
        ratio = statistics.median(on) / statistics.median(off)
        paired = statistics.median(a / b for a, b in zip(on, off))
        out["modes"][mode] = {"tokens_per_s_checks_on": len(toks) / statistics.median(on),
                              "tokens_per_s_checks_off": len(toks) / statistics.median(off),
                              "time_ratio": ratio, "paired_time_ratio": paired,
                              "seconds_on": on, "seconds_off": off}
        print(f"{mode:<8}{len(toks) / statistics.median(on):>17.1f}{len(toks) / statistics.median(off):>18.1f}"
              f"{ratio:>19.3f}{paired:>14.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
