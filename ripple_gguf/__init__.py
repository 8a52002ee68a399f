"""ripple-gguf: llama.cpp with FFN weights served from flash as co-activation-ordered neuron bundles.

``import ripple_gguf`` registers the RIPPLE ggml backend into the llama.cpp that llama-cpp-python
loaded; after that, ``llama_cpp.Llama(model_path="m.ripple.gguf")`` runs the FFN of a ripple-packed
file through the backend, and any other GGUF file as before.
"""
import os as _os
import sys as _sys

# ggml's CPU backend runs on libgomp, whose threads spin after every parallel region by default;
# with the FFN handed to this backend between the CPU's splits, those spinning threads take the
# cores the FFN kernels need (10-50x slower decoding measured on 2 cores, docs/BENCHMARKS.md).
# Passive waiting must be chosen before libgomp starts, i.e. before llama_cpp loads its libraries.
_OMP_POLICY_SET = "OMP_WAIT_POLICY" not in _os.environ
if _OMP_POLICY_SET:
    if "llama_cpp" in _sys.modules:
        import warnings as _warnings

        _warnings.warn("ripple-gguf: import ripple_gguf before llama_cpp (or set OMP_WAIT_POLICY=PASSIVE): "
                       "llama.cpp's OpenMP threads spin-wait and slow the FFN backend down", RuntimeWarning,
                       stacklevel=2)
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from .constants import TOOL_VERSION as __version__
from .runtime import configure, last_error, last_load, register, reset_stats, settings, stats

register()

__all__ = ["__version__", "configure", "last_error", "last_load", "register", "reset_stats", "settings", "stats"]
