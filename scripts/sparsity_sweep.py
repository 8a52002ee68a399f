#!/usr/bin/env python3
"""Sparse mode against conversion settings: active fraction x predictor rank x predictor recall.

For every combination, the model is converted with those settings (files cached in the work dir,
keyed by the settings, the source and the offline-stage code) and measured on each text of --text
(default: the held-out pydoc text, ``ripple_gguf.offline.quality.heldout_text``, never the calibration
text, and Debian's fortunes, English prose of another domain, ``ripple_gguf.eval.corpora``):

* exact-mode and sparse-mode perplexity on each text (windows of --chunk tokens, as ``ripple-gguf
  perplexity --text``);
* from ``ripple_gguf.stats()`` of the sparse run on the first text: neurons computed / total (per
  token, since every token keeps its own predicted set), and, from the first --decode-tokens tokens
  decoded one at a time (generation), needed bytes per token as a fraction of the dense FFN's bytes
  per token (``needed_bytes / dense_bytes``; in prompt batches the needed bytes are the batch's union);
* the predictors' held-out recall / over-prediction / predicted fraction and the top-2% recall of
  the worst layer (each token's top 2% neurons by |h| that its selection holds) stored in the file
  (``predictor_metrics``).

The goal checked in the last column: sparse perplexity within --ppl-goal of exact on every text and
needed bytes per token at most --bytes-goal of dense.

    python scripts/sparsity_sweep.py [SRC.gguf] [--points F/R/P,...]
        [--fractions 0.5,0.7 --ranks 64,128 --recalls 0.9,0.96] [--set KEY=VALUE ...] [--tokens 2048]
        [--text heldout,fortunes] [--workdir DIR] [--json OUT]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path

import ripple_gguf
from ripple_gguf.eval import corpora, models
from ripple_gguf.format import constants as C
from ripple_gguf.format.reader import RippleFile
from ripple_gguf.offline import quality
from ripple_gguf.offline.convert import convert
from ripple_gguf.offline.pipeline import OfflineConfig

# the code whose change makes a cached conversion stale; of offline/pipeline.py the functions only
# (the cache key holds every OfflineConfig value, so a change of the defaults keeps the cache valid)
CODE = ("offline/predictor.py", "offline/sketch.py", "offline/placement.py", "offline/profile.py",
        "offline/convert.py", "format/layout.py", "format/bundles.py", "format/writer.py")


DEFAULT_POINTS = ("0.5/64/0.96,0.5/64/0.9,0.5/64/0.8,0.7/64/0.9,0.7/64/0.85,0.7/64/0.8,"
                  "0.8/64/0.9,0.8/64/0.85,0.8/64/0.8,0.7/128/0.9")


def code_hash() -> str:
    import inspect

    from ripple_gguf.offline import pipeline as offline

    pkg = Path(ripple_gguf.__file__).parent
    h = hashlib.sha256()
    for name in CODE:
        h.update((pkg / name).read_bytes())
    for fn in (offline.run, offline.activity_score, OfflineConfig.check, quality.top_indices, quality.index_recall):
        h.update(inspect.getsource(fn).encode())
    h.update(repr(offline.RELU_ZERO_FRACTION).encode())
    return h.hexdigest()[:12]


def config_of(settings: dict) -> dict:
    """Every OfflineConfig value a conversion with ``settings`` uses (the default calibration text)."""
    cfg = dataclasses.asdict(OfflineConfig(**settings))
    for k in ("calib", "quiet", "threads"):
        cfg.pop(k)
    return cfg


def parse_value(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


def settings_list(args) -> list:
    extra = {}
    for kv in args.set or []:
        k, _, v = kv.partition("=")
        if k not in {f.name for f in dataclasses.fields(OfflineConfig)} or k in ("calib", "quiet", "threads"):
            raise SystemExit(f"--set {kv}: not an OfflineConfig field that can be swept")
        extra[k] = parse_value(v)
    if not args.fractions:
        combos = [tuple(p.split("/")) for p in args.points.split(",")]
    else:
        combos = itertools.product(args.fractions.split(","), args.ranks.split(","), args.recalls.split(","))
    out = []
    for f, r, p in combos:
        s = dict(extra, active_fraction=float(f), predictor_rank=int(r), predictor_recall=float(p))
        out.append(s)
    return out


def converted(src: Path, work: Path, settings: dict, threads) -> tuple:
    """(path, conversion record) of src converted with ``settings``, from the cache if there."""
    key_src = {"config": config_of(settings), "source": [src.name, src.stat().st_size], "code": code_hash(),
               "tool": C.TOOL_VERSION}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    path, meta = work / f"{key}.ripple.gguf", work / f"{key}.json"
    if path.exists() and meta.exists():
        return path, json.loads(meta.read_text())
    times: dict = {}
    t0 = time.perf_counter()
    tmp = path.with_suffix(".tmp")
    convert(src, tmp, offline=OfflineConfig(**settings, threads=threads, quiet=True), quiet=True,
            stage_seconds=times)
    record = {"key": key_src, "convert_seconds": time.perf_counter() - t0, "stages": times}
    tmp.rename(path)
    meta.write_text(json.dumps(record, indent=2))
    return path, record


def measure(path: Path, text: dict, mode: str, args, decode_tokens: int = 0) -> dict:
    """mode_perplexity of a file on one text, cached next to it (keyed by the text and the evaluation
    settings)."""
    tokens = quality.heldout_tokens(path, args.tokens, text["text"])
    cache = path.with_suffix(f".{text['key']}.{mode}.{len(tokens)}.{args.chunk}.{decode_tokens}.json")
    if cache.exists():
        return json.loads(cache.read_text())
    r = quality.mode_perplexity(path, tokens, mode, chunk=args.chunk, n_threads=args.threads,
                                decode_tokens=decode_tokens)
    cache.write_text(json.dumps(r, indent=2))
    return r


def load_texts(specs: str, n_tokens: int) -> list:
    """[{"spec", "name", "text", "key", "label"}] for a comma-separated list of ripple-gguf perplexity
    --text values (heldout, fortunes, or files: their cache key is a hash of their text, their label
    in the table the file's stem)."""
    out = []
    for spec in [s for s in specs.split(",") if s]:
        name, text = corpora.load_text(spec, quality.CHARS_PER_TOKEN * n_tokens)
        key = spec if spec in corpora.TEXTS else "text-" + hashlib.sha256(text.encode()).hexdigest()[:12]
        out.append({"spec": spec, "name": name, "text": text, "key": key,
                    "label": spec if spec in corpora.TEXTS else Path(spec).stem})
    if not out:
        raise SystemExit("--text: no text given")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", nargs="?", help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--fractions", help="active fractions of a grid (with --ranks and --recalls)")
    ap.add_argument("--ranks", default="64", help="predictor ranks of the grid (default 64)")
    ap.add_argument("--recalls", default="0.8,0.9,0.96", help="predictor recall targets of the grid")
    ap.add_argument("--points", default=DEFAULT_POINTS,
                    help="F/RANK/RECALL list, used unless --fractions is given (default: %(default)s; "
                         "about 20 min on 2 idle cores)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="another OfflineConfig field for every point (repeatable), e.g. predictor_tokens=16384")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of each text for perplexity (default 2048)")
    ap.add_argument("--text", default="heldout,fortunes", metavar="T[,T...]",
                    help="texts perplexity is measured on, as ripple-gguf perplexity --text: heldout, fortunes "
                         "(Debian's fortunes package, fetched with apt-get download and cached) or a UTF-8 file; "
                         "the first also gives the neurons computed and the needed bytes (default %(default)s)")
    ap.add_argument("--chunk", type=int, default=512, help="tokens per evaluation window (default 512)")
    ap.add_argument("--decode-tokens", type=int, default=256,
                    help="held-out tokens decoded one at a time for needed bytes per token (default 256)")
    ap.add_argument("--ppl-goal", type=float, default=0.03,
                    help="allowed perplexity increase, on every text (default 0.03)")
    ap.add_argument("--bytes-goal", type=float, default=0.5, help="allowed needed/dense bytes (default 0.5)")
    ap.add_argument("--exact-each", action="store_true",
                    help="measure exact mode on every file (default: once; exact mode computes every neuron, "
                         "so the conversion settings cannot change it)")
    ap.add_argument("--workdir", default="sparsity-sweep", help="cache of converted files (default ./sparsity-sweep)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="write the rows as JSON")
    args = ap.parse_args()

    src = Path(args.src) if args.src else models.default_model_path()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    points = settings_list(args)
    texts = load_texts(args.text, args.tokens)
    t_start = time.perf_counter()
    rows, exact = [], {}
    print(f"{src.name}: {len(points)} settings, {args.tokens} tokens of {', '.join(t['name'] for t in texts)}, "
          f"work dir {work}", flush=True)
    left = (f"{'f':>5} {'rank':>4} {'recall':>6} {'conv s':>6} {'p.recall':>8} {'top2 min':>8} {'overpred':>8} "
            f"{'p.frac':>6}")
    group = " ".join(f"{t['label'][:23]:-^23}" for t in texts)
    head = (f"{'':{len(left)}} {group}\n{left} " + " ".join(f"{'exact':>7} {'sparse':>7} {'d ppl':>7}" for _ in texts)
            + f" {'computed':>8} {'need/tok':>8} {'goal':>4}")
    lines = []
    for s in points:
        path, rec = converted(src, work, s, args.threads)
        per_text = {}
        for i, t in enumerate(texts):
            if t["key"] not in exact or args.exact_each:
                exact[t["key"]] = measure(path, t, "exact", args)
            sp = measure(path, t, "sparse", args, decode_tokens=args.decode_tokens if i == 0 else 0)
            per_text[t["key"]] = {"name": t["name"], "tokens": sp["tokens"], "exact_ppl": exact[t["key"]]["ppl"],
                                  "sparse_ppl": sp["ppl"], "ppl_increase": sp["ppl"] / exact[t["key"]]["ppl"] - 1}
            if i == 0:
                first = sp
        st, dst = first["stats"], first["decode_stats"]
        pm = RippleFile.open(path).predictor_metrics or {}
        main_text = per_text[texts[0]["key"]]
        row = {
            "settings": s, "file": str(path), "convert_seconds": rec["convert_seconds"], "stages": rec["stages"],
            "text": texts[0]["name"], "exact_ppl": main_text["exact_ppl"], "sparse_ppl": main_text["sparse_ppl"],
            "ppl_increase": main_text["ppl_increase"], "texts": per_text,
            "neurons_computed_fraction": st["neurons_computed"] / max(1, st["neurons_total"]),
            "batch_needed_fraction": st["needed_bytes"] / max(1, st["dense_bytes"]),
            "needed_bytes_per_token": dst["needed_bytes"] / max(1, dst["tokens"]),
            "dense_bytes_per_token": dst["dense_bytes"] / max(1, dst["tokens"]),
            "predictor_recall": pm.get("recall"), "predictor_over_prediction": pm.get("over_prediction"),
            "predictor_predicted_fraction": pm.get("predicted_fraction"),
            "predictor_top2_recall": pm.get("top2_recall"), "predictor_min_top2_recall": pm.get("min_top2_recall"),
            "predictor_seconds_per_token": st["predictor_seconds"] / max(1, st["tokens"])
            if "predictor_seconds" in st else None,
        }
        row["needed_fraction"] = row["needed_bytes_per_token"] / row["dense_bytes_per_token"]
        row["goal_met"] = (all(r["ppl_increase"] <= args.ppl_goal for r in per_text.values())
                           and row["needed_fraction"] <= args.bytes_goal)
        rows.append(row)
        top2 = pm.get("min_top2_recall")
        line = (f"{s['active_fraction']:>5.2f} {s['predictor_rank']:>4} {s['predictor_recall']:>6.3f} "
                f"{rec['convert_seconds']:>6.1f} {pm.get('recall', 0):>8.3f} "
                f"{top2 if top2 is not None else float('nan'):>8.3f} {pm.get('over_prediction', 0):>8.2f} "
                f"{pm.get('predicted_fraction', 0):>6.3f} "
                + " ".join(f"{r['exact_ppl']:>7.4f} {r['sparse_ppl']:>7.4f} {r['ppl_increase']:>+7.2%}"
                           for r in per_text.values())
                + f" {row['neurons_computed_fraction']:>8.3f} {row['needed_fraction']:>8.3f} "
                  f"{'yes' if row['goal_met'] else 'no':>4}")
        extra = {k: v for k, v in s.items() if k not in ("active_fraction", "predictor_rank", "predictor_recall")}
        if extra:
            line += "  " + " ".join(f"{k}={v}" for k, v in extra.items())
        if not lines:
            print(head)
        lines.append(line)
        print(line, flush=True)
    total = time.perf_counter() - t_start
    met = [r for r in rows if r["goal_met"]]
    print(f"\n{head}\n" + "\n".join(lines))
    print(f"goal (ppl <= exact +{args.ppl_goal:.0%} on every text, needed bytes <= {args.bytes_goal:.0%} of dense): "
          f"{len(met)} of {len(rows)} settings; sweep {total / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": src.name, "tokens": args.tokens, "texts": [t["name"] for t in texts], "chunk": args.chunk,
            "decode_tokens": args.decode_tokens,
            "ppl_goal": args.ppl_goal, "bytes_goal": args.bytes_goal, "seconds": total, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
