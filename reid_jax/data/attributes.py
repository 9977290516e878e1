"""Market-1501 person attributes: names, coding and the label file reader.

The attribute file ``market_attribute.mat`` (Lin et al., Pattern Recognition 2019) holds 27
attributes per identity.  We use 30 binary attributes: every field is positive when its value
is 2, and ``age`` (1..4) is split one-hot into ``age1`` .. ``age4``.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import scipy.io
from absl import logging

# The 27 attribute fields of ``market_attribute.mat`` (plus ``image_index``, the identity strings).
# Their order differs between the train and test structs: always look them up by name.
MAT_FIELDS: tuple[str, ...] = (
    "age", "backpack", "bag", "handbag", "clothes", "down", "up", "hair", "hat", "gender",
    "upblack", "upwhite", "upred", "uppurple", "upyellow", "upgray", "upblue", "upgreen",
    "downblack", "downwhite", "downpink", "downpurple", "downyellow", "downgray", "downblue",
    "downgreen", "downbrown",
)

# The 30 binary attributes, in the order every array of this project uses.
ATTRIBUTE_NAMES: tuple[str, ...] = (
    "backpack", "bag", "handbag", "clothes", "down", "up", "hair", "hat", "gender",
    "upblack", "upwhite", "upred", "uppurple", "upyellow", "upgray", "upblue", "upgreen",
    "downblack", "downwhite", "downpink", "downpurple", "downyellow", "downgray", "downblue",
    "downgreen", "downbrown", "age1", "age2", "age3", "age4",
)
NUM_ATTRIBUTES = len(ATTRIBUTE_NAMES)

# What a positive (value 2 in the .mat file) means, for each binary attribute.
ATTRIBUTE_MEANINGS: dict[str, str] = {
    "backpack": "carries a backpack",
    "bag": "carries a bag",
    "handbag": "carries a handbag",
    "clothes": "wears pants (not a dress)",
    "down": "short lower-body clothing",
    "up": "short sleeves",
    "hair": "long hair",
    "hat": "wears a hat",
    "gender": "female",
    **{f"up{c}": f"upper-body clothing is {c}" for c in
       ("black", "white", "red", "purple", "yellow", "gray", "blue", "green")},
    **{f"down{c}": f"lower-body clothing is {c}" for c in
       ("black", "white", "pink", "purple", "yellow", "gray", "blue", "green", "brown")},
    "age1": "young", "age2": "teenager", "age3": "adult", "age4": "old",
}


def display_name(name: str, present: bool) -> str:
    """The paper's display form: ``gender`` when present (female), ``!gender`` when absent."""
    if name not in ATTRIBUTE_MEANINGS:
        raise ValueError(f"unknown attribute {name!r}; expected one of {ATTRIBUTE_NAMES}")
    return name if present else f"!{name}"


# Field order of the two structs in the real file (train: colours near the start, alphabetical;
# test: the order of the attribute README).  ``write_market_attributes`` reproduces them.
TRAIN_FIELD_ORDER: tuple[str, ...] = (
    "age", "backpack", "bag", "handbag", "downblack", "downblue", "downbrown", "downgray",
    "downgreen", "downpink", "downpurple", "downwhite", "downyellow", "upblack", "upblue",
    "upgreen", "upgray", "uppurple", "upred", "upwhite", "upyellow", "clothes", "down", "up",
    "hair", "hat", "gender", "image_index",
)
TEST_FIELD_ORDER: tuple[str, ...] = (*MAT_FIELDS, "image_index")
_FIELD_ORDERS = {"train": TRAIN_FIELD_ORDER, "test": TEST_FIELD_ORDER}

# Which split of the label file holds the identities of each image folder: query and gallery
# identities are the test identities.
_LABEL_SPLIT = {"train": "train", "test": "test", "query": "test", "gallery": "test"}

_BINARY_FIELDS: tuple[str, ...] = tuple(f for f in MAT_FIELDS if f != "age")
_NUM_AGE_GROUPS = 4
_AGE_COLUMNS: tuple[int, ...] = tuple(
    ATTRIBUTE_NAMES.index(f"age{k}") for k in range(1, _NUM_AGE_GROUPS + 1))


@dataclasses.dataclass(frozen=True, eq=False)
class MarketAttributes:
    """Per-identity attribute labels of Market-1501, as 30 binary columns.

    Attributes:
      names: the 30 column names, ``ATTRIBUTE_NAMES``.
      train_ids: int32[n_train], identities of ``bounding_box_train``, ascending (751 real).
      train_labels: uint8[n_train, 30] in {0, 1}; row k belongs to ``train_ids[k]``.
      test_ids: int32[n_test], identities of ``bounding_box_test`` / ``query``, ascending (750).
      test_labels: uint8[n_test, 30] in {0, 1}.
    """

    names: tuple[str, ...]
    train_ids: np.ndarray
    train_labels: np.ndarray
    test_ids: np.ndarray
    test_labels: np.ndarray

    def ids(self, split: str) -> np.ndarray:
        """int32[n] identities of ``split`` ('train', 'test'; 'query'/'gallery' mean 'test')."""
        return self.train_ids if _label_split(split) == "train" else self.test_ids

    def labels(self, split: str) -> np.ndarray:
        """uint8[n, 30] labels of ``split`` ('train', 'test'; 'query'/'gallery' mean 'test')."""
        return self.train_labels if _label_split(split) == "train" else self.test_labels


def _label_split(split: str) -> str:
    if split not in _LABEL_SPLIT:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(_LABEL_SPLIT)}")
    return _LABEL_SPLIT[split]


def _parse_id(cell: object, where: str) -> int:
    """One ``image_index`` cell (a 1-element str array such as ``array(['0002'])``) -> 2."""
    value = np.asarray(cell).ravel()
    text = str(value[0]) if value.size == 1 else None
    if text is None or len(text) != 4 or not text.isdigit():
        raise ValueError(f"{where}: expected a 4-digit identity string, got {cell!r}")
    return int(text)


def _decode_split(struct: np.ndarray, split: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    """One ``market_attribute[split]`` struct -> (int32[n] ids, uint8[n, 30] labels)."""
    fields = struct.dtype.names or ()
    for field in (*MAT_FIELDS, "image_index"):
        if field not in fields:
            raise ValueError(f"{path}: split {split!r} has no field {field!r} (has {fields})")
    cells = np.asarray(struct["image_index"][0, 0]).ravel()
    n = cells.size
    if n == 0:
        raise ValueError(f"{path}: split {split!r} field 'image_index' is empty")
    ids = np.array([_parse_id(c, f"{path}: split {split!r} field 'image_index' entry {i}")
                    for i, c in enumerate(cells)], dtype=np.int32)
    if np.any(np.diff(ids) <= 0):
        raise ValueError(f"{path}: split {split!r} field 'image_index' is not strictly "
                         "ascending (identities must be sorted and unique)")

    def field_values(field: str, allowed: tuple[int, ...]) -> np.ndarray:
        raw = np.asarray(struct[field][0, 0])
        if raw.size != n:
            raise ValueError(f"{path}: split {split!r} field {field!r} has {raw.size} values, "
                             f"expected {n} (one per identity of 'image_index')")
        if not np.issubdtype(raw.dtype, np.number):
            raise ValueError(f"{path}: split {split!r} field {field!r} has dtype {raw.dtype}, "
                             "expected integer codes")
        values = raw.ravel()
        bad = ~np.isin(values, allowed)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path}: split {split!r} field {field!r} has {int(bad.sum())} "
                             f"values outside {allowed}, first {values[k].item()!r} for identity "
                             f"{ids[k]:04d}")
        return values.astype(np.int64)

    labels = np.zeros((n, NUM_ATTRIBUTES), np.uint8)
    for field in _BINARY_FIELDS:  # Positive = value 2.
        labels[:, ATTRIBUTE_NAMES.index(field)] = field_values(field, (1, 2)) == 2
    age = field_values("age", tuple(range(1, _NUM_AGE_GROUPS + 1)))
    labels[np.arange(n), np.asarray(_AGE_COLUMNS)[age - 1]] = 1  # age k -> one-hot age{k}.
    return ids, labels


def load_market_attributes(path: str | os.PathLike) -> MarketAttributes:
    """Reads ``market_attribute.mat`` into 30 binary columns per identity.

    Fields are looked up by name (their order differs between the train and test structs).
    Every field but ``age`` must be coded 1/2 (2 = positive); ``age`` must be 1..4 and becomes
    the one-hot columns ``age1`` .. ``age4``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: the file is not a MAT file of this structure, or a field is missing or
        mis-coded (the message names the split and the field).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"attribute file not found: {path}")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for a file that is not a MAT file.
        raise ValueError(f"{path}: not a readable MAT file ({e})") from e
    if "market_attribute" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path}: no variable 'market_attribute' (has {keys})")
    top = mat["market_attribute"]
    if top.dtype.names is None or top.size != 1:
        raise ValueError(f"{path}: 'market_attribute' is not a 1x1 struct")
    decoded = {}
    for split in ("train", "test"):
        if split not in top.dtype.names:
            raise ValueError(f"{path}: 'market_attribute' has no split {split!r} "
                             f"(has {top.dtype.names})")
        struct = top[split][0, 0]
        if struct.dtype.names is None or struct.size != 1:
            raise ValueError(f"{path}: split {split!r} is not a 1x1 struct")
        decoded[split] = _decode_split(struct, split, path)
    overlap = np.intersect1d(decoded["train"][0], decoded["test"][0])
    if overlap.size:
        raise ValueError(f"{path}: {overlap.size} identities are in both train and test, "
                         f"first {overlap[:5].tolist()}")
    return MarketAttributes(names=ATTRIBUTE_NAMES,
                            train_ids=decoded["train"][0], train_labels=decoded["train"][1],
                            test_ids=decoded["test"][0], test_labels=decoded["test"][1])


def labels_for_pids(attrs: MarketAttributes, pids: np.ndarray,
                    split: str) -> tuple[np.ndarray, np.ndarray]:
    """Joins identity labels to images by pid.

    Args:
      attrs: the labels, from ``load_market_attributes``.
      pids: int[n], the pid of every image (e.g. ``Split.pids``; 0 = distractor, -1 = junk).
      split: 'train' for ``bounding_box_train`` images; 'test', 'query' or 'gallery' for the
        test identities.

    Returns:
      labels: uint8[n, 30]; all zeros where the pid has no labels.
      has_label: bool[n].

    The identities without labels are logged: distractors (0) and junk (-1) never have labels
    (info); any other identity without labels is a warning.
    """
    pids = np.asarray(pids)
    if pids.ndim != 1 or not np.issubdtype(pids.dtype, np.integer):
        raise ValueError(f"pids must be a 1-D integer array, got {pids.dtype}{list(pids.shape)}")
    ids, table = attrs.ids(split), attrs.labels(split)
    row = np.searchsorted(ids, pids).clip(0, max(ids.size - 1, 0))
    has_label = (ids.size > 0) & (ids[row] == pids)
    labels = np.where(has_label[:, None], table[row], 0).astype(np.uint8)
    missing = np.unique(pids[~has_label])
    unlabelled = missing[missing > 0]
    if missing.size:
        logging.info("%s: %d images (%d identities) without attribute labels; distractors/junk "
                     "among them: %s", split, int((~has_label).sum()), missing.size,
                     sorted(set(missing[missing <= 0].tolist())))
    if unlabelled.size:
        logging.warning("%s: %d identities other than distractors/junk have no attribute labels, "
                        "first %s", split, unlabelled.size,
                        [f"{p:04d}" for p in unlabelled[:10].tolist()])
    return labels, has_label


def positive_ratios(labels: np.ndarray) -> np.ndarray:
    """Percentage of positive rows per column (the paper's Table 4.1 "positive ratio").

    Args:
      labels: [n, k] in {0, 1}; one row per identity for the paper's per-identity ratio.

    Returns:
      float64[k], 100 * mean over rows.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] == 0:
        raise ValueError(f"labels must be [n, k] with n > 0, got shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be binary (0/1)")
    return 100.0 * labels.astype(np.float64).mean(axis=0)


def _encode_split(ids: np.ndarray, labels: np.ndarray, split: str) -> dict[str, np.ndarray]:
    """int[n] ids, {0,1}[n, 30] labels -> the MAT struct fields of one split, in file order."""
    ids = np.asarray(ids)
    labels = np.asarray(labels)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{split}_ids must be a non-empty 1-D integer array, got "
                         f"{ids.dtype}{list(ids.shape)}")
    if labels.shape != (ids.size, NUM_ATTRIBUTES):
        raise ValueError(f"{split}_labels must have shape ({ids.size}, {NUM_ATTRIBUTES}) "
                         f"(one row per id, columns ATTRIBUTE_NAMES), got {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{split}_labels must be binary (0/1)")
    if ids.min() < 1 or ids.max() > 9999:
        raise ValueError(f"{split}_ids must be in 1..9999 (4-digit identities), got "
                         f"{ids.min()}..{ids.max()}")
    order = np.argsort(ids, kind="stable")
    ids, labels = ids[order], labels[order].astype(np.uint8)
    if np.any(np.diff(ids) == 0):
        raise ValueError(f"{split}_ids has duplicates: {np.unique(ids[1:][np.diff(ids) == 0])}")
    age_onehot = labels[:, list(_AGE_COLUMNS)]
    bad = age_onehot.sum(axis=1) != 1
    if bad.any():
        raise ValueError(f"{split}_labels: age1..age4 must be one-hot; identity "
                         f"{ids[bad][0]:04d} has {age_onehot[bad][0].tolist()}")
    values: dict[str, np.ndarray] = {
        f: labels[:, ATTRIBUTE_NAMES.index(f)] + 1 for f in _BINARY_FIELDS}
    values["age"] = (age_onehot.argmax(axis=1) + 1).astype(np.uint8)
    image_index = np.empty((1, ids.size), dtype=object)
    for k, pid in enumerate(ids.tolist()):
        image_index[0, k] = f"{pid:04d}"
    values["image_index"] = image_index
    return {f: values[f] if f == "image_index" else values[f].astype(np.uint8)[None, :]
            for f in _FIELD_ORDERS[split]}


def write_market_attributes(path: str | os.PathLike, train_ids: np.ndarray,
                            train_labels: np.ndarray, test_ids: np.ndarray,
                            test_labels: np.ndarray) -> None:
    """Writes a ``market_attribute.mat`` with the structure and coding of the real file.

    ``market_attribute`` is a 1x1 struct with fields ``test``, ``train``; each a 1x1 struct of
    the 27 uint8 (1, n) attribute fields (1 = no, 2 = yes; age 1..4) in the real file's field
    order for that split, plus ``image_index``, a (1, n) cell array of 4-character id strings.

    Args:
      path: the .mat file to write (parent folders are created).
      train_ids: int[n_train] identities (1..9999, unique; written in ascending order).
      train_labels: {0,1}[n_train, 30], columns ``ATTRIBUTE_NAMES``; age1..age4 one-hot.
      test_ids: int[n_test], disjoint from ``train_ids``.
      test_labels: {0,1}[n_test, 30].
    """
    train = _encode_split(train_ids, train_labels, "train")
    test = _encode_split(test_ids, test_labels, "test")
    overlap = np.intersect1d(np.asarray(train_ids), np.asarray(test_ids))
    if overlap.size:
        raise ValueError(f"train_ids and test_ids overlap: {overlap[:5].tolist()}")
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    scipy.io.savemat(path, {"market_attribute": {"test": test, "train": train}},
                     format="5", do_compression=True, oned_as="row")
