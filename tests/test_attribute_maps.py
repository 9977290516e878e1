"""Tests of the attribute map kernels: reid_jax/explain/maps.py.

A narrow AGW (width 8, one bottleneck per stage, 64 x 32 inputs: a 4 x 2 feature map) filled
with random weights, and BNNeck's running statistics those of its GeM features, as after
training (so its running mean is not zero).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reid_jax import explain
from reid_jax.explain import maps
from reid_jax.models.agw import AGW

H, W_PIX, A = 64, 32, 6
TINY = dict(width=8, blocks=(1, 1, 1, 1), non_local=(0, 1, 1, 0))
# This file tests integrated gradients at the last map unless a test names another layer
# (DeepLIFT, the default method: tests/test_deeplift_maps.py).
IGM = "integrated_gradients"
IG = dict(method=IGM, layer=4)


def _fill(path, leaf, rng: np.random.Generator):
    name = path[-2].key  # the variable's name (the last key is its ``value``)
    if name == "kernel":
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in), jnp.float32)
    if name == "scale" and path[-3].key == "w_bn":  # a non-local block adds a little
        return jnp.full(leaf.shape, 0.05, jnp.float32)
    if name in ("scale", "var"):
        return jnp.ones(leaf.shape, jnp.float32)
    if name == "p":
        return jnp.full(leaf.shape, 3.0, jnp.float32)
    return jnp.zeros(leaf.shape, jnp.float32)


def _model(retrieval_feature: str = "post_bn", normalize_feature: bool = True) -> AGW:
    """A random AGW (its initialisers, tested elsewhere, compile slowly on CPU)."""
    rng = np.random.default_rng(0)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AGW(5, **TINY, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(
        lambda p, x: _fill(p, x, rng), state))
    model.eval()
    pooled = np.asarray(model.gem(_feature_maps(model, rng.standard_normal((4, H, W_PIX, 3)))))
    model.bnneck.bn.mean[...] = jnp.asarray(pooled.mean(0))  # BNNeck as after training
    model.bnneck.bn.var[...] = jnp.asarray(pooled.var(0))
    model.retrieval_feature, model.normalize_feature = retrieval_feature, normalize_feature
    return model


def _feature_maps(model: AGW, images) -> jax.Array:
    """The last feature maps as the kernels compute them (jitted; batches of 1 and 4)."""
    return maps._feature_map(maps._eval_parts(model), images)


def _outputs(model: AGW, images) -> tuple[np.ndarray, np.ndarray]:
    """(feature map, retrieval embedding) of the model's own forward, ``AGW.__call__``."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        m = nnx.merge(graphdef, state)
        out = m(x)
        return out.feature_map, m.retrieval_embedding(out)

    return tuple(np.asarray(v, np.float64) for v in forward(state, jnp.asarray(images)))


class Run(NamedTuple):
    """A model and what the kernels computed for it, once per test module (a shape and model
    compile once): evidence of images[:4]; contributions of query images[4] with gallery
    images[1:4], paper and complete weights; the embeddings and feature maps of all images."""

    model: AGW
    weights: np.ndarray
    evidence: maps.EvidenceMaps
    paper: maps.ContributionMaps
    complete: maps.ContributionMaps | None
    embeddings: np.ndarray
    feature_maps: np.ndarray


def _run(model: AGW, images: np.ndarray, complete: bool = True) -> Run:
    w = _weights(model)
    return Run(model, w, maps.evidence_maps(model, w, images[:4], **IG),
               maps.contribution_maps(model, w, images[4:], images[1:4], **IG),
               maps.contribution_maps(model, w, images[4:], images[1:4], complete=True, **IG)
               if complete else None,
               np.asarray(maps.embed(model, images[1:]), np.float64),
               np.concatenate([np.asarray(_feature_maps(model, images[:4]), np.float64),
                               np.asarray(_feature_maps(model, images[4:]), np.float64)]))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Five images; the kernels always see batches of 4 images, or 1 query + 3 gallery images
    (a shape compiles once)."""
    return np.random.default_rng(2).standard_normal((5, H, W_PIX, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def post(images) -> Run:
    """The default embedding: BNNeck output, L2-normalised."""
    return _run(_model(), images)


@pytest.fixture(scope="module")
def linear(images) -> Run:
    """The GeM feature itself is the embedding: positively homogeneous, exact answers known."""
    return _run(_model(retrieval_feature="pre_bn", normalize_feature=False), images,
                complete=False)


def _weights(model: AGW, seed: int = 3) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((model.feature_dim, A)) * 0.3
            ).astype(np.float32)


def _gem_shares(fmap: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 GeM ``pooled [B, C]`` and the shares ``F^p / sum_hw F^p`` ``[B, h, w, C]``."""
    xp = np.maximum(fmap, 1e-6) ** p
    pooled = xp.mean(axis=(1, 2)) ** (1.0 / p)
    return pooled, xp / xp.sum(axis=(1, 2), keepdims=True)


def _to_pixels(cells: np.ndarray) -> np.ndarray:
    mh = maps.spread_matrix(H, cells.shape[-2]).astype(np.float64)
    mw = maps.spread_matrix(W_PIX, cells.shape[-1]).astype(np.float64)
    return np.einsum("...hw,Hh,Ww->...HW", cells, mh, mw)


def test_spread_matrix_and_resize_keep_every_sum():
    for n_out, n_in in ((128, 8), (64, 4), (128, 256), (7, 3), (5, 5)):
        m = maps.spread_matrix(n_out, n_in)
        assert m.shape == (n_out, n_in) and (m >= 0).all()
        np.testing.assert_allclose(m.sum(axis=0), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(maps.spread_matrix(5, 5), np.eye(5, dtype=np.float32))
    # Between cell centres it interpolates linearly, as bilinear upsampling does.
    m = maps.spread_matrix(128, 8).astype(np.float64)
    ramp = m @ np.arange(8.0) / (m @ np.ones(8))
    np.testing.assert_allclose(np.diff(ramp[24:104]), 1 / 16, rtol=1e-5)  # centres 1..6
    x = np.random.default_rng(0).standard_normal((3, 2, 8, 4))
    for size in ((128, 64), (4, 2), (8, 4)):
        out = jax.jit(maps.resize_maps, static_argnums=(1, 2))(jnp.asarray(x), *size)
        assert out.shape == (3, 2, *size) and out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out).sum(axis=(2, 3)), x.sum(axis=(2, 3)),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[\.\.\., h, w\]"):
        maps.resize_maps(jnp.zeros(4), 8, 8)


def test_quadrature_integrates_polynomials_exactly():
    for steps in (1, 4, 16):
        t, w = maps.quadrature(steps)
        assert ((t > 0) & (t < 1)).all() and abs(w.sum() - 1) < 1e-6
        for k in range(2 * steps):
            assert abs(float(np.dot(w.astype(np.float64), t.astype(np.float64) ** k))
                       - 1 / (k + 1)) < 1e-6
    for bad in (0, maps.MAX_STEPS + 1, 2.0):
        with pytest.raises(ValueError, match=r"steps must be an integer in 1\.\.1024 "
                                             r"\(quadrature nodes\), got"):
            maps.quadrature(bad)


def test_embed_is_the_models_retrieval_embedding(post, linear, images):
    for run in (post, linear):
        feature_map, embedding = _outputs(run.model, images[1:])
        np.testing.assert_allclose(run.embeddings, embedding, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(run.feature_maps[1:], feature_map, rtol=1e-4,
                                   atol=1e-5 * np.abs(feature_map).max())


def test_evidence_maps_of_a_homogeneous_embedding_are_exact(linear):
    # z = GeM(F) @ W is positively homogeneous in F: along the path from the zero map every
    # pooled value grows linearly, and integrated gradients give exactly the GeM shares of
    # each channel's term, sum_c s[h, w, c] pooled_c w_ca, for any number of steps.
    w = linear.weights
    pooled, shares = _gem_shares(linear.feature_maps, float(linear.model.gem.p[...][0]))
    ref = _to_pixels(np.einsum("bhwc,bc,ca->bahw", shares, pooled, w.astype(np.float64)))
    ev = linear.evidence
    assert ev.maps.shape == (4, A, H, W_PIX) and ev.maps.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ev.maps), ref[:4], rtol=1e-4,
                               atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(ev.logits), pooled[:4] @ w, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(ev.baseline_logits)).max() < 1e-4  # GeM of nothing is ~0


def test_contribution_maps_of_a_homogeneous_embedding_are_exact(linear):
    # e_a = sum_c (p^q_c - p^g_c)^2 w_ca with p = GeM(F): along both paths from the zero map
    # e_a(t) = t^2 e_a, and the query's map is sum_c s^q p^q_c (p^q_c - p^g_c) w_ca, the
    # gallery's -sum_c s^g p^g_c (p^q_c - p^g_c) w_ca.
    pooled, shares = _gem_shares(linear.feature_maps, float(linear.model.gem.p[...][0]))
    wm = linear.weights.astype(np.float64)
    diff = pooled[4:] - pooled[1:4]  # [P, C]
    ref_q = _to_pixels(np.einsum("hwc,c,pc,ca->pahw", shares[4], pooled[4], diff, wm))
    ref_g = _to_pixels(-np.einsum("phwc,pc,pc,ca->pahw", shares[1:4], pooled[1:4], diff, wm))
    c = linear.paper
    scale = np.abs(ref_q).max()
    np.testing.assert_allclose(np.asarray(c.query), ref_q, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(c.gallery), ref_g, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(c.errors), np.square(diff) @ wm, rtol=1e-4)


def _check_complete(c: maps.ContributionMaps, f: np.ndarray, w: np.ndarray, complete: bool,
                    tolerance: float = 1e-3):
    """The two maps of every pair sum to e_a of eq. 3.2 (float64, and the kernels'), within
    ``tolerance`` of sum_a |e_a|."""
    fq, fg = f[3:], f[:3]  # embeddings of images[1:]: the gallery images, then the query
    wm = np.asarray(explain.complete_weights(jnp.asarray(w)), np.float64) if complete \
        else w.astype(np.float64)
    ref = np.square(fq - fg) @ wm
    got = np.asarray(c.query, np.float64).sum((2, 3)) + np.asarray(c.gallery).sum((2, 3))
    scale = np.abs(ref).sum(axis=1, keepdims=True)
    assert (np.abs(got - ref) <= tolerance * scale).all(), np.abs(got - ref) / scale
    kern = explain.attribute_errors(fq[0].astype(np.float32), fg.astype(np.float32), w,
                                    complete=complete, mesh=None)
    np.testing.assert_allclose(np.asarray(c.errors), np.asarray(kern), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(c.distances), np.square(fq - fg).sum(1), rtol=1e-4)


def test_contribution_maps_are_complete_against_eq_3_2(post):
    # The default embedding (BNNeck output, L2-normalised): the two maps of a pair sum to the
    # kernels' e_a, here within 1e-3 of sum_a |e_a| (the goal is 1e-2), for both weights.
    _check_complete(post.paper, post.embeddings, post.weights, complete=False)
    _check_complete(post.complete, post.embeddings, post.weights, complete=True)
    assert (np.asarray(post.complete.errors) >= 0).all()
    np.testing.assert_allclose(np.asarray(post.complete.errors).sum(1),
                               np.asarray(post.complete.distances), rtol=1e-4)


def test_contribution_maps_of_the_normalised_gem_feature_are_complete(images):
    # Its direction is undefined at the zero map; the baseline is BNNeck's running mean.
    m = _model(retrieval_feature="pre_bn")
    w = _weights(m)
    c = maps.contribution_maps(m, w, images[4:], images[1:4], **IG)
    _check_complete(c, np.asarray(maps.embed(m, images[1:]), np.float64), w, complete=False)


def test_evidence_maps_are_complete_and_batch_independent(post, images):
    model, w, ev = post.model, post.weights, post.evidence
    f = np.asarray(maps.embed(model, images[:4]), np.float64)
    np.testing.assert_allclose(np.asarray(ev.logits), f @ w, rtol=1e-4, atol=1e-5)
    total = np.asarray(ev.logits - ev.baseline_logits[None], np.float64)
    got = np.asarray(ev.maps, np.float64).sum(axis=(2, 3))
    assert np.abs(got - total).max() <= 1e-4 * np.abs(total).max()
    # Images do not interact (eval mode): replacing one image leaves the others' maps.
    other = maps.evidence_maps(model, w, images[[0, 1, 2, 4]], **IG)
    np.testing.assert_allclose(np.asarray(other.maps[:3]), np.asarray(ev.maps[:3]), rtol=1e-4,
                               atol=1e-5 * np.abs(np.asarray(ev.maps)).max())
    assert not np.allclose(np.asarray(other.maps[3]), np.asarray(ev.maps[3]))


def test_maps_through_an_earlier_stage_and_from_a_reference_baseline_are_complete(post,
                                                                                   images):
    # Through stage 3's output (stage 4's convolutions, ReLUs and BatchNorm after it) from
    # zeros, and at the last map from the mean map of reference images: both kinds of map
    # stay complete.
    model, w = post.model, post.weights
    parts = maps._eval_parts(model)
    c = maps.contribution_maps(model, w, images[4:], images[1:4], layer=3, steps=64, method=IGM)
    assert c.query.shape == c.gallery.shape == (3, A, H, W_PIX)
    _check_complete(c, post.embeddings, w, complete=False, tolerance=1e-3)
    ev = maps.evidence_maps(model, w, images[:4], layer=3, steps=64, method=IGM)
    total = np.asarray(ev.logits - ev.baseline_logits[None], np.float64)
    got = np.asarray(ev.maps, np.float64).sum(axis=(2, 3))
    assert np.abs(got - total).max() <= 1e-3 * np.abs(total).max()
    np.testing.assert_allclose(np.asarray(ev.logits), np.asarray(post.evidence.logits),
                               rtol=1e-4, atol=1e-5)
    # The reference baseline is the mean map of the images at the layer.
    base = maps.reference_baseline(model, images, layer=3, batch_size=2)
    feats = np.asarray(maps._features(parts, images, 3), np.float64)
    assert base.shape == feats.shape[1:] == (4, 2, 128)
    np.testing.assert_allclose(np.asarray(base), feats.mean(0), rtol=1e-4, atol=1e-5)
    ev3 = maps.evidence_maps(model, w, images[:4], layer=3, baseline=base, steps=8, method=IGM)
    view = nnx.view(model, use_running_average=True)
    z0 = np.asarray(maps._embedding_of_map(view, view.backbone.forward_from(
        jnp.asarray(base)[None], 3)) @ w)[0]  # the network run on from the mean map
    np.testing.assert_allclose(np.asarray(ev3.baseline_logits), z0, rtol=1e-4, atol=1e-5)
    # At the last map the given baseline replaces the default one; the maps stay complete.
    last = maps.reference_baseline(model, images, layer=4)
    c4 = maps.contribution_maps(model, w, images[4:], images[1:4], baseline=last, **IG)
    _check_complete(c4, post.embeddings, w, complete=False, tolerance=1e-3)
    ev4 = maps.evidence_maps(model, w, images[:4], baseline=last, **IG)
    assert not np.allclose(np.asarray(ev4.baseline_logits), np.asarray(
        post.evidence.baseline_logits))
    total4 = np.asarray(ev4.logits - ev4.baseline_logits[None], np.float64)
    got4 = np.asarray(ev4.maps, np.float64).sum(axis=(2, 3))
    assert np.abs(got4 - total4).max() <= 1e-3 * np.abs(total4).max()


def test_maps_at_stage_2_have_twice_the_cells(post, images):
    # Stage 2's output has 8 x 4 cells (the last map 4 x 2): its maps are not constant over
    # the 2 x 2 cells of stage 2 that one last-map cell covers, so they do not come from the
    # coarser grid. (On this random model the path through stage 3 has kinks where whole
    # channels switch on, which the 64 nodes do not integrate to 1 %: completeness is
    # measured on trained models, docs/attribute_maps.md, 'Completeness'.)
    model, w = post.model, post.weights
    ev = maps.evidence_maps(model, w, images[:4], layer=2, steps=8, method=IGM)
    assert ev.maps.shape == (4, A, H, W_PIX)
    np.testing.assert_allclose(np.asarray(ev.logits), np.asarray(post.evidence.logits),
                               rtol=1e-4, atol=1e-5)
    fine = np.asarray(ev.maps, np.float64)
    coarse = _to_pixels(fine.reshape(4, A, 4, H // 4, 2, W_PIX // 2).sum(axis=(3, 5)))
    fine_cells = fine.reshape(4, A, 8, H // 8, 4, W_PIX // 4).sum(axis=(3, 5))
    assert np.abs(fine - coarse).max() > 0.1 * np.abs(fine).max()
    assert fine_cells.shape == (4, A, 8, 4)


def test_pairs_of_one_query_and_explicit_indices_agree(post, images):
    model, w, one = post.model, post.weights, post.paper
    same = maps.contribution_maps(model, w, np.repeat(images[4:], 3, 0), images[1:4], **IG)
    picked = maps.contribution_maps(model, w, images[[0, 2, 4]], images[1:4],
                                    query_index=np.array([2, 2, 2]), **IG)
    for other in (same, picked):
        for x, y in zip(one, other, strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4,
                                       atol=1e-5 * float(np.abs(np.asarray(x)).max()))
    # An identical pair explains (next to) nothing: e ~ 0 and both maps ~ 0 (the same image in
    # two batches: rounding only).
    z = maps.contribution_maps(model, w, images[4:], images[[4, 1, 2]], **IG)
    assert float(np.abs(np.asarray(z.errors[0])).max()) < 1e-9
    scale = float(np.abs(np.asarray(z.query[1])).max())  # a real pair's
    assert float(np.abs(np.asarray(z.query[0])).max()) < 0.1 * scale, scale
    assert float(np.abs(np.asarray(z.errors[1])).max()) > 1e-4


def test_distance_gradcam_matches_a_float64_reference(linear, images):
    # For the GeM feature as embedding, d/dF[h, w, c] |p - p^g|^2 =
    # 2 (p_c - p^g_c) F^(p-1) / (hw) * p_c^(1-p).
    fmap = linear.feature_maps
    gp = float(linear.model.gem.p[...][0])
    pooled, _ = _gem_shares(fmap, gp)
    partner = pooled[[4, 4, 4, 4]]
    fm = fmap[:4]
    grad = (2 * (pooled[:4] - partner)[:, None, None, :] * np.maximum(fm, 1e-6) ** (gp - 1)
            / (fm.shape[1] * fm.shape[2]) * pooled[:4, None, None, :] ** (1 - gp))
    grad = np.where(fm > 1e-6, grad, 0.0)
    cam = np.maximum(np.einsum("bhwc,bc->bhw", fm, grad.mean(axis=(1, 2))), 0.0)
    got = maps.distance_gradcam(linear.model, images[:4], images[4:])
    assert got.shape == (4, H, W_PIX) and (np.asarray(got) >= 0).all()
    np.testing.assert_allclose(np.asarray(got), _to_pixels(cam), rtol=1e-4,
                               atol=1e-5 * cam.max())


def test_maps_leave_the_model_unchanged(images):
    m = _model()
    m.train()
    before = jax.tree.map(np.asarray, nnx.state(m))
    w = _weights(m)
    ev = maps.evidence_maps(m, w, images[:4], **IG)
    maps.contribution_maps(m, w, images[4:], images[1:4], **IG)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(m)))
    assert m.bnneck.bn.use_running_average is False  # still in train mode
    # ... and the maps of a train-mode model are those of the same model in eval mode.
    m.eval()
    np.testing.assert_array_equal(np.asarray(maps.evidence_maps(m, w, images[:4], **IG).maps),
                                  np.asarray(ev.maps))


def test_bad_shapes_are_rejected_with_their_names(post, images):
    model, w = post.model, post.weights
    with pytest.raises(ValueError, match=r"images must be model-input images \[B, H, W, 3\], "
                       r"got shape \(64, 32, 3\)"):
        maps.evidence_maps(model, w, images[0])
    with pytest.raises(ValueError, match=r"gallery_images must be .* got shape \(2, 64, 32, 4\)"):
        maps.contribution_maps(model, w, images[:1], np.zeros((2, H, W_PIX, 4), np.float32))
    with pytest.raises(ValueError, match=r"weights must be .*N = 256.* got shape \(128, 6\)"):
        maps.evidence_maps(model, w[:128], images)
    with pytest.raises(ValueError, match="same size"):
        maps.contribution_maps(model, w, images[:1], np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="query_index is needed: 2 first images for 3 pairs"):
        maps.contribution_maps(model, w, images[:2], images[2:5])
    with pytest.raises(ValueError, match=r"query_index must lie in \[0, 2\)"):
        maps.contribution_maps(model, w, images[:2], images[2:5], query_index=[0, 2, 1])
    with pytest.raises(ValueError, match=r"query_index must be ints of shape \(3,\)"):
        maps.contribution_maps(model, w, images[:2], images[2:5], query_index=[0, 1])
    with pytest.raises(ValueError, match=r"steps must be an integer in 1\.\.1024"):
        maps.evidence_maps(model, w, images, steps=0)
    with pytest.raises(ValueError, match="images is empty"):
        maps.distance_gradcam(model, images[:0], images[:1])
    with pytest.raises(ValueError, match=r"layer must be one of \(1, 2, 3, 4\) .* got 5"):
        maps.evidence_maps(model, w, images, layer=5)
    with pytest.raises(ValueError, match=r"layer must be one of .* got True"):
        maps.contribution_maps(model, w, images[:1], images[1:3], layer=True)
    with pytest.raises(ValueError, match=r"baseline must be one feature map \[h, w, C\] = "
                                         r"\[8, 4, 64\] .* got shape \[4, 2, 256\]"):
        maps.evidence_maps(model, w, images, layer=2, baseline=np.zeros((4, 2, 256)))


def test_part_occlusion_maps_are_the_logit_drops_of_greying_each_part(post, images):
    """map_metrics.part_occlusion_maps against the model's own embeddings of the greyed images,
    in float64; a part under min_pixels is not greyed (-inf), and masks at another size are read
    at the model input's pixels (nearest) and the maps returned at the masks' size."""
    from reid_jax.explain import map_metrics as mm

    model, w = post.model, post.weights
    x = images[:2]
    labels = np.zeros((2, H, W_PIX), np.uint8)
    labels[:, 20:40] = 1
    labels[:, 40:] = 2
    labels[1, 40:] = 3  # image 1 has no part 2 but a part 3
    labels[0, 0, :3] = 4  # 3 pixels: below min_pixels
    got = mm.part_occlusion_maps(model, w, x, labels, batch_size=4)
    assert got.shape == (2, A, H, W_PIX) and got.dtype == np.float32

    def logits(batch):
        return np.asarray(maps.embed(model, batch), np.float64) @ w.astype(np.float64)

    z = logits(x)
    for i in range(2):
        for part in np.unique(labels[i]).tolist():
            at = labels[i] == part
            if at.sum() < mm.DEFAULT_MIN_PART_PIXELS:
                assert np.isneginf(got[i][:, at]).all()
                continue
            grey = x[i:i + 1].copy()
            grey[0][at] = 0.0
            want = z[i] - logits(grey)[0]
            np.testing.assert_allclose(got[i][:, at], np.repeat(want[:, None], at.sum(), 1),
                                       rtol=1e-4, atol=1e-4)
    # The images' own logits given (as the measurements pass the evidence maps'): the same.
    given = mm.part_occlusion_maps(model, w, x, labels, logits=z.astype(np.float32),
                                   batch_size=4)
    np.testing.assert_allclose(given, got, rtol=1e-4, atol=1e-4)
    # Masks at twice the input's size: the same drops, returned at the masks' size.
    big = np.repeat(np.repeat(labels, 2, axis=1), 2, axis=2)
    twice = mm.part_occlusion_maps(model, w, x, big, batch_size=4)
    assert twice.shape == (2, A, 2 * H, 2 * W_PIX)
    np.testing.assert_allclose(twice[:, :, ::2, ::2], got, rtol=1e-5, atol=1e-5)
    # The part each attribute is read from, and the pixel that stands for it.
    top = mm.top_part_regions(got)
    points = mm.part_occlusion_points(got)
    for i in range(2):
        for k in range(A):
            part = labels[i][top[i, k]]
            assert len(np.unique(part)) == 1  # one whole part
            assert top[i, k].sum() == (labels[i] == part[0]).sum()
            assert top[i, k][tuple(points[i, k])]
    with pytest.raises(ValueError, match="one mask per image: 1 masks for 2 images"):
        mm.part_occlusion_maps(model, w, x, labels[:1])
    with pytest.raises(ValueError, match="part_labels must be integer region indices, got "
                                         "float32"):
        mm.part_occlusion_maps(model, w, x, labels.astype(np.float32))
    with pytest.raises(ValueError, match="part_labels must be region indices >= 0, got values "
                                         "from -1"):
        mm.part_occlusion_maps(model, w, x, labels.astype(np.int32) - 1)
    with pytest.raises(ValueError, match=r"logits must have shape \(2, 6\)"):
        mm.part_occlusion_maps(model, w, x, labels, logits=z[:1])
    with pytest.raises(ValueError, match="min_pixels must be >= 1, got 0"):
        mm.part_occlusion_maps(model, w, x, labels, min_pixels=0)
    with pytest.raises(ValueError, match=r"part_labels must be int \[B, H, W\]"):
        mm.part_occlusion_maps(model, w, x, labels[0])


def test_deletion_evidence_takes_the_logits_computed_beside_the_maps(post, images):
    """map_metrics.deletion_evidence_cases given the images' logits (as the measurements pass
    the evidence maps') scores the same cases as when it embeds the images itself, and logits
    of another shape are refused with the shape expected."""
    from reid_jax.explain import map_metrics as mm

    model, w = post.model, post.weights
    x = images[:3]
    ev = maps.evidence_maps(model, w, x)
    names = [f"a{k}" for k in range(A)]
    own = mm.deletion_evidence_cases(model, w, x, np.asarray(ev.maps), threshold=0.0,
                                     batch_size=4, attributes=names)
    given = mm.deletion_evidence_cases(model, w, x, np.asarray(ev.maps), logits=ev.logits,
                                       threshold=0.0, batch_size=4, attributes=names)
    assert len(own.item) == 3 * A  # threshold 0: every (image, attribute) is a case
    np.testing.assert_array_equal(given.item, own.item)
    np.testing.assert_array_equal(given.attribute, own.attribute)
    for key in ("drop_map", "drop_random"):
        np.testing.assert_allclose(given.values[key], own.values[key], atol=1e-5)
    with pytest.raises(ValueError, match=r"logits must have shape \(3, 6\)"):
        mm.deletion_evidence_cases(model, w, x, np.asarray(ev.maps), logits=ev.logits[:2],
                                   attributes=names)
