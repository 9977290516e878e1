"""What a synthetic person image is made of: the person (``Person``: the 27 Market-1501
attributes plus identity detail the attributes do not capture), the camera and the scene
(``Camera``, ``Occluder``, ``Scene``), the named colours and styles they choose from, and the
names of the drawn parts and the regions of the part masks.

Plain data, JSON-ready (``to_dict`` / ``from_dict``); ``reid_jax.synthetic.render`` draws it and
``reid_jax.synthetic.dataset`` samples it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from reid_jax.synthetic.canvas import RGB

IMAGE_HEIGHT = 128
IMAGE_WIDTH = 64
VIEWS: tuple[str, ...] = ("front", "back", "left", "right")

# Named clothing colours of the attribute file, as sRGB in [0, 1].
UP_COLOURS: tuple[str, ...] = (
    "black", "white", "red", "purple", "yellow", "gray", "blue", "green")
DOWN_COLOURS: tuple[str, ...] = (
    "black", "white", "pink", "purple", "yellow", "gray", "blue", "green", "brown")
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "black": (0.09, 0.09, 0.10),
    "white": (0.88, 0.88, 0.86),
    "red": (0.74, 0.10, 0.12),
    "purple": (0.44, 0.20, 0.55),
    "yellow": (0.92, 0.80, 0.18),
    "gray": (0.50, 0.50, 0.51),
    "blue": (0.14, 0.28, 0.64),
    "green": (0.16, 0.50, 0.24),
    "pink": (0.93, 0.56, 0.70),
    "brown": (0.44, 0.28, 0.15),
}
# Colours a person wears when the label file names no colour ("none"): outside the named ones.
OTHER_COLOURS: dict[str, tuple[float, float, float]] = {
    "orange": (0.90, 0.45, 0.10),
    "beige": (0.80, 0.72, 0.56),
    "khaki": (0.58, 0.54, 0.36),
    "teal": (0.08, 0.50, 0.52),
    "maroon": (0.42, 0.08, 0.14),
    "olive": (0.40, 0.42, 0.14),
}
HAT_STYLES: tuple[str, ...] = ("cap", "beanie", "brimmed")
PATTERNS: tuple[str, ...] = ("plain", "stripes", "logo", "collar", "two_tone")
OCCLUDERS: tuple[str, ...] = ("pole", "person", "car", "bush")
WALLS: tuple[str, ...] = ("building", "brick", "glass", "trees", "hedge")
GROUNDS: tuple[str, ...] = ("paving", "tiles", "asphalt", "grass")

# Region names of ``render(..., return_masks=True)``.
PERSON_PARTS: tuple[str, ...] = (
    "head", "hair", "hat", "upper", "skin_arms", "lower", "skin_legs", "shoes", "backpack",
    "bag", "handbag")
PARTS: tuple[str, ...] = (*PERSON_PARTS, "person", "occluder")
# Region names of ``render(..., return_labels=True)`` (label = index), roughly back to front,
# and the drawing part each region is made of (see docs/attribute_maps.md, 'Part masks').
REGIONS: tuple[str, ...] = (
    "background", "head", "hair", "hat", "upper_body", "arms", "lower_body", "legs", "shoes",
    "backpack", "bag", "handbag", "occluder")
PART_REGIONS: dict[str, str] = {
    "head": "head", "hair": "hair", "hat": "hat", "upper": "upper_body", "skin_arms": "arms",
    "lower": "lower_body", "skin_legs": "legs", "shoes": "shoes", "backpack": "backpack",
    "bag": "bag", "handbag": "handbag", "occluder": "occluder"}

@dataclasses.dataclass(frozen=True)
class Person:
    """One identity: the 27 label-file attributes plus identity-specific detail.

    Attributes (label file semantics): ``female`` (gender 2), ``long_hair`` (hair 2),
    ``short_sleeves`` (up 2), ``short_lower`` (down 2), ``pants`` (clothes 2; False = dress or
    skirt), ``hat``, ``backpack``, ``bag``, ``handbag``; ``up_colour`` one of ``UP_COLOURS`` or
    'none', ``down_colour`` one of ``DOWN_COLOURS`` or 'none'; ``age`` 1 (young) .. 4 (old).

    Detail: ``skin``, ``hair_rgb`` (before greying with age), ``hair_style`` 0..2; shades
    ``up_shade``/``down_shade`` = (brightness, dr, dg, db) applied to the named colour;
    ``up_other``/``down_other``, the colour worn when the colour is 'none'; shirt ``pattern``
    (``PATTERNS``) in ``pattern_rgb``; ``shoe_rgb``; ``height`` (leg length factor) and
    ``width`` (body width factor); accessory colours and sides (+1 = the person's left).
    """

    female: bool
    long_hair: bool
    short_sleeves: bool
    short_lower: bool
    pants: bool
    hat: bool
    backpack: bool
    bag: bool
    handbag: bool
    up_colour: str
    down_colour: str
    age: int
    skin: RGB
    hair_rgb: RGB
    hair_style: int
    up_shade: tuple[float, float, float, float]
    down_shade: tuple[float, float, float, float]
    up_other: RGB
    down_other: RGB
    pattern: str
    pattern_rgb: RGB
    shoe_rgb: RGB
    height: float
    width: float
    hat_style: str
    hat_rgb: RGB
    backpack_rgb: RGB
    bag_rgb: RGB
    bag_side: int
    handbag_rgb: RGB
    handbag_side: int
    glasses: bool

    def __post_init__(self) -> None:
        if self.up_colour not in (*UP_COLOURS, "none"):
            raise ValueError(f"Person.up_colour {self.up_colour!r} not in {UP_COLOURS} or 'none'")
        if self.down_colour not in (*DOWN_COLOURS, "none"):
            raise ValueError(
                f"Person.down_colour {self.down_colour!r} not in {DOWN_COLOURS} or 'none'")
        if self.age not in (1, 2, 3, 4):
            raise ValueError(f"Person.age must be 1..4, got {self.age!r}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"Person.pattern {self.pattern!r} not in {PATTERNS}")
        if self.hat_style not in HAT_STYLES:
            raise ValueError(f"Person.hat_style {self.hat_style!r} not in {HAT_STYLES}")
        if self.bag_side not in (-1, 1) or self.handbag_side not in (-1, 1):
            raise ValueError("Person.bag_side and Person.handbag_side must be -1 or 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return _fields_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Person:
        """Inverse of ``to_dict``; raises ValueError naming missing or unknown fields."""
        return cls(**_fields_from_dict(cls, d))


@dataclasses.dataclass(frozen=True)
class Camera:
    """A camera: background style and colours, light, colour cast, blur and noise levels.

    ``horizon`` is the y of the wall/ground line in the panorama the crops are cut from;
    ``light`` multiplies all pixels, ``cast`` per channel, ``gradient`` brightens the top and
    darkens the bottom (or the reverse); ``blur`` is a Gaussian sigma in output pixels;
    ``noise`` a standard deviation in 0..255 units; ``bg_seed`` draws background texture.
    """

    index: int
    wall: str
    ground: str
    wall_rgb: RGB
    wall2_rgb: RGB
    ground_rgb: RGB
    ground2_rgb: RGB
    horizon: float
    light: float
    cast: RGB
    gradient: float
    blur: float
    noise: float
    bg_seed: int

    def __post_init__(self) -> None:
        if self.wall not in WALLS:
            raise ValueError(f"Camera.wall {self.wall!r} not in {WALLS}")
        if self.ground not in GROUNDS:
            raise ValueError(f"Camera.ground {self.ground!r} not in {GROUNDS}")

    def to_dict(self) -> dict[str, Any]:
        return _fields_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Camera:
        return cls(**_fields_from_dict(cls, d))


@dataclasses.dataclass(frozen=True)
class Occluder:
    """Something in front of the person: ``kind`` in ``OCCLUDERS``; ``x`` its position (output
    pixels), ``size`` its extent (kind-specific), ``rgb``/``rgb2`` its colours."""

    kind: str
    x: float
    size: float
    rgb: RGB
    rgb2: RGB

    def __post_init__(self) -> None:
        if self.kind not in OCCLUDERS:
            raise ValueError(f"Occluder.kind {self.kind!r} not in {OCCLUDERS}")


@dataclasses.dataclass(frozen=True)
class Scene:
    """How one image shows a person.

    ``view`` in ``VIEWS`` ('left'/'right': the person faces that way); ``height`` the person's
    height in output pixels; ``x`` the horizontal centre; ``foot_y`` the y of the soles (crop
    jitter: > 128 cuts the feet off); ``phase`` the walking phase (radians) and ``stride`` its
    amplitude 0..1; ``bg_x``/``bg_y`` where the crop lies in the camera's background panorama;
    ``light`` a per-image light multiplier; ``blur`` extra Gaussian sigma; ``occluder`` or None;
    ``noise_seed`` seeds the sensor noise.
    """

    camera: Camera
    view: str
    height: float
    x: float
    foot_y: float
    phase: float
    stride: float
    bg_x: float
    bg_y: float
    light: float
    blur: float
    occluder: Occluder | None
    noise_seed: int

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"Scene.view {self.view!r} not in {VIEWS}")
        if not self.height > 0:
            raise ValueError(f"Scene.height must be > 0, got {self.height}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; the camera is stored by its index."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["camera"] = self.camera.index
        d["occluder"] = None if self.occluder is None else _fields_to_dict(self.occluder)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], cameras: dict[int, Camera]) -> Scene:
        """Inverse of ``to_dict``; ``cameras`` maps camera index -> Camera."""
        values = _fields_from_dict(cls, d)
        if values["camera"] not in cameras:
            raise ValueError(f"Scene.camera {values['camera']!r} not among cameras "
                             f"{sorted(cameras)}")
        values["camera"] = cameras[values["camera"]]
        occ = values["occluder"]
        values["occluder"] = None if occ is None else Occluder(**_fields_from_dict(Occluder, occ))
        return cls(**values)


def _fields_to_dict(obj: Any) -> dict[str, Any]:
    """The fields of a flat dataclass instance, JSON-ready (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}


def _fields_from_dict(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in d]
    unknown = [k for k in d if k not in names]
    if missing or unknown:
        raise ValueError(f"{cls.__name__}: missing fields {missing}, unknown fields {unknown}")
    return {n: tuple(d[n]) if isinstance(d[n], list) else d[n] for n in names}


__all__ = [
    "COLOUR_RGB",
    "Camera",
    "DOWN_COLOURS",
    "GROUNDS",
    "HAT_STYLES",
    "IMAGE_HEIGHT",
    "IMAGE_WIDTH",
    "OCCLUDERS",
    "OTHER_COLOURS",
    "Occluder",
    "PARTS",
    "PART_REGIONS",
    "PATTERNS",
    "PERSON_PARTS",
    "Person",
    "REGIONS",
    "Scene",
    "UP_COLOURS",
    "VIEWS",
    "WALLS",
]
