"""Tests of reid_jax.explain.report: escaping, the figures' numbers, paging, the summary page."""

from __future__ import annotations

import json
import os
import re

import markupsafe
import numpy as np
import pytest
from conftest import file_bytes
from PIL import Image

from reid_jax import explain
from reid_jax.data.attributes import ATTRIBUTE_NAMES
from reid_jax.data.market1501 import Split
from reid_jax.explain import report
from reid_jax.explain import run as explain_run
from reid_jax.explain import table as quality_table

A = len(ATTRIBUTE_NAMES)
ODD = "<script>&\"'.jpg"


def esc(text: str) -> str:
    """``text`` as the report's autoescaping writes it (markupsafe: ``'`` is ``&#39;``)."""
    return str(markupsafe.escape(text))


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
    out = explain.explain_rankings(fq, fg, w, k=k, threshold=0.2, mode=mode)
    records = []
    for i in range(num_queries):
        ex = explain_run.QueryExplanation(
            gallery=np.asarray(out.indices[i], np.int64), distances=np.asarray(out.distances[i]),
            attributes_query=np.asarray(out.attributes_query[i]),
            selected=np.asarray(out.selected[i]),
            attributes_gallery=np.asarray(out.attributes_gallery[i]),
            scores=np.asarray(out.scores[i]), errors=np.asarray(out.errors[i]),
            remainder=np.asarray(out.remainder[i]))
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
    assert esc(ODD) == "&lt;script&gt;&amp;&#34;&#39;.jpg" and esc(ODD) in html_text
    assert esc("a&b\"c'.jpg") in html_text and "q1_&lt;b&gt;.jpg" in html_text
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
    assert "clipped at 100 %" in page and esc("'!' before an attribute") in page


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


def test_error_figure_projection_mode_has_a_remainder_slice():
    e = np.zeros(A)
    e[:3] = [3.0, 2.0, 1.0]
    e[3] = -0.5  # correlated directions that oppose
    fig = report.error_figure(e, 10.0, mode="projection", rank=2, gallery_label="x",
                              remainder=4.5)
    text = _texts(fig)
    assert "projection: Σp = 5.5 along the attributes + remainder 4.5 = d²" in text
    assert "negative (pull together)" in text and "-0.5" in text
    assert f"{ATTRIBUTE_NAMES[0]:<10} 3 (30.0%)" in text  # share of d²
    sizes = np.array([3.0, 2.0, 1.0, 4.5])
    np.testing.assert_allclose(_wedge_shares(fig), sizes / sizes.sum(), rtol=1e-9)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == [*ATTRIBUTE_NAMES[:3], "remainder"]
    with pytest.raises(ValueError, match="remainder is given with mode='projection'"):
        report.error_figure(e, 10.0, mode="projection", rank=2, gallery_label="x")
    with pytest.raises(ValueError, match="remainder is given with mode='projection'"):
        report.error_figure(e, 10.0, mode="complete", rank=2, gallery_label="x", remainder=1.0)


def test_error_figure_disagreement_mode_draws_bars():
    p = np.linspace(0.0, 0.9, A)
    fig = report.error_figure(p, 1.5, mode="disagreement", rank=1, gallery_label="x")
    text = _texts(fig)
    assert "not a decomposition of d²" in text
    bars = sorted(r.get_width() for r in fig.axes[0].patches)
    np.testing.assert_allclose(bars, 100 * np.sort(p)[-10:], rtol=1e-9)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[-1] == ATTRIBUTE_NAMES[-1]  # the largest on top


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


@pytest.mark.parametrize("mode", ["projection", "disagreement"])
def test_report_of_the_modes_beyond_the_paper(tmp_path, mode):
    records = _records(tmp_path / "data", mode=mode)
    assert ("remainder" in records[0]) == (mode == "projection")
    if mode == "projection":  # contributions and remainder sum to the distance
        for r in records:
            total = np.asarray(r["errors"]).sum(1) + np.asarray(r["remainder"])
            np.testing.assert_allclose(total, r["gallery"]["distance"], rtol=1e-4, atol=1e-5)
    out = tmp_path / "report"
    report.write_report(out, _summary(mode=mode), records, data_root=tmp_path / "data")
    index = open(out / "index.html", encoding="utf-8").read()
    page = open(out / "queries.html", encoding="utf-8").read()
    if mode == "projection":
        assert "remainder |r|^2" in index and "remainder as its own slice" in page
    else:
        assert "not a decomposition of the distance" in index
        assert "probability that the labels differ" in page
    assert len(os.listdir(out / "fig")) == 1 + 2 * 3  # metrics; ranks 1 and 4 of 3 queries


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


# ---------------------------------------------------------------------------------------------
# The explanation-quality table (the layout of tools/evaluate_explanations.py).

AMD_KEYS = ("ex_precision_d", "ex_map_d", "ex_precision_s", "ex_map_s", "ex_precision_s_amd",
            "ex_map_s_amd")
EXPLAINED = ("paper", "complete", "projection", "scores", "disagreement")


def _eval_metrics(k: int = 3, skipped: str | None = None, seed: int = 0) -> dict:
    """``explanation_metrics.json`` of ``quality.measure``'s layout, random values."""
    rng = np.random.default_rng(seed)
    rate = lambda: float(rng.uniform(0.01, 0.99))

    def rated():  # a value with its interval around it
        v = rate()
        return v, [v - 0.01, v + 0.02]

    top = f"top{k}"
    if skipped is None:
        counterfactual = {"num_counterfactuals": 60, "num_rejected_invisible": 7,
                          "num_pairs": 123}
        for m in ("prior", *EXPLAINED):
            (t1, i1), (t3, i3) = rated(), rated()
            counterfactual[m] = {"top1": t1, "top3": t3, "mean_rank": 5.0,
                                 "intervals": {"top1": i1, "top3": i3}}
        counterfactual.update({
            "chance": {"top1": rate(), "top3": rate(), "mean_rank": 12.0},
            "subsets": {"true_match": {"num_pairs": 50, "paper_top1": 0.25, "chance_top1": 0.125},
                        "<odd>": {"num_pairs": 73, "paper_top1": 0.5, "chance_top1": 0.0625}},
            "per_attribute": {"counterfactuals": [2] * A,
                              "paper_top1": [0.5] * (A - 1) + [0.375]},
        })
    else:
        counterfactual = {"skipped": skipped}

    def auroc_entry():
        entry = {"num_positive": int(rng.integers(1, 999)),
                 "num_negative": int(rng.integers(1, 999))}
        for m in ("scores", "disagreement"):
            (p, pi), (mac, mi) = rated(), rated()
            entry[m] = {"pooled": p, "pooled_interval": pi, "macro": mac, "macro_interval": mi,
                        "max_binning_error": 0.01}
        p, pi = rated()
        entry["prior"] = {"pooled": p, "pooled_interval": pi, "macro": 0.5}
        return entry

    auroc = {scope: {which: auroc_entry() for which in ("confident", "all_attributes")}
             for scope in ("all_pairs", top)}
    auroc["per_attribute"] = {"all_pairs_confident_scores": [None] + [0.625] * (A - 1)}

    def amd_entry():
        entry = {"num_pairs": 500, "num_pairs_d": int(rng.integers(1, 499)),
                 "num_pairs_s": int(rng.integers(1, 499)),
                 "num_pairs_s_amd": int(rng.integers(1, 499))}
        for m in ("prior", *EXPLAINED):
            values = {key: rated() for key in AMD_KEYS}
            entry[m] = {key: v for key, (v, _) in values.items()}
            entry[m]["intervals"] = {key: i for key, (_, i) in values.items()}
        entry["chance"] = {key: rate() for key in AMD_KEYS}
        return entry

    amd = {scope: amd_entry() for scope in ("all_pairs", top)}
    amd["per_attribute"] = {"all_pairs_differ_count": list(range(A))}
    return {"format": quality_table.FORMAT, "attribute_names": list(ATTRIBUTE_NAMES),
            "settings": {"checkpoint": "/ckpt/<b>", "data_root": "/data/<root>", "k": k,
                         "threshold": 0.3, "interval_level": 0.95},
            "data": {"synthetic": True, "num_queries": 3, "num_gallery": 8,
                     "num_labelled_queries": 3, "num_labelled_gallery": 7},
            "prior": {"num_identities": 11, "k": k},
            "counterfactual": counterfactual, "auroc": auroc, "amd": amd}


def _reference_rows(m: dict) -> list[list[str]]:
    """The table of the JSON, written out here: metric, n, prior, chance, the explanations."""
    k = m["settings"]["k"]
    pct = lambda v: f"{100.0 * v:.1f}"

    def cell(v, interval=None):
        if v is None:
            return "—"
        return pct(v) if interval is None else f"{pct(v)} [{pct(interval[0])}, {pct(interval[1])}]"

    rows = []
    cf = m["counterfactual"]
    if "skipped" not in cf:
        for t in (1, 3):
            key = f"top{t}"
            rows.append([f"counterfactual hit rate, top-{t}", str(cf["num_pairs"]),
                         cell(cf["prior"][key], cf["prior"]["intervals"][key]),
                         cell(cf["chance"][key])]
                        + [cell(cf[e][key], cf[e]["intervals"][key]) for e in EXPLAINED])
    for scope, name in (("all_pairs", "all pairs"), (f"top{k}", f"top-{k}")):
        for which, wname in (("confident", "confident attributes"),
                             ("all_attributes", "all attributes")):
            a = m["auroc"][scope][which]
            n = str(a["num_positive"] + a["num_negative"])
            rows.append([f"matching-score AUROC pooled, {name}, {wname}", n,
                         cell(a["prior"]["pooled"], a["prior"]["pooled_interval"]), "50.0",
                         "—", "—", "—",
                         cell(a["scores"]["pooled"], a["scores"]["pooled_interval"]),
                         cell(a["disagreement"]["pooled"],
                              a["disagreement"]["pooled_interval"])])
            rows.append([f"matching-score AUROC mean per attribute, {name}, {wname}", n,
                         "50.0", "50.0", "—", "—", "—",
                         cell(a["scores"]["macro"], a["scores"]["macro_interval"]),
                         cell(a["disagreement"]["macro"], a["disagreement"]["macro_interval"])])
    titles = ("Ex-Precision_d", "Ex-mAP_d", "Ex-Precision_s", "Ex-mAP_s",
              "Ex-Precision_s (AMD rule)", "Ex-mAP_s (AMD rule)")
    counts = ("num_pairs_d", "num_pairs_d", "num_pairs_s", "num_pairs_s", "num_pairs_s_amd",
              "num_pairs_s_amd")
    for scope, name in (("all_pairs", "all pairs"), (f"top{k}", f"top-{k}")):
        d = m["amd"][scope]
        for key, title, count in zip(AMD_KEYS, titles, counts, strict=True):
            rows.append([f"AMD {title}, {name}", str(d[count]),
                         cell(d["prior"][key], d["prior"]["intervals"][key]),
                         cell(d["chance"][key])]
                        + [cell(d[e][key], d[e]["intervals"][key]) for e in EXPLAINED])
    return rows


COLUMN_TITLES = ["metric", "n", "prior (fixed order)", "chance", "eq. 3.2 (paper)",
                 "complete decomposition", "projection + remainder", "eq. 3.1 (1 - s)",
                 "P(labels differ)"]


def _html_table(index: str, css: str) -> list[list[str]]:
    table = index.split(f'<table class="{css}">')[1].split("</table>")[0]
    return [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table)]


def test_summary_table_rows_are_the_json_values():
    m = _eval_metrics(k=4)
    table = quality_table.summary_table(m)
    assert list(table.columns) == COLUMN_TITLES
    shown = [[r.metric, str(r.n), *r.cells] for r in table.rows]
    assert shown == _reference_rows(m) and len(shown) == 2 + 8 + 12
    # The markdown table is built from the same rows (em dash for "does not apply").
    md = quality_table.markdown_table(m).splitlines()
    body = [[c.strip() for c in line.strip("|").split("|")] for line in md[2:2 + len(shown)]]
    assert body == _reference_rows(m)
    assert md[2 + len(shown)] == "" and "|x - 0.5| > 0.3" in md[3 + len(shown)]
    assert "95 % intervals" in md[3 + len(shown)] and "11 training identities" in md[4 + len(
        shown)]
    skipped = quality_table.summary_table(_eval_metrics(skipped="no meta"))
    assert skipped.rows[0].skipped == "no meta" and skipped.rows[0].n is None
    assert "Counterfactuals skipped: no meta" in skipped.legend
    with pytest.raises(KeyError, match="auroc"):
        quality_table.summary_table({k: v for k, v in m.items() if k != "auroc"})


def test_explanation_quality_table_details_and_json_copy(tmp_path):
    records = _records(tmp_path / "data")
    m = _eval_metrics(k=4)
    out = tmp_path / "report"
    report.write_report(out, _summary(explanation_metrics=m, checkpoint="/ckpt/<b>",
                                      explanation_metrics_file="/x/<m>.json"),
                        records, data_root=tmp_path / "data")
    index = open(out / "index.html", encoding="utf-8").read()
    rows = _html_table(index, "list metrics")
    assert rows[0] == COLUMN_TITLES
    assert rows[1:] == _reference_rows(m)
    # The best explanation of each row is bold (the baselines never); grey: the baselines.
    table = index.split('<table class="list metrics">')[1].split("</table>")[0]
    bold = re.findall(r'<td class="num best">([\d.]+) \[', table)
    value = lambda c: float(c.split(" ")[0])
    expected = [max((c for c in r[4:] if c != "—"), key=value).split(" ")[0]
                for r in rows[1:] if sum(c != "—" for c in r[4:]) > 1]
    assert bold == expected and len(bold) == 2 + 8 + 12
    assert table.count('<td class="num chance">') == 2 * (2 + 8 + 12)
    # Escaped text, the run's checkpoint (no warning), the data root that is not the run's.
    assert "/ckpt/&lt;b&gt;" in index and "not this run's checkpoint" not in index
    assert "not this run's data root" not in index  # both /data/<root>
    assert "from /x/&lt;m&gt;.json" in index and "/x/<m>" not in index
    assert "/ckpt/<b>" not in index and "/data/<root>" not in index
    # Details collapsed: subsets and per-attribute tables inside one <details>, no generic dump.
    details = index.split('<details class="more">')[1].split("</details>")[0]
    assert "&lt;odd&gt;" in details and ">12.5</td>" in details and ">6.2</td>" in details
    assert details.count("<h3>") == 4 and ">37.5</td>" in details and ">62.5</td>" in details
    assert re.search(r"<td>ATTR</td><td class=\"num\">2</td><td class=\"num\">37.5</td>"
                     .replace("ATTR", ATTRIBUTE_NAMES[-1]), details)
    assert f"<td>{ATTRIBUTE_NAMES[0]}</td><td class=\"num\">–</td>" in details  # auroc None
    assert "amd / all_pairs" not in index and "settings / k" not in index
    # The JSON shown is copied into the report and linked.
    assert 'href="explanation_metrics.json"' in index
    with open(out / "explanation_metrics.json", encoding="utf-8") as f:
        assert json.load(f) == m


def test_explanation_quality_skipped_counterfactuals_and_other_run(tmp_path):
    records = _records(tmp_path / "data")
    m = _eval_metrics(skipped="<script>no synthetic_meta.json</script>")
    m["settings"]["data_root"] = "/data/elsewhere"
    out = tmp_path / "report"
    report.write_report(out, _summary(explanation_metrics=m, checkpoint="/other/ckpt"),
                        records, data_root=tmp_path / "data")
    index = open(out / "index.html", encoding="utf-8").read()
    rows = _html_table(index, "list metrics")
    assert rows[1] == ["counterfactual hit rate", "–",
                       "skipped: &lt;script&gt;no synthetic_meta.json&lt;/script&gt;"]
    assert 'colspan="7"' in index and "<script" not in index
    assert rows[2:] == _reference_rows(m)
    assert "not this run's checkpoint" in index and "not this run's data root" in index
    assert "Counterfactuals skipped: &lt;script&gt;" in index


def test_explanation_quality_falls_back_to_generic_tables(tmp_path):
    records = _records(tmp_path / "data")
    m = _eval_metrics()
    del m["amd"]["all_pairs"]["num_pairs_d"]
    out = tmp_path / "report"
    report.write_report(out, _summary(explanation_metrics=m), records,
                        data_root=tmp_path / "data")
    index = open(out / "index.html", encoding="utf-8").read()
    assert esc("Not the layout of tools/evaluate_explanations.py (KeyError: 'num_pairs_d')") \
        in index
    assert "list metrics" not in index and "amd / all_pairs / num_pairs" in index
    out2 = tmp_path / "report2"
    report.write_report(out2, _summary(explanation_metrics={"format": "other/2", "x": 0.5}),
                        records, data_root=tmp_path / "data")
    index = open(out2 / "index.html", encoding="utf-8").read()
    assert esc("format 'other/2', not 'reid_jax.explanation_metrics/2'") in index
    assert "<td>x</td><td class=\"num\">0.5</td>" in index
    # A maps section this version cannot read: the table above still shows, the maps say why.
    for i, (maps, reason) in enumerate((
            ({"pointing_game": 5}, "'int' object has no attribute 'get'"),
            ({"num_images": 2, "pointing_game": {"groups": {}}}, "KeyError: 'overall'"))):
        m = _eval_metrics()
        m["maps"] = maps
        out4 = tmp_path / f"report4-{i}"
        report.write_report(out4, _summary(explanation_metrics=m), records,
                            data_root=tmp_path / "data")
        index = open(out4 / "index.html", encoding="utf-8").read()
        assert "list metrics" in index
        assert esc(f"Attribute maps not shown: the file's maps section cannot be read "
                   f"({reason})") in index
    # No metrics: no copy, the hint.
    out3 = tmp_path / "report3"
    report.write_report(out3, _summary(), records, data_root=tmp_path / "data")
    assert not os.path.exists(out3 / "explanation_metrics.json")
    assert "No explanation_metrics.json was given" in open(out3 / "index.html").read()


def test_overlay_scale_saturates_the_top_percent_of_the_pixels():
    from reid_jax.explain import figures

    # A peaky map: one cell of 64 pixels holds values 100x the rest. Scaled to its maximum the
    # rest would draw at 1 % opacity; at the 99th percentile of |value| it stays visible.
    maps = np.full((2, 128, 64), 0.01)
    maps[0, :8, :8] = -1.0
    maps[1, 100:, :] = np.linspace(0.0, 0.02, 64)
    scale = figures.overlay_scale(maps)
    want = np.quantile(np.abs(maps), 0.99)
    assert scale == pytest.approx(want) and 0.01 < scale < 1.0
    tiles = np.clip(maps / scale, -1, 1)
    assert (np.abs(tiles) == 1).mean() <= 2 * figures.OVERLAY_SATURATED
    # Mostly zero maps fall back to the largest magnitude; all-zero and empty maps to 0.
    sparse = np.zeros((128, 64))
    sparse[3, 4] = -2.0
    assert figures.overlay_scale(sparse) == 2.0
    assert figures.overlay_scale(np.zeros((4, 4))) == 0.0
    assert figures.overlay_scale(np.zeros((0, 4))) == 0.0
    # The report's tiles use it: the group on one scale, larger values at full colour.
    tiles = report._signed_tiles(maps)
    assert tiles.dtype == np.float32
    np.testing.assert_allclose(tiles, maps / scale, rtol=1e-6)


def test_figures_drawn_by_worker_processes_are_the_same_files(tmp_path):
    records = _records(tmp_path / "data", num_queries=4)
    summary = _summary(num_queries=4)
    report.write_report(tmp_path / "one", summary, records, data_root=tmp_path / "data",
                        figure_workers=1)
    report.write_report(tmp_path / "two", summary, records, data_root=tmp_path / "data",
                        figure_workers=2)
    one, two = file_bytes(tmp_path / "one"), file_bytes(tmp_path / "two")
    assert sum(name.startswith("fig/errors-") for name in one) == 8  # 4 queries x ranks 1, 4
    assert one.keys() == two.keys()
    assert [n for n in one if one[n] != two[n]] == []
    # The pies' clickable areas (drawn on pages with maps) come back from the workers too.
    e = np.asarray(records[0]["errors"][0])
    job = {"errors": e, "distance": float(np.abs(e).sum()), "mode": "paper", "rank": 1,
           "gallery_label": "x"}
    drawer = report._ErrorFigures(2)
    try:
        drawer.submit("pie", str(tmp_path / "pie.png"), job)
        areas = drawer.result("pie")
    finally:
        drawer.close()
    assert areas and areas == report.write_error_figure(str(tmp_path / "inline.png"), **job)


def test_a_bad_record_fails_with_its_message_from_a_worker(tmp_path):
    records = _records(tmp_path / "data")
    records[1]["errors"][0] = records[1]["errors"][0][:5]
    with pytest.raises(ValueError, match=r"errors must have shape \[30\]"):
        report.write_report(tmp_path / "r", _summary(), records, data_root=tmp_path / "data",
                            figure_workers=2)


def test_figure_workers():
    assert report.num_figure_workers(500, 1) == 1
    assert report.num_figure_workers(500, 0) == 0
    assert report.num_figure_workers(3, 8) == 3  # never more workers than figures
    assert report.num_figure_workers(report.FIGURE_POOL_MIN - 1) == 1
    cores = len(os.sched_getaffinity(0))
    assert report.num_figure_workers(report.FIGURE_POOL_MIN) == min(
        cores, report.FIGURE_WORKERS_MAX, report.FIGURE_POOL_MIN)
    assert report.num_figure_workers(10_000) == min(cores, report.FIGURE_WORKERS_MAX)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="figure_workers must be an integer >= 0"):
            report.num_figure_workers(10, bad)


class _Broken:
    """A process pool whose workers cannot start (``start="submit"``) or die (``"result"``)."""

    def __init__(self, start: str):
        self.start = start

    def __call__(self, workers, mp_context=None):
        return self

    def submit(self, fn, *args, **kwargs):
        if self.start == "submit":
            raise OSError("cannot start a process")
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool
        future = Future()
        future.set_exception(BrokenProcessPool("a worker was killed"))
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        pass


@pytest.mark.parametrize("start", ["submit", "result"])
def test_figures_fall_back_to_this_process_when_workers_fail(tmp_path, monkeypatch, start):
    records = _records(tmp_path / "data")
    report.write_report(tmp_path / "one", _summary(), records, data_root=tmp_path / "data",
                        figure_workers=1)
    monkeypatch.setattr(report, "ProcessPoolExecutor", _Broken(start))
    report.write_report(tmp_path / "two", _summary(), records, data_root=tmp_path / "data",
                        figure_workers=2)
    one, two = file_bytes(tmp_path / "one"), file_bytes(tmp_path / "two")
    assert sum(n.startswith("fig/errors-") for n in two) == 6
    assert [n for n in one if one[n] != two.get(n)] == []
