"""Explanation quality measured on a dataset: the logic of ``tools/evaluate_explanations.py``.

The paper (Specker) shows its explanations; this module measures them on the test split of a
Market-1501-layout data root (``docs/design.md``, "Explanations measured"), for both
explanations of the ranking — eq. 3.2 (``mode="paper"``) and its complete decomposition
(``"complete"``) — and, where a metric applies, for the matching scores of eq. 3.1 (``"scores"``:
separation ``1 - s_a``). The metric definitions live in :mod:`reid_jax.explain.metrics`, the
pairs and counterfactual images in :mod:`reid_jax.explain.counterfactuals`; this module runs
the measurement (:func:`measure`) and writes the results.

1. **Counterfactual hit rate** (synthetic data roots only, they hold ``synthetic_meta.json``).
   Pairs: every query with its true matches (same identity, another camera: the Market-1501
   protocol) and with its ``k`` best-ranked gallery images (protocol ranking; distractors and
   junk left out: they have no attribute labels).  A gallery image of these pairs is re-rendered
   with one attribute changed (``reid_jax.synthetic.dataset.render_counterfactual``): a binary
   attribute (``backpack`` .. ``gender``) is toggled; a colour or age is *set* (``upred = 1`` on
   a person whose shirt is not red), which also clears the old colour or age, so the changed
   labels are known without the generator's random choices.  Attributes are taken round-robin
   (one accepted change per attribute per round, gallery images in seeded random order), so
   every attribute gets about ``num_counterfactuals / 30`` images.
   *Visibility.*  Some changes barely show: a backpack seen from the front (its straps), a
   handbag on the far side (behind the body), long hair over a backpack.  A change is kept only
   when at least ``min_changed_pixels`` pixels (default 64 of 8192) change by more than
   ``pixel_tolerance`` (default 25 of 255) in some channel, counted before JPEG inside the
   attribute's region (``synthetic.attribute_region``: the attribute's part masks of both
   renders, ``return_masks=True``, dilated by the blur radius).  Rejected changes are counted
   per attribute (``rejected_invisible``).
   The counterfactual is embedded by the model exactly as the dataset files are (JPEG of the
   dataset's quality, the eval transform), and every pair ``(q, g)`` of that gallery image gives
   one row: the explanation of ``(q, g)`` and of ``(q, g')``.  *Direction.*  Of the two images,
   the one whose label of the changed attribute differs from the query's ground-truth label is
   the *far* one (for a true match that is always the counterfactual; for a false match whose
   original already differs, the change brings it towards the query and the original is far).
   The rise is ``sep(q, far) - sep(q, near)``; a hit at ``m`` is a changed label among the top
   ``m`` attributes by rise (:func:`reid_jax.explain.metrics.counterfactual_hit_rate`,
   with its tie rule and chance level).
2. **AUROC of matching scores** for ground-truth agreement of query and gallery labels, over all
   labelled query x gallery pairs (streamed) and over the top-``k`` ranks; for the query's
   confident attributes (threshold ``t``, the entries the paper displays) and for all attributes
   (``t = 0``).
3. **AMD Ex-Precision / Ex-mAP** (``_d``, ``_s``) over all labelled pairs and over the top ``k``
   ranks, for the three separations, with chance levels
   (:func:`~reid_jax.explain.metrics.streamed_amd_over_gallery`,
   :func:`~reid_jax.explain.metrics.amd_over_top_k`; the top ``k`` there is the ranking of
   the report, ``reid_jax.explain.run``: the Market-1501 protocol removes gallery images with
   the query's pid and camera and junk, distractors stay but have no labels and are ignored;
   same-identity pairs have no differing attribute and only count in ``num_pairs``).
   All-pairs passes log their progress (rate, ETA) every 30 s through absl logging.

Outputs (:func:`write_outputs`, each file replaced atomically): ``explanation_metrics.json``
(nested dicts of numbers; per-attribute values as arrays of 30 in ``ATTRIBUTE_NAMES`` order, the
shape ``reid_jax.explain.report`` shows) and ``explanation_metrics.md`` (the README table).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from reid_jax import atomic_io, checkpoints, embeddings, explain, synthetic
from reid_jax.data import sources
from reid_jax.data.attributes import (
    ATTRIBUTE_NAMES,
    NUM_ATTRIBUTES,
    labels_for_pids,
    load_market_attributes,
)
from reid_jax.data.market1501 import SPLIT_FOLDERS
from reid_jax.explain import counterfactuals as cfs
from reid_jax.explain import metrics as em
from reid_jax.explain import settings
from reid_jax.explain.table import FORMAT, MODES, markdown_table
from reid_jax.progress import ProgressLog
from reid_jax.synthetic.render import IMAGE_HEIGHT, IMAGE_WIDTH

JSON_NAME = settings.METRICS_NAME  # "explanation_metrics.json", read by tools/explain.py
MARKDOWN_NAME = settings.METRICS_MARKDOWN_NAME
DEFAULT_K = cfs.DEFAULT_K


# ---------------------------------------------------------------------------------------------
# (2) + (3) AUROC of matching scores and AMD metrics over all pairs and the top k.

def _per_attribute(result: dict[str, Any], key: str) -> list[Any]:
    return [result["per_attribute"][n][key] for n in ATTRIBUTE_NAMES]


_AMD_KEYS = ("ex_precision_d", "ex_map_d", "ex_precision_s", "ex_map_s")
_AUROC_KEYS = ("auroc", "num_positive", "num_negative")


def label_metrics(
    f_query: Any,
    f_gallery: Any,
    weights: Any,
    labels_query: Any,
    labels_gallery: Any,
    valid_query: Any | None = None,
    valid_gallery: Any | None = None,
    *,
    query_pids: Any,
    query_cams: Any,
    gallery_pids: Any,
    gallery_cams: Any,
    k: int = DEFAULT_K,
    threshold: Any = explain.DEFAULT_THRESHOLD,
    log_interval: float = 30.0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """AUROC of matching scores and AMD metrics over all pairs and over the top ``k`` ranks.

    One all-pairs pass per mode (``streamed_amd_over_gallery``; the ``scores`` pass also
    accumulates the all-attributes AUROC, ``t = 0``) with a :class:`ProgressLog` every
    ``log_interval`` seconds, and one top-``k`` ranking per mode under the Market-1501
    protocol (``amd_over_top_k`` with the pids and cameras: the pairs the report shows).

    Returns:
      ``(auroc, amd)``: ``auroc = {"all_pairs": {"confident": ..., "all_attributes": ...},
      "top{k}": {...}, "per_attribute": {...: [A]}}`` and ``amd = {"all_pairs": {"num_pairs",
      "num_pairs_d", "num_pairs_s", <mode>: {ex_precision_d, ex_map_d, ex_precision_s,
      ex_map_s}, "chance": {...}}, "top{k}": {...}, "per_attribute": {...: [A]}}``.
    """
    args = (f_query, f_gallery, weights, labels_query, labels_gallery)
    masks = dict(valid_query=valid_query, valid_gallery=valid_gallery)
    ids = dict(query_pids=query_pids, query_cams=query_cams, gallery_pids=gallery_pids,
               gallery_cams=gallery_cams)
    scopes = {"all_pairs": {}, f"top{k}": {}}
    for mode in MODES:
        # Matching-score AUROC for all attributes: t = 0 selects every attribute (x != 0.5).
        extra = (0.0,) if mode == "scores" else ()
        scopes["all_pairs"][mode] = em.streamed_amd_over_gallery(
            *args, mode, threshold=threshold, extra_thresholds=extra,
            progress=ProgressLog(f"AMD over all pairs ({mode})", interval=log_interval),
            **masks)
        t0 = time.perf_counter()
        scopes[f"top{k}"][mode] = em.amd_over_top_k(
            *args, mode, k=k, threshold=threshold, extra_thresholds=extra, **ids, **masks)
        logging.info("AMD over the top %d ranks (%s): %.1f s", k, mode,
                     time.perf_counter() - t0)
    every = {scope: results["scores"]["extra_auroc"][0] for scope, results in scopes.items()}

    auroc: dict[str, Any] = {}
    amd: dict[str, Any] = {}
    auroc_attr: dict[str, list[Any]] = {}
    amd_attr: dict[str, list[Any]] = {}
    for scope, results in scopes.items():
        confident = results["scores"]["auroc"]
        auroc[scope] = {
            "confident": {key: confident[key] for key in _AUROC_KEYS},
            "all_attributes": {key: every[scope][key] for key in _AUROC_KEYS},
        }
        if "max_binning_error" in confident:
            auroc[scope]["confident"]["max_binning_error"] = confident["max_binning_error"]
            auroc[scope]["all_attributes"]["max_binning_error"] = every[scope][
                "max_binning_error"]
        auroc_attr[f"{scope}_confident"] = _per_attribute(confident, "auroc")
        auroc_attr[f"{scope}_all_attributes"] = _per_attribute(every[scope], "auroc")
        paper = results["paper"]
        entry: dict[str, Any] = {key: paper[key] for key in ("num_pairs", "num_pairs_d",
                                                               "num_pairs_s")}
        for mode in MODES:
            entry[mode] = {key: results[mode][key] for key in _AMD_KEYS}
        entry["chance"] = {key: paper["chance"][key] for key in _AMD_KEYS}
        amd[scope] = entry
        amd_attr[f"{scope}_differ_count"] = _per_attribute(paper, "count_d")
        for mode in MODES:
            for key in ("precision_d", "ap_d"):
                amd_attr[f"{scope}_{mode}_{key}"] = _per_attribute(results[mode], key)
    auroc["per_attribute"] = auroc_attr
    amd["per_attribute"] = amd_attr
    return auroc, amd


# ---------------------------------------------------------------------------------------------
# Output: the JSON and the README table.


def write_outputs(metrics: dict[str, Any], output_dir: str | os.PathLike) -> tuple[str, str]:
    """Writes ``explanation_metrics.json`` and ``explanation_metrics.md`` into ``output_dir``
    (each through a temporary file and ``os.replace``); returns their paths."""
    output_dir = os.path.abspath(os.fspath(output_dir))
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, JSON_NAME)
    md_path = os.path.join(output_dir, MARKDOWN_NAME)
    text = json.dumps(metrics, indent=1, allow_nan=False) + "\n"  # fails before any write
    atomic_io.write_text(md_path, markdown_table(metrics))
    atomic_io.write_text(json_path, text)
    return json_path, md_path


# ---------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass(frozen=True)
class MeasurementResult:
    """What :func:`measure` computed and wrote."""

    metrics: dict[str, Any]
    json_path: str
    markdown_path: str
    table: str


def _check_data_root(data_root: str | os.PathLike | None) -> str:
    if not data_root:
        raise ValueError("no data root: pass --data_root=/path/to/Market-1501 (or a synthetic "
                         "folder from tools/make_synthetic.py)")
    root = os.path.abspath(os.fspath(data_root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data root {root} does not exist (--data_root)")
    return root


def _attribute_labels(path: str, pids_query: np.ndarray, pids_gallery: np.ndarray):
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no attribute labels: {path} does not exist; pass --attributes_file=PATH to the "
            "market_attribute.mat of this data root")
    attrs = load_market_attributes(path)
    lq, vq = labels_for_pids(attrs, pids_query, "query")
    lg, vg = labels_for_pids(attrs, pids_gallery, "gallery")
    if not vq.any() or not vg.any():
        raise ValueError(f"{path} has no labels for the test identities of this data root "
                         f"({int(vq.sum())} labelled queries, {int(vg.sum())} labelled gallery "
                         "images)")
    return lq, vq, lg, vg


def measure(
    *,
    checkpoint: str | os.PathLike,
    data_root: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    config: ml_collections.ConfigDict | None = None,
    attributes_file: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    k: int | None = None,
    threshold: Any = None,
    num_counterfactuals: int | None = None,
    min_changed_pixels: int | None = None,
    pixel_tolerance: int | None = None,
    seed: int | None = None,
    embed_fn: Callable[[list[bytes]], np.ndarray] | None = None,
) -> MeasurementResult:
    """Measures the explanations of a checkpoint on the test split of ``data_root``.

    The settings come from ``config.explain`` (``reid_jax.explain.settings``; the checkpoint's
    stored config when ``config`` is None); ``k`` .. ``seed`` override single fields (``None``:
    not given). The data root is scanned once, with the reader options of ``config.data``, and
    that one scan feeds the embeddings, the labels and the pairs.

    Args:
      checkpoint: orbax checkpoint directory with an attribute head.
      data_root: Market-1501-layout folder; counterfactuals need a synthetic one.
      output_dir: where ``explanation_metrics.json`` / ``.md`` go.
      config: the model's config (default: the one stored in the checkpoint).
      attributes_file: ``market_attribute.mat`` (default ``DATA_ROOT/market_attribute.mat``).
      cache_dir: embedding cache (default ``OUTPUT_DIR/embeddings``, shared with
        ``tools/explain.py`` on the same output folder).
      k: top ranks of the pairs.
      threshold: confident-attribute threshold in ``[0, 0.5)`` (scalar or ``[A]``).
      num_counterfactuals: counterfactual images to make (0: skip that part).
      min_changed_pixels, pixel_tolerance, seed: see
        ``reid_jax.explain.counterfactuals.make_counterfactuals``.
      embed_fn: embeds a list of JPEG bytes ``-> [n, N]`` (default: the checkpoint's model with
        the eval transform of ``config``).

    Returns:
      :class:`MeasurementResult`.
    """
    start = time.perf_counter()
    root = _check_data_root(data_root)
    config = embeddings.restore_config(checkpoint, config)
    opts = settings.explain_settings(
        config, k=k, threshold=threshold, num_counterfactuals=num_counterfactuals,
        min_changed_pixels=min_changed_pixels, pixel_tolerance=pixel_tolerance, seed=seed)
    k = opts.k
    output_dir = os.path.abspath(os.fspath(output_dir))
    data = sources.load_dataset(root, config, need_queries=True)
    if k > len(data.gallery):
        raise ValueError(f"k={k} exceeds the {len(data.gallery)} gallery images of {root}")
    head = checkpoints.restore_attribute_head(checkpoint)
    weights = np.asarray(head.kernel[...], np.float32)
    attributes_file = os.path.abspath(os.fspath(
        attributes_file or os.path.join(root, synthetic.ATTRIBUTE_FILE)))
    lq, vq, lg, vg = _attribute_labels(attributes_file, data.query.pids, data.gallery.pids)

    model, _ = checkpoints.restore_model(checkpoint, config)
    if head.embedding_dim != model.feature_dim:
        raise ValueError(f"the attribute head of {checkpoint} expects embeddings of size "
                         f"{head.embedding_dim}, the model produces {model.feature_dim}")
    cache_dir = os.fspath(cache_dir) if cache_dir else os.path.join(
        output_dir, settings.EMBEDDINGS_NAME)
    emb = embeddings.split_embeddings(model, config, data, ("query", "gallery"), cache_dir)
    fq, fg = emb["query"].features, emb["gallery"].features
    logging.info("embeddings of %d queries and %d gallery images ready (%.1f s)", len(fq),
                 len(fg), time.perf_counter() - start)

    t0 = time.perf_counter()
    auroc, amd = label_metrics(fq, fg, weights, lq, lg, vq, vg, query_pids=data.query.pids,
                               query_cams=data.query.cameras, gallery_pids=data.gallery.pids,
                               gallery_cams=data.gallery.cameras, k=k,
                               threshold=opts.threshold)
    logging.info("AUROC and AMD metrics over all pairs and the top %d: %.1f s", k,
                 time.perf_counter() - t0)

    synthetic_root = os.path.isfile(os.path.join(root, synthetic.META_FILE))
    if not synthetic_root:
        reason = (f"{root} is not a synthetic data root (no {synthetic.META_FILE}); "
                  "counterfactual images can only be rendered for synthetic persons")
        logging.info("counterfactual hit rate skipped: %s", reason)
        counterfactual: dict[str, Any] = {"skipped": reason}
    elif opts.num_counterfactuals == 0:
        counterfactual = {"skipped": "num_counterfactuals=0"}
    else:
        if embed_fn is None:
            loader_config = embeddings.eval_loader_config(config)
            batch = embeddings.eval_batch_size(config)

            def embed_fn(items: list[bytes]) -> np.ndarray:
                return embeddings.embed_images(
                    model, items, height=loader_config.augment.height,
                    width=loader_config.augment.width, batch_size=batch,
                    loader_config=loader_config)

        counterfactual = _counterfactual_part(
            root, data, fq, fg, weights, lq, vq, k=k, embed_fn=embed_fn,
            num_counterfactuals=opts.num_counterfactuals,
            min_changed_pixels=opts.min_changed_pixels, pixel_tolerance=opts.pixel_tolerance,
            seed=opts.seed)

    metrics = {
        "format": FORMAT,
        "attribute_names": list(ATTRIBUTE_NAMES),
        "settings": {
            "checkpoint": os.path.abspath(os.fspath(checkpoint)),
            "data_root": root,
            "attributes_file": attributes_file,
            "k": int(k),
            "threshold": opts.threshold_json(),
            "num_counterfactuals": opts.num_counterfactuals,
            "min_changed_pixels": opts.min_changed_pixels,
            "pixel_tolerance": opts.pixel_tolerance,
            "seed": opts.seed,
        },
        "data": {
            "synthetic": bool(synthetic_root),
            "num_queries": len(data.query),
            "num_gallery": len(data.gallery),
            "num_labelled_queries": int(vq.sum()),
            "num_labelled_gallery": int(vg.sum()),
        },
        "counterfactual": counterfactual,
        "auroc": auroc,
        "amd": amd,
    }
    json_path, md_path = write_outputs(metrics, output_dir)
    logging.info("explanation metrics written to %s and %s (%.1f s in all)", json_path, md_path,
                 time.perf_counter() - start)
    return MeasurementResult(metrics, json_path, md_path, markdown_table(metrics))


def _counterfactual_part(root: str, data: Any, fq: np.ndarray, fg: np.ndarray,
                         weights: np.ndarray, lq: np.ndarray, vq: np.ndarray, *, k: int,
                         embed_fn: Callable[[list[bytes]], np.ndarray],
                         num_counterfactuals: int, min_changed_pixels: int,
                         pixel_tolerance: int, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    gallery_files = [os.path.join(SPLIT_FOLDERS["gallery"], os.path.basename(p))
                     for p in data.gallery.paths]
    pairs = cfs.ranked_pairs(fq, fg, data.query.pids, data.query.cameras, data.gallery.pids,
                         data.gallery.cameras, k)
    pairs = cfs.CandidatePairs(*(x[vq[pairs.query]] for x in pairs))
    made = cfs.make_counterfactuals(root, gallery_files, np.unique(pairs.gallery),
                                num_counterfactuals, seed=seed,
                                min_changed_pixels=min_changed_pixels,
                                pixel_tolerance=pixel_tolerance)
    if not made.accepted:
        return {"skipped": f"no visible counterfactual among {int(made.tried.sum())} tried "
                           f"(min_changed_pixels={min_changed_pixels})"}
    t1 = time.perf_counter()
    f_cf = np.asarray(embed_fn([cf.jpeg for cf in made.accepted]), np.float32)
    t2 = time.perf_counter()
    out = cfs.counterfactual_metrics(fq, fg, f_cf, weights, made.accepted, pairs, lq, vq)
    logging.info("counterfactuals: %d rendered (%d rejected as barely visible) in %.1f s, "
                 "embedded in %.1f s, %d pairs scored in %.1f s", int(made.tried.sum()),
                 int(made.rejected.sum()), t1 - t0, t2 - t1, out["num_pairs"],
                 time.perf_counter() - t2)
    per_attribute = {
        "counterfactuals": np.bincount([cf.attribute for cf in made.accepted],
                                       minlength=NUM_ATTRIBUTES).tolist(),
        "rejected_invisible": made.rejected.tolist(),
        **out.pop("per_attribute"),
    }
    changed = np.asarray([cf.changed_pixels for cf in made.accepted])
    return {
        "num_counterfactuals": len(made.accepted),
        "num_rejected_invisible": int(made.rejected.sum()),
        "num_candidate_gallery_images": int(np.unique(pairs.gallery).size),
        "median_changed_pixels": float(np.median(changed)),
        "image_pixels": IMAGE_HEIGHT * IMAGE_WIDTH,
        **out,
        "per_attribute": per_attribute,
    }


__all__ = [
    "DEFAULT_K", "FORMAT", "JSON_NAME", "MARKDOWN_NAME", "MeasurementResult", "label_metrics",
    "measure", "write_outputs",
]
