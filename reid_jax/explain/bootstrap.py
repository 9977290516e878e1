"""95 % intervals of the explanation metrics by a bootstrap over queries (or counterfactual
images), computed from per-group sums (``docs/design.md``, "Intervals").

Every metric here is a ratio of sums over pairs, and the pairs come in groups — the pairs of
one query, or the pairs of one counterfactual image — that are not independent of each other.
The bootstrap resamples whole groups with replacement: replicate ``r`` weighs group ``i`` by
its multinomial count ``c_ri`` (``sum_i c_ri = G``), so a ratio ``sum num / sum den`` becomes
``(c_r . num) / (c_r . den)``, one small matrix product for all replicates — the pairs are
never touched again.  The streamed accumulators of ``reid_jax.explain.metrics`` keep these
per-group sums (``num_groups``).

* :func:`resample_counts` — the counts ``[R, G]`` (seeded; shared by every method measured on
  the same groups, so differences between methods are paired);
* :func:`ratio_interval` — percentile interval of a ratio of sums (AMD, hit rates);
* :func:`difference_interval` — of the difference of two such ratios (an explanation minus the
  prior), on the same replicates;
* :func:`histogram_auroc_interval` — AUROC from per-group class histograms; the histograms are
  binned coarsely to bound memory, so the interval is the point estimate plus the percentiles
  of ``binned replicate - binned estimate`` (the binning shifts both alike);
* :func:`constant_auroc_interval` — the pooled AUROC of a constant score per attribute.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from reid_jax.explain import metrics as em

DEFAULT_SAMPLES = 1000
LEVEL = 0.95


def resample_counts(num_groups: int, num_samples: int = DEFAULT_SAMPLES,
                    seed: int = 0) -> np.ndarray:
    """float64 ``[num_samples, num_groups]`` multinomial counts (each row sums to the groups).

    Raises:
      ValueError: fewer than 1 group or sample.
    """
    if num_groups < 1 or num_samples < 1:
        raise ValueError(f"a bootstrap needs >= 1 group and sample, got {num_groups}, "
                         f"{num_samples}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1729]))
    return rng.multinomial(num_groups, np.full(num_groups, 1.0 / num_groups),
                           size=num_samples).astype(np.float64)


def _percentiles(values: np.ndarray, level: float) -> list[float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = 50.0 * (1.0 - level)
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def _check(counts: np.ndarray, *arrays: np.ndarray) -> None:
    for a in arrays:
        if a.shape[0] != counts.shape[1]:
            raise ValueError(f"per-group sums have {a.shape[0]} groups, the counts "
                             f"{counts.shape[1]}")


def _ratios(numerator: Any, denominator: Any, counts: np.ndarray) -> np.ndarray:
    num = np.asarray(numerator, np.float64)
    den = np.asarray(denominator, np.float64)
    _check(counts, num, den)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ num) / (counts @ den)  # a replicate without pairs gives NaN


def ratio_interval(numerator: Any, denominator: Any, counts: np.ndarray,
                   level: float = LEVEL) -> list[float] | None:
    """Percentile interval of ``sum(numerator) / sum(denominator)`` over resampled groups.

    Args:
      numerator, denominator: ``[G]`` per-group sums.
      counts: ``[R, G]`` from :func:`resample_counts`.
      level: coverage.

    Returns:
      ``[lo, hi]``, or ``None`` when no replicate has a pair (replicates without one are
      left out).
    """
    return _percentiles(_ratios(numerator, denominator, counts), level)


def difference_interval(numerator: Any, denominator: Any, base_numerator: Any,
                        base_denominator: Any, counts: np.ndarray,
                        level: float = LEVEL) -> list[float] | None:
    """Interval of ``ratio - base ratio`` on the same replicates (a paired comparison)."""
    return _percentiles(_ratios(numerator, denominator, counts)
                        - _ratios(base_numerator, base_denominator, counts), level)


def _shifted(point: float | None, binned_point: float, replicates: np.ndarray,
             level: float) -> list[float] | None:
    if point is None or not np.isfinite(binned_point):
        return None
    spread = _percentiles(replicates - binned_point, level)
    return None if spread is None else [point + spread[0], point + spread[1]]


def histogram_auroc_interval(pos: Any, neg: Any, counts: np.ndarray, point: float | None,
                             level: float = LEVEL) -> list[float] | None:
    """Interval of a pooled AUROC from per-group histograms ``pos, neg [G, bins]``.

    ``point`` is the exact (or finely binned) estimate; the interval is ``point`` plus the
    percentiles of ``replicate - estimate``, both from the coarse per-group histograms.
    """
    p = np.asarray(pos, np.float64)
    n = np.asarray(neg, np.float64)
    _check(counts, p, n)
    binned = float(em.histogram_auroc(p.sum(0), n.sum(0)))
    return _shifted(point, binned, em.histogram_auroc(counts @ p, counts @ n), level)


def macro_auroc_interval(pos: Any, neg: Any, counts: np.ndarray, point: float | None,
                         level: float = LEVEL) -> list[float] | None:
    """Interval of the mean of per-attribute AUROCs from ``pos, neg [G, A, bins]`` (shifted
    like :func:`histogram_auroc_interval`; attributes without both classes in a replicate are
    left out of its mean)."""
    p = np.asarray(pos, np.float64)
    n = np.asarray(neg, np.float64)
    _check(counts, p, n)
    g, a, b = p.shape

    def macro(values: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():  # a replicate with no defined attribute gives NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.where(np.isfinite(values), values, np.nan), axis=-1)

    binned = float(macro(em.histogram_auroc(p.sum(0), n.sum(0))))
    rep = em.histogram_auroc((counts @ p.reshape(g, a * b)).reshape(-1, a, b),
                             (counts @ n.reshape(g, a * b)).reshape(-1, a, b))
    return _shifted(point, binned, macro(rep), level)


def constant_auroc_interval(pos: Any, neg: Any, constants: Any, counts: np.ndarray,
                            level: float = LEVEL) -> list[float] | None:
    """Interval of :func:`reid_jax.explain.metrics.constant_auroc` from per-group class
    counts ``pos, neg [G, A]`` (exact per replicate: a constant score has no binning)."""
    p = np.asarray(pos, np.float64)
    n = np.asarray(neg, np.float64)
    _check(counts, p, n)
    return _percentiles(em.constant_auroc(counts @ p, counts @ n, constants), level)


def amd_intervals(group_sums: dict[str, np.ndarray], counts: np.ndarray,
                  base: dict[str, np.ndarray] | None = None,
                  level: float = LEVEL) -> dict[str, Any]:
    """Intervals of every AMD metric (``metrics.AMD_RATIOS``) from an accumulator's
    ``group_sums()``; with ``base`` (another explanation's sums on the same groups) the
    intervals of the differences instead."""
    out: dict[str, Any] = {}
    for metric, (num, den) in em.AMD_RATIOS.items():
        if base is None:
            out[metric] = ratio_interval(group_sums[num], group_sums[den], counts, level)
        else:
            out[metric] = difference_interval(group_sums[num], group_sums[den], base[num],
                                              base[den], counts, level)
    return out


def grouped_means(values: Any, groups: Any, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sums, counts)`` ``[num_groups]`` of per-row ``values [P]`` by ``groups [P]``: the
    per-group sums of a mean over rows (e.g. hit rates by counterfactual image)."""
    v = np.asarray(values, np.float64)
    g = np.asarray(groups)
    if v.shape != g.shape or v.ndim != 1:
        raise ValueError(f"values and groups must be [P] alike, got {v.shape}, {g.shape}")
    return (np.bincount(g, weights=v, minlength=num_groups),
            np.bincount(g, minlength=num_groups).astype(np.float64))


__all__ = [
    "DEFAULT_SAMPLES", "LEVEL", "amd_intervals", "constant_auroc_interval",
    "difference_interval", "grouped_means", "histogram_auroc_interval", "macro_auroc_interval",
    "ratio_interval", "resample_counts",
]
