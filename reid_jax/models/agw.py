"""AGW (Ye et al., "Deep Learning for Person Re-identification: A Survey and Outlook").

``AGW = ResNet-50 (last stride 1, non-local) -> GeM -> BNNeck -> identity classifier`` as the
ReID-Survey reference implementation has it (DESIGN.md section 3)::

    feature_map = backbone(images)                 # [B, h, w, D]
    pre_bn      = GeM_p(feature_map)               # [B, D]   triplet / center losses
    post_bn     = BNNeck(pre_bn)                   # [B, D]   ranked (after L2 normalisation)
    logits      = post_bn @ classifier             # [B, ids] label-smoothing CE

Train mode (``model.train()``, the default after construction) normalises with batch statistics
and updates the running averages (``nnx.BatchStat``); eval mode (``model.eval()``) uses the
running statistics (``nnx.view(model, use_running_average=True)`` gives an eval-mode view without
changing ``model``). The model is a plain NNX module: ``graphdef, params, rest =
nnx.split(model, nnx.Param, ...)`` and a jitted pure step that merges inside work, and all
mutable state is in the split states. Inside ``jax.grad`` merge with ``copy=True``
(``nnx.merge(graphdef, params, rest, copy=True)``) so train-mode BatchNorm may write its running
averages, and return ``nnx.state(model, nnx.Not(nnx.Param))`` as the new ``rest``
(tests/test_models.py has the pattern).

Variable types in ``nnx.state(model)``:

- ``nnx.Param``: everything trained (conv/linear kernels, BN scales and biases, GeM ``p``);
- ``nnx.BatchStat``: BatchNorm running means and variances;
- ``FrozenParam``: BNNeck's bias, a weight that is *never trained* (the reference sets
  ``bottleneck.bias.requires_grad_(False)``; it stays 0 unless a checkpoint sets it). Optimisers
  must take ``wrt=nnx.Param`` (and weight decay only those), which leaves it out.

Precision (``dtype``, see docs/training.md, "Precision"):

- ``"float32"``: everything float32.
- ``"bfloat16"``: the backbone computes in bfloat16; parameters and BatchNorm statistics stay
  float32 (master weights), GeM, BNNeck and the classifier compute in float32, so ``pre_bn``,
  ``post_bn`` and ``logits`` are float32 (``feature_map`` is bfloat16).
- ``"float64"``: parameters, statistics and compute in float64. It needs 64-bit JAX
  (``jax.enable_x64``); the parity tests against the PyTorch reference run in it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from reid_jax.models.batch_norm import BatchNorm
from reid_jax.models.resnet import ResNet

GEM_EPS = 1e-6

# config.model.dtype -> compute dtype of the backbone (see the module docstring).
DTYPES: dict[str, jnp.dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
                                "float64": jnp.float64}


def param_dtype_for(dtype: str) -> jnp.dtype:
    """Parameter (and optimizer state) dtype of a model computing in ``dtype``: float32 master
    weights for float32 and bfloat16, float64 for float64."""
    return jnp.float64 if dtype == "float64" else jnp.float32


def head_dtype_for(dtype: str) -> jnp.dtype:
    """Compute dtype of GeM, BNNeck and the classifier: at least float32."""
    return jnp.promote_types(DTYPES[dtype], jnp.float32)

# Choices of ``config.model.retrieval_feature`` (see :func:`retrieval_embedding`).
RETRIEVAL_FEATURES = ("post_bn", "pre_bn")


class FrozenParam(nnx.Variable):
    """A weight that is loaded and saved with the model but never trained (not an ``nnx.Param``;
    docs/training.md, "BNNeck's frozen bias")."""


class AGWOutputs(NamedTuple):
    """Named outputs of ``AGW.__call__`` (``D`` = feature dim, 2048 for ResNet-50)."""

    feature_map: jax.Array  # [B, h, w, D] last backbone map (compute dtype)
    pre_bn: jax.Array  # [B, D] GeM feature (triplet / center losses)
    post_bn: jax.Array  # [B, D] BNNeck output (AGW's retrieval feature, before L2 normalisation)
    logits: jax.Array  # [B, num_classes] identity logits


def gem_pool(x: jax.Array, p: jax.Array, eps: float = GEM_EPS) -> jax.Array:
    """Generalised mean pooling ``(mean_hw clamp(x, eps)^p)^(1/p)``.

    Args:
      x: ``[B, H, W, C]`` feature map.
      p: scalar or ``[1]`` exponent.
      eps: lower clamp (the reference's 1e-6).

    Returns:
      ``[B, C]``.
    """
    if x.ndim != 4:
        raise ValueError(f"gem_pool expects [B, H, W, C], got {x.shape}")
    p = jnp.reshape(p, ())
    pooled = jnp.mean(jnp.power(jnp.maximum(x, eps), p), axis=(1, 2))
    return jnp.power(pooled, 1.0 / p)


class GeM(nnx.Module):
    """GeM pooling with a learnable exponent ``p`` (``nnx.Param`` of shape ``[1]``, init 3)."""

    def __init__(self, p: float = 3.0, eps: float = GEM_EPS, *,
                 param_dtype: jnp.dtype = jnp.float32):
        if p <= 0:
            raise ValueError(f"GeM p must be > 0, got {p}")
        self.p = nnx.Param(jnp.full((1,), p, param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, C]`` in at least float32 (float64 stays float64)."""
        return gem_pool(x.astype(jnp.promote_types(x.dtype, jnp.float32)), self.p[...], self.eps)


class BNNeck(nnx.Module):
    """``BatchNorm1d(D)`` whose bias is frozen: ``y = BN_scale_only(x) + bias``.

    ``bn`` is a ``BatchNorm`` (torch's running statistics, ``reid_jax.models.batch_norm``)
    without a bias (its scale is trained, stats are ``nnx.BatchStat``); ``bias`` is a
    ``FrozenParam`` (zeros at init), so gradients and optimisers over ``nnx.Param`` never see it,
    yet a reference checkpoint's ``bottleneck.bias`` round-trips. ``dtype``: the compute dtype
    (float32; float64 for a float64 model).
    """

    def __init__(self, features: int, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.bn = BatchNorm(
            features, momentum=0.9, epsilon=1e-5, use_bias=False, use_fast_variance=False,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.bias = FrozenParam(jnp.zeros((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, D] -> [B, D]``."""
        return self.bn(x) + self.bias[...]


class AGW(nnx.Module):
    """AGW re-id model: ``images [B, H, W, 3] (normalised, NHWC) -> AGWOutputs``."""

    def __init__(
        self,
        num_classes: int,
        *,
        width: int = 64,
        blocks: tuple[int, ...] = (3, 4, 6, 3),
        last_stride: int = 1,
        non_local: tuple[int, ...] = (0, 2, 3, 0),
        nl_inter_channels_reference: bool = True,
        stem_relu: bool = False,
        gem_p: float = 3.0,
        dtype: str = "float32",
        retrieval_feature: str = "post_bn",
        normalize_feature: bool = True,
        rngs: nnx.Rngs,
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if dtype not in DTYPES:
            raise ValueError(f"model dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if jax.dtypes.canonicalize_dtype(DTYPES[dtype]) != DTYPES[dtype]:
            raise ValueError(f"model dtype {dtype!r} needs 64-bit JAX: run under "
                             "`with jax.enable_x64(True):` or set jax_enable_x64")
        if retrieval_feature not in RETRIEVAL_FEATURES:
            raise ValueError(f"config.model.retrieval_feature must be one of "
                             f"{RETRIEVAL_FEATURES}, got {retrieval_feature!r}")
        if not isinstance(normalize_feature, bool):
            raise ValueError(f"config.model.normalize_feature must be a bool, got "
                             f"{normalize_feature!r}")
        self.num_classes = num_classes
        # How the retrieval embedding is taken from the outputs (``retrieval_embedding``); plain
        # Python values, so they are part of the graphdef (static under jit), not of the state.
        self.retrieval_feature = retrieval_feature
        self.normalize_feature = normalize_feature
        # Parameter dtype (float32 master weights, float64 for a float64 model); a plain value,
        # so part of the graphdef. The train state's centers use it too.
        self.param_dtype = param_dtype_for(dtype)
        head_dtype = head_dtype_for(dtype)
        self.backbone = ResNet(
            width=width, blocks=blocks, last_stride=last_stride, non_local=non_local,
            nl_inter_channels_reference=nl_inter_channels_reference, stem_relu=stem_relu,
            dtype=DTYPES[dtype], param_dtype=self.param_dtype, rngs=rngs,
        )
        self.feature_dim = self.backbone.feature_dim
        self.gem = GeM(gem_p, param_dtype=self.param_dtype)
        self.bnneck = BNNeck(self.feature_dim, dtype=head_dtype, param_dtype=self.param_dtype,
                             rngs=rngs)
        # Reference ``weights_init_classifier``: N(0, 0.001^2), no bias.
        self.classifier = nnx.Linear(
            self.feature_dim, num_classes, use_bias=False, dtype=head_dtype,
            param_dtype=self.param_dtype, kernel_init=nnx.initializers.normal(0.001), rngs=rngs,
        )

    @classmethod
    def from_config(
        cls, config: ml_collections.ConfigDict, num_classes: int, rngs: nnx.Rngs
    ) -> AGW:
        """AGW from ``config.model`` (``default_model_config`` fields; missing ones: default)."""
        return cls(num_classes, **model_kwargs(config), rngs=rngs)

    def __call__(self, images: jax.Array) -> AGWOutputs:
        """``images [B, H, W, 3] -> AGWOutputs`` (shapes in ``AGWOutputs``)."""
        feature_map = self.backbone(images)
        pre_bn = self.gem(feature_map)
        post_bn = self.bnneck(pre_bn)
        logits = self.classifier(post_bn)
        return AGWOutputs(feature_map=feature_map, pre_bn=pre_bn, post_bn=post_bn, logits=logits)

    def retrieval_embedding(self, outputs: AGWOutputs) -> jax.Array:
        """``[B, D]`` float32 retrieval embedding of ``outputs`` with this model's settings.

        :func:`retrieval_embedding` with ``feature=self.retrieval_feature`` and
        ``normalize=self.normalize_feature`` (from ``config.model``).
        """
        return retrieval_embedding(outputs, self.normalize_feature,
                                   feature=self.retrieval_feature)


def retrieval_embedding(outputs: AGWOutputs, normalize: bool = True, *,
                        feature: str = "post_bn") -> jax.Array:
    """The retrieval embedding ``f`` of DESIGN.md section 2: ``[B, D]`` float32.

    ``f`` is the one tensor that is ranked (squared Euclidean distance), fed to the attribute
    head (``x = sigmoid(f @ W)``) and explained (eq. 3.2), so explanations explain the ranking
    that is shown. Which tensor it is, is the config value (documented here, once)::

        config.model.retrieval_feature = "post_bn"   # "post_bn" (BNNeck output) | "pre_bn" (GeM)
        config.model.normalize_feature = True        # L2-normalise each row

    The default, ``post_bn`` L2-normalised, is what AGW ranks at test time (the reference's
    ``TEST.NECK_FEAT: after``, ``TEST.FEAT_NORM: yes``); ``pre_bn`` is its ``before`` option.
    ``AGW.from_config`` stores both values on the model (``model.retrieval_feature``,
    ``model.normalize_feature``; a restored checkpoint uses the values of the config it is
    restored with, by default the one stored in it), and ``AGW.retrieval_embedding`` /
    ``reid_jax.embeddings.extract`` (every tool and training's evaluation) apply them.

    Args:
      outputs: the model's ``AGWOutputs``.
      normalize: divide each row by its L2 norm (``max(norm, 1e-12)``, as
        ``torch.nn.functional.normalize``); False: the raw feature.
      feature: ``"post_bn"`` or ``"pre_bn"`` (``RETRIEVAL_FEATURES``).

    Raises:
      ValueError: an unknown ``feature``.
    """
    if feature not in RETRIEVAL_FEATURES:
        raise ValueError(f"retrieval feature must be one of {RETRIEVAL_FEATURES}, got "
                         f"{feature!r}")
    f = getattr(outputs, feature).astype(jnp.float32)
    if not normalize:
        return f
    norm = jnp.linalg.norm(f, axis=-1, keepdims=True)
    return f / jnp.maximum(norm, 1e-12)  # as torch.nn.functional.normalize


def default_model_config() -> ml_collections.ConfigDict:
    """The ``config.model`` fields ``AGW.from_config`` reads, with the reference's values."""
    return ml_collections.ConfigDict({
        "width": 64,
        "blocks": (3, 4, 6, 3),
        "last_stride": 1,
        "non_local": (0, 2, 3, 0),
        "nl_inter_channels_reference": True,
        "stem_relu": False,
        "gem_p": 3.0,
        "dtype": "float32",
        "retrieval_feature": "post_bn",  # see retrieval_embedding
        "normalize_feature": True,
    })


def model_kwargs(config: ml_collections.ConfigDict | dict[str, Any]) -> dict[str, Any]:
    """``AGW`` keyword arguments from ``config.model`` (defaults for missing fields)."""
    model_cfg = config.get("model") if hasattr(config, "get") else None
    if model_cfg is None:
        raise ValueError("config has no 'model' section (expected config.model.width, ...)")
    defaults = default_model_config()
    kwargs = {}
    for name in defaults:
        value = model_cfg.get(name, defaults[name])
        kwargs[name] = tuple(value) if isinstance(defaults[name], tuple) else value
    return kwargs
