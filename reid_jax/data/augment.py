"""Image decoding and the AGW augmentation recipe, on the host in numpy / PIL.

Training (ReID-Survey ``data/transforms.py``, ``configs/AGW_baseline.yml``), in this order::

  T.Resize((256, 128))            # PIL bilinear, see below
  T.RandomHorizontalFlip(p=0.5)
  T.Pad(10)                       # zero padding (torchvision default fill=0, constant)
  T.RandomCrop((256, 128))        # top-left uniform over all 21 x 21 positions
  T.ToTensor()                    # uint8 -> float in [0, 1]
  T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
  RandomErasing(probability=0.5, sl=0.02, sh=0.4, r1=0.3, mean=PIXEL_MEAN)

Evaluation: ``Resize`` + ``ToTensor`` + ``Normalize``.

Resizing: torchvision's ``Resize`` on a PIL image calls ``PIL.Image.resize((W, H),
BILINEAR)`` (torchvision's default interpolation), which is what :func:`resize` does, so the
pixels are identical to the reference's. PIL's bilinear filter widens its support when it
shrinks an image (it antialiases); Market-1501's 128x64 crops are enlarged to 256x128, where it
is plain bilinear interpolation. ``interpolation="bicubic"`` is available as an option.

Random erasing fill: the ``RandomErasing`` class of ReID-Survey has a default
``mean=(0.4914, 0.4822, 0.4465)`` (CIFAR-10's mean), but ``build_transforms`` passes
``mean=cfg.INPUT.PIXEL_MEAN`` = ``(0.485, 0.456, 0.406)``, the ImageNet mean, which is what AGW
trains with. The value is written into the *normalised* tensor as is (it is not the mean colour
in pixel space, which would be 0 after normalisation). We follow the reference:
``AugmentConfig.erase_fill`` defaults to ``IMAGENET_MEAN`` and is written after normalisation.
The erased rectangle is drawn as in the reference: up to 100 attempts of area
``U(sl, sh) * H * W`` and aspect ``U(r1, 1/r1)`` (uniform, not log-uniform),
``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area / aspect))``, accepted when
``h < H and w < W``; top-left uniform over the valid positions.

Layout: outputs are float32 HWC (``[H, W, 3]``, NHWC once batched), the layout of Flax convs;
the reference's tensors are CHW.

Randomness: every random draw of one image comes from one ``numpy.random.Generator`` passed in
by the caller; :func:`image_rng` derives it from ``(seed, step, slot)`` so results do not depend
on which worker runs an image, or when.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# Distinguishes the augmentation's random stream from other streams derived from the same seed.
_AUGMENT_STREAM = 0xA46


class ImageLoadError(ValueError):
    """An image could not be read, decoded or transformed; the message names the image."""


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """The AGW recipe (docs/training.md, "Augmentation"); defaults are the reference's.

    Attributes:
      height: output height H.
      width: output width W.
      interpolation: ``"bilinear"`` (torchvision's default, the reference) or ``"bicubic"``.
      flip_prob: probability of a horizontal flip.
      pad: zero padding on each side before the random crop back to (H, W); 0 disables
        padding and cropping.
      erase_prob: probability of random erasing.
      erase_area: (sl, sh) range of the erased fraction of the image area.
      erase_min_aspect: r1; the aspect ratio h/w is drawn from U(r1, 1/r1).
      erase_fill: per-channel value written into the normalised image (see module doc).
      mean: per-channel mean of ``Normalize`` (in [0, 1] pixel units).
      std: per-channel std of ``Normalize``.
    """

    height: int = 256
    width: int = 128
    interpolation: str = "bilinear"
    flip_prob: float = 0.5
    pad: int = 10
    erase_prob: float = 0.5
    erase_area: tuple[float, float] = (0.02, 0.4)
    erase_min_aspect: float = 0.3
    erase_fill: tuple[float, float, float] = IMAGENET_MEAN
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(
                f"AugmentConfig: height and width must be >= 1, got {self.height}x{self.width}"
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"AugmentConfig.interpolation must be one of {sorted(_INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        for name in ("flip_prob", "erase_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {value}")
        if self.pad < 0:
            raise ValueError(f"AugmentConfig.pad must be >= 0, got {self.pad}")
        lo, hi = self.erase_area
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(
                f"AugmentConfig.erase_area must satisfy 0 < sl <= sh <= 1, got {self.erase_area}"
            )
        if not 0.0 < self.erase_min_aspect <= 1.0:
            raise ValueError(
                f"AugmentConfig.erase_min_aspect must be in (0, 1], got {self.erase_min_aspect}"
            )
        for name in ("erase_fill", "mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(
                    f"AugmentConfig.{name} needs 3 channels, got {getattr(self, name)}"
                )
        if min(self.std) <= 0:
            raise ValueError(f"AugmentConfig.std must be > 0, got {self.std}")


def recipe_defaults() -> dict[str, Any]:
    """Every ``AugmentConfig`` field but the size, with its default (the reference's recipe):
    the fields a config's ``data`` section carries. Tuples are fresh objects, so that a printed
    config holds no aliases."""
    return {f.name: tuple(list(f.default)) if isinstance(f.default, tuple) else f.default
            for f in dataclasses.fields(AugmentConfig) if f.name not in ("height", "width")}


def describe(item: Any) -> str:
    """A short human-readable name of an image item, for error messages."""
    if isinstance(item, Mapping):
        for key in ("path", "file_name", "filename"):
            if key in item:
                return describe(item[key])
        return describe(item.get("image"))
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<{len(item)} encoded bytes>"
    if isinstance(item, np.ndarray):
        return f"<array {item.dtype}{list(item.shape)}>"
    return f"<{type(item).__name__}>"


def read_image(item: Any) -> Image.Image:
    """Decodes one image to an RGB PIL image.

    Args:
      item: a file path (``str`` / ``os.PathLike``); encoded image bytes (``bytes``,
        ``bytearray``, ``memoryview``, ``np.bytes_``, e.g. a JPEG from a TFDS data source); an
        already decoded uint8 array ``[H, W, 3]`` or ``[H, W]``; or a mapping (a TFDS record)
        whose ``"image"`` entry is any of these.

    Returns:
      The image, converted to RGB (grayscale / palette / RGBA inputs are converted).

    Raises:
      ImageLoadError: naming the path (or the item) when it cannot be read or decoded.
    """
    if isinstance(item, Mapping):
        if "image" not in item:
            raise ImageLoadError(f"record has no 'image' entry (keys: {sorted(item)})")
        try:
            return read_image(item["image"])
        except ImageLoadError as e:
            raise ImageLoadError(f"{describe(item)}: {e}") from e
    if isinstance(item, np.ndarray) and item.dtype == object and item.ndim == 0:
        item = item.item()
    try:
        if isinstance(item, (str, os.PathLike)):
            with Image.open(item) as img:
                return img.convert("RGB")
        if isinstance(item, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(item)) as img:
                return img.convert("RGB")
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim not in (2, 3):
                raise ValueError(
                    f"expected uint8 [H, W] or [H, W, 3], got {item.dtype}{item.shape}"
                )
            if item.ndim == 3 and item.shape[-1] != 3:
                raise ValueError(f"expected 3 channels, got shape {item.shape}")
            return Image.fromarray(item).convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three on bad files
        raise ImageLoadError(f"cannot read image {describe(item)}: {e}") from e
    raise ImageLoadError(
        f"cannot read image from a {type(item).__name__}: expected a path, encoded bytes, "
        "a uint8 array or a record with an 'image' entry"
    )


def resize(
    img: Image.Image, height: int, width: int, interpolation: str = "bilinear"
) -> np.ndarray:
    """Resizes as torchvision ``T.Resize((height, width))`` does on a PIL image.

    Returns:
      uint8 [height, width, 3].
    """
    if img.size != (width, height):
        img = img.resize((width, height), _INTERPOLATIONS[interpolation])
    return np.asarray(img, dtype=np.uint8)


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``ToTensor`` + ``Normalize``: ``(x / 255 - mean) / std`` as one multiply-add.

    Args:
      pixels: uint8 [..., 3].

    Returns:
      float32 [..., 3].
    """
    std64 = np.asarray(std, np.float64)
    scale = (1.0 / (255.0 * std64)).astype(np.float32)
    offset = (-np.asarray(mean, np.float64) / std64).astype(np.float32)
    out = pixels.astype(np.float32)
    out *= scale
    out += offset
    return out


def flip_pad_crop(pixels: np.ndarray, flip: bool, pad: int, top: int, left: int) -> np.ndarray:
    """Horizontal flip, zero padding by ``pad`` and a crop back to the input size.

    Equivalent to ``T.RandomHorizontalFlip`` + ``T.Pad(pad)`` + ``T.RandomCrop((H, W))`` with
    the crop's top-left corner at ``(top, left)`` of the padded image, without materialising
    the padded image.

    Args:
      pixels: uint8 [H, W, C].
      flip: whether to mirror left-right first.
      pad: padding on each side.
      top: crop row in the padded image, in [0, 2 * pad].
      left: crop column in the padded image, in [0, 2 * pad].

    Returns:
      uint8 [H, W, C].
    """
    if flip:
        pixels = pixels[:, ::-1]
    if pad == 0:
        return np.ascontiguousarray(pixels)
    if not (0 <= top <= 2 * pad and 0 <= left <= 2 * pad):
        raise ValueError(f"crop corner ({top}, {left}) outside [0, {2 * pad}]")
    h, w = pixels.shape[:2]
    out = np.zeros(pixels.shape, pixels.dtype)
    # Output row r shows padded row r + top, i.e. source row r + top - pad.
    dy, dx = top - pad, left - pad
    r0, r1 = max(0, -dy), min(h, h - dy)
    c0, c1 = max(0, -dx), min(w, w - dx)
    if r0 < r1 and c0 < c1:
        out[r0:r1, c0:c1] = pixels[r0 + dy : r1 + dy, c0 + dx : c1 + dx]
    return out


def erase_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    area_range: tuple[float, float] = (0.02, 0.4),
    min_aspect: float = 0.3,
) -> tuple[int, int, int, int] | None:
    """Draws the rectangle of ReID-Survey's ``RandomErasing`` (probability check excluded).

    Returns:
      ``(top, left, h, w)``, or None when 100 attempts found no rectangle that fits.
    """
    area = height * width
    for _ in range(100):
        target_area = rng.uniform(*area_range) * area
        aspect = rng.uniform(min_aspect, 1.0 / min_aspect)
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            top = int(rng.integers(0, height - h, endpoint=True))
            left = int(rng.integers(0, width - w, endpoint=True))
            return top, left, h, w
    return None


def train_transform(
    image: Image.Image | np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> np.ndarray:
    """The AGW training augmentation of one image.

    Draws, in order: flip, crop corner (when ``pad > 0``), erasing, erasing rectangle.

    Args:
      image: RGB PIL image or uint8 [h, w, 3] of any size.
      rng: the image's generator (see :func:`image_rng`).
      config: the recipe.

    Returns:
      float32 [H, W, 3], normalised.
    """
    if isinstance(image, np.ndarray):
        image = read_image(image)
    pixels = resize(image, config.height, config.width, config.interpolation)
    flip = bool(rng.random() < config.flip_prob)
    top = left = config.pad
    if config.pad:
        top = int(rng.integers(0, 2 * config.pad, endpoint=True))
        left = int(rng.integers(0, 2 * config.pad, endpoint=True))
    out = normalize(flip_pad_crop(pixels, flip, config.pad, top, left), config.mean, config.std)
    if rng.random() < config.erase_prob:
        box = erase_box(
            rng, config.height, config.width, config.erase_area, config.erase_min_aspect
        )
        if box is not None:
            top, left, h, w = box
            out[top : top + h, left : left + w] = np.asarray(config.erase_fill, np.float32)
    return out


def eval_transform(image: Image.Image | np.ndarray, config: AugmentConfig) -> np.ndarray:
    """Evaluation transform: resize + normalise.

    Returns:
      float32 [H, W, 3].
    """
    if isinstance(image, np.ndarray):
        image = read_image(image)
    pixels = resize(image, config.height, config.width, config.interpolation)
    return normalize(pixels, config.mean, config.std)


def image_rng(seed: int, step: int, slot: int) -> np.random.Generator:
    """The generator of the image at position ``slot`` of training batch ``step``.

    Keyed by the batch slot rather than the image index: an identity with fewer than K images
    repeats an index within a batch, and its copies must be augmented differently.
    """
    return np.random.default_rng(np.random.SeedSequence([_AUGMENT_STREAM, seed, step, slot]))


def load_transform(
    items: Sequence[Any],
    config: AugmentConfig,
    seeds: Sequence[tuple[int, int, int]] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Reads and transforms several images: the unit of work of a loader worker.

    Args:
      items: images as accepted by :func:`read_image`.
      config: the recipe.
      seeds: ``(seed, step, slot)`` per item for :func:`train_transform`; None for
        :func:`eval_transform`.
      out: optional float32 [len(items), H, W, 3] to write into.

    Returns:
      float32 [len(items), H, W, 3] (``out`` when given).

    Raises:
      ImageLoadError: naming the image that failed.
    """
    if seeds is not None and len(seeds) != len(items):
        raise ValueError(f"{len(items)} items but {len(seeds)} seeds")
    if out is None:
        out = np.empty((len(items), config.height, config.width, 3), np.float32)
    for i, item in enumerate(items):
        try:
            img = read_image(item)
            if seeds is None:
                out[i] = eval_transform(img, config)
            else:
                out[i] = train_transform(img, image_rng(*seeds[i]), config)
        except ImageLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the image's name
            raise ImageLoadError(f"cannot transform image {describe(item)}: {e!r}") from e
    return out
