"""Explanation quality measured: counterfactual hit rate, AUROC of matching scores and the
attribute-consistency metrics of AMD (``docs/design.md``, "Explanations measured").

The paper (Specker) evaluates its explanations qualitatively.  This module measures them:

* :func:`counterfactual_hit_rate` — a gallery image re-rendered with one attribute changed; is
  the attribute whose eq. 3.2 contribution rises most (``e_a^cf - e_a^orig``) the changed one?
* :func:`matching_score_auroc` — do the matching scores of eq. 3.1 separate query/gallery pairs
  whose ground-truth labels agree from pairs whose labels differ (rank-based AUROC)?
  :class:`AurocAccumulator` is its streamed (histogram) form for all pairs of a large gallery;
  :func:`constant_auroc` the pooled AUROC of one constant per attribute (the baseline) and
  :func:`macro_auroc` the mean of the per-attribute AUROCs.
* :func:`amd_metrics` / :class:`AmdAccumulator` — Ex-Precision and Ex-mAP of AMD (Chen et al.,
  "Explainable person re-identification with attribute-guided metric distillation", ICCV 2021),
  streamed over all query x gallery pairs by
  :func:`reid_jax.explain.gallery_metrics.streamed_amd_over_gallery` and over the
  pairs a user looks at (the top-``k`` ranks under the Market-1501 protocol, the pairs of the
  report of ``reid_jax.explain.run``) by :func:`reid_jax.explain.gallery_metrics.amd_over_top_k`.

AMD metrics.  For a pair ``(q, g)`` let ``D`` be the attributes whose ground-truth labels differ,
``k = |D|``, and ``S`` the attributes that agree.  An explanation gives every attribute a
*separation* score ("this attribute separates them"), one per mode of :data:`MODES`: eq. 3.2's
``e_a`` (``"paper"``), its complete decomposition (``"complete"``), the projection
contributions (``"projection"``), ``1 - s_a`` with eq. 3.1's matching score (``"scores"``), the
probability that the labels differ (``"disagreement"``) or a fixed order (``"prior"``, from
``reid_jax.explain.baselines``).  Ranking attributes by separation, descending:

* ``Ex-Precision_d = |top-k ∩ D| / k`` and ``Ex-mAP_d`` = average precision of the ranking
  against ``D`` (``AP = (1/k) sum_{a in D} precision at a's rank``), both averaged over the pairs
  with ``k > 0`` (AMD's ``explain_eval``);
* the same variants ``_s`` rank ascending against ``S`` (top-``|S|`` of the ascending ranking).
  They are averaged over the pairs with ``0 < |S| < A``: when all attributes agree (``k = 0``)
  every ranking scores 1.  AMD's code scores such pairs by their "over-shared" attributes
  instead (share above ``2 / A``, :func:`over_shared`); ``ex_precision_s_amd`` /
  ``ex_map_s_amd`` follow it: the pairs with ``k = 0`` count too, each ``1 - |over| / A`` in
  both (shares of the positive parts for signed separations; ``docs/design.md``,
  "Explanations measured").
* Per attribute (AMD's ``diff_i``/``same_i``, plus AP): ``precision_d[a]`` is the fraction of
  the pairs with ``a in D`` in which ``a`` is ranked within the top ``k``, and ``ap_d[a]`` the
  mean precision at ``a``'s rank over those pairs (``a``'s contribution to ``Ex-mAP_d``: the
  pair AP is the mean of these over ``D``).  ``_s`` alike with ``S`` and the ascending ranking.

Ties.  Every ranked quantity here is the **expectation over a uniformly random order of tied
scores** (McSherry & Najork, ECIR 2008), computed in closed form — deterministic, independent of
attribute order, and equal to the plain definition when there are no ties.  An explanation that
gives all attributes the same score (e.g. ``e = 0`` for identical embeddings) therefore scores
exactly chance level.  For an item of a tie group of ``t`` items, ``r`` of them relevant, with
``T`` items (``R`` relevant) ranked strictly before the group:

* ``P(item within the top m) = clip(m - T, 0, t) / t``;
* ``E[precision at the rank of a relevant item] =
  (1/t) sum_{i=1..t} (R + 1 + (i-1)(r-1)/(t-1)) / (T + i)``
  ``= ((R+1) dH + (r-1)/(t-1) (t - (T+1) dH)) / t`` with ``dH = H_{T+t} - H_T`` (harmonic
  numbers; the second term is 0 for ``t = 1``).

Ties are judged on the values as the kernels see them (float32 unless ``jax_enable_x64``).
The ``chance`` entries are the same metrics for a ranking that ties all attributes (a random
ranking), from the histogram of ``k``.

All functions return plain JSON-ready dicts (``None`` where a value is undefined, e.g. an
attribute that never differs), except the ``"groups"`` / ``"rows"`` entries: per-query sums and
per-pair values (NumPy arrays) for the bootstrap of ``reid_jax.explain.bootstrap``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from reid_jax.data.attributes import ATTRIBUTE_NAMES

Array = jax.Array

# How an explanation's "this attribute separates q and g" score is formed.
MODES = ("prior", "paper", "complete", "projection", "scores", "disagreement")
# The explanations that come with a matching score ("do the labels agree?"), whose AUROC is
# measured: eq. 3.1's s_a, and the agreement probability 1 - P(labels differ).
SCORE_MODES = ("scores", "disagreement")
# Matching scores of eq. 3.1 lie in [0, 2]: numerator in [0, 1], denominator in [0.5, 1].
SCORE_RANGE = (0.0, 2.0)


# --------------------------------------------------------------------------------------------
# Input checks and small helpers.


def _names(num_attributes: int, names: Sequence[str] | None) -> tuple[str, ...]:
    if names is None:
        if num_attributes == len(ATTRIBUTE_NAMES):
            return ATTRIBUTE_NAMES
        return tuple(f"attribute_{i}" for i in range(num_attributes))
    names = tuple(str(n) for n in names)
    if len(names) != num_attributes or len(set(names)) != len(names):
        raise ValueError(f"names must be {num_attributes} unique attribute names, got {names}")
    return names


def _as_2d(name: str, x: Any, num_attributes: int | None = None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or (num_attributes is not None and a.shape[1] != num_attributes):
        want = f"[P, {num_attributes}]" if num_attributes is not None else "[P, A]"
        raise ValueError(f"{name} must have shape {want}, got shape {a.shape}")
    return a


def check_finite_array(name: str, a: np.ndarray) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    bad = ~np.isfinite(a)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} (shape {a.shape}) has {int(bad.sum())} non-finite values, "
                         f"first at index {first}")
    return a


def check_binary(name: str, x: Any, shape: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(x)
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got shape {a.shape}")
    if a.dtype != bool:
        if not np.issubdtype(a.dtype, np.number) or not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must be boolean or 0/1, got values outside {{0, 1}} "
                             f"(dtype {a.dtype})")
        a = a.astype(bool)
    return a


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def harmonic_numbers(n: int) -> np.ndarray:
    """float64 ``[n + 1]``: ``H_0 = 0, H_m = sum_{i<=m} 1/i``."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1))])


def _falling_ratio(u: np.ndarray, c: np.ndarray, j: np.ndarray) -> np.ndarray:
    """``prod_{i<j} (u - i) / (u + c - i)``: the probability that the first ``j`` items of a
    random order of ``u`` misses and ``c >= 1`` hits are all misses (0 when ``j > u``)."""
    out = np.ones(np.shape(u), np.float64)
    for i in range(int(np.max(j, initial=0))):
        step = i < j
        out = np.where(step, out * np.maximum(u - i, 0) / np.maximum(u + c - i, 1), out)
    return out


# --------------------------------------------------------------------------------------------
# (1) Counterfactual hit rate.


def counterfactual_hit_rate(
    errors_original: Any,
    errors_counterfactual: Any,
    changed_attribute: Any,
    changed_labels: Any | None = None,
    *,
    top: Sequence[int] = (1, 3),
    names: Sequence[str] | None = None,
    return_rows: bool = False,
) -> dict[str, Any]:
    """How often the attribute whose error contribution rises most is the changed attribute.

    Every row is a pair (query, gallery image) and its counterfactual (the same gallery image
    re-rendered with ``changed_attribute`` changed).  The rise ``e_cf - e_orig`` ranks the
    attributes, descending.  Attributes come in groups: changing ``upred`` to ``upblue`` flips
    both labels, ``age1 -> age3`` flips two.  A **hit at m** is: one of the attributes whose
    label changed (``changed_labels``; by default only ``changed_attribute``) is among the top
    ``m`` of that ranking.  Ties are broken uniformly at random, in expectation (see the module
    docstring), so the rates are exact expectations.

    Args:
      errors_original: ``[P, A]`` attribute errors (eq. 3.2, either mode) of query vs original.
      errors_counterfactual: ``[P, A]`` the same for query vs counterfactual image.
      changed_attribute: int ``[P]``, the attribute that was asked to change.
      changed_labels: optional bool ``[P, A]``, all attributes whose label changed
        (``labels_cf != labels_orig``); must include ``changed_attribute``.
      top: the ``m`` of the hit rates reported (``top1``, ``top3`` by default).
      names: attribute names (default ``ATTRIBUTE_NAMES`` for ``A = 30``).
      return_rows: also return ``"rows"``: ``{"top{m}": [P], "mean_rank": [P]}`` per pair
        (NumPy arrays, not JSON; for a bootstrap over the counterfactual images).

    Returns:
      ``{"num_pairs", "top{m}", "mean_rank", "chance": {"top{m}", "mean_rank"},
      "per_attribute": {name: {"count", "top{m}", "mean_rank"}}}`` where ``mean_rank`` is the
      expected 1-based rank of the highest-ranked changed attribute; per attribute by
      ``changed_attribute`` (``None`` for attributes never changed).
    """
    e0 = check_finite_array("errors_original", _as_2d("errors_original", errors_original))
    p, a = e0.shape
    e1 = check_finite_array("errors_counterfactual",
                 _as_2d("errors_counterfactual", errors_counterfactual, a))
    if e1.shape != e0.shape:
        raise ValueError(f"errors_counterfactual has shape {e1.shape}, errors_original "
                         f"{e0.shape}: they must match")
    if p == 0:
        raise ValueError("no pairs: errors_original has shape (0, A)")
    names = _names(a, names)
    changed = np.asarray(changed_attribute)
    if changed.shape != (p,) or not np.issubdtype(changed.dtype, np.integer):
        raise ValueError(f"changed_attribute must be int [{p}], got {changed.dtype}"
                         f"{list(changed.shape)}")
    if changed.min() < 0 or changed.max() >= a:
        raise ValueError(f"changed_attribute must lie in [0, {a}), got values "
                         f"{changed.min()}..{changed.max()}")
    one_hot = np.zeros((p, a), bool)
    one_hot[np.arange(p), changed] = True
    if changed_labels is None:
        in_set = one_hot
    else:
        in_set = check_binary("changed_labels", changed_labels, (p, a))
        missing = ~in_set[np.arange(p), changed]
        if missing.any():
            i = int(np.flatnonzero(missing)[0])
            raise ValueError(f"changed_labels must include changed_attribute; row {i} changes "
                             f"{names[changed[i]]!r} but its changed_labels are "
                             f"{[names[j] for j in np.flatnonzero(in_set[i])]}")
    top = tuple(int(m) for m in top)
    if not top or min(top) < 1:
        raise ValueError(f"top must be positive ranks, got {top}")

    rise = e1.astype(np.float64) - e0.astype(np.float64)
    best = np.max(np.where(in_set, rise, -np.inf), axis=1, keepdims=True)
    above = np.sum(~in_set & (rise > best), axis=1)
    u = np.sum(~in_set & (rise == best), axis=1)  # other attributes tied with the best changed
    c = np.sum(in_set & (rise == best), axis=1)  # changed attributes at the best value (>= 1)
    n_set = in_set.sum(axis=1)

    def hit(m: int, above, u, c) -> np.ndarray:
        j = np.maximum(m - above, 0)
        return np.where(j > 0, 1.0 - _falling_ratio(u, c, j), 0.0)

    rank = above + 1.0 + u / (c + 1.0)
    hits = {m: hit(m, above, u, c) for m in top}
    zeros = np.zeros(p, np.int64)
    chance_hits = {m: hit(m, zeros, a - n_set, n_set) for m in top}
    chance_rank = 1.0 + (a - n_set) / (n_set + 1.0)

    per_attribute: dict[str, Any] = {}
    for j, name in enumerate(names):
        rows = changed == j
        n = int(rows.sum())
        entry: dict[str, Any] = {"count": n}
        for m in top:
            entry[f"top{m}"] = float(hits[m][rows].mean()) if n else None
        entry["mean_rank"] = float(rank[rows].mean()) if n else None
        per_attribute[name] = entry
    out = {
        "num_pairs": int(p),
        **{f"top{m}": float(hits[m].mean()) for m in top},
        "mean_rank": float(rank.mean()),
        "chance": {**{f"top{m}": float(chance_hits[m].mean()) for m in top},
                   "mean_rank": float(chance_rank.mean())},
        "per_attribute": per_attribute,
    }
    if return_rows:
        out["rows"] = {**{f"top{m}": hits[m] for m in top}, "mean_rank": rank}
    return out


# --------------------------------------------------------------------------------------------
# (2) AUROC of matching scores for ground-truth agreement.


def auroc(scores: Any, positive: Any) -> float | None:
    """Area under the ROC curve of ``scores`` for ``positive`` (rank-based, Mann-Whitney U).

    ``AUROC = (sum of the positives' ranks - n+ (n+ + 1) / 2) / (n+ n-)`` with average ranks
    for ties (``scipy.stats.rankdata``), i.e. ``P(s+ > s-) + P(s+ = s-) / 2``.

    Args:
      scores: float ``[n]``; higher means "more likely positive".
      positive: bool ``[n]``.

    Returns:
      The AUROC, or ``None`` when either class is empty.
    """
    s = check_finite_array("scores", np.asarray(scores, dtype=np.float64).ravel())
    pos = check_binary("positive", np.asarray(positive).ravel(), s.shape)
    n_pos = int(pos.sum())
    n_neg = s.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = scipy.stats.rankdata(s)  # average ranks for ties
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * float(n_neg)))


def matching_score_auroc(
    scores: Any,
    agree: Any,
    selected: Any | None = None,
    *,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """AUROC of eq. 3.1 matching scores for ground-truth agreement of query and gallery labels.

    Positives are the entries whose query and gallery labels agree; a good matching score is
    high exactly there.  Overall AUROC pools all selected entries of all attributes; per
    attribute it uses that attribute's selected entries.

    Args:
      scores: ``[P, A]`` matching scores ``s_a`` of pairs.
      agree: bool ``[P, A]``, ``labels_q == labels_g``.
      selected: optional bool ``[P, A]`` (e.g. the query's confident attributes, section 3.1);
        default all entries.
      names: attribute names (default ``ATTRIBUTE_NAMES`` for ``A = 30``).

    Returns:
      ``{"auroc", "num_positive", "num_negative", "per_attribute": {name: {"auroc",
      "num_positive", "num_negative"}}, "macro"}``; ``auroc`` is ``None`` where a class is
      empty; ``macro`` is the mean of the defined per-attribute AUROCs.
    """
    s = check_finite_array("scores", _as_2d("scores", scores))
    p, a = s.shape
    names = _names(a, names)
    agree = check_binary("agree", agree, (p, a))
    sel = np.ones((p, a), bool) if selected is None else check_binary("selected", selected, (p, a))
    per_attribute = {}
    for j, name in enumerate(names):
        m = sel[:, j]
        per_attribute[name] = {"auroc": auroc(s[m, j], agree[m, j]),
                               "num_positive": int(agree[m, j].sum()),
                               "num_negative": int((~agree[m, j]).sum())}
    return {"auroc": auroc(s[sel], agree[sel]),
            "num_positive": int(agree[sel].sum()),
            "num_negative": int((~agree[sel]).sum()),
            "per_attribute": per_attribute,
            "macro": macro_auroc([v["auroc"] for v in per_attribute.values()])}


def _auroc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> tuple[float | None, float | None]:
    """AUROC and its largest binning error from ``[bins]`` counts (same bin = tie)."""
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return None, None
    neg_below = np.cumsum(neg) - neg
    u = float(np.sum(pos * (neg_below + 0.5 * neg)))
    # Pairs within one bin count 1/2; their true value lies in [0, 1].
    bound = 0.5 * float(np.sum(pos * neg)) / (n_pos * n_neg)
    return u / (n_pos * n_neg), bound


def histogram_auroc(pos: Any, neg: Any) -> np.ndarray:
    """AUROC from class histograms ``[..., bins]`` (one bin = ties): float64 ``[...]``, NaN
    where a class is empty.  Vectorised over leading axes (e.g. bootstrap samples)."""
    pos = np.asarray(pos, np.float64)
    neg = np.asarray(neg, np.float64)
    n_pos, n_neg = pos.sum(-1), neg.sum(-1)
    u = np.sum(pos * (np.cumsum(neg, axis=-1) - 0.5 * neg), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def constant_auroc(pos: Any, neg: Any, constants: Any) -> np.ndarray:
    """Pooled AUROC of a score that is one constant per attribute.

    Args:
      pos, neg: ``[..., A]`` positive / negative entries per attribute.
      constants: ``[A]`` the score of each attribute (e.g. its agreement rate).

    Returns:
      float64 ``[...]``: ``P(c_pos > c_neg) + P(c_pos = c_neg) / 2`` over the pooled entries;
      NaN where a class is empty.
    """
    c = np.asarray(constants, np.float64)
    values, slot = np.unique(c, return_inverse=True)
    pos = np.asarray(pos, np.float64)
    neg = np.asarray(neg, np.float64)
    onehot = np.zeros((c.size, values.size))
    onehot[np.arange(c.size), slot.ravel()] = 1.0
    return histogram_auroc(pos @ onehot, neg @ onehot)


def macro_auroc(per_attribute: Sequence[float | None]) -> float | None:
    """The mean of the per-attribute AUROCs that are defined (``None`` if none is)."""
    values = [float(v) for v in per_attribute if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def _bin_index(s: Array, lo: float, hi: float, bins: int) -> Array:
    return jnp.clip(jnp.floor((s - lo) / (hi - lo) * bins), 0, bins - 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("bins",))
def _histograms(scores, agree, selected, lo, hi, *, bins):
    a = scores.shape[-1]
    s = scores.reshape(-1, a)
    idx = _bin_index(s, lo, hi, bins) + bins * jnp.arange(a, dtype=jnp.int32)[None, :]
    sel = selected.reshape(-1, a)
    ag = agree.reshape(-1, a)
    size = a * bins
    pos = jax.ops.segment_sum((sel & ag).astype(jnp.int32).ravel(), idx.ravel(), size)
    neg = jax.ops.segment_sum((sel & ~ag).astype(jnp.int32).ravel(), idx.ravel(), size)
    bad = jnp.sum(sel & ~jnp.isfinite(s))
    return pos.reshape(a, bins), neg.reshape(a, bins), bad


@functools.partial(jax.jit, static_argnames=("span", "bins", "attribute_bins"))
def _group_histograms(scores, agree, selected, groups, lo, hi, *, span, bins, attribute_bins):
    """Per group (``groups`` in ``[0, span)``): pooled ``[span, bins]`` and per-attribute
    ``[span, A, attribute_bins]`` class histograms."""
    a = scores.shape[-1]
    s = scores.reshape(-1, a)
    g = groups.reshape(-1)[:, None]
    sel = selected.reshape(-1, a)
    ag = agree.reshape(-1, a)
    pos_w = (sel & ag).astype(jnp.int32).ravel()
    neg_w = (sel & ~ag).astype(jnp.int32).ravel()
    pooled = (g * bins + _bin_index(s, lo, hi, bins)).ravel()
    per_attr = ((g * a + jnp.arange(a, dtype=jnp.int32)[None, :]) * attribute_bins
                + _bin_index(s, lo, hi, attribute_bins)).ravel()
    out = []
    for idx, size, shape in ((pooled, span * bins, (span, bins)),
                             (per_attr, span * a * attribute_bins, (span, a, attribute_bins))):
        out.append(jax.ops.segment_sum(pos_w, idx, size).reshape(shape))
        out.append(jax.ops.segment_sum(neg_w, idx, size).reshape(shape))
    return tuple(out)


class AurocAccumulator:
    """Streamed :func:`matching_score_auroc` over many pairs, with bounded memory.

    Scores are counted in ``bins`` equal bins over ``value_range`` (values outside are clipped
    into the end bins) per attribute and class; entries in one bin count as ties.  ``result()``
    reports, next to each AUROC, ``max_binning_error``: the most the binned AUROC can differ
    from the exact one (half the fraction of positive/negative pairs that share a bin).  The
    result is exact when all scores of a bin are equal.

    With ``num_groups`` (e.g. the number of queries) it also keeps per-group histograms for a
    bootstrap over groups (``reid_jax.explain.bootstrap``): pooled over attributes with
    ``group_bins`` bins and per attribute with ``group_attribute_bins`` bins (coarser, to bound
    memory: ``num_groups * (group_bins + A * group_attribute_bins) * 2`` int32 counts).
    """

    def __init__(self, num_attributes: int, *, bins: int = 4096,
                 value_range: tuple[float, float] = SCORE_RANGE,
                 names: Sequence[str] | None = None, num_groups: int = 0,
                 group_bins: int = 256, group_attribute_bins: int = 32):
        if num_attributes < 1 or bins < 1:
            raise ValueError(f"num_attributes and bins must be >= 1, got {num_attributes}, {bins}")
        if num_groups < 0 or group_bins < 1 or group_attribute_bins < 1:
            raise ValueError(f"num_groups must be >= 0 and group bins >= 1, got {num_groups}, "
                             f"{group_bins}, {group_attribute_bins}")
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")
        self.num_attributes, self.bins, self.value_range = num_attributes, bins, (lo, hi)
        self.names = _names(num_attributes, names)
        self._pos = np.zeros((num_attributes, bins), np.int64)
        self._neg = np.zeros((num_attributes, bins), np.int64)
        self.num_groups = int(num_groups)
        self.group_bins, self.group_attribute_bins = int(group_bins), int(group_attribute_bins)
        g, a = self.num_groups, num_attributes
        self.group_pooled = (np.zeros((g, self.group_bins), np.int32),
                             np.zeros((g, self.group_bins), np.int32))
        self.group_attribute = (np.zeros((g, a, self.group_attribute_bins), np.int32),
                                np.zeros((g, a, self.group_attribute_bins), np.int32))

    def update(self, scores: Any, agree: Any, selected: Any | None = None,
               groups: Any | None = None) -> AurocAccumulator:
        """Adds ``[..., A]`` scores, bool agreement and (optional) bool selection; ``groups``
        (int ``[...]`` in ``[0, num_groups)``, e.g. the query of every pair) is required when
        the accumulator keeps groups."""
        a = self.num_attributes
        if jnp.ndim(scores) < 1 or jnp.shape(scores)[-1] != a:
            raise ValueError(f"scores must have shape [..., {a}], got {jnp.shape(scores)}")
        for name, x in (("agree", agree), ("selected", selected)):
            if x is not None and jnp.shape(x) != jnp.shape(scores):
                raise ValueError(f"{name} must have the shape of scores {jnp.shape(scores)}, "
                                 f"got {jnp.shape(x)}")
        sel = jnp.ones(jnp.shape(scores), bool) if selected is None else jnp.asarray(selected,
                                                                                    bool)
        lo, hi = self.value_range
        pos, neg, bad = _histograms(jnp.asarray(scores), jnp.asarray(agree, bool), sel,
                                    lo, hi, bins=self.bins)
        if int(bad):
            raise ValueError(f"scores hold {int(bad)} non-finite selected values")
        self._pos += np.asarray(pos, np.int64)
        self._neg += np.asarray(neg, np.int64)
        if self.num_groups:
            if groups is None:
                raise ValueError(f"groups are required: the accumulator keeps {self.num_groups} "
                                 "groups")
            g = np.asarray(groups)
            if g.shape != tuple(jnp.shape(scores)[:-1]) or not np.issubdtype(g.dtype, np.integer):
                raise ValueError(f"groups must be int of shape {tuple(jnp.shape(scores)[:-1])}, "
                                 f"got {g.dtype}{list(g.shape)}")
            if g.size:
                first, last = int(g.min()), int(g.max())
                if first < 0 or last >= self.num_groups:
                    raise ValueError(f"groups must lie in [0, {self.num_groups}), got "
                                     f"{first}..{last}")
                span = 1 << (last - first).bit_length()  # few compiled shapes
                out = _group_histograms(
                    jnp.asarray(scores), jnp.asarray(agree, bool), sel,
                    jnp.asarray(g - first, jnp.int32), lo, hi, span=span, bins=self.group_bins,
                    attribute_bins=self.group_attribute_bins)
                n = min(span, self.num_groups - first)
                rows = slice(first, first + n)
                for target, part in zip((*self.group_pooled, *self.group_attribute), out,
                                        strict=True):
                    target[rows] += np.asarray(part)[:n]
        elif groups is not None:
            raise ValueError("groups given, but the accumulator keeps none (num_groups=0)")
        return self

    def result(self) -> dict[str, Any]:
        """Like :func:`matching_score_auroc`, plus ``max_binning_error`` per AUROC and
        ``macro``: the mean of the per-attribute AUROCs."""
        def entry(pos, neg):
            value, bound = _auroc_from_histograms(pos, neg)
            return {"auroc": value, "max_binning_error": bound,
                    "num_positive": int(pos.sum()), "num_negative": int(neg.sum())}

        out = entry(self._pos.sum(0), self._neg.sum(0))
        out["per_attribute"] = {n: entry(self._pos[j], self._neg[j])
                                for j, n in enumerate(self.names)}
        out["macro"] = macro_auroc([v["auroc"] for v in out["per_attribute"].values()])
        return out


# --------------------------------------------------------------------------------------------
# (3) AMD's Ex-Precision and Ex-mAP, tie-aware, streamed.

_SUM_KEYS = ("num_pairs", "num_pairs_d", "num_pairs_s", "precision_d", "ap_d", "precision_s",
             "ap_s", "num_pairs_s_amd", "precision_s_amd", "ap_s_amd", "hist_k", "count_d",
             "top_d", "rank_precision_d", "count_s", "top_s", "rank_precision_s", "non_finite")
_VECTOR_KEYS = ("hist_k", "count_d", "top_d", "rank_precision_d", "count_s", "top_s",
                "rank_precision_s")
# Per-pair values whose sums per query the accumulator keeps for the bootstrap
# (reid_jax.explain.bootstrap): each metric is a ratio of two such sums.
GROUP_KEYS = ("num_pairs_d", "precision_d", "ap_d", "num_pairs_s", "precision_s", "ap_s",
              "num_pairs_s_amd", "precision_s_amd", "ap_s_amd")
# metric -> (numerator, denominator) among GROUP_KEYS.
AMD_RATIOS = {
    "ex_precision_d": ("precision_d", "num_pairs_d"),
    "ex_map_d": ("ap_d", "num_pairs_d"),
    "ex_precision_s": ("precision_s", "num_pairs_s"),
    "ex_map_s": ("ap_s", "num_pairs_s"),
    "ex_precision_s_amd": ("precision_s_amd", "num_pairs_s_amd"),
    "ex_map_s_amd": ("ap_s_amd", "num_pairs_s_amd"),
}


def _tie_stats(sep: Array, rel: Array) -> tuple[Array, Array, Array, Array]:
    """Per item: strictly-before count ``T``, tie-group size ``t`` (with itself) and the
    relevant items among them (``R``, ``r``), for a descending ranking of ``sep [B, A]``."""
    before = sep[:, None, :] > sep[:, :, None]  # [B, a, b]: b ranks strictly before a
    tied = sep[:, None, :] == sep[:, :, None]
    rel_b = rel[:, None, :]
    count = lambda m: jnp.sum(m, axis=-1, dtype=jnp.int32)
    return count(before), count(tied), count(before & rel_b), count(tied & rel_b)


def _expected_terms(T, t, R, r, m, harmonic):
    """``P(item in top m)`` and ``E[precision at its rank]`` (relevant item), tie-aware."""
    dtype = harmonic.dtype
    T, t, R, r = (x.astype(dtype) for x in (T, t, R, r))
    in_top = jnp.clip(m[:, None].astype(dtype) - T, 0.0, t) / t
    dh = harmonic[(T + t).astype(jnp.int32)] - harmonic[T.astype(jnp.int32)]
    coef = jnp.where(t > 1, (r - 1.0) / jnp.maximum(t - 1.0, 1.0), 0.0)
    rank_precision = ((R + 1.0) * dh + coef * (t - (T + 1.0) * dh)) / t
    return in_top, rank_precision


def over_shared(separation: Array) -> Array:
    """AMD's over-shared attributes of pairs whose labels all agree: bool ``[..., A]``, the
    attributes whose share ``max(sep_a, 0) / sum_b max(sep_b, 0)`` exceeds ``2 / A``.

    The share of the positive parts extends AMD's rule (defined for its non-negative
    contributions) to signed separations; a pair without a positive part has none.
    """
    pos = jnp.maximum(separation, 0.0)
    total = jnp.sum(pos, axis=-1, keepdims=True)
    return pos * separation.shape[-1] > 2.0 * total


def _block_sums(sep: Array, diff: Array, valid: Array) -> tuple[dict[str, Array],
                                                                  dict[str, Array]]:
    """AMD sums of one block of pairs: ``sep [B, A]``, ``diff bool [B, A]``, ``valid [B]``.

    Returns ``(sums, per_pair)``: the block's sums, and ``[B]`` per-pair values of
    :data:`GROUP_KEYS` (0 where a pair does not count).
    """
    b, a = sep.shape
    dtype = sep.dtype if jnp.issubdtype(sep.dtype, jnp.floating) else jnp.float32
    harmonic = jnp.asarray(harmonic_numbers(a), dtype)
    finite = jnp.all(jnp.isfinite(sep), axis=-1)
    non_finite = jnp.sum(valid & ~finite, dtype=jnp.int32)
    valid = valid & finite
    sep = jnp.where(valid[:, None], sep, 0.0).astype(dtype)
    diff = diff & valid[:, None]
    k = jnp.sum(diff, axis=-1, dtype=jnp.int32)
    pair_d = valid & (k > 0)
    pair_s = valid & (k > 0) & (k < a)

    T, t, R, r = _tie_stats(sep, diff)
    in_top_d, rp_d = _expected_terms(T, t, R, r, k, harmonic)
    # The ascending ranking against the agreeing attributes, from the same counts.
    same = ~diff
    k_s = a - k
    T_s = a - T - t
    r_s = t - r
    R_s = k_s[:, None] - (T - R) - r_s
    in_top_s, rp_s = _expected_terms(T_s, t, R_s, r_s, k_s, harmonic)

    def pair_mean(values, rel, kk, pairs):  # per pair: (1/k) sum_{a rel} values
        per_pair = jnp.sum(jnp.where(rel, values, 0.0), axis=-1) / jnp.maximum(kk, 1)
        return jnp.where(pairs, per_pair, 0.0)

    def per_attr(values, rel, pairs):
        return jnp.sum(jnp.where(rel & pairs[:, None], values, 0.0), axis=0)

    # AMD's rule for pairs whose labels all agree: the over-shared attributes count as misses
    # of both _s metrics (docs/design.md, "Explanations measured").
    all_agree = valid & (k == 0)
    shared_score = 1.0 - jnp.sum(over_shared(sep), axis=-1).astype(dtype) / a
    precision_s = pair_mean(in_top_s, same, k_s, pair_s)
    ap_s = pair_mean(rp_s, same, k_s, pair_s)
    per_pair = {
        "num_pairs_d": pair_d.astype(dtype),
        "precision_d": pair_mean(in_top_d, diff, k, pair_d),
        "ap_d": pair_mean(rp_d, diff, k, pair_d),
        "num_pairs_s": pair_s.astype(dtype),
        "precision_s": precision_s,
        "ap_s": ap_s,
        "num_pairs_s_amd": (pair_s | all_agree).astype(dtype),
        "precision_s_amd": jnp.where(all_agree, shared_score, precision_s),
        "ap_s_amd": jnp.where(all_agree, shared_score, ap_s),
    }
    rel_d = diff & pair_d[:, None]
    rel_s = same & pair_s[:, None]
    sums = {key: jnp.sum(value) for key, value in per_pair.items()}
    sums.update({
        "num_pairs": jnp.sum(valid, dtype=jnp.int32),
        "hist_k": jnp.zeros(a + 1, jnp.int32).at[k].add(valid.astype(jnp.int32)),
        "count_d": jnp.sum(rel_d, axis=0, dtype=jnp.int32),
        "top_d": per_attr(in_top_d, diff, pair_d),
        "rank_precision_d": per_attr(rp_d, diff, pair_d),
        "count_s": jnp.sum(rel_s, axis=0, dtype=jnp.int32),
        "top_s": per_attr(in_top_s, same, pair_s),
        "rank_precision_s": per_attr(rp_s, same, pair_s),
        "non_finite": non_finite,
    })
    return sums, per_pair


@functools.partial(jax.jit, static_argnames=("block",))
def amd_sums(sep: Array, diff: Array, valid: Array, *, block: int
              ) -> tuple[dict[str, Array], dict[str, Array]]:
    """:func:`_block_sums` over ``[P, A]`` pairs, ``block`` pairs at a time (bounded memory:
    the tie counts form ``block x A x A`` booleans); per-pair values ``[P]``."""
    p, a = sep.shape
    block = max(1, min(block, p))
    nb = -(-p // block)
    pad = nb * block - p
    sep = jnp.pad(sep, ((0, pad), (0, 0)))
    diff = jnp.pad(diff, ((0, pad), (0, 0)))
    valid = jnp.pad(valid, (0, pad))
    blocks = (sep.reshape(nb, block, a), diff.reshape(nb, block, a), valid.reshape(nb, block))

    def step(carry, xs):
        sums, per_pair = _block_sums(*xs)
        return jax.tree.map(jnp.add, carry, sums), per_pair

    init = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                        jax.eval_shape(_block_sums, *(x[0] for x in blocks))[0])
    total, per_pair = jax.lax.scan(step, init, blocks)
    return total, jax.tree.map(lambda x: x.reshape(nb * block)[:p], per_pair)


def chance_average_precision(num_relevant: int | np.ndarray, num_attributes: int) -> np.ndarray:
    """Expected AP of a uniformly random ranking of ``A`` items with ``k`` relevant:
    ``(1/A) (H_A + (k-1)/(A-1) (A - H_A))`` (all items tied; 0 for ``k = 0``)."""
    a = int(num_attributes)
    k = np.asarray(num_relevant, np.float64)
    h = harmonic_numbers(a)[a]
    coef = (k - 1.0) / (a - 1.0) if a > 1 else np.zeros_like(k)
    return np.where(k > 0, (h + coef * (a - h)) / a, 0.0)


class AmdAccumulator:
    """Streams AMD's Ex-Precision / Ex-mAP (``_d`` and ``_s``, overall and per attribute) over
    any number of pairs; memory is that of one ``update`` (see the module docstring for the
    definitions and the tie rule).

    With ``num_groups`` (e.g. the number of queries) it also keeps, per group, the sums of
    :data:`GROUP_KEYS` (every metric is a ratio of two of them, :data:`AMD_RATIOS`): what a
    bootstrap over groups resamples (:func:`group_sums`, ``reid_jax.explain.bootstrap``).

    Example::

        acc = AmdAccumulator(30)
        for sep, lq, lg in chunks:          # [P, 30] each, rows are pairs
            acc.update(sep, lq, lg)
        metrics = acc.result()
    """

    def __init__(self, num_attributes: int, *, names: Sequence[str] | None = None,
                 block: int = 4096, num_groups: int = 0):
        if num_attributes < 1:
            raise ValueError(f"num_attributes must be >= 1, got {num_attributes}")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        if num_groups < 0:
            raise ValueError(f"num_groups must be >= 0, got {num_groups}")
        self.num_attributes = int(num_attributes)
        self.names = _names(self.num_attributes, names)
        self.block = int(block)
        self.num_groups = int(num_groups)
        a = self.num_attributes
        self._sums: dict[str, np.ndarray] = {
            key: np.zeros(a + 1 if key == "hist_k" else (a,), np.float64)
            if key in _VECTOR_KEYS else np.zeros((), np.float64)
            for key in _SUM_KEYS}
        self._groups = {key: np.zeros(self.num_groups, np.float64) for key in GROUP_KEYS}

    def add_sums(self, sums: dict[str, Array], group_sums: dict[str, Any] | None = None,
             start: int = 0) -> None:
        host = jax.device_get(sums)
        if int(host["non_finite"]):
            raise ValueError(f"separation holds non-finite values in {int(host['non_finite'])} "
                             "valid pairs")
        for key in _SUM_KEYS:
            self._sums[key] = self._sums[key] + np.asarray(host[key], np.float64)
        if group_sums is not None and self.num_groups:
            for key in GROUP_KEYS:
                values = np.asarray(group_sums[key], np.float64)
                self._groups[key][start:start + values.shape[0]] += values

    def _groups_of(self, groups: Any, p: int) -> np.ndarray | None:
        if not self.num_groups:
            if groups is not None:
                raise ValueError("groups given, but the accumulator keeps none (num_groups=0)")
            return None
        if groups is None:
            raise ValueError(f"groups [P] are required: the accumulator keeps "
                             f"{self.num_groups} groups")
        g = np.asarray(groups)
        if g.shape != (p,) or not np.issubdtype(g.dtype, np.integer):
            raise ValueError(f"groups must be int [{p}], got {g.dtype}{list(g.shape)}")
        if p and (g.min() < 0 or g.max() >= self.num_groups):
            raise ValueError(f"groups must lie in [0, {self.num_groups}), got "
                             f"{g.min()}..{g.max()}")
        return g

    def update_differ(self, separation: Any, differ: Any, valid: Any | None = None,
                      groups: Any | None = None) -> AmdAccumulator:
        """Adds pairs given the differing-label mask directly.

        Args:
          separation: ``[P, A]`` "this attribute separates q and g" scores (e.g. ``e_a``).
          differ: bool ``[P, A]``, ground-truth labels of q and g differ.
          valid: optional bool ``[P]``; pairs outside it are ignored (e.g. no labels).
          groups: int ``[P]`` in ``[0, num_groups)`` (e.g. the query of every pair); required
            when the accumulator keeps groups.
        """
        a = self.num_attributes
        if jnp.ndim(separation) != 2 or jnp.shape(separation)[1] != a:
            raise ValueError(f"separation must have shape [P, {a}], got "
                             f"{jnp.shape(separation)}")
        p = jnp.shape(separation)[0]
        if jnp.shape(differ) != (p, a):
            raise ValueError(f"differ must have shape ({p}, {a}), got {jnp.shape(differ)}")
        if valid is not None and jnp.shape(valid) != (p,):
            raise ValueError(f"valid must have shape ({p},), got {jnp.shape(valid)}")
        g = self._groups_of(groups, p)
        if p == 0:
            return self
        sep = jnp.asarray(separation)
        if not jnp.issubdtype(sep.dtype, jnp.floating):
            sep = sep.astype(jnp.float32)
        ok = jnp.ones((p,), bool) if valid is None else jnp.asarray(valid, bool)
        sums, per_pair = amd_sums(sep, jnp.asarray(differ, bool), ok, block=self.block)
        group_sums = None
        if g is not None:
            host = jax.device_get(per_pair)
            group_sums = {key: np.bincount(g, weights=np.asarray(host[key], np.float64),
                                           minlength=self.num_groups) for key in GROUP_KEYS}
        self.add_sums(sums, group_sums)
        return self

    def update(self, separation: Any, labels_query: Any, labels_gallery: Any,
               valid: Any | None = None, groups: Any | None = None) -> AmdAccumulator:
        """Adds pairs: row ``i`` of ``separation [P, A]`` explains the pair of
        ``labels_query[i]`` and ``labels_gallery[i]`` (both ``[P, A]`` in {0, 1});
        ``valid`` optional bool ``[P]``; ``groups`` as in :meth:`update_differ`."""
        if jnp.ndim(separation) != 2 or jnp.shape(separation)[1] != self.num_attributes:
            raise ValueError(f"separation must have shape [P, {self.num_attributes}], got "
                             f"{jnp.shape(separation)}")
        shape = (jnp.shape(separation)[0], self.num_attributes)
        lq = check_binary("labels_query", labels_query, shape)
        lg = check_binary("labels_gallery", labels_gallery, shape)
        return self.update_differ(separation, lq != lg, valid, groups)

    def group_sums(self) -> dict[str, np.ndarray]:
        """Per group, the sums of :data:`GROUP_KEYS` (float64 ``[num_groups]`` each; a copy)."""
        return {key: value.copy() for key, value in self._groups.items()}

    def result(self) -> dict[str, Any]:
        """The metrics so far (``None`` where undefined: no pairs of that kind)."""
        s, a = self._sums, self.num_attributes
        n_d, n_s = float(s["num_pairs_d"]), float(s["num_pairs_s"])
        n_s_amd = float(s["num_pairs_s_amd"])
        hist = s["hist_k"]
        ks = np.arange(a + 1, dtype=np.float64)
        d_pairs = ks > 0
        s_pairs = (ks > 0) & (ks < a)
        chance = {
            "ex_precision_d": _ratio(np.sum(hist[d_pairs] * ks[d_pairs] / a), n_d),
            "ex_map_d": _ratio(np.sum(hist[d_pairs] * chance_average_precision(ks[d_pairs], a)),
                               n_d),
            "ex_precision_s": _ratio(np.sum(hist[s_pairs] * (a - ks[s_pairs]) / a), n_s),
            "ex_map_s": _ratio(np.sum(hist[s_pairs] *
                                      chance_average_precision(a - ks[s_pairs], a)), n_s),
        }
        # AMD's rule: an all-tied ranking has no over-shared attribute (every share is 1 / A).
        chance["ex_precision_s_amd"] = _ratio(
            np.sum(hist[s_pairs] * (a - ks[s_pairs]) / a) + hist[0], n_s_amd)
        chance["ex_map_s_amd"] = _ratio(
            np.sum(hist[s_pairs] * chance_average_precision(a - ks[s_pairs], a)) + hist[0],
            n_s_amd)
        per_attribute = {}
        for j, name in enumerate(self.names):
            cd, cs = float(s["count_d"][j]), float(s["count_s"][j])
            per_attribute[name] = {
                "count_d": int(cd),
                "precision_d": _ratio(s["top_d"][j], cd),
                "ap_d": _ratio(s["rank_precision_d"][j], cd),
                "count_s": int(cs),
                "precision_s": _ratio(s["top_s"][j], cs),
                "ap_s": _ratio(s["rank_precision_s"][j], cs),
            }
        return {
            "num_pairs": int(s["num_pairs"]),
            "num_pairs_d": int(n_d),
            "num_pairs_s": int(n_s),
            "num_pairs_s_amd": int(n_s_amd),
            **{metric: _ratio(s[num], s[den]) for metric, (num, den) in AMD_RATIOS.items()},
            "chance": chance,
            "differing_histogram": [int(x) for x in hist],
            "per_attribute": per_attribute,
        }


def amd_metrics(separation: Any, labels_query: Any, labels_gallery: Any,
                valid: Any | None = None, *, names: Sequence[str] | None = None,
                block: int = 4096) -> dict[str, Any]:
    """AMD's Ex-Precision_d/_s and Ex-mAP_d/_s for a batch of pairs (one-shot
    :class:`AmdAccumulator`).

    Args:
      separation: ``[P, A]`` the explanation's "this attribute separates q and g" score per
        pair (eq. 3.2: ``e_a``; eq. 3.1: ``1 - s_a``); higher = more responsible.
      labels_query, labels_gallery: ``[P, A]`` ground-truth labels in {0, 1} of each pair.
      valid: optional bool ``[P]`` of pairs to use.
      names: attribute names (default ``ATTRIBUTE_NAMES`` for ``A = 30``).
      block: pairs per step of the kernel (memory ``block * A * A`` booleans).

    Returns:
      See :meth:`AmdAccumulator.result`.
    """
    sep = _as_2d("separation", separation)
    acc = AmdAccumulator(sep.shape[1], names=names, block=block)
    return acc.update(sep, labels_query, labels_gallery, valid).result()


__all__ = [
    "AMD_RATIOS",
    "GROUP_KEYS",
    "MODES",
    "SCORE_MODES",
    "SCORE_RANGE",
    "AmdAccumulator",
    "AurocAccumulator",
    "amd_metrics",
    "amd_sums",
    "auroc",
    "chance_average_precision",
    "check_binary",
    "check_finite_array",
    "check_mode",
    "constant_auroc",
    "counterfactual_hit_rate",
    "harmonic_numbers",
    "histogram_auroc",
    "macro_auroc",
    "matching_score_auroc",
    "over_shared",
]
