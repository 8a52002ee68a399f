"""Sketch predictor: which FFN neurons a token needs, from a 2-bit copy of the layer's own gate and
up rows with a few input channels kept (nearly) exact.

The low-rank predictor (:mod:`ripple_gguf.offline.predictor`) learns *whether* a neuron is active; what
decides perplexity is whether the few neurons with the largest |h| are kept, and h is computed from
the gate and up rows themselves. A sketch estimates h directly::

    x_s   = x with the outlier channels set to 0          (the channels with the largest E[x^2] x
    d     = max|x_s| / 127,  xq = round(x_s / d)           sketch error, measured on calibration text)
    g~_i  = D_g[i] / 2 * d * (2 * sum_j cg[i, j] * xq[j] - 3 * sum_j xq[j]) + sum_k og[i, k] * (osg[k] * x[out[k]])
    u~_i  = the same with cu, D_u, ou, osu
    h~    = act(g~_i) * u~_i         (gated FFN; ungated: act(u~_i))
    var   = act'(g~_i)^2 u~_i^2 V_g D_g[i]^2 |x_s|^2 + act(g~_i)^2 V_u D_u[i]^2 |x_s|^2   (ungated: act'(u~_i)^2 V_u ...)
    score = sqrt(h~^2 + var)
    selected = score > threshold

``cg[i, j]`` in {0, 1, 2, 3} is row i of ffn_gate quantized to 2 bits, value (2c - 3) * D_g[i] / 2
(uniform levels, the step D_g[i] chosen per row for the least squared error); the outlier weights
``og`` are int8 with one float32 scale per channel (``osg``). The arithmetic above is what the C
kernel computes (integer sums exact; ``round`` is half away from zero), so ``scores`` here is its
reference. The threshold is calibrated per layer on calibration tokens to a mean selected fraction
(the budget): per token the number of neurons kept varies with how many have large scores.

``var`` is the variance of h~ that the sketch's error leaves (first order in the errors of g~ and
u~): the error of a row's estimate grows with its step D and with |x_s|, and V_g, V_u (one each per
layer) are fitted on calibration text as the mean squared error of g~, u~ per unit D^2 |x_s|^2,
times ``UNCERTAINTY`` (:meth:`Sketch.fit_variance`). A neuron whose estimate is small but uncertain
then ranks above one that is small for sure: on SmolLM2 this cuts the FFN output error that the
dropped neurons cause by about a fifth at the same budget (docs/BENCHMARKS.md). V = 0 gives the
plain score |h~| (version 1 blobs).

Binary layout (``Sketch.to_bytes``), little-endian, every section at a multiple of 64 bytes:

====== ============================= ==========================================================
offset field                         meaning
====== ============================= ==========================================================
0      char[4] magic                 ``b"RPSK"``
4      u32 version                   2 (1: no V_g, V_u; read as 0)
8      u32 n_embd
12     u32 n_ff
16     u32 bits                      2 (the only width this version stores)
20     f32 threshold                 selected iff score > threshold
24     u32 blob_size                 total bytes (a multiple of 64)
28     u32 n_out                     k outlier channels
32     u32 gated                     1: score |act(g~) u~|, 0 (no ffn_gate): |act(u~)|
36     u32 act                       0 SiLU, 1 GELU (tanh form, as ggml), 2 ReLU
40     f32 V_g, f32 V_u              variance coefficients (>= 0; version 2)
64     i32 out[k]                    outlier channel indices, ascending
...    f32 osg[k], f32 osu[k]        outlier weight scales per channel (gate, up)
...    f16 D_g[n_ff], f16 D_u[n_ff]  quantization steps per row
...    u8 cg[n_ff][n_pad / 4]        gate codes, n_pad = n_embd rounded up to 64 (see below)
...    u8 cu[n_ff][n_pad / 4]        up codes
...    i8 og[n_ff][k], i8 ou[n_ff][k] outlier weights
====== ============================= ==========================================================

Sections in that order, each padded to 64 bytes; the gate sections are empty (0 bytes) for an
ungated layer. Codes: a row is n_pad / 64 groups of 16 bytes; byte b of group g holds the codes of
channels 64 g + b, 64 g + 16 + b, 64 g + 32 + b and 64 g + 48 + b in bits 0-1, 2-3, 4-5 and 6-7
(so one shift and mask of a 16-byte load gives 16 consecutive channels); channels past n_embd have
code 0 and their activation is 0.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

MAGIC = b"RPSK"
VERSION = 2
VERSIONS = (1, 2)  # what this reader reads
BITS = 2
HEADER_SIZE = 64
ACTS = ("silu", "gelu", "relu")
_HEADER = struct.Struct("<4sIIIIfIIII")
_VARIANCE = struct.Struct("<ff")  # at offset 40, version 2
UNCERTAINTY = 0.5  # the fitted variances' weight in the score (0: the plain |h~|; docs/BENCHMARKS.md)

ALLOCATIONS = ("uniform", "relative")
DEFAULT_OUTLIERS = 12  # 29.3% of the FFN bytes in memory on SmolLM2; 8 lost more, 14 and 16 no less (docs/BENCHMARKS.md)
# mean fraction of the neurons selected: with UNCERTAINTY 0.5, the smallest budget measured on SmolLM2 that
# keeps needed bytes <= 65% of dense, perplexity within 3% and top-2% recall >= 0.99 (docs/BENCHMARKS.md)
DEFAULT_BUDGET = 0.67


def _pad64(n: int) -> int:
    return (n + 63) & ~63


def n_pad(n_embd: int) -> int:
    return (n_embd + 63) // 64 * 64


def _layout(n_embd: int, n_ff: int, k: int, gated: bool):
    """Offsets (out, osg, osu, dg, du, cg, cu, og, ou) and the blob size."""
    row = n_pad(n_embd) // 4
    g = 1 if gated else 0
    sizes = [4 * k, 4 * k * g, 4 * k, 2 * n_ff * g, 2 * n_ff, n_ff * row * g, n_ff * row, n_ff * k * g, n_ff * k]
    offs, at = [], HEADER_SIZE
    for s in sizes:
        offs.append(at)
        at += _pad64(s)
    return offs, at


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """(n_ff, n_embd) uint8 codes 0..3 -> (n_ff, n_pad / 4) bytes in the layout above."""
    n_ff, n_embd = codes.shape
    c = np.zeros((n_ff, n_pad(n_embd)), np.uint8)
    c[:, :n_embd] = codes
    c = c.reshape(n_ff, -1, 4, 16)  # [row, group, chunk s, byte b]: channel 64 g + 16 s + b
    return (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(n_ff, -1)


def unpack_codes(packed: np.ndarray, n_embd: int) -> np.ndarray:
    n_ff = packed.shape[0]
    p = packed.reshape(n_ff, -1, 1, 16)
    c = np.concatenate([(p >> (2 * s)) & 3 for s in range(4)], axis=2)  # [row, group, s, b]
    return c.reshape(n_ff, -1)[:, :n_embd].astype(np.uint8)


def quantize_rows(W: np.ndarray, skip: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """2-bit codes (n_ff, n_embd) and per-row steps (float16-rounded) with the least squared error
    over the channels not in ``skip`` (a grid over the step; uniform levels (2c - 3) * D / 2)."""
    W = np.asarray(W, np.float32)
    use = np.ones(W.shape[1], bool)
    if skip is not None and len(skip):
        use[np.asarray(skip)] = False
    Wu = W[:, use]
    rms = np.sqrt(np.mean(Wu * Wu, axis=1, dtype=np.float64)).astype(np.float32)
    rms = np.where(rms > 0, rms, np.float32(1e-8))
    best_err = np.full(W.shape[0], np.inf, np.float64)
    best_d = np.zeros(W.shape[0], np.float32)
    for m in np.linspace(0.5, 1.6, 23, dtype=np.float32):  # Gaussian optimum near 1.0 x rms
        d = (rms * m).astype(np.float16).astype(np.float32)
        d = np.where(d > 0, d, np.float32(1e-8))
        c = np.clip(np.floor(Wu / d[:, None] + 2.0), 0, 3)
        err = np.sum((Wu - (2 * c - 3) * (d[:, None] / 2)) ** 2, axis=1, dtype=np.float64)
        better = err < best_err
        best_err[better] = err[better]
        best_d[better] = d[better]
    codes = np.clip(np.floor(W / best_d[:, None] + 2.0), 0, 3).astype(np.uint8)
    return codes, best_d.astype(np.float16)


def _round_half_away(a: np.ndarray) -> np.ndarray:
    return np.sign(a) * np.floor(np.abs(a) + np.float32(0.5))


def act(name: str, g: np.ndarray) -> np.ndarray:
    g = g.astype(np.float32)
    if name == "silu":
        with np.errstate(over="ignore"):  # exp(-g) = inf for g << 0 gives -0, as in C
            return g / (np.float32(1) + np.exp(-g))
    if name == "relu":
        return np.maximum(g, np.float32(0))
    # ggml's GELU (tanh form)
    c = np.float32(math.sqrt(2 / math.pi))
    return np.float32(0.5) * g * (np.float32(1) + np.tanh(c * g * (np.float32(1) + np.float32(0.044715) * g * g)))


def dact(name: str, g: np.ndarray) -> np.ndarray:
    """The derivative of :func:`act`."""
    g = g.astype(np.float32)
    if name == "silu":
        with np.errstate(over="ignore"):
            s = np.float32(1) / (np.float32(1) + np.exp(-g))
        return s * (np.float32(1) + g * (np.float32(1) - s))
    if name == "relu":
        return (g > 0).astype(np.float32)
    c = np.float32(math.sqrt(2 / math.pi))
    a = np.float32(0.044715)
    t = np.tanh(c * g * (np.float32(1) + a * g * g))
    return np.float32(0.5) * (np.float32(1) + t) + np.float32(0.5) * g * (np.float32(1) - t * t) * c * (np.float32(1) + np.float32(3) * a * g * g)


def _int8_cols(W: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Columns of W as int8 with one float32 scale each (largest |w| -> 127)."""
    W = np.asarray(W, np.float32)
    s = (np.abs(W).max(axis=0) / 127).astype(np.float32) if W.size else np.zeros(W.shape[1], np.float32)
    s = np.where(s > 0, s, np.float32(1))
    return np.clip(_round_half_away(W / s), -127, 127).astype(np.int8), s


@dataclass
class Sketch:
    n_embd: int
    n_ff: int
    out: np.ndarray  # int32[k], ascending
    cu: np.ndarray  # uint8 (n_ff, n_embd) codes
    du: np.ndarray  # float16 (n_ff,)
    ou: np.ndarray  # int8 (n_ff, k)
    osu: np.ndarray  # float32 (k,)
    cg: Optional[np.ndarray] = None  # None for an ungated layer
    dg: Optional[np.ndarray] = None
    og: Optional[np.ndarray] = None
    osg: Optional[np.ndarray] = None
    act: str = "silu"
    threshold: float = 0.0
    var_g: float = 0.0  # V_g: variance of g~_i per unit D_g[i]^2 |x_s|^2
    var_u: float = 0.0

    @property
    def gated(self) -> bool:
        return self.cg is not None

    @classmethod
    def build(cls, W_up: np.ndarray, W_gate: Optional[np.ndarray], x2: np.ndarray, *, n_out: int = DEFAULT_OUTLIERS,
              act_name: str = "silu", down_norm: Optional[np.ndarray] = None) -> "Sketch":
        """From the layer's float weights (n_ff, n_embd) and E[x^2] per input channel on calibration
        text: the outlier channels are the k largest E[x^2] x (squared sketch error of the channel's
        column, gate and up summed).

        ``down_norm`` (n_ff,): the norm of each neuron's ffn_down column. Given, the score estimates
        |h_i| x ||down_i||, the size of what neuron i adds to the layer's output, instead of |h_i|:
        the up rows are sketched scaled by it (h is linear in the up row), which costs nothing at
        run time. Not for an ungated layer with a non-ReLU activation (act(u) is not linear in u)."""
        if act_name not in ACTS:
            raise ValueError(f"sketch: unknown activation {act_name!r}")
        W_up = np.asarray(W_up, np.float32)
        if down_norm is not None and (W_gate is not None or act_name == "relu"):
            W_up = W_up * np.asarray(down_norm, np.float32)[:, None]
        n_ff, n_embd = W_up.shape
        mats = [W_up] + ([np.asarray(W_gate, np.float32)] if W_gate is not None else [])
        err = np.zeros(n_embd, np.float64)
        for W in mats:
            c, d = quantize_rows(W)
            err += np.sum((W - (2 * c.astype(np.float32) - 3) * (d.astype(np.float32)[:, None] / 2)) ** 2, axis=0)
        k = max(0, min(int(n_out), n_embd))
        out = np.sort(np.argsort(-(np.asarray(x2, np.float64) * err), kind="stable")[:k]).astype(np.int32)
        cu, du = quantize_rows(W_up, out)
        ou, osu = _int8_cols(W_up[:, out])
        kw = {}
        if W_gate is not None:
            cg, dg = quantize_rows(mats[1], out)
            og, osg = _int8_cols(mats[1][:, out])
            kw = dict(cg=cg, dg=dg, og=og, osg=osg)
        return cls(n_embd=n_embd, n_ff=n_ff, out=out, cu=cu, du=du, ou=ou, osu=osu, act=act_name, **kw)

    def _estimate(self, X: np.ndarray, xq: np.ndarray, d: np.ndarray, sx: np.ndarray, codes, steps, ow, os_):
        acc = xq @ codes.T.astype(np.float32)  # integer sums, exact in float32 below 2**24
        est = (steps.astype(np.float32)[None, :] / np.float32(2)) * d[:, None] * (np.float32(2) * acc - np.float32(3) * sx[:, None])
        if len(self.out):
            y = X[:, self.out] * os_[None, :]
            est = est + y @ ow.T.astype(np.float32)
        return est.astype(np.float32)

    def scores(self, X: np.ndarray) -> np.ndarray:
        """(N, n_ff) float32 scores for FFN inputs X (N, n_embd)."""
        g, u, nx2 = self.estimates(X)
        h = act(self.act, g) * u if self.gated else act(self.act, u)
        if self.var_g == 0 and self.var_u == 0:
            return np.abs(h)
        nx2 = nx2[:, None]
        vu = (np.float32(self.var_u) * np.square(self.du.astype(np.float32)))[None, :] * nx2
        if self.gated:
            vg = (np.float32(self.var_g) * np.square(self.dg.astype(np.float32)))[None, :] * nx2
            var = np.square(dact(self.act, g) * u) * vg + np.square(act(self.act, g)) * vu
        else:
            var = np.square(dact(self.act, u)) * vu
        return np.sqrt(h * h + var).astype(np.float32)

    def estimates(self, X: np.ndarray) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
        """g~ (None when ungated), u~ and |x_s|^2 for FFN inputs X."""
        X = np.asarray(X, np.float32)
        xs = X.copy()
        xs[:, self.out] = 0
        m = np.abs(xs).max(axis=1)
        d = np.where(m > 0, m / np.float32(127), np.float32(1)).astype(np.float32)
        xq = _round_half_away(xs / d[:, None]).astype(np.float32)
        sx = xq.sum(axis=1)
        u = self._estimate(X, xq, d, sx, self.cu, self.du, self.ou, self.osu)
        g = self._estimate(X, xq, d, sx, self.cg, self.dg, self.og, self.osg) if self.gated else None
        return g, u, np.sum(xs * xs, axis=1, dtype=np.float32)

    def fit_variance(self, X: np.ndarray, W_up: np.ndarray, W_gate: Optional[np.ndarray],
                     weight: float = UNCERTAINTY) -> "Sketch":
        """V_g, V_u from calibration inputs X and the rows the sketch was built from (as given to
        :meth:`build`, up rows scaled the same way): the least-squares fit of the estimates' squared
        errors by V D_i^2 |x_s|^2, times ``weight`` (0: no variance term)."""
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"sketch uncertainty weight must be >= 0, got {weight}")
        self.var_g = self.var_u = 0.0
        if weight == 0 or not len(X):
            return self
        X = np.asarray(X, np.float32)
        g, u, nx2 = self.estimates(X)

        def fit(W, est, steps) -> float:
            err = np.square(X @ np.asarray(W, np.float32).T - est, dtype=np.float64)
            den = float(np.sum(nx2, dtype=np.float64) * np.sum(np.square(steps.astype(np.float64))))
            return float(np.float32(weight * err.sum() / den)) if den > 0 else 0.0

        self.var_u = fit(W_up, u, self.du)
        if self.gated:
            self.var_g = fit(W_gate, g, self.dg)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.scores(X) > np.float32(self.threshold)

    def calibrate(self, X: np.ndarray, budget: float) -> "Sketch":
        """Set the threshold so that a fraction ``budget`` of the (token, neuron) scores of X exceed it."""
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"sketch budget must be in (0, 1], got {budget}")
        s = self.scores(X).ravel()
        t = np.quantile(s, 1.0 - budget) if budget < 1.0 else -1.0
        self.threshold = float(np.float32(t))
        return self

    def check_finite(self) -> None:
        """Raise ValueError naming the first part that holds inf or nan."""
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold is {self.threshold}")
        for name in ("var_g", "var_u"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"sketch {name} is {v}")
        for name in ("du", "osu", "dg", "osg"):
            a = getattr(self, name)
            if a is not None and not np.isfinite(np.asarray(a, np.float32)).all():
                raise ValueError(f"sketch {name} holds inf or nan")

    def nbytes(self) -> int:
        return _layout(self.n_embd, self.n_ff, len(self.out), self.gated)[1]

    def to_bytes(self) -> bytes:
        k = len(self.out)
        self.check_finite()
        offs, size = _layout(self.n_embd, self.n_ff, k, self.gated)
        buf = bytearray(size)
        _HEADER.pack_into(buf, 0, MAGIC, VERSION, self.n_embd, self.n_ff, BITS, self.threshold, size, k,
                          1 if self.gated else 0, ACTS.index(self.act))
        _VARIANCE.pack_into(buf, 40, self.var_g, self.var_u)
        parts = [self.out.astype("<i4"), self.osg, self.osu.astype("<f4"), self.dg, self.du.astype("<f2"),
                 pack_codes(self.cg) if self.gated else None, pack_codes(self.cu), self.og, self.ou]
        casts = [None, "<f4", None, "<f2", None, None, None, np.int8, None]
        for off, a, cast in zip(offs, parts, casts):
            if a is None:
                continue
            raw = np.ascontiguousarray(a.astype(cast) if cast is not None else a).tobytes()
            buf[off:off + len(raw)] = raw
        return bytes(buf)

    @classmethod
    def from_bytes(cls, b: bytes, n_embd: int, n_ff: int) -> "Sketch":
        if len(b) < HEADER_SIZE:
            raise ValueError(f"sketch blob: {len(b)} bytes, shorter than the {HEADER_SIZE}-byte header")
        magic, version, e, f, bits, thr, size, k, gated, act_id = _HEADER.unpack_from(b, 0)
        if magic != MAGIC:
            raise ValueError(f"sketch blob: magic {magic!r}, expected {MAGIC!r}")
        if version not in VERSIONS or bits != BITS:
            raise ValueError(f"sketch blob: version {version}, {bits} bits; this reader knows versions "
                             f"{', '.join(map(str, VERSIONS))}, {BITS} bits")
        var_g, var_u = _VARIANCE.unpack_from(b, 40) if version >= 2 else (0.0, 0.0)
        if (e, f) != (n_embd, n_ff) or k > e or act_id >= len(ACTS) or gated > 1:
            raise ValueError(f"sketch blob: n_embd={e}, n_ff={f}, {k} outliers, gated={gated}, act={act_id}; the layer "
                             f"has n_embd={n_embd}, n_ff={n_ff}")
        offs, expect = _layout(e, f, k, bool(gated))
        if size != expect or len(b) < size:
            raise ValueError(f"sketch blob: blob_size {size}, {len(b)} bytes given, layout needs {expect}")
        row = n_pad(e) // 4
        a = lambda i, dt, n: np.frombuffer(b, dtype=dt, count=n, offset=offs[i])
        kw = {}
        if gated:
            kw = dict(osg=a(1, "<f4", k).astype(np.float32), dg=a(3, "<f2", f).astype(np.float16),
                      cg=unpack_codes(a(5, np.uint8, f * row).reshape(f, row), e), og=a(7, np.int8, f * k).reshape(f, k))
        return cls(n_embd=e, n_ff=f, out=a(0, "<i4", k).astype(np.int32), osu=a(2, "<f4", k).astype(np.float32),
                   du=a(4, "<f2", f).astype(np.float16), cu=unpack_codes(a(6, np.uint8, f * row).reshape(f, row), e),
                   ou=a(8, np.int8, f * k).reshape(f, k), act=ACTS[act_id], threshold=thr, var_g=var_g,
                   var_u=var_u, **kw)


def allocate(scores: "dict[int, np.ndarray]", budget: float, how: str) -> "dict[int, float]":
    """Per-layer thresholds from a sample of each layer's calibration scores (equal-sized samples
    for layers of equal width) such that the mean selected fraction over all (token, neuron) pairs
    of the model is ``budget``.

    ``uniform``: every layer keeps the same fraction. ``relative``: threshold = c x the layer's RMS
    score, one c for the model: it sets every layer's cut at the same size relative to the layer's
    typical score (the split of a fixed budget that minimises the sum over layers of the relative
    squared score mass dropped)."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"sketch budget must be in (0, 1], got {budget}")
    if how == "uniform" or budget >= 1.0:
        return {b: (float(np.float32(np.quantile(s, 1.0 - budget))) if budget < 1.0 else -1.0)
                for b, s in scores.items()}
    if how != "relative":
        raise ValueError(f"sketch allocation {how!r}: choose from {', '.join(ALLOCATIONS)}")
    rms = {b: float(np.sqrt(np.mean(np.square(s, dtype=np.float64)))) or 1.0 for b, s in scores.items()}
    pool = np.concatenate([(s / np.float32(rms[b])).ravel() for b, s in scores.items()])
    c = float(np.quantile(pool, 1.0 - budget))
    return {b: float(np.float32(c * rms[b])) for b in scores}
