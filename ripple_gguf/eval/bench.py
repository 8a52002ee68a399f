"""``ripple-gguf bench``: llama.cpp, LLM in a flash, frequency order and ripple side by side, on
every storage (the local disk measured; UFS 4.0 and UFS 3.1 through their cost models) and every
cache fraction, with the same active sets (:mod:`ripple_gguf.eval.replay`), plus perplexity and
placement robustness across texts. docs/BENCHMARKS.md documents every field of the result."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..format.reader import RippleFile
from ..offline.pipeline import OfflineConfig
from ..offline.quality import heldout_text, perplexity, perplexity_of_file, run as run_llama
from ..runtime import backend as runtime, storage
from ..runtime.trace import modeled_io_seconds
from .corpora import stdlib_docstrings
from .machine import machine, progress
from .processes import decode_system, stock_offload
from .replay import SYSTEMS, interleaved, record_decode_trace, replay_system, text_tokens
from .variants import default_work_dir, prepare_variants

STORAGES = ("local-disk", "ufs4.0", "ufs3.1")
LLAMA_CPP = "llama.cpp"
# Read-around window assumed for llama.cpp's mmap page faults on phone flash (Linux's default
# read_ahead_kb); the faults of a thread are synchronous, so its queue depth is the thread count.
PHONE_READAHEAD = 128 * 1024
GOALS = {"vs_llm_in_a_flash": 3.5, "vs_llama_cpp": 6.0, "mean_run_length": 6.0, "bandwidth_share": 0.6}


def sequential_bandwidth(path: os.PathLike) -> float:
    """Sequential read bandwidth (bytes/s) of the disk holding ``path``: the best sequential point of
    its probe-storage profile, else its cost model's bandwidth."""
    try:
        data = json.loads(storage.profile_path(path).read_text())
        seq = [p["mb_s"] * 1e6 for p in data.get("sequential", [])]
        if seq:
            return max(seq)
    except (OSError, ValueError):
        pass
    return storage.model_for(path).bandwidth_bps


def read_length_histogram(iolog, bundle_sizes: Sequence[int]) -> Dict[str, object]:
    """Read requests by length in bundles, log2 bins: {"edges", "counts", "mean", "max"}."""
    lengths = np.concatenate([np.ceil(b.lengths / bundle_sizes[b.layer]) for b in iolog]) if iolog else np.zeros(0)
    top = max(1.0, float(lengths.max()) if lengths.size else 1.0)
    edges = 2.0 ** np.arange(0, int(np.ceil(np.log2(top))) + 2)
    counts, _ = np.histogram(lengths, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist(),
            "mean": float(lengths.mean()) if lengths.size else 0.0, "max": float(top)}


def _row(system: str, storage: str, fraction: float, m: Mapping[str, object], e2e_ms: float, limit_ms: float,
         peak_rss_mb: float, n_ff: int = 0) -> Dict[str, object]:
    return {"system": system, "storage": storage, "cache_fraction": fraction,
            "io_ms_per_token": float(m["io_ms_per_token"]), "e2e_ms_per_token": float(e2e_ms),
            "read_ops_per_token": float(m["read_ops_per_token"]),
            "bytes_read_per_token": float(m["bytes_read_per_token"]),
            "needed_bytes_per_token": float(m["needed_bytes_per_token"]),
            "effective_bandwidth_mb_s": float(m["effective_bandwidth_mb_s"]),
            "limit_io_ms_per_token": float(limit_ms),
            "mean_run_length": float(m.get("mean_run_length", n_ff)),
            "max_run_length": float(m.get("max_run_length", n_ff)),
            "cache_hit_rate": float(m["cache_hit_rate"]), "peak_rss_mb": float(peak_rss_mb)}


def _modeled(m: Mapping[str, object], seconds: float) -> Dict[str, object]:
    out = dict(m)
    n = int(m["tokens"])
    out["io_ms_per_token"] = seconds * 1e3 / n
    out["effective_bandwidth_mb_s"] = m["needed_bytes_per_token"] * n / seconds / 1e6 if seconds > 0 else 0.0
    return out


def run(src: os.PathLike, *, text: Optional[str] = None, text_name: str = "held-out pydoc_data.topics",
        calib: Optional[Sequence[tuple]] = None, offline=None, tokens: int = 64, fractions: Sequence[float] = (0.05, 0.1),
        rounds: int = 3, n_threads: int = 2, ppl_tokens: int = 512, cross_dataset: bool = True,
        work_dir: Optional[os.PathLike] = None, quiet: bool = False) -> Dict[str, object]:
    """Measure every system on every storage at every cache fraction; the result that
    ``ripple-gguf bench`` prints and saves (docs/BENCHMARKS.md documents every field).

    ``calib``: [(name, text)] calibration texts (default: the converter's); ``offline``: a whole
    :class:`~ripple_gguf.offline.pipeline.OfflineConfig` instead (its ``calib`` then applies)."""
    t_start = time.perf_counter()
    work = Path(work_dir) if work_dir is not None else default_work_dir()
    cfg = offline if offline is not None else OfflineConfig(calib=list(calib) if calib else None)
    calib = cfg.calib
    progress("step 1/6: variants (one offline stage, three bundle orders)", quiet)
    paths = prepare_variants(src, work, cfg, quiet=quiet)
    rf = RippleFile.open(paths["ripple"])
    bundle_sizes = [l.bundle_size for l in rf.layers]
    n_ff = int(max(l.n_ff for l in rf.layers))
    if text is None:
        text = heldout_text(max(60 * max(tokens, ppl_tokens), 20000))
    toks = text_tokens(paths["ripple"], text, tokens)
    progress(f"step 2/6: decode trace, {len(toks)} tokens of {text_name} one at a time (sparse mode)", quiet)
    trace = record_decode_trace(paths["ripple"], toks, n_threads=n_threads)

    # local disk: real reads (O_DIRECT replays), real sparse decoding, stock llama.cpp; interleaved
    jobs: Dict[str, Callable[[], Mapping[str, object]]] = {LLAMA_CPP: lambda: stock_offload(src, toks, n_threads=n_threads)}
    for f in fractions:
        for name, s in SYSTEMS.items():
            jobs[f"replay {name} {f:g}"] = (lambda s=s, f=f: replay_system(paths[s.variant], trace, s, f, log=True))
            jobs[f"decode {name} {f:g}"] = (lambda s=s, f=f: decode_system(paths[s.variant], toks, s, f,
                                                                            n_threads=n_threads))
    progress(f"step 3/6: local disk, {rounds} interleaved rounds of {len(jobs)} measurements", quiet)
    local = interleaved(jobs, rounds, quiet=quiet, label="local disk ")
    io_threads = int(runtime.settings()["io_threads"])
    runtime.reset_settings()

    disk_model = storage.model_for(paths["ripple"])
    seq = {"local-disk": sequential_bandwidth(paths["ripple"]), "ufs4.0": storage.UFS40.bandwidth_bps,
           "ufs3.1": storage.UFS31.bandwidth_bps}
    stock = local[LLAMA_CPP]
    results: List[Dict[str, object]] = []
    validation: List[Dict[str, object]] = []
    read_lengths: Dict[str, object] = {}
    local_cm = dataclasses.replace(disk_model, queue_depth=io_threads)
    for f in fractions:
        results.append(_row(LLAMA_CPP, "local-disk", f, stock, stock["e2e_ms_per_token"],
                            stock["needed_bytes_per_token"] / seq["local-disk"] * 1e3, stock["peak_rss_mb"], n_ff))
        for name in SYSTEMS:
            m, d = local[f"replay {name} {f:g}"], local[f"decode {name} {f:g}"]
            results.append(_row(name, "local-disk", f, m, d["e2e_ms_per_token"],
                                m["needed_bytes_per_token"] / seq["local-disk"] * 1e3, d["peak_rss_mb"]))
            modeled = modeled_io_seconds(m["iolog"], local_cm) * 1e3 / m["tokens"]
            validation.append({"system": name, "cache_fraction": f, "measured_io_ms_per_token": m["io_ms_per_token"],
                               "modeled_io_ms_per_token": modeled,
                               "error": modeled / m["io_ms_per_token"] - 1 if m["io_ms_per_token"] else 0.0})
            if f == max(fractions):
                read_lengths[name] = read_length_histogram(m["iolog"], bundle_sizes)

    # phone flash: each system's reads replayed (collapse threshold from that storage's model), priced
    progress("step 4/6: UFS 4.0 and UFS 3.1 replays through the flash cost models", quiet)
    phone = {"ufs4.0": storage.UFS40, "ufs3.1": storage.UFS31}
    for st_name, cm in phone.items():
        gap = cm.collapse_gap_bytes()
        llama_cm = dataclasses.replace(cm, queue_depth=n_threads)
        n_req = int(np.ceil(stock["bytes_read_per_token"] / PHONE_READAHEAD))
        llama_io = llama_cm.batch_time([PHONE_READAHEAD] * n_req) * 1e3 if n_req else 0.0
        for f in fractions:
            sm = dict(stock, io_ms_per_token=llama_io,
                      effective_bandwidth_mb_s=stock["needed_bytes_per_token"] / llama_io / 1e3 if llama_io else 0.0,
                      read_ops_per_token=float(n_req))
            results.append(_row(LLAMA_CPP, st_name, f, sm, stock["compute_ms_per_token"] + llama_io,
                                stock["needed_bytes_per_token"] / seq[st_name] * 1e3, stock["peak_rss_mb"], n_ff))
            for name, s in SYSTEMS.items():
                m = replay_system(paths[s.variant], trace, s, f, collapse_bytes=gap, direct_io=False, log=True,
                                  drop_page_cache=False)
                m = _modeled(m, modeled_io_seconds(m["iolog"], cm))
                d = local[f"decode {name} {f:g}"]
                compute = max(0.0, d["e2e_ms_per_token"] - d["live_io_ms_per_token"])
                results.append(_row(name, st_name, f, m, compute + m["io_ms_per_token"],
                                    m["needed_bytes_per_token"] / seq[st_name] * 1e3, d["peak_rss_mb"]))
    runtime.reset_settings()

    # quality: perplexity of the same file in exact and sparse mode, and of stock llama.cpp
    progress(f"step 5/6: perplexity over {ppl_tokens} tokens (stock, exact, sparse)", quiet)
    ppl_toks = text_tokens(paths["ripple"], text, ppl_tokens)
    dense_bundles = float(sum(l.n_ff * l.bundle_size for l in rf.layers))
    sparse_needed = float(np.median([r["needed_bytes_per_token"] for r in results
                                     if r["system"] == "ripple" and r["storage"] == "local-disk"]))
    stock_logits = run_llama(src, tokens=ppl_toks, n_ctx=len(ppl_toks), n_batch=512, n_threads=n_threads,
                             stock=True)["logits"]
    ppl = [{"name": "llama.cpp (stock, dense)", "mode": "stock", "bytes_per_token": float(stock["needed_bytes_per_token"]),
            "ppl": perplexity(stock_logits, ppl_toks)}]
    for mode, nbytes in (("exact", dense_bundles), ("sparse", sparse_needed)):
        runtime.configure(mode=mode)
        ppl.append({"name": f"ripple {mode} mode", "mode": mode, "bytes_per_token": nbytes,
                    "ppl": perplexity_of_file(paths["ripple"], ppl_toks, chunk=len(ppl_toks), n_threads=n_threads)})
    runtime.reset_settings()

    cross: List[Dict[str, object]] = []
    if cross_dataset:
        progress("step 6/6: placement robustness across texts (profile on one, benchmark on another)", quiet)
        cross = cross_dataset_table(src, work, cfg, paths, tokens=min(tokens, 128), fraction=max(fractions),
                                    text=(text_name, text), n_threads=n_threads, quiet=quiet)

    return {
        "machine": dict(machine(), disk=storage.device_info(paths["ripple"]), disk_model=disk_model.to_dict(),
                        io_threads=io_threads),
        "model": {"name": Path(src).name, "source": str(src), "files": {k: str(v) for k, v in paths.items()},
                  "n_layers": len(rf.layers), "n_ff": n_ff, "n_embd": rf.n_embd, "bundle_bytes": bundle_sizes[0],
                  "ffn_bundle_bytes": dense_bundles, "source_ffn_bytes": float(stock["needed_bytes_per_token"]),
                  "calibration": ", ".join(n for n, _ in calib) if calib else "pydoc_data.topics (first half)"},
        "settings": {"tokens": len(toks), "text": text_name, "cache_fractions": list(fractions), "rounds": rounds,
                     "n_threads": n_threads, "ppl_tokens": len(ppl_toks),
                     "collapse_bytes": {"local-disk": int(local_cm.collapse_gap_bytes()),
                                        "ufs4.0": storage.UFS40.collapse_gap_bytes(),
                                        "ufs3.1": storage.UFS31.collapse_gap_bytes()},
                     "phone_readahead_bytes": PHONE_READAHEAD},
        "sequential_bandwidth_mb_s": {k: v / 1e6 for k, v in seq.items()},
        "results": results,
        "model_validation": validation,
        "read_lengths": read_lengths,
        "perplexity": ppl,
        "cross_dataset": cross,
        "goals": goals(results, seq),
        "elapsed_s": time.perf_counter() - t_start,
    }


def goals(results: Sequence[Mapping[str, object]], seq: Mapping[str, float]) -> List[Dict[str, object]]:
    """The issue's goals, per storage and cache fraction, with the measured values."""
    get = {(r["system"], r["storage"], r["cache_fraction"]): r for r in results}
    out = []
    for (system, st, f), r in get.items():
        if system != "ripple":
            continue
        lif, lc = get[("llm-in-a-flash", st, f)], get[(LLAMA_CPP, st, f)]
        share = r["effective_bandwidth_mb_s"] * 1e6 / seq[st]
        out.append({"storage": st, "cache_fraction": f,
                    "io_vs_llm_in_a_flash": lif["io_ms_per_token"] / r["io_ms_per_token"],
                    "io_vs_llama_cpp": lc["io_ms_per_token"] / r["io_ms_per_token"],
                    "mean_run_length": r["mean_run_length"], "bandwidth_share": share,
                    "met": {"vs_llm_in_a_flash": lif["io_ms_per_token"] / r["io_ms_per_token"] >= GOALS["vs_llm_in_a_flash"],
                            "vs_llama_cpp": lc["io_ms_per_token"] / r["io_ms_per_token"] >= GOALS["vs_llama_cpp"],
                            "mean_run_length": r["mean_run_length"] >= GOALS["mean_run_length"],
                            "bandwidth_share": share >= GOALS["bandwidth_share"]}})
    return out


def cross_dataset_table(src, work: Path, cfg, paths: Mapping[str, Path], *, tokens: int, fraction: float,
                        text: tuple, n_threads: int, quiet: bool = False) -> List[Dict[str, object]]:
    """Placement robustness: the ripple order profiled on one text, benchmarked on another.

    Two placements (the main calibration, and the standard library's docstrings, first half) and
    the original order, each replayed with the same active sets (traces recorded on the main file,
    so the predictors are the same) on two evaluation texts (``text`` and the docstrings' second
    half); ripple's settings, UFS 4.0 cost model."""
    other_name, other_text = stdlib_docstrings(0)
    other = prepare_variants(src, work, dataclasses.replace(cfg, calib=[(other_name, other_text)]),
                             placements=("ripple",), tag="docstrings", quiet=quiet)
    placements = {"calibration: " + (", ".join(n for n, _ in cfg.calib) if cfg.calib else "pydoc_data.topics (first half)"): paths["ripple"],
                  "calibration: " + other_name: other["ripple"], "original order": paths["original"]}
    evals = [text, stdlib_docstrings(1)]
    cm, ripple = storage.UFS40, SYSTEMS["ripple"]
    out = []
    for ev_name, ev_text in evals:
        toks = text_tokens(paths["ripple"], ev_text[:60 * tokens + 20000], tokens)
        tr = record_decode_trace(paths["ripple"], toks, n_threads=n_threads)
        for pl_name, path in placements.items():
            m = replay_system(path, tr, ripple, fraction, collapse_bytes=cm.collapse_gap_bytes(), direct_io=False,
                              log=True, drop_page_cache=False)
            out.append({"eval_text": ev_name, "placement": pl_name, "tokens": len(toks), "cache_fraction": fraction,
                        "mean_run_length": m["mean_run_length"], "read_ops_per_token": m["read_ops_per_token"],
                        "ufs40_io_ms_per_token": modeled_io_seconds(m["iolog"], cm) * 1e3 / m["tokens"]})
            progress(f"cross-dataset: {pl_name} on {ev_name}: mean run {m['mean_run_length']:.2f}", quiet)
    return out
