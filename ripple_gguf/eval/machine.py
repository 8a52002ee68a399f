"""The machine the measurements run on (a short description stored with every result) and the
progress lines of long measurements, stamped with its clock."""
from __future__ import annotations

import logging
import os
import time
from typing import Dict

from ..format import constants as C

log = logging.getLogger(__name__)


def progress(msg: str, quiet: bool = False) -> None:
    if not quiet:
        log.info("[%s] %s", time.strftime("%H:%M:%S"), msg)


def machine() -> Dict[str, object]:
    """A short description of the machine the measurements ran on."""
    import platform

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(l.split()[1] for l in f if l.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    import llama_cpp

    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
            "python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__,
            "ripple_gguf": C.TOOL_VERSION}


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
