"""The non-local block of AGW (Wang et al. 2018, as the ReID-Survey reference code has it).

Embedded Gaussian *without* softmax ("dot product" form), on an NHWC map ``x [B, H, W, C]``::

    g, theta, phi = conv1x1(x)                     # each [B, N, Ci], N = H * W
    f = theta @ phi^T / N                          # [B, N, N]
    y = f @ g                                      # [B, N, Ci]
    z = BN(W y) + x                                # W = conv1x1 (Ci -> C) + BatchNorm

W's BatchNorm has scale and bias initialised to zero, so a fresh block is the identity.

Since there is no softmax, ``y = theta @ (phi^T @ g) / N`` is the same product; we evaluate it in
that order (cost ``O(N Ci^2)`` instead of ``O(N^2 Ci)``, no ``[N, N]`` matrix is formed).

Reference quirk: its ``inter_channels = reduc_ratio // reduc_ratio`` is always 1 (the textbook
value is ``C // 2``). ``reference_inter_channels=True`` (the default) reproduces it so the
reference's checkpoints load.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from reid_jax.models import conv, initializers
from reid_jax.models.batch_norm import BatchNorm

# Torch's default init of ``nn.Conv2d`` (kaiming_uniform with a = sqrt(5) for the weight,
# uniform(+-1/sqrt(fan_in)) for the bias): the reference never re-initialises its non-local
# convs and ImageNet checkpoints have none, so this is how AGW's blocks start training.
_torch_default_kernel_init = initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_default_bias_init(fan_in: int) -> nnx.Initializer:
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def inter_channels_for(channels: int, reference_inter_channels: bool) -> int:
    """Inter channels ``Ci`` of a block on ``channels`` inputs: 1 (reference) or ``C // 2``."""
    if reference_inter_channels:
        return 1
    if channels < 2:
        raise ValueError(f"non-local block needs >= 2 channels for C // 2, got {channels}")
    return channels // 2


class NonLocal(nnx.Module):
    """Non-local block ``z = BN(W (theta phi^T / N) g) + x`` on ``[B, H, W, C]`` maps.

    Attribute names follow the reference's keys: ``g``, ``theta``, ``phi`` (1x1 convs with bias,
    ``C -> Ci``), ``w_conv`` (``W.0``, 1x1 conv ``Ci -> C`` with bias) and ``w_bn`` (``W.1``).
    """

    def __init__(
        self,
        channels: int,
        *,
        reference_inter_channels: bool = True,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.channels = channels
        self.inter_channels = inter_channels_for(channels, reference_inter_channels)

        def conv1x1(cin: int, cout: int) -> nnx.Conv:
            return nnx.Conv(
                cin, cout, (1, 1), padding="VALID", use_bias=True, dtype=dtype,
                param_dtype=param_dtype, kernel_init=_torch_default_kernel_init,
                bias_init=_torch_default_bias_init(cin),
                conv_general_dilated=conv.conv_general_dilated, rngs=rngs,
            )

        ci = self.inter_channels
        self.g = conv1x1(channels, ci)
        self.theta = conv1x1(channels, ci)
        self.phi = conv1x1(channels, ci)
        self.w_conv = conv1x1(ci, channels)
        self.w_bn = BatchNorm(
            channels, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
            scale_init=nnx.initializers.zeros, bias_init=nnx.initializers.zeros, rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> z [B, H, W, C]``."""
        if x.ndim != 4 or x.shape[-1] != self.channels:
            raise ValueError(
                f"NonLocal({self.channels}) expects [B, H, W, {self.channels}], got {x.shape}"
            )
        b, h, w, _ = x.shape
        n = h * w
        ci = self.inter_channels
        g = self.g(x).reshape(b, n, ci)
        theta = self.theta(x).reshape(b, n, ci)
        phi = self.phi(x).reshape(b, n, ci)
        # y = (theta phi^T / N) g, evaluated as theta (phi^T g) / N.
        phi_g = jnp.einsum("bnc,bnd->bcd", phi, g) / n
        y = jnp.einsum("bnc,bcd->bnd", theta, phi_g).reshape(b, h, w, ci)
        return self.w_bn(self.w_conv(y)) + x
