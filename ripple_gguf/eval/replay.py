"""The systems the Ripple paper compares, run inside this runtime with the same active sets:

- :func:`record_decode_trace`: decode a text token by token (``n_batch=1``) in sparse mode on one
  variant and record which neurons the predictors selected per token and layer (placement-free);
- :func:`replay_system`: re-perform exactly those reads on a variant under a system's settings
  (collapse, cache policy, cache fraction, O_DIRECT) through the backend's store, and turn the
  counters into per-token figures (:func:`per_token`);
- :func:`interleaved`: rounds of every system one after another (the machine is shared: a system
  is never measured in a block of its own), medians per system.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..runtime import backend as runtime, trace as tr
from .machine import progress


@dataclasses.dataclass(frozen=True)
class System:
    """How one system reads: the bundle order of its file and the runtime settings."""

    variant: str  # placement of the file it reads (PLACEMENTS)
    collapse: bool  # access collapse at the storage cost model's threshold
    cache_policy: str  # lru | s3fifo | linking
    description: str = ""


# The systems of the comparison (the paper's baselines run inside the same runtime, same cache budget).
SYSTEMS: Dict[str, System] = {
    "llm-in-a-flash": System("original", False, "s3fifo",
                             "bundles in the original order, no collapse, S3-FIFO cache (LLM in a flash)"),
    "frequency": System("frequency", True, "linking", "bundles by activation frequency, otherwise like ripple"),
    "ripple": System("ripple", True, "linking", "co-activation placement, access collapse, linking-aware cache"),
}
# Rows shown for transparency: which part of the gain each ingredient brings on the original order.
ABLATIONS: Dict[str, System] = {
    "original+linking": System("original", False, "linking", "original order, linking-aware cache, no collapse"),
    "original+collapse": System("original", True, "s3fifo", "original order, access collapse, S3-FIFO cache"),
}


# ---- the decode trace ----

def text_tokens(model: os.PathLike, text: str, n: int) -> List[int]:
    from ..offline.quality import tokenize  # not at the top: the decode child imports this module

    return tokenize(model, text, n)


def record_decode_trace(path: os.PathLike, tokens: Sequence[int], *, n_threads: int = 2):
    """Decode ``tokens`` one at a time (``n_batch=1``) in sparse mode on the ripple file ``path``;
    returns the activity trace of that model (the neurons selected for each token and layer)."""
    import llama_cpp

    before = runtime.settings()["mode"]
    runtime.configure(mode="sparse")
    llm = llama_cpp.Llama(model_path=os.fspath(path), n_ctx=len(tokens) + 8, n_batch=1, n_ubatch=1,
                          n_threads=n_threads, verbose=False)
    try:
        handle = runtime.last_load()["handle"]
        tr.start(max_mb=64)
        try:
            llm.eval(list(tokens))
        finally:
            t = tr.stop()
    finally:
        llm.close()
        runtime.configure(mode=before)
    return tr.Trace(r for r in t if r.handle == handle)


# ---- replay under a system's settings ----

def per_token(st: Mapping[str, float]) -> Dict[str, float]:
    """The backend's counters of one replay or run as per-token figures."""
    n = max(1, int(st["tokens"]))
    io = float(st["io_seconds"])
    return {
        "tokens": n,
        "io_ms_per_token": io * 1e3 / n,
        "read_ops_per_token": st["read_ops"] / n,
        "bytes_read_per_token": st["bytes_read"] / n,
        "needed_bytes_per_token": st["needed_bytes"] / n,
        # bytes of the needed bundles per second of I/O (speculative bytes do not count)
        "effective_bandwidth_mb_s": st["needed_bytes"] / io / 1e6 if io > 0 else 0.0,
        "mean_run_length": float(st["mean_run_length"]),
        "max_run_length": int(st["max_run_length"]),
        "cache_hit_rate": float(st["cache_hit_rate"]),
        "collapse_extra_bytes_per_token": st["collapse_extra_bytes"] / n,
    }


def apply_system(system: System, cache_fraction: float, *, collapse_bytes: Optional[int] = None,
                 direct_io: bool = True) -> None:
    """Runtime settings of ``system``; ``collapse_bytes`` overrides the threshold (else the cost
    model of the disk holding the file decides it)."""
    collapse = (collapse_bytes if collapse_bytes is not None else True) if system.collapse else False
    runtime.configure(mode="sparse", cache_fraction=cache_fraction, cache_policy=system.cache_policy,
                      collapse=collapse, direct_io=direct_io)


def replay_system(path: os.PathLike, trace, system: System, cache_fraction: float, *,
                  collapse_bytes: Optional[int] = None, direct_io: bool = True, log: bool = False,
                  drop_page_cache: bool = True) -> Dict[str, object]:
    """Replay ``trace`` on ``path`` with ``system``'s settings: per-token figures (and "iolog")."""
    apply_system(system, cache_fraction, collapse_bytes=collapse_bytes, direct_io=direct_io)
    st = tr.replay(path, trace, log=log, drop_page_cache=drop_page_cache)
    out: Dict[str, object] = per_token(st)
    out["collapse_bytes"] = runtime.settings()["collapse_bytes"]
    if log:
        out["iolog"] = st["iolog"]
    return out


def median_of(rows: Sequence[Mapping[str, object]]) -> Dict[str, object]:
    """Per-key median of numeric figures over rounds (lists and logs are taken from the first)."""
    out: Dict[str, object] = {}
    for k, v in rows[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(np.median([r[k] for r in rows]))
        else:
            out[k] = v
    out["rounds"] = len(rows)
    return out


def interleaved(jobs: Mapping[str, Callable[[], Mapping[str, object]]], rounds: int, *,
                quiet: bool = False, label: str = "") -> Dict[str, Dict[str, object]]:
    """Run every job once per round, the order rotated each round; the median of each figure per
    job (plus the per-round values of ``io_ms_per_token`` under "io_ms_rounds")."""
    names = list(jobs)
    got: Dict[str, List[Mapping[str, object]]] = {n: [] for n in names}
    total, done = rounds * len(names), 0
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            got[n].append(jobs[n]())
            done += 1
            progress(f"{label}round {r + 1}/{rounds}: {n} ({time.perf_counter() - t0:.1f} s) [{done}/{total}]", quiet)
    out = {}
    for n in names:
        out[n] = median_of(got[n])
        if "io_ms_per_token" in got[n][0]:
            out[n]["io_ms_rounds"] = [float(x["io_ms_per_token"]) for x in got[n]]
    return out
