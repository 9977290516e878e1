"""How good attribute maps are, measured against the synthetic part masks.

Four measurements (docs/attribute_maps.md, 'Measurements'), each over *cases* and reported as a
plain JSON-ready dict with counts, rates, and the same per attribute group (``headwear``,
``bags``, ``upper_body``, ``lower_body``; gender and age: ``whole_person``), per kind of look
(:data:`ATTRIBUTE_KINDS`: ``colour``, ``shape``, ``object``) and per attribute:

* :func:`pointing_game` — for each image and localisable attribute the model predicts present
  (``x_a > 0.5``) whose region is not empty: does the evidence map's maximum lie within
  ``tolerance`` pixels of the region? Baselines on the same cases: the image centre, any
  attribute-agnostic maps given (e.g. :func:`reid_jax.explain.maps.distance_gradcam`), and the
  chance of a uniformly random pixel.
* :func:`part_occlusion_maps` — a reference that uses the part masks: the drop of ``z_a`` when
  each labelled part is greyed. Its top part (:func:`part_occlusion_points`) is scored in the
  pointing game beside the baselines, and :func:`occlusion_agreement_cases` asks whether a
  map peaks on that part (does the map find what the model reads?).
* :func:`counterfactual_localisation` — for a gallery image and its re-render with one attribute
  changed: does the contribution map of the pair's largest-rising attribute peak inside the
  changed region? (and is that attribute one the change flipped?)
* :func:`deletion_evidence` / :func:`deletion_contributions` — does blurring the top
  ``fraction`` of a map's pixels lower its value (``x_a``, or ``e_a``) more than blurring as many
  random pixels?
* :func:`completeness` — how far a pair's two contribution maps are from summing to ``e_a``.

Every ``*_cases`` function returns :class:`Cases` (per-case outcomes, small), so long runs can
measure batch by batch, :func:`concatenate` the cases and :func:`summarise` once; the plain
functions do both for one batch. Peaks are the first maximum in row-major order; distances are
Euclidean, in pixels of the maps' grid (the masks must have the maps' size: resize maps with
:func:`reid_jax.explain.maps.resize_maps` to the stored image's size first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage, special

from reid_jax.data.attributes import ATTRIBUTE_NAMES
from reid_jax.explain import maps as maps_lib
from reid_jax.explain.kernels import complete_weights
from reid_jax.explain.learned import LEARNED_ACCURACY
from reid_jax.models.agw import AGW
from reid_jax.synthetic.masks import ATTRIBUTE_GROUPS, attribute_group, localisable

DEFAULT_TOLERANCE = 2.0
DEFAULT_FRACTION = 0.1
DEFAULT_THRESHOLD = 0.5
# Parts smaller than this (pixels of the model input) are not greyed by the occlusion reference.
DEFAULT_MIN_PART_PIXELS = 4
# Blur of the deletion test: Gaussian sigma as a fraction of the image height (4 px at 128).
DEFAULT_BLUR = 4.0 / 128.0
WHOLE_PERSON = "whole_person"
Array = jax.Array
GROUPS: tuple[str, ...] = (*ATTRIBUTE_GROUPS, WHOLE_PERSON)
# What kind of look each localisable attribute is (docs/attribute_maps.md, 'Measurements'): a
# colour shows in the pixels of its garment, a shape in the outline of a part (sleeve and
# lower-garment length, a dress, long hair), an object is a thing worn or carried.
ATTRIBUTE_KINDS: dict[str, tuple[str, ...]] = {
    "colour": tuple(a for a in ATTRIBUTE_NAMES
                    if a.startswith(("up", "down")) and a not in ("up", "down")),
    "shape": ("up", "down", "clothes", "hair"),
    "object": ("hat", "backpack", "bag", "handbag"),
}


class Cases(NamedTuple):
    """Per-case outcomes of a measurement.

    Attributes:
      attribute: int ``[n]`` the case's attribute (index into ``attributes``).
      item: int ``[n]`` the image or pair the case belongs to.
      outcomes: method name -> bool ``[n]`` (hit / success per case).
      values: name -> float ``[n]`` extra per-case numbers (e.g. the value drops of deletion;
        summarised as means).
      expected: name -> float ``[n]`` success probabilities of a random method (summarised as
        expected rates, e.g. the chance of a random pixel landing in the region).
      skipped: reason -> count of candidate cases left out.
    """

    attribute: np.ndarray
    item: np.ndarray
    outcomes: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    skipped: dict[str, int]


def _group(name: str) -> str:
    return attribute_group(name) or WHOLE_PERSON


def _kind(name: str) -> str | None:
    return next((k for k, names in ATTRIBUTE_KINDS.items() if name in names), None)


def concatenate(parts: Sequence[Cases], item_offsets: Sequence[int] | None = None) -> Cases:
    """One :class:`Cases` from several (same methods), ``item`` shifted by ``item_offsets``."""
    if not parts:
        raise ValueError("concatenate needs at least one Cases")
    offsets = item_offsets if item_offsets is not None else [0] * len(parts)
    if len(offsets) != len(parts):
        raise ValueError(f"{len(parts)} parts but {len(offsets)} item offsets")
    keys = [(set(p.outcomes), set(p.values), set(p.expected)) for p in parts]
    if any(k != keys[0] for k in keys):
        raise ValueError(f"the parts measure different methods: {keys}")
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    skipped: dict[str, int] = {}
    for p in parts:
        for k, v in p.skipped.items():
            skipped[k] = skipped.get(k, 0) + int(v)
    return Cases(
        attribute=cat([p.attribute for p in parts]).astype(np.int64),
        item=cat([p.item + o for p, o in zip(parts, offsets, strict=True)]).astype(np.int64),
        outcomes={k: cat([p.outcomes[k] for p in parts]).astype(bool) for k in keys[0][0]},
        values={k: cat([p.values[k] for p in parts]).astype(np.float64) for k in keys[0][1]},
        expected={k: cat([p.expected[k] for p in parts]).astype(np.float64)
                  for k in keys[0][2]},
        skipped=skipped)


def _rates(cases: Cases, select: np.ndarray) -> dict[str, Any]:
    n = int(select.sum())
    out: dict[str, Any] = {"cases": n}
    for name, hit in cases.outcomes.items():
        k = int(hit[select].sum())
        out[name] = {"hits": k, "rate": (k / n) if n else None}
    for name, p in cases.expected.items():
        out[name] = {"expected_rate": float(p[select].mean()) if n else None}
    for name, v in cases.values.items():
        out[f"mean_{name}"] = float(v[select].mean()) if n else None
    return out


def summarise(cases: Cases, attributes: Sequence[str] = ATTRIBUTE_NAMES,
              overall_groups: Sequence[str] | None = None) -> dict[str, Any]:
    """JSON-ready counts and rates: ``overall``, ``groups``, ``kinds`` and ``attributes``.

    ``overall`` pools the cases of ``overall_groups`` (default: all); every group, kind
    (:data:`ATTRIBUTE_KINDS`) and attribute with cases is listed. Rates are ``None`` where a
    selection has no cases.
    """
    groups = np.asarray([_group(attributes[a]) for a in cases.attribute], dtype=object)
    kinds = np.asarray([_kind(attributes[a]) for a in cases.attribute], dtype=object)
    pooled = (np.ones(len(cases.attribute), bool) if overall_groups is None
              else np.isin(groups, list(overall_groups)))
    out = {"overall": _rates(cases, pooled),
           "groups": {g: _rates(cases, groups == g) for g in GROUPS if (groups == g).any()},
           "kinds": {k: _rates(cases, kinds == k) for k in ATTRIBUTE_KINDS
                     if (kinds == k).any()},
           "attributes": {attributes[a]: _rates(cases, cases.attribute == a)
                          for a in sorted(set(cases.attribute.tolist()))},
           "skipped": dict(cases.skipped)}
    if overall_groups is not None:
        out["overall_groups"] = list(overall_groups)
    return out


# --------------------------------------------------------------------------------------------
# Peaks and regions.


def peak(map_: np.ndarray) -> tuple[int, int]:
    """(row, column) of the first maximum of a ``[H, W]`` map in row-major order."""
    m = np.asarray(map_)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(m)), m.shape))


def near(region: np.ndarray, row: int, col: int, tolerance: float) -> bool:
    """Whether a pixel of ``region`` (bool ``[H, W]``) lies within Euclidean ``tolerance`` of
    (row, col)."""
    r = int(np.floor(tolerance))
    h, w = region.shape
    r0, r1, c0, c1 = max(row - r, 0), min(row + r + 1, h), max(col - r, 0), min(col + r + 1, w)
    ys, xs = np.nonzero(region[r0:r1, c0:c1])
    return bool(((ys + r0 - row) ** 2 + (xs + c0 - col) ** 2 <= tolerance ** 2).any())


def dilate(region: np.ndarray, tolerance: float) -> np.ndarray:
    """bool ``[H, W]``: the pixels within Euclidean ``tolerance`` of ``region``."""
    region = np.asarray(region, bool)
    r = int(np.floor(tolerance))
    out = region.copy()
    h, w = region.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if (dy or dx) and dy * dy + dx * dx <= tolerance ** 2:
                src = region[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
                out[max(dy, 0):h - max(-dy, 0), max(dx, 0):w - max(-dx, 0)] |= src
    return out


def _check_tolerance(tolerance: float) -> float:
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number of pixels >= 0, got {tolerance}")
    return float(tolerance)


def _as_array(name: str, x: Any, ndim: int, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {what}, got shape {a.shape}")
    return a


def _as_maps(name: str, x: Any, ndim: int, what: str) -> np.ndarray:
    """``_as_array`` for maps: NaN or infinity is refused (a NaN map's "peak" would be its
    first pixel, a hit wherever a region starts there)."""
    a = _as_array(name, x, ndim, what)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite, got {int((~np.isfinite(a)).sum())} NaN or "
                         f"infinite values of {a.size}")
    return a


def _check_baselines(baselines: Mapping[str, Any] | None, shape: tuple[int, ...],
                     reserved: Sequence[str], what: str = "one map per image"
                     ) -> dict[str, np.ndarray]:
    out = {}
    for name, m in (baselines or {}).items():
        if name in reserved:
            raise ValueError(f"baseline name {name!r} is taken; use another")
        a = np.asarray(m)
        if a.shape != shape:
            raise ValueError(f"baseline {name!r} must have shape {shape} ({what}), "
                             f"got {a.shape}")
        out[name] = _as_maps(f"baseline {name!r}", a, len(shape), str(shape))
    return out


# --------------------------------------------------------------------------------------------
# (a) Pointing game.


def pointing_game_cases(maps: Any, regions: Any, probabilities: Any, *,
                        baselines: Mapping[str, Any] | None = None,
                        baseline_points: Mapping[str, Any] | None = None,
                        tolerance: float = DEFAULT_TOLERANCE,
                        threshold: float = DEFAULT_THRESHOLD,
                        attributes: Sequence[str] = ATTRIBUTE_NAMES,
                        labels: Any = None) -> Cases:
    """Per-case pointing game (see :func:`pointing_game`); methods ``evidence``, ``centre``,
    one per baseline and baseline point; expected ``chance``; with ``labels`` also the value
    ``labelled_present`` (1 where the labels say the case's attribute is present, else 0)."""
    maps = _as_maps("maps", maps, 4, "[B, A, H, W] evidence maps")
    regions = _as_array("regions", regions, 4, "bool [B, A, H, W] attribute regions")
    probs = _as_array("probabilities", probabilities, 2, "[B, A] attribute probabilities")
    b, a, h, w = maps.shape
    if regions.shape != maps.shape or probs.shape != (b, a) or len(attributes) != a:
        raise ValueError(f"shapes disagree: maps {maps.shape}, regions {regions.shape}, "
                         f"probabilities {probs.shape}, {len(attributes)} attribute names "
                         "(expected [B, A, H, W], [B, A, H, W], [B, A], A names)")
    if labels is not None:
        labels = _as_array("labels", labels, 2, "[B, A] 0/1 attribute labels")
        if labels.shape != (b, a):
            raise ValueError(f"labels must have shape {(b, a)} (one row per image), got "
                             f"{labels.shape}")
    tolerance = _check_tolerance(tolerance)
    base = _check_baselines(baselines, (b, h, w), ("evidence", "centre"))
    base_peaks = {name: [peak(m) for m in bm] for name, bm in base.items()}
    points = _check_baselines(baseline_points, (b, a, 2), ("evidence", "centre", *base),
                              "one (row, column) per image and attribute")
    centre = (h // 2, w // 2)
    loc = localisable(attributes)
    present = probs > threshold
    nonempty = regions.reshape(b, a, -1).any(axis=-1)
    skipped = {"not_localisable": int((present & ~loc[None]).sum()),
               "empty_region": int((present & loc[None] & ~nonempty).sum())}
    items, attrs = np.nonzero(present & loc[None] & nonempty)
    outcomes: dict[str, list[bool]] = {"evidence": [], "centre": []}
    outcomes.update({name: [] for name in (*base, *points)})
    chance = []
    for i, k in zip(items.tolist(), attrs.tolist(), strict=True):
        region = regions[i, k].astype(bool)
        outcomes["evidence"].append(near(region, *peak(maps[i, k]), tolerance))
        outcomes["centre"].append(near(region, *centre, tolerance))
        for name in base:
            outcomes[name].append(near(region, *base_peaks[name][i], tolerance))
        for name, pts in points.items():
            outcomes[name].append(near(region, *(int(x) for x in pts[i, k]), tolerance))
        chance.append(dilate(region, tolerance).mean())
    values = {} if labels is None else {
        "labelled_present": (labels[items, attrs] > 0).astype(np.float64)}
    return Cases(attrs.astype(np.int64), items.astype(np.int64),
                 {k: np.asarray(v, bool) for k, v in outcomes.items()}, values,
                 {"chance": np.asarray(chance, np.float64)}, skipped)


def select(cases: Cases, keep: Any) -> Cases:
    """The cases where bool ``keep [n]`` is true (e.g. the pointing game's cases whose
    attribute the labels say is present); ``skipped`` stays that of all cases."""
    keep = np.asarray(keep, bool)
    if keep.shape != cases.attribute.shape:
        raise ValueError(f"keep must be bool of shape {cases.attribute.shape} (one per case), "
                         f"got {keep.shape}")
    pick = lambda d: {k: v[keep] for k, v in d.items()}  # noqa: E731
    return Cases(cases.attribute[keep], cases.item[keep], pick(cases.outcomes),
                 pick(cases.values), pick(cases.expected), dict(cases.skipped))


def pointing_game(maps: Any, regions: Any, probabilities: Any, *,
                  baselines: Mapping[str, Any] | None = None,
                  baseline_points: Mapping[str, Any] | None = None,
                  tolerance: float = DEFAULT_TOLERANCE, threshold: float = DEFAULT_THRESHOLD,
                  attributes: Sequence[str] = ATTRIBUTE_NAMES,
                  labels: Any = None) -> dict[str, Any]:
    """The pointing game of evidence maps against the part masks.

    Args:
      maps: ``[B, A, H, W]`` evidence maps (``EvidenceMaps.maps``, at the masks' size).
      regions: bool ``[B, A, H, W]`` the pixels that show each attribute
        (``reid_jax.synthetic.read_attribute_regions``).
      probabilities: ``[B, A]`` ``x = sigmoid(z)``; a case is an attribute with ``x > threshold``.
      baselines: name -> ``[B, H, W]`` attribute-agnostic maps scored on the same cases (e.g.
        ``{"gradcam": distance_gradcam(...)}``).
      baseline_points: name -> int ``[B, A, 2]``: a method that names one pixel (row,
        column) per image and attribute, scored on the same cases (e.g.
        ``{"occlusion": part_occlusion_points(...)}``).
      tolerance: pixels; a peak within this Euclidean distance of the region hits.
      threshold: the probability above which the model predicts an attribute present.
      attributes: the ``A`` attribute names.
      labels: optional ``[B, A]`` 0/1 ground-truth labels of the images.

    Returns:
      ``summarise`` of the cases: ``overall``/``groups``/``attributes`` with ``cases``,
      ``evidence``, ``centre`` and each baseline as ``{hits, rate}``, ``chance`` as
      ``{expected_rate}``; ``skipped`` counts present attributes that are not localisable or
      have an empty region (e.g. hidden); and ``tolerance``, ``threshold``. With ``labels``,
      ``mean_labelled_present`` (the share of cases the labels confirm) and
      ``labelled_present``: the same summary over those cases alone — an image that does not
      show an attribute gives its map nothing to point at (docs/attribute_maps.md,
      'Measurements').
    """
    cases = pointing_game_cases(maps, regions, probabilities, baselines=baselines,
                                baseline_points=baseline_points, tolerance=tolerance,
                                threshold=threshold, attributes=attributes, labels=labels)
    return {**summarise_pointing(cases, attributes), "tolerance": float(tolerance),
            "threshold": float(threshold)}


def summarise_pointing(cases: Cases, attributes: Sequence[str] = ATTRIBUTE_NAMES, *,
                       attribute_accuracy: Any = None,
                       min_accuracy: float = LEARNED_ACCURACY) -> dict[str, Any]:
    """:func:`summarise` of pointing-game cases, plus ``labelled_present`` (the summary of the
    cases whose attribute the labels confirm) when the cases carry labels, and ``learned``
    (the summary of the cases whose attribute the model has learned) when
    ``attribute_accuracy`` is given.

    Args:
      cases: from :func:`pointing_game_cases`.
      attributes: the attribute names (``A``).
      attribute_accuracy: optional float ``[A]``: the head's balanced accuracy per attribute on
        labelled images (the mean of its true-positive and true-negative rates,
        ``reid_jax.evaluation.attribute_metrics``; NaN: not measured, e.g. one class only). An
        attribute whose accuracy is at least ``min_accuracy`` is *learned*: a map can only point
        at what the model tells apart.
      min_accuracy: that threshold, in ``[0, 1]``.
    """
    out = summarise(cases, attributes)
    if "labelled_present" in cases.values:
        out["labelled_present"] = summarise(
            select(cases, cases.values["labelled_present"] > 0.5), attributes)
    if attribute_accuracy is not None:
        accuracy = np.asarray(attribute_accuracy, np.float64)
        if accuracy.shape != (len(attributes),):
            raise ValueError(f"attribute_accuracy must have shape ({len(attributes)},) (one "
                             f"balanced accuracy per attribute), got {accuracy.shape}")
        if not 0.0 <= float(min_accuracy) <= 1.0:
            raise ValueError(f"min_accuracy must lie in [0, 1], got {min_accuracy}")
        learned = np.nan_to_num(accuracy, nan=-1.0) >= min_accuracy
        out["learned"] = {
            **summarise(select(cases, learned[cases.attribute]), attributes),
            "min_accuracy": float(min_accuracy),
            "learned_attributes": [a for a, keep in zip(attributes, learned, strict=True)
                                   if keep],
            "attribute_accuracy": {a: None if np.isnan(x) else round(float(x), 4)
                                   for a, x in zip(attributes, accuracy, strict=True)}}
    return out


# --------------------------------------------------------------------------------------------
# Part occlusion: where the model reads an attribute, one labelled part at a time.


def _resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of ``[H', W']`` part labels to ``[height, width]`` (the label
    under each output pixel's centre)."""
    h, w = labels.shape
    if (h, w) == (height, width):
        return labels
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def part_occlusion_maps(model: AGW, weights: Any, images: Any, part_labels: Any, *,
                        logits: Any = None, min_pixels: int = DEFAULT_MIN_PART_PIXELS,
                        batch_size: int = 32) -> np.ndarray:
    """How much greying each labelled part of an image lowers each attribute logit.

    One part at a time (every region of the part mask, the background included, that covers
    at least ``min_pixels`` pixels of the model input) is filled with the mean colour (model
    input 0: the evaluation transform subtracts the mean), and the image is embedded again. A
    pixel's value is ``z_a(image) - z_a(image with the pixel's part greyed)``, ``z = f @ W``:
    the part where an attribute's map is highest is the part the model reads it from, by this
    test. It needs the part masks, so it is a reference for the measurements on synthetic
    data, not an explanation (docs/attribute_maps.md, 'Baselines').

    Args:
      model: the re-id model (used in eval mode; not changed).
      weights: ``[N, A]`` attribute-head weights ``W``.
      images: ``[B, H, W, 3]`` model-input images (eval transform).
      part_labels: int ``[B, H', W']`` region index per pixel (the part masks at the stored
        image's size; brought to ``H x W`` by nearest neighbour for the occlusion).
      logits: optional ``[B, A]`` ``z`` of the images as they are (e.g. ``EvidenceMaps.logits``,
        already computed beside the maps); None: computed here.
      min_pixels: smaller parts are not greyed; their pixels get ``-inf``.
      batch_size: images per forward pass.

    Returns:
      float32 ``[B, A, H', W']``: per pixel, the drop of ``z_a`` when its part is greyed.
    """
    images = _as_array("images", images, 4, "[B, H, W, 3] model-input images").astype(
        np.float32)
    weights = _as_array("weights", weights, 2, "[N, A]").astype(np.float32)
    labels = _as_array("part_labels", part_labels, 3, "int [B, H, W] part labels")
    b, h, w, _ = images.shape
    if len(labels) != b:
        raise ValueError(f"part_labels must hold one mask per image: {len(labels)} masks for "
                         f"{b} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"part_labels must be integer region indices, got {labels.dtype}")
    if labels.min(initial=0) < 0:
        raise ValueError(f"part_labels must be region indices >= 0, got values from "
                         f"{labels.min(initial=0)}")
    if int(min_pixels) < 1:
        raise ValueError(f"min_pixels must be >= 1, got {min_pixels}")
    occluded, owners = [], []
    for i in range(b):
        small = _resize_labels(labels[i], h, w)
        parts, counts = np.unique(small, return_counts=True)
        for part in parts[counts >= int(min_pixels)].tolist():
            x = images[i].copy()
            x[small == part] = 0.0
            occluded.append(x)
            owners.append((i, part))
    z = _image_logits(model, weights, images, logits, batch_size)
    drops = np.full((b, int(labels.max(initial=0)) + 1, weights.shape[1]), -np.inf, np.float32)
    if occluded:
        z_occluded = _embed_batches(model, np.stack(occluded), batch_size) @ weights
        for (i, part), zo in zip(owners, z_occluded, strict=True):
            drops[i, part] = z[i] - zo
    return np.stack([np.moveaxis(drops[i][labels[i]], -1, 0) for i in range(b)])


def top_part_regions(occlusion_maps: Any) -> np.ndarray:
    """bool ``[B, A, H, W]``: the pixels of the part whose greying lowers each attribute most
    (where a :func:`part_occlusion_maps` map is highest)."""
    m = _as_array("occlusion_maps", occlusion_maps, 4, "[B, A, H, W] part occlusion maps")
    top = m.max(axis=(-2, -1), keepdims=True)
    return (m == top) & np.isfinite(top)


def part_occlusion_points(occlusion_maps: Any) -> np.ndarray:
    """int ``[B, A, 2]``: for each image and attribute, the (row, column) deepest inside the
    part whose greying lowers ``z_a`` most (the pixel farthest from the part's edge), the one
    pixel the part-occlusion reference points at in the pointing game (of several deepest
    pixels, the one nearest their centroid).

    The reference names a part, not a pixel; the part's deepest pixel stands for it (its first
    pixel in row-major order would lie on its top edge, within the pointing game's tolerance of
    the part above it)."""
    top = top_part_regions(occlusion_maps)
    b, a, h, w = top.shape
    out = np.zeros((b, a, 2), np.int64)
    for i in range(b):
        for k in range(a):
            if top[i, k].any():
                depth = ndimage.distance_transform_edt(np.pad(top[i, k], 1))[1:-1, 1:-1]
                ys, xs = np.nonzero(depth == depth.max())
                # Of the deepest pixels, the one nearest their centroid (first in row-major).
                j = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
                out[i, k] = ys[j], xs[j]
    return out


def occlusion_agreement_cases(maps: Any, occlusion_maps: Any, regions: Any,
                              probabilities: Any, *,
                              baselines: Mapping[str, Any] | None = None,
                              tolerance: float = DEFAULT_TOLERANCE,
                              threshold: float = DEFAULT_THRESHOLD,
                              attributes: Sequence[str] = ATTRIBUTE_NAMES) -> Cases:
    """The pointing game's cases (``x_a > threshold``, localisable, non-empty region), scored
    against the part the model reads the attribute from instead of the part that shows it: a
    hit when the map's peak lies within ``tolerance`` pixels of the part whose greying lowers
    ``z_a`` most (:func:`top_part_regions`). It asks whether a map finds what the model reads,
    whether or not the model reads the right part. Methods ``evidence``, ``centre`` and each
    baseline; expected ``chance`` (a random pixel near that part)."""
    regions = _as_array("regions", regions, 4, "bool [B, A, H, W] attribute regions")
    top = top_part_regions(occlusion_maps)
    if top.shape != regions.shape:
        raise ValueError(f"occlusion_maps {top.shape} and regions {regions.shape} must have "
                         "the same shape [B, A, H, W]")
    nonempty = regions.reshape(*regions.shape[:2], -1).any(axis=-1)
    return pointing_game_cases(maps, top & nonempty[..., None, None], probabilities,
                               baselines=baselines, tolerance=tolerance, threshold=threshold,
                               attributes=attributes)


# --------------------------------------------------------------------------------------------
# (b) Counterfactual localisation.


def largest_rising(contributions: maps_lib.ContributionMaps) -> tuple[np.ndarray, np.ndarray]:
    """For pairs (original, re-render): the attribute with the largest ``e_a`` (it rose from 0,
    the identical pair's value) ``[P]``, and its pair map ``[P, H, W]``: the sum of the two
    images' maps, which share the pixel grid of the one scene."""
    errors = np.asarray(contributions.errors)
    top = np.argmax(errors, axis=1)
    rows = np.arange(len(top))
    pair_map = np.asarray(contributions.query)[rows, top] + np.asarray(
        contributions.gallery)[rows, top]
    return top, pair_map


def counterfactual_localisation_cases(pair_maps: Any, top_attribute: Any, changed_region: Any,
                                      changed_labels: Any, *,
                                      baselines: Mapping[str, Any] | None = None,
                                      tolerance: float = DEFAULT_TOLERANCE,
                                      attributes: Sequence[str] = ATTRIBUTE_NAMES) -> Cases:
    """Per-case counterfactual localisation (see :func:`counterfactual_localisation`)."""
    pair_maps = _as_maps("pair_maps", pair_maps, 3, "[P, H, W] pair maps")
    p, h, w = pair_maps.shape
    top = _as_array("top_attribute", top_attribute, 1, "int [P]")
    region = _as_array("changed_region", changed_region, 3, "bool [P, H, W]").astype(bool)
    changed = _as_array("changed_labels", changed_labels, 2, "bool [P, A]").astype(bool)
    if top.shape != (p,) or region.shape != (p, h, w) or changed.shape != (p, len(attributes)):
        raise ValueError(f"shapes disagree: pair_maps {pair_maps.shape}, top_attribute "
                         f"{top.shape}, changed_region {region.shape}, changed_labels "
                         f"{changed.shape} (expected [P, H, W], [P], [P, H, W], [P, A])")
    tolerance = _check_tolerance(tolerance)
    base = _check_baselines(baselines, (p, h, w), ("map", "centre", "attribute"))
    # The case's attribute: the changed one (the first flipped label that is localisable, else
    # the first flipped label), so groups report what was changed.
    loc = localisable(attributes)
    attr = np.asarray([int(np.flatnonzero(c & loc)[0]) if (c & loc).any()
                       else int(np.flatnonzero(c)[0]) if c.any() else -1 for c in changed])
    if (attr < 0).any():
        raise ValueError(f"changed_labels flags no attribute for pairs "
                         f"{np.flatnonzero(attr < 0).tolist()[:5]}")
    keep = region.reshape(p, -1).any(axis=1)
    outcomes: dict[str, list[bool]] = {"map": [], "centre": [], "attribute": []}
    outcomes.update({name: [] for name in base})
    chance = []
    items = np.flatnonzero(keep)
    for i in items.tolist():
        outcomes["map"].append(near(region[i], *peak(pair_maps[i]), tolerance))
        outcomes["centre"].append(near(region[i], h // 2, w // 2, tolerance))
        outcomes["attribute"].append(bool(changed[i, int(top[i])]))
        for name in base:
            outcomes[name].append(near(region[i], *peak(base[name][i]), tolerance))
        chance.append(dilate(region[i], tolerance).mean())
    return Cases(attr[items].astype(np.int64), items.astype(np.int64),
                 {k: np.asarray(v, bool) for k, v in outcomes.items()}, {},
                 {"chance": np.asarray(chance, np.float64)},
                 {"empty_region": int((~keep).sum())})


def counterfactual_localisation(pair_maps: Any, top_attribute: Any, changed_region: Any,
                                changed_labels: Any, *,
                                baselines: Mapping[str, Any] | None = None,
                                tolerance: float = DEFAULT_TOLERANCE,
                                attributes: Sequence[str] = ATTRIBUTE_NAMES) -> dict[str, Any]:
    """Does the pair's largest-rising attribute's contribution map peak where the change is?

    Args:
      pair_maps: ``[P, H, W]`` per pair (original, re-render), the contribution map of its
        largest-rising attribute summed over both images (:func:`largest_rising`).
      top_attribute: int ``[P]`` that attribute.
      changed_region: bool ``[P, H, W]`` where the change may alter pixels
        (``reid_jax.synthetic.attribute_region`` of the two renders, dilated by the blur).
      changed_labels: bool ``[P, A]`` the labels the change flipped (a colour change flips the
        old and the new colour).
      baselines: name -> ``[P, H, W]`` attribute-agnostic maps (e.g. Grad-CAM of the distance
        of the re-render to the original).
      tolerance: pixels.
      attributes: the ``A`` attribute names.

    Returns:
      ``summarise`` of the cases with methods ``map`` (peak within the region), ``centre``,
      each baseline, ``attribute`` (the largest-rising attribute is a flipped label) and
      ``chance``; ``overall`` pools the localisable changes only (a gender or age change alters
      the whole person: group ``whole_person``, reported apart).
    """
    cases = counterfactual_localisation_cases(
        pair_maps, top_attribute, changed_region, changed_labels, baselines=baselines,
        tolerance=tolerance, attributes=attributes)
    return {**summarise(cases, attributes, overall_groups=tuple(ATTRIBUTE_GROUPS)),
            "tolerance": float(tolerance)}


# --------------------------------------------------------------------------------------------
# (c) Deletion.


def gaussian_blur(images: Array, sigma: float) -> Array:
    """Separable Gaussian blur of ``[B, H, W, C]`` (edge padding, radius ``ceil(3 sigma)``)."""
    radius = int(np.ceil(3.0 * sigma))
    if radius == 0:
        return images
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k = jnp.asarray(k / k.sum(), jnp.float32)
    x = jnp.pad(images, ((0, 0), (radius, radius), (0, 0), (0, 0)), mode="edge")
    x = sum(k[i] * x[:, i:i + images.shape[1]] for i in range(2 * radius + 1))
    x = jnp.pad(x, ((0, 0), (0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(k[i] * x[:, :, i:i + images.shape[2]] for i in range(2 * radius + 1))


def top_pixels(map_: np.ndarray, count: int) -> np.ndarray:
    """bool ``[H, W]``: the ``count`` pixels of highest value (ties: the earlier in row-major
    order)."""
    flat = np.asarray(map_).ravel()
    order = np.argsort(-flat, kind="stable")[:count]
    out = np.zeros(flat.shape, bool)
    out[order] = True
    return out.reshape(np.shape(map_))


def random_pixels(shape: tuple[int, int], count: int, rng: np.random.Generator) -> np.ndarray:
    """bool ``[H, W]``: ``count`` pixels drawn uniformly without replacement."""
    out = np.zeros(shape[0] * shape[1], bool)
    out[rng.choice(out.size, count, replace=False)] = True
    return out.reshape(shape)


def _blend(images: np.ndarray, blurred: np.ndarray, masks: np.ndarray) -> np.ndarray:
    return np.where(masks[..., None], blurred, images)


def _check_fraction(fraction: float, pixels: int) -> int:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    return max(1, int(round(fraction * pixels)))


def _sigma(height: int, blur: float) -> float:
    if not blur > 0:
        raise ValueError(f"blur must be > 0 (a fraction of the image height), got {blur}")
    return blur * height


def _embed_batches(model: AGW, images: np.ndarray, batch_size: int) -> np.ndarray:
    parts = []
    for lo in range(0, len(images), batch_size):
        chunk = images[lo:lo + batch_size]
        pad = batch_size - len(chunk)  # one compiled shape
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        parts.append(np.asarray(maps_lib.embed(model, chunk))[:batch_size - pad])
    return np.concatenate(parts)


def _image_logits(model: AGW, weights: np.ndarray, images: np.ndarray, logits: Any,
                  batch_size: int) -> np.ndarray:
    """float32 ``[B, A]`` ``z = f @ W`` of the images: ``logits`` when given (checked against
    the images and weights), else computed."""
    if logits is None:
        return _embed_batches(model, images, batch_size) @ weights
    z = np.asarray(logits, np.float32)
    if z.shape != (len(images), weights.shape[1]):
        raise ValueError(f"logits must have shape {(len(images), weights.shape[1])} (one row "
                         f"of attribute logits per image), got {z.shape}")
    return z


def deletion_evidence_cases(model: AGW, weights: Any, images: Any, maps: Any, *,
                            logits: Any = None, fraction: float = DEFAULT_FRACTION,
                            blur: float = DEFAULT_BLUR, threshold: float = DEFAULT_THRESHOLD,
                            seed: int = 0, batch_size: int = 32,
                            attributes: Sequence[str] = ATTRIBUTE_NAMES) -> Cases:
    """Per-case deletion test of evidence maps (see :func:`deletion_evidence`)."""
    images = _as_array("images", images, 4, "[B, H, W, 3] model-input images").astype(
        np.float32)
    maps = _as_maps("maps", maps, 4, "[B, A, H, W] evidence maps")
    weights = _as_array("weights", weights, 2, "[N, A]").astype(np.float32)
    b, h, w, _ = images.shape
    if maps.shape != (b, weights.shape[1], h, w) or len(attributes) != weights.shape[1]:
        raise ValueError(f"shapes disagree: images {images.shape}, maps {maps.shape}, weights "
                         f"{weights.shape}, {len(attributes)} names (expected [B, H, W, 3], "
                         "[B, A, H, W], [N, A], A names)")
    count = _check_fraction(fraction, h * w)
    blurred = np.asarray(gaussian_blur(jnp.asarray(images), _sigma(h, blur)))
    x = special.expit(_image_logits(model, weights, images, logits, batch_size))
    items, attrs = np.nonzero(x > threshold)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    top = np.stack([top_pixels(maps[i, k], count) for i, k in zip(items, attrs, strict=True)]
                   ) if len(items) else np.zeros((0, h, w), bool)
    rand = np.stack([random_pixels((h, w), count, rng) for _ in items]
                    ) if len(items) else np.zeros((0, h, w), bool)
    x_top = _case_probabilities(model, weights, images, blurred, items, attrs, top, batch_size)
    x_rand = _case_probabilities(model, weights, images, blurred, items, attrs, rand,
                                 batch_size)
    before = x[items, attrs]
    drop_top, drop_rand = before - x_top, before - x_rand
    return Cases(attrs.astype(np.int64), items.astype(np.int64),
                 {"map": drop_top > drop_rand},
                 {"drop_map": drop_top, "drop_random": drop_rand}, {},
                 {"not_present": int((x <= threshold).sum())})


def _case_probabilities(model, weights, images, blurred, items, attrs, masks, batch_size):
    if not len(items):
        return np.zeros(0)
    out = []
    for lo in range(0, len(items), batch_size):
        i, k = items[lo:lo + batch_size], attrs[lo:lo + batch_size]
        changed = _blend(images[i], blurred[i], masks[lo:lo + batch_size])
        f = _embed_batches(model, changed, batch_size)
        out.append(special.expit(np.einsum("bn,nb->b", f, weights[:, k])))
    return np.concatenate(out)


def deletion_evidence(model: AGW, weights: Any, images: Any, maps: Any, *,
                      logits: Any = None, fraction: float = DEFAULT_FRACTION,
                      blur: float = DEFAULT_BLUR, threshold: float = DEFAULT_THRESHOLD,
                      seed: int = 0, batch_size: int = 32,
                      attributes: Sequence[str] = ATTRIBUTE_NAMES) -> dict[str, Any]:
    """Deletion test of evidence maps: for every attribute the model predicts present
    (``x_a > threshold``), blur the ``fraction`` of the image's pixels where its evidence map is
    highest, and as many random pixels; success when ``x_a`` drops more for the map's pixels.

    Args:
      model: the re-id model; weights: ``[N, A]``; images: ``[B, H, W, 3]`` model-input images;
      maps: ``[B, A, H, W]`` their evidence maps (model-input size).
      logits: optional ``[B, A]`` ``z`` of the images as they are (e.g. ``EvidenceMaps.logits``,
        computed beside the maps); None: computed here.
      fraction: share of the pixels blurred.
      blur: Gaussian sigma as a fraction of the image height (the blurred image replaces the
        chosen pixels).
      threshold: probability above which an attribute is a case.
      seed: seeds the random pixels.
      batch_size: images per forward pass.
      attributes: the ``A`` names.

    Returns:
      ``summarise`` of the cases: method ``map`` (success), ``mean_drop_map`` and
      ``mean_drop_random`` (drops of ``x_a``); ``fraction``, ``blur``.
    """
    cases = deletion_evidence_cases(model, weights, images, maps, logits=logits,
                                    fraction=fraction, blur=blur, threshold=threshold,
                                    seed=seed, batch_size=batch_size,
                                    attributes=attributes)
    return {**summarise(cases, attributes), "fraction": float(fraction), "blur": float(blur)}


def deletion_contributions_cases(model: AGW, weights: Any, query_images: Any,
                                 gallery_images: Any, contributions: maps_lib.ContributionMaps,
                                 *, query_index: Any = None, complete: bool = False,
                                 per_pair: int = 1, fraction: float = DEFAULT_FRACTION,
                                 blur: float = DEFAULT_BLUR, seed: int = 0,
                                 batch_size: int = 32,
                                 attributes: Sequence[str] = ATTRIBUTE_NAMES) -> Cases:
    """Per-case deletion test of contribution maps (see :func:`deletion_contributions`)."""
    q_images = np.asarray(query_images, np.float32)
    g_images = np.asarray(gallery_images, np.float32)
    mq, mg = np.asarray(contributions.query), np.asarray(contributions.gallery)
    errors = np.asarray(contributions.errors)
    p, a, h, w = mg.shape
    if g_images.shape != (p, h, w, 3) or mq.shape != mg.shape or q_images.ndim != 4 or \
            q_images.shape[1:] != (h, w, 3) or len(attributes) != a:
        raise ValueError(f"shapes disagree: query_images {q_images.shape}, gallery_images "
                         f"{g_images.shape}, maps {mq.shape} / {mg.shape}, {len(attributes)} "
                         "names (expected [Q, H, W, 3], [P, H, W, 3], [P, A, H, W], A names)")
    if not 1 <= per_pair <= a:
        raise ValueError(f"per_pair must lie in [1, {a}], got {per_pair}")
    index = maps_lib.pair_index("query_index", query_index, len(q_images), p)
    q_images = q_images[index]
    count = _check_fraction(fraction, h * w)
    sigma = _sigma(h, blur)
    q_blur = np.asarray(gaussian_blur(jnp.asarray(q_images), sigma))
    g_blur = np.asarray(gaussian_blur(jnp.asarray(g_images), sigma))
    w_mode = np.asarray(complete_weights(jnp.asarray(weights, jnp.float32)) if complete
                        else np.asarray(weights, np.float32))
    order = np.argsort(-errors, axis=1, kind="stable")[:, :per_pair]
    items = np.repeat(np.arange(p), per_pair)
    attrs = order.ravel()
    positive = errors[items, attrs] > 0
    items, attrs = items[positive], attrs[positive]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 12]))
    results = {}
    for name in ("map", "random"):
        q_new, g_new = [], []
        for i, k in zip(items.tolist(), attrs.tolist(), strict=True):
            if name == "map":
                q_mask, g_mask = top_pixels(mq[i, k], count), top_pixels(mg[i, k], count)
            else:
                q_mask = random_pixels((h, w), count, rng)
                g_mask = random_pixels((h, w), count, rng)
            q_new.append(_blend(q_images[i], q_blur[i], q_mask))
            g_new.append(_blend(g_images[i], g_blur[i], g_mask))
        if not items.size:
            results[name] = np.zeros(0)
            continue
        fq = _embed_batches(model, np.stack(q_new), batch_size)
        fg = _embed_batches(model, np.stack(g_new), batch_size)
        results[name] = np.einsum("bn,nb->b", np.square(fq - fg), w_mode[:, attrs])
    before = errors[items, attrs]
    drop_map, drop_rand = before - results["map"], before - results["random"]
    return Cases(attrs.astype(np.int64), items.astype(np.int64), {"map": drop_map > drop_rand},
                 {"drop_map": drop_map, "drop_random": drop_rand}, {},
                 {"not_positive": int((~positive).sum())})


def deletion_contributions(model: AGW, weights: Any, query_images: Any, gallery_images: Any,
                           contributions: maps_lib.ContributionMaps, *, query_index: Any = None,
                           complete: bool = False, per_pair: int = 1,
                           fraction: float = DEFAULT_FRACTION, blur: float = DEFAULT_BLUR,
                           seed: int = 0, batch_size: int = 32,
                           attributes: Sequence[str] = ATTRIBUTE_NAMES) -> dict[str, Any]:
    """Deletion test of contribution maps: for each pair's ``per_pair`` largest positive
    ``e_a``, blur the ``fraction`` of each image's pixels where its map is highest, and as many
    random pixels in each; success when ``e_a`` drops more for the maps' pixels.

    ``contributions`` must come from :func:`reid_jax.explain.maps.contribution_maps` with the
    same images, ``query_index`` and ``complete``. Other arguments as
    :func:`deletion_evidence`. Returns ``summarise`` of the cases (``map``,
    ``mean_drop_map``, ``mean_drop_random``) with ``fraction``, ``blur``, ``complete``.
    """
    cases = deletion_contributions_cases(
        model, weights, query_images, gallery_images, contributions, query_index=query_index,
        complete=complete, per_pair=per_pair, fraction=fraction, blur=blur, seed=seed,
        batch_size=batch_size, attributes=attributes)
    return {**summarise(cases, attributes), "fraction": float(fraction), "blur": float(blur),
            "complete": bool(complete)}


# --------------------------------------------------------------------------------------------
# (d) Completeness.


def completeness_errors(contributions: maps_lib.ContributionMaps) -> np.ndarray:
    """float64 ``[P]``: per pair, ``max_a |sum(query map) + sum(gallery map) - e_a|`` relative to
    ``sum_a |e_a|`` (NaN for a pair whose ``e`` are all 0, e.g. identical images)."""
    mq = np.asarray(contributions.query, np.float64).sum(axis=(2, 3))
    mg = np.asarray(contributions.gallery, np.float64).sum(axis=(2, 3))
    e = np.asarray(contributions.errors, np.float64)
    scale = np.abs(e).sum(axis=1)
    err = np.abs(mq + mg - e).max(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, err / scale, np.nan)


def completeness(contributions: maps_lib.ContributionMaps | Sequence[np.ndarray]
                 ) -> dict[str, Any]:
    """Completeness error of contribution maps: ``{"pairs", "max", "mean", "zero_pairs"}``
    over :func:`completeness_errors` (or over given per-pair errors, e.g. concatenated from
    batches); pairs whose ``e`` are all 0 are counted in ``zero_pairs`` only."""
    errors = (completeness_errors(contributions)
              if isinstance(contributions, maps_lib.ContributionMaps)
              else np.concatenate([np.atleast_1d(np.asarray(c, np.float64))
                                   for c in contributions]))
    ok = np.isfinite(errors)
    return {"pairs": int(ok.sum()), "zero_pairs": int((~ok).sum()),
            "max": float(errors[ok].max()) if ok.any() else None,
            "mean": float(errors[ok].mean()) if ok.any() else None}


__all__ = [
    "ATTRIBUTE_KINDS",
    "DEFAULT_BLUR",
    "DEFAULT_FRACTION",
    "DEFAULT_MIN_PART_PIXELS",
    "DEFAULT_THRESHOLD",
    "DEFAULT_TOLERANCE",
    "GROUPS",
    "WHOLE_PERSON",
    "Cases",
    "completeness",
    "completeness_errors",
    "concatenate",
    "counterfactual_localisation",
    "counterfactual_localisation_cases",
    "deletion_contributions",
    "deletion_contributions_cases",
    "deletion_evidence",
    "deletion_evidence_cases",
    "dilate",
    "gaussian_blur",
    "largest_rising",
    "near",
    "occlusion_agreement_cases",
    "part_occlusion_maps",
    "part_occlusion_points",
    "peak",
    "pointing_game",
    "pointing_game_cases",
    "random_pixels",
    "select",
    "summarise",
    "summarise_pointing",
    "top_part_regions",
    "top_pixels",
]
