"""ripple-gguf: llama.cpp with FFN weights served from flash as co-activation-ordered neuron bundles.

``import ripple_gguf`` registers the RIPPLE ggml backend into the llama.cpp that llama-cpp-python
loaded; after that, ``llama_cpp.Llama(model_path="m.ripple.gguf")`` runs the FFN of a ripple-packed
file through the backend, and any other GGUF file as before.
"""
from .format.constants import TOOL_VERSION as __version__
from .runtime.backend import configure, last_error, last_load, register, reset_stats, settings, stats

try:
    register()
except ValueError as _e:  # a bad RIPPLE_* variable: the import fails, naming it
    import os as _os
    import sys as _sys

    if _os.path.basename(_sys.argv[0] if _sys.argv else "") == "ripple-gguf":  # the command: one line, exit 2
        print(f"ripple-gguf: error: {_e}", file=_sys.stderr)
        raise SystemExit(2) from None
    raise

__all__ = ["__version__", "configure", "last_error", "last_load", "register", "reset_stats", "settings", "stats"]
