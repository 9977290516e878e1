r"""Measures explanation quality: counterfactual hit rate, matching-score AUROC, AMD metrics.

  python tools/evaluate_explanations.py --checkpoint=WORKDIR/checkpoints \
      [--config=configs/agw_synthetic.py] [--data_root=DATA] --output_dir=/tmp/explain \
      [--num_counterfactuals=900] [--k=10] [--threshold=0.4]

The checkpoint needs an attribute head (tools/train_attributes.py). On the test split of
DATA (default: the config's data.root) it computes, for eq. 3.2 (paper), its complete
decomposition, the projection onto the attribute directions, eq. 3.1 matching scores and the
probability that the labels differ, where they apply:
  (1) the counterfactual hit rate, top-1/top-3 and per attribute (synthetic data roots only:
      gallery persons re-rendered with one visible attribute changed; skipped with a note on
      real Market-1501),
  (2) the AUROC of matching scores for ground-truth label agreement (all pairs, top-k; pooled
      and the mean over attributes),
  (3) AMD's Ex-Precision / Ex-mAP (_d, _s, and _s by AMD's rule) over all pairs and the top-k,
  (4) the attribute maps against the part masks (synthetic data roots; --nomeasure_maps skips,
      --map_images caps): pointing game (with a part-occlusion reference), agreement with
      part occlusion, counterfactual localisation, deletion, completeness, per attribute group
      (docs/attribute_maps.md, 'Measurements'),
against two baselines — a fixed attribute order from the training split (its identities'
labels, and its images' nearest neighbours under the model) and chance — with 95 % bootstrap
intervals over queries and counterfactual images (the top-k ranks are those of
tools/explain.py's report: the Market-1501 protocol removes gallery images of the query's
identity and camera, and junk). The training images are embedded too (cached). The all-pairs
passes log their progress (rate, ETA) every 30 s. It writes OUTPUT_DIR/explanation_metrics.json
(shown by the report of tools/explain.py on the same OUTPUT_DIR) and
OUTPUT_DIR/explanation_metrics.md (a table for the README), which it also prints. See
reid_jax/explain/quality.py and counterfactuals.py for the definitions. The settings come from
the config's ``explain`` section (reid_jax/explain/settings.py); each flag overrides one field.
"""

from __future__ import annotations

from absl import app, flags

from reid_jax import cli, embeddings
from reid_jax.explain import quality

_CHECKPOINT, _CONFIG, _DATA_ROOT = cli.define_checkpoint_flags(
    "Orbax checkpoint directory with an attribute head.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder to write into.", required=True)
_ATTRIBUTES_FILE = flags.DEFINE_string(
    "attributes_file", None, "market_attribute.mat (default: DATA_ROOT/market_attribute.mat).")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Embedding cache folder (default: OUTPUT_DIR/embeddings, as explain.py).")
# Defaults of these flags: config.explain (reid_jax.explain.settings.default_config).
_NUM_COUNTERFACTUALS = flags.DEFINE_integer(
    "num_counterfactuals", None, "Counterfactual gallery images to render (about 1/30 per "
    "attribute); 0 skips them (config.explain.num_counterfactuals, 900).")
_K = flags.DEFINE_integer("k", None, "Top ranks evaluated per query (config.explain.k, 10).")
_THRESHOLD = flags.DEFINE_string(
    "threshold", None, "Confidence threshold t_a in [0, 0.5): one value, or 30 comma-separated "
    "(one per attribute); |x_a - 0.5| > t_a selects attribute a for the matching-score AUROC "
    "(config.explain.threshold, 0.4).")
_MIN_CHANGED_PIXELS = flags.DEFINE_integer(
    "min_changed_pixels", None, "A counterfactual is kept when at least this many pixels "
    "change visibly (config.explain.min_changed_pixels, 64).")
_PIXEL_TOLERANCE = flags.DEFINE_integer(
    "pixel_tolerance", None, "A pixel changes visibly when a channel moves by more than this "
    "(of 255; config.explain.pixel_tolerance, 25).")
_SEED = flags.DEFINE_integer("seed", None, "Seeds the choice of counterfactuals and the "
                             "bootstrap (config.explain.seed, 0).")
_MEASURE_MAPS = flags.DEFINE_bool(
    "measure_maps", None, "Measure the attribute maps against the part masks: pointing game, "
    "agreement with part occlusion, counterfactual localisation, deletion, completeness "
    "(synthetic data roots; "
    "config.explain.measure_maps, True).")
_MAP_IMAGES = flags.DEFINE_integer(
    "map_images", None, "Cap on the images of each map measurement "
    "(config.explain.map_images, 48).")
_BOOTSTRAP_SAMPLES = flags.DEFINE_integer(
    "bootstrap_samples", None, "Bootstrap replicates behind the 95 % intervals "
    "(config.explain.bootstrap_samples, 1000).")

_MAP_STEPS = flags.DEFINE_integer(
    "map_steps", None, "Quadrature nodes of integrated-gradient maps "
    "(config.explain.map_steps, 32).")
_MAP_METHOD, _MAP_LAYER, _MAP_REFERENCE = cli.define_map_path_flags()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    data_root = embeddings.resolve_data_root(_DATA_ROOT.value, _CONFIG.value,
                                             _CHECKPOINT.value)
    result = quality.measure(
        checkpoint=_CHECKPOINT.value, config=_CONFIG.value, data_root=data_root,
        output_dir=_OUTPUT_DIR.value, attributes_file=_ATTRIBUTES_FILE.value,
        cache_dir=_CACHE_DIR.value, k=_K.value, threshold=_THRESHOLD.value,
        num_counterfactuals=_NUM_COUNTERFACTUALS.value,
        min_changed_pixels=_MIN_CHANGED_PIXELS.value,
        pixel_tolerance=_PIXEL_TOLERANCE.value, seed=_SEED.value,
        bootstrap_samples=_BOOTSTRAP_SAMPLES.value, measure_maps=_MEASURE_MAPS.value,
        map_images=_MAP_IMAGES.value, map_steps=_MAP_STEPS.value, map_layer=_MAP_LAYER.value,
        map_reference_images=_MAP_REFERENCE.value, map_method=_MAP_METHOD.value)
    print(result.table, end="")
    print(f"metrics: {result.json_path}")
    print(f"table:   {result.markdown_path}")


if __name__ == "__main__":
    cli.run(main)
