"""AGW's learning-rate schedule: linear warmup, then steps at fixed epochs, per epoch.

docs/training.md, "Learning-rate schedule: per epoch, stepped at epoch start".

ReID-Survey trains with ``WarmupMultiStepLR`` (``utils/lr_scheduler.py``) stepped once at the
start of every epoch (``Events.EPOCH_STARTED``) after the one step its constructor takes, so
1-based epoch ``e`` runs at

    lr(e) = base_lr * warmup(e) * gamma ** #{m in milestones : m <= e}
    warmup(e) = warmup_factor * (1 - e / warmup_epochs) + e / warmup_epochs   if e < warmup_epochs
              = 1                                                               otherwise

With the AGW recipe (``warmup_factor`` 0.01, ``warmup_epochs`` 10, ``milestones`` (40, 70),
``gamma`` 0.1) epoch 1 runs at ``0.109 * base_lr``, epoch 9 at ``0.901 * base_lr``, epochs 10-39
at ``base_lr``, 40-69 at ``0.1 * base_lr`` and 70-120 at ``0.01 * base_lr``. The rate is constant
within an epoch, as in the reference.

Epoch lengths vary slightly (the P x K sampler drops identities that run out, see
``reid_jax.data.sampler``), so the schedule is a function of the *global step* through the
exact epoch boundaries of the run's sampler: ``epoch_ends[e]`` = number of steps in epochs
``0..e`` (0-based). :func:`lr_schedule` turns them into an ``optax.Schedule``; the step -> rate
map is a pure function of ``(step, epoch_ends)``, so a resumed run sees the same rates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reid_jax.data.sampler import RandomIdentitySampler

# AGW recipe (configs/AGW_baseline.yml of ReID-Survey).
WARMUP_EPOCHS = 10
WARMUP_FACTOR = 0.01
MILESTONES = (40, 70)
GAMMA = 0.1


def _check_schedule_args(warmup_epochs: int, warmup_factor: float,
                         milestones: Sequence[int], gamma: float) -> None:
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if not 0.0 <= warmup_factor <= 1.0:
        raise ValueError(f"warmup_factor must lie in [0, 1], got {warmup_factor}")
    if list(milestones) != sorted(milestones):
        raise ValueError(f"milestones must be increasing epochs, got {tuple(milestones)}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")


def warmup_multistep_factor(
    epoch: jax.typing.ArrayLike,
    *,
    warmup_epochs: int = WARMUP_EPOCHS,
    warmup_factor: float = WARMUP_FACTOR,
    milestones: Sequence[int] = MILESTONES,
    gamma: float = GAMMA,
) -> jax.Array:
    """The multiplier of the base rate in 1-based epoch ``epoch`` (``WarmupMultiStepLR``).

    Args:
      epoch: int scalar or array, the 1-based epoch number (the reference's ``last_epoch``).
      warmup_epochs: epochs of linear warmup (0: none).
      warmup_factor: the factor the warmup starts from (at ``epoch = 0``).
      milestones: increasing epochs at which the rate is multiplied by ``gamma``.
      gamma: the step factor.

    Returns:
      array of ``epoch``'s shape in the default float dtype (float32; float64 under
      ``jax.enable_x64``, so a float64 training run gets the rate the reference computes in
      Python floats).
    """
    _check_schedule_args(warmup_epochs, warmup_factor, milestones, gamma)
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless 64-bit JAX is on
    e = jnp.asarray(epoch, dtype)
    if warmup_epochs > 0:
        alpha = e / warmup_epochs
        warm = jnp.where(e < warmup_epochs, warmup_factor * (1.0 - alpha) + alpha, 1.0)
    else:
        warm = jnp.ones_like(e)
    steps = jnp.zeros_like(e)
    for m in milestones:
        steps = steps + (e >= m).astype(dtype)
    return warm * jnp.power(jnp.asarray(gamma, dtype), steps)


def epoch_ends(sampler: RandomIdentitySampler, num_epochs: int) -> np.ndarray:
    """int64 [num_epochs] cumulative step counts: ``ends[e]`` = steps in epochs ``0..e``.

    The training run lasts ``ends[-1]`` steps; step ``s`` belongs to 0-based epoch
    ``searchsorted(ends, s, side='right')``, the same mapping as ``sampler.locate``.
    """
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    counts = np.array([sampler.num_batches(e) for e in range(num_epochs)], np.int64)
    if np.any(counts == 0):
        raise ValueError(f"sampler {sampler!r} yields an epoch without batches: it needs at "
                         "least P identities with images")
    return np.cumsum(counts)


def epoch_of_step(step: jax.typing.ArrayLike, ends: jax.typing.ArrayLike) -> jax.Array:
    """0-based epoch of global step ``step`` given :func:`epoch_ends` (clipped to the last)."""
    ends = jnp.asarray(ends)
    epoch = jnp.searchsorted(ends, jnp.asarray(step), side="right")
    return jnp.minimum(epoch, ends.shape[0] - 1)


@dataclasses.dataclass(frozen=True)
class WarmupMultiStepSchedule:
    """``step -> learning rate`` of the AGW recipe (an ``optax.Schedule``); build it with
    :func:`lr_schedule`. A frozen dataclass, so equal settings compare (and hash) equal and a
    jitted step that holds it as a static field is not recompiled for an equal schedule."""

    base_lr: float
    ends: tuple[int, ...]
    warmup_epochs: int
    warmup_factor: float
    milestones: tuple[int, ...]
    gamma: float

    def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
        ends = np.asarray(self.ends, np.int32)
        epoch = epoch_of_step(step, ends) + 1  # the reference's 1-based last_epoch
        return self.base_lr * warmup_multistep_factor(
            epoch, warmup_epochs=self.warmup_epochs, warmup_factor=self.warmup_factor,
            milestones=self.milestones, gamma=self.gamma)


def lr_schedule(
    base_lr: float,
    ends: Sequence[int] | np.ndarray,
    *,
    warmup_epochs: int = WARMUP_EPOCHS,
    warmup_factor: float = WARMUP_FACTOR,
    milestones: Sequence[int] = MILESTONES,
    gamma: float = GAMMA,
) -> WarmupMultiStepSchedule:
    """``step -> learning rate`` of the AGW recipe over epochs with boundaries ``ends``.

    Args:
      base_lr: the base rate (AGW: 3.5e-4).
      ends: :func:`epoch_ends` of the run (it becomes a constant of the jitted step).
      warmup_epochs, warmup_factor, milestones, gamma: see :func:`warmup_multistep_factor`.

    Returns:
      An ``optax.Schedule``; steps past the last epoch keep the last epoch's rate.
    """
    _check_schedule_args(warmup_epochs, warmup_factor, milestones, gamma)
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    ends = np.asarray(ends, np.int64)
    if ends.ndim != 1 or ends.size == 0 or np.any(np.diff(ends) <= 0) or ends[0] <= 0:
        raise ValueError(f"ends must be strictly increasing positive step counts, got {ends}")
    return WarmupMultiStepSchedule(
        base_lr=float(base_lr), ends=tuple(int(e) for e in ends),
        warmup_epochs=int(warmup_epochs), warmup_factor=float(warmup_factor),
        milestones=tuple(int(m) for m in milestones), gamma=float(gamma))
