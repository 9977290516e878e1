"""Attribute maps of explanation runs (reid_jax.explain.map_outputs, run, report) and the part
masks of counterfactual re-renders, on the real tiny run."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from reid_jax import checkpoints, synthetic
from reid_jax.data import market1501
from reid_jax.data.attributes import ATTRIBUTE_NAMES
from reid_jax.explain import counterfactuals, learned, map_outputs, report
from reid_jax.explain import run as explain_run

A = len(ATTRIBUTE_NAMES)


@pytest.fixture(scope="module")
def mapped_run(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("mapped") / "out"
    result = explain_run.run(checkpoint=tiny_run["checkpoint"], data_root=tiny_run["data"],
                             output_dir=out, queries=3, k=3, threshold=0.1,
                             attribute_maps=True, map_queries=2, progress=False)
    return result, explain_run.read_jsonl(result.jsonl)


def test_maps_decompose_the_errors_the_run_ranked(mapped_run, tiny_run):
    result, records = mapped_run
    assert result.summary["num_map_queries"] == 2
    assert [("maps" in r) for r in records] == [True, True, False]
    for r in records[:2]:
        assert r["maps"] == f"maps/{os.path.splitext(r['query']['file'])[0]}.npz"
        m = map_outputs.read_query_maps(os.path.join(result.output_dir, r["maps"]))
        assert list(m["attributes"]) == list(ATTRIBUTE_NAMES)
        assert [os.path.basename(p) for p in m["gallery_paths"]] == r["gallery"]["file"]
        assert all(not os.path.isabs(p) for p in m["gallery_paths"])
        for name in ("query_evidence", "gallery_evidence", "query_contribution",
                     "gallery_contribution", "query_probabilities", "gallery_probabilities"):
            assert m[name].dtype == np.float32, name
        assert m["query_evidence"].shape == (A, 128, 64)  # the stored image's size
        assert m["gallery_contribution"].shape == (3, A, 128, 64)
        # The maps decompose the embeddings the run ranked (same eval transform): their sums
        # are the record's e_a, and their probabilities the record's.
        e = np.asarray(r["errors"])
        sums = m["query_contribution"].sum((2, 3)) + m["gallery_contribution"].sum((2, 3))
        scale = np.abs(e).sum(axis=1, keepdims=True)
        assert np.abs(sums - e).max() <= 1e-3 * scale.max()
        np.testing.assert_allclose(m["query_probabilities"], r["query_probabilities"],
                                   atol=1e-4)
        sel = [s["index"] for s in r["selected_attributes"]]
        np.testing.assert_allclose(m["gallery_probabilities"][:, sel],
                                   r["gallery_probabilities"], atol=1e-4)
        # Evidence maps sum to the logit minus the baseline's: the same baseline for all images.
        z = np.log(m["query_probabilities"] / (1 - m["query_probabilities"]))
        zg = np.log(m["gallery_probabilities"] / (1 - m["gallery_probabilities"]))
        base_q = z - m["query_evidence"].sum((1, 2))
        base_g = zg - m["gallery_evidence"].sum((2, 3))
        np.testing.assert_allclose(base_g, np.broadcast_to(base_q, base_g.shape), atol=2e-3)


def test_report_overlays_switch_by_attribute_rows_and_pie_slices(mapped_run, tiny_run):
    result, records = mapped_run
    html = open(os.path.join(result.output_dir, "report", "queries.html")).read()
    cards = re.findall(r"<section class=\"card\" id=\"q(\d+)\"( data-strips='([^']*)')?", html)
    strips = {int(n): json.loads(s.replace("&#34;", '"')) for n, _, s in cards if s}
    assert sorted(strips) == [1, 2]  # the third query has no maps
    for files in strips.values():
        for rel in files.values():
            assert os.path.isfile(os.path.join(result.output_dir, "report", rel))
    first = strips[1]
    rows = re.findall(r'<tr class="pick[^"]*" data-attr="(\w+)"', html)
    areas = re.findall(r'<area shape="poly" coords="[\d,]+" href="#q\d+" data-attr="(\w+)"', html)
    assert rows and set(rows) <= set(first) | set(strips[2])
    assert areas and set(areas) <= set(first) | set(strips[2])
    assert "document.addEventListener(\"click\"" in html and "<script src" not in html
    # The head's test accuracy came with the checkpoint: each card names the cautions of its
    # strips' attributes that the head has not learned or that were not measured.
    head = result.summary["head_accuracy"]
    assert head == learned.summary(checkpoints.restore_head_accuracy(tiny_run["checkpoint"]))
    expected = learned.cautions(head)
    assert expected
    found = re.findall(r"data-strips='([^']*)' data-cautions='([^']*)'", html)
    assert len(found) == 2
    cards = html.split('<section class="card" id="q')[1:3]
    for card, (files, cautions) in zip(cards, found, strict=True):
        files, cautions = (json.loads(x.replace("&#34;", '"').replace("&#39;", "'"))
                           for x in (files, cautions))
        assert cautions == {n: expected[n] for n in files if n in expected}
        # The map shown first is of a learned attribute where the card has one; its caution
        # paragraph is hidden then, and shows the caution otherwise.
        chosen = re.search(r'<b class="mapname">(\w+)</b>', card).group(1)
        assert (chosen in cautions) == all(n in cautions for n in files)
        shown = re.search(r'<p class="caution"( hidden)?>([^<]*)</p>', card)
        assert bool(shown.group(1)) == (chosen not in cautions)
    # A strip holds the query, the k ranked images and two tiles per error composition.
    from PIL import Image
    with Image.open(os.path.join(result.output_dir, "report", next(iter(first.values())))) as im:
        ranks = [r for r in (1, 3, 10) if r <= 3]
        assert im.size == (report.THUMBNAIL_WH[0] * (1 + 3 + 2 * len(ranks)), 128)
        assert im.mode == "P" and "transparency" in im.info  # palette with alpha


def test_overlay_strip_colours_opacity_and_resizing(tmp_path):
    """Red for +1, blue for -1 at opacity 0.8, transparent at 0; tiles of another size are
    resized to the thumbnail's."""
    from PIL import Image
    w, h = report.THUMBNAIL_WH
    tile = np.zeros((h, w), np.float32)
    tile[10, 10], tile[20, 20] = 1.0, -1.0
    big = np.full((2 * h, 2 * w), 0.5, np.float32)  # resized to (h, w), stays 0.5
    path = str(tmp_path / "strip.png")
    report.write_overlay_strip([tile, big], path)
    with Image.open(path) as im:
        rgba = np.asarray(im.convert("RGBA")).astype(int)
    assert rgba.shape == (h, 2 * w, 4)
    red, blue, zero = rgba[10, 10], rgba[20, 20], rgba[0, 0]
    assert red[0] > red[1] + 50 and red[0] > red[2] + 50 and blue[2] > blue[0] + 50
    assert red[3] == blue[3] == 204 and zero[3] <= 1
    half = rgba[:, w:]
    assert np.all(np.abs(half[..., 3] - 102) <= 1) and np.all(half[..., 0] > half[..., 2])


def test_maps_are_refused_where_they_do_not_apply(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="--attribute_maps needs --mode=paper or "
                                         "--mode=complete.*'projection'"):
        explain_run.run(checkpoint=tiny_run["checkpoint"], data_root=tiny_run["data"],
                        output_dir=tmp_path / "o", queries=1, mode="projection",
                        attribute_maps=True, progress=False)
    data = market1501.load_market1501(tiny_run["data"])
    with pytest.raises(ValueError, match="--attribute_maps needs --checkpoint"):
        explain_run.run(data_root=tiny_run["data"], output_dir=tmp_path / "o2",
                        query_embeddings=np.zeros((len(data.query), 8), np.float32),
                        gallery_embeddings=np.zeros((len(data.gallery), 8), np.float32),
                        weights=np.zeros((8, A), np.float32), attribute_maps=True,
                        progress=False)
    with pytest.raises(ValueError, match="config.explain.map_queries must be >= 0"):
        explain_run.run(checkpoint=tiny_run["checkpoint"], data_root=tiny_run["data"],
                        output_dir=tmp_path / "o3", attribute_maps=True, map_queries=-2,
                        progress=False)
    bad = tmp_path / "bad.npz"
    np.savez(bad, attributes=np.asarray(ATTRIBUTE_NAMES))
    with pytest.raises(ValueError, match=r"bad.npz lack \['gallery_paths'"):
        map_outputs.read_query_maps(bad)
    flat = tmp_path / "flat.npz"  # every field there, of the wrong rank
    np.savez(flat, **{k: np.zeros(3) for k in map_outputs.FIELDS})
    with pytest.raises(ValueError, match=r"flat.npz: attributes must be \[A\] and "
                                         r"gallery_evidence \[k, A, H, W\], got shapes \(3,\) "
                                         r"and \(3,\)"):
        map_outputs.read_query_maps(flat)


def test_counterfactual_re_renders_carry_their_part_masks(tiny_dataset):
    data = market1501.load_market1501(tiny_dataset)
    files = [os.path.join("bounding_box_test", os.path.basename(p)) for p in data.gallery.paths]
    people = [i for i, p in enumerate(data.gallery.pids) if p > 0]
    made = counterfactuals.make_counterfactuals(tiny_dataset, files, people, 4, seed=1,
                                                min_changed_pixels=16)
    assert made.accepted
    for cf in made.accepted:
        name = ATTRIBUTE_NAMES[cf.attribute]
        _, labels = synthetic.render_counterfactual(
            tiny_dataset, files[cf.gallery_index], name, cf.value, return_labels=True)
        np.testing.assert_array_equal(cf.part_labels, labels)
        assert cf.changed_region.shape == labels.shape and cf.changed_region.dtype == bool
        assert cf.changed_region.sum() >= cf.changed_pixels > 0
        regions = synthetic.labels_to_regions(cf.part_labels)
        if regions[cf.attribute].any():  # what now shows the attribute lies in the change
            assert (regions[cf.attribute] & cf.changed_region).sum() > 0
