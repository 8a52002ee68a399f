"""The typed binding: the names Python gives the library's numbers are the library's own (its
header's constants, and the RIPPLE_* parser of csrc/ripple_settings.c), and failures come back as
exceptions with the library's message."""
from __future__ import annotations

import pytest

from ripple_gguf import binding
from ripple_gguf.runtime import settings


def test_modes_and_exact_down_sources_come_from_the_header():
    assert binding.MODES == binding._declared("RIPPLE_MODE_") == {"exact": 0, "sparse": 1, "auto": 2}
    assert binding.EXACT_DOWN == binding._declared("RIPPLE_EXACT_DOWN_")
    assert settings.MODES is binding.MODES and settings.CACHE_POLICIES is binding.CACHE_POLICIES
    assert {"gate", "magnitude"} <= set(binding.ACTIVITY_RULES)


@pytest.mark.parametrize("variable, field, table", [
    ("RIPPLE_MODE", "mode", settings.MODES),
    ("RIPPLE_CACHE_POLICY", "cache_policy", settings.CACHE_POLICIES),
    ("RIPPLE_EXACT_DOWN", "exact_down", settings.EXACT_DOWN),
    ("RIPPLE_SPARSE_DOWN", "sparse_down", settings.SPARSE_DOWN),
    ("RIPPLE_IO_ENGINE", "io_engine", settings.IO_ENGINES),
])
def test_every_name_means_what_the_librarys_own_parser_reads(monkeypatch, variable, field, table):
    for name, number in table.items():
        monkeypatch.setenv(variable, name)
        assert binding.settings_from_env()[field] == number, name
    monkeypatch.setenv(variable, "no-such-name")
    with pytest.raises(ValueError, match=variable):
        binding.settings_from_env()


@pytest.mark.parametrize("prefix", sorted(binding.NOT_IN_HEADER_YET))
def test_families_not_in_the_header_yet_are_not_there(prefix):
    """Once csrc/ripple.h declares one of these families, binding reads it from there: this fails
    until the Python copy is gone."""
    assert not binding._declared(prefix), f"ripple.h declares {prefix}*: drop its copy in ripple_gguf/binding.py"


def test_failures_carry_the_librarys_message(tmp_path):
    with pytest.raises(ValueError, match="cannot hold rows"):
        binding.row_size(2, 33)  # Q4_0 rows are whole blocks of 32
    with pytest.raises(RuntimeError, match="ripple_set_mode"):
        binding.set_mode(7)
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(RuntimeError, match=str(bad)):
        binding.store_open_file(str(bad).encode())
