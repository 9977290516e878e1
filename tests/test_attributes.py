"""Tests for reid_jax.data.attributes: the real label file, coding checks, writer round trip."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from reid_jax.data import attributes as a

REAL_MAT = Path(__file__).parents[2] / "shared/data/market1501/market_attribute.mat"
needs_real = pytest.mark.skipif(not REAL_MAT.is_file(), reason=f"{REAL_MAT} absent")

# The paper's Table 4.1, positive ratio (%) per training identity.
PAPER_TRAIN_RATIOS = {"bag": 24.63, "age2": 75.77, "downblue": 16.38, "backpack": 26.50,
                      "downgray": 16.38, "age4": 1.07, "downgreen": 1.86, "downyellow": 1.33,
                      "downpurple": 0.27, "hat": 2.66}
UP_COLOURS = [n for n in a.ATTRIBUTE_NAMES if n.startswith("up") and n != "up"]
DOWN_COLOURS = [n for n in a.ATTRIBUTE_NAMES if n.startswith("down") and n != "down"]


def random_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 30] binary labels with one-hot age, as write_market_attributes wants."""
    labels = (rng.random((n, a.NUM_ATTRIBUTES)) < 0.3).astype(np.uint8)
    age = [a.ATTRIBUTE_NAMES.index(f"age{k}") for k in range(1, 5)]
    labels[:, age] = 0
    labels[np.arange(n), np.asarray(age)[rng.integers(0, 4, n)]] = 1
    return labels


def raw_splits(path) -> dict[str, np.ndarray]:
    top = scipy.io.loadmat(path)["market_attribute"]
    return {s: top[s][0, 0] for s in top.dtype.names}


def assert_same_raw(x: dict, y: dict) -> None:
    assert list(x) == list(y)
    for split in x:
        assert x[split].dtype.names == y[split].dtype.names
        for field in x[split].dtype.names:
            u, v = x[split][field][0, 0], y[split][field][0, 0]
            assert (u.dtype, u.shape) == (v.dtype, v.shape), (split, field)
            if field == "image_index":
                for p, q in zip(u.ravel(), v.ravel(), strict=True):
                    assert (p.dtype, p.shape, p.tolist()) == (q.dtype, q.shape, q.tolist())
            else:
                np.testing.assert_array_equal(u, v)


# --------------------------------------------------------------------------- the real file


@pytest.fixture(scope="module")
def real() -> a.MarketAttributes:
    if not REAL_MAT.is_file():
        pytest.skip(f"{REAL_MAT} absent")
    return a.load_market_attributes(REAL_MAT)


@needs_real
def test_real_structure(real):
    assert real.names == a.ATTRIBUTE_NAMES
    assert real.train_labels.shape == (751, 30) and real.test_labels.shape == (750, 30)
    assert real.train_labels.dtype == np.uint8 and real.train_ids.dtype == np.int32
    assert (real.train_ids[0], real.train_ids[-1]) == (2, 1500)
    assert (real.test_ids[0], real.test_ids[-1]) == (1, 1501)
    assert np.all(np.diff(real.train_ids) > 0) and np.all(np.diff(real.test_ids) > 0)
    assert np.intersect1d(real.train_ids, real.test_ids).size == 0
    np.testing.assert_array_equal(np.union1d(real.train_ids, real.test_ids), np.arange(1, 1502))
    for labels in (real.train_labels, real.test_labels):
        assert set(np.unique(labels)) <= {0, 1}
        np.testing.assert_array_equal(labels[:, -4:].sum(axis=1), 1)  # age one-hot.


@needs_real
def test_real_field_orders_differ():
    raw = raw_splits(REAL_MAT)
    assert raw["train"].dtype.names == a.TRAIN_FIELD_ORDER
    assert raw["test"].dtype.names == a.TEST_FIELD_ORDER
    assert a.TRAIN_FIELD_ORDER != a.TEST_FIELD_ORDER


@needs_real
def test_real_values_looked_up_by_name(real):
    raw = raw_splits(REAL_MAT)
    for split in ("train", "test"):
        labels = real.labels(split)
        for field in a.MAT_FIELDS:
            values = raw[split][field][0, 0].ravel().astype(np.int64)
            if field == "age":
                for k in range(1, 5):
                    np.testing.assert_array_equal(labels[:, a.ATTRIBUTE_NAMES.index(f"age{k}")],
                                                  values == k)
            else:
                np.testing.assert_array_equal(labels[:, a.ATTRIBUTE_NAMES.index(field)],
                                              values == 2, err_msg=f"{split}.{field}")
    # Identity 0002 (first train column): teenager, no bag, blue trousers, red short sleeves.
    row = dict(zip(a.ATTRIBUTE_NAMES, real.train_labels[0].tolist(), strict=True))
    assert row["age2"] == 1 and row["bag"] == 0 and row["downblue"] == 1 and row["upred"] == 1
    assert row["clothes"] == 1 and row["up"] == 1 and row["gender"] == 0


@needs_real
def test_real_train_positive_ratios_match_paper(real):
    ratios = a.positive_ratios(real.train_labels)
    for name, expected in PAPER_TRAIN_RATIOS.items():
        assert round(ratios[a.ATTRIBUTE_NAMES.index(name)], 2) == pytest.approx(expected), name


@needs_real
def test_real_colours_at_most_one_hot(real):
    up = [a.ATTRIBUTE_NAMES.index(n) for n in UP_COLOURS]
    down = [a.ATTRIBUTE_NAMES.index(n) for n in DOWN_COLOURS]
    counts = {}
    for split in ("train", "test"):
        labels = real.labels(split)
        assert labels[:, up].sum(axis=1).max() <= 1 and labels[:, down].sum(axis=1).max() <= 1
        counts[split] = (int((labels[:, up].sum(axis=1) == 0).sum()),
                         int((labels[:, down].sum(axis=1) == 0).sum()))
    assert counts == {"train": (78, 30), "test": (69, 44)}
    assert real.test_labels[:, a.ATTRIBUTE_NAMES.index("downpurple")].sum() == 0


@needs_real
def test_real_rewritten_is_identical(real, tmp_path):
    out = tmp_path / "rewritten.mat"
    a.write_market_attributes(out, real.train_ids, real.train_labels, real.test_ids,
                              real.test_labels)
    again = a.load_market_attributes(out)
    for field in ("train_ids", "train_labels", "test_ids", "test_labels"):
        np.testing.assert_array_equal(getattr(again, field), getattr(real, field))
    assert_same_raw(raw_splits(REAL_MAT), raw_splits(out))


# --------------------------------------------------------------------------- writer / reader


def test_write_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    train_ids, test_ids = np.array([10, 2, 7]), np.array([1, 3, 4, 1501])
    train, test = random_labels(rng, 3), random_labels(rng, 4)
    path = tmp_path / "sub" / "market_attribute.mat"
    a.write_market_attributes(path, train_ids, train, test_ids, test)
    got = a.load_market_attributes(path)
    order = np.argsort(train_ids)  # Written in ascending id order.
    np.testing.assert_array_equal(got.train_ids, train_ids[order])
    np.testing.assert_array_equal(got.train_labels, train[order])
    np.testing.assert_array_equal(got.test_ids, test_ids)
    np.testing.assert_array_equal(got.test_labels, test)
    raw = raw_splits(path)
    assert list(raw) == ["test", "train"]
    assert raw["train"].dtype.names == a.TRAIN_FIELD_ORDER
    assert raw["test"].dtype.names == a.TEST_FIELD_ORDER
    assert raw["train"]["hat"][0, 0].dtype == np.uint8
    assert raw["train"]["hat"][0, 0].shape == (1, 3)
    assert [c.item() for c in raw["train"]["image_index"][0, 0].ravel()] == ["0002", "0007",
                                                                            "0010"]
    # Coding: 1/2 for binary fields, age 1..4.
    age = raw["test"]["age"][0, 0].ravel()
    np.testing.assert_array_equal(age, test[:, -4:].argmax(axis=1) + 1)
    np.testing.assert_array_equal(raw["test"]["bag"][0, 0].ravel(),
                                  test[:, a.ATTRIBUTE_NAMES.index("bag")] + 1)


@pytest.mark.parametrize("change,message", [
    (lambda lab: lab[:, :3], r"train_labels must have shape \(3, 30\)"),
    (lambda lab: lab * 2, "train_labels must be binary"),
    (lambda lab: np.where(np.arange(30) >= 26, 0, lab), "age1..age4 must be one-hot"),
])
def test_write_rejects_bad_labels(tmp_path, change, message):
    labels = change(random_labels(np.random.default_rng(1), 3))
    with pytest.raises(ValueError, match=message):
        a.write_market_attributes(tmp_path / "x.mat", [2, 7, 10], labels, [1],
                                  random_labels(np.random.default_rng(2), 1))


@pytest.mark.parametrize("train_ids,test_ids,message", [
    ([2, 2, 10], [1], "train_ids has duplicates"),
    ([2, 7, 10], [7], "overlap"),
    ([0, 7, 10], [1], r"train_ids must be in 1..9999"),
    ([2, 7, 10], [10000], r"test_ids must be in 1..9999"),
])
def test_write_rejects_bad_ids(tmp_path, train_ids, test_ids, message):
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match=message):
        a.write_market_attributes(tmp_path / "x.mat", np.array(train_ids), random_labels(rng, 3),
                                  np.array(test_ids), random_labels(rng, 1))


@pytest.fixture
def small_mat(tmp_path) -> Path:
    rng = np.random.default_rng(4)
    path = tmp_path / "market_attribute.mat"
    a.write_market_attributes(path, np.array([2, 7]), random_labels(rng, 2), np.array([1, 3]),
                              random_labels(rng, 2))
    return path


def rewrite(path: Path, edit) -> None:
    """Loads the raw file, lets ``edit(splits)`` change it, saves it back."""
    splits = raw_splits(path)
    edit(splits)
    scipy.io.savemat(path, {"market_attribute": {
        s: {f: v[f][0, 0] for f in v.dtype.names} for s, v in splits.items()}})


@pytest.mark.parametrize("split,field,value,message", [
    ("test", "hat", 3, r"split 'test' field 'hat' has 1 values outside \(1, 2\), first 3"),
    ("train", "downblue", 0, r"split 'train' field 'downblue' has 1 values outside"),
    ("train", "age", 5, r"split 'train' field 'age' has 1 values outside \(1, 2, 3, 4\)"),
    ("test", "age", 0, r"split 'test' field 'age' .* for identity 0003"),
])
def test_load_rejects_bad_coding(small_mat, split, field, value, message):
    def edit(splits):
        splits[split][field][0, 0][0, -1] = value
    rewrite(small_mat, edit)
    with pytest.raises(ValueError, match=message):
        a.load_market_attributes(small_mat)


def test_load_missing_field(small_mat):
    splits = raw_splits(small_mat)
    fields = {s: {f: v[f][0, 0] for f in v.dtype.names} for s, v in splits.items()}
    del fields["test"]["upgreen"]
    scipy.io.savemat(small_mat, {"market_attribute": fields})
    with pytest.raises(ValueError, match=r"split 'test' has no field 'upgreen'"):
        a.load_market_attributes(small_mat)


def test_load_missing_split_and_variable(small_mat, tmp_path):
    splits = raw_splits(small_mat)
    scipy.io.savemat(small_mat, {"market_attribute": {
        "train": {f: splits["train"][f][0, 0] for f in splits["train"].dtype.names}}})
    with pytest.raises(ValueError, match="has no split 'test'"):
        a.load_market_attributes(small_mat)
    other = tmp_path / "other.mat"
    scipy.io.savemat(other, {"labels": np.zeros(3)})
    with pytest.raises(ValueError, match=r"no variable 'market_attribute' \(has \['labels'\]\)"):
        a.load_market_attributes(other)


def test_load_bad_identity_strings(small_mat):
    def edit(splits):
        splits["train"]["image_index"][0, 0][0, 1] = np.array(["07"])
    rewrite(small_mat, edit)
    with pytest.raises(ValueError, match="'image_index' entry 1: expected a 4-digit identity"):
        a.load_market_attributes(small_mat)


def test_load_missing_and_unreadable_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"attribute file not found: {tmp_path}/no.mat"):
        a.load_market_attributes(tmp_path / "no.mat")
    junk = tmp_path / "junk.mat"
    junk.write_bytes(b"this is not a MAT file at all" * 10)
    with pytest.raises(ValueError, match="junk.mat: not a readable MAT file"):
        a.load_market_attributes(junk)


# --------------------------------------------------------------------------- joins and ratios


def test_labels_for_pids_against_reference(small_mat, caplog):
    attrs = a.load_market_attributes(small_mat)
    pids = np.array([0, 1, -1, 3, 3, 5, 1], dtype=np.int32)
    with caplog.at_level(logging.INFO):
        labels, has = a.labels_for_pids(attrs, pids, "gallery")
    expected = np.zeros((pids.size, 30), np.uint8)
    expected_has = np.zeros(pids.size, bool)
    for i, pid in enumerate(pids):
        for k, known in enumerate(attrs.test_ids):
            if known == pid:
                expected[i], expected_has[i] = attrs.test_labels[k], True
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(has, expected_has)
    assert labels.dtype == np.uint8 and has.dtype == bool
    assert "1 identities other than distractors/junk have no attribute labels, first ['0005']" \
        in caplog.text
    # Train pids are looked up in the train table only.
    labels, has = a.labels_for_pids(attrs, np.array([7, 1, 2]), "train")
    np.testing.assert_array_equal(has, [True, False, True])
    np.testing.assert_array_equal(labels[0], attrs.train_labels[1])
    np.testing.assert_array_equal(labels[1], 0)


def test_labels_for_pids_errors(small_mat):
    attrs = a.load_market_attributes(small_mat)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        a.labels_for_pids(attrs, np.array([1]), "val")
    with pytest.raises(ValueError, match="pids must be a 1-D integer array"):
        a.labels_for_pids(attrs, np.array([[1]]), "test")
    with pytest.raises(ValueError, match="pids must be a 1-D integer array"):
        a.labels_for_pids(attrs, np.array([1.0]), "test")


def test_positive_ratios_against_reference():
    labels = random_labels(np.random.default_rng(5), 37)
    expected = np.array([100.0 * sum(float(row[k]) for row in labels) / len(labels)
                         for k in range(labels.shape[1])], dtype=np.float64)
    got = a.positive_ratios(labels)
    assert got.dtype == np.float64 and got.shape == (30,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"labels must be \[n, k\] with n > 0"):
        a.positive_ratios(np.zeros((0, 30)))
    with pytest.raises(ValueError, match="binary"):
        a.positive_ratios(np.full((2, 30), 2))


def test_display_name_kept():
    assert a.display_name("gender", True) == "gender"
    assert a.display_name("gender", False) == "!gender"
    assert len(a.ATTRIBUTE_NAMES) == a.NUM_ATTRIBUTES == 30
