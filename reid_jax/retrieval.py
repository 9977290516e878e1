"""Ranking a gallery: the squared distance and the Market-1501 protocol, each written once.

Every stage that ranks a gallery — re-id evaluation, the explanation batch run, the
explanation-quality metrics and the counterfactual benchmark — takes both rules from here, so
they cannot start to disagree (``docs/design.md``, "Ranking and the Market-1501 protocol").

* :func:`squared_distances` — ``|q - g|^2`` as ``|q|^2 + |g|^2 - 2 q.g``, float32 products at
  full precision, clamped at 0. A pure ``jax.numpy`` function: the kernels call it inside their
  own ``jit``; :func:`distance_matrix` is its jitted, query-chunked host form.
* :func:`excluded` — the protocol's rule for one (query, gallery image) pair, broadcasting:
  a gallery image is removed from a query's ranking when it shows the query's identity *from the
  query's camera*, and junk (pid ``-1``) is removed for every query. Distractors (pid ``0``)
  stay: they are never a match. :func:`excluded_mask` applies it to all pairs,
  :func:`kept_in_ranking` to ranked lists, :func:`removed_counts` counts what it removes.
* :func:`first_kept` — the first ``k`` ranks of ranked lists that the protocol keeps.

Ties in a ranking are broken by the lower gallery index (a stable sort) everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reid_jax.data.market1501 import DISTRACTOR_PID, JUNK_PID

# Full float32 products: on accelerators the default would be TF32 / bfloat16 passes.
PRECISION = jax.lax.Precision.HIGHEST


def squared_distances(f_query: jax.Array, f_gallery: jax.Array) -> jax.Array:
    """Squared Euclidean distances ``[Q, G]`` of ``f_query [Q, N]`` and ``f_gallery [G, N]``.

    GEMM form ``|q|^2 + |g|^2 - 2 q.g`` at ``Precision.HIGHEST``, clamped at 0 (rounding can
    make it slightly negative for near-duplicates). Pure ``jax.numpy``: usable inside ``jit``.
    """
    q2 = jnp.sum(jnp.square(f_query), axis=-1)
    g2 = jnp.sum(jnp.square(f_gallery), axis=-1)
    qg = jnp.matmul(f_gallery, f_query.T, precision=PRECISION).T
    return jnp.maximum(q2[:, None] + g2[None, :] - 2.0 * qg, 0.0)


_squared_distances_jit = jax.jit(squared_distances)


def padded_chunks(x: np.ndarray, chunk: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(start, stop, rows)`` over the rows of ``x``; every ``rows`` has ``chunk`` rows (the last
    is padded with copies of its first row) when ``x`` has more than ``chunk``, so a jitted
    function compiles once."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    for start in range(0, x.shape[0], chunk):
        stop = min(start + chunk, x.shape[0])
        rows = x[start:stop]
        if stop - start < chunk and x.shape[0] > chunk:
            rows = np.concatenate([rows, np.repeat(rows[:1], chunk - (stop - start), axis=0)])
        yield start, stop, rows


def distance_chunks(f_query: Any, f_gallery: Any, chunk: int = 256
                    ) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(start, stop, d)`` with ``d`` float32 ``[stop - start, G]`` :func:`squared_distances`
    of query rows ``start:stop``; memory is a few ``[chunk, G]`` arrays."""
    fq = np.asarray(f_query, np.float32)
    fg = jnp.asarray(f_gallery, jnp.float32)
    if fq.ndim != 2 or fg.ndim != 2 or fq.shape[1] != fg.shape[1]:
        raise ValueError(f"embeddings must be f_query [Q, N] and f_gallery [G, N] with the same "
                         f"N, got {fq.shape} and {tuple(fg.shape)}")
    for start, stop, rows in padded_chunks(fq, chunk):
        d = np.asarray(_squared_distances_jit(jnp.asarray(rows), fg))
        yield start, stop, d[: stop - start]


def distance_matrix(f_query: Any, f_gallery: Any, chunk: int = 1024) -> np.ndarray:
    """float32 ``[Q, G]`` :func:`squared_distances`, computed in query chunks on the device."""
    fq = np.asarray(f_query, np.float32)
    out = np.empty((fq.shape[0], np.shape(f_gallery)[0]), np.float32)
    for start, stop, d in distance_chunks(fq, f_gallery, chunk):
        out[start:stop] = d
    return out


# ---------------------------------------------------------------------------------------------
# The Market-1501 protocol.


def excluded(query_pid: Any, query_cam: Any, gallery_pid: Any, gallery_cam: Any) -> Any:
    """The protocol's rule, elementwise with broadcasting: True where the gallery image is
    removed from the query's ranking (same identity *and* same camera as the query, or junk)."""
    return (((gallery_pid == query_pid) & (gallery_cam == query_cam))
            | excluded_for_every_query(gallery_pid))


def excluded_for_every_query(gallery_pid: Any) -> Any:
    """The part of :func:`excluded` that does not depend on the query: junk (pid ``-1``).

    Whatever else a gallery image is removed for needs the query's identity, so an image kept by
    this one is removed from a query's ranking only if it has the query's pid (a ranking code
    may drop these columns once and test the same-pid pairs with :func:`excluded`)."""
    return gallery_pid == JUNK_PID


def check_ids(query_pids: Any, query_cams: Any, gallery_pids: Any, gallery_cams: Any,
              num_queries: int | None = None, num_gallery: int | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four id arrays as int64 ``[Q]``, ``[Q]``, ``[G]``, ``[G]``; a ``ValueError`` naming
    the one with the wrong shape or dtype."""
    arrays = [np.asarray(x) for x in (query_pids, query_cams, gallery_pids, gallery_cams)]
    q = arrays[0].shape[0] if num_queries is None and arrays[0].ndim == 1 else num_queries
    g = arrays[2].shape[0] if num_gallery is None and arrays[2].ndim == 1 else num_gallery
    names = ("query_pids", "query_cams", "gallery_pids", "gallery_cams")
    for name, x, n in zip(names, arrays, (q, q, g, g), strict=True):
        if x.shape != (n,) or (x.size and not np.issubdtype(x.dtype, np.integer)):
            side = "query" if name.startswith("query") else "gallery"
            raise ValueError(f"{name} must be integer [{n}] (one per {side} image), got "
                             f"{x.dtype}{list(x.shape)}")
    return tuple(x.astype(np.int64, copy=False) for x in arrays)  # type: ignore[return-value]


def excluded_mask(query_pids: Any, query_cams: Any, gallery_pids: Any, gallery_cams: Any
                  ) -> np.ndarray:
    """bool ``[Q, G]``: :func:`excluded` for every query/gallery pair."""
    qp, qc, gp, gc = check_ids(query_pids, query_cams, gallery_pids, gallery_cams)
    return excluded(qp[:, None], qc[:, None], gp[None, :], gc[None, :])


def kept_in_ranking(indices: Any, query_pids: Any, query_cams: Any, gallery_pids: Any,
                    gallery_cams: Any) -> np.ndarray:
    """bool ``[Q, K]``: which gallery images of the ranked lists ``indices [Q, K]`` the protocol
    keeps (not :func:`excluded`)."""
    qp, qc, gp, gc = check_ids(query_pids, query_cams, gallery_pids, gallery_cams)
    idx = np.asarray(indices)
    if idx.ndim != 2 or idx.shape[0] != qp.size:
        raise ValueError(f"indices must have shape [Q={qp.size}, K], got {idx.shape}")
    return ~excluded(qp[:, None], qc[:, None], gp[idx], gc[idx])


def removed_counts(query_pids: Any, query_cams: Any, gallery_pids: Any,
                   gallery_cams: Any) -> np.ndarray:
    """int64 ``[Q]``: how many gallery images the protocol removes from each query's ranking.

    A ranking of the best ``k + max(removed_counts)`` images keeps at least ``k`` (or all there
    are) once they are removed: the fetch size of every top-``k`` pass. For a junk query the
    junk of its own camera is counted twice (an upper bound, all a fetch size needs).
    """
    qp, qc, gp, gc = check_ids(query_pids, query_cams, gallery_pids, gallery_cams)
    if gp.size == 0:
        return np.zeros(qp.shape, np.int64)
    cams = np.concatenate([qc, gc])
    low, span = int(cams.min()), int(cams.max() - cams.min()) + 1
    key = lambda p, c: p * span + (c - low)  # one int per (pid, camera), no collisions
    gallery_keys, counts = np.unique(key(gp, gc), return_counts=True)
    query_keys = key(qp, qc)
    pos = np.minimum(np.searchsorted(gallery_keys, query_keys), gallery_keys.size - 1)
    same = gallery_keys[pos] == query_keys
    return (np.where(same, counts[pos], 0) + int(np.sum(gp == JUNK_PID))).astype(np.int64)


def first_kept(indices: Any, query_pids: Any, query_cams: Any, gallery_pids: Any,
               gallery_cams: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` ranks of every ranked list ``indices [Q, K]`` (best first) that the
    protocol keeps.

    Returns:
      ``(columns, ok)``: int64 ``[Q, k]`` positions into ``indices``' second axis, in rank
      order, and bool ``[Q, k]``, False where a list keeps fewer than ``k`` images (its
      ``columns`` there point at removed ranks and must be ignored).
    """
    keep = kept_in_ranking(indices, query_pids, query_cams, gallery_pids, gallery_cams)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= keep.shape[1]:
        raise ValueError(f"k must be an integer in [1, K={keep.shape[1]}] (the ranks of "
                         f"indices), got {k!r}")
    columns = np.argsort(~keep, axis=1, kind="stable")[:, :k].astype(np.int64)
    return columns, np.take_along_axis(keep, columns, axis=1)


__all__ = [
    "DISTRACTOR_PID", "JUNK_PID", "PRECISION", "check_ids", "distance_chunks", "distance_matrix",
    "excluded", "excluded_for_every_query", "excluded_mask", "first_kept", "kept_in_ranking",
    "padded_chunks", "removed_counts", "squared_distances",
]
