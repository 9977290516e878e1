"""Attribute maps: where in the images the attribute explanations come from.

Two kinds of map, both complete (their pixels sum to the number they explain) and both taken
through a feature map of the model: by default the output of stage 2 (``layer``; the last
feature map is ``layer=4``, ``AGWOutputs.feature_map``, ``[B, h, w, C]``; docs/attribute_maps.md,
'Layer'):

* :func:`evidence_maps` — for one image and attribute ``a``, where the image shows ``a``: a map
  of the attribute logit ``z_a = f @ w_a`` (``x_a = sigmoid(z_a)``, the probability behind
  eq. 3.1). It sums to ``z_a - z_a^0``, ``z_a^0`` the logit of the baseline (below).
* :func:`contribution_maps` — for a pair (q, g) and attribute ``a``, a map over each image that
  together sum to the pair's attribute error ``e_a = sum_n (f_n^q - f_n^g)^2 w_na`` (eq. 3.2,
  paper weights or the complete weights ``|w| / sum_a |w|``).

Both explain the change from a baseline feature map ``F0`` — a given one
(:func:`reference_baseline`: the mean map of reference images, what the tools use), else all
zeros (for the L2-normalised pre-BN feature, whose direction is undefined at zero, the constant
map at BNNeck's running mean) — to the image's ``F``. For a pair both images start from the
*same* ``F0``, so there they have the same embedding and ``e_a = 0``: the two maps together
decompose ``e_a`` itself. Two methods (``method``; docs/attribute_maps.md, 'The map method'):

* ``"deeplift"`` (the default): the rest of the model run on differences with DeepLIFT's
  multipliers (``reid_jax.explain.deeplift``), a fixed linear map of ``F - F0`` whose output is
  exactly the embedding's change; one backward pass per attribute through it
  (:data:`ATTRIBUTE_BATCH` at a time) gives maps that sum to the explained number up to
  rounding, at any layer. A query with its top k takes its contribution maps in forward mode,
  one pass per cell, when it has fewer cells than pairs times attributes.
* ``"integrated_gradients"``: the gradient integrated along the straight path
  ``F0 + t (F - F0)`` by Gauss-Legendre quadrature with ``steps`` nodes. At the last map each
  node is one backward pass to the pooled feature for all attributes and one pass through GeM,
  which pools every channel on its own, and the integrand is smooth (GeM is positively
  homogeneous); through an earlier stage each node is a backward pass per attribute and ReLUs
  make the integrand rough (docs/attribute_maps.md, 'Completeness', 'Cost').

The backbone up to the layer runs forward once per image. Channels are summed, and the
``h x w`` cell maps are spread to the model input's ``H x W`` pixels by :func:`resize_maps`,
which keeps every map's sum, so completeness holds at pixel level.

:func:`distance_gradcam` is the plain Grad-CAM baseline of the measurements (gradient-weighted
last feature map of the total distance); :func:`embed` is the eval-mode retrieval embedding of
model-input arrays, the same tensor ``reid_jax.embeddings.extract`` computes from files.

All take an ``AGW`` (used in eval mode: the kernels merge a split copy of it in eval mode; the
model is not changed), model-input images ``[B, H, W, 3]`` (resized and normalised as for
evaluation, ``reid_jax.data.augment.eval_transform``) and the attribute head's weights ``W [N, A]``;
maps are float32 at the model input's resolution (:func:`resize_maps` for the stored image's).
Shapes are checked before tracing, with messages that name them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reid_jax.explain import deeplift
from reid_jax.explain.kernels import complete_weights
from reid_jax.models.agw import AGW, AGWOutputs

Array = jax.Array

DEFAULT_STEPS = 32
# Integrated gradients' quadrature nodes at most: each node is a pass through the network,
# and 32 to 64 already bring the maps' sum within the completeness bound (docs/attribute_maps.md,
# 'Completeness').
MAX_STEPS = 1024
# How a map spreads the number it explains over the cells (docs/attribute_maps.md, 'The map
# method'): integrated gradients along the straight path, or DeepLIFT's multipliers (one
# backward pass, exact; reid_jax.explain.deeplift).
MAP_METHODS = ("integrated_gradients", "deeplift")
DEFAULT_METHOD = "deeplift"
# The stage whose output the maps are taken at (1..4; 4: the last feature map).
MAP_LAYERS = (1, 2, 3, 4)
DEFAULT_LAYER = 2
# Attributes per batched backward pass (integrated gradients below the last feature map,
# DeepLIFT at every layer), and cells per batched forward-mode pass (bounded memory).
ATTRIBUTE_BATCH = 8
_HIGHEST = jax.lax.Precision.HIGHEST


class EvidenceMaps(NamedTuple):
    """Evidence maps of a batch of images.

    Attributes:
      maps: float32 ``[B, A, H, W]`` in logit units; ``maps[b, a].sum()`` is
        ``logits[b, a] - baseline_logits[a]`` (up to rounding with DeepLIFT, quadrature error
        with integrated gradients).
      logits: float32 ``[B, A]`` ``z = f @ W`` of the images (``x = sigmoid(z)``).
      baseline_logits: float32 ``[A]`` ``z`` of the baseline feature map.
    """

    maps: Array
    logits: Array
    baseline_logits: Array


class ContributionMaps(NamedTuple):
    """Contribution maps of ``P`` pairs.

    Attributes:
      query: float32 ``[P, A, H, W]`` over the pair's query image.
      gallery: float32 ``[P, A, H, W]`` over the pair's gallery image;
        ``query[p, a].sum() + gallery[p, a].sum()`` is ``errors[p, a]``.
      errors: float32 ``[P, A]`` the pair's ``e_a`` (eq. 3.2 with the mode's weights).
      distances: float32 ``[P]`` the pair's squared distance ``|f^q - f^g|^2``.
    """

    query: Array
    gallery: Array
    errors: Array
    distances: Array


# --------------------------------------------------------------------------------------------
# Checks (before tracing: every shape is static).


def _check_images(name: str, images) -> tuple[int, int, int]:
    shape = tuple(jnp.shape(images))
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{name} must be model-input images [B, H, W, 3], got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} is empty: shape {shape}")
    return shape[0], shape[1], shape[2]


def _check_weights(model: AGW, weights) -> int:
    shape = tuple(jnp.shape(weights))
    if len(shape) != 2 or shape[0] != model.feature_dim or shape[1] < 1:
        raise ValueError(f"weights must be the attribute head's [N, A] with N = "
                         f"{model.feature_dim} (the model's embedding size), got shape {shape}")
    return shape[1]


def _check_steps(steps) -> int:
    if (isinstance(steps, bool) or not isinstance(steps, (int, np.integer))
            or not 1 <= steps <= MAX_STEPS):
        raise ValueError(f"steps must be an integer in 1..{MAX_STEPS} (quadrature nodes), got "
                         f"{steps!r}")
    return int(steps)


def check_layer(layer) -> int:
    """``layer`` as an int of :data:`MAP_LAYERS`, or a ValueError naming it."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(
            layer) not in MAP_LAYERS:
        raise ValueError(f"layer must be one of {MAP_LAYERS} (the stage whose output the maps "
                         f"are taken at; 4: the last feature map), got {layer!r}")
    return int(layer)


def check_method(method) -> str:
    """``method`` as one of :data:`MAP_METHODS`, or a ValueError naming it."""
    if method not in MAP_METHODS:
        raise ValueError(f"method must be one of {MAP_METHODS} (how a map spreads what it "
                         f"explains over the cells), got {method!r}")
    return method


def _check_baseline(baseline, features_shape: tuple[int, ...]) -> None:
    if baseline is None:
        return
    shape = tuple(jnp.shape(baseline))
    if shape != tuple(features_shape[1:]):
        raise ValueError(f"baseline must be one feature map [h, w, C] = {list(features_shape[1:])} "
                         f"of the maps' layer (reference_baseline), got shape {list(shape)}")


def pair_index(name: str, index, num_first: int, num_pairs: int) -> np.ndarray:
    """int32 ``[P]``: which of ``num_first`` first images (queries, partners) each of
    ``num_pairs`` pairs uses; ``index`` None: the only one, or one per pair. ``name`` is for
    the error messages."""
    if index is None:
        if num_first == 1:
            return np.zeros(num_pairs, np.int32)
        if num_first == num_pairs:
            return np.arange(num_pairs, dtype=np.int32)
        raise ValueError(f"{name} is needed: {num_first} first images for {num_pairs} pairs "
                         "(give one first image, one per pair, or an index per pair)")
    index = np.asarray(index)
    if index.shape != (num_pairs,) or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"{name} must be ints of shape ({num_pairs},) (one per pair), got "
                         f"{index.dtype}{list(index.shape)}")
    if num_pairs and (index.min() < 0 or index.max() >= num_first):
        raise ValueError(f"{name} must lie in [0, {num_first}), got values "
                         f"{index.min()}..{index.max()}")
    return index.astype(np.int32)


# --------------------------------------------------------------------------------------------
# Pieces shared by the kernels.


class _Parts(NamedTuple):
    """A model split for the jitted kernels (:func:`_eval_model` merges it in eval mode)."""

    graphdef: nnx.GraphDef
    state: nnx.State


def _eval_parts(model: AGW) -> _Parts:
    """``model`` split as it is; the kernels use the merged copy in eval mode, so ``model``
    itself is not changed. (One split per call: an eval-mode ``nnx.view`` before the split
    cost several times the split, more than a forward pass of a few images.)"""
    return _Parts(*nnx.split(model))


def _eval_model(graphdef: nnx.GraphDef, state: nnx.State) -> AGW:
    """Inside a jitted function: the merged model in eval mode (running BatchNorm
    statistics) — a traced copy, whatever the mode of the model that was split."""
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _backbone_forward(graphdef, state, images):
    return _eval_model(graphdef, state).backbone(images).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "layer"))
def _backbone_to(graphdef, state, images, *, layer):
    return _eval_model(graphdef, state).backbone.forward_to(images, layer).astype(jnp.float32)


def _features(parts: _Parts, images: Array, layer: int) -> Array:
    """``[B, h, w, C]`` float32 output of stage ``layer`` (4: the last feature map)."""
    if layer == 4:
        return _feature_map(parts, images)
    return _backbone_to(parts.graphdef, parts.state, jnp.asarray(images, jnp.float32),
                        layer=layer)


def _feature_map(parts: _Parts, images: Array) -> Array:
    """``[B, h, w, C]`` float32 last feature map (``AGWOutputs.feature_map``) of model-input
    images, eval mode."""
    return _backbone_forward(parts.graphdef, parts.state, jnp.asarray(images, jnp.float32))


def _embedding_of_pooled(model: AGW, pre_bn: Array) -> Array:
    """The retrieval embedding ``[B, N]`` from the GeM feature ``[B, N]``: BNNeck and the
    model's own choice of feature and normalisation (``AGW.retrieval_embedding``)."""
    post_bn = model.bnneck(pre_bn)
    outputs = AGWOutputs(feature_map=None, pre_bn=pre_bn, post_bn=post_bn, logits=None)
    return model.retrieval_embedding(outputs)


def _embedding_of_map(model: AGW, feature_map: Array) -> Array:
    """The retrieval embedding ``[B, N]`` from a last feature map ``[B, h, w, N]``."""
    return _embedding_of_pooled(model, model.gem(feature_map))


def _gem_sensitivity(model: AGW, point: Array, delta: Array) -> tuple[Array, Array]:
    """GeM at ``point`` ``[B, h, w, C]`` and ``delta * d pooled_c / d F[h, w, c]`` there.

    GeM pools every channel on its own, so the gradient of ``sum_c pooled_c`` holds each
    channel's own derivative: the chain rule from the pooled feature to the map needs no
    per-attribute pass (see docs/attribute_maps.md, 'Cost').
    """
    pooled, vjp = jax.vjp(model.gem, point)
    (grad,) = vjp(jnp.ones_like(pooled))
    return pooled, grad * delta


def _baseline_map(model: AGW, feature_map: Array) -> Array:
    """``F0``: the zero map, or for the L2-normalised pre-BN feature (undefined direction at
    zero) the constant map at BNNeck's running mean (see docs/attribute_maps.md, 'Baseline')."""
    if model.retrieval_feature == "pre_bn" and model.normalize_feature:
        mean = model.bnneck.bn.mean[...].astype(jnp.float32)
        return jnp.broadcast_to(mean, feature_map.shape)
    return jnp.zeros_like(feature_map)


def quadrature(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes ``t [steps]`` in (0, 1) and weights ``[steps]`` summing to 1."""
    nodes, weights = np.polynomial.legendre.leggauss(_check_steps(steps))
    return ((nodes + 1.0) / 2.0).astype(np.float32), (weights / 2.0).astype(np.float32)


def spread_matrix(n_out: int, n_in: int) -> np.ndarray:
    """float32 ``[n_out, n_in]`` linear (tent) resampling whose every column sums to 1.

    Input cell ``j`` (centre ``(j + 0.5) n_out / n_in - 0.5`` in output pixels) spreads over the
    output pixels within ``max(n_out / n_in, 1)`` of its centre, tent-weighted; columns are
    normalised, so ``M @ x`` has the sum of ``x``. Between cell centres the result interpolates
    linearly, as bilinear upsampling does.
    """
    if n_out < 1 or n_in < 1:
        raise ValueError(f"sizes must be >= 1, got n_out={n_out}, n_in={n_in}")
    scale = n_out / n_in
    centres = (np.arange(n_in) + 0.5) * scale - 0.5
    half = max(scale, 1.0)
    out = np.arange(n_out, dtype=np.float64)[:, None]
    w = np.maximum(0.0, 1.0 - np.abs(out - centres[None, :]) / half)
    return (w / w.sum(axis=0, keepdims=True)).astype(np.float32)


def resize_maps(maps: Array, height: int, width: int) -> Array:
    """``[..., h, w] -> [..., height, width]``, keeping each map's sum (:func:`spread_matrix`).

    Use it to bring maps from the model input's resolution to the stored image's (e.g. 256 x
    128 -> 128 x 64) or from feature cells to pixels. float32.
    """
    shape = tuple(jnp.shape(maps))
    if len(shape) < 2:
        raise ValueError(f"maps must be [..., h, w], got shape {shape}")
    mh = jnp.asarray(spread_matrix(int(height), shape[-2]))
    mw = jnp.asarray(spread_matrix(int(width), shape[-1]))
    return jnp.einsum("...hw,Hh,Ww->...HW", jnp.asarray(maps, jnp.float32), mh, mw,
                      precision=_HIGHEST)


def _one_hot_cotangents(num_attributes: int, rows: int) -> Array:
    """``[A, rows, A]``: cotangent ``a`` selects output ``a`` of every row."""
    eye = jnp.eye(num_attributes, dtype=jnp.float32)
    return jnp.broadcast_to(eye[:, None, :], (num_attributes, rows, num_attributes))


def _channel_sum(pooled_grads: Array, sensitivity: Array) -> Array:
    """``sum_c pooled_grads[a, b, c] * sensitivity[b, h, w, c]`` -> ``[b, a, h, w]``."""
    return jnp.einsum("abc,bhwc->bahw", pooled_grads, sensitivity, precision=_HIGHEST)


# --------------------------------------------------------------------------------------------
# Kernels.


def _start(model: AGW, features: Array, baseline: Array | None, layer: int) -> Array:
    """The baseline ``F0`` at the maps' layer (the path's start): the given baseline, else
    zeros (at the last map: :func:`_baseline_map`)."""
    if baseline is not None:
        return jnp.broadcast_to(jnp.asarray(baseline, jnp.float32), features.shape)
    return _baseline_map(model, features) if layer == 4 else jnp.zeros_like(features)


def _through(model: AGW, layer: int):
    """``F`` at the output of stage ``layer`` -> the retrieval embedding ``[B, N]``."""
    def embedding(features):
        fmap = model.backbone.forward_from(features, layer).astype(jnp.float32)
        return _embedding_of_map(model, fmap)
    return embedding


def _attribute_vjp(vjp, cot: Array):
    """``vjp`` applied to the one-hot cotangents ``[A, ...]``, :data:`ATTRIBUTE_BATCH` at a
    time (one batched backward pass each)."""
    return jax.lax.map(vjp, cot, batch_size=min(ATTRIBUTE_BATCH, cot.shape[0]))


def _full_channel_sum(grads: Array, delta: Array) -> Array:
    """``sum_c grads[a, b, h, w, c] * delta[b, h, w, c]`` -> ``[b, a, h, w]``."""
    return jnp.einsum("abhwc,bhwc->bahw", grads, delta, precision=_HIGHEST)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "size", "layer"))
def _evidence(graphdef, state, feats, weights, baseline, *, steps, size, layer):
    model = _eval_model(graphdef, state)
    base = _start(model, feats, baseline, layer)
    delta = feats - base
    embedding = _through(model, layer)

    def logits_of_pooled(pooled):  # [B, N] -> [B, A]
        return jnp.matmul(_embedding_of_pooled(model, pooled), weights, precision=_HIGHEST)

    def logits(features):  # [B, h, w, C] at the layer -> [B, A]
        return jnp.matmul(embedding(features), weights, precision=_HIGHEST)

    nodes, node_weights = quadrature(steps)
    cot = _one_hot_cotangents(weights.shape[1], feats.shape[0])

    def step(acc, node):
        t, wt = node
        if layer == 4:  # through GeM alone: one pass to the pooled feature for all attributes
            pooled, sens = _gem_sensitivity(model, base + t * delta, delta)
            _, vjp = jax.vjp(logits_of_pooled, pooled)
            (grads,) = jax.vmap(vjp)(cot)  # [A, B, N]
            return acc + wt * _channel_sum(grads, sens), None
        _, vjp = jax.vjp(logits, base + t * delta)
        (grads,) = _attribute_vjp(vjp, cot)  # [A, B, h, w, C]
        return acc + wt * _full_channel_sum(grads, delta), None

    init = jnp.zeros((feats.shape[0], weights.shape[1], *feats.shape[1:3]), jnp.float32)
    cells, _ = jax.lax.scan(step, init, (jnp.asarray(nodes), jnp.asarray(node_weights)))
    maps = resize_maps(cells, *size)
    return EvidenceMaps(maps, logits(feats), logits(base[:1])[0])


def _deeplift_start(model: AGW, feats: Array, baseline: Array | None, layer: int) -> Array:
    """``F0`` as one map ``[1, h, w, C]`` (the same for every image)."""
    return _start(model, feats[:1], baseline, layer)


@functools.partial(jax.jit, static_argnames=("graphdef", "size", "layer"))
def _deeplift_evidence(graphdef, state, feats, weights, baseline, *, size, layer):
    model = _eval_model(graphdef, state)
    base = _deeplift_start(model, feats, baseline, layer)
    delta = feats - base

    def logits_delta(d):  # [B, h, w, C] -> [B, A], linear in d
        return jnp.matmul(deeplift.embedding_delta(model, layer, base, feats, d).delta,
                          weights, precision=_HIGHEST)

    _, vjp = jax.vjp(logits_delta, delta)
    (grads,) = _attribute_vjp(vjp, _one_hot_cotangents(weights.shape[1], feats.shape[0]))
    cells = _full_channel_sum(grads, delta)
    embedding = _through(model, layer)
    return EvidenceMaps(resize_maps(cells, *size),
                        jnp.matmul(embedding(feats), weights, precision=_HIGHEST),
                        jnp.matmul(embedding(base), weights, precision=_HIGHEST)[0])


def evidence_maps(model: AGW, weights: Array, images: Array, *,
                  steps: int = DEFAULT_STEPS, layer: int = DEFAULT_LAYER,
                  baseline: Array | None = None,
                  method: str = DEFAULT_METHOD) -> EvidenceMaps:
    """Where each image shows each attribute: maps of ``z_a = f @ w_a`` (behind eq. 3.1).

    Args:
      model: the re-id model (used in eval mode; not changed).
      weights: ``[N, A]`` attribute-head weights ``W``.
      images: ``[B, H, W, 3]`` model-input images (eval transform).
      steps: quadrature nodes of integrated gradients (unused by DeepLIFT).
      layer: the stage whose output the maps are taken at (:data:`MAP_LAYERS`; 2: ``H/8 x
        W/8`` cells; 4: the last feature map, ``H/16 x W/16``; docs/attribute_maps.md, 'Layer').
      baseline: the change explained starts here, one feature map ``[h, w, C]`` of that layer
        (:func:`reference_baseline`); None: zeros (the last map: as in 'Baseline').
      method: ``"deeplift"`` (one backward pass per attribute, exact) or
        ``"integrated_gradients"`` (``steps`` nodes) (:data:`MAP_METHODS`).

    Returns:
      :class:`EvidenceMaps`: ``maps [B, A, H, W]`` (positive: the pixels raise ``z_a``), the
      logits ``[B, A]`` and the baseline logits ``[A]``.
    """
    _, h, w = _check_images("images", images)
    _check_weights(model, weights)
    steps = _check_steps(steps)
    layer = check_layer(layer)
    method = check_method(method)
    parts = _eval_parts(model)
    feats = _features(parts, images, layer)
    _check_baseline(baseline, feats.shape)
    if method == "deeplift":
        return _deeplift_evidence(
            parts.graphdef, parts.state, feats, jnp.asarray(weights, jnp.float32),
            None if baseline is None else jnp.asarray(baseline, jnp.float32), size=(h, w),
            layer=layer)
    return _evidence(parts.graphdef, parts.state, feats, jnp.asarray(weights, jnp.float32),
                     None if baseline is None else jnp.asarray(baseline, jnp.float32),
                     steps=steps, size=(h, w), layer=layer)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "complete", "size", "layer"))
def _contributions(graphdef, state, fq_all, fg, query_index, weights, baseline, *, steps,
                   complete, size, layer):
    model = _eval_model(graphdef, state)
    fq = fq_all[query_index]
    w = complete_weights(weights) if complete else weights
    base = _start(model, fq, baseline, layer)  # image independent: the same F0 for both images
    dq, dg = fq - base, fg - base
    embedding = _through(model, layer)

    def errors_of_pooled(pq, pg):  # eq. 3.2 for every pair from the pooled features, [P, A]
        diff = _embedding_of_pooled(model, pq) - _embedding_of_pooled(model, pg)
        return jnp.matmul(jnp.square(diff), w, precision=_HIGHEST)

    def errors(xq, xg):  # eq. 3.2 from the features at the layer
        diff = embedding(xq) - embedding(xg)
        return jnp.matmul(jnp.square(diff), w, precision=_HIGHEST)

    nodes, node_weights = quadrature(steps)
    cot = _one_hot_cotangents(w.shape[1], fq.shape[0])

    def step(acc, node):
        t, wt = node
        if layer == 4:
            pq, sq = _gem_sensitivity(model, base + t * dq, dq)
            pg, sg = _gem_sensitivity(model, base + t * dg, dg)
            _, vjp = jax.vjp(errors_of_pooled, pq, pg)
            gq, gg = jax.vmap(vjp)(cot)  # each [A, P, N]
            return (acc[0] + wt * _channel_sum(gq, sq), acc[1] + wt * _channel_sum(gg, sg)), None
        _, vjp = jax.vjp(errors, base + t * dq, base + t * dg)
        gq, gg = _attribute_vjp(vjp, cot)  # each [A, P, h, w, C]
        return (acc[0] + wt * _full_channel_sum(gq, dq),
                acc[1] + wt * _full_channel_sum(gg, dg)), None

    zeros = jnp.zeros((fq.shape[0], w.shape[1], *fq.shape[1:3]), jnp.float32)
    (cq, cg), _ = jax.lax.scan(step, (zeros, zeros),
                               (jnp.asarray(nodes), jnp.asarray(node_weights)))
    diff = embedding(fq) - embedding(fg)
    return ContributionMaps(
        query=resize_maps(cq, *size), gallery=resize_maps(cg, *size),
        errors=jnp.matmul(jnp.square(diff), w, precision=_HIGHEST),
        distances=jnp.sum(jnp.square(diff), axis=-1))


def _cell_masks(shape: tuple[int, ...]) -> Array:
    """``[h w, 1, h, w, 1]`` one-hot masks of the cells of a ``[., h, w, .]`` map."""
    h, w = shape[1], shape[2]
    return jnp.eye(h * w, dtype=jnp.float32).reshape(h * w, 1, h, w, 1)


def _per_dimension_cells(linear, delta: Array) -> Array:
    """``[B, h, w, N]``: the change of each embedding dimension that each cell makes,
    ``linear(delta * cell mask)`` for every cell (one forward-mode pass per cell, batched
    :data:`ATTRIBUTE_BATCH` cells at a time); ``linear`` maps ``[B, h, w, C] -> [B, N]``."""
    masks = _cell_masks(delta.shape)
    out = jax.lax.map(lambda m: linear(delta * m), masks,
                      batch_size=min(ATTRIBUTE_BATCH, masks.shape[0]))  # [h w, B, N]
    b, h, w = delta.shape[:3]
    return jnp.moveaxis(out, 0, 1).reshape(b, h, w, -1)


@functools.partial(jax.jit, static_argnames=("graphdef", "complete", "size", "layer"))
def _deeplift_contributions(graphdef, state, fq_all, fg, query_index, weights, baseline, *,
                            complete, size, layer):
    model = _eval_model(graphdef, state)
    w = complete_weights(weights) if complete else weights
    base = _deeplift_start(model, fq_all, baseline, layer)  # the same F0 for both images
    dg = fg - base
    embedding = _through(model, layer)
    fq = fq_all[query_index]
    diff = embedding(fq) - embedding(fg)  # both start at f(F0): e_a = sum_n w_na diff_n^2
    cot = _one_hot_cotangents(w.shape[1], fg.shape[0])

    def gallery_errors(xg):  # [P, A], linear in xg; diff^2 = diff * (its change)
        eg = deeplift.embedding_delta(model, layer, base, fg, xg).delta
        return jnp.matmul(-diff * eg, w, precision=_HIGHEST)

    _, vjp = jax.vjp(gallery_errors, dg)
    (gg,) = _attribute_vjp(vjp, cot)
    gallery = _full_channel_sum(gg, dg)
    num_cells = fq_all.shape[1] * fq_all.shape[2]
    if fq_all.shape[0] * num_cells < fg.shape[0] * w.shape[1]:
        # Fewer cells of the queries than (pair, attribute) cotangents (a query with its top
        # k): one forward-mode pass per query cell gives every pair's and attribute's map.
        dq_all = fq_all - base
        _, linear = jax.linearize(
            lambda d: deeplift.embedding_delta(model, layer, base, fq_all, d).delta, dq_all)
        per_dim = _per_dimension_cells(linear, dq_all)[query_index]  # [P, h, w, N]
        query = jnp.einsum("phwn,pn,na->pahw", per_dim, diff, w, precision=_HIGHEST)
    else:
        dq = fq - base

        def query_errors(xq):
            eq = deeplift.embedding_delta(model, layer, base, fq, xq).delta
            return jnp.matmul(diff * eq, w, precision=_HIGHEST)

        _, vjp = jax.vjp(query_errors, dq)
        (gq,) = _attribute_vjp(vjp, cot)
        query = _full_channel_sum(gq, dq)
    return ContributionMaps(
        query=resize_maps(query, *size), gallery=resize_maps(gallery, *size),
        errors=jnp.matmul(jnp.square(diff), w, precision=_HIGHEST),
        distances=jnp.sum(jnp.square(diff), axis=-1))


def contribution_maps(model: AGW, weights: Array, query_images: Array, gallery_images: Array,
                      *, query_index=None, complete: bool = False,
                      steps: int = DEFAULT_STEPS, layer: int = DEFAULT_LAYER,
                      baseline: Array | None = None,
                      method: str = DEFAULT_METHOD) -> ContributionMaps:
    """Where each image of a pair makes up the pair's attribute errors ``e_a`` (eq. 3.2).

    Args:
      model: the re-id model (used in eval mode; not changed).
      weights: ``[N, A]`` attribute-head weights ``W``.
      query_images: ``[Q, H, W, 3]`` model-input query images; each runs forward once.
      gallery_images: ``[P, H, W, 3]``: pair ``p`` is (query ``query_index[p]``, gallery ``p``).
      query_index: int ``[P]``; default: query 0 for every pair when ``Q == 1`` (the top ranks
        of one query), else pair ``p`` uses query ``p`` (``Q == P``).
      complete: use the complete weights ``|w_na| / sum_a |w_na|`` (``e_a >= 0``, summing to the
        squared distance) instead of the paper's ``w_na``.
      steps: quadrature nodes of integrated gradients.
      layer, baseline, method: as :func:`evidence_maps` (both images start from the same
        baseline).

    Returns:
      :class:`ContributionMaps`: ``query``, ``gallery`` ``[P, A, H, W]``, whose sums over both
      maps are ``errors [P, A]``; ``distances [P]``.
    """
    q, hq, wq = _check_images("query_images", query_images)
    p, hg, wg = _check_images("gallery_images", gallery_images)
    if (hq, wq) != (hg, wg):
        raise ValueError(f"query_images and gallery_images must have the same size, got "
                         f"{tuple(jnp.shape(query_images))} and "
                         f"{tuple(jnp.shape(gallery_images))}")
    _check_weights(model, weights)
    index = pair_index("query_index", query_index, q, p)
    steps = _check_steps(steps)
    layer = check_layer(layer)
    method = check_method(method)
    parts = _eval_parts(model)
    # Each image runs forward once, however many pairs it is in; queries and gallery images in
    # one batch (a query with its top k: the batch of its evidence maps, compiled once).
    features = _features(parts, jnp.concatenate([jnp.asarray(query_images, jnp.float32),
                                                 jnp.asarray(gallery_images, jnp.float32)]),
                         layer)
    fq, fg = features[:q], features[q:]
    _check_baseline(baseline, fq.shape)
    if method == "deeplift":
        return _deeplift_contributions(
            parts.graphdef, parts.state, fq, fg, jnp.asarray(index),
            jnp.asarray(weights, jnp.float32),
            None if baseline is None else jnp.asarray(baseline, jnp.float32),
            complete=bool(complete), size=(hg, wg), layer=layer)
    return _contributions(parts.graphdef, parts.state, fq, fg, jnp.asarray(index),
                          jnp.asarray(weights, jnp.float32),
                          None if baseline is None else jnp.asarray(baseline, jnp.float32),
                          steps=steps, complete=bool(complete), size=(hg, wg), layer=layer)


def reference_baseline(model: AGW, images: Array, *, layer: int = DEFAULT_LAYER,
                       batch_size: int = 32) -> Array:
    """float32 ``[h, w, C]``: the mean feature map at ``layer`` of reference images
    ``[B, H, W, 3]`` (model inputs; e.g. a sample of the gallery) — the 'average person' the
    maps' paths start from (docs/attribute_maps.md, 'Baseline')."""
    n, _, _ = _check_images("images", images)
    layer = check_layer(layer)
    parts = _eval_parts(model)
    total = None
    for lo in range(0, n, batch_size):
        part = jnp.sum(_features(parts, jnp.asarray(images[lo:lo + batch_size]), layer), axis=0)
        total = part if total is None else total + part
    return total / n


# The modes whose errors the contribution maps decompose (eq. 3.2 with either weight set).
MAP_MODES = ("paper", "complete")


def pair_contribution_maps(model: AGW, weights: Array, *, steps: int = DEFAULT_STEPS,
                           layer: int = DEFAULT_LAYER, baseline: Array | None = None,
                           method: str = DEFAULT_METHOD):
    """A function ``(query [H, W, 3], gallery [H, W, 3], mode) -> (query maps [A, H, W],
    gallery maps [A, H, W])`` of one pair of model-input images: the contribution maps of
    :func:`contribution_maps` in ``mode`` (one of :data:`MAP_MODES`), as numpy float32, at
    ``layer`` from ``baseline`` by ``method``.

    It is the explorer's map provider (``reid_jax.explorer.Explorer(pair_maps=...)``); modes
    without a map (``projection``, ``disagreement``) raise ``ValueError`` naming the mode.
    """
    _check_weights(model, weights)
    steps = _check_steps(steps)
    layer = check_layer(layer)
    method = check_method(method)
    w = jnp.asarray(weights, jnp.float32)

    def pair_maps(query_input, gallery_input, mode: str):
        if mode not in MAP_MODES:
            raise ValueError(f"mode={mode!r} has no attribute maps: maps decompose the errors "
                             f"of the modes {', '.join(MAP_MODES)}")
        out = contribution_maps(model, w, jnp.asarray(query_input)[None],
                                jnp.asarray(gallery_input)[None],
                                complete=mode == "complete", steps=steps, layer=layer,
                                baseline=baseline, method=method)
        return np.asarray(out.query[0], np.float32), np.asarray(out.gallery[0], np.float32)

    return pair_maps


@functools.partial(jax.jit, static_argnames=("graphdef", "size"))
def _gradcam(graphdef, state, fmap, partner_map, partner_index, *, size):
    model = _eval_model(graphdef, state)
    partner = jax.lax.stop_gradient(_embedding_of_map(model, partner_map)[partner_index])

    def total_distance(m):  # images are independent in eval mode: one gradient for all
        return jnp.sum(jnp.square(_embedding_of_map(model, m) - partner))

    grads = jax.grad(total_distance)(fmap)
    alpha = jnp.mean(grads, axis=(1, 2))  # [B, C]
    cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", fmap, alpha, precision=_HIGHEST))
    return resize_maps(cam, *size)


def distance_gradcam(model: AGW, images: Array, partner_images: Array, *,
                     partner_index=None) -> Array:
    """Grad-CAM of the total distance: ``relu(sum_c alpha_c F[h, w, c])`` with
    ``alpha_c = mean_hw d|f - f^partner|^2 / dF[h, w, c]``, ``F`` the last feature map.

    The attribute-agnostic baseline of the map measurements (docs/attribute_maps.md,
    'Baselines').

    Args:
      model: the re-id model (eval mode; not changed).
      images: ``[B, H, W, 3]`` the images mapped.
      partner_images: ``[Q, H, W, 3]`` the images they are compared with.
      partner_index: int ``[B]``; default as ``query_index`` of :func:`contribution_maps`.

    Returns:
      float32 ``[B, H, W]``, non-negative.
    """
    q, hq, wq = _check_images("partner_images", partner_images)
    b, h, w = _check_images("images", images)
    if (hq, wq) != (h, w):
        raise ValueError(f"images and partner_images must have the same size, got "
                         f"{tuple(jnp.shape(images))} and {tuple(jnp.shape(partner_images))}")
    index = pair_index("partner_index", partner_index, q, b)
    parts = _eval_parts(model)
    return _gradcam(parts.graphdef, parts.state, _feature_map(parts, images),
                    _feature_map(parts, partner_images), jnp.asarray(index), size=(h, w))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, state, fmap):
    return _embedding_of_map(_eval_model(graphdef, state), fmap)


def embed(model: AGW, images: Array) -> Array:
    """float32 ``[B, N]`` eval-mode retrieval embeddings of model-input images ``[B, H, W, 3]``
    (``model.retrieval_embedding``; what the maps decompose)."""
    _check_images("images", images)
    parts = _eval_parts(model)
    return _embed(parts.graphdef, parts.state, _feature_map(parts, images))


__all__ = [
    "ATTRIBUTE_BATCH",
    "DEFAULT_LAYER",
    "DEFAULT_METHOD",
    "DEFAULT_STEPS",
    "MAP_LAYERS",
    "MAP_METHODS",
    "MAP_MODES",
    "ContributionMaps",
    "EvidenceMaps",
    "contribution_maps",
    "distance_gradcam",
    "embed",
    "evidence_maps",
    "pair_contribution_maps",
    "check_layer",
    "check_method",
    "pair_index",
    "quadrature",
    "reference_baseline",
    "resize_maps",
    "spread_matrix",
]
