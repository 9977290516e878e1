"""Tests of the part masks of synthetic images: region labels of the renderer
(reid_jax/synthetic/render.py, canvas.py), the files the generator writes and their reader
(reid_jax/synthetic/masks.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from reid_jax import synthetic
from reid_jax.data import attributes, market1501
from reid_jax.synthetic import canvas as sc_lib
from reid_jax.synthetic import dataset as synthetic_dataset
from reid_jax.synthetic import masks as masks_lib
from reid_jax.synthetic import person as people
from reid_jax.synthetic import render as sr

NAMES = attributes.ATTRIBUTE_NAMES


def _scene(view: str, seed: int = 0) -> people.Scene:
    cams = synthetic.sample_cameras(seed)
    rng = np.random.default_rng(seed)
    track = synthetic_dataset._track(rng)
    track.update(view=view, height=112.0, x=32.0, foot_y=124.0)
    sc = synthetic_dataset._scene(rng, cams[seed % 6], track, "detected")
    return dataclasses.replace(
        sc, occluder=people.Occluder("pole", 8.0, 4.0, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)))


def _person(**kw) -> people.Person:
    p = synthetic.sample_person(np.random.default_rng(7))
    base = dict(female=True, long_hair=True, short_sleeves=True, short_lower=False,
                pants=True, hat=True, backpack=True, bag=True, handbag=True,
                up_colour="red", down_colour="blue", age=2, pattern="plain")
    base.update(kw)
    return dataclasses.replace(p, **base)


def test_canvas_labels_are_the_last_shape_holding_each_sample():
    cv = sc_lib.Canvas(np.zeros((40, 30, 3), np.float32), 2, track=False,
                       label_of={"low": 3, "high": 7})
    low, high = sc_lib.rect(2, 2, 12, 12), sc_lib.ellipse(10, 10, 5.3, 4.1)
    shadow = sc_lib.ellipse(5, 15, 6, 3)
    cv.paint(low, (1.0, 0.0, 0.0), "low")
    cv.paint(high, (0.0, 0.0, 1.0), "high")
    cv.paint(shadow, (0.0, 0.0, 0.0), "shadow", alpha=0.35)  # not labelled: changes nothing
    xs = ((np.arange(30) + 0.5) / 2)[None, :]
    ys = ((np.arange(40) + 0.5) / 2)[:, None]
    ref = np.zeros((40, 30), np.uint8)
    ref[low.sdf(xs, ys) <= 0] = 3
    ref[high.sdf(xs, ys) <= 0] = 7
    np.testing.assert_array_equal(cv.labels, ref)
    assert (ref == 3).sum() > 50 and (ref == 7).sum() > 50


def test_downsample_labels_takes_the_majority_and_ties_go_up():
    rng = np.random.default_rng(0)
    for s, k in ((2, 5), (3, 13), (4, 2)):
        labels = rng.integers(0, k, (6 * s, 4 * s)).astype(np.uint8)
        got = sc_lib.downsample_labels(labels, s, k)
        assert got.shape == (6, 4) and got.dtype == np.uint8
        for i in range(6):
            for j in range(4):
                counts = np.bincount(labels[i * s:(i + 1) * s, j * s:(j + 1) * s].ravel(),
                                     minlength=k)
                assert got[i, j] == np.flatnonzero(counts == counts.max()).max()
    np.testing.assert_array_equal(sc_lib.downsample_labels(labels, 1, 2), labels)


@pytest.mark.parametrize("view", people.VIEWS)
def test_render_labels_agree_with_the_part_masks(view):
    p, sc = _person(), _scene(view, seed=2)
    img, masks, labels = sr.render(p, sc, return_masks=True, return_labels=True)
    np.testing.assert_array_equal(img, sr.render(p, sc))  # labels do not change the pixels
    img2, labels2 = sr.render(p, sc, return_labels=True)
    np.testing.assert_array_equal(img2, img)
    np.testing.assert_array_equal(labels2, labels)
    assert labels.shape == (128, 64) and labels.dtype == np.uint8
    assert labels.max() < len(people.REGIONS)
    for part, region in people.PART_REGIONS.items():
        mostly = masks[part] > 0.8
        agree = (labels[mostly] == people.REGIONS.index(region)).mean() if mostly.any() else 1.0
        assert agree > 0.97, (view, part, agree)
    nothing = masks["person"] + masks["occluder"] < 0.2
    assert (labels[nothing] == 0).mean() > 0.99
    for region in ("hair", "hat", "upper_body", "lower_body", "shoes", "occluder"):
        assert (labels == people.REGIONS.index(region)).sum() > 10, (view, region)
    _, empty = sr.render(None, sc, return_labels=True)
    assert set(np.unique(empty).tolist()) <= {0, people.REGIONS.index("occluder")}


def test_attribute_regions_name_the_pixels_that_show_each_attribute():
    assert set(masks_lib.ATTRIBUTE_REGIONS) == set(NAMES)
    assert not masks_lib.localisable(["gender", "age1", "age4"]).any()
    assert masks_lib.localisable(["hat", "upred", "downpink", "clothes"]).all()
    groups = [g for names in masks_lib.ATTRIBUTE_GROUPS.values() for g in names]
    assert sorted(groups) == sorted(n for n in NAMES if masks_lib.ATTRIBUTE_REGIONS[n])
    assert masks_lib.attribute_group("backpack") == "bags"
    assert masks_lib.attribute_group("downgray") == "lower_body"
    assert masks_lib.attribute_group("gender") is None
    p, sc = _person(), _scene("back", seed=1)
    _, labels = sr.render(p, sc, return_labels=True)
    regions = masks_lib.labels_to_regions(labels)
    assert regions.shape == (len(NAMES), 128, 64) and regions.dtype == bool
    idx = NAMES.index
    np.testing.assert_array_equal(regions[idx("hat")], labels == people.REGIONS.index("hat"))
    np.testing.assert_array_equal(regions[idx("upred")], regions[idx("upblue")])
    np.testing.assert_array_equal(
        regions[idx("up")],
        np.isin(labels, [people.REGIONS.index(r) for r in ("upper_body", "arms")]))
    assert regions[idx("backpack")].sum() > 100  # seen from behind
    assert not regions[idx("gender")].any() and not regions[idx("age2")].any()
    # Regions follow the person: without a hat there is no hat region.
    _, bare = sr.render(dataclasses.replace(p, hat=False), sc, return_labels=True)
    assert not masks_lib.labels_to_regions(bare, ["hat"]).any()


def test_generator_writes_a_mask_per_image_and_the_reader_reads_it(tiny_dataset):
    root = tiny_dataset
    with open(os.path.join(root, "masks", "regions.json")) as f:
        doc = json.load(f)
    assert doc == masks_lib.regions_document()
    assert doc["regions"]["0"] == "background" and doc["attributes"]["hat"] == ["hat"]
    assert doc["attributes"]["gender"] == []
    meta = synthetic.load_meta(root)
    for im in meta["images"]:
        image_path = os.path.join(root, im["file"])
        path = masks_lib.mask_path(image_path)
        folder, stem = os.path.split(im["file"])
        assert path == os.path.join(root, "masks", folder, stem[:-4] + ".png")
        mask = synthetic.read_part_mask(image_path)
        with Image.open(image_path) as image:
            assert mask.labels.shape == (image.height, image.width)
        assert mask.regions == people.REGIONS
    # The stored mask is the re-render's labels; counterfactuals give theirs the same way.
    for im in meta["images"][::9]:
        name = os.path.basename(im["file"])
        _, labels = synthetic.render_counterfactual(root, name, None, return_labels=True)
        np.testing.assert_array_equal(
            synthetic.read_part_mask(os.path.join(root, im["file"])).labels, labels)
    person_image = next(im for im in meta["images"] if im["person"] is not None)
    name = os.path.basename(person_image["file"])
    img, masks, labels = synthetic.render_counterfactual(root, name, "hat", 1, jpeg=False,
                                                         return_masks=True, return_labels=True)
    assert img.shape == (128, 64, 3) and "hat" in masks
    assert (labels == people.REGIONS.index("hat")).sum() > 5
    regions = synthetic.read_attribute_regions(os.path.join(root, person_image["file"]))
    assert regions.shape == (len(NAMES), 128, 64) and regions.dtype == bool
    labels_here = synthetic.person_labels(synthetic.image_record(root, name)[0])
    assert regions[NAMES.index("hat")].any() <= bool(labels_here[NAMES.index("hat")])


def test_without_masks_the_dataset_reads_as_before_and_maps_are_unavailable(tmp_path):
    config = synthetic.DatasetConfig(num_train_ids=1, num_test_ids=1, images_per_id=4,
                                     num_distractors=1, num_junk=0, seed=5)
    plain = tmp_path / "plain"
    synthetic.generate_dataset(plain, config, write_masks=False)
    assert "masks" not in os.listdir(plain)
    data = market1501.load_market1501(plain)
    image = data.query.paths[0]
    assert synthetic.read_part_mask(image) is None
    assert synthetic.read_attribute_regions(image) is None
    with_masks = tmp_path / "with"
    synthetic.generate_dataset(with_masks, config)
    same = market1501.load_market1501(with_masks)
    assert [os.path.basename(p) for p in same.gallery.paths] == [
        os.path.basename(p) for p in data.gallery.paths]
    for a, b in zip(data.query.paths, same.query.paths, strict=True):  # same image bytes
        assert open(a, "rb").read() == open(b, "rb").read()
    # Broken mask folders are named in the error.
    image = same.query.paths[0]
    os.remove(masks_lib.mask_path(image))
    with pytest.raises(FileNotFoundError, match="no part mask"):
        synthetic.read_part_mask(image)
    Image.new("RGB", (64, 128)).save(masks_lib.mask_path(image))
    with pytest.raises(ValueError, match="8-bit grey"):
        synthetic.read_part_mask(image)
    Image.fromarray(np.full((128, 64), 200, np.uint8), "L").save(masks_lib.mask_path(image))
    with pytest.raises(ValueError, match="label 200 but only 13 regions"):
        synthetic.read_part_mask(image)
    shutil.copy(masks_lib.mask_path(same.query.paths[1]), masks_lib.mask_path(image))
    with open(masks_lib.regions_path(image), "w") as f:
        json.dump({"format": "something else", "version": 1}, f)
    with pytest.raises(ValueError, match="not a reid_jax.part_masks v1 file"):
        synthetic.read_part_mask(image)
    with pytest.raises(ValueError, match=r"uint8 \[H, W\]"):
        masks_lib.encode_png(np.zeros((4, 4), np.int32))


def _broken_copy(root: str, tmp_path) -> tuple[str, str, str]:
    """(image, its mask path, regions.json path) in a copy of ``root`` (a shared fixture)."""
    copy = shutil.copytree(root, tmp_path / "copy")
    image = market1501.load_market1501(copy).query.paths[0]
    return image, masks_lib.mask_path(image), masks_lib.regions_path(image)


@pytest.mark.parametrize("damage, message", [
    (lambda p: open(p, "wb").close(), "cannot be read as the part mask of"),
    (lambda p: open(p, "r+b").truncate(100), "cannot be read as the part mask of"),
    (lambda p: Image.fromarray(np.asarray(Image.open(p))[:64]).save(p),
     r"must have its image's size: it is 64x64 \(width x height\), .* is 64x128"),
    (lambda p: Image.open(p).transpose(Image.Transpose.ROTATE_90).save(p),
     r"it is 128x64 \(width x height\), .* is 64x128"),
])
def test_a_broken_mask_is_named_with_what_is_wrong(tiny_dataset, tmp_path, damage, message):
    image, mask, _ = _broken_copy(tiny_dataset, tmp_path)
    damage(mask)
    with pytest.raises(ValueError, match=message) as e:
        synthetic.read_part_mask(image)
    assert mask in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (lambda d: "{\"format\": ", "is not valid JSON: Expecting value"),
    (lambda d: [1, 2], "not a reid_jax.part_masks file .a JSON object., got list"),
    (lambda d: {**d, "regions": {**d["regions"], "a": "sky"}},
     "'regions' must map '0'..'n-1' to region names"),
    (lambda d: {**d, "regions": {"0": "background", "1": 5}},
     "'regions' must map '0'..'n-1' to region names"),
    (lambda d: {k: v for k, v in d.items() if k != "attributes"},
     r"'attributes' must map each attribute to the list of region names that show it"),
    (lambda d: {**d, "attributes": ["hat"]}, "'attributes' must map each attribute"),
    (lambda d: {**d, "attributes": {**d["attributes"], "hat": None}},
     r"attribute 'hat' must list region names \(\[\] for none\), got None"),
    (lambda d: {**d, "attributes": {**d["attributes"], "hat": "hat"}},
     r"attribute 'hat' must list region names \(\[\] for none\), got 'hat'"),
    (lambda d: {**d, "attributes": {**d["attributes"], "hat": ["sky"]}},
     r"attribute 'hat' names unknown regions \['sky'\]"),
    (lambda d: {**d, "attributes": {k: v for k, v in d["attributes"].items()
                                    if k not in ("hat", "gender")}},
     r"'attributes' lacks \['hat', 'gender'\] \(list \[\] for an attribute no region shows\)"),
])
def test_a_broken_regions_file_is_named_with_the_field_at_fault(tiny_dataset, tmp_path, edit,
                                                                 message):
    image, _, regions = _broken_copy(tiny_dataset, tmp_path)
    with open(regions) as f:
        doc = json.load(f)
    new = edit(doc)
    with open(regions, "w") as f:
        f.write(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(ValueError, match=message) as e:
        synthetic.read_part_mask(image)
    assert str(e.value).startswith(regions)
