"""The HTML report of an explanation run: Figure 4.2-style rows and Figure 4.3-style pies.

``write_report(report_dir, summary, records, data_root=...)`` writes a self-contained folder::

    report_dir/index.html        summary: mAP, CMC, mINP, counts, explanation metrics, the
                                 display rules, a table of the queries drawn with links
    report_dir/queries.html      the first page of query rows (then queries-2.html, ...)
    report_dir/img/*.jpg         thumbnails (named by split and index, never by file name)
    report_dir/fig/*.png         error compositions (matplotlib) and the metrics figure

Per query a row like the paper's Figure 4.2: the query and its top-``k`` gallery images (green
frame: true match, red: false match), and under each gallery image the matching score of
eq. 3.1 in percent for every confident query attribute (``!`` marks an attribute the query
shows as absent).  For the chosen ranks, the error composition like Figure 4.3: in ``paper``
mode a pie of the *positive* part of eq. 3.2 with the negative contributions listed beside it;
in ``complete`` mode a pie of the complete decomposition, which sums to the squared distance.
The rules are stated on every page (:data:`DISPLAY_RULES`).

All text from data (file names, JSON values) is HTML-escaped.  Records are the dicts of
``reid_jax.explain.run.make_record``.  Figures use matplotlib's object API (no pyplot state).
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from reid_jax.data.attributes import ATTRIBUTE_NAMES
from reid_jax.data.market1501 import SPLIT_FOLDERS

THUMBNAIL_WH = (64, 128)  # Market-1501 images are 64 wide, 128 high; shown at that size.
PAGE_SIZE = 20
PIE_SLICES = 7  # Largest contributions drawn as slices; the rest is one "other" slice.
LISTED_NEGATIVES = 8
MIN_SLICE_SHARE = 0.03
FIGURE_SIZE = (5.6, 2.5)  # inches of an error composition figure (560 x 250 px)
METRICS_COPY = "explanation_metrics.json"  # the metrics shown, copied into the report

DISPLAY_RULES: dict[str, str] = {
    "matching_scores": (
        "Matching scores (eq. 3.1) are shown in percent and clipped at 100 %: the raw score "
        "s_a = (1 - |x_a^q - x_a^g|) / (0.5 + |x_a^q - 0.5|) exceeds 1 when the gallery "
        "probability lies close to a query probability that is not saturated. Raw values are in "
        "explanations.jsonl and in each cell's tooltip."),
    "confident_attributes": (
        "Only the confidently recognised query attributes are listed: |x_a^q - 0.5| > t_a "
        "(section 3.1)."),
    "absent": (
        "'!' before an attribute means the query shows it as absent (probability below 0.5): "
        "e.g. 'gender' means female and '!gender' male."),
    "frames": (
        "Green frame: true match (same identity, another camera); red frame: false match. "
        "Gallery images of the query's identity seen by the query's camera, and junk images, "
        "are left out (Market-1501 protocol)."),
    "paper_pie": (
        "Error composition, paper mode (eq. 3.2, e_a = sum_n (f_n^q - f_n^g)^2 w_na): weights can "
        "be negative, so e_a can be negative and the e_a do not sum to the distance. The pie "
        "shows only the positive part; the negative contributions (attributes that pull the pair "
        "together) are listed beside it."),
    "complete_pie": (
        "Error composition, complete mode (beyond the paper): weights |w_na| / sum_b |w_nb|, so "
        "every contribution is non-negative and they sum exactly to the squared distance. This "
        "is a different decomposition from eq. 3.2; do not compare the two."),
}

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d2330;
 background:#f4f5f7}
header{background:#1d2f4f;color:#fff;padding:14px 28px}
header h1{margin:0;font-size:22px;font-weight:600}
header p{margin:4px 0 0;color:#c6d0e2;font-size:13px}
header a{color:#fff}
main{padding:16px 28px;max-width:1500px}
h2{font-size:18px;margin:22px 0 8px}
section.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:12px 16px;
 margin:0 0 18px;box-shadow:0 1px 2px rgba(0,0,0,.04)}
section.card h2{margin:0 0 8px;font-size:16px}
.muted{color:#5b6474;font-size:13px}
table.facts{border-collapse:collapse;font-size:14px}
table.facts th{text-align:left;font-weight:500;color:#5b6474;padding:3px 18px 3px 0;
 vertical-align:top}
table.facts td{padding:3px 0;font-variant-numeric:tabular-nums}
.kpis{display:flex;gap:12px;flex-wrap:wrap;margin:6px 0 10px}
.kpi{background:#eef2f9;border-radius:8px;padding:8px 14px;min-width:92px}
.kpi b{display:block;font-size:22px;font-variant-numeric:tabular-nums}
.kpi span{font-size:12px;color:#5b6474}
ul.rules{font-size:13px;line-height:1.45;margin:4px 0;padding-left:18px}
ul.rules li{margin-bottom:4px}
table.list{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums}
table.list th,table.list td{padding:3px 10px;border-bottom:1px solid #e6e9ef;text-align:left}
table.list th{background:#f0f2f6;font-weight:600}
table.list .num{text-align:right}
.scroll{overflow-x:auto}
table.rank{border-collapse:separate;border-spacing:3px 1px;font-size:12px;
 font-variant-numeric:tabular-nums}
table.rank th.attr{text-align:right;font-weight:600;padding-right:6px;white-space:nowrap}
table.rank td{text-align:center;min-width:70px}
table.rank td.qcol{background:#eef2f9;border-radius:4px}
.thumb{display:inline-block;border:4px solid #888;border-radius:3px;line-height:0}
.thumb img{width:64px;height:128px;display:block}
.thumb.query{border-color:#2b63c6}
.thumb.hit{border-color:#1e9e48}
.thumb.miss{border-color:#d63a3a}
.rk{font-weight:700;font-size:13px}
.sub{color:#5b6474;font-size:11px;line-height:1.3}
td.score{border-radius:3px;padding:2px 0;font-weight:600}
.errors{display:flex;flex-wrap:wrap;gap:10px;margin-top:10px}
.errors figure{margin:0;background:#fafbfc;border:1px solid #e3e6ec;border-radius:6px;
 padding:6px}
.errors figcaption{font-size:12px;color:#5b6474;max-width:560px}
.errors img{width:560px;height:250px;display:block}
nav.pages{margin:8px 0 14px;font-size:14px}
nav.pages a,nav.pages span{margin-right:10px}
.note{font-size:12px;color:#5b6474;margin:6px 0 0}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;
 background:#eef2f9;margin-left:6px}
.badge.bad{background:#fbe3e3}
table.metrics td,table.metrics th{padding:4px 12px}
table.metrics th{vertical-align:bottom}
table.metrics tr.group td{border-top:2px solid #c9ced8}
table.metrics td.best{font-weight:700}
table.metrics td.chance{color:#5b6474}
table.metrics td.skipped{color:#5b6474;font-style:italic}
details.more{margin-top:10px;font-size:13px}
details.more summary{cursor:pointer;color:#2b63c6}
details.more h3{font-size:13px;margin:12px 0 4px}
"""


def _e(value: Any) -> str:
    """HTML-escaped text (quotes too: safe in attributes)."""
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100.0 * value:.{digits}f} %"


def score_percent(score: float) -> str:
    """The displayed matching score: ``min(s, 1)`` in whole percent (clip at 100 %)."""
    return f"{100.0 * min(max(float(score), 0.0), 1.0):.0f}"


def _score_color(score: float) -> str:
    """Cell background from red (0 %) over yellow to green (100 %)."""
    s = min(max(float(score), 0.0), 1.0)
    return f"hsl({120.0 * s:.0f},62%,{86 - 6 * s:.0f}%)"


def _page_name(page: int) -> str:
    return "queries.html" if page == 0 else f"queries-{page + 1}.html"


def _head(title: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n")


def _header(title: str, subtitle: str) -> str:
    return f"<header><h1>{_e(title)}</h1><p>{subtitle}</p></header>\n<main>\n"


# ---------------------------------------------------------------------------------------------
# Images and figures.


def write_thumbnail(src: str, dst: str) -> str:
    """``src`` as an RGB JPEG ``THUMBNAIL_WH`` (64 x 128) at ``dst``.

    Raises:
      FileNotFoundError / ValueError: naming ``src`` when it is missing or does not decode.
    """
    if not os.path.isfile(src):
        raise FileNotFoundError(f"report: image not found: {src}")
    try:
        with Image.open(src) as im:
            im.convert("RGB").resize(THUMBNAIL_WH, Image.Resampling.BICUBIC).save(
                dst, "JPEG", quality=90)
    except OSError as e:
        raise ValueError(f"report: image {src} does not decode: {e}") from e
    return dst


def attribute_colors(names: Sequence[str] = ATTRIBUTE_NAMES) -> dict[str, tuple]:
    """A fixed colour per attribute, so a pie's slices compare across ranks and queries."""
    palette = [*colormaps["tab20"].colors, *colormaps["tab20b"].colors]
    return {n: palette[i % len(palette)] for i, n in enumerate(names)}


_OTHER_COLOR = (0.82, 0.83, 0.85)


def _slices(values: np.ndarray, names: Sequence[str]) -> tuple[list[str], list[float]]:
    """The largest ``values`` (all > 0) as slices; the small rest is one ``other`` slice."""
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
    return labels, sizes


def error_figure(errors: Sequence[float], distance: float, *, mode: str, rank: int,
                 gallery_label: str, names: Sequence[str] = ATTRIBUTE_NAMES) -> Figure:
    """Figure 4.3 for one ranked gallery image: its error composition.

    Args:
      errors: ``[A]`` contributions (eq. 3.2 in ``paper`` mode, the complete decomposition in
        ``complete`` mode).
      distance: the pair's squared distance.
      mode: ``paper``: pie of the positive part, negative contributions listed beside it;
        ``complete``: pie of all contributions (they sum to ``distance``), largest listed.
      rank: 1-based rank, for the title.  gallery_label: e.g. ``id 0005 cam 2``.

    Returns:
      A 5.6 x 2.5 inch matplotlib ``Figure`` (560 x 250 px at 100 dpi): title, pie, its
      legend, and the list of negative (or largest) contributions.
    """
    e = np.asarray(errors, np.float64)
    if e.shape != (len(names),):
        raise ValueError(f"errors must have shape [{len(names)}] (one per attribute), "
                         f"got {e.shape}")
    if mode not in ("paper", "complete"):
        raise ValueError(f"mode must be 'paper' or 'complete', got {mode!r}")
    colors = attribute_colors(names)
    fig = Figure(figsize=FIGURE_SIZE, dpi=100)
    FigureCanvasAgg(fig)
    pie_ax = fig.add_axes((0.01, 0.02, 0.36, 0.78))
    text_ax = fig.add_axes((0.62, 0.02, 0.37, 0.78))
    text_ax.axis("off")
    positive = np.where(e > 0, e, 0.0)
    labels, sizes = _slices(positive, names)
    if sizes:
        wedges, texts, autotexts = pie_ax.pie(
            sizes, labels=None, startangle=90, counterclock=False,
            colors=[colors.get(n, _OTHER_COLOR) for n in labels],
            autopct=lambda p: f"{p:.0f}%" if p >= 6 else "", pctdistance=0.72,
            wedgeprops={"linewidth": 1, "edgecolor": "white"}, textprops={"fontsize": 7})
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


def _save(fig: Figure, path: str) -> str:
    fig.savefig(path, format="png", dpi=100)
    return path


# ---------------------------------------------------------------------------------------------
# Pages.


def _rules_html(mode: str) -> str:
    keys = ["confident_attributes", "absent", "matching_scores", "frames",
            "paper_pie" if mode == "paper" else "complete_pie"]
    return "<ul class=\"rules\">" + "".join(f"<li>{_e(DISPLAY_RULES[k])}</li>" for k in keys) \
        + "</ul>"


def _query_row(record: dict[str, Any], *, thumbs: Callable[[str, int, str], str],
               figures: Callable[[dict, int], str | None], error_ranks: Sequence[int],
               mode: str) -> str:
    q = record["query"]
    gal = record["gallery"]
    k = len(gal["index"])
    ap = record["ap"]
    first = record["first_match_rank"]
    badge = "badge bad" if ap is not None and ap < 0.5 else "badge"
    out = [f"<section class=\"card\" id=\"q{record['position'] + 1}\">",
           f"<h2>#{record['position'] + 1} &nbsp;{_e(q['file'])}"
           f"<span class=\"badge\">id {_e(q['pid'])} · cam {_e(q['camera'])}</span>"
           f"<span class=\"{badge}\">AP {_e(_pct(ap))}</span>"
           f"<span class=\"badge\">first match: "
           f"{_e('rank ' + str(first) if first is not None else 'none')}</span>"
           f"<span class=\"badge\">{_e(record['num_matches'])} matches in gallery</span></h2>",
           "<div class=\"scroll\"><table class=\"rank\">"]
    # Row 1: images.
    cells = ["<tr><th class=\"attr\"></th><td class=\"qcol\">"
             f"<span class=\"thumb query\" title=\"{_e(q['file'])}\">"
             f"<img src=\"{thumbs('query', q['index'], q['file'])}\" alt=\"query\"></span>"
             "<div class=\"rk\">query</div></td>"]
    for r in range(k):
        hit = gal["true_match"][r]
        cells.append(
            f"<td><span class=\"thumb {'hit' if hit else 'miss'}\" "
            f"title=\"{_e(gal['file'][r])}\"><img src=\""
            f"{thumbs('gallery', gal['index'][r], gal['file'][r])}\" "
            f"alt=\"rank {r + 1}\"></span><div class=\"rk\">{r + 1}</div></td>")
    out.append("".join(cells) + "</tr>")
    # Row 2: identity, camera, distance.
    cells = ["<tr><th class=\"attr sub\">id, cam / d²</th><td class=\"qcol sub\">p(query)</td>"]
    for r in range(k):
        cells.append(f"<td class=\"sub\">id {_e(gal['pid'][r])} c{_e(gal['camera'][r])}"
                     f"<br>{_e(_fmt(gal['distance'][r]))}</td>")
    out.append("".join(cells) + "</tr>")
    # One row per confident query attribute: matching scores in percent (clipped at 100 %).
    for j, att in enumerate(record["selected_attributes"]):
        cells = [f"<tr><th class=\"attr\">{_e(att['display'])}</th>"
                 f"<td class=\"qcol sub\">{att['probability']:.2f}</td>"]
        for r in range(k):
            s = record["matching_scores"][r][j]
            pg = record["gallery_probabilities"][r][j]
            cells.append(
                f"<td class=\"score\" style=\"background:{_score_color(s)}\" "
                f"title=\"raw s = {s:.4f}; p(gallery) = {pg:.3f}\">{score_percent(s)}%</td>")
        out.append("".join(cells) + "</tr>")
    if not record["selected_attributes"]:
        out.append(f"<tr><th class=\"attr\"></th><td colspan=\"{k + 1}\" class=\"sub\">no "
                   "confidently recognised query attribute at this threshold</td></tr>")
    out.append("</table></div>")
    figs = []
    for rank in error_ranks:
        if rank > k:
            continue
        src = figures(record, rank)
        label = (f"rank {rank}: {gal['file'][rank - 1]} "
                 f"({'true' if gal['true_match'][rank - 1] else 'false'} match)")
        what = ("positive part of eq. 3.2 (negative contributions listed beside it)"
                if mode == "paper" else "complete decomposition (sums to d²)")
        figs.append(f"<figure><img src=\"{src}\" alt=\"{_e('error composition, ' + label)}\">"
                    f"<figcaption>{_e(label)} — {_e(what)}</figcaption></figure>")
    if figs:
        out.append("<div class=\"errors\">" + "".join(figs) + "</div>")
    out.append("</section>")
    return "\n".join(out)


def _nav(page: int, pages: int) -> str:
    links = ["<a href=\"index.html\">summary</a>"]
    for p in range(pages):
        links.append(f"<span>page {p + 1}</span>" if p == page
                     else f"<a href=\"{_page_name(p)}\">page {p + 1}</a>")
    return "<nav class=\"pages\">" + " ".join(links) + "</nav>"


def _metrics_tables(metrics: dict[str, Any], names: Sequence[str]) -> str:
    """A nested JSON object as a table of scalars plus a per-attribute table for ``[A]`` lists."""
    scalars: list[tuple[str, Any]] = []
    per_attribute: dict[str, list] = {}
    other: list[tuple[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, v in value.items():
                walk(f"{prefix} / {key}" if prefix else str(key), v)
        elif isinstance(value, list) and len(value) == len(names) and all(
                v is None or isinstance(v, (int, float)) for v in value):
            per_attribute[prefix] = value
        elif isinstance(value, list):
            other.append((prefix, value))
        else:
            scalars.append((prefix, value))

    walk("", metrics)
    parts = []
    if scalars:
        rows = "".join(f"<tr><td>{_e(k)}</td><td class=\"num\">{_e(_fmt(v))}</td></tr>"
                       for k, v in scalars)
        parts.append(f"<table class=\"list\"><tr><th>metric</th><th class=\"num\">value</th>"
                     f"</tr>{rows}</table>")
    if other:
        rows = "".join(
            f"<tr><td>{_e(k)}</td><td>{_e(', '.join(_fmt(x) for x in v[:12]))}"
            f"{_e(' …' if len(v) > 12 else '')}</td></tr>" for k, v in other)
        parts.append(f"<table class=\"list\" style=\"margin-top:8px\"><tr><th>list</th>"
                     f"<th>values</th></tr>{rows}</table>")
    if per_attribute:
        head = "".join(f"<th class=\"num\">{_e(k)}</th>" for k in per_attribute)
        rows = "".join(
            f"<tr><td>{_e(n)}</td>" + "".join(
                f"<td class=\"num\">{_e(_fmt(v[a]))}</td>" for v in per_attribute.values())
            + "</tr>" for a, n in enumerate(names))
        parts.append(f"<details style=\"margin-top:8px\"><summary>per attribute</summary>"
                     f"<div class=\"scroll\"><table class=\"list\"><tr><th>attribute</th>{head}"
                     f"</tr>{rows}</table></div></details>")
    return "\n".join(parts)


def _percent_cell(value: Any, css: str = "") -> str:
    """A ``<td>`` holding a fraction in percent with one decimal (``–`` for none / NaN)."""
    cls = f"num {css}".strip()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"<td class=\"{cls}\">–</td>"
    return f"<td class=\"{cls}\">{100.0 * float(value):.1f}</td>"


def _per_attribute_table(title: str, columns: dict[str, Any], names: Sequence[str]) -> str:
    """Rows = attributes; columns = the ``[A]`` lists of ``columns`` (counts as integers,
    fractions in %)."""
    columns = {k: v for k, v in columns.items()
               if isinstance(v, list) and len(v) == len(names)}
    if not columns:
        return ""
    head = "".join(f"<th class=\"num\">{_e(k).replace('_', '_<wbr>')}</th>" for k in columns)
    rows = []
    for a, name in enumerate(names):
        cells = []
        for values in columns.values():
            v = values[a]
            if isinstance(v, int) and not isinstance(v, bool):
                cells.append(f"<td class=\"num\">{v}</td>")
            elif isinstance(v, float) or v is None:
                cells.append(_percent_cell(v))
            else:
                cells.append(f"<td>{_e(v)}</td>")
        rows.append(f"<tr><td>{_e(name)}</td>{''.join(cells)}</tr>")
    counts = any(isinstance(v, int) and not isinstance(v, bool)
                 for values in columns.values() for v in values)
    title += " (counts; rates in %)" if counts else " (in %)"
    return (f"<h3>{_e(title)}</h3><div class=\"scroll\"><table class=\"list\"><tr>"
            f"<th>attribute</th>{head}</tr>{''.join(rows)}</table></div>")


def _same_path(a: Any, b: Any) -> bool:
    return os.path.normpath(os.path.abspath(str(a))) == os.path.normpath(os.path.abspath(str(b)))


def _explanation_quality_html(metrics: dict[str, Any], summary: dict[str, Any],
                              names: Sequence[str]) -> str:
    """The table of ``tools/evaluate_explanations.py`` (``quality.summary_table``) for
    a JSON of its layout, the details collapsed; other JSON as generic tables."""
    from reid_jax.explain import quality

    try:
        if metrics.get("format") != quality.FORMAT:
            raise ValueError(f"format {metrics.get('format')!r}, not "
                             f"{quality.FORMAT!r}")
        table = quality.summary_table(metrics)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        reason = f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e)
        return (f"<p class=\"note\">Not the layout of tools/evaluate_explanations.py "
                f"({_e(reason)}); all entries listed.</p>\n" + _metrics_tables(metrics, names))

    out = []
    settings = metrics.get("settings", {})
    data = metrics.get("data", {})
    facts = []
    if settings.get("checkpoint"):
        warn = ("" if not summary.get("checkpoint") or _same_path(settings["checkpoint"],
                                                                  summary["checkpoint"])
                else "<span class=\"badge bad\">not this run's checkpoint</span>")
        facts.append(f"checkpoint {_e(settings['checkpoint'])}{warn}")
    if settings.get("data_root"):
        warn = ("" if not summary.get("data_root") or _same_path(settings["data_root"],
                                                                 summary["data_root"])
                else "<span class=\"badge bad\">not this run's data root</span>")
        facts.append(f"data root {_e(settings['data_root'])}{warn}")
    if data:
        facts.append(
            f"{_e(data.get('num_queries', '?'))} queries "
            f"({_e(data.get('num_labelled_queries', '?'))} labelled), "
            f"{_e(data.get('num_gallery', '?'))} gallery images "
            f"({_e(data.get('num_labelled_gallery', '?'))} labelled)"
            + (", synthetic" if data.get("synthetic") else ""))
    if facts:
        out.append("<p class=\"note\">Measured on " + " · ".join(facts) + ".</p>")

    head = "".join(("<th class=\"num\">" if i else "<th>") + f"{_e(c)}</th>"
                   for i, c in enumerate(table.columns))
    rows = []
    family = None
    for row in table.rows:
        # Groups: counterfactuals; AUROC over all pairs, over the top k; AMD likewise.
        row_family = (row.metric.split()[0], "all pairs" in row.metric)
        group = " class=\"group\"" if family is not None and row_family != family else ""
        family = row_family
        if row.skipped:
            rows.append(f"<tr{group}><td>{_e(row.metric)}</td><td class=\"num\">–</td>"
                        f"<td class=\"skipped\" colspan=\"{len(row.values) + 1}\">skipped: "
                        f"{_e(row.skipped)}</td></tr>")
            continue
        present = [v for v in row.values if v is not None]
        best = max(present) if len(present) > 1 else None
        cells = "".join(_percent_cell(v, "best" if best is not None and v == best else "")
                        for v in row.values)
        rows.append(f"<tr{group}><td>{_e(row.metric)}</td><td class=\"num\">{_e(row.n)}</td>"
                    f"{cells}{_percent_cell(row.chance, 'chance')}</tr>")
    out.append(f"<div class=\"scroll\"><table class=\"list metrics\"><tr>{head}</tr>"
               + "".join(rows) + "</table></div>")
    out.append("<p class=\"note\">" + " ".join(_e(s) for s in table.legend)
               + " Bold: the best of the explanations in a row (higher is better).</p>")

    details = []
    cf = metrics.get("counterfactual", {})
    subsets = cf.get("subsets") if isinstance(cf, dict) else None
    if isinstance(subsets, dict) and subsets:
        keys = list(dict.fromkeys(key for s in subsets.values() if isinstance(s, dict)
                                  for key in s))
        head = "".join(f"<th class=\"num\">{_e(k).replace('_', '_<wbr>')}</th>" for k in keys)
        body = []
        for name, s in subsets.items():
            s = s if isinstance(s, dict) else {}
            cells = "".join(
                f"<td class=\"num\">{_e(s.get(k))}</td>"
                if isinstance(s.get(k), int) and not isinstance(s.get(k), bool)
                else _percent_cell(s.get(k)) for k in keys)
            body.append(f"<tr><td>{_e(name)}</td>{cells}</tr>")
        details.append("<h3>counterfactual hit rate by pair subset (values in %)</h3>"
                       f"<div class=\"scroll\"><table class=\"list\"><tr><th>pairs</th>"
                       f"{head}</tr>{''.join(body)}</table></div>")
    for family, title in (("counterfactual", "counterfactual hit rate per changed attribute"),
                          ("auroc", "matching-score AUROC per query attribute"),
                          ("amd", "AMD per attribute: pairs where it differs, precision "
                                  "and AP of each explanation")):
        part = metrics.get(family)
        per_attribute = part.get("per_attribute") if isinstance(part, dict) else None
        if isinstance(per_attribute, dict):
            details.append(_per_attribute_table(title, per_attribute, names))
    details = [d for d in details if d]
    if details:
        out.append("<details class=\"more\"><summary>details: pair subsets and per-attribute "
                   "values</summary>" + "".join(details) + "</details>")
    return "\n".join(out)


def _index_html(summary: dict[str, Any], records: Sequence[dict], pages: int,
                metrics_png: str | None) -> str:
    cmc = summary["cmc"]
    threshold = summary["threshold"]
    t_text = (f"{threshold:g}" if isinstance(threshold, (int, float))
              else "per attribute: " + ", ".join(f"{t:g}" for t in threshold))
    order_text = {"query": "query order (file names)",
                  "worst_ap": "worst average precision first"}.get(summary["order"],
                                                                    summary["order"])
    kpis = [("mAP", _pct(summary["mAP"])), ("Rank-1", _pct(cmc[0]))]
    kpis += [(f"Rank-{r}", _pct(cmc[r - 1])) for r in (5, 10, 20) if r <= len(cmc)]
    kpis.append(("mINP", _pct(summary["mINP"])))
    facts = [
        ("data root", summary["data_root"]),
        ("checkpoint", summary.get("checkpoint") or "precomputed embeddings"),
        ("queries explained", f"{summary['num_queries']} of {summary['num_query_images']} "
                              f"({summary['num_valid_queries']} with a valid match)"),
        ("gallery", f"{summary['num_gallery_images']} images, "
                    f"{summary['num_gallery_identities']} identities, "
                    f"{summary['num_distractors']} distractors "
                    f"({summary['junk_left_out']} junk images left out)"),
        ("embedding size N", summary["embedding_dim"]),
        ("ranks explained k", summary["k"]),
        ("threshold t_a", t_text),
        ("error mode", f"{summary['mode']}: {summary['mode_equation']}"),
        ("order", order_text),
        ("drawn in this report", f"{len(records)} queries on {pages} page(s); "
                                 f"explanations.jsonl holds all {summary['num_queries']}"),
    ]
    out = [_head("Explained re-id rankings"),
           _header("Explained re-id rankings",
                   "Attribute explanations of person re-identification rankings "
                   "(Specker, <i>A Step Towards Explainable Person Re-identification "
                   "Rankings</i>) — reid_jax"),
           "<section class=\"card\"><h2>Ranking metrics</h2><div class=\"kpis\">"
           + "".join(f"<div class=\"kpi\"><b>{_e(v)}</b><span>{_e(n)}</span></div>"
                     for n, v in kpis) + "</div>",
           "<p class=\"note\">Market-1501 protocol over the explained queries: same identity "
           "and camera removed, distractors kept, CMC to rank "
           f"{len(cmc)}.</p>"]
    if metrics_png:
        out.append(f"<img src=\"{metrics_png}\" alt=\"CMC curve and AP histogram\" "
                   "style=\"max-width:840px;width:100%;margin-top:8px\">")
    out.append("</section>")
    out.append("<section class=\"card\"><h2>Run</h2><table class=\"facts\">"
               + "".join(f"<tr><th>{_e(n)}</th><td>{_e(v)}</td></tr>" for n, v in facts)
               + "</table><p class=\"note\"><a href=\"../explanations.jsonl\">"
                 "explanations.jsonl</a> (one record per query) · "
                 "<a href=\"../summary.json\">summary.json</a></p></section>")
    metrics = summary.get("explanation_metrics")
    out.append("<section class=\"card\"><h2>Explanation quality</h2>")
    if metrics:
        src = summary.get("explanation_metrics_file")
        out.append("<p class=\"muted\">Measured explanations (DESIGN.md §5: counterfactual hit "
                   "rate, AUROC of matching scores, AMD Ex-Precision / Ex-mAP)"
                   + (f", from {_e(src)}" if src else "") + ". All values: <a href=\""
                   f"{METRICS_COPY}\">{METRICS_COPY}</a> (a copy in this folder).</p>")
        out.append(_explanation_quality_html(metrics, summary,
                                             summary.get("attribute_names", ATTRIBUTE_NAMES)))
    else:
        out.append("<p class=\"muted\">No explanation_metrics.json was given for this run "
                   "(tools/evaluate_explanations.py writes one).</p>")
    out.append("</section>")
    out.append("<section class=\"card\"><h2>How to read the query pages</h2>"
               + _rules_html(summary["mode"]) + "</section>")
    if records:
        rows = []
        for rec in records:
            page = rec["position"] // PAGE_SIZE
            ap = rec["ap"]
            first = rec["first_match_rank"]
            rows.append(
                f"<tr><td class=\"num\">{rec['position'] + 1}</td><td><a href=\""
                f"{_page_name(page)}#q{rec['position'] + 1}\">{_e(rec['query']['file'])}</a>"
                f"</td><td class=\"num\">{_e(rec['query']['pid'])}</td><td class=\"num\">"
                f"{_e(rec['query']['camera'])}</td><td class=\"num\">{_e(_pct(ap))}</td>"
                f"<td class=\"num\">{_e(first if first is not None else '–')}</td>"
                f"<td class=\"num\">{sum(rec['gallery']['true_match'])}/"
                f"{len(rec['gallery']['true_match'])}</td>"
                f"<td class=\"num\">{len(rec['selected_attributes'])}</td></tr>")
        out.append(
            f"<section class=\"card\"><h2>Queries ({_e(order_text)})</h2>{_nav(-1, pages)}"
            "<div class=\"scroll\"><table class=\"list\"><tr><th class=\"num\">#</th>"
            "<th>query</th><th class=\"num\">id</th><th class=\"num\">cam</th>"
            "<th class=\"num\">AP</th><th class=\"num\">first match</th>"
            f"<th class=\"num\">matches in top {summary['k']}</th>"
            "<th class=\"num\">confident attributes</th></tr>"
            + "".join(rows) + "</table></div></section>")
    out.append("</main></body></html>\n")
    return "\n".join(out)


def write_report(report_dir: str | os.PathLike, summary: dict[str, Any],
                 records: Sequence[dict[str, Any]], *, data_root: str | os.PathLike,
                 progress: bool | Callable[[int], None] = False) -> str:
    """Writes the report into ``report_dir`` (created; must not exist yet) and returns the path
    of its ``index.html``.

    Not atomic by itself: ``reid_jax.explain.run.run`` writes it into a staging folder and
    renames it into place.

    Args:
      report_dir: the folder to create.
      summary: the run summary (``summary.json`` of ``explain_run.run``: mAP, cmc, mINP,
        counts, k, threshold, mode, order, error_ranks, explanation_metrics, ...).
      records: JSONL records to draw (in order).
      data_root: the Market-1501 root the records' file names are relative to.
      progress: ``True`` draws a stderr bar; a callable is called with the queries done.
    """
    from reid_jax.explain.run import ProgressBar

    report_dir = os.fspath(report_dir)
    if os.path.exists(report_dir):
        raise ValueError(f"report folder {report_dir} already exists (write into a new folder)")
    for r in records:
        if r.get("error_mode") != summary["mode"]:
            raise ValueError(f"record {r.get('position')} has error_mode "
                             f"{r.get('error_mode')!r} but the run's mode is {summary['mode']!r}")
    os.makedirs(os.path.join(report_dir, "img"))
    os.makedirs(os.path.join(report_dir, "fig"))
    data_root = os.fspath(data_root)
    mode = summary["mode"]
    error_ranks = summary.get("error_ranks", [])
    done: dict[tuple[str, int], str] = {}

    def thumbs(split: str, index: int, file: str) -> str:
        key = (split, int(index))
        if key not in done:
            rel = f"img/{split[0]}{int(index):06d}.jpg"
            write_thumbnail(os.path.join(data_root, SPLIT_FOLDERS[split], file),
                            os.path.join(report_dir, rel))
            done[key] = rel
        return done[key]

    def figures(record: dict, rank: int) -> str:
        gal = record["gallery"]
        fig = error_figure(record["errors"][rank - 1], gal["distance"][rank - 1], mode=mode,
                           rank=rank, gallery_label=f"id {gal['pid'][rank - 1]:04d} cam "
                                                    f"{gal['camera'][rank - 1]}",
                           names=summary.get("attribute_names", ATTRIBUTE_NAMES))
        rel = f"fig/errors-{record['position'] + 1:05d}-rank{rank:02d}.png"
        return _save(fig, os.path.join(report_dir, rel)).removeprefix(report_dir + os.sep)

    bar = ProgressBar(len(records), "report") if progress is True else None
    tick = progress if callable(progress) else (bar.update if bar else None)
    pages = max(1, -(-len(records) // PAGE_SIZE)) if records else 0
    for page in range(pages):
        chunk = records[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
        first, last = chunk[0]["position"] + 1, chunk[-1]["position"] + 1
        body = [_head(f"Explained rankings, queries {first}–{last}"),
                _header(f"Queries {first}–{last} of {summary['num_queries']}",
                        f"top {_e(summary['k'])} ranks · mode {_e(mode)} · order "
                        f"{_e(summary['order'])} · <a href=\"index.html\">summary</a>"),
                _nav(page, pages),
                "<section class=\"card\"><h2>How to read this page</h2>"
                + _rules_html(mode) + "</section>"]
        for record in chunk:
            body.append(_query_row(record, thumbs=thumbs, figures=figures,
                                   error_ranks=error_ranks, mode=mode))
            if tick is not None:
                tick(1)
        body.append(_nav(page, pages) + "</main></body></html>\n")
        with open(os.path.join(report_dir, _page_name(page)), "w", encoding="utf-8") as f:
            f.write("\n".join(body))
    if bar is not None:
        bar.close()
    metrics_png = None
    if summary.get("cmc") and summary.get("ap_histogram"):
        metrics_png = "fig/metrics.png"
        _save(metrics_figure(summary["cmc"], summary["ap_histogram"]),
              os.path.join(report_dir, metrics_png))
    if summary.get("explanation_metrics"):
        with open(os.path.join(report_dir, METRICS_COPY), "w", encoding="utf-8") as f:
            json.dump(summary["explanation_metrics"], f, indent=1)
            f.write("\n")
    index = os.path.join(report_dir, "index.html")
    with open(index, "w", encoding="utf-8") as f:
        f.write(_index_html(summary, records, pages, metrics_png))
    return index


__all__ = ["DISPLAY_RULES", "PAGE_SIZE", "THUMBNAIL_WH", "attribute_colors", "error_figure",
           "metrics_figure", "score_percent", "write_report", "write_thumbnail"]
