"""Tests of the baselines (reid_jax.explain.baselines), the bootstrap intervals
(reid_jax.explain.bootstrap) and the seed spread (reid_jax.explain.spread, tools/seed_spread.py)
against plain float64 references."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
from conftest import REPO, run_tool

from reid_jax.data.attributes import ATTRIBUTE_NAMES
from reid_jax.explain import baselines, bootstrap, spread
from reid_jax.explain import metrics as em
from reid_jax.explain import table as quality_table

A = len(ATTRIBUTE_NAMES)

# --------------------------------------------------------------------------------------------
# The prior.


def test_difference_rates_count_pairs_of_distinct_identities():
    labels = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 0], [1, 0, 0]])
    pairs = list(itertools.combinations(range(4), 2))
    want = np.mean([labels[i] != labels[j] for i, j in pairs], axis=0)
    np.testing.assert_allclose(baselines.difference_rates(labels), want)
    # 2 p (1 - p) n / (n - 1): here p = 3/4, 1/2, 1/4.
    p = labels.mean(0)
    np.testing.assert_allclose(baselines.difference_rates(labels), 2 * p * (1 - p) * 4 / 3)
    with pytest.raises(ValueError, match="at least 2 identities"):
        baselines.difference_rates(labels[:1])
    with pytest.raises(ValueError, match=r"identity_labels must have shape \[n, A\]"):
        baselines.difference_rates(labels[0])


def test_neighbour_difference_rates_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    pids = np.repeat(np.arange(1, 7), 4)
    identity = rng.integers(0, 2, (6, 5))
    labels = identity[pids - 1]
    f = rng.normal(size=(24, 8)).astype(np.float32)
    f[5] = f[0]  # an exact tie with another identity's image: the lower index wins
    k = 3
    got = baselines.neighbour_difference_rates(f, pids, labels, k, chunk=7)
    d = ((f[:, None].astype(np.float64) - f[None]) ** 2).sum(-1)
    rows = []
    for i in range(24):
        others = [j for j in np.argsort(d[i], kind="stable") if pids[j] != pids[i]][:k]
        rows += [labels[i] != labels[j] for j in others]
    np.testing.assert_allclose(got, np.mean(rows, axis=0))
    with pytest.raises(ValueError, match="at least 2 identities"):
        baselines.neighbour_difference_rates(f, np.ones(24, int), labels, k)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        baselines.neighbour_difference_rates(f, pids, labels, 0)
    with pytest.raises(ValueError, match="must share n"):
        baselines.neighbour_difference_rates(f[:-1], pids, labels, k)


def test_training_prior_and_its_json():
    rng = np.random.default_rng(1)
    identity = rng.integers(0, 2, (5, A))
    prior = baselines.training_prior(identity)
    assert prior.neighbours is None and prior.num_images == 0
    np.testing.assert_array_equal(prior.ranked, prior.all_pairs)
    np.testing.assert_allclose(prior.agreement, 1 - prior.all_pairs)
    pids = np.repeat(np.arange(1, 6), 2)
    full = baselines.training_prior(identity, features=rng.normal(size=(10, 4)), pids=pids,
                                    image_labels=identity[pids - 1], k=2)
    assert full.num_images == 10 and full.k == 2
    np.testing.assert_array_equal(full.ranked, full.neighbours)
    j = json.loads(json.dumps(full.json(ATTRIBUTE_NAMES)))
    assert j["all_pairs"] == pytest.approx(full.all_pairs.tolist())
    order = j["attribute_order_neighbours"]
    assert sorted(order) == sorted(ATTRIBUTE_NAMES)
    assert full.neighbours[ATTRIBUTE_NAMES.index(order[0])] == full.neighbours.max()
    with pytest.raises(ValueError, match="features need pids and image_labels"):
        baselines.training_prior(identity, features=np.zeros((10, 4)))


# --------------------------------------------------------------------------------------------
# AUROC of a constant score, and from histograms.


def _pairwise_auroc(s, pos):
    sp, sn = s[pos], s[~pos]
    return ((sp[:, None] > sn[None]).sum() + 0.5 * (sp[:, None] == sn[None]).sum()) / (
        sp.size * sn.size)


def test_constant_auroc_equals_the_pairwise_auroc_of_the_constant_score():
    rng = np.random.default_rng(2)
    a = 6
    constants = np.array([0.9, 0.2, 0.5, 0.9, 0.7, 0.1])  # two attributes share a value
    pos = rng.integers(0, 20, a)
    neg = rng.integers(0, 20, a)
    scores = np.concatenate([np.full(pos[j] + neg[j], constants[j]) for j in range(a)])
    positive = np.concatenate([[True] * pos[j] + [False] * neg[j] for j in range(a)])
    assert em.constant_auroc(pos, neg, constants) == pytest.approx(
        _pairwise_auroc(scores, positive))
    # Vectorised over leading axes; an empty class is NaN.
    both = em.constant_auroc(np.stack([pos, pos * 0]), np.stack([neg, neg]), constants)
    assert both[0] == pytest.approx(_pairwise_auroc(scores, positive)) and np.isnan(both[1])


def test_histogram_auroc_and_macro():
    rng = np.random.default_rng(3)
    s = rng.integers(0, 8, 200)  # few values: ties, one bin each
    pos = rng.random(200) < 0.4
    hp, hn = np.bincount(s[pos], minlength=8), np.bincount(s[~pos], minlength=8)
    assert em.histogram_auroc(hp, hn) == pytest.approx(_pairwise_auroc(s, pos))
    assert em.macro_auroc([0.5, None, 0.7]) == pytest.approx(0.6)
    assert em.macro_auroc([None]) is None


# --------------------------------------------------------------------------------------------
# Bootstrap.


def test_resample_counts_are_seeded_multinomials():
    c = bootstrap.resample_counts(7, 500, seed=3)
    assert c.shape == (500, 7) and (c.sum(1) == 7).all()
    np.testing.assert_array_equal(c, bootstrap.resample_counts(7, 500, seed=3))
    assert not np.array_equal(c, bootstrap.resample_counts(7, 500, seed=4))
    assert abs(c.mean() - 1.0) < 0.05
    with pytest.raises(ValueError, match="needs >= 1 group and sample"):
        bootstrap.resample_counts(0, 10)


def test_ratio_interval_is_the_bootstrap_of_whole_groups():
    rng = np.random.default_rng(4)
    groups = 40
    sizes = rng.integers(1, 20, groups)
    rows = [rng.random(n) < p for n, p in zip(sizes, rng.random(groups), strict=True)]
    num = np.array([r.sum() for r in rows], float)
    den = sizes.astype(float)
    counts = bootstrap.resample_counts(groups, 2000, seed=0)
    # Reference: resample group indices and pool their rows.
    want = []
    for c in counts:
        picked = np.repeat(np.arange(groups), c.astype(int))
        want.append(np.concatenate([rows[i] for i in picked]).mean())
    lo, hi = bootstrap.ratio_interval(num, den, counts)
    assert [lo, hi] == pytest.approx(list(np.percentile(want, [2.5, 97.5])))
    assert lo < num.sum() / den.sum() < hi
    # More groups of the same kind: a narrower interval.
    wide = hi - lo
    num4, den4 = np.tile(num, 4), np.tile(den, 4)
    lo4, hi4 = bootstrap.ratio_interval(num4, den4, bootstrap.resample_counts(160, 2000))
    assert hi4 - lo4 < 0.7 * wide
    # A difference of two ratios on the same replicates; identical inputs give [0, 0].
    assert bootstrap.difference_interval(num, den, num, den, counts) == [0.0, 0.0]
    with pytest.raises(ValueError, match="40 groups, the counts 160"):
        bootstrap.ratio_interval(num, den, bootstrap.resample_counts(160, 5))
    assert bootstrap.ratio_interval(np.zeros(3), np.zeros(3),
                                    bootstrap.resample_counts(3, 10)) is None


def test_grouped_means():
    sums, counts = bootstrap.grouped_means([1.0, 0.0, 0.5, 1.0], [2, 0, 2, 2], 3)
    np.testing.assert_allclose(sums, [0.0, 0.0, 2.5])
    np.testing.assert_allclose(counts, [1, 0, 3])


def test_auroc_intervals_from_per_group_histograms():
    rng = np.random.default_rng(5)
    groups, bins, a = 30, 16, 3
    pos = rng.integers(0, 6, (groups, a, bins))
    neg = rng.integers(0, 6, (groups, a, bins))
    pos[:, :, bins // 2:] += 3  # positives score higher
    counts = bootstrap.resample_counts(groups, 1000, seed=1)
    pooled_pos, pooled_neg = pos.sum(1), neg.sum(1)
    point = float(em.histogram_auroc(pooled_pos.sum(0), pooled_neg.sum(0)))
    lo, hi = bootstrap.histogram_auroc_interval(pooled_pos, pooled_neg, counts, point)
    reps = em.histogram_auroc(counts @ pooled_pos, counts @ pooled_neg)
    assert [lo, hi] == pytest.approx(list(np.percentile(reps, [2.5, 97.5])))
    assert lo < point < hi
    # The interval moves with the point estimate given (the binning shift).
    shifted = bootstrap.histogram_auroc_interval(pooled_pos, pooled_neg, counts, point + 0.01)
    assert shifted == pytest.approx([lo + 0.01, hi + 0.01])
    macro = float(np.mean(em.histogram_auroc(pos.sum(0), neg.sum(0))))
    mlo, mhi = bootstrap.macro_auroc_interval(pos, neg, counts, macro)
    assert mlo < macro < mhi
    c_lo, c_hi = bootstrap.constant_auroc_interval(pos.sum(-1), neg.sum(-1),
                                                   np.array([0.2, 0.5, 0.9]), counts)
    c_point = float(em.constant_auroc(pos.sum((0, 2)), neg.sum((0, 2)), [0.2, 0.5, 0.9]))
    assert c_lo <= c_point <= c_hi


def test_amd_intervals_use_the_accumulators_group_sums():
    rng = np.random.default_rng(6)
    p, a, groups = 200, 6, 20
    lq, lg = rng.integers(0, 2, (p, a)), rng.integers(0, 2, (p, a))
    g = rng.integers(0, groups, p)
    good = (lq != lg) + 0.3 * rng.random((p, a))  # a perfect-ish explanation
    bad = rng.random((p, a))
    sums = {}
    for name, sep in (("good", good), ("bad", bad)):
        acc = em.AmdAccumulator(a, num_groups=groups)
        acc.update(sep.astype(np.float32), lq, lg, groups=g)
        sums[name] = acc.group_sums()
    counts = bootstrap.resample_counts(groups, 500)
    iv = bootstrap.amd_intervals(sums["good"], counts)
    assert set(iv) == set(em.AMD_RATIOS)
    diff = bootstrap.amd_intervals(sums["good"], counts, sums["bad"])
    assert diff["ex_map_d"][0] > 0  # clearly better than a random order
    one = sums["good"]
    want = bootstrap.ratio_interval(one["ap_d"], one["num_pairs_d"], counts)
    assert iv["ex_map_d"] == want


# --------------------------------------------------------------------------------------------
# Seed spread.


def _metrics(value: float) -> dict:
    """A minimal explanation_metrics.json of the table's layout, every value ``value``."""
    iv = [value - 0.01, value + 0.01]
    amd_mode = {**{key: value for key in em.AMD_RATIOS},
                "intervals": {key: iv for key in em.AMD_RATIOS}}
    auroc_mode = {"pooled": value, "pooled_interval": iv, "macro": value, "macro_interval": iv}
    auroc = {"num_positive": 3, "num_negative": 4, "scores": auroc_mode,
             "disagreement": auroc_mode, "prior": {"pooled": value, "macro": 0.5}}
    amd = {"num_pairs": 9, "num_pairs_d": 8, "num_pairs_s": 7, "num_pairs_s_amd": 9,
           **{m: amd_mode for m in em.MODES}, "chance": {key: 0.25 for key in em.AMD_RATIOS}}
    return {"format": quality_table.FORMAT, "settings": {"k": 2, "threshold": 0.4},
            "counterfactual": {"skipped": "real data"},
            "auroc": {s: {"confident": auroc, "all_attributes": auroc}
                      for s in ("all_pairs", "top2")},
            "amd": {"all_pairs": amd, "top2": amd}}


def test_spread_is_mean_and_range_over_runs():
    runs = [_metrics(0.2), _metrics(0.5), _metrics(0.35)]
    evals = [{"reid": {"mAP": 0.6, "rank1": 0.7, "mINP": 0.3}},
             {"reid": {"mAP": 0.8, "rank1": 0.9, "mINP": 0.5}},
             {"reid": {"mAP": 0.7, "rank1": 0.8, "mINP": 0.4}}]
    result = spread.spread(runs, evals, seeds=[0, 1, 2])
    json.dumps(result)
    table = quality_table.summary_table(runs[0])
    assert [r["metric"] for r in result["rows"]] == [r.metric for r in table.rows]
    row = next(r for r in result["rows"] if r["metric"] == "AMD Ex-mAP_d, top-2")
    paper = row["cells"]["paper"]
    assert paper["mean"] == pytest.approx(0.35) and paper["min"] == 0.2 and paper["max"] == 0.5
    assert paper["runs"] == [0.2, 0.5, 0.35] and row["cells"]["chance"]["min"] == 0.25
    assert row["cells"]["projection"]["max"] == 0.5
    assert result["reid"]["mAP"] == {"mean": pytest.approx(0.7), "min": 0.6, "max": 0.8,
                                     "runs": [0.6, 0.8, 0.7]}
    text = spread.markdown(result)
    assert "| AMD Ex-mAP_d, top-2 | 35.0 (20.0–50.0) | 25.0 (25.0–25.0) |" in text
    assert "| re-id mAP | 70.0 (60.0–80.0) |" in text and "seeds 0, 1, 2" in text
    with pytest.raises(ValueError, match="no runs"):
        spread.spread([])
    other = _metrics(0.1)
    other["format"] = "reid_jax.explanation_metrics/1"
    with pytest.raises(ValueError, match="run 1: format"):
        spread.spread([runs[0], other])
    changed = _metrics(0.1)
    changed["settings"]["k"] = 3
    changed["auroc"]["top3"] = changed["auroc"].pop("top2")
    changed["amd"]["top3"] = changed["amd"].pop("top2")
    with pytest.raises(ValueError, match="run 1 has other rows"):
        spread.spread([runs[0], changed])


def test_seed_spread_tool_summarises_runs(tmp_path):
    """tools/seed_spread.py --aggregate_only over two run folders in the demo's layout."""
    work = tmp_path / "spread"
    for seed, value in ((3, 0.25), (5, 0.75)):
        run = work / f"seed_{seed}"
        (run / "explain").mkdir(parents=True)
        (run / "explain" / "explanation_metrics.json").write_text(json.dumps(_metrics(value)))
        (run / "evaluation.json").write_text(json.dumps({"reid": {"mAP": value}}))
    proc = run_tool("seed_spread.py", "--seeds=3,5", f"--workdir={work}", "--aggregate_only")
    assert "| AMD Ex-mAP_d, top-2 | 50.0 (25.0–75.0) |" in proc.stdout
    assert "| re-id mAP | 50.0 (25.0–75.0) |" in proc.stdout
    with open(work / "seed_spread.json") as f:
        result = json.load(f)
    assert result["seeds"] == [3, 5] and result["reid"]["mAP"]["runs"] == [0.25, 0.75]
    with open(work / "seed_spread.md") as f:
        assert f.read() == spread.markdown(result)
    missing = run_tool("seed_spread.py", "--seeds=3,4", f"--workdir={work}", "--aggregate_only",
                       expect_ok=False)
    assert missing.returncode != 0 and "seed_4/explain/explanation_metrics.json is missing" in (
        missing.stderr)
    bad = run_tool("seed_spread.py", "--seeds=3,3", f"--workdir={work}", "--aggregate_only",
                   expect_ok=False)
    assert bad.returncode != 0 and "--seeds must be distinct integers" in bad.stderr


@pytest.mark.skipif(not os.environ.get("REID_JAX_LONG_TESTS"),
                    reason="two toy demo runs, minutes of CPU: set REID_JAX_LONG_TESTS=1")
def test_seed_spread_tool_at_toy_size(tmp_path):
    """tools/seed_spread.py end to end: two demo runs of the tiny config, then the spread."""
    work = tmp_path / "spread"
    proc = run_tool(
        "seed_spread.py", "--seeds=0,1", f"--workdir={work}",
        f"--config={REPO / 'configs' / 'agw_tiny.py'}", "--num_train_ids=4",
        "--num_test_ids=3", "--head_epochs=2", "--train_override=--config.num_epochs=1",
        "--train_override=--config.explain.num_counterfactuals=6",
        "--train_override=--config.explain.bootstrap_samples=20",
        "--train_override=--config.explain.k=2", timeout=3600)
    assert "| metric |" in proc.stdout and "seeds 0, 1" in proc.stdout
    with open(work / "seed_spread.json") as f:
        result = json.load(f)
    assert result["seeds"] == [0, 1] and result["num_runs"] == 2
    runs, evaluations = [], []
    for seed in (0, 1):
        with open(work / f"seed_{seed}" / "explain" / "explanation_metrics.json") as f:
            runs.append(json.load(f))
        with open(work / f"seed_{seed}" / "evaluation.json") as f:
            evaluations.append(json.load(f))
        with open(work / f"seed_{seed}" / "data" / "synthetic_meta.json") as f:
            assert json.load(f)["config"]["seed"] == seed
        with open(work / f"seed_{seed}" / "train" / "checkpoints" / "attribute_metrics.json"):
            pass
    assert runs[0]["amd"]["all_pairs"]["paper"] != runs[1]["amd"]["all_pairs"]["paper"]
    assert result == json.loads(json.dumps(spread.spread(runs, evaluations, [0, 1])))
