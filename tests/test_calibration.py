"""The head's calibration: Platt fitting, cross-fitting by identity, storage in the checkpoint,
and the disagreement explanation that reads the calibrated probabilities."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from reid_jax import explain
from reid_jax.explain import counterfactuals as cfs
from reid_jax.explain import gallery_metrics as gm
from reid_jax.models.attribute_head import Calibration, check_calibration, fit_calibration
from reid_jax.train import attribute_training as at

RIDGE = 1e-3


def _sig(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def _ref_platt(z, y, ridge=RIDGE):
    """float64 reference: BFGS on the same penalised mean logistic loss, one attribute."""
    def loss(p):
        s = p[0] * z + p[1]
        return np.mean(np.logaddexp(0.0, s) - y * s) + 0.5 * ridge * np.sum(p ** 2)
    return minimize(loss, [1.0, 0.0], method="BFGS", options={"gtol": 1e-11}).x


def _logits_and_labels(seed=0, n=400):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4)) * np.array([1.0, 6.0, 20.0, 0.2])
    true_slope, true_intercept = np.array([0.3, 0.2, 1.0, 3.0]), np.array([0.5, -1.0, 0.0, 0.2])
    y = (rng.random((n, 4)) < _sig(z * true_slope + true_intercept)).astype(np.float64)
    y[:, 2] = z[:, 2] > 0  # separable: the ridge keeps it finite
    return z, y


def test_fit_calibration_matches_a_float64_reference():
    z, y = _logits_and_labels()
    cal = fit_calibration(z, y, ridge=RIDGE)
    for a in range(z.shape[1]):
        want = _ref_platt(z[:, a], y[:, a])
        np.testing.assert_allclose([float(cal.slope[a]), float(cal.intercept[a])], want,
                                   rtol=2e-4, atol=2e-5)
    assert np.isfinite(np.asarray(cal.slope)).all()


def test_fit_calibration_recovers_the_generating_scaling():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(20000, 1)) * 4.0
    y = (rng.random(z.shape) < _sig(0.25 * z - 0.7)).astype(np.float64)
    cal = fit_calibration(z, y, ridge=0.0)
    assert abs(float(cal.slope[0]) - 0.25) < 0.02 and abs(float(cal.intercept[0]) + 0.7) < 0.06


def test_fit_calibration_errors():
    z, y = _logits_and_labels()
    with pytest.raises(ValueError, match=r"logits and labels must both be \[n, A\]"):
        fit_calibration(z, y[:, :3])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        fit_calibration(z, y * 2)
    bad = z.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="logits must be finite"):
        fit_calibration(bad, y)


def test_probabilities_under_jit_and_vmap_match_numpy():
    z, _ = _logits_and_labels()
    cal = Calibration(jnp.asarray([0.5, 2.0, 0.1, 1.0]), jnp.asarray([0.3, -0.2, 1.0, 0.0]))
    want = _sig(z * np.asarray(cal.slope, np.float64) + np.asarray(cal.intercept, np.float64))
    zf = jnp.asarray(z, jnp.float32)
    np.testing.assert_allclose(cal.probabilities(zf), want, atol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda c, x: c.probabilities(x))(cal, zf), want,
                               atol=1e-6)
    np.testing.assert_allclose(jax.vmap(cal.probabilities)(zf), want, atol=1e-6)


def test_json_round_trip_and_messages():
    cal = Calibration(jnp.asarray([0.5, 2.0]), jnp.asarray([0.3, -0.2]))
    back = Calibration.from_json(cal.json())
    np.testing.assert_array_equal(back.slope, cal.slope)
    np.testing.assert_array_equal(back.intercept, cal.intercept)
    with pytest.raises(ValueError, match=r"meta 'x' must be \{'slope'"):
        Calibration.from_json({"slope": [1.0]}, "meta 'x'")
    with pytest.raises(ValueError, match="one length"):
        Calibration.from_json({"slope": [1.0, 2.0], "intercept": [0.0]})
    with pytest.raises(ValueError, match="finite"):
        Calibration.from_json({"slope": [float("nan")], "intercept": [0.0]})
    with pytest.raises(ValueError, match=r"shape \(3,\) \(one per attribute"):
        check_calibration(cal, 3)
    with pytest.raises(ValueError, match="must be a Calibration"):
        check_calibration((cal.slope, cal.intercept), 2)


# ------------------------------------------------------------------------------ explanations


def _embeddings(seed=0, q=5, g=40, n=16, a=6):
    rng = np.random.default_rng(seed)
    fq, fg = rng.normal(size=(q, n)), rng.normal(size=(g, n))
    w = rng.normal(size=(n, a)) * 0.7
    cal = Calibration(jnp.asarray(rng.uniform(0.1, 2.0, a), jnp.float32),
                      jnp.asarray(rng.normal(size=a), jnp.float32))
    return fq, fg, w, cal


def _ref_disagreement(fq, fg, w, cal):
    s, b = np.asarray(cal.slope, np.float64), np.asarray(cal.intercept, np.float64)
    pq, pg = _sig(fq @ w * s + b), _sig(fg @ w * s + b)
    return pq[:, None] * (1 - pg[None]) + pg[None] * (1 - pq[:, None])  # [Q, G, A]


def test_explain_rankings_disagreement_reads_the_calibrated_probabilities():
    fq, fg, w, cal = _embeddings()
    out = explain.explain_rankings(fq, fg, w, k=7, mode="disagreement", calibration=cal)
    idx = np.asarray(out.indices)
    want = np.take_along_axis(_ref_disagreement(fq, fg, w, cal), idx[..., None], axis=1)
    np.testing.assert_allclose(out.errors, want, atol=2e-6)
    # The head's own probabilities stay what the other fields show.
    np.testing.assert_allclose(out.attributes_query, _sig(fq @ w), atol=2e-6)
    plain = explain.explain_rankings(fq, fg, w, k=7, mode="disagreement")
    assert np.abs(np.asarray(plain.errors) - want).max() > 1e-2
    # Other modes do not read it.
    for mode in ("paper", "complete", "projection"):
        a = explain.explain_rankings(fq, fg, w, k=7, mode=mode, calibration=cal)
        b = explain.explain_rankings(fq, fg, w, k=7, mode=mode)
        np.testing.assert_array_equal(a.errors, b.errors)
    # One query without the Q axis; inside vmap.
    one = explain.explain_rankings(fq[2], fg, w, k=7, mode="disagreement", calibration=cal)
    np.testing.assert_allclose(one.errors, want[2], atol=2e-6)
    v = jax.vmap(lambda f: explain.explain_rankings(
        f, jnp.asarray(fg), jnp.asarray(w), k=7, mode="disagreement", calibration=cal,
        mesh=None).errors)(jnp.asarray(fq, jnp.float32))
    np.testing.assert_allclose(v, want, atol=2e-6)
    with pytest.raises(ValueError, match=r"calibration must have slope and intercept of shape "
                                         r"\(6,\)"):
        explain.explain_rankings(fq, fg, w, k=3, mode="disagreement",
                                 calibration=Calibration(cal.slope[:2], cal.intercept[:2]))


def test_metrics_use_the_calibration_where_given():
    fq, fg, w, cal = _embeddings(seed=3, q=6, g=30, a=5)
    rng = np.random.default_rng(0)
    lq, lg = rng.integers(0, 2, (6, 5)), rng.integers(0, 2, (30, 5))
    ref = _ref_disagreement(fq, fg, w, cal)
    from reid_jax.explain import metrics as em
    want = em.amd_metrics(ref.reshape(-1, 5), np.repeat(lq, 30, 0), np.tile(lg, (6, 1)),
                          names=list("abcde"))
    got = gm.streamed_amd_over_gallery(fq, fg, w, lq, lg, "disagreement", calibration=cal,
                                       names=list("abcde"), query_chunk=4)
    for key in ("ex_map_d", "ex_precision_d"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    pairs = cfs.pair_separations(fq[[0, 1, 2]], fg[[4, 5, 6]], w, "disagreement",
                                 calibration=cal)
    np.testing.assert_allclose(pairs, ref[[0, 1, 2], [4, 5, 6]], atol=2e-6)


# ------------------------------------------------------------------------------ cross-fitting


def _identities(seed=0, ids=24, per_id=6, dim=12):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim))
    labels_id = (centres @ rng.normal(size=(dim, 5)) > 0).astype(np.uint8)
    flip = rng.random(labels_id.shape) < 0.2  # labels the features do not show
    labels_id = np.where(flip, 1 - labels_id, labels_id)
    pids = np.repeat(np.arange(1, ids + 1), per_id)
    feats = centres[pids - 1] + 0.3 * rng.normal(size=(len(pids), dim))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats.astype(np.float32), labels_id[pids - 1], pids


def test_cross_fitted_calibration_is_fitted_on_held_out_identities():
    feats, labels, pids = _identities()
    config = at.HeadTrainConfig(epochs=40, learning_rate=3e-2, batch_size=32,
                                calibration_folds=3)
    cal, info = at.cross_fitted_calibration(feats, labels, pids, config)
    assert info["folds"] == 3 and info["num_identities"] == 24 and info["num_images"] == 144
    raw, fitted = np.asarray(info["heldout_loss_raw"]), np.asarray(info["heldout_loss_calibrated"])
    # Platt scaling minimises the held-out loss it reports (up to its small ridge), and the
    # class-weighted, over-confident head gains from it on average.
    assert (fitted <= raw + 1e-3).all() and fitted.mean() < raw.mean()
    assert np.asarray(cal.slope).shape == (5,) and np.isfinite(np.asarray(cal.slope)).all()
    # Deterministic for a seed.
    again, _ = at.cross_fitted_calibration(feats, labels, pids, config)
    np.testing.assert_array_equal(cal.slope, again.slope)


def test_cross_fitted_calibration_errors():
    feats, labels, pids = _identities(ids=3, per_id=2)
    with pytest.raises(ValueError, match="calibration_folds=4 needs at least 4 training "
                                         "identities, got 3"):
        at.cross_fitted_calibration(feats, labels, pids, at.HeadTrainConfig(epochs=1))
    with pytest.raises(ValueError, match=r"pids must be \[n\] = \[6\]"):
        at.cross_fitted_calibration(feats, labels, pids[:5],
                                    at.HeadTrainConfig(epochs=1, calibration_folds=2))
    with pytest.raises(ValueError, match="calibration_folds must be 0 \\(none\\) or >= 2"):
        at.HeadTrainConfig(calibration_folds=1)
