"""Host input pipeline: P x K training batches and padded evaluation batches.

Decoding (PIL) and augmentation (:mod:`reid_jax.data.augment`) run in a pool of workers,
``prefetch`` batches ahead of the consumer, so a training step finds its batch ready as long
as the workers keep up (``tools/bench_pipeline.py`` measures whether they do).

Guarantees:

* **Deterministic**: batch ``s`` of a training run is a pure function of ``(items, labels,
  config, seed, s)``: the sampler epoch comes from ``(seed, epoch)``
  (:mod:`reid_jax.data.sampler`) and each image's random draws from ``(seed, s, slot)``
  (:func:`reid_jax.data.augment.image_rng`). Worker count, backend and timing change nothing;
  batches come out in order.
* **Resumable**: ``train_batches(..., start_step=s)`` yields exactly the batches ``s, s+1, ...``
  of an uninterrupted run; pass the restored checkpoint's global step.
* **Fixed shapes**: training batches are always ``P * K``; the last evaluation batch is padded
  to ``batch_size`` (zero images, ``index = -1``, ``mask = False``) so a jitted function
  compiles once. Drop padded rows with ``mask`` when collecting outputs.
* **Clean shutdown**: ``close()`` (or ``with``, or garbage collection) cancels queued work and
  joins the workers; an exception in a worker is raised in the consuming thread as
  :class:`~reid_jax.data.augment.ImageLoadError` naming the file, after the pool is shut down.

Backends: ``"thread"`` (default) runs workers as threads writing straight into the batch
buffer (PIL's decode and resize, and numpy's larger array operations, release the GIL);
``"process"`` runs them in spawned processes (no GIL, but every image crosses a pipe);
``"grain"`` hands whole batches to ``grain``'s worker processes (``mp_prefetch``: each worker
builds a batch from its step number alone and passes it back through shared memory; no GIL,
the choice for many cores, see docs/scaling.md, "Input pipeline"); ``num_workers=0`` runs
everything in the calling thread (for debugging). Every backend gives the same batches.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import multiprocessing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from reid_jax.data import augment
from reid_jax.data.sampler import RandomIdentitySampler

Batch = dict[str, np.ndarray]

_BACKENDS = ("thread", "process", "grain")


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """Input pipeline settings.

    Attributes:
      p: identities per training batch.
      k: images per identity in a training batch.
      num_workers: parallel workers; 0 runs in the calling thread.
      prefetch: batches prepared ahead of the consumer (bounds memory: each in-flight train
        batch is ``P*K*H*W*3*4`` bytes, 25 MB at 64 x 256 x 128); with ``"grain"``, per worker.
      backend: ``"thread"``, ``"process"`` or ``"grain"``.
      images_per_task: images one worker handles per task.
      augment: the augmentation recipe (also gives H, W, mean and std for evaluation).
    """

    p: int = 16
    k: int = 4
    num_workers: int = 4
    prefetch: int = 4
    backend: str = "thread"
    images_per_task: int = 8
    augment: augment.AugmentConfig = dataclasses.field(default_factory=augment.AugmentConfig)

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"LoaderConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch < 1:
            raise ValueError(f"LoaderConfig.prefetch must be >= 1, got {self.prefetch}")
        if self.images_per_task < 1:
            raise ValueError(
                f"LoaderConfig.images_per_task must be >= 1, got {self.images_per_task}"
            )
        if self.backend not in _BACKENDS:
            raise ValueError(
                f"LoaderConfig.backend must be one of {_BACKENDS}, got {self.backend!r}"
            )

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LoaderConfig:
        """Builds a config from a flat mapping (e.g. an ``ml_collections.ConfigDict``).

        Keys are the fields of this class and of :class:`~reid_jax.data.augment.AugmentConfig`
        (``height``, ``width``, ``flip_prob``, ...); sequences become tuples.
        """
        if hasattr(values, "to_dict"):
            values = values.to_dict()
        own = {f.name for f in dataclasses.fields(cls)} - {"augment"}
        aug = {f.name for f in dataclasses.fields(augment.AugmentConfig)}
        unknown = sorted(set(values) - own - aug)
        if unknown:
            raise ValueError(
                f"LoaderConfig.from_dict: unknown keys {unknown}; known: {sorted(own | aug)}"
            )

        def plain(v: Any) -> Any:
            return tuple(v) if isinstance(v, (list, tuple)) else v

        return cls(
            **{n: plain(values[n]) for n in own if n in values},
            augment=augment.AugmentConfig(**{n: plain(values[n]) for n in aug if n in values}),
        )


@dataclasses.dataclass
class _Plan:
    """What one batch needs: its non-image fields, the images to read and their seeds."""

    fields: Batch
    items: list[Any]
    seeds: list[tuple[int, int, int]] | None  # None: evaluation transform
    size: int  # rows of the batch (padded rows beyond len(items) stay zero)


@dataclasses.dataclass(frozen=True)
class _TrainPlans:
    """Batch ``step`` of a training run (this process's rows) as a plan; picklable."""

    items: Sequence[Any]
    labels: np.ndarray  # int32 [N]
    sampler: RandomIdentitySampler
    seed: int
    first: int  # this process's first row of the global batch
    rows: int

    def __call__(self, step: int) -> _Plan:
        index = self.sampler.batch(step)[self.first:self.first + self.rows]
        return _Plan(
            fields={"label": self.labels[index], "index": index.copy()},
            items=[self.items[int(i)] for i in index],
            seeds=[(self.seed, step, self.first + slot) for slot in range(index.size)],
            size=index.size,
        )


@dataclasses.dataclass(frozen=True)
class _EvalPlans:
    """Evaluation batch ``b`` (padded to ``batch_size``) as a plan; picklable."""

    items: Sequence[Any]
    batch_size: int

    def __call__(self, b: int) -> _Plan:
        lo = b * self.batch_size
        real = min(self.batch_size, len(self.items) - lo)
        index = np.full(self.batch_size, -1, np.int32)
        index[:real] = np.arange(lo, lo + real, dtype=np.int32)
        return _Plan(
            fields={"index": index, "mask": index >= 0},
            items=[self.items[i] for i in range(lo, lo + real)],
            seeds=None,
            size=self.batch_size,
        )


@dataclasses.dataclass(frozen=True)
class _LoadBatch:
    """Plan number ``i`` read and transformed into a batch: what a grain worker runs."""

    plans: Any  # _TrainPlans | _EvalPlans
    config: augment.AugmentConfig

    def __call__(self, i: int) -> Batch:
        plan = self.plans(int(i))
        out = np.zeros((plan.size, self.config.height, self.config.width, 3), np.float32)
        augment.load_transform(plan.items, self.config, plan.seeds, out[:len(plan.items)])
        return {"image": out, **plan.fields}


def _load_into(
    items: list[Any],
    config: augment.AugmentConfig,
    seeds: list[tuple[int, int, int]] | None,
    out: np.ndarray,
) -> None:
    augment.load_transform(items, config, seeds, out)


class ReidLoader:
    """Iterator of batches (dicts of numpy arrays) with background workers.

    Build one with :func:`train_batches` or :func:`eval_batches`. Use it as a context manager
    or call :meth:`close` when stopping early; iterating to the end closes it too.

    Attributes:
      step: the global step of the next training batch (``None`` for evaluation loaders).
    """

    def __init__(
        self,
        plans: Iterator[_Plan],
        config: LoaderConfig,
        length: int | None,
        step: int | None = None,
        grain_batches: tuple[Any, int, int | None] | None = None,
    ) -> None:
        self._plans = plans
        self._config = config
        # (plans by number, first number, stop): the batches come from grain's workers.
        self._grain_batches = grain_batches
        self._grain_iterator: Any = None
        self._length = length
        self.step = step
        self.sampler: RandomIdentitySampler | None = None
        self._queue: collections.deque[tuple[_Plan, np.ndarray, list[tuple[int, cf.Future]]]]
        self._queue = collections.deque()
        self._executor: cf.Executor | None = None
        self._exhausted = False
        self._closed = False

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError("this loader is infinite (train_batches without stop_step)")
        return self._length

    def __iter__(self) -> ReidLoader:
        return self

    def __enter__(self) -> ReidLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    def _pool(self) -> cf.Executor:
        if self._executor is None:
            n = self._config.num_workers
            if self._config.backend != "process":
                self._executor = cf.ThreadPoolExecutor(n, thread_name_prefix="reid_loader")
            else:
                # spawn, not fork: forking a process that runs JAX's threads can deadlock.
                self._executor = cf.ProcessPoolExecutor(
                    n, mp_context=multiprocessing.get_context("spawn")
                )
        return self._executor

    def _submit(self, plan: _Plan) -> None:
        aug = self._config.augment
        out = np.zeros((plan.size, aug.height, aug.width, 3), np.float32)
        futures: list[tuple[int, cf.Future]] = []
        if self._config.num_workers > 0:
            pool = self._pool()
            step = self._config.images_per_task
            for lo in range(0, len(plan.items), step):
                hi = min(lo + step, len(plan.items))
                seeds = None if plan.seeds is None else plan.seeds[lo:hi]
                if self._config.backend == "thread":
                    fut = pool.submit(_load_into, plan.items[lo:hi], aug, seeds, out[lo:hi])
                else:
                    fut = pool.submit(augment.load_transform, plan.items[lo:hi], aug, seeds)
                futures.append((lo, fut))
        self._queue.append((plan, out, futures))

    def _fill(self) -> None:
        while not self._exhausted and len(self._queue) < self._config.prefetch:
            try:
                plan = next(self._plans)
            except StopIteration:
                self._exhausted = True
                break
            self._submit(plan)

    def _next_from_grain(self) -> Batch:
        if self._grain_iterator is None:
            self._grain_iterator = _grain_iterator(self._config, *self._grain_batches)
        return next(self._grain_iterator)

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        if self._grain_batches is not None and self._config.num_workers > 0:
            try:
                batch = self._next_from_grain()
            except StopIteration:
                self.close()
                raise
            except BaseException as e:
                self.close()
                if isinstance(e, augment.ImageLoadError):
                    raise
                if "ImageLoadError" in repr(e):  # raised in a worker: name it the same way
                    raise augment.ImageLoadError(str(e)) from e
                raise
            if self.step is not None:
                self.step += 1
            return batch
        try:
            self._fill()
            if not self._queue:
                self.close()
                raise StopIteration
            plan, out, futures = self._queue.popleft()
            if self._config.num_workers == 0:
                augment.load_transform(plan.items, self._config.augment, plan.seeds, out)
            for lo, fut in futures:
                result = fut.result()
                if result is not None:  # process backend: copy the returned chunk
                    out[lo : lo + result.shape[0]] = result
            self._fill()  # keep the workers busy while the consumer uses this batch
        except BaseException:
            self.close()
            raise
        if self.step is not None:
            self.step += 1
        return {"image": out, **plan.fields}

    def close(self) -> None:
        """Cancels queued work and joins the workers; idempotent."""
        if self._closed:
            return
        self._closed = True
        for _, _, futures in self._queue:
            for _, fut in futures:
                fut.cancel()
        self._queue.clear()
        if self._grain_iterator is not None:
            close = getattr(self._grain_iterator, "close", None)
            if close is not None:
                close()
            self._grain_iterator = None
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def _grain_iterator(config: LoaderConfig, plans: Any, start: int, stop: int | None) -> Any:
    """Batches ``start, start + 1, ...`` (to ``stop``) of ``plans`` from grain's workers.

    Each element is one whole batch, built in a worker process from its number alone (the
    sampler and the per-image seeds make it a pure function of the number), so the stream is
    the same for any worker count and resumes at any number (docs/scaling.md, "Input
    pipeline").
    """
    try:
        import grain
    except ImportError as e:
        raise ImportError("LoaderConfig.backend='grain' needs the grain package "
                          "(pip install grain)") from e
    from absl import flags

    if not flags.FLAGS.is_parsed():
        # grain reads its own absl flags; outside an absl app (a notebook, pytest) take their
        # defaults, as app.run would.
        flags.FLAGS.mark_as_parsed()
    # An endless stream is a range far beyond any run (grain indexes it lazily).
    stop = start + 2**40 if stop is None else stop
    dataset = grain.MapDataset.range(start, stop).map(_LoadBatch(plans, config.augment))
    options = grain.MultiprocessingOptions(num_workers=config.num_workers,
                                           per_worker_buffer_size=config.prefetch)
    return iter(dataset.to_iter_dataset().mp_prefetch(options))


def _as_config(config: LoaderConfig | Mapping[str, Any] | None) -> LoaderConfig:
    if config is None:
        return LoaderConfig()
    if isinstance(config, LoaderConfig):
        return config
    return LoaderConfig.from_dict(config)


def _check_items(items: Sequence[Any], name: str) -> None:
    if not hasattr(items, "__getitem__") or not hasattr(items, "__len__"):
        raise ValueError(f"{name}: items must be a sequence (paths, bytes or a data source)")
    if len(items) == 0:
        raise ValueError(f"{name}: no images")


def train_batches(
    items: Sequence[Any],
    labels: np.ndarray | Sequence[int],
    *,
    config: LoaderConfig | Mapping[str, Any] | None = None,
    seed: int,
    start_step: int = 0,
    stop_step: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> ReidLoader:
    """P x K training batches with the AGW augmentation, from global step ``start_step``.

    With several processes (multi-host data parallelism) each loads only its own rows of every
    global batch: process ``i`` of ``n`` gets rows ``[i * B/n, (i + 1) * B/n)``, the same images
    with the same random draws (keyed by the global slot) as those rows of the one-process
    batch, so the global batch is the same however many processes load it
    (docs/scaling.md, "Multi-host input").

    Args:
      items: [N] images (paths, encoded bytes, uint8 arrays, or records with an ``"image"``
        entry; any random-access sequence such as a TFDS data source).
      labels: int [N] identity labels (train labels 0..C-1 for the classifier).
      config: loader settings (or a flat mapping for :meth:`LoaderConfig.from_dict`);
        defaults to AGW's.
      seed: the run's seed.
      start_step: first global step to produce (the restored checkpoint's step).
      stop_step: produce steps ``start_step .. stop_step - 1``; None for an endless stream.
      process_index, process_count: this process and the number of processes
        (``jax.process_index()``, ``jax.process_count()``); ``P * K`` must be divisible by
        ``process_count``.

    Returns:
      A :class:`ReidLoader` yielding ``{"image": float32[B, H, W, 3], "label": int32[B],
      "index": int32[B]}`` with ``B = P * K / process_count`` (this process's rows);
      ``index`` points into ``items``.
      ``loader.sampler.locate(step)`` gives ``(epoch, batch in epoch)`` of a step.
    """
    config = _as_config(config)
    _check_items(items, "train_batches")
    labels = np.asarray(labels)
    if labels.shape != (len(items),):
        raise ValueError(
            f"train_batches: labels has shape {labels.shape}, expected ({len(items)},) "
            "(one label per image)"
        )
    if start_step < 0:
        raise ValueError(f"train_batches: start_step must be >= 0, got {start_step}")
    if stop_step is not None and stop_step < start_step:
        raise ValueError(f"train_batches: stop_step={stop_step} < start_step={start_step}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"train_batches: process_index={process_index} is not in "
                         f"[0, process_count={process_count})")
    if config.batch_size % process_count:
        raise ValueError(f"train_batches: the global batch P * K = {config.batch_size} must be "
                         f"divisible by the {process_count} processes loading it")
    sampler = RandomIdentitySampler(labels, config.p, config.k, seed=seed)
    rows = config.batch_size // process_count
    by_step = _TrainPlans(items, labels.astype(np.int32), sampler, seed,
                          process_index * rows, rows)

    def plans() -> Iterator[_Plan]:
        step = start_step
        while stop_step is None or step < stop_step:
            yield by_step(step)
            step += 1

    length = None if stop_step is None else stop_step - start_step
    loader = ReidLoader(plans(), config, length, step=start_step,
                        grain_batches=(by_step, start_step, stop_step)
                        if config.backend == "grain" else None)
    loader.sampler = sampler
    return loader


def eval_batches(
    items: Sequence[Any],
    batch_size: int = 128,
    *,
    config: LoaderConfig | Mapping[str, Any] | None = None,
) -> ReidLoader:
    """Evaluation batches (resize + normalise) in order, the last one padded.

    Args:
      items: [N] images, as for :func:`train_batches`.
      batch_size: rows per batch; every batch has exactly this many.
      config: loader settings (its ``augment`` gives H, W, interpolation, mean, std).

    Returns:
      A :class:`ReidLoader` of ``ceil(N / batch_size)`` batches ``{"image": float32[B, H, W,
      3], "index": int32[B], "mask": bool[B]}``; padded rows have a zero image,
      ``index = -1`` and ``mask = False``.
    """
    config = _as_config(config)
    _check_items(items, "eval_batches")
    if batch_size < 1:
        raise ValueError(f"eval_batches: batch_size must be >= 1, got {batch_size}")
    num_batches = -(-len(items) // batch_size)
    by_number = _EvalPlans(items, batch_size)
    plans = (by_number(b) for b in range(num_batches))
    return ReidLoader(plans, config, num_batches,
                      grain_batches=(by_number, 0, num_batches)
                      if config.backend == "grain" else None)


def batch_sharding(axis_name: str = "data") -> Any:
    """``NamedSharding`` splitting axis 0 over all devices (data parallel), rest replicated."""
    import jax

    mesh = jax.sharding.Mesh(np.array(jax.devices()), (axis_name,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis_name))


def to_device(batch: Batch, sharding: Any = None) -> dict[str, Any]:
    """Places a host batch on the devices, split along the batch axis.

    Args:
      batch: dict of arrays with a common leading batch axis B.
      sharding: a ``jax.sharding.NamedSharding`` whose spec shards axis 0 (default:
        :func:`batch_sharding` over all devices). With several processes, each passes its own
        rows and they are assembled into one global array.

    Returns:
      dict of ``jax.Array`` with the same keys.

    Raises:
      ValueError: if B is not divisible by the number of shards of axis 0.
    """
    import jax

    sharding = sharding if sharding is not None else batch_sharding()
    spec = sharding.spec
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    shards = int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1
    local_shards = shards // jax.process_count() if jax.process_count() > 1 else shards
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] % max(local_shards, 1):
            raise ValueError(
                f"to_device: batch[{key!r}] has shape {value.shape}; its leading axis must be "
                f"divisible by the {local_shards} shards of the batch axis"
            )
        if jax.process_count() > 1:
            out[key] = jax.make_array_from_process_local_data(sharding, value)
        else:
            out[key] = jax.device_put(value, sharding)
    return out


def global_to_device(batch: Batch, sharding: Any = None) -> dict[str, Any]:
    """Places a global host batch, the same on every process, on the devices along axis 0.

    With one process this is :func:`to_device`. With several, each passes only its contiguous
    slice of rows (process ``i`` of ``n``: rows ``[i * B/n, (i + 1) * B/n)``), so the global
    array is ``batch`` itself. The loaders here run the same deterministic batches on every
    host, which is how training and evaluation feed multi-host meshes.

    Args:
      batch: dict of arrays with a common leading batch axis B (the global batch).
      sharding: as :func:`to_device`.

    Returns:
      dict of global ``jax.Array`` with the same keys.
    """
    import jax

    nproc, pid = jax.process_count(), jax.process_index()
    local = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if nproc > 1:
            rows = value.shape[0] // nproc
            value = value[pid * rows:(pid + 1) * rows]
        local[key] = value
    return to_device(local, sharding)


def put_replicated(tree: Any, sharding: Any) -> Any:
    """Places a pytree whose values are the same on every process on the devices of ``sharding``.

    With one process this is ``jax.device_put``. With several, ``jax.device_put`` of host values
    first checks with a cross-process collective, one per leaf, that every process passes the
    same value; a slow process then makes the others time out (gloo waits 30 s) and a model has
    hundreds of leaves. Here each process builds its own shards from its own copy
    (``jax.make_array_from_callback``), which the deterministic initialisation makes equal
    (docs/scaling.md, "Multi-host training").
    """
    import jax

    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(leaf: Any) -> Any:
        host = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)
