"""Tests of the P x K identity sampler (reid_jax/data/sampler.py).

The distribution tests compare epochs of ours with epochs of ReID-Survey's
``RandomIdentitySampler`` (re-implemented below from its source, with its own random streams):
batches per epoch and each identity's and image's share of an epoch. Tolerances are stated
in standard errors of the difference over ``EPOCHS`` epochs; seeds are fixed, so the tests are
deterministic.
"""

import collections
import copy
import random

import numpy as np
import pytest

from reid_jax.data.sampler import RandomIdentitySampler, pk_batches


def _labels(counts, ids=None):
    """int [sum(counts)] labels, identity ids[i] repeated counts[i] times, interleaved order."""
    ids = np.arange(len(counts)) if ids is None else np.asarray(ids)
    labels = np.repeat(ids, counts)
    return labels[np.random.default_rng(123).permutation(labels.size)]


def _check_pk(batches, labels, p, k):
    assert batches.dtype == np.int32
    assert batches.ndim == 2 and batches.shape[1] == p * k
    for batch in batches:
        groups = labels[batch].reshape(p, k)
        assert (groups == groups[:, :1]).all(), "each K-group must be one identity"
        assert np.unique(groups[:, 0]).size == p, "P distinct identities per batch"


def test_every_batch_is_p_ids_times_k_images():
    labels = _labels(np.random.default_rng(0).integers(1, 15, size=40))
    for epoch in range(3):
        batches = pk_batches(labels, p=8, k=4, seed=1, epoch=epoch)
        assert batches.shape[0] >= 1
        _check_pk(batches, labels, 8, 4)


def test_epoch_covers_nearly_all_images_without_repeats():
    # 30 ids x 8 images, K=4: 60 chunks. Ids with >= K images never repeat an index.
    labels = _labels([8] * 30)
    batches = pk_batches(labels, p=6, k=4, seed=0, epoch=0)
    flat = batches.ravel()
    assert np.unique(flat).size == flat.size, "an index repeated within an epoch"
    assert flat.size / labels.size >= 0.8  # only the last < P identities' chunks are left
    assert batches.shape[0] <= 60 // 6


def test_remainders_are_dropped_and_small_ids_drawn_with_replacement():
    # id 0: 6 images -> one chunk of 4 (2 dropped); id 1: 1 image -> drawn 4 times.
    labels = np.array([0] * 6 + [1] + [2] * 4 + [3] * 4)
    seen = {i: [] for i in range(4)}
    for epoch in range(20):
        batches = pk_batches(labels, p=4, k=4, seed=0, epoch=epoch)
        assert batches.shape == (1, 16)
        _check_pk(batches, labels, 4, 4)
        for group in batches[0].reshape(4, 4):
            seen[int(labels[group[0]])].append(group)
    assert all(np.array_equal(g, [6, 6, 6, 6]) for g in seen[1])
    assert all(np.unique(g).size == 4 for g in seen[0])  # no repeats for id 0
    # Over epochs, every one of id 0's 6 images is used at some point.
    assert set(np.concatenate(seen[0]).tolist()) == set(range(6))


def test_with_replacement_for_ids_between_one_and_k_images():
    labels = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    counts = np.zeros(2, int)
    for epoch in range(50):
        group = pk_batches(labels, p=3, k=4, seed=3, epoch=epoch)[0].reshape(3, 4)
        group = group[labels[group[:, 0]] == 0][0]
        assert set(group.tolist()) <= {0, 1}
        counts += np.bincount(group, minlength=2)
    assert counts.min() > 50  # both images drawn, ~100 each over 200 draws


def test_deterministic_given_seed_and_epoch():
    labels = _labels([5, 9, 4, 12, 7, 4, 6, 8])
    a = pk_batches(labels, p=4, k=4, seed=7, epoch=2)
    b = pk_batches(labels.copy(), p=4, k=4, seed=7, epoch=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, pk_batches(labels, p=4, k=4, seed=7, epoch=3))
    assert not np.array_equal(a, pk_batches(labels, p=4, k=4, seed=8, epoch=2))


def test_arbitrary_label_values():
    labels = _labels([4, 5, 8, 4], ids=[1500, 2, -1, 77])
    batches = pk_batches(labels, p=2, k=4, seed=0, epoch=0)
    _check_pk(batches, labels, 2, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": [0, 1, 2], "p": 4, "k": 1}, r"p=4 identities per batch but labels hold only 3"),
        ({"labels": [0, 1, 2], "p": 2, "k": 0}, r"k \(images per identity\) must be"),
        ({"labels": [0, 1, 2], "p": 0, "k": 2}, r"p \(identities per batch\) must be an integer"),
        ({"labels": [[0, 1]], "p": 1, "k": 1}, r"labels must be 1-D \[num_images\], got shape"),
        ({"labels": [0.0, 1.0], "p": 1, "k": 1}, r"labels must be integers"),
        ({"labels": np.zeros(0, int), "p": 1, "k": 1}, r"labels is empty"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pk_batches(**kwargs, seed=0, epoch=0)
    with pytest.raises(ValueError, match=match):
        RandomIdentitySampler(**kwargs, seed=0)


def test_negative_epoch_and_step():
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        pk_batches([0, 1], p=1, k=1, seed=0, epoch=-1)
    with pytest.raises(ValueError, match="step must be >= 0"):
        RandomIdentitySampler([0, 1], p=1, k=1, seed=0).locate(-1)


def test_len_is_upper_bound_and_steps_walk_epochs_in_order():
    counts = np.random.default_rng(5).integers(1, 20, size=25)
    labels = _labels(counts)
    sampler = RandomIdentitySampler(labels, p=4, k=4, seed=11)
    assert len(sampler) == sum(max(c, 4) // 4 for c in counts) // 4
    epochs = [sampler.epoch(e) for e in range(4)]
    for e, batches in enumerate(epochs):
        np.testing.assert_array_equal(batches, pk_batches(labels, 4, 4, seed=11, epoch=e))
        assert 1 <= sampler.num_batches(e) <= len(sampler)
    stream = np.concatenate(epochs)
    # A fresh sampler (as after a restart) indexes the same stream by global step.
    fresh = RandomIdentitySampler(labels, p=4, k=4, seed=11)
    for step in [0, 1, epochs[0].shape[0] - 1, epochs[0].shape[0], stream.shape[0] - 1, 7]:
        np.testing.assert_array_equal(fresh.batch(step), stream[step])
    n0 = epochs[0].shape[0]
    assert fresh.locate(0) == (0, 0)
    assert fresh.locate(n0 - 1) == (0, n0 - 1)
    assert fresh.locate(n0) == (1, 0)
    assert fresh.locate(n0 + epochs[1].shape[0] + 2) == (2, 2)


# ------------------------------------------------- distribution against the reference sampler


def _reference_epoch(labels, p, k, rnd: random.Random, np_rnd: np.random.RandomState):
    """ReID-Survey ``RandomIdentitySampler.__iter__`` (data/samplers/triplet_sampler.py), as
    written there: Python's ``random`` for shuffles and identity draws, numpy for the
    with-replacement draw of identities with fewer than K images. Returns the image indices
    of one epoch (a multiple of P * K long)."""
    index_dic = collections.defaultdict(list)
    for index, pid in enumerate(labels):
        index_dic[int(pid)].append(index)
    pids = list(index_dic.keys())
    batch_idxs_dict = collections.defaultdict(list)
    for pid in pids:
        idxs = copy.deepcopy(index_dic[pid])
        if len(idxs) < k:
            idxs = [int(i) for i in np_rnd.choice(idxs, size=k, replace=True)]
        rnd.shuffle(idxs)
        batch_idxs = []
        for idx in idxs:
            batch_idxs.append(idx)
            if len(batch_idxs) == k:
                batch_idxs_dict[pid].append(batch_idxs)
                batch_idxs = []
    avai_pids = copy.deepcopy(pids)
    final_idxs = []
    while len(avai_pids) >= p:
        selected_pids = rnd.sample(avai_pids, p)
        for pid in selected_pids:
            batch_idxs = batch_idxs_dict[pid].pop(0)
            final_idxs.extend(batch_idxs)
            if len(batch_idxs_dict[pid]) == 0:
                avai_pids.remove(pid)
    return final_idxs


def _reference_length(labels, k):
    """The reference's ``__len__`` before its first epoch: images, sum of max(n, K) - remainder."""
    length = 0
    for n in np.unique(labels, return_counts=True)[1]:
        num = max(int(n), k)
        length += num - num % k
    return length


# Market-1501-like skew: a few identities under K images, many with remainders, some large.
SKEWED_COUNTS = np.random.default_rng(7).integers(1, 30, size=40)
EPOCHS = 400


@pytest.fixture(scope="module")
def epochs_both():
    """EPOCHS epochs of ours (seeded epochs 0..) and of the reference (seeded Random(e))."""
    labels = _labels(SKEWED_COUNTS)
    p, k = 6, 4
    ours = [pk_batches(labels, p, k, seed=3, epoch=e).ravel() for e in range(EPOCHS)]
    theirs = [np.asarray(_reference_epoch(labels, p, k, random.Random(e),
                                          np.random.RandomState(e))) for e in range(EPOCHS)]
    return labels, p, k, ours, theirs


def test_epoch_length_distribution_matches_the_reference(epochs_both):
    labels, p, k, ours, theirs = epochs_both
    ours_len = np.array([idx.size // (p * k) for idx in ours])
    ref_len = np.array([len(idx) // (p * k) for idx in theirs])
    assert all(len(idx) % (p * k) == 0 for idx in theirs)
    # Same distribution of batches per epoch: means within 5 standard errors of the difference
    # (deterministic seeds; a different identity draw, e.g. weighted by chunks left, moves the
    # mean by many standard errors), and the same range of lengths.
    se = np.sqrt(ours_len.var() / EPOCHS + ref_len.var() / EPOCHS)
    assert abs(ours_len.mean() - ref_len.mean()) <= 5 * se, (ours_len.mean(), ref_len.mean())
    assert abs(ours_len.std() - ref_len.std()) <= 0.25 * ref_len.std() + 1e-9
    assert ref_len.std() > 0  # the length does vary: the comparison is not of constants
    # The nominal length: the reference's image estimate in whole batches, an upper bound.
    nominal = RandomIdentitySampler(labels, p, k, seed=3)
    assert len(nominal) == _reference_length(labels, k) // (p * k)
    assert ours_len.max() <= len(nominal) and ref_len.max() <= len(nominal)


def test_identity_and_image_coverage_match_the_reference(epochs_both):
    labels, p, k, ours, theirs = epochs_both
    ids = np.unique(labels)

    def chunks_per_epoch(epochs):  # [EPOCHS, ids]: chunks of K images each identity gave
        return np.stack([np.bincount(np.searchsorted(ids, labels[idx]), minlength=ids.size) // k
                         for idx in epochs])

    ours_c, ref_c = chunks_per_epoch(ours), chunks_per_epoch(theirs)
    available = np.maximum(np.bincount(np.searchsorted(ids, labels)), k) // k
    assert (ours_c <= available).all() and (ref_c <= available).all()
    se = np.sqrt(ours_c.var(0) / EPOCHS + ref_c.var(0) / EPOCHS) + 1e-12
    z = np.abs(ours_c.mean(0) - ref_c.mean(0)) / se
    assert z.max() <= 5, (z.max(), ours_c.mean(0), ref_c.mean(0))
    # Fraction of an epoch's available chunks used: the same on both sides.
    used_ours, used_ref = ours_c.sum(1) / available.sum(), ref_c.sum(1) / available.sum()
    assert abs(used_ours.mean() - used_ref.mean()) <= 5 * np.sqrt(
        used_ours.var() / EPOCHS + used_ref.var() / EPOCHS)
    # Within an identity every image is used equally often (shuffled chunks, remainder
    # dropped at random; with replacement below K).
    uses = np.bincount(np.concatenate(ours), minlength=labels.size).astype(float)
    for pid in ids:
        members = np.flatnonzero(labels == pid)
        if members.size >= 2:
            counts = uses[members]
            expected = counts.mean()
            chi2 = ((counts - expected) ** 2 / expected).sum()
            assert chi2 <= members.size - 1 + 5 * np.sqrt(2 * (members.size - 1)), (pid, counts)
