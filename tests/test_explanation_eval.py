"""Tests of reid_jax.explain.quality and tools/evaluate_explanations.py on a tiny synthetic set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from reid_jax import explain, progress, synthetic
from reid_jax.data.attributes import ATTRIBUTE_NAMES, labels_for_pids, load_market_attributes
from reid_jax.data.market1501 import load_market1501
from reid_jax.explain import baselines, bootstrap, counterfactuals
from reid_jax.explain import gallery_metrics as gm
from reid_jax.explain import metrics as em
from reid_jax.explain import quality as ee
from reid_jax.explain import table as quality_table
from reid_jax.explain.table import MODES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A = len(ATTRIBUTE_NAMES)
DATA = synthetic.DatasetConfig(num_train_ids=2, num_test_ids=4, images_per_id=6,
                               num_distractors=2, num_junk=1, seed=3, supersample=1)
CONFIG = {"model": {"width": 8, "blocks": (1, 1, 1, 1), "non_local": (0, 0, 0, 0)},
          "data": {"height": 32, "width": 16, "num_workers": 0, "eval_batch_size": 16}}
K = 3
NUM_CF = 40
MAP_IMAGES = 6


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny synthetic data root and random-init checkpoints with and without a head.


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("evx") / "synthetic")
    synthetic.generate_dataset(root, DATA)
    return root


@pytest.fixture(scope="module")
def checkpoints_dir(tmp_path_factory):
    import jax.numpy as jnp
    from flax import nnx

    from reid_jax.checkpoints import save_checkpoint
    from reid_jax.models.agw import AGW
    from reid_jax.models.attribute_head import AttributeHead

    root = tmp_path_factory.mktemp("ckpt")
    model = AGW(7, **CONFIG["model"], rngs=nnx.Rngs(0))
    head = AttributeHead(model.feature_dim, rngs=nnx.Rngs(1))
    # Large weights, so that some query attributes are confident (|x - 0.5| > 0.4).
    head.kernel[...] = jnp.asarray(head.kernel[...]) * 40.0
    meta = {"num_classes": 7, "config": CONFIG}
    save_checkpoint(root / "with_head", 0, model_state=model, attribute_head_state=head,
                    meta=meta)
    save_checkpoint(root / "no_head", 0, model_state=model, meta=meta)
    return root


@pytest.fixture(scope="module")
def run(dataset, checkpoints_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = ee.measure(checkpoint=checkpoints_dir / "with_head", data_root=dataset,
                         output_dir=out, k=K, num_counterfactuals=NUM_CF, map_images=MAP_IMAGES)
    return result


def _embeddings(out_dir):
    with np.load(os.path.join(out_dir, "embeddings", "query.npz")) as z:
        fq = z["features"]
    with np.load(os.path.join(out_dir, "embeddings", "gallery.npz")) as z:
        fg = z["features"]
    return fq, fg


def _weights(checkpoint):
    from reid_jax.checkpoints import restore_attribute_head

    return np.asarray(restore_attribute_head(checkpoint).kernel[...], np.float32)


def _labels(root):
    data = load_market1501(root)
    attrs = load_market_attributes(os.path.join(root, "market_attribute.mat"))
    lq, vq = labels_for_pids(attrs, data.query.pids, "query")
    lg, vg = labels_for_pids(attrs, data.gallery.pids, "gallery")
    return data, lq, vq, lg, vg


# --------------------------------------------------------------------------------------------
# Pairs.


def test_ranked_pairs_match_a_float64_reference():
    rng = np.random.default_rng(0)
    q, g, n, k = 7, 30, 5, 4
    fq, fg = rng.normal(size=(q, n)), rng.normal(size=(g, n))
    qp, qc = rng.integers(1, 4, q), rng.integers(1, 4, q)
    gp, gc = rng.integers(-1, 4, g), rng.integers(1, 4, g)
    pairs = counterfactuals.ranked_pairs(fq, fg, qp, qc, gp, gc, k, query_chunk=3)
    expected = set()
    for i in range(q):
        d = np.sum((fq[i] - fg) ** 2, axis=1)
        allowed = (gp > 0) & ~((gp == qp[i]) & (gc == qc[i]))
        ranked = [j for j in np.argsort(d) if allowed[j]][:k]
        matches = np.flatnonzero((gp == qp[i]) & (gc != qc[i]))
        expected |= {(i, int(j)) for j in (*ranked, *matches)}
    got = list(zip(pairs.query.tolist(), pairs.gallery.tolist(), strict=True))
    assert got == sorted(expected)
    np.testing.assert_array_equal(pairs.true_match, gp[pairs.gallery] == qp[pairs.query])
    assert (gp[pairs.gallery] > 0).all()
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        counterfactuals.ranked_pairs(fq, fg, qp, qc, gp, gc, 0)
    with pytest.raises(ValueError, match="gallery_pids/gallery_cams must have shape"):
        counterfactuals.ranked_pairs(fq, fg, qp, qc, gp[:-1], gc, k)


# --------------------------------------------------------------------------------------------
# Counterfactual images.


def test_planned_value():
    labels = np.zeros(A, np.uint8)
    labels[ATTRIBUTE_NAMES.index("upred")] = 1
    labels[ATTRIBUTE_NAMES.index("age2")] = 1
    assert counterfactuals.planned_value(labels, ATTRIBUTE_NAMES.index("backpack")) == (True, None)
    assert counterfactuals.planned_value(labels, ATTRIBUTE_NAMES.index("upred")) == (False, 1)
    assert counterfactuals.planned_value(labels, ATTRIBUTE_NAMES.index("upblue")) == (True, 1)
    assert counterfactuals.planned_value(labels, ATTRIBUTE_NAMES.index("age2")) == (False, 1)
    assert counterfactuals.planned_value(labels, ATTRIBUTE_NAMES.index("age4")) == (True, 1)


def _gallery(dataset):
    data = load_market1501(dataset)
    files = [os.path.basename(p) for p in data.gallery.paths]
    return data, files, np.flatnonzero(data.gallery.pids > 0)


def test_make_counterfactuals(dataset):
    data, files, persons = _gallery(dataset)
    made = counterfactuals.make_counterfactuals(dataset, files, persons, NUM_CF, seed=1)
    assert len(made.accepted) == NUM_CF
    counts = np.bincount([cf.attribute for cf in made.accepted], minlength=A)
    # Round-robin: every attribute whose candidates did not run out gets its share.
    exhausted = made.tried == made.candidates
    assert (counts[~exhausted] >= counts.max() - 1).all() and (~exhausted).any()
    assert (made.tried >= counts + made.rejected).all() and made.rejected.sum() >= 0
    seen = set()
    for cf in made.accepted[:12]:
        name = ATTRIBUTE_NAMES[cf.attribute]
        assert (cf.gallery_index, cf.attribute) not in seen
        seen.add((cf.gallery_index, cf.attribute))
        person, _, _ = synthetic.image_record(dataset, files[cf.gallery_index])
        np.testing.assert_array_equal(cf.labels_before, synthetic.person_labels(person))
        np.testing.assert_array_equal(
            cf.labels_after,
            synthetic.person_labels(synthetic.change_attribute(person, name, cf.value)))
        assert cf.changed_labels[cf.attribute] and 1 <= cf.changed_labels.sum() <= 2
        assert cf.changed_pixels >= counterfactuals.DEFAULT_MIN_CHANGED_PIXELS
        # The stored JPEG is what render_counterfactual gives for that change.
        np.testing.assert_array_equal(
            synthetic.decode_jpeg(cf.jpeg),
            synthetic.render_counterfactual(dataset, files[cf.gallery_index], name, cf.value))
    # The same set again, rendered ahead by two worker processes.
    again = counterfactuals.make_counterfactuals(dataset, files, persons, NUM_CF, seed=1,
                                                 workers=2)
    assert [(c.gallery_index, c.attribute, c.value, c.changed_pixels, c.jpeg)
            for c in again.accepted] == [(c.gallery_index, c.attribute, c.value,
                                          c.changed_pixels, c.jpeg) for c in made.accepted]
    for a, b in zip(again.accepted, made.accepted, strict=True):
        np.testing.assert_array_equal(a.part_labels, b.part_labels)
        np.testing.assert_array_equal(a.changed_region, b.changed_region)
    for field in ("tried", "rejected", "candidates"):
        np.testing.assert_array_equal(getattr(again, field), getattr(made, field))


def test_invisible_changes_are_rejected(dataset):
    _, files, persons = _gallery(dataset)
    made = counterfactuals.make_counterfactuals(dataset, files, persons[:2], 5,
                                                min_changed_pixels=10**6, workers=1)
    assert made.accepted == []
    np.testing.assert_array_equal(made.rejected, made.tried)
    assert made.tried.sum() == made.candidates.sum() > 0  # every candidate was tried once
    with pytest.raises(ValueError, match="num_counterfactuals must be >= 0"):
        counterfactuals.make_counterfactuals(dataset, files, persons, -1)
    with pytest.raises(ValueError, match="pixel_tolerance"):
        counterfactuals.make_counterfactuals(dataset, files, persons, 1, pixel_tolerance=300)
    with pytest.raises(ValueError, match="workers must be >= 0, got -1"):
        counterfactuals.make_counterfactuals(dataset, files, persons, 1, workers=-1)
    data = load_market1501(dataset)
    distractor = [i for i, p in enumerate(data.gallery.pids)
                  if p == 0 and synthetic.image_record(dataset, files[i])[0] is None]
    if distractor:
        with pytest.raises(ValueError, match="shows no person"):
            counterfactuals.make_counterfactuals(dataset, files, distractor, 1)


# --------------------------------------------------------------------------------------------
# Separations and the metrics against the library and float64 references.


def _random_inputs(seed=0, p=40, n=16):
    rng = np.random.default_rng(seed)
    fq = rng.normal(size=(p, n)).astype(np.float32)
    fg = rng.normal(size=(p, n)).astype(np.float32)
    w = (rng.normal(size=(n, A)) * 0.5).astype(np.float32)
    return fq, fg, w


def test_pair_separations_match_float64_reference():
    fq, fg, w = _random_inputs()
    q64, g64, w64 = (x.astype(np.float64) for x in (fq, fg, w))
    diff2 = (q64 - g64) ** 2
    complete = np.abs(w64) / np.abs(w64).sum(axis=1, keepdims=True)
    xq, xg = 1 / (1 + np.exp(-q64 @ w64)), 1 / (1 + np.exp(-g64 @ w64))
    scores = (1 - np.abs(xq - xg)) / (0.5 + np.abs(xq - 0.5))
    d = q64 - g64
    c = np.linalg.lstsq(w64, d.T, rcond=None)[0].T
    prior = np.linspace(0.0, 1.0, A)
    ref = {"paper": diff2 @ w64, "complete": diff2 @ complete, "scores": 1 - scores,
           "projection": c * (d @ w64), "disagreement": xq * (1 - xg) + xg * (1 - xq),
           "prior": np.broadcast_to(prior, (40, A))}
    assert set(ref) == set(MODES)
    for mode, expected in ref.items():
        got = counterfactuals.pair_separations(fq, fg, w, mode, chunk=16,
                                               prior=prior if mode == "prior" else None)
        assert got.shape == (40, A) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())
    np.testing.assert_allclose(counterfactuals.pair_separations(fq, fg, w, "complete").sum(1),
                               diff2.sum(1), rtol=1e-5)
    with pytest.raises(ValueError, match="mode must be one of"):
        counterfactuals.pair_separations(fq, fg, w, "gemm")
    with pytest.raises(ValueError, match=r"mode='prior' needs prior of shape \(30,\)"):
        counterfactuals.pair_separations(fq, fg, w, "prior")
    with pytest.raises(ValueError, match=r"f_gallery \[P, N\]"):
        counterfactuals.pair_separations(fq, fg[:3], w, "paper")


def test_counterfactual_metrics_equal_the_library():
    rng = np.random.default_rng(1)
    q, g, n, c = 6, 9, 16, 12
    fq = rng.normal(size=(q, n)).astype(np.float32)
    fg = rng.normal(size=(g, n)).astype(np.float32)
    fc = rng.normal(size=(c, n)).astype(np.float32)
    w = rng.normal(size=(n, A)).astype(np.float32)
    lq = rng.integers(0, 2, (q, A)).astype(np.uint8)
    cfs = []
    for i in range(c):
        before = rng.integers(0, 2, A).astype(np.uint8)
        a = int(rng.integers(A))
        after = before.copy()
        after[a] ^= 1
        if i % 3 == 0:  # a colour-like change flips a second label
            after[(a + 1) % A] ^= 1
        cfs.append(counterfactuals.Counterfactual(gallery_index=i % g, attribute=a, value=None,
                                     labels_before=before, labels_after=after,
                                     changed_pixels=100, jpeg=b""))
    pq = np.repeat(np.arange(q), g)
    pg = np.tile(np.arange(g), q)
    pairs = counterfactuals.CandidatePairs(pq, pg, (pq + pg) % 4 == 0)
    valid = np.ones(q, bool)
    valid[2] = False
    prior = rng.random(A)
    out = counterfactuals.counterfactual_metrics(fq, fg, fc, w, cfs, pairs, lq, valid,
                                                 prior=prior, bootstrap_samples=200)

    rows = [(qi, ci) for ci, cf in enumerate(cfs) for qi in range(q)
            if valid[qi] and cf.gallery_index in pg[pq == qi]]
    rq = np.asarray([r[0] for r in rows])
    rc = np.asarray([r[1] for r in rows])
    attr = np.asarray([cfs[i].attribute for i in rc])
    changed = np.stack([cfs[i].changed_labels for i in rc])
    away = np.asarray([lq[qi, cfs[ci].attribute] == cfs[ci].labels_before[cfs[ci].attribute]
                       for qi, ci in rows])
    assert out["num_pairs"] == len(rows) and out["num_away_pairs"] == int(away.sum())
    assert 0 < away.sum() < len(rows)  # both directions occur
    gal = np.asarray([cfs[i].gallery_index for i in rc])
    counts = bootstrap.resample_counts(c, 200, 0)
    for mode in MODES:
        if mode == "prior":  # no rise: its fixed order is scored
            far = np.broadcast_to(prior, (len(rows), A))
            near = np.zeros_like(far)
        else:
            s0 = counterfactuals.pair_separations(fq[rq], fg[gal], w, mode)
            s1 = counterfactuals.pair_separations(fq[rq], fc[rc], w, mode)
            near = np.where(away[:, None], s0, s1)
            far = np.where(away[:, None], s1, s0)
        ref = em.counterfactual_hit_rate(near, far, attr, changed, return_rows=True)
        assert out[mode]["top1"] == ref["top1"] and out[mode]["top3"] == ref["top3"]
        # The interval resamples counterfactual images: all pairs of one image together.
        hits = np.bincount(rc, weights=ref["rows"]["top1"], minlength=c)
        num = np.bincount(rc, minlength=c)
        rates = (counts @ hits) / (counts @ num)
        assert out[mode]["intervals"]["top1"] == pytest.approx(
            list(np.percentile(rates, [2.5, 97.5])))
        lo, hi = out[mode]["intervals"]["top3"]
        assert lo <= out[mode]["top3"] <= hi
        assert out[mode]["mean_rank"] == ref["mean_rank"]
        assert out["per_attribute"][f"{mode}_top1"] == [
            ref["per_attribute"][nm]["top1"] for nm in ATTRIBUTE_NAMES]
        sub = em.counterfactual_hit_rate(near[~away], far[~away], attr[~away],
                                         changed[~away], top=(1,))
        assert out["subsets"]["towards"][f"{mode}_top1"] == sub["top1"]
    assert out["chance"] == ref["chance"]
    assert len(out["per_attribute"]["pairs"]) == A
    # The prior's top-1 is its largest entry: a hit where that attribute changed.
    assert out["prior"]["top1"] == pytest.approx(np.mean(changed[:, np.argmax(prior)]))
    without = counterfactuals.counterfactual_metrics(fq, fg, fc, w, cfs, pairs, lq, valid)
    assert "prior" not in without and without["paper"]["top1"] == out["paper"]["top1"]
    with pytest.raises(ValueError, match="f_counterfactual must have shape"):
        counterfactuals.counterfactual_metrics(fq, fg, fc[:-1], w, cfs, pairs, lq)


def _no_removal_ids(q, g):
    """Pids/cameras under which the protocol removes nothing (no shared pid, no junk)."""
    return dict(query_pids=np.arange(1, q + 1), query_cams=np.ones(q, np.int64),
                gallery_pids=np.arange(100, 100 + g), gallery_cams=np.ones(g, np.int64))


def _data_ids(data):
    return dict(query_pids=data.query.pids, query_cams=data.query.cameras,
                gallery_pids=data.gallery.pids, gallery_cams=data.gallery.cameras)


def _prior(rng):
    """A training prior of 6 random identities with 3 images each (random embeddings)."""
    ids = rng.integers(0, 2, (6, A))
    pids = np.repeat(np.arange(1, 7), 3)
    return baselines.training_prior(ids, features=rng.normal(size=(18, 16)), pids=pids,
                                    image_labels=ids[pids - 1], k=4)


def test_label_metrics_equal_the_library():
    rng = np.random.default_rng(2)
    fq = rng.normal(size=(5, 16)).astype(np.float32)
    fg = rng.normal(size=(11, 16)).astype(np.float32)
    w = (3 * rng.normal(size=(16, A))).astype(np.float32)
    lq, lg = rng.integers(0, 2, (5, A)), rng.integers(0, 2, (11, A))
    vg = np.ones(11, bool)
    vg[[0, 4]] = False
    ids = _no_removal_ids(5, 11)
    prior = _prior(rng)
    auroc, amd = ee.label_metrics(fq, fg, w, lq, lg, None, vg, k=4, threshold=0.3, prior=prior,
                                  bootstrap_samples=100, **ids)
    assert set(auroc) == {"all_pairs", "top4", "per_attribute"}
    assert set(amd) == {"all_pairs", "top4", "per_attribute"}
    counts = bootstrap.resample_counts(5, 100, 0)
    base = {}
    for mode in ("prior", *MODES):
        fixed = {"all": prior.all_pairs, "top": prior.neighbours} if mode == "prior" else {}
        full = gm.streamed_amd_over_gallery(fq, fg, w, lq, lg, mode, valid_gallery=vg,
                                            threshold=0.3, prior=fixed.get("all"))
        top = gm.amd_over_top_k(fq, fg, w, lq, lg, mode, k=4, valid_gallery=vg, threshold=0.3,
                                prior=fixed.get("top"), **ids)
        for key in em.AMD_RATIOS:
            assert amd["all_pairs"][mode][key] == full[key]
            assert amd["top4"][mode][key] == top[key]
            assert amd["all_pairs"]["chance"][key] == full["chance"][key]
        sums = top["groups"]["amd"]
        base = base or sums  # the prior comes first
        assert amd["top4"][mode]["intervals"] == bootstrap.amd_intervals(sums, counts)
        if mode != "prior":
            assert amd["top4"][mode]["minus_prior"] == bootstrap.amd_intervals(sums, counts,
                                                                               base)
        lo, hi = amd["all_pairs"][mode]["intervals"]["ex_map_d"]
        assert lo <= full["ex_map_d"] <= hi
        assert amd["per_attribute"][f"top4_{mode}_ap_d"] == [
            top["per_attribute"][nm]["ap_d"] for nm in ATTRIBUTE_NAMES]
        if mode in em.SCORE_MODES:
            assert auroc["all_pairs"]["confident"][mode]["pooled"] == full["auroc"]["auroc"]
            assert auroc["top4"]["confident"][mode]["pooled"] == top["auroc"]["auroc"]
            assert auroc["top4"]["confident"][mode]["macro"] == top["auroc"]["macro"]
    assert amd["all_pairs"]["num_pairs"] == 5 * 9
    labels_only = gm.amd_over_top_k(fq, fg, w, lq, lg, "prior", k=4, valid_gallery=vg,
                                    prior=prior.all_pairs, **ids)
    assert amd["top4"]["prior_labels"]["ex_map_d"] == labels_only["ex_map_d"]
    assert "prior_labels" not in amd["all_pairs"]
    every = gm.amd_over_top_k(fq, fg, w, lq, lg, "scores", k=4, valid_gallery=vg,
                              threshold=0.0, **ids)["auroc"]
    assert auroc["top4"]["all_attributes"]["scores"]["pooled"] == every["auroc"]
    # The constant baseline: every entry of attribute a scores its training agreement rate.
    agree = np.zeros((2, A))
    for a in range(A):
        entries = every["per_attribute"][ATTRIBUTE_NAMES[a]]
        agree[:, a] = entries["num_positive"], entries["num_negative"]
    assert auroc["top4"]["all_attributes"]["prior"]["pooled"] == pytest.approx(
        float(em.constant_auroc(agree[0], agree[1], prior.agreement)))
    assert every["num_positive"] + every["num_negative"] == 5 * 4 * A - A * int(
        (~vg[np.asarray(explain.explain_rankings(fq, fg, w, k=4).indices)]).sum())
    assert all(len(v) == A for v in auroc["per_attribute"].values())


def test_progress_log_reports_rate_and_eta():
    now = [100.0]
    lines = []
    log = progress.ProgressLog("AMD over all pairs (paper)", interval=30.0, clock=lambda: now[0],
                         log=lambda fmt, *args: lines.append(fmt % args))
    now[0] = 110.0
    log(32, 128)  # within the interval: silent
    assert lines == []
    now[0] = 140.0
    log(64, 128)  # 64 queries in 40 s: 1.6 queries/s, 64 left: 40 s
    assert lines == ["AMD over all pairs (paper): 64/128 queries (50.0%), 1.6 queries/s, "
                     "ETA 0:00:40, elapsed 0:00:40"]
    now[0] = 150.0
    log(96, 128)  # 10 s after the last line: silent
    now[0] = 3700.0
    log(128, 128)  # the end is always logged
    assert len(lines) == 2
    assert lines[1] == ("AMD over all pairs (paper): 128/128 queries (100.0%), 0.0 queries/s, "
                        "ETA 0:00:00, elapsed 1:00:00")
    instant = []
    progress.ProgressLog("x", clock=lambda: 5.0, log=lambda fmt, *a: instant.append(fmt % a))(3, 3)
    assert instant == ["x: 3/3 queries (100.0%), -- queries/s, ETA 0:00:00, elapsed 0:00:00"]
    with pytest.raises(ValueError, match="interval must be >= 0"):
        progress.ProgressLog("x", interval=-1)


def test_label_metrics_use_the_protocol_top_k_and_log_progress(monkeypatch, caplog):
    import logging

    rng = np.random.default_rng(4)
    fq = rng.normal(size=(5, 16)).astype(np.float32)
    fg = rng.normal(size=(11, 16)).astype(np.float32)
    w = (3 * rng.normal(size=(16, A))).astype(np.float32)
    lq, lg = rng.integers(0, 2, (5, A)), rng.integers(0, 2, (11, A))
    qp, qc = np.array([1, 2, 3, 4, 5]), np.array([1, 1, 1, 2, 2])
    gp = np.array([1, 1, 2, -1, 3, 0, 4, 5, 5, 6, 7])
    gc = np.array([1, 2, 1, 1, 1, 1, 2, 2, 1, 1, 1])
    fg[0] = fq[0] + 0.01 * rng.normal(size=16)  # query 0's own camera: removed
    fg[2] = fq[1] + 0.01 * rng.normal(size=16)  # query 1's own camera: removed
    fg[3] = fq[2] + 0.01 * rng.normal(size=16)  # junk: removed
    vg = gp > 0
    ids = dict(query_pids=qp, query_cams=qc, gallery_pids=gp, gallery_cams=gc)
    calls = {"streamed": [], "top_k": []}
    streamed, top_k = gm.streamed_amd_over_gallery, gm.amd_over_top_k

    def count_streamed(*args, **kwargs):
        calls["streamed"].append(args[5])
        return streamed(*args, **kwargs)

    def count_top_k(*args, **kwargs):
        calls["top_k"].append(args[5])
        return top_k(*args, **kwargs)

    monkeypatch.setattr(gm, "streamed_amd_over_gallery", count_streamed)
    monkeypatch.setattr(gm, "amd_over_top_k", count_top_k)
    with caplog.at_level(logging.INFO):
        auroc, amd = ee.label_metrics(fq, fg, w, lq, lg, None, vg, k=4, threshold=0.3,
                                      prior=_prior(rng), bootstrap_samples=50, **ids)
    # One all-pairs pass and one ranking per mode: the t = 0 AUROC comes with the scores pass.
    # (and the label-only prior on the top k)
    assert calls == {"streamed": list(MODES), "top_k": [*MODES, "prior"]}
    for mode in MODES:
        assert f"AMD over all pairs ({mode}): 5/5 queries (100.0%)" in caplog.text
        assert f"AMD over the top 4 ranks ({mode})" in caplog.text
    assert "ETA 0:00:00" in caplog.text

    # The top 4 under the protocol (float64 reference), not the plain top 4.
    d2 = np.square(fq[:, None, :].astype(np.float64) - fg[None]).sum(-1)
    removed = ((gp[None] == qp[:, None]) & (gc[None] == qc[:, None])) | (gp[None] == -1)
    top = np.argsort(np.where(removed, np.inf, d2), axis=1, kind="stable")[:, :4]
    plain = np.argsort(d2, axis=1, kind="stable")[:, :4]
    assert amd["top4"]["num_pairs"] == int(vg[top].sum()) != int(vg[plain].sum())
    for mode in MODES:
        if mode == "prior":
            continue
        ref = top_k(fq, fg, w, lq, lg, mode, k=4, valid_gallery=vg, threshold=0.3, **ids)
        for key in em.AMD_RATIOS:
            assert amd["top4"][mode][key] == ref[key]
    every_top = top_k(fq, fg, w, lq, lg, "scores", k=4, valid_gallery=vg, threshold=0.0, **ids)
    every_all = streamed(fq, fg, w, lq, lg, "scores", valid_gallery=vg, threshold=0.0)
    for scope, ref in (("top4", every_top["auroc"]), ("all_pairs", every_all["auroc"])):
        assert auroc[scope]["all_attributes"]["scores"]["pooled"] == ref["auroc"]
        for key in ("num_positive", "num_negative"):
            assert auroc[scope]["all_attributes"][key] == ref[key]
    assert auroc["all_pairs"]["all_attributes"]["scores"]["max_binning_error"] == every_all[
        "auroc"]["max_binning_error"]
    assert auroc["per_attribute"]["top4_all_attributes_scores"] == [
        every_top["auroc"]["per_attribute"][n]["auroc"] for n in ATTRIBUTE_NAMES]


# --------------------------------------------------------------------------------------------
# The whole run.


def _walk(prefix, value, out):
    if isinstance(value, dict):
        for k, v in value.items():
            _walk(f"{prefix}/{k}", v, out)
    else:
        out[prefix] = value
    return out


def test_evaluate_writes_json_and_markdown(run, dataset, checkpoints_dir):
    m = run.metrics
    assert set(m) == {"format", "attribute_names", "settings", "data", "prior",
                      "counterfactual", "auroc", "amd", "maps"}
    assert m["format"] == quality_table.FORMAT and m["attribute_names"] == list(ATTRIBUTE_NAMES)
    with open(run.json_path) as f:
        assert json.load(f) == m
    with open(run.markdown_path) as f:
        assert f.read() == run.table == quality_table.markdown_table(m)
    # This head was saved without a calibration: the disagreement reads the raw x, and the
    # table says so.
    assert m["settings"]["calibrated_disagreement"] is False
    assert "from the head's raw probabilities (the checkpoint stores no calibration)" in run.table
    if isinstance(m["maps"], dict) and "skipped" not in m["maps"]:
        assert "DeepLIFT maps through stage 2's output, from the mean map of" in run.table
    out_dir = os.path.dirname(run.json_path)
    assert sorted(os.listdir(out_dir)) == ["embeddings", "explanation_metrics.json",
                                           "explanation_metrics.md"]
    flat = _walk("", m, {})
    for path, value in flat.items():  # readable by reid_jax.explain.report
        assert value is None or isinstance(value, (int, float, str, list)), path
        if path.startswith("/maps/"):
            continue
        if path.startswith("/prior/attribute_order") or path == "/attribute_names":
            assert sorted(value) == sorted(ATTRIBUTE_NAMES), path
        elif isinstance(value, list) and "interval" in path or "/minus_prior/" in path:
            assert value is None or (len(value) == 2 and value[0] <= value[1]), path
        elif isinstance(value, list):  # per attribute
            assert len(value) == A and all(v is None or isinstance(v, (int, float))
                                           for v in value), path
    cf = m["counterfactual"]
    assert cf["num_counterfactuals"] == NUM_CF and m["data"]["synthetic"] is True
    assert sum(cf["per_attribute"]["counterfactuals"]) == NUM_CF
    assert sum(cf["per_attribute"]["pairs"]) == cf["num_pairs"] > NUM_CF
    for mode in MODES:
        assert 0 <= cf[mode]["top1"] <= cf[mode]["top3"] <= 1
        lo, hi = cf[mode]["intervals"]["top1"]
        assert lo <= cf[mode]["top1"] <= hi
        assert set(m["amd"]["all_pairs"][mode]) == {*em.AMD_RATIOS, "intervals"} | (
            set() if mode == "prior" else {"minus_prior"})
    assert 0 < cf["chance"]["top1"] < cf["chance"]["top3"] < 1
    assert m["prior"]["num_identities"] == DATA.num_train_ids
    assert m["prior"]["neighbours"] is not None and m["prior"]["k"] == K
    assert m["settings"]["bootstrap_samples"] == 1000
    table = run.table.splitlines()
    assert table[0].startswith("| metric | n | prior (fixed order) | chance | eq. 3.2 (paper)")
    maps_rows = quality_table.maps_table(m).rows
    assert sum(line.startswith("| ") for line in table) == 1 + 2 + 8 + 12 + 1 + len(maps_rows)
    assert ("| measurement | group | n | maps | centre | distance Grad-CAM | part occlusion | "
            "random |") in table


def test_evaluate_measures_the_maps(run):
    maps = run.metrics["maps"]
    assert maps["num_images"] == MAP_IMAGES and maps["num_counterfactual_pairs"] == MAP_IMAGES
    assert run.metrics["settings"]["map_images"] == MAP_IMAGES
    pg = maps["pointing_game"]
    assert pg["overall"]["cases"] == sum(g["cases"] for g in pg["groups"].values()) > 0
    assert set(pg["groups"]) <= {"headwear", "bags", "upper_body", "lower_body"}
    for method in ("evidence", "centre", "gradcam", "occlusion"):
        assert 0 <= pg["overall"][method]["rate"] <= 1
    assert 0 < pg["overall"]["chance"]["expected_rate"] < 1
    # The same cases scored against the part whose greying lowers z_a most.
    agreement = maps["occlusion_agreement"]
    assert agreement["overall"]["cases"] == pg["overall"]["cases"]
    assert agreement["skipped"] == pg["skipped"]
    for method in ("evidence", "centre", "gradcam"):
        assert 0 <= agreement["overall"][method]["rate"] <= 1
    assert "occlusion" not in agreement["overall"]
    # The cases the query labels confirm (the synthetic queries are all labelled).
    confirmed = pg["labelled_present"]["overall"]["cases"]
    assert confirmed == round(pg["overall"]["mean_labelled_present"] * pg["overall"]["cases"])
    assert confirmed <= pg["overall"]["cases"]
    # The cases of the attributes the head tells apart on the labelled test images.
    learned = pg["learned"]
    accuracy = learned["attribute_accuracy"]
    assert list(accuracy) == list(run.metrics["attribute_names"])
    assert learned["learned_attributes"] == [a for a, x in accuracy.items()
                                             if x is not None and x >= learned["min_accuracy"]]
    assert learned["overall"]["cases"] == sum(
        e["cases"] for a, e in pg["attributes"].items() if a in learned["learned_attributes"])
    loc = maps["counterfactual_localisation"]
    assert loc["overall_groups"] == ["headwear", "bags", "upper_body", "lower_body"]
    assert sum(g["cases"] for g in loc["groups"].values()) + loc["skipped"]["empty_region"] \
        == MAP_IMAGES
    for key in ("deletion_evidence", "deletion_contributions"):
        assert maps[key]["overall"]["cases"] > 0 and maps[key]["fraction"] == 0.1
    for key in ("query_top1", "counterfactual"):
        c = maps["completeness"][key]
        # DeepLIFT (the default) is exact to rounding, even on this random-init model whose
        # BNNeck maps the zero baseline near the origin, where the L2 normalisation is singular
        # and integrated gradients leave ~10 % (docs/attribute_maps.md, 'Where the maps fail').
        assert c["pairs"] == MAP_IMAGES and 0 <= c["mean"] <= c["max"] < 1e-3, c
    assert "| pointing game | overall |" in run.table
    assert "| agreement with part occlusion | overall |" in run.table


def test_evaluate_numbers_equal_the_library(run, dataset, checkpoints_dir):
    """The file's numbers recomputed from the cached embeddings with the library functions."""
    from reid_jax import checkpoints, embeddings

    m = run.metrics
    out_dir = os.path.dirname(run.json_path)
    fq, fg = _embeddings(out_dir)
    w = _weights(checkpoints_dir / "with_head")
    data, lq, vq, lg, vg = _labels(dataset)
    full = gm.streamed_amd_over_gallery(fq, fg, w, lq, lg, "complete", valid_query=vq,
                                        valid_gallery=vg)
    assert m["amd"]["all_pairs"]["complete"]["ex_map_d"] == full["ex_map_d"]
    assert m["amd"]["all_pairs"]["num_pairs"] == int(vq.sum() * vg.sum())
    top = gm.amd_over_top_k(fq, fg, w, lq, lg, "scores", k=K, valid_query=vq, valid_gallery=vg,
                            **_data_ids(data))
    assert m["amd"][f"top{K}"]["scores"]["ex_precision_s"] == top["ex_precision_s"]
    assert m["auroc"][f"top{K}"]["confident"]["scores"]["pooled"] == top["auroc"]["auroc"]
    # The prior: the training split's identity labels and its images' nearest neighbours.
    attrs = load_market_attributes(os.path.join(dataset, "market_attribute.mat"))
    identities = attrs.labels("train")
    assert m["prior"]["all_pairs"] == pytest.approx(
        baselines.difference_rates(identities).tolist())
    prior_top = np.asarray(m["prior"]["neighbours"])
    top_prior = gm.amd_over_top_k(fq, fg, w, lq, lg, "prior", k=K, valid_query=vq,
                                  valid_gallery=vg, prior=prior_top, **_data_ids(data))
    assert m["amd"][f"top{K}"]["prior"]["ex_map_d"] == top_prior["ex_map_d"]

    # The counterfactual part: same pairs, same images, same embeddings.
    files = [os.path.basename(p) for p in data.gallery.paths]
    pairs = counterfactuals.ranked_pairs(fq, fg, data.query.pids, data.query.cameras,
                                         data.gallery.pids, data.gallery.cameras, K)
    made = counterfactuals.make_counterfactuals(dataset, files, np.unique(pairs.gallery), NUM_CF)
    model, _ = checkpoints.restore_model(checkpoints_dir / "with_head", None)
    kw = dict(height=CONFIG["data"]["height"], width=CONFIG["data"]["width"],
              batch_size=CONFIG["data"]["eval_batch_size"],
              loader_config=embeddings.eval_loader_config(CONFIG))
    f_cf = embeddings.embed_images(model, [cf.jpeg for cf in made.accepted], **kw)
    ref = counterfactuals.counterfactual_metrics(fq, fg, f_cf, w, made.accepted, pairs, lq, vq,
                                                 prior=prior_top)
    for key in (*MODES, "chance", "subsets", "num_pairs", "num_away_pairs"):
        assert m["counterfactual"][key] == ref[key], key
    for key, values in ref["per_attribute"].items():
        assert m["counterfactual"]["per_attribute"][key] == values, key

    # A re-render without a change embeds exactly as the dataset file it replaces.
    g = int(made.accepted[0].gallery_index)
    same = synthetic.render_counterfactual(dataset, files[g], None, jpeg=False)
    quality = synthetic.load_meta(dataset)["config"]["jpeg_quality"]
    f_same = embeddings.embed_images(model, [synthetic.encode_jpeg(same, quality)], **kw)
    np.testing.assert_allclose(f_same[0], fg[g], atol=1e-6)


def test_real_market_root_skips_counterfactuals(run, dataset, checkpoints_dir, tmp_path):
    real = tmp_path / "market"
    shutil.copytree(dataset, real, ignore=shutil.ignore_patterns(synthetic.META_FILE))
    out = ee.measure(checkpoint=checkpoints_dir / "with_head", data_root=real,
                      output_dir=tmp_path / "out", k=K, num_counterfactuals=NUM_CF)
    cf = out.metrics["counterfactual"]
    assert set(cf) == {"skipped"} and "not a synthetic data root" in cf["skipped"]
    assert out.metrics["data"]["synthetic"] is False
    # The label metrics are those of the synthetic run: same images, same model.
    assert out.metrics["amd"] == run.metrics["amd"]
    assert out.metrics["auroc"] == run.metrics["auroc"]
    assert "counterfactual hit rate | — | skipped" in out.table
    assert "Counterfactuals skipped:" in out.table
    assert "not a synthetic data root with part masks" in out.metrics["maps"]["skipped"]
    assert "Attribute maps skipped:" in out.table


def test_errors(dataset, checkpoints_dir, tmp_path):
    ok = dict(checkpoint=checkpoints_dir / "with_head", data_root=dataset,
              output_dir=tmp_path / "o", num_counterfactuals=0)
    with pytest.raises(ValueError, match="no attribute head.*Run tools/train_attributes.py"):
        ee.measure(**{**ok, "checkpoint": checkpoints_dir / "no_head"})
    with pytest.raises(FileNotFoundError, match="data root .*nowhere does not exist"):
        ee.measure(**{**ok, "data_root": tmp_path / "nowhere"})
    with pytest.raises(ValueError, match="no data root"):
        ee.measure(**{**ok, "data_root": None})
    with pytest.raises(FileNotFoundError, match="no attribute labels.*--attributes_file"):
        ee.measure(**ok, attributes_file=tmp_path / "missing.mat")
    with pytest.raises(ValueError, match=r"threshold must lie in \[0, 0.5\)"):
        ee.measure(**ok, threshold=0.5)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        ee.measure(**ok, k=0)
    with pytest.raises(ValueError, match="exceeds the"):
        ee.measure(**ok, k=10**6)
    with pytest.raises(ValueError, match="num_counterfactuals must be >= 0"):
        ee.measure(**{**ok, "num_counterfactuals": -1})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no query images"):
        ee.measure(**{**ok, "data_root": tmp_path / "empty"})
    assert not os.path.exists(tmp_path / "o" / ee.JSON_NAME)  # nothing written on failure


def test_what_would_fail_at_the_end_is_refused_before_any_work(dataset, checkpoints_dir,
                                                               tmp_path, monkeypatch):
    """An output folder through a file and a broken part mask fail before the embeddings
    (minutes of work on a full split), not when the results are written or the maps read."""
    from reid_jax import embeddings as emb_lib

    def no_work(*args, **kwargs):
        raise AssertionError("the embeddings were computed before the inputs were checked")

    monkeypatch.setattr(emb_lib, "split_embeddings", no_work)
    a_file = tmp_path / "afile"
    a_file.write_text("mine")
    ok = dict(checkpoint=checkpoints_dir / "with_head", num_counterfactuals=0)
    with pytest.raises(NotADirectoryError, match=f"output folder {a_file} is a file"):
        ee.measure(**ok, data_root=dataset, output_dir=a_file)
    assert a_file.read_text() == "mine"
    broken = shutil.copytree(dataset, tmp_path / "broken")
    query = load_market1501(broken).query.paths[-1]
    mask = synthetic.mask_path(query)
    open(mask, "r+b").truncate(50)
    with pytest.raises(ValueError, match=f"{mask} cannot be read as the part mask of {query}"):
        ee.measure(**ok, data_root=broken, output_dir=tmp_path / "o")
    assert not os.path.exists(tmp_path / "o")
    # Without the maps section the masks are not read.
    with pytest.raises(AssertionError, match="the embeddings were computed"):
        ee.measure(**ok, data_root=broken, output_dir=tmp_path / "o", measure_maps=False)


# --------------------------------------------------------------------------------------------
# The command line.


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "evaluate_explanations.py"), *args],
        capture_output=True, text=True, timeout=900, cwd=REPO)


def test_cli(dataset, checkpoints_dir, tmp_path):
    out = tmp_path / "cli"
    res = _tool(f"--checkpoint={checkpoints_dir / 'with_head'}", f"--data_root={dataset}",
                f"--output_dir={out}", "--num_counterfactuals=12", "--k=2", "--threshold=0.3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| counterfactual hit rate, top-1 |" in res.stdout
    assert f"metrics: {out / ee.JSON_NAME}" in res.stdout
    with open(out / ee.JSON_NAME) as f:
        m = json.load(f)
    assert m["settings"]["k"] == 2 and m["settings"]["threshold"] == 0.3
    assert m["counterfactual"]["num_counterfactuals"] == 12

    res = _tool(f"--checkpoint={checkpoints_dir / 'no_head'}", f"--data_root={dataset}",
                f"--output_dir={tmp_path / 'o2'}", "--num_counterfactuals=0")
    assert res.returncode != 0
    assert "no attribute head" in res.stderr and "tools/train_attributes.py" in res.stderr
    assert "Traceback" not in res.stderr
