"""Tests of reid_jax.report: escaping, the figures' numbers, paging, the summary page."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

from reid_jax import explain, explain_run, report
from reid_jax.data.attributes import ATTRIBUTE_NAMES
from reid_jax.data.market1501 import Split

A = len(ATTRIBUTE_NAMES)
ODD = "<script>&\"'.jpg"


def _split(folder: str, name: str, files: list[str], pids: list[int], cams: list[int]) -> Split:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(len(files))
    for f in files:
        Image.fromarray(rng.integers(0, 255, (128, 64, 3), dtype=np.uint8)).save(
            os.path.join(folder, f), "JPEG")
    ints = lambda v: np.asarray(v, np.int32)
    return Split(name=name, folder=folder, paths=tuple(os.path.join(folder, f) for f in files),
                 pids=ints(pids), cameras=ints(cams), sequences=ints([1] * len(files)),
                 frames=ints([0] * len(files)), labels=ints(pids),
                 pid_to_label={p: p for p in pids})


def _records(root, mode: str = "paper", num_queries: int = 3, k: int = 4):
    """Records of ``make_record`` from the kernels, with odd file names in both splits."""
    query_files = [ODD] + [f"q{i}_<b>.jpg" for i in range(1, num_queries)]
    gallery_files = [f"g{i}.jpg" for i in range(7)] + ["a&b\"c'.jpg"]
    queries = _split(os.path.join(root, "query"), "query", query_files,
                     [1 + i % 3 for i in range(num_queries)], [1] * num_queries)
    gallery = _split(os.path.join(root, "bounding_box_test"), "gallery", gallery_files,
                     [1, 1, 2, 2, 3, 3, 0, 1], [2, 3, 2, 3, 2, 3, 1, 2])
    rng = np.random.default_rng(0)
    n = 16
    fq = rng.normal(size=(num_queries, n)).astype(np.float32)
    fg = rng.normal(size=(len(gallery_files), n)).astype(np.float32)
    fg[7] = fq[0] + 0.01 * fg[7]  # the odd gallery name ranks first for the odd query
    fg[0] = fq[1] + 0.01 * fg[0]
    w = (2 * rng.normal(size=(n, A))).astype(np.float32)
    out = explain.explain_rankings(fq, fg, w, k=k, threshold=0.2, complete=mode == "complete")
    records = []
    for i in range(num_queries):
        ex = explain_run.QueryExplanation(
            gallery=np.asarray(out.indices[i], np.int64), distances=np.asarray(out.distances[i]),
            attributes_query=np.asarray(out.attributes_query[i]),
            selected=np.asarray(out.selected[i]),
            attributes_gallery=np.asarray(out.attributes_gallery[i]),
            scores=np.asarray(out.scores[i]), errors=np.asarray(out.errors[i]))
        records.append(explain_run.make_record(i, i, queries, gallery, ex,
                                               (0.5, 0.25, 2, 3), mode))
    return records


def _summary(mode: str = "paper", **extra):
    return {"data_root": "/data/<root>", "checkpoint": None, "num_queries": 3,
            "num_query_images": 3, "num_gallery_images": 8, "num_gallery_identities": 3,
            "num_distractors": 1, "junk_left_out": 0, "embedding_dim": 16, "k": 4,
            "threshold": 0.2, "mode": mode, "mode_equation": explain_run.MODE_EQUATIONS[mode],
            "order": "query", "error_ranks": [1, 4], "attribute_names": list(ATTRIBUTE_NAMES),
            "mAP": 0.5, "mINP": 0.25, "cmc": [0.25, 0.5, 1.0], "num_valid_queries": 3,
            "ap_histogram": {"edges": np.linspace(0, 1, 21).tolist(),
                             "counts": [0] * 10 + [3] + [0] * 9},
            "explanation_metrics": None, **extra}


def _pages(folder) -> str:
    return "".join(open(os.path.join(folder, f), encoding="utf-8").read()
                   for f in sorted(os.listdir(folder)) if f.endswith(".html"))


def test_odd_file_names_are_escaped(tmp_path):
    records = _records(tmp_path / "data")
    metrics = {"amd <i>paper</i>": {"ex_map_d": 0.61, "note": "<script>alert(1)</script>"}}
    out = tmp_path / "report"
    index = report.write_report(out, _summary(explanation_metrics=metrics), records,
                                data_root=tmp_path / "data")
    assert index == os.path.join(out, "index.html")
    html_text = _pages(out)
    assert "<script" not in html_text and "<b>.jpg" not in html_text
    assert "<i>paper" not in html_text
    assert "&lt;script&gt;&amp;&quot;&#x27;.jpg" in html_text
    assert "a&amp;b&quot;c&#x27;.jpg" in html_text and "q1_&lt;b&gt;.jpg" in html_text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text
    # Thumbnails are named by split and index, never by file name.
    sources = re.findall(r'src="([^"]+)"', html_text)
    assert sources and all(re.fullmatch(r"(img/[qg]\d{6}\.jpg|fig/[\w.-]+\.png)", s)
                           for s in sources)
    for s in set(sources):
        assert os.path.isfile(out / s)
    with Image.open(out / "img" / "q000000.jpg") as im:
        assert im.size == report.THUMBNAIL_WH


def test_query_rows_show_clipped_scores_and_frames(tmp_path):
    records = _records(tmp_path / "data")
    out = tmp_path / "report"
    report.write_report(out, _summary(), records, data_root=tmp_path / "data")
    page = open(out / "queries.html", encoding="utf-8").read()
    for r in records:
        section = page.split(f'id="q{r["position"] + 1}"')[1].split("</section>")[0]
        shown = re.findall(r">(\d+)%</td>", section)
        raw = np.asarray(r["matching_scores"]).T.ravel()
        assert shown == [f"{100 * min(s, 1.0):.0f}" for s in raw]
        frames = re.findall(r'class="thumb (hit|miss)"', section)
        assert frames == ["hit" if t else "miss" for t in r["gallery"]["true_match"]]
    assert any(s > 1 for r in records for row in r["matching_scores"] for s in row)
    assert "clipped at 100 %" in page and "&#x27;!&#x27; before an attribute" in page


def test_score_percent_clips_at_100():
    assert report.score_percent(1.37) == "100"
    assert report.score_percent(0.456) == "46"
    assert report.score_percent(0.0) == "0"


def _texts(fig) -> str:
    parts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        parts += [t.get_text() for t in ax.texts]
        if ax.get_legend() is not None:
            parts += [t.get_text() for t in ax.get_legend().get_texts()]
    return "\n".join(parts)


def _wedge_shares(fig) -> np.ndarray:
    from matplotlib.patches import Wedge

    wedges = [p for p in fig.axes[0].patches if isinstance(p, Wedge)]
    return np.asarray([(w.theta2 - w.theta1) / 360.0 for w in wedges])


def test_error_figure_paper_mode_positive_pie_negatives_listed():
    e = np.zeros(A)
    e[:3] = [3.0, 2.0, 1.0]  # positive part, sum 6
    e[3:5] = [-0.5, -1.5]    # pull the pair together
    e[5] = 0.05              # below the smallest-slice share: goes into "other"
    fig = report.error_figure(e, 2.5, mode="paper", rank=3, gallery_label="id 0005 cam 2")
    text = _texts(fig)
    assert "positive part only" in text and "negative (pull together)" in text
    assert "rank 3 · id 0005 cam 2 · d² = 2.5" in text
    neg = text.split("negative (pull together):")[1]
    assert neg.index(ATTRIBUTE_NAMES[4]) < neg.index(ATTRIBUTE_NAMES[3])  # most negative first
    assert "-1.5" in neg and "-0.5" in neg and "total -2" in neg
    positives = np.array([3.0, 2.0, 1.0, 0.05])
    np.testing.assert_allclose(_wedge_shares(fig), positives / positives.sum(), rtol=1e-9)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == [*ATTRIBUTE_NAMES[:3], "other (1)"]


def test_error_figure_complete_mode_sums_to_distance():
    e = np.linspace(0.0, 1.0, A)
    fig = report.error_figure(e, float(e.sum()), mode="complete", rank=1, gallery_label="x")
    text = _texts(fig)
    assert f"Σe = {e.sum():.4g} = d²" in text and "largest contributions" in text
    assert "negative" not in text
    shares = _wedge_shares(fig)
    np.testing.assert_allclose(shares.sum(), 1.0, rtol=1e-9)
    np.testing.assert_allclose(shares[0], e[-1] / e.sum(), rtol=1e-9)  # the largest first


def test_error_figure_edge_cases():
    text = _texts(report.error_figure(-np.ones(A), 0.0, mode="paper", rank=1, gallery_label="x"))
    assert "no positive" in text and "total -30" in text
    with pytest.raises(ValueError, match=r"errors must have shape \[30\]"):
        report.error_figure(np.ones(5), 1.0, mode="paper", rank=1, gallery_label="x")
    with pytest.raises(ValueError, match="mode must be"):
        report.error_figure(np.ones(A), 1.0, mode="pie", rank=1, gallery_label="x")


def test_paging_summary_and_metrics_tables(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "PAGE_SIZE", 2)
    records = _records(tmp_path / "data", mode="complete", num_queries=5)
    metrics = {"counterfactual": {"hit_rate_top1": 0.75, "num_pairs": 40},
               "auroc": 0.8125, "amd": {"precision_d": [0.5] * A}}
    out = tmp_path / "report"
    report.write_report(out, _summary(mode="complete", num_queries=5,
                                      explanation_metrics=metrics), records,
                        data_root=tmp_path / "data")
    assert sorted(f for f in os.listdir(out) if f.endswith(".html")) == [
        "index.html", "queries-2.html", "queries-3.html", "queries.html"]
    index = open(out / "index.html", encoding="utf-8").read()
    assert 'href="queries-3.html#q5"' in index and 'href="queries.html#q1"' in index
    assert "counterfactual / hit_rate_top1" in index and "0.75" in index and "0.8125" in index
    assert "amd / precision_d" in index and index.count(">0.5</td>") == A
    assert "50.0 %" in index and "25.0 %" in index  # mAP, Rank-1 / mINP
    assert os.path.isfile(out / "fig" / "metrics.png")
    assert "sum exactly to the squared distance" in index
    page3 = open(out / "queries-3.html", encoding="utf-8").read()
    assert page3.count('<section class="card" id="q') == 1 and "complete decomposition" in page3
    assert len(os.listdir(out / "fig")) == 1 + 2 * 5  # metrics + ranks 1 and 4 per query


def test_write_report_errors(tmp_path):
    records = _records(tmp_path / "data")
    os.makedirs(tmp_path / "exists")
    with pytest.raises(ValueError, match="already exists"):
        report.write_report(tmp_path / "exists", _summary(), records, data_root=tmp_path / "data")
    with pytest.raises(ValueError, match="error_mode 'paper' but the run's mode is 'complete'"):
        report.write_report(tmp_path / "r1", _summary(mode="complete"), records,
                            data_root=tmp_path / "data")
    os.remove(tmp_path / "data" / "bounding_box_test" / "g0.jpg")
    with pytest.raises(FileNotFoundError, match="image not found: .*g0.jpg"):
        report.write_report(tmp_path / "r2", _summary(), records, data_root=tmp_path / "data")
