"""Batch explanation runs: ranked galleries explained for many queries (``tools/explain.py``).

For the chosen queries of a Market-1501-layout data root this module

1. ranks the whole gallery (squared Euclidean distance of the retrieval embeddings, the
   Market-1501 protocol of ``reid_jax.evaluation``: gallery images with the query's pid *and*
   camera are left out, junk is not in the gallery, distractors stay) and computes every
   query's AP, INP and first-match rank, streamed in query chunks (bounded memory);
2. orders the queries (``query``: file-name order; ``worst_ap``: lowest AP first, the order in
   which a user triages failures; queries without a valid match last);
3. explains the top ``k`` of every query with the jitted kernels of ``reid_jax.explain``
   (section 3 of the paper: confident query attributes, matching scores of eq. 3.1, and the
   mode's explanation: attribute errors of eq. 3.2, their complete decomposition, the
   projection onto the attribute directions with its remainder, or the probability that the
   labels differ), again in query chunks;
4. writes ``explanations.jsonl`` (one record per query, see :func:`make_record`),
   ``summary.json`` and the HTML report ``report/`` (``reid_jax.explain.report``).

All three outputs are one ``reid_jax.atomic_io.ResultSet``: written into a staging folder and
published together by one atomic link swap, so at every instant ``output_dir`` holds the
complete previous outputs or the complete new ones (or none), never half-written ones; a folder
the tool did not write is never replaced without ``overwrite``. Embeddings computed from a
checkpoint are cached in ``output_dir/embeddings`` (``reid_jax.embeddings``), so a second run
skips the network.

AP consistency: the AP pass ranks with float32 GEMM distances (``|q|^2 + |g|^2 - 2 q.g``,
highest matmul precision) exactly as ``reid_jax.evaluation.rank_metrics`` would rank a distance
matrix; the explained top ``k`` comes from the kernels, which re-rank their candidates with
directly computed distances.  The two orders can differ only between near-tied images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from absl import logging

from reid_jax import atomic_io, checkpoints, embeddings, evaluation, explain, retrieval
from reid_jax.data import sources
from reid_jax.data.attributes import ATTRIBUTE_NAMES, NUM_ATTRIBUTES, display_name
from reid_jax.data.market1501 import (
    Market1501,
    Split,
)
from reid_jax.explain import learned, map_outputs, report, settings
from reid_jax.models.attribute_head import Calibration
from reid_jax.progress import ProgressBar

MODES = settings.MODES
ORDERS = settings.ORDERS
JSONL_NAME = settings.JSONL_NAME
SUMMARY_NAME = settings.SUMMARY_NAME
REPORT_NAME = settings.REPORT_NAME
METRICS_NAME = settings.METRICS_NAME
EMBEDDINGS_NAME = settings.EMBEDDINGS_NAME
MAPS_NAME = map_outputs.MAPS_NAME
CMC_RANKS = 50
MODE_EQUATIONS = {
    "paper": "eq. 3.2: e_a = sum_n (f_n^q - f_n^g)^2 w_na (signed; does not sum to the distance)",
    "complete": "complete decomposition: e_a = sum_n (f_n^q - f_n^g)^2 |w_na| / sum_b |w_nb| "
                "(non-negative; sums to the squared distance)",
    "projection": "projection: f^q - f^g = W c + r (least squares); e_a = c_a (W^T (f^q - f^g))_a "
                  "and the remainder |r|^2 sum to the squared distance",
    "disagreement": "disagreement: e_a = x_a^q (1 - x_a^g) + x_a^g (1 - x_a^q), the probability "
                    "that the labels differ, of the head's calibrated probabilities where it has "
                    "a calibration (not a decomposition of the distance)",
}


# ---------------------------------------------------------------------------------------------
# Data and query selection.


def load_data(data_root: str | os.PathLike, config: Any = None) -> Market1501:
    """Scans ``data_root`` once (``reid_jax.data.sources.load_dataset``: the reader options
    of ``config.data``); a clear ``ValueError`` when it holds no query images."""
    return sources.load_dataset(data_root, config, need_queries=True)


def select_queries(split: Split, queries: str | int | Sequence[str]) -> np.ndarray:
    """Indices into ``split`` of the queries to explain.

    Args:
      split: the query split.
      queries: ``"all"``; an int ``N`` (the first ``N`` in file-name order; more than there are
        means all); or file names (base names or paths) of query images.

    Returns:
      int64 ``[Q']`` indices in the given order (``"all"``/``N``: ascending).

    Raises:
      ValueError: unknown or repeated file names, ``N < 1``, an empty list.
    """
    n = len(split)
    if isinstance(queries, str):
        if queries != "all":
            raise ValueError(f"queries must be 'all', a count or a list of file names, "
                             f"got {queries!r}")
        return np.arange(n)
    if isinstance(queries, (int, np.integer)) and not isinstance(queries, bool):
        if queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {queries}")
        if queries > n:
            logging.warning("num_queries=%d but %s has %d queries: explaining all", queries,
                            split.folder, n)
        return np.arange(min(int(queries), n))
    names = [os.path.basename(str(q)) for q in queries]
    if not names:
        raise ValueError("query_files is empty: give at least one query file name")
    position = {os.path.basename(p): i for i, p in enumerate(split.paths)}
    missing = [q for q in names if q not in position]
    if missing:
        raise ValueError(f"{len(missing)} query files not found in {split.folder}: "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    repeated = sorted({q for q in names if names.count(q) > 1})
    if repeated:
        raise ValueError(f"query files given more than once: {repeated[:5]}")
    return np.asarray([position[q] for q in names], np.int64)


# ---------------------------------------------------------------------------------------------
# Ranking metrics per query (AP for the worst-AP order, CMC / mAP / mINP for the summary).


class QueryMetrics(NamedTuple):
    """Per-query Market-1501 metrics (``reid_jax.evaluation`` protocol), ``[Q]`` each.

    ap: float64 AP, NaN for a query without a valid match.  inp: float64 INP, NaN likewise.
    first_rank: int64 1-based rank of the first match in the filtered gallery, 0 if none.
    num_matches: int64 valid matches in the gallery.
    """

    ap: np.ndarray
    inp: np.ndarray
    first_rank: np.ndarray
    num_matches: np.ndarray


def per_query_metrics(distances: Any, query_pids: Any, gallery_pids: Any, query_cams: Any,
                      gallery_cams: Any) -> QueryMetrics:
    """AP, INP, first-match rank of every row of ``distances [C, G]`` (host, NumPy).

    ``reid_jax.evaluation.per_query_rank_metrics``, the core of ``rank_metrics``: its ``mAP`` /
    ``mINP`` are the means of ``ap`` / ``inp`` over the valid rows.
    """
    m = evaluation.per_query_rank_metrics(distances, query_pids, gallery_pids, query_cams,
                                          gallery_cams)
    return QueryMetrics(ap=m["ap"], inp=m["inp"], first_rank=m["first_rank"],
                        num_matches=m["num_matches"])


def summarize(metrics: QueryMetrics, max_rank: int = CMC_RANKS) -> dict[str, Any]:
    """``{"mAP", "mINP", "cmc" [max_rank], "num_valid_queries", "num_queries", "ap_histogram"}``.

    Means over the valid queries, equal to ``reid_jax.evaluation.rank_metrics`` on the same
    distances; ``ap_histogram`` = ``{"edges": [21], "counts": [20]}`` of their APs in [0, 1].

    Raises:
      ValueError: no query has a valid match.
    """
    valid = metrics.num_matches > 0
    if not valid.any():
        raise ValueError(f"no valid query: none of the {valid.size} queries has a matching "
                         "gallery image once same-pid same-camera images are removed")
    first = metrics.first_rank[valid]
    cmc = (first[None, :] <= np.arange(1, max_rank + 1)[:, None]).mean(axis=1)
    counts, edges = np.histogram(metrics.ap[valid], bins=20, range=(0.0, 1.0))
    return {"mAP": float(metrics.ap[valid].mean()), "mINP": float(metrics.inp[valid].mean()),
            "cmc": cmc.tolist(), "num_valid_queries": int(valid.sum()),
            "num_queries": int(valid.size),
            "ap_histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def ranking_metrics(f_query: np.ndarray, f_gallery: Any, query_pids: np.ndarray,
                    query_cams: np.ndarray, gallery_pids: np.ndarray, gallery_cams: np.ndarray,
                    *, chunk: int = 128, progress: ProgressBar | None = None) -> QueryMetrics:
    """:func:`per_query_metrics` of ``f_query [Q, N]`` against ``f_gallery [G, N]``, streamed.

    Memory: a few ``[chunk, G]`` arrays at a time.
    """
    parts = []
    for start, stop, d in retrieval.distance_chunks(f_query, f_gallery, chunk):
        parts.append(per_query_metrics(d, query_pids[start:stop], gallery_pids,
                                       query_cams[start:stop], gallery_cams))
        if progress is not None:
            progress.update(stop - start)
    return QueryMetrics(*(np.concatenate(x) for x in zip(*parts, strict=True)))


def query_order(metrics: QueryMetrics, order: str) -> np.ndarray:
    """Positions ``[Q]``: as given (``query``) or lowest AP first (``worst_ap``).

    ``worst_ap``: ties keep the given order; queries without a valid match (AP undefined) last.
    """
    q = metrics.ap.size
    if order == "query":
        return np.arange(q)
    if order == "worst_ap":
        key = np.where(np.isnan(metrics.ap), np.inf, metrics.ap)
        return np.argsort(key, kind="stable")
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


# ---------------------------------------------------------------------------------------------
# Explanations of the top k, in query chunks.


class QueryExplanation(NamedTuple):
    """The explained top ``k`` of one query after the protocol's removals (``k' <= k`` ranks).

    gallery: int64 ``[k']`` gallery indices.  distances: float32 ``[k']``.
    attributes_query: float32 ``[A]``.  selected: bool ``[A]``.
    attributes_gallery, scores, errors: float32 ``[k', A]`` (kernel outputs, unchanged).
    remainder: float32 ``[k']`` (``distance - sum_a errors``; see
    ``reid_jax.explain.RankingExplanation``).
    """

    gallery: np.ndarray
    distances: np.ndarray
    attributes_query: np.ndarray
    selected: np.ndarray
    attributes_gallery: np.ndarray
    scores: np.ndarray
    errors: np.ndarray
    remainder: np.ndarray


def explain_queries(f_query: np.ndarray, f_gallery: Any, weights: np.ndarray,
                    query_pids: np.ndarray, query_cams: np.ndarray, gallery_pids: np.ndarray,
                    gallery_cams: np.ndarray, *, k: int, threshold: Any, mode: str,
                    chunk: int = 256, gallery_chunk: int = 1024,
                    progress: ProgressBar | None = None, fetch: int | None = None,
                    validate: bool | None = None,
                    calibration: Calibration | None = None) -> Iterator[QueryExplanation]:
    """Yields the explained top ``k`` of every query of ``f_query [Q, N]``, in order.

    Each chunk of queries goes through :func:`reid_jax.explain.explain_rankings` with enough
    candidates (``k`` plus the most removals of any query) that the top ``k`` survive the
    protocol's removal of same-pid same-camera images. ``fetch`` asks for more (at least that
    many): a caller that explains one query at a time passes the count of the whole split, so
    the kernels compile once and rank as a run over the split does. ``validate`` is the
    kernels' input check (:func:`reid_jax.explain.explain_rankings`); a caller that explains one
    query at a time against a gallery it has checked once passes ``False`` (the check reads the
    whole gallery on every call). ``calibration`` is the head's, read by the ``disagreement``
    mode.
    """
    g = int(np.shape(f_gallery)[0])
    fetch = int(min(g, max(fetch or 0, k + int(retrieval.removed_counts(
        query_pids, query_cams, gallery_pids, gallery_cams).max(initial=0)))))
    fg = jnp.asarray(f_gallery, jnp.float32)
    w = jnp.asarray(weights, jnp.float32)
    t = jnp.asarray(threshold, jnp.float32)
    for start, stop, rows in retrieval.padded_chunks(np.asarray(f_query, np.float32), chunk):
        out = explain.explain_rankings(jnp.asarray(rows), fg, w, k=fetch, threshold=t,
                                       mode=mode, gallery_chunk=gallery_chunk,
                                       validate=validate, calibration=calibration)
        n = stop - start
        out = type(out)(*(np.asarray(x)[:n] for x in out))
        keep = retrieval.kept_in_ranking(out.indices, query_pids[start:stop],
                                         query_cams[start:stop], gallery_pids, gallery_cams)
        for i in range(n):
            idx = out.indices[i].astype(np.int64)
            pos = np.flatnonzero(keep[i])[:k]
            yield QueryExplanation(
                gallery=idx[pos], distances=out.distances[i][pos],
                attributes_query=out.attributes_query[i], selected=out.selected[i],
                attributes_gallery=out.attributes_gallery[i][pos], scores=out.scores[i][pos],
                errors=out.errors[i][pos], remainder=out.remainder[i][pos])
        if progress is not None:
            progress.update(stop - start)


def _optional(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def make_record(position: int, query: int, queries: Split, gallery: Split,
                explanation: QueryExplanation, metrics: tuple[float, float, int, int],
                mode: str) -> dict[str, Any]:
    """One JSONL record (plain JSON types; float32 values exactly as the kernels returned them).

    Keys: ``position`` (0-based place in this run's order), ``query`` {``index`` (in the query
    split), ``file``, ``pid``, ``camera``}, ``ap``, ``inp``, ``first_match_rank`` (``None``
    without a valid match), ``num_matches``, ``gallery`` {``index``, ``file``, ``pid``,
    ``camera``, ``distance`` (squared Euclidean), ``true_match``: lists of ``k'`` ranks},
    ``query_probabilities`` [A] (``sigmoid(f_q @ W)``, order of ``ATTRIBUTE_NAMES``),
    ``selected_attributes`` [S] of {``attribute``, ``display`` (``!name`` when absent),
    ``index``, ``probability``}, ``gallery_probabilities`` [k' x S], ``matching_scores``
    [k' x S] (eq. 3.1, raw: may exceed 1), ``error_mode`` (a mode of
    ``reid_jax.explain.MODES``), ``errors`` [k' x A] (the mode's explanation: eq. 3.2, the
    complete decomposition, the projection contributions or the disagreement probabilities;
    order of ``ATTRIBUTE_NAMES``), and for ``projection`` ``remainder`` [k'] (``|r|^2``; with
    the ``errors`` it sums to the distance). :func:`run` adds ``maps`` (the query's
    ``maps/<stem>.npz``, relative to the output folder) to the records it maps.
    """
    ex = explanation
    ap, inp, first, num = metrics
    sel = np.flatnonzero(ex.selected)
    xq = ex.attributes_query
    gal = ex.gallery
    qpid = int(queries.pids[query])
    return {
        "position": int(position),
        "query": {"index": int(query), "file": os.path.basename(queries.paths[query]),
                  "pid": qpid, "camera": int(queries.cameras[query])},
        "ap": _optional(ap),
        "inp": _optional(inp),
        "first_match_rank": int(first) if num > 0 else None,
        "num_matches": int(num),
        "gallery": {
            "index": gal.tolist(),
            "file": [os.path.basename(gallery.paths[g]) for g in gal],
            "pid": gallery.pids[gal].tolist(),
            "camera": gallery.cameras[gal].tolist(),
            "distance": ex.distances.tolist(),
            "true_match": (gallery.pids[gal] == qpid).tolist(),
        },
        "query_probabilities": xq.tolist(),
        "selected_attributes": [
            {"attribute": ATTRIBUTE_NAMES[a], "display": display_name(ATTRIBUTE_NAMES[a],
                                                                      bool(xq[a] > 0.5)),
             "index": int(a), "probability": float(xq[a])} for a in sel],
        "gallery_probabilities": ex.attributes_gallery[:, sel].tolist(),
        "matching_scores": ex.scores[:, sel].tolist(),
        "error_mode": mode,
        "errors": ex.errors.tolist(),
        **({"remainder": ex.remainder.tolist()} if mode == "projection" else {}),
    }


# ---------------------------------------------------------------------------------------------
# Inputs: precomputed embeddings or a checkpoint.


def _check_embeddings(name: str, x: Any, rows: int, folder: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[0] != rows or a.shape[1] < 1:
        raise ValueError(f"{name} must have shape [{rows}, N] (one row per image of {folder}, "
                         f"in file-name order), got {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got dtype {a.dtype}")
    return a.astype(np.float32, copy=False)


def _check_weights(weights: Any, n: int) -> np.ndarray:
    w = np.asarray(weights)
    if w.shape != (n, NUM_ATTRIBUTES):
        raise ValueError(f"attribute weights W must have shape [N={n}, A={NUM_ATTRIBUTES}] "
                         f"(embedding size x attributes), got {w.shape}")
    return w.astype(np.float32, copy=False)


def _load_metrics_json(explanation_metrics: Any, output_dir: str) -> tuple[dict | None,
                                                                            str | None]:
    if isinstance(explanation_metrics, dict):
        return explanation_metrics, None
    path = explanation_metrics or os.path.join(output_dir, METRICS_NAME)
    if explanation_metrics is None and not os.path.isfile(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the explanation metrics {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"explanation metrics {path} must hold a JSON object, "
                         f"got {type(data).__name__}")
    return data, os.path.abspath(path)


# ---------------------------------------------------------------------------------------------
# Atomic outputs.


# ---------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What :func:`run` wrote: absolute paths and the summary it wrote to ``summary.json``."""

    output_dir: str
    jsonl: str
    summary_json: str
    report_index: str
    summary: dict[str, Any]


def run(
    *,
    data_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    config: Any = None,
    query_embeddings: Any = None,
    gallery_embeddings: Any = None,
    weights: Any = None,
    calibration: Calibration | None = None,
    head_accuracy: Mapping[str, float | None] | None = None,
    queries: str | int | Sequence[str] = "all",
    k: int | None = None,
    threshold: Any = None,
    mode: str | None = None,
    order: str | None = None,
    error_ranks: Sequence[int] | None = None,
    report_queries: int | None = None,
    query_chunk: int | None = None,
    explanation_metrics: str | dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    attribute_maps: bool | None = None,
    map_queries: int | None = None,
    map_steps: int | None = None,
    map_layer: int | None = None,
    map_reference_images: int | None = None,
    map_method: str | None = None,
    report_workers: int | None = 1,
) -> RunResult:
    """Explains the rankings of many queries; writes JSONL, ``summary.json`` and the report.

    Inputs come either from ``checkpoint`` (with an attribute head; its model embeds the
    images of ``data_root``, cached in ``output_dir/embeddings``) or from precomputed
    ``query_embeddings [Q, N]`` and ``gallery_embeddings [G, N]`` (all images of the query and
    gallery split, file-name order as ``load_market1501`` lists them) with ``weights [N, A]``.

    The settings come from ``config.explain`` (``reid_jax.explain.settings``; the checkpoint's
    stored config when ``config`` is None); ``k`` .. ``query_chunk`` override single fields
    (``None``: not given). ``report_queries=-1`` draws every query.

    Args:
      data_root: Market-1501-layout folder (``query/``, ``bounding_box_test/``, ...).
      output_dir: where ``explanations.jsonl``, ``summary.json`` and ``report/`` go.
      checkpoint, config: checkpoint directory and its config (``None``: the stored one).
      query_embeddings, gallery_embeddings, weights: the precomputed alternative.
      calibration: the head's calibration for the ``disagreement`` mode with precomputed
        inputs (with ``checkpoint``: the one stored with its head, if any).
      head_accuracy: the head's balanced accuracy per attribute on labelled test images
        (``{name: value or None}``) with precomputed inputs (with ``checkpoint``: the one
        stored with its head, if any); the summary and the report mark the attributes it has
        not learned (``reid_jax.explain.learned``).
      queries: ``"all"``, a count (first ``N``) or query file names.
      k, threshold, mode, order, error_ranks, report_queries, query_chunk: overrides of
        ``config.explain`` (see ``reid_jax.explain.settings.default_config``).
      explanation_metrics: a dict or JSON path shown on the summary page (default:
        ``output_dir/explanation_metrics.json`` when it exists).
      cache_dir: embedding cache of the checkpoint path (default ``output_dir/embeddings``;
        ``CHECKPOINT/embedding_cache`` shares the cache of the other tools).
      overwrite: replace outputs in ``output_dir`` that this tool did not write (they are
        moved aside, not deleted); without it such a folder is refused before any work.
      progress: draw progress bars on stderr.
      attribute_maps, map_queries, map_steps, map_layer, map_reference_images, map_method:
        overrides of ``config.explain``: write
        ``maps/<query stem>.npz`` (``reid_jax.explain.map_outputs``) for the first
        ``map_queries`` queries of the run's order (needs ``checkpoint`` and mode ``paper`` or
        ``complete``); each such record names its file under ``maps``. ``output_dir/maps``
        is always published with the other outputs (empty without maps).
      report_workers: processes that draw the report's error figures
        (``reid_jax.explain.report.write_report``'s ``figure_workers``): 1 draws them in this
        process; more, or None (one per usable core), start worker processes with
        ``multiprocessing``'s "spawn", so the calling script must guard its entry point with
        ``if __name__ == "__main__":`` (``tools/explain.py`` does).

    Returns:
      :class:`RunResult`.

    Raises:
      ValueError: a bad setting, a checkpoint without attribute head
        (``NoAttributeHeadError``), a data root without queries, unknown query files, shapes
        that do not fit.
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    data_root = os.path.abspath(os.fspath(data_root))
    outputs = atomic_io.ResultSet(output_dir,
                                  (JSONL_NAME, SUMMARY_NAME, REPORT_NAME, MAPS_NAME),
                                  overwrite=overwrite)
    outputs.check()
    use_checkpoint = checkpoint is not None
    given = [x is not None for x in (query_embeddings, gallery_embeddings, weights)]
    if use_checkpoint == any(given) or (not use_checkpoint and not all(given)):
        raise ValueError("give either checkpoint (with an attribute head) or all of "
                         "query_embeddings, gallery_embeddings and weights")
    if use_checkpoint:
        config = embeddings.restore_config(checkpoint, config)
    opts = settings.explain_settings(
        config, k=k, threshold=threshold, mode=mode, order=order, error_ranks=error_ranks,
        report_queries=report_queries, query_chunk=query_chunk, attribute_maps=attribute_maps,
        map_queries=map_queries, map_steps=map_steps, map_layer=map_layer,
        map_reference_images=map_reference_images, map_method=map_method)
    if opts.attribute_maps:
        map_outputs.check_mode(opts.mode)
        if not use_checkpoint:
            raise ValueError("--attribute_maps needs --checkpoint: maps are computed by the "
                             "model, not from precomputed embeddings")
    if use_checkpoint:
        weights = embeddings.head_weights(checkpoint)
        calibration = checkpoints.restore_calibration(checkpoint)
        head_accuracy = checkpoints.restore_head_accuracy(checkpoint)
        if head_accuracy is None:
            logging.info("the attribute head of %s was saved without its test accuracy (an "
                         "earlier tools/train_attributes.py): attributes it has not learned "
                         "are not marked", checkpoint)
    head = learned.summary(head_accuracy)
    data = load_data(data_root, config)
    selected = select_queries(data.query, queries)
    metrics_json, metrics_path = _load_metrics_json(explanation_metrics, output_dir)
    if use_checkpoint:
        query_embeddings, gallery_embeddings = embeddings.query_gallery_embeddings(
            checkpoint, config, data,
            os.fspath(cache_dir) if cache_dir else os.path.join(output_dir, EMBEDDINGS_NAME))
    fq_all = _check_embeddings("query_embeddings", query_embeddings, len(data.query),
                               data.query.folder)
    fg = _check_embeddings("gallery_embeddings", gallery_embeddings, len(data.gallery),
                           data.gallery.folder)
    if fg.shape[1] != fq_all.shape[1]:
        raise ValueError(f"query embeddings {fq_all.shape} and gallery embeddings {fg.shape} "
                         "differ in size N")
    w = _check_weights(weights, fg.shape[1])
    k = opts.k
    if k > len(data.gallery):
        raise ValueError(f"k={k} exceeds the gallery size {len(data.gallery)}")

    fq = fq_all[selected]
    qp, qc = data.query.pids[selected], data.query.cameras[selected]
    gp, gc = data.gallery.pids, data.gallery.cameras
    fg_device = jnp.asarray(fg)

    bar = ProgressBar(len(selected), "rank", enabled=progress)
    metrics = ranking_metrics(fq, fg_device, qp, qc, gp, gc, chunk=opts.rank_chunk,
                              progress=bar)
    bar.close()
    summary_metrics = summarize(metrics)
    ordering = query_order(metrics, opts.order)
    num_report = (len(ordering) if opts.report_queries is None
                  else min(opts.report_queries, len(ordering)))
    num_maps = 0
    if opts.attribute_maps:
        num_maps = (len(ordering) if opts.map_queries is None
                    else min(opts.map_queries, len(ordering)))
        map_model = checkpoints.restore_model(checkpoint, config)[0] if num_maps else None
        map_augment = embeddings.eval_loader_config(config).augment
        map_base = (map_outputs.map_baseline(map_model, data.gallery.paths, map_augment,
                                              count=opts.map_reference_images,
                                              layer=opts.map_layer) if num_maps else None)
    summary = {
        "data_root": data_root,
        "checkpoint": None if checkpoint is None else os.path.abspath(os.fspath(checkpoint)),
        "num_queries": int(len(selected)),
        "num_query_images": len(data.query),
        "num_gallery_images": len(data.gallery),
        "num_gallery_identities": data.gallery.num_ids,
        "num_distractors": data.gallery.num_distractors,
        "junk_left_out": data.gallery.junk_left_out,
        "embedding_dim": int(fg.shape[1]),
        "k": int(k),
        "threshold": opts.threshold_json(),
        "mode": opts.mode,
        "mode_equation": MODE_EQUATIONS[opts.mode],
        "calibrated": calibration is not None,
        "head_accuracy": head,
        "order": opts.order,
        "error_ranks": list(opts.error_ranks),
        "num_report_queries": int(num_report),
        "num_map_queries": int(num_maps),
        "map_method": opts.map_method if num_maps else None,
        "map_steps": int(opts.map_steps) if num_maps else None,
        "map_layer": int(opts.map_layer) if num_maps else None,
        "map_reference_images": int(opts.map_reference_images) if num_maps else None,
        "attribute_names": list(ATTRIBUTE_NAMES),
        **summary_metrics,
        "explanation_metrics": metrics_json,
        "explanation_metrics_file": metrics_path,
        "display_rules": report.DISPLAY_RULES,
        "jsonl": JSONL_NAME,
    }

    with outputs.staging() as staging:
        report_records = []
        os.makedirs(os.path.join(staging, MAPS_NAME))
        map_bar = ProgressBar(num_maps, "maps", enabled=progress and num_maps > 0)
        bar = ProgressBar(len(selected), "explain", enabled=progress)
        explanations = explain_queries(
            fq[ordering], fg_device, w, qp[ordering], qc[ordering], gp, gc, k=k,
            threshold=opts.threshold, mode=opts.mode, chunk=opts.query_chunk,
            gallery_chunk=opts.gallery_chunk, progress=bar, calibration=calibration)
        with open(os.path.join(staging, JSONL_NAME), "w", encoding="utf-8") as f:
            for position, (pos, ex) in enumerate(zip(ordering, explanations, strict=True)):
                record = make_record(
                    position, int(selected[pos]), data.query, data.gallery, ex,
                    (metrics.ap[pos], metrics.inp[pos], metrics.first_rank[pos],
                     metrics.num_matches[pos]), opts.mode)
                if position < num_maps:
                    record["maps"] = _write_maps(staging, record, data, data_root, map_model, w,
                                                 map_augment, opts, map_base)
                    map_bar.update(1)
                f.write(json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n")
                if position < num_report:
                    report_records.append(record)
        bar.close()
        map_bar.close()
        atomic_io.write_json(os.path.join(staging, SUMMARY_NAME), summary, indent=1)
        report.write_report(os.path.join(staging, REPORT_NAME), summary, report_records,
                            data_root=data_root, progress=progress, maps_root=staging,
                            figure_workers=report_workers)
        outputs.publish(staging)
    logging.info("explained %d queries: %s, report %s", len(selected),
                 os.path.join(output_dir, JSONL_NAME),
                 os.path.join(output_dir, REPORT_NAME, "index.html"))
    return RunResult(
        output_dir=output_dir, jsonl=os.path.join(output_dir, JSONL_NAME),
        summary_json=os.path.join(output_dir, SUMMARY_NAME),
        report_index=os.path.join(output_dir, REPORT_NAME, "index.html"), summary=summary)


def _write_maps(staging: str, record: dict[str, Any], data: Market1501, data_root: str,
                model: Any, weights: np.ndarray, augment_config: Any,
                opts: settings.ExplainSettings, baseline: np.ndarray | None) -> str:
    """Computes and writes one query's maps (``reid_jax.explain.map_outputs``); returns the
    npz path relative to the output folder."""
    query_path = data.query.paths[record["query"]["index"]]
    gallery_paths = [data.gallery.paths[g] for g in record["gallery"]["index"]]
    arrays = map_outputs.query_maps(model, weights, query_path, gallery_paths, augment_config,
                                    mode=opts.mode, steps=opts.map_steps, layer=opts.map_layer,
                                    baseline=baseline, method=opts.map_method)
    return map_outputs.write_query_maps(
        staging, query_path, arrays, [os.path.relpath(p, data_root) for p in gallery_paths])


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of an ``explanations.jsonl``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


__all__ = [
    "CMC_RANKS", "EMBEDDINGS_NAME", "JSONL_NAME", "METRICS_NAME", "MODES", "MODE_EQUATIONS",
    "ORDERS", "REPORT_NAME", "SUMMARY_NAME", "QueryExplanation", "QueryMetrics", "RunResult",
    "explain_queries", "load_data", "make_record", "per_query_metrics", "query_order",
    "ranking_metrics", "read_jsonl", "run", "select_queries", "summarize",
]
