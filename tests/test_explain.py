"""Tests of the explanation kernels against plain float64 numpy references."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reid_jax import explain as ex

# --------------------------------------------------------------------------------------------
# float64 numpy references, written from the paper's equations.


def ref_confident(x, t):
    return np.abs(np.asarray(x, np.float64) - 0.5) > np.asarray(t, np.float64)


def ref_scores(xq, xg):  # eq. 3.1, xq [A], xg [G, A]
    xq, xg = np.asarray(xq, np.float64), np.asarray(xg, np.float64)
    return (1.0 - np.abs(xq[None] - xg)) / (0.5 + np.abs(xq[None] - 0.5))


def ref_errors(fq, fg, w, complete=False):  # eq. 3.2, fq [Q, N], fg [G, N], w [N, A]
    fq, fg, w = (np.asarray(a, np.float64) for a in (fq, fg, w))
    if complete:
        mag = np.abs(w)
        tot = mag.sum(1, keepdims=True)
        w = np.where(tot > 0, mag / np.where(tot > 0, tot, 1), 1.0 / w.shape[1])
    out = np.empty((fq.shape[0], fg.shape[0], w.shape[1]))
    for i, f in enumerate(fq):
        out[i] = ((f[None] - fg) ** 2) @ w
    return out


def ref_scale(fq, fg, w):  # sum_n (f^q - f^g)^2 |w_na|: the scale errors are measured against
    return ref_errors(fq, fg, np.abs(w))


def ref_projection(fq, fg, w):
    """Least squares d = W c + r per pair (minimum-norm c); contributions c_a (W^T d)_a [Q, G, A]
    and the remainder |r|^2 [Q, G]."""
    fq, fg, w = (np.asarray(a, np.float64) for a in (fq, fg, w))
    d = fq[:, None] - fg[None]  # [Q, G, N]
    c = np.linalg.lstsq(w, d.reshape(-1, w.shape[0]).T, rcond=None)[0].T.reshape(
        d.shape[:2] + (w.shape[1],))
    r = d - c @ w.T
    return c * (d @ w), (r ** 2).sum(-1)


def ref_disagreement(xq, xg):  # P(labels differ), xq [A], xg [G, A]
    xq, xg = np.asarray(xq, np.float64), np.asarray(xg, np.float64)
    return xq[None] * (1 - xg) + xg * (1 - xq[None])


def ref_explain(fq, fg, w, k, t, complete=False, mode=None):
    mode = mode or ("complete" if complete else "paper")
    fq, fg, w = (np.asarray(a, np.float64) for a in (fq, fg, w))
    d = ((fq[:, None] - fg[None]) ** 2).sum(-1)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    xq, xg = sig(fq @ w), sig(fg @ w)
    remainder = None
    if mode == "projection":
        errors, remainder = ref_projection(fq, fg, w)
    elif mode == "disagreement":
        errors = np.stack([ref_disagreement(xq[i], xg) for i in range(len(fq))])
    else:
        errors = ref_errors(fq, fg, w, mode == "complete")
    if remainder is None:
        remainder = (d - errors.sum(-1)) if mode != "disagreement" else np.full(d.shape, np.nan)
    rows = np.arange(len(fq))[:, None]
    return dict(
        remainder=remainder[rows, idx],
        indices=idx,
        distances=d[rows, idx],
        attributes_query=xq,
        attributes_gallery=xg[idx],
        selected=ref_confident(xq, t),
        scores=np.stack([ref_scores(xq[i], xg[idx[i]]) for i in range(len(fq))]),
        errors=errors[rows, idx],
    )


def make_data(seed=0, q=12, g=150, n=48, a=7, near=True, unit=True):
    """Random embeddings with identical and near-duplicate query/gallery pairs."""
    rng = np.random.default_rng(seed)
    fq = rng.standard_normal((q, n))
    fg = rng.standard_normal((g, n))
    if unit:
        fq /= np.linalg.norm(fq, axis=1, keepdims=True)
        fg /= np.linalg.norm(fg, axis=1, keepdims=True)
    if near:
        fg[0:3] = fq[0:3]  # identical pairs
        for j, scale in enumerate((1e-2, 1e-4, 1e-6)):  # near-duplicates
            fg[3 + j] = fq[3 + j] + scale * rng.standard_normal(n) / np.sqrt(n)
    w = rng.standard_normal((n, a)) * 0.3
    w[:, 0] = 0.0  # an attribute with no weights
    w[: n // 2, 1] = 0.0  # an attribute that only sees half of the components
    return fq.astype(np.float32), fg.astype(np.float32), w.astype(np.float32)


def assert_within_scale(got, want, scale, rtol=1e-3):
    got = np.asarray(got, np.float64)
    bad = np.abs(got - want) > rtol * scale + 1e-30
    assert not bad.any(), (
        f"{bad.sum()} entries off; worst relative error "
        f"{np.max(np.abs(got - want) / np.maximum(scale, 1e-30))}"
    )


# --------------------------------------------------------------------------------------------
# confident_attributes


class TestConfidentAttributes:
    def test_paper_example(self):
        # t = 0.4 selects scores below 0.1 or above 0.9 (the paper's worked example).
        x = np.array([0.05, 0.1, 0.11, 0.5, 0.89, 0.9, 0.95, 0.0, 1.0], np.float32)
        got = np.asarray(ex.confident_attributes(x, 0.4))
        np.testing.assert_array_equal(got, [1, 0, 0, 0, 0, 0, 1, 1, 1])
        np.testing.assert_array_equal(ex.confident_attributes(x), got)  # default is 0.4

    def test_matches_reference_scalar_and_per_attribute(self):
        rng = np.random.default_rng(1)
        x = rng.uniform(size=(5, 9)).astype(np.float32)
        t = rng.uniform(0, 0.5, size=9).astype(np.float32)
        np.testing.assert_array_equal(ex.confident_attributes(x, 0.3), ref_confident(x, 0.3))
        np.testing.assert_array_equal(ex.confident_attributes(x, t), ref_confident(x, t))
        np.testing.assert_array_equal(ex.confident_attributes(x, 0.0), x != 0.5)

    def test_jit_and_vmap(self):
        rng = np.random.default_rng(2)
        x = rng.uniform(size=(4, 6, 9)).astype(np.float32)
        f = jax.jit(lambda x: ex.confident_attributes(x, 0.25))
        np.testing.assert_array_equal(f(x), ref_confident(x, 0.25))
        v = jax.vmap(lambda x: ex.confident_attributes(x, 0.25))(x)
        np.testing.assert_array_equal(v, ref_confident(x, 0.25))

    @pytest.mark.parametrize("t", [0.5, -0.01, 0.7, float("nan")])
    def test_threshold_outside_range(self, t):
        with pytest.raises(ValueError, match=r"threshold must lie in \[0, 0.5\)"):
            ex.confident_attributes(np.full(3, 0.2, np.float32), t)

    def test_threshold_shape(self):
        with pytest.raises(ValueError, match=r"threshold must be a scalar or have shape \(3,\)"):
            ex.confident_attributes(np.full(3, 0.2, np.float32), np.full(4, 0.1))

    def test_scalar_input_rejected(self):
        with pytest.raises(ValueError, match=r"x_query must be \[\.\.\., A\], got shape \(\)"):
            ex.confident_attributes(np.float32(0.3))


# --------------------------------------------------------------------------------------------
# matching_scores (eq. 3.1)


class TestMatchingScores:
    def setup_method(self):
        rng = np.random.default_rng(3)
        self.xq = rng.uniform(size=(4, 30)).astype(np.float32)
        self.xg = rng.uniform(size=(11, 30)).astype(np.float32)

    def test_single_and_batched_queries(self):
        got = ex.matching_scores(self.xq[0], self.xg)
        assert got.shape == (11, 30)
        np.testing.assert_allclose(got, ref_scores(self.xq[0], self.xg), rtol=1e-5, atol=1e-6)
        got = ex.matching_scores(self.xq, self.xg)
        assert got.shape == (4, 11, 30)
        want = np.stack([ref_scores(x, self.xg) for x in self.xq])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    def test_jit_and_vmap(self):
        want = np.stack([ref_scores(x, self.xg) for x in self.xq])
        jitted = jax.jit(ex.matching_scores)(self.xq, self.xg)
        np.testing.assert_allclose(jitted, want, rtol=1e-5, atol=1e-6)
        v = jax.vmap(ex.matching_scores, in_axes=(0, None))(self.xq, self.xg)
        np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-6)

    def test_values(self):
        # A saturated query matched by an identical gallery value scores exactly 1; an
        # unsaturated one scores above 1 (the raw value that displays clip at 100 %).
        s = np.asarray(ex.matching_scores(np.array([1.0, 0.0, 0.7]), np.array([[1.0, 0.0, 0.7]])))
        np.testing.assert_allclose(s[0], [1.0, 1.0, 1.0 / 0.7], rtol=1e-5, atol=1e-6)
        s = np.asarray(ex.matching_scores(np.array([1.0]), np.array([[0.0]])))
        np.testing.assert_allclose(s, [[0.0]], atol=1e-7)

    def test_errors(self):
        with pytest.raises(ValueError, match=r"attribute counts differ: x_query \(4, 30\), "
                                             r"x_gallery \(11, 29\)"):
            ex.matching_scores(self.xq, self.xg[:, :29])
        with pytest.raises(ValueError, match=r"x_gallery must be \[G, A\], got shape \(30,\)"):
            ex.matching_scores(self.xq, self.xg[0])
        with pytest.raises(ValueError,
                           match=r"the gallery is empty: x_gallery has shape \(0, 30\)"):
            ex.matching_scores(self.xq, self.xg[:0])


# --------------------------------------------------------------------------------------------
# attribute_errors (eq. 3.2)


class TestAttributeErrors:
    @pytest.mark.parametrize("method", ["auto", "direct"])
    @pytest.mark.parametrize("complete", [False, True])
    def test_accuracy_including_near_duplicates(self, method, complete):
        fq, fg, w = make_data(0)
        got = ex.attribute_errors(fq, fg, w, complete, method=method,
                                  query_chunk=5, gallery_chunk=64)
        want = ref_errors(fq, fg, w, complete)
        assert got.shape == want.shape == (12, 150, 7)
        scale = ref_scale(fq, fg, ex.complete_weights(w) if complete else w)
        assert_within_scale(got, want, scale)
        # Identical pairs are exactly zero.
        for i in range(3):
            np.testing.assert_array_equal(np.asarray(got)[i, i], 0.0)

    @pytest.mark.parametrize("complete", [False, True])
    def test_accuracy_at_market_embedding_size(self, complete):
        # N = 2048 (the AGW embedding), pairs on both sides of the recompute ratio.
        rng = np.random.default_rng(16)
        n = 2048
        fq, fg, w = make_data(16, q=6, g=40, n=n, a=30)
        ratio = ex.recompute_ratio(n)
        for j, target in enumerate((0.5 * ratio, 0.9 * ratio, 1.1 * ratio, 2 * ratio)):
            # |fq - fg|^2 / (|fq|^2 + |fg|^2) close to ``target`` (unit vectors).
            d = rng.standard_normal(n)
            d -= (d @ fq[j]) * fq[j]
            d /= np.linalg.norm(d)
            c = 1 - target  # cosine for unit vectors
            fg[10 + j] = c * fq[j] + np.sqrt(1 - c * c) * d
        got = ex.attribute_errors(fq, fg, w, complete)
        ww = ex.complete_weights(w) if complete else w
        assert_within_scale(got, ref_errors(fq, fg, w, complete), ref_scale(fq, fg, ww))

    def test_gemm_form_is_what_auto_repairs(self):
        # The expanded GEMM form cancels for identical pairs of large-norm vectors; auto does not.
        fq, fg, w = make_data(4, unit=False)
        fq, fg = fq * 30, fg * 30
        gemm = np.asarray(ex.attribute_errors(fq, fg, w, method="gemm"))
        auto = np.asarray(ex.attribute_errors(fq, fg, w, method="auto"))
        diag = np.array([gemm[i, i] for i in range(3)])
        assert np.abs(diag).max() > 0, "expected cancellation noise from the GEMM form"
        np.testing.assert_array_equal([auto[i, i] for i in range(3)], 0.0)

    def test_fallback_when_many_pairs_are_near(self):
        # Every pair of a block is a near-duplicate: more than the fix-up capacity, so the
        # whole block is computed directly.
        rng = np.random.default_rng(5)
        base = rng.standard_normal((1, 32)).astype(np.float32)
        fq = base + 1e-5 * rng.standard_normal((40, 32)).astype(np.float32)
        fg = base + 1e-5 * rng.standard_normal((90, 32)).astype(np.float32)
        w = rng.standard_normal((32, 5)).astype(np.float32)
        got = ex.attribute_errors(fq, fg, w)
        assert_within_scale(got, ref_errors(fq, fg, w), ref_scale(fq, fg, w))

    def test_complete_sums_to_squared_distance(self):
        fq, fg, w = make_data(6, near=False)
        e = np.asarray(ex.attribute_errors(fq, fg, w, complete=True), np.float64)
        d = ((fq[:, None].astype(np.float64) - fg[None]) ** 2).sum(-1)
        np.testing.assert_allclose(e.sum(-1), d, rtol=1e-5)
        assert (e >= 0).all()

    def test_single_query_jit_and_vmap(self):
        fq, fg, w = make_data(7)
        want = ref_errors(fq, fg, w)
        scale = ref_scale(fq, fg, w)
        single = ex.attribute_errors(fq[3], fg, w)
        assert single.shape == (150, 7)
        assert_within_scale(single, want[3], scale[3])
        jitted = jax.jit(lambda q, g, w: ex.attribute_errors(q, g, w))(fq, fg, w)
        assert_within_scale(jitted, want, scale)
        vmapped = jax.vmap(lambda q: ex.attribute_errors(q, fg, w))(fq)
        assert_within_scale(vmapped, want, scale)

    def test_errors(self):
        fq, fg, w = make_data(8, near=False)
        with pytest.raises(ValueError, match=r"embedding sizes differ: f_query \(12, 48\), "
                                             r"f_gallery \(150, 47\)"):
            ex.attribute_errors(fq, fg[:, :47], w)
        with pytest.raises(ValueError, match=r"weights \(47, 7\)"):
            ex.attribute_errors(fq, fg, w[:47])
        with pytest.raises(ValueError, match=r"f_gallery must be \[G, N\], got shape \(48,\)"):
            ex.attribute_errors(fq, fg[0], w)
        with pytest.raises(ValueError, match=r"f_query must be \[N\] or \[Q, N\], "
                                             r"got shape \(1, 12, 48\)"):
            ex.attribute_errors(fq[None], fg, w)
        with pytest.raises(ValueError,
                           match=r"the gallery is empty: f_gallery has shape \(0, 48\)"):
            ex.attribute_errors(fq, fg[:0], w)
        with pytest.raises(ValueError, match=r"method must be one of"):
            ex.attribute_errors(fq, fg, w, method="fast")

    def test_validate_reports_nan_and_inf(self):
        fq, fg, w = make_data(9, near=False)
        fg = fg.copy()
        fg[4, 2] = np.nan
        w = w.copy()
        w[1, 1] = np.inf
        with pytest.raises(ValueError, match=r"f_gallery \(shape \(150, 48\)\) has 1 non-finite "
                                             r"values, first at index \(4, 2\).*weights"):
            ex.attribute_errors(fq, fg, w, validate=True)


# --------------------------------------------------------------------------------------------
# explain_rankings


def assert_explanation(got, want, scale_errors):
    np.testing.assert_array_equal(got.indices, want["indices"])
    np.testing.assert_allclose(got.distances, want["distances"], rtol=1e-5, atol=1e-6)
    for name in ("attributes_query", "attributes_gallery", "scores"):
        np.testing.assert_allclose(getattr(got, name), want[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.selected, want["selected"])
    assert_within_scale(got.errors, want["errors"], scale_errors)
    if want.get("remainder") is not None and got.remainder is not None:
        rem = want["remainder"]
        if np.isnan(rem).all():
            assert np.isnan(np.asarray(got.remainder)).all()
        else:
            assert_within_scale(got.remainder, rem,
                                np.asarray(scale_errors).sum(-1) + want["distances"])


class TestProjectionAndDisagreement:
    def test_projection_matches_reference_and_sums_to_the_distance(self):
        fq, fg, w = make_data(30, g=40)
        p, r = ex.projection_contributions(fq, fg, w)
        want_p, want_r = ref_projection(fq, fg, w)
        d2 = ((fq[:, None].astype(np.float64) - fg[None]) ** 2).sum(-1)
        assert p.shape == (12, 40, 7) and r.shape == (12, 40)
        assert_within_scale(p, want_p, d2[..., None], rtol=1e-4)
        assert_within_scale(r, want_r, d2, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(p, np.float64).sum(-1) + np.asarray(r), d2,
                                   rtol=1e-5, atol=1e-6)
        assert float(np.min(r)) >= -1e-6  # |r|^2: nothing negative beyond rounding
        np.testing.assert_array_equal(np.asarray(p)[:, :, 0], 0.0)  # W's zero column
        for i in range(3):  # identical pairs: exactly zero
            np.testing.assert_array_equal(np.asarray(p)[i, i], 0.0)
            assert float(r[i, i]) == 0.0
        # One query, jit and vmap.
        p1, r1 = jax.jit(ex.projection_contributions)(fq[4], fg, w)
        np.testing.assert_allclose(p1, np.asarray(p)[4], rtol=1e-5, atol=1e-7)
        pv, rv = jax.vmap(lambda q: ex.projection_contributions(q, fg, w))(fq)
        np.testing.assert_allclose(pv, p, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(rv, r, rtol=1e-5, atol=1e-7)

    @pytest.mark.parametrize("method", ["auto", "direct", "gemm"])
    def test_all_pairs_projection_including_near_duplicates(self, method):
        fq, fg, w = make_data(31)
        got = ex.attribute_errors(fq, fg, w, mode="projection", method=method,
                                  query_chunk=5, gallery_chunk=64)
        want, _ = ref_projection(fq, fg, w)
        d2 = ((fq[:, None].astype(np.float64) - fg[None]) ** 2).sum(-1)
        far = d2 > ex.recompute_ratio(fq.shape[1]) * 2  # unit vectors: |fq|^2 + |fg|^2 = 2
        if method == "gemm":  # cancels for near pairs; fine elsewhere
            assert_within_scale(np.asarray(got)[far], want[far], d2[far][:, None])
        else:
            assert_within_scale(got, want, d2[..., None] + 1e-12)
            for i in range(3):
                np.testing.assert_array_equal(np.asarray(got)[i, i], 0.0)

    def test_disagreement_matches_reference(self):
        rng = np.random.default_rng(32)
        xq = rng.random((4, 6)).astype(np.float32)
        xg = rng.random((9, 6)).astype(np.float32)
        xg[0] = [0, 1, 0.5, 0, 1, 0.25]
        got = ex.disagreement_probabilities(xq, xg)
        want = np.stack([ref_disagreement(q, xg) for q in xq])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        assert float(np.min(got)) >= 0.0 and float(np.max(got)) <= 1.0
        np.testing.assert_allclose(ex.disagreement_probabilities(xq[1], xg), want[1], atol=1e-7)
        v = jax.jit(jax.vmap(lambda q: ex.disagreement_probabilities(q, xg)))(xq)
        np.testing.assert_allclose(v, want, rtol=1e-6, atol=1e-7)
        # Certain and opposite: 1; certain and equal: 0.
        np.testing.assert_allclose(ex.disagreement_probabilities(
            np.array([1.0, 0.0, 1.0]), np.array([[0.0, 1.0, 1.0]])), [[1.0, 1.0, 0.0]])
        with pytest.raises(ValueError, match="attribute counts differ"):
            ex.disagreement_probabilities(xq, xg[:, :5])
        with pytest.raises(ValueError, match=r"x_gallery must be \[G, A\]"):
            ex.disagreement_probabilities(xq, xg[0])

    @pytest.mark.parametrize("mode", ex.MODES)
    def test_explain_rankings_modes_match_reference(self, mode):
        fq, fg, w = make_data(33)
        got = ex.explain_rankings(fq, fg, w, k=5, threshold=0.3, mode=mode, gallery_chunk=32)
        want = ref_explain(fq, fg, w, 5, 0.3, mode=mode)
        rows = np.arange(12)[:, None]
        if mode in ("paper", "complete"):
            scale = ref_scale(fq, fg, ex.complete_weights(w) if mode == "complete" else w)
            scale = scale[rows, want["indices"]]
        elif mode == "projection":
            scale = np.broadcast_to(want["distances"][..., None], want["errors"].shape) + 1e-12
        else:
            scale = np.full(want["errors"].shape, 1e-3)  # probabilities: 1e-6 absolute
        assert_explanation(got, want, scale)
        jitted = jax.jit(lambda q: ex.explain_rankings(q, fg, w, k=5, threshold=0.3, mode=mode,
                                                       gallery_chunk=32))
        assert_explanation(jitted(fq), want, scale)
        v = jax.vmap(lambda q: ex.explain_rankings(q, fg, w, k=5, threshold=0.3, mode=mode,
                                                   gallery_chunk=32))(fq.reshape(2, 6, -1))
        assert_explanation(jax.tree.map(lambda x: x.reshape(12, *x.shape[2:]), v), want, scale)
        if mode == "projection":  # contributions and remainder sum to the distance
            total = np.asarray(got.errors, np.float64).sum(-1) + np.asarray(got.remainder)
            np.testing.assert_allclose(total, got.distances, rtol=1e-5, atol=1e-6)
            assert float(np.min(got.remainder)) >= -1e-6

    def test_complete_keyword_and_mode(self):
        fq, fg, w = make_data(34, g=20)
        a = ex.explain_rankings(fq, fg, w, k=3, complete=True)
        b = ex.explain_rankings(fq, fg, w, k=3, mode="complete")
        np.testing.assert_array_equal(a.errors, b.errors)
        np.testing.assert_allclose(a.remainder, 0.0, atol=1e-5)
        with pytest.raises(ValueError, match="complete=True contradicts mode='paper'"):
            ex.explain_rankings(fq, fg, w, k=3, complete=True, mode="paper")
        with pytest.raises(ValueError, match="mode must be one of"):
            ex.explain_rankings(fq, fg, w, k=3, mode="pie")
        with pytest.raises(ValueError, match="mode must be one of"):
            ex.attribute_errors(fq, fg, w, mode="disagreement")


class TestExplainRankings:
    @pytest.mark.parametrize("complete", [False, True])
    def test_matches_reference(self, complete):
        fq, fg, w = make_data(10)
        got = ex.explain_rankings(fq, fg, w, k=6, threshold=0.3, complete=complete,
                                  gallery_chunk=32)
        want = ref_explain(fq, fg, w, 6, 0.3, complete)
        ww = ex.complete_weights(w) if complete else w
        rows = np.arange(12)[:, None]
        scale = ref_scale(fq, fg, ww)[rows, want["indices"]]
        assert_explanation(got, want, scale)
        # Identical pairs rank first at distance exactly 0 with zero errors.
        for i in range(3):
            assert int(got.indices[i, 0]) == i
            assert float(got.distances[i, 0]) == 0.0
            np.testing.assert_array_equal(got.errors[i, 0], 0.0)

    def test_whole_gallery_single_query_and_per_attribute_threshold(self):
        fq, fg, w = make_data(11, g=20)
        t = np.linspace(0.0, 0.45, 7)
        got = ex.explain_rankings(fq[2], fg, w, k=20, threshold=t, gallery_chunk=7)
        want = ref_explain(fq[2:3], fg, w, 20, t)
        assert got.indices.shape == (20,) and got.errors.shape == (20, 7)
        want = {key: v[0] for key, v in want.items()}
        scale = ref_scale(fq[2:3], fg, w)[0][want["indices"]]
        assert_explanation(got, want, scale)

    def test_ties_break_by_gallery_index(self):
        fq, fg, w = make_data(12, g=40, near=False)
        fg[[5, 17, 33]] = fq[0] + 0.1  # three gallery images at the same distance
        got = ex.explain_rankings(fq[:1], fg, w, k=3, gallery_chunk=8)
        np.testing.assert_array_equal(got.indices[0], [5, 17, 33])

    def test_jit_and_vmap(self):
        fq, fg, w = make_data(13)
        want = ref_explain(fq, fg, w, 4, 0.4)
        scale = ref_scale(fq, fg, w)[np.arange(12)[:, None], want["indices"]]
        jitted = jax.jit(lambda q, g, w: ex.explain_rankings(q, g, w, k=4, gallery_chunk=64))
        assert_explanation(jitted(fq, fg, w), want, scale)
        # vmap over two query sets against the same gallery.
        v = jax.vmap(lambda q: ex.explain_rankings(q, fg, w, k=4, gallery_chunk=64))(
            fq.reshape(2, 6, -1))
        v = jax.tree.map(lambda x: x.reshape(12, *x.shape[2:]), v)
        assert_explanation(v, want, scale)

    def test_errors(self):
        fq, fg, w = make_data(14, g=9, near=False)
        with pytest.raises(ValueError, match=r"k must be an integer in \[1, G=9\]"):
            ex.explain_rankings(fq, fg, w, k=10)
        with pytest.raises(ValueError, match=r"k must be an integer in \[1, G=9\]"):
            ex.explain_rankings(fq, fg, w, k=0)
        with pytest.raises(ValueError, match=r"the gallery is empty"):
            ex.explain_rankings(fq, fg[:0], w, k=1)
        with pytest.raises(ValueError, match=r"no queries: f_query has shape \(0, 48\)"):
            ex.explain_rankings(fq[:0], fg, w, k=1)
        with pytest.raises(ValueError, match=r"threshold must lie in \[0, 0.5\)"):
            ex.explain_rankings(fq, fg, w, k=3, threshold=0.5)
        with pytest.raises(ValueError, match=r"embedding sizes differ"):
            ex.explain_rankings(fq[:, :40], fg, w, k=3)
        with pytest.raises(ValueError, match=r"weights must be \[N, A\], got shape \(48,\)"):
            ex.explain_rankings(fq, fg, w[:, 0], k=3)
        with pytest.raises(ValueError, match=r"mesh must be 'auto', None or"):
            ex.explain_rankings(fq, fg, w, k=3, mesh="all")
        bad = fq.copy()
        bad[0, 0] = np.inf
        with pytest.raises(ValueError, match=r"f_query \(shape \(12, 48\)\) has 1 non-finite"):
            ex.explain_rankings(bad, fg, w, k=3, validate=True)


# --------------------------------------------------------------------------------------------
# Sharding over several (virtual CPU) devices.

SHARDED_SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax
    assert jax.device_count() == 4, jax.devices()
    from reid_jax import explain as ex
    rng = np.random.default_rng(0)
    fq = rng.standard_normal((10, 24)).astype(np.float32)
    fg = rng.standard_normal((101, 24)).astype(np.float32)  # not a multiple of 4 devices
    fg[7] = fq[2]
    w = rng.standard_normal((24, 5)).astype(np.float32)
    for complete in (False, True):
        one = ex.explain_rankings(fq, fg, w, k=7, complete=complete, gallery_chunk=8, mesh=None)
        four = ex.explain_rankings(fq, fg, w, k=7, complete=complete, gallery_chunk=8)
        assert ex.default_mesh().size == 4
        np.testing.assert_array_equal(one.indices, four.indices)
        for a, b in zip(one, four):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
        e_one = ex.attribute_errors(fq, fg, w, complete, gallery_chunk=16, mesh=None)
        e_four = ex.attribute_errors(fq, fg, w, complete, gallery_chunk=16)
        assert e_four.shape == (10, 101, 5)
        np.testing.assert_allclose(np.asarray(e_one), np.asarray(e_four), rtol=1e-6, atol=1e-7)
        assert float(np.abs(np.asarray(e_four)[2, 7]).max()) == 0.0  # identical pair
    print("SHARDED-OK")
    """
)


def test_sharded_gallery_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]


def test_result_is_a_pytree_of_arrays():
    fq, fg, w = make_data(15, g=12, near=False)
    out = ex.explain_rankings(fq, fg, w, k=2)
    assert isinstance(out, ex.RankingExplanation)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(out))
    assert out.indices.dtype == jnp.int32 and out.selected.dtype == jnp.bool_
