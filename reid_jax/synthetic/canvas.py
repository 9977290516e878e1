"""Antialiased 2-D drawing with numpy for the synthetic person renderer.

Shapes are signed distance functions (output pixels, negative inside) with a bounding box;
``Canvas.paint`` composites a fill with the coverage ``clip(0.5 - sdf * supersample, 0, 1)``
inside the box only, and optionally tracks, per named part, how much of each canvas pixel
shows that part (the painter's algorithm with visibility), or a label per canvas sample: the
last part whose shape contains the sample's centre (cheaper: one write per paint).
Coordinates are output pixels: x to the right, y down; the canvas holds ``supersample``
samples per output pixel and axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

RGB = tuple[float, float, float]


class Shape(NamedTuple):
    """``sdf(x [1, w], y [h, 1]) -> [h, w]`` signed distance (< 0 inside), in output pixels;
    ``box`` = (x0, y0, x1, y1) bounds the inside (infinite for half-planes)."""

    sdf: Callable[[np.ndarray, np.ndarray], np.ndarray]
    box: tuple[float, float, float, float]


INF_BOX = (-math.inf, -math.inf, math.inf, math.inf)


def ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> Shape:
    """An ellipse with radii (rx, ry), rotated by ``angle`` radians."""
    c, s = math.cos(angle), math.sin(angle)
    ex = math.sqrt((rx * c) ** 2 + (ry * s) ** 2)
    ey = math.sqrt((rx * s) ** 2 + (ry * c) ** 2)
    rmax = max(rx, ry)

    def sdf(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u = (x - cx) * c + (y - cy) * s
        v = (y - cy) * c - (x - cx) * s
        k = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
        # First-order distance (k - 1) / |grad k|; |grad k| bounded below near the centre.
        grad = np.sqrt((u / rx**2) ** 2 + (v / ry**2) ** 2) / np.maximum(k, 1e-6)
        return (k - 1.0) / np.maximum(grad, 1.0 / rmax)

    return Shape(sdf, (cx - ex, cy - ey, cx + ex, cy + ey))


def capsule(x0: float, y0: float, x1: float, y1: float, r0: float, r1: float) -> Shape:
    """A segment with radius r0 at (x0, y0) tapering linearly to r1 at (x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    len2 = max(dx * dx + dy * dy, 1e-9)

    def sdf(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / len2, 0.0, 1.0)
        return np.hypot(x - x0 - t * dx, y - y0 - t * dy) - (r0 + t * (r1 - r0))

    r = max(r0, r1)
    return Shape(sdf, (min(x0, x1) - r, min(y0, y1) - r, max(x0, x1) + r, max(y0, y1) + r))


def polygon(points: list[tuple[float, float]]) -> Shape:
    """A convex polygon (either winding)."""
    pts = np.asarray(points, np.float64)
    centre = pts.mean(axis=0)
    edges = []
    for i in range(len(pts)):
        p, q = pts[i], pts[(i + 1) % len(pts)]
        n = np.array([q[1] - p[1], p[0] - q[0]])
        norm = np.hypot(*n)
        if norm < 1e-9:
            continue
        n /= norm
        if np.dot(centre - p, n) > 0:
            n = -n
        edges.append((float(p[0]), float(p[1]), float(n[0]), float(n[1])))

    def sdf(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        d = None
        for px, py, nx, ny in edges:
            e = (x - px) * nx + (y - py) * ny
            d = e if d is None else np.maximum(d, e)
        return d

    return Shape(sdf, (float(pts[:, 0].min()), float(pts[:, 1].min()),
                        float(pts[:, 0].max()), float(pts[:, 1].max())))


def rect(x0: float, y0: float, x1: float, y1: float, radius: float = 0.0) -> Shape:
    """An axis-aligned rectangle with corners rounded by ``radius``."""
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hx, hy = abs(x1 - x0) / 2 - radius, abs(y1 - y0) / 2 - radius

    def sdf(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        qx = np.abs(x - cx) - hx
        qy = np.abs(y - cy) - hy
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
        return outside + np.minimum(np.maximum(qx, qy), 0) - radius

    return Shape(sdf, (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))


def below(y0: float) -> Shape:
    """The half-plane y > y0 (for intersections)."""
    return Shape(lambda x, y: y0 - y, INF_BOX)


def above(y0: float) -> Shape:
    """The half-plane y < y0 (for intersections)."""
    return Shape(lambda x, y: y - y0, INF_BOX)


def intersect(a: Shape, b: Shape) -> Shape:
    """Inside both."""
    box = (max(a.box[0], b.box[0]), max(a.box[1], b.box[1]),
           min(a.box[2], b.box[2]), min(a.box[3], b.box[3]))
    return Shape(lambda x, y: np.maximum(a.sdf(x, y), b.sdf(x, y)), box)


def union(a: Shape, b: Shape) -> Shape:
    """Inside either."""
    box = (min(a.box[0], b.box[0]), min(a.box[1], b.box[1]),
           max(a.box[2], b.box[2]), max(a.box[3], b.box[3]))
    return Shape(lambda x, y: np.minimum(a.sdf(x, y), b.sdf(x, y)), box)


Fill = RGB | np.ndarray | Callable[[np.ndarray, np.ndarray], np.ndarray]


class Canvas:
    """A float32 [H, W, 3] image painted in order (painter's algorithm).

    With ``track``, ``vis[part]`` is float32 [H, W]: the fraction of each pixel that shows
    ``part`` (every paint scales the other parts' visibility by 1 - coverage).

    With ``label_of`` (part name -> label 1..255), ``labels`` is uint8 [H, W]: per sample, the
    label of the last painted part whose (alpha-scaled) coverage there is >= 0.5, i.e. whose
    shape contains the sample's centre; 0 where none did. Parts missing from ``label_of``
    (e.g. a translucent shadow) leave the labels unchanged.
    """

    def __init__(self, image: np.ndarray, supersample: int, track: bool,
                 label_of: dict[str, int] | None = None):
        self.image = image
        self.ss = supersample
        self.h, self.w = image.shape[:2]
        self.track = track
        self.vis: dict[str, np.ndarray] = {}
        self.label_of = label_of
        self.labels = None if label_of is None else np.zeros((self.h, self.w), np.uint8)

    def paint(self, shape: Shape, fill: Fill, part: str, shade: tuple[float, float] | None = None,
              alpha: float = 1.0) -> None:
        """Composites ``fill`` over the canvas with the shape's antialiased coverage.

        ``shade`` = (centre x, half width): cylindrical shading across x (darker at the sides).
        """
        ss = self.ss
        x0, y0, x1, y1 = shape.box
        j0, j1 = max(math.floor(x0 * ss) - 1, 0), min(math.ceil(x1 * ss) + 1, self.w)
        i0, i1 = max(math.floor(y0 * ss) - 1, 0), min(math.ceil(y1 * ss) + 1, self.h)
        if j0 >= j1 or i0 >= i1:
            return
        xs = ((np.arange(j0, j1, dtype=np.float32) + 0.5) / ss)[None, :]
        ys = ((np.arange(i0, i1, dtype=np.float32) + 0.5) / ss)[:, None]
        cov = np.clip(0.5 - shape.sdf(xs, ys) * ss, 0.0, 1.0).astype(np.float32)
        if alpha != 1.0:
            cov *= alpha
        if callable(fill):
            colour = fill(xs, ys)
        else:
            colour = np.asarray(fill, np.float32)
        if shade is not None:
            cx, hw = shade
            f = 1.0 - 0.35 * np.clip(((xs - cx) / max(hw, 1e-3)) ** 2, 0.0, 1.0)
            colour = colour * f[..., None]
        # r * (1 - c) + colour * c: exact where c is 0 or 1, so a fully covered pixel does not
        # depend on what lies below (counterfactual locality holds bit for bit).
        c3 = cov[..., None]
        self.image[i0:i1, j0:j1] = self.image[i0:i1, j0:j1] * (1.0 - c3) + colour * c3
        if self.track:
            keep = 1.0 - cov
            for v in self.vis.values():
                v[i0:i1, j0:j1] *= keep
            if part not in self.vis:
                self.vis[part] = np.zeros((self.h, self.w), np.float32)
            self.vis[part][i0:i1, j0:j1] += cov
        if self.labels is not None and part in self.label_of:
            self.labels[i0:i1, j0:j1][cov >= 0.5] = self.label_of[part]


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of [H, W, C] (edge padding, radius ceil(3 sigma))."""
    r = int(math.ceil(3.0 * sigma))
    if r == 0 or sigma < 1e-3:
        return img
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    pad = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="edge")
    out = sum(k[i] * pad[i:i + img.shape[0]] for i in range(2 * r + 1))
    pad = np.pad(out, ((0, 0), (r, r), (0, 0)), mode="edge")
    return sum(k[i] * pad[:, i:i + img.shape[1]] for i in range(2 * r + 1))


def downsample(a: np.ndarray, s: int) -> np.ndarray:
    """Box filter: [H*s, W*s, ...] -> [H, W, ...]."""
    if s == 1:
        return a
    h, w = a.shape[0] // s, a.shape[1] // s
    return a.reshape(h, s, w, s, *a.shape[2:]).mean(axis=(1, 3))


def downsample_labels(labels: np.ndarray, s: int, num_labels: int) -> np.ndarray:
    """Majority vote: uint8 [H*s, W*s] labels in 0..num_labels-1 -> uint8 [H, W].

    Each output pixel takes the most frequent label of its ``s x s`` samples; a tie goes to the
    higher label."""
    if s == 1:
        return labels
    h, w = labels.shape[0] // s, labels.shape[1] // s
    block = np.arange(h * w).reshape(h, w).repeat(s, 0).repeat(s, 1)
    counts = np.bincount((block * num_labels + labels).ravel(),
                         minlength=h * w * num_labels).reshape(h * w, num_labels)
    # argmax takes the first maximum: search the reversed labels so ties go to the higher one.
    top = num_labels - 1 - np.argmax(counts[:, ::-1], axis=1)
    return top.astype(np.uint8).reshape(h, w)
