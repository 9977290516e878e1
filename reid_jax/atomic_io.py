"""Atomic writes: a reader sees the old file (or set of files) or the new one, never half.

Single files: every function writes into a temporary file in the destination's folder (created
if missing), flushes it to disk (``fsync``), moves it over the destination with ``os.replace``
(atomic on POSIX within one file system) and syncs the folder, so the new name survives a
crash too. If writing fails, the temporary file is removed, the old file (if any) is left as it
was and the error propagates. A temporary file left by a killed writer (its process is gone) is
removed by the next write of the same destination. Each returns the absolute path written.

Sets of outputs that must change together (an explanation run's JSONL, summary and report):
:class:`ResultSet` (``docs/design.md``, "Outputs").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from absl import logging

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


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> str:
    """``path`` as an absolute path, or a ``NotADirectoryError`` naming the file in the way
    when ``path`` or a folder above it is a file (checked before any work; nothing is made)."""
    path = os.path.abspath(os.fspath(path))
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        where = "is a file" if probe == path else f"cannot be made: {probe} is a file"
        raise NotADirectoryError(f"{what} {path} {where}, not a folder")
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (signal 0 probes without signalling)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def _pid_of(name: str, prefix: str) -> int | None:
    """The pid in ``<prefix><pid>.<random>...``; None when the name is not of that form."""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def remove_stale(folder: str, prefix: str) -> list[str]:
    """Removes entries ``<prefix><pid>...`` of ``folder`` whose process is gone (files or
    folders a killed writer left behind); returns the paths removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        pid = _pid_of(name, prefix)
        if pid is None or pid_alive(pid):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        removed.append(path)
    return removed


def fsync_folder(folder: str) -> None:
    """Flushes a folder's entries (a rename into it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    prefix = f".{os.path.basename(path)}."
    remove_stale(folder, prefix)
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}.", suffix=".tmp", dir=folder)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_folder(folder)
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


# ---------------------------------------------------------------------------------------------
# Sets of outputs published together.


class ResultSet:
    """Outputs (files and folders) of one run that a reader must see complete and together.

    Layout in ``output_dir``::

        NAME                -> .reid_jax/current/NAME     (a symbolic link per output)
        .reid_jax/current   -> sets/<stamp>               (the published set)
        .reid_jax/sets/<stamp>/NAME ...
        .reid_jax/staging-<pid>-<random>/                 (a run in progress)

    A run writes its outputs into :meth:`staging` and :meth:`publish` renames the finished
    folder into ``sets/`` and swaps the ``current`` link with one ``os.replace``: at every
    instant ``output_dir/NAME`` resolves into a complete previous set or a complete new one,
    also when the process is killed. A run that fails or is interrupted removes its staging
    folder; one that is killed leaves it, and the next run removes it (its pid is gone), as it
    removes sets no longer published. An entry ``NAME`` that this mechanism did not make (a
    user's folder, an older layout) is never replaced silently: :meth:`check` refuses, naming
    it and the flag that allows replacing; with ``overwrite`` it is moved aside to
    ``NAME.replaced-<stamp>``, not deleted. One run at a time may write into a folder (a lock).
    """

    FOLDER = ".reid_jax"

    def __init__(self, output_dir: str | os.PathLike, names: Sequence[str], *,
                 overwrite: bool = False, overwrite_flag: str = "--overwrite"):
        self.output_dir = os.path.abspath(os.fspath(output_dir))
        self.names = tuple(names)
        self.overwrite = overwrite
        self.overwrite_flag = overwrite_flag
        self.home = os.path.join(self.output_dir, self.FOLDER)

    def _link_target(self, name: str) -> str:
        return os.path.join(self.FOLDER, "current", name)

    def is_ours(self, name: str) -> bool:
        path = os.path.join(self.output_dir, name)
        return os.path.islink(path) and os.readlink(path) == self._link_target(name)

    def foreign(self) -> list[str]:
        """Paths of existing outputs this mechanism did not make."""
        return [os.path.join(self.output_dir, n) for n in self.names
                if os.path.lexists(os.path.join(self.output_dir, n)) and not self.is_ours(n)]

    def check(self) -> None:
        """Raises ``FileExistsError`` before any work when an output would replace something
        this mechanism did not write (unless ``overwrite``)."""
        check_output_folder(self.output_dir)
        found = self.foreign()
        if found and not self.overwrite:
            raise FileExistsError(
                f"{found[0]} exists and was not written by this tool"
                + (f" (nor {', '.join(found[1:])})" if found[1:] else "")
                + f"; choose another output folder, or pass {self.overwrite_flag} to replace it "
                "(it is moved aside to NAME.replaced-<time>, not deleted)")

    def clean_stale(self) -> None:
        """Removes what killed runs left: staging folders of gone processes, unpublished sets,
        and the staging folders of this tool's older layout (``.explain-staging-*``)."""
        remove_stale(self.home, "staging-")
        for name in os.listdir(self.output_dir) if os.path.isdir(self.output_dir) else ():
            if name.startswith(".explain-staging-"):
                shutil.rmtree(os.path.join(self.output_dir, name), ignore_errors=True)
        sets = os.path.join(self.home, "sets")
        current = os.path.join(self.home, "current")
        live = os.path.basename(os.readlink(current)) if os.path.islink(current) else None
        if os.path.isdir(sets):
            for name in os.listdir(sets):
                if name != live:
                    shutil.rmtree(os.path.join(sets, name), ignore_errors=True)

    @contextlib.contextmanager
    def staging(self) -> Iterator[str]:
        """A locked staging folder; :meth:`publish` it inside the ``with``. Whatever happens
        before, the staging folder is removed (and the folder left as it was)."""
        self.check()
        os.makedirs(self.home, exist_ok=True)
        lock = open(os.path.join(self.home, "lock"), "w")  # noqa: SIM115 (held for the run)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise FileExistsError(f"another run is writing into {self.output_dir}; "
                                          "wait for it or choose another output folder") from None
                raise
            self.clean_stale()
            path = tempfile.mkdtemp(prefix=f"staging-{os.getpid()}-", dir=self.home)
            public_mode(path, folder=True)  # the published set is read as a plain folder
            try:
                yield path
            finally:
                shutil.rmtree(path, ignore_errors=True)
        finally:
            lock.close()
            if not os.path.islink(os.path.join(self.home, "current")):
                # Nothing was ever published here: leave no trace of the attempt.
                shutil.rmtree(self.home, ignore_errors=True)

    def publish(self, staging: str) -> None:
        """Makes the complete ``staging`` folder the published set (one atomic link swap)."""
        missing = [n for n in self.names if not os.path.lexists(os.path.join(staging, n))]
        if missing:
            raise ValueError(f"cannot publish {staging}: it lacks {missing}")
        # The set is named for its time and its staging folder, whose name is unique: two
        # runs of one process within one second must not aim at the same set.
        stamp = (time.strftime("%Y%m%d-%H%M%S") + "-"
                 + os.path.basename(os.path.normpath(staging)).removeprefix("staging-"))
        sets = os.path.join(self.home, "sets")
        os.makedirs(sets, exist_ok=True)
        target = os.path.join(sets, stamp)
        os.rename(staging, target)
        fsync_folder(sets)
        link = os.path.join(self.home, f"current.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.remove(link)
        os.symlink(os.path.join("sets", stamp), link)
        os.replace(link, os.path.join(self.home, "current"))
        fsync_folder(self.home)
        for name in self.names:
            if self.is_ours(name):
                continue
            path = os.path.join(self.output_dir, name)
            if os.path.lexists(path):  # foreign, and overwrite was given (check() passed)
                aside = f"{path}.replaced-{stamp}"
                os.rename(path, aside)
                logging.warning("moved %s aside to %s (%s)", path, aside, self.overwrite_flag)
            os.symlink(self._link_target(name), path)
        fsync_folder(self.output_dir)
        self.clean_stale()
