"""The paper's attribute classifier, trained on the frozen re-id embedding (section 3, 4.1).

The re-id model stays frozen: only the ``N x A`` bias-free layer ``x = sigmoid(f @ W)`` is
trained (``reid_jax.models.attribute_head.AttributeHead``), on ``f``, the retrieval embedding
that is ranked and explained (post-BN, L2-normalised; ``docs/design.md``, "One embedding is
ranked, classified and explained"). The embeddings of
the training images are computed once with the model in eval mode (``reid_jax.embeddings``,
cached on disk) and the head is trained on those arrays, inside ``jax.lax.stop_gradient``: no
gradient can reach the re-id weights, and :func:`train_attributes` checks that the model's state
is bitwise the same after training (SHA-256 of every array) before it saves anything.

Training (:func:`train_attribute_head`): optax Adam(W) on the weighted binary cross entropy of
``reid_jax.train.losses.weighted_bce`` (Li et al. / Jia et al. weighting, ``exp(1 - r_a)`` on
positives and ``exp(r_a)`` on negatives), with ``r_a`` the positive ratio of attribute ``a``
over the **labelled training images** (per image, the unit the loss averages over; a
fraction). Mini-batches of a per-epoch permutation; an epoch is one jitted ``lax.scan`` over
fixed-shape batches (the last one padded and masked), so the whole run compiles once.

Labels are per identity (``market_attribute.mat``) and joined to images by pid
(``reid_jax.data.attributes.labels_for_pids``). Evaluation (:func:`evaluate_attribute_head`)
uses the test identities: the query and gallery images with pid > 0 that have labels
(distractors and junk have none), with ``reid_jax.evaluation.attribute_metrics`` (mA, instance
accuracy / precision / recall / F1, and per attribute).

Saving (:func:`save_with_attribute_head`): a new step ``latest + 1`` in the same orbax
checkpoint directory holding the unchanged ``model`` item, the ``attribute_head`` item, the
source step's ``meta`` plus an ``attribute_head_training`` record, and a copy of every other item
of the source step (e.g. the ``train_state`` of ``reid_jax.train.loop``, so a later
``tools/train.py`` run in the same workdir can still resume). ``restore_attribute_head(dir)``
then finds the head at the latest step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from reid_jax import atomic_io, checkpoints, config_sections, embeddings, evaluation
from reid_jax.data import attributes as attributes_lib
from reid_jax.models.attribute_head import AttributeHead, Calibration, fit_calibration
from reid_jax.train import losses

ATTRIBUTE_FILE = "market_attribute.mat"
METRICS_FILE = "attribute_metrics.json"
TEST_SPLITS = ("query", "gallery")
_KNOWN_ITEMS = (checkpoints.MODEL_ITEM, checkpoints.ATTRIBUTE_HEAD_ITEM, checkpoints.META_ITEM)


def default_config() -> ml_collections.ConfigDict:
    """The ``config.attributes`` section: how the attribute head is trained (defaults).

    ``epochs`` (30), ``learning_rate`` (1e-3, Adam, constant), ``batch_size`` (64),
    ``weight_decay`` (0: Adam; > 0: AdamW's decoupled decay), ``seed`` (0),
    ``calibration_folds`` (4: identity folds of :func:`cross_fitted_calibration`; 0: none). ``tools/
    train_attributes.py`` reads the section of the checkpoint's config (or ``--config``); its
    flags override single fields.
    """
    c = ml_collections.ConfigDict()
    c.epochs = 30
    c.learning_rate = 1e-3
    c.batch_size = 64
    c.weight_decay = 0.0
    c.seed = 0
    c.calibration_folds = 4
    return c


def head_train_config(config: Any = None, **overrides: Any) -> HeadTrainConfig:
    """:class:`HeadTrainConfig` from ``config.attributes`` (defaults for missing fields), with
    ``overrides`` (flags; ``None`` = not given) applied.

    Raises:
      ValueError: an unknown field (with the nearest valid names) or a bad value.
    """
    values = config_sections.section_values(config, "attributes", default_config(), overrides)
    return HeadTrainConfig(**values)


@dataclasses.dataclass(frozen=True)
class HeadTrainConfig:
    """How the attribute head is trained (the validated ``config.attributes`` section).

    Attributes:
      epochs: passes over the training embeddings.
      learning_rate: Adam step size (constant).
      batch_size: embeddings per step (the last batch of an epoch is padded and masked).
      weight_decay: AdamW's decoupled weight decay (0: plain Adam).
      seed: head initialisation and the per-epoch shuffles.
      calibration_folds: identity folds of the calibration (:func:`cross_fitted_calibration`);
        0: the head is saved without one.
    """

    epochs: int = 30
    learning_rate: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    seed: int = 0
    calibration_folds: int = 4

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"HeadTrainConfig.epochs must be >= 1, got {self.epochs}")
        if not self.learning_rate > 0:
            raise ValueError(
                f"HeadTrainConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1:
            raise ValueError(f"HeadTrainConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.weight_decay < 0:
            raise ValueError(
                f"HeadTrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.calibration_folds < 0 or self.calibration_folds == 1:
            raise ValueError(f"HeadTrainConfig.calibration_folds must be 0 (none) or >= 2, got "
                             f"{self.calibration_folds}")


# ------------------------------------------------------------------------------ training


def _head_loss(params: nnx.State, graphdef: nnx.GraphDef, features: jax.Array,
               labels: jax.Array, mask: jax.Array, ratios: jax.Array) -> jax.Array:
    """Weighted BCE of the head on ``features [B, N]`` (frozen), ``labels [B, A]``, ``mask [B]``."""
    head = nnx.merge(graphdef, params)
    logits = head(jax.lax.stop_gradient(features)).logits
    return losses.weighted_bce(logits, labels, ratios, mask)


_full_loss = jax.jit(_head_loss, static_argnames="graphdef")


def _check_training_arrays(features: Any, labels: Any, positive_ratios: Any = None
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(features [n, N], labels [n, A], positive_ratios [A] or None)`` as float32, checked:
    shapes, binary labels, finite features, ratios (when given) fractions in [0, 1]."""
    f = np.asarray(features)
    y = np.asarray(labels)
    if f.ndim != 2 or f.shape[0] == 0:
        raise ValueError(f"features must be [n, N] with n > 0, got shape {f.shape}")
    if y.ndim != 2 or y.shape[0] != f.shape[0]:
        raise ValueError(f"labels must be [n, A] with n = {f.shape[0]} (one row per embedding), "
                         f"got shape {y.shape}")
    r = None
    if positive_ratios is not None:
        r = np.asarray(positive_ratios, np.float64)
        if r.shape != (y.shape[1],):
            raise ValueError(f"positive_ratios must be [A] = ({y.shape[1]},), got shape "
                             f"{r.shape}")
        if not np.all((r >= 0) & (r <= 1)):
            raise ValueError(f"positive_ratios must be fractions in [0, 1], got range "
                             f"[{r.min():g}, {r.max():g}] (percentages? divide by 100)")
        r = r.astype(np.float32)
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be binary (0/1)")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    return f.astype(np.float32), y.astype(np.float32), r


def head_loss(head: AttributeHead, features: Any, labels: Any, positive_ratios: Any) -> float:
    """The training loss (weighted BCE, mean over all entries) of ``head`` on whole arrays.

    Args:
      features: [n, N] embeddings; labels: [n, A] in {0, 1}; positive_ratios: [A] fractions.
    """
    f, y, r = _check_training_arrays(features, labels, positive_ratios)
    graphdef, params = nnx.split(head)
    return float(_full_loss(params, graphdef, jnp.asarray(f), jnp.asarray(y),
                            jnp.ones(f.shape[0], jnp.float32), jnp.asarray(r)))


def _epoch_batches(rng: np.random.Generator, n: int, batch_size: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A shuffled epoch as ``index int32 [S, B]`` and ``mask bool [S, B]`` (padding: index 0)."""
    steps = math.ceil(n / batch_size)
    order = np.zeros(steps * batch_size, np.int32)
    mask = np.zeros(steps * batch_size, bool)
    order[:n] = rng.permutation(n)
    mask[:n] = True
    return order.reshape(steps, batch_size), mask.reshape(steps, batch_size)


@functools.partial(jax.jit, static_argnames=("graphdef", "learning_rate", "weight_decay"),
                   donate_argnums=(0, 1))
def _train_epoch(params: nnx.State, opt_state: Any, features: jax.Array, labels: jax.Array,
                 ratios: jax.Array, order: jax.Array, mask: jax.Array, *,
                 graphdef: nnx.GraphDef, learning_rate: float, weight_decay: float
                 ) -> tuple[nnx.State, Any, jax.Array]:
    """One epoch of AdamW steps over ``order`` / ``mask [S, B]`` (:func:`_epoch_batches`) on
    ``features [m, N]`` / ``labels [m, A]``; returns the new parameters and optimizer state and
    the ``[S]`` batch losses.

    A module-level function of the arrays, so the folds of the calibration, whose arrays are
    padded to the same number of rows, reuse one compilation.
    """
    tx = _head_optimizer(learning_rate, weight_decay)

    def step(carry, batch):
        params, opt_state = carry
        index, valid = batch
        loss, grads = jax.value_and_grad(_head_loss)(
            params, graphdef, features[index], labels[index], valid.astype(jnp.float32), ratios)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), batch_losses = jax.lax.scan(step, (params, opt_state), (order, mask))
    return params, opt_state, batch_losses


def _head_optimizer(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, weight_decay=weight_decay)


def _padded_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` with zero rows appended up to ``rows`` (never indexed: the epochs' masks)."""
    out = np.zeros((rows, *x.shape[1:]), x.dtype)
    out[:x.shape[0]] = x
    return out


def train_attribute_head(
    features: Any,
    labels: Any,
    positive_ratios: Any,
    config: HeadTrainConfig = HeadTrainConfig(),
) -> tuple[AttributeHead, dict[str, Any]]:
    """Trains a bias-free ``AttributeHead`` on fixed embeddings (the paper's section 4.1).

    Args:
      features: [n, N] retrieval embeddings of the training images (never changed; they enter
        the loss through ``jax.lax.stop_gradient``).
      labels: [n, A] in {0, 1}, the images' attribute labels.
      positive_ratios: [A] positive ratios as fractions (the weighting of ``weighted_bce``).
      config: epochs, learning rate, batch size, weight decay, seed.

    Returns:
      ``(head, history)``: the trained head (kernel [N, A]) and ``{"epoch_loss": [epochs]
      mean batch loss per epoch, "initial_loss", "final_loss" (full-data loss before and after),
      "steps", "seconds"}``.
    """
    f, y, r = _check_training_arrays(features, labels, positive_ratios)
    n, dim = f.shape
    head = AttributeHead(dim, y.shape[1], rngs=nnx.Rngs(config.seed))
    graphdef, params = nnx.split(head)
    opt_state = _head_optimizer(config.learning_rate, config.weight_decay).init(params)
    rows = math.ceil(n / config.batch_size) * config.batch_size
    f_dev, y_dev = jnp.asarray(_padded_rows(f, rows)), jnp.asarray(_padded_rows(y, rows))
    r_dev = jnp.asarray(r)
    epoch = functools.partial(_train_epoch, graphdef=graphdef,
                              learning_rate=float(config.learning_rate),
                              weight_decay=float(config.weight_decay))
    rows_valid = jnp.asarray(np.arange(rows) < n, jnp.float32)

    def full_loss(params: nnx.State) -> float:  # head_loss, on the padded arrays
        return float(_full_loss(params, graphdef, f_dev, y_dev, rows_valid, r_dev))

    initial = full_loss(params)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0xA77]))
    start = time.perf_counter()
    epoch_loss = []
    steps = 0
    for e in range(config.epochs):
        order, mask = _epoch_batches(rng, n, config.batch_size)
        params, opt_state, batch_losses = epoch(params, opt_state, f_dev, y_dev, r_dev,
                                                jnp.asarray(order), jnp.asarray(mask))
        value = float(jnp.mean(batch_losses))
        if not math.isfinite(value):
            raise FloatingPointError(f"attribute head: non-finite loss {value} in epoch {e + 1}")
        epoch_loss.append(value)
        steps += order.shape[0]
        logging.log_every_n_seconds(logging.INFO, "attribute head epoch %d/%d: loss %.5f", 5,
                                    e + 1, config.epochs, value)
    seconds = time.perf_counter() - start
    head = nnx.merge(graphdef, params)
    final = full_loss(params)
    logging.info("attribute head: %d epochs, %d steps in %.2f s; loss %.5f -> %.5f",
                 config.epochs, steps, seconds, initial, final)
    return head, {"epoch_loss": epoch_loss, "initial_loss": initial, "final_loss": final,
                  "steps": steps, "seconds": seconds}


def cross_fitted_calibration(
    features: Any, labels: Any, pids: Any, config: HeadTrainConfig = HeadTrainConfig(),
) -> tuple[Calibration, dict[str, Any]]:
    """The head's :class:`Calibration`, fitted on logits of training identities it has not seen.

    The training identities are split into ``config.calibration_folds`` folds (shuffled with
    ``config.seed``); for each fold a head is trained as :func:`train_attribute_head` trains the
    real one, on the other folds' images with their own positive ratios, and its logits on the
    fold's images are kept. Platt scaling (:func:`reid_jax.models.attribute_head.
    fit_calibration`) on these out-of-fold logits says how the head's logits behave on persons
    it was not trained on -- which every query and gallery person is (docs/design.md,
    "Calibrated probabilities"). It is applied to the head trained on all identities.

    Args:
      features: [n, N] training embeddings; labels: [n, A] in {0, 1}; pids: int [n].
      config: the head's training settings; ``calibration_folds >= 2``.

    Returns:
      ``(calibration, info)``: ``info`` has ``folds``, ``num_images``, ``num_identities``,
      ``seconds`` and the out-of-fold mean logistic loss per attribute before and after
      (``heldout_loss_raw``, ``heldout_loss_calibrated``).
    """
    f, y, _ = _check_training_arrays(features, labels)
    pids = np.asarray(pids)
    folds = int(config.calibration_folds)
    if folds < 2:
        raise ValueError(f"calibration needs calibration_folds >= 2, got {folds}")
    if pids.shape != (f.shape[0],):
        raise ValueError(f"pids must be [n] = [{f.shape[0]}] (one per image), got {pids.shape}")
    identities = np.unique(pids)
    if identities.size < folds:
        raise ValueError(f"calibration_folds={folds} needs at least {folds} training identities, "
                         f"got {identities.size}")
    start = time.perf_counter()
    np.random.default_rng(np.random.SeedSequence([config.seed, 0xCA1])).shuffle(identities)
    heldout = np.zeros(y.shape, np.float64)
    for k in range(folds):
        hold = np.isin(pids, identities[k::folds])
        ratios = attributes_lib.positive_ratios(y[~hold]) / 100.0
        head, _ = train_attribute_head(f[~hold], y[~hold], ratios, config)
        heldout[hold] = np.asarray(head(jnp.asarray(f[hold])).logits, np.float64)
        logging.info("calibration fold %d/%d: %d held-out images", k + 1, folds, int(hold.sum()))
    calibration = fit_calibration(heldout, y)

    def mean_loss(z):
        return (np.logaddexp(0.0, z) - y * z).mean(axis=0)

    calibrated = heldout * np.asarray(calibration.slope, np.float64) + np.asarray(
        calibration.intercept, np.float64)
    info = {"folds": folds, "num_images": int(f.shape[0]),
            "num_identities": int(identities.size),
            "seconds": round(time.perf_counter() - start, 2),
            "heldout_loss_raw": _nan_to_none(mean_loss(heldout)),
            "heldout_loss_calibrated": _nan_to_none(mean_loss(calibrated))}
    logging.info("calibration: %d folds in %.1f s; held-out logistic loss %.4f -> %.4f",
                 folds, info["seconds"], float(np.mean(mean_loss(heldout))),
                 float(np.mean(mean_loss(calibrated))))
    return calibration, info


# ------------------------------------------------------------------------------ labels


class TrainingDivergedError(ValueError):
    """Head training ended with a higher loss than it started with; nothing was saved."""


# A run whose full-data loss ends above this multiple of its start has diverged.
DIVERGENCE_RATIO = 1.0


def check_converged(history: Mapping[str, Any], train_config: HeadTrainConfig) -> None:
    """Raises :class:`TrainingDivergedError` when ``final_loss > initial_loss``: a head that
    fits the training embeddings worse than its random start is never saved as the newest head
    (nor are its metrics written)."""
    initial, final = float(history["initial_loss"]), float(history["final_loss"])
    if not math.isfinite(final) or final > DIVERGENCE_RATIO * initial:
        raise TrainingDivergedError(
            f"attribute head training diverged: loss {initial:.4g} -> {final:.4g} with "
            f"learning rate {train_config.learning_rate:g} (--lr); nothing was saved. Lower the "
            "learning rate (config.attributes.learning_rate, default 1e-3) and run again")


def split_labels(attrs: attributes_lib.MarketAttributes,
                 splits: Sequence[embeddings.SplitEmbeddings]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features and attribute labels of the labelled images (pid > 0) of ``splits``, stacked.

    Returns:
      ``(features float32 [m, N], labels uint8 [m, A], pids int32 [m])`` over the images whose
      pid has labels (train images use the train labels, query/gallery the test labels).
    """
    feats, labels, pids = [], [], []
    for s in splits:
        split_labels_, has_label = attributes_lib.labels_for_pids(attrs, s.pids, s.split)
        keep = has_label & (s.pids > 0)
        feats.append(s.features[keep])
        labels.append(split_labels_[keep])
        pids.append(s.pids[keep])
    features = np.concatenate(feats, axis=0)
    if features.shape[0] == 0:
        names = ", ".join(s.split for s in splits)
        raise ValueError(f"no image of split(s) {names} has attribute labels (are the pids in "
                         "market_attribute.mat?)")
    return features, np.concatenate(labels, axis=0), np.concatenate(pids, axis=0)


# ------------------------------------------------------------------------------ evaluation


def _nan_to_none(values: Sequence[float]) -> list[float | None]:
    return [None if not math.isfinite(float(v)) else float(v) for v in values]


def evaluate_attribute_head(
    head: AttributeHead,
    attrs: attributes_lib.MarketAttributes,
    splits: Sequence[embeddings.SplitEmbeddings],
    names: Sequence[str] = attributes_lib.ATTRIBUTE_NAMES,
) -> dict[str, Any]:
    """Attribute metrics of ``head`` on the labelled images of ``splits`` (query + gallery).

    Returns:
      JSON-ready dict: ``mA``, ``accuracy``, ``precision``, ``recall``, ``f1`` (instance-based,
      ``reid_jax.evaluation.attribute_metrics``), ``num_images``, ``num_identities``, the
      ``splits`` used and ``per_attribute``: ``{name: {accuracy (balanced, the mA term),
      two_class_accuracy, precision, recall, f1, positive_ratio (percent of these images)}}``
      (undefined values are None). ``two_class_accuracy`` is the mean of the true-positive and
      true-negative rates, None where these images show one class only (the mA term then falls
      back to the one rate defined): whether the head tells the attribute apart
      (``reid_jax.explain.learned``).
    """
    features, labels, pids = split_labels(attrs, splits)
    if len(names) != labels.shape[1]:
        raise ValueError(f"{len(names)} attribute names for {labels.shape[1]} label columns")
    probabilities = embeddings.attribute_probabilities(head, features)
    m = evaluation.attribute_metrics(probabilities, labels)
    ratio = 100.0 * labels.astype(np.float64).mean(axis=0)
    per_attribute = {}
    columns = zip(names, _nan_to_none(m["accuracy_per_attribute"]),
                  _nan_to_none(m["two_class_accuracy_per_attribute"]),
                  _nan_to_none(m["precision_per_attribute"]),
                  _nan_to_none(m["recall_per_attribute"]), _nan_to_none(m["f1_per_attribute"]),
                  ratio.tolist(), strict=True)
    for name, acc, two, prec, rec, f1, pos in columns:
        per_attribute[name] = {"accuracy": acc, "two_class_accuracy": two, "precision": prec,
                               "recall": rec, "f1": f1, "positive_ratio": pos}
    return {
        "mA": float(m["mA"]), "accuracy": float(m["accuracy"]),
        "precision": float(m["precision"]), "recall": float(m["recall"]), "f1": float(m["f1"]),
        "num_images": int(features.shape[0]), "num_identities": int(np.unique(pids).size),
        "splits": [s.split for s in splits],
        "num_attributes_without_positives": int(m["num_attributes_without_positives"]),
        "per_attribute": per_attribute,
    }


def _pct(value: float | None) -> str:
    return "    -" if value is None else f"{100.0 * value:5.1f}"


def format_attribute_table(metrics: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`evaluate_attribute_head`'s result (values in percent)."""
    lines = [f"{'attribute':<12}{'pos %':>7}{'acc':>7}{'prec':>7}{'recall':>7}{'F1':>7}"]
    for name, row in metrics["per_attribute"].items():
        lines.append(f"{name:<12}{row['positive_ratio']:>7.1f}  {_pct(row['accuracy'])}  "
                     f"{_pct(row['precision'])}  {_pct(row['recall'])}  {_pct(row['f1'])}")
    lines.append("-" * len(lines[0]))
    lines.append(f"mA {_pct(metrics['mA'])}   instance-based: accuracy {_pct(metrics['accuracy'])}"
                 f"  precision {_pct(metrics['precision'])}  recall {_pct(metrics['recall'])}"
                 f"  F1 {_pct(metrics['f1'])}")
    lines.append(f"({metrics['num_images']} images of {metrics['num_identities']} identities, "
                 f"splits {'+'.join(metrics['splits'])}; acc = balanced accuracy, the mA term)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ saving


def save_with_attribute_head(
    checkpoint_dir: str | os.PathLike,
    source_step: int,
    model_state: nnx.State,
    head: AttributeHead,
    extra_meta: Mapping[str, Any],
    calibration: Calibration | None = None,
    test_accuracy: Mapping[str, float | None] | None = None,
) -> int:
    """Writes step ``latest + 1``: ``source_step``'s items with ``model_state`` and the head
    (and its ``calibration`` and ``test_accuracy``, kept in the meta:
    ``checkpoints.restore_calibration``, ``checkpoints.restore_head_accuracy``).

    ``test_accuracy`` is the head's balanced accuracy per attribute on the labelled test images
    (None where they show one class): the report and the explorer mark the attributes it has
    not learned (``reid_jax.explain.learned``).

    Every item of ``source_step`` other than model, attribute head and meta (e.g. the training
    state) is copied as it is stored, so training can still resume from the new step. The
    ``meta`` is ``source_step``'s plus ``extra_meta`` (and ``attribute_head`` dims).

    Returns:
      The new step number.
    """
    directory = os.path.abspath(os.fspath(checkpoint_dir))
    meta = checkpoints.restore_meta(directory, source_step)
    meta.update(dict(extra_meta))
    reader = checkpoints.open_manager(directory, read_only=True)
    try:
        stored = set(reader.item_metadata(source_step).keys())
        latest = checkpoints.latest_step(directory)
    finally:
        reader.close()
    extra_items = sorted(stored - set(_KNOWN_ITEMS))
    handlers = {name: ocp.StandardCheckpointHandler() for name in extra_items}
    manager = checkpoints.open_manager(directory, extra_item_handlers=handlers)
    try:
        copied = {}
        if extra_items:
            restored = manager.restore(source_step, args=ocp.args.Composite(
                **{name: ocp.args.StandardRestore() for name in extra_items}))
            copied = {name: ocp.args.StandardSave(restored[name]) for name in extra_items}
        new_step = int(latest) + 1
        head_state = nnx.state(head)
        n, a = head_state["kernel"][...].shape
        meta["attribute_head"] = {"embedding_dim": int(n), "num_attributes": int(a)}
        if calibration is not None:
            meta["attribute_head"]["calibration"] = calibration.json()
        if test_accuracy is not None:
            meta["attribute_head"]["test_accuracy"] = {
                name: None if value is None else float(value)
                for name, value in test_accuracy.items()}
        meta = json.loads(json.dumps(meta, allow_nan=False))
        manager.save(new_step, args=ocp.args.Composite(**{
            checkpoints.MODEL_ITEM: ocp.args.StandardSave(model_state),
            checkpoints.ATTRIBUTE_HEAD_ITEM: ocp.args.StandardSave(head_state),
            checkpoints.META_ITEM: ocp.args.JsonSave(meta),
            **copied,
        }), force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    logging.info("saved step %d of %s: model of step %d + attribute head%s", new_step, directory,
                 source_step, f" + {extra_items}" if extra_items else "")
    return new_step


# ------------------------------------------------------------------------------ the run


def train_attributes(
    checkpoint_dir: str | os.PathLike,
    config: ml_collections.ConfigDict | None,
    data_root: str | os.PathLike,
    *,
    attributes_file: str | os.PathLike | None = None,
    train_config: HeadTrainConfig | None = None,
    cache_dir: str | os.PathLike | None = "default",
    metrics_path: str | os.PathLike | None = None,
    step: int | None = None,
    embed_batch_size: int | None = None,
    save: bool = True,
) -> dict[str, Any]:
    """Trains, evaluates and saves the attribute head of a trained re-id checkpoint.

    Args:
      checkpoint_dir: orbax checkpoint directory of the re-id model (``WORKDIR/checkpoints``).
      config: the model's config; None: the one stored in the checkpoint.
      data_root: Market-1501-layout folder (train / query / gallery images).
      attributes_file: ``market_attribute.mat``; default ``DATA_ROOT/market_attribute.mat``.
      train_config: head training settings (default: ``config.attributes``, see
        :func:`head_train_config`).
      cache_dir: embedding cache folder; ``"default"``: ``CHECKPOINT_DIR/embedding_cache``;
        None: no cache.
      metrics_path: where ``attribute_metrics.json`` goes; default
        ``CHECKPOINT_DIR/attribute_metrics.json``.
      step: the checkpoint step of the re-id model (default: latest).
      embed_batch_size: batch size of the embedding pass (default ``config.data.eval_batch_size``).
      save: write the new checkpoint step (False: only metrics).

    Returns:
      The metrics written to ``metrics_path``: ``test`` (see :func:`evaluate_attribute_head`),
      ``training`` (history, settings, positive ratios), ``checkpoint`` (source and new step).

    Raises:
      RuntimeError: the re-id model's state changed (it must not).
    """
    directory = os.path.abspath(os.fspath(checkpoint_dir))
    data_root = os.path.abspath(os.fspath(data_root))
    attributes_file = os.fspath(attributes_file) if attributes_file else os.path.join(
        data_root, ATTRIBUTE_FILE)
    attrs = attributes_lib.load_market_attributes(attributes_file)
    source_step = checkpoints.resolve_step(directory, step)
    model, meta = checkpoints.restore_model(directory, config, source_step)
    if config is None:
        config = ml_collections.ConfigDict(meta.get("config", {}))
    if train_config is None:
        train_config = head_train_config(config)
    fingerprint_before = embeddings.model_fingerprint(model)
    if cache_dir == "default":
        cache_dir = embeddings.default_cache_dir(directory)
    split_embeddings = embeddings.split_embeddings(
        model, config, data_root, ("train", *TEST_SPLITS), cache_dir, batch_size=embed_batch_size)

    train_features, train_labels, train_pids = split_labels(attrs, [split_embeddings["train"]])
    ratios = attributes_lib.positive_ratios(train_labels) / 100.0  # per labelled train image
    head, history = train_attribute_head(train_features, train_labels, ratios, train_config)
    check_converged(history, train_config)
    calibration, calibration_info = None, None
    num_ids = int(np.unique(train_pids).size)
    if train_config.calibration_folds and num_ids < 2:
        logging.warning("no calibration: it needs at least 2 training identities, got %d",
                        num_ids)
    elif train_config.calibration_folds:
        # At most one fold per identity (tiny datasets); the info records the folds used.
        calibration, calibration_info = cross_fitted_calibration(
            train_features, train_labels, train_pids, dataclasses.replace(
                train_config, calibration_folds=min(train_config.calibration_folds, num_ids)))
    test = evaluate_attribute_head(head, attrs, [split_embeddings[s] for s in TEST_SPLITS])
    print(format_attribute_table(test))

    if embeddings.model_fingerprint(model) != fingerprint_before:
        raise RuntimeError("the re-id model's state changed while training the attribute head")
    training = {
        "config": dataclasses.asdict(train_config),
        "num_images": int(train_features.shape[0]),
        "num_identities": int(np.unique(train_pids).size),
        "positive_ratio_per_image": dict(zip(attributes_lib.ATTRIBUTE_NAMES,
                                             (100.0 * ratios).tolist(), strict=True)),
        **history,
        "calibration": None if calibration is None else {**calibration.json(),
                                                          **calibration_info},
    }
    new_step = None
    if save:
        new_step = save_with_attribute_head(directory, source_step, nnx.state(model), head, {
            "attribute_head_training": {
                "source_step": source_step, "attributes_file": os.path.abspath(attributes_file),
                "config": dataclasses.asdict(train_config), "test_mA": test["mA"],
                "model_fingerprint": fingerprint_before}}, calibration,
            test_accuracy={name: row["two_class_accuracy"]
                           for name, row in test["per_attribute"].items()})
    result = {"test": test, "training": training,
              "checkpoint": {"directory": directory, "source_step": source_step,
                             "saved_step": new_step}}
    metrics_path = metrics_path or os.path.join(directory, METRICS_FILE)
    atomic_io.write_json(metrics_path, result)
    logging.info("attribute metrics written to %s", metrics_path)
    return result
