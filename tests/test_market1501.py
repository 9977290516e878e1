"""Tests for reid_jax.data.market1501: file-name parsing, folder scanning, errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reid_jax.data import market1501 as m

TRAIN = ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0002_c3s1_000551_01.jpg",
         "0007_c1s1_000001_01.jpg", "0007_c5s2_000101_02.jpg",
         "0010_c6s4_001234_01.jpg", "0010_c2s3_000050_01.jpg"]
QUERY = ["0001_c1s1_001051_00.jpg", "0001_c2s1_000301_00.jpg", "0003_c3s1_000101_00.jpg"]
GALLERY = ["0001_c3s1_000551_01.jpg", "0001_c4s1_000201_01.jpg", "0003_c1s1_000001_01.jpg",
           "0003_c6s1_000201_02.jpg", "0005_c2s1_000100_01.jpg",
           "0000_c1s1_000151_01.jpg", "0000_c3s1_000151_02.jpg",
           "-1_c1s1_000401_03.jpg", "-1_c2s1_000401_01.jpg"]


def write_jpeg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (16, 8, 3), dtype=np.uint8)).save(path, quality=90)


def make_market(root: Path, splits: dict[str, list[str]] | None = None) -> Path:
    """A tiny Market-1501-shaped folder (16x8 JPEGs, plus a Thumbs.db and a hidden file)."""
    splits = splits or {"bounding_box_train": TRAIN, "query": QUERY, "bounding_box_test": GALLERY}
    for k, (folder, names) in enumerate(splits.items()):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            write_jpeg(root / folder / name, seed=100 * k + i)
        (root / folder / "Thumbs.db").write_bytes(b"\x00not an image")
        (root / folder / ".DS_Store").write_bytes(b"\x00")
    return root


@pytest.fixture(scope="module")
def market_root(tmp_path_factory) -> Path:
    return make_market(tmp_path_factory.mktemp("market") / "Market-1501-v15.09.15")


@pytest.mark.parametrize("name,expected", [
    ("0002_c1s1_000451_03.jpg", (2, 1, 1, 451, 3)),
    ("-1_c1s1_000401_03.jpg", (-1, 1, 1, 401, 3)),
    ("0000_c6s4_001234_00.jpg", (0, 6, 4, 1234, 0)),
    ("1501_c6s4_001876_02.jpg", (1501, 6, 4, 1876, 2)),
    ("/some/dir/0007_c5s2_000101_02.jpg", (7, 5, 2, 101, 2)),
])
def test_parse_filename(name, expected):
    info = m.parse_filename(name)
    assert info == expected
    assert (info.pid, info.camera, info.sequence, info.frame, info.box) == expected


@pytest.mark.parametrize("name", [
    "0002_c1_000451_03.jpg", "abcd_c1s1_000451_03.jpg", "0002_c1s1_000451.jpg",
    "0002-c1s1-000451-03.jpg", "-2_c1s1_000401_03.jpg", "0002_c1s1_000451_03", "Thumbs.db",
])
def test_parse_filename_rejects(name):
    with pytest.raises(ValueError, match="not a Market-1501 name"):
        m.parse_filename(name)


@pytest.mark.parametrize("camera", [0, 7])
def test_parse_filename_camera_range(camera):
    with pytest.raises(ValueError, match=f"camera {camera} is not in 1..6"):
        m.parse_filename(f"0002_c{camera}s1_000451_03.jpg")


def test_load_counts_and_labels(market_root):
    data = m.load_market1501(market_root)
    assert data.root == str(market_root)
    train, query, gallery = data.train, data.query, data.gallery
    assert (train.name, query.name, gallery.name) == ("train", "query", "gallery")
    # Train: sorted by file name, pids relabelled in ascending pid order.
    assert [os.path.basename(p) for p in train.paths] == sorted(TRAIN)
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in train.paths)
    assert train.pids.tolist() == [2, 2, 2, 7, 7, 10, 10]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert train.pid_to_label == {2: 0, 7: 1, 10: 2}
    assert data.num_train_ids == 3
    assert train.cameras.tolist() == [1, 2, 3, 1, 5, 2, 6]
    assert train.sequences.tolist() == [1, 1, 1, 1, 2, 3, 4]
    assert train.frames.tolist() == [451, 301, 551, 1, 101, 50, 1234]
    for split in (train, query, gallery):
        for array in (split.pids, split.cameras, split.sequences, split.frames, split.labels):
            assert array.dtype == np.int32 and array.shape == (len(split),)
            assert not array.flags.writeable
    # Query / gallery: labels are pids; junk left out, distractors kept in the gallery.
    assert query.pids.tolist() == [1, 1, 3] and query.labels.tolist() == [1, 1, 3]
    assert query.pid_to_label == {1: 1, 3: 3}
    expected_gallery = sorted(n for n in GALLERY if not n.startswith("-1"))
    assert [os.path.basename(p) for p in gallery.paths] == expected_gallery
    assert gallery.pids.tolist() == [0, 0, 1, 1, 3, 3, 5]
    assert gallery.labels.tolist() == gallery.pids.tolist()
    assert (gallery.num_images, gallery.num_ids, gallery.num_distractors) == (7, 3, 2)
    assert gallery.junk_left_out == 2 and train.junk_left_out == 0
    assert (train.num_images, train.num_ids, query.num_ids) == (7, 3, 2)


def test_summary_table(market_root):
    table = m.load_market1501(market_root).summary().splitlines()
    assert table[0] == f"Market-1501 at {market_root}"
    assert table[1].split() == ["split", "images", "ids", "distractors", "junk", "left", "out",
                                "undecodable"]
    assert table[2].split() == ["train", "7", "3", "0", "0", "0"]
    assert table[3].split() == ["query", "3", "2", "0", "0", "0"]
    assert table[4].split() == ["gallery", "7", "3", "2", "2", "0"]


def test_verify_images_passes_on_good_images(market_root):
    data = m.load_market1501(market_root, verify_images=True)
    assert len(data.train) == 7 and data.gallery.undecodable_skipped == ()


def test_distractors_left_out_of_train(tmp_path):
    root = make_market(tmp_path, {"bounding_box_train": TRAIN + ["0000_c1s1_000151_01.jpg"],
                                  "query": QUERY, "bounding_box_test": GALLERY})
    data = m.load_market1501(root)
    assert 0 not in data.train.pids and data.train.distractors_left_out == 1
    assert data.num_train_ids == 3


def test_root_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"root folder not found: {tmp_path / 'nope'}"):
        m.load_market1501(tmp_path / "nope")


def test_split_folder_missing(tmp_path):
    root = make_market(tmp_path, {"bounding_box_train": TRAIN, "query": QUERY})
    with pytest.raises(FileNotFoundError, match=r"lacks the split folders \['bounding_box_test'\]"):
        m.load_market1501(root)


def test_split_folder_missing_hints_release_folder(market_root):
    with pytest.raises(FileNotFoundError, match="did you mean .*Market-1501-v15.09.15"):
        m.load_market1501(market_root.parent)


def test_unparseable_names_listed(tmp_path):
    bad = ["img_001.jpg", "img_002.jpg", "0002_c9s1_000451_03.jpg"]
    root = make_market(tmp_path, {"bounding_box_train": TRAIN + bad, "query": QUERY,
                                  "bounding_box_test": GALLERY})
    with pytest.raises(ValueError, match="bounding_box_train: 3 image file names do not parse") \
            as info:
        m.load_market1501(root)
    assert all(name in str(info.value) for name in bad)


def test_split_without_images(tmp_path):
    root = make_market(tmp_path, {"bounding_box_train": TRAIN, "query": [],
                                  "bounding_box_test": GALLERY})
    with pytest.raises(ValueError, match=r"query: no images for split 'query' \(0 image files"):
        m.load_market1501(root)


def test_split_with_only_junk(tmp_path):
    root = make_market(tmp_path, {"bounding_box_train": TRAIN, "query": QUERY,
                                  "bounding_box_test": ["-1_c1s1_000401_03.jpg"]})
    with pytest.raises(ValueError, match=r"no images for split 'gallery' \(1 image files, 1 junk"):
        m.load_market1501(root)


def test_undecodable_image(tmp_path):
    root = make_market(tmp_path)
    broken = root / "query" / "0003_c3s1_000101_00.jpg"
    broken.write_bytes(broken.read_bytes()[:40])  # A truncated JPEG.
    # Without verification the file is only listed.
    assert len(m.load_market1501(root).query) == 3
    with pytest.raises(ValueError, match=f"image does not decode: {broken}"):
        m.load_market1501(root, verify_images=True)
    data = m.load_market1501(root, verify_images=True, skip_undecodable=True)
    assert data.query.undecodable_skipped == (str(broken),)
    assert data.query.pids.tolist() == [1, 1]
    assert data.summary().splitlines()[3].split() == ["query", "2", "1", "0", "0", "1"]


def test_split_accessor(market_root):
    data = m.load_market1501(market_root)
    assert data.split("gallery") is data.gallery
    with pytest.raises(ValueError, match="unknown split 'test'"):
        data.split("test")
