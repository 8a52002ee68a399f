"""Corrupt files never compute silently: a seeded campaign of mutants of a small profiled ripple
file (GGUF header, every ripple.* key, region header and footer, checksum table, scale tables,
predictors, sampled and unsampled bundles, the standard FFN tensors, truncations), each loaded and
run (greedy generation, exact and sparse mode) in a child process with a timeout.

Outcomes per mutant and mode: refused at load, failed decode (an error naming the file), the same
tokens and logits as the unmutated file, drift (the same tokens, other logits, no error), WRONG
(other tokens and no error), crash (the child died) or hang (timeout). A single flipped byte of a
random synthetic model seldom changes greedy tokens, so drift counts as silent too. Mutations of non-FFN tensor data are left out: stock llama.cpp does not check them either.

Also here, on the same file: the integrity checks the campaign relies on, one by one."""
from __future__ import annotations

import hashlib
import json
import os
import random
import selectors
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

PROMPT = [1, 72, 101, 108, 108, 111, 44, 32]
N_GEN = 6
SEED = int(os.environ.get("RIPPLE_FUZZ_SEED", "0"))
MUTANT_TIMEOUT_S = 90  # per mutant (both modes), on a busy 2-core machine
OUTCOMES = ("refused", "decode_error", "same", "drift", "WRONG", "crash", "hang")


# ---- the child: loads and runs a list of files, one JSON line per result ----

def _child(jobs_path: str, start: int) -> None:
    import llama_cpp
    import ripple_gguf

    jobs = json.loads(Path(jobs_path).read_text())
    for job in jobs[start:]:
        print(json.dumps({"begin": job["id"]}), flush=True)
        res = {"id": job["id"], "modes": {}}
        path = job["path"]
        ripple_gguf.last_error()
        try:
            # no neuron cache: every token reads what it uses from the file (and is checked)
            ripple_gguf.configure(cache_mb=0, mode="exact", prefetch=False)
            llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=1, n_batch=64, logits_all=True,
                                  verbose=False)
        except Exception as e:  # refused at load: both modes
            res["load_error"] = f"{type(e).__name__}: {e}"
        else:
            for mode in ("exact", "sparse"):
                ripple_gguf.configure(mode=mode, prefetch=mode == "sparse")
                llm.reset()
                toks, err = [], None
                try:
                    llm.eval(PROMPT)
                    for _ in range(N_GEN):
                        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                        toks.append(t)
                        llm.eval([t])
                except Exception as e:
                    err = f"{type(e).__name__}: {e} | {ripple_gguf.last_error()}"
                logits = np.ascontiguousarray(llm.scores[:llm.n_tokens], dtype=np.float32)
                res["modes"][mode] = {"tokens": toks, "error": err,
                                      "logits": hashlib.sha256(logits.tobytes()).hexdigest()}
            llm.close()
        print(json.dumps(res), flush=True)


# ---- the parent: runs the jobs in children, restarting after a crash or a hang ----

def run_jobs(jobs: list[dict], work: Path) -> dict[str, dict]:
    jobs_path = work / "jobs.json"
    jobs_path.write_text(json.dumps(jobs))
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    results: dict[str, dict] = {}
    index = {j["id"]: i for i, j in enumerate(jobs)}
    start = 0
    while start < len(jobs):
        log = open(work / f"child-{start}.log", "wb")
        proc = subprocess.Popen([sys.executable, __file__, "child", str(jobs_path), str(start)], env=env,
                                stdout=subprocess.PIPE, stderr=log, cwd=work)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        current, deadline, buf = None, time.monotonic() + MUTANT_TIMEOUT_S + 60, b""  # + start-up
        while True:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                proc.kill()
                proc.wait()
                results[current or jobs[start]["id"]] = {"outcome": "hang"}
                break
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                rc = proc.wait()
                if current is not None:  # died inside a job
                    results[current] = {"outcome": "crash", "returncode": rc}
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if "begin" in msg:
                    current, deadline = msg["begin"], time.monotonic() + MUTANT_TIMEOUT_S
                else:
                    results[msg["id"]] = msg
                    current = None
        sel.close()
        proc.stdout.close()
        log.close()
        done = [index[i] for i in results]
        start = max(done) + 1 if done else len(jobs)
    return results


def classify(res: dict, ref: dict) -> dict[str, str]:
    """outcome per mode"""
    if "outcome" in res:
        return {m: res["outcome"] for m in ("exact", "sparse")}
    if "load_error" in res:
        return {m: "refused" for m in ("exact", "sparse")}
    out = {}
    for m, r in res["modes"].items():
        if r["error"]:
            out[m] = "decode_error"
        else:
            want = ref["modes"][m]
            out[m] = "WRONG" if r["tokens"] != want["tokens"] else "same" if r["logits"] == want["logits"] else "drift"
    return out


# ---- the file and its mutants ----

@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    from .synth import make_model

    from ripple_gguf.offline.convert import convert
    from ripple_gguf.offline.pipeline import OfflineConfig

    d = tmp_path_factory.mktemp("fuzz")
    src = make_model(d / "src.gguf", ffn_type="Q8_0", n_embd=64, n_ff=128, n_layers=2)
    dst = d / "m.ripple.gguf"
    cfg = OfflineConfig(calib_tokens=512, chunk_tokens=128, threshold_tokens=256, eval_tokens=256,
                        predictor_rank=8, threads=1, quiet=True)
    convert(src, dst, offline=cfg, quiet=True)
    return dst


class Mutator:
    """Mutants of one file: (name, where, bytes of the mutated file)."""

    def __init__(self, path: Path, seed: int):
        from ripple_gguf.format.reader import RippleFile, read_gguf_header

        self.path = path
        self.data = path.read_bytes()
        self.rf = RippleFile.open(path)
        self.hdr = read_gguf_header(path)
        self.rng = random.Random(seed)
        self.out: list[tuple[str, str, bytes]] = []

    def add(self, name: str, where: str, data: bytes) -> None:
        self.out.append((name, where, data))

    def flip(self, name: str, where: str, off: int, n: int = 1) -> None:
        b = bytearray(self.data)
        n = min(n, len(b) - off)
        for i in range(n):
            b[off + i] ^= self.rng.randrange(1, 256)
        self.add(f"{name}@{off}", where, bytes(b))

    def put(self, name: str, where: str, off: int, raw: bytes) -> None:
        b = bytearray(self.data)
        b[off:off + len(raw)] = raw
        self.add(f"{name}@{off}", where, bytes(b))

    def truncate(self, name: str, size: int) -> None:
        self.add(f"truncate {name} ({size})", "truncation", self.data[:size])

    def span(self) -> int:
        """bytes damaged in a data part: one, or a run"""
        return self.rng.choice((1, 8))

    def somewhere(self, start: int, size: int) -> int:
        return start + self.rng.randrange(size)

    # -- header --
    def kv_mutants(self) -> None:
        from gguf.constants import GGUFValueType as V

        same_size = {V.UINT32: V.INT32, V.INT32: V.FLOAT32, V.FLOAT32: V.UINT32, V.UINT64: V.INT64,
                     V.INT64: V.FLOAT64, V.FLOAT64: V.UINT64, V.STRING: V.UINT64, V.UINT8: V.BOOL}
        for key, v in self.hdr.kv.items():
            ripple = key.startswith("ripple.")
            if not ripple and self.rng.random() > 0.15:  # a sample of the source's keys
                continue
            where = "ripple.* metadata" if ripple else "GGUF header"
            s, e = v.span
            klen = struct.unpack_from("<Q", self.data, s)[0]
            tpos = s + 8 + klen  # the value type
            # rename: one character of the name
            self.flip(f"rename {key}", where, s + 8 + self.rng.randrange(len("ripple."), klen) if ripple
                      else s + 8 + self.rng.randrange(klen))
            # type change: a type of the same size (array: of the elements)
            if v.type == V.ARRAY:
                sub = struct.unpack_from("<I", self.data, tpos + 4)[0]
                self.put(f"type {key}[]", where, tpos + 4, struct.pack("<I", same_size.get(sub, V.UINT8)))
                head = tpos + 4 + 4 + 8
            else:
                self.put(f"type {key}", where, tpos, struct.pack("<I", same_size.get(v.type, V.UINT32)))
                head = tpos + 4 + (8 if v.type == V.STRING else 0)
            # value: a byte of the value (an element of an array, a character of a string)
            if e > head:
                self.flip(f"value {key}", where, self.somewhere(head, e - head))
        sp = self.hdr.kv["ripple.sparsity.threshold"]
        self.put("threshold x2", "ripple.* metadata", sp.span[1] - 4,
                 struct.pack("<f", 2 * struct.unpack_from("<f", self.data, sp.span[1] - 4)[0]))
        # the file header and tensor infos
        self.flip("GGUF magic", "GGUF header", 0)
        self.put("GGUF version", "GGUF header", 4, struct.pack("<I", 2))
        self.put("n_tensors", "GGUF header", 8, struct.pack("<Q", len(self.hdr.tensors) - 1))
        self.put("n_kv", "GGUF header", 16, struct.pack("<Q", len(self.hdr.kv) + 1))
        infos = self.hdr.header_end - self._infos_start()
        for _ in range(8):
            self.flip("tensor infos", "GGUF header", self.somewhere(self._infos_start(), infos))

    def _infos_start(self) -> int:
        return max(v.span[1] for v in self.hdr.kv.values())

    # -- region --
    def region_mutants(self) -> None:
        rf = self.rf
        r0 = rf.region_offset
        for off, what in ((0, "magic"), (8, "version"), (12, "n_layers"), (16, "size"), (24, "id"), (40, "id")):
            self.flip(f"region header {what}", "region header/footer", r0 + off)
        self.flip("region header padding", "region header/footer", self.somewhere(r0 + 56, 4096 - 56))
        end = rf.file_size - 64
        for off in (0, 8, 16, 56):
            self.flip("footer", "region header/footer", end + off)
        self.flip("padding before footer", "region header/footer", end - 1)
        for _ in range(6):
            self.flip("checksum table", "checksum table", self.somewhere(rf.checksum_offset, rf.checksum_size))
        for _ in range(40):
            self.flip("region", "region (anywhere)", self.somewhere(r0, rf.region_size), self.span())
        for l in rf.layers:
            sampled = sorted({0, l.n_ff // 2, l.n_ff - 1})
            unsampled = [p for p in range(l.n_ff) if p not in sampled]
            parts = (("gate", 0, l.gate_row_size), ("up", l.gate_row_size, l.up_row_size),
                     ("down", l.gate_row_size + l.up_row_size, l.down_row_size))
            for kind, positions, k in (("sampled", sampled, 3), ("unsampled", unsampled, 4)):
                for part, po, ps in parts:
                    for p in self.rng.sample(positions, k):
                        self.flip(f"layer {l.block} {kind} bundle {p} {part}", f"{kind} bundles",
                                  l.bundles_offset + p * l.bundle_size + self.somewhere(po, ps), self.span())
            tail = l.bundles_offset + l.block_bytes
            if tail % 4096:
                self.flip(f"layer {l.block} block padding", "region padding", tail)
            for _ in range(3):
                self.flip(f"layer {l.block} scale table", "scale tables",
                          self.somewhere(l.down_table_offset, l.down_table_size), self.span())
            po, ps = l.predictor_offset, l.predictor_size
            for off, what in ((4, "version"), (8, "n_embd"), (16, "rank"), (20, "threshold"), (24, "size")):
                self.flip(f"layer {l.block} predictor {what}", "predictors", po + off)
            for _ in range(4):
                self.flip(f"layer {l.block} predictor weights", "predictors", self.somewhere(po + 64, ps - 64),
                          self.span())

    def tensor_mutants(self) -> None:
        for l in self.rf.layers:
            for kind, off, n in zip(("gate", "up", "down"), (l.gate_offset, l.up_offset, l.down_offset),
                                    l.tensor_bytes):
                for _ in range(2):
                    self.flip(f"blk.{l.block}.ffn_{kind}", "standard FFN tensors", self.somewhere(off, n), self.span())

    def truncations(self) -> None:
        rf = self.rf
        for name, size in (("in the GGUF header", self.hdr.header_end // 2), ("in the tensor data", rf.region_offset - 100),
                           ("at the region", rf.region_offset), ("in layer 0", rf.layers[0].bundles_offset + 1000),
                           ("in the checksum table", rf.checksum_offset + 8), ("by one byte", rf.file_size - 1)):
            self.truncate(name, size)


def make_mutants(path: Path, seed: int) -> list[tuple[str, str, bytes]]:
    m = Mutator(path, seed)
    m.kv_mutants()
    m.region_mutants()
    m.tensor_mutants()
    m.truncations()
    return m.out


def test_fuzz_campaign(profiled, tmp_path):
    mutants = make_mutants(profiled, SEED)
    jobs = [{"id": "original", "path": os.fspath(profiled), "where": "-", "name": "unmutated"}]
    for i, (name, where, data) in enumerate(mutants):
        p = tmp_path / f"m{i:04d}.gguf"
        p.write_bytes(data)
        jobs.append({"id": f"m{i:04d}", "path": os.fspath(p), "where": where, "name": name})
    t0 = time.monotonic()
    results = run_jobs(jobs, tmp_path)
    ref = results["original"]
    assert "modes" in ref and all(not r["error"] and len(r["tokens"]) == N_GEN for r in ref["modes"].values()), ref

    counts: dict[str, Counter] = {}
    bad, unnamed, unclear = [], [], []
    for j in jobs[1:]:
        res = results.get(j["id"], {"outcome": "crash"})
        for mode, outcome in classify(res, ref).items():
            counts.setdefault(j["where"], Counter())[outcome] += 1
            if outcome in ("drift", "WRONG", "crash", "hang"):
                bad.append((j["name"], mode, outcome, res))
            if outcome == "decode_error" and j["path"] not in res["modes"][mode]["error"]:
                unnamed.append((j["name"], mode, res["modes"][mode]["error"]))
            if outcome == "refused" and j["path"] not in res["load_error"]:
                unclear.append(j["name"])
    print(f"\nfuzz: {len(mutants)} mutants (seed {SEED}), exact and sparse mode each, "
          f"{time.monotonic() - t0:.0f} s")
    print(f"{'where':<24}" + "".join(f"{o:>13}" for o in OUTCOMES))
    for where, c in counts.items():
        print(f"{where:<24}" + "".join(f"{c[o]:>13}" for o in OUTCOMES))
    total = sum(counts.values(), Counter())
    print(f"{'total':<24}" + "".join(f"{total[o]:>13}" for o in OUTCOMES))
    if unclear:
        print(f"refusals whose message does not name the file: {len(unclear)} (e.g. {unclear[:3]})")
    assert not bad, "\n".join(f"{n} [{m}]: {o} {json.dumps(r)[:400]}" for n, m, o, r in bad)
    assert not unnamed, unnamed  # a failed decode names the file (and the offset)


# ---- the checks one by one ----

def _patched(src: Path, dst: Path, off: int, raw: bytes) -> Path:
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(off)
        f.write(raw)
    return dst


def test_changed_threshold_or_renamed_key_is_refused(profiled, tmp_path):
    """The ripple.* metadata is inside the digest that load and verify check."""
    import llama_cpp
    from ripple_gguf.format.layout import RippleFormatError
    from ripple_gguf.format.reader import RippleFile, read_gguf_header

    hdr = read_gguf_header(profiled)
    end = hdr.kv["ripple.sparsity.threshold"].span[1]
    thr = struct.unpack_from("<f", profiled.read_bytes(), end - 4)[0]
    changed = _patched(profiled, tmp_path / "thr.gguf", end - 4, struct.pack("<f", thr * 0.5))
    start = hdr.kv["ripple.predictor.metrics"].span[0]
    renamed = _patched(profiled, tmp_path / "renamed.gguf", start + 8 + len("ripple."), b"q")
    for p in (changed, renamed):
        try:
            rf = RippleFile.open(p)  # the changed value is plausible: it parses
        except RippleFormatError as e:  # the renamed key leaves its group incomplete: refused at open
            assert p is renamed and p.name in str(e) and "ripple.predictor.metrics" in str(e)
        else:
            for check in (rf.check_quick, rf.verify_full):
                with pytest.raises(RippleFormatError, match=f"{p.name}: GGUF header .*ripple.metadata.sha256"):
                    check()
        with pytest.raises(RippleFormatError, match=p.name):
            llama_cpp.Llama(model_path=os.fspath(p), n_ctx=64, verbose=False)


def test_damaged_predictor_or_checksum_table_is_refused_at_load(profiled, tmp_path):
    import llama_cpp
    from ripple_gguf.format.layout import RippleFormatError
    from ripple_gguf.format.reader import RippleFile

    rf = RippleFile.open(profiled)
    l = rf.layers[1]
    # a weight of W2 near the end of the blob: outside anything sampled
    pred = _patched(profiled, tmp_path / "pred.gguf", l.predictor_offset + l.predictor_size - 100, b"\x7f")
    with pytest.raises(RippleFormatError, match="pred.gguf: layer 1: predictor blob does not match its checksum"):
        llama_cpp.Llama(model_path=os.fspath(pred), n_ctx=64, verbose=False)
    table = _patched(profiled, tmp_path / "table.gguf", rf.checksum_offset + 4, b"\0\0")
    with pytest.raises(RippleFormatError, match="table.gguf: checksum table does not match"):
        llama_cpp.Llama(model_path=os.fspath(table), n_ctx=64, verbose=False)


@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_file_overwritten_while_loaded_fails_the_decode(profiled, tmp_path, mode):
    """Bytes that change under a loaded model (in place, same size) fail llama_decode with the file
    and the offset; with the checks off (the diagnostic switch) the same run computes garbage."""
    import llama_cpp
    import ripple_gguf
    from ripple_gguf import binding
    from ripple_gguf.format.reader import RippleFile

    rf = RippleFile.open(profiled)
    p = tmp_path / "live.gguf"
    shutil.copyfile(profiled, p)
    l = rf.layers[0]
    try:
        ripple_gguf.configure(cache_mb=0, mode=mode, prefetch=mode == "sparse")
        llm = llama_cpp.Llama(model_path=os.fspath(p), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
        llm.eval(PROMPT[:4])
        before = np.array(llm.scores[llm.n_tokens - 1])
        ripple_gguf.last_error()
        if mode == "sparse":  # every bundle of layer 0 overwritten (sparse mode reads some of them)
            with open(p, "r+b") as f:
                f.seek(l.bundles_offset)
                f.write(bytes(np.random.default_rng(0).integers(0, 256, l.block_bytes, dtype=np.uint8)))
            llm.reset()
            with pytest.raises(RuntimeError, match="llama_decode returned"):
                llm.eval(PROMPT[:4])
            msg = ripple_gguf.last_error()
            assert str(p) in msg and "checksum mismatch" in msg and "layer 0" in msg and "file offset" in msg, msg
        else:  # exact mode computes on the standard tensors: ffn_down of layer 1 damaged
            with open(p, "r+b") as f:
                f.seek(rf.layers[1].down_offset + 100)
                f.write(b"\x55\xaa")
            llm.reset()
            with pytest.raises(RuntimeError, match="llama_decode returned"):
                llm.eval(PROMPT[:4])
            msg = ripple_gguf.last_error()
            assert str(p) in msg and "blk.1.ffn_down.weight" in msg and "file offset" in msg, msg
        binding.set_verify_reads(False)
        llm.reset()
        llm.eval(PROMPT[:4])  # unchecked: computes from the damaged bytes
        assert not np.array_equal(np.array(llm.scores[llm.n_tokens - 1]), before)
        llm.close()
    finally:
        binding.set_verify_reads(True)
        ripple_gguf.configure(cache_mb=64, mode="sparse", prefetch=False)


def test_file_truncated_while_loaded_fails_the_decode(profiled, tmp_path):
    """Exact mode computes ffn_down on a mapping of the file: a file cut short under a loaded model
    (its bundles all in the neuron cache) fails llama_decode with the file named, not SIGBUS."""
    import llama_cpp
    import ripple_gguf
    from ripple_gguf.format.reader import RippleFile

    rf = RippleFile.open(profiled)
    p = tmp_path / "cut-live.gguf"
    shutil.copyfile(profiled, p)
    try:
        ripple_gguf.configure(cache_mb=64, cache_fraction=None, mode="exact")
        llm = llama_cpp.Llama(model_path=os.fspath(p), n_ctx=64, n_threads=2, verbose=False)
        llm.eval(PROMPT[:4])
        os.truncate(p, rf.layers[1].down_offset + 100)
        llm.reset()
        with pytest.raises(RuntimeError, match="llama_decode returned"):
            llm.eval(PROMPT[:4])
        msg = ripple_gguf.last_error()
        assert str(p) in msg and "truncated" in msg and "blk.1.ffn_down.weight" in msg, msg
        llm.close()
    finally:
        ripple_gguf.configure(cache_mb=64, mode="sparse")


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    _child(sys.argv[2], int(sys.argv[3]))


def test_predictors_and_tables_damaged_after_loading_fail_their_first_use(profiled, tmp_path):
    """Predictors and down scale tables are checked at load and kept in memory only from their
    first use (sparse mode), read again then: bytes changed in between fail that decode, naming
    the file and the part."""
    import llama_cpp
    import ripple_gguf
    from ripple_gguf.format.reader import RippleFile

    rf = RippleFile.open(profiled)
    for part in ("predictor blob", "down scale table"):
        p = tmp_path / f"late-{part.split()[0]}.gguf"
        shutil.copyfile(profiled, p)
        l = rf.layers[1]
        offset = l.predictor_offset + 8 if part == "predictor blob" else l.down_table_offset + 8
        assert offset > 8
        try:
            ripple_gguf.configure(mode="exact", cache_mb=0)
            llm = llama_cpp.Llama(model_path=os.fspath(p), n_ctx=64, n_threads=2, verbose=False)
            llm.eval(PROMPT[:4])  # exact mode: neither is needed
            with open(p, "r+b") as f:
                f.seek(offset)
                f.write(b"\x55\xaa\x55\xaa")
            ripple_gguf.configure(mode="sparse", sparse_down="bundles")  # (the table serves the bundles' columns)
            llm.reset()
            with pytest.raises(RuntimeError, match="llama_decode returned"):
                llm.eval(PROMPT[:4])
            msg = ripple_gguf.last_error()
            assert str(p) in msg and f"layer {l.block}: {part} does not match its checksum" in msg, msg
            llm.close()
        finally:
            ripple_gguf.runtime.backend.reset_settings()
