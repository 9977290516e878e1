"""The maps section of ``tools/evaluate_explanations.py``: attribute maps against part masks.

On a synthetic data root (it has ``masks/``, docs/attribute_maps.md, 'Part masks') this runs the
four measurements of :mod:`reid_jax.explain.map_metrics` on at most ``map_images`` images each
(``config.explain.map_images``; ``measure_maps=False`` skips the section):

* pointing game: evidence maps of the first ``map_images`` query images against their part
  regions, 2-pixel tolerance, cases ``x_a > 0.5`` with a non-empty region (with the queries'
  labels also over the cases the labels confirm); baselines the image centre, the distance
  Grad-CAM of the query against its rank-1 gallery image (``maps.distance_gradcam``) and a
  random pixel (chance); and, as a reference that uses the part masks, the part whose greying
  lowers ``z_a`` most (``map_metrics.part_occlusion_maps``);
* agreement with part occlusion: on the same cases, does the evidence map peak on that part
  (does the map find what the model reads, right part or not)?
* counterfactual localisation: pairs (gallery image, its re-render with one attribute changed,
  ``reid_jax.explain.counterfactuals``): does the pair's contribution map (eq. 3.2, paper
  weights) of the largest-rising attribute peak within 2 pixels of the changed region?
  Baselines the centre, the Grad-CAM of the re-render against the original, chance;
* deletion: blurring the top 10 % of an evidence map's pixels vs 10 % random pixels
  (``x_a``, every present attribute of the pointing-game images), and the same for the
  contribution maps of each query and its rank-1 image (``e_a`` of the pair's largest
  attribute);
* completeness: how far the contribution maps of those pairs (both kinds) are from ``e_a``.

Maps are computed at the model input's size and brought to the stored image's size (that of the
masks) by ``resize_maps``, which keeps sums; deletion works at the model input's size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from scipy import special

from reid_jax import retrieval, synthetic
from reid_jax.data import augment
from reid_jax.data.attributes import ATTRIBUTE_NAMES
from reid_jax.explain import map_metrics as mm
from reid_jax.explain import maps as maps_lib
from reid_jax.explain.map_outputs import model_inputs
from reid_jax.progress import ProgressLog

BATCH = 8  # images per map call (bounded memory: maps are [B, A, H, W])


def _batches(n: int, size: int = BATCH):
    for lo in range(0, n, size):
        yield lo, min(lo + size, n)


def _resize(maps: Any, h: int, w: int) -> np.ndarray:
    return np.asarray(maps_lib.resize_maps(maps, h, w), np.float32)


def _jpeg_inputs(jpegs: Sequence[bytes], augment_config: augment.AugmentConfig) -> np.ndarray:
    return np.stack([augment.eval_transform(augment.read_image(j), augment_config)
                     for j in jpegs]).astype(np.float32)


def rank1_partners(fq: Any, fg: Any, query_pids: Any, query_cams: Any, gallery_pids: Any,
                   gallery_cams: Any, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` queries (file-name order) and each one's rank-1 gallery image
    under the Market-1501 protocol (same pid and camera left out; distractors and junk not
    ranked: they have no part to compare), as int ``[n]`` index arrays."""
    fq = np.asarray(fq, np.float64)[:count]
    fg = np.asarray(fg, np.float64)
    qp, qc = np.asarray(query_pids)[:count, None], np.asarray(query_cams)[:count, None]
    gp, gc = np.asarray(gallery_pids)[None], np.asarray(gallery_cams)[None]
    d = (fq * fq).sum(1)[:, None] + (fg * fg).sum(1)[None] - 2.0 * fq @ fg.T
    d = np.where(retrieval.excluded(qp, qc, gp, gc) | (gp <= retrieval.DISTRACTOR_PID), np.inf,
                 d)
    keep = np.isfinite(d).any(axis=1)
    return np.flatnonzero(keep), np.argmin(d, axis=1)[keep]


def measure_maps(model: Any, weights: np.ndarray, *, query_paths: Sequence[str],
                 partner_paths: Sequence[str], gallery_paths: Sequence[str],
                 counterfactuals: Sequence[Any], augment_config: augment.AugmentConfig,
                 steps: int = maps_lib.DEFAULT_STEPS, seed: int = 0,
                 layer: int = maps_lib.DEFAULT_LAYER, baseline: np.ndarray | None = None,
                 method: str = maps_lib.DEFAULT_METHOD,
                 attributes: Sequence[str] = ATTRIBUTE_NAMES,
                 query_labels: np.ndarray | None = None,
                 attribute_accuracy: np.ndarray | None = None) -> dict[str, Any]:
    """The maps section (JSON-ready).

    Args:
      model, weights: the re-id model and the attribute head's ``[N, A]``.
      query_paths: query images to map (already capped); each must have a part mask.
      partner_paths: each query's rank-1 gallery image (same length).
      gallery_paths: the gallery split's paths (``counterfactuals[i].gallery_index`` indexes
        them).
      counterfactuals: ``Counterfactual`` s with ``part_labels`` / ``changed_region`` (capped).
      augment_config: the evaluation transform.
      steps: quadrature nodes; seed: seeds the random pixels of the deletion test.
      layer, baseline, method: where the maps are taken, what they start from, and how they are
        computed (``maps.evidence_maps``).
      query_labels: optional ``[len(query_paths), A]`` 0/1 labels of the query images: the
        pointing game is then also reported over the cases the labels confirm
        (``labelled_present``).
      attribute_accuracy: optional ``[A]`` balanced accuracy of the head per attribute on the
        labelled test images: the pointing game is then also reported over the attributes the
        model has learned (``learned``, ``reid_jax.explain.learned.LEARNED_ACCURACY``).

    Returns:
      ``{"num_images", "num_counterfactual_pairs", "steps", "tolerance", "pointing_game",
      "occlusion_agreement", "counterfactual_localisation", "deletion_evidence",
      "deletion_contributions", "completeness": {"query_top1", "counterfactual"},
      "seconds"}``; each measurement is ``map_metrics.summarise`` output with ``overall``,
      ``groups`` and ``attributes``.
    """
    t0 = time.perf_counter()
    if len(query_paths) != len(partner_paths):
        raise ValueError(f"{len(query_paths)} query paths but {len(partner_paths)} partners")
    if query_labels is not None and np.shape(query_labels) != (len(query_paths),
                                                               len(attributes)):
        raise ValueError(f"query_labels must have shape {(len(query_paths), len(attributes))} "
                         f"(one row per query path), got {np.shape(query_labels)}")
    attributes = list(attributes)
    weights = np.asarray(weights, np.float32)
    pointing, agreement, del_ev, del_con = [], [], [], []
    complete_q: list[np.ndarray] = []
    # Below the last map each batch takes tens of seconds: log the rate and ETA.
    progress = ProgressLog(f"attribute maps ({method}, stage {layer})", unit="images and pairs")
    total = len(query_paths) + len(counterfactuals)
    offset = 0
    for lo, hi in _batches(len(query_paths)):
        images = model_inputs(query_paths[lo:hi], augment_config)
        partners = model_inputs(partner_paths[lo:hi], augment_config)
        regions, part_labels = [], []
        for p in query_paths[lo:hi]:
            mask = synthetic.read_part_mask(p)
            if mask is None:
                raise ValueError(f"{p} has no part mask (masks/ of a synthetic data root); the "
                                 "pointing game needs them (--nomeasure_maps skips maps)")
            regions.append(synthetic.attribute_regions(mask, attributes))
            part_labels.append(mask.labels)
        regions = np.stack(regions)
        h, w = regions.shape[-2:]
        ev = maps_lib.evidence_maps(model, weights, images, steps=steps, layer=layer,
                                    baseline=baseline, method=method)
        probs = special.expit(np.asarray(ev.logits, np.float64))
        cam = _resize(maps_lib.distance_gradcam(model, images, partners), h, w)
        occlusion = mm.part_occlusion_maps(model, weights, images, np.stack(part_labels),
                                           logits=ev.logits)
        evidence = _resize(ev.maps, h, w)
        pointing.append(mm.pointing_game_cases(
            evidence, regions, probs, baselines={"gradcam": cam},
            baseline_points={"occlusion": mm.part_occlusion_points(occlusion)},
            attributes=attributes,
            labels=None if query_labels is None else np.asarray(query_labels)[lo:hi]))
        agreement.append(mm.occlusion_agreement_cases(
            evidence, occlusion, regions, probs, baselines={"gradcam": cam},
            attributes=attributes))
        del_ev.append(mm.deletion_evidence_cases(model, weights, images, np.asarray(ev.maps),
                                                 logits=ev.logits, seed=seed + lo,
                                                 attributes=attributes))
        cm = maps_lib.contribution_maps(model, weights, images, partners, steps=steps,
                                        layer=layer, baseline=baseline, method=method)
        del_con.append(mm.deletion_contributions_cases(model, weights, images, partners, cm,
                                                       seed=seed + lo, attributes=attributes))
        complete_q.append(mm.completeness_errors(cm))
        offset += hi - lo
        progress(offset, total)
    offsets = list(range(0, len(query_paths), BATCH))
    out: dict[str, Any] = {
        "num_images": len(query_paths), "num_counterfactual_pairs": len(counterfactuals),
        "steps": int(steps), "layer": int(layer), "method": method,
        "tolerance": mm.DEFAULT_TOLERANCE,
        "pointing_game": mm.summarise_pointing(mm.concatenate(pointing, offsets), attributes,
                                               attribute_accuracy=attribute_accuracy)
        if pointing else None,
        "occlusion_agreement": mm.summarise(mm.concatenate(agreement, offsets), attributes)
        if agreement else None,
        "deletion_evidence": {**mm.summarise(mm.concatenate(del_ev, offsets), attributes),
                              "fraction": mm.DEFAULT_FRACTION} if del_ev else None,
        "deletion_contributions": {**mm.summarise(mm.concatenate(del_con, offsets), attributes),
                                   "fraction": mm.DEFAULT_FRACTION} if del_con else None,
    }
    localisation, complete_cf = [], []
    cf_offsets = []
    for lo, hi in _batches(len(counterfactuals)):
        chunk = counterfactuals[lo:hi]
        originals = model_inputs([gallery_paths[c.gallery_index] for c in chunk],
                                 augment_config)
        changed = _jpeg_inputs([c.jpeg for c in chunk], augment_config)
        region = np.stack([c.changed_region for c in chunk])
        h, w = region.shape[-2:]
        cm = maps_lib.contribution_maps(model, weights, originals, changed, steps=steps,
                                        layer=layer, baseline=baseline, method=method)
        top, pair_map = mm.largest_rising(cm)
        cam = maps_lib.distance_gradcam(model, changed, originals)
        localisation.append(mm.counterfactual_localisation_cases(
            _resize(pair_map, h, w), top, region, np.stack([c.changed_labels for c in chunk]),
            baselines={"gradcam": _resize(cam, h, w)}, attributes=attributes))
        complete_cf.append(mm.completeness_errors(cm))
        cf_offsets.append(lo)
        progress(len(query_paths) + hi, total)
    out["counterfactual_localisation"] = (
        mm.summarise(mm.concatenate(localisation, cf_offsets), attributes,
                     overall_groups=tuple(synthetic.ATTRIBUTE_GROUPS))
        if localisation else None)
    out["completeness"] = {
        "query_top1": mm.completeness(complete_q) if complete_q else None,
        "counterfactual": mm.completeness(complete_cf) if complete_cf else None}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    logging.info("attribute maps measured on %d images and %d counterfactual pairs in %.1f s",
                 len(query_paths), len(counterfactuals), out["seconds"])
    return out


__all__ = ["measure_maps", "rank1_partners"]
