"""A loaded run and every answer of the explorer's API, as plain JSON-able dicts.

:class:`Explorer` holds what a run needs to answer interactively, loaded once: the query and
gallery embeddings (the gallery on the device, with its squared norms and attribute logits,
``explain.steering.PreparedGallery``), the attribute head ``W``, the dataset scan (file names,
identities, cameras), the per-query AP of the unsteered ranking (the worst-AP browse order), and
the model when uploads are to be embedded. It answers

* the ranking of a query with its explanation (:meth:`Explorer.rank`). Unsteered rankings of
  dataset queries go through ``explain.run.explain_queries`` and ``make_record`` — the code of
  ``tools/explain.py`` — so they equal its JSONL records (floats up to float32 rounding,
  ``docs/explorer.md``); steered rankings and uploads go through
  ``explain.steering.steer_ranking`` and the same ``make_record``;
* the split's mAP / CMC with a steering (:meth:`Explorer.split_metrics`);
* the query list (:meth:`Explorer.queries`), images by index, uploads.

Threshold-independent results are cached per (query, k, mode, steering), so moving the
threshold slider only re-selects the confident attributes (the kernel
``explain.confident_attributes``). ``docs/explorer.md`` describes the choices.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from reid_jax import checkpoints, embeddings, explain, retrieval
from reid_jax.data import augment, market1501
from reid_jax.data.attributes import ATTRIBUTE_MEANINGS, ATTRIBUTE_NAMES, NUM_ATTRIBUTES
from reid_jax.data.market1501 import Split
from reid_jax.explain import figures, learned, map_outputs, report, settings, steering
from reid_jax.explain import maps as maps_lib
from reid_jax.explain import run as explain_run
from reid_jax.explorer import uploads as uploads_lib
from reid_jax.models.attribute_head import Calibration, check_calibration

MAX_K = 100
CACHE_SIZE = 256
METRICS_CHUNK = 64
# A provider of attribute maps for a pair of model-input images ``[H, W, 3]`` (resized and
# normalised as for evaluation) and an error mode: ``(query maps [A, H, W], gallery maps
# [A, H, W])`` (docs/explorer.md, "Attribute maps").
PairMaps = Callable[[np.ndarray, np.ndarray, str], tuple[np.ndarray, np.ndarray]]


class QueryRef(NamedTuple):
    """A query: ``("query", index in the query split)`` or ``("upload", upload id)``."""

    kind: str
    key: int | str


class _Ranking(NamedTuple):
    """What a threshold does not change: the explanation (all attributes), the metrics of the
    ranking, and the ranks the images had before steering."""

    explanation: explain_run.QueryExplanation
    metrics: tuple[float, float, int, int]
    previous_ranks: list[int] | None
    unsteered: dict[str, Any] | None
    gallery_kept: int


def _split(name: str, files: Sequence[str], pids: Any, cameras: Any) -> Split:
    """A :class:`Split` of given file names, identities and cameras (no folder on disk)."""
    pids = np.asarray(pids, np.int32)
    zeros = np.zeros(len(files), np.int32)
    return Split(name=name, folder="", paths=tuple(files), pids=pids,
                 cameras=np.asarray(cameras, np.int32), sequences=zeros, frames=zeros,
                 labels=pids, pid_to_label={int(p): int(p) for p in np.unique(pids)})


def _mode_kwargs(mode: str) -> dict[str, Any]:
    """The kernels' arguments for an error mode (the one place the explorer maps modes)."""
    return {"mode": mode}


def _optional(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _lazy_pair_maps(model: Any, weights: np.ndarray, gallery_paths: Sequence[str],
                    config: ml_collections.ConfigDict,
                    opts: settings.ExplainSettings) -> PairMaps:
    """The checkpoint's map provider; its baseline (the mean map of reference gallery images)
    is computed at the first map asked for, not at start-up."""

    @functools.cache
    def provider() -> PairMaps:
        baseline = map_outputs.map_baseline(
            model, gallery_paths, embeddings.eval_loader_config(config).augment,
            count=opts.map_reference_images, layer=opts.map_layer)
        return maps_lib.pair_contribution_maps(model, weights, steps=opts.map_steps,
                                               layer=opts.map_layer, baseline=baseline,
                                               method=opts.map_method)

    return lambda query, gallery, mode: provider()(query, gallery, mode)


class Explorer:
    """A run loaded for interactive use (build it with :meth:`from_checkpoint` or
    :meth:`from_arrays`); thread-safe."""

    def __init__(self, *, queries: Split, gallery: Split, query_embeddings: Any,
                 gallery_embeddings: Any, weights: Any, calibration: Calibration | None = None,
                 head_accuracy: Mapping[str, float | None] | None = None,
                 explain_settings: settings.ExplainSettings | None = None,
                 data_root: str | None = None, model: Any = None,
                 config: ml_collections.ConfigDict | None = None,
                 pair_maps: PairMaps | None = None, description: dict[str, Any] | None = None,
                 max_uploads: int = 64, max_upload_pixels: int = uploads_lib.DEFAULT_MAX_PIXELS,
                 cache_size: int = CACHE_SIZE, rank_chunk: int = 128):
        fq = np.asarray(query_embeddings, np.float32)
        fg = np.asarray(gallery_embeddings, np.float32)
        w = np.asarray(weights, np.float32)
        if fq.ndim != 2 or fq.shape[0] != len(queries):
            raise ValueError(f"query_embeddings must be [{len(queries)}, N] (one row per query "
                             f"image), got {fq.shape}")
        if fg.ndim != 2 or fg.shape[0] != len(gallery) or fg.shape[1] != fq.shape[1]:
            raise ValueError(f"gallery_embeddings must be [{len(gallery)}, N={fq.shape[1]}] "
                             f"(one row per gallery image), got {fg.shape}")
        if w.shape != (fq.shape[1], NUM_ATTRIBUTES):
            raise ValueError(f"weights must be [N={fq.shape[1]}, A={NUM_ATTRIBUTES}], got "
                             f"{w.shape}")
        explain.check_finite(query_embeddings=fq, gallery_embeddings=fg, weights=w)
        self.queries_split, self.gallery_split = queries, gallery
        self.settings = explain_settings or settings.explain_settings(None)
        self.data_root = None if data_root is None else os.path.abspath(data_root)
        self.model, self.config, self.pair_maps = model, config, pair_maps
        self.description = dict(description or {})
        self.max_upload_pixels = int(max_upload_pixels)
        self.max_k = int(min(MAX_K, len(gallery)))
        self.f_query = fq
        self.weights = jnp.asarray(w)
        check_calibration(calibration, w.shape[1])
        self.calibration = calibration  # read by the disagreement mode
        # Which attributes the head has learned: the page marks the others' maps and filters.
        self.head_accuracy = learned.summary(head_accuracy)
        self.gallery = steering.prepare_gallery(fg, self.weights)
        self.qp = np.asarray(queries.pids, np.int64)
        self.qc = np.asarray(queries.cameras, np.int64)
        self.gp = np.asarray(gallery.pids, np.int64)
        self.gc = np.asarray(gallery.cameras, np.int64)
        self.x_gallery = jax.nn.sigmoid(self.gallery.logits)  # [G, A] on the device
        # Candidates of one unsteered query: as many as a run over the whole split asks for.
        self._removed_max = int(retrieval.removed_counts(self.qp, self.qc, self.gp,
                                                         self.gc).max(initial=0))
        started = time.monotonic()
        self.metrics = explain_run.ranking_metrics(fq, self.gallery.embeddings, self.qp,
                                                   self.qc, self.gp, self.gc, chunk=rank_chunk)
        try:
            self.summary = explain_run.summarize(self.metrics)
        except ValueError:
            self.summary = None
        self.worst_first = explain_run.query_order(self.metrics, "worst_ap")
        self.position = np.empty_like(self.worst_first)
        self.position[self.worst_first] = np.arange(self.worst_first.size)
        logging.info("explorer: ranked %d queries against %d gallery images in %.1f s",
                     len(queries), len(gallery), time.monotonic() - started)
        self.uploads = uploads_lib.UploadStore(max_uploads)
        self._cache: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._cache_size = int(cache_size)
        self._lock = threading.Lock()
        self._loader_config = (embeddings.eval_loader_config(config, num_workers=0)
                               if model is not None else None)

    # ------------------------------------------------------------------------------ building

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, data_root: str | os.PathLike, *,
                        cache_dir: str | os.PathLike | None = None,
                        config: ml_collections.ConfigDict | None = None,
                        **kwargs: Any) -> Explorer:
        """Loads a run: the checkpoint's model and attribute head (latest step), the data
        root's scan, and the query and gallery embeddings (cached in ``cache_dir``, the cache of
        ``tools/explain.py``: a run's ``explain/embeddings`` is reused as it is).

        Raises:
          reid_jax.checkpoints.NoAttributeHeadError: the checkpoint has no attribute head.
          ValueError / FileNotFoundError: no checkpoint, no data, no query images.
        """
        checkpoint = os.path.abspath(os.fspath(checkpoint))
        config = embeddings.restore_config(checkpoint, config)
        weights = embeddings.head_weights(checkpoint)
        data = explain_run.load_data(data_root, config)
        model, _ = checkpoints.restore_model(checkpoint, config)
        splits = embeddings.split_embeddings(model, config, data, ("query", "gallery"),
                                             None if cache_dir is None else os.fspath(cache_dir))
        kwargs.setdefault("explain_settings", settings.explain_settings(config))
        if "pair_maps" not in kwargs:  # the maps of the run's settings (layer, baseline)
            kwargs["pair_maps"] = _lazy_pair_maps(model, weights, data.gallery.paths, config,
                                                  kwargs["explain_settings"])
        description = {"checkpoint": checkpoint, "step": checkpoints.latest_step(checkpoint),
                       "data_root": data.root, "cache_dir": cache_dir and os.fspath(cache_dir)}
        return cls(queries=data.query, gallery=data.gallery,
                   query_embeddings=splits["query"].features,
                   gallery_embeddings=splits["gallery"].features, weights=weights,
                   calibration=checkpoints.restore_calibration(checkpoint),
                   head_accuracy=checkpoints.restore_head_accuracy(checkpoint),
                   data_root=data.root, model=model, config=config,
                   description=description | kwargs.pop("description", {}), **kwargs)

    @classmethod
    def from_arrays(cls, query_embeddings: Any, gallery_embeddings: Any, weights: Any, *,
                    query_pids: Any, query_cameras: Any, gallery_pids: Any,
                    gallery_cameras: Any, query_files: Sequence[str] | None = None,
                    gallery_files: Sequence[str] | None = None, **kwargs: Any) -> Explorer:
        """An explorer of given embeddings without images or model (benchmarks, own data):
        images are not served and uploads are refused."""
        q, g = len(query_pids), len(gallery_pids)
        qf = query_files or [f"{int(p):04d}_c{int(c)}_q{i:06d}.jpg"
                             for i, (p, c) in enumerate(zip(query_pids, query_cameras,
                                                            strict=True))]
        gf = gallery_files or [f"{int(p):04d}_c{int(c)}_g{i:06d}.jpg"
                               for i, (p, c) in enumerate(zip(gallery_pids, gallery_cameras,
                                                              strict=True))]
        if len(qf) != q or len(gf) != g:
            raise ValueError(f"query_files / gallery_files must name {q} / {g} images, got "
                             f"{len(qf)} / {len(gf)}")
        kwargs.setdefault("description", {"source": "arrays"})
        return cls(queries=_split("query", qf, query_pids, query_cameras),
                   gallery=_split("gallery", gf, gallery_pids, gallery_cameras),
                   query_embeddings=query_embeddings, gallery_embeddings=gallery_embeddings,
                   weights=weights, **kwargs)

    # ------------------------------------------------------------------------------ facts

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(settings.MODES)

    @property
    def map_modes(self) -> tuple[str, ...]:
        """The error modes attribute maps exist for (none without a provider)."""
        return tuple(maps_lib.MAP_MODES) if self.pair_maps is not None else ()

    @property
    def can_upload(self) -> bool:
        return self.model is not None

    @property
    def has_images(self) -> bool:
        return self.data_root is not None

    def fetch(self, k: int) -> int:
        """Candidates of an unsteered top-``k`` pass: ``k`` plus the most removals of any query
        of the split (what ``tools/explain.py`` asks for over the whole split)."""
        return int(min(len(self.gallery_split), k + self._removed_max))

    def info(self) -> dict[str, Any]:
        """The run and the settings the page starts from (``GET /api/info``)."""
        s = self.settings
        rules = report.DISPLAY_RULES
        colors = {n: "#{:02x}{:02x}{:02x}".format(*(round(255 * v) for v in c[:3]))
                  for n, c in figures.attribute_colors(ATTRIBUTE_NAMES).items()}
        # The pie of each mode: "all" values sum to d² (complete), "remainder" adds the
        # projection's remainder as its own slice, "positive" shows the positive part (paper)
        # and "bars" gives probabilities that are not a decomposition (disagreement).
        pies = {"complete": "all", "projection": "remainder", "disagreement": "bars"}
        modes = [{"name": m, "equation": explain_run.MODE_EQUATIONS.get(m, m),
                  "rule": rules[report.MODE_RULES.get(m, "paper_pie")],
                  "pie": pies.get(m, "positive")} for m in self.modes]
        head = self.head_accuracy
        summary = None
        if self.summary is not None:
            summary = {key: self.summary[key] for key in ("mAP", "mINP", "num_valid_queries",
                                                          "num_queries")}
            summary["rank1"] = self.summary["cmc"][0]
        return {
            "run": {k: v for k, v in self.description.items() if v is not None},
            "num_queries": len(self.queries_split), "num_gallery": len(self.gallery_split),
            "embedding_dim": int(self.f_query.shape[1]),
            "attributes": [{"name": n, "meaning": ATTRIBUTE_MEANINGS[n], "color": colors[n],
                            **self._learned(n)} for n in ATTRIBUTE_NAMES],
            "min_accuracy": None if head is None else head["min_accuracy"],
            "modes": modes,
            "defaults": {"k": min(s.k, self.max_k), "threshold": s.threshold_json(),
                         "mode": s.mode},
            "max_k": self.max_k, "summary": summary,
            "rules": {k: rules[k] for k in ("confident_attributes", "absent", "matching_scores",
                                             "frames")},
            "uploads": self.can_upload, "images": self.has_images,
            "maps": self.pair_maps is not None,
            "map_modes": list(self.map_modes),
        }

    def _learned(self, name: str) -> dict[str, Any]:
        """``accuracy`` (balanced, on the labelled test images), ``status`` and ``caution``
        of one attribute (None each where the head came without its test accuracy)."""
        head = self.head_accuracy
        if head is None:
            return {"accuracy": None, "status": None, "caution": None}
        value = head["accuracy"][name]
        return {"accuracy": value, "status": learned.status(value, head["min_accuracy"]),
                "caution": learned.caution(name, value, head["min_accuracy"])}

    def query_entry(self, index: int) -> dict[str, Any]:
        m = self.metrics
        return {"index": int(index), "position": int(self.position[index]),
                "file": os.path.basename(self.queries_split.paths[index]),
                "pid": int(self.qp[index]), "camera": int(self.qc[index]),
                "ap": _optional(float(m.ap[index])),
                "first_match_rank": int(m.first_rank[index]) if m.num_matches[index] else None,
                "num_matches": int(m.num_matches[index])}

    def queries(self, *, order: str = "worst_ap", search: str = "", offset: int = 0,
                limit: int = 100) -> dict[str, Any]:
        """Query images in ``order`` (``worst_ap``, ``query``), file names containing ``search``
        (case-insensitive), ``limit`` of them from ``offset`` (``GET /api/queries``)."""
        indices = self.worst_first if order == "worst_ap" else np.arange(len(self.queries_split))
        if search:
            needle = search.lower()
            names = [os.path.basename(p).lower() for p in self.queries_split.paths]
            indices = [i for i in indices if needle in names[i]]
        total = len(indices)
        chosen = indices[offset:offset + limit]
        return {"total": total, "order": order, "offset": offset,
                "queries": [self.query_entry(int(i)) for i in chosen]}

    def find_query(self, file: str) -> int:
        """The index of the query image named ``file`` (a base name; never a path).

        Raises:
          KeyError: no query image has that name.
        """
        with self._lock:
            if not hasattr(self, "_by_name"):
                self._by_name = {os.path.basename(p): i
                                 for i, p in enumerate(self.queries_split.paths)}
        if file not in self._by_name:
            raise KeyError(file)
        return self._by_name[file]

    # ------------------------------------------------------------------------------ images

    def image_path(self, split: str, index: int) -> str:
        """The file of image ``index`` of ``split`` (``query``, ``gallery``), from the scan.

        Raises:
          LookupError: no images on this server, or the index is out of range.
        """
        if not self.has_images:
            raise LookupError("this explorer was started from arrays: it has no images")
        s = self.queries_split if split == "query" else self.gallery_split
        if not 0 <= index < len(s):
            raise LookupError(f"{split} has {len(s)} images; index {index} is out of range")
        return s.paths[index]

    def model_input(self, ref: QueryRef | tuple[str, int]) -> np.ndarray:
        """The model-input image ``[H, W, 3]`` of a query, upload or gallery image."""
        aug = (self._loader_config or embeddings.eval_loader_config(self.config)).augment
        if ref[0] == "upload":
            item = self.upload(str(ref[1])).pixels
        else:
            item = self.image_path(ref[0], int(ref[1]))
        return augment.eval_transform(augment.read_image(item), aug)

    # ------------------------------------------------------------------------------ uploads

    def add_upload(self, data: bytes, name: str | None = None) -> uploads_lib.Upload:
        """Decodes, embeds (the checkpoint's model, eval mode) and keeps an uploaded query.

        Raises:
          uploads.UploadError: no model, or an image that cannot be used (the message says).
        """
        if self.model is None:
            raise uploads_lib.UploadError("this explorer has no model (started from arrays): "
                                          "uploaded images cannot be embedded")
        pixels = uploads_lib.decode(data, max_pixels=self.max_upload_pixels)
        aug = self._loader_config.augment
        f = embeddings.embed_images(self.model, [pixels], height=aug.height, width=aug.width,
                                    batch_size=1, loader_config=self._loader_config,
                                    log_every_seconds=3600.0)[0]
        explain.check_finite(upload_embedding=f)
        item = uploads_lib.Upload(id=self.uploads.new_id(), name=uploads_lib.display_name(name),
                                  embedding=f, pixels=pixels,
                                  jpeg=uploads_lib.display_jpeg(pixels))
        self.uploads.add(item)
        return item

    def upload(self, upload_id: str) -> uploads_lib.Upload:
        """Raises ``LookupError`` for an unknown (or dropped) upload id."""
        item = self.uploads.get(upload_id)
        if item is None:
            raise LookupError(f"no upload {upload_id!r} (unknown, or dropped after "
                              f"{self.uploads.capacity} newer uploads): upload the image again")
        return item

    # ------------------------------------------------------------------------------ ranking

    def _cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = compute()
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return value

    def _filtered(self, steer: steering.Steering) -> np.ndarray:
        """bool ``[G]``: the gallery images that pass the require / forbid filter."""
        if not steer.filters:
            return np.ones(len(self.gallery_split), bool)
        return np.asarray(steering.attribute_filter(self.x_gallery, steer.require,
                                                    steer.forbid))

    def _protocol(self, ref: QueryRef) -> np.ndarray:
        """bool ``[G]``: what the Market-1501 protocol keeps for a dataset query (all for an
        upload, whose identity and camera are unknown)."""
        if ref.kind != "query":
            return np.ones(len(self.gallery_split), bool)
        i = int(ref.key)
        return ~retrieval.excluded(self.qp[i], self.qc[i], self.gp, self.gc)

    def _projection(self, steer: steering.Steering) -> steering.IgnoreProjection:
        """The projection of ``steer.ignore`` (computed once per set of ignored attributes)."""
        key = ("projection", tuple(steer.ignore.tolist()))
        return self._cached(key, lambda: steering.ignore_projection(self.weights, steer.ignore))

    def _embedding(self, ref: QueryRef) -> np.ndarray:
        return self.f_query[int(ref.key)] if ref.kind == "query" else self.upload(
            str(ref.key)).embedding

    def _ranking(self, ref: QueryRef, k: int, mode: str, steer: steering.Steering) -> _Ranking:
        """The threshold-independent part of :meth:`rank`."""
        threshold = self.settings.threshold  # selection is redone per request
        if ref.kind == "query" and not steer.active:
            i = int(ref.key)
            ex = next(explain_run.explain_queries(
                self.f_query[i:i + 1], self.gallery.embeddings, self.weights, self.qp[i:i + 1],
                self.qc[i:i + 1], self.gp, self.gc, k=k, threshold=threshold, chunk=1,
                gallery_chunk=len(self.gallery_split), fetch=self.fetch(k),
                validate=False, calibration=self.calibration,
                **_mode_kwargs(mode)))  # checked once, at load
            m = self.metrics
            return _Ranking(ex, (m.ap[i], m.inp[i], m.first_rank[i], m.num_matches[i]), None,
                            None, int(self._protocol(ref).sum()))
        filtered = self._filtered(steer)
        base_keep = self._protocol(ref)
        keep = filtered & base_keep
        out = steering.steer_ranking(self._embedding(ref), self.gallery, self.weights,
                                     ignore=steer.ignore, keep=keep, k=k, threshold=threshold,
                                     projection=self._projection(steer),
                                     calibration=self.calibration, **_mode_kwargs(mode))
        ex = explain_run.QueryExplanation(
            gallery=out.indices, distances=out.distances, attributes_query=out.attributes_query,
            selected=out.selected, attributes_gallery=out.attributes_gallery, scores=out.scores,
            errors=out.errors, remainder=out.remainder)
        # Ranks before steering: in the plain distance (GEMM form, as the AP pass ranks), among
        # what the protocol keeps, ties to the lower index.
        d, g = out.plain_distances, out.indices[:, None]
        before = base_keep[None, :] & ((d[None, :] < d[g]) | (
            (d[None, :] == d[g]) & (np.arange(d.size)[None, :] < g)))
        previous = (before.sum(axis=1) + 1).tolist()
        if ref.kind != "query":
            return _Ranking(ex, (math.nan, math.nan, 0, 0), previous, None, int(keep.sum()))
        i = int(ref.key)
        cols = np.flatnonzero(filtered)
        pm = explain_run.per_query_metrics(out.steered_distances[None, cols], self.qp[i:i + 1],
                                           self.gp[cols], self.qc[i:i + 1], self.gc[cols])
        m = self.metrics
        unsteered = {"ap": _optional(float(m.ap[i])),
                     "first_match_rank": int(m.first_rank[i]) if m.num_matches[i] else None,
                     "num_matches": int(m.num_matches[i])}
        return _Ranking(ex, (pm.ap[0], pm.inp[0], pm.first_rank[0], pm.num_matches[0]),
                        previous, unsteered, int(keep.sum()))

    def rank(self, ref: QueryRef, *, k: int | None = None, threshold: Any = None,
             mode: str | None = None, steer: steering.Steering | None = None) -> dict[str, Any]:
        """The explained top ``k`` of a query (``GET`` / ``POST /api/rank``).

        The keys of a ``tools/explain.py`` JSONL record (``explain.run.make_record``; for an
        unsteered dataset query the same record, ``position`` being the worst-AP place), and
        ``indices``, ``distances``, ``gallery_paths`` (relative to the data root),
        ``selected`` (attribute indices), ``scores`` (= ``matching_scores``), ``k``,
        ``threshold``, ``mode``, ``steering``, ``previous_ranks`` (steered: each image's rank
        before steering), ``unsteered`` (steered dataset query: its AP and first match before),
        ``upload`` (the upload id, or None).

        Raises:
          LookupError: an unknown upload.  ValueError: a bad ``k``, threshold or mode.
        """
        s = self.settings
        k = s.k if k is None else int(k)
        if not 1 <= k <= self.max_k:
            raise ValueError(f"k must lie in [1, {self.max_k}], got {k}")
        threshold = s.threshold if threshold is None else settings.parse_threshold(threshold)
        mode = s.mode if mode is None else mode
        if mode not in self.modes:
            raise ValueError(f"mode must be one of {self.modes}, got {mode!r}")
        steer = steer or steering.no_steering()
        if ref.kind == "query":
            if not 0 <= int(ref.key) < len(self.queries_split):
                raise LookupError(f"query must lie in [0, {len(self.queries_split) - 1}], got "
                                  f"{ref.key}")
            ref = QueryRef("query", int(ref.key))
        else:
            self.upload(str(ref.key))  # LookupError before any work
        key = (ref, k, mode, tuple(np.concatenate(steer).tolist()) if steer.active else ())
        ranking = self._cached(key, lambda: self._ranking(ref, k, mode, steer))
        ex = ranking.explanation
        selected = np.asarray(explain.confident_attributes(
            ex.attributes_query, np.asarray(threshold, np.float32)))
        ex = ex._replace(selected=selected)
        if ref.kind == "query":
            record = explain_run.make_record(int(self.position[ref.key]), int(ref.key),
                                             self.queries_split, self.gallery_split, ex,
                                             ranking.metrics, mode)
        else:
            item = self.upload(str(ref.key))
            one = _split("upload", [item.name], [market1501.JUNK_PID], [0])
            record = explain_run.make_record(0, 0, one, self.gallery_split, ex,
                                             ranking.metrics, mode)
            record["query"] = {"index": None, "file": item.name, "pid": None, "camera": None,
                               "upload": item.id}
            record["gallery"]["true_match"] = None
            record["num_matches"] = None
        gal = record["gallery"]
        paths = [self.gallery_split.paths[g] for g in gal["index"]]
        if self.data_root is not None:
            paths = [os.path.relpath(p, self.data_root) for p in paths]
        return {
            **record,
            "indices": gal["index"], "distances": gal["distance"], "gallery_paths": paths,
            "selected": [a["index"] for a in record["selected_attributes"]],
            "scores": record["matching_scores"],
            "k": k, "threshold": settings.threshold_json(threshold), "mode": mode,
            "steering": {**steer.names(), "active": steer.active,
                         "gallery_kept": ranking.gallery_kept},
            "previous_ranks": ranking.previous_ranks, "unsteered": ranking.unsteered,
            "upload": record["query"].get("upload"),
        }

    # ------------------------------------------------------------------------------ metrics

    def split_metrics(self, steer: steering.Steering | None = None) -> dict[str, Any]:
        """mAP, rank-1, rank-5, mINP of the whole query split ranked with ``steer``
        (Market-1501 protocol; filtered-out gallery images are not in the ranking)
        (``GET /api/metrics``). Cached per steering."""
        steer = steer or steering.no_steering()
        key = ("split", tuple(np.concatenate(steer).tolist()) if steer.active else ())
        return self._cached(key, lambda: self._split_metrics(steer))

    def _split_metrics(self, steer: steering.Steering) -> dict[str, Any]:
        started = time.monotonic()
        if not steer.active:
            metrics = self.metrics
        else:
            cols = np.flatnonzero(self._filtered(steer))
            parts = []
            for start, stop, rows in retrieval.padded_chunks(self.f_query, METRICS_CHUNK):
                d = np.asarray(steering.steered_distances(
                    rows, self.gallery, self.weights, steer.ignore,
                    projection=self._projection(steer)))[:stop - start]
                parts.append(explain_run.per_query_metrics(
                    d[:, cols], self.qp[start:stop], self.gp[cols], self.qc[start:stop],
                    self.gc[cols]))
            metrics = explain_run.QueryMetrics(*(np.concatenate(x)
                                                 for x in zip(*parts, strict=True)))
        out = {**steer.names(), "active": steer.active, "num_queries": int(metrics.ap.size)}
        try:
            s = explain_run.summarize(metrics)
            out.update(mAP=s["mAP"], mINP=s["mINP"], rank1=s["cmc"][0], rank5=s["cmc"][4],
                       num_valid_queries=s["num_valid_queries"])
        except ValueError:  # no query keeps a match
            out.update(mAP=None, mINP=None, rank1=None, rank5=None, num_valid_queries=0)
        out["seconds"] = round(time.monotonic() - started, 3)
        return out

    # ------------------------------------------------------------------------------ maps

    def maps(self, ref: QueryRef, gallery_index: int, mode: str) -> tuple[np.ndarray,
                                                                          np.ndarray]:
        """Attribute maps ``([A, H, W], [A, H, W])`` of a ranked pair from the provider.

        Raises:
          LookupError: no provider, or an unknown image.
        """
        if self.pair_maps is None:
            raise LookupError("attribute maps are not available on this server")
        if not self.has_images and ref.kind == "query":
            raise LookupError("this explorer was started from arrays: it has no images")
        key = ("maps", ref, int(gallery_index), mode)

        def compute():
            q = self.model_input(ref)
            g = self.model_input(("gallery", int(gallery_index)))
            qm, gm = self.pair_maps(q, g, mode)
            qm, gm = np.asarray(qm, np.float32), np.asarray(gm, np.float32)
            want = (NUM_ATTRIBUTES, *q.shape[:2])
            if qm.shape != want or gm.shape != want:
                raise ValueError(f"attribute maps must be [A, H, W] = {list(want)}, got "
                                 f"{list(qm.shape)} and {list(gm.shape)}")
            return qm, gm

        return self._cached(key, compute)

    # ------------------------------------------------------------------------------ warm-up

    def warm(self) -> float:
        """Compiles every kernel a first request needs (each mode, a steering, a filter, an
        upload, the split metrics); returns the seconds it took."""
        started = time.monotonic()
        k = min(self.settings.k, self.max_k)
        ref = QueryRef("query", int(self.worst_first[0]))
        one = steering.parse_steering(ignore=[ATTRIBUTE_NAMES[9]], require=[ATTRIBUTE_NAMES[0]])
        for mode in self.modes:
            self.rank(ref, k=k, mode=mode)
            self.rank(ref, k=k, mode=mode, steer=one)
        rows = self.f_query[:min(METRICS_CHUNK, len(self.queries_split))]
        jax.block_until_ready(steering.steered_distances(rows, self.gallery, self.weights,
                                                         one.ignore))  # the metrics' chunks
        if self.can_upload:
            aug = self._loader_config.augment
            embeddings.embed_images(self.model, [np.zeros((aug.height, aug.width, 3), np.uint8)],
                                    height=aug.height, width=aug.width, batch_size=1,
                                    loader_config=self._loader_config, log_every_seconds=3600.0)
        with self._lock:
            self._cache.clear()  # the warm-up answers are not what users asked for
        return time.monotonic() - started


__all__ = ["CACHE_SIZE", "MAX_K", "Explorer", "PairMaps", "QueryRef"]
