"""Query-gallery distances and labels shaped like Market-1501's test split, for benchmarks of
the ranking metrics (``tools/bench_rank_metrics.py``, ``tools/bench_explain.py``)."""

from __future__ import annotations

import numpy as np


def market_like_distances(num_query: int, num_gallery: int, seed: int
                          ) -> tuple[np.ndarray, ...]:
    """``(dist [Q, G] float32, query ids [Q], gallery ids [G], query cameras [Q], gallery
    cameras [G])``: 750 identities, a seventh of the gallery junk (id 0) and a fifth distractors
    (id -1), 6 cameras, uniform distances with the true matches scaled by 0.3 (they rank early,
    as with a trained model)."""
    rng = np.random.default_rng(seed)
    q, g = num_query, num_gallery
    ids = np.arange(1, 751)
    qp = rng.choice(ids, q).astype(np.int32)
    gp = np.concatenate([rng.choice(ids, g - g // 7 - g // 5), np.zeros(g // 7, int),
                         np.full(g // 5, -1)]).astype(np.int32)
    qc = rng.integers(1, 7, q).astype(np.int32)
    gc = rng.integers(1, 7, g).astype(np.int32)
    dist = rng.uniform(size=(q, g)).astype(np.float32)
    dist[qp[:, None] == gp[None]] *= 0.3
    return dist, qp, gp, qc, gc


__all__ = ["market_like_distances"]
