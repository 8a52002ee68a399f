"""Quality measurements through llama.cpp: logits over a token sequence, perplexity, top-1
agreement, and the held-out evaluation text that ships with every CPython."""
from __future__ import annotations

import os
from typing import List, Sequence

import numpy as np


def heldout_text(n_chars: int = 20000) -> str:
    """English prose from ``pydoc_data.topics`` (shipped with CPython), taken from the end of the
    sorted topic list. Calibration (the offline stage) draws from the start of the list, so the
    two never overlap."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    text, i = [], len(keys) - 1
    while sum(map(len, text)) < n_chars and i >= 0:
        text.append(topics[keys[i]])
        i -= 1
    return "\n".join(reversed(text))[-n_chars:]


def sequence_logits(llm, tokens: Sequence[int]) -> np.ndarray:
    """Logits at every position of ``tokens`` (the context must be fresh and logits_all on)."""
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def perplexity(logits: np.ndarray, tokens: Sequence[int]) -> float:
    """Perplexity of tokens[1:] under logits[:-1]."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    nll = -logp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]
    return float(np.exp(nll.mean()))


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def tokenize(path: os.PathLike, text: str, n_tokens: int) -> List[int]:
    """The first ``n_tokens`` tokens of ``text`` with the model's own tokenizer (BOS first)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=os.fspath(path), vocab_only=True, verbose=False)
    try:
        toks = llm.tokenize(text.encode(), add_bos=True)
    finally:
        llm.close()
    if len(toks) < n_tokens:
        raise ValueError(f"the text has only {len(toks)} tokens, {n_tokens} wanted")
    return toks[:n_tokens]
