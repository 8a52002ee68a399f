"""The C declarations the binding uses: the part of the public header between the RIPPLE_CDEF
markers, comments removed. Imports nothing of the package (setup.py runs it at build time to
pre-compile the binding's type table, so loading the package does not parse C)."""
from __future__ import annotations

import re
from pathlib import Path


def cdef_text(header: Path) -> str:
    text = Path(header).read_text()
    body = text.split("/* RIPPLE_CDEF_BEGIN */", 1)[1].split("/* RIPPLE_CDEF_END */", 1)[0]
    return re.sub(r"/\*.*?\*/", "", body, flags=re.S)


def emit_module(header: Path, out: Path) -> None:
    """Write the out-of-line cffi module (ABI mode) for the header's declarations."""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(cdef_text(header))
    ffi.set_source("ripple_gguf._ripple_cffi", None)
    ffi.emit_python_code(str(out))
