"""Market-1501 reader: scans the three image folders into typed splits.

Layout (Zheng et al., ICCV 2015; ``Market-1501-v15.09.15``)::

    ROOT/bounding_box_train/   12,936 images, 751 identities            -> split ``train``
    ROOT/query/                 3,368 images, 750 identities            -> split ``query``
    ROOT/bounding_box_test/    19,732 images: 750 identities, pid 0000
                               distractors and pid -1 junk             -> split ``gallery``

A file name ``0002_c1s1_000451_03.jpg`` is pid 2, camera 1, sequence 1, frame 451, box 3.
Cameras are 1-based in the names and are kept 1..6 here (not shifted to 0..5).

Junk images (pid -1) are left out of every split. Distractors (pid 0) are kept in the gallery
and left out of train and query, where they carry no identity. Train pids are relabelled
0..C-1 in ascending pid order. Files that are not images (``Thumbs.db``, hidden files) are
ignored; image files whose names do not parse are an error.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from absl import logging
from PIL import Image

# Split name -> folder under the Market-1501 root.
SPLIT_FOLDERS: dict[str, str] = {
    "train": "bounding_box_train",
    "query": "query",
    "gallery": "bounding_box_test",
}
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")
NUM_CAMERAS = 6
JUNK_PID = -1
DISTRACTOR_PID = 0
# The folder name of the official release, looked for below a root that lacks the split folders.
RELEASE_FOLDER = "Market-1501-v15.09.15"

_NAME_RE = re.compile(r"^(-1|\d+)_c(\d+)s(\d+)_(\d+)_(\d+)\.[A-Za-z]+$")
_MAX_LISTED = 5


class FileInfo(NamedTuple):
    """What a Market-1501 file name says about its image.

    pid: identity; 0 = distractor, -1 = junk. camera: 1..6 (1-based, as in the name).
    sequence: the camera's recording sequence. frame: frame number. box: detection index.
    """

    pid: int
    camera: int
    sequence: int
    frame: int
    box: int


def parse_filename(name: str) -> FileInfo:
    """``'0002_c1s1_000451_03.jpg'`` -> ``FileInfo(2, 1, 1, 451, 3)``.

    ``name`` may be a path; only its base name is parsed.

    Raises:
      ValueError: the name is not ``PID_cCsS_FRAME_BOX.ext`` or the camera is not 1..6.
    """
    base = os.path.basename(name)
    match = _NAME_RE.match(base)
    if match is None:
        raise ValueError(f"file name {base!r} is not a Market-1501 name like "
                         "'0002_c1s1_000451_03.jpg' (pid_cCAMERAsSEQUENCE_FRAME_BOX)")
    pid, camera, sequence, frame, box = (int(g) for g in match.groups())
    if not 1 <= camera <= NUM_CAMERAS:
        raise ValueError(f"file name {base!r}: camera {camera} is not in 1..{NUM_CAMERAS}")
    return FileInfo(pid, camera, sequence, frame, box)


def _readonly(values: list[int]) -> np.ndarray:
    array = np.asarray(values, dtype=np.int32).reshape(-1)
    array.setflags(write=False)
    return array


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """The images of one Market-1501 split, sorted by file name.

    Attributes:
      name: 'train', 'query' or 'gallery'.
      folder: absolute path of the split folder.
      paths: absolute image paths, n of them.
      pids: int32[n] identities (0 = distractor, gallery only).
      cameras: int32[n] cameras, 1..6.
      sequences: int32[n]; frames: int32[n].
      labels: int32[n] classification targets: train pids relabelled 0..C-1 in ascending pid
        order; for query and gallery the pids themselves.
      pid_to_label: pid -> label (identity mapping for query and gallery).
      junk_left_out: images with pid -1 not included.
      distractors_left_out: pid 0 images not included (train and query only).
      undecodable_skipped: paths skipped because they did not decode (``skip_undecodable``).
      records: None for a folder; for the TFDS source (``reid_jax.data.sources``) the split's
        data source, record ``i`` holding image ``i`` (``paths[i]`` then only names it).
      record_files: the array_record files ``records`` are read from (TFDS source only).
    """

    name: str
    folder: str
    paths: tuple[str, ...]
    pids: np.ndarray
    cameras: np.ndarray
    sequences: np.ndarray
    frames: np.ndarray
    labels: np.ndarray
    pid_to_label: dict[int, int]
    junk_left_out: int = 0
    distractors_left_out: int = 0
    undecodable_skipped: tuple[str, ...] = ()
    records: Any = None
    record_files: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def items(self) -> Sequence[Any]:
        """What the input pipeline reads, image ``i`` at ``items[i]``: ``records`` when set (TFDS
        records with the encoded image), else ``paths``."""
        return self.paths if self.records is None else self.records

    @property
    def source_files(self) -> tuple[str, ...]:
        """The files the images are read from: ``record_files`` or ``paths``."""
        return self.record_files if self.records is not None else self.paths

    @property
    def num_images(self) -> int:
        return len(self.paths)

    @property
    def num_ids(self) -> int:
        """Distinct identities, distractors not counted."""
        return int(np.unique(self.pids[self.pids != DISTRACTOR_PID]).size)

    @property
    def num_distractors(self) -> int:
        """Distractor (pid 0) images in the split."""
        return int(np.sum(self.pids == DISTRACTOR_PID))


@dataclasses.dataclass(frozen=True, eq=False)
class Market1501:
    """A scanned Market-1501 root: ``train``, ``query`` and ``gallery`` splits."""

    root: str
    train: Split
    query: Split
    gallery: Split

    @property
    def num_train_ids(self) -> int:
        """C, the number of training identities (classes)."""
        return len(self.train.pid_to_label)

    def split(self, name: str) -> Split:
        if name not in SPLIT_FOLDERS:
            raise ValueError(f"unknown split {name!r}; expected one of {tuple(SPLIT_FOLDERS)}")
        return getattr(self, name)

    def summary(self) -> str:
        """A counts table: images / identities per split, distractors, junk left out."""
        lines = [f"Market-1501 at {self.root}",
                 f"{'split':<8}{'images':>8}{'ids':>7}{'distractors':>13}"
                 f"{'junk left out':>15}{'undecodable':>13}"]
        for s in (self.train, self.query, self.gallery):
            lines.append(f"{s.name:<8}{s.num_images:>8}{s.num_ids:>7}{s.num_distractors:>13}"
                         f"{s.junk_left_out:>15}{len(s.undecodable_skipped):>13}")
        return "\n".join(lines)


def _decodes(path: str) -> str | None:
    """None when ``path`` decodes as an image, else the decoder's complaint."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _is_image_file(entry: os.DirEntry) -> bool:
    return (entry.is_file() and not entry.name.startswith(".")
            and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS)


def _read_split(root: str, name: str, *, verify_images: bool, skip_undecodable: bool) -> Split:
    folder = os.path.join(root, SPLIT_FOLDERS[name])
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Market-1501 split folder {SPLIT_FOLDERS[name]!r} for "
                                f"split {name!r} not found: {folder}")
    with os.scandir(folder) as entries:
        files = sorted(e.name for e in entries if _is_image_file(e))
    parsed: list[tuple[str, FileInfo]] = []
    unparsed: list[str] = []
    for file in files:
        try:
            parsed.append((file, parse_filename(file)))
        except ValueError:
            unparsed.append(file)
    if unparsed:
        raise ValueError(f"{folder}: {len(unparsed)} image file names do not parse as "
                         f"Market-1501 names ('0002_c1s1_000451_03.jpg'), first "
                         f"{unparsed[:_MAX_LISTED]}")
    junk = sum(info.pid == JUNK_PID for _, info in parsed)
    kept = [(f, i) for f, i in parsed if i.pid != JUNK_PID]
    distractors_left_out = 0
    if name != "gallery":
        distractors_left_out = sum(i.pid == DISTRACTOR_PID for _, i in kept)
        kept = [(f, i) for f, i in kept if i.pid != DISTRACTOR_PID]
    skipped: list[str] = []
    if verify_images:
        good = []
        for file, info in kept:
            path = os.path.join(folder, file)
            problem = _decodes(path)
            if problem is None:
                good.append((file, info))
            elif skip_undecodable:
                skipped.append(path)
            else:
                raise ValueError(f"image does not decode: {path} ({problem}); pass "
                                 "skip_undecodable=True to leave such images out")
        kept = good
        if skipped:
            logging.warning("%s: skipped %d images that do not decode, first %s", folder,
                            len(skipped), skipped[:_MAX_LISTED])
    if not kept:
        raise ValueError(f"{folder}: no images for split {name!r} ({len(files)} image files, "
                         f"{junk} junk, {distractors_left_out} distractors left out, "
                         f"{len(skipped)} undecodable skipped)")
    pids = [i.pid for _, i in kept]
    if name == "train":
        pid_to_label = {pid: k for k, pid in enumerate(sorted(set(pids)))}
    else:
        pid_to_label = {pid: pid for pid in sorted(set(pids))}
    return Split(
        name=name,
        folder=folder,
        paths=tuple(os.path.join(folder, f) for f, _ in kept),
        pids=_readonly(pids),
        cameras=_readonly([i.camera for _, i in kept]),
        sequences=_readonly([i.sequence for _, i in kept]),
        frames=_readonly([i.frame for _, i in kept]),
        labels=_readonly([pid_to_label[p] for p in pids]),
        pid_to_label=pid_to_label,
        junk_left_out=junk,
        distractors_left_out=distractors_left_out,
        undecodable_skipped=tuple(skipped),
    )


def load_market1501(root: str | os.PathLike, *, verify_images: bool = False,
                    skip_undecodable: bool = False) -> Market1501:
    """Scans a Market-1501 root (the folder holding ``bounding_box_train`` etc.).

    Args:
      root: the dataset folder, e.g. ``.../Market-1501-v15.09.15``.
      verify_images: decode every image once (PIL) and fail on the first that does not.
      skip_undecodable: with ``verify_images``, leave undecodable images out (logged, counted
        in ``Split.undecodable_skipped``) instead of failing.

    Raises:
      FileNotFoundError: ``root`` or a split folder does not exist.
      ValueError: image names that do not parse (the first few listed), a split without
        images, or (``verify_images``) an image that does not decode.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Market-1501 root folder not found: {root}")
    missing = [f for f in SPLIT_FOLDERS.values() if not os.path.isdir(os.path.join(root, f))]
    if missing:
        hint = ""
        if os.path.isdir(os.path.join(root, RELEASE_FOLDER)):
            hint = f"; did you mean {os.path.join(root, RELEASE_FOLDER)}?"
        raise FileNotFoundError(f"Market-1501 root {root} lacks the split folders {missing} "
                                f"(expected {list(SPLIT_FOLDERS.values())}){hint}")
    splits = {name: _read_split(root, name, verify_images=verify_images,
                                skip_undecodable=skip_undecodable) for name in SPLIT_FOLDERS}
    data = Market1501(root=root, **splits)
    logging.info("%s", data.summary())
    return data


# ---------------------------------------------------------------------------------------------
# Reading a data root as a config says.


def config_data_section(config: Any) -> Mapping:
    """``config.data`` (``{}`` when ``config`` or the section is missing)."""
    data = config.get("data") if config is not None and hasattr(config, "get") else None
    return data if data is not None else {}
