"""Training parity: the project's train step equals the PyTorch reference, step by step.

The reference is ``tests/torch_reference.py`` (ReID-Survey's model, losses, optimizers,
scheduler and update, written from its definitions; no project code). Both sides start from
the same float32 weights (the torch state dict converted with ``reid_jax.convert_torch``) and
the same centers, train on the same P x K batches (a new identity set each step, no
augmentation) and run in float64, so every difference above rounding noise is a semantic one.
After ``STEPS`` updates every parameter (and its displacement), BatchNorm statistic, Adam moment
and center must agree within ``STATE_RTOL`` relative (per tensor, to its largest entry) and
each step's loss terms within ``LOSS_ATOL``. docs/training.md, "Parity with the reference",
lists what this covers and the measured figures.

The JAX side runs under ``jax.enable_x64(True)`` (a context: nothing leaks into other tests of
the same process) with ``config.dtype = "float64"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402

from configs import agw_market1501  # noqa: E402
from reid_jax import convert_torch  # noqa: E402
from reid_jax.models.agw import AGW  # noqa: E402
from reid_jax.train import loop, schedules  # noqa: E402
from reid_jax.train.state import create_train_state  # noqa: E402

WIDTH = 8
# Narrow but structurally complete: every stage with its projection shortcut, non-local blocks
# in layer2 and layer3, GeM, BNNeck. (Their positions after the *last* blocks of a stage are
# checked by the forward parity of tests/test_convert_torch.py.)
BLOCKS = (1, 1, 1, 1)
NON_LOCAL = (0, 1, 1, 0)
IMAGE_HW = (64, 32)
P, K, STEPS = 4, 4, 3
NUM_CLASSES = P * STEPS  # a new identity set each step
EPOCH_ENDS = (2, 3)  # epoch 1: steps 0-1, epoch 2: step 2 (the scheduler steps at epoch start)
# The recipe's semantics with values that make each of them visible in three steps: a rate
# large enough to move every weight, an L2 term comparable to the gradients, a milestone.
BASE_LR = 1e-2
WEIGHT_DECAY = 5e-2
WARMUP_FACTOR, WARMUP_EPOCHS, MILESTONES, GAMMA = 0.01, 10, (2,), 0.1
CENTER_LR, CENTER_LOSS_WEIGHT = 0.5, 5e-4

STATE_RTOL = 1e-6
LOSS_ATOL = 1e-9


def _config():
    config = agw_market1501.get_config()
    config.dtype = "float64"
    config.model.width, config.model.blocks, config.model.non_local = WIDTH, BLOCKS, NON_LOCAL
    config.optim.learning_rate = BASE_LR
    config.optim.weight_decay = WEIGHT_DECAY
    config.optim.warmup_factor = WARMUP_FACTOR
    config.optim.warmup_epochs = WARMUP_EPOCHS
    config.optim.milestones = MILESTONES
    config.optim.gamma = GAMMA
    config.optim.center_lr = CENTER_LR
    config.loss.center_loss_weight = CENTER_LOSS_WEIGHT
    return config


def _batches() -> list[dict[str, np.ndarray]]:
    """STEPS batches ``[id_1 x K, ..., id_P x K]`` of float32 images, identities 4s..4s+3."""
    rng = np.random.default_rng(0)
    return [{"image": rng.standard_normal((P * K, *IMAGE_HW, 3)).astype(np.float32),
             "label": np.repeat(np.arange(P * s, P * (s + 1)), K).astype(np.int32)}
            for s in range(STEPS)]


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return np.asarray(tree, np.float64)


def _as_torch_layout(value: np.ndarray, transform: str) -> np.ndarray:
    """A Flax array in the torch layout of its key (inverse of the importer's transform)."""
    if transform == "conv":
        return np.transpose(value, (3, 2, 0, 1))  # HWIO -> OIHW
    if transform == "linear":
        return value.T
    return value


def _run_torch(state_dict, centers, batches):
    module = ref.AGW(NUM_CLASSES, WIDTH, BLOCKS, NON_LOCAL)
    module.load_state_dict(state_dict)
    module = module.double()
    trainer = ref.Trainer(
        module, NUM_CLASSES, base_lr=BASE_LR, weight_decay=WEIGHT_DECAY, center_lr=CENTER_LR,
        center_loss_weight=CENTER_LOSS_WEIGHT, warmup_factor=WARMUP_FACTOR,
        warmup_iters=WARMUP_EPOCHS, milestones=MILESTONES, gamma=GAMMA,
        centers=torch.from_numpy(centers).double())
    epoch_starts = {0, *EPOCH_ENDS[:-1]}
    terms, lrs = [], []
    for step, batch in enumerate(batches):
        if step in epoch_starts:
            trainer.start_epoch()
        images = torch.from_numpy(batch["image"]).double().permute(0, 3, 1, 2)
        terms.append(trainer.step(images, torch.from_numpy(batch["label"]).long()))
        lrs.append(trainer.lr())
    named = dict(module.named_parameters())
    state = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    adam = {}
    for name, param in named.items():
        if param.requires_grad:
            s = trainer.optimizer.state[param]
            adam[name] = (s["exp_avg"].numpy().copy(), s["exp_avg_sq"].numpy().copy(),
                          int(s["step"]))
    return {"state": state, "adam": adam, "centers": trainer.center.centers.detach().numpy(),
            "terms": terms, "lrs": lrs, "trainable": {k for k, v in named.items()
                                                      if v.requires_grad}}


def _run_jax(path, centers, batches):
    """The project's train step in float64; returns numpy float64 results (torch layouts)."""
    with jax.enable_x64(True):
        config = _config()
        # Every variable comes from the state dict (the importer requires all of them), so the
        # model is built abstractly: no initialiser runs (in float64 each would compile).
        model = nnx.eval_shape(lambda: AGW.from_config(config, NUM_CLASSES, nnx.Rngs(0)))
        nnx.update(model, convert_torch.convert_state_dict(
            convert_torch.load_torch_state_dict(path), model))
        key_map = convert_torch.torch_key_map(model, "agw")
        schedule = schedules.lr_schedule(
            BASE_LR, EPOCH_ENDS, warmup_epochs=WARMUP_EPOCHS, warmup_factor=WARMUP_FACTOR,
            milestones=MILESTONES, gamma=GAMMA)
        state = create_train_state(model, config, schedule)
        state = state.replace(centers=jnp.asarray(centers, jnp.float64))
        dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.non_trainable,
                                                    state.opt_state, state.centers))
                  if jnp.issubdtype(x.dtype, jnp.floating)}
        step_fn = jax.jit(loop.train_step)
        terms, lrs = [], []
        for step, batch in enumerate(batches):
            lrs.append(float(schedule(step)))
            state, metrics = step_fn(state, batch)
            terms.append({k: float(metrics[k]) for k in ("loss", "ce", "triplet", "center")})
        model_state = nnx.to_pure_dict(state.model_state())
        adam = next(s for s in state.opt_state if isinstance(s, optax.ScaleByAdamState))
        mu, nu = nnx.to_pure_dict(adam.mu), nnx.to_pure_dict(adam.nu)
        out = {"state": {}, "adam": {}, "centers": np.asarray(state.centers), "terms": terms,
               "lrs": lrs, "dtypes": dtypes, "count": int(adam.count)}
        for key, (p, transform) in key_map.items():
            out["state"][key] = _as_torch_layout(_get(model_state, p), transform)
            if key.endswith(("running_mean", "running_var")) or key == "bottleneck.bias":
                continue
            out["adam"][key] = tuple(_as_torch_layout(_get(t, p), transform) for t in (mu, nu))
        return out


def _rel(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| / max |theirs| (relative to the tensor's scale)."""
    scale = np.abs(theirs).max()
    assert scale > 0, "a comparison against an all-zero tensor proves nothing"
    return float(np.abs(ours - theirs).max() / scale)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    module = ref.randomize(ref.AGW(NUM_CLASSES, WIDTH, BLOCKS, NON_LOCAL), seed=0,
                           image_hw=IMAGE_HW)
    with torch.no_grad():
        module.bottleneck.bias.fill_(0.05)  # frozen at its checkpoint value, whatever it is
    path = tmp_path_factory.mktemp("parity") / "agw.pth"
    torch.save(module.state_dict(), path)
    initial = {k: v.detach().numpy().astype(np.float64) for k, v in module.state_dict().items()}
    centers = np.random.default_rng(1).standard_normal((NUM_CLASSES, WIDTH * 32)).astype(
        np.float32)  # the reference draws torch.randn: any float32 values
    batches = _batches()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend with the other test workers
    try:
        torch_run = _run_torch(module.state_dict(), centers, batches)
    finally:
        torch.set_num_threads(threads)
    return {"torch": torch_run, "jax": _run_jax(path, centers, batches), "initial": initial,
            "centers": centers.astype(np.float64)}


def parity_figures(runs) -> dict[str, float]:
    """Max relative difference per state group after STEPS steps, max loss-term difference."""
    t, j, initial = runs["torch"], runs["jax"], runs["initial"]
    groups: dict[str, list[float]] = {k: [] for k in (
        "parameters", "parameter updates", "batchnorm statistics", "adam first moments",
        "adam second moments")}
    for key, theirs in t["state"].items():
        if key.endswith("num_batches_tracked") or key == "bottleneck.bias":
            continue
        ours = j["state"][key]
        if key.endswith(("running_mean", "running_var")):
            groups["batchnorm statistics"].append(_rel(ours, theirs))
            continue
        groups["parameters"].append(_rel(ours, theirs))
        groups["parameter updates"].append(_rel(ours - initial[key], theirs - initial[key]))
        mu, nu = j["adam"][key]
        groups["adam first moments"].append(_rel(mu, t["adam"][key][0]))
        groups["adam second moments"].append(_rel(nu, t["adam"][key][1]))
    figures = {k: max(v) for k, v in groups.items()}
    figures["centers"] = _rel(j["centers"], t["centers"])
    figures["center updates"] = _rel(j["centers"] - runs["centers"],
                                     t["centers"] - runs["centers"])
    figures["loss terms (abs)"] = max(abs(a[k] - b[k]) for a, b in zip(j["terms"], t["terms"],
                                                                         strict=True) for k in a)
    return figures


# ----------------------------------------------------------------------------- tests


def test_both_sides_train_the_same_parameters_at_the_same_rates(runs):
    t, j = runs["torch"], runs["jax"]
    assert j["dtypes"] == {jnp.dtype(jnp.float64)}, "the JAX state must be float64"
    # Every trainable torch parameter has an Adam state on both sides, and nothing else does.
    assert set(t["adam"]) == set(j["adam"]) == t["trainable"]
    assert "bottleneck.bias" not in t["trainable"] and "global_pool.p" in t["trainable"]
    assert j["count"] == STEPS and {a[2] for a in t["adam"].values()} == {STEPS}
    # The schedule: per epoch, stepped at epoch start; 0.109 then 0.208 x gamma (milestone 2).
    np.testing.assert_allclose(t["lrs"], [0.109 * BASE_LR] * 2 + [0.208 * GAMMA * BASE_LR],
                               rtol=1e-12)
    np.testing.assert_allclose(j["lrs"], t["lrs"], rtol=1e-12)


def test_loss_terms_match_every_step(runs):
    for step, (ours, theirs) in enumerate(zip(runs["jax"]["terms"], runs["torch"]["terms"],
                                              strict=True)):
        for name in ("ce", "triplet", "center", "loss"):
            # (The reference's center loss adds (C - 1) * 1e-12 from its clamped zeros.)
            assert abs(ours[name] - theirs[name]) <= LOSS_ATOL, (step, name, ours, theirs)
    # Training moved the loss: the steps are not a no-op on either side.
    assert runs["torch"]["terms"][0]["ce"] != runs["torch"]["terms"][1]["ce"]


def test_state_matches_after_three_steps(runs):
    figures = parity_figures(runs)
    bad = {k: v for k, v in figures.items() if k != "loss terms (abs)" and not v <= STATE_RTOL}
    assert not bad, f"relative differences above {STATE_RTOL}: {bad} (all: {figures})"


def test_every_tensor_moved_and_frozen_bias_did_not(runs):
    t, j, initial = runs["torch"], runs["jax"], runs["initial"]
    for key in t["trainable"]:
        assert np.abs(t["state"][key] - initial[key]).max() > 1e-6, f"{key} did not train"
    for key in t["state"]:
        if key.endswith(("running_mean", "running_var")):
            assert np.abs(t["state"][key] - initial[key]).max() > 1e-6, f"{key} did not move"
    np.testing.assert_array_equal(j["state"]["bottleneck.bias"], np.float32(0.05))
    np.testing.assert_array_equal(t["state"]["bottleneck.bias"], np.float32(0.05))
    # Every identity appears in one of the steps, so every center moved.
    moved = np.abs(t["centers"] - runs["centers"]).max(axis=1) > 0
    assert moved.all()
