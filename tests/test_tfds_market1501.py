"""Tests for the ``market1501`` TFDS builder: prepare a tiny folder, read it back without TF."""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from reid_jax.data import attributes as attributes_lib
from reid_jax.data import market1501 as market_lib
from reid_jax.data import tfds_market1501 as builder_lib

SPLITS = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg",
                           "0007_c1s1_000001_01.jpg", "0007_c5s2_000101_02.jpg",
                           "0010_c6s4_001234_01.jpg", "0010_c2s3_000050_01.jpg"],
    "query": ["0001_c1s1_001051_00.jpg", "0001_c2s1_000301_00.jpg", "0003_c3s1_000101_00.jpg"],
    "bounding_box_test": ["0001_c3s1_000551_01.jpg", "0001_c4s1_000201_01.jpg",
                          "0003_c1s1_000001_01.jpg", "0003_c6s1_000201_02.jpg",
                          "0005_c2s1_000100_01.jpg", "0000_c1s1_000151_01.jpg",
                          "0000_c3s1_000151_02.jpg", "-1_c1s1_000401_03.jpg",
                          "-1_c2s1_000401_01.jpg"],
}
TRAIN_IDS, TEST_IDS = np.array([2, 7, 10]), np.array([1, 3, 4])


def make_market(root: Path, mat_path: Path) -> None:
    """A tiny Market-shaped folder: 18 JPEGs (junk, distractors, an unlabelled id) + labels."""
    rng = np.random.default_rng(0)
    for folder, names in SPLITS.items():
        (root / folder).mkdir(parents=True)
        for name in names:
            pixels = rng.integers(0, 255, (16, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / name, quality=90)
        (root / folder / "Thumbs.db").write_bytes(b"\x00")
    labels = (rng.random((6, 30)) < 0.4).astype(np.uint8)
    labels[:, 26:] = 0
    labels[np.arange(6), 26 + rng.integers(0, 4, 6)] = 1
    attributes_lib.write_market_attributes(mat_path, TRAIN_IDS, labels[:3], TEST_IDS, labels[3:])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path, builder_lib.Market1501Builder]:
    """(manual_dir, data_dir, prepared builder) for the 'synthetic' config."""
    manual_dir = tmp_path_factory.mktemp("synthetic")
    make_market(manual_dir, manual_dir / "market_attribute.mat")
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = builder_lib.prepare_market1501(manual_dir, data_dir, config="synthetic")
    return manual_dir, data_dir, builder


def test_tensorflow_not_needed():
    assert importlib.util.find_spec("tensorflow") is None, "tests must run without TensorFlow"


def expected_records(root: Path, split: str) -> list[dict]:
    """The records the builder must hold, from the reader and the attribute loader."""
    data = market_lib.load_market1501(root)
    attrs = attributes_lib.load_market_attributes(root / "market_attribute.mat")
    s = data.split(split)
    labels, has = attributes_lib.labels_for_pids(attrs, s.pids, split)
    return [{"image": Path(p).read_bytes(), "file_name": os.path.basename(p).encode(),
             "pid": s.pids[i], "label": s.labels[i], "camera": s.cameras[i],
             "sequence": s.sequences[i], "frame": s.frames[i], "attributes": labels[i],
             "has_attributes": has[i]} for i, p in enumerate(s.paths)]


def assert_records_equal(source, expected: list[dict]) -> None:
    assert len(source) == len(expected)
    for i, want in enumerate(expected):
        got = source[i]
        assert set(got) == set(want)
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"record {i} {key}")
        assert got["attributes"].dtype == np.uint8 and got["attributes"].shape == (30,)


@pytest.mark.parametrize("split", ["train", "query", "gallery"])
def test_data_source_matches_reader(synthetic, split):
    manual_dir, _, builder = synthetic
    assert_records_equal(builder.as_data_source()[split], expected_records(manual_dir, split))


def test_split_contents(synthetic):
    _, _, builder = synthetic
    sources = builder.as_data_source()
    assert {k: len(v) for k, v in sources.items()} == {"train": 6, "query": 3, "gallery": 7}
    gallery = [sources["gallery"][i] for i in range(7)]
    assert [r["pid"] for r in gallery] == [0, 0, 1, 1, 3, 3, 5]  # Junk out, distractors in.
    assert [bool(r["has_attributes"]) for r in gallery] == [False, False, True, True, True, True,
                                                            False]
    assert all(not r["attributes"].any() for r in gallery if not r["has_attributes"])
    train = [sources["train"][i] for i in range(6)]
    assert [r["label"] for r in train] == [0, 0, 1, 1, 2, 2]
    assert all(r["has_attributes"] for r in train)
    # The bytes decode back to the written image.
    first = sources["query"][0]
    decoded = np.asarray(Image.open(io.BytesIO(first["image"])))
    assert decoded.shape == (16, 8, 3)


def test_array_record_files_and_info(synthetic):
    _, data_dir, builder = synthetic
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    files = sorted(p.name for p in Path(builder.data_dir).iterdir())
    assert any(f.startswith("market1501-gallery.array_record") for f in files), files
    assert Path(builder.data_dir) == data_dir / "market1501" / "synthetic" / "1.0.0"
    assert builder.info.splits["train"].num_examples == 6


def test_tfds_data_source_by_name_and_from_directory(synthetic):
    manual_dir, data_dir, _ = synthetic
    by_name = tfds.data_source("market1501", split="query", data_dir=data_dir, download=False,
                               builder_kwargs={"config": "synthetic"})
    assert_records_equal(by_name, expected_records(manual_dir, "query"))
    # Reading needs no builder code: the prepared folder describes itself.
    restored = tfds.builder_from_directory(data_dir / "market1501" / "synthetic" / "1.0.0")
    assert_records_equal(restored.as_data_source(split="gallery"),
                         expected_records(manual_dir, "gallery"))


def test_real_config_layout(tmp_path):
    """'real' reads manual_dir/Market-1501-v15.09.15 with the label file beside it."""
    manual_dir = tmp_path / "manual"
    make_market(manual_dir / market_lib.RELEASE_FOLDER, manual_dir / "market_attribute.mat")
    builder = builder_lib.prepare_market1501(manual_dir, tmp_path / "data")
    assert builder.builder_config.name == "real"
    assert len(builder.as_data_source()["gallery"]) == 7


def test_missing_attribute_file(tmp_path):
    make_market(tmp_path / "m", tmp_path / "elsewhere.mat")
    with pytest.raises(FileNotFoundError, match="attribute file 'market_attribute.mat' not found"):
        builder_lib.prepare_market1501(tmp_path / "m", tmp_path / "data", config="synthetic")


def test_missing_manual_dir_shows_instructions(tmp_path):
    with pytest.raises(AssertionError, match="Market-1501 cannot be downloaded automatically"):
        builder_lib.prepare_market1501(tmp_path / "absent", tmp_path / "data", config="real")


def test_real_config_without_release_folder(tmp_path):
    make_market(tmp_path / "m", tmp_path / "m" / "market_attribute.mat")
    with pytest.raises(FileNotFoundError, match="Market-1501 root folder not found: .*"
                                                "Market-1501-v15.09.15"):
        builder_lib.prepare_market1501(tmp_path / "m", tmp_path / "data", config="real")
