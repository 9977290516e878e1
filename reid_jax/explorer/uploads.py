"""Uploaded query images: decoded with limits, re-encoded for display, kept for a while.

An upload is untrusted input: its byte size is bounded before it is read whole (the app
streams the body and stops at the limit), its pixel count is checked from the header before
the pixels are decoded (a small file can declare a huge image), and only formats a camera or a
screenshot produce are accepted. What the page later shows is a re-encoded JPEG of the decoded
pixels, never the uploaded bytes (``docs/explorer.md``, "Security").
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import re
import secrets
import threading
import warnings

import numpy as np
from PIL import Image

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_PIXELS = 4096 * 4096
DISPLAY_HEIGHT = 256  # the re-encoded copy the page shows is at most this high


class UploadError(ValueError):
    """An upload that cannot be used; the message says why (shown to the user)."""


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB pixels of an uploaded image.

    Raises:
      UploadError: empty, not an image of ``FORMATS``, more than ``max_pixels`` pixels
        (checked from the header, before decoding), or broken.
    """
    if not data:
        raise UploadError("the upload is empty: send the image file as the request body")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in FORMATS:
                    raise UploadError(f"the upload is a {image.format} image; send one of "
                                      f"{', '.join(FORMATS)}")
                width, height = image.size
                if width < 1 or height < 1 or width * height > max_pixels:
                    raise UploadError(f"the image is {width} x {height} pixels; at most "
                                      f"{max_pixels:,} pixels are accepted")
                image.seek(0)
                pixels = np.asarray(image.convert("RGB"), np.uint8)
    except UploadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise UploadError(f"the upload is not an image that can be read ({type(e).__name__}: "
                          f"{e})") from None
    return pixels


def display_jpeg(pixels: np.ndarray, height: int = DISPLAY_HEIGHT) -> bytes:
    """A JPEG of ``pixels`` at most ``height`` high (what the page shows of an upload)."""
    image = Image.fromarray(pixels)
    if image.height > height:
        width = max(1, round(image.width * height / image.height))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def display_name(name: str | None) -> str:
    """A name to show for an upload: the base name, printable characters, at most 80."""
    base = os.path.basename((name or "").replace("\\", "/"))
    base = re.sub(r"[^\w.\- ]", "_", base)[:80]
    return base or "upload"


@dataclasses.dataclass(frozen=True)
class Upload:
    """An uploaded query: its id, display name, embedding ``[N]``, decoded pixels
    (uint8 ``[H, W, 3]``, for attribute maps) and the JPEG the page shows."""

    id: str
    name: str
    embedding: np.ndarray
    pixels: np.ndarray
    jpeg: bytes


class UploadStore:
    """The last ``capacity`` uploads by id (least recently used dropped); thread-safe."""

    def __init__(self, capacity: int = 64):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: collections.OrderedDict[str, Upload] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(8)

    def add(self, upload: Upload) -> None:
        with self._lock:
            self._items[upload.id] = upload
            self._items.move_to_end(upload.id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, upload_id: str) -> Upload | None:
        with self._lock:
            item = self._items.get(upload_id)
            if item is not None:
                self._items.move_to_end(upload_id)
            return item

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "FORMATS", "Upload", "UploadError",
           "UploadStore", "decode", "display_jpeg", "display_name"]
