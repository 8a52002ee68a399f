"""Evaluation text of another domain: Debian's fortunes, fetched from the Debian package registry
(``apt-get download`` + ``dpkg -x``) into a cache. Tests that need the package fetch it themselves;
they are skipped only when the registry cannot be reached."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from ripple_gguf.cli import main
from ripple_gguf.eval import corpora
from ripple_gguf.offline import quality


def _apt_update_or_skip(why: corpora.CorpusUnavailable) -> None:
    """The apt index does not list the package (a fresh image): update it, as the docs say."""
    if os.geteuid() != 0:
        raise why
    r = subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=600)
    out = (r.stdout + r.stderr).lower()
    if any(s in out for s in corpora._UNREACHABLE):
        pytest.skip(f"the Debian package registry is unreachable (apt-get update: {out.strip()[-300:]})")
    if r.returncode != 0:
        raise why


def fortunes_or_skip(n_chars: int = 20000, **where) -> str:
    """fortunes_text, fetching the package when needed; skipped only when the registry is unreachable."""
    for attempt in range(2):
        try:
            return corpora.fortunes_text(n_chars, **where)
        except corpora.CorpusUnavailable as e:
            if e.unreachable:
                pytest.skip(f"the Debian package registry is unreachable: {e}")
            if not (e.not_listed and attempt == 0):
                raise
            _apt_update_or_skip(e)
    raise AssertionError("not reached")


def test_fortunes_are_english_prose():
    text = fortunes_or_skip(20000)
    assert len(text) == 20000
    assert not re.search(r"^%\s*$", text, re.M)  # the separators are gone
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text)  # overstrikes and control characters too
    words = re.findall(r"[a-z]+", text.lower())
    common = {"the", "a", "of", "and", "to", "is", "you", "in", "it", "that"}
    assert sum(w in common for w in words) > 0.15 * len(words)
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.9 * len(text)
    assert "pydoc" not in text and "def __init__" not in text  # not the held-out Python documentation
    # every fortune kept is prose; about 14,000 of them, no duplicates
    entries = corpora.fortunes()
    assert len(entries) > 10000 and len(set(entries)) == len(entries)
    assert all(sum(c.isalpha() or c.isspace() for c in e) >= corpora.PROSE_MIN_LETTERS * len(e) for e in entries)


def test_fortunes_are_deterministic():
    a = fortunes_or_skip(50000)
    corpora._fortunes_of.cache_clear()  # parsed again from the files
    assert corpora.fortunes_text(50000) == a
    assert corpora.fortunes_text(1000) == a[:1000]  # a shorter text is a prefix
    # the order mixes the package's files (sorted by each fortune's sha256): the first 100
    # fortunes come from many files, not the alphabetically first one
    files = {f.name: set(corpora.parse_fortunes(f.read_text(errors="replace"))) for f in corpora.fortune_files()}
    first = corpora.fortunes()[:100]
    assert len({name for e in first for name, es in files.items() if e in es}) >= 10
    assert not {"ascii-art", "translate-me"} & set(files)


def test_parse_fortunes():
    text = ("First _\bu_\bn_\bd_\be_\br_\bl_\bi_\bn_\be_\bd and b\bbo\bol\bld\bd words.\n\t\t-- Someone\n%\n"
            "%\n"
            "Ring\x07 the bell.\n"
            "%\n"
            "#define X(a) ((a) >> 1) & 0x55555555 | ((a) << 1) & 0xaaaaaaaa\n"
            "%\n"
            "Last one, no separator after it.\n")
    assert corpora.parse_fortunes(text) == [
        "First underlined and bold words.\n\t\t-- Someone", "Ring the bell.", "Last one, no separator after it."]


def test_fetch_into_an_empty_cache(tmp_path):
    """The package fetched from the registry into a given cache (not the installed copy), once."""
    text = fortunes_or_skip(5000, cache_dir=tmp_path, installed=False)
    d = tmp_path / "fortunes" / "usr" / "share" / "games" / "fortunes"
    assert (d / "wisdom").is_file() and (tmp_path / "fortunes" / "VERSION").read_text().startswith("fortunes_")
    assert [p.name for p in tmp_path.iterdir()] == ["fortunes"]  # no temporary left behind
    assert not list(tmp_path.rglob("*.deb"))
    # from the cache now, without the registry
    assert corpora.fortunes_text(5000, cache_dir=tmp_path, installed=False, download=False) == text


def test_unavailable_names_what_to_install(tmp_path, monkeypatch):
    with pytest.raises(corpora.CorpusUnavailable, match="apt-get install fortunes"):
        corpora.fortunes_text(1000, cache_dir=tmp_path / "empty", installed=False, download=False)
    # a cache path that cannot be a directory (the environment override)
    bad = tmp_path / "a-file"
    bad.write_text("not a directory\n")
    monkeypatch.setenv("RIPPLE_CORPORA_DIR", str(bad))
    assert corpora.corpora_dir() == bad
    if shutil.which("apt-get") and shutil.which("dpkg-deb"):
        with pytest.raises(corpora.CorpusUnavailable, match=r"a-file: cannot create the corpus cache.*RIPPLE_CORPORA_DIR"):
            corpora.fortunes_text(1000, installed=False)
    # no apt-get to fetch it with (and no dpkg-query: not installed either)
    monkeypatch.setenv("RIPPLE_CORPORA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(corpora.CorpusUnavailable, match="apt-get is not available.*apt-get install fortunes"):
        corpora.fortunes_text(1000)
    assert not (tmp_path / "empty").exists()


def test_cli_error_when_unavailable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RIPPLE_CORPORA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["perplexity", str(tmp_path / "m.ripple.gguf"), "--text", "fortunes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ripple-gguf: error: ") and "apt-get install fortunes" in err[0]


def test_load_text(tmp_path):
    assert corpora.load_text("heldout", 3000) == ("held-out pydoc_data.topics", quality.heldout_text(3000))
    p = tmp_path / "notes.txt"
    p.write_text("Some text of my own.\n")
    assert corpora.load_text(str(p), 3000) == (str(p), "Some text of my own.\n")
    fortunes_or_skip(100)
    assert corpora.load_text("fortunes", 3000) == ("Debian fortunes", corpora.fortunes_text(3000))
    with pytest.raises(ValueError, match="missing.txt"):
        corpora.load_text(str(tmp_path / "missing.txt"), 3000)
