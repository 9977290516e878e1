"""Fixtures shared by the test files, built once per pytest run.

* ``tiny_dataset`` — a tiny synthetic Market-1501-shaped folder (``TINY_DATASET``);
* ``tiny_run`` — ``tools/train.py`` with ``configs/agw_tiny.py`` on it, then
  ``tools/train_attributes.py``: a real, trained checkpoint with an attribute head.

With ``pytest -n N`` (xdist) every worker is a process of its own; the first one to ask builds
the fixture under a file lock in the run's shared temporary folder and the others reuse it, so
each is built once per run, not once per file or worker. Tests must not modify them: copy
what you change (``copy_tree``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]

# One persistent JAX compilation cache for the whole run: the xdist workers and every tool the
# tests start in a subprocess compile the same functions (the tiny models' initialisers, forward
# and train steps); sharing the compiled code cuts the suite's time several-fold. Set before
# anything imports jax; child processes inherit it through the environment.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import filelock  # noqa: E402
import pytest  # noqa: E402

from reid_jax import synthetic  # noqa: E402

TINY_DATASET = synthetic.DatasetConfig(num_train_ids=8, num_test_ids=6, images_per_id=6,
                                       num_distractors=4, num_junk=2, seed=3)
TINY_EPOCHS = 2


def tool_env() -> dict[str, str]:
    """The environment of a child ``python tools/X.py``: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)  # a test's virtual devices are not the tools'
    return env


def file_bytes(root: str | os.PathLike) -> dict[str, bytes]:
    """Every file below ``root`` as ``{path relative to root: bytes}``."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def run_tool(name: str, *args: str, expect_ok: bool = True,
             timeout: float = 900) -> subprocess.CompletedProcess:
    """Runs ``tools/<name>`` as a user would; asserts success unless ``expect_ok=False``."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / name), *args],
                          capture_output=True, text=True, cwd=REPO, env=tool_env(),
                          timeout=timeout)
    if expect_ok:
        assert proc.returncode == 0, (f"{name} failed:\n{proc.stdout[-2000:]}\n"
                                      f"{proc.stderr[-4000:]}")
    return proc


@contextlib.contextmanager
def _shared(tmp_path_factory: pytest.TempPathFactory, worker_id: str, name: str
            ) -> Iterator[tuple[pathlib.Path, bool]]:
    """``(folder, ready)`` of a fixture shared by all workers of this run, held under a lock.

    ``ready`` says a ``done.json`` marks it complete; otherwise build it and call ``_done``.
    """
    base = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        base = base.parent  # the run's folder, shared by the workers' own folders
    folder = base / f"shared-{name}"
    with filelock.FileLock(str(folder) + ".lock"):
        yield folder, (folder / "done.json").is_file()


def _done(folder: pathlib.Path, info: dict[str, Any]) -> None:
    (folder / "done.json").write_text(json.dumps(info))


def _build_once(tmp_path_factory, worker_id: str, name: str,
                build: Callable[[pathlib.Path], dict[str, Any]]) -> dict[str, Any]:
    with _shared(tmp_path_factory, worker_id, name) as (folder, ready):
        if not ready:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            _done(folder, build(folder))
        return json.loads((folder / "done.json").read_text())


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, worker_id) -> str:
    """Path of a tiny synthetic dataset (``TINY_DATASET``); read only."""
    def build(folder: pathlib.Path) -> dict[str, Any]:
        root = folder / "market"
        synthetic.generate_dataset(root, TINY_DATASET)
        return {"root": str(root)}

    return _build_once(tmp_path_factory, worker_id, "tiny-dataset", build)["root"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id, tiny_dataset) -> dict[str, str]:
    """A trained tiny run on ``tiny_dataset``, with an attribute head; read only.

    ``{"data": data root, "workdir": the training workdir, "checkpoint": WORKDIR/checkpoints}``.
    """
    def build(folder: pathlib.Path) -> dict[str, Any]:
        workdir = folder / "train"
        run_tool("train.py", f"--config={REPO / 'configs' / 'agw_tiny.py'}",
                 f"--workdir={workdir}", f"--config.data.root={tiny_dataset}",
                 f"--config.num_epochs={TINY_EPOCHS}")
        checkpoint = workdir / "checkpoints"
        run_tool("train_attributes.py", f"--checkpoint={checkpoint}",
                 f"--data_root={tiny_dataset}", "--epochs=20", "--lr=1e-2")
        return {"data": tiny_dataset, "workdir": str(workdir), "checkpoint": str(checkpoint)}

    return _build_once(tmp_path_factory, worker_id, "tiny-run", build)


@pytest.fixture
def copy_tree(tmp_path) -> Callable[[str], str]:
    """``copy_tree(src)`` copies a shared fixture folder into this test's own folder."""
    def copy(src: str) -> str:
        dst = tmp_path / os.path.basename(os.fspath(src).rstrip(os.sep))
        shutil.copytree(src, dst)
        return str(dst)

    return copy
