"""``ripple-gguf quickstart``: the real default model, packed and run, in one command.

Fetches SmolLM2-135M-Instruct (:func:`ripple_gguf.eval.models.default_model_path`), converts it
into a cache directory once (a packed file made from the same source bytes is reused), generates
greedily through the unchanged ``llama_cpp.Llama(model_path=...)`` and reports what the RIPPLE
backend did (the command, :mod:`ripple_gguf.cli`, prints it).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Dict, Optional

import ripple_gguf

from .eval import models
from .offline.convert import convert, reusable
from .offline.pipeline import OfflineConfig
from .paths import default_cache_dir

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_TOKENS = 48


def packed_path_for(source: os.PathLike, out_dir: os.PathLike) -> Path:
    name = Path(source).name
    stem = name[:-len(".gguf")] if name.endswith(".gguf") else name
    return Path(out_dir) / f"{stem}.ripple.gguf"


def ensure_default_ripple(out_dir: Optional[os.PathLike] = None, *, quiet: bool = False) -> Path:
    """Path of the default model packed into ``out_dir`` (default: ~/.cache/ripple-gguf/) by the
    full converter (profiling, placement, predictors; about a minute on 2 cores), unless a packed
    file of the same source is already there."""
    src = models.default_model_path()  # verifies the published sha256
    out = Path(out_dir) if out_dir is not None else default_cache_dir()
    dst = packed_path_for(src, out)
    if reusable(dst, models.DEFAULT_SHA256):
        if not quiet:
            log.info("using %s (packed from %s)", dst, src.name)
        return dst
    out.mkdir(parents=True, exist_ok=True)
    if not quiet:
        log.info("packing %s -> %s", src, dst)
    times: dict = {}
    convert(src, dst, quiet=True, offline=OfflineConfig(quiet=quiet), stage_seconds=times)
    if not quiet:
        log.info("converted: %s", ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    return dst


def generate(path: os.PathLike, prompt: str, tokens: int, *, threads: Optional[int] = None) -> Dict[str, object]:
    """Load ``path`` with llama.cpp and generate ``tokens`` greedily after ``prompt``: {"text",
    "load_s", "gen_s", "usage", "load" (what the backend took over: ``ripple_gguf.last_load()``),
    "stats" (of the generation), "settings", "error" (the backend's last error)}."""
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads, seed=0, verbose=False)
    load_s = time.perf_counter() - t0
    load = ripple_gguf.last_load()
    ripple_gguf.reset_stats()
    t0 = time.perf_counter()
    out = llm(prompt, max_tokens=tokens, temperature=0.0, top_k=1)
    gen_s = time.perf_counter() - t0
    return {"text": out["choices"][0]["text"], "load_s": load_s, "gen_s": gen_s, "usage": out["usage"],
            "load": load, "stats": ripple_gguf.stats(), "settings": ripple_gguf.settings(),
            "error": ripple_gguf.last_error()}
