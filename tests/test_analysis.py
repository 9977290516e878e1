"""Tests of reid_jax/analysis.py and tools/analyze.py (paper Table 4.1, Figure 4.1)."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from reid_jax import analysis
from reid_jax.data.attributes import (
    ATTRIBUTE_NAMES,
    load_market_attributes,
    positive_ratios,
    write_market_attributes,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_ATTRIBUTE_FILE = os.path.join(REPO, "..", "shared", "data", "market1501",
                                   "market_attribute.mat")
A = len(ATTRIBUTE_NAMES)


# ---------------------------------------------------------------------- float64 numpy references


def _ref_top1_counts(w: np.ndarray, by: str) -> np.ndarray:
    counts = np.zeros(w.shape[1], np.int64)
    for row in w.astype(np.float64):
        score = np.abs(row) if by == "abs" else row
        best = 0
        for a in range(1, row.size):
            if score[a] > score[best]:  # Strictly greater: the first of equal maxima wins.
                best = a
        counts[best] += 1
    return counts


def _ref_ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) with ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, np.float64)
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _ref_pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


# ---------------------------------------------------------------------- Table 4.1


def test_top1_counts_on_hand_made_weights():
    names = ("a", "b", "c")
    w = np.array([[0.1, 0.5, -0.9],    # signed: b, abs: c
                  [0.7, 0.2, 0.3],     # a, a
                  [-0.2, -0.1, -0.3],  # b, c
                  [0.0, 0.4, 0.6]])    # c, c
    np.testing.assert_array_equal(analysis.top1_attribute(w), [1, 0, 1, 2])
    np.testing.assert_array_equal(analysis.top1_attribute(w, by="abs"), [2, 0, 2, 2])
    np.testing.assert_array_equal(analysis.top1_attribute_counts(w), [1, 2, 1])
    np.testing.assert_array_equal(analysis.top1_attribute_counts(w, by="abs"), [1, 0, 3])
    rows = analysis.table_4_1(w, [10.0, 50.0, 5.0], names)
    assert rows == [("b", 2, 50.0), ("a", 1, 10.0), ("c", 1, 5.0)]
    assert [r.attribute for r in analysis.table_4_1(w, None, names)] == ["b", "a", "c"]


def test_top1_counts_match_reference_on_random_weights():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(300, A)).astype(np.float32)
    w[::7, 3] = w[::7, 5] = 9.0  # Exact ties on some rows.
    for by in analysis.TOP1_RULES:
        counts = analysis.top1_attribute_counts(w, by=by)
        np.testing.assert_array_equal(counts, _ref_top1_counts(w, by))
        assert counts.sum() == 300 and counts.dtype == np.int64


def test_ties_go_to_the_first_attribute():
    w = np.array([[1.0, 1.0, 0.0],
                  [-2.0, 2.0, 0.0],
                  [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(analysis.top1_attribute(w), [0, 1, 0])
    np.testing.assert_array_equal(analysis.top1_attribute(w, by="abs"), [0, 0, 0])


def test_table_sort_ties_by_ratio_then_name_order():
    names = ("x", "y", "z", "u")
    w = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    rows = analysis.table_4_1(w, [3.0, 7.0, 3.0, 0.5], names)
    assert [r.attribute for r in rows] == ["y", "x", "z", "u"]  # All counts 1.


def test_markdown_and_csv():
    names = ("bag", "hat", "up")
    w = np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    rows = analysis.table_4_1(w, [24.63, 2.66, 94.8123], names)
    corr = analysis.count_ratio_correlation([r.count for r in rows],
                                            [r.positive_ratio for r in rows])
    md = analysis.table_markdown(rows, num_components=3, ratio_source="training split",
                                 correlation=corr)
    assert "| bag | 2 | 24.63 |" in md and "| up | 1 | 94.81 |" in md and "| hat | 0 | 2.66 |" in md
    assert "highest weight" in md and "(training split)" in md and "Pearson r =" in md
    assert md.index("| bag |") < md.index("| up |") < md.index("| hat |")
    parsed = list(csv.reader(io.StringIO(analysis.table_csv(rows))))
    assert parsed[0] == ["attribute", "top1_count", "positive_ratio_percent"]
    assert parsed[1] == ["bag", "2", "24.6300"]
    md_abs = analysis.table_markdown(analysis.table_4_1(w, None, names), num_components=3,
                                     by="abs")
    assert "| bag | 2 | n/a |" in md_abs and "magnitude" in md_abs
    assert list(csv.reader(io.StringIO(analysis.table_csv(
        analysis.table_4_1(w, None, names)))))[1] == ["bag", "2", ""]


def test_correlation_against_reference():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 120, size=A)
    counts[:4] = 50  # Ties in the ranks.
    ratios = rng.uniform(0, 100, size=A)
    corr = analysis.count_ratio_correlation(counts, ratios)
    assert corr.pearson_r == pytest.approx(_ref_pearson(counts.astype(float), ratios), abs=1e-12)
    assert corr.spearman_rho == pytest.approx(
        _ref_pearson(_ref_ranks(counts.astype(float)), _ref_ranks(ratios)), abs=1e-12)
    assert 0 <= corr.pearson_p <= 1 and corr.num_attributes == A
    perfect = analysis.count_ratio_correlation([1, 2, 3, 4], [10.0, 20.0, 30.0, 41.0])
    assert perfect.spearman_rho == pytest.approx(1.0)
    constant = analysis.count_ratio_correlation([5, 5, 5], [1.0, 2.0, 3.0])
    assert np.isnan(constant.pearson_r) and "undefined" in analysis.correlation_text(constant)
    with pytest.raises(ValueError, match=r"both be \[A\]"):
        analysis.count_ratio_correlation([1, 2, 3], [1.0, 2.0])


def test_identity_positive_ratios_count_each_identity_once():
    labels = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [1, 1], [0, 0]])
    pids = np.array([7, 7, 7, 9, 0, -1])  # Identity 7 has 3 images; 0 and -1 are left out.
    ratios, n = analysis.identity_positive_ratios(labels, pids)
    assert n == 2
    np.testing.assert_allclose(ratios, [50.0, 50.0])
    with pytest.raises(ValueError, match="identity 7 has images with different"):
        analysis.identity_positive_ratios(np.array([[1, 0], [0, 0]]), np.array([7, 7]))
    with pytest.raises(ValueError, match="no image with an identity"):
        analysis.identity_positive_ratios(np.array([[1, 0]]), np.array([0]))


@pytest.mark.skipif(not os.path.isfile(REAL_ATTRIBUTE_FILE),
                    reason="real market_attribute.mat not available")
def test_positive_ratios_on_the_real_file_are_the_papers():
    train = load_market_attributes(REAL_ATTRIBUTE_FILE).train_labels
    assert train.shape == (751, A)
    ratios = dict(zip(ATTRIBUTE_NAMES, positive_ratios(train), strict=True))
    paper = {"bag": 24.63, "age2": 75.77, "downblue": 16.38, "backpack": 26.50,
             "downgray": 16.38, "age4": 1.07, "downgreen": 1.86, "downyellow": 1.33,
             "downpurple": 0.27, "hat": 2.66}
    for name, value in paper.items():
        assert round(ratios[name], 2) == value, name
    rows = analysis.table_4_1(np.eye(A), positive_ratios(train), ATTRIBUTE_NAMES)
    md = analysis.table_markdown(rows, num_components=A)
    assert "| hat | 1 | 2.66 |" in md and "| bag | 1 | 24.63 |" in md


def test_errors_name_the_shape_at_fault():
    with pytest.raises(ValueError, match=r"A = 4 attributes but 30 names"):
        analysis.table_4_1(np.zeros((5, 4)), None, ATTRIBUTE_NAMES)
    with pytest.raises(ValueError, match=r"must be \[N, A\].*shape \(5,\)"):
        analysis.top1_attribute_counts(np.zeros(5))
    with pytest.raises(ValueError, match=r"non-finite entries, first at \[1, 2\]"):
        w = np.zeros((3, 4))
        w[1, 2] = np.nan
        analysis.top1_attribute(w)
    with pytest.raises(ValueError, match="by must be one of"):
        analysis.top1_attribute(np.zeros((2, 2)), by="max")
    with pytest.raises(ValueError, match=r"positive_ratio_percent must have shape \(3,\)"):
        analysis.table_4_1(np.zeros((2, 3)), [1.0, 2.0], ("a", "b", "c"))
    with pytest.raises(ValueError, match=r"percentages in \[0, 100\]"):
        analysis.table_4_1(np.zeros((2, 3)), [1.0, 2.0, 101.0], ("a", "b", "c"))
    with pytest.raises(ValueError, match="unique"):
        analysis.table_4_1(np.zeros((2, 3)), None, ("a", "b", "a"))
    with pytest.raises(ValueError, match=r"G = 3 rows but 2 image paths"):
        analysis.check_features(np.zeros((3, 4)), ["p1", "p2"])
    mismatch = "N = 4 components but the attribute weights W have N = 5"
    with pytest.raises(ValueError, match=mismatch):
        analysis.check_features(np.zeros((3, 4)), num_components=5)


# ---------------------------------------------------------------------- Figure 4.1


def test_selectivity_and_most_selective_components():
    w = np.array([[1.0, 1.0, 1.0, 1.0],     # spread: 0.25
                  [0.0, -3.0, 0.0, 1.0],    # 0.75
                  [0.0, 0.0, 0.0, 0.0],     # all zero: 0
                  [5.0, 0.0, 0.0, 0.0],     # 1.0
                  [0.0, 0.0, 3.0, -1.0]])   # 0.75, ties with row 1
    ref = np.abs(w).max(1) / np.where(np.abs(w).sum(1) > 0, np.abs(w).sum(1), 1.0)
    np.testing.assert_allclose(analysis.selectivity(w), ref, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(analysis.most_selective_components(w, 3), [3, 1, 4])
    assert analysis.most_selective_components(w, 99).tolist() == [3, 1, 4, 0, 2]
    with pytest.raises(ValueError, match="positive integer"):
        analysis.most_selective_components(w, 0)


def test_extreme_attributes_and_sorted_gallery():
    names = ("a", "b", "c", "d", "e")
    high, low = analysis.extreme_attributes([0.5, -1.0, 2.0, 0.5, -3.0], names)
    assert high == [("c", 2.0), ("a", 0.5), ("d", 0.5)]
    assert low == [("e", -3.0), ("b", -1.0), ("a", 0.5)]
    with pytest.raises(ValueError, match="A = 5 attributes but 2 names"):
        analysis.extreme_attributes(np.zeros(5), ("a", "b"))
    v = np.array([0.3, 2.0, -1.0, 0.3, 5.0, -4.0, 1.0])
    top, bottom = analysis.sorted_gallery(v, 3)
    assert top.tolist() == [4, 1, 6] and bottom.tolist() == [3, 2, 5]
    top, bottom = analysis.sorted_gallery(v, 5)  # Only 2 left for the lowest end.
    assert top.tolist() == [4, 1, 6, 0, 3] and bottom.tolist() == [2, 5]
    top, bottom = analysis.sorted_gallery(v, 10)
    assert top.size == 7 and bottom.size == 0


def _write_images(folder, pids) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, pid in enumerate(pids):
        path = os.path.join(folder, f"{pid:04d}_c{i % 6 + 1}s1_{i:06d}_00.jpg")
        rgb = np.zeros((128, 64, 3), np.uint8)
        rgb[..., 0] = 20 * i % 256
        rgb[32:96, 16:48, 1] = 200
        Image.fromarray(rgb).save(path)
        paths.append(path)
    return paths


def test_component_figure_writes_a_png(tmp_path):
    paths = _write_images(tmp_path / "gallery", [1, 1, 2, 3, 3, 4, 5])
    values = np.array([0.1, 0.9, -0.5, 0.4, 0.0, 2.0, -1.0])
    out = analysis.component_figure(values, paths, np.linspace(-1, 1, A), ATTRIBUTE_NAMES,
                                    tmp_path / "fig" / "component_3.png", num_images=3,
                                    component=3)
    assert out == str(tmp_path / "fig" / "component_3.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width >= 500 and im.height >= 400
    assert os.listdir(tmp_path / "fig") == ["component_3.png"]  # No temporary file left.
    one_row = analysis.component_figure(values[:2], paths[:2], np.zeros(A), ATTRIBUTE_NAMES,
                                        tmp_path / "one.png", num_images=5)
    assert os.path.isfile(one_row)
    with pytest.raises(ValueError, match=r"G = 7 rows but 6 image paths"):
        analysis.component_figure(values, paths[:6], np.zeros(A), ATTRIBUTE_NAMES,
                                  tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="gallery image not found"):
        analysis.component_figure(values, [*paths[:6], str(tmp_path / "none.jpg")],
                                  np.zeros(A), ATTRIBUTE_NAMES, tmp_path / "x.png", num_images=2)
    assert not os.path.exists(tmp_path / "x.png")


def test_write_analysis(tmp_path):
    rng = np.random.default_rng(2)
    paths = _write_images(tmp_path / "g", [1, 2, 3, 4, 5, 6])
    w = rng.normal(size=(16, A))
    w[5] = 0.0
    w[5, 4] = 1.0  # Component 5 is the most selective.
    summary = analysis.write_analysis(
        w, ATTRIBUTE_NAMES, tmp_path / "out", positive_ratio_percent=np.full(A, 10.0),
        features=rng.normal(size=(6, 16)), image_paths=paths, num_selective=2, num_images=2)
    assert summary["components"][0] == 5 and summary["selectivity"][0] == 1.0
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["table_4_1.md", "table_4_1.csv", "table_4_1.png",
         *(f"component_{n}.png" for n in summary["components"])])
    assert np.isnan(summary["correlation"].pearson_r)  # Constant ratios: undefined.
    with pytest.raises(ValueError, match=r"component 16 is not in 0..15"):
        analysis.write_analysis(w, ATTRIBUTE_NAMES, tmp_path / "o2",
                                features=np.zeros((6, 16)), image_paths=paths, components=[16])
    with pytest.raises(ValueError, match="N = 8 components but the attribute weights W have N"):
        analysis.write_analysis(w, ATTRIBUTE_NAMES, tmp_path / "o3",
                                features=np.zeros((6, 8)), image_paths=paths)


def test_load_features_npz_resolves_paths_and_checks_keys(tmp_path):
    paths = _write_images(tmp_path / "root" / "bounding_box_test", [1, 2])
    rel = [os.path.relpath(p, tmp_path / "root") for p in paths]
    npz = tmp_path / "f.npz"
    np.savez(npz, paths=np.array(rel), features=np.ones((2, 3), np.float32))
    loaded = analysis.load_features_npz(npz, str(tmp_path / "root"))
    assert loaded.paths == tuple(paths) and loaded.attributes is None
    assert loaded.features.shape == (2, 3)
    np.savez(npz, paths=np.array(rel), features=np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"f.npz: features have G = 3 rows but 2 image paths"):
        analysis.load_features_npz(npz)
    np.savez(npz, features=np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"missing keys \['paths'\]"):
        analysis.load_features_npz(npz)


def test_load_features_npz_reads_labels_only_from_attribute_labels(tmp_path):
    paths = _write_images(tmp_path / "g", [1, 1, 2])
    rng = np.random.default_rng(0)
    probs = rng.random((3, A)).astype(np.float32)
    labels = (rng.random((3, A)) < 0.5).astype(np.uint8)
    npz = tmp_path / "f.npz"
    np.savez(npz, paths=np.array(paths), features=np.ones((3, 4), np.float32), attributes=probs,
             attribute_names=np.array(ATTRIBUTE_NAMES))
    loaded = analysis.load_features_npz(npz)
    assert loaded.attribute_labels is None  # probabilities are never labels
    np.testing.assert_array_equal(loaded.attributes, probs)
    np.savez(npz, paths=np.array(paths), features=np.ones((3, 4)), attributes=probs,
             attribute_labels=labels.astype(bool))
    loaded = analysis.load_features_npz(npz)
    assert loaded.attribute_labels.dtype == np.uint8
    np.testing.assert_array_equal(loaded.attribute_labels, labels)
    np.savez(npz, paths=np.array(paths), features=np.ones((3, 4)), attribute_labels=probs)
    with pytest.raises(ValueError, match=r"f.npz: 'attribute_labels' must be ground-truth "
                                         r"labels in \{0, 1\}.*belong under 'attributes'"):
        analysis.load_features_npz(npz)
    np.savez(npz, paths=np.array(paths), features=np.ones((3, 4)), attribute_labels=labels[:2])
    with pytest.raises(ValueError, match=r"'attribute_labels' must be \[G, A\] with G = 3, "
                                         r"got shape \(2, 30\)"):
        analysis.load_features_npz(npz)
    np.savez(npz, paths=np.array(paths), features=np.ones((3, 4)), attributes=probs[:, 0])
    with pytest.raises(ValueError, match=r"'attributes' must be \[G, A\]"):
        analysis.load_features_npz(npz)
    np.save(tmp_path / "w.npy", np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"w.npy: a single array, not an .npz"):
        analysis.load_features_npz(tmp_path / "w.npy")
    (tmp_path / "junk.npz").write_text("not numpy")
    with pytest.raises(ValueError, match=r"junk.npz: not a readable .npz"):
        analysis.load_features_npz(tmp_path / "junk.npz")


# ---------------------------------------------------------------------- tools/analyze.py


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "analyze.py"), *args],
                          capture_output=True, text=True, timeout=240, cwd=REPO)


def _tiny_dataset(root) -> tuple[list[str], np.ndarray]:
    """A gallery of 8 images of 4 identities and an attribute file (train ratios known)."""
    paths = _write_images(root / "bounding_box_test", [1, 1, 2, 2, 3, 3, 4, 4])
    train = np.zeros((4, A), np.uint8)
    train[:, ATTRIBUTE_NAMES.index("age2")] = 1
    train[:1, ATTRIBUTE_NAMES.index("hat")] = 1  # 25 %.
    test = np.zeros((4, A), np.uint8)
    test[:, ATTRIBUTE_NAMES.index("age3")] = 1
    write_market_attributes(root / "market_attribute.mat", [11, 12, 13, 14], train,
                            [1, 2, 3, 4], test)
    return paths, test


def test_cli_on_npz_and_npy(tmp_path):
    paths, test = _tiny_dataset(tmp_path / "data")
    rng = np.random.default_rng(3)
    w = rng.normal(size=(12, A)).astype(np.float32)
    np.save(tmp_path / "W.npy", w)
    labels = test[np.repeat(np.arange(4), 2)]
    np.savez(tmp_path / "f.npz", paths=np.array(paths), features=rng.normal(size=(8, 12)),
             attribute_labels=labels)
    out = tmp_path / "out"
    res = _run_tool(f"--weights={tmp_path / 'W.npy'}", f"--features={tmp_path / 'f.npz'}",
                    f"--attribute_file={tmp_path / 'data' / 'market_attribute.mat'}",
                    f"--output_dir={out}", "--components=2,7", "--num_images=3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["component_2.png", "component_7.png", "table_4_1.csv",
                                       "table_4_1.md", "table_4_1.png"]
    md = (out / "table_4_1.md").read_text()
    assert md in res.stdout and "| hat |" in md and " 25.00 |" in md and "4 identities" in md
    counts = {r[0]: int(r[1]) for r in list(csv.reader(open(out / "table_4_1.csv")))[1:]}
    assert counts == dict(zip(ATTRIBUTE_NAMES, _ref_top1_counts(w, "signed").tolist(), strict=True))

    # No attribute file: ratios per identity of the npz labels, said so in the caption.
    res = _run_tool(f"--weights={tmp_path / 'W.npy'}", f"--features={tmp_path / 'f.npz'}",
                    f"--output_dir={tmp_path / 'out2'}", "--num_selective=1", "--top1=abs")
    assert res.returncode == 0, res.stderr[-3000:]
    md2 = (tmp_path / "out2" / "table_4_1.md").read_text()
    assert "NOT the training split" in md2 and "magnitude" in md2
    assert len([f for f in os.listdir(tmp_path / "out2") if f.startswith("component_")]) == 1

    # W whose A does not match the 30 attribute names.
    np.save(tmp_path / "bad.npy", np.zeros((12, 7)))
    res = _run_tool(f"--weights={tmp_path / 'bad.npy'}", f"--output_dir={tmp_path / 'o3'}")
    assert res.returncode != 0 and "A = 7 attributes but 30 names" in res.stderr


def test_cli_from_checkpoint(tmp_path):
    from flax import nnx

    from reid_jax.checkpoints import save_checkpoint
    from reid_jax.models.agw import AGW
    from reid_jax.models.attribute_head import AttributeHead

    _tiny_dataset(tmp_path / "data")
    for split in ("bounding_box_train", "query"):
        _write_images(tmp_path / "data" / split, [11, 12])
    config = {"model": {"width": 8, "blocks": (1, 1, 1, 1), "non_local": (0, 0, 0, 0)}}
    model = AGW(4, **config["model"], rngs=nnx.Rngs(0))
    head = AttributeHead(model.feature_dim, rngs=nnx.Rngs(1))
    save_checkpoint(tmp_path / "ckpt", 0, model_state=model, attribute_head_state=head,
                    meta={"num_classes": 4, "config": config})
    res = _run_tool(f"--checkpoint={tmp_path / 'ckpt'}", f"--data_root={tmp_path / 'data'}",
                    f"--output_dir={tmp_path / 'out'}", "--num_selective=1", "--batch_size=4")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "training split, per identity: 4 identities" in res.stdout
    w = np.asarray(head.kernel[...])
    counts = {r[0]: int(r[1]) for r in
              list(csv.reader(open(tmp_path / "out" / "table_4_1.csv")))[1:]}
    assert counts == dict(zip(ATTRIBUTE_NAMES, _ref_top1_counts(w, "signed").tolist(), strict=True))
    n = int(analysis.most_selective_components(w, 1)[0])
    assert os.path.isfile(tmp_path / "out" / f"component_{n}.png")
    res = _run_tool(f"--checkpoint={tmp_path / 'ckpt'}", f"--weights={tmp_path / 'x.npy'}",
                    f"--output_dir={tmp_path / 'o'}")
    assert res.returncode != 0 and "exactly one of --weights" in res.stderr


def test_cli_on_an_npz_written_by_extract_features(tmp_path):
    """tools/extract_features.py writes predicted probabilities under 'attributes': analyze
    must not read them as labels (it used to fail with 'labels must be binary (0/1)')."""
    from flax import nnx

    from reid_jax.checkpoints import save_checkpoint
    from reid_jax.models.agw import AGW
    from reid_jax.models.attribute_head import AttributeHead

    paths = _write_images(tmp_path / "images", [1, 1, 2, 2, 3])
    config = {"model": {"width": 8, "blocks": (1, 1, 1, 1), "non_local": (0, 0, 0, 0)},
              "data": {"height": 32, "width": 16}}
    model = AGW(4, **config["model"], rngs=nnx.Rngs(0))
    head = AttributeHead(model.feature_dim, rngs=nnx.Rngs(1))
    save_checkpoint(tmp_path / "ckpt", 0, model_state=model, attribute_head_state=head,
                    meta={"num_classes": 4, "config": config})
    npz = tmp_path / "features.npz"
    res = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "extract_features.py"),
         f"--checkpoint={tmp_path / 'ckpt'}", f"--image_dir={tmp_path / 'images'}",
         f"--output={npz}", "--batch_size=8"],
        capture_output=True, text=True, timeout=240, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(npz) as z:
        assert sorted(z.files) == ["attribute_names", "attributes", "features", "paths"]
        probs = z["attributes"]
    assert probs.shape == (5, A) and not np.isin(probs, (0, 1)).all()
    np.save(tmp_path / "W.npy", np.asarray(head.kernel[...]))

    res = _run_tool(f"--weights={tmp_path / 'W.npy'}", f"--features={npz}",
                    f"--output_dir={tmp_path / 'out'}", "--num_selective=1", "--num_images=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "'attributes' holds predicted probabilities, not labels" in res.stderr
    assert "no --attributes_file and no 'attribute_labels' in --features" in res.stderr
    md = (tmp_path / "out" / "table_4_1.md").read_text()
    assert md in res.stdout and "| Attribute | #Top1 | Positive ratio (%) |" in md
    assert "| hat | " in md and " | n/a |" in md  # no labels: no positive ratios
    assert sorted(f for f in os.listdir(tmp_path / "out") if f.startswith("table_4_1")) == [
        "table_4_1.csv", "table_4_1.md", "table_4_1.png"]
    assert sum(f.startswith("component_") for f in os.listdir(tmp_path / "out")) == 1
    assert set(paths) <= set(np.load(npz)["paths"].tolist())


def test_cli_prints_clean_errors(tmp_path):
    np.save(tmp_path / "W.npy", np.zeros((4, A)))
    res = _run_tool(f"--weights={tmp_path / 'W.npy'}", f"--features={tmp_path / 'none.npz'}",
                    f"--output_dir={tmp_path / 'o'}")
    assert res.returncode == 1
    assert "tools/analyze.py: error: features file not found" in res.stderr
    assert "Traceback" not in res.stderr
    paths = _write_images(tmp_path / "g", [1, 2])
    np.savez(tmp_path / "p.npz", paths=np.array(paths), features=np.ones((2, 4)),
             attribute_labels=np.full((2, A), 0.7))
    res = _run_tool(f"--weights={tmp_path / 'W.npy'}", f"--features={tmp_path / 'p.npz'}",
                    f"--output_dir={tmp_path / 'o'}")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "'attribute_labels' must be ground-truth labels in {0, 1}" in res.stderr
    res = _run_tool(f"--weights={tmp_path / 'missing.npy'}", f"--output_dir={tmp_path / 'o'}")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "tools/analyze.py: error:" in res.stderr and "missing.npy" in res.stderr
