r"""Benchmarks the explanation kernels and re-id metrics at Market-1501 size.

Measures, in one run, as ratios to their floors:

* top-``k`` ``explain_rankings`` for all queries x the whole gallery vs the bare distance GEMM;
* all-pairs ``attribute_errors`` (methods ``auto``, ``direct``, ``gemm``) vs a GEMM with the same
  FLOPs (``Q*A x N @ N x G``), with pairs/s, peak memory, and the accuracy of each method against
  a float64 reference on a block that holds identical and near-duplicate pairs;
* the cost of the input check that ``explain_rankings`` runs by default on concrete arrays
  (``validate=None``) against ``validate=False``;
* ``rank_metrics`` vs a plain per-query numpy loop (same numbers);
* attribute maps (``reid_jax.explain.maps``) for the top-``k`` of one query, every attribute,
  both images of every pair, vs one compiled eval forward pass of the same ``k + 1`` images
  (the model split once, outside the timing), on the model of ``--maps_config``, timed in
  ``--maps_rounds`` interleaved rounds (every row once per round: best and median per row;
  docs/attribute_maps.md, 'Cost').

Each kernel timing runs in a fresh subprocess so its peak resident memory can be reported.

    python tools/bench_explain.py                       # Market size (3,368 x 19,732 x 2,048 x 30)
    python tools/bench_explain.py --num_query=256 --num_gallery=4096   # quick
    python tools/bench_explain.py --nokernels --norank_metrics          # attribute maps only
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from reid_jax import atomic_io, cli

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_query", 3368, "Queries (Market-1501: 3,368).")
flags.DEFINE_integer("num_gallery", 19732, "Gallery images (Market-1501: 19,732).")
flags.DEFINE_integer("dim", 2048, "Embedding size N.")
flags.DEFINE_integer("num_attributes", 30, "Attributes A.")
flags.DEFINE_integer("k", 10, "Ranks explained per query.")
flags.DEFINE_integer("pairs_queries", 256,
                     "Queries whose all-pairs errors are timed (x the whole gallery); the "
                     "Market-size output would be 8 GB.")
flags.DEFINE_integer("repeats", 2, "Timed repetitions after one warm-up; the best is reported.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_bool("rank_metrics", True, "Also benchmark reid_jax.evaluation.rank_metrics.")
flags.DEFINE_bool("kernels", True, "Benchmark explain_rankings and attribute_errors.")
flags.DEFINE_bool("maps", True, "Benchmark the attribute maps against one forward pass.")
config_flags.DEFINE_config_file(
    "maps_config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs", "agw_synthetic.py"),
    "Config whose model and image size the maps are measured on (the demo's by default).")
flags.DEFINE_string("maps_checkpoint", None,
                    "Optional checkpoint (with attribute head) to take the model from; default: "
                    "a randomly initialised model of --maps_config (the cost does not depend "
                    "on the weights).")
flags.DEFINE_integer("maps_steps", None, "Quadrature nodes of the maps (default: the library's).")
flags.DEFINE_integer("maps_layer", None, "Stage whose output the maps are taken at "
                     "(default: the library's, maps.DEFAULT_LAYER).")
flags.DEFINE_enum("maps_method", None, ["integrated_gradients", "deeplift"],
                  "How the maps are computed (default: the library's, maps.DEFAULT_METHOD).")
flags.DEFINE_integer("maps_rounds", 20, "Rounds of the maps benchmark: each round calls every "
                     "row once, in turn, so that all rows run under the same load and caches; "
                     "each row reports its best and its median round. A round takes about 0.6 s "
                     "with the default maps on a 2-core CPU, about a minute with integrated "
                     "gradients at stage 1 or 2 (pass 3 there).", lower_bound=1)
flags.DEFINE_enum("precision", "highest", ["highest", "default"],
                  "Matmul precision of the kernels and distances: 'highest' (full float32 "
                  "products, what reid_jax.retrieval.PRECISION ships) or 'default' (the "
                  "backend's fastest: TF32 / bfloat16 passes on GPUs and TPUs), to measure "
                  "what the full precision costs and what it buys on near-duplicate pairs.")
flags.DEFINE_bool("isolate", True, "Run every kernel timing in a fresh process, so its peak "
                  "resident memory can be reported (--noisolate: all in this process, faster "
                  "to start; peak memory is then the whole run's).")
flags.DEFINE_string("measure", "", "Internal: run one measurement and print it as JSON.")
flags.DEFINE_string("json", None, "Also write the measurements to this JSON file.")


def _set_precision() -> None:
    """Applies --precision to the kernels (read when they are traced, so before any call)."""
    import jax

    from reid_jax import retrieval
    from reid_jax.explain import kernels

    precision = {"highest": jax.lax.Precision.HIGHEST,
                 "default": jax.lax.Precision.DEFAULT}[FLAGS.precision]
    retrieval.PRECISION = precision
    kernels._PRECISION = precision


def _unit(rng, n, d):
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _data(num_query):
    rng = np.random.default_rng(FLAGS.seed)
    fq = _unit(rng, num_query, FLAGS.dim)
    fg = _unit(rng, FLAGS.num_gallery, FLAGS.dim)
    w = (rng.standard_normal((FLAGS.dim, FLAGS.num_attributes)) * 0.02).astype(np.float32)
    return fq, fg, w


def _best_time(fn, repeats):
    """(best, first call) seconds of ``fn`` over ``repeats`` calls after a warm-up."""
    r = _interleaved({"run": fn}, repeats)["run"]
    return r["best"], r["first"]


def _measure(name: str) -> dict:
    """One timing, in this (fresh) process."""
    import jax
    import jax.numpy as jnp

    from reid_jax import explain

    full = ("distance_gemm", "explain", "explain_unchecked")
    q_all = FLAGS.num_query if name in full else FLAGS.pairs_queries
    fq, fg, w = (jnp.asarray(x) for x in _data(q_all))
    if name == "distance_gemm":
        f = jax.jit(lambda a, b: jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None]
                    - 2.0 * a @ b.T)
        run = lambda: f(fq, fg)
    elif name == "explain":  # the default: inputs checked for NaN / Inf first
        run = lambda: explain.explain_rankings(fq, fg, w, k=FLAGS.k)
    elif name == "explain_unchecked":
        run = lambda: explain.explain_rankings(fq, fg, w, k=FLAGS.k, validate=False)
    elif name == "attribute_gemm":
        lhs = jnp.asarray(np.random.default_rng(1).standard_normal(
            (q_all * FLAGS.num_attributes, FLAGS.dim), dtype=np.float32))
        f = jax.jit(lambda a, b: a @ b.T)
        run = lambda: f(lhs, fg)
    elif name.startswith("errors_"):
        method = name.removeprefix("errors_")
        run = lambda: explain.attribute_errors(fq, fg, w, method=method)
    else:
        raise ValueError(f"unknown measurement {name!r}")
    best, first = _best_time(run, FLAGS.repeats)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"name": name, "seconds": best, "first_call_seconds": first, "peak_rss_mib": peak_mib,
            "num_query": q_all}


def _run_child(name: str) -> dict:
    if not FLAGS.isolate:  # in this process: no per-measurement peak memory
        return _measure(name)
    argv = [sys.executable, __file__, f"--measure={name}"] + [
        f"--{k}={getattr(FLAGS, k)}" for k in
        ("num_query", "num_gallery", "dim", "num_attributes", "k", "pairs_queries", "repeats",
         "seed", "precision")
    ]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _accuracy() -> dict:
    """Worst error of each method relative to sum_n (fq-fg)^2 |w| on pairs incl. near-duplicates."""
    from reid_jax import explain

    rng = np.random.default_rng(FLAGS.seed + 1)
    n, a = FLAGS.dim, FLAGS.num_attributes
    fq = _unit(rng, 32, n)
    fg = _unit(rng, 512, n)
    fg[:8] = fq[:8]  # identical pairs
    for j, s in enumerate((1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 3e-2)):
        fg[8 + j] = fq[8 + j] + s * rng.standard_normal(n).astype(np.float32) / np.sqrt(n)
    fg[16:24] = fq[16:24] + 0.05 * _unit(rng, 8, n)  # near, but not duplicates
    w = (rng.standard_normal((n, a)) * 0.02).astype(np.float32)
    fq64, fg64, w64 = (x.astype(np.float64) for x in (fq, fg, w))
    ref = np.stack([((f[None] - fg64) ** 2) @ w64 for f in fq64])
    scale = np.stack([((f[None] - fg64) ** 2) @ np.abs(w64) for f in fq64])
    near = np.zeros(ref.shape[:2], bool)
    near[np.arange(24), np.arange(24)] = True
    out = {}
    for method in explain.METHODS:
        got = np.asarray(explain.attribute_errors(fq, fg, w, method=method), np.float64)
        rel = np.abs(got - ref) / np.maximum(scale, 1e-300)
        rel[(scale == 0) & (got == ref)] = 0.0
        rel[(scale == 0) & (got != ref)] = np.inf
        out[method] = {"all_pairs": float(rel.max()), "near_pairs": float(rel[near].max())}
    top = explain.explain_rankings(fq, fg, w, k=FLAGS.k)
    idx = np.asarray(top.indices)
    rows = np.arange(len(fq))[:, None]
    rel = np.abs(np.asarray(top.errors, np.float64) - ref[rows, idx]) / np.maximum(
        scale[rows, idx], 1e-300)
    rel[scale[rows, idx] == 0] = np.where(np.asarray(top.errors)[scale[rows, idx] == 0] == 0,
                                          0, np.inf)
    out["explain_rankings"] = {"all_pairs": float(rel.max()), "near_pairs": float(rel.max())}
    return out


def _rank_metrics_bench() -> dict:
    from reid_jax import evaluation
    from reid_jax.synthetic.distances import market_like_distances

    dist, qp, gp, qc, gc = market_like_distances(FLAGS.num_query, FLAGS.num_gallery,
                                                 FLAGS.seed)
    args = (dist, qp, gp, qc, gc)
    t0 = time.perf_counter()
    fast = evaluation.rank_metrics(*args)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop = evaluation.rank_metrics_loop(*args)
    t_loop = time.perf_counter() - t0
    diff = max(abs(fast["mAP"] - loop["mAP"]), abs(fast["mINP"] - loop["mINP"]),
               float(np.abs(np.asarray(fast["cmc"]) - np.asarray(loop["cmc"])).max()))
    return {"vectorised_s": t_fast, "loop_s": t_loop, "max_abs_diff": diff, "mAP": fast["mAP"]}


def _maps_model():
    """(model, weights [N, A], height, width) for the maps benchmark."""
    import jax.numpy as jnp
    from flax import nnx

    from reid_jax import checkpoints
    from reid_jax.models.agw import AGW

    if FLAGS.maps_checkpoint:
        model, meta = checkpoints.restore_model(FLAGS.maps_checkpoint, None)
        head = checkpoints.restore_attribute_head(FLAGS.maps_checkpoint)
        data = meta["config"]["data"]
        return model, jnp.asarray(head.kernel[...]), int(data["height"]), int(data["width"])
    config = FLAGS.maps_config
    model = AGW.from_config(config, 10, nnx.Rngs(FLAGS.seed))
    h, w = int(config.data.height), int(config.data.width)
    rng = np.random.default_rng(FLAGS.seed)
    model.train()  # BatchNorm running statistics of a trained model (BNNeck's mean not 0)
    model(jnp.asarray(rng.standard_normal((8, h, w, 3)), jnp.float32))
    model.eval()
    weights = rng.standard_normal((model.feature_dim, FLAGS.num_attributes)) * 0.05
    return model, jnp.asarray(weights, jnp.float32), h, w


def _maps_bench() -> dict:
    """Maps for the top-k of one query vs one forward pass of the same k + 1 images."""
    import jax.numpy as jnp

    from reid_jax import embeddings
    from reid_jax.explain import maps

    model, weights, h, w = _maps_model()
    # The floor: the extraction's compiled eval forward (reid_jax.embeddings, as
    # tools/bench_train.py times it), the model split once outside the timing as an extraction
    # over many batches runs it. Every map row is timed as the public call, with its own split
    # of the model: that overhead counts against the maps.
    graphdef, state = embeddings._eval_state(model)

    def forward(state, x):
        return embeddings._forward_jit(graphdef, state, None, x,
                                       outputs=(embeddings.FEATURES,))[embeddings.FEATURES]

    steps = FLAGS.maps_steps or maps.DEFAULT_STEPS
    layer = FLAGS.maps_layer or maps.DEFAULT_LAYER
    method = FLAGS.maps_method or maps.DEFAULT_METHOD
    k = FLAGS.k
    rng = np.random.default_rng(FLAGS.seed + 2)
    images = jnp.asarray(rng.standard_normal((k + 1, h, w, 3)), jnp.float32)
    query, gallery = images[:1], images[1:]
    runs = {
        "forward": lambda: forward(state, images),
        "embed": lambda: maps.embed(model, images),
        "evidence": lambda: maps.evidence_maps(model, weights, images, steps=steps,
                                               layer=layer, method=method),
        "contributions": lambda: maps.contribution_maps(model, weights, query, gallery,
                                                        steps=steps, layer=layer, method=method),
        "contributions_complete": lambda: maps.contribution_maps(
            model, weights, query, gallery, complete=True, steps=steps, layer=layer,
            method=method),
        "gradcam": lambda: maps.distance_gradcam(model, gallery, query),
    }
    # Interleaved rounds: each round calls every row once, so the floor runs after the maps as
    # the maps run after it (the same caches and load; docs/attribute_maps.md, 'Cost'). The
    # forward repeated alone, back to back with hot caches, is timed too and reported beside.
    res = _interleaved(runs, FLAGS.maps_rounds)
    alone = _best_time(runs["forward"], max(FLAGS.maps_rounds, 3))
    a = int(weights.shape[1])
    print()
    how = f"{steps} quadrature nodes" if method == "integrated_gradients" else "DeepLIFT"
    print(f"attribute maps: {model.feature_dim}-d AGW (width {model.backbone.width}), "
          f"{h}x{w} images, top-{k} of one query, A={a}, {how}, maps at stage {layer}; "
          f"{FLAGS.maps_rounds} interleaved rounds")
    print("| what | maps | best s | median s | first call s | best / best forward | "
          "median / median forward |")
    print("|---|---|---|---|---|---|---|")
    rows = [("eval forward of the {n} images (floor)", "-", "forward"),
            ("`maps.embed` of the {n} images (the same forward as a call)", "-", "embed"),
            ("evidence maps, {n} images", f"{(k + 1) * a}", "evidence"),
            ("contribution maps, {k} pairs, paper weights", f"{2 * k * a}", "contributions"),
            ("contribution maps, {k} pairs, complete weights", f"{2 * k * a}",
             "contributions_complete"),
            ("Grad-CAM of the distance, {k} images (baseline)", f"{k}", "gradcam")]
    fwd, fwd_median = res["forward"]["best"], res["forward"]["median"]
    for title, count, name in rows:
        r = res[name]
        print(f"| {title.format(n=k + 1, k=k)} | {count} | {r['best']:.4f} | {r['median']:.4f} | "
              f"{r['first']:.2f} | {r['best'] / fwd:.1f}x | {r['median'] / fwd_median:.1f}x |")
    print(f"| eval forward of the {k + 1} images repeated alone (hot caches) | - | {alone[0]:.4f} "
          f"| - | - | {alone[0] / fwd:.2f}x | - |")
    total = res["evidence"]["best"] + res["contributions"]["best"]
    total_median = res["evidence"]["median"] + res["contributions"]["median"]
    ratio, ratio_median, ratio_alone = total / fwd, total_median / fwd_median, total / alone[0]

    def verdict(r):
        return "met" if r <= 40 else "NOT met"

    print(f"goal: evidence + contribution maps of the top-{k}, both images, <= 40x the forward: "
          f"{ratio:.1f}x best / best ({verdict(ratio)}), {ratio_median:.1f}x median / median "
          f"({verdict(ratio_median)}); against the forward repeated alone {ratio_alone:.1f}x "
          f"({verdict(ratio_alone)})")
    return {"height": h, "width": w, "k": k, "A": a, "steps": steps, "layer": layer,
            "method": method, "rounds": FLAGS.maps_rounds,
            "seconds": {name: r["best"] for name, r in res.items()},
            "median_seconds": {name: r["median"] for name, r in res.items()},
            "first_call_seconds": {name: r["first"] for name, r in res.items()},
            "forward_alone_seconds": alone[0],
            "ratio_to_forward": ratio, "median_ratio_to_forward": ratio_median,
            "ratio_to_forward_alone": ratio_alone}


def _interleaved(runs: dict, rounds: int) -> dict:
    """Times every call of ``runs`` once per round, in turn, after one warm-up call each
    (compilation): ``{name: {"first", "best", "median"}}`` in seconds."""
    import jax

    first, times = {}, {name: [] for name in runs}
    for name, run in runs.items():
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        first[name] = time.perf_counter() - t0
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - t0)
    return {name: {"first": first[name], "best": min(t), "median": float(np.median(t))}
            for name, t in times.items()}


def main(argv):
    del argv
    _set_precision()
    if FLAGS.measure:
        print(json.dumps(_measure(FLAGS.measure)))
        return
    import jax

    from reid_jax import explain

    print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    summary = {"precision": FLAGS.precision, "device": jax.devices()[0].device_kind}
    if FLAGS.kernels:
        summary["kernels"] = _kernels_bench(explain)
    if FLAGS.rank_metrics:
        summary["rank_metrics"] = _rank_metrics_print()
    if FLAGS.maps:
        summary["maps"] = _maps_bench()
    if FLAGS.json:
        atomic_io.write_text(FLAGS.json, json.dumps(summary, indent=1) + "\n")


def _kernels_bench(explain) -> dict:
    """explain_rankings and attribute_errors at --num_query x --num_gallery, in subprocesses."""
    q, g, n, a, qs = (FLAGS.num_query, FLAGS.num_gallery, FLAGS.dim, FLAGS.num_attributes,
                      FLAGS.pairs_queries)
    print(f"sizes: Q={q} G={g} N={n} A={a} k={FLAGS.k}; all-pairs on {qs} queries x {g}; "
          f"recompute ratio {explain.recompute_ratio(n):.3f}; matmul precision "
          f"{FLAGS.precision}")
    names = ["distance_gemm", "explain", "explain_unchecked", "attribute_gemm", "errors_auto",
             "errors_direct", "errors_gemm"]
    res = {}
    for name in names:
        res[name] = _run_child(name)
        print(f"  measured {name}: {res[name]['seconds']:.3f} s", flush=True)
    acc = _accuracy()

    rows = []
    dg = res["distance_gemm"]["seconds"]
    ag = res["attribute_gemm"]["seconds"]
    flops_d = 2 * q * g * n
    flops_a = 2 * qs * a * n * g
    rows.append(("distance GEMM (floor)", dg, 1.0, f"{flops_d / dg / 1e9:.0f} GFLOP/s",
                 res["distance_gemm"]["peak_rss_mib"], "-"))
    e = res["explain"]["seconds"]
    rows.append((f"explain_rankings top-{FLAGS.k}", e, e / dg, f"{q * g / e / 1e6:.1f} Mpairs/s",
                 res["explain"]["peak_rss_mib"], f"{acc['explain_rankings']['all_pairs']:.1e}"))
    eu = res["explain_unchecked"]["seconds"]
    rows.append((f"explain_rankings top-{FLAGS.k}, validate=False", eu, eu / dg,
                 f"{q * g / eu / 1e6:.1f} Mpairs/s", res["explain_unchecked"]["peak_rss_mib"],
                 "-"))
    rows.append(("attribute GEMM, same FLOPs (floor)", ag, 1.0,
                 f"{flops_a / ag / 1e9:.0f} GFLOP/s", res["attribute_gemm"]["peak_rss_mib"], "-"))
    for m in explain.METHODS:
        t = res[f"errors_{m}"]["seconds"]
        rows.append((f"attribute_errors method={m}", t, t / ag, f"{qs * g / t / 1e6:.2f} Mpairs/s",
                     res[f"errors_{m}"]["peak_rss_mib"],
                     f"{acc[m]['all_pairs']:.1e} (near {acc[m]['near_pairs']:.1e})"))
    print()
    print("| kernel | seconds | ratio to floor | rate | peak RSS MiB | max rel. error |")
    print("|---|---|---|---|---|---|")
    for name, t, r, rate, mem, err in rows:
        print(f"| {name} | {t:.3f} | {r:.2f}x | {rate} | {mem:.0f} | {err} |")
    print()
    auto_ratio = res["errors_auto"]["seconds"] / ag
    auto_met = auto_ratio <= 1.5 and acc["auto"]["all_pairs"] <= 1e-3
    print(f"goals: explain_rankings <= 1.5x distance GEMM: {e / dg:.2f}x "
          f"({'met' if e / dg <= 1.5 else 'NOT met'}); attribute_errors(auto) <= 1.5x GEMM and "
          f"error <= 1e-3: {auto_ratio:.2f}x, {acc['auto']['all_pairs']:.1e} "
          f"({'met' if auto_met else 'NOT met'})")
    overhead = 100.0 * (e / eu - 1.0)
    print(f"input check (validate, the default on concrete arrays): {overhead:+.1f} % of "
          f"explain_rankings (goal < 2 %: {'met' if overhead < 2 else 'NOT met'})")
    return {"sizes": {"Q": q, "G": g, "N": n, "A": a, "k": FLAGS.k, "pairs_queries": qs},
            "seconds": {name: r["seconds"] for name, r in res.items()},
            "peak_rss_mib": {name: r["peak_rss_mib"] for name, r in res.items()},
            "max_relative_error": acc, "validate_overhead_percent": overhead}


def _rank_metrics_print() -> dict:
    rm = _rank_metrics_bench()
    speed = rm["loop_s"] / rm["vectorised_s"]
    print()
    print(f"| rank_metrics ({FLAGS.num_query:,} queries x {FLAGS.num_gallery:,} gallery) "
          "| seconds |")
    print("|---|---|")
    print(f"| vectorised `rank_metrics` | {rm['vectorised_s']:.3f} |")
    print(f"| per-query numpy loop | {rm['loop_s']:.3f} |")
    print(f"speed-up {speed:.1f}x (goal >= 10x: {'met' if speed >= 10 else 'NOT met'}); "
          f"max |difference| {rm['max_abs_diff']:.1e}")
    return rm


if __name__ == "__main__":
    cli.run(main)
