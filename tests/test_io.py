"""The flash store without llama.cpp: run formation, access collapse, the union-or-stream choice,
O_DIRECT reads, cache budgets, through the standalone store that trace replay uses."""
from __future__ import annotations

import numpy as np
import pytest

import ripple_gguf
from ripple_gguf.offline import quality
from ripple_gguf.offline.convert import convert
from ripple_gguf.runtime import storage
from ripple_gguf.runtime.trace import Record, Trace, replay
from .synth import make_model, stock_logits

TOKENS = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 200, 3, 17]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """2 layers of 256 Q8_0 bundles (200 bytes each: split down columns) in the original order (position = neuron)."""
    d = tmp_path_factory.mktemp("io")
    src = make_model(d / "src.gguf", ffn_type="Q8_0", n_embd=64, n_ff=256, n_layers=2)
    return convert(src, d / "m.ripple.gguf", quiet=True)


@pytest.fixture
def cfg():
    yield ripple_gguf
    ripple_gguf.runtime.backend.reset_settings()


def fetch(rf, *batches, n_tokens=1):
    """Replay one record per neuron list on layer 0 (each a token batch of n_tokens)."""
    return replay(rf.path, Trace(Record(0, 0, n_tokens, np.array(b, np.int32)) for b in batches), log=True)


def test_runs_and_collapse_on_crafted_positions(packed, cfg):
    bs = packed.layers[0].bundle_size
    cfg.configure(cache_mb=0, collapse=False)
    s = fetch(packed, [0, 1, 2, 5, 9])
    assert (s["read_ops"], s["bytes_read"], s["max_run_length"]) == (3, 5 * bs, 3)
    assert s["mean_run_length"] == pytest.approx(5 / 3)
    assert [list(b.lengths) for b in s["iolog"]] == [[3 * bs, bs, bs]]
    cfg.configure(collapse=2 * bs)  # gaps of up to 2 bundles merged: 3-4 yes, 6-8 no
    s = fetch(packed, [0, 1, 2, 5, 9])
    assert (s["read_ops"], s["bytes_read"], s["collapse_extra_bytes"]) == (2, 7 * bs, 2 * bs)
    cfg.configure(collapse=3 * bs)
    s = fetch(packed, [0, 1, 2, 5, 9])
    assert (s["read_ops"], s["bytes_read"], s["collapse_extra_bytes"]) == (1, 10 * bs, 5 * bs)
    l = packed.layers[0]
    assert s["needed_bytes"] == 5 * bs
    assert s["dense_bytes"] == 256 * (l.gate_row_size + l.up_row_size) + l.n_embd * l.down_src_row_size


def test_prompt_batches_stream_the_layer_when_cheaper(packed, cfg):
    bs = packed.layers[0].bundle_size
    cfg.configure(cache_mb=0, collapse=False)
    scattered = list(range(0, 256, 2))
    one = fetch(packed, scattered)  # a single token never streams
    assert one["read_ops"] == 128 and one["stream_reads"] == 0
    many = fetch(packed, scattered, n_tokens=8)
    cm = ripple_gguf.settings()["cost_model"]
    model = storage.CostModel.from_dict(cm)
    depth = ripple_gguf.settings()["io_threads"]
    from dataclasses import replace

    m = replace(model, queue_depth=depth)
    assert m.batch_time([256 * bs]) < m.batch_time([bs] * 128)  # the premise of the choice
    assert many["stream_reads"] == 1 and many["read_ops"] == 1 and many["bytes_read"] == 256 * bs
    assert many["needed_bytes"] == 128 * bs
    few = fetch(packed, [3, 4], n_tokens=8)  # two short reads beat streaming 256 bundles
    assert few["stream_reads"] == 0 and few["read_ops"] == 1


def test_direct_io_reads_aligned_blocks(packed, cfg):
    cfg.configure(cache_mb=0, collapse=False, direct_io=True)
    s = fetch(packed, [7], [100, 101])
    assert s["read_ops"] == 2 and s["bytes_read"] % 4096 == 0 and s["bytes_read"] >= 4096
    assert [list(b.lengths) for b in s["iolog"]] == [[200], [400]]


@pytest.mark.parametrize("engine", ["uring", "threads"])
def test_direct_io_inference_matches_stock(tmp_path, cfg, engine):
    src = make_model(tmp_path / "src.gguf", ffn_type="Q4_0", n_embd=64, n_ff=192, n_layers=2)
    rf = convert(src, tmp_path / "m.ripple.gguf", quiet=True)
    run = lambda: quality.run(rf.path, tokens=TOKENS, n_ctx=256, n_threads=1, n_batch=64)["logits"]
    # bundles (gate, up and down columns) through buffered reads on threads, then O_DIRECT on the engine
    cfg.configure(cache_mb=0, exact_down="bundles", io_engine="threads", direct_io=False)
    ref = run()
    cfg.configure(direct_io=True, io_threads=4, io_engine=engine)
    ripple_gguf.reset_stats()
    assert np.array_equal(run(), ref)
    assert ripple_gguf.stats()["read_ops"] > 0
    cfg.configure(exact_down="tensor")  # and exact mode's stock arithmetic
    got = run()
    (stock,) = stock_logits([rf.path], TOKENS)
    assert np.abs(got - stock).max() / (stock.max() - stock.min()) < 2e-3


def test_engines_perform_the_same_reads(packed, cfg):
    """io_uring and the reader threads: same requests, same bytes (buffered and O_DIRECT), many
    requests in flight, requests larger than one O_DIRECT bounce slot."""
    rng = np.random.default_rng(0)
    batches = [np.sort(rng.choice(256, size=k, replace=False)) for k in (1, 2, 17, 100, 256)]
    for direct in (False, True):
        out = {}
        for engine in ("uring", "threads", "auto"):
            cfg.configure(cache_mb=0, collapse=False, direct_io=direct, io_engine=engine, io_threads=8)
            s = fetch(packed, *batches)
            out[engine] = (s["read_ops"], s["bytes_read"], s["needed_bytes"])
        assert out["uring"] == out["threads"] == out["auto"], (direct, out)
    settings = cfg.configure(io_engine="uring")
    assert settings["io_engine"] in ("uring", "threads")
    assert cfg.configure(io_engine="auto")["io_engine"] in ("auto", "threads")
    if settings["io_engine"] == "threads":
        assert settings["io_engine_note"]  # io_uring refused: the reason is reported


def test_cache_fraction_budget_and_hits(packed, cfg):
    ffn = sum(l.n_ff * l.bundle_size for l in packed.layers)
    cfg.configure(cache_fraction=1.0, cache_policy="lru", collapse=False)
    assert cfg.settings()["cache_fraction"] == 1.0
    s = fetch(packed, list(range(256)), list(range(256)))
    assert s["cache_hits"] == 256 and s["cache_misses"] == 256 and s["read_ops"] == 1
    cfg.configure(cache_fraction=0.25)
    s = fetch(packed, list(range(256)), list(range(256)))
    assert 0 < s["cache_hits"] <= 0.25 * ffn / packed.layers[0].bundle_size + 1
    with pytest.raises(ValueError, match="cache_fraction"):
        cfg.configure(cache_fraction=1.5)
    with pytest.raises(ValueError, match="not both"):
        cfg.configure(cache_fraction=0.5, cache_mb=1)


def test_bad_io_settings_are_refused(cfg):
    with pytest.raises(ValueError, match="io_threads"):
        cfg.configure(io_threads=0)
    with pytest.raises(ValueError, match="collapse"):
        cfg.configure(collapse=-1)


def test_trace_file_round_trip_and_truncation(tmp_path):
    t = Trace([Record(1, 0, 1, np.array([3, 1, 2], np.int32)), Record(1, 1, 1, np.array([], np.int32))])
    t.save(tmp_path / "t.npy")
    back = Trace.load(tmp_path / "t.npy")
    assert [(r.layer, list(r.neurons)) for r in back] == [(0, [3, 1, 2]), (1, [])]
    assert back.tokens == 1
    with pytest.raises(ValueError, match="truncated"):
        Trace.from_array(t.to_array()[:-1][:5])


def test_replay_refuses_a_trace_of_another_model(packed):
    with pytest.raises(ValueError, match="layer 5"):
        replay(packed.path, Trace([Record(1, 5, 1, np.array([0], np.int32))]))
    with pytest.raises(OSError, match="out of range"):
        replay(packed.path, Trace([Record(1, 0, 1, np.array([256], np.int32))]))
