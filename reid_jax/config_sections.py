"""Sections of an ml_collections config: defaults, overrides, and unknown fields named.

Settings live in the config (``config.explain``, ``config.attributes``; ``docs/design.md``,
"Settings live in the config"). :func:`section_values` reads one section the way every part of
the project does: the library's defaults, then the config's section (a checkpoint's stored
config may lack it, or lack newer fields), then the flags that override single fields. A field
that does not exist is an error that names it and the nearest valid names (:func:`nearest`),
so a typo never passes silently.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections


def nearest(name: str, known: Sequence[str], n: int = 3) -> list[str]:
    """The valid names a typo most likely meant: close spellings (``difflib``), and names the
    typo abbreviates (same first letter, its letters in order: ``lr`` -> ``learning_rate``)."""
    close = difflib.get_close_matches(name, list(known), n=n, cutoff=0.5)

    def abbreviates(full: str) -> bool:
        if not name or not full or name[0] != full[0]:
            return False
        rest = iter(full)
        return all(ch in rest for ch in name)

    short = [k for k in known if k not in close and abbreviates(k)]
    return (close + sorted(short, key=len))[:n]


def unknown_field_message(where: str, name: str, known: Sequence[str]) -> str:
    """``where has no field 'name'; did you mean where.x? (its fields: ...)``."""
    near = nearest(name, known)
    hint = f"; did you mean {', '.join(f'{where}.{k}' for k in near)}?" if near else ""
    return f"{where} has no field {name!r}{hint} (its fields: {', '.join(sorted(known))})"


def section_values(config: Any, section: str, defaults: ml_collections.ConfigDict,
                   overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``defaults`` updated by ``config.<section>`` and by ``overrides`` (``None`` values: not
    given), as a plain dict.

    Raises:
      ValueError: a field of the section or of ``overrides`` that ``defaults`` lacks.
    """
    values = defaults.to_dict()
    stored = config.get(section) if config is not None and hasattr(config, "get") else None
    if isinstance(stored, ml_collections.ConfigDict):
        stored = stored.to_dict()
    elif stored is not None and not isinstance(stored, Mapping):
        raise ValueError(f"config.{section} must be a section of fields, got "
                         f"{type(stored).__name__}")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for source in (dict(stored or {}), given):
        for name, value in source.items():
            if name not in values:
                raise ValueError(unknown_field_message(f"config.{section}", name, list(values)))
            values[name] = value
    return values


__all__ = ["nearest", "section_values", "unknown_field_message"]
