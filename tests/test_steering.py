"""Tests of reid_jax.explain.steering against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reid_jax import retrieval
from reid_jax.data.attributes import ATTRIBUTE_NAMES
from reid_jax.explain import steering

N, A, G = 48, 30, 70


def ref_projection(w, ignore):
    """P = I - W_S (W_S^T W_S)^+ W_S^T in float64."""
    ws = np.asarray(w, np.float64)[:, np.asarray(ignore)]
    if ws.shape[1] == 0:
        return np.eye(w.shape[0])
    return np.eye(w.shape[0]) - ws @ np.linalg.pinv(ws.T @ ws) @ ws.T


def ref_errors(pq, pg, w, complete=False):
    w = np.asarray(w, np.float64)
    if complete:
        w = np.abs(w) / np.abs(w).sum(1, keepdims=True)
    return ((pq[None] - pg) ** 2) @ w


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    fq = rng.normal(size=(5, N)).astype(np.float32)
    fg = rng.normal(size=(G, N)).astype(np.float32)
    fg[7] = fg[3]  # an exact duplicate: ties go to the lower index
    fq /= np.linalg.norm(fq, axis=1, keepdims=True)
    fg /= np.linalg.norm(fg, axis=1, keepdims=True)
    w = (0.8 * rng.normal(size=(N, A))).astype(np.float32)
    return fq, fg, w


def mask(*names):
    m = np.zeros(A, bool)
    for n in names:
        m[ATTRIBUTE_NAMES.index(n)] = True
    return m


IGNORES = [(), ("upblack",), ("upblack", "upwhite", "upred", "upgray", "upblue")]


@pytest.mark.parametrize("names", IGNORES)
def test_projection_equals_pinv_formula_and_is_orthogonal(data, names):
    fq, fg, w = data
    ignore = mask(*names)
    p = np.asarray(steering.projection_matrix(w, ignore), np.float64)
    np.testing.assert_allclose(p, ref_projection(w, ignore), atol=2e-6)
    b = np.asarray(steering.ignore_basis(w, ignore), np.float64)
    assert np.linalg.matrix_rank(b) == len(names)
    np.testing.assert_allclose(b.T @ b, np.diag((np.abs(b).sum(0) > 0).astype(float)),
                               atol=2e-6)
    projected = np.asarray(steering.project(fg, steering.ignore_basis(w, ignore)), np.float64)
    np.testing.assert_allclose(projected, fg @ ref_projection(w, ignore).T, atol=2e-6)
    # The head's logit of every ignored attribute is 0 for a projected embedding.
    logits = projected @ np.asarray(w, np.float64)
    scale = np.linalg.norm(fg, axis=1)[:, None] * np.linalg.norm(w, axis=0)[None, :]
    assert np.all(np.abs(logits[:, ignore]) <= 1e-5 * scale[:, ignore])
    if names:
        assert np.abs(logits[:, ~ignore]).max() > 0.1  # the others are untouched in general


def test_dependent_columns_are_handled_as_the_pseudo_inverse(data):
    _, fg, w = data
    w = w.copy()
    a, b, c = (ATTRIBUTE_NAMES.index(n) for n in ("upblack", "upwhite", "upred"))
    w[:, b] = -2.0 * w[:, a]  # rank 2 for three columns
    w[:, c] = w[:, a] + 0.5 * w[:, ATTRIBUTE_NAMES.index("hat")]
    ignore = mask("upblack", "upwhite", "upred")
    basis = np.asarray(steering.ignore_basis(w, ignore), np.float64)
    assert np.linalg.matrix_rank(basis, tol=1e-4) == 2
    np.testing.assert_allclose(np.eye(N) - basis @ basis.T, ref_projection(w, ignore),
                               atol=3e-6)


def test_project_under_jit_and_vmap(data):
    fq, fg, w = data
    basis = steering.ignore_basis(w, mask("backpack", "hat"))
    want = np.asarray(fq, np.float64) @ ref_projection(w, mask("backpack", "hat")).T
    np.testing.assert_allclose(jax.jit(steering.project)(fq, basis), want, atol=2e-6)
    np.testing.assert_allclose(jax.vmap(steering.project, in_axes=(0, None))(fq, basis), want,
                               atol=2e-6)


@pytest.mark.parametrize("names", IGNORES)
def test_steered_distances_are_distances_of_projected_embeddings(data, names):
    fq, fg, w = data
    ignore = mask(*names)
    p = ref_projection(w, ignore)
    pq, pg = fq.astype(np.float64) @ p.T, fg.astype(np.float64) @ p.T
    want = ((pq[:, None] - pg[None]) ** 2).sum(-1)
    got = np.asarray(steering.steered_distances(fq, fg, w, ignore))
    np.testing.assert_allclose(got, want, atol=2e-5)
    one = np.asarray(steering.steered_distances(fq[2], steering.prepare_gallery(fg, w), w, ignore))
    np.testing.assert_allclose(one, want[2], atol=2e-5)
    vmapped = jax.vmap(lambda q: steering.steered_distances(q, fg, w, ignore))(fq)
    np.testing.assert_allclose(vmapped, want, atol=2e-5)
    if not names:  # nothing ignored: the plain distance of reid_jax.retrieval
        np.testing.assert_allclose(got, retrieval.squared_distances(fq, fg), atol=1e-6)
    assert np.all(got <= ((fq[:, None] - fg[None]) ** 2).sum(-1) + 1e-5)


def test_attribute_filter_is_exact():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(200, A)).astype(np.float32)
    x[0, 0] = 0.5  # exactly 0.5 passes neither present nor absent
    require, forbid = mask("backpack", "hat"), mask("gender")
    got = np.asarray(steering.attribute_filter(x, require, forbid))
    want = (x[:, require] > 0.5).all(1) & (x[:, forbid] < 0.5).all(1)
    np.testing.assert_array_equal(got, want)
    assert not steering.attribute_filter(x, mask("backpack"), mask())[0]
    assert not steering.attribute_filter(x, mask(), mask("backpack"))[0]
    assert np.asarray(steering.attribute_filter(x, mask(), mask())).all()


@pytest.mark.parametrize("complete", [False, True])
@pytest.mark.parametrize("names", IGNORES)
def test_steer_ranking_against_numpy(data, names, complete):
    fq, fg, w = data
    ignore = mask(*names)
    rng = np.random.default_rng(2)
    keep = rng.uniform(size=G) < 0.6
    keep[[3, 7]] = True
    k, t = 12, 0.3
    p = ref_projection(w, ignore)
    gallery = steering.prepare_gallery(fg, w)
    for i in range(len(fq)):
        got = steering.steer_ranking(fq[i], gallery, w, ignore=ignore, keep=keep, k=k,
                                     threshold=t, complete=complete)
        pq, pg = fq[i].astype(np.float64) @ p.T, fg.astype(np.float64) @ p.T
        d = ((pq[None] - pg) ** 2).sum(-1)
        kept = np.flatnonzero(keep)
        want = kept[np.argsort(d[kept], kind="stable")[:k]]
        np.testing.assert_array_equal(got.indices, want)
        np.testing.assert_allclose(got.distances, d[want], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.errors, ref_errors(pq, pg[want], w, complete),
                                   rtol=1e-4, atol=1e-5)
        if complete:  # sums to the steered distance
            np.testing.assert_allclose(got.errors.sum(1), d[want], rtol=1e-5, atol=1e-6)
        xq = sigmoid(fq[i].astype(np.float64) @ w)  # probabilities of the unprojected ones
        xg = sigmoid(fg[want].astype(np.float64) @ w)
        np.testing.assert_allclose(got.attributes_query, xq, atol=1e-6)
        np.testing.assert_allclose(got.attributes_gallery, xg, atol=1e-6)
        np.testing.assert_array_equal(got.selected, np.abs(xq - 0.5) > t)
        np.testing.assert_allclose(got.scores, (1 - np.abs(xq - xg)) / (0.5 + np.abs(xq - 0.5)),
                                   atol=1e-5)
        np.testing.assert_allclose(got.steered_distances, d, atol=2e-5)
        np.testing.assert_allclose(got.plain_distances,
                                   ((fq[i].astype(np.float64) - fg) ** 2).sum(-1), atol=2e-5)
    if 3 in want and 7 in want:  # the duplicate pair: lower index first
        assert list(want).index(3) < list(want).index(7)


def test_steer_ranking_requires_exactly(data):
    fq, fg, w = data
    x = sigmoid(fg.astype(np.float64) @ w)
    require, forbid = mask("backpack"), mask("hat", "gender")
    keep = np.asarray(steering.attribute_filter(x.astype(np.float32), require, forbid))
    assert 0 < keep.sum() < G
    got = steering.steer_ranking(fq[0], fg, w, ignore=mask(), keep=keep, k=G)
    assert len(got.indices) == keep.sum()  # every kept image, no other
    assert set(got.indices) == set(np.flatnonzero(keep))
    assert (x[got.indices][:, require] > 0.5).all()
    assert (x[got.indices][:, forbid] < 0.5).all()
    few = steering.steer_ranking(fq[0], fg, w, ignore=mask(), keep=np.arange(G) < 3, k=G)
    assert len(few.indices) == 3 and few.errors.shape == (3, A) and few.scores.shape == (3, A)
    none = steering.steer_ranking(fq[0], fg, w, ignore=mask(), keep=np.zeros(G, bool), k=G)
    assert none.indices.shape == (0,) and none.scores.shape == (0, A)


def test_bad_shapes_and_names_are_named(data):
    fq, fg, w = data
    with pytest.raises(ValueError, match=r"ignore must be bool \[A=30\]"):
        steering.ignore_basis(w, np.zeros(5, bool))
    with pytest.raises(ValueError, match=r"weights must be \[N, A\]"):
        steering.ignore_basis(w[:, 0], np.zeros(A, bool))
    with pytest.raises(ValueError, match="same N"):
        steering.project(fq, steering.ignore_basis(w[:10], mask("hat")))
    with pytest.raises(ValueError, match="embedding sizes differ"):
        steering.steered_distances(fq[:, :10], fg, w, mask())
    with pytest.raises(ValueError, match=r"f_query must be one embedding \[N\]"):
        steering.steer_ranking(fq, fg, w, ignore=mask())
    with pytest.raises(ValueError, match=r"keep must be bool \[G=70\]"):
        steering.steer_ranking(fq[0], fg, w, ignore=mask(), keep=np.ones(3, bool))
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        steering.steer_ranking(fq[0], fg, w, ignore=mask(), k=0)
    with pytest.raises(ValueError, match=r"threshold must lie in \[0, 0.5\)"):
        steering.steer_ranking(fq[0], fg, w, ignore=mask(), threshold=0.5)
    with pytest.raises(ValueError, match=r"forbid must be bool \[A=30\]"):
        steering.attribute_filter(np.zeros((4, A)), mask(), np.zeros(3, bool))
    with pytest.raises(ValueError, match="prepare it with these weights"):
        steering.steer_ranking(fq[0], steering.prepare_gallery(fg, w[:, :5]), w, ignore=mask())
    with pytest.raises(ValueError, match="other ignored attributes"):
        steering.steer_ranking(fq[0], fg, w, ignore=mask("hat"),
                               projection=steering.ignore_projection(w, mask("bag")))
    with pytest.raises(ValueError, match="the gallery is empty"):
        steering.prepare_gallery(fg[:0], w)


def test_parse_steering():
    s = steering.parse_steering(ignore=["upblack", "upwhite"], require=["backpack"],
                                forbid=["hat"])
    assert s.active and s.filters
    assert s.names() == {"ignore": ["upblack", "upwhite"], "require": ["backpack"],
                         "forbid": ["hat"]}
    assert not steering.no_steering().active
    with pytest.raises(ValueError, match=r"ignore: unknown attribute 'upblak'; did you mean "
                                         r"upblack"):
        steering.parse_steering(ignore=["upblak"])
    with pytest.raises(ValueError, match=r"cannot be both present and absent"):
        steering.parse_steering(require=["hat"], forbid=["hat"])


def test_jit_compiles_once_per_candidate_count(data):
    fq, fg, w = data
    gallery = steering.prepare_gallery(fg, w)
    steering.steer_ranking(fq[0], gallery, w, ignore=mask("hat"), k=12)
    size = steering._candidates._cache_size()
    for names in IGNORES:  # another mask, query or filter: no new compile
        steering.steer_ranking(fq[1], gallery, w, ignore=mask(*names), keep=np.arange(G) > 4,
                               k=12)
        kept = steering.ignore_projection(w, mask(*names))  # a kept projection: same answer
        a = steering.steer_ranking(fq[2], gallery, w, ignore=mask(*names), k=12)
        b = steering.steer_ranking(fq[2], gallery, w, ignore=mask(*names), k=12,
                                   projection=kept)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.distances, b.distances)
    assert steering._candidates._cache_size() == size
    assert isinstance(steering.steered_distances(jnp.asarray(fq[0]), fg, w, mask()), jax.Array)
