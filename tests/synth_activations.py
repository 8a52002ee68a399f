"""Synthetic activation masks with co-activation structure: fixtures for placement tests and
scripts/bench_placement.py.

A layer has ``n_topics`` topics, each a random group of ``group`` neurons (groups may overlap).
Each token picks ``topics_per_token`` topics; every neuron of a picked topic fires with
probability ``keep``, and every other neuron with probability ``noise``. Draws from one
:class:`TopicModel` share the topics, so one draw calibrates and another evaluates.
"""
from __future__ import annotations

import numpy as np


class TopicModel:
    def __init__(self, n: int, n_topics: int = 64, group: int = 32, *, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.n = n
        self.groups = np.stack([rng.choice(n, size=group, replace=False) for _ in range(n_topics)])
        # a skewed topic popularity, as real text has
        w = 1.0 / np.arange(1, n_topics + 1)
        self.topic_p = w / w.sum()

    def masks(self, tokens: int, *, topics_per_token: int = 3, keep: float = 0.9,
              noise: float = 0.003, seed: int = 1) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = rng.random((tokens, self.n)) < noise
        picks = rng.choice(len(self.groups), size=(tokens, topics_per_token), p=self.topic_p)
        cols = self.groups[picks].reshape(tokens, -1)
        rows = np.repeat(np.arange(tokens), cols.shape[1])
        fire = rng.random(cols.size) < keep
        out[rows[fire], cols.reshape(-1)[fire]] = True
        return out


def counts(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(freq int64, co uint32) of bool masks (tokens x n): co = masks^T masks, exact in float32
    below 2**24 tokens."""
    m = masks.astype(np.float32)
    co = (m.T @ m).astype(np.uint32)
    return masks.sum(axis=0, dtype=np.int64), co
