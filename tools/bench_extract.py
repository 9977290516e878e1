r"""Measures test-set embedding extraction end to end: read, decode, resize, forward (images/s).

Embeds the query and gallery splits of a Market-1501-shaped folder (``--data_root``; e.g. a
Market-sized ``tools/make_synthetic.py`` set) with ``reid_jax.embeddings.extract``, the path
training's evaluation and every tool use, for a randomly initialised model of ``--config``
(throughput does not depend on the weights), data parallel over all local devices. Each split
is embedded twice; the second pass (compiled, warm file cache) is the rate reported. Prints a
table; ``--json`` also writes it.

  python tools/bench_extract.py --data_root=/tmp/market_sized --config=configs/agw_market1501.py \
      --batch_size=256 --num_workers=16 --backend=grain --dtype=bfloat16
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
from absl import flags
from flax import nnx
from ml_collections import config_flags

from reid_jax import cli, embeddings
from reid_jax.data import sources
from reid_jax.models.agw import AGW
from reid_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", "configs/agw_market1501.py", "Model config.")
_DATA_ROOT = flags.DEFINE_string("data_root", None, "Market-1501-shaped folder.", required=True)
_SOURCE = flags.DEFINE_enum("source", "folder", ["folder", "tfds"], "config.data.source.")
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", "", "config.data.tfds_data_dir (tfds source).")
_TFDS_CONFIG = flags.DEFINE_enum("tfds_config", "synthetic", ["real", "synthetic"],
                                 "config.data.tfds_config (tfds source).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per forward.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 8, "Input pipeline workers.")
_BACKEND = flags.DEFINE_enum("backend", "thread", ["thread", "process", "grain"],
                             "Input pipeline backend.")
_DTYPE = flags.DEFINE_string("dtype", "", "Override config.dtype (float32 / bfloat16).")
_SPLITS = flags.DEFINE_list("splits", ["query", "gallery"], "Splits to embed.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    if _DTYPE.value:
        config.dtype = _DTYPE.value
    config.data.source = _SOURCE.value
    config.data.tfds_data_dir = _TFDS_DIR.value
    config.data.tfds_config = _TFDS_CONFIG.value
    data = sources.load_dataset(_DATA_ROOT.value, config)
    loader_config = dataclasses.replace(
        embeddings.eval_loader_config(config, num_workers=_NUM_WORKERS.value),
        backend=_BACKEND.value)
    mesh = loop.create_mesh(jax.local_devices())
    model = AGW.from_config(config, data.num_train_ids, nnx.Rngs(0))
    aug = loader_config.augment
    rows = []
    for name in _SPLITS.value:
        split = data.split(name)
        seconds = []
        for _ in range(2):
            t0 = time.perf_counter()
            out = embeddings.extract(model, split.items, height=aug.height, width=aug.width,
                                     batch_size=_BATCH_SIZE.value, mesh=mesh,
                                     loader_config=loader_config, description=name)
            seconds.append(time.perf_counter() - t0)
        n = out[embeddings.FEATURES].shape[0]
        rows.append({"split": name, "images": n, "first_s": round(seconds[0], 2),
                     "seconds": round(seconds[1], 2), "images_per_s": round(n / seconds[1], 1),
                     "batch": _BATCH_SIZE.value, "dtype": config.dtype,
                     "source": _SOURCE.value, "backend": _BACKEND.value,
                     "workers": _NUM_WORKERS.value, "devices": mesh.devices.size})
        print(json.dumps(rows[-1]), flush=True)
    total = sum(r["images"] for r in rows)
    total_s = sum(r["seconds"] for r in rows)
    print("| split | images | seconds (warm) | images/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['split']} | {r['images']} | {r['seconds']:.2f} | {r['images_per_s']:.0f} |")
    print(f"| all | {total} | {total_s:.2f} | {total / total_s:.0f} |")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"rows": rows, "images": total, "seconds": total_s,
                       "images_per_s": total / total_s}, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
