r"""Runs the demo for several seeds and reports how much the explanation metrics move.

  python tools/seed_spread.py --seeds=0,1,2 --workdir=/tmp/spread

For every seed S, ``tools/demo.py --workdir=WORKDIR/seed_S --seed=S`` with
``--train_override=--config.seed=S``: its own synthetic dataset and its own training run (the
AGW model and the attribute head).  A seed whose demo finished is reused (the demo skips what
is up to date).  Then WORKDIR/seed_spread.json and WORKDIR/seed_spread.md hold, per row of the
explanation-quality table and per explanation, the mean and the range (min–max) over the
seeds, and the same for the re-id mAP, rank-1 and mINP (reid_jax/explain/spread.py).  The
table is printed too.  A demo-sized seed takes 4.6-7.7 minutes of a 2-core AMD EPYC
(README, "Explanations measured").
--aggregate_only summarises the runs already in WORKDIR without running a demo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from reid_jax import atomic_io, cli
from reid_jax.explain import spread

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: one demo run each.")
flags.DEFINE_string("workdir", "seed_spread", "Folder for the runs (WORKDIR/seed_S) and the "
                    "summary.")
flags.DEFINE_string("config", None, "Training config of the demo (default: the demo's, "
                    "configs/agw_synthetic.py).")
flags.DEFINE_integer("num_train_ids", None, "Synthetic training identities (demo default).")
flags.DEFINE_integer("num_test_ids", None, "Synthetic test identities (demo default).")
flags.DEFINE_integer("train_images_per_id", None,
                     "Mean images per training identity (demo default).")
flags.DEFINE_integer("head_epochs", None, "Epochs of attribute-head training (demo default).")
flags.DEFINE_multi_string("train_override", [], "Extra `--config.X=Y` overrides for "
                          "tools/train.py in every run (repeatable).")
flags.DEFINE_bool("aggregate_only", False, "Summarise the runs in WORKDIR/seed_S as they are; "
                  "run no demo.")


def _seeds(values: list[str]) -> list[int]:
    try:
        seeds = [int(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--seeds must be integers, got {values}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise app.UsageError(f"--seeds must be distinct integers, got {values}")
    return seeds


def _demo(seed: int, workdir: str) -> None:
    given = {"config": FLAGS.config, "num_train_ids": FLAGS.num_train_ids,
             "num_test_ids": FLAGS.num_test_ids,
             "train_images_per_id": FLAGS.train_images_per_id, "head_epochs": FLAGS.head_epochs}
    cmd = [sys.executable, os.path.join(REPO, "tools", "demo.py"), f"--workdir={workdir}",
           f"--seed={seed}", f"--train_override=--config.seed={seed}",
           *(f"--{k}={v}" for k, v in given.items() if v is not None),
           *(f"--train_override={o}" for o in FLAGS.train_override)]
    print(f"\n##### seed {seed}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"tools/seed_spread.py: the demo of seed {seed} failed (exit "
                         f"{proc.returncode}); fix the error above and run again: finished "
                         "seeds and steps are reused.")
    print(f"##### seed {seed} done in {(time.time() - t0) / 60:.1f} min", flush=True)


def _load(path: str) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"tools/seed_spread.py: {path} is missing (did the demo finish?)")
    with open(path) as f:
        return json.load(f)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    seeds = _seeds(FLAGS.seeds)
    work = os.path.abspath(FLAGS.workdir)
    os.makedirs(work, exist_ok=True)
    metrics, evaluations = [], []
    for seed in seeds:
        run = os.path.join(work, f"seed_{seed}")
        if not FLAGS.aggregate_only:
            _demo(seed, run)
        metrics.append(_load(os.path.join(run, "explain", "explanation_metrics.json")))
        evaluations.append(_load(os.path.join(run, "evaluation.json")))
    try:
        result = spread.spread(metrics, evaluations, seeds)
    except ValueError as e:
        raise SystemExit(f"tools/seed_spread.py: error: {e}") from None
    text = spread.markdown(result)
    atomic_io.write_json(os.path.join(work, "seed_spread.json"), result, indent=1)
    atomic_io.write_text(os.path.join(work, "seed_spread.md"), text)
    print("\n" + text, end="")
    print(f"spread: {os.path.join(work, 'seed_spread.json')}")
    print(f"table:  {os.path.join(work, 'seed_spread.md')}")


if __name__ == "__main__":
    cli.run(main)
