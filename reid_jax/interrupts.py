"""Ctrl-C with worker processes: one line from the tool, no tracebacks from its workers.

A terminal's Ctrl-C sends SIGINT to every process of the foreground group, so worker processes
started with ``multiprocessing``'s "spawn" (the report's figure drawers, the synthetic
renderers, the counterfactual renderers) would each print a ``KeyboardInterrupt`` traceback —
most often while they still import their modules, before any code of ours runs in them. The
interruption is the parent's to handle: it ends with ``tools/NAME.py: error: interrupted``
(``reid_jax.cli``) and shuts its pool down, which cancels what is queued and stops the workers.
So workers are started with SIGINT ignored: a process started while SIGINT is ignored keeps it
ignored (``exec`` keeps an ignored signal, and Python installs its Ctrl-C handler only where
SIGINT has its default action). See docs/design.md, 'Errors a user sees'.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def workers_ignore_ctrl_c() -> Iterator[None]:
    """Processes started inside the ``with`` ignore SIGINT for their whole life.

    Only the main thread can change a signal's handler; elsewhere this does nothing. A Ctrl-C
    that arrives inside the ``with`` (the few milliseconds of starting a process) is ignored by
    this process too.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


__all__ = ["workers_ignore_ctrl_c"]
