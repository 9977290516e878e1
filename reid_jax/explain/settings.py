"""Explanation settings: the ``config.explain`` section, its defaults, and their validation.

The settings of an explanation run live in the ml_collections config, beside the model's (as
big_vision keeps its evaluators there): ``config.explain`` holds what ``tools/explain.py`` and
``tools/evaluate_explanations.py`` need. A tool's flags override single fields
(``--k=5``; or ``--config.explain.k=5`` when ``--config`` is given); a checkpoint's stored config
supplies them otherwise, and fields it lacks take the defaults of :func:`default_config`.

:func:`explain_settings` is the one place where the section is read and validated, and
:func:`parse_threshold` the one place where a threshold (text, number or one per attribute) is
turned into what the kernels take and checked against their range
(``docs/design.md``, "Confident attributes").

The file names of an explanation output folder are here too, so the tools that write and read
such a folder agree on them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from reid_jax import config_sections
from reid_jax.data.attributes import ATTRIBUTE_NAMES, NUM_ATTRIBUTES
from reid_jax.explain import kernels

# What an explanation run shows beside the matching scores: the paper's signed eq. 3.2, the
# complete decomposition that sums to the squared distance, the projection onto the attribute
# directions with its remainder, or the probability that the labels differ (docs/design.md,
# "Two error compositions", "The attribute projection", "Explanations that beat the prior").
MODES = kernels.MODES
# Query order of the JSONL and the report: file names, or lowest average precision first.
ORDERS = ("query", "worst_ap")
DEFAULT_ERROR_RANKS = (1, 3, 10)

# The files of an explanation output folder.
JSONL_NAME = "explanations.jsonl"
SUMMARY_NAME = "summary.json"
REPORT_NAME = "report"
METRICS_NAME = "explanation_metrics.json"
METRICS_MARKDOWN_NAME = "explanation_metrics.md"
EMBEDDINGS_NAME = "embeddings"


def default_config() -> ml_collections.ConfigDict:
    """The ``config.explain`` section with its defaults (every field documented here).

    * ``k`` (10): ranks explained per query.
    * ``threshold`` (0.4): ``t_a`` of the confident query attributes, ``|x_a - 0.5| > t_a``;
      one number or one per attribute (a tuple of 30), each in ``[0, 0.5)``.
    * ``mode`` ("paper"): ``paper`` (eq. 3.2), ``complete`` (the complete decomposition),
      ``projection`` (the distance along the attribute directions, with a remainder) or
      ``disagreement`` (the probability that the labels differ).
    * ``order`` ("query"): ``query`` (file names) or ``worst_ap`` (lowest AP first).
    * ``error_ranks`` ((1, 3, 10)): ranks whose error composition the report draws (those
      ``<= k``).
    * ``report_queries`` (50): queries drawn in the report (-1: all; the JSONL has all).
    * ``query_chunk`` (256): queries per call of the explanation kernels (memory bound).
    * ``gallery_chunk`` (1024): gallery rows per streamed block of the kernels.
    * ``rank_chunk`` (128): queries per block of the AP / CMC ranking pass.
    * ``num_counterfactuals`` (900), ``min_changed_pixels`` (64), ``pixel_tolerance`` (25),
      ``seed`` (0): the counterfactual benchmark of ``tools/evaluate_explanations.py``
      (``seed`` also seeds its bootstrap).
    * ``bootstrap_samples`` (1000): replicates of the bootstrap behind the 95 % intervals of
      ``tools/evaluate_explanations.py`` (``reid_jax.explain.bootstrap``).
    * ``attribute_maps`` (False): ``tools/explain.py`` writes evidence and contribution maps of
      the explained queries (``maps/<query stem>.npz``; needs a checkpoint and mode ``paper``
      or ``complete``; docs/attribute_maps.md, 'Outputs').
    * ``map_queries`` (-1): maps for the first this many queries of the run's order (-1: all
      explained queries; the report's first page holds ``reid_jax.explain.report.PAGE_SIZE``).
    * ``map_method`` ("deeplift"): how the maps are computed ("deeplift": one backward pass,
      exact; "integrated_gradients": ``map_steps`` nodes; docs/attribute_maps.md, 'The map
      method').
    * ``map_steps`` (32): quadrature nodes of the maps' path integral (integrated gradients).
    * ``map_layer`` (2): the stage whose output the maps are taken at (1..4; 4: the last
      feature map; docs/attribute_maps.md, 'Layer').
    * ``map_reference_images`` (64): the maps' baseline is the mean feature map of this many
      gallery images, evenly spaced in file order (0: at zeros; docs/attribute_maps.md,
      'Baseline').
    * ``measure_maps`` (True): ``tools/evaluate_explanations.py`` measures the maps against
      the part masks (synthetic data roots; docs/attribute_maps.md, 'Measurements').
    * ``map_images`` (48): cap on the images of each map measurement (query images of the
      pointing game and deletion, counterfactual pairs of the localisation), so it stays
      affordable.
    """
    c = ml_collections.ConfigDict()
    c.k = 10
    c.threshold = kernels.DEFAULT_THRESHOLD
    c.mode = "paper"
    c.order = "query"
    c.error_ranks = DEFAULT_ERROR_RANKS
    c.report_queries = 50
    c.query_chunk = 256
    c.gallery_chunk = 1024
    c.rank_chunk = 128
    c.num_counterfactuals = 900
    c.min_changed_pixels = 64
    c.pixel_tolerance = 25
    c.seed = 0
    c.bootstrap_samples = 1000
    c.attribute_maps = False
    c.map_queries = -1
    c.map_method = "deeplift"
    c.map_steps = 32
    c.map_layer = 2
    c.map_reference_images = 64
    c.measure_maps = True
    c.map_images = 48
    return c


@dataclasses.dataclass(frozen=True)
class ExplainSettings:
    """The validated ``config.explain`` section (fields as in :func:`default_config`).

    ``threshold`` is a float or a float64 ``[A]`` array; ``error_ranks`` the sorted ranks
    ``<= k``; ``report_queries`` ``None`` for all.
    """

    k: int
    threshold: float | np.ndarray
    mode: str
    order: str
    error_ranks: tuple[int, ...]
    report_queries: int | None
    query_chunk: int
    gallery_chunk: int
    rank_chunk: int
    num_counterfactuals: int
    min_changed_pixels: int
    pixel_tolerance: int
    seed: int
    bootstrap_samples: int = 1000
    attribute_maps: bool = False
    map_queries: int | None = None
    map_method: str = "deeplift"
    map_steps: int = 32
    map_layer: int = 2
    map_reference_images: int = 64
    measure_maps: bool = True
    map_images: int = 48

    def threshold_json(self) -> float | list[float]:
        """The threshold as JSON (a number, or one per attribute)."""
        return threshold_json(self.threshold)


def threshold_json(threshold: float | np.ndarray) -> float | list[float]:
    """A parsed threshold as JSON: a number, or a list of one number per attribute."""
    t = np.asarray(threshold, np.float64)
    return float(t) if t.ndim == 0 else [float(v) for v in t]


def parse_threshold(value: Any, num_attributes: int = NUM_ATTRIBUTES) -> float | np.ndarray:
    """A threshold as the kernels take it: a float, or float64 ``[A]`` (one per attribute).

    Accepts a number, a sequence of ``A`` numbers, or text: ``"0.4"`` or ``A`` comma-separated
    numbers (a flag's value). The range is the kernels' own check
    (:func:`reid_jax.explain.kernels.check_threshold`): every value in ``[0, 0.5)``.

    Raises:
      ValueError: not numbers, a count other than 1 or ``A``, or a value out of range.
    """
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"threshold must be a number or {num_attributes} comma-separated "
                             f"numbers, got {value!r}") from None
        value = numbers[0] if len(numbers) == 1 else numbers
    try:
        t = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number or {num_attributes} numbers, got "
                         f"{value!r}") from None
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, num_attributes)):
        names = ", ".join(ATTRIBUTE_NAMES) if num_attributes == NUM_ATTRIBUTES else ""
        raise ValueError(f"threshold has {t.size} values; give one, or one per attribute "
                         f"({num_attributes}{': ' + names if names else ''})")
    if t.ndim == 1 and t.shape[0] == 1:
        t = t[0]
    kernels.check_threshold(t, num_attributes)
    return float(t) if t.ndim == 0 else t


def _int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"config.explain.{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"config.explain.{name} must be at most {maximum}, got {value!r}")
    return int(value)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"config.explain.{name} must be >= 0 (an integer), got {value!r}")
    return int(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"config.explain.{name} must be True or False, got {value!r}")
    return bool(value)


def _all_or_count(name: str, value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < -1:
        raise ValueError(f"config.explain.{name} must be >= 0, or -1 for all, got {value!r}")
    return None if value == -1 else int(value)


def _map_layer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= 4:
        raise ValueError(f"config.explain.map_layer must be a stage 1..4 (4: the last feature "
                         f"map), got {value!r}")
    return int(value)


# How the attribute maps are computed (as reid_jax.explain.maps.MAP_METHODS, which imports
# the model; the settings stay light).
MAP_METHODS = ("integrated_gradients", "deeplift")
# Quadrature nodes at most (as reid_jax.explain.maps.MAX_STEPS).
MAX_MAP_STEPS = 1024


def _map_method(value: Any) -> str:
    if value not in MAP_METHODS:
        raise ValueError(f"config.explain.map_method must be one of {MAP_METHODS}, got "
                         f"{value!r}")
    return value


def explain_settings(config: Any = None, **overrides: Any) -> ExplainSettings:
    """The validated settings of ``config.explain``, with ``overrides`` (flags) applied.

    Args:
      config: a config with an ``explain`` section (or without: defaults), e.g. the
        checkpoint's stored config; ``None``: the defaults.
      **overrides: field values that replace the config's; ``None`` means "not given".

    Raises:
      ValueError: an unknown field (with the nearest valid names) or a bad value, named.
    """
    values = config_sections.section_values(config, "explain", default_config(), overrides)
    k = _int("k", values["k"], 1)
    if values["mode"] not in MODES:
        raise ValueError(f"config.explain.mode must be one of {MODES}, got {values['mode']!r}")
    if values["order"] not in ORDERS:
        raise ValueError(f"config.explain.order must be one of {ORDERS}, got "
                         f"{values['order']!r}")
    ranks = values["error_ranks"]
    ranks = [] if ranks is None else ([ranks] if isinstance(ranks, (int, np.integer)) else ranks)
    try:
        ranks = sorted({int(r) for r in ranks})
    except (TypeError, ValueError):
        raise ValueError(f"config.explain.error_ranks must be ranks (integers), got "
                         f"{values['error_ranks']!r}") from None
    if any(r < 1 for r in ranks):
        raise ValueError(f"config.explain.error_ranks must be >= 1, got {ranks}")
    explicit = "error_ranks" in {k for k, v in overrides.items() if v is not None}
    if explicit and any(r > k for r in ranks):
        raise ValueError(f"error_ranks must lie in [1, k={k}], got {[r for r in ranks if r > k]}")
    report_queries = values["report_queries"]
    if isinstance(report_queries, bool) or not isinstance(report_queries, (int, np.integer)) \
            or report_queries < -1:
        raise ValueError(f"config.explain.report_queries must be >= 0, or -1 for all, got "
                         f"{report_queries!r}")
    try:
        threshold = parse_threshold(values["threshold"])
    except ValueError as e:
        raise ValueError(f"config.explain.threshold: {e}") from None
    if not 0 <= int(values["pixel_tolerance"]) < 255:
        raise ValueError(f"config.explain.pixel_tolerance must lie in [0, 255), got "
                         f"{values['pixel_tolerance']!r}")
    return ExplainSettings(
        k=k, threshold=threshold, mode=values["mode"], order=values["order"],
        error_ranks=tuple(r for r in ranks if r <= k),
        report_queries=None if report_queries == -1 else int(report_queries),
        query_chunk=_int("query_chunk", values["query_chunk"], 1),
        gallery_chunk=_int("gallery_chunk", values["gallery_chunk"], 1),
        rank_chunk=_int("rank_chunk", values["rank_chunk"], 1),
        num_counterfactuals=_count("num_counterfactuals", values["num_counterfactuals"]),
        min_changed_pixels=_count("min_changed_pixels", values["min_changed_pixels"]),
        pixel_tolerance=int(values["pixel_tolerance"]),
        seed=_count("seed", values["seed"]),
        bootstrap_samples=_int("bootstrap_samples", values["bootstrap_samples"], 1),
        attribute_maps=_bool("attribute_maps", values["attribute_maps"]),
        map_queries=_all_or_count("map_queries", values["map_queries"]),
        map_method=_map_method(values["map_method"]),
        map_steps=_int("map_steps", values["map_steps"], 1, MAX_MAP_STEPS),
        map_layer=_map_layer(values["map_layer"]),
        map_reference_images=_count("map_reference_images", values["map_reference_images"]),
        measure_maps=_bool("measure_maps", values["measure_maps"]),
        map_images=_int("map_images", values["map_images"], 1))


__all__ = [
    "DEFAULT_ERROR_RANKS", "EMBEDDINGS_NAME", "JSONL_NAME", "METRICS_MARKDOWN_NAME",
    "METRICS_NAME", "MODES", "ORDERS", "REPORT_NAME", "SUMMARY_NAME", "ExplainSettings",
    "default_config", "explain_settings", "parse_threshold", "threshold_json",
]
