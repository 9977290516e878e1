"""ResNet-50 backbone of AGW (torchvision v1.5 bottlenecks, last stride 1, non-local blocks).

NHWC in, NHWC out. The layout follows the reference ``ResNetNL`` (ReID-Survey) so its state
dicts map one to one (see ``reid_jax.convert_torch``):

- stem: ``conv1`` 7x7/2 (pad 3, no bias) -> ``bn1`` -> [ReLU, only if ``stem_relu``] ->
  max pool 3x3/2 (pad 1). The reference has no ReLU there (its ``self.relu`` is commented out);
  ``stem_relu=False`` (the default) reproduces that. The pool is ``models.pool.max_pool`` (the
  same values as ``nnx.max_pool``, a faster gradient on the CPU); on the CPU ``conv1`` runs over
  chunks of the batch (``models.conv.stem_batch_chunk``; both in docs/training.md).
- ``layer1..layer4``: ``blocks[i]`` bottlenecks each, ``planes = width * 2**i``, output
  ``4 * planes`` channels; the first block of a stage carries the stride (on its 3x3 conv, v1.5)
  and a ``downsample`` 1x1 conv + BN; ``layer4`` has stride ``last_stride`` (AGW: 1, so a
  256x128 image gives a 16x8 map).
- non-local blocks: ``non_local[i]`` blocks in stage ``i``, each applied right after one of the
  *last* ``non_local[i]`` bottlenecks (the reference's ``NL_i_idx = [blocks - n, ..., blocks - 1]``;
  AGW: ``(0, 2, 3, 0)`` -> after blocks 2, 3 of layer2 and 3, 4, 5 of layer3, 0-based).

With ``width=64`` the output has 2048 channels (ResNet-50); tests use e.g. ``width=8`` (256).

Initialisation: convs kaiming-normal with fan-out (the reference's ``ResNetNL.random_init`` and
torchvision; ``models.initializers``, the values of ``jax.nn.initializers``), BatchNorm scale 1
and bias 0. AGW normally starts from ImageNet weights instead
(``reid_jax.convert_torch``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from reid_jax.models import conv, initializers, pool
from reid_jax.models.batch_norm import BatchNorm
from reid_jax.models.non_local import NonLocal

EXPANSION = 4  # bottleneck output channels = 4 * planes

_conv_init = initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(cin: int, cout: int, kernel: int, stride: int, *, dtype, param_dtype,
          rngs: nnx.Rngs) -> nnx.Conv:
    """Bias-free conv with torch's symmetric padding ``kernel // 2`` (not 'SAME')."""
    pad = kernel // 2
    return nnx.Conv(
        cin, cout, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=_conv_init,
        conv_general_dilated=conv.conv_general_dilated, rngs=rngs,
    )


def _bn(channels: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> BatchNorm:
    """BatchNorm as torch's ``BatchNorm2d``: momentum 0.1 (Flax 0.9), eps 1e-5, and torch's
    unbiased running variance (``reid_jax.models.batch_norm``)."""
    return BatchNorm(channels, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4) bottleneck with identity or projection shortcut.

    Attribute names mirror torchvision: ``conv1, bn1, conv2, bn2, conv3, bn3`` and
    ``downsample_conv`` / ``downsample_bn`` (torch ``downsample.0`` / ``downsample.1``).
    """

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, *,
        dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs,
    ):
        out = planes * EXPANSION
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = _conv(in_channels, planes, 1, 1, **kw)
        self.bn1 = _bn(planes, **kw)
        self.conv2 = _conv(planes, planes, 3, stride, **kw)
        self.bn2 = _bn(planes, **kw)
        self.conv3 = _conv(planes, out, 1, 1, **kw)
        self.bn3 = _bn(out, **kw)
        if stride != 1 or in_channels != out:
            self.downsample_conv = _conv(in_channels, out, 1, stride, **kw)
            self.downsample_bn = _bn(out, **kw)
        else:
            self.downsample_conv = None
            self.downsample_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, Cin] -> [B, H / stride, W / stride, 4 * planes]``."""
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample_conv is None else self.downsample_bn(
            self.downsample_conv(x))
        return nnx.relu(y + shortcut)


def _check_stage_tuple(name: str, value: Sequence[int]) -> tuple[int, ...]:
    value = tuple(int(v) for v in value)
    if len(value) != 4 or any(v < 0 for v in value):
        raise ValueError(f"{name} must be 4 non-negative ints (one per stage), got {value}")
    return value


class ResNet(nnx.Module):
    """ResNet-50-style backbone with non-local blocks: ``[B, H, W, 3] -> [B, H/16, W/16, 32 w]``.

    (With ``last_stride=2`` the map is ``H/32 x W/32``.) ``feature_dim = 32 * width``.

    Attributes: ``conv1, bn1, layer1..layer4`` (``nnx.List`` of ``Bottleneck``) and ``nl1..nl4``
    (``nnx.List`` of ``NonLocal``, torch ``NL_1..NL_4``).
    """

    def __init__(
        self,
        *,
        width: int = 64,
        blocks: Sequence[int] = (3, 4, 6, 3),
        last_stride: int = 1,
        non_local: Sequence[int] = (0, 2, 3, 0),
        nl_inter_channels_reference: bool = True,
        stem_relu: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        blocks = _check_stage_tuple("blocks", blocks)
        non_local = _check_stage_tuple("non_local", non_local)
        if any(b < 1 for b in blocks):
            raise ValueError(f"every stage needs >= 1 block, got blocks={blocks}")
        for i, (n, b) in enumerate(zip(non_local, blocks, strict=True)):
            if n > b:
                raise ValueError(
                    f"non_local[{i}]={n} exceeds blocks[{i}]={b}: the non-local blocks follow "
                    "the last bottlenecks of a stage, at most one per bottleneck"
                )
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        self.width = width
        self.blocks = blocks
        self.non_local = non_local
        self.stem_relu = stem_relu
        self.feature_dim = width * 8 * EXPANSION

        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = _conv(3, width, 7, 2, **kw)
        self.bn1 = _bn(width, **kw)
        in_channels = width
        stages = []
        nl_stages = []
        for i, (n_blocks, n_nl) in enumerate(zip(blocks, non_local, strict=True)):
            planes = width * 2**i
            stride = 1 if i == 0 else (last_stride if i == 3 else 2)
            stage = []
            for j in range(n_blocks):
                stage.append(Bottleneck(in_channels, planes, stride if j == 0 else 1, **kw))
                in_channels = planes * EXPANSION
            stages.append(nnx.List(stage))
            nl_stages.append(nnx.List([
                NonLocal(in_channels, reference_inter_channels=nl_inter_channels_reference,
                         **kw)
                for _ in range(n_nl)
            ]))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.nl1, self.nl2, self.nl3, self.nl4 = nl_stages

    def non_local_after(self, stage: int) -> tuple[int, ...]:
        """0-based indices of the bottlenecks of ``stage`` (0..3) followed by a non-local block."""
        b, n = self.blocks[stage], self.non_local[stage]
        return tuple(range(b - n, b))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``images [B, H, W, 3] -> feature map [B, h, w, feature_dim]``."""
        return self.forward_from(self.forward_to(x, 0), 0)

    def forward_to(self, x: jax.Array, stage: int) -> jax.Array:
        """``images [B, H, W, 3]`` -> the output of stage ``stage`` (1..4; 0: of the stem,
        conv1-bn1-(relu)-maxpool). ``forward_from(forward_to(x, s), s)`` is ``self(x)``."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"ResNet expects NHWC images [B, H, W, 3], got {x.shape}")
        _check_stage_index(stage)
        x = self.bn1(conv.in_batch_chunks(self.conv1, x, conv.stem_batch_chunk(x.shape)))
        if self.stem_relu:
            x = nnx.relu(x)
        x = pool.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
        for s in range(stage):
            x = self._stage(x, s)
        return x

    def forward_from(self, x: jax.Array, stage: int) -> jax.Array:
        """The output of stage ``stage`` (0: of the stem) -> the last feature map."""
        _check_stage_index(stage)
        for s in range(stage, 4):
            x = self._stage(x, s)
        return x

    def stage_modules(self, s: int) -> list[nnx.Module]:
        """The modules of stage ``s`` (0..3) in the order they run: its bottlenecks, each
        non-local block right after its bottleneck."""
        stage = (self.layer1, self.layer2, self.layer3, self.layer4)[s]
        nls = (self.nl1, self.nl2, self.nl3, self.nl4)[s]
        nl_positions = self.non_local_after(s)
        modules: list[nnx.Module] = []
        for j, block in enumerate(stage):
            modules.append(block)
            if j in nl_positions:
                modules.append(nls[nl_positions.index(j)])
        return modules

    def _stage(self, x: jax.Array, s: int) -> jax.Array:
        for module in self.stage_modules(s):
            x = module(x)
        return x


def _check_stage_index(stage: int) -> None:
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 4:
        raise ValueError(f"stage must be an integer in 0..4 (0: the stem), got {stage!r}")
