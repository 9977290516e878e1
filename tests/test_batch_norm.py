"""BatchNorm with torch's running statistics (reid_jax/models/batch_norm.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reid_jax.models.batch_norm import BatchNorm

torch = pytest.importorskip("torch")


def _pair(channels: int, dtype=jnp.float32, fast: bool = True):
    """Ours and ``nnx.BatchNorm`` with the same random scale, bias and running statistics."""
    rng = np.random.default_rng(channels)
    ours = BatchNorm(channels, dtype=dtype, use_fast_variance=fast, rngs=nnx.Rngs(0))
    flax = nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, dtype=dtype,
                         use_fast_variance=fast, rngs=nnx.Rngs(0))
    values = {"scale": rng.uniform(0.5, 1.5, channels), "bias": rng.normal(size=channels),
              "mean": rng.normal(size=channels), "var": rng.uniform(0.5, 2.0, channels)}
    for module in (ours, flax):
        for name, value in values.items():
            getattr(module, name)[...] = jnp.asarray(value, jnp.float32)
    return ours, flax


def _train_call(module, x):
    """One jitted train-mode call: (output, new mean, new var)."""
    graphdef, state = nnx.split(module)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        y = m(x)
        return y, m.mean[...], m.var[...]

    return run(state, x)


@pytest.mark.parametrize("shape", [(6, 5, 3, 4), (9, 4)])
@pytest.mark.parametrize("fast", [True, False])
def test_forward_is_nnx_batchnorm_running_var_is_unbiased(shape, fast):
    ours, flax = _pair(shape[-1], fast=fast)
    x = jnp.asarray(np.random.default_rng(1).normal(2.0, 3.0, shape), jnp.float32)
    n = int(np.prod(shape[:-1]))
    mean0, var0 = np.asarray(ours.mean[...]), np.asarray(ours.var[...])
    y, mean, var = _train_call(ours, x)
    y_flax, mean_flax, var_flax = _train_call(flax, x)
    # The forward pass (biased batch variance) and the running mean are nnx.BatchNorm's, bit
    # for bit; only the running variance takes torch's n / (n - 1).
    np.testing.assert_array_equal(y, y_flax)
    np.testing.assert_array_equal(mean, mean_flax)
    biased = (np.asarray(var_flax, np.float64) - 0.9 * var0) / 0.1
    np.testing.assert_allclose(var, 0.9 * var0 + 0.1 * biased * n / (n - 1), rtol=1e-5)
    x64 = np.asarray(x, np.float64).reshape(n, -1)
    np.testing.assert_allclose(var, 0.9 * var0 + 0.1 * x64.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(mean, 0.9 * mean0 + 0.1 * x64.mean(0), rtol=1e-5, atol=1e-6)
    # Eval mode: the running statistics, as nnx.BatchNorm.
    np.testing.assert_array_equal(nnx.view(ours, use_running_average=True)(x),
                                  nnx.view(flax, use_running_average=True)(x))


def test_matches_torch_in_float64_over_steps():
    """Train twice, then eval: outputs and running statistics equal torch's BatchNorm2d."""
    rng = np.random.default_rng(2)
    batches = [rng.normal(1.0, 2.0, (4, 5, 3, 6)) for _ in range(2)]
    tbn = torch.nn.BatchNorm2d(6).double()
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, 6)))
        tbn.bias.copy_(torch.from_numpy(rng.normal(size=6)))
    with jax.enable_x64(True):
        ours = BatchNorm(6, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        assert ours.mean[...].dtype == ours.var[...].dtype == jnp.float64
        ours.scale[...] = jnp.asarray(tbn.weight.detach().numpy())
        ours.bias[...] = jnp.asarray(tbn.bias.detach().numpy())
        for x in batches:
            tbn.train()
            want = tbn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            y, mean, var = _train_call(ours, jnp.asarray(x))
            ours.mean[...], ours.var[...] = mean, var
            np.testing.assert_allclose(y, want.detach().numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(ours.mean[...], tbn.running_mean.numpy(), rtol=1e-13)
        np.testing.assert_allclose(ours.var[...], tbn.running_var.numpy(), rtol=1e-13)
        tbn.eval()
        want = tbn(torch.from_numpy(batches[0]).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        got = nnx.view(ours, use_running_average=True)(jnp.asarray(batches[0]))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=0, atol=1e-12)


def test_bfloat16_computes_in_bfloat16_keeps_float32_statistics():
    ours, flax = _pair(4, dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 2, 2, 4)), jnp.bfloat16)
    y, mean, var = _train_call(ours, x)
    y_flax, _, _ = _train_call(flax, x)
    assert y.dtype == jnp.bfloat16
    assert ours.scale[...].dtype == mean.dtype == var.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_flax, np.float32))


def test_one_value_per_channel_and_shape_errors():
    bn = BatchNorm(3, rngs=nnx.Rngs(0))
    bn(jnp.ones((1, 3)))  # n = 1: batch variance 0, no division by n - 1 = 0
    np.testing.assert_allclose(bn.var[...], 0.9)
    assert np.isfinite(np.asarray(bn.mean[...])).all()
    with pytest.raises(ValueError, match=r"BatchNorm\(3\) expects \[\.\.\., 3\], got shape "
                                         r"\(2, 4\)"):
        bn(jnp.ones((2, 4)))
