"""The map measurements' scoring on hand-made maps and regions (reid_jax.explain.map_metrics).

The end-to-end runs (tests/test_explanation_eval.py) check that the section is written; here
every rule of the pointing game is checked on cases whose answer is known by construction.
"""

from __future__ import annotations

import numpy as np
import pytest

from reid_jax.explain import map_metrics as mm

NAMES = ("hat", "upred", "gender", "downblue")  # headwear, upper body, none, lower body
H, W = 12, 8


def _regions():
    """bool [2, 4, H, W]: hat in rows 0-1, upper body rows 3-6, lower body rows 7-11."""
    r = np.zeros((2, len(NAMES), H, W), bool)
    r[:, 0, 0:2, 2:6] = True
    r[:, 1, 3:7, 1:7] = True
    r[:, 3, 7:12, 2:6] = True
    r[1, 0] = False  # image 1: the hat is hidden (empty region)
    return r


def _maps(peaks):
    """[2, 4, H, W] maps with one peak per (image, attribute) at ``peaks[i][a]``."""
    m = np.zeros((2, len(NAMES), H, W), np.float32)
    for i, row in enumerate(peaks):
        for a, (y, x) in enumerate(row):
            m[i, a, y, x] = 1.0
    return m


def test_near_and_dilate_use_the_euclidean_tolerance():
    region = np.zeros((9, 9), bool)
    region[4, 4] = True
    assert mm.near(region, 4, 6, 2.0) and not mm.near(region, 6, 6, 2.0)  # 2 vs 2.83 px
    assert mm.near(region, 5, 5, 1.5) and not mm.near(region, 5, 5, 1.0)
    assert mm.dilate(region, 2.0).sum() == 13  # the lattice points of a radius-2 disc
    assert mm.peak(np.array([[0, 3], [3, 1]])) == (0, 1)  # the first maximum, row-major


def test_pointing_game_counts_hits_cases_and_skips():
    probs = np.array([[0.9, 0.9, 0.9, 0.9],
                      [0.9, 0.9, 0.2, 0.6]])
    peaks = [[(1, 3), (0, 0), (5, 4), (9, 4)],  # hat hit, upred missed, downblue hit
             [(1, 3), (4, 3), (5, 4), (6, 4)]]  # hat (hidden) skipped, upred hit, downblue 1 px
    out = mm.pointing_game(_maps(peaks), _regions(), probs, attributes=NAMES)
    assert out["overall"]["cases"] == 5
    assert out["overall"]["evidence"] == {"hits": 4, "rate": 0.8}
    assert out["skipped"] == {"not_localisable": 1, "empty_region": 1}
    assert out["attributes"]["upred"]["evidence"] == {"hits": 1, "rate": 0.5}
    assert set(out["groups"]) == {"headwear", "upper_body", "lower_body"}
    # The centre (6, 4) lies in the upper-body region and 1 px from the lower body's.
    assert out["groups"]["upper_body"]["centre"]["rate"] == 1.0
    assert out["groups"]["lower_body"]["centre"]["rate"] == 1.0
    assert out["groups"]["headwear"]["centre"]["rate"] == 0.0
    assert 0 < out["overall"]["chance"]["expected_rate"] < 1
    assert "labelled_present" not in out
    # By kind of look: upred and downblue are colours (4 cases, 3 hits), the hat an object.
    assert out["kinds"]["colour"]["cases"] == 4 and out["kinds"]["colour"]["evidence"]["hits"] == 3
    assert out["kinds"]["object"]["evidence"] == {"hits": 1, "rate": 1.0}
    assert "shape" not in out["kinds"]


def test_every_localisable_attribute_has_one_kind():
    from reid_jax.data.attributes import ATTRIBUTE_NAMES
    from reid_jax.synthetic.masks import localisable

    kinds = [k for names in mm.ATTRIBUTE_KINDS.values() for k in names]
    assert len(kinds) == len(set(kinds))
    assert sorted(kinds) == sorted(np.asarray(ATTRIBUTE_NAMES)[localisable()].tolist())


def test_pointing_game_over_the_cases_the_labels_confirm():
    probs = np.full((2, len(NAMES)), 0.9)
    peaks = [[(1, 3), (0, 0), (5, 4), (9, 4)],
             [(0, 0), (4, 3), (5, 4), (0, 0)]]
    labels = np.array([[1, 0, 1, 1],   # image 0 does not show upred: its miss is left out
                       [0, 1, 0, 0]])  # image 1 does not show downblue: its miss is left out
    out = mm.pointing_game(_maps(peaks), _regions(), probs, attributes=NAMES, labels=labels)
    assert out["overall"]["cases"] == 5 and out["overall"]["evidence"]["hits"] == 3
    assert out["overall"]["mean_labelled_present"] == pytest.approx(3 / 5)
    confirmed = out["labelled_present"]
    assert confirmed["overall"]["cases"] == 3
    assert confirmed["overall"]["evidence"] == {"hits": 3, "rate": 1.0}
    assert confirmed["attributes"]["upred"]["cases"] == 1
    assert confirmed["skipped"] == out["skipped"]


def test_pointing_game_over_the_attributes_the_model_has_learned():
    probs = np.full((2, len(NAMES)), 0.9)
    peaks = [[(1, 3), (0, 0), (5, 4), (9, 4)],  # hat hit, upred missed, downblue hit
             [(0, 0), (4, 3), (5, 4), (0, 0)]]  # upred hit, downblue missed
    cases = mm.pointing_game_cases(_maps(peaks), _regions(), probs, attributes=NAMES)
    accuracy = np.array([0.95, 0.5, np.nan, 0.8])  # hat, upred, gender (not measured), downblue
    out = mm.summarise_pointing(cases, NAMES, attribute_accuracy=accuracy)
    learned = out["learned"]
    assert learned["learned_attributes"] == ["hat", "downblue"]  # 0.8 counts; NaN does not
    assert learned["min_accuracy"] == 0.8
    assert learned["attribute_accuracy"] == {"hat": 0.95, "upred": 0.5, "gender": None,
                                             "downblue": 0.8}
    assert learned["overall"]["cases"] == 3 and learned["overall"]["evidence"]["hits"] == 2
    assert "upred" not in learned["attributes"]
    assert out["overall"]["cases"] == 5  # the whole game is unchanged
    stricter = mm.summarise_pointing(cases, NAMES, attribute_accuracy=accuracy,
                                     min_accuracy=0.9)["learned"]
    assert stricter["learned_attributes"] == ["hat"] and stricter["overall"]["cases"] == 1
    assert "learned" not in mm.summarise_pointing(cases, NAMES)
    with pytest.raises(ValueError, match=r"attribute_accuracy must have shape \(4,\)"):
        mm.summarise_pointing(cases, NAMES, attribute_accuracy=np.ones(3))
    with pytest.raises(ValueError, match="min_accuracy must lie in"):
        mm.summarise_pointing(cases, NAMES, attribute_accuracy=accuracy, min_accuracy=80)


def test_select_and_concatenate_keep_cases_aligned():
    probs = np.full((2, len(NAMES)), 0.9)
    regions = _regions()
    maps = _maps([[(1, 3), (4, 3), (5, 4), (9, 4)]] * 2)
    parts = [mm.pointing_game_cases(maps[i:i + 1], regions[i:i + 1], probs[i:i + 1],
                                    attributes=NAMES, labels=np.ones((1, len(NAMES))))
             for i in range(2)]
    cases = mm.concatenate(parts, [0, 1])
    assert cases.item.tolist() == [0, 0, 0, 1, 1]
    kept = mm.select(cases, cases.item == 1)
    assert kept.attribute.tolist() == [1, 3] and kept.outcomes["evidence"].all()
    assert kept.values["labelled_present"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"keep must be bool of shape \(5,\)"):
        mm.select(cases, np.ones(4, bool))


def test_pointing_game_refuses_bad_shapes_with_their_names():
    probs = np.full((2, len(NAMES)), 0.9)
    maps, regions = _maps([[(0, 0)] * 4] * 2), _regions()
    with pytest.raises(ValueError, match=r"maps must be \[B, A, H, W\]"):
        mm.pointing_game(maps[0], regions, probs, attributes=NAMES)
    with pytest.raises(ValueError, match="shapes disagree"):
        mm.pointing_game(maps, regions[:, :3], probs, attributes=NAMES)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 4\)"):
        mm.pointing_game(maps, regions, probs, attributes=NAMES, labels=np.ones((1, 4)))
    with pytest.raises(ValueError, match="tolerance must be"):
        mm.pointing_game(maps, regions, probs, attributes=NAMES, tolerance=-1.0)
    with pytest.raises(ValueError, match="baseline name 'centre' is taken"):
        mm.pointing_game(maps, regions, probs, attributes=NAMES,
                         baselines={"centre": np.zeros((2, H, W))})
    # A NaN map's argmax is its first pixel, a "hit" wherever a region starts there.
    nan = np.full_like(maps, np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match=f"maps must be finite, got {nan.size} NaN or infinite "
                                         f"values of {nan.size}"):
        mm.pointing_game(nan, regions, probs, attributes=NAMES)
    with pytest.raises(ValueError, match="baseline 'gradcam' must be finite, got 1 NaN"):
        cam = np.zeros((2, H, W), np.float32)
        cam[1, 3, 4] = np.inf
        mm.pointing_game(maps, regions, probs, attributes=NAMES, baselines={"gradcam": cam})


def test_baseline_points_are_scored_on_the_same_cases():
    probs = np.array([[0.9, 0.9, 0.9, 0.9],
                      [0.9, 0.9, 0.2, 0.6]])
    maps = _maps([[(1, 3), (0, 0), (5, 4), (9, 4)], [(1, 3), (4, 3), (5, 4), (6, 4)]])
    points = np.zeros((2, len(NAMES), 2), np.int64)
    points[0] = [(11, 0), (4, 2), (0, 0), (8, 3)]  # hat missed, upred hit, downblue hit
    points[1] = [(0, 0), (11, 7), (0, 0), (10, 5)]  # upred missed, downblue hit
    out = mm.pointing_game(maps, _regions(), probs, attributes=NAMES,
                           baseline_points={"occlusion": points})
    assert out["overall"]["cases"] == 5
    assert out["overall"]["occlusion"] == {"hits": 3, "rate": 0.6}
    assert out["attributes"]["downblue"]["occlusion"]["hits"] == 2
    assert out["overall"]["evidence"]["hits"] == 4  # the maps' own score is unchanged
    with pytest.raises(ValueError, match=r"baseline 'occlusion' must have shape \(2, 4, 2\) "
                                         r"\(one \(row, column\) per image and attribute\)"):
        mm.pointing_game(maps, _regions(), probs, attributes=NAMES,
                         baseline_points={"occlusion": points[:, :3]})
    with pytest.raises(ValueError, match="baseline name 'evidence' is taken"):
        mm.pointing_game(maps, _regions(), probs, attributes=NAMES,
                         baseline_points={"evidence": points})


def _occlusion(tops):
    """[2, 4, H, W] part-occlusion maps over three horizontal parts (rows 0-3, 4-7, 8-11):
    ``tops[i][a]`` is the part whose greying lowers attribute a most."""
    m = np.zeros((2, len(NAMES), H, W), np.float32)
    for i, row in enumerate(tops):
        for a, part in enumerate(row):
            m[i, a, 4 * part:4 * part + 4] = 2.0
            m[i, a, 4 * ((part + 1) % 3):4 * ((part + 1) % 3) + 4] = 1.0
    return m


def test_part_occlusion_points_are_the_deepest_pixels_of_the_top_part():
    occ = _occlusion([[0, 1, 2, 2], [1, 1, 1, 0]])
    occ[1, 2, 0, 0] = -np.inf  # a part too small to grey never wins
    top = mm.top_part_regions(occ)
    assert top[0, 0, 0:4].all() and top[0, 0].sum() == 4 * W
    points = mm.part_occlusion_points(occ)
    # The deepest pixels of a 4 x 8 band: rows 1-2 (first: 1), columns 3-4 (first: 3).
    assert points[0, 0].tolist() == [1, 3] and points[0, 1].tolist() == [5, 3]
    assert points[0, 3].tolist() == [9, 3]
    with pytest.raises(ValueError, match=r"occlusion_maps must be \[B, A, H, W\]"):
        mm.part_occlusion_points(occ[0])


def test_agreement_with_part_occlusion_scores_the_part_the_model_reads():
    probs = np.array([[0.9, 0.9, 0.9, 0.9],
                      [0.9, 0.9, 0.2, 0.6]])
    # Image 0: upred read from the top part (rows 0-3), downblue from the middle (4-7);
    # image 1: upred from the bottom (8-11), downblue from the bottom.
    occ = _occlusion([[0, 0, 1, 1], [0, 2, 0, 2]])
    peaks = [[(1, 3), (2, 2), (5, 4), (11, 4)],  # hat agrees, upred agrees, downblue 4 px off
             [(1, 3), (4, 3), (5, 4), (10, 4)]]  # (hat hidden), upred 4 px off, downblue agrees
    cases = mm.occlusion_agreement_cases(_maps(peaks), occ, _regions(), probs,
                                         attributes=NAMES)
    out = mm.summarise(cases, NAMES)
    assert out["overall"]["cases"] == 5  # the pointing game's cases
    assert out["overall"]["evidence"]["hits"] == 3
    assert out["attributes"]["upred"]["evidence"]["hits"] == 1
    assert out["skipped"] == {"not_localisable": 1, "empty_region": 1}
    with pytest.raises(ValueError, match="must have the same shape"):
        mm.occlusion_agreement_cases(_maps(peaks), occ[:, :3], _regions(), probs,
                                     attributes=NAMES)
