"""The stem's max pool as a maximum of strided slices (the same function, a faster gradient on
the CPU).

``nnx.max_pool`` is ``lax.reduce_window``; its gradient in XLA is a select-and-scatter that the
CPU backend lowers to an argmax reduce-window over four index tensors and a scatter, about a sixth
of a CPU training step of the demo model (docs/training.md, "The stem's max pool as slices").
:func:`max_pool` takes the maximum of the window's shifted, strided views of the padded input, row
offsets first, then column offsets; its gradient is a chain of elementwise selects. Values are
``nnx.max_pool``'s exactly; gradients are too wherever a window's maximum is unique. Where two
entries of a window are exactly equal and largest, the gradient is split between them (JAX's rule
for ``max``) instead of going to one of them: both are valid subgradients. In the stem such ties
come from flat image regions, where the tied entries are the convolution of identical patches:
there the parameters' gradients (conv kernel, BatchNorm) depend only on the ties' total and are
the same either way; only the gradient with respect to the image differs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _window_max(x: jax.Array, axis: int, size: int, stride: int, out: int) -> jax.Array:
    """Maximum over ``size`` offsets along ``axis``: ``y[o] = max_k x[o * stride + k]``."""
    def view(k: int) -> jax.Array:
        return jax.lax.slice_in_dim(x, k, k + (out - 1) * stride + 1, stride, axis=axis)
    return functools.reduce(jnp.maximum, (view(k) for k in range(1, size)), view(0))


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """``nnx.max_pool(x, window, strides, padding)`` for NHWC ``x [B, H, W, C]`` with explicit
    padding (padded entries are ``-inf``, as in PyTorch's ``MaxPool2d``).

    Returns ``[B, Ho, Wo, C]`` with ``Ho = (H + ph0 + ph1 - wh) // sh + 1`` (likewise ``Wo``).
    """
    if x.ndim != 4:
        raise ValueError(f"max_pool expects NHWC input [B, H, W, C], got shape {x.shape}")
    (wh, ww), (sh, sw) = window, strides
    (ph0, ph1), (pw0, pw1) = padding
    h, w = x.shape[1] + ph0 + ph1, x.shape[2] + pw0 + pw1
    if h < wh or w < ww:
        raise ValueError(f"max_pool: window {window} is larger than the padded input "
                         f"{(h, w)} (input {x.shape})")
    fill = jnp.asarray(-jnp.inf, x.dtype)
    x = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)), constant_values=fill)
    x = _window_max(x, 1, wh, sh, (h - wh) // sh + 1)
    return _window_max(x, 2, ww, sw, (w - ww) // sw + 1)


__all__ = ["max_pool"]
