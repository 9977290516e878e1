"""Explanation quality over whole galleries: AMD and the matching-score AUROC for every
query x gallery pair, streamed in blocks (:func:`streamed_amd_over_gallery`), and for the pairs a
user looks at, the top-``k`` ranks under the Market-1501 protocol (:func:`amd_over_top_k`).

The metrics themselves, their tie rule and their baselines are in
:mod:`reid_jax.explain.metrics` (``docs/design.md``, "Explanations measured"); this module feeds
them the separations of each explanation mode, computed by the kernels block by block, so a
``[Q, G, A]`` tensor is never formed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reid_jax import explain, retrieval
from reid_jax.explain.metrics import (
    SCORE_MODES,
    AmdAccumulator,
    AurocAccumulator,
    amd_sums,
    check_binary,
    check_finite_array,
    check_mode,
    matching_score_auroc,
)
from reid_jax.models.attribute_head import Calibration, head_probabilities


def _check_labels(f_query, f_gallery, weights, labels_query, labels_gallery, valid_query,
                  valid_gallery) -> tuple[np.ndarray, ...]:
    q, g = jnp.shape(f_query)[0], jnp.shape(f_gallery)[0]
    if jnp.ndim(f_query) != 2 or jnp.ndim(f_gallery) != 2 or jnp.ndim(weights) != 2:
        raise ValueError(f"expected f_query [Q, N], f_gallery [G, N], weights [N, A]; got "
                         f"{jnp.shape(f_query)}, {jnp.shape(f_gallery)}, {jnp.shape(weights)}")
    a = jnp.shape(weights)[1]
    lq = check_binary("labels_query", labels_query, (q, a))
    lg = check_binary("labels_gallery", labels_gallery, (g, a))
    vq = np.ones(q, bool) if valid_query is None else check_binary("valid_query", valid_query, (q,))
    vg = (np.ones(g, bool) if valid_gallery is None
          else check_binary("valid_gallery", valid_gallery, (g,)))
    return lq, lg, vq, vg


@functools.partial(jax.jit, static_argnames=("block",))
def _chunk_sums(sep, lq, lg, vq, vg, *, block):
    """All pairs of a query chunk: ``sep [q, G, A]``, labels ``[q, A]``/``[G, A]``; the sums
    and, per query of the chunk, the sums of :data:`GROUP_KEYS` (``[q]`` each)."""
    q, g, a = sep.shape
    diff = lq[:, None, :] != lg[None, :, :]
    valid = vq[:, None] & vg[None, :]
    sums, per_pair = amd_sums(sep.reshape(q * g, a), diff.reshape(q * g, a),
                               valid.reshape(q * g), block=block)
    return sums, jax.tree.map(lambda x: jnp.sum(x.reshape(q, g), axis=1), per_pair)


def _check_thresholds(thresholds: Sequence[Any], num_attributes: int, mode: str) -> list[Any]:
    """``extra_thresholds`` validated (the kernels' one range check) before any work."""
    thresholds = list(thresholds)
    if thresholds and mode not in SCORE_MODES:
        raise ValueError(f"extra_thresholds select entries of the matching-score AUROC: they "
                         f"apply to modes {SCORE_MODES} only, got mode={mode!r}")
    for t in thresholds:
        explain.check_threshold(np.asarray(t, np.float64), num_attributes)
    return thresholds


def _check_prior(prior: Any, mode: str, num_attributes: int) -> np.ndarray | None:
    if mode != "prior":
        if prior is not None:
            raise ValueError(f"prior applies to mode='prior' only, got mode={mode!r}")
        return None
    if prior is None:
        raise ValueError("mode='prior' needs prior: one separation per attribute [A] "
                         "(reid_jax.explain.baselines)")
    p = check_finite_array("prior", np.asarray(prior, np.float64))
    if p.shape != (num_attributes,):
        raise ValueError(f"prior must have shape ({num_attributes},), got {p.shape}")
    return p


def _auroc_groups(acc: AurocAccumulator) -> dict[str, Any]:
    return {"pooled": acc.group_pooled, "attribute": acc.group_attribute}


def streamed_amd_over_gallery(
    f_query: Any,
    f_gallery: Any,
    weights: Any,
    labels_query: Any,
    labels_gallery: Any,
    mode: str = "paper",
    *,
    valid_query: Any | None = None,
    valid_gallery: Any | None = None,
    threshold: Any = explain.DEFAULT_THRESHOLD,
    extra_thresholds: Sequence[Any] = (),
    prior: Any | None = None,
    query_chunk: int = 32,
    gallery_chunk: int = 1024,
    block: int = 4096,
    names: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """AMD metrics of one explanation over **all** query x gallery pairs, streamed.

    Queries are processed ``query_chunk`` at a time: the separation scores of the chunk
    (``[query_chunk, G, A]``, on the device) come from :func:`reid_jax.explain.attribute_errors`
    (``mode="paper"``: eq. 3.2; ``"complete"``: its complete decomposition; ``"projection"``:
    the projection contributions), :func:`reid_jax.explain.matching_scores` (``"scores"``:
    ``1 - s_a``, eq. 3.1), :func:`reid_jax.explain.disagreement_probabilities`
    (``"disagreement"``) or are the fixed ``prior`` (``"prior"``), and are reduced to sums on
    the device; only the sums travel to the host.  Memory is bounded by the chunk (AMD's
    reference code needs all ``Q x G x A`` at once).

    Args:
      f_query: ``[Q, N]`` query embeddings (the ranked tensor).
      f_gallery: ``[G, N]`` gallery embeddings.
      weights: ``[N, A]`` attribute-layer weights ``W``.
      labels_query, labels_gallery: ``[Q, A]`` / ``[G, A]`` ground-truth labels in {0, 1}.
      mode: one of :data:`MODES`.
      valid_query, valid_gallery: optional bool masks of images with labels (pairs with an
        invalid side are ignored, e.g. distractors and junk).
      threshold: for the :data:`SCORE_MODES`, the confident-attribute threshold of the query
        (section 3.1) that selects the entries of the streamed AUROC of the mode's matching
        score (eq. 3.1's ``s_a``, or the agreement probability ``1 - P(differ)``).
      extra_thresholds: for the :data:`SCORE_MODES` only, further thresholds (scalar or
        ``[A]``) whose AUROC is accumulated in the same pass (e.g. ``0.0``: every attribute
        with ``x != 0.5``).
      prior: ``[A]`` the fixed separation of ``mode="prior"`` (required there, refused
        elsewhere).
      query_chunk, gallery_chunk: stream sizes (``gallery_chunk`` is passed to
        ``attribute_errors``).
      block: pairs per step of the AMD kernel.
      names: attribute names.
      progress: optional ``progress(queries_done, Q)`` callback, called after every chunk.

    Returns:
      :meth:`AmdAccumulator.result` plus ``"mode"``; for the :data:`SCORE_MODES` also
      ``"auroc"``, the :class:`AurocAccumulator` result for the selected entries of all pairs,
      and ``"extra_auroc"``: one such result per ``extra_thresholds`` entry, in order.  And
      ``"groups"`` (NumPy arrays, not JSON): per-query sums for a bootstrap over queries —
      ``"amd"`` (:meth:`AmdAccumulator.group_sums`) and ``"auroc"`` (per AUROC above, its
      per-query histograms ``{"pooled": (pos, neg), "attribute": (pos, neg)}``).

    Raises:
      ValueError: bad shapes, labels or thresholds; ``extra_thresholds`` or ``prior`` with a
        mode they do not apply to.
    """
    mode = check_mode(mode)
    lq, lg, vq, vg = _check_labels(f_query, f_gallery, weights, labels_query, labels_gallery,
                                   valid_query, valid_gallery)
    q, a = lq.shape
    if q == 0:
        raise ValueError(f"no queries: f_query has shape {jnp.shape(f_query)}")
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
    extra = _check_thresholds(extra_thresholds, a, mode)
    fixed = _check_prior(prior, mode, a)
    explain.check_finite(f_query=f_query, f_gallery=f_gallery, weights=weights)
    fq = jnp.asarray(f_query, jnp.float32)
    fg = jnp.asarray(f_gallery, jnp.float32)
    w = jnp.asarray(weights, jnp.float32)
    acc = AmdAccumulator(a, names=names, block=block, num_groups=q)
    aurocs = ([AurocAccumulator(a, names=names, num_groups=q) for _ in range(1 + len(extra))]
              if mode in SCORE_MODES else [])
    if mode in SCORE_MODES:
        z_gallery = fg @ w
        x_gallery = jax.nn.sigmoid(z_gallery)
        # The disagreement reads calibrated probabilities where the head has a calibration.
        p_gallery = head_probabilities(z_gallery, calibration)
    qc = min(int(query_chunk), q)
    g = lg.shape[0]
    lg_d, vg_d = jnp.asarray(lg), jnp.asarray(vg)
    for start in range(0, q, qc):
        stop = min(start + qc, q)
        pad = qc - (stop - start)  # the last chunk is padded to keep one compiled shape
        fq_c = jnp.pad(fq[start:stop], ((0, pad), (0, 0)))
        lq_c = jnp.asarray(np.pad(lq[start:stop], ((0, pad), (0, 0))))
        vq_c = jnp.asarray(np.pad(vq[start:stop], (0, pad)))
        if mode in SCORE_MODES:
            z_query = fq_c @ w
            x_query = jax.nn.sigmoid(z_query)
            if mode == "scores":
                scores = explain.matching_scores(x_query, x_gallery)  # [qc, G, A]
                sep = 1.0 - scores
            else:
                sep = explain.disagreement_probabilities(
                    head_probabilities(z_query, calibration), p_gallery)
                scores = 1.0 - sep
            pair_ok = vq_c[:, None] & vg_d[None, :]
            agree = lq_c[:, None, :] == lg_d[None, :, :]
            groups = np.broadcast_to((start + np.minimum(np.arange(qc), stop - start - 1))
                                     [:, None], (qc, g))
            for t, auroc_acc in zip([threshold, *extra], aurocs, strict=True):
                selected = explain.confident_attributes(x_query, t)
                auroc_acc.update(scores, agree, selected[:, None, :] & pair_ok[:, :, None],
                                 groups=groups)
        elif mode == "prior":
            sep = jnp.broadcast_to(jnp.asarray(fixed, jnp.float32), (qc, g, a))
        else:
            sep = explain.attribute_errors(fq_c, fg, w, mode=mode, gallery_chunk=gallery_chunk)
        sums, per_query = _chunk_sums(sep, lq_c, lg_d, vq_c, vg_d, block=acc.block)
        n = stop - start
        acc.add_sums(sums, {key: np.asarray(v)[:n] for key, v in per_query.items()}, start)
        if progress is not None:
            progress(stop, q)
    out = {"mode": mode, **acc.result()}
    if aurocs:
        out["auroc"] = aurocs[0].result()
        out["extra_auroc"] = [x.result() for x in aurocs[1:]]
    out["groups"] = {"amd": acc.group_sums(), "auroc": [_auroc_groups(x) for x in aurocs]}
    return out


def amd_over_top_k(
    f_query: Any,
    f_gallery: Any,
    weights: Any,
    labels_query: Any,
    labels_gallery: Any,
    mode: str = "paper",
    *,
    query_pids: Any,
    query_cams: Any,
    gallery_pids: Any,
    gallery_cams: Any,
    k: int = 10,
    valid_query: Any | None = None,
    valid_gallery: Any | None = None,
    threshold: Any = explain.DEFAULT_THRESHOLD,
    extra_thresholds: Sequence[Any] = (),
    prior: Any | None = None,
    gallery_chunk: int = 1024,
    names: Sequence[str] | None = None,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """AMD metrics of one explanation over the top-``k`` ranks of every query (the pairs a user
    looks at), from :func:`reid_jax.explain.explain_rankings`.

    The ranking is that of the report (``reid_jax.explain.run``): squared Euclidean distance
    over the whole gallery under the Market-1501 protocol — gallery images with the query's pid
    *and* camera and junk (pid -1) are removed (``reid_jax.retrieval``), distractors stay.  The
    kernel is asked for ``k + max(removed_counts)`` ranks so that ``k`` remain.  Pairs whose
    query or gallery image is not valid (e.g. a distractor without labels) are ignored, not
    replaced; a query with fewer than ``k`` kept images contributes fewer pairs.
    Same-identity pairs have no differing attribute and so count only in ``num_pairs``.

    Args:
      query_pids, query_cams: int ``[Q]``; gallery_pids, gallery_cams: int ``[G]``.
      k: ranks per query, ``1 <= k <= G``.
      extra_thresholds: for the :data:`SCORE_MODES`, further thresholds whose AUROC is
        computed on the same pairs (one ranking).
      Others: as :func:`streamed_amd_over_gallery`.

    Returns:
      :meth:`AmdAccumulator.result` plus ``"mode"`` and ``"k"``; for the :data:`SCORE_MODES`
      also ``"auroc"``: :func:`matching_score_auroc` (exact) over the selected entries of these
      pairs, and ``"extra_auroc"``: one such result per ``extra_thresholds`` entry; and
      ``"groups"`` as :func:`streamed_amd_over_gallery` has it.
    """
    mode = check_mode(mode)
    lq, lg, vq, vg = _check_labels(f_query, f_gallery, weights, labels_query, labels_gallery,
                                   valid_query, valid_gallery)
    q, a = lq.shape
    g = lg.shape[0]
    qp, qc, gp, gc = retrieval.check_ids(query_pids, query_cams, gallery_pids, gallery_cams,
                                         q, g)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= g:
        raise ValueError(f"k must be an integer in [1, G={g}] (f_gallery "
                         f"{tuple(jnp.shape(f_gallery))}), got {k!r}")
    extra = _check_thresholds(extra_thresholds, a, mode)
    fixed = _check_prior(prior, mode, a)
    fetch = int(min(g, k + int(retrieval.removed_counts(qp, qc, gp, gc).max(initial=0))))
    kernel_mode = mode if mode in explain.MODES else "paper"  # the ranking is the same
    ex = explain.explain_rankings(f_query, f_gallery, weights, k=fetch, threshold=threshold,
                                  mode=kernel_mode, gallery_chunk=gallery_chunk, validate=True,
                                  calibration=calibration)
    ranked = np.asarray(ex.indices)  # [Q, fetch]
    columns, ok = retrieval.first_kept(ranked, qp, qc, gp, gc, int(k))
    rows = np.arange(q)[:, None]
    idx = ranked[rows, columns].ravel()  # [Q * k]
    errors = np.asarray(ex.errors)[rows, columns].reshape(q * k, a)
    if mode == "scores":
        scores = np.asarray(ex.scores)[rows, columns].reshape(q * k, a)
        sep = 1.0 - scores
    elif mode == "disagreement":
        sep = errors
        scores = 1.0 - sep
    elif mode == "prior":
        sep = np.broadcast_to(fixed, (q * k, a))
    else:
        sep = errors
    pair_lq = np.repeat(lq, k, axis=0)
    pair_lg = lg[idx]
    valid = np.repeat(vq, k) & vg[idx] & ok.ravel()
    groups = np.repeat(np.arange(q), k)
    acc = AmdAccumulator(a, names=names, num_groups=q)
    out = {"mode": mode, "k": int(k),
           **acc.update(sep, pair_lq, pair_lg, valid, groups=groups).result()}
    grouped = []
    if mode in SCORE_MODES:
        x_query = np.asarray(ex.attributes_query)
        aurocs = []
        for i, t in enumerate([threshold, *extra]):
            chosen = np.asarray(ex.selected if i == 0
                                else explain.confident_attributes(x_query, t))
            selected = np.repeat(chosen, k, axis=0) & valid[:, None]
            agree = pair_lq == pair_lg
            aurocs.append(matching_score_auroc(scores, agree, selected, names=names))
            binned = AurocAccumulator(a, names=names, num_groups=q)
            grouped.append(_auroc_groups(binned.update(scores, agree, selected, groups=groups)))
        out["auroc"] = aurocs[0]
        out["extra_auroc"] = aurocs[1:]
    out["groups"] = {"amd": acc.group_sums(), "auroc": grouped}
    return out


__all__ = ["amd_over_top_k", "streamed_amd_over_gallery"]
