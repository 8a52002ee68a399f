"""Acceptance: a cold load of the ripple SmolLM2 with the load hook reads at most the non-FFN bytes
+ 2 MiB and grows resident memory by less than non-FFN bytes + cache budget + 64 MiB.

Byte and memory limits, not timings; the measurement is scripts/measure_load.py's, in a fresh
interpreter with the file's pages dropped first.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "measure_load.py"


@pytest.fixture(scope="module")
def measure_load():
    spec = importlib.util.spec_from_file_location("measure_load", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.real_model
def test_cold_load_reads_and_keeps_only_non_ffn(measure_load, real_ripple):
    r = measure_load.measure("ripple-hook", real_ripple)
    ripple = r["ripple"]
    assert ripple["settings"]["load_hook"], ripple["settings"]["load_hook_error"]
    assert ripple["last_load"]["bound_tensors"] == ripple["last_load"]["expected_tensors"] > 0
    assert r["not_dropped"] == 0, "the file's pages were not evicted: the load was not cold"
    lim = measure_load.limits(real_ripple, ripple["settings"]["cache_mb"])
    assert lim["non_ffn_bytes"] > 0
    assert r["bytes_read"] <= lim["read_limit"], (r, lim)
    assert r["rss_delta"] <= lim["rss_limit"], (r, lim)
