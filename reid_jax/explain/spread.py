"""How much the explanation metrics move between runs: the spread over seeds.

One demo run (a synthetic dataset, a trained model, an attribute head) gives one value per
metric; another seed gives another.  ``tools/seed_spread.py`` runs the demo for several seeds
and this module summarises the runs: per row of the quality table (``reid_jax.explain.table``)
and per column, the mean and the range over the runs, and the same for the re-id metrics
(``docs/design.md``, "Intervals").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reid_jax.explain import table as quality_table

FORMAT = "reid_jax.seed_spread/1"
REID_KEYS = (("mAP", "mAP"), ("rank1", "rank-1"), ("mINP", "mINP"))


def _stats(values: Sequence[float | None]) -> dict[str, Any] | None:
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    return {"mean": float(np.mean(present)), "min": float(np.min(present)),
            "max": float(np.max(present)), "runs": [None if v is None else float(v)
                                                    for v in values]}


def spread(metrics: Sequence[dict[str, Any]], evaluations: Sequence[dict[str, Any]] = (),
           seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Mean and range over runs of every cell of the quality table and of the re-id metrics.

    Args:
      metrics: the ``explanation_metrics.json`` of every run (one layout,
        ``quality_table.FORMAT``).
      evaluations: the ``evaluation.json`` of every run (``tools/evaluate.py``), or none.
      seeds: the seed of every run, recorded in the result.

    Returns:
      ``{"format", "seeds", "columns", "rows": [{"metric", "n": [per run], "cells": {column:
      {"mean", "min", "max", "runs"} | None}}], "reid": {key: {...}}}``.

    Raises:
      ValueError: no runs, a run of another format, or runs whose tables differ in their rows.
    """
    if not metrics:
        raise ValueError("no runs to summarise")
    if evaluations and len(evaluations) != len(metrics):
        raise ValueError(f"{len(evaluations)} evaluations for {len(metrics)} runs")
    if seeds is not None and len(seeds) != len(metrics):
        raise ValueError(f"{len(seeds)} seeds for {len(metrics)} runs")
    tables = []
    for i, m in enumerate(metrics):
        if m.get("format") != quality_table.FORMAT:
            raise ValueError(f"run {i}: format {m.get('format')!r}, not "
                             f"{quality_table.FORMAT!r}")
        tables.append(quality_table.summary_table(m))
    names = [r.metric for r in tables[0].rows]
    for i, t in enumerate(tables[1:], 1):
        if [r.metric for r in t.rows] != names:
            raise ValueError(f"run {i} has other rows than run 0 (a skipped part, or another k)")
    rows = []
    for j, name in enumerate(names):
        cells = {}
        for c, column in enumerate(quality_table.COLUMNS):
            cells[column] = _stats([t.rows[j].values[c] for t in tables])
        rows.append({"metric": name, "n": [t.rows[j].n for t in tables], "cells": cells})
    reid = {}
    if evaluations:
        for key, _ in REID_KEYS:
            reid[key] = _stats([e.get("reid", {}).get(key) for e in evaluations])
    return {"format": FORMAT, "seeds": None if seeds is None else [int(s) for s in seeds],
            "num_runs": len(metrics), "columns": list(quality_table.COLUMNS), "rows": rows,
            "reid": reid}


def _cell(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "—"
    return (f"{100 * stats['mean']:.1f} ({100 * stats['min']:.1f}–"
            f"{100 * stats['max']:.1f})")


def markdown(result: dict[str, Any]) -> str:
    """The spread as a Markdown table: ``mean (min–max)`` in % per metric and column."""
    seeds = result.get("seeds")
    head = ["metric", *(quality_table.MODE_TITLES[c] for c in result["columns"])]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
    for key, title in REID_KEYS:
        if result["reid"].get(key) is not None:
            lines.append("| " + " | ".join([f"re-id {title}", _cell(result["reid"][key])]
                                           + [""] * (len(head) - 2)) + " |")
    for row in result["rows"]:
        lines.append("| " + " | ".join([row["metric"], *(_cell(row["cells"][c])
                                                          for c in result["columns"])]) + " |")
    runs = f"{result['num_runs']} runs" + (f" (seeds {', '.join(map(str, seeds))})"
                                           if seeds else "")
    lines += ["", f"Mean (min–max) over {runs}, values in %. Every run is a demo of its own: "
                  "a synthetic dataset, an AGW model and an attribute head trained with that "
                  "seed. Re-id: the first column holds the value."]
    return "\n".join(lines) + "\n"


__all__ = ["FORMAT", "REID_KEYS", "markdown", "spread"]
