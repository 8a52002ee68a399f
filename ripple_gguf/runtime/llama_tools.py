"""llama.cpp's own programs (llama-server, llama-bench) with the RIPPLE backend loaded as a ggml
backend module: no Python in the serving process.

``scripts/build_llama_server.sh`` builds them from exactly the llama.cpp sources this package is
pinned to, with ``GGML_BACKEND_DL=ON``; :func:`run` starts one with ``GGML_BACKEND_PATH`` naming
this package's native library. The library then takes its settings from the ``RIPPLE_*``
variables, recognises ripple-packed files as llama.cpp loads them (refusing damaged ones with the
file and the problem in the program's log) and writes ``RIPPLE_STATS_FILE``.
"""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Optional, Sequence

from .. import binding
from ..format.constants import TOOL_NAME

log = logging.getLogger(__name__)

BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_llama_server.sh"


def default_build_dir() -> Path:
    """Where the build script puts its build (RIPPLE_LLAMA_BUILD_DIR overrides)."""
    override = os.environ.get("RIPPLE_LLAMA_BUILD_DIR")
    if override:
        return Path(override)
    return Path.home() / ".cache" / "ripple-gguf" / f"llama-server-{binding.LLAMA_CPP_PYTHON_VERSION}"


def binary(tool: str, build_dir: Optional[os.PathLike] = None) -> Path:
    return Path(build_dir or default_build_dir()) / "build" / "bin" / tool


def build(build_dir: Optional[os.PathLike] = None, quiet: bool = False) -> Path:
    """Run the build script (a few minutes the first time, seconds once built); returns the build dir."""
    if not BUILD_SCRIPT.exists():
        raise RuntimeError(f"{BUILD_SCRIPT} is missing: building llama.cpp's tools needs ripple-gguf's source tree")
    out = Path(build_dir or default_build_dir())
    r = subprocess.run(["bash", str(BUILD_SCRIPT), str(out)], capture_output=quiet, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building llama.cpp's tools failed (exit {r.returncode})"
                           + (f": {r.stderr.strip()[-2000:]}" if quiet else ""))
    return out


def library_path() -> Path:
    """This package's native library: the module GGML_BACKEND_PATH names."""
    return Path(binding.library_path)


def environment(base: Optional[dict] = None) -> dict:
    env = dict(os.environ if base is None else base)
    env["GGML_BACKEND_PATH"] = str(library_path())
    return env


def command(tool: str, args: Sequence[str], build_dir: Optional[os.PathLike] = None) -> list:
    exe = binary(tool, build_dir)
    if not exe.exists():
        raise RuntimeError(f"{exe} is not built: run `bash {BUILD_SCRIPT}` (about 7 minutes on 2 cores) or "
                           f"`{TOOL_NAME} {tool} --build ...`")
    return [str(exe), *args]


def run(tool: str, args: Sequence[str], build_dir: Optional[os.PathLike] = None) -> None:
    """Replace this process with the tool, the backend module named in its environment."""
    cmd = command(tool, args, build_dir)
    env = environment()
    log.info("%s: GGML_BACKEND_PATH=%s %s", TOOL_NAME, env["GGML_BACKEND_PATH"], " ".join(cmd))
    os.execve(cmd[0], cmd, env)
