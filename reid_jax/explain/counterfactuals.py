"""The counterfactual benchmark: gallery persons re-rendered with one attribute changed, and
whether an explanation points at the change (``docs/design.md``, "Explanations measured").

* :func:`ranked_pairs` — the (query, gallery) pairs a user looks at: every query's true matches
  and its ``k`` best-ranked labelled gallery images (Market-1501 protocol, ``reid_jax.retrieval``).
* :func:`make_counterfactuals` — re-renders gallery images of those pairs with one attribute
  changed, round-robin over attributes, keeping only visible changes.
* :func:`pair_separations` — every explanation's "this attribute separates q and g" score.
* :func:`counterfactual_metrics` — the hit rates (``reid_jax.explain.metrics``) of every
  separation and of the prior on the pairs of every counterfactual, with 95 % intervals by a
  bootstrap over the counterfactual images (``reid_jax.explain.bootstrap``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from reid_jax import explain, interrupts, retrieval, synthetic
from reid_jax.data.attributes import ATTRIBUTE_NAMES, NUM_ATTRIBUTES
from reid_jax.explain import bootstrap
from reid_jax.explain import metrics as em
from reid_jax.explain.table import HIT_RANKS, MODES
from reid_jax.models.attribute_head import Calibration, head_probabilities
from reid_jax.synthetic.render import blur_radius

DEFAULT_K = 10
DEFAULT_NUM_COUNTERFACTUALS = 900
DEFAULT_MIN_CHANGED_PIXELS = 64
DEFAULT_PIXEL_TOLERANCE = 25
# Binary attributes are toggled; the others (colours, age groups) are set to 1.
_TOGGLED = ("backpack", "bag", "handbag", "clothes", "down", "up", "hair", "hat", "gender")
_ORIGINALS_CACHED = 512  # original renders kept for the visibility test (LRU)


# ---------------------------------------------------------------------------------------------
# Pairs.


class CandidatePairs(NamedTuple):
    """Query/gallery pairs of the counterfactual test, sorted by (query, gallery).

    Attributes:
      query: int ``[P]`` query indices.
      gallery: int ``[P]`` gallery indices.
      true_match: bool ``[P]``, same identity (another camera).
    """

    query: np.ndarray
    gallery: np.ndarray
    true_match: np.ndarray


def ranked_pairs(f_query: Any, f_gallery: Any, query_pids: Any, query_cams: Any,
                 gallery_pids: Any, gallery_cams: Any, k: int = DEFAULT_K, *,
                 query_chunk: int = 256) -> CandidatePairs:
    """Every query's true matches and its ``k`` best-ranked gallery images.

    Ranking: squared Euclidean distance of ``f_query [Q, N]`` and ``f_gallery [G, N]``, the
    Market-1501 protocol (gallery images with the query's pid *and* camera left out).  Only
    gallery images of labelled identities (pid > 0) take part: distractors (0) and junk (-1)
    are neither ranked here nor paired.  True matches are all gallery images with the query's
    pid from another camera, ranked or not.

    Returns:
      :class:`CandidatePairs`, one row per distinct pair.
    """
    fq = np.asarray(f_query, np.float32)
    fg = np.asarray(f_gallery, np.float32)
    if fq.ndim != 2 or fg.ndim != 2 or fq.shape[1] != fg.shape[1]:
        raise ValueError(f"f_query [Q, N] and f_gallery [G, N] must share N, got {fq.shape}, "
                         f"{fg.shape}")
    qp, qc = np.asarray(query_pids), np.asarray(query_cams)
    gp, gc = np.asarray(gallery_pids), np.asarray(gallery_cams)
    if qp.shape != (fq.shape[0],) or qc.shape != qp.shape:
        raise ValueError(f"query_pids/query_cams must have shape ({fq.shape[0]},), got "
                         f"{qp.shape}, {qc.shape}")
    if gp.shape != (fg.shape[0],) or gc.shape != gp.shape:
        raise ValueError(f"gallery_pids/gallery_cams must have shape ({fg.shape[0]},), got "
                         f"{gp.shape}, {gc.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    queries, galleries = [], []
    for start, stop, d in retrieval.distance_chunks(fq, fg, query_chunk):
        # The protocol, and no image without labels (distractors) in the ranking.
        excluded = (retrieval.excluded(qp[start:stop, None], qc[start:stop, None], gp[None, :],
                                       gc[None, :]) | (gp[None, :] == retrieval.DISTRACTOR_PID))
        d = np.where(excluded, np.inf, d)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        for row in range(stop - start):
            ranked = order[row][np.isfinite(d[row, order[row]])]
            matches = np.flatnonzero(~excluded[row] & (gp == qp[start + row]))
            chosen = np.union1d(ranked, matches)
            queries.append(np.full(chosen.size, start + row, np.int64))
            galleries.append(chosen.astype(np.int64))
    q = np.concatenate(queries) if queries else np.zeros(0, np.int64)
    g = np.concatenate(galleries) if galleries else np.zeros(0, np.int64)
    return CandidatePairs(q, g, gp[g] == qp[q])


# ---------------------------------------------------------------------------------------------
# Counterfactual images.


@dataclasses.dataclass(frozen=True)
class Counterfactual:
    """A gallery image re-rendered with one attribute changed.

    Attributes:
      gallery_index: index into the gallery split.
      attribute: index into ``ATTRIBUTE_NAMES`` of the attribute asked to change.
      value: ``None`` (toggled) or 1 (set).
      labels_before, labels_after: uint8 ``[A]`` ground-truth labels of the person before and
        after the change.
      changed_pixels: pixels that changed visibly inside the attribute's region.
      jpeg: the counterfactual image as the dataset stores images (JPEG bytes).
      part_labels: uint8 ``[H, W]`` region labels of the re-render, as the generator writes
        them to ``masks/`` for the stored images (``reid_jax.synthetic.labels_to_regions``
        turns them into attribute regions; docs/attribute_maps.md, 'Part masks'); None when
        not rendered.
      changed_region: bool ``[H, W]``: where the change may alter pixels (the attribute's parts
        in both renders, dilated by the blur radius: ``synthetic.attribute_region``); None
        when not rendered.
    """

    gallery_index: int
    attribute: int
    value: int | None
    labels_before: np.ndarray
    labels_after: np.ndarray
    changed_pixels: int
    jpeg: bytes
    part_labels: np.ndarray | None = None
    changed_region: np.ndarray | None = None

    @property
    def changed_labels(self) -> np.ndarray:
        """bool ``[A]``: the labels the change flipped (includes ``attribute``)."""
        return self.labels_before != self.labels_after


def planned_value(labels: np.ndarray, attribute: int) -> tuple[bool, int | None]:
    """``(possible, value)``: how ``attribute`` of a person with ``labels [A]`` is changed.

    Binary attributes are toggled (``value=None``); a colour or age group is set to 1, which is
    only a change when its label is 0 (``possible=False`` otherwise).  Neither needs the
    generator's random choice, so the labels after the change are known.
    """
    name = ATTRIBUTE_NAMES[attribute]
    if name in _TOGGLED:
        return True, None
    return (not bool(labels[attribute])), 1


class CounterfactualSet(NamedTuple):
    """What :func:`make_counterfactuals` made.

    Attributes:
      accepted: the kept counterfactuals, in the order they were made.
      tried: int ``[A]`` changes rendered per attribute.
      rejected: int ``[A]`` changes rejected as barely visible.
      candidates: int ``[A]`` gallery images on which the attribute could be changed.
    """

    accepted: list[Counterfactual]
    tried: np.ndarray
    rejected: np.ndarray
    candidates: np.ndarray


def _changed_pixels(before: np.ndarray, after: np.ndarray, region: np.ndarray,
                    tolerance: int) -> int:
    diff = np.abs(after.astype(np.int16) - before.astype(np.int16)).max(axis=-1)
    return int(np.sum((diff > tolerance) & region))


class _Renders:
    """Re-renders of gallery images, computed ahead of need in ``workers`` processes.

    :func:`make_counterfactuals` asks for renders in a fixed order and judges each alone, so
    rendering the next ones while it judges the current changes nothing it decides; with
    ``workers == 0`` every render is made when it is asked for.
    """

    def __init__(self, dataset_dir: str | os.PathLike, gallery_files: Sequence[str],
                 workers: int):
        # Functions of reid_jax.synthetic (no JAX): what a worker process imports to run them.
        render = functools.partial(synthetic.render_counterfactual, os.fspath(dataset_dir),
                                   jpeg=False, return_masks=True)
        self._original = render  # -> (image, masks)
        self._changed = functools.partial(render, return_labels=True)  # + region labels
        self._files = gallery_files
        self._pending: dict[tuple[int, str | None, Any], futures.Future] = {}
        self._pool = (futures.ProcessPoolExecutor(workers,
                                                  mp_context=multiprocessing.get_context("spawn"))
                      if workers > 0 else None)

    def _call(self, g: int, attribute: str | None, value: Any) -> tuple[Callable, tuple]:
        fn = self._original if attribute is None else self._changed
        return fn, (self._files[g], attribute, value)

    def ahead(self, g: int, attribute: str | None, value: Any = None) -> None:
        """Starts the render of gallery image ``g`` with ``attribute`` set to ``value`` (None:
        the original)."""
        key = (g, attribute, value)
        if self._pool is not None and key not in self._pending:
            fn, args = self._call(g, attribute, value)
            with interrupts.workers_ignore_ctrl_c():  # workers start on submission
                self._pending[key] = self._pool.submit(fn, *args)

    def get(self, g: int, attribute: str | None, value: Any = None) -> tuple[Any, ...]:
        """The render, started ahead or made now: ``(image, masks)`` of the original,
        ``(image, masks, labels)`` of a change."""
        future = self._pending.pop((g, attribute, value), None)
        if future is not None:
            return future.result()
        fn, args = self._call(g, attribute, value)
        return fn(*args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pending.clear()


def make_counterfactuals(
    dataset_dir: str | os.PathLike,
    gallery_files: Sequence[str],
    gallery_indices: Sequence[int],
    num_counterfactuals: int,
    *,
    seed: int = 0,
    min_changed_pixels: int = DEFAULT_MIN_CHANGED_PIXELS,
    pixel_tolerance: int = DEFAULT_PIXEL_TOLERANCE,
    workers: int = 0,
) -> CounterfactualSet:
    """Re-renders gallery images with one attribute changed, round-robin over attributes.

    Args:
      dataset_dir: a synthetic data root (holding ``synthetic_meta.json``).
      gallery_files: the gallery split's file paths (or base names), indexed by
        ``gallery_indices``.
      gallery_indices: the gallery images that may be changed (each shows a person).
      num_counterfactuals: how many to keep (fewer when the candidates run out).
      seed: seeds the order of attributes and images.
      min_changed_pixels: a change is kept when at least this many pixels change visibly.
      pixel_tolerance: a pixel changes visibly when a channel moves by more than this (0..255,
        before JPEG).
      workers: processes that render ahead of the test (0: render in this process); the
        result is the same for any number.

    Returns:
      :class:`CounterfactualSet`.
    """
    if num_counterfactuals < 0:
        raise ValueError(f"num_counterfactuals must be >= 0, got {num_counterfactuals}")
    if min_changed_pixels < 0 or not 0 <= pixel_tolerance < 255:
        raise ValueError(f"min_changed_pixels must be >= 0 and pixel_tolerance in [0, 255), got "
                         f"{min_changed_pixels}, {pixel_tolerance}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    meta = synthetic.load_meta(dataset_dir)
    quality = int(meta["config"]["jpeg_quality"])
    a_count = NUM_ATTRIBUTES
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    indices = np.unique(np.asarray(gallery_indices, np.int64))
    labels: dict[int, np.ndarray] = {}
    radius: dict[int, int] = {}
    for g in indices.tolist():
        try:
            person, scene, _ = synthetic.image_record(dataset_dir, gallery_files[g])
        except KeyError as e:
            raise ValueError(f"{synthetic.META_FILE} of {dataset_dir} does not describe the "
                             f"gallery image {gallery_files[g]} (was the data root changed "
                             "after it was generated?)") from e
        if person is None:
            raise ValueError(f"{os.path.basename(gallery_files[g])} shows no person; it cannot "
                             "be changed")
        labels[g] = synthetic.person_labels(person)
        radius[g] = blur_radius(scene)
    candidates = []
    for a in range(a_count):
        possible = [g for g in indices.tolist() if planned_value(labels[g], a)[0]]
        candidates.append([possible[i] for i in rng.permutation(len(possible))])
    attribute_order = rng.permutation(a_count)
    next_candidate = np.zeros(a_count, np.int64)
    tried = np.zeros(a_count, np.int64)
    rejected = np.zeros(a_count, np.int64)
    originals: collections.OrderedDict[int, tuple[np.ndarray, dict[str, np.ndarray]]] = (
        collections.OrderedDict())

    renders = _Renders(dataset_dir, gallery_files, workers)

    def original(g: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if g in originals:
            originals.move_to_end(g)
            return originals[g]
        image, masks = renders.get(g, None)
        originals[g] = (image, {part: m > 0 for part, m in masks.items()})
        if len(originals) > _ORIGINALS_CACHED:
            originals.popitem(last=False)
        return originals[g]

    def ahead(a: int) -> None:  # the next candidate of attribute a, and its original
        if next_candidate[a] < len(candidates[a]):
            g = candidates[a][next_candidate[a]]
            if g not in originals:
                renders.ahead(g, None)
            renders.ahead(g, ATTRIBUTE_NAMES[a], planned_value(labels[g], a)[1])

    accepted: list[Counterfactual] = []
    try:
        while len(accepted) < num_counterfactuals:
            progressed = False
            # This round's first candidates, as many as are still wanted.
            for a in attribute_order.tolist()[:num_counterfactuals - len(accepted)]:
                ahead(a)
            for a in attribute_order.tolist():
                if len(accepted) >= num_counterfactuals:
                    break
                name = ATTRIBUTE_NAMES[a]
                while next_candidate[a] < len(candidates[a]):
                    g = candidates[a][next_candidate[a]]
                    next_candidate[a] += 1
                    progressed = True
                    _, value = planned_value(labels[g], a)
                    before, masks_before = original(g)
                    after, masks_after, part_labels = renders.get(g, name, value)
                    tried[a] += 1
                    region = synthetic.attribute_region(masks_before, masks_after, name, radius[g])
                    changed = _changed_pixels(before, after, region, pixel_tolerance)
                    if changed < min_changed_pixels:
                        rejected[a] += 1
                        continue
                    person, _, _ = synthetic.image_record(dataset_dir, gallery_files[g])
                    labels_after = synthetic.person_labels(
                        synthetic.change_attribute(person, name, value))
                    accepted.append(Counterfactual(
                        gallery_index=int(g), attribute=int(a), value=value,
                        labels_before=labels[g], labels_after=labels_after,
                        changed_pixels=changed, jpeg=synthetic.encode_jpeg(after, quality),
                        part_labels=part_labels, changed_region=region))
                    break
            if not progressed:
                break
    finally:
        renders.close()
    return CounterfactualSet(accepted, tried, rejected,
                             np.asarray([len(c) for c in candidates], np.int64))


# ---------------------------------------------------------------------------------------------
# Per-pair separations: e_a (eq. 3.2, either mode), the projection contributions, 1 - s_a
# (eq. 3.1), the disagreement probability, or the fixed prior.


@jax.jit
def _probabilities(f: jax.Array, w: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(f @ w)


@jax.jit
def _pair_scores(xq: jax.Array, xg: jax.Array) -> jax.Array:
    return jax.vmap(lambda a, b: explain.matching_scores(a, b[None])[0])(xq, xg)


@jax.jit
def _pair_disagreement(xq: jax.Array, xg: jax.Array) -> jax.Array:
    return jax.vmap(lambda a, b: explain.disagreement_probabilities(a, b[None])[0])(xq, xg)


@jax.jit
def _pair_errors(fq: jax.Array, fg: jax.Array, w: jax.Array) -> jax.Array:
    return jax.vmap(lambda q, g: explain.attribute_errors(q, g[None], w, method="direct")[0])(
        fq, fg)


@jax.jit
def _pair_projection(fq: jax.Array, fg: jax.Array, w: jax.Array) -> jax.Array:
    return jax.vmap(lambda q, g: explain.projection_contributions(q, g[None], w)[0][0])(fq, fg)


def pair_separations(f_query: Any, f_gallery: Any, weights: Any, mode: str, *,
                     prior: Any | None = None, chunk: int = 4096,
                     calibration: Calibration | None = None) -> np.ndarray:
    """The explanation's "this attribute separates q and g" score of row-aligned pairs.

    Args:
      f_query, f_gallery: ``[P, N]``, row ``i`` is one pair.
      weights: ``[N, A]`` attribute weights ``W``.
      mode: one of ``metrics.MODES``: ``"paper"``: ``e_a`` of eq. 3.2
        (``reid_jax.explain.attribute_errors``, direct form); ``"complete"``: the complete
        decomposition; ``"projection"``: the projection contributions
        (``reid_jax.explain.projection_contributions``); ``"scores"``: ``1 - s_a`` with ``s_a``
        eq. 3.1 of ``x = sigmoid(f @ W)``; ``"disagreement"``: the probability that the labels
        differ (of the ``calibration``'s probabilities where one is given); ``"prior"``:
        ``prior`` on every row.
      prior: ``[A]``, for ``mode="prior"``.
      chunk: pairs per kernel call.

    Returns:
      float32 ``[P, A]``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fq = np.asarray(f_query, np.float32)
    fg = np.asarray(f_gallery, np.float32)
    w = jnp.asarray(weights, jnp.float32)
    if fq.shape != fg.shape or fq.ndim != 2 or w.ndim != 2 or w.shape[0] != fq.shape[1]:
        raise ValueError(f"expected f_query [P, N], f_gallery [P, N], weights [N, A]; got "
                         f"{fq.shape}, {fg.shape}, {w.shape}")
    if mode == "prior":
        if prior is None or np.shape(prior) != (w.shape[1],):
            raise ValueError(f"mode='prior' needs prior of shape ({w.shape[1]},), got "
                             f"{None if prior is None else np.shape(prior)}")
        return np.broadcast_to(np.asarray(prior, np.float32), (fq.shape[0], w.shape[1])).copy()
    if mode == "complete":
        w = explain.complete_weights(w)
    parts = []
    for lo in range(0, fq.shape[0], chunk):
        q, g = jnp.asarray(fq[lo:lo + chunk]), jnp.asarray(fg[lo:lo + chunk])
        if mode == "scores":
            parts.append(1.0 - _pair_scores(_probabilities(q, w), _probabilities(g, w)))
        elif mode == "disagreement":
            parts.append(_pair_disagreement(head_probabilities(q @ w, calibration),
                                            head_probabilities(g @ w, calibration)))
        elif mode == "projection":
            parts.append(_pair_projection(q, g, w))
        else:
            parts.append(_pair_errors(q, g, w))
    if not parts:
        return np.zeros((0, w.shape[1]), np.float32)
    return np.asarray(jnp.concatenate(parts), np.float32)


# ---------------------------------------------------------------------------------------------
# (1) Counterfactual hit rate.


def _per_attribute(result: dict[str, Any], key: str) -> list[Any]:
    return [result["per_attribute"][n][key] for n in ATTRIBUTE_NAMES]


def counterfactual_metrics(
    f_query: Any,
    f_gallery: Any,
    f_counterfactual: Any,
    weights: Any,
    counterfactuals: Sequence[Counterfactual],
    pairs: CandidatePairs,
    labels_query: Any,
    valid_query: Any | None = None,
    *,
    prior: Any | None = None,
    bootstrap_samples: int = bootstrap.DEFAULT_SAMPLES,
    seed: int = 0,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """Hit rates of the counterfactuals for every separation (module docstring, part 1).

    The ``prior`` explanation ranks the attributes of every pair by the same fixed ``prior``:
    it has no rise, so its ranking itself is scored (a hit: a changed attribute among its top
    ``m``).  Every rate comes with a 95 % interval by a bootstrap over the counterfactual
    images (all pairs of one image are resampled together; ``bootstrap_samples`` replicates
    seeded by ``seed``, the same for every separation).

    Args:
      f_query: ``[Q, N]``; f_gallery: ``[G, N]`` embeddings of the dataset files.
      f_counterfactual: ``[C, N]`` embeddings of ``counterfactuals`` (same order).
      weights: ``[N, A]``.
      counterfactuals: from :func:`make_counterfactuals`.
      pairs: from :func:`ranked_pairs`; each counterfactual is paired with every query its
        gallery image is paired with.
      labels_query: ``[Q, A]`` ground-truth labels of the queries.
      valid_query: bool ``[Q]``, queries with labels (default all).
      prior: ``[A]`` the prior's separation (default: the prior is left out).
      calibration: the head's, for the ``disagreement`` separation (:func:`pair_separations`).

    Returns:
      ``{"num_pairs", "num_true_match_pairs", "num_away_pairs", <mode>: {"top1", "top3",
      "mean_rank", "intervals": {"top1", "top3"}}, "chance": {...}, "subsets": {...},
      "per_attribute": {...}}``; see :func:`reid_jax.explain.metrics.counterfactual_hit_rate`
      for the definitions.
    """
    fq = np.asarray(f_query, np.float32)
    fg = np.asarray(f_gallery, np.float32)
    fc = np.asarray(f_counterfactual, np.float32)
    if fc.shape != (len(counterfactuals), fg.shape[1]):
        raise ValueError(f"f_counterfactual must have shape [{len(counterfactuals)}, "
                         f"{fg.shape[1]}], got {fc.shape}")
    lq = np.asarray(labels_query)
    vq = np.ones(fq.shape[0], bool) if valid_query is None else np.asarray(valid_query, bool)
    by_gallery: dict[int, list[int]] = collections.defaultdict(list)
    for i, g in enumerate(pairs.gallery.tolist()):
        if vq[pairs.query[i]]:
            by_gallery[g].append(i)
    rows_q, rows_c, rows_true = [], [], []
    for c, cf in enumerate(counterfactuals):
        for i in by_gallery.get(cf.gallery_index, ()):
            rows_q.append(int(pairs.query[i]))
            rows_c.append(c)
            rows_true.append(bool(pairs.true_match[i]))
    if not rows_q:
        raise ValueError("no query is paired with a counterfactual gallery image")
    q = np.asarray(rows_q)
    c = np.asarray(rows_c)
    true_match = np.asarray(rows_true)
    attribute = np.asarray([cf.attribute for cf in counterfactuals])[c]
    before = np.stack([cf.labels_before for cf in counterfactuals])[c]
    changed = np.stack([cf.changed_labels for cf in counterfactuals])[c]
    gallery = np.asarray([cf.gallery_index for cf in counterfactuals])[c]
    rows = np.arange(q.size)
    # The counterfactual moves away from the query when the original agrees with it.
    away = lq[q, attribute] == before[rows, attribute]

    out: dict[str, Any] = {"num_pairs": int(q.size),
                           "num_true_match_pairs": int(true_match.sum()),
                           "num_away_pairs": int(away.sum())}
    subsets = {"true_match": true_match, "false_match": ~true_match,
               "away": away, "towards": ~away}
    subset_out: dict[str, dict[str, Any]] = {
        name: {"num_pairs": int(mask.sum())} for name, mask in subsets.items()}
    per_attribute: dict[str, list[Any]] = {}
    counts = bootstrap.resample_counts(len(counterfactuals), bootstrap_samples, seed)
    modes = [m for m in MODES if m != "prior" or prior is not None]
    for mode in modes:
        if mode == "prior":  # a fixed order: its own ranking is scored
            far = pair_separations(fq[q], fg[gallery], weights, mode, prior=prior)
            near = np.zeros_like(far)
        else:
            s_orig = pair_separations(fq[q], fg[gallery], weights, mode,
                                      calibration=calibration)
            s_cf = pair_separations(fq[q], fc[c], weights, mode, calibration=calibration)
            near = np.where(away[:, None], s_orig, s_cf)
            far = np.where(away[:, None], s_cf, s_orig)
        res = em.counterfactual_hit_rate(near, far, attribute, changed, top=HIT_RANKS,
                                         return_rows=True)
        out[mode] = {**{f"top{m}": res[f"top{m}"] for m in HIT_RANKS},
                     "mean_rank": res["mean_rank"],
                     "intervals": {f"top{m}": bootstrap.ratio_interval(
                         *bootstrap.grouped_means(res["rows"][f"top{m}"], c,
                                                  len(counterfactuals)), counts)
                         for m in HIT_RANKS}}
        if mode == modes[0]:
            out["chance"] = res["chance"]
            per_attribute["pairs"] = _per_attribute(res, "count")
        for m in HIT_RANKS:
            per_attribute[f"{mode}_top{m}"] = _per_attribute(res, f"top{m}")
        for name, mask in subsets.items():
            if mask.any():
                sub = em.counterfactual_hit_rate(near[mask], far[mask], attribute[mask],
                                                 changed[mask], top=(1,))
                subset_out[name][f"{mode}_top1"] = sub["top1"]
                if mode == modes[0]:
                    subset_out[name]["chance_top1"] = sub["chance"]["top1"]
            else:
                subset_out[name][f"{mode}_top1"] = None
    out["subsets"] = subset_out
    out["per_attribute"] = per_attribute
    return out


__all__ = [
    "DEFAULT_K", "DEFAULT_MIN_CHANGED_PIXELS", "DEFAULT_NUM_COUNTERFACTUALS",
    "DEFAULT_PIXEL_TOLERANCE", "CandidatePairs", "Counterfactual", "CounterfactualSet",
    "counterfactual_metrics", "make_counterfactuals", "pair_separations", "planned_value",
    "ranked_pairs",
]
