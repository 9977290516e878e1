"""Request parameters to values: every bad one is a :class:`BadParameter` naming it (a 400).

Parameters come from the query string only; a name the endpoint does not know, or one given
twice, is an error too (a typo such as ``treshold`` must not be silently ignored). File names in
parameters are looked up among the scanned images, never joined to a path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from reid_jax.explain import settings, steering
from reid_jax.explorer.rankings import Explorer, QueryRef

QUERY_KEYS = ("query", "file", "upload")
RANK_KEYS = ("k", "threshold", "mode")
STEERING_KEYS = ("ignore", "require", "forbid")
_UPLOAD_ID = re.compile(r"^[0-9a-f]{16}$")


class BadParameter(ValueError):
    """A request parameter that cannot be used: ``name`` and a message for the user."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name
        self.message = message


def check_names(params: Any, allowed: Sequence[str]) -> dict[str, str]:
    """The parameters as a dict; :class:`BadParameter` for an unknown or repeated name.

    ``params``: Starlette's ``request.query_params`` (a multi-dict) or a plain mapping.
    """
    items = params.multi_items() if hasattr(params, "multi_items") else list(params.items())
    seen: dict[str, str] = {}
    for name, value in items:
        if name not in allowed:
            raise BadParameter(name, f"unknown parameter {name!r}; this endpoint takes "
                                     f"{', '.join(allowed) if allowed else 'none'}")
        if name in seen:
            raise BadParameter(name, f"parameter {name!r} is given more than once")
        seen[name] = value
    return seen


def integer(params: Mapping[str, str], name: str, default: int | None, lo: int, hi: int) -> int:
    """An integer in ``[lo, hi]``."""
    if name not in params:
        if default is None:
            raise BadParameter(name, f"parameter {name!r} is required")
        return default
    text = params[name].strip()
    if not re.fullmatch(r"[+-]?\d{1,12}", text):
        raise BadParameter(name, f"{name} must be an integer, got {params[name]!r}")
    value = int(text)
    if not lo <= value <= hi:
        raise BadParameter(name, f"{name} must lie in [{lo}, {hi}], got {value}")
    return value


def query(params: Mapping[str, str], explorer: Explorer, *, required: bool = True
          ) -> QueryRef | None:
    """``query`` (index in the query split), ``file`` (a query file name) or ``upload`` (an
    upload id): exactly one of them."""
    given = [key for key in QUERY_KEYS if key in params]
    if len(given) > 1:
        raise BadParameter(given[1], f"give one of {', '.join(QUERY_KEYS)}, not "
                                     f"{' and '.join(given)}")
    if not given:
        if required:
            raise BadParameter("query", "give the query: query=<index in the query split>, "
                                        "file=<query file name> or upload=<upload id>")
        return None
    key = given[0]
    if key == "query":
        n = len(explorer.queries_split)
        return QueryRef("query", integer(params, "query", None, 0, n - 1))
    if key == "file":
        name = params["file"]
        try:
            return QueryRef("query", explorer.find_query(name))
        except KeyError:
            raise BadParameter("file", f"no query image is named {name!r} (give the base name "
                                       "of a file in the query folder)") from None
    upload_id = params["upload"]
    if not _UPLOAD_ID.fullmatch(upload_id):
        raise BadParameter("upload", f"upload must be the 16-character id a POST returned, got "
                                     f"{upload_id!r}")
    return QueryRef("upload", upload_id)


def rank_settings(params: Mapping[str, str], explorer: Explorer) -> dict[str, Any]:
    """``k``, ``threshold`` (one number, or one per attribute, comma-separated) and ``mode``
    (one of ``explain.settings.MODES``); the run's ``config.explain`` where not given."""
    s = explorer.settings
    k = integer(params, "k", min(s.k, explorer.max_k), 1, explorer.max_k)
    threshold = s.threshold
    if "threshold" in params:
        try:
            threshold = settings.parse_threshold(params["threshold"])
        except ValueError as e:
            raise BadParameter("threshold", f"threshold: {e}") from None
    mode = params.get("mode", s.mode)
    if mode not in settings.MODES:
        raise BadParameter("mode", f"mode must be one of {', '.join(settings.MODES)}, got "
                                   f"{mode!r}")
    return {"k": k, "threshold": threshold, "mode": mode}


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def steer(params: Mapping[str, str]) -> steering.Steering:
    """``ignore``, ``require``, ``forbid``: comma-separated attribute names."""
    lists = {key: _names(params.get(key, "")) for key in STEERING_KEYS}
    for key in STEERING_KEYS:
        try:
            steering.parse_steering(**{key: lists[key]})
        except ValueError as e:
            raise BadParameter(key, str(e)) from None
    try:
        return steering.parse_steering(**lists)
    except ValueError as e:
        raise BadParameter("forbid", str(e)) from None


def choice(params: Mapping[str, str], name: str, options: Iterable[str], default: str) -> str:
    options = tuple(options)
    value = params.get(name, default)
    if value not in options:
        raise BadParameter(name, f"{name} must be one of {', '.join(options)}, got {value!r}")
    return value


__all__ = ["QUERY_KEYS", "RANK_KEYS", "STEERING_KEYS", "BadParameter", "check_names",
           "choice", "integer", "query", "rank_settings", "steer"]
