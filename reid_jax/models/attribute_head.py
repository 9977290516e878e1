"""The paper's attribute classifier: ``x = sigmoid(f @ W)`` on the frozen retrieval embedding.

``f`` is the embedding that is ranked and explained (``reid_jax.models.agw.retrieval_embedding``;
``docs/design.md``, "One embedding is ranked, classified and explained"); ``W`` is the
``[N, A]`` kernel (N = 2048, A = 30), *without bias*, used directly by the explanation kernels
(eq. 3.2 weights ``w_na``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import special

from reid_jax.data.attributes import NUM_ATTRIBUTES


class AttributeOutputs(NamedTuple):
    logits: jax.Array  # [B, A] f @ W
    probabilities: jax.Array  # [B, A] sigmoid(f @ W)


class AttributeHead(nnx.Module):
    """One bias-free dense layer ``embedding [B, N] -> AttributeOutputs([B, A], [B, A])``.

    ``kernel`` is an ``nnx.Param`` of shape ``[N, A]`` (the paper's ``W``); initialised
    LeCun-normal.
    """

    def __init__(
        self, embedding_dim: int, num_attributes: int = NUM_ATTRIBUTES, *, rngs: nnx.Rngs
    ):
        if embedding_dim < 1 or num_attributes < 1:
            raise ValueError(
                f"AttributeHead needs embedding_dim, num_attributes >= 1, got "
                f"{embedding_dim}, {num_attributes}"
            )
        self.embedding_dim = embedding_dim
        self.num_attributes = num_attributes
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (embedding_dim, num_attributes), jnp.float32))

    def __call__(self, embedding: jax.Array) -> AttributeOutputs:
        """``embedding [B, N] -> (logits [B, A], probabilities [B, A])``, float32."""
        if embedding.ndim != 2 or embedding.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"AttributeHead expects embeddings [B, {self.embedding_dim}], "
                f"got {embedding.shape}"
            )
        logits = jnp.dot(embedding.astype(jnp.float32), self.kernel[...],
                         precision=jax.lax.Precision.HIGHEST)
        return AttributeOutputs(logits=logits, probabilities=jax.nn.sigmoid(logits))


class Calibration(NamedTuple):
    """Per-attribute Platt scaling of the head's logits: ``x~_a = sigmoid(slope_a z_a +
    intercept_a)``, ``z = f @ W`` (docs/design.md, "Calibrated probabilities").

    The head is trained with a class-weighted loss on the training identities, so its raw
    probabilities are neither frequencies nor honest about unseen persons; the calibration is
    fitted on logits of *held-out training identities* (``reid_jax.train.attribute_training.
    cross_fitted_calibration``). It is used where probabilities are read as probabilities (the
    ``disagreement`` explanation); the paper's eq. 3.1 keeps the head's own ``x``.

    Attributes:
      slope, intercept: float ``[A]``.
    """

    slope: jax.Array
    intercept: jax.Array

    def probabilities(self, logits: jax.Array) -> jax.Array:
        """``[..., A]`` logits ``z`` -> calibrated probabilities ``[..., A]`` (float32 or the
        logits' wider float type)."""
        return jax.nn.sigmoid(logits * self.slope + self.intercept)

    def json(self) -> dict[str, list[float]]:
        """``{"slope": [A], "intercept": [A]}`` as plain floats."""
        return {"slope": [float(v) for v in np.asarray(self.slope)],
                "intercept": [float(v) for v in np.asarray(self.intercept)]}

    @classmethod
    def from_json(cls, value: Any, where: str = "calibration") -> Calibration:
        """The inverse of :meth:`json`; ``where`` names the source in the error messages."""
        if not isinstance(value, dict) or not {"slope", "intercept"} <= set(value):
            keys = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise ValueError(f"{where} must be {{'slope': [A], 'intercept': [A]}}, got {keys}")
        slope = np.asarray(value["slope"], np.float32)
        intercept = np.asarray(value["intercept"], np.float32)
        if slope.ndim != 1 or slope.shape != intercept.shape or not slope.size:
            raise ValueError(f"{where}: slope and intercept must be [A] lists of one length, got "
                             f"{slope.shape} and {intercept.shape}")
        if not (np.isfinite(slope).all() and np.isfinite(intercept).all()):
            raise ValueError(f"{where}: slope and intercept must be finite")
        return cls(jnp.asarray(slope), jnp.asarray(intercept))


def head_probabilities(logits: jax.Array, calibration: Calibration | None = None) -> jax.Array:
    """``sigmoid(z)``, or the calibrated ``sigmoid(slope z + intercept)`` when ``calibration``
    is given: the probabilities the ``disagreement`` explanation reads."""
    return jax.nn.sigmoid(logits) if calibration is None else calibration.probabilities(logits)


def check_calibration(calibration: Calibration | None, num_attributes: int) -> None:
    """Raises ValueError unless ``calibration`` is None or a :class:`Calibration` of
    ``num_attributes`` slopes and intercepts."""
    if calibration is None:
        return
    if not isinstance(calibration, Calibration):
        raise ValueError(f"calibration must be a Calibration(slope [A], intercept [A]) or None, "
                         f"got {type(calibration).__name__}")
    shapes = (tuple(jnp.shape(calibration.slope)), tuple(jnp.shape(calibration.intercept)))
    if shapes != ((num_attributes,), (num_attributes,)):
        raise ValueError(f"calibration must have slope and intercept of shape ({num_attributes},) "
                         f"(one per attribute of the weights), got {shapes[0]} and {shapes[1]}")


def check_accuracy(accuracy: Any, where: str,
                   names: Sequence[str] | None = None) -> dict[str, float | None]:
    """The head's balanced accuracy per attribute as ``{name: float in [0, 1] or None}`` (None
    or NaN: not measured, the test images show one class), as ``tools/train_attributes.py``
    stores it with the head and the report and the explorer read it
    (``reid_jax.explain.learned``).

    Args:
      accuracy: the values to check.
      where: what they are, named first in every message (a checkpoint's meta field, ...).
      names: when given, ``accuracy`` must name exactly these attributes (returned in this
        order).

    Raises:
      ValueError: not a mapping, names missing or unknown, or a value that is not a number in
        [0, 1] or None.
    """
    if not isinstance(accuracy, Mapping):
        raise ValueError(f"{where} must map attribute names to accuracies, got "
                         f"{type(accuracy).__name__}")
    if names is not None:
        missing = [n for n in names if n not in accuracy]
        extra = sorted(set(accuracy) - set(names))
        if missing or extra:
            raise ValueError(f"{where} must name exactly the {len(names)} attributes; missing "
                             f"{missing}, unknown {extra}")
    out: dict[str, float | None] = {}
    for name in (names if names is not None else accuracy):
        value = accuracy[name]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out[str(name)] = None
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{where}: {name!r} must be a number in [0, 1] or null, got "
                             f"{value!r}")
        out[str(name)] = float(value)
    return out


def fit_calibration(logits: Any, labels: Any, *, ridge: float = 1e-3,
                    iterations: int = 50) -> Calibration:
    """Platt scaling per attribute: the ``(slope, intercept)`` minimising the mean logistic
    loss of ``sigmoid(slope z + intercept)`` against ``labels``, plus ``ridge / 2 *
    (slope^2 + intercept^2)`` (which keeps separable attributes finite).

    Newton's method on all attributes at once in float64 (the loss is convex; 2 x 2 systems).

    Args:
      logits: ``[n, A]`` head logits of held-out images.
      labels: ``[n, A]`` their labels in {0, 1}.

    Returns:
      :class:`Calibration` (float32).
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    if z.ndim != 2 or y.shape != z.shape or z.shape[0] < 2:
        raise ValueError(f"logits and labels must both be [n, A] with n >= 2, got {z.shape} and "
                         f"{y.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    n = z.shape[0]
    design = np.stack([z, np.ones_like(z)], axis=-1)  # [n, A, 2]

    def loss(params):  # [A] mean logistic loss + ridge
        s = np.einsum("nak,ak->na", design, params)
        return ((np.logaddexp(0.0, s) - y * s).mean(axis=0)
                + 0.5 * ridge * np.square(params).sum(axis=1))

    params = np.stack([np.ones(z.shape[1]), np.zeros(z.shape[1])], axis=1)  # [A, 2]
    current = loss(params)
    for _ in range(iterations):
        p = special.expit(np.einsum("nak,ak->na", design, params))
        grad = np.einsum("na,nak->ak", p - y, design) / n + ridge * params
        hess = (np.einsum("na,nak,nal->akl", p * (1.0 - p), design, design) / n
                + ridge * np.eye(2)[None])
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        scale = np.ones(z.shape[1])
        for _ in range(30):  # halve the step of an attribute whose loss would rise
            trial = params - scale[:, None] * step
            new = loss(trial)
            worse = new > current + 1e-15
            if not worse.any():
                break
            scale = np.where(worse, scale / 2.0, scale)
        params, current = trial, new
        if np.abs(scale[:, None] * step).max() < 1e-10:
            break
    return Calibration(jnp.asarray(params[:, 0], jnp.float32),
                       jnp.asarray(params[:, 1], jnp.float32))
