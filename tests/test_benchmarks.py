"""tools/bench_explain.py end to end at toy sizes: every section runs, prints its table and
writes what it measured; a bad flag is refused before anything is compiled."""

from __future__ import annotations

import json
import math

from conftest import REPO, run_tool


def test_bench_explain_measures_every_section_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_tool("bench_explain.py", "--num_query=16", "--num_gallery=128", "--dim=32",
                    "--pairs_queries=4", "--noisolate", "--maps_rounds=2",
                    f"--maps_config={REPO / 'configs' / 'agw_tiny.py'}", f"--json={out}")
    assert "| explain_rankings top-10 |" in proc.stdout
    assert "| rank_metrics (16 queries x 128 gallery) | seconds |" in proc.stdout
    assert "| vectorised `rank_metrics` |" in proc.stdout
    assert "2 interleaved rounds" in proc.stdout
    assert "best / best" in proc.stdout and "median / median" in proc.stdout
    summary = json.loads(out.read_text())
    kernels = summary["kernels"]
    # The kernels agree with the float64 reference whatever their speed at this size.
    errors = kernels["max_relative_error"]
    for method in ("auto", "direct", "explain_rankings"):
        assert errors[method]["all_pairs"] < 1e-3 and errors[method]["near_pairs"] < 1e-3
    assert math.isinf(errors["gemm"]["near_pairs"])  # the plain GEMM form: identical pairs != 0
    maps = summary["maps"]
    assert maps["rounds"] == 2 and maps["A"] == 30 and maps["k"] == 10
    rows = {"forward", "embed", "evidence", "contributions", "contributions_complete", "gradcam"}
    assert set(maps["seconds"]) == rows and set(maps["median_seconds"]) == rows
    for name in rows:
        assert 0 < maps["seconds"][name] <= maps["median_seconds"][name]
    want = (maps["seconds"]["evidence"] + maps["seconds"]["contributions"]) / maps["seconds"][
        "forward"]
    assert math.isclose(maps["ratio_to_forward"], want, rel_tol=1e-9)
    assert maps["median_ratio_to_forward"] > 0 and maps["ratio_to_forward_alone"] > 0


def test_bench_explain_refuses_zero_rounds():
    proc = run_tool("bench_explain.py", "--nokernels", "--norank_metrics", "--maps_rounds=0",
                    expect_ok=False)
    assert proc.returncode != 0
    assert "--maps_rounds=0" in proc.stderr
