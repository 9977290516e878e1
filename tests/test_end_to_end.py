"""End to end through the command-line tools, as a user runs them, on a tiny synthetic set.

make_synthetic -> train (a few steps of the tiny AGW) -> train_attributes -> evaluate ->
evaluate_explanations -> explain -> analyze; then the outputs are checked against the kernels.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from reid_jax import checkpoints, embeddings, explain
from reid_jax.data import attributes, market1501

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool(name, *args, expect_ok=True):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    if expect_ok:
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    data, ckpt = str(work / "data"), str(work / "train" / "checkpoints")
    tool("make_synthetic.py", f"--output_dir={data}", "--num_train_ids=6", "--num_test_ids=6",
         "--images_per_id=6", "--num_distractors=6", "--num_junk=2", "--seed=3")
    tool("train.py", f"--config={REPO}/configs/agw_tiny.py", f"--workdir={work / 'train'}",
         f"--config.data.root={data}", "--config.num_epochs=2")
    return {"work": work, "data": data, "ckpt": ckpt}


def test_a_checkpoint_without_head_is_refused(run):
    proc = tool("explain.py", f"--checkpoint={run['ckpt']}", f"--data_root={run['data']}",
                f"--output_dir={run['work'] / 'nohead'}", expect_ok=False)
    assert proc.returncode != 0
    assert "tools/train_attributes.py" in proc.stdout + proc.stderr
    assert not os.path.exists(run["work"] / "nohead" / "explanations.jsonl")


def test_pipeline_outputs_match_the_kernels(run):
    work, data, ckpt = run["work"], run["data"], run["ckpt"]
    tool("train_attributes.py", f"--checkpoint={ckpt}", f"--data_root={data}", "--epochs=20")
    assert checkpoints.has_attribute_head(ckpt)
    proc = tool("evaluate.py", f"--checkpoint={ckpt}", f"--data_root={data}",
                f"--output={work / 'evaluation.json'}")
    # orbax's routine INFO lines (a dozen per checkpoint read) stay out of the log; ours stay.
    orbax_info = [line for line in proc.stderr.splitlines()
                  if line.startswith("I") and "checkpoint_manager.py" in line]
    assert not orbax_info and "market1501.py" in proc.stderr, orbax_info
    metrics = json.loads((work / "evaluation.json").read_text())
    assert 0.0 <= metrics["reid"]["mAP"] <= 1.0 and 0.0 <= metrics["attributes"]["mA"] <= 1.0
    assert metrics["reid"]["num_query"] == market1501.load_market1501(data).query.num_images
    out = work / "explain"
    tool("evaluate_explanations.py", f"--checkpoint={ckpt}", f"--data_root={data}",
         f"--output_dir={out}", "--num_counterfactuals=20", "--map_images=6")
    tool("explain.py", f"--checkpoint={ckpt}", f"--data_root={data}", f"--output_dir={out}",
         "--order=worst_ap", "--k=5", "--threshold=0.3")
    tool("analyze.py", f"--checkpoint={ckpt}", f"--data_root={data}",
         f"--output_dir={work / 'analysis'}")

    # Explanation metrics and analysis were written.
    em = json.loads((out / "explanation_metrics.json").read_text())
    assert {"counterfactual", "auroc", "amd"} <= set(em)
    table = (work / "analysis" / "table_4_1.csv").read_text().strip().splitlines()
    assert len(table) == 1 + attributes.NUM_ATTRIBUTES

    # JSONL: one record per query, the schema, worst average precision first.
    records = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
    dataset = market1501.load_market1501(data)
    assert len(records) == dataset.query.num_images
    for r in records:
        assert {"query", "ap", "gallery", "selected_attributes", "matching_scores", "errors",
                "error_mode"} <= set(r)
        assert len(r["gallery"]["file"]) == 5 and len(r["errors"]) == 5
        assert all(len(e) == attributes.NUM_ATTRIBUTES for e in r["errors"])
    aps = [r["ap"] for r in records if r["ap"] is not None]
    assert aps == sorted(aps)

    # The numbers are the kernels' outputs on the model's embeddings.
    emb = embeddings.load_split_embeddings(ckpt, None, data, cache_dir=None)
    w = np.asarray(checkpoints.restore_attribute_head(ckpt).kernel[...])
    fq, fg = emb["query"].features, emb["gallery"].features
    gallery_index = {os.path.basename(p): i for i, p in enumerate(emb["gallery"].paths)}
    query_index = {os.path.basename(p): i for i, p in enumerate(emb["query"].paths)}
    for r in records[:5]:
        q = query_index[r["query"]["file"]]
        g = np.array([gallery_index[f] for f in r["gallery"]["file"]])
        d = ((fq[q].astype(np.float64) - fg[g]) ** 2).sum(-1)
        np.testing.assert_allclose(r["gallery"]["distance"], d, rtol=1e-4, atol=1e-6)
        assert np.all(np.diff(r["gallery"]["distance"]) >= 0)
        e = np.asarray(explain.attribute_errors(fq[q], fg[g], w))
        np.testing.assert_allclose(r["errors"], e, rtol=1e-4, atol=1e-6)
        xq = 1 / (1 + np.exp(-(fq[q].astype(np.float64) @ w)))
        np.testing.assert_allclose(r["query_probabilities"], xq, rtol=1e-4, atol=1e-6)
        selected = [s["index"] for s in r["selected_attributes"]]
        np.testing.assert_array_equal(selected, np.flatnonzero(np.abs(xq - 0.5) > 0.3))
        scores = np.asarray(explain.matching_scores(xq, 1 / (1 + np.exp(-(fg[g] @ w)))))
        np.testing.assert_allclose(r["matching_scores"], scores[:, selected], rtol=1e-4,
                                   atol=1e-5)
    # The report exists and is complete.
    assert (out / "report" / "index.html").exists()
    assert (out / "report" / "queries.html").exists()
