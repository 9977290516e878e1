"""Where training and embedding extraction read Market-1501 from: ``config.data.source``.

* ``"folder"`` (default): the image files of the Market-1501-shaped folder ``config.data.root``
  (:func:`reid_jax.data.market1501.load_market1501`); a split's items are its file paths.
* ``"tfds"``: the ``market1501`` TFDS builder (:mod:`reid_jax.data.tfds_market1501`): one
  ``array_record`` file per split holding every image's encoded bytes with its labels, read
  with random access and no TensorFlow. A split's items are the records of the split's data
  source (``{"image": bytes, "pid": ..., ...}``), which the loader decodes like files. The
  dataset lives in ``config.data.tfds_data_dir`` (empty: TFDS's default,
  ``~/tensorflow_datasets``), config ``config.data.tfds_config`` (``"real"`` or
  ``"synthetic"``); when it is not prepared yet it is prepared from ``config.data.root``
  (process 0 does it, the others wait).

Both give the same :class:`~reid_jax.data.market1501.Market1501`: the same splits in the same
order (record ``i`` of a split is image ``i`` of the folder reader), pids, cameras, labels and
``Split.paths`` (for ``"tfds"``: the paths the images had in ``config.data.root``; without a
root, the split's name under the prepared folder, which only identify the image). So batches,
embeddings and metrics are the same whichever source is read; the TFDS one reads a few large
files instead of tens of thousands of small ones (docs/scaling.md, "Data sources").
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from absl import logging

from reid_jax.data import market1501 as market_lib

SOURCES = ("folder", "tfds")
TFDS_CONFIGS = ("real", "synthetic")
_METADATA_CHUNK = 1024


_data_section = market_lib.config_data_section


def source_name(config: Any) -> str:
    """``config.data.source`` ("folder" when missing); a ValueError naming the field if bad."""
    source = _data_section(config).get("source", "folder") or "folder"
    if source not in SOURCES:
        raise ValueError(f"config.data.source must be one of {SOURCES}, got {source!r}")
    return source


def load_data(data_root: str | os.PathLike | None, config: Any, *,
              verify_images: bool = False, skip_undecodable: bool = False
              ) -> market_lib.Market1501:
    """The dataset of ``config.data.source`` (see the module docstring).

    Args:
      data_root: the Market-1501-shaped folder (for ``"tfds"``: the folder to prepare from, and
        where ``Split.paths`` point; may be empty when the TFDS dataset is prepared).
      config: a config with a ``data`` section (``source``, ``tfds_data_dir``,
        ``tfds_config``); None: the folder source.
      verify_images, skip_undecodable: reader options of the folder source (the TFDS builder
        verifies every image while preparing).

    Raises:
      ValueError: an unknown source or TFDS config, or no ``data_root`` where one is needed.
      FileNotFoundError: the folder does not exist.
    """
    if source_name(config) == "folder":
        if not data_root:
            raise ValueError("config.data.root is empty: pass --config.data.root=/path/to/"
                             "Market-1501 (a real or tools/make_synthetic.py folder)")
        return market_lib.load_market1501(data_root, verify_images=verify_images,
                                          skip_undecodable=skip_undecodable)
    data = _data_section(config)
    return load_tfds(data_root, data.get("tfds_data_dir", "") or None,
                     data.get("tfds_config", "real") or "real")


def _builder(data_dir: str | None, tfds_config: str):
    from reid_jax.data import tfds_market1501 as builder_lib

    return builder_lib.Market1501Builder(data_dir=data_dir, config=tfds_config)


def _prepare(data_root: str | os.PathLike | None, data_dir: str | None, tfds_config: str):
    """The prepared builder; prepares it from ``data_root`` first when needed (process 0)."""
    import jax

    builder = _builder(data_dir, tfds_config)
    if builder.is_prepared():
        return builder
    if not data_root:
        raise ValueError(
            f"TFDS dataset market1501/{tfds_config} is not prepared in {builder.data_dir} and "
            "config.data.root is empty: pass --config.data.root=/path/to/Market-1501 to prepare "
            "it from that folder, or --config.data.tfds_data_dir=<where it was prepared>")
    if jax.process_index() == 0:
        import tensorflow_datasets as tfds

        logging.info("preparing TFDS market1501/%s from %s into %s", tfds_config, data_root,
                     builder.data_dir)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(data_root)))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("reid_jax.data.sources: market1501 prepared")
    return _builder(data_dir, tfds_config)


def _split_from_records(name: str, folder: str, records: Any, files: tuple[str, ...]
                        ) -> market_lib.Split:
    """A reader ``Split`` whose items are ``records`` (a TFDS data source of one split, read
    from the array_record ``files``)."""
    n = len(records)
    fields: dict[str, list[int]] = {k: [] for k in ("pid", "label", "camera", "sequence",
                                                   "frame")}
    names: list[str] = []
    for lo in range(0, n, _METADATA_CHUNK):
        for record in records.__getitems__(list(range(lo, min(lo + _METADATA_CHUNK, n)))):
            names.append(record["file_name"].decode() if isinstance(record["file_name"], bytes)
                         else str(record["file_name"]))
            for key, values in fields.items():
                values.append(int(record[key]))
    arrays = {k: np.asarray(v, np.int32) for k, v in fields.items()}
    for array in arrays.values():
        array.setflags(write=False)
    pid_to_label = dict(zip(arrays["pid"].tolist(), arrays["label"].tolist(), strict=True))
    return market_lib.Split(
        name=name, folder=folder, paths=tuple(os.path.join(folder, f) for f in names),
        pids=arrays["pid"], cameras=arrays["camera"], sequences=arrays["sequence"],
        frames=arrays["frame"], labels=arrays["label"], pid_to_label=pid_to_label,
        records=records, record_files=files)


def load_tfds(data_root: str | os.PathLike | None, data_dir: str | os.PathLike | None = None,
              tfds_config: str = "real") -> market_lib.Market1501:
    """Market-1501 from the ``market1501`` TFDS builder (prepared from ``data_root`` if needed).

    Args:
      data_root: the folder the dataset is (or was) prepared from: for config ``"real"`` the
        ``manual_dir`` holding ``Market-1501-v15.09.15/`` and the attribute file, for
        ``"synthetic"`` a ``tools/make_synthetic.py`` folder. May be None once prepared.
      data_dir: TFDS data_dir; None: TFDS's default.
      tfds_config: ``"real"`` or ``"synthetic"``.

    Returns:
      The splits, as the folder reader gives them, with ``Split.records`` set.
    """
    if tfds_config not in TFDS_CONFIGS:
        raise ValueError(f"config.data.tfds_config must be one of {TFDS_CONFIGS}, got "
                         f"{tfds_config!r}")
    data_dir = None if data_dir is None else os.path.abspath(os.fspath(data_dir))
    builder = _prepare(data_root, data_dir, tfds_config)
    sources = builder.as_data_source()
    if data_root:
        root = os.path.abspath(os.fspath(data_root))
        subdir = builder.builder_config.root_subdir
        root = os.path.join(root, subdir) if subdir else root
    else:
        root = os.fspath(builder.data_dir)
    splits = {name: _split_from_records(
        name, os.path.join(root, folder), sources[name],
        tuple(os.fspath(p) for p in builder.info.splits[name].filepaths))
        for name, folder in market_lib.SPLIT_FOLDERS.items()}
    data = market_lib.Market1501(root=root, **splits)
    logging.info("TFDS %s (%s)\n%s", builder.data_dir, builder.info.file_format, data.summary())
    return data


def reader_options(config: Any) -> dict[str, bool]:
    """``load_market1501`` reader options of ``config.data``: ``verify_images``,
    ``skip_undecodable`` (both False when missing).

    ``verify_images`` decodes every image once while the folder is read and fails on one that
    does not decode; ``skip_undecodable`` (needs ``verify_images``) leaves such images out
    instead (logged, ``Split.undecodable_skipped``).

    Raises:
      ValueError: a value that is not a bool, or ``skip_undecodable`` without ``verify_images``.
    """
    data = _data_section(config)
    options = {}
    for name in ("verify_images", "skip_undecodable"):
        value = data.get(name, False)
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"config.data.{name} must be a bool, got {value!r}")
        options[name] = bool(value)
    if options["skip_undecodable"] and not options["verify_images"]:
        raise ValueError("config.data.skip_undecodable=True needs config.data.verify_images=True "
                         "(images are only decoded while reading the folder when verified)")
    return options


def load_dataset(data_root: str | os.PathLike | None, config: Any = None, *,
                 need_queries: bool = False) -> market_lib.Market1501:
    """The dataset of ``config.data.source`` (:func:`load_data`) read with the options of
    ``config.data`` (:func:`reader_options`): how training and every tool scan a data root
    (once per run; pass the result on rather than scanning again).

    ``need_queries``: a clear ``ValueError`` first when the query folder holds no image (the
    explanation tools have nothing to explain then).
    """
    root = os.path.abspath(os.fspath(data_root)) if data_root else None
    if need_queries and root is not None:
        query_dir = os.path.join(root, market_lib.SPLIT_FOLDERS["query"])
        has_query = os.path.isdir(query_dir) and any(
            not e.startswith(".")
            and os.path.splitext(e)[1].lower() in market_lib.IMAGE_EXTENSIONS
            for e in os.listdir(query_dir))
        if not has_query and source_name(config) == "folder":
            raise ValueError(
                f"data root {root} has no query images: expected Market-1501 image files like "
                f"'0002_c1s1_000451_03.jpg' in {query_dir} (nothing to explain)")
    try:
        return load_data(root, config, **reader_options(config))
    except ValueError as e:
        if need_queries and f"split {'query'!r}" in str(e):
            raise ValueError(f"data root {root} has no usable query images: {e}") from e
        raise


__all__ = ["SOURCES", "TFDS_CONFIGS", "load_data", "load_dataset", "load_tfds", "reader_options",
           "source_name"]
