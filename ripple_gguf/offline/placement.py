"""Neuron placement: the order in which a layer's bundles are stored, and how good an order is.

An order is an int32 array of length n where ``order[p]`` is the neuron id stored at position p
(the ``ripple.placement.order`` slice of a layer). Three methods:

- ``original``: the identity (what "LLM in a flash" reads);
- ``frequency``: decreasing activation frequency, ties by neuron id (Neuralink-S);
- ``ripple``: the greedy Hamiltonian path (multi-fragment heuristic) over co-activation counts
  f(i, j), computed in C (``csrc/ripple_placement.c``). Pairs are taken in decreasing f(i, j),
  ties by (i, j); a pair joins two fragments when both neurons are endpoints (degree < 2) of
  different fragments; pairs with f(i, j) = 0 never join. The fragments left at the end (their
  endpoints never co-activate across fragments) are concatenated by their most frequent member,
  descending (ties: smaller id), each walked from its more frequent endpoint (ties: smaller id).
  An all-zero matrix therefore gives the identity.

No refinement (2-opt / or-opt) follows the greedy path: none was measured to shorten reads on
held-out activations yet, so none is applied.

Quality: :func:`run_stats` / :class:`RunStats` count, for activation masks (tokens x neurons, in
neuron-id order), the contiguous runs of needed positions, i.e. the reads a token costs before any
caching or access collapse.
"""
from __future__ import annotations

from typing import Iterable, Union

import numpy as np

from .. import binding

METHODS = ("original", "frequency", "ripple")
MAX_NEURONS = 65535  # the C sort packs a pair (i, j) into a uint32 i*n+j


def original_order(n: int) -> np.ndarray:
    """The identity order of ``n`` neurons."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return np.arange(n, dtype=np.int32)


def frequency_order(freq: np.ndarray) -> np.ndarray:
    """Neurons by decreasing ``freq`` (tokens on which each was active), ties by neuron id."""
    freq = np.asarray(freq)
    if freq.ndim != 1:
        raise ValueError(f"freq must be 1-D, got shape {freq.shape}")
    # stable sort of the negated counts keeps equal counts in id order
    return np.argsort(-freq.astype(np.int64), kind="stable").astype(np.int32)


def _counts_u32(co: np.ndarray) -> np.ndarray:
    """``co`` as a C-contiguous uint32 matrix, without a copy when it already is one (or int32)."""
    co = np.asarray(co)
    if co.ndim != 2 or co.shape[0] != co.shape[1]:
        raise ValueError(f"co must be a square matrix, got shape {co.shape}")
    if co.dtype == np.uint32:
        return np.ascontiguousarray(co)
    if co.size and co.min() < 0:
        raise ValueError("co holds negative counts")
    if co.dtype.kind in "iu":
        if co.size and co.max() > np.iinfo(np.uint32).max:
            raise ValueError("co holds counts above 2**32 - 1")
        if co.dtype.itemsize == 4:
            return np.ascontiguousarray(co).view(np.uint32)
        return np.ascontiguousarray(co, dtype=np.uint32)
    if co.dtype.kind == "f":
        # float counts (e.g. accumulated by a BLAS product) must still be whole numbers
        if co.size and co.max() > np.iinfo(np.uint32).max:
            raise ValueError("co holds counts above 2**32 - 1")
        out = np.ascontiguousarray(co, dtype=np.uint32)
        if not np.array_equal(out, co):
            raise ValueError("co holds non-integer values: pass co-activation counts")
        return out
    raise ValueError(f"co has unsupported dtype {co.dtype}")


def ripple_order(co: np.ndarray) -> np.ndarray:
    """The greedy Hamiltonian path over co-activation counts ``co`` (n x n, symmetric, diagonal =
    frequency; int32, uint32, int64 or integer-valued float32). Only the upper triangle and the
    diagonal are read. Returns the int32 order (module docstring for the conventions)."""
    co = _counts_u32(co)
    n = co.shape[0]
    if n > MAX_NEURONS:
        raise ValueError(f"ripple placement supports at most {MAX_NEURONS} neurons per layer, got {n}")
    return binding.greedy_path(co)


def placements(method: str, freq: np.ndarray | None, co: np.ndarray | None, n: int) -> np.ndarray:
    """The order of ``n`` neurons by ``method`` (one of :data:`METHODS`); ``frequency`` needs
    ``freq``, ``ripple`` needs ``co``."""
    if method == "original":
        order = original_order(n)
    elif method == "frequency":
        if freq is None:
            raise ValueError("frequency placement needs freq")
        order = frequency_order(freq)
    elif method == "ripple":
        if co is None:
            raise ValueError("ripple placement needs co")
        order = ripple_order(co)
    else:
        raise ValueError(f"unknown placement method {method!r} (choose from {', '.join(METHODS)})")
    if order.shape != (n,):
        raise ValueError(f"{method} placement: inputs describe {order.shape[0]} neurons, expected {n}")
    return order


def adjacent_coactivation(co: np.ndarray, order: np.ndarray) -> int:
    """The objective the ripple path greedily maximises: sum of co[order[p], order[p+1]]."""
    order = np.asarray(order)
    if order.size < 2:
        return 0
    return int(np.asarray(co)[order[:-1], order[1:]].astype(np.int64).sum())


def check_order(order: np.ndarray, n: int) -> None:
    """Raise ValueError unless ``order`` is a permutation of range(n)."""
    order = np.asarray(order)
    if order.shape != (n,):
        raise ValueError(f"order has shape {order.shape}, expected ({n},)")
    if n and (order.min() < 0 or order.max() >= n or np.bincount(order, minlength=n).max() != 1):
        raise ValueError("order is not a permutation: some neuron is missing or repeated")


class RunStats:
    """Streaming run statistics of activation masks under one order.

    ``add(masks)`` takes a bool array (tokens x n) in neuron-id order; ``result()`` returns the
    totals so far (see :func:`run_stats`). Masks are never stored.
    """

    _CHUNK_CELLS = 1 << 24  # bounds the int8 scratch of one add() step

    def __init__(self, order: np.ndarray):
        order = np.asarray(order)
        check_order(order, order.shape[0] if order.ndim == 1 else -1)
        self.order = order.astype(np.intp)
        self.n = order.shape[0]
        self.tokens = 0
        self.needed = 0
        self.runs = 0
        self.hist = np.zeros(1, dtype=np.int64)  # hist[L] = runs of length L

    def add(self, masks: np.ndarray) -> None:
        masks = np.asarray(masks)
        if masks.ndim == 1:
            masks = masks[None, :]
        if masks.ndim != 2 or masks.shape[1] != self.n:
            raise ValueError(f"masks must be (tokens, {self.n}), got shape {masks.shape}")
        self.tokens += masks.shape[0]
        if self.n == 0:
            return
        step = max(1, self._CHUNK_CELLS // self.n)
        for lo in range(0, masks.shape[0], step):
            self._add_chunk(masks[lo:lo + step])

    def _add_chunk(self, masks: np.ndarray) -> None:
        t = masks.shape[0]
        # columns in placement order, one False column either side: each run is one +1 (start)
        # and one -1 (end) in the row's diff, and rows cannot run into each other
        placed = np.zeros((t, self.n + 2), dtype=np.int8)
        placed[:, 1:-1] = masks[:, self.order] != 0
        edges = np.diff(placed, axis=1).ravel()
        starts = np.flatnonzero(edges == 1)
        ends = np.flatnonzero(edges == -1)
        if starts.size == 0:
            return
        lengths = ends - starts
        self.needed += int(lengths.sum())
        self.runs += int(lengths.size)
        h = np.bincount(lengths)
        if h.size > self.hist.size:
            h[: self.hist.size] += self.hist
            self.hist = h.astype(np.int64)
        else:
            self.hist[: h.size] += h

    def result(self) -> dict:
        """``tokens``, ``needed`` (bundles, summed over tokens), ``runs`` (reads), ``mean_run_length``
        (needed / runs; 0 without runs), ``max_run_length``, ``reads_per_token``,
        ``needed_per_token`` (0 without tokens) and ``run_length_hist`` (int64 array, entry L =
        number of runs of length L)."""
        nonzero = np.flatnonzero(self.hist)
        return {
            "tokens": self.tokens,
            "needed": self.needed,
            "runs": self.runs,
            "mean_run_length": self.needed / self.runs if self.runs else 0.0,
            "max_run_length": int(nonzero[-1]) if nonzero.size else 0,
            "reads_per_token": self.runs / self.tokens if self.tokens else 0.0,
            "needed_per_token": self.needed / self.tokens if self.tokens else 0.0,
            "run_length_hist": self.hist.copy(),
        }


def run_stats(masks: Union[np.ndarray, Iterable[np.ndarray]], order: np.ndarray) -> dict:
    """Run statistics of ``masks`` (one bool array tokens x n, or an iterable of such batches)
    placed in ``order``: a token needs the positions of its active neurons, and every maximal
    set of consecutive positions is one read. See :meth:`RunStats.result` for the fields."""
    acc = RunStats(order)
    if isinstance(masks, np.ndarray):
        masks = (masks,)
    for batch in masks:
        acc.add(batch)
    return acc.result()
