r"""Converts a PyTorch AGW / torchvision ResNet-50 state dict into an orbax checkpoint.

  python tools/convert_torch.py --input=agw_market1501.pth --output=/tmp/agw_ckpt \
      --config=configs/agw_market1501.py
  python tools/convert_torch.py --input=resnet50-0676ba61.pth --output=/tmp/imagenet_r50 \
      --config=configs/agw_market1501.py --num_classes=751

The input must be a state dict (``torch.save(model.state_dict(), path)``); it is read with
``torch.load(weights_only=True)``. See ``reid_jax.convert_torch`` for the key layouts.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from reid_jax import cli, convert_torch

_INPUT = flags.DEFINE_string("input", None, "PyTorch state dict (.pth).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Checkpoint directory to write.", required=True)
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (model section used).")
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", None, "Identities; default: rows of classifier.weight (AGW state dicts).")
_STEP = flags.DEFINE_integer("step", 0, "Step number of the written checkpoint.")
flags.mark_flag_as_required("config")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    meta = convert_torch.convert_checkpoint(
        _INPUT.value, _OUTPUT.value, _CONFIG.value, num_classes=_NUM_CLASSES.value,
        step=_STEP.value)
    print(f"wrote {_OUTPUT.value} step {_STEP.value}:")
    print(json.dumps({k: meta[k] for k in ("num_classes", "converted_from")}, indent=2))


if __name__ == "__main__":
    cli.run(main)
