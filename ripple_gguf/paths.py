"""Where the package keeps what it fetches or computes once: one cache directory, one
subdirectory per kind, each overridable by its own environment variable."""
from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/ripple-gguf, else ~/.cache/ripple-gguf."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ripple-gguf"


def cache_subdir(name: str, env: str) -> Path:
    """The directory in $``env`` if set, else ``name`` in :func:`default_cache_dir`."""
    return Path(os.environ.get(env) or default_cache_dir() / name)
