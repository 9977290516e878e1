"""Tests of reid_jax/atomic_io.py: atomic single-file writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from reid_jax import atomic_io


def test_write_with_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "table_4_1.md"
    atomic_io.write_text(path, "old\n")

    def fail(f):
        f.write("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_io.write_with(path, fail)
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["table_4_1.md"]


def test_write_text_is_utf8_and_returns_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = atomic_io.write_text(os.path.join("new", "t.md"), "AUROC — 50 %\n")
    assert path == os.path.join(str(tmp_path), "new", "t.md")
    with open(path, encoding="utf-8") as f:
        assert f.read() == "AUROC — 50 %\n"


def test_write_json(tmp_path):
    path = atomic_io.write_json(tmp_path / "sub" / "m.json", {"a": 1.5})
    assert json.load(open(path)) == {"a": 1.5}
    assert os.listdir(tmp_path / "sub") == ["m.json"]
    with pytest.raises(ValueError):
        atomic_io.write_json(tmp_path / "sub" / "m.json", {"a": float("nan")})
    assert os.listdir(tmp_path / "sub") == ["m.json"]  # no temporary file left, old file kept
    assert json.load(open(path)) == {"a": 1.5}


def test_write_json_options(tmp_path):
    payload = {"b": [1, 2], "a": float("nan")}
    path = atomic_io.write_json(tmp_path / "m.json", payload, indent=1, sort_keys=True,
                                allow_nan=True)
    text = open(path).read()
    assert text == json.dumps(payload, indent=1, sort_keys=True) + "\n"
    assert text.index('"a"') < text.index('"b"') and "NaN" in text


def test_save_npz_round_trip_and_failure(tmp_path):
    arrays = {"paths": np.asarray(["a.jpg", "b.jpg"]),
              "features": np.arange(6, dtype=np.float32).reshape(2, 3)}
    path = atomic_io.save_npz(tmp_path / "c" / "f.npz", arrays)
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["features", "paths"]
        np.testing.assert_array_equal(z["features"], arrays["features"])
        np.testing.assert_array_equal(z["paths"], arrays["paths"])
    with pytest.raises(TypeError):  # array names must be strings: fails while writing
        atomic_io.save_npz(path, {1: np.zeros(2)})
    assert os.listdir(tmp_path / "c") == ["f.npz"]
    with np.load(path, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["features"], arrays["features"])


def test_save_figure_writes_a_png_of_the_requested_size(tmp_path):
    fig = Figure(figsize=(2.0, 1.0))
    fig.add_subplot().plot([0, 1], [1, 0])
    path = atomic_io.save_figure(fig, tmp_path / "fig.png", dpi=50)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (100, 50)
    assert os.listdir(tmp_path) == ["fig.png"]


def test_written_files_get_the_usual_mode_not_mkstemps_private_one(tmp_path):
    mask = os.umask(0o022)
    try:
        path = atomic_io.write_text(tmp_path / "report.md", "hello")
        assert os.stat(path).st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)


def test_two_result_sets_published_within_one_second_do_not_collide(tmp_path, monkeypatch):
    # One process publishing twice in the same second (a fast tool run twice, or a test)
    # must get two sets; the second replaces the first.
    monkeypatch.setattr(atomic_io.time, "strftime", lambda fmt: "20260101-000000")
    results = atomic_io.ResultSet(tmp_path / "out", ["summary.json"])
    for text in ("first", "second"):
        with results.staging() as staging:
            with open(os.path.join(staging, "summary.json"), "w") as f:
                f.write(text)
            results.publish(staging)
        assert (tmp_path / "out" / "summary.json").read_text() == text
    home = tmp_path / "out" / atomic_io.ResultSet.FOLDER
    assert len(os.listdir(home / "sets")) == 1
    assert not [n for n in os.listdir(home) if n.startswith("staging-")]


def test_a_published_set_is_readable_as_a_plain_folder_is(tmp_path):
    # mkdtemp makes the staging folder 0700; published, it must read as a folder made by mkdir.
    mask = os.umask(0o022)
    try:
        results = atomic_io.ResultSet(tmp_path / "out", ["report"])
        with results.staging() as staging:
            os.mkdir(os.path.join(staging, "report"))
            results.publish(staging)
        target = os.path.realpath(tmp_path / "out" / "report")
        assert os.stat(os.path.dirname(target)).st_mode & 0o777 == 0o755
    finally:
        os.umask(mask)


def test_an_output_folder_through_a_file_is_refused_before_any_work(tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("mine")
    assert atomic_io.check_output_folder(tmp_path / "new" / "deeper") == str(
        tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # nothing is made
    with pytest.raises(NotADirectoryError, match=f"output folder {a_file} is a file, not a "
                                                 "folder"):
        atomic_io.check_output_folder(a_file)
    with pytest.raises(NotADirectoryError, match=f"--output_dir {a_file}/sub cannot be made: "
                                                 f"{a_file} is a file, not a folder"):
        atomic_io.check_output_folder(a_file / "sub", "--output_dir")
    with pytest.raises(NotADirectoryError, match=f"output folder {a_file} is a file"):
        with atomic_io.ResultSet(a_file, ["summary.json"]).staging():
            pass
    assert a_file.read_text() == "mine"
