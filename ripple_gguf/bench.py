"""Side-by-side I/O measurements of the systems the Ripple paper compares, with the same active sets.

The pieces, shared by ``scripts/io_side_by_side.py`` and ``ripple-gguf bench``:

- :func:`prepare_variants`: one offline stage (profile, thresholds, predictors, every placement),
  then one ripple-packed file per bundle order (``ripple``, ``frequency``, ``original``) holding
  the same bundles and the same predictors, cached under a work directory keyed by the source's
  sha256 and the offline settings;
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
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from . import constants as C

PLACEMENTS = ("ripple", "frequency", "original")


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

# Figures reported per system (per token unless said otherwise).
METRICS = ("io_ms_per_token", "read_ops_per_token", "bytes_read_per_token", "needed_bytes_per_token",
           "effective_bandwidth_mb_s", "mean_run_length", "max_run_length", "cache_hit_rate",
           "collapse_extra_bytes_per_token")


def default_work_dir() -> Path:
    from .quickstart import default_cache_dir

    return default_cache_dir() / "bench"


def _progress(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- variants: the same bundles and predictors in several orders ----

def offline_key(source_sha256: str, cfg) -> str:
    """Key of a set of variants: the source bytes and every offline setting that changes the file."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("calib", "quiet", "threads", "placement")}
    texts = cfg.calib if cfg.calib is not None else None
    fields["calib"] = None if texts is None else [[n, hashlib.sha256(t.encode()).hexdigest()] for n, t in texts]
    blob = json.dumps([source_sha256, C.TOOL_VERSION, fields], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare_variants(src: os.PathLike, work_dir: os.PathLike, cfg=None, *, placements: Sequence[str] = PLACEMENTS,
                     tag: str = "", quiet: bool = False) -> Dict[str, Path]:
    """Ripple-packed files of ``src`` that differ only in bundle order, one per placement.

    A single offline stage (``cfg``: an :class:`~ripple_gguf.offline.OfflineConfig`, default
    settings when None) is run when any file is missing; files already in ``work_dir`` made from
    the same source bytes and settings are reused."""
    from .convert import convert, sha256_file
    from .offline import OfflineConfig, run as run_offline
    from .quickstart import reusable

    cfg = cfg if cfg is not None else OfflineConfig()
    cfg = dataclasses.replace(cfg, placement="ripple", quiet=True)
    src = Path(src)
    sha = sha256_file(os.fspath(src))
    key = offline_key(sha, cfg)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stem = src.name[:-len(".gguf")] if src.name.endswith(".gguf") else src.name
    paths = {m: work / f"{stem}.{tag + '.' if tag else ''}{key}.{m}.ripple.gguf" for m in placements}
    missing = [m for m in placements if not reusable(paths[m], sha)]
    if missing:
        _progress(f"offline stage on {src.name} for {', '.join(missing)} (profile, predictors, placements)", quiet)
        t0 = time.perf_counter()
        result = run_offline(src, cfg)
        for m in missing:
            convert(src, paths[m], offline=result.for_placement(m), quiet=True)
        _progress(f"variants written in {time.perf_counter() - t0:.0f} s", quiet)
    return paths


def prepare_unprofiled(src: os.PathLike, work_dir: os.PathLike, *, quiet: bool = False) -> Path:
    """``src`` packed without the offline stage (original order, no predictors: exact mode only),
    the cheapest valid ripple file, cached in ``work_dir`` like the variants."""
    from .convert import convert, sha256_file
    from .format import RippleFile, RippleFormatError

    src = Path(src)
    sha = sha256_file(os.fspath(src))
    key = hashlib.sha256(json.dumps([sha, C.TOOL_VERSION, "unprofiled"]).encode()).hexdigest()[:12]
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stem = src.name[:-len(".gguf")] if src.name.endswith(".gguf") else src.name
    path = work / f"{stem}.{key}.original.ripple.gguf"
    try:
        rf = RippleFile.open(path)
        rf.check_quick()
        if rf.source.sha256 == sha:
            return path
    except (RippleFormatError, OSError):
        pass
    _progress(f"packing {src.name} without the offline stage (original order, no predictors)", quiet)
    t0 = time.perf_counter()
    convert(src, path, quiet=True)
    _progress(f"{path.name} written in {time.perf_counter() - t0:.0f} s", quiet)
    return path


# ---- the decode trace ----

def text_tokens(model: os.PathLike, text: str, n: int) -> List[int]:
    from .quality import tokenize

    return tokenize(model, text, n)


def record_decode_trace(path: os.PathLike, tokens: Sequence[int], *, n_threads: int = 2):
    """Decode ``tokens`` one at a time (``n_batch=1``) in sparse mode on the ripple file ``path``;
    returns the activity trace of that model (the neurons selected for each token and layer)."""
    import llama_cpp

    from . import runtime, trace

    before = runtime.settings()["mode"]
    runtime.configure(mode="sparse")
    llm = llama_cpp.Llama(model_path=os.fspath(path), n_ctx=len(tokens) + 8, n_batch=1, n_ubatch=1,
                          n_threads=n_threads, verbose=False)
    try:
        handle = runtime.last_load()["handle"]
        trace.start(max_mb=64)
        try:
            llm.eval(list(tokens))
        finally:
            t = trace.stop()
    finally:
        llm.close()
        runtime.configure(mode=before)
    return trace.Trace(r for r in t if r.handle == handle)


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
    from . import runtime

    collapse = (collapse_bytes if collapse_bytes is not None else True) if system.collapse else False
    runtime.configure(mode="sparse", cache_fraction=cache_fraction, cache_policy=system.cache_policy,
                      collapse=collapse, direct_io=direct_io)


def replay_system(path: os.PathLike, trace, system: System, cache_fraction: float, *,
                  collapse_bytes: Optional[int] = None, direct_io: bool = True, log: bool = False,
                  drop_page_cache: bool = True) -> Dict[str, object]:
    """Replay ``trace`` on ``path`` with ``system``'s settings: per-token figures (and "iolog")."""
    from . import runtime
    from . import trace as tr

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
            _progress(f"{label}round {r + 1}/{rounds}: {n} ({time.perf_counter() - t0:.1f} s) [{done}/{total}]", quiet)
    out = {}
    for n in names:
        out[n] = median_of(got[n])
        if "io_ms_per_token" in got[n][0]:
            out[n]["io_ms_rounds"] = [float(x["io_ms_per_token"]) for x in got[n]]
    return out


def machine() -> Dict[str, object]:
    """A short description of the machine the measurements ran on."""
    import platform

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(l.split()[1] for l in f if l.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    import llama_cpp

    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
            "python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__,
            "ripple_gguf": C.TOOL_VERSION}


# ---- a second text shipped with Python: the standard library's docstrings ----

def stdlib_docstrings(part: int) -> tuple:
    """(name, text): the docstrings (module, classes, functions) of the standard library's top-level
    pure-Python modules, read with ``ast`` (nothing is imported). ``part`` 0 takes the modules in the
    first half of the sorted file names, 1 the second half, so a calibration on one part never sees
    the other. Another register than ``pydoc_data``'s topics: API reference prose, not tutorials."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stem not in ("this", "antigravity"))
    half = files[: len(files) // 2] if part == 0 else files[len(files) // 2:]
    texts = []
    for p in half:
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in [tree] + [n for n in ast.walk(tree)
                              if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]:
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                texts.append(doc)
    name = f"stdlib docstrings ({'first' if part == 0 else 'second'} half of {len(files)} modules)"
    return name, "\n\n".join(texts)


# ---- stock llama.cpp with the FFN pages dropped before each token ----

def ffn_ranges(src: os.PathLike) -> List[List[int]]:
    """[offset, size] in the file of every FFN weight tensor of a GGUF."""
    from .format import is_ffn_tensor, read_gguf_header

    hdr = read_gguf_header(src)
    return [[hdr.data_offset + t.offset, t.nbytes] for t in hdr.tensors if is_ffn_tensor(t.name)]


def _disk_stat_path(path: os.PathLike) -> str:
    st = os.stat(path)
    p = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"
    return p if os.path.exists(p) else ""


def stock_offload(src: os.PathLike, tokens: Sequence[int], *, n_threads: int = 2, timeout: float = 900) -> Dict[str, object]:
    """Stock llama.cpp on ``src`` (a subprocess that never imports ripple_gguf), the FFN pages of the
    file dropped before each token (``ripple_gguf/_stock_offload.py``); per-token figures."""
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
    r = subprocess.run([sys.executable, "-m", "ripple_gguf.bench", "--decode-child", json.dumps(spec)],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"sparse decoding of {path} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _decode_child(spec: dict) -> dict:
    import llama_cpp

    from . import runtime

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
    with open("/proc/self/status") as f:
        hwm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    return {"e2e_ms_per_token": wall * 1e3 / n, "live_io_ms_per_token": st["io_seconds"] * 1e3 / n,
            "live_read_ops_per_token": st["read_ops"] / n, "peak_rss_mb": hwm / 2**20}


# ---- ripple-gguf bench: every system, storage and cache fraction in one run ----

STORAGES = ("local-disk", "ufs4.0", "ufs3.1")
LLAMA_CPP = "llama.cpp"
# Read-around window assumed for llama.cpp's mmap page faults on phone flash (Linux's default
# read_ahead_kb); the faults of a thread are synchronous, so its queue depth is the thread count.
PHONE_READAHEAD = 128 * 1024
GOALS = {"vs_llm_in_a_flash": 3.5, "vs_llama_cpp": 6.0, "mean_run_length": 6.0, "bandwidth_share": 0.6}


def sequential_bandwidth(path: os.PathLike) -> float:
    """Sequential read bandwidth (bytes/s) of the disk holding ``path``: the best sequential point of
    its probe-storage profile, else its cost model's bandwidth."""
    from . import storage

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
    :class:`~ripple_gguf.offline.OfflineConfig` instead (its ``calib`` then applies)."""
    from . import runtime, storage
    from .format import RippleFile
    from .offline import OfflineConfig
    from .quality import heldout_text, perplexity, perplexity_of_file, run as run_llama
    from .trace import modeled_io_seconds

    t_start = time.perf_counter()
    work = Path(work_dir) if work_dir is not None else default_work_dir()
    cfg = offline if offline is not None else OfflineConfig(calib=list(calib) if calib else None)
    calib = cfg.calib
    _progress("step 1/6: variants (one offline stage, three bundle orders)", quiet)
    paths = prepare_variants(src, work, cfg, quiet=quiet)
    rf = RippleFile.open(paths["ripple"])
    bundle_sizes = [l.bundle_size for l in rf.layers]
    n_ff = int(max(l.n_ff for l in rf.layers))
    if text is None:
        text = heldout_text(max(60 * max(tokens, ppl_tokens), 20000))
    toks = text_tokens(paths["ripple"], text, tokens)
    _progress(f"step 2/6: decode trace, {len(toks)} tokens of {text_name} one at a time (sparse mode)", quiet)
    trace = record_decode_trace(paths["ripple"], toks, n_threads=n_threads)

    # local disk: real reads (O_DIRECT replays), real sparse decoding, stock llama.cpp; interleaved
    jobs: Dict[str, Callable[[], Mapping[str, object]]] = {LLAMA_CPP: lambda: stock_offload(src, toks, n_threads=n_threads)}
    for f in fractions:
        for name, s in SYSTEMS.items():
            jobs[f"replay {name} {f:g}"] = (lambda s=s, f=f: replay_system(paths[s.variant], trace, s, f, log=True))
            jobs[f"decode {name} {f:g}"] = (lambda s=s, f=f: decode_system(paths[s.variant], toks, s, f,
                                                                            n_threads=n_threads))
    _progress(f"step 3/6: local disk, {rounds} interleaved rounds of {len(jobs)} measurements", quiet)
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
    _progress("step 4/6: UFS 4.0 and UFS 3.1 replays through the flash cost models", quiet)
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
    _progress(f"step 5/6: perplexity over {ppl_tokens} tokens (stock, exact, sparse)", quiet)
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
        _progress("step 6/6: placement robustness across texts (profile on one, benchmark on another)", quiet)
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
    from . import storage
    from .trace import modeled_io_seconds

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
            _progress(f"cross-dataset: {pl_name} on {ev_name}: mean run {m['mean_run_length']:.2f}", quiet)
    return out


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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--decode-child":
        print(json.dumps(_decode_child(json.loads(sys.argv[2]))))
