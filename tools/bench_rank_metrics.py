r"""Times ``reid_jax.evaluation.rank_metrics`` at Market-1501 size, larger and tie-heavy galleries.

For each gallery size factor in ``--tiles`` it times two galleries of ``factor x G`` images:

* ``distinct``: every distance different (a gallery of new images);
* ``tiled``: the Market-sized gallery repeated ``factor`` times, so every distance of a row
  occurs ``factor`` times (exact ties, broken by gallery index).

and checks the result against the per-query loop ``rank_metrics_loop`` (``--check``). Prints a
table of seconds (best of ``--repeats``) and the loop's time where it was run.

    python tools/bench_rank_metrics.py                     # Q=3,368, G=19,732, tiles 1,2,4
    python tools/bench_rank_metrics.py --num_query=256 --tiles=1,2
"""

from __future__ import annotations

import json
import platform
import time

import numpy as np
from absl import flags

from reid_jax import cli, evaluation
from reid_jax.synthetic.distances import market_like_distances

_NUM_QUERY = flags.DEFINE_integer("num_query", 3368, "Queries (Market-1501: 3,368).")
_NUM_GALLERY = flags.DEFINE_integer("num_gallery", 19732, "Gallery images at factor 1.")
_TILES = flags.DEFINE_list("tiles", ["1", "2", "4"], "Gallery size factors.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs; the best is reported.")
_CHECK = flags.DEFINE_bool("check", True, "Compare with rank_metrics_loop (slow at 4x).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_JSON = flags.DEFINE_string("json", None, "Also write the measurements to this JSON file.")


def gallery(kind: str, factor: int, seed: int) -> tuple[np.ndarray, ...]:
    q, g = _NUM_QUERY.value, _NUM_GALLERY.value
    if kind == "distinct":
        return market_like_distances(q, g * factor, seed)
    dist, qp, gp, qc, gc = market_like_distances(q, g, seed)
    return np.tile(dist, (1, factor)), qp, np.tile(gp, factor), qc, np.tile(gc, factor)


def best_seconds(fn, repeats: int) -> tuple[float, dict]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(argv: list[str]) -> None:
    del argv
    print(f"machine: {platform.processor() or platform.machine()}, numpy {np.__version__}; "
          f"Q={_NUM_QUERY.value}, G={_NUM_GALLERY.value} x factor")
    rows = []
    for factor in (int(t) for t in _TILES.value):
        for kind in ("distinct", "tiled"):
            if kind == "tiled" and factor == 1:
                continue  # the same gallery as distinct x1
            args = gallery(kind, factor, _SEED.value)
            seconds, fast = best_seconds(lambda a=args: evaluation.rank_metrics(*a),
                                         _REPEATS.value)
            row = {"factor": factor, "gallery": kind, "G": int(args[0].shape[1]),
                   "rank_metrics_s": seconds, "mAP": fast["mAP"]}
            if _CHECK.value:
                loop_s, loop = best_seconds(lambda a=args: evaluation.rank_metrics_loop(*a), 1)
                row["loop_s"] = loop_s
                row["max_abs_diff"] = max(
                    abs(fast["mAP"] - loop["mAP"]), abs(fast["mINP"] - loop["mINP"]),
                    float(np.abs(fast["cmc"] - loop["cmc"]).max()))
            rows.append(row)
            print(f"  {kind} x{factor}: {seconds:.3f} s", flush=True)
    print()
    print("| gallery | G | rank_metrics s | per-query loop s | max abs diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        loop = f"{r['loop_s']:.2f}" if "loop_s" in r else "-"
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
        print(f"| {r['gallery']} x{r['factor']} | {r['G']} | {r['rank_metrics_s']:.3f} | "
              f"{loop} | {diff} |")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
