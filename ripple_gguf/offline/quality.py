"""Quality measurements: logits over a token sequence through llama.cpp, perplexity, top-1
agreement, the recall of each token's largest neurons by a predictor's selection, and the held-out
evaluation text that ships with every CPython."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._stock_eval import greedy, logits_of

log = logging.getLogger(__name__)


def heldout_text(n_chars: int = 20000) -> str:
    """English prose from ``pydoc_data.topics`` (shipped with CPython), taken from the end of the
    sorted topic list. Calibration (the offline stage) draws from the start of the list, so the
    two never overlap."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    text, i = [], len(keys) - 1
    while sum(map(len, text)) < n_chars and i >= 0:
        text.append(topics[keys[i]])
        i -= 1
    return "\n".join(reversed(text))[-n_chars:]


# The largest neurons of a token (by |h|, h the post-activation vector, the input of the down
# matmul) decide most of what sparse mode loses: the recall of the top TOP_RECALL_FRACTION of them.
TOP_RECALL_FRACTION = 0.02


def top_indices(score: np.ndarray, fraction: float = TOP_RECALL_FRACTION) -> np.ndarray:
    """(T, k) int32: per row of ``score`` (T, n_ff), e.g. |h|, the columns of its k = ceil(fraction x
    n_ff) largest values (in no particular order); -1 for those among them that are 0 (a ReLU-family
    token with fewer than k nonzero neurons), which no selection needs."""
    score = np.asarray(score)
    if score.ndim != 2 or score.shape[1] == 0:
        raise ValueError(f"top_indices: expected a (tokens, n_ff) array, got shape {score.shape}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top_indices: fraction must be in (0, 1], got {fraction}")
    n = score.shape[1]
    k = min(n, max(1, math.ceil(round(fraction * n, 9))))
    idx = np.argpartition(-score, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(score), 1))
    idx = idx.astype(np.int32)
    idx[np.take_along_axis(score, idx, axis=1) <= 0] = -1
    return idx


def index_recall(selected: np.ndarray, idx: np.ndarray) -> float:
    """Mean over tokens of the fraction of each token's neurons ``idx`` (T, k; -1: none) that the
    (T, n_ff) bool mask ``selected`` holds; tokens with no neuron listed are left out (1.0 when no
    token lists one)."""
    selected = np.asarray(selected, dtype=bool)
    idx = np.asarray(idx)
    if selected.ndim != 2 or idx.ndim != 2 or len(selected) != len(idx):
        raise ValueError(f"index_recall: selected mask {selected.shape} and indices {idx.shape} do not match")
    if idx.size and idx.max() >= selected.shape[1]:
        raise ValueError(f"index_recall: neuron index {int(idx.max())} beyond n_ff {selected.shape[1]}")
    listed = idx >= 0
    hits = np.take_along_axis(selected, np.where(listed, idx, 0), axis=1) & listed
    n = listed.sum(axis=1)
    keep = n > 0
    return float((hits.sum(axis=1)[keep] / n[keep]).mean()) if keep.any() else 1.0


def top_recall(selected: np.ndarray, score: np.ndarray, fraction: float = TOP_RECALL_FRACTION) -> float:
    """Top-``fraction`` recall of a selection: per token, the fraction of its ceil(fraction x n_ff)
    neurons of largest ``score`` (|h|; nonzero ones only) that the bool mask ``selected`` (T, n_ff)
    holds, averaged over the tokens. Any predictor's selection can be measured this way."""
    if np.shape(selected) != np.shape(score):
        raise ValueError(f"top_recall: selected mask {np.shape(selected)} and scores {np.shape(score)} differ")
    return index_recall(selected, top_indices(score, fraction))


def run(path: os.PathLike, *, tokens: Sequence[int] = (), prompt_tokens: Sequence[int] = (), n_greedy: int = 0,
        stock: bool = False, n_ctx: int = 512, n_threads: int = 2, n_batch: int = 512) -> Dict[str, np.ndarray]:
    """{"logits": logits at every position of ``tokens``, "greedy": ``n_greedy`` argmax tokens after
    ``prompt_tokens``} from llama.cpp on ``path``: in this process (the plugin is active for
    ripple-packed files), or with ``stock=True`` in a fresh interpreter that never imports
    ripple_gguf, i.e. stock llama.cpp."""
    spec = dict(tokens=list(map(int, tokens)), prompt_tokens=list(map(int, prompt_tokens)), n_greedy=n_greedy,
                n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch)
    if stock:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "out.npz")
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_stock_eval.py")
            r = subprocess.run([sys.executable, script, os.fspath(path), out, json.dumps(spec)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"stock llama.cpp failed on {path}: {r.stderr[-2000:]}")
            with np.load(out) as z:
                return {k: z[k] for k in z.files}
    import llama_cpp

    llm = llama_cpp.Llama(model_path=os.fspath(path), n_ctx=n_ctx, logits_all=True, n_threads=n_threads,
                          n_batch=n_batch, verbose=False)
    try:
        result = {}
        if spec["tokens"]:
            result["logits"] = logits_of(llm, spec["tokens"])
        if n_greedy:
            result["greedy"] = np.array(greedy(llm, spec["prompt_tokens"], n_greedy), dtype=np.int64)
        return result
    finally:
        llm.close()


def perplexity(logits: np.ndarray, tokens: Sequence[int]) -> float:
    """Perplexity of tokens[1:] under logits[:-1]."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    nll = -logp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]
    return float(np.exp(nll.mean()))


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def tokenize(path: os.PathLike, text: str, n_tokens: Optional[int] = None) -> List[int]:
    """The first ``n_tokens`` tokens of ``text`` with the model's own tokenizer (BOS first)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=os.fspath(path), vocab_only=True, verbose=False)
    try:
        toks = llm.tokenize(text.encode(), add_bos=True)
    finally:
        llm.close()
    if n_tokens is None:
        return toks
    if len(toks) < n_tokens:
        raise ValueError(f"the text has only {len(toks)} tokens, {n_tokens} wanted")
    return toks[:n_tokens]


def chunks_nll(ctx, chunks: Sequence[Sequence[int]]) -> np.ndarray:
    """Negative log-likelihood of every predicted token of every chunk (a profile.EvalContext)."""
    out = []
    for c in chunks:
        ctx.decode(c)
        lg = ctx.logits(len(c))[:-1].astype(np.float64)
        lg -= lg.max(axis=-1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(axis=-1, keepdims=True))
        out.append(-logp[np.arange(len(c) - 1), np.asarray(c[1:])])
    return np.concatenate(out)


def oracle_perplexity(src: os.PathLike, chunks: Sequence[Sequence[int]], thresholds: Dict[int, float],
                      rule: str, activation: str = "silu", *, chunk_tokens: int = 512,
                      n_threads: Optional[int] = None) -> Tuple[float, float]:
    """(perplexity, fraction of neurons dropped) of stock llama.cpp on ``src`` (a gated FFN) when
    every neuron at or below its layer's threshold is dropped, with the true activations (what a
    perfect predictor would give). ``rule``: "gate" (|act(gate)|, CATS) or "magnitude" (|h|)."""
    from .. import binding
    from .profile import EvalContext

    n_blocks = max(thresholds) + 1 if thresholds else 1
    thr = np.full(n_blocks, -1.0, dtype=np.float32)
    for b, t in thresholds.items():
        thr[b] = t
    if rule not in ("gate", "magnitude"):
        raise ValueError(f"oracle sparsity supports the rules gate and magnitude, not {rule!r}")
    s = binding.Sparsify(thr, binding.ACTIVITY_RULES[rule], binding.GLU_ACTIVATIONS[activation])
    with EvalContext(src, s.callback, s.user_data, chunk_tokens=chunk_tokens, n_threads=n_threads) as ctx:
        nll = chunks_nll(ctx, chunks)
    if s.errors:
        raise RuntimeError(f"{src}: {s.errors} gate outputs could not be sparsified in place")
    return float(np.exp(nll.mean())), s.zeroed_fraction


def perplexity_of_file(path: os.PathLike, tokens: Sequence[int], *, chunk: int = 512,
                       n_threads: Optional[int] = None) -> float:
    """Perplexity of ``tokens`` (evaluated in chunks of ``chunk``, each from a fresh context) with
    llama.cpp in this process: the RIPPLE backend serves ripple-packed files."""
    nll = []
    for i in range(0, len(tokens) - 1, chunk):
        c = list(tokens[i:i + chunk])
        if len(c) < 2:
            break
        lg = run(path, tokens=c, n_ctx=chunk, n_batch=chunk, n_threads=n_threads or 2)["logits"].astype(np.float64)[:-1]
        lg -= lg.max(axis=-1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(axis=-1, keepdims=True))
        nll.append(-logp[np.arange(len(c) - 1), np.asarray(c[1:])])
    return float(np.exp(np.concatenate(nll).mean()))


# characters of text taken per token wanted: ample for English (4-5 characters per token)
CHARS_PER_TOKEN = 60


def heldout_tokens(path: os.PathLike, n_tokens: int, text: Optional[str] = None) -> List[int]:
    """The first ``n_tokens`` tokens (fewer if the text is shorter) of ``text``, by default the
    held-out text (:func:`heldout_text`), with the model's tokenizer."""
    if text is None:
        text = heldout_text(CHARS_PER_TOKEN * n_tokens)
    return tokenize(path, text, None)[:n_tokens]


def mode_perplexity(path: os.PathLike, tokens: Sequence[int], mode: str, *, chunk: int = 512,
                    n_threads: Optional[int] = None, decode_tokens: int = 0) -> Dict[str, object]:
    """Perplexity of ``tokens`` on ``path`` with the RIPPLE backend in ``mode`` ("exact" or
    "sparse") and the backend's counters of that run: {"ppl", "tokens", "stats"}. Windows of
    ``chunk`` tokens are decoded as prompt batches, so "needed_bytes" there counts the union of
    each batch's sets. With ``decode_tokens`` > 0 the first that many tokens are also decoded one at a
    time (generation), and "decode_stats" holds the counters of that run, where "needed_bytes" /
    "tokens" is the bytes of the bundles a single token needs. The previous mode is restored."""
    from ..runtime import backend as runtime

    previous = runtime.settings()["mode"]
    runtime.configure(mode=mode)
    try:
        runtime.reset_stats()
        ppl = perplexity_of_file(path, tokens, chunk=chunk, n_threads=n_threads)
        out: Dict[str, object] = {"mode": mode, "ppl": ppl, "tokens": len(tokens), "stats": runtime.stats()}
        if decode_tokens > 0:
            runtime.reset_stats()
            run(path, tokens=list(tokens[:decode_tokens]), n_ctx=max(decode_tokens, 8), n_batch=1,
                n_threads=n_threads or 2)
            out["decode_stats"] = runtime.stats()
            out["decode_tokens"] = min(decode_tokens, len(tokens))
        return out
    finally:
        runtime.configure(mode=previous)


# The converter's check of its own output (self_check): held-out recall of the predictors at least
# RECALL_FLOOR x their recall target, and sparse-mode perplexity at most SPARSE_PPL_LIMIT above
# exact mode's on SELF_CHECK_TOKENS held-out tokens; otherwise the file's default mode is exact.
RECALL_FLOOR = 0.8
SPARSE_PPL_LIMIT = 0.05
SELF_CHECK_TOKENS = 512
SELF_CHECK_CHUNK = 256
# ... and sparse mode must be able to read less than exact mode: for PAGE_CHECK_TOKENS held-out
# tokens decoded one at a time, neither the PAGE_BYTES pages holding the bundles its predictors
# select nor the bytes the runtime reads for them with no cache (O_DIRECT, the collapse threshold of
# the disk holding the file) may exceed PAGE_LIMIT of the layers' bundle bytes. A read moves whole
# pages, and runs of needed bundles are merged across short gaps: SmolLM2-135M's 1008-byte bundles
# at 67% selected touch 97.7% of the pages, a random-weight 1B model's 3584-byte ones 88% of the
# pages but 98% of the bytes once collapsed, and exact mode was faster on both in every regime
# measured (docs/BENCHMARKS.md)
PAGE_BYTES = 4096
PAGE_LIMIT = 0.9
PAGE_CHECK_TOKENS = 64


def page_fraction(path: os.PathLike, tokens: Sequence[int], *, page: int = PAGE_BYTES,
                  n_threads: Optional[int] = None) -> Dict[str, float]:
    """Sparse mode's needed bundles for ``tokens`` decoded one at a time on ``path``, against the
    ``page``-byte pages that hold them (each layer's bundles start page-aligned) and against what
    the runtime reads for them with no neuron cache, with O_DIRECT and the collapse threshold of the
    disk holding the file (a replay of those tokens' selections): {"needed": needed bundle bytes /
    dense, "pages": bytes of the pages touched / dense, "read": bytes read / dense, "requests" per
    token, "collapse_bytes", "tokens", "bundle_size"}; dense is the layers' bundle bytes."""
    from ..format.reader import RippleFile
    from ..runtime import backend as runtime
    from ..runtime import trace

    rf = RippleFile.open(path)
    previous = runtime.settings()["mode"]
    runtime.configure(mode="sparse")
    trace.start()
    try:
        run(path, tokens=list(tokens), n_ctx=max(len(tokens), 8), n_batch=1, n_threads=n_threads or 2)
    finally:
        records = trace.stop()
        runtime.configure(mode=previous)
    need = pages = dense = 0
    position: Dict[int, np.ndarray] = {}
    for r in records:
        L = rf.layers[r.layer]
        if r.layer not in position:
            order = np.asarray(L.order)
            position[r.layer] = np.empty_like(order)
            position[r.layer][order] = np.arange(len(order))
        size = L.n_ff * L.bundle_size
        start = position[r.layer][r.neurons].astype(np.int64) * L.bundle_size
        n_pages = (size + page - 1) // page
        edge = np.zeros(n_pages + 1, np.int64)  # +1 at a bundle's first page, -1 after its last
        np.add.at(edge, start // page, 1)
        np.add.at(edge, (start + L.bundle_size - 1) // page + 1, -1)
        touched = np.cumsum(edge[:-1]) > 0
        need += len(start) * L.bundle_size
        pages += int(touched.sum()) * page - (page * n_pages - size if touched[-1] else 0)  # a last page may be partial
        dense += size
    before = runtime.settings()
    runtime.configure(cache_mb=0, direct_io=True)
    try:
        st = trace.replay(path, records, drop_page_cache=False)
        collapse = runtime.settings()["collapse_bytes"]
    finally:
        if before["cache_fraction"] > 0:
            runtime.configure(cache_fraction=before["cache_fraction"], direct_io=before["direct_io"])
        else:
            runtime.configure(cache_mb=before["cache_mb"], direct_io=before["direct_io"])
    n = max(1, records.tokens)
    return {"needed": need / dense if dense else 1.0, "pages": pages / dense if dense else 1.0,
            "read": st["bytes_read"] / dense if dense else 1.0, "requests": st["read_ops"] / n,
            "collapse_bytes": collapse, "tokens": records.tokens,
            "bundle_size": rf.layers[0].bundle_size if rf.layers else 0}


def self_check(path: os.PathLike, *, n_tokens: int = SELF_CHECK_TOKENS) -> Dict[str, object]:
    """Check a freshly written ripple file with predictors (any name: the runtime recognises ripple
    files by content): raises RippleFormatError when a predictor or threshold is not finite,
    else returns {"default_mode": "sparse"|"exact", "reason", "recall", "recall_floor",
    "exact_ppl", "sparse_ppl", "tokens", "page_fraction", "needed_fraction"}: exact when the
    predictors' held-out recall is below the floor, sparse mode's perplexity exceeds exact mode's by
    more than SPARSE_PPL_LIMIT, or its selections touch more than PAGE_LIMIT of the FFN's pages."""
    from ..format.constants import Keys
    from ..format.layout import RippleFormatError
    from ..format.reader import RippleFile
    from .predictor import read_predictor

    p = os.fspath(path)
    rf = RippleFile.open(p)  # refuses non-finite activity thresholds
    for layer in rf.layers:
        try:
            read_predictor(rf, layer).check_finite()
        except ValueError as e:
            raise RippleFormatError(p, f"layer {layer.block}: predictor: {e}") from None
    metrics = rf.predictor_metrics or {}
    recall = float(metrics.get("recall", 0.0))
    # a low-rank predictor is tuned to a recall of the active neurons, a sketch to a budget (its
    # recall of the active set is bounded by the budget): only the perplexity judges a sketch
    sketch = rf.metadata.get(Keys.Predictor.KIND) == "sketch"
    floor = 0.0 if sketch else RECALL_FLOOR * float(rf.metadata.get(Keys.Predictor.RECALL_TARGET, 1.0))
    toks = heldout_tokens(p, n_tokens)
    exact = mode_perplexity(p, toks, "exact", chunk=SELF_CHECK_CHUNK)["ppl"]
    sparse = mode_perplexity(p, toks, "sparse", chunk=SELF_CHECK_CHUNK)["ppl"]
    pf = page_fraction(p, toks[:PAGE_CHECK_TOKENS])
    out: Dict[str, object] = dict(recall=recall, recall_floor=floor, exact_ppl=exact, sparse_ppl=sparse,
                                  tokens=len(toks), default_mode="sparse", reason="", page_fraction=pf["pages"],
                                  read_fraction=pf["read"], needed_fraction=pf["needed"])
    if not np.isfinite(sparse) or not np.isfinite(exact):
        out.update(default_mode="exact", reason=f"perplexity not finite (exact {exact}, sparse {sparse})")
    elif recall < floor:
        out.update(default_mode="exact", reason=f"predictor recall {recall:.3f} on held-out text is below the "
                                                 f"floor {floor:.3f} ({RECALL_FLOOR} x the recall target)")
    elif sparse > exact * (1 + SPARSE_PPL_LIMIT):
        out.update(default_mode="exact", reason=f"sparse-mode perplexity {sparse:.4g} is {sparse / exact - 1:+.1%} "
                                                 f"over exact mode's {exact:.4g} on {len(toks)} held-out tokens "
                                                 f"(limit +{SPARSE_PPL_LIMIT:.0%})")
    elif max(pf["pages"], pf["read"]) > PAGE_LIMIT:
        # (under 256 characters: the runtime keeps the reason in a fixed buffer, ripple.h)
        out.update(default_mode="exact", reason=f"sparse mode cannot read less than exact mode: on {pf['tokens']} "
                                                 f"held-out tokens its selections are {pf['needed']:.1%} of the FFN's "
                                                 f"bytes but touch {pf['pages']:.1%} of its {PAGE_BYTES // 1024} KiB "
                                                 f"pages ({pf['bundle_size']}-byte bundles) and take {pf['read']:.1%} "
                                                 f"to read (collapse {pf['collapse_bytes']:,} bytes; limit "
                                                 f"{PAGE_LIMIT:.0%})")
    return out


def check_output(path: str, offline: "OfflineData", *, quiet: bool, stage_seconds: dict) -> "OfflineData":
    """The converter's self-check of a written file with predictors (quality.self_check): raises
    on non-finite predictors or thresholds; returns ``offline`` when sparse mode passed, else a copy
    with exact as the default mode and the reason, which the caller writes instead."""
    t0 = time.perf_counter()
    r = self_check(path)
    stage_seconds["self-check"] = time.perf_counter() - t0
    if r["default_mode"] == "sparse":
        if not quiet:
            log.info("self-check: sparse mode perplexity %.4g vs exact %.4g (%+.1f%%) on %d held-out tokens, "
                     "predictor recall %.3f, pages touched %.1f%% and bytes read %.1f%% of the FFN's: default mode "
                     "sparse", r["sparse_ppl"], r["exact_ppl"], 100 * (r["sparse_ppl"] / r["exact_ppl"] - 1), r["tokens"],
                     r["recall"], 100 * r["page_fraction"], 100 * r["read_fraction"])
        return offline
    log.warning("%s: the file's default mode is exact (sparse mode stays available with RIPPLE_MODE=sparse or "
                "configure(mode='sparse'))", r["reason"])
    return replace(offline, default_mode="exact", default_mode_reason=r["reason"])
