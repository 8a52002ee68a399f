"""Ripple-packed files of one source that differ only in bundle order (one per placement), made
from a single offline stage and cached under a work directory keyed by the source's sha256 and
the offline settings; and the source packed without the offline stage."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Dict, Sequence

from ..format import constants as C
from ..format.layout import RippleFormatError
from ..format.reader import RippleFile
from ..offline.convert import convert, reusable, sha256_file
from ..offline.pipeline import OfflineConfig, run as run_offline
from ..paths import default_cache_dir
from .machine import progress

PLACEMENTS = ("ripple", "frequency", "original")


def default_work_dir() -> Path:
    return default_cache_dir() / "bench"


def offline_key(source_sha256: str, cfg) -> str:
    """Key of a set of variants: the source bytes and every offline setting that changes the file."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("calib", "quiet", "threads", "placement")}
    texts = cfg.calib if cfg.calib is not None else None
    fields["calib"] = None if texts is None else [[n, hashlib.sha256(t.encode()).hexdigest()] for n, t in texts]
    blob = json.dumps([source_sha256, C.TOOL_VERSION, fields], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare_variants(src: os.PathLike, work_dir: os.PathLike, cfg=None, *, placements: Sequence[str] = PLACEMENTS,
                     tag: str = "", quiet: bool = False) -> Dict[str, Path]:
    """Ripple-packed files of ``src`` that differ only in bundle order, one per placement.

    A single offline stage (``cfg``: an :class:`~ripple_gguf.offline.pipeline.OfflineConfig`, default
    settings when None) is run when any file is missing; files already in ``work_dir`` made from
    the same source bytes and settings are reused."""
    cfg = cfg if cfg is not None else OfflineConfig()
    cfg = dataclasses.replace(cfg, placement="ripple", quiet=True)
    src = Path(src)
    sha = sha256_file(os.fspath(src))
    key = offline_key(sha, cfg)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stem = src.name[:-len(".gguf")] if src.name.endswith(".gguf") else src.name
    paths = {m: work / f"{stem}.{tag + '.' if tag else ''}{key}.{m}.ripple.gguf" for m in placements}
    missing = [m for m in placements if not reusable(paths[m], sha)]
    if missing:
        progress(f"offline stage on {src.name} for {', '.join(missing)} (profile, predictors, placements)", quiet)
        t0 = time.perf_counter()
        result = run_offline(src, cfg)
        for m in missing:
            convert(src, paths[m], offline=result.for_placement(m), quiet=True)
        progress(f"variants written in {time.perf_counter() - t0:.0f} s", quiet)
    return paths


def prepare_unprofiled(src: os.PathLike, work_dir: os.PathLike, *, quiet: bool = False) -> Path:
    """``src`` packed without the offline stage (original order, no predictors: exact mode only),
    the cheapest valid ripple file, cached in ``work_dir`` like the variants."""
    src = Path(src)
    sha = sha256_file(os.fspath(src))
    key = hashlib.sha256(json.dumps([sha, C.TOOL_VERSION, "unprofiled"]).encode()).hexdigest()[:12]
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stem = src.name[:-len(".gguf")] if src.name.endswith(".gguf") else src.name
    path = work / f"{stem}.{key}.original.ripple.gguf"
    try:
        rf = RippleFile.open(path)
        rf.check_quick()
        if rf.source.sha256 == sha:
            return path
    except (RippleFormatError, OSError):
        pass
    progress(f"packing {src.name} without the offline stage (original order, no predictors)", quiet)
    t0 = time.perf_counter()
    convert(src, path, quiet=True)
    progress(f"{path.name} written in {time.perf_counter() - t0:.0f} s", quiet)
    return path
