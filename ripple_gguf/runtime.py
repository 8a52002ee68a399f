"""Registration of the RIPPLE backend into llama.cpp's ggml, settings and counters.

Importing :mod:`ripple_gguf` calls :func:`register`: the backend device is added to the ggml
registry that ``libllama.so`` uses, the load hook is installed, and
``llama_cpp.llama_cpp.llama_model_load_from_file`` is wrapped so that, when the file is
ripple-packed, the backend is told which FFN tensors are about to be loaded (and where their
bundles lie) for exactly the duration of that load. Other GGUF files load untouched.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Dict, Optional

import numpy as np

from . import _native
from .format import RippleFile

DEFAULT_CACHE_MB = 64

_lock = threading.Lock()
_state = {"registered": False, "load_hook": None, "load_hook_error": None, "orig_load": None}
_last_load: Dict[str, object] = {}


class RippleLoadError(RuntimeError):
    """The backend could not take over a ripple-packed file."""


def _err_buf():
    return _native.ffi.new("char[]", 512)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def register() -> None:
    """Register the backend (idempotent). Called by ``import ripple_gguf``."""
    with _lock:
        if _state["registered"]:
            return
        err = _err_buf()
        if _native.lib.ripple_register(err, 512) != 0:
            raise ImportError(f"ripple-gguf cannot register its ggml backend: {_native.error_text(err)}")
        if _env_flag("RIPPLE_NO_LOAD_HOOK"):
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
        _configure_from_env()
        # diagnostic only (scripts/checksum_cost.py): reads unchecked against the checksum table
        _native.lib.ripple_set_verify_reads(1 if _env_01("RIPPLE_VERIFY_READS", "1") else 0)
        _wrap_model_loader()
        _state["registered"] = True


def _wrap_model_loader() -> None:
    import llama_cpp.llama_cpp as raw

    if getattr(raw.llama_model_load_from_file, "_ripple_wrapped", False):
        return
    orig = raw.llama_model_load_from_file

    def llama_model_load_from_file(path_model: bytes, params, /):
        path = os.fsdecode(path_model)
        if getattr(params, "vocab_only", False) or not RippleFile.is_ripple(path):
            return orig(path_model, params)
        rf = RippleFile.open(path)
        rf.check_quick()
        handle = _begin_load(rf)
        model = None
        try:
            model = orig(path_model, params)
        finally:
            bound = _native.lib.ripple_model_bound_tensors(handle)
            _native.lib.ripple_model_end_load(handle, 1 if model else 0)
        expected = sum(3 if layer.gate_type >= 0 else 2 for layer in rf.layers)
        _last_load.clear()
        _last_load.update(path=path, handle=handle, bound_tensors=bound, expected_tensors=expected)
        if model and bound != expected:
            warnings.warn(
                f"ripple-gguf: {path}: the backend took {bound} of {expected} FFN tensors; the others run "
                "on llama.cpp's own devices (GPU offload or tensor overrides route them elsewhere)",
                RuntimeWarning,
                stacklevel=2,
            )
        return model

    llama_model_load_from_file._ripple_wrapped = True
    llama_model_load_from_file._ripple_orig = orig
    raw.llama_model_load_from_file = llama_model_load_from_file


def descriptors(rf: RippleFile):
    """cffi ``ripple_layer_desc[]`` for the file's layers, and the buffers they point into (keep
    both alive while the C side may read them)."""
    ffi = _native.ffi
    descs = ffi.new("ripple_layer_desc[]", len(rf.layers))
    keep = []
    sparsity = rf.sparsity
    for d, layer, ck in zip(descs, rf.layers, rf.checksums()):
        order = np.ascontiguousarray(layer.order, dtype=np.int32)
        bundle_crc, tensor_crc = np.ascontiguousarray(ck.bundles), np.ascontiguousarray(ck.tensors)
        keep += [order, bundle_crc, tensor_crc]
        d.bundle_crc = ffi.from_buffer("uint32_t[]", bundle_crc)
        d.tensor_crc = ffi.from_buffer("uint32_t[]", tensor_crc)
        d.tensor_crc_count = tensor_crc.size
        d.crc_block = rf.checksum_block
        d.block = layer.block
        d.n_ff = layer.n_ff
        d.n_embd = layer.n_embd
        d.gate_type = layer.gate_type
        d.up_type = layer.up_type
        d.down_type = layer.down_type
        d.bundles_offset = layer.bundles_offset
        d.bundle_size = layer.bundle_size
        d.order = ffi.from_buffer("int32_t[]", order)
        d.gate_offset = layer.gate_offset
        d.up_offset = layer.up_offset
        d.down_offset = layer.down_offset
        d.down_src_type = layer.down_src_type
        d.act_rule = _RULES.get(sparsity["rule"], -1) if sparsity else -1
        d.act_threshold = layer.threshold
        d.down_layout = layer.down_layout
        if layer.down_table_size:
            table = ffi.from_buffer("uint8_t[]", rf.read_down_table(layer))
            keep.append(table)
            d.down_table = table
            d.down_table_size = layer.down_table_size
        if layer.predictor_size:
            blob = ffi.from_buffer("uint8_t[]", rf.read_predictor_blob(layer))
            keep.append(blob)
            d.predictor = blob
            d.predictor_size = layer.predictor_size
    return descs, keep


def _begin_load(rf: RippleFile) -> int:
    descs, keep = descriptors(rf)
    _apply_storage(rf.path)
    err = _err_buf()
    handle = _native.lib.ripple_model_begin_load(
        os.fsencode(rf.path), rf.file_size, len(rf.layers), descs, err, 512
    )
    del keep
    if handle < 0:
        raise RippleLoadError(_native.error_text(err))
    return handle


EXACT_DOWN = {"tensor": 0, "bundles": 1}
MODES = {"exact": 0, "sparse": 1}
CACHE_POLICIES = {"lru": 0, "s3fifo": 1, "linking": 2}
IO_ENGINES = {"threads": 0, "uring": 1, "auto": 2}
_RULES = {"nonzero": 0, "magnitude": 1}
DEFAULT_IO_THREADS = 8
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


def _env_number(name: str, kind=float, lo: Optional[float] = None):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        v = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a {'whole ' if kind is int else ''}number, got {raw!r}") from None
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {raw!r}")
    return v


def _env_01(name: str, default: str) -> bool:
    raw = os.environ.get(name, default).strip()
    if raw not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {raw!r}")
    return raw == "1"


def _configure_from_env() -> None:
    cache_mb = _env_number("RIPPLE_CACHE_MB")
    cache_fraction = _env_number("RIPPLE_CACHE_FRACTION")
    if cache_mb is not None and cache_fraction is not None:
        raise ValueError("set RIPPLE_CACHE_MB or RIPPLE_CACHE_FRACTION, not both")
    if cache_mb is None and cache_fraction is None:
        cache_mb = DEFAULT_CACHE_MB
    io_threads = _env_number("RIPPLE_IO_THREADS", int, 1)
    configure(cache_mb=cache_mb, cache_fraction=cache_fraction, exact_down=os.environ.get("RIPPLE_EXACT_DOWN", "tensor"),
              mode=os.environ.get("RIPPLE_MODE", "sparse"), cache_policy=os.environ.get("RIPPLE_CACHE_POLICY", "lru"),
              collapse=_env_01("RIPPLE_COLLAPSE", "1"), direct_io=_env_01("RIPPLE_DIRECT_IO", "0"),
              prefetch=_env_01("RIPPLE_PREFETCH", "0"), io_engine=os.environ.get("RIPPLE_IO_ENGINE", "auto"),
              io_threads=io_threads if io_threads is not None else DEFAULT_IO_THREADS)


def reset_settings() -> Dict[str, object]:
    """Back to the defaults (and the ``RIPPLE_*`` environment variables); returns the settings."""
    _configure_from_env()
    return settings()


def configure(*, cache_mb: Optional[float] = None, cache_fraction: Optional[float] = None,
              exact_down: Optional[str] = None, mode: Optional[str] = None, cache_policy: Optional[str] = None,
              collapse=None, direct_io: Optional[bool] = None, io_threads: Optional[int] = None,
              prefetch: Optional[bool] = None, io_engine: Optional[str] = None) -> Dict[str, object]:
    """Change runtime settings; returns the settings in force (:func:`settings`).

    mode: ``"sparse"`` (default: per token and layer only the bundles the layer's predictor
    selects are read and computed, the file's activity rule applied; files or layers without
    predictors run exact) or ``"exact"`` (every neuron; logits equal stock llama.cpp's).
    Environment: ``RIPPLE_MODE``.
    cache_mb: byte budget of the DRAM neuron cache of each loaded ripple model, in MiB (0: no
    cache). cache_fraction: the budget as a fraction of each model's FFN bytes instead (0 < f <= 1).
    Environment: ``RIPPLE_CACHE_MB`` (default 64) or ``RIPPLE_CACHE_FRACTION``.
    cache_policy: ``"lru"`` (default), ``"s3fifo"`` or ``"linking"`` (S3-FIFO with Ripple's
    linking-aware admission). Environment: ``RIPPLE_CACHE_POLICY``.
    collapse: ``True`` (default) merges reads whose gap is cheaper to read than a separate request,
    the threshold taken from the storage cost model of the disk holding the model (``ripple-gguf
    probe-storage``; a documented default without a profile), ``False`` never merges, an ``int``
    fixes the threshold in bytes. Environment: ``RIPPLE_COLLAPSE=0|1``.
    direct_io: read bundles with O_DIRECT (bypassing the page cache, aligned bounce buffers).
    Environment: ``RIPPLE_DIRECT_IO=0|1`` (default 0).
    io_threads: reader threads, i.e. the queue depth of a layer's batch of reads (default 8).
    Environment: ``RIPPLE_IO_THREADS``.
    io_engine: ``"auto"`` (default: io_uring for batches of small requests, the reader threads for
    large ones), ``"uring"`` (io_uring through raw system calls) or ``"threads"``. Where the kernel
    refuses io_uring the threads are used and ``settings()["io_engine_note"]`` says why.
    Environment: ``RIPPLE_IO_ENGINE``.
    prefetch: in sparse mode, while a layer computes, read the bundles the next layer's predictor
    selects from this layer's FFN input (one-token batches). Environment: ``RIPPLE_PREFETCH=0|1``
    (default 0).
    exact_down: where exact mode takes the down projection from: ``"tensor"`` (default) runs stock
    llama.cpp's own dot products on the rows of the standard ffn_down tensor, read from the file,
    so results equal stock's; ``"bundles"`` sums the down columns of the bundles (the sparse path).
    Environment: ``RIPPLE_EXACT_DOWN``.
    """
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        _native.lib.ripple_set_mode(MODES[mode])
    if io_threads is not None:
        if _native.lib.ripple_set_io_threads(int(io_threads)) != 0:
            raise ValueError(f"io_threads must be between 1 and 64, got {io_threads}")
    if collapse is not None:
        if collapse is True:
            _collapse["mode"] = "auto"
        elif collapse is False:
            _collapse["mode"] = "off"
        elif isinstance(collapse, int) and collapse >= 0:
            _collapse["mode"] = int(collapse)
        else:
            raise ValueError(f"collapse must be True, False or a number of bytes >= 0, got {collapse!r}")
    if collapse is not None or io_threads is not None:
        mode_c = _collapse["mode"]
        if mode_c == "off":
            _native.lib.ripple_set_collapse_bytes(0)
        elif mode_c == "auto":
            from . import storage

            _native.lib.ripple_set_collapse_bytes(_collapse_gap(_cost["model"] or storage.DEFAULT))
        else:
            _native.lib.ripple_set_collapse_bytes(mode_c)
    if direct_io is not None:
        _native.lib.ripple_set_direct_io(1 if direct_io else 0)
    if prefetch is not None:
        _native.lib.ripple_set_prefetch(1 if prefetch else 0)
    if io_engine is not None:
        if io_engine not in IO_ENGINES:
            raise ValueError(f"io_engine must be one of {', '.join(IO_ENGINES)}, got {io_engine!r}")
        if _native.lib.ripple_set_io_engine(IO_ENGINES[io_engine]) != 0:
            warnings.warn("ripple-gguf: this build has no io_uring; reading with threads", RuntimeWarning, stacklevel=2)
    if cache_policy is not None and cache_policy not in CACHE_POLICIES:
        raise ValueError(f"cache_policy must be one of {', '.join(CACHE_POLICIES)}, got {cache_policy!r}")
    if cache_mb is not None and cache_fraction is not None:
        raise ValueError("give cache_mb or cache_fraction, not both")
    if cache_mb is not None and cache_mb < 0:
        raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
    policy = CACHE_POLICIES[cache_policy] if cache_policy is not None else _native.lib.ripple_get_cache_policy()
    if cache_fraction is not None:
        if _native.lib.ripple_set_cache_fraction(float(cache_fraction), policy) != 0:
            raise ValueError(f"cache_fraction must be in (0, 1], got {cache_fraction}")
    elif cache_mb is not None or cache_policy is not None:
        frac = _native.lib.ripple_get_cache_fraction()
        if cache_mb is None and frac > 0:
            _native.lib.ripple_set_cache_fraction(frac, policy)
        else:
            cur_bytes = _native.lib.ripple_get_cache_bytes()
            _native.lib.ripple_set_cache(int(cache_mb * 1024 * 1024) if cache_mb is not None else cur_bytes, policy)
    if exact_down is not None:
        if exact_down not in EXACT_DOWN:
            raise ValueError(f"exact_down must be one of {', '.join(EXACT_DOWN)}, got {exact_down!r}")
        _native.lib.ripple_set_exact_down(EXACT_DOWN[exact_down])
    return settings()


def _io_engine() -> Dict[str, object]:
    why = _native.ffi.new("char[]", 256)
    engine = _native.lib.ripple_get_io_engine(why, 256)
    name = next(k for k, v in IO_ENGINES.items() if v == engine)
    return {"io_engine": name, "io_engine_note": _native.error_text(why)}


def settings() -> Dict[str, object]:
    down = _native.lib.ripple_get_exact_down()
    name = lambda table, v: next(k for k, x in table.items() if x == v)
    return {
        "mode": name(MODES, _native.lib.ripple_get_mode()),
        "cache_mb": _native.lib.ripple_get_cache_bytes() / (1024 * 1024),
        "cache_fraction": _native.lib.ripple_get_cache_fraction(),
        "cache_policy": name(CACHE_POLICIES, _native.lib.ripple_get_cache_policy()),
        "collapse": _collapse["mode"],
        "collapse_bytes": _native.lib.ripple_get_collapse_bytes(),
        "direct_io": bool(_native.lib.ripple_get_direct_io()),
        "io_threads": _native.lib.ripple_get_io_threads(),
        "prefetch": bool(_native.lib.ripple_get_prefetch()),
        **_io_engine(),
        "cost_model": _cost["model"].to_dict() if _cost["model"] is not None else None,
        "exact_down": next(k for k, v in EXACT_DOWN.items() if v == down),
        "load_hook": bool(_native.lib.ripple_loadhook_active()),
        "load_hook_error": _state["load_hook_error"],
        "library": str(_native.library_path),
    }


def stats() -> Dict[str, float]:
    """Process-wide counters of the backend since start or the last :func:`reset_stats`."""
    s = _native.ffi.new("ripple_stats *")
    _native.lib.ripple_get_stats(s)
    out = {name: getattr(s, name) for name, _ in _native.ffi.typeof("ripple_stats").fields}
    lookups = out["cache_hits"] + out["cache_misses"]
    out["cache_hit_rate"] = out["cache_hits"] / lookups if lookups else 0.0
    runs = out.pop("needed_runs")
    out["mean_run_length"] = out.pop("needed_bundles") / runs if runs else 0.0
    return out


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
