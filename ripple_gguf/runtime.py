"""Registration of the RIPPLE backend into llama.cpp's ggml, settings and counters.

Importing :mod:`ripple_gguf` calls :func:`register`: the backend device is added to the ggml
registry that ``libllama.so`` uses, the load hook is installed, and
``llama_cpp.llama_cpp.llama_model_load_from_file`` is wrapped so that, when the file is
ripple-packed, the backend is told which FFN tensors are about to be loaded (and where their
bundles lie) for exactly the duration of that load. Other GGUF files load untouched.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import threading
import warnings
from typing import Dict, Optional

import numpy as np

from . import _native
from .format import RippleFormatError

DEFAULT_CACHE_MB = 64

_lock = threading.Lock()
_state = {"registered": False, "load_hook": None, "load_hook_error": None, "orig_load": None}
_last_load: Dict[str, object] = {}


def _err_buf():
    return _native.ffi.new("char[]", 512)


def register() -> None:
    """Register the backend (idempotent). Called by ``import ripple_gguf``."""
    with _lock:
        if _state["registered"]:
            return
        # every RIPPLE_* variable checked before anything is registered or applied
        env = _settings_from_env()
        raw_env = _native.ffi.new("ripple_env_settings *")
        _native.lib.ripple_settings_from_env(raw_env, _err_buf(), 512)  # checked just above
        no_hook = bool(raw_env.no_load_hook)
        err = _err_buf()
        if _native.lib.ripple_register(err, 512) != 0:
            raise ImportError(f"ripple-gguf cannot register its ggml backend: {_native.error_text(err)}")
        if no_hook:
            _state["load_hook"] = False
            _state["load_hook_error"] = "disabled by RIPPLE_NO_LOAD_HOOK"
        else:
            err = _err_buf()
            if _native.lib.ripple_loadhook_install(err, 512) == 0:
                _state["load_hook"] = True
            else:
                _state["load_hook"] = False
                _state["load_hook_error"] = _native.error_text(err)
                warnings.warn(
                    "ripple-gguf: load hook unavailable, llama.cpp will read whole ripple files at load: "
                    + _state["load_hook_error"],
                    RuntimeWarning,
                    stacklevel=3,
                )
        _apply(env)
        # diagnostic only (scripts/checksum_cost.py): reads unchecked against the checksum table
        _native.lib.ripple_set_verify_reads(raw_env.verify_reads)
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
        err = _native.ffi.new("char[]", 1024)
        handle = _native.lib.ripple_load_begin(path_model, 1 if claim else 0, err, 1024)
        if handle < 0:
            msg = _native.error_text(err)
            raise RippleFormatError(path, msg[len(path) + 2:] if msg.startswith(path + ": ") else msg)
        if handle == 0:
            return orig(path_model, params)
        _apply_storage(path)
        model = None
        try:
            model = orig(path_model, params)
        finally:
            info = _native.ffi.new("ripple_model_info *")
            _native.lib.ripple_model_get_info(handle, info)
            _native.lib.ripple_model_end_load(handle, 1 if model else 0)
        mode = "sparse" if info.default_mode == MODES["sparse"] else "exact"
        _last_load.clear()
        _last_load.update(path=path, handle=handle, bound_tensors=info.bound_tensors,
                          expected_tensors=info.expected_tensors, default_mode=mode,
                          default_mode_reason=_native.ffi.string(info.default_mode_reason).decode())
        if model and info.bound_tensors != info.expected_tensors:
            warnings.warn(
                f"ripple-gguf: {path}: the backend took {info.bound_tensors} of {info.expected_tensors} FFN "
                "tensors; the others run on llama.cpp's own devices (GPU offload or tensor overrides route them "
                "elsewhere)",
                RuntimeWarning,
                stacklevel=2,
            )
        return model

    llama_model_load_from_file._ripple_wrapped = True
    llama_model_load_from_file._ripple_orig = orig
    raw.llama_model_load_from_file = llama_model_load_from_file


EXACT_DOWN = {"tensor": 0, "bundles": 1}
SPARSE_DOWN = {"bundles": 0, "auto": 1}
MODES = {"exact": 0, "sparse": 1, "auto": 2}
CACHE_POLICIES = {"lru": 0, "s3fifo": 1, "linking": 2, "pinned": 3}
IO_ENGINES = {"threads": 0, "uring": 1, "auto": 2}
_RULES = {"nonzero": 0, "magnitude": 1}
_collapse = {"mode": "auto"}  # "auto": the storage cost model's threshold, "off", or fixed bytes
_cost = {"model": None}  # the storage.CostModel in force (set at each ripple load)


def _apply_storage(path: str) -> None:
    """Cost model of the device holding ``path`` (its probe-storage profile, else the documented
    default) into the backend: the union-or-stream choice for prompts and, with collapse on
    ("auto"), the collapse threshold."""
    from . import storage

    cm = storage.model_for(path)
    _cost["model"] = cm
    _native.lib.ripple_set_cost_model(cm.latency_s, cm.bandwidth_bps, cm.parallelism)
    if _collapse["mode"] == "auto":
        _native.lib.ripple_set_collapse_bytes(int(_collapse_gap(cm)))


def _collapse_gap(cm) -> int:
    from dataclasses import replace

    return int(replace(cm, queue_depth=_native.lib.ripple_get_io_threads()).collapse_gap_bytes())


# Upper bounds (README, Settings): beyond them a value is a typo, not a configuration.
MAX_CACHE_MB = 1 << 20  # 1 TiB
MAX_IO_THREADS = 64  # RIPPLE_IO_MAX_THREADS in csrc/ripple_io.c
MAX_COLLAPSE_BYTES = 1 << 40
_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_BOOL_RULE = 'True/False, 0/1 or one of "1", "0", "true", "false", "yes", "no", "on", "off"'

class _BadSetting(ValueError):
    def __init__(self, label: str, rule: str, value):
        self.label, self.rule = label, rule
        super().__init__(f"{label} must be {rule}, got {value!r}")


def _bool(label: str, v) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, numbers.Integral) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[v.strip().lower()]
    raise _BadSetting(label, _BOOL_RULE, v)


def _number(label: str, v, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False, unit: str = ""):
    """``v`` as an int (``integer``) or a finite float in [lo, hi] ((lo, hi] with ``lo_open``)."""
    kind = "whole number" if integer else "finite number"
    rule = f"a {kind}{unit} in {'(' if lo_open else '['}{lo}, {hi}]"
    ok_type = isinstance(v, numbers.Integral) if integer else isinstance(v, numbers.Real)
    if isinstance(v, (bool, np.bool_)) or not ok_type:
        raise _BadSetting(label, rule, v)
    x = int(v) if integer else float(v)
    if not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo):
        raise _BadSetting(label, rule, v)
    return x


def _choice(table: dict):
    def check(label: str, v) -> str:
        if not isinstance(v, str) or v not in table:
            raise _BadSetting(label, f"one of {', '.join(table)}", v)
        return v
    return check


def _collapse_value(label: str, v):
    """"auto" (True), "off" (False) or a fixed gap in bytes (an int)."""
    if isinstance(v, (bool, np.bool_, str)):
        return "auto" if _bool(label, v) else "off"
    if isinstance(v, numbers.Integral) and 0 <= v <= MAX_COLLAPSE_BYTES:
        return int(v)
    raise _BadSetting(label, f"True, False or a whole number of bytes in [0, {MAX_COLLAPSE_BYTES}]", v)


_CHECKS = {
    "mode": _choice(MODES),
    "cache_mb": lambda label, v: _number(label, v, 0, MAX_CACHE_MB, unit=" of MiB"),
    "cache_fraction": lambda label, v: _number(label, v, 0, 1, lo_open=True),
    "cache_policy": _choice(CACHE_POLICIES),
    "collapse": _collapse_value,
    "direct_io": _bool,
    "io_threads": lambda label, v: _number(label, v, 1, MAX_IO_THREADS, integer=True),
    "io_engine": _choice(IO_ENGINES),
    "prefetch": _bool,
    "overlap": _bool,
    "exact_down": _choice(EXACT_DOWN),
    "sparse_down": _choice(SPARSE_DOWN),
}


def _validate(values: Dict[str, object], labels: Dict[str, str]) -> Dict[str, object]:
    """The given (non-None) settings checked and normalized; ValueError naming ``labels[key]``."""
    out = {k: _CHECKS[k](labels[k], v) for k, v in values.items() if v is not None}
    if "cache_mb" in out and "cache_fraction" in out:
        raise ValueError(f"give {labels['cache_mb']} or {labels['cache_fraction']}, not both")
    return out


def _settings_from_env() -> Dict[str, object]:
    """Every setting from its RIPPLE_* variable (the default when unset or empty), checked by the
    library (csrc/ripple_settings.c: the parser every host uses); ValueError naming the variable."""
    env = _native.ffi.new("ripple_env_settings *")
    err = _err_buf()
    if _native.lib.ripple_settings_from_env(env, err, 512) != 0:
        raise ValueError(_native.error_text(err))
    name = lambda table, v: next(k for k, x in table.items() if x == v)
    out = {"mode": name(MODES, env.mode), "cache_policy": name(CACHE_POLICIES, env.cache_policy),
           "collapse": "auto" if env.collapse else "off", "direct_io": bool(env.direct_io),
           "io_threads": env.io_threads, "io_engine": name(IO_ENGINES, env.io_engine),
           "prefetch": bool(env.prefetch), "overlap": bool(env.overlap),
           "exact_down": name(EXACT_DOWN, env.exact_down), "sparse_down": name(SPARSE_DOWN, env.sparse_down)}
    if env.cache_fraction > 0:
        out["cache_fraction"] = env.cache_fraction
    else:
        out["cache_mb"] = env.cache_mb
    return out


def reset_settings() -> Dict[str, object]:
    """Back to the defaults (and the ``RIPPLE_*`` environment variables); returns the settings."""
    _apply(_settings_from_env())
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
    _apply(_validate(args, {k: k for k in args}))
    return settings()


def _apply(v: Dict[str, object]) -> None:
    """Put checked settings (:func:`_validate`) into the backend; none of these steps can fail on
    a checked value, so a call applies all of its settings or (having raised in _validate) none."""
    lib = _native.lib
    if "mode" in v:
        _setter_ok(lib.ripple_set_mode(MODES[v["mode"]]), "mode")
    if "io_threads" in v:
        _setter_ok(lib.ripple_set_io_threads(v["io_threads"]), "io_threads")
    if "collapse" in v:
        _collapse["mode"] = v["collapse"]
    if "collapse" in v or "io_threads" in v:  # the auto threshold depends on the queue depth
        mode_c = _collapse["mode"]
        if mode_c == "off":
            lib.ripple_set_collapse_bytes(0)
        elif mode_c == "auto":
            from . import storage

            lib.ripple_set_collapse_bytes(_collapse_gap(_cost["model"] or storage.DEFAULT))
        else:
            lib.ripple_set_collapse_bytes(mode_c)
    if "direct_io" in v:
        lib.ripple_set_direct_io(1 if v["direct_io"] else 0)
    if "prefetch" in v:
        lib.ripple_set_prefetch(1 if v["prefetch"] else 0)
    if "overlap" in v:
        lib.ripple_set_overlap(1 if v["overlap"] else 0)
    if "sparse_down" in v:
        lib.ripple_set_sparse_down_rows(SPARSE_DOWN[v["sparse_down"]])
    if "io_engine" in v and lib.ripple_set_io_engine(IO_ENGINES[v["io_engine"]]) != 0:
        warnings.warn("ripple-gguf: this build has no io_uring; reading with threads", RuntimeWarning, stacklevel=3)
    cache_mb, cache_fraction, cache_policy = v.get("cache_mb"), v.get("cache_fraction"), v.get("cache_policy")
    policy = CACHE_POLICIES[cache_policy] if cache_policy is not None else lib.ripple_get_cache_policy()
    if cache_fraction is not None:
        _setter_ok(lib.ripple_set_cache_fraction(cache_fraction, policy), "cache_fraction")
    elif cache_mb is not None or cache_policy is not None:
        frac = lib.ripple_get_cache_fraction()
        if cache_mb is None and frac > 0:  # a new policy keeps a fractional budget
            _setter_ok(lib.ripple_set_cache_fraction(frac, policy), "cache_policy")
        else:
            nbytes = int(cache_mb * 1024 * 1024) if cache_mb is not None else lib.ripple_get_cache_bytes()
            _setter_ok(lib.ripple_set_cache(nbytes, policy), "cache_mb")
    if "exact_down" in v:
        _setter_ok(lib.ripple_set_exact_down(EXACT_DOWN[v["exact_down"]]), "exact_down")


def _setter_ok(rc: int, what: str) -> None:
    if rc != 0:  # _validate let through a value the backend refuses: a bug, not bad input
        raise RuntimeError(f"ripple-gguf: the backend refused the checked {what} setting")


def _io_engine() -> Dict[str, object]:
    why = _native.ffi.new("char[]", 256)
    engine = _native.lib.ripple_get_io_engine(why, 256)
    name = next(k for k, v in IO_ENGINES.items() if v == engine)
    return {"io_engine": name, "io_engine_note": _native.error_text(why)}


def settings() -> Dict[str, object]:
    down = _native.lib.ripple_get_exact_down()
    name = lambda table, v: next(k for k, x in table.items() if x == v)
    mode = name(MODES, _native.lib.ripple_get_mode())
    return {
        "mode": mode,
        "mode_note": _mode_note(mode),
        "cache_mb": _native.lib.ripple_get_cache_bytes() / (1024 * 1024),
        "cache_fraction": _native.lib.ripple_get_cache_fraction(),
        "cache_policy": name(CACHE_POLICIES, _native.lib.ripple_get_cache_policy()),
        "collapse": _collapse["mode"],
        "collapse_bytes": _native.lib.ripple_get_collapse_bytes(),
        "direct_io": bool(_native.lib.ripple_get_direct_io()),
        "io_threads": _native.lib.ripple_get_io_threads(),
        "prefetch": bool(_native.lib.ripple_get_prefetch()),
        "overlap": bool(_native.lib.ripple_get_overlap()),
        "sparse_down": next(k for k, v in SPARSE_DOWN.items() if v == _native.lib.ripple_get_sparse_down_rows()),
        **_io_engine(),
        "cost_model": _cost["model"].to_dict() if _cost["model"] is not None else None,
        "exact_down": next(k for k, v in EXACT_DOWN.items() if v == down),
        "load_hook": bool(_native.lib.ripple_loadhook_active()),
        "load_hook_error": _state["load_hook_error"],
        "library": str(_native.library_path),
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
    buf = _native.ffi.new("char[]", 4096)
    _native.lib.ripple_stats_json(buf, 4096)  # the JSON RIPPLE_STATS_FILE receives: one definition
    return json.loads(_native.ffi.string(buf).decode())


def reset_stats() -> None:
    _native.lib.ripple_reset_stats()


def last_error() -> str:
    """The last error the backend met during compute or I/O ("" if none); clears it."""
    buf = _native.ffi.new("char[]", 1024)
    _native.lib.ripple_take_last_error(buf, 1024)
    return _native.error_text(buf)


def last_load() -> Dict[str, object]:
    """What the backend took over in the most recent ripple-file load."""
    return dict(_last_load)
