"""Attribute maps of an explanation run: one ``maps/<query stem>.npz`` per explained query.

``tools/explain.py --attribute_maps`` (``config.explain.attribute_maps``) computes, for every
mapped query and its top ``k``, the evidence maps of all ``1 + k`` images and the contribution
maps of the ``k`` pairs in the run's mode (``reid_jax.explain.maps``; docs/attribute_maps.md,
'Outputs'), and writes them with :func:`write_query_maps`:

====================== ================== ==========================================================
``attributes``         str ``[A]``        attribute names (``ATTRIBUTE_NAMES`` order)
``gallery_paths``      str ``[k]``        gallery files, relative to the data root
``query_probabilities`` f32 ``[A]``       ``x_a = sigmoid(z_a)`` of the query
``gallery_probabilities`` f32 ``[k, A]``  the same for the ranked images
``query_evidence``     f32 ``[A, H, W]``  evidence map of ``z_a`` over the query (logit units)
``gallery_evidence``   f32 ``[k, A, H, W]`` the same over each ranked image
``query_contribution`` f32 ``[k, A, H, W]`` pair ``(q, g_r)``: the query's part of ``e_a``
``gallery_contribution`` f32 ``[k, A, H, W]`` pair ``(q, g_r)``: the gallery image's part
``errors``             f32 ``[k, A]``     the pairs' ``e_a`` (eq. 3.2 or complete weights)
``mode``               str                ``paper`` or ``complete``
====================== ================== ==========================================================

``H x W`` is the stored query image's size (128 x 64 for Market-1501): maps are computed at
the model input's size and brought there by :func:`reid_jax.explain.maps.resize_maps`, which
keeps every map's sum, so ``query_contribution[r, a].sum() + gallery_contribution[r, a].sum()``
is ``errors[r, a]`` (up to rounding with DeepLIFT, the quadrature error with integrated
gradients). Images are read with the evaluation transform
of ``config.data`` (:func:`model_inputs`), the transform behind the run's embeddings, so the
maps decompose the embedding that was ranked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from scipy import special

from reid_jax import atomic_io
from reid_jax.data import augment
from reid_jax.data.attributes import ATTRIBUTE_NAMES
from reid_jax.explain import maps as maps_lib

MAPS_NAME = "maps"
MAP_MODES = ("paper", "complete")
FIELDS = ("attributes", "gallery_paths", "query_probabilities", "gallery_probabilities",
          "query_evidence", "gallery_evidence", "query_contribution", "gallery_contribution",
          "errors", "mode")


def check_mode(mode: str) -> None:
    """Contribution maps decompose eq. 3.2's ``e_a`` (paper or complete weights) only."""
    if mode not in MAP_MODES:
        raise ValueError(f"--attribute_maps needs --mode=paper or --mode=complete (contribution "
                         f"maps decompose e_a of eq. 3.2), got mode {mode!r}")


def model_inputs(paths: Sequence[str], augment_config: augment.AugmentConfig) -> np.ndarray:
    """float32 ``[B, H, W, 3]``: the images at ``paths`` through the evaluation transform."""
    return np.stack([augment.eval_transform(augment.read_image(p), augment_config)
                     for p in paths]).astype(np.float32)


def stored_size(path: str) -> tuple[int, int]:
    """``(height, width)`` of the image file at ``path``."""
    with Image.open(path) as im:
        return im.height, im.width


def reference_paths(paths: Sequence[str], count: int) -> list[str]:
    """``count`` of ``paths`` evenly spaced in their order (all of them when fewer)."""
    if count <= 0 or not paths:
        return []
    if count >= len(paths):
        return list(paths)
    return [paths[i] for i in np.linspace(0, len(paths) - 1, count).round().astype(int)]


def map_baseline(model: Any, gallery_paths: Sequence[str], augment_config: augment.AugmentConfig,
                 *, count: int, layer: int) -> np.ndarray | None:
    """The maps' path start of a run: the mean feature map at ``layer`` of ``count`` gallery
    images evenly spaced in file order (``config.explain.map_reference_images``), or None for
    ``count == 0`` (zeros; docs/attribute_maps.md, 'Baseline')."""
    chosen = reference_paths(gallery_paths, count)
    if not chosen:
        return None
    return np.asarray(maps_lib.reference_baseline(
        model, model_inputs(chosen, augment_config), layer=layer), np.float32)


def query_maps(model: Any, weights: np.ndarray, query_path: str, gallery_paths: Sequence[str],
               augment_config: augment.AugmentConfig, *, mode: str,
               steps: int = maps_lib.DEFAULT_STEPS, layer: int = maps_lib.DEFAULT_LAYER,
               baseline: np.ndarray | None = None,
               method: str = maps_lib.DEFAULT_METHOD) -> dict[str, np.ndarray]:
    """The arrays of one query's npz (see the module docstring), without ``gallery_paths``.

    Args:
      model: the run's AGW (eval mode through a view; not changed).
      weights: ``[N, A]`` attribute-head weights.
      query_path, gallery_paths: image files of the query and its ranked images.
      augment_config: the evaluation transform (``embeddings.eval_loader_config(c).augment``).
      mode: ``paper`` or ``complete``.
      steps: quadrature nodes (integrated gradients); layer, baseline: where the maps are taken
        and what they start from (``reid_jax.explain.maps.evidence_maps``,
        :func:`map_baseline`); method: how the maps are computed (``maps.MAP_METHODS``).
    """
    check_mode(mode)
    if not gallery_paths:
        raise ValueError("query_maps needs at least one ranked gallery image")
    images = model_inputs([query_path, *gallery_paths], augment_config)
    h, w = stored_size(query_path)
    ev = maps_lib.evidence_maps(model, weights, images, steps=steps, layer=layer,
                                baseline=baseline, method=method)
    cm = maps_lib.contribution_maps(model, weights, images[:1], images[1:],
                                    complete=mode == "complete", steps=steps, layer=layer,
                                    baseline=baseline, method=method)
    evidence = np.asarray(maps_lib.resize_maps(ev.maps, h, w), np.float32)
    probabilities = special.expit(np.asarray(ev.logits, np.float64))
    return {
        "attributes": np.asarray(ATTRIBUTE_NAMES[:weights.shape[1]]),
        "query_probabilities": probabilities[0].astype(np.float32),
        "gallery_probabilities": probabilities[1:].astype(np.float32),
        "query_evidence": evidence[0],
        "gallery_evidence": evidence[1:],
        "query_contribution": np.asarray(maps_lib.resize_maps(cm.query, h, w), np.float32),
        "gallery_contribution": np.asarray(maps_lib.resize_maps(cm.gallery, h, w), np.float32),
        "errors": np.asarray(cm.errors, np.float32),
        "mode": np.asarray(mode),
    }


def maps_file(query_file: str) -> str:
    """``maps/<query stem>.npz``: the npz of a query, relative to the output folder."""
    return f"{MAPS_NAME}/{os.path.splitext(os.path.basename(query_file))[0]}.npz"


def write_query_maps(output_dir: str, query_file: str, arrays: dict[str, np.ndarray],
                     gallery_paths: Sequence[str]) -> str:
    """Writes ``output_dir/maps/<query stem>.npz`` atomically; returns its relative path."""
    rel = maps_file(query_file)
    os.makedirs(os.path.join(output_dir, MAPS_NAME), exist_ok=True)
    atomic_io.save_npz(os.path.join(output_dir, rel),
                       {**arrays, "gallery_paths": np.asarray(list(gallery_paths))})
    return rel


def read_query_maps(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a query's npz, checked: a one-line error names the file and what is wrong.
    """
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the attribute maps {path}: {e}") from None
    missing = [k for k in FIELDS if k not in arrays]
    if missing:
        raise ValueError(f"attribute maps {path} lack {missing}")
    if arrays["attributes"].ndim != 1 or arrays["gallery_evidence"].ndim != 4:
        raise ValueError(f"attribute maps {path}: attributes must be [A] and gallery_evidence "
                         f"[k, A, H, W], got shapes {arrays['attributes'].shape} and "
                         f"{arrays['gallery_evidence'].shape}")
    a = len(arrays["attributes"])
    k, _, h, w = arrays["gallery_evidence"].shape
    expected = {"query_evidence": (a, h, w), "gallery_evidence": (k, a, h, w),
                "query_contribution": (k, a, h, w), "gallery_contribution": (k, a, h, w),
                "query_probabilities": (a,), "gallery_probabilities": (k, a),
                "errors": (k, a), "gallery_paths": (k,)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(f"attribute maps {path}: {name} has shape {arrays[name].shape}, "
                             f"expected {shape}")
    return arrays


__all__ = ["FIELDS", "MAPS_NAME", "MAP_MODES", "check_mode", "maps_file", "model_inputs",
           "query_maps", "read_query_maps", "stored_size", "write_query_maps"]
