"""Progress of long work: a tqdm bar on a terminal; elsewhere (a pipe, CI, a log file) a log line
at every tenth of the work with the count and the seconds so far, so that a conversion of a large
model is never silent for minutes; nothing when quiet."""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
log = logging.getLogger("ripple_gguf")


def progress(it: Iterable[T], *, desc: str, unit: str, total: Optional[int] = None, quiet: bool = False) -> Iterable[T]:
    if quiet:
        return it
    if total is None and hasattr(it, "__len__"):
        total = len(it)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(it, desc=desc, unit=unit, total=total)
    return _logged(it, desc, unit, total)


def _logged(it: Iterable[T], desc: str, unit: str, total: Optional[int]) -> Iterator[T]:
    t0 = time.perf_counter()
    step = max(1, (total or 10) // 10)
    done = 0
    for x in it:
        yield x
        done += 1  # counted once the caller has finished with the item
        if done % step == 0 or done == total:
            of = f"/{total}" if total else ""
            log.info("%s: %d%s %s%s (%.0f s)", desc, done, of, unit, "" if done == 1 else "s",
                     time.perf_counter() - t0)
