"""Progress logging of long passes: ``h:mm:ss`` durations and a rate/ETA logger.

:func:`format_seconds` is the one duration format of the project (training ETA, image
extraction, explanation evaluation, the explain CLI's progress bar).  :class:`ProgressLog` is a
``progress(done, total)`` callback that logs ``done/total``, the rate and the ETA through absl
logging at most every ``interval`` seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from absl import logging


def format_seconds(seconds: float) -> str:
    """``h:mm:ss`` of ``seconds`` rounded to the second (``--`` for unknown, inf, NaN or < 0).

    Hours are not wrapped: ``format_seconds(90000) == "25:00:00"``.
    """
    if not math.isfinite(seconds) or seconds < 0:
        return "--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressLog:
    """A ``progress(done, total)`` callback that logs the rate and ETA of a long pass.

    Logs (``log``, default ``absl.logging.info``) at most every ``interval`` seconds and once
    when ``done == total``, e.g. ``AMD over all pairs (paper): 1024/3368 queries (30.4%),
    35.2 queries/s, ETA 0:01:07, elapsed 0:00:29``.  ``unit`` names what is counted.  Time runs
    from construction (``clock``, default ``time.monotonic``), so the first rate includes
    compilation.
    """

    def __init__(self, label: str, *, unit: str = "queries", interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 log: Callable[..., Any] = logging.info):
        if interval < 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval}")
        self.label, self.unit, self.interval = label, unit, float(interval)
        self._clock, self._log = clock, log
        self.start = clock()
        self._last = self.start

    def __call__(self, done: int, total: int) -> None:
        now = self._clock()
        if done < total and now - self._last < self.interval:
            return
        self._last = now
        elapsed = max(now - self.start, 0.0)
        rate = done / elapsed if elapsed > 0 else float("nan")
        eta = (total - done) / rate if rate > 0 else float("nan")
        pct = 100.0 * done / total if total else 100.0
        rate_text = f"{rate:.1f}" if math.isfinite(rate) else "--"
        self._log("%s: %d/%d %s (%.1f%%), %s %s/s, ETA %s, elapsed %s", self.label, done,
                  total, self.unit, pct, rate_text, self.unit,
                  format_seconds(0.0 if done >= total else eta), format_seconds(elapsed))
