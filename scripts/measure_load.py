#!/usr/bin/env python3
"""Cold-load cost of a ripple-packed model: bytes read and memory kept, stock vs RIPPLE.

Acceptance item: a cold load (file pages dropped first) of the ripple SmolLM2 reads at most the
non-FFN bytes + 2 MiB, and resident memory after load stays below non-FFN bytes + cache budget
+ 64 MiB.

Each case runs in a fresh interpreter: imports first, then the file's pages are dropped from the
page cache (posix_fadvise DONTNEED, checked with mincore), then
``llama_cpp.Llama(model_path=..., n_ctx=256, verbose=False)``. Measured around the load only:

- ``file_resident``: bytes of the model file in the page cache after load (mincore), i.e. what the
  load read through the cache, readahead included;
- ``io_read``: the /proc/self/io ``read_bytes`` delta (block I/O this process caused, any file;
  also catches O_DIRECT reads that bypass the cache);
- ``rss_delta``: VmRSS after load minus VmRSS before (after imports); ``peak_delta`` the same for VmHWM.

Bytes read = max(file_resident, io_read). Cases: stock llama.cpp on the source GGUF, stock on the
ripple file (ripple_gguf not imported), ripple with the load hook, ripple with RIPPLE_NO_LOAD_HOOK=1.
PASS/FAIL is judged for the hooked case. The case ``ripple-sparse-run`` goes on to inference
(sparse mode, O_DIRECT, a cache of 10% of the FFN: a 64-token prompt, then 64 generated tokens)
and judges peak resident memory against non-FFN bytes + predictors + cache budget + 64 MiB.

    python scripts/measure_load.py [RIPPLE.gguf] [--source SRC.gguf] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

from ripple_gguf.runtime.pagecache import drop_pages, resident_bytes

MiB = 1 << 20
READ_SLACK = 2 * MiB
RSS_SLACK = 64 * MiB

CASES: Dict[str, dict] = {
    "stock-source": {"file": "source", "ripple": False, "env": {}},
    "stock-ripple": {"file": "ripple", "ripple": False, "env": {}},
    "ripple-hook": {"file": "ripple", "ripple": True, "env": {}},
    "ripple-nohook": {"file": "ripple", "ripple": True, "env": {"RIPPLE_NO_LOAD_HOOK": "1"}},
    # inference, not just the load: sparse mode (the default for files with predictors), O_DIRECT,
    # a cache of 10% of the FFN; a prompt then token-by-token generation
    "ripple-sparse-run": {"file": "ripple", "ripple": True, "run_tokens": 64,
                          "env": {"RIPPLE_MODE": "sparse", "RIPPLE_DIRECT_IO": "1", "RIPPLE_CACHE_FRACTION": "0.1"}},
}


# --- child side: runs in a fresh interpreter ----------------------------------------------------

def _drop_pages(path: str) -> int:
    """Evict ``path`` from the page cache; returns the bytes still resident afterwards."""
    drop_pages(path)
    return resident_bytes(path)


def _proc_kv(name: str) -> Dict[str, int]:
    out = {}
    with open(f"/proc/self/{name}") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _child(case: str, path: str) -> dict:
    import time

    spec = CASES[case]
    ripple_gguf = None
    if spec["ripple"]:
        import ripple_gguf
    import llama_cpp

    not_dropped = _drop_pages(path)
    io0, st0 = _proc_kv("io"), _proc_kv("status")
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, verbose=False)
    load_s = time.perf_counter() - t0
    io1, st1 = _proc_kv("io"), _proc_kv("status")
    resident = resident_bytes(path)
    out = {
        "case": case, "file": path, "file_size": os.path.getsize(path), "load_seconds": load_s,
        "not_dropped": not_dropped, "file_resident": resident,
        "io_read": io1.get("read_bytes", 0) - io0.get("read_bytes", 0),
        "rchar": io1.get("rchar", 0) - io0.get("rchar", 0),
        "rss_before": st0["VmRSS"], "rss_after": st1["VmRSS"], "rss_delta": st1["VmRSS"] - st0["VmRSS"],
        "rss_anon_after": st1.get("RssAnon", 0), "rss_file_after": st1.get("RssFile", 0),
        "peak_delta": st1["VmHWM"] - st0["VmRSS"],
    }
    out["bytes_read"] = max(out["file_resident"], out["io_read"])
    if ripple_gguf is not None:
        out["ripple"] = {"settings": ripple_gguf.settings(), "last_load": ripple_gguf.last_load(),
                         "stats": ripple_gguf.stats()}
    # context only: what the first prompt evaluation adds (pages the load deferred)
    llm.eval(llm.tokenize(b"The capital of France is"))
    io2, st2 = _proc_kv("io"), _proc_kv("status")
    out["eval"] = {"file_resident": resident_bytes(path),
                   "io_read": io2.get("read_bytes", 0) - io0.get("read_bytes", 0),
                   "rss_delta": st2["VmRSS"] - st0["VmRSS"]}
    if ripple_gguf is not None:
        out["eval"]["ripple_bytes_read"] = ripple_gguf.stats()["bytes_read"]
    if spec.get("run_tokens"):
        from ripple_gguf.offline.quality import heldout_text

        prompt = llm.tokenize(heldout_text(4000).encode())[:64]
        llm.reset()
        llm.eval(prompt)
        n = 0
        for _ in llm.generate(prompt, temp=0.0, reset=False):
            n += 1
            if n >= spec["run_tokens"]:
                break
        st3 = _proc_kv("status")
        out["run"] = {"prompt_tokens": len(prompt), "generated": n, "rss_delta": st3["VmRSS"] - st0["VmRSS"],
                      "peak_delta": st3["VmHWM"] - st0["VmRSS"]}
        if ripple_gguf is not None:
            out["run"]["stats"] = ripple_gguf.stats()
            out["run"]["settings"] = ripple_gguf.settings()
    del llm
    return out


# --- parent side ------------------------------------------------------------------------------

def non_ffn_bytes(path: os.PathLike) -> int:
    """Tensor bytes of the GGUF other than blk.N.ffn_{gate,up,down}.weight."""
    from ripple_gguf.format.layout import is_ffn_tensor
    from ripple_gguf.format.reader import read_gguf_header

    return sum(t.nbytes for t in read_gguf_header(path).tensors if not is_ffn_tensor(t.name))


def measure(case: str, path: os.PathLike, timeout: float = 300.0) -> dict:
    """Run one case in a fresh interpreter and return its measurements."""
    if case not in CASES:
        raise ValueError(f"unknown case {case!r} (choose from {', '.join(CASES)})")
    env = dict(os.environ)
    env.pop("RIPPLE_NO_LOAD_HOOK", None)
    env.update(CASES[case]["env"])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, os.fspath(path)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def limits(path: os.PathLike, cache_mb: float) -> dict:
    nf = non_ffn_bytes(path)
    return {"non_ffn_bytes": nf, "cache_mb": cache_mb, "read_limit": nf + READ_SLACK,
            "rss_limit": nf + int(cache_mb * MiB) + RSS_SLACK}


def run_limit(path: os.PathLike, cache_bytes: int) -> dict:
    """Inference bound: non-FFN bytes + predictors (held as f32 by the backend: twice the f16
    blobs) + the cache budget + 64 MiB."""
    from ripple_gguf.format.reader import RippleFile

    rf = RippleFile.open(path)
    pred = 2 * sum(l.predictor_size for l in rf.layers)
    nf = non_ffn_bytes(path)
    # the split down columns' scale tables are FFN weights held in memory: not added to the bound,
    # they have to fit in the 64 MiB with everything else
    return {"non_ffn_bytes": nf, "predictor_bytes": pred, "cache_bytes": cache_bytes,
            "down_table_bytes": sum(l.down_table_size for l in rf.layers),
            "rss_limit": nf + pred + cache_bytes + RSS_SLACK}


def check(result: dict, lim: dict) -> dict:
    """PASS/FAIL of one hooked-ripple measurement against the acceptance limits."""
    hook = bool(result.get("ripple", {}).get("settings", {}).get("load_hook"))
    return {
        "measurement_valid": result["not_dropped"] == 0,
        "load_hook": hook,
        "read_ok": result["bytes_read"] <= lim["read_limit"],
        "rss_ok": result["rss_delta"] <= lim["rss_limit"],
    }


def _mib(n: float) -> str:
    return f"{n / MiB:9.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", nargs="?", help="ripple-packed GGUF (default: the default model packed into the cache dir)")
    p.add_argument("--source", help="its source GGUF for the stock-source case (default: the default model, "
                                    "if the file was packed from it)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--json", metavar="OUT", help="write all measurements and the verdict as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the library's progress lines

    from ripple_gguf.eval import models
    from ripple_gguf.format.reader import RippleFile
    from ripple_gguf.quickstart import ensure_default_ripple

    ripple_path = Path(args.file) if args.file else ensure_default_ripple()
    rf = RippleFile.open(ripple_path)
    source = args.source
    if source is None and rf.source.sha256 == models.DEFAULT_SHA256:
        source = str(models.default_model_path(install=False, verify=False))
    files = {"ripple": str(ripple_path), "source": source}

    results = {}
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        path = files[CASES[case]["file"]]
        if path is None:
            print(f"skipping {case}: no source GGUF (--source)", file=sys.stderr)
            continue
        results[case] = measure(case, path)

    cache_mb = next((r["ripple"]["settings"]["cache_mb"] for r in results.values() if "ripple" in r), None)
    if cache_mb is None:
        import ripple_gguf
        cache_mb = ripple_gguf.settings()["cache_mb"]
    lim = limits(ripple_path, cache_mb)

    print(f"file: {ripple_path} ({rf.file_size / MiB:.1f} MiB); non-FFN tensor bytes {lim['non_ffn_bytes'] / MiB:.2f} MiB; "
          f"cache budget {cache_mb:g} MiB")
    print(f"limits (hooked ripple): read <= {lim['read_limit'] / MiB:.2f} MiB, "
          f"RSS growth <= {lim['rss_limit'] / MiB:.2f} MiB")
    print(f"{'case':<14} {'read MiB':>9} {'resident':>9} {'io_read':>9} {'RSS +MiB':>9} {'peak +MiB':>9} "
          f"{'anon MiB':>9} {'load s':>7}  note")
    for case, r in results.items():
        note = []
        if r["not_dropped"]:
            note.append(f"{r['not_dropped'] / MiB:.1f} MiB not dropped: measurement invalid")
        if "ripple" in r:
            ll = r["ripple"]["last_load"]
            note.append(f"hook {'on' if r['ripple']['settings']['load_hook'] else 'off'}, "
                        f"{ll.get('bound_tensors', 0)}/{ll.get('expected_tensors', 0)} FFN tensors bound")
        print(f"{case:<14} {_mib(r['bytes_read'])} {_mib(r['file_resident'])} {_mib(r['io_read'])} "
              f"{_mib(r['rss_delta'])} {_mib(r['peak_delta'])} {_mib(r['rss_anon_after'])} "
              f"{r['load_seconds']:7.2f}  {'; '.join(note)}")

    print("after the first prompt evaluation (context, not judged):")
    for case, r in results.items():
        e = r["eval"]
        extra = f"; backend read {e['ripple_bytes_read'] / MiB:.2f} MiB" if "ripple_bytes_read" in e else ""
        print(f"  {case:<14} file resident {e['file_resident'] / MiB:8.2f} MiB, io_read {e['io_read'] / MiB:8.2f} MiB, "
              f"RSS +{e['rss_delta'] / MiB:.2f} MiB{extra}")

    run_verdict = None
    for case, r in results.items():
        if "run" not in r:
            continue
        st = r["run"]["stats"]
        rl = run_limit(ripple_path, int(st["cache_capacity"]))
        ok = r["run"]["peak_delta"] <= rl["rss_limit"]
        run_verdict = {"rss_ok": ok, "limit": rl}
        print(f"{case}: {r['run']['prompt_tokens']} prompt + {r['run']['generated']} generated tokens "
              f"(mode {r['run']['settings']['mode']}, direct I/O {r['run']['settings']['direct_io']}): peak RSS "
              f"+{r['run']['peak_delta'] / MiB:.2f} MiB <= non-FFN {rl['non_ffn_bytes'] / MiB:.2f} + predictors "
              f"{rl['predictor_bytes'] / MiB:.2f} + cache {rl['cache_bytes'] / MiB:.2f} + 64 = "
              f"{rl['rss_limit'] / MiB:.2f} MiB: {'PASS' if ok else 'FAIL'} (the 64 include the down scale tables, "
              f"{rl['down_table_bytes'] / MiB:.2f} MiB)")
    verdict = None
    if "ripple-hook" in results:
        verdict = check(results["ripple-hook"], lim)
        r = results["ripple-hook"]
        print(f"read:   {r['bytes_read'] / MiB:.2f} MiB <= {lim['read_limit'] / MiB:.2f} MiB: "
              f"{'PASS' if verdict['read_ok'] else 'FAIL'}")
        print(f"memory: {r['rss_delta'] / MiB:.2f} MiB <= {lim['rss_limit'] / MiB:.2f} MiB: "
              f"{'PASS' if verdict['rss_ok'] else 'FAIL'}")
        if not verdict["measurement_valid"]:
            print("warning: the file's pages could not all be dropped before the load", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"file": str(ripple_path), "source": source, "limits": lim, "results": results,
                       "verdict": verdict, "run_verdict": run_verdict}, f, indent=2)
    ok = (verdict is None or all(verdict.values())) and (run_verdict is None or run_verdict["rss_ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], sys.argv[3])))
    else:
        sys.exit(main())
