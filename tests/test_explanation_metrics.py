"""Tests of reid_jax.explain.metrics against slow float64 python references.

Tie-aware quantities are checked against brute force: the plain metric averaged over every
ordering of the attributes that is consistent with the scores (all tie-breaks equally likely).
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from reid_jax import retrieval
from reid_jax.explain import gallery_metrics as gm
from reid_jax.explain import metrics as em

# --------------------------------------------------------------------------------------------
# Slow references.


def _plain_pair(order: np.ndarray, rel: np.ndarray) -> tuple[float, float, np.ndarray,
                                                               np.ndarray]:
    """Plain precision@|rel|, AP, per-item top-|rel| membership and precision at its rank, for
    one ordering (``order`` lists item indices, best first)."""
    k = int(rel.sum())
    ranked = rel[order]
    hits = np.cumsum(ranked)
    prec_at = hits / np.arange(1, len(order) + 1)
    in_top = np.zeros(len(order))
    in_top[order[:k]] = 1.0
    rank_prec = np.zeros(len(order))
    rank_prec[order] = prec_at
    return ranked[:k].sum() / k, float(np.sum(prec_at * ranked) / k), in_top, rank_prec


def _orderings(sep: np.ndarray, descending: bool):
    """All orderings consistent with ``sep`` (ties in every order), or just the sorted one."""
    key = -sep if descending else sep
    for perm in itertools.permutations(range(len(sep))):
        if np.all(np.diff(key[list(perm)]) >= 0):
            yield np.asarray(perm)


def reference_amd(sep, lq, lg, valid=None, *, brute_force_ties: bool):
    """AMD's explain_eval, pair by pair in float64 python (ties: exact expectation by
    enumeration when ``brute_force_ties``, else one sorted order — for tie-free data)."""
    sep = np.asarray(sep, np.float64)
    p, a = sep.shape
    valid = np.ones(p, bool) if valid is None else valid
    out = {"prec_d": [], "ap_d": [], "prec_s": [], "ap_s": [], "prec_s_amd": [], "ap_s_amd": []}
    per = {key: np.zeros(a) for key in ("cnt_d", "top_d", "rp_d", "cnt_s", "top_s", "rp_s")}
    for i in range(p):
        if not valid[i]:
            continue
        diff = lq[i] != lg[i]
        k = int(diff.sum())
        if k == 0:  # AMD's rule: over-shared attributes (share of the positive part > 2 / A)
            pos = np.maximum(sep[i], 0.0)
            over = int(np.sum(pos > 2.0 / a * pos.sum())) if pos.sum() > 0 else 0
            out["prec_s_amd"].append(1.0 - over / a)
            out["ap_s_amd"].append(1.0 - over / a)
        for tag, rel, descending, use in (("d", diff, True, k > 0),
                                          ("s", ~diff, False, 0 < k < a)):
            if not use:
                continue
            if brute_force_ties:
                orders = list(_orderings(sep[i], descending))
            else:
                orders = [np.argsort(-sep[i] if descending else sep[i], kind="stable")]
            res = [_plain_pair(o, rel) for o in orders]
            out[f"prec_{tag}"].append(np.mean([r[0] for r in res]))
            out[f"ap_{tag}"].append(np.mean([r[1] for r in res]))
            if tag == "s":
                out["prec_s_amd"].append(out["prec_s"][-1])
                out["ap_s_amd"].append(out["ap_s"][-1])
            per[f"cnt_{tag}"] += rel
            per[f"top_{tag}"] += rel * np.mean([r[2] for r in res], axis=0)
            per[f"rp_{tag}"] += rel * np.mean([r[3] for r in res], axis=0)
    mean = lambda v: float(np.mean(v)) if v else None
    return {
        "ex_precision_d": mean(out["prec_d"]), "ex_map_d": mean(out["ap_d"]),
        "ex_precision_s": mean(out["prec_s"]), "ex_map_s": mean(out["ap_s"]),
        "ex_precision_s_amd": mean(out["prec_s_amd"]), "ex_map_s_amd": mean(out["ap_s_amd"]),
        "num_pairs_d": len(out["prec_d"]), "num_pairs_s": len(out["prec_s"]),
        "num_pairs_s_amd": len(out["prec_s_amd"]),
        **per,
    }


def _assert_matches(got, ref, names, atol=1e-5):
    assert got["num_pairs_s_amd"] == ref["num_pairs_s_amd"]
    for key in em.AMD_RATIOS:
        if ref[key] is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(ref[key], abs=atol), key
    assert got["num_pairs_d"] == ref["num_pairs_d"]
    assert got["num_pairs_s"] == ref["num_pairs_s"]
    for j, name in enumerate(names):
        entry = got["per_attribute"][name]
        for tag in ("d", "s"):
            cnt = ref[f"cnt_{tag}"][j]
            assert entry[f"count_{tag}"] == cnt
            if cnt == 0:
                assert entry[f"precision_{tag}"] is None and entry[f"ap_{tag}"] is None
            else:
                assert entry[f"precision_{tag}"] == pytest.approx(ref[f"top_{tag}"][j] / cnt,
                                                                  abs=atol)
                assert entry[f"ap_{tag}"] == pytest.approx(ref[f"rp_{tag}"][j] / cnt, abs=atol)


def _labels(rng, p, a, prob=0.4):
    return (rng.random((p, a)) < prob).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# AMD metrics.


def test_amd_hand_case():
    # D = {0, 2}; ranking 0 > 1 > 2 > 3: top-2 = {0, 1} -> 1/2; AP = (1/1 + 2/3) / 2.
    sep = np.array([[3.0, 2.0, 1.0, 0.0]], np.float32)
    lq = np.array([[1, 0, 1, 0]])
    lg = np.array([[0, 0, 0, 0]])
    got = em.amd_metrics(sep, lq, lg, names=list("abcd"))
    assert got["ex_precision_d"] == pytest.approx(0.5)
    assert got["ex_map_d"] == pytest.approx((1.0 + 2.0 / 3.0) / 2.0)
    # S = {1, 3}, ascending 3 < 2 < 1 < 0: bottom-2 = {3, 2} -> 1/2; AP = (1/1 + 2/3) / 2.
    assert got["ex_precision_s"] == pytest.approx(0.5)
    assert got["ex_map_s"] == pytest.approx((1.0 + 2.0 / 3.0) / 2.0)
    per = got["per_attribute"]
    assert per["a"] == {"count_d": 1, "precision_d": 1.0, "ap_d": 1.0,
                        "count_s": 0, "precision_s": None, "ap_s": None}
    assert per["c"]["precision_d"] == 0.0 and per["c"]["ap_d"] == pytest.approx(2.0 / 3.0)
    assert per["d"]["precision_s"] == 1.0 and per["b"]["precision_s"] == 0.0
    assert got["differing_histogram"] == [0, 0, 1, 0, 0]
    json.dumps(got)  # JSON-ready


def test_amds_rule_for_pairs_whose_labels_all_agree():
    # A = 4, 2/A = 0.5: shares (0.6, 0.2, 0.2, 0) -> 1 over-shared -> 3/4; a negative entry
    # has no share; no positive part -> none over-shared -> 1; equal shares -> none.
    sep = np.array([[3.0, 1.0, 1.0, 0.0],
                    [-5.0, 2.0, 2.0, 0.0],
                    [-1.0, -2.0, 0.0, 0.0],
                    [1.0, 1.0, 1.0, 1.0],
                    [3.0, 2.0, 1.0, 0.0]], np.float32)
    lab = np.zeros((5, 4), np.uint8)
    lg = lab.copy()
    lg[4] = [1, 0, 1, 0]  # the hand case: S = {1, 3}
    got = em.amd_metrics(sep, lab, lg)
    np.testing.assert_array_equal(np.asarray(em.over_shared(sep[:4])),
                                  [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert got["num_pairs_s"] == 1 and got["num_pairs_s_amd"] == 5
    want = (0.75 + 1 + 1 + 1 + 0.5) / 5
    assert got["ex_precision_s_amd"] == pytest.approx(want)
    assert got["ex_map_s_amd"] == pytest.approx((0.75 + 3 + (1.0 + 2.0 / 3.0) / 2.0) / 5)
    # An all-tied ranking has no over-shared attribute: chance counts those pairs as 1.
    tied = em.amd_metrics(np.zeros((5, 4), np.float32), lab, lg)
    assert tied["ex_precision_s_amd"] == pytest.approx(tied["chance"]["ex_precision_s_amd"])
    assert tied["ex_map_s_amd"] == pytest.approx(tied["chance"]["ex_map_s_amd"])


def test_group_sums_add_up_and_give_every_metric():
    rng = np.random.default_rng(5)
    p, a, groups = 90, 6, 7
    sep = rng.normal(size=(p, a)).astype(np.float32)
    lq, lg = _labels(rng, p, a), _labels(rng, p, a)
    lg[:10] = lq[:10]
    g = rng.integers(0, groups, p)
    acc = em.AmdAccumulator(a, num_groups=groups, block=16)
    for start in range(0, p, 40):
        rows = slice(start, start + 40)
        acc.update(sep[rows], lq[rows], lg[rows], groups=g[rows])
    whole = acc.result()
    sums = acc.group_sums()
    assert set(sums) == set(em.GROUP_KEYS) and all(v.shape == (groups,) for v in sums.values())
    for metric, (num, den) in em.AMD_RATIOS.items():
        assert sums[num].sum() / sums[den].sum() == pytest.approx(whole[metric], abs=1e-6)
    # The sums of one group are that group's pairs alone.
    one = em.amd_metrics(sep[g == 3], lq[g == 3], lg[g == 3])
    assert sums["ap_d"][3] / sums["num_pairs_d"][3] == pytest.approx(one["ex_map_d"], abs=1e-6)
    with pytest.raises(ValueError, match=r"groups \[P\] are required"):
        acc.update(sep, lq, lg)
    with pytest.raises(ValueError, match=r"groups must lie in \[0, 7\)"):
        acc.update(sep, lq, lg, groups=g + 1)
    with pytest.raises(ValueError, match="keeps none"):
        em.AmdAccumulator(a).update(sep, lq, lg, groups=g)


def test_amd_perfect_and_reversed_explanations():
    rng = np.random.default_rng(0)
    lq, lg = _labels(rng, 50, 8), _labels(rng, 50, 8)
    diff = (lq != lg).astype(np.float32)
    perfect = em.amd_metrics(diff + 0.01 * rng.random((50, 8)).astype(np.float32), lq, lg)
    for key in ("ex_precision_d", "ex_map_d", "ex_precision_s", "ex_map_s"):
        assert perfect[key] == pytest.approx(1.0)
    worst = em.amd_metrics(-diff, lq, lg)
    k = diff.sum(1)[diff.sum(1) > 0]
    # Reversed: the top k takes the 8 - k agreeing attributes first.
    assert worst["ex_precision_d"] == pytest.approx(np.mean(np.maximum(0, 2 * k - 8) / k))
    assert worst["ex_precision_d"] < worst["chance"]["ex_precision_d"]


def test_amd_matches_reference_without_ties():
    rng = np.random.default_rng(1)
    p, a = 300, 30
    sep = rng.normal(size=(p, a)).astype(np.float32)
    lq, lg = _labels(rng, p, a, 0.3), _labels(rng, p, a, 0.3)
    lg[:20] = lq[:20]  # some pairs with nothing differing
    valid = rng.random(p) < 0.9
    got = em.amd_metrics(sep, lq, lg, valid, block=64)
    ref = reference_amd(sep, lq, lg, valid, brute_force_ties=False)
    _assert_matches(got, ref, got["per_attribute"].keys())
    assert got["num_pairs"] == int(valid.sum())


def test_amd_ties_match_brute_force_enumeration():
    rng = np.random.default_rng(2)
    p, a = 60, 6
    # Few distinct values: many ties, including all-tied rows.
    sep = rng.integers(0, 3, size=(p, a)).astype(np.float32)
    sep[:5] = 0.0
    lq, lg = _labels(rng, p, a, 0.5), _labels(rng, p, a, 0.5)
    names = [f"n{i}" for i in range(a)]
    got = em.amd_metrics(sep, lq, lg, names=names, block=7)
    ref = reference_amd(sep, lq, lg, brute_force_ties=True)
    _assert_matches(got, ref, names)


def test_all_tied_explanation_scores_chance():
    rng = np.random.default_rng(3)
    p, a = 40, 7
    lq, lg = _labels(rng, p, a), _labels(rng, p, a)
    got = em.amd_metrics(np.zeros((p, a), np.float32), lq, lg)
    for key in ("ex_precision_d", "ex_map_d", "ex_precision_s", "ex_map_s"):
        assert got[key] == pytest.approx(got["chance"][key], abs=1e-6), key


@pytest.mark.parametrize("a, k", [(1, 1), (5, 1), (5, 3), (6, 6), (7, 2)])
def test_chance_average_precision_by_enumeration(a, k):
    rel = np.zeros(a, bool)
    rel[:k] = True
    aps = [_plain_pair(np.asarray(o), rel)[1] for o in itertools.permutations(range(a))]
    assert em.chance_average_precision(k, a) == pytest.approx(np.mean(aps))
    assert em.chance_average_precision(0, a) == 0.0


def test_accumulator_streaming_equals_one_shot():
    rng = np.random.default_rng(4)
    p, a = 257, 30
    sep = rng.normal(size=(p, a)).astype(np.float32)
    lq, lg = _labels(rng, p, a), _labels(rng, p, a)
    acc = em.AmdAccumulator(a, block=32)
    for start in range(0, p, 50):
        acc.update(sep[start:start + 50], lq[start:start + 50], lg[start:start + 50])
    acc.update(sep[:0], lq[:0], lg[:0])  # an empty chunk is fine
    whole = em.amd_metrics(sep, lq, lg)
    streamed = acc.result()
    assert streamed["num_pairs"] == whole["num_pairs"] == p
    for key in ("ex_precision_d", "ex_map_d", "ex_precision_s", "ex_map_s"):
        assert streamed[key] == pytest.approx(whole[key], abs=1e-6)
    assert streamed["differing_histogram"] == whole["differing_histogram"]


def test_amd_empty_accumulator_is_undefined():
    got = em.AmdAccumulator(3).result()
    assert got["num_pairs"] == 0 and got["ex_precision_d"] is None and got["ex_map_s"] is None
    assert got["chance"]["ex_map_d"] is None


def test_amd_errors():
    sep = np.zeros((4, 3), np.float32)
    lab = np.zeros((4, 3), np.uint8)
    with pytest.raises(ValueError, match=r"separation must have shape \[P, A\]"):
        em.amd_metrics(np.zeros(3), lab, lab)
    with pytest.raises(ValueError, match=r"labels_gallery must have shape \(4, 3\)"):
        em.amd_metrics(sep, lab, lab[:3])
    with pytest.raises(ValueError, match="labels_query must be boolean or 0/1"):
        em.amd_metrics(sep, lab + 2, lab)
    bad = sep.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite values in 1 valid pairs"):
        em.amd_metrics(bad, lab, lab)
    # ... unless that pair is not valid.
    assert em.amd_metrics(bad, lab, lab, np.array([1, 1, 0, 1], bool))["num_pairs"] == 3
    with pytest.raises(ValueError, match=r"valid must have shape \(4,\)"):
        em.amd_metrics(sep, lab, lab, np.ones(3, bool))
    with pytest.raises(ValueError, match="names must be 3 unique"):
        em.amd_metrics(sep, lab, lab, names=["a", "a", "b"])
    with pytest.raises(ValueError, match="block must be >= 1"):
        em.AmdAccumulator(3, block=0)


# --------------------------------------------------------------------------------------------
# AUROC.


def _pairwise_auroc(s, pos):
    sp, sn = s[pos], s[~pos]
    wins = (sp[:, None] > sn[None, :]).sum() + 0.5 * (sp[:, None] == sn[None, :]).sum()
    return wins / (len(sp) * len(sn))


def test_auroc_with_ties_matches_pairwise_reference():
    rng = np.random.default_rng(5)
    s = rng.integers(0, 5, 200).astype(np.float64)  # heavy ties
    pos = rng.random(200) < 0.3
    assert em.auroc(s, pos) == pytest.approx(_pairwise_auroc(s, pos))
    assert em.auroc([0.1, 0.9], [False, True]) == 1.0
    assert em.auroc([0.5, 0.5], [False, True]) == 0.5
    assert em.auroc([0.1, 0.2], [True, True]) is None
    with pytest.raises(ValueError, match="scores .* non-finite"):
        em.auroc([np.inf, 0.0], [True, False])


def test_matching_score_auroc_overall_and_per_attribute():
    rng = np.random.default_rng(6)
    p, a = 80, 4
    scores = np.round(rng.random((p, a)), 1)
    agree = rng.random((p, a)) < 0.5
    scores[agree] += 0.2  # informative
    selected = rng.random((p, a)) < 0.7
    selected[:, 3] = False
    got = em.matching_score_auroc(scores, agree, selected, names=list("wxyz"))
    assert got["auroc"] == pytest.approx(_pairwise_auroc(scores[selected], agree[selected]))
    assert got["auroc"] > 0.6
    assert got["num_positive"] + got["num_negative"] == selected.sum()
    for j, n in enumerate("wxy"):
        m = selected[:, j]
        assert got["per_attribute"][n]["auroc"] == pytest.approx(
            _pairwise_auroc(scores[m, j], agree[m, j]))
    assert got["per_attribute"]["z"] == {"auroc": None, "num_positive": 0, "num_negative": 0}
    with pytest.raises(ValueError, match=r"agree must have shape \(80, 4\)"):
        em.matching_score_auroc(scores, agree[:, :3])


def test_auroc_accumulator_binned():
    rng = np.random.default_rng(7)
    p, a = 500, 3
    # Scores on bin centres: one value per bin, so the binned AUROC is exact.
    bins = 64
    agree = rng.random((p, a)) < 0.4
    index = np.minimum(rng.integers(0, bins, (p, a)) + 8 * agree, bins - 1)  # informative
    scores = (index + 0.5) * (2.0 / bins)
    acc = em.AurocAccumulator(a, bins=bins)
    acc.update(scores[:200], agree[:200]).update(scores[200:], agree[200:])
    got = acc.result()
    exact = em.matching_score_auroc(scores, agree)
    assert got["auroc"] == pytest.approx(exact["auroc"], abs=1e-12)
    for n in got["per_attribute"]:
        assert got["per_attribute"][n]["auroc"] == pytest.approx(
            exact["per_attribute"][n]["auroc"], abs=1e-12)
    # Continuous scores: within the reported bound.
    cont = rng.random((p, a)) * 2.0
    coarse = em.AurocAccumulator(a, bins=8).update(cont, agree).result()
    exact = em.matching_score_auroc(cont, agree)
    assert abs(coarse["auroc"] - exact["auroc"]) <= coarse["max_binning_error"] + 1e-12
    with pytest.raises(ValueError, match=r"scores must have shape \[\.\.\., 3\]"):
        acc.update(scores[:, :2], agree[:, :2])
    with pytest.raises(ValueError, match="value_range"):
        em.AurocAccumulator(3, value_range=(1.0, 1.0))


# --------------------------------------------------------------------------------------------
# Counterfactual hit rate.


def _reference_hits(e0, e1, in_set, m):
    """Brute force: fraction of tie-consistent orders of the rise with a changed attribute in
    the top m, and the mean 1-based rank of the first changed attribute."""
    hits, ranks = [], []
    for i in range(e0.shape[0]):
        orders = list(_orderings(e1[i] - e0[i], descending=True))
        hits.append(np.mean([in_set[i][o[:m]].any() for o in orders]))
        ranks.append(np.mean([np.flatnonzero(in_set[i][o])[0] + 1 for o in orders]))
    return float(np.mean(hits)), float(np.mean(ranks))


def test_counterfactual_hand_case():
    e0 = np.zeros((3, 4))
    e1 = np.array([[0.0, 5.0, 1.0, 0.0],    # attribute 1 rises most: hit if 1 changed
                   [3.0, 5.0, 4.0, 0.0],    # changed 2 is 2nd
                   [0.0, 1.0, 1.0, 1.0]])   # changed 1 ties with 2, 3: P(top1) = 1/3
    got = em.counterfactual_hit_rate(e0, e1, np.array([1, 2, 1]), names=list("abcd"))
    assert got["top1"] == pytest.approx((1.0 + 0.0 + 1.0 / 3.0) / 3.0)
    assert got["top3"] == pytest.approx(1.0)
    assert got["mean_rank"] == pytest.approx((1.0 + 2.0 + 2.0) / 3.0)
    assert got["per_attribute"]["b"]["count"] == 2
    assert got["per_attribute"]["a"] == {"count": 0, "top1": None, "top3": None,
                                         "mean_rank": None}
    assert got["chance"]["top1"] == pytest.approx(0.25)
    assert got["chance"]["top3"] == pytest.approx(0.75)
    json.dumps(got)


def test_counterfactual_groups_count_any_changed_label():
    # upred -> upblue flips two labels; the rise is largest for upblue: a hit.
    e0 = np.zeros((1, 3))
    e1 = np.array([[0.1, 0.2, 0.9]])
    assert em.counterfactual_hit_rate(e0, e1, np.array([1]))["top1"] == 0.0
    groups = np.array([[False, True, True]])
    got = em.counterfactual_hit_rate(e0, e1, np.array([1]), groups)
    assert got["top1"] == 1.0
    assert got["chance"]["top1"] == pytest.approx(2.0 / 3.0)


def test_counterfactual_matches_brute_force_with_ties():
    rng = np.random.default_rng(8)
    p, a = 40, 6
    e0 = rng.integers(0, 2, (p, a)).astype(float)
    e1 = e0 + rng.integers(0, 3, (p, a))
    changed = rng.integers(0, a, p)
    in_set = rng.random((p, a)) < 0.2
    in_set[np.arange(p), changed] = True
    got = em.counterfactual_hit_rate(e0, e1, changed, in_set, top=(1, 2, 3))
    for m in (1, 2, 3):
        ref_hit, ref_rank = _reference_hits(e0, e1, in_set, m)
        assert got[f"top{m}"] == pytest.approx(ref_hit)
    assert got["mean_rank"] == pytest.approx(ref_rank)
    # Chance = the same with an all-tied rise.
    flat = em.counterfactual_hit_rate(e0, e0, changed, in_set, top=(1, 2, 3))
    for m in (1, 2, 3):
        assert flat[f"top{m}"] == pytest.approx(got["chance"][f"top{m}"])


def test_counterfactual_errors():
    e = np.zeros((2, 3))
    with pytest.raises(ValueError, match="changed_attribute must be int"):
        em.counterfactual_hit_rate(e, e, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        em.counterfactual_hit_rate(e, e, np.array([0, 3]))
    with pytest.raises(ValueError, match="must include changed_attribute; row 1 changes"):
        em.counterfactual_hit_rate(e, e, np.array([0, 1]), np.eye(2, 3, dtype=bool)[[0, 0]])
    with pytest.raises(ValueError, match=r"errors_counterfactual must have shape \[P, 3\]"):
        em.counterfactual_hit_rate(e, np.zeros((2, 4)), np.array([0, 1]))
    with pytest.raises(ValueError, match="errors_original .* non-finite"):
        em.counterfactual_hit_rate(np.full((2, 3), np.nan), e, np.array([0, 1]))
    with pytest.raises(ValueError, match="no pairs"):
        em.counterfactual_hit_rate(e[:0], e[:0], np.array([], int))


# --------------------------------------------------------------------------------------------
# Whole galleries.


def _gallery_case(seed=9, q=5, g=9, n=16, a=5):
    rng = np.random.default_rng(seed)
    fq = rng.normal(size=(q, n)).astype(np.float32)
    fg = rng.normal(size=(g, n)).astype(np.float32)
    fg[0] = fq[0]  # an identical pair: all errors 0, all tied
    w = rng.normal(size=(n, a)).astype(np.float32)
    return fq, fg, w, _labels(rng, q, a), _labels(rng, g, a)


PRIOR = np.array([0.5, 0.1, 0.3, 0.2, 0.4])


def _separation64(fq, fg, w, mode):
    """float64 separation ``[Q, G, A]``, matching score (or None) and query probabilities."""
    fq, fg, w = (x.astype(np.float64) for x in (fq, fg, w))
    diff = fq[:, None, :] - fg[None, :, :]  # [Q, G, N]
    xq, xg = 1 / (1 + np.exp(-fq @ w)), 1 / (1 + np.exp(-fg @ w))
    if mode == "scores":
        s = (1 - np.abs(xq[:, None] - xg[None])) / (0.5 + np.abs(xq[:, None] - 0.5))
        return 1.0 - s, s, xq
    if mode == "disagreement":
        p = xq[:, None] * (1 - xg[None]) + xg[None] * (1 - xq[:, None])
        return p, 1.0 - p, xq
    if mode == "prior":
        return np.broadcast_to(PRIOR, diff.shape[:2] + (w.shape[1],)).copy(), None, None
    if mode == "projection":  # least squares d = W c + r; c_a (W^T d)_a
        c = np.linalg.lstsq(w, diff.reshape(-1, w.shape[0]).T, rcond=None)[0].T
        return (c.reshape(diff.shape[:2] + (-1,)) * (diff @ w)), None, None
    if mode == "complete":
        w = np.abs(w) / np.abs(w).sum(axis=1, keepdims=True)
    return np.square(diff) @ w, None, None


@pytest.mark.parametrize("mode", em.MODES)
def test_streamed_over_gallery_matches_reference(mode):
    fq, fg, w, lq, lg = _gallery_case()
    q, g, a = fq.shape[0], fg.shape[0], w.shape[1]
    vg = np.ones(g, bool)
    vg[3] = False
    sep, scores, xq = _separation64(fq, fg, w, mode)
    if mode in ("paper", "complete", "projection"):  # the identical pair: exactly tied
        sep[0, 0] = 0.0
    got = gm.streamed_amd_over_gallery(fq, fg, w, lq, lg, mode, valid_gallery=vg,
                                       prior=PRIOR if mode == "prior" else None,
                                       query_chunk=2, block=8)
    pairs_q = np.repeat(lq, g, axis=0)
    pairs_g = np.tile(lg, (q, 1))
    valid = np.tile(vg, q)
    ref = reference_amd(sep.reshape(q * g, a), pairs_q, pairs_g, valid, brute_force_ties=True)
    assert got["mode"] == mode and got["num_pairs"] == q * int(vg.sum())
    _assert_matches(got, ref, got["per_attribute"].keys(), atol=1e-5)
    # Per-query sums: query i's pairs alone.
    sums = got["groups"]["amd"]
    one = reference_amd(sep[1], lq[[1] * g], lg, vg, brute_force_ties=True)
    assert sums["num_pairs_d"][1] == one["num_pairs_d"]
    assert sums["ap_d"][1] / sums["num_pairs_d"][1] == pytest.approx(one["ex_map_d"], abs=1e-5)
    if mode in em.SCORE_MODES:
        selected = np.abs(xq - 0.5) > 0.4
        sel = np.broadcast_to(selected[:, None, :], (q, g, a)) & vg[None, :, None]
        agree = lq[:, None, :] == lg[None, :, :]
        exact = _pairwise_auroc(scores[sel], agree[sel])
        assert abs(got["auroc"]["auroc"] - exact) <= got["auroc"]["max_binning_error"] + 1e-9
        pooled_pos, pooled_neg = got["groups"]["auroc"][0]["pooled"]
        assert pooled_pos.shape == (q, 256)
        assert pooled_pos.sum() == (sel & agree).sum() and pooled_neg.sum() == (sel & ~agree).sum()
        assert pooled_pos[2].sum() == (sel & agree)[2].sum()
    else:
        assert "auroc" not in got and got["groups"]["auroc"] == []


def _no_removal_ids(q, g):
    """Pids/cameras under which the protocol removes nothing (no shared pid, no junk)."""
    return dict(query_pids=np.arange(1, q + 1), query_cams=np.ones(q, np.int64),
                gallery_pids=np.arange(100, 100 + g), gallery_cams=np.ones(g, np.int64))


@pytest.mark.parametrize("mode", ["paper", "projection", "scores", "disagreement", "prior"])
def test_amd_over_top_k_matches_reference(mode):
    fq, fg, w, lq, lg = _gallery_case(seed=10, g=12)
    q, k = fq.shape[0], 4
    sep, scores, xq = _separation64(fq, fg, w, mode)
    d2 = np.square(fq[:, None, :].astype(np.float64) - fg[None]).sum(-1)
    top = np.argsort(d2, axis=1, kind="stable")[:, :k]
    vq = np.array([True, True, False, True, True])
    rows = np.repeat(np.arange(q), k)
    pair_sep = sep[rows, top.ravel()]
    if mode in ("paper", "projection"):
        pair_sep[0] = 0.0  # query 0's first match is its identical copy: all tied
    got = gm.amd_over_top_k(fq, fg, w, lq, lg, mode, k=k, valid_query=vq,
                            prior=PRIOR if mode == "prior" else None,
                            **_no_removal_ids(q, fg.shape[0]))
    ref = reference_amd(pair_sep, lq[rows], lg[top.ravel()], vq[rows], brute_force_ties=True)
    assert got["k"] == k and got["num_pairs"] == k * int(vq.sum())
    _assert_matches(got, ref, got["per_attribute"].keys(), atol=1e-5)
    assert got["groups"]["amd"]["num_pairs_d"].sum() == ref["num_pairs_d"]
    if mode in em.SCORE_MODES:
        sel = (np.abs(xq - 0.5) > 0.4)[rows] & vq[rows, None]
        agree = lq[rows] == lg[top.ravel()]
        pair_scores = scores[rows, top.ravel()]
        want = em.auroc(pair_scores[sel], agree[sel]) if sel.any() else None
        assert got["auroc"]["auroc"] == pytest.approx(want, abs=1e-5)


def test_gallery_errors():
    fq, fg, w, lq, lg = _gallery_case()
    with pytest.raises(ValueError, match="mode must be one of"):
        gm.streamed_amd_over_gallery(fq, fg, w, lq, lg, "full")
    with pytest.raises(ValueError, match="mode='prior' needs prior"):
        gm.streamed_amd_over_gallery(fq, fg, w, lq, lg, "prior")
    with pytest.raises(ValueError, match=r"prior must have shape \(5,\)"):
        gm.streamed_amd_over_gallery(fq, fg, w, lq, lg, "prior", prior=PRIOR[:4])
    with pytest.raises(ValueError, match="prior applies to mode='prior' only"):
        gm.streamed_amd_over_gallery(fq, fg, w, lq, lg, "paper", prior=PRIOR)
    with pytest.raises(ValueError, match=r"labels_gallery must have shape \(9, 5\)"):
        gm.streamed_amd_over_gallery(fq, fg, w, lq, lg[:-1])
    with pytest.raises(ValueError, match="query_chunk must be >= 1"):
        gm.streamed_amd_over_gallery(fq, fg, w, lq, lg, query_chunk=0)
    bad = fq.copy()
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="f_query .* non-finite"):
        gm.streamed_amd_over_gallery(bad, fg, w, lq, lg)
    with pytest.raises(ValueError, match="k must be an integer"):
        gm.amd_over_top_k(fq, fg, w, lq, lg, k=100, **_no_removal_ids(5, 9))


# --------------------------------------------------------------------------------------------
# The Market-1501 protocol on the top k (the pairs of the report of reid_jax.explain.run).


def _protocol_case(seed=11, q=4, g=14, n=16, a=5):
    """Queries whose nearest gallery images are removed by the protocol: copies of the query
    on its own camera (same pid) and junk; a distractor (pid 0, no labels) stays."""
    rng = np.random.default_rng(seed)
    fq = rng.normal(size=(q, n)).astype(np.float32)
    fg = rng.normal(size=(g, n)).astype(np.float32)
    w = rng.normal(size=(n, a)).astype(np.float32)
    qp, qc = np.array([1, 2, 3, 4]), np.array([1, 1, 2, 1])
    gp = np.array([1, 1, 2, -1, 0, 3, 3, 4, 4, 2, 5, 5, 6, 6])
    gc = np.array([1, 2, 1, 1, 3, 2, 1, 2, 1, 3, 1, 2, 1, 2])
    fg[0] = fq[0] + 0.01 * rng.normal(size=n)  # query 0's own camera: removed
    fg[2] = fq[1] + 0.01 * rng.normal(size=n)  # query 1's own camera: removed
    fg[3] = fq[2] + 0.01 * rng.normal(size=n)  # junk next to query 2: removed
    fg[4] = fq[3] + 0.01 * rng.normal(size=n)  # distractor next to query 3: stays (no labels)
    fg[1] = fq[0] + 0.05 * rng.normal(size=n)  # query 0's true match on another camera
    ids = dict(query_pids=qp, query_cams=qc, gallery_pids=gp, gallery_cams=gc)
    vg = gp > 0
    return fq, fg, w, _labels(rng, q, a), _labels(rng, g, a), ids, vg


def _protocol_ranking64(fq, fg, ids, k):
    """float64 reference: top ``k`` [Q, k] with removed images last, and which are kept."""
    d2 = np.square(fq[:, None, :].astype(np.float64) - fg[None]).sum(-1)
    qp, qc, gp, gc = (ids[key] for key in ("query_pids", "query_cams", "gallery_pids",
                                             "gallery_cams"))
    removed = ((gp[None] == qp[:, None]) & (gc[None] == qc[:, None])) | (gp[None] == -1)
    d2 = np.where(removed, np.inf, d2)
    top = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return top, np.isfinite(np.take_along_axis(d2, top, 1))


@pytest.mark.parametrize("mode", em.MODES)
def test_amd_over_top_k_uses_the_protocol_ranking(mode):
    fq, fg, w, lq, lg, ids, vg = _protocol_case()
    q, k = fq.shape[0], 3
    top, _ = _protocol_ranking64(fq, fg, ids, k)
    plain = np.argsort(np.square(fq[:, None, :] - fg[None]).sum(-1), axis=1)[:, :k]
    assert not np.array_equal(plain, top)  # the case is one where the protocol matters
    sep, scores, xq = _separation64(fq, fg, w, mode)
    rows = np.repeat(np.arange(q), k)
    valid = vg[top.ravel()]
    got = gm.amd_over_top_k(fq, fg, w, lq, lg, mode, k=k, valid_gallery=vg,
                            extra_thresholds=(0.0,) if mode in em.SCORE_MODES else (),
                            prior=PRIOR if mode == "prior" else None, **ids)
    ref = reference_amd(sep[rows, top.ravel()], lq[rows], lg[top.ravel()], valid,
                        brute_force_ties=True)
    assert got["k"] == k and got["num_pairs"] == int(valid.sum())
    _assert_matches(got, ref, got["per_attribute"].keys(), atol=1e-5)
    if mode in em.SCORE_MODES:
        agree = lq[rows] == lg[top.ravel()]
        pair_scores = scores[rows, top.ravel()]
        for t, result in ((0.4, got["auroc"]), (0.0, got["extra_auroc"][0])):
            sel = (np.abs(xq - 0.5) > t)[rows] & valid[:, None]
            assert result["auroc"] == pytest.approx(_pairwise_auroc(pair_scores[sel],
                                                                    agree[sel]), abs=1e-6)
            assert result["num_positive"] + result["num_negative"] == int(sel.sum())
    else:
        assert "auroc" not in got and "extra_auroc" not in got


def test_amd_over_top_k_with_fewer_than_k_kept_images():
    fq, fg, w, lq, lg, ids, vg = _protocol_case()
    ids = {**ids, "gallery_pids": np.where(np.arange(14) < 12, 1, ids["gallery_pids"]),
           "gallery_cams": np.where(np.arange(14) < 12, 1, ids["gallery_cams"])}
    # Query 0 (pid 1, cam 1) keeps 2 of the 14 images, the others all 14.
    k = 4
    top, finite = _protocol_ranking64(fq, fg, ids, k)
    assert finite.sum(axis=1).tolist() == [2, 4, 4, 4]
    rows = np.repeat(np.arange(fq.shape[0]), k)
    valid = finite.ravel()
    sep, _, _ = _separation64(fq, fg, w, "paper")
    got = gm.amd_over_top_k(fq, fg, w, lq, lg, "paper", k=k, **ids)
    ref = reference_amd(sep[rows, top.ravel()], lq[rows], lg[top.ravel()], valid,
                        brute_force_ties=True)
    assert got["num_pairs"] == 14
    _assert_matches(got, ref, got["per_attribute"].keys(), atol=1e-5)


def test_top_k_pairs_are_those_of_explain_run():
    """The kernel ranking, fetch size and removal of amd_over_top_k give explain_run's lists."""
    from reid_jax import explain
    from reid_jax.explain import run as explain_run

    fq, fg, w, _, _, ids, _ = _protocol_case()
    qp, qc, gp, gc = (ids[key] for key in ("query_pids", "query_cams", "gallery_pids",
                                             "gallery_cams"))
    k = 3
    fetch = int(min(fg.shape[0], k + retrieval.removed_counts(qp, qc, gp, gc).max()))
    ranked = np.asarray(explain.explain_rankings(fq, fg, w, k=fetch).indices)
    cols, ok = retrieval.first_kept(ranked, qp, qc, gp, gc, k)
    assert ok.all()
    ours = np.take_along_axis(ranked, cols, 1)
    report = [ex.gallery for ex in explain_run.explain_queries(
        fq, fg, w, qp, qc, gp, gc, k=k, threshold=0.4, mode="paper")]
    np.testing.assert_array_equal(ours, np.stack(report))
    np.testing.assert_array_equal(ours, _protocol_ranking64(fq, fg, ids, k)[0])


def test_top_k_and_extra_threshold_errors():
    fq, fg, w, lq, lg, ids, _ = _protocol_case()
    with pytest.raises(ValueError, match=r"query_pids must be integer \[4\]"):
        gm.amd_over_top_k(fq, fg, w, lq, lg, **{**ids, "query_pids": ids["query_pids"][:3]})
    with pytest.raises(ValueError, match=r"gallery_cams must be integer \[14\]"):
        gm.amd_over_top_k(fq, fg, w, lq, lg, **{**ids, "gallery_cams": np.ones(14)})
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, G=14\]"):
        gm.amd_over_top_k(fq, fg, w, lq, lg, k=0, **ids)
    with pytest.raises(ValueError, match=r"apply to modes \(.scores., .disagreement.\) only"):
        gm.amd_over_top_k(fq, fg, w, lq, lg, "paper", extra_thresholds=(0.0,), **ids)
    with pytest.raises(ValueError, match=r"apply to modes \(.scores., .disagreement.\) only"):
        gm.streamed_amd_over_gallery(fq, fg, w, lq, lg, "complete", extra_thresholds=(0.0,))
    with pytest.raises(ValueError, match=r"threshold must lie in \[0, 0.5\)"):
        gm.streamed_amd_over_gallery(fq, fg, w, lq, lg, "scores", extra_thresholds=(0.7,))


def test_streamed_extra_thresholds_equal_separate_passes_and_progress():
    fq, fg, w, lq, lg = _gallery_case()
    calls = []
    got = gm.streamed_amd_over_gallery(fq, fg, w, lq, lg, "scores", threshold=0.3,
                                       extra_thresholds=(0.0, 0.1), query_chunk=2,
                                       progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    for t, result in ((0.3, got["auroc"]), (0.0, got["extra_auroc"][0]),
                      (0.1, got["extra_auroc"][1])):
        alone = gm.streamed_amd_over_gallery(fq, fg, w, lq, lg, "scores", threshold=t,
                                             query_chunk=2)
        assert result == alone["auroc"]
        assert alone["extra_auroc"] == []
        assert {key: got[key] for key in ("ex_map_d", "ex_precision_s", "num_pairs")} == {
            key: alone[key] for key in ("ex_map_d", "ex_precision_s", "num_pairs")}
    assert got["extra_auroc"][0]["num_positive"] + got["extra_auroc"][0]["num_negative"] > (
        got["auroc"]["num_positive"] + got["auroc"]["num_negative"])
