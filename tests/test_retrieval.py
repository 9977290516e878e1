"""Tests of reid_jax.retrieval: the squared distance and the Market-1501 protocol."""

import numpy as np
import pytest

from reid_jax import retrieval


def _removed_reference(qp, qc, gp, gc):
    return np.array([sum(1 for p, c in zip(gp, gc, strict=True)
                         if (p == a and c == b) or p == -1) for a, b in zip(qp, qc, strict=True)])


def test_removed_counts_match_a_loop():
    rng = np.random.default_rng(0)
    qp, qc = rng.integers(1, 6, 40), rng.integers(1, 4, 40)
    gp, gc = rng.integers(-1, 6, 200), rng.integers(1, 4, 200)
    got = retrieval.removed_counts(qp, qc, gp, gc)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, _removed_reference(qp, qc, gp, gc))
    # Camera ids of any size: (1, 1500) and (2, 500) are different keys.
    np.testing.assert_array_equal(
        retrieval.removed_counts([1, 2], [1500, 500], [2, 2], [500, 1500]), [0, 1])
    empty = np.zeros(0, np.int64)
    assert retrieval.removed_counts([1], [1], empty, empty).tolist() == [0]
    with pytest.raises(ValueError, match=r"gallery_cams must be integer \[3\]"):
        retrieval.removed_counts([1], [1], [1, 2, 3], [1, 2])


def test_first_kept_keeps_the_first_k_allowed_ranks():
    indices = np.array([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
    qp, qc = np.array([7, 8]), np.array([1, 1])
    gp = np.array([7, 7, -1, 0, 8])
    gc = np.array([1, 2, 3, 1, 1])
    keep = retrieval.kept_in_ranking(indices, qp, qc, gp, gc)
    # Query 0 (pid 7, cam 1): drops gallery 0 (same pid+cam) and 2 (junk); query 1: 4 and 2.
    np.testing.assert_array_equal(keep, [[0, 1, 0, 1, 1], [0, 1, 0, 1, 1]])
    cols, ok = retrieval.first_kept(indices, qp, qc, gp, gc, 3)
    np.testing.assert_array_equal(np.take_along_axis(indices, cols, 1), [[1, 3, 4], [3, 1, 0]])
    assert ok.all()
    cols, ok = retrieval.first_kept(indices, qp, qc, gp, gc, 5)  # only 3 kept per list
    np.testing.assert_array_equal(ok, [[1, 1, 1, 0, 0]] * 2)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, K=5\]"):
        retrieval.first_kept(indices, qp, qc, gp, gc, 6)
    with pytest.raises(ValueError, match=r"indices must have shape \[Q=2, K\]"):
        retrieval.kept_in_ranking(indices[:1], qp, qc, gp, gc)


def test_excluded_is_the_protocol_rule():
    # Same pid and camera: removed; same pid, other camera: kept (a match); junk: always removed;
    # a distractor (pid 0) is kept.
    qp, qc = 7, 1
    gp = np.array([7, 7, -1, -1, 0, 8])
    gc = np.array([1, 2, 1, 2, 1, 1])
    np.testing.assert_array_equal(retrieval.excluded(qp, qc, gp, gc),
                                  [True, False, True, True, False, False])
    mask = retrieval.excluded_mask([7, 8], [1, 1], gp, gc)
    assert mask.shape == (2, 6)
    np.testing.assert_array_equal(mask[1], [False, False, True, True, False, True])


def test_squared_distances_match_float64_under_jit_and_vmap():
    import jax

    rng = np.random.default_rng(3)
    fq = rng.standard_normal((5, 32)).astype(np.float32)
    fg = rng.standard_normal((11, 32)).astype(np.float32)
    fg[2] = fq[1]
    want = ((fq[:, None].astype(np.float64) - fg[None]) ** 2).sum(-1)
    got = np.asarray(jax.jit(retrieval.squared_distances)(fq, fg))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert got[1, 2] >= 0.0
    batched = jax.vmap(retrieval.squared_distances, in_axes=(0, None))(fq[:, None], fg)
    # One query row at a time is another matrix product shape: equal up to float32 rounding
    # of the norms (|q|^2 + |g|^2 is about 64 here; its ulp is 7.6e-6).
    np.testing.assert_allclose(np.asarray(batched)[:, 0], got, rtol=1e-6, atol=5e-5)
