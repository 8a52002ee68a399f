"""``python -m ripple_gguf.server``: llama-cpp-python's OpenAI server, with the plugin serving the FFN."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server]")

START_TIMEOUT = 120.0  # import + model load; a few seconds normally


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: dict | None = None, timeout: float = 60.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _wait_ready(proc: subprocess.Popen, base: str, log) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-4000:]}")
        try:
            _request(base + "/v1/models", timeout=2.0)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(0.25)
    log.seek(0)
    pytest.fail(f"server not ready after {START_TIMEOUT:.0f} s:\n{log.read()[-4000:]}")


@pytest.mark.real_model
def test_completion_served_by_ripple(real_ripple, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "ripple_gguf.server", "--model", str(real_ripple),
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "256", "--verbose", "False"]
    env = dict(os.environ, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    with open(tmp_path / "server.log", "w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_ready(proc, base, log)
            before = _request(base + "/ripple/stats", timeout=10.0)
            assert before["last_load"]["bound_tensors"] == before["last_load"]["expected_tensors"] > 0
            out = _request(base + "/v1/completions",
                           {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0.0})
            text = out["choices"][0]["text"]
            assert text.strip(), out
            after = _request(base + "/ripple/stats", timeout=10.0)
            assert after["stats"]["ffn_matmuls"] > before["stats"]["ffn_matmuls"]
            assert after["stats"]["neurons_computed"] > before["stats"]["neurons_computed"]
        finally:
            proc.kill()
            proc.wait(timeout=30)
