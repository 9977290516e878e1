"""Tests of decoding and the AGW augmentation (reid_jax/data/augment.py)."""

import io
import math
import random

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from reid_jax.data import augment as A

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _image(h=128, w=64, seed=0):
    """A smooth RGB uint8 [h, w, 3] test image with texture (not symmetric)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([yy * 255 / h, xx * 255 / w, (yy + 2 * xx) % 256], -1)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def _ref_train(pixels_u8, rng, cfg):
    """float64 reference of the recipe, as torchvision would do it step by step (HWC)."""
    x = np.asarray(Image.fromarray(pixels_u8).resize((cfg.width, cfg.height), Image.BILINEAR))
    flip = rng.random() < cfg.flip_prob
    if flip:
        x = x[:, ::-1]
    x = x.astype(np.float64) / 255.0
    if cfg.pad:
        x = np.pad(x, ((cfg.pad, cfg.pad), (cfg.pad, cfg.pad), (0, 0)), constant_values=0.0)
        top = rng.integers(0, x.shape[0] - cfg.height, endpoint=True)
        left = rng.integers(0, x.shape[1] - cfg.width, endpoint=True)
        x = x[top : top + cfg.height, left : left + cfg.width]
    x = (x - np.array(cfg.mean)) / np.array(cfg.std)
    if rng.random() < cfg.erase_prob:
        for _ in range(100):
            area = rng.uniform(*cfg.erase_area) * cfg.height * cfg.width
            aspect = rng.uniform(cfg.erase_min_aspect, 1 / cfg.erase_min_aspect)
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < cfg.width and h < cfg.height:
                t = rng.integers(0, cfg.height - h, endpoint=True)
                c = rng.integers(0, cfg.width - w, endpoint=True)
                x[t : t + h, c : c + w] = cfg.erase_fill
                break
    return x


def test_train_transform_matches_float64_reference():
    cfg = A.AugmentConfig()
    pixels = _image()
    erased = flipped = 0
    for slot in range(24):
        out = A.train_transform(Image.fromarray(pixels), A.image_rng(3, 10, slot), cfg)
        ref = _ref_train(pixels, A.image_rng(3, 10, slot), cfg)
        assert out.shape == (256, 128, 3) and out.dtype == np.float32
        np.testing.assert_allclose(out, ref, atol=2e-6, rtol=0)
        erased += bool(np.all(out == np.float32(cfg.erase_fill), axis=-1).any())
        flipped += A.image_rng(3, 10, slot).random() < 0.5
    assert 0 < erased < 24 and 0 < flipped < 24  # both branches exercised


def test_eval_transform_is_resize_and_normalise():
    cfg = A.AugmentConfig()
    pixels = _image(seed=1)
    ref = np.asarray(Image.fromarray(pixels).resize((128, 256), Image.BILINEAR)) / 255.0
    ref = (ref - MEAN) / STD
    out = A.eval_transform(Image.fromarray(pixels), cfg)
    assert out.shape == (256, 128, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=0)
    np.testing.assert_array_equal(A.eval_transform(pixels, cfg), out)  # arrays accepted too


def test_resize_is_pil_bilinear_and_bicubic_option():
    img = Image.fromarray(_image())
    np.testing.assert_array_equal(
        A.resize(img, 256, 128), np.asarray(img.resize((128, 256), Image.BILINEAR))
    )
    np.testing.assert_array_equal(
        A.resize(img, 64, 32, "bicubic"), np.asarray(img.resize((32, 64), Image.BICUBIC))
    )
    np.testing.assert_array_equal(A.resize(img, 128, 64), _image())  # same size: untouched


def test_flip_twice_is_identity_and_centre_crop_is_identity():
    x = _image(32, 16)
    once = A.flip_pad_crop(x, True, 0, 0, 0)
    np.testing.assert_array_equal(once, x[:, ::-1])
    np.testing.assert_array_equal(A.flip_pad_crop(once, True, 0, 0, 0), x)
    np.testing.assert_array_equal(A.flip_pad_crop(x, False, 10, 10, 10), x)


@pytest.mark.parametrize(("top", "left"), [(0, 0), (20, 20), (3, 17), (10, 0), (20, 5)])
def test_pad_crop_equals_numpy_pad_then_crop(top, left):
    x = _image(32, 16)
    padded = np.pad(x, ((10, 10), (10, 10), (0, 0)))
    np.testing.assert_array_equal(
        A.flip_pad_crop(x, False, 10, top, left), padded[top : top + 32, left : left + 16]
    )
    with pytest.raises(ValueError, match=r"crop corner \(21, 0\) outside \[0, 20\]"):
        A.flip_pad_crop(x, False, 10, 21, 0)


def test_no_erasing_no_pad_values_in_normalised_range():
    cfg = A.AugmentConfig(height=64, width=32, erase_prob=0.0, pad=0, flip_prob=1.0)
    out = A.train_transform(Image.fromarray(_image()), A.image_rng(0, 0, 0), cfg)
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert (out >= lo - 1e-6).all() and (out <= hi + 1e-6).all()
    np.testing.assert_array_equal(out, A.eval_transform(Image.fromarray(_image()), cfg)[:, ::-1])


def test_deterministic_per_seed_step_slot():
    cfg = A.AugmentConfig(height=64, width=32)
    img = Image.fromarray(_image())
    a = A.train_transform(img, A.image_rng(1, 2, 3), cfg)
    np.testing.assert_array_equal(a, A.train_transform(img, A.image_rng(1, 2, 3), cfg))
    others = [A.image_rng(1, 2, 4), A.image_rng(1, 3, 3), A.image_rng(2, 2, 3)]
    assert all(not np.array_equal(a, A.train_transform(img, r, cfg)) for r in others)


def test_erasing_probability_and_rectangle_statistics():
    cfg = A.AugmentConfig(height=64, width=32, flip_prob=0.0, pad=0)
    black = Image.new("RGB", (32, 64))
    fill = np.float32(cfg.erase_fill)
    n, erased, fractions = 600, 0, []
    for slot in range(n):
        out = A.train_transform(black, A.image_rng(0, 0, slot), cfg)
        hit = np.all(out == fill, axis=-1)
        if hit.any():
            erased += 1
            rows, cols = np.nonzero(hit)
            h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            assert hit.sum() == h * w, "erased region must be one rectangle"
            assert h < 64 and w < 32
            fractions.append(h * w / (64 * 32))
    # Bernoulli(0.5) over 600 draws: 4 sigma is about 49.
    assert abs(erased - n / 2) < 50
    fractions = np.array(fractions)
    # Rounding h and w moves the area a little outside [0.02, 0.4].
    assert fractions.min() > 0.01 and fractions.max() < 0.45
    assert 0.12 < fractions.mean() < 0.25  # U(0.02, 0.4) mean 0.21, big wide boxes rejected


def test_erase_box_fits_and_gives_up_when_impossible():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = A.erase_box(rng, 256, 128)
        assert 0 <= top <= 256 - h and 0 <= left <= 128 - w and h < 256 and w < 128
    # The whole image's area at aspect 1 never fits (h < H fails): 100 attempts, then none.
    assert A.erase_box(rng, 8, 8, (1.0, 1.0), 1.0) is None


def _jpeg_bytes(pixels, fmt="JPEG"):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def test_read_image_from_path_bytes_arrays_and_records(tmp_path):
    pixels = _image()
    path = tmp_path / "0002_c1s1_000451_03.jpg"
    Image.fromarray(pixels).save(path)
    data = _jpeg_bytes(pixels)
    ref = np.asarray(A.read_image(str(path)))
    assert ref.shape == (128, 64, 3)
    for item in [path, data, bytearray(data), memoryview(data), np.bytes_(data), {"image": data}]:
        np.testing.assert_array_equal(np.asarray(A.read_image(item)), ref)
    np.testing.assert_array_equal(np.asarray(A.read_image(pixels)), pixels)
    gray = A.read_image(pixels[..., 0])
    assert gray.mode == "RGB" and np.asarray(gray).shape == (128, 64, 3)
    rgba = A.read_image(_jpeg_bytes(np.dstack([pixels, pixels[..., :1]]), "PNG"))
    assert rgba.mode == "RGB"


def test_read_image_errors_name_the_item(tmp_path):
    missing = tmp_path / "0001_c1s1_000001_00.jpg"
    with pytest.raises(A.ImageLoadError, match="0001_c1s1_000001_00.jpg"):
        A.read_image(str(missing))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(A.ImageLoadError, match=r"cannot read image .*bad\.jpg"):
        A.read_image(bad)
    with pytest.raises(A.ImageLoadError, match=r"<10 encoded bytes>"):
        A.read_image(b"not a jpeg")
    with pytest.raises(A.ImageLoadError, match=r"<10 encoded bytes>"):
        A.read_image({"image": b"not a jpeg", "pid": 3})
    with pytest.raises(A.ImageLoadError, match=r"x\.jpg"):
        A.read_image({"image": b"not a jpeg", "path": "x.jpg"})
    with pytest.raises(A.ImageLoadError, match=r"record has no 'image' entry"):
        A.read_image({"pid": 1})
    with pytest.raises(A.ImageLoadError, match=r"expected uint8"):
        A.read_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(A.ImageLoadError, match=r"expected 3 channels"):
        A.read_image(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(A.ImageLoadError, match=r"cannot read image from a int"):
        A.read_image(5)


def test_load_transform_batches_and_names_failing_file(tmp_path):
    cfg = A.AugmentConfig(height=32, width=16)
    good = tmp_path / "good.jpg"
    Image.fromarray(_image()).save(good)
    out = A.load_transform([good, good], cfg)
    assert out.shape == (2, 32, 16, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], A.eval_transform(A.read_image(good), cfg))
    seeded = A.load_transform([good, good], cfg, [(0, 1, 0), (0, 1, 1)])
    np.testing.assert_array_equal(
        seeded[1], A.train_transform(A.read_image(good), A.image_rng(0, 1, 1), cfg)
    )
    with pytest.raises(A.ImageLoadError, match=r"missing\.jpg"):
        A.load_transform([good, tmp_path / "missing.jpg"], cfg)
    with pytest.raises(ValueError, match="2 items but 1 seeds"):
        A.load_transform([good, good], cfg, [(0, 0, 0)])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"height": 0}, r"height and width must be >= 1"),
        ({"interpolation": "nearest"}, r"interpolation must be one of"),
        ({"flip_prob": 1.5}, r"flip_prob must be in \[0, 1\]"),
        ({"erase_prob": -0.1}, r"erase_prob must be in \[0, 1\]"),
        ({"pad": -1}, r"pad must be >= 0"),
        ({"erase_area": (0.5, 0.2)}, r"erase_area must satisfy"),
        ({"erase_min_aspect": 0.0}, r"erase_min_aspect must be in \(0, 1\]"),
        ({"mean": (0.5, 0.5)}, r"mean needs 3 channels"),
        ({"std": (0.2, 0.0, 0.2)}, r"std must be > 0"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        A.AugmentConfig(**kwargs)


def test_defaults_are_the_agw_recipe():
    cfg = A.AugmentConfig()
    assert (cfg.height, cfg.width, cfg.pad) == (256, 128, 10)
    assert cfg.flip_prob == cfg.erase_prob == 0.5
    assert cfg.erase_area == (0.02, 0.4) and cfg.erase_min_aspect == 0.3
    # ReID-Survey builds RandomErasing with mean=cfg.INPUT.PIXEL_MEAN (ImageNet's mean).
    assert cfg.erase_fill == A.IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert cfg.interpolation == "bilinear"


# ------------------------------------- distributions against the reference's random draws
#
# The reference draws with Python's ``random`` (RandomErasing) and torch (flip, crop corner);
# ours with numpy. The streams differ, so the semantics are compared as distributions: our
# train_transform's decisions, read back from its output, against draws of the reference's own
# code below (written from ReID-Survey's ``RandomErasing.__call__`` and torchvision's
# ``RandomHorizontalFlip`` / ``RandomCrop.get_params``). Seeds are fixed (deterministic tests);
# tolerances are stated per check.

N_DRAWS = 3000


def _reference_erasing(rnd: random.Random, height: int, width: int, probability=0.5,
                       sl=0.02, sh=0.4, r1=0.3):
    """``RandomErasing.__call__``'s rectangle, or None (not erased / nothing fit in 100)."""
    if rnd.uniform(0, 1) >= probability:
        return None
    for _ in range(100):
        area = height * width
        target_area = rnd.uniform(sl, sh) * area
        aspect_ratio = rnd.uniform(r1, 1 / r1)
        h = int(round(math.sqrt(target_area * aspect_ratio)))
        w = int(round(math.sqrt(target_area / aspect_ratio)))
        if w < width and h < height:
            x1 = rnd.randint(0, height - h)
            y1 = rnd.randint(0, width - w)
            return x1, y1, h, w
    return None


def _reference_flip_crop(torch, gen, pad: int):
    """torchvision: ``torch.rand(1) < 0.5`` flip, then ``RandomCrop.get_params`` on the image
    padded by ``pad``: ``torch.randint(0, h - th + 1)``, i.e. uniform over 0..2 * pad."""
    flip = bool(torch.rand(1, generator=gen) < 0.5)
    top = int(torch.randint(0, 2 * pad + 1, size=(1,), generator=gen))
    left = int(torch.randint(0, 2 * pad + 1, size=(1,), generator=gen))
    return flip, top, left


def _our_erasing(cfg, n):
    """Our erased rectangles (None where nothing was erased), read back from the output."""
    black = Image.new("RGB", (cfg.width, cfg.height))
    fill = np.float32(cfg.erase_fill)
    boxes = []
    for slot in range(n):
        hit = np.all(A.train_transform(black, A.image_rng(5, 0, slot), cfg) == fill, axis=-1)
        if not hit.any():
            boxes.append(None)
            continue
        rows, cols = np.nonzero(hit)
        top, left = rows.min(), cols.min()
        h, w = rows.max() - top + 1, cols.max() - left + 1
        assert hit.sum() == h * w, "the erased region must be one rectangle"
        boxes.append((int(top), int(left), int(h), int(w)))
    return boxes


def _ks_same(a, b, name):
    """Two-sample Kolmogorov-Smirnov: the distributions may not differ at p < 1e-3."""
    result = stats.ks_2samp(a, b)
    assert result.pvalue > 1e-3, (name, result)


def test_erasing_distribution_matches_the_reference():
    """p 0.5, area U(0.02, 0.4) of H x W, aspect U(0.3, 1/0.3), corner uniform, fill = mean."""
    cfg = A.AugmentConfig(height=64, width=32, flip_prob=0.0, pad=0)
    ours = _our_erasing(cfg, N_DRAWS)
    rnd = random.Random(0)
    theirs = [_reference_erasing(rnd, 64, 32) for _ in range(N_DRAWS)]
    erased_ours = sum(b is not None for b in ours) / N_DRAWS
    erased_ref = sum(b is not None for b in theirs) / N_DRAWS
    # Rate: both near 0.5 (at 64 x 32 a rectangle almost always fits within 100 attempts);
    # 5 binomial standard errors of the difference.
    assert abs(erased_ours - erased_ref) <= 5 * math.sqrt(2 * 0.25 / N_DRAWS)
    ours_boxes = np.array([b for b in ours if b is not None], float)
    ref_boxes = np.array([b for b in theirs if b is not None], float)
    for name, column in (("h", 2), ("w", 3)):
        _ks_same(ours_boxes[:, column], ref_boxes[:, column], name)
    _ks_same(ours_boxes[:, 2] * ours_boxes[:, 3], ref_boxes[:, 2] * ref_boxes[:, 3], "area")
    _ks_same(ours_boxes[:, 2] / ours_boxes[:, 3], ref_boxes[:, 2] / ref_boxes[:, 3], "aspect")
    # The corner, relative to its range (uniform over 0..H - h and 0..W - w).
    for name, column, size, extent in (("top", 0, 64, 2), ("left", 1, 32, 3)):
        rel_ours = ours_boxes[:, column] / (size - ours_boxes[:, extent] + 1)
        rel_ref = ref_boxes[:, column] / (size - ref_boxes[:, extent] + 1)
        _ks_same(rel_ours, rel_ref, name)


def test_erasing_retry_rule_matches_the_reference():
    """Up to 100 attempts, then no erasing: on a 100 x 2 image one attempt fits with
    probability ~1 %, so ~63 % of the erasing draws find a rectangle (10 attempts: ~10 %,
    unlimited: 100 %)."""
    cfg = A.AugmentConfig(height=100, width=2, flip_prob=0.0, pad=0, erase_prob=1.0)
    ours = _our_erasing(cfg, 1500)
    rnd = random.Random(1)
    theirs = [_reference_erasing(rnd, 100, 2, probability=1.0) for _ in range(1500)]
    fit_ours = sum(b is not None for b in ours) / len(ours)
    fit_ref = sum(b is not None for b in theirs) / len(theirs)
    assert 0.3 < fit_ref < 0.9  # the rule is what decides here
    assert abs(fit_ours - fit_ref) <= 5 * math.sqrt(2 * fit_ref * (1 - fit_ref) / len(ours))
    # Where nothing fits at all, nothing is erased (and the image is intact).
    assert A.erase_box(np.random.default_rng(0), 100, 1) is None
    cfg = A.AugmentConfig(height=100, width=1, flip_prob=0.0, pad=0, erase_prob=1.0)
    assert all(b is None for b in _our_erasing(cfg, 50))


def _coded_image(h=64, w=32):
    """R = 4 * row, G = 8 * column, B = 255: every pixel names its source; padding is black."""
    rows, cols = np.mgrid[0:h, 0:w]
    return np.stack([rows * 4, cols * 8, np.full((h, w), 255)], -1).astype(np.uint8)


def test_flip_and_crop_distribution_matches_the_reference():
    """Flip 0.5; pad 10 + crop corner uniform over the 21 x 21 positions, independent."""
    torch = pytest.importorskip("torch")
    cfg = A.AugmentConfig(height=64, width=32, pad=10, erase_prob=0.0)
    image = Image.fromarray(_coded_image())
    mean, std = np.array(cfg.mean), np.array(cfg.std)
    flips, tops, lefts = [], [], []
    for slot in range(N_DRAWS):
        out = A.train_transform(image, A.image_rng(6, 1, slot), cfg)
        pixels = np.rint((out * std + mean) * 255).astype(int)
        # Two horizontal neighbours that are both image (not padding): their source columns
        # tell the flip, their source position the crop corner.
        pairs = np.argwhere((pixels[:, :-1, 2] == 255) & (pixels[:, 1:, 2] == 255))
        i, j = pairs[len(pairs) // 2]
        src_row, src_col = pixels[i, j, 0] // 4, pixels[i, j, 1] // 8
        flipped = pixels[i, j + 1, 1] // 8 < src_col
        flips.append(flipped)
        tops.append(src_row - i + 10)
        lefts.append((31 - src_col if flipped else src_col) - j + 10)
    gen = torch.Generator().manual_seed(0)
    ref = np.array([_reference_flip_crop(torch, gen, 10) for _ in range(N_DRAWS)])
    # Flip rate: 5 binomial standard errors of the difference.
    assert abs(np.mean(flips) - ref[:, 0].mean()) <= 5 * math.sqrt(2 * 0.25 / N_DRAWS)
    for name, ours, theirs in (("top", tops, ref[:, 1]), ("left", lefts, ref[:, 2])):
        ours = np.asarray(ours)
        assert ours.min() >= 0 and ours.max() <= 20, name
        # Uniform over 0..20 on both sides: chi-square against uniform at p > 1e-3.
        for values in (ours, theirs):
            counts = np.bincount(values, minlength=21)
            assert stats.chisquare(counts).pvalue > 1e-3, (name, counts)
    # The corner's two coordinates are drawn independently (contingency test, 3 x 3 bins).
    table = np.histogram2d(tops, lefts, bins=3, range=[[0, 21], [0, 21]])[0]
    assert stats.chi2_contingency(table).pvalue > 1e-3
