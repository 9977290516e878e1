"""The HTML report of an explanation run: Figure 4.2-style rows and Figure 4.3-style pies.

``write_report(report_dir, summary, records, data_root=...)`` writes a self-contained folder::

    report_dir/index.html        summary: mAP, CMC, mINP, counts, explanation metrics, the
                                 display rules, a table of the queries drawn with links
    report_dir/queries.html      the first page of query rows (then queries-2.html, ...)
    report_dir/img/*.jpg         thumbnails (named by split and index, never by file name)
    report_dir/fig/*.png         error compositions and the metrics figure
                                 (``reid_jax.explain.figures``)
    report_dir/maps/*.png        attribute-map overlays of the queries with maps: one strip
                                 per (query, attribute), tiles of the thumbnails' size

Per query a row like the paper's Figure 4.2: the query and its top-``k`` gallery images (green
frame: true match, red: false match), and under each gallery image the matching score of
eq. 3.1 in percent for every confident query attribute (``!`` marks an attribute the query
shows as absent). For the chosen ranks, the error composition like Figure 4.3. The rules are
stated on every page (:data:`DISPLAY_RULES`; ``docs/design.md``, "What the report shows").

The pages are Jinja2 templates (``reid_jax/explain/templates``, package data) rendered with
autoescaping: every text that comes from data (file names, JSON values) is HTML-escaped.
Records are the dicts of ``reid_jax.explain.run.make_record``.

Attribute maps (records with ``maps``, ``reid_jax.explain.map_outputs``): every thumbnail of
the query row carries an overlay of one attribute's evidence map (red: the pixels raise
``x_a``, blue: they lower it), and beside every error composition the pair's contribution maps
of that attribute over both images (red: the pixels add to ``e_a``). Clicking an attribute
row or a pie slice (an HTML image map over the pie) switches the overlays of that query by a
few lines of plain JavaScript in the page; nothing is loaded from elsewhere
(docs/attribute_maps.md, 'Outputs').
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import jinja2
import markupsafe
import numpy as np
from absl import logging
from PIL import Image

from reid_jax import interrupts
from reid_jax.data.attributes import ATTRIBUTE_NAMES
from reid_jax.data.market1501 import SPLIT_FOLDERS
from reid_jax.explain import learned, map_outputs
from reid_jax.explain import table as quality_table
from reid_jax.explain.figures import (
    PNG_COMPRESS_LEVEL,
    error_figure,
    metrics_figure,
    overlay_image,
    overlay_scale,
    save_png,
    write_error_figure,
)
from reid_jax.progress import ProgressBar

THUMBNAIL_WH = (64, 128)  # Market-1501 images are 64 wide, 128 high; shown at that size.
PAGE_SIZE = 20
# Error figures are the slow part of a report (matplotlib: about 0.2 s each on a 2-core CPU,
# three per query): from this many on they are drawn in worker processes, one per usable core
# (docs/design.md, "What the report shows").
FIGURE_POOL_MIN = 12
# At most this many by default: a worker holds about 300 MB (it imports the calling script, and
# with it JAX).
FIGURE_WORKERS_MAX = 8
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
    "projection_pie": (
        "Error composition, projection mode (beyond the paper): the difference f^q - f^g is "
        "projected onto the attribute directions by least squares, f^q - f^g = W c + r; "
        "attribute a contributes c_a (W^T (f^q - f^g))_a and the remainder |r|^2 — the part of "
        "the distance no attribute direction explains — is its own grey slice. Contributions "
        "and remainder sum exactly to the squared distance; a contribution is negative only "
        "where correlated attribute directions oppose (listed beside the pie)."),
    "disagreement_bars": (
        "Disagreement mode (beyond the paper): the bars give, per attribute, the probability "
        "that the two persons' labels differ, x^q (1 - x^g) + x^g (1 - x^q) with the attribute "
        "probabilities x of both images. It ranks which attributes tell the two apart; it is "
        "not a decomposition of the distance."),
}
MODE_RULES = {"paper": "paper_pie", "complete": "complete_pie", "projection": "projection_pie",
              "disagreement": "disagreement_bars"}
_MODE_WHAT = {"paper": "positive part of eq. 3.2 (negative contributions listed beside it)",
              "complete": "complete decomposition (sums to d²)",
              "projection": "projection onto the attribute directions, remainder as its own "
                            "slice (sums to d²)",
              "disagreement": "probability that the labels differ (not a decomposition)"}
_ORDER_TEXT = {"query": "query order (file names)", "worst_ap": "worst average precision first"}


# ---------------------------------------------------------------------------------------------
# Formatting (template filters).


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


def _percent1(value: Any) -> str:
    """A fraction in percent with one decimal, no sign (``–`` for none / NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100.0 * float(value):.1f}"


def _wbr(value: Any) -> markupsafe.Markup:
    """Escaped text with a line-break opportunity after every ``_`` (long column names)."""
    return markupsafe.Markup(markupsafe.escape(value).replace("_", "_<wbr>"))


def score_percent(score: float) -> str:
    """The displayed matching score: ``min(s, 1)`` in whole percent (clip at 100 %)."""
    return f"{100.0 * min(max(float(score), 0.0), 1.0):.0f}"


def _score_color(score: float) -> str:
    """Cell background from red (0 %) over yellow to green (100 %)."""
    s = min(max(float(score), 0.0), 1.0)
    return f"hsl({120.0 * s:.0f},62%,{86 - 6 * s:.0f}%)"


def _page_name(page: int) -> str:
    return "queries.html" if page == 0 else f"queries-{page + 1}.html"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("reid_jax.explain", "templates"),
        autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
        trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)
    env.filters.update(fmt=_fmt, pct=_pct, percent1=_percent1, wbr=_wbr)
    env.tests["integer_value"] = lambda v: isinstance(v, int) and not isinstance(v, bool)
    env.globals["page_name"] = _page_name
    return env


_ENV = _environment()


def _rules(mode: str) -> list[str]:
    keys = ["confident_attributes", "absent", "matching_scores", "frames", MODE_RULES[mode]]
    return [DISPLAY_RULES[k] for k in keys]


# ---------------------------------------------------------------------------------------------
# Images.


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


# ---------------------------------------------------------------------------------------------
# Drawing the error figures.


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def num_figure_workers(num_figures: int, workers: int | None = None) -> int:
    """Worker processes to draw ``num_figures`` error figures with: ``workers`` when given
    (0 or 1: in this process), else one per usable core, at most :data:`FIGURE_WORKERS_MAX`,
    from :data:`FIGURE_POOL_MIN` figures on (fewer figures do not pay for starting them)."""
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"figure_workers must be an integer >= 0, got {workers!r}")
        return min(workers, max(num_figures, 1))
    if num_figures < FIGURE_POOL_MIN:
        return 1
    return min(_usable_cores(), FIGURE_WORKERS_MAX, num_figures)


class _ErrorFigures:
    """Draws a report's error figures (``figures.write_error_figure``): all are submitted up
    front and collected in page order, in worker processes when ``workers > 1``, else in this
    process. A worker's error reaches :meth:`result` as it is; a pool that breaks (a worker
    killed) or cannot start leaves the figures to this process."""

    def __init__(self, workers: int):
        self._pool: ProcessPoolExecutor | None = None
        self._jobs: dict[Any, tuple[str, dict[str, Any], Future | None]] = {}
        if workers > 1:
            try:  # "spawn": the caller may hold JAX's threads, which fork must not copy
                self._pool = ProcessPoolExecutor(
                    workers, mp_context=multiprocessing.get_context("spawn"))
            except (OSError, ValueError) as e:
                logging.warning("report: drawing the figures in this process (%s)", e)

    def submit(self, key: Any, path: str, kwargs: dict[str, Any]) -> None:
        future = None
        if self._pool is not None:
            try:  # workers start on submission: a failure to start one shows here
                with interrupts.workers_ignore_ctrl_c():  # Ctrl-C is this process's to handle
                    future = self._pool.submit(write_error_figure, path, **kwargs)
            except (BrokenProcessPool, OSError, RuntimeError) as e:
                logging.warning("report: drawing the figures in this process (%s)", e)
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
        self._jobs[key] = (path, kwargs, future)

    def result(self, key: Any) -> list[tuple[str, list[int]]]:
        """The pie's areas of figure ``key`` (:func:`figures.pie_areas`), once it is written."""
        path, kwargs, future = self._jobs.pop(key)
        if future is not None:
            try:
                return future.result()
            except (BrokenProcessPool, CancelledError) as e:
                logging.warning("report: no figure worker drew %s (%s); drawing it here",
                                path, e or type(e).__name__)
        return write_error_figure(path, **kwargs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# What the pages show, as plain data for the templates.


def _signed_tiles(maps: np.ndarray) -> np.ndarray:
    """Signed maps ``[n, H, W]`` on one symmetric scale (``figures.overlay_scale``): float32,
    +-1 at the scale (larger magnitudes are drawn at full colour)."""
    scale = overlay_scale(maps)
    return (maps / scale if scale > 0 else np.zeros_like(maps)).astype(np.float32)


def write_overlay_strip(tiles: Sequence[np.ndarray], path: str) -> None:
    """One PNG of signed tiles (each ``[H, W]`` in [-1, 1]) side by side, each resized to
    ``THUMBNAIL_WH`` (``figures.overlay_image``)."""
    overlay_image(tiles, THUMBNAIL_WH).save(path, "PNG", compress_level=PNG_COMPRESS_LEVEL)


def _maps_view(record: dict[str, Any], arrays: dict[str, np.ndarray], figure_ranks: list[int],
               attributes: list[str], write: Callable[[str, list[np.ndarray]], str]
               ) -> dict[str, Any]:
    """The overlay strips of one query: tile 0 the query's evidence, tiles 1..k the ranked
    images' evidence, then per error composition the pair's query and gallery contribution."""
    names = [str(a) for a in arrays["attributes"]]
    strips = {}
    for name in attributes:
        if name not in names:
            continue
        a = names.index(name)
        evidence = _signed_tiles(np.concatenate([arrays["query_evidence"][None, a],
                                                 arrays["gallery_evidence"][:, a]]))
        pairs = [m for r in figure_ranks for m in (arrays["query_contribution"][r - 1, a],
                                                   arrays["gallery_contribution"][r - 1, a])]
        contribution = _signed_tiles(np.stack(pairs)) if pairs else []
        strips[name] = write(name, [*evidence, *contribution])
    return strips


def _query_view(record: dict[str, Any], *, thumbs: Callable[[str, int, str], str],
                figures: Callable[[dict, int], tuple[str, list]], error_ranks: Sequence[int],
                mode: str, maps: dict[str, np.ndarray] | None = None,
                overlay: Callable[[str, list[np.ndarray]], str] | None = None,
                head: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One query row (Figure 4.2) and its error compositions (Figure 4.3); ``head`` (the run
    summary's ``head_accuracy``, ``reid_jax.explain.learned.summary``) marks the rows and maps
    of the attributes the head has not learned or that were not measured."""
    cautions = learned.cautions(head)
    not_learned = set(head["not_learned"]) if head else set()
    q = record["query"]
    gal = record["gallery"]
    k = len(gal["index"])
    ap = record["ap"]
    first = record["first_match_rank"]
    gallery = [{"rank": r + 1, "file": gal["file"][r], "pid": gal["pid"][r],
                "camera": gal["camera"][r], "distance": gal["distance"][r],
                "true_match": bool(gal["true_match"][r]),
                "thumb": thumbs("gallery", gal["index"][r], gal["file"][r])} for r in range(k)]
    attributes = []
    for j, att in enumerate(record["selected_attributes"]):
        cells = []
        for r in range(k):
            s = record["matching_scores"][r][j]
            cells.append({"score": s, "probability": record["gallery_probabilities"][r][j],
                          "percent": score_percent(s), "color": _score_color(s)})
        attributes.append({"display": att["display"], "probability": att["probability"],
                           "attribute": att["attribute"], "cells": cells,
                           "caution": cautions.get(att["attribute"]),
                           "not_learned": att["attribute"] in not_learned})
    what = _MODE_WHAT[mode]
    figs = []
    for rank in error_ranks:
        if rank > k:
            continue
        label = (f"rank {rank}: {gal['file'][rank - 1]} "
                 f"({'true' if gal['true_match'][rank - 1] else 'false'} match)")
        src, areas = figures(record, rank)
        figs.append({"src": src, "label": label, "what": what, "rank": rank,
                     "areas": [{"attribute": n, "coords": ",".join(map(str, c))}
                               for n, c in areas],
                     "gallery_thumb": gallery[rank - 1]["thumb"],
                     "true_match": gallery[rank - 1]["true_match"]})
    strips: dict[str, str] = {}
    chosen = None
    if maps is not None and overlay is not None:
        wanted = [att["attribute"] for att in attributes]
        wanted += [area["attribute"] for f in figs for area in f["areas"]]
        if k:
            errors = np.asarray(record["errors"][0], np.float64)
            wanted.append(str(maps["attributes"][int(np.argmax(errors))]))
        wanted = list(dict.fromkeys(wanted))
        strips = _maps_view(record, maps, [f["rank"] for f in figs], wanted, overlay)
        # The first map shown is of an attribute the head has learned, where there is one.
        chosen = next((n for n in wanted if n not in cautions), wanted[0]) if wanted else None
        for i, f in enumerate(figs):
            f["tiles"] = (k + 1 + 2 * i, k + 2 + 2 * i)
    return {"number": record["position"] + 1, "file": q["file"], "pid": q["pid"],
            "camera": q["camera"], "ap": ap, "bad_ap": ap is not None and ap < 0.5,
            "first_match": f"rank {first}" if first is not None else "none",
            "num_matches": record["num_matches"],
            "thumb": thumbs("query", q["index"], q["file"]), "gallery": gallery,
            "attributes": attributes, "figures": figs, "strips": strips, "chosen": chosen,
            "cautions": {n: cautions[n] for n in strips if n in cautions}}


def _generic_tables(metrics: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """A nested JSON object as scalars, lists and per-attribute ``[A]`` lists."""
    scalars: list[tuple[str, Any]] = []
    per_attribute: dict[str, list] = {}
    lists: list[tuple[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, v in value.items():
                walk(f"{prefix} / {key}" if prefix else str(key), v)
        elif isinstance(value, list) and len(value) == len(names) and all(
                v is None or isinstance(v, (int, float)) for v in value):
            per_attribute[prefix] = value
        elif isinstance(value, list):
            lists.append((prefix, value))
        else:
            scalars.append((prefix, value))

    walk("", metrics)
    return {"scalars": scalars, "lists": lists, "per_attribute": per_attribute}


def _same_path(a: Any, b: Any) -> bool:
    return os.path.normpath(os.path.abspath(str(a))) == os.path.normpath(os.path.abspath(str(b)))


def _quality_view(metrics: dict[str, Any], summary: dict[str, Any],
                  names: Sequence[str]) -> dict[str, Any]:
    """The explanation-quality section: the table of ``tools/evaluate_explanations.py``
    (``reid_jax.explain.table``) with its details, or generic tables for other JSON."""
    view: dict[str, Any] = {"source": summary.get("explanation_metrics_file"), "table": None}
    try:
        if metrics.get("format") != quality_table.FORMAT:
            raise ValueError(f"format {metrics.get('format')!r}, not "
                             f"{quality_table.FORMAT!r}")
        table = quality_table.summary_table(metrics)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        view["reason"] = f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e)
        view["generic"] = _generic_tables(metrics, names)
        return view

    settings = metrics.get("settings", {})
    data = metrics.get("data", {})
    facts = []
    if settings.get("checkpoint"):
        other = summary.get("checkpoint") and not _same_path(settings["checkpoint"],
                                                             summary["checkpoint"])
        facts.append({"text": f"checkpoint {settings['checkpoint']}",
                      "other_run": "checkpoint" if other else ""})
    if settings.get("data_root"):
        other = summary.get("data_root") and not _same_path(settings["data_root"],
                                                            summary["data_root"])
        facts.append({"text": f"data root {settings['data_root']}",
                      "other_run": "data root" if other else ""})
    if data:
        facts.append({"text": (
            f"{data.get('num_queries', '?')} queries ({data.get('num_labelled_queries', '?')} "
            f"labelled), {data.get('num_gallery', '?')} gallery images "
            f"({data.get('num_labelled_gallery', '?')} labelled)"
            + (", synthetic" if data.get("synthetic") else "")), "other_run": ""})

    rows = []
    family = None
    for row in table.rows:
        # Groups: counterfactuals; AUROC over all pairs, over the top k; AMD likewise.
        row_family = (row.metric.split()[0], "all pairs" in row.metric)
        # Bold: the best explanation of the row; the baselines (prior, chance) are set apart.
        explained = row.values[len(quality_table.BASELINES):]
        present = [v for v in explained if v is not None]
        best = max(present) if len(present) > 1 else None
        cells = [{"text": text,
                  "css": ("chance" if i < len(quality_table.BASELINES) else
                          "best" if best is not None and v == best else "")}
                 for i, (v, text) in enumerate(zip(row.values, row.cells, strict=True))]
        rows.append({"metric": row.metric, "n": row.n, "cells": cells,
                     "skipped": row.skipped,
                     "new_group": family is not None and row_family != family})
        family = row_family

    cf = metrics.get("counterfactual", {})
    subsets = cf.get("subsets") if isinstance(cf, dict) else None
    subsets = ({name: (s if isinstance(s, dict) else {}) for name, s in subsets.items()}
               if isinstance(subsets, dict) and subsets else {})
    subset_keys = list(dict.fromkeys(key for s in subsets.values() for key in s))
    attribute_tables = []
    for family, title in (("counterfactual", "counterfactual hit rate per changed attribute"),
                          ("auroc", "matching-score AUROC per query attribute"),
                          ("amd", "AMD per attribute: pairs where it differs, precision "
                                  "and AP of each explanation")):
        part = metrics.get(family)
        per_attribute = part.get("per_attribute") if isinstance(part, dict) else None
        if not isinstance(per_attribute, dict):
            continue
        columns = {k: v for k, v in per_attribute.items()
                   if isinstance(v, list) and len(v) == len(names)}
        if not columns:
            continue
        counts = any(isinstance(v, int) and not isinstance(v, bool)
                     for values in columns.values() for v in values)
        attribute_tables.append((title + (" (counts; rates in %)" if counts else " (in %)"),
                                 columns))
    maps = metrics.get("maps")
    maps_skipped = maps.get("skipped") if isinstance(maps, dict) else None
    maps_error = None
    try:
        maps_view = quality_table.maps_table(metrics)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        # A maps section this version cannot read: the rest of the table still shows.
        maps_view = None
        reason = f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e)
        maps_error = f"the file's maps section cannot be read ({reason})"
    view.update(table=table, rows=rows, facts=facts, subsets=subsets, subset_keys=subset_keys,
                attribute_tables=attribute_tables, maps_table=maps_view,
                maps_skipped=maps_skipped, maps_error=maps_error)
    return view


def _not_learned_text(head: Mapping[str, Any] | None) -> str:
    """The summary page's line on the attributes the head has not learned."""
    if not head:
        return ("not known: the attribute head was saved without its test accuracy (train it "
                "again with tools/train_attributes.py to have them marked)")
    threshold = f"{100 * head['min_accuracy']:.0f} %"
    if not head["not_learned"]:
        text = f"none: the head reads every measured attribute at >= {threshold}"
    else:
        listed = ", ".join(f"{n} {100 * head['accuracy'][n]:.0f} %" for n in head["not_learned"])
        text = (f"{listed} (balanced accuracy on the labelled test images below {threshold}; "
                "their rows and maps are marked: a map cannot show what the model does not "
                "hold)")
    if head["not_measured"]:
        text += f"; not measured (one class in the test images): {', '.join(head['not_measured'])}"
    return text


def _index_context(summary: dict[str, Any], records: Sequence[dict], pages: int,
                   metrics_png: str | None) -> dict[str, Any]:
    cmc = summary["cmc"]
    threshold = summary["threshold"]
    t_text = (f"{threshold:g}" if isinstance(threshold, (int, float))
              else "per attribute: " + ", ".join(f"{t:g}" for t in threshold))
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
        ("order", _ORDER_TEXT.get(summary["order"], summary["order"])),
        ("drawn in this report", f"{len(records)} queries on {pages} page(s); "
                                 f"explanations.jsonl holds all {summary['num_queries']}"),
        ("attributes not learned", _not_learned_text(summary.get("head_accuracy"))),
    ]
    names = summary.get("attribute_names", ATTRIBUTE_NAMES)
    metrics = summary.get("explanation_metrics")
    queries = [{"number": r["position"] + 1, "file": r["query"]["file"],
                "href": f"{_page_name(r['position'] // PAGE_SIZE)}#q{r['position'] + 1}",
                "pid": r["query"]["pid"], "camera": r["query"]["camera"], "ap": r["ap"],
                "first_rank": r["first_match_rank"], "hits": sum(r["gallery"]["true_match"]),
                "shown": len(r["gallery"]["true_match"]),
                "num_selected": len(r["selected_attributes"])} for r in records]
    return {"title": "Explained re-id rankings", "heading": "Explained re-id rankings",
            "kpis": kpis, "cmc_length": len(cmc), "metrics_png": metrics_png, "facts": facts,
            "quality": _quality_view(metrics, summary, names) if metrics else None,
            "metrics_copy": METRICS_COPY, "names": names, "rule_texts": _rules(summary["mode"]),
            "queries": queries, "pages": pages, "k": summary["k"],
            "order_text": _ORDER_TEXT.get(summary["order"], summary["order"])}


# ---------------------------------------------------------------------------------------------
# The report.


def _write_pages(report_dir: str, summary: dict[str, Any], records: Sequence[dict[str, Any]], *,
                 maps_of: Callable, thumbs: Callable, figures: Callable,
                 progress: bool | Callable[[int], None]) -> int:
    """The pages of query rows, :data:`PAGE_SIZE` queries each; returns their number."""
    mode = summary["mode"]
    error_ranks = summary.get("error_ranks", [])
    bar = ProgressBar(len(records), "report") if progress is True else None
    tick = progress if callable(progress) else (bar.update if bar else None)
    pages = max(1, -(-len(records) // PAGE_SIZE)) if records else 0
    page_template = _ENV.get_template("queries.html")
    try:  # the bar ends before an error line (Ctrl-C: the tool's last line)
        for page in range(pages):
            chunk = records[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
            first, last = chunk[0]["position"] + 1, chunk[-1]["position"] + 1
            views = []
            for record in chunk:
                arrays, overlay = maps_of(record)
                views.append(_query_view(record, thumbs=thumbs, figures=figures,
                                         error_ranks=error_ranks, mode=mode, maps=arrays,
                                         overlay=overlay,
                                         head=summary.get("head_accuracy")))
                if tick is not None:
                    tick(1)
            html = page_template.render(
                title=f"Explained rankings, queries {first}–{last}",
                heading=f"Queries {first}–{last} of {summary['num_queries']}", k=summary["k"],
                mode=mode, order=summary["order"], page=page, pages=pages,
                rule_texts=_rules(mode), queries=views)
            with open(os.path.join(report_dir, _page_name(page)), "w", encoding="utf-8") as f:
                f.write(html)
    finally:
        if bar is not None:
            bar.close()
    return pages


def write_report(report_dir: str | os.PathLike, summary: dict[str, Any],
                 records: Sequence[dict[str, Any]], *, data_root: str | os.PathLike,
                 progress: bool | Callable[[int], None] = False,
                 maps_root: str | os.PathLike | None = None,
                 figure_workers: int | None = 1) -> str:
    """Writes the report into ``report_dir`` (created; must not exist yet) and returns the path
    of its ``index.html``.

    Not atomic by itself: ``reid_jax.explain.run.run`` writes it into a staging folder and
    publishes the finished folder.

    Args:
      report_dir: the folder to create.
      summary: the run summary (``summary.json`` of ``explain.run.run``: mAP, cmc, mINP,
        counts, k, threshold, mode, order, error_ranks, explanation_metrics, ...).
      records: JSONL records to draw (in order).
      data_root: the Market-1501 root the records' file names are relative to.
      progress: ``True`` draws a stderr bar; a callable is called with the queries done.
      maps_root: the folder the records' ``maps`` paths are relative to (the run's output
        folder); records with maps get overlays. Default: ``report_dir``'s parent.
      figure_workers: processes that draw the error figures (0 or 1: this one); None: one per
        usable core from :data:`FIGURE_POOL_MIN` figures on (:func:`num_figure_workers`). The
        files are the same either way. Workers start with ``multiprocessing``'s "spawn" (the
        caller may hold JAX's threads), which imports the calling script again: guard its
        entry point with ``if __name__ == "__main__":``.
    """
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
    maps_root = os.fspath(maps_root) if maps_root is not None else os.path.dirname(
        os.path.abspath(report_dir))
    mode = summary["mode"]
    error_ranks = summary.get("error_ranks", [])
    names = summary.get("attribute_names", ATTRIBUTE_NAMES)
    done: dict[tuple[str, int], str] = {}

    def thumbs(split: str, index: int, file: str) -> str:
        key = (split, int(index))
        if key not in done:
            rel = f"img/{split[0]}{int(index):06d}.jpg"
            write_thumbnail(os.path.join(data_root, SPLIT_FOLDERS[split], file),
                            os.path.join(report_dir, rel))
            done[key] = rel
        return done[key]

    def figure_rel(record: dict, rank: int) -> str:
        return f"fig/errors-{record['position'] + 1:05d}-rank{rank:02d}.png"

    def figure_job(record: dict, rank: int) -> dict[str, Any]:
        gal = record["gallery"]
        return {"errors": record["errors"][rank - 1], "distance": gal["distance"][rank - 1],
                "mode": mode, "rank": rank,
                "gallery_label": f"id {gal['pid'][rank - 1]:04d} cam {gal['camera'][rank - 1]}",
                "names": list(names),
                "remainder": record["remainder"][rank - 1] if mode == "projection" else None}

    jobs = [(record, rank) for record in records for rank in error_ranks
            if rank <= len(record["gallery"]["index"])]
    drawer = _ErrorFigures(num_figure_workers(len(jobs), figure_workers))

    def figures(record: dict, rank: int) -> tuple[str, list]:
        return figure_rel(record, rank), drawer.result((record["position"], rank))

    def maps_of(record: dict) -> tuple[dict | None, Callable | None]:
        if not record.get("maps"):
            return None, None
        arrays = map_outputs.read_query_maps(os.path.join(maps_root, record["maps"]))
        if arrays["gallery_evidence"].shape[0] != len(record["gallery"]["index"]):
            raise ValueError(f"attribute maps {record['maps']} hold "
                             f"{arrays['gallery_evidence'].shape[0]} ranked images, the record "
                             f"{len(record['gallery']['index'])}")
        os.makedirs(os.path.join(report_dir, "maps"), exist_ok=True)

        def overlay(name: str, tiles: list) -> str:
            rel = f"maps/q{record['position'] + 1:05d}-{name}.png"
            write_overlay_strip(tiles, os.path.join(report_dir, rel))
            return rel

        return arrays, overlay

    try:
        for record, rank in jobs:
            drawer.submit((record["position"], rank),
                          os.path.join(report_dir, figure_rel(record, rank)),
                          figure_job(record, rank))
        pages = _write_pages(report_dir, summary, records, maps_of=maps_of, thumbs=thumbs,
                             figures=figures, progress=progress)
    finally:
        drawer.close()
    metrics_png = None
    if summary.get("cmc") and summary.get("ap_histogram"):
        metrics_png = "fig/metrics.png"
        save_png(metrics_figure(summary["cmc"], summary["ap_histogram"]),
                 os.path.join(report_dir, metrics_png))
    if summary.get("explanation_metrics"):
        with open(os.path.join(report_dir, METRICS_COPY), "w", encoding="utf-8") as f:
            json.dump(summary["explanation_metrics"], f, indent=1)
            f.write("\n")
    index = os.path.join(report_dir, "index.html")
    with open(index, "w", encoding="utf-8") as f:
        f.write(_ENV.get_template("index.html").render(
            **_index_context(summary, records, pages, metrics_png)))
    return index


__all__ = ["DISPLAY_RULES", "PAGE_SIZE", "THUMBNAIL_WH", "error_figure", "metrics_figure",
           "score_percent", "write_overlay_strip", "write_report", "write_thumbnail"]
