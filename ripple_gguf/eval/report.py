"""The tables of a ``ripple-gguf bench`` result as text."""
from __future__ import annotations

from typing import Mapping

from .bench import STORAGES


def report(result: Mapping[str, object]) -> str:
    """The tables of a :func:`run` result as text (what ``ripple-gguf bench`` prints)."""
    lines = []
    m, st = result["model"], result["settings"]
    lines.append(f"{m['name']}: {m['n_layers']} layers x {m['n_ff']} bundles of {m['bundle_bytes']} bytes; "
                 f"{st['tokens']} tokens of {st['text']} decoded one at a time; medians of {st['rounds']} rounds")
    seq = result["sequential_bandwidth_mb_s"]
    hdr = (f"{'system':<15} {'I/O ms':>8} {'e2e ms':>8} {'reads':>8} {'read KiB':>9} {'need KiB':>9} "
           f"{'eff MB/s':>8} {'limit ms':>8} {'mean run':>8} {'max run':>7} {'hit rate':>8} {'RSS MiB':>8}")
    for storage in STORAGES:
        for f in st["cache_fractions"]:
            rows = [r for r in result["results"] if r["storage"] == storage and r["cache_fraction"] == f]
            if not rows:
                continue
            lines.append("")
            lines.append(f"{storage}, cache {f:g} of the FFN (sequential {seq[storage]:.0f} MB/s, collapse "
                         f"threshold {st['collapse_bytes'][storage]:,} bytes), per token:")
            lines.append(hdr)
            for r in rows:
                lines.append(f"{r['system']:<15} {r['io_ms_per_token']:>8.2f} {r['e2e_ms_per_token']:>8.2f} "
                             f"{r['read_ops_per_token']:>8.1f} {r['bytes_read_per_token'] / 1024:>9.1f} "
                             f"{r['needed_bytes_per_token'] / 1024:>9.1f} {r['effective_bandwidth_mb_s']:>8.0f} "
                             f"{r['limit_io_ms_per_token']:>8.2f} {r['mean_run_length']:>8.2f} "
                             f"{r['max_run_length']:>7.0f} {r['cache_hit_rate']:>8.3f} {r['peak_rss_mb']:>8.1f}")
    lines.append("")
    lines.append("cost model vs measured local I/O (replays with O_DIRECT):")
    for v in result["model_validation"]:
        lines.append(f"  {v['system']:<15} cache {v['cache_fraction']:g}: measured {v['measured_io_ms_per_token']:.2f} ms, "
                     f"modeled {v['modeled_io_ms_per_token']:.2f} ms ({v['error']:+.0%})")
    lines.append("perplexity vs FFN bytes per token:")
    for p in result["perplexity"]:
        lines.append(f"  {p['name']:<26} {p['bytes_per_token'] / 2**20:8.2f} MiB/token  ppl {p['ppl']:.4f}")
    if result["cross_dataset"]:
        lines.append("placement across texts (ripple settings, UFS 4.0 model, same active sets per evaluation text):")
        for c in result["cross_dataset"]:
            lines.append(f"  eval {c['eval_text'][:44]:<44} {c['placement'][:58]:<58} mean run {c['mean_run_length']:6.2f} "
                         f"reads {c['read_ops_per_token']:7.1f} I/O {c['ufs40_io_ms_per_token']:6.2f} ms")
    lines.append("goals (ripple): I/O vs llm-in-a-flash >= 3.5x, vs llama.cpp >= 6x, mean run >= 6, "
                 "effective bandwidth >= 60% of sequential:")
    for g in result["goals"]:
        ok = lambda k: "met" if g["met"][k] else "not met"
        lines.append(f"  {g['storage']:<10} cache {g['cache_fraction']:g}: {g['io_vs_llm_in_a_flash']:.2f}x ({ok('vs_llm_in_a_flash')}), "
                     f"{g['io_vs_llama_cpp']:.2f}x ({ok('vs_llama_cpp')}), mean run {g['mean_run_length']:.2f} "
                     f"({ok('mean_run_length')}), bandwidth {g['bandwidth_share']:.0%} ({ok('bandwidth_share')})")
    lines.append(f"elapsed {result['elapsed_s']:.0f} s")
    return "\n".join(lines)
