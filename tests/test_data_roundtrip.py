"""A synthetic dataset through the real reader, the TFDS builder and the attribute loader."""

import os

import numpy as np
import pytest

from reid_jax import synthetic
from reid_jax.data import attributes, market1501, tfds_market1501


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "market"
    config = synthetic.DatasetConfig(num_train_ids=5, num_test_ids=5, images_per_id=5,
                                     num_distractors=4, num_junk=3, seed=11)
    synthetic.generate_dataset(root, config)
    return root


def test_reader_tfds_and_attributes_agree(dataset, tmp_path):
    data = market1501.load_market1501(dataset, verify_images=True)
    attrs = attributes.load_market_attributes(dataset / "market_attribute.mat")
    assert data.num_train_ids == 5 and len(attrs.train_ids) == 5 and len(attrs.test_ids) == 5
    np.testing.assert_array_equal(np.unique(data.train.pids), attrs.train_ids)
    # Junk is left out of every split; distractors stay in the gallery only.
    for split in (data.train, data.query, data.gallery):
        assert (split.pids != -1).all()
    assert (data.gallery.pids == 0).sum() == 4 and (data.query.pids == 0).sum() == 0

    builder = tfds_market1501.prepare_market1501(dataset, tmp_path / "tfds", config="synthetic")
    sources = builder.as_data_source()
    for name in ("train", "query", "gallery"):
        split = data.split(name)
        source = sources[name]
        assert len(source) == split.num_images
        labels, has = attributes.labels_for_pids(attrs, split.pids, name)
        for i in (0, len(source) // 2, len(source) - 1):
            record = source[i]
            assert int(record["pid"]) == split.pids[i]
            assert int(record["camera"]) == split.cameras[i]
            with open(split.paths[i], "rb") as f:
                assert bytes(record["image"]) == f.read()
            np.testing.assert_array_equal(record["attributes"], labels[i])
            assert bool(record["has_attributes"]) == has[i]


def test_generated_dataset_is_readable_by_others(tmp_path):
    mask = os.umask(0o022)
    try:
        root = tmp_path / "market"
        synthetic.generate_dataset(root, synthetic.DatasetConfig(
            num_train_ids=2, num_test_ids=2, images_per_id=4, num_distractors=1, num_junk=1))
        assert os.stat(root).st_mode & 0o777 == 0o755
        assert os.stat(root / "market_attribute.mat").st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)
