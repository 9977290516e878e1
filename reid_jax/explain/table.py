"""The explanation-quality table: one layout for the README, the terminal and the report.

``tools/evaluate_explanations.py`` writes ``explanation_metrics.json`` (format :data:`FORMAT`);
:func:`summary_table` turns it into rows (metric, n, the two baselines, one value per
explanation, each with its 95 % interval) that :func:`markdown_table` prints and
``reid_jax.explain.report`` draws in HTML.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from reid_jax.explain import metrics as em

FORMAT = "reid_jax.explanation_metrics/2"
MODES = em.MODES  # ("prior", "paper", "complete", "projection", "scores", "disagreement")
# The explanations measured, in table order, and the two baselines before them.
EXPLANATIONS = ("paper", "complete", "projection", "scores", "disagreement")
BASELINES = ("prior", "chance")
COLUMNS = (*BASELINES, *EXPLANATIONS)
MODE_TITLES = {"prior": "prior (fixed order)", "chance": "chance",
               "paper": "eq. 3.2 (paper)", "complete": "complete decomposition",
               "projection": "projection + remainder", "scores": "eq. 3.1 (1 - s)",
               "disagreement": "P(labels differ)"}
HIT_RANKS = (1, 3)
_AMD_ROWS = (("ex_precision_d", "Ex-Precision_d", "num_pairs_d"),
             ("ex_map_d", "Ex-mAP_d", "num_pairs_d"),
             ("ex_precision_s", "Ex-Precision_s", "num_pairs_s"),
             ("ex_map_s", "Ex-mAP_s", "num_pairs_s"),
             ("ex_precision_s_amd", "Ex-Precision_s (AMD rule)", "num_pairs_s_amd"),
             ("ex_map_s_amd", "Ex-mAP_s (AMD rule)", "num_pairs_s_amd"))


def _pct(x: Any) -> str:
    return "—" if x is None else f"{100.0 * float(x):.1f}"


def format_cell(value: Any, interval: Any = None) -> str:
    """``43.8 [41.2, 46.5]`` (percent, one decimal); ``—`` for no value."""
    if value is None:
        return "—"
    if interval is None:
        return _pct(value)
    return f"{_pct(value)} [{_pct(interval[0])}, {_pct(interval[1])}]"


class TableRow(NamedTuple):
    """One row of :func:`summary_table`.

    Attributes:
      metric: what the row measures, e.g. ``counterfactual hit rate, top-1``.
      n: pairs (AUROC: query-attribute entries); ``None`` when the part was skipped.
      values: one fraction in ``[0, 1]`` per column of :data:`COLUMNS` (``None``: does not
        apply).
      intervals: the 95 % interval ``[lo, hi]`` of every value (``None``: none).
      skipped: why the part was not measured (``""``: it was).
    """

    metric: str
    n: int | None
    values: tuple[float | None, ...]
    intervals: tuple[list[float] | None, ...]
    skipped: str = ""

    @property
    def cells(self) -> tuple[str, ...]:
        """The values as text, with their intervals."""
        return tuple(format_cell(v, i) for v, i in zip(self.values, self.intervals,
                                                        strict=True))


class SummaryTable(NamedTuple):
    """The table of :func:`markdown_table` as data (``reid_jax.explain.report`` renders it in HTML).

    Attributes:
      columns: the header: ``metric``, ``n``, one title per column of :data:`COLUMNS`.
      rows: :class:`TableRow` s, in the order printed.
      legend: sentences explaining the table.
    """

    columns: tuple[str, ...]
    rows: tuple[TableRow, ...]
    legend: tuple[str, ...]


def _row(metric: str, n: Any, entries: dict[str, tuple[Any, Any]]) -> TableRow:
    """A row from ``{column: (value, interval)}`` (missing columns: no value)."""
    cells = [entries.get(c, (None, None)) for c in COLUMNS]
    return TableRow(metric, None if n is None else int(n), tuple(v for v, _ in cells),
                    tuple(i for _, i in cells))


def summary_table(metrics: dict[str, Any]) -> SummaryTable:
    """The rows of the README table of the measured ``metrics`` (the JSON layout).

    Rows: counterfactual hit rate top-1 / top-3; matching-score AUROC (pooled, and the mean of
    the per-attribute AUROCs) over all pairs and the top ``k``, for confident and all
    attributes; AMD Ex-Precision / Ex-mAP ``_d``, ``_s`` and ``_s`` by AMD's rule over all
    pairs and the top ``k``.  Raises ``KeyError`` when ``metrics`` lacks one of these entries.
    """
    k = metrics["settings"]["k"]
    top = f"top{k}"
    columns = ("metric", "n", *(MODE_TITLES[c] for c in COLUMNS))
    rows: list[TableRow] = []
    cf = metrics["counterfactual"]
    if "skipped" in cf:
        rows.append(TableRow("counterfactual hit rate", None, (None,) * len(COLUMNS),
                             (None,) * len(COLUMNS), skipped=str(cf["skipped"])))
    else:
        for m in HIT_RANKS:
            key = f"top{m}"
            entries = {mode: (cf[mode][key], cf[mode]["intervals"][key])
                       for mode in (*EXPLANATIONS, "prior") if mode in cf}
            entries["chance"] = (cf["chance"][key], None)
            rows.append(_row(f"counterfactual hit rate, top-{m}", cf["num_pairs"], entries))
    for scope, scope_name in (("all_pairs", "all pairs"), (top, f"top-{k}")):
        for which, which_name in (("confident", "confident attributes"),
                                  ("all_attributes", "all attributes")):
            a = metrics["auroc"][scope][which]
            n = a["num_positive"] + a["num_negative"]
            for kind, kind_name in (("pooled", "pooled"), ("macro", "mean per attribute")):
                entries = {mode: (a[mode][kind], a[mode].get(f"{kind}_interval"))
                           for mode in em.SCORE_MODES}
                entries["prior"] = (a["prior"][kind], a["prior"].get(f"{kind}_interval"))
                entries["chance"] = (0.5, None)
                rows.append(_row(f"matching-score AUROC {kind_name}, {scope_name}, "
                                 f"{which_name}", n, entries))
    for scope, scope_name in (("all_pairs", "all pairs"), (top, f"top-{k}")):
        amd = metrics["amd"][scope]
        for key, title, count in _AMD_ROWS:
            entries = {mode: (amd[mode][key], amd[mode]["intervals"][key])
                       for mode in (*EXPLANATIONS, "prior")}
            entries["chance"] = (amd["chance"][key], None)
            rows.append(_row(f"AMD {title}, {scope_name}", amd[count], entries))
    threshold = metrics["settings"]["threshold"]
    t_text = (f"{threshold:g}" if isinstance(threshold, (int, float))
              else "per attribute")
    prior = metrics.get("prior") or {}
    level = metrics["settings"].get("interval_level", 0.95)
    legend = [
        f"Values in %, with {100 * level:.0f} % intervals [lo, hi] by a bootstrap over queries "
        f"(counterfactuals: over counterfactual images). n: pairs (AUROC: query-attribute "
        f"entries). Top-{k}: the {k} best-ranked gallery images of every query, as in the "
        f"report (Market-1501 protocol: same identity and camera, and junk, removed). Confident "
        f"attributes: |x - 0.5| > {t_text}.",
        f"Prior: one fixed attribute order from the training split alone — how often "
        f"{prior.get('num_identities', 'the')} training identities differ in each attribute "
        f"(all pairs), and how often training images and their {prior.get('k', k)} nearest "
        f"images of other identities differ (top-{k} and counterfactual pairs); as a matching "
        f"score (AUROC), each attribute's training agreement rate. Chance: a uniformly random "
        f"attribute order.",
        "AMD rule: the _s metrics also count pairs whose labels all agree, where attributes "
        "with more than 2/30 of the positive separation count as misses.",
    ]
    calibrated = metrics["settings"].get("calibrated_disagreement")
    if calibrated is not None:
        legend.append(
            "P(labels differ): from the head's probabilities calibrated on held-out training "
            "identities." if calibrated else
            "P(labels differ): from the head's raw probabilities (the checkpoint stores no "
            "calibration).")
    if "skipped" in cf:
        legend.append(f"Counterfactuals skipped: {cf['skipped']}")
    else:
        legend.append(
            f"Counterfactuals: {cf['num_counterfactuals']} re-rendered gallery images "
            f"({cf['num_rejected_invisible']} barely visible changes rejected), each paired "
            f"with the queries that rank it in their top {k} or match it; a hit: a changed "
            "attribute rises most (top-1) or among the 3 largest rises (top-3); the prior, "
            "which has no rise, by its fixed order.")
    return SummaryTable(columns, tuple(rows), tuple(legend))


# The maps table (docs/attribute_maps.md, 'Measurements'): one row per measurement and
# attribute group, columns the map and its baselines (what does not apply is empty).
MAP_COLUMNS = ("maps", "centre", "distance Grad-CAM", "part occlusion", "random")
MAP_GROUPS = ("overall", "headwear", "bags", "upper_body", "lower_body", "whole_person")
# The pointing game and the agreement with part occlusion also by kind of look
# (map_metrics.ATTRIBUTE_KINDS), as "<kind> attributes".
MAP_KINDS = ("colour", "shape", "object")
_MAP_ROWS = (("pointing_game", "pointing game", "evidence", "centre", "gradcam", "occlusion",
              "chance"),
             ("occlusion_agreement", "agreement with part occlusion", "evidence", "centre",
              "gradcam", None, "chance"),
             ("counterfactual_localisation", "counterfactual localisation", "map", "centre",
              "gradcam", None, "chance"),
             ("deletion_evidence", "deletion, evidence (x_a)", "map", None, None, None, None),
             ("deletion_contributions", "deletion, contributions (e_a)", "map", None, None,
              None, None))


class MapsTable(NamedTuple):
    """The maps table: ``rows`` of ``(measurement, group, n, cells)``, ``cells`` text per
    :data:`MAP_COLUMNS`, and the legend."""

    columns: tuple[str, ...]
    rows: tuple[tuple[str, str, int, tuple[str, ...]], ...]
    legend: tuple[str, ...]


def _rate(entry: dict[str, Any], key: str | None) -> str:
    if key is None or key not in entry:
        return ""
    value = entry[key]
    return _pct(value.get("rate", value.get("expected_rate")))


def _map_path(maps: dict[str, Any]) -> str:
    """Where the measured maps' path ran and started, in words (older files: the last map)."""
    layer = maps.get("layer", 4)
    where = "the last feature map" if layer == 4 else f"stage {layer}'s output"
    count = maps.get("reference_images", 0)
    start = f"the mean map of {count} gallery images" if count else "zeros"
    if maps.get("method") == "deeplift":
        return f"DeepLIFT maps through {where}, from {start}"
    return f"maps through {where}, from {start}, {maps.get('steps', 32)} quadrature nodes"


def _learned_legend(maps: dict[str, Any]) -> str:
    learned = (maps.get("pointing_game") or {}).get("learned")
    if not learned:
        return ""
    return ("'learned attributes': those of them that the head tells apart on the labelled test "
            f"images with a balanced accuracy of at least {_pct(learned['min_accuracy'])} %; ")


def maps_table(metrics: dict[str, Any]) -> MapsTable | None:
    """The maps section of ``metrics`` as a table, or None when it is absent or skipped."""
    maps = metrics.get("maps")
    if not isinstance(maps, dict) or "skipped" in maps:
        return None
    rows = []
    for key, title, *methods in _MAP_ROWS:
        part = maps.get(key)
        if not part:
            continue
        parts = [(title, part)]
        if part.get("labelled_present"):  # the pointing game over the cases labels confirm
            parts.append((f"{title}, labelled present", part["labelled_present"]))
        if part.get("learned"):  # ... and over the attributes the model has learned
            parts.append((f"{title}, learned attributes", part["learned"]))
        for name, summary in parts:
            selections = [(g, summary["overall"] if g == "overall" else summary["groups"].get(g))
                          for g in MAP_GROUPS]
            if key in ("pointing_game", "occlusion_agreement"):
                selections += [(f"{k} attributes", summary.get("kinds", {}).get(k))
                               for k in MAP_KINDS]
            for group, entry in selections:
                if not entry or not entry["cases"]:
                    continue
                cells = tuple(_rate(entry, m) for m in methods)
                if key.startswith("deletion"):
                    cells = (*cells[:-1], _pct(0.5))
                rows.append((name, group, int(entry["cases"]), cells))
    for key, title in (("query_top1", "query and rank-1"), ("counterfactual",
                                                           "original and re-render")):
        c = (maps.get("completeness") or {}).get(key)
        if c and c["pairs"]:
            rows.append((f"completeness error, {title} (max / mean)", "pairs",
                         int(c["pairs"]),
                         (f"{c['max']:.1e} / {c['mean']:.1e}", *[""] * (len(MAP_COLUMNS) - 1))))
    legend = (
        f"Attribute maps against the part masks, {maps['num_images']} query images and "
        f"{maps['num_counterfactual_pairs']} counterfactual pairs, values in % of the cases "
        f"(n); {_map_path(maps)}. Pointing game: the evidence map's peak lies within "
        f"{maps['tolerance']:g} px of "
        "the attribute's region (attributes with x_a > 0.5 and a non-empty region; "
        "'labelled present': those of them whose label says the image shows the attribute; "
        f"{_learned_legend(maps)}"
        "colour / shape / object attributes: garment colours; sleeve, lower-garment and hair "
        "length and a dress; hat and bags). Part occlusion, a reference that uses the part "
        "masks: the part whose greying (the mean colour) lowers z_a most; its deepest pixel "
        "is the peak. "
        "Agreement with part occlusion: on the pointing game's cases, the evidence map peaks "
        "within that distance of that part (does the map find what the model reads?). "
        "Counterfactual localisation: the contribution map (eq. 3.2) of the pair's largest-rising "
        "attribute peaks within that distance of the changed region (overall: the localisable "
        "changes; whole_person: gender and age). Deletion: blurring the map's top 10 % of pixels "
        "lowers x_a (e_a) more than blurring 10 % random pixels (random: 50 %). Completeness: "
        "max over attributes of |maps' sum - e_a| relative to sum_a |e_a|.",)
    return MapsTable(("measurement", "group", "n", *MAP_COLUMNS), tuple(rows), legend)


def markdown_table(metrics: dict[str, Any]) -> str:
    """The README table of the measured ``metrics`` (values in %), with a legend; then the
    maps table when the metrics hold a maps section."""
    table = summary_table(metrics)
    lines = ["| " + " | ".join(table.columns) + " |",
             "|" + "|".join([":---", "---:"] + ["---:"] * (len(table.columns) - 2)) + "|"]
    for row in table.rows:
        if row.skipped:
            cells = [row.metric, "—", "skipped"] + [""] * (len(COLUMNS) - 1)
        else:
            cells = [row.metric, str(row.n), *row.cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *table.legend]
    maps = maps_table(metrics)
    if maps is not None:
        lines += ["", "| " + " | ".join(maps.columns) + " |",
                  "|:---|:---|" + "---:|" * (len(maps.columns) - 2)]
        lines += ["| " + " | ".join([m, g, str(n), *cells]) + " |" for m, g, n, cells in
                  maps.rows]
        lines += ["", *maps.legend]
    elif isinstance(metrics.get("maps"), dict):
        lines += ["", f"Attribute maps skipped: {metrics['maps']['skipped']}"]
    return "\n".join(lines) + "\n"


__all__ = ["BASELINES", "COLUMNS", "EXPLANATIONS", "FORMAT", "HIT_RANKS", "MAP_COLUMNS",
           "MODES", "MODE_TITLES", "MapsTable", "SummaryTable", "TableRow", "format_cell",
           "maps_table", "markdown_table", "summary_table"]
