r"""Retrieval embeddings (and attribute probabilities) of every image in a folder.

  python tools/extract_features.py --checkpoint=WORKDIR/checkpoints --image_dir=DIR \
      --output=features.npz [--config=configs/agw_market1501.py] [--batch_size=64]

Writes an ``.npz`` with

- ``paths``: str [n], absolute paths of the images below --image_dir (recursive, sorted);
- ``features``: float32 [n, N], the retrieval embedding (what is ranked and explained;
  docs/design.md; ``config.model.retrieval_feature``, by default post-BN, L2-normalised);
- when the checkpoint step has an attribute head: ``attributes`` float32 [n, 30] probabilities
  ``sigmoid(features @ W)`` and ``attribute_names`` str [30];
- with --pre_bn: ``pre_bn`` float32 [n, N], the GeM feature before BNNeck.

Images of any size are resized to the config's input size (``config.data.height`` x
``width``). The file is written atomically. ``tools/analyze.py --features=`` reads it.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from reid_jax import atomic_io, checkpoints, cli, embeddings
from reid_jax.data.attributes import ATTRIBUTE_NAMES

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory.",
                                  required=True)
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The model's config file (default: the config stored in the checkpoint).")
_IMAGE_DIR = flags.DEFINE_string("image_dir", None, "Folder of images (searched recursively).",
                                 required=True)
_OUTPUT = flags.DEFINE_string("output", None, "The .npz to write.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Images per forward (default: config.data.eval_batch_size or 64).")
_PRE_BN = flags.DEFINE_bool("pre_bn", False, "Also write the pre-BN feature.")


def extract_folder(checkpoint_dir: str, config, image_dir: str, output: str, *,
                   step: int | None = None, batch_size: int | None = None,
                   pre_bn: bool = False) -> dict[str, np.ndarray]:
    """Embeds every image below ``image_dir`` with the checkpoint's model; writes ``output``.

    Returns:
      The arrays written (see the module docstring).

    Raises:
      FileNotFoundError: no checkpoint / image folder. ValueError: the folder has no images.
      reid_jax.data.augment.ImageLoadError: an image does not decode (named).
    """
    paths = embeddings.list_images(image_dir)
    model, meta = checkpoints.restore_model(checkpoint_dir, config, step)
    if config is None:
        config = meta.get("config", {})
    head = None
    if checkpoints.has_attribute_head(checkpoint_dir, step):
        head = checkpoints.restore_attribute_head(checkpoint_dir, step)
    else:
        logging.info("checkpoint has no attribute head: writing features only. %s",
                     checkpoints.NO_HEAD_HINT)
    loader_config = embeddings.eval_loader_config(config)
    if batch_size is None:
        batch_size = embeddings.eval_batch_size(config)
    outputs = [embeddings.FEATURES]
    if pre_bn:
        outputs.append(embeddings.PRE_BN)
    if head is not None:
        outputs.append(embeddings.ATTRIBUTES)
    arrays = embeddings.extract(
        model, paths, height=loader_config.augment.height, width=loader_config.augment.width,
        batch_size=batch_size, outputs=outputs, attribute_head=head, loader_config=loader_config,
        description=f"features of {image_dir}")
    result = {"paths": np.asarray(paths, dtype=np.str_), **arrays}
    if head is not None and head.num_attributes == len(ATTRIBUTE_NAMES):
        result["attribute_names"] = np.asarray(ATTRIBUTE_NAMES, np.str_)
    atomic_io.save_npz(output, result)
    return result


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = extract_folder(_CHECKPOINT.value, _CONFIG.value, _IMAGE_DIR.value, _OUTPUT.value,
                            step=_STEP.value, batch_size=_BATCH_SIZE.value, pre_bn=_PRE_BN.value)
    print(f"wrote {os.path.abspath(_OUTPUT.value)}: "
          + ", ".join(f"{k} {v.shape}" for k, v in result.items()))


if __name__ == "__main__":
    cli.run(main)
