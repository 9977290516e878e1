"""TFDS builder ``market1501``: Market-1501 (or the synthetic copy) as ArrayRecord files.

Reads a Market-1501-shaped folder from ``manual_dir`` with ``reid_jax.data.market1501`` and
joins the per-identity attribute labels of ``market_attribute.mat``. Records are written as
``array_record`` and read back with random access, without TensorFlow::

    builder = prepare_market1501(manual_dir, data_dir, config="synthetic")
    gallery = builder.as_data_source()["gallery"]   # or tfds.data_source("market1501", ...)
    record = gallery[0]   # {'image': b'\xff\xd8...', 'pid': 1, 'camera': 1, ...}

Features per image: ``image`` (the encoded file bytes, JPEG for Market-1501; decode them with
PIL in the input pipeline), ``file_name``, ``pid`` (0 = distractor), ``label`` (train: 0..C-1,
else the pid), ``camera`` (1..6), ``sequence``, ``frame``, ``attributes`` (uint8[30], columns
``ATTRIBUTE_NAMES``; all zeros when the identity has no labels) and ``has_attributes``.
Records keep the reader's order (sorted file names): record i of a split is ``Split.paths[i]``.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from reid_jax.data import attributes as attributes_lib
from reid_jax.data import market1501 as market_lib

ATTRIBUTE_FILE = "market_attribute.mat"

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
Market-1501 cannot be downloaded automatically. Put into `manual_dir`
(default `~/tensorflow_datasets/downloads/manual/`, or pass
`download_config=tfds.download.DownloadConfig(manual_dir=...)`):

  config "real":
    manual_dir/{market_lib.RELEASE_FOLDER}/   the extracted Market-1501 release, holding
        bounding_box_train/  bounding_box_test/  query/
    manual_dir/{ATTRIBUTE_FILE}   from github.com/vana77/Market-1501_Attribute
        (the 2018 version with `image_index`; not the first upload, whose coding is flipped)

  config "synthetic":
    manual_dir/  the output folder of `tools/make_synthetic.py`, holding
        bounding_box_train/  bounding_box_test/  query/  {ATTRIBUTE_FILE}

The attribute file may also sit inside the dataset folder itself.
"""

_CITATION = """
@inproceedings{zheng2015scalable,
  title={Scalable Person Re-identification: A Benchmark},
  author={Zheng, Liang and Shen, Liyue and Tian, Lu and Wang, Shengjin and Wang, Jingdong
          and Tian, Qi},
  booktitle={ICCV},
  year={2015}
}
@article{lin2019improving,
  title={Improving Person Re-identification by Attribute and Identity Learning},
  author={Lin, Yutian and Zheng, Liang and Zheng, Zhedong and Wu, Yu and Hu, Zhilan
          and Yan, Chenggang and Yang, Yi},
  journal={Pattern Recognition},
  year={2019}
}
"""


@dataclasses.dataclass
class Market1501Config(tfds.core.BuilderConfig):
    """Where the Market-shaped folder sits inside ``manual_dir`` and how it is read.

    root_subdir: folder below ``manual_dir`` holding the three split folders ('' = itself).
    verify_images: decode every image once while preparing and fail on one that does not.
    """

    root_subdir: str = ""
    verify_images: bool = True


def _find_attribute_file(manual_dir: str, root: str) -> str:
    candidates = [os.path.join(manual_dir, ATTRIBUTE_FILE), os.path.join(root, ATTRIBUTE_FILE)]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"attribute file {ATTRIBUTE_FILE!r} not found; looked at "
                            f"{candidates}.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")


class Market1501Builder(tfds.core.GeneratorBasedBuilder):
    """Market-1501 person re-identification with per-identity attributes (random access)."""

    name = "market1501"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images as encoded bytes, 30 binary attributes, array_record."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        Market1501Config(name="real", root_subdir=market_lib.RELEASE_FOLDER,
                         description="The Market-1501 release (Market-1501-v15.09.15)."),
        Market1501Config(name="synthetic", root_subdir="",
                         description="A Market-1501-shaped folder from tools/make_synthetic.py."),
    ]
    DEFAULT_CONFIG_NAME = "real"

    def __init__(self, *, file_format: str | tfds.core.FileFormat | None = None, **kwargs):
        """As ``tfds.core.GeneratorBasedBuilder``; ``file_format`` defaults to array_record."""
        super().__init__(file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        num = attributes_lib.NUM_ATTRIBUTES
        return tfds.core.DatasetInfo(
            builder=self,
            description="Market-1501 pedestrian images with identity, camera and 30 binary "
                        "attributes (Market-1501 Attribute, 27 fields, age one-hot). Attribute "
                        "columns: " + ", ".join(attributes_lib.ATTRIBUTE_NAMES) + ".",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(
                    shape=(), dtype=np.object_, doc="Encoded image file bytes (JPEG)."),
                "file_name": tfds.features.Text(doc="Market-1501 file name."),
                "pid": tfds.features.Scalar(np.int32, doc="Identity; 0 = distractor."),
                "label": tfds.features.Scalar(
                    np.int32, doc="train: pid relabelled 0..C-1; query/gallery: pid."),
                "camera": tfds.features.Scalar(np.int32, doc="Camera, 1..6."),
                "sequence": tfds.features.Scalar(np.int32),
                "frame": tfds.features.Scalar(np.int32),
                "attributes": tfds.features.Tensor(
                    shape=(num,), dtype=np.uint8, doc="30 binary attributes, ATTRIBUTE_NAMES."),
                "has_attributes": tfds.features.Scalar(
                    np.bool_, doc="False for identities without labels (distractors)."),
            }),
            homepage="https://zheng-lab-anu.github.io/Project/project_reid.html",
            citation=_CITATION,
            disable_shuffling=True,  # Record i of a split = Split.paths[i] of the reader.
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config: Market1501Config = self.builder_config
        manual_dir = os.fspath(dl_manager.manual_dir)
        root = os.path.join(manual_dir, config.root_subdir) if config.root_subdir else manual_dir
        data = market_lib.load_market1501(root, verify_images=config.verify_images)
        attrs = attributes_lib.load_market_attributes(_find_attribute_file(manual_dir, root))
        return {name: self._generate_examples(data.split(name), attrs)
                for name in market_lib.SPLIT_FOLDERS}

    def _generate_examples(self, split: market_lib.Split,
                           attrs: attributes_lib.MarketAttributes):
        labels, has_labels = attributes_lib.labels_for_pids(attrs, split.pids, split.name)
        for i, path in enumerate(split.paths):
            file_name = os.path.basename(path)
            with open(path, "rb") as f:
                image = f.read()
            yield file_name, {
                "image": image,
                "file_name": file_name,
                "pid": split.pids[i],
                "label": split.labels[i],
                "camera": split.cameras[i],
                "sequence": split.sequences[i],
                "frame": split.frames[i],
                "attributes": labels[i],
                "has_attributes": bool(has_labels[i]),
            }


def prepare_market1501(manual_dir: str | os.PathLike, data_dir: str | os.PathLike, *,
                       config: str = "real") -> Market1501Builder:
    """Prepares ``market1501/<config>`` from ``manual_dir`` into ``data_dir`` (reused if done).

    Returns the builder; ``builder.as_data_source()`` gives the train/query/gallery sources.
    """
    builder = Market1501Builder(data_dir=os.fspath(data_dir), config=config)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return builder
