"""llama.cpp's own llama-server, built from the pinned llama.cpp sources with GGML_BACKEND_DL=ON,
serving a ripple-packed SmolLM2 with the plugin loaded as a ggml backend module (GGML_BACKEND_PATH):
no Python in the serving process. Real binary, real file, real disk, real HTTP.

- exact mode gives the text stock llama-server gives for the source file (greedy, 32 tokens); every
  FFN tensor is the backend's; the load reads at most the non-FFN bytes + 2 MiB;
- sparse mode answers and its counters show sparse reads;
- a truncated file, one modified after conversion and one of another format version are refused
  with the file and the problem in the server's log and a non-zero exit.

The first run builds llama-server (about 7 minutes on 2 cores; the build time is printed).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from ripple_gguf.format.constants import Keys
from ripple_gguf.format.layout import is_ffn_tensor
from ripple_gguf.format.reader import read_gguf_header
from ripple_gguf.runtime import llama_tools, pagecache

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

PROMPT = "The capital of France is"
MiB = 1 << 20


@pytest.fixture(scope="module")
def server_bin(request) -> Path:
    t0 = time.perf_counter()
    r = subprocess.run(["bash", str(llama_tools.BUILD_SCRIPT), str(llama_tools.default_build_dir())],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    built = [line for line in r.stdout.splitlines() if "built in" in line]
    line = f"\nllama-server build: {built[0] if built else r.stdout.strip()} (this step {time.perf_counter() - t0:.0f} s)"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # into CI's log, whatever the capture mode
        print(line, flush=True)
    exe = llama_tools.binary("llama-server")
    assert exe.exists(), r.stdout
    return exe


@pytest.fixture(scope="module")
def profiled_ripple(real_model, tmp_path_factory) -> Path:
    """SmolLM2 converted with profiling (predictors: sparse mode is its default), small settings."""
    from ripple_gguf.offline.convert import convert
    from ripple_gguf.offline.pipeline import OfflineConfig

    cfg = OfflineConfig(calib_tokens=1024, threshold_tokens=512, eval_tokens=256, predictor_rank=16, quiet=True)
    return convert(real_model, tmp_path_factory.mktemp("server") / "smol.ripple.gguf", offline=cfg, quiet=True).path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One llama-server process on 127.0.0.1; ``plugin`` sets GGML_BACKEND_PATH."""

    def __init__(self, exe: Path, model: Path, log: Path, plugin: bool, env: dict | None = None):
        self.port = _free_port()
        self.log = log
        e = llama_tools.environment() if plugin else dict(os.environ)
        if not plugin:
            e.pop("GGML_BACKEND_PATH", None)
        e.update(env or {})
        cmd = [str(exe), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port), "-t", "2", "-c", "512",
               "-np", "1", "--no-warmup"]
        self.f = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=e, stdout=self.f, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> bool:
        """True once /health answers 200; False when the process exited first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"llama-server not ready in {timeout} s:\n{self.text()[-3000:]}")

    def complete(self, prompt: str, n: int = 32) -> str:
        body = json.dumps({"prompt": prompt, "n_predict": n, "temperature": 0, "cache_prompt": False}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())["content"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.f.close()
        return self.proc.returncode

    def text(self) -> str:
        if not self.f.closed:
            self.f.flush()
        return self.log.read_text(errors="replace")


def _non_ffn_bytes(path: Path) -> int:
    return sum(t.nbytes for t in read_gguf_header(path).tensors if not is_ffn_tensor(t.name))


def test_exact_mode_gives_stock_text_and_a_light_load(server_bin, real_model, real_ripple, tmp_path):
    stock = Server(server_bin, real_model, tmp_path / "stock.log", plugin=False)
    try:
        assert stock.wait_ready(), stock.text()[-3000:]
        want = stock.complete(PROMPT)
    finally:
        stock.stop()
    assert want.strip()

    stats = tmp_path / "stats.json"
    pagecache.drop_pages(real_ripple)
    assert pagecache.resident_bytes(real_ripple) == 0, "the file's pages were not evicted: the load is not cold"
    srv = Server(server_bin, real_ripple, tmp_path / "ripple.log", plugin=True,
                 env={"RIPPLE_MODE": "exact", "RIPPLE_STATS_FILE": str(stats)})
    try:
        assert srv.wait_ready(), srv.text()[-3000:]
        got = srv.complete(PROMPT)
    finally:
        rc = srv.stop()
    log = srv.text()
    assert got == want, (got, want)
    assert rc == 0, log[-3000:]
    s = json.loads(stats.read_text())  # written at model free
    assert s["load_ffn_tensors_bound"] == s["load_ffn_tensors_expected"] == 90, s
    assert s["ffn_matmuls"] > 0 and s["fallback_reads"] == 0, s
    assert s["neurons_computed"] == s["neurons_total"] > 0, s  # exact: every neuron
    # the load (the file's checks and llama.cpp's own), as the kernel counted the server's reads;
    # llama-server decodes 2 tokens before it is ready (a memory test): counted apart, not here
    limit = _non_ffn_bytes(real_ripple) + 2 * MiB
    print(f"llama-server load: {s['load_read_bytes'] / MiB:.1f} MiB read in {s['load_seconds']:.2f} s "
          f"(limit {limit / MiB:.1f} MiB)")
    assert 0 <= s["load_read_bytes"] <= limit, \
        f"the load read {s['load_read_bytes'] / MiB:.1f} MiB, limit {limit / MiB:.1f} MiB"


def test_sparse_mode_answers_with_sparse_reads(server_bin, profiled_ripple, tmp_path):
    stats = tmp_path / "stats.json"
    srv = Server(server_bin, profiled_ripple, tmp_path / "sparse.log", plugin=True,
                 env={"RIPPLE_MODE": "sparse", "RIPPLE_CACHE_MB": "0", "RIPPLE_STATS_FILE": str(stats)})
    try:
        assert srv.wait_ready(), srv.text()[-3000:]
        got = srv.complete(PROMPT)
    finally:
        rc = srv.stop()
    assert got.strip() and rc == 0, srv.text()[-3000:]
    s = json.loads(stats.read_text())
    assert s["load_ffn_tensors_bound"] == s["load_ffn_tensors_expected"] == 90, s
    assert 0 < s["neurons_computed"] < s["neurons_total"], s
    assert 0 < s["needed_bytes"] < s["dense_bytes"], s  # the bundles the predictors selected
    assert s["bytes_read"] > 0 and s["read_ops"] > 0 and s["fallback_reads"] == 0, s


def _damaged(src: Path, dst: Path, how: str) -> Path:
    shutil.copyfile(src, dst)
    if how == "truncated":
        os.truncate(dst, os.path.getsize(src) - 3 * MiB)
    else:
        hdr = read_gguf_header(src)
        key = Keys.FORMAT_VERSION if how == "version" else Keys.Sparsity.THRESHOLD
        end = hdr.kv[key].span[1]
        with open(dst, "r+b") as f:
            # format version 2; or the last layer's activity threshold changed to another valid value
            f.seek(end - 4)
            f.write(struct.pack("<I", 2) if how == "version" else struct.pack("<f", 0.123))
    return dst


@pytest.mark.parametrize("how, problem", [
    ("truncated", "file size .* recorded at conversion"),
    ("modified", r"GGUF header \(metadata or tensor infos\) does not match ripple\.metadata\.sha256: modified after conversion"),
    ("version", "ripple format version 2 is not supported"),
])
def test_bad_files_are_refused_by_the_server(server_bin, profiled_ripple, tmp_path, how, problem):
    import re

    bad = _damaged(profiled_ripple, tmp_path / f"{how}.ripple.gguf", how)
    srv = Server(server_bin, bad, tmp_path / f"{how}.log", plugin=True)
    try:
        ready = srv.wait_ready()
    finally:
        rc = srv.stop()
    log = srv.text()
    assert not ready, f"llama-server served a {how} file:\n{log[-3000:]}"
    assert rc is not None and rc > 0, f"exit {rc} (negative: killed by a signal)\n{log[-3000:]}"
    assert re.search(rf"ripple: refusing to load the model: {re.escape(str(bad))}: {problem}", log), log[-3000:]
