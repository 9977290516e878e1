"""The explorer's JSON API on a trained tiny run, through Starlette's TestClient (no browser)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from conftest import run_tool
from PIL import Image
from starlette.testclient import TestClient

from reid_jax import checkpoints, evaluation, retrieval
from reid_jax.data.attributes import ATTRIBUTE_NAMES
from reid_jax.explain import learned, settings, steering
from reid_jax.explain import run as explain_run
from reid_jax.explorer import app as explorer_app
from reid_jax.explorer.rankings import Explorer, QueryRef

K, THRESHOLD = 7, 0.3


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    """tools/explain.py on the tiny run (paper mode), and an explorer of the same run."""
    out = tmp_path_factory.mktemp("explain")
    run_tool("explain.py", f"--checkpoint={tiny_run['checkpoint']}",
             f"--data_root={tiny_run['data']}", f"--output_dir={out}", f"--k={K}",
             f"--threshold={THRESHOLD}", "--order=worst_ap", "--report_queries=0")
    explorer = Explorer.from_checkpoint(tiny_run["checkpoint"], tiny_run["data"],
                                        cache_dir=out / "embeddings", max_uploads=4)
    client = TestClient(explorer_app.create_app(explorer, max_upload_bytes=200_000),
                        base_url="http://127.0.0.1:8000")
    return {"explorer": explorer, "client": client, "out": out,
            "records": explain_run.read_jsonl(out / settings.JSONL_NAME)}


def assert_same_numbers(got, want, where="record"):
    """Same structure; every index, name, flag and count equal; floats equal to float32
    rounding. A query explained alone and the same query in a run over the split go through
    matrix products of other shapes, whose summation order XLA:CPU may choose by shape and
    by the host's instruction set (docs/explorer.md, 'The same numbers as tools/explain.py')."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same_numbers(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_numbers(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert isinstance(got, float) and got == pytest.approx(want, rel=1e-5, abs=1e-6), (
            where, got, want)
    else:
        assert got == want, (where, got, want)


def get(served, url, status=200):
    response = served["client"].get(url)
    assert response.status_code == status, response.text
    return response.json() if response.headers["content-type"].startswith(
        "application/json") else response


def test_rank_equals_the_records_of_tools_explain(served):
    """Every query: the answer holds the JSONL record of tools/explain.py, number for number."""
    assert served["records"]
    for record in served["records"]:
        q = record["query"]["index"]
        got = get(served, f"/api/rank?query={q}&k={K}&threshold={THRESHOLD}&mode=paper")
        for key, value in record.items():
            if key != "position":  # the place in the tool's order; here the worst-AP place
                assert_same_numbers(got[key], value, f"query {q}: {key}")
        gal = record["gallery"]
        assert got["indices"] == gal["index"]
        assert_same_numbers(got["distances"], gal["distance"])
        assert [os.path.basename(p) for p in got["gallery_paths"]] == gal["file"]
        assert all(p.startswith("bounding_box_test/") for p in got["gallery_paths"])
        assert got["selected"] == [a["index"] for a in record["selected_attributes"]]
        assert_same_numbers([got["scores"], got["errors"]],
                            [record["matching_scores"], record["errors"]])
        assert got["previous_ranks"] is None and got["upload"] is None
        by_file = get(served, f"/api/rank?file={record['query']['file']}&k={K}"
                              f"&threshold={THRESHOLD}")
        assert by_file["indices"] == gal["index"]


@pytest.mark.parametrize("mode", ["complete", "projection", "disagreement"])
def test_every_mode_equals_a_run_over_the_split(served, mode):
    ex = served["explorer"]
    data = explain_run.load_data(ex.data_root)
    fq, fg = ex.f_query, np.asarray(ex.gallery.embeddings)
    # The explorer reads the head's calibration (stored by train_attributes) as a run does.
    assert ex.calibration is not None
    runs = explain_run.explain_queries(fq, fg, np.asarray(ex.weights), ex.qp, ex.qc, ex.gp,
                                       ex.gc, k=K, threshold=THRESHOLD, mode=mode,
                                       calibration=ex.calibration)
    for i, explanation in enumerate(runs):
        m = ex.metrics
        want = explain_run.make_record(0, i, data.query, data.gallery, explanation,
                                       (m.ap[i], m.inp[i], m.first_rank[i], m.num_matches[i]),
                                       mode)
        got = get(served, f"/api/rank?query={i}&k={K}&threshold={THRESHOLD}&mode={mode}")
        # The remainder is a difference of near-equal sums: equal up to rounding.
        assert_same_numbers({k: got[k] for k in want if k not in ("position", "remainder")},
                            {k: v for k, v in want.items() if k not in ("position", "remainder")},
                            f"query {i}")
        np.testing.assert_allclose(got.get("remainder", []), want.get("remainder", []),
                                   rtol=1e-5, atol=1e-7)
        if mode == "complete":
            np.testing.assert_allclose(np.sum(got["errors"], 1), got["distances"], rtol=1e-5)
        if mode == "projection":
            np.testing.assert_allclose(np.sum(got["errors"], 1) + got["remainder"],
                                       got["distances"], rtol=1e-4, atol=1e-6)


def test_threshold_only_reselects(served):
    a = get(served, "/api/rank?query=0&threshold=0.05")
    b = get(served, "/api/rank?query=0&threshold=0.45")
    assert a["indices"] == b["indices"] and a["errors"] == b["errors"]
    assert len(a["selected"]) >= len(b["selected"])
    x = np.asarray(a["query_probabilities"])
    assert a["selected"] == np.flatnonzero(np.abs(x - 0.5) > np.float32(0.05)).tolist()
    per_attribute = ",".join(["0.05"] * 15 + ["0.45"] * 15)
    c = get(served, f"/api/rank?query=0&threshold={per_attribute}")
    t = np.asarray([0.05] * 15 + [0.45] * 15, np.float32)
    assert c["selected"] == np.flatnonzero(np.abs(x - 0.5) > t).tolist()
    assert c["threshold"] == [float(v) for v in [0.05] * 15 + [0.45] * 15]


def reference_steered(ex, i, ignore, keep_filter):
    """float64: distances of the projected embeddings, the ranking and the AP."""
    w = np.asarray(ex.weights, np.float64)
    ws = w[:, ignore]
    p = np.eye(w.shape[0]) - ws @ np.linalg.pinv(ws.T @ ws) @ ws.T if ignore.any() else np.eye(
        w.shape[0])
    fg = np.asarray(ex.gallery.embeddings, np.float64) @ p.T
    fq = ex.f_query.astype(np.float64) @ p.T
    d = ((fq[i][None] - fg) ** 2).sum(-1)
    keep = keep_filter & ~retrieval.excluded(ex.qp[i], ex.qc[i], ex.gp, ex.gc)
    kept = np.flatnonzero(keep)
    order = kept[np.argsort(d[kept], kind="stable")]
    cols = np.flatnonzero(keep_filter)
    ap = evaluation.per_query_rank_metrics(d[None, cols], ex.qp[i:i + 1], ex.gp[cols],
                                           ex.qc[i:i + 1], ex.gc[cols])["ap"][0]
    return d, order, ap


def test_steered_rank_against_numpy(served):
    ex = served["explorer"]
    names = ["upblack", "upwhite", "upgray", "upblue"]
    ignore = np.isin(ATTRIBUTE_NAMES, names)
    x = sigmoid(np.asarray(ex.gallery.embeddings, np.float64) @ np.asarray(ex.weights,
                                                                           np.float64))
    req = int(np.argmin(np.abs((x > 0.5).mean(0) - 0.5)))  # the most balanced attribute
    keep_filter = x[:, req] > 0.5
    for i in range(min(4, len(ex.queries_split))):
        got = get(served, f"/api/rank?query={i}&k={K}&ignore={','.join(names)}"
                          f"&require={ATTRIBUTE_NAMES[req]}")
        d, order, ap = reference_steered(ex, i, ignore, keep_filter)
        assert got["indices"] == order[:K].tolist()
        np.testing.assert_allclose(got["distances"], d[order[:K]], rtol=1e-4, atol=1e-6)
        assert all(x[g, req] > 0.5 for g in got["indices"])  # require filters exactly
        if got["ap"] is None:
            assert np.isnan(ap)
        else:
            assert got["ap"] == pytest.approx(ap, abs=1e-6)
        assert got["steering"] == {"ignore": sorted(names, key=ATTRIBUTE_NAMES.index),
                                   "require": [ATTRIBUTE_NAMES[req]], "forbid": [],
                                   "active": True, "gallery_kept": int(
                                       (keep_filter & ~retrieval.excluded(
                                           ex.qp[i], ex.qc[i], ex.gp, ex.gc)).sum())}
        # Ranks before steering: positions in the plain ranking under the protocol.
        plain = get(served, f"/api/rank?query={i}&k={len(ex.gallery_split) // 2}")
        for g, before in zip(got["indices"], got["previous_ranks"], strict=True):
            if g in plain["indices"]:
                assert plain["indices"].index(g) + 1 == before
            else:
                assert before > len(plain["indices"])
        assert got["unsteered"]["ap"] == plain["ap"]
        # The ignored attributes keep their probabilities (the head reads the image itself).
        assert got["query_probabilities"] == plain["query_probabilities"]


def test_split_metrics(served):
    ex = served["explorer"]
    base = get(served, "/api/metrics")
    summary = explain_run.summarize(ex.metrics)
    assert base["mAP"] == summary["mAP"] and base["rank1"] == summary["cmc"][0]
    names = ["hat", "gender"]
    steered = get(served, "/api/metrics?ignore=hat,gender")
    ignore = np.isin(ATTRIBUTE_NAMES, names)
    aps = [reference_steered(ex, i, ignore, np.ones(len(ex.gallery_split), bool))[2]
           for i in range(len(ex.queries_split))]
    assert steered["mAP"] == pytest.approx(np.nanmean(aps), abs=1e-6)
    assert steered["ignore"] == names and steered["active"]


def test_queries_listing(served):
    ex = served["explorer"]
    data = get(served, "/api/queries?order=worst_ap&limit=5000")
    assert data["total"] == len(ex.queries_split)
    aps = [q["ap"] for q in data["queries"]]
    valid = [a for a in aps if a is not None]
    assert valid == sorted(valid) and aps[:len(valid)] == valid  # no-match queries last
    by_name = get(served, "/api/queries?order=query&limit=2&offset=1")
    assert [q["index"] for q in by_name["queries"]] == [1, 2]
    name = data["queries"][0]["file"]
    found = get(served, f"/api/queries?search={name[:9].upper()}")
    assert name in [q["file"] for q in found["queries"]]
    assert get(served, "/api/queries?search=nothing-like-this")["total"] == 0


BAD = [
    ("/api/rank?query=0&k=0", "k"), ("/api/rank?query=0&k=abc", "k"),
    ("/api/rank?query=0&k=1000", "k"), ("/api/rank?query=0&threshold=0.7", "threshold"),
    ("/api/rank?query=0&threshold=abc", "threshold"), ("/api/rank?query=0&mode=bogus", "mode"),
    ("/api/rank?query=0&ignore=upblak", "ignore"), ("/api/rank?query=0&require=bogus", "require"),
    ("/api/rank?query=0&require=hat&forbid=hat", "forbid"), ("/api/rank?query=-1", "query"),
    ("/api/rank?query=99999", "query"), ("/api/rank", "query"),
    ("/api/rank?query=0&file=x.jpg", "file"), ("/api/rank?query=0&treshold=0.3", "treshold"),
    ("/api/rank?query=0&k=3&k=4", "k"), ("/api/rank?upload=../../etc", "upload"),
    ("/api/rank?file=../../../../etc/passwd", "file"), ("/api/rank?file=/etc/passwd", "file"),
    ("/api/rank?file=..%2F..%2Fbounding_box_test%2F0000_c1s1_000001_01.jpg", "file"),
    ("/api/queries?order=best", "order"), ("/api/queries?limit=0", "limit"),
    ("/api/metrics?ignore=nope", "ignore"), ("/api/image/query/abc", "index"),
    ("/api/info?x=1", "x"), ("/api/maps?query=0&gallery=0&mode=projection", "mode"),
]


@pytest.mark.parametrize("url,parameter", BAD)
def test_bad_parameters_answer_400_naming_them(served, url, parameter):
    response = served["client"].get(url)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["parameter"] == parameter and body["error"]
    assert get(served, "/api/rank?query=0")["indices"]  # the server goes on serving


def test_paths_from_requests_never_leave_the_data_root(served):
    client = served["client"]
    for url in ["/api/image/query/..%2F..%2F..%2Fetc%2Fpasswd",
                "/api/image/gallery/%2Fetc%2Fpasswd", "/api/image/../../etc/passwd",
                "/api/image/gallery/99999", "/api/image/train/0", "/static/..%2F..%2Fapp.py",
                "/static/%2Fetc%2Fpasswd", "/api/image/upload/0123456789abcdef",
                "/api/rank?upload=0123456789abcdef"]:
        response = client.get(url)
        assert response.status_code in (400, 404), url
        assert b"root:" not in response.content and b"import " not in response.content
        assert response.headers["content-type"].startswith("application/json") or \
            url.startswith("/static/")
    ok = client.get("/api/image/gallery/0")
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg"
    assert ok.content[:2] == b"\xff\xd8"


def test_upload_ranks_an_image_as_its_gallery_twin(served):
    ex = served["explorer"]
    path = ex.gallery_split.paths[3]
    with open(path, "rb") as f:
        data = f.read()
    response = served["client"].post("/api/rank?k=5&name=../../secret/twin.jpg", content=data,
                                      headers={"content-type": "image/jpeg"})
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["upload"] and got["query"]["file"] == "twin.jpg"
    assert got["indices"][0] == 3 and got["distances"][0] == pytest.approx(0.0, abs=1e-6)
    assert got["gallery"]["true_match"] is None and got["ap"] is None
    again = get(served, f"/api/rank?upload={got['upload']}&k=5")
    assert again["indices"] == got["indices"]
    steered = get(served, f"/api/rank?upload={got['upload']}&k=5&ignore=hat")
    assert steered["previous_ranks"][0] == 1
    image = served["client"].get(f"/api/image/upload/{got['upload']}")
    assert image.status_code == 200 and image.content[:2] == b"\xff\xd8"


def png(size, mode="RGB"):
    out = io.BytesIO()
    Image.new(mode, size).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("body,status,text", [
    (b"", 400, "empty"), (b"not an image at all", 400, "not an image"),
    (png((5000, 4000), "L"), 400, "pixels"), (b"\x00" * 200_001, 413, "larger than"),
])
def test_bad_uploads(served, body, status, text):
    response = served["client"].post("/api/rank", content=body)
    assert response.status_code == status, response.text
    assert text in response.json()["error"] and response.json()["parameter"] == "body"
    assert get(served, "/api/rank?query=1")["indices"]


def test_upload_of_another_format_is_refused(served):
    out = io.BytesIO()
    Image.new("RGB", (8, 16)).save(out, "TIFF")
    response = served["client"].post("/api/rank", content=out.getvalue())
    assert response.status_code == 400 and "TIFF" in response.json()["error"]


def test_host_header_and_security_headers(served):
    client = served["client"]
    assert client.get("/api/info", headers={"host": "evil.example"}).status_code == 400
    page = client.get("/")
    assert page.status_code == 200 and "/static/explorer.js" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    info = get(served, "/api/info")
    assert [m["name"] for m in info["modes"]] == list(settings.MODES)
    assert info["defaults"]["k"] == served["explorer"].settings.k
    assert info["uploads"] and info["images"] and info["maps"]
    assert client.get("/static/explorer.css").status_code == 200
    # Each attribute with the head's test accuracy (stored with the head), status and caution.
    head = checkpoints.restore_head_accuracy(served["explorer"].description["checkpoint"])
    assert info["min_accuracy"] == learned.LEARNED_ACCURACY
    for a in info["attributes"]:
        value = head[a["name"]]
        assert a["accuracy"] == value
        assert a["status"] == learned.status(value)
        assert a["caution"] == learned.caution(a["name"], value)


def test_real_maps_decompose_the_errors_the_page_shows(served):
    ex = served["explorer"]
    ex_maps = ex.pair_maps
    assert ex.pair_maps is not None  # a checkpoint's explorer maps with the model itself
    info = get(served, "/api/info")
    assert info["maps"] and info["map_modes"] == ["paper", "complete"]
    ranked = get(served, f"/api/rank?query=0&k={K}&mode=complete")
    g = ranked["indices"][0]
    qm, gm = ex.maps(("query", 0), g, "complete")
    assert qm.shape == gm.shape == (len(ATTRIBUTE_NAMES), *ex.model_input(("query", 0)).shape[:2])
    sums = qm.sum(axis=(1, 2)) + gm.sum(axis=(1, 2))
    errors = np.asarray(ranked["errors"][0])
    np.testing.assert_allclose(sums, errors, atol=0.02 * np.abs(errors).sum())
    response = served["client"].get(f"/api/maps?query=0&gallery={g}&attribute=hat&side=query")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    ex.pair_maps = None
    try:  # a server without a provider says so
        response = served["client"].get(f"/api/maps?query=0&gallery={g}")
        assert response.status_code == 404 and "not available" in response.json()["error"]
    finally:
        ex.pair_maps = ex_maps


def test_maps_hook_and_server_errors(served, tiny_run):
    ex = served["explorer"]
    provider = ex.pair_maps

    def pair_maps(query, gallery, mode):  # brightness per attribute, signed by mode
        sign = 1.0 if mode == "paper" else -1.0
        a = np.arange(len(ATTRIBUTE_NAMES))[:, None, None] + 1.0
        return sign * a * query.mean(-1)[None], a * gallery.mean(-1)[None]

    ex.pair_maps = pair_maps
    try:
        response = served["client"].get("/api/maps?query=0&gallery=1&attribute=hat&side=gallery")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(response.content)) as im:
            assert im.mode == "P" and im.size == (32, 64)  # the model's input, W x H
            rgba = np.asarray(im.convert("RGBA")).astype(int)
        # The report's colours: opacity up to 0.8, and where a pixel is clearly visible it is
        # clearly red (positive) or clearly blue (negative).
        visible = rgba[..., 3] >= 100
        assert 0 < rgba[..., 3].max() <= 204 and visible.any()
        assert np.all(np.abs(rgba[..., 0] - rgba[..., 2])[visible] > 50)
        ex.pair_maps = lambda q, g, mode: (np.zeros(3), np.zeros(3))
        response = served["client"].get("/api/maps?query=0&gallery=2&attribute=hat")
        assert response.status_code == 400 and "[A, H, W]" in response.json()["error"]

        def broken(q, g, mode):
            raise RuntimeError("a provider bug")

        ex.pair_maps = broken
        client = TestClient(explorer_app.create_app(ex), base_url="http://127.0.0.1:8000",
                            raise_server_exceptions=False)
        response = client.get("/api/maps?query=0&gallery=3&attribute=hat")
        assert response.status_code == 500 and "RuntimeError" in response.json()["error"]
        assert client.get("/api/rank?query=0").status_code == 200  # still serving
    finally:
        ex.pair_maps = provider


def test_explorer_from_arrays_without_images_or_model():
    rng = np.random.default_rng(0)
    n, q, g = 16, 6, 40
    fq = rng.normal(size=(q, n)).astype(np.float32)
    fg = rng.normal(size=(g, n)).astype(np.float32)
    w = rng.normal(size=(n, len(ATTRIBUTE_NAMES))).astype(np.float32)
    ex = Explorer.from_arrays(fq, fg, w, query_pids=np.arange(q) % 3 + 1,
                              query_cameras=np.ones(q, int), gallery_pids=np.arange(g) % 4,
                              gallery_cameras=np.arange(g) % 3 + 1)
    client = TestClient(explorer_app.create_app(ex), base_url="http://127.0.0.1:8000")
    got = client.get("/api/rank?query=2&k=5&ignore=hat").json()
    assert len(got["indices"]) == 5
    assert client.get("/api/image/gallery/0").status_code == 404
    assert client.post("/api/rank", content=png((8, 16))).status_code == 501
    with pytest.raises(LookupError, match="no upload"):
        ex.rank(QueryRef("upload", "0123456789abcdef"))
    direct = steering.steer_ranking(fq[2], fg, w, ignore=np.isin(ATTRIBUTE_NAMES, ["hat"]),
                                    keep=~retrieval.excluded(ex.qp[2], ex.qc[2], ex.gp, ex.gc),
                                    k=5)
    assert got["indices"] == direct.indices.tolist()
    # Embeddings without the head's test accuracy: nothing is marked.
    info = client.get("/api/info").json()
    assert info["min_accuracy"] is None
    assert all(a["status"] is None and a["caution"] is None for a in info["attributes"])
    marked = Explorer.from_arrays(fq, fg, w, query_pids=np.arange(q) % 3 + 1,
                                  query_cameras=np.ones(q, int), gallery_pids=np.arange(g) % 4,
                                  gallery_cameras=np.arange(g) % 3 + 1,
                                  head_accuracy={n: 0.5 if n == "up" else 0.9
                                                 for n in ATTRIBUTE_NAMES})
    assert [a["name"] for a in marked.info()["attributes"] if a["status"] == "not learned"] \
        == ["up"]
