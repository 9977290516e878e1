r"""Trains the paper's attribute head on the frozen embedding of a trained AGW checkpoint.

  python tools/train_attributes.py --checkpoint=WORKDIR/checkpoints \
      [--config=configs/agw_market1501.py] [--data_root=DATA] \
      [--attributes_file=DATA/market_attribute.mat] [--epochs=30 --lr=1e-3 --batch_size=64]

Computes the retrieval embeddings (``config.model.retrieval_feature``; by default post-BN,
L2-normalised) of the train, query and gallery
images once (cached in CHECKPOINT/embedding_cache), trains the N x 30 bias-free layer with Adam
on the weighted BCE (the re-id weights are never changed), prints mA / accuracy / precision /
recall / F1 overall and per attribute on the test identities (query + gallery images with
labels), writes them to CHECKPOINT/attribute_metrics.json and saves a new checkpoint step with
the unchanged model and the head (``reid_jax.checkpoints.restore_attribute_head`` reads it) and,
with the head, its balanced accuracy per attribute on those test images
(``reid_jax.checkpoints.restore_head_accuracy``): the report and the explorer mark the
attributes it has not learned (docs/attribute_maps.md, 'Attributes the model has not learned').
``reid_jax.train.attribute_training`` has the details.

The head fits this checkpoint's embedding only: a later ``tools/train.py`` run in the same workdir
resumes from the new step but writes its steps without the head (training changes the
embedding); train the head again after training.

--config defaults to the config stored in the checkpoint; --data_root to its config.data.root.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from reid_jax import cli, embeddings
from reid_jax.explain import learned
from reid_jax.train import attribute_training

_CHECKPOINT, _CONFIG, _DATA_ROOT = cli.define_checkpoint_flags(
    "Orbax checkpoint directory of the re-id model (e.g. WORKDIR/checkpoints).")
_ATTRIBUTES_FILE = flags.DEFINE_string(
    "attributes_file", None, "market_attribute.mat (default: DATA_ROOT/market_attribute.mat).")
# Defaults of these flags: config.attributes (reid_jax.train.attribute_training.default_config).
_EPOCHS = flags.DEFINE_integer("epochs", None, "Passes over the training embeddings "
                               "(config.attributes.epochs, 30).")
_LR = flags.DEFINE_float("lr", None, "Adam learning rate (config.attributes.learning_rate, 1e-3).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Embeddings per training step "
                                   "(config.attributes.batch_size, 64).")
_WEIGHT_DECAY = flags.DEFINE_float(
    "weight_decay", None, "AdamW decoupled weight decay, 0: Adam (config.attributes.weight_decay, "
    "0).")
_SEED = flags.DEFINE_integer("seed", None, "Head initialisation and shuffling seed "
                             "(config.attributes.seed, 0).")
_CALIBRATION_FOLDS = flags.DEFINE_integer(
    "calibration_folds", None, "Identity folds of the head's calibration, fitted on held-out "
    "training identities and used by the disagreement explanation; 0: none "
    "(config.attributes.calibration_folds, 4).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of the re-id model (default: latest).")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Embedding cache folder (default: CHECKPOINT/embedding_cache; "
    "'' disables the cache).")
_METRICS_FILE = flags.DEFINE_string(
    "metrics_file", None, "Output JSON (default: CHECKPOINT/attribute_metrics.json).")
_EMBED_BATCH_SIZE = flags.DEFINE_integer(
    "embed_batch_size", None, "Batch size of the embedding pass (default: "
    "config.data.eval_batch_size).")
_NO_SAVE = flags.DEFINE_bool("no_save", False, "Only report metrics; do not save the head.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    try:
        data_root = embeddings.resolve_data_root(_DATA_ROOT.value, config, _CHECKPOINT.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    try:
        train_config = attribute_training.head_train_config(
            embeddings.restore_config(_CHECKPOINT.value, config, _STEP.value),
            epochs=_EPOCHS.value, learning_rate=_LR.value, batch_size=_BATCH_SIZE.value,
            weight_decay=_WEIGHT_DECAY.value, seed=_SEED.value,
            calibration_folds=_CALIBRATION_FOLDS.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    cache_dir = embeddings.cache_dir_option(_CACHE_DIR.value, _CHECKPOINT.value)
    result = attribute_training.train_attributes(
        _CHECKPOINT.value, config, data_root, attributes_file=_ATTRIBUTES_FILE.value,
        train_config=train_config, cache_dir=cache_dir, metrics_path=_METRICS_FILE.value,
        step=_STEP.value, embed_batch_size=_EMBED_BATCH_SIZE.value, save=not _NO_SAVE.value)
    training = result["training"]
    print(f"training: {training['num_images']} images, loss {training['initial_loss']:.4f} -> "
          f"{training['final_loss']:.4f} in {training['seconds']:.2f} s")
    cal = training["calibration"]
    if cal is not None:
        raw, fitted = np.mean(cal["heldout_loss_raw"]), np.mean(cal["heldout_loss_calibrated"])
        print(f"calibration: {cal['folds']} identity folds in {cal['seconds']:.1f} s, held-out "
              f"logistic loss {raw:.4f} -> {fitted:.4f}")
    # What the head has not learned (the report and the explorer mark these attributes).
    head = learned.summary({name: row["two_class_accuracy"]
                            for name, row in result["test"]["per_attribute"].items()})
    if head["not_learned"]:
        print(f"not learned (balanced accuracy on the test images below "
              f"{100 * head['min_accuracy']:.0f} %): "
              + ", ".join(f"{n} {100 * head['accuracy'][n]:.0f} %" for n in head["not_learned"]))
    saved = result["checkpoint"]["saved_step"]
    if saved is not None:
        print(f"saved the attribute head as step {saved} of {result['checkpoint']['directory']} "
              "(training this workdir further drops it: run this tool again afterwards)")


if __name__ == "__main__":
    cli.run(main)
