"""Sparse mode: predictor-gated bundles, the activity rule, per-token masks, collapse, counters."""
from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest

import llama_cpp
import ripple_gguf
from ripple_gguf.format import constants as C
from ripple_gguf.format.reader import RippleFile
from ripple_gguf.offline import quality
from ripple_gguf.offline.convert import convert
from ripple_gguf.offline.pipeline import OfflineConfig
from .synth import eval_logits, make_model, reseal

TOKENS = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 200, 3, 17]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    d = tmp_path_factory.mktemp("sparse")
    src = make_model(d / "src.gguf", ffn_type="Q8_0", n_embd=64, n_ff=256, n_layers=2)
    cfg = OfflineConfig(calib_tokens=512, chunk_tokens=128, threshold_tokens=256, eval_tokens=256,
                        predictor_rank=8, active_fraction=0.3, threads=1, quiet=True)
    return convert(src, d / "m.ripple.gguf", offline=cfg, quiet=True)


@pytest.fixture
def settings():
    yield ripple_gguf
    ripple_gguf.runtime.backend.reset_settings()


def logits(path, tokens=TOKENS, n_batch=64):
    return quality.run(path, tokens=tokens, n_ctx=256, n_threads=1, n_batch=n_batch)["logits"]


def select_everything(rf: RippleFile, dst) -> None:
    """A copy of the file whose predictors select every neuron and whose rule drops nothing."""
    shutil.copy(rf.path, dst)
    with open(dst, "r+b") as f:
        for l in rf.layers:
            f.seek(l.predictor_offset + 20)  # f32 threshold of the blob
            f.write(np.float32(-3e38).tobytes())
    r = gguf.GGUFReader(dst, "r+")
    field = r.fields[C.Keys.Sparsity.THRESHOLD]
    for i in field.data:
        field.parts[i][0] = 0.0
    r.data.flush()
    del r, field
    reseal(dst)


@pytest.mark.parametrize("down", ["bundles", "tensor"])
def test_sparse_with_every_neuron_equals_dense(packed, tmp_path, settings, down):
    """Every neuron selected: sparse mode's logits are exact mode's, its down projection from the
    bundles' columns (sparse_down "bundles") or from the standard rows (the default on a mapped
    file) against exact mode from the bundles or from the standard tensors."""
    full = tmp_path / "all.gguf"
    select_everything(packed, full)
    settings.configure(exact_down=down, mode="exact")
    dense = logits(full)
    settings.configure(mode="sparse", sparse_down="bundles" if down == "bundles" else "auto")
    settings.reset_stats()
    sparse = logits(full)
    s = settings.stats()
    assert s["neurons_computed"] == s["neurons_total"]
    # every bundle needed, at each fetch; dense = the standard FFN tensors (what stock reads)
    bundles = sum(l.n_ff * l.bundle_size for l in packed.layers)
    ffn = sum(l.n_ff * (l.gate_row_size + l.up_row_size) + l.n_embd * l.down_src_row_size for l in packed.layers)
    assert s["needed_bytes"] % bundles == 0 and s["needed_bytes"] // bundles == s["dense_bytes"] // ffn > 0
    assert s["dense_bytes"] % ffn == 0
    np.testing.assert_allclose(sparse, dense, rtol=0, atol=1e-5)


@pytest.mark.parametrize("down", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_split_kquant_columns_in_sparse_mode(tmp_path, settings, down):
    """k-quant ffn_down, converted with the defaults: split columns (groups of 32 or 16 neurons,
    2-6 bit integers, activations in Q8_K blocks of 256). verify passes; with every neuron selected
    sparse mode from the bundles' columns gives exact mode's logits from the bundles; with the
    predictors' selections each token's output is independent of the batch and the thread count."""
    src = make_model(tmp_path / "src.gguf", ffn_type={"gate": "Q8_0", "up": "Q8_0", "down": down},
                     n_embd=64, n_ff=256, n_layers=2)
    cfg = OfflineConfig(calib_tokens=512, chunk_tokens=128, threshold_tokens=256, eval_tokens=256,
                        predictor_rank=8, active_fraction=0.3, threads=1, quiet=True)
    rf = convert(src, tmp_path / "m.ripple.gguf", offline=cfg, quiet=True)
    assert all(l.split and l.down_type == getattr(gguf.GGMLQuantizationType, down) for l in rf.layers)
    rf.verify_full()
    full = tmp_path / "all.gguf"
    select_everything(rf, full)
    settings.configure(exact_down="bundles", mode="exact")
    dense = logits(full)
    settings.configure(mode="sparse", sparse_down="bundles")
    settings.reset_stats()
    sparse = logits(full)
    s = settings.stats()
    assert s["neurons_computed"] == s["neurons_total"]
    np.testing.assert_allclose(sparse, dense, rtol=0, atol=1e-5)
    # the predictors' own selections: tokens of a batch select different neurons of a group
    tokens = TOKENS * 2
    ref = eval_logits(rf.path, tokens, 64)
    span = float(ref.max() - ref.min())
    settings.reset_stats()
    for n_batch, n_threads in ((3, 2), (64, 2)):
        got = eval_logits(rf.path, tokens, n_batch, n_threads)
        assert np.abs(got - ref).max() <= 1e-4 * span, (n_batch, n_threads)
    s = settings.stats()
    assert 0 < s["neurons_computed"] < s["neurons_total"]


def test_sparse_mode_reads_and_computes_less(packed, settings):
    settings.configure(mode="exact", cache_mb=0)
    exact = logits(packed.path)
    settings.configure(mode="sparse", cache_mb=0)
    settings.reset_stats()
    llm = llama_cpp.Llama(model_path=packed.path, n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    for t in TOKENS:  # token by token, as generation does
        llm.eval([t])
    got = np.array(llm.scores[: len(TOKENS)], dtype=np.float32)
    llm.close()
    s = settings.stats()
    assert s["tokens"] == len(TOKENS)
    assert 0 < s["neurons_computed"] < s["neurons_total"]
    assert 0 < s["needed_bytes"] < s["dense_bytes"]
    # what was read: the needed bundles, collapsed gaps, and read-ahead the next layer did not need
    assert s["bytes_read"] <= s["needed_bytes"] + s["collapse_extra_bytes"] + s["prefetch_bytes"] - s["prefetch_used_bytes"]
    assert 1 <= s["mean_run_length"] <= s["max_run_length"] <= 256
    assert np.isfinite(got).all()
    # sparsity changes the result a little, not wholesale (random weights: no quality claim)
    assert np.corrcoef(got.ravel(), exact.ravel())[0, 1] > 0.9


def test_batch_and_token_by_token_agree(packed, settings):
    """Prompt batches read the union of the tokens' sets but keep each token's own selection."""
    settings.configure(mode="sparse")
    batch = logits(packed.path, n_batch=64)
    llm = llama_cpp.Llama(model_path=packed.path, n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    for t in TOKENS:
        llm.eval([t])
    single = np.array(llm.scores[: len(TOKENS)], dtype=np.float32)
    llm.close()
    # the per-token selection is a threshold decision: last-bit differences between batched and
    # single-token attention can flip a few neurons, nothing more
    assert np.abs(batch - single).mean() < 0.02
    assert np.corrcoef(batch.ravel(), single.ravel())[0, 1] > 0.995


def test_collapse_merges_reads(packed, settings):
    ops = {}
    for collapse in (False, True):
        settings.configure(mode="sparse", cache_mb=0, collapse=collapse)
        settings.reset_stats()
        logits(packed.path, n_batch=1)
        s = settings.stats()
        ops[collapse] = (s["read_ops"], s["collapse_extra_bytes"], s["needed_bytes"])
    assert ops[True][0] <= ops[False][0] and ops[False][1] == 0
    assert ops[True][2] == ops[False][2]  # the same bundles were needed


@pytest.mark.parametrize("policy", ["lru", "s3fifo", "linking", "pinned"])
def test_cache_policies_serve_hits(packed, settings, policy):
    settings.configure(mode="sparse", cache_mb=1, cache_policy=policy)
    settings.reset_stats()
    logits(packed.path, n_batch=1)
    s = settings.stats()
    assert settings.settings()["cache_policy"] == policy
    assert s["cache_hits"] > 0 and s["cache_bytes"] <= s["cache_capacity"] <= 1 << 20


def test_bad_settings_are_refused(settings):
    with pytest.raises(ValueError, match="mode"):
        settings.configure(mode="fast")
    with pytest.raises(ValueError, match="cache_policy"):
        settings.configure(cache_policy="mru")


def test_trace_replay_reproduces_the_live_reads(packed, settings):
    """A recorded activity trace replayed on the same file performs the same reads as inference."""
    from ripple_gguf.runtime import trace

    settings.configure(mode="sparse", cache_mb=0, collapse=False)
    trace.start()
    settings.reset_stats()
    logits(packed.path, n_batch=4)
    live = settings.stats()
    t = trace.stop()
    assert len(t) == len(packed.layers) * 4 and t.tokens == len(TOKENS)
    assert all(r.n_tokens == 4 and 0 < len(r.neurons) <= packed.layers[r.layer].n_ff for r in t)
    assert all((a.layer, a.n_tokens) == (b.layer, b.n_tokens) and np.array_equal(a.neurons, b.neurons)
               for a, b in zip(trace.Trace.from_array(t.to_array()), t))
    rep = trace.replay(packed.path, t, log=True)
    for key in ("tokens", "needed_bytes", "dense_bytes", "read_ops", "bytes_read", "max_run_length", "stream_reads"):
        assert rep[key] == live[key], key
    assert rep["mean_run_length"] == pytest.approx(live["mean_run_length"])
    assert sum(len(b.lengths) for b in rep["iolog"]) == rep["read_ops"]
    assert sum(int(b.lengths.sum()) for b in rep["iolog"]) == rep["bytes_read"]


def test_prefetch_changes_where_bytes_come_from_not_the_result(packed, settings):
    settings.configure(mode="sparse", cache_mb=0, collapse=False)
    plain = logits(packed.path, n_batch=1)
    settings.configure(prefetch=True)
    settings.reset_stats()
    ahead = logits(packed.path, n_batch=1)
    s = settings.stats()
    assert np.array_equal(plain, ahead)
    assert 0 < s["prefetch_used_bytes"] <= s["prefetch_bytes"] <= s["bytes_read"]
    assert s["prefetch_seconds"] > 0


def test_sparse_output_independent_of_batching_and_threads(packed, settings):
    """A token's selection and its FFN output are functions of its own FFN input: the same logits
    whatever the batch size, the thread count, or whether its prefix came from the KV cache. (Batches
    of one token are compared on the real model, tests/test_real_model.py: on this model stock
    llama.cpp's own single-token matmuls already round differently from its batched ones.)"""
    settings.configure(mode="sparse")
    tokens = TOKENS * 2
    ref = eval_logits(packed.path, tokens, 64)
    span = float(ref.max() - ref.min())
    settings.reset_stats()
    for n_batch, n_threads, split in ((2, 1, None), (3, 2, None), (64, 2, None), (64, 1, 13), (5, 2, 29)):
        got = eval_logits(packed.path, tokens, n_batch, n_threads, split)
        assert np.abs(got - ref).max() <= 1e-4 * span, (n_batch, n_threads, split)
    s = settings.stats()
    assert s["neurons_computed"] < s["neurons_total"]  # sparse mode really selected


@pytest.mark.parametrize("mode", ["exact", "sparse"])
@pytest.mark.parametrize("cache_fraction", [None, 0.4])
def test_overlapped_reads_do_not_change_logits(packed, settings, mode, cache_fraction):
    """Reads issued in pieces, with the bundles already in memory and then each piece computed as it
    lands, give the logits of the reads done first (in batches and token by token)."""
    cache = {"cache_mb": 0} if cache_fraction is None else {"cache_fraction": cache_fraction, "cache_policy": "s3fifo"}
    out = {}
    for overlap in (False, True):
        # (exact mode from the bundles: its default computes on the standard tensors, mapped)
        settings.configure(mode=mode, exact_down="bundles", collapse=False, overlap=overlap, prefetch=False, **cache)
        settings.reset_stats()
        out[overlap] = [eval_logits(packed.path, TOKENS, n_batch, 2) for n_batch in (64, 1)]
        s = settings.stats()
        assert s["bytes_read"] > 0 and s["read_ops"] > 2 * len(packed.layers)  # several requests per layer
        if overlap:
            assert s["io_exposed_seconds"] > 0  # (it may exceed io_seconds: the wake-ups are in it)
            if cache_fraction and mode == "sparse":  # (exact mode's cyclic order defeats a 40% cache)
                assert s["cache_hits"] > 0
        else:
            assert s["io_exposed_seconds"] == pytest.approx(s["io_seconds"])
    for a, b in zip(out[False], out[True]):
        assert np.array_equal(a, b)


def test_pinned_cache_keeps_its_share_under_cyclic_reads(packed, settings):
    """Exact mode from the bundles reads every bundle of every layer per token: LRU evicts each before its next use,
    the pinned set (the converter's most frequently needed bundles) serves its share of them."""
    assert all(l.frequency is not None and l.frequency.shape == (l.n_ff,) for l in packed.layers)
    rates = {}
    for policy in ("lru", "pinned"):
        settings.configure(mode="exact", exact_down="bundles", cache_fraction=0.4, cache_policy=policy)
        llm = llama_cpp.Llama(model_path=str(packed.path), n_ctx=64, n_batch=1, n_threads=2, verbose=False)
        llm.eval(TOKENS[:2])
        settings.reset_stats()
        llm.eval(TOKENS[2:10])
        rates[policy] = settings.stats()["cache_hit_rate"]
        llm.close()
    assert rates["lru"] == 0.0
    assert 0.35 <= rates["pinned"] <= 0.41, rates


def test_sparse_paired_gate_up_equals_each_matmul_alone(packed, settings):
    from ripple_gguf import binding

    settings.configure(mode="sparse")
    try:
        got = {}
        for pair in (1, 0):
            binding.set_pair_matmuls(pair)
            got[pair] = [eval_logits(packed.path, TOKENS, n, 2) for n in (64, 1)]
        for a, b in zip(got[1], got[0]):
            assert np.array_equal(a, b)
    finally:
        binding.set_pair_matmuls(True)
