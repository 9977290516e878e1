r"""Explains the re-id rankings of many queries: JSONL records and an HTML report.

  python tools/explain.py --checkpoint=WORKDIR/checkpoints --config=configs/agw_market1501.py \
      --data_root=DATA --output_dir=/tmp/explain [--num_queries=100 | --query_files=a.jpg,b.jpg] \
      [--k=10] [--threshold=0.4] [--mode=paper|complete|projection|disagreement] \
      [--order=query|worst_ap] [--error_ranks=1,3,10] [--report_queries=50] \
      [--attribute_maps [--map_queries=20] [--map_method=deeplift] [--map_layer=2]]

The settings come from the config's ``explain`` section (reid_jax/explain/settings.py; the
checkpoint's stored config unless --config is given); each flag overrides one field, and so
does ``--config.explain.FIELD=VALUE`` with --config.

Queries: every query by default; --num_queries=N takes the FIRST N query files by file name (not
the N worst; --order then orders those), --query_files names them.

The checkpoint needs an attribute head (tools/train_attributes.py; train it again after every
tools/train.py run in the workdir: later training steps carry no head). Embeddings are computed once
and cached in OUTPUT_DIR/embeddings. Writes OUTPUT_DIR/explanations.jsonl (every query),
OUTPUT_DIR/summary.json and OUTPUT_DIR/report/index.html (the first --report_queries queries
drawn); see reid_jax.explain.run and reid_jax.explain.report. Render the report with
tools/screenshot_report.sh.

--attribute_maps also writes OUTPUT_DIR/maps/<query stem>.npz per mapped query: evidence maps
of the query and its top k and contribution maps of the k pairs (mode paper or complete only),
drawn as overlays in the report (docs/attribute_maps.md, 'Outputs'). Maps take about as long
as 20-40 forward passes per image, so --map_queries limits them to the first queries of the
run's order.
"""

from __future__ import annotations

from absl import app, flags

from reid_jax import cli, embeddings
from reid_jax.explain import report, settings
from reid_jax.explain import run as explain_run

_CHECKPOINT, _CONFIG, _DATA_ROOT = cli.define_checkpoint_flags(
    "Orbax checkpoint directory with an attribute head.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder to write into.", required=True)
_NUM_QUERIES = flags.DEFINE_integer(
    "num_queries", None, "Explain the FIRST N query files by file name (not the N worst; "
    "--order then orders those N). Default: every query.")
_QUERY_FILES = flags.DEFINE_list("query_files", None, "Explain these query files (base names).")
# Defaults of these flags: config.explain (reid_jax.explain.settings.default_config).
_K = flags.DEFINE_integer("k", None, "Ranks explained per query (config.explain.k, 10).")
_THRESHOLD = flags.DEFINE_string(
    "threshold", None, "Confidence threshold t_a in [0, 0.5): one value, or 30 comma-separated "
    "(one per attribute); |x_a - 0.5| > t_a selects attribute a (config.explain.threshold, 0.4).")
_MODE = flags.DEFINE_enum("mode", None, list(settings.MODES),
                          "paper: eq. 3.2; complete: the decomposition that sums to the distance; "
                          "projection: the distance along the attribute directions, with the "
                          "remainder as its own part; disagreement: the probability that the "
                          "labels differ (config.explain.mode, paper).")
_ORDER = flags.DEFINE_enum("order", None, list(settings.ORDERS),
                           "query: file-name order; worst_ap: lowest average precision first "
                           "(config.explain.order, query).")
_ERROR_RANKS = flags.DEFINE_list(
    "error_ranks", None, "Ranks whose error composition is drawn (config.explain.error_ranks: "
    "1,3,10 up to k).")
_REPORT_QUERIES = flags.DEFINE_integer(
    "report_queries", None, "Queries drawn in the HTML report, -1: all; the JSONL has all "
    "(config.explain.report_queries, 50).")
_EXPLANATION_METRICS = flags.DEFINE_string(
    "explanation_metrics", None, "explanation_metrics.json to show on the summary page "
    "(default: OUTPUT_DIR/explanation_metrics.json when it exists).")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Embedding cache folder (default: OUTPUT_DIR/embeddings).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace explanations.jsonl, summary.json or report/ in --output_dir "
    "when this tool did not write them (they are moved aside to NAME.replaced-<time>); without "
    "it such an output folder is refused.")
_ATTRIBUTE_MAPS = flags.DEFINE_bool(
    "attribute_maps", None, "Write evidence and contribution maps of the explained queries to "
    "OUTPUT_DIR/maps and draw them in the report; needs --mode=paper or complete "
    "(config.explain.attribute_maps, False).")
_MAP_QUERIES = flags.DEFINE_integer(
    "map_queries", None, "Maps for the first N queries of the run's order, -1: all "
    "(config.explain.map_queries, -1).")
_MAP_STEPS = flags.DEFINE_integer(
    "map_steps", None, "Quadrature nodes of integrated-gradient maps "
    "(config.explain.map_steps, 32).")
_QUERY_CHUNK = flags.DEFINE_integer(
    "query_chunk", None, "Queries per kernel call (config.explain.query_chunk, 256).")
_REPORT_WORKERS = flags.DEFINE_integer(
    "report_workers", None, "Processes that draw the report's error figures (1: this one). "
    f"Default: one per usable core, at most {report.FIGURE_WORKERS_MAX}, when the report has "
    f"{report.FIGURE_POOL_MIN} figures or more.", lower_bound=0)


def _rank(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--error_ranks must be ranks (integers), got {text!r}") from None

_MAP_METHOD, _MAP_LAYER, _MAP_REFERENCE = cli.define_map_path_flags()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _NUM_QUERIES.value is not None and _QUERY_FILES.value:
        raise app.UsageError("give --num_queries or --query_files, not both")
    queries = _NUM_QUERIES.value if _NUM_QUERIES.value is not None else (
        _QUERY_FILES.value or "all")
    error_ranks = (None if _ERROR_RANKS.value is None
                   else [_rank(r) for r in _ERROR_RANKS.value])
    data_root = embeddings.resolve_data_root(_DATA_ROOT.value, _CONFIG.value, _CHECKPOINT.value)
    result = explain_run.run(
        checkpoint=_CHECKPOINT.value, config=_CONFIG.value, data_root=data_root,
        output_dir=_OUTPUT_DIR.value, queries=queries, k=_K.value, threshold=_THRESHOLD.value,
        mode=_MODE.value, order=_ORDER.value, error_ranks=error_ranks,
        report_queries=_REPORT_QUERIES.value, query_chunk=_QUERY_CHUNK.value,
        explanation_metrics=_EXPLANATION_METRICS.value, cache_dir=_CACHE_DIR.value,
        overwrite=_OVERWRITE.value, attribute_maps=_ATTRIBUTE_MAPS.value,
        map_queries=_MAP_QUERIES.value, map_steps=_MAP_STEPS.value,
        map_layer=_MAP_LAYER.value, map_reference_images=_MAP_REFERENCE.value,
        map_method=_MAP_METHOD.value, report_workers=_REPORT_WORKERS.value)
    s = result.summary
    print(f"explained {s['num_queries']} queries ({s['num_valid_queries']} with a valid match): "
          f"mAP {100 * s['mAP']:.2f} %, Rank-1 {100 * s['cmc'][0]:.2f} %, "
          f"mINP {100 * s['mINP']:.2f} %")
    print(f"records: {result.jsonl}")
    print(f"report:  {result.report_index}")


if __name__ == "__main__":
    cli.run(main)
