#!/usr/bin/env python3
"""What checking every read against the checksum table costs: decode speed with the checks on and
off (the RIPPLE_VERIFY_READS diagnostic switch), everything cached (``cache_fraction=1.0``), exact
and sparse mode, on one model instance, in interleaved rounds (the order alternates from round to
round) so a busy machine slows both settings alike.

With everything cached the bundles come from the neuron cache (checked once, when read); what is
left is exact mode's read of every layer's standard ffn_down rows per token, checked per 64 KiB
when first read and again only after the file changed (size, mtime or ctime), so "read/token" is
what an unconditional check would cost.
Per setting: wall time (median and minimum over the rounds) and the process's CPU time (all
threads; llama.cpp's idle threads sleep, OMP_WAIT_POLICY=PASSIVE, so CPU time is work done and
hardly moved by other processes), plus the bytes checked per token and the CRC32C throughput of
this machine, i.e. the cost the checks should have.

    python scripts/checksum_cost.py [RIPPLE.gguf] [--tokens 32] [--rounds 15] [--threads 2] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", nargs="?", help="ripple-packed GGUF with predictors (default: the quickstart's)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded one at a time per measurement")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the library's progress lines

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before llama_cpp loads libgomp
    import llama_cpp
    import numpy as np
    import ripple_gguf
    from ripple_gguf import binding
    from ripple_gguf.offline import quality
    from ripple_gguf.quickstart import ensure_default_ripple

    path = args.file or str(ensure_default_ripple())
    ripple_gguf.configure(cache_fraction=1.0)
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=1, n_ubatch=1, n_threads=args.threads, verbose=False)
    toks = quality.tokenize(path, quality.heldout_text(), args.tokens)

    def decode() -> tuple[float, float]:
        llm.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        for t in toks:
            llm.eval([t])
        return time.perf_counter() - t0, time.process_time() - c0

    configs = [(m, v) for m in ("exact", "sparse") for v in (1, 0)]
    checked = {}
    for mode, _ in configs[::2]:  # warm-up: fills the neuron cache and the page cache
        ripple_gguf.configure(mode=mode)
        decode()
        ripple_gguf.reset_stats()
        decode()  # what a cached token reads (and checks)
        checked[mode] = ripple_gguf.stats()["bytes_read"] / len(toks)
    buf = np.random.default_rng(0).integers(0, 256, 16 << 20, dtype=np.uint8)
    t0 = time.perf_counter()
    for _ in range(20):
        binding.crc32c_blocks(buf, 64 << 10)
    crc_bps = 20 * buf.nbytes / (time.perf_counter() - t0)
    times = {c: [] for c in configs}
    try:
        for r in range(args.rounds):
            for mode, verify in configs if r % 2 == 0 else configs[::-1]:
                ripple_gguf.configure(mode=mode)
                binding.set_verify_reads(verify)
                times[(mode, verify)].append(decode())
    finally:
        binding.set_verify_reads(True)
    llm.close()

    n = len(toks)
    out = {"file": path, "tokens": n, "rounds": args.rounds, "threads": args.threads,
           "crc32c_bytes_per_s": crc_bps, "modes": {}}
    print(f"{path}: {n} tokens decoded one at a time, {args.rounds} interleaved rounds, {args.threads} threads, "
          f"cache_fraction 1.0; CRC32C {crc_bps / 1e9:.1f} GB/s")
    print(f"{'mode':<7}{'read/token':>14}{'expected':>10}{'ms/token on':>19}{'ms/token off':>19}"
          f"{'ratio median':>13}{'ratio min':>10}{'CPU ratio':>10}")
    for mode in ("exact", "sparse"):
        on, off = times[(mode, 1)], times[(mode, 0)]
        wall_on, wall_off = [w for w, _ in on], [w for w, _ in off]
        cpu_on, cpu_off = [c for _, c in on], [c for _, c in off]
        row = {"checked_bytes_per_token": checked[mode],
               "expected_check_ms_per_token": checked[mode] / crc_bps * 1e3,
               "ms_per_token_on": {"median": statistics.median(wall_on) / n * 1e3, "min": min(wall_on) / n * 1e3},
               "ms_per_token_off": {"median": statistics.median(wall_off) / n * 1e3, "min": min(wall_off) / n * 1e3},
               "ratio_median": statistics.median(wall_on) / statistics.median(wall_off),
               "ratio_min": min(wall_on) / min(wall_off),
               "cpu_ratio": statistics.median(cpu_on) / statistics.median(cpu_off),
               "seconds_on": on, "seconds_off": off}
        out["modes"][mode] = row
        print(f"{mode:<7}{checked[mode] / 1e6:>11.2f} MB{row['expected_check_ms_per_token']:>7.2f} ms"
              f"{row['ms_per_token_on']['median']:>10.1f} (min {row['ms_per_token_on']['min']:.1f})"
              f"{row['ms_per_token_off']['median']:>10.1f} (min {row['ms_per_token_off']['min']:.1f})"
              f"{row['ratio_median']:>13.3f}{row['ratio_min']:>10.3f}{row['cpu_ratio']:>10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
