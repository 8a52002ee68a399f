"""Activations captured through llama.cpp itself, for the offline stage.

The source model runs on stock llama.cpp with the scheduler's eval callback (``cb_eval``) set to
the native ``ripple_capture_eval``: after each decode, every FFN layer's input (the ``ffn_up``
matmul's input) and post-activation vector (the ``ffn_down`` matmul's input) sit in numpy buffers
owned here. Works for any architecture the runtime supports (the tensors are found by name).

Text becomes token chunks of ``chunk_tokens`` tokens (each decoded in a fresh context), so memory
stays bounded however long the corpus: callers stream statistics chunk by chunk.
"""
from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .. import binding
from ..format.layout import RippleFormatError, ffn_layers_of
from ..format.reader import read_gguf_header


class ProfileError(ValueError):
    """Calibration text or model unusable for profiling (the message names which and why)."""


@dataclass
class Chunk:
    """One decoded chunk: per FFN block, the inputs x (T, n_embd) and post-activations h (T, n_ff).
    The arrays are views into reused buffers, valid until the next chunk."""

    n_tokens: int
    x: Dict[int, np.ndarray]
    h: Dict[int, np.ndarray]
    g: Dict[int, np.ndarray]  # gate pre-activations (T, n_ff) of gated layers only


def calibration_text_default() -> Tuple[str, str]:
    """(name, text): the start of CPython's ``pydoc_data.topics`` in sorted key order (the
    held-out evaluation text, :func:`ripple_gguf.offline.quality.heldout_text`, comes from the end)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    half = keys[: len(keys) // 2]
    return "pydoc_data.topics[:%d]" % len(half), "\n".join(topics[k] for k in half)


def read_text(path: os.PathLike) -> str:
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ProfileError(f"{p}: cannot read calibration text: {e.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProfileError(f"{p}: calibration text is not UTF-8 (byte {e.start}: {e.reason})") from None


# What calibration text must hold to be "real text" (docs: README, --calib): control characters
# (NUL and the like; tab and line breaks excepted) at most CONTROL_MAX of the characters, at least
# MIN_DISTINCT_TOKENS different tokens (English in a byte-level vocabulary has ~40 in 500 tokens),
# no token more than TOP_TOKEN_MAX of them. A model profiled on NUL bytes or one repeated token
# learns nothing about its activations on text.
CONTROL_MAX = 0.05
MIN_DISTINCT_TOKENS = 16
TOP_TOKEN_MAX = 0.5
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")


def check_text(name: str, text: str) -> None:
    """Raise ProfileError naming ``name`` when ``text`` is empty or mostly control characters."""
    if not text.strip():
        raise ProfileError(f"{name}: calibration text is empty")
    ctrl = len(_CONTROL.findall(text))
    if ctrl > CONTROL_MAX * len(text):
        raise ProfileError(f"{name}: calibration text is {ctrl / len(text):.0%} control characters (NUL bytes?), "
                           f"at most {CONTROL_MAX:.0%} allowed: not text")


def check_tokens(names: str, tokens: Sequence[int]) -> None:
    """Raise ProfileError naming ``names`` unless ``tokens`` are varied enough to be real text."""
    counts = np.unique(np.asarray(tokens, dtype=np.int64), return_counts=True)[1]
    if counts.max() > TOP_TOKEN_MAX * len(tokens):
        raise ProfileError(f"{names}: one token is {counts.max() / len(tokens):.0%} of the calibration tokens "
                           f"(at most {TOP_TOKEN_MAX:.0%}): too little real text")
    if len(counts) < MIN_DISTINCT_TOKENS:
        raise ProfileError(f"{names}: the calibration tokens hold {len(counts)} distinct tokens, at least "
                           f"{MIN_DISTINCT_TOKENS} needed: too little real text")


def tokenize_chunks(model_path: os.PathLike, texts: Sequence[Tuple[str, str]], n_tokens: int,
                    chunk_tokens: int) -> List[List[int]]:
    """Token chunks (BOS first) from ``texts`` = [(name, text)], ``n_tokens`` in all."""
    import llama_cpp

    if n_tokens < chunk_tokens:
        raise ProfileError(f"--calib-tokens {n_tokens} is below one chunk of {chunk_tokens} tokens")
    llm = llama_cpp.Llama(model_path=os.fspath(model_path), vocab_only=True, verbose=False)
    try:
        chunks: List[List[int]] = []
        have = 0
        for name, text in texts:
            check_text(name, text)
            toks = llm.tokenize(text.encode("utf-8"), add_bos=False)
            for i in range(0, len(toks) - (chunk_tokens - 1) + 1, chunk_tokens - 1):
                if have >= n_tokens:
                    break
                chunks.append([llm.token_bos()] + toks[i:i + chunk_tokens - 1])
                have += chunk_tokens
        if have < n_tokens:
            names = ", ".join(n for n, _ in texts)
            raise ProfileError(f"calibration text too short: {names} give {have} tokens in chunks of "
                               f"{chunk_tokens}, {n_tokens} wanted (lower --calib-tokens or add text)")
        return chunks
    finally:
        llm.close()


class EvalContext:
    """A stock llama.cpp context on a plain GGUF with a native scheduler eval callback (the
    addresses of the function and of its user data, e.g. a :class:`ripple_gguf.binding.Capture`'s);
    every position of a chunk is an output (llama.cpp otherwise computes the last layer for the last
    token only)."""

    def __init__(self, model_path: os.PathLike, callback: int, user_data: int, *, chunk_tokens: int = 256,
                 n_threads: Optional[int] = None):
        import llama_cpp.llama_cpp as L

        self._L = L
        self.path = os.fspath(model_path)
        self.chunk_tokens = chunk_tokens
        self._model = self._ctx = self._batch = None
        self._model = L.llama_model_load_from_file(self.path.encode(), L.llama_model_default_params())
        if not self._model:
            raise RippleFormatError(self.path, "llama.cpp could not load the model")
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = chunk_tokens
        cp.n_threads = cp.n_threads_batch = n_threads or max(1, os.cpu_count() or 1)
        cp.cb_eval = ctypes.cast(ctypes.c_void_p(callback), L.ggml_backend_sched_eval_callback)
        cp.cb_eval_user_data = ctypes.c_void_p(user_data)
        self._ctx = L.llama_init_from_model(self._model, cp)
        if not self._ctx:
            self.close()
            raise RippleFormatError(self.path, "llama.cpp could not create a context")
        self._batch = L.llama_batch_init(chunk_tokens, 0, 1)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self._model))

    def decode(self, tokens: Sequence[int]) -> None:
        L = self._L
        n = len(tokens)
        if not 0 < n <= self.chunk_tokens:
            raise ValueError(f"a chunk holds 1..{self.chunk_tokens} tokens, got {n}")
        L.llama_memory_clear(L.llama_get_memory(self._ctx), True)
        batch = self._batch
        batch.n_tokens = n
        for i, t in enumerate(tokens):
            batch.token[i] = t
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        rc = L.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"{self.path}: llama_decode failed ({rc})")

    def logits(self, n: int) -> np.ndarray:
        """(n, n_vocab) logits of the last decode."""
        ptr = self._L.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n * self.n_vocab,)).reshape(n, self.n_vocab).copy()

    def close(self) -> None:
        L = self._L
        if self._batch is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            L.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            L.llama_model_free(self._model)
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class ActivationCapture:
    """Captures, per FFN layer, inputs, post-activations and gate pre-activations (see Chunk)."""

    def __init__(self, model_path: os.PathLike, *, chunk_tokens: int = 256, n_threads: Optional[int] = None):
        self.path = os.fspath(model_path)
        hdr = read_gguf_header(self.path)
        self.blocks = ffn_layers_of(hdr)
        if not self.blocks:
            raise RippleFormatError(self.path, "no FFN layers (blk.N.ffn_up/ffn_down) to profile")
        self.n_ff: Dict[int, int] = {}
        self.n_embd: Dict[int, int] = {}
        self.gated = {b for b in self.blocks if hdr.tensor(f"blk.{b}.ffn_gate.weight") is not None}
        for b in self.blocks:
            down = hdr.tensor(f"blk.{b}.ffn_down.weight")
            up = hdr.tensor(f"blk.{b}.ffn_up.weight")
            if down is None or up is None:
                raise RippleFormatError(self.path, f"layer {b}: ffn_up or ffn_down missing")
            self.n_embd[b], self.n_ff[b] = int(up.shape[0]), int(up.shape[1])
        self.chunk_tokens = chunk_tokens
        self._x = {b: np.zeros((chunk_tokens, self.n_embd[b]), np.float32) for b in self.blocks}
        self._h = {b: np.zeros((chunk_tokens, self.n_ff[b]), np.float32) for b in self.blocks}
        self._g = {b: np.zeros((chunk_tokens, self.n_ff[b]), np.float32) for b in self.gated}
        self._cap = binding.Capture(chunk_tokens, self._x, self._h, self._g)
        self._ctx = EvalContext(self.path, self._cap.callback, self._cap.user_data, chunk_tokens=chunk_tokens,
                                n_threads=n_threads)

    def run(self, tokens: Sequence[int]) -> Chunk:
        n = len(tokens)
        self._cap.clear()
        self._ctx.decode(tokens)
        if self._cap.errors:
            raise RuntimeError(f"{self.path}: {self._cap.errors} FFN activations had an unexpected shape or type")

        def captured(b: int) -> bool:
            x_rows, h_rows, g_rows = self._cap.rows(b)
            return x_rows == n and h_rows == n and (b not in self.gated or g_rows == n)

        missing = [b for b in self.blocks if not captured(b)]
        if missing:
            raise RippleFormatError(self.path, f"no FFN activations captured for layers {missing[:5]} "
                                               "(architecture computes its FFN without ffn_up/ffn_down matmuls?)")
        return Chunk(n, {b: self._x[b][:n] for b in self.blocks}, {b: self._h[b][:n] for b in self.blocks},
                     {b: self._g[b][:n] for b in self.gated})

    def iterate(self, chunks: Iterable[Sequence[int]]) -> Iterator[Chunk]:
        for c in chunks:
            yield self.run(c)

    def close(self) -> None:
        if getattr(self, "_ctx", None) is not None:
            self._ctx.close()
            self._ctx = None

    def __enter__(self) -> "ActivationCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
