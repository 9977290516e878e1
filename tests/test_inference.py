"""Tests of reid_jax/embeddings.py and tools/extract_features.py on a tiny model and dataset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from reid_jax import checkpoints, embeddings, synthetic
from reid_jax.data import augment, sources
from reid_jax.data.market1501 import load_market1501
from reid_jax.models.agw import AGW
from reid_jax.models.attribute_head import AttributeHead

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEIGHT, WIDTH = 32, 16
DATA = synthetic.DatasetConfig(num_train_ids=3, num_test_ids=3, images_per_id=4,
                               num_distractors=2, num_junk=1, seed=5, supersample=1)


def tiny_config(root: str = "") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "data": {"root": root, "height": HEIGHT, "width": WIDTH, "eval_batch_size": 4,
                 "num_workers": 0},
        "model": {"width": 8, "blocks": (1, 1, 1, 1), "non_local": (0, 1, 1, 0)},
    })


def make_model(seed: int = 0, num_classes: int = 3) -> AGW:
    """A tiny AGW whose BatchNorm statistics and BNNeck bias are not the identity."""
    model = AGW.from_config(tiny_config(), num_classes, nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    stats = nnx.state(model, nnx.BatchStat)
    stats = jax.tree_util.tree_map_with_path(
        lambda path, x: (rng.uniform(0.5, 1.5, x.shape) if "var" in jax.tree_util.keystr(path)
                         else rng.normal(0.0, 0.1, x.shape)).astype(np.float32), stats)
    stats = jax.tree.map(jnp.asarray, stats)
    nnx.update(model, stats)
    model.bnneck.bias[...] = jnp.asarray(rng.normal(0.0, 0.05, model.bnneck.bias.shape),
                                         jnp.float32)
    return model


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("inference") / "market")
    synthetic.generate_dataset(root, DATA)
    return root


@pytest.fixture(scope="module")
def model() -> AGW:
    return make_model()


@pytest.fixture(scope="module")
def query_paths(dataset) -> tuple[str, ...]:
    return load_market1501(dataset).query.paths


def _eval_images(paths) -> np.ndarray:
    config = augment.AugmentConfig(height=HEIGHT, width=WIDTH)
    return np.stack([augment.eval_transform(augment.read_image(p), config) for p in paths])


def _direct_outputs(model: AGW, paths):
    view = nnx.view(model, use_running_average=True)
    return view(_eval_images(paths))


# ------------------------------------------------------------------------------ embed_images


def test_embeddings_are_unit_post_bn_features(model, query_paths):
    paths = query_paths[:5]
    features = embeddings.embed_images(model, paths, height=HEIGHT, width=WIDTH, batch_size=4)
    assert features.shape == (5, model.feature_dim) and features.dtype == np.float32
    post_bn = np.asarray(_direct_outputs(model, paths).post_bn, np.float64)
    reference = post_bn / np.linalg.norm(post_bn, axis=1, keepdims=True)
    np.testing.assert_allclose(features, reference, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(features.astype(np.float64), axis=1), 1.0,
                               atol=1e-6)


def test_padding_does_not_change_features(model, query_paths):
    paths = query_paths[:5]
    batched = embeddings.embed_images(model, paths, height=HEIGHT, width=WIDTH, batch_size=4)
    one_by_one = np.concatenate([
        embeddings.embed_images(model, [p], height=HEIGHT, width=WIDTH, batch_size=1)
        for p in paths])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)


def test_model_and_its_mode_are_left_unchanged(query_paths):
    model = make_model(seed=3)
    before = embeddings.model_fingerprint(model)
    embeddings.embed_images(model, query_paths[:2], height=HEIGHT, width=WIDTH, batch_size=2)
    assert embeddings.model_fingerprint(model) == before
    assert model.bnneck.bn.use_running_average is False  # still in train mode


def test_outputs_pre_bn_post_bn_and_attributes(model, query_paths):
    paths = query_paths[:3]
    head = AttributeHead(model.feature_dim, rngs=nnx.Rngs(1))
    out = embeddings.extract(model, paths, height=HEIGHT, width=WIDTH, batch_size=2,
                            outputs=("features", "post_bn", "pre_bn", "attributes"),
                            attribute_head=head)
    direct = _direct_outputs(model, paths)
    np.testing.assert_allclose(out["pre_bn"], np.asarray(direct.pre_bn), rtol=1e-5, atol=1e-6)
    post = out["post_bn"].astype(np.float64)
    np.testing.assert_allclose(out["features"], post / np.linalg.norm(post, axis=1)[:, None],
                               atol=1e-6)
    logits = out["features"].astype(np.float64) @ np.asarray(head.kernel[...], np.float64)
    np.testing.assert_allclose(out["attributes"], 1.0 / (1.0 + np.exp(-logits)), atol=1e-6)
    assert out["attributes"].shape == (3, 30)
    np.testing.assert_allclose(
        embeddings.attribute_probabilities(head, out["features"]), out["attributes"], atol=1e-6)


def test_other_sizes_are_resized_and_bytes_equal_paths(model, query_paths, tmp_path):
    # A large PNG, and its resized copy at the model's input size (lossless, so identical).
    big = np.asarray(Image.open(query_paths[0]).convert("RGB").resize((50, 110)))
    big_path = tmp_path / "big.png"
    Image.fromarray(big).save(big_path)
    small_path = tmp_path / "small.png"
    Image.fromarray(augment.resize(Image.fromarray(big), HEIGHT, WIDTH)).save(small_path)
    with open(big_path, "rb") as f:
        encoded = f.read()
    features = embeddings.embed_images(model, [str(big_path), str(small_path), encoded],
                                      height=HEIGHT, width=WIDTH, batch_size=3)
    np.testing.assert_array_equal(features[0], features[1])
    np.testing.assert_array_equal(features[0], features[2])


def test_mesh_of_one_device_and_divisibility(model, query_paths):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    plain = embeddings.embed_images(model, query_paths[:3], height=HEIGHT, width=WIDTH,
                                   batch_size=2)
    sharded = embeddings.embed_images(model, query_paths[:3], height=HEIGHT, width=WIDTH,
                                     batch_size=2, mesh=mesh)
    np.testing.assert_allclose(sharded, plain, atol=1e-6)


def test_two_device_mesh_in_a_subprocess(dataset, tmp_path):
    """Batches split over 2 (forced host) devices give the single-device features."""
    script = f"""
import os, sys
import jax, numpy as np
sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
from test_inference import make_model, HEIGHT, WIDTH
from reid_jax import embeddings
from reid_jax.data.market1501 import load_market1501
assert len(jax.devices()) == 2, jax.devices()
paths = load_market1501({dataset!r}).gallery.paths[:5]
model = make_model()
mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
a = embeddings.embed_images(model, paths, height=HEIGHT, width=WIDTH, batch_size=4, mesh=mesh)
b = embeddings.embed_images(model, paths, height=HEIGHT, width=WIDTH, batch_size=4)
np.testing.assert_allclose(a, b, atol=1e-6)
try:
    embeddings.embed_images(model, paths, height=HEIGHT, width=WIDTH, batch_size=3, mesh=mesh)
except ValueError as e:
    assert "divisible by the 2 devices" in str(e), e
else:
    raise AssertionError("no error for batch 3 on 2 devices")
print("OK")
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_embed_errors(model, query_paths, tmp_path):
    kw = dict(height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match="no images"):
        embeddings.embed_images(model, [], **kw)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        embeddings.embed_images(model, query_paths[:1], batch_size=0, **kw)
    with pytest.raises(ValueError, match="outputs must be a non-empty subset"):
        embeddings.extract(model, query_paths[:1], outputs=("logits",), **kw)
    with pytest.raises(ValueError, match="needs an attribute_head"):
        embeddings.extract(model, query_paths[:1], outputs=("attributes",), **kw)
    with pytest.raises(ValueError, match="attribute head expects embeddings of size 7"):
        embeddings.extract(model, query_paths[:1], outputs=("attributes",),
                          attribute_head=AttributeHead(7, rngs=nnx.Rngs(0)), **kw)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(augment.ImageLoadError, match="broken.jpg"):
        embeddings.embed_images(model, [query_paths[0], str(bad)], batch_size=2, **kw)


def _unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def retrieval_config(feature: str, normalize: bool, root: str = "") -> ml_collections.ConfigDict:
    config = tiny_config(root)
    config.model.retrieval_feature = feature
    config.model.normalize_feature = normalize
    return config


def test_config_chooses_the_retrieval_embedding(model, query_paths):
    """config.model.retrieval_feature / normalize_feature drive features and attributes."""
    paths = query_paths[:3]
    direct = _direct_outputs(model, paths)
    head = AttributeHead(model.feature_dim, rngs=nnx.Rngs(1))
    kernel = np.asarray(head.kernel[...], np.float64)
    expected = {("post_bn", True): _unit(direct.post_bn),
                ("pre_bn", True): _unit(direct.pre_bn),
                ("pre_bn", False): np.asarray(direct.pre_bn, np.float64),
                ("post_bn", False): np.asarray(direct.post_bn, np.float64)}
    for (feature, normalize), want in expected.items():
        other = AGW.from_config(retrieval_config(feature, normalize), 3, nnx.Rngs(0))
        nnx.update(other, nnx.state(model))  # the same weights, other retrieval settings
        out = embeddings.extract(other, paths, height=HEIGHT, width=WIDTH, batch_size=2,
                                outputs=("features", "post_bn", "pre_bn", "attributes"),
                                attribute_head=head)
        scale = 1.0 if normalize else float(np.abs(want).max())
        np.testing.assert_allclose(out["features"], want, atol=2e-6 * scale,
                                   err_msg=f"{feature}, normalize={normalize}")
        # The raw outputs do not depend on the choice; the attributes use the chosen features.
        np.testing.assert_allclose(out["post_bn"], np.asarray(direct.post_bn), rtol=1e-5,
                                   atol=1e-6)
        logits = out["features"].astype(np.float64) @ kernel
        np.testing.assert_allclose(out["attributes"], 1.0 / (1.0 + np.exp(-logits)), atol=1e-6)


def test_checkpoint_config_sets_the_retrieval_embedding(dataset, tmp_path):
    """A restored model uses the stored config.model values unless a config is passed."""
    directory = str(tmp_path / "checkpoints")
    stored = retrieval_config("pre_bn", True, dataset)
    checkpoints.save_checkpoint(directory, 0, model_state=make_model(seed=7),
                                meta={"num_classes": 3, "config": stored})
    restored, _ = checkpoints.restore_model(directory, None)
    assert (restored.retrieval_feature, restored.normalize_feature) == ("pre_bn", True)
    cache = embeddings.default_cache_dir(directory)
    query = load_market1501(dataset).query.paths
    direct = _direct_outputs(restored, query)
    out = embeddings.load_split_embeddings(directory, None, dataset, ("query",), cache)
    np.testing.assert_allclose(out["query"].features, _unit(direct.pre_bn), atol=2e-6)
    # Another value passed by the user wins, and the cache is not reused for it.
    post = embeddings.load_split_embeddings(directory, tiny_config(dataset), dataset,
                                           ("query",), cache)
    np.testing.assert_allclose(post["query"].features, _unit(direct.post_bn), atol=2e-6)
    again = embeddings.load_split_embeddings(directory, None, dataset, ("query",), cache)
    np.testing.assert_array_equal(again["query"].features, out["query"].features)


def test_dataset_options_from_config(dataset, model, tmp_path):
    assert sources.reader_options(None) == {"verify_images": False, "skip_undecodable": False}
    assert sources.reader_options(tiny_config()) == {"verify_images": False,
                                                        "skip_undecodable": False}
    config = tiny_config()
    config.data.skip_undecodable = True
    with pytest.raises(ValueError, match="skip_undecodable=True needs config.data.verify_images"):
        sources.reader_options(config)
    config.data.verify_images = "yes"
    with pytest.raises(ValueError, match="config.data.verify_images must be a bool, got 'yes'"):
        sources.reader_options(config)

    # A copy of the data with one query image that does not decode (a valid Market-1501 name).
    root = tmp_path / "market"
    shutil.copytree(dataset, root)
    query = load_market1501(root).query
    broken = os.path.join(query.folder, "0999_c1s1_000001_00.jpg")
    with open(broken, "wb") as f:
        f.write(b"\xff\xd8 truncated")
    verify = tiny_config(str(root))
    verify.data.verify_images = True
    with pytest.raises(ValueError, match="image does not decode: .*0999_c1s1_000001_00.jpg"):
        embeddings.split_embeddings(model, verify, root, ("query",))
    verify.data.skip_undecodable = True
    data = sources.load_dataset(root, verify)
    assert data.query.undecodable_skipped == (broken,)
    out = embeddings.split_embeddings(model, verify, root, ("query",))
    assert out["query"].paths == query.paths and broken not in out["query"].paths
    # Without the options the folder lists the broken image, and embedding it fails (named).
    assert broken in sources.load_dataset(root, tiny_config(str(root))).query.paths
    with pytest.raises(augment.ImageLoadError, match="0999_c1s1_000001_00.jpg"):
        embeddings.split_embeddings(model, tiny_config(str(root)), root, ("query",))


# ------------------------------------------------------------------------------ the cache


def test_cached_embeddings_reuse_and_invalidation(tmp_path):
    calls = []

    def compute(value: float = 1.0):
        def fn():
            calls.append(value)
            return {"features": np.full((2, 3), value, np.float32)}
        return fn

    path = tmp_path / "cache" / "split.npz"
    key = {"paths": ["a.jpg", "b.jpg"], "model_fingerprint": "abc", "image": [32, 16]}
    first = embeddings.cached_embeddings(path, key, compute(1.0))
    assert calls == [1.0] and path.is_file()
    assert first["paths"].tolist() == ["a.jpg", "b.jpg"]
    again = embeddings.cached_embeddings(path, key, compute(2.0))
    assert calls == [1.0]  # reused
    np.testing.assert_array_equal(again["features"], np.ones((2, 3), np.float32))
    assert set(again) == {"paths", "features"}

    embeddings.cached_embeddings(path, {**key, "model_fingerprint": "other"}, compute(3.0))
    assert calls == [1.0, 3.0]  # other weights: recomputed and replaced
    embeddings.cached_embeddings(path, {**key, "paths": ["b.jpg", "a.jpg"]}, compute(4.0))
    assert calls == [1.0, 3.0, 4.0]  # other images (order matters)
    reused = embeddings.cached_embeddings(path, {**key, "paths": ["b.jpg", "a.jpg"]}, compute(5.0))
    assert calls == [1.0, 3.0, 4.0]
    np.testing.assert_array_equal(reused["features"], np.full((2, 3), 4.0, np.float32))
    assert sorted(os.listdir(path.parent)) == ["split.npz"]  # no temporary files left

    path.write_bytes(b"truncated")
    embeddings.cached_embeddings(path, key, compute(6.0))
    assert calls[-1] == 6.0  # an unreadable file is recomputed
    embeddings.cached_embeddings(None, key, compute(7.0))
    assert calls[-1] == 7.0  # no cache path: always computed


def test_cached_embeddings_errors(tmp_path):
    with pytest.raises(ValueError, match="key_info needs 'paths'"):
        embeddings.cached_embeddings(tmp_path / "x.npz", {}, lambda: {})
    with pytest.raises(ValueError, match="expected 2 rows"):
        embeddings.cached_embeddings(tmp_path / "x.npz", {"paths": ["a", "b"]},
                                    lambda: {"features": np.zeros((3, 4))})
    with pytest.raises(ValueError, match="must return 'features'"):
        embeddings.cached_embeddings(tmp_path / "x.npz", {"paths": ["a"]},
                                    lambda: {"pre_bn": np.zeros((1, 4))})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        embeddings.cached_embeddings(tmp_path / "x.npz", {"paths": ["a"], "bad": object()},
                                    lambda: {"features": np.zeros((1, 4))})
    assert not (tmp_path / "x.npz").exists()


def test_model_fingerprint_sees_any_weight():
    a, b = make_model(seed=1), make_model(seed=1)
    assert embeddings.model_fingerprint(a) == embeddings.model_fingerprint(b)
    b.bnneck.bn.mean[...] = b.bnneck.bn.mean[...].at[0].add(1e-7)
    assert embeddings.model_fingerprint(a) != embeddings.model_fingerprint(b)


# ------------------------------------------------------------------------------ splits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dataset) -> str:
    directory = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
    checkpoints.save_checkpoint(directory, 3, model_state=make_model(seed=7),
                                meta={"num_classes": 3, "config": tiny_config(dataset)})
    return directory


def test_load_split_embeddings_and_cache(checkpoint, dataset):
    cache = embeddings.default_cache_dir(checkpoint)
    out = embeddings.load_split_embeddings(checkpoint, None, dataset, ("query", "gallery"), cache)
    data = load_market1501(dataset)
    assert list(out) == ["query", "gallery"]
    for name in ("query", "gallery"):
        s, split = out[name], data.split(name)
        assert s.split == name and s.paths == split.paths
        np.testing.assert_array_equal(s.pids, split.pids)
        np.testing.assert_array_equal(s.cameras, split.cameras)
        assert s.features.shape == (len(split.paths), 256) and s.features.dtype == np.float32
    model, _ = checkpoints.restore_model(checkpoint, None)
    direct = embeddings.embed_images(model, data.query.paths, height=HEIGHT, width=WIDTH)
    np.testing.assert_allclose(out["query"].features, direct, atol=1e-6)

    # Orbax ignores the cache folder inside the checkpoint directory.
    assert checkpoints.latest_step(checkpoint) == 3
    query_cache = os.path.join(cache, "query.npz")
    stamp = os.stat(query_cache).st_mtime_ns
    again = embeddings.load_split_embeddings(checkpoint, tiny_config(dataset), dataset,
                                            ("query",), cache)
    assert os.stat(query_cache).st_mtime_ns == stamp  # reused, not rewritten
    np.testing.assert_array_equal(again["query"].features, out["query"].features)

    # Another image size changes the key: recomputed.
    other = tiny_config(dataset)
    other.data.height = 40
    embeddings.load_split_embeddings(checkpoint, other, dataset, ("query",), cache)
    assert os.stat(query_cache).st_mtime_ns != stamp
    stamp = os.stat(query_cache).st_mtime_ns
    # A re-written image (same name) changes the key too.
    first = data.query.paths[0]
    os.utime(first, ns=(os.stat(first).st_atime_ns, os.stat(first).st_mtime_ns + 10**9))
    embeddings.load_split_embeddings(checkpoint, other, dataset, ("query",), cache)
    assert os.stat(query_cache).st_mtime_ns != stamp


def test_split_embedding_errors(checkpoint, dataset, tmp_path):
    with pytest.raises(ValueError, match="unknown split 'test'"):
        embeddings.load_split_embeddings(checkpoint, None, dataset, ("test",))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        embeddings.load_split_embeddings(tmp_path / "nothing", None, dataset)
    with pytest.raises(FileNotFoundError, match="Market-1501 root"):
        embeddings.load_split_embeddings(checkpoint, None, tmp_path / "no_data")


def test_eval_loader_config_and_data_root(checkpoint, dataset):
    config = tiny_config(dataset)
    loader = embeddings.eval_loader_config(config)
    assert (loader.augment.height, loader.augment.width, loader.num_workers) == (32, 16, 0)
    assert embeddings.eval_loader_config(None).augment.height == 256
    config.data.height = 0
    with pytest.raises(ValueError, match="config.data: .*height and width must be >= 1"):
        embeddings.eval_loader_config(config)
    assert embeddings.resolve_data_root(None, None, checkpoint) == os.path.abspath(dataset)
    assert embeddings.resolve_data_root("/x/y", None, checkpoint) == "/x/y"
    with pytest.raises(ValueError, match="pass --data_root"):
        embeddings.resolve_data_root(None, tiny_config(""), checkpoint)


def test_list_images(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("b.jpg", "a.PNG", "sub/c.jpeg", ".x.jpg", ".hidden/d.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    found = embeddings.list_images(tmp_path)
    assert found == tuple(str(tmp_path / n) for n in ("a.PNG", "b.jpg", "sub/c.jpeg"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        embeddings.list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        embeddings.list_images(tmp_path / "missing")


# ------------------------------------------------------------------------------ the tool


def _run_extract(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "extract_features.py"), *args],
        capture_output=True, text=True, timeout=300)


def test_extract_features_tool(checkpoint, dataset, tmp_path):
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    paths = load_market1501(dataset).query.paths[:3]
    for k, p in enumerate(paths):
        image = Image.open(p).convert("RGB")
        if k == 1:
            image = image.resize((40, 90))  # another size: resized by the tool
        image.save(folder / ("nested" if k == 2 else "") / f"{k}.png")
    head = AttributeHead(256, rngs=nnx.Rngs(2))
    with_head = str(tmp_path / "with_head")
    model, meta = checkpoints.restore_model(checkpoint, None)
    checkpoints.save_checkpoint(with_head, 1, model_state=model, attribute_head_state=head,
                                meta=meta)
    out = tmp_path / "f.npz"
    result = _run_extract(f"--checkpoint={with_head}", f"--image_dir={folder}",
                          f"--output={out}", "--pre_bn")
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    expected_paths = [str(folder / "0.png"), str(folder / "1.png"), str(folder / "nested/2.png")]
    assert arrays["paths"].tolist() == expected_paths
    direct = embeddings.extract(model, expected_paths, height=HEIGHT, width=WIDTH,
                               outputs=("features", "pre_bn", "attributes"), attribute_head=head)
    for name in ("features", "pre_bn", "attributes"):
        np.testing.assert_allclose(arrays[name], direct[name], atol=1e-5)
    assert arrays["features"].shape == (3, 256) and arrays["attributes"].shape == (3, 30)
    assert arrays["attribute_names"][0] == "backpack"

    # Without a head: features only. Errors name what is wrong.
    result = _run_extract(f"--checkpoint={checkpoint}", f"--image_dir={folder}",
                          f"--output={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out, allow_pickle=False) as z:
        assert sorted(z.files) == ["features", "paths"]
    assert "train the head again after training (tools/train_attributes.py)" in result.stderr
    (tmp_path / "empty").mkdir()
    result = _run_extract(f"--checkpoint={checkpoint}", f"--image_dir={tmp_path / 'empty'}",
                          f"--output={out}")
    assert result.returncode != 0 and "holds no images" in result.stderr
    (folder / "z_broken.jpg").write_bytes(b"\xff\xd8 broken")
    result = _run_extract(f"--checkpoint={checkpoint}", f"--image_dir={folder}",
                          f"--output={out}")
    assert result.returncode != 0 and "z_broken.jpg" in result.stderr
    result = _run_extract(f"--checkpoint={tmp_path / 'missing'}", f"--image_dir={folder}",
                          f"--output={out}")
    assert result.returncode != 0 and "does not exist" in result.stderr
