"""``ripple-gguf quickstart``: the real default model, packed and run, in one command.

Fetches SmolLM2-135M-Instruct (:func:`ripple_gguf.models.default_model_path`), converts it into a
cache directory once (a packed file made from the same source bytes is reused), generates greedily
through the unchanged ``llama_cpp.Llama(model_path=...)`` and prints what the RIPPLE backend did.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_TOKENS = 48


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ripple-gguf"


def cache_subdir(name: str, env: str) -> Path:
    """The directory in $``env`` if set, else ``name`` in :func:`default_cache_dir`."""
    return Path(os.environ.get(env) or default_cache_dir() / name)


def packed_path_for(source: os.PathLike, out_dir: os.PathLike) -> Path:
    name = Path(source).name
    stem = name[:-len(".gguf")] if name.endswith(".gguf") else name
    return Path(out_dir) / f"{stem}.ripple.gguf"


def reusable(packed: Path, source_sha256: str) -> bool:
    """True if ``packed`` is an intact ripple file converted from the source with this sha256 by
    the full offline stage (predictors present)."""
    from ripple_gguf.format import RippleFile, RippleFormatError

    if not packed.exists():
        return False
    try:
        rf = RippleFile.open(packed)
        rf.check_quick()
    except (RippleFormatError, OSError):
        return False
    if rf.source.sha256 != source_sha256 or not any(l.predictor_size for l in rf.layers):
        return False
    if any(l.frequency is None for l in rf.layers):  # packed before bundle frequencies were recorded
        return False
    # packed with today's default offline settings (older defaults: convert again)
    from ripple_gguf.offline import OfflineConfig

    from ripple_gguf.constants import Keys

    cfg, pm, sp, md = OfflineConfig(), rf.predictor_metrics or {}, rf.sparsity or {}, rf.metadata
    if md.get(Keys.Predictor.KIND, "lowrank") != cfg.predictor:
        return False
    if cfg.predictor == "sketch":
        return (abs(float(md.get(Keys.Predictor.SKETCH_BUDGET, -1)) - cfg.sketch_budget) < 1e-4
                and int(md.get(Keys.Predictor.SKETCH_OUTLIERS, -1)) == cfg.sketch_outliers)
    fit = pm.get("fit_fraction")
    return (abs(float(sp.get("active_fraction", -1)) - cfg.active_fraction) < 1e-4
            and (fit is None if cfg.predictor_fit_fraction is None
                 else fit is not None and abs(float(fit) - cfg.predictor_fit_fraction) < 1e-4))


def ensure_default_ripple(out_dir: Optional[os.PathLike] = None, *, quiet: bool = False) -> Path:
    """Path of the default model packed into ``out_dir`` (default: ~/.cache/ripple-gguf/) by the
    full converter (profiling, placement, predictors; about a minute on 2 cores), unless a packed
    file of the same source is already there."""
    from ripple_gguf import models
    from ripple_gguf.convert import convert
    from ripple_gguf.offline import OfflineConfig

    src = models.default_model_path()  # verifies the published sha256
    out = Path(out_dir) if out_dir is not None else default_cache_dir()
    dst = packed_path_for(src, out)
    if reusable(dst, models.DEFAULT_SHA256):
        if not quiet:
            print(f"using {dst} (packed from {src.name})", file=sys.stderr)
        return dst
    out.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"packing {src} -> {dst}", file=sys.stderr)
    times: dict = {}
    convert(src, dst, quiet=True, offline=OfflineConfig(quiet=quiet), stage_seconds=times)
    if not quiet:
        print("converted: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()), file=sys.stderr)
    return dst


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def run(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="ripple-gguf quickstart",
                                description="Pack the default model (SmolLM2-135M) and generate with the RIPPLE backend.")
    p.add_argument("--out", metavar="DIR", help=f"where the packed model is kept (default: {default_cache_dir()})")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens to generate (default: {DEFAULT_TOKENS})")
    p.add_argument("--cache-mb", type=float, help="neuron cache budget in MiB (default: the runtime's)")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: llama-cpp-python's)")
    args = p.parse_args(argv)

    import llama_cpp

    import ripple_gguf

    path = ensure_default_ripple(args.out)
    if args.cache_mb is not None:
        ripple_gguf.configure(cache_mb=args.cache_mb)

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=args.threads, seed=0, verbose=False)
    load_s = time.perf_counter() - t0
    load = ripple_gguf.last_load()
    if load.get("path") != str(path) or not load.get("bound_tensors"):
        print(f"ripple-gguf: error: the backend did not take over {path}: {load}", file=sys.stderr)
        return 1

    ripple_gguf.reset_stats()
    t0 = time.perf_counter()
    out = llm(args.prompt, max_tokens=args.tokens, temperature=0.0, top_k=1)
    gen_s = time.perf_counter() - t0
    s = ripple_gguf.stats()
    usage = out["usage"]

    print(f"{args.prompt}{out['choices'][0]['text']}")
    print()
    print(f"model: {path} (loaded in {load_s:.2f} s, {load['bound_tensors']}/{load['expected_tensors']} "
          f"FFN tensors on the RIPPLE backend, load hook {'on' if ripple_gguf.settings()['load_hook'] else 'off'})")
    print(f"tokens: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} generated in {gen_s:.2f} s "
          f"({usage['completion_tokens'] / gen_s:.1f} tokens/s)")
    settings = ripple_gguf.settings()
    mode = settings["mode"]
    if mode == "auto":  # the file's own default
        mode = f"{load.get('default_mode', 'sparse')} (the file's default)"
    print(f"mode {mode}: FFN matmuls served {s['ffn_matmuls']:,}; neurons computed "
          f"{s['neurons_computed']:,} of {s['neurons_total']:,} ({s['neurons_computed'] / max(1, s['neurons_total']):.1%}); "
          f"needed bundles {s['needed_bytes'] / max(1, s['dense_bytes']):.1%} of the dense FFN bytes")
    print(f"read from the file: {_mib(s['bytes_read'])} in {s['read_ops']:,} reads (mean run of needed bundles "
          f"{s['mean_run_length']:.1f}, collapse threshold {settings['collapse_bytes']:,} bytes), "
          f"{s['io_seconds'] * 1e3:.1f} ms of I/O")
    print(f"neuron cache: {s['cache_hits']:,} hits, {s['cache_misses']:,} misses "
          f"(hit rate {s['cache_hit_rate']:.1%}), {_mib(s['cache_bytes'])} of {_mib(s['cache_capacity'])} used")
    err = ripple_gguf.last_error()
    if err:
        print(f"ripple-gguf: backend error: {err}", file=sys.stderr)
        return 1
    if s["ffn_matmuls"] == 0:
        print("ripple-gguf: error: the backend served no FFN matmul", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
