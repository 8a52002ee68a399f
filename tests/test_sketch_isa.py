"""The sketch kernel's other instruction sets: the library built for AVX2 (no AVX-512: the
maddubs path of many laptops and older servers) and for the baseline x86-64 (the scalar loops)
gives the same scores as sketch.py's reference, as the native build does (tests/test_sketch.py).
Each variant is a CMake build of this tree into a temporary directory, loaded in a child process
through RIPPLE_LIBRARY."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 builds")]

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from ripple_gguf import binding
    from ripple_gguf.offline import sketch as SK
    out = []
    for n_embd, n_ff, gated, act, k, w in [(576, 256, True, "silu", 12, 0.5), (576, 256, True, "silu", 12, 0.0),
                                            (256, 64, True, "gelu", 8, 0.5), (200, 90, False, "relu", 3, 1.0)]:
        rng = np.random.default_rng(n_embd + n_ff)
        W_up = rng.standard_normal((n_ff, n_embd)).astype(np.float32) * 0.05
        W_gate = rng.standard_normal((n_ff, n_embd)).astype(np.float32) * 0.05 if gated else None
        X = rng.standard_normal((40, n_embd)).astype(np.float32)
        X[:, 3] *= 40
        sk = SK.Sketch.build(W_up, W_gate, (X * X).mean(axis=0), n_out=k, act_name=act)
        sk.fit_variance(X, W_up, W_gate, w).calibrate(X, 0.4)
        ref = sk.scores(X)
        got, sel = binding.sketch_scores(sk.to_bytes(), n_embd, n_ff, X)
        # as tests/test_sketch.py's assert_allclose(rtol=2e-5, atol=1e-6 x the largest score): <= 1 passes
        err = float(np.max(np.abs(got - ref) / (2e-5 * np.abs(ref) + 1e-6 * float(np.abs(ref).max()))))
        agree = float(np.mean(sel == (ref > np.float32(sk.threshold))))
        out.append([err, agree])
    print(json.dumps(out))
""")


def _build(tmp: Path, flags: str) -> Path:
    build = tmp / "cmake"
    cfg = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DRIPPLE_NATIVE=OFF",
           f"-DCMAKE_C_FLAGS={flags}"]
    subprocess.run(cfg, check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "ripple", "-j", str(os.cpu_count() or 1)],
                   check=True, capture_output=True, text=True)
    return build / "libripple.so"


@pytest.mark.parametrize("flags, marker", [("-mavx2 -mfma -mf16c", "vpmaddubsw"), ("", None)],
                         ids=["avx2", "baseline"])
def test_sketch_scores_on_other_instruction_sets(tmp_path, flags, marker):
    lib = _build(tmp_path, flags)
    dis = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True).stdout
    assert "zmm" not in dis  # no AVX-512 anywhere: the variant is what it claims
    if marker:
        assert marker in dis
    env = dict(os.environ, RIPPLE_LIBRARY=str(lib))
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for err, agree in json.loads(r.stdout.strip().splitlines()[-1]):
        assert err <= 1 and agree > 0.999, (err, agree)
