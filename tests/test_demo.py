"""tools/demo.py: it refuses to reuse data made with other generator settings (an earlier
version's demo folder) before any work, naming both settings and the ways out; it trains again
a head saved without its test accuracy and reruns the steps that used it; a second run reuses
every step."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import REPO, TINY_EPOCHS, file_bytes, run_tool

from reid_jax import checkpoints
from reid_jax.data.attributes import ATTRIBUTE_NAMES


def _meta(workdir, config) -> None:
    data = workdir / "data"
    data.mkdir(parents=True)
    (data / "synthetic_meta.json").write_text(json.dumps({"config": config}))


@pytest.mark.parametrize("config, made, asked", [
    # An earlier version's demo data: 60 identities of 11 images, no train_images_per_id.
    ({"num_train_ids": 60, "num_test_ids": 60, "images_per_id": 11, "seed": 0},
     "--num_train_ids=60 --train_images_per_id=11",
     "--num_train_ids=160 --train_images_per_id=4"),
    ({"num_train_ids": 160, "num_test_ids": 60, "images_per_id": 11, "train_images_per_id": 4,
      "seed": 3}, "--seed=3", "--seed=0"),
])
def test_demo_refuses_data_made_with_other_settings(tmp_path, config, made, asked):
    work = tmp_path / "demo_run"
    _meta(work, config)
    proc = run_tool("demo.py", f"--workdir={work}", expect_ok=False, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"tools/demo.py: error: {work / 'data'} was made with {made}, this demo "
                    f"asks for {asked} (an earlier version's demo?): delete {work} or pass "
                    f"another --workdir to run the demo anew, or pass {made} to keep using "
                    "that data")
    assert sorted(p.name for p in work.iterdir()) == ["data"]  # nothing started, nothing lost


def test_demo_names_an_unreadable_data_record(tmp_path):
    work = tmp_path / "demo_run"
    (work / "data").mkdir(parents=True)
    (work / "data" / "synthetic_meta.json").write_text("{not json")
    proc = run_tool("demo.py", f"--workdir={work}", expect_ok=False, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    meta = work / "data" / "synthetic_meta.json"
    assert last.startswith(f"tools/demo.py: error: {meta} cannot be read (")
    assert last.endswith(f"delete {work / 'data'} to make the data again")


def test_demo_refuses_a_model_trained_with_another_config(tmp_path, tiny_run):
    work = tmp_path / "demo_run"
    shutil.copytree(tiny_run["data"], work / "data")
    shutil.copytree(tiny_run["workdir"], work / "train")
    ckpt = work / "train" / "checkpoints"
    before = file_bytes(work / "train")
    made = json.loads((work / "data" / "synthetic_meta.json").read_text())["config"]
    proc = run_tool(
        "demo.py", f"--workdir={work}", f"--config={REPO / 'configs' / 'agw_tiny.py'}",
        f"--num_train_ids={made['num_train_ids']}", f"--num_test_ids={made['num_test_ids']}",
        f"--train_images_per_id={made['images_per_id']}", f"--seed={made['seed']}",
        f"--train_override=--config.num_epochs={TINY_EPOCHS}",
        "--train_override=--config.data.erase_prob=0", expect_ok=False, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"tools/demo.py: error: {work / 'train'} holds a model trained with another "
                    "config than this demo's (data.erase_prob: 0.5 -> 0.0; an earlier version's "
                    f"demo?): delete {work / 'train'} to train it anew (the data is kept), or "
                    "pass another --workdir")
    assert file_bytes(work / "train") == before and checkpoints.latest_step(ckpt) is not None


def test_demo_retrains_a_head_saved_without_its_accuracy_and_reruns_what_used_it(
        tmp_path, tiny_run):
    """The whole demo on a tiny run whose head an earlier version saved (no test accuracy):
    the head is trained again as a new step, every later step runs on it, and a second demo
    reuses everything."""
    work = tmp_path / "demo_run"
    shutil.copytree(tiny_run["data"], work / "data")
    shutil.copytree(tiny_run["workdir"], work / "train")
    ckpt = work / "train" / "checkpoints"
    old_step = checkpoints.latest_step(ckpt)
    meta_file = ckpt / str(old_step) / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["attribute_head"]["test_accuracy"]  # as tools/train_attributes.py saved it before
    meta_file.write_text(json.dumps(meta))
    assert checkpoints.restore_head_accuracy(ckpt) is None
    made = json.loads((work / "data" / "synthetic_meta.json").read_text())["config"]
    args = [f"--workdir={work}", f"--config={REPO / 'configs' / 'agw_tiny.py'}",
            f"--num_train_ids={made['num_train_ids']}", f"--num_test_ids={made['num_test_ids']}",
            f"--train_images_per_id={made['images_per_id']}", f"--seed={made['seed']}",
            f"--train_override=--config.num_epochs={TINY_EPOCHS}", "--head_epochs=20",
            "--head_lr=1e-2"]

    first = run_tool("demo.py", *args)
    assert "saved without its test accuracy: training it again" in first.stdout
    new_step = checkpoints.latest_step(ckpt)
    assert new_step == old_step + 1
    accuracy = checkpoints.restore_head_accuracy(ckpt)
    assert accuracy is not None and set(accuracy) == set(ATTRIBUTE_NAMES)
    steps = json.loads((work / "demo_steps.json").read_text())
    assert sorted(steps) == ["analysis", "evaluate", "explain rankings", "measure explanations"]
    assert all(s["checkpoint_step"] == new_step for s in steps.values())
    summary = json.loads((work / "explain" / "summary.json").read_text())
    assert summary["head_accuracy"]["accuracy"] == accuracy
    assert summary["num_map_queries"] > 0 and (work / "explain" / "report" / "index.html").is_file()
    assert "demo finished in" in first.stdout

    second = run_tool("demo.py", *args)
    skipped = re.findall(r"=== (.+): skipped", second.stdout)
    assert skipped == ["synthetic data", "attribute head", "evaluate", "measure explanations",
                       "explain rankings", "analysis"]
    assert checkpoints.latest_step(ckpt) == new_step
