"""Progress of long work away from a terminal (pytest's stderr is not one): a log line at every
tenth of the work, the count and the seconds so far; nothing when quiet; items pass through."""
from __future__ import annotations

import logging

from ripple_gguf.progress import progress


def test_logged_every_tenth_and_silent_when_quiet(caplog):
    with caplog.at_level(logging.INFO, logger="ripple_gguf"):
        assert list(progress(range(25), desc="predictors", unit="layer")) == list(range(25))
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 13 and lines[0].startswith("predictors: 2/25 layers (") and lines[-1].startswith("predictors: 25/25 layers")
        caplog.clear()
        assert list(progress(iter("abc"), desc="profile", unit="chunk")) == ["a", "b", "c"]  # no length: each item
        assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["profile: 1 chunk", "profile: 2 chunks",
                                                                          "profile: 3 chunks"]
        caplog.clear()
        assert list(progress(range(5), desc="x", unit="y", quiet=True)) == list(range(5))
        assert not caplog.records
