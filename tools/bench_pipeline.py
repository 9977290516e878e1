r"""Measures the training input pipeline's throughput (images/s) on this machine.

Writes ``--num_images`` 128x64 JPEGs into a temporary folder (or reads ``--image_dir``), then
for each backend and worker count times ``--num_batches`` P x K training batches of the AGW
augmentation (decode, resize to ``--height`` x ``--width``, flip, pad + crop, normalise,
random erasing) after one warm-up batch, and prints a table: images/s, batches/s and the mean
time the consumer waited for a batch. With ``--step_ms`` the consumer sleeps that long per batch
(a training step on an accelerator), so ``wait_ms`` shows whether the workers keep up. Also
reports the single-thread cost of decoding and of augmenting one image.

  python tools/bench_pipeline.py --num_images=512 --num_batches=10 --num_workers=0,1,2,4
"""

from __future__ import annotations

import glob
import os
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from reid_jax.data import augment, loader

_NUM_IMAGES = flags.DEFINE_integer(
    "num_images", 512, "Images to generate (ignored with image_dir)."
)
_HEIGHT = flags.DEFINE_integer("height", 256, "Output height.")
_WIDTH = flags.DEFINE_integer("width", 128, "Output width.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per batch (P x K with K = 4).")
_NUM_WORKERS = flags.DEFINE_list("num_workers", ["0", "1", "2", "4"], "Worker counts to time.")
_BACKENDS = flags.DEFINE_list("backends", ["thread", "process"], "Loader backends to time.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 10, "Timed batches per setting.")
_IMAGE_DIR = flags.DEFINE_string("image_dir", None, "Use the *.jpg files under this folder.")
_STEP_MS = flags.DEFINE_float(
    "step_ms", 0.0, "Simulated training step (sleep) per batch; > 0 also reports the wait."
)

_K = 4


def write_images(folder: str, num_images: int, seed: int = 0) -> list[str]:
    """Writes ``num_images`` 128x64 RGB JPEGs (smooth colour fields + noise); returns paths."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:128, 0:64].astype(np.float32)
    paths = []
    for i in range(num_images):
        base = rng.uniform(0, 255, size=3)
        grad = rng.uniform(-1, 1, size=(2, 3))
        img = base + yy[..., None] * grad[0] + xx[..., None] * grad[1]
        img = img + rng.normal(0, 12, size=img.shape)
        path = os.path.join(folder, f"{i // 8:04d}_c1s1_{i:06d}_00.jpg")
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def time_single_thread(paths: list[str], config: augment.AugmentConfig) -> tuple[float, float]:
    """Milliseconds per image of decoding and of the train augmentation (one thread)."""
    n = min(len(paths), 256)
    t0 = time.perf_counter()
    images = [augment.read_image(p) for p in paths[:n]]
    t1 = time.perf_counter()
    rng = np.random.default_rng(0)
    for img in images:
        augment.train_transform(img, rng, config)
    t2 = time.perf_counter()
    return 1e3 * (t1 - t0) / n, 1e3 * (t2 - t1) / n


def time_loader(
    paths: list[str], config: loader.LoaderConfig, num_batches: int, step_s: float = 0.0
) -> tuple[float, float]:
    """Times ``train_batches`` over ``num_batches`` batches after one warm-up batch.

    Returns:
      (images/s, mean ms the consumer waited in ``next`` per batch). With ``step_s > 0`` the
      consumer sleeps that long per batch, like a training step running on an accelerator.
    """
    labels = np.arange(len(paths)) // 8
    with loader.train_batches(
        paths, labels, config=config, seed=0, stop_step=num_batches + 1
    ) as batches:
        next(batches)  # starts the workers (process spawn) and fills the prefetch queue
        count, waited = 0, 0.0
        t0 = time.perf_counter()
        for _ in range(num_batches):
            t = time.perf_counter()
            count += next(batches)["image"].shape[0]
            waited += time.perf_counter() - t
            if step_s:
                time.sleep(step_s)
        elapsed = time.perf_counter() - t0
    return count / elapsed, 1e3 * waited / num_batches


def main(argv: list[str]) -> None:
    del argv
    if _BATCH_SIZE.value % _K:
        raise ValueError(f"--batch_size must be a multiple of K={_K}, got {_BATCH_SIZE.value}")
    aug = augment.AugmentConfig(height=_HEIGHT.value, width=_WIDTH.value)
    with tempfile.TemporaryDirectory() as tmp:
        if _IMAGE_DIR.value:
            paths = sorted(glob.glob(os.path.join(_IMAGE_DIR.value, "**", "*.jpg"), recursive=True))
            if not paths:
                raise ValueError(f"--image_dir={_IMAGE_DIR.value}: no *.jpg files")
        else:
            paths = write_images(tmp, _NUM_IMAGES.value)
        decode_ms, augment_ms = time_single_thread(paths, aug)
        print(f"{len(paths)} images, cpu_count={os.cpu_count()}, output {aug.height}x{aug.width}")
        print(f"single thread: decode {decode_ms:.3f} ms/image, augment {augment_ms:.3f} ms/image")
        print(f"simulated step: {_STEP_MS.value} ms")
        print(f"{'backend':>8} {'workers':>7} {'images/s':>9} {'batches/s':>9} {'wait_ms':>8}")
        for backend in _BACKENDS.value:
            for workers in (int(w) for w in _NUM_WORKERS.value):
                if workers == 0 and backend != _BACKENDS.value[0]:
                    continue  # the in-thread path is the same for every backend
                config = loader.LoaderConfig(
                    p=_BATCH_SIZE.value // _K,
                    k=_K,
                    num_workers=workers,
                    backend=backend,
                    augment=aug,
                )
                rate, wait_ms = time_loader(paths, config, _NUM_BATCHES.value, _STEP_MS.value / 1e3)
                name = "inline" if workers == 0 else backend
                print(
                    f"{name:>8} {workers:>7} {rate:>9.0f} {rate / _BATCH_SIZE.value:>9.2f}"
                    f" {wait_ms:>8.1f}"
                )


if __name__ == "__main__":
    app.run(main)
