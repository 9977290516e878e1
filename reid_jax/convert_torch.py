"""Import PyTorch state dicts of the reference AGW code and of torchvision's ResNet-50.

Two key layouts are understood (``docs/design.md``, "AGW as the reference has it"):

- ``"agw"`` (ReID-Survey ``Baseline`` with ``resnet50_nl``): ``base.conv1.weight``,
  ``base.bn1.*``, ``base.layer{1..4}.{j}.{conv,bn}{1,2,3}.*``, ``base.layer3.0.downsample.{0,1}.*``,
  ``base.NL_{2,3}.{k}.{g,theta,phi}.{weight,bias}``, ``base.NL_2.0.W.{0,1}.*``, ``global_pool.p``,
  ``bottleneck.{weight,bias,running_mean,running_var}``, ``classifier.weight``. Every model
  variable must be present.
- ``"torchvision"`` (``torchvision.models.resnet50().state_dict()``): the backbone keys without
  ``base.`` plus ``fc.*``; only the backbone is loaded, ``fc.*`` is ignored, and the non-local
  blocks, GeM, BNNeck and classifier keep their initial values (ImageNet initialisation).

Transforms: conv ``OIHW -> HWIO``, linear ``[out, in] -> [in, out]``, everything else as is;
``num_batches_tracked`` is ignored. Missing keys, unexpected keys and shape mismatches are all
reported in one ``ValueError``.

Loading never unpickles arbitrary objects: ``torch.load(path, map_location='cpu',
weights_only=True)``. A pickled whole model is refused with instructions to save its state dict.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from reid_jax import checkpoints
from reid_jax.models.agw import AGW
from reid_jax.models.resnet import Bottleneck, ResNet

LAYOUTS = ("agw", "torchvision")

# transform name -> numpy function from the torch array to the Flax array.
_TRANSFORMS = {
    "conv": lambda w: np.transpose(w, (2, 3, 1, 0)),  # OIHW -> HWIO
    "linear": lambda w: np.transpose(w, (1, 0)),  # [out, in] -> [in, out]
    "copy": lambda w: w,
}

_SAVE_STATE_DICT_HINT = (
    "save the weights as a state dict instead: torch.save(model.state_dict(), path)"
)

# How torch's weights_only unpickler words a refused class / function: "Unsupported global: GLOBAL
# torch.nn.modules.linear.Linear was not an allowed global by default" (torch 2.x).
_DISALLOWED_GLOBAL = re.compile(r"unsupported global|not an allowed global", re.IGNORECASE)

Path = tuple[Any, ...]
KeyMap = dict[str, tuple[Path, str]]


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.pth`` state dict as ``{key: float32 numpy array}`` without unpickling objects.

    Accepts a plain state dict, ``{'state_dict': sd}`` or ``{'model': sd}`` wrappers and
    ``module.`` (DataParallel) prefixes.

    Raises:
      ImportError: torch is not installed (``pip install 'reid_jax[torch]'``).
      FileNotFoundError: ``path`` does not exist.
      ValueError: the file is a pickled module/object (the weights-only unpickler refused a
        class), cannot be read at all (e.g. truncated or corrupt: "could not read PATH: ..."
        with torch's error as the cause), or holds non-tensor values.
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "reading PyTorch checkpoints needs torch: pip install 'reid_jax[torch]' "
            "(the CPU build is enough)"
        ) from e
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if _DISALLOWED_GLOBAL.search(str(e)):
            raise ValueError(
                f"{path} is not a plain state dict (torch.load with weights_only=True refused a "
                f"class it names: {_disallowed_global(e)}); it probably holds a pickled model, "
                f"which is never unpickled here. {_SAVE_STATE_DICT_HINT}"
            ) from e
        raise _unreadable(path, e) from e
    except Exception as e:  # truncated / corrupt archives: RuntimeError, EOFError, ...
        raise _unreadable(path, e) from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict; "
                         f"{_SAVE_STATE_DICT_HINT}")
    state_dict = {}
    not_tensors = []
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            not_tensors.append(f"{key} ({type(value).__name__})")
            continue
        array = value.detach().cpu()
        if array.is_floating_point():
            array = array.float()
        state_dict[_strip_module_prefix(key)] = array.numpy()
    if not_tensors:
        raise ValueError(f"{path}: state dict values that are not tensors: {not_tensors}; "
                         f"{_SAVE_STATE_DICT_HINT}")
    return state_dict


def _disallowed_global(error: Exception) -> str:
    """The ``GLOBAL a.b.C`` part of torch's weights-only refusal (else the error's type)."""
    match = re.search(r"GLOBAL\s+(\S+)", str(error))
    return match.group(1) if match else type(error).__name__


def _unreadable(path: str, error: Exception) -> ValueError:
    """``could not read PATH: Type: message`` (torch's message on one line, without colours)."""
    message = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split()) or "(no message)"
    return ValueError(f"could not read {path}: {type(error).__name__}: {message}")


def _strip_module_prefix(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """``"agw"`` if keys start with ``base.``, ``"torchvision"`` if ``conv1.weight`` is a key."""
    keys = [_strip_module_prefix(k) for k in state_dict]
    if any(k.startswith("base.") for k in keys):
        return "agw"
    if "conv1.weight" in keys:
        return "torchvision"
    raise ValueError(
        "unknown state dict layout: expected reference AGW keys (base.conv1.weight, ...) or "
        f"torchvision ResNet keys (conv1.weight, ...); first keys: {sorted(keys)[:8]}"
    )


def _conv_keys(key_map: KeyMap, torch_name: str, path: Path, bias: bool = False) -> None:
    key_map[f"{torch_name}.weight"] = (path + ("kernel",), "conv")
    if bias:
        key_map[f"{torch_name}.bias"] = (path + ("bias",), "copy")


def _bn_keys(key_map: KeyMap, torch_name: str, path: Path, bias: bool = True) -> None:
    key_map[f"{torch_name}.weight"] = (path + ("scale",), "copy")
    if bias:
        key_map[f"{torch_name}.bias"] = (path + ("bias",), "copy")
    key_map[f"{torch_name}.running_mean"] = (path + ("mean",), "copy")
    key_map[f"{torch_name}.running_var"] = (path + ("var",), "copy")


def _bottleneck_keys(key_map: KeyMap, torch_name: str, path: Path, block: Bottleneck) -> None:
    for i in (1, 2, 3):
        _conv_keys(key_map, f"{torch_name}.conv{i}", path + (f"conv{i}",))
        _bn_keys(key_map, f"{torch_name}.bn{i}", path + (f"bn{i}",))
    if block.downsample_conv is not None:
        _conv_keys(key_map, f"{torch_name}.downsample.0", path + ("downsample_conv",))
        _bn_keys(key_map, f"{torch_name}.downsample.1", path + ("downsample_bn",))


def _backbone_keys(backbone: ResNet, prefix: str, with_non_local: bool) -> KeyMap:
    key_map: KeyMap = {}
    root: Path = ("backbone",)
    _conv_keys(key_map, f"{prefix}conv1", root + ("conv1",))
    _bn_keys(key_map, f"{prefix}bn1", root + ("bn1",))
    stages = (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)
    for s, stage in enumerate(stages, start=1):
        for j, block in enumerate(stage):
            _bottleneck_keys(key_map, f"{prefix}layer{s}.{j}", root + (f"layer{s}", j), block)
    if with_non_local:
        nl_stages = (backbone.nl1, backbone.nl2, backbone.nl3, backbone.nl4)
        for s, nls in enumerate(nl_stages, start=1):
            for k in range(len(nls)):
                name, path = f"{prefix}NL_{s}.{k}", root + (f"nl{s}", k)
                for conv in ("g", "theta", "phi"):
                    _conv_keys(key_map, f"{name}.{conv}", path + (conv,), bias=True)
                _conv_keys(key_map, f"{name}.W.0", path + ("w_conv",), bias=True)
                _bn_keys(key_map, f"{name}.W.1", path + ("w_bn",))
    return key_map


def torch_key_map(model: AGW, layout: str) -> KeyMap:
    """``{torch key: (path in nnx.state(model), transform)}`` for "agw" or "torchvision"."""
    if layout == "torchvision":
        return _backbone_keys(model.backbone, "", with_non_local=False)
    if layout != "agw":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    key_map = _backbone_keys(model.backbone, "base.", with_non_local=True)
    key_map["global_pool.p"] = (("gem", "p"), "copy")
    _bn_keys(key_map, "bottleneck", ("bnneck", "bn"), bias=False)
    key_map["bottleneck.bias"] = (("bnneck", "bias"), "copy")
    key_map["classifier.weight"] = (("classifier", "kernel"), "linear")
    return key_map


def _ignored(key: str, layout: str) -> bool:
    if key.endswith("num_batches_tracked"):
        return True
    return layout == "torchvision" and key.startswith("fc.")


def _get(tree: dict, path: Path) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: Path, value: Any) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], model: AGW, layout: str | None = None
) -> nnx.State:
    """The ``nnx.State`` of ``model`` with its variables replaced by ``state_dict``'s weights.

    ``model`` is not modified; apply the result with ``nnx.update(model, state)``.

    Args:
      state_dict: ``{torch key: array}`` (``load_torch_state_dict``); ``module.`` prefixes ok.
      model: an ``AGW`` of the matching architecture (width, blocks, non_local, ...).
      layout: ``"agw"`` or ``"torchvision"``; detected from the keys when None.

    Raises:
      ValueError: listing every missing key, unexpected key and shape mismatch at once.
    """
    state_dict = {_strip_module_prefix(k): v for k, v in state_dict.items()}
    layout = layout or detect_layout(state_dict)
    key_map = torch_key_map(model, layout)
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)

    missing = sorted(set(key_map) - set(state_dict))
    unexpected = sorted(k for k in state_dict if k not in key_map and not _ignored(k, layout))
    mismatched = []
    for key, (path, transform) in key_map.items():
        if key not in state_dict:
            continue
        target = _get(pure, path)
        value = _TRANSFORMS[transform](np.asarray(state_dict[key]))
        if value.shape != target.shape:
            mismatched.append(
                f"{key}: checkpoint {tuple(np.shape(state_dict[key]))} -> {value.shape} "
                f"({transform}), model {'/'.join(map(str, path))} {tuple(target.shape)}"
            )
            continue
        _set(pure, path, jnp.asarray(value, dtype=target.dtype))
    if missing or unexpected or mismatched:
        lines = [f"state dict ({layout} layout) does not match the model:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        raise ValueError("\n".join(lines))
    nnx.replace_by_pure_dict(state, pure)
    return state


def infer_num_classes(state_dict: Mapping[str, np.ndarray]) -> int | None:
    """Identities from ``classifier.weight [num_classes, D]``; None if there is no classifier."""
    for key, value in state_dict.items():
        if _strip_module_prefix(key) == "classifier.weight":
            return int(np.shape(value)[0])
    return None


def convert_checkpoint(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: ml_collections.ConfigDict,
    *,
    num_classes: int | None = None,
    step: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Converts a ``.pth`` state dict into an orbax checkpoint (``reid_jax.checkpoints``).

    Args:
      input_path: the PyTorch state dict (reference AGW or torchvision ResNet-50 layout).
      output_dir: checkpoint directory to write step ``step`` into.
      config: config whose ``model`` section describes the architecture.
      num_classes: identities of the classifier; default: ``classifier.weight``'s rows (AGW
        layout). Required for torchvision state dicts (their classifier keeps its init).
      seed: init seed of what a torchvision state dict does not set.

    Returns:
      The ``meta`` dict written.
    """
    state_dict = load_torch_state_dict(input_path)
    layout = detect_layout(state_dict)
    inferred = infer_num_classes(state_dict)
    if num_classes is None:
        num_classes = inferred
    if num_classes is None:
        raise ValueError(
            f"{input_path} has no classifier.weight ({layout} layout): pass num_classes "
            "(--num_classes) for the new identity classifier"
        )
    if inferred is not None and inferred != num_classes:
        raise ValueError(
            f"num_classes={num_classes} but {input_path}'s classifier.weight has {inferred} rows")
    model = AGW.from_config(config, num_classes, nnx.Rngs(seed))
    state = convert_state_dict(state_dict, model, layout)
    meta = {
        "num_classes": num_classes,
        "config": config,
        "converted_from": {"path": os.path.abspath(os.fspath(input_path)), "layout": layout},
    }
    checkpoints.save_checkpoint(output_dir, step, model_state=state, meta=meta)
    return checkpoints.restore_meta(output_dir, step)
