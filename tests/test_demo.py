"""tools/demo.py refuses to reuse data made with other generator settings (an earlier
version's demo folder) before any work, naming both settings and the ways out."""

from __future__ import annotations

import json

import pytest
from conftest import run_tool


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
