"""Activity traces and their replay.

While a trace is on, the backend records, for every layer fetch of sparse mode, which neurons the
predictors asked for (the union over the tokens of the batch). A trace is independent of the
placement (neuron ids, not positions), so one recorded run can be replayed against files that
hold the same bundles in other orders, or under other cache and collapse settings, with the same
active sets: :func:`replay` performs the reads of each record through the backend's own store (the
same run formation, collapse, cache, I/O engine and counters as inference) without llama.cpp.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from .. import binding
from . import pagecache


@dataclass
class Record:
    handle: int  # model handle the record came from
    layer: int  # index into the file's FFN layers
    n_tokens: int  # tokens in the batch
    neurons: np.ndarray  # int32 neuron ids needed


class Trace(List[Record]):
    """Records in the order the backend fetched them."""

    @property
    def tokens(self) -> int:
        return sum(r.n_tokens for r in self if r.layer == 0)

    def to_array(self) -> np.ndarray:
        parts = [np.array([r.handle, r.layer, r.n_tokens, len(r.neurons)], np.int32) for r in self]
        out: List[np.ndarray] = []
        for head, r in zip(parts, self):
            out += [head, r.neurons.astype(np.int32)]
        return np.concatenate(out) if out else np.zeros(0, np.int32)

    @classmethod
    def from_array(cls, a: np.ndarray) -> "Trace":
        t, i, a = cls(), 0, np.asarray(a, np.int32)
        while i < len(a):
            if i + 4 > len(a) or a[i + 3] < 0 or i + 4 + a[i + 3] > len(a):
                raise ValueError(f"activity trace is truncated at int32 {i} of {len(a)}")
            n = int(a[i + 3])
            t.append(Record(int(a[i]), int(a[i + 1]), int(a[i + 2]), a[i + 4:i + 4 + n].copy()))
            i += 4 + n
        return t

    def save(self, path: os.PathLike) -> None:
        np.save(path, self.to_array())

    @classmethod
    def load(cls, path: os.PathLike) -> "Trace":
        return cls.from_array(np.load(path))


def start(max_mb: float = 256) -> None:
    """Start recording (clears what was recorded); at most ``max_mb`` MiB are kept."""
    binding.trace_start(int(max_mb * 1024 * 1024 / 4))


def stop() -> Trace:
    """Stop recording and return what was recorded."""
    binding.trace_stop()
    return read()


def read() -> Trace:
    buf = binding.trace_read()
    dropped = binding.trace_dropped()
    if dropped:
        raise RuntimeError(f"activity trace full: {dropped} records dropped (start(max_mb=...) larger)")
    return Trace.from_array(buf)


class Store:
    """A ripple-packed file opened for reads without llama.cpp (the backend's standalone store)."""

    def __init__(self, path: os.PathLike):
        from ..format.reader import RippleFile
        from .backend import _apply_storage

        self.file = RippleFile.open(path)  # the layers' shapes, for callers
        _apply_storage(self.file.path)
        # the library reads and checks the file itself (csrc/ripple_file.c), as at a llama.cpp load
        self.handle = binding.store_open_file(os.fsencode(self.file.path))

    def fetch(self, layer: int, neurons: np.ndarray, n_tokens: int = 1) -> None:
        try:
            binding.store_fetch(self.handle, layer, neurons, n_tokens)
        except OSError as e:
            raise OSError(f"{self.file.path}: {e}") from None

    def close(self) -> None:
        if self.handle > 0:
            binding.store_close(self.handle)
            self.handle = -1

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Batch:
    layer: int
    n_tokens: int
    lengths: np.ndarray  # bytes of each read request, issued together


def read_iolog() -> List[Batch]:
    """The read requests of every layer fetch since :func:`start` (recorded while tracing)."""
    a = binding.iolog_read()
    n = len(a)
    out, i = [], 0
    while i < n:
        k = int(a[i + 2])
        out.append(Batch(int(a[i]), int(a[i + 1]), a[i + 3:i + 3 + k].copy()))
        i += 3 + k
    return out


def modeled_io_seconds(iolog: List[Batch], cost_model) -> float:
    """I/O time of a read log on a storage cost model (each fetch's requests issued together)."""
    return sum(cost_model.batch_time(b.lengths) for b in iolog)


def replay(path: os.PathLike, trace: Trace, *, handle: Optional[int] = None, drop_page_cache: bool = True,
           log: bool = False) -> Dict[str, object]:
    """Perform the reads of ``trace`` (the records of model ``handle``; all when None) on the
    ripple file ``path`` under the current settings (cache, collapse, direct I/O, I/O threads)
    and return the backend's counters for exactly that replay (with ``log``, also its read log
    under "iolog"). The store's cache starts empty. Resets the process-wide counters."""
    from .backend import reset_stats, stats

    with Store(path) as st:
        n_layers = len(st.file.layers)
        if drop_page_cache:
            pagecache.drop_pages(st.file.path)
        if log:
            start(max_mb=max(16, 8 * sum(4 + len(r.neurons) for r in trace) / 2**20))
        reset_stats()
        try:
            for r in trace:
                if handle is not None and r.handle != handle:
                    continue
                if r.layer >= n_layers:
                    raise ValueError(f"{path}: trace refers to layer {r.layer}, the file has {n_layers}")
                st.fetch(r.layer, r.neurons, r.n_tokens)
            out: Dict[str, object] = dict(stats())
        finally:
            if log:
                binding.trace_stop()
        if log:
            out["iolog"] = read_iolog()
        return out


