"""BatchNorm with PyTorch's running statistics: ``nnx.BatchNorm``, unbiased running variance.

Train mode normalises with the batch mean and the *biased* batch variance (``1/n``), as both
``nnx.BatchNorm`` and ``torch.nn.BatchNorm{1,2}d`` do, and updates the running averages with
torch's ``momentum`` 0.1 (Flax ``momentum`` 0.9)::

    running_mean <- 0.9 running_mean + 0.1 mean
    running_var  <- 0.9 running_var  + 0.1 var * n / (n - 1)     # n = values per channel

The one difference to ``nnx.BatchNorm`` is the factor ``n / (n - 1)``: torch stores the
*unbiased* batch variance in its running average, Flax the biased one. The reference AGW is
trained (and its checkpoints are written) with torch's rule, so eval-mode statistics only match
with it. ``n`` is the number of values each channel is averaged over: ``B`` for a ``[B, C]``
input (BNNeck), ``B * H * W`` for ``[B, H, W, C]`` (the global batch under data parallelism).
See docs/training.md, "BatchNorm statistics".

Everything else is ``nnx.BatchNorm``'s: the variables (``scale``, ``bias``: ``nnx.Param``;
``mean``, ``var``: ``nnx.BatchStat``), ``use_running_average`` / ``nnx.view``, the dtype rules
(statistics computed in at least float32, the output in ``dtype``) and ``use_fast_variance``.
The running statistics are stored in ``promote_types(param_dtype, float32)`` (float32, or
float64 for a float64 model).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones_init()


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` over the last axis with torch's running-variance update (module doc).

    Args:
      num_features: channels ``C`` (the last axis of the input).
      momentum: Flax convention (decay of the running average): 0.9 is torch's 0.1.
      epsilon: added to the variance (torch's ``eps``, 1e-5).
      dtype: compute dtype of the output (None: from the input and parameters).
      param_dtype: dtype of ``scale`` and ``bias``; the statistics use at least float32.
      use_bias, use_scale, bias_init, scale_init, use_fast_variance: as ``nnx.BatchNorm``.
      rngs: parameter initialisation keys.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: nnx.Initializer = _ZEROS,
        scale_init: nnx.Initializer = _ONES,
        use_fast_variance: bool = True,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            num_features, momentum=momentum, epsilon=epsilon, dtype=dtype,
            param_dtype=param_dtype, use_bias=use_bias, use_scale=use_scale,
            bias_init=bias_init, scale_init=scale_init, use_fast_variance=use_fast_variance,
            rngs=rngs,
        )
        stats_dtype = jnp.promote_types(param_dtype, jnp.float32)
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), stats_dtype))
        self.var = nnx.BatchStat(jnp.ones((num_features,), stats_dtype))

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """``x [..., C] -> [..., C]``; train mode also updates ``mean`` and ``var``.

        With one value per channel (``n = 1``, e.g. a shape check on a single image) the batch
        variance is 0 and so is its "unbiased" version (torch refuses to train on it).

        Raises:
          ValueError: ``x``'s last axis is not ``num_features``.
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError("BatchNorm: pass use_running_average, or use model.train() / "
                             "model.eval() / nnx.view(model, use_running_average=...)")
        if x.ndim < 1 or x.shape[-1] != self.num_features:
            raise ValueError(f"BatchNorm({self.num_features}) expects [..., {self.num_features}]"
                             f", got shape {x.shape}")
        axes = tuple(range(x.ndim - 1))
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        x, mean, var, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)
        if not use_running_average:
            n = math.prod(x.shape[a] for a in axes)
            mean, var = _batch_statistics(x, axes, self.dtype, self.use_fast_variance)
            unbiased = var * (n / max(n - 1, 1))
            self.mean[...] = jax.lax.stop_gradient(
                self.momentum * self.mean[...] + (1 - self.momentum) * mean)
            self.var[...] = jax.lax.stop_gradient(
                self.momentum * self.var[...] + (1 - self.momentum) * unbiased)
        # (x - mean) * (rsqrt(var + eps) * scale) + bias, in this order (nnx.BatchNorm's).
        y = x - mean
        mul = jax.lax.rsqrt(var + self.epsilon)
        args = [x]
        if scale is not None:
            mul = mul * scale
            args.append(scale)
        y = y * mul
        if bias is not None:
            y = y + bias
            args.append(bias)
        out_dtype = self.dtype if self.dtype is not None else jnp.result_type(*args)
        return jnp.asarray(y, out_dtype)


def _batch_statistics(x: jax.Array, axes: tuple[int, ...], dtype: jnp.dtype | None,
                      fast: bool) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and *biased* variance of ``x`` over ``axes``, in at least float32.

    ``fast``: ``E[x^2] - E[x]^2`` (clipped at 0) in one pass, else ``E[(x - E[x])^2]``; the
    same formulas as ``nnx.BatchNorm`` with ``use_fast_variance``.
    """
    stats_dtype = jnp.promote_types(jnp.result_type(x) if dtype is None else dtype, jnp.float32)
    x = jnp.asarray(x, stats_dtype)
    mean = x.mean(axes)
    if fast:
        var = jnp.maximum(0.0, jax.lax.square(x).mean(axes) - jax.lax.square(mean))
    else:
        var = jax.lax.square(x - jnp.expand_dims(mean, axes)).mean(axes)
    return mean, var
