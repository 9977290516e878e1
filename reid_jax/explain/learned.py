"""Which attributes the model has learned: the attribute head's balanced accuracy per attribute
on the labelled test images (``tools/train_attributes.py`` stores it with the head,
``reid_jax.checkpoints.restore_head_accuracy``), the threshold above which an attribute counts
as learned, and the caution the report and the explorer show for the others.

A map, a matching score or a require-filter of an attribute the head reads near chance says
nothing about that attribute: the embedding does not hold it, so no faithful map can point at
it (docs/attribute_maps.md, 'Attributes the model has not learned').
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from reid_jax.data.attributes import ATTRIBUTE_MEANINGS, ATTRIBUTE_NAMES
from reid_jax.models import attribute_head

# An attribute counts as learned when the head tells it apart on the labelled test images at
# least this well (balanced accuracy: the mean of the true-positive and true-negative rates).
LEARNED_ACCURACY = 0.8

LEARNED, NOT_LEARNED, NOT_MEASURED = "learned", "not learned", "not measured"


def check_accuracy(accuracy: Mapping[str, Any] | None,
                   names: Sequence[str] = ATTRIBUTE_NAMES) -> dict[str, float | None] | None:
    """``accuracy`` as ``{name: float in [0, 1] or None}`` over exactly ``names`` (None: not
    measured), or None when not given (``models.attribute_head.check_accuracy``).

    Raises:
      ValueError: names missing or unknown, or a value that is not a number in [0, 1] / None.
    """
    if accuracy is None:
        return None
    return attribute_head.check_accuracy(accuracy, "head accuracy", names)


def _check_threshold(min_accuracy: float) -> float:
    if not 0.0 <= float(min_accuracy) <= 1.0:
        raise ValueError(f"min_accuracy must lie in [0, 1], got {min_accuracy}")
    return float(min_accuracy)


def status(accuracy: float | None, min_accuracy: float = LEARNED_ACCURACY) -> str:
    """``LEARNED``, ``NOT_LEARNED`` or ``NOT_MEASURED`` (None: one class in the test images)."""
    min_accuracy = _check_threshold(min_accuracy)
    if accuracy is None:
        return NOT_MEASURED
    return LEARNED if accuracy >= min_accuracy else NOT_LEARNED


def caution(name: str, accuracy: float | None,
            min_accuracy: float = LEARNED_ACCURACY) -> str | None:
    """What a user should know before reading ``name``'s map or scores; None when learned."""
    kind = status(accuracy, min_accuracy)
    meaning = ATTRIBUTE_MEANINGS.get(name, name)
    if kind == LEARNED:
        return None
    if kind == NOT_MEASURED:
        return (f"How well the model reads {name} ({meaning}) is not known: the labelled test "
                "images show one class only. Read its map and scores with care.")
    return (f"The model has not learned {name} ({meaning}): its head tells it apart at "
            f"{100 * accuracy:.0f} % balanced accuracy on the labelled test images (50 % is "
            f"chance, {100 * min_accuracy:.0f} % counts as learned). Its map cannot show where "
            "the attribute is, and its scores say little about it.")


def summary(accuracy: Mapping[str, Any] | None, names: Sequence[str] = ATTRIBUTE_NAMES,
            min_accuracy: float = LEARNED_ACCURACY) -> dict[str, Any] | None:
    """JSON-ready ``{"min_accuracy", "accuracy": {name: value | None}, "not_learned": [...],
    "not_measured": [...]}`` (the run's ``summary.json``), or None without accuracy."""
    checked = check_accuracy(accuracy, names)
    if checked is None:
        return None
    min_accuracy = _check_threshold(min_accuracy)
    kinds = {n: status(v, min_accuracy) for n, v in checked.items()}
    return {"min_accuracy": min_accuracy,
            "accuracy": dict(checked),
            "not_learned": [n for n in names if kinds[n] == NOT_LEARNED],
            "not_measured": [n for n in names if kinds[n] == NOT_MEASURED]}


def cautions(head: Mapping[str, Any] | None) -> dict[str, str]:
    """``{name: caution}`` for the attributes of a :func:`summary` that are not learned or
    not measured (empty without a summary)."""
    if not head:
        return {}
    out = {}
    for name, value in head["accuracy"].items():
        text = caution(name, value, head["min_accuracy"])
        if text is not None:
            out[name] = text
    return out


__all__ = ["LEARNED", "LEARNED_ACCURACY", "NOT_LEARNED", "NOT_MEASURED", "caution", "cautions",
           "check_accuracy", "status", "summary"]
