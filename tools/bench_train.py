r"""Measures AGW training and feature-extraction throughput (images/s) and compile times.

  python tools/bench_train.py --configs=configs/agw_synthetic.py,configs/agw_market1501.py \
      --batch_size=16 --steps=3

For every config: the model of ``config.model`` at ``config.data.height x width``, one global
batch of ``--batch_size`` random images (default: the config's P x K) with a P x K label
layout, the AGW loss and optimizer; ``train_step`` jitted over all devices as in training. The
compile time is ``jit(...).lower(...).compile()``; then ``--warmup`` untimed and ``--steps``
timed steps (each waits for its result).

Feature extraction: the eval-mode forward that ``reid_jax.embeddings.extract`` runs (its jitted
``_forward``: running BatchNorm statistics, output the retrieval embedding, post-BNNeck and
L2-normalised) on one batch of ``--eval_batch_size`` random images (default: the config's
``data.eval_batch_size``, else 64) on the default device, compiled separately
(``lower(...).compile()``), then ``--warmup`` untimed and ``--steps`` timed batches.

Data loading is not included in either (``tools/bench_pipeline.py`` measures the input
pipeline, ``tools/bench_extract.py`` extraction end to end). ``peak_memory_gib`` is the
device's peak memory in use after the train steps (accelerators only). Prints a table;
``--json`` also writes the rows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

from reid_jax import cli, embeddings
from reid_jax.models.agw import AGW
from reid_jax.train import loop, schedules
from reid_jax.train.state import create_train_state

_CONFIGS = flags.DEFINE_list(
    "configs", ["configs/agw_synthetic.py", "configs/agw_market1501.py"], "Config files.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 0, "Global batch (a multiple of K and of the device count); 0: config P x K.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
_EVAL_BATCH_SIZE = flags.DEFINE_integer(
    "eval_batch_size", 0, "Feature-extraction batch; 0: config.data.eval_batch_size (or 64).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 751, "Identities of the classifier.")
_DTYPE = flags.DEFINE_string("dtype", "", "Override config.dtype (float32 / bfloat16).")
_JSON = flags.DEFINE_string("json", "", "Also write the rows to this JSON file.")
_EXTRACTION = flags.DEFINE_bool("extraction", True, "Also time the feature-extraction forward.")


def peak_memory_gib() -> float | None:
    """Peak bytes in use on the first device so far (GPU / TPU), in GiB; None on the CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2**30, 2)


def load_config(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def bench_config(config: ml_collections.ConfigDict, batch_size: int, steps: int, warmup: int,
                 num_classes: int) -> dict:
    """Compile seconds and steady-state images/s of ``train_step`` for ``config``."""
    k = config.data.k
    if batch_size % k:
        raise ValueError(f"--batch_size={batch_size} must be a multiple of K={k}")
    mesh = loop.create_mesh()
    h, w = config.data.height, config.data.width
    model = AGW.from_config(config, num_classes, nnx.Rngs(config.seed))
    schedule = schedules.lr_schedule(config.optim.learning_rate, np.array([10_000]))
    state = jax.device_put(create_train_state(model, config, schedule),
                           loop.replicated(mesh))
    rng = np.random.default_rng(0)
    batch = loop.shard_batch({
        "image": rng.standard_normal((batch_size, h, w, 3), np.float32),
        "label": np.repeat(np.arange(batch_size // k) % num_classes, k).astype(np.int32),
    }, mesh)
    step_fn = loop.jit_train_step(mesh)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / max(steps, 1)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"benchmark loss is not finite: {loss}")
    params = sum(x.size for x in jax.tree.leaves(state.params))
    return {
        "width": config.model.width, "blocks": list(config.model.blocks),
        "image": f"{h}x{w}", "dtype": config.dtype, "batch": batch_size,
        "params_M": round(params / 1e6, 2), "compile_s": round(compile_s, 1),
        "step_s": round(step_s, 3), "images_per_s": round(batch_size / step_s, 1),
        "peak_memory_gib": peak_memory_gib(),
    }


def bench_extraction(config: ml_collections.ConfigDict, batch_size: int, steps: int,
                     warmup: int, num_classes: int) -> dict:
    """Compile seconds and steady-state images/s of the eval-mode forward of
    ``embeddings.extract`` for ``config`` (output: the retrieval embedding ``[B, D]``)."""
    if batch_size < 1:
        raise ValueError(f"--eval_batch_size={batch_size} must be >= 1")
    h, w = config.data.height, config.data.width
    model = AGW.from_config(config, num_classes, nnx.Rngs(config.seed))
    graphdef, state = embeddings._eval_state(model)
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((batch_size, h, w, 3), np.float32))
    t0 = time.perf_counter()
    compiled = embeddings._forward_jit.lower(graphdef, state, None, images,
                                            outputs=(embeddings.FEATURES,)).compile()
    compile_s = time.perf_counter() - t0
    out = None
    for _ in range(warmup):
        out = compiled(state, None, images)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = compiled(state, None, images)
        jax.block_until_ready(out)
    batch_s = (time.perf_counter() - t0) / max(steps, 1)
    features = np.asarray(out[embeddings.FEATURES], np.float64)
    if features.shape != (batch_size, model.feature_dim):
        raise ValueError(f"the forward returned features of shape {features.shape}, expected "
                         f"({batch_size}, {model.feature_dim})")
    norms = np.linalg.norm(features, axis=1)
    if not np.all(np.isfinite(norms)) or np.max(np.abs(norms - 1.0)) > 1e-3:
        raise FloatingPointError(f"retrieval embeddings are not L2-normalised: norms in "
                                 f"[{norms.min()}, {norms.max()}]")
    return {"extract_batch": batch_size, "extract_compile_s": round(compile_s, 1),
            "extract_batch_s": round(batch_s, 3),
            "extract_images_per_s": round(batch_size / batch_s, 1)}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _STEPS.value < 1:
        raise app.UsageError(f"--steps={_STEPS.value} must be >= 1")
    devices = jax.devices()
    print(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform})")
    rows = []
    for path in _CONFIGS.value:
        config = load_config(path)
        if _DTYPE.value:
            config.dtype = _DTYPE.value
        batch = _BATCH_SIZE.value or config.data.p * config.data.k
        eval_batch = _EVAL_BATCH_SIZE.value or int(
            config.data.get("eval_batch_size", embeddings.DEFAULT_BATCH_SIZE))
        row = {"config": os.path.basename(path),
               **bench_config(config, batch, _STEPS.value, _WARMUP.value, _NUM_CLASSES.value)}
        if _EXTRACTION.value:
            row.update(bench_extraction(config, eval_batch, _STEPS.value, _WARMUP.value,
                                        _NUM_CLASSES.value))
        rows.append(row)
        print(json.dumps(row), flush=True)
    header = ("config", "width", "blocks", "image", "dtype", "batch", "params_M", "compile_s",
              "step_s", "images_per_s", "peak_memory_gib")
    if _EXTRACTION.value:
        header += ("extract_batch", "extract_compile_s", "extract_batch_s",
                   "extract_images_per_s")
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print("  ".join(h.ljust(n) for h, n in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[h]).ljust(n) for h, n in zip(header, widths, strict=True)))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
