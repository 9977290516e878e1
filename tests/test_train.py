"""Tests of AGW training: schedule, optimizer, train step, resumption, data parallelism.

The training runs use ``configs/agw_tiny.py`` on a tiny synthetic Market-1501 folder written by
``reid_jax.synthetic.dataset`` (8 train identities, 48 train images).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging as logging_std
import math
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from reid_jax import checkpoints, synthetic
from reid_jax.data import augment
from reid_jax.data.market1501 import load_market1501
from reid_jax.data.sampler import RandomIdentitySampler
from reid_jax.models.agw import AGW
from reid_jax.models.attribute_head import AttributeHead
from reid_jax.train import attribute_training, loop, losses, schedules
from reid_jax.train.state import LossConfig, TrainState, build_optimizer, create_train_state

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
STEPS = 6  # length of the resumption runs


def load_config(name: str) -> ml_collections.ConfigDict:
    return importlib.import_module(f"configs.{name}").get_config()


def tiny_config(root: str, **overrides) -> ml_collections.ConfigDict:
    config = load_config("agw_tiny")
    config.data.root = root
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def flat(tree) -> dict[str, np.ndarray]:
    """Leaves of a pytree keyed by path, as float64/int numpy arrays."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[jax.tree_util.keystr(path)] = np.asarray(jax.device_get(leaf))
    return out


def subprocess_env(cpu: bool) -> dict[str, str]:
    """This process's environment for a child python; ``cpu``: force the CPU backend."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    if cpu:
        env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data") / "tiny_market"
    synthetic.generate_dataset(root, synthetic.DatasetConfig(
        num_train_ids=8, num_test_ids=6, images_per_id=6, num_distractors=4, num_junk=2,
        seed=3))
    return str(root)


@pytest.fixture(scope="module")
def straight_run(tiny_root, tmp_path_factory) -> pathlib.Path:
    """An uninterrupted STEPS-step run through the command line tool, in its own process."""
    workdir = tmp_path_factory.mktemp("straight")
    cmd = [sys.executable, str(REPO / "tools" / "train.py"),
           f"--config={CONFIGS / 'agw_tiny.py'}", f"--workdir={workdir}",
           f"--config.data.root={tiny_root}", f"--config.num_train_steps={STEPS}"]
    # Same backend as this process, so its weights can be compared with in-process runs.
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(cpu=False),
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


# ----------------------------------------------------------------------------- schedule


def reference_factor(last_epoch: int, warmup_iters=10, warmup_factor=0.01, milestones=(40, 70),
                     gamma=0.1) -> float:
    """ReID-Survey ``WarmupMultiStepLR.get_lr`` / base_lr, in float64."""
    factor = 1.0
    if last_epoch < warmup_iters:
        alpha = last_epoch / warmup_iters
        factor = warmup_factor * (1 - alpha) + alpha
    return factor * gamma ** sum(m <= last_epoch for m in milestones)


def test_warmup_multistep_factor_matches_reference():
    epochs = np.arange(0, 125)
    got = np.asarray(schedules.warmup_multistep_factor(epochs))
    want = np.array([reference_factor(int(e)) for e in epochs])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # The AGW recipe in numbers: epoch 1 at 0.109, full rate 10..39, x0.1 from 40, x0.01 from 70.
    np.testing.assert_allclose(got[[1, 9, 10, 39, 40, 69, 70, 120]],
                               [0.109, 0.901, 1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
    jitted = jax.jit(schedules.warmup_multistep_factor)(jnp.int32(5))
    np.testing.assert_allclose(jitted, reference_factor(5), rtol=1e-6)


def test_lr_schedule_uses_exact_epoch_boundaries():
    ends = np.array([3, 7, 10, 14])  # epochs of 3, 4, 3, 4 steps
    schedule = schedules.lr_schedule(2.0, ends, warmup_epochs=2, warmup_factor=0.1,
                                     milestones=(3,), gamma=0.5)
    steps = np.arange(0, 16)
    epoch0 = np.searchsorted(ends, steps, side="right").clip(max=3)  # 0-based, past end clipped
    want = [2.0 * reference_factor(int(e) + 1, 2, 0.1, (3,), 0.5) for e in epoch0]
    np.testing.assert_allclose(np.asarray(jax.vmap(schedule)(steps)), want, rtol=1e-6)
    assert float(schedule(2)) == pytest.approx(2.0 * 0.55)  # epoch 1: warmup 0.1 -> 1 at 2
    assert float(schedule(3)) == pytest.approx(2.0)
    assert float(schedule(7)) == pytest.approx(1.0)  # epoch 3 >= milestone 3


def test_epoch_ends_follow_the_sampler():
    labels = np.repeat(np.arange(10), [3, 4, 5, 6, 7, 2, 8, 4, 4, 9])
    sampler = RandomIdentitySampler(labels, p=3, k=2, seed=1)
    ends = schedules.epoch_ends(sampler, 4)
    assert ends.shape == (4,)
    np.testing.assert_array_equal(ends, np.cumsum([sampler.num_batches(e) for e in range(4)]))
    for step in range(int(ends[-1])):
        assert int(schedules.epoch_of_step(step, ends)) == sampler.locate(step)[0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(milestones=(70, 40)), "milestones must be increasing"),
    (dict(warmup_factor=1.5), "warmup_factor must lie in"),
    (dict(warmup_epochs=-1), "warmup_epochs must be >= 0"),
    (dict(gamma=0.0), "gamma must be > 0"),
])
def test_schedule_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.lr_schedule(1e-3, [5, 10], **kwargs)


def test_lr_schedule_rejects_bad_boundaries():
    with pytest.raises(ValueError, match="strictly increasing"):
        schedules.lr_schedule(1e-3, [5, 5, 9])
    with pytest.raises(ValueError, match="base_lr must be > 0"):
        schedules.lr_schedule(0.0, [5])
    with pytest.raises(ValueError, match="num_epochs must be >= 1"):
        schedules.epoch_ends(RandomIdentitySampler(np.arange(4), p=2, k=1, seed=0), 0)


# ----------------------------------------------------------------------------- optimizer


def torch_adam_l2(params, grads_seq, lrs, wd, b1=0.9, b2=0.999, eps=1e-8):
    """``torch.optim.Adam(weight_decay=wd)`` (coupled L2), float64 numpy."""
    p = params.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads_seq, lrs, strict=True), start=1):
        g = g.astype(np.float64) + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        denom = np.sqrt(v) / np.sqrt(1 - b2**t) + eps
        p = p - lr / (1 - b1**t) * m / denom
    return p


def test_optimizer_is_torch_adam_with_coupled_l2():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((5, 3)).astype(np.float32)}
    grads = [{"w": rng.standard_normal((5, 3)).astype(np.float32)} for _ in range(4)]
    schedule = lambda step: 1e-2 * (step + 1.0)  # any step -> lr map
    optim = ml_collections.ConfigDict(dict(weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8))
    tx = build_optimizer(optim, schedule)
    state = tx.init(params)
    p = {"w": jnp.asarray(params["w"])}
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
    want = torch_adam_l2(params["w"], [g["w"] for g in grads], [1e-2 * (t + 1) for t in range(4)],
                         0.05)
    np.testing.assert_allclose(np.asarray(p["w"]), want, rtol=2e-5, atol=1e-6)
    # Coupled, not decoupled: with a zero gradient the first step is -lr * sign(theta).
    state = tx.init(params)
    updates, _ = tx.update({"w": jnp.zeros((5, 3))}, state, {"w": jnp.asarray(params["w"])})
    np.testing.assert_allclose(np.asarray(updates["w"]), -1e-2 * np.sign(params["w"]),
                               rtol=1e-3)  # eps 1e-8 next to |wd * theta| ~ 1e-3


def test_optimizer_rejects_negative_weight_decay():
    optim = ml_collections.ConfigDict(dict(weight_decay=-1.0, b1=0.9, b2=0.999, eps=1e-8))
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        build_optimizer(optim, lambda s: 1e-3)


def test_loss_config_errors():
    config = load_config("agw_tiny")
    config.loss.center_weight = 1.0  # typo of center_loss_weight
    with pytest.raises(ValueError, match=r"config.loss: unknown fields \['center_weight'\]"):
        LossConfig.from_config(config)
    config = load_config("agw_tiny")
    config.loss.label_smoothing = 2.0
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        LossConfig.from_config(config)


# ----------------------------------------------------------------------------- train step


def tiny_state(num_classes=4, lr=1e-3) -> TrainState:
    config = load_config("agw_tiny")
    config.optim.learning_rate = lr
    model = AGW.from_config(config, num_classes, nnx.Rngs(0))
    schedule = schedules.lr_schedule(lr, np.array([100]), warmup_epochs=0)
    return create_train_state(model, config, schedule)


def tiny_batch(num_classes=4, k=2, h=64, w=32, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), k).astype(np.int32)
    return {"image": rng.standard_normal((labels.size, h, w, 3)).astype(np.float32),
            "label": labels}


@pytest.fixture(scope="module")
def first_step():
    """A tiny state, a batch, the jitted train_step and its first result."""
    state, batch = tiny_state(), tiny_batch()
    step = jax.jit(loop.train_step)
    new, metrics = step(state, batch)
    return state, batch, step, new, {k: float(v) for k, v in metrics.items()}


def test_train_step_updates_every_part_of_the_state(first_step):
    state, batch, _, new, metrics = first_step
    # The loss terms, recomputed from a train-mode forward pass of the old weights.
    out = jax.jit(lambda s, x: s.model()(x))(state, batch["image"])
    ce = losses.cross_entropy_label_smooth(out.logits, batch["label"], 0.1)
    tri = losses.weighted_regularized_triplet(out.pre_bn, batch["label"])
    cen = losses.center_loss(out.pre_bn, batch["label"], state.centers)
    assert metrics["ce"] == pytest.approx(float(ce), rel=1e-4)
    assert metrics["triplet"] == pytest.approx(float(tri), rel=1e-4)
    assert metrics["center"] == pytest.approx(float(cen), rel=1e-4)
    assert metrics["loss"] == pytest.approx(float(ce + tri + 5e-4 * cen), rel=1e-4)
    assert metrics["lr"] == pytest.approx(1e-3)
    assert 0.0 <= metrics["accuracy"] <= 1.0

    assert int(new.step) == 1
    # Centers: plain SGD with lr 0.5 on the *unweighted* center loss (update_centers semantics).
    want_centers = state.centers - 0.5 * losses.center_gradients(out.pre_bn, batch["label"],
                                                                 state.centers)
    np.testing.assert_allclose(new.centers, want_centers, rtol=1e-4, atol=1e-6)
    # First Adam step: every parameter moves by at most lr (|m_hat / sqrt(v_hat)| <= 1).
    old_p, new_p = flat(state.params), flat(new.params)
    moves = np.concatenate([np.abs(new_p[k] - old_p[k]).ravel() for k in old_p])
    assert moves.max() <= 1e-3 * (1 + 1e-4) and moves.max() > 0.5e-3
    # BatchNorm statistics move (momentum 0.9 towards the batch's); BNNeck's bias is frozen.
    old_nt, new_nt = flat(state.non_trainable), flat(new.non_trainable)
    bias_key = next(k for k in old_nt if "bnneck" in k and "bias" in k)
    np.testing.assert_array_equal(new_nt[bias_key], old_nt[bias_key])
    stem_mean = next(k for k in old_nt if "['bn1']['mean']" in k and "layer" not in k)
    assert not np.allclose(new_nt[stem_mean], old_nt[stem_mean])


def test_train_step_learns_a_fixed_batch(first_step):
    _, batch, step, state, metrics = first_step
    first = metrics["loss"]
    for _ in range(8):
        state, out = step(state, batch)
    assert float(out["loss"]) < first
    assert int(state.step) == 9


def test_check_finite_names_step_and_terms():
    loop.check_finite(3, {"loss": 1.0, "ce": 0.5, "triplet": 0.5, "center": 2.0})
    with pytest.raises(FloatingPointError,
                       match=r"non-finite loss at step 7: loss=nan, ce=1.0, triplet=inf"):
        loop.check_finite(7, {"loss": math.nan, "ce": 1.0, "triplet": math.inf,
                                   "center": 2.0, "lr": 1e-3})


# ----------------------------------------------------------------------------- config checks


def test_reference_config_is_the_agw_recipe():
    c = load_config("agw_market1501")
    assert (c.data.height, c.data.width, c.data.p, c.data.k) == (256, 128, 16, 4)
    assert (c.optim.learning_rate, c.optim.weight_decay) == (3.5e-4, 5e-4)
    assert (c.optim.warmup_epochs, c.optim.warmup_factor) == (10, 0.01)
    assert tuple(c.optim.milestones) == (40, 70) and c.optim.gamma == 0.1
    assert c.num_epochs == 120 and c.optim.center_lr == 0.5
    assert (c.loss.label_smoothing, c.loss.center_loss_weight) == (0.1, 5e-4)
    assert c.model.width == 64 and tuple(c.model.blocks) == (3, 4, 6, 3)
    assert c.init_from == "" and c.data.root == ""
    c.dtype = "bfloat16"
    assert c.model.dtype == "bfloat16"  # model.dtype follows config.dtype
    s = load_config("agw_synthetic")
    assert s.model.width < c.model.width and s.optim.weight_decay == 5e-4
    assert s.loss.center_loss_weight == 5e-4


@pytest.mark.parametrize("name", ["agw_market1501", "agw_synthetic", "agw_tiny"])
def test_every_augmentation_field_is_set_on_the_command_line(name):
    from absl import flags
    from ml_collections import config_flags

    own = {"agw_market1501": {}, "agw_synthetic": {"erase_prob": 0.0}, "agw_tiny": {"pad": 4}}
    c = load_config(name)
    for field in dataclasses.fields(augment.AugmentConfig):
        if field.name not in ("height", "width"):  # sizes are each config's own
            assert c.data[field.name] == own[name].get(field.name, field.default), field.name
    assert loop.loader_config(c).augment.erase_prob == own[name].get("erase_prob", 0.5)
    argv = ["train.py", f"--config={CONFIGS / (name + '.py')}", "--config.data.erase_prob=0",
            "--config.data.erase_area=(0.1,0.2)", "--config.data.flip_prob=0.25"]
    flag_values = flags.FlagValues()  # as tools/train.py defines its --config
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    aug = loop.loader_config(flag_values.config).augment
    assert (aug.erase_prob, aug.erase_area, aug.flip_prob) == (0.0, (0.1, 0.2), 0.25)


def test_loader_config_rejects_unknown_data_fields():
    config = load_config("agw_tiny")
    config.data.flip_probability = 0.5
    with pytest.raises(ValueError, match=r"config.data: .*unknown keys \['flip_probability'\]"):
        loop.loader_config(config)


def test_reader_and_retrieval_config_fields(tiny_root, tmp_path):
    c = load_config("agw_market1501")
    assert c.data.verify_images is False and c.data.skip_undecodable is False
    assert c.model.retrieval_feature == "post_bn" and c.model.normalize_feature is True
    tiny = load_config("agw_tiny")  # inherited by the other configs
    assert not tiny.data.verify_images and tiny.model.retrieval_feature == "post_bn"
    tiny.data.verify_images = True
    loop.loader_config(tiny)  # reader options are not loader settings
    # Training reads the folder with them: an inconsistent pair fails before any work.
    config = tiny_config(tiny_root, **{"data.skip_undecodable": True})
    with pytest.raises(ValueError, match="skip_undecodable=True needs config.data.verify_images"):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_empty_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="config.data.root is empty"):
        loop.train_and_evaluate(load_config("agw_tiny"), str(tmp_path))


def test_init_from_copies_only_the_backbone(tmp_path):
    config = load_config("agw_tiny")
    source = AGW.from_config(config, 1000, nnx.Rngs(7))
    checkpoints.save_checkpoint(tmp_path / "imagenet", 0, model_state=nnx.state(source),
                                meta={"num_classes": 1000, "config": config})
    config.init_from = str(tmp_path / "imagenet")
    model = AGW.from_config(config, 5, nnx.Rngs(0))
    classifier_before = np.asarray(model.classifier.kernel[...])
    loop.init_backbone_from(model, config)
    got, want = flat(nnx.state(model.backbone)), flat(nnx.state(source.backbone))
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    np.testing.assert_array_equal(model.classifier.kernel[...], classifier_before)


# ----------------------------------------------------------------------------- full runs


def restore_items(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    """Model state and optimizer items of ``step`` as flat numpy arrays."""
    manager = loop.open_checkpoint_manager(str(workdir), None)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{
            checkpoints.MODEL_ITEM: ocp.args.StandardRestore(),
            loop.TRAIN_STATE_ITEM: ocp.args.StandardRestore()}))
    finally:
        manager.close()
    return flat({"model": restored[checkpoints.MODEL_ITEM],
                 "train": restored[loop.TRAIN_STATE_ITEM]})


def test_straight_run_outputs(straight_run, tiny_root):
    ckpt_dir = straight_run / "checkpoints"
    assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [2, 4, 6]
    metrics = json.loads((straight_run / "metrics.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert metrics["step"] == STEPS and metrics["num_valid_queries"] > 0
    for key in ("mAP", "mINP", "rank1", "rank5", "rank10"):
        assert 0.0 <= metrics[key] <= 1.0
    assert len(metrics["cmc"]) == 50
    assert {"loss", "ce", "triplet", "center", "lr", "accuracy"} <= metrics["train"].keys()
    events = list(straight_run.glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    blob = b"".join(p.read_bytes() for p in events)
    for tag in (b"train/loss", b"train/ce", b"train/triplet", b"train/center", b"train/lr",
                b"train/images_per_second", b"eval/mAP", b"eval/rank1"):
        assert tag in blob

    # The model item is what reid_jax.checkpoints.restore_model reads; its evaluation
    # reproduces metrics.json.
    model, meta = checkpoints.restore_model(ckpt_dir, None)
    assert meta["num_classes"] == 8 and meta["step"] == STEPS
    config = ml_collections.ConfigDict(meta["config"])
    data = load_market1501(tiny_root)
    again = loop.evaluate_model(model, data, loop.loader_config(config),
                               loop.create_mesh(), config.data.eval_batch_size)
    assert again["mAP"] == pytest.approx(metrics["mAP"], abs=1e-6)
    assert again["rank1"] == pytest.approx(metrics["rank1"], abs=1e-6)


def test_killed_and_restarted_run_ends_with_the_same_weights(straight_run, tiny_root, tmp_path,
                                                              caplog):
    workdir = tmp_path / "interrupted"
    # Stops after step 3; its checkpoints: step 2 (periodic) and 3 (end of run).
    first = loop.train_and_evaluate(tiny_config(tiny_root, num_train_steps=3), str(workdir))
    assert first["step"] == 3
    # A kill after step 3 but before its checkpoint was written: only step 2 remains.
    shutil.rmtree(workdir / "checkpoints" / "3")
    result = loop.train_and_evaluate(tiny_config(tiny_root, num_train_steps=STEPS),
                                          str(workdir))
    assert result["step"] == STEPS
    got, want = restore_items(workdir, STEPS), restore_items(straight_run, STEPS)
    assert got.keys() == want.keys() and len(got) > 50
    if jax.default_backend() == "cpu":  # deterministic: the same numbers
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)
    else:  # GPU reductions may differ in rounding; Adam turns noise-level gradients into +-lr
        diff = np.concatenate([np.abs(got[k] - want[k]).ravel().astype(np.float64)
                               for k in want if "count" not in k and "step" not in k])
        assert np.mean(diff > 1e-4) < 0.01 and diff.max() <= 2 * STEPS * 1e-3
    straight = json.loads((straight_run / "metrics.json").read_text())
    assert result["mAP"] == pytest.approx(straight["mAP"], abs=1e-6)

    # Resuming a finished run trains nothing more and re-evaluates the same model, also when a
    # later step holds the same state (tools/train_attributes.py adds one with the head).
    shutil.copytree(workdir / "checkpoints" / str(STEPS), workdir / "checkpoints" / str(STEPS + 1))
    changed = tiny_config(tiny_root, num_train_steps=STEPS)
    changed.data.erase_prob, changed.log_every_steps = 0.0, 7
    caplog.clear()  # the resumption above warned of its longer run (num_train_steps)
    with caplog.at_level(logging_std.WARNING):
        again = loop.train_and_evaluate(changed, str(workdir))
    assert again["mAP"] == pytest.approx(result["mAP"], abs=1e-6)
    # ... and says that the model it holds was trained with another config.
    warnings = [r.getMessage() for r in caplog.records if "another config" in r.getMessage()]
    assert len(warnings) == 1 and f"step {STEPS + 1}" in warnings[0], warnings
    assert warnings[0].endswith(": data.erase_prob: 0.5 -> 0.0"), warnings[0]
    # A shorter run cannot resume from a later step.
    with pytest.raises(ValueError, match="past this run's 4 steps"):
        loop.train_and_evaluate(tiny_config(tiny_root, num_train_steps=4), str(workdir))
    # A step that does not fit this config's model is refused with the fields that changed.
    wider = tiny_config(tiny_root, num_train_steps=STEPS)
    width = wider.model.width
    wider.model.width = 2 * width
    with pytest.raises(ValueError, match=(
            rf"cannot resume from checkpoint step {STEPS + 1} .*the fields that differ from the "
            rf"config it was trained with: .*model\.width: {width} -> {2 * width} "
            rf"\(arrays of another shape: backbone\.\S+: stored \[.*{width}.*\] -> built "
            rf"\[.*{2 * width}.*\]")):
        loop.train_and_evaluate(wider, str(workdir))


def test_config_changes_name_the_trained_fields_that_differ():
    config = load_config("agw_tiny")
    saved = json.loads(config.to_json_best_effort())
    assert loop.config_changes(saved, config) == []
    config.optim.milestones = (1, 2)
    config.data.root, config.eval_every_epochs = "/elsewhere", 9  # not what is trained
    config.attributes.epochs = 3  # the head's section
    del saved["model"]["gem_p"]
    assert loop.config_changes(saved, config) == [
        f"model.gem_p: (none) -> {config.model.gem_p}", "optim.milestones: [2] -> [1, 2]"]
    # A config saved before the augmentation fields were in it trained with their defaults.
    synthetic = load_config("agw_synthetic")
    older = json.loads(synthetic.to_json_best_effort())
    for field in dataclasses.fields(augment.AugmentConfig):
        if field.name not in ("height", "width"):
            del older["data"][field.name]
    assert loop.config_changes(older, synthetic) == ["data.erase_prob: 0.5 -> 0.0"]


def test_attribute_head_warning_names_the_step_and_the_fix(tmp_path):
    config = load_config("agw_tiny")
    model = AGW.from_config(config, 4, nnx.Rngs(0))
    head = AttributeHead(model.feature_dim, rngs=nnx.Rngs(1))
    directory = tmp_path / "checkpoints"
    checkpoints.save_checkpoint(directory, 3, model_state=nnx.state(model),
                                meta={"num_classes": 4, "config": config})
    checkpoints.save_checkpoint(directory, 4, model_state=nnx.state(model),
                                attribute_head_state=nnx.state(head),
                                meta={"num_classes": 4, "config": config})
    message = loop.attribute_head_warning(directory, 4, start=3, total_steps=10)
    assert message is not None
    for part in ("checkpoint step 4", "holds an attribute head", "from step 3 to 10",
                 "NO attribute head", "keep_checkpoints may delete step 4",
                 "Train the head again after training (tools/train_attributes.py)"):
        assert part in message
    assert loop.attribute_head_warning(directory, 4, start=10, total_steps=10) is None
    assert loop.attribute_head_warning(directory, 3, start=3, total_steps=10) is None
    assert "train the head again after training (tools/train_attributes.py)" in (
        checkpoints.NO_HEAD_HINT)


def test_training_on_after_the_attribute_head_warns_and_drops_it(straight_run, tiny_root,
                                                                 tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(straight_run, workdir)
    ckpt_dir = workdir / "checkpoints"
    model, _ = checkpoints.restore_model(ckpt_dir, None)
    head = AttributeHead(model.feature_dim, rngs=nnx.Rngs(1))
    head_step = attribute_training.save_with_attribute_head(ckpt_dir, STEPS, nnx.state(model),
                                                           head, {})
    assert head_step == STEPS + 1 and checkpoints.has_attribute_head(ckpt_dir)
    with caplog.at_level(logging_std.WARNING):
        result = loop.train_and_evaluate(
            tiny_config(tiny_root, num_train_steps=STEPS + 2), str(workdir))
    assert result["step"] == STEPS + 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging_std.WARNING]
    assert any(f"checkpoint step {head_step} of" in w and "Train the head again" in w
               for w in warnings), warnings
    assert checkpoints.latest_step(ckpt_dir) == STEPS + 2
    assert not checkpoints.has_attribute_head(ckpt_dir)  # the new step has no head
    assert checkpoints.has_attribute_head(ckpt_dir, head_step)  # the old one is kept


def test_non_finite_loss_stops_with_a_clear_error(tiny_root, tmp_path):
    config = tiny_config(tiny_root, **{"optim.learning_rate": 1e30, "optim.warmup_epochs": 0})
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step \d+: loss="):
        loop.train_and_evaluate(config, str(tmp_path))
    # Checkpoints are written only after the step's loss was checked.
    assert checkpoints.latest_step(tmp_path / "checkpoints") is None


# ----------------------------------------------------------------------------- data parallel

_DATA_PARALLEL_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, numpy as np
    from flax import nnx
    from reid_jax.train import schedules
    from reid_jax.train import loop
    from reid_jax.models.agw import AGW
    from reid_jax.train.state import create_train_state
    from tests.test_train import load_config, tiny_batch, flat

    assert len(jax.devices()) == 2, jax.devices()
    config = load_config("agw_tiny")
    batches = [tiny_batch(num_classes=4, k=2, seed=s) for s in range(3)]

    def run(devices):
        mesh = loop.create_mesh(devices)
        model = AGW.from_config(config, 4, nnx.Rngs(0))
        state = create_train_state(model, config, schedules.lr_schedule(1e-3, np.array([50])))
        state = jax.device_put(state, loop.replicated(mesh))
        step = loop.jit_train_step(mesh)
        losses = []
        for b in batches:
            sharded = loop.shard_batch(b, mesh)
            assert len(sharded["image"].sharding.device_set) == len(devices)
            state, metrics = step(state, sharded)
            losses.append(float(metrics["loss"]))
        return losses, flat({"p": state.params, "n": state.non_trainable, "c": state.centers})

    loss1, state1 = run(jax.devices()[:1])
    loss2, state2 = run(jax.devices())
    diff = np.concatenate([np.abs(state1[k] - state2[k]).ravel() for k in state1])
    centers = float(np.max(np.abs(state1["['c']"] - state2["['c']"])))
    try:
        loop.shard_batch({"x": np.zeros((3, 2))}, loop.create_mesh())
        shard_error = ""
    except ValueError as e:
        shard_error = str(e)
    print(json.dumps({"loss1": loss1, "loss2": loss2, "max_diff": float(diff.max()),
                      "frac_over_1e-5": float(np.mean(diff > 1e-5)), "centers": centers,
                      "shard_error": shard_error}))
""")


def test_two_devices_match_one_device():
    proc = subprocess.run([sys.executable, "-c", _DATA_PARALLEL_SCRIPT], capture_output=True,
                          text=True, env=subprocess_env(cpu=True), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(result["loss2"], result["loss1"], rtol=1e-5)
    # Same global-batch computation up to float rounding. A few parameters get only rounding
    # noise as gradient (e.g. the stem BN bias: every path after it is re-normalised by a BN)
    # and Adam scales noise to +-lr, so their sign may differ: bounded by 2 * steps * lr.
    assert result["frac_over_1e-5"] < 0.01
    assert result["max_diff"] <= 2 * 3 * 1e-3
    assert result["centers"] < 1e-4
    assert "divisible by the 2 shards" in result["shard_error"]
