"""tools/gpu_check.sh --smoke: every part of the GPU check at toy size, on the CPU."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from conftest import tool_env

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "out"
    env = tool_env()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--smoke",
                           f"--out={out}", f"--python={sys.executable}"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["smoke"] is True
    assert [(r["batch"], r["dtype"]) for r in report["train"]] == [(8, "bfloat16"),
                                                                   (8, "float32")]
    assert all(r["images_per_s"] > 0 and r["step_s"] > 0 for r in report["train"])
    rows = report["extract"]["rows"]
    assert [r["split"] for r in rows] == ["query", "gallery"]
    assert report["extract"]["images"] == sum(r["images"] for r in rows) > 0
    for precision in ("default", "highest"):
        explain = report["explain"][precision]
        assert explain["precision"] == precision
        assert explain["seconds"]["explain"] > 0
        assert explain["max_relative_error"]["auto"]["near_pairs"] < 1e-3
        assert explain["rank_metrics"]["max_abs_diff"] < 1e-9
    assert report["explain"]["default"]["maps"] is None  # the maps run once, at full precision
    assert report["explain"]["highest"]["maps"]["ratio_to_forward"] > 0
    table = (out / "gpu_check.md").read_text()
    for text in ("train bf16 >= 2,500 images/s", "extraction >= 10,000 images/s",
                 "explain at Market size < 1 s", "| query (folder, thread x1",
                 "| evidence + contribution maps, top-3 |"):
        assert text in table
    assert table == proc.stdout[proc.stdout.index("# GPU check"):]
