"""PyTorch import parity (reference AGW and torchvision layouts), its errors, and checkpoints."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from reid_jax import checkpoints, convert_torch  # noqa: E402
from reid_jax.models.agw import AGW, default_model_config, retrieval_embedding  # noqa: E402
from reid_jax.models.attribute_head import AttributeHead  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 8
BLOCKS = (1, 3, 3, 1)
# Non-local blocks after blocks 1, 2 of layer2 and block 2 of layer3: not after block 0, so a
# wrong position (first instead of last blocks) breaks parity.
NON_LOCAL = (0, 2, 1, 0)
NUM_CLASSES = 7
IMAGE_HW = (70, 38)  # odd sizes: catches asymmetric ('SAME') padding


# ------------------------------------------------------------- the reference layout, in torch


class TorchBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class TorchNonLocal(nn.Module):
    def __init__(self, channels: int, inter_channels: int):
        super().__init__()
        self.inter_channels = inter_channels
        self.g = nn.Conv2d(channels, inter_channels, 1)
        self.W = nn.Sequential(nn.Conv2d(inter_channels, channels, 1), nn.BatchNorm2d(channels))
        self.theta = nn.Conv2d(channels, inter_channels, 1)
        self.phi = nn.Conv2d(channels, inter_channels, 1)

    def forward(self, x):
        b, ci = x.size(0), self.inter_channels
        g_x = self.g(x).view(b, ci, -1).permute(0, 2, 1)
        theta_x = self.theta(x).view(b, ci, -1).permute(0, 2, 1)
        phi_x = self.phi(x).view(b, ci, -1)
        f = torch.matmul(theta_x, phi_x)
        y = torch.matmul(f / f.size(-1), g_x).permute(0, 2, 1).contiguous()
        return self.W(y.view(b, ci, *x.size()[2:])) + x


class TorchResNetNL(nn.Module):
    def __init__(self, width, blocks, non_local, reference_inter=True, stem_relu=False):
        super().__init__()
        self.stem_relu = stem_relu
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        strides = (1, 2, 2, 1)  # last stride 1
        for i in range(4):
            setattr(self, f"layer{i + 1}", self._make_layer(width * 2**i, blocks[i], strides[i]))
            channels = width * 2**i * 4
            inter = 1 if reference_inter else channels // 2
            setattr(self, f"NL_{i + 1}",
                    nn.ModuleList([TorchNonLocal(channels, inter) for _ in range(non_local[i])]))
            setattr(self, f"NL_{i + 1}_idx", [blocks[i] - non_local[i] + k
                                              for k in range(non_local[i])])

    def _make_layer(self, planes, n, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4))
        layers = [TorchBottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [TorchBottleneck(self.inplanes, planes) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        if self.stem_relu:
            x = torch.relu(x)
        x = self.maxpool(x)
        for s in range(1, 5):
            idx, nls = getattr(self, f"NL_{s}_idx"), getattr(self, f"NL_{s}")
            for i, block in enumerate(getattr(self, f"layer{s}")):
                x = block(x)
                if i in idx:
                    x = nls[idx.index(i)](x)
        return x


class TorchGeM(nn.Module):
    def __init__(self, p=3.0, eps=1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x):
        x = x.clamp(min=self.eps).pow(self.p)
        return nn.functional.adaptive_avg_pool2d(x, 1).pow(1.0 / self.p)


class TorchAGW(nn.Module):
    def __init__(self, num_classes, width, blocks, non_local, **kwargs):
        super().__init__()
        self.base = TorchResNetNL(width, blocks, non_local, **kwargs)
        dim = width * 32
        self.global_pool = TorchGeM()
        self.bottleneck = nn.BatchNorm1d(dim)
        self.bottleneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False)

    def forward(self, x):
        feature_map = self.base(x)
        pre_bn = self.global_pool(feature_map).flatten(1)
        post_bn = self.bottleneck(pre_bn)
        return feature_map, pre_bn, post_bn, self.classifier(post_bn)


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random weights, BN statistics calibrated on random images, NL W-BN away from zero.

    Random statistics would let activations explode through the cubic non-local products, so
    each BN's running mean/var are set to its batch statistics on a calibration batch
    (momentum 1 for one train-mode pass); BN scales and biases stay random.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.momentum = 1.0
            elif isinstance(m, TorchGeM):
                m.p.fill_(2.7)
        module.train()
        module(torch.randn((8, 3, *IMAGE_HW), generator=gen))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.momentum = 0.1
                m.num_batches_tracked.fill_(123)
    return module.eval()


def _config(**model_overrides) -> ml_collections.ConfigDict:
    model = default_model_config()
    model.update({"width": WIDTH, "blocks": BLOCKS, "non_local": NON_LOCAL, **model_overrides})
    return ml_collections.ConfigDict({"model": model})


def _images(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *IMAGE_HW, 3)).astype(np.float32)


def _torch_features(module: TorchAGW, images: np.ndarray):
    with torch.no_grad():
        outs = module(torch.from_numpy(images).permute(0, 3, 1, 2))
    feature_map, pre_bn, post_bn, logits = (o.numpy() for o in outs)
    return np.transpose(feature_map, (0, 2, 3, 1)), pre_bn, post_bn, logits


def _flax_features(model: AGW, images: np.ndarray):
    model = nnx.view(model, use_running_average=True)
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("highest"):  # no TF32 where a GPU runs the test
        out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, images)
    return jax.tree.map(np.asarray, out)


def _assert_parity(model: AGW, torch_module: TorchAGW, images: np.ndarray) -> None:
    t_map, t_pre, t_post, t_logits = _torch_features(torch_module, images)
    out = _flax_features(model, images)
    t_unit = t_post / np.linalg.norm(t_post, axis=1, keepdims=True)
    f_unit = np.asarray(retrieval_embedding(out))
    assert np.abs(t_unit - f_unit).max() <= 1e-4
    # float32 rounding differs between XLA and torch kernels: tolerances relative to the scale.
    for name, ours, theirs in (("feature_map", out.feature_map, t_map),
                               ("pre_bn", out.pre_bn, t_pre), ("logits", out.logits, t_logits)):
        scale = np.abs(theirs).max()
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5 * scale, err_msg=name)
    # Guard against a vacuous comparison: features vary across images and components.
    assert t_unit.std(axis=0).mean() > 1e-2 and t_unit.std(axis=1).mean() > 1e-2


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The torch module, its saved state dict and its features."""
    module = _randomize(TorchAGW(NUM_CLASSES, WIDTH, BLOCKS, NON_LOCAL), seed=0)
    with torch.no_grad():
        module.bottleneck.bias.fill_(0.05)  # frozen at its checkpoint value, whatever it is
    path = tmp_path_factory.mktemp("torch") / "agw.pth"
    torch.save(module.state_dict(), path)
    return module, path


# ----------------------------------------------------------------------------- parity


def test_parity_reference_layout_library(reference):
    module, path = reference
    state_dict = convert_torch.load_torch_state_dict(path)
    assert convert_torch.detect_layout(state_dict) == "agw"
    assert "base.NL_2.1.W.1.running_mean" in state_dict
    model = AGW.from_config(_config(), NUM_CLASSES, nnx.Rngs(1))
    before = np.asarray(model.backbone.conv1.kernel[...]).copy()
    state = convert_torch.convert_state_dict(state_dict, model)
    np.testing.assert_array_equal(model.backbone.conv1.kernel[...], before)  # not modified
    nnx.update(model, state)
    np.testing.assert_array_equal(
        model.backbone.conv1.kernel[...],
        np.transpose(state_dict["base.conv1.weight"], (2, 3, 1, 0)))
    np.testing.assert_allclose(model.bnneck.bias[...], 0.05)
    _assert_parity(model, module, _images())


def test_parity_textbook_switches(tmp_path):
    module = _randomize(TorchAGW(NUM_CLASSES, WIDTH, BLOCKS, NON_LOCAL, reference_inter=False,
                                 stem_relu=True), seed=1)
    path = tmp_path / "agw_textbook.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in module.state_dict().items()},
                "epoch": 3}, path)
    state_dict = convert_torch.load_torch_state_dict(path)  # wrapper and prefix removed
    config = _config(nl_inter_channels_reference=False, stem_relu=True)
    model = AGW.from_config(config, NUM_CLASSES, nnx.Rngs(0))
    nnx.update(model, convert_torch.convert_state_dict(state_dict, model))
    _assert_parity(model, module, _images(2, seed=1))
    # The reference model cannot take these weights: NL inter-channel shapes differ.
    with pytest.raises(ValueError, match="shape mismatches"):
        convert_torch.convert_state_dict(
            state_dict, AGW.from_config(_config(), NUM_CLASSES, nnx.Rngs(0)))


def test_parity_through_the_tool(reference, tmp_path):
    module, path = reference
    config_file = tmp_path / "tiny_config.py"
    config_file.write_text(
        "import ml_collections\n\n"
        "def get_config():\n"
        f"    return ml_collections.ConfigDict({_config().to_dict()!r})\n"
    )
    out_dir = tmp_path / "ckpt"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_torch.py"), f"--input={path}",
         f"--output={out_dir}", f"--config={config_file}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoints.latest_step(out_dir) == 0
    model, meta = checkpoints.restore_model(out_dir, None)  # config from meta
    assert meta["num_classes"] == NUM_CLASSES
    assert meta["converted_from"] == {"path": str(path), "layout": "agw"}
    assert tuple(meta["config"]["model"]["blocks"]) == BLOCKS
    _assert_parity(model, module, _images(2, seed=2))
    # Same with an explicit config; no attribute head was written.
    model2, _ = checkpoints.restore_model(out_dir, _config(), step=0)
    np.testing.assert_array_equal(model2.gem.p[...], model.gem.p[...])
    assert not checkpoints.has_attribute_head(out_dir)
    with pytest.raises(ValueError, match="has no attribute head"):
        checkpoints.restore_attribute_head(out_dir)


def test_torchvision_layout_loads_backbone_only(reference, tmp_path):
    module, _ = reference
    tv = {k[len("base."):]: v for k, v in module.state_dict().items()
          if k.startswith("base.") and not k.startswith("base.NL_")}
    tv["fc.weight"] = torch.randn(1000, WIDTH * 32)
    tv["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "resnet50.pth"
    torch.save(tv, path)
    state_dict = convert_torch.load_torch_state_dict(path)
    assert convert_torch.detect_layout(state_dict) == "torchvision"

    model = AGW.from_config(_config(), 11, nnx.Rngs(3))
    init = nnx.to_pure_dict(nnx.state(model))
    converted = nnx.to_pure_dict(convert_torch.convert_state_dict(state_dict, model))
    key_map = convert_torch.torch_key_map(model, "torchvision")
    assert len(key_map) == len([k for k in state_dict if "num_batches" not in k]) - 2
    for key, (path_, transform) in key_map.items():
        value = converted
        for p in path_:
            value = value[p]
        expected = np.asarray(state_dict[key])
        if transform == "conv":
            expected = np.transpose(expected, (2, 3, 1, 0))
        np.testing.assert_array_equal(value, expected, err_msg=key)
    # Non-local blocks, GeM, BNNeck and classifier keep their initial values.
    for name in ("gem", "bnneck", "classifier"):
        jax.tree.map(np.testing.assert_array_equal, converted[name], init[name])
    jax.tree.map(np.testing.assert_array_equal, converted["backbone"]["nl2"],
                 init["backbone"]["nl2"])

    # Through convert_checkpoint: num_classes must be given for a classifier-less state dict.
    with pytest.raises(ValueError, match="pass num_classes"):
        convert_torch.convert_checkpoint(path, tmp_path / "out", _config())
    meta = convert_torch.convert_checkpoint(path, tmp_path / "out", _config(), num_classes=11)
    assert meta["converted_from"]["layout"] == "torchvision" and meta["num_classes"] == 11


# ----------------------------------------------------------------------------- errors


def test_pickled_whole_model_is_refused(reference, tmp_path):
    module, _ = reference
    path = tmp_path / "whole_model.pth"
    torch.save(module, path)
    with pytest.raises(ValueError, match=r"torch\.save\(model\.state_dict\(\), path\)"):
        convert_torch.load_torch_state_dict(path)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        convert_torch.load_torch_state_dict(listed)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_torch.load_torch_state_dict(tmp_path / "nope.pth")


def test_unreadable_files_report_the_cause(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, path)
    assert set(convert_torch.load_torch_state_dict(path)) == {"w"}
    blob = path.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(blob[:len(blob) // 2])  # an interrupted download or copy
    with pytest.raises(ValueError, match=r"could not read .*truncated\.pth: RuntimeError: .*zip "
                                         r"archive") as info:
        convert_torch.load_torch_state_dict(truncated)
    assert "pickled model" not in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's error is chained
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"could not read .*empty\.pth: EOFError") as info:
        convert_torch.load_torch_state_dict(empty)
    assert isinstance(info.value.__cause__, EOFError)

    # A pickled object: the refused class is named and torch's error chained.
    whole = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(2, 2), whole)
    with pytest.raises(ValueError, match=r"refused a class it names: "
                                         r"torch\.nn\.modules\.linear\.Linear\); it probably "
                                         r"holds a pickled model") as info:
        convert_torch.load_torch_state_dict(whole)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)


def test_missing_unexpected_and_mismatched_keys_in_one_error(reference):
    module, path = reference
    state_dict = convert_torch.load_torch_state_dict(path)
    del state_dict["base.NL_3.0.theta.bias"]
    del state_dict["global_pool.p"]
    state_dict["base.layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    state_dict["base.layer2.0.conv2.weight"] = np.zeros((16, 16, 5, 5), np.float32)
    model = AGW.from_config(_config(), NUM_CLASSES, nnx.Rngs(0))
    with pytest.raises(ValueError) as info:
        convert_torch.convert_state_dict(state_dict, model)
    message = str(info.value)
    assert "missing keys (2)" in message
    assert "base.NL_3.0.theta.bias" in message and "global_pool.p" in message
    assert "unexpected keys (1)" in message and "base.layer5.0.conv1.weight" in message
    assert "shape mismatches (1)" in message
    assert "base.layer2.0.conv2.weight: checkpoint (16, 16, 5, 5)" in message
    assert "model backbone/layer2/0/conv2/kernel (3, 3, 16, 16)" in message
    with pytest.raises(ValueError, match="unknown state dict layout"):
        convert_torch.convert_state_dict({"foo.weight": np.zeros(1)}, model)
    assert convert_torch.infer_num_classes(state_dict) == NUM_CLASSES


def test_num_classes_must_match_the_classifier(reference, tmp_path):
    _, path = reference
    with pytest.raises(ValueError, match=f"num_classes=3 but .* has {NUM_CLASSES} rows"):
        convert_torch.convert_checkpoint(path, tmp_path / "out", _config(), num_classes=3)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_with_attribute_head(tmp_path):
    config = _config(blocks=(1, 1, 1, 1), non_local=(0, 1, 0, 0))
    model = AGW.from_config(config, 4, nnx.Rngs(5))
    model.bnneck.bn.mean[...] = model.bnneck.bn.mean[...] + 0.5  # a non-default batch stat
    head = AttributeHead(model.feature_dim, rngs=nnx.Rngs(6))
    directory = tmp_path / "ckpt"
    assert checkpoints.latest_step(directory) is None
    checkpoints.save_checkpoint(directory, 3, model_state=nnx.state(model),
                                meta={"num_classes": 4, "config": config})
    checkpoints.save_checkpoint(directory, 7, model_state=model, attribute_head_state=head,
                                meta={"num_classes": 4, "config": config})
    assert checkpoints.latest_step(directory) == 7
    assert not checkpoints.has_attribute_head(directory, step=3)
    assert checkpoints.has_attribute_head(directory)

    restored, meta = checkpoints.restore_model(directory, config)
    assert meta["attribute_head"] == {"embedding_dim": model.feature_dim, "num_attributes": 30}
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(restored)),
                 nnx.to_pure_dict(nnx.state(model)))
    restored_head = checkpoints.restore_attribute_head(directory)
    np.testing.assert_array_equal(restored_head.kernel[...], head.kernel[...])
    assert checkpoints.restore_meta(directory, 3)["num_classes"] == 4
    with pytest.raises(ValueError, match="step 3 has no attribute head"):
        checkpoints.restore_attribute_head(directory, step=3)

    # Errors name the directory.
    with pytest.raises(ValueError, match="step 7 already exists"):
        checkpoints.save_checkpoint(directory, 7, model_state=model,
                                    meta={"num_classes": 4, "config": config})
    with pytest.raises(ValueError, match="num_classes"):
        checkpoints.save_checkpoint(directory, 8, model_state=model, meta={"config": config})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        checkpoints.save_checkpoint(directory, 8, model_state=model,
                                    meta={"num_classes": 4, "bad": object()})
    with pytest.raises(FileNotFoundError, match="has no step 5"):
        checkpoints.restore_model(directory, config, step=5)
    with pytest.raises(ValueError, match="cannot restore the model of .*ckpt step 7"):
        checkpoints.restore_model(directory, _config(blocks=(1, 2, 1, 1), non_local=(0, 1, 0, 0)))
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist"):
        checkpoints.restore_model(missing, config)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty} holds no checkpoint"):
        checkpoints.restore_attribute_head(empty)
