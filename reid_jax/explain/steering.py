"""Steering a ranking with attributes: ignore an attribute's direction, require or forbid one.

An operator who knows that the person may have changed jacket wants the ranking without the
jacket colour; one who knows the person carried a backpack wants only people with one. Both are
operations on the embeddings and the attribute head (``docs/explorer.md``, "Steering"):

* **ignore** the attributes ``S``: rank by the distance of the embeddings with the span of the
  head's columns ``W_S`` removed, the orthogonal projection
  ``P = I - W_S (W_S^T W_S)^+ W_S^T`` applied to query and gallery embeddings
  (:func:`ignore_projection`, :func:`project`, :func:`steered_distances`).
  What it guarantees: the head's logit of every ignored attribute is 0 for every projected
  embedding (``(P f) . w_a = 0``), so the steered distance cannot change along any direction
  that attribute reads; ``|P q - P g|^2 <= |q - g|^2``. What it does not: information that is
  correlated with the attribute but lies in other directions of the embedding stays (e.g. a
  colour that also shows in the texture features the ranking uses), and the paper's eq. 3.2
  error of an ignored attribute is not zero (it weights squared components with ``w_a``, not the
  projection onto ``w_a``).
* **require** an attribute present / absent: keep only the gallery images whose head
  probability ``x_a = sigmoid(f @ w_a)`` of the *unprojected* embedding is ``> 0.5`` / ``< 0.5``
  (:func:`attribute_filter`); an image at exactly 0.5 passes neither.

:func:`steer_ranking` ranks a gallery for one query with both and explains the top ``k`` with the
kernels of :mod:`reid_jax.explain.kernels`: the distances and the error composition are those of
the projected embeddings (they explain the steered distance; in ``complete`` mode they sum to
it), while the attribute probabilities, the confident attributes and the matching scores are
those of the unprojected embeddings (the head was trained on them; an ignored attribute keeps
its probability and its score, so the user sees what the ranking no longer looks at).

Every function is pure and jitted (or calls jitted functions), rejects bad shapes with a message
naming them before tracing, and works under ``jax.vmap`` where it takes a query batch.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from reid_jax import retrieval
from reid_jax.data.attributes import ATTRIBUTE_NAMES
from reid_jax.explain import kernels
from reid_jax.models.attribute_head import Calibration

Array = jax.Array
_PRECISION = retrieval.PRECISION
# Extra candidates re-ranked with directly computed distances (as the kernels' own margin).
CANDIDATE_MARGIN = 8


def _dot(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, precision=_PRECISION)


def _shape(x) -> tuple[int, ...]:
    return tuple(jnp.shape(x))


def _check_weights_mask(weights, mask, name: str) -> tuple[int, int]:
    if jnp.ndim(weights) != 2:
        raise ValueError(f"weights must be [N, A], got shape {_shape(weights)}")
    n, a = _shape(weights)
    if _shape(mask) != (a,):
        raise ValueError(f"{name} must be bool [A={a}] (one per column of weights "
                         f"{_shape(weights)}), got shape {_shape(mask)}")
    return n, a


def _bool(x) -> Array:
    return jnp.asarray(x).astype(bool)


# --------------------------------------------------------------------------------------------
# Which attributes: names to masks.


class Steering(NamedTuple):
    """What a user asked for, as bool masks ``[A]`` in the order of ``ATTRIBUTE_NAMES``.

    ignore: remove the span of these columns of ``W`` from the embeddings.
    require: keep only gallery images whose probability is above 0.5.
    forbid: keep only gallery images whose probability is below 0.5.
    """

    ignore: np.ndarray
    require: np.ndarray
    forbid: np.ndarray

    @property
    def active(self) -> bool:
        """Whether anything is steered."""
        return bool(self.ignore.any() or self.require.any() or self.forbid.any())

    @property
    def filters(self) -> bool:
        """Whether the gallery is filtered."""
        return bool(self.require.any() or self.forbid.any())

    def names(self, names: Sequence[str] = ATTRIBUTE_NAMES) -> dict[str, list[str]]:
        """``{"ignore": [...], "require": [...], "forbid": [...]}`` attribute names."""
        return {field: [names[i] for i in np.flatnonzero(getattr(self, field))]
                for field in self._fields}


def _mask(field: str, values: Iterable[str], names: Sequence[str]) -> np.ndarray:
    mask = np.zeros(len(names), bool)
    position = {n: i for i, n in enumerate(names)}
    for value in values:
        if value not in position:
            near = difflib.get_close_matches(value, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ValueError(f"{field}: unknown attribute {value!r}{hint} (attributes: "
                             f"{', '.join(names)})")
        mask[position[value]] = True
    return mask


def parse_steering(ignore: Iterable[str] = (), require: Iterable[str] = (),
                   forbid: Iterable[str] = (), names: Sequence[str] = ATTRIBUTE_NAMES
                   ) -> Steering:
    """A :class:`Steering` from attribute names.

    Raises:
      ValueError: an unknown name (with the nearest valid ones), naming the field; an
        attribute both required and forbidden.
    """
    steering = Steering(_mask("ignore", ignore, names), _mask("require", require, names),
                        _mask("forbid", forbid, names))
    both = steering.require & steering.forbid
    if both.any():
        both_names = [names[i] for i in np.flatnonzero(both)]
        raise ValueError(f"require and forbid: attribute(s) {both_names} cannot be both present "
                         "and absent")
    return steering


def no_steering(num_attributes: int = len(ATTRIBUTE_NAMES)) -> Steering:
    """Nothing ignored, nothing required."""
    z = np.zeros(num_attributes, bool)
    return Steering(z, z.copy(), z.copy())


# --------------------------------------------------------------------------------------------
# Ignore: the projection.


class IgnoreProjection(NamedTuple):
    """The projection that removes the span of the ignored columns of ``W``
    (:func:`ignore_projection`).

    basis: ``B [N, A]`` orthonormal columns spanning ``W_S`` (zero columns beyond its rank);
      ``P = I - B B^T``.
    coeffs: ``C [A, A]`` with ``B = (W * ignore) @ C``, so ``B^T g = C^T (ignore * (g @ W))``
      follows from the gallery's logits.
    ignore: bool ``[A]`` the ignored columns.
    """

    basis: Array
    coeffs: Array
    ignore: Array


def _basis(weights: Array, ignore: Array) -> tuple[np.ndarray, np.ndarray]:
    """``(B [N, A], C [A, A])`` float32: ``B`` an orthonormal basis of the span of the chosen
    columns (zero columns beyond its rank), ``B = (W * ignore) @ C``.

    From the ``A x A`` Gram matrix in float64 on the host: ``W_S^T W_S = V diag(s^2) V^T``,
    ``C = V diag(1 / s)`` on the columns whose singular value ``s`` exceeds
    ``max(N, A) * eps_float32 * s_max`` (numpy's rank rule for float32 data). Forming the Gram
    matrix squares the condition number, which float64 absorbs (``kappa^2 * 1e-16`` stays far
    below float32 rounding for any ``kappa`` the rule keeps); a float32 SVD of ``[N, A]`` on the
    device was less accurate and, at ``N = 2048``, took 40-150 ms on a loaded 2-core machine
    against 1-3 ms for this (``docs/explorer.md``, "Steering").
    """
    w = np.asarray(weights, np.float64)
    n, a = w.shape
    cols = np.flatnonzero(np.asarray(ignore, bool))
    basis, coeffs = np.zeros((n, a), np.float32), np.zeros((a, a), np.float32)
    if cols.size:
        # einsum, not BLAS: for these small products a multi-threaded BLAS on a loaded machine
        # spent tens of milliseconds synchronising its threads.
        ws = w[:, cols]
        lam, v = np.linalg.eigh(np.einsum("na,nb->ab", ws, ws))
        s = np.sqrt(np.maximum(lam, 0.0))
        keep = s > s.max() * max(n, a) * np.finfo(np.float32).eps
        c = v[:, keep] / s[keep][None, :]
        basis[:, :c.shape[1]] = np.einsum("ns,sr->nr", ws, c)
        coeffs[cols, :c.shape[1]] = c
    return basis, coeffs


def ignore_projection(weights: Array, ignore: Array) -> IgnoreProjection:
    """The :class:`IgnoreProjection` of the ``ignore`` columns of ``W`` (an ``A x A``
    eigendecomposition in float64 on the host; a server keeps it per set of ignored
    attributes)."""
    _check_weights_mask(weights, ignore, "ignore")
    basis, coeffs = _basis(weights, ignore)
    return IgnoreProjection(jnp.asarray(basis), jnp.asarray(coeffs), _bool(ignore))


def ignore_basis(weights: Array, ignore: Array) -> Array:
    """An orthonormal basis ``B [N, A]`` of the span of the ignored columns of ``W``.

    Args:
      weights: ``W [N, A]``, the attribute head's kernel.
      ignore: bool ``[A]``, the columns to remove.

    Returns:
      float32 ``[N, A]``: ``rank(W_S)`` orthonormal columns spanning ``W_S``, the other
      columns zero, so ``P = I - B B^T`` is the projection ``I - W_S (W_S^T W_S)^+ W_S^T``.
      Linearly dependent columns are handled as the pseudo-inverse handles them (singular
      values below ``max(N, A) * eps * s_max`` count as zero).
    """
    _check_weights_mask(weights, ignore, "ignore")
    return jnp.asarray(_basis(weights, ignore)[0])


@jax.jit
def _project(f: Array, basis: Array) -> Array:
    return f - _dot(_dot(f, basis), basis.T)


def project(f: Array, basis: Array) -> Array:
    """``P f = f - B (B^T f)`` for ``f [..., N]`` and a basis ``B [N, A]`` of :func:`ignore_basis`.

    Returns ``[..., N]``; ``(P f) @ W_S`` is zero up to float32 rounding.
    """
    if jnp.ndim(basis) != 2 or jnp.ndim(f) < 1 or _shape(f)[-1] != _shape(basis)[0]:
        raise ValueError(f"f must be [..., N] and basis [N, A] with the same N, got f "
                         f"{_shape(f)} and basis {_shape(basis)}")
    return _project(jnp.asarray(f, jnp.float32), jnp.asarray(basis, jnp.float32))


def projection_matrix(weights: Array, ignore: Array) -> Array:
    """``P = I - W_S (W_S^T W_S)^+ W_S^T`` ``[N, N]`` (for checks; the ranking never forms it)."""
    b = ignore_basis(weights, ignore)
    return jnp.eye(b.shape[0], dtype=b.dtype) - _dot(b, b.T)


def _corrections(fq, zg, w, coeffs, ignore):
    """``(B^T q [Q, A], B^T g [G, A])`` from the logits (``B = (W * ignore) @ C``)."""
    m = ignore.astype(w.dtype)
    return _dot(_dot(fq, w) * m, coeffs), _dot(zg * m, coeffs)


@jax.jit
def _steered_distances(fq, fg, g2, zg, w, coeffs, ignore):
    """``|P q - P g|^2 = |q - g|^2 - |B^T q - B^T g|^2`` (``B`` orthonormal) ``[Q, G]``."""
    cq, cg = _corrections(fq, zg, w, coeffs, ignore)
    d = jnp.sum(jnp.square(fq), -1)[:, None] + g2[None, :] - 2.0 * _dot(fq, fg.T)
    c = (jnp.sum(jnp.square(cq), -1)[:, None] + jnp.sum(jnp.square(cg), -1)[None, :]
         - 2.0 * _dot(cq, cg.T))
    return jnp.maximum(d - c, 0.0)


class PreparedGallery(NamedTuple):
    """A gallery on the device with what every steered ranking reuses (:func:`prepare_gallery`).

    embeddings: float32 ``[G, N]``.  sq_norms: ``[G]`` ``|g|^2``.  logits: ``[G, A]`` ``g @ W``.
    """

    embeddings: Array
    sq_norms: Array
    logits: Array


@jax.jit
def _prepare(fg, w):
    return PreparedGallery(fg, jnp.sum(jnp.square(fg), -1), _dot(fg, w))


def prepare_gallery(f_gallery: Array, weights: Array) -> PreparedGallery:
    """The gallery ``[G, N]`` on the device with its squared norms and logits ``f @ W``."""
    if jnp.ndim(f_gallery) != 2 or jnp.ndim(weights) != 2 or \
            _shape(f_gallery)[1] != _shape(weights)[0]:
        raise ValueError(f"expected f_gallery [G, N] and weights [N, A] with the same N, got "
                         f"{_shape(f_gallery)} and {_shape(weights)}")
    if _shape(f_gallery)[0] == 0:
        raise ValueError(f"the gallery is empty: f_gallery has shape {_shape(f_gallery)}")
    return _prepare(jnp.asarray(f_gallery, jnp.float32), jnp.asarray(weights, jnp.float32))


def _gallery(f_gallery: Array | PreparedGallery, weights: Array) -> PreparedGallery:
    if isinstance(f_gallery, PreparedGallery):
        if _shape(f_gallery.logits) != (_shape(f_gallery.embeddings)[0], _shape(weights)[1]):
            raise ValueError(f"the prepared gallery's logits {_shape(f_gallery.logits)} do not "
                             f"fit weights {_shape(weights)}: prepare it with these weights")
        return f_gallery
    return prepare_gallery(f_gallery, weights)


def _check_embeddings(f_query, f_gallery, weights) -> None:
    if jnp.ndim(f_query) not in (1, 2) or jnp.ndim(f_gallery) != 2 or jnp.ndim(weights) != 2:
        raise ValueError(f"expected f_query [N] or [Q, N], f_gallery [G, N], weights [N, A]; got "
                         f"{_shape(f_query)}, {_shape(f_gallery)}, {_shape(weights)}")
    n = _shape(f_query)[-1]
    if _shape(f_gallery)[1] != n or _shape(weights)[0] != n:
        raise ValueError(f"embedding sizes differ: f_query {_shape(f_query)}, f_gallery "
                         f"{_shape(f_gallery)}, weights {_shape(weights)} (expected f_query "
                         "[..., N], f_gallery [G, N], weights [N, A])")
    if _shape(f_gallery)[0] == 0:
        raise ValueError(f"the gallery is empty: f_gallery has shape {_shape(f_gallery)}")


def steered_distances(f_query: Array, f_gallery: Array | PreparedGallery, weights: Array,
                      ignore: Array, *, projection: IgnoreProjection | None = None) -> Array:
    """Squared distances of the projected embeddings, ``|P q - P g|^2``, for all pairs.

    Computed without projecting the gallery: with ``B`` the orthonormal basis of the ignored
    span, ``|P q - P g|^2 = |q - g|^2 - |B^T q - B^T g|^2``, and ``B^T g`` follows from the
    gallery's logits ``g @ W`` (kept in a :class:`PreparedGallery`), so the cost is the plain
    distance plus ``O(G A^2)``. Float32 GEMM form as
    :func:`reid_jax.retrieval.squared_distances` (clamped at 0), so it ranks as the unsteered
    distance does; rankings re-rank their candidates with directly computed distances.

    Args:
      f_query: ``[N]`` or ``[Q, N]``.
      f_gallery: ``[G, N]``, or a :class:`PreparedGallery` of it.
      weights: ``W [N, A]``.
      ignore: bool ``[A]``; all False gives the plain squared distances.
      projection: :func:`ignore_projection` of ``ignore`` when the caller keeps it.

    Returns:
      ``[G]`` for one query, ``[Q, G]`` for ``Q``.
    """
    gallery = _gallery(f_gallery, weights)
    _check_embeddings(f_query, gallery.embeddings, weights)
    projection = _projection(weights, ignore, projection)
    fq = jnp.asarray(f_query, jnp.float32)
    single = fq.ndim == 1
    out = _steered_distances(fq[None] if single else fq, *gallery,
                             jnp.asarray(weights, jnp.float32), projection.coeffs,
                             projection.ignore)
    return out[0] if single else out


def _projection(weights, ignore, projection: IgnoreProjection | None) -> IgnoreProjection:
    _check_weights_mask(weights, ignore, "ignore")
    if projection is None:
        return ignore_projection(weights, ignore)
    if _shape(projection.basis) != _shape(weights):
        raise ValueError(f"projection.basis {_shape(projection.basis)} does not fit weights "
                         f"{_shape(weights)}")
    if not np.array_equal(np.asarray(projection.ignore), np.asarray(ignore, bool)):
        raise ValueError("projection was computed for other ignored attributes than ignore")
    return projection


# --------------------------------------------------------------------------------------------
# Require / forbid: the filter.


@jax.jit
def _filter(x: Array, require: Array, forbid: Array) -> Array:
    present = jnp.all((x > 0.5) | ~require[None, :], axis=-1)
    absent = jnp.all((x < 0.5) | ~forbid[None, :], axis=-1)
    return present & absent


def attribute_filter(x_gallery: Array, require: Array, forbid: Array) -> Array:
    """bool ``[G]``: the gallery images with ``x_a > 0.5`` for every required and
    ``x_a < 0.5`` for every forbidden attribute.

    Args:
      x_gallery: ``[G, A]`` head probabilities of the (unprojected) gallery embeddings.
      require, forbid: bool ``[A]``.
    """
    if jnp.ndim(x_gallery) != 2:
        raise ValueError(f"x_gallery must be [G, A], got shape {_shape(x_gallery)}")
    a = _shape(x_gallery)[1]
    for name, m in (("require", require), ("forbid", forbid)):
        if _shape(m) != (a,):
            raise ValueError(f"{name} must be bool [A={a}] (one per column of x_gallery "
                             f"{_shape(x_gallery)}), got shape {_shape(m)}")
    return _filter(jnp.asarray(x_gallery), _bool(require), _bool(forbid))


# --------------------------------------------------------------------------------------------
# A steered ranking of one query, explained.


class SteeredRanking(NamedTuple):
    """The steered top ``k'`` of one query (``k' = min(k, kept gallery images)``).

    indices: int64 ``[k']`` gallery indices, nearest first (ties: lower index first).
    distances: float32 ``[k']`` ``|P q - P g|^2``, computed directly.
    attributes_query: float32 ``[A]`` and attributes_gallery ``[k', A]``: head probabilities of
      the unprojected embeddings.  selected: bool ``[A]`` confident query attributes (of those).
    scores: float32 ``[k', A]`` eq. 3.1 of those probabilities.
    errors: float32 ``[k', A]`` eq. 3.2 (or the mode's explanation) of ``P q - P g``.
    remainder: float32 ``[k']`` the steered distance minus the sum of ``errors`` (NaN for
      ``disagreement``; see :class:`reid_jax.explain.RankingExplanation`).
    steered_distances: float32 ``[G]`` ``|P q - P g|^2`` of every gallery image (GEMM form, as
      the AP pass ranks), kept or not.
    plain_distances: float32 ``[G]`` the unsteered ``|q - g|^2`` (GEMM form).
    """

    indices: np.ndarray
    distances: np.ndarray
    attributes_query: np.ndarray
    attributes_gallery: np.ndarray
    selected: np.ndarray
    scores: np.ndarray
    errors: np.ndarray
    remainder: np.ndarray
    steered_distances: np.ndarray
    plain_distances: np.ndarray


@functools.partial(jax.jit, static_argnames=("count",))
def _candidates(fq, fg, g2, zg, w, basis, coeffs, ignore, keep, *, count):
    """The ``count`` nearest kept images of one query ``fq [N]`` by steered distance, and the
    projected embeddings of the query and the candidates."""
    qg = _dot(fg, fq)  # [G]: a matrix-vector product (twice as fast here as fq @ fg.T)
    plain = jnp.sum(jnp.square(fq)) + g2 - 2.0 * qg
    cq, cg = _corrections(fq[None], zg, w, coeffs, ignore)
    steered = jnp.maximum(plain - jnp.sum(jnp.square(cq - cg), -1), 0.0)
    plain = jnp.maximum(plain, 0.0)
    neg, idx = jax.lax.top_k(-jnp.where(keep, steered, jnp.inf), count)
    order = jnp.argsort(idx)  # gallery order: the kernels' ties then go to the lower index
    idx, valid = idx[order], jnp.isfinite(neg)[order]
    g = fg[idx]
    xq = jax.nn.sigmoid(_dot(fq, w))
    xg = jax.nn.sigmoid(zg[idx])
    return (idx, valid, _project(fq, basis), _project(g, basis), xq, xg, steered, plain)


def steer_ranking(f_query: Array, f_gallery: Array | PreparedGallery, weights: Array, *,
                  ignore: Array, keep: Array | None = None, k: int = 10,
                  threshold=kernels.DEFAULT_THRESHOLD, complete: bool = False,
                  mode: str | None = None,
                  projection: IgnoreProjection | None = None,
                  calibration: Calibration | None = None) -> SteeredRanking:
    """Ranks the kept gallery images for one query by the steered distance; explains the top k.

    1. The steered distance of every gallery image (as :func:`steered_distances`, one
       matrix-vector pass over the gallery); the ``k + 8`` nearest kept ones are the
       candidates.
    2. Their projected embeddings and the projected query go through
       :func:`reid_jax.explain.explain_rankings`: directly computed distances, the ranking
       (ties: lower gallery index first), and the error composition of ``P q - P g``
       (or the explanation of ``mode``; ``complete``: it sums to the steered distance).
    3. Probabilities, confident attributes (:func:`reid_jax.explain.confident_attributes`) and
       matching scores (:func:`reid_jax.explain.matching_scores`) of the unprojected embeddings.

    Args:
      f_query: ``[N]`` one query embedding.
      f_gallery: ``[G, N]``, or its :class:`PreparedGallery` (kept on the device by a server).
      weights: ``W [N, A]``.
      ignore: bool ``[A]`` attributes whose span is removed (all False: no projection).
      keep: bool ``[G]`` gallery images that may be ranked (protocol and
        :func:`attribute_filter`); None: all.
      k: ranks to return, ``>= 1``.  threshold: scalar or ``[A]`` in ``[0, 0.5)``.
      complete: the complete decomposition instead of eq. 3.2.
      mode: one of :data:`reid_jax.explain.MODES` (as in
        :func:`reid_jax.explain.explain_rankings`); default: by ``complete``.
      projection: :func:`ignore_projection` of ``ignore`` when the caller keeps it.
      calibration: the head's, read by the ``disagreement`` mode.

    Returns:
      :class:`SteeredRanking` (host arrays); fewer than ``k`` ranks when fewer images are kept.
    """
    if jnp.ndim(f_query) != 1:
        raise ValueError(f"f_query must be one embedding [N], got shape {_shape(f_query)}")
    gallery = _gallery(f_gallery, weights)
    _check_embeddings(f_query, gallery.embeddings, weights)
    _, a = _check_weights_mask(weights, ignore, "ignore")
    projection = _projection(weights, ignore, projection)
    g = _shape(gallery.embeddings)[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    kernels.check_threshold(threshold, a)
    mode = kernels.resolve_mode(complete, mode)
    keep = jnp.ones((g,), bool) if keep is None else keep
    if _shape(keep) != (g,):
        raise ValueError(f"keep must be bool [G={g}] (one per gallery image), got shape "
                         f"{_shape(keep)}")
    w = jnp.asarray(weights, jnp.float32)
    count = int(min(k + CANDIDATE_MARGIN, g))
    idx, valid, pq, pg, xq, xg, steered, plain = _candidates(
        jnp.asarray(f_query, jnp.float32), *gallery, w, *projection, _bool(keep), count=count)
    out = kernels.explain_rankings(pq, pg, w, k=count, threshold=threshold, mode=mode,
                                   mesh=None, calibration=calibration)
    position = np.asarray(out.indices)  # [count] candidate positions, nearest first
    ranks = np.flatnonzero(np.asarray(valid)[position])[:k]  # ranks holding kept images
    chosen = position[ranks]
    xq = np.asarray(xq)
    xg = np.asarray(xg)[chosen]
    selected = np.asarray(kernels.confident_attributes(xq, threshold))
    scores = (np.asarray(kernels.matching_scores(xq, xg)) if chosen.size
              else np.zeros((0, a), np.float32))
    return SteeredRanking(
        indices=np.asarray(idx)[chosen].astype(np.int64),
        distances=np.asarray(out.distances)[ranks],
        attributes_query=xq, attributes_gallery=xg, selected=selected, scores=scores,
        errors=np.asarray(out.errors)[ranks], remainder=np.asarray(out.remainder)[ranks],
        steered_distances=np.asarray(steered), plain_distances=np.asarray(plain))


__all__ = [
    "CANDIDATE_MARGIN", "IgnoreProjection", "PreparedGallery", "SteeredRanking", "Steering",
    "attribute_filter", "ignore_basis", "ignore_projection", "no_steering", "parse_steering",
    "prepare_gallery", "project", "projection_matrix", "steer_ranking", "steered_distances",
]
