"""A new user's mistakes and interruptions: one clear line, and nothing the user had is lost.

Each test reproduces one fault as a user meets it (through the command-line tools where that is
how it is met) and checks the message and that earlier results survive.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile

import jax
import numpy as np
import pytest
from conftest import REPO, run_tool

from reid_jax import atomic_io, checkpoints, cli, embeddings
from reid_jax.explain import run as explain_run
from reid_jax.train import attribute_training


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_one_line_error(proc: subprocess.CompletedProcess, tool: str, *needles: str,
                          logged_tracebacks: bool = False) -> str:
    """The tool failed with ``tools/<tool>: error: ...`` as its last line and no traceback
    (``logged_tracebacks``: a library may have logged some before, e.g. orbax's writer)."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    if not logged_tracebacks:
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "sys.meta_path is None" not in proc.stderr
    line = _last_line(proc)
    assert line.startswith(f"tools/{tool}: error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in line, line
    return line


# --------------------------------------------------------------------------------------------
# Data loss: explanation outputs.


def _market_inputs(root, seed=0):
    """Precomputed embeddings for the tiny dataset (the explain run without a model)."""
    from reid_jax.data.market1501 import load_market1501

    data = load_market1501(root)
    rng = np.random.default_rng(seed)
    fq = rng.normal(size=(len(data.query), 16)).astype(np.float32)
    fg = rng.normal(size=(len(data.gallery), 16)).astype(np.float32)
    w = rng.normal(size=(16, 30)).astype(np.float32)
    return dict(data_root=root, query_embeddings=fq, gallery_embeddings=fg, weights=w, k=3,
                report_queries=2, progress=False)


def test_library_info_lines_are_left_out_unless_verbose():
    """orbax's INFO records are dropped (warnings kept, other modules kept); ``-v 1`` keeps all."""
    import logging as std_logging

    from absl import logging

    cli.quiet_library_logs()
    cli.quiet_library_logs()  # idempotent: one filter
    logger = logging.get_absl_logger()
    filters = [f for f in logger.filters if isinstance(f, cli._LibraryChatter)]
    assert len(filters) == 1

    def record(path: str, level: int, msg: str = "message") -> std_logging.LogRecord:
        return std_logging.LogRecord("absl", level, path, 1, msg, None, None)

    orbax = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "checkpoint_manager.py")
    ours = os.path.join(os.sep, "reid_jax", "checkpoints.py")
    keep = filters[0].filter
    # Restored as it was: set_verbosity would pin the absl logger's level where it may have
    # been unset, and a later test's caplog would see none of its INFO records.
    old_level = logger.level
    try:
        logging.set_verbosity(logging.INFO)
        assert not keep(record(orbax, std_logging.INFO))
        assert not keep(record(orbax, std_logging.WARNING, "Given directory is read only=/x"))
        assert keep(record(orbax, std_logging.WARNING)) and keep(record(ours, std_logging.INFO))
        logging.set_verbosity(1)
        assert keep(record(orbax, std_logging.INFO))
    finally:
        logger.setLevel(old_level)


def test_a_foreign_report_folder_is_refused_not_deleted(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    (out / "report").mkdir(parents=True)
    (out / "report" / "thesis.tex").write_text("my thesis")
    with pytest.raises(FileExistsError, match=r"report exists and was not written by this tool"
                                              r".*--overwrite"):
        explain_run.run(output_dir=out, **_market_inputs(tiny_dataset))
    assert (out / "report" / "thesis.tex").read_text() == "my thesis"
    # With overwrite it is moved aside, never deleted.
    explain_run.run(output_dir=out, overwrite=True, **_market_inputs(tiny_dataset))
    aside = [p for p in os.listdir(out) if p.startswith("report.replaced-")]
    assert len(aside) == 1 and (out / aside[0] / "thesis.tex").read_text() == "my thesis"
    assert (out / "report" / "index.html").is_file()


def test_an_output_folder_through_a_file_is_named_before_any_work(tiny_dataset, tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("mine")
    with pytest.raises(NotADirectoryError, match=f"output folder {a_file} is a file, not a "
                                                 "folder"):
        explain_run.run(output_dir=a_file, **_market_inputs(tiny_dataset))
    proc = run_tool("make_synthetic.py", f"--output_dir={a_file}/data", "--num_train_ids=1",
                    "--num_test_ids=1", expect_ok=False)
    assert_one_line_error(proc, "make_synthetic.py", f"--output_dir {a_file}/data cannot be "
                          f"made: {a_file} is a file, not a folder")
    proc = run_tool("make_synthetic.py", f"--output_dir={tmp_path}/data", "--num_train_ids=1",
                    "--num_test_ids=1", f"--contact_sheet={a_file}/sheet.png", expect_ok=False)
    assert_one_line_error(proc, "make_synthetic.py", f"the folder of --contact_sheet {a_file} "
                          "is a file, not a folder")
    assert not (tmp_path / "data").exists()  # refused before the dataset was drawn
    assert a_file.read_text() == "mine"


def test_publishing_swaps_complete_sets_and_cleans_killed_runs(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    first = explain_run.run(output_dir=out, **_market_inputs(tiny_dataset, seed=0))
    records = explain_run.read_jsonl(first.jsonl)
    # What a killed run leaves: a staging folder of a process that is gone, and the staging
    # folders of the older layout.
    home = out / atomic_io.ResultSet.FOLDER
    dead = home / "staging-999999999-x"
    (dead / "report").mkdir(parents=True)
    (out / ".explain-staging-old").mkdir()
    second = explain_run.run(output_dir=out, **_market_inputs(tiny_dataset, seed=1))
    assert not dead.exists() and not (out / ".explain-staging-old").exists()
    assert explain_run.read_jsonl(second.jsonl) != records
    # One published set; the outputs are links into it; the report's links resolve.
    assert len(os.listdir(home / "sets")) == 1
    for name in ("explanations.jsonl", "summary.json", "report"):
        assert os.path.islink(out / name)
    assert os.path.isfile(out / "report" / ".." / "explanations.jsonl")
    # Between the swap's two states a reader sees one whole set: the link target changes in
    # one rename, and both the summary and the JSONL come from the same set.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_queries"] == len(explain_run.read_jsonl(out / "explanations.jsonl"))


def test_a_second_run_into_the_same_folder_waits_for_none(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    explain_run.run(output_dir=out, **_market_inputs(tiny_dataset))
    import fcntl

    with open(out / atomic_io.ResultSet.FOLDER / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(FileExistsError, match="another run is writing into"):
            explain_run.run(output_dir=out, **_market_inputs(tiny_dataset))


def test_atomic_writes_sync_and_clean_their_dead_temporaries(tmp_path, monkeypatch):
    target = tmp_path / "f.npz"
    stale = tmp_path / ".f.npz.999999999.abc.tmp"  # a writer killed mid-write
    stale.write_bytes(b"half")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    atomic_io.save_npz(target, {"x": np.arange(3)})
    assert not stale.exists()
    assert len(synced) >= 2  # the file, then its folder
    with np.load(target) as z:
        assert z["x"].tolist() == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# Crashes and misdiagnoses.


def _truncate(path, size=100):
    with open(path, "r+b") as f:
        f.truncate(size)


def test_a_truncated_embedding_cache_is_recomputed(tmp_path, caplog):
    cache = tmp_path / "gallery.npz"
    key = {"paths": ["a.jpg", "b.jpg"]}
    compute = lambda: {"features": np.ones((2, 3), np.float32)}
    embeddings.cached_embeddings(cache, key, compute)
    _truncate(cache)
    with pytest.raises(zipfile.BadZipFile):
        np.load(cache)
    out = embeddings.cached_embeddings(cache, key, compute)
    assert out["features"].shape == (2, 3)
    assert "unreadable" in caplog.text


def test_a_truncated_features_file_is_named_in_one_line(tmp_path):
    path = tmp_path / "gallery.npz"
    np.savez(path, paths=np.asarray(["a.jpg"]), features=np.ones((1, 4), np.float32))
    _truncate(path)
    np.save(tmp_path / "w.npy", np.ones((4, 30), np.float32))
    proc = run_tool("analyze.py", f"--weights={tmp_path / 'w.npy'}", f"--features={path}",
                    f"--output_dir={tmp_path / 'a'}", expect_ok=False)
    assert_one_line_error(proc, "analyze.py", str(path), "not a readable .npz")


def test_only_committed_steps_count(tiny_run, copy_tree):
    ckpt = copy_tree(tiny_run["checkpoint"])
    latest = checkpoints.latest_step(ckpt)
    os.mkdir(os.path.join(ckpt, "9999"))  # an interrupted save, or a folder made by hand
    assert checkpoints.latest_step(ckpt) == latest
    assert checkpoints.uncommitted_steps(ckpt) == [9999]
    assert checkpoints.has_attribute_head(ckpt)
    head = checkpoints.restore_attribute_head(ckpt)
    assert head.kernel[...].shape[1] == 30
    with pytest.raises(FileNotFoundError, match=r"step 9999 is an incomplete save"):
        checkpoints.restore_meta(ckpt, 9999)


def test_a_damaged_newest_step_is_named_with_the_previous_one(tiny_run, copy_tree, tmp_path):
    ckpt = copy_tree(tiny_run["checkpoint"])
    steps = checkpoints.committed_steps(ckpt)
    newest = os.path.join(ckpt, str(steps[-1]), checkpoints.MODEL_ITEM)
    for base, _, files in os.walk(newest):
        for f in files:
            if os.path.getsize(os.path.join(base, f)) > 200:
                _truncate(os.path.join(base, f))
    with pytest.raises(checkpoints.DamagedCheckpointError,
                       match=rf"step {steps[-1]}: its model weights cannot be read .*"
                             rf"--step={steps[-2]}"):
        checkpoints.restore_model(ckpt, None)
    proc = run_tool("evaluate.py", f"--checkpoint={ckpt}", f"--data_root={tiny_run['data']}",
                    f"--output={tmp_path / 'e.json'}", "--cache_dir=", expect_ok=False)
    assert_one_line_error(proc, "evaluate.py", f"--step={steps[-2]}")


@pytest.mark.parametrize("tool, args, needles", [
    ("train.py", ["--config=configs/agw_tiny.py", "--workdir={tmp}/w", "--config.optim.lr=0.1"],
     ["--config.optim.lr", "config.optim has no field 'lr'", "config.optim.learning_rate"]),
    ("train.py", ["--config=configs/nope.py", "--workdir={tmp}/w"],
     ["config file", "configs/nope.py does not exist"]),
    ("train.py", ["--config=configs/agw_tiny.py", "--workdir={tmp}/w"],
     ["config.data.root is empty"]),
    ("evaluate.py", ["--checkpoint={tmp}/none", "--data_root={tmp}"],
     ["{tmp}/none"]),
    ("train_attributes.py", ["--checkpoint={tmp}/none", "--data_root={tmp}"],
     ["{tmp}/none"]),
    ("extract_features.py", ["--checkpoint={tmp}/none", "--image_dir={tmp}/no_images",
                             "--output={tmp}/f.npz"], ["{tmp}/no_images"]),
    ("explain.py", ["--checkpoint={tmp}/none", "--output_dir={tmp}/o", "--data_root={tmp}",
                    "--k=0"], ["{tmp}/none does not exist"]),
    ("evaluate_explanations.py", ["--checkpoint={tmp}/none", "--output_dir={tmp}/o",
                                  "--data_root={tmp}/missing"], ["{tmp}/missing"]),
])
def test_user_errors_are_one_line(tool, args, needles, tmp_path):
    tmp = str(tmp_path)
    proc = run_tool(tool, *(a.format(tmp=tmp) for a in args), expect_ok=False)
    assert_one_line_error(proc, tool, *(n.format(tmp=tmp) for n in needles))


def test_config_field_messages():
    from configs import agw_tiny

    config = agw_tiny.get_config()
    assert cli.unknown_config_field(config, "optim.learning_rate") is None
    message = cli.unknown_config_field(config, "optim.lr")
    assert "config.optim has no field 'lr'" in message and "learning_rate" in message
    assert "config has no field 'modle'; did you mean config.model" in cli.unknown_config_field(
        config, "modle.width")


def test_a_diverging_head_is_not_saved(tiny_run, copy_tree):
    ckpt = copy_tree(tiny_run["checkpoint"])
    metrics = os.path.join(ckpt, attribute_training.METRICS_FILE)
    before_steps = checkpoints.committed_steps(ckpt)
    before_metrics = open(metrics).read() if os.path.exists(metrics) else None
    proc = run_tool("train_attributes.py", f"--checkpoint={ckpt}",
                    f"--data_root={tiny_run['data']}", "--lr=1e30", "--epochs=3",
                    expect_ok=False)
    assert_one_line_error(proc, "train_attributes.py", "diverged", "nothing was saved")
    assert checkpoints.committed_steps(ckpt) == before_steps
    after = open(metrics).read() if os.path.exists(metrics) else None
    assert after == before_metrics


def test_disk_full_is_the_last_line_and_checkpoints_survive(tiny_dataset, tmp_path):
    """Training into a tiny file system: the last line says the disk is full."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        proc = run_tool("train.py", f"--config={REPO / 'configs' / 'agw_tiny.py'}",
                        f"--workdir={mount}/w", f"--config.data.root={tiny_dataset}",
                        "--config.num_epochs=3", "--config.checkpoint_every_steps=1",
                        expect_ok=False)
        line = assert_one_line_error(proc, "train.py", "no space left on device",
                                     logged_tracebacks=True)
        assert "free space and run the same command again" in line
        ckpt = f"{mount}/w/checkpoints"
        for step in checkpoints.committed_steps(ckpt):
            checkpoints.restore_meta(ckpt, step)  # every committed step reads back
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_thread_tracebacks_wait_for_the_one_line_error(capsys, monkeypatch):
    """A background thread's traceback is printed under the lock the fatal one-line error holds
    to the end, so it can neither interleave with that line nor follow it."""
    monkeypatch.setattr(threading, "excepthook", cli._thread_excepthook)

    def fails() -> None:
        raise RuntimeError("Event loop is closed")

    with cli._STDERR_LOCK:  # as _report holds it while it prints the line and exits
        thread = threading.Thread(target=fails)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # its report waits for the lock
        assert "Event loop is closed" not in capsys.readouterr().err
    thread.join(10)
    assert not thread.is_alive()
    assert "RuntimeError: Event loop is closed" in capsys.readouterr().err


def test_disk_full_line_stays_last_while_other_threads_write_to_stderr(tmp_path):
    """The one-line error ends the output and the program (status 1) while other threads keep
    writing to the stderr file descriptor, as the storage library's do while it shuts down."""
    script = tmp_path / "chatty.py"
    script.write_text(textwrap.dedent("""
        import errno, os, sys, threading, time
        from reid_jax import cli

        def chatter():
            while True:
                os.write(2, b"Traceback (most recent call last):\\nRuntimeError: loop closed\\n")

        def main(argv):
            for _ in range(3):
                threading.Thread(target=chatter, daemon=True).start()
            time.sleep(0.2)
            raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/w")

        cli.run(main)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "RuntimeError: loop closed" in proc.stderr  # the threads did write before it
    assert _last_line(proc) == ("chatty.py: error: no space left on device while writing "
                                "/ckpt/w; free space and run the same command again (finished "
                                "files and committed checkpoints are intact)")


def test_ctrl_c_in_a_garbage_collection_callback_is_the_one_line_too(tmp_path):
    """Ctrl-C that lands in a finaliser (JAX runs a callback at every garbage collection) is
    not printed by Python as "Exception ignored in ..." with a traceback; other errors there
    still are."""
    script = tmp_path / "drawing.py"
    script.write_text(textwrap.dedent("""
        from reid_jax import cli

        class Interrupted:
            def __del__(self):
                raise KeyboardInterrupt

        class Broken:
            def __del__(self):
                raise RuntimeError("a finaliser's own bug")

        def main(argv):
            Broken()
            Interrupted()
            raise KeyboardInterrupt

        cli.run(main)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert _last_line(proc) == "drawing.py: error: interrupted"
    assert proc.stderr.count("Exception ignored") == 1, proc.stderr
    assert "RuntimeError: a finaliser's own bug" in proc.stderr
    assert "KeyboardInterrupt" not in proc.stderr


def test_workers_started_for_a_tool_leave_ctrl_c_to_it():
    """Spawned workers (figures, renders) ignore SIGINT for life, so a terminal's Ctrl-C, sent
    to the whole process group, leaves the one line of the tool and no worker tracebacks; the
    tool's own handler is back after the start."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from reid_jax import interrupts

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        with interrupts.workers_ignore_ctrl_c():
            started_inside = pool.submit(signal.getsignal, signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert started_inside.result(timeout=120) == signal.SIG_IGN
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:  # without: Python's Ctrl-C handler
        assert pool.submit(signal.getsignal, signal.SIGINT).result(timeout=120) is (
            signal.default_int_handler)
    done = []
    thread = threading.Thread(target=lambda: done.append(  # not the main thread: no change
        interrupts.workers_ignore_ctrl_c().__enter__()))
    thread.start()
    thread.join(10)
    assert done == [None] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_analyze_keeps_one_set_of_figures_and_names_num_selective(tmp_path):
    from reid_jax import analysis
    from reid_jax.data.attributes import ATTRIBUTE_NAMES

    rng = np.random.default_rng(0)
    w = rng.normal(size=(12, 30))
    images = []
    for i in range(4):
        path = tmp_path / f"000{i + 1}_c1s1_000001_01.jpg"
        from PIL import Image

        Image.fromarray(np.full((128, 64, 3), 40 * i, np.uint8)).save(path)
        images.append(str(path))
    f = rng.normal(size=(4, 12))
    out = tmp_path / "a"
    analysis.write_analysis(w, ATTRIBUTE_NAMES, out, features=f, image_paths=images,
                            components=[1, 2], num_images=2)
    analysis.write_analysis(w, ATTRIBUTE_NAMES, out, features=f, image_paths=images,
                            components=[3], num_images=2)
    assert sorted(p for p in os.listdir(out) if p.startswith("component_")) == ["component_3.png"]
    with pytest.raises(ValueError, match="num_selective must be a positive integer"):
        analysis.write_analysis(w, ATTRIBUTE_NAMES, out, features=f, image_paths=images,
                                num_selective=0)


def test_thresholds_are_printed_as_written():
    from reid_jax import explain

    with pytest.raises(ValueError, match=r"got -0\.1$"):
        explain.confident_attributes(np.full(30, 0.5, np.float32), np.float32(-0.1))


# --------------------------------------------------------------------------------------------
# Training: interruptions, a diverging loss, a refused run.


def _train_cmd(data: str, workdir: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "train.py"),
            f"--config={REPO / 'configs' / 'agw_tiny.py'}", f"--workdir={workdir}",
            f"--config.data.root={data}", *extra]


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_training_saves_its_step_and_resumes(tiny_dataset, tmp_path, signum,
                                                             status):
    from conftest import tool_env

    workdir = tmp_path / "w"
    proc = subprocess.Popen(
        _train_cmd(tiny_dataset, str(workdir), "--config.num_epochs=50",
                   "--config.checkpoint_every_steps=1000", "--config.log_every_steps=1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tool_env(), cwd=REPO)
    lines = []
    for line in proc.stderr:  # wait until training runs, then interrupt it
        lines.append(line)
        if "first step (with compilation)" in line:
            break
    time.sleep(1.0)
    proc.send_signal(signum)
    _, rest = proc.communicate(timeout=600)
    stderr = "".join(lines) + rest
    assert proc.returncode == status, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("tools/train.py: stopped by SIG"), stderr[-2000:]
    assert "run the same command to resume" in last and "Traceback" not in stderr
    ckpt = str(workdir / "checkpoints")
    saved = checkpoints.committed_steps(ckpt)
    assert len(saved) == 1 and f"step {saved[0]}:" in last and 0 < saved[0] < 1000
    # The same command resumes from that step.
    meta = checkpoints.restore_meta(ckpt, saved[0])
    assert meta["step"] == saved[0]
    resumed = run_tool("train.py", f"--config={REPO / 'configs' / 'agw_tiny.py'}",
                       f"--workdir={workdir}", f"--config.data.root={tiny_dataset}",
                       "--config.num_epochs=50", f"--config.num_train_steps={saved[0] + 2}")
    assert f"resumed from {ckpt} step {saved[0]}" in resumed.stderr
    assert checkpoints.latest_step(ckpt) == saved[0] + 2


def test_the_nan_message_names_the_checkpoint_that_exists():
    from reid_jax.train import loop

    with pytest.raises(FloatingPointError, match="no checkpoint has been saved yet"):
        loop.check_finite(3, {"loss": float("nan")}, None)
    with pytest.raises(FloatingPointError, match="the last checkpoint, step 2, is intact"):
        loop.check_finite(3, {"loss": float("nan")}, 2)


def test_a_refused_training_leaves_no_workdir(tiny_dataset, tmp_path):
    workdir = tmp_path / "never"
    proc = run_tool("train.py", f"--config={REPO / 'configs' / 'agw_tiny.py'}",
                    f"--workdir={workdir}", f"--config.data.root={tiny_dataset}",
                    "--config.data.pad=-3", expect_ok=False)
    assert_one_line_error(proc, "train.py", "pad must be >= 0")
    assert not workdir.exists()


def test_training_resumes_past_a_stray_step_folder(tiny_run, copy_tree):
    workdir = copy_tree(tiny_run["workdir"])
    ckpt = os.path.join(workdir, "checkpoints")
    latest = checkpoints.latest_step(ckpt)
    os.mkdir(os.path.join(ckpt, "9999"))
    proc = run_tool("train.py", f"--config={REPO / 'configs' / 'agw_tiny.py'}",
                    f"--workdir={workdir}", f"--config.data.root={tiny_run['data']}",
                    f"--config.num_train_steps={latest + 2}")
    assert f"resumed from {ckpt} step {latest}" in proc.stderr
    assert "have no commit record" in proc.stderr
    assert checkpoints.latest_step(ckpt) == latest + 2


# --------------------------------------------------------------------------------------------
# Silent wrong results of the kernels.


def _unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_kernels_check_their_inputs_by_default():
    from reid_jax import explain

    rng = np.random.default_rng(0)
    fq, fg = _unit_rows(rng, 3, 16), _unit_rows(rng, 20, 16)
    w = rng.standard_normal((16, 30)).astype(np.float32)
    nan_query = fq.copy()
    nan_query[1, 4] = np.nan
    with pytest.raises(ValueError, match=r"f_query \(shape \(3, 16\)\) has 1 non-finite"):
        explain.explain_rankings(nan_query, fg, w, k=3)
    inf_row = fg.copy()
    inf_row[7] = np.inf
    with pytest.raises(ValueError, match=r"f_gallery .* first at index \(7, 0\)"):
        explain.explain_rankings(fq, inf_row, w, k=3)
    bad_w = w.copy()
    bad_w[2] = np.nan
    with pytest.raises(ValueError, match=r"weights .* non-finite"):
        explain.attribute_errors(fq, fg, bad_w, complete=True)
    # Opting out is possible (and is what runs inside jit / vmap, where values are unknown).
    out = explain.explain_rankings(nan_query, fg, w, k=3, validate=False)
    assert np.isinf(np.asarray(out.distances)[1]).all()
    jitted = jax.jit(lambda a: explain.explain_rankings(a, fg, w, k=3).distances)
    assert np.isinf(np.asarray(jitted(nan_query))[1]).all()


def test_bfloat16_inputs_are_computed_in_float32(caplog):
    import jax.numpy as jnp

    from reid_jax import explain
    from reid_jax.explain import kernels

    rng = np.random.default_rng(1)
    fq, fg = _unit_rows(rng, 4, 64), _unit_rows(rng, 300, 64)
    fg[:40] = fq[0] + 0.003 * _unit_rows(rng, 40, 64)  # near neighbours that bf16 reorders
    w = (0.1 * rng.standard_normal((64, 30))).astype(np.float32)
    kernels._low_precision_warned = False
    low = explain.explain_rankings(jnp.asarray(fq, jnp.bfloat16), jnp.asarray(fg, jnp.bfloat16),
                                   jnp.asarray(w, jnp.bfloat16), k=5)
    assert "computed in float32" in caplog.text
    assert low.distances.dtype == jnp.float32 and low.errors.dtype == jnp.float32
    # The same as float32 kernels on the (exactly widened) bfloat16 values.
    widened = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (fq, fg, w)]
    ref = explain.explain_rankings(*widened, k=5)
    np.testing.assert_array_equal(np.asarray(low.indices), np.asarray(ref.indices))
    np.testing.assert_allclose(np.asarray(low.errors), np.asarray(ref.errors), rtol=1e-6,
                               atol=1e-7)


def test_a_killed_dataset_writer_leaves_nothing_for_the_next_run(tmp_path):
    """A writer killed with SIGKILL cannot clean up; the next run removes its temporary folders
    (those of live processes are kept) and writes the dataset."""
    from reid_jax import synthetic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".data.tmp-{dead.pid}.x1y2", tmp_path / f".data.old-{dead.pid}.z3"]
    live = tmp_path / f".data.tmp-{os.getpid()}.keep"
    for folder in (*stale, live):
        (folder / "bounding_box_train").mkdir(parents=True)
    config = synthetic.DatasetConfig(num_train_ids=2, num_test_ids=2, images_per_id=4,
                                     num_distractors=0, num_junk=0)
    synthetic.generate_dataset(tmp_path / "data", config)
    assert not any(p.exists() for p in stale)
    assert live.exists() and (tmp_path / "data" / "synthetic_meta.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", live.name])
