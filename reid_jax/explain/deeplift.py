"""The model after a map's layer, run on differences: DeepLIFT's multipliers, exact by construction.

A map taken at stage ``L`` explains how the retrieval embedding moves when the stage's output
goes from the baseline ``F0`` to the image's ``F``. This module runs the rest of the model
(stages ``L+1..4``, GeM, BNNeck, the L2 normalisation) on the triple

    ref   = the activation of the baseline (one map, batch 1, broadcast over the batch),
    act   = the activation of the image (the model's own forward),
    delta = a tensor *linear in* ``F - F0`` whose value is ``act - ref``,

op by op (docs/attribute_maps.md, 'DeepLIFT'):

* an affine op ``A`` (convolution, BatchNorm in eval mode, a bias): ``delta -> A_lin(delta)``,
  its linear part (``jax.jvp``), which is exactly ``A(act) - A(ref)``;
* an elementwise non-linearity ``s`` (ReLU, GeM's ``max(x, eps)^p`` and ``^(1/p)``, the norm's
  reciprocal): ``delta -> m * delta`` with the *secant* ``m = (s(act) - s(ref)) / (act - ref)``
  (DeepLIFT's Rescale rule; the derivative at the midpoint where the two are within a rounding
  distance), so ``m * (act - ref) = s(act) - s(ref)``;
* a product of two such tensors ``u v`` (the non-local block's ``theta (phi^T g)``, the square
  and the scaling of the L2 normalisation): ``delta -> u_mid dv + du v_mid`` with the midpoints
  ``u_mid = (u_ref + u_act) / 2``: for any bilinear product
  ``u_act v_act - u_ref v_ref = u_mid (v_act - v_ref) + (u_act - u_ref) v_mid`` exactly.

Every multiplier is computed from ``ref`` and ``act`` alone, so ``delta`` at the output is a
*fixed linear map* ``J`` of the input ``F - F0`` with ``J (F - F0) = f(F) - f(F0)``; a backward
pass of a cotangent ``c`` through it gives ``J^T c``, and ``sum (F - F0) * J^T c = c . (f(F) -
f(F0))``: the map of any linear read-out of the embedding sums to its change exactly, from one
backward pass and no path integral. ``jax.vjp`` of :func:`embedding_delta` with respect to
``delta`` is that backward pass (``ref`` and ``act`` do not depend on it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from reid_jax.models.agw import AGW
from reid_jax.models.non_local import NonLocal
from reid_jax.models.resnet import Bottleneck

Array = jax.Array

# Below this relative gap between ``act`` and ``ref`` a secant is taken as the derivative at
# the midpoint (the secant's rounding error would exceed the midpoint rule's error there).
SECANT_TOLERANCE = 1e-3


class Diff(NamedTuple):
    """An activation of the baseline (``ref``, batch 1), of the images (``act``, batch ``B``) and
    their difference as a linear function of the input's (``delta``, batch ``B``)."""

    ref: Array
    act: Array
    delta: Array


def _map(fn: Callable[[Array], Array], x: Diff) -> Diff:
    """A linear op (reshape, mean, sum) applied to all three."""
    return Diff(fn(x.ref), fn(x.act), fn(x.delta))


def _add(x: Diff, y: Diff) -> Diff:
    return Diff(x.ref + y.ref, x.act + y.act, x.delta + y.delta)


def affine(fn: Callable[[Array], Array], x: Diff) -> Diff:
    """An affine op ``fn``: ``delta`` through its linear part (the JVP at ``act``)."""
    act, delta = jax.jvp(fn, (x.act,), (x.delta,))
    return Diff(fn(x.ref), act, delta)


def secant(fn: Callable[[Array], Array], x: Diff) -> Diff:
    """An elementwise non-linearity ``fn``: ``delta`` times the secant slope (Rescale rule)."""
    ref, act = fn(x.ref), fn(x.act)
    gap = x.act - x.ref
    mid = (x.act + x.ref) / 2
    _, slope_mid = jax.jvp(fn, (mid,), (jnp.ones_like(mid),))
    scale = jnp.maximum(jnp.abs(x.act), jnp.abs(x.ref))
    wide = jnp.abs(gap) > SECANT_TOLERANCE * scale
    slope = jnp.where(wide, (act - ref) / jnp.where(wide, gap, 1.0), slope_mid)
    return Diff(ref, act, slope * x.delta)


def relu(x: Diff) -> Diff:
    """ReLU: the secant is exact in floating point (1, 0, or the crossing's share)."""
    ref, act = jax.nn.relu(x.ref), jax.nn.relu(x.act)
    gap = x.act - x.ref
    moved = gap != 0
    slope = jnp.where(moved, (act - ref) / jnp.where(moved, gap, 1.0),
                      (x.act > 0).astype(x.act.dtype))
    return Diff(ref, act, slope * x.delta)


def bilinear(fn: Callable[[Array, Array], Array], u: Diff, v: Diff) -> Diff:
    """A product ``fn(u, v)`` linear in each argument: the midpoint rule, exact for bilinear
    ``fn``."""
    u_mid, v_mid = (u.ref + u.act) / 2, (v.ref + v.act) / 2
    return Diff(fn(u.ref, v.ref), fn(u.act, v.act), fn(u_mid, v.delta) + fn(u.delta, v_mid))


# --------------------------------------------------------------------------------------------
# The model's modules (their eval-mode forward, as reid_jax.models defines it).


def bottleneck(block: Bottleneck, x: Diff) -> Diff:
    """``Bottleneck.__call__`` on differences."""
    y = relu(affine(lambda v: block.bn1(block.conv1(v)), x))
    y = relu(affine(lambda v: block.bn2(block.conv2(v)), y))
    y = affine(lambda v: block.bn3(block.conv3(v)), y)
    shortcut = x if block.downsample_conv is None else affine(
        lambda v: block.downsample_bn(block.downsample_conv(v)), x)
    return relu(_add(y, shortcut))


def non_local(nl: NonLocal, x: Diff) -> Diff:
    """``NonLocal.__call__`` on differences (two bilinear products)."""
    b, h, w, _ = x.act.shape
    n = h * w
    ci = nl.inter_channels

    def project(conv) -> Diff:
        out = affine(conv, x)
        return Diff(out.ref.reshape(1, n, ci), out.act.reshape(b, n, ci),
                    out.delta.reshape(b, n, ci))

    g, theta, phi = project(nl.g), project(nl.theta), project(nl.phi)
    phi_g = bilinear(lambda p, q: jnp.einsum("bnc,bnd->bcd", p, q) / n, phi, g)
    y = bilinear(lambda t, pg: jnp.einsum("bnc,bcd->bnd", t, pg), theta, phi_g)
    y = Diff(y.ref.reshape(1, h, w, ci), y.act.reshape(b, h, w, ci), y.delta.reshape(b, h, w, ci))
    return _add(affine(lambda v: nl.w_bn(nl.w_conv(v)), y), x)


def backbone_from(model: AGW, x: Diff, stage: int) -> Diff:
    """``ResNet.forward_from(x, stage)`` on differences: the output of stage ``stage`` -> the
    last feature map (float32, as the maps take it)."""
    for s in range(stage, 4):
        for module in model.backbone.stage_modules(s):
            x = non_local(module, x) if isinstance(module, NonLocal) else bottleneck(module, x)
    return _map(lambda v: v.astype(jnp.float32), x)


def embedding_of_map(model: AGW, fmap: Diff) -> Diff:
    """GeM, BNNeck and the model's retrieval feature and normalisation
    (``AGW.retrieval_embedding``) on differences: ``[B, h, w, N] -> [B, N]``."""
    p = jnp.reshape(model.gem.p[...], ()).astype(jnp.float32)
    eps = model.gem.eps
    powered = secant(lambda v: jnp.power(jnp.maximum(v, eps), p), fmap)
    pooled = secant(lambda v: jnp.power(v, 1.0 / p),
                    _map(lambda v: jnp.mean(v, axis=(1, 2)), powered))
    f = pooled if model.retrieval_feature == "pre_bn" else affine(model.bnneck, pooled)
    f = _map(lambda v: v.astype(jnp.float32), f)
    if not model.normalize_feature:
        return f
    squares = bilinear(jnp.multiply, f, f)
    total = _map(lambda v: jnp.sum(v, axis=-1, keepdims=True), squares)
    inverse = secant(lambda s: 1.0 / jnp.maximum(jnp.sqrt(s), 1e-12), total)
    return bilinear(jnp.multiply, f, inverse)


def embedding_delta(model: AGW, layer: int, ref: Array, act: Array, delta: Array) -> Diff:
    """The retrieval embedding on differences from the output of stage ``layer`` (1..4).

    Args:
      model: the re-id model, in eval mode.
      layer: the stage whose output ``ref``, ``act`` and ``delta`` are.
      ref: ``[1, h, w, C]`` the baseline's output of that stage.
      act: ``[B, h, w, C]`` the images' output.
      delta: ``[B, h, w, C]``, ``act - ref`` (the variable of the linear map).

    Returns:
      :class:`Diff` of the embedding: ``ref [1, N]``, ``act [B, N]`` (the model's embeddings) and
      ``delta [B, N]``, linear in the input ``delta`` and equal to ``act - ref``.
    """
    return embedding_of_map(model, backbone_from(model, Diff(ref, act, delta), layer))


__all__ = ["SECANT_TOLERANCE", "Diff", "affine", "bilinear", "embedding_delta", "relu", "secant"]
