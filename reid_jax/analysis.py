"""The paper's analysis of what the embedding encodes (section 4.2 Table 4.1, section 4.3 Fig. 4.1).

Everything here takes plain arrays: ``W`` [N, A] is the kernel of the bias-free attribute layer
(``x = sigmoid(f @ W)``, N embedding components, A attributes), ``features`` [G, N] are the
retrieval embeddings of G gallery images (the same ``f`` that is ranked and explained).

- **Table 4.1**: for each of the N components, the attribute with the largest weight
  (:func:`top1_attribute`); counts per attribute (:func:`top1_attribute_counts`) next to the
  attribute's positive ratio in the training split, per identity (:func:`table_4_1`). "Largest"
  is the *signed* maximum, the paper's "highest weight" (``by='signed'``); ``by='abs'`` uses the
  largest magnitude instead. Ties (exactly equal weights) go to the attribute that comes first
  in ``names``. How strongly counts follow positive ratios is measured with Pearson and
  Spearman correlations (:func:`count_ratio_correlation`).
- **Figure 4.1**: for one component, gallery images sorted by that component's value (highest
  first, and the lowest end), with its three highest- and three lowest-weighted attributes
  (:func:`component_figure`). :func:`most_selective_components` picks components whose weight
  magnitude is concentrated on one attribute, ``max_a |w_na| / sum_a |w_na|``.

:func:`write_analysis` writes all of it into a folder (atomic writes), for ``tools/analyze.py``.
Figures use matplotlib's object API (no pyplot state), so this module is safe to import anywhere.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import scipy.stats
from matplotlib.figure import Figure
from PIL import Image

from reid_jax import atomic_io
from reid_jax.data.market1501 import parse_filename

TOP1_RULES = ("signed", "abs")
NUM_EXTREME_ATTRIBUTES = 3  # The paper's first column: three highest, three lowest weights.
THUMBNAIL_HW = (128, 64)  # Market-1501 image size; every thumbnail is shown at this size.


# ---------------------------------------------------------------------------------------------
# Validation.


def check_weights(weights: Any, names: Sequence[str] | None = None) -> np.ndarray:
    """``W`` as float64 [N, A], checked: 2-D, non-empty, finite, A == len(names).

    Raises:
      ValueError: naming the shape (or the first non-finite entry) at fault.
    """
    w = np.asarray(weights)
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"attribute weights W must be [N, A] with N, A >= 1 (N embedding "
                         f"components, A attributes), got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.number) or np.issubdtype(w.dtype, np.complexfloating):
        raise ValueError(f"attribute weights W must be real numbers, got dtype {w.dtype}")
    w = w.astype(np.float64)
    bad = ~np.isfinite(w)
    if bad.any():
        n, a = np.argwhere(bad)[0]
        raise ValueError(f"attribute weights W [{w.shape[0]}, {w.shape[1]}] have "
                         f"{int(bad.sum())} non-finite entries, first at [{n}, {a}] = {w[n, a]}")
    if names is not None:
        _check_names(names, w.shape[1], "attribute weights W [N, A]")
    return w


def _check_names(names: Sequence[str], num_attributes: int, what: str) -> tuple[str, ...]:
    names = tuple(names)
    if len(names) != num_attributes:
        raise ValueError(f"{what} has A = {num_attributes} attributes but {len(names)} names "
                         f"were given ({list(names[:5])}{' ...' if len(names) > 5 else ''})")
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"attribute names must be non-empty strings, got {list(names)}")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"attribute names must be unique, duplicated: {dup}")
    return names


def _check_rule(by: str) -> None:
    if by not in TOP1_RULES:
        raise ValueError(f"by must be one of {TOP1_RULES} ('signed': the paper's highest "
                         f"weight; 'abs': the largest magnitude), got {by!r}")


def check_ratios(positive_ratio_percent: Any, num_attributes: int) -> np.ndarray:
    """Positive ratios as float64 [A] in percent, checked: shape [A], finite, within [0, 100]."""
    r = np.asarray(positive_ratio_percent, dtype=np.float64)
    if r.shape != (num_attributes,):
        raise ValueError(f"positive_ratio_percent must have shape ({num_attributes},) (one "
                         f"ratio per attribute of W), got {r.shape}")
    if not np.all(np.isfinite(r)) or r.min() < 0 or r.max() > 100:
        raise ValueError(f"positive_ratio_percent must be finite percentages in [0, 100], got "
                         f"min {np.nanmin(r)}, max {np.nanmax(r)}")
    return r


def check_features(features: Any, image_paths: Sequence[str] | None = None,
                   num_components: int | None = None) -> np.ndarray:
    """Gallery embeddings as float64 [G, N], checked against the paths and W's N.

    Raises:
      ValueError: features not [G, N], non-finite, G != len(image_paths), or N != W's N.
    """
    f = np.asarray(features)
    if f.ndim != 2 or f.shape[0] == 0 or f.shape[1] == 0:
        raise ValueError(f"features must be [G, N] with G, N >= 1 (G gallery images, N "
                         f"embedding components), got shape {f.shape}")
    f = f.astype(np.float64)
    if not np.all(np.isfinite(f)):
        g, n = np.argwhere(~np.isfinite(f))[0]
        raise ValueError(f"features [{f.shape[0]}, {f.shape[1]}] have non-finite entries, "
                         f"first at [{g}, {n}]")
    if image_paths is not None and len(image_paths) != f.shape[0]:
        raise ValueError(f"features have G = {f.shape[0]} rows but {len(image_paths)} image "
                         "paths were given (one path per row)")
    if num_components is not None and f.shape[1] != num_components:
        raise ValueError(f"features have N = {f.shape[1]} components but the attribute weights "
                         f"W have N = {num_components} rows (W must be [N, A])")
    return f


# ---------------------------------------------------------------------------------------------
# Table 4.1.


def top1_attribute(weights: Any, *, by: str = "signed") -> np.ndarray:
    """For each embedding component, the index of the attribute with the largest weight.

    Args:
      weights: W [N, A].
      by: ``'signed'`` — the largest ``w_na`` (the paper's "highest weight");
        ``'abs'`` — the largest ``|w_na|``.

    Returns:
      int64 [N] in 0..A-1. Exactly equal weights: the lowest attribute index wins.
    """
    _check_rule(by)
    w = check_weights(weights)
    return np.argmax(np.abs(w) if by == "abs" else w, axis=1)  # argmax: first of equal maxima.


def top1_attribute_counts(weights: Any, *, by: str = "signed") -> np.ndarray:
    """Table 4.1's "#Top1": per attribute, how many components have it as top-1 attribute.

    Args:
      weights: W [N, A].
      by: see :func:`top1_attribute`.

    Returns:
      int64 [A], summing to N.
    """
    w = check_weights(weights)
    return np.bincount(top1_attribute(w, by=by), minlength=w.shape[1]).astype(np.int64)


def identity_positive_ratios(labels: Any, pids: Any) -> tuple[np.ndarray, int]:
    """Per-identity positive ratios (percent) from per-image labels.

    Attribute labels of Market-1501 are per identity, so each identity counts once. Images with
    pid <= 0 (distractors 0, junk -1) are left out.

    Args:
      labels: {0, 1} [n, A] per image.
      pids: int [n].

    Returns:
      (float64 [A] percent, number of identities).

    Raises:
      ValueError: shapes disagree, labels not binary, no identity with pid > 0, or an identity
        whose images carry different labels.
    """
    labels = np.asarray(labels)
    pids = np.asarray(pids)
    if labels.ndim != 2 or pids.shape != (labels.shape[0],):
        raise ValueError(f"labels must be [n, A] and pids [n], got {labels.shape} and "
                         f"{pids.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be binary (0/1)")
    keep = pids > 0
    if not keep.any():
        raise ValueError("no image with an identity (pid > 0) to compute positive ratios from")
    ids, first = np.unique(pids[keep], return_index=True)
    per_id = labels[keep][first]
    inverse = np.searchsorted(ids, pids[keep])
    differs = np.any(labels[keep] != per_id[inverse], axis=1)
    if differs.any():
        pid = int(pids[keep][np.flatnonzero(differs)[0]])
        raise ValueError(f"identity {pid} has images with different attribute labels; "
                         "labels must be per identity")
    return 100.0 * per_id.astype(np.float64).mean(axis=0), int(ids.size)


class Table41Row(NamedTuple):
    """One row of Table 4.1: attribute name, #Top1 count, positive ratio in percent (nan if
    unknown)."""

    attribute: str
    count: int
    positive_ratio: float


def table_4_1(weights: Any, positive_ratio_percent: Any | None, names: Sequence[str], *,
              by: str = "signed") -> list[Table41Row]:
    """Table 4.1: top-1 counts per attribute next to their positive ratios.

    Args:
      weights: W [N, A].
      positive_ratio_percent: [A] in percent (training split, per identity, e.g.
        ``attributes.positive_ratios(load_market_attributes(f).train_labels)``), or None.
      names: A attribute names, the columns of W.
      by: see :func:`top1_attribute`.

    Returns:
      A rows, sorted by count descending; equal counts by positive ratio descending, then in
      ``names`` order.
    """
    w = check_weights(weights, names)
    names = tuple(names)
    counts = top1_attribute_counts(w, by=by)
    ratios = (np.full(w.shape[1], np.nan) if positive_ratio_percent is None
              else check_ratios(positive_ratio_percent, w.shape[1]))
    key_ratio = np.nan_to_num(ratios, nan=0.0)
    order = np.lexsort((np.arange(w.shape[1]), -key_ratio, -counts))
    return [Table41Row(names[a], int(counts[a]), float(ratios[a])) for a in order]


class Correlation(NamedTuple):
    """Correlation between top-1 counts and positive ratios over the attributes (nan when
    undefined: fewer than 3 attributes or a constant column)."""

    pearson_r: float
    pearson_p: float
    spearman_rho: float
    spearman_p: float
    num_attributes: int


def count_ratio_correlation(counts: Any, positive_ratio_percent: Any) -> Correlation:
    """Pearson and Spearman correlation of Table 4.1's counts [A] with the positive ratios [A]."""
    c = np.asarray(counts, dtype=np.float64)
    r = np.asarray(positive_ratio_percent, dtype=np.float64)
    if c.ndim != 1 or c.shape != r.shape:
        raise ValueError(f"counts and positive ratios must both be [A], got {c.shape} and "
                         f"{r.shape}")
    nan = float("nan")
    if c.size < 3 or np.ptp(c) == 0 or np.ptp(r) == 0 or not np.all(np.isfinite(r)):
        return Correlation(nan, nan, nan, nan, int(c.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pearson = scipy.stats.pearsonr(c, r)
        spearman = scipy.stats.spearmanr(c, r)
    return Correlation(float(pearson.statistic), float(pearson.pvalue),
                       float(spearman.statistic), float(spearman.pvalue), int(c.size))


def _rule_text(by: str) -> str:
    return ("largest signed weight, the paper's \"highest weight\"" if by == "signed"
            else "largest weight magnitude |w|")


def _fmt_ratio(r: float) -> str:
    return "n/a" if math.isnan(r) else f"{r:.2f}"


def correlation_text(corr: Correlation) -> str:
    """One line: ``Pearson r = 0.62 (p = 2.3e-04), Spearman rho = ... over 30 attributes``."""
    if math.isnan(corr.pearson_r):
        return (f"correlation of #Top1 with positive ratio: undefined over "
                f"{corr.num_attributes} attributes (fewer than 3, or a constant column)")
    return (f"correlation of #Top1 with positive ratio over {corr.num_attributes} attributes: "
            f"Pearson r = {corr.pearson_r:.3f} (p = {corr.pearson_p:.2g}), "
            f"Spearman rho = {corr.spearman_rho:.3f} (p = {corr.spearman_p:.2g})")


def table_markdown(rows: Sequence[Table41Row], *, num_components: int, by: str = "signed",
                   ratio_source: str = "", correlation: Correlation | None = None) -> str:
    """Table 4.1 as a markdown table with a caption stating the top-1 rule and ratio source."""
    _check_rule(by)
    caption = (f"**Table 4.1.** Number of the {num_components} embedding components whose "
               f"largest attribute weight ({_rule_text(by)}) belongs to each attribute, next to "
               "the attribute's positive ratio")
    caption += f" ({ratio_source})." if ratio_source else "."
    lines = [caption, "", "| Attribute | #Top1 | Positive ratio (%) |", "|---|---:|---:|"]
    lines += [f"| {r.attribute} | {r.count} | {_fmt_ratio(r.positive_ratio)} |" for r in rows]
    if correlation is not None:
        lines += ["", correlation_text(correlation) + "."]
    return "\n".join(lines) + "\n"


def table_csv(rows: Sequence[Table41Row]) -> str:
    """Table 4.1 as CSV: ``attribute,top1_count,positive_ratio_percent`` (empty if unknown)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["attribute", "top1_count", "positive_ratio_percent"])
    for r in rows:
        writer.writerow([r.attribute, r.count,
                         "" if math.isnan(r.positive_ratio) else f"{r.positive_ratio:.4f}"])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Table 4.1 chart.


def table_figure(rows: Sequence[Table41Row], out_png: str | os.PathLike, *, by: str = "signed",
                 correlation: Correlation | None = None) -> str:
    """Bar chart of Table 4.1: #Top1 per attribute (bars) and positive ratio (second axis).

    Returns the PNG's absolute path.
    """
    if not rows:
        raise ValueError("table_figure: no rows")
    _check_rule(by)
    names = [r.attribute for r in rows]
    counts = np.array([r.count for r in rows], dtype=np.float64)
    ratios = np.array([r.positive_ratio for r in rows], dtype=np.float64)
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(8.0, 0.42 * len(rows) + 2.0), 5.2), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(x, counts, width=0.7, color="tab:blue", label="#Top1 components")
    ax.set_ylabel("#Top1 (embedding components)", color="tab:blue")
    ax.tick_params(axis="y", colors="tab:blue")
    ax.set_xticks(x, names, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.grid(axis="y", alpha=0.3)
    if np.all(np.isfinite(ratios)):
        ax2 = ax.twinx()
        ax2.plot(x, ratios, "o", color="tab:orange", label="positive ratio")
        ax2.set_ylabel("positive ratio in training split (%)", color="tab:orange")
        ax2.tick_params(axis="y", colors="tab:orange")
        ax2.set_ylim(0, max(5.0, float(ratios.max()) * 1.08))
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        fig.legend(handles, [h.get_label() for h in handles], loc="outside lower center",
                   ncols=2)
    title = f"Table 4.1: top-1 attribute per embedding component ({_rule_text(by)})"
    if correlation is not None and not math.isnan(correlation.pearson_r):
        title += (f"\nPearson r = {correlation.pearson_r:.2f}, Spearman rho = "
                  f"{correlation.spearman_rho:.2f} (#Top1 vs positive ratio)")
    fig.suptitle(title, fontsize=11)
    return atomic_io.save_figure(fig, out_png)


# ---------------------------------------------------------------------------------------------
# Figure 4.1.


def selectivity(weights: Any) -> np.ndarray:
    """How concentrated each component's weights are on one attribute: float64 [N] in [1/A, 1].

    ``s_n = max_a |w_na| / sum_a |w_na|``: 1 when component n feeds a single attribute, 1/A when
    its weight is spread evenly; 0 for an all-zero row.
    """
    a = np.abs(check_weights(weights))
    total = a.sum(axis=1)
    return np.divide(a.max(axis=1), total, out=np.zeros_like(total), where=total > 0)


def most_selective_components(weights: Any, k: int) -> np.ndarray:
    """The k components with the highest :func:`selectivity`, most selective first.

    Returns int64 [min(k, N)]; equal selectivity: lower component index first.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    s = selectivity(weights)
    return np.argsort(-s, kind="stable")[:k].astype(np.int64)


def extreme_attributes(component_weights: Any, names: Sequence[str],
                       k: int = NUM_EXTREME_ATTRIBUTES
                       ) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The k highest- and k lowest-weighted attributes of one component (the paper's first column).

    Args:
      component_weights: ``W[n, :]``, [A] — the weights of component n to every attribute.
      names: A attribute names.

    Returns:
      (highest first: [(name, w)] * min(k, A), lowest first: [(name, w)] * min(k, A)).
      Equal weights keep ``names`` order.
    """
    w = np.asarray(component_weights, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"component weights must be [A] (one row W[n, :]), got shape {w.shape}")
    names = _check_names(names, w.shape[0], "component weights [A]")
    k = min(k, w.size)
    high = np.argsort(-w, kind="stable")[:k]
    low = np.argsort(w, kind="stable")[:k]
    return ([(names[a], float(w[a])) for a in high], [(names[a], float(w[a])) for a in low])


def sorted_gallery(values: Any, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Gallery indices for a component figure: its highest and lowest values.

    Args:
      values: [G], one component's value for every gallery image.
      num_images: images per end.

    Returns:
      (top: the min(num_images, G) highest, descending; bottom: up to num_images lowest that
      are not in ``top``, still descending so the last is the lowest). Equal values: lower
      index first.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"component values must be [G] with G >= 1, got shape {v.shape}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    order = np.argsort(-v, kind="stable")
    n_top = min(num_images, v.size)
    n_bottom = min(num_images, v.size - n_top)
    return order[:n_top], order[v.size - n_bottom:]


def _thumbnail(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gallery image not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((THUMBNAIL_HW[1], THUMBNAIL_HW[0]),
                                          Image.Resampling.BICUBIC)
            return np.asarray(im)
    except OSError as e:
        raise ValueError(f"gallery image {path} does not decode: {e}") from e


def _caption(path: str, rank: int, value: float) -> str:
    try:
        pid = f"id {parse_filename(path).pid:04d}"
    except ValueError:
        pid = os.path.basename(path)[:12]
    return f"#{rank}  {pid}\n{value:+.3f}"


def component_figure(values: Any, image_paths: Sequence[str], component_weights: Any,
                     names: Sequence[str], out_png: str | os.PathLike, *,
                     num_images: int = 10, component: int | None = None) -> str:
    """Figure 4.1 for one embedding component: the gallery sorted by that component's value.

    The top row shows the ``num_images`` images with the highest values (rank 1 first), the
    bottom row the lowest end of the same descending ranking (the last image has the lowest
    value). Under each image: its rank, its identity (from a Market-1501 file name) and the
    value. The first column lists the three highest- and three lowest-weighted attributes with
    their weights, as in the paper; a high value of the component raises the first and
    inhibits the second.

    Args:
      values: [G], the component's value for each gallery image (``features[:, n]``).
      image_paths: G image files.
      component_weights: [A], ``W[n, :]``.
      names: A attribute names.
      out_png: the PNG to write (atomically).
      num_images: images per row.
      component: the component index n, for the title.

    Returns:
      The PNG's absolute path.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"component values must be [G], got shape {v.shape}")
    check_features(v[:, None], image_paths)
    high, low = extreme_attributes(component_weights, names)
    top, bottom = sorted_gallery(v, num_images)
    ranks = np.empty(v.size, np.int64)
    ranks[np.argsort(-v, kind="stable")] = np.arange(1, v.size + 1)

    rows = [("highest values", top)] + ([("lowest values", bottom)] if bottom.size else [])
    cols = max(len(top), 1)
    thumb_w, thumb_h, text_w = 1.0, 2.45, 2.2  # inches per cell at dpi 100 (image + caption).
    fig = Figure(figsize=(text_w + cols * thumb_w, 0.45 + len(rows) * thumb_h),
                 layout="constrained")
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.04, wspace=0.02, hspace=0.04)
    grid = fig.add_gridspec(len(rows), cols + 1, width_ratios=[text_w / thumb_w] + [1] * cols)
    text_ax = fig.add_subplot(grid[:, 0])
    text_ax.axis("off")
    lines = ["highest weights"] + [f"  {n}  {w:+.3f}" for n, w in high]
    lines += ["", "lowest weights"] + [f"  {n}  {w:+.3f}" for n, w in low]
    text_ax.text(0.02, 0.5, "\n".join(lines), va="center", ha="left", family="monospace",
                 fontsize=10, transform=text_ax.transAxes, linespacing=1.5)
    for r, (label, idx) in enumerate(rows):
        for c, g in enumerate(idx.tolist()):
            ax = fig.add_subplot(grid[r, c + 1])
            ax.imshow(_thumbnail(image_paths[g]), interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(_caption(image_paths[g], int(ranks[g]), float(v[g])), fontsize=8,
                          labelpad=2)
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    name = "component" if component is None else f"component {component}"
    fig.suptitle(f"{name}: {v.size} gallery images sorted by its value (highest first)",
                 fontsize=11)
    return atomic_io.save_figure(fig, out_png)


# ---------------------------------------------------------------------------------------------
# Everything at once (tools/analyze.py).


def _parse_components(components: Sequence[int], num_components: int) -> list[int]:
    out = []
    for n in components:
        if not isinstance(n, (int, np.integer)) or not 0 <= n < num_components:
            raise ValueError(f"component {n!r} is not in 0..{num_components - 1} (W has N = "
                             f"{num_components} rows)")
        if int(n) not in out:
            out.append(int(n))
    return out


def write_analysis(weights: Any, names: Sequence[str], output_dir: str | os.PathLike, *,
                   positive_ratio_percent: Any | None = None, ratio_source: str = "",
                   features: Any | None = None, image_paths: Sequence[str] | None = None,
                   components: Sequence[int] | None = None, num_selective: int = 4,
                   num_images: int = 10, by: str = "signed") -> dict[str, Any]:
    """Writes Table 4.1 (``table_4_1.md``, ``.csv``, ``.png``) and Figure 4.1
    (``component_<n>.png``) into ``output_dir``.

    Args:
      weights: W [N, A].
      names: A attribute names.
      output_dir: created if missing.
      positive_ratio_percent: [A] or None (the table then shows "n/a" and no correlation).
      ratio_source: where the ratios come from, for the table's caption.
      features: [G, N] gallery embeddings, or None for no component figures.
      image_paths: G gallery image files (needed with ``features``).
      components: the components to draw; None: the ``num_selective`` most selective ones.
      num_images: images per row of a component figure.
      by: the top-1 rule (:func:`top1_attribute`).

    Returns:
      A summary: ``rows`` (Table41Row list), ``correlation``, ``markdown``, ``files``
      (written paths), ``components`` (drawn), ``selectivity`` (of the drawn components).
    """
    w = check_weights(weights, names)
    rows = table_4_1(w, positive_ratio_percent, names, by=by)
    corr = None
    if positive_ratio_percent is not None:
        corr = count_ratio_correlation([r.count for r in rows], [r.positive_ratio for r in rows])
    markdown = table_markdown(rows, num_components=w.shape[0], by=by, ratio_source=ratio_source,
                              correlation=corr)
    out = os.fspath(output_dir)
    files = [atomic_io.write_text(os.path.join(out, "table_4_1.md"), markdown),
             atomic_io.write_text(os.path.join(out, "table_4_1.csv"), table_csv(rows)),
             table_figure(rows, os.path.join(out, "table_4_1.png"), by=by, correlation=corr)]
    drawn: list[int] = []
    if features is not None:
        if image_paths is None:
            raise ValueError("write_analysis: features given without image_paths")
        f = check_features(features, image_paths, w.shape[0])
        if components is None and (isinstance(num_selective, bool) or num_selective < 1):
            raise ValueError(f"num_selective must be a positive integer (components to draw), "
                             f"got {num_selective!r}")
        drawn = (_parse_components(components, w.shape[0]) if components is not None
                 else most_selective_components(w, num_selective).tolist())
        # Figures of components this run does not draw are from an earlier run: remove them,
        # so the folder holds one analysis.
        keep = {f"component_{n}.png" for n in drawn}
        for name in os.listdir(out) if os.path.isdir(out) else ():
            if re.fullmatch(r"component_\d+\.png", name) and name not in keep:
                os.remove(os.path.join(out, name))
        for n in drawn:
            files.append(component_figure(f[:, n], image_paths, w[n], names,
                                          os.path.join(out, f"component_{n}.png"),
                                          num_images=num_images, component=n))
    elif components:
        raise ValueError("write_analysis: components given without features")
    sel = selectivity(w)
    return {"rows": rows, "correlation": corr, "markdown": markdown, "files": files,
            "components": drawn, "selectivity": [float(sel[n]) for n in drawn]}


# ---------------------------------------------------------------------------------------------
# Inputs written by other tools.


class FeatureFile(NamedTuple):
    """An ``.npz`` of ``tools/extract_features.py`` (plus optional ground-truth labels).

    Attributes:
      features: float [G, N] retrieval embeddings.
      paths: G image paths (resolved).
      attribute_labels: optional {0, 1} uint8 [G, A] ground-truth labels per image (key
        ``attribute_labels``; ``extract_features.py`` does not write it).
      attributes: optional float [G, A] *predicted* probabilities ``sigmoid(f @ W)`` (key
        ``attributes``, as ``extract_features.py`` writes it); never used as labels.
    """

    features: np.ndarray
    paths: tuple[str, ...]
    attribute_labels: np.ndarray | None
    attributes: np.ndarray | None


def _resolve_path(p: str, bases: Sequence[str]) -> str:
    if os.path.isabs(p):
        return p
    for base in bases:
        candidate = os.path.join(base, p)
        if os.path.exists(candidate):
            return candidate
    return os.path.abspath(p)


FEATURE_KEYS = "'paths' [G], 'features' [G, N], optional 'attribute_labels' [G, A] in {0, 1}"


def load_features_npz(path: str | os.PathLike, data_root: str | None = None) -> FeatureFile:
    """Reads a features ``.npz``: keys ``paths`` [G], ``features`` [G, N], optional
    ``attribute_labels`` [G, A] (ground truth, {0, 1}) and ``attributes`` [G, A] (predicted
    probabilities, as ``tools/extract_features.py`` writes them; other keys are ignored).

    Relative image paths are looked up below ``data_root``, then beside the ``.npz``, then the
    working directory.

    Raises:
      FileNotFoundError: no such file. ValueError: not an ``.npz``, a key is missing, shapes
      disagree or ``attribute_labels`` are not binary.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"features file not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated or foreign
        raise ValueError(f"{path}: not a readable .npz ({e}); expected {FEATURE_KEYS}") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single array, not an .npz; expected {FEATURE_KEYS}")
    with z:
        missing = [k for k in ("paths", "features") if k not in z.files]
        if missing:
            raise ValueError(f"{path}: missing keys {missing} (has {sorted(z.files)}; expected "
                             f"{FEATURE_KEYS})")
        try:
            raw_paths = z["paths"]
            features = z["features"]
            labels = z["attribute_labels"] if "attribute_labels" in z.files else None
            probabilities = z["attributes"] if "attributes" in z.files else None
        except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            # object arrays (which need pickle), or a damaged member
            raise ValueError(f"{path}: {e}") from e
    if raw_paths.ndim != 1:
        raise ValueError(f"{path}: 'paths' must be [G], got shape {raw_paths.shape}")
    bases = [b for b in (data_root, os.path.dirname(os.path.abspath(path))) if b]
    paths = tuple(_resolve_path(str(p), bases) for p in raw_paths.tolist())
    try:
        features = check_features(features, paths)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    for key, a in (("attribute_labels", labels), ("attributes", probabilities)):
        if a is not None and (a.ndim != 2 or a.shape[0] != len(paths)):
            raise ValueError(f"{path}: {key!r} must be [G, A] with G = {len(paths)}, got shape "
                             f"{a.shape}")
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.number) and labels.dtype != bool:
            raise ValueError(f"{path}: 'attribute_labels' must be numeric 0/1, got dtype "
                             f"{labels.dtype}")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"{path}: 'attribute_labels' must be ground-truth labels in "
                             "{0, 1}, got other values (predicted probabilities belong under "
                             "'attributes')")
        labels = labels.astype(np.uint8)
    return FeatureFile(features, paths, labels, probabilities)


def pids_from_paths(paths: Sequence[str]) -> np.ndarray:
    """int64 [G] identities parsed from Market-1501 file names (ValueError names a bad one)."""
    return np.array([parse_filename(p).pid for p in paths], dtype=np.int64)
