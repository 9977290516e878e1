"""PyTorch import parity (reference AGW and torchvision layouts), its errors, and checkpoints.

Forward parity is checked in float64 on both sides (torch double, JAX under
``jax.enable_x64`` with a float64 model holding the converted weights), so the tolerance
(``FLOAT64_RTOL`` of each output's scale) sits far above rounding noise and far below any
semantic difference. In float32 the two frameworks' kernels round differently by an amount
that depends on the CPU; that check is kept in one place, relative to torch's own float32 error
(``test_float32_forward_is_as_accurate_as_torch_float32``). See docs/training.md, "Parity with
the reference".
"""

from __future__ import annotations

import copy
import functools
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
import torch_reference as ref  # noqa: E402

from reid_jax import checkpoints, convert_torch  # noqa: E402
from reid_jax.models.agw import AGW, default_model_config  # noqa: E402
from reid_jax.models.attribute_head import AttributeHead  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 8
BLOCKS = (1, 3, 3, 1)
# Non-local blocks after blocks 1, 2 of layer2 and block 2 of layer3: not after block 0, so a
# wrong position (first instead of last blocks) breaks parity.
NON_LOCAL = (0, 2, 1, 0)
NUM_CLASSES = 7
IMAGE_HW = (70, 38)  # odd sizes: catches asymmetric ('SAME') padding
# float64 forward parity: max |ours - torch| <= FLOAT64_RTOL * max |torch| per output. The
# measured differences are at most 3.5e-14 of the scale (docs/training.md, "Forward parity").
FLOAT64_RTOL = 1e-10
# float32: our error against the float64 reference <= FLOAT32_MARGIN x torch float32's own
# error, floored at FLOAT32_FLOOR (torch's float32 error on these nets is 2.5e-6 to 1.6e-5 of
# the scale and ours 2.4e-6 to 2.7e-5, depending on the CPU's kernels; a bfloat16 or TF32 pass
# would be ~1e-2).
FLOAT32_MARGIN = 10.0
FLOAT32_FLOOR = 1e-5

TorchAGW = ref.AGW


def _randomize(module: TorchAGW, seed: int) -> TorchAGW:
    return ref.randomize(module, seed, IMAGE_HW)


def _config(**model_overrides) -> ml_collections.ConfigDict:
    model = default_model_config()
    model.update({"width": WIDTH, "blocks": BLOCKS, "non_local": NON_LOCAL, **model_overrides})
    return ml_collections.ConfigDict({"model": model})


def _images(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *IMAGE_HW, 3)).astype(np.float32)


def _torch_features(module: TorchAGW, images: np.ndarray, dtype=torch.float64):
    """(feature_map NHWC, pre_bn, post_bn, logits) of ``module`` (eval) as float64 numpy."""
    module = copy.deepcopy(module).to(dtype).eval()
    with torch.no_grad():
        outs = module(torch.from_numpy(images).to(dtype).permute(0, 3, 1, 2))
    feature_map, pre_bn, post_bn, logits = (o.double().numpy() for o in outs)
    return np.transpose(feature_map, (0, 2, 3, 1)), pre_bn, post_bn, logits


@functools.partial(jax.jit, static_argnums=0)
def _eval_forward(graphdef, state, images):
    return nnx.merge(graphdef, state)(images)


def _flax_features(model: AGW, images: np.ndarray, float64: bool = True):
    """AGWOutputs of ``model`` in eval mode as float64 numpy; ``float64``: run a float64 copy
    (same weights) under ``jax.enable_x64``, else the model as it is (float32)."""
    with jax.enable_x64(float64), jax.default_matmul_precision("highest"):  # no TF32 on GPUs
        if float64:
            config = ml_collections.ConfigDict({"model": {
                "width": model.backbone.width, "blocks": model.backbone.blocks,
                "non_local": model.backbone.non_local, "stem_relu": model.backbone.stem_relu,
                "nl_inter_channels_reference": model.backbone.nl2[0].inter_channels == 1,
                "dtype": "float64"}})
            twin = nnx.eval_shape(lambda: AGW.from_config(config, model.num_classes,
                                                          nnx.Rngs(0)))
            # (numpy casts: an eager jnp cast would compile once per array shape)
            nnx.update(twin, jax.tree.map(lambda x: jax.device_put(np.asarray(x, np.float64)),
                                          nnx.state(model)))
            model = twin
        graphdef, state = nnx.split(nnx.view(model, use_running_average=True))
        out = _eval_forward(graphdef, state, images)
        return jax.tree.map(lambda x: np.asarray(x, np.float64), out)


def _max_rel(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _assert_parity(model: AGW, torch_module: TorchAGW, images: np.ndarray) -> None:
    """float64 forward parity of every output (and the retrieval embedding)."""
    t_map, t_pre, t_post, t_logits = _torch_features(torch_module, images)
    out = _flax_features(model, images)
    for name, ours, theirs in (("feature_map", out.feature_map, t_map),
                               ("pre_bn", out.pre_bn, t_pre), ("post_bn", out.post_bn, t_post),
                               ("logits", out.logits, t_logits)):
        assert _max_rel(ours, theirs) <= FLOAT64_RTOL, (name, _max_rel(ours, theirs))
    t_unit = t_post / np.linalg.norm(t_post, axis=1, keepdims=True)
    f_unit = out.post_bn / np.linalg.norm(out.post_bn, axis=1, keepdims=True)
    assert np.abs(t_unit - f_unit).max() <= FLOAT64_RTOL
    # Guard against a vacuous comparison: features vary across images and components.
    assert t_unit.std(axis=0).mean() > 1e-2 and t_unit.std(axis=1).mean() > 1e-2
    assert t_logits.std() > 1e-2


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


def test_float32_forward_is_as_accurate_as_torch_float32(reference):
    """Where float32 is meaningful: against the float64 reference, the float32 model errs no
    more than torch's own float32 forward does (times a margin for different kernels)."""
    module, path = reference
    model = nnx.eval_shape(lambda: AGW.from_config(_config(), NUM_CLASSES, nnx.Rngs(1)))
    nnx.update(model, convert_torch.convert_state_dict(
        convert_torch.load_torch_state_dict(path), model))  # sets every variable
    images = _images()
    exact = _torch_features(module, images)
    torch32 = _torch_features(module, images, torch.float32)
    ours = _flax_features(model, images, float64=False)
    for name, i in (("feature_map", 0), ("pre_bn", 1), ("post_bn", 2), ("logits", 3)):
        torch_err = _max_rel(torch32[i], exact[i])
        our_err = _max_rel(ours[i], exact[i])
        assert our_err <= FLOAT32_MARGIN * max(torch_err, FLOAT32_FLOOR), (name, our_err,
                                                                          torch_err)


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
    _assert_parity(model, module, _images(3, seed=1))
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
    _assert_parity(model, module, _images(3, seed=2))
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
    with pytest.raises(FileNotFoundError, match="step 5 does not exist"):
        checkpoints.restore_model(directory, config, step=5)
    with pytest.raises(ValueError, match="cannot restore the model of .*ckpt step 7"):
        checkpoints.restore_model(directory, _config(blocks=(1, 2, 1, 1), non_local=(0, 1, 0, 0)))
    # Another width: the arrays of another shape are listed, read from the metadata.
    with pytest.raises(ValueError, match=(
            rf"cannot restore the model of .*ckpt step 7 .*arrays of another shape: "
            rf"backbone\.\S+: stored \[.*{WIDTH}.*\] -> built \[.*{2 * WIDTH}.*\]")):
        checkpoints.restore_model(directory, _config(width=2 * WIDTH))
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist"):
        checkpoints.restore_model(missing, config)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty} holds no checkpoint"):
        checkpoints.restore_attribute_head(empty)


def test_shape_mismatches_name_the_arrays_of_another_shape():
    """Stored metadata keys (``DictKey`` .. ``value``) and a built state's keys (``GetAttrKey``
    ``value``) name the same array; a module called ``value`` keeps its name."""
    stored = {"value": {"kernel": {"value": jax.ShapeDtypeStruct((3, 8), np.float32)}},
              "bias": {"value": jax.ShapeDtypeStruct((8,), np.float32)},
              "old": {"value": jax.ShapeDtypeStruct((2,), np.float32)}}
    built = {"value": {"kernel": nnx.Param(jax.ShapeDtypeStruct((3, 16), np.float32))},
             "bias": nnx.Param(jax.ShapeDtypeStruct((8,), np.float32))}
    assert checkpoints.shape_mismatches(stored, nnx.State(built)) == [
        "value.kernel: stored [3, 8] -> built [3, 16]"]
    many = {f"w{i}": jax.ShapeDtypeStruct((i + 1,), np.float32) for i in range(7)}
    wider = {k: jax.ShapeDtypeStruct((2 * v.shape[0],), np.float32) for k, v in many.items()}
    differ = checkpoints.shape_mismatches(many, wider, limit=5)
    assert len(differ) == 6 and differ[0] == "w0: stored [1] -> built [2]"
    assert differ[-1] == "... 2 more"
