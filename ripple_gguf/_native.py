"""Loads the native library (cffi, ABI mode): ``ffi`` (its declarations), ``lib`` and its path.
Only :mod:`ripple_gguf.binding` calls into ``lib``; :func:`cache_test_library` opens the neuron
cache's test harness, a library of its own (tests and scripts only).

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

# The C backend is compiled against the internal ggml headers of exactly this release (CMakeLists.txt).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

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

    if llama_cpp.__version__ != LLAMA_CPP_PYTHON_VERSION:
        raise NativeLibraryError(
            f"ripple-gguf was built for llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}, "
            f"but {llama_cpp.__version__} is installed ({llama_cpp.__file__}); reinstall "
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} or rebuild ripple-gguf"
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
