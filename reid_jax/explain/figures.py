"""The figures of the explanation report (matplotlib's object API, no pyplot state).

* :func:`error_figure` — the error composition of one ranked image, like the paper's Figure
  4.3: a pie of the positive part of eq. 3.2 with the negative contributions listed beside it
  (``paper``), a pie of the complete decomposition (``complete``), a pie of the projection
  contributions with the remainder as its own slice (``projection``), or bars of the
  probabilities that the labels differ (``disagreement``, not a decomposition);
  ``docs/design.md``, "Two error compositions" and the sections after it, says why.
* :func:`metrics_figure` — the CMC curve and the histogram of per-query APs.

Every attribute keeps one colour (:func:`attribute_colors`) so pies compare across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from reid_jax.data.attributes import ATTRIBUTE_NAMES

PIE_SLICES = 7  # Largest contributions drawn as slices; the rest is one "other" slice.
LISTED_NEGATIVES = 8
MIN_SLICE_SHARE = 0.03
FIGURE_SIZE = (5.6, 2.5)  # inches of an error composition figure (560 x 250 px)


def attribute_colors(names: Sequence[str] = ATTRIBUTE_NAMES) -> dict[str, tuple]:
    """A fixed colour per attribute, so a pie's slices compare across ranks and queries."""
    palette = [*colormaps["tab20"].colors, *colormaps["tab20b"].colors]
    return {n: palette[i % len(palette)] for i, n in enumerate(names)}


_OTHER_COLOR = (0.82, 0.83, 0.85)
_REMAINDER_COLOR = (0.55, 0.57, 0.60)
REMAINDER = "remainder"
FIGURE_MODES = ("paper", "complete", "projection", "disagreement")
LISTED_DIFFER = 10
LISTED_PROJECTION = 4  # largest and most negative contributions listed beside the pie


def _slices(values: np.ndarray, names: Sequence[str],
            remainder: float = 0.0) -> tuple[list[str], list[float]]:
    """The largest ``values`` (all > 0) as slices; the small rest is one ``other`` slice; a
    positive ``remainder`` is its own slice, last.  "Small" is relative to the attributes'
    total, so a large remainder does not hide every attribute in ``other``."""
    order = np.argsort(-values, kind="stable")
    order = order[values[order] > 0]
    total = float(values[order].sum())
    keep = [i for i in order[:PIE_SLICES] if values[i] >= MIN_SLICE_SHARE * total]
    rest = [i for i in order if i not in keep]
    labels = [names[i] for i in keep]
    sizes = [float(values[i]) for i in keep]
    if rest:
        labels.append(f"other ({len(rest)})")
        sizes.append(float(values[rest].sum()))
    if remainder > 0:
        labels.append(REMAINDER)
        sizes.append(float(remainder))
    return labels, sizes


def _negatives(e: np.ndarray, names: Sequence[str]) -> list[str]:
    neg = np.argsort(e, kind="stable")
    neg = neg[e[neg] < 0]
    lines = ["negative (pull together):"]
    lines += [f"  {names[i]:<10} {e[i]:+.3g}" for i in neg[:LISTED_NEGATIVES]]
    if neg.size > LISTED_NEGATIVES:
        lines.append(f"  … {neg.size - LISTED_NEGATIVES} more, "
                     f"Σ {e[neg[LISTED_NEGATIVES:]].sum():+.3g}")
    if neg.size == 0:
        lines.append("  none")
    else:
        lines.append(f"  total {e[neg].sum():+.3g}")
    return lines


def _disagreement_figure(p: np.ndarray, distance: float, rank: int, gallery_label: str,
                         names: Sequence[str]) -> Figure:
    """Bars of the largest probabilities that the labels differ."""
    fig = Figure(figsize=FIGURE_SIZE, dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.2, 0.08, 0.74, 0.72))
    colors = attribute_colors(names)
    top = np.argsort(-p, kind="stable")[:LISTED_DIFFER][::-1]
    ax.barh(np.arange(top.size), 100 * p[top], color=[colors[names[i]] for i in top],
            height=0.7)
    ax.set_yticks(np.arange(top.size), [names[i] for i in top], fontsize=7)
    ax.set_xlim(0, 100)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("P(labels differ) %", fontsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.text(0.02, 0.95, f"rank {rank} · {gallery_label} · d² = {distance:.4g}", fontsize=9,
             fontweight="bold", va="center")
    fig.text(0.02, 0.86, f"P(labels differ), largest {top.size}: not a decomposition of d²",
             fontsize=7, color="#444", va="center")
    return fig


def error_figure(errors: Sequence[float], distance: float, *, mode: str, rank: int,
                 gallery_label: str, names: Sequence[str] = ATTRIBUTE_NAMES,
                 remainder: float | None = None) -> Figure:
    """Figure 4.3 for one ranked gallery image: its error composition.

    Args:
      errors: ``[A]`` the explanation of the mode (eq. 3.2 in ``paper`` mode, the complete
        decomposition, the projection contributions, or the probabilities that the labels
        differ).
      distance: the pair's squared distance.
      mode: ``paper``: pie of the positive part, negative contributions listed beside it;
        ``complete``: pie of all contributions (they sum to ``distance``), largest listed;
        ``projection``: pie of the positive contributions and the ``remainder`` slice (they
        sum to ``distance`` with the negative contributions, listed beside it);
        ``disagreement``: bars of the largest probabilities.
      rank: 1-based rank, for the title.  gallery_label: e.g. ``id 0005 cam 2``.
      remainder: ``projection`` only: ``|r|^2``, the part of the distance outside the
        attribute directions.

    Returns:
      A 5.6 x 2.5 inch matplotlib ``Figure`` (560 x 250 px at 100 dpi): title, pie, its
      legend, and the list of negative (or largest) contributions.
    """
    e = np.asarray(errors, np.float64)
    if e.shape != (len(names),):
        raise ValueError(f"errors must have shape [{len(names)}] (one per attribute), "
                         f"got {e.shape}")
    if mode not in FIGURE_MODES:
        raise ValueError(f"mode must be one of {FIGURE_MODES}, got {mode!r}")
    if (remainder is None) != (mode != "projection"):
        raise ValueError("a remainder is given with mode='projection', and only there")
    if mode == "disagreement":
        return _disagreement_figure(e, distance, rank, gallery_label, names)
    colors = attribute_colors(names)
    colors[REMAINDER] = _REMAINDER_COLOR
    fig = Figure(figsize=FIGURE_SIZE, dpi=100)
    FigureCanvasAgg(fig)
    pie_ax = fig.add_axes((0.01, 0.02, 0.36, 0.78))
    text_ax = fig.add_axes((0.62, 0.02, 0.37, 0.78))
    text_ax.axis("off")
    positive = np.where(e > 0, e, 0.0)
    labels, sizes = _slices(positive, names, float(remainder or 0.0))
    if sizes:
        wedges, texts, autotexts = pie_ax.pie(
            sizes, labels=None, startangle=90, counterclock=False,
            colors=[colors.get(n, _OTHER_COLOR) for n in labels],
            autopct=lambda p: f"{p:.0f}%" if p >= 6 else "", pctdistance=0.72,
            wedgeprops={"linewidth": 1, "edgecolor": "white"}, textprops={"fontsize": 7})
        fig.pie_slices = list(zip(labels, wedges, strict=True))  # for pie_areas
        pie_ax.legend(wedges, labels, loc="center left", bbox_to_anchor=(1.0, 0.5),
                      fontsize=7, frameon=False, handlelength=1, handletextpad=0.4,
                      labelspacing=0.3)
    else:
        pie_ax.text(0.5, 0.5, "no positive\ncontribution", ha="center", va="center",
                    fontsize=8, transform=pie_ax.transAxes)
    pie_ax.set_aspect("equal")
    pie_ax.axis("off")
    if mode == "paper":
        title = f"rank {rank} · {gallery_label} · d² = {distance:.4g}"
        sub = (f"eq. 3.2, pie = positive part only (Σe⁺ = {positive.sum():.3g}, "
               f"Σe = {e.sum():.3g})")
        lines = _negatives(e, names)
    elif mode == "projection":
        title = f"rank {rank} · {gallery_label} · d² = {distance:.4g}"
        sub = (f"projection: Σp = {e.sum():.3g} along the attributes + remainder "
               f"{remainder:.3g} = d²")
        top = np.argsort(-e, kind="stable")[:LISTED_PROJECTION]
        top = top[e[top] > 0]
        lines = ["largest (share of d²):"]
        lines += [f"  {names[i]:<10} {e[i]:.3g} ({100 * e[i] / max(distance, 1e-30):.1f}%)"
                  for i in top]
        negative = _negatives(e, names)
        if len(negative) > 2 + LISTED_PROJECTION:  # header, the first few, the total
            negative = negative[:1 + LISTED_PROJECTION] + negative[-1:]
        lines += negative
    else:
        title = f"rank {rank} · {gallery_label} · d² = {distance:.4g}"
        sub = f"complete decomposition, Σe = {e.sum():.4g} = d²"
        top = np.argsort(-e, kind="stable")[:LISTED_NEGATIVES]
        lines = ["largest contributions:"]
        lines += [f"  {names[i]:<10} {e[i]:.3g} ({100 * e[i] / max(e.sum(), 1e-30):.0f}%)"
                  for i in top]
    text_ax.text(0.0, 0.98, "\n".join(lines), va="top", ha="left", family="monospace",
                 fontsize=7, transform=text_ax.transAxes, linespacing=1.35)
    fig.text(0.02, 0.95, title, fontsize=9, fontweight="bold", va="center")
    fig.text(0.02, 0.86, sub, fontsize=7, color="#444", va="center")
    return fig


def pie_areas(fig: Figure, names: Sequence[str] = ATTRIBUTE_NAMES
              ) -> list[tuple[str, list[int]]]:
    """The attribute slices of an :func:`error_figure` pie as polygons in the PNG's pixels
    (origin top left, as an HTML ``<area shape="poly">`` takes them): ``[(name, [x0, y0, x1,
    y1, ...])]``; the ``other`` and ``remainder`` slices are left out. Call it after the figure
    was drawn (saved), when the pie's layout is final."""
    height = fig.bbox.height
    out = []
    for label, wedge in getattr(fig, "pie_slices", []):
        if label not in names:
            continue
        path = wedge.get_path().interpolated(4)
        xy = wedge.get_transform().transform(path.vertices)
        coords = []
        for x, y in xy:
            coords += [int(round(x)), int(round(height - y))]
        out.append((label, coords))
    return out


def write_error_figure(path: str, errors: Sequence[float], distance: float, *, mode: str,
                       rank: int, gallery_label: str, names: Sequence[str] = ATTRIBUTE_NAMES,
                       remainder: float | None = None) -> list[tuple[str, list[int]]]:
    """:func:`error_figure` saved as a PNG at ``path``; returns its :func:`pie_areas`.

    A module-level function of plain arguments, so the report can draw its figures in worker
    processes (``reid_jax.explain.report``)."""
    fig = error_figure(errors, distance, mode=mode, rank=rank, gallery_label=gallery_label,
                       names=names, remainder=remainder)
    save_png(fig, path)
    return pie_areas(fig, names)


def metrics_figure(cmc: Sequence[float], ap_histogram: dict[str, Sequence[float]]) -> Figure:
    """CMC curve (ranks 1..len(cmc)) and the histogram of the per-query APs.

    ``ap_histogram``: ``{"edges": [B + 1] in [0, 1], "counts": [B]}`` (``summary.json``).
    """
    fig = Figure(figsize=(8.4, 2.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ranks = np.arange(1, len(cmc) + 1)
    ax1.plot(ranks, 100 * np.asarray(cmc), color="#2b63c6", lw=2)
    ax1.set_xlabel("rank", fontsize=8)
    ax1.set_ylabel("CMC (%)", fontsize=8)
    ax1.set_ylim(0, 101)
    ax1.set_xlim(1, max(len(cmc), 2))
    ax1.grid(alpha=0.3)
    ax1.set_title("cumulative matching characteristic", fontsize=9)
    edges = 100 * np.asarray(ap_histogram["edges"], np.float64)
    counts = np.asarray(ap_histogram["counts"], np.float64)
    ax2.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#1e9e48",
            edgecolor="white")
    ax2.set_xlim(0, 100)
    ax2.set_xlabel("average precision (%)", fontsize=8)
    ax2.set_ylabel("queries", fontsize=8)
    ax2.set_title(f"AP of the {int(counts.sum())} queries with a valid match", fontsize=9)
    for ax in (ax1, ax2):
        ax.tick_params(labelsize=7)
    return fig


# zlib level of the report's PNGs: level 1 encodes about 4x faster than PIL's default 6 for
# files about 25 % larger; a report of many queries writes hundreds of figures and overlays.
PNG_COMPRESS_LEVEL = 1


def _overlay_palette() -> bytes:
    """RGBA palette of the attribute-map overlays: entry i shows the value ``i / 127.5 - 1`` in
    ``RdBu_r`` (red positive, blue negative) at opacity ``0.8 |value|`` (transparent at 0)."""
    v = np.arange(256) / 127.5 - 1.0
    rgba = colormaps["RdBu_r"]((v + 1.0) / 2.0)
    rgba[:, 3] = np.abs(v) * 0.8
    return (rgba * 255.0 + 0.5).astype(np.uint8).tobytes()


_OVERLAY_PALETTE = _overlay_palette()


# The share of a group of maps' pixels drawn at full colour (docs/attribute_maps.md, 'Outputs').
OVERLAY_SATURATED = 0.01


def overlay_scale(maps: np.ndarray) -> float:
    """The colour scale of a group of signed maps drawn together: the ``1 - OVERLAY_SATURATED``
    quantile of ``|maps|`` (the largest magnitude where that is 0; 0 for all-zero maps).

    A map that puts most of its mass into a few cells would show only those at the largest
    magnitude; at the 99th percentile the top 1 % of the pixels saturate and the rest of the
    map stays visible (as saliency viewers clip outliers, e.g. captum's ``outlier_perc``).
    """
    magnitude = np.abs(np.asarray(maps, np.float64)).ravel()
    if magnitude.size == 0:
        return 0.0
    scale = float(np.quantile(magnitude, 1.0 - OVERLAY_SATURATED))
    return scale if scale > 0 else float(magnitude.max())


def overlay_image(tiles: Sequence[np.ndarray], size: tuple[int, int]) -> Image.Image:
    """Signed maps as one overlay image, the tiles side by side: each tile ``[H, W]`` holds
    values in [-1, 1] (a map divided by its scale) and is resized to ``size`` = (width, height).

    The report's strips and the explorer's overlays both come from here. An 8-bit palette
    image whose 256 entries are the colour scale with its opacity: a quarter of the bytes of
    RGBA pixels to encode and to fetch.
    """
    w, h = size
    pixels = np.zeros((h, w * len(tiles)), np.uint8)
    for i, tile in enumerate(tiles):
        tile = np.asarray(tile, np.float32)
        if tile.shape != (h, w):
            tile = np.asarray(Image.fromarray(tile, "F").resize((w, h),
                                                                 Image.Resampling.BILINEAR))
        pixels[:, i * w:(i + 1) * w] = np.rint((np.clip(tile, -1.0, 1.0) + 1.0) * 127.5)
    image = Image.fromarray(pixels, "P")
    image.putpalette(_OVERLAY_PALETTE, rawmode="RGBA")
    return image


def save_png(fig: Figure, path: str) -> str:
    """Writes ``fig`` as a PNG at 100 dpi (``path`` is inside a staging folder: no atomic rename
    is needed) and returns ``path``."""
    fig.savefig(path, format="png", dpi=100, pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return path


__all__ = ["FIGURE_SIZE", "OVERLAY_SATURATED", "PNG_COMPRESS_LEVEL", "attribute_colors",
           "error_figure", "metrics_figure", "overlay_image", "overlay_scale", "pie_areas",
           "save_png", "write_error_figure"]
