"""Part masks of synthetic images: where each region of the person is, and so each attribute.

The generator writes, beside every image ``<root>/<split folder>/<stem>.jpg``, a region label
image ``<root>/masks/<split folder>/<stem>.png`` (uint8, the image's size, pixel = index into
the region names) and once ``<root>/masks/regions.json``::

    {"format": "reid_jax.part_masks", "version": 1,
     "regions": {"0": "background", "1": "head", ...},
     "attributes": {"backpack": ["backpack"], "upblack": ["upper_body"], "gender": [], ...},
     "groups": {"headwear": ["hat", "hair"], ...}}

``attributes`` names, for each of the 30 attributes, the regions whose pixels show it; gender
and the age groups show in the whole person and name none (not localisable). A real
Market-1501 folder has no ``masks/``: :func:`read_part_mask` then returns None and everything
that uses masks must do without. See docs/attribute_maps.md, 'Part masks'.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from reid_jax.data.attributes import ATTRIBUTE_NAMES
from reid_jax.synthetic.person import DOWN_COLOURS, REGIONS, UP_COLOURS

MASKS_FOLDER = "masks"
REGIONS_FILE = "regions.json"
MASKS_FORMAT = "reid_jax.part_masks"
MASKS_VERSION = 1

# The regions whose pixels show each attribute when it is present (docs/attribute_maps.md,
# 'Which regions show an attribute'). Short sleeves show in the sleeves (upper body) and the
# bare arms, short lower clothing and pants vs dress in the lower clothing and the legs.
ATTRIBUTE_REGIONS: dict[str, tuple[str, ...]] = {
    "backpack": ("backpack",), "bag": ("bag",), "handbag": ("handbag",),
    "clothes": ("lower_body", "legs"), "down": ("lower_body", "legs"),
    "up": ("upper_body", "arms"), "hair": ("hair",), "hat": ("hat",), "gender": (),
    **{f"up{c}": ("upper_body",) for c in UP_COLOURS},
    **{f"down{c}": ("lower_body",) for c in DOWN_COLOURS},
    **{f"age{k}": () for k in range(1, 5)},
}

# Attribute groups the map measurements report on (only localisable attributes).
ATTRIBUTE_GROUPS: dict[str, tuple[str, ...]] = {
    "headwear": ("hat", "hair"),
    "bags": ("backpack", "bag", "handbag"),
    "upper_body": ("up", *(f"up{c}" for c in UP_COLOURS)),
    "lower_body": ("clothes", "down", *(f"down{c}" for c in DOWN_COLOURS)),
}


class PartMask(NamedTuple):
    """The part mask of one image.

    Attributes:
      labels: uint8 ``[H, W]`` region index per pixel.
      regions: the region names, index -> name.
      attributes: attribute name -> the region names that show it.
    """

    labels: np.ndarray
    regions: tuple[str, ...]
    attributes: dict[str, tuple[str, ...]]


def attribute_group(name: str) -> str | None:
    """The group (``ATTRIBUTE_GROUPS`` key) of an attribute, None for gender and age."""
    for group, names in ATTRIBUTE_GROUPS.items():
        if name in names:
            return group
    return None


def regions_document() -> dict[str, Any]:
    """The contents of ``masks/regions.json`` for this renderer."""
    return {"format": MASKS_FORMAT, "version": MASKS_VERSION,
            "regions": {str(i): name for i, name in enumerate(REGIONS)},
            "attributes": {a: list(ATTRIBUTE_REGIONS[a]) for a in ATTRIBUTE_NAMES},
            "groups": {g: list(names) for g, names in ATTRIBUTE_GROUPS.items()}}


def mask_path(image_path: str | os.PathLike) -> str:
    """``<root>/masks/<split folder>/<stem>.png`` of ``<root>/<split folder>/<stem>.<ext>``."""
    image_path = os.path.abspath(os.fspath(image_path))
    split_dir, name = os.path.split(image_path)
    root, split = os.path.split(split_dir)
    return os.path.join(root, MASKS_FOLDER, split, os.path.splitext(name)[0] + ".png")


def regions_path(image_path: str | os.PathLike) -> str:
    """``<root>/masks/regions.json`` of an image ``<root>/<split folder>/<file>``."""
    image_path = os.path.abspath(os.fspath(image_path))
    return os.path.join(os.path.dirname(os.path.dirname(image_path)), MASKS_FOLDER,
                        REGIONS_FILE)


def encode_png(labels: np.ndarray) -> bytes:
    """uint8 ``[H, W]`` labels -> PNG bytes (8-bit grey, deterministic)."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"labels must be uint8 [H, W], got {labels.dtype}{list(labels.shape)}")
    buf = io.BytesIO()
    Image.fromarray(labels, "L").save(buf, format="PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=8)
def _read_regions_cached(path: str, mtime_ns: int, size: int
                         ) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} cannot be read: {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a {MASKS_FORMAT} file (a JSON object), got "
                         f"{type(doc).__name__}")
    if doc.get("format") != MASKS_FORMAT or doc.get("version") != MASKS_VERSION:
        raise ValueError(f"{path}: not a {MASKS_FORMAT} v{MASKS_VERSION} file (format "
                         f"{doc.get('format')!r}, version {doc.get('version')!r})")
    index = doc.get("regions")
    numbered = isinstance(index, dict) and sorted(index) == sorted(
        str(i) for i in range(len(index)))
    if not numbered or not all(isinstance(n, str) for n in index.values()):
        raise ValueError(f"{path}: 'regions' must map '0'..'n-1' to region names, got {index!r}")
    regions = tuple(index[str(i)] for i in range(len(index)))
    table = doc.get("attributes")
    if not isinstance(table, dict):
        raise ValueError(f"{path}: 'attributes' must map each attribute to the list of region "
                         f"names that show it ([] for none), got {table!r}")
    attributes = {}
    for name, names in table.items():
        if not isinstance(names, list) or not all(isinstance(r, str) for r in names):
            raise ValueError(f"{path}: attribute {name!r} must list region names ([] for "
                             f"none), got {names!r}")
        unknown = [r for r in names if r not in regions]
        if unknown:
            raise ValueError(f"{path}: attribute {name!r} names unknown regions {unknown}")
        attributes[name] = tuple(names)
    # Every attribute is listed, [] where no region shows it: one left out would silently drop
    # out of the map measurements.
    missing = [a for a in ATTRIBUTE_NAMES if a not in attributes]
    if missing:
        raise ValueError(f"{path}: 'attributes' lacks {missing} (list [] for an attribute no "
                         "region shows)")
    return regions, attributes


def read_regions(image_path: str | os.PathLike
                 ) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]] | None:
    """(region names, attribute -> region names) of the dataset holding ``image_path``; None
    when the dataset has no ``masks/regions.json`` (e.g. real Market-1501)."""
    path = regions_path(image_path)
    if not os.path.isfile(path):
        return None
    st = os.stat(path)
    return _read_regions_cached(path, st.st_mtime_ns, st.st_size)


def read_part_mask(image_path: str | os.PathLike) -> PartMask | None:
    """The part mask of an image, or None when its dataset has no masks.

    Raises:
      FileNotFoundError: the dataset has ``masks/regions.json`` but no mask for this image.
      ValueError: ``masks/regions.json`` is malformed, or the mask cannot be read, is not an
        8-bit grey image of the image's size, or holds labels beyond the regions.
    """
    info = read_regions(image_path)
    if info is None:
        return None
    regions, attributes = info
    path = mask_path(image_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no part mask {path} for {image_path}, although the dataset "
                                f"has {regions_path(image_path)}")
    try:
        with Image.open(path) as im:
            if im.mode != "L":
                raise ValueError(f"{path}: a part mask must be 8-bit grey (mode L), got "
                                 f"{im.mode}")
            labels = np.asarray(im)
        with Image.open(image_path) as im:  # the header only
            width, height = im.size
    except OSError as e:  # unreadable, truncated, not an image
        raise ValueError(f"{path} cannot be read as the part mask of {image_path}: {e}") from e
    if labels.shape != (height, width):
        raise ValueError(f"{path}: a part mask must have its image's size: it is "
                         f"{labels.shape[1]}x{labels.shape[0]} (width x height), {image_path} "
                         f"is {width}x{height}")
    if labels.max(initial=0) >= len(regions):
        raise ValueError(f"{path}: label {int(labels.max())} but only {len(regions)} regions")
    return PartMask(labels, regions, attributes)


def attribute_regions(mask: PartMask, attributes: Sequence[str] = ATTRIBUTE_NAMES
                      ) -> np.ndarray:
    """bool ``[A, H, W]``: the pixels that show each attribute (all False when the attribute
    names no region or is unknown to the mask's ``regions.json``)."""
    out = np.zeros((len(attributes), *mask.labels.shape), bool)
    for i, name in enumerate(attributes):
        ids = [mask.regions.index(r) for r in mask.attributes.get(name, ())]
        if ids:
            out[i] = np.isin(mask.labels, ids)
    return out


def read_attribute_regions(image_path: str | os.PathLike,
                           attributes: Sequence[str] = ATTRIBUTE_NAMES) -> np.ndarray | None:
    """bool ``[A, H, W]`` regions of ``attributes`` in an image (see :func:`attribute_regions`);
    None when its dataset has no masks."""
    mask = read_part_mask(image_path)
    return None if mask is None else attribute_regions(mask, attributes)


def localisable(attributes: Sequence[str] = ATTRIBUTE_NAMES) -> np.ndarray:
    """bool ``[A]``: the attribute shows in named regions (not gender, not the age groups)."""
    return np.asarray([bool(ATTRIBUTE_REGIONS.get(a)) for a in attributes], bool)


def labels_to_regions(labels: np.ndarray, attributes: Sequence[str] = ATTRIBUTE_NAMES
                      ) -> np.ndarray:
    """bool ``[A, H, W]`` from region labels of this renderer (``REGIONS``), e.g. of a
    counterfactual re-render (``render_counterfactual(..., return_labels=True)``)."""
    return attribute_regions(PartMask(np.asarray(labels), REGIONS, ATTRIBUTE_REGIONS),
                             attributes)
