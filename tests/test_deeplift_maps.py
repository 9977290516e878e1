"""Tests of the DeepLIFT maps: reid_jax/explain/deeplift.py and ``method="deeplift"`` of
reid_jax/explain/maps.py.

The rules against float64 numpy under ``jit`` and ``vmap``; the model run on differences against
the model's own forward; the maps' completeness at every layer (exact up to rounding, where
integrated gradients on this random model are far off below the last map) and their exact values
where the answer is known.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attribute_maps import W_PIX, A, H, _check_complete, _gem_shares, _model, _to_pixels

from reid_jax.explain import deeplift, maps
from reid_jax.explain.settings import MAP_METHODS, explain_settings


def _diff(ref, act) -> deeplift.Diff:
    ref, act = jnp.asarray(ref, jnp.float32), jnp.asarray(act, jnp.float32)
    return deeplift.Diff(ref, act, act - ref)


def test_secant_rule_matches_float64_under_jit_and_vmap():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.1, 2.0, (1, 7)).astype(np.float32)
    act = rng.uniform(0.1, 2.0, (5, 7)).astype(np.float32)
    act[0, :3] = ref[0, :3]  # equal: the derivative there
    act[1, :3] = ref[0, :3] * (1 + 1e-5)  # within rounding: the midpoint's derivative
    r64, a64 = ref.astype(np.float64), act.astype(np.float64)
    # cube: (b^3 - a^3) / (b - a) = a^2 + a b + b^2, which is 3 a^2 where a = b.
    want_slope = r64 ** 2 + r64 * a64 + a64 ** 2

    def slope(r, a):
        out = deeplift.secant(lambda v: v ** 3, deeplift.Diff(r, a, jnp.ones_like(a)))
        return out.delta

    np.testing.assert_allclose(np.asarray(jax.jit(slope)(ref, act)), want_slope, rtol=1e-4)
    per_row = jax.vmap(lambda a: slope(jnp.asarray(ref), a[None])[0])(jnp.asarray(act))
    np.testing.assert_allclose(np.asarray(per_row), want_slope, rtol=1e-4)
    out = deeplift.secant(lambda v: v ** 3, _diff(ref, act))  # delta times the slope
    np.testing.assert_allclose(np.asarray(out.delta), a64 ** 3 - r64 ** 3, rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.act), a64 ** 3, rtol=1e-6)


def test_relu_rule_is_exact_across_zero():
    ref = np.array([[-1.0, 2.0, -3.0, 1.5, 0.5]], np.float32)
    act = np.array([[3.0, 5.0, -1.0, -0.5, 0.5]], np.float32)
    out = jax.jit(deeplift.relu)(_diff(ref, act))
    np.testing.assert_array_equal(np.asarray(out.delta), np.maximum(act, 0) - np.maximum(ref, 0))
    # slopes: the crossing's share 3/4, 1, 0, 1.5/2, and the derivative where act == ref
    slope = jax.jit(deeplift.relu)(deeplift.Diff(jnp.asarray(ref), jnp.asarray(act),
                                                 jnp.ones_like(act))).delta
    np.testing.assert_allclose(np.asarray(slope), [[0.75, 1.0, 0.0, 0.75, 1.0]])


def test_bilinear_rule_is_exact_for_products():
    rng = np.random.default_rng(1)
    u = _diff(rng.standard_normal((1, 4, 3)), rng.standard_normal((6, 4, 3)))
    v = _diff(rng.standard_normal((1, 3, 2)), rng.standard_normal((6, 3, 2)))
    out = jax.jit(lambda u, v: deeplift.bilinear(
        lambda a, b: jnp.einsum("bij,bjk->bik", a, b), u, v))(u, v)
    f64 = [np.asarray(x, np.float64) for x in (u.ref, u.act, v.ref, v.act)]
    want = np.einsum("bij,bjk->bik", f64[1], f64[3]) - np.einsum("bij,bjk->bik", f64[0], f64[2])
    np.testing.assert_allclose(np.asarray(out.delta), want, rtol=1e-5, atol=1e-5)
    # vmapped over the images, the baseline shared
    def one(ua, ud, va, vd):
        return deeplift.bilinear(lambda a, b: jnp.einsum("bij,bjk->bik", a, b),
                                 deeplift.Diff(u.ref, ua[None], ud[None]),
                                 deeplift.Diff(v.ref, va[None], vd[None])).delta[0]

    per = jax.vmap(one)(u.act, u.delta, v.act, v.delta)
    np.testing.assert_allclose(np.asarray(per), want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(2).standard_normal((5, H, W_PIX, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    return _model()


def _weights(model, seed: int = 3) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((model.feature_dim, A)) * 0.3
            ).astype(np.float32)


@pytest.mark.parametrize("layer", [1, 3])
def test_the_model_on_differences_is_the_models_forward_and_linear(model, images, layer):
    parts = maps._eval_parts(model)
    feats = maps._features(parts, images[1:], layer)
    base = maps._features(parts, images[:1], layer)

    @jax.jit
    def run(ref, act, delta):
        m = maps._eval_model(parts.graphdef, parts.state)
        return deeplift.embedding_delta(m, layer, ref, act, delta)

    out = run(base, feats, feats - base)
    f = np.asarray(maps.embed(model, images), np.float64)
    np.testing.assert_allclose(np.asarray(out.act), f[1:], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.ref), f[:1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.delta), f[1:] - f[:1], rtol=1e-3, atol=1e-5)
    # For fixed ref and act, delta is a linear function of the input's delta.
    d = np.random.default_rng(5).standard_normal(feats.shape).astype(np.float32)
    a, b = run(base, feats, d).delta, run(base, feats, 2.5 * d).delta
    c = run(base, feats, d + (feats - base)).delta
    np.testing.assert_allclose(np.asarray(b), 2.5 * np.asarray(a), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(c), np.asarray(a) + np.asarray(out.delta), rtol=1e-3,
                               atol=1e-5)


@pytest.mark.parametrize("layer", [1, 2, 4])
def test_deeplift_maps_are_complete_at_every_layer(model, images, layer):
    # Integrated gradients with 64 nodes miss e_a on this random model below the last map by
    # several times sum_a |e_a| (channels switching on along the path); DeepLIFT's maps sum to it
    # up to rounding, from the reference mean as from zeros.
    w = _weights(model)
    f = np.asarray(maps.embed(model, images[1:]), np.float64)
    base = maps.reference_baseline(model, images, layer=layer) if layer != 4 else None
    c = maps.contribution_maps(model, w, images[4:], images[1:4], layer=layer, baseline=base,
                               method="deeplift")
    assert c.query.shape == c.gallery.shape == (3, A, H, W_PIX) and c.query.dtype == jnp.float32
    _check_complete(c, f, w, complete=False, tolerance=1e-3)
    ev = maps.evidence_maps(model, w, images[:4], layer=layer, baseline=base, method="deeplift")
    total = np.asarray(ev.logits - ev.baseline_logits[None], np.float64)
    got = np.asarray(ev.maps, np.float64).sum(axis=(2, 3))
    assert np.abs(got - total).max() <= 1e-3 * np.abs(total).max()
    np.testing.assert_allclose(np.asarray(ev.logits),
                               np.asarray(maps.embed(model, images[:4])) @ w, rtol=1e-4,
                               atol=1e-5)


def test_deeplift_complete_weights_and_batch_independence(model, images):
    w = _weights(model)
    f = np.asarray(maps.embed(model, images[1:]), np.float64)
    c = maps.contribution_maps(model, w, images[4:], images[1:4], complete=True, layer=2,
                               method="deeplift")
    _check_complete(c, f, w, complete=True, tolerance=1e-3)
    ev = maps.evidence_maps(model, w, images[:4], layer=2, method="deeplift")
    # The difference starts at the baseline (zeros here), not at an image of the batch: the
    # baseline logits are those integrated gradients report from the same start.
    ig = maps.evidence_maps(model, w, images[:4], layer=2, method="integrated_gradients",
                            steps=1)
    np.testing.assert_allclose(np.asarray(ev.baseline_logits), np.asarray(ig.baseline_logits),
                               rtol=1e-5, atol=1e-6)
    other = maps.evidence_maps(model, w, images[[0, 1, 2, 4]], layer=2, method="deeplift")
    np.testing.assert_allclose(np.asarray(other.maps[:3]), np.asarray(ev.maps[:3]), rtol=1e-4,
                               atol=1e-5 * np.abs(np.asarray(ev.maps)).max())


def test_deeplift_gives_the_gem_shares_of_a_homogeneous_embedding(images):
    # z = GeM(F) @ W from the zero map: every secant of GeM's power and root gives the channel's
    # share of the pooled value, the exact answer integrated gradients also give.
    m = _model(retrieval_feature="pre_bn", normalize_feature=False)
    w = _weights(m)
    fmap = np.asarray(maps._feature_map(maps._eval_parts(m), images[:4]), np.float64)
    pooled, shares = _gem_shares(fmap, float(m.gem.p[...][0]))
    ref = _to_pixels(np.einsum("bhwc,bc,ca->bahw", shares, pooled, w.astype(np.float64)))
    ev = maps.evidence_maps(m, w, images[:4], layer=4, method="deeplift")
    np.testing.assert_allclose(np.asarray(ev.maps), ref, rtol=1e-3,
                               atol=1e-4 * np.abs(ref).max())


def test_pair_provider_and_settings_take_the_method(model, images):
    w = _weights(model)
    pair = maps.pair_contribution_maps(model, w, layer=3, method="deeplift")
    q, g = pair(images[4], images[1], "paper")
    c = maps.contribution_maps(model, w, images[4:], images[1:2], layer=3, method="deeplift")
    np.testing.assert_allclose(q, np.asarray(c.query[0]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g, np.asarray(c.gallery[0]), rtol=1e-5, atol=1e-7)
    assert MAP_METHODS == maps.MAP_METHODS  # the settings validate what the kernels take
    assert explain_settings(None).map_method == "deeplift"
    assert explain_settings(None, map_method="integrated_gradients").map_method == (
        "integrated_gradients")
    with pytest.raises(ValueError, match=r"config.explain.map_method must be one of "
                                         r"\('integrated_gradients', 'deeplift'\), got 'lrp'"):
        explain_settings(None, map_method="lrp")
    with pytest.raises(ValueError, match=r"method must be one of \('integrated_gradients', "
                                         r"'deeplift'\) .* got 'ig'"):
        maps.evidence_maps(model, w, images, method="ig")
    with pytest.raises(ValueError, match=r"method must be one of .* got None"):
        maps.contribution_maps(model, w, images[:1], images[1:3], method=None)


def test_forward_mode_for_a_query_with_its_top_k_gives_the_same_maps(model, images):
    # 3 pairs with 6 attributes: 18 cotangents. At stage 3 (4 x 2 cells) the queries' maps are
    # taken in forward mode, one pass per cell, for one query (8 cells) or two (16); with a
    # query per pair (3 x 8 = 24 cells) in reverse mode.
    layer = 3
    w = _weights(model)
    f = np.asarray(maps.embed(model, images[1:]), np.float64)
    one = maps.contribution_maps(model, w, images[4:], images[1:4], layer=layer,
                                 method="deeplift")
    _check_complete(one, f, w, complete=False, tolerance=1e-3)
    rep = maps.contribution_maps(model, w, np.repeat(images[4:], 3, 0), images[1:4],
                                 layer=layer, method="deeplift")
    scale = np.abs(np.asarray(rep.query)).max()
    for got in (one, maps.contribution_maps(model, w, images[[0, 4]], images[1:4], layer=layer,
                                            query_index=[1, 1, 1], method="deeplift")):
        np.testing.assert_allclose(np.asarray(got.query), np.asarray(rep.query), rtol=1e-4,
                                   atol=1e-5 * scale)
        np.testing.assert_allclose(np.asarray(got.gallery), np.asarray(rep.gallery), rtol=1e-4,
                                   atol=1e-5 * scale)
    # Two queries in forward mode, each pair with its own: as each query alone.
    two = maps.contribution_maps(model, w, images[[4, 0]], images[1:4], layer=layer,
                                 query_index=[0, 1, 0], method="deeplift")
    np.testing.assert_allclose(np.asarray(two.query)[[0, 2]], np.asarray(one.query)[[0, 2]],
                               rtol=1e-4, atol=1e-5 * scale)
    alone = maps.contribution_maps(model, w, images[:1], images[2:3], layer=layer,
                                   method="deeplift")  # 1 x 8 cells < 6: reverse mode
    np.testing.assert_allclose(np.asarray(two.query)[1], np.asarray(alone.query)[0],
                               rtol=1e-4, atol=1e-5 * scale)
