"""Acceptance on the real model (SmolLM2-135M-Instruct): exact mode against stock llama.cpp.

Stock results come from a fresh interpreter that never imports ripple_gguf; the plugin's from this
process. Both use the same threads and batch settings.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import llama_cpp
import ripple_gguf
from ripple_gguf import quality
from ripple_gguf.convert import convert

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

PROMPT = "The capital of France is"
N_GREEDY = 64
N_EVAL = 257  # 256 predicted tokens

_STOCK = r"""
import sys, json, numpy as np, llama_cpp
path, out, n_greedy = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokens = json.loads(sys.argv[4])
prompt = sys.argv[5]
sys.path.insert(0, sys.argv[6])
from greedy import greedy, logits_of
llm = llama_cpp.Llama(model_path=path, n_ctx=512, logits_all=True, n_threads=2, n_batch=512, verbose=False)
np.savez(out, logits=logits_of(llm, tokens), greedy=np.array(greedy(llm, prompt, n_greedy)))
"""

_GREEDY = r"""
import numpy as np

def logits_of(llm, tokens):
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)

def greedy(llm, prompt, n):
    llm.reset()
    llm.eval(llm.tokenize(prompt.encode(), add_bos=True))
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out
"""


def _helpers_dir(tmp):
    with open(os.path.join(tmp, "greedy.py"), "w") as f:
        f.write(_GREEDY)
    return tmp


def stock_run(path, tokens):
    import json

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "stock.npz")
        r = subprocess.run([sys.executable, "-c", _STOCK, os.fspath(path), out, str(N_GREEDY), json.dumps(tokens),
                            PROMPT, _helpers_dir(d)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        z = np.load(out)
        return z["logits"], z["greedy"].tolist()


def plugin_run(path, tokens):
    sys.path.insert(0, _helpers_dir(tempfile.mkdtemp()))
    from greedy import greedy, logits_of

    llm = llama_cpp.Llama(model_path=os.fspath(path), n_ctx=512, logits_all=True, n_threads=2, n_batch=512,
                          verbose=False)
    try:
        return logits_of(llm, tokens), greedy(llm, PROMPT, N_GREEDY)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def eval_tokens(real_model):
    return quality.tokenize(real_model, quality.heldout_text(), N_EVAL)


def test_f16_exact_mode_matches_stock(real_model, eval_tokens, tmp_path_factory):
    from ripple_gguf.models import make_float_variant

    d = tmp_path_factory.mktemp("f16")
    f16 = make_float_variant(real_model, d / "smol-f16.gguf")
    packed = d / "smol-f16.ripple.gguf"
    convert(f16, packed, quiet=True)
    stock_logits, stock_greedy = stock_run(packed, eval_tokens)
    ripple_gguf.reset_stats()
    got_logits, got_greedy = plugin_run(packed, eval_tokens)
    s = ripple_gguf.stats()
    assert s["ffn_matmuls"] > 0 and s["neurons_computed"] == s["neurons_total"]
    err = np.abs(got_logits - stock_logits).max() / (stock_logits.max() - stock_logits.min())
    print(f"F16: max |logit diff| / logit range = {err:.2e}")
    assert err < 1e-3
    assert got_greedy == stock_greedy


def test_q4_1_exact_mode_quality(real_model, real_ripple, eval_tokens):
    stock_logits, stock_greedy = stock_run(real_model, eval_tokens)  # the source file itself
    ripple_gguf.reset_stats()
    got_logits, _ = plugin_run(real_ripple, eval_tokens)
    assert ripple_gguf.stats()["ffn_matmuls"] > 0
    agree = quality.top1_agreement(got_logits[:-1], stock_logits[:-1])
    ppl_stock = quality.perplexity(stock_logits, eval_tokens)
    ppl_plugin = quality.perplexity(got_logits, eval_tokens)
    print(f"Q4_1: top-1 agreement {agree:.4f}, perplexity stock {ppl_stock:.3f} plugin {ppl_plugin:.3f}")
    assert agree >= 0.99
    assert abs(ppl_plugin / ppl_stock - 1) <= 0.005
