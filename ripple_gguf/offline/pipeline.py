"""The offline stage: profile -> activity rule -> co-activation -> placement -> predictors -> quality.

One pass of the source model over the calibration text (:mod:`ripple_gguf.offline.profile`) streams, per
FFN layer, the co-activation counts f(i, j) (diagonal f(i)) and a capped sample of (FFN input,
active mask) pairs for the predictors; nothing grows with the corpus but those fixed-size sums and
the capped sample. A second, short pass over held-out text (never the calibration text) measures
what the placements and predictors achieve; those figures are stored in the file.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..format import constants as C
from ..format.layout import OfflineData
from . import placement as P
from . import predictor as PR
from . import sketch as SK
from .profile import ActivationCapture, ProfileError, calibration_text_default, check_tokens, tokenize_chunks

# A layer whose post-activation is exactly zero this often is of the ReLU family: "active" is then
# exact (h != 0) instead of a calibrated magnitude threshold.
RELU_ZERO_FRACTION = 0.3


@dataclass
class OfflineConfig:
    calib: Optional[Sequence[Tuple[str, str]]] = None  # [(name, text)]; None: calibration_text_default()
    calib_tokens: int = 4096
    chunk_tokens: int = 256
    threshold_tokens: int = 1024  # first calibration tokens that set the magnitude thresholds
    placement: str = "ripple"
    # active fraction 0.7 with recall 0.9: the fewest bundles within 3% of exact perplexity in
    # sparse mode on SmolLM2 (docs/BENCHMARKS.md, scripts/sparsity_sweep.py)
    active_fraction: float = 0.7
    predictor: str = "sketch"  # C.PREDICTOR_KINDS
    predictor_rank: int = PR.DEFAULT_RANK  # low rank: hidden width; 0: no predictors (either kind)
    predictor_recall: float = 0.9  # low rank: validation target; held-out recall comes out within ~1 point
    sketch_outliers: int = SK.DEFAULT_OUTLIERS  # sketch: input channels kept exact per layer
    sketch_budget: float = SK.DEFAULT_BUDGET  # sketch: mean fraction of the neurons selected
    # sketch: score |h_i| x ||ffn_down column i|| rather than |h_i| (measured: +4.29% against +4.10%
    # perplexity at budget 0.7 on SmolLM2, so off)
    sketch_down_norm: bool = False
    # sketch: how the budget is shared among layers. "uniform": every layer's threshold keeps the
    # budget's fraction of its calibration scores; "relative": one constant times each layer's RMS
    # score, the constant set so the model's mean fraction is the budget (a layer whose scores are
    # spread keeps more neurons, one whose few large scores dominate keeps fewer)
    sketch_allocation: str = "uniform"
    # sketch: weight of the estimate's fitted variance in the score (0: the plain |h~|; see sketch.py)
    sketch_uncertainty: float = SK.UNCERTAINTY
    # the predictors are fitted to the neurons of the top fraction of |h| (magnitude rule; at most
    # active_fraction; None: the active ones) and tuned for recall of all active neurons
    predictor_fit_fraction: Optional[float] = 0.25
    predictor_tokens: int = 8192  # cap on (input, mask) pairs kept per layer for training
    eval_tokens: int = 1024
    seed: int = 0
    threads: Optional[int] = None
    quiet: bool = False

    def check(self) -> None:
        if not 0.0 < self.active_fraction < 1.0:
            raise ProfileError(f"--active-fraction must be between 0 and 1 (exclusive), got {self.active_fraction}")
        if not 0.0 < self.predictor_recall <= 1.0:
            raise ProfileError(f"--predictor-recall must be in (0, 1], got {self.predictor_recall}")
        if self.placement not in P.METHODS:
            raise ProfileError(f"--placement {self.placement!r}: choose from {', '.join(P.METHODS)}")
        if self.predictor_fit_fraction is not None and not 0.0 < self.predictor_fit_fraction < 1.0:
            raise ProfileError(f"--predictor-fit-fraction must be between 0 and 1 (exclusive), got "
                               f"{self.predictor_fit_fraction}")
        if self.predictor not in C.PREDICTOR_KINDS:
            raise ProfileError(f"--predictor {self.predictor!r}: choose from {', '.join(C.PREDICTOR_KINDS)}")
        if not 0.0 < self.sketch_budget <= 1.0:
            raise ProfileError(f"--sketch-budget must be in (0, 1], got {self.sketch_budget}")
        if self.sketch_allocation not in SK.ALLOCATIONS:
            raise ProfileError(f"--sketch-allocation {self.sketch_allocation!r}: choose from {', '.join(SK.ALLOCATIONS)}")
        if not (self.sketch_uncertainty >= 0 and math.isfinite(self.sketch_uncertainty)):
            raise ProfileError(f"--sketch-uncertainty must be >= 0, got {self.sketch_uncertainty}")
        if self.sketch_outliers < 0:
            raise ProfileError(f"--sketch-outliers must be >= 0, got {self.sketch_outliers}")
        if self.predictor_rank < 0:
            raise ProfileError(f"--predictor-rank must be >= 0 (0: no predictors), got {self.predictor_rank}")
        if self.chunk_tokens < 2 or self.calib_tokens < self.chunk_tokens:
            raise ProfileError(f"--calib-tokens {self.calib_tokens} must be at least one chunk ({self.chunk_tokens})")


@dataclass
class OfflineResult:
    orders: Dict[int, np.ndarray]  # block -> placement order
    data: OfflineData
    stage_seconds: Dict[str, float] = field(default_factory=dict)
    # every placement computed (original, frequency and the configured one): method -> block -> order,
    # and their held-out figures, so one profile can pack the same bundles in several orders
    orders_by_method: Dict[str, Dict[int, np.ndarray]] = field(default_factory=dict)
    quality_by_method: Dict[str, dict] = field(default_factory=dict)
    eval_tokens: int = 0
    needed: str = "predicted"

    def for_placement(self, method: str) -> "OfflineResult":
        """The same offline result (thresholds, predictors) with the bundles in ``method``'s order."""
        if method not in self.orders_by_method:
            raise ValueError(f"placement {method!r} was not computed (have {', '.join(self.orders_by_method)})")
        pq = _placement_quality(self.quality_by_method, method, self.eval_tokens, self.needed)
        return replace(self, orders=self.orders_by_method[method], data=replace(self.data, placement_quality=pq))


def _placement_quality(quality: Dict[str, dict], method: str, eval_tokens: int, needed: str) -> dict:
    """The placement figures stored in the file: the chosen method's, the others' for comparison."""
    chosen = quality[method]
    return {
        "method": method, "eval_tokens": eval_tokens, "eval_text": "held-out pydoc_data.topics",
        # the bundles a token needs: those its predictors select (what the runtime reads), or the
        # truly active ones for a file without predictors
        "needed": needed,
        "mean_run_length": chosen["mean_run_length"], "max_run_length": chosen["max_run_length"],
        "reads_per_token": chosen["reads_per_token"], "needed_per_token": chosen["needed_per_token"],
        "per_layer": chosen["per_layer"],
        **{f"{m}_{k}": quality[m][k] for m in quality if m != method
           for k in ("mean_run_length", "max_run_length", "reads_per_token")},
        **{f"{m}_per_layer": quality[m]["per_layer"] for m in quality if m != method},
    }


def _progress(quiet: bool) -> Callable[..., Iterable]:
    from ..progress import progress

    return lambda it, **kw: progress(it, quiet=quiet, **kw)


def activity_score(rule: str, h: np.ndarray) -> np.ndarray:
    """The value the layer's threshold applies to (see constants.SPARSITY_RULES)."""
    return (h != 0).astype(np.float32) if rule == "nonzero" else np.abs(h)


def _x_multiplier(max_abs: float) -> float:
    """A power of two bringing ``max_abs`` to 2**10 (exact in float32: scaling loses nothing)."""
    return 2.0 ** (10 - math.frexp(max_abs)[1]) if max_abs > 0 else 1.0


def _to_f16(x: np.ndarray, mul: float) -> np.ndarray:
    lim = np.finfo(np.float16).max
    return np.clip(x * np.float32(mul), -lim, lim).astype(np.float16)


def _checked(src: os.PathLike, c):
    """The chunk, unless an FFN layer's activations hold inf or nan (ProfileError naming it)."""
    for b in c.x:
        for what, a in (("input", c.x[b]), ("post-activation", c.h[b])):
            if not np.isfinite(a).all():
                raise ProfileError(f"{os.fspath(src)}: layer {b}: FFN {what} holds inf or nan on the calibration "
                                   "text (the model overflows float32 in llama.cpp): cannot profile it")
    return c


class _SketchSource:
    """The source's gate and up rows as floats, for sketch predictors."""

    def __init__(self, src: os.PathLike, rule: str):
        from ..format.reader import read_gguf_header

        self.path = os.fspath(src)
        self.hdr = read_gguf_header(self.path)
        arch = str(self.hdr.get("general.architecture", ""))
        # the activation h = act(gate) * up uses: the architecture's; an unknown one of the ReLU family
        # (exact zeros in h) is scored with ReLU, else SiLU
        self.act = C.ARCH_GLU_ACTIVATION.get(arch) or ("relu" if rule == "nonzero" else "silu")

    def _rows(self, name: str) -> Optional[np.ndarray]:
        from ..format.bundles import to_f32

        t = self.hdr.tensor(name)
        if t is None:
            return None
        with open(self.path, "rb") as f:
            f.seek(self.hdr.data_offset + t.offset)
            raw = np.frombuffer(f.read(t.nbytes), dtype=np.uint8)
        return np.asarray(to_f32(t.type, raw, t.shape[1], t.shape[0]), np.float32)

    def build(self, block: int, X: np.ndarray, n_out: int, down_norm: bool, uncertainty: float) -> SK.Sketch:
        W_up = self._rows(C.ffn_tensor_name(block, "up"))
        W_gate = self._rows(C.ffn_tensor_name(block, "gate"))
        norm = None
        if down_norm:
            W_down = self._rows(C.ffn_tensor_name(block, "down"))  # (n_embd, n_ff): column i is neuron i's
            norm = np.sqrt(np.sum(np.square(W_down, dtype=np.float64), axis=0)).astype(np.float32)
        x2 = np.mean(np.square(X, dtype=np.float64), axis=0)
        sk = SK.Sketch.build(W_up, W_gate, x2, n_out=n_out, act_name=self.act, down_norm=norm)
        if norm is not None and (W_gate is not None or self.act == "relu"):
            W_up = W_up * norm[:, None]  # as build scaled them
        return sk.fit_variance(X, W_up, W_gate, uncertainty)


def run(src: os.PathLike, cfg: OfflineConfig) -> OfflineResult:
    """Profile ``src`` and compute everything the converter stores besides the bundles."""
    from .quality import TOP_RECALL_FRACTION, heldout_text, index_recall, top_indices

    cfg.check()
    progress = _progress(cfg.quiet)
    times: Dict[str, float] = {}
    t0 = time.perf_counter()
    texts = list(cfg.calib) if cfg.calib is not None else [calibration_text_default()]
    calib = tokenize_chunks(src, texts, cfg.calib_tokens, cfg.chunk_tokens)
    check_tokens(", ".join(n for n, _ in texts), [t for c in calib for t in c[1:]])
    evals = tokenize_chunks(src, [("held-out pydoc_data.topics", heldout_text(40 * cfg.eval_tokens))],
                            cfg.eval_tokens, cfg.chunk_tokens)
    times["tokenize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with ActivationCapture(src, chunk_tokens=cfg.chunk_tokens, n_threads=cfg.threads) as cap:
        blocks = cap.blocks
        n_thr = max(1, min(len(calib), cfg.threshold_tokens // cfg.chunk_tokens))
        it = iter(progress(calib, desc="profile", unit="chunk"))
        # 1. the first chunks set the activity rule and thresholds
        head = []
        for _ in range(n_thr):
            c = _checked(src, cap.run(next(it)))
            head.append(({b: c.x[b].copy() for b in blocks}, {b: c.h[b].copy() for b in blocks},
                         {b: c.g[b].copy() for b in c.g}))
        # The predictors' training sample is kept in float16 (half the memory) scaled per layer so
        # the largest FFN input of these chunks is 2**10: FFN inputs of 1e4 and more (gemma family)
        # then fit, with 64x headroom above the head's largest; beyond that the sample saturates.
        x_mul = {b: _x_multiplier(max(float(np.abs(x[b]).max()) for x, _, _ in head)) for b in blocks}
        zeros = np.mean([np.mean(h[b] == 0) for _, h, _ in head for b in blocks])
        # |h| rather than CATS's |act(gate)|: measured far better (scripts/sparsity_curve.py)
        rule = "nonzero" if zeros > RELU_ZERO_FRACTION else "magnitude"
        thresholds, fit_thresholds = {}, {}
        fit_fraction = min(cfg.predictor_fit_fraction or cfg.active_fraction, cfg.active_fraction)
        for b in blocks:
            if rule == "nonzero":
                thresholds[b] = fit_thresholds[b] = 0.0
            else:
                score = np.concatenate([activity_score(rule, h[b]) for _, h, _ in head])
                thresholds[b] = float(np.quantile(score, 1.0 - cfg.active_fraction))
                fit_thresholds[b] = max(thresholds[b], float(np.quantile(score, 1.0 - fit_fraction)))
                if not (np.isfinite(np.float32(thresholds[b])) and np.isfinite(np.float32(fit_thresholds[b]))):
                    raise ProfileError(f"{src}: layer {b}: activity threshold {thresholds[b]} is not a finite float32")
        separate_fit = rule != "nonzero" and fit_fraction < cfg.active_fraction

        def active(b: int, h: Dict[int, np.ndarray], g: Dict[int, np.ndarray]) -> np.ndarray:
            return activity_score(rule, h[b]) > thresholds[b]

        # 2. keep a capped sample for the predictors; without predictors, stream the true
        #    co-activation counts (with them, placement follows the predicted sets, step 4)
        use_true_co = cfg.predictor_rank == 0
        co = {b: np.zeros((cap.n_ff[b], cap.n_ff[b]), np.float32) for b in blocks} if use_true_co else {}
        xs: Dict[int, List[np.ndarray]] = {b: [] for b in blocks}
        ys: Dict[int, List[np.ndarray]] = {b: [] for b in blocks}
        yf: Dict[int, List[np.ndarray]] = {b: [] for b in blocks}  # the masks fitted to (separate_fit)
        kept = 0

        def absorb(x, h, g) -> None:
            nonlocal kept
            take = min(len(next(iter(h.values()))), max(0, cfg.predictor_tokens - kept))
            for b in blocks:
                m = active(b, h, g)
                if use_true_co:
                    mf = m.astype(np.float32)
                    co[b] += mf.T @ mf
                if take:
                    xs[b].append(_to_f16(x[b][:take], x_mul[b]))
                    ys[b].append(np.packbits(m[:take], axis=1))
                    if separate_fit:
                        yf[b].append(np.packbits(activity_score(rule, h[b][:take]) > fit_thresholds[b], axis=1))
            kept += take

        for x, h, g in head:
            absorb(x, h, g)
        del head
        for toks in it:
            c = _checked(src, cap.run(toks))
            absorb(c.x, c.h, c.g)
        times["profile"] = time.perf_counter() - t0

        # 3. held-out activations, for the stored quality figures (of h, each token's top 2% by |h|)
        t0 = time.perf_counter()
        ex: Dict[int, List[np.ndarray]] = {b: [] for b in blocks}
        em: Dict[int, List[np.ndarray]] = {b: [] for b in blocks}
        et: Dict[int, List[np.ndarray]] = {b: [] for b in blocks}
        for toks in evals:
            c = _checked(src, cap.run(toks))
            for b in blocks:
                ex[b].append(c.x[b].copy())
                em[b].append(active(b, c.h, c.g))
                et[b].append(top_indices(np.abs(c.h[b]), TOP_RECALL_FRACTION))
        eval_x = {b: np.concatenate(ex[b]) for b in blocks}
        eval_m = {b: np.concatenate(em[b]) for b in blocks}
        eval_top = {b: np.concatenate(et[b]) for b in blocks}
        del ex, em, et
        times["held-out profile"] = time.perf_counter() - t0

    # 4. predictors, then the sets the runtime will read: predicted on the kept sample and held out
    t0 = time.perf_counter()
    blobs: List[bytes] = []
    read_eval: Dict[int, np.ndarray] = {}
    pm = {"recall": [], "precision": [], "over_prediction": [], "predicted_fraction": [], "true_fraction": [],
          "top2_recall": []}
    sketch_src = _SketchSource(src, rule) if cfg.predictor == "sketch" and cfg.predictor_rank > 0 else None
    sketches: Dict[int, SK.Sketch] = {}
    if sketch_src is not None and cfg.sketch_allocation != "uniform":
        # thresholds that depend on every layer's scores: build all sketches first
        samples = {}
        for b in progress(blocks, desc="sketches", unit="layer"):
            X_raw = np.concatenate(xs[b]).astype(np.float32) / np.float32(x_mul[b])
            try:
                sketches[b] = sketch_src.build(b, X_raw, cfg.sketch_outliers, cfg.sketch_down_norm,
                                               cfg.sketch_uncertainty)
            except ValueError as e:
                raise ProfileError(f"{src}: layer {b}: predictor: {e}") from None
            sc = sketches[b].scores(X_raw).ravel()
            samples[b] = sc[::max(1, sc.size >> 20)].copy()  # about 1M values per layer are enough
        thr = SK.allocate(samples, cfg.sketch_budget, cfg.sketch_allocation)
        del samples
        for b in blocks:
            sketches[b].threshold = thr[b]
    for b in progress(blocks if cfg.predictor_rank > 0 else [], desc="predictors", unit="layer"):
        n_ff = eval_m[b].shape[1]
        X, Y = np.concatenate(xs.pop(b)), np.concatenate(ys.pop(b))
        Y_fit = np.concatenate(yf.pop(b)) if separate_fit else None
        try:
            if sketch_src is not None:
                X_raw = X.astype(np.float32) / np.float32(x_mul[b])  # the sample is kept scaled (step 2)
                pred = sketches.pop(b, None) or sketch_src.build(
                    b, X_raw, cfg.sketch_outliers, cfg.sketch_down_norm,
                    cfg.sketch_uncertainty).calibrate(X_raw, cfg.sketch_budget)
                sample_pred = pred.predict(X_raw)
            else:
                scaled, _ = PR.train(X, Y, rank=cfg.predictor_rank, n_ff=n_ff, recall_target=cfg.predictor_recall,
                                     seed=cfg.seed, Y_fit=Y_fit)
                pred = scaled.for_input_scale(x_mul[b])  # the runtime gives the raw FFN input
                sample_pred = scaled.predict(X)
            blobs.append(pred.to_bytes())
        except ValueError as e:
            raise ProfileError(f"{src}: layer {b}: predictor: {e}") from None
        # placement follows what will be read: co-activation of the predicted sets
        pf = sample_pred.astype(np.float32)
        co[b] = pf.T @ pf
        read_eval[b] = pred.predict(eval_x[b])
        m = dict(PR.metrics(read_eval[b], eval_m[b]), top2_recall=index_recall(read_eval[b], eval_top[b]))
        for k in pm:
            pm[k].append(float(m[k]))
    if blobs:
        sizes = [eval_m[b].size for b in blocks]
        true_total = sum(t * n for t, n in zip(pm["true_fraction"], sizes))
        pred_total = sum(t * n for t, n in zip(pm["predicted_fraction"], sizes))
        hits = sum(r * t * n for r, t, n in zip(pm["recall"], pm["true_fraction"], sizes))
        predictor_metrics = {
            "eval_tokens": int(eval_m[blocks[0]].shape[0]),
            "recall": hits / true_total if true_total else 1.0,
            "precision": hits / pred_total if pred_total else 1.0,
            "over_prediction": pred_total / true_total if true_total else 0.0,
            "predicted_fraction": pred_total / sum(sizes),
            "true_fraction": true_total / sum(sizes),
            "fit_fraction": fit_fraction if separate_fit else None,  # None: fitted to the active sets
            # each token's top 2% of neurons by |h| that its selection holds: mean and worst layer
            "top2_recall": float(np.mean(pm["top2_recall"])), "min_top2_recall": min(pm["top2_recall"]),
            "per_layer": pm,
        }
        if sketch_src is not None:
            predictor_metrics["sketch_uncertainty"] = cfg.sketch_uncertainty
    else:
        read_eval, predictor_metrics = eval_m, {}
    times["predictors"] = time.perf_counter() - t0

    # 5. placements (C releases the GIL: layers in parallel)
    t0 = time.perf_counter()
    methods = sorted({"original", "frequency", cfg.placement})

    def place(b: int) -> Dict[str, np.ndarray]:
        freq = np.diag(co[b]).astype(np.int64)
        return {m: P.placements(m, freq, co[b], len(freq)) for m in methods}

    with ThreadPoolExecutor(max_workers=cfg.threads or os.cpu_count() or 1) as pool:
        orders_all = dict(zip(blocks, progress(pool.map(place, blocks), total=len(blocks), desc="placement",
                                              unit="layer")))
    del co
    times["placement"] = time.perf_counter() - t0

    quality = {}
    for m in methods:
        per = [P.run_stats(read_eval[b], orders_all[b][m]) for b in blocks]
        runs, needed = sum(r["runs"] for r in per), sum(r["needed"] for r in per)
        n_tok = per[0]["tokens"]
        quality[m] = {
            "mean_run_length": needed / runs if runs else 0.0,
            "max_run_length": max(r["max_run_length"] for r in per),
            "reads_per_token": runs / n_tok,
            "needed_per_token": needed / n_tok,
            "per_layer": {"mean_run_length": [r["mean_run_length"] for r in per],
                          "max_run_length": [r["max_run_length"] for r in per],
                          "reads_per_token": [r["reads_per_token"] for r in per]},
        }
    eval_tokens = int(eval_m[blocks[0]].shape[0])
    needed = "predicted" if blobs else "active"
    # how often each bundle is needed on held-out text, for the runtime's pinned cache (ceil: a
    # bundle needed at all is never 0)
    frequency = [np.ceil(np.asarray(read_eval[b], dtype=np.float64).mean(axis=0) * 255).astype(np.uint8)
                 for b in blocks]
    placement_quality = _placement_quality(quality, cfg.placement, eval_tokens, needed)

    data = OfflineData(
        rule=rule, active_fraction=cfg.active_fraction, thresholds=[thresholds[b] for b in blocks],
        predictors=blobs, predictor_rank=cfg.predictor_rank, recall_target=cfg.predictor_recall,
        placement_quality=placement_quality, predictor_metrics=predictor_metrics,
        calib_text=", ".join(n for n, _ in texts), calib_tokens=len(calib) * cfg.chunk_tokens, seed=cfg.seed,
        frequency=frequency, predictor_kind=cfg.predictor,
        sketch_outliers=cfg.sketch_outliers if cfg.predictor == "sketch" else 0,
        sketch_budget=cfg.sketch_budget if cfg.predictor == "sketch" else 0.0)
    by_method = {m: {b: orders_all[b][m] for b in blocks} for m in methods}
    return OfflineResult(by_method[cfg.placement], data, times, by_method, quality, eval_tokens, needed)
