"""Tiny synthetic GGUF models that stock llama.cpp loads: fixtures for fast offline tests.

Weights are random (no structure); the vocabulary is the minimal "llama" tokenizer of <unk>, <s>,
</s> and the 256 byte tokens. Besides llama and gpt2, the dense-FFN architectures gemma2 (gated GELU,
post-attention and post-FFN norms, tied output), qwen2 (attention biases) and phi3 (one fused
``ffn_up`` of 2 x n_ff rows holding gate and up, no ``ffn_gate``) are built with the tensors and keys
llama.cpp 0.3.36 requires (vendor/llama.cpp/src/models/*.cpp) and realistic activation scales: the
``ffn_norm`` weights hold a few "massive" features (2000) and a few near zero (1e-7), as trained
models do, so the FFN inputs span ten orders of magnitude and some post-activations exceed the
float16 range (65504). FFN tensors can be any ggml type: gguf-py quantizes the types it
can, ggml's own quantizer (through the converter's row backend) does the K-quants and the rest.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence, Union

import gguf
import gguf.quants
import numpy as np
from gguf.constants import GGMLQuantizationType as T

TypeSpec = Union[int, str, None]
# planted outsized neurons: |h| where one fires / an ordinary neuron's, and a factor on its down column.
# Their |h| reaches 1e8: with a quantized ffn_down, ggml's Q8_0 copy of h overflows its f16 block
# scale (NaN) beyond 127 x 65504, so such models want an F32 (or F16-free) ffn_down.
OUTSIZED_GAIN, OUTSIZED_DOWN = 400.0, 1.0
_GGUFPY_QUANT = {T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}


def _qtype(spec: TypeSpec) -> T:
    if spec is None:
        return T.F32
    if isinstance(spec, str):
        return T[spec.upper()]
    return T(spec)


def encode(values: np.ndarray, qtype: T) -> tuple[np.ndarray, T | None]:
    """(array for GGUFWriter.add_tensor, raw_dtype) of float32 ``values`` stored as ``qtype``."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == T.F32:
        return values, None
    if qtype in _GGUFPY_QUANT:
        return gguf.quants.quantize(values, qtype), qtype
    from ripple_gguf import binding  # ggml's quantizer (K-quants, IQ4_NL, ...)
    q = binding.quantize(int(qtype), values.reshape(-1, values.shape[-1]))
    return q.reshape(*values.shape[:-1], -1), qtype


def tokenizer_vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    scores = [0.0] * len(tokens)
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
            [gguf.TokenType.BYTE] * 256
    return tokens, scores, [int(t) for t in types]


def make_model(path: os.PathLike | str, *, n_layers: int = 2, n_embd: int = 64, n_ff: int = 128,
               n_head: int = 4, ffn_type: TypeSpec | Mapping[str, TypeSpec] = None, gated: bool = True,
               arch: str | None = None, seed: int = 0, n_ctx: int = 256,
               edit: Callable[[dict], None] | None = None,
               outsized: Mapping[int, Sequence[int]] | None = None, outsized_gain: float = OUTSIZED_GAIN,
               outsized_down: float = OUTSIZED_DOWN) -> str:
    """Write a model to ``path``; return the path.

    ``ffn_type``: one type for the FFN weights or a mapping {"gate"/"up"/"down": type}.
    ``arch`` defaults to "llama" when gated and "gpt2" (an ungated FFN) otherwise; "gemma2", "qwen2"
    and "phi3" as the module docstring says (``gated`` is ignored for them).
    ``edit(tensors)`` may change {name: (float32 values or (raw, raw_dtype))} before writing, to make
    broken models for tests.
    ``outsized`` {block: neurons} plants outsized neurons (gemma2 and qwen2): their gate and up rows
    are scaled by sqrt(``outsized_gain``) before quantization, so where such a neuron fires its |h| is
    about ``outsized_gain`` x an ordinary neuron's (the SiLU/GELU of a scaled gate is about linear on
    the positive side and near 0 on the other), as in trained models where a few neurons of a layer
    reach 100-1500x the layer's median |h|; their down columns are scaled by ``outsized_down``.
    """
    path = os.fspath(path)
    arch = arch or ("llama" if gated else "gpt2")
    if arch == "llama" and not gated:
        raise ValueError("llama has a gated FFN; use arch='gpt2' for an ungated one")
    if arch not in ("llama", "gpt2") + NEW_ARCHS:
        raise ValueError(f"arch {arch!r}: choose from llama, gpt2, {', '.join(NEW_ARCHS)}")
    if outsized and arch not in ("gemma2", "qwen2"):
        raise ValueError(f"outsized neurons are planted in gemma2 and qwen2 models, not {arch}")
    if arch in NEW_ARCHS:
        return _make_new_arch(path, arch, n_layers=n_layers, n_embd=n_embd, n_ff=n_ff, n_head=n_head,
                              kinds=ffn_type if isinstance(ffn_type, Mapping) else
                              {k: ffn_type for k in ("gate", "up", "down")}, seed=seed, n_ctx=n_ctx, edit=edit,
                              outsized=outsized or {}, outsized_gain=outsized_gain,
                              outsized_down=outsized_down)
    rng = np.random.default_rng(seed)
    n_vocab = len(tokenizer_vocab()[0])
    kinds = ffn_type if isinstance(ffn_type, Mapping) else {k: ffn_type for k in ("gate", "up", "down")}

    def w(*shape: int, scale: float | None = None) -> np.ndarray:
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    ones = lambda n: np.ones(n, dtype=np.float32)
    zeros = lambda n: np.zeros(n, dtype=np.float32)
    t: dict[str, object] = {"token_embd.weight": w(n_vocab, n_embd, scale=1.0)}
    if arch == "gpt2":
        t["position_embd.weight"] = w(n_ctx, n_embd, scale=0.1)
    for i in range(n_layers):
        b = f"blk.{i}"
        t[f"{b}.attn_norm.weight"] = ones(n_embd)
        if arch == "gpt2":
            t[f"{b}.attn_norm.bias"] = zeros(n_embd)
            t[f"{b}.attn_qkv.weight"] = w(3 * n_embd, n_embd)
            t[f"{b}.attn_qkv.bias"] = zeros(3 * n_embd)
            t[f"{b}.attn_output.weight"] = w(n_embd, n_embd)
            t[f"{b}.attn_output.bias"] = zeros(n_embd)
        else:
            for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
                t[f"{b}.{name}.weight"] = w(n_embd, n_embd)
        t[f"{b}.ffn_norm.weight"] = ones(n_embd)
        if arch == "gpt2":
            t[f"{b}.ffn_norm.bias"] = zeros(n_embd)
        # numpy shape (rows, cols) = ggml (ne1, ne0): gate/up are n_ff rows of n_embd.
        if gated:
            t[f"{b}.ffn_gate.weight"] = encode(w(n_ff, n_embd), _qtype(kinds.get("gate")))
        t[f"{b}.ffn_up.weight"] = encode(w(n_ff, n_embd), _qtype(kinds.get("up")))
        t[f"{b}.ffn_down.weight"] = encode(w(n_embd, n_ff), _qtype(kinds.get("down")))
        if arch == "gpt2":
            t[f"{b}.ffn_up.bias"] = zeros(n_ff)
            t[f"{b}.ffn_down.bias"] = zeros(n_embd)
    t["output_norm.weight"] = ones(n_embd)
    if arch == "gpt2":
        t["output_norm.bias"] = zeros(n_embd)
    t["output.weight"] = w(n_vocab, n_embd)
    if edit is not None:
        edit(t)

    wr = gguf.GGUFWriter(path, arch)
    wr.add_name(f"synthetic-{arch}")
    wr.add_context_length(n_ctx)
    wr.add_embedding_length(n_embd)
    wr.add_block_count(n_layers)
    wr.add_feed_forward_length(n_ff)
    wr.add_head_count(n_head)
    if arch == "gpt2":
        wr.add_layer_norm_eps(1e-5)
    else:
        wr.add_head_count_kv(n_head)
        wr.add_layer_norm_rms_eps(1e-5)
        wr.add_rope_dimension_count(n_embd // n_head)
    return _finish(wr, t, path)


def _finish(wr: gguf.GGUFWriter, t: Mapping[str, object], path):
    """The minimal tokenizer, the tensors ({name: values or (raw, raw_dtype)}), and the file written."""
    tokens, scores, ttypes = tokenizer_vocab()
    wr.add_file_type(0)
    wr.add_tokenizer_model("llama")
    wr.add_token_list(tokens)
    wr.add_token_scores(scores)
    wr.add_token_types(ttypes)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_unk_token_id(0)
    for name, v in t.items():
        if isinstance(v, tuple):
            wr.add_tensor(name, v[0], raw_dtype=v[1])
        else:
            wr.add_tensor(name, v)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


NEW_ARCHS = ("gemma2", "qwen2", "phi3")
MASSIVE, TINY = 2000.0, 1e-7  # ffn_norm weights of the massive and the near-dead features


def _make_new_arch(path: str, arch: str, *, n_layers: int, n_embd: int, n_ff: int, n_head: int,
                   kinds: Mapping[str, TypeSpec], seed: int, n_ctx: int,
                   edit: Callable[[dict], None] | None, outsized: Mapping[int, Sequence[int]] = {},
                   outsized_gain: float = OUTSIZED_GAIN, outsized_down: float = OUTSIZED_DOWN) -> str:
    rng = np.random.default_rng(seed)
    n_vocab = len(tokenizer_vocab()[0])

    def w(*shape: int, scale: float | None = None) -> np.ndarray:
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    ones = lambda n: np.ones(n, dtype=np.float32)
    ffn_norm = ones(n_embd)
    ffn_norm[:2], ffn_norm[2:6] = MASSIVE, TINY
    # gemma2 multiplies the embeddings by sqrt(n_embd) and ties the output to them
    t: dict[str, object] = {"token_embd.weight": w(n_vocab, n_embd, scale=None if arch == "gemma2" else 1.0)}
    for i in range(n_layers):
        b = f"blk.{i}"
        t[f"{b}.attn_norm.weight"] = ones(n_embd)
        for name in ("attn_q", "attn_k", "attn_v"):
            t[f"{b}.{name}.weight"] = w(n_embd, n_embd)
            if arch == "qwen2":
                t[f"{b}.{name}.bias"] = w(n_embd, scale=0.5)
        t[f"{b}.attn_output.weight"] = w(n_embd, n_embd)
        if arch == "gemma2":
            t[f"{b}.post_attention_norm.weight"] = ones(n_embd)
        t[f"{b}.ffn_norm.weight"] = ffn_norm.copy()
        planted = np.asarray(outsized.get(i, ()), dtype=np.int64)
        if arch == "phi3":  # gate rows first, then up rows (llama.cpp's swiglu splits the output in halves)
            t[f"{b}.ffn_up.weight"] = encode(w(2 * n_ff, n_embd), _qtype(kinds.get("up")))
        else:
            gate, up = w(n_ff, n_embd), w(n_ff, n_embd)
            gate[planted] *= np.float32(np.sqrt(outsized_gain))
            up[planted] *= np.float32(np.sqrt(outsized_gain))
            t[f"{b}.ffn_gate.weight"] = encode(gate, _qtype(kinds.get("gate")))
            t[f"{b}.ffn_up.weight"] = encode(up, _qtype(kinds.get("up")))
        down = w(n_embd, n_ff)
        down[:, planted] *= np.float32(outsized_down)
        t[f"{b}.ffn_down.weight"] = encode(down, _qtype(kinds.get("down")))
        if arch == "gemma2":
            t[f"{b}.post_ffw_norm.weight"] = ones(n_embd)
    t["output_norm.weight"] = ones(n_embd)
    if arch != "gemma2":  # gemma2 ties the output to token_embd
        t["output.weight"] = w(n_vocab, n_embd)
    if edit is not None:
        edit(t)

    wr = gguf.GGUFWriter(path, arch)
    # a name containing "phi3" makes llama.cpp expect phi-3's <|endoftext|> token in the vocabulary
    wr.add_name("synthetic-fused-up" if arch == "phi3" else f"synthetic-{arch}")
    wr.add_context_length(n_ctx)
    wr.add_embedding_length(n_embd)
    wr.add_block_count(n_layers)
    wr.add_feed_forward_length(n_ff)
    wr.add_head_count(n_head)
    wr.add_head_count_kv(n_head)
    wr.add_layer_norm_rms_eps(1e-6)
    wr.add_rope_dimension_count(n_embd // n_head)
    if arch == "gemma2":
        wr.add_key_length(n_embd // n_head)
        wr.add_value_length(n_embd // n_head)
        wr.add_sliding_window(n_ctx)
    return _finish(wr, t, path)


def small_offline(**kw):
    """An OfflineConfig small enough for the tiny synthetic models (seconds, one thread)."""
    from ripple_gguf.offline.pipeline import OfflineConfig

    base = dict(calib_tokens=512, chunk_tokens=128, threshold_tokens=256, eval_tokens=256, predictor_rank=8,
                threads=1, quiet=True)
    base.update(kw)
    return OfflineConfig(**base)


def stock_logits(paths: list, tokens: list[int]) -> list[np.ndarray]:
    """Logits of every position for ``tokens`` from *stock* llama.cpp, one array per model: a fresh
    interpreter that never imports ripple_gguf, n_threads=1 so results are deterministic."""
    from ripple_gguf.offline import quality

    return [quality.run(p, tokens=tokens, stock=True, n_ctx=256, n_threads=1, n_batch=64)["logits"] for p in paths]


def eval_logits(path, tokens, n_batch, n_threads=1, split=None):
    """Logits of every position of tokens, evaluated in batches of n_batch; with split, the first
    `split` tokens are evaluated first and the rest after (a prompt whose prefix is in the KV cache).
    Flash attention makes stock llama.cpp's own attention independent of the batch size."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=n_batch, n_ubatch=n_batch, logits_all=True,
                          n_threads=n_threads, flash_attn=True, verbose=False)
    try:
        if split:
            llm.eval(tokens[:split])
        llm.eval(tokens[split or 0:] if split else tokens)
        return np.array(llm.scores[:len(tokens)])
    finally:
        llm.close()


def reseal(path: os.PathLike | str) -> None:
    """After a test's deliberate edit of a ripple-packed file: the checksum table, the region
    sha256 and the header digest recomputed for the bytes it now holds (what the converter writes)."""
    import hashlib

    from ripple_gguf.binding import crc32c, crc32c_blocks
    from ripple_gguf.format.constants import Keys
    from ripple_gguf.format.layout import metadata_sha256
    from ripple_gguf.format.reader import RippleFile

    rf = RippleFile.open(path)
    data = bytearray(open(path, "rb").read())
    arr = np.frombuffer(data, dtype=np.uint8)
    crc = lambda off, n: crc32c(arr[off:off + n]) if n else 0
    parts = []
    for l in rf.layers:
        parts.append(crc32c_blocks(arr[l.bundles_offset:l.bundles_offset + l.block_bytes], l.bundle_size))
        parts += [crc32c_blocks(arr[o:o + n], rf.checksum_block)
                  for o, n in zip((l.gate_offset, l.up_offset, l.down_offset), l.tensor_bytes) if n]
        parts.append(np.array([crc(l.down_table_offset, l.down_table_size), crc(l.predictor_offset, l.predictor_size)],
                              dtype=np.uint32))
    table = np.concatenate(parts).astype("<u4").tobytes()
    del arr
    data[rf.checksum_offset:rf.checksum_offset + len(table)] = table

    def put(key: str, digest: str) -> None:
        end = rf.gguf.kv[key].span[1]
        data[end - 64:end] = digest.encode("ascii")

    put(Keys.Checksum.SHA256, hashlib.sha256(table).hexdigest())
    put(Keys.Region.SHA256, hashlib.sha256(data[rf.region_offset:rf.file_size]).hexdigest())
    put(Keys.METADATA_SHA256, metadata_sha256(bytes(data[:rf.gguf.header_end]), rf.gguf.kv[Keys.METADATA_SHA256].span))
    with open(path, "wb") as f:
        f.write(data)
