"""Evaluation text beyond the held-out Python documentation: English prose of another domain,
and the standard library's own docstrings.

``fortunes_text`` is Debian's ``fortunes`` package (some 15,000 quotations, jokes, definitions and
passages of literature) as plain prose. The package comes from the Debian package registry with
``apt-get download fortunes`` and ``dpkg -x`` into the cache (no root needed for either, once the
apt index lists the package), unless the package is installed (its files in
``/usr/share/games/fortunes``); it is fetched once, then read from the cache
(``$RIPPLE_CORPORA_DIR``, else ``~/.cache/ripple-gguf/corpora``).

``load_text`` resolves what ``ripple-gguf perplexity --text`` and ``scripts/sparsity_sweep.py
--text`` take: ``heldout`` (the end of CPython's ``pydoc_data`` topics, never used for
calibration), ``fortunes``, or the path of a UTF-8 text file.

``stdlib_docstrings`` reads the docstrings of CPython's own modules, in two disjoint halves (the
placement robustness table of ``ripple-gguf bench`` calibrates on one and evaluates on the other).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import Optional, Tuple

from ..offline.profile import read_text
from ..offline.quality import heldout_text
from ..paths import cache_subdir

FORTUNES_PACKAGE = "fortunes"
_PACKAGE_SUBDIR = "usr/share/games/fortunes"  # where the package puts its files
# Files that are not English prose: pictures drawn in characters, and Latin (and other languages)
# left to translate. The offensive collection (an ``off/`` directory, another package) is never read.
FORTUNES_EXCLUDED = frozenset({"ascii-art", "translate-me"})
# A fortune is kept when letters and whitespace are at least this fraction of its characters (drops
# code, tables, numbers and character art inside the prose files: about 1% of them).
PROSE_MIN_LETTERS = 0.75
# The texts ``load_text`` knows by name.
TEXTS = ("heldout", "fortunes")

_OVERSTRIKE = re.compile(r"[^\x08\n]\x08")  # "_\bx" (underlined) or "x\bx" (bold): keep the last
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # tab and newline stay
_SEPARATOR = re.compile(r"^%[ \t]*$", re.M)
_UNREACHABLE = ("could not resolve", "temporary failure", "failed to fetch", "unable to connect",
                "connection failed", "connection timed out", "network is unreachable", "could not connect")
_NOT_LISTED = ("unable to locate package", "has no installation candidate", "no packages found")


class CorpusUnavailable(RuntimeError):
    """A corpus could not be obtained; the message says what to install. ``unreachable``: the
    package registry could not be reached (network), rather than a missing tool or index."""

    def __init__(self, message: str, *, unreachable: bool = False, not_listed: bool = False):
        super().__init__(message)
        self.unreachable = unreachable
        self.not_listed = not_listed  # the apt index does not list the package: apt-get update


def corpora_dir() -> Path:
    """$RIPPLE_CORPORA_DIR, else $XDG_CACHE_HOME/ripple-gguf/corpora (~/.cache/...)."""
    return cache_subdir("corpora", "RIPPLE_CORPORA_DIR")


def _is_fortune_file(path: Path) -> bool:
    """A fortune file of prose: a regular file without an extension (the ``.dat`` indexes and
    ``.u8`` links are not text) directly in the package's directory (not ``off/``), not excluded."""
    return path.parent.name == "fortunes" and "." not in path.name and path.name not in FORTUNES_EXCLUDED \
        and path.is_file() and not path.is_symlink()


def _fortune_files(d: Path) -> list:
    """The fortune files (:func:`_is_fortune_file`) of a directory, sorted by name."""
    try:
        return sorted((p for p in d.iterdir() if _is_fortune_file(p)), key=lambda p: p.name)
    except OSError:
        return []


def _installed_files() -> list:
    """The fortune files of the installed ``fortunes`` package (``dpkg-query -L``; other packages
    put theirs in the same directory), or [] when it is not installed."""
    if shutil.which("dpkg-query") is None:
        return []
    r = subprocess.run(["dpkg-query", "-L", FORTUNES_PACKAGE], capture_output=True, text=True)
    if r.returncode != 0:
        return []
    files = [Path(line) for line in r.stdout.splitlines()
             if line.startswith(f"/{_PACKAGE_SUBDIR}/") and _is_fortune_file(Path(line))]
    return sorted(files, key=lambda p: p.name)


def _fetch(cache: Path) -> Path:
    """``apt-get download fortunes`` and ``dpkg -x`` into ``cache/fortunes``; returns its fortune
    directory. The package is unpacked in a temporary directory and renamed into place, so the
    cache never holds a partial copy."""
    install = (f"install Debian's {FORTUNES_PACKAGE} package (apt-get install {FORTUNES_PACKAGE}), or let "
               f"'apt-get download {FORTUNES_PACKAGE}' work (run 'apt-get update' first if the apt index is missing)")
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusUnavailable(f"Debian fortunes are neither installed nor in {cache}, and {tool} is not "
                                    f"available to fetch them: {install}")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".fortunes.", dir=cache))
    except OSError as e:
        raise CorpusUnavailable(f"{cache}: cannot create the corpus cache ({e.strerror}); set RIPPLE_CORPORA_DIR "
                                f"to a writable directory or {install}") from None
    try:
        r = subprocess.run(["apt-get", "download", FORTUNES_PACKAGE], cwd=work, capture_output=True, text=True,
                           timeout=600)
        debs = sorted(work.glob(f"{FORTUNES_PACKAGE}_*.deb"))
        if r.returncode != 0 or not debs:
            err = " ".join((r.stderr or r.stdout).split())[-400:]
            low = err.lower()
            raise CorpusUnavailable(f"apt-get download {FORTUNES_PACKAGE} failed ({err}): {install}",
                                    unreachable=any(s in low for s in _UNREACHABLE),
                                    not_listed=any(s in low for s in _NOT_LISTED))
        r = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(work / "root")], capture_output=True, text=True)
        if r.returncode != 0:
            raise CorpusUnavailable(f"dpkg -x {debs[0].name} failed ({' '.join(r.stderr.split())[-400:]}): {install}")
        (work / "root" / "VERSION").write_text(debs[0].name + "\n")  # e.g. fortunes_1%3a1.99.1-7.3_all.deb
        if not _fortune_files(work / "root" / _PACKAGE_SUBDIR):
            raise CorpusUnavailable(f"{debs[0].name} holds no fortune files under /{_PACKAGE_SUBDIR}: {install}")
        dest = cache / FORTUNES_PACKAGE
        try:
            os.rename(work / "root", dest)
        except OSError:
            if not _fortune_files(dest / _PACKAGE_SUBDIR):  # not another process's complete copy
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest / _PACKAGE_SUBDIR


def fortune_files(*, cache_dir: Optional[os.PathLike] = None, installed: bool = True,
                  download: bool = True) -> list:
    """The prose files of Debian's ``fortunes`` package: the installed package's (``installed``),
    else those in the cache (``cache_dir``, default :func:`corpora_dir`), else fetched into the
    cache from the Debian package registry (``download``). Raises CorpusUnavailable naming what to
    install."""
    files = _installed_files() if installed else []
    if files:
        return files
    cache = Path(cache_dir) if cache_dir is not None else corpora_dir()
    files = _fortune_files(cache / FORTUNES_PACKAGE / _PACKAGE_SUBDIR)
    if files:
        return files
    if not download:
        raise CorpusUnavailable(f"Debian fortunes are neither installed nor in {cache}: install Debian's "
                                f"{FORTUNES_PACKAGE} package (apt-get install {FORTUNES_PACKAGE})")
    return _fortune_files(_fetch(cache))


def parse_fortunes(text: str) -> list:
    """The fortunes of one fortune file's text (entries separated by lines holding ``%``), as
    plain text: overstrike sequences (``_\\bx``, ``x\\bx``) reduced to their last character,
    control characters but tab and newline removed, surrounding blank lines stripped; empty
    entries and those that are not prose (letters and whitespace under PROSE_MIN_LETTERS of the
    characters) left out."""
    out = []
    for entry in _SEPARATOR.split(text.replace("\r\n", "\n")):
        entry = _CONTROL.sub("", _OVERSTRIKE.sub("", entry)).strip("\n").rstrip()
        if not entry.strip():
            continue
        letters = sum(c.isalpha() or c.isspace() for c in entry)
        if letters >= PROSE_MIN_LETTERS * len(entry):
            out.append(entry)
    return out


@functools.lru_cache(maxsize=4)
def _fortunes_of(files: Tuple[str, ...]) -> Tuple[str, ...]:
    seen, out = set(), []
    for f in map(Path, files):
        for entry in parse_fortunes(f.read_bytes().decode("utf-8", errors="replace")):
            if entry not in seen:  # a few fortunes appear in two files
                seen.add(entry)
                out.append(entry)
    # a fixed order that mixes the files' subjects and depends on nothing but each fortune's text
    # (a fortune added to the package moves no other)
    out.sort(key=lambda e: hashlib.sha256(e.encode()).digest())
    return tuple(out)


def fortunes(**where) -> Tuple[str, ...]:
    """Every kept fortune (:func:`parse_fortunes`) of the package's prose files, without
    duplicates, in a fixed order: sorted by the sha256 of their text. ``where``: as
    :func:`fortune_files`."""
    return _fortunes_of(tuple(map(str, fortune_files(**where))))


def fortunes_text(n_chars: int = 20000, **where) -> str:
    """The first ``n_chars`` characters (all of it if fewer: about 2.4 million) of the fortunes
    (:func:`fortunes`) joined by blank lines. ``where``: as :func:`fortune_files` (``cache_dir``,
    ``installed``, ``download``)."""
    if n_chars <= 0:
        raise ValueError(f"fortunes_text: n_chars must be positive, got {n_chars}")
    parts, size = [], 0
    for entry in fortunes(**where):
        if size >= n_chars:
            break
        parts.append(entry)
        size += len(entry) + 2
    return "\n\n".join(parts)[:n_chars]


def load_text(spec: str, n_chars: int) -> Tuple[str, str]:
    """(name, text) for ``spec``: ``heldout`` (:func:`ripple_gguf.offline.quality.heldout_text`), ``fortunes``
    (:func:`fortunes_text`), each of at most ``n_chars`` characters, or the path of a UTF-8 text
    file (the whole file; ``./fortunes`` for a file of that name)."""
    if spec == "heldout":
        return "held-out pydoc_data.topics", heldout_text(n_chars)
    if spec == "fortunes":
        return "Debian fortunes", fortunes_text(n_chars)
    return spec, read_text(spec)


def stdlib_docstrings(part: int) -> tuple:
    """(name, text): the docstrings (module, classes, functions) of the standard library's top-level
    pure-Python modules, read with ``ast`` (nothing is imported). ``part`` 0 takes the modules in the
    first half of the sorted file names, 1 the second half, so a calibration on one part never sees
    the other. Another register than ``pydoc_data``'s topics: API reference prose, not tutorials."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stem not in ("this", "antigravity"))
    half = files[: len(files) // 2] if part == 0 else files[len(files) // 2:]
    texts = []
    for p in half:
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in [tree] + [n for n in ast.walk(tree)
                              if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]:
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                texts.append(doc)
    name = f"stdlib docstrings ({'first' if part == 0 else 'second'} half of {len(files)} modules)"
    return name, "\n\n".join(texts)
