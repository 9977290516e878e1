"""Tests of the synthetic Market-1501 generator: reid_jax/synthetic/*.py and
tools/make_synthetic.py."""

from __future__ import annotations

import collections
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import file_bytes
from PIL import Image

from reid_jax import synthetic
from reid_jax.data import attributes, market1501
from reid_jax.synthetic import canvas as sc_lib
from reid_jax.synthetic import dataset as synthetic_dataset
from reid_jax.synthetic import person as people
from reid_jax.synthetic import render as sr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = synthetic.DatasetConfig(num_train_ids=4, num_test_ids=4, images_per_id=6,
                               num_distractors=5, num_junk=3, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic") / "market")
    synthetic.generate_dataset(root, TINY)
    return root


# ---------------------------------------------------------------------------------------------
# Canvas primitives.


@pytest.mark.parametrize("supersample", [1, 2, 4])
def test_antialiased_areas_match_the_geometry(supersample):
    h, w = 40 * supersample, 30 * supersample
    for shape, area in ((sc_lib.ellipse(12.3, 17.6, 6.2, 6.2), np.pi * 6.2**2),
                        (sc_lib.ellipse(15.0, 20.0, 9.0, 4.5, angle=0.6), np.pi * 9.0 * 4.5),
                        (sc_lib.rect(3.25, 4.5, 21.75, 30.0), 18.5 * 25.5),
                        (sc_lib.polygon([(5, 5), (25, 8), (12, 33)]),
                         0.5 * abs(20 * 28 - 7 * 3)),
                        (sc_lib.capsule(6, 6, 20, 30, 3.0, 3.0),
                         np.pi * 9 + 6 * np.hypot(14, 24))):
        cv = sc_lib.Canvas(np.zeros((h, w, 3), np.float32), supersample, track=True)
        cv.paint(shape, (1.0, 1.0, 1.0), "x")
        covered = sc_lib.downsample(cv.image[..., 0].astype(np.float64), supersample).sum()
        assert covered == pytest.approx(area, rel=0.02), shape
        np.testing.assert_allclose(cv.vis["x"], cv.image[..., 0], atol=1e-6)


def test_visibility_tracks_occlusion_and_compositing_is_exact():
    cv = sc_lib.Canvas(np.full((20, 20, 3), 0.5, np.float32), 1, track=True)
    low, high = sc_lib.rect(2, 2, 12, 12), sc_lib.ellipse(12, 12, 5.3, 5.3)
    cv.paint(low, (1.0, 0.0, 0.0), "low")
    cov_low = cv.vis["low"].copy()
    cv.paint(high, (0.0, 0.0, 1.0), "high")
    cov_high = cv.vis["high"]
    # float64 reference of the painter's algorithm with visibility.
    np.testing.assert_allclose(cv.vis["low"], cov_low.astype(np.float64) * (1 - cov_high),
                               atol=1e-6)
    ref = 0.5 * (1 - cov_low) * (1 - cov_high)
    np.testing.assert_allclose(cv.image[..., 0], ref + cov_low * (1 - cov_high), atol=1e-6)
    np.testing.assert_allclose(cv.image[..., 2], ref + cov_high, atol=1e-6)
    assert cv.vis["low"].max() == 1.0 and (cov_high == 1.0).any()
    assert np.all(cv.image[cov_high == 1.0] == np.float32([0, 0, 1]))  # exactly the top colour


def test_gaussian_blur_matches_a_direct_convolution():
    rng = np.random.default_rng(0)
    img = rng.random((13, 9, 3)).astype(np.float32)
    for sigma in (0.4, 1.1):
        r = int(np.ceil(3 * sigma))
        k1 = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
        k2 = np.outer(k1, k1) / k1.sum() ** 2
        pad = np.pad(img.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="edge")
        ref = np.zeros(img.shape)
        for i in range(img.shape[0]):
            for j in range(img.shape[1]):
                ref[i, j] = np.tensordot(k2, pad[i:i + 2 * r + 1, j:j + 2 * r + 1], axes=2)
        np.testing.assert_allclose(sc_lib.gaussian_blur(img, sigma), ref, atol=1e-5)
    np.testing.assert_array_equal(sc_lib.gaussian_blur(img, 0.0), img)


# ---------------------------------------------------------------------------------------------
# Persons.


def test_sampled_attributes_follow_the_real_training_split():
    rng = np.random.default_rng(0)
    n = 3000
    labels = np.stack([synthetic.person_labels(synthetic.sample_person(rng)) for _ in range(n)])
    # Expected per-identity positive ratio, from the embedded counts (float64 reference).
    t = synthetic.MARKET_TRAIN_COUNTS
    total = t["male"]["n"] + t["female"]["n"]
    names = attributes.ATTRIBUTE_NAMES
    expected = np.zeros(len(names))
    for g in ("male", "female"):
        c, w = t[g], t[g]["n"] / total
        for a in ("hair", "clothes", "up", "hat", "backpack", "bag", "handbag"):
            expected[names.index(a)] += w * c[a] / c["n"]
        expected[names.index("gender")] += w * (g == "female")
        for cond, key in ((False, "down_given_dress"), (True, "down_given_pants")):
            pos, tot = c[key]
            p_cond = c["clothes"] / c["n"] if cond else 1 - c["clothes"] / c["n"]
            expected[names.index("down")] += w * p_cond * (pos / tot if tot else 0.0)
        for k in range(4):
            expected[names.index(f"age{k + 1}")] += w * c["age"][k] / c["n"]
        for col, v in c["up_colour"].items():
            if col != "none":
                expected[names.index(f"up{col}")] += w * v / c["n"]
        for col, v in c["down_colour"].items():
            if col != "none":
                expected[names.index(f"down{col}")] += w * v / c["n"]
    # The real split's ratios, e.g. hat 20/751, backpack 199/751, age2 569/751.
    assert expected[names.index("hat")] == pytest.approx(20 / 751)
    assert expected[names.index("backpack")] == pytest.approx(199 / 751)
    assert expected[names.index("age2")] == pytest.approx(569 / 751)
    observed = labels.mean(axis=0)
    sigma = np.sqrt(expected * (1 - expected) / n)
    np.testing.assert_array_less(np.abs(observed - expected), 4 * sigma + 1e-3)
    # Colours at most one-hot (some persons have none), age exactly one-hot.
    up = labels[:, names.index("upblack"):names.index("upgreen") + 1].sum(1)
    down = labels[:, names.index("downblack"):names.index("downbrown") + 1].sum(1)
    assert up.max() == 1 and down.max() == 1 and (up == 0).any() and (down == 0).any()
    np.testing.assert_array_equal(labels[:, names.index("age1"):].sum(1), 1)


def _person(**kw) -> people.Person:
    p = synthetic.sample_person(np.random.default_rng(7))
    base = dict(female=False, long_hair=False, short_sleeves=False, short_lower=False,
                pants=True, hat=False, backpack=False, bag=False, handbag=False,
                up_colour="red", down_colour="blue", age=2, pattern="plain")
    base.update(kw)
    return dataclasses.replace(p, **base)


def test_change_attribute_keeps_one_hot_constraints():
    names = attributes.ATTRIBUTE_NAMES
    p = _person()
    rng = np.random.default_rng(0)
    for attr in names:
        q = synthetic.change_attribute(p, attr, None, rng)
        before, after = synthetic.person_labels(p), synthetic.person_labels(q)
        i = names.index(attr)
        assert after[i] == 1 - before[i], attr
        changed = set(np.flatnonzero(before != after).tolist())
        if attr.startswith(("up", "down")) and attr not in ("up", "down"):
            # Moving the colour off or onto a garment also changes the old / new colour.
            group = [j for j, n in enumerate(names) if n.startswith(attr[:2] if attr[:2] == "up"
                                                                      else "down")
                     and n not in ("up", "down")]
            assert changed <= set(group) and len(changed) == 2, (attr, changed)
        elif attr.startswith("age"):
            assert len(changed) == 2 and changed <= set(range(names.index("age1"), len(names)))
        else:
            assert changed == {i}, attr
        assert after[names.index("upblack"):names.index("upgreen") + 1].sum() <= 1
        assert after[names.index("downblack"):names.index("downbrown") + 1].sum() <= 1
        assert after[names.index("age1"):].sum() == 1
        # Identity detail is kept.
        assert (q.skin, q.shoe_rgb, q.up_shade, q.width) == (p.skin, p.shoe_rgb, p.up_shade,
                                                             p.width)
    assert synthetic.change_attribute(p, "upred", 1) is p  # already red: unchanged
    assert synthetic.change_attribute(p, "hat", 1).hat
    assert synthetic.change_attribute(p, "upgreen", 1).up_colour == "green"
    assert synthetic.change_attribute(p, "age4", 1).age == 4
    with pytest.raises(ValueError, match="unknown attribute 'shoes'"):
        synthetic.change_attribute(p, "shoes")
    with pytest.raises(ValueError, match="must be None"):
        synthetic.change_attribute(p, "hat", 2)


def test_person_round_trips_and_validates():
    p = _person()
    assert people.Person.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="up_colour 'orange'"):
        dataclasses.replace(p, up_colour="orange")
    with pytest.raises(ValueError, match="age must be 1..4"):
        dataclasses.replace(p, age=5)
    d = p.to_dict()
    del d["skin"]
    with pytest.raises(ValueError, match=r"missing fields \['skin'\]"):
        people.Person.from_dict(d)


# ---------------------------------------------------------------------------------------------
# Rendering and counterfactual locality.


def _scene(view: str, seed: int = 0, occluder: bool = False) -> people.Scene:
    cams = synthetic.sample_cameras(seed)
    rng = np.random.default_rng(seed)
    track = synthetic_dataset._track(rng)
    track.update(view=view, height=112.0, x=32.0, foot_y=124.0)
    sc = synthetic_dataset._scene(rng, cams[seed % 6], track, "detected")
    occ = people.Occluder("pole", 8.0, 4.0, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)) if occluder else None
    return dataclasses.replace(sc, occluder=occ)


def test_render_is_deterministic_and_shaped():
    p, sc = _person(), _scene("front")
    img, masks = sr.render(p, sc, return_masks=True)
    assert img.shape == (128, 64, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, sr.render(p, sc))  # masks do not change the pixels
    assert set(masks) == set(people.PARTS)
    for name, m in masks.items():
        assert m.shape == (128, 64) and m.min() >= 0 and m.max() <= 1 + 1e-6, name
    # The person covers a plausible part of the crop; parts are where they belong.
    assert 0.15 < masks["person"].mean() < 0.5
    rows = lambda m: np.flatnonzero(m.max(1) > 0.5)  # noqa: E731
    assert rows(masks["head"]).mean() < rows(masks["upper"]).mean() < rows(masks["lower"]).mean()
    assert rows(masks["shoes"]).min() > 100
    # Background only (a false detection) has no person.
    bg, bg_masks = sr.render(None, sc, return_masks=True)
    assert bg_masks["person"].max() == 0 and not np.array_equal(bg, img)
    # A different noise seed changes pixels everywhere-ish, not the layout.
    other = sr.render(p, dataclasses.replace(sc, noise_seed=sc.noise_seed + 1))
    assert (other != img).mean() > 0.3
    assert np.abs(other.astype(int) - img.astype(int)).mean() < 6


def _assert_local(p: people.Person, sc: people.Scene, attr: str) -> int:
    """Changes ``attr`` and asserts pixels change only inside its dilated region; returns how
    many pixels changed."""
    q = synthetic.change_attribute(p, attr, None, np.random.default_rng(1))
    a, ma = sr.render(p, sc, return_masks=True)
    b, mb = sr.render(q, sc, return_masks=True)
    diff = np.any(a != b, axis=-1)
    region = synthetic.attribute_region(ma, mb, attr, sr.blur_radius(sc))
    outside = diff & ~region
    assert not outside.any(), (f"{attr} in {sc.view}: {int(outside.sum())} changed pixels "
                               f"outside its region, e.g. {np.argwhere(outside)[:3].tolist()}")
    return int(diff.sum())


@pytest.mark.parametrize("view", people.VIEWS)
def test_counterfactual_changes_only_the_attribute_region(view):
    sc = _scene(view, seed=1, occluder=True)
    for p in (_person(), _person(female=True, long_hair=True, backpack=True, bag=True,
                                 handbag=True, hat=True, pants=False, short_lower=True,
                                 up_colour="none", down_colour="none", age=3)):
        changed = {attr: _assert_local(p, sc, attr) for attr in attributes.ATTRIBUTE_NAMES}
        # The change is visible: clothing colours and the big items change many pixels.
        for attr in ("upwhite", "downblack", "clothes", "gender", "age1"):
            assert changed[attr] > 60, (view, attr, changed[attr])
        if view != "front":
            assert changed["backpack"] > 60, (view, changed["backpack"])


def test_shirt_colour_change_is_inside_the_torso_and_arms():
    p, sc = _person(), _scene("front", seed=2)
    q = synthetic.change_attribute(p, "upred", 0, np.random.default_rng(0))
    assert q.up_colour != "red" and q.up_colour != "none"
    a, m = sr.render(p, sc, return_masks=True)
    b = sr.render(q, sc)
    diff = np.any(a != b, axis=-1)
    region = synthetic.attribute_region(m, m, "upred", sr.blur_radius(sc))
    assert diff.sum() > 300 and not (diff & ~region).any()
    # Legs, shoes and the head are untouched (away from the blur of the shirt's edge).
    far = synthetic.attribute_region(m, m, "upred", sr.blur_radius(sc) + 1)
    for part in ("shoes", "head"):
        assert not (diff & (m[part] > 0.5) & ~far).any(), part


@pytest.mark.parametrize("view", ["front", "back", "side"])
def test_hair_is_drawn_from_the_hair_label_not_from_gender(view):
    # At a fixed head geometry the head, its hair and hat are the same pixels for either gender;
    # a gender change moves them only through the body proportions it implies.
    for long_hair in (False, True):
        for style in range(3):
            renders = []
            for female in (False, True):
                p = dataclasses.replace(_person(long_hair=long_hair, female=female, hat=True),
                                        hair_style=style)
                cv = sc_lib.Canvas(np.zeros((64, 48, 3), np.float32), 2, track=True)
                if view == "side":
                    sr._draw_head_side(cv, p, 12.0, 14.0, 5.5, 7.0, 1.0, p.hair_rgb)
                else:
                    sr._draw_head_frontal(cv, p, 12.0, 14.0, 5.0, 7.0, 110.0, view == "front",
                                          p.hair_rgb)
                renders.append(cv)
            male, female = renders
            np.testing.assert_array_equal(male.image, female.image)
            assert male.vis["hair"].sum() > 20
            np.testing.assert_array_equal(male.vis["hair"], female.vis["hair"])


@pytest.mark.parametrize("view", people.VIEWS)
def test_gender_change_keeps_short_hair_and_the_other_labels(view):
    # Short hair sits above the shoulders, so only the head size (gender changes it by ~4 %)
    # may change its area; a gender-dependent hair style (a bob for every woman) changed it
    # by about 30 % while the hair label stayed 'short'.
    sc = _scene(view, seed=1)
    for female in (False, True):
        for style in range(3):
            p = dataclasses.replace(_person(female=female), hair_style=style)
            q = synthetic.change_attribute(p, "gender")
            changed = synthetic.person_labels(p) != synthetic.person_labels(q)
            assert np.flatnonzero(changed).tolist() == [attributes.ATTRIBUTE_NAMES.index(
                "gender")]
            _, mp = sr.render(p, sc, return_masks=True)
            _, mq = sr.render(q, sc, return_masks=True)
            ratio = mq["hair"].sum() / mp["hair"].sum()
            assert abs(ratio - 1.0) < 0.12, (view, female, style, ratio)


def test_backpack_hides_the_shirt_from_behind_only():
    p = _person(up_colour="white")
    q = dataclasses.replace(p, backpack=True)
    for view, hidden in (("back", True), ("front", False)):
        sc = _scene(view, seed=4)
        _, mp = sr.render(p, sc, return_masks=True)
        _, mq = sr.render(q, sc, return_masks=True)
        lost = mp["upper"].sum() - mq["upper"].sum()
        if hidden:
            assert lost > 0.3 * mp["upper"].sum()
        else:
            assert lost < 0.15 * mp["upper"].sum()


# ---------------------------------------------------------------------------------------------
# The dataset on disk.


def test_layout_names_and_images(tiny):
    assert sorted(os.listdir(tiny)) == sorted(
        ["bounding_box_train", "bounding_box_test", "query", "market_attribute.mat",
         synthetic.META_FILE, synthetic.MASKS_FOLDER])
    assert not [n for n in os.listdir(os.path.dirname(tiny)) if ".tmp-" in n]
    meta = synthetic.load_meta(tiny)
    assert len(meta["images"]) == sum(
        len(os.listdir(os.path.join(tiny, f))) for f in synthetic.SPLIT_FOLDERS.values())
    for folder in synthetic.SPLIT_FOLDERS.values():
        for name in os.listdir(os.path.join(tiny, folder)):
            info = market1501.parse_filename(name)
            assert f"{max(info.pid, 0):04d}" == name[:4] or name.startswith("-1_")
            assert 1 <= info.camera <= 6
            with Image.open(os.path.join(tiny, folder, name)) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 128)


def test_query_gallery_protocol(tiny):
    ds = market1501.load_market1501(tiny)
    train, query, gallery = ds.split("train"), ds.split("query"), ds.split("gallery")
    meta = synthetic.load_meta(tiny)
    train_ids, test_ids = set(meta["train_ids"]), set(meta["test_ids"])
    assert not train_ids & test_ids
    assert train_ids | test_ids == set(range(1, TINY.num_train_ids + TINY.num_test_ids + 1))
    assert set(np.unique(train.pids).tolist()) == train_ids
    assert set(np.unique(query.pids).tolist()) == test_ids
    assert set(np.unique(gallery.pids).tolist()) == test_ids | {0}
    assert int((gallery.pids == 0).sum()) == TINY.num_distractors
    junk = [n for n in os.listdir(os.path.join(tiny, "bounding_box_test")) if n.startswith("-1_")]
    assert len(junk) == TINY.num_junk
    # Every identity over >= 2 cameras, several images.
    for split in (train, gallery):
        cams = collections.defaultdict(set)
        for pid, cam in zip(split.pids.tolist(), split.cameras.tolist(), strict=True):
            cams[pid].add(cam)
        assert all(len(c) >= 2 for pid, c in cams.items() if pid > 0)
    # One query per identity and camera where it appears; a cross-camera gallery match each.
    qpairs = list(zip(query.pids.tolist(), query.cameras.tolist(), strict=True))
    assert len(qpairs) == len(set(qpairs))
    g = set(zip(gallery.pids.tolist(), gallery.cameras.tolist(), strict=True))
    assert {(p, c) for p, c in g if p > 0} == set(qpairs)
    for pid, cam in qpairs:
        assert any(p == pid and c != cam for p, c in g), (pid, cam)
    assert all(n.endswith("_00.jpg") for n in os.listdir(os.path.join(tiny, "query")))


def test_attribute_file_matches_the_persons(tiny):
    labels = attributes.load_market_attributes(os.path.join(tiny, "market_attribute.mat"))
    meta = synthetic.load_meta(tiny)
    np.testing.assert_array_equal(labels.train_ids, sorted(meta["train_ids"]))
    np.testing.assert_array_equal(labels.test_ids, sorted(meta["test_ids"]))
    for ids, table in ((labels.train_ids, labels.train_labels),
                       (labels.test_ids, labels.test_labels)):
        for pid, row in zip(ids.tolist(), table, strict=True):
            person = people.Person.from_dict(meta["persons"][f"{pid:04d}"])
            np.testing.assert_array_equal(row, synthetic.person_labels(person))


def test_rerender_without_change_gives_the_stored_image(tiny):
    meta = synthetic.load_meta(tiny)
    for im in meta["images"][::7]:
        path = os.path.join(tiny, im["file"])
        with open(path, "rb") as f:
            stored = f.read()
        person, scene, _ = synthetic.image_record(tiny, im["file"])
        raw = sr.render(person, scene, supersample=TINY.supersample)
        assert synthetic.encode_jpeg(raw, TINY.jpeg_quality) == stored
        np.testing.assert_array_equal(
            synthetic.render_counterfactual(tiny, os.path.basename(path), None),
            np.asarray(Image.open(path).convert("RGB")))


def test_render_counterfactual_from_the_dataset(tiny):
    name = sorted(os.listdir(os.path.join(tiny, "query")))[0]
    base, before = synthetic.render_counterfactual(tiny, name, None, jpeg=False,
                                                   return_masks=True)
    img, after = synthetic.render_counterfactual(tiny, name, "downblack", 1, jpeg=False,
                                                 return_masks=True)
    person, scene, _ = synthetic.image_record(tiny, name)
    diff = np.any(base != img, axis=-1)
    region = synthetic.attribute_region(before, after, "downblack", sr.blur_radius(scene))
    assert not (diff & ~region).any()
    assert diff.any() == (person.down_colour != "black")
    # Reproducible, including the random pick of another colour.
    again = synthetic.render_counterfactual(tiny, f"query/{name}", "upwhite")
    np.testing.assert_array_equal(again, synthetic.render_counterfactual(tiny, name, "upwhite"))
    with pytest.raises(KeyError, match="not an image"):
        synthetic.render_counterfactual(tiny, "9999_c1s1_000001_01.jpg", None)
    with pytest.raises(ValueError, match="unknown attribute"):
        synthetic.render_counterfactual(tiny, name, "umbrella")
    meta = synthetic.load_meta(tiny)
    empty = next(os.path.basename(im["file"]) for im in meta["images"] if im["person"] is None)
    with pytest.raises(ValueError, match="shows no person"):
        synthetic.render_counterfactual(tiny, empty, "hat")


def test_same_seed_same_bytes_any_workers_other_seed_differs(tiny, tmp_path):
    again = tmp_path / "again"
    synthetic.generate_dataset(again, TINY, num_workers=2)
    assert file_bytes(tiny) == file_bytes(str(again))
    other = tmp_path / "other"
    synthetic.generate_dataset(other, dataclasses.replace(TINY, seed=4))
    a, b = file_bytes(tiny), file_bytes(str(other))
    assert a["market_attribute.mat"] != b["market_attribute.mat"] or a.keys() != b.keys()
    shared = a.keys() & b.keys()
    assert not any(a[k] == b[k] for k in shared if k.endswith(".jpg"))


def test_existing_output_is_not_overwritten_and_failures_leave_nothing(tiny, tmp_path,
                                                                       monkeypatch):
    small = dataclasses.replace(TINY, num_train_ids=1, num_test_ids=1, images_per_id=4,
                                num_distractors=0, num_junk=0)
    out = tmp_path / "ds"
    synthetic.generate_dataset(out, small)
    with pytest.raises(FileExistsError, match="--overwrite"):
        synthetic.generate_dataset(out, small)
    meta_before = (out / synthetic.META_FILE).read_bytes()
    synthetic.generate_dataset(out, dataclasses.replace(small, seed=9), overwrite=True)
    assert (out / synthetic.META_FILE).read_bytes() != meta_before
    # A folder the generator did not write is never replaced.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="did not write"):
        synthetic.generate_dataset(foreign, small, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"

    # An interrupted run (here: the label file fails) leaves neither the dataset nor temp files.
    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(attributes, "write_market_attributes", fail)
    target = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="interrupted"):
        synthetic.generate_dataset(target, small)
    assert not target.exists()
    assert sorted(os.listdir(tmp_path)) == ["ds", "foreign"]


def test_training_identities_can_have_fewer_images():
    plain = synthetic.plan_dataset(synthetic.DatasetConfig(num_train_ids=30, num_test_ids=4,
                                                           images_per_id=12))
    few = synthetic.plan_dataset(synthetic.DatasetConfig(num_train_ids=30, num_test_ids=4,
                                                         images_per_id=12, train_images_per_id=4))

    def per_split(meta):
        return collections.Counter(im["file"].split("/")[0] for im in meta["images"])

    assert per_split(few)["bounding_box_train"] <= 30 * 5 < per_split(plain)["bounding_box_train"]
    # The test identities are the same persons with the same images.
    test = lambda meta: [im for im in meta["images"]  # noqa: E731
                         if not im["file"].startswith("bounding_box_train")]
    assert test(few) == test(plain)
    assert few["config"]["train_images_per_id"] == 4


def test_config_errors():
    with pytest.raises(ValueError, match="images_per_id must be >= 4"):
        synthetic.DatasetConfig(images_per_id=2)
    with pytest.raises(ValueError, match="train_images_per_id must be >= 4"):
        synthetic.DatasetConfig(train_images_per_id=3)
    with pytest.raises(ValueError, match="<= 9999"):
        synthetic.DatasetConfig(num_train_ids=5000, num_test_ids=5000)
    with pytest.raises(FileNotFoundError, match="not a synthetic dataset"):
        synthetic.load_meta(ROOT)


def test_contact_sheet(tiny, tmp_path):
    out = synthetic.contact_sheet(tiny, tmp_path / "sheet.png", n=10, columns=5)
    with Image.open(out) as im:
        assert im.size == (5 * (64 * 2 + 4), 2 * (128 * 2 + 36 + 4))
        assert np.asarray(im).std() > 20  # not blank
    with pytest.raises(ValueError, match="split must be one of"):
        synthetic.contact_sheet(tiny, tmp_path / "x.png", split="val")


def test_make_synthetic_tool(tmp_path):
    out = tmp_path / "tool"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "make_synthetic.py"),
           f"--output_dir={out}", "--num_train_ids=2", "--num_test_ids=2", "--images_per_id=4",
           "--num_distractors=2", "--num_junk=1", "--seed=5",
           f"--contact_sheet={tmp_path / 'sheet.png'}"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert '"total_images"' in res.stdout
    assert (out / "market_attribute.mat").is_file() and (tmp_path / "sheet.png").is_file()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode != 0 and "overwrite" in res.stderr
