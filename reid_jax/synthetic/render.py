"""Renders one synthetic person crop (128 x 64 RGB) with numpy.

A person (``Person``: the 27 Market-1501 attributes plus identity detail the attributes do not
capture) is drawn into a scene (``Scene``: camera, view, pose, crop, occluder, noise seed) with
signed-distance shapes (ellipses, tapered capsules, convex polygons; ``reid_jax.synthetic.canvas``).
Coverage is antialiased analytically from the signed distance and the canvas is rendered at
``supersample`` x the output size and box-filtered down. Every shape is evaluated only inside
its bounding box, so an image costs a few milliseconds.

Post-processing is per pixel or linear and shift-invariant (light level, colour cast and
vertical light gradient; Gaussian blur; sensor noise from ``Scene.noise_seed``), so changing one
part of the person changes pixels only inside that part's region dilated by ``blur_radius``.
``render(..., return_masks=True)`` returns that region per part (``PARTS``): the fraction of each
output pixel that shows the part before blur.

Coordinates are output pixels: x to the right (0..64), y down (0..128).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

from reid_jax.synthetic.canvas import (
    INF_BOX,
    RGB,
    Canvas,
    Shape,
    above,
    below,
    capsule,
    downsample,
    downsample_labels,
    ellipse,
    gaussian_blur,
    intersect,
    polygon,
    rect,
    union,
)
from reid_jax.synthetic.person import (
    COLOUR_RGB,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    PART_REGIONS,
    PARTS,
    PERSON_PARTS,
    REGIONS,
    Camera,
    Occluder,
    Person,
    Scene,
)

_PART_LABELS: dict[str, int] = {part: REGIONS.index(r) for part, r in PART_REGIONS.items()}


# ----------------------------------------------------------------------------------------------
# Colours.


def _clip_rgb(rgb: np.ndarray | tuple[float, ...]) -> RGB:
    a = np.clip(np.asarray(rgb, np.float64), 0.02, 0.97)
    return (float(a[0]), float(a[1]), float(a[2]))


def clothing_rgb(name: str, shade: tuple[float, float, float, float], other: RGB) -> RGB:
    """The worn colour: a named colour (``COLOUR_RGB``) in this person's shade, or ``other``
    for 'none'. ``shade`` = (brightness, dr, dg, db)."""
    if name == "none":
        return other
    base = np.asarray(COLOUR_RGB[name])
    return _clip_rgb(base * shade[0] + np.asarray(shade[1:]))


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return _clip_rgb(np.asarray(a) * (1 - t) + np.asarray(b) * t)


def _scale_rgb(a: RGB | np.ndarray, f: float) -> RGB:
    return _clip_rgb(np.asarray(a) * f)


_GREY_HAIR = (0.80, 0.80, 0.78)
_HAIR_GREYING = {1: 0.0, 2: 0.0, 3: 0.18, 4: 0.85}


# ----------------------------------------------------------------------------------------------
# Background panorama of a camera (cached: one per camera and supersampling factor).

PANORAMA_WIDTH = 3 * IMAGE_WIDTH
PANORAMA_HEIGHT = IMAGE_HEIGHT + 24


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Value noise in [-1, 1] of shape [h, w] with features about ``cell`` pixels wide."""
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    grid = rng.uniform(-1.0, 1.0, (gh, gw))
    yy = np.arange(h) / cell
    xx = np.arange(w) / cell
    y0, x0 = yy.astype(int), xx.astype(int)
    ty, tx = (yy - y0)[:, None], (xx - x0)[None, :]
    ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)
    g00 = grid[y0][:, x0]
    g01 = grid[y0][:, x0 + 1]
    g10 = grid[y0 + 1][:, x0]
    g11 = grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - tx) + g01 * tx) * (1 - ty) + (g10 * (1 - tx) + g11 * tx) * ty


@functools.lru_cache(maxsize=32)
def camera_panorama(camera: Camera, supersample: int) -> np.ndarray:
    """float32[(PANORAMA_HEIGHT * s), (PANORAMA_WIDTH * s), 3]: the camera's background."""
    s = supersample
    h, w = PANORAMA_HEIGHT * s, PANORAMA_WIDTH * s
    rng = np.random.default_rng(camera.bg_seed)
    ys = ((np.arange(h) + 0.5) / s)[:, None]
    xs = ((np.arange(w) + 0.5) / s)[None, :]
    img = np.zeros((h, w, 3), np.float32)
    hz = camera.horizon
    wall1, wall2 = np.asarray(camera.wall_rgb), np.asarray(camera.wall2_rgb)
    g1, g2 = np.asarray(camera.ground_rgb), np.asarray(camera.ground2_rgb)
    n_fine = _smooth_noise(rng, h, w, 3.0 * s)
    n_coarse = _smooth_noise(rng, h, w, 24.0 * s)

    # Wall (above the horizon).
    if camera.wall == "building":
        wall = wall1 * (1 + 0.06 * n_coarse[..., None])
        wx, wy = (xs - rng.uniform(0, 16)) % 16.0, (ys - hz) % 20.0
        window = (wx > 3) & (wx < 13) & (wy > 4) & (wy < 16)
        frame = (wx > 2) & (wx < 14) & (wy > 3) & (wy < 17) & ~window
        glass = wall2[None, None, :] * (0.8 + 0.25 * (ys / hz))[..., None]
        wall = np.where(window[..., None], glass, wall)
        wall = np.where(frame[..., None], wall1 * 0.7, wall)
    elif camera.wall == "brick":
        row = np.floor((ys - hz) / 4.0)
        bx = (xs + 4.5 * (row % 2)) % 9.0
        mortar = ((ys - hz) % 4.0 < 0.8) | (bx < 0.8)
        tone = 1 + 0.12 * _smooth_noise(rng, h, w, 5.0 * s)
        wall = np.where(mortar[..., None], wall2 * np.ones_like(tone)[..., None],
                        wall1 * tone[..., None])
    elif camera.wall == "glass":
        px = xs % 12.0
        refl = 0.85 + 0.3 * np.abs(((xs + 0.6 * ys) % 30.0) / 30.0 - 0.5)
        wall = wall1 * refl[..., None] * (1 + 0.04 * n_coarse[..., None])
        mullion = (px < 1.2) | ((ys - hz) % 26.0 < 1.2)
        wall = np.where(mullion[..., None], wall2 * np.ones((h, w, 1)), wall)
    elif camera.wall == "trees":
        sky = wall2 * (1.05 - 0.25 * (ys / hz))[..., None] * np.ones((1, w, 1))
        foliage = n_coarse * 0.6 + n_fine * 0.4
        canopy_edge = hz - 34 - 14 * _smooth_noise(rng, 1, w, 10.0 * s)[0][None, :]
        tree = (ys > canopy_edge) & (foliage > -0.55)
        wall = np.where(tree[..., None], wall1 * (0.75 + 0.35 * foliage)[..., None], sky)
        trunks = ((xs + rng.uniform(0, 40)) % 40.0 < 3.0) & (ys > hz - 14)
        wall = np.where(trunks[..., None], np.array([0.28, 0.22, 0.16]), wall)
    else:  # hedge
        wall = wall2 * (1 + 0.05 * n_coarse[..., None]) * np.ones((h, w, 1))
        hedge = ys > hz - 16 + 2 * _smooth_noise(rng, 1, w, 4.0 * s)[0][None, :]
        wall = np.where(hedge[..., None], wall1 * (0.8 + 0.25 * n_fine)[..., None], wall)

    # Ground (below the horizon), with perspective texture.
    depth = np.maximum(ys - hz, 0.5)  # grows toward the viewer
    gx = (xs - w / (2 * s)) * (40.0 / (depth + 40.0))
    if camera.ground == "paving":
        gy = 300.0 / (depth + 6.0)
        line = ((gy % 1.0) < 0.08 * (1 + 6 / depth)) | ((gx % 9.0) < 0.6)
        ground = g1 * (1 + 0.07 * n_fine[..., None])
        ground = np.where(line[..., None], g2, ground)
    elif camera.ground == "tiles":
        gy = 300.0 / (depth + 6.0)
        checker = ((np.floor(gy) + np.floor(gx / 8.0)) % 2 == 0)
        ground = np.where(checker[..., None], g1, g2) * (1 + 0.04 * n_fine[..., None])
    elif camera.ground == "asphalt":
        ground = g1 * (1 + 0.12 * n_fine[..., None] + 0.06 * n_coarse[..., None])
        marking = (np.abs(gx - 14.0) < 1.2) & ((300.0 / (depth + 6.0)) % 2.0 < 1.2)
        ground = np.where(marking[..., None], g2, ground)
    else:  # grass with a paved path in the middle
        grass = g1 * (0.85 + 0.25 * n_fine[..., None] + 0.1 * n_coarse[..., None])
        path = np.abs(gx) < 30.0
        ground = np.where(path[..., None], g2 * (1 + 0.05 * n_fine[..., None]), grass)
    img[:] = np.where((ys < hz)[..., None], wall, ground)
    # A soft shadow line where wall meets ground.
    img *= (1 - 0.25 * np.exp(-np.abs(ys - hz) / 1.5))[..., None]
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The person.


class _Body(NamedTuple):
    """Proportions in fractions of the height (``*_f`` measured from the soles) and widths in
    output pixels."""

    head_h: float
    sh_f: float
    waist_f: float
    hip_f: float
    knee_f: float
    ankle_f: float
    sw: float
    waist: float
    hip: float
    depth: float
    thigh_r: float
    ankle_r: float
    arm_r: float
    fore_r: float
    hand_r: float
    neck_r: float
    stoop: float


def _body(person: Person, height: float) -> _Body:
    child = person.age == 1
    head_h = 0.165 if child else (0.127 if person.female else 0.132)
    neck_h = 0.025 if child else 0.032
    sh_f = 1.0 - head_h - neck_h
    hip_f = (0.44 if child else 0.485) * person.height
    waist_f = hip_f + 0.36 * (sh_f - hip_f)
    age_w = {1: 1.0, 2: 0.95, 3: 1.05, 4: 1.06}[person.age]
    wf = height * person.width * age_w
    if child:
        sw, waist, hip, depth = 0.215, 0.175, 0.175, 0.135
    elif person.female:
        sw, waist, hip, depth = 0.19, 0.128, 0.195, 0.13
    else:
        sw, waist, hip, depth = 0.265, 0.2, 0.18, 0.155
    limb = 0.93 if person.female else 1.0
    return _Body(
        head_h=head_h, sh_f=sh_f, waist_f=waist_f, hip_f=hip_f, knee_f=hip_f * 0.52,
        ankle_f=0.04, sw=sw * wf, waist=waist * wf, hip=hip * wf, depth=depth * wf,
        thigh_r=0.046 * wf * limb, ankle_r=0.025 * wf, arm_r=0.029 * wf * limb,
        fore_r=0.023 * wf * limb, hand_r=0.024 * height, neck_r=0.032 * wf * limb,
        stoop=0.16 if person.age == 4 else 0.0)


def _draw_person(cv: Canvas, p: Person, sc: Scene) -> None:
    """Draws ``p`` in the view of ``sc`` (dispatch on front/back or side views)."""
    b = _body(p, sc.height)
    colours = {
        "up": clothing_rgb(p.up_colour, p.up_shade, p.up_other),
        "down": clothing_rgb(p.down_colour, p.down_shade, p.down_other),
        "hair": _mix(p.hair_rgb, _GREY_HAIR, _HAIR_GREYING[p.age]),
    }
    if sc.view in ("front", "back"):
        _draw_frontal(cv, p, sc, b, colours)
    else:
        _draw_side(cv, p, sc, b, colours)


def _draw_frontal(cv: Canvas, p: Person, sc: Scene, b: _Body, col: dict[str, RGB]) -> None:
    H, cx = sc.height, sc.x
    front = sc.view == "front"
    lat = 1.0 if front else -1.0  # image x sign of the person's left side

    def Y(f: float) -> float:
        return sc.foot_y - f * H

    up, down, hair = col["up"], col["down"], col["hair"]
    skin = p.skin
    hh = b.head_h * H
    # Old persons stoop: head and shoulders sink a little.
    sink = b.stoop * 0.12 * H
    hx, hy = cx, Y(1.0 - b.head_h / 2) + sink
    hrx, hry = hh * 0.40, hh * 0.5
    y_sh = Y(b.sh_f) + sink * 0.8
    y_waist, y_hip = Y(b.waist_f), Y(b.hip_f)
    long_len = (0.10, 0.17, 0.13)[p.hair_style] * H

    # Long hair behind the body (visible beside the neck and below the head).
    if p.long_hair and front:
        cv.paint(polygon([(hx - hrx * 1.15, hy), (hx + hrx * 1.15, hy),
                           (hx + hrx * 1.35, y_sh + long_len), (hx - hrx * 1.35, y_sh + long_len)]),
                 hair, "hair")

    # Legs (walking: one foot lifts a little), lower clothing and shoes.
    lift = 0.012 * H * sc.stride
    legs = []
    for side in (-1.0, 1.0):
        lx = cx + side * (b.hip / 2 - b.thigh_r * 0.95)
        ax = cx + side * (b.hip / 2 - b.thigh_r) * 0.75
        ay = Y(b.ankle_f) - lift * max(0.0, side * math.sin(sc.phase))
        legs.append((lx, ax, ay))
    skin_legs = (not p.pants) or p.short_lower
    for lx, ax, ay in legs:
        if skin_legs:
            cv.paint(capsule(lx, y_hip - 0.01 * H, ax, ay, b.thigh_r * 0.88, b.ankle_r * 0.9),
                     skin, "skin_legs", shade=(lx, b.thigh_r * 1.2))
        if p.pants:
            if p.short_lower:
                kx, ky = lx + 0.62 * (ax - lx), y_hip + 0.62 * (ay - y_hip) * 0.78
                cv.paint(capsule(lx, y_hip - 0.01 * H, kx, ky, b.thigh_r * 1.06, b.thigh_r),
                         down, "lower", shade=(lx, b.thigh_r * 1.3))
            else:
                cv.paint(capsule(lx, y_hip - 0.01 * H, ax, ay, b.thigh_r, b.ankle_r * 1.2),
                         down, "lower", shade=(lx, b.thigh_r * 1.3))
    if p.pants:  # pelvis
        crotch = y_hip + 0.05 * H
        cv.paint(polygon([(cx - b.waist / 2, y_waist), (cx + b.waist / 2, y_waist),
                           (cx + b.hip / 2, y_hip), (cx + b.hip / 2 - b.thigh_r, crotch),
                           (cx - b.hip / 2 + b.thigh_r, crotch), (cx - b.hip / 2, y_hip)]),
                 down, "lower", shade=(cx, b.hip / 2))
    for _, ax, ay in legs:
        cv.paint(ellipse(ax, ay + 0.018 * H, b.ankle_r * 1.45, 0.024 * H), p.shoe_rgb, "shoes")
    if not p.pants:  # skirt or dress, hem above the knee when short
        hem_f = b.knee_f + 0.07 if p.short_lower else 0.13
        flare = 1.22 if p.short_lower else 1.42
        y_hem = Y(hem_f)
        cv.paint(polygon([(cx - b.waist / 2, y_waist), (cx + b.waist / 2, y_waist),
                           (cx + b.hip * flare / 2, y_hem), (cx - b.hip * flare / 2, y_hem)]),
                 down, "lower", shade=(cx, b.hip * flare / 2))

    # Torso: chest (shoulders -> waist) and hips (waist -> hip), each convex.
    chest = polygon([(cx - b.sw * 0.30, y_sh - 0.012 * H), (cx + b.sw * 0.30, y_sh - 0.012 * H),
                      (cx + b.sw / 2, y_sh + 0.022 * H), (cx + b.sw * 0.46, y_sh + 0.11 * H),
                      (cx + b.waist / 2, y_waist), (cx - b.waist / 2, y_waist),
                      (cx - b.sw * 0.46, y_sh + 0.11 * H), (cx - b.sw / 2, y_sh + 0.022 * H)])
    hips = polygon([(cx - b.waist / 2, y_waist - 1), (cx + b.waist / 2, y_waist - 1),
                     (cx + b.hip * 0.52, y_hip + 0.01 * H), (cx - b.hip * 0.52, y_hip + 0.01 * H)])
    torso = union(chest, hips)
    # Neck first, the shirt covers its base.
    cv.paint(capsule(hx, hy + hry * 0.5, hx, y_sh + 0.01 * H, b.neck_r, b.neck_r * 1.1),
             _scale_rgb(skin, 0.9), "head")
    cv.paint(torso, up, "upper", shade=(cx, b.sw / 2))
    _draw_pattern(cv, p, torso, cx, y_sh, y_waist, y_hip, b, H, front)
    if front:  # neckline
        cv.paint(intersect(ellipse(hx, y_sh - 0.012 * H, b.neck_r * 1.2, 0.03 * H),
                           below(y_sh - 0.014 * H)), skin, "head")

    # Backpack: straps from the front, the pack itself from behind (it hides the shirt).
    if p.backpack:
        if front:
            for side in (-1.0, 1.0):
                sx = cx + side * b.sw * 0.27
                cv.paint(capsule(sx, y_sh - 0.01 * H, sx + side * 0.01 * H, y_sh + 0.17 * H,
                                  0.016 * H, 0.014 * H), p.backpack_rgb, "backpack")
        else:
            pw = max(b.sw * 0.4, 0.075 * H)
            cv.paint(rect(cx - pw, y_sh - 0.015 * H, cx + pw, y_sh + 0.25 * H, 0.03 * H),
                     p.backpack_rgb, "backpack", shade=(cx, pw))
            cv.paint(rect(cx - pw * 0.7, y_sh + 0.15 * H, cx + pw * 0.7, y_sh + 0.23 * H,
                           0.015 * H), _scale_rgb(p.backpack_rgb, 0.78), "backpack")

    # Long hair over the back (back view), strands over the shoulders (front view).
    if p.long_hair:
        if not front:
            if p.hair_style == 2:  # ponytail
                cv.paint(capsule(hx, hy + hry * 0.3, hx, y_sh + long_len * 0.8,
                                  hrx * 0.38, hrx * 0.2), hair, "hair")
            else:  # narrower over a backpack, so the pack stays visible beside it
                w0, w1 = (0.75, 0.6) if p.backpack else (1.1, 1.25)
                cv.paint(polygon([(hx - hrx * w0, hy), (hx + hrx * w0, hy),
                                   (hx + hrx * w1, y_sh + long_len),
                                   (hx - hrx * w1, y_sh + long_len)]), hair, "hair")
        elif p.hair_style != 2:
            for side in (-1.0, 1.0):
                cv.paint(capsule(hx + side * hrx * 0.95, hy + hry * 0.2,
                                  hx + side * hrx * 1.15, y_sh + long_len * 0.75,
                                  hrx * 0.32, hrx * 0.22), hair, "hair")

    # Arms: sleeves (upper clothing) and skin; a hand at the end.
    swing = 0.02 * H * sc.stride * math.sin(sc.phase)
    hands = {}
    for side in (-1.0, 1.0):
        sx, sy = cx + side * (b.sw / 2 - b.arm_r * 0.9), y_sh + 0.028 * H
        ex, ey = sx + side * 0.018 * H, sy + 0.165 * H
        wx, wy = ex + side * 0.006 * H + side * swing, ey + 0.15 * H
        _draw_arm(cv, p, (sx, sy), (ex, ey), (wx, wy), b, up, skin, 1.0)
        hands[side] = (wx, wy + b.hand_r * 0.8)

    # Shoulder bag: strap across the body, bag at the hip on its side.
    if p.bag:
        s = lat * p.bag_side
        bx = cx + s * (b.hip / 2 + 0.02 * H)
        by = y_hip - 0.02 * H
        cv.paint(capsule(cx - s * b.sw * 0.33, y_sh - 0.005 * H, bx, by - 0.05 * H,
                          0.009 * H, 0.009 * H), _scale_rgb(p.bag_rgb, 0.7), "bag")
        cv.paint(rect(bx - 0.055 * H, by - 0.055 * H, bx + 0.055 * H, by + 0.05 * H, 0.012 * H),
                 p.bag_rgb, "bag", shade=(bx, 0.06 * H))
    # Handbag hanging from one hand.
    if p.handbag:
        hxh, hyh = hands[lat * p.handbag_side]
        _draw_handbag(cv, hxh, hyh, H, p.handbag_rgb)

    # Head: face (front) or back of the head, then hair, then hat.
    _draw_head_frontal(cv, p, hx, hy, hrx, hry, H, front, hair)


def _draw_arm(cv: Canvas, p: Person, sh: tuple[float, float], el: tuple[float, float],
              wr: tuple[float, float], b: _Body, up: RGB, skin: RGB, dim: float) -> None:
    """Upper arm sh -> el, forearm el -> wr; a short sleeve covers 45 % of the upper arm."""
    (sx, sy), (ex, ey), (wx, wy) = sh, el, wr
    upc, skinc = _scale_rgb(up, dim), _scale_rgb(skin, dim)
    if p.short_sleeves:
        cv.paint(capsule(sx, sy, ex, ey, b.arm_r * 0.85, b.fore_r * 0.95), skinc, "skin_arms")
        cv.paint(capsule(ex, ey, wx, wy, b.fore_r * 0.95, b.fore_r * 0.8), skinc, "skin_arms")
        mx, my = sx + 0.45 * (ex - sx), sy + 0.45 * (ey - sy)
        cv.paint(capsule(sx, sy, mx, my, b.arm_r * 1.08, b.arm_r * 1.05), upc, "upper")
    else:
        cv.paint(capsule(sx, sy, ex, ey, b.arm_r, b.arm_r * 0.92), upc, "upper")
        cv.paint(capsule(ex, ey, wx, wy, b.arm_r * 0.92, b.fore_r), upc, "upper")
    cv.paint(ellipse(wx, wy + b.hand_r * 0.6, b.hand_r * 0.8, b.hand_r), skinc, "skin_arms")


def _draw_handbag(cv: Canvas, x: float, y: float, H: float, rgb: RGB) -> None:
    w, h = 0.05 * H, 0.07 * H
    top = y + 0.02 * H
    cv.paint(capsule(x, y, x, top + 0.005 * H, 0.006 * H, 0.006 * H), _scale_rgb(rgb, 0.7),
             "handbag")
    cv.paint(polygon([(x - w * 0.8, top), (x + w * 0.8, top), (x + w, top + h),
                       (x - w, top + h)]), rgb, "handbag", shade=(x, w))


def _draw_pattern(cv: Canvas, p: Person, torso: Shape, cx: float, y_sh: float,
                  y_waist: float, y_hip: float, b: _Body, H: float, front: bool) -> None:
    """Identity detail on the shirt (part 'upper'): stripes, a chest logo, a collar or a
    two-tone lower half; small enough that the labelled colour stays dominant."""
    rgb = p.pattern_rgb
    if p.pattern == "stripes":
        period = 0.045 * H

        def stripes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return np.abs(((y - y_sh) % period) - period / 2) - period * 0.18 + 0 * x

        cv.paint(intersect(torso, Shape(stripes, INF_BOX)), rgb, "upper", shade=(cx, b.sw / 2))
    elif p.pattern == "logo" and front:
        ly = y_sh + 0.09 * H
        cv.paint(ellipse(cx, ly, 0.035 * H, 0.03 * H), rgb, "upper")
    elif p.pattern == "collar":
        cv.paint(intersect(torso, above(y_sh + 0.018 * H)), rgb, "upper")
    elif p.pattern == "two_tone":
        cv.paint(intersect(torso, below(y_waist + 0.02 * H)), rgb, "upper", shade=(cx, b.sw / 2))


def _draw_head_frontal(cv: Canvas, p: Person, hx: float, hy: float, rx: float, ry: float,
                       H: float, front: bool, hair: RGB) -> None:
    """Head seen from the front or the back, its hair, then the hat.

    The hair's shape depends on the hair label (``long_hair``: a bob framing the face, or a
    short cut with sideburns) and ``hair_style``, never on ``female``: a gender change must not
    change the hair while the hair label stays (docs/attribute_maps.md, 'Gender and hair')."""
    skin = p.skin
    style = p.hair_style
    bob = p.long_hair
    if front:
        if bob:  # hair framing the face down to the jaw
            cv.paint(intersect(ellipse(hx, hy + 0.08 * ry, rx * 1.25, ry * 1.06),
                               above(hy + 0.7 * ry)), hair, "hair")
        cv.paint(ellipse(hx, hy, rx, ry), skin, "head", shade=(hx, rx * 1.3))
        eye_y = hy + 0.02 * ry
        for side in (-1.0, 1.0):
            cv.paint(ellipse(hx + side * rx * 0.4, eye_y, 0.1 * rx, 0.07 * ry),
                     (0.12, 0.08, 0.07), "head")
        cv.paint(ellipse(hx, hy + 0.5 * ry, rx * 0.28, ry * 0.06), _scale_rgb(skin, 0.72),
                 "head")
        if p.glasses:
            cv.paint(rect(hx - rx * 0.75, eye_y - 0.03 * ry, hx + rx * 0.75, eye_y + 0.1 * ry),
                     (0.1, 0.1, 0.1), "head", alpha=0.7)
        # Hair on top (fringe): lower for bobs and long hair, a side parting for style 1.
        top = hy - (0.18 if bob else 0.32) * ry - (0.1 * ry if style == 1 else 0.0)
        cv.paint(intersect(ellipse(hx, hy - 0.06 * ry, rx * 1.07, ry * 1.0), above(top)),
                           hair, "hair")
        if not bob:  # sideburns
            for side in (-1.0, 1.0):
                cv.paint(ellipse(hx + side * rx * 0.93, hy - 0.15 * ry, 0.17 * rx, 0.32 * ry),
                         hair, "hair")
    else:
        # Back of the head: mostly hair; a little skin at the nape for short hair.
        cv.paint(ellipse(hx, hy, rx, ry), _scale_rgb(skin, 0.85), "head")
        low = hy + (0.95 if bob else 0.55) * ry
        back = ellipse(hx, hy + (0.05 * ry if bob else 0.0), rx * (1.2 if bob else 1.06),
                       ry * (1.05 if bob else 1.0))
        cv.paint(intersect(back, above(low)), hair, "hair")
    if p.hat:
        _draw_hat(cv, p, hx, hy, rx, ry, front, 0.0)


def _draw_hat(cv: Canvas, p: Person, hx: float, hy: float, rx: float, ry: float,
              front: bool, dirx: float) -> None:
    """Hat on a head centred (hx, hy); ``dirx`` = facing direction for side views, 0 frontal."""
    rgb = p.hat_rgb
    band = hy - (0.12 if p.hat_style == "beanie" else 0.25) * ry
    cv.paint(intersect(ellipse(hx, hy - 0.2 * ry, rx * 1.14, ry * 1.08), above(band)), rgb, "hat",
                       shade=(hx, rx * 1.3))
    cv.paint(rect(hx - rx * 1.1, band - 0.16 * ry, hx + rx * 1.1, band), _scale_rgb(rgb, 0.75),
             "hat")  # hat band
    if p.hat_style == "cap":
        if dirx:
            cv.paint(ellipse(hx + dirx * rx * 1.05, band, rx * 0.75, 0.12 * ry), rgb, "hat")
        elif front:
            cv.paint(ellipse(hx, band + 0.04 * ry, rx * 1.05, 0.16 * ry), _scale_rgb(rgb, 0.8),
                     "hat")
    elif p.hat_style == "brimmed":
        cv.paint(ellipse(hx, band, rx * 1.75, 0.14 * ry), _scale_rgb(rgb, 0.9), "hat")


def _draw_side(cv: Canvas, p: Person, sc: Scene, b: _Body, col: dict[str, RGB]) -> None:
    H, cx = sc.height, sc.x
    d = -1.0 if sc.view == "left" else 1.0  # facing direction in x
    near = d  # the person's side facing the camera, in the Person's +1 = left convention
    up, down, hair, skin = col["up"], col["down"], col["hair"], p.skin

    # Legs in stride: angles from vertical, positive = forward.
    theta = 0.42 * sc.stride * math.sin(sc.phase)
    leg_len = (b.hip_f - b.ankle_f) * H
    legs = {}
    for which, th in (("near", theta), ("far", -theta)):
        kx, ky = d * math.sin(th) * leg_len * 0.5, math.cos(th) * leg_len * 0.5
        shin = th - 0.9 * max(0.0, -th)  # the trailing leg bends at the knee
        ax, ay = kx + d * math.sin(shin) * leg_len * 0.5, ky + math.cos(shin) * leg_len * 0.5
        legs[which] = (kx, ky, ax, ay)
    lowest = max(v[3] for v in legs.values())
    hip_y = sc.foot_y - b.ankle_f * H - lowest
    drop = hip_y - (sc.foot_y - b.hip_f * H)

    def Y(f: float) -> float:
        return sc.foot_y - f * H + drop

    y_sh, y_waist, y_hip = Y(b.sh_f), Y(b.waist_f), hip_y
    # Stooping: the upper body leans forward about the hip.
    lean = b.stoop

    def lean_pt(x: float, y: float) -> tuple[float, float]:
        dy = y - y_hip
        return x - d * math.sin(lean) * dy, y_hip + dy * math.cos(lean)

    dt = b.depth
    hh = b.head_h * H
    hx, hy = lean_pt(cx + d * 0.012 * H, Y(1.0 - b.head_h / 2))
    hrx, hry = hh * 0.44, hh * 0.5
    long_len = (0.10, 0.17, 0.13)[p.hair_style] * H

    def leg_pts(which: str) -> tuple[float, float, float, float, float, float]:
        kx, ky, ax, ay = legs[which]
        lx = cx + (0.0 if which == "near" else -d * 0.01 * H)
        return lx, y_hip, lx + kx, y_hip + ky, lx + ax, y_hip + ay

    skin_legs = (not p.pants) or p.short_lower

    def draw_leg(which: str, dim: float) -> None:
        hx0, hy0, kx, ky, ax, ay = leg_pts(which)
        dn, sk = _scale_rgb(down, dim), _scale_rgb(skin, dim)
        if skin_legs:
            cv.paint(capsule(hx0, hy0, kx, ky, b.thigh_r * 0.9, b.ankle_r * 1.25), sk,
                     "skin_legs")
            cv.paint(capsule(kx, ky, ax, ay, b.ankle_r * 1.25, b.ankle_r * 0.9), sk, "skin_legs")
        if p.pants:
            if p.short_lower:
                mx, my = hx0 + 0.8 * (kx - hx0), hy0 + 0.8 * (ky - hy0)
                cv.paint(capsule(hx0, hy0, mx, my, b.thigh_r * 1.1, b.thigh_r), dn, "lower")
            else:
                cv.paint(capsule(hx0, hy0, kx, ky, b.thigh_r * 1.05, b.ankle_r * 1.45), dn,
                         "lower")
                cv.paint(capsule(kx, ky, ax, ay, b.ankle_r * 1.45, b.ankle_r * 1.25), dn,
                         "lower")
        cv.paint(ellipse(ax + d * 0.022 * H, ay + 0.017 * H, 0.047 * H, 0.021 * H),
                 _scale_rgb(p.shoe_rgb, dim), "shoes")

    # Arms swing against the legs.
    upper_len, fore_len = 0.165 * H, 0.15 * H
    sh_x, sh_y = lean_pt(cx, y_sh + 0.03 * H)

    def arm_pts(alpha: float) -> tuple[tuple[float, float], ...]:
        ex, ey = sh_x + d * math.sin(alpha) * upper_len, sh_y + math.cos(alpha) * upper_len
        a2 = alpha + 0.25
        wx, wy = ex + d * math.sin(a2) * fore_len, ey + math.cos(a2) * fore_len
        return (sh_x, sh_y), (ex, ey), (wx, wy)

    alpha = -0.5 * sc.stride * math.sin(sc.phase)
    near_arm, far_arm = arm_pts(alpha), arm_pts(-alpha)

    def hand_of(arm: tuple[tuple[float, float], ...]) -> tuple[float, float]:
        return arm[2][0], arm[2][1] + b.hand_r * 0.8

    # Accessories on the far side are drawn first, mostly hidden by the body.
    if p.long_hair:
        tail_x = hx - d * hrx * (0.55 if p.hair_style == 2 else 0.35)
        cv.paint(capsule(tail_x, hy, tail_x - d * 0.01 * H, y_sh + long_len * 0.85,
                          hrx * (0.35 if p.hair_style == 2 else 0.6), hrx * 0.3), hair, "hair")
    if p.bag and p.bag_side != near:
        bx, by = cx - d * 0.02 * H, y_hip - 0.03 * H
        cv.paint(rect(bx - 0.05 * H, by - 0.05 * H, bx + 0.05 * H, by + 0.05 * H, 0.012 * H),
                 _scale_rgb(p.bag_rgb, 0.8), "bag")
    _draw_arm(cv, p, *far_arm, b, up, skin, 0.78)
    if p.handbag and p.handbag_side != near:
        _draw_handbag(cv, *hand_of(far_arm), H, _scale_rgb(p.handbag_rgb, 0.8))
    draw_leg("far", 0.8)
    draw_leg("near", 1.0)
    if p.pants:
        hx0 = cx
        cv.paint(ellipse(hx0, y_hip + 0.005 * H, dt * 0.5, 0.05 * H), down, "lower")
    else:
        hem_f = b.knee_f + 0.07 if p.short_lower else 0.13
        y_hem = Y(hem_f)
        xs = [leg_pts(w)[2] for w in legs] + [leg_pts(w)[4] for w in legs]
        spread = max(abs(x - cx) for x in xs) if not p.short_lower else 0.0
        half = max(dt * (0.8 if p.short_lower else 0.95), spread * 0.9)
        wb, wf = lean_pt(cx - d * dt * 0.45, y_waist), lean_pt(cx + d * dt * 0.42, y_waist)
        cv.paint(polygon([wb, wf, (cx + d * half, y_hem), (cx - d * half, y_hem)]), down,
                 "lower", shade=(cx, half))

    # Torso in profile.
    female_chest = 0.06 * dt if p.female else 0.0
    torso_pts = [lean_pt(x, y) for x, y in (
        (cx - d * dt * 0.42, y_sh - 0.012 * H), (cx + d * dt * 0.3, y_sh - 0.014 * H),
        (cx + d * (dt * 0.5 + female_chest), y_sh + 0.08 * H),
        (cx + d * dt * 0.42, y_waist), (cx + d * dt * 0.46, y_hip + 0.012 * H),
        (cx - d * dt * 0.5, y_hip + 0.012 * H), (cx - d * dt * 0.5, y_sh + 0.06 * H))]
    # Neck first, the shirt covers its base.
    nx, ny = lean_pt(cx + d * 0.004 * H, y_sh)
    cv.paint(capsule(hx, hy + hry * 0.4, nx, ny + 0.01 * H, b.neck_r, b.neck_r * 1.1),
             _scale_rgb(skin, 0.9), "head")
    torso = polygon(torso_pts)
    cv.paint(torso, up, "upper", shade=(cx, dt * 0.6))
    if p.pattern == "stripes":
        period = 0.045 * H

        def stripes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return np.abs(((y - y_sh) % period) - period / 2) - period * 0.18 + 0 * x

        cv.paint(intersect(torso, Shape(stripes, INF_BOX)), p.pattern_rgb, "upper")
    elif p.pattern == "two_tone":
        cv.paint(intersect(torso, below(y_waist + 0.02 * H)), p.pattern_rgb, "upper")
    elif p.pattern == "collar":
        cv.paint(intersect(torso, above(y_sh + 0.012 * H)), p.pattern_rgb, "upper")

    # Backpack on the back, strap over the shoulder.
    if p.backpack:
        back_pts = [lean_pt(cx - d * dt * 0.5, y) for y in (y_sh, y_sh + 0.25 * H)]
        (bx0, by0), (bx1, by1) = back_pts
        pack = polygon([(bx0 + d * 0.01 * H, by0), (bx0 - d * 0.085 * H, by0 + 0.01 * H),
                         (bx1 - d * 0.095 * H, by1), (bx1 + d * 0.01 * H, by1)])
        cv.paint(pack, p.backpack_rgb, "backpack")
        s0, s1 = lean_pt(cx - d * dt * 0.1, y_sh - 0.01 * H), lean_pt(cx + d * dt * 0.3,
                                                                      y_sh + 0.13 * H)
        cv.paint(capsule(*s0, *s1, 0.014 * H, 0.013 * H), p.backpack_rgb, "backpack")
    if p.bag:
        s0 = lean_pt(cx, y_sh - 0.005 * H)
        bx, by = cx + d * 0.01 * H, y_hip - 0.03 * H
        cv.paint(capsule(*s0, bx, by - 0.04 * H, 0.009 * H, 0.009 * H),
                 _scale_rgb(p.bag_rgb, 0.7), "bag")
    # Near arm and near-side accessories.
    _draw_arm(cv, p, *near_arm, b, up, skin, 1.0)
    if p.bag and p.bag_side == near:
        bx, by = cx - d * 0.01 * H, y_hip - 0.02 * H
        cv.paint(rect(bx - 0.05 * H, by - 0.05 * H, bx + 0.05 * H, by + 0.05 * H, 0.012 * H),
                 p.bag_rgb, "bag", shade=(bx, 0.06 * H))
    if p.handbag and p.handbag_side == near:
        _draw_handbag(cv, *hand_of(near_arm), H, p.handbag_rgb)

    _draw_head_side(cv, p, hx, hy, hrx, hry, d, hair)


def _draw_head_side(cv: Canvas, p: Person, hx: float, hy: float, hrx: float, hry: float,
                    d: float, hair: RGB) -> None:
    """Head in profile facing ``d`` (+1: to the right): face to the front, hair on top and at
    the back, then the hat. The hair's shape depends on ``long_hair`` only (see
    ``_draw_head_frontal``)."""
    skin = p.skin
    cv.paint(ellipse(hx, hy, hrx, hry), skin, "head", shade=(hx, hrx * 1.4))
    cv.paint(ellipse(hx + d * hrx * 0.95, hy + 0.1 * hry, hrx * 0.16, hry * 0.12),
             _scale_rgb(skin, 0.92), "head")  # nose
    cv.paint(ellipse(hx + d * hrx * 0.55, hy, 0.09 * hrx, 0.07 * hry), (0.12, 0.08, 0.07),
             "head")
    if p.glasses:
        cv.paint(rect(hx + d * hrx * 0.3, hy - 0.04 * hry, hx + d * hrx * 0.9, hy + 0.08 * hry),
                 (0.1, 0.1, 0.1), "head", alpha=0.7)
    bob = p.long_hair
    low = hy + (0.75 if bob else 0.45) * hry
    back_hair = intersect(ellipse(hx - d * hrx * 0.08, hy - 0.02 * hry, hrx * 1.08, hry * 1.04),
                          above(low))
    cut = Shape(lambda x, y: d * (x - (hx + d * 0.15 * hrx)) + 0.6 * (y - hy), INF_BOX)
    cv.paint(intersect(back_hair, cut), hair, "hair")
    cv.paint(intersect(ellipse(hx, hy - 0.05 * hry, hrx * 1.06, hry * 1.0),
                       above(hy - 0.3 * hry)), hair, "hair")
    if p.hat:
        _draw_hat(cv, p, hx, hy, hrx, hry, True, d)


# ----------------------------------------------------------------------------------------------
# Occluders.


def _draw_occluder(cv: Canvas, occ: Occluder, rng: np.random.Generator) -> None:
    """Draws the occluder in front of everything (part 'occluder')."""
    x, s = occ.x, occ.size
    if occ.kind == "pole":
        cv.paint(rect(x - s / 2, -1, x + s / 2, IMAGE_HEIGHT + 1), occ.rgb, "occluder",
                 shade=(x, s / 2 + 0.5))
    elif occ.kind == "car":
        top = IMAGE_HEIGHT - s
        cv.paint(intersect(ellipse(x, top + s * 1.1, IMAGE_WIDTH * 1.1, s * 1.1),
                           above(IMAGE_HEIGHT + 1)), occ.rgb, "occluder")
        cv.paint(intersect(ellipse(x, top + s * 1.1, IMAGE_WIDTH * 0.9, s * 0.95),
                           above(top + s * 0.35)), _scale_rgb(occ.rgb, 1.25), "occluder")
        cv.paint(rect(-1, top + s * 0.75, IMAGE_WIDTH + 1, top + s * 0.85), occ.rgb2, "occluder")
    elif occ.kind == "bush":
        top = IMAGE_HEIGHT - s
        for _ in range(9):
            bx, by = rng.uniform(x - 18, x + 18), rng.uniform(top + 4, IMAGE_HEIGHT + 4)
            r = rng.uniform(5, 10)
            cv.paint(ellipse(bx, by, r * 1.2, r), _scale_rgb(occ.rgb, rng.uniform(0.75, 1.15)),
                     "occluder")
    else:  # part of another person, cut by the image border
        ty = IMAGE_HEIGHT * 0.3
        cv.paint(capsule(x, ty, x, IMAGE_HEIGHT + 10, s * 0.5, s * 0.55), occ.rgb, "occluder",
                 shade=(x, s * 0.6))
        cv.paint(ellipse(x + 0.1 * s, ty - 0.3 * s, s * 0.3, s * 0.36), occ.rgb2, "occluder")


# ----------------------------------------------------------------------------------------------
# Post-processing and the public entry point.


def blur_sigma(scene: Scene) -> float:
    """The Gaussian sigma (output pixels) of the camera plus per-image blur."""
    return max(scene.camera.blur + scene.blur, 0.0)


def blur_radius(scene: Scene) -> int:
    """How far (output pixels) a change spreads through the blur: ceil(3 sigma)."""
    return int(math.ceil(3.0 * blur_sigma(scene)))


def render(person: Person | None, scene: Scene, *, supersample: int = 2,
           return_masks: bool = False, return_labels: bool = False
           ) -> np.ndarray | tuple[np.ndarray, Any] | tuple[np.ndarray, Any, np.ndarray]:
    """Renders ``person`` (None: background and occluder only) as seen in ``scene``.

    Args:
      person: the person, or None for a background-only crop (a false detection).
      scene: camera, view, pose, crop, occluder and noise seed.
      supersample: render at this multiple of 128 x 64, then box-filter down.
      return_masks: also return, per part of ``PARTS``, float32[128, 64] in [0, 1]: how much
        of each pixel shows that part before blur ('person' = all person parts together).
      return_labels: also return uint8[128, 64] region labels (indices into ``REGIONS``): per
        canvas sample the front-most region whose shape contains it, then per output pixel
        the majority of its ``supersample**2`` samples (ties: the higher index).

    Returns:
      uint8[128, 64, 3] RGB; (image, masks) with ``return_masks``; (image, labels) with
      ``return_labels``; (image, masks, labels) with both. The pixels do not depend on them.
    """
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    s = supersample
    pano = camera_panorama(scene.camera, s)
    bx = int(round(np.clip(scene.bg_x, 0, PANORAMA_WIDTH - IMAGE_WIDTH) * s))
    by = int(round(np.clip(scene.bg_y, 0, PANORAMA_HEIGHT - IMAGE_HEIGHT) * s))
    canvas = pano[by:by + IMAGE_HEIGHT * s, bx:bx + IMAGE_WIDTH * s].copy()
    cv = Canvas(canvas, s, return_masks, _PART_LABELS if return_labels else None)
    # Contact shadow under the feet (scene only: independent of the person's attributes).
    if person is not None:
        cv.paint(ellipse(scene.x, scene.foot_y + 0.01 * scene.height, 0.17 * scene.height,
                          0.025 * scene.height), (0.0, 0.0, 0.0), "shadow", alpha=0.35)
        _draw_person(cv, person, scene)
    rng = np.random.default_rng(scene.noise_seed)
    if scene.occluder is not None:
        _draw_occluder(cv, scene.occluder, rng)

    img = downsample(cv.image, s)
    cam = scene.camera
    ys = (np.arange(IMAGE_HEIGHT, dtype=np.float32) + 0.5) / IMAGE_HEIGHT
    light = cam.light * scene.light * (1.0 + cam.gradient * (0.5 - ys))
    img = img * light[:, None, None] * np.asarray(cam.cast, np.float32)
    img = gaussian_blur(img, blur_sigma(scene))
    sigma = cam.noise / 255.0
    noise = rng.standard_normal((IMAGE_HEIGHT, IMAGE_WIDTH, 4), dtype=np.float32)
    img = img + sigma * (noise[..., :1] + 0.5 * noise[..., 1:])
    out = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    extras: list[Any] = []
    if return_masks:
        masks = {name: np.zeros((IMAGE_HEIGHT, IMAGE_WIDTH), np.float32) for name in PARTS}
        for name, v in cv.vis.items():
            if name in masks:
                masks[name] = downsample(v, s)
        masks["person"] = np.clip(sum(masks[n] for n in PERSON_PARTS), 0.0, 1.0)
        extras.append(masks)
    if return_labels:
        extras.append(downsample_labels(cv.labels, s, len(REGIONS)))
    return (out, *extras) if extras else out
