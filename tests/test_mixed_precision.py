"""bfloat16 training: bf16 compute, float32 master weights, statistics and optimizer state.

Twenty steps of ``configs/agw_tiny.py`` in bfloat16 on the real input pipeline
(``tiny_dataset``, AGW augmentation, P x K sampler, the run's schedule). At every step the same
state also takes a float32 step on the same batch, so each bf16 step is compared with float32
from the same weights: the loss terms within the tolerances below, the updates within Adam's
sign-flip envelope. (Two free-running trajectories are no yardstick: a 1-ulp change of the
float32 initial weights already moves the tiny config's loss by up to 4e-3 within 20 steps,
rounding only the *input images* to bfloat16 by up to 1.1e-1; docs/training.md, "Precision".)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import agw_tiny
from reid_jax.data import loader as loader_lib
from reid_jax.data import sources
from reid_jax.data.sampler import RandomIdentitySampler
from reid_jax.models.agw import AGW
from reid_jax.train import loop, schedules
from reid_jax.train.state import create_train_state

STEPS = 20
# |bf16 - float32| / |float32| of a step's loss terms from the same state (measured maxima on
# the tiny config in docs/training.md: loss 9.8e-3, mean 3.6e-3; ce 6.0e-4; center 3.3e-3; the
# maximum moves with the trajectory, 1.4e-2 and 1.8e-2 in other measured variants).
# The weighted triplet loss on an untrained 256-d feature is the sensitive term: its soft
# margins are differences of nearly equal distances.
LOSS_RTOL_MAX = 3e-2
LOSS_RTOL_MEAN = 1e-2
CE_RTOL = 3e-3
CENTER_RTOL = 1e-2
# Adam's first updates are ~lr * sign(g): where bf16 flips the sign of a tiny gradient entry
# the two updates differ by up to ~2 lr; nothing may move further than that.
UPDATE_ENVELOPE = 2.5


@pytest.fixture(scope="module")
def runs(tiny_dataset):
    config = agw_tiny.get_config()
    config.data.root = tiny_dataset
    config.num_epochs = 6  # about 6 steps an epoch: 20 steps span warmup, full rate, a milestone
    data = sources.load_dataset(tiny_dataset, config)
    loader_cfg = loop.loader_config(config)
    sampler = RandomIdentitySampler(data.train.labels, loader_cfg.p, loader_cfg.k,
                                    seed=config.seed)
    ends = schedules.epoch_ends(sampler, config.num_epochs)
    assert ends[-1] >= STEPS
    schedule = schedules.lr_schedule(
        config.optim.learning_rate, ends, warmup_epochs=config.optim.warmup_epochs,
        warmup_factor=config.optim.warmup_factor, milestones=tuple(config.optim.milestones),
        gamma=config.optim.gamma)
    num_classes = data.num_train_ids
    init = nnx.state(AGW.from_config(config, num_classes, nnx.Rngs(config.seed)))
    states = {}
    for dtype in ("float32", "bfloat16"):
        config.dtype = dtype  # config.model.dtype follows
        model = nnx.eval_shape(lambda: AGW.from_config(config, num_classes, nnx.Rngs(0)))
        nnx.update(model, init)  # the same initial weights in both precisions
        states[dtype] = create_train_state(model, config, schedule)
    step_fn = jax.jit(loop.train_step)
    state, template32 = states["bfloat16"], states["float32"]
    history = []
    with loader_lib.train_batches(data.train.paths, data.train.labels, config=loader_cfg,
                                  seed=config.seed, stop_step=STEPS) as stream:
        for host_batch in stream:
            batch = {"image": host_batch["image"], "label": host_batch["label"]}
            as32 = template32.replace(**{k: getattr(state, k) for k in (
                "step", "params", "non_trainable", "opt_state", "centers", "center_opt_state")})
            new32, metrics32 = step_fn(as32, batch)
            new16, metrics16 = step_fn(state, batch)
            moved = max(float(jnp.abs(a - b).max()) for a, b in zip(
                jax.tree.leaves(new16.params), jax.tree.leaves(new32.params), strict=True))
            history.append({"float32": {k: float(v) for k, v in metrics32.items()},
                            "bfloat16": {k: float(v) for k, v in metrics16.items()},
                            "update_difference": moved})
            state = new16
    return {"state": state, "history": history, "batch": batch}


def relative_differences(history) -> dict[str, np.ndarray]:
    """Per step |bf16 - float32| / |float32| of each loss term (from the same state)."""
    return {k: np.array([abs(h["bfloat16"][k] - h["float32"][k]) / abs(h["float32"][k])
                         for h in history]) for k in ("loss", "ce", "triplet", "center")}


def test_every_bfloat16_step_tracks_float32_from_the_same_state(runs):
    history = runs["history"]
    assert len(history) == STEPS
    rel = relative_differences(history)
    assert rel["loss"].max() <= LOSS_RTOL_MAX, rel["loss"]
    assert rel["loss"].mean() <= LOSS_RTOL_MEAN, rel["loss"]
    assert rel["ce"].max() <= CE_RTOL, rel["ce"]
    assert rel["center"].max() <= CENTER_RTOL, rel["center"]
    for h in history:
        assert h["update_difference"] <= UPDATE_ENVELOPE * h["float32"]["lr"], h
    # Training happened: the rate is positive and the bf16 loss moved.
    assert min(h["float32"]["lr"] for h in history) > 0
    assert history[0]["bfloat16"]["loss"] != history[-1]["bfloat16"]["loss"]


def test_only_compute_is_bfloat16(runs):
    state = runs["state"]
    f32 = jnp.dtype(jnp.float32)
    stored = {"params": state.params, "batch statistics and frozen bias": state.non_trainable,
              "optimizer state": state.opt_state, "centers": state.centers}
    for name, tree in stored.items():
        floats = {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
        assert floats == {f32}, f"{name}: {floats}"
    stats = nnx.state(state.model(), nnx.BatchStat)
    assert {x.dtype for x in jax.tree.leaves(stats)} == {f32}
    # The backbone computes in bfloat16; the features the losses see are float32.
    out = jax.jit(lambda s, x: s.model()(x))(state, runs["batch"]["image"])
    assert out.feature_map.dtype == jnp.bfloat16
    assert out.pre_bn.dtype == out.post_bn.dtype == out.logits.dtype == f32
    # ... and the conv kernels really run in bfloat16 (not float32 with bf16 storage).
    conv_out = state.model().backbone.conv1(jnp.asarray(runs["batch"]["image"]))
    assert conv_out.dtype == jnp.bfloat16
