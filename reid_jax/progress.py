"""Progress of long passes, in one place: durations, rate/ETA log lines and terminal bars.

* :func:`format_seconds` — the one duration format of the project (``h:mm:ss``).
* :class:`ProgressLog` — a ``progress(done, total)`` callback that logs ``done/total``, the rate
  and the ETA through absl logging at most every ``interval`` seconds (embedding extraction,
  explanation measurement: passes that run inside tools whose output is a log).
* :class:`ProgressBar` — a terminal bar with rate and ETA (tqdm) for the interactive passes of
  ``tools/explain.py``; on a stream that is not a terminal it writes a line now and then.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import IO, Any

import tqdm
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


class ProgressBar:
    """A progress bar with rate and ETA on ``stream`` (default stderr), drawn by tqdm.

    ``update(n)`` advances it, ``close()`` ends the line. On a terminal it redraws at most every
    0.2 s; on a file or pipe it writes a line at most every 10 s (and at the end), so logs stay
    short. ``enabled=False`` draws nothing.
    """

    FORMAT = ("{desc:<8} {n_fmt}/{total_fmt} {percentage:5.1f}% |{bar:24}| {rate_fmt} "
              "ETA {remaining}")

    def __init__(self, total: int, label: str, unit: str = "queries", *,
                 stream: IO[str] | None = None, enabled: bool = True):
        stream = sys.stderr if stream is None else stream
        tty = bool(getattr(stream, "isatty", lambda: False)())
        self._bar = tqdm.tqdm(total=int(total), desc=label, unit=unit, file=stream,
                              disable=not enabled, ascii=" #", dynamic_ncols=False,
                              mininterval=0.2 if tty else 10.0, bar_format=self.FORMAT,
                              leave=True)

    def text(self) -> str:
        """The bar as it would be drawn now."""
        return str(self._bar)

    def update(self, n: int = 1) -> None:
        self._bar.update(int(n))
        if self._bar.total is not None and self._bar.n >= self._bar.total:
            self._bar.refresh()  # the end is always drawn

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
