"""The typed binding: the names Python gives the library's numbers are the library's own (its
header's constants, and the RIPPLE_* parser of csrc/ripple_settings.c), and failures come back as
exceptions with the library's message."""
from __future__ import annotations

import pytest

from ripple_gguf import binding
from ripple_gguf.runtime import settings


def test_the_numberings_are_the_headers():
    lib = binding.lib
    assert binding.MODES == {"exact": lib.RIPPLE_MODE_EXACT, "sparse": lib.RIPPLE_MODE_SPARSE,
                             "auto": lib.RIPPLE_MODE_AUTO}
    assert binding.ACTIVITY_RULES == {"none": lib.RIPPLE_RULE_NONE, "nonzero": lib.RIPPLE_RULE_NONZERO,
                                      "magnitude": lib.RIPPLE_RULE_MAGNITUDE, "gate": lib.RIPPLE_RULE_GATE}
    assert list(binding.CACHE_POLICIES) == ["lru", "s3fifo", "linking", "pinned"]  # value order: in messages
    assert settings.MODES is binding.MODES and settings.CACHE_POLICIES is binding.CACHE_POLICIES
    assert settings.MAX_IO_THREADS == lib.RIPPLE_MAX_IO_THREADS and settings.MAX_CACHE_MB == lib.RIPPLE_MAX_CACHE_MB


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


def test_failures_carry_the_librarys_message(tmp_path):
    with pytest.raises(ValueError, match="cannot hold rows"):
        binding.row_size(2, 33)  # Q4_0 rows are whole blocks of 32
    with pytest.raises(RuntimeError, match="ripple_set_mode"):
        binding.set_mode(7)
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(RuntimeError, match=str(bad)):
        binding.store_open_file(str(bad).encode())
