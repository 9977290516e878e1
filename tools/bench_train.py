r"""Measures AGW training throughput (images/s) and compile time of ``train_lib.train_step``.

  python tools/bench_train.py --configs=configs/agw_synthetic.py,configs/agw_market1501.py \
      --batch_size=16 --steps=3

For every config: the model of ``config.model`` at ``config.data.height x width``, one global
batch of ``--batch_size`` random images (default: the config's P x K) with a P x K label
layout, the AGW loss and optimizer; ``train_step`` jitted over all devices as in training. The
compile time is ``jit(...).lower(...).compile()``; then ``--warmup`` untimed and ``--steps``
timed steps (each waits for its result). Data loading is not included
(``tools/bench_pipeline.py`` measures the input pipeline). Prints a table; ``--json`` also
writes the rows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

from reid_jax import schedules, train_lib
from reid_jax.models.agw import AGW
from reid_jax.train_state import create_train_state

_CONFIGS = flags.DEFINE_list(
    "configs", ["configs/agw_synthetic.py", "configs/agw_market1501.py"], "Config files.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 0, "Global batch (a multiple of K and of the device count); 0: config P x K.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 751, "Identities of the classifier.")
_DTYPE = flags.DEFINE_string("dtype", "", "Override config.dtype (float32 / bfloat16).")
_JSON = flags.DEFINE_string("json", "", "Also write the rows to this JSON file.")


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
    mesh = train_lib.create_mesh()
    h, w = config.data.height, config.data.width
    model = AGW.from_config(config, num_classes, nnx.Rngs(config.seed))
    schedule = schedules.lr_schedule(config.optim.learning_rate, np.array([10_000]))
    state = jax.device_put(create_train_state(model, config, schedule),
                           train_lib.replicated(mesh))
    rng = np.random.default_rng(0)
    batch = train_lib.shard_batch({
        "image": rng.standard_normal((batch_size, h, w, 3), np.float32),
        "label": np.repeat(np.arange(batch_size // k) % num_classes, k).astype(np.int32),
    }, mesh)
    step_fn = train_lib.jit_train_step(mesh)
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
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    devices = jax.devices()
    print(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform})")
    rows = []
    for path in _CONFIGS.value:
        config = load_config(path)
        if _DTYPE.value:
            config.dtype = _DTYPE.value
        batch = _BATCH_SIZE.value or config.data.p * config.data.k
        row = {"config": os.path.basename(path),
               **bench_config(config, batch, _STEPS.value, _WARMUP.value, _NUM_CLASSES.value)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    header = ("config", "width", "blocks", "image", "dtype", "batch", "params_M", "compile_s",
              "step_s", "images_per_s")
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print("  ".join(h.ljust(n) for h, n in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[h]).ljust(n) for h, n in zip(header, widths, strict=True)))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main)
