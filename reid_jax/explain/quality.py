"""Explanation quality measured on a dataset: the logic of ``tools/evaluate_explanations.py``.

The paper (Specker) shows its explanations; this module measures them on the test split of a
Market-1501-layout data root (``docs/design.md``, "Explanations measured"), for every
explanation of ``metrics.MODES`` — eq. 3.2 (``mode="paper"``), its complete decomposition
(``"complete"``), the projection onto the attribute directions (``"projection"``), the matching
scores of eq. 3.1 (``"scores"``: separation ``1 - s_a``) and the probability that the labels
differ (``"disagreement"``) — against two baselines: the fixed ``prior`` order of the training
split (``reid_jax.explain.baselines``, which needs the training images' embeddings too) and
chance; every value with a 95 % interval by a bootstrap over queries or counterfactual images
(``reid_jax.explain.bootstrap``; ``docs/design.md``, "Baselines" and "Intervals"). The metric
definitions live in :mod:`reid_jax.explain.metrics`, the pairs and counterfactual images in
:mod:`reid_jax.explain.counterfactuals`; this module runs the measurement (:func:`measure`) and
writes the results.

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
2. **AUROC of matching scores** (eq. 3.1's and the agreement probability) for ground-truth
   agreement of query and gallery labels, over all labelled query x gallery pairs (streamed)
   and over the top-``k`` ranks; for the query's confident attributes (threshold ``t``, the
   entries the paper displays) and for all attributes (``t = 0``); pooled and as the mean of the
   per-attribute AUROCs, beside the constant per-attribute baseline.
3. **AMD Ex-Precision / Ex-mAP** (``_d``, ``_s`` and ``_s`` by AMD's rule) over all labelled
   pairs and over the top ``k`` ranks, for every separation and the prior, with chance levels
   (:func:`~reid_jax.explain.gallery_metrics.streamed_amd_over_gallery`,
   :func:`~reid_jax.explain.gallery_metrics.amd_over_top_k`; the top ``k`` there is the ranking of
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
from scipy import special

from reid_jax import atomic_io, checkpoints, embeddings, evaluation, explain, synthetic
from reid_jax.data import sources
from reid_jax.data.attributes import (
    ATTRIBUTE_NAMES,
    NUM_ATTRIBUTES,
    labels_for_pids,
    load_market_attributes,
)
from reid_jax.data.market1501 import SPLIT_FOLDERS
from reid_jax.explain import baselines, bootstrap, map_outputs, map_quality, settings
from reid_jax.explain import counterfactuals as cfs
from reid_jax.explain import gallery_metrics as gm
from reid_jax.explain import metrics as em
from reid_jax.explain.table import FORMAT, MODES, markdown_table
from reid_jax.models.attribute_head import Calibration
from reid_jax.progress import ProgressLog
from reid_jax.synthetic.masks import read_regions
from reid_jax.synthetic.person import IMAGE_HEIGHT, IMAGE_WIDTH

JSON_NAME = settings.METRICS_NAME  # "explanation_metrics.json", read by tools/explain.py
MARKDOWN_NAME = settings.METRICS_MARKDOWN_NAME
DEFAULT_K = cfs.DEFAULT_K


# ---------------------------------------------------------------------------------------------
# (2) + (3) AUROC of matching scores and AMD metrics over all pairs and the top k.

def _per_attribute(result: dict[str, Any], key: str) -> list[Any]:
    return [result["per_attribute"][n][key] for n in ATTRIBUTE_NAMES]


_AMD_KEYS = tuple(em.AMD_RATIOS)


def _auroc_entry(result: dict[str, Any], groups: dict[str, Any], counts: np.ndarray,
                 level: float) -> dict[str, Any]:
    """Pooled and macro AUROC of one matching score with their intervals."""
    entry = {
        "pooled": result["auroc"],
        "pooled_interval": bootstrap.histogram_auroc_interval(
            *groups["pooled"], counts, result["auroc"], level),
        "macro": result["macro"],
        "macro_interval": bootstrap.macro_auroc_interval(
            *groups["attribute"], counts, result["macro"], level),
    }
    if result.get("max_binning_error") is not None:
        entry["max_binning_error"] = result["max_binning_error"]
    return entry


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
    prior: baselines.TrainingPrior,
    k: int = DEFAULT_K,
    threshold: Any = explain.DEFAULT_THRESHOLD,
    bootstrap_samples: int = bootstrap.DEFAULT_SAMPLES,
    seed: int = 0,
    level: float = bootstrap.LEVEL,
    log_interval: float = 30.0,
    calibration: Calibration | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """AUROC of matching scores and AMD metrics over all pairs and over the top ``k`` ranks,
    for every explanation of ``metrics.MODES`` and the baselines, with 95 % intervals by a
    bootstrap over queries.

    One all-pairs pass per mode (``streamed_amd_over_gallery``; the passes of the
    ``metrics.SCORE_MODES`` also accumulate their matching score's AUROC for all attributes,
    ``t = 0``) with a :class:`ProgressLog` every ``log_interval`` seconds, and one top-``k``
    ranking per mode under the Market-1501 protocol (``amd_over_top_k`` with the pids and
    cameras: the pairs the report shows).  The ``prior`` explanation is ``prior.all_pairs``
    over all pairs and ``prior.ranked`` over the top ``k``; the constant AUROC baseline scores
    every entry of attribute ``a`` with ``prior.agreement[a]``.  Every mode of a scope is
    resampled with the same counts (``bootstrap_samples`` replicates of the queries, seeded by
    ``seed``), so ``minus_prior`` — an explanation minus the prior — is a paired interval.
    ``calibration`` (the head's, or None) is what the ``disagreement`` explanation reads.

    Returns:
      ``(auroc, amd)``: ``auroc = {scope: {"confident" | "all_attributes": {"num_positive",
      "num_negative", <score mode>: {"pooled", "pooled_interval", "macro", "macro_interval"},
      "prior": {"pooled", "pooled_interval", "macro"}}}, "per_attribute": {...: [A]}}`` and
      ``amd = {scope: {"num_pairs", "num_pairs_d", "num_pairs_s", "num_pairs_s_amd", <mode>:
      {<metric>, "intervals": {<metric>: [lo, hi]}, "minus_prior": {<metric>: [lo, hi]}},
      "chance": {...}}, "per_attribute": {...: [A]}}`` with scopes ``all_pairs`` and
      ``top{k}`` and the metrics of ``metrics.AMD_RATIOS``; with neighbour rates, ``top{k}``
      also holds ``prior_labels``: the all-pairs (label-only) order on the top ``k``.
    """
    args = (f_query, f_gallery, weights, labels_query, labels_gallery)
    masks = dict(valid_query=valid_query, valid_gallery=valid_gallery)
    ids = dict(query_pids=query_pids, query_cams=query_cams, gallery_pids=gallery_pids,
               gallery_cams=gallery_cams)
    top = f"top{k}"
    scopes: dict[str, dict[str, Any]] = {"all_pairs": {}, top: {}}
    fixed = {"all_pairs": prior.all_pairs, top: prior.ranked}
    for mode in MODES:
        # Matching-score AUROC for all attributes: t = 0 selects every attribute (x != 0.5).
        extra = (0.0,) if mode in em.SCORE_MODES else ()
        scopes["all_pairs"][mode] = gm.streamed_amd_over_gallery(
            *args, mode, threshold=threshold, extra_thresholds=extra,
            prior=fixed["all_pairs"] if mode == "prior" else None,
            progress=ProgressLog(f"AMD over all pairs ({mode})", interval=log_interval),
            calibration=calibration, **masks)
        t0 = time.perf_counter()
        scopes[top][mode] = gm.amd_over_top_k(
            *args, mode, k=k, threshold=threshold, extra_thresholds=extra,
            prior=fixed[top] if mode == "prior" else None, calibration=calibration, **ids,
            **masks)
        logging.info("AMD over the top %d ranks (%s): %.1f s", k, mode,
                     time.perf_counter() - t0)
    # The label-only order on the top k too, to show what knowing "near neighbour" adds.
    labels_only = (gm.amd_over_top_k(*args, "prior", k=k, threshold=threshold,
                                     prior=prior.all_pairs, **ids, **masks)
                   if prior.neighbours is not None else None)

    num_queries = int(np.shape(f_query)[0])
    counts = bootstrap.resample_counts(num_queries, bootstrap_samples, seed)
    auroc: dict[str, Any] = {}
    amd: dict[str, Any] = {}
    auroc_attr: dict[str, list[Any]] = {}
    amd_attr: dict[str, list[Any]] = {}
    for scope, results in scopes.items():
        auroc[scope] = {}
        for i, which in enumerate(("confident", "all_attributes")):
            first = results[em.SCORE_MODES[0]]
            result = first["auroc"] if i == 0 else first["extra_auroc"][0]
            entry: dict[str, Any] = {"num_positive": result["num_positive"],
                                     "num_negative": result["num_negative"]}
            for mode in em.SCORE_MODES:
                r = results[mode]["auroc"] if i == 0 else results[mode]["extra_auroc"][0]
                groups = results[mode]["groups"]["auroc"][i]
                entry[mode] = _auroc_entry(r, groups, counts, level)
                auroc_attr[f"{scope}_{which}_{mode}"] = _per_attribute(r, "auroc")
            # The constant baseline: entries of attribute a all score prior.agreement[a].
            pos, neg = (h.sum(axis=-1) for h in first["groups"]["auroc"][i]["attribute"])
            point = em.constant_auroc(pos.sum(0), neg.sum(0), prior.agreement)
            entry["prior"] = {
                "pooled": None if np.isnan(point) else float(point),
                "pooled_interval": bootstrap.constant_auroc_interval(
                    pos, neg, prior.agreement, counts, level),
                "macro": 0.5,  # a constant ties every entry of an attribute
            }
            auroc[scope][which] = entry
        base = results["prior"]["groups"]["amd"]
        first = results[MODES[0]]
        amd_entry: dict[str, Any] = {key: first[key] for key in (
            "num_pairs", "num_pairs_d", "num_pairs_s", "num_pairs_s_amd")}
        for mode in MODES:
            sums = results[mode]["groups"]["amd"]
            amd_entry[mode] = {key: results[mode][key] for key in _AMD_KEYS}
            amd_entry[mode]["intervals"] = bootstrap.amd_intervals(sums, counts, level=level)
            if mode != "prior":
                amd_entry[mode]["minus_prior"] = bootstrap.amd_intervals(sums, counts, base,
                                                                         level=level)
        amd_entry["chance"] = {key: first["chance"][key] for key in _AMD_KEYS}
        if scope == top and labels_only is not None:
            amd_entry["prior_labels"] = {key: labels_only[key] for key in _AMD_KEYS}
            amd_entry["prior_labels"]["intervals"] = bootstrap.amd_intervals(
                labels_only["groups"]["amd"], counts, level=level)
        amd[scope] = amd_entry
        amd_attr[f"{scope}_differ_count"] = _per_attribute(first, "count_d")
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
    return attrs, lq, vq, lg, vg


def _training_prior(attrs: Any, path: str, train: Any, features: np.ndarray | None,
                    k: int) -> baselines.TrainingPrior:
    """The baselines from the training split: its identities' labels, and its images'
    embeddings for the neighbour rates (left out when the data root has no training images)."""
    identity_labels = attrs.labels("train")
    if identity_labels.shape[0] < 2:
        raise ValueError(f"{path} labels {identity_labels.shape[0]} training identities; the "
                         "prior baseline needs at least 2")
    if features is None or len(train) == 0:
        logging.info("no training images: the top-k prior is the all-pairs prior")
        return baselines.training_prior(identity_labels, k=k)
    labels, has = labels_for_pids(attrs, train.pids, "train")
    if np.unique(train.pids[has]).size < 2:
        logging.info("fewer than 2 labelled training identities among the training images: "
                     "the top-k prior is the all-pairs prior")
        return baselines.training_prior(identity_labels, k=k)
    return baselines.training_prior(identity_labels, features=features[has],
                                    pids=train.pids[has], image_labels=labels[has], k=k)


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
    bootstrap_samples: int | None = None,
    embed_fn: Callable[[list[bytes]], np.ndarray] | None = None,
    measure_maps: bool | None = None,
    map_images: int | None = None,
    map_steps: int | None = None,
    map_layer: int | None = None,
    map_reference_images: int | None = None,
    map_method: str | None = None,
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
        ``reid_jax.explain.counterfactuals.make_counterfactuals`` (``seed`` also seeds the
        bootstrap).
      bootstrap_samples: replicates of the bootstrap behind the intervals.
      embed_fn: embeds a list of JPEG bytes ``-> [n, N]`` (default: the checkpoint's model with
        the eval transform of ``config``).
      measure_maps, map_images, map_steps, map_layer, map_reference_images, map_method: the
        ``maps`` section (``reid_jax.explain.map_quality``): on or off, the cap on its images,
        quadrature nodes, the layer, the reference images of the baseline and the method.

    Returns:
      :class:`MeasurementResult`.
    """
    start = time.perf_counter()
    root = _check_data_root(data_root)
    config = embeddings.restore_config(checkpoint, config)
    opts = settings.explain_settings(
        config, k=k, threshold=threshold, num_counterfactuals=num_counterfactuals,
        min_changed_pixels=min_changed_pixels, pixel_tolerance=pixel_tolerance, seed=seed,
        bootstrap_samples=bootstrap_samples, measure_maps=measure_maps, map_images=map_images,
        map_steps=map_steps, map_layer=map_layer, map_reference_images=map_reference_images,
        map_method=map_method)
    k = opts.k
    # What would fail at the end, after minutes of work, is checked first: the output folder
    # and the part masks the maps section reads.
    output_dir = atomic_io.check_output_folder(output_dir)
    data = sources.load_dataset(root, config, need_queries=True)
    if k > len(data.gallery):
        raise ValueError(f"k={k} exceeds the {len(data.gallery)} gallery images of {root}")
    synthetic_root = os.path.isfile(os.path.join(root, synthetic.META_FILE))
    with_masks = synthetic_root and read_regions(data.query.paths[0]) is not None
    if opts.measure_maps and with_masks:
        for path in data.query.paths:  # named errors: a missing, unreadable or odd-sized mask
            synthetic.read_part_mask(path)
    head = checkpoints.restore_attribute_head(checkpoint)
    weights = np.asarray(head.kernel[...], np.float32)
    calibration = checkpoints.restore_calibration(checkpoint)
    if calibration is None:
        logging.warning("the attribute head of %s has no calibration: the disagreement "
                        "explanation reads its raw probabilities (tools/train_attributes.py "
                        "fits one)", checkpoint)
    attributes_file = os.path.abspath(os.fspath(
        attributes_file or os.path.join(root, synthetic.ATTRIBUTE_FILE)))
    attrs, lq, vq, lg, vg = _attribute_labels(attributes_file, data.query.pids,
                                              data.gallery.pids)

    model, _ = checkpoints.restore_model(checkpoint, config)
    if head.embedding_dim != model.feature_dim:
        raise ValueError(f"the attribute head of {checkpoint} expects embeddings of size "
                         f"{head.embedding_dim}, the model produces {model.feature_dim}")
    cache_dir = os.fspath(cache_dir) if cache_dir else os.path.join(
        output_dir, settings.EMBEDDINGS_NAME)
    splits = ("query", "gallery", "train") if len(data.train) else ("query", "gallery")
    emb = embeddings.split_embeddings(model, config, data, splits, cache_dir)
    fq, fg = emb["query"].features, emb["gallery"].features
    logging.info("embeddings of %d queries, %d gallery and %d training images ready (%.1f s)",
                 len(fq), len(fg), len(data.train), time.perf_counter() - start)
    prior = _training_prior(attrs, attributes_file, data.train,
                            emb["train"].features if "train" in emb else None, k)

    t0 = time.perf_counter()
    auroc, amd = label_metrics(fq, fg, weights, lq, lg, vq, vg, query_pids=data.query.pids,
                               query_cams=data.query.cameras, gallery_pids=data.gallery.pids,
                               gallery_cams=data.gallery.cameras, prior=prior, k=k,
                               threshold=opts.threshold,
                               bootstrap_samples=opts.bootstrap_samples, seed=opts.seed,
                               calibration=calibration)
    logging.info("AUROC and AMD metrics over all pairs and the top %d: %.1f s", k,
                 time.perf_counter() - t0)

    # The evaluation transform and CPU workers of config.data, for the re-renders and the maps.
    loader_config = embeddings.eval_loader_config(config)
    if not synthetic_root:
        reason = (f"{root} is not a synthetic data root (no {synthetic.META_FILE}); "
                  "counterfactual images can only be rendered for synthetic persons")
        logging.info("counterfactual hit rate skipped: %s", reason)
        counterfactual: dict[str, Any] = {"skipped": reason}
        accepted: list[cfs.Counterfactual] = []
    elif opts.num_counterfactuals == 0:
        accepted = []
        counterfactual = {"skipped": "num_counterfactuals=0"}
    else:
        if embed_fn is None:
            batch = embeddings.eval_batch_size(config)

            def embed_fn(items: list[bytes]) -> np.ndarray:
                return embeddings.embed_images(
                    model, items, height=loader_config.augment.height,
                    width=loader_config.augment.width, batch_size=batch,
                    loader_config=loader_config)

        counterfactual, accepted = _counterfactual_part(
            root, data, fq, fg, weights, lq, vq, k=k, embed_fn=embed_fn,
            num_counterfactuals=opts.num_counterfactuals,
            min_changed_pixels=opts.min_changed_pixels, pixel_tolerance=opts.pixel_tolerance,
            seed=opts.seed, prior=prior.ranked, bootstrap_samples=opts.bootstrap_samples,
            calibration=calibration,
            render_workers=loader_config.num_workers)  # render ahead of the test

    if not opts.measure_maps:
        maps_section: dict[str, Any] = {"skipped": "measure_maps=False"}
    elif not with_masks:
        maps_section = {"skipped": f"{root} is not a synthetic data root with part masks "
                                   f"({synthetic.META_FILE} and masks/regions.json): the maps "
                                   "cannot be measured"}
    else:
        first, partner = map_quality.rank1_partners(
            fq, fg, data.query.pids, data.query.cameras, data.gallery.pids,
            data.gallery.cameras, opts.map_images)
        augment_config = loader_config.augment
        baseline = map_outputs.map_baseline(model, data.gallery.paths, augment_config,
                                            count=opts.map_reference_images,
                                            layer=opts.map_layer)
        maps_section = map_quality.measure_maps(
            model, weights, query_paths=[data.query.paths[q] for q in first],
            partner_paths=[data.gallery.paths[g] for g in partner],
            gallery_paths=data.gallery.paths, counterfactuals=accepted[:opts.map_images],
            augment_config=augment_config, steps=opts.map_steps, seed=opts.seed,
            layer=opts.map_layer, baseline=baseline, method=opts.map_method,
            query_labels=lq[first],  # zeros where a query has no labels
            attribute_accuracy=_head_accuracy(np.concatenate([fq[vq], fg[vg]]), weights,
                                              np.concatenate([lq[vq], lg[vg]])))
        maps_section["reference_images"] = opts.map_reference_images

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
            "bootstrap_samples": opts.bootstrap_samples,
            "interval_level": bootstrap.LEVEL,
            "measure_maps": opts.measure_maps,
            "map_images": opts.map_images,
            "map_method": opts.map_method,
            "map_steps": opts.map_steps,
            "map_layer": opts.map_layer,
            "map_reference_images": opts.map_reference_images,
            "calibrated_disagreement": calibration is not None,
        },
        "data": {
            "synthetic": bool(synthetic_root),
            "num_queries": len(data.query),
            "num_gallery": len(data.gallery),
            "num_labelled_queries": int(vq.sum()),
            "num_labelled_gallery": int(vg.sum()),
        },
        "prior": prior.json(ATTRIBUTE_NAMES),
        "counterfactual": counterfactual,
        "auroc": auroc,
        "amd": amd,
        "maps": maps_section,
    }
    json_path, md_path = write_outputs(metrics, output_dir)
    logging.info("explanation metrics written to %s and %s (%.1f s in all)", json_path, md_path,
                 time.perf_counter() - start)
    return MeasurementResult(metrics, json_path, md_path, markdown_table(metrics))


def _head_accuracy(features: np.ndarray, weights: np.ndarray, labels: np.ndarray
                   ) -> np.ndarray | None:
    """The raw head's balanced accuracy per attribute (present at ``x_a >= 0.5``) on labelled
    images ``[n, N]``, NaN where the labels hold one class only (nothing to tell apart), or
    None without labelled images: which attributes the model has learned
    (docs/attribute_maps.md, 'Measurements')."""
    if not len(features):
        return None
    logits = np.asarray(features, np.float64) @ np.asarray(weights, np.float64)
    m = evaluation.attribute_metrics(special.expit(logits), labels)
    return m["two_class_accuracy_per_attribute"]


def _counterfactual_part(root: str, data: Any, fq: np.ndarray, fg: np.ndarray,
                         weights: np.ndarray, lq: np.ndarray, vq: np.ndarray, *, k: int,
                         embed_fn: Callable[[list[bytes]], np.ndarray],
                         num_counterfactuals: int, min_changed_pixels: int,
                         pixel_tolerance: int, seed: int, prior: np.ndarray,
                         bootstrap_samples: int, calibration: Calibration | None,
                         render_workers: int = 0) -> tuple[dict[str, Any], list]:
    t0 = time.perf_counter()
    gallery_files = [os.path.join(SPLIT_FOLDERS["gallery"], os.path.basename(p))
                     for p in data.gallery.paths]
    pairs = cfs.ranked_pairs(fq, fg, data.query.pids, data.query.cameras, data.gallery.pids,
                         data.gallery.cameras, k)
    pairs = cfs.CandidatePairs(*(x[vq[pairs.query]] for x in pairs))
    made = cfs.make_counterfactuals(root, gallery_files, np.unique(pairs.gallery),
                                num_counterfactuals, seed=seed,
                                min_changed_pixels=min_changed_pixels,
                                pixel_tolerance=pixel_tolerance, workers=render_workers)
    if not made.accepted:
        return {"skipped": f"no visible counterfactual among {int(made.tried.sum())} tried "
                           f"(min_changed_pixels={min_changed_pixels})"}, []
    t1 = time.perf_counter()
    f_cf = np.asarray(embed_fn([cf.jpeg for cf in made.accepted]), np.float32)
    t2 = time.perf_counter()
    out = cfs.counterfactual_metrics(fq, fg, f_cf, weights, made.accepted, pairs, lq, vq,
                                     prior=prior, bootstrap_samples=bootstrap_samples,
                                     seed=seed, calibration=calibration)
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
    }, made.accepted


__all__ = [
    "DEFAULT_K", "FORMAT", "JSON_NAME", "MARKDOWN_NAME", "MeasurementResult", "label_metrics",
    "measure", "write_outputs",
]
