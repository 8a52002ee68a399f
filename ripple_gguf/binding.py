"""The typed binding of the native library: one function per C function of ``csrc/ripple.h`` that
Python calls, each under the C declaration it wraps, numpy arrays and Python values in and out, a
failure (error buffer or return code) raised as an exception; and the header's constants, its
enums under the names Python uses for them.

Every module of the package reaches the library through here; :mod:`ripple_gguf._native` only
loads it. Nothing here knows the file format: callers give a failure its meaning (a refused load
becomes a ``RippleFormatError`` in the runtime).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from ._native import LLAMA_CPP_PYTHON_VERSION, ffi, lib, library_path  # noqa: F401  (re-exported)

_ERR_LEN = 1024


def _err():
    return ffi.new("char[]", _ERR_LEN)


def _text(buf) -> str:
    return ffi.string(buf).decode(errors="replace")


def _bytes_of(data) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else np.ascontiguousarray(data)


def _refused(func: str, *args) -> RuntimeError:
    # a setter refusing a value its caller checked: a bug, not bad input
    return RuntimeError(f"ripple-gguf: the backend refused {func}({', '.join(map(repr, args))})")


# ---- the header's constants ----

def _enum(name: str, prefix: str) -> Dict[str, int]:
    """{member without ``prefix``, in lower case: value} of ``enum <name>`` of csrc/ripple.h, in
    value order: the names Python uses for the library's numbers."""
    members = ffi.typeof(f"enum {name}").relements
    return {k[len(prefix):].lower(): v for k, v in sorted(members.items(), key=lambda kv: kv[1])}


MODES = _enum("ripple_mode", "RIPPLE_MODE_")  # exact, sparse, auto (each model's own default)
CACHE_POLICIES = _enum("ripple_cache_policy", "RIPPLE_CACHE_")  # lru, s3fifo, linking, pinned
ACTIVITY_RULES = _enum("ripple_activity_rule", "RIPPLE_RULE_")  # none, nonzero, magnitude; gate (oracle only)
EXACT_DOWN = _enum("ripple_exact_down", "RIPPLE_EXACT_DOWN_")  # where exact mode's down projection comes from
SPARSE_DOWN = _enum("ripple_sparse_down", "RIPPLE_SPARSE_DOWN_")  # where sparse mode's comes from
GLU_ACTIVATIONS = _enum("ripple_glu_activation", "RIPPLE_GLU_")  # silu, gelu: the gate rule's activation
IO_ENGINES = _enum("ripple_io_engine", "RIPPLE_IO_ENGINE_")  # threads, uring, auto
# bounds of the settings (README, Settings): beyond them a value is a typo
MAX_CACHE_MB = lib.RIPPLE_MAX_CACHE_MB
MAX_IO_THREADS = lib.RIPPLE_MAX_IO_THREADS


# ---- registration and loads ----

# int ripple_register(char * err, size_t err_len);
def register() -> None:
    err = _err()
    if lib.ripple_register(err, _ERR_LEN) != 0:
        raise ImportError(f"ripple-gguf cannot register its ggml backend: {_text(err)}")


# int ripple_loadhook_install(char * err, size_t err_len);
def loadhook_install() -> None:
    """OSError with the reason when the hook cannot be installed."""
    err = _err()
    if lib.ripple_loadhook_install(err, _ERR_LEN) != 0:
        raise OSError(_text(err))


# int ripple_loadhook_active(void);
def loadhook_active() -> bool:
    return bool(lib.ripple_loadhook_active())


# int ripple_load_begin(const char * path, int claim, char * err, size_t err_len);
def load_begin(path: bytes, claim: bool) -> int:
    """0 when ``path`` is not ripple-packed, else a model handle; ValueError("<path>: <problem>")
    when the library refuses the file."""
    err = _err()
    handle = lib.ripple_load_begin(path, 1 if claim else 0, err, _ERR_LEN)
    if handle < 0:
        raise ValueError(_text(err))
    return int(handle)


# int ripple_model_get_info(int handle, ripple_model_info * out);
def model_info(handle: int) -> Dict[str, object]:
    info = ffi.new("ripple_model_info *")
    if lib.ripple_model_get_info(handle, info) != 0:
        raise ValueError(f"no ripple model with handle {handle}")
    return {"bound_tensors": info.bound_tensors, "expected_tensors": info.expected_tensors,
            "default_mode": info.default_mode, "default_mode_reason": _text(info.default_mode_reason)}


# void ripple_model_end_load(int handle, int ok);
def model_end_load(handle: int, ok: bool) -> None:
    lib.ripple_model_end_load(handle, 1 if ok else 0)


# int ripple_settings_from_env(ripple_env_settings * out, char * err, size_t err_len);
def settings_from_env() -> Dict[str, object]:
    """Every field of ``ripple_env_settings`` from the RIPPLE_* variables; ValueError naming the
    variable that is wrong."""
    env, err = ffi.new("ripple_env_settings *"), _err()
    if lib.ripple_settings_from_env(env, err, _ERR_LEN) != 0:
        raise ValueError(_text(err))
    return {name: getattr(env, name) for name, _ in ffi.typeof("ripple_env_settings").fields}


# ---- settings ----

# int ripple_set_mode(int mode);
def set_mode(mode: int) -> None:
    if lib.ripple_set_mode(mode) != 0:
        raise _refused("ripple_set_mode", mode)


# int ripple_get_mode(void);
def get_mode() -> int:
    return int(lib.ripple_get_mode())


# int ripple_set_cache(int64_t cache_bytes, int policy);
def set_cache(cache_bytes: int, policy: int) -> None:
    if lib.ripple_set_cache(cache_bytes, policy) != 0:
        raise _refused("ripple_set_cache", cache_bytes, policy)


# int ripple_set_cache_fraction(double fraction, int policy);
def set_cache_fraction(fraction: float, policy: int) -> None:
    if lib.ripple_set_cache_fraction(fraction, policy) != 0:
        raise _refused("ripple_set_cache_fraction", fraction, policy)


# int ripple_get_cache_policy(void);
def get_cache_policy() -> int:
    return int(lib.ripple_get_cache_policy())


# int64_t ripple_get_cache_bytes(void);
def get_cache_bytes() -> int:
    return int(lib.ripple_get_cache_bytes())


# double ripple_get_cache_fraction(void);
def get_cache_fraction() -> float:
    return float(lib.ripple_get_cache_fraction())


# void ripple_set_collapse_bytes(int64_t gap_bytes);
def set_collapse_bytes(gap_bytes: int) -> None:
    lib.ripple_set_collapse_bytes(gap_bytes)


# int64_t ripple_get_collapse_bytes(void);
def get_collapse_bytes() -> int:
    return int(lib.ripple_get_collapse_bytes())


# int ripple_set_io_threads(int n);
def set_io_threads(n: int) -> None:
    if lib.ripple_set_io_threads(n) != 0:
        raise _refused("ripple_set_io_threads", n)


# int ripple_get_io_threads(void);
def get_io_threads() -> int:
    return int(lib.ripple_get_io_threads())


# int ripple_set_io_engine(int engine);
def set_io_engine(engine: int) -> bool:
    """False when the build lacks the engine (io_uring); the reader threads are then used."""
    return lib.ripple_set_io_engine(engine) == 0


# int ripple_get_io_engine(char * why, size_t why_len);
def get_io_engine() -> Tuple[int, str]:
    """(the engine in force, why it is not the one wanted: "" when it is)."""
    why = _err()
    engine = lib.ripple_get_io_engine(why, _ERR_LEN)
    return int(engine), _text(why)


# void ripple_set_direct_io(int on);
def set_direct_io(on: bool) -> None:
    lib.ripple_set_direct_io(1 if on else 0)


# int ripple_get_direct_io(void);
def get_direct_io() -> bool:
    return bool(lib.ripple_get_direct_io())


# void ripple_set_prefetch(int on);
def set_prefetch(on: bool) -> None:
    lib.ripple_set_prefetch(1 if on else 0)


# int ripple_get_prefetch(void);
def get_prefetch() -> bool:
    return bool(lib.ripple_get_prefetch())


# void ripple_set_overlap(int on);
def set_overlap(on: bool) -> None:
    lib.ripple_set_overlap(1 if on else 0)


# int ripple_get_overlap(void);
def get_overlap() -> bool:
    return bool(lib.ripple_get_overlap())


# void ripple_set_sparse_down_rows(int on);
def set_sparse_down_rows(on: int) -> None:
    lib.ripple_set_sparse_down_rows(on)


# int ripple_get_sparse_down_rows(void);
def get_sparse_down_rows() -> int:
    return int(lib.ripple_get_sparse_down_rows())


# int ripple_set_exact_down(int source);
def set_exact_down(source: int) -> None:
    if lib.ripple_set_exact_down(source) != 0:
        raise _refused("ripple_set_exact_down", source)


# int ripple_get_exact_down(void);
def get_exact_down() -> int:
    return int(lib.ripple_get_exact_down())


# void ripple_set_cost_model(double latency_s, double bandwidth_bps, double parallelism);
def set_cost_model(latency_s: float, bandwidth_bps: float, parallelism: float) -> None:
    lib.ripple_set_cost_model(latency_s, bandwidth_bps, parallelism)


# void ripple_storage_default_model(ripple_cost_model * out);
def storage_default_model() -> Tuple[float, float, float]:
    """(latency_s, bandwidth_bps, parallelism) of a device without a probe-storage profile."""
    out = ffi.new("ripple_cost_model *")
    lib.ripple_storage_default_model(out)
    return out.latency_s, out.bandwidth_bps, out.parallelism


# void ripple_set_verify_reads(int on);   (diagnostic: reads unchecked against the checksum table)
def set_verify_reads(on: bool) -> None:
    lib.ripple_set_verify_reads(1 if on else 0)


# void ripple_set_pair_matmuls(int on);   (diagnostic: gate and up each alone)
def set_pair_matmuls(on: bool) -> None:
    lib.ripple_set_pair_matmuls(1 if on else 0)


# void ripple_set_sketch_topk(double fraction);   (diagnostic: a fixed top fraction, 0 = off)
def set_sketch_topk(fraction: float) -> None:
    lib.ripple_set_sketch_topk(fraction)


# ---- counters ----

# int ripple_stats_json(char * buf, size_t len);
def stats_json() -> str:
    n = 4096
    while True:
        buf = ffi.new("char[]", n)
        need = lib.ripple_stats_json(buf, n)
        if need < n:
            return ffi.string(buf).decode()
        n = need + 1


# void ripple_reset_stats(void);
def reset_stats() -> None:
    lib.ripple_reset_stats()


# int ripple_take_last_error(char * buf, size_t buf_len);
def take_last_error() -> str:
    buf = _err()
    lib.ripple_take_last_error(buf, _ERR_LEN)
    return _text(buf)


# ---- activity traces and the standalone store ----

# int ripple_trace_start(int64_t max_int32s);
def trace_start(max_int32s: int) -> None:
    if lib.ripple_trace_start(max_int32s) != 0:
        raise MemoryError(f"cannot allocate an activity trace of {max_int32s} int32s")


# void ripple_trace_stop(void);
def trace_stop() -> None:
    lib.ripple_trace_stop()


# int64_t ripple_trace_read(int32_t * out, int64_t cap);
def trace_read() -> np.ndarray:
    n = lib.ripple_trace_read(ffi.NULL, 0)
    out = np.zeros(n, np.int32)
    if n:
        lib.ripple_trace_read(ffi.from_buffer("int32_t[]", out), n)
    return out


# int64_t ripple_trace_dropped(void);
def trace_dropped() -> int:
    return int(lib.ripple_trace_dropped())


# int64_t ripple_iolog_read(int64_t * out, int64_t cap);
def iolog_read() -> np.ndarray:
    n = lib.ripple_iolog_read(ffi.NULL, 0)
    out = np.zeros(n, np.int64)
    if n:
        lib.ripple_iolog_read(ffi.from_buffer("int64_t[]", out), n)
    return out


# int ripple_store_open_file(const char * path, char * err, size_t err_len);
def store_open_file(path: bytes) -> int:
    err = _err()
    handle = lib.ripple_store_open_file(path, err, _ERR_LEN)
    if handle < 0:
        raise RuntimeError(_text(err))
    return int(handle)


# int ripple_store_fetch(int handle, int32_t layer, const int32_t * neurons, int64_t n, int64_t n_tokens);
def store_fetch(handle: int, layer: int, neurons: np.ndarray, n_tokens: int) -> None:
    """OSError with the backend's last error when a read fails."""
    ids = np.ascontiguousarray(neurons, dtype=np.int32)
    if lib.ripple_store_fetch(handle, layer, ffi.from_buffer("int32_t[]", ids), len(ids), n_tokens) != 0:
        raise OSError(take_last_error())


# void ripple_store_close(int handle);
def store_close(handle: int) -> None:
    lib.ripple_store_close(handle)


# ---- ggml's own row conversions (the converter's bundles) ----

# size_t ripple_row_size(int32_t type, int64_t n_per_row);
def row_size(ggml_type: int, n_per_row: int) -> int:
    size = lib.ripple_row_size(int(ggml_type), int(n_per_row))
    if size == 0:
        raise ValueError(f"ggml type {int(ggml_type)} cannot hold rows of {n_per_row} values")
    return int(size)


# int ripple_dequantize_rows(int32_t type, const void * src, float * dst, int64_t nrows, int64_t n_per_row);
def dequantize(ggml_type: int, raw: np.ndarray, nrows: int, n_per_row: int) -> np.ndarray:
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size != nrows * row_size(ggml_type, n_per_row):
        raise ValueError(f"{raw.size} bytes do not hold {nrows} rows of {n_per_row} values of type {ggml_type}")
    out = np.empty((nrows, n_per_row), dtype=np.float32)
    if lib.ripple_dequantize_rows(int(ggml_type), ffi.from_buffer(raw), ffi.from_buffer("float[]", out),
                                  nrows, n_per_row) != 0:
        raise ValueError(f"ggml has no dequantization for type {ggml_type}")
    return out


# size_t ripple_quantize_rows(int32_t type, const float * src, void * dst, int64_t nrows, int64_t n_per_row);
def quantize(ggml_type: int, values: np.ndarray) -> np.ndarray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    nrows, n_per_row = values.shape
    out = np.empty((nrows, row_size(ggml_type, n_per_row)), dtype=np.uint8)
    written = lib.ripple_quantize_rows(int(ggml_type), ffi.from_buffer("float[]", values), ffi.from_buffer(out),
                                       nrows, n_per_row)
    if written != out.size:
        raise ValueError(f"ggml cannot quantize to type {ggml_type} without an importance matrix")
    return out


# int ripple_split_info(int32_t type, int32_t * bits, int32_t * offset, int32_t * group, int32_t * has_min);
def split_info(ggml_type: int) -> Optional[Tuple[int, int, int, int]]:
    """(bits, offset, group, has_min) of a type whose down columns can be split, else None."""
    out = ffi.new("int32_t[4]")
    if not lib.ripple_split_info(int(ggml_type), out, out + 1, out + 2, out + 3):
        return None
    return tuple(int(x) for x in out)


# int ripple_split_rows(int32_t type, const void * src, int64_t nrows, int64_t n_per_row, uint8_t * q,
#                       float * scale_min);
def split_rows(ggml_type: int, raw: np.ndarray, nrows: int, n_per_row: int) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of a splittable type unpacked (docs/FORMAT.md section 3): the stored integers (uint8,
    nrows x n_per_row; Q8_0: the int8's bytes) and f32 (scale, min) per group (nrows x
    n_per_row/group x 2), value = scale * (q - offset) + min as ggml dequantizes it."""
    info = split_info(ggml_type)
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if info is None or raw.size != nrows * row_size(ggml_type, n_per_row):
        raise ValueError(f"{raw.size} bytes are not {nrows} rows of {n_per_row} values of a splittable type ({ggml_type})")
    q = np.empty((nrows, n_per_row), dtype=np.uint8)
    sm = np.empty((nrows, n_per_row // info[2], 2), dtype=np.float32)
    if lib.ripple_split_rows(int(ggml_type), ffi.from_buffer(raw), nrows, n_per_row, ffi.from_buffer(q),
                             ffi.from_buffer("float[]", sm)) != 0:
        raise ValueError(f"type {ggml_type} rows of {n_per_row} values cannot be split")
    return q, sm


# ---- CRC32C (the checksum table, docs/FORMAT.md section 2b) ----

# uint32_t ripple_crc32c(const void * data, size_t len);
def crc32c(data) -> int:
    buf = _bytes_of(data)
    return int(lib.ripple_crc32c(ffi.from_buffer(buf), buf.nbytes))


# void ripple_crc32c_blocks(const void * data, uint64_t len, uint64_t block, uint32_t * out);
def crc32c_blocks(data, block: int) -> np.ndarray:
    """CRC32C of each ``block`` bytes of ``data`` (the last block may be shorter)."""
    buf = _bytes_of(data)
    out = np.empty(-(-buf.nbytes // block), dtype=np.uint32)
    if out.size:
        lib.ripple_crc32c_blocks(ffi.from_buffer(buf), buf.nbytes, block, ffi.from_buffer("uint32_t[]", out))
    return out


# ---- the offline stage's kernels ----

# int ripple_greedy_path(int32_t n, const uint32_t * co, int32_t * order);
def greedy_path(co: np.ndarray) -> np.ndarray:
    """The neuron at each position of the greedy path over ``co`` (C-contiguous uint32, n x n)."""
    n = co.shape[0]
    order = np.empty(n, dtype=np.int32)
    if n and lib.ripple_greedy_path(n, ffi.from_buffer("uint32_t[]", co), ffi.from_buffer("int32_t[]", order)) != 0:
        raise MemoryError(f"ripple_greedy_path failed for n = {n} (out of memory, or the walk missed a neuron)")
    return order


# int ripple_sketch_scores(const uint8_t * blob, size_t size, int32_t n_embd, int32_t n_ff, const float * x,
#                          int64_t n_tokens, float * scores, uint8_t * selected, char * err, size_t err_len);
def sketch_scores(blob: bytes, n_embd: int, n_ff: int, X: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The C kernel's (scores, selected) of a sketch blob for FFN inputs X (tokens x n_embd)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    scores = np.empty((X.shape[0], n_ff), np.float32)
    sel = np.empty((X.shape[0], n_ff), np.uint8)
    err = _err()
    if lib.ripple_sketch_scores(blob, len(blob), n_embd, n_ff, ffi.from_buffer("float[]", X), X.shape[0],
                                ffi.from_buffer("float[]", scores), ffi.from_buffer("uint8_t[]", sel),
                                err, _ERR_LEN) != 0:
        raise ValueError(_text(err))
    return scores, sel.astype(bool)


# ---- llama.cpp eval callbacks (cb_eval with its user data) ----

def _address(cdata) -> int:
    return int(ffi.cast("uintptr_t", cdata))


class Capture:
    """A ``ripple_capture`` over numpy buffers (per block: FFN inputs x, post-activations h, gate
    pre-activations g of gated blocks), for ``ripple_capture_eval``. ``rows(b)``: the rows of x, h
    and g the last decode filled; ``errors``: nodes it skipped."""

    # bool ripple_capture_eval(void * tensor, bool ask, void * user_data);
    callback = _address(lib.ripple_capture_eval)

    def __init__(self, max_tokens: int, x: Mapping[int, np.ndarray], h: Mapping[int, np.ndarray],
                 g: Mapping[int, np.ndarray]):
        n = max(x) + 1
        self._blocks = list(x)
        xs, hs, gs = ffi.new("float *[]", n), ffi.new("float *[]", n), ffi.new("float *[]", n)
        xl, hl = ffi.new("int64_t[]", n), ffi.new("int64_t[]", n)
        self._xr, self._hr, self._gr = ffi.new("int32_t[]", n), ffi.new("int32_t[]", n), ffi.new("int32_t[]", n)
        for b in x:
            xs[b] = ffi.cast("float *", ffi.from_buffer(x[b]))
            hs[b] = ffi.cast("float *", ffi.from_buffer(h[b]))
            if b in g:
                gs[b] = ffi.cast("float *", ffi.from_buffer(g[b]))
            xl[b], hl[b] = x[b].shape[1], h[b].shape[1]
        self._alive = (x, h, g, xs, hs, gs, xl, hl)  # what the struct points into
        self._c = ffi.new("ripple_capture *", dict(n_blocks=n, max_tokens=max_tokens, x=xs, h=hs, x_len=xl,
                                                   h_len=hl, x_rows=self._xr, h_rows=self._hr, g=gs, g_len=hl,
                                                   g_rows=self._gr))
        self.user_data = _address(self._c)

    def clear(self) -> None:
        for b in self._blocks:
            self._xr[b] = self._hr[b] = self._gr[b] = 0

    def rows(self, b: int) -> Tuple[int, int, int]:
        return int(self._xr[b]), int(self._hr[b]), int(self._gr[b])

    @property
    def errors(self) -> int:
        return int(self._c.errors)


class Sparsify:
    """A ``ripple_sparsify`` for ``ripple_sparsify_eval``: per block a threshold (< 0: untouched),
    ``ACTIVITY_RULES["gate"]`` or ``["magnitude"]``, and the gate activation's index."""

    # bool ripple_sparsify_eval(void * tensor, bool ask, void * user_data);
    callback = _address(lib.ripple_sparsify_eval)

    def __init__(self, thresholds: np.ndarray, rule: int, activation: int):
        self._thr = np.ascontiguousarray(thresholds, dtype=np.float32)
        self._c = ffi.new("ripple_sparsify *", dict(n_blocks=len(self._thr),
                                                    thresholds=ffi.from_buffer("float[]", self._thr),
                                                    rule=rule, activation=activation))
        self.user_data = _address(self._c)

    @property
    def errors(self) -> int:
        return int(self._c.errors)

    @property
    def zeroed_fraction(self) -> float:
        return self._c.zeroed / self._c.total if self._c.total else 0.0
