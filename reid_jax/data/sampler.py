"""P x K identity sampler (AGW / ReID-Survey ``RandomIdentitySampler``).

Every training batch holds ``P`` distinct identities with ``K`` images each (P=16, K=4 in AGW,
so batches of 64), which the batch-hard / weighted-regularised triplet loss needs.

One epoch, as the reference builds it (``data/triplet_sampler.py`` of ReID-Survey, the same
algorithm as torchreid):

1. For each identity, its image indices are shuffled and cut into chunks of ``K``; a
   remainder shorter than ``K`` is dropped. An identity with fewer than ``K`` images is first
   drawn ``K`` times *with replacement*, giving exactly one chunk.
2. While at least ``P`` identities still have chunks left, ``P`` distinct identities are drawn
   uniformly among them and each gives its next chunk; together they form one batch
   ``[id_1 x K, id_2 x K, ..., id_P x K]``. Chunks of the last fewer-than-``P`` identities are
   left unused.

So the number of batches of an epoch varies a little from epoch to epoch (it depends on the
order identities run out). It is never more than ``len(sampler)`` =
``floor(sum_i max(n_i, K) // K / P)``, the reference's own estimate, and :meth:`num_batches`
gives the exact count of any epoch. Training is indexed by a *global step*:
:meth:`RandomIdentitySampler.locate` maps a step to ``(epoch, batch within epoch)`` so a
restarted run continues with exactly the batches an uninterrupted run would have seen.

Randomness: Python's ``random`` in the reference; here ``numpy.random.Generator`` seeded by
``SeedSequence([seed, epoch])``, so an epoch is a pure function of ``(labels, P, K, seed,
epoch)``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

# Distinguishes the sampler's random stream from other streams derived from the same seed.
_SAMPLER_STREAM = 0x5A4D


def _check_args(labels: np.ndarray | Sequence[int], p: int, k: int) -> np.ndarray:
    """Validates sampler arguments; returns ``labels`` as a 1-D int64 array."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [num_images], got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError("labels is empty: the P x K sampler needs at least one image")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers (identity labels), got dtype {labels.dtype}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (images per identity) must be an integer >= 1, got {k!r}")
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1:
        raise ValueError(f"p (identities per batch) must be an integer >= 1, got {p!r}")
    num_ids = np.unique(labels).size
    if p > num_ids:
        raise ValueError(
            f"p={p} identities per batch but labels hold only {num_ids} distinct identities"
        )
    return labels.astype(np.int64)


def _index_groups(labels: np.ndarray) -> list[np.ndarray]:
    """Image indices of each identity, identities in ascending label order.

    Args:
      labels: int [N] identity of each image.

    Returns:
      One int64 array of indices (ascending) per distinct label.
    """
    order = np.argsort(labels, kind="stable")
    _, starts = np.unique(labels[order], return_index=True)
    return np.split(order, starts[1:])


def pk_batches(
    labels: np.ndarray | Sequence[int],
    p: int = 16,
    k: int = 4,
    *,
    seed: int,
    epoch: int,
) -> np.ndarray:
    """The P x K batches of one epoch (the reference ``RandomIdentitySampler``).

    Args:
      labels: int [N] identity label of each training image (any integers; the train labels
        relabelled 0..C-1 or the raw pids).
      p: identities per batch.
      k: images per identity in a batch.
      seed: the run's seed.
      epoch: epoch number (>= 0); each epoch is shuffled differently.

    Returns:
      int32 [num_batches, p * k] indices into ``labels``; row ``b`` is batch ``b``, its
      images grouped by identity (``k`` consecutive entries per identity, ``p`` distinct
      identities). ``num_batches >= 1``: every identity has at least one chunk.

    Raises:
      ValueError: ``labels`` not a non-empty 1-D integer array, ``k < 1``, ``p < 1``,
        ``p`` larger than the number of identities, or a negative ``epoch``.
    """
    labels = _check_args(labels, p, k)
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    rng = np.random.default_rng(np.random.SeedSequence([_SAMPLER_STREAM, seed, epoch]))

    chunks: list[list[np.ndarray]] = []
    for idxs in _index_groups(labels):
        if idxs.size < k:
            idxs = rng.choice(idxs, size=k, replace=True)
        else:
            idxs = rng.permutation(idxs)
        n_chunks = idxs.size // k
        # Reversed so that list.pop() hands out chunks in order.
        chunks.append([idxs[c * k : (c + 1) * k] for c in range(n_chunks)][::-1])

    available = list(range(len(chunks)))  # identities that still have chunks
    batches = []
    while len(available) >= p:
        picked = rng.choice(len(available), size=p, replace=False)
        ids = [available[i] for i in picked]
        batches.append(np.concatenate([chunks[i].pop() for i in ids]))
        exhausted = {i for i in ids if not chunks[i]}
        if exhausted:
            available = [i for i in available if i not in exhausted]
    return np.stack(batches).astype(np.int32)


class RandomIdentitySampler:
    """P x K sampler over a fixed label array, indexed by epoch or by global step.

    ``len(sampler)`` is the nominal number of batches per epoch,
    ``floor(sum_i max(n_i, K) // K / P)`` over identities ``i`` with ``n_i`` images: an upper
    bound of every epoch's real count (the reference reports the same estimate before its
    first iteration). :meth:`num_batches` is the exact count of one epoch.

    Attributes:
      labels: int64 [N] the identity labels.
      p: identities per batch.
      k: images per identity in a batch.
      seed: the seed every epoch is derived from.
      batch_size: ``p * k``.
    """

    def __init__(
        self, labels: np.ndarray | Sequence[int], p: int = 16, k: int = 4, *, seed: int
    ) -> None:
        self.labels = _check_args(labels, p, k)
        self.p, self.k, self.seed = int(p), int(k), int(seed)
        self.batch_size = self.p * self.k
        chunks = sum(max(g.size, self.k) // self.k for g in _index_groups(self.labels))
        self._nominal = chunks // self.p
        self._cache: dict[int, np.ndarray] = {}
        self._ends: list[int] = []  # _ends[e] = total batches in epochs 0..e

    def __len__(self) -> int:
        return self._nominal

    def __repr__(self) -> str:
        return (
            f"RandomIdentitySampler(num_images={self.labels.size}, p={self.p}, k={self.k}, "
            f"seed={self.seed}, nominal_batches_per_epoch={self._nominal})"
        )

    def epoch(self, epoch: int) -> np.ndarray:
        """int32 [num_batches(epoch), P*K] the batches of ``epoch`` (see :func:`pk_batches`)."""
        if epoch not in self._cache:
            if len(self._cache) >= 4:  # a few epochs are enough for sequential use
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = pk_batches(
                self.labels, self.p, self.k, seed=self.seed, epoch=epoch
            )
        return self._cache[epoch]

    def num_batches(self, epoch: int) -> int:
        """Exact number of batches of ``epoch`` (<= ``len(self)``)."""
        return int(self.epoch(epoch).shape[0])

    def locate(self, step: int) -> tuple[int, int]:
        """Maps a global step (0-based batch counter over epochs 0, 1, ...) to its position.

        Args:
          step: number of batches consumed before this one, over all epochs.

        Returns:
          ``(epoch, batch)``: the step's batch is ``self.epoch(epoch)[batch]``.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        while not self._ends or self._ends[-1] <= step:
            count = self.num_batches(len(self._ends))
            self._ends.append((self._ends[-1] if self._ends else 0) + count)
        epoch = bisect.bisect_right(self._ends, step)
        start = self._ends[epoch - 1] if epoch else 0
        return epoch, step - start

    def batch(self, step: int) -> np.ndarray:
        """int32 [P*K] the indices of global step ``step``."""
        epoch, b = self.locate(step)
        return self.epoch(epoch)[b]
