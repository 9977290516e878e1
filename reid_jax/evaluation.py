"""Re-identification ranking metrics and person-attribute-recognition metrics (NumPy, host side).

Ranking (docs/design.md, "Ranking and the Market-1501 protocol"; as in ReID-Survey / torchreid
``eval_market1501``):

* For each query, gallery images with the query's pid **and** the query's camera are removed.
* Gallery images with pid ``-1`` are junk and removed for every query.  (A query with pid ``-1``
  therefore never has a valid match and is skipped.)
* Distractors (pid ``0``) stay in the gallery: they are never a match for a query with pid > 0.
* Queries with no remaining match are skipped; ``num_valid_queries`` counts the others.
* Gallery order: ascending distance; **ties are broken by gallery index** (the order of a stable
  ``argsort``).  torchreid uses an unstable quicksort, so its numbers can differ under exact ties.
* ``CMC(k)`` = fraction of valid queries whose first match is within the top ``k`` of the
  filtered gallery.  ``AP`` = mean over the matches of the precision at each match's rank.
  ``INP`` = num_matches / rank of the last match (Ye et al., AGW).  ``mAP``/``mINP`` are means
  over the valid queries.
* ``max_rank`` larger than the (filtered) gallery: **padded**, not reduced as torchreid does.  The
  result always has ``max_rank`` entries; past the last gallery image a valid query's cumulative
  match is 1, so the padded tail equals ``CMC(G) = 1``.

``rank_metrics`` is vectorised over query chunks (bounded memory) and is the one to use;
``rank_metrics_loop`` is the plain per-query loop written like torchreid's, kept as the
reference for tests and the benchmark baseline. ``retrieval_metrics`` ranks embeddings by
squared Euclidean distance (``reid_jax.retrieval``) and reports mAP, mINP, rank-1/5/10 and the
CMC as training's
``metrics.json`` and ``tools/evaluate.py`` write them.

Attributes (Li et al., "A richly annotated dataset for pedestrian attribute recognition",
2016, the PETA/RAP protocol): see ``attribute_metrics``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reid_jax import retrieval

CMC_LENGTH = 50  # entries of the CMC curve that retrieval_metrics reports
REPORTED_RANKS = (1, 5, 10)  # CMC ranks retrieval_metrics reports as rank1, rank5, rank10


def _check_ids(name: str, values: Any, length: int, expected: str) -> np.ndarray:
    """``values`` as a 1-D integer array of ``length`` entries, or a ValueError naming it."""
    array = np.asarray(values)
    if array.ndim != 1 or array.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}] ({expected}), got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _validate_rank_inputs(
    distances: Any,
    query_pids: Any,
    gallery_pids: Any,
    query_cams: Any,
    gallery_cams: Any,
    max_rank: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    dist = np.asarray(distances)
    if dist.ndim != 2:
        raise ValueError(f"distances must have shape [Q, G], got shape {dist.shape}")
    if not (np.issubdtype(dist.dtype, np.floating) or np.issubdtype(dist.dtype, np.integer)):
        raise ValueError(f"distances must be real numbers, got dtype {dist.dtype}")
    num_q, num_g = dist.shape
    qp = _check_ids("query_pids", query_pids, num_q, f"distances has shape {dist.shape}")
    gp = _check_ids("gallery_pids", gallery_pids, num_g, f"distances has shape {dist.shape}")
    qc = _check_ids("query_cams", query_cams, num_q, f"distances has shape {dist.shape}")
    gc = _check_ids("gallery_cams", gallery_cams, num_g, f"distances has shape {dist.shape}")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int | np.integer) or max_rank < 1:
        raise ValueError(f"max_rank must be an integer >= 1, got {max_rank!r}")
    if np.issubdtype(dist.dtype, np.floating):
        for start in range(0, num_q, 1024):  # chunked: no [Q, G] temporary
            nan_rows = np.flatnonzero(np.isnan(dist[start : start + 1024]).any(axis=1))
            if nan_rows.size:
                raise ValueError(
                    f"distances of shape {dist.shape} contain NaN (first in query row "
                    f"{start + nan_rows[0]}); ranks are undefined"
                )
    return dist, qp, gp, qc, gc


def _no_valid_query_error(num_q: int, num_g: int) -> ValueError:
    return ValueError(
        f"no valid query: none of the {num_q} queries has a matching gallery image among the "
        f"{num_g} gallery images once junk (pid -1) and same-pid same-camera images are removed"
    )


def _summary(cmc_sum: np.ndarray, ap: float, inp: float, num_valid: int) -> dict[str, Any]:
    return {
        "cmc": cmc_sum / num_valid,
        "mAP": ap / num_valid,
        "mINP": inp / num_valid,
        "num_valid_queries": int(num_valid),
    }


def rank_metrics_loop(
    distances: Any,
    query_pids: Any,
    gallery_pids: Any,
    query_cams: Any,
    gallery_cams: Any,
    max_rank: int = 50,
) -> dict[str, Any]:
    """Market-1501 CMC / mAP / mINP with a plain per-query loop (reference and baseline).

    Written like torchreid's ``eval_market1501`` (one ``argsort`` and a few NumPy ops per
    query), with the module's conventions: stable ``argsort`` (ties by gallery index), junk
    (pid -1) removed, CMC padded to ``max_rank``.  Same arguments and result as
    ``rank_metrics``; use that one, this one is slow.
    """
    dist, qp, gp, qc, gc = _validate_rank_inputs(
        distances, query_pids, gallery_pids, query_cams, gallery_cams, max_rank
    )
    num_q, num_g = dist.shape
    cmc_sum = np.zeros(max_rank, np.float64)
    ap_sum = inp_sum = 0.0
    num_valid = 0
    for q in range(num_q):
        order = np.argsort(dist[q], kind="stable")
        g_pids, g_cams = gp[order], gc[order]
        remove = retrieval.excluded(qp[q], qc[q], g_pids, g_cams)
        raw_cmc = (g_pids[~remove] == qp[q]).astype(np.int64)
        if not raw_cmc.any():
            continue
        num_valid += 1
        cmc = raw_cmc.cumsum()
        last = np.flatnonzero(raw_cmc)[-1]
        inp_sum += cmc[last] / (last + 1.0)
        precision = cmc / np.arange(1.0, cmc.size + 1.0)
        ap_sum += float((precision * raw_cmc).sum() / raw_cmc.sum())
        hit = np.minimum(cmc, 1)[:max_rank]
        cmc_sum[: hit.size] += hit
        cmc_sum[hit.size :] += 1.0  # padding: past the gallery end a valid query has matched
    if num_valid == 0:
        raise _no_valid_query_error(num_q, num_g)
    return _summary(cmc_sum, ap_sum, inp_sum, num_valid)


def _lower_bound(sorted_rows: np.ndarray, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per entry, the number of values in ``sorted_rows[rows[i]]`` strictly below ``values[i]``.

    A vectorised binary search (``np.searchsorted(..., side='left')`` row by row).

    Args:
      sorted_rows: [C, G], each row ascending.
      rows: [M] row of each entry.
      values: [M].
    Returns:
      [M] int64 in [0, G].
    """
    num_g = sorted_rows.shape[1]
    flat = sorted_rows.reshape(-1)
    base = rows * num_g
    lo = np.zeros(rows.shape, np.int64)
    hi = np.full(rows.shape, num_g, np.int64)
    for _ in range(int(num_g).bit_length()):
        active = lo < hi
        mid = (lo + hi) // 2
        below = flat[base + np.minimum(mid, num_g - 1)] < values
        lo = np.where(active & below, mid + 1, lo)
        hi = np.where(active & ~below, mid, hi)
    return lo


def _order_keys(block: np.ndarray) -> np.ndarray | None:
    """uint32 ``[R, G]`` keys in the order of ``block``'s values (equal values, equal keys), or
    None when the values do not fit in 32 bits (float64 that is not float32, wide integers).

    Floats: the IEEE bit pattern with the sign bit flipped for positives and every bit flipped
    for negatives orders like the values; ``-0.0`` is first made ``+0.0`` (they are equal).
    Integers: the offset from the block's minimum, when the range fits in 32 bits.
    """
    if np.issubdtype(block.dtype, np.floating):
        as32 = block.astype(np.float32)
        if block.dtype.itemsize > 4 and not np.array_equal(as32, block):
            return None
        as32 += np.float32(0.0)  # -0.0 + 0.0 == +0.0
        bits = as32.view(np.uint32)
        mask = bits >> np.uint32(31)
        mask *= np.uint32(0x7FFFFFFF)
        mask |= np.uint32(0x80000000)
        bits ^= mask
        return bits
    low, high = int(block.min()), int(block.max())
    if high - low >= 2**32:
        return None
    return (block.astype(np.int64) - low).astype(np.uint32)


def _sorted_positions(block: np.ndarray, rows: np.ndarray, cols: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Position of ``block[rows[i], cols[i]]`` in its row's stable order, and whether it is tied.

    One ``O(G log G)`` sort per row, however many entries are asked for and however many values
    are tied (docs/scaling.md, "Evaluation at scale"): each value is packed with its column into
    one uint64 ``key << 32 | column``, so the keys are distinct and sort like ``(value,
    column)``; a binary search then finds each entry. Values that do not fit in 32 bits fall back
    to a stable argsort, the same order.

    Args:
      block: [R, G] distances.
      rows, cols: [M] entries (rows index ``block``).
    Returns:
      int64 [M] positions in [0, G); bool [M], True where another value of the row is equal.
    """
    num_g = block.shape[1]
    keys = _order_keys(block)
    if keys is None:
        order = np.argsort(block, axis=1, kind="stable")
        inverse = np.empty_like(order)
        np.put_along_axis(inverse, order, np.arange(num_g)[None, :], axis=1)
        position = inverse[rows, cols].astype(np.int64)
        ranked = np.take_along_axis(block, order, axis=1)
        values = block[rows, cols]
        before = ranked[rows, np.maximum(position - 1, 0)]
        after = ranked[rows, np.minimum(position + 1, num_g - 1)]
    else:
        packed = np.empty(block.shape, np.uint64)
        words = packed.view(np.uint32).reshape(*block.shape, 2)
        high, low = (1, 0) if np.little_endian else (0, 1)
        words[..., high] = keys
        words[..., low] = np.arange(num_g, dtype=np.uint32)
        del keys
        wanted = packed[rows, cols]
        packed.sort(axis=1)
        position = _lower_bound(packed, rows, wanted)
        values = wanted >> np.uint64(32)
        before = packed[rows, np.maximum(position - 1, 0)] >> np.uint64(32)
        after = packed[rows, np.minimum(position + 1, num_g - 1)] >> np.uint64(32)
    tied = ((position > 0) & (before == values)) | ((position + 1 < num_g) & (after == values))
    return position, tied


def _stable_positions(
    dist: np.ndarray, rows: np.ndarray, cols: np.ndarray, *, sort_values_first: bool = True,
    rows_per_block: int = 64,
) -> tuple[np.ndarray, float]:
    """0-based position of ``dist[rows[i], cols[i]]`` in its row's stable ascending order.

    Position = #(values below) + #(equal values at a smaller column). With
    ``sort_values_first`` the rows are sorted by value (the fastest sort) and each entry found
    by a binary search; that is exact unless its value occurs more than once in the row. Only
    rows holding such a tied entry are sorted again by ``(value, column)``
    (:func:`_sorted_positions`). Without it, every row is sorted by ``(value, column)`` at once
    (cheaper when most rows have ties). Either way ``O(G log G)`` per row, ``rows_per_block``
    rows at a time.

    Args:
      dist: [C, G] distances.
      rows, cols: [M] entries.
      sort_values_first: see above; the result is the same.
      rows_per_block: rows per ``(value, column)`` sort (bounds the extra memory).
    Returns:
      int64 [M] positions in [0, G), and the fraction of the rows with entries that hold a tied
      entry (a caller's hint for ``sort_values_first`` of its next call).
    """
    num_g = dist.shape[1]
    position = np.zeros(rows.shape, np.int64)
    if rows.size == 0:
        return position, 0.0
    entry_rows = np.unique(rows)
    if sort_values_first:
        sorted_rows = np.sort(dist, axis=1)
        values = dist[rows, cols]
        position = _lower_bound(sorted_rows, rows, values)
        # sorted_rows[row, position] == value; a tie exists iff the next one is equal too.
        nxt = np.minimum(position + 1, num_g - 1)
        todo = np.flatnonzero((position + 1 < num_g) & (sorted_rows[rows, nxt] == values))
        del sorted_rows
        resort_rows = np.unique(rows[todo])
        tied_fraction = resort_rows.size / entry_rows.size
    else:
        todo = np.arange(rows.size)
        resort_rows = entry_rows
        tied_rows: list[np.ndarray] = []
    local = np.searchsorted(resort_rows, rows[todo])  # row of each entry within resort_rows
    for lo in range(0, resort_rows.size, rows_per_block):
        hi = min(lo + rows_per_block, resort_rows.size)
        here = (local >= lo) & (local < hi)
        entries = todo[here]
        position[entries], tied = _sorted_positions(
            dist[resort_rows[lo:hi]], local[here] - lo, cols[entries])
        if not sort_values_first:
            tied_rows.append(rows[entries[tied]])
    if not sort_values_first:
        tied_fraction = np.unique(np.concatenate(tied_rows)).size / entry_rows.size
    return position, tied_fraction


def _same_pid_pairs(
    query_pids: np.ndarray, gallery_by_pid: np.ndarray, gallery_pids_sorted: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """All (query, gallery) index pairs with equal pids, without a dense [Q, G] comparison.

    Args:
      query_pids: [C].
      gallery_by_pid: [G] gallery indices ordered by pid (stable argsort of the gallery pids).
      gallery_pids_sorted: [G] the gallery pids in that order.
    Returns:
      rows, cols: [M] query and gallery indices of the M pairs.
    """
    lo = np.searchsorted(gallery_pids_sorted, query_pids, side="left")
    counts = np.searchsorted(gallery_pids_sorted, query_pids, side="right") - lo
    rows = np.repeat(np.arange(query_pids.size), counts)
    offsets = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, gallery_by_pid[np.repeat(lo, counts) + offsets]


def per_query_rank_metrics(
    distances: Any,
    query_pids: Any,
    gallery_pids: Any,
    query_cams: Any,
    gallery_cams: Any,
    *,
    query_chunk_size: int = 256,
) -> dict[str, np.ndarray]:
    """Per-query AP, INP, first-match rank and match count under the Market-1501 protocol.

    The vectorised core of :func:`rank_metrics` (see there for the method and arguments).

    Returns:
      ``{"ap": float64 [Q], "inp": float64 [Q]`` (NaN for queries without a valid match),
      ``"first_rank": int64 [Q]`` (1-based, 0 without a match), ``"num_matches": int64 [Q]}``.
    """
    return _per_query(*_validate_rank_inputs(
        distances, query_pids, gallery_pids, query_cams, gallery_cams, 1
    ), _check_chunk(query_chunk_size))


def _check_chunk(query_chunk_size: int) -> int:
    if isinstance(query_chunk_size, bool) or int(query_chunk_size) < 1:
        raise ValueError(f"query_chunk_size must be >= 1, got {query_chunk_size!r}")
    return int(query_chunk_size)


def _per_query(dist: np.ndarray, qp: np.ndarray, gp: np.ndarray, qc: np.ndarray,
               gc: np.ndarray, query_chunk_size: int) -> dict[str, np.ndarray]:
    """:func:`per_query_rank_metrics` on validated inputs."""
    num_q, num_g = dist.shape
    # The protocol rule is retrieval.excluded: what it removes for every query (junk) is dropped
    # up front; of the rest, only images with the query's pid can be removed, and those are
    # exactly the pairs a match is looked for among.
    kept = np.flatnonzero(~retrieval.excluded_for_every_query(gp))
    all_kept = kept.size == num_g
    gp, gc = gp[kept], gc[kept]
    g = kept.size
    gallery_by_pid = np.argsort(gp, kind="stable")
    gp_sorted = gp[gallery_by_pid]

    out = {"ap": np.full(num_q, np.nan), "inp": np.full(num_q, np.nan),
           "first_rank": np.zeros(num_q, np.int64), "num_matches": np.zeros(num_q, np.int64)}
    tied_fraction = 0.0
    for start in range(0, num_q if g else 0, query_chunk_size):
        stop = min(start + query_chunk_size, num_q)
        d = dist[start:stop] if all_kept else np.take(dist[start:stop], kept, axis=1)  # [C, g]
        d = np.ascontiguousarray(d)
        pid_rows, pid_cols = _same_pid_pairs(qp[start:stop], gallery_by_pid, gp_sorted)
        removed = retrieval.excluded(qp[start:stop][pid_rows], qc[start:stop][pid_rows],
                                     gp[pid_cols], gc[pid_cols])
        match_rows = pid_rows[~removed]
        if match_rows.size == 0:
            continue
        # Positions of matches and removed images in the row's stable order, in one pass. When
        # most rows of the last chunk had ties (a gallery with duplicates), sort by (value,
        # column) straight away (docs/scaling.md, "Evaluation at scale").
        positions, tied_fraction = _stable_positions(
            d, pid_rows, pid_cols, sort_values_first=tied_fraction <= 0.5)
        match_pos, removed_pos = positions[~removed], positions[removed]
        removed_rows = pid_rows[removed]

        # Rank (1-based) of each match in the filtered gallery: position - removed before it + 1.
        removed_keys = np.sort(removed_rows * g + removed_pos)
        match_keys = match_rows * g + match_pos
        removed_before = np.searchsorted(removed_keys, match_keys) - np.searchsorted(
            removed_keys, match_rows * g
        )
        order = np.argsort(match_keys, kind="stable")  # by query, then rank
        rows = match_rows[order]
        ranks = (match_pos - removed_before)[order] + 1

        num_matches = np.bincount(rows, minlength=stop - start)
        valid = np.flatnonzero(num_matches)
        first = np.cumsum(num_matches) - num_matches  # index of each row's first match
        ordinal = np.arange(rows.size) - first[rows] + 1  # i-th match of its query
        ap = np.bincount(rows, weights=ordinal / ranks, minlength=stop - start)[valid]
        last_rank = ranks[first[valid] + num_matches[valid] - 1]
        at = start + valid
        out["ap"][at] = ap / num_matches[valid]
        out["inp"][at] = num_matches[valid] / last_rank
        out["first_rank"][at] = ranks[first[valid]]
        out["num_matches"][start:stop] = num_matches
    return out


def rank_metrics(
    distances: Any,
    query_pids: Any,
    gallery_pids: Any,
    query_cams: Any,
    gallery_cams: Any,
    max_rank: int = 50,
    *,
    query_chunk_size: int = 256,
) -> dict[str, Any]:
    """Market-1501 CMC, mAP and mINP (protocol in the module docstring), vectorised.

    No full ``argsort``: per chunk of queries the rows are sorted by value (``np.sort``), and
    only the matches and the removed same-camera images are located in that order by a
    vectorised binary search.  Rows where such an image's distance occurs more than once are
    sorted by ``(distance, gallery index)`` packed into one uint64 (a stable argsort's order),
    so a query costs ``O(G log G)`` however many ties its row holds (docs/scaling.md,
    "Evaluation at scale").  The rank of a match in the filtered gallery is its position minus
    the removed images before it.  Peak extra memory is a few ``[query_chunk_size, G]`` arrays.

    Args:
      distances: [Q, G] query-gallery distances (NumPy or JAX array; smaller = more similar).
        NaN is rejected; +-inf is ordered as usual.
      query_pids, query_cams: [Q] integers.
      gallery_pids, gallery_cams: [G] integers; pid -1 is junk, pid 0 a distractor.
      max_rank: length of the CMC curve (padded past the gallery end, see module docstring).
      query_chunk_size: queries processed at once (memory bound, not the result).
    Returns:
      ``{"cmc": float64 [max_rank], "mAP": float, "mINP": float, "num_valid_queries": int}``;
      equal to ``rank_metrics_loop`` to float rounding.
    Raises:
      ValueError: shapes that do not match (naming them), NaN distances, ``max_rank < 1``,
        or no query with a valid match.
    """
    dist, qp, gp, qc, gc = _validate_rank_inputs(
        distances, query_pids, gallery_pids, query_cams, gallery_cams, max_rank
    )
    per_query = _per_query(dist, qp, gp, qc, gc, _check_chunk(query_chunk_size))
    valid = per_query["num_matches"] > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise _no_valid_query_error(*dist.shape)
    first_rank = per_query["first_rank"][valid]
    first_hits = np.bincount(np.minimum(first_rank, max_rank + 1) - 1, minlength=max_rank + 1)
    cmc_sum = np.cumsum(first_hits[:max_rank]).astype(np.float64)
    return _summary(cmc_sum, float(per_query["ap"][valid].sum()),
                    float(per_query["inp"][valid].sum()), num_valid)


def retrieval_metrics(
    query_features: Any,
    gallery_features: Any,
    query_pids: Any,
    gallery_pids: Any,
    query_cams: Any,
    gallery_cams: Any,
) -> dict[str, Any]:
    """Market-1501 re-id metrics of embeddings ranked by squared Euclidean distance.

    Args:
      query_features: [Q, D]; gallery_features: [G, D] (the retrieval embedding).
      query_pids, query_cams: [Q]; gallery_pids, gallery_cams: [G] (as :func:`rank_metrics`).

    Returns:
      ``{"mAP", "mINP", "rank1", "rank5", "rank10", "cmc" (list of 50), "num_valid_queries"}``
      as plain Python numbers (JSON-ready), from :func:`rank_metrics` with ``max_rank=50``.
    """
    result = rank_metrics(retrieval.distance_matrix(query_features, gallery_features),
                          query_pids,
                          gallery_pids, query_cams, gallery_cams, max_rank=CMC_LENGTH)
    cmc = [float(v) for v in result["cmc"]]
    out: dict[str, Any] = {"mAP": float(result["mAP"]), "mINP": float(result["mINP"])}
    out.update({f"rank{r}": cmc[r - 1] for r in REPORTED_RANKS})
    out.update({"cmc": cmc, "num_valid_queries": int(result["num_valid_queries"])})
    return out


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise ``numerator / denominator`` with NaN where the denominator is 0."""
    out = np.full(np.shape(numerator), np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def attribute_metrics(probabilities: Any, labels: Any, threshold: Any = 0.5) -> dict[str, Any]:
    """Person-attribute-recognition metrics (Li et al. 2016, the PETA / RAP protocol).

    An attribute is predicted present iff ``probability >= threshold`` (the reference DeepMAR
    code thresholds logits at ``>= 0``, i.e. probabilities at ``>= 0.5``).

    Label-based, per attribute ``a`` (over the N instances):
      ``TPR_a = TP/(TP+FN)``, ``TNR_a = TN/(TN+FP)``,
      ``accuracy_per_attribute[a] = (TPR_a + TNR_a) / 2`` and ``mA`` = its mean over attributes.
      **Rule for one-class attributes**: an attribute with no positive labels has TPR undefined
      (NaN in ``tpr_per_attribute``) and its accuracy is TNR alone; with no negative labels it is
      TPR alone (the classes present are averaged, as sklearn's ``balanced_accuracy_score``).
      Every attribute stays in ``mA``; ``num_attributes_without_positives`` /
      ``num_attributes_without_negatives`` say how many were affected.
      ``two_class_accuracy_per_attribute`` is ``(TPR_a + TNR_a) / 2`` without that rule: NaN
      where one class is missing (whether the classes are told apart; the report marks
      attributes below 80 %).
      ``precision_per_attribute = TP/(TP+FP)``, ``recall_per_attribute = TPR``,
      ``f1_per_attribute = 2PR/(P+R)``: NaN where undefined (zero denominator, or P or R NaN);
      F1 is 0 when P = R = 0.

    Instance-based, per instance ``i`` with predicted set ``P_i`` and label set ``Y_i``:
      ``accuracy = mean |P∩Y|/|P∪Y|``, ``precision = mean |P∩Y|/|P|``,
      ``recall = mean |P∩Y|/|Y|``, ``f1 = 2·precision·recall/(precision+recall)`` (from the means,
      as the reference code does).
      **Rule for empty sets**: an instance with ``P = Y = {}`` scores 1 for all three (a perfect
      prediction); an empty set on one side only scores 0 for the undefined ratio (precision when
      ``P = {}``, recall when ``Y = {}``).  The reference code instead drops instances with
      ``Y = {}``; ``num_instances_without_positives`` says how many there were.

    Args:
      probabilities: [N, A] in [0, 1] (NumPy or JAX array).
      labels: [N, A] in {0, 1} (integers, floats or booleans).
      threshold: scalar or [A] in [0, 1].
    Returns:
      dict with float ``mA``, ``accuracy``, ``precision``, ``recall``, ``f1``; float64 [A]
      ``accuracy_per_attribute``, ``two_class_accuracy_per_attribute``, ``tpr_per_attribute``,
      ``tnr_per_attribute``,
      ``precision_per_attribute``, ``recall_per_attribute``, ``f1_per_attribute``; int
      ``num_attributes_without_positives``, ``num_attributes_without_negatives``,
      ``num_instances_without_positives``.
    Raises:
      ValueError: shapes (naming them), empty input, labels outside {0, 1}, probabilities
        outside [0, 1] or NaN, threshold outside [0, 1] or of the wrong shape.
    """
    probs = np.asarray(probabilities)
    gt = np.asarray(labels)
    if probs.ndim != 2 or gt.shape != probs.shape:
        raise ValueError(
            f"probabilities [N, A] and labels [N, A] must have the same 2-D shape, got "
            f"probabilities {probs.shape} and labels {gt.shape}"
        )
    if probs.size == 0:
        raise ValueError(f"attribute_metrics needs N >= 1 and A >= 1, got shape {probs.shape}")
    if not (np.issubdtype(probs.dtype, np.floating) or np.issubdtype(probs.dtype, np.integer)):
        raise ValueError(f"probabilities must be real numbers, got dtype {probs.dtype}")
    probs = probs.astype(np.float64)
    if np.isnan(probs).any() or probs.min() < 0.0 or probs.max() > 1.0:
        raise ValueError(
            f"probabilities must lie in [0, 1] (no NaN); got min {np.nanmin(probs)}, "
            f"max {np.nanmax(probs)}, {int(np.isnan(probs).sum())} NaN"
        )
    bad = ~((gt == 0) | (gt == 1))
    if bad.any():
        raise ValueError(
            f"labels must be 0 or 1; got {int(bad.sum())} other values, e.g. "
            f"{np.asarray(gt[bad]).ravel()[:5].tolist()}"
        )
    num_a = probs.shape[1]
    t = np.asarray(threshold, np.float64)
    if t.shape not in ((), (num_a,)) or np.isnan(t).any() or (t < 0).any() or (t > 1).any():
        raise ValueError(
            f"threshold must be a scalar or shape [{num_a}] in [0, 1], got shape {t.shape} "
            f"values {t.ravel()[:5].tolist()}"
        )
    y = gt == 1
    pred = probs >= t

    # Label-based.
    tp = (pred & y).sum(0).astype(np.float64)
    fp = (pred & ~y).sum(0).astype(np.float64)
    fn = (~pred & y).sum(0).astype(np.float64)
    tn = (~pred & ~y).sum(0).astype(np.float64)
    tpr = _ratio(tp, tp + fn)
    tnr = _ratio(tn, tn + fp)
    balanced = np.nanmean(np.stack([tpr, tnr]), axis=0)  # one of the two is always defined
    prec_a = _ratio(tp, tp + fp)
    f1_a = _ratio(2.0 * prec_a * tpr, prec_a + tpr)
    f1_a[(prec_a == 0) & (tpr == 0)] = 0.0

    # Instance-based.
    inter = (pred & y).sum(1).astype(np.float64)
    union = (pred | y).sum(1).astype(np.float64)
    n_pred = pred.sum(1).astype(np.float64)
    n_true = y.sum(1).astype(np.float64)
    both_empty = union == 0
    acc_i = np.where(both_empty, 1.0, inter / np.maximum(union, 1.0))
    prec_i = np.where(n_pred == 0, both_empty.astype(np.float64), inter / np.maximum(n_pred, 1.0))
    rec_i = np.where(n_true == 0, both_empty.astype(np.float64), inter / np.maximum(n_true, 1.0))
    precision, recall = float(prec_i.mean()), float(rec_i.mean())
    f1 = 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0

    return {
        "mA": float(balanced.mean()),
        "accuracy_per_attribute": balanced,
        "two_class_accuracy_per_attribute": (tpr + tnr) / 2,  # NaN: one class missing
        "tpr_per_attribute": tpr,
        "tnr_per_attribute": tnr,
        "precision_per_attribute": prec_a,
        "recall_per_attribute": tpr.copy(),
        "f1_per_attribute": f1_a,
        "accuracy": float(acc_i.mean()),
        "precision": precision,
        "recall": recall,
        "f1": float(f1),
        "num_attributes_without_positives": int((tp + fn == 0).sum()),
        "num_attributes_without_negatives": int((tn + fp == 0).sum()),
        "num_instances_without_positives": int((n_true == 0).sum()),
    }
