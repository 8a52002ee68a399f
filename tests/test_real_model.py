"""Acceptance on the real model (SmolLM2-135M-Instruct): exact mode against stock llama.cpp.

Stock results come from a fresh interpreter that never imports ripple_gguf (quality.run(stock=True));
the plugin's from this process, with the same threads and batch settings.
"""
from __future__ import annotations

import numpy as np
import pytest

import ripple_gguf
from ripple_gguf.offline import quality
from ripple_gguf.offline.convert import convert

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

PROMPT = "The capital of France is"
N_GREEDY = 64
N_EVAL = 257  # 256 predicted tokens


@pytest.fixture(scope="module")
def eval_tokens(real_model):
    return quality.tokenize(real_model, quality.heldout_text(), N_EVAL)


def test_f16_exact_mode_matches_stock(real_model, eval_tokens, tmp_path_factory):
    from ripple_gguf.eval.models import make_float_variant

    d = tmp_path_factory.mktemp("f16")
    f16 = make_float_variant(real_model, d / "smol-f16.gguf")
    packed = d / "smol-f16.ripple.gguf"
    convert(f16, packed, quiet=True)
    prompt = quality.tokenize(packed, PROMPT)
    stock = quality.run(packed, tokens=eval_tokens, prompt_tokens=prompt, n_greedy=N_GREEDY, stock=True)
    ripple_gguf.reset_stats()
    got = quality.run(packed, tokens=eval_tokens, prompt_tokens=prompt, n_greedy=N_GREEDY)
    s = ripple_gguf.stats()
    assert s["ffn_matmuls"] > 0 and s["neurons_computed"] == s["neurons_total"]
    a, b = got["logits"], stock["logits"]
    err = np.abs(a - b).max() / (b.max() - b.min())
    print(f"F16: max |logit diff| / logit range = {err:.2e}")
    assert err < 1e-3
    assert got["greedy"].tolist() == stock["greedy"].tolist()


def test_q4_1_exact_mode_quality(real_model, real_ripple, eval_tokens):
    stock = quality.run(real_model, tokens=eval_tokens, stock=True)["logits"]  # the source file itself
    ripple_gguf.reset_stats()
    got = quality.run(real_ripple, tokens=eval_tokens)["logits"]
    assert ripple_gguf.stats()["ffn_matmuls"] > 0
    agree = quality.top1_agreement(got[:-1], stock[:-1])
    ppl_stock = quality.perplexity(stock, eval_tokens)
    ppl_plugin = quality.perplexity(got, eval_tokens)
    print(f"Q4_1: top-1 agreement {agree:.4f}, perplexity stock {ppl_stock:.3f} plugin {ppl_plugin:.3f}")
    assert agree >= 0.99
    assert abs(ppl_plugin / ppl_stock - 1) <= 0.005


def test_packed_file_without_plugin_generates_like_source(real_model, real_ripple):
    prompt = quality.tokenize(real_model, PROMPT)
    src = quality.run(real_model, prompt_tokens=prompt, n_greedy=N_GREEDY, stock=True)
    packed = quality.run(real_ripple, prompt_tokens=prompt, n_greedy=N_GREEDY, stock=True)
    assert src["greedy"].tolist() == packed["greedy"].tolist()


def test_sparse_mode_independent_of_batching(real_model, tmp_path_factory):
    """Sparse mode on the real model: the prompt evaluated in one batch, token by token, and with its
    prefix from the KV cache gives the same logits (flash attention makes stock llama.cpp's own
    attention independent of the batch on this model)."""
    from ripple_gguf.offline.pipeline import OfflineConfig

    from .synth import eval_logits

    d = tmp_path_factory.mktemp("batching")
    cfg = OfflineConfig(calib_tokens=1024, threshold_tokens=512, eval_tokens=256, predictor_rank=16, quiet=True)
    packed = convert(real_model, d / "smol.ripple.gguf", offline=cfg, quiet=True).path
    tokens = quality.tokenize(real_model, quality.heldout_text(), 40)
    before = ripple_gguf.settings()["mode"]
    ripple_gguf.configure(mode="sparse")
    try:
        ref = eval_logits(packed, tokens, 512, n_threads=2)
        span = float(ref.max() - ref.min())
        ripple_gguf.reset_stats()
        for n_batch, split in ((1, None), (512, 17), (7, 39)):
            got = eval_logits(packed, tokens, n_batch, n_threads=2, split=split)
            err = np.abs(got - ref).max() / span
            print(f"sparse n_batch {n_batch} split {split}: max |logit diff| / range = {err:.2e}")
            assert err <= 1e-4, (n_batch, split)
        s = ripple_gguf.stats()
        assert s["neurons_computed"] < s["neurons_total"]
    finally:
        ripple_gguf.configure(mode=before)
