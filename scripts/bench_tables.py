#!/usr/bin/env python3
"""Markdown tables of a `ripple-gguf bench --json` result, as docs/BENCHMARKS.md shows them.

    python scripts/bench_tables.py [docs/bench/bench.json]
"""
from __future__ import annotations

import json
import sys

KIB = 1024.0


def _n(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def systems(j: dict) -> list[str]:
    out = []
    seq = j["sequential_bandwidth_mb_s"]
    collapse = j["settings"]["collapse_bytes"]
    keys = sorted({(r["storage"], r["cache_fraction"]) for r in j["results"]},
                  key=lambda k: (list(seq).index(k[0]), k[1]))
    for st, f in keys:
        out += [f"**{st}, cache {f:g}** (sequential {seq[st]:,.0f} MB/s, collapse threshold "
                f"{collapse[st]:,} bytes)", "",
                "| system | I/O ms/token | e2e ms/token | reads/token | KiB read/token | KiB needed/token | eff. MB/s "
                "| limit ms/token | mean run | max run | hit rate | peak RSS MiB |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in j["results"]:
            if (r["storage"], r["cache_fraction"]) != (st, f):
                continue
            out.append(f"| {r['system']} | {_n(r['io_ms_per_token'])} | {_n(r['e2e_ms_per_token'])} | "
                       f"{_n(r['read_ops_per_token'], 1)} | {_n(r['bytes_read_per_token'] / KIB, 0)} | "
                       f"{_n(r['needed_bytes_per_token'] / KIB, 0)} | {_n(r['effective_bandwidth_mb_s'], 0)} | "
                       f"{_n(r['limit_io_ms_per_token'])} | {_n(r['mean_run_length'])} | {r['max_run_length']:.0f} | "
                       f"{r['cache_hit_rate']:.3f} | {r['peak_rss_mb']:.1f} |")
        out.append("")
    return out


def cross_dataset(j: dict) -> list[str]:
    out = ["| evaluation text | placement profiled on | mean run | reads/token | UFS 4.0 I/O ms/token |",
           "|---|---|---|---|---|"]
    for r in j["cross_dataset"]:
        out.append(f"| {r['eval_text']} | {r['placement'].removeprefix('calibration: ')} | "
                   f"{r['mean_run_length']:.2f} | {r['read_ops_per_token']:.1f} | {r['ufs40_io_ms_per_token']:.2f} |")
    return out + [""]


def goals(j: dict) -> list[str]:
    met = lambda ok: "met" if ok else "not met"
    out = ["| storage | cache | I/O vs llm-in-a-flash (goal >= 3.5x) | vs llama.cpp (goal >= 6x) | mean run (goal >= 6) "
           "| effective / sequential bandwidth (goal >= 60%) |", "|---|---|---|---|---|---|"]
    for g in j["goals"]:
        m = g["met"]
        out.append(f"| {g['storage']} | {g['cache_fraction']:g} | {g['io_vs_llm_in_a_flash']:.2f}x "
                   f"({met(m['vs_llm_in_a_flash'])}) | {g['io_vs_llama_cpp']:.2f}x ({met(m['vs_llama_cpp'])}) | "
                   f"{g['mean_run_length']:.2f} ({met(m['mean_run_length'])}) | {g['bandwidth_share']:.0%} "
                   f"({met(m['bandwidth_share'])}) |")
    return out + [""]


def model_validation(j: dict) -> list[str]:
    out = ["| system | cache | measured ms/token | modeled ms/token | error |", "|---|---|---|---|---|"]
    for r in j["model_validation"]:
        out.append(f"| {r['system']} | {r['cache_fraction']:g} | {r['measured_io_ms_per_token']:.2f} | "
                   f"{r['modeled_io_ms_per_token']:.2f} | {r['error']:+.0%} |")
    return out + [""]


def perplexity(j: dict) -> list[str]:
    out = ["| run | FFN MiB/token | perplexity |", "|---|---|---|"]
    for p in j["perplexity"]:
        out.append(f"| {p['name']} | {p['bytes_per_token'] / KIB / KIB:.2f} | {p['ppl']:.4f} |")
    return out + [""]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0] if argv else "docs/bench/bench.json") as f:
        j = json.load(f)
    print("\n".join(systems(j) + ["### cross-dataset", ""] + cross_dataset(j) + ["### goals", ""] + goals(j) +
                    ["### cost model", ""] + model_validation(j) +
                    ["### perplexity", ""] + perplexity(j)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
