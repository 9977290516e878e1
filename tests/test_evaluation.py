"""Tests of reid_jax.evaluation against float64 references written here."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from reid_jax import evaluation, retrieval
from reid_jax.evaluation import attribute_metrics, rank_metrics, rank_metrics_loop

RANKERS = [rank_metrics, rank_metrics_loop]


# ---------------------------------------------------------------- ranking: float64 reference
def reference_rank_metrics(dist, qp, gp, qc, gc, max_rank=50):
    """Plain-Python Market-1501 protocol: sort by (distance, gallery index), filter, count."""
    dist = np.asarray(dist, np.float64)
    cmc, aps, inps = np.zeros(max_rank), [], []
    for q in range(dist.shape[0]):
        order = sorted(range(dist.shape[1]), key=lambda j, q=q: (dist[q, j], j))
        ranked = [j for j in order if gp[j] != -1 and not (gp[j] == qp[q] and gc[j] == qc[q])]
        hit_ranks = [r + 1 for r, j in enumerate(ranked) if gp[j] == qp[q]]
        if not hit_ranks:
            continue
        aps.append(sum((i + 1) / r for i, r in enumerate(hit_ranks)) / len(hit_ranks))
        inps.append(len(hit_ranks) / hit_ranks[-1])
        cmc += np.arange(1, max_rank + 1) >= hit_ranks[0]
    return {
        "cmc": cmc / len(aps),
        "mAP": float(np.mean(aps)),
        "mINP": float(np.mean(inps)),
        "num_valid_queries": len(aps),
    }


def random_problem(seed, num_q=23, num_g=61, num_ids=6, num_cams=3, integer_dist=False):
    rng = np.random.default_rng(seed)
    qp = rng.integers(-1, num_ids, num_q)  # includes junk (-1) and distractor (0) queries
    gp = rng.integers(-1, num_ids, num_g)
    qc = rng.integers(0, num_cams, num_q)
    gc = rng.integers(0, num_cams, num_g)
    if integer_dist:  # many exact ties
        dist = rng.integers(0, 4, (num_q, num_g))
    else:
        dist = rng.random((num_q, num_g)).astype(np.float32)
    return dist, qp, gp, qc, gc


def assert_same(result, expected):
    np.testing.assert_allclose(result["cmc"], expected["cmc"], rtol=0, atol=1e-6)
    assert abs(result["mAP"] - expected["mAP"]) < 1e-6
    assert abs(result["mINP"] - expected["mINP"]) < 1e-6
    assert result["num_valid_queries"] == expected["num_valid_queries"]
    assert result["cmc"].shape == expected["cmc"].shape


@pytest.mark.parametrize("integer_dist", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_metrics_matches_reference_on_random_data(seed, integer_dist):
    dist, qp, gp, qc, gc = random_problem(seed, integer_dist=integer_dist)
    expected = reference_rank_metrics(dist, qp, gp, qc, gc, max_rank=20)
    assert 0 < expected["num_valid_queries"] < dist.shape[0]  # some queries are skipped
    assert_same(rank_metrics_loop(dist, qp, gp, qc, gc, max_rank=20), expected)
    for chunk in (1, 4, 7, 256):
        assert_same(rank_metrics(dist, qp, gp, qc, gc, 20, query_chunk_size=chunk), expected)


def test_rank_metrics_float64_jax_and_fortran_inputs():
    dist, qp, gp, qc, gc = random_problem(5, num_q=17, num_g=40)
    expected = reference_rank_metrics(dist, qp, gp, qc, gc)
    assert_same(rank_metrics(dist.astype(np.float64), qp, gp, qc, gc), expected)
    assert_same(rank_metrics(np.asfortranarray(dist), qp, gp, qc, gc), expected)
    assert_same(rank_metrics(jnp.asarray(dist), jnp.asarray(qp), gp, qc, jnp.asarray(gc)), expected)
    assert_same(rank_metrics_loop(jnp.asarray(dist), qp, gp, qc, gc), expected)


def test_rank_metrics_larger_gallery_with_many_matches():
    # Few ids: many matches and many same-camera removals per query, and rare float32 ties.
    rng = np.random.default_rng(7)
    dist = rng.random((40, 900)).astype(np.float16).astype(np.float32)  # ties certain
    qp, gp = rng.integers(0, 3, 40), rng.integers(-1, 3, 900)
    qc, gc = rng.integers(0, 2, 40), rng.integers(0, 2, 900)
    expected = reference_rank_metrics(dist, qp, gp, qc, gc)
    assert_same(rank_metrics(dist, qp, gp, qc, gc, query_chunk_size=16), expected)
    assert_same(rank_metrics_loop(dist, qp, gp, qc, gc), expected)


def test_rank_metrics_all_ties_many_matches():
    # Every distance equal and half the gallery matching: thousands of tied entries per chunk.
    rng = np.random.default_rng(3)
    dist = np.ones((30, 400), np.float32)
    dist[:, ::7] = 0.5  # two tie groups
    qp, gp = rng.integers(1, 3, 30), rng.integers(1, 3, 400)
    qc, gc = rng.integers(0, 2, 30), rng.integers(0, 2, 400)
    expected = reference_rank_metrics(dist, qp, gp, qc, gc)
    assert_same(rank_metrics(dist, qp, gp, qc, gc), expected)
    assert_same(rank_metrics_loop(dist, qp, gp, qc, gc), expected)


# ---------------------------------------------------------------- ranking: hand-made cases
# Gallery:          0      1      2      3      4      5
GALLERY_PIDS = [1, 2, 1, 0, -1, 1]  # 0: distractor, -1: junk
GALLERY_CAMS = [0, 1, 1, 2, 1, 2]


@pytest.mark.parametrize("ranker", RANKERS)
def test_rank_metrics_hand_made(ranker):
    dist = np.array(
        [
            # query pid 1 cam 0: g0 same pid+cam (removed), g4 junk (removed); filtered order
            # g1 (neg), g2 (match, rank 2), g3 (distractor), g5 (match, rank 4).
            [0.1, 0.2, 0.3, 0.4, 0.05, 0.6],
            # query pid 2 cam 0: g1 is the only match and comes first.
            [0.5, 0.1, 0.3, 0.4, 0.2, 0.6],
            # query pid 3: no match in the gallery -> skipped.
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        ]
    )
    out = ranker(dist, [1, 2, 3], GALLERY_PIDS, [0, 0, 0], GALLERY_CAMS, max_rank=4)
    assert out["num_valid_queries"] == 2
    # AP: q0 (1/2 + 2/4) / 2 = 0.5, q1 1.  INP: q0 2/4, q1 1/1.
    assert out["mAP"] == pytest.approx(0.75, abs=1e-12)
    assert out["mINP"] == pytest.approx(0.75, abs=1e-12)
    np.testing.assert_allclose(out["cmc"], [0.5, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("ranker", RANKERS)
def test_rank_metrics_distractor_counts_and_junk_is_ignored(ranker):
    # Distractor (pid 0) before the match pushes it to rank 2; junk before it changes nothing.
    gp, gc = [0, 5, -1], [1, 1, 1]
    distractor_first = ranker([[0.1, 0.2, 0.9]], [5], gp, [0], gc, max_rank=3)
    assert distractor_first["mAP"] == pytest.approx(0.5)
    np.testing.assert_allclose(distractor_first["cmc"], [0.0, 1.0, 1.0])
    junk_first = ranker([[0.9, 0.2, 0.1]], [5], gp, [0], gc, max_rank=3)
    assert junk_first["mAP"] == pytest.approx(1.0)
    assert junk_first["mINP"] == pytest.approx(1.0)
    np.testing.assert_allclose(junk_first["cmc"], [1.0, 1.0, 1.0])


@pytest.mark.parametrize("ranker", RANKERS)
def test_rank_metrics_same_pid_other_camera_is_a_match_same_camera_is_not(ranker):
    out = ranker([[0.1, 0.2]], [4], [4, 4], [2], [2, 3], max_rank=2)
    assert out["mAP"] == 1.0 and out["mINP"] == 1.0  # g0 removed, g1 at rank 1
    out = ranker([[0.1, 0.2]], [4], [4, 4], [1], [2, 3], max_rank=2)
    assert out["mAP"] == 1.0 and out["mINP"] == 1.0  # both match, ranks 1, 2


@pytest.mark.parametrize("ranker", RANKERS)
def test_rank_metrics_ties_follow_gallery_index(ranker):
    # All distances equal: the order is the gallery index order (a stable argsort).
    out = ranker(np.zeros((1, 4), np.float32), [1], [2, 1, 2, 1], [0], [1, 1, 1, 1], max_rank=4)
    assert out["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert out["mINP"] == pytest.approx(2 / 4)
    np.testing.assert_allclose(out["cmc"], [0.0, 1.0, 1.0, 1.0])
    out = ranker(np.zeros((1, 4), np.float32), [1], [1, 2, 1, 2], [0], [1, 1, 1, 1], max_rank=4)
    assert out["mAP"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert out["mINP"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("ranker", RANKERS)
def test_rank_metrics_pads_cmc_past_the_gallery(ranker):
    # 3 gallery images, one removed (same cam): max_rank 6 is padded, never reduced.
    out = ranker([[0.3, 0.2, 0.1]], [1], [1, 1, 2], [0], [0, 1, 1], max_rank=6)
    np.testing.assert_allclose(out["cmc"], [0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert out["cmc"].shape == (6,) and out["cmc"].dtype == np.float64


@pytest.mark.parametrize("ranker", RANKERS)
def test_rank_metrics_skips_junk_query(ranker):
    out = ranker([[0.1, 0.2], [0.1, 0.2]], [-1, 1], [-1, 1], [0, 0], [1, 1], max_rank=2)
    assert out["num_valid_queries"] == 1


# ---------------------------------------------------------------- ranking: errors
@pytest.mark.parametrize("ranker", RANKERS)
def test_rank_metrics_errors(ranker):
    d = np.zeros((2, 3))
    qp, gp, qc, gc = [1, 2], [1, 2, 2], [0, 0], [1, 1, 1]
    with pytest.raises(ValueError, match=r"distances must have shape \[Q, G\], got shape \(3,\)"):
        ranker(np.zeros(3), qp, gp, qc, gc)
    with pytest.raises(ValueError, match=r"query_pids must have shape \[2\].*\(2, 3\).*\(3,\)"):
        ranker(d, [1, 2, 3], gp, qc, gc)
    with pytest.raises(ValueError, match=r"gallery_pids must have shape \[3\].*got shape \(2,\)"):
        ranker(d, qp, [1, 2], qc, gc)
    with pytest.raises(ValueError, match=r"query_cams must have shape \[2\].*got shape \(1, 2\)"):
        ranker(d, qp, gp, [[0, 0]], gc)
    with pytest.raises(ValueError, match=r"gallery_cams must have shape \[3\].*\(4,\)"):
        ranker(d, qp, gp, qc, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="gallery_pids must hold integers, got dtype float64"):
        ranker(d, qp, [1.0, 2.0, 2.0], qc, gc)
    with pytest.raises(ValueError, match="distances must be real numbers"):
        ranker(d.astype(complex), qp, gp, qc, gc)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_rank must be an integer >= 1"):
            ranker(d, qp, gp, qc, gc, max_rank=bad)
    d_nan = d.copy()
    d_nan[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"contain NaN \(first in query row 1\)"):
        ranker(d_nan, qp, gp, qc, gc)
    with pytest.raises(ValueError, match="no valid query: none of the 2 queries"):
        ranker(d, qp, gp, [1, 1], gc)  # every match is on the query's camera
    with pytest.raises(ValueError, match="no valid query"):
        ranker(d, qp, [-1, -1, -1], qc, gc)  # all junk
    with pytest.raises(ValueError, match="no valid query: none of the 0 queries"):
        ranker(np.zeros((0, 3)), [], gp, [], gc)
    with pytest.raises(ValueError, match="no valid query: none of the 2 queries.*among the 0"):
        ranker(np.zeros((2, 0)), qp, [], qc, [])


def test_rank_metrics_chunk_size_error():
    with pytest.raises(ValueError, match="query_chunk_size must be >= 1, got 0"):
        rank_metrics(np.zeros((1, 1)), [1], [1], [0], [1], query_chunk_size=0)


# ---------------------------------------------------------------- attributes
def reference_attribute_metrics(probs, labels, threshold=0.5):
    """Per-attribute and per-instance loops in float64 with the documented rules."""
    n, a = labels.shape
    pred = np.asarray(probs, np.float64) >= threshold
    acc_a, tpr_a, tnr_a = [], [], []
    for j in range(a):
        pos = [i for i in range(n) if labels[i, j] == 1]
        neg = [i for i in range(n) if labels[i, j] == 0]
        tpr = sum(pred[i, j] for i in pos) / len(pos) if pos else np.nan
        tnr = sum(not pred[i, j] for i in neg) / len(neg) if neg else np.nan
        tpr_a.append(tpr)
        tnr_a.append(tnr)
        acc_a.append(tnr if not pos else tpr if not neg else (tpr + tnr) / 2)
    accs, precs, recs = [], [], []
    for i in range(n):
        p = {j for j in range(a) if pred[i, j]}
        y = {j for j in range(a) if labels[i, j] == 1}
        accs.append(len(p & y) / len(p | y) if p | y else 1.0)
        precs.append(len(p & y) / len(p) if p else float(not y))
        recs.append(len(p & y) / len(y) if y else float(not p))
    prec, rec = np.mean(precs), np.mean(recs)
    return {
        "mA": np.mean(acc_a),
        "accuracy_per_attribute": np.array(acc_a),
        "tpr_per_attribute": np.array(tpr_a),
        "tnr_per_attribute": np.array(tnr_a),
        "accuracy": np.mean(accs),
        "precision": prec,
        "recall": rec,
        "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
    }


def test_attribute_metrics_hand_computed():
    probs = np.array([[0.9, 0.2, 0.6], [0.4, 0.7, 0.1], [0.8, 0.8, 0.3], [0.1, 0.3, 0.2]])
    labels = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
    out = attribute_metrics(probs, labels)
    # Attribute 0: TP 1, FN 1, FP 1, TN 1; attributes 1 and 2 perfect.
    np.testing.assert_allclose(out["accuracy_per_attribute"], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(out["tpr_per_attribute"], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(out["tnr_per_attribute"], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(out["precision_per_attribute"], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(out["recall_per_attribute"], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(out["f1_per_attribute"], [0.5, 1.0, 1.0])
    assert out["mA"] == pytest.approx(2.5 / 3)
    # Instances: {0,2} vs {0,2}; {1} vs {0,1}; {0,1} vs {1}; {} vs {} (counts as perfect).
    assert out["accuracy"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 4)
    assert out["precision"] == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert out["recall"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert out["f1"] == pytest.approx(0.875)
    assert out["num_instances_without_positives"] == 1
    assert out["num_attributes_without_positives"] == 0
    assert out["num_attributes_without_negatives"] == 0


def test_attribute_metrics_one_class_attributes_and_empty_sets():
    probs = np.array([[0.7, 0.9, 0.2], [0.2, 0.4, 0.1], [0.1, 0.8, 0.3]])
    labels = np.array([[0, 1, 0], [0, 1, 0], [0, 1, 1]])  # attr 0: no positives, 1: no negatives
    out = attribute_metrics(probs, labels)
    assert out["num_attributes_without_positives"] == 1
    assert out["num_attributes_without_negatives"] == 1
    assert np.isnan(out["tpr_per_attribute"][0]) and np.isnan(out["tnr_per_attribute"][1])
    # attr 0: TNR only = 2/3; attr 1: TPR only = 2/3; attr 2: TPR 0, TNR 1 -> 0.5.
    np.testing.assert_allclose(out["accuracy_per_attribute"], [2 / 3, 2 / 3, 0.5])
    assert out["mA"] == pytest.approx((2 / 3 + 2 / 3 + 0.5) / 3)
    # Per attribute P/R/F1: attr 0 P = 0/1, R undefined; attr 2 nothing predicted: P undefined.
    np.testing.assert_allclose(out["precision_per_attribute"], [0.0, 1.0, np.nan])
    np.testing.assert_allclose(out["recall_per_attribute"], [np.nan, 2 / 3, 0.0])
    np.testing.assert_allclose(out["f1_per_attribute"], [np.nan, 0.8, np.nan])
    # Instance 1: predicted {} but labels {1} -> accuracy, precision and recall 0.
    assert out["precision"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert out["recall"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert out["accuracy"] == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    expected = reference_attribute_metrics(probs, labels)
    for key in ("mA", "accuracy", "precision", "recall", "f1"):
        assert out[key] == pytest.approx(expected[key], abs=1e-12)


def test_attribute_metrics_zero_f1_and_threshold_rules():
    # Nothing right: P = R = 0 -> F1 0 (instance and per attribute).
    out = attribute_metrics(np.array([[1.0, 0.0]]), np.array([[0, 1]]))
    assert out["precision"] == 0.0 and out["recall"] == 0.0 and out["f1"] == 0.0
    assert out["mA"] == 0.0
    np.testing.assert_allclose(out["f1_per_attribute"], [np.nan, np.nan])
    # probability == threshold predicts the attribute present; per-attribute thresholds.
    out = attribute_metrics(np.array([[0.5, 0.5]]), np.array([[1, 0]]))
    assert out["precision"] == 0.5 and out["recall"] == 1.0
    out = attribute_metrics(np.array([[0.5, 0.5]]), np.array([[1, 0]]), threshold=[0.5, 0.6])
    assert out["accuracy"] == 1.0 and out["mA"] == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_attribute_metrics_random_vs_reference(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random((40, 7)) < [0.02, 0.1, 0.5, 0.9, 0.98, 0.0, 1.0]).astype(np.int32)
    probs = np.clip(labels * 0.3 + rng.random((40, 7)) * 0.7, 0.0, 1.0).astype(np.float32)
    expected = reference_attribute_metrics(probs, labels, threshold=0.55)
    for p, y in ((probs, labels), (jnp.asarray(probs), jnp.asarray(labels.astype(bool)))):
        out = attribute_metrics(p, y, threshold=0.55)
        for key in ("mA", "accuracy", "precision", "recall", "f1"):
            assert out[key] == pytest.approx(expected[key], abs=1e-12), key
        for key in ("accuracy_per_attribute", "tpr_per_attribute", "tnr_per_attribute"):
            np.testing.assert_allclose(out[key], expected[key], atol=1e-12)


def test_attribute_metrics_errors():
    p, y = np.full((2, 3), 0.5), np.zeros((2, 3), np.int32)
    with pytest.raises(
        ValueError,
        match=r"same 2-D shape, got probabilities \(2, 3\) and labels"
        r" \(3, 2\)",
    ):
        attribute_metrics(p, y.T)
    with pytest.raises(ValueError, match=r"got probabilities \(6,\) and labels \(6,\)"):
        attribute_metrics(p.ravel(), y.ravel())
    with pytest.raises(ValueError, match=r"N >= 1 and A >= 1, got shape \(0, 3\)"):
        attribute_metrics(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"must be 0 or 1; got 1 other values, e\.g\. \[2\]"):
        attribute_metrics(p, np.array([[0, 1, 2], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"probabilities must lie in \[0, 1\].*max 1.5"):
        attribute_metrics(np.array([[0.5, 1.5, 0.0], [0, 0, 0]]), y)
    with pytest.raises(ValueError, match=r"probabilities must lie in \[0, 1\].*min -0.1"):
        attribute_metrics(np.array([[0.5, -0.1, 0.0], [0, 0, 0]]), y)
    with pytest.raises(ValueError, match=r"1 NaN"):
        attribute_metrics(np.array([[0.5, np.nan, 0.0], [0, 0, 0]]), y)
    with pytest.raises(ValueError, match="probabilities must be real numbers"):
        attribute_metrics(np.array([["a", "b", "c"], ["a", "b", "c"]]), y)
    with pytest.raises(ValueError, match=r"threshold must be a scalar or shape \[3\] in \[0, 1\]"):
        attribute_metrics(p, y, threshold=1.5)
    with pytest.raises(ValueError, match=r"got shape \(2,\)"):
        attribute_metrics(p, y, threshold=[0.5, 0.5])


def test_distance_matrix_and_retrieval_metrics_match_references():
    rng = np.random.default_rng(42)
    qf = rng.standard_normal((9, 16)).astype(np.float32)
    gf = rng.standard_normal((30, 16)).astype(np.float32)
    gf[3] = qf[0]
    d64 = ((qf[:, None].astype(np.float64) - gf[None]) ** 2).sum(-1)
    d = retrieval.distance_matrix(qf, gf, chunk=4)
    np.testing.assert_allclose(d, d64, rtol=1e-5, atol=1e-5)
    assert (d >= 0).all()
    qp, gp = rng.integers(1, 4, 9), rng.integers(0, 4, 30)
    qc, gc = rng.integers(1, 3, 9), rng.integers(1, 3, 30)
    got = evaluation.retrieval_metrics(qf, gf, qp, gp, qc, gc)
    want = evaluation.rank_metrics_loop(d64, qp, gp, qc, gc, max_rank=50)
    assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-6)
    assert got["mINP"] == pytest.approx(want["mINP"], abs=1e-6)
    np.testing.assert_allclose(got["cmc"], want["cmc"], atol=1e-6)
    assert got["rank1"] == pytest.approx(want["cmc"][0]) and len(got["cmc"]) == 50
    with pytest.raises(ValueError, match=r"f_query \[Q, N\] and f_gallery \[G, N\] with the same "
                                         r"N, got \(9, 16\) and \(30, 15\)"):
        retrieval.distance_matrix(qf, gf[:, :15])


def test_per_query_rank_metrics_means_are_rank_metrics():
    rng = np.random.default_rng(7)
    d = rng.uniform(size=(12, 40))
    qp, gp = rng.integers(1, 5, 12), rng.integers(-1, 5, 40)
    qc, gc = rng.integers(1, 3, 12), rng.integers(1, 3, 40)
    per = evaluation.per_query_rank_metrics(d, qp, gp, qc, gc, query_chunk_size=5)
    want = rank_metrics_loop(d, qp, gp, qc, gc)
    valid = per["num_matches"] > 0
    assert valid.sum() == want["num_valid_queries"]
    assert np.isnan(per["ap"][~valid]).all() and (per["first_rank"][~valid] == 0).all()
    assert per["ap"][valid].mean() == pytest.approx(want["mAP"], abs=1e-12)
    assert per["inp"][valid].mean() == pytest.approx(want["mINP"], abs=1e-12)
    assert (per["first_rank"][valid] == 1).mean() == pytest.approx(want["cmc"][0], abs=1e-12)


# ---------------------------------------------------------------- ranking: tie-heavy galleries
def tiled_problem(seed, tiles, num_q=20, num_g=90, dtype=np.float32):
    """A gallery repeated ``tiles`` times: every value of a row occurs ``tiles`` times."""
    dist, qp, gp, qc, gc = random_problem(seed, num_q=num_q, num_g=num_g)
    return (np.tile(dist.astype(dtype), (1, tiles)), qp, np.tile(gp, tiles), qc,
            np.tile(gc, tiles))


@pytest.mark.parametrize("tiles", [2, 3, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_rank_metrics_tiled_gallery(tiles, dtype):
    dist, qp, gp, qc, gc = tiled_problem(tiles, tiles, dtype=dtype)
    expected = reference_rank_metrics(dist, qp, gp, qc, gc)
    for chunk in (3, 256):
        assert_same(rank_metrics(dist, qp, gp, qc, gc, query_chunk_size=chunk), expected)
    assert_same(rank_metrics_loop(dist, qp, gp, qc, gc), expected)


def test_rank_metrics_ties_of_values_beyond_32_bits():
    # float64 values that are not float32 and int64 with a range over 2^32: the stable-argsort
    # fallback of the tie resolution.
    rng = np.random.default_rng(11)
    base = rng.random((15, 50)) * (1 + 1e-12)
    qp, gp = rng.integers(1, 4, 15), rng.integers(-1, 4, 150)
    qc, gc = rng.integers(0, 2, 15), rng.integers(0, 2, 150)
    for dist in (np.tile(base, (1, 3)), np.tile((base * 2**40).astype(np.int64), (1, 3))):
        expected = reference_rank_metrics(dist, qp, gp, qc, gc)
        assert_same(rank_metrics(dist, qp, gp, qc, gc, query_chunk_size=4), expected)


def test_rank_metrics_signed_zero_negative_and_infinite_ties():
    # -0.0 == +0.0 ties (broken by index), negative values and +-inf tie groups.
    row = np.array([0.0, -0.0, np.inf, -1.5, -0.0, np.inf, -1.5, 0.0, -np.inf, -np.inf])
    dist = np.stack([row, row[::-1], -row]).astype(np.float32)
    qp, qc = [1, 2, 1], [0, 0, 1]
    gp = [1, 2, 1, 2, 1, 2, 1, 2, 1, 2]
    gc = [0, 1, 1, 0, 1, 1, 0, 1, 1, 1]
    expected = reference_rank_metrics(dist, qp, gp, qc, gc, max_rank=10)
    assert_same(rank_metrics(dist, qp, gp, qc, gc, max_rank=10), expected)
    assert_same(rank_metrics_loop(dist, qp, gp, qc, gc, max_rank=10), expected)
    for ints in (np.array([[3, -2, 3, 0, -2, 3, 0, 0, 1, 1]], np.int8),
                 np.array([[2**31 - 1, -(2**31), 2**31 - 1, 0, -(2**31), 0, 5, 5, 0, 1]])):
        expected = reference_rank_metrics(ints, [1], gp, [0], gc, max_rank=10)
        assert_same(rank_metrics(ints, [1], gp, [0], gc, max_rank=10), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
def test_stable_positions_are_the_stable_argsort(dtype):
    # The position of any entry is its index in a stable argsort of its row, ties or not.
    rng = np.random.default_rng(5)
    dist = rng.integers(-3, 4, (70, 33)).astype(dtype)  # about 5 entries per value in a row
    dist[::2] = rng.permutation(np.arange(33)).astype(dtype)  # every other row without ties
    if np.issubdtype(dtype, np.floating):
        dist[1::4] += 1e-300 if dtype == np.float64 else 0  # float64 beyond float32: fallback
    rows = np.repeat(np.arange(70), 33)
    cols = np.tile(np.arange(33), 70)
    want = np.argsort(np.argsort(dist, axis=1, kind="stable"), axis=1, kind="stable")
    for first in (True, False):
        got, tied_fraction = evaluation._stable_positions(
            dist, rows, cols, sort_values_first=first, rows_per_block=16)
        np.testing.assert_array_equal(got, want[rows, cols])
        assert tied_fraction == pytest.approx(0.5)
    got, tied_fraction = evaluation._stable_positions(dist, rows[::2], cols[::2])
    np.testing.assert_array_equal(got, want[rows[::2], cols[::2]])
