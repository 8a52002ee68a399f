"""The storage cost model: what a batch of reads costs on the disk that holds a model.

``probe(path)`` measures random reads (``O_DIRECT``, 4 KiB-aligned offsets into a temporary file
next to ``path``) against request size and queue depth; ``CostModel.fit`` turns the measurements
into three numbers; ``save_profile``/``model_for`` keep and find them per block device. Meant for
the runtime: ``model_for(path).collapse_gap_bytes()`` as the access-collapse threshold of a model
file, ``batch_time`` to price read plans.

Model (per batch of requests issued together, queue depth q):

    batch_time = (n_requests / min(q, parallelism)) * latency_s + total_bytes / bandwidth_bps

Two runs separated by a gap of g bytes cost one request less and g bytes more when read as one,
so collapsing pays when g < bandwidth_bps * latency_s / min(q, parallelism): that is
``collapse_gap_bytes()``, 0 (collapse off) when it is below 4 KiB (bandwidth-bound device).

Presets, from published figures:

- ``UFS40``: UFS 4.0 as characterised by PowerInfer-2 (Xue et al., arXiv 2406.06282, section 2.3;
  OnePlus 12, Snapdragon 8 Gen 3; summary at https://data.gatenft.io/post/status/16993340):
  ~4 GB/s sequential, ~1 GB/s for 4 KB random reads on a big core (128 MB range), IOPS-bound below
  ~24 KB, one 32-deep command queue. Samsung's UFS 4.0 announcement: 4,200 MB/s sequential read
  (https://www.neowin.net/news/samsung-debuts-all-new-ufs-40-to-enable-speeds-of-up-to-4200mbs-or-double-that-of-ufs-31).
- ``UFS31``: Samsung 512 GB eUFS 3.1: 2,100 MB/s sequential read, 100,000 IOPS 4 KB random read
  (https://liliputing.com/2020/03/samsungs-ufs-3-1-storage-brings-ssd-speeds-to-smartphones.html).
- ``DEFAULT`` (no profile for the device; the native library's, csrc/ripple_cost.c): a mainstream PCIe 3 NVMe SSD, Samsung 970 EVO Plus
  1 TB: 3,500 MB/s sequential read, 4 KB random read 19,000 IOPS at QD1 and 600,000 at QD32 x 4
  workers (https://digit.in/reviews/general/samsung-970-evo-plus-nvme-m-2-ssd-250-gb-review-177943.html).
  A development machine without a profile most likely reads from such a disk; its
  ``collapse_gap_bytes()`` (5,628 bytes at queue depth 32) is the default collapse threshold.

The additive form fitted this project's virtual disk better than a roofline ``max(...)`` of the two
terms (docs/BENCHMARKS.md, "Storage: this machine's disk vs the cost model").
"""
from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from .. import binding
from ..atomic import atomic_output
from ..paths import cache_subdir

KiB = 1024
MiB = 1024 * KiB
PROFILE_VERSION = 1
MIN_COLLAPSE_GAP = 4 * KiB   # a break-even gap below one page: the device is bandwidth-bound
ALIGN = 4 * KiB              # offsets and sizes of probe reads (O_DIRECT needs logical-block alignment)

DEFAULT_SIZES = tuple(4 * KiB << i for i in range(11))   # 4 KiB .. 4 MiB
DEFAULT_QUEUE_DEPTHS = (1, 4, 8, 16, 32)

PathLike = Union[str, os.PathLike]


# ---- probe: measured random reads on the file system holding a path ----

def _probe_dir(path: PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    d = p if p.is_dir() else p.parent
    if not os.access(d, os.R_OK | os.W_OK | os.X_OK):
        raise PermissionError(f"{d}: cannot create and read a probe file here (permission denied)")
    return d


class _ProbeFile:
    """A file of random bytes next to the model, opened for reading and already unlinked, so
    nothing is left behind whatever happens (the space is freed when the descriptor closes)."""

    def __init__(self, directory: Path, size: int, *, seed: int = 0):
        try:
            fd, name = tempfile.mkstemp(prefix=".ripple-probe-", dir=directory)
        except OSError as e:
            raise OSError(e.errno, f"{directory}: cannot create the probe file: {e.strerror}") from None
        try:
            rng = np.random.default_rng(seed)
            chunk = 8 * MiB
            for _ in range(0, size, chunk):
                os.write(fd, rng.bytes(chunk))
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            fd = -1
            self.size = size
            self.direct = True
            try:
                self.fd = os.open(name, os.O_RDONLY | os.O_DIRECT)
            except OSError as e:  # e.g. tmpfs, some FUSE and network file systems
                warnings.warn(f"{directory}: O_DIRECT refused ({e.strerror}); measuring buffered reads "
                              "with the page cache dropped instead", RuntimeWarning, stacklevel=3)
                self.direct = False
                self.fd = os.open(name, os.O_RDONLY)
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        finally:
            if fd >= 0:
                os.close(fd)
            os.unlink(name)

    def drop_cache(self) -> None:
        if not self.direct:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        os.close(self.fd)


def _reader(fd: int, buf: memoryview, offsets: np.ndarray, deadline: float, out: list) -> None:
    """One queue slot: blocking reads back to back until the deadline (os.preadv drops the GIL)."""
    size = len(buf)
    lat = []
    done = 0
    clock = time.perf_counter
    t_end = clock()
    try:
        for off in offsets.tolist():
            t0 = clock()
            n = os.preadv(fd, [buf], off)
            t_end = clock()
            if n != size:
                raise OSError(f"short read: {n} of {size} bytes at offset {off}")
            lat.append(t_end - t0)
            done += n
            if t_end >= deadline:
                break
    except OSError as e:
        out.append(e)
        return
    out.append((done, t_end, lat))


def _run(pf: _ProbeFile, bufs: Sequence[mmap.mmap], size: int, qd: int, seconds: float,
         rng: np.random.Generator, *, sequential: bool = False) -> tuple:
    """``qd`` threads reading ``size``-byte requests for ``seconds``: (bytes, wall seconds, latencies)."""
    pf.drop_cache()
    slots = (pf.size - size) // ALIGN + 1
    # enough offsets for the fastest plausible device (a few GB/s at 4 KiB per slot) in the window
    n = int(min(max(64, seconds * 400_000 / qd), 200_000))
    if sequential:  # one stream split round-robin between the slots: slot i reads chunks i, i+qd, ...
        chunks = (pf.size // size)
        offs = [((np.arange(n) * qd + i) % chunks) * size for i in range(qd)]
    else:
        offs = [rng.integers(0, slots, n) * ALIGN for _ in range(qd)]
    out: list = []
    t0 = time.perf_counter()
    deadline = t0 + seconds
    threads = [threading.Thread(target=_reader, args=(pf.fd, memoryview(bufs[i])[:size], offs[i], deadline, out))
               for i in range(qd)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in out:
        if isinstance(o, OSError):
            raise OSError(o.errno, f"probe read ({size} bytes, queue depth {qd}): {o.strerror or o}")
    total = sum(o[0] for o in out)
    wall = max(o[1] for o in out) - t0
    lat = np.concatenate([np.asarray(o[2]) for o in out])
    return total, wall, lat


def _point(pf, bufs, size, qd, seconds, rng, windows, sequential=False) -> dict:
    """Median throughput over ``windows`` consecutive windows (the machine is shared and noisy)."""
    rates, lats, nreq = [], [], 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(windows):
        total, wall, lat = _run(pf, bufs, size, qd, seconds / windows, rng, sequential=sequential)
        rates.append(total / wall)
        lats.append(lat)
        nreq += len(lat)
    lat = np.concatenate(lats)
    bps = float(np.median(rates))
    return {"size": size, "queue_depth": qd, "requests": nreq, "mb_s": bps / 1e6, "iops": bps / size,
            "lat_mean_us": float(lat.mean() * 1e6), "lat_p50_us": float(np.percentile(lat, 50) * 1e6),
            "lat_p99_us": float(np.percentile(lat, 99) * 1e6),
            # CPU seconds of this process per second: near the core count, the host CPU was the limit
            "cpu": (time.process_time() - cpu0) / (time.perf_counter() - wall0)}


def probe(path: PathLike, *, sizes: Sequence[int] = DEFAULT_SIZES,
          queue_depths: Sequence[int] = DEFAULT_QUEUE_DEPTHS, seconds_per_point: float = 0.7,
          file_mb: int = 256, windows: int = 3, quick: bool = False, progress: bool = True) -> dict:
    """Measure random reads on the file system holding ``path`` (a model file or a directory).

    A temporary file of ``file_mb`` MiB of random bytes is written next to ``path`` (fsync'd,
    unlinked at once, freed when the probe ends) and read with ``O_DIRECT`` at random 4 KiB-aligned
    offsets, for every request size and queue depth (that many threads issuing blocking reads).
    Each point is the median of ``windows`` windows. ``quick`` measures fewer points on a smaller
    file (a few seconds). Returns the measurements, the fitted :class:`CostModel` and its fit error.
    """
    directory = _probe_dir(path)
    if quick:
        sizes = tuple(s for s in sizes if s <= MiB)[::2]
        queue_depths = tuple(q for q in queue_depths if q in (1, 8, 32)) or tuple(queue_depths)
        seconds_per_point, file_mb, windows = min(seconds_per_point, 0.2), min(file_mb, 64), min(windows, 2)
    sizes = sorted({int(s) for s in sizes})
    queue_depths = sorted({int(q) for q in queue_depths})
    if not sizes or sizes[0] < ALIGN or any(s % ALIGN for s in sizes):
        raise ValueError(f"request sizes must be multiples of {ALIGN} bytes: {sizes}")
    if not queue_depths or queue_depths[0] < 1:
        raise ValueError(f"queue depths must be >= 1: {queue_depths}")
    file_bytes = max(file_mb * MiB, 8 * max(sizes)) // (8 * MiB) * (8 * MiB) or 8 * MiB
    seq_size = min(4 * MiB, file_bytes // 8)
    from tqdm import tqdm

    t_start = time.perf_counter()
    rng = np.random.default_rng(1)
    pf = _ProbeFile(directory, file_bytes)
    bufs = [mmap.mmap(-1, max(max(sizes), seq_size)) for _ in range(max(queue_depths))]  # page-aligned
    points, sequential = [], []
    try:
        bar = tqdm(total=len(sizes) * len(queue_depths) + 2, desc="probe-storage", unit="point",
                   disable=not progress or not sys.stderr.isatty(), file=sys.stderr)
        with bar:
            for qd in (1, min(8, max(queue_depths))):
                sequential.append(_point(pf, bufs, seq_size, qd, seconds_per_point, rng, windows, sequential=True))
                bar.update()
            for qd in queue_depths:
                for size in sizes:
                    bar.set_postfix_str(f"{size // KiB} KiB x QD{qd}")
                    points.append(_point(pf, bufs, size, qd, seconds_per_point, rng, windows))
                    bar.update()
    finally:
        pf.close()
        for b in bufs:
            b.close()
    result = {"version": PROFILE_VERSION, "path": str(directory.resolve()), "device": device_info(directory),
              "direct": pf.direct, "file_bytes": file_bytes, "seconds_per_point": seconds_per_point,
              "windows": windows, "quick": quick, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "points": points, "sequential": sequential}
    model = CostModel.fit(result, name=f"probe {result['device']['key']}")
    result["model"] = model.to_dict()
    result["fit"] = model.fit_error(result)
    result["elapsed_s"] = time.perf_counter() - t_start
    return result


# ---- the cost model ----

@dataclasses.dataclass(frozen=True)
class CostModel:
    """Time of a batch of reads issued together: ``n / min(queue_depth, parallelism) * latency_s +
    bytes / bandwidth_bps``. ``latency_s`` is the fixed cost of one request at queue depth 1,
    ``parallelism`` how many requests the device overlaps, ``queue_depth`` how many the reader
    keeps in flight (``dataclasses.replace`` it to match an engine)."""

    latency_s: float
    bandwidth_bps: float
    parallelism: float
    queue_depth: int = 32
    name: str = ""
    source: str = ""

    def __post_init__(self):
        for field in ("latency_s", "bandwidth_bps", "parallelism", "queue_depth"):
            v = getattr(self, field)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"CostModel {self.name or '(unnamed)'}: {field} must be a positive number, not {v!r}")

    @property
    def overlap(self) -> float:
        """Requests actually served at once: min(queue_depth, parallelism)."""
        return min(float(self.queue_depth), float(self.parallelism))

    def request_time(self, size: float, queue_depth: Optional[int] = None) -> float:
        """Seconds per request in a steady stream of ``size``-byte requests."""
        q = self.overlap if queue_depth is None else min(float(queue_depth), float(self.parallelism))
        return self.latency_s / q + size / self.bandwidth_bps

    def throughput(self, size: float, queue_depth: Optional[int] = None) -> float:
        """Bytes/s of a steady stream of random ``size``-byte reads (at the model's queue depth)."""
        return size / self.request_time(size, queue_depth)

    def batch_time(self, sizes: Iterable[int]) -> float:
        """Seconds to read a batch of requests of these sizes (bytes) issued together."""
        a = np.asarray(sizes if isinstance(sizes, np.ndarray) else list(sizes), dtype=np.float64)
        if a.size == 0:
            return 0.0
        return float(a.size * self.latency_s / self.overlap + a.sum() / self.bandwidth_bps)

    def collapse_gap_bytes(self) -> int:
        """Largest gap (bytes) worth reading through to save a request: bandwidth * latency /
        overlap, where the two costs are equal; 0 (collapse off) when that is under 4 KiB, i.e.
        the device is bandwidth-bound."""
        gap = self.bandwidth_bps * self.latency_s / self.overlap
        return 0 if gap < MIN_COLLAPSE_GAP else int(gap)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        try:
            return cls(latency_s=float(d["latency_s"]), bandwidth_bps=float(d["bandwidth_bps"]),
                       parallelism=float(d["parallelism"]), queue_depth=int(d.get("queue_depth", 32)),
                       name=str(d.get("name", "")), source=str(d.get("source", "")))
        except (KeyError, TypeError) as e:
            raise ValueError(f"cost model: missing or bad field {e}") from None

    # -- against measurements --

    @staticmethod
    def _points(probe_result: dict) -> tuple:
        pts = probe_result.get("points") or []
        if not pts:
            raise ValueError("probe result: no points to fit")
        s = np.array([p["size"] for p in pts], dtype=np.float64)
        q = np.array([p["queue_depth"] for p in pts], dtype=np.float64)
        t = s / (np.array([p["mb_s"] for p in pts], dtype=np.float64) * 1e6)  # seconds per request
        return s, q, t

    @classmethod
    def fit(cls, probe_result: dict, *, queue_depth: Optional[int] = None, name: str = "fitted") -> "CostModel":
        """Least squares over a probe's points, on the relative error of the time per request.
        For a given parallelism that time is linear in latency and 1/bandwidth; the parallelism is
        searched on a grid, then refined. It is only identifiable up to the deepest probed queue."""
        s, q, t = cls._points(probe_result)

        def solve(p: float) -> tuple:
            a = np.stack([1.0 / np.minimum(q, p), s], axis=1) / t[:, None]  # scaled rows: relative residuals
            coef, *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
            if coef.min() <= 0:  # the best non-negative fit then keeps one term; the other stays negligible
                cands = [np.array([a[:, k].sum() / (a[:, k] @ a[:, k]) if k == j else 0.0 for k in (0, 1)])
                         for j in (0, 1)]
                coef = np.maximum(min(cands, key=lambda c: float(((a @ c - 1) ** 2).sum())), 1e-15)
            return float(((a @ coef - 1) ** 2).sum()), coef

        grid = np.unique(np.concatenate([np.geomspace(1.0, q.max(), 60), q]))
        errs = [solve(p)[0] for p in grid]
        i = int(np.argmin(errs))  # first minimum: the smallest parallelism among equals
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        for _ in range(40):  # golden-section search between the neighbours
            m1, m2 = hi - (hi - lo) / 1.618034, lo + (hi - lo) / 1.618034
            if solve(m1)[0] <= solve(m2)[0]:
                hi = m2
            else:
                lo = m1
        p = min([grid[i], (lo + hi) / 2], key=lambda x: solve(x)[0])
        lat, inv_bw = solve(p)[1]
        src = f"fitted to {len(t)} probe points ({probe_result.get('path', '?')}, {probe_result.get('created', '?')})"
        return cls(latency_s=float(lat), bandwidth_bps=float(1.0 / inv_bw), parallelism=float(p),
                   queue_depth=int(queue_depth or q.max()), name=name, source=src)

    def fit_error(self, probe_result: dict) -> dict:
        """Relative error of the modelled time per request (= measured / modelled throughput - 1)
        over a probe's points: root mean square, largest and median magnitude."""
        s, q, t = self._points(probe_result)
        model_t = np.array([self.request_time(si, qi) for si, qi in zip(s, q)])
        rel = model_t / t - 1.0  # the quantity fit() minimises
        return {"rms_rel_error": float(np.sqrt(np.mean(rel ** 2))), "max_abs_rel_error": float(np.abs(rel).max()),
                "median_abs_rel_error": float(np.median(np.abs(rel))), "points": int(len(t))}


# ---- profiles: one per block device ----

def device_info(path: PathLike) -> dict:
    """The block device holding ``path``: st_dev as major:minor, and the mount's source and file
    system type from /proc/self/mountinfo when it is readable."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    info = {"dev": f"{major}:{minor}", "source": "", "fstype": "", "mount": ""}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rest = left.split(), right.split()
                if len(fields) >= 5 and fields[2] == info["dev"] and len(rest) >= 2:
                    info.update(fstype=rest[0], source=rest[1], mount=fields[4])
                    break
    except OSError:
        pass
    src = re.sub(r"[^A-Za-z0-9_.-]+", "-", info["source"].strip("/")).strip("-")
    info["key"] = f"{major}-{minor}" + (f"_{src}" if src else "")
    return info


def profile_dir() -> Path:
    """$RIPPLE_STORAGE_PROFILE_DIR, else $XDG_CACHE_HOME/ripple-gguf/storage (~/.cache/...)."""
    return cache_subdir("storage", "RIPPLE_STORAGE_PROFILE_DIR")


def profile_path(path: PathLike) -> Path:
    """Where the profile of the device holding ``path`` is kept."""
    return profile_dir() / f"{device_info(path)['key']}.json"


def save_profile(result: dict) -> Path:
    """Write a :func:`probe` result as the profile of the device it measured; returns its path."""
    if "model" not in result or "device" not in result:
        raise ValueError("save_profile: not a probe result (no 'model' or 'device')")
    CostModel.from_dict(result["model"])  # refuse to store a model that would not load
    d = profile_dir()
    d.mkdir(parents=True, exist_ok=True)
    dst = d / f"{result['device']['key']}.json"
    with atomic_output(dst) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1))
    return dst


def load_profile(path: PathLike) -> Optional[CostModel]:
    """The measured model of the device holding ``path`` (a model file), or None if never probed."""
    src = profile_path(path)
    try:
        data = json.loads(src.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{src}: unreadable storage profile ({e}); run ripple-gguf probe-storage again") from None
    if not isinstance(data, dict) or data.get("version") != PROFILE_VERSION or "model" not in data:
        raise ValueError(f"{src}: not a version-{PROFILE_VERSION} storage profile; run ripple-gguf probe-storage again")
    try:
        return CostModel.from_dict(data["model"])
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None


def model_for(path: PathLike) -> CostModel:
    """The cost model for reads of ``path``: its device's profile if one was saved, else DEFAULT."""
    try:
        model = load_profile(path)
    except ValueError as e:
        warnings.warn(f"{e}; using the default storage model", RuntimeWarning, stacklevel=2)
        return DEFAULT
    return DEFAULT if model is None else model


# ---- presets from published figures (module docstring: sources) ----

def _from_figures(name: str, source: str, *, seq_bps: float, iops_4k: float, at_depth: int,
                  parallelism: float, queue_depth: int = 32) -> CostModel:
    """The model through published figures: sequential bandwidth, 4 KiB random IOPS at a depth and
    the device's parallelism (csrc/ripple_cost.c derives the default device from its IOPS at depth
    1 instead)."""
    per_req = 1.0 / iops_4k - 4 * KiB / seq_bps  # latency / min(at_depth, parallelism)
    return CostModel(latency_s=per_req * min(at_depth, parallelism), bandwidth_bps=seq_bps,
                     parallelism=parallelism, queue_depth=queue_depth, name=name, source=source)


UFS40 = _from_figures(
    "UFS 4.0", "PowerInfer-2 (arXiv 2406.06282) section 2.3: ~4 GB/s sequential, ~1 GB/s 4 KB random, "
    "32-deep queue; Samsung UFS 4.0: 4,200 MB/s sequential read",
    seq_bps=4.0e9, iops_4k=1.0e9 / (4 * KiB), at_depth=32, parallelism=32)
UFS31 = _from_figures(
    "UFS 3.1", "Samsung 512 GB eUFS 3.1 (2020): 2,100 MB/s sequential read, 100,000 IOPS 4 KB random read; "
    "32-deep queue",
    seq_bps=2.1e9, iops_4k=100_000, at_depth=32, parallelism=32)


def _default_model() -> CostModel:
    """The model of a disk without a profile: the native library's, what the backend starts with
    (csrc/ripple_cost.c derives it from the figures of the module docstring)."""
    latency_s, bandwidth_bps, parallelism = binding.storage_default_model()
    return CostModel(latency_s=latency_s, bandwidth_bps=bandwidth_bps, parallelism=parallelism,
                     name="default (NVMe SSD)",
                     source="Samsung 970 EVO Plus 1 TB: 3,500 MB/s sequential read, 4 KB random read "
                            "19,000 IOPS at QD1 and 600,000 IOPS at QD32 x 4 workers")


DEFAULT = _default_model()
