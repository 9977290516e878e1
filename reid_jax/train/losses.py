"""Training losses: AGW's identity/metric losses and the attribute head's weighted BCE.

Pure ``jax.numpy`` functions of arrays, usable under ``jit``, ``grad`` and ``vmap``. They follow
the reference AGW code (ReID-Survey, Ye et al., ``modeling/layer/triplet_loss.py`` and the
``CenterLoss`` it trains with) term by term, so numbers are comparable; DESIGN.md §3 lists the
recipe. Inputs of a lower precision (bfloat16) are computed in float32; float64 stays float64.

* :func:`cross_entropy_label_smooth` -- identity loss on the BNNeck classifier logits.
* :func:`weighted_regularized_triplet` -- AGW's triplet on the pre-BN feature (soft margin,
  softmax-weighted positive/negative distances, weights not detached).
* :func:`center_loss` -- on the pre-BN feature, weight :data:`CENTER_LOSS_WEIGHT`; the centers are
  trained by their own optimizer, see :func:`update_centers` for the exact semantics.
* :func:`weighted_bce` -- the attribute head's loss for imbalanced binary attributes.

Errors: wrong ranks, shapes or dtypes raise ``ValueError`` at trace time. Label values can only
be checked when they are concrete (eager calls): then an out-of-range label raises
``ValueError``; under ``jit``/``vmap`` the loss becomes NaN instead, so a training loop that stops
on a non-finite loss stops there rather than training on a silently wrong target.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

# Reference recipe values (DESIGN.md §3).
LABEL_SMOOTH_EPSILON = 0.1
CENTER_LOSS_WEIGHT = 5e-4
CENTER_LEARNING_RATE = 0.5

# Reference clamp constants.
DISTANCE_CLAMP_MIN = 1e-12  # euclidean_dist: squared distances clamped below before the sqrt.
SOFTMAX_WEIGHTS_EPS = 1e-6  # softmax_weights: added to the normaliser.
CENTER_CLAMP = (1e-12, 1e12)  # CenterLoss: squared distances clamped to this range.
NORMALIZE_EPS = 1e-12  # normalize: added to the L2 norm.


# ----------------------------------------------------------------------------- helpers


def _is_concrete(x: ArrayLike) -> bool:
    """Whether ``x`` holds values now (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def _as_float(x: ArrayLike, fn: str, name: str) -> Array:
    """``x`` as a floating array of at least float32 precision."""
    x = jnp.asarray(x)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
            or x.dtype == jnp.bool_):
        raise ValueError(f"{fn}: {name} must be a real array, got dtype {x.dtype}")
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _as_int_labels(labels: ArrayLike, batch: int, fn: str) -> Array:
    """Integer ``labels`` of shape ``[batch]``, checked at trace time."""
    labels = jnp.asarray(labels)
    if labels.shape != (batch,):
        raise ValueError(f"{fn}: labels must have shape [B] = ({batch},) to match the batch, "
                         f"got shape {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{fn}: labels must be an integer array, got dtype {labels.dtype}")
    return labels


def _check_label_range(labels: ArrayLike, num_classes: int, fn: str, what: str) -> None:
    """Raise if concrete ``labels`` fall outside ``[0, num_classes)``; no-op on tracers."""
    if not _is_concrete(labels):
        return
    values = np.asarray(labels)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise ValueError(f"{fn}: labels must lie in [0, {num_classes}) ({what}); got "
                         f"{bad.size} out of range, e.g. {np.unique(bad)[:5].tolist()}")


def _nan_unless(condition: Array, loss: Array) -> Array:
    """``loss`` where ``condition`` holds, NaN otherwise (the traced-value error channel)."""
    return jnp.where(condition, loss, jnp.nan)


def _labels_in_range(labels: Array, num_classes: int) -> Array:
    return jnp.all((labels >= 0) & (labels < num_classes))


# ----------------------------------------------------------------------------- identity loss


def cross_entropy_label_smooth(logits: ArrayLike, labels: ArrayLike,
                               epsilon: float = LABEL_SMOOTH_EPSILON) -> Array:
    """Cross entropy with label smoothing (Szegedy et al. 2016), as ``CrossEntropyLabelSmooth``.

    Targets ``t = (1 - eps) * onehot(y) + eps / C``;
    ``loss = mean_b sum_c -t_bc * log_softmax(logits)_bc``.

    Args:
      logits: [B, C] identity classifier logits.
      labels: int[B], class indices in ``[0, C)``.
      epsilon: smoothing in ``[0, 1]``; 0 gives plain cross entropy.

    Returns:
      Scalar loss (NaN under jit if a label is out of range; ValueError when eager).
    """
    fn = "cross_entropy_label_smooth"
    logits = _as_float(logits, fn, "logits")
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"{fn}: logits must be [B, C] with B, C > 0, got shape {logits.shape}")
    batch, num_classes = logits.shape
    labels = _as_int_labels(labels, batch, fn)
    if _is_concrete(epsilon) and not 0.0 <= float(epsilon) <= 1.0:
        raise ValueError(f"{fn}: epsilon must lie in [0, 1], got {epsilon}")
    _check_label_range(labels, num_classes, fn, "class indices")

    log_probs = jax.nn.log_softmax(logits, axis=-1)
    safe = jnp.clip(labels, 0, num_classes - 1)
    nll = -jnp.take_along_axis(log_probs, safe[:, None], axis=1)[:, 0]
    # sum_c (eps / C) * -log p_c = eps * mean_c -log p_c.
    smooth = -jnp.mean(log_probs, axis=-1)
    loss = jnp.mean((1.0 - epsilon) * nll + epsilon * smooth)
    return _nan_unless(_labels_in_range(labels, num_classes), loss)


# ----------------------------------------------------------------------------- triplet


def l2_normalize(features: ArrayLike) -> Array:
    """The reference ``normalize``: ``x / (||x||_2 + 1e-12)`` per row, zero-safe gradient.

    Args:
      features: [..., D].

    Returns:
      [..., D]; a zero row stays zero with a finite (zero-norm-term) gradient, as in torch.
    """
    x = _as_float(features, "l2_normalize", "features")
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return x / (norm + NORMALIZE_EPS)


def pairwise_euclidean_distance(features: ArrayLike) -> Array:
    """Euclidean distance matrix as the reference ``euclidean_dist(x, x)``.

    ``d_ij = sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 1e-12))``: the GEMM form, computed at full
    float32 precision (no TF32/bf16 matmul passes: the form cancels). The clamp makes the
    diagonal (and identical rows) ``1e-6`` instead of 0 and keeps the gradient finite there:
    below the clamp the gradient is zero, above it at most ``0.5 / 1e-6`` times the (then tiny)
    gradient of the squared distance.

    Args:
      features: [B, D].

    Returns:
      [B, B] distances, ``>= 1e-6``.
    """
    x = _as_float(features, "pairwise_euclidean_distance", "features")
    if x.ndim != 2:
        raise ValueError(f"pairwise_euclidean_distance: features must be [B, D], "
                         f"got shape {x.shape}")
    sq = jnp.sum(x * x, axis=1)
    gram = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
    d2 = sq[:, None] + sq[None, :] - 2.0 * gram
    return jnp.sqrt(jnp.maximum(d2, DISTANCE_CLAMP_MIN))


def softmax_weights(dist: ArrayLike, mask: ArrayLike) -> Array:
    """The reference ``softmax_weights``: a softmax over the masked entries of each row.

    ``m_i = max_j dist_ij * mask_ij``; ``W_ij = exp(dist_ij - m_i) mask_ij /
    (sum_j exp(dist_ij - m_i) mask_ij + 1e-6)``. Rows whose mask is all zero get all-zero
    weights. ``m_i`` is not detached (it only enters through the ``1e-6``).

    Args:
      dist: [B, B]; the reference passes ``dist * mask`` (so masked entries are 0).
      mask: [B, B] in {0, 1}.

    Returns:
      [B, B] weights, each row summing to ~1 over its mask (0 for an empty mask).
    """
    dist = jnp.asarray(dist)
    mask = jnp.asarray(mask, dist.dtype)
    max_v = jnp.max(dist * mask, axis=1, keepdims=True)
    diff = dist - max_v
    z = jnp.sum(jnp.exp(diff) * mask, axis=1, keepdims=True) + SOFTMAX_WEIGHTS_EPS
    return jnp.exp(diff) * mask / z


def weighted_regularized_triplet_with_aux(
    features: ArrayLike, labels: ArrayLike, normalize: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """AGW's weighted regularised triplet loss (ReID-Survey ``WeightedRegularizedTriplet``).

    With ``d`` the Euclidean distance matrix (:func:`pairwise_euclidean_distance`), ``P_ij = [y_i
    == y_j]`` (the diagonal included, as in the reference) and ``N_ij = [y_i != y_j]``:

      ``d_ap = d * P``, ``d_an = d * N``,
      ``w_ap = softmax_weights(d_ap, P)``, ``w_an = softmax_weights(-d_an, N)`` (not detached),
      ``fp_i = sum_j d_ap_ij w_ap_ij`` (soft furthest positive),
      ``cn_i = sum_j d_an_ij w_an_ij`` (soft closest negative),
      ``loss = mean_i log(1 + exp(-(cn_i - fp_i)))`` (torch ``SoftMarginLoss`` with y = 1).

    An anchor with no other sample of its id has ``fp = 1e-6`` (its clamped self-distance); an
    anchor with no negative has ``cn = 0``.

    Args:
      features: [B, D], the pre-BN feature in AGW.
      labels: int[B] identity labels (any integer values).
      normalize: L2-normalise the rows first (the reference's ``normalize_feature``).

    Returns:
      ``(loss, aux)``: scalar loss; aux holds ``furthest_positive`` [B], ``closest_negative``
      [B] and ``ordering_accuracy`` (scalar, fraction of anchors with ``cn > fp``), for logging.
    """
    fn = "weighted_regularized_triplet"
    x = _as_float(features, fn, "features")
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{fn}: features must be [B, D] with B > 0, got shape {x.shape}")
    labels = _as_int_labels(labels, x.shape[0], fn)
    if normalize:
        x = l2_normalize(x)
    dist = pairwise_euclidean_distance(x)
    same = labels[:, None] == labels[None, :]
    is_pos = same.astype(dist.dtype)
    is_neg = (~same).astype(dist.dtype)
    dist_ap = dist * is_pos
    dist_an = dist * is_neg
    weights_ap = softmax_weights(dist_ap, is_pos)
    weights_an = softmax_weights(-dist_an, is_neg)
    furthest_positive = jnp.sum(dist_ap * weights_ap, axis=1)
    closest_negative = jnp.sum(dist_an * weights_an, axis=1)
    loss = jnp.mean(jax.nn.softplus(-(closest_negative - furthest_positive)))
    aux = {
        "furthest_positive": furthest_positive,
        "closest_negative": closest_negative,
        "ordering_accuracy": jnp.mean((closest_negative > furthest_positive).astype(dist.dtype)),
    }
    return loss, aux


def weighted_regularized_triplet(features: ArrayLike, labels: ArrayLike,
                                 normalize: bool = False) -> Array:
    """Scalar loss of :func:`weighted_regularized_triplet_with_aux` (see there).

    Args:
      features: [B, D].
      labels: int[B].
      normalize: L2-normalise the rows first.

    Returns:
      Scalar loss.
    """
    return weighted_regularized_triplet_with_aux(features, labels, normalize)[0]


# ----------------------------------------------------------------------------- center loss


def init_centers(rng: Array, num_classes: int, feature_dim: int,
                 dtype: jnp.dtype = jnp.float32) -> Array:
    """Class centers initialised as the reference (``torch.randn``): standard normal [C, D]."""
    if num_classes <= 0 or feature_dim <= 0:
        raise ValueError(f"init_centers: num_classes and feature_dim must be > 0, got "
                         f"{num_classes}, {feature_dim}")
    return jax.random.normal(rng, (num_classes, feature_dim), dtype)


def center_loss(features: ArrayLike, labels: ArrayLike, centers: ArrayLike) -> Array:
    """Center loss (Wen et al. 2016) as the reference ``CenterLoss``.

    ``loss = (1 / B) sum_i clip(||x_i - c_{y_i}||^2, 1e-12, 1e12)``.

    The reference builds the full [B, C] squared-distance matrix in GEMM form, masks it to the
    own class and clamps the *masked* matrix, so each of the ``B (C - 1)`` masked zeros adds
    ``1e-12``: its value is ours plus the constant ``(C - 1) 1e-12`` (no gradient). We gather the
    own center and use the direct difference (exact for features near their center), without
    that constant. Gradients are identical.

    Args:
      features: [B, D], the pre-BN feature in AGW.
      labels: int[B] in ``[0, C)``.
      centers: [C, D] class centers.

    Returns:
      Scalar loss (NaN under jit if a label is out of range; ValueError when eager).
    """
    fn = "center_loss"
    x = _as_float(features, fn, "features")
    c = _as_float(centers, fn, "centers")
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{fn}: features must be [B, D] with B > 0, got shape {x.shape}")
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] != x.shape[1]:
        raise ValueError(f"{fn}: centers must be [C, D] with C > 0 and D = {x.shape[1]} "
                         f"(features {x.shape}), got shape {c.shape}")
    labels = _as_int_labels(labels, x.shape[0], fn)
    num_classes = c.shape[0]
    _check_label_range(labels, num_classes, fn, "rows of centers")
    own = c[jnp.clip(labels, 0, num_classes - 1)]
    d2 = jnp.sum(jnp.square(x - own), axis=1)
    loss = jnp.sum(jnp.clip(d2, *CENTER_CLAMP)) / x.shape[0]
    return _nan_unless(_labels_in_range(labels, num_classes), loss)


def center_gradients(features: ArrayLike, labels: ArrayLike, centers: ArrayLike) -> Array:
    """Gradient of :func:`center_loss` w.r.t. the centers, the features held constant.

    Unclamped, ``dL/dc_k = (2 / B) sum_{i: y_i = k} (c_k - x_i)``; classes absent from the batch
    get zero.

    Args:
      features: [B, D].
      labels: int[B] in ``[0, C)``.
      centers: [C, D].

    Returns:
      [C, D], same dtype as the float-promoted centers.
    """
    features = jax.lax.stop_gradient(jnp.asarray(features))
    return jax.grad(lambda c: center_loss(features, labels, c))(
        _as_float(centers, "center_gradients", "centers"))


def center_optimizer(learning_rate: float = CENTER_LEARNING_RATE) -> optax.GradientTransformation:
    """The reference's center optimizer: plain SGD (no momentum, no weight decay), lr 0.5."""
    return optax.sgd(learning_rate)


def update_centers(centers: Array, opt_state: optax.OptState, features: ArrayLike,
                   labels: ArrayLike, *, optimizer: optax.GradientTransformation,
                   ) -> tuple[Array, optax.OptState]:
    """One center step, with the reference's semantics.

    docs/training.md, "Center loss: its own SGD".

    How the reference trains centers: the model loss is ``CE + triplet + 5e-4 * center_loss``
    and one ``backward`` fills the gradients of both the model and the centers; the model takes
    its Adam step; the center gradients (``5e-4 * dL_center/dc``) are multiplied by ``1 / 5e-4``
    and a separate ``SGD(lr=0.5)`` steps the centers. So:

    * the model sees ``CENTER_LOSS_WEIGHT * dL_center/dx`` through the features;
    * the centers move by ``-0.5 * dL_center/dc`` -- the center loss alone, unweighted, not in
      the model's optimizer (no Adam, no L2, no LR schedule);
    * both gradients come from the same forward pass (centers before their update).

    In a jitted train step::

        def loss_fn(params):
            out = model(params, images)                  # centers are NOT in params
            loss = (ce + tri + CENTER_LOSS_WEIGHT
                    * center_loss(out["pre_bn"], labels, state.centers))
            return loss, out["pre_bn"]
        (loss, feats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        centers, center_opt_state = update_centers(
            state.centers, state.center_opt_state, feats, labels, optimizer=center_optimizer())

    with ``center_opt_state = center_optimizer().init(centers)`` and the centers (and that
    state) checkpointed with the rest of the train state.

    Args:
      centers: [C, D].
      opt_state: the state of ``optimizer`` for ``centers``.
      features: [B, D], the features of this step's forward pass (treated as constants).
      labels: int[B] in ``[0, C)``.
      optimizer: normally :func:`center_optimizer`.

    Returns:
      ``(new_centers [C, D], new_opt_state)``.
    """
    grads = center_gradients(features, labels, centers)
    updates, opt_state = optimizer.update(grads, opt_state, centers)
    return optax.apply_updates(centers, updates), opt_state


# ----------------------------------------------------------------------------- attributes


def attribute_weights(labels: ArrayLike, positive_ratios: ArrayLike) -> Array:
    """Per-entry weights of :func:`weighted_bce` for imbalanced attributes.

    ``w = exp(1 - r_a)`` where the label is positive (``> 0.5``) and ``exp(r_a)`` where it is
    negative, with ``r_a`` the positive ratio of attribute ``a`` in the training set: DeepMAR
    (Li et al., ACPR 2015, sigma = 1) and the weighted sigmoid cross entropy of the pedestrian
    attribute "strong baseline" (Jia et al. 2020, ``ratio2weight``). A rare attribute's
    positives weigh up to ``e`` and its negatives about 1.

    Args:
      labels: [B, A] in [0, 1].
      positive_ratios: [A] fractions in [0, 1] (not percentages).

    Returns:
      [B, A] weights in ``[1, e]``.
    """
    labels = jnp.asarray(labels)
    r = _as_float(positive_ratios, "attribute_weights", "positive_ratios")
    if labels.ndim != 2 or r.shape != (labels.shape[1],):
        raise ValueError(f"attribute_weights: expected labels [B, A] and positive_ratios [A], "
                         f"got shapes {labels.shape} and {r.shape}")
    return jnp.where(labels > 0.5, jnp.exp(1.0 - r), jnp.exp(r))


def weighted_bce(logits: ArrayLike, labels: ArrayLike, positive_ratios: ArrayLike,
                 mask: ArrayLike | None = None) -> Array:
    """Weighted binary cross entropy for imbalanced attributes, from logits.

    ``l_ba = -w_ba [y_ba log sigmoid(z_ba) + (1 - y_ba) log sigmoid(-z_ba)]`` (via
    ``log_sigmoid``, stable for any logit), ``w`` from :func:`attribute_weights`
    (``exp(1 - r_a)`` on positives, ``exp(r_a)`` on negatives), and
    ``loss = sum_ba m_ba l_ba / sum_ba m_ba``: the mean over the batch and the attributes of the
    labelled entries (the strong baseline sums over attributes instead, i.e. ``A`` times this).
    A batch with no labelled entry gives 0 (and zero gradients).

    Args:
      logits: [B, A] attribute logits (``f @ W``; probabilities are ``sigmoid``).
      labels: [B, A] in [0, 1] (binary; soft values enter the BCE, the weight uses ``> 0.5``).
      positive_ratios: [A] positive ratios of the training split as fractions in [0, 1].
        ``reid_jax.data.attributes.positive_ratios`` returns percent: divide by 100.
      mask: optional [B] (per sample) or [B, A] (per entry), 1/True = labelled; samples
        without attribute labels get 0. Default: all labelled.

    Returns:
      Scalar loss (NaN under jit if a ratio is outside [0, 1]; ValueError when eager).
    """
    fn = "weighted_bce"
    z = _as_float(logits, fn, "logits")
    if z.ndim != 2:
        raise ValueError(f"{fn}: logits must be [B, A], got shape {z.shape}")
    y = _as_float(labels, fn, "labels")
    if y.shape != z.shape:
        raise ValueError(f"{fn}: labels must have the logits' shape [B, A] = {z.shape}, "
                         f"got shape {y.shape}")
    r = _as_float(positive_ratios, fn, "positive_ratios")
    if r.shape != (z.shape[1],):
        raise ValueError(f"{fn}: positive_ratios must be [A] = ({z.shape[1]},) to match logits "
                         f"{z.shape}, got shape {r.shape}")
    if mask is None:
        m = jnp.ones_like(z)
    else:
        m = _as_float(mask, fn, "mask")
        if m.shape == (z.shape[0],):
            m = jnp.broadcast_to(m[:, None], z.shape)
        elif m.shape != z.shape:
            raise ValueError(f"{fn}: mask must be [B] = ({z.shape[0]},) or [B, A] = {z.shape}, "
                             f"got shape {m.shape}")
    if _is_concrete(positive_ratios):
        values = np.asarray(positive_ratios, np.float64)
        if not np.all((values >= 0) & (values <= 1)):
            raise ValueError(f"{fn}: positive_ratios must be fractions in [0, 1], got range "
                             f"[{values.min():g}, {values.max():g}] (percentages? divide by 100)")
    if _is_concrete(labels) and _is_concrete(m):
        values = np.asarray(labels, np.float64)[np.asarray(m) != 0]
        if values.size and not np.all((values >= 0) & (values <= 1)):
            raise ValueError(f"{fn}: labels of labelled entries must lie in [0, 1], got range "
                             f"[{values.min():g}, {values.max():g}]")

    # Unlabelled entries may hold anything (even NaN): zero them before they can poison the sum.
    labelled = m != 0
    y = jnp.where(labelled, y, 0.0)
    w = attribute_weights(y, r).astype(z.dtype)
    per_entry = -w * (y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z))
    count = jnp.sum(m)
    total = jnp.sum(jnp.where(labelled, m * per_entry, 0.0))
    loss = jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)
    return _nan_unless(jnp.all((r >= 0) & (r <= 1)), loss)
