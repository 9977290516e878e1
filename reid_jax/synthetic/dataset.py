"""A synthetic, Market-1501-shaped person re-identification dataset.

``generate_dataset`` writes ``bounding_box_train/``, ``bounding_box_test/``, ``query/`` with
Market-1501 file names (``0002_c1s1_000451_03.jpg``: pid, camera, sequence, frame, box) and
128 x 64 RGB JPEGs, a ``market_attribute.mat`` of the real file's structure (written by
``attributes.write_market_attributes``), ``synthetic_meta.json``: every person's parameters
and every image's scene, so any image can be re-rendered (``render_counterfactual``), and
(unless ``write_masks=False``) a part mask per image under ``masks/``
(``reid_jax.synthetic.masks``).

Protocol as in Market-1501: train and test identities are disjoint and numbered together
(1..N, randomly interleaved); every identity is seen by >= 2 of the 6 cameras; a test identity
has one query per camera that sees it (box index 00, like Market's hand-drawn query boxes) and
its other images in the gallery, at least one in every camera, so every query has a gallery
match from another camera; the gallery also holds distractors (pid 0000: false detections and
partial unknown persons) and junk (pid -1: badly cropped test identities).

Persons carry the 27 label-file attributes, drawn with the per-identity statistics of the real
training split (``MARKET_TRAIN_COUNTS``), plus identity detail the attributes do not capture
(skin tone, shade of a colour, shoes, shirt pattern, body proportions, hair colour), so re-id is
not just attribute matching. Rendering is ``reid_jax.synthetic.render``.

Everything is drawn from ``numpy.random.default_rng`` seeded by ``SeedSequence([seed, ...])``:
the same seed gives the same bytes with any number of workers.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from reid_jax import interrupts
from reid_jax.atomic_io import public_mode, remove_stale
from reid_jax.data import attributes as attributes_lib
from reid_jax.synthetic import masks as masks_lib
from reid_jax.synthetic import person as people
from reid_jax.synthetic import render as sr
from reid_jax.synthetic.person import Camera, Occluder, Person, Scene
from reid_jax.synthetic.render import render

META_FILE = "synthetic_meta.json"
META_FORMAT = "reid_jax.synthetic_market1501"
META_VERSION = 1
SPLIT_FOLDERS = {"train": "bounding_box_train", "gallery": "bounding_box_test",
                 "query": "query"}
ATTRIBUTE_FILE = "market_attribute.mat"
NUM_CAMERAS = 6

# Per-identity attribute statistics of the REAL Market-1501 training split (751 identities),
# conditioned on gender, embedded so the project runs without the label file. Computed once with
#   m = scipy.io.loadmat("market_attribute.mat")["market_attribute"]
#   tr = m[0, 0]["train"][0, 0]; g = tr["gender"].ravel() == 2
# counting, per gender, identities with value 2 (hair, clothes, up, hat, backpack, bag,
# handbag), ``down`` == 2 given clothes == 1 (dress) / == 2 (pants) as (positives, total),
# ``age`` == 1..4, and the at-most-one-hot colour fields (``none`` = no colour field is 2).
# Attributes are sampled independently given gender, which keeps every marginal of the real
# split (e.g. hat 2.7 %, age2 75.8 %, backpack 26.5 %) and its strongest dependencies.
MARKET_TRAIN_COUNTS: dict[str, dict[str, Any]] = {
    "male": {
        "n": 431, "hair": 5, "clothes": 431, "up": 420, "hat": 7, "backpack": 128, "bag": 63,
        "handbag": 43, "down_given_dress": (0, 0), "down_given_pants": (241, 431),
        "age": (8, 315, 101, 7),
        "up_colour": {"black": 69, "white": 115, "red": 38, "purple": 15, "yellow": 23,
                      "gray": 62, "blue": 35, "green": 35, "none": 39},
        "down_colour": {"black": 185, "white": 24, "pink": 2, "purple": 0, "yellow": 0,
                        "gray": 89, "blue": 68, "green": 5, "brown": 46, "none": 12},
    },
    "female": {
        "n": 320, "hair": 240, "clothes": 210, "up": 292, "hat": 13, "backpack": 71, "bag": 122,
        "handbag": 43, "down_given_dress": (95, 110), "down_given_pants": (121, 210),
        "age": (6, 254, 59, 1),
        "up_colour": {"black": 44, "white": 113, "red": 40, "purple": 15, "yellow": 13,
                      "gray": 24, "blue": 11, "green": 21, "none": 39},
        "down_colour": {"black": 108, "white": 34, "pink": 27, "purple": 2, "yellow": 10,
                        "gray": 34, "blue": 55, "green": 9, "brown": 23, "none": 18},
    },
}

# Binary attribute name -> Person field (value 2 in the label file = True).
_BINARY_FIELDS: dict[str, str] = {
    "backpack": "backpack", "bag": "bag", "handbag": "handbag", "clothes": "pants",
    "down": "short_lower", "up": "short_sleeves", "hair": "long_hair", "hat": "hat",
    "gender": "female",
}

# The image regions (``render.PARTS``) an attribute can change.
ATTRIBUTE_PARTS: dict[str, tuple[str, ...]] = {
    # From behind, long hair drapes narrower over a backpack.
    "backpack": ("backpack", "hair"), "bag": ("bag",), "handbag": ("handbag",),
    "clothes": ("lower", "skin_legs"), "down": ("lower", "skin_legs"),
    "up": ("upper", "skin_arms"), "hair": ("hair",), "hat": ("hat",),
    "gender": ("person",),
    **{f"up{c}": ("upper",) for c in people.UP_COLOURS},
    **{f"down{c}": ("lower",) for c in people.DOWN_COLOURS},
    **{f"age{k}": ("person",) for k in range(1, 5)},
}

_SKIN_LIGHT, _SKIN_DARK = (0.94, 0.78, 0.66), (0.40, 0.26, 0.17)
_HAIR = ((0.07, 0.06, 0.06), (0.20, 0.13, 0.08), (0.36, 0.23, 0.13), (0.70, 0.55, 0.32))
_HAIR_P = (0.55, 0.25, 0.14, 0.06)
_SHOES = ((0.08, 0.08, 0.08), (0.9, 0.9, 0.88), (0.45, 0.45, 0.46), (0.38, 0.24, 0.13),
          (0.75, 0.15, 0.15), (0.15, 0.3, 0.65))
_SHOES_P = (0.38, 0.3, 0.1, 0.1, 0.06, 0.06)
_BAGS = ((0.08, 0.08, 0.09), (0.35, 0.22, 0.12), (0.72, 0.56, 0.38), (0.85, 0.84, 0.8),
         (0.65, 0.12, 0.14), (0.18, 0.25, 0.48), (0.3, 0.32, 0.3))
# Hats stand out from hair: no black or dark brown.
_HATS = ((0.85, 0.84, 0.8), (0.7, 0.14, 0.15), (0.2, 0.32, 0.62), (0.74, 0.62, 0.42),
         (0.55, 0.56, 0.58), (0.9, 0.75, 0.2), (0.25, 0.5, 0.3))
_PATTERN_P = (0.45, 0.15, 0.2, 0.1, 0.1)
_VIEWS_P = (0.3, 0.3, 0.2, 0.2)
_OCCLUDER_P = 0.1

# Six cameras with their own background, light and colour cast; colours get seeded jitter.
_CAMERA_STYLES: tuple[dict[str, Any], ...] = (
    dict(wall="building", ground="paving", wall_rgb=(0.66, 0.64, 0.6), wall2_rgb=(0.3, 0.36, 0.42),
         ground_rgb=(0.55, 0.53, 0.5), ground2_rgb=(0.42, 0.4, 0.38), horizon=58.0, light=1.0,
         cast=(1.0, 1.0, 1.0), gradient=0.1, blur=0.45, noise=3.0),
    dict(wall="brick", ground="tiles", wall_rgb=(0.6, 0.33, 0.25), wall2_rgb=(0.7, 0.66, 0.6),
         ground_rgb=(0.62, 0.6, 0.56), ground2_rgb=(0.5, 0.47, 0.44), horizon=66.0, light=1.05,
         cast=(1.07, 1.0, 0.9), gradient=0.0, blur=0.5, noise=3.5),
    dict(wall="glass", ground="asphalt", wall_rgb=(0.42, 0.5, 0.56), wall2_rgb=(0.2, 0.21, 0.23),
         ground_rgb=(0.32, 0.32, 0.33), ground2_rgb=(0.85, 0.85, 0.82), horizon=50.0,
         light=0.82, cast=(0.92, 0.98, 1.1), gradient=-0.1, blur=0.6, noise=4.5),
    dict(wall="trees", ground="paving", wall_rgb=(0.24, 0.42, 0.2), wall2_rgb=(0.78, 0.84, 0.9),
         ground_rgb=(0.7, 0.66, 0.58), ground2_rgb=(0.58, 0.54, 0.48), horizon=70.0,
         light=1.12, cast=(0.98, 1.04, 0.95), gradient=0.15, blur=0.5, noise=3.0),
    dict(wall="hedge", ground="grass", wall_rgb=(0.2, 0.38, 0.18), wall2_rgb=(0.82, 0.8, 0.74),
         ground_rgb=(0.3, 0.48, 0.22), ground2_rgb=(0.6, 0.58, 0.55), horizon=62.0, light=1.0,
         cast=(1.0, 1.0, 0.97), gradient=0.05, blur=0.55, noise=3.5),
    dict(wall="building", ground="asphalt", wall_rgb=(0.72, 0.7, 0.62), wall2_rgb=(0.22, 0.24, 0.3),
         ground_rgb=(0.4, 0.39, 0.37), ground2_rgb=(0.8, 0.75, 0.3), horizon=54.0, light=0.95,
         cast=(1.1, 1.02, 0.8), gradient=0.0, blur=1.0, noise=6.0),
)


# ----------------------------------------------------------------------------------------------
# Persons: sampling, labels, attribute changes.


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _key(text: str) -> int:
    return zlib.crc32(text.encode())


def _r4(x: float) -> float:
    return round(float(x), 4)


def _rgb(a: Sequence[float]) -> sr.RGB:
    a = np.clip(np.asarray(a, np.float64), 0.02, 0.97)
    return (_r4(a[0]), _r4(a[1]), _r4(a[2]))


def _jitter(rng: np.random.Generator, rgb: Sequence[float], amount: float = 0.04) -> sr.RGB:
    return _rgb(np.asarray(rgb) * rng.uniform(0.88, 1.1) + rng.normal(0, amount, 3))


def _pick(rng: np.random.Generator, options: Sequence[Any], p: Sequence[float]) -> Any:
    return options[int(rng.choice(len(options), p=np.asarray(p) / np.sum(p)))]


def _shade(rng: np.random.Generator) -> tuple[float, float, float, float]:
    return (_r4(rng.uniform(0.82, 1.12)), _r4(rng.normal(0, 0.03)), _r4(rng.normal(0, 0.03)),
            _r4(rng.normal(0, 0.03)))


def sample_person(rng: np.random.Generator) -> Person:
    """Draws a person: attributes as the real training split (``MARKET_TRAIN_COUNTS``, given
    gender), identity detail uniformly from plausible ranges."""
    female = bool(rng.random() < MARKET_TRAIN_COUNTS["female"]["n"] / 751)
    t = MARKET_TRAIN_COUNTS["female" if female else "male"]

    def bern(field: str) -> bool:
        return bool(rng.random() < t[field] / t["n"])

    long_hair, pants, short_sleeves = bern("hair"), bern("clothes"), bern("up")
    hat, backpack, bag, handbag = bern("hat"), bern("backpack"), bern("bag"), bern("handbag")
    pos, tot = t["down_given_pants" if pants else "down_given_dress"]
    short_lower = bool(rng.random() < pos / tot)
    age = int(rng.choice(4, p=np.asarray(t["age"]) / t["n"])) + 1
    up_colour = _pick(rng, list(t["up_colour"]), list(t["up_colour"].values()))
    down_colour = _pick(rng, list(t["down_colour"]), list(t["down_colour"].values()))
    others = list(people.OTHER_COLOURS.values())
    skin_t = float(rng.beta(1.6, 4.0))
    return Person(
        female=female, long_hair=long_hair, short_sleeves=short_sleeves, short_lower=short_lower,
        pants=pants, hat=hat, backpack=backpack, bag=bag, handbag=handbag,
        up_colour=up_colour, down_colour=down_colour, age=age,
        skin=_rgb(np.asarray(_SKIN_LIGHT) * (1 - skin_t) + np.asarray(_SKIN_DARK) * skin_t
                  + rng.normal(0, 0.015, 3)),
        hair_rgb=_jitter(rng, _pick(rng, _HAIR, _HAIR_P), 0.02),
        hair_style=int(rng.choice(3, p=(0.45, 0.35, 0.2))),
        up_shade=_shade(rng), down_shade=_shade(rng),
        up_other=_jitter(rng, others[int(rng.integers(len(others)))]),
        down_other=_jitter(rng, others[int(rng.integers(len(others)))]),
        pattern=_pick(rng, people.PATTERNS, _PATTERN_P),
        pattern_rgb=_jitter(rng, rng.uniform(0.05, 0.95, 3), 0.0),
        shoe_rgb=_jitter(rng, _pick(rng, _SHOES, _SHOES_P), 0.02),
        height=_r4(rng.uniform(0.95, 1.05)), width=_r4(rng.uniform(0.9, 1.12)),
        hat_style=_pick(rng, people.HAT_STYLES, (0.5, 0.3, 0.2)),
        hat_rgb=_jitter(rng, _pick(rng, _HATS, np.ones(len(_HATS)))),
        backpack_rgb=_jitter(rng, _pick(rng, _BAGS, (3, 1, 1, 1, 1, 2, 2))),
        bag_rgb=_jitter(rng, _pick(rng, _BAGS, (3, 2, 2, 1, 1, 1, 1))),
        bag_side=int(rng.choice((-1, 1))),
        handbag_rgb=_jitter(rng, _pick(rng, _BAGS, (3, 2, 2, 1, 2, 1, 1))),
        handbag_side=int(rng.choice((-1, 1))),
        glasses=bool(rng.random() < 0.15),
    )


def person_labels(person: Person) -> np.ndarray:
    """uint8[30] labels in ``attributes.ATTRIBUTE_NAMES`` order (1 = value 2 in the file)."""
    names = attributes_lib.ATTRIBUTE_NAMES
    out = np.zeros(len(names), np.uint8)
    for name, field in _BINARY_FIELDS.items():
        out[names.index(name)] = bool(getattr(person, field))
    if person.up_colour != "none":
        out[names.index(f"up{person.up_colour}")] = 1
    if person.down_colour != "none":
        out[names.index(f"down{person.down_colour}")] = 1
    out[names.index(f"age{person.age}")] = 1
    return out


def change_attribute(person: Person, attribute: str, value: int | bool | None = None,
                     rng: np.random.Generator | None = None) -> Person:
    """The same person with one of the 30 attributes (``ATTRIBUTE_NAMES``) set to ``value``.

    ``value`` None toggles the attribute. Binary attributes (``backpack`` .. ``gender``) are
    set; colours keep at most one colour per garment: ``upred=1`` makes the shirt red (in this
    person's shade), ``upred=0`` on a red shirt picks another named colour with ``rng``;
    ``age3=1`` sets age 3, ``age3=0`` on age 3 picks another age with ``rng``. Every other field
    (identity detail, accessory colours) is kept, so an added backpack has this person's
    backpack colour.

    Raises:
      ValueError: unknown attribute, or a value other than None/0/1.
    """
    if attribute not in attributes_lib.ATTRIBUTE_NAMES:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of "
                         f"{attributes_lib.ATTRIBUTE_NAMES}")
    if value is not None and value not in (0, 1):
        raise ValueError(f"value for {attribute!r} must be None (toggle), 0 or 1, got {value!r}")
    current = bool(person_labels(person)[attributes_lib.ATTRIBUTE_NAMES.index(attribute)])
    target = (not current) if value is None else bool(value)
    if target == current:
        return person
    rng = rng if rng is not None else np.random.default_rng(0)
    if attribute in _BINARY_FIELDS:
        return dataclasses.replace(person, **{_BINARY_FIELDS[attribute]: target})
    if attribute.startswith("age"):
        k = int(attribute[3:])
        if target:
            return dataclasses.replace(person, age=k)
        return dataclasses.replace(person, age=int(rng.choice([a for a in (1, 2, 3, 4)
                                                                if a != k])))
    garment, colours = (("up_colour", people.UP_COLOURS) if attribute.startswith("up")
                        else ("down_colour", people.DOWN_COLOURS))
    colour = attribute[2:] if garment == "up_colour" else attribute[4:]
    if target:
        return dataclasses.replace(person, **{garment: colour})
    return dataclasses.replace(person, **{garment: str(rng.choice(
        [c for c in colours if c != colour]))})


# ----------------------------------------------------------------------------------------------
# Cameras and scenes.


def sample_cameras(seed: int) -> tuple[Camera, ...]:
    """The six cameras of a dataset: fixed styles (``_CAMERA_STYLES``), seeded jitter."""
    cams = []
    for i, style in enumerate(_CAMERA_STYLES):
        rng = _rng(seed, 1, i)
        s = dict(style)
        for k in ("wall_rgb", "wall2_rgb", "ground_rgb", "ground2_rgb"):
            s[k] = _jitter(rng, s[k], 0.02)
        s["cast"] = tuple(_r4(c * rng.uniform(0.97, 1.03)) for c in s["cast"])
        s["horizon"] = _r4(s["horizon"] + rng.uniform(-6, 6))
        s["light"] = _r4(s["light"] * rng.uniform(0.95, 1.05))
        cams.append(Camera(index=i + 1, bg_seed=int(rng.integers(2**31)), **s))
    return tuple(cams)


def _occluder(rng: np.random.Generator) -> Occluder:
    kind = _pick(rng, people.OCCLUDERS, (0.3, 0.3, 0.2, 0.2))
    side = float(rng.choice((-1.0, 1.0)))
    if kind == "pole":
        x, size = rng.uniform(4, 60), rng.uniform(2.5, 6)
        rgb = _jitter(rng, (0.45, 0.46, 0.48))
    elif kind == "person":
        x, size = 32 + side * rng.uniform(30, 38), rng.uniform(16, 24)
        rgb = _jitter(rng, rng.uniform(0.05, 0.9, 3), 0.0)
    elif kind == "car":
        x, size = rng.uniform(10, 54), rng.uniform(20, 38)
        rgb = _jitter(rng, _pick(rng, ((0.8, 0.8, 0.82), (0.1, 0.1, 0.12), (0.6, 0.1, 0.1),
                                       (0.2, 0.3, 0.55)), (1, 1, 1, 1)))
    else:
        x, size = rng.uniform(10, 54), rng.uniform(14, 30)
        rgb = _jitter(rng, (0.2, 0.42, 0.18))
    return Occluder(kind=kind, x=_r4(x), size=_r4(size), rgb=rgb,
                    rgb2=_jitter(rng, rng.uniform(0.1, 0.9, 3), 0.0))


def _scene(rng: np.random.Generator, camera: Camera, track: dict[str, float], kind: str
           ) -> Scene:
    """One image of a tracklet. ``kind``: 'detected' (train/gallery box), 'query' (tight,
    hand-drawn box), 'partial' (a bad crop: zoomed in, shifted out, or a far person)."""
    height = track["height"] * rng.uniform(0.97, 1.03)
    x = track["x"] + rng.normal(0, 1.5)
    foot_y = track["foot_y"] + rng.normal(0, 1.5)
    if kind == "query":
        height, x, foot_y = track["height"] * rng.uniform(1.0, 1.04), 32 + rng.normal(0, 0.7), \
            125.5 + rng.normal(0, 0.7)
    elif kind == "partial":
        mode = int(rng.integers(3))
        if mode == 0:  # zoomed in on the upper body
            height = rng.uniform(170, 260)
            foot_y = rng.uniform(130, 200) + (height - 120)
        elif mode == 1:  # shifted half out of the box
            x = 32 + float(rng.choice((-1, 1))) * rng.uniform(20, 32)
        else:  # a small, far person
            height, foot_y = rng.uniform(45, 75), rng.uniform(80, 125)
    occ = _occluder(rng) if rng.random() < _OCCLUDER_P else None
    return Scene(
        camera=camera, view=str(track["view"]), height=_r4(height), x=_r4(x),
        foot_y=_r4(foot_y), phase=_r4(rng.uniform(0, 2 * math.pi)),
        stride=_r4(rng.uniform(0.4, 1.0)),
        bg_x=_r4(np.clip(track["bg_x"] + rng.normal(0, 3), 0,
                         sr.PANORAMA_WIDTH - people.IMAGE_WIDTH)),
        bg_y=_r4(track["bg_y"]), light=_r4(rng.uniform(0.92, 1.08)),
        blur=_r4(rng.uniform(0.0, 0.35)), occluder=occ, noise_seed=int(rng.integers(2**31)))


def _track(rng: np.random.Generator) -> dict[str, Any]:
    return {"view": _pick(rng, people.VIEWS, _VIEWS_P), "height": rng.uniform(102, 120),
            "x": 32 + rng.normal(0, 2.0), "foot_y": rng.uniform(121, 127.5),
            "bg_x": rng.uniform(0, sr.PANORAMA_WIDTH - people.IMAGE_WIDTH),
            "bg_y": rng.uniform(0, sr.PANORAMA_HEIGHT - people.IMAGE_HEIGHT)}


# ----------------------------------------------------------------------------------------------
# Planning a dataset: identities, cameras, images, file names.


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """What ``generate_dataset`` makes. ``images_per_id`` is the mean number of images per
    identity (for test identities queries included), ``train_images_per_id`` that of the
    training identities when given (None: ``images_per_id``); ``num_distractors`` pid-0000 and
    ``num_junk`` pid -1 gallery images."""

    num_train_ids: int = 60
    num_test_ids: int = 60
    images_per_id: int = 11
    train_images_per_id: int | None = None
    num_distractors: int = 100
    num_junk: int = 20
    seed: int = 0
    jpeg_quality: int = 90
    supersample: int = 2

    def __post_init__(self) -> None:
        if self.num_train_ids < 1 or self.num_test_ids < 1:
            raise ValueError(f"num_train_ids and num_test_ids must be >= 1, got "
                             f"{self.num_train_ids}, {self.num_test_ids}")
        if self.num_train_ids + self.num_test_ids > 9999:
            raise ValueError("num_train_ids + num_test_ids must be <= 9999 (4-digit pids)")
        if self.images_per_id < 4:
            raise ValueError(f"images_per_id must be >= 4 (two cameras, a query and a gallery "
                             f"image in each), got {self.images_per_id}")
        if self.train_images_per_id is not None and self.train_images_per_id < 4:
            raise ValueError(f"train_images_per_id must be >= 4 (an identity of a P x K batch "
                             f"has K = 4 images), got {self.train_images_per_id}")
        if self.num_distractors < 0 or self.num_junk < 0:
            raise ValueError("num_distractors and num_junk must be >= 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {self.supersample}")


class _Names:
    """Unique Market-1501 file names: PPPP_cCsS_FFFFFF_BB.jpg."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def make(self, pid: int, cam: int, seq: int, frame: int, box: int) -> str:
        while True:
            p = "-1" if pid == -1 else f"{pid:04d}"
            name = f"{p}_c{cam}s{seq}_{frame % 1_000_000:06d}_{box:02d}.jpg"
            if name not in self.used:
                self.used.add(name)
                return name
            frame += 1


def _split_counts(rng: np.random.Generator, n: int, k: int, minimum: int) -> list[int]:
    counts = np.full(k, minimum)
    counts += rng.multinomial(n - minimum * k, np.ones(k) / k)
    return counts.tolist()


def plan_dataset(config: DatasetConfig) -> dict[str, Any]:
    """Everything about a dataset but the pixels: the contents of ``synthetic_meta.json``."""
    seed = config.seed
    cameras = sample_cameras(seed)
    rng = _rng(seed, 0)
    total = config.num_train_ids + config.num_test_ids
    pids = np.arange(1, total + 1)
    is_train = np.zeros(total, bool)
    is_train[rng.choice(total, config.num_train_ids, replace=False)] = True
    train_ids, test_ids = pids[is_train].tolist(), pids[~is_train].tolist()
    persons: dict[str, dict[str, Any]] = {}
    images: list[dict[str, Any]] = []
    names = _Names()

    def add(split: str, name: str, person: str | None, scene: Scene) -> None:
        images.append({"file": f"{SPLIT_FOLDERS[split]}/{name}", "person": person,
                       "scene": scene.to_dict()})

    for pid in pids.tolist():
        prng = _rng(seed, 2, pid)
        key = f"{pid:04d}"
        persons[key] = sample_person(prng).to_dict()
        test = pid in test_ids
        mean = config.images_per_id if test or config.train_images_per_id is None else (
            config.train_images_per_id)
        n = max(4, int(round(mean * prng.uniform(0.7, 1.3))))
        # Test identities need a query and a gallery image in every camera.
        max_cams = min(NUM_CAMERAS, n // 2 if test else n)
        k = int(np.clip(prng.choice([2, 3, 4, 5, 6], p=(0.1, 0.15, 0.25, 0.3, 0.2)), 2, max_cams))
        cams = sorted(prng.choice(NUM_CAMERAS, k, replace=False).tolist())
        for cam_i, count in zip(cams, _split_counts(prng, n, k, 2 if test else 1), strict=True):
            camera = cameras[cam_i]
            done = 0
            while done < count:  # tracklets of up to 6 images
                length = min(count - done, int(prng.integers(2, 7)))
                track = _track(prng)
                seq = int(prng.integers(1, 7))
                frame = int(prng.integers(0, 150_000))
                for j in range(length):
                    query = test and done == 0 and j == 0
                    scene = _scene(prng, camera, track, "query" if query else "detected")
                    box = 0 if query else int(prng.integers(1, 6))
                    name = names.make(pid, camera.index, seq, frame, box)
                    split = "query" if query else ("gallery" if test else "train")
                    add(split, name, key, scene)
                    frame += int(prng.integers(4, 30))
                done += length

    # Distractors: false detections (background only) and partial unknown persons.
    for i in range(config.num_distractors):
        drng = _rng(seed, 3, i)
        camera = cameras[int(drng.integers(NUM_CAMERAS))]
        person = None
        if drng.random() < 0.6:
            person = f"d{i:05d}"
            persons[person] = sample_person(drng).to_dict()
        scene = _scene(drng, camera, _track(drng), "partial")
        name = names.make(0, camera.index, int(drng.integers(1, 7)),
                          int(drng.integers(0, 150_000)), int(drng.integers(1, 9)))
        add("gallery", name, person, scene)
    # Junk: badly cropped images of test identities.
    for i in range(config.num_junk):
        jrng = _rng(seed, 4, i)
        camera = cameras[int(jrng.integers(NUM_CAMERAS))]
        person = f"{int(jrng.choice(test_ids)):04d}"
        scene = _scene(jrng, camera, _track(jrng), "partial")
        name = names.make(-1, camera.index, int(jrng.integers(1, 7)),
                          int(jrng.integers(0, 150_000)), int(jrng.integers(1, 9)))
        add("gallery", name, person, scene)

    return {
        "format": META_FORMAT, "version": META_VERSION,
        "config": dataclasses.asdict(config),
        "cameras": [c.to_dict() for c in cameras],
        "train_ids": train_ids, "test_ids": test_ids,
        "persons": persons, "images": images,
    }


# ----------------------------------------------------------------------------------------------
# Rendering and writing.


def _cameras(meta: dict[str, Any]) -> dict[int, Camera]:
    return {c["index"]: Camera.from_dict(c) for c in meta["cameras"]}


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """uint8[128, 64, 3] -> JPEG bytes; deterministic (fixed quality and 4:2:0, no metadata)."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=quality, subsampling=2,
                                       optimize=False)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


_WORKER: dict[str, Any] = {}


def _init_worker(cameras: list[dict[str, Any]], root: str, quality: int, supersample: int,
                 write_masks: bool) -> None:
    _WORKER.update(cameras={c["index"]: Camera.from_dict(c) for c in cameras}, root=root,
                   quality=quality, supersample=supersample, write_masks=write_masks)


def _render_chunk(tasks: list[tuple[str, dict[str, Any] | None, dict[str, Any]]]) -> int:
    """Renders and writes (file, person dict, scene dict) tasks (and their part masks);
    returns how many."""
    root = _WORKER["root"]
    for rel, person, scene in tasks:
        out = render(None if person is None else Person.from_dict(person),
                     Scene.from_dict(scene, _WORKER["cameras"]),
                     supersample=_WORKER["supersample"], return_labels=_WORKER["write_masks"])
        img, labels = out if _WORKER["write_masks"] else (out, None)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(encode_jpeg(img, _WORKER["quality"]))
        if labels is not None:
            with open(masks_lib.mask_path(os.path.join(root, rel)), "wb") as f:
                f.write(masks_lib.encode_png(labels))
    return len(tasks)


def _check_output(output_dir: str, overwrite: bool) -> None:
    if not os.path.exists(output_dir):
        return
    if not os.path.isdir(output_dir):
        raise FileExistsError(f"output_dir {output_dir} exists and is not a folder")
    entries = os.listdir(output_dir)
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"output_dir {output_dir} already exists and is not empty; pass "
                              "overwrite=True (--overwrite) to replace it")
    if META_FILE not in entries:
        raise FileExistsError(f"output_dir {output_dir} is not empty and holds no {META_FILE}: "
                              "refusing to replace a folder this generator did not write")


def generate_dataset(output_dir: str | os.PathLike, config: DatasetConfig, *,
                     num_workers: int = 1, overwrite: bool = False,
                     write_masks: bool = True) -> dict[str, Any]:
    """Writes a complete synthetic Market-1501 dataset to ``output_dir``, atomically.

    Everything is written into a temporary sibling folder that is renamed to ``output_dir`` at
    the end, so an interrupted run leaves no half dataset under that name.

    Args:
      output_dir: the dataset root to create.
      config: sizes, seed, JPEG quality.
      num_workers: rendering processes (1 = in this process). The bytes do not depend on it.
      overwrite: replace an existing dataset written by this generator.
      write_masks: also write every image's part mask, ``masks/<split folder>/<stem>.png``,
        and ``masks/regions.json`` (``reid_jax.synthetic.masks``).

    Returns:
      A summary: image counts per split, identities, seconds, images per second.

    Raises:
      FileExistsError: ``output_dir`` is a non-empty folder and ``overwrite`` is False, or it
        holds files but no ``synthetic_meta.json``.
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    _check_output(output_dir, overwrite)
    start = time.perf_counter()
    meta = plan_dataset(config)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    # Temporary folders carry the writer's pid: those of a killed run are removed here.
    for kind in ("tmp", "old"):
        remove_stale(parent, f".{os.path.basename(output_dir)}.{kind}-")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-{os.getpid()}.",
                           dir=parent)
    public_mode(tmp, folder=True)  # mkdtemp makes it private; the dataset is for everyone
    try:
        for folder in SPLIT_FOLDERS.values():
            os.makedirs(os.path.join(tmp, folder))
            if write_masks:
                os.makedirs(os.path.join(tmp, masks_lib.MASKS_FOLDER, folder))
        if write_masks:
            with open(os.path.join(tmp, masks_lib.MASKS_FOLDER, masks_lib.REGIONS_FILE),
                      "w") as f:
                json.dump(masks_lib.regions_document(), f, indent=1)
        tasks = [(im["file"], None if im["person"] is None else meta["persons"][im["person"]],
                  im["scene"]) for im in meta["images"]]
        init_args = (meta["cameras"], tmp, config.jpeg_quality, config.supersample, write_masks)
        chunk = 32
        chunks = [tasks[i:i + chunk] for i in range(0, len(tasks), chunk)]
        if num_workers == 1:
            _init_worker(*init_args)
            for c in chunks:
                _render_chunk(c)
        else:
            ctx = multiprocessing.get_context("spawn")
            with interrupts.workers_ignore_ctrl_c():  # Ctrl-C is this process's to handle
                pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=init_args)
            with pool:
                for _ in pool.imap_unordered(_render_chunk, chunks):
                    pass
        persons = {k: Person.from_dict(v) for k, v in meta["persons"].items()}
        attributes_lib.write_market_attributes(
            os.path.join(tmp, ATTRIBUTE_FILE),
            np.asarray(meta["train_ids"], np.int64),
            np.stack([person_labels(persons[f"{p:04d}"]) for p in meta["train_ids"]]),
            np.asarray(meta["test_ids"], np.int64),
            np.stack([person_labels(persons[f"{p:04d}"]) for p in meta["test_ids"]]))
        _fix_mat_header(os.path.join(tmp, ATTRIBUTE_FILE))
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, separators=(",", ":"))
        _replace(tmp, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    counts = {split: sum(im["file"].startswith(folder + "/") for im in meta["images"])
              for split, folder in SPLIT_FOLDERS.items()}
    summary = {"output_dir": output_dir, "images": counts, "total_images": len(meta["images"]),
               "train_ids": len(meta["train_ids"]), "test_ids": len(meta["test_ids"]),
               "seconds": round(seconds, 2),
               "images_per_second": round(len(meta["images"]) / max(seconds, 1e-9), 1)}
    logging.info("synthetic dataset: %s", summary)
    return summary


def _fix_mat_header(path: str) -> None:
    """Replaces the creation time scipy writes into a MAT 5 file's 116-byte text header with a
    fixed text, so the same seed gives the same bytes."""
    with open(path, "r+b") as f:
        head = f.read(116)
        if not head.startswith(b"MATLAB 5.0 MAT-file"):
            raise ValueError(f"{path}: not a MAT 5 file (header {head[:20]!r})")
        f.seek(0)
        f.write(b"MATLAB 5.0 MAT-file Platform: posix, Created on: reid_jax synthetic dataset"
                .ljust(116, b"\0"))


def _replace(tmp: str, output_dir: str, overwrite: bool) -> None:
    """Moves the finished ``tmp`` folder to ``output_dir`` (re-checking it, as another run may
    have written it meanwhile)."""
    _check_output(output_dir, overwrite)
    old = None
    if os.path.isdir(output_dir):
        if os.listdir(output_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-{os.getpid()}.",
                                   dir=os.path.dirname(output_dir))
            os.rename(output_dir, os.path.join(old, "dataset"))
        else:
            os.rmdir(output_dir)
    os.rename(tmp, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Reading back: meta data, re-rendering, counterfactuals.


@functools.lru_cache(maxsize=4)
def _load_meta_cached(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != META_FORMAT or meta.get("version") != META_VERSION:
        raise ValueError(f"{path}: not a {META_FORMAT} v{META_VERSION} file "
                         f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
    meta["_index"] = {os.path.basename(im["file"]): im for im in meta["images"]}
    return meta


def load_meta(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``synthetic_meta.json`` of a dataset (cached while the file is unchanged).

    Keys: format, version, config, cameras, train_ids, test_ids, persons (key -> Person dict),
    images (list of {file, person, scene}). Do not modify the returned dict."""
    path = os.path.join(os.fspath(dataset_dir), META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {META_FILE} in {dataset_dir}: not a synthetic dataset")
    st = os.stat(path)
    return _load_meta_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size)


def image_record(dataset_dir: str | os.PathLike, file_name: str
                 ) -> tuple[Person | None, Scene, dict[str, Any]]:
    """(person or None, scene, meta) of one image; ``file_name`` is a base name or path."""
    meta = load_meta(dataset_dir)
    base = os.path.basename(os.fspath(file_name))
    if base not in meta["_index"]:
        raise KeyError(f"{base!r} is not an image of the synthetic dataset {dataset_dir}")
    im = meta["_index"][base]
    person = None if im["person"] is None else Person.from_dict(meta["persons"][im["person"]])
    return person, Scene.from_dict(im["scene"], _cameras(meta)), meta


def render_counterfactual(dataset_dir: str | os.PathLike, file_name: str,
                          attribute: str | None, value: int | bool | None = None, *,
                          jpeg: bool = True, return_masks: bool = False,
                          return_labels: bool = False
                          ) -> np.ndarray | tuple[Any, ...]:
    """Re-renders an image of a synthetic dataset with one attribute changed.

    Same person, camera, view, pose, crop, occluder and noise; only ``attribute`` (an
    ``ATTRIBUTE_NAMES`` name, or None for no change) is set to ``value`` (None toggles; see
    ``change_attribute``). A random choice the change needs (another shirt colour, another age)
    is seeded by the dataset seed, the file name and the attribute, so it is reproducible.

    Args:
      dataset_dir: the dataset root (holding ``synthetic_meta.json``).
      file_name: the image's base name or path, e.g. '0002_c1s1_000451_03.jpg'.
      attribute: the attribute to change, or None.
      value: None (toggle), 0 or 1.
      jpeg: pass the image through the dataset's JPEG encoding, as the stored files are; with
        ``attribute=None`` the result then equals the decoded file exactly.
      return_masks: also return the renderer's part masks (before JPEG).
      return_labels: also return the region labels of the re-render, uint8[128, 64], as the
        generator writes them to ``masks/`` (``render(..., return_labels=True)``).

    Returns:
      uint8[128, 64, 3]; with ``return_masks`` and/or ``return_labels`` the tuple (image,
      [masks], [labels]) in that order.

    Raises:
      KeyError: the file is not in the dataset. ValueError: bad attribute/value, or the image
        shows no person (a background-only distractor) and an attribute is asked to change.
    """
    person, scene, meta = image_record(dataset_dir, file_name)
    if attribute is not None:
        if person is None:
            raise ValueError(f"{file_name} shows no person (a false detection); cannot change "
                             f"{attribute!r}")
        rng = _rng(int(meta["config"]["seed"]), 5, _key(os.path.basename(file_name)),
                   _key(attribute))
        person = change_attribute(person, attribute, value, rng)
    out = render(person, scene, supersample=int(meta["config"]["supersample"]),
                 return_masks=return_masks, return_labels=return_labels)
    img, extras = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
    if jpeg:
        img = decode_jpeg(encode_jpeg(img, int(meta["config"]["jpeg_quality"])))
    return (img, *extras) if extras else img


def attribute_region(masks_before: dict[str, np.ndarray], masks_after: dict[str, np.ndarray],
                     attribute: str, radius: int = 0) -> np.ndarray:
    """bool[128, 64]: where changing ``attribute`` may change pixels.

    The union of the attribute's parts (``ATTRIBUTE_PARTS``) in the masks of both renders,
    dilated by ``radius`` pixels (``render.blur_radius`` of the scene)."""
    if attribute not in ATTRIBUTE_PARTS:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of "
                         f"{tuple(ATTRIBUTE_PARTS)}")
    region = np.zeros((people.IMAGE_HEIGHT, people.IMAGE_WIDTH), bool)
    for part in ATTRIBUTE_PARTS[attribute]:
        region |= (masks_before[part] > 0) | (masks_after[part] > 0)
    if radius > 0:  # square dilation
        padded = np.pad(region, radius)
        out = np.zeros_like(region)
        for dy in range(2 * radius + 1):
            for dx in range(2 * radius + 1):
                out |= padded[dy:dy + region.shape[0], dx:dx + region.shape[1]]
        region = out
    return region


# ----------------------------------------------------------------------------------------------
# Looking at it.


def _short_attributes(person: Person) -> tuple[str, str]:
    bits = ["F" if person.female else "M", f"a{person.age}",
            "long" if person.long_hair else "",
            f"{'s' if person.short_sleeves else 'l'}:{person.up_colour[:3]}",
            f"{'dress' if not person.pants else ('sh' if person.short_lower else 'pt')}"
            f":{person.down_colour[:3]}"]
    extra = [n for n, f in (("bp", person.backpack), ("bag", person.bag),
                            ("hb", person.handbag), ("hat", person.hat)) if f]
    return " ".join(b for b in bits if b), " ".join(extra)


def contact_sheet(dataset_dir: str | os.PathLike, out_png: str | os.PathLike, n: int = 48, *,
                  columns: int = 12, scale: int = 2, split: str | None = None,
                  show_attributes: bool = True) -> str:
    """Writes a PNG grid of ``n`` dataset images with pid, camera and (optionally) attributes.

    Images are taken evenly over the (sorted) file list of ``split`` ('train', 'query',
    'gallery'; None = all), so neighbouring tiles often show one identity in several cameras.
    Returns the PNG path."""
    meta = load_meta(dataset_dir)
    files = sorted(im["file"] for im in meta["images"])
    if split is not None:
        if split not in SPLIT_FOLDERS:
            raise ValueError(f"split must be one of {tuple(SPLIT_FOLDERS)} or None, got {split!r}")
        files = [f for f in files if f.startswith(SPLIT_FOLDERS[split] + "/")]
    if not files:
        raise ValueError(f"no images to show in {dataset_dir} (split {split!r})")
    n = min(n, len(files))
    picks = [files[int(i)] for i in np.linspace(0, len(files) - 1, n).round()]
    tw, th = people.IMAGE_WIDTH * scale, people.IMAGE_HEIGHT * scale
    label_h = 36 if show_attributes else 14
    rows = math.ceil(n / columns)
    sheet = Image.new("RGB", (columns * (tw + 4), rows * (th + label_h + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, rel in enumerate(picks):
        r, c = divmod(k, columns)
        x, y = c * (tw + 4) + 2, r * (th + label_h + 4) + 2
        with Image.open(os.path.join(os.fspath(dataset_dir), rel)) as im:
            sheet.paste(im.convert("RGB").resize((tw, th), Image.NEAREST), (x, y))
        base = os.path.basename(rel)
        draw.text((x, y + th + 1), f"{base[:base.index('_c')]} c{base.split('_c')[1][0]}",
                  fill=(0, 0, 0))
        rec = meta["_index"][base]
        if show_attributes and rec["person"] is not None:
            line1, line2 = _short_attributes(Person.from_dict(meta["persons"][rec["person"]]))
            draw.text((x, y + th + 12), line1, fill=(60, 60, 160))
            draw.text((x, y + th + 23), line2, fill=(160, 60, 60))
    out_png = os.fspath(out_png)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    sheet.save(out_png)
    return out_png
