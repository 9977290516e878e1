"""From a checkpoint to arrays: retrieval embeddings of images (cached per split) and the
attribute head's weights, for training's evaluation and every tool.

The embedding returned here is **the** retrieval embedding (``docs/design.md``, "One embedding
is ranked, classified and explained"): the tensor
that ``config.model.retrieval_feature`` / ``normalize_feature`` name (default: AGW's
post-BNNeck feature, L2-normalised; ``reid_jax.models.agw.retrieval_embedding`` documents the
choice), applied by the model itself (``AGW.retrieval_embedding``). It is the tensor that is
ranked (squared Euclidean distance), fed to the attribute head (``x = sigmoid(f @ W)``) and
explained (eq. 3.2), so every tool takes it from here.

* :func:`extract` / :func:`embed_images`: eval-mode forward of a model over images (paths or
  encoded bytes) in fixed-shape batches: the last batch is padded and its padded rows dropped
  by the loader's mask, so the jitted forward compiles once per (model, batch shape). Images of
  any size are resized to the model's input (``reid_jax.data.augment.eval_transform``: resize +
  ImageNet normalisation, as the reference's test transform). Eval mode means BatchNorm uses
  running statistics, so rows never interact and padding cannot change a feature. Progress
  (images/s, ETA) is logged every ``log_every_seconds``. This is the only jitted eval
  forward: training's periodic evaluation (``reid_jax.train.loop.evaluate_model``, data parallel
  over its mesh), the tools and the counterfactual embedding of
  ``reid_jax.explain.quality`` all go through it.
* :func:`cached_embeddings`: an ``.npz`` cache (``paths`` + ``features``) keyed by a JSON
  description of how the features were computed; reused when it matches, else recomputed and
  atomically replaced.
* :func:`load_split_embeddings` / :func:`split_embeddings`: the embeddings of Market-1501
  splits (``query``, ``gallery``, ``train``) of a checkpoint, with pids and cameras, cached. This
  is the entry point of ``tools/evaluate.py``, ``tools/train_attributes.py``,
  ``tools/explain.py``, ``tools/evaluate_explanations.py`` and ``tools/analyze.py``. They take
  the dataset a run scanned once (``reid_jax.data.sources.load_dataset``), so every part of a
  run sees the same image lists.
* :func:`head_weights`: ``W [N, A]`` of a checkpoint's attribute head
  (``reid_jax.checkpoints.NoAttributeHeadError`` when the step has none).

The cache key is a fingerprint of the model's weights (SHA-256 over every array of
``nnx.state(model)``), ``config.model``, the model's retrieval feature settings, the eval image
settings, the output names and the list of image files with their sizes and modification
times. A checkpoint step that only adds an attribute head (``tools/train_attributes.py``) has
the same weights and reuses the embeddings; a re-generated dataset with the same file names
does not.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from reid_jax import atomic_io, checkpoints
from reid_jax.data import augment, sources
from reid_jax.data import loader as loader_lib
from reid_jax.data.market1501 import (
    IMAGE_EXTENSIONS,
    SPLIT_FOLDERS,
    Market1501,
    config_data_section,
)
from reid_jax.models.agw import AGW, model_kwargs
from reid_jax.models.attribute_head import AttributeHead
from reid_jax.progress import ProgressLog

# Output names of :func:`extract`.
FEATURES = "features"  # [n, D] the retrieval embedding (default post-BN, L2-normed)
POST_BN = "post_bn"  # [n, D] post-BN before normalisation
PRE_BN = "pre_bn"  # [n, D] GeM feature before BNNeck
ATTRIBUTES = "attributes"  # [n, A] attribute probabilities sigmoid(features @ W)
OUTPUTS = (FEATURES, POST_BN, PRE_BN, ATTRIBUTES)

DEFAULT_BATCH_SIZE = 64
CACHE_FORMAT = "reid_jax.embeddings/1"
CACHE_SUBDIR = "embedding_cache"
_EVAL_IMAGE_FIELDS = ("height", "width", "interpolation", "mean", "std")


class SplitEmbeddings(NamedTuple):
    """The retrieval embeddings of one Market-1501 split, in the split's (file name) order.

    Attributes:
      split: 'query', 'gallery' or 'train'.
      paths: n absolute image paths.
      features: float32 [n, D], the retrieval embedding (the one that is ranked and explained;
        ``config.model.retrieval_feature``, default post-BN, L2-normalised).
      pids: int32 [n] identities as in the file names (0 = distractor in the gallery; the train
        split keeps its raw pids, not the 0..C-1 labels).
      cameras: int32 [n], 1..6.
    """

    split: str
    paths: tuple[str, ...]
    features: np.ndarray
    pids: np.ndarray
    cameras: np.ndarray


# ------------------------------------------------------------------------------ settings


def eval_loader_config(
    config: ml_collections.ConfigDict | Mapping[str, Any] | None,
    *,
    num_workers: int | None = None,
) -> loader_lib.LoaderConfig:
    """The evaluation input settings of ``config.data`` (height, width, interpolation, mean, std).

    Fields that only matter for training (flip, padding, erasing, P, K) are ignored; missing
    fields take the AGW defaults (256 x 128, bilinear, ImageNet mean/std). ``num_workers``
    defaults to ``config.data.num_workers`` or the loader's default.
    """
    data = config_data_section(config)
    kwargs = {}
    for name in _EVAL_IMAGE_FIELDS:
        if name in data and data[name] is not None:
            value = data[name]
            kwargs[name] = tuple(value) if isinstance(value, (list, tuple)) else value
    try:
        aug = augment.AugmentConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.data: {e}") from e
    if num_workers is None:
        num_workers = int(data.get("num_workers", loader_lib.LoaderConfig.num_workers))
    return loader_lib.LoaderConfig(num_workers=num_workers, augment=aug)


def eval_batch_size(config: ml_collections.ConfigDict | Mapping[str, Any] | None) -> int:
    """``config.data.eval_batch_size``, or ``DEFAULT_BATCH_SIZE`` when it is not set."""
    return int(config_data_section(config).get("eval_batch_size", DEFAULT_BATCH_SIZE))


def eval_image_settings(loader_config: loader_lib.LoaderConfig) -> dict[str, Any]:
    """The settings that change eval pixels, as a JSON-able dict (part of the cache key)."""
    aug = loader_config.augment
    return {"height": aug.height, "width": aug.width, "interpolation": aug.interpolation,
            "mean": list(aug.mean), "std": list(aug.std)}


# ------------------------------------------------------------------------------ forward


def _forward(
    graphdef: nnx.GraphDef, state: nnx.State, head_kernel: jax.Array | None,
    images: jax.Array, outputs: tuple[str, ...],
) -> dict[str, jax.Array]:
    """Eval-mode AGW outputs of ``images [B, H, W, 3]``: each ``[B, D]`` (attributes ``[B, A]``).

    ``features`` is the model's retrieval embedding (``AGW.retrieval_embedding``: the feature
    and normalisation of ``config.model``, static in ``graphdef``).
    """
    model = nnx.merge(graphdef, state)
    out = model(images)
    result = {}
    features = model.retrieval_embedding(out)
    for name in outputs:
        if name == FEATURES:
            result[name] = features
        elif name == POST_BN:
            result[name] = out.post_bn.astype(jnp.float32)
        elif name == PRE_BN:
            result[name] = out.pre_bn.astype(jnp.float32)
        elif name == ATTRIBUTES:
            logits = jnp.dot(features, head_kernel, precision=jax.lax.Precision.HIGHEST)
            result[name] = jax.nn.sigmoid(logits)
    return result


# One jit per process: graphdef and the output names are static, so every call with the same
# model structure and batch shape reuses the compiled forward.
_forward_jit = jax.jit(_forward, static_argnames=("graphdef", "outputs"))


@functools.lru_cache(maxsize=8)
def _forward_on_mesh(mesh: jax.sharding.Mesh) -> Callable[..., dict[str, jax.Array]]:
    """:func:`_forward` jitted for ``mesh``: outputs replicated, so every host can read them."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(_forward, static_argnames=("graphdef", "outputs"), out_shardings=replicated)


def _eval_state(model: AGW) -> tuple[nnx.GraphDef, nnx.State]:
    """graphdef and state of an eval-mode view of ``model`` (``model`` itself is not changed)."""
    view = nnx.view(model, use_running_average=True)
    return nnx.split(view)


def extract(
    model: AGW,
    items: Sequence[Any],
    *,
    height: int,
    width: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mesh: jax.sharding.Mesh | None = None,
    outputs: Sequence[str] = (FEATURES,),
    attribute_head: AttributeHead | None = None,
    loader_config: loader_lib.LoaderConfig | None = None,
    log_every_seconds: float = 30.0,
    description: str = "embedding",
) -> dict[str, np.ndarray]:
    """Eval-mode outputs of ``model`` for every image of ``items``, in order.

    Args:
      model: an ``AGW``; used in eval mode (running BatchNorm statistics) through a view, so the
        model, its mode and its state are left unchanged.
      items: [n] image paths or encoded image bytes (anything
        ``reid_jax.data.augment.read_image`` reads); any size, resized to ``height x width``.
      height, width: the model's input size.
      batch_size: rows per forward; the last batch is padded to it (one compile).
      mesh: optional ``jax.sharding.Mesh``; batches are split along its first axis (the batch
        size must be divisible by that axis' size), the weights and outputs replicated. A mesh
        over several processes works when every process calls this with the same items (each
        feeds its slice of every batch, ``reid_jax.data.loader.global_to_device``). Default:
        the default device.
      outputs: names among ``OUTPUTS``: ``"features"`` (the retrieval embedding,
        ``model.retrieval_embedding``: by default post-BN, L2-normalised), ``"post_bn"``,
        ``"pre_bn"`` (both raw), ``"attributes"`` (needs ``attribute_head``; of ``features``).
      attribute_head: the ``AttributeHead`` for ``"attributes"``.
      loader_config: input settings (workers, interpolation, mean, std); its height and width
        are replaced by ``height`` and ``width``. Default: AGW's eval transform.
      log_every_seconds: progress logging interval.
      description: what is embedded, for the progress log.

    Returns:
      ``{name: float32 [n, D]}`` (``[n, A]`` for attributes) for every requested name.

    Raises:
      ValueError: no images, an unknown output name, a bad batch size, an attribute head whose
        embedding size is not the model's.
      reid_jax.data.augment.ImageLoadError: an image does not decode (the message names it).
    """
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or not outputs:
        raise ValueError(f"outputs must be a non-empty subset of {OUTPUTS}, got {outputs}")
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs has duplicates: {outputs}")
    if not hasattr(items, "__len__") or not hasattr(items, "__getitem__"):
        raise ValueError("items must be a sequence of image paths or encoded bytes")
    if len(items) == 0:
        raise ValueError(f"{description}: no images to embed")
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    batch_size = int(batch_size)
    head_kernel = None
    if ATTRIBUTES in outputs:
        if attribute_head is None:
            raise ValueError("output 'attributes' needs an attribute_head")
        if attribute_head.embedding_dim != model.feature_dim:
            raise ValueError(
                f"attribute head expects embeddings of size {attribute_head.embedding_dim}, the "
                f"model produces {model.feature_dim}")
        head_kernel = jnp.asarray(attribute_head.kernel[...], jnp.float32)

    base = loader_config or loader_lib.LoaderConfig()
    config = dataclasses.replace(
        base, augment=dataclasses.replace(base.augment, height=int(height), width=int(width)))

    graphdef, state = _eval_state(model)
    image_sharding = None
    forward = _forward_jit
    if mesh is not None:
        axis = mesh.axis_names[0]
        shards = mesh.shape[axis]
        if batch_size % shards:
            raise ValueError(f"batch_size {batch_size} must be divisible by the {shards} devices "
                             f"of mesh axis {axis!r}")
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        image_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
        state = loader_lib.put_replicated(state, replicated)
        if head_kernel is not None:
            head_kernel = loader_lib.put_replicated(head_kernel, replicated)
        forward = _forward_on_mesh(mesh)

    n = len(items)
    collected: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    progress = ProgressLog(description, unit="images", interval=log_every_seconds)
    done = 0
    pending: tuple[dict[str, jax.Array], np.ndarray] | None = None

    def collect(result: dict[str, jax.Array], mask: np.ndarray) -> int:
        for name, value in result.items():
            collected[name].append(np.asarray(jax.device_get(value), np.float32)[mask])
        return int(mask.sum())

    with loader_lib.eval_batches(items, batch_size, config=config) as batches:
        for batch in batches:
            images = batch["image"]
            if image_sharding is not None:
                images = loader_lib.global_to_device({"image": images}, image_sharding)["image"]
            result = forward(graphdef, state, head_kernel, images, outputs=outputs)
            # Keep one batch in flight: fetch the previous one while this one runs.
            if pending is not None:
                done += collect(*pending)
                progress(done, n)
            pending = (result, batch["mask"])
    if pending is not None:
        done += collect(*pending)
        progress(done, n)
    return {name: np.concatenate(parts, axis=0) for name, parts in collected.items()}


def embed_images(
    model: AGW,
    items: Sequence[Any],
    *,
    height: int,
    width: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mesh: jax.sharding.Mesh | None = None,
    loader_config: loader_lib.LoaderConfig | None = None,
    log_every_seconds: float = 30.0,
) -> np.ndarray:
    """float32 [n, D] retrieval embeddings (``model.retrieval_embedding``) of ``items``, in order.

    ``extract(..., outputs=("features",))``; see :func:`extract` for the arguments.
    """
    return extract(model, items, height=height, width=width, batch_size=batch_size, mesh=mesh,
                   loader_config=loader_config, log_every_seconds=log_every_seconds)[FEATURES]


def attribute_probabilities(head: AttributeHead, features: np.ndarray,
                            batch_size: int = 4096) -> np.ndarray:
    """float32 [n, A] ``sigmoid(features @ W)`` of ``features [n, N]``, in row chunks."""
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or features.shape[1] != head.embedding_dim:
        raise ValueError(f"features must be [n, {head.embedding_dim}] (the head's embedding "
                         f"size), got shape {features.shape}")
    kernel = jnp.asarray(head.kernel[...], jnp.float32)
    parts = [np.asarray(_probabilities(kernel, jnp.asarray(features[lo:lo + batch_size])))
             for lo in range(0, features.shape[0], batch_size)]
    if not parts:
        return np.zeros((0, head.num_attributes), np.float32)
    return np.concatenate(parts, axis=0)


@jax.jit
def _probabilities(kernel: jax.Array, features: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(jnp.dot(features, kernel, precision=jax.lax.Precision.HIGHEST))


# ------------------------------------------------------------------------------ cache


def model_fingerprint(model: AGW | nnx.State) -> str:
    """SHA-256 (hex) of every array of ``nnx.state(model)``: paths, dtypes, shapes and bytes."""
    state = nnx.state(model) if isinstance(model, nnx.Module) else model
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    for path, leaf in leaves:
        value = np.asarray(jax.device_get(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def files_fingerprint(paths: Iterable[str]) -> str:
    """SHA-256 (hex) of ``(path, size, mtime_ns)`` of every file (a re-written image changes it)."""
    digest = hashlib.sha256()
    for path in paths:
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _key_json(key_info: Mapping[str, Any]) -> str:
    try:
        return json.dumps(key_info, sort_keys=True, separators=(",", ":"))
    except TypeError as e:
        raise ValueError(f"cached_embeddings: key_info must be JSON-serialisable: {e}") from None


def _read_cache(path: str, key: str, paths: np.ndarray) -> dict[str, np.ndarray] | None:
    """The cached arrays when ``path`` holds ``key`` and ``paths``; None otherwise."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        # A truncated or foreign file: the cache is recomputed.
        logging.warning("embedding cache %s is unreadable (%s); recomputing", path, e)
        return None
    if "key" not in arrays or "paths" not in arrays or FEATURES not in arrays:
        logging.info("embedding cache %s lacks key/paths/features; recomputing", path)
        return None
    if str(arrays["key"]) != key:
        logging.info("embedding cache %s was computed differently (model, config or image "
                     "settings changed); recomputing", path)
        return None
    if arrays["paths"].shape != paths.shape or not np.array_equal(arrays["paths"], paths):
        logging.info("embedding cache %s holds other images; recomputing", path)
        return None
    if arrays[FEATURES].shape[0] != paths.shape[0]:
        return None
    del arrays["key"]
    return arrays


def cached_embeddings(
    cache_path: str | os.PathLike | None,
    key_info: Mapping[str, Any],
    compute_fn: Callable[[], Mapping[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Embeddings from ``cache_path`` when it matches ``key_info``, else ``compute_fn()`` (saved).

    Args:
      cache_path: the ``.npz`` file; None disables caching (always computes, writes nothing).
      key_info: JSON-serialisable description of the computation, with ``"paths"``: the [n]
        image paths (strings), in order. The cache is reused only if every entry is equal (the
        tools put the model fingerprint, ``config.model``, image settings and a fingerprint of
        the files here).
      compute_fn: returns ``{"features": [n, D], ...}``: arrays with n rows.

    Returns:
      ``{"paths": str [n], "features": [n, D], ...}`` (the arrays of ``compute_fn``).

    The file holds ``paths``, the arrays and ``key`` (the JSON of ``key_info`` without paths);
    it is written to a temporary file in the same folder and moved into place with
    ``os.replace``, so a reader never sees half a file. An unreadable or mismatching file is
    recomputed and replaced.
    """
    if "paths" not in key_info:
        raise ValueError("cached_embeddings: key_info needs 'paths' (the image paths, in order)")
    paths = np.asarray([os.fspath(p) for p in key_info["paths"]], dtype=np.str_)
    key = _key_json({k: v for k, v in key_info.items() if k != "paths"} | {
        "format": CACHE_FORMAT})
    path = None if cache_path is None else os.fspath(cache_path)
    if path is not None:
        cached = _read_cache(path, key, paths)
        if cached is not None:
            logging.info("embeddings of %d images reused from %s", paths.shape[0], path)
            return cached
    computed = {name: np.asarray(value) for name, value in compute_fn().items()}
    if FEATURES not in computed:
        raise ValueError(f"cached_embeddings: compute_fn must return '{FEATURES}', got "
                         f"{sorted(computed)}")
    for name, value in computed.items():
        if name in ("paths", "key"):
            raise ValueError(f"cached_embeddings: compute_fn may not return {name!r}")
        if value.ndim < 1 or value.shape[0] != paths.shape[0]:
            raise ValueError(f"cached_embeddings: compute_fn's {name!r} has shape {value.shape}, "
                             f"expected {paths.shape[0]} rows (one per path)")
    result = {"paths": paths, **computed}
    if path is not None:
        atomic_io.save_npz(path, {**result, "key": np.asarray(key, dtype=np.str_)})
        logging.info("embeddings of %d images cached in %s", paths.shape[0], path)
    return result


# ------------------------------------------------------------------------------ splits


def default_cache_dir(checkpoint_dir: str | os.PathLike) -> str:
    """``CHECKPOINT_DIR/embedding_cache`` (orbax ignores non-step folders)."""
    return os.path.join(os.path.abspath(os.fspath(checkpoint_dir)), CACHE_SUBDIR)


def cache_dir_option(cache_dir: str | os.PathLike | None,
                     checkpoint_dir: str | os.PathLike) -> str | None:
    """A tool's ``--cache_dir``: None (not given): ``default_cache_dir(checkpoint_dir)``;
    ``""``: None (no cache); else the folder itself."""
    if cache_dir is None:
        return default_cache_dir(checkpoint_dir)
    return os.fspath(cache_dir) or None


def split_embeddings(
    model: AGW,
    config: ml_collections.ConfigDict | Mapping[str, Any] | None,
    data: Market1501 | str | os.PathLike,
    splits: Sequence[str] = ("query", "gallery"),
    cache_dir: str | os.PathLike | None = None,
    *,
    batch_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    num_workers: int | None = None,
) -> dict[str, SplitEmbeddings]:
    """Retrieval embeddings of Market-1501 ``splits`` of ``data`` by ``model`` (cached).

    Args:
      model: the AGW model (used through an eval-mode view; never changed).
      config: its config (``config.data`` gives the image settings and the reader options,
        ``config.model`` enters the cache key); None: AGW's defaults.
      data: the dataset as the run scanned it (``load_dataset(root, config)``), or a
        Market-1501-layout folder, which is then scanned here with ``config``'s reader options.
      splits: any of 'query', 'gallery', 'train'.
      cache_dir: folder of ``<split>.npz`` caches; None: no caching.
      batch_size: default ``config.data.eval_batch_size`` or 64.
      mesh: see :func:`extract`.
      num_workers: image loading threads (default ``config.data.num_workers`` or 4).

    Returns:
      ``{split: SplitEmbeddings}`` in the order of ``splits``.
    """
    for split in splits:
        if split not in SPLIT_FOLDERS:
            raise ValueError(f"unknown split {split!r}; expected some of {tuple(SPLIT_FOLDERS)}")
    if not isinstance(data, Market1501):
        data = sources.load_dataset(data, config)
    loader_config = eval_loader_config(config, num_workers=num_workers)
    height, width = loader_config.augment.height, loader_config.augment.width
    if batch_size is None:
        batch_size = eval_batch_size(config)
    fingerprint = None
    model_config = model_kwargs(config) if config is not None and "model" in config else None
    out = {}
    for split in splits:
        s = data.split(split)
        cache_path = None
        key_info: dict[str, Any] = {"paths": list(s.paths)}
        if cache_dir is not None:
            if fingerprint is None:
                fingerprint = model_fingerprint(model)
            cache_path = os.path.join(os.fspath(cache_dir), f"{split}.npz")
            key_info.update({
                "model_fingerprint": fingerprint,
                "model_config": {k: list(v) if isinstance(v, tuple) else v
                                 for k, v in (model_config or {}).items()},
                # What the model itself applies (it may have been built from another config).
                "retrieval": {"feature": model.retrieval_feature,
                              "normalize": model.normalize_feature},
                "image": eval_image_settings(loader_config),
                "files": files_fingerprint(s.source_files),
                "outputs": [FEATURES],
            })

        def compute(items: Sequence[Any] = s.items, name: str = split) -> dict[str, np.ndarray]:
            return extract(
                model, items, height=height, width=width, batch_size=batch_size,
                mesh=mesh, loader_config=loader_config, description=f"{name} embeddings")

        arrays = cached_embeddings(cache_path, key_info, compute)
        out[split] = SplitEmbeddings(
            split=split, paths=s.paths, features=np.asarray(arrays[FEATURES], np.float32),
            pids=np.asarray(s.pids, np.int32), cameras=np.asarray(s.cameras, np.int32))
    return out


def load_split_embeddings(
    checkpoint_dir: str | os.PathLike,
    config: ml_collections.ConfigDict | None,
    data: Market1501 | str | os.PathLike,
    splits: Sequence[str] = ("query", "gallery"),
    cache_dir: str | os.PathLike | None = None,
    *,
    step: int | None = None,
    batch_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    num_workers: int | None = None,
) -> dict[str, SplitEmbeddings]:
    """Retrieval embeddings of ``splits`` of ``data_root`` by the model of a checkpoint.

    Restores the AGW model of ``step`` (default: latest) of the orbax checkpoint directory
    ``checkpoint_dir`` (``reid_jax.checkpoints.restore_model``) and calls
    :func:`split_embeddings`.

    Args:
      checkpoint_dir: the checkpoint directory (e.g. ``WORKDIR/checkpoints``).
      config: the model's config; None: the config stored in the checkpoint.
      data: the scanned dataset, or a Market-1501-layout folder (see :func:`split_embeddings`).
      splits: any of 'query', 'gallery', 'train'.
      cache_dir: folder for ``<split>.npz`` caches (``default_cache_dir(checkpoint_dir)`` is
        what the tools use); None: no caching.
      step, batch_size, mesh, num_workers: see :func:`split_embeddings`.

    Returns:
      ``{split: SplitEmbeddings}``; ``features`` are float32 [n, D], the retrieval embedding
      (``config.model.retrieval_feature`` of the config used; default post-BN, L2-normalised).

    Raises:
      FileNotFoundError: no checkpoint directory / no checkpoint in it, or no data.
    """
    model, meta = checkpoints.restore_model(checkpoint_dir, config, step)
    if config is None:
        config = ml_collections.ConfigDict(meta.get("config", {}))
    return split_embeddings(model, config, data, splits, cache_dir, batch_size=batch_size,
                            mesh=mesh, num_workers=num_workers)


def restore_config(checkpoint_dir: str | os.PathLike, config: Any = None,
                   step: int | None = None) -> ml_collections.ConfigDict:
    """``config`` if given, else the config stored with the checkpoint step (default: latest)."""
    if config is not None:
        return config
    return ml_collections.ConfigDict(checkpoints.restore_meta(checkpoint_dir, step).get(
        "config", {}))


def head_weights(checkpoint_dir: str | os.PathLike, step: int | None = None) -> np.ndarray:
    """float32 ``W [N, A]`` of the attribute head of ``step`` (default: latest).

    Raises:
      reid_jax.checkpoints.NoAttributeHeadError: the step has no head (the message says how
        to train one).
    """
    head = checkpoints.restore_attribute_head(checkpoint_dir, step)
    return np.asarray(head.kernel[...], np.float32)


def query_gallery_embeddings(checkpoint_dir: str | os.PathLike, config: Any, data: Market1501,
                             cache_dir: str | os.PathLike | None, *, step: int | None = None
                             ) -> tuple[np.ndarray, np.ndarray]:
    """float32 query ``[Q, N]`` and gallery ``[G, N]`` embeddings of ``data`` by the model of a
    checkpoint (cached in ``cache_dir``), rows in the order of ``data.query`` / ``data.gallery``.
    """
    out = load_split_embeddings(checkpoint_dir, config, data, ("query", "gallery"), cache_dir,
                                step=step)
    return out["query"].features, out["gallery"].features


def resolve_data_root(
    data_root: str | os.PathLike | None,
    config: ml_collections.ConfigDict | Mapping[str, Any] | None,
    checkpoint_dir: str | os.PathLike,
) -> str:
    """``data_root`` if given, else ``config.data.root`` (``config=None``: the checkpoint's).

    Raises:
      ValueError: neither names a folder.
    """
    if data_root:
        return os.path.abspath(os.fspath(data_root))
    if config is None:
        config = checkpoints.restore_meta(checkpoint_dir).get("config", {})
    data = config.get("data") if hasattr(config, "get") else None
    root = data.get("root") if data is not None else None
    if not root:
        raise ValueError("no data root: pass --data_root=/path/to/Market-1501 (or a synthetic "
                         "folder); the config has no data.root")
    return os.path.abspath(os.fspath(root))


def list_images(image_dir: str | os.PathLike) -> tuple[str, ...]:
    """Absolute paths of the image files below ``image_dir`` (recursive), sorted.

    Image files have the extensions ``reid_jax.data.market1501.IMAGE_EXTENSIONS``; hidden files
    and folders are skipped.

    Raises:
      FileNotFoundError: ``image_dir`` is not a folder.
      ValueError: it holds no image file.
    """
    root = os.path.abspath(os.fspath(image_dir))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.join(folder, name))
    if not found:
        raise ValueError(f"image folder {root} holds no images (extensions "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    return tuple(sorted(found))
