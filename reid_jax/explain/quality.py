"""Explanation quality measured on a dataset: the logic of ``tools/evaluate_explanations.py``.

The paper (Specker) shows its explanations; this module measures them on the test split of a
Market-1501-layout data root (issue 5, DESIGN.md §5), for both explanations of the ranking —
eq. 3.2 (``mode="paper"``) and its complete decomposition (``"complete"``) — and, where a
metric applies, for the matching scores of eq. 3.1 (``"scores"``: separation ``1 - s_a``).
The metric definitions live in :mod:`reid_jax.explain.metrics`; this module picks the pairs,
makes the counterfactual images and writes the results.

1. **Counterfactual hit rate** (synthetic data roots only, they hold ``synthetic_meta.json``).
   Pairs: every query with its true matches (same identity, another camera: the Market-1501
   protocol) and with its ``k`` best-ranked gallery images (protocol ranking; distractors and
   junk left out: they have no attribute labels).  A gallery image of these pairs is re-rendered
   with one attribute changed (``reid_jax.synthetic.dataset.render_counterfactual``): a binary
   attribute (``backpack`` .. ``gender``) is toggled; a colour or age is *set* (``upred = 1`` on
   a person whose shirt is not red), which also clears the old colour or age, so the changed
   labels are known without the generator's random choices.  Attributes are taken round-robin
   (one accepted change per attribute per round, gallery images in seeded random order), so
   every attribute gets about ``num_counterfactuals / 30`` images.
   *Visibility.*  Some changes barely show: a backpack seen from the front (its straps), a
   handbag on the far side (behind the body), long hair over a backpack.  A change is kept only
   when at least ``min_changed_pixels`` pixels (default 64 of 8192) change by more than
   ``pixel_tolerance`` (default 25 of 255) in some channel, counted before JPEG inside the
   attribute's region (``synthetic.attribute_region``: the attribute's part masks of both
   renders, ``return_masks=True``, dilated by the blur radius).  Rejected changes are counted
   per attribute (``rejected_invisible``).
   The counterfactual is embedded by the model exactly as the dataset files are (JPEG of the
   dataset's quality, the eval transform), and every pair ``(q, g)`` of that gallery image gives
   one row: the explanation of ``(q, g)`` and of ``(q, g')``.  *Direction.*  Of the two images,
   the one whose label of the changed attribute differs from the query's ground-truth label is
   the *far* one (for a true match that is always the counterfactual; for a false match whose
   original already differs, the change brings it towards the query and the original is far).
   The rise is ``sep(q, far) - sep(q, near)``; a hit at ``m`` is a changed label among the top
   ``m`` attributes by rise (:func:`reid_jax.explain.metrics.counterfactual_hit_rate`,
   with its tie rule and chance level).
2. **AUROC of matching scores** for ground-truth agreement of query and gallery labels, over all
   labelled query x gallery pairs (streamed) and over the top-``k`` ranks; for the query's
   confident attributes (threshold ``t``, the entries the paper displays) and for all attributes
   (``t = 0``).
3. **AMD Ex-Precision / Ex-mAP** (``_d``, ``_s``) over all labelled pairs and over the top ``k``
   ranks, for the three separations, with chance levels
   (:func:`~reid_jax.explain.metrics.streamed_amd_over_gallery`,
   :func:`~reid_jax.explain.metrics.amd_over_top_k`; the top ``k`` there is the ranking of
   the report, ``reid_jax.explain.run``: the Market-1501 protocol removes gallery images with
   the query's pid and camera and junk, distractors stay but have no labels and are ignored;
   same-identity pairs have no differing attribute and only count in ``num_pairs``).
   All-pairs passes log their progress (rate, ETA) every 30 s through absl logging.

Outputs (:func:`write_outputs`, each file replaced atomically): ``explanation_metrics.json``
(nested dicts of numbers; per-attribute values as arrays of 30 in ``ATTRIBUTE_NAMES`` order, the
shape ``reid_jax.explain.report`` shows) and ``explanation_metrics.md`` (the README table).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from reid_jax import atomic_io, explain, retrieval, synthetic
from reid_jax.data.attributes import (
    ATTRIBUTE_NAMES,
    NUM_ATTRIBUTES,
    labels_for_pids,
    load_market_attributes,
)
from reid_jax.data.market1501 import SPLIT_FOLDERS
from reid_jax.explain import metrics as em
from reid_jax.explain import run as explain_run
from reid_jax.progress import ProgressLog
from reid_jax.synthetic.render import IMAGE_HEIGHT, IMAGE_WIDTH, blur_radius

FORMAT = "reid_jax.explain.metrics/1"
JSON_NAME = explain_run.METRICS_NAME  # "explanation_metrics.json", read by tools/explain.py
MARKDOWN_NAME = "explanation_metrics.md"
MODES = em.MODES  # ("paper", "complete", "scores")
MODE_TITLES = {"paper": "eq. 3.2 (paper)", "complete": "complete decomposition",
               "scores": "eq. 3.1 (1 - s)"}
HIT_RANKS = (1, 3)
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
    qp, qc, gp, gc = retrieval.check_ids(query_pids, query_cams, gallery_pids, gallery_cams,
                                         fq.shape[0], fg.shape[0])
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
    """

    gallery_index: int
    attribute: int
    value: int | None
    labels_before: np.ndarray
    labels_after: np.ndarray
    changed_pixels: int
    jpeg: bytes

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


def make_counterfactuals(
    dataset_dir: str | os.PathLike,
    gallery_files: Sequence[str],
    gallery_indices: Sequence[int],
    num_counterfactuals: int,
    *,
    seed: int = 0,
    min_changed_pixels: int = DEFAULT_MIN_CHANGED_PIXELS,
    pixel_tolerance: int = DEFAULT_PIXEL_TOLERANCE,
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

    Returns:
      :class:`CounterfactualSet`.
    """
    if num_counterfactuals < 0:
        raise ValueError(f"num_counterfactuals must be >= 0, got {num_counterfactuals}")
    if min_changed_pixels < 0 or not 0 <= pixel_tolerance < 255:
        raise ValueError(f"min_changed_pixels must be >= 0 and pixel_tolerance in [0, 255), got "
                         f"{min_changed_pixels}, {pixel_tolerance}")
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

    def original(g: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if g in originals:
            originals.move_to_end(g)
            return originals[g]
        image, masks = synthetic.render_counterfactual(dataset_dir, gallery_files[g], None,
                                                       jpeg=False, return_masks=True)
        originals[g] = (image, {part: m > 0 for part, m in masks.items()})
        if len(originals) > _ORIGINALS_CACHED:
            originals.popitem(last=False)
        return originals[g]

    accepted: list[Counterfactual] = []
    while len(accepted) < num_counterfactuals:
        progressed = False
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
                after, masks_after = synthetic.render_counterfactual(
                    dataset_dir, gallery_files[g], name, value, jpeg=False, return_masks=True)
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
                    changed_pixels=changed, jpeg=synthetic.encode_jpeg(after, quality)))
                break
        if not progressed:
            break
    return CounterfactualSet(accepted, tried, rejected,
                             np.asarray([len(c) for c in candidates], np.int64))


# ---------------------------------------------------------------------------------------------
# Per-pair separations: e_a (eq. 3.2, either mode) or 1 - s_a (eq. 3.1).


@jax.jit
def _probabilities(f: jax.Array, w: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(f @ w)


@jax.jit
def _pair_scores(xq: jax.Array, xg: jax.Array) -> jax.Array:
    return jax.vmap(lambda a, b: explain.matching_scores(a, b[None])[0])(xq, xg)


@jax.jit
def _pair_errors(fq: jax.Array, fg: jax.Array, w: jax.Array) -> jax.Array:
    return jax.vmap(lambda q, g: explain.attribute_errors(q, g[None], w, method="direct")[0])(
        fq, fg)


def pair_separations(f_query: Any, f_gallery: Any, weights: Any, mode: str, *,
                     chunk: int = 4096) -> np.ndarray:
    """The explanation's "this attribute separates q and g" score of row-aligned pairs.

    Args:
      f_query, f_gallery: ``[P, N]``, row ``i`` is one pair.
      weights: ``[N, A]`` attribute weights ``W``.
      mode: ``"paper"``: ``e_a`` of eq. 3.2 (``reid_jax.explain.attribute_errors``, direct
        form); ``"complete"``: the complete decomposition; ``"scores"``: ``1 - s_a`` with
        ``s_a`` eq. 3.1 of ``x = sigmoid(f @ W)``.
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
    if mode == "complete":
        w = explain.complete_weights(w)
    parts = []
    for lo in range(0, fq.shape[0], chunk):
        q, g = jnp.asarray(fq[lo:lo + chunk]), jnp.asarray(fg[lo:lo + chunk])
        if mode == "scores":
            parts.append(1.0 - _pair_scores(_probabilities(q, w), _probabilities(g, w)))
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
) -> dict[str, Any]:
    """Hit rates of the counterfactuals for the three separations (module docstring, part 1).

    Args:
      f_query: ``[Q, N]``; f_gallery: ``[G, N]`` embeddings of the dataset files.
      f_counterfactual: ``[C, N]`` embeddings of ``counterfactuals`` (same order).
      weights: ``[N, A]``.
      counterfactuals: from :func:`make_counterfactuals`.
      pairs: from :func:`ranked_pairs`; each counterfactual is paired with every query its
        gallery image is paired with.
      labels_query: ``[Q, A]`` ground-truth labels of the queries.
      valid_query: bool ``[Q]``, queries with labels (default all).

    Returns:
      ``{"num_pairs", "num_true_match_pairs", "num_away_pairs", <mode>: {"top1", "top3",
      "mean_rank"}, "chance": {...}, "subsets": {...}, "per_attribute": {...}}``; see
      :func:`reid_jax.explain.metrics.counterfactual_hit_rate` for the definitions.
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
    for mode in MODES:
        s_orig = pair_separations(fq[q], fg[gallery], weights, mode)
        s_cf = pair_separations(fq[q], fc[c], weights, mode)
        near = np.where(away[:, None], s_orig, s_cf)
        far = np.where(away[:, None], s_cf, s_orig)
        res = em.counterfactual_hit_rate(near, far, attribute, changed, top=HIT_RANKS)
        out[mode] = {**{f"top{m}": res[f"top{m}"] for m in HIT_RANKS},
                     "mean_rank": res["mean_rank"]}
        if mode == MODES[0]:
            out["chance"] = res["chance"]
            per_attribute["pairs"] = _per_attribute(res, "count")
        for m in HIT_RANKS:
            per_attribute[f"{mode}_top{m}"] = _per_attribute(res, f"top{m}")
        for name, mask in subsets.items():
            if mask.any():
                sub = em.counterfactual_hit_rate(near[mask], far[mask], attribute[mask],
                                                 changed[mask], top=(1,))
                subset_out[name][f"{mode}_top1"] = sub["top1"]
                if mode == MODES[0]:
                    subset_out[name]["chance_top1"] = sub["chance"]["top1"]
            else:
                subset_out[name][f"{mode}_top1"] = None
    out["subsets"] = subset_out
    out["per_attribute"] = per_attribute
    return out


# ---------------------------------------------------------------------------------------------
# (2) + (3) AUROC of matching scores and AMD metrics over all pairs and the top k.

_AMD_KEYS = ("ex_precision_d", "ex_map_d", "ex_precision_s", "ex_map_s")
_AUROC_KEYS = ("auroc", "num_positive", "num_negative")


def label_metrics(
    f_query: Any,
    f_gallery: Any,
    weights: Any,
    labels_query: Any,
    labels_gallery: Any,
    valid_query: Any | None = None,
    valid_gallery: Any | None = None,
    *,
    query_pids: Any,
    query_cams: Any,
    gallery_pids: Any,
    gallery_cams: Any,
    k: int = DEFAULT_K,
    threshold: Any = explain.DEFAULT_THRESHOLD,
    log_interval: float = 30.0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """AUROC of matching scores and AMD metrics over all pairs and over the top ``k`` ranks.

    One all-pairs pass per mode (``streamed_amd_over_gallery``; the ``scores`` pass also
    accumulates the all-attributes AUROC, ``t = 0``) with a :class:`ProgressLog` every
    ``log_interval`` seconds, and one top-``k`` ranking per mode under the Market-1501
    protocol (``amd_over_top_k`` with the pids and cameras: the pairs the report shows).

    Returns:
      ``(auroc, amd)``: ``auroc = {"all_pairs": {"confident": ..., "all_attributes": ...},
      "top{k}": {...}, "per_attribute": {...: [A]}}`` and ``amd = {"all_pairs": {"num_pairs",
      "num_pairs_d", "num_pairs_s", <mode>: {ex_precision_d, ex_map_d, ex_precision_s,
      ex_map_s}, "chance": {...}}, "top{k}": {...}, "per_attribute": {...: [A]}}``.
    """
    args = (f_query, f_gallery, weights, labels_query, labels_gallery)
    masks = dict(valid_query=valid_query, valid_gallery=valid_gallery)
    ids = dict(query_pids=query_pids, query_cams=query_cams, gallery_pids=gallery_pids,
               gallery_cams=gallery_cams)
    scopes = {"all_pairs": {}, f"top{k}": {}}
    for mode in MODES:
        # Matching-score AUROC for all attributes: t = 0 selects every attribute (x != 0.5).
        extra = (0.0,) if mode == "scores" else ()
        scopes["all_pairs"][mode] = em.streamed_amd_over_gallery(
            *args, mode, threshold=threshold, extra_thresholds=extra,
            progress=ProgressLog(f"AMD over all pairs ({mode})", interval=log_interval),
            **masks)
        t0 = time.perf_counter()
        scopes[f"top{k}"][mode] = em.amd_over_top_k(
            *args, mode, k=k, threshold=threshold, extra_thresholds=extra, **ids, **masks)
        logging.info("AMD over the top %d ranks (%s): %.1f s", k, mode,
                     time.perf_counter() - t0)
    every = {scope: results["scores"]["extra_auroc"][0] for scope, results in scopes.items()}

    auroc: dict[str, Any] = {}
    amd: dict[str, Any] = {}
    auroc_attr: dict[str, list[Any]] = {}
    amd_attr: dict[str, list[Any]] = {}
    for scope, results in scopes.items():
        confident = results["scores"]["auroc"]
        auroc[scope] = {
            "confident": {key: confident[key] for key in _AUROC_KEYS},
            "all_attributes": {key: every[scope][key] for key in _AUROC_KEYS},
        }
        if "max_binning_error" in confident:
            auroc[scope]["confident"]["max_binning_error"] = confident["max_binning_error"]
            auroc[scope]["all_attributes"]["max_binning_error"] = every[scope][
                "max_binning_error"]
        auroc_attr[f"{scope}_confident"] = _per_attribute(confident, "auroc")
        auroc_attr[f"{scope}_all_attributes"] = _per_attribute(every[scope], "auroc")
        paper = results["paper"]
        entry: dict[str, Any] = {key: paper[key] for key in ("num_pairs", "num_pairs_d",
                                                               "num_pairs_s")}
        for mode in MODES:
            entry[mode] = {key: results[mode][key] for key in _AMD_KEYS}
        entry["chance"] = {key: paper["chance"][key] for key in _AMD_KEYS}
        amd[scope] = entry
        amd_attr[f"{scope}_differ_count"] = _per_attribute(paper, "count_d")
        for mode in MODES:
            for key in ("precision_d", "ap_d"):
                amd_attr[f"{scope}_{mode}_{key}"] = _per_attribute(results[mode], key)
    auroc["per_attribute"] = auroc_attr
    amd["per_attribute"] = amd_attr
    return auroc, amd


# ---------------------------------------------------------------------------------------------
# Output: JSON and the README table.


def _pct(x: Any) -> str:
    return "—" if x is None else f"{100.0 * float(x):.1f}"


class TableRow(NamedTuple):
    """One row of :func:`summary_table`.

    Attributes:
      metric: what the row measures, e.g. ``counterfactual hit rate, top-1``.
      n: pairs (AUROC: query-attribute entries); ``None`` when the part was skipped.
      values: one fraction in ``[0, 1]`` per mode of ``MODES`` (``None``: does not apply).
      chance: the chance level (``None``: none).
      skipped: why the part was not measured (``""``: it was).
    """

    metric: str
    n: int | None
    values: tuple[float | None, ...]
    chance: float | None
    skipped: str = ""


class SummaryTable(NamedTuple):
    """The table of :func:`markdown_table` as data (``reid_jax.explain.report`` renders it in HTML).

    Attributes:
      columns: the header: ``metric``, ``n``, one title per mode of ``MODES``, ``chance``.
      rows: :class:`TableRow` s, in the order printed.
      legend: sentences explaining the table.
    """

    columns: tuple[str, ...]
    rows: tuple[TableRow, ...]
    legend: tuple[str, ...]


def summary_table(metrics: dict[str, Any]) -> SummaryTable:
    """The rows of the README table of :func:`evaluate`'s ``metrics`` (the JSON layout).

    Rows: counterfactual hit rate top-1 / top-3; matching-score AUROC over all pairs and the
    top ``k``, for confident and all attributes (eq. 3.1 only); AMD Ex-Precision / Ex-mAP
    ``_d`` / ``_s`` over all pairs and the top ``k``.  Raises ``KeyError`` when ``metrics``
    lacks one of these entries.
    """
    k = metrics["settings"]["k"]
    top = f"top{k}"
    columns = ("metric", "n", *(MODE_TITLES[m] for m in MODES), "chance")
    rows: list[TableRow] = []
    cf = metrics["counterfactual"]
    if "skipped" in cf:
        rows.append(TableRow("counterfactual hit rate", None, (None,) * len(MODES), None,
                             skipped=str(cf["skipped"])))
    else:
        for m in HIT_RANKS:
            rows.append(TableRow(f"counterfactual hit rate, top-{m}", int(cf["num_pairs"]),
                                 tuple(cf[mode][f"top{m}"] for mode in MODES),
                                 cf["chance"][f"top{m}"]))
    for scope, scope_name in (("all_pairs", "all pairs"), (top, f"top-{k}")):
        for which, which_name in (("confident", "confident attributes"),
                                  ("all_attributes", "all attributes")):
            a = metrics["auroc"][scope][which]
            rows.append(TableRow(f"matching-score AUROC, {scope_name}, {which_name}",
                                 int(a["num_positive"] + a["num_negative"]),
                                 tuple(a["auroc"] if mode == "scores" else None
                                       for mode in MODES), 0.5))
    for scope, scope_name in (("all_pairs", "all pairs"), (top, f"top-{k}")):
        amd = metrics["amd"][scope]
        for key, title in (("ex_precision_d", "Ex-Precision_d"), ("ex_map_d", "Ex-mAP_d"),
                           ("ex_precision_s", "Ex-Precision_s"), ("ex_map_s", "Ex-mAP_s")):
            n = amd["num_pairs_d"] if key.endswith("_d") else amd["num_pairs_s"]
            rows.append(TableRow(f"AMD {title}, {scope_name}", int(n),
                                 tuple(amd[mode][key] for mode in MODES),
                                 amd["chance"][key]))
    threshold = metrics["settings"]["threshold"]
    t_text = (f"{threshold:g}" if isinstance(threshold, (int, float))
              else "per attribute")
    legend = [
        f"Values in %. n: pairs (AUROC: query-attribute entries). Top-{k}: the {k} best-ranked "
        f"gallery images of every query, as in the report (Market-1501 protocol: same identity "
        f"and camera, and junk, removed). Confident attributes: |x - 0.5| > {t_text}.",
    ]
    if "skipped" in cf:
        legend.append(f"Counterfactuals skipped: {cf['skipped']}")
    else:
        legend.append(
            f"Counterfactuals: {cf['num_counterfactuals']} re-rendered gallery images "
            f"({cf['num_rejected_invisible']} barely visible changes rejected), each paired "
            f"with the queries that rank it in their top {k} or match it; a hit: a changed "
            "attribute rises most (top-1) or among the 3 largest rises (top-3).")
    return SummaryTable(columns, tuple(rows), tuple(legend))


def markdown_table(metrics: dict[str, Any]) -> str:
    """The README table of :func:`evaluate`'s metrics (values in %), with a legend."""
    table = summary_table(metrics)
    lines = ["| " + " | ".join(table.columns) + " |",
             "|" + "|".join([":---", "---:"] + ["---:"] * (len(table.columns) - 2)) + "|"]
    for row in table.rows:
        if row.skipped:
            cells = [row.metric, "—", "skipped"] + [""] * len(MODES)
        else:
            cells = ([row.metric, str(row.n)] + [_pct(v) for v in row.values]
                     + [_pct(row.chance)])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", *table.legend]) + "\n"


def write_outputs(metrics: dict[str, Any], output_dir: str | os.PathLike) -> tuple[str, str]:
    """Writes ``explanation_metrics.json`` and ``explanation_metrics.md`` into ``output_dir``
    (each through a temporary file and ``os.replace``); returns their paths."""
    output_dir = os.path.abspath(os.fspath(output_dir))
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, JSON_NAME)
    md_path = os.path.join(output_dir, MARKDOWN_NAME)
    text = json.dumps(metrics, indent=1, allow_nan=False) + "\n"  # fails before any write
    atomic_io.write_text(md_path, markdown_table(metrics))
    atomic_io.write_text(json_path, text)
    return json_path, md_path


# ---------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate` computed and wrote."""

    metrics: dict[str, Any]
    json_path: str
    markdown_path: str
    table: str


def _check_data_root(data_root: str | os.PathLike | None) -> str:
    if not data_root:
        raise ValueError("no data root: pass --data_root=/path/to/Market-1501 (or a synthetic "
                         "folder from tools/make_synthetic.py)")
    root = os.path.abspath(os.fspath(data_root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data root {root} does not exist (--data_root)")
    return root


def _attribute_labels(path: str, pids_query: np.ndarray, pids_gallery: np.ndarray):
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no attribute labels: {path} does not exist; pass --attributes_file=PATH to the "
            "market_attribute.mat of this data root")
    attrs = load_market_attributes(path)
    lq, vq = labels_for_pids(attrs, pids_query, "query")
    lg, vg = labels_for_pids(attrs, pids_gallery, "gallery")
    if not vq.any() or not vg.any():
        raise ValueError(f"{path} has no labels for the test identities of this data root "
                         f"({int(vq.sum())} labelled queries, {int(vg.sum())} labelled gallery "
                         "images)")
    return lq, vq, lg, vg


def _restore_head(checkpoint: str | os.PathLike):
    from reid_jax import checkpoints

    try:
        return checkpoints.restore_attribute_head(checkpoint)
    except ValueError as e:
        if "no attribute head" in str(e):
            raise ValueError(f"cannot evaluate explanations: {e}") from e
        raise


def evaluate(
    *,
    checkpoint: str | os.PathLike,
    data_root: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    config: ml_collections.ConfigDict | None = None,
    attributes_file: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    k: int = DEFAULT_K,
    threshold: Any = explain.DEFAULT_THRESHOLD,
    num_counterfactuals: int = DEFAULT_NUM_COUNTERFACTUALS,
    min_changed_pixels: int = DEFAULT_MIN_CHANGED_PIXELS,
    pixel_tolerance: int = DEFAULT_PIXEL_TOLERANCE,
    seed: int = 0,
    embed_fn: Callable[[list[bytes]], np.ndarray] | None = None,
) -> EvaluationResult:
    """Measures the explanations of a checkpoint on the test split of ``data_root``.

    Args:
      checkpoint: orbax checkpoint directory with an attribute head.
      data_root: Market-1501-layout folder; counterfactuals need a synthetic one.
      output_dir: where ``explanation_metrics.json`` / ``.md`` go.
      config: the model's config (default: the one stored in the checkpoint).
      attributes_file: ``market_attribute.mat`` (default ``DATA_ROOT/market_attribute.mat``).
      cache_dir: embedding cache (default ``OUTPUT_DIR/embeddings``, shared with
        ``tools/explain.py`` on the same output folder).
      k: top ranks of the pairs.
      threshold: confident-attribute threshold in ``[0, 0.5)`` (scalar or ``[A]``).
      num_counterfactuals: counterfactual images to make (0: skip that part).
      min_changed_pixels, pixel_tolerance, seed: see :func:`make_counterfactuals`.
      embed_fn: embeds a list of JPEG bytes ``-> [n, N]`` (default: the checkpoint's model with
        the eval transform of ``config``).

    Returns:
      :class:`EvaluationResult`.
    """
    from reid_jax import checkpoints, embeddings

    start = time.perf_counter()
    root = _check_data_root(data_root)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if num_counterfactuals < 0:
        raise ValueError(f"num_counterfactuals must be >= 0, got {num_counterfactuals}")
    threshold = explain_run.check_threshold(threshold)
    output_dir = os.path.abspath(os.fspath(output_dir))
    data = explain_run.load_data(root)
    if k > len(data.gallery):
        raise ValueError(f"k={k} exceeds the {len(data.gallery)} gallery images of {root}")
    head = _restore_head(checkpoint)
    weights = np.asarray(head.kernel[...], np.float32)
    attributes_file = os.path.abspath(os.fspath(
        attributes_file or os.path.join(root, synthetic.ATTRIBUTE_FILE)))
    lq, vq, lg, vg = _attribute_labels(attributes_file, data.query.pids, data.gallery.pids)

    model, meta = checkpoints.restore_model(checkpoint, config)
    if config is None:
        config = ml_collections.ConfigDict(meta.get("config", {}))
    if head.embedding_dim != model.feature_dim:
        raise ValueError(f"the attribute head of {checkpoint} expects embeddings of size "
                         f"{head.embedding_dim}, the model produces {model.feature_dim}")
    cache_dir = os.fspath(cache_dir) if cache_dir else os.path.join(
        output_dir, explain_run.EMBEDDINGS_NAME)
    emb = embeddings.split_embeddings(model, config, root, ("query", "gallery"), cache_dir)
    fq, fg = emb["query"].features, emb["gallery"].features
    logging.info("embeddings of %d queries and %d gallery images ready (%.1f s)", len(fq),
                 len(fg), time.perf_counter() - start)

    t0 = time.perf_counter()
    auroc, amd = label_metrics(fq, fg, weights, lq, lg, vq, vg, query_pids=data.query.pids,
                               query_cams=data.query.cameras, gallery_pids=data.gallery.pids,
                               gallery_cams=data.gallery.cameras, k=int(k), threshold=threshold)
    logging.info("AUROC and AMD metrics over all pairs and the top %d: %.1f s", k,
                 time.perf_counter() - t0)

    synthetic_root = os.path.isfile(os.path.join(root, synthetic.META_FILE))
    if not synthetic_root:
        reason = (f"{root} is not a synthetic data root (no {synthetic.META_FILE}); "
                  "counterfactual images can only be rendered for synthetic persons")
        logging.info("counterfactual hit rate skipped: %s", reason)
        counterfactual: dict[str, Any] = {"skipped": reason}
    elif num_counterfactuals == 0:
        counterfactual = {"skipped": "num_counterfactuals=0"}
    else:
        if embed_fn is None:
            loader_config = embeddings.eval_loader_config(config)
            batch = embeddings.eval_batch_size(config)

            def embed_fn(items: list[bytes]) -> np.ndarray:
                return embeddings.embed_images(
                    model, items, height=loader_config.augment.height,
                    width=loader_config.augment.width, batch_size=batch,
                    loader_config=loader_config)

        counterfactual = _counterfactual_part(
            root, data, fq, fg, weights, lq, vq, k=int(k), embed_fn=embed_fn,
            num_counterfactuals=num_counterfactuals, min_changed_pixels=min_changed_pixels,
            pixel_tolerance=pixel_tolerance, seed=seed)

    threshold_json = (float(threshold) if np.ndim(threshold) == 0
                      else [float(t) for t in np.asarray(threshold)])
    metrics = {
        "format": FORMAT,
        "attribute_names": list(ATTRIBUTE_NAMES),
        "settings": {
            "checkpoint": os.path.abspath(os.fspath(checkpoint)),
            "data_root": root,
            "attributes_file": attributes_file,
            "k": int(k),
            "threshold": threshold_json,
            "num_counterfactuals": int(num_counterfactuals),
            "min_changed_pixels": int(min_changed_pixels),
            "pixel_tolerance": int(pixel_tolerance),
            "seed": int(seed),
        },
        "data": {
            "synthetic": bool(synthetic_root),
            "num_queries": len(data.query),
            "num_gallery": len(data.gallery),
            "num_labelled_queries": int(vq.sum()),
            "num_labelled_gallery": int(vg.sum()),
        },
        "counterfactual": counterfactual,
        "auroc": auroc,
        "amd": amd,
    }
    json_path, md_path = write_outputs(metrics, output_dir)
    logging.info("explanation metrics written to %s and %s (%.1f s in all)", json_path, md_path,
                 time.perf_counter() - start)
    return EvaluationResult(metrics, json_path, md_path, markdown_table(metrics))


def _counterfactual_part(root: str, data: Any, fq: np.ndarray, fg: np.ndarray,
                         weights: np.ndarray, lq: np.ndarray, vq: np.ndarray, *, k: int,
                         embed_fn: Callable[[list[bytes]], np.ndarray],
                         num_counterfactuals: int, min_changed_pixels: int,
                         pixel_tolerance: int, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    gallery_files = [os.path.join(SPLIT_FOLDERS["gallery"], os.path.basename(p))
                     for p in data.gallery.paths]
    pairs = ranked_pairs(fq, fg, data.query.pids, data.query.cameras, data.gallery.pids,
                         data.gallery.cameras, k)
    pairs = CandidatePairs(*(x[vq[pairs.query]] for x in pairs))
    made = make_counterfactuals(root, gallery_files, np.unique(pairs.gallery),
                                num_counterfactuals, seed=seed,
                                min_changed_pixels=min_changed_pixels,
                                pixel_tolerance=pixel_tolerance)
    if not made.accepted:
        return {"skipped": f"no visible counterfactual among {int(made.tried.sum())} tried "
                           f"(min_changed_pixels={min_changed_pixels})"}
    t1 = time.perf_counter()
    f_cf = np.asarray(embed_fn([cf.jpeg for cf in made.accepted]), np.float32)
    t2 = time.perf_counter()
    out = counterfactual_metrics(fq, fg, f_cf, weights, made.accepted, pairs, lq, vq)
    logging.info("counterfactuals: %d rendered (%d rejected as barely visible) in %.1f s, "
                 "embedded in %.1f s, %d pairs scored in %.1f s", int(made.tried.sum()),
                 int(made.rejected.sum()), t1 - t0, t2 - t1, out["num_pairs"],
                 time.perf_counter() - t2)
    per_attribute = {
        "counterfactuals": np.bincount([cf.attribute for cf in made.accepted],
                                       minlength=NUM_ATTRIBUTES).tolist(),
        "rejected_invisible": made.rejected.tolist(),
        **out.pop("per_attribute"),
    }
    changed = np.asarray([cf.changed_pixels for cf in made.accepted])
    return {
        "num_counterfactuals": len(made.accepted),
        "num_rejected_invisible": int(made.rejected.sum()),
        "num_candidate_gallery_images": int(np.unique(pairs.gallery).size),
        "median_changed_pixels": float(np.median(changed)),
        "image_pixels": IMAGE_HEIGHT * IMAGE_WIDTH,
        **out,
        "per_attribute": per_attribute,
    }


__all__ = [
    "DEFAULT_K",
    "DEFAULT_MIN_CHANGED_PIXELS",
    "DEFAULT_NUM_COUNTERFACTUALS",
    "DEFAULT_PIXEL_TOLERANCE",
    "FORMAT",
    "JSON_NAME",
    "MARKDOWN_NAME",
    "CandidatePairs",
    "Counterfactual",
    "CounterfactualSet",
    "EvaluationResult",
    "ProgressLog",
    "SummaryTable",
    "TableRow",
    "counterfactual_metrics",
    "evaluate",
    "label_metrics",
    "make_counterfactuals",
    "markdown_table",
    "pair_separations",
    "planned_value",
    "ranked_pairs",
    "summary_table",
    "write_outputs",
]
