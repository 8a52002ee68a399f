"""Per-layer activation predictor: which FFN neurons a token needs (Deja Vu / LLM in a flash style).

A predictor looks at the FFN input ``x`` of a layer (the ``ffn_norm`` output, ``n_embd`` floats) and
predicts the set of active neurons (|post-activation| above the layer's activity threshold)::

    z = (x - x_shift) * x_scale                  per feature, float32: the standardised input
    logits = relu(z @ W1 + b1) @ W2 + b2        W1: (n_embd, rank), W2: (rank, n_ff)
    active = logits > threshold                  one scalar per layer

It is trained with numpy only (Adam, minibatches, binary cross-entropy; see ``train``) on inputs
standardised per feature; the standardisation (mean and inverse standard deviation, float32) is
stored with the predictor and applied at run time, so the stored weights are the trained ones:
nothing grows with the scale of the model's activations (FFN inputs of gemma-family models span
ten orders of magnitude; folding 1/std into float16 weights overflowed). The weights are rounded
to float16 *before* the threshold is tuned: the threshold is tuned on exactly the weights the file
holds, and the predictor read back with ``from_bytes`` is bit-identical to the one validated.

Binary layout (``Predictor.to_bytes``), all little-endian
----------------------------------------------------------
One predictor = one blob, its size a multiple of 64 bytes. Every section starts at a multiple of 64
bytes from the start of the blob; the bytes between sections and at the end are zero.

====== ========================= =============================================================
offset field                     meaning
====== ========================= =============================================================
0      char[4] magic             ``b"RPRD"``
4      u32 version               2 (version 1, without the standardisation, is refused)
8      u32 n_embd                input width
12     u32 n_ff                  number of neurons (outputs)
16     u32 rank                  hidden width r
20     f32 threshold             neuron i is predicted active iff logit_i > threshold
24     u32 blob_size             total size of this blob in bytes (multiple of 64)
28     u8[36]                    zero
64     f32 x_shift[n_embd]       subtracted from x
o_sc   f32 x_scale[n_embd]       o_sc = 64 + pad64(4 * n_embd); multiplies x - x_shift
o_W1   f16 W1T[rank][n_embd]     o_W1 = o_sc + pad64(4 * n_embd); row j: the weights of hidden unit j
o_b1   f32 b1[rank]              o_b1 = o_W1 + pad64(2 * rank * n_embd)
o_W2   f16 W2T[n_ff][rank]       W2 transposed: row i holds the r weights of neuron i
o_b2   f32 b2[n_ff]              o_b2 = o_W2 + pad64(2 * n_ff * rank)
====== ========================= =============================================================

with ``o_W2 = o_b1 + pad64(4 * rank)``, ``blob_size = o_b2 + pad64(4 * n_ff)`` and
``pad64(n) = (n + 63) & ~63``. Both matrices are stored so that every output is one contiguous
dot product: hidden unit j is ``h_j = max(0, dot(W1T[j], z) + b1[j])`` (an n_embd-length dot
product), logit i is ``dot(W2T[i], h) + b2[i]`` (an r-length dot product), so a C kernel computes
the r hidden units and then any subset of the n_ff logits row by row. Accumulate in float32.
Every stored value is finite (``to_bytes`` refuses otherwise).
"""
from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

MAGIC = b"RPRD"
VERSION = 2  # 2: per-feature input standardisation stored (x_shift, x_scale)
HEADER_SIZE = 64
_HEADER = struct.Struct("<4sIIIIfI")

# Defaults measured on SmolLM2-135M (30 layers, n_embd 576, n_ff 1536, ~7.4k training tokens per layer):
# rank 128 cuts over-prediction by only ~5% against rank 64 at twice the cost; plain BCE beat
# per-neuron pos_weight and focal loss (the tuned threshold already handles the imbalance; so BCE only);
# lr 8e-3 beat 1e-3..4e-3. ~0.8 s per layer on 2 idle cores. Fitting to the strongly activated
# neurons only (``Y_fit``, the offline stage's top 25% of |h|) is what helped most: sparse-mode
# perplexity +2.3% instead of +14.8% at ~86% of the bundles (docs/BENCHMARKS.md).
DEFAULT_RANK = 64
DEFAULT_EPOCHS = 12
DEFAULT_BATCH = 256
DEFAULT_LR = 8e-3


def _pad64(n: int) -> int:
    return (n + 63) & ~63


def _layout(n_embd: int, n_ff: int, rank: int) -> Tuple[int, int, int, int, int, int]:
    """(o_scale, o_W1, o_b1, o_W2, o_b2, blob_size) of the binary layout (x_shift at HEADER_SIZE)."""
    o_sc = HEADER_SIZE + _pad64(4 * n_embd)
    o_w1 = o_sc + _pad64(4 * n_embd)
    o_b1 = o_w1 + _pad64(2 * rank * n_embd)
    o_w2 = o_b1 + _pad64(4 * rank)
    o_b2 = o_w2 + _pad64(2 * n_ff * rank)
    return o_sc, o_w1, o_b1, o_w2, o_b2, o_b2 + _pad64(4 * n_ff)


@dataclass
class Predictor:
    """One layer's predictor. W1 (n_embd, rank), b1 (rank,), W2 (rank, n_ff), b2 (n_ff,), x_shift and
    x_scale (n_embd,; default: no standardisation), float32."""

    rank: int
    n_embd: int
    n_ff: int
    W1: np.ndarray
    b1: np.ndarray
    W2: np.ndarray
    b2: np.ndarray
    threshold: float = 0.0
    x_shift: Optional[np.ndarray] = None
    x_scale: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.x_shift is None:
            self.x_shift = np.zeros(self.n_embd, np.float32)
        if self.x_scale is None:
            self.x_scale = np.ones(self.n_embd, np.float32)
        shapes = {"W1": (self.n_embd, self.rank), "b1": (self.rank,), "W2": (self.rank, self.n_ff),
                  "b2": (self.n_ff,), "x_shift": (self.n_embd,), "x_scale": (self.n_embd,)}
        for name, shape in shapes.items():
            a = np.asarray(getattr(self, name), dtype=np.float32)
            if a.shape != shape:
                raise ValueError(f"predictor {name}: shape {a.shape}, expected {shape}")
            setattr(self, name, a)
        self.threshold = float(np.float32(self.threshold))

    def logits(self, X: np.ndarray, *, chunk: int = 4096) -> np.ndarray:
        """(N, n_ff) float32 logits for X (N, n_embd)."""
        X = _as_features(X, self.n_embd, "X")
        out = np.empty((X.shape[0], self.n_ff), dtype=np.float32)
        for s in range(0, X.shape[0], chunk):
            z = X[s:s + chunk].astype(np.float32) - self.x_shift
            z *= self.x_scale
            h = z @ self.W1
            h += self.b1
            np.maximum(h, 0, out=h)
            np.matmul(h, self.W2, out=out[s:s + chunk])
            out[s:s + chunk] += self.b2
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(N, n_ff) bool: neurons predicted active."""
        return self.logits(X) > np.float32(self.threshold)

    def for_input_scale(self, s: float) -> "Predictor":
        """This predictor, trained on inputs ``x * s``, as one that takes x itself."""
        return Predictor(rank=self.rank, n_embd=self.n_embd, n_ff=self.n_ff, W1=self.W1, b1=self.b1, W2=self.W2,
                         b2=self.b2, threshold=self.threshold, x_shift=self.x_shift / np.float32(s),
                         x_scale=self.x_scale * np.float32(s))

    def nbytes(self) -> int:
        return _layout(self.n_embd, self.n_ff, self.rank)[-1]

    def check_finite(self) -> None:
        """Raise ValueError naming the first part that holds inf/nan or overflows float16."""
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold is {self.threshold}")
        for name in ("x_shift", "x_scale", "W1", "b1", "W2", "b2"):
            a = getattr(self, name)
            if not np.isfinite(a).all():
                raise ValueError(f"{name} holds inf or nan")
            if name in ("W1", "W2") and np.abs(a).max(initial=0) > np.finfo(np.float16).max:
                raise ValueError(f"{name} exceeds the float16 range it is stored in")

    def to_bytes(self) -> bytes:
        """The blob described in the module docstring (weights rounded to float16)."""
        self.check_finite()
        o_sc, o_w1, o_b1, o_w2, o_b2, size = _layout(self.n_embd, self.n_ff, self.rank)
        buf = bytearray(size)
        _HEADER.pack_into(buf, 0, MAGIC, VERSION, self.n_embd, self.n_ff, self.rank, self.threshold, size)
        for off, a in ((HEADER_SIZE, self.x_shift.astype("<f4")), (o_sc, self.x_scale.astype("<f4")),
                       (o_w1, self.W1.T.astype("<f2")), (o_b1, self.b1.astype("<f4")),
                       (o_w2, self.W2.T.astype("<f2")), (o_b2, self.b2.astype("<f4"))):
            raw = np.ascontiguousarray(a).tobytes()
            buf[off:off + len(raw)] = raw
        return bytes(buf)

    @classmethod
    def from_bytes(cls, b: bytes, n_embd: int, n_ff: int) -> "Predictor":
        """Read a blob written by ``to_bytes``; n_embd and n_ff are what the caller's layer expects."""
        if len(b) < HEADER_SIZE:
            raise ValueError(f"predictor blob: {len(b)} bytes, shorter than the {HEADER_SIZE}-byte header")
        magic, version, e, f, rank, threshold, size = _HEADER.unpack_from(b, 0)
        if magic != MAGIC:
            raise ValueError(f"predictor blob: magic {magic!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise ValueError(f"predictor blob: version {version}, this reader knows only version {VERSION} "
                             "(convert the model again)")
        if (e, f) != (n_embd, n_ff):
            raise ValueError(f"predictor blob: n_embd={e}, n_ff={f}; the layer has n_embd={n_embd}, n_ff={n_ff}")
        if rank == 0:
            raise ValueError("predictor blob: rank 0")
        o_sc, o_w1, o_b1, o_w2, o_b2, expect = _layout(e, f, rank)
        if size != expect or len(b) < size:
            raise ValueError(f"predictor blob: blob_size {size}, {len(b)} bytes given, layout needs {expect}")

        def arr(off, dtype, count):
            return np.frombuffer(b, dtype=dtype, count=count, offset=off).astype(np.float32)

        return cls(rank=rank, n_embd=e, n_ff=f,
                   x_shift=arr(HEADER_SIZE, "<f4", e), x_scale=arr(o_sc, "<f4", e),
                   W1=arr(o_w1, "<f2", rank * e).reshape(rank, e).T,
                   b1=arr(o_b1, "<f4", rank),
                   W2=arr(o_w2, "<f2", f * rank).reshape(f, rank).T,
                   b2=arr(o_b2, "<f4", f), threshold=threshold)


def metrics(pred_mask: np.ndarray, true_mask: np.ndarray) -> Dict[str, float]:
    """Counts over all (token, neuron) pairs: recall = |pred & true| / |true|, precision =
    |pred & true| / |pred|, over_prediction = |pred| / |true|, and the fractions of pairs predicted
    and truly active."""
    pred_mask = np.asarray(pred_mask, dtype=bool)
    true_mask = np.asarray(true_mask, dtype=bool)
    if pred_mask.shape != true_mask.shape:
        raise ValueError(f"metrics: predicted mask {pred_mask.shape} and true mask {true_mask.shape} differ")
    n = pred_mask.size
    n_true = int(np.count_nonzero(true_mask))
    n_pred = int(np.count_nonzero(pred_mask))
    n_both = int(np.count_nonzero(pred_mask & true_mask))
    return dict(recall=n_both / n_true if n_true else 1.0,
                precision=n_both / n_pred if n_pred else 1.0,
                over_prediction=n_pred / n_true if n_true else math.inf,
                predicted_fraction=n_pred / n if n else 0.0,
                true_fraction=n_true / n if n else 0.0)


def tune_threshold(logits: np.ndarray, true_mask: np.ndarray, recall_target: float) -> float:
    """The highest threshold (hence the smallest predicted set) with recall >= recall_target over
    all pairs, placed midway to the next lower logit so float rounding cannot flip the boundary."""
    _check_recall_target(recall_target)
    true_mask = np.asarray(true_mask, dtype=bool)
    if logits.shape != true_mask.shape:
        raise ValueError(f"tune_threshold: logits {logits.shape} and mask {true_mask.shape} differ")
    pos = np.sort(logits[true_mask])[::-1]
    if pos.size == 0:
        return float(np.float32(np.finfo(np.float32).max))  # nothing active: predict nothing
    k = math.ceil(recall_target * pos.size - 1e-9)
    k = min(max(k, 1), pos.size)
    edge = pos[k - 1]  # every logit >= edge must be predicted
    below = logits[logits < edge]
    lower = below.max() if below.size else edge - 1.0
    return float(np.float32((np.float64(edge) + np.float64(lower)) / 2))


def train(X: np.ndarray, Y: np.ndarray, *, rank: int = DEFAULT_RANK, n_ff: Optional[int] = None,
          recall_target: float = 0.95, seed: int = 0, epochs: int = DEFAULT_EPOCHS,
          batch: int = DEFAULT_BATCH, lr: float = DEFAULT_LR,
          val_fraction: float = 0.1, X_val: Optional[np.ndarray] = None,
          Y_val: Optional[np.ndarray] = None, Y_fit: Optional[np.ndarray] = None,
          ) -> Tuple[Predictor, Dict[str, float]]:
    """Train one layer's predictor on X (N, n_embd) -> Y (N, n_ff) and tune its threshold.

    Y is a bool mask, or ``np.packbits(mask, axis=1)`` (uint8) with ``n_ff`` given. Without
    X_val/Y_val the last ``val_fraction`` of the tokens is held out for threshold tuning (the tail,
    not a random sample: adjacent tokens are correlated, a tail is the more honest estimate).

    ``Y_fit`` (same shape and encoding as Y), when given, is the mask the loss is fitted to, while
    the threshold is still tuned to ``recall_target`` of Y: e.g. the most strongly activated
    neurons only (a subset of Y), which ranks the neurons a token must not miss above the barely
    active ones (measured on SmolLM2: docs/BENCHMARKS.md, sparse mode).

    Adam with a linearly decaying learning rate over ``epochs`` passes of shuffled minibatches on
    binary cross-entropy (the threshold handles the imbalance); the output biases start at the
    per-neuron log-odds of the training set. The result is deterministic for a seed.
    Returns the predictor and a metrics dict (validation metrics, threshold, timings)."""
    _check_recall_target(recall_target)
    if not (isinstance(rank, (int, np.integer)) and rank >= 1):
        raise ValueError(f"train: rank must be a positive integer, got {rank!r}")
    if epochs < 1 or batch < 1 or not lr > 0:
        raise ValueError(f"train: epochs ({epochs}), batch ({batch}) and lr ({lr}) must be positive")
    X = _as_features(X, None, "X")
    Y = _as_mask(Y, n_ff, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"train: X has {X.shape[0]} tokens, Y has {Y.shape[0]}")
    if Y_fit is not None:
        Y_fit = _as_mask(Y_fit, n_ff, "Y_fit")
        if Y_fit.shape != Y.shape:
            raise ValueError(f"train: Y_fit has shape {Y_fit.shape}, Y has {Y.shape}")
    n_embd, n_ff = X.shape[1], Y.shape[1]
    if (X_val is None) != (Y_val is None):
        raise ValueError("train: give both X_val and Y_val or neither")
    if X_val is not None:
        X_val = _as_features(X_val, n_embd, "X_val")
        Y_val = _as_mask(Y_val, n_ff, "Y_val")
        if X_val.shape[0] != Y_val.shape[0] or X_val.shape[0] == 0:
            raise ValueError(f"train: X_val has {X_val.shape[0]} tokens, Y_val has {Y_val.shape[0]}; "
                             "need the same positive number")
        X_tr, Y_tr = X, (Y if Y_fit is None else Y_fit)
    else:
        if not 0 < val_fraction < 1:
            raise ValueError(f"train: val_fraction must be in (0, 1), got {val_fraction}")
        n_val = int(round(X.shape[0] * val_fraction))
        if n_val < 1 or n_val >= X.shape[0]:
            raise ValueError(f"train: {X.shape[0]} tokens are too few to hold out {val_fraction:.0%} for validation")
        X_tr, Y_tr, X_val, Y_val = X[:-n_val], (Y if Y_fit is None else Y_fit)[:-n_val], X[-n_val:], Y[-n_val:]

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    mu, inv_sd = _standardisation(X_tr)
    Xf = X_tr.astype(np.float32)
    Xf -= mu
    Xf *= inv_sd
    p = Y_tr.mean(axis=0, dtype=np.float64).clip(1.0 / (Y_tr.shape[0] + 2), 1 - 1.0 / (Y_tr.shape[0] + 2))

    params = [(rng.standard_normal((n_embd, rank)) * math.sqrt(2.0 / n_embd)).astype(np.float32),
              np.zeros(rank, np.float32),
              (rng.standard_normal((rank, n_ff)) * math.sqrt(1.0 / rank)).astype(np.float32),
              np.log(p / (1 - p)).astype(np.float32)]
    m = [np.zeros_like(a) for a in params]
    v = [np.zeros_like(a) for a in params]
    b1_, b2_, eps = 0.9, 0.999, 1e-8
    n = Xf.shape[0]
    steps_per_epoch = math.ceil(n / batch)
    total_steps, step = epochs * steps_per_epoch, 0
    probe = np.linspace(0, n - 1, min(n, 1024)).astype(np.int64)  # fixed sample to report the loss on
    loss_first = _train_loss(params, Xf[probe], Y_tr[probe])
    for _ in range(epochs):
        order = rng.permutation(n)
        for s in range(0, n, batch):
            idx = np.sort(order[s:s + batch])
            xb, yb = Xf[idx], Y_tr[idx]
            W1, b1, W2, b2 = params
            z1 = xb @ W1
            z1 += b1
            a1 = np.maximum(z1, 0)
            lg = a1 @ W2
            lg += b2
            g = _bce_grad(lg, yb)
            g *= np.float32(1.0 / len(idx))
            da1 = g @ W2.T
            da1 *= z1 > 0
            grads = [xb.T @ da1, da1.sum(axis=0), a1.T @ g, g.sum(axis=0)]
            step += 1
            lr_t = lr * (1.0 - 0.9 * (step - 1) / max(total_steps - 1, 1))
            corr = math.sqrt(1 - b2_ ** step) / (1 - b1_ ** step)
            for a, gr, mm, vv in zip(params, grads, m, v):
                mm *= b1_
                mm += (1 - b1_) * gr
                vv *= b2_
                vv += (1 - b2_) * (gr * gr)
                a -= (lr_t * corr) * mm / (np.sqrt(vv) + eps)
    train_seconds = time.perf_counter() - t0
    loss_last = _train_loss(params, Xf[probe], Y_tr[probe])

    W1, b1, W2, b2 = params
    exact = Predictor(rank=rank, n_embd=n_embd, n_ff=n_ff, W1=W1, b1=b1, W2=W2, b2=b2, x_shift=mu, x_scale=inv_sd)
    pred = Predictor(rank=rank, n_embd=n_embd, n_ff=n_ff, W1=_f16(W1), b1=b1, W2=_f16(W2), b2=b2,
                     x_shift=mu, x_scale=inv_sd)
    val_logits = pred.logits(X_val)
    pred.threshold = tune_threshold(val_logits, Y_val, recall_target)
    exact.threshold = pred.threshold
    out = {f"val_{k}": v for k, v in metrics(val_logits > np.float32(pred.threshold), Y_val).items()}
    out.update({f"val_f32_{k}": v for k, v in metrics(exact.predict(X_val), Y_val).items()})
    out.update(threshold=pred.threshold, rank=rank, epochs=epochs, batch=batch, lr=lr, loss="bce",
               fit_fraction=float(Y_tr.mean()), n_train=int(n), n_val=int(X_val.shape[0]), train_loss_first=loss_first,
               train_loss_last=loss_last, train_seconds=train_seconds,
               total_seconds=time.perf_counter() - t0)
    return pred, out


def _bce_grad(lg: np.ndarray, yb: np.ndarray) -> np.ndarray:
    """d BCE / d logits for a batch of logits lg and bool targets yb (loss summed over pairs)."""
    sig = np.tanh(lg * np.float32(0.5))
    sig += 1
    sig *= np.float32(0.5)  # sigmoid, without overflow
    return sig - yb.astype(np.float32)


def _train_loss(params, x, y) -> float:
    """Mean BCE per (token, neuron) pair; for reporting only (logaddexp is slow)."""
    W1, b1, W2, b2 = params
    lg = np.maximum(x @ W1 + b1, 0) @ W2 + b2
    return float(np.logaddexp(0, np.where(y, -lg, lg)).mean())  # -log p(correct class)


def _standardisation(X: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-feature (mean, 1 / std) of X, float32. Computed in float64 (features of 1e4 and 1e-7
    side by side); a feature nearly constant on the training tokens gets its std floored at 1% of
    the median feature's, so a small change at run time cannot swing the hidden units."""
    X64 = X.astype(np.float64)
    mu = X64.mean(axis=0)
    sd = X64.std(axis=0)
    med = float(np.median(sd))
    floor = max(1e-2 * med, 1e-30) if med > 0 else 1.0
    return mu.astype(np.float32), (1.0 / np.maximum(sd, floor)).astype(np.float32)


def _f16(a: np.ndarray) -> np.ndarray:
    if np.abs(a).max(initial=0) > np.finfo(np.float16).max or not np.isfinite(a).all():
        raise ValueError("trained weights are not finite or exceed the float16 range they are stored in")
    return a.astype(np.float16).astype(np.float32)


def _check_recall_target(r) -> None:
    if not (isinstance(r, (int, float, np.floating)) and 0 < r <= 1):
        raise ValueError(f"recall_target must be in (0, 1], got {r!r}")


def _as_features(X, n_embd: Optional[int], name: str) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (tokens, n_embd) array, got shape {X.shape}")
    if n_embd is not None and X.shape[1] != n_embd:
        raise ValueError(f"{name}: {X.shape[1]} features, the predictor takes n_embd={n_embd}")
    if X.dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"{name}: dtype {X.dtype}, expected float16/float32")
    if not np.isfinite(X).all():
        raise ValueError(f"{name}: contains inf or nan")
    return X


def _as_mask(Y, n_ff: Optional[int], name: str) -> np.ndarray:
    Y = np.asarray(Y)
    if Y.ndim != 2 or Y.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (tokens, n_ff) mask, got shape {Y.shape}")
    if Y.dtype == np.bool_:
        if n_ff is not None and Y.shape[1] != n_ff:
            raise ValueError(f"{name}: {Y.shape[1]} neurons, n_ff={n_ff} given")
        return Y
    if Y.dtype == np.uint8 and n_ff is not None:
        if Y.shape[1] != (n_ff + 7) // 8:
            raise ValueError(f"{name}: packed mask has {Y.shape[1]} bytes per token, n_ff={n_ff} needs {(n_ff + 7) // 8}")
        return np.unpackbits(Y, axis=1, count=n_ff).astype(bool)
    raise ValueError(f"{name}: dtype {Y.dtype}; expected a bool mask, or np.packbits(mask, axis=1) "
                     "(uint8) together with n_ff")


def read_predictor(rf, layer):
    """The predictor of ``layer`` of the ripple file ``rf`` (a
    :class:`~ripple_gguf.format.reader.RippleFile`; its blob read and checked): a
    :class:`Predictor` (low rank) or a :class:`~ripple_gguf.offline.sketch.Sketch`, by the blob's
    magic. RippleFormatError naming the layer for a blob that does not parse."""
    from ..format.layout import RippleFormatError
    from . import sketch

    blob = rf.read_predictor_blob(layer)
    try:
        if blob[:4] == sketch.MAGIC:
            return sketch.Sketch.from_bytes(blob, layer.n_embd, layer.n_ff)
        return Predictor.from_bytes(blob, layer.n_embd, layer.n_ff)
    except ValueError as e:
        raise RippleFormatError(rf.path, f"layer {layer.block}: bad predictor: {e}") from None
