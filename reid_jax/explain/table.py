"""The explanation-quality table: one layout for the README, the terminal and the report.

``tools/evaluate_explanations.py`` writes ``explanation_metrics.json`` (format :data:`FORMAT`);
:func:`summary_table` turns it into rows (metric, n, one value per explanation, chance) that
:func:`markdown_table` prints and ``reid_jax.explain.report`` draws in HTML.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from reid_jax.explain import metrics as em

FORMAT = "reid_jax.explanation_metrics/1"
MODES = em.MODES  # ("paper", "complete", "scores")
MODE_TITLES = {"paper": "eq. 3.2 (paper)", "complete": "complete decomposition",
               "scores": "eq. 3.1 (1 - s)"}
HIT_RANKS = (1, 3)


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
    """The rows of the README table of the measured ``metrics`` (the JSON layout).

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
    """The README table of the measured metrics (values in %), with a legend."""
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


__all__ = ["FORMAT", "HIT_RANKS", "MODES", "MODE_TITLES", "SummaryTable", "TableRow",
           "markdown_table", "summary_table"]
