"""Measurements in fresh processes: stock llama.cpp with the FFN pages of its file dropped before
each token (``_stock_offload.py``, an interpreter that never imports ripple_gguf), and the real
sparse decoding of one system (``python -m ripple_gguf.eval.processes --decode-child``, whose peak
resident memory is the system's own)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Sequence

import numpy as np

from ..runtime import backend as runtime
from .machine import peak_rss_bytes
from .replay import System, apply_system


# ---- stock llama.cpp with the FFN pages dropped before each token ----

def ffn_ranges(src: os.PathLike) -> List[List[int]]:
    """[offset, size] in the file of every FFN weight tensor of a GGUF."""
    # here, not at the top: the decode child imports this module, and its peak memory is measured
    from ..format.layout import is_ffn_tensor
    from ..format.reader import read_gguf_header

    hdr = read_gguf_header(src)
    return [[hdr.data_offset + t.offset, t.nbytes] for t in hdr.tensors if is_ffn_tensor(t.name)]


def _disk_stat_path(path: os.PathLike) -> str:
    st = os.stat(path)
    p = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"
    return p if os.path.exists(p) else ""


def stock_offload(src: os.PathLike, tokens: Sequence[int], *, n_threads: int = 2, timeout: float = 900) -> Dict[str, object]:
    """Stock llama.cpp on ``src`` (a subprocess that never imports ripple_gguf), the FFN pages of the
    file dropped before each token (``ripple_gguf/eval/_stock_offload.py``); per-token figures."""
    import subprocess
    import tempfile

    ranges = ffn_ranges(src)
    with tempfile.TemporaryDirectory() as d:
        spec, out = os.path.join(d, "spec.json"), os.path.join(d, "out.json")
        with open(spec, "w") as f:
            json.dump({"model": os.path.realpath(src), "tokens": list(map(int, tokens)), "n_threads": n_threads,
                       "ffn_ranges": ranges, "disk_stat": _disk_stat_path(src)}, f)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_stock_offload.py")
        r = subprocess.run([sys.executable, script, spec, out], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"stock llama.cpp with offloaded FFN failed on {src}: {r.stderr[-2000:]}")
        with open(out) as f:
            raw = json.load(f)
    n = len(tokens)
    warm, cold = float(np.mean(raw["warm_s"])), float(np.mean(raw["cold_s"]))
    io = max(0.0, cold - warm)
    ffn = sum(s for _, s in ranges)
    return {
        "tokens": n,
        "e2e_ms_per_token": cold * 1e3,
        "compute_ms_per_token": warm * 1e3,
        # the page faults' reads are not timed separately: cold minus warm time of the same tokens
        "io_ms_per_token": io * 1e3,
        "read_ops_per_token": float(np.mean(raw["disk_reads"])),
        "bytes_read_per_token": float(np.mean(raw["read_bytes"])),
        "disk_bytes_per_token": float(np.mean(raw["disk_bytes"])),
        "needed_bytes_per_token": float(ffn),  # stock computes every neuron: the whole FFN
        "effective_bandwidth_mb_s": ffn / io / 1e6 if io > 0 else 0.0,
        "cache_hit_rate": 0.0,
        "left_resident_bytes": float(np.max(raw["left_resident"])) if raw["left_resident"] else 0.0,
        "peak_rss_mb": raw["peak_rss"] / 2**20,
    }


# ---- real sparse decoding of one system (e2e time, resident memory) ----

def decode_system(path: os.PathLike, tokens: Sequence[int], system: System, cache_fraction: float, *,
                  n_threads: int = 2, timeout: float = 900) -> Dict[str, object]:
    """Decode ``tokens`` one at a time with ``system``'s file and settings, direct I/O on, in a fresh
    process (its peak resident memory is the system's own); per-token figures, the first token
    (graph set-up) left out."""
    import subprocess

    spec = {"path": os.fspath(path), "tokens": list(map(int, tokens)), "system": dataclasses.asdict(system),
            "cache_fraction": cache_fraction, "n_threads": n_threads}
    r = subprocess.run([sys.executable, "-m", "ripple_gguf.eval.processes", "--decode-child", json.dumps(spec)],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"sparse decoding of {path} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _decode_child(spec: dict) -> dict:
    import llama_cpp

    apply_system(System(**spec["system"]), spec["cache_fraction"], direct_io=True)
    tokens = spec["tokens"]
    llm = llama_cpp.Llama(model_path=spec["path"], n_ctx=len(tokens) + 8, n_batch=1, n_ubatch=1,
                          n_threads=spec["n_threads"], verbose=False)
    llm.eval(tokens[:1])
    runtime.reset_stats()
    t0 = time.perf_counter()
    for t in tokens[1:]:
        llm.eval([t])
    wall = time.perf_counter() - t0
    st = runtime.stats()
    llm.close()
    n = max(1, len(tokens) - 1)
    hwm = peak_rss_bytes()
    return {"e2e_ms_per_token": wall * 1e3 / n, "live_io_ms_per_token": st["io_seconds"] * 1e3 / n,
            "live_read_ops_per_token": st["read_ops"] / n, "peak_rss_mb": hwm / 2**20}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--decode-child":
        print(json.dumps(_decode_child(json.loads(sys.argv[2]))))
