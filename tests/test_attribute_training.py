"""Tests of reid_jax/train/attribute_training.py, tools/train_attributes.py, tools/evaluate.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import agw_market1501
from reid_jax import checkpoints, embeddings, evaluation, synthetic
from reid_jax.data import attributes as attributes_lib
from reid_jax.data.attributes import ATTRIBUTE_NAMES, NUM_ATTRIBUTES
from reid_jax.explain import learned
from reid_jax.models.agw import AGW
from reid_jax.train import attribute_training as at
from reid_jax.train import loop
from reid_jax.train.state import create_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = synthetic.DatasetConfig(num_train_ids=5, num_test_ids=4, images_per_id=4,
                               num_distractors=2, num_junk=1, seed=11, supersample=1)


def _config(root: str) -> ml_collections.ConfigDict:
    """The reference config (optimizer, loss) with a tiny model and 32 x 16 images."""
    config = agw_market1501.get_config()
    config.data.root = root
    config.data.height, config.data.width = 32, 16
    config.data.num_workers = 0
    config.data.eval_batch_size = 8
    config.model.width = 8
    config.model.blocks = (1, 1, 1, 1)
    config.model.non_local = (0, 1, 1, 0)
    return config


def _np_weighted_bce(logits, labels, ratios):
    """float64 reference: exp(1 - r) on positives, exp(r) on negatives, mean over entries."""
    z, y, r = (np.asarray(a, np.float64) for a in (logits, labels, ratios))
    w = np.where(y > 0.5, np.exp(1.0 - r), np.exp(r))
    log_p = -np.logaddexp(0.0, -z)
    log_not_p = -np.logaddexp(0.0, z)
    return float(np.mean(-w * (y * log_p + (1.0 - y) * log_not_p)))


def _separable(n=200, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    true_w = rng.normal(size=(dim, NUM_ATTRIBUTES))
    labels = (features @ true_w > 0.3).astype(np.uint8)
    return features, labels, labels.mean(axis=0)


# ------------------------------------------------------------------------------ training


def test_head_training_lowers_the_loss_and_learns_the_labels():
    features, labels, ratios = _separable()
    config = at.HeadTrainConfig(epochs=40, learning_rate=2e-2, batch_size=32, seed=1)
    head, history = at.train_attribute_head(features, labels, ratios, config)
    assert head.kernel[...].shape == (16, NUM_ATTRIBUTES)
    assert set(nnx.state(head).keys()) == {"kernel"}  # bias-free
    assert history["final_loss"] < 0.5 * history["initial_loss"]
    assert history["epoch_loss"][-1] < history["epoch_loss"][0]
    assert history["steps"] == 40 * 7
    logits = features.astype(np.float64) @ np.asarray(head.kernel[...], np.float64)
    assert history["final_loss"] == pytest.approx(_np_weighted_bce(logits, labels, ratios),
                                                  rel=1e-5)
    probs = embeddings.attribute_probabilities(head, features)
    metrics = evaluation.attribute_metrics(probs, labels)
    assert metrics["mA"] > 0.9
    # Same seed, same result.
    again, _ = at.train_attribute_head(features, labels, ratios, config)
    np.testing.assert_array_equal(np.asarray(again.kernel[...]), np.asarray(head.kernel[...]))


def test_heads_on_as_many_batches_share_one_compiled_epoch():
    """The calibration's folds differ by a few images: padded to whole batches, their arrays
    have one shape and the epoch compiles once; the padding rows never enter the loss."""
    features, labels, ratios = _separable(n=60, dim=8, seed=4)
    config = at.HeadTrainConfig(epochs=3, learning_rate=1e-2, batch_size=16, seed=0)
    at.train_attribute_head(features[:50], labels[:50], ratios, config)
    compiled = at._train_epoch._cache_size()
    head, history = at.train_attribute_head(features[:55], labels[:55], ratios, config)
    assert at._train_epoch._cache_size() == compiled  # 50 and 55 rows both pad to 64
    logits = features[:55].astype(np.float64) @ np.asarray(head.kernel[...], np.float64)
    assert history["final_loss"] == pytest.approx(
        _np_weighted_bce(logits, labels[:55], ratios), rel=1e-5)
    assert history["steps"] == 3 * 4


def test_head_loss_matches_numpy_and_blocks_feature_gradients():
    features, labels, ratios = _separable(n=20, dim=8, seed=3)
    head = at.AttributeHead(8, rngs=nnx.Rngs(0))
    logits = features.astype(np.float64) @ np.asarray(head.kernel[...], np.float64)
    assert at.head_loss(head, features, labels, ratios) == pytest.approx(
        _np_weighted_bce(logits, labels, ratios), rel=1e-5)
    graphdef, params = nnx.split(head)
    mask = jnp.ones(20)
    grad_f = jax.grad(at._head_loss, argnums=2)(
        params, graphdef, jnp.asarray(features), jnp.asarray(labels, jnp.float32), mask,
        jnp.asarray(ratios, jnp.float32))
    assert float(jnp.abs(grad_f).max()) == 0.0  # stop_gradient: nothing flows into f


def test_training_errors():
    features, labels, ratios = _separable(n=10, dim=4)
    with pytest.raises(ValueError, match="labels must be \\[n, A\\] with n = 10"):
        at.train_attribute_head(features, labels[:5], ratios)
    with pytest.raises(ValueError, match="percentages\\? divide by 100"):
        at.train_attribute_head(features, labels, ratios * 100 + 1)
    with pytest.raises(ValueError, match="positive_ratios must be \\[A\\]"):
        at.train_attribute_head(features, labels, ratios[:3])
    with pytest.raises(ValueError, match="labels must be binary"):
        at.train_attribute_head(features, labels * 2, ratios)
    with pytest.raises(ValueError, match="NaN or inf"):
        at.train_attribute_head(np.full_like(features, np.nan), labels, ratios)
    with pytest.raises(ValueError, match="features must be \\[n, N\\]"):
        at.train_attribute_head(features[:0], labels[:0], ratios)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        at.HeadTrainConfig(epochs=0)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        at.HeadTrainConfig(learning_rate=0.0)


# ------------------------------------------------------------------------------ labels, metrics


def _attrs(tmp_path):
    train_ids, test_ids = np.array([2, 5]), np.array([3, 7])
    rng = np.random.default_rng(0)

    def labels(n):
        y = (rng.random((n, NUM_ATTRIBUTES)) < 0.4).astype(np.uint8)
        y[:, -4:] = 0
        y[np.arange(n), NUM_ATTRIBUTES - 4 + rng.integers(0, 4, n)] = 1  # age one-hot
        return y

    path = tmp_path / "market_attribute.mat"
    attributes_lib.write_market_attributes(path, train_ids, labels(2), test_ids, labels(2))
    return attributes_lib.load_market_attributes(path)


def _split(name, pids, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    pids = np.asarray(pids, np.int32)
    return embeddings.SplitEmbeddings(
        split=name, paths=tuple(f"{p}_{k}.jpg" for k, p in enumerate(pids)),
        features=rng.normal(size=(pids.size, dim)).astype(np.float32), pids=pids,
        cameras=np.ones(pids.size, np.int32))


def test_split_labels_join_by_pid_and_drop_unlabelled(tmp_path):
    attrs = _attrs(tmp_path)
    query = _split("query", [3, 7, 3])
    gallery = _split("gallery", [0, 7, 9], seed=1)  # distractor, labelled, unknown pid
    features, labels, pids = at.split_labels(attrs, [query, gallery])
    assert pids.tolist() == [3, 7, 3, 7]
    np.testing.assert_array_equal(features, np.concatenate([query.features, gallery.features[1:2]]))
    rows = {3: attrs.test_labels[0], 7: attrs.test_labels[1]}
    np.testing.assert_array_equal(labels, np.stack([rows[p] for p in pids.tolist()]))
    train = _split("train", [2, 5, 5])
    _, train_labels, _ = at.split_labels(attrs, [train])
    np.testing.assert_array_equal(train_labels, attrs.train_labels[[0, 1, 1]])
    with pytest.raises(ValueError, match="no image of split\\(s\\) gallery has attribute labels"):
        at.split_labels(attrs, [_split("gallery", [0, 9])])


def test_evaluate_attribute_head_matches_attribute_metrics(tmp_path):
    attrs = _attrs(tmp_path)
    query, gallery = _split("query", [3, 7]), _split("gallery", [7, 3, 0], seed=2)
    head = at.AttributeHead(4, rngs=nnx.Rngs(3))
    result = at.evaluate_attribute_head(head, attrs, [query, gallery])
    features, labels, _ = at.split_labels(attrs, [query, gallery])
    probs = 1.0 / (1.0 + np.exp(-(features.astype(np.float64)
                                  @ np.asarray(head.kernel[...], np.float64))))
    expected = evaluation.attribute_metrics(probs, labels)
    for name in ("mA", "accuracy", "precision", "recall", "f1"):
        assert result[name] == pytest.approx(expected[name])
    assert result["num_images"] == 4 and result["num_identities"] == 2
    assert list(result["per_attribute"]) == list(ATTRIBUTE_NAMES)
    for k, name in enumerate(ATTRIBUTE_NAMES):
        row = result["per_attribute"][name]
        for key, column in (("accuracy", "accuracy_per_attribute"), ("f1", "f1_per_attribute"),
                            ("precision", "precision_per_attribute")):
            value = expected[column][k]
            assert (row[key] is None) if np.isnan(value) else row[key] == pytest.approx(value)
        # Both rates or None: an attribute with one class in these images is not measured.
        two = (expected["tpr_per_attribute"][k] + expected["tnr_per_attribute"][k]) / 2
        assert (row["two_class_accuracy"] is None) if np.isnan(two) else (
            row["two_class_accuracy"] == pytest.approx(two))
        assert row["positive_ratio"] == pytest.approx(100 * labels[:, k].mean())
    json.dumps(result, allow_nan=False)  # JSON-ready: undefined values are None
    table = at.format_attribute_table(result)
    assert "backpack" in table and "age4" in table and "mA" in table


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("attr") / "market")
    synthetic.generate_dataset(root, DATA)
    return root


def _train_state(config, num_classes):
    model = AGW.from_config(config, num_classes, nnx.Rngs(4))
    state = create_train_state(model, config, optax.constant_schedule(1e-3))
    # Non-trivial optimizer moments and step, as after some training.
    rng = np.random.default_rng(0)
    state = state.with_optimizer_items(jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype)
        if jnp.issubdtype(x.dtype, jnp.floating) else x + 5, state.optimizer_items()))
    return state


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset):
    """A train_lib-style checkpoint (model + train_state + meta) and the head trained on it."""
    config = _config(dataset)
    workdir = str(tmp_path_factory.mktemp("run"))
    num_classes = DATA.num_train_ids
    state = _train_state(config, num_classes)
    manager = loop.open_checkpoint_manager(workdir, keep=None)
    loop.save_train_checkpoint(manager, state, config, num_classes, epoch=1)
    manager.wait_until_finished()
    manager.close()
    directory = os.path.join(workdir, loop.CHECKPOINT_SUBDIR)
    model_before, _ = checkpoints.restore_model(directory, None)
    fingerprint = embeddings.model_fingerprint(model_before)
    result = at.train_attributes(
        directory, None, dataset,
        train_config=at.HeadTrainConfig(epochs=20, learning_rate=1e-2, batch_size=8))
    return {"directory": directory, "state": state, "config": config, "result": result,
            "fingerprint": fingerprint, "num_classes": num_classes}


def test_train_attributes_saves_head_and_leaves_reid_weights_unchanged(trained):
    directory, result = trained["directory"], trained["result"]
    source, saved = result["checkpoint"]["source_step"], result["checkpoint"]["saved_step"]
    assert saved == source + 1 == checkpoints.latest_step(directory)
    # The re-id model of the new step is bitwise the model it was trained on.
    old, _ = checkpoints.restore_model(directory, None, source)
    new, meta = checkpoints.restore_model(directory, None, saved)
    assert _leaves(nnx.state(old)) and all(
        np.array_equal(a, b) for a, b in zip(_leaves(nnx.state(old)), _leaves(nnx.state(new)),
                                             strict=True))
    assert embeddings.model_fingerprint(new) == trained["fingerprint"]
    assert meta["attribute_head_training"]["source_step"] == source
    calibration = meta["attribute_head"].pop("calibration")
    test_accuracy = meta["attribute_head"].pop("test_accuracy")
    assert meta["attribute_head"] == {"embedding_dim": 256, "num_attributes": 30}
    # The head's balanced accuracy on the test images travels with it (the report and the
    # explorer mark what it has not learned); the step it was trained from has none.
    assert test_accuracy == checkpoints.restore_head_accuracy(directory) == {
        name: row["two_class_accuracy"] for name, row in result["test"]["per_attribute"].items()}
    assert list(test_accuracy) == list(ATTRIBUTE_NAMES)
    assert None in test_accuracy.values() and any(v is not None for v in test_accuracy.values())
    assert checkpoints.restore_head_accuracy(directory, source) is None
    # The calibration: fitted on held-out training identities (one fold per identity here:
    # 5 identities, 4 folds asked), stored with the head, reported in the metrics.
    stored = checkpoints.restore_calibration(directory)
    np.testing.assert_allclose(stored.slope, calibration["slope"])
    assert np.shape(stored.intercept) == (30,)
    assert result["training"]["calibration"]["folds"] == 4
    assert result["training"]["calibration"]["slope"] == calibration["slope"]
    assert checkpoints.restore_calibration(directory, source) is None
    head = checkpoints.restore_attribute_head(directory)
    assert head.kernel[...].shape == (256, 30)
    assert checkpoints.has_attribute_head(directory) and not checkpoints.has_attribute_head(
        directory, source)
    # Training state copied: a resumed train_lib run finds the same optimizer state.
    manager = loop.open_checkpoint_manager(os.path.dirname(directory), keep=None)
    try:
        fresh = _train_state(trained["config"], trained["num_classes"])
        fresh = fresh.with_optimizer_items(jax.tree.map(jnp.zeros_like, fresh.optimizer_items()))
        restored = loop.restore_train_checkpoint(manager, fresh, saved)
    finally:
        manager.close()
    for a, b in zip(_leaves(restored.optimizer_items()),
                    _leaves(trained["state"].optimizer_items()), strict=True):
        np.testing.assert_array_equal(a, b)
    # Loss went down; metrics on the test identities; JSON written.
    training = result["training"]
    assert training["final_loss"] < training["initial_loss"]
    assert training["num_identities"] == DATA.num_train_ids
    with open(os.path.join(directory, at.METRICS_FILE)) as f:
        written = json.load(f)
    assert written["test"]["splits"] == ["query", "gallery"]
    assert written["test"]["num_identities"] == DATA.num_test_ids
    assert 0.0 <= written["test"]["mA"] <= 1.0
    assert set(os.listdir(embeddings.default_cache_dir(directory))) == {
        "train.npz", "query.npz", "gallery.npz"}


def test_train_attributes_reuses_cached_embeddings(trained, dataset, tmp_path):
    cache = embeddings.default_cache_dir(trained["directory"])
    stamps = {n: os.stat(os.path.join(cache, n)).st_mtime_ns for n in os.listdir(cache)}
    metrics = tmp_path / "m.json"
    result = at.train_attributes(trained["directory"], None, dataset, metrics_path=metrics,
                                 train_config=at.HeadTrainConfig(epochs=2), save=False)
    assert result["checkpoint"]["saved_step"] is None and metrics.is_file()
    assert {n: os.stat(os.path.join(cache, n)).st_mtime_ns for n in os.listdir(cache)} == stamps


def test_train_attributes_errors(trained, dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="attribute file not found"):
        at.train_attributes(trained["directory"], None, dataset,
                            attributes_file=tmp_path / "none.mat", save=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        at.train_attributes(tmp_path / "no_ckpt", None, dataset, save=False)


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *args],
                          capture_output=True, text=True, timeout=300)


def test_tools_train_attributes_then_evaluate(trained, dataset, tmp_path):
    directory = trained["directory"]
    metrics = tmp_path / "attr.json"
    result = _tool("train_attributes.py", f"--checkpoint={directory}", "--epochs=3",
                   "--lr=0.01", "--batch_size=16", f"--metrics_file={metrics}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "downbrown" in result.stdout and "saved the attribute head as step" in result.stdout
    step = checkpoints.latest_step(directory)
    assert json.load(open(metrics))["checkpoint"]["saved_step"] == step
    # The attributes the head has not learned are named with their balanced accuracy.
    head = learned.summary(checkpoints.restore_head_accuracy(directory))
    assert head["not_learned"]  # a head of 3 epochs on a random model
    line = next(x for x in result.stdout.splitlines() if x.startswith("not learned"))
    assert line == ("not learned (balanced accuracy on the test images below 80 %): " + ", ".join(
        f"{n} {100 * head['accuracy'][n]:.0f} %" for n in head["not_learned"]))

    output = tmp_path / "eval.json"
    result = _tool("evaluate.py", f"--checkpoint={directory}", f"--data_root={dataset}",
                   f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mAP" in result.stdout and "rank1" in result.stdout and "age2" in result.stdout
    written = json.load(open(output))
    assert written["checkpoint"]["step"] == step
    # Re-id metrics equal rank_metrics on float64 distances of the (cached) embeddings.
    emb = embeddings.load_split_embeddings(directory, None, dataset)
    q, g = (emb[s].features.astype(np.float64) for s in ("query", "gallery"))
    distances = (q**2).sum(1)[:, None] + (g**2).sum(1)[None, :] - 2 * q @ g.T
    expected = evaluation.rank_metrics(distances, emb["query"].pids, emb["gallery"].pids,
                                       emb["query"].cameras, emb["gallery"].cameras)
    assert written["reid"]["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert written["reid"]["rank1"] == pytest.approx(expected["cmc"][0])
    assert written["reid"]["mINP"] == pytest.approx(expected["mINP"], abs=1e-6)
    head = checkpoints.restore_attribute_head(directory)
    attrs = attributes_lib.load_market_attributes(os.path.join(dataset, at.ATTRIBUTE_FILE))
    expected_attr = at.evaluate_attribute_head(head, attrs, [emb["query"], emb["gallery"]])
    assert written["attributes"]["mA"] == pytest.approx(expected_attr["mA"])

    # Re-id only for a step without a head; a missing data root is a usage error.
    source = trained["result"]["checkpoint"]["source_step"]
    result = _tool("evaluate.py", f"--checkpoint={directory}", f"--data_root={dataset}",
                   f"--step={source}", f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.load(open(output))["attributes"] is None
    tiny = os.path.join(REPO, "configs", "agw_tiny.py")
    result = _tool("evaluate.py", f"--checkpoint={directory}", f"--output={output}",
                   f"--config={tiny}", "--config.data.root=")
    assert result.returncode != 0 and "pass --data_root" in result.stderr
