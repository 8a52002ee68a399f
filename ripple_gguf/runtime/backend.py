"""Registration of the RIPPLE backend into llama.cpp's ggml, settings and counters.

Importing :mod:`ripple_gguf` calls :func:`register`: the backend device is added to the ggml
registry that ``libllama.so`` uses, the load hook is installed, and
``llama_cpp.llama_cpp.llama_model_load_from_file`` is wrapped so that, when the file is
ripple-packed, the backend is told which FFN tensors are about to be loaded (and where their
bundles lie) for exactly the duration of that load. Other GGUF files load untouched.
"""
from __future__ import annotations

import json
import os
import threading
import warnings
from typing import Dict, Optional

from .. import binding
from ..format.layout import RippleFormatError
from .settings import CACHE_POLICIES, EXACT_DOWN, IO_ENGINES, MODES, SPARSE_DOWN, from_env, name_of, validate

_lock = threading.Lock()
_state = {"registered": False, "load_hook": None, "load_hook_error": None, "orig_load": None}
_last_load: Dict[str, object] = {}


def register() -> None:
    """Register the backend (idempotent). Called by ``import ripple_gguf``."""
    with _lock:
        if _state["registered"]:
            return
        # every RIPPLE_* variable checked before anything is registered or applied
        raw_env = binding.settings_from_env()
        env = from_env(raw_env)
        binding.register()
        if raw_env["no_load_hook"]:
            _state["load_hook"] = False
            _state["load_hook_error"] = "disabled by RIPPLE_NO_LOAD_HOOK"
        else:
            try:
                binding.loadhook_install()
                _state["load_hook"] = True
            except OSError as e:
                _state["load_hook"] = False
                _state["load_hook_error"] = str(e)
                warnings.warn(
                    "ripple-gguf: load hook unavailable, llama.cpp will read whole ripple files at load: "
                    + _state["load_hook_error"],
                    RuntimeWarning,
                    stacklevel=3,
                )
        _apply(env)
        # diagnostic only (scripts/checksum_cost.py): reads unchecked against the checksum table
        binding.set_verify_reads(raw_env["verify_reads"])
        _wrap_model_loader()
        _state["registered"] = True


def _wrap_model_loader() -> None:
    import llama_cpp.llama_cpp as raw

    if getattr(raw.llama_model_load_from_file, "_ripple_wrapped", False):
        return
    orig = raw.llama_model_load_from_file

    def llama_model_load_from_file(path_model: bytes, params, /):
        path = os.fsdecode(path_model)
        # the library identifies, reads and checks the file (csrc/ripple_file.c: the reader every
        # host uses); a damaged ripple file is refused naming the file, even for a vocabulary load,
        # and never reaches stock llama.cpp as "not ripple"
        claim = not getattr(params, "vocab_only", False)
        try:
            handle = binding.load_begin(path_model, claim)
        except ValueError as e:  # "<path>: <problem>"
            msg = str(e)
            raise RippleFormatError(path, msg[len(path) + 2:] if msg.startswith(path + ": ") else msg) from None
        if handle == 0:
            return orig(path_model, params)
        _apply_storage(path)
        model = None
        try:
            model = orig(path_model, params)
        finally:
            info = binding.model_info(handle)
            binding.model_end_load(handle, bool(model))
        mode = "sparse" if info["default_mode"] == MODES["sparse"] else "exact"
        _last_load.clear()
        _last_load.update(path=path, handle=handle, bound_tensors=info["bound_tensors"],
                          expected_tensors=info["expected_tensors"], default_mode=mode,
                          default_mode_reason=info["default_mode_reason"])
        if model and info["bound_tensors"] != info["expected_tensors"]:
            warnings.warn(
                f"ripple-gguf: {path}: the backend took {info['bound_tensors']} of {info['expected_tensors']} FFN "
                "tensors; the others run on llama.cpp's own devices (GPU offload or tensor overrides route them "
                "elsewhere)",
                RuntimeWarning,
                stacklevel=2,
            )
        return model

    llama_model_load_from_file._ripple_wrapped = True
    llama_model_load_from_file._ripple_orig = orig
    raw.llama_model_load_from_file = llama_model_load_from_file


_collapse = {"mode": "auto"}  # "auto": the storage cost model's threshold, "off", or fixed bytes
_cost = {"model": None}  # the storage.CostModel in force (set at each ripple load)


def _apply_storage(path: str) -> None:
    """Cost model of the device holding ``path`` (its probe-storage profile, else the documented
    default) into the backend: the union-or-stream choice for prompts and, with collapse on
    ("auto"), the collapse threshold."""
    from . import storage

    cm = storage.model_for(path)
    _cost["model"] = cm
    binding.set_cost_model(cm.latency_s, cm.bandwidth_bps, cm.parallelism)
    if _collapse["mode"] == "auto":
        binding.set_collapse_bytes(int(_collapse_gap(cm)))


def _collapse_gap(cm) -> int:
    from dataclasses import replace

    return int(replace(cm, queue_depth=binding.get_io_threads()).collapse_gap_bytes())


def reset_settings() -> Dict[str, object]:
    """Back to the defaults (and the ``RIPPLE_*`` environment variables); returns the settings."""
    _apply(from_env(binding.settings_from_env()))
    return settings()


def configure(*, cache_mb: Optional[float] = None, cache_fraction: Optional[float] = None,
              exact_down: Optional[str] = None, mode: Optional[str] = None, cache_policy: Optional[str] = None,
              collapse=None, direct_io: Optional[bool] = None, io_threads: Optional[int] = None,
              prefetch: Optional[bool] = None, io_engine: Optional[str] = None,
              overlap: Optional[bool] = None, sparse_down: Optional[str] = None) -> Dict[str, object]:
    """Change runtime settings; returns the settings in force (:func:`settings`).

    Every argument is checked before any is applied: a call that raises ValueError (naming the
    keyword) changes nothing. Booleans are True/False, 0/1 or one of the strings "1", "0", "true",
    "false", "yes", "no", "on", "off" (any case); numbers must be finite and within the bounds
    given below; names must be one of those listed. The ``RIPPLE_*`` variables, read at import and
    by :func:`reset_settings`, get the same checks with the variable named in the error.

    mode: ``"sparse"`` (per token and layer only the bundles the layer's predictor selects are
    read and computed, the file's activity rule applied; files or layers without predictors run
    exact), ``"exact"`` (every neuron; logits equal stock llama.cpp's) or ``"auto"`` (default: each
    file's own default mode, ``ripple.runtime.default_mode``: sparse for files with predictors
    unless the converter's self-check found sparse mode too far from exact). Environment:
    ``RIPPLE_MODE``.
    cache_mb: byte budget of the DRAM neuron cache of each loaded ripple model, in MiB (0: no
    cache). cache_fraction: the budget as a fraction of each model's FFN bytes instead (0 < f <= 1).
    Environment: ``RIPPLE_CACHE_MB`` (default 64) or ``RIPPLE_CACHE_FRACTION``.
    cache_policy: ``"pinned"`` (default), ``"lru"``, ``"s3fifo"``, ``"linking"`` (S3-FIFO with Ripple's
    linking-aware admission) or ``"pinned"`` (a static set: the bundles the converter measured as
    most often needed, as many as the budget holds, kept once read and never evicted; the others
    are not cached). Environment: ``RIPPLE_CACHE_POLICY``.
    collapse: ``True`` (default) merges reads whose gap is cheaper to read than a separate request,
    the threshold taken from the storage cost model of the disk holding the model (``ripple-gguf
    probe-storage``; a documented default without a profile), ``False`` never merges, an ``int``
    fixes the threshold in bytes (0 to 2**40). Environment: ``RIPPLE_COLLAPSE`` (a boolean).
    direct_io: read bundles with O_DIRECT (bypassing the page cache, aligned bounce buffers).
    Environment: ``RIPPLE_DIRECT_IO`` (a boolean, default 0).
    io_threads: reader threads, i.e. the queue depth of a layer's batch of reads (default 8, 1 to 64).
    Environment: ``RIPPLE_IO_THREADS``.
    io_engine: ``"auto"`` (default: io_uring for batches of small requests, the reader threads for
    large ones), ``"uring"`` (io_uring through raw system calls) or ``"threads"``. Where the kernel
    refuses io_uring the threads are used and ``settings()["io_engine_note"]`` says why.
    Environment: ``RIPPLE_IO_ENGINE``.
    prefetch: in sparse mode, while a layer computes, read the bundles the next layer's predictor
    selects from this layer's FFN input (one-token batches; not when the cache holds every bundle).
    Environment: ``RIPPLE_PREFETCH`` (a boolean, default 1).
    overlap: issue a layer's reads in pieces and compute the gate/up rows of the bundles already in
    memory, then of each piece as it lands, while the rest are read (``stats()["io_exposed_seconds"]``
    is the read time left uncovered). Environment: ``RIPPLE_OVERLAP`` (a boolean, default 1).
    exact_down: where exact mode computes from: ``"tensor"`` (default) the standard
    ffn_gate/up/down tensors with stock llama.cpp's own dot products (stock's bytes and arithmetic):
    on a read-only mapping of the file, or with ``direct_io`` whole layers kept in the cache's
    budget and the others read with O_DIRECT; ``"bundles"`` from the bundles (the sparse path with
    every neuron: split down columns in stock's integer form, equal to stock up to the order of the
    float additions).
    Environment: ``RIPPLE_EXACT_DOWN``.
    sparse_down: where sparse mode computes the down projection from: ``"auto"`` (default) the
    standard ffn_down rows with stock's dot products, the activations not selected set to 0, when
    the file is read through the page cache (no ``direct_io``: the rows are in memory where stock
    keeps them), else the bundles' down columns; ``"bundles"`` always the bundles' down columns.
    Environment: ``RIPPLE_SPARSE_DOWN``.
    """
    args = dict(cache_mb=cache_mb, cache_fraction=cache_fraction, exact_down=exact_down, mode=mode,
                cache_policy=cache_policy, collapse=collapse, direct_io=direct_io, io_threads=io_threads,
                prefetch=prefetch, io_engine=io_engine, overlap=overlap, sparse_down=sparse_down)
    _apply(validate(args, {k: k for k in args}))
    return settings()


def _apply(v: Dict[str, object]) -> None:
    """Put checked settings (:func:`~ripple_gguf.runtime.settings.validate`) into the backend; none
    of these steps can fail on a checked value, so a call applies all of its settings or (having
    raised in validate) none."""
    if "mode" in v:
        binding.set_mode(MODES[v["mode"]])
    if "io_threads" in v:
        binding.set_io_threads(v["io_threads"])
    if "collapse" in v:
        _collapse["mode"] = v["collapse"]
    if "collapse" in v or "io_threads" in v:  # the auto threshold depends on the queue depth
        mode_c = _collapse["mode"]
        if mode_c == "off":
            binding.set_collapse_bytes(0)
        elif mode_c == "auto":
            from . import storage

            binding.set_collapse_bytes(_collapse_gap(_cost["model"] or storage.DEFAULT))
        else:
            binding.set_collapse_bytes(mode_c)
    if "direct_io" in v:
        binding.set_direct_io(v["direct_io"])
    if "prefetch" in v:
        binding.set_prefetch(v["prefetch"])
    if "overlap" in v:
        binding.set_overlap(v["overlap"])
    if "sparse_down" in v:
        binding.set_sparse_down_rows(SPARSE_DOWN[v["sparse_down"]])
    if "io_engine" in v and not binding.set_io_engine(IO_ENGINES[v["io_engine"]]):
        warnings.warn("ripple-gguf: this build has no io_uring; reading with threads", RuntimeWarning, stacklevel=3)
    cache_mb, cache_fraction, cache_policy = v.get("cache_mb"), v.get("cache_fraction"), v.get("cache_policy")
    policy = CACHE_POLICIES[cache_policy] if cache_policy is not None else binding.get_cache_policy()
    if cache_fraction is not None:
        binding.set_cache_fraction(cache_fraction, policy)
    elif cache_mb is not None or cache_policy is not None:
        frac = binding.get_cache_fraction()
        if cache_mb is None and frac > 0:  # a new policy keeps a fractional budget
            binding.set_cache_fraction(frac, policy)
        else:
            nbytes = int(cache_mb * 1024 * 1024) if cache_mb is not None else binding.get_cache_bytes()
            binding.set_cache(nbytes, policy)
    if "exact_down" in v:
        binding.set_exact_down(EXACT_DOWN[v["exact_down"]])


def settings() -> Dict[str, object]:
    mode = name_of(MODES, binding.get_mode())
    engine, engine_note = binding.get_io_engine()
    return {
        "mode": mode,
        "mode_note": _mode_note(mode),
        "cache_mb": binding.get_cache_bytes() / (1024 * 1024),
        "cache_fraction": binding.get_cache_fraction(),
        "cache_policy": name_of(CACHE_POLICIES, binding.get_cache_policy()),
        "collapse": _collapse["mode"],
        "collapse_bytes": binding.get_collapse_bytes(),
        "direct_io": binding.get_direct_io(),
        "io_threads": binding.get_io_threads(),
        "prefetch": binding.get_prefetch(),
        "overlap": binding.get_overlap(),
        "sparse_down": name_of(SPARSE_DOWN, binding.get_sparse_down_rows()),
        "io_engine": name_of(IO_ENGINES, engine),
        "io_engine_note": engine_note,
        "cost_model": _cost["model"].to_dict() if _cost["model"] is not None else None,
        "exact_down": name_of(EXACT_DOWN, binding.get_exact_down()),
        "load_hook": binding.loadhook_active(),
        "load_hook_error": _state["load_hook_error"],
        "library": str(binding.library_path),
    }


def _mode_note(mode: str) -> str:
    """What the mode setting means for the latest ripple load, and why."""
    if mode != "auto":
        return f"{mode} for every ripple file (set by configure(mode=) or RIPPLE_MODE)"
    if not _last_load:
        return "each ripple file's default mode (ripple.runtime.default_mode)"
    return (f"each ripple file's default mode; {_last_load['path']}: {_last_load['default_mode']} "
            f"({_last_load['default_mode_reason']})")


def stats() -> Dict[str, float]:
    """Process-wide counters of the backend since start or the last :func:`reset_stats`."""
    return json.loads(binding.stats_json())  # the JSON RIPPLE_STATS_FILE receives: one definition


def reset_stats() -> None:
    binding.reset_stats()


def last_error() -> str:
    """The last error the backend met during compute or I/O ("" if none); clears it."""
    return binding.take_last_error()


def last_load() -> Dict[str, object]:
    """What the backend took over in the most recent ripple-file load."""
    return dict(_last_load)
