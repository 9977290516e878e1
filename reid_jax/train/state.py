"""The explicit, checkpointable training state of AGW and the optimizers that update it.

``TrainState`` holds everything a training step reads and writes, as arrays (a pytree):

- ``params``: the model's ``nnx.Param`` variables (``nnx.split(model, nnx.Param, ...)``);
- ``non_trainable``: every other model variable: BatchNorm running statistics
  (``nnx.BatchStat``) and BNNeck's frozen bias (``agw.FrozenParam``);
- ``opt_state``: the model optimizer's state (Adam moments, counts);
- ``centers`` ``[C, D]`` and ``center_opt_state``: the center loss's class centers and their own
  SGD state (``reid_jax.train.losses.update_centers``);
- ``step``: the global step (number of updates applied so far);
- ``rng``: the run's ``uint32[2]`` key. AGW has no stochastic layer, so the step does not draw
  from it; a variant that does must derive its keys as ``fold_in(rng, step)`` so a resumed run
  draws the same numbers.

and, as static (non-pytree) fields, how to use them: the model's ``graphdef``, the two optax
transformations, the learning-rate schedule and the loss settings. A jitted
``train_step(state, batch)`` therefore needs no other argument.

The optimizer (ReID-Survey ``Baseline.get_optimizer``): ``torch.optim.Adam`` over *every*
trainable parameter (conv kernels, BatchNorm scales and biases, GeM's ``p``, the classifier)
with ``lr = BASE_LR`` and ``weight_decay = WEIGHT_DECAY`` = 5e-4 for all of them -- no
bias/BN exemption -- and BNNeck's bias excluded because it is frozen (``requires_grad_(False)``).
torch's Adam ``weight_decay`` is a *coupled* L2 penalty: ``g <- g + wd * theta`` before the
moments, not AdamW's decoupled decay. :func:`build_optimizer` is exactly that::

    optax.chain(optax.add_decayed_weights(wd),     # g + wd * theta  (coupled L2)
                optax.scale_by_adam(b1, b2, eps),  # torch defaults 0.9, 0.999, 1e-8
                optax.scale_by_learning_rate(schedule))

applied to ``params`` only, i.e. to ``nnx.Param`` and never to the frozen bias or the centers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

from reid_jax.models.agw import AGW
from reid_jax.train import losses


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How the AGW loss combines its terms: ``CE_eps + triplet + center_weight * center``.

    Attributes:
      label_smoothing: epsilon of the label-smoothing cross entropy (AGW: 0.1).
      center_loss_weight: weight of the center loss in the model's loss (AGW: 5e-4).
      triplet_normalize: L2-normalise features inside the triplet loss (AGW: False).
    """

    label_smoothing: float = losses.LABEL_SMOOTH_EPSILON
    center_loss_weight: float = losses.CENTER_LOSS_WEIGHT
    triplet_normalize: bool = False

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> LossConfig:
        """From ``config.loss`` (fields of this class)."""
        loss = config.get("loss")
        if loss is None:
            raise ValueError("config has no 'loss' section (config.loss.label_smoothing, ...)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(loss.keys()) - known)
        if unknown:
            raise ValueError(f"config.loss: unknown fields {unknown}; known: {sorted(known)}")
        out = cls(**{k: loss[k] for k in known if k in loss})
        if not 0.0 <= out.label_smoothing <= 1.0:
            raise ValueError(f"config.loss.label_smoothing must lie in [0, 1], got "
                             f"{out.label_smoothing}")
        if out.center_loss_weight < 0:
            raise ValueError(f"config.loss.center_loss_weight must be >= 0, got "
                             f"{out.center_loss_weight}")
        return out


@struct.dataclass
class TrainState:
    """Everything one training step reads and writes (see the module docstring).

    Array fields (the pytree): ``step`` int32 [], ``params`` / ``non_trainable`` (``nnx.State``),
    ``opt_state``, ``centers`` [C, D] (the parameter dtype: float32, also for a bfloat16 model),
    ``center_opt_state``, ``rng`` uint32 [2].
    """

    step: jax.Array
    params: nnx.State
    non_trainable: nnx.State
    opt_state: optax.OptState
    centers: jax.Array
    center_opt_state: optax.OptState
    rng: jax.Array
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    center_tx: optax.GradientTransformation = struct.field(pytree_node=False)
    lr_schedule: optax.Schedule = struct.field(pytree_node=False)
    loss: LossConfig = struct.field(pytree_node=False)

    def model_state(self) -> nnx.State:
        """The full model ``nnx.State`` (what ``nnx.state(model)`` gives; checkpoint item)."""
        return nnx.merge_state(self.params, self.non_trainable)

    def model(self) -> AGW:
        """A copy of the model as an ``nnx`` module (train mode; ``.eval()`` for inference).

        Its variables are new objects: running it never changes this state.
        """
        return nnx.merge(self.graphdef, self.params, self.non_trainable, copy=True)

    def with_model_state(self, model_state: nnx.State) -> TrainState:
        """A copy whose params and non-trainable variables come from ``model_state``."""
        model = self.model()
        nnx.update(model, model_state)
        _, params, non_trainable = nnx.split(model, nnx.Param, ...)
        return self.replace(params=params, non_trainable=non_trainable)

    def optimizer_items(self) -> dict[str, Any]:
        """The non-model arrays, as checkpointed in the ``train_state`` item."""
        return {"step": self.step, "opt_state": self.opt_state, "centers": self.centers,
                "center_opt_state": self.center_opt_state, "rng": self.rng}

    def with_optimizer_items(self, items: dict[str, Any]) -> TrainState:
        """A copy with the arrays of :meth:`optimizer_items` replaced by ``items``."""
        return self.replace(**{k: items[k] for k in self.optimizer_items()})


def build_optimizer(optim: ml_collections.ConfigDict,
                    schedule: optax.Schedule) -> optax.GradientTransformation:
    """Adam with coupled L2 (torch ``Adam(weight_decay=...)``), see the module docstring and
    docs/training.md, "Optimizer: Adam with coupled L2 on every parameter".

    Equal settings give the same (cached) object, so a new run in the same process reuses the
    compiled step.

    Args:
      optim: ``config.optim`` with ``weight_decay``, ``b1``, ``b2``, ``eps``.
      schedule: ``step -> learning rate`` (``reid_jax.train.schedules.lr_schedule``; hashable).
    """
    if optim.weight_decay < 0:
        raise ValueError(f"config.optim.weight_decay must be >= 0, got {optim.weight_decay}")
    return _adam_l2(float(optim.weight_decay), float(optim.b1), float(optim.b2),
                    float(optim.eps), schedule)


@functools.lru_cache(maxsize=32)
def _adam_l2(weight_decay: float, b1: float, b2: float, eps: float,
             schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.scale_by_learning_rate(schedule),
    )


@functools.lru_cache(maxsize=32)
def _center_optimizer(learning_rate: float) -> optax.GradientTransformation:
    return losses.center_optimizer(learning_rate)


def create_train_state(
    model: AGW,
    config: ml_collections.ConfigDict,
    schedule: optax.Schedule,
) -> TrainState:
    """A fresh state for ``model`` (its current weights) and ``config``.

    The centers are drawn as the reference (``torch.randn``, standard normal ``[C, D]``) from
    ``config.seed``, in the model's parameter dtype (float32; float64 for a float64 model);
    ``rng`` is ``PRNGKey(config.seed)``.

    Args:
      model: an ``AGW`` (random or ImageNet-initialised); it is split, not modified.
      config: the run's config (``optim``, ``loss``, ``seed``).
      schedule: the model optimizer's learning-rate schedule.
    """
    graphdef, params, non_trainable = nnx.split(model, nnx.Param, ...)
    tx = build_optimizer(config.optim, schedule)
    center_tx = _center_optimizer(float(config.optim.center_lr))
    rng = jax.random.PRNGKey(config.seed)
    centers = losses.init_centers(jax.random.fold_in(rng, 1), model.num_classes,
                                  model.feature_dim, dtype=model.param_dtype)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        non_trainable=non_trainable,
        opt_state=tx.init(params),
        centers=centers,
        center_opt_state=center_tx.init(centers),
        rng=rng,
        graphdef=graphdef,
        tx=tx,
        center_tx=center_tx,
        lr_schedule=schedule,
        loss=LossConfig.from_config(config),
    )
