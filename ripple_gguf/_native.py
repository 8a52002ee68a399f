"""Private binding to the native library (cffi, ABI mode) and ggml's row conversions.

Loading order matters: the ggml that ``libllama.so`` uses must be the one our backend registers
into. ``llama_cpp`` loads ``libllama.so``, whose ``libggml*.so.0`` we promote to the global symbol
scope before opening our library, whose ggml symbols are left undefined at build time.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
from pathlib import Path

import numpy as np

from . import constants

_HERE = Path(__file__).resolve().parent


class NativeLibraryError(ImportError):
    pass


def _find_library() -> Path:
    override = os.environ.get("RIPPLE_LIBRARY")
    if override:
        return Path(override)
    found = sorted(glob.glob(str(_HERE / "_libripple*.so")))
    if not found:
        raise NativeLibraryError(
            f"ripple-gguf's native library is missing from {_HERE}: the package was not built "
            "(install it with `pip install .` or `pip install -e .`)"
        )
    return Path(found[0])


def _parse_header(name: str, source: str):
    """A cffi FFI of a header of the package (next to the library, else in the source tree)."""
    import cffi

    from ._cdef import cdef_text

    for header in (_HERE / name, _HERE.parent / "csrc" / source):
        if header.exists():
            ffi = cffi.FFI()
            ffi.cdef(cdef_text(header))
            return ffi
    raise NativeLibraryError(f"{source} is missing next to {_HERE}")


def _make_ffi():
    """The binding's types: the module the build pre-compiled (no C parsing at import), else the
    header parsed now (a source tree whose build predates it)."""
    try:
        from ._ripple_cffi import ffi

        return ffi
    except ImportError:
        pass
    return _parse_header("_ripple.h", "ripple.h")


def _load_ggml_global():
    import llama_cpp

    if llama_cpp.__version__ != constants.LLAMA_CPP_PYTHON_VERSION:
        raise NativeLibraryError(
            f"ripple-gguf was built for llama-cpp-python {constants.LLAMA_CPP_PYTHON_VERSION}, "
            f"but {llama_cpp.__version__} is installed ({llama_cpp.__file__}); reinstall "
            f"llama-cpp-python=={constants.LLAMA_CPP_PYTHON_VERSION} or rebuild ripple-gguf"
        )
    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    handles = {}
    # the .so.0 files are the ones libllama.so links (libggml.so is a separate copy: a second
    # ggml instance with its own backend registry)
    for name in ("libggml-base.so.0", "libggml-cpu.so.0", "libggml.so.0"):
        path = lib_dir / name
        if not path.exists():
            raise NativeLibraryError(f"{path} is missing: this llama-cpp-python build has no shared ggml")
        handles[name] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    base = handles["libggml-base.so.0"]
    base.ggml_version.restype = ctypes.c_char_p
    base.ggml_commit.restype = ctypes.c_char_p
    return lib_dir, base.ggml_version().decode(), base.ggml_commit().decode()


def _open():
    lib_dir, ggml_version, ggml_commit = _load_ggml_global()
    ffi = _make_ffi()
    path = _find_library()
    try:
        lib = ffi.dlopen(str(path), ffi.RTLD_NOW | ffi.RTLD_LOCAL)
    except OSError as e:
        raise NativeLibraryError(f"cannot load {path}: {e}") from e
    built_version = ffi.string(lib.ripple_built_ggml_version()).decode()
    built_commit = ffi.string(lib.ripple_built_ggml_commit()).decode()
    commit_ok = ggml_commit.startswith(built_commit) or ggml_commit.startswith("unknown")
    if ggml_version != built_version or not commit_ok:
        raise NativeLibraryError(
            f"{path} was built against ggml {built_version} ({built_commit}) but the ggml in "
            f"{lib_dir} is {ggml_version} ({ggml_commit}): the backend's vtables would not match. "
            "Reinstall ripple-gguf against the installed llama-cpp-python."
        )
    return ffi, lib, path


ffi, lib, library_path = _open()


@functools.lru_cache(maxsize=None)
def cache_test_library():
    """The neuron cache's test harness (csrc/ripple_cache_test.h; tests and scripts/bench_cache.py):
    a library of its own beside this one, (ffi, lib)."""
    path = _HERE / "_ripple_cache_test.so"
    if not path.exists():
        raise NativeLibraryError(f"{path} is missing: the package was built without the cache test harness")
    test_ffi = _parse_header("_ripple_cache_test.h", "ripple_cache_test.h")
    return test_ffi, test_ffi.dlopen(str(path))


def error_text(buf) -> str:
    return ffi.string(buf).decode(errors="replace")


# ---- ggml's own row conversions (used by the converter) ----

def row_size(ggml_type: int, n_per_row: int) -> int:
    size = lib.ripple_row_size(int(ggml_type), int(n_per_row))
    if size == 0:
        raise ValueError(f"ggml type {int(ggml_type)} cannot hold rows of {n_per_row} values")
    return int(size)


def block_size(ggml_type: int) -> int:
    return int(lib.ripple_block_size(int(ggml_type)))


def dequantize(ggml_type: int, raw: np.ndarray, nrows: int, n_per_row: int) -> np.ndarray:
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size != nrows * row_size(ggml_type, n_per_row):
        raise ValueError(f"{raw.size} bytes do not hold {nrows} rows of {n_per_row} values of type {ggml_type}")
    out = np.empty((nrows, n_per_row), dtype=np.float32)
    rc = lib.ripple_dequantize_rows(int(ggml_type), ffi.from_buffer(raw), ffi.from_buffer("float[]", out), nrows, n_per_row)
    if rc != 0:
        raise ValueError(f"ggml has no dequantization for type {ggml_type}")
    return out


def quantize(ggml_type: int, values: np.ndarray) -> np.ndarray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    nrows, n_per_row = values.shape
    out = np.empty((nrows, row_size(ggml_type, n_per_row)), dtype=np.uint8)
    written = lib.ripple_quantize_rows(int(ggml_type), ffi.from_buffer("float[]", values), ffi.from_buffer(out), nrows, n_per_row)
    if written != out.size:
        raise ValueError(f"ggml cannot quantize to type {ggml_type} without an importance matrix")
    return out


def split_info(ggml_type: int) -> tuple[int, int, int, int] | None:
    """(bits, offset, group, has_min) of a type whose down columns can be split, else None."""
    out = ffi.new("int32_t[4]")
    if not lib.ripple_split_info(int(ggml_type), out, out + 1, out + 2, out + 3):
        return None
    return tuple(int(x) for x in out)


def split_rows(ggml_type: int, raw: np.ndarray, nrows: int, n_per_row: int) -> tuple[np.ndarray, np.ndarray]:
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

def crc32c(data) -> int:
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else np.ascontiguousarray(data)
    return int(lib.ripple_crc32c(ffi.from_buffer(buf), buf.nbytes))


def crc32c_blocks(data, block: int) -> np.ndarray:
    """CRC32C of each ``block`` bytes of ``data`` (the last block may be shorter)."""
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else np.ascontiguousarray(data)
    out = np.empty(-(-buf.nbytes // block), dtype=np.uint32)
    if out.size:
        lib.ripple_crc32c_blocks(ffi.from_buffer(buf), buf.nbytes, block, ffi.from_buffer("uint32_t[]", out))
    return out
