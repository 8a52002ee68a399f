"""``ripple-gguf membench``: the scenario users have, a model larger than their memory.

Each system runs in a child process confined by a kernel memory limit (cgroup v2 ``memory.max`` or
v1 ``memory.limit_in_bytes``; the page cache is charged to the cgroup, so file pages beyond the
limit really leave memory and are read again). First stock llama.cpp runs unconfined to measure
its peak memory with the whole model resident (P); then, for each fraction X, stock llama.cpp
(default mmap) and ripple in sparse and exact mode (O_DIRECT reads, the neuron cache sized to what
the limit leaves) run under a limit of X x P. Each evaluates a 128-token prompt, then decodes N
held-out tokens one at a time (the text's own tokens, so perplexity is measured on them).
Reported: decode and prompt tokens/s, MB read from the disk per decoded token (/proc/PID/io),
peak memory of the cgroup, perplexity.

Besides a real model, a random-weight Q4_0 llama with the proportions of a 1B model
(:mod:`ripple_gguf.eval.synthetic`, ``--synthetic 1b``): its FFN is about two thirds of the weights,
where SmolLM2's is under half of its file, so it measures exact mode at a realistic scale. It is
packed without the offline stage (random weights have no co-activation structure to profile), so
it has no predictors: ripple runs exact and ripple-sparse is reported as not applicable.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from ..runtime import pagecache

log = logging.getLogger(__name__)

SYSTEMS = ("llama.cpp", "ripple-sparse", "ripple-exact")
FIGURES = ("decode_tok_s", "prompt_tok_s", "read_mb_per_token", "peak_mb", "ppl")
NOT_APPLICABLE = "not applicable: the file has no predictors (sparse mode would run exact)"
DEFAULT_FRACTIONS = (0.6, 0.75, 0.9)
PROMPT_TOKENS = 128
# The neuron cache gets what the limit leaves: minus ripple's anonymous memory and minus the pages of
# its file that decoding reads in place through llama.cpp's mapping (the non-FFN tensors, except
# those llama.cpp copied into anonymous memory at load), both measured unconfined with the cache
# off in the same run, minus this margin for what the estimate misses (code pages, transient peaks).
CACHE_MARGIN_MB = 16
# the neuron cache's policy in the confined runs (chosen by measurement: docs/BENCHMARKS.md)
DEFAULT_POLICY = "pinned"


class CgroupError(RuntimeError):
    """No memory cgroup can be made on this machine."""


# ---- memory cgroups ----

class MemoryCgroup:
    """A child memory cgroup of this process's own, v2 or v1, removed by :meth:`close`."""

    def __init__(self, limit_bytes: Optional[int]):
        self.v2 = False
        base = self._base()
        self.path = base / f"ripple-membench-{os.getpid()}-{time.monotonic_ns()}"
        try:
            self.path.mkdir()
        except OSError as e:
            raise CgroupError(f"cannot create a memory cgroup under {base}: {e.strerror} (run as root on a "
                              "machine with the memory controller)") from None
        try:
            if limit_bytes is not None:
                self._write("memory.max" if self.v2 else "memory.limit_in_bytes", str(int(limit_bytes)))
                if not self.v2 and (self.path / "memory.memsw.limit_in_bytes").exists():
                    try:  # no swapping around the limit where swap accounting exists
                        self._write("memory.memsw.limit_in_bytes", str(int(limit_bytes)))
                    except OSError:
                        pass
        except OSError as e:
            self.close()
            raise CgroupError(f"cannot set the memory limit of {self.path}: {e.strerror}") from None

    def _base(self) -> Path:
        text = Path("/proc/self/cgroup").read_text()
        for line in text.splitlines():
            _, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                base = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
                if base.is_dir():
                    return base
        for line in text.splitlines():  # v2: the unified hierarchy, "0::/path"
            if line.startswith("0::"):
                for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                    base = root / line[3:].lstrip("/")
                    if (root / "cgroup.controllers").exists() and "memory" in (root / "cgroup.controllers").read_text():
                        self.v2 = True
                        return base
        raise CgroupError("this machine offers no memory cgroup controller (neither v1 nor v2)")

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def peak_bytes(self) -> int:
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            f = self.path / name
            if f.exists():
                return int(f.read_text().split()[0])
        return 0

    def oom_killed(self) -> bool:
        f = self.path / ("memory.events" if self.v2 else "memory.oom_control")
        if not f.exists():
            return False
        for line in f.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k in ("oom_kill", "oom") and v.strip().isdigit() and int(v) > 0 and (k == "oom_kill" or self.v2):
                return True
        return False

    def close(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


# ---- the child ----

def _child(spec: dict) -> dict:
    """Runs inside the cgroup: load, prompt, decode one token at a time, report."""
    if spec["system"] != "llama.cpp":
        import ripple_gguf

        ripple_gguf.configure(mode=spec["system"].split("-", 1)[1], direct_io=True, cache_mb=spec["cache_mb"],
                              cache_policy=spec.get("cache_policy") or DEFAULT_POLICY)
    import numpy as np
    import llama_cpp

    def read_bytes() -> int:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
        return 0

    toks = spec["tokens"]
    n_prompt = spec["prompt"]
    # only the last token's logits are kept (as a deployment would); perplexity from them, token by token
    llm = llama_cpp.Llama(model_path=spec["path"], n_ctx=n_prompt + len(toks) + 8, n_batch=n_prompt,
                          n_threads=spec["threads"], n_threads_batch=spec["threads"], logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()
    nll = []

    def score(target: int) -> None:
        z = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).astype(np.float64)
        m = z.max()
        nll.append(m + math.log(np.exp(z - m).sum()) - z[target])

    t0 = time.perf_counter()
    llm.eval(toks[:n_prompt])
    t1 = time.perf_counter()
    score(toks[n_prompt])
    file_pages = bool(spec.get("file_pages"))
    if file_pages:
        try:
            Path("/proc/self/clear_refs").write_text("1")  # from here "Referenced" counts decode's accesses
        except OSError:
            file_pages = False
    r0 = read_bytes()
    t_dec = 0.0
    for k in range(n_prompt, len(toks)):
        ts = time.perf_counter()
        llm.eval([toks[k]])
        t_dec += time.perf_counter() - ts
        if k + 1 < len(toks):
            score(toks[k + 1])
    r1 = read_bytes()
    n_dec = len(toks) - n_prompt
    status = Path("/proc/self/status").read_text()
    anon_kb = int(status.split("RssAnon:")[1].split()[0]) if "RssAnon:" in status else 0
    out = {"prompt_tok_s": n_prompt / (t1 - t0), "decode_tok_s": n_dec / t_dec, "anon_mb": anon_kb / 1024,
           "read_mb_per_token": (r1 - r0) / n_dec / 1e6, "ppl": float(math.exp(sum(nll) / len(nll)))}
    if file_pages:
        out["file_mb"] = _referenced_kb(spec["path"]) / 1024
    return out


def _referenced_kb(path: str) -> int:
    """KiB of this process's mappings of ``path`` accessed since the last clear_refs: the model
    file's pages decoding reads in place (mmap). Tensors llama.cpp copied into anonymous memory at
    load (the CPU backend repacks e.g. Q4_0 matrices into its interleaved layout) are not among
    them, nor what ripple reads with O_DIRECT."""
    real, total, current = os.path.realpath(path), 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if not first.endswith(":"):  # a mapping's header: "start-end perms offset dev inode [path]"
                parts = line.split(None, 5)
                current = parts[5].strip() if len(parts) > 5 else None
            elif first == "Referenced:" and current == real:
                total += int(line.split()[1])
    return total


def run_confined(spec: dict, limit_bytes: Optional[int], *, timeout: float = 300) -> dict:
    """One child in its own memory cgroup: the child's report plus the cgroup's peak memory."""
    pagecache.drop_pages(spec["path"])
    cg = MemoryCgroup(limit_bytes)
    try:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "out.json"
            spec_file = Path(d) / "spec.json"
            spec_file.write_text(json.dumps(spec))
            # the child joins the cgroup before it imports or loads anything
            code = (f"import os; open({str(cg.path / 'cgroup.procs')!r}, 'w').write(str(os.getpid()));"
                    f"import json, ripple_gguf.eval.membench as m; "
                    f"r = m._child(json.load(open({str(spec_file)!r})));"
                    f"open({str(out)!r}, 'w').write(json.dumps(r))")
            try:
                p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:  # thrashing at the limit: the child was killed
                return {"error": f"no result within {timeout:.0f} s (thrashing)", "peak_mb": cg.peak_bytes() / 2**20}
            peak = cg.peak_bytes()
            if p.returncode != 0 or not out.exists():
                why = "killed by the kernel's OOM killer" if cg.oom_killed() or p.returncode == -9 else \
                      (p.stderr.strip().splitlines() or ["exit code %d" % p.returncode])[-1]
                return {"error": why, "peak_mb": peak / 2**20}
            r = json.loads(out.read_text())
            r["peak_mb"] = peak / 2**20
            return r
    finally:
        cg.close()


# ---- the benchmark ----

def run(src: Optional[os.PathLike] = None, *, synthetic=None, fractions: Sequence[float] = DEFAULT_FRACTIONS,
        tokens: int = 64, threads: int = 2, work_dir: Optional[os.PathLike] = None, offline=None,
        timeout: float = 300, cache_policies: Sequence[str] = (DEFAULT_POLICY,),
        quiet: bool = False) -> Dict[str, object]:
    """The measurements on ``src`` (a GGUF model), packed with the offline stage (``offline``: its
    OfflineConfig, default settings when None); or, with ``synthetic`` (a name in
    :data:`ripple_gguf.eval.synthetic.SHAPES` such as "1b", or a Shape), on a random-weight model of
    that shape built in the work directory and packed without the offline stage: no predictors,
    so ripple-sparse is reported as not applicable and ripple runs exact. Ripple runs once per
    cache policy."""
    # here, not at the top: the confined children import this module and measure their own memory
    from ..format.layout import is_ffn_tensor
    from ..format.reader import RippleFile, read_gguf_header
    from ..offline.quality import heldout_text, tokenize
    from . import synthetic as synth
    from .machine import machine
    from .variants import default_work_dir, prepare_unprofiled, prepare_variants

    if (src is None) == (synthetic is None):
        raise ValueError("give either a source model or synthetic=, not both")
    if synthetic is not None and offline is not None:
        raise ValueError("a synthetic model is packed without the offline stage: offline= does not apply")
    say = (lambda msg: None) if quiet else (lambda msg: log.info("membench: %s", msg))
    MemoryCgroup(None).close()  # fails early, with the reason, where no memory cgroup can be made
    work = work_dir or default_work_dir()
    if synthetic is not None:
        src = synth.ensure(synthetic, work, quiet=quiet)
        packed = prepare_unprofiled(src, work, quiet=quiet)
    else:
        packed = prepare_variants(src, work, offline, placements=("ripple",), quiet=quiet)["ripple"]
    src = Path(src)

    # sparse mode needs predictors (without them it runs exact: the same figures under another name)
    layers = RippleFile.open(packed).layers
    has_predictors = any(l.predictor_size for l in layers)
    bundles_mb = sum(l.block_bytes for l in layers) / 2**20  # a larger cache would stay unused
    ripple_systems = [s for s in SYSTEMS[1:] if has_predictors or s != "ripple-sparse"]
    toks = tokenize(src, heldout_text(), PROMPT_TOKENS + tokens)
    base = {"tokens": toks, "prompt": PROMPT_TOKENS, "threads": threads}
    say(f"stock llama.cpp unconfined on {src.name}")
    ref = run_confined(dict(base, system="llama.cpp", path=os.fspath(src), file_pages=True), None, timeout=timeout)
    if "error" in ref:
        raise RuntimeError(f"stock llama.cpp failed unconfined: {ref['error']}")
    P = ref["peak_mb"]
    non_ffn_mb = sum(t.nbytes for t in read_gguf_header(packed).tensors if not is_ffn_tensor(t.name)) / 2**20
    say(f"stock peak {P:.1f} MiB; ripple's own footprint with the cache off")
    own = run_confined(dict(base, system=ripple_systems[0], path=os.fspath(packed), cache_mb=0, file_pages=True),
                       None, timeout=timeout)
    if "error" in own:
        raise RuntimeError(f"ripple failed unconfined: {own['error']}")
    own_file_mb = own.get("file_mb", non_ffn_mb)  # without clear_refs: every non-FFN tensor, read in place
    results: List[dict] = [dict(system="llama.cpp", memory_fraction=None, memory_limit_mb=None, cache_mb=None,
                                **{k: ref[k] for k in FIGURES})]
    for x in fractions:
        limit_mb = x * P
        cache_mb = min(bundles_mb, max(0.0, limit_mb - own["anon_mb"] - own_file_mb - CACHE_MARGIN_MB))
        for system, policy in [(s, p) for s in SYSTEMS for p in ((None,) if s == "llama.cpp" else cache_policies)]:
            ripple = system != "llama.cpp"
            if ripple and system not in ripple_systems:
                results.append(dict(system=system, memory_fraction=x, memory_limit_mb=limit_mb, cache_mb=None,
                                    cache_policy=policy, **{k: None for k in FIGURES}, skipped=NOT_APPLICABLE))
                continue
            say(f"X={x:.2f} ({limit_mb:.0f} MiB): {system}" + (f", cache {cache_mb:.0f} MiB {policy}" if ripple else ""))
            spec = dict(base, system=system, path=os.fspath(packed if ripple else src), cache_mb=cache_mb,
                        cache_policy=policy)
            r = run_confined(spec, int(limit_mb * 2**20), timeout=timeout)
            row = {"system": system, "memory_fraction": x, "memory_limit_mb": limit_mb,
                   "cache_mb": cache_mb if ripple else None, "cache_policy": policy}
            for k in FIGURES:
                row[k] = r.get(k)
            if "error" in r:
                row["error"] = r["error"]
            results.append(row)
    return {"machine": machine(), "model": {"source": os.fspath(src), "packed": os.fspath(packed),
                                                  "synthetic": synthetic if synthetic is None or isinstance(synthetic, str)
                                                  else dataclasses.asdict(synthetic),
                                                  "predictors": has_predictors,
                                                  "stock_peak_mb": P, "ripple_own_peak_mb": own["peak_mb"],
                                                  "ripple_own_anon_mb": own["anon_mb"], "ripple_own_file_mb": own_file_mb,
                                                  "stock_anon_mb": ref["anon_mb"], "stock_file_mb": ref.get("file_mb"),
                                                  "non_ffn_mb": non_ffn_mb,
                                                  "prompt_tokens": PROMPT_TOKENS,
                                                  "decode_tokens": tokens, "threads": threads},
            "results": results}


def report(result: Mapping[str, object]) -> str:
    m = result["model"]
    what = Path(m["source"]).name + (" (random weights)" if m.get("synthetic") else "")
    lines = [f"{what}: stock peak {m['stock_peak_mb']:.1f} MiB unconfined (P); ripple with the "
             f"cache off: peak {m['ripple_own_peak_mb']:.1f} MiB, anonymous {m['ripple_own_anon_mb']:.1f} MiB, "
             f"file pages decoding reads in place {m.get('ripple_own_file_mb', 0):.1f} MiB (stock: anonymous "
             f"{m.get('stock_anon_mb', 0):.1f} MiB, in place {m.get('stock_file_mb') or 0:.1f} MiB); "
             f"non-FFN tensors {m['non_ffn_mb']:.1f} MiB; {m['decode_tokens']} tokens decoded after a "
             f"{m['prompt_tokens']}-token prompt, {m['threads']} threads",
             f"{'X':>5} {'limit MiB':>9} {'system':<14} {'cache MiB':>9} {'policy':<8} {'decode tok/s':>12} {'vs stock':>8} "
             f"{'prompt tok/s':>12} {'MB read/tok':>11} {'peak MiB':>8} {'ppl':>8}"]
    stock = {r["memory_fraction"]: r for r in result["results"] if r["system"] == "llama.cpp"}
    fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"
    for r in result["results"]:
        s = stock.get(r["memory_fraction"], {})
        ratio = r["decode_tok_s"] / s["decode_tok_s"] if r.get("decode_tok_s") and s.get("decode_tok_s") else None
        x = "none" if r["memory_fraction"] is None else f"{r['memory_fraction']:.2f}"
        lines.append(f"{x:>5} {fmt(r['memory_limit_mb'], '9.0f'):>9} {r['system']:<14} {fmt(r['cache_mb'], '9.0f'):>9} "
                     f"{r.get('cache_policy') or '-':<8} "
                     f"{fmt(r['decode_tok_s'], '12.1f'):>12} {fmt(ratio, '8.2f'):>8} {fmt(r['prompt_tok_s'], '12.1f'):>12} "
                     f"{fmt(r['read_mb_per_token'], '11.2f'):>11} {fmt(r['peak_mb'], '8.1f'):>8} {fmt(r['ppl'], '8.3f'):>8}"
                     + (f"  ({r['error']})" if r.get("error") else "") + (f"  ({r['skipped']})" if r.get("skipped") else ""))
    return "\n".join(lines)
