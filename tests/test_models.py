"""AGW model, its parts and the attribute head: shapes, reference formulas, train/eval modes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from reid_jax.models import initializers
from reid_jax.models.agw import (
    AGW,
    RETRIEVAL_FEATURES,
    AGWOutputs,
    BNNeck,
    FrozenParam,
    GeM,
    default_model_config,
    gem_pool,
    retrieval_embedding,
)
from reid_jax.models.attribute_head import AttributeHead
from reid_jax.models.non_local import NonLocal
from reid_jax.models.resnet import ResNet

TINY = dict(width=8, blocks=(1, 2, 2, 1), non_local=(0, 1, 1, 0))


def _param_count(state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def _forward(model: AGW, images: jax.Array):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, images):
        return nnx.merge(graphdef, state)(images)

    return run(state, images)


@pytest.fixture(scope="module")
def tiny_model() -> AGW:
    return AGW(5, **TINY, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- full-size shapes (abstract)


def test_full_resnet50_shapes_last_stride_1():
    model = nnx.eval_shape(lambda: AGW(751, rngs=nnx.Rngs(0)))
    images = jax.ShapeDtypeStruct((2, 256, 128, 3), jnp.float32)
    out = nnx.eval_shape(lambda m, x: m(x), model, images)
    assert out.feature_map.shape == (2, 16, 8, 2048)
    assert out.pre_bn.shape == out.post_bn.shape == (2, 2048)
    assert out.logits.shape == (2, 751)
    assert model.feature_dim == 2048
    # The ResNet-50 convs and BNs (torchvision resnet50 without fc: 23,508,032 parameters).
    backbone_params = nnx.state(model.backbone, nnx.Param)
    nl_params = sum(_param_count(nnx.state(nl, nnx.Param))
                    for nl in (model.backbone.nl2, model.backbone.nl3))
    assert _param_count(backbone_params) - nl_params == 23_508_032
    # NL blocks (inter channels 1): g/theta/phi C+1 each, W conv 2C, W BN 2C -> 7C + 3.
    assert nl_params == 2 * (7 * 512 + 3) + 3 * (7 * 1024 + 3)
    assert len(model.backbone.nl2) == 2 and len(model.backbone.nl3) == 3
    assert model.backbone.non_local_after(1) == (2, 3)
    assert model.backbone.non_local_after(2) == (3, 4, 5)


def test_last_stride_2_halves_the_map():
    model = nnx.eval_shape(lambda: AGW(10, last_stride=2, rngs=nnx.Rngs(0)))
    out = nnx.eval_shape(lambda m, x: m(x), model,
                         jax.ShapeDtypeStruct((1, 256, 128, 3), jnp.float32))
    assert out.feature_map.shape == (1, 8, 4, 2048)


def test_textbook_inter_channels_switch():
    model = nnx.eval_shape(
        lambda: AGW(10, nl_inter_channels_reference=False, rngs=nnx.Rngs(0)))
    assert model.backbone.nl2[0].inter_channels == 256
    assert model.backbone.nl3[0].g.kernel.shape == (1, 1, 1024, 512)
    ref = nnx.eval_shape(lambda: AGW(10, rngs=nnx.Rngs(0)))
    assert ref.backbone.nl3[0].g.kernel.shape == (1, 1, 1024, 1)


# ---------------------------------------------------------------- tiny model, real compute


def test_tiny_model_outputs_and_modes(tiny_model):
    images = jax.random.normal(jax.random.key(1), (4, 64, 32, 3))
    out = _forward(tiny_model, images)
    assert out.feature_map.shape == (4, 4, 2, 256)  # 64x32 / 16, last stride 1
    assert out.pre_bn.shape == out.post_bn.shape == (4, 256)
    assert out.logits.shape == (4, 5)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in out)
    emb = retrieval_embedding(out)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        emb, out.post_bn / np.linalg.norm(out.post_bn, axis=1, keepdims=True), rtol=1e-5)
    np.testing.assert_array_equal(retrieval_embedding(out, normalize=False), out.post_bn)

    # Eval mode: a sample's output does not depend on the rest of the batch.
    eval_model = nnx.view(tiny_model, use_running_average=True)
    in_place = nnx.clone(tiny_model)
    in_place.eval()  # the in-place alternative to nnx.view
    assert in_place.backbone.layer2[1].bn3.use_running_average
    assert in_place.bnneck.bn.use_running_average
    assert in_place.backbone.nl2[0].w_bn.use_running_average
    assert not tiny_model.bnneck.bn.use_running_average
    full = _forward(eval_model, images)
    single = _forward(eval_model, images[:1])
    np.testing.assert_allclose(single.post_bn[0], full.post_bn[0], rtol=1e-4, atol=1e-5)
    # Train mode (batch statistics) does depend on it.
    train_single = _forward(tiny_model, images[:2])
    assert not np.allclose(train_single.post_bn[0], out.post_bn[0], atol=1e-3)


def test_jitted_train_step_updates_batch_stats_not_frozen_bias(tiny_model):
    model = nnx.clone(tiny_model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert not any("bnneck" in p and "bias" in p for p, _ in nnx.to_flat_state(params))
    frozen = nnx.state(model, FrozenParam)
    assert [p for p, _ in nnx.to_flat_state(frozen)] == [("bnneck", "bias")]

    tx = optax.sgd(0.1)
    opt_state = tx.init(params)
    images = jax.random.normal(jax.random.key(2), (4, 32, 16, 3))
    labels = jnp.array([0, 1, 2, 3])

    @jax.jit
    def train_step(params, rest, opt_state):
        def loss_fn(params):
            # copy=True: fresh Variables at this trace level, so BN may update its stats.
            m = nnx.merge(graphdef, params, rest, copy=True)
            out = m(images)  # train mode: batch statistics, running averages updated
            loss = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels).mean()
            return loss, nnx.state(m, nnx.Not(nnx.Param))

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, loss, grads

    new_params, new_rest, _, loss, grads = train_step(params, rest, opt_state)
    assert np.isfinite(loss)
    assert float(jnp.abs(grads["gem"]["p"][...]).max()) > 0
    old_mean = rest["backbone"]["bn1"]["mean"][...]
    assert not np.allclose(new_rest["backbone"]["bn1"]["mean"][...], old_mean)
    np.testing.assert_array_equal(new_rest["bnneck"]["bias"][...], 0.0)
    assert not np.allclose(new_params["bnneck"]["bn"]["scale"][...], 1.0)


def test_bf16_option_runs_and_tracks_float32():
    images = jax.random.normal(jax.random.key(3), (2, 64, 32, 3))
    f32 = AGW(5, **TINY, rngs=nnx.Rngs(7))
    bf16 = AGW(5, **TINY, dtype="bfloat16", rngs=nnx.Rngs(7))
    params = nnx.state(bf16, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    out16 = _forward(nnx.view(bf16, use_running_average=True), images)
    out32 = _forward(nnx.view(f32, use_running_average=True), images)
    assert out16.feature_map.dtype == jnp.bfloat16
    assert out16.post_bn.dtype == out16.logits.dtype == jnp.float32
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in out16)
    cos = jnp.sum(retrieval_embedding(out16) * retrieval_embedding(out32), axis=1)
    assert float(cos.min()) > 0.99


def test_float64_model_needs_64_bit_jax_and_is_float64_throughout():
    with pytest.raises(ValueError, match=r"model dtype 'float64' needs 64-bit JAX"):
        AGW(5, **TINY, dtype="float64", rngs=nnx.Rngs(0))
    with jax.enable_x64(True):
        model = nnx.eval_shape(lambda: AGW(5, **TINY, dtype="float64", rngs=nnx.Rngs(0)))
        assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.float64)}
        out = nnx.eval_shape(lambda m, x: m(x), model,
                             jax.ShapeDtypeStruct((2, 64, 32, 3), jnp.float32))
        assert {x.dtype for x in out} == {jnp.dtype(jnp.float64)}


def test_from_config_and_errors():
    config = ml_collections.ConfigDict({"model": default_model_config()})
    config.model.width = 8
    config.model.blocks = (1, 1, 1, 1)
    config.model.non_local = (0, 1, 1, 0)
    config.model.stem_relu = True
    config.model.gem_p = 2.5
    model = AGW.from_config(config, 3, nnx.Rngs(0))
    assert model.feature_dim == 256 and model.backbone.stem_relu
    assert model.classifier.kernel.shape == (256, 3)
    np.testing.assert_allclose(model.gem.p[...], [2.5])
    defaults = default_model_config()
    assert defaults.width == 64 and tuple(defaults.blocks) == (3, 4, 6, 3)
    assert tuple(defaults.non_local) == (0, 2, 3, 0) and defaults.last_stride == 1
    assert defaults.nl_inter_channels_reference and not defaults.stem_relu

    with pytest.raises(ValueError, match="no 'model' section"):
        AGW.from_config(ml_collections.ConfigDict({"data": {}}), 3, nnx.Rngs(0))
    with pytest.raises(ValueError, match="dtype"):
        AGW(3, **TINY, dtype="float16", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"non_local\[1\]=3 exceeds blocks\[1\]=2"):
        AGW(3, width=8, blocks=(1, 2, 2, 1), non_local=(0, 3, 0, 0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="4 non-negative ints"):
        ResNet(width=8, blocks=(1, 1, 1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, 64, 32)))


def test_retrieval_embedding_choices_against_numpy():
    rng = np.random.default_rng(4)
    pre, post = (rng.normal(size=(3, 6)).astype(np.float32) * 2 for _ in range(2))
    post[2] = 0.0  # a zero row stays zero (norm clamped at 1e-12, as torch's normalize)
    out = AGWOutputs(feature_map=jnp.zeros((3, 1, 1, 6)), pre_bn=jnp.asarray(pre),
                     post_bn=jnp.asarray(post), logits=jnp.zeros((3, 2)))

    def unit(x):
        x = x.astype(np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    np.testing.assert_allclose(retrieval_embedding(out), unit(post), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(retrieval_embedding(out, feature="pre_bn"), unit(pre), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_array_equal(retrieval_embedding(out, False, feature="pre_bn"), pre)
    np.testing.assert_array_equal(retrieval_embedding(out)[2], 0.0)
    assert retrieval_embedding(out).dtype == jnp.float32
    with pytest.raises(ValueError, match=r"retrieval feature must be one of \('post_bn', "
                                         r"'pre_bn'\), got 'logits'"):
        retrieval_embedding(out, feature="logits")

    # The model applies the settings of config.model (defaults: post-BN, L2-normalised).
    defaults = default_model_config()
    assert defaults.retrieval_feature == "post_bn" and defaults.normalize_feature is True
    assert RETRIEVAL_FEATURES == ("post_bn", "pre_bn")
    config = ml_collections.ConfigDict({"model": {**TINY, "retrieval_feature": "pre_bn",
                                                  "normalize_feature": False}})
    model = AGW.from_config(config, 3, nnx.Rngs(0))
    assert (model.retrieval_feature, model.normalize_feature) == ("pre_bn", False)
    np.testing.assert_array_equal(model.retrieval_embedding(out), pre)
    default = AGW(3, **TINY, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(default.retrieval_embedding(out), unit(post), rtol=1e-6,
                               atol=1e-7)
    # Static (graphdef) values: they survive split / merge, nnx.view and eval_shape.
    graphdef, state = nnx.split(nnx.view(model, use_running_average=True))
    assert nnx.merge(graphdef, state).retrieval_feature == "pre_bn"
    abstract = nnx.eval_shape(lambda: AGW.from_config(config, 3, nnx.Rngs(0)))
    assert abstract.retrieval_feature == "pre_bn" and abstract.normalize_feature is False
    with pytest.raises(ValueError, match="config.model.retrieval_feature must be one of"):
        AGW(3, **TINY, retrieval_feature="post", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="config.model.normalize_feature must be a bool"):
        AGW(3, **TINY, normalize_feature="yes", rngs=nnx.Rngs(0))


def test_init_scales():
    model = AGW(500, width=8, blocks=(1, 1, 1, 1), non_local=(0, 0, 0, 0), rngs=nnx.Rngs(0))
    std = float(np.std(model.classifier.kernel[...]))
    assert 0.0009 < std < 0.0011  # N(0, 0.001^2)
    assert model.classifier.bias is None
    np.testing.assert_array_equal(model.gem.p[...], [3.0])
    np.testing.assert_array_equal(model.bnneck.bn.scale[...], 1.0)
    # Kaiming normal, fan-out: std sqrt(2 / (k*k*out)); conv3 of layer1 is 1x1, 8 -> 32.
    kernel = model.backbone.layer1[0].conv3.kernel[...]
    assert kernel.shape == (1, 1, 8, 32)
    assert 0.6 < float(np.std(kernel)) / np.sqrt(2 / 32) < 1.4


@pytest.mark.parametrize("scale,mode,distribution", [
    (2.0, "fan_out", "normal"),  # the ResNet's convolutions
    (1.0 / 3.0, "fan_in", "uniform"),  # the non-local blocks' convolutions
    (1.0, "fan_in", "normal"),
])
def test_flat_variance_scaling_equals_jax_bit_for_bit(scale, mode, distribution):
    ours = initializers.variance_scaling(scale, mode, distribution)
    theirs = jax.nn.initializers.variance_scaling(scale, mode, distribution)
    key = jax.random.key(3)
    for shape in [(3, 3, 16, 16), (1, 1, 16, 64), (512, 60)]:
        np.testing.assert_array_equal(ours(key, shape, jnp.float32),
                                      theirs(key, shape, jnp.float32))
    shape = (3, 1, 5, 2)
    # Under jit XLA fuses the draw and may round its last bit otherwise, for both alike.
    np.testing.assert_array_equal(jax.jit(ours, static_argnums=(1, 2))(key, shape),
                                  jax.jit(theirs, static_argnums=(1, 2))(key, shape))
    keys = jax.random.split(key, 3)
    np.testing.assert_array_equal(jax.vmap(lambda k: ours(k, shape))(keys),
                                  jax.vmap(lambda k: theirs(k, shape))(keys))
    with jax.enable_x64(True):
        np.testing.assert_array_equal(ours(key, (3, 3, 4, 8), jnp.float64),
                                      theirs(key, (3, 3, 4, 8), jnp.float64))
    # The statistics the reference asks for, on a large kernel.
    w = np.asarray(ours(key, (3, 3, 64, 64)), np.float64)
    fan = 9 * 64
    if distribution == "normal":
        assert abs(w.std() / np.sqrt(scale / fan) - 1) < 0.03
    else:
        bound = np.sqrt(3 * scale / fan)
        assert np.abs(w).max() <= bound and abs(w.std() / (bound / np.sqrt(3)) - 1) < 0.03


def test_flat_variance_scaling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        initializers.variance_scaling(1.0, "fan_avg", "normal")
    with pytest.raises(ValueError, match="distribution must be one of"):
        initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    with pytest.raises(ValueError, match=r"at least 2 dimensions \[..., in, out\], got shape "
                                         r"\(7,\)"):
        initializers.variance_scaling(1.0, "fan_in", "normal")(jax.random.key(0), (7,))
    assert initializers.fans((3, 3, 16, 32)) == (144, 288)


# ---------------------------------------------------------------- parts vs float64 references


def test_gem_matches_numpy_reference_and_p_gradient():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)  # negatives get clamped to 1e-6
    for p in (3.0, 2.3, 1.0):
        x64 = np.maximum(x.astype(np.float64), 1e-6)
        ref = np.mean(x64**p, axis=(1, 2)) ** (1 / p)
        np.testing.assert_allclose(gem_pool(jnp.asarray(x), jnp.array([p])), ref, rtol=1e-5)
        gem = GeM(p)
        np.testing.assert_allclose(gem(jnp.asarray(x)), ref, rtol=1e-5)

    # d/dp of sum(GeM) against the analytic float64 derivative.
    p = 3.0
    x64 = np.maximum(x.astype(np.float64), 1e-6)
    m = np.mean(x64**p, axis=(1, 2))
    dm = np.mean(x64**p * np.log(x64), axis=(1, 2))
    y = m ** (1 / p)
    dy = y * (dm / (p * m) - np.log(m) / p**2)
    grad = nnx.grad(lambda g: jnp.sum(g(jnp.asarray(x))))(GeM(p))
    np.testing.assert_allclose(grad["p"][...], [dy.sum()], rtol=1e-4)
    with pytest.raises(ValueError, match="p must be > 0"):
        GeM(0.0)


def _nonlocal_reference(x, block: NonLocal, use_running_average: bool) -> np.ndarray:
    """Float64 numpy z = BN(W (theta phi^T / N) g) + x with the explicit [N, N] matrix."""
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    flat = x.reshape(b, h * w, c)

    def conv(layer):
        return flat @ np.asarray(layer.kernel[...], np.float64)[0, 0] + np.asarray(
            layer.bias[...], np.float64)

    g, theta, phi = conv(block.g), conv(block.theta), conv(block.phi)
    f = theta @ np.transpose(phi, (0, 2, 1)) / (h * w)
    y = f @ g
    wy = y @ np.asarray(block.w_conv.kernel[...], np.float64)[0, 0] + np.asarray(
        block.w_conv.bias[...], np.float64)
    if use_running_average:
        mean, var = (np.asarray(block.w_bn.mean[...], np.float64),
                     np.asarray(block.w_bn.var[...], np.float64))
    else:
        mean, var = wy.mean(axis=(0, 1)), wy.var(axis=(0, 1))
    bn = (wy - mean) / np.sqrt(var + 1e-5) * np.asarray(block.w_bn.scale[...]) + np.asarray(
        block.w_bn.bias[...])
    return (bn + flat).reshape(b, h, w, c)


@pytest.mark.parametrize("reference_inter_channels", [True, False])
def test_non_local_identity_at_init_and_formula(reference_inter_channels):
    block = NonLocal(6, reference_inter_channels=reference_inter_channels, rngs=nnx.Rngs(0))
    assert block.inter_channels == (1 if reference_inter_channels else 3)
    x = jax.random.normal(jax.random.key(0), (2, 4, 3, 6))
    np.testing.assert_array_equal(block(x), x)  # W's BN starts at zero: the identity
    np.testing.assert_array_equal(nnx.view(block, use_running_average=True)(x), x)

    rng = np.random.default_rng(1)
    block.w_bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32)
    block.w_bn.bias[...] = jnp.asarray(rng.normal(size=6) * 0.1, jnp.float32)
    block.w_bn.mean[...] = jnp.asarray(rng.normal(size=6) * 0.1, jnp.float32)
    block.w_bn.var[...] = jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32)
    eval_out = nnx.view(block, use_running_average=True)(x)
    np.testing.assert_allclose(eval_out, _nonlocal_reference(x, block, True),
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(eval_out, x, atol=1e-3)
    # Batch statistics of a 1-channel y: the normalisation amplifies float32 rounding.
    train_ref = _nonlocal_reference(x, block, False)
    np.testing.assert_allclose(block(x), train_ref, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match=r"expects \[B, H, W, 6\]"):
        block(jnp.zeros((2, 4, 3, 5)))


def test_bnneck_eval_uses_running_stats_train_updates_them():
    rng = np.random.default_rng(0)
    neck = BNNeck(4, rngs=nnx.Rngs(0))
    mean, var = rng.normal(size=4), rng.uniform(0.5, 2.0, 4)
    scale, bias = rng.uniform(0.5, 1.5, 4), rng.normal(size=4) * 0.1
    neck.bn.mean[...], neck.bn.var[...] = jnp.asarray(mean, jnp.float32), jnp.asarray(
        var, jnp.float32)
    neck.bn.scale[...] = jnp.asarray(scale, jnp.float32)
    neck.bias[...] = jnp.asarray(bias, jnp.float32)
    x = rng.normal(size=(6, 4)).astype(np.float32) * 3 + 1

    eval_ref = (x.astype(np.float64) - mean) / np.sqrt(var + 1e-5) * scale + bias
    np.testing.assert_allclose(nnx.view(neck, use_running_average=True)(jnp.asarray(x)),
                               eval_ref, rtol=1e-5, atol=1e-5)

    bm, bv = x.astype(np.float64).mean(0), x.astype(np.float64).var(0)
    train_ref = (x - bm) / np.sqrt(bv + 1e-5) * scale + bias
    np.testing.assert_allclose(neck(jnp.asarray(x)), train_ref, rtol=1e-4, atol=1e-5)
    # torch momentum 0.1 == flax momentum 0.9; the running variance takes the *unbiased* batch
    # variance, as torch's (the forward pass above normalised with the biased one).
    np.testing.assert_allclose(neck.bn.mean[...], 0.9 * mean + 0.1 * bm, rtol=1e-5)
    np.testing.assert_allclose(neck.bn.var[...], 0.9 * var + 0.1 * bv * 6 / 5, rtol=1e-5)
    np.testing.assert_allclose(neck.bias[...], bias, rtol=1e-6)  # untouched
    assert neck.bn.bias is None
    assert not isinstance(neck.bias, nnx.Param)


def test_attribute_head_matches_numpy_and_has_no_bias():
    head = AttributeHead(16, rngs=nnx.Rngs(0))
    state = nnx.state(head)
    assert [p for p, _ in nnx.to_flat_state(state)] == [("kernel",)]
    assert head.kernel.shape == (16, 30) and isinstance(head.kernel, nnx.Param)
    f = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    out = head(jnp.asarray(f))
    logits = f.astype(np.float64) @ np.asarray(head.kernel[...], np.float64)
    np.testing.assert_allclose(out.logits, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.probabilities, 1 / (1 + np.exp(-logits)), rtol=1e-5)
    assert out.logits.shape == out.probabilities.shape == (5, 30)
    with pytest.raises(ValueError, match=r"expects embeddings \[B, 16\]"):
        head(jnp.zeros((5, 8)))
    with pytest.raises(ValueError, match="embedding_dim"):
        AttributeHead(0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kernel,stride,padding", [
    (1, 1, ((0, 0), (0, 0))), (1, 2, ((0, 0), (0, 0))), (1, 2, "SAME"), (1, 1, "VALID"),
    (3, 2, ((1, 1), (1, 1))),  # not 1x1: lax's own convolution
    (1, 1, ((1, 1), (0, 0))),  # padded 1x1: lax's own convolution
])
def test_conv_as_matrix_product_equals_lax_values_and_gradients(kernel, stride, padding):
    """``models.conv.conv_general_dilated`` (what the backbone's convs call) is
    ``lax.conv_general_dilated`` in float64, output and both gradients, odd sizes included."""
    from jax import lax

    from reid_jax.models import conv

    rng = np.random.default_rng(kernel * 10 + stride)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, 13, 9, 5)))
        w = jnp.asarray(rng.standard_normal((kernel, kernel, 5, 7)))
        dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

        def loss(fn, x, w):
            return jnp.sum(jnp.sin(fn(x, w, (stride, stride), padding, dimension_numbers=dn)))

        want = lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn)
        got = jax.jit(lambda x, w: conv.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=dn))(x, w)
        assert got.shape == want.shape and got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        grads_want = jax.grad(lambda x, w: loss(lax.conv_general_dilated, x, w), (0, 1))(x, w)
        grads_got = jax.grad(lambda x, w: loss(conv.conv_general_dilated, x, w), (0, 1))(x, w)
        for g, r in zip(grads_got, grads_want, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)


def test_backbone_convs_use_the_matrix_product_form():
    """Every conv of the ResNet and the non-local blocks calls the project's conv function."""
    from reid_jax.models import conv

    model = ResNet(width=4, blocks=(1, 1, 1, 1), non_local=(0, 1, 0, 0), rngs=nnx.Rngs(0))
    convs = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)]
    assert len(convs) >= 10
    assert all(c.conv_general_dilated is conv.conv_general_dilated for c in convs)


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 13, 9, 5), (3, 3), (2, 2), ((1, 1), (1, 1))),  # the stem's pool, odd sizes
    ((2, 16, 8, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((1, 7, 6, 2), (2, 3), (1, 2), ((0, 1), (2, 0))),
    ((3, 5, 5, 1), (5, 5), (1, 1), ((0, 0), (0, 0))),  # one window
])
def test_max_pool_as_slices_equals_reduce_window_values_and_gradients(shape, window, strides,
                                                                     padding):
    """``models.pool.max_pool`` (the stem's pool) is ``nnx.max_pool`` in float64: output and
    input gradient, under jit and vmap."""
    from reid_jax.models import pool

    rng = np.random.default_rng(sum(shape))
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal(shape))

        def ref(x):
            return nnx.max_pool(x, window, strides=strides, padding=padding)

        def got(x):
            return pool.max_pool(x, window, strides, padding)

        want = ref(x)
        out = jax.jit(got)(x)
        assert out.shape == want.shape and out.dtype == jnp.float64
        np.testing.assert_array_equal(out, want)
        w = jnp.asarray(rng.standard_normal(want.shape))
        g_want = jax.grad(lambda x: jnp.sum(ref(x) * w))(x)
        g_got = jax.jit(jax.grad(lambda x: jnp.sum(got(x) * w)))(x)
        np.testing.assert_allclose(g_got, g_want, rtol=1e-12, atol=1e-12)
        batched = jax.vmap(lambda x: got(x[None])[0])(x)
        np.testing.assert_array_equal(batched, want)


def test_max_pool_splits_the_gradient_between_tied_maxima_and_rejects_bad_shapes():
    from reid_jax.models import pool

    x = jnp.zeros((1, 2, 2, 1)).at[0, 0, 0, 0].set(1.0).at[0, 1, 1, 0].set(1.0)
    g = jax.grad(lambda x: jnp.sum(pool.max_pool(x, (2, 2), (2, 2), ((0, 0), (0, 0)))))(x)
    np.testing.assert_allclose(g[0, :, :, 0], [[0.5, 0.0], [0.0, 0.5]])
    with pytest.raises(ValueError, match=r"NHWC input \[B, H, W, C\], got shape \(4, 4\)"):
        pool.max_pool(jnp.zeros((4, 4)), (3, 3), (2, 2), ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match=r"window \(5, 5\) is larger than the padded input"):
        pool.max_pool(jnp.zeros((1, 2, 2, 1)), (5, 5), (1, 1), ((1, 1), (1, 1)))


def test_stem_batch_chunks_by_backend_and_image_size():
    from reid_jax.models import conv

    assert conv.stem_batch_chunk((32, 128, 64, 3), backend="cpu") == 16
    assert conv.stem_batch_chunk((64, 256, 128, 3), backend="cpu") == 4
    assert conv.stem_batch_chunk((2, 1024, 1024, 3), backend="cpu") == 1
    assert conv.stem_batch_chunk((8, 128, 64, 3), backend="cpu") == 8
    assert conv.stem_batch_chunk((64, 256, 128, 3), backend="gpu") == 64
    x = jnp.arange(7 * 2, dtype=jnp.float32).reshape(7, 2)
    calls = []

    def f(a):
        calls.append(a.shape[0])
        return a * 2.0

    np.testing.assert_array_equal(conv.in_batch_chunks(f, x, 3), x * 2.0)
    assert calls == [3, 3, 1]
    with pytest.raises(ValueError, match="chunk must be >= 1, got 0"):
        conv.in_batch_chunks(f, x, 0)


def test_resnet_with_the_stem_in_batch_chunks_equals_one_convolution(monkeypatch):
    """The stem's convolution over batch chunks (what the CPU gets) gives the same features and
    parameter gradients as one convolution, in float64, with an uneven last chunk."""
    from reid_jax.models import conv

    with jax.enable_x64(True):
        model = ResNet(width=4, blocks=(1, 1, 1, 1), non_local=(0, 1, 0, 0),
                       dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        x = jnp.asarray(np.random.default_rng(0).standard_normal((7, 32, 16, 3)))
        results = {}
        for name, pixels, chunk in (("one", 10**9, 7), ("chunks", 3 * 32 * 16, 3)):
            monkeypatch.setattr(conv, "CPU_STEM_CHUNK_PIXELS", pixels)
            assert conv.stem_batch_chunk(x.shape, backend="cpu") == chunk
            frozen = nnx.clone(model)
            frozen.eval()
            eqns = jax.make_jaxpr(frozen)(x).jaxpr.eqns
            stem_convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"
                          and e.invars[1].aval.shape[:2] == (7, 7)]
            assert len(stem_convs) == -(-7 // chunk)

            def loss(model):  # train mode: BatchNorm normalises with the batch's statistics
                return jnp.sum(jnp.tanh(model(x)))

            # A new function per setting: jit traces it afresh with the patched chunk size.
            results[name] = nnx.jit(nnx.value_and_grad(loss))(nnx.clone(model))
        (v1, g1), (v2, g2) = results["one"], results["chunks"]
        np.testing.assert_allclose(v2, v1, rtol=1e-12)
        for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
