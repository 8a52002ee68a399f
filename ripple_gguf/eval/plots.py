"""Figures of ``ripple-gguf bench`` and ``ripple-gguf membench`` results (the JSON they write),
drawn with matplotlib.

Needs only the JSON, numpy and matplotlib (``pip install ".[bench]"``); also runs as a script on a
bench result: ``python ripple_gguf/eval/plots.py RESULT.json OUT.png``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Mapping

SYSTEM_ORDER = ("llama.cpp", "llm-in-a-flash", "frequency", "ripple")
STORAGE_ORDER = ("local-disk", "ufs4.0", "ufs3.1")
COLORS = {"llama.cpp": "#8c8c8c", "llm-in-a-flash": "#4c72b0", "frequency": "#dd8452", "ripple": "#55a868"}


def plot(result: dict, out: str) -> str:
    """Four panels: I/O ms per token per system and storage; read lengths (bundles) per system;
    effective bandwidth against the device's sequential bandwidth; perplexity against the bytes a
    token needs. Returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result["results"]
    fractions = sorted({r["cache_fraction"] for r in rows})
    frac = max(fractions)
    storages = [s for s in STORAGE_ORDER if any(r["storage"] == s for r in rows)]
    systems = [s for s in SYSTEM_ORDER if any(r["system"] == s for r in rows)]
    get = {(r["system"], r["storage"], r["cache_fraction"]): r for r in rows}

    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    model = result.get("model", {}).get("name", "")
    fig.suptitle(f"ripple-gguf bench: {model}, {result.get('settings', {}).get('tokens', '?')} decoded tokens, "
                 f"cache {frac:g} of the FFN", fontsize=12)

    # (a) I/O ms per token, grouped by storage, log scale
    ax = axes[0, 0]
    w = 0.8 / max(1, len(systems))
    for i, s in enumerate(systems):
        vals = [get.get((s, st, frac), {}).get("io_ms_per_token", np.nan) for st in storages]
        xs = np.arange(len(storages)) + (i - (len(systems) - 1) / 2) * w
        ax.bar(xs, vals, w, label=s, color=COLORS.get(s))
        for x, v in zip(xs, vals):
            if np.isfinite(v):
                ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(storages)), storages)
    ax.set_yscale("log")
    ax.set_ylabel("I/O ms per token (log)")
    ax.set_title("I/O latency per token")
    ax.legend(fontsize=8)

    # (b) distribution of read lengths on the local disk, in bundles
    ax = axes[0, 1]
    hists = result.get("read_lengths", {})
    for s in systems:
        h = hists.get(s)
        if not h:
            continue
        edges, counts = np.asarray(h["edges"], float), np.asarray(h["counts"], float)
        share = counts / counts.sum() if counts.sum() else counts
        ax.step(edges[:-1], share, where="post", label=f"{s} (mean {h['mean']:.1f})", color=COLORS.get(s))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("read request length (bundles, log2 bins)")
    ax.set_ylabel("share of read requests")
    ax.set_title(f"Read lengths (local disk, cache {frac:g})")
    ax.legend(fontsize=8)

    # (c) effective bandwidth vs the device's sequential bandwidth
    ax = axes[1, 0]
    for i, s in enumerate(systems):
        vals = [get.get((s, st, frac), {}).get("effective_bandwidth_mb_s", np.nan) for st in storages]
        xs = np.arange(len(storages)) + (i - (len(systems) - 1) / 2) * w
        ax.bar(xs, vals, w, label=s, color=COLORS.get(s))
    seq = result.get("sequential_bandwidth_mb_s", {})
    for j, st in enumerate(storages):
        if st in seq:
            ax.hlines(seq[st], j - 0.45, j + 0.45, colors="k", linestyles="--", linewidth=1)
            ax.text(j, seq[st], f"sequential {seq[st]:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(storages)), storages)
    ax.set_ylabel("needed MB per second of I/O")
    ax.set_title("Effective bandwidth vs the physical limit")
    ax.legend(fontsize=8)

    # (d) perplexity vs bytes a token needs
    ax = axes[1, 1]
    for i, p in enumerate(result.get("perplexity", [])):
        ax.scatter(p["bytes_per_token"] / 2**20, p["ppl"], s=40)
        ax.annotate(f"{p['name']}: ppl {p['ppl']:.3f}", (p["bytes_per_token"] / 2**20, p["ppl"]), fontsize=8,
                    textcoords="offset points", xytext=(-60, 10 + 14 * i))
    ax.set_xlabel("FFN MiB needed per token")
    ax.set_ylabel("perplexity (held-out text)")
    ax.set_title("Quality vs bytes per token")
    ax.margins(0.25)

    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_membench(result: Mapping[str, object], out: os.PathLike) -> Path:
    """A ``ripple-gguf membench`` result: decode tokens/s of each system against the memory limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    runs = dict.fromkeys((r["system"], r.get("cache_policy")) for r in result["results"])
    for system, policy in runs:
        rows = [r for r in result["results"] if r["system"] == system and r.get("cache_policy") == policy
                and r["memory_fraction"] is not None and r.get("decode_tok_s")]
        label = system if policy is None or len({p for s, p in runs if s == system}) == 1 else f"{system} ({policy})"
        ax.plot([r["memory_fraction"] for r in rows], [r["decode_tok_s"] for r in rows], marker="o", label=label)
    ax.set_xlabel("memory limit / stock's unconfined peak")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.set_title(Path(result["model"]["source"]).name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # the package's modules must not shadow the stdlib's
    with open(sys.argv[1]) as f:
        print(plot(json.load(f), sys.argv[2]))
