"""The ``ripple-gguf`` command: convert, inspect, verify, perplexity, probe-storage, bench, membench,
quickstart, llama-server and llama-bench (one function per subcommand)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

from ripple_gguf.format import constants as C


def _cmd_convert(args: argparse.Namespace) -> int:
    from ripple_gguf.offline.convert import convert
    from ripple_gguf.offline.pipeline import OfflineConfig
    from ripple_gguf.offline.profile import read_text

    offline = None
    placement = args.placement or ("original" if args.no_profile else "ripple")
    if not args.no_profile:
        calib = [(path, read_text(path)) for path in args.calib] if args.calib else None
        offline = OfflineConfig(calib=calib, calib_tokens=args.calib_tokens, placement=placement,
                                active_fraction=args.active_fraction, predictor_rank=args.predictor_rank,
                                predictor=args.predictor, sketch_outliers=args.sketch_outliers,
                                sketch_budget=args.sketch_budget, sketch_allocation=args.sketch_allocation,
                                sketch_uncertainty=args.sketch_uncertainty,
                                predictor_recall=args.predictor_recall,
                                predictor_fit_fraction=args.predictor_fit_fraction or None, seed=args.seed,
                                threads=args.threads, quiet=args.quiet)
    elif placement != "original":
        raise ValueError(f"--placement {placement} needs profiling (drop --no-profile)")
    t0 = time.perf_counter()
    times: dict = {}
    rf = convert(args.src, args.dst, placement=placement, down_type=args.down_type, offline=offline,
                 quiet=args.quiet, stage_seconds=times)
    if not args.quiet:
        print(f"{rf.path}: {rf.n_layers} FFN layers packed, {rf.source.size:,} -> {rf.file_size:,} bytes "
              f"(+{(rf.file_size - rf.source.size) / rf.source.size:.1%}) in {time.perf_counter() - t0:.1f} s")
        print("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
        q, p = rf.placement_quality, rf.predictor_metrics
        if q:
            # the other placements' figures are stored under "<method>_..." (none for the chosen one)
            others = [k[:-len("_mean_run_length")] for k in sorted(q) if k.endswith("_mean_run_length")]
            vs = "; ".join(f"{m}: mean run {q[f'{m}_mean_run_length']:.2f}, reads/token "
                           f"{q[f'{m}_reads_per_token']:.0f}" for m in others)
            print(f"placement {q['method']} on {q['eval_tokens']} held-out tokens ({q['needed']} bundles): mean run "
                  f"{q['mean_run_length']:.2f}, reads/token {q['reads_per_token']:.0f}" + (f" ({vs})" if vs else ""))
        if p:
            print(_predictor_summary(p, [l.block for l in rf.layers]))
    return 0


def _predictor_summary(p: dict, blocks: Sequence[int]) -> str:
    """One line of a file's predictor metrics (``ripple.predictor.metrics``) on held-out text;
    ``blocks``: the layers' block numbers, in the order of the per-layer lists."""
    line = (f"predictors on {p['eval_tokens']} held-out tokens: recall {p['recall']:.3f}, precision "
            f"{p['precision']:.3f}, over-prediction {p['over_prediction']:.2f}x, predicted fraction "
            f"{p['predicted_fraction']:.3f}")
    if "top2_recall" in p:  # files converted before it have no top-2% recall
        per = p["per_layer"]["top2_recall"]
        worst = min(range(len(per)), key=per.__getitem__)
        line += (f"; top-2% recall (of each token's largest |h|) mean {p['top2_recall']:.3f}, min "
                 f"{p['min_top2_recall']:.3f} (block {blocks[worst]})")
    return line


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ripple_gguf.format.reader import RippleFile

    rf = RippleFile.open(args.file)
    info = rf.to_json()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{rf.path}: ripple format v{info['format_version']} ({info['tool_version']}), {rf.file_size:,} bytes")
    print(f"source: {rf.source.name} ({rf.source.size:,} bytes, sha256 {rf.source.sha256})")
    print(f"region: offset {rf.region_offset:,}, size {rf.region_size:,}, id {rf.region_id}")
    print(f"placement: {rf.placement_method}; n_embd {rf.n_embd}; {rf.n_layers} layers")
    p = rf.predictor_metrics or {}
    if p:
        md = rf.metadata
        kind = md.get(C.Keys.Predictor.KIND, "lowrank")
        if kind == "sketch":
            kind += (f" (budget {float(md.get(C.Keys.Predictor.SKETCH_BUDGET, 0)):.2f}, "
                     f"{int(md.get(C.Keys.Predictor.SKETCH_OUTLIERS, 0))} outlier channels, "
                     f"uncertainty {float(p.get('sketch_uncertainty', 0.0)):g})")
        print(f"predictor: {kind}")
        print(_predictor_summary(p, [l["block"] for l in info["layers"]]))
    runtime = info.get("runtime") or {}
    if runtime.get("default_mode"):
        why = runtime.get("default_mode_reason")
        print(f"default mode: {runtime['default_mode']}" + (f" ({why})" if why else ""))
    per = p.get("per_layer", {})
    cols = [k for k in ("recall", "top2_recall") if k in per]
    names = {"recall": "recall", "top2_recall": "top2"}
    print(f"{'block':>5} {'n_ff':>6} {'gate':>6} {'up':>6} {'down':>6} {'layout':>6} {'down_src':>8} {'bundle':>7} "
          f"{'offset':>12}" + "".join(f" {names[k]:>6}" for k in cols))
    for i, l in enumerate(info["layers"]):
        print(f"{l['block']:>5} {l['n_ff']:>6} {l['gate_type']:>6} {l['up_type']:>6} {l['down_type']:>6} "
              f"{l['down_layout']:>6} {l['down_src_type']:>8} {l['bundle_size']:>7} {l['bundles_offset']:>12}"
              + "".join(f" {per[k][i]:>6.3f}" for k in cols))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from ripple_gguf.format.reader import RippleFile

    rf = RippleFile.open(args.file)
    rf.verify_full()
    print(f"{rf.path}: OK ({rf.n_layers} layers, region {rf.region_size:,} bytes, sha256 matches)")
    return 0


def _cmd_perplexity(args: argparse.Namespace) -> int:
    from ripple_gguf.eval import corpora
    from ripple_gguf.offline import quality

    text_name, text = corpora.load_text(args.text, quality.CHARS_PER_TOKEN * args.tokens)
    tokens = quality.heldout_tokens(args.file, args.tokens, text)
    if len(tokens) < 2:
        raise ValueError(f"{text_name}: fewer than 2 tokens")
    r = quality.mode_perplexity(args.file, tokens, args.mode, chunk=args.chunk, n_threads=args.threads)
    ppl = r["ppl"]
    out = {"file": str(args.file), "mode": args.mode, "text": text_name, "ppl": ppl, "tokens": len(tokens),
           "stats": r["stats"]}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        s = out["stats"]
        print(f"{args.file}: perplexity {ppl:.4f} over {len(tokens)} tokens of {text_name} ({args.mode} mode)")
        if s["dense_bytes"]:
            print(f"needed bundles {s['needed_bytes'] / s['dense_bytes']:.1%} of dense, neurons computed "
                  f"{s['neurons_computed'] / max(1, s['neurons_total']):.1%}, reads {s['read_ops']}, "
                  f"mean run {s['mean_run_length']:.2f}")
    return 0


def _cmd_probe_storage(args: argparse.Namespace) -> int:
    from ripple_gguf.eval import models
    from ripple_gguf.runtime import storage

    path = args.path
    if path is None:
        try:
            path = str(models.default_model_path(install=False, verify=False).parent)
        except FileNotFoundError:
            path = os.getcwd()
    result = storage.probe(path, quick=args.quick, progress=not args.json)
    saved = None if args.no_save else storage.save_profile(result)
    if args.json:
        print(json.dumps(dict(result, profile=str(saved) if saved else None), indent=2))
        return 0
    model = storage.CostModel.from_dict(result["model"])
    dev = result["device"]
    print(f"{result['path']}: device {dev['dev']} {dev['source']} ({dev['fstype']}), "
          f"{'O_DIRECT' if result['direct'] else 'buffered reads, page cache dropped (O_DIRECT refused)'}, "
          f"{result['file_bytes'] // (1 << 20)} MiB probe file, {result['elapsed_s']:.1f} s")
    print(f"{'size':>8} {'QD':>3} {'MB/s':>8} {'IOPS':>8} {'mean us':>8} {'p50 us':>8} {'p99 us':>8} {'model MB/s':>10}")
    for p in result["points"]:
        size = f"{p['size'] // 1024} KiB" if p["size"] < (1 << 20) else f"{p['size'] >> 20} MiB"
        print(f"{size:>8} {p['queue_depth']:>3} {p['mb_s']:>8.1f} {p['iops']:>8.0f} {p['lat_mean_us']:>8.0f} "
              f"{p['lat_p50_us']:>8.0f} {p['lat_p99_us']:>8.0f} {model.throughput(p['size'], p['queue_depth']) / 1e6:>10.1f}")
    print("sequential (" + f"{result['sequential'][0]['size'] >> 20} MiB requests): "
          + ", ".join(f"QD{s['queue_depth']} {s['mb_s']:.0f} MB/s" for s in result["sequential"]))
    fit = result["fit"]
    print(f"model: latency {model.latency_s * 1e6:.1f} us, bandwidth {model.bandwidth_bps / 1e6:.0f} MB/s, "
          f"parallelism {model.parallelism:.1f}, queue depth {model.queue_depth}; fit error over {fit['points']} "
          f"points: rms {fit['rms_rel_error']:.1%}, median {fit['median_abs_rel_error']:.1%}, max {fit['max_abs_rel_error']:.1%}")
    gap = model.collapse_gap_bytes()
    print(f"collapse threshold: {gap:,} bytes" + (" (off: the device is bandwidth-bound)" if gap == 0 else
          " (runs separated by a smaller gap are read as one request)"))
    print(f"without a profile: {storage.DEFAULT.name}, threshold {storage.DEFAULT.collapse_gap_bytes():,} bytes")
    print(f"profile saved to {saved}" if saved else "profile not saved (--no-save)")
    return 0


def _check_plot(out: Optional[str]) -> None:
    if out:
        try:
            import matplotlib  # noqa: F401  (fail before the measurements, not after)
        except ImportError:
            raise RuntimeError('--plot needs matplotlib: pip install ".[bench]"') from None


def _write_json(out: Optional[str], result) -> None:
    if out:
        from ripple_gguf.atomic import atomic_output

        with atomic_output(out) as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        print(f"results written to {out}")


def _cmd_bench(args: argparse.Namespace) -> int:
    from ripple_gguf.eval import bench, report
    from ripple_gguf.offline.profile import read_text

    text, text_name = (read_text(args.text), args.text) if args.text else (None, "held-out pydoc_data.topics")
    calib = [(path, read_text(path)) for path in args.calib] if args.calib else None
    _check_plot(args.plot)
    fractions = sorted(set(args.cache_fraction or [0.05, 0.1]))
    result = bench.run(args.src, text=text, text_name=text_name, calib=calib, tokens=args.tokens,
                       fractions=fractions, rounds=args.rounds, n_threads=args.threads, ppl_tokens=args.ppl_tokens,
                       cross_dataset=not args.no_cross_dataset, work_dir=args.work_dir)
    print(report.report(result))
    _write_json(args.json, result)
    if args.plot:
        from ripple_gguf.eval.plots import plot

        print(f"figure written to {plot(result, args.plot)}")
    return 0


def _cmd_membench(args: argparse.Namespace) -> int:
    from ripple_gguf.eval import membench

    _check_plot(args.plot)
    fractions = sorted(set(args.memory_fraction or membench.DEFAULT_FRACTIONS))
    if any(not 0.0 < x <= 4.0 for x in fractions):
        raise ValueError(f"--memory-fraction must be in (0, 4], got {fractions}")
    if (args.src is None) == (args.synthetic is None):
        raise ValueError("membench takes a source model SRC.gguf or --synthetic NAME (one of the two)")
    result = membench.run(args.src, synthetic=args.synthetic, fractions=fractions, tokens=args.tokens,
                          threads=args.threads, work_dir=args.work_dir, timeout=args.timeout,
                          cache_policies=list(dict.fromkeys(args.cache_policy or [membench.DEFAULT_POLICY])))
    print(membench.report(result))
    _write_json(args.json, result)
    if args.plot:
        from ripple_gguf.eval.plots import plot_membench

        print(f"figure written to {plot_membench(result, args.plot)}")
    return 0


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _cmd_quickstart(args: argparse.Namespace) -> int:
    import ripple_gguf
    from ripple_gguf import quickstart
    from ripple_gguf.paths import default_cache_dir

    p = argparse.ArgumentParser(prog="ripple-gguf quickstart",
                                description="Pack the default model (SmolLM2-135M) and generate with the RIPPLE backend.")
    p.add_argument("--out", metavar="DIR", help=f"where the packed model is kept (default: {default_cache_dir()})")
    p.add_argument("--prompt", default=quickstart.DEFAULT_PROMPT,
                   help=f"prompt (default: {quickstart.DEFAULT_PROMPT!r})")
    p.add_argument("--tokens", type=int, default=quickstart.DEFAULT_TOKENS,
                   help=f"tokens to generate (default: {quickstart.DEFAULT_TOKENS})")
    p.add_argument("--cache-mb", type=float, help="neuron cache budget in MiB (default: the runtime's)")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: llama-cpp-python's)")
    p.add_argument("--mode", choices=("auto", "exact", "sparse"),
                   help="the runtime's mode (default: RIPPLE_MODE, else auto: the file's default mode)")
    q = p.parse_args(args.args)

    path = quickstart.ensure_default_ripple(q.out)
    if q.cache_mb is not None:
        ripple_gguf.configure(cache_mb=q.cache_mb)
    if q.mode is not None:
        ripple_gguf.configure(mode=q.mode)
    r = quickstart.generate(path, q.prompt, q.tokens, threads=q.threads)
    load, s, settings, usage = r["load"], r["stats"], r["settings"], r["usage"]
    if load.get("path") != str(path) or not load.get("bound_tensors"):
        print(f"ripple-gguf: error: the backend did not take over {path}: {load}", file=sys.stderr)
        return 1
    print(f"{q.prompt}{r['text']}")
    print()
    print(f"model: {path} (loaded in {r['load_s']:.2f} s, {load['bound_tensors']}/{load['expected_tensors']} "
          f"FFN tensors on the RIPPLE backend, load hook {'on' if settings['load_hook'] else 'off'})")
    print(f"tokens: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} generated in {r['gen_s']:.2f} s "
          f"({usage['completion_tokens'] / r['gen_s']:.1f} tokens/s)")
    mode = settings["mode"]
    if mode == "auto":  # the file's own default, and why when the converter chose exact
        why = load.get("default_mode_reason")
        mode = f"{load.get('default_mode', 'sparse')} (the file's default{': ' + why if why else ''})"
    print(f"mode {mode}: FFN matmuls served {s['ffn_matmuls']:,}; neurons computed "
          f"{s['neurons_computed']:,} of {s['neurons_total']:,} ({s['neurons_computed'] / max(1, s['neurons_total']):.1%}); "
          f"needed bundles {s['needed_bytes'] / max(1, s['dense_bytes']):.1%} of the dense FFN bytes")
    print(f"read from the file: {_mib(s['bytes_read'])} in {s['read_ops']:,} reads (mean run of needed bundles "
          f"{s['mean_run_length']:.1f}, collapse threshold {settings['collapse_bytes']:,} bytes), "
          f"{s['io_seconds'] * 1e3:.1f} ms of I/O")
    print(f"neuron cache: {s['cache_hits']:,} hits, {s['cache_misses']:,} misses "
          f"(hit rate {s['cache_hit_rate']:.1%}), {_mib(s['cache_bytes'])} of {_mib(s['cache_capacity'])} used")
    if r["error"]:
        print(f"ripple-gguf: backend error: {r['error']}", file=sys.stderr)
        return 1
    if s["ffn_matmuls"] == 0:
        print("ripple-gguf: error: the backend served no FFN matmul", file=sys.stderr)
        return 1
    if settings["mode"] == "auto" and load.get("default_mode") == "exact":
        print("(sparse mode, the predictors: ripple-gguf quickstart --mode sparse)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=C.TOOL_NAME, description="Pack GGUF models for flash-resident FFN inference.")
    p.add_argument("--version", action="version", version=f"{C.TOOL_NAME} {C.TOOL_VERSION}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="write a ripple-packed GGUF from a GGUF model")
    c.add_argument("src", metavar="SRC.gguf")
    c.add_argument("dst", metavar="DST.gguf")
    c.add_argument("--placement", choices=["original", "frequency", "ripple"],
                   help="bundle order on disk: ripple (co-activation path, the default), frequency, original "
                        "(the default with --no-profile)")
    c.add_argument("--calib", nargs="+", metavar="TEXT",
                   help="UTF-8 calibration text files (default: CPython's pydoc_data topics, first half)")
    c.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    c.add_argument("--active-fraction", type=float, default=0.7,
                   help="target fraction of active neurons for magnitude thresholds (default 0.7)")
    c.add_argument("--predictor", choices=("sketch", "lowrank"), default="sketch",
                   help="predictor kind: sketch (a 2-bit copy of each layer's gate and up rows with outlier input "
                        "channels exact; default) or lowrank (a trained n_embd -> rank -> n_ff MLP)")
    c.add_argument("--sketch-outliers", type=int, default=12,
                   help="sketch: input channels kept exact per layer (default 12)")
    c.add_argument("--sketch-budget", type=float, default=0.67,
                   help="sketch: mean fraction of the neurons selected, the threshold's calibration target "
                        "(default 0.67)")
    c.add_argument("--sketch-allocation", choices=("uniform", "relative"), default="uniform",
                   help="sketch: how the budget is shared among layers: uniform (each layer keeps the budget's "
                        "fraction; default) or relative (thresholds at one multiple of each layer's RMS score)")
    c.add_argument("--sketch-uncertainty", type=float, default=0.5,
                   help="sketch: weight of each estimate's fitted variance in its score, so that small but "
                        "uncertain estimates rank higher (0: the plain |h~|; default 0.5)")
    c.add_argument("--predictor-rank", type=int, default=64,
                   help="lowrank: hidden width; 0 = no predictors, either kind (default 64)")
    c.add_argument("--predictor-recall", type=float, default=0.9,
                   help="recall the predictor threshold is tuned to on validation tokens (default 0.9)")
    c.add_argument("--predictor-fit-fraction", type=float, default=0.25,
                   help="fit the predictors to the neurons of this top fraction of |h| (at most the active "
                        "fraction; 0 = to the active neurons); thresholds stay tuned to recall of the active "
                        "neurons (default 0.25)")
    c.add_argument("--seed", type=int, default=0, help="seed of predictor training (default 0)")
    c.add_argument("--threads", type=int, help="threads for profiling and placement (default: all cores)")
    c.add_argument("--no-profile", action="store_true",
                   help="skip the offline stage: original order, no predictors (fast; exact mode only)")
    c.add_argument("--down-type", choices=["auto", "split", "same", "f16", "f32", "q8_0"], default="auto",
                   help="how bundles store the down column: auto (default) keeps float sources' type and "
                        "splits every quantized type, Q4_0..Q8_0 and the k-quants (the source's own values, "
                        "exact; scales in a per-layer table; Q8_0 columns where a layer cannot be split); "
                        "split = the same; same/f16/f32/q8_0 = columns re-quantized to that type "
                        "(same = ffn_down's)")
    c.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    c.set_defaults(func=_cmd_convert)

    i = sub.add_parser("inspect", help="show a ripple-packed file's layout")
    i.add_argument("file", metavar="FILE")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_cmd_inspect)

    v = sub.add_parser("verify", help="check a ripple-packed file's region against its tensors")
    v.add_argument("file", metavar="FILE")
    v.set_defaults(func=_cmd_verify)

    pp = sub.add_parser("perplexity", help="perplexity of a model through llama.cpp with the plugin")
    pp.add_argument("file", metavar="FILE")
    pp.add_argument("--text", default="heldout", metavar="heldout|fortunes|FILE",
                    help="heldout (default: the end of CPython's pydoc_data topics, never used for calibration), "
                         "fortunes (Debian's fortunes package: English prose of another domain, fetched once with "
                         "apt-get download and cached) or a UTF-8 text file (./fortunes for a file of that name)")
    pp.add_argument("--mode", choices=["exact", "sparse"], default="sparse",
                    help="sparse (default: predictor-gated, as the runtime runs) or exact (every neuron)")
    pp.add_argument("--tokens", type=int, default=2048, help="tokens evaluated (default 2048)")
    pp.add_argument("--chunk", type=int, default=512, help="tokens per evaluation window (default 512)")
    pp.add_argument("--threads", type=int)
    pp.add_argument("--json", action="store_true", help="print ppl, tokens and the backend's stats as JSON")
    pp.set_defaults(func=_cmd_perplexity)

    ps = sub.add_parser("probe-storage", help="measure the disk holding a model and save its storage cost profile")
    ps.add_argument("path", nargs="?", metavar="PATH",
                    help="model file or directory on the disk to measure (default: the default model's "
                         "directory, else the current directory)")
    ps.add_argument("--quick", action="store_true", help="fewer points on a smaller file (a few seconds)")
    ps.add_argument("--json", action="store_true", help="print the measurements and the fitted model as JSON")
    ps.add_argument("--no-save", action="store_true", help="do not save the profile")
    ps.set_defaults(func=_cmd_probe_storage)

    b = sub.add_parser("bench", help="measure llama.cpp, LLM in a flash, frequency order and ripple side by side")
    b.add_argument("src", metavar="SRC.gguf", help="source GGUF model (the variants are packed from it and cached)")
    b.add_argument("--calib", nargs="+", metavar="TEXT",
                   help="calibration text files (default: CPython's pydoc_data topics, first half)")
    b.add_argument("--text", metavar="TEXT", help="evaluation text file (default: the held-out pydoc_data text)")
    b.add_argument("--tokens", type=int, default=64, help="tokens decoded one at a time (default 64)")
    b.add_argument("--cache-fraction", type=float, action="append", metavar="F",
                   help="neuron cache budget as a fraction of the FFN; repeat for several (default 0.05 and 0.1)")
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds on the local disk (default 3)")
    b.add_argument("--threads", type=int, default=2, help="llama.cpp threads of every system (default 2)")
    b.add_argument("--ppl-tokens", type=int, default=512, help="tokens of the perplexity comparison (default 512)")
    b.add_argument("--no-cross-dataset", action="store_true", help="skip the placement robustness table")
    b.add_argument("--work-dir", help="where variants are cached (default ~/.cache/ripple-gguf/bench)")
    b.add_argument("--json", metavar="OUT.json", help="write every figure as JSON")
    b.add_argument("--plot", metavar="OUT.png", help="write the figures (needs matplotlib: the bench extra)")
    b.set_defaults(func=_cmd_bench)

    from ripple_gguf.eval.synthetic import SHAPES

    mb = sub.add_parser("membench", help="stock llama.cpp and ripple under kernel memory limits (cgroups)")
    mb.add_argument("src", metavar="SRC.gguf", nargs="?",
                    help="source GGUF model (its ripple file is packed and cached); or --synthetic")
    mb.add_argument("--synthetic", choices=sorted(SHAPES),
                    help="instead of SRC.gguf: a random-weight Q4_0 llama of this size (1b: TinyLlama-1.1B's "
                         "shape, FFN about two thirds of the weights), built once in the work dir and packed "
                         "without predictors (exact mode only; ripple-sparse is reported as not applicable)")
    mb.add_argument("--memory-fraction", type=float, action="append", metavar="X",
                    help="memory limit as a fraction of stock's unconfined peak; repeat (default 0.6, 0.75, 0.9)")
    mb.add_argument("--tokens", type=int, default=64, help="held-out tokens decoded one at a time (default 64)")
    mb.add_argument("--threads", type=int, default=2, help="llama.cpp threads of every system (default 2)")
    mb.add_argument("--cache-policy", action="append", choices=["lru", "s3fifo", "linking", "pinned"],
                    help="neuron cache policy of the ripple runs; repeat to compare (default pinned)")
    mb.add_argument("--timeout", type=float, default=300,
                    help="seconds a confined run may take before it is reported as thrashing (default 300)")
    mb.add_argument("--work-dir", help="where the packed file and a synthetic model are cached (default "
                         "~/.cache/ripple-gguf/bench)")
    mb.add_argument("--json", metavar="OUT.json", help="write every figure as JSON")
    mb.add_argument("--plot", metavar="OUT.png", help="decode tokens/s against the limit (needs matplotlib)")
    mb.set_defaults(func=_cmd_membench)

    q = sub.add_parser("quickstart", add_help=False,
                       help="install the default model (SmolLM2-135M), pack it and generate with the plugin")
    q.add_argument("args", nargs=argparse.REMAINDER, help="options of the quickstart (--help lists them)")
    q.set_defaults(func=_cmd_quickstart)

    for tool, what in (("llama-server", "llama.cpp's own HTTP server"), ("llama-bench", "llama.cpp's benchmark")):
        t = sub.add_parser(tool, add_help=False,
                           help=f"run {what} (no Python in the process) with the plugin loaded as a ggml backend "
                                "module; [--build] [--build-dir DIR] then the tool's own options")
        t.add_argument("args", nargs=argparse.REMAINDER, help=f"{tool}'s options (e.g. --model m.ripple.gguf)")
        t.set_defaults(func=_cmd_llama_tool, tool=tool)
    return p


def _cmd_llama_tool(args: argparse.Namespace) -> int:
    """llama.cpp's own llama-server / llama-bench with the backend module: ``[--build] [--build-dir
    DIR]`` first, every other argument is the tool's."""
    from ripple_gguf.runtime import llama_tools

    rest, build, build_dir = list(args.args), False, None
    while rest and rest[0] in ("--build", "--build-dir"):
        opt = rest.pop(0)
        if opt == "--build":
            build = True
        elif not rest:
            raise ValueError("--build-dir needs a directory")
        else:
            build_dir = rest.pop(0)
    if build:
        llama_tools.build(build_dir)
    llama_tools.run(args.tool, rest, build_dir)
    return 0  # not reached: the tool replaced this process


class _StderrLines(logging.Handler):
    """The package's log records (progress, warnings) as lines on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        print(prefix + self.format(record), file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["quickstart"]:  # its own parser takes every option after the word
        args = argparse.Namespace(func=_cmd_quickstart, args=argv[1:])
    elif argv[:1] in (["llama-server"], ["llama-bench"]):  # the tool's own options follow
        args = argparse.Namespace(func=_cmd_llama_tool, tool=argv[0], args=argv[1:])
    else:
        args = parser.parse_args(argv)
    log, handler = logging.getLogger("ripple_gguf"), _StderrLines()
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError, RuntimeError) as e:  # bad input; RippleFormatError is a ValueError
        # one line "FILE: problem" (OSError's own text puts the file name last)
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print(f"{C.TOOL_NAME}: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{C.TOOL_NAME}: interrupted", file=sys.stderr)
        return 130
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
