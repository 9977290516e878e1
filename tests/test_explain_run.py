"""Tests of reid_jax.explain.run and tools/explain.py on a tiny Market-shaped folder."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import file_bytes
from PIL import Image

from reid_jax import evaluation, explain, progress, retrieval
from reid_jax.data.attributes import ATTRIBUTE_NAMES
from reid_jax.explain import report, settings
from reid_jax.explain import run as explain_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A = len(ATTRIBUTE_NAMES)
N = 24


def _image(path: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (32, 16, 3), dtype=np.uint8)).resize((64, 128)).save(
        path)


def make_market(root) -> None:
    """Six identities seen by cameras 1-3 (queries from camera 1), identity 7 seen only by
    camera 1 (its query has no valid match), three distractors and one junk image."""
    folders = {s: os.path.join(root, s) for s in ("bounding_box_train", "bounding_box_test",
                                                  "query")}
    for f in folders.values():
        os.makedirs(f, exist_ok=True)
    seed = 0
    for pid in range(1, 8):
        _image(os.path.join(folders["bounding_box_train"], f"{pid + 100:04d}_c1s1_000001_01.jpg"),
               seed := seed + 1)
        for cam in ((1,) if pid == 7 else (1, 2, 3)):
            for j in range(2):
                _image(os.path.join(folders["bounding_box_test"],
                                    f"{pid:04d}_c{cam}s1_{j:06d}_01.jpg"), seed := seed + 1)
        _image(os.path.join(folders["query"], f"{pid:04d}_c1s1_000099_00.jpg"), seed := seed + 1)
    for j in range(3):
        _image(os.path.join(folders["bounding_box_test"], f"0000_c2s1_{j:06d}_01.jpg"),
               seed := seed + 1)
    _image(os.path.join(folders["bounding_box_test"], "-1_c2s1_000000_01.jpg"), seed + 1)


def make_inputs(data, seed: int = 0):
    """Identity-clustered, L2-normalised embeddings and attribute weights."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, N))

    def emb(split):
        f = centers[split.pids % 8] + 1.1 * rng.normal(size=(len(split), N))
        return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)

    return emb(data.query), emb(data.gallery), (3.0 * rng.normal(size=(N, A))).astype(np.float32)


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    root = tmp_path_factory.mktemp("market")
    make_market(root)
    data = explain_run.load_data(root)
    fq, fg, w = make_inputs(data)
    return {"root": str(root), "data": data, "fq": fq, "fg": fg, "w": w}


@pytest.fixture(scope="module")
def paper_run(market, tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_run")
    result = explain_run.run(
        data_root=market["root"], output_dir=out, query_embeddings=market["fq"],
        gallery_embeddings=market["fg"], weights=market["w"], k=5, threshold=0.3,
        error_ranks=(1, 5), progress=False)
    return result, explain_run.read_jsonl(result.jsonl)


def _run(market, out, **kwargs):
    args = dict(data_root=market["root"], output_dir=out, query_embeddings=market["fq"],
                gallery_embeddings=market["fg"], weights=market["w"], k=5, threshold=0.3,
                progress=False)
    return explain_run.run(**{**args, **kwargs})


# --------------------------------------------------------------------------------------------
# Per-query metrics against reid_jax.evaluation.


def test_per_query_metrics_match_rank_metrics():
    rng = np.random.default_rng(3)
    q, g = 9, 40
    d = rng.integers(0, 6, size=(q, g)).astype(np.float64)  # many exact ties
    qp, gp = rng.integers(1, 5, q), rng.integers(-1, 5, g)
    qc, gc = rng.integers(1, 4, q), rng.integers(1, 4, g)
    qp[0] = 9  # no match at all
    m = explain_run.per_query_metrics(d, qp, gp, qc, gc)
    ref = evaluation.rank_metrics_loop(d, qp, gp, qc, gc, max_rank=10)
    s = explain_run.summarize(m, max_rank=10)
    assert s["num_valid_queries"] == ref["num_valid_queries"]
    np.testing.assert_allclose(s["mAP"], ref["mAP"], rtol=1e-12)
    np.testing.assert_allclose(s["mINP"], ref["mINP"], rtol=1e-12)
    np.testing.assert_allclose(s["cmc"], ref["cmc"], rtol=1e-12)
    assert np.isnan(m.ap[0]) and m.first_rank[0] == 0 and m.num_matches[0] == 0
    for i in np.flatnonzero(m.num_matches):  # every row's AP is rank_metrics' mAP of that row
        one = evaluation.rank_metrics(d[i:i + 1], qp[i:i + 1], gp, qc[i:i + 1], gc, max_rank=g)
        np.testing.assert_allclose(m.ap[i], one["mAP"], rtol=1e-12)
        np.testing.assert_allclose(m.inp[i], one["mINP"], rtol=1e-12)
        assert one["cmc"][m.first_rank[i] - 1] == 1 and (
            m.first_rank[i] == 1 or one["cmc"][m.first_rank[i] - 2] == 0)
    with pytest.raises(ValueError, match="no valid query"):
        explain_run.summarize(explain_run.per_query_metrics(d[:1], qp[:1], gp, qc[:1], gc))


def test_query_order_worst_ap_first():
    m = explain_run.QueryMetrics(ap=np.array([0.5, np.nan, 0.2, 0.5, 1.0]),
                                 inp=np.zeros(5), first_rank=np.zeros(5, int),
                                 num_matches=np.array([1, 0, 1, 1, 1]))
    assert explain_run.query_order(m, "worst_ap").tolist() == [2, 0, 3, 4, 1]
    assert explain_run.query_order(m, "query").tolist() == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------------------------
# JSONL: schema and the kernels' numbers.


def test_jsonl_schema(paper_run, market):
    result, records = paper_run
    data = market["data"]
    assert len(records) == len(data.query) == 7
    assert [r["position"] for r in records] == list(range(7))
    assert [r["query"]["file"] for r in records] == [os.path.basename(p)
                                                     for p in data.query.paths]
    for r in records:
        assert set(r) == {"position", "query", "ap", "inp", "first_match_rank", "num_matches",
                          "gallery", "query_probabilities", "selected_attributes",
                          "gallery_probabilities", "matching_scores", "error_mode", "errors"}
        assert set(r["query"]) == {"index", "file", "pid", "camera"}
        gal = r["gallery"]
        assert set(gal) == {"index", "file", "pid", "camera", "distance", "true_match"}
        k = len(gal["index"])
        assert k == 5 and all(len(v) == k for v in gal.values())
        assert r["error_mode"] == "paper"
        assert np.shape(r["errors"]) == (k, A)
        s = len(r["selected_attributes"])
        assert np.shape(r["matching_scores"]) == np.shape(r["gallery_probabilities"]) == (k, s) \
            or s == 0
        for att in r["selected_attributes"]:
            assert set(att) == {"attribute", "display", "index", "probability"}
            p = r["query_probabilities"][att["index"]]
            assert att["probability"] == p and abs(p - 0.5) > 0.3
            assert att["display"] == (att["attribute"] if p > 0.5 else "!" + att["attribute"])
        # Protocol: no same-pid same-camera image, distractors never a true match.
        for pid, cam, hit in zip(gal["pid"], gal["camera"], gal["true_match"], strict=True):
            assert not (pid == r["query"]["pid"] and cam == r["query"]["camera"])
            assert hit == (pid == r["query"]["pid"])
    no_match = [r for r in records if r["query"]["pid"] == 7]
    assert no_match[0]["ap"] is None and no_match[0]["first_match_rank"] is None
    summary = json.load(open(result.summary_json))
    assert summary["k"] == 5 and summary["mode"] == "paper" and summary["num_queries"] == 7
    assert summary["num_valid_queries"] == 6 and summary["attribute_names"] == list(
        ATTRIBUTE_NAMES)
    assert "clipped at 100 %" in summary["display_rules"]["matching_scores"]


def test_jsonl_numbers_equal_the_kernels(paper_run, market):
    _, records = paper_run
    data, fq, fg, w = market["data"], market["fq"], market["fg"], market["w"]
    fetch = 5 + int(retrieval.removed_counts(data.query.pids, data.query.cameras,
                                             data.gallery.pids, data.gallery.cameras).max())
    out = explain.explain_rankings(fq, fg, w, k=fetch, threshold=0.3)
    out = type(out)(*(np.asarray(x) for x in out))
    # A float64 NumPy reference of the ranking, eq. 3.1 and eq. 3.2.
    d64 = ((fq[:, None, :].astype(np.float64) - fg[None]) ** 2).sum(-1)
    x_q = 1 / (1 + np.exp(-(fq.astype(np.float64) @ w)))
    x_g = 1 / (1 + np.exp(-(fg.astype(np.float64) @ w)))
    for i, r in enumerate(records):
        idx = out.indices[i]
        keep = ~((data.gallery.pids[idx] == data.query.pids[i])
                 & (data.gallery.cameras[idx] == data.query.cameras[i]))
        pos = np.flatnonzero(keep)[:5]
        sel = np.flatnonzero(out.selected[i])
        gal = r["gallery"]
        # Exactly the kernels' float32 values.
        assert gal["index"] == idx[pos].tolist()
        assert gal["distance"] == out.distances[i][pos].tolist()
        assert r["errors"] == out.errors[i][pos].tolist()
        assert r["query_probabilities"] == out.attributes_query[i].tolist()
        assert r["matching_scores"] == out.scores[i][pos][:, sel].tolist()
        assert r["gallery_probabilities"] == out.attributes_gallery[i][pos][:, sel].tolist()
        assert [a["index"] for a in r["selected_attributes"]] == sel.tolist()
        # And the float64 reference.
        allowed = ~((data.gallery.pids == data.query.pids[i])
                    & (data.gallery.cameras == data.query.cameras[i]))
        ref_order = np.flatnonzero(allowed)[np.argsort(d64[i, allowed], kind="stable")][:5]
        assert gal["index"] == ref_order.tolist()
        g = np.asarray(gal["index"])
        np.testing.assert_allclose(gal["distance"], d64[i, g], rtol=1e-5)
        e_ref = ((fq[i].astype(np.float64) - fg[g]) ** 2) @ w
        np.testing.assert_allclose(r["errors"], e_ref, rtol=1e-4, atol=1e-5)
        s_ref = (1 - np.abs(x_q[i] - x_g[g])) / (0.5 + np.abs(x_q[i] - 0.5))
        np.testing.assert_allclose(r["matching_scores"], s_ref[:, sel].reshape(5, -1),
                                   rtol=1e-4, atol=1e-5)


def test_report_numbers_equal_jsonl(paper_run):
    result, records = paper_run
    page = open(os.path.join(result.output_dir, "report", "queries.html"), encoding="utf-8").read()
    sections = page.split("<section class=\"card\" id=\"q")[1:]
    assert len(sections) == len(records)
    for section, r in zip(sections, records, strict=True):
        cells = re.findall(r'title="raw s = ([0-9.]+); p\(gallery\) = [0-9.]+">(\d+)%</td>',
                           section)
        # Attribute-major: one table row per confident attribute, one cell per rank.
        scores = np.asarray(r["matching_scores"]).T.ravel()
        assert [c[1] for c in cells] == [report.score_percent(s) for s in scores]
        assert [c[0] for c in cells] == [f"{s:.4f}" for s in scores]
        frames = re.findall(r'class="thumb (hit|miss)"', section)
        assert frames == ["hit" if h else "miss" for h in r["gallery"]["true_match"]]
        displays = re.findall(r'<th class="attr">([^<]+)</th>', section)
        assert displays == [a["display"] for a in r["selected_attributes"]]
        assert len(re.findall(r'src="fig/errors-\d+-rank0[15].png"', section)) == 2
    index = open(result.report_index, encoding="utf-8").read()
    s = result.summary
    assert f"{100 * s['mAP']:.1f} %" in index and f"{100 * s['cmc'][0]:.1f} %" in index
    assert f"{100 * s['mINP']:.1f} %" in index
    assert "clipped at 100 %" in index and "shows only the positive part" in index


def test_summary_metrics_equal_evaluation(paper_run, market):
    result, _ = paper_run
    data, fq, fg = market["data"], market["fq"], market["fg"]
    d = ((fq[:, None, :].astype(np.float64) - fg[None]) ** 2).sum(-1)
    ref = evaluation.rank_metrics(d, data.query.pids, data.gallery.pids, data.query.cameras,
                                  data.gallery.cameras, max_rank=50)
    np.testing.assert_allclose(result.summary["mAP"], ref["mAP"], rtol=1e-9)
    np.testing.assert_allclose(result.summary["mINP"], ref["mINP"], rtol=1e-9)
    np.testing.assert_allclose(result.summary["cmc"], ref["cmc"], rtol=1e-9)


def test_worst_ap_order_complete_mode_and_chunks(market, paper_run, tmp_path):
    _, by_query = paper_run
    result = _run(market, tmp_path, order="worst_ap", mode="complete", query_chunk=3,
                  error_ranks=(2,), report_queries=4)
    records = explain_run.read_jsonl(result.jsonl)
    aps = [r["ap"] for r in records]
    assert aps[-1] is None and aps[:-1] == sorted(aps[:-1])
    assert sorted(r["query"]["index"] for r in records) == list(range(7))
    ap_by_file = {r["query"]["file"]: r["ap"] for r in by_query}
    assert all(ap_by_file[r["query"]["file"]] == r["ap"] for r in records)
    for r in records:  # complete decomposition: contributions >= 0 summing to the distance
        e = np.asarray(r["errors"], np.float64)
        assert r["error_mode"] == "complete" and (e >= 0).all()
        np.testing.assert_allclose(e.sum(1), r["gallery"]["distance"], rtol=1e-5)
        same = next(b for b in by_query if b["query"]["file"] == r["query"]["file"])
        assert r["gallery"] == same["gallery"]  # ranking independent of chunking and mode
    page = open(os.path.join(result.output_dir, "report", "queries.html"), encoding="utf-8").read()
    assert page.count("<section class=\"card\" id=\"q") == 4
    assert "complete decomposition (sums to d²)" in page and "sum exactly" in page
    assert "positive part of eq. 3.2" not in page


def test_query_selection(market, tmp_path):
    split = market["data"].query
    names = [os.path.basename(p) for p in split.paths]
    assert explain_run.select_queries(split, "all").tolist() == list(range(7))
    assert explain_run.select_queries(split, 3).tolist() == [0, 1, 2]
    assert explain_run.select_queries(split, 99).tolist() == list(range(7))
    picked = explain_run.select_queries(split, [names[4], "/x/" + names[1]])
    assert picked.tolist() == [4, 1]
    with pytest.raises(ValueError, match="query files not found.*nope.jpg"):
        explain_run.select_queries(split, ["nope.jpg"])
    with pytest.raises(ValueError, match="more than once"):
        explain_run.select_queries(split, [names[0], names[0]])
    with pytest.raises(ValueError, match="num_queries must be >= 1"):
        explain_run.select_queries(split, 0)
    result = _run(market, tmp_path, queries=[names[5], names[2]], report_queries=0)
    records = explain_run.read_jsonl(result.jsonl)
    assert [r["query"]["file"] for r in records] == [names[5], names[2]]
    assert result.summary["num_queries"] == 2
    assert not os.path.exists(os.path.join(result.output_dir, "report", "queries.html"))


def test_threshold_parsing():
    assert settings.parse_threshold("0.25") == 0.25
    t = settings.parse_threshold(",".join(["0.1"] * A))
    assert t.shape == (A,) and np.all(t == 0.1)
    with pytest.raises(ValueError, match="has 2 values"):
        settings.parse_threshold("0.1,0.2")
    with pytest.raises(ValueError, match="must be a number"):
        settings.parse_threshold("high")


def test_map_path_settings():
    opts = settings.explain_settings(None)
    assert (opts.map_method, opts.map_layer, opts.map_reference_images) == ("deeplift", 2, 64)
    opts = settings.explain_settings(None, map_layer=4, map_reference_images=0,
                                     map_method="integrated_gradients")
    assert (opts.map_method, opts.map_layer, opts.map_reference_images) == (
        "integrated_gradients", 4, 0)
    with pytest.raises(ValueError, match=r"config.explain.map_layer must be a stage 1..4 .* "
                                         r"got 5"):
        settings.explain_settings(None, map_layer=5)
    with pytest.raises(ValueError, match="map_reference_images"):
        settings.explain_settings(None, map_reference_images=-1)
    # Refused before any work, not after the ranking (the quadrature of 200,000 nodes would
    # allocate hundreds of GiB); the same bound as the kernels'.
    from reid_jax.explain import maps
    assert settings.MAX_MAP_STEPS == maps.MAX_STEPS
    assert settings.explain_settings(None, map_steps=settings.MAX_MAP_STEPS).map_steps == 1024
    with pytest.raises(ValueError, match="config.explain.map_steps must be at most 1024, got "
                                         "200000"):
        settings.explain_settings(None, map_steps=200_000)
    from reid_jax.explain import map_outputs
    paths = [f"g{i}.jpg" for i in range(10)]
    assert map_outputs.reference_paths(paths, 3) == ["g0.jpg", "g4.jpg", "g9.jpg"]
    assert map_outputs.reference_paths(paths, 64) == paths
    assert map_outputs.reference_paths(paths, 0) == []


# --------------------------------------------------------------------------------------------
# Clear errors before heavy work.


@pytest.mark.parametrize("threshold", [0.5, -0.1, [0.2] * (A - 1) + [0.7]])
def test_threshold_outside_range_fails_first(market, tmp_path, threshold):
    with pytest.raises(ValueError, match=r"threshold must lie in \[0, 0.5\)"):
        # The data root does not exist: the threshold is checked before anything is read.
        explain_run.run(data_root=tmp_path / "missing", output_dir=tmp_path / "out",
                        query_embeddings=market["fq"], gallery_embeddings=market["fg"],
                        weights=market["w"], threshold=threshold, progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_data_root_without_queries(market, tmp_path):
    for folder in ("bounding_box_train", "bounding_box_test", "query"):
        os.makedirs(tmp_path / "data" / folder)
    (tmp_path / "data" / "query" / "Thumbs.db").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="has no query images"):
        _run(market, tmp_path / "out", data_root=tmp_path / "data")


def test_bad_inputs(market, tmp_path):
    with pytest.raises(ValueError, match="either checkpoint"):
        explain_run.run(data_root=market["root"], output_dir=tmp_path,
                        query_embeddings=market["fq"])
    with pytest.raises(ValueError, match=r"query_embeddings must have shape \[7, N\]"):
        _run(market, tmp_path, query_embeddings=market["fq"][:3])
    with pytest.raises(ValueError, match=r"W must have shape \[N=24, A=30\]"):
        _run(market, tmp_path, weights=market["w"][:, :5])
    with pytest.raises(ValueError, match=r"error_ranks must lie in \[1, k=5\]"):
        _run(market, tmp_path, error_ranks=(6,))
    with pytest.raises(ValueError, match="mode must be one of"):
        _run(market, tmp_path, mode="pie")


# --------------------------------------------------------------------------------------------
# Atomic outputs.


@pytest.mark.parametrize("drawn_in", ["figures", "thumbnails with figure workers"])
def test_interrupted_run_leaves_previous_outputs(market, tmp_path, monkeypatch, drawn_in):
    first = _run(market, tmp_path, queries=3)
    before = file_bytes(tmp_path)
    calls = []
    # The run dies while drawing the report: in a figure drawn in this process, or in a
    # thumbnail while worker processes draw the figures.
    name, workers = (("write_error_figure", 1) if drawn_in == "figures"
                     else ("write_thumbnail", 2))
    original = getattr(report, name)

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated interruption")
        return original(*args, **kwargs)

    monkeypatch.setattr(report, name, failing)
    with pytest.raises(KeyboardInterrupt):
        _run(market, tmp_path, queries=5, order="worst_ap", report_workers=workers)
    assert file_bytes(tmp_path) == before  # old outputs intact, nothing staged left behind
    assert len(explain_run.read_jsonl(first.jsonl)) == 3
    # A first run that fails leaves nothing at all.
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        _run(market, tmp_path / "fresh", queries=5, report_workers=workers)
    assert os.listdir(tmp_path / "fresh") == []


def test_progress_bar_reports_rate_and_eta():
    stream = io.StringIO()
    bar = progress.ProgressBar(10, "explain", stream=stream)
    bar.update(4)
    bar.update(6)
    text = stream.getvalue()
    assert "explain" in text and "10/10" in text and "queries/s" in text and "ETA" in text
    assert "4/10" in bar.text() or "10/10" in bar.text()


# --------------------------------------------------------------------------------------------
# The command line, from a tiny random-init checkpoint.


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "explain.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    from flax import nnx

    from reid_jax.checkpoints import save_checkpoint
    from reid_jax.models.agw import AGW
    from reid_jax.models.attribute_head import AttributeHead

    root = tmp_path_factory.mktemp("ckpt")
    config = {"model": {"width": 8, "blocks": (1, 1, 1, 1), "non_local": (0, 0, 0, 0)},
              "data": {"height": 64, "width": 32, "num_workers": 0, "eval_batch_size": 16}}
    model = AGW(7, **config["model"], rngs=nnx.Rngs(0))
    head = AttributeHead(model.feature_dim, rngs=nnx.Rngs(1))
    save_checkpoint(root / "with_head", 0, model_state=model, attribute_head_state=head,
                    meta={"num_classes": 7, "config": config})
    save_checkpoint(root / "no_head", 0, model_state=model,
                    meta={"num_classes": 7, "config": config})
    return root


def test_cli_end_to_end(market, tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    args = [f"--checkpoint={tiny_checkpoints / 'with_head'}", f"--data_root={market['root']}",
            f"--output_dir={out}", "--k=4", "--num_queries=3", "--order=worst_ap",
            "--error_ranks=1,4", "--threshold=0.05"]
    res = _tool(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "explained 3 queries" in res.stdout and "report:" in res.stdout
    assert "ETA" in res.stderr  # progress bars
    assert "cached in" in res.stderr
    records = explain_run.read_jsonl(out / "explanations.jsonl")
    assert len(records) == 3 and all(len(r["gallery"]["index"]) == 4 for r in records)
    assert os.path.isfile(out / "embeddings" / "query.npz")
    assert os.path.isfile(out / "embeddings" / "gallery.npz")
    assert os.path.isfile(out / "report" / "index.html")
    assert not [f for f in os.listdir(out) if f.startswith(".explain-staging")]
    res = _tool(*args[:3], "--num_queries=2", "--report_queries=0", "--mode=complete")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reused from" in res.stderr and "cached in" not in res.stderr  # embeddings cached
    assert len(explain_run.read_jsonl(out / "explanations.jsonl")) == 2

    res = _tool(f"--checkpoint={tiny_checkpoints / 'no_head'}", f"--data_root={market['root']}",
                f"--output_dir={tmp_path / 'o2'}")
    assert res.returncode != 0
    assert "has no attribute head" in res.stderr and "tools/train_attributes.py" in res.stderr
    assert "Traceback" not in res.stderr

    res = _tool(*args[:3], "--threshold=0.5")
    assert res.returncode != 0 and "threshold must lie in [0, 0.5)" in res.stderr
