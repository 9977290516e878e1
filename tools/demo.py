r"""The main job end to end on the generated synthetic dataset (what `make demo` runs).

Steps, each the tool a user would run, each skipped when its output already exists, so a second
run reuses what the first made (training resumes from its latest checkpoint):

1. `tools/make_synthetic.py`   -> WORKDIR/data (Market-1501-shaped) + contact sheet
2. `tools/train.py`            -> WORKDIR/train (AGW, `configs/agw_synthetic.py`)
3. `tools/train_attributes.py` -> the attribute head, saved into the same checkpoint
4. `tools/evaluate.py`         -> WORKDIR/evaluation.json (mAP, CMC, mINP, attribute mA)
5. `tools/evaluate_explanations.py` -> WORKDIR/explain/explanation_metrics.{json,md}
6. `tools/explain.py`          -> WORKDIR/explain/explanations.jsonl + report/index.html, with
                                  attribute maps (maps/*.npz, overlays) of the first page
7. `tools/analyze.py`          -> WORKDIR/analysis (Table 4.1, Figure 4.1)

    python tools/demo.py --workdir=demo_run
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import flags

from reid_jax import atomic_io, cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
# Programs that compile faster than this are not worth a file in the cache.
CACHE_MIN_COMPILE_SECONDS = 0.2

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "demo_run", "Folder for everything the demo makes.")
flags.DEFINE_string("config", os.path.join(REPO, "configs", "agw_synthetic.py"),
                    "Training config.")
# Many training identities with few images each (docs/training.md, "The demo's data"):
# as many images, and so as much training time, as 60 identities of 11 images, but the model
# learns more of the attributes.
flags.DEFINE_integer("num_train_ids", 160, "Synthetic training identities.")
flags.DEFINE_integer("train_images_per_id", 4, "Mean images per training identity.")
flags.DEFINE_integer("num_test_ids", 60, "Synthetic test identities.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic dataset.")
# Unset: the config's own value (configs/agw_synthetic.py: attributes.epochs 200,
# attributes.learning_rate 1e-2, explain.threshold 0.4).
flags.DEFINE_integer("head_epochs", None, "Epochs of attribute-head training "
                     "(default: config.attributes.epochs).")
flags.DEFINE_float("head_lr", None, "Learning rate of attribute-head training "
                   "(default: config.attributes.learning_rate).")
flags.DEFINE_string("threshold", None, "Confidence threshold t of the explanations "
                    "(default: config.explain.threshold).")
flags.DEFINE_multi_string("train_override", [],
                          "Extra `--config.X=Y` overrides for tools/train.py (repeatable).")


def _child_env() -> dict[str, str]:
    """The steps' environment: XLA programs compiled by one step are reused by the later ones
    from ``WORKDIR/jax_cache`` (JAX's persistent compilation cache; README, "What `make demo`
    does"), unless the user set a cache of their own."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR",
                   os.path.join(os.path.abspath(FLAGS.workdir), "jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(CACHE_MIN_COMPILE_SECONDS))
    return env


def _run(step: str, tool: str, *args: str) -> None:
    cmd = [sys.executable, os.path.join(TOOLS, tool), *args]
    print(f"\n=== {step}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=_child_env())
    if proc.returncode != 0:
        raise SystemExit(f"demo step '{step}' failed (exit {proc.returncode}); fix the error "
                         f"above and run the demo again: finished steps are reused.")
    print(f"=== {step} done in {time.time() - t0:.0f} s", flush=True)


def _given(**values) -> list[str]:
    """``--name=value`` for the flags the user set (the others come from the config)."""
    return [f"--{name}={value}" for name, value in values.items() if value is not None]


def _skip(step: str, why: str) -> None:
    print(f"\n=== {step}: skipped ({why})", flush=True)


class _Record:
    """Which steps ran with which arguments on which checkpoint step (WORKDIR/demo_steps.json).

    A step is reused when its output exists and it ran with the same arguments on the same
    checkpoint; anything else runs it again.
    """

    def __init__(self, path: str):
        self.path = path
        self.done = {}
        if os.path.exists(path):
            with open(path) as f:
                self.done = json.load(f)

    def run(self, step: str, output: str, key: dict, tool: str, *args: str) -> None:
        key = {**key, "args": list(args)}
        if os.path.exists(output) and self.done.get(step) == key:
            _skip(step, f"{output} is up to date")
            return
        self.done.pop(step, None)
        _run(step, tool, *args)
        self.done[step] = key
        atomic_io.write_json(self.path, self.done)


def _check_data(data: str, work: str) -> None:
    """Stops when WORKDIR/data was made with other generator settings than this demo asks for
    (e.g. by an earlier version's demo): reusing it would quietly train and explain another
    dataset, and deleting it is the user's call."""
    path = os.path.join(data, "synthetic_meta.json")
    try:
        with open(path) as f:
            made = json.load(f).get("config") or {}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e}); delete {data} to make the data "
                         "again") from e
    # Data of versions before train_images_per_id gave every identity images_per_id images.
    have = {"num_train_ids": made.get("num_train_ids"), "num_test_ids": made.get("num_test_ids"),
            "train_images_per_id": made.get("train_images_per_id") or made.get("images_per_id"),
            "seed": made.get("seed")}
    wanted = {"num_train_ids": FLAGS.num_train_ids, "num_test_ids": FLAGS.num_test_ids,
              "train_images_per_id": FLAGS.train_images_per_id, "seed": FLAGS.seed}
    differ = [k for k in wanted if have[k] != wanted[k]]
    if differ:
        made_text = " ".join(f"--{k}={have[k]}" for k in differ)
        asked_text = " ".join(f"--{k}={wanted[k]}" for k in differ)
        raise ValueError(
            f"{data} was made with {made_text}, this demo asks for {asked_text} (an earlier "
            f"version's demo?): delete {work} or pass another --workdir to run the demo anew, "
            f"or pass {made_text} to keep using that data")


def _check_training(checkpoint: str, data: str) -> None:
    """Stops when WORKDIR/train holds a model trained with another config than this demo's (by
    an earlier version's demo, say): training would resume, find the run finished and keep that
    model (docs/design.md, "Resuming")."""
    from absl import flags as absl_flags
    from ml_collections import config_flags

    from reid_jax import checkpoints
    from reid_jax.train import loop

    argv = ["train.py", f"--config={FLAGS.config}", f"--config.data.root={data}",
            *FLAGS.train_override]
    values = absl_flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    try:
        values(argv, known_only=True)
        saved = checkpoints.restore_meta(checkpoint).get("config") or {}
    except (absl_flags.Error, OSError, ValueError, KeyError):
        return  # tools/train.py reports a config or checkpoint it cannot read, in its own words
    changes = loop.config_changes(saved, values.config)
    if changes:
        train_dir = os.path.dirname(checkpoint)
        raise ValueError(
            f"{train_dir} holds a model trained with another config than this demo's "
            f"({'; '.join(changes)}; an earlier version's demo?): delete {train_dir} to train "
            f"it anew (the data is kept), or pass another --workdir")


def main(argv):
    del argv
    started = time.time()
    work = os.path.abspath(FLAGS.workdir)
    data = os.path.join(work, "data")
    train_dir = os.path.join(work, "train")
    checkpoint = os.path.join(train_dir, "checkpoints")
    explain_dir = os.path.join(work, "explain")
    analysis_dir = os.path.join(work, "analysis")
    evaluation = os.path.join(work, "evaluation.json")
    os.makedirs(work, exist_ok=True)

    if os.path.exists(os.path.join(data, "synthetic_meta.json")):
        _check_data(data, work)
        _skip("synthetic data", f"{data} exists")
    else:
        _run("synthetic data", "make_synthetic.py", f"--output_dir={data}",
             f"--num_train_ids={FLAGS.num_train_ids}", f"--num_test_ids={FLAGS.num_test_ids}",
             f"--train_images_per_id={FLAGS.train_images_per_id}",
             f"--seed={FLAGS.seed}", "--num_workers=2",
             f"--contact_sheet={os.path.join(work, 'contact_sheet.png')}")

    # Training resumes from its latest checkpoint and returns at once when it is complete.
    if os.path.isdir(checkpoint) and os.listdir(checkpoint):
        _check_training(checkpoint, data)
    _run("train AGW", "train.py", f"--config={FLAGS.config}", f"--workdir={train_dir}",
         f"--config.data.root={data}", *FLAGS.train_override)

    from reid_jax import checkpoints  # imported late (jax): the demo prints its first step at once
    from reid_jax.explain import report

    if checkpoints.has_attribute_head(checkpoint) and (
            checkpoints.restore_head_accuracy(checkpoint) is not None):
        _skip("attribute head", "the checkpoint has one")
    else:
        if checkpoints.has_attribute_head(checkpoint):  # saved by an earlier version
            print("the attribute head was saved without its test accuracy: training it again, "
                  "so that the report marks the attributes it has not learned", flush=True)
        _run("attribute head", "train_attributes.py", f"--checkpoint={checkpoint}",
             f"--data_root={data}", *_given(epochs=FLAGS.head_epochs, lr=FLAGS.head_lr))

    record = _Record(os.path.join(work, "demo_steps.json"))
    key = {"checkpoint_step": checkpoints.latest_step(checkpoint)}
    record.run("evaluate", evaluation, key, "evaluate.py", f"--checkpoint={checkpoint}",
               f"--data_root={data}", f"--output={evaluation}")
    record.run("measure explanations", os.path.join(explain_dir, "explanation_metrics.json"), key,
               "evaluate_explanations.py", f"--checkpoint={checkpoint}", f"--data_root={data}",
               f"--output_dir={explain_dir}", *_given(threshold=FLAGS.threshold))
    record.run("explain rankings", os.path.join(explain_dir, "report", "index.html"), key,
               "explain.py", f"--checkpoint={checkpoint}", f"--data_root={data}",
               f"--output_dir={explain_dir}", "--order=worst_ap",
               # Maps of the report's first page (docs/attribute_maps.md, 'Outputs').
               "--attribute_maps", f"--map_queries={report.PAGE_SIZE}",
               *_given(threshold=FLAGS.threshold))
    record.run("analysis", os.path.join(analysis_dir, "table_4_1.md"), key, "analyze.py",
               f"--checkpoint={checkpoint}", f"--data_root={data}",
               f"--output_dir={analysis_dir}")

    with open(evaluation) as f:
        metrics = json.load(f)
    print("\n" + "=" * 72)
    print(f"demo finished in {(time.time() - started) / 60:.1f} min; everything is in {work}")
    reid, attrs = metrics["reid"], metrics.get("attributes") or {}
    line = (f"synthetic test split ({reid['num_valid_queries']} queries): "
            f"mAP {100 * reid['mAP']:.1f} %, rank-1 {100 * reid['rank1']:.1f} %, "
            f"rank-5 {100 * reid['rank5']:.1f} %, mINP {100 * reid['mINP']:.1f} %")
    if attrs:
        line += f"; attribute mA {100 * attrs['mA']:.1f} %"
    print(line)
    print(f"report:      {os.path.join(explain_dir, 'report', 'index.html')}")
    print(f"metrics:     {os.path.join(explain_dir, 'explanation_metrics.md')}")
    print(f"analysis:    {os.path.join(analysis_dir, 'table_4_1.md')}")
    print(f"data sheet:  {os.path.join(work, 'contact_sheet.png')}")


if __name__ == "__main__":
    cli.run(main)
