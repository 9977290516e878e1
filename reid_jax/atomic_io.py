"""Atomic single-file writes: a reader sees the old file or the new one, never half of one.

Every function writes into a temporary file in the destination's folder (created if missing)
and moves it over the destination with ``os.replace`` (atomic on POSIX within one file
system). If writing fails, the temporary file is removed, the old file (if any) is left as it
was and the error propagates. Each returns the absolute path written.

A whole folder of outputs that must change together (``reid_jax.explain.run``'s report) is
a different mechanism: a staging folder moved into place; its single files may still be
written with these functions.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: str | os.PathLike, *, folder: bool = False) -> None:
    """Gives ``path`` the mode a plain ``open`` / ``mkdir`` would (``mkstemp`` and ``mkdtemp``
    create private 0600 / 0700 entries, which ``os.replace`` would carry over)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def write_with(path: str | os.PathLike, write: Callable[[IO[Any]], None], *,
               binary: bool = False) -> str:
    """Calls ``write(file)`` on a temporary file beside ``path``, then renames it to ``path``.

    Args:
      path: the destination; its folder is created if missing.
      write: writes the content into the open file it is given.
      binary: open the file in ``"wb"`` (else ``"w"``, UTF-8).

    Returns:
      The absolute path.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            write(f)
        public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> str:
    """Writes ``text`` (UTF-8) to ``path`` atomically; returns the absolute path."""
    return write_with(path, lambda f: f.write(text))


def write_json(path: str | os.PathLike, payload: Any, *, indent: int = 2,
               sort_keys: bool = False, allow_nan: bool = False) -> str:
    """Writes ``payload`` as JSON (plus a final newline) to ``path`` atomically.

    Args:
      path: the destination.
      payload: JSON-serialisable data.
      indent, sort_keys: as ``json.dump``.
      allow_nan: False (default) raises ``ValueError`` on NaN / infinity (not JSON), leaving
        the old file in place.

    Returns:
      The absolute path.
    """
    def write(f: IO[str]) -> None:
        json.dump(payload, f, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan)
        f.write("\n")

    return write_with(path, write)


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> str:
    """``np.savez`` of ``arrays`` (uncompressed) to ``path`` atomically; returns the path."""
    return write_with(path, lambda f: np.savez(f, **arrays), binary=True)


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 100) -> str:
    """Saves a matplotlib ``Figure`` as PNG to ``path`` atomically; returns the path.

    The figure gets an Agg canvas first, so figures made with ``matplotlib.figure.Figure``
    (no pyplot, no global state) can be saved.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return write_with(path, lambda f: fig.savefig(f, format="png", dpi=dpi), binary=True)
