"""Baselines an explanation must beat: what is known about a pair without its images.

An explanation ranks the attributes of a pair by how much they separate the two persons.  Some
attributes differ between two persons far more often than others, so a *fixed* order — the
same for every pair — already ranks truly differing attributes well, and a constant score per
attribute already separates agreeing from differing labels in a pooled AUROC.  An explanation
explains the pair only where it beats these baselines (``docs/design.md``, "Baselines").

* :func:`difference_rates` — per attribute, the fraction of pairs of distinct training
  identities whose labels differ: the prior of a random pair (the all-pairs scope).
* :func:`neighbour_difference_rates` — the same over pairs of training images that the model
  ranks among each other's ``k`` nearest images of other identities: the prior of a pair that
  the model ranks near the query (the top-``k`` scope and the counterfactual pairs).
* :func:`training_prior` — both, from a training split's labels (and embeddings).

Both are conditional difference rates given what is known without the pair's images: how the
pair was chosen.  They use the training split only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from reid_jax import retrieval


def _labels(name: str, labels: Any) -> np.ndarray:
    a = np.asarray(labels)
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"{name} must have shape [n, A], got {a.shape}")
    if a.dtype != bool:
        if not np.issubdtype(a.dtype, np.number) or not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must be boolean or 0/1")
        a = a.astype(bool)
    return a


def difference_rates(identity_labels: Any) -> np.ndarray:
    """Per attribute, the fraction of pairs of distinct identities whose labels differ.

    Args:
      identity_labels: ``[n, A]`` labels in {0, 1}, one row per identity (``n >= 2``).

    Returns:
      float64 ``[A]``: ``2 n_1 n_0 / (n (n - 1))`` with ``n_1`` identities showing the
      attribute — ``2 p (1 - p)`` without the finite-sample bias.
    """
    lab = _labels("identity_labels", identity_labels)
    n = lab.shape[0]
    if n < 2:
        raise ValueError(f"difference rates need at least 2 identities, got {n}")
    ones = lab.sum(axis=0).astype(np.float64)
    return 2.0 * ones * (n - ones) / (n * (n - 1.0))


def neighbour_difference_rates(features: Any, pids: Any, labels: Any, k: int,
                               *, chunk: int = 512) -> np.ndarray:
    """Per attribute, how often an image and one of its ``k`` nearest images of *other*
    identities differ in their labels.

    Args:
      features: ``[n, N]`` embeddings of the training images (the ranked tensor).
      pids: int ``[n]`` identities.
      labels: ``[n, A]`` labels in {0, 1} of every image (its identity's).
      k: neighbours per image, ``>= 1`` (fewer when an image has fewer other-identity images).
      chunk: images per block of the distance matrix.

    Returns:
      float64 ``[A]``: the difference rate over all (image, neighbour) pairs.  Ties in the
      distance are broken by the lower index, as in every ranking (``reid_jax.retrieval``).
    """
    f = np.asarray(features, np.float32)
    p = np.asarray(pids)
    lab = _labels("labels", labels)
    n = f.shape[0] if f.ndim == 2 else -1
    if f.ndim != 2 or p.shape != (n,) or lab.shape[0] != n:
        raise ValueError(f"features [n, N], pids [n] and labels [n, A] must share n, got "
                         f"{f.shape}, {p.shape}, {lab.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if np.unique(p).size < 2:
        raise ValueError("neighbour difference rates need images of at least 2 identities")
    differ = np.zeros(lab.shape[1], np.float64)
    count = 0
    for start, stop, d in retrieval.distance_chunks(f, f, chunk):
        d = np.where(p[start:stop, None] == p[None, :], np.inf, d)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        ok = np.isfinite(np.take_along_axis(d, order, axis=1))
        pairs = lab[start:stop, None, :] != lab[order]
        differ += np.sum(pairs & ok[..., None], axis=(0, 1))
        count += int(ok.sum())
    return differ / count


@dataclasses.dataclass(frozen=True)
class TrainingPrior:
    """The fixed attribute orders of a training split.

    Attributes:
      all_pairs: ``[A]`` difference rates of distinct training identities
        (:func:`difference_rates`): the separation of the ``prior`` explanation of a random
        pair, and ``1 - all_pairs`` the constant matching score of the AUROC baseline.
      neighbours: ``[A]`` difference rates of nearest-neighbour training images
        (:func:`neighbour_difference_rates`): the ``prior`` of a top-``k`` pair; ``None``
        without training embeddings (then ``all_pairs`` serves there too).
      k: the neighbours per image of ``neighbours``.
      num_identities, num_images: the training identities and images used.
    """

    all_pairs: np.ndarray
    neighbours: np.ndarray | None
    k: int
    num_identities: int
    num_images: int

    @property
    def agreement(self) -> np.ndarray:
        """``[A]`` how often two distinct training identities agree: the constant score."""
        return 1.0 - self.all_pairs

    @property
    def ranked(self) -> np.ndarray:
        """``[A]`` the prior of a pair the model ranks near the query."""
        return self.all_pairs if self.neighbours is None else self.neighbours

    def json(self, names: Any) -> dict[str, Any]:
        """A JSON-ready description (per-attribute lists in the order of ``names``)."""
        return {
            "all_pairs": [float(v) for v in self.all_pairs],
            "neighbours": None if self.neighbours is None else [float(v)
                                                                for v in self.neighbours],
            "agreement": [float(v) for v in self.agreement],
            "k": int(self.k),
            "num_identities": int(self.num_identities),
            "num_images": int(self.num_images),
            "attribute_order_all_pairs": [str(names[i]) for i in
                                          np.argsort(-self.all_pairs, kind="stable")],
            "attribute_order_neighbours": [str(names[i]) for i in
                                           np.argsort(-self.ranked, kind="stable")],
        }


def training_prior(identity_labels: Any, *, features: Any | None = None,
                   pids: Any | None = None, image_labels: Any | None = None,
                   k: int = 10) -> TrainingPrior:
    """The prior of a training split: identity labels, and (optionally) the training images'
    embeddings with their pids and labels for the neighbour rates."""
    lab = _labels("identity_labels", identity_labels)
    rates = difference_rates(lab)
    neighbours = None
    num_images = 0
    if features is not None:
        if pids is None or image_labels is None:
            raise ValueError("features need pids and image_labels")
        neighbours = neighbour_difference_rates(features, pids, image_labels, k)
        num_images = int(np.shape(features)[0])
        if neighbours.shape != rates.shape:
            raise ValueError(f"image_labels have {neighbours.shape[0]} attributes, "
                             f"identity_labels {rates.shape[0]}")
    return TrainingPrior(rates, neighbours, int(k), int(lab.shape[0]), num_images)


__all__ = ["TrainingPrior", "difference_rates", "neighbour_difference_rates", "training_prior"]
