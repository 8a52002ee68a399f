"""Logits and greedy tokens from llama.cpp, in-process or as a script in a fresh interpreter.

Run as a script (``python _stock_eval.py ...``) this file imports llama_cpp only, never the
ripple_gguf package (whose import registers the RIPPLE backend): that is how stock llama.cpp's
results are obtained for comparison. Keep it free of ripple_gguf imports.
"""
import json
import sys

import numpy as np


def logits_of(llm, tokens):
    """Logits at every position of ``tokens``, from a fresh context state (logits_all on)."""
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def greedy(llm, prompt_tokens, n):
    """``n`` tokens chosen by argmax after ``prompt_tokens``."""
    llm.reset()
    llm.eval(list(prompt_tokens))
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def main(argv):
    import llama_cpp

    path, out, spec = argv[0], argv[1], json.loads(argv[2])
    llm = llama_cpp.Llama(model_path=path, n_ctx=spec["n_ctx"], logits_all=True, n_threads=spec["n_threads"],
                          n_batch=spec["n_batch"], verbose=False)
    result = {}
    if spec.get("tokens"):
        result["logits"] = logits_of(llm, spec["tokens"])
    if spec.get("n_greedy"):
        result["greedy"] = np.array(greedy(llm, spec["prompt_tokens"], spec["n_greedy"]), dtype=np.int64)
    llm.close()
    np.savez(out, **result)


if __name__ == "__main__":
    main(sys.argv[1:])
