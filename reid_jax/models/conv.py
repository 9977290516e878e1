"""The backbone's convolutions in forms with faster gradients on the CPU (the same functions):
1x1 convolutions as matrix products, and the stem's convolution over chunks of the batch
(:func:`stem_batch_chunk`, :func:`in_batch_chunks`).

``nnx.Conv`` calls its ``conv_general_dilated`` attribute; the backbone's convs get
:func:`conv_general_dilated` here instead of ``jax.lax``'s. For a 1x1 kernel in the NHWC/HWIO
layout without padding, dilation or feature groups it computes ``x[:, ::s, ::s] @ kernel[0, 0]``;
every other case goes to ``lax.conv_general_dilated`` unchanged. The result is the same function
of the same ``[1, 1, Cin, Cout]`` kernel (tested against ``lax`` in float64, values and
gradients), so parameters, checkpoints and the PyTorch importer are untouched. The reason is the
gradient: XLA's CPU backend computes a convolution's kernel gradient as another convolution over
the batch, about twice as slow as the matrix product that a product's gradient is; on 2 CPU cores
this makes a training step of the demo model 8-10 % faster (docs/training.md, "1x1 convolutions
as matrix products"). GPUs lower 1x1 convolutions to matrix products themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def _is_pointwise(lhs: jax.Array, rhs: jax.Array, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count: int, kwargs: dict) -> bool:
    """A 1x1 kernel, NHWC input, HWIO kernel, nothing padded, dilated, grouped or sharded."""
    if lhs.ndim != 4 or rhs.ndim != 4 or rhs.shape[:2] != (1, 1) or feature_group_count != 1:
        return False
    if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
        return False
    if any(v is not None for v in kwargs.values()):  # out_sharding, preferred_element_type
        return False
    # 'SAME' and 'VALID' pad nothing around a 1x1 kernel.
    if not (padding in ("SAME", "VALID") if isinstance(padding, str)
            else all(tuple(p) == (0, 0) for p in padding)):
        return False
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]], lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         precision=None, **kwargs) -> jax.Array:
    """``lax.conv_general_dilated``, with a plain 1x1 convolution as a matrix product.

    Shapes (1x1 case): ``lhs [B, H, W, Cin]``, ``rhs [1, 1, Cin, Cout]`` ->
    ``[B, ceil(H / sh), ceil(W / sw), Cout]``, as ``lax.conv_general_dilated`` gives.
    """
    if _is_pointwise(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count, kwargs):
        sh, sw = window_strides
        return jnp.einsum("bhwc,co->bhwo", lhs[:, ::sh, ::sw, :], rhs[0, 0], precision=precision)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision, **kwargs)


# The stem's convolution on the CPU runs over chunks of the batch of at most this many pixels
# (16 images of 128 x 64): see :func:`stem_batch_chunk`.
CPU_STEM_CHUNK_PIXELS = 16 * 128 * 64


def stem_batch_chunk(images: tuple[int, ...], backend: str | None = None) -> int:
    """Images per chunk for the stem's convolution of a batch of ``images [B, H, W, C]``.

    On the CPU backend ``max(1, CPU_STEM_CHUNK_PIXELS // (H * W))`` (16 images of 128 x 64, 4 of
    256 x 128) but at most ``B``; elsewhere ``B`` (one convolution). XLA's CPU backend computes
    the kernel gradient of the 7x7/2 stem over a large batch several times slower per image than
    over a small one (measured: 58 ms for 32 images of 128 x 64 at once, 28 ms in two chunks of 16;
    docs/training.md, "The stem's convolution in batch chunks").
    """
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return images[0]
    return min(images[0], max(1, CPU_STEM_CHUNK_PIXELS // (images[1] * images[2])))


def in_batch_chunks(fn, x: jax.Array, chunk: int) -> jax.Array:
    """``fn(x)`` for ``x [B, ...]`` computed over consecutive chunks of at most ``chunk`` items
    and concatenated along the batch axis (the same values when ``fn`` treats items apart)."""
    if chunk < 1:
        raise ValueError(f"in_batch_chunks: chunk must be >= 1, got {chunk}")
    if x.shape[0] <= chunk:
        return fn(x)
    return jnp.concatenate([fn(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])


__all__ = ["CPU_STEM_CHUNK_PIXELS", "conv_general_dilated", "in_batch_chunks",
           "stem_batch_chunk"]
