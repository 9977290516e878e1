"""config.data.source: the TFDS market1501 records give what the folder gives.

Same splits, labels and paths; the same pixels in every training and evaluation batch; the
same embeddings of a trained checkpoint; and training reads them (tools/train.py with
``--config.data.source=tfds`` on the tiny synthetic set).
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from reid_jax import checkpoints, embeddings
from reid_jax.data import loader, sources

REPO = pathlib.Path(__file__).resolve().parents[1]


def data_config(source: str, tfds_dir: pathlib.Path) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": {
        "source": source, "tfds_data_dir": str(tfds_dir), "tfds_config": "synthetic",
        "height": 64, "width": 32, "num_workers": 0, "eval_batch_size": 16}})


@pytest.fixture(scope="module")
def both(tiny_dataset, tmp_path_factory):
    """(folder data, tfds data, tfds_data_dir): the tfds one prepared here from the folder."""
    tfds_dir = tmp_path_factory.mktemp("tfds")
    folder = sources.load_data(tiny_dataset, data_config("folder", tfds_dir))
    tfds = sources.load_data(tiny_dataset, data_config("tfds", tfds_dir))
    return folder, tfds, tfds_dir


def test_same_splits_labels_and_paths(both):
    folder, tfds, tfds_dir = both
    assert tfds.num_train_ids == folder.num_train_ids
    for name in ("train", "query", "gallery"):
        a, b = folder.split(name), tfds.split(name)
        assert b.paths == a.paths and len(b.items) == len(a.items)
        for field in ("pids", "cameras", "sequences", "frames", "labels"):
            np.testing.assert_array_equal(getattr(b, field), getattr(a, field), err_msg=field)
        assert b.pid_to_label == a.pid_to_label
        assert a.records is None and a.items is a.paths and a.source_files == a.paths
        assert b.source_files and all(str(tfds_dir) in f and ".array_record" in f
                                      for f in b.source_files)
        for i in (0, len(a) - 1):  # record i holds the bytes of file i
            assert b.items[i]["image"] == pathlib.Path(a.paths[i]).read_bytes()


def test_same_train_and_eval_batches(both):
    folder, tfds, _ = both
    config = loader.LoaderConfig(p=4, k=2, num_workers=0,
                                 augment=loader.augment.AugmentConfig(height=64, width=32))
    runs = []
    for data in (folder, tfds):
        with loader.train_batches(data.train.items, data.train.labels, config=config, seed=1,
                                  start_step=3, stop_step=6) as batches:
            train = list(batches)
        with loader.eval_batches(data.gallery.items, 16, config=config) as batches:
            runs.append((train, list(batches)))
    for (train_a, eval_a), (train_b, eval_b) in [runs]:
        for a, b in zip(train_a + eval_a, train_b + eval_b, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_same_embeddings_of_a_trained_checkpoint(both, tiny_run, tmp_path):
    _, _, tfds_dir = both
    model, meta = checkpoints.restore_model(tiny_run["checkpoint"], None)
    out = {}
    for source in ("folder", "tfds"):
        config = ml_collections.ConfigDict(meta["config"])
        config.data.update(data_config(source, tfds_dir).data)
        out[source] = embeddings.split_embeddings(
            model, config, tiny_run["data"], ("query", "gallery"),
            cache_dir=tmp_path / source)
    for split in ("query", "gallery"):
        a, b = out["folder"][split], out["tfds"][split]
        assert a.paths == b.paths
        np.testing.assert_array_equal(a.pids, b.pids)
        np.testing.assert_allclose(b.features, a.features, rtol=0, atol=1e-6)
    # The TFDS cache is keyed by the array_record files: reused as is.
    config.data.update(data_config("tfds", tfds_dir).data)
    again = embeddings.split_embeddings(model, config, tiny_run["data"], ("query",),
                                        cache_dir=tmp_path / "tfds")
    np.testing.assert_array_equal(again["query"].features, out["tfds"]["query"].features)


def test_source_errors(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"config.data.source must be one of \('folder', "
                                         r"'tfds'\), got 'tfrecord'"):
        sources.load_data(tiny_dataset, data_config("tfrecord", tmp_path))
    with pytest.raises(ValueError, match="market1501/synthetic is not prepared in .*"
                                         "config.data.root is empty"):
        sources.load_data("", data_config("tfds", tmp_path / "empty"))
    with pytest.raises(ValueError, match="config.data.root is empty"):
        sources.load_data("", data_config("folder", tmp_path))
    config = data_config("tfds", tmp_path)
    config.data.tfds_config = "market"
    with pytest.raises(ValueError, match=r"tfds_config must be one of \('real', 'synthetic'\)"):
        sources.load_data(tiny_dataset, config)


def test_training_reads_the_tfds_source(both, tiny_run, tmp_path):
    """tools/train.py with the TFDS source ends step 2 with the folder run's weights."""
    from conftest import TINY_EPOCHS, run_tool

    _, _, tfds_dir = both
    workdir = tmp_path / "run"
    run_tool("train.py", f"--config={REPO / 'configs' / 'agw_tiny.py'}", f"--workdir={workdir}",
             f"--config.data.root={tiny_run['data']}", f"--config.num_epochs={TINY_EPOCHS}",
             "--config.num_train_steps=2", "--config.data.source=tfds",
             f"--config.data.tfds_data_dir={tfds_dir}")
    got, _ = checkpoints.restore_model(workdir / "checkpoints", None, 2)
    want, _ = checkpoints.restore_model(tiny_run["checkpoint"], None, 2)
    a = jax.tree_util.tree_leaves(nnx.state(got))
    b = jax.tree_util.tree_leaves(nnx.state(want))
    assert len(a) == len(b) > 50
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
