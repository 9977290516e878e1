r"""The paper's analysis of the embedding (Table 4.1, Figure 4.1), see ``reid_jax.analysis``.

From arrays (W of the attribute layer, gallery features written by tools/extract_features.py):

  python tools/analyze.py --weights=W.npy --features=gallery.npz \
      --attributes_file=DATA/market_attribute.mat --output_dir=/tmp/analysis

From a checkpoint with an attribute head (features of the gallery of --data_root computed here
unless --features is given; ratios from DATA_ROOT/market_attribute.mat):

  python tools/analyze.py --checkpoint=WORKDIR/checkpoints --data_root=DATA \
      --output_dir=/tmp/analysis --components=12,873

Writes table_4_1.md, table_4_1.csv, table_4_1.png and component_<n>.png (for --components, or
the --num_selective most selective components) into --output_dir and prints the table.
Positive ratios are per identity of the training split of --attributes_file; without one, per
identity of the ground-truth labels stored under the key 'attribute_labels' of the --features
file (uint8/bool [G, A] in {0, 1}, one row per image; stated in the table caption), else left
out. The key 'attributes' that tools/extract_features.py writes holds *predicted*
probabilities: it is never read as labels. Errors (missing files, bad shapes or keys) are
printed as one line and exit with status 1.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from reid_jax import analysis, cli, embeddings
from reid_jax.data.attributes import ATTRIBUTE_NAMES, load_market_attributes, positive_ratios
from reid_jax.synthetic.dataset import ATTRIBUTE_FILE

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder to write into.", required=True)
_WEIGHTS = flags.DEFINE_string("weights", None, "W [N, A] of the attribute layer (.npy).")
_FEATURES = flags.DEFINE_string(
    "features", None, f".npz with {analysis.FEATURE_KEYS}, e.g. from tools/extract_features.py "
    "(its 'attributes' are predicted probabilities and are not used as labels; ground-truth "
    "per-image labels go under 'attribute_labels').")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Checkpoint directory with an attribute head (W; and the model for "
    "gallery features when --features is not given).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config of the checkpoint's model (default: the one stored in it).")
_DATA_ROOT = flags.DEFINE_string(
    "data_root", None, "Market-1501-layout root: gallery images, market_attribute.mat.")
_ATTRIBUTE_FILE = flags.DEFINE_string(
    "attributes_file", None, "market_attribute.mat for the positive ratios (default: "
    "DATA_ROOT/market_attribute.mat when it exists).")
# The name of earlier versions, still accepted (the other tools spell it --attributes_file).
flags.DEFINE_alias("attribute_file", "attributes_file")
_COMPONENTS = flags.DEFINE_list(
    "components", None, "Embedding components to draw (e.g. 12,873); default: the "
    "--num_selective most selective ones.")
_NUM_SELECTIVE = flags.DEFINE_integer("num_selective", 4, "Most selective components to draw.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 10, "Images per row of a component figure.")
_TOP1 = flags.DEFINE_enum("top1", "signed", list(analysis.TOP1_RULES),
                          "signed: the paper's highest weight; abs: largest |weight|.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size for gallery features.")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Embedding cache folder of the gallery features (default: "
    "CHECKPOINT/embedding_cache, shared with tools/evaluate.py; '' disables the cache).")


def _checkpoint_gallery_features(checkpoint: str, config, data_root: str, batch_size: int,
                                 cache_dir: str | None) -> tuple[np.ndarray, tuple[str, ...]]:
    """The retrieval embedding ([G, N], what is ranked and explained) of every gallery image."""
    gallery = embeddings.load_split_embeddings(
        checkpoint, config, data_root, ("gallery",),
        embeddings.cache_dir_option(cache_dir, checkpoint), batch_size=batch_size)["gallery"]
    return gallery.features, gallery.paths


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (_WEIGHTS.value is None) == (_CHECKPOINT.value is None):
        raise app.UsageError("give exactly one of --weights=W.npy or --checkpoint=DIR")
    _analyze()


def _analyze() -> None:
    weights = (np.load(_WEIGHTS.value, allow_pickle=False) if _WEIGHTS.value
               else embeddings.head_weights(_CHECKPOINT.value))
    names = ATTRIBUTE_NAMES
    analysis.check_weights(weights, names)

    features = paths = labels = None
    if _FEATURES.value:
        loaded = analysis.load_features_npz(_FEATURES.value, _DATA_ROOT.value)
        features, paths, labels = loaded.features, loaded.paths, loaded.attribute_labels
        if labels is None and loaded.attributes is not None:
            logging.info("%s: 'attributes' holds predicted probabilities, not labels; it is "
                         "not used for the positive ratios (store ground-truth labels under "
                         "'attribute_labels')", _FEATURES.value)
    elif _CHECKPOINT.value and _DATA_ROOT.value:
        features, paths = _checkpoint_gallery_features(
            _CHECKPOINT.value, _CONFIG.value, _DATA_ROOT.value, _BATCH_SIZE.value,
            _CACHE_DIR.value)

    attribute_file = _ATTRIBUTE_FILE.value
    if attribute_file is None and _DATA_ROOT.value:
        default = os.path.join(_DATA_ROOT.value, ATTRIBUTE_FILE)
        attribute_file = default if os.path.isfile(default) else None
    ratios, source = None, ""
    if attribute_file:
        train = load_market_attributes(attribute_file).train_labels
        ratios = positive_ratios(train)
        source = (f"training split, per identity: {train.shape[0]} identities of "
                  f"{os.path.basename(attribute_file)}")
    elif labels is not None:
        ratios, num_ids = analysis.identity_positive_ratios(
            labels, analysis.pids_from_paths(paths))
        source = (f"NOT the training split: per identity of the features file's labels, "
                  f"{num_ids} identities")
    else:
        logging.warning("no --attributes_file and no 'attribute_labels' in --features: "
                        "Table 4.1 without positive ratios")

    components = None
    if _COMPONENTS.value:
        try:
            components = [int(c) for c in _COMPONENTS.value]
        except ValueError as e:
            raise app.UsageError(f"--components must be integers, got {_COMPONENTS.value}") from e
    summary = analysis.write_analysis(
        weights, names, _OUTPUT_DIR.value, positive_ratio_percent=ratios, ratio_source=source,
        features=features, image_paths=paths, components=components,
        num_selective=_NUM_SELECTIVE.value, num_images=_NUM_IMAGES.value, by=_TOP1.value)
    print(summary["markdown"])
    for n, s in zip(summary["components"], summary["selectivity"], strict=True):
        print(f"component {n}: selectivity max|w|/sum|w| = {s:.3f}")
    print("wrote:\n  " + "\n  ".join(summary["files"]))


if __name__ == "__main__":
    cli.run(main)
