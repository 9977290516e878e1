"""Attribute explanations of re-id rankings (Specker, "A Step Towards Explainable Person
Re-identification Rankings", section 3), as jitted kernels over whole galleries.

Notation (``docs/design.md``): ``f`` is the retrieval embedding ``[N]`` that is ranked, ``W`` the
``[N, A]`` weights of the bias-free attribute layer, ``x = sigmoid(f @ W)`` the attribute
probabilities ``[A]``; ``q`` a query and ``g`` a gallery image.

* :func:`confident_attributes` — ``|x_a^q - 0.5| > t_a`` (section 3.1).
* :func:`matching_scores` — eq. 3.1, ``s_a = (1 - |x_a^q - x_a^g|) / (0.5 + |x_a^q - 0.5|)``.
* :func:`attribute_errors` — eq. 3.2, ``e_a = sum_n (f_n^q - f_n^g)^2 w_na``; with
  ``complete=True`` the weights are replaced by ``|w_na| / sum_a |w_na|`` so that the
  contributions sum exactly to the squared distance (beyond the paper; ``docs/design.md``,
  "Two error compositions").
* :func:`projection_contributions` — beyond the paper: ``f^q - f^g`` projected onto the span
  of ``W`` by least squares, ``f^q - f^g = W c + r``; attribute ``a`` contributes
  ``c_a (W^T (f^q - f^g))_a`` and the remainder ``|r|^2`` is its own part, so contributions plus
  remainder sum to the squared distance (``docs/design.md``, "The attribute projection").
* :func:`disagreement_probabilities` — beyond the paper: the probability that the two persons'
  labels of attribute ``a`` differ, ``x_a^q (1 - x_a^g) + x_a^g (1 - x_a^q)`` (``docs/design.md``,
  "Explanations that beat the prior").
* :func:`explain_rankings` — ranks the gallery by squared Euclidean distance and explains the
  top ``k`` of every query: matching scores and one of the :data:`MODES`.

All are compiled with ``jax.jit``, work under ``jax.vmap``, reject bad shapes at trace time and
stream the gallery in chunks, so memory stays bounded (a ``Q x G x N`` tensor is never formed).

Accuracy of eq. 3.2 for all pairs.  Expanding the square turns eq. 3.2 into one GEMM,
``e = (fq^2) @ W + (fg^2) @ W - 2 (fq * W_a) @ fg^T``, but for near-duplicate pairs the three
terms are large and cancel: the float32 rounding error is up to ``2 N u T_a`` with
``T_a = sum_n (f_n^q{}^2 + f_n^g{}^2) |w_na|`` (u = 2^-24), while the result's own scale is
``S_a = sum_n (f_n^q - f_n^g)^2 |w_na|``; identical pairs give noise instead of 0.  The direct
form (difference first) has error ``<= N u S_a`` but runs at a fraction of the GEMM rate.
``method="auto"`` (the default) computes the GEMM form for a gallery chunk and recomputes
directly every pair whose squared distance is below ``rho * (|fq|^2 + |fg|^2)``, with ``rho``
chosen from that bound so that the result stays within ``rtol`` (1e-3) of ``S_a``.  Ranking and
top-k explanations always use the direct form for the returned pairs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from reid_jax import retrieval
from reid_jax.models.attribute_head import Calibration, check_calibration, head_probabilities

Array = jax.Array

DEFAULT_THRESHOLD = 0.4
# Float32 unit roundoff.
_UNIT_ROUNDOFF = 2.0**-24
# Extra candidates per query kept by the GEMM ranking pass and re-ranked with exact distances.
_RERANK_MARGIN = 8
METHODS = ("auto", "direct", "gemm")
# What ``explain_rankings`` puts into ``errors``: eq. 3.2, its complete decomposition, the
# projection onto the attribute directions (with a remainder), or the probability that the
# labels differ (docs/design.md, "Two error compositions" and the sections after it).
MODES = ("paper", "complete", "projection", "disagreement")
# The modes that decompose the squared distance (``attribute_errors`` computes them all-pairs).
ERROR_MODES = ("paper", "complete", "projection")
# Every product runs in full float32: the accuracy bound of ``recompute_ratio`` assumes it, and
# accelerators would otherwise default to TF32 / bfloat16 passes (no cost on CPUs).
_PRECISION = retrieval.PRECISION


def _dot(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, precision=_PRECISION)


class RankingExplanation(NamedTuple):
    """The top-``k`` ranking of every query with its explanations.

    Attributes:
      indices: int32 ``[Q, k]`` gallery indices, nearest first.
      distances: ``[Q, k]`` squared Euclidean distances (computed directly, exact to rounding).
      attributes_query: ``[Q, A]`` query attribute probabilities ``sigmoid(f_q @ W)``.
      attributes_gallery: ``[Q, k, A]`` probabilities of the ranked gallery images.
      selected: bool ``[Q, A]`` confidently recognised query attributes (section 3.1).
      scores: ``[Q, k, A]`` matching scores, eq. 3.1 (raw; may exceed 1).
      errors: ``[Q, k, A]`` the explanation of the mode: eq. 3.2 (``paper``), its complete
        decomposition (``complete``), the projection contributions ``c_a (W^T d)_a``
        (``projection``) or the probability that the labels differ (``disagreement``).
      remainder: ``[Q, k]`` the part of the squared distance the ``errors`` leave out,
        ``distance - sum_a e_a``: ``|r|^2 >= 0`` (outside the span of ``W``) for
        ``projection``, 0 up to rounding for ``complete``, either sign for ``paper``; NaN for
        ``disagreement``, which is not a decomposition of the distance.
    """

    indices: Array
    distances: Array
    attributes_query: Array
    attributes_gallery: Array
    selected: Array
    scores: Array
    errors: Array
    remainder: Array | None = None


# --------------------------------------------------------------------------------------------
# Input checks (trace time: shapes; concrete inputs: values).


def _shape(x) -> tuple[int, ...]:
    return tuple(jnp.shape(x))


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_ndim(name: str, x, ndims: tuple[int, ...], what: str) -> None:
    if jnp.ndim(x) not in ndims:
        raise ValueError(f"{name} must be {what}, got shape {_shape(x)}")


def _shown(values) -> str:
    """Numbers as a person wrote them: float32 ``-0.1`` is shown as ``-0.1``, not
    ``-0.10000000149011612`` (the shortest float32 repr)."""
    a = np.asarray(values)
    texts = [str(np.float32(v)) for v in np.atleast_1d(a).astype(np.float32)]
    return texts[0] if a.ndim == 0 else "[" + ", ".join(texts) + "]"


def check_threshold(threshold, num_attributes: int) -> None:
    """Rejects a threshold that is not a scalar or ``[A]``, or (when concrete) not in ``[0, 0.5)``.

    The one range check of thresholds: ``reid_jax.explain.settings.parse_threshold`` calls it.
    """
    shape = _shape(threshold)
    if shape not in ((), (num_attributes,)):
        raise ValueError(
            f"threshold must be a scalar or have shape ({num_attributes},) (one per attribute), "
            f"got shape {shape}"
        )
    if _is_concrete(threshold):
        t = np.asarray(threshold, dtype=np.float64)
        bad = ~np.isfinite(t) | (t < 0.0) | (t >= 0.5)
        if np.any(bad):
            raise ValueError(
                f"threshold must lie in [0, 0.5) (|x - 0.5| > t selects an attribute), "
                f"got {_shown(t[bad].ravel()[:5]) if t.ndim else _shown(t)}"
            )


def check_finite(**arrays) -> None:
    """Raises ``ValueError`` naming every array that holds NaN or Inf (host-side check).

    :func:`attribute_errors` and :func:`explain_rankings` call it for you on concrete inputs
    (``validate=None``, the default; a cheap device reduction first, this only on failure);
    inside ``jit`` / ``vmap`` values cannot be looked at, so call it before, on the arrays you
    pass in. The compiled kernels themselves never look at values.

    Example: ``check_finite(f_query=fq, f_gallery=fg, weights=W)``.
    """
    problems = []
    for name, value in arrays.items():
        if not _is_concrete(value):
            continue
        a = np.asarray(value)
        if not np.issubdtype(a.dtype, np.floating):
            continue
        bad = ~np.isfinite(a)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            problems.append(
                f"{name} (shape {a.shape}) has {int(bad.sum())} non-finite values, first at "
                f"index {first}: {a[first]}"
            )
    if problems:
        raise ValueError("; ".join(problems))


def _check_embeddings(f_query, f_gallery, weights) -> tuple[int, int, int]:
    """Checks ranks and sizes of ``f_query [Q, N] or [N]``, ``f_gallery [G, N]``, ``W [N, A]``."""
    _check_ndim("f_query", f_query, (1, 2), "[N] or [Q, N]")
    _check_ndim("f_gallery", f_gallery, (2,), "[G, N]")
    _check_ndim("weights", weights, (2,), "[N, A]")
    n, g = _shape(f_query)[-1], _shape(f_gallery)[0]
    if _shape(f_gallery)[1] != n or _shape(weights)[0] != n:
        raise ValueError(
            "embedding sizes differ: f_query "
            f"{_shape(f_query)}, f_gallery {_shape(f_gallery)}, weights {_shape(weights)} "
            "(expected f_query [..., N], f_gallery [G, N], weights [N, A])"
        )
    if g == 0:
        raise ValueError(f"the gallery is empty: f_gallery has shape {_shape(f_gallery)}")
    if jnp.ndim(f_query) == 2 and _shape(f_query)[0] == 0:
        raise ValueError(f"no queries: f_query has shape {_shape(f_query)}")
    return n, g, _shape(weights)[1]


_low_precision_warned = False


def _float(x) -> Array:
    """``x`` as a float array of at least 32 bits: the kernels compute in float32 (float64 with
    ``jax_enable_x64``). bfloat16 / float16 inputs are widened (exactly) and a warning says once
    that their rounding can change rankings against float32 embeddings (``docs/design.md``,
    "Accuracy of all-pair errors")."""
    global _low_precision_warned
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(jnp.float32)
    if jnp.finfo(x.dtype).bits < 32:
        if not _low_precision_warned:
            _low_precision_warned = True
            logging.warning(
                "explain: %s inputs are computed in float32; their own rounding (about 3 "
                "significant digits for bfloat16) can reorder near neighbours compared with "
                "float32 embeddings: pass float32 embeddings for rankings that match", x.dtype)
        return x.astype(jnp.float32)
    return x


@jax.jit
def _all_finite(*arrays: Array) -> Array:
    return jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays])


def _validate(validate: bool | None, **arrays) -> None:
    """The input check of the public entry points (``validate=None``: whenever the arrays are
    concrete, i.e. not inside ``jit`` / ``vmap``, where values cannot be looked at; ``False``:
    never; ``True``: always on concrete arrays). One fused device reduction says whether all is
    finite; only then is :func:`check_finite` run to name the array and the first bad entry."""
    if validate is False:
        return
    if not all(_is_concrete(v) for v in arrays.values()):
        if validate:  # asked for: check what can be looked at
            check_finite(**arrays)
        return
    floats = {k: v for k, v in arrays.items()
              if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)}
    if not floats:
        return
    try:
        ok = bool(np.all(np.asarray(_all_finite(*floats.values()))))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # constants inside someone's jit: their values are not known yet
    if not ok:
        check_finite(**floats)


# --------------------------------------------------------------------------------------------
# Section 3.1: confident attributes and matching scores (eq. 3.1).


@jax.jit
def _confident(x: Array, t: Array) -> Array:
    return jnp.abs(x - 0.5) > t


def confident_attributes(x_query: Array, threshold=DEFAULT_THRESHOLD) -> Array:
    """Confidently recognised attributes (section 3.1): ``|x_a - 0.5| > t_a``.

    Args:
      x_query: ``[..., A]`` attribute probabilities.
      threshold: scalar or ``[A]`` in ``[0, 0.5)``.  The default 0.4 selects probabilities below
        0.1 or above 0.9 — the paper's worked example (its ``t = 0.1`` contradicts its formula).

    Returns:
      bool ``[..., A]``.
    """
    _check_ndim("x_query", x_query, tuple(range(1, 33)), "[..., A]")
    check_threshold(threshold, _shape(x_query)[-1])
    return _confident(_float(x_query), jnp.asarray(threshold, dtype=_float(x_query).dtype))


def _eq_3_1(xq: Array, xg: Array) -> Array:
    """Eq. 3.1 elementwise (broadcasting)."""
    return (1.0 - jnp.abs(xq - xg)) / (0.5 + jnp.abs(xq - 0.5))


@jax.jit
def _scores(xq: Array, xg: Array) -> Array:
    return _eq_3_1(xq[..., None, :], xg)  # [..., 1, A] against [G, A]


def _check_probabilities(x_query, x_gallery) -> None:
    """Shapes of a pair of probability arrays: ``[A]`` or ``[Q, A]`` against ``[G, A]``."""
    _check_ndim("x_query", x_query, (1, 2), "[A] or [Q, A]")
    _check_ndim("x_gallery", x_gallery, (2,), "[G, A]")
    if _shape(x_query)[-1] != _shape(x_gallery)[-1]:
        raise ValueError(
            f"attribute counts differ: x_query {_shape(x_query)}, x_gallery {_shape(x_gallery)}"
        )
    if _shape(x_gallery)[0] == 0:
        raise ValueError(f"the gallery is empty: x_gallery has shape {_shape(x_gallery)}")


def matching_scores(x_query: Array, x_gallery: Array) -> Array:
    """Matching scores of eq. 3.1: ``s_a = (1 - |x_a^q - x_a^g|) / (0.5 + |x_a^q - 0.5|)``.

    Args:
      x_query: ``[A]`` or ``[Q, A]`` query attribute probabilities.
      x_gallery: ``[G, A]`` gallery attribute probabilities.

    Returns:
      ``[G, A]`` for one query, ``[Q, G, A]`` for ``Q``.  Raw values: ``s_a`` exceeds 1 when
      ``x^g`` is close to an unsaturated ``x^q``; displays clip at 100 %.
    """
    _check_probabilities(x_query, x_gallery)
    return _scores(_float(x_query), _float(x_gallery))


# --------------------------------------------------------------------------------------------
# Section 3.2: attribute errors (eq. 3.2) for all pairs.


def complete_weights(weights: Array) -> Array:
    """``|w_na| / sum_a |w_na|`` ``[N, A]``: eq. 3.2 with these weights sums to the distance.

    A component whose weights are all zero is shared equally among the attributes, so the
    decomposition stays complete.
    """
    mag = jnp.abs(weights)
    total = jnp.sum(mag, axis=-1, keepdims=True)
    a = weights.shape[-1]
    return jnp.where(total > 0, mag / jnp.where(total > 0, total, 1.0), 1.0 / a)


def projection_weights(weights: Array) -> Array:
    """``[W, pinv(W)^T]`` ``[N, 2A]``: the two maps of the attribute projection.

    For a difference ``d = f^q - f^g``, ``d @ W`` is the logit difference ``W^T d`` and
    ``d @ pinv(W)^T`` the least-squares coefficients ``c`` of ``d = W c + r`` (``r`` orthogonal to
    the span of ``W``).  ``sum_a c_a (W^T d)_a = |W c|^2`` (``W pinv(W)`` is the orthogonal
    projector onto that span).  The pseudo-inverse comes from the SVD of ``W`` (its condition
    number, not that of ``W^T W``), with NumPy's default cut-off for tiny singular values.
    """
    w = jnp.asarray(weights)
    return jnp.concatenate([w, jnp.linalg.pinv(w).T.astype(w.dtype)], axis=1)


def _pair_terms(diff: Array, w: Array, projection: bool) -> Array:
    """Per-attribute terms of differences ``diff [P, N]`` -> ``[P, A]``: eq. 3.2 with weights
    ``w [N, A]``, or the projection contributions with ``w = projection_weights(W) [N, 2A]``."""
    if projection:
        a = w.shape[1] // 2
        t = _dot(diff, w)
        return t[:, :a] * t[:, a:]
    return _dot(jnp.square(diff), w)


def _direct_errors(fq: Array, fg: Array, w: Array, projection: bool = False) -> Array:
    """Eq. 3.2 (or the projection contributions) in direct form, difference first, for all pairs
    of ``fq [Q, N]``, ``fg [G, N]`` -> ``[Q, G, A]``.

    The differences are formed per block of queries (``rows x G x N`` at a time).
    """
    rows = max(1, min(fq.shape[0], 2048 // max(1, fg.shape[0])))

    def one(f):  # [N] -> [G, A]
        return _pair_terms(f[None, :] - fg, w, projection)

    return jax.lax.map(one, fq, batch_size=rows)


def _gemm_errors(fq: Array, fg: Array, w: Array, projection: bool = False) -> Array:
    """Eq. 3.2 expanded into GEMMs ``[Q, G, A]``: fast, but cancels for near-duplicates.

    Projection: ``(W^T fq - W^T fg) * (pinv(W) fq - pinv(W) fg)``, the same cancellation.
    """
    if projection:
        a = w.shape[1] // 2
        t = _dot(fq, w)[:, None, :] - _dot(fg, w)[None, :, :]
        return t[..., :a] * t[..., a:]
    p = _dot(jnp.square(fq), w)  # [Q, A]
    r = _dot(jnp.square(fg), w)  # [G, A]
    c = jnp.einsum("qn,na,gn->qga", fq, w, fg, precision=_PRECISION)
    return p[:, None, :] + r[None, :, :] - 2.0 * c


def recompute_ratio(num_components: int, rtol: float = 1e-3) -> float:
    """Pairs with ``|fq-fg|^2 < ratio * (|fq|^2 + |fg|^2)`` are recomputed in direct form.

    The GEMM form's float32 error is at most ``2 N u T_a``; asking it to stay below
    ``rtol * S_a`` with ``S_a / T_a`` estimated by the pair's ``|fq-fg|^2 / (|fq|^2+|fg|^2)``
    gives this ratio.  The bound is worst case (typical rounding grows like ``sqrt(N) u``), which
    leaves a wide margin for attributes whose weights do not follow the distance.
    """
    return min(1.0, 2.0 * num_components * _UNIT_ROUNDOFF / rtol)


def _auto_errors(fq: Array, fg: Array, w: Array, capacity: int,
                 projection: bool = False) -> Array:
    """GEMM form, with near-duplicate pairs recomputed in direct form (see module docstring).

    The projection's GEMM form differences logits, with absolute error about ``N u |f| |w_a|``
    against a value of size ``|d| |w_a|``: its relative error grows like ``|f| / |d|``, more
    slowly than eq. 3.2's ``|f|^2 / |d|^2``, so eq. 3.2's recompute rule covers it too.
    """
    q, n = fq.shape
    g = fg.shape[0]
    e = _gemm_errors(fq, fg, w, projection)
    q2 = jnp.sum(jnp.square(fq), axis=-1)
    g2 = jnp.sum(jnp.square(fg), axis=-1)
    d2 = retrieval.squared_distances(fq, fg)
    risky = d2 < recompute_ratio(n) * (q2[:, None] + g2[None, :])
    capacity = min(capacity, q * g)

    def fix_pairs(e):
        (flat,) = jnp.nonzero(risky.ravel(), size=capacity, fill_value=q * g)
        qi, gi = flat // g, flat % g
        diff = fq.at[qi].get(mode="clip") - fg.at[gi].get(mode="clip")
        return e.at[qi, gi].set(_pair_terms(diff, w, projection), mode="drop")

    count = jnp.sum(risky)
    branch = jnp.where(count == 0, 0, jnp.where(count <= capacity, 1, 2))
    return jax.lax.switch(
        branch, [lambda e: e, fix_pairs, lambda e: _direct_errors(fq, fg, w, projection)], e
    )


def _errors_block(fq: Array, fg: Array, w: Array, method: str, capacity: int,
                  projection: bool) -> Array:
    if method == "direct":
        return _direct_errors(fq, fg, w, projection)
    if method == "gemm":
        return _gemm_errors(fq, fg, w, projection)
    return _auto_errors(fq, fg, w, capacity, projection)


def _stream_errors(fq, fg, w, *, method, query_chunk, gallery_chunk, projection):
    """``[Q, G, A]`` written block by block into one buffer (blocks at clamped offsets)."""
    q, g = fq.shape[0], fg.shape[0]
    a = w.shape[1] // 2 if projection else w.shape[1]
    qc, gc = min(query_chunk, q), min(gallery_chunk, g)
    nq, ng = -(-q // qc), -(-g // gc)
    capacity = max(64, qc * gc // 256)
    dtype = jnp.result_type(fq.dtype, fg.dtype, w.dtype)
    out = jnp.zeros((q, g, a), dtype)

    def body(i, out):
        q0 = jnp.minimum((i // ng) * qc, q - qc)
        g0 = jnp.minimum((i % ng) * gc, g - gc)
        fq_b = jax.lax.dynamic_slice_in_dim(fq, q0, qc)
        fg_b = jax.lax.dynamic_slice_in_dim(fg, g0, gc)
        e = _errors_block(fq_b, fg_b, w, method, capacity, projection).astype(dtype)
        return jax.lax.dynamic_update_slice(out, e, (q0, g0, 0))

    return jax.lax.fori_loop(0, nq * ng, body, out)


@functools.partial(
    jax.jit, static_argnames=("mode", "method", "query_chunk", "gallery_chunk", "mesh"))
def _all_pair_errors(fq, fg, w, *, mode, method, query_chunk, gallery_chunk, mesh):
    """All pairs; with a mesh, every device streams its own slice of the gallery."""
    if mode == "complete":
        w = complete_weights(w)
    elif mode == "projection":
        w = projection_weights(w)
    stream = functools.partial(_stream_errors, method=method, query_chunk=query_chunk,
                               gallery_chunk=gallery_chunk, projection=mode == "projection")
    if mesh is None:
        return stream(fq, fg, w)
    g = fg.shape[0]
    axis = mesh.axis_names[0]
    gp = -(-g // mesh.size) * mesh.size
    out = jax.shard_map(
        stream, mesh=mesh, in_specs=(P(), P(axis), P()), out_specs=P(None, axis, None),
        check_vma=False,
    )(fq, jnp.pad(fg, ((0, gp - g), (0, 0))), w)
    return out[:, :g]


def resolve_mode(complete: bool, mode: str | None, modes: tuple[str, ...] = MODES) -> str:
    """The mode of the ``complete`` / ``mode`` keywords: ``mode`` when given (``complete=True``
    must then agree with it), else ``"complete"`` or ``"paper"`` by ``complete``."""
    if mode is None:
        return "complete" if complete else "paper"
    if mode not in modes:
        raise ValueError(f"mode must be one of {modes}, got {mode!r}")
    if complete and mode != "complete":
        raise ValueError(f"complete=True contradicts mode={mode!r}; pass one of them")
    return mode


def attribute_errors(
    f_query: Array,
    f_gallery: Array,
    weights: Array,
    complete: bool = False,
    *,
    mode: str | None = None,
    method: str = "auto",
    query_chunk: int = 128,
    gallery_chunk: int = 1024,
    mesh: Mesh | None | str = "auto",
    validate: bool | None = None,
) -> Array:
    """Attribute errors of eq. 3.2, ``e_a = sum_n (f_n^q - f_n^g)^2 w_na``, for all pairs, or
    another decomposition of the squared distance (``mode``).

    Args:
      f_query: ``[N]`` or ``[Q, N]`` query embeddings (the tensor that is ranked).
      f_gallery: ``[G, N]`` gallery embeddings.
      weights: ``[N, A]`` attribute-layer weights ``W``.
      complete: use ``|w_na| / sum_a |w_na|``: the ``A`` contributions are non-negative and sum
        to ``|f^q - f^g|^2`` (the complete decomposition; not the paper's eq. 3.2); the same as
        ``mode="complete"``.
      mode: one of :data:`ERROR_MODES`: ``"paper"`` (eq. 3.2), ``"complete"`` or
        ``"projection"`` (:func:`projection_contributions`; they sum to ``|W c|^2``, the
        distance without its remainder).  Default: by ``complete``.
      method: ``"auto"`` (GEMM form with direct recomputation of near pairs; accurate and
        fast), ``"direct"`` (difference first; exact, slower) or ``"gemm"`` (expanded form;
        fastest, inaccurate for near-duplicates — for comparison only).
      query_chunk, gallery_chunk: block sizes of the stream (memory per block is about
        ``query_chunk * gallery_chunk * A`` values besides the output).
      mesh: ``"auto"`` shards the gallery over all devices when there are several; ``None``
        uses one device; or a 1-D :class:`jax.sharding.Mesh` (see :func:`explain_rankings`).
      validate: check the inputs for NaN / Inf first (:func:`check_finite`); ``None`` (default):
        whenever they are concrete arrays (the check cannot run inside ``jit`` / ``vmap``, and
        is skipped there); ``False``: never.

    Returns:
      ``[G, A]`` for one query, ``[Q, G, A]`` for ``Q`` queries.
    """
    _check_embeddings(f_query, f_gallery, weights)
    mode = resolve_mode(complete, mode, ERROR_MODES)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if query_chunk < 1 or gallery_chunk < 1:
        raise ValueError(f"chunks must be >= 1, got {query_chunk=}, {gallery_chunk=}")
    _validate(validate, f_query=f_query, f_gallery=f_gallery, weights=weights)
    fq = _float(f_query)
    single = fq.ndim == 1
    out = _all_pair_errors(
        fq[None] if single else fq, _float(f_gallery), _float(weights),
        mode=mode, method=method,
        query_chunk=int(query_chunk), gallery_chunk=int(gallery_chunk), mesh=_resolve_mesh(mesh),
    )
    return out[0] if single else out


def projection_contributions(f_query: Array, f_gallery: Array, weights: Array,
                             *, validate: bool | None = None) -> tuple[Array, Array]:
    """The squared distance decomposed along the attribute directions, with a remainder.

    ``d = f^q - f^g`` is projected onto the span of the columns of ``W`` by least squares,
    ``d = W c + r`` with ``r`` orthogonal to every ``w_a``.  Attribute ``a`` contributes
    ``p_a = c_a (W^T d)_a`` — its coefficient times its logit difference — and
    ``sum_a p_a = |W c|^2``; the remainder ``|r|^2`` is the part of the distance no attribute
    direction explains, so ``sum_a p_a + |r|^2 = |d|^2``.  A ``p_a`` is negative only when
    attribute directions are correlated and their coefficients oppose
    (``docs/design.md``, "The attribute projection").

    Args:
      f_query: ``[N]`` or ``[Q, N]``; f_gallery: ``[G, N]``; weights: ``[N, A]``.
      validate: check the inputs for NaN / Inf first, as in :func:`attribute_errors`.

    Returns:
      ``(contributions, remainder)``: ``[G, A]`` and ``[G]`` for one query, ``[Q, G, A]`` and
      ``[Q, G]`` for ``Q``; computed in direct form (difference first).
    """
    _check_embeddings(f_query, f_gallery, weights)
    _validate(validate, f_query=f_query, f_gallery=f_gallery, weights=weights)
    fq = _float(f_query)
    single = fq.ndim == 1
    p, r = _projection_pairs(fq[None] if single else fq, _float(f_gallery), _float(weights))
    return (p[0], r[0]) if single else (p, r)


@jax.jit
def _projection_pairs(fq: Array, fg: Array, w: Array) -> tuple[Array, Array]:
    wp = projection_weights(w)

    def one(f):  # [N] -> [G, A], [G]
        diff = f[None, :] - fg
        p = _pair_terms(diff, wp, True)
        return p, jnp.sum(jnp.square(diff), axis=-1) - jnp.sum(p, axis=-1)

    return jax.lax.map(one, fq)


def _disagree(xq: Array, xg: Array) -> Array:
    """``xq (1 - xg) + xg (1 - xq)`` elementwise: both terms >= 0, no cancellation."""
    return xq * (1.0 - xg) + xg * (1.0 - xq)


@jax.jit
def _disagreement(xq: Array, xg: Array) -> Array:
    return _disagree(xq[..., None, :], xg)


def disagreement_probabilities(x_query: Array, x_gallery: Array) -> Array:
    """The probability that the labels of the query and the gallery person differ, per
    attribute: ``x_a^q (1 - x_a^g) + x_a^g (1 - x_a^q)``, reading the head's probabilities of
    the two images as independent (``docs/design.md``, "Explanations that beat the prior").

    Args:
      x_query: ``[A]`` or ``[Q, A]``; x_gallery: ``[G, A]`` attribute probabilities.

    Returns:
      ``[G, A]`` for one query, ``[Q, G, A]`` for ``Q``; values in ``[0, 1]``.
    """
    _check_probabilities(x_query, x_gallery)
    return _disagreement(_float(x_query), _float(x_gallery))


# --------------------------------------------------------------------------------------------
# Rankings with explanations.


def _local_candidates(fq, fg, valid, w, *, kk, chunk, offset, projection):
    """Top-``kk`` of one gallery shard, re-ranked with exact distances and explained.

    ``fq [Q, N]``, ``fg [Gs, N]`` (``Gs >= chunk``), ``valid``: bool ``[Gs]`` or None (every
    row is an image); ``w = (W, weights of the pair terms)`` (:func:`_pair_terms`). The shard
    is read in blocks of ``chunk`` rows at clamped offsets (the last block overlaps the one
    before it and skips the rows that one ranked), so the gallery is never copied or padded.
    Returns distances ``[Q, kk]`` (``inf`` for padding), global indices ``[Q, kk]``, the
    candidates' logits ``[Q, kk, A]`` and pair terms ``[Q, kk, A]``.
    """
    q, n = fq.shape
    gs = fg.shape[0]
    nc = -(-gs // chunk)
    kc = min(kk, chunk)

    def rank_chunk(c):  # GEMM distances of one block, its top kc
        start = jnp.minimum(c * chunk, gs - chunk)
        g = jax.lax.dynamic_slice_in_dim(fg, start, chunk)
        ok = start + jnp.arange(chunk) >= c * chunk  # rows an earlier block already ranked
        if valid is not None:
            ok &= jax.lax.dynamic_slice_in_dim(valid, start, chunk)
        d2 = jnp.where(ok[None], retrieval.squared_distances(fq, g), jnp.inf)
        neg, idx = jax.lax.top_k(-d2, kc)
        return -neg, idx + start

    d_c, i_c = jax.lax.map(rank_chunk, jnp.arange(nc))  # [nc, Q, kc]
    d_c = jnp.moveaxis(d_c, 0, 1).reshape(q, nc * kc)
    i_c = jnp.moveaxis(i_c, 0, 1).reshape(q, nc * kc)
    k_loc = min(kk, nc * kc)
    neg, pos = jax.lax.top_k(-d_c, k_loc)
    cand = jnp.take_along_axis(i_c, pos, axis=1)  # local indices [Q, k_loc]
    cand_valid = jnp.isfinite(-neg)

    def explain_query(args):  # exact distances, logits and pair terms of one query's candidates
        f, idx, ok = args
        g = fg[idx]  # [k_loc, N]
        diff = f[None, :] - g
        d = jnp.where(ok, jnp.sum(jnp.square(diff), axis=-1), jnp.inf)
        return d, _dot(g, w[0]), _pair_terms(diff, w[1], projection)

    d, logits, errors = jax.lax.map(explain_query, (fq, cand, cand_valid), batch_size=64)
    return d, cand + offset, logits, errors


def _merge_top_k(k, d, idx, *rest):
    """The ``k`` nearest candidates per row, ties broken by the lower gallery index."""
    pos = jnp.lexsort((idx, d), axis=-1)[:, :k]
    take = lambda x: jnp.take_along_axis(x, pos[..., None] if x.ndim == 3 else pos, axis=1)
    return (take(d), take(idx), *(take(x) for x in rest))


def _mode_weights(w: Array, mode: str) -> Array:
    """The weights of the pair terms of ``mode`` (:func:`_pair_terms`)."""
    if mode == "complete":
        return complete_weights(w)
    if mode in ("projection", "disagreement"):
        # Disagreement needs no pair term; the projection's are computed and unused.
        return projection_weights(w)
    return w


@functools.partial(jax.jit, static_argnames=("k", "mode", "chunk", "mesh"))
def _explain(fq, fg, w, threshold, calibration, *, k, mode, chunk, mesh):
    g, n = fg.shape
    kk = min(k + _RERANK_MARGIN, g)
    devices = 1 if mesh is None else mesh.size
    chunk = min(chunk, -(-g // devices))
    # Both weight sets travel together: [0] the attribute layer, [1] those of the pair terms.
    projection = mode in ("projection", "disagreement")
    w2 = (w, _mode_weights(w, mode))
    local = functools.partial(_local_candidates, kk=kk, chunk=chunk, projection=projection)
    if mesh is None:
        d, idx, logits, errors = local(fq, fg, None, w2, offset=0)
    else:
        # Equal shards for the devices: the gallery is padded to a multiple of them.
        gp = -(-g // (devices * chunk)) * devices * chunk
        fg_p = jnp.pad(fg, ((0, gp - g), (0, 0)))
        valid = jnp.arange(gp) < g
        axis = mesh.axis_names[0]
        shard = gp // devices

        def per_device(fq, fg_s, valid_s, w2):
            offset = jax.lax.axis_index(axis) * shard
            return local(fq, fg_s, valid_s, w2, offset=offset)

        spec_k = P(None, axis)
        d, idx, logits, errors = jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P(axis), P(axis), (P(), P())),
            out_specs=(spec_k, spec_k, spec_k, spec_k),
            check_vma=False,
        )(fq, fg_p, valid, w2)
    d, idx, logits, errors = _merge_top_k(k, d, idx, logits, errors)
    zq = _dot(fq, w)
    xq = jax.nn.sigmoid(zq)
    xg = jax.nn.sigmoid(logits)
    if mode == "disagreement":
        errors = _disagree(head_probabilities(zq, calibration)[:, None, :],
                           head_probabilities(logits, calibration))
        remainder = jnp.full(d.shape, jnp.nan, d.dtype)
    else:
        remainder = d - jnp.sum(errors, axis=-1)
    return RankingExplanation(
        indices=idx.astype(jnp.int32),
        distances=d,
        attributes_query=xq,
        attributes_gallery=xg,
        selected=jnp.abs(xq - 0.5) > threshold,
        scores=_eq_3_1(xq[:, None, :], xg),
        errors=errors,
        remainder=remainder,
    )


def default_mesh() -> Mesh | None:
    """A 1-D mesh ``('gallery',)`` over all devices, or ``None`` with a single device."""
    devices = jax.devices()
    return Mesh(np.array(devices), ("gallery",)) if len(devices) > 1 else None


def _resolve_mesh(mesh: Mesh | None | str) -> Mesh | None:
    if isinstance(mesh, str):
        if mesh != "auto":
            raise ValueError(f"mesh must be 'auto', None or a jax.sharding.Mesh, got {mesh!r}")
        mesh = default_mesh()
    if mesh is not None and len(mesh.axis_names) != 1:
        raise ValueError(f"mesh must be 1-D, got axes {mesh.axis_names}")
    return mesh


def explain_rankings(
    f_query: Array,
    f_gallery: Array,
    weights: Array,
    *,
    k: int = 10,
    threshold=DEFAULT_THRESHOLD,
    complete: bool = False,
    mode: str | None = None,
    gallery_chunk: int = 1024,
    mesh: Mesh | None | str = "auto",
    validate: bool | None = None,
    calibration: Calibration | None = None,
) -> RankingExplanation:
    """Ranks the gallery for every query and explains the top ``k`` (paper section 3).

    The gallery is ranked by squared Euclidean distance ``|f^q - f^g|^2``, streamed in chunks of
    ``gallery_chunk`` (GEMM distances, then the best ``k + 8`` candidates per query re-ranked
    with directly computed, exact distances).  With several devices the gallery is sharded
    over them (``jax.sharding``) and the per-device candidates merged.

    Args:
      f_query: ``[Q, N]`` (or ``[N]``) query embeddings.
      f_gallery: ``[G, N]`` gallery embeddings.
      weights: ``[N, A]`` attribute-layer weights ``W`` (``x = sigmoid(f @ W)``).
      k: ranks to explain, ``1 <= k <= G``.
      threshold: scalar or ``[A]`` in ``[0, 0.5)`` for :func:`confident_attributes`.
      complete: eq. 3.2 with the complete decomposition (see :func:`attribute_errors`); the
        same as ``mode="complete"``.
      mode: what ``errors`` holds, one of :data:`MODES`: ``"paper"`` (eq. 3.2), ``"complete"``,
        ``"projection"`` (:func:`projection_contributions`, with ``remainder``) or
        ``"disagreement"`` (:func:`disagreement_probabilities`).  Default: by ``complete``.
      gallery_chunk: gallery rows per streamed block.
      mesh: ``"auto"`` shards over all devices when there are several; ``None`` uses one
        device; or a 1-D :class:`jax.sharding.Mesh` whose axis the gallery is split over.
      validate: check the inputs for NaN / Inf first (:func:`check_finite`); ``None`` (default):
        whenever they are concrete arrays (the check cannot run inside ``jit`` / ``vmap``, and
        is skipped there); ``False``: never.
      calibration: the head's :class:`~reid_jax.models.attribute_head.Calibration`; with it the
        ``disagreement`` mode reads the calibrated probabilities ``sigmoid(slope z + intercept)``
        (docs/design.md, "Calibrated probabilities"). The other modes, ``scores`` and the
        ``attributes_*`` fields keep the head's own ``x``.

    Returns:
      :class:`RankingExplanation` (``[Q, ...]``; without the ``Q`` axis for a ``[N]`` query).
    """
    _, g, a = _check_embeddings(f_query, f_gallery, weights)
    check_calibration(calibration, a)
    mode = resolve_mode(complete, mode)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= g:
        raise ValueError(f"k must be an integer in [1, G={g}] (f_gallery {_shape(f_gallery)}), "
                         f"got {k!r}")
    check_threshold(threshold, a)
    if gallery_chunk < 1:
        raise ValueError(f"gallery_chunk must be >= 1, got {gallery_chunk}")
    _validate(validate, f_query=f_query, f_gallery=f_gallery, weights=weights)
    mesh = _resolve_mesh(mesh)
    fq = _float(f_query)
    single = fq.ndim == 1
    fg = _float(f_gallery)
    out = _explain(
        fq[None] if single else fq, fg, _float(weights),
        jnp.asarray(threshold, dtype=fq.dtype),
        None if calibration is None else Calibration(_float(calibration.slope),
                                                     _float(calibration.intercept)),
        k=int(k), mode=mode, chunk=int(gallery_chunk), mesh=mesh,
    )
    return jax.tree.map(lambda x: x[0], out) if single else out


__all__ = [
    "DEFAULT_THRESHOLD",
    "ERROR_MODES",
    "METHODS",
    "MODES",
    "RankingExplanation",
    "attribute_errors",
    "check_finite",
    "check_threshold",
    "complete_weights",
    "confident_attributes",
    "default_mesh",
    "disagreement_probabilities",
    "explain_rankings",
    "matching_scores",
    "projection_contributions",
    "projection_weights",
    "recompute_ratio",
    "resolve_mode",
]
