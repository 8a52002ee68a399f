"""Synthetic inputs for benchmarks and tests: random-weight llama models with the proportions of
real ones, for speed at a realistic scale; and activation masks with co-activation structure, for
placement (:class:`TopicModel`, at the end).

SmolLM2-135M's FFN is under half of its file and a process's own overheads are as large as its
weights; a 1B llama's FFN is about two thirds of its weights. :data:`SHAPES` ``["1b"]`` is
TinyLlama-1.1B's shape (n_embd 2048, n_ff 5632, 22 layers, 32 heads, 4 KV heads, 32,000 tokens).
Every matrix is Q4_1 (ggml's own quantizer; not Q4_0, which llama.cpp's CPU backend repacks into
anonymous memory at load on AVX2/AVX-512 machines, so stock would not page its weights through the
file mapping at all) of normal values with std 0.02, the norms are ones, so
activations stay finite; the weights carry no structure, so the model says nothing about
co-activation or predictors (its perplexity is that of noise), only about the bytes and the
compute a model of this size costs.

The vocabulary is a usable SentencePiece-style ("llama") one: <unk>, <s>, </s>, the 256 byte
tokens, then the most frequent whitespace-delimited pieces of CPython's ``pydoc_data.topics``
(every substring of "▁word" up to 16 characters, ranked by frequency, so each piece's substrings
rank before it and llama.cpp's merges reach every piece): text tokenizes to ids across the whole
vocabulary, as with a trained tokenizer.

:func:`ensure` writes a model once into a directory under a name keyed by everything that
decides its bytes (shape, seed, weight type, vocabulary, this builder's version) and reuses it.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np

from .machine import progress

# bump when the bytes written for the same inputs change (cached models are then rebuilt)
BUILDER_VERSION = 1
WEIGHT_STD = 0.02
MAX_PIECE = 16  # characters of the longest vocabulary piece


@dataclasses.dataclass(frozen=True)
class Shape:
    """A llama model's hyperparameters (the FFN is gated: gate, up, down)."""

    n_embd: int
    n_ff: int
    n_layers: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ctx: int = 2048

    def __post_init__(self):
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise ValueError(f"{self}: n_embd must be a multiple of n_head, and n_head of n_head_kv")
        if self.n_embd % 32 or self.n_ff % 32:
            raise ValueError(f"{self}: Q4_1 rows (of n_embd or n_ff values) are whole blocks of 32 values")
        if self.n_vocab < 259:
            raise ValueError(f"{self}: the vocabulary holds at least <unk>, <s>, </s> and 256 byte tokens")

    @property
    def n_embd_kv(self) -> int:
        return self.n_embd // self.n_head * self.n_head_kv

    @property
    def ffn_params(self) -> int:
        return self.n_layers * 3 * self.n_embd * self.n_ff

    @property
    def n_params(self) -> int:
        attn = 2 * self.n_embd * self.n_embd + 2 * self.n_embd * self.n_embd_kv
        norms = self.n_layers * 2 * self.n_embd + self.n_embd
        return 2 * self.n_vocab * self.n_embd + self.n_layers * attn + self.ffn_params + norms


# TinyLlama-1.1B: FFN 69% of the weights
SHAPES: Dict[str, Shape] = {"1b": Shape(n_embd=2048, n_ff=5632, n_layers=22, n_head=32, n_head_kv=4, n_vocab=32000)}


def vocabulary(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of ``n_vocab`` entries (see the module docstring)."""
    import gguf
    from pydoc_data.topics import topics

    words = collections.Counter("\n".join(topics[k] for k in sorted(topics)).split())
    counts: collections.Counter = collections.Counter()
    for w, c in words.items():
        p = "\u2581" + w
        for i in range(len(p)):
            for j in range(i + 1, min(len(p), i + MAX_PIECE) + 1):
                counts[p[i:j]] += c
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    taken = set(tokens)
    # a piece never outranks its substrings (their counts are at least its own): ties go to the shorter
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))
    pieces = [p for p, _ in ranked if p not in taken][:n_vocab - len(tokens)]
    if len(tokens) + len(pieces) < n_vocab:
        raise ValueError(f"the text yields only {len(tokens) + len(pieces)} vocabulary entries, {n_vocab} wanted")
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(pieces))]
    return tokens + pieces, scores, [int(t) for t in types] + [int(gguf.TokenType.NORMAL)] * len(pieces)


def _tensors(shape: Shape):
    """(name, numpy shape (rows, columns), quantized) in file order."""
    e, kv, ff = shape.n_embd, shape.n_embd_kv, shape.n_ff
    yield "token_embd.weight", (shape.n_vocab, e), True
    for i in range(shape.n_layers):
        b = f"blk.{i}"
        yield f"{b}.attn_norm.weight", (e,), False
        yield f"{b}.attn_q.weight", (e, e), True
        yield f"{b}.attn_k.weight", (kv, e), True
        yield f"{b}.attn_v.weight", (kv, e), True
        yield f"{b}.attn_output.weight", (e, e), True
        yield f"{b}.ffn_norm.weight", (e,), False
        yield f"{b}.ffn_gate.weight", (ff, e), True
        yield f"{b}.ffn_up.weight", (ff, e), True
        yield f"{b}.ffn_down.weight", (e, ff), True
    yield "output_norm.weight", (e,), False
    yield "output.weight", (shape.n_vocab, e), True


def write_model(path: os.PathLike, shape: Shape, *, seed: int = 0,
                progress: Optional[Callable[[str], None]] = None) -> Path:
    """Write the model to ``path`` (atomically); the matrices are generated and quantized in row
    chunks and streamed to the file, so memory stays far below the model's size."""
    import gguf

    from .. import binding
    from ..atomic import atomic_output

    q4_1 = int(gguf.GGMLQuantizationType.Q4_1)
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary(shape.n_vocab)
    specs = list(_tensors(shape))
    with atomic_output(path) as tmp:
        wr = gguf.GGUFWriter(tmp, "llama")
        wr.add_name("synthetic-llama")
        wr.add_context_length(shape.n_ctx)
        wr.add_embedding_length(shape.n_embd)
        wr.add_block_count(shape.n_layers)
        wr.add_feed_forward_length(shape.n_ff)
        wr.add_head_count(shape.n_head)
        wr.add_head_count_kv(shape.n_head_kv)
        wr.add_layer_norm_rms_eps(1e-5)
        wr.add_rope_dimension_count(shape.n_embd // shape.n_head)
        wr.add_file_type(3)  # LLAMA_FTYPE_MOSTLY_Q4_1
        wr.add_tokenizer_model("llama")
        wr.add_token_list(tokens)
        wr.add_token_scores(scores)
        wr.add_token_types(types)
        wr.add_bos_token_id(1)
        wr.add_eos_token_id(2)
        wr.add_unk_token_id(0)
        for name, dims, quantized in specs:
            if quantized:
                wr.add_tensor_info(name, dims, np.dtype(np.float32), dims[0] * binding.row_size(q4_1, dims[1]),
                                   raw_dtype=gguf.GGMLQuantizationType.Q4_1)
            else:
                wr.add_tensor_info(name, dims, np.dtype(np.float32), 4 * dims[0])
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_ti_data_to_file()
        t0 = time.perf_counter()
        for name, dims, quantized in specs:
            if not quantized:
                wr.write_tensor_data(np.ones(dims, dtype=np.float32))
                continue
            rows, cols = dims
            out = np.empty((rows, binding.row_size(q4_1, cols)), dtype=np.uint8)
            step = max(1, (1 << 22) // cols)  # 16 MiB of float32 at a time
            for r in range(0, rows, step):
                x = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32)
                x *= WEIGHT_STD
                out[r:r + len(x)] = binding.quantize(q4_1, x)
            wr.write_tensor_data(out)
            if progress is not None and name.endswith(".ffn_down.weight"):
                layer = int(name.split(".")[1])
                progress(f"layer {layer + 1}/{shape.n_layers} written ({time.perf_counter() - t0:.0f} s)")
        wr.close()
    return Path(path)


def model_key(shape: Shape, seed: int = 0) -> str:
    """12 hex digits of a hash of everything that decides the model's bytes."""
    vocab = hashlib.sha256("\0".join(vocabulary(shape.n_vocab)[0]).encode()).hexdigest()
    blob = json.dumps([BUILDER_VERSION, dataclasses.asdict(shape), seed, "Q4_1", WEIGHT_STD, vocab], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure(shape: Union[str, Shape], work_dir: os.PathLike, *, seed: int = 0, quiet: bool = False) -> Path:
    """Path of the model of ``shape`` (a name in :data:`SHAPES` or a :class:`Shape`) in
    ``work_dir``, written there first when missing (``synthetic-<name>.<key>.gguf``)."""
    name = shape if isinstance(shape, str) else "llama"
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"synthetic model {shape!r}: choose from {', '.join(SHAPES)}")
        shape = SHAPES[shape]
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"synthetic-{name}.{model_key(shape, seed)}.gguf"
    if path.exists():  # written atomically: present means complete
        return path
    say = lambda msg: progress(f"synthetic {name}: {msg}", quiet)
    say(f"writing {path.name}: {shape.n_params / 1e6:,.0f} M random Q4_1 weights "
        f"(FFN {shape.ffn_params / shape.n_params:.0%}), {shape.n_layers} layers")
    write_model(path, shape, seed=seed, progress=say)
    say(f"{path.stat().st_size / 2**20:.0f} MiB written")
    return path


# ---- activation masks with co-activation structure (placement tests, scripts/bench_placement.py) ----
#
# A layer has ``n_topics`` topics, each a random group of ``group`` neurons (groups may overlap).
# Each token picks ``topics_per_token`` topics; every neuron of a picked topic fires with
# probability ``keep``, and every other neuron with probability ``noise``. Draws from one
# :class:`TopicModel` share the topics, so one draw calibrates and another evaluates.

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
