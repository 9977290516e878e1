"""Tests of the batched input pipeline (reid_jax/data/loader.py)."""

import io
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from PIL import Image

from reid_jax.data import augment as A
from reid_jax.data import loader as L

AUG = A.AugmentConfig(height=32, width=16, pad=2)


def _config(**kwargs):
    return L.LoaderConfig(**{"p": 3, "k": 2, "num_workers": 2, "augment": AUG, **kwargs})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """9 identities, 1 to 5 small JPEGs each (Market-1501-style names)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for pid, count in enumerate([5, 1, 3, 4, 2, 5, 3, 4, 2]):
        for j in range(count):
            pixels = rng.integers(0, 256, size=(32, 16, 3), dtype=np.uint8)
            path = folder / f"{pid:04d}_c{j % 6 + 1}s1_{j:06d}_00.jpg"
            Image.fromarray(pixels).save(path)
            paths.append(str(path))
            labels.append(pid)
    return paths, np.array(labels, np.int32)


def _loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("reid_loader")]


def _collect(loader):
    with loader:
        return [{k: v.copy() for k, v in batch.items()} for batch in loader]


def test_train_batches_fields_and_contents(dataset):
    paths, labels = dataset
    batches = _collect(L.train_batches(paths, labels, config=_config(), seed=5, stop_step=4))
    assert len(batches) == 4
    for step, batch in enumerate(batches):
        assert set(batch) == {"image", "label", "index"}
        assert batch["image"].shape == (6, 32, 16, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
        np.testing.assert_array_equal(batch["label"], labels[batch["index"]])
        groups = batch["label"].reshape(3, 2)
        assert (groups == groups[:, :1]).all() and np.unique(groups[:, 0]).size == 3
        for slot, i in enumerate(batch["index"]):
            expected = A.train_transform(A.read_image(paths[i]), A.image_rng(5, step, slot), AUG)
            np.testing.assert_array_equal(batch["image"][slot], expected)


def test_same_batches_for_any_worker_count_and_backend(dataset):
    paths, labels = dataset
    runs = [
        _collect(L.train_batches(paths, labels, config=_config(**kw), seed=1, stop_step=5))
        for kw in [
            {"num_workers": 0},
            {"num_workers": 1, "prefetch": 1, "images_per_task": 1},
            {"num_workers": 3, "prefetch": 3, "images_per_task": 4},
            {"num_workers": 2, "backend": "process"},
            {"num_workers": 2, "backend": "grain", "prefetch": 1},
        ]
    ]
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_resume_from_step_continues_the_uninterrupted_run(dataset):
    paths, labels = dataset
    loader = L.train_batches(paths, labels, config=_config(), seed=2, stop_step=12)
    epoch_len = loader.sampler.num_batches(0)
    assert epoch_len < 8  # the run below crosses an epoch boundary
    full = _collect(loader)
    resumed_loader = L.train_batches(paths, labels, config=_config(), seed=2, start_step=8)
    assert resumed_loader.step == 8
    with resumed_loader:
        resumed = [next(resumed_loader) for _ in range(4)]
    assert resumed_loader.step == 12
    for a, b in zip(full[8:], resumed, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other_seed = _collect(L.train_batches(paths, labels, config=_config(), seed=3, stop_step=1))
    assert not np.array_equal(other_seed[0]["image"], full[0]["image"])


def test_length_and_stop(dataset):
    paths, labels = dataset
    loader = L.train_batches(paths, labels, config=_config(), seed=0, start_step=3, stop_step=5)
    assert len(loader) == 2
    assert len(list(loader)) == 2
    with pytest.raises(StopIteration):
        next(loader)
    with pytest.raises(TypeError, match="infinite"):
        len(L.train_batches(paths, labels, config=_config(), seed=0))


def test_items_as_encoded_bytes_and_records(dataset):
    paths, labels = dataset
    data = [open(p, "rb").read() for p in paths]
    records = [{"image": d, "pid": int(pid)} for d, pid in zip(data, labels, strict=True)]
    ref = _collect(L.train_batches(paths, labels, config=_config(), seed=4, stop_step=2))
    for items in (data, records):
        got = _collect(L.train_batches(items, labels, config=_config(), seed=4, stop_step=2))
        for a, b in zip(ref, got, strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])


def test_eval_batches_pad_last_batch_with_mask(dataset):
    paths, _ = dataset
    items = paths[:10]
    loader = L.eval_batches(items, 4, config=_config())
    assert len(loader) == 3
    batches = _collect(loader)
    assert [b["image"].shape for b in batches] == [(4, 32, 16, 3)] * 3
    index = np.concatenate([b["index"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(index, list(range(10)) + [-1, -1])
    np.testing.assert_array_equal(mask, [True] * 10 + [False] * 2)
    assert mask.dtype == bool and index.dtype == np.int32
    images = np.concatenate([b["image"] for b in batches])
    for i in range(10):
        np.testing.assert_array_equal(images[i], A.eval_transform(A.read_image(items[i]), AUG))
    assert (images[10:] == 0).all()
    # Exactly divisible: no padding.
    assert all(b["mask"].all() for b in _collect(L.eval_batches(items[:8], 4, config=_config())))


@pytest.mark.parametrize("backend", ["thread", "process", "grain"])
def test_worker_error_names_the_file_and_shuts_down(dataset, tmp_path, backend):
    paths, labels = dataset
    broken = tmp_path / "0003_c2s1_000777_00.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    items = list(paths)
    items[int(np.flatnonzero(labels == 3)[0])] = str(broken)
    config = _config(backend=backend, num_workers=2)
    loader = L.train_batches(items, labels, config=config, seed=0)
    with pytest.raises(A.ImageLoadError, match="0003_c2s1_000777_00.jpg"):
        for _ in range(50):  # identity 3 is drawn within a few steps
            next(loader)
    assert not _loader_threads()
    assert not multiprocessing.active_children()
    with pytest.raises(StopIteration):  # a failed loader stays closed
        next(loader)
    eval_loader = L.eval_batches(items, 4, config=config)
    with pytest.raises(A.ImageLoadError, match="0003_c2s1_000777_00.jpg"):
        list(eval_loader)


def test_early_stop_joins_workers(dataset):
    paths, labels = dataset
    with L.train_batches(paths, labels, config=_config(num_workers=3), seed=0) as loader:
        next(loader)
        assert _loader_threads()
    assert not _loader_threads()
    loader.close()  # idempotent
    loader = L.train_batches(paths, labels, config=_config(num_workers=3), seed=0)
    for _ in loader:
        break
    loader.close()
    assert not _loader_threads()


def test_argument_errors(dataset):
    paths, labels = dataset
    with pytest.raises(ValueError, match=r"labels has shape \(3,\), expected \(29,\)"):
        L.train_batches(paths, labels[:3], seed=0)
    with pytest.raises(ValueError, match="train_batches: no images"):
        L.train_batches([], [], seed=0)
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        L.train_batches(paths, labels, seed=0, start_step=-1)
    with pytest.raises(ValueError, match="stop_step=1 < start_step=2"):
        L.train_batches(paths, labels, seed=0, start_step=2, stop_step=1)
    with pytest.raises(ValueError, match="p=16 identities per batch but labels hold only 9"):
        L.train_batches(paths, labels, seed=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        L.eval_batches(paths, 0)
    with pytest.raises(ValueError, match="eval_batches: no images"):
        L.eval_batches([], 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        L.LoaderConfig(backend="gpu")
    with pytest.raises(ValueError, match="prefetch must be >= 1"):
        L.LoaderConfig(prefetch=0)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        L.LoaderConfig(num_workers=-1)


def test_config_from_dict():
    import ml_collections

    cfg = L.LoaderConfig.from_dict(
        ml_collections.ConfigDict({"p": 8, "height": 64, "width": 32, "erase_area": [0.1, 0.2]})
    )
    assert (cfg.p, cfg.k, cfg.batch_size) == (8, 4, 32)
    assert (cfg.augment.height, cfg.augment.width, cfg.augment.erase_area) == (64, 32, (0.1, 0.2))
    assert cfg.augment.pad == 10
    with pytest.raises(ValueError, match=r"unknown keys \['heigth'\]"):
        L.LoaderConfig.from_dict({"heigth": 3})
    with pytest.raises(ValueError, match=r"unknown keys \['heigth'\]"):
        L.eval_batches(["a.jpg"], 2, config={"heigth": 3})


def test_train_batches_accepts_a_mapping_config(dataset):
    paths, labels = dataset
    flat = {"p": 3, "k": 2, "num_workers": 1, "height": 32, "width": 16, "pad": 2}
    a = _collect(L.train_batches(paths, labels, config=flat, seed=9, stop_step=1))
    b = _collect(L.train_batches(paths, labels, config=_config(), seed=9, stop_step=1))
    np.testing.assert_array_equal(a[0]["image"], b[0]["image"])


def test_to_device_shards_batch_axis_over_devices():
    """Runs in a subprocess: JAX's host device count is fixed at its first use."""
    code = textwrap.dedent(
        """
        import numpy as np, jax
        from reid_jax.data import loader as L
        batch = {"image": np.arange(8 * 2 * 3, dtype=np.float32).reshape(8, 2, 3),
                 "label": np.arange(8, dtype=np.int32)}
        sharding = L.batch_sharding()
        out = L.to_device(batch, sharding)
        assert len(jax.devices()) == 4
        assert out["image"].sharding == sharding and out["label"].sharding == sharding
        assert len(out["image"].addressable_shards) == 4
        assert out["image"].addressable_shards[1].data.shape == (2, 2, 3)
        np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
        np.testing.assert_array_equal(np.asarray(L.to_device(batch)["label"]), batch["label"])
        try:
            L.to_device({"label": np.arange(6)}, sharding)
        except ValueError as e:
            assert "batch['label'] has shape (6,)" in str(e) and "4 shards" in str(e), e
        else:
            raise AssertionError("no error for 6 rows on 4 devices")
        print("ok")
        """
    )
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_read_image_bytes_roundtrip_matches_path(dataset):
    """The loader's bytes path decodes exactly like the file path."""
    paths, _ = dataset
    buf = io.BytesIO(open(paths[0], "rb").read())
    np.testing.assert_array_equal(
        np.asarray(A.read_image(buf.getvalue())), np.asarray(A.read_image(paths[0]))
    )


def test_grain_backend_resumes_and_pads_like_the_threads(dataset):
    paths, labels = dataset
    grain = _config(backend="grain", num_workers=2, prefetch=1)
    full = _collect(L.train_batches(paths, labels, config=_config(), seed=2, stop_step=6))
    resumed = L.train_batches(paths, labels, config=grain, seed=2, start_step=4, stop_step=6)
    assert len(resumed) == 2
    got = _collect(resumed)
    assert resumed.step == 6 and len(got) == 2
    for a, b in zip(full[4:], got, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    want = _collect(L.eval_batches(paths, 4, config=_config()))
    got = _collect(L.eval_batches(paths, 4, config=grain))
    assert len(got) == len(want) == 8
    for a, b in zip(want, got, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_each_process_loads_its_rows_of_the_global_batch(dataset):
    paths, labels = dataset
    config = _config(num_workers=0)
    whole = _collect(L.train_batches(paths, labels, config=config, seed=7, stop_step=3))
    parts = [_collect(L.train_batches(paths, labels, config=config, seed=7, stop_step=3,
                                      process_index=i, process_count=3)) for i in range(3)]
    for step, batch in enumerate(whole):
        for key in batch:
            joined = np.concatenate([part[step][key] for part in parts])
            np.testing.assert_array_equal(joined, batch[key], err_msg=f"step {step} {key}")
    assert parts[0][0]["image"].shape == (2, 32, 16, 3)
    with pytest.raises(ValueError, match="P \\* K = 6 must be divisible by the 4 processes"):
        L.train_batches(paths, labels, config=config, seed=0, process_count=4)
    with pytest.raises(ValueError, match="process_index=2 is not in \\[0, process_count=2\\)"):
        L.train_batches(paths, labels, config=config, seed=0, process_index=2, process_count=2)
