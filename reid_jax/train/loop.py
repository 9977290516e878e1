"""AGW training: one jitted pure ``train_step`` on an explicit state, data parallel, resumable.

``train_and_evaluate(config, workdir)`` is the whole run (``tools/train.py`` calls it):

1. reads Market-1501 from ``config.data.source`` (``reid_jax.data.sources.load_dataset``): the
   folder ``config.data.root`` (``config.data.verify_images`` / ``skip_undecodable``) or its
   TFDS ``market1501`` array_record files (``reid_jax.data.sources``);
2. builds AGW from ``config.model`` (``config.init_from``: the backbone from a converted
   ImageNet / AGW checkpoint), the :class:`~reid_jax.train.state.TrainState` and the learning
   rate schedule of the AGW recipe over the sampler's exact epochs (``reid_jax.train.schedules``);
3. restores the latest checkpoint of ``workdir/checkpoints`` if there is one (a step that
   ``tools/train_attributes.py`` added with an attribute head resumes like any other, but the
   steps trained after it carry no head: the embedding changes, so the head would be stale; a
   warning says so, and the head must be trained again after training);
4. runs :func:`train_step` on P x K batches from ``reid_jax.data.loader.train_batches``, started
   at the restored step, logging losses, learning rate, images/s and ETA (absl logging and
   TensorBoard scalars in ``workdir``), saving checkpoints every
   ``config.checkpoint_every_steps`` steps (the last ``config.keep_checkpoints`` are kept) and
   evaluating every ``config.eval_every_epochs`` epochs;
5. evaluates on query / gallery at the end and writes ``workdir/metrics.json``.

Resuming is exact: the state holds every array a step reads and writes, the learning rate is a
function of the step, and batch ``s`` is a pure function of ``(data, config, seed, s)``, so a
run killed after a checkpoint and restarted ends with the same weights as an uninterrupted run.

The loss (docs/training.md, "Losses")::

    out   = AGW(images)                                   # train mode: batch statistics
    loss  = CE_ls(out.logits, y; eps=0.1)                 # identity loss on the BNNeck output
          + WRT(out.pre_bn, y)                            # weighted regularised triplet
          + 5e-4 * Center(out.pre_bn, y, centers)         # centers: own SGD, lr 0.5

Data parallelism: a ``jax.sharding.Mesh`` over all devices with one axis ``"data"``; the batch
is sharded along it, the state is replicated, and ``jit`` inserts the collectives. BatchNorm
statistics and the triplet loss are computed over the *global* batch (as on one device), so the
result does not depend on the number of devices beyond float rounding. The global batch
``P * K`` must be divisible by the number of devices.

Multi-host (e.g. 2 hosts x 8 GPUs): start the same command on every host with
``--jax_distributed``, so that ``tools/train.py`` calls ``jax.distributed.initialize()`` before
anything else. On SLURM, Open MPI, Cloud TPU and Kubernetes it finds its peers by itself;
elsewhere name them::

    # on host i of N (host0 runs process 0)
    python tools/train.py --jax_distributed --coordinator_address=host0:1234 \
        --num_processes=N --process_id=i --config=configs/agw_market1501.py \
        --workdir=/shared/run1 --config.data.root=/data/Market-1501-v15.09.15

The mesh then spans every device of every host. Each host runs the same deterministic sampler
but loads and augments only its own contiguous slice of every global batch (the same pixels as
those rows of a one-process run) and feeds it with ``jax.make_array_from_process_local_data``;
``workdir`` must be a folder all hosts see (orbax writes one checkpoint together); process 0
writes logs, TensorBoard and ``metrics.json``. Commands for N hosts (SLURM and plain):
docs/scaling.md, "Multi-host training".
"""

from __future__ import annotations

import json
import logging as logging_std
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx, traverse_util
from jax.experimental import multihost_utils

from reid_jax import atomic_io, checkpoints, embeddings, evaluation
from reid_jax.data import augment, sources
from reid_jax.data import loader as loader_lib
from reid_jax.data.market1501 import Market1501
from reid_jax.data.sampler import RandomIdentitySampler
from reid_jax.models.agw import AGW
from reid_jax.progress import format_seconds
from reid_jax.train import losses, schedules
from reid_jax.train.state import TrainState, create_train_state

TRAIN_STATE_ITEM = checkpoints.TRAIN_STATE_ITEM
CHECKPOINT_SUBDIR = "checkpoints"
METRICS_FILE = "metrics.json"
DATA_AXIS = "data"
# config.data fields that are not loader settings.
_NON_LOADER_DATA_FIELDS = ("root", "eval_batch_size", "verify_images", "skip_undecodable",
                           "source", "tfds_data_dir", "tfds_config")

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]


# ----------------------------------------------------------------------------- devices


def create_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("create_mesh: no devices")
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Every device holds the whole array (the train state)."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharded(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Axis 0 split over ``"data"`` (batches), the rest replicated."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def _check_divisible(batch_size: int, mesh: jax.sharding.Mesh, what: str) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(f"{what} = {batch_size} must be divisible by the {n} devices of the "
                         "mesh (data parallelism splits every batch evenly)")


def shard_local_batch(batch: Batch, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Places this process's rows of a global batch on the mesh, split on axis 0.

    With ``n`` processes each passes its ``B/n`` rows (``reid_jax.data.loader.train_batches``
    with ``process_index`` / ``process_count``); together they form one global ``[B, ...]``
    array (``jax.make_array_from_process_local_data``). With one process: ``shard_batch``.
    """
    return loader_lib.to_device(batch, batch_sharded(mesh))


def shard_batch(batch: Batch, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Places a host batch (the same global batch on every host) on the mesh, split on axis 0.

    With several processes each passes only its contiguous slice of rows, so the global array
    is the host batch itself (``reid_jax.data.loader.global_to_device``).
    """
    return loader_lib.global_to_device(batch, batch_sharded(mesh))


# ----------------------------------------------------------------------------- steps


def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """One AGW update (the loss in the module docstring); pure, jit it.

    It is the reference's update step for step (docs/training.md, "The training step"; tested
    against a PyTorch implementation in float64 by tests/test_train_parity.py).

    Args:
      state: the current state.
      batch: ``{"image": float32 [B, H, W, 3] (normalised NHWC), "label": int32 [B]}`` with
        train labels in ``[0, C)``; other keys are ignored.

    Returns:
      ``(new_state, metrics)``; metrics are float32 scalars: ``loss`` (total), ``ce``,
      ``triplet``, ``center`` (unweighted), ``accuracy`` (classifier top-1 on the batch),
      ``triplet_ordering`` (anchors with closest negative beyond furthest positive) and ``lr``
      (the rate this update used).
    """
    images, labels = batch["image"], batch["label"]
    cfg = state.loss

    def loss_fn(params: nnx.State) -> tuple[jax.Array, tuple[Any, ...]]:
        # copy=True: fresh variables at this trace level, so the forward pass may update the
        # BatchNorm statistics in place (the state's own variables belong to the outer trace).
        model = nnx.merge(state.graphdef, params, state.non_trainable, copy=True)
        out = model(images)
        ce = losses.cross_entropy_label_smooth(out.logits, labels, cfg.label_smoothing)
        triplet, triplet_aux = losses.weighted_regularized_triplet_with_aux(
            out.pre_bn, labels, cfg.triplet_normalize)
        center = losses.center_loss(out.pre_bn, labels, state.centers)
        total = ce + triplet + cfg.center_loss_weight * center
        _, _, non_trainable = nnx.split(model, nnx.Param, ...)
        terms = {"ce": ce, "triplet": triplet, "center": center,
                 "triplet_ordering": triplet_aux["ordering_accuracy"]}
        return total, (non_trainable, out.pre_bn, out.logits, terms)

    (total, (non_trainable, pre_bn, logits, terms)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    centers, center_opt_state = losses.update_centers(
        state.centers, state.center_opt_state, pre_bn, labels, optimizer=state.center_tx)
    metrics = {
        "loss": total,
        **terms,
        "accuracy": jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)),
        "lr": jnp.asarray(state.lr_schedule(state.step), jnp.float32),
    }
    new_state = state.replace(
        step=state.step + 1, params=params, non_trainable=non_trainable, opt_state=opt_state,
        centers=centers, center_opt_state=center_opt_state)
    return new_state, metrics


def jit_train_step(mesh: jax.sharding.Mesh):
    """``train_step`` jitted for ``mesh``: state replicated, batch sharded along ``"data"``."""
    rep, data = replicated(mesh), batch_sharded(mesh)
    return jax.jit(train_step, in_shardings=(rep, data), out_shardings=(rep, rep))


# ----------------------------------------------------------------------------- evaluation


def evaluate_model(
    model: AGW | TrainState,
    data: Market1501,
    loader_config: loader_lib.LoaderConfig,
    mesh: jax.sharding.Mesh,
    batch_size: int,
) -> dict[str, Any]:
    """Market-1501 re-id metrics of ``model`` on ``data.query`` vs ``data.gallery``.

    Embeddings are the retrieval embeddings of ``reid_jax.embeddings.extract`` (eval mode,
    batches of ``batch_size`` split over ``mesh``; ``config.model.retrieval_feature``, by default
    post-BN, L2-normalised), distances squared Euclidean (docs/design.md, "AGW as the reference
    has it"); metrics from ``reid_jax.evaluation.retrieval_metrics``.

    Args:
      model: an ``AGW`` (e.g. from ``checkpoints.restore_model``) or a training state.
      data: the dataset (its query and gallery splits are embedded).
      loader_config: resize / normalisation (``loader_config(config)``).
      mesh: devices to run on; ``batch_size`` must be divisible by their number.
      batch_size: images per step (the last batch is padded).

    Returns:
      ``{"mAP", "mINP", "rank1", "rank5", "rank10", "cmc" (list of 50), "num_valid_queries"}``.
    """
    _check_divisible(batch_size, mesh, "config.data.eval_batch_size")
    if isinstance(model, TrainState):
        model = model.model()
    elif not isinstance(model, AGW):
        raise ValueError(f"expected an AGW model or a TrainState, got {type(model).__name__}")
    aug = loader_config.augment
    features = [
        embeddings.extract(model, split.items, height=aug.height, width=aug.width,
                          batch_size=batch_size, mesh=mesh, loader_config=loader_config,
                          description=f"eval {name} embeddings")[embeddings.FEATURES]
        for name, split in (("query", data.query), ("gallery", data.gallery))]
    return evaluation.retrieval_metrics(*features, data.query.pids, data.gallery.pids,
                                        data.query.cameras, data.gallery.cameras)


# ----------------------------------------------------------------------------- checkpoints


def open_checkpoint_manager(workdir: str, keep: int | None) -> ocp.CheckpointManager:
    """The run's manager on ``workdir/checkpoints`` (layout of ``reid_jax.checkpoints``)."""
    return checkpoints.open_manager(os.path.join(workdir, CHECKPOINT_SUBDIR), max_to_keep=keep)


def _config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


# Settings of how a run reads, logs and saves, not of what it trains, and the sections the
# training does not read (the attribute head's and the explanations'): a resumed run may change
# them without a word.
_UNTRAINED_FIELDS = frozenset({
    "data.root", "data.source", "data.tfds_data_dir", "data.tfds_config", "data.num_workers",
    "data.prefetch", "data.backend", "data.eval_batch_size", "data.verify_images",
    "data.skip_undecodable", "log_every_steps", "eval_every_epochs", "checkpoint_every_steps",
    "keep_checkpoints"})
_UNTRAINED_SECTIONS = ("attributes.", "explain.")


def config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """``"path: saved -> now"`` for every training field whose value in ``config`` differs from
    the ``saved`` config (a checkpoint's ``meta['config']``); fields of one side only count,
    shown as ``(none)``, but an augmentation field a saved config lacks is the default the loader
    trained with. Runtime fields and the head's and explanations' sections are left out
    (docs/design.md, "Resuming")."""
    before = traverse_util.flatten_dict(saved, sep=".")
    now = traverse_util.flatten_dict(_config_json(config), sep=".")
    for name, value in augment.recipe_defaults().items():
        before.setdefault(f"data.{name}", list(value) if isinstance(value, tuple) else value)
    changes = []
    for path in sorted(set(before) | set(now)):
        if path in _UNTRAINED_FIELDS or path.startswith(_UNTRAINED_SECTIONS):
            continue
        old, new = before.get(path, "(none)"), now.get(path, "(none)")
        if old != new:
            changes.append(f"{path}: {old} -> {new}")
    return changes


def save_train_checkpoint(
    manager: ocp.CheckpointManager,
    state: TrainState,
    config: ml_collections.ConfigDict,
    num_classes: int,
    epoch: int,
) -> int:
    """Saves ``state`` as step ``state.step`` (async; ``manager.wait_until_finished()``).

    Items: ``model`` (``nnx.State``, readable by ``reid_jax.checkpoints.restore_model``),
    ``train_state`` (step, optimizer and center states, rng) and ``meta`` (``num_classes``,
    ``config``, ``step``, ``epoch``).
    """
    step = int(jax.device_get(state.step))
    meta = {"num_classes": int(num_classes), "config": _config_json(config), "step": step,
            "epoch": int(epoch)}
    manager.save(step, args=ocp.args.Composite(**{
        checkpoints.MODEL_ITEM: ocp.args.StandardSave(state.model_state()),
        TRAIN_STATE_ITEM: ocp.args.StandardSave(state.optimizer_items()),
        checkpoints.META_ITEM: ocp.args.JsonSave(meta),
    }), force=True)
    return step


def _abstract(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_train_checkpoint(
    manager: ocp.CheckpointManager, state: TrainState, step: int,
    changes: Sequence[str] = (),
) -> TrainState:
    """``state`` with every array replaced by step ``step`` of ``manager`` (same shardings).

    ``changes`` are the trained fields in which this run's config differs from the one the step
    was trained with (:func:`config_changes`); a step that cannot be restored into ``state``
    names them, since a changed field (``model.width``) is the usual cause.
    """
    def refuse(cause: str) -> ValueError:
        differ = (f"; the fields that differ from the config it was trained with: "
                  f"{'; '.join(changes)}" if changes else "")
        return ValueError(
            f"cannot resume from checkpoint step {step} in {manager.directory}: it does not "
            f"match the model/optimizer built from this config{differ} ({cause}). Use a new "
            "--workdir or the config the run was started with.")

    model_state, optimizer_items = state.model_state(), state.optimizer_items()
    # Shapes first, from the metadata: a clear list, and no failing asynchronous reads.
    differ = checkpoints.stored_shape_mismatches(manager, step, {
        checkpoints.MODEL_ITEM: model_state, TRAIN_STATE_ITEM: optimizer_items})
    if differ:
        raise refuse("arrays of another shape: " + "; ".join(differ))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{
            checkpoints.MODEL_ITEM: ocp.args.StandardRestore(_abstract(model_state)),
            TRAIN_STATE_ITEM: ocp.args.StandardRestore(_abstract(optimizer_items)),
        }))
    except (ValueError, KeyError, TypeError) as e:
        raise refuse(str(e)) from e
    state = state.with_model_state(restored[checkpoints.MODEL_ITEM])
    return state.with_optimizer_items(restored[TRAIN_STATE_ITEM])


# Kept here too for the tools that log it beside training messages.


def attribute_head_warning(checkpoint_dir: str | os.PathLike, step: int, start: int,
                           total_steps: int) -> str | None:
    """The warning logged when training resumes from a step that holds an attribute head.

    ``tools/train_attributes.py`` saves the head as a new step of the run's checkpoints. Training
    on from it (``start < total_steps``) writes later steps without a head, on purpose: the
    embedding changes with training, so the head would no longer fit it. Returns the message
    (None when ``step`` has no head or nothing is left to train).
    """
    if start >= total_steps or not checkpoints.has_attribute_head(checkpoint_dir, step):
        return None
    return (f"checkpoint step {step} of {os.fspath(checkpoint_dir)} holds an attribute head "
            f"(tools/train_attributes.py). Training continues from step {start} to "
            f"{total_steps} and the steps it writes have NO attribute head: training changes the "
            "embedding, so the head would be stale and is dropped (and keep_checkpoints may "
            f"delete step {step}). Train the head again after training "
            "(tools/train_attributes.py).")


def init_backbone_from(model: AGW, config: ml_collections.ConfigDict) -> None:
    """Copies the backbone (ResNet + non-local blocks) of ``config.init_from`` into ``model``.

    ``config.init_from`` is a checkpoint directory written by ``tools/convert_torch.py``
    (torchvision's ImageNet ResNet-50, or a reference AGW model); GeM, BNNeck and classifier
    keep their initial values. Its architecture must match ``config.model``.
    """
    restored, meta = checkpoints.restore_model(config.init_from, config)
    nnx.update(model.backbone, nnx.state(restored.backbone))
    logging.info("initialised the backbone from %s (%s)", config.init_from,
                 meta.get("converted_from", "checkpoint"))


# ----------------------------------------------------------------------------- logging


class _DropOrbaxInfo(logging_std.Filter):
    """Passes every record but INFO and below from orbax's modules."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno > logging_std.INFO or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logging() -> None:
    """Hides orbax's INFO lines (a dozen per checkpoint) from absl logging; warnings stay."""
    absl_logger = logging.get_absl_logger()
    if not any(isinstance(f, _DropOrbaxInfo) for f in absl_logger.filters):
        absl_logger.addFilter(_DropOrbaxInfo())


def check_finite(step: int, metrics: dict[str, float], last_saved: int | None = None) -> None:
    """Raises ``FloatingPointError`` naming ``step`` and the loss terms if one is not finite.

    ``last_saved``: the newest committed checkpoint step, named in the message (``None``: no
    checkpoint has been saved, and the message says so).
    """
    terms = ("loss", "ce", "triplet", "center")
    if all(math.isfinite(metrics[k]) for k in terms if k in metrics):
        return
    values = ", ".join(f"{k}={metrics[k]!r}" for k in terms if k in metrics)
    saved = ("no checkpoint has been saved yet" if last_saved is None
             else f"the last checkpoint, step {last_saved}, is intact")
    raise FloatingPointError(
        f"non-finite loss at step {step}: {values} (lr={metrics.get('lr')!r}); stopping. "
        f"Lower config.optim.learning_rate or check the data; {saved}.")


class _Scalars:
    """TensorBoard scalars in ``workdir`` (process 0 only; a no-op elsewhere)."""

    def __init__(self, workdir: str):
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=workdir)

    def write(self, step: int, prefix: str, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{prefix}/{key}", value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


# ----------------------------------------------------------------------------- the run


def loader_config(config: ml_collections.ConfigDict) -> loader_lib.LoaderConfig:
    """``LoaderConfig`` from ``config.data`` (every field but ``root`` / ``eval_batch_size``)."""
    fields = {k: v for k, v in config.data.items() if k not in _NON_LOADER_DATA_FIELDS}
    try:
        return loader_lib.LoaderConfig.from_dict(fields)
    except ValueError as e:
        raise ValueError(f"config.data: {e}") from e


def _num_train_steps(config: ml_collections.ConfigDict, ends: np.ndarray) -> int:
    full = int(ends[-1])
    requested = int(config.get("num_train_steps", -1))
    if requested <= 0:
        return full
    return min(requested, full)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains AGW as ``config`` says, resuming from ``workdir``; returns the final metrics.

    Args:
      config: see ``configs/agw_market1501.py`` for every field.
      workdir: run folder: ``checkpoints/``, TensorBoard events, ``metrics.json``.

    Returns:
      The contents written to ``workdir/metrics.json``.

    Raises:
      FloatingPointError: a loss term became NaN or infinite (the step is named).
      ValueError / FileNotFoundError: a config field or the data is wrong (named).
    """
    workdir = os.path.abspath(workdir)
    # The folder source needs a root; the TFDS one only to prepare (reid_jax.data.sources).
    if sources.source_name(config) == "folder" and not config.data.root:
        raise ValueError("config.data.root is empty: pass --config.data.root=/path/to/"
                         "Market-1501 (a real or tools/make_synthetic.py folder)")
    mesh = create_mesh()
    loader_cfg = loader_config(config)
    _check_divisible(loader_cfg.batch_size, mesh, "config.data.p * config.data.k")
    logging.info("devices: %d x %s on %d process(es); global batch %d (P=%d x K=%d)",
                 mesh.devices.size, jax.devices()[0].platform, jax.process_count(),
                 loader_cfg.batch_size, loader_cfg.p, loader_cfg.k)

    _check_divisible(config.data.eval_batch_size, mesh, "config.data.eval_batch_size")

    data = sources.load_dataset(config.data.root, config)
    num_classes = data.num_train_ids
    # The loader's own sampler (same labels, P, K, seed): its exact epoch lengths.
    sampler = RandomIdentitySampler(data.train.labels, loader_cfg.p, loader_cfg.k,
                                    seed=config.seed)
    ends = schedules.epoch_ends(sampler, config.num_epochs)
    total_steps = _num_train_steps(config, ends)
    schedule = schedules.lr_schedule(
        config.optim.learning_rate, ends, warmup_epochs=config.optim.warmup_epochs,
        warmup_factor=config.optim.warmup_factor, milestones=tuple(config.optim.milestones),
        gamma=config.optim.gamma)
    logging.info("%d epochs = %d steps (%.1f per epoch); training %d steps", config.num_epochs,
                 int(ends[-1]), ends[-1] / config.num_epochs, total_steps)

    model = AGW.from_config(config, num_classes, nnx.Rngs(config.seed))
    if config.init_from:
        init_backbone_from(model, config)
    state = create_train_state(model, config, schedule)
    del model
    state = loader_lib.put_replicated(state, replicated(mesh))

    # Created only now: a run refused for its config or data leaves no empty workdir behind.
    os.makedirs(workdir, exist_ok=True)
    checkpoint_dir = os.path.join(workdir, CHECKPOINT_SUBDIR)
    partial = checkpoints.uncommitted_steps(checkpoint_dir)
    if partial:
        logging.warning("%s: step folders %s have no commit record (interrupted saves or made "
                        "by hand); they are ignored (docs/design.md, \"Outputs\")",
                        checkpoint_dir, partial)
    manager = open_checkpoint_manager(workdir, config.keep_checkpoints)
    scalars = _Scalars(workdir)
    try:
        latest = checkpoints.latest_step(checkpoint_dir)
        if latest is not None:
            # The stored config first: a step that does not fit this config's model is named
            # with the fields that changed.
            changes = config_changes(
                checkpoints.restore_meta(checkpoint_dir, latest).get("config") or {}, config)
            state = restore_train_checkpoint(manager, state, latest, changes)
            logging.info("resumed from %s step %d", manager.directory, latest)
            if changes:
                logging.warning(
                    "%s step %d was trained with another config; from here on this run's "
                    "values hold, the steps before keep the old ones (use a new --workdir to "
                    "train with these from the start): %s", manager.directory, latest,
                    "; ".join(changes))
        start = int(jax.device_get(state.step))
        if start > total_steps:
            raise ValueError(
                f"{manager.directory} holds step {start}, past this run's {total_steps} steps "
                "(config.num_epochs / config.num_train_steps); use a new --workdir")
        if latest is not None:
            warning = attribute_head_warning(manager.directory, latest, start, total_steps)
            if warning is not None:
                logging.warning("%s", warning)
        result = _train_loop(config, workdir, mesh, state, data, loader_cfg, ends, start,
                             total_steps, manager, scalars, num_classes)
        manager.wait_until_finished()
    finally:
        manager.close()
        scalars.close()
    return result


def _epoch_of(step: int, ends: np.ndarray) -> int:
    """0-based epoch of global step ``step``."""
    return int(np.searchsorted(ends, step, side="right"))


class _StepMetrics:
    """Host side of the training metrics: finiteness check, averages, images/s, scalars (the
    ETA format is the project's one, ``reid_jax.progress``).

    Metrics of step ``s`` are fetched while step ``s + 1`` runs (:meth:`push` takes the newest,
    processes the previous), so the device never waits for the host; :meth:`flush` processes
    the pending one (before a checkpoint, an evaluation and at the end).
    """

    def __init__(self, scalars: _Scalars, ends: np.ndarray, total_steps: int, batch_size: int,
                 log_every: int, last_saved: Callable[[], int | None] = lambda: None):
        self._scalars, self._ends, self._last_saved = scalars, ends, last_saved
        self._total, self._batch, self._every = total_steps, batch_size, max(log_every, 1)
        self._pending: tuple[int, Metrics] | None = None
        self._window: list[dict[str, float]] = []
        self._t0: float | None = None
        self._timed_steps = 0
        self.images_per_second: float | None = None
        self.last: dict[str, float] = {}

    def start_timing(self) -> None:
        """Starts the images/s clock (after the first, compiling, step)."""
        self._t0, self._timed_steps = time.perf_counter(), 0

    def push(self, done: int, metrics: Metrics) -> None:
        self.flush()
        self._pending = (done, metrics)
        if self._t0 is not None:
            self._timed_steps += 1

    def flush(self) -> None:
        if self._pending is None:
            return
        done, metrics = self._pending
        self._pending = None
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in host.values()):
            check_finite(done, host, self._last_saved())
        self._window.append(host)
        if done % self._every == 0 or done == self._total:
            self._log(done)

    def _log(self, done: int) -> None:
        now = time.perf_counter()
        if self._t0 is not None and self._timed_steps > 0:
            self.images_per_second = self._timed_steps * self._batch / (now - self._t0)
            self._t0, self._timed_steps = now, 0
        mean = {k: float(np.mean([m[k] for m in self._window])) for k in self._window[0]}
        self._window = []
        ips = self.images_per_second
        eta = format_seconds((self._total - done) * self._batch / ips) if ips else "?"
        logging.info(
            "step %d/%d epoch %d | loss %.4f (ce %.4f triplet %.4f center %.3f) acc %.3f | "
            "lr %.3g | %s img/s | ETA %s", done, self._total, _epoch_of(done - 1, self._ends) + 1,
            mean["loss"], mean["ce"], mean["triplet"], mean["center"], mean["accuracy"],
            mean["lr"], "?" if ips is None else f"{ips:.1f}", eta)
        extra = {} if ips is None else {"images_per_second": ips}
        self._scalars.write(done, "train", {**mean, **extra})
        self.last = mean


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT / SIGTERM after saving the current step."""

    def __init__(self, signal_name: str, step: int, saved: str):
        self.signal_name, self.step, self.saved = signal_name, step, saved
        super().__init__(f"{signal_name} at step {step}: saved the checkpoint {saved}; run the "
                         "same command to resume from it")


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (preemption) while training: finish the step, save it, stop.

    The first signal sets a flag that the loop reads after every step and restores the default
    handlers, so a second Ctrl-C ends the program at once. With several processes the flag is
    agreed on by all of them (one small all-gather per step), and a JAX preemption notice
    (``CheckpointManager.reached_preemption``) counts too, so every process saves the same
    step. Handlers are installed only in the main thread.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.signal_name = signal.Signals(signum).name
        logging.warning("%s received: finishing this step, saving it, then stopping (send it "
                        "again to stop at once)", self.signal_name)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def requested(self, manager: ocp.CheckpointManager, step: int) -> bool:
        flag = bool(self.signal_name)
        if jax.process_count() > 1:
            flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
            if not flag and manager.reached_preemption(step):
                flag = True
            if flag and not self.signal_name:
                self.signal_name = "preemption"
        return flag


def _train_loop(
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh: jax.sharding.Mesh,
    state: TrainState,
    data: Market1501,
    loader_cfg: loader_lib.LoaderConfig,
    ends: np.ndarray,
    start: int,
    total_steps: int,
    manager: ocp.CheckpointManager,
    scalars: _Scalars,
    num_classes: int,
) -> dict[str, Any]:
    step_fn = jit_train_step(mesh)
    epoch_end_steps = {int(e): i for i, e in enumerate(ends)}  # step count -> finished epoch
    eval_every = int(config.eval_every_epochs)
    ckpt_every = int(config.checkpoint_every_steps)
    checkpoint_dir = os.fspath(manager.directory)
    progress = _StepMetrics(scalars, ends, total_steps, loader_cfg.batch_size,
                            int(config.log_every_steps),
                            last_saved=lambda: checkpoints.latest_step(checkpoint_dir))
    run_start = time.perf_counter()

    def run_eval(step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        metrics = evaluate_model(state, data, loader_cfg, mesh, config.data.eval_batch_size)
        logging.info("eval at step %d (epoch %d): mAP %.4f rank-1 %.4f rank-5 %.4f mINP %.4f "
                     "(%d queries, %.1fs)", step, _epoch_of(step - 1, ends) + 1, metrics["mAP"],
                     metrics["rank1"], metrics["rank5"], metrics["mINP"],
                     metrics["num_valid_queries"], time.perf_counter() - t0)
        scalars.write(step, "eval", {k: v for k, v in metrics.items() if k != "cmc"})
        return metrics

    if start < total_steps:
        # Each process loads only its rows of every global batch (docs/scaling.md,
        # "Multi-host input").
        with loader_lib.train_batches(data.train.items, data.train.labels, config=loader_cfg,
                                      seed=config.seed, start_step=start, stop_step=total_steps,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count()) as batches, \
                StopRequest() as stop:
            for step, host_batch in zip(range(start, total_steps), batches, strict=True):
                t0 = time.perf_counter()
                batch = shard_local_batch(
                    {"image": host_batch["image"], "label": host_batch["label"]}, mesh)
                if step == start and jax.process_count() > 1:
                    # Compile, then wait for every process before the first collective: one
                    # that compiles longer must not time the others out (docs/scaling.md,
                    # "Multi-host training").
                    step_fn = step_fn.lower(state, batch).compile()
                    ocp.multihost.sync_global_processes("reid_jax.train: train step compiled")
                state, metrics = step_fn(state, batch)
                done = step + 1
                if step == start:
                    jax.block_until_ready(metrics)
                    logging.info("first step (with compilation) took %.1fs",
                                 time.perf_counter() - t0)
                progress.push(done, metrics)
                if step == start:
                    progress.start_timing()
                if (ckpt_every > 0 and done % ckpt_every == 0 and done < total_steps
                        and done not in checkpoints.committed_steps(checkpoint_dir)):
                    progress.flush()  # never checkpoint a non-finite state
                    save_train_checkpoint(manager, state, config, num_classes,
                                          _epoch_of(step, ends))
                if (eval_every > 0 and done in epoch_end_steps and done < total_steps
                        and (epoch_end_steps[done] + 1) % eval_every == 0):
                    progress.flush()
                    run_eval(done)
                if done < total_steps and stop.requested(manager, done):
                    progress.flush()
                    if done not in checkpoints.committed_steps(checkpoint_dir):
                        save_train_checkpoint(manager, state, config, num_classes,
                                              _epoch_of(step, ends))
                    manager.wait_until_finished()
                    raise TrainingInterrupted(stop.signal_name, done,
                                              os.path.join(checkpoint_dir, str(done)))
        progress.flush()
    # (A later step may exist without training: tools/train_attributes.py adds one holding the
    # same model and train state plus the attribute head.)
    if total_steps not in checkpoints.committed_steps(checkpoint_dir):
        save_train_checkpoint(manager, state, config, num_classes,
                              _epoch_of(total_steps - 1, ends))
    final = run_eval(total_steps)
    epoch = float(np.interp(total_steps, np.concatenate([[0], ends]), np.arange(len(ends) + 1)))
    result = {
        "step": total_steps,
        "epoch": round(epoch, 3),
        "num_classes": num_classes,
        **final,
        "train": progress.last,
        "train_images_per_second": progress.images_per_second,
        "train_seconds_this_run": round(time.perf_counter() - run_start, 2),
    }
    if jax.process_index() == 0:
        atomic_io.write_json(os.path.join(workdir, METRICS_FILE), result, sort_keys=True,
                             allow_nan=True)
    return result
