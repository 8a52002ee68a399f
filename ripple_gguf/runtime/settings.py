"""The runtime settings (README, Settings): the names of each choice with the native library's
numbers for them, the bounds of each value, and the checks :func:`ripple_gguf.configure` applies
to its arguments before any is applied. The ``RIPPLE_*`` variables are parsed by the library
itself (csrc/ripple_settings.c), with the same rules; :func:`from_env` names what it returns.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Mapping

import numpy as np

from .. import binding

# name -> the library's number (csrc/ripple.h, through the binding)
MODES, CACHE_POLICIES, IO_ENGINES = binding.MODES, binding.CACHE_POLICIES, binding.IO_ENGINES
EXACT_DOWN, SPARSE_DOWN = binding.EXACT_DOWN, binding.SPARSE_DOWN


def name_of(table: Mapping[str, int], value: int) -> str:
    return next(k for k, x in table.items() if x == value)


# Upper bounds (README, Settings): beyond them a value is a typo, not a configuration.
MAX_CACHE_MB, MAX_IO_THREADS = binding.MAX_CACHE_MB, binding.MAX_IO_THREADS  # what RIPPLE_* may hold
MAX_COLLAPSE_BYTES = 1 << 40
_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_BOOL_RULE = 'True/False, 0/1 or one of "1", "0", "true", "false", "yes", "no", "on", "off"'


class _BadSetting(ValueError):
    def __init__(self, label: str, rule: str, value):
        self.label, self.rule = label, rule
        super().__init__(f"{label} must be {rule}, got {value!r}")


def _bool(label: str, v) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, numbers.Integral) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[v.strip().lower()]
    raise _BadSetting(label, _BOOL_RULE, v)


def _number(label: str, v, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False, unit: str = ""):
    """``v`` as an int (``integer``) or a finite float in [lo, hi] ((lo, hi] with ``lo_open``)."""
    kind = "whole number" if integer else "finite number"
    rule = f"a {kind}{unit} in {'(' if lo_open else '['}{lo}, {hi}]"
    ok_type = isinstance(v, numbers.Integral) if integer else isinstance(v, numbers.Real)
    if isinstance(v, (bool, np.bool_)) or not ok_type:
        raise _BadSetting(label, rule, v)
    x = int(v) if integer else float(v)
    if not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo):
        raise _BadSetting(label, rule, v)
    return x


def _choice(table: dict):
    def check(label: str, v) -> str:
        if not isinstance(v, str) or v not in table:
            raise _BadSetting(label, f"one of {', '.join(table)}", v)
        return v
    return check


def _collapse_value(label: str, v):
    """"auto" (True), "off" (False) or a fixed gap in bytes (an int)."""
    if isinstance(v, (bool, np.bool_, str)):
        return "auto" if _bool(label, v) else "off"
    if isinstance(v, numbers.Integral) and 0 <= v <= MAX_COLLAPSE_BYTES:
        return int(v)
    raise _BadSetting(label, f"True, False or a whole number of bytes in [0, {MAX_COLLAPSE_BYTES}]", v)


CHECKS = {
    "mode": _choice(MODES),
    "cache_mb": lambda label, v: _number(label, v, 0, MAX_CACHE_MB, unit=" of MiB"),
    "cache_fraction": lambda label, v: _number(label, v, 0, 1, lo_open=True),
    "cache_policy": _choice(CACHE_POLICIES),
    "collapse": _collapse_value,
    "direct_io": _bool,
    "io_threads": lambda label, v: _number(label, v, 1, MAX_IO_THREADS, integer=True),
    "io_engine": _choice(IO_ENGINES),
    "prefetch": _bool,
    "overlap": _bool,
    "exact_down": _choice(EXACT_DOWN),
    "sparse_down": _choice(SPARSE_DOWN),
}


def validate(values: Dict[str, object], labels: Dict[str, str]) -> Dict[str, object]:
    """The given (non-None) settings checked and normalized; ValueError naming ``labels[key]``."""
    out = {k: CHECKS[k](labels[k], v) for k, v in values.items() if v is not None}
    if "cache_mb" in out and "cache_fraction" in out:
        raise ValueError(f"give {labels['cache_mb']} or {labels['cache_fraction']}, not both")
    return out


def from_env(env: Mapping[str, object]) -> Dict[str, object]:
    """Every setting from its RIPPLE_* variable (the default when unset or empty), as
    :func:`validate` returns them, from the library's parse of the environment
    (:func:`ripple_gguf.binding.settings_from_env`: the parser every host uses, which raises
    ValueError naming the variable)."""
    out = {"mode": name_of(MODES, env["mode"]), "cache_policy": name_of(CACHE_POLICIES, env["cache_policy"]),
           "collapse": "auto" if env["collapse"] else "off", "direct_io": bool(env["direct_io"]),
           "io_threads": env["io_threads"], "io_engine": name_of(IO_ENGINES, env["io_engine"]),
           "prefetch": bool(env["prefetch"]), "overlap": bool(env["overlap"]),
           "exact_down": name_of(EXACT_DOWN, env["exact_down"]), "sparse_down": name_of(SPARSE_DOWN, env["sparse_down"])}
    if env["cache_fraction"] > 0:
        out["cache_fraction"] = env["cache_fraction"]
    else:
        out["cache_mb"] = env["cache_mb"]
    return out
