"""Attribute explanations of re-id rankings: the kernels, and the layer that runs them on data.

``from reid_jax import explain`` gives the jitted kernels (:mod:`reid_jax.explain.kernels`):
:func:`explain_rankings`, :func:`attribute_errors`, :func:`matching_scores`,
:func:`projection_contributions`, :func:`disagreement_probabilities`,
:func:`confident_attributes`, :func:`check_finite`, :data:`MODES` and :data:`DEFAULT_THRESHOLD`,
and :class:`Calibration` (the head's calibrated probabilities, read by the ``disagreement`` mode).

The modules of the package, from the bottom up:

* ``kernels`` — the paper's section 3 as pure, jitted functions of arrays;
* ``steering`` — rankings steered by attributes: a direction projected out, a filter;
* ``metrics`` — how good an explanation is (counterfactual hit rate, AUROC, AMD metrics);
* ``run`` — a batch run over a dataset: ranking, explanations, JSONL records;
* ``report`` — the HTML report of a batch run;
* ``quality`` — the measurement run behind ``tools/evaluate_explanations.py``.

``docs/design.md`` in the repository gives every choice these modules depend on.
"""

from reid_jax.explain.kernels import (
    DEFAULT_THRESHOLD,
    ERROR_MODES,
    METHODS,
    MODES,
    RankingExplanation,
    attribute_errors,
    check_finite,
    check_threshold,
    complete_weights,
    confident_attributes,
    default_mesh,
    disagreement_probabilities,
    explain_rankings,
    matching_scores,
    projection_contributions,
    projection_weights,
    recompute_ratio,
    resolve_mode,
)
from reid_jax.models.attribute_head import Calibration

__all__ = [
    "Calibration",
    "DEFAULT_THRESHOLD",
    "ERROR_MODES",
    "METHODS",
    "MODES",
    "RankingExplanation",
    "attribute_errors",
    "check_finite",
    "check_threshold",
    "complete_weights",
    "confident_attributes",
    "default_mesh",
    "disagreement_probabilities",
    "explain_rankings",
    "matching_scores",
    "projection_contributions",
    "projection_weights",
    "recompute_ratio",
    "resolve_mode",
]
