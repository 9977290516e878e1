r"""Re-id and attribute metrics of a checkpoint on query / gallery, printed and written as JSON.

  python tools/evaluate.py --checkpoint=WORKDIR/checkpoints --data_root=DATA \
      [--config=configs/agw_market1501.py] [--output=metrics.json]

Re-id (Market-1501 protocol, ``reid_jax.evaluation.rank_metrics``): mAP, CMC rank-1/5/10 and
mINP of the retrieval embedding (``config.model.retrieval_feature``: by default post-BN,
L2-normalised; squared Euclidean distance). When the
checkpoint step has an attribute head (``tools/train_attributes.py``): mA, accuracy, precision,
recall, F1 overall and per attribute on the query + gallery images with labels
(``reid_jax.train.attribute_training.evaluate_attribute_head``; labels from
--attributes_file, default DATA_ROOT/market_attribute.mat).

Embeddings are cached in CHECKPOINT/embedding_cache (``reid_jax.embeddings``), so evaluating again
or after training the head does not recompute them. --output defaults to
CHECKPOINT/evaluation.json; it is written atomically.
"""

from __future__ import annotations

import os
from typing import Any

from absl import app, flags, logging

from reid_jax import atomic_io, checkpoints, cli, embeddings, evaluation
from reid_jax.data import attributes as attributes_lib
from reid_jax.train import attribute_training

_CHECKPOINT, _CONFIG, _DATA_ROOT = cli.define_checkpoint_flags(
    "Orbax checkpoint directory.")
_ATTRIBUTES_FILE = flags.DEFINE_string(
    "attributes_file", None, "market_attribute.mat (default: DATA_ROOT/market_attribute.mat).")
_OUTPUT = flags.DEFINE_string("output", None,
                              "Output JSON (default: CHECKPOINT/evaluation.json).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Embedding cache folder (default: CHECKPOINT/embedding_cache; "
    "'' disables the cache).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Embedding batch size (default: config.data.eval_batch_size).")

REPORTED_RANKS = evaluation.REPORTED_RANKS
OUTPUT_FILE = "evaluation.json"


def evaluate_checkpoint(
    checkpoint_dir: str,
    config: Any,
    data_root: str,
    *,
    attributes_file: str | None = None,
    step: int | None = None,
    cache_dir: str | None = "default",
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Re-id metrics (and attribute metrics when the step has a head) of a checkpoint.

    Returns:
      ``{"reid": {mAP, mINP, rank1, rank5, rank10, cmc [50], num_valid_queries, num_query,
      num_gallery}, "attributes": evaluate_attribute_head(...) or None, "checkpoint":
      {directory, step}, "data_root"}``.
    """
    directory = os.path.abspath(checkpoint_dir)
    step = checkpoints.resolve_step(directory, step)
    if cache_dir == "default":
        cache_dir = embeddings.default_cache_dir(directory)
    emb = embeddings.load_split_embeddings(directory, config, data_root, ("query", "gallery"),
                                          cache_dir, step=step, batch_size=batch_size)
    query, gallery = emb["query"], emb["gallery"]
    reid = {**evaluation.retrieval_metrics(query.features, gallery.features, query.pids,
                                           gallery.pids, query.cameras, gallery.cameras),
            "num_query": len(query.paths), "num_gallery": len(gallery.paths)}

    attribute_result = None
    if checkpoints.has_attribute_head(directory, step):
        path = attributes_file or os.path.join(data_root, attribute_training.ATTRIBUTE_FILE)
        if attributes_file is None and not os.path.isfile(path):
            logging.warning("the checkpoint has an attribute head but %s does not exist; no "
                            "attribute metrics (pass --attributes_file)", path)
        else:
            head = checkpoints.restore_attribute_head(directory, step)
            attrs = attributes_lib.load_market_attributes(path)
            attribute_result = attribute_training.evaluate_attribute_head(
                head, attrs, [query, gallery])
    else:
        logging.info("checkpoint step %d has no attribute head: re-id metrics only. %s", step,
                     checkpoints.NO_HEAD_HINT)
    return {"reid": reid, "attributes": attribute_result,
            "checkpoint": {"directory": directory, "step": int(step)},
            "data_root": os.path.abspath(data_root)}


def format_reid_table(reid: dict[str, Any]) -> str:
    """One header line and one row of percentages."""
    names = ["mAP", *(f"rank{r}" for r in REPORTED_RANKS), "mINP"]
    header = "".join(f"{n:>9}" for n in names)
    row = "".join(f"{100.0 * reid[n]:>9.2f}" for n in names)
    return (f"{header}\n{row}\n({reid['num_valid_queries']} valid queries of "
            f"{reid['num_query']}, gallery {reid['num_gallery']})")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    try:
        data_root = embeddings.resolve_data_root(_DATA_ROOT.value, config, _CHECKPOINT.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    cache_dir = embeddings.cache_dir_option(_CACHE_DIR.value, _CHECKPOINT.value)
    result = evaluate_checkpoint(_CHECKPOINT.value, config, data_root,
                      attributes_file=_ATTRIBUTES_FILE.value, step=_STEP.value,
                      cache_dir=cache_dir, batch_size=_BATCH_SIZE.value)
    print(f"re-id, checkpoint {result['checkpoint']['directory']} step "
          f"{result['checkpoint']['step']} on {data_root} (percent):")
    print(format_reid_table(result["reid"]))
    if result["attributes"] is not None:
        print("\nattributes (percent):")
        print(attribute_training.format_attribute_table(result["attributes"]))
    output = _OUTPUT.value or os.path.join(os.path.abspath(_CHECKPOINT.value), OUTPUT_FILE)
    print(f"wrote {atomic_io.write_json(output, result)}")


if __name__ == "__main__":
    cli.run(main)
