"""Kernel initialisers that draw their samples over the flattened shape (docs/training.md,
"Initialisation drawn flat").

XLA's CPU compiler takes seconds to compile a random draw of some 4-D shapes (2.6 s for a
``[3, 3, 16, 16]`` kernel, 0.4 s for the same 2,304 numbers drawn as a vector), and a model
built eagerly compiles one draw per distinct kernel shape. JAX's threefry generator numbers the
samples by their row-major position when ``jax_threefry_partitionable`` is on (the default), so
a flat draw reshaped *is* the draw of the shape: :func:`variance_scaling` returns bit for bit
what ``jax.nn.initializers.variance_scaling`` returns, only faster to compile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DISTRIBUTIONS = ("normal", "uniform")
MODES = ("fan_in", "fan_out")


def fans(shape: Sequence[int]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a kernel ``[..., in, out]`` (a conv's ``[kh, kw, in, out]`` or a
    dense ``[in, out]``): the input / output features times the receptive field."""
    if len(shape) < 2:
        raise ValueError(f"a kernel has at least 2 dimensions [..., in, out], got shape "
                         f"{tuple(shape)}")
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def variance_scaling(scale: float, mode: str, distribution: str) -> nnx.Initializer:
    """``jax.nn.initializers.variance_scaling(scale, mode, distribution)`` for kernels
    ``[..., in, out]``, drawn over the flattened shape (the same values; module docstring).

    Args:
      scale: variance ``scale / fan``.
      mode: ``fan_in`` or ``fan_out``.
      distribution: ``normal`` (``N(0, scale / fan)``) or ``uniform`` (``U(-b, b)``,
        ``b = sqrt(3 scale / fan)``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        shape = tuple(int(s) for s in shape)
        fan_in, fan_out = fans(shape)
        variance = jnp.array(scale / (fan_in if mode == "fan_in" else fan_out), dtype=dtype)
        size = (math.prod(shape),)
        if distribution == "normal":
            flat = jax.random.normal(key, size, dtype) * jnp.sqrt(variance)
        else:
            flat = jax.random.uniform(key, size, dtype, -1) * jnp.sqrt(3 * variance)
        return flat.reshape(shape)

    return init


__all__ = ["DISTRIBUTIONS", "MODES", "fans", "variance_scaling"]
