r"""Measures the training input pipeline's throughput (images/s, and per CPU core) on this machine.

Writes a synthetic Market-1501-shaped folder (``reid_jax.synthetic``: 128 x 64 JPEGs like the
real ones; or reads ``--data_root``) and, for the ``tfds`` source, prepares its ``market1501``
TFDS array_record files. Then for every source, backend and worker count it times
``--num_batches`` P x K training batches of the AGW augmentation (decode, resize to
``--height`` x ``--width``, flip, pad + crop, normalise, random erasing) after one warm-up
batch, and prints a table: images/s (wall clock), images per CPU second (what one core
sustains: CPU time of the process and its worker processes, so other jobs on the machine do not
change it; start-up cancelled by differencing two run lengths), and the mean time the consumer
waited for a batch (with ``--step_ms`` the consumer sleeps that long per
batch, like a training step on an accelerator).

Also measured:

* the single-thread CPU cost of one image per source: reading the item (a file, or a record
  of the array_record file) and decoding it, and augmenting it;
* ``--gil_probe``: the GIL time per image of the ``thread`` backend. A probe thread counts a
  pure-Python loop while one loader thread works; the loss of probe iterations is the time
  the loader held the GIL. Threads cannot go past ``1 / (GIL seconds per image)`` images/s
  however many cores there are: the thread backend's ceiling;
* the cores a ``--target`` images/s accelerator (default 2,500: AGW on one H200-class GPU)
  needs at the measured rate per core.

  python tools/bench_pipeline.py --num_batches=10 --num_workers=1,2 \
      --backends=thread,process,grain --sources=folder,tfds
"""

from __future__ import annotations

import json
import os
import platform
import resource
import tempfile
import threading
import time

import numpy as np
from absl import flags

from reid_jax import cli, synthetic
from reid_jax.data import augment, loader, sources

_DATA_ROOT = flags.DEFINE_string(
    "data_root", None, "A Market-1501-shaped folder (default: a synthetic one, written here).")
_NUM_IDS = flags.DEFINE_integer("num_ids", 40, "Train identities of the synthetic folder.")
_SOURCES = flags.DEFINE_list("sources", ["folder", "tfds"], "config.data.source values.")
_BACKENDS = flags.DEFINE_list("backends", ["thread", "process", "grain"], "Loader backends.")
_NUM_WORKERS = flags.DEFINE_list("num_workers", ["0", "1", "2"], "Worker counts to time.")
_HEIGHT = flags.DEFINE_integer("height", 256, "Output height.")
_WIDTH = flags.DEFINE_integer("width", 128, "Output width.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per batch (P x K with K = 4).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 10, "Timed batches per setting.")
_STEP_MS = flags.DEFINE_float(
    "step_ms", 0.0, "Simulated training step (sleep) per batch; > 0 also reports the wait.")
_GIL_PROBE = flags.DEFINE_bool("gil_probe", True, "Measure the thread backend's GIL time.")
_TARGET = flags.DEFINE_float("target", 2500.0, "Images/s an accelerator consumes.")
_JSON = flags.DEFINE_string("json", None, "Also write the measurements to this JSON file.")

_K = 4


def make_data(folder: str) -> str:
    """A synthetic Market-1501-shaped folder (with attributes, so TFDS can prepare it)."""
    root = os.path.join(folder, "market")
    synthetic.generate_dataset(root, synthetic.DatasetConfig(
        num_train_ids=_NUM_IDS.value, num_test_ids=4, images_per_id=12, num_distractors=0,
        num_junk=0, seed=0))
    return root


def load_source(name: str, root: str, tfds_dir: str):
    config = {"data": {"source": name, "tfds_data_dir": tfds_dir,
                       "tfds_config": "synthetic" if _DATA_ROOT.value is None else "real"}}
    return sources.load_data(root, config)


def time_single_thread(items, config: augment.AugmentConfig) -> tuple[float, float]:
    """CPU milliseconds per image of reading + decoding and of the train augmentation."""
    n = min(len(items), 256)
    t0 = time.thread_time()
    images = [augment.read_image(items[i]) for i in range(n)]
    t1 = time.thread_time()
    rng = np.random.default_rng(0)
    for img in images:
        augment.train_transform(img, rng, config)
    t2 = time.thread_time()
    return 1e3 * (t1 - t0) / n, 1e3 * (t2 - t1) / n


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (worker processes), user + system."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def run_loader(items, labels, config: loader.LoaderConfig, num_batches: int,
               step_s: float) -> tuple[float, float, float, int]:
    """Consumes ``num_batches`` + 1 batches (the first warms up; the loader then stops, so no
    batch is made that is not consumed). Returns (wall s of the last ``num_batches``, mean ms
    waited per batch, CPU s of the whole run incl. start-up and worker processes, images)."""
    cpu0 = cpu_seconds()
    with loader.train_batches(items, labels, config=config, seed=0,
                              stop_step=num_batches + 1) as batches:
        count = next(batches)["image"].shape[0]  # starts the workers, fills the queue
        waited = 0.0
        t0 = time.perf_counter()
        for _ in range(num_batches):
            t = time.perf_counter()
            count += next(batches)["image"].shape[0]
            waited += time.perf_counter() - t
            if step_s:
                time.sleep(step_s)
        elapsed = time.perf_counter() - t0
    return elapsed, 1e3 * waited / max(num_batches, 1), cpu_seconds() - cpu0, count


def time_loader(items, labels, config: loader.LoaderConfig, num_batches: int,
                step_s: float = 0.0) -> tuple[float, float, float]:
    """(wall images/s, mean ms waited per batch, images per CPU second).

    Images per CPU second is what one core sustains, measured by CPU time rather than wall time
    so that other jobs on the machine do not change it: the difference of a run of
    ``num_batches`` and a run of ``num_batches // 2`` batches, which cancels start-up (worker
    processes importing, spawning) and leaves the per-image cost.
    """
    elapsed, wait_ms, cpu_long, n_long = run_loader(items, labels, config, num_batches, step_s)
    _, _, cpu_short, n_short = run_loader(items, labels, config, num_batches // 2, 0.0)
    # NaN when the difference is not positive: CPU time of worker processes that were not yet
    # reaped is not counted (RUSAGE_CHILDREN), which start-up noise can outweigh.
    cpu = cpu_long - cpu_short
    per_cpu_second = (n_long - n_short) / cpu if cpu > 0 else float("nan")
    return (n_long - labels_batch(config)) / elapsed, wait_ms, per_cpu_second


def labels_batch(config: loader.LoaderConfig) -> int:
    return config.batch_size


def _probe_rate(stop: threading.Event, out: list[float]) -> None:
    count = 0
    t0 = time.perf_counter()
    while not stop.is_set():
        for _ in range(1000):
            count += 1
    out.append(count / (time.perf_counter() - t0))


def gil_seconds_per_image(items, labels, config: loader.LoaderConfig,
                          num_batches: int) -> tuple[float, float]:
    """(GIL seconds per image of one loader thread, its images/s while probed)."""
    stop, idle = threading.Event(), []
    probe = threading.Thread(target=_probe_rate, args=(stop, idle))
    probe.start()
    time.sleep(1.0)
    stop.set()
    probe.join()
    one = loader.LoaderConfig(p=config.p, k=config.k, num_workers=1, prefetch=2,
                              backend="thread", augment=config.augment)
    with loader.train_batches(items, labels, config=one, seed=1,
                              stop_step=num_batches + 1) as batches:
        next(batches)
        stop, busy = threading.Event(), []
        probe = threading.Thread(target=_probe_rate, args=(stop, busy))
        t0 = time.perf_counter()
        probe.start()
        count = sum(next(batches)["image"].shape[0] for _ in range(num_batches))
        stop.set()
        probe.join()
        elapsed = time.perf_counter() - t0
    held = max(0.0, 1.0 - busy[0] / idle[0]) * elapsed
    return held / count, count / elapsed


def main(argv: list[str]) -> None:
    del argv
    if _BATCH_SIZE.value % _K:
        raise ValueError(f"--batch_size must be a multiple of K={_K}, got {_BATCH_SIZE.value}")
    cores = len(os.sched_getaffinity(0))
    aug = augment.AugmentConfig(height=_HEIGHT.value, width=_WIDTH.value)
    results: dict = {"cores": cores, "machine": platform.processor() or platform.machine(),
                     "output": [aug.height, aug.width], "batch_size": _BATCH_SIZE.value,
                     "single_thread": {}, "loader": [], "target": _TARGET.value}
    with tempfile.TemporaryDirectory() as tmp:
        root = _DATA_ROOT.value or make_data(tmp)
        data = {name: load_source(name, root, os.path.join(tmp, "tfds"))
                for name in _SOURCES.value}
        n = len(next(iter(data.values())).train)
        print(f"{n} train images, {cores} cores, output {aug.height}x{aug.width}, "
              f"batch {_BATCH_SIZE.value}, simulated step {_STEP_MS.value} ms")
        for name, d in data.items():
            read_ms, augment_ms = time_single_thread(d.train.items, aug)
            results["single_thread"][name] = {"read_decode_ms": read_ms, "augment_ms": augment_ms}
            print(f"single thread, {name}: read + decode {read_ms:.3f} ms/image, augment "
                  f"{augment_ms:.3f} ms/image ({1e3 / (read_ms + augment_ms):.0f} images/s)")
        print()
        print("| source | backend | workers | images/s (wall) | images per CPU second | "
              "wait ms |")
        print("|---|---|---|---|---|---|")
        for name, d in data.items():
            for backend in _BACKENDS.value:
                for workers in (int(w) for w in _NUM_WORKERS.value):
                    if workers == 0 and backend != _BACKENDS.value[0]:
                        continue  # the in-thread path is the same for every backend
                    config = loader.LoaderConfig(p=_BATCH_SIZE.value // _K, k=_K,
                                                 num_workers=workers, backend=backend,
                                                 augment=aug)
                    rate, wait_ms, per_core = time_loader(
                        d.train.items, d.train.labels, config, _NUM_BATCHES.value,
                        _STEP_MS.value / 1e3)
                    label = "inline" if workers == 0 else backend
                    results["loader"].append({"source": name, "backend": label,
                                              "workers": workers, "images_per_s": rate,
                                              "images_per_s_per_core": per_core,
                                              "wait_ms": wait_ms})
                    print(f"| {name} | {label} | {workers} | {rate:.0f} | {per_core:.0f} | "
                          f"{wait_ms:.1f} |", flush=True)
        print()
        if _GIL_PROBE.value:
            for name, d in data.items():
                gil_s, probed_rate = gil_seconds_per_image(
                    d.train.items, d.train.labels,
                    loader.LoaderConfig(p=_BATCH_SIZE.value // _K, k=_K, augment=aug),
                    _NUM_BATCHES.value)
                ceiling = 1.0 / gil_s if gil_s > 0 else float("inf")
                results.setdefault("gil", {})[name] = {"gil_ms_per_image": 1e3 * gil_s,
                                                       "thread_ceiling_images_per_s": ceiling}
                print(f"GIL, {name}: {1e3 * gil_s:.3f} ms held per image (one thread at "
                      f"{probed_rate:.0f} images/s while probed): thread backend ceiling "
                      f"{ceiling:.0f} images/s on any number of cores")
        best = {}
        for row in results["loader"]:
            if row["workers"] >= 1:
                key = (row["source"], row["backend"])
                if np.isfinite(row["images_per_s_per_core"]):
                    best[key] = min(best.get(key, np.inf), row["images_per_s_per_core"])
        for (name, backend), per_core in sorted(best.items()):
            need = _TARGET.value / per_core
            results.setdefault("cores_needed", {})[f"{name}/{backend}"] = need
            print(f"cores for {_TARGET.value:.0f} images/s, {name}/{backend} at {per_core:.0f} "
                  f"images per CPU second (the lowest over worker counts): {need:.1f}")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
