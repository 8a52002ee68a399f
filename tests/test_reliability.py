"""Reliability (issue 10): writes that touch only their own new file, settings that fail whole,
clear errors for damaged or unreadable ripple files, and the CLI never showing a traceback for
bad input. One test per reproduced problem."""
from __future__ import annotations

import hashlib
import os
import resource
import shutil
import struct
import subprocess
import sys

import llama_cpp
import pytest

import ripple_gguf
from ripple_gguf.atomic import atomic_output
from ripple_gguf.cli import main
from ripple_gguf.format import constants as C
from ripple_gguf.format.layout import RippleFormatError
from ripple_gguf.format.reader import RippleFile, read_gguf_header
from ripple_gguf.offline.convert import convert
from ripple_gguf.runtime import backend as runtime
from ripple_gguf.runtime.settings import MAX_COLLAPSE_BYTES
from .synth import make_model, small_offline

Keys = C.Keys


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """A small synthetic model packed with profiling (thresholds, predictors, quality keys)."""
    d = tmp_path_factory.mktemp("reliability")
    src = make_model(d / "src.gguf", ffn_type="Q8_0", n_embd=64, n_ff=128, n_layers=2)
    return convert(src, d / "profiled.ripple.gguf", offline=small_offline(), quiet=True).path


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def _one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ripple-gguf: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# --- 1. writes ---------------------------------------------------------------------------------

def test_convert_source_named_like_temporary_survives(tmp_path, capsys):
    # `ripple-gguf convert model.gguf.tmp model.gguf` used to write its temporary over its source
    src = make_model(tmp_path / "model.gguf.tmp", ffn_type="Q8_0")
    before = _sha(src)
    dst = tmp_path / "model.gguf"
    dst.write_bytes(b"an older model.gguf")
    rc, err = _cli(capsys, "convert", src, dst, "--no-profile", "--quiet")
    assert rc == 0, err
    assert _sha(src) == before
    rf = RippleFile.open(dst)
    rf.verify_full()
    assert rf.source.sha256 == before
    assert sorted(os.listdir(tmp_path)) == ["model.gguf", "model.gguf.tmp"]  # no temporary left
    assert oct(os.stat(dst).st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("link", ["same path", "hard link", "symlink"])
def test_convert_refuses_destination_that_is_the_source(tmp_path, capsys, link):
    src = make_model(tmp_path / "m.gguf")
    before = _sha(src)
    dst = tmp_path / "dst.gguf"
    if link == "same path":
        dst = src
    elif link == "hard link":
        os.link(src, dst)
    else:
        os.symlink(src, dst)
    with pytest.raises(ValueError, match="destination is the source"):
        convert(src, dst, quiet=True)
    rc, err = _cli(capsys, "convert", dst, src, "--no-profile")  # either direction
    assert rc == 2
    _one_line_error(err, "destination is the source")
    assert _sha(src) == before
    assert sorted(os.listdir(tmp_path)) == sorted({"m.gguf", os.path.basename(dst)})


def test_convert_failure_leaves_no_partial_file(tmp_path):
    # a write that fails half-way (file size limit: EFBIG, as a full disk gives ENOSPC) keeps the
    # old destination and leaves no temporary behind
    src = make_model(tmp_path / "m.gguf", ffn_type="Q8_0")
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"previous content")
    limit = os.path.getsize(src) // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([sys.executable, "-m", "ripple_gguf.cli", "convert", str(src), str(dst), "--no-profile"],
                       capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert r.returncode == 2, r.stderr
    _one_line_error(r.stderr, "File too large")
    assert dst.read_bytes() == b"previous content"
    assert sorted(os.listdir(tmp_path)) == ["m.gguf", "out.gguf"]


def test_atomic_output_removes_only_its_own_temporary(tmp_path):
    dst = tmp_path / "out.json"
    other = tmp_path / "other"
    other.write_text("not ours")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(dst) as tmp:
            assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".out.json.")
            os.replace(other, tmp)  # something else now carries the temporary's name
            raise RuntimeError("boom")
    assert not dst.exists()
    assert open(tmp).read() == "not ours"  # left alone: it is not the file atomic_output created
    with atomic_output(dst) as tmp2:
        with open(tmp2, "w") as f:
            f.write("{}")
    assert dst.read_text() == "{}" and not os.path.exists(tmp2)


# --- 2. settings -------------------------------------------------------------------------------

@pytest.fixture
def restore_settings():
    yield
    runtime.reset_settings()


def _state():
    s = ripple_gguf.settings()
    return {k: s[k] for k in ("mode", "cache_mb", "cache_fraction", "cache_policy", "collapse", "collapse_bytes",
                              "direct_io", "io_threads", "prefetch", "overlap", "exact_down", "sparse_down")}


def test_configure_parses_booleans_strictly(restore_settings):
    ripple_gguf.configure(direct_io=True, prefetch=True)
    s = ripple_gguf.configure(direct_io="no", prefetch="0")  # used to turn both on
    assert s["direct_io"] is False and s["prefetch"] is False
    assert ripple_gguf.configure(direct_io="ON", prefetch=1)["direct_io"] is True
    before = _state()
    for bad in ("maybe", "", 2, 0.5, []):
        with pytest.raises(ValueError, match="direct_io must be True/False"):
            ripple_gguf.configure(direct_io=bad)
    assert _state() == before


def test_configure_that_raises_applies_nothing(restore_settings):
    before = _state()
    bad_calls = [dict(mode="exact", io_threads=4, cache_mb=-1), dict(cache_policy="s3fifo", collapse=-5),
                 dict(direct_io=True, io_threads=0), dict(prefetch=True, mode="fast"),
                 dict(cache_mb=16, cache_fraction=0.5), dict(exact_down="bundles", cache_fraction=float("nan"))]
    for kw in bad_calls:
        with pytest.raises(ValueError):
            ripple_gguf.configure(**kw)
        assert _state() == before, kw


def test_configure_huge_collapse_is_a_clear_error_and_leaves_state_clean(restore_settings):
    before = _state()
    with pytest.raises(ValueError, match=r"collapse must be .*2?1099511627776"):
        ripple_gguf.configure(collapse=10 ** 30)  # used to raise OverflowError and poison later calls
    assert _state() == before
    assert ripple_gguf.configure(io_threads=4)["io_threads"] == 4
    assert ripple_gguf.configure(collapse=MAX_COLLAPSE_BYTES)["collapse_bytes"] == MAX_COLLAPSE_BYTES


@pytest.mark.parametrize("kw, match", [
    (dict(cache_mb=1e12), "cache_mb must be a finite number of MiB in \\[0, 1048576\\]"),
    (dict(cache_mb=float("inf")), "cache_mb"), (dict(cache_mb="64"), "cache_mb"),
    (dict(cache_fraction=0.0), "cache_fraction"), (dict(io_threads=65), "io_threads"),
    (dict(io_threads=4.0), "io_threads"), (dict(io_threads=True), "io_threads"),
    (dict(collapse=1.5), "collapse"), (dict(io_engine="fast"), "io_engine"), (dict(mode=1), "mode")])
def test_configure_bounds_and_types(restore_settings, kw, match):
    before = _state()
    with pytest.raises(ValueError, match=match):
        ripple_gguf.configure(**kw)
    assert _state() == before


@pytest.mark.parametrize("var, value", [
    ("RIPPLE_CACHE_MB", "nan"), ("RIPPLE_CACHE_MB", "inf"), ("RIPPLE_CACHE_MB", "1e12"), ("RIPPLE_CACHE_MB", "-1"),
    ("RIPPLE_CACHE_MB", "abc"), ("RIPPLE_CACHE_FRACTION", "2"), ("RIPPLE_MODE", "bogus"),
    ("RIPPLE_DIRECT_IO", "maybe"), ("RIPPLE_PREFETCH", "2"), ("RIPPLE_COLLAPSE", "sometimes"),
    ("RIPPLE_IO_THREADS", "0"), ("RIPPLE_IO_THREADS", "2.5"), ("RIPPLE_IO_ENGINE", "fast"),
    ("RIPPLE_CACHE_POLICY", "mru"), ("RIPPLE_EXACT_DOWN", "rows"), ("RIPPLE_OVERLAP", "maybe"),
    ("RIPPLE_SPARSE_DOWN", "rows")])
def test_environment_settings_checked_naming_the_variable(restore_settings, monkeypatch, var, value):
    before = _state()
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=f"{var} must be .*got {value!r}"):
        runtime.reset_settings()  # what import runs
    assert _state() == before


def test_bad_environment_variable_fails_the_import_naming_it(tmp_path):
    env = dict(os.environ, RIPPLE_CACHE_MB="nan", RIPPLE_DIRECT_IO="no")
    r = subprocess.run([sys.executable, "-c", "import ripple_gguf"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == \
        "ValueError: RIPPLE_CACHE_MB must be a finite number of MiB in [0, 1048576], got 'nan'"
    env = dict(os.environ, RIPPLE_CACHE_MB="8", RIPPLE_DIRECT_IO="no", RIPPLE_PREFETCH="off")
    r = subprocess.run([sys.executable, "-c", "import ripple_gguf as r; s = r.settings(); "
                                              "print(s['cache_mb'], s['direct_io'], s['prefetch'])"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["8.0", "False", "False"], r.stderr
    # the command says it in one line (no traceback) and exits 2
    exe = shutil.which("ripple-gguf") or os.path.join(os.path.dirname(sys.executable), "ripple-gguf")
    r = subprocess.run([exe, "inspect", str(tmp_path / "none.gguf")], env=dict(os.environ, RIPPLE_CACHE_MB="nan"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == \
        "ripple-gguf: error: RIPPLE_CACHE_MB must be a finite number of MiB in [0, 1048576], got 'nan'"


# --- 3. clear errors for damaged or unreadable ripple files -------------------------------------

def _damaged(src: str, dst, key: str, edit) -> str:
    """Copy of ``src`` with the serialized record of ``key`` changed in place by ``edit(bytes)``
    (same length: the rest of the file stays where it was)."""
    shutil.copyfile(src, dst)
    start, end = read_gguf_header(src).kv[key].span
    with open(dst, "r+b") as f:
        f.seek(start)
        rec = f.read(end - start)
        new = edit(rec)
        assert len(new) == len(rec)
        f.seek(start)
        f.write(new)
    return str(dst)


def _retype(vtype: int):
    """Edit: the record's value type field (after the u64 length and the key name) set to ``vtype``."""
    def edit(rec: bytes) -> bytes:
        n = struct.unpack_from("<Q", rec)[0]
        return rec[:8 + n] + struct.pack("<I", vtype) + rec[8 + n + 4:]
    return edit


def _load(path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)


def test_damaged_active_fraction_key_is_a_clear_error(profiled, tmp_path, capsys):
    af = Keys.Sparsity.ACTIVE_FRACTION
    cases = {
        # renamed: the key is missing (used to be a bare KeyError at load and in inspect)
        "renamed.gguf": (lambda rec: rec.replace(af.encode(), af[:-1].encode() + b"X"),
                         f"missing metadata key {af}"),
        "u32.gguf": (_retype(4), f"metadata key {af} is u32, expected f32"),
        # a string type: the value no longer parses, the header after it is garbage
        "string.gguf": (_retype(8), "GGUF header"),
    }
    for name, (edit, match) in cases.items():
        p = _damaged(profiled, tmp_path / name, af, edit)
        with pytest.raises(RippleFormatError, match=f"{name}.*{match}"):
            _load(p)
        for cmd in ("inspect", "verify"):
            rc, err = _cli(capsys, cmd, p)
            assert rc == 2, (cmd, name)
            _one_line_error(err, p, match)


def test_damaged_json_and_fraction_values_are_clear_errors(profiled, tmp_path):
    q = Keys.Placement.QUALITY
    p = _damaged(profiled, tmp_path / "json.gguf", q, lambda rec: rec[:-1] + b"!")
    with pytest.raises(RippleFormatError, match=f"json.gguf.*{q} is not a JSON object"):
        _load(p)
    af = Keys.Sparsity.ACTIVE_FRACTION
    p = _damaged(profiled, tmp_path / "nan.gguf", af, lambda rec: rec[:-4] + struct.pack("<f", float("nan")))
    with pytest.raises(RippleFormatError, match=f"nan.gguf.*{af} is nan"):
        RippleFile.open(p)


def test_unreadable_ripple_path_gets_the_plugins_error(tmp_path, capsys):
    # tests run as root (mode 000 does not stop root): a directory and a FIFO are unreadable paths
    d = tmp_path / "dir.ripple.gguf"
    d.mkdir()
    fifo = tmp_path / "fifo.ripple.gguf"
    os.mkfifo(fifo)
    for p, why in ((d, "cannot read: a directory"), (fifo, "cannot read: not a regular file")):
        with pytest.raises(RippleFormatError, match=f"{p.name}: {why}"):
            _load(p)  # a FIFO must not block the load either
        for cmd in ("inspect", "verify", "perplexity"):
            rc, err = _cli(capsys, cmd, p)
            assert rc == 2, cmd
            _one_line_error(err, str(p), why)
        rc, err = _cli(capsys, "convert", p, tmp_path / "out.gguf", "--no-profile")
        assert rc == 2
        _one_line_error(err, str(p), why)


def test_header_truncated_ripple_file_gets_the_plugins_error(profiled, tmp_path, capsys):
    # cut inside the ripple.* metadata: the GGUF header no longer parses, the file is still
    # recognisably ripple and must not go to stock llama.cpp as "not ripple"
    start, end = read_gguf_header(profiled).kv[Keys.Placement.ORDER].span
    p = tmp_path / "cut.gguf"
    with open(profiled, "rb") as f:
        p.write_bytes(f.read((start + end) // 2))
    assert RippleFile.is_ripple(profiled)
    with pytest.raises(RippleFormatError, match="cut.gguf: truncated GGUF header"):
        RippleFile.is_ripple(p)
    with pytest.raises(RippleFormatError, match="cut.gguf: truncated or corrupt GGUF header"):
        _load(p)  # the library's reader (ggml's gguf parser) cannot tell a cut from a corruption
    for cmd in ("inspect", "verify", "perplexity"):
        rc, err = _cli(capsys, cmd, p)
        assert rc == 2, cmd
        _one_line_error(err, str(p), "truncated", "GGUF header")


def test_cli_errors_are_one_line_for_bad_input(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    missing = tmp_path / "missing.gguf"
    plain = make_model(tmp_path / "plain.gguf")
    for argv, needle in [(("inspect", text), "not a GGUF file"), (("verify", missing), "No such file"),
                         (("inspect", plain), "not a ripple-packed GGUF"),
                         (("convert", text, tmp_path / "o.gguf", "--no-profile"), "not a GGUF file"),
                         (("convert", plain, tmp_path, "--no-profile"), "destination is a directory"),
                         (("convert", plain, tmp_path / "no" / "o.gguf", "--no-profile"),
                          f"{tmp_path / 'no' / 'o.gguf'}: cannot create a file in {tmp_path / 'no'}")]:
        rc, err = _cli(capsys, *argv)
        assert rc == 2, argv
        _one_line_error(err, needle)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "plain.gguf"]


# --- 4. convert --placement original with profiling ---------------------------------------------

def test_convert_placement_original_with_profiling_prints_summary(tmp_path, capsys):
    # used to write the file, then crash in the summary: KeyError 'original_mean_run_length'
    src = make_model(tmp_path / "m.gguf", ffn_type="Q8_0")
    dst = tmp_path / "orig.gguf"
    rc = main(["convert", str(src), str(dst), "--placement", "original", "--calib-tokens", "512",
               "--predictor-rank", "8", "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in err
    line = next(l for l in out.splitlines() if l.startswith("placement "))
    assert line.startswith("placement original on ") and "frequency: mean run" in line
    assert RippleFile.open(dst).placement_method == "original"
